//! One decoded function and the facts the data flow needs about its control flow:
//! which instructions jump to which addresses (predecessors), and which addresses may be
//! reached from places the decoder cannot see (their predecessors are unknown, so no
//! value is trusted across them).
//!
//! Unknown predecessors come from: exception landing pads (from the LSDA), jump-table
//! targets (tables are recovered when their shape is recognised, otherwise the whole
//! function is opaque), label addresses taken as values (computed goto), and jumps back
//! from a split-off `.cold` fragment.

use iced_x86::{
    Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory,
    InstructionInfoOptions, Mnemonic, OpAccess, OpKind, Register, UsedRegister,
};

use super::bounds::{Bounds, Func};
use super::elf::Elf;
use super::lsda::landing_pads;

/// Jump-table entries read at most.
const MAX_TABLE: usize = 4096;
/// Instructions searched backwards for the loads feeding an indirect jump.
const TABLE_LOOKBACK: usize = 24;
/// A `.cold` fragment larger than this is not scanned; the function becomes opaque.
const MAX_FRAGMENT: u64 = 1 << 20;

#[derive(Default)]
pub(crate) struct FnCode {
    pub start: u64,
    pub end: u64,
    /// `start` is a real function entry: argument registers hold the caller's values.
    pub entry: bool,
    pub insns: Vec<Instruction>,
    /// `(target, index of the jumping instruction)`, sorted by target.
    pub edges: Vec<(u64, u32)>,
    /// Sorted addresses reachable from unseen places.
    pub opaque: Vec<u64>,
    /// Unrecovered indirect jump or no real bounds: no value is trusted anywhere.
    pub all_opaque: bool,
    ext: Vec<(u64, bool)>,
    indirect: Vec<u32>,
    frags: Vec<u64>,
    tables: Vec<u64>,
}

/// Registers a call may change (System V).
const VOLATILE: [Register; 9] = [
    Register::RAX,
    Register::RCX,
    Register::RDX,
    Register::RSI,
    Register::RDI,
    Register::R8,
    Register::R9,
    Register::R10,
    Register::R11,
];

pub(crate) fn is_volatile(reg: Register) -> bool {
    VOLATILE.contains(&reg)
}

pub(crate) fn is_call(insn: &Instruction) -> bool {
    matches!(
        insn.flow_control(),
        FlowControl::Call | FlowControl::IndirectCall
    )
}

/// Whether execution can continue with the next instruction. Calls are assumed to
/// return: an extra predecessor only makes the data flow more conservative.
pub(crate) fn falls_through(insn: &Instruction) -> bool {
    !matches!(
        insn.flow_control(),
        FlowControl::Return
            | FlowControl::UnconditionalBranch
            | FlowControl::IndirectBranch
            | FlowControl::Interrupt
            | FlowControl::Exception
    ) && !insn.is_invalid()
}

/// Bit of a 64-bit GPR (RAX..R15 are consecutive in iced) in a write mask; 0 for others.
pub(crate) fn gpr_bit(reg: Register) -> u32 {
    if reg.is_gpr64() {
        1 << (reg as u32 - Register::RAX as u32)
    } else {
        0
    }
}

/// Marks a write mask as computed (no GPR uses this bit).
const MASK_DONE: u32 = 1 << 16;

/// The GPRs `insn` may change, any part of them (calls: the volatile registers), with
/// bit 16 set so that a computed mask is never 0.
pub(crate) fn write_mask(info: &mut InstructionInfoFactory, insn: &Instruction) -> u32 {
    if is_call(insn) {
        return VOLATILE.iter().fold(MASK_DONE, |m, &r| m | gpr_bit(r));
    }
    let i = info.info_options(insn, InstructionInfoOptions::NO_MEMORY_USAGE);
    let written = |u: &&UsedRegister| {
        matches!(
            u.access(),
            OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite
        )
    };
    i.used_registers()
        .iter()
        .filter(written)
        .fold(MASK_DONE, |m, u| m | gpr_bit(u.register().full_register()))
}

/// Whether `insn` may change any part of the 64-bit register `reg` (calls included).
pub(crate) fn writes(info: &mut InstructionInfoFactory, insn: &Instruction, reg: Register) -> bool {
    write_mask(info, insn) & gpr_bit(reg) != 0
}

