//! Thread heaps: the per-thread front end.
//!
//! Each thread gets a heap on its first allocation. For every size class the heap
//! points at the page it allocates from; the page's other pages with room follow it on a
//! doubly linked list, and pages with no room sit on one `full` list for all classes.
//! The fast paths (`alloc_small`, `free_block`) touch only the calling thread's heap
//! and the page, with no lock and no atomic read-modify-write.
//!
//! A heap is small (about 2 KiB) and its pages start at one 1 KiB slice and grow as the
//! thread uses a class more, so an idle thread costs little. When the thread exits its
//! heap is abandoned: pages with live blocks go to the region to be adopted or swept,
//! empty ones are returned, and the heap record is reused by the next thread. A class's
//! only page stays with the heap when it empties, until it has lain unused for a
//! while (`age_kept_pages`).

use core::ptr;
use core::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};

use crossbeam_utils::CachePadded;

use crate::diag::misuse;
use crate::geometry::{SEGMENT_SIZE, SLICE_SIZE};
use crate::lock::Locked;
use crate::page::{self, Block, IN_FULL_FLAG, Owner, Page};
use crate::size_class::{self, HEAP_TABLE_LEN, HEAP_TABLE_MAX_SIZE, MAX_CLASSES, MAX_PAGE_BYTES};
use crate::{chunk_map, large, list, options, os, sample, segment, tls};

/// Pages of one class a heap doubles through before its pages stop growing.
const GROWTH_STEPS: u8 = 6;
/// Slices of empty pages a heap keeps for its own reuse before it gives some back to
/// the region (in one batch): enough for many pages of the largest size, so a thread
/// whose pages fill and empty in turn rarely visits the region's lock. (2 MiB: a Rust
/// program that builds and drops large maps made 2,600 region visits with 1 MiB and
/// 7 extra pages, 1,350 with this and 15; at most 2 MiB more stays resident per busy
/// thread, which the retention benchmark shows as about 1% of a 280 MiB peak.)
const SPARE_SLICES: usize = 2048;
/// Pages beyond the one asked for that a heap takes in one visit to the region, for a
/// class whose pages have grown to full size (at most half the spare bound).
const EXTRA_PAGES: usize = 15;
/// The runs of slices a heap takes from the region to cut young classes' pages from
/// (`run_tail`): young pages taken one by one first, the first run, and the largest,
/// reached by doubling.
const RUN_AFTER: u8 = 4;
const RUN_FIRST_SLICES: usize = 16;
const RUN_GROWTH_STEPS: u8 = 4;
const RUN_MAX_SLICES: usize = RUN_FIRST_SLICES << RUN_GROWTH_STEPS;
/// Young pages of at least this many slices (a large-block class's: four blocks of 8 KiB
/// to 64 KiB, or one larger block) come with a run of `RUN_LARGE_PAGES` such pages from
/// the start, up to `RUN_LARGE_MAX_SLICES` in all.
const RUN_LARGE_PAGE_SLICES: usize = 32;
const RUN_LARGE_PAGES: usize = 4;
const RUN_LARGE_MAX_SLICES: usize = 1024;
/// Abandoned pages of one class a heap adopts in one visit to the region.
const ADOPT_BATCH: usize = 16;
/// A heap looks at the clock for due purges at every this many pages that empty
/// (`page_emptied`). A program whose classes' pages empty often (a few live objects per
/// class) empties thousands a second, so the checks still come far more often than the
/// purge delay; at every eighth, the checks and their clock reads took about 0.1
/// instructions per malloc+free pair of the hot-path benchmark (2,073 of them in 1.1M
/// pairs).
const PURGE_CHECK_EVERY: u32 = 32;
/// ... and for the large objects and empty pages kept that are due to go back at every
/// this many (a multiple of `PURGE_CHECK_EVERY`): a loop whose class's only page
/// empties and fills in turn keeps a page all the time, and these checks read the
/// clock whenever anything is kept.
const RETAINED_CHECK_EVERY: u32 = 64;

#[repr(C)]
pub struct Heap {
    /// Per request size up to `DIRECT_MAX_SIZE`, by `(size + 15) / 16`: the page
    /// `malloc` pops from, `pages[class_of_small[bucket]]`, so the fast path reaches it
    /// with one load and no class lookup ([`alloc_by_size`]). Kept equal wherever
    /// `pages` changes ([`class_head_changed`]).
    direct: [*mut Page; DIRECT_LEN],
    /// Per class: the page allocations come from (head of that class's list), or the
    /// static empty page.
    pub pages: [*mut Page; MAX_CLASSES],
    /// The class of each request size up to `HEAP_TABLE_MAX_SIZE`, by `(size + 15) / 16`:
    /// a copy of the start of `size_class`'s table, so the fast path classifies with one
    /// load from this record ([`class_of_small`]). All zero in the empty heap, whose
    /// slow path classifies again.
    class_of_small: [u8; HEAP_TABLE_LEN],
    /// `page::link_key()`, kept here so the fast paths encode and decode free-list links
    /// (`hardened`) with one load from the heap they already hold. Zero in the empty heap
    /// (whose pages have no free blocks) and when not hardened.
    link_key: usize,
    /// Hardened only (no entries otherwise), per class: `link_key ^ pages[class]`. The
    /// fast pop XORs its page's head (`Page::free`, in link form: `block ^ link_key`)
    /// with it and gets `block ^ page` in one operation: below the segment size exactly
    /// when the block lies in the page's segment (the hardened check), and one more XOR
    /// with the page gives the block. Kept equal wherever `pages` changes
    /// ([`class_head_changed`]); the empty heap's entries make every pop fail the check.
    pop_keys: [usize; POP_KEYS],
    /// Hardened only, per bucket: `link_key ^ direct[bucket]`, as `pop_keys` for
    /// [`alloc_by_size`].
    direct_pop_keys: [usize; DIRECT_POP_KEYS],
    /// Per class: allocations served by class left before the class's next sampled
    /// one (`sample`): the fast path's one decrement both counts the allocation and
    /// times the sample. Never zero between allocations (the one that brings it to zero
    /// rearms it, [`rearm_sampling`]); one in a new heap, whose first allocation of the
    /// class arms it. 32 bits: an interval is at most 2^20 allocations, and the heap
    /// record, the bulk of a thread's memory, stays 516 bytes smaller.
    class_left: [u32; MAX_CLASSES],
    /// Per class: the intervals drawn for `class_left` so far, so that allocations served
    /// by class are `class_drawn - class_left` ([`class_counts`]; statistics,
    /// owner-written, read racily).
    class_drawn: [u64; MAX_CLASSES],
    /// Per bucket of `direct`, as `class_left` and `class_drawn` for the allocations the
    /// fast path of [`alloc_by_size`] served.
    bucket_left: [u32; DIRECT_LEN],
    bucket_drawn: [u64; DIRECT_LEN],
    /// A sample is being taken: an allocation it makes (the unwinder's, if any) that
    /// runs a countdown out only rearms it.
    sampling: bool,
    /// Pages of each class this heap has acquired so far (saturating), to size the next.
    page_growth: [u8; MAX_CLASSES],
    /// Pages with no free block, all classes.
    full: *mut Page,
    /// Empty pages kept for reuse by this heap, newest first (a plain list through the
    /// page links), and the slices they cover (at most `SPARE_SLICES` after each
    /// retirement). A page retired whole keeps its blocks carved, all on its free list
    /// and marked freed, so its class takes it back as it is (`is_warm_spare`); any
    /// other spare has `carved` zero. Either way no pointer into one passes as a live
    /// block.
    spare: *mut Page,
    spare_slices: usize,
    /// A spare was taken since the last aging ([`age_kept_pages`]).
    spare_taken: bool,
    /// Pages of this heap that became empty (wrapping): every `PURGE_CHECK_EVERY`-th
    /// looks at the clock for purges that are due ([`page_emptied`]).
    emptied_pages: u32,
    /// Per class: the generation in which its only page last emptied and was kept
    /// (0: none yet), and the current generation, never 0 ([`age_kept_pages`]).
    kept_in: [u8; MAX_CLASSES],
    generation: u8,
    /// When the kept pages were last aged (`os::now_ms`), and allocation slow paths
    /// since the clock was last read for it.
    aged_ms: u64,
    slow_paths: u32,
    /// Live heaps list (statistics), guarded by the pool lock.
    next_live: *mut Heap,
    prev_live: *mut Heap,
    /// The thread that owns this heap (`pthread_self`).
    pub thread: usize,
    /// What the records of this heap's pages hold as their owner
    /// ([`owner_id_of_this_thread`], or an orphan's id): the owning thread's id, so
    /// that the free fast path compares a page with the thread it runs on.
    owner_id: *mut Owner,
    /// Verify mode: set while this thread matches an allocation to its call site.
    verifying: bool,
    /// Young classes' pages this heap has taken from the region (saturating), to size
    /// the run of slices taken with the next (`run_tail`).
    young_pages: u8,
    /// Per class: the class's first page (`pages[class]`) was set up on memory that
    /// read as zero, so the blocks `page::extend` carves from it are zero but for the
    /// two words carving writes (nothing writes past a page's carved blocks). Cleared
    /// whenever the class's first page changes; consulted only by slow paths.
    zero_tail: [bool; MAX_CLASSES],
    /// The block the last carve from such a page put first on its free list; `calloc`'s
    /// slow path clears it before looking for a page, so the block it pops equals this
    /// only when it was carved during that same call (never handed out before).
    zero_block: *mut Block,
    /// Blocks handed back by other threads for pages this heap watches (see `page`).
    delayed_free: CachePadded<AtomicPtr<Block>>,
}

// SAFETY: heaps are reached from other threads only through `delayed_free` (atomic)
// and statistics reads under the pool lock.
unsafe impl Sync for Heap {}

// SAFETY: `next_live` and `prev_live` are the record's links on the pool's lists, written
// only under the pool lock.
unsafe impl list::Linked for Heap {
    unsafe fn next(this: *mut Self) -> *mut *mut Self {
        // SAFETY: `this` is a live record per the contract.
        unsafe { &raw mut (*this).next_live }
    }
    unsafe fn prev(this: *mut Self) -> *mut *mut Self {
        // SAFETY: `this` is a live record per the contract.
        unsafe { &raw mut (*this).prev_live }
    }
}

/// The page every class of a new heap points at: it has no free block, so the fast path
/// falls through to the slow path, which finds a real page.
pub static EMPTY_PAGE: Page = Page::empty();

/// The heap of a thread that has not allocated yet. Never written.
pub static EMPTY_HEAP: Heap = Heap {
    direct: [&raw const EMPTY_PAGE as *mut Page; DIRECT_LEN],
    pages: [&raw const EMPTY_PAGE as *mut Page; MAX_CLASSES],
    class_of_small: [0; HEAP_TABLE_LEN],
    link_key: 0,
    // `EMPTY_PAGE.free` is zero: `0 ^ (1 << 63)` fails the segment check.
    pop_keys: [1 << (usize::BITS - 1); POP_KEYS],
    direct_pop_keys: [1 << (usize::BITS - 1); DIRECT_POP_KEYS],
    class_left: [0; MAX_CLASSES],
    class_drawn: [0; MAX_CLASSES],
    bucket_left: [0; DIRECT_LEN],
    bucket_drawn: [0; DIRECT_LEN],
    sampling: false,
    page_growth: [0; MAX_CLASSES],
    full: ptr::null_mut(),
    spare: ptr::null_mut(),
    spare_slices: 0,
    spare_taken: false,
    emptied_pages: 0,
    kept_in: [0; MAX_CLASSES],
    generation: 1,
    aged_ms: 0,
    slow_paths: 0,
    next_live: ptr::null_mut(),
    prev_live: ptr::null_mut(),
    thread: 0,
    owner_id: ptr::without_provenance_mut(ORPHAN_OWNER_TAG),
    verifying: false,
    young_pages: 0,
    zero_tail: [false; MAX_CLASSES],
    zero_block: ptr::null_mut(),
    delayed_free: CachePadded::new(AtomicPtr::new(ptr::null_mut())),
};

/// Entries of `Heap::pop_keys`: one per class when hardened, none otherwise.
const POP_KEYS: usize = if page::HARDENED { MAX_CLASSES } else { 0 };
/// Requests `malloc` serves through `Heap::direct`: the sizes most allocations ask
/// for (81-99% of the small allocations of git log -p, a perl hash build, sort and g++
/// with all its processes, measured with `LGMALLOC_SHOW_STATS`), for 272 bytes per
/// heap; larger ones classify first.
pub const DIRECT_MAX_SIZE: usize = 256;
const DIRECT_LEN: usize = DIRECT_MAX_SIZE / 16 + 1;
const _: () = assert!(DIRECT_MAX_SIZE <= HEAP_TABLE_MAX_SIZE);
/// Entries of `Heap::direct_pop_keys`: one per bucket when hardened, none otherwise.
const DIRECT_POP_KEYS: usize = if page::HARDENED { DIRECT_LEN } else { 0 };

#[inline(always)]
fn empty_page() -> *mut Page {
    &raw const EMPTY_PAGE as *mut Page
}

#[inline(always)]
pub fn empty_heap() -> *mut Heap {
    &raw const EMPTY_HEAP as *mut Heap
}

