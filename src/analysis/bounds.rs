//! Function bounds: which function contains an address.
//!
//! Preferred source: the `.eh_frame_hdr` binary-search table (present in stripped
//! binaries too) plus the FDE it points to for the length. Fallback: function symbols
//! with sizes. Last resort: a bounded window before the address, whose start is not a
//! real function entry.

use super::dwarf::Cursor;
use super::elf::{Elf, u32_at};

/// Bytes decoded before an address when no function bounds are known.
const WINDOW: u64 = 4096;
/// `DW_EH_PE_datarel | DW_EH_PE_sdata4`: the table encoding every linker writes.
const TABLE_ENC: u8 = 0x3b;

/// A function (or a window standing in for one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Func {
    pub start: u64,
    pub end: u64,
    /// `start` is a real entry point (FDE or symbol), so registers there hold arguments.
    pub entry: bool,
    /// Address of the function's LSDA (`.gcc_except_table`), which lists its landing pads.
    pub lsda: Option<u64>,
}

/// What an FDE needs from its CIE.
#[derive(Clone, Copy, Debug)]
struct Cie {
    /// Encoding of the FDE's `pc_begin`/`pc_range` (augmentation `R`).
    fde_enc: u8,
    /// Encoding of the LSDA pointer in the FDE's augmentation data (`L`).
    lsda_enc: Option<u8>,
    /// Augmentation data present (`z`).
    z: bool,
}

pub(crate) struct Bounds {
    /// Address of `.eh_frame_hdr`, file offset of its table (`count` pairs of i32).
    hdr: u64,
    table: usize,
    count: usize,
    /// The few CIEs of a file, by address.
    cies: Vec<(u64, Cie)>,
    /// Sorted `(start, end)` of sized function symbols, built only when needed.
    syms: Option<Vec<(u64, u64)>>,
}

impl Bounds {
    pub fn new(elf: &Elf) -> Bounds {
        let mut b = Bounds {
            hdr: 0,
            table: 0,
            count: 0,
            cies: Vec::new(),
            syms: None,
        };
        if let Some(hdr) = elf.eh_frame_hdr {
            b.init_table(elf, hdr);
        }
        b
    }

    fn init_table(&mut self, elf: &Elf, hdr: u64) -> Option<()> {
        let head = elf.read(hdr, 4)?;
        let (version, ptr_enc, count_enc, table_enc) =
            (*head.first()?, *head.get(1)?, *head.get(2)?, *head.get(3)?);
        if version != 1 || table_enc != TABLE_ENC {
            return None;
        }
        let mut cur = Cursor {
            elf,
            at: hdr.wrapping_add(4),
        };
        cur.encoded(ptr_enc, 0)?;
        let count = cur.encoded(count_enc, 0)?;
        // Every entry is 8 bytes: the count must fit in the file.
        let bytes = count.checked_mul(8)?;
        elf.read(cur.at, bytes)?;
        self.hdr = hdr;
        self.table = usize::try_from(elf.file_offset(cur.at)?).ok()?;
        self.count = usize::try_from(count).ok()?;
        Some(())
    }

    /// The function containing `addr`.
    pub fn find(&mut self, elf: &Elf, addr: u64) -> Option<Func> {
        if let Some(f) = self.lookup_table(elf, addr) {
            return Some(f);
        }
        if let Some(f) = self.lookup_symbols(elf, addr) {
            return Some(f);
        }
        // A window that stays inside the code segment.
        let seg_start = elf
            .code
            .iter()
            .find(|r| addr >= r.start && addr < r.end)?
            .start;
        let start = addr.saturating_sub(WINDOW).max(seg_start);
        Some(Func {
            start,
            end: addr.saturating_add(16),
            entry: false,
            lsda: None,
        })
    }

    fn entry(&self, elf: &Elf, i: usize) -> Option<(u64, u64)> {
        let at = self.table.checked_add(i.checked_mul(8)?)?;
        let e = elf.bytes.get(at..at.checked_add(8)?)?;
        let loc = self.hdr.wrapping_add(u32_at(e, 0)? as i32 as i64 as u64);
        let fde = self.hdr.wrapping_add(u32_at(e, 4)? as i32 as i64 as u64);
        Some((loc, fde))
    }

