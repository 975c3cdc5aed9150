//! Wrapper promotion: a function that hands its own size argument, unchanged, to an
//! allocator (by call or tail jump) is an allocator too. `xmalloc`, `PyMem_Malloc`,
//! `CRYPTO_malloc`, `__rdl_alloc`, an `operator new` calling malloc... The pipeline
//! repeats the promotion with the new wrappers as targets until nothing changes.
//!
//! A wrapper must allocate only what it is asked for: every allocation site in it must
//! forward the same argument, or request at most 1 byte (the `malloc(1)` retry of a
//! zero-size request). A function that also allocates something else (a header, a copy)
//! is not a wrapper: a call to it does not tell which size is allocated there. Such a
//! function found out late (through a wrapper discovered in a later pass) is dropped at
//! the end together with everything promoted through it.

use super::alloc_fn::SizeArg;
use super::elf::{Elf, SymTable};
use super::{CallSite, Callee};

/// An allocation site in the function at `start`: passing its argument `arg` to
/// `callee`'s size, or (`arg: None`) allocating something else.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Candidate {
    pub start: u64,
    pub arg: Option<SizeArg>,
    /// The wrapper (or the callee it forwards to) replaces a zero size by this.
    pub zero_to: Option<u8>,
    pub callee: u32,
}

/// Turns this pass's candidates into new callees; returns the index of the first one
/// added (`callees.len()` before the call). Existing wrappers seen allocating something
/// else are added to `bad`.
pub(crate) fn promote(
    elf: &Elf,
    cands: &mut [Candidate],
    callees: &mut Vec<Callee>,
    names: &mut SymbolNames,
    bad: &mut Vec<u32>,
) -> usize {
    let first = callees.len();
    cands.sort_by_key(|c| (c.start, c.callee));
    let mut known: Vec<(u64, u32)> = callees
        .iter()
        .enumerate()
        .filter(|(_, c)| c.addr != 0)
        .map(|(i, c)| (c.addr, i as u32))
        .collect();
    known.sort_unstable();
    let mut i = 0;
    while let Some(c) = cands.get(i).copied() {
        let n = cands
            .get(i..)
            .map_or(0, |s| s.iter().take_while(|d| d.start == c.start).count());
        let group = cands.get(i..i + n).unwrap_or_default();
        i += n.max(1);
        // All sites must pass the same argument.
        let forwards = group.iter().all(|d| d.arg.is_some() && d.arg == c.arg);
        if let Ok(k) = known.binary_search_by_key(&c.start, |e| e.0) {
            if let Some(&(_, idx)) = known.get(k)
                && !forwards
                && callees.get(idx as usize).is_some_and(|w| w.wraps.is_some())
            {
                bad.push(idx);
            }
            continue;
        }
        let Some(arg) = c.arg.filter(|_| forwards && !elf.in_plt(c.start)) else {
            continue;
        };
        let Some(name) = names.name(elf, c.start) else {
            continue;
        };
        let Some(inner) = callees.get(c.callee as usize) else {
            continue;
        };
        let zero_to = group.iter().find_map(|d| d.zero_to);
        callees.push(Callee {
            name,
            addr: c.start,
            func: inner.func,
            arg,
            wraps: Some(c.callee),
            depth: inner.depth.saturating_add(1),
            zero_to,
        });
    }
    first
}

/// Removes the callees in `bad`, every wrapper promoted through them and their sites,
/// and renumbers the rest.
pub(crate) fn drop_bad(callees: &mut Vec<Callee>, sites: &mut Vec<CallSite>, bad: &[u32]) {
    if bad.is_empty() {
        return;
    }
    let mut is_bad = vec![false; callees.len()];
    for &b in bad {
        if let Some(x) = is_bad.get_mut(b as usize) {
            *x = true;
        }
    }
    // A wrapper always wraps an earlier callee: one pass in order closes the set.
    for i in 0..callees.len() {
        let inner_bad = callees
            .get(i)
            .and_then(|c| c.wraps)
            .is_some_and(|w| is_bad.get(w as usize).copied().unwrap_or(true));
        if inner_bad && let Some(x) = is_bad.get_mut(i) {
            *x = true;
        }
    }
    let mut renumber = vec![u32::MAX; callees.len()];
    let mut next = 0u32;
    for (i, b) in is_bad.iter().enumerate() {
        if !b && let Some(r) = renumber.get_mut(i) {
            *r = next;
            next += 1;
        }
    }
    let new = |i: u32| renumber.get(i as usize).copied().unwrap_or(u32::MAX);
    sites.retain(|s| new(s.callee) != u32::MAX);
    for s in sites.iter_mut() {
        s.callee = new(s.callee);
    }
    let mut i = 0;
    callees.retain(|_| {
        i += 1;
        !is_bad.get(i - 1).copied().unwrap_or(true)
    });
    for c in callees.iter_mut() {
        c.wraps = c.wraps.map(new);
    }
}

/// Function names by address, built on first use (only files with wrappers need it).
#[derive(Default)]
pub(crate) struct SymbolNames {
    built: bool,
    /// `(address, table: 0 = .symtab / 1 = .dynsym, name offset)`
    index: Vec<(u64, u8, usize)>,
}

impl SymbolNames {
    /// The symbol name at `addr`, `fn_0x...` for an unnamed function, or `None` for a
    /// split-off `.cold` fragment, which is not a function entry.
    pub fn name(&mut self, elf: &Elf, addr: u64) -> Option<String> {
        if !self.built {
            self.build(elf);
        }
        let lo = self.index.partition_point(|e| e.0 < addr);
        let mut best: Option<&[u8]> = None;
        for &(a, t, off) in self.index.get(lo..).unwrap_or_default() {
            if a != addr {
                break;
            }
            let Some(table) = table(elf, t) else { continue };
            let n = table.name(off);
            if n.windows(5).any(|w| w == b".cold") {
                return None;
            }
            // Prefer the shortest name among aliases (`malloc` over `__libc_malloc`).
            if !n.is_empty() && best.is_none_or(|b| n.len() < b.len()) {
                best = Some(n);
            }
        }
        Some(match best {
            Some(n) => String::from_utf8_lossy(n).into_owned(),
            None => format!("fn_{addr:#x}"),
        })
    }

    fn build(&mut self, elf: &Elf) {
        self.built = true;
        for t in 0..2u8 {
            let Some(table) = table(elf, t) else { continue };
            for s in table.syms.iter() {
                if s.is_function() && s.st_value != 0 && s.st_shndx != 0 {
                    self.index.push((s.st_value, t, s.st_name));
                }
            }
        }
        self.index.sort_unstable();
    }
}

fn table<'e, 'a>(elf: &'e Elf<'a>, t: u8) -> Option<&'e SymTable<'a>> {
    if t == 0 {
        elf.symtab.as_ref()
    } else {
        elf.dynsym.as_ref()
    }
}
