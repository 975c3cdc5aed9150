//! The sampled allocation profile: about one allocation per 256 KiB allocated, always on.
//!
//! Each thread heap counts down, per request bucket and per class, the allocations
//! before its next sample (`Heap::bucket_left`, `Heap::class_left`: one decrement,
//! which also counts the allocation, and one branch on the malloc fast path); the
//! intervals are drawn in bytes and counted in allocations of the bucket's largest size
//! or the class's block size, and a sample of a smaller request is kept with chance
//! size / unit ([`keep_thinned`]), so sampling is per byte asked for. When the count runs out the
//! allocation is recorded here, and when the sample is followed to its free (always
//! for blocks up to [`FOLLOW_BYTES`], a share of larger ones) it is served from a slot
//! of a separate arena whose chunks the chunk map marks `KIND_SAMPLE`: `free` already
//! leaves its fast path for any chunk that is not a segment, so a sampled block costs
//! the free fast path nothing, and its free records the block's lifetime.
//!
//! Intervals are exponential with mean [`MEAN_INTERVAL`] (as TCMalloc's heap sampler
//! draws them), so every byte has the same chance of being sampled whatever the pattern
//! of sizes. A sample keeps the size, alignment, thread, the return addresses of the call
//! (module-independent resolution happens at exit, in `predict`) and, once freed, its
//! lifetime. Memory is bounded: [`SLOTS`] live samples, [`SITES`] distinct call stacks,
//! all in `.bss` or one arena mapped on the first sample. No lock: slots and site entries
//! are claimed with compare-and-swap, so threads and `fork` need nothing more.

use core::ffi::{c_int, c_void};
use core::sync::atomic::{
    AtomicBool, AtomicPtr, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering,
};

use crate::{chunk_map, os, secret, size_class};

/// Mean bytes between two samples.
pub const MEAN_INTERVAL: usize = 256 * 1024;
/// Live sampled blocks at most (a sample is skipped while all slots are taken).
pub const SLOTS: usize = 256;
/// log2 of a slot's size: one slot holds the largest small block.
const SLOT_SHIFT: usize = 18;
const ARENA_BYTES: usize = SLOTS << SLOT_SHIFT;
/// Samples of blocks up to this size are all followed to their free (served from a
/// slot); a larger block's sample is followed with probability `FOLLOW_BYTES / usable`,
/// else the heap serves it and only its call is recorded. Sampling is per byte, so
/// large blocks are sampled often (a 64 KiB block one time in five), and a followed
/// sample takes its bytes from a slot instead of the heap's recently freed, cache-warm
/// memory: following them all put 28% of `realloc-grow`'s bytes (buffers grown by
/// `realloc` up to 256 KiB) in the arena, and it ran in 0.33 s with 10.2k page faults
/// against 0.25 s and 4.6k with sampling off. Followed this way, a sample brings at
/// most `FOLLOW_BYTES` into the arena on average, and each size still has its
/// lifetimes measured, from fewer samples. The plan reads lifetimes for sizes up to
/// `size_class::TABLE_MAX_SIZE`, which are all followed.
const FOLLOW_BYTES: usize = 8 << 10;
const _: () = assert!(FOLLOW_BYTES >= size_class::TABLE_MAX_SIZE);
/// Distinct call stacks recorded at most (later new stacks are counted, not kept).
pub const SITES: usize = 1024;
/// Return addresses kept per call stack (lgmalloc's own frames included; `predict`
/// skips them and known wrappers when it resolves the call site).
pub const FRAMES: usize = 8;
/// Size classes whose samples a call stack counts apart (standard classes, the first
/// ones seen); samples of other classes count only in its total.
pub const SITE_CLASSES: usize = 4;
/// Frames of the unwinder's own walk before the first one worth keeping.
const SKIP_FRAMES: usize = 1;
/// Alignment of every block (`request::MIN_ALIGN`, which sits above this layer).
const MIN_ALIGN: usize = 16;
/// Resident bytes that free slots may keep past their first page; a free beyond it
/// gives the slot's pages back at once. Sampling is per byte, so large blocks are
/// sampled often, and a sampled block that lands in a clean slot faults in every page
/// it writes where the heap would have reused resident memory: a sampled free that
/// decommits is a refault at a later sample. Under mimalloc's test-stress (32 threads,
/// blocks up to 160 KiB) a budget of 4 MiB decommitted about 5,900 slots (250 MiB, most
/// of the run's madvise calls) and took 270-300k page faults and 6.6 s; with no bound,
/// 180-200k faults and 5.1 s. Kept slots are reused first (best fit), so the ones that are
/// not taken again soon are the excess, and those go after [`SLOT_PURGE_DELAY_MS`].
const DIRTY_BUDGET: usize = 32 << 20;
/// How long a free slot keeps its pages before a purge pass gives them back
/// ([`purge_if_due`]): the region's shortest purge delay, so what sampled frees keep
/// leaves with the rest of a freed peak.
const SLOT_PURGE_DELAY_MS: u64 = crate::segment::PURGE_DELAY_MS;
const _: () = assert!(DIRTY_BUDGET <= ARENA_BYTES / 2);
/// Kept bytes past a sampled block's last page that its slot may keep while the block
/// lives; more are given back when the slot is taken (one `madvise`, at most once per
/// sample).
const PINNED_EXCESS: usize = 64 << 10;

const SLOT_FREE: u8 = 0;
const SLOT_BUSY: u8 = 1;
const SLOT_LIVE: u8 = 2;

/// One live sampled block (fields written by the claiming thread before `LIVE` is
/// published with Release, read after an Acquire claim).
struct Slot {
    state: AtomicU8,
    usable: AtomicUsize,
    class: AtomicUsize,
    site: AtomicUsize,
    born_ns: AtomicU64,
    /// Bytes from the slot's start that may be resident, whole pages (written by the
    /// slot's holder).
    resident: AtomicUsize,
    /// Bytes from the start of the live block that may be non-zero: what was resident
    /// when the slot was claimed (the rest was never used or was decommitted since).
    dirty_prefix: AtomicUsize,
    /// When a free last kept the slot's pages (`os::now_ms`), for [`purge_if_due`].
    kept_since_ms: AtomicU64,
}

/// One call stack and what its samples saw.
pub struct SiteEntry {
    /// Hash of the frames; 0 = unused. Claimed by CAS, `ready` published after frames.
    key: AtomicU64,
    ready: AtomicU8,
    frames: [AtomicUsize; FRAMES],
    samples: AtomicU64,
    /// Samples followed to their free (the others were served by the heap, and their
    /// lifetimes are not known; see [`FOLLOW_BYTES`]).
    followed: AtomicU64,
    bytes: AtomicU64,
    /// The smallest size asked for, bit-inverted (`!size`, so `fetch_max` keeps the
    /// minimum): every field of an unused entry is then zero, and the tables lie in
    /// `.bss` (see [`TABLES`]).
    size_min_inverted: AtomicUsize,
    size_max: AtomicUsize,
    align_max: AtomicUsize,
    thread: AtomicUsize,
    several_threads: AtomicU8,
    freed: AtomicU64,
    lifetime_ns: AtomicU64,
    lifetime_max_ns: AtomicU64,
    /// Estimated calls: each sample of `size` bytes stands for `MEAN_INTERVAL / size`
    /// of them (sampling is per byte, so small requests are sampled less often).
    calls: AtomicU64,
    /// Estimated calls per standard block size.
    class_calls: ClassTally<SITE_CLASSES>,
}

