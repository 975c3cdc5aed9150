//! Static analysis of allocation call sites in an x86-64 ELF executable.
//!
//! [`analyze_path`] (or [`analyze_elf`] on the file's bytes) finds every `call`/`jmp` to
//! an allocation function and, where the instructions before it prove it, the number of
//! bytes requested there. The predictive runtime turns the result into the size classes
//! it prepares per thread ([`Analysis::predicted_sizes`]).
//!
//! # What is found
//! - Allocators by symbol (`.symtab`, `.dynsym`, aliases such as `__libc_malloc`): the
//!   malloc family, every C++ `operator new`, Rust's `__rust_alloc*` shims (mangled
//!   names matched by their suffix) and lgmalloc's own `lg_*` API; PLT stubs (`.plt`,
//!   `.plt.sec`, `.plt.got`) and pointer slots (`JUMP_SLOT`, `GLOB_DAT`, `R_X86_64_64`,
//!   `RELATIVE`, `RELR`, raw pointers in non-PIE data) that lead to them.
//! - Sites: `call`/`jmp rel32` and `call`/`jmp [rip+X]`; a `jmp` is a tail call. Only
//!   the functions containing a candidate (a byte scan finds them) are decoded, with
//!   bounds from `.eh_frame_hdr`, else symbols, else a window (then no size is trusted).
//! - Wrappers: functions passing their own size argument unchanged to an allocator
//!   (`xmalloc`, `PyMem_Malloc`, `__rdl_alloc`...), promoted to allocators until a fixed
//!   point; calls to them are sites with `via_wrapper`.
//!
//! # Confidence of a site's size
//! `size` is `Some` only when every path into the call gives the same value, derived
//! from immediates by copies and integer arithmetic (see `dataflow`). Sites without a
//! size have confidence 0. For a size:
//!
//! | how the constant reaches the call | confidence |
//! |---|---|
//! | literal on a straight-line path (`mov edi, 72; call malloc`) | 0.95 |
//! | through arithmetic (`lea`, `shl`, `imul`, `add`...), or held in a callee-saved register across a call | 0.90 |
//! | proven equal on several paths into a join | 0.85 |
//! | to a wrapper: times 0.9 per wrapper level (max 3) | e.g. 0.855 |
//! | the wrapper replaces some sizes (`if (n == 0) n = 1`): times 0.95 | |
//!
//! The scale ranks how much the proof relied on (paths merged, wrapper semantics); it is
//! not a measured probability. Unknown predecessors (landing pads, jump-table targets,
//! computed-goto labels, jumps back from `.cold` fragments) are never merged across: see `cfg`.
//!
//! # Limits
//! - The bytes must be the file's contents (mapped or copied), not a loaded image.
//! - A wrapper compiled without optimisation spills its argument to the stack and is
//!   not recognised; conditional tail calls (`jcc` to an allocator) are not sites.
//!
//! # Predicted sizes
//! [`PredictedSize`]: per predicted size, the number of sites and `1 - prod(1 - c_i)` over
//! its sites (the chance that at least one prediction holds), capped at 0.99.
//!
//! # Robustness
//! Every read of the input is bounds-checked: malformed files give an
//! [`AnalysisError`], never a panic.

mod addr_map;
mod alloc_fn;
mod bounds;
mod budget;
mod cache;
pub mod cache_dir;
mod cfg;
mod confidence;
mod dataflow;
mod dwarf;
mod elf;
mod error;
mod lsda;
mod mmap;
mod pipeline;
mod scan;
pub mod symbols;
mod targets;
mod wrappers;

use std::path::{Path, PathBuf};
use std::time::Duration;

use budget::Budget;

pub use alloc_fn::{AllocFn, ArgReg, SizeArg};
pub use error::AnalysisError;

/// A function that allocates: an allocator found by name, or a wrapper of one.
#[derive(Clone, Debug, PartialEq)]
pub struct Callee {
    /// Symbol name (`malloc`, `xmalloc`), or `fn_0x...` for an unnamed wrapper.
    pub name: String,
    /// Entry address (function or PLT stub); 0 when only reached through a pointer slot.
    pub addr: u64,
    /// The allocation function ultimately called.
    pub func: AllocFn,
    /// Where this callee receives the size.
    pub arg: SizeArg,
    /// For a wrapper: index (in [`Analysis::callees`]) of the callee it forwards to.
    pub wraps: Option<u32>,
    /// 0 for an allocator, 1 for a wrapper of one, ...
    pub depth: u8,
    /// The wrapper replaces a zero size by this value (`if (n == 0) n = 1`).
    pub zero_to: Option<u8>,
}

/// One `call`/`jmp` to a [`Callee`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CallSite {
    /// Link-time virtual address of the instruction (add the load bias for PIE).
    pub site: u64,
    /// Instruction length: the return address is `site + len`.
    pub len: u8,
    /// A `jmp` (tail call): the return address is the caller's.
    pub tail: bool,
    /// Index into [`Analysis::callees`].
    pub callee: u32,
    /// Total bytes requested (calloc: count * size), when proven.
    pub size: Option<u64>,
    /// In [0, 1]; 0 without a size. See the module docs.
    pub confidence: f32,
    /// The callee is a wrapper, not an allocator.
    pub via_wrapper: bool,
    /// The site lies in a wrapper: its return address is the wrapper's frame, not the
    /// program's call site, and a sampled stack looks past it (see
    /// [`Analysis::wrapper_returns`]).
    pub in_wrapper: bool,
}

