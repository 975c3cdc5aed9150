//! The `.init_array` entry: which plan this process runs with, where it comes from (the
//! stored plan, or analyses within the start-up budget), and putting it in force.

use core::ffi::{c_char, c_int};
use std::path::PathBuf;
use std::time::Duration;

use super::build::{apply, build};
use super::deferred::defer_analysis;
use super::learn::{learn_at_exit, learn_if_busy};
use super::modules::{Module, executable_path, modules_to_plan};
use super::store::{read_learned, read_plan, write_plan};
use super::{PlannedClass, RuntimePlan, Source, now_us, publish, thread_cpu_us, verify};
use crate::analysis::cache_dir::{self, CacheDir};
use crate::analysis::{self, Analysis, AnalysisError};
use crate::diag::diag;
use crate::options::{self, PredictMode};
use crate::size_class;

/// Runs before `main` in every build (cdylib, staticlib, rlib): std registers its own
/// constructors at priority 99, this one follows.
#[used]
#[unsafe(link_section = ".init_array.00101")]
static PLAN_AT_START: extern "C" fn(c_int, *const *const c_char, *const *const c_char) =
    plan_at_start;

/// Classes the naive plan reserves.
const NAIVE_CLASSES: usize = 8;

extern "C" fn plan_at_start(
    _argc: c_int,
    _argv: *const *const c_char,
    _envp: *const *const c_char,
) {
    if !crate::init::ensure_initialized() {
        return;
    }
    plan_this_process();
    // What the analysis allocated and freed is not the program's large-object reuse.
    crate::large::reset_reuse_counters();
    // Registered last so that it runs first at exit: the profile is stored before a
    // deferred analysis child is forked, and the process's exit is not drawn out
    // while that child runs.
    if options::learn() {
        // SAFETY: registers a plain function.
        unsafe { libc::atexit(super::profile::write_at_exit) };
    }
}

/// Everything `plan_at_start` does but storing the profile.
fn plan_this_process() {
    // The sampler takes a sampled call's return address as its site when it lies
    // outside lgmalloc, which it can tell only when lgmalloc is a module of its own.
    let own = verify::own_module();
    if let Some((lo, hi, false)) = own {
        crate::sample::set_own_code(lo, hi);
    }
    if super::modules::unwinder_is_safe() {
        crate::sample::allow_unwinding();
    }
    if options::verify() {
        verify::start();
    }
    let mode = options::predict_mode();
    if mode == PredictMode::Off || !table_is_ours() {
        return;
    }
    if mode == PredictMode::Naive {
        let mut plan = naive_plan();
        apply(&mut plan);
        publish(plan);
        return;
    }
    let Some(exe) = executable_path() else {
        return;
    };
    let start = now_us();
    let learn = options::learn();
    let modules = modules_to_plan(&exe);
    // The stored plan and observations sit beside the main program's cache entry.
    let cache = modules
        .first()
        .and_then(|m| m.entry.as_deref())
        .and_then(CacheDir::open_for)
        .map(|(dir, entry)| {
            let stem = cache_dir::entry_stem(&entry).to_string();
            (dir, stem)
        });
    let plan_name = cache
        .as_ref()
        .map(|(_, stem)| format!("{stem}.{}", if learn { "plan" } else { "static-plan" }));
    let learned_name = cache
        .as_ref()
        .filter(|_| learn)
        .map(|(_, stem)| format!("{stem}.learned"));
    let dir = cache.as_ref().map(|(dir, _)| dir);
    // The sampled profile: read here when lgmalloc is linked into the program (the
    // sampler tells lgmalloc's frames from the program's only by the sites earlier runs
    // resolved, with the program's symbols, at exit), else only if a plan is built.
    let read_profile = || {
        cache
            .as_ref()
            .filter(|_| learn)
            .and_then(|(dir, stem)| super::profile::read_beside(dir, stem))
    };
    let mut profile = None;
    if matches!(own, Some((_, _, true))) {
        profile = read_profile();
        if let Some(p) = &profile {
            super::profile::hand_known_sites_to_sampler(p);
        }
    }
    // A stored plan is a few hundred bytes; the analyses it came from are only needed
    // again in verify mode (for the call sites) or when what was learned changed.
    let stored = match (dir, &plan_name) {
        (Some(dir), Some(name)) if mode == PredictMode::Predict && !options::verify() => {
            read_plan(dir, name, &modules)
        }
        _ => None,
    };
    let mut plan = match stored {
        Some(p) if p.inert => {
            find_wrapper_frames(&p, &modules);
            put_nothing_in_force(learned_name.zip(plan_name));
            return;
        }
        Some(p) => p,
        None => {
            let (analysed, deferred) = analyse_modules(&modules, dir);
            if !deferred.is_empty() {
                defer_analysis(deferred);
            }
            if analysed.is_empty() {
                return;
            }
            let learned = match (dir, &learned_name) {
                (Some(dir), Some(name)) => read_learned(dir, name).unwrap_or_default(),
                _ => Default::default(),
            };
            // Like the observations, the sampled profile shapes only a learning plan.
            if profile.is_none() {
                profile = read_profile();
            }
            let plan = build(&analysed, learned, profile.as_ref());
            // A plan missing a module's analysis is not stored: the next run, with that
            // analysis cached, plans from all of them.
            if let (Some(dir), Some(name), true) =
                (dir, &plan_name, plan.modules.len() == modules.len())
            {
                write_plan(dir, name, &plan);
            }
            plan
        }
    };
    plan.analysis_us = now_us() - start;
    find_wrapper_frames(&plan, &modules);
    if mode == PredictMode::AnalyzeOnly {
        return;
    }
    // Verify mode matches allocations to the plan's sites: it needs the plan published.
    if plan.inert && !options::verify() {
        put_nothing_in_force(learned_name.zip(plan_name));
        return;
    }
    plan.learned_files = learned_name.zip(plan_name);
    apply(&mut plan);
    publish(plan);
    if learn && !options::verify() {
        // SAFETY: registers a plain function.
        unsafe { libc::atexit(learn_at_exit) };
    }
}