/// Counts for up to `N` size classes, each slot claimed by compare-and-swap for the
/// first classes seen (nothing allocated, any thread may add).
pub struct ClassTally<const N: usize> {
    /// Class sizes; 0 = slot not yet claimed.
    sizes: [AtomicUsize; N],
    counts: [AtomicU64; N],
}

impl<const N: usize> ClassTally<N> {
    pub const fn new() -> Self {
        ClassTally {
            sizes: [const { AtomicUsize::new(0) }; N],
            counts: [const { AtomicU64::new(0) }; N],
        }
    }

    /// Adds `n` to class `size` (not 0); false when every slot holds another class.
    pub fn add(&self, size: usize, n: u64) -> bool {
        for (sz, count) in self.sizes.iter().zip(&self.counts) {
            let ours = match sz.compare_exchange(0, size, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => true,
                Err(other) => other == size,
            };
            if ours {
                count.fetch_add(n, Ordering::Relaxed);
                return true;
            }
        }
        false
    }

    /// `(size, count)` per slot; size 0 for a slot never claimed.
    pub fn snapshot(&self) -> [(usize, u64); N] {
        let mut out = [(0, 0); N];
        for (d, (sz, n)) in out.iter_mut().zip(self.sizes.iter().zip(&self.counts)) {
            *d = (sz.load(Ordering::Relaxed), n.load(Ordering::Relaxed));
        }
        out
    }
}

/// The slots and call-stack entries: 248 KiB, all zero until used, so they lie in `.bss`
/// and a page no sample has written costs no memory, even when read (the table scans
/// of `claim_slot` and `for_each_site`). In `.data`, a read faulted its page in from the
/// library file, and the profile's walk of every entry at exit made all 248 KiB
/// resident: a small program's peak (bench `churn`, 3 MB) was set at its exit.
struct Tables {
    slots: [Slot; SLOTS],
    sites: [SiteEntry; SITES],
}

static TABLES: Tables = Tables {
    slots: [const {
        Slot {
            state: AtomicU8::new(SLOT_FREE),
            usable: AtomicUsize::new(0),
            class: AtomicUsize::new(0),
            site: AtomicUsize::new(0),
            born_ns: AtomicU64::new(0),
            resident: AtomicUsize::new(0),
            dirty_prefix: AtomicUsize::new(0),
            kept_since_ms: AtomicU64::new(0),
        }
    }; SLOTS],
    sites: [const {
        SiteEntry {
            key: AtomicU64::new(0),
            ready: AtomicU8::new(0),
            frames: [const { AtomicUsize::new(0) }; FRAMES],
            samples: AtomicU64::new(0),
            followed: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            size_min_inverted: AtomicUsize::new(0),
            size_max: AtomicUsize::new(0),
            align_max: AtomicUsize::new(0),
            thread: AtomicUsize::new(0),
            several_threads: AtomicU8::new(0),
            freed: AtomicU64::new(0),
            lifetime_ns: AtomicU64::new(0),
            lifetime_max_ns: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            class_calls: ClassTally::new(),
        }
    }; SITES],
};

/// Arena base, or 0 (not mapped), 1 (being mapped), 2 (mapping failed).
static ARENA: AtomicUsize = AtomicUsize::new(0);
/// lgmalloc's own code when it is a module of its own (a preloaded or linked shared
/// object), set at start-up by `predict`; empty when linked into the program.
static OWN_CODE: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];

/// A set of run-time addresses handed over once at start-up by `predict`: ascending,
/// leaked, read without a lock (empty until then).
struct AddressSet {
    ptr: AtomicPtr<usize>,
    len: AtomicUsize,
}

impl AddressSet {
    const fn new() -> Self {
        AddressSet {
            ptr: AtomicPtr::new(core::ptr::null_mut()),
            len: AtomicUsize::new(0),
        }
    }

    fn set(&self, addrs: &'static [usize]) {
        self.len.store(addrs.len(), Ordering::Relaxed);
        self.ptr.store(addrs.as_ptr().cast_mut(), Ordering::Release);
    }

    fn get(&self) -> &'static [usize] {
        let p = self.ptr.load(Ordering::Acquire);
        if p.is_null() {
            return &[];
        }
        // SAFETY: set once from a `'static` slice of this length (stored before the
        // pointer was published with Release).
        unsafe { core::slice::from_raw_parts(p, self.len.load(Ordering::Relaxed)) }
    }

    fn contains(&self, addr: usize) -> bool {
        self.get().binary_search(&addr).is_ok()
    }

    /// Where `addr` is in the set (ascending), if it is.
    fn position(&self, addr: usize) -> Option<usize> {
        self.get().binary_search(&addr).ok()
    }
}

/// Return addresses of the calls the program's allocation wrappers (`xmalloc`,
/// `Perl_safesysmalloc`) make to the allocator, from the analyses. A sample returning to
/// one of them unwinds the stack, so its call site can be the wrapper's caller.
static WRAPPER_RETURNS: AddressSet = AddressSet::new();

/// Return addresses that the stored profile resolved to call sites (lgmalloc linked
/// into the program only). There the sampler cannot tell lgmalloc's code from the
/// program's, so a sample unwinds the stack (about 15k instructions through libgcc)
/// unless the return address it was handed is one of these.
static KNOWN_SITES: AddressSet = AddressSet::new();

/// Per wrapper return address (its position in [`WRAPPER_RETURNS`], the first
/// [`WRAPPER_DEPTH_SLOTS`] of them): how far above the wrapper's stack pointer at that
/// address its caller's return address ends, as `depth << 2 | agreements`, learned from
/// full unwinds (0: not yet). Once two agreed, a sample returning to the wrapper reads
/// its caller's return address there and stops, where the unwinder would look up the
/// caller's frame description first: on a program that calls its wrapper from
/// thousands of places those lookups read its `.eh_frame` all over (1.5 MB of cc1plus
/// made resident, half a percent of g++'s peak RSS, with prediction on).
static WRAPPER_DEPTHS: [AtomicU32; WRAPPER_DEPTH_SLOTS] =
    [const { AtomicU32::new(0) }; WRAPPER_DEPTH_SLOTS];
const WRAPPER_DEPTH_SLOTS: usize = 64;
/// The largest wrapper frame the shortcut trusts: a wrapper's frame at its call is a
/// few words; the bound keeps a read well inside the stack even if a frame varied.
const MAX_WRAPPER_DEPTH: usize = 1024;
/// Agreeing full unwinds before a wrapper's depth is used.
const DEPTH_AGREEMENTS: u32 = 2;
/// Samples whose call site was read from a wrapper's frame at its learned depth.
pub static WRAPPER_SHORTCUTS: AtomicU64 = AtomicU64::new(0);

/// Sets the wrappers' return addresses (see [`WRAPPER_RETURNS`]), once, at start-up.
pub fn set_wrapper_returns(returns: &'static [usize]) {
    WRAPPER_RETURNS.set(returns);
}

