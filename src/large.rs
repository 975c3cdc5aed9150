//! Large objects: requests above `MAX_SMALL_SIZE` get a mapping of their own.
//!
//! The page before the user pointer holds a header (mapping base and size, alignment,
//! a check word), so no header sits inside user memory and realloc can grow a mapping in
//! place or move it with `mremap` without copying. Mappings start on a 4 MiB boundary so
//! the chunk map can name the chunk of every user pointer without ambiguity, and they
//! cover at least that whole chunk (untouched pages cost no memory), so reading the page
//! before any page-aligned address of the chunk is safe when a wild pointer is checked.

use core::ptr;
use core::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use crate::chunk_map::{self, CHUNK_SHIFT, KIND_LARGE, KIND_LARGE_AT_BASE, KIND_NONE};
use crate::lock::Locked;
use crate::os::{self, OS_PAGE_SIZE};

const CHUNK: usize = 1 << CHUNK_SHIFT;

#[repr(C)]
struct Header {
    /// `user ^ secret`: tells a real header from user data or a stale pointer.
    check: usize,
    map_base: usize,
    map_size: usize,
    /// Bytes the user may use from the user pointer.
    usable: usize,
    /// Alignment the object was allocated with (at least `OS_PAGE_SIZE`).
    align: usize,
    /// True while the user bytes are known to read as zero (a fresh or decommitted
    /// mapping), so calloc can skip clearing them.
    zeroed: bool,
    /// Bytes from `map_base` that may be resident from before this object (a reused
    /// mapping); what the object itself may have touched is added when it is freed.
    touched: usize,
}

/// Freed mappings kept for reuse, so a program that allocates and frees large buffers
/// in a loop neither maps nor faults them in again. Every cached mapping starts on a
/// chunk boundary and is resident up to `touched` bytes from its start.
///
/// A request takes the smallest mapping that fits, and a mapping much bigger than the
/// request gives its chunk-aligned tail back to the cache as a mapping of its own (no
/// system call). When none fits, the pages of cached mappings are moved (`mremap`, no
/// copy, no fault) into a fresh reservation of the requested size, so a request is
/// served from resident memory even when it is bigger than any one freed object.
///
/// Resident cached bytes are bounded by a budget that follows the live large bytes
/// (by default half of them, at least `CACHE_FLOOR`); the oldest mappings go first,
/// and the newest freed one always stays. A freed mapping counts what may be resident
/// in it (all it ever gave out) until the budget is short: then the kernel is asked how
/// much really is (`os::resident_bytes`), so a program that touches the head of big
/// buffers keeps many of them rather than a few it is charged for in full. A mapping
/// unused for the delay (by default `CACHE_DELAY_MS`) is unmapped the next time the
/// cache is used or a heap looks for due purges ([`decay_if_due`]), so after a peak is
/// freed only a floor stays resident, and nothing once the delay has passed. `lg_trim`
/// unmaps everything at once. The budget and the delay are the program's [`Retention`]
/// policy, which the predictive runtime may set at start-up from how earlier runs
/// reused their mappings ([`ReuseCounters`]).
struct CacheInner {
    slots: [Cached; CACHE_SLOTS],
    /// Sum of the slots' `resident` bytes.
    resident: usize,
    /// Coarse milliseconds before which `decay` has nothing to do.
    next_decay_ms: u64,
    /// How the program reuses its mappings (for learning the retention policy).
    counters: ReuseCounters,
    /// The last few mappings unmapped by the budget or the delay, so a miss they would
    /// have served is noticed.
    ghosts: [Ghost; GHOSTS],
    /// Where the next ghost is written (modulo `GHOSTS`).
    next_ghost: usize,
    /// `Cached::seq` of the next mapping cached.
    next_seq: u64,
    /// Mappings this visit gave up, unmapped by [`with_cache`] once the lock is
    /// released: an unmap under the lock made every thread that frees or takes a large
    /// object wait for the system call.
    unmapping: Unmaps,
}

/// Mappings `(base, size)` waiting to be unmapped outside the cache lock. One visit
/// removes each cached mapping at most once and adds at most the one being cached, so
/// `CACHE_SLOTS + 1` entries always suffice; a full list unmaps at once all the same.
#[derive(Clone, Copy)]
struct Unmaps {
    ranges: [(usize, usize); CACHE_SLOTS + 1],
    len: usize,
}

impl Unmaps {
    const NONE: Unmaps = Unmaps {
        ranges: [(0, 0); CACHE_SLOTS + 1],
        len: 0,
    };

    /// Queues a mapping for unmapping.
    ///
    /// # Safety
    /// The mapping is ours, holds nothing live, and nothing will use it again.
    unsafe fn push(&mut self, base: usize, size: usize) {
        match self.ranges.get_mut(self.len) {
            Some(slot) => {
                *slot = (base, size);
                self.len += 1;
            }
            // SAFETY: per the contract, the mapping is ours and holds nothing live.
            None => unsafe { os::unmap(base as *mut u8, size) },
        }
    }

    fn unmap_all(&self) {
        for &(base, size) in self.ranges.iter().take(self.len) {
            // SAFETY: queued mappings are ours, hold nothing live, and left the cache.
            unsafe { os::unmap(base as *mut u8, size) };
        }
    }
}

