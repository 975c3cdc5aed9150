//! The predictive runtime: before `main`, read the running program's allocation call
//! sites (the `analysis` module, or its cache) and shape the size classes after them.
//!
//! * High-confidence predicted sizes whose standard class would waste space get
//!   exact-fit classes; the class table sends their requests there with the same single
//!   table load as any other size (so routing costs no instruction).
//! * Predicted classes get first pages sized to their expected demand; each new thread
//!   heap reserves them up front (address space only: blocks are carved, and memory
//!   touched, as the thread allocates). Unpredicted classes start at one 1 KiB slice.
//! * What a run observes (allocations per class; per call site in verify mode) is
//!   stored beside the cache entry and raises or lowers the next run's plan.
//! * `LGMALLOC_VERIFY=1` checks the prediction: every allocation's call site and size
//!   are matched against the plan, and one line sums it up at exit.
//!
//! The analysis never calls into the allocator's internals; it returns a plan that this
//! module hands to `size_class` and `heap`.

use core::ffi::{c_char, c_int, c_void};
use core::fmt::Write;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::analysis::{self, Analysis, AnalysisError};
use crate::options::{self, Message};
use crate::size_class::{self, MAX_CLASSES, TABLE_MAX_SIZE};

/// Confidence at or above which a predicted size shapes the heap.
pub const HIGH_CONFIDENCE: f32 = 0.5;
/// Exact-fit classes are added where the standard class wastes more than 1/16.
const WASTE_SHIFT: usize = 4;
/// At most this many classes are reserved up front in every new thread heap.
const MAX_EAGER_CLASSES: usize = 8;
/// CPU time the analyses of a cold start may take, all modules together
/// (`LGMALLOC_ANALYSIS_BUDGET_MS` overrides it): small programs and libraries are
/// analysed before `main`; a module that does not fit is analysed by a detached child
/// process when the program exits, so the next start is warm and no start is slow.
const DEFAULT_BUDGET_US: u64 = 2_000;
/// Cold analysis speed used to estimate a module's cost before trying it, in bytes of
/// code per microsecond of CPU (measured: python3.11 270, cargo 370).
const COLD_BYTES_PER_US: u64 = 250;

/// Runs before `main` in every build (cdylib, staticlib, rlib): std registers its own
/// constructors at priority 99, this one follows.
#[used]
#[unsafe(link_section = ".init_array.00101")]
static PLAN_AT_START: extern "C" fn(c_int, *const *const c_char, *const *const c_char) =
    plan_at_start;

/// Where each planned class's confidence came from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Source {
    /// Static analysis of the call sites.
    Static,
    /// Counts observed by earlier runs.
    Learned,
    /// Both agree.
    Both,
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

/// A call site with a constant prediction, keyed by its return address at run time.
struct Site {
    ret: usize,
    size: u64,
    calls: AtomicU64,
    exact: AtomicU64,
}

/// The plan in force for this process.
pub struct RuntimePlan {
    pub classes: Vec<PlannedClass>,
    sites: Vec<Site>,
    /// Classes every new heap reserves a page for.
    eager: Vec<usize>,
    /// Cache-entry names of the modules the plan was built from (the main program first).
    modules: Vec<String>,
    pub analysis_us: u64,
    pub from_cache: bool,
    learned_path: Option<PathBuf>,
    /// Allocations per class when the plan came into force.
    allocs_at_start: Vec<u64>,
    /// The observations the plan was built from.
    observed: Learned,
    /// Block sizes every new heap reserves a page for (learned thread coverage).
    eager_sizes: Vec<usize>,
}

static PLAN: AtomicPtr<RuntimePlan> = AtomicPtr::new(core::ptr::null_mut());
static MODE: AtomicU8 = AtomicU8::new(MODE_PREDICT);
static LEARN: AtomicBool = AtomicBool::new(true);
static VERIFY: AtomicBool = AtomicBool::new(false);
static BUDGET_US: AtomicU64 = AtomicU64::new(DEFAULT_BUDGET_US);