/// The wrappers' return addresses, ascending (empty before start-up sets them).
pub fn wrapper_returns() -> &'static [usize] {
    WRAPPER_RETURNS.get()
}

/// Whether `ip` is the return address of a wrapper's call to the allocator.
pub fn is_wrapper_return(ip: usize) -> bool {
    WRAPPER_RETURNS.contains(ip)
}

/// Sets the call sites known from the stored profile (see [`KNOWN_SITES`]), once, at
/// start-up.
pub fn set_known_sites(sites: &'static [usize]) {
    KNOWN_SITES.set(sites);
}

/// Whether the unwinder may be called: not before `predict` has checked that the
/// program has the `.eh_frame_hdr` it needs (in a `-static` program linked without it,
/// libgcc's unwinder aborts).
static UNWIND: AtomicBool = AtomicBool::new(false);

/// Lets samples unwind the stack (`predict` at start-up, once it is known to be safe).
pub fn allow_unwinding() {
    UNWIND.store(true, Ordering::Relaxed);
}

/// Whether the stack may be unwound (see [`allow_unwinding`]).
pub fn unwinding_allowed() -> bool {
    UNWIND.load(Ordering::Relaxed)
}

/// Records the range of lgmalloc's own code (`predict` at start-up).
pub fn set_own_code(lo: usize, hi: usize) {
    OWN_CODE[0].store(lo, Ordering::Relaxed);
    OWN_CODE[1].store(hi, Ordering::Relaxed);
}

/// Whether `ip` may lie in lgmalloc's own code (always, when its range is unknown, so
/// the caller unwinds to be sure).
fn is_own_code(ip: usize) -> bool {
    let (lo, hi) = (
        OWN_CODE[0].load(Ordering::Relaxed),
        OWN_CODE[1].load(Ordering::Relaxed),
    );
    lo == hi || (ip >= lo && ip < hi)
}

/// The recorded own-code range (`predict` skips frames in it).
pub fn own_code() -> (usize, usize) {
    (
        OWN_CODE[0].load(Ordering::Relaxed),
        OWN_CODE[1].load(Ordering::Relaxed),
    )
}

/// Resident bytes past the first page held by free slots (at most [`DIRTY_BUDGET`]).
static DIRTY: AtomicUsize = AtomicUsize::new(0);
/// When the next purge pass of kept slots is due (ms, `os::now_ms`); 0: none is.
static PURGE_AT: AtomicU64 = AtomicU64::new(0);
/// Draws made so far (the generator's counter).
static DRAWS: AtomicU64 = AtomicU64::new(0);
/// Samples taken, and those of them followed to their free (served from a slot);
/// samples skipped (no slot, no arena); stacks not kept (table full).
pub static TAKEN: AtomicU64 = AtomicU64::new(0);
pub static FOLLOWED: AtomicU64 = AtomicU64::new(0);
pub static SKIPPED: AtomicU64 = AtomicU64::new(0);
pub static SITES_DROPPED: AtomicU64 = AtomicU64::new(0);
/// Samples whose call site was found by unwinding the stack.
pub static UNWOUND: AtomicU64 = AtomicU64::new(0);
/// Per size class: samples, and bytes requested by them (the plot's observed side).
pub static CLASS_SAMPLES: [AtomicU64; size_class::MAX_CLASSES] =
    [const { AtomicU64::new(0) }; size_class::MAX_CLASSES];

/// Per size class: sampled blocks live now (statistics count them with their class).
static CLASS_LIVE: [AtomicU64; size_class::MAX_CLASSES] =
    [const { AtomicU64::new(0) }; size_class::MAX_CLASSES];

/// Sampled blocks of class `class` live now.
pub fn live_in_class(class: usize) -> u64 {
    CLASS_LIVE
        .get(class)
        .map_or(0, |c| c.load(Ordering::Relaxed))
}

/// The next sampling interval in bytes: exponential with mean [`MEAN_INTERVAL`], drawn
/// from a counter-based generator (splitmix64) keyed by the process secret, so threads
/// share no state but an atomic counter and runs differ.
pub fn next_interval() -> usize {
    let r = draw();
    // A uniform in (0, 1]: 53 random bits, never zero.
    let u = ((r >> 11) + 1) as f64 / (1u64 << 53) as f64;
    let x = -ln(u) * MEAN_INTERVAL as f64;
    (x as usize).clamp(1, 64 * MEAN_INTERVAL)
}

/// Whether a sample timed in allocations of `unit` bytes (a heap's countdown, see
/// `heap::rearm_sampling`) is kept for an allocation of `size <= unit` bytes: with
/// chance `size / unit`, so each byte asked for has the same chance of being sampled.
pub fn keep_thinned(size: usize, unit: usize) -> bool {
    size >= unit || (draw() % unit as u64) < size as u64
}