/// How a program reused its large mappings: counted under the cache lock, for the
/// predictive runtime to shape the retention policy of the next run.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct ReuseCounters {
    /// Freed mappings cached.
    pub puts: u64,
    /// Requests served by one cached mapping (best fit).
    pub hits: u64,
    /// Requests served by gathering the pages of cached mappings.
    pub gathered: u64,
    /// Requests the cache could not serve (a fresh mapping).
    pub misses: u64,
    /// Cached mappings unmapped to keep within the budget.
    pub evicted: u64,
    /// Cached mappings unmapped after the delay, never reused.
    pub expired: u64,
    /// Misses a mapping recently unmapped by the budget would have served.
    pub ghost_evicted: u64,
    /// Misses a mapping unmapped by the delay (or evicted, but older than the delay)
    /// would have served: a longer delay would have kept it.
    pub ghost_expired: u64,
    /// The longest a reused mapping had waited in the cache (ms, at most `MAX_WAIT_MS`).
    pub longest_hit_wait_ms: u32,
    /// The longest a `ghost_expired` mapping had waited since it was cached (ms).
    pub longest_ghost_wait_ms: u32,
    /// Resident bytes of the reused mappings, by how deep each had been in the cache:
    /// entry `k` counts those whose `depth` (the most resident bytes they and the
    /// mappings cached after them held at once while they waited) was at most
    /// `1 MiB << k`, the last entry any deeper. Since the budget pushes the oldest
    /// mappings out first, a budget of `1 MiB << k` would have kept entries `..=k`.
    pub reused_by_depth: [u64; DEPTH_BUCKETS],
    /// Resident bytes of the mappings counted in `ghost_evicted` (reuse the budget
    /// lost, which cost fresh memory and its page faults).
    pub lost_bytes: u64,
    /// CPU time of the process when counted (ms; user and system, all threads): what
    /// the page faults of lost reuses are weighed against.
    pub cpu_ms: u64,
}

/// Entries of `ReuseCounters::reused_by_depth`: depths up to 1 MiB, 2 MiB, ... 64 MiB,
/// and deeper.
pub const DEPTH_BUCKETS: usize = 8;

/// The entry of `ReuseCounters::reused_by_depth` for a mapping reused at `depth` bytes.
pub fn depth_bucket(depth: usize) -> usize {
    let mib = depth.div_ceil(1 << 20).max(1);
    let k = (usize::BITS - (mib - 1).leading_zeros()) as usize;
    k.min(DEPTH_BUCKETS - 1)
}

impl ReuseCounters {
    /// Nothing counted (usable in a `static`, unlike `Default`).
    pub const NONE: ReuseCounters = ReuseCounters {
        puts: 0,
        hits: 0,
        gathered: 0,
        misses: 0,
        evicted: 0,
        expired: 0,
        ghost_evicted: 0,
        ghost_expired: 0,
        longest_hit_wait_ms: 0,
        longest_ghost_wait_ms: 0,
        reused_by_depth: [0; DEPTH_BUCKETS],
        lost_bytes: 0,
        cpu_ms: 0,
    };
}

/// Waits are recorded up to this (a minute: far past any delay the policy may set).
pub const MAX_WAIT_MS: u32 = 60_000;

/// A mapping recently unmapped from the cache: its size and when it was cached.
#[derive(Clone, Copy, Default)]
struct Ghost {
    /// 0 for an empty entry.
    size: usize,
    /// What the budget counted resident in it.
    resident: usize,
    since_ms: u64,
    /// Unmapped by the delay (not by the budget).
    expired: bool,
}

impl Ghost {
    const NONE: Ghost = Ghost {
        size: 0,
        resident: 0,
        since_ms: 0,
        expired: false,
    };
}

/// Unmapped mappings remembered. Enough for the mappings a program with many threads
/// unmaps between one's free and the next request. With 8, mimalloc's test-stress (32
/// threads, each freeing its buffers at exit before the next round asks again) matched
/// 432 of its 1,260 misses to a ghost: the lost reuse the policy weighs was mostly
/// unseen, so each run learned a smaller budget (floor 1 MiB, then none). With 64, 876
/// of 927 matched. 2 KiB, once per process; only a miss (which maps and faults
/// anyway) scans them.
const GHOSTS: usize = 64;

/// How long cached mappings are kept and how many resident bytes they may hold: the
/// delay after which an unused one is unmapped, and the budget, the larger of `floor`
/// and the live large bytes shifted right by `live_shift`. Set by the predictive
/// runtime at start-up ([`set_retention`]), from what earlier runs observed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Retention {
    pub delay_ms: u32,
    pub floor: usize,
    pub live_shift: u32,
}

impl Retention {
    /// The policy of a program nothing is known about.
    pub const DEFAULT: Retention = Retention {
        delay_ms: CACHE_DELAY_MS as u32,
        floor: CACHE_FLOOR,
        live_shift: 1,
    };
}

impl Default for Retention {
    fn default() -> Self {
        Retention::DEFAULT
    }
}

/// The bounds [`set_retention`] keeps a policy within.
pub const MIN_DELAY_MS: u32 = 100;
pub const MAX_DELAY_MS: u32 = 5_000;
pub const MAX_FLOOR: usize = 256 << 20;
pub const MAX_LIVE_SHIFT: u32 = 8;