/// `LGMALLOC_PREDICT=0`: the plain allocator, no analysis.
const MODE_OFF: u8 = 0;
/// `LGMALLOC_PREDICT=analyze`: analyse, then ignore the result (measures its cost).
const MODE_ANALYZE_ONLY: u8 = 1;
/// Default (`LGMALLOC_PREDICT=1`): analyse and shape the heap.
const MODE_PREDICT: u8 = 2;
/// `LGMALLOC_PREDICT=naive`: no analysis; plan the smallest classes for every thread
/// (the baseline a prediction must beat).
const MODE_NAIVE: u8 = 3;
/// Classes the naive plan reserves.
const NAIVE_CLASSES: usize = 8;

/// Verify-mode totals.
static VERIFY_CALLS: AtomicU64 = AtomicU64::new(0);
static VERIFY_PREDICTED: AtomicU64 = AtomicU64::new(0);
static VERIFY_EXACT: AtomicU64 = AtomicU64::new(0);
/// Start and end of the code of the module lgmalloc lives in (verify mode skips frames
/// inside it to find the program's call site).
static OWN_CODE: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];

/// Reads the prediction options (called during initialisation).
pub fn read_options() {
    let mode = match options::var("LGMALLOC_PREDICT\0") {
        Some(b"0" | b"off" | b"no" | b"false") => MODE_OFF,
        Some(b"analyze") => MODE_ANALYZE_ONLY,
        Some(b"naive") => MODE_NAIVE,
        _ => MODE_PREDICT,
    };
    MODE.store(mode, Ordering::Relaxed);
    LEARN.store(
        !matches!(
            options::var("LGMALLOC_LEARN\0"),
            Some(b"0" | b"off" | b"no")
        ),
        Ordering::Relaxed,
    );
    VERIFY.store(options::flag("LGMALLOC_VERIFY\0"), Ordering::Relaxed);
    if let Some(ms) = options::var("LGMALLOC_ANALYSIS_BUDGET_MS\0")
        .and_then(|v| core::str::from_utf8(v).ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        BUDGET_US.store(ms.saturating_mul(1000), Ordering::Relaxed);
    }
}

/// True in verify mode: every allocation takes the slow path and is matched to a site.
#[inline]
pub fn verify() -> bool {
    VERIFY.load(Ordering::Relaxed)
}

/// The plan in force, if any.
pub fn current() -> Option<&'static RuntimePlan> {
    let p = PLAN.load(Ordering::Acquire);
    // SAFETY: a published plan is leaked and never freed.
    unsafe { p.as_ref() }
}

/// Classes a new thread heap should reserve a page for.
pub fn eager_classes() -> &'static [usize] {
    current().map_or(&[], |p| p.eager.as_slice())
}

extern "C" fn plan_at_start(
    _argc: c_int,
    _argv: *const *const c_char,
    _envp: *const *const c_char,
) {
    if !crate::init::ensure_initialized() {
        return;
    }
    if verify() {
        find_own_code();
        // SAFETY: registers a plain function.
        unsafe { libc::atexit(report_at_exit) };
    }
    let mode = MODE.load(Ordering::Relaxed);
    if mode == MODE_OFF {
        return;
    }
    if mode == MODE_NAIVE {
        publish(naive_plan());
        return;
    }
    let Some(exe) = executable_path() else {
        return;
    };
    let start = now_us();
    let learn = LEARN.load(Ordering::Relaxed);
    let modules = modules_to_plan(&exe);
    let entry = modules.first().and_then(|m| m.entry.as_ref());
    let learned_path = entry.filter(|_| learn).map(|e| e.with_extension("learned"));
    let plan_path = entry.map(|e| e.with_extension(if learn { "plan" } else { "static-plan" }));
    // A stored plan is a few hundred bytes; the analyses it came from are only needed
    // again in verify mode (for the call sites) or when what was learned changed.
    let stored = match (&plan_path, mode == MODE_PREDICT && !verify()) {
        (Some(p), true) => read_plan_file(p, &modules),
        _ => None,
    };
    let mut plan = match stored {
        Some(p) => p,
        None => {
            let (analysed, deferred) = analyse_modules(&modules);
            if !deferred.is_empty() {
                defer_analysis(deferred);
            }
            if analysed.is_empty() {
                return;
            }
            let learned = learned_path
                .as_deref()
                .and_then(read_learned)
                .unwrap_or_default();
            let plan = build(&analysed, learned);
            // A plan missing a module's analysis is not stored: the next run, with that
            // analysis cached, plans from all of them.
            if let (Some(p), true) = (&plan_path, plan.modules.len() == modules.len()) {
                write_plan_file(p, &plan);
            }
            plan
        }
    };
    plan.analysis_us = now_us() - start;
    plan.learned_path = learned_path;
    if mode == MODE_ANALYZE_ONLY {
        return;
    }
    apply(&mut plan);
    publish(plan);
    if learn && !verify() {
        // SAFETY: registers a plain function.
        unsafe { libc::atexit(learn_at_exit) };
    }
}

