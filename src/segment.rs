//! Segments and the region: where pages come from.
//!
//! A segment is a 4 MiB chunk, 4 MiB aligned, cut into 4096 slices of 1 KiB. Its first
//! slices hold metadata: a slice -> page-head map and one [`Page`] record per slice,
//! in bit-reversed slice order (see [`record_slot`]), so that the records a heap of
//! large pages uses lie together and few of the metadata's OS pages become resident.
//! Pages are runs of slices; a new thread's first page of a class is one slice, so a
//! thread that holds a few small objects costs about a kilobyte per class, and pages of
//! different threads share segments (and OS pages). Finding the page of a block is a
//! mask, a shift and two loads.
//!
//! The region (behind one lock, off the fast path) keeps free spans of slices in size
//! bins, coalesces neighbours on free, decommits free memory once it has lain unused
//! for a while (or too much of it piles up), returns empty segments to the OS once
//! their memory is decommitted, and keeps the pages of exited threads until another
//! heap adopts them or they empty out. Heaps keep a few empty pages of their own (see
//! `heap`) and cut the pages of their young classes from runs of slices they take in
//! one visit (`split_spare`, no lock), so they come here only in batches: the lock is
//! not on the steady-state path.
//!
//! Purging, with hysteresis: a free span remembers when it was last freed (its head's
//! `free` word holds the time, in milliseconds). Spans untouched for the purge delay
//! are decommitted by the next region call (or heap slow path, `purge_if_due`) after
//! that delay, at most one pass per delay; spans reused sooner never are, so steady
//! churn never purges and refaults. The delay starts at `PURGE_DELAY_MS` and doubles
//! (up to `PURGE_DELAY_MAX_MS`) while the program takes purged memory back within a
//! delay of its purge, then halves back once it stops. Only when more than
//! `PURGE_HARD` bytes of free memory may be resident is younger memory decommitted at
//! once, down to half that.
//!
//! The `madvise` calls of a purge run outside the lock: the spans to purge are taken
//! off the bins (flagged `FLAG_PURGING` and counted as used, so neither a neighbour's
//! merge nor a segment release can touch them), decommitted once the lock is released,
//! and given back clean in a second, short visit (`with_region_purging`). So do the
//! `mmap` and `munmap` of whole segments: a segment is mapped before the visit that
//! adds it (`alloc_page`) and unmapped after the visit that released it
//! (`with_region`). Under test-stress (traced), system calls under the lock were most
//! of the contention: futex calls 3.8-4.2k before, 1.2-1.6k after.
//!
//! Committing, in batches: a heap whose class is busy takes several pages in one visit
//! (adjacent where there is room, `take_after`); the runs of them never used since
//! their segment was mapped are populated in one system call each once the lock is
//! released (`alloc_page`), instead of one page fault per 4 KiB as blocks are carved.

use core::ptr;
use core::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use crate::chunk_map::{self, KIND_NONE, KIND_SEGMENT};
use crate::geometry::{SEGMENT_SIZE, SLICE_SHIFT, SLICE_SIZE, SLICES, segment_base};
use crate::list;
use crate::lock::Locked;
use crate::os::{self, OS_PAGE_SIZE};
use crate::page::{self, FLAG_ABANDONED, FLAG_DIRTY, FLAG_FREE_SPAN, FLAG_PURGING, Owner, Page};
use crate::segment_space;
use crate::size_class::MAX_CLASSES;

/// Per slice, the address of the record of the page that holds the slice: storing the
/// address rather than an index or an offset from the segment base saves the free path
/// a shift or an add, for 16 KiB more of (mostly untouched) metadata per segment.
const SLICE_HEAD_OFFSET: usize = 64;
const PAGES_OFFSET: usize = SLICE_HEAD_OFFSET + SLICES * core::mem::size_of::<usize>();
const META_BYTES: usize = PAGES_OFFSET + SLICES * core::mem::size_of::<Page>();
/// Slices taken by the metadata at the start of each segment.
pub const FIRST_SLICE: usize = META_BYTES.div_ceil(SLICE_SIZE);

/// How long free memory lies unused before it is decommitted, at least (the delay a
/// program starts with) and at most: the region lengthens it for a program that takes
/// back purged memory soon after the purge (`RegionInner::purge_delay`).
pub(crate) const PURGE_DELAY_MS: u64 = 100;
const PURGE_DELAY_MAX_MS: u64 = 1000;
/// Purged memory taken back early (within a delay of its purge) that lengthens the
/// purge delay: a program's churn, not a few blocks taken from a large purged span.
const PREMATURE_PURGE_BYTES: usize = 4 << 20;
/// Free memory that may be resident beyond which the region decommits even young free
/// spans, down to half of that: this much, or an eighth of the segments' memory if more
/// (so a large steady working set does not purge what it reuses a moment later).
const PURGE_HARD: usize = 16 << 20;
/// The `freed_at` time of a fresh segment's free span (and of the parts split off it):
/// memory never used since it was mapped, the memory `alloc_page` populates. Real
/// times are never zero, so no span freed since carries it.
const NEVER_USED: u64 = 0;
/// A free span's head keeps two things in its `free` word: when it was last freed (ms,
/// the low bits) and, above `FRESH_SHIFT`, how many slices at its end were never used
/// since the segment was mapped (its fresh tail: they read as zero and hold nothing
/// resident). A monotonic clock in ms needs far fewer than 48 bits.
const FRESH_SHIFT: u32 = 48;
const FREED_AT_MASK: u64 = (1 << FRESH_SHIFT) - 1;
const _: () = assert!(SLICES < 1 << (u64::BITS - FRESH_SHIFT));
/// Abandoned pages a thread exit inspects (freeing those whose blocks all came back,
/// by their remote lists' counts). Enough that exited threads' pages emptied by other
/// threads come back round after round (the thread-exit test parks ~300 per round; 64
/// let ~10 MiB pile up), bounded so one exit never walks an unbounded list of pages
/// under the lock.
const EXIT_SWEEP_PAGES: usize = 1024;
/// Resident free memory a thread exit leaves for reuse (any more is decommitted at
/// once). What the exiting thread gives back counts like any other free memory: its
/// successors usually need pages right away (a thread pool, a server's per-request
/// threads), and decommitting what they take a moment later cost larson (threads that
/// hand their objects on and exit, 8 at once) ~17 madvise calls and ~70 page faults
/// per exit, and half its throughput. Spans kept here age as usual: the purge delay
/// decommits them once nobody reused them. A program whose threads have been taking
/// back what earlier exits decommitted keeps more (`RegionInner::exit_keep`).
const EXIT_KEEP_DIRTY: usize = 4 << 20;
/// How fast the learned exit demand (`RegionInner::exit_keep`) fades: halved per this
/// many milliseconds since it was last raised. Longer than the purge delay, so a
/// program that starts a round of threads every few hundred milliseconds keeps it from
/// round to round, short enough that a program that stopped doing so soon gives back
/// no more at exit than `EXIT_KEEP_DIRTY` allows.
const EXIT_DEMAND_HALF_LIFE_MS: u64 = 1000;

const SPAN_BINS: usize = 18;
/// Free spans smaller than this (64 KiB) are not purged for age alone (`purge_as_due`);
/// `bin_of` puts spans of this size and more in bins of their own.
const DELAYED_PURGE_MIN_SLICES: usize = 64;

#[repr(C)]
struct Segment {
    /// Slices held by pages.
    used_slices: usize,
    next: *mut Segment,
    prev: *mut Segment,
    /// The OS pages of page records written so far, one bit each (see
    /// [`note_record_written`]): the rest are not resident.
    record_pages: AtomicU64,
}

const _: () = assert!(core::mem::size_of::<Segment>() <= SLICE_HEAD_OFFSET);
const _: () = assert!(core::mem::size_of::<Page>() == 64);
const _: () = assert!(PAGES_OFFSET.is_multiple_of(64));

/// The slice -> page-head map. Its entries are atomic because a heap rewrites the
/// entries of its own spare spans without the region lock (`split_spare`) while other
/// threads may read them: the region looking at a neighbour, a free of a stray pointer.
/// Relaxed loads and stores are plain moves on x86-64, so `page_of` costs no more.
/// A segment in the segment space has its map in the space's (`segment_space`), which
/// `free` reads without the segment's base; one mapped on its own, in its header.
#[inline(always)]
fn slice_heads(seg: usize) -> *const AtomicUsize {
    segment_space::window_of(seg).unwrap_or((seg + SLICE_HEAD_OFFSET) as *const AtomicUsize)
}

/// Records that slice `slice` of `seg` belongs to the page (or span) whose record is
/// `head` (`page_at` of its first slice). Release: whoever finds `head` through the map
/// finds it written.
///
/// # Safety
/// `seg` is a live segment, `slice` is below `SLICES` and `head` is a record of `seg`.
#[inline]
unsafe fn set_head(seg: usize, slice: usize, head: *mut Page) {
    // SAFETY: per the contract the slot lies in the segment's metadata.
    unsafe { (*slice_heads(seg).add(slice)).store(head as usize, Ordering::Release) };
}

/// [`set_head`] for every slice of `slices`, with the map found once.
///
/// # Safety
/// As for [`set_head`], for every slice of the range.
#[inline]
unsafe fn set_heads(seg: usize, slices: core::ops::Range<usize>, head: *mut Page) {
    let heads = slice_heads(seg);
    for slice in slices {
        // SAFETY: per the contract the slot lies in the segment's map.
        unsafe { (*heads.add(slice)).store(head as usize, Ordering::Release) };
    }
}

/// The record of the page (or span) holding slice `slice` of `seg`.
///
/// # Safety
/// `seg` is a live segment and `slice < SLICES`.
#[inline(always)]
unsafe fn head_page(seg: usize, slice: usize) -> *mut Page {
    // SAFETY: per the contract the slot lies in the segment's metadata.
    let record = unsafe { (*slice_heads(seg).add(slice)).load(Ordering::Relaxed) };
    record as *mut Page
}

/// As [`head_page`], ordered after the writes that made the record a head
/// ([`set_head`] is a release), for readers that then read the record's fields.
///
/// # Safety
/// As for [`head_page`].
#[inline]
unsafe fn head_page_acquire(seg: usize, slice: usize) -> *mut Page {
    // SAFETY: per the contract the slot lies in the segment's metadata.
    let record = unsafe { (*slice_heads(seg).add(slice)).load(Ordering::Acquire) };
    record as *mut Page
}