/// The policy in force (see [`Retention`]); written only at start-up.
static DELAY_MS: AtomicU32 = AtomicU32::new(CACHE_DELAY_MS as u32);
static FLOOR: AtomicUsize = AtomicUsize::new(CACHE_FLOOR);
static LIVE_SHIFT: AtomicU32 = AtomicU32::new(1);

/// Puts `r` in force, within the bounds above (start-up, before threads run).
pub fn set_retention(r: Retention) {
    DELAY_MS.store(
        r.delay_ms.clamp(MIN_DELAY_MS, MAX_DELAY_MS),
        Ordering::Relaxed,
    );
    FLOOR.store(r.floor.min(MAX_FLOOR), Ordering::Relaxed);
    LIVE_SHIFT.store(r.live_shift.min(MAX_LIVE_SHIFT), Ordering::Relaxed);
}

/// The policy in force.
pub fn retention() -> Retention {
    Retention {
        delay_ms: DELAY_MS.load(Ordering::Relaxed),
        floor: FLOOR.load(Ordering::Relaxed),
        live_shift: LIVE_SHIFT.load(Ordering::Relaxed),
    }
}

fn delay_ms() -> u64 {
    DELAY_MS.load(Ordering::Relaxed) as u64
}

#[derive(Clone, Copy, Default)]
struct Cached {
    /// Chunk-aligned start; 0 for an empty slot.
    base: usize,
    size: usize,
    /// Bytes from `base` that may be resident (the rest was never touched) or read
    /// other than zero.
    touched: usize,
    /// Resident bytes the budget counts: `touched`, or fewer where the kernel said so.
    resident: usize,
    /// Of those, the OS pages in each chunk from `base` (where they lie decides whether
    /// the mapping is worth splitting).
    chunk_pages: ChunkPages,
    /// When it was cached (coarse monotonic milliseconds).
    since_ms: u64,
    /// The order it was cached in (the budget pushes the lowest out first).
    seq: u64,
    /// The most resident bytes this mapping and the ones cached no earlier held at
    /// once while it waited: the budget it needed to stay cached ([`CacheInner::deepen`]).
    depth: usize,
}

/// OS pages that may be resident in each chunk of a cached mapping.
type ChunkPages = [u16; MAX_CACHED_CHUNKS];
const MAX_CACHED_CHUNKS: usize = CACHE_MAX_MAPPING / CHUNK;

const CACHE_SLOTS: usize = 32;
/// Slots in use, readable without the lock (so thread exit skips an empty cache).
static CACHE_USED: AtomicUsize = AtomicUsize::new(0);
/// The cache's resident bytes, readable without the lock (a freeing thread decides
/// whether asking the kernel is worth a system call).
static CACHE_RESIDENT: AtomicUsize = AtomicUsize::new(0);
/// Mappings larger than this are never cached.
const CACHE_MAX_MAPPING: usize = 64 << 20;
/// Resident bytes the cache may keep however few large objects are live (by default:
/// see [`Retention`]).
const CACHE_FLOOR: usize = 16 << 20;
/// A cached mapping unused for this long is unmapped (by default).
const CACHE_DELAY_MS: u64 = 500;
/// Cached mappings with fewer resident bytes are not worth an `mremap` to gather.
const MIN_GATHER: usize = 256 << 10;

static CACHE: Locked<CacheInner> = Locked::new(CacheInner {
    slots: [Cached {
        base: 0,
        size: 0,
        touched: 0,
        resident: 0,
        chunk_pages: [0; MAX_CACHED_CHUNKS],
        since_ms: 0,
        seq: 0,
        depth: 0,
    }; CACHE_SLOTS],
    next_seq: 0,
    unmapping: Unmaps::NONE,
    resident: 0,
    next_decay_ms: 0,
    counters: ReuseCounters::NONE,
    ghosts: [Ghost::NONE; GHOSTS],
    next_ghost: 0,
});

/// Runs `f` on the cache with its lock held, then unmaps what it gave up (which a
/// `fork` meanwhile waits for: see `lock_for_fork`).
fn with_cache<R>(f: impl FnOnce(&mut CacheInner) -> R) -> R {
    CACHE.with_then(
        |c| {
            let result = f(c);
            let unmapping = (c.unmapping.len != 0).then_some(c.unmapping);
            c.unmapping.len = 0;
            (result, unmapping)
        },
        |u| u.unmap_all(),
    )
}

/// Lock hooks for `fork`: a thread caching or taking a mapping while another forks
/// must not leave the child's cache locked, nor the child holding mappings that thread
/// had taken out of the cache to unmap (the child has no such thread, and nothing of
/// the child's refers to them).
pub fn lock_for_fork() {
    CACHE.lock_for_fork();
}
pub fn unlock_after_fork(child: bool) {
    CACHE.unlock_after_fork(child);
}

/// Acquisitions of this layer's lock so far, and the contended ones (statistics).
pub fn lock_counts() -> (u64, u64) {
    CACHE.lock_counts()
}

