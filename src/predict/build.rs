//! Building the plan: predicted sizes from the analyses, adjusted by what earlier runs
//! observed, become planned classes; `apply` writes them into the class table.

use super::learn::{LEARNED_MIN_SHARE, Learned, MAX_RESERVED_CLASSES};
use super::modules::Module;
use super::profile::{Profile, SETTLED_RUNS};
use super::shape::{self, PROFILE_WASTE_SHIFT, ProfileChoice};
use super::verify::Site;
use super::{MAX_WRAPPER_RETURNS, PlannedClass, RuntimePlan, Source};
use crate::analysis::{self, Analysis};
use crate::large::Retention;
use crate::options::{self, plan_use};
use crate::os::OS_PAGE_SIZE;
use crate::size_class::{self, MAX_CLASSES, STANDARD_CLASSES, TABLE_MAX_SIZE};

/// Confidence at or above which a predicted size shapes the heap.
const HIGH_CONFIDENCE: f32 = 0.5;
/// Exact-fit classes are added where the standard class wastes more than 1/16 (a
/// profile-chosen class: 1/32, see `shape`).
const WASTE_SHIFT: usize = 4;

/// Builds the plan: static predictions, adjusted by what earlier runs observed, and
/// exact-fit classes for the sizes the stored sampled profile shows worth one.
pub(super) fn build(
    analysed: &[(Analysis, &Module)],
    learned: Learned,
    profile: Option<&Profile>,
) -> RuntimePlan {
    let learned = &learned;
    let mut classes: Vec<PlannedClass> = Vec::new();
    let sizes = analysis::merge_predicted_sizes(
        analysed
            .iter()
            .flat_map(|(a, _)| a.predicted_sizes().iter().copied()),
    );
    for p in sizes {
        let size = p.size as usize;
        if size == 0 || size > TABLE_MAX_SIZE {
            continue;
        }
        let (confidence, source) = adjust(
            p.confidence,
            learned_share(learned, size),
            learned.total > 0,
        );
        if confidence >= HIGH_CONFIDENCE {
            classes.push(planned(size, confidence, source, learned.per_thread(size)));
        }
    }
    // Sizes observed often that static analysis missed (wrappers, computed sizes).
    for &(size, calls, _) in &learned.classes {
        let covered = classes.iter().any(|c| c.size.next_multiple_of(16) == size);
        if covered || learned.total == 0 || size > TABLE_MAX_SIZE {
            continue;
        }
        let share = calls as f32 / learned.total as f32;
        if share >= LEARNED_MIN_SHARE {
            let confidence = (0.5 + 2.0 * share).min(0.95);
            classes.push(planned(
                size,
                confidence,
                Source::Learned,
                learned.per_thread(size),
            ));
        }
    }
    classes.sort_by(|x, y| y.confidence.total_cmp(&x.confidence));
    let profile_choice = add_profile_classes(&mut classes, profile, learned);
    let mut sites: Vec<Site> = analysed
        .iter()
        .flat_map(|(a, m)| constant_sites(a, m.bias))
        .collect();
    sites.sort_by_key(|s| s.ret);
    sites.dedup_by_key(|s| s.ret);
    let mut wrapper_returns: Vec<(usize, u64)> = analysed
        .iter()
        .enumerate()
        .flat_map(|(i, (a, _))| a.wrapper_returns().into_iter().map(move |ret| (i, ret)))
        .collect();
    // Strictly ascending, as a stored plan must be (a cached analysis may repeat a site).
    wrapper_returns.sort_unstable();
    wrapper_returns.dedup();
    wrapper_returns.truncate(MAX_WRAPPER_RETURNS);
    let reserved_sizes = learned.per_thread_sizes();
    let retains = super::retention::next_policy(&learned.large) != Retention::DEFAULT;
    let inert = !retains && !predicts_saving(&classes, &reserved_sizes, profile, learned);
    RuntimePlan {
        classes,
        sites,
        wrapper_returns,
        inert,
        reserved_sizes,
        modules: analysed.iter().map(|(_, m)| m.entry_name()).collect(),
        from_cache: analysed.iter().all(|(a, _)| a.from_cache),
        observed: learned.clone(),
        profile_choice,
        ..RuntimePlan::default()
    }
}