/// The first OS page of a segment that holds only page records: the ones before it hold
/// the header and the slice -> page-head map, which `add_segment` writes in full (the
/// last of them also holds the first records).
const FIRST_RECORD_PAGE: usize = PAGES_OFFSET.div_ceil(OS_PAGE_SIZE);
/// OS pages from `FIRST_RECORD_PAGE` that hold only page records (the one after them
/// also holds the first usable slice).
const RECORD_PAGES: usize = META_BYTES / OS_PAGE_SIZE - FIRST_RECORD_PAGE;
const _: () = assert!(RECORD_PAGES <= u64::BITS as usize);

/// Notes that `record`, which heads a span of `seg` from now on, is written, so its OS
/// page counts as committed (statistics): a segment's records are written only where
/// spans start ([`record_slot`]), and most of their OS pages never are. Lock-free (a
/// heap cutting its spare spans calls it without the region lock).
///
/// # Safety
/// `seg` is a live segment and `record` one of its records.
#[inline]
unsafe fn note_record_written(seg: usize, record: *mut Page) {
    let page = ((record as usize - seg) / OS_PAGE_SIZE).wrapping_sub(FIRST_RECORD_PAGE);
    if page >= RECORD_PAGES {
        return;
    }
    let bit = 1u64 << page;
    // SAFETY: per the contract the header is mapped.
    let written = unsafe { &(*(seg as *const Segment)).record_pages };
    if written.load(Ordering::Relaxed) & bit == 0
        && written.fetch_or(bit, Ordering::Relaxed) & bit == 0
    {
        UNWRITTEN_RECORD_BYTES.fetch_sub(OS_PAGE_SIZE, Ordering::Relaxed);
    }
}

/// Bytes of `seg`'s record pages never written.
///
/// # Safety
/// `seg` is a live segment.
unsafe fn unwritten_records(seg: usize) -> usize {
    // SAFETY: per the contract the header is mapped.
    let written = unsafe {
        (*(seg as *const Segment))
            .record_pages
            .load(Ordering::Relaxed)
    };
    (RECORD_PAGES - written.count_ones() as usize) * OS_PAGE_SIZE
}

/// Bytes of `seg`'s metadata slices counted as committed: all but the record pages
/// never written.
///
/// # Safety
/// `seg` is a live segment.
unsafe fn metadata_committed(seg: usize) -> usize {
    // SAFETY: per the contract.
    FIRST_SLICE * SLICE_SIZE - unsafe { unwritten_records(seg) }
}

/// Takes `seg`'s unwritten record pages out of the statistics as it goes.
///
/// # Safety
/// `seg` is a live segment about to be unmapped.
unsafe fn forget_records(seg: usize) {
    // SAFETY: per the contract.
    let unwritten = unsafe { unwritten_records(seg) };
    UNWRITTEN_RECORD_BYTES.fetch_sub(unwritten, Ordering::Relaxed);
}

/// The record of the page (or span) whose first slice is `slice`.
#[inline]
fn page_at(seg: usize, slice: usize) -> *mut Page {
    (seg + PAGES_OFFSET + record_slot(slice) * core::mem::size_of::<Page>()) as *mut Page
}

/// Where the record of slice `slice` lies among its segment's records: at the slice
/// index with its 12 bits reversed.
///
/// Only the records of slices that start a page or a free span are ever written; the
/// rest of the 256 KiB of records stays untouched, hence not resident. 64 records fill
/// a 4 KiB OS page. In slice order, a run of 64 KiB pages (a busy class's size) writes
/// one record in each of those pages: 6.25% of the memory the run serves (perl
/// building a hash: 6.4 MB of metadata in its 100 MB). Reversed, a record's OS page is
/// chosen by its slice's low 6 bits, which the starts of pages of 64 slices laid end to
/// end share: their records fill one OS page (perl: 2.1 MB of metadata, header and map
/// included), and those of pages of 2^k slices spread over 64 / 2^k of them. A run of
/// one-slice pages (a young class's first pages) spreads over all 64 instead; such
/// pages hold little memory, and at worst every record page is resident, as in slice
/// order.
#[inline]
const fn record_slot(slice: usize) -> usize {
    const SLICE_BITS: u32 = SLICES.trailing_zeros();
    const _: () = assert!(SLICES.is_power_of_two() && SLICE_BITS <= u16::BITS);
    (((slice as u16) << (u16::BITS - SLICE_BITS)).reverse_bits()) as usize
}

/// The page holding `addr`, which must lie in a small-object segment.
#[inline(always)]
pub fn page_of(addr: usize) -> *mut Page {
    page_in(segment_base(addr), addr)
}

/// The page holding `addr` if `addr` lies in the segment space (`segment_space`): a
/// bounds check and one load, the free fast path's lookup. `None` for a segment mapped
/// on its own or anything not in a segment.
#[inline(always)]
pub fn page_in_space(addr: usize) -> Option<*mut Page> {
    segment_space::page_of(addr).map(|record| record as *mut Page)
}

/// The page holding `addr` in segment `seg` (`chunk_map::segment_holding(addr)`).
#[inline(always)]
pub fn page_in(seg: usize, addr: usize) -> *mut Page {
    let slice = (addr >> SLICE_SHIFT) & (SLICES - 1);
    // SAFETY: the chunk map said `seg` is a segment, so its slice-head map is mapped;
    // `slice < SLICES`.
    unsafe { head_page(seg, slice) }
}

/// Slices a page of `block_size` should be aligned to, so that every block is aligned
/// to the largest power of two dividing the block size (capped at 256 KiB).
pub fn span_alignment(block_size: usize) -> usize {
    let pow2 = 1usize << block_size.trailing_zeros().min(18);
    (pow2 >> SLICE_SHIFT).max(1)
}

struct RegionInner {
    segments: *mut Segment,
    /// Segments released in this visit, linked through `next`, unmapped by
    /// `with_region` once the lock is released (an unmap under the lock made every
    /// thread wanting a page wait for the system call).
    unmapping: *mut Segment,
    /// Purge batches between their two visits (`with_region_purging`), linked through
    /// `next`: their spans are off the bins, so a `fork` child, which has none of the
    /// threads that would give them back, puts them back itself
    /// (`RegionInner::reclaim_purging`).
    purging: *mut PurgeBatch,
    /// Segment requests between their two visits (`alloc_page`), linked through `next`:
    /// a `fork` child adds the segments its parent's threads had mapped but not added
    /// (`RegionInner::add_requested_segments`).
    requests: *mut SegmentRequest,
    /// The request this visit made, if any: `with_region` maps its segment once the
    /// lock is released.
    request_now: *mut SegmentRequest,
    segment_count: usize,
    bins: [*mut Page; SPAN_BINS],
    abandoned: [*mut Page; MAX_CLASSES],
    abandoned_count: usize,
    sweep_class: usize,
    free_bytes: usize,
    /// Bytes of free spans that may be resident: the sum of their dirty slice counts.
    dirty_bytes: usize,
    /// Exit demand learning (see `exit_keep`): bytes the thread exits' purges
    /// decommitted that no take has matched yet; when the last such purge ran (ms);
    /// bytes taken since that matched them; and the demand learned from those, with
    /// when it was last raised (ms).
    exit_purged: usize,
    exit_purged_at: u64,
    exit_retaken: usize,
    exit_demand: usize,
    exit_demand_at: u64,
    /// The purge delay (ms), between `PURGE_DELAY_MS` and `PURGE_DELAY_MAX_MS`, and
    /// when memory was last taken back within one delay of its purge (ms).
    purge_delay: u64,
    premature_purge_at: u64,
    /// Bytes taken back early since the delay last changed.
    premature_purge_bytes: usize,
}

/// When (milliseconds, `os::now_ms`) the next purge pass is due; zero when no free
/// memory waits to be purged. Written under the region lock, read by heaps without it.
static PURGE_AT: AtomicU64 = AtomicU64::new(0);
/// Per class, abandoned pages waiting (a copy of the list lengths kept under the lock),
/// so a heap looks for one without taking the lock when there is none.
static ABANDONED_IN_CLASS: [AtomicU32; MAX_CLASSES] = [const { AtomicU32::new(0) }; MAX_CLASSES];

static REGION: Locked<RegionInner> = Locked::new(RegionInner::EMPTY);

impl RegionInner {
    /// A region with no segment.
    const EMPTY: RegionInner = RegionInner {
        segments: ptr::null_mut(),
        unmapping: ptr::null_mut(),
        purging: ptr::null_mut(),
        requests: ptr::null_mut(),
        request_now: ptr::null_mut(),
        segment_count: 0,
        bins: [ptr::null_mut(); SPAN_BINS],
        abandoned: [ptr::null_mut(); MAX_CLASSES],
        abandoned_count: 0,
        sweep_class: 0,
        free_bytes: 0,
        dirty_bytes: 0,
        exit_purged: 0,
        exit_purged_at: 0,
        exit_retaken: 0,
        exit_demand: 0,
        exit_demand_at: 0,
        purge_delay: PURGE_DELAY_MS,
        premature_purge_at: 0,
        premature_purge_bytes: 0,
    };
}

/// Bytes of address space held in segments (statistics).
pub static SEGMENT_BYTES: AtomicUsize = AtomicUsize::new(0);
/// Bytes of free spans known not to be resident (statistics): for each free span, its
/// size minus its dirty slice count. `free_bytes == dirty_bytes + CLEAN_FREE_BYTES`.
static CLEAN_FREE_BYTES: AtomicUsize = AtomicUsize::new(0);
/// Bytes of segments' record pages never written (statistics; see
/// [`note_record_written`]): not resident, like clean free spans.
static UNWRITTEN_RECORD_BYTES: AtomicUsize = AtomicUsize::new(0);

/// A segment a visit that found no room asked for (`alloc_page`): mapped once the lock
/// is released (`with_region`), added by the same thread's next visit. It lives on that
/// thread's stack and stays on the region's `requests` list in between, so that a `fork`
/// child, which does not have the thread, adds the segment itself (the fork waits for
/// the mapping: work after a release, see `Locked::with_then`).
struct SegmentRequest {
    /// The segment mapped for the request; null until then, or when the OS refused.
    base: *mut u8,
    next: *mut SegmentRequest,
}

/// A record of a visit's own (on its thread's stack) listed on the region between two
/// visits, singly linked through `next`.
trait Listed {
    /// The address of the record's link.
    ///
    /// # Safety
    /// `this` is a live record.
    unsafe fn next(this: *mut Self) -> *mut *mut Self;
}

impl Listed for PurgeBatch {
    unsafe fn next(this: *mut Self) -> *mut *mut Self {
        // SAFETY: per the contract; only the field's address is taken.
        unsafe { &raw mut (*this).next }
    }
}

impl Listed for SegmentRequest {
    unsafe fn next(this: *mut Self) -> *mut *mut Self {
        // SAFETY: per the contract; only the field's address is taken.
        unsafe { &raw mut (*this).next }
    }
}

