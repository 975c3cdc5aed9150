//! The predictive runtime: before `main`, read the running program's allocation call
//! sites (the `analysis` module, or its cache) and shape the size classes after them.
//!
//! * High-confidence predicted sizes whose standard class would waste space get
//!   exact-fit classes; the class table sends their requests there with the same single
//!   table load as any other size (so routing costs no instruction). So do sizes the
//!   stored sampled profile shows holding enough live bytes to repay the class.
//! * Predicted classes get first pages sized to their expected demand; classes most
//!   threads used in earlier runs are marked reserved in the class table, and each new
//!   thread heap takes a first page of them up front (address space only: blocks are
//!   carved, and memory touched, as the thread allocates).
//! * What a run observes (allocations per class; per call site in verify mode) is
//!   stored beside the cache entry and raises or lowers the next run's plan.
//! * How the program reused its freed large mappings (how soon, and how many the cache
//!   lost to its budget or delay) shapes the next run's large-object retention policy.
//! * `LGMALLOC_VERIFY=1` checks the prediction: every allocation's call site and size
//!   are matched against the plan, and one line sums it up at exit.
//!
//! This layer sits above the allocator: it hands its decisions down (the class table,
//! the verify hook in `heap`) and nothing below calls up into it. The analysis never
//! calls into the allocator; it returns predicted sizes that this module turns into a
//! runtime plan.
//!
//! | file | job |
//! |---|---|
//! | `start` | the `.init_array` entry: which plan, from where, put in force |
//! | `modules` | the loaded ELF files a plan covers |
//! | `build` | predicted sizes and observations -> planned classes -> class table |
//! | `learn` | what a run observed, and whether it changes the plan |
//! | `retention` | the large-object retention policy learned from the last run |
//! | `shape` | sizes the sampled profile makes worth an exact-fit class |
//! | `store` | the stored plan and observations (text files in the cache) |
//! | `deferred` | analyses that did not fit the start-up budget, run at exit |
//! | `verify` | verify mode: every allocation matched to its call site |
//! | `census` | verify mode's calls per site and class: how far per-site prediction could go |
//! | `profile` | the sampled profile: this run's call sites, the stored profile, what each site predicts |

pub(crate) mod build;
mod census;
mod deferred;
mod learn;
mod modules;
pub mod profile;
mod retention;
mod shape;
mod start;
pub(crate) mod store;
mod verify;

use core::sync::atomic::{AtomicPtr, Ordering};

use crate::diag::diag;
use crate::options::plan_use;
use crate::stats::{self, LgStats};
use learn::Learned;
use verify::Site;

/// Where each planned class's confidence came from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Source {
    /// Static analysis of the call sites.
    Static,
    /// Counts observed by earlier runs.
    Learned,
    /// Both agree.
    Both,
    /// The stored sampled profile: a size holding enough live bytes that its exact-fit
    /// class saves more than it costs.
    Profile,
}

/// One class the plan shapes.
#[derive(Clone, Copy, Debug)]
pub struct PlannedClass {
    pub size: usize,
    pub class: usize,
    pub confidence: f32,
    pub source: Source,
    /// Blocks of the first page for this class in a new thread heap.
    pub first_page_blocks: u32,
    /// True when an exact-fit class was added for `size`.
    pub exact_fit: bool,
}

/// The plan in force for this process.
#[derive(Default)]
pub struct RuntimePlan {
    pub classes: Vec<PlannedClass>,
    /// Call sites with a constant prediction (verify mode matches allocations to them).
    sites: Vec<Site>,
    /// The return addresses of the calls the modules' wrappers make to the allocator,
    /// as (index into `modules`, link-time address), ascending: samples and verify mode
    /// look past these frames to the wrapper's caller (`start::find_wrapper_frames`).
    wrapper_returns: Vec<(usize, u64)>,
    /// Cache-entry names of the modules the plan was built from (the main program first).
    modules: Vec<String>,
    pub analysis_us: u64,
    pub from_cache: bool,
    /// Where this run's observations go at exit (file names in the cache directory):
    /// the observations, and the stored plan they make stale.
    learned_files: Option<(String, String)>,
    /// Allocations per class when the plan came into force.
    allocs_at_start: Vec<u64>,
    /// The observations the plan was built from.
    observed: Learned,
    /// The exact-fit sizes the stored sampled profile chose when the plan was built.
    profile_choice: shape::ProfileChoice,
    /// Block sizes every new heap reserves a page for (learned thread coverage).
    reserved_sizes: Vec<usize>,
    /// The plan predicts no saving: nothing is put in force (`build::predicts_saving`).
    inert: bool,
    /// The large-object retention policy learned from the observations (in force unless
    /// `LGMALLOC_PLAN` leaves `large-retention` out; the default without a plan).
    retention: crate::large::Retention,
}

