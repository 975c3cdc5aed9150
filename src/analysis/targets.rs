//! Allocation entry points of one file: function addresses from symbols, PLT stubs, and
//! the GOT/data slots through which `call [rip+X]` reaches an allocator.

use goblin::elf::reloc::{R_X86_64_64, R_X86_64_GLOB_DAT, R_X86_64_JUMP_SLOT, R_X86_64_RELATIVE};
use goblin::elf::sym::{STT_FUNC, STT_GNU_IFUNC, STT_NOTYPE};
use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic, OpKind};

use super::Callee;
use super::addr_map::AddrMap;
use super::alloc_fn::AllocFn;
use super::elf::{Elf, SymTable, u64_at};

/// The addresses a pass looks for: code entry points and pointer slots, each mapped to
/// an index into the callee list.
#[derive(Default)]
pub(crate) struct Targets {
    pub code: AddrMap,
    pub slots: AddrMap,
}

impl Targets {
    pub fn clear(&mut self) {
        self.code.clear();
        self.slots.clear();
    }

    pub fn finish(&mut self) {
        self.code.finish();
        self.slots.finish();
    }

    pub fn is_empty(&self) -> bool {
        self.code.is_empty() && self.slots.is_empty()
    }

    /// The callee reached through the pointer slot at `slot`: a known slot, or (in a
    /// non-PIE file, where data holds final addresses) a slot whose bytes point at a
    /// target.
    pub fn slot_callee(&self, elf: &Elf, slot: u64) -> Option<u32> {
        if let Some(c) = self.slots.get(slot) {
            return Some(c);
        }
        if elf.pie || elf.is_code(slot) {
            return None;
        }
        self.code.get(elf.read_u64(slot)?)
    }
}

/// Finds the allocators of `elf`, appends them to `callees` and fills `targets`.
pub(crate) fn find_allocators(elf: &Elf, callees: &mut Vec<Callee>, targets: &mut Targets) {
    targets.clear();
    for table in [&elf.symtab, &elf.dynsym].into_iter().flatten() {
        defined_symbols(table, callees, targets);
    }
    if let Some(dynsym) = &elf.dynsym {
        symbol_slots(elf, dynsym, callees, targets);
    }
    targets.slots.finish();
    plt_stubs(elf, callees, targets);
    targets.code.finish();
    relative_slots(elf, targets);
    targets.finish();
}

fn callee_for(callees: &mut Vec<Callee>, f: AllocFn, addr: u64) -> u32 {
    if let Some(i) = callees.iter().position(|c| c.func == f && c.depth == 0) {
        if let Some(c) = callees.get_mut(i)
            && c.addr == 0
        {
            c.addr = addr;
        }
        return i as u32;
    }
    callees.push(Callee {
        name: f.name().to_string(),
        addr,
        func: f,
        arg: f.size_arg(),
        wraps: None,
        depth: 0,
        zero_to: None,
    });
    (callees.len() - 1) as u32
}

/// Allocators defined in the file itself (static binaries, the allocator's own tests).
fn defined_symbols(table: &SymTable, callees: &mut Vec<Callee>, targets: &mut Targets) {
    for sym in table.syms.iter() {
        let kind = sym.st_type();
        if sym.st_shndx == 0
            || sym.st_value == 0
            || !matches!(kind, STT_FUNC | STT_GNU_IFUNC | STT_NOTYPE)
        {
            continue;
        }
        if let Some(f) = AllocFn::from_symbol(table.name(sym.st_name)) {
            let idx = callee_for(callees, f, sym.st_value);
            targets.code.insert(sym.st_value, idx);
        }
    }
}

/// GOT and data slots bound to an allocator by name.
fn symbol_slots(elf: &Elf, dynsym: &SymTable, callees: &mut Vec<Callee>, targets: &mut Targets) {
    for rel in elf.relocs.iter().flat_map(|r| r.iter()) {
        if !matches!(
            rel.r_type,
            R_X86_64_JUMP_SLOT | R_X86_64_GLOB_DAT | R_X86_64_64
        ) || rel.r_sym == 0
        {
            continue;
        }
        let Some(sym) = dynsym.syms.get(rel.r_sym) else {
            continue;
        };
        if let Some(f) = AllocFn::from_symbol(dynsym.name(sym.st_name)) {
            let idx = callee_for(callees, f, 0);
            targets.slots.insert(rel.r_offset, idx);
        }
    }
}