/// Takes `item` off the list starting at `head`, if it is there.
///
/// # Safety
/// Every record on the list is alive.
unsafe fn unlist<T: Listed>(head: &mut *mut T, item: *const T) {
    let mut link: *mut *mut T = head;
    // SAFETY: per the contract.
    unsafe {
        while !(*link).is_null() {
            if ptr::eq(*link, item) {
                *link = *T::next(*link);
                return;
            }
            link = T::next(*link);
        }
    }
}

/// Runs `f` on the region with its lock held, then unmaps the segments it released and
/// maps the segment it asked for (work a `fork` meanwhile waits for: see
/// `lock_for_fork`).
fn with_region<R>(f: impl FnOnce(&mut RegionInner) -> R) -> R {
    REGION.with_then(
        |r| {
            let result = f(r);
            let unmapping = core::mem::replace(&mut r.unmapping, ptr::null_mut());
            let request = core::mem::replace(&mut r.request_now, ptr::null_mut());
            let work = !unmapping.is_null() || !request.is_null();
            (result, work.then_some((unmapping, request)))
        },
        |(mut unmapping, request)| {
            while !unmapping.is_null() {
                // SAFETY: the segment left the region's list and the chunk map in the
                // visit (`release_segment`): nothing refers to it; its header stays
                // readable until the unmap.
                unsafe {
                    let next = (*unmapping).next;
                    unmap_segment(unmapping.cast());
                    unmapping = next;
                }
            }
            if !request.is_null() {
                // SAFETY: the request stays alive until its thread's next visit takes
                // it off the list; only this thread writes it.
                unsafe { (*request).base = map_segment() };
            }
        },
    )
}

/// Bytes released by purges and segment unmaps so far ([`released_total`]).
static RELEASED_TOTAL: AtomicUsize = AtomicUsize::new(0);

/// Spans one visit may take off the bins for purging (a pass that wants more leaves the
/// rest for the next one).
const PURGE_BATCH: usize = 64;

/// Free spans taken off the bins by `RegionInner::purge`, each with its dirty slice
/// count, waiting to be decommitted outside the lock.
struct PurgeBatch {
    spans: [(*mut Page, usize); PURGE_BATCH],
    len: usize,
    /// The next batch on `RegionInner::purging`.
    next: *mut PurgeBatch,
}

impl PurgeBatch {
    const fn new() -> PurgeBatch {
        PurgeBatch {
            spans: [(ptr::null_mut(), 0); PURGE_BATCH],
            len: 0,
            next: ptr::null_mut(),
        }
    }

    fn taken(&self) -> &[(*mut Page, usize)] {
        self.spans.get(..self.len).unwrap_or(&[])
    }
}

/// Runs `f` with the region lock held, then decommits the spans it chose to purge with
/// the lock released and gives them back clean in a second visit. Returns `f`'s result
/// and the bytes released: per span, what was decommitted but at most its dirty bytes,
/// so memory returned before is not counted again.
fn with_region_purging<R>(f: impl FnOnce(&mut RegionInner, &mut PurgeBatch) -> R) -> (R, usize) {
    let mut batch = PurgeBatch::new();
    let result = with_region(|r| {
        let result = f(r, &mut batch);
        if batch.len != 0 {
            batch.next = r.purging;
            r.purging = &mut batch;
        }
        result
    });
    let taken = batch.taken();
    if taken.is_empty() {
        return (result, 0);
    }
    let mut released = 0;
    for &(span, dirty) in taken {
        // SAFETY: the span is off the bins and counted as used: no other thread touches
        // its memory or its record until we give it back below.
        unsafe {
            let decommitted = os::decommit((*span).start(), (*span).bytes());
            released += decommitted.min(dirty << SLICE_SHIFT);
        }
    }
    let now = os::now_ms();
    with_region(|r| {
        r.unlist_purging(&batch);
        for &(span, _) in taken {
            // SAFETY: as above; `release_span` sees `FLAG_PURGING` and counts it clean.
            unsafe { r.release_span(span, now) };
        }
    });
    RELEASED_TOTAL.fetch_add(released, Ordering::Relaxed);
    (result, released)
}

/// Lock hooks for `fork`.
pub fn lock_for_fork() {
    REGION.lock_for_fork();
    segment_space::lock_for_fork();
}
pub fn unlock_after_fork(child: bool) {
    segment_space::unlock_after_fork(child);
    REGION.unlock_after_fork(child);
    if child {
        let now = os::now_ms();
        // SAFETY: the child's only thread runs this; the batches and requests on the
        // lists were between their two visits when the parent forked (the second needs
        // the lock the fork held), so their spans are off the bins, their segments are
        // not added, and no thread here uses either.
        with_region(|r| unsafe {
            r.reclaim_purging(now);
            r.add_requested_segments();
        });
    }
}

/// Acquisitions of this layer's lock so far, and the contended ones (statistics).
pub fn lock_counts() -> (u64, u64) {
    let (acquired, contended) = REGION.lock_counts();
    let (space_acquired, space_contended) = segment_space::lock_counts();
    (acquired + space_acquired, contended + space_contended)
}

fn bin_of(slices: usize) -> usize {
    if slices <= 8 {
        slices - 1
    } else {
        let log = (usize::BITS - 1 - slices.leading_zeros()) as usize;
        (8 + log - 3).min(SPAN_BINS - 1)
    }
}

// SAFETY: `next` and `prev` are the segment's two list links, written only under the
// region lock.
unsafe impl list::Linked for Segment {
    unsafe fn next(this: *mut Self) -> *mut *mut Self {
        // SAFETY: `this` is a live segment per the contract.
        unsafe { &raw mut (*this).next }
    }
    unsafe fn prev(this: *mut Self) -> *mut *mut Self {
        // SAFETY: `this` is a live segment per the contract.
        unsafe { &raw mut (*this).prev }
    }
}

/// When the free span headed by `head` was last freed (ms): kept in the head's `free`
/// word, which free spans do not use otherwise.
///
/// # Safety
/// `head` is the head record of a free span and the region lock is held.
unsafe fn freed_at(head: *const Page) -> u64 {
    // SAFETY: per the contract.
    unsafe { (*head).free.addr() as u64 & FREED_AT_MASK }
}

/// How many slices at the end of the free span headed by `head` were never used since
/// their segment was mapped (kept above the time in the head's `free` word).
///
/// # Safety
/// As for [`freed_at`].
unsafe fn fresh_tail(head: *const Page) -> usize {
    // SAFETY: per the contract.
    unsafe { ((*head).free.addr() as u64 >> FRESH_SHIFT) as usize }
}

/// The dirty slice count of a free span's head record.
///
/// # Safety
/// `head` is the head record of a free span and the region lock is held.
unsafe fn dirty_slices(head: *const Page) -> usize {
    // SAFETY: per the contract; the field is written only under the region lock.
    unsafe { (*head).used as usize }
}

impl RegionInner {
    /// Records `[start, start + count)` of `seg` as a free span of which at most `dirty`
    /// slices may be resident (the rest is known to be decommitted or never touched).
    ///
    /// Accounting: a free span keeps in its head record (`Page::used`, unused by free
    /// spans otherwise) an upper bound on its resident slices, not where they lie.
    /// Merging adds the bounds (exact when the parts were exact); a split cannot know
    /// which part holds the dirty slices, so each remaining part keeps
    /// `min(dirty, its size)` (see `split`); a purge makes the bound zero. Hence
    /// `dirty_bytes` never undercounts resident free memory and `CLEAN_FREE_BYTES` never
    /// counts a resident byte as clean.
    ///
    /// `freed_at` is when its memory was last in use (ms), for the purge delay. The last
    /// `fresh` slices were never used since the segment was mapped (a span freshly
    /// mapped is fresh throughout): a page taken wholly inside them reads as zero, so
    /// `calloc` need not clear it, and may be backed in advance (`alloc_page`). None of
    /// them is resident, so they bound `dirty` too.
    ///
    /// # Safety
    /// The slices are free and not on any list.
    unsafe fn insert_free(
        &mut self,
        seg: usize,
        start: usize,
        count: usize,
        dirty: usize,
        freed_at: u64,
        fresh: usize,
    ) {
        let fresh = fresh.min(count);
        let dirty = dirty.min(count - fresh);
        let head = page_at(seg, start);
        // SAFETY: the span lies in a segment we own; its records are ours.
        unsafe {
            note_record_written(seg, head);
            (*head).flags = FLAG_FREE_SPAN | if dirty > 0 { FLAG_DIRTY } else { 0 };
            (*head).used = dirty as u32;
            let word = (freed_at & FREED_AT_MASK) | (fresh as u64) << FRESH_SHIFT;
            (*head).free = ptr::without_provenance_mut(word as usize);
            (*head).start_offset = (start << SLICE_SHIFT) as u32;
            (*head).slice_count = count as u16;
            (*head).carved.store(0, Ordering::Relaxed);
            (*head).div_magic = 0;
            (*head).block_origin = 1;
            (*head).owner.store(ptr::null_mut(), Ordering::Relaxed);
            set_head(seg, start, head);
            set_head(seg, start + count - 1, head);
            list::push_front(&mut self.bins[bin_of(count)], head);
        }
        self.free_bytes += count << SLICE_SHIFT;
        self.dirty_bytes += dirty << SLICE_SHIFT;
        if count > dirty {
            CLEAN_FREE_BYTES.fetch_add((count - dirty) << SLICE_SHIFT, Ordering::Relaxed);
        }
        if dirty > 0 && PURGE_AT.load(Ordering::Relaxed) == 0 {
            PURGE_AT.store(freed_at + self.purge_delay, Ordering::Relaxed);
        }
    }

    /// Takes a free span off its bin; returns its dirty slice count.
    ///
    /// # Safety
    /// `head` is a free span on its bin.
    unsafe fn remove_free(&mut self, head: *mut Page) -> usize {
        // SAFETY: per the contract.
        unsafe {
            let count = (*head).slice_count as usize;
            let dirty = dirty_slices(head).min(count);
            list::remove(&mut self.bins[bin_of(count)], head);
            self.free_bytes -= count << SLICE_SHIFT;
            self.dirty_bytes -= dirty << SLICE_SHIFT;
            if count > dirty {
                CLEAN_FREE_BYTES.fetch_sub((count - dirty) << SLICE_SHIFT, Ordering::Relaxed);
            }
            (*head).flags = 0;
            (*head).used = 0;
            (*head).free = ptr::null_mut();
            dirty
        }
    }

