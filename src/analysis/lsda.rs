//! Landing pads from a function's LSDA (`.gcc_except_table`). The unwinder enters a
//! landing pad from any call of its range with only the callee-saved registers defined,
//! so a landing pad is an address whose predecessors the data flow cannot see.

use super::dwarf::Cursor;
use super::elf::Elf;

/// Call-site records read at most per function.
const MAX_CALL_SITES: usize = 1 << 16;
const DW_EH_PE_OMIT: u8 = 0xff;

/// Appends the landing pads of the LSDA at `lsda` (of the function at `start`).
pub(crate) fn landing_pads(elf: &Elf, lsda: u64, start: u64, out: &mut Vec<u64>) {
    let _ = read(elf, lsda, start, out);
}

fn read(elf: &Elf, lsda: u64, start: u64, out: &mut Vec<u64>) -> Option<()> {
    let mut cur = Cursor { elf, at: lsda };
    let lp_enc = cur.u8()?;
    let lp_start = if lp_enc == DW_EH_PE_OMIT {
        start
    } else {
        cur.encoded(lp_enc, 0)?
    };
    if cur.u8()? != DW_EH_PE_OMIT {
        cur.uleb()?; // type table offset
    }
    // Call-site fields are offsets: only the format nibble of the encoding applies.
    let format = cur.u8()? & 0x0f;
    let len = cur.uleb()?;
    let end = cur.at.checked_add(len)?;
    for _ in 0..MAX_CALL_SITES {
        if cur.at >= end {
            break;
        }
        cur.encoded(format, 0)?; // call-site start
        cur.encoded(format, 0)?; // call-site length
        let pad = cur.encoded(format, 0)?;
        cur.uleb()?; // action
        if pad != 0 {
            out.push(lp_start.wrapping_add(pad));
        }
    }
    Some(())
}