/// Adds the sizes `profile` makes worth an exact-fit class (`shape`), after the others:
/// a size some planned class already covers becomes that class's exact fit (its source
/// becomes the profile), unless its own rule gives it one anyway. They take only the
/// exact-fit room the other classes leave in the class table. Returns what the profile
/// chose (nothing without one), which the plan keeps to tell when it goes stale.
fn add_profile_classes(
    classes: &mut Vec<PlannedClass>,
    profile: Option<&Profile>,
    learned: &Learned,
) -> ProfileChoice {
    let taken = classes
        .iter()
        .filter(|c| exact_fit_wanted(c.size, c.source))
        .count();
    let room = (MAX_CLASSES - STANDARD_CLASSES).saturating_sub(taken);
    let shaped = profile.map_or_else(Vec::new, |p| shape::exact_sizes(p, learned, room));
    for s in &shaped {
        let count = classes.len();
        let covering = classes
            .iter_mut()
            .find(|c| c.size.next_multiple_of(16) == s.size);
        match covering {
            Some(c) if exact_fit_wanted(c.size, c.source) => {}
            Some(c) => c.source = Source::Profile,
            // A stored plan holds at most MAX_CLASSES classes.
            None if count < MAX_CLASSES => {
                // More samples, surer that the size recurs: 1 sample 0.5, 9 samples 0.9.
                let confidence = (1.0 - 1.0 / (1.0 + s.samples as f32)).min(0.99);
                classes.push(planned(
                    s.size,
                    confidence,
                    Source::Profile,
                    learned.per_thread(s.size),
                ));
            }
            None => {}
        }
    }
    ProfileChoice::new(room, &shaped)
}

/// Whether putting a plan's classes in force would change anything that saves (its
/// large-object retention is checked apart, by `build`): an exact-fit
/// class (for a class not chosen by the profile, one the profile, once settled, shows
/// paying for its partly used page: a profile of a run or two has too few samples to
/// overrule a prediction, whether its site was sampled is chance), a first page larger than its class's
/// default, or a class reserved in new heaps. A plan that does none of these (a
/// program whose sizes all fit their standard classes, or that holds too few bytes of
/// the others, run by one thread) is stored inert, and later runs put nothing in
/// force: they read the stored plan up to its `inert` line and stop. Decided with
/// every mechanism on, whatever `LGMALLOC_PLAN` says in this run, so an ablation run
/// does not store its own choice.
fn predicts_saving(
    classes: &[PlannedClass],
    reserved_sizes: &[usize],
    profile: Option<&Profile>,
    learned: &Learned,
) -> bool {
    let exact_fit_pays = |c: &PlannedClass| {
        exact_fit_wanted(c.size, c.source)
            && (c.source == Source::Profile
                || profile.is_none_or(|p| {
                    p.runs < SETTLED_RUNS
                        || shape::pays_off(p, learned, c.size.next_multiple_of(16))
                }))
    };
    !reserved_sizes.is_empty()
        || classes.iter().any(|c| {
            let standard = size_class::size_class_of(c.size);
            exact_fit_pays(c)
                || c.first_page_blocks > size_class::class_info(standard).first_page_blocks
        })
}

/// Whether a planned size's standard class wastes enough for an exact-fit class: more
/// than 1/16 of a block, or 1/32 for a size the profile chose.
pub(crate) fn exact_fit_wanted(size: usize, source: Source) -> bool {
    let standard = size_class::standard_block_size(size);
    let shift = if source == Source::Profile {
        PROFILE_WASTE_SHIFT
    } else {
        WASTE_SHIFT
    };
    (standard - size.next_multiple_of(16)) << shift > standard
}

/// Sites with a constant prediction, keyed by their run-time return address.
fn constant_sites(a: &Analysis, bias: usize) -> impl Iterator<Item = Site> + '_ {
    let bias = if a.pie { bias as u64 } else { 0 };
    a.call_sites
        .iter()
        .filter(|s| !s.tail)
        .filter_map(move |s| Some(Site::new((bias + s.site + s.len as u64) as usize, s.size?)))
}