    /// Finds and takes `count` slices starting at a multiple of `align` slices. Also
    /// says whether they were never used since their segment was mapped (`split`).
    fn take_span(&mut self, count: usize, align: usize) -> (*mut Page, bool) {
        for bin in bin_of(count)..SPAN_BINS {
            let mut cand = self.bins[bin];
            let mut tries = 0;
            while !cand.is_null() && tries < 32 {
                // SAFETY: bin entries are free-span heads in our segments.
                let (idx, len, next) = unsafe {
                    (
                        (*cand).slice_index(),
                        (*cand).slice_count as usize,
                        (*cand).next,
                    )
                };
                let start = idx.next_multiple_of(align);
                if start + count <= idx + len {
                    // SAFETY: `cand` is a free span; we split it around the part taken.
                    return unsafe { self.split(cand, start, count) };
                }
                cand = next;
                tries += 1;
            }
        }
        (ptr::null_mut(), false)
    }

    /// Takes `count` slices right after the span `prev` (which the caller just took)
    /// when the free span there has room and starts on an `align` boundary, so pages
    /// taken together lie together (one `populate` call covers them). As `take_span`.
    fn take_after(&mut self, prev: *mut Page, count: usize, align: usize) -> (*mut Page, bool) {
        let seg = segment_base(prev as usize);
        // SAFETY: `prev` heads a span of ours; the region lock is held, so the record
        // after it (a span head when it lies inside the segment) is ours to read.
        unsafe {
            let next = (*prev).slice_index() + (*prev).slice_count as usize;
            if next >= SLICES || !next.is_multiple_of(align) {
                return (ptr::null_mut(), false);
            }
            let cand = page_at(seg, next);
            if (*cand).flags & FLAG_FREE_SPAN == 0 || ((*cand).slice_count as usize) < count {
                return (ptr::null_mut(), false);
            }
            self.split(cand, next, count)
        }
    }

    /// Takes `[start, start + count)` out of the free span `head`; the result says
    /// whether the part taken was never used since its segment was mapped (the whole
    /// span was: no dirty slice and no use since).
    ///
    /// # Safety
    /// `head` is a free span containing `[start, start + count)`.
    unsafe fn split(&mut self, head: *mut Page, start: usize, count: usize) -> (*mut Page, bool) {
        let seg = segment_base(head as usize);
        // SAFETY: per the contract.
        unsafe {
            let (idx, len) = ((*head).slice_index(), (*head).slice_count as usize);
            // Where the dirty slices lie is not recorded, but they lie before the fresh
            // tail: each remaining part may hold all of them (`insert_free` caps the
            // count at the part's size less its fresh tail). The part taken becomes a
            // page, counted as committed whatever its state; it reads as zero when it
            // lies wholly in the fresh tail. The parts left keep the span's age and
            // what they hold of the fresh tail.
            let stamp = freed_at(head);
            let fresh_from = idx + len - fresh_tail(head);
            let dirty = self.remove_free(head);
            if start > idx {
                let fresh = start - fresh_from.clamp(idx, start);
                self.insert_free(seg, idx, start - idx, dirty, stamp, fresh);
            }
            let end = start + count;
            if end < idx + len {
                let fresh = idx + len - fresh_from.max(end);
                self.insert_free(seg, end, idx + len - end, dirty, stamp, fresh);
            }
            let fresh = start >= fresh_from;
            let page = page_at(seg, start);
            note_record_written(seg, page);
            (*page).flags = 0;
            // A span taken as a page but not yet set up (a heap's spare) reads as
            // empty to statistics.
            (*page).used = 0;
            (*page).start_offset = (start << SLICE_SHIFT) as u32;
            (*page).slice_count = count as u16;
            set_heads(seg, start..end, page);
            (*(seg as *mut Segment)).used_slices += count;
            // Memory taken while exits' decommits wait to be matched: what the exits
            // should have kept (`exit_keep`).
            let matched = (count << SLICE_SHIFT).min(self.exit_purged);
            self.exit_purged -= matched;
            self.exit_retaken += matched;
            if !fresh && dirty == 0 && stamp != NEVER_USED {
                self.note_purged_memory_taken(stamp, count << SLICE_SHIFT);
            }
            (page, fresh)
        }
    }

    /// Takes a span of `first` slices and up to `extra` more of `slices` (next to it
    /// where there is room; on the plain list `extras`, each marked as reading as zero
    /// or not), all starting at multiples of `align`, for `alloc_page`; with `populate`,
    /// notes their fresh parts. The span is null when no free span holds it. Also says
    /// whether the span's memory reads as zero.
    fn take_batch(
        &mut self,
        first: usize,
        slices: usize,
        align: usize,
        extra: usize,
        extras: &mut *mut Page,
        populate: bool,
    ) -> (*mut Page, bool, FreshRuns) {
        let mut runs = FreshRuns::default();
        let (p, fresh) = self.take_span(first, align);
        if p.is_null() {
            return (p, false, runs);
        }
        if populate && fresh {
            runs.add(p);
        }
        let mut last = p;
        for _ in 0..extra {
            let mut e = self.take_after(last, slices, align);
            if e.0.is_null() {
                e = self.take_span(slices, align);
            }
            let (e, fresh) = e;
            if e.is_null() {
                break;
            }
            if populate && fresh {
                runs.add(e);
            }
            last = e;
            // SAFETY: the span was just taken and is on no list.
            unsafe {
                page::mark_span_zeroed(e, fresh);
                list::push_front(extras, e);
            }
        }
        (p, fresh, runs)
    }

    /// Queues a segment for unmapping once the lock is released (`with_region`).
    ///
    /// # Safety
    /// `base` is a mapped segment on no list, named by no chunk map entry, with nothing
    /// in it in use.
    unsafe fn queue_unmap(&mut self, base: *mut u8) {
        let s = base.cast::<Segment>();
        // SAFETY: per the contract the segment is ours alone; its header is mapped.
        unsafe { (*s).next = self.unmapping };
        self.unmapping = s;
    }

    /// Records a segment mapped by `map_segment` and its usable slices as one free
    /// span. False (the segment queued for unmapping) when the chunk map cannot name it.
    fn add_segment(&mut self, base: *mut u8) -> bool {
        let seg = base as usize;
        let s = seg as *mut Segment;
        // Every slice maps to record 0 (all zero: no block in it) until a span or page
        // names it: metadata slices for good, the rest for a stray pointer into memory
        // never handed out, which `page_in` must resolve to a record (a zero entry would
        // be no address at all). Written before the chunk map names the segment, which
        // is when a free of such a pointer starts reading them.
        // SAFETY: fresh mapping of a whole segment.
        unsafe { set_heads(seg, 0..SLICES, page_at(seg, 0)) };
        if !chunk_map::set_kind(seg, KIND_SEGMENT) {
            // SAFETY: our fresh mapping, not added.
            unsafe { self.queue_unmap(base) };
            return false;
        }
        UNWRITTEN_RECORD_BYTES.fetch_add(RECORD_PAGES * OS_PAGE_SIZE, Ordering::Relaxed);
        // SAFETY: fresh zeroed mapping of a whole segment.
        unsafe {
            (*s).used_slices = 0;
            list::push_front(&mut self.segments, s);
            let slices = SLICES - FIRST_SLICE;
            self.insert_free(seg, FIRST_SLICE, slices, 0, NEVER_USED, slices);
        }
        self.segment_count += 1;
        SEGMENT_BYTES.fetch_add(SEGMENT_SIZE, Ordering::Relaxed);
        true
    }

    /// Gives a span back (unused since `idle_since`, ms: usually now), merging it with
    /// free neighbours; may release its segment (when nothing of it is in use or
    /// resident). The caller runs `purge_as_due` once its batch is in.
    ///
    /// # Safety
    /// `page` heads an allocated span that nothing uses any more.
    unsafe fn release_span(&mut self, page: *mut Page, idle_since: u64) {
        let seg = segment_base(page as usize);
        // SAFETY: per the contract; neighbours are span heads in the same segment.
        unsafe {
            let mut start = (*page).slice_index();
            let mut count = (*page).slice_count as usize;
            // Slices of a free span may still map to this record: make sure no pointer
            // into them passes as a block from now on.
            (*page).carved.store(0, Ordering::Relaxed);
            (*page).div_magic = 0;
            (*page).block_origin = 1;
            (*(seg as *mut Segment)).used_slices -= count;
            // The page itself may be resident throughout; free neighbours bring their
            // own dirty counts (clean neighbours stay clean). The merged span counts as
            // freed when its newest part was: its purge waits for that part.
            let mut stamp = idle_since;
            let mut dirty = if (*page).flags & FLAG_PURGING != 0 {
                0
            } else {
                count
            };
            // Only a free right neighbour brings a fresh tail: the page's own memory
            // (and a left neighbour's tail, now inside the span) may have been used.
            let mut fresh = 0;
            let end = start + count;
            if end < SLICES {
                let right = page_at(seg, end);
                if (*right).flags & FLAG_FREE_SPAN != 0 {
                    count += (*right).slice_count as usize;
                    fresh = fresh_tail(right);
                    stamp = stamp.max(freed_at(right));
                    dirty += self.remove_free(right);
                }
            }
            if start > FIRST_SLICE {
                let left = head_page_acquire(seg, start - 1);
                if (*left).flags & FLAG_FREE_SPAN != 0 {
                    start = (*left).slice_index();
                    count += (*left).slice_count as usize;
                    stamp = stamp.max(freed_at(left));
                    dirty += self.remove_free(left);
                }
            }
            if (*(seg as *mut Segment)).used_slices == 0 && self.segment_count > 1 && dirty == 0 {
                // Nothing else is left in the segment, and none of it is resident: the
                // merged span is all of its slices, and unmapping releases them with
                // the metadata. An empty segment that may be resident stays a free
                // span until a purge decommits it (then it comes back here clean):
                // unmapping it at once would make the next threads fault in a fresh
                // one, which is the purge-and-refault churn the purge delay and the
                // exit keep exist to avoid.
                let metadata = metadata_committed(seg);
                RELEASED_TOTAL.fetch_add(metadata + (dirty << SLICE_SHIFT), Ordering::Relaxed);
                self.release_segment(seg);
                return;
            }
            self.insert_free(seg, start, count, dirty, stamp, fresh);
        }
    }

    /// Lists `request` as between its two visits and has this visit map its segment.
    fn request_segment(&mut self, request: *mut SegmentRequest) {
        // SAFETY: the request is alive and listed nowhere (its thread made it for this
        // visit).
        unsafe { (*request).next = self.requests };
        self.requests = request;
        self.request_now = request;
    }

    /// Takes `request` off the list of requests between their two visits.
    fn unlist_request(&mut self, request: *const SegmentRequest) {
        // SAFETY: the requests on the list are alive: each is taken off (here, under the
        // lock) before the function that owns it returns.
        unsafe { unlist(&mut self.requests, request) };
    }

