//! Statistics: `lg_stats` and the summary `LGMALLOC_SHOW_STATS=1` prints at exit.
//!
//! Counters live where they are cheap to keep: allocation counts per class in each
//! heap (one add on the fast path), live blocks in the page records. A report sums them
//! with the locks of the heap pool and the region held; owner-written words are read as
//! a racy snapshot.

use core::ffi::{c_char, c_int};
use core::sync::atomic::{AtomicUsize, Ordering};

use crate::diag::diag;
use crate::size_class::{self, MAX_CLASSES};
use crate::{heap, init, large, options, os, page, sample, segment};

/// Number of entries in [`LgStats::classes`].
pub const LG_MAX_CLASSES: usize = 112;
const _: () = assert!(LG_MAX_CLASSES == MAX_CLASSES);

/// Figures for one size class.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct LgClassStats {
    /// Bytes per block of this class.
    pub block_size: u64,
    /// Allocations served from this class since start.
    pub allocations: u64,
    /// Blocks currently in use (or freed by another thread and not yet collected by the
    /// page's owner; those of exited threads' pages are collected by the snapshot).
    pub live_blocks: u64,
    /// Pages currently holding blocks of this class.
    pub pages: u64,
}

/// A snapshot of the allocator's state, filled by `lg_stats`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct LgStats {
    /// Bytes in live blocks (block sizes, including rounding) and large objects.
    pub bytes_allocated: u64,
    /// Bytes that may be resident: mapped memory minus free memory returned to the OS.
    pub bytes_committed: u64,
    /// Address space held from the OS.
    pub bytes_reserved: u64,
    /// The highest `bytes_committed` seen by a call of `lg_stats` or at exit.
    pub peak_bytes_committed: u64,
    /// Thread heaps in use.
    pub live_heaps: u64,
    /// Allocations since start (all sizes).
    pub alloc_count: u64,
    /// Frees since start (all sizes): allocations minus blocks still live (a block freed
    /// by another thread counts once its owner collected it).
    pub free_count: u64,
    /// Large objects (own mapping) currently live.
    pub large_live: u64,
    /// Acquisitions of lgmalloc's locks since start (page supply, heap creation and
    /// exit, the large-object cache, statistics; never the same-thread fast path).
    pub lock_acquisitions: u64,
    /// Those of `lock_acquisitions` that found the lock held by another thread.
    pub lock_contended: u64,
    /// Number of valid entries in `classes`.
    pub class_count: u32,
    /// Per size class figures; entries past `class_count` are zero.
    pub classes: [LgClassStats; LG_MAX_CLASSES],
}

impl Default for LgStats {
    fn default() -> Self {
        LgStats {
            bytes_allocated: 0,
            bytes_committed: 0,
            bytes_reserved: 0,
            peak_bytes_committed: 0,
            live_heaps: 0,
            alloc_count: 0,
            free_count: 0,
            large_live: 0,
            lock_acquisitions: 0,
            lock_contended: 0,
            class_count: 0,
            classes: [LgClassStats::default(); LG_MAX_CLASSES],
        }
    }
}

/// Large allocations and frees since start.
pub static LARGE_ALLOCS: AtomicUsize = AtomicUsize::new(0);
pub static LARGE_FREES: AtomicUsize = AtomicUsize::new(0);
static PEAK_COMMITTED: AtomicUsize = AtomicUsize::new(0);

/// Fills `out` with a fresh snapshot.
pub fn collect(out: &mut LgStats) {
    *out = LgStats::default();
    let count = size_class::class_count();
    out.class_count = count as u32;
    let mut per_class = [0u64; MAX_CLASSES];
    heap::counts(&mut per_class);
    let mut allocated = 0u64;
    for (c, slot) in out.classes.iter_mut().enumerate().take(count) {
        slot.block_size = size_class::block_size(c) as u64;
        slot.allocations = per_class[c];
        // Sampled blocks live in the sample arena, not in a page of their class.
        let sampled = crate::sample::live_in_class(c);
        slot.live_blocks += sampled;
        allocated += sampled * slot.block_size;
    }
    segment::for_each_page(|p| {
        // SAFETY: `for_each_page` holds the region lock and passes page records.
        let (class, used) = unsafe { page::stats_snapshot(p) };
        if let Some(slot) = out.classes.get_mut(class) {
            slot.live_blocks += used as u64;
            slot.pages += 1;
            allocated += used as u64 * size_class::block_size(class) as u64;
        }
    });
    let large_bytes = large::LIVE_BYTES.load(Ordering::Relaxed);
    out.bytes_allocated = allocated + large_bytes as u64;
    let (cached, cached_resident) = large::cache_figures();
    // The sample arena counts too: free slots may keep up to 32 MiB of pages, which
    // `lg_trim` gives back.
    let (sample_reserved, sample_resident) = crate::sample::arena_figures();
    let committed = segment::committed_bytes() + large_bytes + cached_resident + sample_resident;
    let peak = PEAK_COMMITTED
        .fetch_max(committed, Ordering::Relaxed)
        .max(committed);
    out.bytes_committed = committed as u64;
    out.peak_bytes_committed = peak as u64;
    out.bytes_reserved =
        (segment::SEGMENT_BYTES.load(Ordering::Relaxed) + large_bytes + cached + sample_reserved)
            as u64;
    out.live_heaps = heap::LIVE_HEAPS.load(Ordering::Relaxed) as u64;
    out.large_live = large::LIVE_COUNT.load(Ordering::Relaxed) as u64;
    // Read last, so the acquisitions this snapshot made itself are included.
    for (acquired, contended) in [
        heap::lock_counts(),
        segment::lock_counts(),
        large::lock_counts(),
    ] {
        out.lock_acquisitions += acquired;
        out.lock_contended += contended;
    }
    out.alloc_count = per_class.iter().sum::<u64>() + LARGE_ALLOCS.load(Ordering::Relaxed) as u64;
    let live_blocks: u64 = out.classes.iter().map(|c| c.live_blocks).sum();
    out.free_count = (out.alloc_count - LARGE_ALLOCS.load(Ordering::Relaxed) as u64)
        .saturating_sub(live_blocks)
        + LARGE_FREES.load(Ordering::Relaxed) as u64;
}