/// A chunk-aligned mapping of at least `needed` bytes (a page multiple) made from
/// cached ones, as `(base, size, touched)`, for an object that uses its first `used`
/// bytes; `None` when the cache cannot help.
fn cache_take(needed: usize, used: usize) -> Option<(usize, usize, usize)> {
    with_cache(|c| {
        let now = os::now_ms();
        c.decay(now);
        if let Some(i) = c.best_fit(needed) {
            let e = c.remove(i);
            c.counters.hits += 1;
            c.note_wait(now, e.since_ms);
            c.note_reuse(&e, used);
            let e = c.split_tail(e, needed);
            return Some((e.base, e.size, e.touched));
        }
        let gathered = c.gather(needed, used, now);
        if gathered.is_some() {
            c.counters.gathered += 1;
        } else {
            c.counters.misses += 1;
            c.match_ghost(needed, now);
        }
        gathered
    })
}

/// Resident bytes the cache may hold now.
fn cache_budget() -> usize {
    let live = LIVE_BYTES.load(Ordering::Relaxed);
    let share = live
        .checked_shr(LIVE_SHIFT.load(Ordering::Relaxed))
        .unwrap_or(0);
    FLOOR.load(Ordering::Relaxed).max(share)
}

/// Keeps a freed mapping with `touched` possibly resident bytes for reuse. False when
/// it is too big to cache (the caller unmaps it).
fn cache_put(base: usize, size: usize, touched: usize) -> bool {
    if size > CACHE_MAX_MAPPING {
        return false;
    }
    // Charged in full while that fits and the mapping is one chunk; measured (outside
    // the lock) once it would push older mappings out, or could be split.
    let measure =
        touched > CHUNK || CACHE_RESIDENT.load(Ordering::Relaxed) + touched > cache_budget();
    let chunk_pages = residency(base, touched, measure);
    let resident = chunk_pages.iter().map(|&n| n as usize).sum::<usize>() * OS_PAGE_SIZE;
    with_cache(|c| {
        let now = os::now_ms();
        c.decay(now);
        let budget = cache_budget();
        // The newest mapping is the likeliest to be reused: older ones make room.
        while c.resident + resident > budget && c.evict_oldest() {}
        if !c.slots.iter().any(|s| s.base == 0) {
            c.evict_oldest();
        }
        c.counters.puts += 1;
        c.insert(Cached {
            base,
            size,
            touched,
            resident,
            chunk_pages,
            since_ms: now,
            seq: c.next_seq,
            depth: 0,
        });
        c.next_seq += 1;
        true
    })
}

/// The pages of each chunk of `[base, base + touched)` that may be resident: all of
/// them, or, when `measure`, those the kernel reports (one system call per chunk).
fn residency(base: usize, touched: usize, measure: bool) -> ChunkPages {
    let mut pages = [0u16; MAX_CACHED_CHUNKS];
    for (k, n) in pages.iter_mut().enumerate() {
        let len = touched.saturating_sub(k * CHUNK).min(CHUNK);
        if len == 0 {
            break;
        }
        let bytes = if measure {
            os::resident_bytes((base + k * CHUNK) as *mut u8, len).map_or(len, |r| r.min(len))
        } else {
            len
        };
        // At most CHUNK / OS_PAGE_SIZE = 1024.
        *n = bytes.div_ceil(OS_PAGE_SIZE) as u16;
    }
    pages
}

