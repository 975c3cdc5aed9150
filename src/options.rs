//! Every `LGMALLOC_*` variable, read once at initialisation without allocating
//! (`getenv` returns a pointer into `environ`).
//!
//! In secure-execution mode (a setuid, setgid or file-capability program; see
//! [`os::secure_execution`]) the environment belongs to a less privileged caller: no
//! variable is read and every option keeps its default, as glibc ignores its own
//! `MALLOC_*` variables there.

use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};

use crate::os;

/// What the predictive runtime does (`LGMALLOC_PREDICT`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum PredictMode {
    /// `0`: the plain allocator, no analysis.
    Off = 0,
    /// `analyze`: obtain the plan, then ignore it (measures its cost).
    AnalyzeOnly = 1,
    /// The default: analyse and shape the heap.
    Predict = 2,
    /// `naive`: no analysis; reserve the smallest classes in every heap (a baseline).
    Naive = 3,
}

/// Which of the plan's mechanisms a run puts in force (`LGMALLOC_PLAN`): a set of these
/// bits. All by default; the ablation (bench/ablation) switches them one at a time.
pub mod plan_use {
    /// Exact-fit classes for predicted sizes their standard class would waste space on.
    pub const EXACT_FIT: u8 = 1;
    /// First pages sized to a class's expected demand.
    pub const FIRST_PAGES: u8 = 2;
    /// Classes most threads used, reserved in every new thread heap.
    pub const RESERVE: u8 = 4;
    /// The large-object cache's delay and budget shaped by how earlier runs reused
    /// their large mappings.
    pub const LARGE_RETENTION: u8 = 8;
    pub const ALL: u8 = EXACT_FIT | FIRST_PAGES | RESERVE | LARGE_RETENTION;
}

/// CPU time the analyses of a cold start may take, all modules together, by default.
const DEFAULT_BUDGET_US: u64 = 2_000;

static SECURE: AtomicBool = AtomicBool::new(false);
static VERBOSE: AtomicBool = AtomicBool::new(false);
static SHOW_STATS: AtomicBool = AtomicBool::new(false);
/// `LGMALLOC_SHOW_STATS=pid:N`: only process N prints (0: every process).
static STATS_PID: AtomicU64 = AtomicU64::new(0);
static VERIFY: AtomicBool = AtomicBool::new(false);
static LEARN: AtomicBool = AtomicBool::new(true);
static DEFERRED_ANALYSIS: AtomicBool = AtomicBool::new(true);
static PREDICT: AtomicU8 = AtomicU8::new(PredictMode::Predict as u8);
static BUDGET_US: AtomicU64 = AtomicU64::new(DEFAULT_BUDGET_US);
static PLAN_USE: AtomicU8 = AtomicU8::new(plan_use::ALL);
/// `LGMALLOC_PLAN` was set but named something unknown (then every mechanism is used).
static PLAN_USE_INVALID: AtomicBool = AtomicBool::new(false);

/// Reads the variables (initialisation, before threads allocate).
pub fn init() {
    if os::secure_execution() {
        SECURE.store(true, Ordering::Relaxed);
        // Learning writes files on the caller's behalf.
        LEARN.store(false, Ordering::Relaxed);
        return;
    }
    VERBOSE.store(flag("LGMALLOC_VERBOSE\0"), Ordering::Relaxed);
    SHOW_STATS.store(flag("LGMALLOC_SHOW_STATS\0"), Ordering::Relaxed);
    if let Some(pid) = var("LGMALLOC_SHOW_STATS\0")
        .and_then(|v| v.strip_prefix(b"pid:"))
        .and_then(|v| core::str::from_utf8(v).ok()?.parse::<u64>().ok())
    {
        STATS_PID.store(pid, Ordering::Relaxed);
    }
    VERIFY.store(flag("LGMALLOC_VERIFY\0"), Ordering::Relaxed);
    LEARN.store(!off("LGMALLOC_LEARN\0"), Ordering::Relaxed);
    DEFERRED_ANALYSIS.store(!off("LGMALLOC_DEFERRED_ANALYSIS\0"), Ordering::Relaxed);
    let mode = match var("LGMALLOC_PREDICT\0") {
        Some(b"0" | b"off" | b"no" | b"false") => PredictMode::Off,
        Some(b"analyze") => PredictMode::AnalyzeOnly,
        Some(b"naive") => PredictMode::Naive,
        _ => PredictMode::Predict,
    };
    PREDICT.store(mode as u8, Ordering::Relaxed);
    if let Some(v) = var("LGMALLOC_PLAN\0") {
        match parse_plan_use(v) {
            Some(bits) => PLAN_USE.store(bits, Ordering::Relaxed),
            None => PLAN_USE_INVALID.store(true, Ordering::Relaxed),
        }
    }
    if let Some(ms) = var("LGMALLOC_ANALYSIS_BUDGET_MS\0")
        .and_then(|v| core::str::from_utf8(v).ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        BUDGET_US.store(ms.saturating_mul(1000), Ordering::Relaxed);
    }
}