impl FnCode {
    /// Decodes `func` and computes its predecessor facts. False when its bytes are not
    /// in the file.
    pub fn load(
        &mut self,
        elf: &Elf,
        func: Func,
        bounds: &mut Bounds,
        info: &mut InstructionInfoFactory,
    ) -> bool {
        self.reset(func);
        let Some(bytes) = elf.bytes_at(func.start) else {
            return false;
        };
        let len = (func.end - func.start).min(bytes.len() as u64) as usize;
        let Some(bytes) = bytes.get(..len) else {
            return false;
        };
        self.decode(bytes);
        self.edges.sort_unstable_by_key(|e| e.0);
        if !func.entry {
            self.all_opaque = true;
            return true;
        }
        if let Some(lsda) = func.lsda {
            landing_pads(elf, lsda, func.start, &mut self.opaque);
        }
        for k in core::mem::take(&mut self.indirect) {
            self.jump_table(elf, k as usize, info);
        }
        self.cold_rejoins(elf, bounds);
        self.opaque.sort_unstable();
        self.opaque.dedup();
        let start = self.start;
        self.opaque.retain(|&a| a != start);
        true
    }

    fn reset(&mut self, func: Func) {
        self.start = func.start;
        self.end = func.end;
        self.entry = func.entry;
        self.insns.clear();
        self.edges.clear();
        self.opaque.clear();
        self.all_opaque = false;
        self.ext.clear();
        self.indirect.clear();
        self.frags.clear();
        self.tables.clear();
    }

    fn contains(&self, addr: u64) -> bool {
        addr >= self.start && addr < self.end
    }

    fn decode(&mut self, bytes: &[u8]) {
        let mut decoder = Decoder::with_ip(64, bytes, self.start, DecoderOptions::NONE);
        // Roughly one instruction per 4 bytes: reserve once instead of growing.
        self.insns.reserve(bytes.len() / 4);
        let mut insn = Instruction::default();
        while decoder.can_decode() {
            decoder.decode_out(&mut insn);
            let idx = self.insns.len() as u32;
            if insn.is_invalid() {
                self.opaque.push(insn.next_ip());
            }
            self.branch_facts(&insn, idx);
            self.label_refs(&insn);
            self.insns.push(insn);
        }
    }

    fn branch_facts(&mut self, insn: &Instruction, idx: u32) {
        match insn.flow_control() {
            FlowControl::ConditionalBranch
            | FlowControl::UnconditionalBranch
            | FlowControl::XbeginXabortXend => {
                if !matches!(
                    insn.op0_kind(),
                    OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
                ) {
                    return;
                }
                let t = insn.near_branch_target();
                let cond = insn.flow_control() != FlowControl::UnconditionalBranch;
                if self.contains(t) {
                    self.edges.push((t, idx));
                } else {
                    self.ext.push((t, cond));
                }
            }
            FlowControl::IndirectBranch if !insn.is_ip_rel_memory_operand() => {
                self.indirect.push(idx)
            }
            _ => {}
        }
    }

    /// An address inside this function used as a value (`lea r, [rip+label]`, or an
    /// absolute immediate in a non-PIE file) may be jumped to from anywhere.
    fn label_refs(&mut self, insn: &Instruction) {
        if insn.mnemonic() == Mnemonic::Lea && insn.is_ip_rel_memory_operand() {
            let a = insn.ip_rel_memory_address();
            if self.contains(a) {
                self.opaque.push(a);
            }
            return;
        }
        for op in 0..insn.op_count() {
            if matches!(
                insn.op_kind(op),
                OpKind::Immediate32 | OpKind::Immediate64 | OpKind::Immediate32to64
            ) {
                let v = insn.immediate(op);
                if self.contains(v) {
                    self.opaque.push(v);
                }
            }
        }
    }

    /// The range of `edges` that jump to `ip`.
    pub fn edges_to(&self, ip: u64) -> (usize, usize) {
        let lo = self.edges.partition_point(|e| e.0 < ip);
        let hi = lo
            + self
                .edges
                .get(lo..)
                .map_or(0, |s| s.partition_point(|e| e.0 == ip));
        (lo, hi)
    }

    pub fn is_opaque(&self, ip: u64) -> bool {
        self.all_opaque || self.opaque.binary_search(&ip).is_ok()
    }