    fn lookup_table(&mut self, elf: &Elf, addr: u64) -> Option<Func> {
        if self.count == 0 {
            return None;
        }
        // Largest initial location <= addr.
        let (mut lo, mut hi) = (0usize, self.count);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.entry(elf, mid)?.0 <= addr {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        let (start, fde) = self.entry(elf, lo.checked_sub(1)?)?;
        let (len, lsda) = self.fde_info(elf, fde)?;
        let end = start.checked_add(len)?;
        (addr < end).then_some(Func {
            start,
            end,
            entry: true,
            lsda,
        })
    }

    /// The `pc_range` and LSDA address of the FDE at `fde`.
    fn fde_info(&mut self, elf: &Elf, fde: u64) -> Option<(u64, Option<u64>)> {
        let len = elf.read_u32(fde)?;
        let id_at = if len == 0xffff_ffff {
            fde.wrapping_add(12)
        } else {
            fde.wrapping_add(4)
        };
        if len == 0 {
            return None;
        }
        let cie_ptr = elf.read_u32(id_at)?;
        if cie_ptr == 0 {
            return None; // a CIE, not an FDE
        }
        let cie = self.cie(elf, id_at.checked_sub(u64::from(cie_ptr))?)?;
        let mut cur = Cursor {
            elf,
            at: id_at.wrapping_add(4),
        };
        cur.encoded(cie.fde_enc, 0)?; // pc_begin
        let range = cur.encoded(cie.fde_enc & 0x0f, 0)?; // same format, no base applied
        let lsda = match cie.lsda_enc {
            Some(enc) if cie.z => {
                cur.uleb()?; // augmentation data length
                Some(cur.encoded(enc, 0)?).filter(|&a| a != 0)
            }
            _ => None,
        };
        Some((range, lsda))
    }

    fn cie(&mut self, elf: &Elf, at: u64) -> Option<Cie> {
        if let Some(&(_, c)) = self.cies.iter().find(|c| c.0 == at) {
            return Some(c);
        }
        let cie = parse_cie(elf, at)?;
        if self.cies.len() < 64 {
            self.cies.push((at, cie));
        }
        Some(cie)
    }

    fn lookup_symbols(&mut self, elf: &Elf, addr: u64) -> Option<Func> {
        let syms = self.syms.get_or_insert_with(|| sized_functions(elf));
        let i = syms.partition_point(|s| s.0 <= addr).checked_sub(1)?;
        let &(start, end) = syms.get(i)?;
        (addr < end).then_some(Func {
            start,
            end,
            entry: true,
            lsda: None,
        })
    }
}

fn sized_functions(elf: &Elf) -> Vec<(u64, u64)> {
    let mut v = Vec::new();
    for table in [&elf.symtab, &elf.dynsym].into_iter().flatten() {
        for s in table.syms.iter() {
            if s.is_function() && s.st_value != 0 && s.st_size != 0 {
                v.push((s.st_value, s.st_value.saturating_add(s.st_size)));
            }
        }
    }
    v.sort_unstable();
    v.dedup_by_key(|s| s.0);
    v
}

/// The encodings the CIE at `cie` declares in its augmentation string.
fn parse_cie(elf: &Elf, cie: u64) -> Option<Cie> {
    let len = elf.read_u32(cie)?;
    let mut cur = Cursor {
        elf,
        at: if len == 0xffff_ffff {
            cie.wrapping_add(16)
        } else {
            cie.wrapping_add(8)
        },
    };
    let version = cur.u8()?;
    let mut aug = [0u8; 8];
    let mut n = 0;
    loop {
        let c = cur.u8()?;
        if c == 0 {
            break;
        }
        *aug.get_mut(n)? = c;
        n += 1;
    }
    let aug = aug.get(..n)?;
    let mut out = Cie {
        fde_enc: 0,
        lsda_enc: None,
        z: aug.first() == Some(&b'z'),
    };
    if !out.z {
        return Some(out);
    }
    cur.uleb()?; // code alignment
    cur.uleb()?; // data alignment (sleb, same length)
    if version == 1 {
        cur.u8()?;
    } else {
        cur.uleb()?;
    }
    cur.uleb()?; // augmentation data length
    for &c in aug.get(1..)? {
        match c {
            b'R' => out.fde_enc = cur.u8()?,
            b'L' => out.lsda_enc = Some(cur.u8()?),
            b'P' => {
                let e = cur.u8()?;
                cur.encoded(e, 0)?;
            }
            b'S' | b'B' | b'G' => {}
            _ => return None,
        }
    }
    Some(out)
}
