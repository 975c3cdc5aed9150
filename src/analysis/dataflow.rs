//! Backward value inference: what a register holds just before an instruction.
//!
//! The walk goes back from the call through the instructions that can precede it. A
//! register's value is known only when every path agrees:
//! - a single fall-through predecessor: keep walking until the defining instruction;
//! - a join (a jump target, or the function entry): evaluate every predecessor and
//!   require the same answer; a loop back to a join already being evaluated adds no
//!   constraint (`Top`), which is sound because only plain copies may carry `Top`
//!   (arithmetic on `Top` gives `Unknown`);
//! - an address with unknown predecessors (see `cfg`), a call clobbering the register,
//!   a load, a partial write, `sbb`/`setcc`... give `Unknown`.
//!
//! Values at the function entry in argument registers are `Param`: that is how
//! wrappers (functions passing their own size argument to an allocator) are found.

use iced_x86::{Instruction, InstructionInfoFactory, Mnemonic, OpKind, Register};

use super::alloc_fn::ArgReg;
use super::cfg::{FnCode, falls_through, gpr_bit, is_call, is_volatile, write_mask};

/// The constant went through arithmetic (`add`, `shl`, `lea`, `imul`...).
pub(crate) const ARITH: u8 = 1;
/// The constant was proven equal on several paths.
pub(crate) const JOIN: u8 = 2;
/// The constant was kept in a callee-saved register across a call.
pub(crate) const CALL: u8 = 4;
/// The "constant" is an address (`lea r, [rip+X]`), never a size.
pub(crate) const ADDR: u8 = 8;

/// Instructions visited per query before giving up.
const BUDGET: u32 = 4096;
/// Nested joins per query.
const MAX_DEPTH: usize = 48;
/// Memoised joins per function.
const MAX_MEMO: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Val {
    /// No constraint yet (a loop back edge).
    Top,
    /// A known 64-bit value and how it was derived (flags above).
    Const(u64, u8),
    /// The function's argument in this register, unchanged. `Some(k)`: on some path a
    /// constant `k <= 1` replaces it, as in `if (n == 0) n = 1`.
    Param(ArgReg, Option<u8>),
    Unknown,
}

/// Merge of two paths' values.
fn merge(a: Val, b: Val) -> Val {
    use Val::*;
    match (a, b) {
        (Top, x) | (x, Top) => x,
        (Unknown, _) | (_, Unknown) => Unknown,
        (Const(x, f), Const(y, g)) if x == y => Const(x, f | g | JOIN),
        (Const(..), Const(..)) => Unknown,
        (Param(r, n), Param(s, m)) if r == s => match (n, m) {
            (None, x) | (x, None) => Param(r, x),
            (Some(x), Some(y)) if x == y => Param(r, Some(x)),
            _ => Unknown,
        },
        (Param(..), Param(..)) => Unknown,
        (Param(r, n), Const(c, f)) | (Const(c, f), Param(r, n)) => {
            if c <= 1 && f & ADDR == 0 && n.is_none_or(|x| u64::from(x) == c) {
                Param(r, Some(c as u8))
            } else {
                Unknown
            }
        }
    }
}

fn with_flags(v: Val, flags: u8) -> Val {
    match v {
        Val::Const(c, f) => Val::Const(c, f | flags),
        other => other,
    }
}

fn param(reg: Register) -> Val {
    ArgReg::from_register(reg).map_or(Val::Unknown, |a| Val::Param(a, None))
}

/// Per-function memory of the evaluation, reused between functions.
#[derive(Default)]
pub(crate) struct Scratch {
    /// Joins being evaluated (cycle detection).
    stack: Vec<(u32, Register)>,
    /// Join values computed without a cycle assumption: facts of the function, valid
    /// for every query in it.
    memo: Vec<(u32, Register, Val)>,
    /// Per instruction: GPRs it may write (see `cfg::write_mask`), `UNSET` before use.
    writes: Vec<u32>,
    /// Count of `Top` answers given (a result computed meanwhile is not memoised).
    cycles: u32,
}

const UNSET: u32 = 0;

impl Scratch {
    /// Prepares for a newly loaded function of `n` instructions.
    pub fn reset(&mut self, n: usize) {
        self.memo.clear();
        self.writes.clear();
        self.writes.resize(n, UNSET);
    }
}

/// Evaluates register values inside one decoded function.
pub(crate) struct Eval<'c> {
    code: &'c FnCode,
    info: &'c mut InstructionInfoFactory,
    s: &'c mut Scratch,
    budget: u32,
}