fn kib(bytes: u64) -> u64 {
    bytes.div_ceil(1024)
}

/// Writes a readable summary to stderr (used at exit with `LGMALLOC_SHOW_STATS=1`).
pub fn print_summary() {
    let mut s = LgStats::default();
    collect(&mut s);
    diag!(
        "lgmalloc: stats: allocated {} KiB, committed {} KiB (peak {} KiB), reserved {} KiB",
        kib(s.bytes_allocated),
        kib(s.bytes_committed),
        kib(s.peak_bytes_committed),
        kib(s.bytes_reserved)
    );
    diag!(
        "lgmalloc: stats: {} allocations, {} frees, {} live heaps, {} live large objects",
        s.alloc_count,
        s.free_count,
        s.live_heaps,
        s.large_live
    );
    let [(pool, pool_c), (region, region_c), (cache, cache_c)] = [
        heap::lock_counts(),
        segment::lock_counts(),
        large::lock_counts(),
    ];
    diag!(
        "lgmalloc: stats: {} lock acquisitions, {} contended (heap pool {}/{}, region {}/{}, large cache {}/{})",
        s.lock_acquisitions,
        s.lock_contended,
        pool,
        pool_c,
        region,
        region_c,
        cache,
        cache_c
    );
    let (decommits, populates, populated) = os::advice_counts();
    diag!(
        "lgmalloc: stats: {} decommit calls, {} populate calls ({} KiB backed in advance)",
        decommits,
        populates,
        kib(populated as u64)
    );
    diag!(
        "lgmalloc: stats: sampled profile: {} samples ({} followed to their free, {} found their call site by unwinding the stack, {} of them read at a wrapper's learned frame size), {} skipped (no free slot)",
        sample::TAKEN.load(Ordering::Relaxed),
        sample::FOLLOWED.load(Ordering::Relaxed),
        sample::UNWOUND.load(Ordering::Relaxed),
        sample::WRAPPER_SHORTCUTS.load(Ordering::Relaxed),
        sample::SKIPPED.load(Ordering::Relaxed)
    );
    let (r, policy) = (large::reuse_counters(), large::retention());
    diag!(
        "lgmalloc: stats: large cache: {} cached, {} reused, {} gathered, {} missed ({} a longer delay and {} a larger budget would have served), {} evicted, {} expired; reuses within {} MiB of the newest, {} KiB lost to the budget; delay {} ms, floor {} KiB, share of live 1/{}",
        r.puts,
        r.hits,
        r.gathered,
        r.misses,
        r.ghost_expired,
        r.ghost_evicted,
        r.evicted,
        r.expired,
        r.reused_by_depth
            .iter()
            .rposition(|&bytes| bytes > 0)
            .map_or(0, |k| 1u64 << k),
        r.lost_bytes >> 10,
        policy.delay_ms,
        policy.floor >> 10,
        1u64 << policy.live_shift
    );
    diag!(
        "lgmalloc: stats: {:>8} {:>12} {:>10} {:>6}",
        "class",
        "allocs",
        "live",
        "pages"
    );
    for c in s.classes.iter().take(s.class_count as usize) {
        if c.allocations == 0 && c.live_blocks == 0 {
            continue;
        }
        diag!(
            "lgmalloc: stats: {:>8} {:>12} {:>10} {:>6}",
            c.block_size,
            c.allocations,
            c.live_blocks,
            c.pages
        );
    }
}

/// Registers the summary at exit when `LGMALLOC_SHOW_STATS` asks for it. An entry of its
/// own in `.init_array` (before the predictive runtime's, so the summary prints after
/// its reports at exit), so that initialisation knows nothing of reports.
#[used]
#[unsafe(link_section = ".init_array.00100")]
static SUMMARY_AT_EXIT: extern "C" fn(c_int, *const *const c_char, *const *const c_char) =
    register_summary_at_exit;

extern "C" fn register_summary_at_exit(
    _argc: c_int,
    _argv: *const *const c_char,
    _envp: *const *const c_char,
) {
    if init::ensure_initialized() && options::show_stats() {
        // SAFETY: registers a plain function.
        unsafe { libc::atexit(print_summary_at_exit) };
    }
}

extern "C" fn print_summary_at_exit() {
    print_summary();
}
