//! Learning across runs: what a run observed (allocations per class, which classes its
//! threads used, how it reused its large mappings), and whether that, or the sampled
//! profile as this run left it, would change the plan enough to build it again.

use core::sync::atomic::{AtomicPtr, Ordering};

use super::profile::{self, MIN_SAMPLES_TO_MERGE};
use super::retention::{LargeObserved, next_policy};
use super::store::{read_whole_plan, write_learned};
use super::{RuntimePlan, current};
use crate::analysis::cache_dir::CacheDir;
use crate::diag::diag;
use crate::heap;
use crate::large::Retention;
use crate::options;
use crate::sample;
use crate::size_class::MAX_CLASSES;
use crate::stats::{self, LgStats};

/// A class must take at least this share of a run's allocations to count as observed.
pub(super) const LEARNED_MIN_SHARE: f32 = 0.05;
/// At most this many classes are reserved up front in every new thread heap.
pub(super) const MAX_RESERVED_CLASSES: usize = 8;

/// What earlier runs observed.
#[derive(Default, Clone)]
pub(super) struct Learned {
    /// (block size, allocations, threads that allocated from it)
    pub(super) classes: Vec<(usize, u64, u64)>,
    pub(super) total: u64,
    pub(super) threads: u64,
    /// The large-object retention policy in force and how the mappings were reused.
    pub(super) large: LargeObserved,
    /// Which `large-*` lines a stored file held (a repeated one is refused).
    pub(super) large_lines: u8,
}

/// A class is reserved in every new heap when at least this share of a multi-threaded
/// program's threads used it.
const RESERVE_MIN_COVERAGE: f32 = 0.5;

/// Programs with fewer threads gain nothing from reserving pages in new heaps.
const RESERVE_MIN_THREADS: u64 = 4;

impl Learned {
    /// Allocations per using thread of the class serving `size`, if observed.
    pub(super) fn per_thread(&self, size: usize) -> Option<f32> {
        let bs = size.next_multiple_of(16);
        let c = self.classes.iter().find(|c| c.0 == bs)?;
        Some(c.1 as f32 / c.2.max(1) as f32)
    }

    /// Block sizes that most threads used: the classes a new thread will need.
    pub(super) fn per_thread_sizes(&self) -> Vec<usize> {
        if self.threads < RESERVE_MIN_THREADS {
            return Vec::new();
        }
        let mut sizes: Vec<(usize, u64)> = self
            .classes
            .iter()
            .filter(|c| c.2 as f32 >= RESERVE_MIN_COVERAGE * self.threads as f32)
            .map(|c| (c.0, c.2))
            .collect();
        sizes.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        sizes
            .into_iter()
            .take(MAX_RESERVED_CLASSES)
            .map(|c| c.0)
            .collect()
    }
}

/// At exit: if this run's allocations per class (or which classes its threads use)
/// differ from what the plan was built on, store them and drop the stored plan, so
/// the next run plans from them.
pub(super) extern "C" fn learn_at_exit() {
    if let Some(plan) = current() {
        learn_from(plan);
    }
}

/// The stored observation and plan files of a run under an inert plan.
static INERT_FILES: AtomicPtr<(String, String)> = AtomicPtr::new(core::ptr::null_mut());

/// Registers the exit check of a run under an inert plan whose observations go to
/// `files` (observations, plan).
pub(super) fn learn_if_busy(files: (String, String)) {
    INERT_FILES.store(Box::into_raw(Box::new(files)), Ordering::Release);
    // SAFETY: registers a plain function.
    unsafe { libc::atexit(learn_if_busy_at_exit) };
}