impl<'c> Eval<'c> {
    pub fn new(code: &'c FnCode, info: &'c mut InstructionInfoFactory, s: &'c mut Scratch) -> Self {
        Eval {
            code,
            info,
            s,
            budget: 0,
        }
    }

    /// The value of the 64-bit register `reg` just before instruction `idx`.
    pub fn before(&mut self, idx: usize, reg: Register) -> Val {
        if self.code.all_opaque {
            return Val::Unknown;
        }
        self.budget = BUDGET;
        self.s.stack.clear();
        match self.value_before(idx, reg) {
            Val::Top => Val::Unknown,
            v => v,
        }
    }

    fn insn(&self, i: usize) -> Option<&'c Instruction> {
        self.code.insns.get(i)
    }

    /// Whether instruction `k` may write `reg`, from the per-function cache.
    fn writes(&mut self, k: usize, reg: Register) -> bool {
        let Some(&cached) = self.s.writes.get(k) else {
            return true;
        };
        let mask = if cached == UNSET {
            let Some(ins) = self.insn(k) else { return true };
            let m = write_mask(self.info, ins);
            if let Some(w) = self.s.writes.get_mut(k) {
                *w = m;
            }
            m
        } else {
            cached
        };
        mask & gpr_bit(reg) != 0
    }

    fn value_before(&mut self, idx: usize, reg: Register) -> Val {
        let mut i = idx;
        let mut flags = 0u8;
        loop {
            if self.budget == 0 {
                return Val::Unknown;
            }
            self.budget -= 1;
            let Some(ins) = self.insn(i) else {
                return Val::Unknown;
            };
            let ip = ins.ip();
            if self.code.is_opaque(ip) {
                return Val::Unknown;
            }
            let (e0, e1) = self.code.edges_to(ip);
            let entry = i == 0 && self.code.entry && ip == self.code.start;
            let prev = i.checked_sub(1).and_then(|p| self.insn(p));
            let fall = prev.is_some_and(|p| falls_through(p) && p.next_ip() == ip);
            if e0 < e1 || entry {
                return with_flags(self.join(i, reg, fall, entry, e0, e1), flags);
            }
            let Some(prev) = prev.filter(|_| fall) else {
                // Alignment padding after a `ret`/`jmp` is never executed: no
                // constraint. Any other instruction without predecessors is reached in
                // ways not seen here.
                return if is_padding(ins) {
                    Val::Top
                } else {
                    Val::Unknown
                };
            };
            i -= 1;
            if is_call(prev) {
                if is_volatile(reg) {
                    return Val::Unknown;
                }
                flags |= CALL;
                continue;
            }
            if self.writes(i, reg) {
                return with_flags(self.eval_def(i, reg), flags);
            }
        }
    }

    /// The value after instruction `k` (which precedes the point of interest).
    fn value_after(&mut self, k: usize, reg: Register) -> Val {
        let Some(ins) = self.insn(k) else {
            return Val::Unknown;
        };
        if is_call(ins) {
            return if is_volatile(reg) {
                Val::Unknown
            } else {
                with_flags(self.value_before(k, reg), CALL)
            };
        }
        if self.writes(k, reg) {
            self.eval_def(k, reg)
        } else {
            self.value_before(k, reg)
        }
    }

    /// Merges the values of all predecessors of instruction `i`.
    fn join(
        &mut self,
        i: usize,
        reg: Register,
        fall: bool,
        entry: bool,
        e0: usize,
        e1: usize,
    ) -> Val {
        let key = (i as u32, reg);
        if let Some(&(_, _, v)) = self.s.memo.iter().find(|m| (m.0, m.1) == key) {
            return v;
        }
        if self.s.stack.contains(&key) {
            self.s.cycles += 1;
            return Val::Top;
        }
        if self.s.stack.len() >= MAX_DEPTH {
            return Val::Unknown;
        }
        let cycles = self.s.cycles;
        self.s.stack.push(key);
        let mut acc = if entry { param(reg) } else { Val::Top };
        if fall && acc != Val::Unknown {
            acc = merge(acc, self.value_after(i - 1, reg));
        }
        for e in e0..e1 {
            if acc == Val::Unknown {
                break;
            }
            let Some(&(_, src)) = self.code.edges.get(e) else {
                break;
            };
            acc = merge(acc, self.value_after(src as usize, reg));
        }
        self.s.stack.pop();
        if e1 - e0 + usize::from(fall) + usize::from(entry) > 1 {
            acc = with_flags(acc, JOIN);
        }
        // Memoise facts only: no cycle assumption used, budget not exhausted.
        if self.s.cycles == cycles && self.budget > 0 && self.s.memo.len() < MAX_MEMO {
            self.s.memo.push((key.0, key.1, acc));
        }
        acc
    }

    /// The value of `reg` after instruction `k`, which writes it.
    fn eval_def(&mut self, k: usize, reg: Register) -> Val {
        let Some(&ins) = self.insn(k) else {
            return Val::Unknown;
        };
        if ins.op0_kind() != OpKind::Register || ins.op0_register().full_register() != reg {
            return Val::Unknown; // implicit or second-operand write
        }
        let dst = ins.op0_register();
        let mask = if dst.is_gpr32() {
            0xffff_ffff
        } else if dst.is_gpr64() {
            u64::MAX
        } else {
            return Val::Unknown; // 8/16-bit writes keep the upper bits
        };
        let v = match ins.mnemonic() {
            Mnemonic::Mov => self.operand(k, &ins, 1),
            Mnemonic::Xor | Mnemonic::Sub
                if ins.op1_kind() == OpKind::Register && ins.op1_register() == dst =>
            {
                Val::Const(0, 0)
            }
            Mnemonic::Lea => self.lea(k, &ins),
            Mnemonic::Movzx | Mnemonic::Movsx | Mnemonic::Movsxd => self.extend(k, &ins),
            m if is_cmov(m) => {
                let old = self.value_before(k, reg);
                let new = self.operand(k, &ins, 1);
                with_flags(merge(old, new), JOIN)
            }
            _ => self.arith(k, &ins, reg),
        };
        masked(v, mask)
    }

    /// The value of operand `op` (register or immediate) of instruction `k`.
    fn operand(&mut self, k: usize, ins: &Instruction, op: u32) -> Val {
        match ins.op_kind(op) {
            OpKind::Register => {
                let r = ins.op_register(op);
                if r.is_gpr64() {
                    self.value_before(k, r)
                } else if r.is_gpr32() {
                    masked(self.value_before(k, r.full_register()), 0xffff_ffff)
                } else {
                    Val::Unknown
                }
            }
            OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64 => Val::Const(ins.immediate(op), 0),
            _ => Val::Unknown,
        }
    }

    fn lea(&mut self, k: usize, ins: &Instruction) -> Val {
        let base = ins.memory_base();
        let index = ins.memory_index();
        let disp = ins.memory_displacement64();
        if base == Register::RIP {
            return Val::Const(ins.ip_rel_memory_address(), ADDR);
        }
        if base == Register::None && index == Register::None {
            return Val::Const(disp, 0);
        }
        if index == Register::None && disp == 0 && base.is_gpr64() {
            return self.value_before(k, base); // a plain copy
        }
        let b = self.reg_value(k, base);
        let i = self.reg_value(k, index);
        match (b, i) {
            (Val::Const(b, f), Val::Const(i, g)) => {
                let v = b
                    .wrapping_add(i.wrapping_mul(u64::from(ins.memory_index_scale())))
                    .wrapping_add(disp);
                Val::Const(v, f | g | ARITH)
            }
            _ => Val::Unknown,
        }
    }

    /// An address register's value (0 for none).
    fn reg_value(&mut self, k: usize, r: Register) -> Val {
        if r == Register::None {
            Val::Const(0, 0)
        } else if r.is_gpr64() {
            self.value_before(k, r)
        } else if r.is_gpr32() {
            masked(self.value_before(k, r.full_register()), 0xffff_ffff)
        } else {
            Val::Unknown
        }
    }

    /// `movzx`/`movsx`/`movsxd` from a register.
    fn extend(&mut self, k: usize, ins: &Instruction) -> Val {
        if ins.op1_kind() != OpKind::Register {
            return Val::Unknown;
        }
        let src = ins.op1_register();
        let bits = (src.size() * 8) as u32;
        if !(src.is_gpr8() || src.is_gpr16() || src.is_gpr32())
            || matches!(
                src,
                Register::AH | Register::BH | Register::CH | Register::DH
            )
        {
            return Val::Unknown;
        }
        match self.value_before(k, src.full_register()) {
            // `movsxd rdi, edi` of an `int` argument still passes the argument through.
            Val::Param(a, n) if src.is_gpr32() => Val::Param(a, n),
            Val::Const(v, f) => {
                let low = v & ((1u64 << bits) - 1);
                let signed = ins.mnemonic() != Mnemonic::Movzx;
                let ext = if signed && low >> (bits - 1) & 1 == 1 {
                    low | !((1u64 << bits) - 1)
                } else {
                    low
                };
                Val::Const(ext, f)
            }
            _ => Val::Unknown,
        }
    }

    /// Integer arithmetic with constant operands.
    fn arith(&mut self, k: usize, ins: &Instruction, reg: Register) -> Val {
        let m = ins.mnemonic();
        if m == Mnemonic::Imul && ins.op_count() == 3 {
            return match (self.operand(k, ins, 1), self.operand(k, ins, 2)) {
                (Val::Const(a, f), Val::Const(b, g)) => {
                    Val::Const(a.wrapping_mul(b), f | g | ARITH)
                }
                _ => Val::Unknown,
            };
        }
        let unary = matches!(
            m,
            Mnemonic::Inc | Mnemonic::Dec | Mnemonic::Neg | Mnemonic::Not
        );
        let binary = matches!(
            m,
            Mnemonic::Add
                | Mnemonic::Sub
                | Mnemonic::And
                | Mnemonic::Or
                | Mnemonic::Xor
                | Mnemonic::Shl
                | Mnemonic::Shr
                | Mnemonic::Sar
                | Mnemonic::Imul
        );
        let two_operands = binary && ins.op_count() == 2;
        if !(unary || two_operands) {
            return Val::Unknown;
        }
        let Val::Const(a, f) = self.value_before(k, reg) else {
            return Val::Unknown;
        };
        let (b, g) = if unary {
            (0, 0)
        } else {
            match self.operand(k, ins, 1) {
                Val::Const(b, g) => (b, g),
                _ => return Val::Unknown,
            }
        };
        let wide = ins.op0_register().is_gpr64();
        let Some(v) = compute(m, a, b, wide) else {
            return Val::Unknown;
        };
        Val::Const(v, f | g | ARITH)
    }
}