    /// In a `fork` child: adds the segments the parent's other threads had mapped for
    /// their requests but not added yet. Without it the child would hold them mapped
    /// and unreferenced (4 MiB of address space each).
    ///
    /// # Safety
    /// Only in the child, whose one thread is not between the two visits of a request:
    /// the listed requests are the copies, in the child's memory, of the stacks of
    /// threads it does not have.
    unsafe fn add_requested_segments(&mut self) {
        let mut request = core::mem::replace(&mut self.requests, ptr::null_mut());
        while !request.is_null() {
            // SAFETY: per the contract; a mapped base is a fresh segment nobody added.
            unsafe {
                if !(*request).base.is_null() {
                    self.add_segment((*request).base);
                }
                request = (*request).next;
            }
        }
    }

    /// Takes `batch` off the list of batches between their two visits.
    fn unlist_purging(&mut self, batch: *const PurgeBatch) {
        // SAFETY: the batches on the list are alive: each is taken off (here, under the
        // lock) before the function that owns it returns.
        unsafe { unlist(&mut self.purging, batch) };
    }

    /// In a `fork` child: puts the spans that the parent's other threads had taken off
    /// the bins to purge back on them, counted dirty (whether the parent decommitted
    /// them before the fork is unknown). Without it they would be lost to the child.
    ///
    /// # Safety
    /// Only in the child, whose one thread is not between the two visits of a purge: the
    /// listed batches are the copies, in the child's memory, of the stacks of threads it
    /// does not have, and their spans are ours and unused.
    unsafe fn reclaim_purging(&mut self, now: u64) {
        let mut b = core::mem::replace(&mut self.purging, ptr::null_mut());
        while !b.is_null() {
            // SAFETY: per the contract.
            unsafe {
                for &(span, _) in (*b).taken() {
                    (*span).flags = 0;
                    self.release_span(span, now);
                }
                b = (*b).next;
            }
        }
    }

    /// # Safety
    /// The segment holds no pages and its free span is off the bins.
    unsafe fn release_segment(&mut self, seg: usize) {
        let s = seg as *mut Segment;
        // SAFETY: per the contract; the segment is on our list.
        unsafe {
            forget_records(seg);
            list::remove(&mut self.segments, s);
            chunk_map::set_kind(seg, KIND_NONE);
            self.queue_unmap(s.cast());
        }
        self.segment_count -= 1;
        SEGMENT_BYTES.fetch_sub(SEGMENT_SIZE, Ordering::Relaxed);
    }

    /// Runs the purge passes that are due at `now` (ms): free spans unused for the
    /// purge delay, at most one pass per delay; and, whatever their age, enough free
    /// spans to bring resident free memory from above `PURGE_HARD` down to half of it.
    fn purge_as_due(&mut self, now: u64, batch: &mut PurgeBatch) {
        let due = PURGE_AT.load(Ordering::Relaxed);
        let expired = due != 0 && now >= due;
        let hard = self.purge_hard_limit(now);
        let over = self.dirty_bytes > hard;
        if !expired && !over {
            return;
        }
        self.relax_purge_delay(now);
        // Past the delay, free spans smaller than `DELAYED_PURGE_MIN_SLICES` stay: a gap
        // between pages in use is likely filled again soon, and such gaps made more than
        // half of a Rust program's purges for 6% of the bytes (350 of 644 madvise calls,
        // 10 of 170 MB). The hard limit below, thread exits and `lg_trim` take them too.
        let smallest = bin_of(DELAYED_PURGE_MIN_SLICES);
        self.purge(now.saturating_sub(self.purge_delay), 0, smallest, batch);
        if self.dirty_bytes > hard {
            self.purge(u64::MAX, hard / 2, 0, batch);
        }
        // The spans left are younger than the delay: look again one delay from now.
        let next = if self.dirty_bytes > 0 {
            now + self.purge_delay
        } else {
            0
        };
        PURGE_AT.store(next, Ordering::Relaxed);
    }

    /// Free memory that may be resident beyond which young spans are purged too
    /// (`PURGE_HARD`): at least twice what a thread exit keeps, so the hard purge does
    /// not decommit at once what the exits keep for the next threads.
    fn purge_hard_limit(&self, now: u64) -> usize {
        PURGE_HARD
            .max(SEGMENT_BYTES.load(Ordering::Relaxed) / 8)
            .max(self.exit_keep(now).saturating_mul(2))
    }

    /// Free memory a thread exit leaves resident: `EXIT_KEEP_DIRTY`, plus what the
    /// program has recently been taking back after exits decommitted memory.
    ///
    /// Why: a program whose threads come and go in rounds (each round's threads take
    /// pages, hand their objects on and exit: mimalloc's test-stress, a server's
    /// per-request threads) would otherwise decommit at each exit what the next round
    /// faults right back in (test-stress: 1.8 GB decommitted and ~460,000 page faults
    /// in 10 rounds of 32 threads). The demand is learned from the program itself:
    /// each exit's purge records what it decommitted, later takes of memory match
    /// against that, and the next exit adds what was matched to the demand it had
    /// (what the exits kept was not enough by that much). A lone thread that frees a
    /// peak and exits has had nothing decommitted before it that it took back, so it
    /// keeps `EXIT_KEEP_DIRTY` only. The demand is halved per
    /// `EXIT_DEMAND_HALF_LIFE_MS` and forgotten by `lg_trim`; it is bounded by the
    /// segments' memory only, because what an exit keeps still ages like any free
    /// memory: the purge delay decommits it once nobody reused it. (Bounded by half
    /// the segments' memory, it fell short of one round of mimalloc's test-stress,
    /// whose exits then decommitted 3.7 GB over 50 rounds, all faulted back in.)
    fn exit_keep(&self, now: u64) -> usize {
        let halvings = now.saturating_sub(self.exit_demand_at) / EXIT_DEMAND_HALF_LIFE_MS;
        let demand = self.exit_demand.checked_shr(halvings as u32).unwrap_or(0);
        let bound = SEGMENT_BYTES.load(Ordering::Relaxed);
        EXIT_KEEP_DIRTY + demand.min(bound)
    }

    /// At a thread exit, before its purge: adds to the learned exit demand what was
    /// taken back since the last exits' purges (`exit_keep`), and forgets decommits old
    /// enough that the learned demand would have faded anyway.
    fn learn_exit_demand(&mut self, now: u64) {
        // What was taken back came on top of what the exits kept: the demand is both.
        if self.exit_retaken > 0 {
            let faded = self.exit_keep(now).saturating_sub(EXIT_KEEP_DIRTY);
            self.exit_demand = faded.saturating_add(self.exit_retaken);
            self.exit_demand_at = now;
        }
        self.exit_retaken = 0;
        if now.saturating_sub(self.exit_purged_at) >= EXIT_DEMAND_HALF_LIFE_MS {
            self.exit_purged = 0;
        }
    }

    /// Forgets the learned exit demand and purge delay (`lg_trim`: everything goes
    /// back).
    fn forget_exit_demand(&mut self) {
        self.exit_purged = 0;
        self.exit_retaken = 0;
        self.exit_demand = 0;
        self.purge_delay = PURGE_DELAY_MS;
        self.premature_purge_bytes = 0;
    }

    /// `bytes` of a free span with no resident slice were taken; `stamp` is when the
    /// span was last given back (for a purged span: when its purge finished). Taken
    /// within one purge delay of that, the purge came too early for this program: it
    /// faults back in what was just decommitted (a program that builds and drops large
    /// maps every few hundred milliseconds). Once `PREMATURE_PURGE_BYTES` were taken
    /// back so, the delay doubles, up to `PURGE_DELAY_MAX_MS` (`relax_purge_delay`
    /// brings it back down).
    fn note_purged_memory_taken(&mut self, stamp: u64, bytes: usize) {
        let now = os::now_ms();
        if now.saturating_sub(stamp) >= self.purge_delay {
            return;
        }
        self.premature_purge_at = now;
        self.premature_purge_bytes += bytes;
        if self.premature_purge_bytes >= PREMATURE_PURGE_BYTES {
            self.purge_delay = (self.purge_delay * 2).min(PURGE_DELAY_MAX_MS);
            self.premature_purge_bytes = 0;
        }
    }

    /// Halves a lengthened purge delay once a `PURGE_DELAY_MAX_MS` has passed with no
    /// purged memory taken back early, so a program whose churn stopped soon gives back
    /// what it frees as promptly as at start.
    fn relax_purge_delay(&mut self, now: u64) {
        if self.purge_delay > PURGE_DELAY_MS
            && now.saturating_sub(self.premature_purge_at) >= PURGE_DELAY_MAX_MS
        {
            self.purge_delay = (self.purge_delay / 2).max(PURGE_DELAY_MS);
            self.premature_purge_at = now;
            self.premature_purge_bytes = 0;
        }
    }

    /// Takes free spans that may hold resident slices and were last freed before
    /// `freed_before` (ms; `u64::MAX` for any) off the bins into `batch`, until at most
    /// `keep` dirty bytes are left or the batch is full, from bin `first_bin` up (smaller
    /// spans stay); the caller decommits them after the lock is released
    /// (`with_region_purging`). Clean spans are left alone. Large spans go first: the
    /// fewest calls for the bytes a partial pass (`keep > 0`) must release.
    fn purge(&mut self, freed_before: u64, keep: usize, first_bin: usize, batch: &mut PurgeBatch) {
        for bin in (first_bin..SPAN_BINS).rev() {
            let mut p = self.bins[bin];
            while !p.is_null() && self.dirty_bytes > keep && batch.len < PURGE_BATCH {
                // SAFETY: bin entries are free spans we own; the region lock is held.
                unsafe {
                    let next = (*p).next;
                    let count = (*p).slice_count as usize;
                    if dirty_slices(p).min(count) > 0 && freed_at(p) < freed_before {
                        let dirty = self.remove_free(p);
                        (*p).flags = FLAG_PURGING;
                        (*(segment_base(p as usize) as *mut Segment)).used_slices += count;
                        batch.spans[batch.len] = (p, dirty);
                        batch.len += 1;
                    }
                    p = next;
                }
            }
        }
    }

    /// Frees the empty pages among up to `budget` abandoned ones: those whose blocks all
    /// came back from other threads, as their remote lists' counts say
    /// (`page::drop_remote_if_all_freed`, which touches no block). With `walk`, the
    /// remote lists of the others are collected too (walked, under the lock: `lg_trim`
    /// only, which must find every empty page, also where a count cannot be trusted).
    fn sweep_abandoned(&mut self, mut budget: usize, now: u64, walk: bool) {
        let mut scanned_classes = 0;
        while budget > 0 && self.abandoned_count > 0 && scanned_classes < MAX_CLASSES {
            let class = self.sweep_class;
            let mut p = self.abandoned[class];
            while !p.is_null() && budget > 0 {
                budget -= 1;
                // SAFETY: abandoned pages have no owner; the region lock makes us the
                // only thread that may touch their owner-side fields.
                unsafe {
                    let next = (*p).next;
                    if !page::drop_remote_if_all_freed(p) && walk {
                        page::collect_remote(p);
                    }
                    if (*p).used() == 0 {
                        list::remove(&mut self.abandoned[class], p);
                        self.count_abandoned(class, false);
                        (*p).flags = 0;
                        self.release_span(p, now);
                    }
                    p = next;
                }
            }
            if budget > 0 || p.is_null() {
                self.sweep_class = (class + 1) % MAX_CLASSES;
                scanned_classes += 1;
            }
        }
    }