/// PLT stubs are `[endbr64;] [bnd] jmp [rip+slot]`: the stub entry is a call target.
fn plt_stubs(elf: &Elf, callees: &mut [Callee], targets: &mut Targets) {
    if targets.slots.is_empty() {
        return;
    }
    let mut insn = Instruction::default();
    for range in &elf.plt {
        let mut decoder = Decoder::with_ip(
            64,
            elf.range_bytes(range),
            range.start,
            DecoderOptions::NONE,
        );
        let mut prev_endbr: Option<u64> = None;
        while decoder.can_decode() {
            decoder.decode_out(&mut insn);
            if insn.mnemonic() == Mnemonic::Endbr64 {
                prev_endbr = Some(insn.ip());
                continue;
            }
            if let Some(idx) = slot_jump(&insn).and_then(|slot| targets.slots.get(slot)) {
                let stub = prev_endbr
                    .filter(|&e| e.wrapping_add(4) == insn.ip())
                    .unwrap_or(insn.ip());
                targets.code.insert(stub, idx);
                if let Some(c) = callees.get_mut(idx as usize)
                    && c.addr == 0
                {
                    c.addr = stub;
                }
            }
            prev_endbr = None;
        }
    }
}

/// The slot of a `[bnd] jmp [rip+slot]`.
fn slot_jump(insn: &Instruction) -> Option<u64> {
    (insn.mnemonic() == Mnemonic::Jmp
        && insn.op0_kind() == OpKind::Memory
        && insn.is_ip_rel_memory_operand())
    .then(|| insn.ip_rel_memory_address())
}

/// Adds the slots whose relocated value is one of `targets.code`: `R_X86_64_RELATIVE`
/// addends and `DT_RELR` slots (whose file bytes hold the addend). Function-pointer
/// tables such as CPython's `_PyMem` hooks are found this way.
pub(crate) fn relative_slots(elf: &Elf, targets: &mut Targets) {
    if targets.code.is_empty() {
        return;
    }
    for rel in elf.relocs.iter().flat_map(|r| r.iter()) {
        if rel.r_type != R_X86_64_RELATIVE {
            continue;
        }
        let value = rel.r_addend.unwrap_or(0) as u64;
        if let Some(idx) = targets.code.get(value) {
            targets.slots.insert(rel.r_offset, idx);
        }
    }
    for table in &elf.relr {
        for slot in RelrIter::new(table) {
            if let Some(idx) = elf.read_u64(slot).and_then(|v| targets.code.get(v)) {
                targets.slots.insert(slot, idx);
            }
        }
    }
}

/// Iterates the addresses of a `DT_RELR` table: an even word is an address (the next
/// slot follows it), an odd word is a bitmap of the 63 words after the current base.
struct RelrIter<'a> {
    table: &'a [u8],
    pos: usize,
    base: u64,
    bitmap: u64,
    bit: u32,
    /// A bitmap was consumed: the base moves 63 words on.
    advance: bool,
}

impl<'a> RelrIter<'a> {
    fn new(table: &'a [u8]) -> Self {
        RelrIter {
            table,
            pos: 0,
            base: 0,
            bitmap: 0,
            bit: 63,
            advance: false,
        }
    }
}

impl Iterator for RelrIter<'_> {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        loop {
            while self.bit < 63 {
                let b = self.bit;
                self.bit += 1;
                if self.bitmap & (1 << b) != 0 {
                    return Some(self.base.wrapping_add(u64::from(b) * 8));
                }
            }
            if self.advance {
                self.base = self.base.wrapping_add(63 * 8);
                self.advance = false;
            }
            let word = u64_at(self.table, self.pos)?;
            self.pos += 8;
            if word & 1 == 0 {
                self.base = word.wrapping_add(8);
                return Some(word);
            }
            self.bitmap = word >> 1;
            self.bit = 0;
            self.advance = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::RelrIter;

    #[test]
    fn relr_decodes_addresses_and_bitmaps() {
        let mut t = Vec::new();
        t.extend_from_slice(&0x1000u64.to_le_bytes());
        // bitmap: words 0 and 2 after 0x1008
        t.extend_from_slice(&((0b101u64 << 1) | 1).to_le_bytes());
        let got: Vec<u64> = RelrIter::new(&t).collect();
        assert_eq!(got, vec![0x1000, 0x1008, 0x1018]);
    }
}