impl CacheInner {
    /// The smallest cached mapping of at least `needed` bytes, the newest of those: the
    /// older ones are the first the budget and the delay give back.
    fn best_fit(&self, needed: usize) -> Option<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.base != 0 && s.size >= needed)
            .min_by_key(|(_, s)| (s.size, u64::MAX - s.seq))
            .map(|(i, _)| i)
    }

    fn remove(&mut self, i: usize) -> Cached {
        let e = self
            .slots
            .get_mut(i)
            .map(core::mem::take)
            .unwrap_or_default();
        if e.base != 0 {
            CACHE_USED.fetch_sub(1, Ordering::Relaxed);
        }
        self.resident -= e.resident;
        CACHE_RESIDENT.store(self.resident, Ordering::Relaxed);
        e
    }

    /// Stores `e` in a free slot, or unmaps it when there is none.
    fn insert(&mut self, e: Cached) {
        match self.slots.iter_mut().find(|s| s.base == 0) {
            Some(slot) => {
                *slot = e;
                self.resident += e.resident;
                CACHE_RESIDENT.store(self.resident, Ordering::Relaxed);
                CACHE_USED.fetch_add(1, Ordering::Relaxed);
                self.deepen();
                // Due no later than this mapping is (an earlier due time stands).
                let due = e.since_ms + delay_ms() + 1;
                let was = DECAY_DUE.load(Ordering::Relaxed);
                if was == 0 || due < was {
                    DECAY_DUE.store(due, Ordering::Relaxed);
                }
            }
            None => {
                self.counters.evicted += 1;
                self.remember(&e, false);
                // SAFETY: a cached mapping is ours and holds nothing live.
                unsafe { self.unmapping.push(e.base, e.size) };
            }
        }
    }

    /// Counts how long a reused mapping cached at `since` waited.
    fn note_wait(&mut self, now: u64, since: u64) {
        let wait = now.saturating_sub(since).min(MAX_WAIT_MS as u64) as u32;
        let longest = &mut self.counters.longest_hit_wait_ms;
        *longest = (*longest).max(wait);
    }

    /// Counts a mapping just reused by an object that uses `used` bytes of it, by its
    /// depth: its resident bytes the object may use, at most (the page faults saved).
    fn note_reuse(&mut self, e: &Cached, used: usize) {
        let r = &mut self.counters;
        if let Some(n) = r.reused_by_depth.get_mut(depth_bucket(e.depth)) {
            *n = n.saturating_add(e.resident.min(used) as u64);
        }
    }

    /// Raises each cached mapping's `depth` to the resident bytes it and the mappings
    /// cached after it hold now (after an insertion: the only time those grow).
    fn deepen(&mut self) {
        // (order cached in, slot) of every cached mapping, newest first.
        let mut order = [(0u64, 0usize); CACHE_SLOTS];
        let mut n = 0;
        for (i, s) in self.slots.iter().enumerate() {
            if s.base != 0
                && let Some(o) = order.get_mut(n)
            {
                *o = (s.seq, i);
                n += 1;
            }
        }
        let order = order.get_mut(..n).unwrap_or_default();
        order.sort_unstable_by_key(|o| core::cmp::Reverse(o.0));
        let mut above = 0;
        for &(_, i) in order.iter() {
            if let Some(s) = self.slots.get_mut(i) {
                above += s.resident;
                s.depth = s.depth.max(above);
            }
        }
    }

    /// Remembers the cached mapping `e`, just unmapped.
    fn remember(&mut self, e: &Cached, expired: bool) {
        if let Some(g) = self.ghosts.get_mut(self.next_ghost % GHOSTS) {
            *g = Ghost {
                size: e.size,
                resident: e.resident,
                since_ms: e.since_ms,
                expired,
            };
        }
        self.next_ghost = self.next_ghost.wrapping_add(1);
    }

    /// After a miss for `needed` bytes: counts the smallest recently unmapped mapping
    /// that would have served it (best fit, as the cache would have), and forgets it.
    /// One that had waited past the delay needed a longer delay, whatever unmapped it;
    /// one that had not was lost to the budget. Mappings older than the longest delay
    /// the policy may set are not counted: no policy would have kept them.
    fn match_ghost(&mut self, needed: usize, now: u64) {
        let delay = delay_ms();
        let fits = self
            .ghosts
            .iter_mut()
            .filter(|g| g.size >= needed && now.saturating_sub(g.since_ms) <= MAX_DELAY_MS as u64)
            .min_by_key(|g| g.size);
        let Some(g) = fits else {
            return;
        };
        let ghost = core::mem::take(g);
        let wait = now.saturating_sub(ghost.since_ms);
        if ghost.expired || wait > delay {
            self.counters.ghost_expired += 1;
            let longest = &mut self.counters.longest_ghost_wait_ms;
            *longest = (*longest).max(wait as u32);
        } else {
            self.counters.ghost_evicted += 1;
            let lost = &mut self.counters.lost_bytes;
            *lost = lost.saturating_add(ghost.resident as u64);
        }
    }

    /// Keeps the chunks of `e` past the first `needed` bytes cached as a mapping of
    /// their own when they make at least one chunk and hold resident memory worth
    /// keeping apart; returns the part to use.
    ///
    /// A tail with little resident (address space, a page or two its last user wrote)
    /// stays with the request: cached alone it would serve a later request whose head
    /// faults in anew, where the whole mapping keeps its resident head for the next
    /// user.
    fn split_tail(&mut self, mut e: Cached, needed: usize) -> Cached {
        let Some(keep) = os::align_up(needed, CHUNK) else {
            return e;
        };
        if e.size < keep + CHUNK {
            return e;
        }
        let k = keep / CHUNK;
        let mut tail_pages = [0u16; MAX_CACHED_CHUNKS];
        for (i, n) in e.chunk_pages.iter_mut().skip(k).enumerate() {
            if let Some(t) = tail_pages.get_mut(i) {
                *t = core::mem::take(n);
            }
        }
        let tail_resident = tail_pages.iter().map(|&n| n as usize).sum::<usize>() * OS_PAGE_SIZE;
        if tail_resident < MIN_GATHER {
            // Put back what was moved out: the mapping stays whole.
            for (n, t) in e.chunk_pages.iter_mut().skip(k).zip(tail_pages) {
                *n = t;
            }
            return e;
        }
        self.insert(Cached {
            base: e.base + keep,
            size: e.size - keep,
            touched: e.touched.saturating_sub(keep),
            resident: tail_resident,
            chunk_pages: tail_pages,
            since_ms: e.since_ms,
            seq: e.seq,
            depth: e.depth,
        });
        e.size = keep;
        e.touched = e.touched.min(keep);
        e.resident = e.resident.saturating_sub(tail_resident);
        e
    }

    /// Moves the pages of cached mappings, most resident first, into a fresh
    /// reservation of `needed` bytes; the rest of it is fresh zeroed memory.
    fn gather(&mut self, needed: usize, used: usize, now: u64) -> Option<(usize, usize, usize)> {
        // Nothing worth moving: the caller maps fresh memory, and the request counts as
        // a miss, not as a reuse.
        if self.resident < MIN_GATHER || self.most_resident(needed).is_none() {
            return None;
        }
        let dest = os::map_aligned(needed, CHUNK) as usize;
        if dest == 0 {
            return None;
        }
        let (mut filled, mut touched) = (0, 0);
        while filled < needed {
            let Some(i) = self.most_resident(needed - filled) else {
                break;
            };
            let e = self.remove(i);
            self.note_wait(now, e.since_ms);
            self.note_reuse(&e, used.saturating_sub(filled));
            let moved = e.size;
            // SAFETY: a cached mapping is ours and holds nothing live; the destination
            // is our reservation, still unused there.
            if unsafe { os::remap_to(e.base as *mut u8, moved, (dest + filled) as *mut u8, moved) }
            {
                touched = filled + e.touched.min(moved);
            } else {
                // SAFETY: as above; the pages could not move, so they go back.
                unsafe { self.unmapping.push(e.base, moved) };
            }
            filled += moved;
        }
        Some((dest, needed, touched))
    }

    /// The cached mapping of at most `room` bytes with the most resident bytes, if
    /// that is worth moving. Mappings are moved whole: moving part of one would leave
    /// a rest that does not start on a chunk boundary and could only be unmapped.
    fn most_resident(&self, room: usize) -> Option<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.base != 0 && s.size <= room && s.resident >= MIN_GATHER)
            .max_by_key(|(_, s)| s.resident)
            .map(|(i, _)| i)
    }

    /// Unmaps the mapping cached longest ago. False when the cache is empty.
    fn evict_oldest(&mut self) -> bool {
        let oldest = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.base != 0)
            .min_by_key(|(_, s)| s.seq)
            .map(|(i, _)| i);
        let Some(i) = oldest else {
            return false;
        };
        let e = self.remove(i);
        self.counters.evicted += 1;
        self.remember(&e, false);
        // SAFETY: a cached mapping is ours and holds nothing live.
        unsafe { self.unmapping.push(e.base, e.size) };
        true
    }

    /// Unmaps the mappings that have waited longer than the delay. Runs at most a few
    /// times per delay, so a busy cache does not scan on every call.
    fn decay(&mut self, now: u64) {
        if now < self.next_decay_ms {
            return;
        }
        let delay = delay_ms();
        self.next_decay_ms = now + delay / 4;
        let mut oldest = u64::MAX;
        for i in 0..CACHE_SLOTS {
            let Some(&Cached { base, since_ms, .. }) = self.slots.get(i) else {
                continue;
            };
            if base == 0 {
                continue;
            }
            if now.saturating_sub(since_ms) <= delay {
                oldest = oldest.min(since_ms);
                continue;
            }
            let e = self.remove(i);
            self.counters.expired += 1;
            self.remember(&e, true);
            // SAFETY: a cached mapping is ours and holds nothing live.
            unsafe { self.unmapping.push(e.base, e.size) };
        }
        let due = if oldest == u64::MAX {
            0
        } else {
            oldest + delay + 1
        };
        DECAY_DUE.store(due, Ordering::Relaxed);
    }
}