    /// Collects remote frees on every abandoned page (empty ones are left for the sweep).
    fn collect_abandoned(&mut self) {
        for &head in self.abandoned.iter() {
            let mut p = head;
            while !p.is_null() {
                // SAFETY: abandoned pages have no owner; the region lock makes us the
                // only thread that may touch their owner-side fields.
                unsafe {
                    page::collect_remote(p);
                    p = (*p).next;
                }
            }
        }
    }

    /// [`reclaim_page`] with the lock held.
    ///
    /// # Safety
    /// `page` is a live page record (the caller holds a live block of it).
    unsafe fn reclaim(&mut self, owner: *mut Owner, page: *mut Page) -> bool {
        // SAFETY: per the contract; the page is region property while abandoned.
        unsafe {
            if (*page).flags & FLAG_ABANDONED == 0 {
                return false;
            }
            self.unpark_abandoned(page);
            (*page).owner.store(owner, Ordering::Release);
        }
        true
    }

    /// Takes `page` off its class's abandoned list: the page is no longer abandoned.
    /// The caller then gives it an owner, with its remote list as it stands (taken whole
    /// once the owner's own list runs out), or releases its span when it is empty.
    ///
    /// # Safety
    /// `page` is on its class's abandoned list (`FLAG_ABANDONED` set).
    unsafe fn unpark_abandoned(&mut self, page: *mut Page) {
        // SAFETY: per the contract; abandoned pages are region property while the lock
        // is held, which `&mut self` stands for.
        unsafe {
            let class = (*page).class as usize;
            if let Some(list) = self.abandoned.get_mut(class) {
                list::remove(list, page);
                self.count_abandoned(class, false);
            }
            (*page).flags = 0;
        }
    }

    /// Keeps the abandoned-page counts (total and the per-class copy heaps read
    /// without the lock) as a page of `class` joins or leaves its list.
    fn count_abandoned(&mut self, class: usize, joined: bool) {
        let Some(n) = ABANDONED_IN_CLASS.get(class) else {
            return;
        };
        let now = n.load(Ordering::Relaxed);
        if joined {
            self.abandoned_count += 1;
            n.store(now + 1, Ordering::Relaxed);
        } else {
            self.abandoned_count -= 1;
            n.store(now.saturating_sub(1), Ordering::Relaxed);
        }
    }

    /// Parks `page`, which still has live blocks, on its class's abandoned list.
    ///
    /// # Safety
    /// As for [`abandon_pages`].
    unsafe fn park_abandoned(&mut self, page: *mut Page) {
        // SAFETY: per the contract; the page becomes region property.
        unsafe {
            (*page).flags = FLAG_ABANDONED;
            (*page).owner.store(ptr::null_mut(), Ordering::Release);
            let class = (*page).class as usize;
            if let Some(list) = self.abandoned.get_mut(class) {
                list::push_front(list, page);
                self.count_abandoned(class, true);
            }
        }
    }

    /// Gives back every page on the plain list `pages` (linked through `next`), unused
    /// since `idle_since` (ms).
    ///
    /// # Safety
    /// As for [`free_pages`].
    unsafe fn release_list(&mut self, mut pages: *mut Page, idle_since: u64) {
        while !pages.is_null() {
            // SAFETY: per the contract each page on the list is ours to give back.
            unsafe {
                let next = (*pages).next;
                (*pages).owner.store(ptr::null_mut(), Ordering::Release);
                self.release_span(pages, idle_since);
                pages = next;
            }
        }
    }
}

/// Maps a segment-aligned segment for `RegionInner::add_segment` (without the lock).
/// Null, reported, when the OS has no memory left.
fn map_segment() -> *mut u8 {
    let base = segment_space::claim(PAGES_OFFSET);
    if !base.is_null() {
        return base;
    }
    let base = os::map_aligned(SEGMENT_SIZE, SEGMENT_SIZE);
    if base.is_null() {
        crate::diag::report_os_failure(SEGMENT_SIZE);
    }
    base
}

/// Gives a segment `map_segment` made back: its slot of the segment space, or its own
/// mapping.
///
/// # Safety
/// Nothing uses the segment any more, and it is off the chunk map.
unsafe fn unmap_segment(base: *mut u8) {
    // SAFETY: per the contract.
    unsafe {
        if !segment_space::give_back(base) {
            os::unmap(base, SEGMENT_SIZE);
        }
    }
}

/// A fresh page of `slices` slices for `class`, owned by the thread `owner`, aligned for
/// its block size. Null when the OS has no memory left. `give_back` is a plain list
/// (through `next`, possibly null) of empty pages the heap returns in the same visit;
/// up to `extra` more spans of the same size and alignment are taken in the same visit
/// (next to the page where there is room) and put on the plain list `extras` (not set
/// up as pages: the heap keeps them as spares). With `tail`, the page is taken with
/// `tail` more slices after it, which go on `extras` as one spare span
/// ([`split_spare`]): the run a heap cuts the next pages of its young classes from
/// without coming back.
///
/// With `populate` (the heap will carve these pages soon), the parts of the batch never
/// used since their segment was mapped are backed with memory after the lock is
/// released, one system call per run of adjacent spans of at least `POPULATE_MIN`
/// bytes, instead of one page fault per 4 KiB as blocks are carved. Memory that may be
/// resident is never populated: on resident pages the call costs nearly what the faults
/// would (measured here: 4.3 against 5.0 us per 4 KiB page, 3.6 on fresh memory). Nor
/// is memory a purge decommitted: populating it again would add a second system call to
/// every purge-and-reuse cycle, and the purges already make most of a program's
/// `madvise` calls (issue 14 caps them at 500 for its Rust workload).
///
/// Also says whether the page's memory reads as zero (never used since its segment was
/// mapped, populated or not), and records the same of each extra span
/// (`page::mark_span_zeroed`), so `calloc` can skip clearing blocks carved from them.
/// Memory a purge decommitted is not counted as zero: a decommit leaves the OS pages a
/// span shares with its neighbours at its ends (slices are 1 KiB) as they were.
///
/// # Safety
/// The pages on `give_back` are as for [`free_pages`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn alloc_page(
    owner: *mut Owner,
    class: usize,
    block_size: usize,
    slices: usize,
    give_back: *mut Page,
    extra: usize,
    extras: &mut *mut Page,
    populate: bool,
    tail: usize,
) -> (*mut Page, bool) {
    let align = span_alignment(block_size);
    let now = os::now_ms();
    let mut give_back = give_back;
    // When the region has no room, a segment is mapped with the lock released (the
    // system calls made every thread wanting a page wait) and added in a second visit,
    // which takes the page from it: nobody can take its room in between.
    let mut request = SegmentRequest {
        base: ptr::null_mut(),
        next: ptr::null_mut(),
    };
    let request: *mut SegmentRequest = &mut request;
    let mut mapped: *mut u8 = ptr::null_mut();
    let (page, zeroed, runs) = loop {
        let (taken, _) = with_region_purging(|r, batch| {
            // SAFETY: per the contract; the list goes back in the first visit only.
            unsafe { r.release_list(give_back, now) };
            let mut take = |r: &mut RegionInner| {
                r.take_batch(slices + tail, slices, align, extra, extras, populate)
            };
            let mut taken = take(r);
            if taken.0.is_null() && mapped.is_null() {
                // The first visit sweeps the abandoned pages before asking for a segment.
                r.sweep_abandoned(usize::MAX, now, false);
                taken = take(r);
                if taken.0.is_null() {
                    r.request_segment(request);
                }
            } else if !mapped.is_null() {
                r.unlist_request(request);
                if taken.0.is_null() {
                    if r.add_segment(mapped) {
                        taken = take(r);
                    }
                } else {
                    // Another thread added room while ours was mapped: it goes back
                    // unused (adding it too spread 500 starting threads over many
                    // segments, 11 KiB per idle thread instead of 6).
                    // SAFETY: our fresh mapping, not added.
                    unsafe { r.queue_unmap(mapped) };
                }
            }
            r.purge_as_due(now, batch);
            taken
        });
        give_back = ptr::null_mut();
        if !taken.0.is_null() || !mapped.is_null() {
            break taken;
        }
        // SAFETY: the visit just made listed the request and mapped its segment.
        mapped = unsafe { (*request).base };
        if mapped.is_null() {
            with_region(|r| r.unlist_request(request));
            break (ptr::null_mut(), false, FreshRuns::default());
        }
    };
    for &(start, bytes) in runs.runs.get(..runs.len).unwrap_or(&[]) {
        if bytes >= POPULATE_MIN {
            // SAFETY: the spans of the run are ours (taken above), mapped read-write.
            unsafe { os::populate(start as *mut u8, bytes) };
        }
    }
    if !page.is_null() {
        // SAFETY: the span is ours now; nobody else references its record.
        unsafe {
            if tail > 0 {
                page::mark_span_zeroed(page, zeroed);
                page::mark_span_run(page);
                let rest = split_spare(page, slices);
                if !rest.is_null() {
                    list::push_front(extras, rest);
                }
            }
            page::init_page(page, owner, class);
        }
    }
    (page, zeroed && !page.is_null())
}