/// 64 random bits: the generator's next draw (keyed by the process secret, so runs
/// differ and an attacker cannot foresee which blocks are sampled).
fn draw() -> u64 {
    let n = DRAWS.fetch_add(1, Ordering::Relaxed);
    splitmix64((secret::get() as u64) ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Natural logarithm of `u` in (0, 1], without libm: the exponent from the bits, the
/// mantissa's log from a short series (error far below what sampling needs).
fn ln(u: f64) -> f64 {
    let bits = u.to_bits();
    let exp = ((bits >> 52) & 0x7ff) as i64 - 1023;
    // Mantissa m in [1, 2): ln m = 2 atanh((m-1)/(m+1)).
    let m = f64::from_bits((bits & ((1u64 << 52) - 1)) | (1023u64 << 52));
    let t = (m - 1.0) / (m + 1.0);
    let t2 = t * t;
    let series =
        t * (2.0 + t2 * (2.0 / 3.0 + t2 * (2.0 / 5.0 + t2 * (2.0 / 7.0 + t2 * (2.0 / 9.0)))));
    exp as f64 * core::f64::consts::LN_2 + series
}

/// Records a sampled allocation of `size` bytes in class `class` for thread `thread`,
/// and serves it from a slot when the sample is followed to its free (see
/// [`FOLLOW_BYTES`]). Null when it is not followed, or no slot is free (then it is
/// not recorded): the caller keeps the block it popped. `ret` is the return address
/// the allocating entry point will return to, when known (0 or an address inside
/// lgmalloc otherwise; when it is unknown, or lies in a known wrapper, the stack is
/// unwound, where that is safe; else `ret` is all that is kept).
pub fn take(class: usize, size: usize, thread: usize, ret: usize) -> *mut u8 {
    let usable = size_class::block_size(class);
    if usable > 1 << SLOT_SHIFT {
        return core::ptr::null_mut();
    }
    let slot = if followed(usable) {
        let base = arena();
        let Some(i) = (base != 0).then(|| claim_slot(usable)).flatten() else {
            SKIPPED.fetch_add(1, Ordering::Relaxed);
            return core::ptr::null_mut();
        };
        Some((base, i))
    } else {
        None
    };
    // The stack is walked here, not in a helper: only FRAMES return addresses are kept,
    // lgmalloc's own among them, so each frame between this one and the allocating
    // call is one fewer of the program's (in a debug build nothing is inlined).
    // The return address handed over is the call site when it lies outside lgmalloc's
    // own code, or is one an earlier run resolved to a site; otherwise unwind to find it.
    let known =
        ret != 0 && !is_wrapper_return(ret) && (!is_own_code(ret) || KNOWN_SITES.contains(ret));
    let frames = if known || !UNWIND.load(Ordering::Relaxed) {
        let mut f = [0; FRAMES];
        f[0] = ret;
        f
    } else {
        UNWOUND.fetch_add(1, Ordering::Relaxed);
        capture()
    };
    let site = record(class, usable, size, thread, &frames, slot.is_some());
    let Some((base, i)) = slot else {
        return core::ptr::null_mut();
    };
    if let Some(c) = CLASS_LIVE.get(class) {
        c.fetch_add(1, Ordering::Relaxed);
    }
    // SAFETY: `i < SLOTS` (from `claim_slot`).
    let slot = unsafe { TABLES.slots.get_unchecked(i) };
    reuse_slot(slot, base + (i << SLOT_SHIFT), usable);
    slot.usable.store(usable, Ordering::Relaxed);
    slot.class.store(class, Ordering::Relaxed);
    slot.site
        .store(site.unwrap_or(usize::MAX), Ordering::Relaxed);
    slot.born_ns.store(now_ns(), Ordering::Relaxed);
    slot.state.store(SLOT_LIVE, Ordering::Release);
    purge_if_due();
    (base + (i << SLOT_SHIFT)) as *mut u8
}

/// Whether a sample of a block of `usable` bytes is followed to its free: always up to
/// [`FOLLOW_BYTES`], else with probability `FOLLOW_BYTES / usable`.
fn followed(usable: usize) -> bool {
    #[cfg(test)]
    if tests::FOLLOW_ALL.load(Ordering::Relaxed) {
        return true;
    }
    // 32 random bits against the probability in 32-bit fixed point (`usable` is at
    // most a slot, 2^18, so the product fits).
    usable <= FOLLOW_BYTES || (draw() >> 32) * (usable as u64) < (FOLLOW_BYTES as u64) << 32
}

/// Counts one sample of a block of class `class` (`usable` bytes), whose call stack is
/// `frames`, at the stack's entry (found or made; `None` when the table is full) and in
/// the class tallies.
fn record(
    class: usize,
    usable: usize,
    size: usize,
    thread: usize,
    frames: &[usize; FRAMES],
    followed: bool,
) -> Option<usize> {
    let site = site_index(frames);
    let align = if size_class::size_class_of(size) == class {
        MIN_ALIGN
    } else {
        1 << usable.trailing_zeros()
    };
    if let Some(s) = site.and_then(|s| TABLES.sites.get(s)) {
        s.samples.fetch_add(1, Ordering::Relaxed);
        s.followed.fetch_add(u64::from(followed), Ordering::Relaxed);
        s.bytes.fetch_add(size as u64, Ordering::Relaxed);
        s.size_min_inverted.fetch_max(!size, Ordering::Relaxed);
        s.size_max.fetch_max(size, Ordering::Relaxed);
        s.align_max.fetch_max(align, Ordering::Relaxed);
        let prev = s.thread.swap(thread, Ordering::Relaxed);
        if prev != 0 && prev != thread {
            s.several_threads.store(1, Ordering::Relaxed);
        }
        count_calls(s, size);
    }
    if let Some(c) = CLASS_SAMPLES.get(class) {
        c.fetch_add(1, Ordering::Relaxed);
    }
    TAKEN.fetch_add(1, Ordering::Relaxed);
    FOLLOWED.fetch_add(u64::from(followed), Ordering::Relaxed);
    site
}

/// The arena's base address (mapping it on first use), or 0 when it cannot be had.
fn arena() -> usize {
    let a = ARENA.load(Ordering::Acquire);
    if a > 2 {
        return a;
    }
    if a != 0
        || ARENA
            .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
    {
        return 0; // another thread is mapping it, or it failed: skip this sample
    }
    let p = os::map_aligned(ARENA_BYTES, 1 << chunk_map::CHUNK_SHIFT) as usize;
    let ok = p != 0
        && (0..ARENA_BYTES >> chunk_map::CHUNK_SHIFT).all(|c| {
            chunk_map::set_kind(p + (c << chunk_map::CHUNK_SHIFT), chunk_map::KIND_SAMPLE)
        });
    ARENA.store(if ok { p } else { 2 }, Ordering::Release);
    if ok { p } else { 0 }
}

/// Claims a free slot for a block of `usable` bytes: for a block of more than one page,
/// the free slot whose kept pages fit it best (the smallest that holds it, else the
/// largest: its refault is saved, and a small block does not pin a big slot's pages);
/// otherwise, or when no free slot kept pages, the lowest clean one. (A scan of at most
/// `SLOTS` loads, `2 * SLOTS` while some free slot kept pages, once per ~256 KiB
/// allocated.)
fn claim_slot(usable: usize) -> Option<usize> {
    // With no pages kept every free slot is clean, and the passes that tell kept from
    // clean are skipped: samples of small blocks never keep any, and such a pass cost
    // about 2,000 instructions per sample (larson).
    if DIRTY.load(Ordering::Relaxed) == 0 {
        return claim_first(|_| true);
    }
    let wanted = usable.next_multiple_of(os::OS_PAGE_SIZE);
    (wanted > os::OS_PAGE_SIZE)
        .then(|| claim_best_kept(wanted))
        .flatten()
        .or_else(|| claim_first(|s| beyond_first_page(s.resident.load(Ordering::Relaxed)) == 0))
        .or_else(|| claim_first(|_| true))
}

/// Takes a free slot for the caller (`FREE` to `BUSY`); false if another thread did.
fn try_claim(slot: &Slot) -> bool {
    slot.state
        .compare_exchange(SLOT_FREE, SLOT_BUSY, Ordering::Acquire, Ordering::Relaxed)
        .is_ok()
}

/// Claims the free slot with kept pages that best fits `wanted` bytes (see
/// [`claim_slot`]), trying again a few times when another thread claims it first.
fn claim_best_kept(wanted: usize) -> Option<usize> {
    for _ in 0..4 {
        let mut best: Option<(usize, usize)> = None;
        for (i, s) in TABLES.slots.iter().enumerate() {
            let resident = s.resident.load(Ordering::Relaxed);
            if s.state.load(Ordering::Relaxed) != SLOT_FREE || beyond_first_page(resident) == 0 {
                continue;
            }
            if best.is_none_or(|(_, b)| fits_better(resident, b, wanted)) {
                best = Some((i, resident));
            }
        }
        let (i, _) = best?;
        if TABLES.slots.get(i).is_some_and(try_claim) {
            return Some(i);
        }
    }
    None
}

/// Whether a slot with `a` resident bytes suits a block of `wanted` bytes better than
/// one with `b`: one that holds it beats one that does not; of two that do, the
/// smaller; of two that do not, the larger.
fn fits_better(a: usize, b: usize, wanted: usize) -> bool {
    match (a >= wanted, b >= wanted) {
        (true, true) => a < b,
        (false, false) => a > b,
        (holds, _) => holds,
    }
}

/// Claims the first free slot that `wanted` accepts.
fn claim_first(wanted: impl Fn(&Slot) -> bool) -> Option<usize> {
    (0..SLOTS).find(|&i| {
        TABLES.slots.get(i).is_some_and(|s| {
            s.state.load(Ordering::Relaxed) == SLOT_FREE && wanted(s) && try_claim(s)
        })
    })
}

/// Bytes past the first page of a slot with `resident` possibly resident bytes.
fn beyond_first_page(resident: usize) -> usize {
    resident.saturating_sub(os::OS_PAGE_SIZE)
}

/// Takes a claimed slot's kept bytes off the dirty count and sets its resident extent
/// to hold `usable` bytes: widened for a bigger block, and cut back (the pages past the
/// block given back) when it kept more than [`PINNED_EXCESS`] beyond them, since a live
/// block's slot is never purged and the excess would stay resident for its lifetime.
fn reuse_slot(slot: &Slot, addr: usize, usable: usize) {
    let resident = slot.resident.load(Ordering::Relaxed);
    DIRTY.fetch_sub(beyond_first_page(resident), Ordering::Relaxed);
    slot.dirty_prefix.store(resident, Ordering::Relaxed);
    // Whole pages: a decommit gives back whole pages only, so the last, partly used one
    // must count as resident (it stays in the slot, which is larger than any block).
    let used = usable.next_multiple_of(os::OS_PAGE_SIZE);
    let kept = if resident > used + PINNED_EXCESS {
        // SAFETY: the slot is held by the caller; its bytes past `used` hold no live data
        // (the block about to be handed out ends before them).
        unsafe { os::decommit((addr + used) as *mut u8, resident - used) };
        used
    } else {
        resident.max(used)
    };
    slot.resident.store(kept, Ordering::Relaxed);
}

/// Keeps a freed slot's pages when the dirty budget allows, else gives back all but
/// the first. The caller holds the slot (`BUSY`).
fn keep_or_decommit(slot: &Slot, addr: usize) {
    let extra = beyond_first_page(slot.resident.load(Ordering::Relaxed));
    if extra == 0 {
        return;
    }
    if DIRTY.fetch_add(extra, Ordering::Relaxed) + extra <= DIRTY_BUDGET {
        let now = os::now_ms();
        slot.kept_since_ms.store(now, Ordering::Relaxed);
        purge_no_later_than(now + SLOT_PURGE_DELAY_MS);
        return;
    }
    DIRTY.fetch_sub(extra, Ordering::Relaxed);
    decommit_slot(slot, addr);
}

/// Makes the next purge pass due at `at` (ms) at the latest.
fn purge_no_later_than(at: u64) {
    let mut due = PURGE_AT.load(Ordering::Relaxed);
    while due == 0 || due > at {
        match PURGE_AT.compare_exchange_weak(due, at, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return,
            Err(now_due) => due = now_due,
        }
    }
}

/// Gives back the pages of free slots that kept them for [`SLOT_PURGE_DELAY_MS`] with
/// no sample taking them again, when such a pass is due. One atomic load when none is;
/// called from heap slow paths (beside the region's purge) and when a sample is taken.
pub fn purge_if_due() {
    let due = PURGE_AT.load(Ordering::Relaxed);
    if due == 0 {
        return;
    }
    let now = os::now_ms();
    // One thread runs the pass: the one that clears the due time.
    if now >= due
        && PURGE_AT
            .compare_exchange(due, 0, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        purge_kept_before(now.saturating_sub(SLOT_PURGE_DELAY_MS));
    }
}

/// Gives back the pages of free slots that kept them since before `before` (ms), and
/// makes the next pass due when the youngest of the others has waited out the delay.
/// Returns the bytes given back.
fn purge_kept_before(before: u64) -> usize {
    let base = ARENA.load(Ordering::Acquire);
    if base <= 2 {
        return 0;
    }
    let mut released = 0;
    let mut next_due = u64::MAX;
    for (i, slot) in TABLES.slots.iter().enumerate() {
        let kept = slot.state.load(Ordering::Relaxed) == SLOT_FREE
            && beyond_first_page(slot.resident.load(Ordering::Relaxed)) != 0;
        if !kept {
            continue;
        }
        let since = slot.kept_since_ms.load(Ordering::Relaxed);
        if since >= before {
            next_due = next_due.min(since + SLOT_PURGE_DELAY_MS);
            continue;
        }
        if try_claim(slot) {
            let extra = decommit_slot(slot, base + (i << SLOT_SHIFT));
            DIRTY.fetch_sub(extra, Ordering::Relaxed);
            released += extra;
            slot.state.store(SLOT_FREE, Ordering::Release);
        }
    }
    if next_due != u64::MAX {
        purge_no_later_than(next_due);
    }
    released
}

/// Gives back a held slot's pages past its first. Returns the bytes given back.
fn decommit_slot(slot: &Slot, addr: usize) -> usize {
    let extra = beyond_first_page(slot.resident.load(Ordering::Relaxed));
    if extra != 0 {
        // SAFETY: the slot is held by the caller and its pages past the first hold no
        // live data.
        unsafe { os::decommit((addr + os::OS_PAGE_SIZE) as *mut u8, extra) };
        slot.resident.store(os::OS_PAGE_SIZE, Ordering::Relaxed);
    }
    extra
}

/// The arena's share of the statistics: `(reserved, resident)`, the address space it
/// maps (none before the first sample) and the bytes of its slots that may be resident
/// (live blocks' pages and what free slots kept, whole pages).
pub fn arena_figures() -> (usize, usize) {
    if ARENA.load(Ordering::Acquire) <= 2 {
        return (0, 0);
    }
    let resident = TABLES
        .slots
        .iter()
        .map(|s| s.resident.load(Ordering::Relaxed))
        .sum();
    (ARENA_BYTES, resident)
}

/// Gives back the pages free slots kept (`lg_trim`). Returns the bytes given back.
pub fn trim() -> usize {
    purge_kept_before(u64::MAX)
}

/// The live slot `addr` starts, if it is one.
fn live_slot(addr: usize) -> Option<&'static Slot> {
    let base = ARENA.load(Ordering::Acquire);
    let off = addr.checked_sub(base)?;
    if base <= 2 || off >= ARENA_BYTES || off & ((1 << SLOT_SHIFT) - 1) != 0 {
        return None;
    }
    TABLES.slots.get(off >> SLOT_SHIFT)
}

/// Frees the sampled block at `addr` and records its lifetime. False when `addr` is
/// not a live sampled block (the caller reports the misuse).
pub fn free(addr: usize) -> bool {
    let Some(slot) = live_slot(addr) else {
        return false;
    };
    if slot
        .state
        .compare_exchange(SLOT_LIVE, SLOT_BUSY, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        return false;
    }
    let lifetime = now_ns().saturating_sub(slot.born_ns.load(Ordering::Relaxed));
    if let Some(s) = TABLES.sites.get(slot.site.load(Ordering::Relaxed)) {
        s.freed.fetch_add(1, Ordering::Relaxed);
        s.lifetime_ns.fetch_add(lifetime, Ordering::Relaxed);
        s.lifetime_max_ns.fetch_max(lifetime, Ordering::Relaxed);
    }
    if let Some(c) = CLASS_LIVE.get(slot.class.load(Ordering::Relaxed)) {
        c.fetch_sub(1, Ordering::Relaxed);
    }
    keep_or_decommit(slot, addr);
    slot.state.store(SLOT_FREE, Ordering::Release);
    true
}

/// Usable bytes of the live sampled block at `addr`, or 0.
pub fn usable_size(addr: usize) -> usize {
    live_slot(addr)
        .filter(|s| s.state.load(Ordering::Acquire) == SLOT_LIVE)
        .map_or(0, |s| s.usable.load(Ordering::Relaxed))
}

/// How many bytes from the start of `addr`, a sampled block its caller has just been
/// handed, may be non-zero: `calloc` clears only those. A slot's memory past what was
/// resident when it was claimed reads as zero (never used, or decommitted since).
pub fn dirty_prefix(addr: usize) -> usize {
    live_slot(addr).map_or(usize::MAX, |s| s.dirty_prefix.load(Ordering::Relaxed))
}

fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-parameter; CLOCK_MONOTONIC is served by the vDSO.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

// ---- call stacks -------------------------------------------------------------------

// libgcc's unwinder (also used by verify mode's call-site lookup).
unsafe extern "C" {
    pub(crate) fn _Unwind_Backtrace(
        trace: extern "C" fn(ctx: *mut c_void, arg: *mut c_void) -> c_int,
        arg: *mut c_void,
    ) -> c_int;
    pub(crate) fn _Unwind_GetIP(ctx: *mut c_void) -> usize;
    fn _Unwind_GetCFA(ctx: *mut c_void) -> usize;
}

struct Walk {
    seen: usize,
    frames: [usize; FRAMES],
    /// The previous frame returned to a wrapper: its position in `WRAPPER_RETURNS` and
    /// the wrapper's stack pointer there (for [`learn_wrapper_depth`]).
    wrapper: Option<(usize, usize)>,
}

/// Records that the wrapper at position `w` of `WRAPPER_RETURNS`, with stack pointer
/// `sp` at its return address, was called from `caller_ip` with `caller_sp` as the
/// caller's stack pointer (the wrapper's frame's CFA) — if the caller's return address
/// really lies just below that, as in every frame the shortcut can read.
fn learn_wrapper_depth(w: usize, sp: usize, caller_sp: usize, caller_ip: usize) {
    let Some(slot) = WRAPPER_DEPTHS.get(w) else {
        return;
    };
    let depth = caller_sp.wrapping_sub(sp);
    if caller_sp <= sp || depth > MAX_WRAPPER_DEPTH || !depth.is_multiple_of(8) {
        return;
    }
    // SAFETY: `caller_sp - 8` is the slot of the wrapper's return address, in the
    // frame the unwinder just walked (the wrapper is running below us).
    if unsafe { *((caller_sp - 8) as *const usize) } != caller_ip {
        return;
    }
    let old = slot.load(Ordering::Relaxed);
    let agreements = if old >> 2 == depth as u32 {
        ((old & 3) + 1).min(DEPTH_AGREEMENTS)
    } else {
        1
    };
    slot.store((depth as u32) << 2 | agreements, Ordering::Relaxed);
}

/// The return address of the caller of the wrapper at position `w`, read at the
/// wrapper's learned depth above `sp` (its stack pointer at its return address), when
/// full unwinds agreed on the depth and what is read there is a call site the sample
/// stops at (neither lgmalloc's nor another wrapper's).
fn caller_of_wrapper(w: usize, sp: usize) -> Option<usize> {
    let learned = WRAPPER_DEPTHS.get(w)?.load(Ordering::Relaxed);
    if learned & 3 < DEPTH_AGREEMENTS {
        return None;
    }
    let depth = (learned >> 2) as usize;
    // SAFETY: two full unwinds found the caller's return address `depth - 8` bytes
    // above the wrapper's stack pointer at this return address; a frame that size
    // (at most `MAX_WRAPPER_DEPTH`) lies within the running wrapper's frame and the
    // frames above it.
    let caller = unsafe { *((sp + depth - 8) as *const usize) };
    (caller != 0 && !is_own_code(caller) && !is_wrapper_return(caller)).then_some(caller)
}

/// The return addresses of the current call stack, innermost first (lgmalloc's own
/// frames included), up to the first that is neither lgmalloc's (when its code is known)
/// nor a wrapper's. The unwinder reads `.eh_frame` and allocates nothing; nested
/// allocations, if any, find the countdown disarmed by the caller.
#[inline(never)]
fn capture() -> [usize; FRAMES] {
    extern "C" fn visit(ctx: *mut c_void, arg: *mut c_void) -> c_int {
        // SAFETY: `arg` is our `Walk`; the unwinder passes a valid context.
        let (walk, ip, sp) = unsafe {
            (
                &mut *arg.cast::<Walk>(),
                _Unwind_GetIP(ctx),
                _Unwind_GetCFA(ctx),
            )
        };
        if let Some((w, wrapper_sp)) = walk.wrapper.take() {
            learn_wrapper_depth(w, wrapper_sp, sp, ip);
        }
        let k = walk.seen;
        walk.seen += 1;
        if k < SKIP_FRAMES {
            return 0;
        }
        let i = k - SKIP_FRAMES;
        let Some(f) = walk.frames.get_mut(i).filter(|_| ip != 0) else {
            return 5; // _URC_END_OF_STACK: enough frames, or no more
        };
        *f = ip;
        let Some(w) = WRAPPER_RETURNS.position(ip) else {
            // Outside the program's wrappers: lgmalloc's own frame, or the call site
            // found, whose outer frames are not kept, so they are not unwound.
            return if is_own_code(ip) { 0 } else { 5 };
        };
        if let (Some(caller), Some(next)) = (caller_of_wrapper(w, sp), walk.frames.get_mut(i + 1)) {
            *next = caller;
            WRAPPER_SHORTCUTS.fetch_add(1, Ordering::Relaxed);
            return 5;
        }
        walk.wrapper = Some((w, sp));
        0
    }
    let mut walk = Walk {
        seen: 0,
        frames: [0; FRAMES],
        wrapper: None,
    };
    // SAFETY: the callback matches the unwinder's signature and only writes `walk`.
    unsafe { _Unwind_Backtrace(visit, (&raw mut walk).cast()) };
    walk.frames
}

/// The site entry for `frames`, adding it if new; None when the table is full.
fn site_index(frames: &[usize; FRAMES]) -> Option<usize> {
    // The frames up to the first zero: a call site known from the return address
    // alone is one frame (hashing the seven empty ones took a quarter of a sample).
    let key = frames
        .iter()
        .take_while(|&&f| f != 0)
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &f| splitmix64(h ^ f as u64))
        | 1;
    let start = key as usize % SITES;
    for k in 0..32 {
        let i = (start + k) % SITES;
        let e = TABLES.sites.get(i)?;
        match e
            .key
            .compare_exchange(0, key, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => {
                for (slot, &f) in e.frames.iter().zip(frames) {
                    slot.store(f, Ordering::Relaxed);
                }
                e.ready.store(1, Ordering::Release);
                return Some(i);
            }
            Err(k) if k == key => return Some(i),
            Err(_) => {}
        }
    }
    SITES_DROPPED.fetch_add(1, Ordering::Relaxed);
    None
}