// The thread's heap pointer, in initial-exec TLS (see `tls`): it starts at the empty
// heap, so the fast path needs no null check; the second slot holds verify mode's real
// heap.
#[cfg(all(target_arch = "x86_64", not(miri)))]
core::arch::global_asm!(
    ".pushsection .tdata,\"awT\",@progbits",
    ".p2align 3",
    ".globl __lgmalloc_thread_heap",
    ".hidden __lgmalloc_thread_heap",
    ".type __lgmalloc_thread_heap, @object",
    ".size __lgmalloc_thread_heap, 8",
    "__lgmalloc_thread_heap:",
    ".quad {empty}",
    ".globl __lgmalloc_verify_heap",
    ".hidden __lgmalloc_verify_heap",
    ".type __lgmalloc_verify_heap, @object",
    ".size __lgmalloc_verify_heap, 8",
    "__lgmalloc_verify_heap:",
    ".quad 0",
    ".popsection",
    empty = sym EMPTY_HEAP,
);

/// The heap of the calling thread (the empty heap before the thread's first malloc).
#[inline(always)]
pub fn thread_heap() -> *mut Heap {
    let heap = tls::thread_heap().cast::<Heap>();
    if tls::SLOTS_START_NULL && heap.is_null() {
        return empty_heap();
    }
    heap
}

/// In verify mode the thread's real heap (the main slot then stays on the empty heap so
/// that every allocation reaches the slow path, where it is matched to its call site).
#[inline]
pub fn verify_heap() -> *mut Heap {
    tls::verify_heap().cast()
}

/// The owner id `heap`'s page records store ([`Heap::owner_id`]).
///
/// # Safety
/// `heap` is a live heap record (or the empty heap).
#[inline(always)]
unsafe fn owner(heap: *mut Heap) -> *mut Owner {
    // SAFETY: per the contract.
    unsafe { (*heap).owner_id }
}

/// The owner id of a heap of the calling thread: its thread id, which the free fast
/// path compares a page's owner with; in verify mode, one more, which no thread has,
/// so that every free of the thread reaches the slow path as the allocations do.
fn owner_id_of_this_thread(verify: bool) -> *mut Owner {
    ptr::without_provenance_mut(tls::thread_id() | if verify { VERIFY_OWNER_TAG } else { 0 })
}

/// Owner ids no thread has (thread ids are multiples of 8, `tls::thread_id`): verify
/// mode's heaps (the thread's id plus this), and orphaned heaps (their own address plus
/// this, [`orphan`]; the empty heap's is this alone).
const VERIFY_OWNER_TAG: usize = 1;
const ORPHAN_OWNER_TAG: usize = 2;

/// `heap` as the watcher a full page's record carries ([`page::try_watch`]).
#[inline(always)]
fn watcher(heap: *mut Heap) -> *mut page::Watcher {
    heap.cast()
}

// ---- the fast paths --------------------------------------------------------------------

/// The class serving a request of `size` bytes, from `heap`'s copy of the class table.
///
/// # Safety
/// `heap` is the calling thread's heap (possibly the empty heap, which answers class 0
/// for every size: its slow path classifies again); `size <= HEAP_TABLE_MAX_SIZE`.
#[inline(always)]
pub unsafe fn class_of_small(heap: *mut Heap, size: usize) -> usize {
    debug_assert!(size <= HEAP_TABLE_MAX_SIZE);
    // SAFETY: per the contract `(size + 15) >> 4 < HEAP_TABLE_LEN`; the copy is written
    // only by its owner thread (`refresh_class_table`).
    unsafe { *(*heap).class_of_small.get_unchecked((size + 15) >> 4) as usize }
}

/// Copies the class table's start into the calling thread's heap again: the plan adds
/// exact-fit classes before `main`, after the initialising thread's first allocations
/// made its heap. Heaps of other threads (started by earlier constructors, if any) keep
/// the standard classes for those sizes.
pub fn refresh_class_table() {
    let heap = thread_heap();
    if heap != empty_heap() {
        // SAFETY: the calling thread's own live heap.
        unsafe {
            // Counts kept by bucket belong to the classes of the table they were made
            // under.
            let mut by_class = [0; MAX_CLASSES];
            class_counts(heap, &mut by_class);
            for (c, n) in by_class.iter().enumerate() {
                (*heap).class_drawn[c] = n.wrapping_add(u64::from((*heap).class_left[c]));
            }
            (*heap).bucket_drawn = (*heap).bucket_left.map(u64::from);
            (*heap).class_of_small = size_class::heap_table();
            for bucket in 0..DIRECT_LEN {
                let class = (*heap).class_of_small[bucket] as usize;
                set_direct(heap, bucket, *(*heap).pages.get_unchecked(class));
            }
        }
    }
}

/// `heap`'s allocations per class: those counted by class and those `malloc`'s fast
/// path counted by bucket. Racy when `heap` is another thread's (statistics): a
/// countdown read while its owner rearms it may pair an old and a new word, which is
/// off by up to one interval and, saturating, never wraps.
///
/// # Safety
/// `heap` is a live heap record.
unsafe fn class_counts(heap: *const Heap, out: &mut [u64; MAX_CLASSES]) {
    // SAFETY: per the contract; the counters are plain words written by the heap's
    // owner, read here (for another thread's heap) as a racy snapshot.
    unsafe {
        for (c, slot) in out.iter_mut().enumerate() {
            *slot = ptr::read_volatile(&(*heap).class_drawn[c])
                .saturating_sub(u64::from(ptr::read_volatile(&(*heap).class_left[c])));
        }
        for bucket in 0..DIRECT_LEN {
            let class = (*heap).class_of_small[bucket] as usize;
            let served = ptr::read_volatile(&(*heap).bucket_drawn[bucket])
                .saturating_sub(u64::from(ptr::read_volatile(&(*heap).bucket_left[bucket])));
            out[class] = out[class].saturating_add(served);
        }
    }
}

/// Pops a block of class `class` (chosen for a request of `size` bytes), or takes the
/// slow path. Null only when out of memory.
///
/// # Safety
/// `heap` is the calling thread's heap (possibly the empty heap).
#[inline(always)]
pub unsafe fn alloc_small(
    heap: *mut Heap,
    class: usize,
    size: usize,
    caller: impl SampleCaller,
) -> *mut u8 {
    // SAFETY: forwarded contract.
    unsafe { alloc_small_as::<false>(heap, class, size, caller) }
}

/// `calloc` of a small block: `size` bytes of class `class`, zeroed. Every path clears
/// the block it hands out itself, so the fast path's sampled branch stays a tail jump
/// (which hands the sampler the caller's return address, as for `malloc`).
///
/// # Safety
/// As for [`alloc_small`].
#[inline(always)]
pub unsafe fn alloc_small_zeroed(heap: *mut Heap, class: usize, size: usize) -> *mut u8 {
    // SAFETY: forwarded contract.
    unsafe { alloc_small_as::<true>(heap, class, size, CallerOnStack) }
}

/// [`alloc_small`], or [`alloc_small_zeroed`] when `ZEROED`.
///
/// # Safety
/// As for [`alloc_small`].
#[inline(always)]
unsafe fn alloc_small_as<const ZEROED: bool>(
    heap: *mut Heap,
    class: usize,
    size: usize,
    caller: impl SampleCaller,
) -> *mut u8 {
    // SAFETY: `class < MAX_CLASSES` (from the class table); the page is either the
    // static empty page or a page owned by this thread; `pop_keys` has an entry per
    // class when hardened, the only case its closure runs.
    unsafe {
        let count = (&raw mut (*heap).class_left).cast::<u32>().add(class);
        pop_from::<ZEROED>(
            heap,
            *(*heap).pages.get_unchecked(class),
            || *(*heap).pop_keys.get_unchecked(class),
            count,
            size,
            caller,
            || {
                if ZEROED {
                    alloc_slow_zeroed(size, heap, class)
                } else {
                    alloc_after_empty_pop(size, heap, class, caller)
                }
            },
        )
    }
}

/// `malloc` of at most `DIRECT_MAX_SIZE` bytes: pops a block from the page the
/// heap keeps for the request's 16-byte bucket (`Heap::direct`, the page of the
/// bucket's class), or takes the slow path. Null only when out of memory.
///
/// # Safety
/// `heap` is the calling thread's heap (possibly the empty heap);
/// `size <= DIRECT_MAX_SIZE`.
#[inline(always)]
pub unsafe fn alloc_by_size(heap: *mut Heap, size: usize, caller: impl SampleCaller) -> *mut u8 {
    debug_assert!(size <= DIRECT_MAX_SIZE);
    let bucket = (size + 15) >> 4;
    // SAFETY: `bucket < DIRECT_LEN` per the contract; the page is either the static
    // empty page or a page owned by this thread; `direct_pop_keys` has an entry per
    // bucket when hardened, the only case its closure runs.
    unsafe {
        let count = (&raw mut (*heap).bucket_left).cast::<u32>().add(bucket);
        pop_from::<false>(
            heap,
            *(*heap).direct.get_unchecked(bucket),
            || *(*heap).direct_pop_keys.get_unchecked(bucket),
            count,
            size,
            caller,
            || alloc_slow_by_size(size, heap, caller),
        )
    }
}

/// The fast pop shared by [`alloc_small_as`] and [`alloc_by_size`]: the head of
/// `page`'s free list (checked against `pop_key`, `link_key ^ page`, when hardened),
/// counted in `*count`, or `slow()` when the list is empty (or, hardened, its head
/// fails the check).
///
/// # Safety
/// `page` is the static empty page or a page of `heap` (the calling thread's) whose
/// class serves `size`; `count` points into `heap`, taken with `&raw mut` (never
/// through a `&mut`, such as `as_mut_ptr()`): `heap` may be the immutable static empty
/// heap, which no `&mut` may cover, and the pop never counts there, as the empty page
/// has no block.
#[inline(always)]
unsafe fn pop_from<const ZEROED: bool>(
    heap: *mut Heap,
    page: *mut Page,
    pop_key: impl FnOnce() -> usize,
    count: *mut u32,
    size: usize,
    caller: impl SampleCaller,
    slow: impl FnOnce() -> *mut u8,
) -> *mut u8 {
    // SAFETY: per the contract.
    unsafe {
        let head = (*page).free;
        let block = if page::HARDENED {
            // `head ^ pop_key` is `block ^ page` (see `Heap::pop_keys`): the segment
            // check of `is_in_page_segment`, which the list's end (null) fails too.
            let offset = head.addr() ^ pop_key();
            if offset >= SEGMENT_SIZE {
                return slow();
            }
            ptr::with_exposed_provenance_mut::<Block>(page.addr() ^ offset)
        } else {
            if head.is_null() {
                return slow();
            }
            head
        };
        pop_block::<ZEROED>(heap, page, block, count, size, caller)
    }
}

/// The slow path of [`alloc_by_size`]: classifies the request with the heap's table
/// and goes on as [`alloc_small`]'s would. Reached by a tail jump.
///
/// # Safety
/// As for [`alloc_by_size`].
#[cold]
#[inline(never)]
unsafe fn alloc_slow_by_size(size: usize, heap: *mut Heap, caller: impl SampleCaller) -> *mut u8 {
    // SAFETY: forwarded contract (the empty heap answers class 0, and its slow path
    // classifies again).
    unsafe { alloc_after_empty_pop(size, heap, class_of_small(heap, size), caller) }
}

/// Where a `malloc` whose fast pop found no block goes: the slow path, after the check
/// for a corrupted list when hardened ([`alloc_empty_or_corrupted`]).
///
/// # Safety
/// As for [`alloc_small`].
#[inline(always)]
unsafe fn alloc_after_empty_pop(
    size: usize,
    heap: *mut Heap,
    class: usize,
    caller: impl SampleCaller,
) -> *mut u8 {
    // SAFETY: forwarded contract.
    unsafe {
        if page::HARDENED {
            alloc_empty_or_corrupted(size, heap, class, caller)
        } else {
            alloc_slow(size, heap, class, caller)
        }
    }
}

/// Takes `block`, the head of `page`'s free list, off the list and hands it out
/// (cleared, when `ZEROED`): the part of an allocation every path that pops a block
/// shares.
///
/// # Safety
/// `page` is a page of `heap` owned by the calling thread whose class serves `size`,
/// `block` its free list's head (checked by the caller when hardened); `count` points
/// at one of `heap`'s allocation counters.
#[inline(always)]
unsafe fn pop_block<const ZEROED: bool>(
    heap: *mut Heap,
    page: *mut Page,
    block: *mut Block,
    count: *mut u32,
    size: usize,
    caller: impl SampleCaller,
) -> *mut u8 {
    // SAFETY: per the contract.
    unsafe {
        // The link stays in link form: the head's.
        (*page).free = (*block).next;
        (*page).used += 1;
        if CHECKED {
            (*block).freed_mark = 0;
        }
        // Counts the allocation and times the next sample (the countdown never rests at
        // zero, so the count is exact).
        *count -= 1;
        if *count == 0 {
            return caller.take_sample::<ZEROED>(size, heap, page, block);
        }
        if ZEROED {
            ptr::write_bytes(block.cast::<u8>(), 0, size);
        }
        block.cast()
    }
}

/// `alloc_small` (hardened) when the head of the class's page failed the segment check:
/// the page is the empty page or its list is empty (take the slow path), or the list is
/// corrupted (stop). Reached by a tail jump, so the fast path needs no stack frame (and
/// reads the head again, so the fast path keeps no copy of it).
#[cold]
#[inline(never)]
unsafe fn alloc_empty_or_corrupted(
    size: usize,
    heap: *mut Heap,
    class: usize,
    caller: impl SampleCaller,
) -> *mut u8 {
    // SAFETY: as for `alloc_small` (the empty heap's pages are all the empty page, whose
    // head is never decoded).
    unsafe {
        stop_if_corrupted(heap, class);
        alloc_slow(size, heap, class, caller)
    }
}