/// Cuts a span the calling heap holds as a spare (taken from the region, not set up as
/// a page) in two without the region lock: `span` keeps its first `count` slices, the
/// rest becomes a spare span of its own, which is returned (null when nothing is left
/// over). The rest inherits whether its memory reads as zero and whether it is a run
/// (`page::mark_span_run`).
///
/// Why without the lock: a heap takes a run of slices from the region in one visit and
/// cuts the pages of its young classes from it, instead of visiting the region for each
/// (a thread starting up grows dozens of classes through several page sizes each).
///
/// Who else looks, and why that is safe: the region reads a neighbour's record to merge
/// free spans, through the last slice's map entry (`release_span`) or at the first
/// slice (`take_after`), and only follows `slice_count` when the record says
/// `FLAG_FREE_SPAN`; the statistics walk (`for_each_page`) steps over pages by their
/// map entries, not their counts. So the new record is written in full before the map
/// entries name it (release stores), and neither record ever says free span.
///
/// # Safety
/// `span` is a spare span of the calling thread's heap (on no list the region sees)
/// with more than `count` slices, and `count > 0`.
pub unsafe fn split_spare(span: *mut Page, count: usize) -> *mut Page {
    let seg = segment_base(span as usize);
    // SAFETY: per the contract the span and all records of its slices are the caller's.
    unsafe {
        let (idx, len) = ((*span).slice_index(), (*span).slice_count as usize);
        if len <= count {
            return ptr::null_mut();
        }
        let start = idx + count;
        let rest = page_at(seg, start);
        note_record_written(seg, rest);
        // An interior record may hold anything from an earlier life: write every field.
        (*rest).flags = 0;
        (*rest).used = 0;
        (*rest).class = 0;
        (*rest).free = (*span).free;
        (*rest).start_offset = (start << SLICE_SHIFT) as u32;
        (*rest).slice_count = (len - count) as u16;
        (*rest).carved.store(0, Ordering::Relaxed);
        (*rest).div_magic = 0;
        (*rest).block_origin = 1;
        (*rest).owner.store(ptr::null_mut(), Ordering::Relaxed);
        (*rest).remote_free.store(0, Ordering::Relaxed);
        (*rest).next = ptr::null_mut();
        (*rest).prev = ptr::null_mut();
        set_heads(seg, start..idx + len, rest);
        (*span).slice_count = count as u16;
        rest
    }
}

/// Smallest run of fresh pages worth a `populate` call: it replaces 32 or more page
/// faults (one per 4 KiB), and each call counts against the system calls a program
/// makes (issue 14 caps `madvise` calls).
const POPULATE_MIN: usize = 128 << 10;
/// Runs of adjacent fresh spans one visit collects for `populate`.
const POPULATE_RUNS: usize = 4;

/// Runs of adjacent spans (start address, bytes) taken fresh in one region visit.
#[derive(Default)]
struct FreshRuns {
    runs: [(usize, usize); POPULATE_RUNS],
    len: usize,
}

impl FreshRuns {
    /// Adds `span`'s memory: to the run it extends (either end), or as a new run while
    /// there is room (a span that fits in no run is left to fault in).
    fn add(&mut self, span: *mut Page) {
        // SAFETY: the caller took `span` off the bins; its record is ours.
        let (start, bytes) = unsafe { ((*span).start() as usize, (*span).bytes()) };
        let len = self.len;
        for run in self.runs.iter_mut().take(len) {
            if run.0 + run.1 == start {
                run.1 += bytes;
                return;
            }
            if start + bytes == run.0 {
                *run = (start, run.1 + bytes);
                return;
            }
        }
        if let Some(run) = self.runs.get_mut(len) {
            *run = (start, bytes);
            self.len += 1;
        }
    }
}

/// Gives empty pages back to the region, in one visit.
///
/// # Safety
/// `pages` is a plain list (through `next`, possibly null) of pages of the caller with
/// no block in use, which no thread will touch again.
pub unsafe fn free_pages(pages: *mut Page) {
    // SAFETY: per the contract.
    unsafe { free_pages_idle_since(pages, u64::MAX) };
}

/// Gives empty pages back to the region, in one visit, as unused since `idle_since`
/// (ms; now when later, so `u64::MAX` is now): a heap's kept page that has lain empty
/// for a while is purged that much sooner, and its free neighbours no later than they
/// would have been.
///
/// # Safety
/// As for [`free_pages`].
pub unsafe fn free_pages_idle_since(pages: *mut Page, idle_since: u64) {
    if pages.is_null() {
        return;
    }
    let now = os::now_ms();
    with_region_purging(|r, batch| {
        // SAFETY: per the contract.
        unsafe { r.release_list(pages, idle_since.min(now)) };
        r.purge_as_due(now, batch);
    });
}

/// At thread exit, in one visit: gives back the empty pages on `empty` (as for
/// [`free_pages`]), parks those on `live` (which still have blocks in use) for
/// adoption, and sweeps a few abandoned pages, so exited threads' memory comes back
/// even if nobody allocates their classes again; then decommits at once all free
/// memory beyond `EXIT_KEEP_DIRTY` (the madvise calls after the lock is released).
///
/// # Safety
/// As for [`free_pages`]; the caller owned the pages on `live`, took them off its lists
/// and made sure no notification about them is in flight.
pub unsafe fn abandon_pages(empty: *mut Page, mut live: *mut Page) {
    let now = os::now_ms();
    with_region_purging(|r, batch| {
        // SAFETY: per the contract.
        unsafe {
            r.release_list(empty, now);
            while !live.is_null() {
                let next = (*live).next;
                r.park_abandoned(live);
                live = next;
            }
        }
        r.sweep_abandoned(EXIT_SWEEP_PAGES, now, false);
        // Thread exit gives memory back at once, so short-lived threads do not pile up
        // resident free memory: beyond a little, what is free (the exiting thread's
        // pages, the exited threads' pages the sweep found empty, anything else) is
        // decommitted now, whatever its age, largest spans first. The little left is
        // what the next threads reuse without refaulting (see `exit_keep`).
        r.learn_exit_demand(now);
        let before = r.dirty_bytes;
        r.purge(u64::MAX, r.exit_keep(now), 0, batch);
        let purged = before.saturating_sub(r.dirty_bytes);
        if purged > 0 {
            r.exit_purged = r.exit_purged.saturating_add(purged);
            r.exit_purged_at = now;
        }
        r.purge_as_due(now, batch);
    });
}

/// Hands up to `max` abandoned pages of `class` to the thread `owner`, as a plain list
/// through `next`, freeing abandoned pages of that class that turned out empty on the
/// way. Null when no page of `class` is left (found without the lock when the class has
/// none). Pages of other classes are left where they are: a thread that frees into them
/// takes them over when it needs a page of their class ([`reclaim_page`]), and
/// handing them to whoever allocates first gave one thread's pages to another while
/// the first thread's successor was still freeing into them (larson's chains).
pub fn adopt_pages(owner: *mut Owner, class: usize, max: usize) -> *mut Page {
    if ABANDONED_IN_CLASS
        .get(class)
        .is_none_or(|n| n.load(Ordering::Relaxed) == 0)
    {
        return ptr::null_mut();
    }
    let now = os::now_ms();
    with_region_purging(|r, batch| {
        let mut adopted = ptr::null_mut();
        let mut taken = 0;
        while taken < max {
            let Some(list) = r.abandoned.get_mut(class) else {
                break;
            };
            let p = *list;
            if p.is_null() {
                break;
            }
            // SAFETY: `p` heads `class`'s abandoned list; abandoned pages are region
            // property while the lock is held.
            unsafe {
                r.unpark_abandoned(p);
                if page::drop_remote_if_all_freed(p) {
                    r.release_span(p, now);
                    continue;
                }
                (*p).owner.store(owner, Ordering::Release);
                list::push_front(&mut adopted, p);
            }
            taken += 1;
        }
        r.purge_as_due(now, batch);
        adopted
    })
    .0
}

/// Gives `page` to the thread `owner` if the page is abandoned and the region lock is
/// free: a thread freeing into an exited thread's page takes the page over, since it
/// usually holds (and frees) the page's other blocks too, as a successor does, and
/// from then on its frees there are local and its allocations reuse the page's blocks.
/// False when the page is not abandoned (any more) or the lock is held: the caller
/// frees remotely, as before, and a wait for the lock never lands on a free.
///
/// # Safety
/// `page` is a live page record (the caller holds a live block of it).
pub unsafe fn reclaim_page(owner: *mut Owner, page: *mut Page) -> bool {
    // SAFETY: per the contract; abandoned pages are region property while the lock is
    // held, and `flags` is written only with the lock held, so the test reads a settled
    // value.
    REGION
        .try_with(|r| unsafe { r.reclaim(owner, page) })
        .unwrap_or(false)
}

/// Runs a purge pass if one is due (free memory has waited out the purge delay). Costs
/// one atomic load when none is, so heap slow paths call it freely.
pub fn purge_if_due() {
    let due = PURGE_AT.load(Ordering::Relaxed);
    if due == 0 {
        return;
    }
    let now = os::now_ms();
    if now >= due {
        with_region_purging(|r, batch| r.purge_as_due(now, batch));
    }
}

/// Returns what can be returned: sweeps abandoned pages and decommits all free memory
/// at once, whatever its age. What it releases shows in [`released_total`].
pub fn trim() {
    let now = os::now_ms();
    let (mut full, _) = with_region_purging(|r, batch| {
        r.sweep_abandoned(usize::MAX, now, true);
        r.forget_exit_demand();
        r.purge(u64::MAX, 0, 0, batch);
        PURGE_AT.store(0, Ordering::Relaxed);
        batch.len == PURGE_BATCH
    });
    // A full batch may have left dirty spans behind: take the next ones.
    while full {
        full = with_region_purging(|r, batch| {
            r.purge(u64::MAX, 0, 0, batch);
            batch.len == PURGE_BATCH
        })
        .0;
    }
}

/// Bytes released so far by purges (see `with_region_purging`) and by unmapping empty
/// segments: `lg_trim` reports the difference across its work, which includes what its
/// heap's returned spare pages set off (and, rarely, another thread's meanwhile).
pub fn released_total() -> usize {
    RELEASED_TOTAL.load(Ordering::Relaxed)
}

/// Bytes of segment memory that may be resident (mapped minus known-clean free spans).
pub fn committed_bytes() -> usize {
    SEGMENT_BYTES
        .load(Ordering::Relaxed)
        .saturating_sub(CLEAN_FREE_BYTES.load(Ordering::Relaxed))
        .saturating_sub(UNWRITTEN_RECORD_BYTES.load(Ordering::Relaxed))
}