    /// Recovers the targets of the indirect jump at `k` as edges, or makes the function
    /// opaque when the jump reads a table it cannot resolve.
    fn jump_table(&mut self, elf: &Elf, k: usize, info: &mut InstructionInfoFactory) {
        let Some(j) = self.insns.get(k).copied() else {
            return;
        };
        let ok = match j.op0_kind() {
            OpKind::Memory => self.table_from_memory(elf, k, &j, info),
            OpKind::Register => {
                self.table_from_register(elf, k, j.op0_register().full_register(), info)
            }
            _ => false,
        };
        if !ok {
            self.all_opaque = true;
        }
    }

    /// `jmp [table + idx*8]`: absolute entries. No index: a function pointer (tail call).
    fn table_from_memory(
        &mut self,
        elf: &Elf,
        k: usize,
        j: &Instruction,
        info: &mut InstructionInfoFactory,
    ) -> bool {
        if j.memory_index() == Register::None {
            return true;
        }
        if j.memory_index_scale() != 8 || elf.pie {
            return false;
        }
        match self.table_base(k, j, info) {
            Some(table) => {
                self.read_table(elf, table, None);
                true
            }
            None => false,
        }
    }

    /// `jmp reg` fed by `mov reg, [T + i*8]` (absolute) or by
    /// `movsxd reg, [B + i*4]; add reg, B` (relative). Anything else without an indexed
    /// load nearby is a function pointer.
    fn table_from_register(
        &mut self,
        elf: &Elf,
        k: usize,
        reg: Register,
        info: &mut InstructionInfoFactory,
    ) -> bool {
        let Some(d) = self.find_def(k, reg, info) else {
            return self.no_indexed_load(k);
        };
        let Some(def) = self.insns.get(d).copied() else {
            return false;
        };
        let loads_table = def.op1_kind() == OpKind::Memory && def.memory_index() != Register::None;
        match def.mnemonic() {
            Mnemonic::Mov if loads_table && def.memory_index_scale() == 8 && !elf.pie => {
                let Some(table) = self.table_base(d, &def, info) else {
                    return false;
                };
                self.read_table(elf, table, None);
                true
            }
            Mnemonic::Add if def.op1_kind() == OpKind::Register => {
                self.relative_table(elf, d, reg, def.op1_register().full_register(), info)
            }
            _ if loads_table => false,
            _ => self.no_indexed_load(k),
        }
    }

    fn relative_table(
        &mut self,
        elf: &Elf,
        add: usize,
        reg: Register,
        base_reg: Register,
        info: &mut InstructionInfoFactory,
    ) -> bool {
        let Some(base) = self.lea_value(add, base_reg, info) else {
            return false;
        };
        let Some(d) = self.find_def(add, reg, info) else {
            return false;
        };
        let Some(load) = self.insns.get(d).copied() else {
            return false;
        };
        if load.op1_kind() != OpKind::Memory || load.memory_index_scale() != 4 {
            return false;
        }
        let Some(table) = self.table_base(d, &load, info) else {
            return false;
        };
        self.read_table(elf, table, Some(base));
        true
    }

    /// True when no indexed load precedes the jump: it jumps through a function pointer.
    fn no_indexed_load(&self, k: usize) -> bool {
        let from = k.saturating_sub(TABLE_LOOKBACK);
        !self.insns.get(from..k).unwrap_or_default().iter().any(|i| {
            (0..i.op_count()).any(|op| i.op_kind(op) == OpKind::Memory)
                && i.memory_index() != Register::None
                && matches!(i.memory_index_scale(), 4 | 8)
        })
    }

    /// The table address of the indexed memory operand of instruction `at`.
    fn table_base(
        &self,
        at: usize,
        insn: &Instruction,
        info: &mut InstructionInfoFactory,
    ) -> Option<u64> {
        let disp = insn.memory_displacement64();
        match insn.memory_base() {
            Register::None => Some(disp),
            Register::RIP => Some(disp),
            b => Some(
                self.lea_value(at, b.full_register(), info)?
                    .wrapping_add(disp),
            ),
        }
    }