/// Whether a plan may write the size-class table: only while no other thread runs.
/// Threads that a library's constructor started before this one ran may be allocating
/// already, reading the table (and the class records) a plan would rewrite under them;
/// such a process keeps the standard classes and spends nothing on analysis. (No
/// thread can start between this check and the plan's writes: this is the only one.)
fn table_is_ours() -> bool {
    if crate::os::single_threaded() {
        return true;
    }
    if options::verbose() {
        diag!(
            "lgmalloc: plan: not put in force: other threads ran before it was read, \
             so the standard classes stay"
        );
    }
    false
}

/// An inert plan: nothing goes in force and no plan code runs in this process, but for
/// a check at exit whether the run was big enough to learn from (its observations may
/// differ from the small runs' that made the plan inert).
fn put_nothing_in_force(learned_files: Option<(String, String)>) {
    if options::verbose() {
        diag!("lgmalloc: plan: inert (predicts no saving), nothing put in force");
    }
    if let Some(files) = learned_files {
        learn_if_busy(files);
    }
}

/// Hands the sampler (and verify mode) the run-time return addresses of the calls the
/// modules' wrappers make to the allocator, so that a call through `xmalloc` is
/// attributed to `xmalloc`'s caller.
fn find_wrapper_frames(plan: &RuntimePlan, modules: &[Module]) {
    if plan.wrapper_returns.is_empty() {
        return;
    }
    let names: Vec<String> = modules.iter().map(Module::entry_name).collect();
    let mut returns: Vec<usize> = plan
        .wrapper_returns
        .iter()
        .filter_map(|&(i, ret)| {
            let name = plan.modules.get(i)?;
            let m = modules.get(names.iter().position(|n| n == name)?)?;
            // A non-PIE executable's bias is 0: its link-time addresses are its own.
            Some(m.bias.wrapping_add(ret as usize))
        })
        .collect();
    returns.sort_unstable();
    returns.dedup();
    crate::sample::set_wrapper_returns(Box::leak(returns.into_boxed_slice()));
}

/// The naive baseline: the smallest classes, reserved in every heap, no analysis.
fn naive_plan() -> RuntimePlan {
    let classes: Vec<PlannedClass> = (0..NAIVE_CLASSES)
        .map(|c| {
            let size = size_class::block_size(c);
            PlannedClass {
                size,
                class: c,
                confidence: 1.0,
                source: Source::Static,
                first_page_blocks: size_class::class_info(c).first_page_blocks,
                exact_fit: false,
            }
        })
        .collect();
    RuntimePlan {
        reserved_sizes: classes.iter().map(|c| c.size).collect(),
        classes,
        ..RuntimePlan::default()
    }
}

/// Analyses (or loads the cached analyses of) `modules` within the CPU-time budget.
/// Returns the analyses, and the modules whose cold analysis did not fit.
fn analyse_modules<'m>(
    modules: &'m [Module],
    cache: Option<&CacheDir>,
) -> (Vec<(Analysis, &'m Module)>, Vec<PathBuf>) {
    // Verify mode needs every site: it is a diagnostic run, not a start-up to protect.
    let budget = if options::verify() {
        u64::MAX
    } else {
        options::analysis_budget_us()
    };
    let start = thread_cpu_us();
    let mut analysed = Vec::new();
    let mut deferred = Vec::new();
    for m in modules {
        let spent = thread_cpu_us().saturating_sub(start);
        let left = budget.saturating_sub(spent);
        let cached = cache.is_some_and(|dir| dir.contains(&m.entry_name()));
        if !cached && (left == 0 || m.cold_cost_us() > left) {
            deferred.push(m.path.clone());
            continue;
        }
        match analysis::analyze_path_within(&m.path, true, Duration::from_micros(left)) {
            Ok(a) => analysed.push((a, m)),
            Err(AnalysisError::BudgetExceeded) => deferred.push(m.path.clone()),
            Err(e) => {
                if options::verbose() {
                    diag!("lgmalloc: no plan for {}: {e}", m.path.display());
                }
            }
        }
    }
    (analysed, deferred)
}
