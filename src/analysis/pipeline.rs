//! The analysis passes: find allocators, scan for calls to them, decode the functions
//! holding those calls, infer sizes, promote wrappers, and repeat with the new wrappers
//! as the only targets until no new wrapper appears.

use iced_x86::{FlowControl, Instruction, InstructionInfoFactory, OpKind};

use super::AnalysisError;
use super::bounds::Bounds;
use super::budget::Budget;
use super::cfg::FnCode;
use super::confidence::site_confidence;
use super::dataflow::{ADDR, Eval, Scratch, Val};
use super::elf::Elf;
use super::scan::{Candidates, rescan, scan};
use super::targets::{Targets, find_allocators, relative_slots};
use super::wrappers::{Candidate, SymbolNames, drop_bad, promote};
use super::{CallSite, Callee, SizeArg};

/// Wrapper levels followed at most.
const MAX_PASSES: usize = 8;

/// Everything one analysis reuses between functions and passes.
struct Pipeline<'e, 'a> {
    elf: &'e Elf<'a>,
    bounds: Bounds,
    targets: Targets,
    code: FnCode,
    info: InstructionInfoFactory,
    scratch: Scratch,
    hits: Vec<u64>,
    /// Transfers recorded by the first scan, filtered by the later passes.
    transfers: Candidates,
    cands: Vec<Candidate>,
    names: SymbolNames,
    callees: Vec<Callee>,
    sites: Vec<CallSite>,
    /// `(site, start of the function holding it)` for every site found.
    site_functions: Vec<(u64, u64)>,
    /// Wrappers found to allocate more than their argument (see `wrappers`).
    bad: Vec<u32>,
}

/// Runs all passes over `elf`, or stops when `budget` is spent.
pub(crate) fn run(
    elf: &Elf,
    budget: &mut Budget,
) -> Result<(Vec<Callee>, Vec<CallSite>), AnalysisError> {
    let mut p = Pipeline {
        elf,
        bounds: Bounds::new(elf),
        targets: Targets::default(),
        code: FnCode::default(),
        info: InstructionInfoFactory::new(),
        scratch: Scratch::default(),
        hits: Vec::new(),
        transfers: Candidates::default(),
        cands: Vec::new(),
        names: SymbolNames::default(),
        callees: Vec::new(),
        sites: Vec::new(),
        site_functions: Vec::new(),
        bad: Vec::new(),
    };
    find_allocators(elf, &mut p.callees, &mut p.targets);
    for pass in 0..MAX_PASSES {
        if p.targets.is_empty() {
            break;
        }
        budget.check()?;
        p.pass(pass == 0, budget)?;
        let first_new = promote(elf, &mut p.cands, &mut p.callees, &mut p.names, &mut p.bad);
        p.next_targets(first_new);
    }
    drop_bad(&mut p.callees, &mut p.sites, &p.bad);
    p.sites.sort_by_key(|s| s.site);
    p.sites.dedup_by_key(|s| s.site);
    mark_sites_in_wrappers(elf, &mut p.sites, &mut p.site_functions, &p.callees);
    Ok((p.callees, p.sites))
}

/// Flags the sites that lie in a wrapper, once the wrappers are final: any callee whose
/// entry is code of this file, so a function promoted to a callee or an allocation
/// function the file defines itself (a statically linked `operator new` calling
/// `malloc`, libstdc++'s own, a `calloc` that calls `malloc`), not a PLT stub or a
/// pointer slot. A call from one of those is never where a size is chosen: the caller
/// of the function is (`Analysis::wrapper_returns`).
fn mark_sites_in_wrappers(
    elf: &Elf,
    sites: &mut [CallSite],
    functions: &mut [(u64, u64)],
    callees: &[Callee],
) {
    let mut wrappers: Vec<u64> = callees
        .iter()
        .filter(|c| c.addr != 0 && !elf.in_plt(c.addr))
        .map(|c| c.addr)
        .collect();
    if wrappers.is_empty() {
        return;
    }
    wrappers.sort_unstable();
    functions.sort_unstable();
    for s in sites {
        let function = functions
            .binary_search_by_key(&s.site, |f| f.0)
            .ok()
            .and_then(|i| functions.get(i))
            .map(|f| f.1);
        s.in_wrapper = function.is_some_and(|f| wrappers.binary_search(&f).is_ok());
    }
}

impl Pipeline<'_, '_> {
    /// Scans for the current targets and handles every function holding a hit.
    fn pass(&mut self, first: bool, budget: &mut Budget) -> Result<(), AnalysisError> {
        self.hits.clear();
        self.cands.clear();
        if first {
            scan(self.elf, &self.targets, &mut self.hits, &mut self.transfers);
        } else {
            rescan(self.elf, &self.targets, &mut self.hits, &mut self.transfers);
        }
        self.hits.sort_unstable();
        budget.check()?;
        let mut i = 0;
        while let Some(&hit) = self.hits.get(i) {
            i += 1;
            let Some(func) = self.bounds.find(self.elf, hit) else {
                continue;
            };
            // Later hits in the same function are handled with this decode.
            while self
                .hits
                .get(i)
                .is_some_and(|&h| h < func.end && h >= func.start)
            {
                i += 1;
            }
            budget.tick()?;
            if self
                .code
                .load(self.elf, func, &mut self.bounds, &mut self.info)
            {
                self.function_sites();
            }
        }
        Ok(())
    }