    /// The address loaded into `reg` before instruction `at` by `lea reg, [rip+X]` or
    /// `mov reg, imm`.
    fn lea_value(
        &self,
        at: usize,
        reg: Register,
        info: &mut InstructionInfoFactory,
    ) -> Option<u64> {
        let d = self.find_def(at, reg, info)?;
        let def = self.insns.get(d)?;
        if def.mnemonic() == Mnemonic::Lea && def.is_ip_rel_memory_operand() {
            return Some(def.ip_rel_memory_address());
        }
        if def.mnemonic() == Mnemonic::Mov
            && matches!(
                def.op1_kind(),
                OpKind::Immediate32 | OpKind::Immediate64 | OpKind::Immediate32to64
            )
        {
            return Some(def.immediate(1));
        }
        None
    }

    /// The last instruction before `at` (straight line, a few instructions) writing `reg`.
    fn find_def(
        &self,
        at: usize,
        reg: Register,
        info: &mut InstructionInfoFactory,
    ) -> Option<usize> {
        let from = at.saturating_sub(TABLE_LOOKBACK);
        (from..at).rev().find(|&i| {
            self.insns
                .get(i)
                .is_some_and(|insn| writes(info, insn, reg))
        })
    }

    /// Reads table entries while they point into code; those inside this function get
    /// unknown predecessors. (Keeping them as edges from the jump would be more precise
    /// but interpreters have hundreds of dispatch jumps over the same table; a case
    /// block's sizes are defined inside the block anyway.) Reading too far is harmless.
    fn read_table(&mut self, elf: &Elf, table: u64, rel_base: Option<u64>) {
        if self.tables.contains(&table) {
            return;
        }
        self.tables.push(table);
        let Some(data) = elf.bytes_at(table) else {
            return;
        };
        let width = if rel_base.is_some() { 4 } else { 8 };
        for entry in data.chunks_exact(width).take(MAX_TABLE) {
            let target = match (rel_base, entry.try_into()) {
                (Some(base), Ok(b4)) => base.wrapping_add(i32::from_le_bytes(b4) as i64 as u64),
                (None, _) => match entry.try_into() {
                    Ok(b8) => u64::from_le_bytes(b8),
                    Err(_) => break,
                },
                _ => break,
            };
            if !elf.is_code(target) {
                break;
            }
            if self.contains(target) {
                self.opaque.push(target);
            }
        }
    }

    /// gcc moves unlikely blocks to a `foo.cold` fragment that jumps back into `foo`.
    /// Every fragment this function jumps into (other than a tail call to a function
    /// start) is byte-scanned for jumps back; their targets get unknown predecessors.
    fn cold_rejoins(&mut self, elf: &Elf, bounds: &mut Bounds) {
        let mut ext = core::mem::take(&mut self.ext);
        ext.sort_unstable();
        for &(t, cond) in &ext {
            if elf.in_plt(t) {
                continue;
            }
            let Some(g) = bounds.find(elf, t) else {
                continue;
            };
            if !g.entry
                || g.start == self.start
                || (g.start == t && !cond)
                || self.frags.contains(&g.start)
            {
                continue;
            }
            self.frags.push(g.start);
            if g.end - g.start > MAX_FRAGMENT {
                self.all_opaque = true;
                continue;
            }
            self.scan_jumps_back(elf, g);
        }
        self.ext = ext;
    }

    fn scan_jumps_back(&mut self, elf: &Elf, g: Func) {
        let Some(bytes) = elf.read(g.start, g.end - g.start) else {
            self.all_opaque = true;
            return;
        };
        for (p, &b) in bytes.iter().enumerate() {
            let here = g.start + p as u64;
            let rel = |at: usize, n: usize| -> Option<i64> {
                let s = bytes.get(at..at + n)?;
                Some(match n {
                    1 => *s.first()? as i8 as i64,
                    _ => i32::from_le_bytes(s.try_into().ok()?) as i64,
                })
            };
            let target = match b {
                0xe9 => rel(p + 1, 4).map(|r| here.wrapping_add(5).wrapping_add(r as u64)),
                0xeb | 0x70..=0x7f => {
                    rel(p + 1, 1).map(|r| here.wrapping_add(2).wrapping_add(r as u64))
                }
                0x0f if matches!(bytes.get(p + 1), Some(0x80..=0x8f)) => {
                    rel(p + 2, 4).map(|r| here.wrapping_add(6).wrapping_add(r as u64))
                }
                _ => None,
            };
            if let Some(t) = target
                && self.contains(t)
            {
                self.opaque.push(t);
            }
        }
    }
}