/// Puts `plan` in force for the rest of the process.
fn publish(mut plan: RuntimePlan) {
    if options::verbose() {
        describe(&plan);
    }
    let mut s = crate::stats::LgStats::default();
    crate::stats::collect(&mut s);
    plan.allocs_at_start = s.classes.iter().map(|c| c.allocations).collect();
    PLAN.store(Box::into_raw(Box::new(plan)), Ordering::Release);
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
    let eager_sizes = classes.iter().map(|c| c.size).collect();
    RuntimePlan {
        classes,
        sites: Vec::new(),
        eager: Vec::new(),
        eager_sizes,
        modules: Vec::new(),
        analysis_us: 0,
        from_cache: false,
        learned_path: None,
        allocs_at_start: Vec::new(),
        observed: Learned::default(),
    }
}

// ---- the modules a plan covers ------------------------------------------------------------

/// A loaded ELF file whose allocation call sites the plan covers.
struct Module {
    path: PathBuf,
    /// Load bias: added to the analysis's link-time addresses (PIE, shared objects).
    bias: usize,
    /// Its analysis cache entry; `None` without a cache directory.
    entry: Option<PathBuf>,
    /// Bytes of executable segments, to estimate the cost of a cold analysis.
    code_bytes: u64,
}

impl Module {
    fn entry_name(&self) -> String {
        self.entry
            .as_deref()
            .and_then(Path::file_name)
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
    }

    fn cold_cost_us(&self) -> u64 {
        self.code_bytes / COLD_BYTES_PER_US
    }
}

/// Shared objects whose allocations are the C runtime's own: few, and not the program's
/// pattern, so analysing them does not pay.
const RUNTIME_LIBRARIES: [&str; 10] = [
    "ld-linux",
    "libc.so",
    "libm.so",
    "libmvec.so",
    "libpthread.so",
    "libdl.so",
    "librt.so",
    "libgcc_s.so",
    "libutil.so",
    "linux-vdso",
];

/// The main program, then the loaded shared objects worth analysing: not the C runtime,
/// not lgmalloc's own library, and none named in `LD_PRELOAD` (tools' shims: a probe,
/// valgrind's preloads; analysing them does not pay, and would make the plan of the
/// same program differ from one tool to the next).
fn modules_to_plan(exe: &Path) -> Vec<Module> {
    let me = modules_to_plan as *const () as usize;
    let preload = std::env::var("LD_PRELOAD").unwrap_or_default();
    let preloaded = |name: &str| {
        let file = Path::new(name).file_name();
        preload
            .split([':', ' '])
            .filter(|p| !p.is_empty())
            .any(|p| p == name || (!p.contains('/') && Some(p.as_ref()) == file))
    };
    let mut modules = Vec::new();
    for_each_module(|base, phdrs, name| {
        let (lo, hi, code_bytes) = code_range(base, phdrs);
        let path = if modules.is_empty() {
            exe.to_path_buf()
        } else {
            let own = me >= lo && me < hi;
            let file = Path::new(name).file_name().map(|f| f.to_string_lossy());
            let runtime = file.is_none_or(|f| RUNTIME_LIBRARIES.iter().any(|r| f.starts_with(r)));
            if own || runtime || !name.starts_with('/') || preloaded(name) {
                return;
            }
            PathBuf::from(name)
        };
        modules.push(Module {
            entry: analysis::cache_entry(&path),
            path,
            bias: base,
            code_bytes,
        });
    });
    modules
}