/// Combines a static confidence with what earlier runs saw: a class they used often is
/// confirmed (its doubt halves), one they never used is weakened (halved), and without
/// observations the static value stands.
fn adjust(static_confidence: f32, share: Option<f32>, observed_anything: bool) -> (f32, Source) {
    match share {
        Some(s) if s >= LEARNED_MIN_SHARE => (1.0 - (1.0 - static_confidence) * 0.5, Source::Both),
        Some(_) => (static_confidence, Source::Both),
        None if observed_anything => (static_confidence * 0.5, Source::Learned),
        None => (static_confidence, Source::Static),
    }
}

fn learned_share(learned: &Learned, size: usize) -> Option<f32> {
    if learned.total == 0 {
        return None;
    }
    let bs = size.next_multiple_of(16);
    learned
        .classes
        .iter()
        .find(|c| c.0 == bs)
        .map(|c| c.1 as f32 / learned.total as f32)
}

/// A planned class. Its first page is the one a standard class of its block size
/// starts with (`size_class::default_first_page_blocks`: about one slice, the least a
/// thread can touch), unless earlier runs showed each thread allocating many blocks of
/// it: then up to one OS page, so heavy users skip the early growth steps. (A larger
/// first page for a thread that holds a few blocks would spread every thread's blocks
/// over more OS pages and cost resident memory.)
fn planned(size: usize, confidence: f32, source: Source, per_thread: Option<f32>) -> PlannedClass {
    let bs = size.next_multiple_of(16).max(16);
    let default = size_class::default_first_page_blocks(bs) as usize;
    let first_page_blocks = match per_thread {
        Some(n) if n >= HEAVY_PER_THREAD => (OS_PAGE_SIZE / bs).max(default),
        _ => default,
    };
    PlannedClass {
        size,
        class: size_class::size_class_of(size),
        confidence,
        source,
        first_page_blocks: first_page_blocks as u32,
        exact_fit: false,
    }
}

/// Allocations per thread and run from which a class counts as heavily used.
const HEAVY_PER_THREAD: f32 = 256.0;

/// Hands the plan to the size-class table and records which classes heaps reserve,
/// using the mechanisms `LGMALLOC_PLAN` leaves on (all by default): a size whose
/// exact-fit class is off stays in its standard class, a class whose first-page sizing
/// is off keeps its default first page, and the large-object cache keeps its default
/// retention unless `large-retention` is on.
pub(super) fn apply(plan: &mut RuntimePlan) {
    let (use_bits, _) = options::plan_mechanisms();
    let exact_fit = use_bits & plan_use::EXACT_FIT != 0;
    let first_pages = use_bits & plan_use::FIRST_PAGES != 0;
    for c in plan.classes.iter_mut() {
        let standard = size_class::size_class_of(c.size);
        let bs = size_class::block_size(standard);
        let want = c.size.next_multiple_of(16);
        // Zero leaves a class's default first page (the table keeps the larger).
        let blocks = if first_pages { c.first_page_blocks } else { 0 };
        let shift = if c.source == Source::Profile {
            PROFILE_WASTE_SHIFT
        } else {
            WASTE_SHIFT
        };
        let class = if exact_fit && (bs - want) << shift > bs {
            c.exact_fit = true;
            size_class::add_exact_class(want, blocks)
        } else {
            size_class::set_first_page_blocks(standard, blocks);
            Some(standard)
        };
        // A full table leaves the size in its standard class.
        c.class = class.unwrap_or(standard);
    }
    crate::heap::refresh_class_table();
    // Recorded as the plan's policy even when not put in force (`LGMALLOC_PLAN`
    // without `large-retention`), so an ablation run does not store the default as
    // what was learned.
    plan.retention = super::retention::next_policy(&plan.observed.large);
    if use_bits & plan_use::LARGE_RETENTION != 0 {
        crate::large::set_retention(plan.retention);
    }
    if use_bits & plan_use::RESERVE == 0 {
        return;
    }
    let mut reserved: Vec<usize> = Vec::new();
    for &size in &plan.reserved_sizes {
        let class = size_class::size_class_of(size);
        if reserved.len() < MAX_RESERVED_CLASSES
            && !reserved.contains(&class)
            && class < MAX_CLASSES
        {
            reserved.push(class);
            size_class::set_reserved(class);
        }
    }
}
