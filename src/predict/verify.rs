//! Verify mode (`LGMALLOC_VERIFY=1`): every allocation reaches the slow path, where
//! its call site is found by unwinding and matched against the sites in the plan: the
//! static analysis's constant sites and the sites the stored profile learned (one
//! constant size, or one standard class holding most of their calls; see
//! `ProfileSite::prediction`). One line at exit sums it up: `predicted` counts calls
//! from those sites, `exact` the ones whose size fell in the class predicted for them,
//! and `site-bound` the most calls any prediction per site could cover (`census`).

use core::ffi::{c_int, c_void};
use core::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};

use super::modules::executable_path;
use super::modules::{code_range, for_each_module};
use super::profile::{self, SitePrediction};
use super::{census, current};
use crate::analysis::symbols::{Symbols, is_allocator_frame};
use crate::diag::diag;
use crate::sample::{_Unwind_Backtrace, _Unwind_GetIP};
use crate::{heap, options, size_class};

/// Call sites the stored profile learned a prediction for, by return address; set once
/// at start, before verify mode counts anything.
static LEARNED_SITES: AtomicPtr<Vec<Site>> = AtomicPtr::new(core::ptr::null_mut());

/// Reads the stored profile's predicted sites of the loaded modules.
fn load_learned_sites() {
    let Some(p) = executable_path().and_then(|exe| profile::read(&exe)) else {
        return;
    };
    let mut bases: Vec<(String, usize)> = Vec::new();
    let exe = executable_path().unwrap_or_default();
    for_each_module(|base, _, name| {
        let path = if bases.is_empty() {
            exe.to_string_lossy().into_owned()
        } else {
            name.to_string()
        };
        bases.push((path, base));
    });
    let mut sites: Vec<Site> = p
        .sites
        .iter()
        .filter_map(|s| {
            let prediction = s.prediction()?;
            let path = p.modules.get(s.module)?;
            let base = bases.iter().find(|b| &b.0 == path)?.1;
            let ret = base + s.offset as usize;
            Some(match prediction {
                SitePrediction::Constant(size) => Site::new(ret, size),
                SitePrediction::Modal(size) => Site::modal(ret, size),
            })
        })
        .collect();
    sites.sort_by_key(|s| s.ret);
    LEARNED_SITES.store(Box::into_raw(Box::new(sites)), Ordering::Release);
}

fn learned_site(ret: usize) -> Option<&'static Site> {
    // SAFETY: a stored list is leaked and never freed.
    let sites = unsafe { LEARNED_SITES.load(Ordering::Acquire).as_ref() }?;
    let i = sites.binary_search_by_key(&ret, |s| s.ret).ok()?;
    sites.get(i)
}

/// A call site with a prediction, keyed by its return address at run time.
pub(super) struct Site {
    pub(super) ret: usize,
    size: u64,
    /// `size` is a standard block size, the class most of the site's calls fell in
    /// (learned): a call is exact when its standard class is that one, whatever
    /// exact-fit classes the plan added.
    modal: bool,
    calls: AtomicU64,
    exact: AtomicU64,
}

impl Site {
    /// A site predicted to ask for `size` bytes.
    pub(super) fn new(ret: usize, size: u64) -> Site {
        Site {
            ret,
            size,
            modal: false,
            calls: AtomicU64::new(0),
            exact: AtomicU64::new(0),
        }
    }

    /// A site predicted to ask for sizes of the standard class of block size `block`.
    fn modal(ret: usize, block: u64) -> Site {
        Site {
            modal: true,
            ..Site::new(ret, block)
        }
    }

    /// Whether a call of `size` bytes fell in the class predicted for the site.
    fn is_exact(&self, size: usize) -> bool {
        if self.modal {
            size as u64 <= size_class::MAX_SMALL_SIZE as u64
                && size_class::standard_block_size(size) as u64 == self.size
        } else {
            size_class::size_class_of(size) == size_class::size_class_of(self.size as usize)
        }
    }
}

/// Turns verify mode on: allocations are matched from now on, totals printed at exit.
pub(super) fn start() {
    find_own_code();
    load_learned_sites();
    heap::set_verify_hook(record_call);
    // SAFETY: registers a plain function.
    unsafe { libc::atexit(report_at_exit) };
}

/// Verify-mode totals.
static VERIFY_CALLS: AtomicU64 = AtomicU64::new(0);
static VERIFY_PREDICTED: AtomicU64 = AtomicU64::new(0);
static VERIFY_EXACT: AtomicU64 = AtomicU64::new(0);

/// Start and end of the code of the module lgmalloc lives in (verify mode skips frames
/// inside it to find the program's call site).
static OWN_CODE: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];

/// Verify mode: matches one allocation of `size` bytes to its call site.
fn record_call(size: usize) {
    // Allocations before the plan is in force (the loader's, the analysis's own) are
    // not the program's: they are not counted.
    // With prediction off, the learned sites alone are matched (no analysis runs).
    let plan = current();
    if plan.is_none() && LEARNED_SITES.load(Ordering::Acquire).is_null() {
        return;
    }
    VERIFY_CALLS.fetch_add(1, Ordering::Relaxed);
    let ret = caller_return_address(crate::sample::wrapper_returns());
    census::record(ret, size);
    let sites = plan.map_or(&[][..], |p| &p.sites[..]);
    let site = match sites.binary_search_by_key(&ret, |s| s.ret) {
        Ok(i) => sites.get(i),
        Err(_) => learned_site(ret),
    };
    let Some(site) = site else { return };
    site.calls.fetch_add(1, Ordering::Relaxed);
    VERIFY_PREDICTED.fetch_add(1, Ordering::Relaxed);
    if site.is_exact(size) {
        site.exact.fetch_add(1, Ordering::Relaxed);
        VERIFY_EXACT.fetch_add(1, Ordering::Relaxed);
    }
}