/// Start and end of a module's executable segments, and their size.
fn code_range(base: usize, phdrs: &[libc::Elf64_Phdr]) -> (usize, usize, u64) {
    let mut lo = usize::MAX;
    let mut hi = 0;
    let mut bytes = 0;
    for ph in phdrs {
        if ph.p_type == libc::PT_LOAD && ph.p_flags & libc::PF_X != 0 {
            lo = lo.min(base + ph.p_vaddr as usize);
            hi = hi.max(base + (ph.p_vaddr + ph.p_memsz) as usize);
            bytes += ph.p_memsz;
        }
    }
    (lo, hi, bytes)
}

/// Analyses (or loads the cached analyses of) `modules` within the CPU-time budget.
/// Returns the analyses, and the modules whose cold analysis did not fit.
fn analyse_modules(modules: &[Module]) -> (Vec<(Analysis, &Module)>, Vec<PathBuf>) {
    // Verify mode needs every site: it is a diagnostic run, not a start-up to protect.
    let budget = if verify() {
        u64::MAX
    } else {
        BUDGET_US.load(Ordering::Relaxed)
    };
    let start = thread_cpu_us();
    let mut analysed = Vec::new();
    let mut deferred = Vec::new();
    for m in modules {
        let spent = thread_cpu_us().saturating_sub(start);
        let left = budget.saturating_sub(spent);
        let cached = m.entry.as_deref().is_some_and(Path::exists);
        if !cached && (left == 0 || m.cold_cost_us() > left) {
            deferred.push(m.path.clone());
            continue;
        }
        match analysis::analyze_path_within(&m.path, true, Duration::from_micros(left)) {
            Ok(a) => analysed.push((a, m)),
            Err(AnalysisError::BudgetExceeded) => deferred.push(m.path.clone()),
            Err(e) => {
                if options::verbose() {
                    let mut msg = Message::new();
                    let _ = writeln!(msg, "lgmalloc: no plan for {}: {e}", m.path.display());
                    crate::os::write_stderr(msg.as_bytes());
                }
            }
        }
    }
    (analysed, deferred)
}

/// Modules whose analysis was deferred, and the process that deferred them.
static DEFERRED: AtomicPtr<Vec<PathBuf>> = AtomicPtr::new(core::ptr::null_mut());
static DEFERRED_BY: AtomicU64 = AtomicU64::new(0);

/// Leaves the analysis of `paths` to the end of the run (see [`analyse_deferred_at_exit`]).
fn defer_analysis(paths: Vec<PathBuf>) {
    if options::verbose() {
        for p in &paths {
            let mut m = Message::new();
            let _ = writeln!(
                m,
                "lgmalloc: analysis of {} deferred: over the start-up budget",
                p.display()
            );
            crate::os::write_stderr(m.as_bytes());
        }
    }
    // SAFETY: getpid has no preconditions.
    DEFERRED_BY.store(unsafe { libc::getpid() } as u64, Ordering::Relaxed);
    DEFERRED.store(Box::into_raw(Box::new(paths)), Ordering::Release);
    // SAFETY: registers a plain function.
    unsafe { libc::atexit(analyse_deferred_at_exit) };
}

/// At exit: analyses (and caches) the modules that did not fit the start-up budget in a
/// child process, so the program's exit is not delayed and its next start is warm (as
/// `git gc --auto` detaches). The child never forks or execs, and leaves with `_exit`
/// (no exit handlers), so it cannot start another.
extern "C" fn analyse_deferred_at_exit() {
    // Only the process that deferred them: not a child it forked that exits normally.
    // SAFETY: getpid has no preconditions.
    if DEFERRED_BY.load(Ordering::Relaxed) != unsafe { libc::getpid() } as u64 {
        return;
    }
    let p = DEFERRED.swap(core::ptr::null_mut(), Ordering::Acquire);
    if p.is_null() {
        return;
    }
    // SAFETY: `defer_analysis` published the list with `Box::into_raw`, and the swap
    // hands it to this call only. The parent frees it when this returns (the child
    // leaves with `_exit` first).
    let paths = unsafe { Box::from_raw(p) };
    // SAFETY: fork has no preconditions; lgmalloc's own locks are handled by its
    // atfork handlers, and the child only runs the analysis before `_exit`.
    match unsafe { libc::fork() } {
        0 => {
            detach_from_parent();
            for path in paths.iter() {
                let _ = analysis::analyze_path(path, true);
            }
            // SAFETY: ends the child without running the parent's exit handlers.
            unsafe { libc::_exit(0) }
        }
        pid if pid < 0 && options::verbose() => {
            crate::os::write_stderr(b"lgmalloc: deferred analysis not started: fork failed\n")
        }
        _ => {}
    }
}