/// Stops with a message when the head of `heap`'s page of class `class` is not null:
/// the caller found it failing the segment check (hardened).
///
/// # Safety
/// As for [`alloc_small`].
unsafe fn stop_if_corrupted(heap: *mut Heap, class: usize) {
    // SAFETY: as for `alloc_small` (the empty heap's pages are all the empty page, whose
    // head is never decoded).
    unsafe {
        let page = *(*heap).pages.get_unchecked(class);
        if page != empty_page() {
            let block = page::encode_link((*heap).link_key, (*page).free);
            if !block.is_null() {
                page::corrupted_link(block);
            }
        }
    }
}

/// Frees a block of a small-object page, stopping with a message if `block` is not a
/// block start of that page or was already freed.
///
/// # Safety
/// `page` is the record `segment::page_of` gives for `block`, an address in one of our
/// segments.
#[inline(always)]
pub unsafe fn free_block(page: *mut Page, block: *mut u8) {
    // SAFETY: `page` is a record in our segment metadata; once `block` is known to be a
    // block start of it, its two words are ours to read and write.
    unsafe {
        let b = block.cast::<Block>();
        if CHECKED {
            if !page::is_block_start_fast(page, block as usize) {
                return free_unusual(block, page);
            }
            let mark = page::freed_mark(page);
            if (*b).freed_mark == mark {
                return free_unusual(block, page);
            }
            (*b).freed_mark = mark;
        }
        free_checked(page, b);
    }
}

/// The rest of a free once `b` is known to be a live block of `page`: the owner pushes
/// it on `page.free`, anyone else on the remote list.
///
/// # Safety
/// `b` is a live block of `page` that the caller gives up, already marked free.
#[inline(always)]
unsafe fn free_checked(page: *mut Page, b: *mut Block) {
    // SAFETY: per the contract; owner access to `free` and `used` once the owner
    // comparison holds: the page is the calling thread's, on its heap's lists (or a
    // gone thread's page with this id whose heap nobody uses: `free_local_slow` tells).
    unsafe {
        if page::is_owned_by(page, ptr::without_provenance_mut(tls::thread_id())) {
            // The head is in link form already: the new link is a copy. (Hardened, the
            // key is read from the thread's heap; otherwise that read goes unused. A
            // thread with no heap encodes with the empty heap's zero key: only a gone
            // thread's page, which nobody pops from again, gets such a link.)
            (*b).next = (*page).free;
            (*page).free = page::encode_link((*thread_heap()).link_key, b);
            if page::release_one(page) {
                free_local_slow(thread_heap(), page);
            }
        } else {
            free_remote(b, page);
        }
    }
}

/// Whether frees are checked for invalid pointers and double frees (the default; the
/// `unchecked` feature removes the checks to save about a dozen instructions per free).
const CHECKED: bool = !cfg!(feature = "unchecked");

/// A free that failed the fast checks of `free_block`: a block of a page the
/// one-comparison check does not cover (freed here), or misuse (stopped with a
/// message). Declared as returning so the fast path reaches it by a tail jump and needs
/// no stack frame.
#[cold]
#[inline(never)]
unsafe fn free_unusual(block: *mut u8, page: *mut Page) {
    // SAFETY: as in `free_block`; `check_live` returns only for a live block start.
    unsafe {
        check_live(
            page,
            block,
            "free of a pointer lgmalloc never returned",
            "double free",
        );
        let b = block.cast::<Block>();
        (*b).freed_mark = page::freed_mark(page);
        free_checked(page, b);
    }
}

/// Stops with a message unless `block` is a live block of `page` (for realloc).
///
/// # Safety
/// As for [`free_block`].
pub unsafe fn check_live(page: *const Page, block: *const u8, invalid: &str, freed: &str) {
    if !CHECKED {
        return;
    }
    // SAFETY: as in `free_block`.
    unsafe {
        if !page::is_block_start(page, block as usize) {
            misuse(invalid, block as usize);
        }
        if (*block.cast::<Block>()).freed_mark == page::freed_mark(page) {
            misuse(freed, block as usize);
        }
    }
}

// ---- slow paths --------------------------------------------------------------------------

// The request size comes first, where the C entry points receive it, so the fast paths
// reach this by a tail jump without moving it. `caller` is generic, so a sample taken
// here finds its call site as the fast path's would: on the stack (the fast path
// reached this by a tail jump, and the sampled branch here is one too) or passed in.
#[cold]
#[inline(never)]
unsafe fn alloc_slow(
    size: usize,
    heap: *mut Heap,
    class: usize,
    caller: impl SampleCaller,
) -> *mut u8 {
    // SAFETY: forwarded contract.
    unsafe { slow_pop(size, heap, class, caller).0 }
}

/// The allocation slow path: finds or makes a page with a free block and pops it. Also
/// says whether the block returned was carved during this call from a page whose
/// memory read as zero (see `Heap::zero_tail`): then only its first two words may be
/// non-zero.
///
/// # Safety
/// As for [`alloc_small`].
#[inline(always)]
unsafe fn slow_pop(
    size: usize,
    heap: *mut Heap,
    class: usize,
    caller: impl SampleCaller,
) -> (*mut u8, bool) {
    let mut class = class;
    let heap = if heap == empty_heap() {
        // The first allocation of this thread may also be the first of the process,
        // made before the class table was built: classify again once it exists.
        let h = thread_heap_or_create();
        class = size_class::size_class_of(size);
        if options::verify() {
            verify_record(h, size);
        }
        h
    } else {
        heap
    };
    if heap.is_null() {
        os::set_errno(libc::ENOMEM);
        return (ptr::null_mut(), false);
    }
    // SAFETY: `heap` is this thread's live heap.
    unsafe {
        (*heap).zero_block = ptr::null_mut();
        let page = find_page(heap, class);
        if page.is_null() {
            os::set_errno(libc::ENOMEM);
            return (ptr::null_mut(), false);
        }
        let block = page::encode_link((*heap).link_key, (*page).free);
        if page::HARDENED && !page::is_in_page_segment(page, block) {
            page::corrupted_link(block);
        }
        let zero = block == (*heap).zero_block;
        let p = pop_block::<false>(
            heap,
            page,
            block,
            (&raw mut (*heap).class_left).cast::<u32>().add(class),
            size,
            caller,
        );
        // A sampled allocation is served elsewhere (`p` is not the block).
        (p, zero && p == block.cast())
    }
}

/// The slow path of [`alloc_small_zeroed`] (the page's list is empty, or, hardened,
/// its head failed the segment check). A block carved just now from memory that reads
/// as zero (see `slow_pop`) needs only its two carving words cleared; any other block,
/// freed before or carved earlier with others (which a `malloc` may have handed out
/// and taken back since: nothing on the fast paths records it), is cleared whole.
///
/// Reached by a tail jump from `calloc`'s fast path, so the word at the stack pointer
/// is the return address into the program: a naked trampoline passes it on to
/// [`alloc_slow_zeroed_at`], whose sample (the block is cleared after the pop, so its
/// sampled branch is no tail jump) records the call site with it. Other targets (and
/// Miri) pass none (`pass_caller`).
///
/// # Safety
/// As for [`alloc_small`].
#[cfg_attr(all(target_arch = "x86_64", not(miri)), unsafe(naked))]
unsafe extern "C" fn alloc_slow_zeroed(size: usize, heap: *mut Heap, class: usize) -> *mut u8 {
    pass_caller!(alloc_slow_zeroed_at(size, heap, class), "rcx")
}

/// [`alloc_slow_zeroed`], told the caller's return address (`ret`, 0 if unknown).
///
/// # Safety
/// As for [`alloc_small`].
#[cold]
#[inline(never)]
unsafe extern "C" fn alloc_slow_zeroed_at(
    size: usize,
    heap: *mut Heap,
    class: usize,
    ret: usize,
) -> *mut u8 {
    // SAFETY: forwarded contract.
    unsafe {
        if page::HARDENED {
            stop_if_corrupted(heap, class);
        }
        let (p, zero) = slow_pop(size, heap, class, CallerAt(ret));
        if p.is_null() {
            return p;
        }
        if zero {
            // The block's link and freed mark; blocks are at least 16 bytes.
            p.cast::<Block>().write(Block {
                next: ptr::null_mut(),
                freed_mark: 0,
            });
        } else {
            ptr::write_bytes(p, 0, dirty_prefix(p, size));
        }
        p
    }
}

/// Bytes of `p`, a block of `size` bytes just handed out but not known to read as zero,
/// that `calloc` must clear: all of them, except a sampled block (served from its own
/// slot, `sample::take`) larger than a page, whose slot says how much of it was used.
fn dirty_prefix(p: *mut u8, size: usize) -> usize {
    if size > os::OS_PAGE_SIZE && chunk_map::kind_of(p as usize) == chunk_map::KIND_SAMPLE {
        sample::dirty_prefix(p as usize).min(size)
    } else {
        size
    }
}