/// `LGMALLOC_PLAN`'s value: comma-separated `exact-fit`, `first-pages`, `reserve`,
/// `large-retention`, or
/// `all` or `none`. None when a word is unknown.
fn parse_plan_use(value: &[u8]) -> Option<u8> {
    let mut bits = 0;
    for word in value.split(|&b| b == b',') {
        bits |= match word {
            b"exact-fit" => plan_use::EXACT_FIT,
            b"first-pages" => plan_use::FIRST_PAGES,
            b"reserve" => plan_use::RESERVE,
            b"large-retention" => plan_use::LARGE_RETENTION,
            b"all" => plan_use::ALL,
            b"none" | b"" => 0,
            _ => return None,
        };
    }
    Some(bits)
}

/// True when the variable is set to something other than empty, `0`, `no` or `off`.
fn flag(name_nul: &str) -> bool {
    match var(name_nul) {
        Some(v) => !matches!(v, b"" | b"0" | b"no" | b"off" | b"false"),
        None => false,
    }
}

/// True when a default-on variable is set to `0`, `no`, `off` or `false`.
fn off(name_nul: &str) -> bool {
    matches!(var(name_nul), Some(b"0" | b"no" | b"off" | b"false"))
}

/// The value of an environment variable (name must end in NUL), borrowed from environ.
fn var(name_nul: &str) -> Option<&'static [u8]> {
    // SAFETY: the name is NUL-terminated; getenv returns null or a C string that stays
    // valid as long as nobody modifies the environment (start-up reads only).
    unsafe {
        let v = libc::getenv(name_nul.as_ptr().cast());
        if v.is_null() {
            return None;
        }
        Some(core::ffi::CStr::from_ptr(v).to_bytes())
    }
}

/// Secure-execution mode: the environment was ignored, and nothing may be written on the
/// caller's behalf (no cache, no analysis child, no diagnostics but misuse aborts).
pub fn secure() -> bool {
    SECURE.load(Ordering::Relaxed)
}

/// `LGMALLOC_VERBOSE`: report notable events on stderr.
pub fn verbose() -> bool {
    VERBOSE.load(Ordering::Relaxed)
}

/// `LGMALLOC_SHOW_STATS`: print a summary at exit.
pub fn show_stats() -> bool {
    let pid = STATS_PID.load(Ordering::Relaxed);
    // SAFETY: getpid has no preconditions (checked at exit, so a forked child that
    // inherited the setting stays quiet).
    SHOW_STATS.load(Ordering::Relaxed) && (pid == 0 || pid == unsafe { libc::getpid() } as u64)
}

/// `LGMALLOC_VERIFY`: every allocation takes the slow path and is matched to its site.
#[inline]
pub fn verify() -> bool {
    VERIFY.load(Ordering::Relaxed)
}

/// `LGMALLOC_LEARN` (default on): plan from what earlier runs observed, and record it.
pub fn learn() -> bool {
    LEARN.load(Ordering::Relaxed)
}

/// `LGMALLOC_DEFERRED_ANALYSIS` (default on): analyse at exit, in a detached child, the
/// files that did not fit the start-up budget.
pub fn deferred_analysis() -> bool {
    DEFERRED_ANALYSIS.load(Ordering::Relaxed)
}

/// `LGMALLOC_PREDICT`.
pub fn predict_mode() -> PredictMode {
    match PREDICT.load(Ordering::Relaxed) {
        0 => PredictMode::Off,
        1 => PredictMode::AnalyzeOnly,
        3 => PredictMode::Naive,
        _ => PredictMode::Predict,
    }
}

/// `LGMALLOC_PLAN`: the plan's mechanisms in force ([`plan_use`] bits), and whether the
/// variable named something unknown (every mechanism is used then).
pub fn plan_mechanisms() -> (u8, bool) {
    (
        PLAN_USE.load(Ordering::Relaxed),
        PLAN_USE_INVALID.load(Ordering::Relaxed),
    )
}

/// `LGMALLOC_ANALYSIS_BUDGET_MS`, in microseconds of CPU time.
pub fn analysis_budget_us() -> u64 {
    BUDGET_US.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::{parse_plan_use, plan_use};

    #[test]
    fn lgmalloc_plan_values() {
        assert_eq!(parse_plan_use(b"all"), Some(plan_use::ALL));
        assert_eq!(parse_plan_use(b"none"), Some(0));
        assert_eq!(parse_plan_use(b"reserve"), Some(plan_use::RESERVE));
        assert_eq!(
            parse_plan_use(b"exact-fit,first-pages"),
            Some(plan_use::EXACT_FIT | plan_use::FIRST_PAGES)
        );
        assert_eq!(parse_plan_use(b"reserve,"), Some(plan_use::RESERVE));
        assert_eq!(
            parse_plan_use(b"large-retention"),
            Some(plan_use::LARGE_RETENTION)
        );
        assert_eq!(parse_plan_use(b"exact"), None);
        assert_eq!(parse_plan_use(b"reserve,EXACT-FIT"), None);
    }
}