/// Unmaps every cached mapping (for `lg_trim`). Returns the resident bytes released.
pub fn cache_release() -> usize {
    with_cache(|c| {
        DECAY_DUE.store(0, Ordering::Relaxed);
        let released = c.resident;
        for s in c.slots.iter_mut() {
            if s.base != 0 {
                // SAFETY: cached mappings are ours and hold nothing live.
                unsafe { c.unmapping.push(s.base, s.size) };
                *s = Cached::default();
            }
        }
        c.resident = 0;
        CACHE_USED.store(0, Ordering::Relaxed);
        CACHE_RESIDENT.store(0, Ordering::Relaxed);
        released
    })
}

/// When the oldest cached mapping will have waited out the delay (coarse milliseconds,
/// an upper bound: a mapping taken since may have been the oldest); zero when nothing
/// is cached. Written under the cache lock, read without it by [`decay_if_due`].
static DECAY_DUE: AtomicU64 = AtomicU64::new(0);

/// Unmaps the cached mappings that have waited out the delay, if one may have: called
/// where heaps look for due purges, so a program that stops using large objects gives
/// them back once the delay has passed instead of at its next large allocation (a
/// Python script kept 2.4 MB cached to its exit, 1.5 s after its last large free).
/// Costs one relaxed load when nothing is cached, and a clock read when something is.
pub fn decay_if_due() {
    let due = DECAY_DUE.load(Ordering::Relaxed);
    if due == 0 {
        return;
    }
    let now = os::now_ms();
    if now >= due {
        decay_at(now);
    }
}

/// Unmaps the cached mappings that have waited out the delay at `now`, however soon
/// after the last such pass.
fn decay_at(now: u64) {
    with_cache(|c| {
        c.next_decay_ms = 0;
        c.decay(now);
    });
}

/// Unmaps the cached mappings that have waited out the delay (at thread exit, so a
/// program whose threads stop using large objects does not keep them until its next
/// large allocation).
pub fn cache_decay_now() {
    if CACHE_USED.load(Ordering::Relaxed) != 0 {
        decay_at(os::now_ms());
    }
}

/// How the program has reused its large mappings so far (statistics, learning).
pub fn reuse_counters() -> ReuseCounters {
    let mut r = with_cache(|c| c.counters);
    r.cpu_ms = os::cpu_time_ms();
    r
}

/// Starts the reuse counters (and the unmapped mappings a miss is matched against)
/// afresh: at the end of start-up, so that what the analysis before `main` allocated
/// and freed is not learned as the program's own.
pub fn reset_reuse_counters() {
    with_cache(|c| {
        c.counters = ReuseCounters::NONE;
        c.ghosts = [Ghost::NONE; GHOSTS];
    });
}