/// At exit under an inert plan: a run that allocated enough to be merged into the
/// profile (at least `MIN_SAMPLES_TO_MERGE` samples, about 4 MiB), or whose large-object
/// reuse would set another retention policy, reads the whole stored plan and learns as
/// any run does; a small one does nothing. Its counts include what the loader
/// allocated before `main` (no plan recorded a starting point).
extern "C" fn learn_if_busy_at_exit() {
    // Large objects are not sampled: their reuse counts speak for them.
    let large = LargeObserved {
        policy: Retention::DEFAULT,
        reuse: crate::large::reuse_counters(),
    };
    let retention_changes = next_policy(&large) != Retention::DEFAULT;
    if sample::TAKEN.load(Ordering::Relaxed) < MIN_SAMPLES_TO_MERGE && !retention_changes {
        return;
    }
    // SAFETY: set once at start-up from a leaked box, never freed.
    let Some((learned, plan_name)) = (unsafe { INERT_FILES.load(Ordering::Acquire).as_ref() })
    else {
        return;
    };
    let Some(dir) = CacheDir::open() else { return };
    let Some(mut plan) = read_whole_plan(&dir, plan_name) else {
        // Start-up read only its head: a plan refused whole is dropped, so the next run
        // builds one again rather than every busy run failing here.
        dir.remove(plan_name);
        return;
    };
    plan.learned_files = Some((learned.clone(), plan_name.clone()));
    learn_from(&plan);
}

fn learn_from(plan: &RuntimePlan) {
    let Some((learned, stale_plan)) = plan.learned_files.as_ref() else {
        return;
    };
    let mut s = LgStats::default();
    stats::collect(&mut s);
    let mut using = [0u64; MAX_CLASSES];
    let threads = heap::class_coverage(&mut using);
    let mut now = Learned {
        threads,
        large: LargeObserved {
            policy: plan.retention,
            reuse: crate::large::reuse_counters(),
        },
        ..Learned::default()
    };
    let counted = s.classes.iter().zip(using.iter()).enumerate();
    for (i, (c, using)) in counted.take(s.class_count as usize) {
        // Only the program's own allocations, not the loader's or the analysis's.
        let before = plan.allocs_at_start.get(i).copied().unwrap_or(0);
        let calls = c.allocations.saturating_sub(before);
        if calls > 0 {
            now.total += calls;
            now.classes.push((c.block_size as usize, calls, *using));
        }
    }
    if changed(&plan.observed, &now) {
        if let Some(dir) = CacheDir::open() {
            write_learned(&dir, learned, stale_plan, &now);
        }
        return;
    }
    drop_plan_if_profile_chooses_otherwise(plan, stale_plan);
}

/// The observations stand, but the sampled profile this run grew may choose other
/// exact-fit sizes than the plan was built with (a program first run on small inputs,
/// then on large ones with the same mix of sizes): then the stored plan is dropped,
/// and the next run builds it from the profile as it now stands. Nothing to check when
/// this run merged nothing into the profile.
fn drop_plan_if_profile_chooses_otherwise(plan: &RuntimePlan, stored_plan: &str) {
    let Some(profile) = profile::merged_this_run() else {
        return;
    };
    if plan.profile_choice.still_made_by(profile, &plan.observed) {
        return;
    }
    if let Some(dir) = CacheDir::open() {
        if options::verbose() {
            diag!(
                "lgmalloc: plan: the sampled profile now chooses other exact-fit sizes than the plan's {:?}: the stored plan is dropped, the next run builds it anew",
                plan.profile_choice.sizes
            );
        }
        dir.remove(stored_plan);
    }
}

/// The classes that take a real share of the allocations, with their shares.
fn shares(observed: &Learned) -> Vec<(usize, f32)> {
    if observed.total == 0 {
        return Vec::new();
    }
    observed
        .classes
        .iter()
        .map(|c| (c.0, c.1 as f32 / observed.total as f32))
        .filter(|&(_, share)| share >= LEARNED_MIN_SHARE)
        .collect()
}

/// True when two runs' observations would plan differently: another set of frequent
/// classes, a share that moved by more than 0.15, other per-thread classes, or another
/// large-object retention policy.
fn changed(before: &Learned, now: &Learned) -> bool {
    let (a, b) = (shares(before), shares(now));
    if a.len() != b.len()
        || before.per_thread_sizes() != now.per_thread_sizes()
        || next_policy(&before.large) != next_policy(&now.large)
    {
        return true;
    }
    a.iter().any(|&(size, share)| {
        b.iter()
            .find(|o| o.0 == size)
            .is_none_or(|o| (o.1 - share).abs() > 0.15)
    })
}