/// Wrapper return addresses a plan keeps at most.
const MAX_WRAPPER_RETURNS: usize = 1024;

static PLAN: AtomicPtr<RuntimePlan> = AtomicPtr::new(core::ptr::null_mut());

/// The plan in force, if any.
fn current() -> Option<&'static RuntimePlan> {
    let p = PLAN.load(Ordering::Acquire);
    // SAFETY: a published plan is leaked and never freed.
    unsafe { p.as_ref() }
}

/// Puts `plan` in force for the rest of the process.
fn publish(mut plan: RuntimePlan) {
    if crate::options::verbose() {
        describe(&plan);
    }
    let mut s = LgStats::default();
    stats::collect(&mut s);
    plan.allocs_at_start = s.classes.iter().map(|c| c.allocations).collect();
    PLAN.store(Box::into_raw(Box::new(plan)), Ordering::Release);
}

/// `LGMALLOC_VERBOSE`: the plan in force, one line per class.
fn describe(plan: &RuntimePlan) {
    diag!(
        "lgmalloc: plan: {} classes, {} constant sites, analysis {} us{}",
        plan.classes.len(),
        plan.sites.len(),
        plan.analysis_us,
        if plan.from_cache { " (cached)" } else { "" }
    );
    let (bits, invalid) = crate::options::plan_mechanisms();
    if invalid {
        diag!(
            "lgmalloc: LGMALLOC_PLAN not understood (exact-fit, first-pages, reserve, large-retention, all, none): every mechanism is used"
        );
    }
    if bits != plan_use::ALL {
        let on = |bit: u8, name: &'static str| if bits & bit != 0 { name } else { "" };
        diag!(
            "lgmalloc: plan: mechanisms in force (LGMALLOC_PLAN):{}{}{}{}",
            on(plan_use::EXACT_FIT, " exact-fit"),
            on(plan_use::FIRST_PAGES, " first-pages"),
            on(plan_use::RESERVE, " reserve"),
            on(plan_use::LARGE_RETENTION, " large-retention")
        );
    }
    if bits & plan_use::LARGE_RETENTION != 0 {
        let (r, seen) = (plan.retention, plan.observed.large.reuse);
        diag!(
            "lgmalloc: plan: large retention: delay {} ms, floor {} KiB, live share 1/{} (last run: {} cached, {} reused, {} gathered, {} missed, {} would have been kept by a longer delay, {} by a larger budget)",
            r.delay_ms,
            r.floor >> 10,
            1u64 << r.live_shift,
            seen.puts,
            seen.hits,
            seen.gathered,
            seen.misses,
            seen.ghost_expired,
            seen.ghost_evicted
        );
    }
    for c in &plan.classes {
        diag!(
            "lgmalloc: plan: size {:>6} class {:>3} confidence {:.2} from {:?}{} first page {} blocks",
            c.size,
            c.class,
            c.confidence,
            c.source,
            if c.exact_fit { " exact-fit" } else { "" },
            c.first_page_blocks
        );
    }
}

fn now_us() -> u64 {
    clock_us(libc::CLOCK_MONOTONIC)
}

/// CPU time of the calling thread.
fn thread_cpu_us() -> u64 {
    clock_us(libc::CLOCK_THREAD_CPUTIME_ID)
}

fn clock_us(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes into `ts`.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}