/// Bytes of cached mappings, and how many of them may be resident (statistics).
pub fn cache_figures() -> (usize, usize) {
    with_cache(|c| (c.slots.iter().map(|s| s.size).sum(), c.resident))
}

/// True when the bytes of the large object at `p` are known to be zero.
pub fn known_zero(p: usize, kind: u8) -> bool {
    // SAFETY: live header.
    lookup(p, kind).is_some_and(|h| unsafe { (*h).zeroed })
}

/// Live large objects and their bytes (statistics).
pub static LIVE_COUNT: AtomicUsize = AtomicUsize::new(0);
pub static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);

fn check_word(user: usize) -> usize {
    user ^ crate::secret::get()
}

#[inline]
fn header_of(user: usize) -> *mut Header {
    (user - OS_PAGE_SIZE) as *mut Header
}

/// Allocates `size` bytes aligned to `align` (any power of two). Null + ENOMEM on
/// failure. The caller has initialised the allocator (the check word needs the secret).
pub fn alloc(size: usize, align: usize) -> *mut u8 {
    let align = align.max(OS_PAGE_SIZE);
    let user = if align < CHUNK {
        map_below_chunk(size, align)
    } else {
        map_chunk_aligned(size, align)
    };
    if user == 0 {
        crate::diag::report_os_failure(size);
        os::set_errno(libc::ENOMEM);
        return ptr::null_mut();
    }
    user as *mut u8
}

/// Mapping starts on a chunk boundary; the user pointer is `align` past it.
fn map_below_chunk(size: usize, align: usize) -> usize {
    let Some(map_size) = mapping_size(align, size) else {
        return 0;
    };
    if let Some((base, cached_size, touched)) = cache_take(map_size, align + size) {
        let user = finish(base, cached_size, base + align, size, align, KIND_LARGE);
        if user != 0 {
            // SAFETY: `finish` wrote the header of this live object.
            unsafe {
                (*header_of(user)).zeroed = touched <= align;
                (*header_of(user)).touched = touched;
            }
        }
        return user;
    }
    let base = os::map_aligned(map_size, CHUNK);
    if base.is_null() {
        return 0;
    }
    finish(
        base as usize,
        map_size,
        base as usize + align,
        size,
        align,
        KIND_LARGE,
    )
}

/// Bytes to map for `size` bytes at offset `offset` from a chunk-aligned base: whole
/// chunks. The pages past the object are never touched (address space only), and a
/// mapping of whole chunks lets the kernel place the next one right below it, aligned,
/// so `os::map_aligned` needs one system call instead of four.
fn mapping_size(offset: usize, size: usize) -> Option<usize> {
    os::align_up(offset.checked_add(size)?, CHUNK)
}

/// Alignment of 4 MiB or more: the user pointer is a chunk base and the header page
/// sits just before it.
fn map_chunk_aligned(size: usize, align: usize) -> usize {
    let Some(over) = size
        .checked_add(align)
        .and_then(|n| n.checked_add(OS_PAGE_SIZE))
        .and_then(|n| os::align_up(n, OS_PAGE_SIZE))
    else {
        return 0;
    };
    let raw = os::map(over);
    if raw.is_null() {
        return 0;
    }
    let raw = raw as usize;
    let user = (raw + OS_PAGE_SIZE + align - 1) & !(align - 1);
    let base = user - OS_PAGE_SIZE;
    let Some(end) = os::align_up(user + size.max(1), OS_PAGE_SIZE) else {
        return 0;
    };
    // SAFETY: head and tail are parts of our fresh mapping outside [base, end).
    unsafe {
        os::unmap(raw as *mut u8, base - raw);
        os::unmap(end as *mut u8, raw + over - end);
    }
    finish(base, end - base, user, size, align, KIND_LARGE_AT_BASE)
}

fn finish(base: usize, map_size: usize, user: usize, size: usize, align: usize, kind: u8) -> usize {
    let usable = os::align_up(size.max(1), OS_PAGE_SIZE).unwrap_or(size);
    if !chunk_map::set_kind(user, kind) {
        // SAFETY: our fresh mapping.
        unsafe { os::unmap(base as *mut u8, map_size) };
        return 0;
    }
    // SAFETY: the header page lies inside our fresh mapping.
    unsafe {
        header_of(user).write(Header {
            check: check_word(user),
            map_base: base,
            map_size,
            usable,
            align,
            zeroed: true,
            touched: 0,
        });
    }
    LIVE_COUNT.fetch_add(1, Ordering::Relaxed);
    LIVE_BYTES.fetch_add(usable, Ordering::Relaxed);
    user
}

/// The header of `p` if `p` is exactly a live large object's user pointer.
fn lookup(p: usize, kind: u8) -> Option<*mut Header> {
    let offset = p & (CHUNK - 1);
    let plausible = match kind {
        KIND_LARGE => p.is_multiple_of(OS_PAGE_SIZE) && offset >= OS_PAGE_SIZE,
        KIND_LARGE_AT_BASE => offset == 0,
        _ => false,
    };
    if !plausible {
        return None;
    }
    let h = header_of(p);
    // SAFETY: for a plausible pointer the page before `p` belongs to the mapping whose
    // user pointer lies in this chunk: its header page, or for an interior page-aligned
    // pointer, the object's own memory. Either is mapped; the check word decides.
    let check = unsafe { (*h).check };
    if check == check_word(p) {
        Some(h)
    } else {
        None
    }
}

