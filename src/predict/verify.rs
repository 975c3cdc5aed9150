//! Verify mode (`LGMALLOC_VERIFY=1`): every allocation reaches the slow path, where
//! its call site is found by unwinding and matched against the plan's constant sites;
//! one line at exit sums it up.

use core::ffi::{c_int, c_void};
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use super::current;
use super::modules::{code_range, for_each_module};
use crate::diag::diag;
use crate::{heap, options};

/// A call site with a constant prediction, keyed by its return address at run time.
pub(super) struct Site {
    pub(super) ret: usize,
    size: u64,
    calls: AtomicU64,
    exact: AtomicU64,
}

impl Site {
    pub(super) fn new(ret: usize, size: u64) -> Site {
        Site {
            ret,
            size,
            calls: AtomicU64::new(0),
            exact: AtomicU64::new(0),
        }
    }
}

/// Turns verify mode on: allocations are matched from now on, totals printed at exit.
pub(super) fn start() {
    find_own_code();
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
    let Some(plan) = current() else { return };
    VERIFY_CALLS.fetch_add(1, Ordering::Relaxed);
    let ret = caller_return_address();
    let Ok(i) = plan.sites.binary_search_by_key(&ret, |s| s.ret) else {
        return;
    };
    let site = &plan.sites[i];
    site.calls.fetch_add(1, Ordering::Relaxed);
    VERIFY_PREDICTED.fetch_add(1, Ordering::Relaxed);
    if site.size == size as u64 {
        site.exact.fetch_add(1, Ordering::Relaxed);
        VERIFY_EXACT.fetch_add(1, Ordering::Relaxed);
    }
}

unsafe extern "C" {
    fn _Unwind_Backtrace(
        trace: extern "C" fn(ctx: *mut c_void, arg: *mut c_void) -> c_int,
        arg: *mut c_void,
    ) -> c_int;
    fn _Unwind_GetIP(ctx: *mut c_void) -> usize;
}

const URC_NO_REASON: c_int = 0;

const URC_END_OF_STACK: c_int = 5;

/// The return address of the first frame outside lgmalloc's own code.
fn caller_return_address() -> usize {
    extern "C" fn visit(ctx: *mut c_void, arg: *mut c_void) -> c_int {
        // SAFETY: the unwinder passes a valid context; `arg` is our `usize`.
        let ip = unsafe { _Unwind_GetIP(ctx) };
        let (lo, hi) = (
            OWN_CODE[0].load(Ordering::Relaxed),
            OWN_CODE[1].load(Ordering::Relaxed),
        );
        if ip == 0 || (ip >= lo && ip < hi) {
            return URC_NO_REASON;
        }
        // SAFETY: `arg` points at the caller's `usize`.
        unsafe { *arg.cast::<usize>() = ip };
        URC_END_OF_STACK
    }
    let mut found = 0usize;
    // SAFETY: the callback matches the unwinder's signature and only writes `found`.
    unsafe { _Unwind_Backtrace(visit, (&raw mut found).cast()) };
    found
}

/// Records the code range of the module holding lgmalloc (verify mode).
fn find_own_code() {
    if let Some((lo, hi, _)) = own_module() {
        OWN_CODE[0].store(lo, Ordering::Relaxed);
        OWN_CODE[1].store(hi, Ordering::Relaxed);
    }
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
    diag!(
        "lgmalloc: verify calls={} predicted={} exact={}",
        VERIFY_CALLS.load(Ordering::Relaxed),
        VERIFY_PREDICTED.load(Ordering::Relaxed),
        VERIFY_EXACT.load(Ordering::Relaxed)
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