/// In the analysis child: a session of its own (the terminal's signals are not for it),
/// low priority, and none of the parent's files, so a reader of the parent's pipes sees
/// end-of-file when the parent exits, not when the analysis ends.
fn detach_from_parent() {
    // SAFETY: plain system calls on this process's own attributes and descriptors;
    // `/dev/null` is a constant C string.
    unsafe {
        libc::setsid();
        libc::nice(10);
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        for fd in 0..3 {
            libc::dup2(null, fd);
        }
        if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) != 0 {
            for fd in 3..1024 {
                libc::close(fd);
            }
        }
        // A lock another thread of the parent held at the fork (the environment's,
        // stdio's) would stop the child for good: it gives up after a minute instead.
        libc::alarm(60);
    }
}

/// What earlier runs observed.
#[derive(Default, Clone)]
struct Learned {
    /// (block size, allocations, threads that allocated from it)
    classes: Vec<(usize, u64, u64)>,
    total: u64,
    threads: u64,
}

/// A class is reserved in every new heap when at least this share of a multi-threaded
/// program's threads used it.
const EAGER_MIN_COVERAGE: f32 = 0.5;
/// Programs with fewer threads gain nothing from reserving pages in new heaps.
const EAGER_MIN_THREADS: u64 = 4;

impl Learned {
    /// Allocations per using thread of the class serving `size`, if observed.
    fn per_thread(&self, size: usize) -> Option<f32> {
        let bs = size.next_multiple_of(16);
        let c = self.classes.iter().find(|c| c.0 == bs)?;
        Some(c.1 as f32 / c.2.max(1) as f32)
    }

    /// Block sizes that most threads used: the classes a new thread will need.
    fn per_thread_sizes(&self) -> Vec<usize> {
        if self.threads < EAGER_MIN_THREADS {
            return Vec::new();
        }
        let mut sizes: Vec<(usize, u64)> = self
            .classes
            .iter()
            .filter(|c| c.2 as f32 >= EAGER_MIN_COVERAGE * self.threads as f32)
            .map(|c| (c.0, c.2))
            .collect();
        sizes.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        sizes
            .into_iter()
            .take(MAX_EAGER_CLASSES)
            .map(|c| c.0)
            .collect()
    }
}

/// Builds the plan: static predictions, adjusted by what earlier runs observed.
fn build(analysed: &[(Analysis, &Module)], learned: Learned) -> RuntimePlan {
    let learned = &learned;
    let mut classes: Vec<PlannedClass> = Vec::new();
    let sizes = analysis::merge_plans(analysed.iter().flat_map(|(a, _)| a.plan().iter().copied()));
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
    let mut sites: Vec<Site> = analysed
        .iter()
        .flat_map(|(a, m)| constant_sites(a, m.bias))
        .collect();
    sites.sort_by_key(|s| s.ret);
    sites.dedup_by_key(|s| s.ret);
    RuntimePlan {
        classes,
        sites,
        eager: Vec::new(),
        eager_sizes: learned.per_thread_sizes(),
        modules: analysed.iter().map(|(_, m)| m.entry_name()).collect(),
        analysis_us: 0,
        from_cache: analysed.iter().all(|(a, _)| a.from_cache),
        learned_path: None,
        allocs_at_start: Vec::new(),
        observed: learned.clone(),
    }
}