/// Frees a large object. Returns false when `p` is not one (the caller reports misuse).
pub fn free(p: usize, kind: u8) -> bool {
    let Some(h) = lookup(p, kind) else {
        return false;
    };
    // SAFETY: `h` is the live header of `p`'s mapping.
    let (base, size, usable, touched) = unsafe {
        (*h).check = 0;
        ((*h).map_base, (*h).map_size, (*h).usable, (*h).touched)
    };
    let touched = touched.max(p - base + usable).min(size);
    chunk_map::set_kind(p, KIND_NONE);
    LIVE_COUNT.fetch_sub(1, Ordering::Relaxed);
    LIVE_BYTES.fetch_sub(usable, Ordering::Relaxed);
    // Mappings placed for alignments of 4 MiB and more do not start on a chunk
    // boundary and are not reused.
    if kind == KIND_LARGE && cache_put(base, size, touched) {
        return true;
    }
    // SAFETY: the whole mapping belongs to this object, which the caller gave up.
    unsafe { os::unmap(base as *mut u8, size) };
    true
}

/// Bytes usable at `p` (a live large object).
pub fn usable_size(p: usize, kind: u8) -> usize {
    match lookup(p, kind) {
        // SAFETY: live header.
        Some(h) => unsafe { (*h).usable },
        None => 0,
    }
}

/// Resizes a large object in place or by moving its pages. Returns the new user
/// pointer, or null when it cannot (the caller then copies; `p` stays valid).
pub fn realloc_in_place_or_move(p: usize, kind: u8, new_size: usize) -> *mut u8 {
    let Some(h) = lookup(p, kind) else {
        return ptr::null_mut();
    };
    // SAFETY: live header.
    let (base, map_size, usable, align, touched) = unsafe {
        (
            (*h).map_base,
            (*h).map_size,
            (*h).usable,
            (*h).align,
            (*h).touched,
        )
    };
    let offset = p - base;
    let Some(new_usable) = os::align_up(new_size.max(1), OS_PAGE_SIZE) else {
        return ptr::null_mut();
    };
    let Some(new_map) = mapping_size(offset, new_size) else {
        return ptr::null_mut();
    };
    if offset + new_usable <= map_size {
        resize_within(h, p, base, map_size, new_map, usable, new_usable);
        return p as *mut u8;
    }
    if kind != KIND_LARGE {
        return ptr::null_mut();
    }
    // Grow: reserve a chunk-aligned destination and move the pages there.
    let dest = os::map_aligned(new_map, CHUNK);
    if dest.is_null() {
        return ptr::null_mut();
    }
    // Forget the old chunk before its pages move away: once they are gone another
    // thread may map that chunk and record it.
    chunk_map::set_kind(p, KIND_NONE);
    // SAFETY: the old mapping is ours and whole; `dest` is our fresh reservation.
    if !unsafe { os::remap_to(base as *mut u8, map_size, dest, new_map) } {
        chunk_map::set_kind(p, KIND_LARGE);
        // SAFETY: our fresh reservation.
        unsafe { os::unmap(dest, new_map) };
        return ptr::null_mut();
    }
    let new_user = dest as usize + offset;
    chunk_map::set_kind(new_user, KIND_LARGE);
    // SAFETY: the header moved with the pages.
    unsafe {
        header_of(new_user).write(Header {
            check: check_word(new_user),
            map_base: dest as usize,
            map_size: new_map,
            usable: new_usable,
            align,
            zeroed: false,
            touched: touched.max(offset + usable),
        });
    }
    LIVE_BYTES.fetch_add(new_usable - usable, Ordering::Relaxed);
    new_user as *mut u8
}

/// Grows or shrinks within the current mapping; a shrink gives the tail back.
fn resize_within(
    h: *mut Header,
    p: usize,
    base: usize,
    map_size: usize,
    new_map: usize,
    usable: usize,
    new_usable: usize,
) {
    if new_usable < usable {
        // SAFETY: the bytes past the new size are ours and hold nothing the caller keeps.
        unsafe {
            if new_map < map_size {
                os::unmap((base + new_map) as *mut u8, map_size - new_map);
                (*h).map_size = new_map;
                (*h).touched = (*h).touched.min(new_map);
            }
            let keep_end = (base + new_map).min(p + usable);
            if keep_end > p + new_usable {
                let bytes = keep_end - p - new_usable;
                // Both ends are page-aligned: the call drops all of it or (refused)
                // nothing. Bytes it left stay counted, so a later reuse of the mapping
                // is not taken for zero (`known_zero`).
                if os::decommit((p + new_usable) as *mut u8, bytes) < bytes {
                    (*h).touched = (*h).touched.max(keep_end - base);
                }
            }
        }
        LIVE_BYTES.fetch_sub(usable - new_usable, Ordering::Relaxed);
    } else {
        LIVE_BYTES.fetch_add(new_usable - usable, Ordering::Relaxed);
    }
    // SAFETY: live header.
    unsafe { (*h).usable = new_usable };
}