const URC_NO_REASON: c_int = 0;

const URC_END_OF_STACK: c_int = 5;

/// What the unwinder's callback reads and writes.
struct Walk<'w> {
    /// Return addresses of wrappers' calls (frames to look past), ascending.
    wrapper_returns: &'w [usize],
    found: usize,
}

/// The return address of the first frame outside lgmalloc's own code and outside the
/// wrappers the analysis found (`wrapper_returns`), where sites calling a wrapper are
/// predicted.
fn caller_return_address(wrapper_returns: &[usize]) -> usize {
    extern "C" fn visit(ctx: *mut c_void, arg: *mut c_void) -> c_int {
        // SAFETY: the unwinder passes a valid context; `arg` is our `Walk`.
        let (ip, walk) = unsafe { (_Unwind_GetIP(ctx), &mut *arg.cast::<Walk>()) };
        let (lo, hi) = (
            OWN_CODE[0].load(Ordering::Relaxed),
            OWN_CODE[1].load(Ordering::Relaxed),
        );
        if ip == 0 || (ip >= lo && ip < hi && !linked_in_caller(ip)) {
            return URC_NO_REASON;
        }
        walk.found = ip;
        if walk.wrapper_returns.binary_search(&ip).is_ok() {
            return URC_NO_REASON;
        }
        URC_END_OF_STACK
    }
    let mut walk = Walk {
        wrapper_returns,
        found: 0,
    };
    if !crate::sample::unwinding_allowed() {
        return 0;
    }
    // SAFETY: the callback matches the unwinder's signature and only writes `walk`.
    unsafe { _Unwind_Backtrace(visit, (&raw mut walk).cast()) };
    walk.found
}

/// Records the code range of the module holding lgmalloc (verify mode), and when that
/// is the main program (lgmalloc linked in), its symbols, to tell its frames apart.
fn find_own_code() {
    if let Some((lo, hi, main)) = own_module() {
        OWN_CODE[0].store(lo, Ordering::Relaxed);
        OWN_CODE[1].store(hi, Ordering::Relaxed);
        if main {
            let mut base = 0;
            for_each_module(|b, _, _| {
                if base == 0 {
                    base = b;
                }
            });
            let syms = executable_path().and_then(|exe| Symbols::read(&exe));
            if let Some(syms) = syms {
                MAIN_BASE.store(base, Ordering::Relaxed);
                MAIN_SYMBOLS.store(Box::into_raw(Box::new(syms)), Ordering::Release);
            }
        }
    }
}

/// The main program's symbols and load bias, when lgmalloc is linked into it.
static MAIN_SYMBOLS: AtomicPtr<Symbols> = AtomicPtr::new(core::ptr::null_mut());
static MAIN_BASE: AtomicUsize = AtomicUsize::new(0);

/// True when `ip`, in the main program that lgmalloc is linked into, lies in a
/// function that is not the allocator's (so it is the call site).
fn linked_in_caller(ip: usize) -> bool {
    // SAFETY: stored symbols are leaked and never freed.
    let Some(syms) = (unsafe { MAIN_SYMBOLS.load(Ordering::Acquire).as_ref() }) else {
        return false;
    };
    let offset = ip.wrapping_sub(MAIN_BASE.load(Ordering::Relaxed)) as u64;
    syms.caller_of(offset)
        .is_some_and(|(name, _)| !is_allocator_frame(name))
}

/// The code range of the module holding lgmalloc, and whether it is the main program.
pub(super) fn own_module() -> Option<(usize, usize, bool)> {
    let me = own_module as *const () as usize;
    let mut found = None;
    let mut first = true;
    for_each_module(|base, phdrs, _| {
        let (lo, hi, _) = code_range(base, phdrs);
        if me >= lo && me < hi {
            found = Some((lo, hi, first));
        }
        first = false;
    });
    found
}

extern "C" fn report_at_exit() {
    // First: the bound allocates, and that allocation is counted too.
    let bound = census::site_bound();
    diag!(
        "lgmalloc: verify calls={} predicted={} exact={} site-bound={bound}",
        VERIFY_CALLS.load(Ordering::Relaxed),
        VERIFY_PREDICTED.load(Ordering::Relaxed),
        VERIFY_EXACT.load(Ordering::Relaxed),
    );
    if !options::verbose() {
        return;
    }
    let Some(plan) = current() else { return };
    for s in plan
        .sites
        .iter()
        .filter(|s| s.calls.load(Ordering::Relaxed) > 0)
    {
        diag!(
            "lgmalloc: verify site ret={:#x} size={} calls={} exact={}",
            s.ret,
            s.size,
            s.calls.load(Ordering::Relaxed),
            s.exact.load(Ordering::Relaxed)
        );
    }
}