/// One predicted size and how strongly it is predicted.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PredictedSize {
    pub size: u64,
    pub sites: u32,
    /// `1 - prod(1 - c_i)` over the sites, capped at 0.99.
    pub confidence: f32,
}

/// The result for one file.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Analysis {
    /// GNU build-id note, when present.
    pub build_id: Option<Vec<u8>>,
    /// Bytes of code (scanned ranges and PLT).
    pub text_bytes: u64,
    /// Position-independent (`ET_DYN`): addresses need the load bias.
    pub pie: bool,
    /// Allocators and wrappers; sites refer to them by index.
    pub callees: Vec<Callee>,
    /// All sites, by address.
    pub call_sites: Vec<CallSite>,
    /// Predicted sizes, ascending.
    pub size_classes: Vec<PredictedSize>,
    /// Loaded from the cache rather than computed.
    pub from_cache: bool,
}

impl Analysis {
    /// The predicted sizes, with their site counts and confidence.
    pub fn predicted_sizes(&self) -> &[PredictedSize] {
        &self.size_classes
    }

    /// The callee a site calls.
    pub fn callee(&self, site: &CallSite) -> Option<&Callee> {
        self.callees.get(site.callee as usize)
    }

    /// The wrappers found (callees that forward to another one).
    pub fn wrappers(&self) -> impl Iterator<Item = &Callee> {
        self.callees.iter().filter(|c| c.wraps.is_some())
    }

    /// Return addresses (link-time) of the calls wrappers make to what they wrap,
    /// ascending: a stack frame at one of them is a wrapper's, and the program's call
    /// site is the next frame out. A wrapper that tail-jumps leaves no frame.
    pub fn wrapper_returns(&self) -> Vec<u64> {
        self.call_sites
            .iter()
            .filter(|s| s.in_wrapper && !s.tail)
            .map(|s| s.site + u64::from(s.len))
            .collect()
    }
}

/// The predicted sizes of several files (a program and its shared objects) as one: a
/// size predicted in more than one file combines its confidences as call sites do.
pub fn merge_predicted_sizes(sizes: impl IntoIterator<Item = PredictedSize>) -> Vec<PredictedSize> {
    confidence::merge(sizes.into_iter().collect())
}

/// Analyses the contents of an ELF file (a mapped file or a copy of its bytes).
pub fn analyze_elf(bytes: &[u8]) -> Result<Analysis, AnalysisError> {
    analyze_with(bytes, &mut Budget::unlimited())
}

/// [`analyze_elf`] within `budget` of the calling thread's CPU time: past it the
/// analysis stops with [`AnalysisError::BudgetExceeded`]. The clock is read every few
/// dozen functions, so the analysis may overrun by a fraction of a millisecond.
pub fn analyze_elf_within(bytes: &[u8], budget: Duration) -> Result<Analysis, AnalysisError> {
    analyze_with(bytes, &mut Budget::new(budget))
}

fn analyze_with(bytes: &[u8], budget: &mut Budget) -> Result<Analysis, AnalysisError> {
    let elf = elf::Elf::parse(bytes)?;
    let (callees, call_sites) = pipeline::run(&elf, budget)?;
    let size_classes = confidence::predicted_sizes(&call_sites);
    Ok(Analysis {
        build_id: elf.build_id.map(<[u8]>::to_vec),
        text_bytes: elf.text_bytes(),
        pie: elf.pie,
        callees,
        call_sites,
        size_classes,
        from_cache: false,
    })
}

/// Maps the file at `path` read-only and analyses it. With `use_cache`, a result stored
/// for the same build-id (or inode, size and mtime) is returned instead, and a fresh
/// result is stored; see the `cache` module for the location (`LGMALLOC_CACHE_DIR`).
pub fn analyze_path(path: &Path, use_cache: bool) -> Result<Analysis, AnalysisError> {
    analyze_path_with(path, use_cache, &mut Budget::unlimited())
}

/// [`analyze_path`] within `budget` of the calling thread's CPU time (mapping the file
/// and reading the cache included). A cached result is returned whatever the budget; an
/// analysis that runs out returns [`AnalysisError::BudgetExceeded`] and stores nothing.
pub fn analyze_path_within(
    path: &Path,
    use_cache: bool,
    budget: Duration,
) -> Result<Analysis, AnalysisError> {
    analyze_path_with(path, use_cache, &mut Budget::new(budget))
}

fn analyze_path_with(
    path: &Path,
    use_cache: bool,
    budget: &mut Budget,
) -> Result<Analysis, AnalysisError> {
    let map = mmap::Mapping::open(path)?;
    let bytes = map.bytes();
    let key = if use_cache {
        cache::key(bytes, &map.id)
    } else {
        None
    };
    if let Some(k) = &key
        && let Some(hit) = cache::load(k)
    {
        return Ok(hit);
    }
    let analysis = analyze_with(bytes, budget)?;
    if let Some(k) = &key {
        cache::store(k, &analysis);
    }
    Ok(analysis)
}

/// The cache entry [`analyze_path`] reads and writes for the file at `path` (present or
/// not); `None` without a cache directory or for an unreadable or non-ELF file. Callers
/// may keep their own data beside it (same name, another extension).
pub fn cache_entry(path: &Path) -> Option<PathBuf> {
    let map = mmap::Mapping::open(path).ok()?;
    cache::key(map.bytes(), &map.id)
}
