//! Reading DWARF exception-handling data (`.eh_frame`, `.gcc_except_table`): LEB128
//! numbers and `DW_EH_PE_*`-encoded pointers, from the file's address space.

use super::elf::Elf;

/// Reads DWARF-encoded values from the file's address space.
pub(crate) struct Cursor<'e, 'a> {
    pub elf: &'e Elf<'a>,
    pub at: u64,
}

impl Cursor<'_, '_> {
    pub fn u8(&mut self) -> Option<u8> {
        let b = *self.elf.read(self.at, 1)?.first()?;
        self.at += 1;
        Some(b)
    }

    pub fn uleb(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    fn fixed(&mut self, n: u64) -> Option<u64> {
        let b = self.elf.read(self.at, n)?;
        let mut v = [0u8; 8];
        v.get_mut(..b.len())?.copy_from_slice(b);
        self.at += n;
        Some(u64::from_le_bytes(v))
    }

    /// A pointer in encoding `enc`; `pcrel` and `datarel` (relative to `data`) are applied.
    pub fn encoded(&mut self, enc: u8, data: u64) -> Option<u64> {
        if enc == 0xff {
            return Some(0); // DW_EH_PE_omit
        }
        let field = self.at;
        let raw = match enc & 0x0f {
            0x00 | 0x04 | 0x0c => self.fixed(8)?,
            0x01 => self.uleb()?,
            0x02 => self.fixed(2)?,
            0x03 => self.fixed(4)?,
            0x09 => self.uleb()?, // sleb128: only its length matters here
            0x0a => self.fixed(2)? as u16 as i16 as i64 as u64,
            0x0b => self.fixed(4)? as u32 as i32 as i64 as u64,
            _ => return None,
        };
        Some(match enc & 0x70 {
            0x00 => raw,
            0x10 => field.wrapping_add(raw),
            0x30 => data.wrapping_add(raw),
            _ => return None,
        })
    }
}