/// Defines `$name(size, heap, page, block)`, where the fast path goes when the
/// sampling countdown runs out, as a naked trampoline into `$target`: reached by a tail
/// jump from the fast path, so the word at the stack pointer (`$slot` words up, for a
/// fast path called by an entry point that pushed that many) is the return address into
/// the allocating caller, which it passes on as `$target`'s fifth argument. The
/// arguments come in the order the fast path holds them in registers (`size` first,
/// where malloc received it), so the jump takes one move rather than a shuffle. Other
/// targets (and Miri) pass no return address.
macro_rules! sampled_entry {
    ($(#[$doc:meta])* $name:ident => $target:ident) => {
        sampled_entry!($(#[$doc])* $name => $target, "0");
    };
    ($(#[$doc:meta])* $name:ident => $target:ident, $slot:literal) => {
        $(#[$doc])*
        ///
        /// # Safety
        /// As for [`alloc_sampled_at`].
        #[cfg(all(target_arch = "x86_64", not(miri)))]
        #[unsafe(naked)]
        unsafe extern "C" fn $name(
            size: usize,
            heap: *mut Heap,
            page: *mut Page,
            block: *mut Block,
        ) -> *mut u8 {
            core::arch::naked_asm!(
                concat!("mov r8, [rsp + 8 * ", $slot, "]"),
                "jmp {f}",
                f = sym $target,
            )
        }

        #[cfg(not(all(target_arch = "x86_64", not(miri))))]
        unsafe extern "C" fn $name(
            size: usize,
            heap: *mut Heap,
            page: *mut Page,
            block: *mut Block,
        ) -> *mut u8 {
            // SAFETY: forwarded contract; no return address known.
            unsafe { $target(size, heap, page, block, 0) }
        }
    };
}

sampled_entry!(
    /// The sampling countdown ran out: records the sample ([`alloc_sampled_at`]).
    alloc_sampled => alloc_sampled_at
);

sampled_entry!(
    /// [`alloc_sampled`] for `calloc`: the block handed out is cleared.
    alloc_sampled_zeroed => alloc_sampled_zeroed_at
);

#[cfg(feature = "override")]
sampled_entry!(
    /// [`alloc_sampled`] for `operator new`'s attempt ([`CallerOfNew`]).
    alloc_sampled_for_new => alloc_sampled_at, "2"
);

/// Where the allocation fast path finds the return address of the allocating call
/// when the sampling countdown runs out: the sample's call site.
pub trait SampleCaller: Copy {
    /// Records the sample of `block`, just popped from `page` for a request of `size`
    /// bytes, and hands out the block to use ([`alloc_sampled_at`]; cleared when
    /// `ZEROED`).
    ///
    /// # Safety
    /// As for [`alloc_sampled_at`].
    unsafe fn take_sample<const ZEROED: bool>(
        self,
        size: usize,
        heap: *mut Heap,
        page: *mut Page,
        block: *mut Block,
    ) -> *mut u8;
}

/// The fast path was entered straight from the program and reaches the sampler by a
/// tail jump, so the return address is the word at the stack pointer
/// ([`alloc_sampled`]): `malloc`, `calloc`. Elsewhere the sampler finds an address
/// inside lgmalloc there and walks the stack.
#[derive(Clone, Copy)]
pub struct CallerOnStack;

/// The fast path runs in the function the throwing `operator new(size)` calls, with
/// the one word it pushed: the sampler is reached by a tail jump and finds the
/// program's return address two words up the stack ([`alloc_sampled_for_new`]).
/// Not for `calloc`'s path (no such trampoline: its samples would walk the stack).
#[cfg(feature = "override")]
#[derive(Clone, Copy)]
pub struct CallerOfNew;

/// The entry point read the return address itself (0: unknown, walk the stack): for
/// paths that call the allocator and do more after it, such as `realloc` (which copies
/// and frees).
#[derive(Clone, Copy)]
pub struct CallerAt(pub usize);

/// Implements [`SampleCaller`] for `$caller`: its sampled branch is `$plain`, or
/// `$zeroed` for `calloc`, expressions in the names the `|...|` gives to the caller
/// value and the four arguments.
macro_rules! sample_caller {
    (
        $caller:ty,
        |$this:pat, $size:ident, $heap:ident, $page:ident, $block:ident|
        $plain:expr,
        $zeroed:expr $(,)?
    ) => {
        impl SampleCaller for $caller {
            #[inline(always)]
            unsafe fn take_sample<const ZEROED: bool>(
                self,
                $size: usize,
                $heap: *mut Heap,
                $page: *mut Page,
                $block: *mut Block,
            ) -> *mut u8 {
                let $this = self;
                // SAFETY: forwarded contract.
                unsafe { if ZEROED { $zeroed } else { $plain } }
            }
        }
    };
}

sample_caller!(
    CallerOnStack,
    |_, size, heap, page, block| alloc_sampled(size, heap, page, block),
    alloc_sampled_zeroed(size, heap, page, block),
);

#[cfg(feature = "override")]
sample_caller!(
    CallerOfNew,
    |_, size, heap, page, block| alloc_sampled_for_new(size, heap, page, block),
    alloc_sampled_zeroed_at(size, heap, page, block, 0),
);

sample_caller!(
    CallerAt,
    |CallerAt(ret), size, heap, page, block| alloc_sampled_at(size, heap, page, block, ret),
    alloc_sampled_zeroed_at(size, heap, page, block, ret),
);

/// [`alloc_sampled_at`], then clears what `calloc` must of the block handed out.
///
/// # Safety
/// As for [`alloc_sampled_at`].
#[cold]
#[inline(never)]
unsafe extern "C" fn alloc_sampled_zeroed_at(
    size: usize,
    heap: *mut Heap,
    page: *mut Page,
    block: *mut Block,
    ret: usize,
) -> *mut u8 {
    // SAFETY: forwarded contract; the block handed out holds at least `size` bytes.
    unsafe {
        let p = alloc_sampled_at(size, heap, page, block, ret);
        ptr::write_bytes(p, 0, dirty_prefix(p, size));
        p
    }
}

/// Records this allocation as a sample and, when `sample` follows it to its free,
/// serves it from the sample arena (whose frees leave the fast path) and gives back the
/// block just popped; keeps that block when the sample is not followed or no sample
/// slot is free. `ret` is the caller's return address if the fast path was entered
/// without a stack frame or the entry point passed it ([`SampleCaller`]); else an
/// address inside lgmalloc, or 0, and `sample` unwinds.
/// Nested allocations (the unwinder's, if any) find the countdown disarmed.
///
/// # Safety
/// `block` was just popped from `page`, a page of this thread's live `heap`, and
/// nothing else touched the page since.
#[cold]
#[inline(never)]
unsafe extern "C" fn alloc_sampled_at(
    size: usize,
    heap: *mut Heap,
    page: *mut Page,
    block: *mut Block,
    ret: usize,
) -> *mut u8 {
    // SAFETY: per the contract; undoing the pop restores the page exactly.
    unsafe {
        let class = (*page).class as usize;
        // Rearmed first, so the countdowns the sample's own allocations run out are
        // the only ones at zero then.
        let Some((unit, armed_now)) = rearm_sampling(heap, size, class) else {
            return block.cast();
        };
        // Not a sample: an allocation of the sampler's, the countdown's first (which
        // armed it), or one thinned out (the countdown samples allocations of the
        // unit's size; one of `size` bytes is kept with chance `size / unit`, so
        // sampling stays per byte asked for, as the profile reads it).
        if (*heap).sampling || armed_now || !sample::keep_thinned(size, unit) {
            return block.cast();
        }
        (*heap).sampling = true;
        let p = sample::take(class, size, (*heap).thread, ret);
        (*heap).sampling = false;
        if p.is_null() {
            return block.cast();
        }
        (*block).next = (*page).free;
        if CHECKED {
            (*block).freed_mark = page::freed_mark(page);
        }
        (*page).free = page::encode_link((*heap).link_key, block);
        (*page).used -= 1;
        p
    }
}

/// Rearms the countdown that an allocation of `size` bytes of class `class` just ran
/// out: the one of the size's bucket (`bucket_left`) if that is at zero, else the
/// class's. The next interval is exponential in bytes ([`sample::next_interval`]),
/// counted in allocations of the countdown's unit (its bucket's largest size, or the
/// class's block size): `ceil(bytes / unit)` allocations, so each allocation is sampled
/// with the chance that a run of bytes of the unit's length holds a sampled byte, as in
/// a countdown of bytes. Returns the unit and whether the countdown ran out for the
/// first time (a new heap's countdowns start at one: its first allocation of a bucket or
/// class arms the countdown and is not sampled). `None` if neither is at zero.
///
/// # Safety
/// `heap` is the calling thread's live heap; `class < MAX_CLASSES`.
unsafe fn rearm_sampling(heap: *mut Heap, size: usize, class: usize) -> Option<(usize, bool)> {
    let bucket = (size + 15) >> 4;
    // SAFETY: per the contract; `bucket < DIRECT_LEN` when `size <= DIRECT_MAX_SIZE`.
    unsafe {
        let (left, drawn, unit) = if size <= DIRECT_MAX_SIZE && (*heap).bucket_left[bucket] == 0 {
            (
                &raw mut (*heap).bucket_left[bucket],
                &raw mut (*heap).bucket_drawn[bucket],
                (bucket << 4).max(16),
            )
        } else if *(*heap).class_left.get_unchecked(class) == 0 {
            (
                (&raw mut (*heap).class_left).cast::<u32>().add(class),
                (&raw mut (*heap).class_drawn).cast::<u64>().add(class),
                size_class::block_size(class),
            )
        } else {
            return None;
        };
        let armed_now = *drawn == 1;
        // At most 64 mean intervals of bytes, in units of at least 16 bytes: 2^20.
        let next = sample::next_interval()
            .div_ceil(unit)
            .clamp(1, u32::MAX as usize) as u32;
        set_countdown(left, drawn, next);
        Some((unit, armed_now))
    }
}

/// Sets the countdown `left` (with its intervals drawn, `drawn`) to `next`, keeping the
/// count of allocations it has served (`drawn - left`).
///
/// # Safety
/// Both point into the calling thread's live heap.
unsafe fn set_countdown(left: *mut u32, drawn: *mut u64, next: u32) {
    // SAFETY: per the contract.
    unsafe {
        let served = (*drawn).wrapping_sub(u64::from(*left));
        *left = next;
        *drawn = served.wrapping_add(u64::from(next));
    }
}

/// Sets every sampling countdown of `heap` so far off that no sample comes, keeping
/// the allocation counts (tests that count samples or slots exactly).
///
/// # Safety
/// `heap` is the calling thread's live heap.
#[cfg(test)]
unsafe fn stop_sampling(heap: *mut Heap) {
    const FAR: u32 = u32::MAX / 2;
    // SAFETY: per the contract.
    unsafe {
        for c in 0..MAX_CLASSES {
            set_countdown(
                &raw mut (*heap).class_left[c],
                &raw mut (*heap).class_drawn[c],
                FAR,
            );
        }
        for b in 0..DIRECT_LEN {
            set_countdown(
                &raw mut (*heap).bucket_left[b],
                &raw mut (*heap).bucket_drawn[b],
                FAR,
            );
        }
    }
}

/// The calling thread's heap, creating it if needed. Null when out of memory.
pub fn thread_heap_or_create() -> *mut Heap {
    let heap = thread_heap();
    if heap != empty_heap() {
        return heap;
    }
    if !crate::init::ensure_initialized() {
        return ptr::null_mut();
    }
    let verify = options::verify();
    if verify {
        let real = verify_heap();
        if !real.is_null() {
            return real;
        }
    }
    let heap = pool_take(owner_id_of_this_thread(verify));
    if heap.is_null() {
        return heap;
    }
    // Set the slot before registering for thread exit: `pthread_setspecific` may
    // allocate, and that nested call must find this heap. In verify mode the main
    // slot stays on the empty heap so every allocation is seen.
    if verify {
        tls::set_verify_heap(heap.cast());
    } else {
        tls::set_thread_heap(heap.cast());
    }
    crate::init::register_thread_heap(heap);
    reserve_planned_pages(heap);
    heap
}

/// Verify mode: matches this allocation to its call site. The flag keeps allocations
/// made while unwinding the stack from being recorded (and recursing).
pub fn verify_record(heap: *mut Heap, size: usize) {
    if heap.is_null() {
        return;
    }
    // SAFETY: `heap` is the calling thread's live heap; only its owner touches the flag.
    unsafe {
        if (*heap).verifying {
            return;
        }
        (*heap).verifying = true;
        let hook = VERIFY_HOOK.load(Ordering::Acquire);
        if !hook.is_null() {
            // SAFETY: only `set_verify_hook` stores here, always a `fn(usize)`.
            let hook: fn(usize) = core::mem::transmute::<*mut (), fn(usize)>(hook);
            hook(size);
        }
        (*heap).verifying = false;
    }
}

/// Verify mode's matcher, installed by the predictive runtime (which sits above this
/// layer): told the size of every allocation made while it is set.
static VERIFY_HOOK: AtomicPtr<()> = AtomicPtr::new(ptr::null_mut());

/// Installs `hook` to be called with the size of each allocation in verify mode.
pub fn set_verify_hook(hook: fn(usize)) {
    VERIFY_HOOK.store(hook as *mut (), Ordering::Release);
}

/// The most slices a new heap reserves for planned classes (a quarter of a segment);
/// classes past it get their pages on demand.
const RESERVED_MAX_SLICES: usize = 1024;

/// Gives a new heap the first pages of the classes the class table marks as reserved
/// (the classes the plan expects every thread to use), sized to the expected demand,
/// in one visit to the region: one span holding them all, cut into the pages without
/// the lock (one visit per class made thread start-up 12k of test-stress's 72k region
/// visits with a plan). Only address space is taken:
/// blocks are carved (and memory touched) as the thread allocates.
fn reserve_planned_pages(heap: *mut Heap) {
    if !size_class::any_reserved() {
        return;
    }
    // The classes to reserve, most aligned first: a page's slice count is a multiple of
    // its alignment, so each page cut from the front of the span starts aligned for
    // its class when the first one does.
    let mut classes = [0u8; MAX_CLASSES];
    let mut count = 0;
    let mut total = 0;
    for class in (0..size_class::class_count()).filter(|&c| size_class::class_info(c).reserved) {
        // SAFETY: `heap` is the calling thread's new heap.
        if unsafe { (*heap).pages[class] } != empty_page() {
            continue;
        }
        let slices = page_slices(class, 0);
        if total + slices > RESERVED_MAX_SLICES {
            continue;
        }
        let Some(slot) = classes.get_mut(count) else {
            break;
        };
        *slot = class as u8;
        count += 1;
        total += slices;
    }
    let reserved = classes.get_mut(..count).unwrap_or(&mut []);
    reserved.sort_unstable_by_key(|&c| {
        core::cmp::Reverse(segment::span_alignment(size_class::block_size(c as usize)))
    });
    let Some((&first, rest)) = reserved.split_first() else {
        return;
    };
    let first = first as usize;
    let first_slices = page_slices(first, 0);
    // SAFETY: `heap` is the calling thread's new heap; the run comes back as a spare of
    // ours, cut below like any run.
    unsafe {
        let bs = size_class::block_size(first);
        let mut run = ptr::null_mut();
        let (page, zeroed) = segment::alloc_page(
            owner(heap),
            first,
            bs,
            first_slices,
            ptr::null_mut(),
            0,
            &mut run,
            false,
            total - first_slices,
        );
        if page.is_null() {
            return;
        }
        start_reserved_page(heap, page, zeroed);
        for &class in rest {
            let class = class as usize;
            if run.is_null() {
                break;
            }
            let page = run;
            run = segment::split_spare(page, page_slices(class, 0));
            let zeroed = page::span_is_zeroed(page);
            page::init_page(page, owner(heap), class);
            start_reserved_page(heap, page, zeroed);
        }
        if !run.is_null() {
            list::push_front(&mut (*heap).spare, run);
            (*heap).spare_slices += (*run).slice_count as usize;
        }
    }
}

/// Puts a reserved class's first page (set up for its class) on the class list.
///
/// # Safety
/// `heap` is the calling thread's new heap; `page` is a page of it on no list.
unsafe fn start_reserved_page(heap: *mut Heap, page: *mut Page, zeroed: bool) {
    // SAFETY: per the contract.
    unsafe {
        let class = (*page).class as usize;
        (*heap).page_growth[class] = 1;
        class_push_front(heap, page);
        (*heap).zero_tail[class] = zeroed;
    }
}

/// A page of `class` with a free block, found or made. Null when out of memory.
///
/// # Safety
/// `heap` is the calling thread's live heap.
unsafe fn find_page(heap: *mut Heap, class: usize) -> *mut Page {
    // SAFETY: owner access to the heap and its pages.
    unsafe {
        drain_delayed(heap);
        count_slow_path(heap, class);
        loop {
            let page = first_page_with_room(heap, class);
            if !page.is_null() {
                return page;
            }
            // Nothing on our list: adopt pages of an exited thread (they go through
            // the same checks; a few at once, to visit the region's lock less), or
            // make a new one.
            let mut adopted = segment::adopt_pages(owner(heap), class, ADOPT_BATCH);
            if adopted.is_null() {
                return new_page(heap, class);
            }
            while !adopted.is_null() {
                let next = (*adopted).next;
                class_push_front(heap, adopted);
                adopted = next;
            }
        }
    }
}

/// Walks the class list from its head, moving full pages to the full list, until a
/// page with a free block turns up. Null when the list runs out.
///
/// # Safety
/// `heap` is the calling thread's live heap.
unsafe fn first_page_with_room(heap: *mut Heap, class: usize) -> *mut Page {
    // SAFETY: owner access to the heap and its pages.
    unsafe {
        loop {
            let page = (*heap).pages[class];
            if page == empty_page() {
                return ptr::null_mut();
            }
            if page::free_head(page).is_null() {
                page::collect_remote(page);
            }
            if page::free_head(page).is_null() {
                extend_page(heap, page);
            }
            if !page::free_head(page).is_null() {
                return page;
            }
            // Full: park it where remote frees will tell us about it. If a remote
            // free raced in, the next round collects it.
            if page::try_watch(page, watcher(heap)) {
                class_remove(heap, page);
                full_push(heap, page);
            }
        }
    }
}

/// Slices for the next page of `class`: the first page holds `first_page_blocks`, each
/// later one doubles up to 64 KiB; a page always holds at least one block.
fn page_slices(class: usize, growth: u8) -> usize {
    let info = size_class::class_info(class);
    let bs = info.block_size as usize;
    let first = (info.first_page_blocks as usize).max(1) * bs;
    let target = (first << growth.min(GROWTH_STEPS)).min(MAX_PAGE_BYTES.max(first));
    let blocks = (target / bs).max(1);
    (blocks * bs).div_ceil(SLICE_SIZE)
}

/// A new page for `class`: one of the heap's spare pages that fits, else one from the
/// region (the spare pages go back in the same visit: none of them fit).
///
/// # Safety
/// `heap` is the calling thread's live heap.
unsafe fn new_page(heap: *mut Heap, class: usize) -> *mut Page {
    // SAFETY: owner access.
    unsafe {
        let growth = (*heap).page_growth[class];
        let slices = page_slices(class, growth);
        let bs = size_class::block_size(class);
        let mut page = take_spare(heap, slices, segment::span_alignment(bs));
        // A page of this class retired whole: carved, every block on its free list.
        let warm = !page.is_null() && is_warm_spare(page, class);
        let zeroed;
        if warm {
            zeroed = false;
            (*page).next = ptr::null_mut();
            (*page).prev = ptr::null_mut();
        } else if page.is_null() {
            let give_back = (*heap).spare;
            (*heap).spare = ptr::null_mut();
            (*heap).spare_slices = 0;
            // A class at full page size is busy: take a few more pages in the same
            // visit, kept as spares. Once the class has taken a whole batch's worth of
            // pages itself, the fresh ones are backed with memory in one call, since
            // they will be carved soon; before that (a young class, a first batch, a
            // batch after spares went to other classes) memory comes in only as it is
            // carved, by page faults. A small program whose class just reached full
            // size may never carve a batch: `python3 -c pass` kept 760-960 KiB of
            // populated spares resident, 7-9% of its peak, and the DTVs of 500 threads
            // (one class, about 140 KiB) 890-960 KiB.
            let busy = growth >= GROWTH_STEPS;
            let populate = usize::from(growth) > usize::from(GROWTH_STEPS) + EXTRA_PAGES;
            let extra = if busy {
                (SPARE_SLICES / 2 / slices).min(EXTRA_PAGES)
            } else {
                0
            };
            // A young class's page comes with a run of slices after it, which the
            // heap's next young pages are cut from without coming back (`take_spare`).
            let tail = if busy { 0 } else { run_tail(heap, slices) };
            let mut extras = ptr::null_mut();
            (page, zeroed) = segment::alloc_page(
                owner(heap),
                class,
                bs,
                slices,
                give_back,
                extra,
                &mut extras,
                populate,
                tail,
            );
            while !extras.is_null() {
                let next = (*extras).next;
                list::push_front(&mut (*heap).spare, extras);
                (*heap).spare_slices += (*extras).slice_count as usize;
                extras = next;
            }
        } else {
            zeroed = page::span_is_zeroed(page);
            page::init_page(page, owner(heap), class);
        }
        if page.is_null() {
            return page;
        }
        (*heap).page_growth[class] = growth.saturating_add(1);
        class_push_front(heap, page);
        (*heap).zero_tail[class] = zeroed;
        if !warm {
            extend_page(heap, page);
        }
        page
    }
}

/// Whether `page`, just taken from the heap's spare pages, is one of `class` retired
/// whole with its blocks carved and all on its free list (`keep_spare`), to be used as
/// it is.
///
/// # Safety
/// `page` is a spare page of the calling thread's heap, off the spare list.
unsafe fn is_warm_spare(page: *mut Page, class: usize) -> bool {
    // SAFETY: per the contract.
    unsafe {
        !page::HARDENED
            && (*page).class as usize == class
            && (*page).carved.load(Ordering::Relaxed) != 0
            && !(*page).free.is_null()
            && !page::span_is_run(page)
    }
}

/// Carves more blocks from `page`, whose free list is empty (`page::extend`); when it
/// is its class's first page and its memory read as zero, notes the first of them as
/// zero but for the carving words (`Heap::zero_block`).
///
/// # Safety
/// `page` is a page of `heap`, the calling thread's live heap, with no free block.
unsafe fn extend_page(heap: *mut Heap, page: *mut Page) {
    // SAFETY: owner access to the heap and the page.
    unsafe {
        page::extend(page);
        let class = (*page).class as usize;
        if (*heap).zero_tail[class] && (*heap).pages[class] == page {
            (*heap).zero_block = page::free_head(page);
        }
    }
}

/// After a local free made a page empty or found it on the full list. The common case,
/// a class's only page emptied (a loop that allocates and frees a few objects), returns
/// here without the stack frame the rest needs.
#[cold]
#[inline(never)]
unsafe fn free_local_slow(heap: *mut Heap, page: *mut Page) {
    // SAFETY: owner access; `class < MAX_CLASSES` for every page.
    unsafe {
        // A page on the full list is on no class list: this holds only for an empty
        // page, and is the common case, checked first.
        let class = (*page).class as usize;
        if *(*heap).pages.get_unchecked(class) == page && (*page).next.is_null() {
            only_page_emptied(heap, page, class);
        } else if heap == empty_heap() {
            // A thread with no heap freed into a page with its id: a dead thread's.
            freed_into_dead_threads_page();
        } else if (*page).in_full() {
            free_to_full_page(heap, page);
        } else {
            // `release_one` answered, so the page is empty.
            other_page_emptied(heap, page);
        }
    }
}

/// A local free to a page on the full list: the page goes back on its class list (and
/// is retired if that free emptied it).
///
/// # Safety
/// `page` is a page of `heap`, the calling thread's live heap, on its full list.
#[inline(never)]
unsafe fn free_to_full_page(heap: *mut Heap, page: *mut Page) {
    // SAFETY: owner access.
    unsafe {
        page::unwatch(page);
        full_remove(heap, page);
        class_push_back(heap, page);
        if (*page).used() == 0 {
            page_emptied(heap, page);
        }
    }
}

/// A page of `heap`, on its class list, became empty: it is retired to the heap's spare
/// pages unless it is the only page of its class (so a loop that allocates and frees
/// one object never maps or unmaps), which is kept, marked with the current generation
/// ([`age_kept_pages`]). At every `PURGE_CHECK_EVERY`-th page emptied, this is also
/// where an otherwise idle thread notices that free memory (the region's, and pages
/// kept by free sample slots) is due to be purged, and at every `RETAINED_CHECK_EVERY`-th
/// that the large-object cache and its kept pages are due to go back: not at every
/// one, since reading the clock cost more than the rest of a free whose class's only
/// page empties and fills in turn.
///
/// # Safety
/// `page` is an empty page of `heap`, the calling thread's live heap, on its class list.
#[inline(always)]
unsafe fn page_emptied(heap: *mut Heap, page: *mut Page) {
    // SAFETY: owner access; `class < MAX_CLASSES` for every page.
    unsafe {
        let class = (*page).class as usize;
        if *(*heap).pages.get_unchecked(class) == page && (*page).next.is_null() {
            only_page_emptied(heap, page, class);
        } else {
            other_page_emptied(heap, page);
        }
    }
}

/// [`page_emptied`] of `page`, which is not the only page of its class: retired.
///
/// # Safety
/// As for [`page_emptied`].
#[inline(always)]
unsafe fn other_page_emptied(heap: *mut Heap, page: *mut Page) {
    // SAFETY: per the contract.
    unsafe {
        let emptied = (*heap).emptied_pages.wrapping_add(1);
        (*heap).emptied_pages = emptied;
        page_emptied_slow(heap, page, false, emptied);
    }
}

/// [`page_emptied`] of `page`, the only page of its class `class`: kept, marked with
/// the current generation.
///
/// # Safety
/// As for [`page_emptied`].
#[inline(always)]
unsafe fn only_page_emptied(heap: *mut Heap, page: *mut Page, class: usize) {
    // SAFETY: per the contract; `class < MAX_CLASSES`.
    unsafe {
        let emptied = (*heap).emptied_pages.wrapping_add(1);
        (*heap).emptied_pages = emptied;
        // Kept in this generation: the aging leaves it alone.
        *(*heap).kept_in.get_unchecked_mut(class) = (*heap).generation;
        if emptied.is_multiple_of(PURGE_CHECK_EVERY) {
            page_emptied_slow(heap, page, true, emptied);
        }
    }
}

/// The rest of [`page_emptied`]: a page that is not its class's only one is retired,
/// and every `PURGE_CHECK_EVERY`-th emptied page looks for due purges.
///
/// # Safety
/// As for [`page_emptied`].
#[inline(never)]
unsafe fn page_emptied_slow(heap: *mut Heap, page: *mut Page, only: bool, emptied: u32) {
    // SAFETY: per the contract.
    unsafe {
        if !only {
            retire_to_spare(heap, page);
        }
        if emptied.is_multiple_of(PURGE_CHECK_EVERY) {
            purge_due_memory(heap, emptied.is_multiple_of(RETAINED_CHECK_EVERY));
        }
    }
}

/// How long a class's only page may lie empty and unused before its heap gives it back
/// to the region: between one and two of these (the region's shortest purge delay).
const KEPT_PAGE_AGE_MS: u64 = segment::PURGE_DELAY_MS;
/// Allocation slow paths between two readings of the clock for [`age_kept_pages`].
const KEPT_PAGE_SLOW_PATHS: u32 = 64;

/// Counts an allocation slow path of `heap` for `class`; at every
/// `KEPT_PAGE_SLOW_PATHS`-th, ages the kept empty pages if their time has come.
///
/// # Safety
/// `heap` is the calling thread's live heap.
#[inline(always)]
unsafe fn count_slow_path(heap: *mut Heap, class: usize) {
    // SAFETY: owner access.
    unsafe {
        (*heap).slow_paths += 1;
        if (*heap).slow_paths >= KEPT_PAGE_SLOW_PATHS {
            (*heap).slow_paths = 0;
            age_kept_pages(heap, class, os::now_ms());
        }
    }
}

/// A class's only page is kept when it empties, so a loop that allocates and frees one
/// object neither gives its page back nor takes it again. But a class the program used
/// for a while and left (a table of one size, built and dropped) kept its page, and
/// the memory its blocks touched, for the heap's life, out of the region's reach: one
/// page of 64 to 256 KiB for each of some 35 classes in a Python script, 4.4 MB of its
/// 9.8 MB heap. So kept pages age, as mimalloc's retired pages do: at most once per
/// `KEPT_PAGE_AGE_MS` a new generation starts, and the only pages kept in the one
/// before it and not emptied again since (a page in use meanwhile empties again and
/// is marked anew) go back to the region, which purges them once its delay has passed.
/// So do all the heap's spare pages when it took none during the generation that ended
/// (each of eight threads kept up to 2 MiB of them however long it went on with small
/// objects only). `class` is the class the caller is about to use, whose page stays.
///
/// # Safety
/// `heap` is the calling thread's live heap.
#[cold]
#[inline(never)]
unsafe fn age_kept_pages(heap: *mut Heap, class: usize, now: u64) {
    // SAFETY: owner access to the heap and its pages.
    unsafe {
        // The generation that ends began at the last aging, so the pages kept in the
        // one before have lain empty since then at least.
        let idle_since = (*heap).aged_ms;
        if now.saturating_sub(idle_since) < KEPT_PAGE_AGE_MS {
            return;
        }
        (*heap).aged_ms = now;
        // Generations count 1..=255 and round: a page kept 255 generations ago and in
        // use since reads as idle, and goes back only if it is empty again.
        let ended = (*heap).generation;
        let before = if ended == 1 { u8::MAX } else { ended - 1 };
        (*heap).generation = if ended == u8::MAX { 1 } else { ended + 1 };
        let mut give_back: *mut Page = ptr::null_mut();
        for c in 0..size_class::class_count().min(MAX_CLASSES) {
            if c != class && (*heap).kept_in.get(c) == Some(&before) {
                give_back_if_still_empty(heap, c, &mut give_back);
            }
        }
        segment::free_pages_idle_since(give_back, idle_since);
        // Spare pages serve a heap that takes pages often; one that took none for a
        // whole generation gives them back too.
        if !(*heap).spare_taken {
            release_spares(heap);
        }
        (*heap).spare_taken = false;
    }
}

/// Puts class `c`'s page on `give_back` if it is still the class's only page and still
/// empty, taken off the class list (`age_kept_pages`).
///
/// # Safety
/// `heap` is the calling thread's live heap; `give_back` a plain list of its pages.
unsafe fn give_back_if_still_empty(heap: *mut Heap, c: usize, give_back: &mut *mut Page) {
    // SAFETY: owner access to the heap and its pages.
    unsafe {
        let Some(&page) = (*heap).pages.get(c) else {
            return;
        };
        // Still the class's only page and still empty.
        if page == empty_page() || !(*page).next.is_null() || (*page).used() != 0 {
            return;
        }
        page::collect_remote(page);
        class_remove(heap, page);
        // No pointer into the page passes as a block from now on.
        (*page).carved.store(0, Ordering::Relaxed);
        (*page).next = *give_back;
        *give_back = page;
    }
}

/// Purges the free memory whose delay has passed (the region's and the sample slots');
/// with `retained`, also decays the large-object cache and ages `heap`'s kept empty
/// pages.
///
/// # Safety
/// `heap` is the calling thread's live heap.
#[cold]
#[inline(never)]
unsafe fn purge_due_memory(heap: *mut Heap, retained: bool) {
    segment::purge_if_due();
    sample::purge_if_due();
    if retained {
        large::decay_if_due();
        // SAFETY: per the contract.
        unsafe { age_kept_pages(heap, usize::MAX, os::now_ms()) };
    }
}

/// Takes an empty page off its class list and keeps it as a spare.
///
/// # Safety
/// `page` is an empty page of `heap`, the calling thread's live heap, on its class list.
#[inline(never)]
unsafe fn retire_to_spare(heap: *mut Heap, page: *mut Page) {
    // SAFETY: owner access.
    unsafe {
        page::collect_remote(page);
        class_remove(heap, page);
        // The class keeps its page size: a class whose pages empty is often about to
        // fill them again (a map dropped and rebuilt), and shrinking it made every
        // refill a climb of small pages, one region visit each.
        keep_spare(heap, page);
    }
}

/// Puts an empty page first on the heap's spare pages; past `SPARE_SLICES`, gives the
/// older half back to the region in one visit.
///
/// # Safety
/// `page` is an empty page of `heap` on no list, with no notification in flight.
unsafe fn keep_spare(heap: *mut Heap, page: *mut Page) {
    // SAFETY: owner access to the heap and its pages.
    unsafe {
        if page::HARDENED {
            // No pointer into the page passes as a block from now on (the block-start
            // check of a late, invalid free fails), whatever class it serves next.
            (*page).carved.store(0, Ordering::Relaxed);
            // Its blocks were written: reused, it is cleared for calloc like any block.
            page::mark_span_zeroed(page, false);
        }
        // Otherwise the page stays carved, every block of it on its free list and
        // marked freed (so a late free of one is a double free, and of anything else
        // fails the block-start check), so that its class takes it back as it is
        // (`is_warm_spare`) instead of carving it anew. Its free word, a block's
        // address, reads as neither zeroed nor a run; taken for another class or given
        // back to the region it is set up anew.
        list::push_front(&mut (*heap).spare, page);
        (*heap).spare_slices += (*page).slice_count as usize;
        if (*heap).spare_slices <= SPARE_SLICES {
            return;
        }
        // Keep the newest pages up to half the bound; the rest goes back together.
        let mut kept = 0;
        let mut p = (*heap).spare;
        while !p.is_null() {
            let count = (*p).slice_count as usize;
            if kept + count > SPARE_SLICES / 2 {
                break;
            }
            kept += count;
            p = (*p).next;
        }
        if p.is_null() {
            return;
        }
        let prev = (*p).prev;
        if prev.is_null() {
            (*heap).spare = ptr::null_mut();
        } else {
            (*prev).next = ptr::null_mut();
        }
        (*p).prev = ptr::null_mut();
        (*heap).spare_slices = kept;
        segment::free_pages(p);
    }
}

/// Slices to take from the region after a young class's page of `slices`, as a run
/// the heap cuts its next young pages from. None for a heap's first `RUN_AFTER` young
/// pages: a thread that holds a few objects in a few classes takes its pages one by one,
/// next to other threads' (a run packs a thread's pages together and spreads the page
/// records: 2 KiB more per idle thread holding 14 objects). Then `RUN_FIRST_SLICES`,
/// doubling with each run up to `RUN_MAX_SLICES`, so a thread that starts many classes
/// visits the region a few times instead of once per page. A large-block class's young
/// page (`RUN_LARGE_PAGE_SLICES`) comes with room for `RUN_LARGE_PAGES - 1` more of its
/// size from the start: such pages are large for what a thread usually puts in them
/// (a first page holds four blocks, or one over 64 KiB), and under test-stress, where
/// threads take a few blocks of many large classes each, one visit per page made them
/// over a third of all region visits (22k of 59k). Only address space: memory comes in
/// as blocks are carved.
///
/// # Safety
/// `heap` is the calling thread's live heap.
unsafe fn run_tail(heap: *mut Heap, slices: usize) -> usize {
    // SAFETY: owner access.
    unsafe {
        let young = (*heap).young_pages;
        (*heap).young_pages = young.saturating_add(1);
        if slices >= RUN_LARGE_PAGE_SLICES {
            return (slices * RUN_LARGE_PAGES)
                .min(RUN_LARGE_MAX_SLICES)
                .saturating_sub(slices);
        }
        let Some(runs) = young.checked_sub(RUN_AFTER) else {
            return 0;
        };
        let run = (RUN_FIRST_SLICES << runs.min(RUN_GROWTH_STEPS)).min(RUN_MAX_SLICES);
        run.saturating_sub(slices)
    }
}

/// Takes a spare page of `slices` slices starting at a multiple of `align` slices (as
/// the region would align a page of that class): the first spare that holds it. A run
/// (`run_tail`) is cut where an aligned page fits in it, what lies before and after
/// the page staying spare runs (large classes align their pages to up to 256 KiB: cut
/// only at their start, runs left a third of these classes' region visits to
/// alignment alone). Any other spare (a page retired whole) is taken whole when its start is
/// aligned: a larger page costs no more (blocks are carved, and memory touched, one
/// slice at a time), and cutting retired pages left pieces that went back to the region
/// and were purged and refaulted (a Rust program's madvise calls went from ~400 to
/// ~830). Null when none fits.
///
/// # Safety
/// `heap` is the calling thread's live heap.
unsafe fn take_spare(heap: *mut Heap, slices: usize, align: usize) -> *mut Page {
    // SAFETY: owner access to the heap and its spare pages.
    unsafe {
        let mut p = (*heap).spare;
        while !p.is_null() {
            let count = (*p).slice_count as usize;
            let index = (*p).slice_index();
            if page::span_is_run(p) {
                let pad = index.next_multiple_of(align) - index;
                if count >= pad + slices {
                    (*heap).spare_taken = true;
                    return cut_run(heap, p, pad, slices);
                }
            } else if count >= slices && index.is_multiple_of(align) {
                list::remove(&mut (*heap).spare, p);
                (*heap).spare_slices -= count;
                (*heap).spare_taken = true;
                return p;
            }
            p = (*p).next;
        }
        ptr::null_mut()
    }
}

/// Cuts a page of `slices` slices from the spare run `run`, `pad` slices in; the slices
/// before and after it stay spare runs (cut without the region lock).
///
/// # Safety
/// `run` is a spare run of `heap`, the calling thread's live heap, of at least
/// `pad + slices` slices.
unsafe fn cut_run(heap: *mut Heap, run: *mut Page, pad: usize, slices: usize) -> *mut Page {
    // SAFETY: owner access to the heap and its spare pages; per the contract, each
    // split leaves both parts non-empty.
    unsafe {
        list::remove(&mut (*heap).spare, run);
        let mut page = run;
        if pad > 0 {
            page = segment::split_spare(run, pad);
            list::push_front(&mut (*heap).spare, run);
        }
        (*heap).spare_slices -= slices;
        let rest = segment::split_spare(page, slices);
        if !rest.is_null() {
            list::push_front(&mut (*heap).spare, rest);
        }
        page
    }
}

/// Gives all of the heap's spare pages back to the region (one visit).
///
/// # Safety
/// `heap` is the calling thread's live heap.
unsafe fn release_spares(heap: *mut Heap) {
    // SAFETY: owner access.
    unsafe {
        let spare = (*heap).spare;
        (*heap).spare = ptr::null_mut();
        (*heap).spare_slices = 0;
        segment::free_pages(spare);
    }
}

// The block comes first, where `free` receives it, so the fast path reaches this by a
// tail jump without moving it; likewise `free_unusual`. The usual case (the owner is
// alive) makes no call, so it needs no stack frame: taking an abandoned page over is
// left to `free_to_abandoned`, reached by a tail jump (with the call to `reclaim` here,
// every remote free pushed and popped three registers: 6 of its 22 instructions).
#[cold]
#[inline(never)]
unsafe fn free_remote(block: *mut Block, page: *mut Page) {
    // SAFETY: the caller gives up `block`, a live block of `page`.
    unsafe {
        if (*page).owner.load(Ordering::Relaxed).is_null() {
            return free_to_abandoned(block, page);
        }
        push_remote_or_hand_over(block, page);
    }
}

/// A free into an exited thread's page: take the page over if this thread needs a page
/// of its class anyway, and free locally; else free as into any other thread's page.
///
/// # Safety
/// As for [`free_remote`].
#[cold]
#[inline(never)]
unsafe fn free_to_abandoned(block: *mut Block, page: *mut Page) {
    // SAFETY: per the contract.
    unsafe {
        if reclaim(page) {
            return free_checked(page, block);
        }
        push_remote_or_hand_over(block, page);
    }
}

/// Pushes `block` on `page`'s remote list, or, when the page was full and watched,
/// hands it to the owner heap's `delayed_free` list so the owner learns the page has
/// room.
///
/// # Safety
/// As for [`free_remote`].
#[inline(always)]
unsafe fn push_remote_or_hand_over(block: *mut Block, page: *mut Page) {
    // SAFETY: per the contract.
    unsafe {
        let owner = page::push_remote(page, block).cast::<Heap>();
        if !owner.is_null() {
            // Its link is stored encoded (hardened), checked by `drain_delayed`.
            let key = page::link_key();
            let list = &(*owner).delayed_free;
            let mut head = list.load(Ordering::Relaxed);
            loop {
                (*block).next = page::encode_link(key, head);
                match list.compare_exchange_weak(head, block, Ordering::Release, Ordering::Relaxed)
                {
                    Ok(_) => break,
                    Err(now) => head = now,
                }
            }
            page::end_notification(page);
        }
    }
}

/// A free into an abandoned page (its owner exited): the calling thread takes the
/// page over if it has a heap and the region lock is free (`segment::reclaim_page`),
/// putting it first in its class list, so that the blocks the exited thread left
/// (which this thread is likely freeing one by one, as a successor does) come back as
/// local frees and are reused here. True when the page is now the caller's.
///
/// # Safety
/// `page` is a live page record (the caller holds a live block of it).
#[cold]
#[inline(never)]
unsafe fn reclaim(page: *mut Page) -> bool {
    let heap = thread_heap();
    // SAFETY: the caller holds a live block of `page`, so its class is settled.
    if heap == empty_heap() || unsafe { has_room(heap, (*page).class as usize) } {
        return false;
    }
    // SAFETY: per the contract.
    if !unsafe { segment::reclaim_page(owner(heap), page) } {
        return false;
    }
    // SAFETY: the page is ours now, on no list (the region took it off its abandoned
    // list).
    unsafe { class_push_front(heap, page) };
    true
}

/// Whether `heap`'s first page of `class` has a free block at hand: a heap whose next
/// allocation of the class would need another page takes an abandoned one over
/// ([`reclaim`]); one that has room does not, so a thread that only frees into other
/// threads' pages does not collect pages it will not allocate from.
///
/// # Safety
/// `heap` is the calling thread's live heap; `class < MAX_CLASSES`.
unsafe fn has_room(heap: *mut Heap, class: usize) -> bool {
    // SAFETY: per the contract.
    unsafe {
        let page = (*heap).pages[class];
        page != empty_page() && !page::free_head(page).is_null()
    }
}

/// Frees, as the owner, the blocks other threads handed over for watched pages.
///
/// # Safety
/// `heap` is the calling thread's live heap.
#[inline(always)]
unsafe fn drain_delayed(heap: *mut Heap) {
    // SAFETY: per the contract.
    unsafe {
        if !(*heap).delayed_free.load(Ordering::Relaxed).is_null() {
            drain_delayed_list(heap);
        }
    }
}

/// [`drain_delayed`] once the list holds a block (kept out of line, so the slow path
/// that checks for delayed blocks on every call stays small).
///
/// # Safety
/// `heap` is the calling thread's live heap.
#[cold]
#[inline(never)]
unsafe fn drain_delayed_list(heap: *mut Heap) {
    // SAFETY: owner access; delayed blocks belong to pages of this heap.
    unsafe {
        let mut b = (*heap)
            .delayed_free
            .swap(ptr::null_mut(), Ordering::Acquire);
        let key = (*heap).link_key;
        while !b.is_null() {
            let next = page::encode_link(key, (*b).next);
            if page::HARDENED && !next.is_null() && !is_own_block(heap, next) {
                page::corrupted_link(next);
            }
            let page = segment::page_of(b as usize);
            (*b).next = (*page).free;
            (*page).free = page::encode_link(key, b);
            (*page).used -= 1;
            if (*page).used as i32 <= 0 {
                free_local_slow(heap, page);
            }
            b = next;
        }
    }
}

/// Hardened `drain_delayed`: whether a decoded link of the delayed list is a block of
/// one of `heap`'s pages (the list mixes pages, so the segment check of the page lists
/// does not apply). Reads only our segment metadata, never the address itself.
///
/// # Safety
/// `heap` is the calling thread's live heap.
unsafe fn is_own_block(heap: *mut Heap, b: *mut Block) -> bool {
    if chunk_map::kind_of_any(b as usize) != chunk_map::KIND_SEGMENT {
        return false;
    }
    let page = segment::page_of(b as usize);
    // SAFETY: `b` lies in one of our segments, so `page` is a record of it; a record of
    // a free span fails the block-start check, and the owner field is atomic.
    unsafe {
        page::is_block_start(page, b as usize)
            && (*page).owner.load(Ordering::Relaxed) == owner(heap)
    }
}

// ---- page lists ----------------------------------------------------------------------------

// A class list is a tailed list (`list::tailed_*`): its head's `prev` points at the
// tail, so pages can be appended without a tail pointer per class, and an empty class
// points at the empty page. The full list is a plain list.

/// # Safety
/// Owner access; `page` is on no list.
unsafe fn class_push_front(heap: *mut Heap, page: *mut Page) {
    // SAFETY: per the contract.
    unsafe {
        let class = (*page).class as usize;
        list::tailed_push_front(&mut (*heap).pages[class], empty_page(), page);
        class_head_changed(heap, class);
    }
}

/// Appends a page that got blocks back while it was full: by the time allocation
/// reaches it, more of its blocks will have come back (putting it first would make it
/// full again after one allocation, and every free a slow path).
///
/// # Safety
/// Owner access; `page` is on no list.
unsafe fn class_push_back(heap: *mut Heap, page: *mut Page) {
    // SAFETY: per the contract.
    unsafe {
        let class = (*page).class as usize;
        let first = (*heap).pages[class];
        list::tailed_push_back(&mut (*heap).pages[class], empty_page(), page);
        if (*heap).pages[class] != first {
            class_head_changed(heap, class);
        }
    }
}

/// # Safety
/// Owner access; `page` is on its class list.
unsafe fn class_remove(heap: *mut Heap, page: *mut Page) {
    // SAFETY: per the contract.
    unsafe {
        let class = (*page).class as usize;
        let first = (*heap).pages[class];
        list::tailed_remove(&mut (*heap).pages[class], empty_page(), page);
        if (*heap).pages[class] != first {
            class_head_changed(heap, class);
        }
    }
}

/// Another page is first on class `class`'s list (the three functions above): what the
/// fast paths read for the class is made to match `heap.pages[class]` again (`direct`
/// for each bucket of the class and, hardened, the pop keys), and `zero_tail`, which
/// spoke of the page that was first (it may be retired and reused dirty), no longer
/// holds.
///
/// # Safety
/// Owner access; `class < MAX_CLASSES`.
#[inline(always)]
unsafe fn class_head_changed(heap: *mut Heap, class: usize) {
    // SAFETY: per the contract; `pop_keys` and `direct_pop_keys` have their entries
    // when hardened, the only case they are written.
    unsafe {
        (*heap).zero_tail[class] = false;
        let page = *(*heap).pages.get_unchecked(class);
        if page::HARDENED {
            *(*heap).pop_keys.get_unchecked_mut(class) = (*heap).link_key ^ page.addr();
        }
        // The class's buckets are one run (the table is sorted by size) ending at the
        // bucket of its block size, a multiple of 16.
        let mut bucket = size_class::block_size(class) >> 4;
        // (Every table maps `DIRECT_MAX_SIZE` to a class of at most that size, so a
        // larger class has no bucket here.)
        while bucket < DIRECT_LEN && (*heap).class_of_small[bucket] as usize == class {
            set_direct(heap, bucket, page);
            if bucket == 0 {
                break;
            }
            bucket -= 1;
        }
    }
}

/// Points bucket `bucket` of `heap` at `page` (and its pop key, hardened).
///
/// # Safety
/// Owner access; `bucket < DIRECT_LEN`.
#[inline(always)]
unsafe fn set_direct(heap: *mut Heap, bucket: usize, page: *mut Page) {
    // SAFETY: per the contract.
    unsafe {
        *(*heap).direct.get_unchecked_mut(bucket) = page;
        if page::HARDENED {
            *(*heap).direct_pop_keys.get_unchecked_mut(bucket) = (*heap).link_key ^ page.addr();
        }
    }
}

/// # Safety
/// Owner access; `page` is on no list.
unsafe fn full_push(heap: *mut Heap, page: *mut Page) {
    // SAFETY: per the contract.
    unsafe {
        (*page).used |= IN_FULL_FLAG;
        list::push_front(&mut (*heap).full, page);
    }
}

/// # Safety
/// Owner access; `page` is on the full list.
unsafe fn full_remove(heap: *mut Heap, page: *mut Page) {
    // SAFETY: per the contract.
    unsafe {
        (*page).used &= !IN_FULL_FLAG;
        list::remove(&mut (*heap).full, page);
    }
}

// ---- thread exit -----------------------------------------------------------------------------

/// Gives up `heap` at thread exit: live pages go to the region, empty ones back to it,
/// and the heap record returns to the pool. The thread's slot falls back to the empty
/// heap, so an allocation by a later destructor creates a fresh heap.
///
/// # Safety
/// `heap` is the calling thread's live heap.
pub unsafe fn abandon(heap: *mut Heap) {
    // SAFETY: owner access to the heap and all its pages.
    unsafe {
        // Stop all notifications first, so no block can be on its way to us afterwards.
        let mut p = (*heap).full;
        while !p.is_null() {
            page::unwatch(p);
            p = (*p).next;
        }
        drain_delayed(heap);
        while !(*heap).full.is_null() {
            let p = (*heap).full;
            full_remove(heap, p);
            class_push_front(heap, p);
        }
        // Sort the pages into empty ones (with the spare pages) and live ones, and hand
        // both to the region in one visit: what the thread leaves is available to every
        // other thread at once.
        let mut empty = (*heap).spare;
        (*heap).spare = ptr::null_mut();
        (*heap).spare_slices = 0;
        let mut live = ptr::null_mut();
        for class in 0..MAX_CLASSES {
            loop {
                let p = (*heap).pages[class];
                if p == empty_page() {
                    break;
                }
                class_remove(heap, p);
                // Off our lists, the page is no longer this thread's: a `fork` now
                // (while the region lock below is held) would leave it on no list
                // `orphan` can reach, with an id a thread of the child may get.
                (*p).owner.store(ptr::null_mut(), Ordering::Relaxed);
                // A page whose blocks all came back from other threads is released
                // without a walk of its remote list; the others keep theirs for their
                // next owner, who takes it whole once its own list runs out.
                if page::drop_remote_if_all_freed(p) {
                    list::push_front(&mut empty, p);
                } else {
                    list::push_front(&mut live, p);
                }
            }
        }
        segment::abandon_pages(empty, live);
        tls::set_thread_heap(empty_heap().cast());
        tls::set_verify_heap(ptr::null_mut());
        pool_give(heap);
    }
}

// ---- the heap pool ---------------------------------------------------------------------------

struct PoolInner {
    /// Heap records ready for reuse (a plain list through `next_live`/`prev_live`).
    spare: *mut Heap,
    /// Heaps of running threads (and orphans, [`orphan`]).
    live: *mut Heap,
    /// The owner ids of the live heaps that are not orphans, as counts per bucket.
    owner_ids: OwnerIdCounts,
    /// Unused part of the last metadata chunk.
    bump: usize,
    bump_end: usize,
}

static POOL: Locked<PoolInner> = Locked::new(PoolInner {
    spare: ptr::null_mut(),
    live: ptr::null_mut(),
    owner_ids: OwnerIdCounts([0; OWNER_ID_BUCKETS]),
    bump: 0,
    bump_end: 0,
});

/// Counts of finished heaps, so statistics survive thread exit.
static RETIRED_ALLOCS: [AtomicU64; MAX_CLASSES] = [const { AtomicU64::new(0) }; MAX_CLASSES];
/// Finished heaps, and how many of them allocated from each class (what the plan
/// learns about which classes every thread needs).
static RETIRED_HEAPS: AtomicU64 = AtomicU64::new(0);
static RETIRED_USING: [AtomicU64; MAX_CLASSES] = [const { AtomicU64::new(0) }; MAX_CLASSES];
/// Heaps owned by running threads.
pub static LIVE_HEAPS: AtomicUsize = AtomicUsize::new(0);

const POOL_CHUNK: usize = 64 * 1024;

/// log2 of the buckets of [`OwnerIdCounts`]: 4,096 counts, 16 KiB, of which only the
/// buckets of ids in use are ever written.
const OWNER_ID_BUCKET_BITS: u32 = 12;
const OWNER_ID_BUCKETS: usize = 1 << OWNER_ID_BUCKET_BITS;

/// How many live heaps hold an owner id of each bucket (a counting filter): a new heap
/// looks through the live list for a gone thread's heap with its id only when its
/// bucket counts one, which with `n` live heaps happens with chance about n / 4,096,
/// so creating a thread does not walk thousands of running threads' heaps.
struct OwnerIdCounts([u32; OWNER_ID_BUCKETS]);

impl OwnerIdCounts {
    fn bucket(id: *mut Owner) -> usize {
        // Thread pointers lie a stack size apart: a multiplicative hash spreads them.
        let hash = (id.addr() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        (hash >> (u64::BITS - OWNER_ID_BUCKET_BITS)) as usize
    }
    fn holds(&self, id: *mut Owner) -> bool {
        self.0.get(Self::bucket(id)).is_some_and(|&n| n > 0)
    }
    fn add(&mut self, id: *mut Owner) {
        if let Some(n) = self.0.get_mut(Self::bucket(id)) {
            *n = n.saturating_add(1);
        }
    }
    fn remove(&mut self, id: *mut Owner) {
        if let Some(n) = self.0.get_mut(Self::bucket(id)) {
            *n = n.saturating_sub(1);
        }
    }
}

fn with_pool<R>(f: impl FnOnce(&mut PoolInner) -> R) -> R {
    POOL.with(f)
}

/// Lock hooks for `fork`.
pub fn lock_for_fork() {
    POOL.lock_for_fork();
}
pub fn unlock_after_fork(child: bool) {
    POOL.unlock_after_fork(child);
}

/// Acquisitions of this layer's lock so far, and the contended ones (statistics).
pub fn lock_counts() -> (u64, u64) {
    POOL.lock_counts()
}

/// A fresh heap record for the calling thread, on the live list, whose pages will hold
/// `owner_id`.
fn pool_take(owner_id: *mut Owner) -> *mut Heap {
    let heap = with_pool(|p| {
        // A live heap with this id is a gone thread's (the calling thread has none).
        if p.owner_ids.holds(owner_id) {
            // SAFETY: the pool lock is held.
            unsafe { orphan_live_heaps(p, |h| (*h).owner_id == owner_id) };
        }
        let mut h = p.spare;
        if !h.is_null() {
            // SAFETY: spare records are ours under the lock. The record starts afresh:
            // inheriting the last thread's page sizes made every new thread's first
            // pages big, and the thread-exit test's committed memory climbed ~10 MiB
            // over 40 rounds of short threads.
            unsafe { list::remove(&mut p.spare, h) };
        } else {
            let size = core::mem::size_of::<Heap>().next_multiple_of(128);
            if p.bump + size > p.bump_end {
                let chunk = os::map(POOL_CHUNK);
                if chunk.is_null() {
                    return ptr::null_mut();
                }
                p.bump = chunk as usize;
                p.bump_end = p.bump + POOL_CHUNK;
            }
            h = p.bump as *mut Heap;
            p.bump += size;
        }
        // SAFETY: `h` is an unused, writable, suitably aligned heap-sized record.
        unsafe {
            h.write(Heap {
                direct: [empty_page(); DIRECT_LEN],
                pages: [empty_page(); MAX_CLASSES],
                class_of_small: size_class::heap_table(),
                link_key: page::link_key(),
                pop_keys: [page::link_key() ^ empty_page().addr(); POP_KEYS],
                direct_pop_keys: [page::link_key() ^ empty_page().addr(); DIRECT_POP_KEYS],
                class_left: [1; MAX_CLASSES],
                class_drawn: [1; MAX_CLASSES],
                bucket_left: [1; DIRECT_LEN],
                bucket_drawn: [1; DIRECT_LEN],
                sampling: false,
                page_growth: [0; MAX_CLASSES],
                full: ptr::null_mut(),
                spare: ptr::null_mut(),
                spare_slices: 0,
                spare_taken: false,
                emptied_pages: 0,
                kept_in: [0; MAX_CLASSES],
                generation: 1,
                aged_ms: 0,
                slow_paths: 0,
                next_live: ptr::null_mut(),
                prev_live: ptr::null_mut(),
                // SAFETY: pthread_self has no preconditions.
                thread: libc::pthread_self() as usize,
                owner_id,
                verifying: false,
                young_pages: 0,
                zero_tail: [false; MAX_CLASSES],
                zero_block: ptr::null_mut(),
                delayed_free: CachePadded::new(AtomicPtr::new(ptr::null_mut())),
            });
            list::push_front(&mut p.live, h);
            p.owner_ids.add(owner_id);
        }
        h
    });
    if !heap.is_null() {
        LIVE_HEAPS.fetch_add(1, Ordering::Relaxed);
    }
    heap
}

/// # Safety
/// `heap` is an abandoned heap with no pages.
unsafe fn pool_give(heap: *mut Heap) {
    with_pool(|p| {
        // SAFETY: `heap` is on the live list (lock held).
        unsafe {
            let mut by_class = [0; MAX_CLASSES];
            class_counts(heap, &mut by_class);
            for (c, n) in by_class.iter().enumerate() {
                RETIRED_ALLOCS[c].fetch_add(*n, Ordering::Relaxed);
                if *n > 0 {
                    RETIRED_USING[c].fetch_add(1, Ordering::Relaxed);
                }
            }
            RETIRED_HEAPS.fetch_add(1, Ordering::Relaxed);
            p.owner_ids.remove((*heap).owner_id);
            list::remove(&mut p.live, heap);
            list::push_front(&mut p.spare, heap);
        }
    });
    LIVE_HEAPS.fetch_sub(1, Ordering::Relaxed);
}

/// Orphans each heap on the live list that `gone` picks: heaps whose threads are gone
/// without giving them up. Heaps whose pages hold the id of a thread that has no heap
/// ([`pool_take`], [`freed_into_dead_threads_page`]: two running threads never share
/// an id), rare: one a destructor made after lgmalloc's own ran in glibc's last
/// destructor round, or one whose thread-exit registration failed. And in a `fork`
/// child, every heap but the caller's ([`settle_heaps_in_fork_child`]).
///
/// # Safety
/// The caller holds the pool lock (`p`); `gone` picks only heaps no running thread
/// uses, and reads them only.
unsafe fn orphan_live_heaps(p: &mut PoolInner, gone: impl Fn(*mut Heap) -> bool) {
    let mut h = p.live;
    while !h.is_null() {
        // SAFETY: live heaps stay valid under the pool lock; per the contract the one
        // picked has no thread.
        unsafe {
            if gone(h) {
                orphan(p, h);
            }
            h = (*h).next_live;
        }
    }
}

/// A thread with no heap freed (as the owner) into a page that holds its id: the page
/// is a gone thread's, whose heap was never given up ([`orphan_live_heaps`]). That heap
/// is orphaned; the block stays on the page's free list, as on any page of that heap.
#[cold]
#[inline(never)]
fn freed_into_dead_threads_page() {
    let id = owner_id_of_this_thread(false);
    // SAFETY: the pool lock is held; the calling thread has no heap, so a heap with its
    // id is a gone thread's.
    with_pool(|p| unsafe { orphan_live_heaps(p, |h| (*h).owner_id == id) });
}

/// In the child of a `fork`, where only the calling thread runs: the parent's other
/// threads are gone, with their heaps and whatever they were doing.
pub fn settle_heaps_in_fork_child() {
    let mine = [thread_heap(), verify_heap()];
    // The heaps of the other threads have no thread any more, and a thread the child
    // starts may get the id of one of those (glibc hands their stacks and control
    // blocks to new threads), so each is orphaned.
    // SAFETY: the pool lock is held; in the child no thread but the caller runs, so
    // the other heaps are no one's.
    with_pool(|p| unsafe { orphan_live_heaps(p, |h| !mine.contains(&h)) });
    end_notifications_cut_by_fork(mine);
}

/// In the child of a `fork`: a parent thread that was telling one of `mine` (the
/// calling thread's heaps) about a remote free (a full page in `FREEING`, between
/// `push_remote` and `end_notification`) is not in the child and never finishes, so
/// `unwatch` of that page (at the next local free into it, or at thread exit) would
/// wait forever. Each such page ends its notification and goes back on its class list,
/// whose walk collects its remote frees; the block that freer carried is on the heap's
/// `delayed_free` list if it got that far, otherwise lost to the child.
fn end_notifications_cut_by_fork(mine: [*mut Heap; 2]) {
    for heap in mine {
        if heap.is_null() || heap == empty_heap() {
            continue;
        }
        // SAFETY: the calling thread's own live heap, and its pages; in the child no
        // other thread runs, so no freer can be mid-notification any more.
        unsafe {
            let mut p = (*heap).full;
            while !p.is_null() {
                let next = (*p).next;
                if page::notification_in_flight(p) {
                    page::end_notification(p);
                    full_remove(heap, p);
                    class_push_back(heap, p);
                }
                p = next;
            }
        }
    }
}

/// Gives `heap` and its pages an owner id no thread has, for a heap whose thread is gone
/// without giving it up (a `fork` child's copy of another thread's heap, a heap never
/// given up at its thread's exit).
/// Its pages stay where they are and blocks freed into them go on their remote lists,
/// as into any other thread's page; a thread that gets the dead thread's id no longer
/// takes them for its own. A page such a thread held on no list (between two lists at
/// the `fork`) keeps the old id.
///
/// # Safety
/// `heap` is a live heap record no running thread uses; the caller holds the pool lock
/// (`p`).
unsafe fn orphan(p: &mut PoolInner, heap: *mut Heap) {
    let id = ptr::without_provenance_mut(heap.addr() | ORPHAN_OWNER_TAG);
    // SAFETY: per the contract, the heap and its lists are the caller's.
    unsafe {
        // No thread has the new id: it needs no looking for.
        p.owner_ids.remove((*heap).owner_id);
        (*heap).owner_id = id;
        let lists = [(*heap).full, (*heap).spare];
        for first in lists.into_iter().chain((*heap).pages) {
            let mut p = first;
            while p != empty_page() && !p.is_null() {
                (*p).owner.store(id, Ordering::Relaxed);
                p = (*p).next;
            }
        }
    }
}

/// Sums allocation counts per class over every heap, live or finished.
pub fn counts(per_class: &mut [u64; MAX_CLASSES]) {
    for (c, slot) in per_class.iter_mut().enumerate() {
        *slot = RETIRED_ALLOCS[c].load(Ordering::Relaxed);
    }
    with_pool(|p| {
        let mut h = p.live;
        while !h.is_null() {
            // SAFETY: live heaps stay valid while the pool lock is held; the counters are
            // plain words written by their owners, read here as a racy snapshot.
            unsafe {
                let mut by_class = [0; MAX_CLASSES];
                class_counts(h, &mut by_class);
                for (slot, n) in per_class.iter_mut().zip(by_class) {
                    *slot = slot.saturating_add(n);
                }
                h = (*h).next_live;
            }
        }
    });
}

/// Per class, how many heaps (threads, live or finished) allocated from it; returns
/// the number of heaps.
pub fn class_coverage(using: &mut [u64; MAX_CLASSES]) -> u64 {
    for (c, slot) in using.iter_mut().enumerate() {
        *slot = RETIRED_USING[c].load(Ordering::Relaxed);
    }
    let mut heaps = RETIRED_HEAPS.load(Ordering::Relaxed);
    with_pool(|p| {
        let mut h = p.live;
        while !h.is_null() {
            // SAFETY: live heaps stay valid while the pool lock is held (racy reads of
            // owner-written counters are fine for statistics).
            unsafe {
                let mut by_class = [0; MAX_CLASSES];
                class_counts(h, &mut by_class);
                for (slot, n) in using.iter_mut().zip(by_class) {
                    if n > 0 {
                        *slot += 1;
                    }
                }
                h = (*h).next_live;
            }
            heaps += 1;
        }
    });
    heaps
}

/// Collects everything pending for the calling thread's heap and gives its empty pages
/// (the last of each class too) and spare pages back (for `lg_trim`).
pub fn collect_own() {
    let heap = thread_heap();
    if heap == empty_heap() {
        return;
    }
    // SAFETY: the calling thread owns `heap`.
    unsafe {
        drain_delayed(heap);
        for class in 0..MAX_CLASSES {
            let mut p = (*heap).pages[class];
            while p != empty_page() && !p.is_null() {
                let next = (*p).next;
                page::collect_remote(p);
                if (*p).used() == 0 {
                    // The last page of its class goes too (`page_emptied` keeps it for
                    // the next allocation): a trim gives back all it can, and one empty
                    // page per class of large blocks is megabytes.
                    class_remove(heap, p);
                    keep_spare(heap, p);
                }
                p = next;
            }
        }
        release_spares(heap);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Buckets of `heap` whose `direct` entry is not the first page of their class.
    fn stale_buckets(heap: *mut Heap) -> Vec<usize> {
        // SAFETY: the calling thread's own heap.
        unsafe {
            (0..DIRECT_LEN)
                .filter(|&b| {
                    let class = (*heap).class_of_small[b] as usize;
                    (*heap).direct[b] != (*heap).pages[class]
                })
                .collect()
        }
    }

    /// A fork child's view of a remote free cut short: another thread took the watcher
    /// of a full page (`FREEING`) and queued its block on the owner's `delayed_free`,
    /// but never ended the notification (it is not in the child). Without the fork
    /// child's fix-up, draining that block would wait in `unwatch` forever. After it,
    /// the page is on its class list, the block drains back to it, later remote frees
    /// just queue, and every block of the page frees.
    #[test]
    #[cfg_attr(miri, ignore = "fills pages of a class: minutes under Miri")]
    fn a_notification_cut_short_by_fork_ends_in_the_child() {
        std::thread::spawn(|| {
            let heap = thread_heap_or_create();
            assert!(!heap.is_null());
            // SAFETY: the calling thread's own live heap.
            unsafe { stop_sampling(heap) };
            let size = 64;
            let mut blocks = Vec::new();
            // Fill pages until one is parked, watched, on the full list.
            // SAFETY: the calling thread's own heap; the blocks are its own.
            unsafe {
                while (*heap).full.is_null() {
                    let p = alloc_by_size(thread_heap(), size, CallerOnStack);
                    assert!(!p.is_null());
                    blocks.push(p as usize);
                }
                let full = (*heap).full;
                let on_full: Vec<usize> = blocks
                    .iter()
                    .copied()
                    .filter(|&b| segment::page_of(b) == full)
                    .collect();
                assert!(on_full.len() > 2);
                // The freer's half of `push_remote_or_hand_over`, without its end.
                let cut = on_full[0] as *mut Block;
                let told = page::push_remote(full, cut).cast::<Heap>();
                assert_eq!(told, heap, "the full page was not watched by its heap");
                (*cut).next = page::encode_link(page::link_key(), ptr::null_mut());
                (*heap).delayed_free.store(cut, Ordering::Release);
                assert!(page::notification_in_flight(full));

                end_notifications_cut_by_fork([thread_heap(), verify_heap()]);
                let ended = !page::notification_in_flight(full);
                if !ended {
                    // Else the thread's exit would wait in `unwatch` and the test hang.
                    page::end_notification(full);
                }
                assert!(ended, "the notification cut short is still in flight");
                assert_eq!(
                    (*full).used & IN_FULL_FLAG,
                    0,
                    "the page stayed on the full list"
                );
                assert!(list_holds((*heap).pages[(*full).class as usize], full));
                drain_delayed(heap);
                // Not watched any more: a remote free queues on the page.
                let remote = on_full[1] as *mut Block;
                assert!(page::push_remote(full, remote).is_null());
                assert_eq!(page::collect_remote(full), 1);
                let (last, rest) = on_full[2..].split_last().unwrap();
                for &b in rest {
                    free_block(full, b as *mut u8);
                }
                assert_eq!((*full).used(), 1, "blocks of the page still counted live");
                free_block(full, *last as *mut u8);
                for &b in blocks.iter().filter(|&&b| segment::page_of(b) != full) {
                    free_block(segment::page_of(b), b as *mut u8);
                }
            }
        })
        .join()
        .unwrap();
    }

    fn list_holds(first: *mut Page, page: *mut Page) -> bool {
        let mut p = first;
        while !p.is_null() && p != empty_page() {
            if p == page {
                return true;
            }
            // SAFETY: the calling thread's own list of live page records.
            p = unsafe { (*p).next };
        }
        false
    }

    /// `malloc`'s fast path pops from `Heap::direct`. While pages of many classes are
    /// taken, fill up, go to the full list, empty, retire and come back, every bucket
    /// keeps naming the first page of its class, so no allocation is served from a page
    /// off its class list; and the allocations counted by bucket add up by class.
    #[test]
    #[cfg_attr(
        miri,
        ignore = "over a hundred thousand allocations and page walks: hours under Miri"
    )]
    fn each_bucket_names_its_class_page_as_pages_come_and_go() {
        std::thread::spawn(|| {
            // No samples: the sample arena's test counts its slots exactly.
            let heap = thread_heap_or_create();
            assert!(!heap.is_null());
            // SAFETY: the calling thread's own live heap.
            unsafe { stop_sampling(heap) };
            let sizes: Vec<usize> = (0..=DIRECT_MAX_SIZE).step_by(8).collect();
            let mut blocks = Vec::new();
            for round in 0..4 {
                for &size in &sizes {
                    // Enough blocks to fill several pages of the class.
                    for _ in 0..(64 << 10) / size.max(16) {
                        // SAFETY: the calling thread's heap; `size` is within the table.
                        let p = unsafe { alloc_by_size(thread_heap(), size, CallerOnStack) };
                        assert!(!p.is_null());
                        blocks.push(p as usize);
                    }
                    let heap = thread_heap();
                    assert!(stale_buckets(heap).is_empty(), "after size {size}");
                }
                // Free every other block first (full pages go back on their class
                // lists, behind the first), then the rest (pages empty and retire).
                // Oldest first, the first page of a class empties last; newest first
                // (round 2), it empties while the pages behind it hold blocks, and the
                // class gets another first page. Round 3 empties each class's first
                // page and gives the empty pages back, as `lg_trim` does (the last of
                // a class too): a full page that then gets a block back comes to an
                // empty class list.
                let n = blocks.len();
                let order: Vec<usize> = match round {
                    0 => (0..n).step_by(2).chain((1..n).step_by(2)).collect(),
                    1 => (1..n).step_by(2).chain((0..n).step_by(2)).collect(),
                    2 => (0..n).step_by(2).chain((1..n).step_by(2).rev()).collect(),
                    _ => {
                        let heap = thread_heap();
                        // SAFETY: the calling thread's own heap.
                        let firsts: Vec<*mut Page> = unsafe { (*heap).pages.to_vec() };
                        let (on_first, rest): (Vec<usize>, Vec<usize>) =
                            (0..n).partition(|&i| firsts.contains(&segment::page_of(blocks[i])));
                        for i in on_first {
                            // SAFETY: as below.
                            unsafe {
                                free_block(segment::page_of(blocks[i]), blocks[i] as *mut u8)
                            };
                        }
                        collect_own();
                        assert!(stale_buckets(heap).is_empty(), "after the trim");
                        rest
                    }
                };
                for (k, i) in order.into_iter().enumerate() {
                    // SAFETY: each block was allocated above (in a segment) and is freed
                    // once.
                    unsafe { free_block(segment::page_of(blocks[i]), blocks[i] as *mut u8) };
                    if k % 97 == 0 {
                        assert!(stale_buckets(thread_heap()).is_empty(), "freeing {i}");
                    }
                }
                assert!(stale_buckets(thread_heap()).is_empty(), "round {round}");
                blocks.clear();
            }
            let heap = thread_heap();
            let mut by_class = [0; MAX_CLASSES];
            // SAFETY: the calling thread's own heap.
            unsafe { class_counts(heap, &mut by_class) };
            let expected: usize = sizes.iter().map(|&s| 4 * ((64 << 10) / s.max(16))).sum();
            assert_eq!(by_class.iter().sum::<u64>(), expected as u64);
        })
        .join()
        .unwrap();
    }
}