/// Visits every allocated page's record (statistics), with the region lock held. The
/// records are passed as raw pointers: their owners write them meanwhile, so no
/// reference may cover them (see `page::stats_snapshot`).
///
/// First, in the same visit, the blocks other threads freed on abandoned pages are
/// collected: their owner exited, so nothing else would until the page is adopted or
/// swept, and statistics would count them as live for as long as that takes (a whole
/// round of a program whose threads free what exited threads allocated), unlike the
/// blocks freed in every other way, counted when freed.
pub fn for_each_page(mut f: impl FnMut(*const Page)) {
    with_region(|r| {
        r.collect_abandoned();
        let mut s = r.segments;
        while !s.is_null() {
            let seg = s as usize;
            let mut slice = FIRST_SLICE;
            while slice < SLICES {
                let p = page_at(seg, slice);
                // SAFETY: `slice < SLICES` in a live segment. A free span's record and
                // count change only under the region lock, which is held; a page's
                // count may be changing (its heap cutting a spare, `split_spare`), so a
                // page is stepped over by its map entries, which name its record for
                // every slice it covers. A slice whose entry names another record (a
                // cut in progress) is skipped: the snapshot is racy by nature.
                unsafe {
                    if head_page_acquire(seg, slice) != p {
                        slice += 1;
                        continue;
                    }
                    let flags = (*p).flags;
                    if flags & (FLAG_FREE_SPAN | FLAG_PURGING) != 0 {
                        slice += ((*p).slice_count as usize).max(1);
                        continue;
                    }
                    f(p);
                    slice += 1;
                    while slice < SLICES && head_page(seg, slice) == p {
                        slice += 1;
                    }
                }
            }
            // SAFETY: segment list links are valid under the lock.
            s = unsafe { (*s).next };
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A region of the test's own, on one fresh segment (not the process's region).
    fn region_of_one_segment() -> (RegionInner, *mut u8) {
        let mut r = RegionInner::EMPTY;
        let base = map_segment();
        assert!(!base.is_null());
        assert!(r.add_segment(base));
        (r, base)
    }

    /// Unmaps a test region's segment as the region would once nothing of it is used.
    fn give_back_segment(base: *mut u8) {
        chunk_map::set_kind(base as usize, KIND_NONE);
        // SAFETY: the segment is the test's alone and nothing of it is in use any more.
        unsafe {
            forget_records(base as usize);
            unmap_segment(base);
        }
        SEGMENT_BYTES.fetch_sub(SEGMENT_SIZE, Ordering::Relaxed);
    }

    fn batch_holds(batch: &PurgeBatch, span: *mut Page) -> bool {
        batch.spans[..batch.len].iter().any(|&(p, _)| p == span)
    }

    /// A page given back next to a segment's never-used tail leaves that tail fresh: a
    /// page taken later from inside it says it reads as zero (so `calloc` need not clear
    /// it), and no dirty slice is counted there; a page over the memory that was used
    /// does not say so.
    #[test]
    fn a_page_given_back_leaves_the_fresh_tail_after_it() {
        let (mut r, base) = region_of_one_segment();
        let (a, a_fresh) = r.take_span(16, 1);
        let (b, b_fresh) = r.take_after(a, 16, 1);
        assert!(!a.is_null() && !b.is_null());
        assert!(
            a_fresh && b_fresh,
            "a new segment's first pages are not fresh"
        );
        // SAFETY: `b` was just taken; its memory is ours.
        unsafe {
            ptr::write_bytes((*b).start(), 0xa5, (*b).bytes());
            r.release_span(b, 1_000);
        }
        assert_eq!(r.dirty_bytes, 16 << SLICE_SHIFT);
        // Over `b`'s slices and 16 fresh ones: not zero.
        let (c, c_fresh) = r.take_after(a, 32, 1);
        assert_eq!(c, b);
        assert!(!c_fresh, "a page over used memory says it reads as zero");
        assert_eq!(r.dirty_bytes, 0, "dirty slices counted in the fresh tail");
        let (d, d_fresh) = r.take_after(c, 64, 1);
        assert!(!d.is_null());
        assert!(
            d_fresh,
            "the tail after a page given back lost its freshness"
        );
        // SAFETY: `d` was just taken; its memory is ours.
        let d_bytes = unsafe { core::slice::from_raw_parts((*d).start(), (*d).bytes()) };
        assert!(d_bytes.iter().all(|&x| x == 0));
        // Given back between used memory and the tail, then taken again: still fresh.
        // SAFETY: `d` is ours and unused.
        unsafe { r.release_span(d, 2_000) };
        let (e, e_fresh) = r.take_after(c, 128, 1);
        assert_eq!(e, d);
        assert!(!e_fresh, "a page given back reads as fresh");
        let (f, f_fresh) = r.take_after(e, 16, 1);
        assert!(!f.is_null() && f_fresh);
        give_back_segment(base);
    }

    /// Spans of `counts` slices taken one right after another from `r`'s one segment.
    fn spans_in_a_row<const N: usize>(
        r: &mut RegionInner,
        base: *mut u8,
        counts: [usize; N],
    ) -> [*mut Page; N] {
        let mut spans = [ptr::null_mut(); N];
        let mut last: *mut Page = ptr::null_mut();
        for (span, count) in spans.iter_mut().zip(counts) {
            *span = if last.is_null() {
                r.take_span(count, 1).0
            } else {
                r.take_after(last, count, 1).0
            };
            assert!(!span.is_null());
            assert_eq!(segment_base(*span as usize), base as usize);
            last = *span;
        }
        spans
    }

    /// Past the purge delay, a free span of 64 KiB or more is taken for purging and a
    /// gap of 8 KiB between spans in use stays resident; the unconditional purge of
    /// `lg_trim` and thread exits takes the gap too. A region of its own, on one fresh
    /// segment: A, gap, B, big, C taken one after another, gap and big given back.
    #[test]
    fn the_delayed_purge_leaves_small_gaps_to_trim() {
        let (mut r, base) = region_of_one_segment();
        let [_a, gap, _b, big, _c] = spans_in_a_row(&mut r, base, [16, 8, 16, 128, 16]);
        let freed = 1_000;
        // SAFETY: both spans were just taken, nothing uses them.
        unsafe {
            r.release_span(gap, freed);
            r.release_span(big, freed);
        }
        assert_eq!(r.dirty_bytes, (8 + 128) << SLICE_SHIFT);
        let mut batch = PurgeBatch::new();
        PURGE_AT.store(1, Ordering::Relaxed);
        r.purge_as_due(freed + r.purge_delay + 1, &mut batch);
        assert!(batch_holds(&batch, big), "the 128 KiB span was not purged");
        assert!(!batch_holds(&batch, gap), "the 8 KiB gap was purged");
        assert_eq!(r.dirty_bytes, 8 << SLICE_SHIFT);
        let mut all = PurgeBatch::new();
        r.purge(u64::MAX, 0, 0, &mut all);
        assert!(batch_holds(&all, gap), "lg_trim's purge left the gap");
        assert_eq!(r.dirty_bytes, 0);
        give_back_segment(base);
    }

    /// A span given back as unused since an earlier time (a heap's kept page that lay
    /// empty) keeps that time when it merges with nothing newer, so it is purged that
    /// much sooner; merged with a span freed later, the merged span counts from the
    /// later time (a neighbour is never purged before its own delay has passed).
    #[test]
    fn a_span_idle_since_earlier_merges_with_the_newest_time() {
        let (mut r, base) = region_of_one_segment();
        let [_a, b, c, d, _e] = spans_in_a_row(&mut r, base, [64; 5]);
        // SAFETY: the spans were just taken, nothing uses them; `a`, `c` and `e` stay
        // in use, so `b` and `d` merge with nothing but what is given back next to them.
        unsafe {
            r.release_span(b, 1_000);
            assert_eq!(freed_at(b), 1_000, "a lone span lost its idle time");
            // `d` freed at 5,000, then `c` (idle since 1,000) between `b` and `d`.
            r.release_span(d, 5_000);
            r.release_span(c, 1_000);
            assert_eq!(
                freed_at(b),
                5_000,
                "the merged span is older than its newest part"
            );
        }
        give_back_segment(base);
    }

    /// A `fork` child gets back the spans another thread of the parent had taken off the
    /// bins to purge: free again, counted dirty, and the list of batches empty.
    /// A segment mapped for a request but not yet added when the parent forked (its
    /// thread waits for the lock the fork holds) is added by the child: it is a segment
    /// of the region, named by the chunk map, and its room is taken from.
    #[test]
    fn a_fork_child_adds_segments_mapped_for_requests() {
        let (mut r, base) = region_of_one_segment();
        // As `alloc_page`'s first visit and the work after it leave it, for a thread of
        // the parent.
        let mut request = SegmentRequest {
            base: ptr::null_mut(),
            next: ptr::null_mut(),
        };
        // Through one raw pointer from here on, as `alloc_page` does: a write through
        // `request` itself would invalidate the pointer the region lists (Miri).
        let request: *mut SegmentRequest = &mut request;
        r.request_segment(request);
        r.request_now = ptr::null_mut();
        // SAFETY: the request lives on this stack until the test returns.
        let mapped = unsafe {
            (*request).base = map_segment();
            (*request).base as usize
        };
        assert_ne!(mapped, 0);
        assert_eq!(chunk_map::kind_of(mapped), KIND_NONE);
        // SAFETY: the test's region and thread stand for the child and its one thread.
        unsafe { r.add_requested_segments() };
        assert!(r.requests.is_null(), "the request stayed listed");
        assert_eq!(r.segment_count, 2, "the segment was not added");
        assert_eq!(chunk_map::kind_of(mapped), KIND_SEGMENT);
        // The first segment's room, then the second's.
        let usable = SLICES - FIRST_SLICE;
        let a = r.take_span(usable, 1).0;
        let b = r.take_span(usable, 1).0;
        assert!(!a.is_null() && !b.is_null());
        let mut taken_from = [segment_base(a as usize), segment_base(b as usize)];
        let mut segments = [base as usize, mapped];
        taken_from.sort();
        segments.sort();
        assert_eq!(
            taken_from, segments,
            "the room taken is not the two segments'"
        );
        give_back_segment(base);
        give_back_segment(mapped as *mut u8);
    }

    #[test]
    fn a_fork_child_takes_back_spans_being_purged() {
        let (mut r, base) = region_of_one_segment();
        let a = r.take_span(16, 1).0;
        let big = r.take_after(a, 128, 1).0;
        let c = r.take_after(big, 16, 1).0;
        assert!(!a.is_null() && !big.is_null() && !c.is_null());
        // SAFETY: `big` was just taken; nothing uses it.
        unsafe { r.release_span(big, 1_000) };
        let free_before = r.free_bytes;
        // As `with_region_purging`'s first visit leaves it, for a thread of the parent.
        let mut batch = PurgeBatch::new();
        r.purge(u64::MAX, 0, 0, &mut batch);
        assert!(batch_holds(&batch, big));
        batch.next = r.purging;
        r.purging = &mut batch;
        assert!(
            r.free_bytes < free_before,
            "the purge left the span on the bins"
        );
        // SAFETY: the test's region and thread stand for the child and its one thread.
        unsafe { r.reclaim_purging(2_000) };
        assert!(r.purging.is_null(), "the batch stayed listed");
        assert_eq!(r.free_bytes, free_before, "the span was not given back");
        assert_eq!(
            r.dirty_bytes,
            128 << SLICE_SHIFT,
            "the span was not counted dirty"
        );
        // SAFETY: `big`'s record is the free span's head again.
        assert_ne!(unsafe { (*big).flags } & FLAG_FREE_SPAN, 0);
        assert_eq!(
            r.take_after(a, 128, 1).0,
            big,
            "the span is not on the bins"
        );
        give_back_segment(base);
    }
}