/// Sites with a constant prediction, keyed by their run-time return address.
fn constant_sites(a: &Analysis, bias: usize) -> impl Iterator<Item = Site> + '_ {
    let bias = if a.pie { bias as u64 } else { 0 };
    a.call_sites
        .iter()
        .filter(|s| !s.tail)
        .filter_map(move |s| {
            Some(Site {
                ret: (bias + s.site + s.len as u64) as usize,
                size: s.size?,
                calls: AtomicU64::new(0),
                exact: AtomicU64::new(0),
            })
        })
}

/// A class must take at least this share of a run's allocations to count as observed.
const LEARNED_MIN_SHARE: f32 = 0.05;

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

/// A planned class. Its first page holds one slice, the least a thread can touch,
/// unless earlier runs showed each thread allocating many blocks of it: then up to one
/// OS page, so heavy users skip the early growth steps. (A larger first page for a
/// thread that holds a few blocks would spread every thread's blocks over more OS
/// pages and cost resident memory.)
fn planned(size: usize, confidence: f32, source: Source, per_thread: Option<f32>) -> PlannedClass {
    let bs = size.next_multiple_of(16).max(16);
    let one_slice = (crate::segment::SLICE_SIZE / bs).max(4);
    let first_page_blocks = match per_thread {
        Some(n) if n >= HEAVY_PER_THREAD => (crate::os::OS_PAGE_SIZE / bs).max(one_slice),
        _ => one_slice,
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

/// Hands the plan to the size-class table and records which classes heaps reserve.
fn apply(plan: &mut RuntimePlan) {
    for c in plan.classes.iter_mut() {
        let standard = size_class::size_class_of(c.size);
        let bs = size_class::block_size(standard);
        let want = c.size.next_multiple_of(16);
        let class = if (bs - want) << WASTE_SHIFT > bs {
            c.exact_fit = true;
            size_class::add_exact_class(want, c.first_page_blocks)
        } else {
            size_class::set_first_page_blocks(standard, c.first_page_blocks);
            Some(standard)
        };
        if let Some(class) = class {
            c.class = class;
        }
    }
    let mut eager: Vec<usize> = Vec::new();
    for &size in &plan.eager_sizes {
        let class = size_class::size_class_of(size);
        if eager.len() < MAX_EAGER_CLASSES && !eager.contains(&class) && class < MAX_CLASSES {
            eager.push(class);
        }
    }
    plan.eager = eager;
}

fn describe(plan: &RuntimePlan) {
    let mut m = Message::new();
    let _ = writeln!(
        m,
        "lgmalloc: plan: {} classes, {} constant sites, analysis {} us{}",
        plan.classes.len(),
        plan.sites.len(),
        plan.analysis_us,
        if plan.from_cache { " (cached)" } else { "" }
    );
    crate::os::write_stderr(m.as_bytes());
    for c in &plan.classes {
        m.clear();
        let _ = writeln!(
            m,
            "lgmalloc: plan: size {:>6} class {:>3} confidence {:.2} from {:?}{} first page {} blocks",
            c.size,
            c.class,
            c.confidence,
            c.source,
            if c.exact_fit { " exact-fit" } else { "" },
            c.first_page_blocks
        );
        crate::os::write_stderr(m.as_bytes());
    }
}

// ---- learning across runs --------------------------------------------------------------

/// Format: a first line `lgmalloc-learned 2`, then `threads N` and
/// `class BLOCK_SIZE ALLOCATIONS THREADS_USING` lines.
fn read_learned(path: &Path) -> Option<Learned> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut lines = text.lines();
    if lines.next()? != "lgmalloc-learned 2" {
        return None;
    }
    let mut learned = Learned::default();
    for line in lines {
        parse_learned_line(&mut learned, line)?;
    }
    Some(learned)
}

/// Parses one `threads` or `class` line into `learned` (shared with the plan file).
fn parse_learned_line(learned: &mut Learned, line: &str) -> Option<()> {
    let f: Vec<&str> = line.split_ascii_whitespace().collect();
    match f.as_slice() {
        ["threads", n] => learned.threads = n.parse().ok()?,
        ["class", size, calls, using] => {
            let calls: u64 = calls.parse().ok()?;
            learned.total += calls;
            learned
                .classes
                .push((size.parse().ok()?, calls, using.parse().ok()?));
        }
        _ => return None,
    }
    Some(())
}

fn learned_lines(learned: &Learned, prefix: &str, text: &mut String) {
    let _ = writeln!(text, "{prefix}threads {}", learned.threads);
    for (size, calls, using) in &learned.classes {
        let _ = writeln!(text, "{prefix}class {size} {calls} {using}");
    }
}

/// At exit: if this run's allocations per class (or which classes its threads use)
/// differ from what the plan was built on, store them and drop the stored plan, so
/// the next run plans from them.
extern "C" fn learn_at_exit() {
    let Some(plan) = current() else { return };
    let Some(path) = plan.learned_path.as_deref() else {
        return;
    };
    let mut s = crate::stats::LgStats::default();
    crate::stats::collect(&mut s);
    let mut using = [0u64; MAX_CLASSES];
    let threads = crate::heap::class_coverage(&mut using);
    let mut now = Learned {
        threads,
        ..Learned::default()
    };
    let counted = s
        .classes
        .iter()
        .zip(plan.allocs_at_start.iter())
        .zip(using.iter());
    for ((c, before), using) in counted.take(s.class_count as usize) {
        // Only the program's own allocations, not the loader's or the analysis's.
        let calls = c.allocations.saturating_sub(*before);
        if calls > 0 {
            now.total += calls;
            now.classes.push((c.block_size as usize, calls, *using));
        }
    }
    if !changed(&plan.observed, &now) {
        return;
    }
    let mut text = String::from("lgmalloc-learned 2\n");
    learned_lines(&now, "", &mut text);
    write_atomically(path, text.as_bytes());
    let _ = std::fs::remove_file(path.with_extension("plan"));
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
/// classes, a share that moved by more than 0.15, or other per-thread classes.
fn changed(before: &Learned, now: &Learned) -> bool {
    let (a, b) = (shares(before), shares(now));
    if a.len() != b.len() || before.per_thread_sizes() != now.per_thread_sizes() {
        return true;
    }
    a.iter().any(|&(size, share)| {
        b.iter()
            .find(|o| o.0 == size)
            .is_none_or(|o| (o.1 - share).abs() > 0.15)
    })
}

// ---- the stored plan ------------------------------------------------------------------------

/// Format: `lgmalloc-plan 3`, then `module CACHE_ENTRY` (the modules analysed, main
/// program first), `class SIZE CONFIDENCE SOURCE FIRST_PAGE_BLOCKS`, `eager BLOCK_SIZE`
/// and `observed ...` (the learned lines it was built from) lines.
fn write_plan_file(path: &Path, plan: &RuntimePlan) {
    let mut text = String::from("lgmalloc-plan 3\n");
    for m in &plan.modules {
        let _ = writeln!(text, "module {m}");
    }
    for c in &plan.classes {
        let source = match c.source {
            Source::Static => 'S',
            Source::Learned => 'L',
            Source::Both => 'B',
        };
        let _ = writeln!(
            text,
            "class {} {} {} {}",
            c.size, c.confidence, source, c.first_page_blocks
        );
    }
    for size in &plan.eager_sizes {
        let _ = writeln!(text, "eager {size}");
    }
    learned_lines(&plan.observed, "observed ", &mut text);
    write_atomically(path, text.as_bytes());
}

/// The plan stored at `path`, if it was built from the same `modules` (the same files:
/// cache entries are named by build-id, or inode, size and mtime).
fn read_plan_file(path: &Path, modules: &[Module]) -> Option<RuntimePlan> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut lines = text.lines();
    if lines.next()? != "lgmalloc-plan 3" {
        return None;
    }
    let mut stored_modules = Vec::new();
    let mut classes = Vec::new();
    let mut observed = Learned::default();
    let mut eager_sizes = Vec::new();
    for line in lines {
        let f: Vec<&str> = line.split_ascii_whitespace().collect();
        match f.as_slice() {
            ["class", size, confidence, source, blocks] => {
                let size: usize = size.parse().ok()?;
                let source = match *source {
                    "S" => Source::Static,
                    "L" => Source::Learned,
                    "B" => Source::Both,
                    _ => return None,
                };
                if size == 0 || size > TABLE_MAX_SIZE {
                    return None;
                }
                classes.push(PlannedClass {
                    size,
                    class: size_class::size_class_of(size),
                    confidence: confidence.parse().ok()?,
                    source,
                    first_page_blocks: blocks.parse().ok()?,
                    exact_fit: false,
                });
            }
            ["eager", size] => eager_sizes.push(size.parse().ok()?),
            ["module", name] => stored_modules.push(name.to_string()),
            ["observed", ..] => parse_learned_line(&mut observed, line.strip_prefix("observed ")?)?,
            _ => return None,
        }
    }
    let current = modules.iter().map(Module::entry_name);
    if !current.eq(stored_modules.iter().cloned()) {
        return None;
    }
    Some(RuntimePlan {
        classes,
        sites: Vec::new(),
        eager: Vec::new(),
        modules: stored_modules,
        analysis_us: 0,
        from_cache: true,
        learned_path: None,
        allocs_at_start: Vec::new(),
        observed,
        eager_sizes,
    })
}

fn write_atomically(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    if std::fs::write(&tmp, bytes).is_err() || std::fs::rename(&tmp, path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

// ---- verify mode ---------------------------------------------------------------------------

/// Verify mode: matches one allocation of `size` bytes to its call site.
pub fn record_call(size: usize) {
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
    let me = find_own_code as *const () as usize;
    for_each_module(|base, phdrs, _| {
        let (lo, hi, _) = code_range(base, phdrs);
        if me >= lo && me < hi {
            OWN_CODE[0].store(lo, Ordering::Relaxed);
            OWN_CODE[1].store(hi, Ordering::Relaxed);
        }
    });
}

extern "C" fn report_at_exit() {
    let mut m = Message::new();
    let _ = writeln!(
        m,
        "lgmalloc: verify calls={} predicted={} exact={}",
        VERIFY_CALLS.load(Ordering::Relaxed),
        VERIFY_PREDICTED.load(Ordering::Relaxed),
        VERIFY_EXACT.load(Ordering::Relaxed)
    );
    crate::os::write_stderr(m.as_bytes());
    if !options::verbose() {
        return;
    }
    let Some(plan) = current() else { return };
    for s in plan
        .sites
        .iter()
        .filter(|s| s.calls.load(Ordering::Relaxed) > 0)
    {
        m.clear();
        let _ = writeln!(
            m,
            "lgmalloc: verify site ret={:#x} size={} calls={} exact={}",
            s.ret,
            s.size,
            s.calls.load(Ordering::Relaxed),
            s.exact.load(Ordering::Relaxed)
        );
        crate::os::write_stderr(m.as_bytes());
    }
}

// ---- the running program --------------------------------------------------------------------

/// The executable's path, from `/proc/self/exe`.
fn executable_path() -> Option<PathBuf> {
    std::fs::read_link("/proc/self/exe").ok()
}

/// What [`for_each_module`] calls: load bias, program headers, path ("" for the main
/// program, or a name that is not a path for the vDSO).
type ModuleVisitor<'a> = &'a mut dyn FnMut(usize, &[libc::Elf64_Phdr], &str);

/// Calls `f` for each loaded module, the main program first.
fn for_each_module(mut f: impl FnMut(usize, &[libc::Elf64_Phdr], &str)) {
    extern "C" fn visit(info: *mut libc::dl_phdr_info, _size: usize, data: *mut c_void) -> c_int {
        // SAFETY: `data` is the closure passed below; `info`, its headers and its name
        // are valid for this call.
        unsafe {
            let f = &mut *data.cast::<ModuleVisitor>();
            let info = &*info;
            let phdrs = if info.dlpi_phdr.is_null() {
                &[][..]
            } else {
                core::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize)
            };
            let name = if info.dlpi_name.is_null() {
                ""
            } else {
                core::ffi::CStr::from_ptr(info.dlpi_name)
                    .to_str()
                    .unwrap_or("")
            };
            f(info.dlpi_addr as usize, phdrs, name);
        }
        0
    }
    let mut dynf: ModuleVisitor = &mut f;
    // SAFETY: the callback only uses `data` as the closure above.
    unsafe { libc::dl_iterate_phdr(Some(visit), (&raw mut dynf).cast()) };
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