/// Counts the calls one sample of `size` bytes stands for, in the stack's total and in
/// its standard class's count (one of the first [`SITE_CLASSES`] classes it saw).
fn count_calls(s: &SiteEntry, size: usize) {
    let size = size.max(1);
    let calls = (MEAN_INTERVAL / size).max(1) as u64;
    s.calls.fetch_add(calls, Ordering::Relaxed);
    // A class past the first SITE_CLASSES counts in the total alone.
    s.class_calls
        .add(size_class::standard_block_size(size), calls);
}

/// What one call stack's samples saw (a snapshot for the profile).
#[derive(Clone, Copy, Debug, Default)]
pub struct SiteSnapshot {
    pub frames: [usize; FRAMES],
    pub samples: u64,
    /// Samples followed to their free; `freed` and the lifetimes count only these.
    pub followed: u64,
    pub bytes: u64,
    pub size_min: usize,
    pub size_max: usize,
    pub align: usize,
    /// More than one thread allocated here.
    pub several_threads: bool,
    pub freed: u64,
    pub lifetime_ns: u64,
    pub lifetime_max_ns: u64,
    /// Estimated calls, in all and per standard block size (size 0: unused).
    pub calls: u64,
    pub classes: [(usize, u64); SITE_CLASSES],
}

/// Calls `f` with each recorded call stack.
pub fn for_each_site(mut f: impl FnMut(&SiteSnapshot)) {
    for e in TABLES.sites.iter() {
        if e.ready.load(Ordering::Acquire) == 0 {
            continue;
        }
        let mut frames = [0usize; FRAMES];
        for (d, s) in frames.iter_mut().zip(e.frames.iter()) {
            *d = s.load(Ordering::Relaxed);
        }
        f(&SiteSnapshot {
            frames,
            samples: e.samples.load(Ordering::Relaxed),
            followed: e.followed.load(Ordering::Relaxed),
            bytes: e.bytes.load(Ordering::Relaxed),
            size_min: !e.size_min_inverted.load(Ordering::Relaxed),
            size_max: e.size_max.load(Ordering::Relaxed),
            align: e.align_max.load(Ordering::Relaxed),
            several_threads: e.several_threads.load(Ordering::Relaxed) != 0,
            freed: e.freed.load(Ordering::Relaxed),
            lifetime_ns: e.lifetime_ns.load(Ordering::Relaxed),
            lifetime_max_ns: e.lifetime_max_ns.load(Ordering::Relaxed),
            calls: e.calls.load(Ordering::Relaxed),
            classes: e.class_calls.snapshot(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Makes every sample followed, so the slot tests can sample blocks of any size.
    pub(super) static FOLLOW_ALL: AtomicBool = AtomicBool::new(false);

    #[test]
    fn ln_matches_std() {
        for u in [1.0, 0.5, 0.1, 1e-9, 0.999, 0.3333] {
            assert!((ln(u) - u.ln()).abs() < 1e-5, "{u}");
        }
    }

    /// Resident 4 KiB pages in `len` bytes at `addr` (mincore).
    fn resident_pages(addr: usize, len: usize) -> usize {
        let mut vec = vec![0u8; len.div_ceil(os::OS_PAGE_SIZE)];
        // SAFETY: `addr` is page-aligned inside the mapped arena and `vec` has one byte
        // per page of the range.
        let rc = unsafe { libc::mincore(addr as *mut c_void, len, vec.as_mut_ptr()) };
        assert_eq!(rc, 0, "mincore failed");
        vec.iter().filter(|&&b| b & 1 != 0).count()
    }

    /// Freed slots keep their pages up to the dirty budget and give back the rest; the
    /// next sample takes a kept slot; `trim` gives back every kept page and says so.
    /// (The only test that samples in this binary, so the counts are exact.)
    #[test]
    #[cfg_attr(miri, ignore = "mincore and madvise")]
    fn freed_slots_keep_pages_within_the_budget_and_trim_returns_them() {
        size_class::init();
        FOLLOW_ALL.store(true, Ordering::Relaxed);
        let class = size_class::STANDARD_CLASSES - 1;
        let usable = size_class::block_size(class);
        assert_eq!(usable, 1 << SLOT_SHIFT);
        let pages_per_slot = usable / os::OS_PAGE_SIZE;
        let n = 2 * DIRTY_BUDGET / usable;
        let blocks: Vec<usize> = (0..n).map(|_| take(class, usable, 0, 0) as usize).collect();
        for (i, &b) in blocks.iter().enumerate() {
            assert!(b != 0 && b.is_multiple_of(usable), "sample {i}: {b:#x}");
            assert_eq!(
                dirty_prefix(b),
                0,
                "sample {i}: a fresh slot has a dirty prefix"
            );
            // SAFETY: a live sampled block of `usable` bytes.
            unsafe { core::ptr::write_bytes(b as *mut u8, i as u8 | 1, usable) };
            assert_eq!(usable_size(b), usable);
        }
        let mut sorted = blocks.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), n, "two samples share a slot");
        assert_eq!(
            resident_pages(sorted[0], sorted[n - 1] + usable - sorted[0]),
            n * pages_per_slot
        );

        // Freed highest first, so the slots that keep their pages are not the lowest.
        for &b in blocks.iter().rev() {
            assert!(free(b));
        }
        assert!(!free(blocks[0]), "a freed sample freed twice was accepted");
        let kept: Vec<usize> = blocks.iter().map(|&b| resident_pages(b, usable)).collect();
        let kept_bytes: usize = kept.iter().map(|&p| (p - 1) * os::OS_PAGE_SIZE).sum();
        // The first frees fit the budget and keep everything; the rest keep one page.
        let extra = usable - os::OS_PAGE_SIZE;
        assert_eq!(
            kept_bytes,
            DIRTY_BUDGET / extra * extra,
            "pages kept: {kept:?}"
        );
        assert_eq!(DIRTY.load(Ordering::Relaxed), kept_bytes);
        assert!(
            kept.iter().all(|&p| p == 1 || p == pages_per_slot),
            "{kept:?}"
        );

        // A new sample takes a slot whose pages were kept (no refault).
        let again = take(class, usable, 0, 0) as usize;
        let i = blocks
            .iter()
            .position(|&b| b == again)
            .expect("a known slot");
        assert_eq!(
            kept[i], pages_per_slot,
            "took a clean slot while dirty ones were free"
        );
        assert_eq!(dirty_prefix(again), usable, "calloc would skip kept pages");
        assert_eq!(DIRTY.load(Ordering::Relaxed), kept_bytes - extra);
        assert!(free(again));

        assert_eq!(trim(), kept_bytes);
        assert_eq!(DIRTY.load(Ordering::Relaxed), 0);
        assert!(blocks.iter().all(|&b| resident_pages(b, usable) <= 1));
        assert_eq!(trim(), 0, "a second trim found pages to give back");

        // A kept slot stays until it has waited out the delay, then a pass gives its
        // pages back; a pass is due by then.
        let b = take(class, usable, 0, 0) as usize;
        // SAFETY: a live sampled block of `usable` bytes.
        unsafe { core::ptr::write_bytes(b as *mut u8, 7, usable) };
        assert!(free(b));
        assert_eq!(resident_pages(b, usable), pages_per_slot);
        let i = (b - ARENA.load(Ordering::Relaxed)) >> SLOT_SHIFT;
        let since = TABLES.slots[i].kept_since_ms.load(Ordering::Relaxed);
        let due = PURGE_AT.load(Ordering::Relaxed);
        assert!(due != 0 && due <= since + SLOT_PURGE_DELAY_MS, "due {due}");
        assert_eq!(purge_kept_before(since), 0, "purged before the delay");
        assert_eq!(resident_pages(b, usable), pages_per_slot);
        assert_eq!(purge_kept_before(since + 1), extra);
        assert_eq!(resident_pages(b, usable), 1);
        assert_eq!(DIRTY.load(Ordering::Relaxed), 0);
        assert_eq!(trim(), 0, "the pass left pages kept");

        // A block that ends inside a page: the free gives that page back too, and the
        // next claim of the slot calls dirty all it may find written (calloc clears
        // only that much).
        let odd_class = (0..size_class::STANDARD_CLASSES)
            .find(|&c| {
                let b = size_class::block_size(c);
                b > 2 * os::OS_PAGE_SIZE && !b.is_multiple_of(os::OS_PAGE_SIZE)
            })
            .expect("a class whose blocks end inside a page");
        let odd = size_class::block_size(odd_class);
        let b = take(odd_class, odd, 0, 0) as usize;
        // SAFETY: a live sampled block of `odd` bytes.
        unsafe { core::ptr::write_bytes(b as *mut u8, 0xff, odd) };
        assert!(free(b));
        assert!(trim() > 0);
        let again = take(odd_class, odd, 0, 0) as usize;
        assert_eq!(again, b, "the lowest clean slot was not taken");
        let dirty = dirty_prefix(again);
        // SAFETY: a live sampled block of `odd` bytes.
        let bytes = unsafe { core::slice::from_raw_parts(again as *const u8, odd) };
        let written = bytes.iter().rposition(|&x| x != 0).map_or(0, |i| i + 1);
        assert!(
            written <= dirty,
            "{written} bytes may be non-zero, {dirty} said"
        );
        assert!(free(again));
        trim();

        // Kept slots go to the blocks they fit best, and a block that takes a slot
        // keeping much more than it needs gives the excess back.
        let take_written = |size: usize| {
            let class = size_class::size_class_of(size);
            let usable = size_class::block_size(class);
            let b = take(class, usable, 0, 0) as usize;
            assert!(b != 0, "no slot for {size} bytes");
            // SAFETY: a live sampled block of `usable` bytes.
            unsafe { core::ptr::write_bytes(b as *mut u8, 0x5a, usable) };
            (b, usable)
        };
        let (big, big_len) = take_written(1 << SLOT_SHIFT);
        let (mid, mid_len) = take_written(64 << 10);
        assert!(free(big) && free(mid));
        let kept = |len: usize| len.next_multiple_of(os::OS_PAGE_SIZE) - os::OS_PAGE_SIZE;
        assert_eq!(DIRTY.load(Ordering::Relaxed), kept(big_len) + kept(mid_len));
        // A block of one page needs no kept pages: it takes a clean slot.
        let (small, _) = take_written(64);
        assert!(
            small != big && small != mid,
            "a one-page block took a kept slot"
        );
        assert_eq!(DIRTY.load(Ordering::Relaxed), kept(big_len) + kept(mid_len));
        // 48 KiB: both kept slots hold it; the smaller one is taken, as it is.
        let (fit, fit_len) = take_written(48 << 10);
        assert_eq!(fit, mid, "the best-fitting kept slot was not taken");
        assert!(mid_len - fit_len <= PINNED_EXCESS);
        assert_eq!(
            resident_pages(fit, 1 << SLOT_SHIFT),
            mid_len / os::OS_PAGE_SIZE
        );
        assert_eq!(DIRTY.load(Ordering::Relaxed), kept(big_len));
        // 20 KiB in the 256 KiB slot: all but the block's pages go back.
        let (cut, cut_len) = take_written(20 << 10);
        assert_eq!(cut, big, "the one kept slot left was not taken");
        assert_eq!(
            resident_pages(cut, 1 << SLOT_SHIFT),
            cut_len.div_ceil(os::OS_PAGE_SIZE),
            "a small block pins a big slot's pages"
        );
        assert_eq!(DIRTY.load(Ordering::Relaxed), 0);
        assert!(free(small) && free(fit) && free(cut));
        trim();
    }

    /// Stands for a program's allocation wrapper: calls what records the stack.
    #[inline(never)]
    fn wrapper_like() -> [usize; FRAMES] {
        core::hint::black_box(capture())
    }

    /// Stands for a call site of the wrapper.
    #[inline(never)]
    fn call_site() -> [usize; FRAMES] {
        core::hint::black_box(wrapper_like())
    }

    /// A sample returning to a wrapper takes the wrapper's caller as its call site;
    /// once two full unwinds agreed on the wrapper's frame size, the caller's return
    /// address is read there, and the frames kept are the same.
    #[test]
    #[cfg_attr(miri, ignore = "the unwinder is foreign code")]
    fn a_wrappers_caller_is_read_at_its_learned_frame_size() {
        // No frame here is lgmalloc's own code: the walk stops at the first frame
        // outside a wrapper.
        set_own_code(1, 2);
        let first = call_site();
        let returns_to_wrapper = first[0];
        assert!(returns_to_wrapper != 0 && first[1] == 0, "{first:x?}");
        set_wrapper_returns(Vec::leak(vec![returns_to_wrapper]));
        let shortcuts = || WRAPPER_SHORTCUTS.load(Ordering::Relaxed);
        let full = call_site();
        assert_eq!(full[0], returns_to_wrapper);
        assert!(full[1] != 0 && full[2] == 0, "{full:x?}");
        assert_eq!(shortcuts(), 0, "read before two unwinds agreed");
        assert_eq!(call_site(), full);
        assert_eq!(shortcuts(), 0, "read before two unwinds agreed");
        assert_eq!(
            WRAPPER_DEPTHS[0].load(Ordering::Relaxed) & 3,
            DEPTH_AGREEMENTS
        );
        for n in 1..=3 {
            assert_eq!(call_site(), full, "read at the learned frame size");
            assert_eq!(shortcuts(), n);
        }
        // A depth that the stack does not bear out is not learned.
        WRAPPER_DEPTHS[0].store(0, Ordering::Relaxed);
        let sp = &raw const full as usize;
        learn_wrapper_depth(0, sp, sp + 64, 1);
        assert_eq!(WRAPPER_DEPTHS[0].load(Ordering::Relaxed), 0);
        set_wrapper_returns(&[]);
    }

    #[test]
    fn intervals_have_the_mean() {
        let n = 20_000;
        let sum: usize = (0..n).map(|_| next_interval()).sum();
        let mean = sum as f64 / n as f64;
        assert!((mean / MEAN_INTERVAL as f64 - 1.0).abs() < 0.05, "{mean}");
    }
}