fn is_padding(ins: &Instruction) -> bool {
    matches!(ins.mnemonic(), Mnemonic::Nop | Mnemonic::Int3)
}

fn is_cmov(m: Mnemonic) -> bool {
    matches!(
        m,
        Mnemonic::Cmova
            | Mnemonic::Cmovae
            | Mnemonic::Cmovb
            | Mnemonic::Cmovbe
            | Mnemonic::Cmove
            | Mnemonic::Cmovg
            | Mnemonic::Cmovge
            | Mnemonic::Cmovl
            | Mnemonic::Cmovle
            | Mnemonic::Cmovne
            | Mnemonic::Cmovno
            | Mnemonic::Cmovnp
            | Mnemonic::Cmovns
            | Mnemonic::Cmovo
            | Mnemonic::Cmovp
            | Mnemonic::Cmovs
    )
}

/// One arithmetic step as the CPU does it (wrapping; shifts mask their count).
fn compute(m: Mnemonic, a: u64, b: u64, wide: bool) -> Option<u64> {
    let (bits, mask) = if wide {
        (64u32, u64::MAX)
    } else {
        (32u32, 0xffff_ffffu64)
    };
    let a = a & mask;
    let count = (b & u64::from(bits - 1)) as u32;
    Some(
        match m {
            Mnemonic::Add => a.wrapping_add(b),
            Mnemonic::Sub => a.wrapping_sub(b),
            Mnemonic::And => a & b,
            Mnemonic::Or => a | b,
            Mnemonic::Xor => a ^ b,
            Mnemonic::Imul => a.wrapping_mul(b),
            Mnemonic::Shl => a << count,
            Mnemonic::Shr => a >> count,
            Mnemonic::Sar if wide => ((a as i64) >> count) as u64,
            Mnemonic::Sar => ((a as u32 as i32) >> count) as u32 as u64,
            Mnemonic::Inc => a.wrapping_add(1),
            Mnemonic::Dec => a.wrapping_sub(1),
            Mnemonic::Neg => a.wrapping_neg(),
            Mnemonic::Not => !a,
            _ => return None,
        } & mask,
    )
}

/// `v` truncated to the bits of `mask` (a 32-bit write zero-extends).
fn masked(v: Val, mask: u64) -> Val {
    match v {
        Val::Const(c, f) => Val::Const(c & mask, f),
        // Around a loop, a truncating copy changes the value it carries: not a copy.
        Val::Top if mask != u64::MAX => Val::Unknown,
        other => other,
    }
}