    /// Targets of the next pass: the wrappers just promoted.
    fn next_targets(&mut self, first_new: usize) {
        self.targets.clear();
        for (i, c) in self.callees.iter().enumerate().skip(first_new) {
            self.targets.code.insert(c.addr, i as u32);
        }
        self.targets.code.finish();
        relative_slots(self.elf, &mut self.targets);
        self.targets.finish();
    }

    /// Every call or tail jump of the decoded function to a current target.
    fn function_sites(&mut self) {
        self.scratch.reset(self.code.insns.len());
        for k in 0..self.code.insns.len() {
            let Some(insn) = self.code.insns.get(k).copied() else {
                break;
            };
            let Some((callee, tail)) = self.callee_of(&insn) else {
                continue;
            };
            let Some(c) = self.callees.get(callee as usize) else {
                continue;
            };
            if c.addr == self.code.start && c.depth > 0 {
                continue; // a wrapper's recursion into itself
            }
            let site = self.infer(k, insn.ip(), insn.len() as u8, tail, callee);
            self.site_functions.push((site.site, self.code.start));
            self.sites.push(site);
        }
    }

    fn callee_of(&self, insn: &Instruction) -> Option<(u32, bool)> {
        let tail = match insn.flow_control() {
            FlowControl::Call | FlowControl::IndirectCall => false,
            FlowControl::UnconditionalBranch | FlowControl::IndirectBranch => true,
            _ => return None,
        };
        let callee = match insn.op0_kind() {
            OpKind::NearBranch64 | OpKind::NearBranch32 => {
                self.targets.code.get(insn.near_branch_target())?
            }
            OpKind::Memory if insn.is_ip_rel_memory_operand() => self
                .targets
                .slot_callee(self.elf, insn.ip_rel_memory_address())?,
            _ => return None,
        };
        Some((callee, tail))
    }

    /// Size, confidence and (when the size is this function's argument) a wrapper
    /// candidate for the site at instruction `k`.
    fn infer(&mut self, k: usize, ip: u64, len: u8, tail: bool, callee: u32) -> CallSite {
        let mut site = CallSite {
            site: ip,
            len,
            tail,
            callee,
            size: None,
            confidence: 0.0,
            via_wrapper: false,
            in_wrapper: false,
        };
        let Some(c) = self.callees.get(callee as usize) else {
            return site;
        };
        let (arg, depth, zero_to) = (c.arg, c.depth, c.zero_to);
        site.via_wrapper = depth > 0;
        let mut eval = Eval::new(&self.code, &mut self.info, &mut self.scratch);
        let (a, b) = match arg {
            SizeArg::Reg(r) => (eval.before(k, r.register()), Val::Const(1, 0)),
            SizeArg::Product(x, y) => {
                let a = eval.before(k, x.register());
                (
                    a,
                    if matches!(a, Val::Unknown) {
                        Val::Unknown
                    } else {
                        eval.before(k, y.register())
                    },
                )
            }
        };
        match (a, b) {
            (Val::Const(x, f), Val::Const(y, g)) if (f | g) & ADDR == 0 => {
                let size = x.checked_mul(y);
                // A wrapper that turns 0 into 1 makes a zero argument ambiguous.
                if size.is_some_and(|s| s > 0 || zero_to.is_none()) {
                    site.size = size;
                    site.confidence = site_confidence(f | g, depth, zero_to.is_some());
                }
                if size.is_none_or(|s| s > 1) {
                    self.other_allocation(callee);
                }
            }
            _ => self.candidate(a, b, arg, zero_to, callee),
        }
        site
    }

    /// Notes that this function allocates something else than its argument.
    fn other_allocation(&mut self, callee: u32) {
        if self.code.entry {
            self.cands.push(Candidate {
                start: self.code.start,
                arg: None,
                zero_to: None,
                callee,
            });
        }
    }

    /// Records a wrapper candidate when the size comes from this function's arguments,
    /// or a disqualifying site otherwise.
    fn candidate(&mut self, a: Val, b: Val, arg: SizeArg, inner_zero: Option<u8>, callee: u32) {
        if !self.code.entry {
            return;
        }
        let one = |v: Val| matches!(v, Val::Const(1, f) if f & ADDR == 0);
        let zero = |v: Val| matches!(v, Val::Const(0, f) if f & ADDR == 0);
        if zero(a) || zero(b) {
            return; // calloc(0, n): nothing allocated, not another allocation
        }
        let (wrapper_arg, zero_to) = match (arg, a, b) {
            (SizeArg::Reg(_), Val::Param(r, n), _) => (SizeArg::Reg(r), n),
            (SizeArg::Product(..), Val::Param(r, n), Val::Param(s, m)) => {
                (SizeArg::Product(r, s), n.or(m))
            }
            (SizeArg::Product(..), Val::Param(r, n), v)
            | (SizeArg::Product(..), v, Val::Param(r, n))
                if one(v) =>
            {
                (SizeArg::Reg(r), n)
            }
            _ => return self.other_allocation(callee),
        };
        self.cands.push(Candidate {
            start: self.code.start,
            arg: Some(wrapper_arg),
            zero_to: zero_to.or(inner_zero),
            callee,
        });
    }
}
