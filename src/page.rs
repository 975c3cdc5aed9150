//! Pages: a run of slices holding blocks of one size, and their free lists.
//!
//! A page belongs to one thread heap. Its owner allocates from `free` and pushes its own
//! frees back there without atomics; the record names the owner by its thread's id
//! (`owner`), so a free compares the page with the thread it runs on without reading
//! the thread's heap. Other threads push onto `remote_free`, a lock-free stack whose two
//! low bits also carry the page's notification state (blocks are 16-byte aligned, so
//! those bits are free):
//!
//! * `NONE`: remote frees just push.
//! * `WATCH`: the page is full and off the owner's allocation list; the word holds no
//!   list but the watching heap (the owner's), which the next remote freer takes as it
//!   moves the state to `FREEING`; it hands its block to that heap's `delayed_free`
//!   list (so the owner learns the page has room again), then sets `NONE`.
//! * `FREEING`: a remote freer is between those steps; the owner waits for it to finish
//!   before it may give the page away, so the heap a notification reaches is always the
//!   page's owner.
//!
//! Blocks carry no header: the page metadata is found from any block address through
//! the segment (see `segment::page_of`).

use core::ptr;
use core::sync::atomic::{AtomicPtr, AtomicU32, AtomicUsize, Ordering};

use crate::geometry::{SEGMENT_MASK, SEGMENT_SHIFT, SLICE_SHIFT, SLICE_SIZE, segment_base};
use crate::os::OS_PAGE_SIZE;
use crate::size_class;

/// A free block: its first word links to the next free block; the second holds
/// [`freed_mark`] while it is free (and zero once handed out), which is how a second
/// free of the same block is recognised.
#[repr(C)]
pub struct Block {
    pub next: *mut Block,
    pub freed_mark: usize,
}

/// Whether free-list links are stored encoded (the `hardened` feature).
///
/// The scheme: the link in a free block's first word is stored as `next ^ key` (`key`:
/// the per-process secret with its top bit set), on a page's local list and, since the
/// freer knows the key too, on its remote list (and a heap's `delayed_free` list).
/// Before a block is handed out, or a remote link followed, its decoded address must
/// lie in the page's 4 MiB segment
/// ([`is_in_page_segment`]; on the fast path this replaces the null test, since the
/// list's end fails it too). The list head (`Page::free`) is stored in the same link
/// form, so a local free copies it into the freed block's link and a pop copies the
/// popped block's link into it, neither decoding; the fast pop decodes the head and
/// checks the segment with one XOR (`heap::Heap::pop_keys`).
///
/// What a use-after-free write into the first 16 bytes of a freed block `b` can do:
///
/// * First word (the link) := any `x` chosen without the key (a constant, zero, the
///   address of the attacker's memory, of another free or live block): it decodes to
///   `x ^ key`, a random address that lies in the segment with probability about
///   2^-42. The pop after the one that returns `b` (or the owner collecting its remote
///   list) stops the program with `lgmalloc: corrupted free list (use after free?) at
///   <decoded>` before reading or handing out anything there.
/// * Second word (the freed mark, the page record's address, not keyed): hides a later double
///   free of `b`, or makes a free of `b` after it is handed out again report one.
///   It cannot steer allocation.
/// * Not stopped: an attacker who learns the key, e.g. by *reading* a freed block's
///   link and knowing the address it points to (often `b` plus the block size in a
///   freshly carved page), can encode any address in the segment. Hardening stops
///   blind writes, not read-and-write primitives.
///
/// Blocks handed to an owner heap's `delayed_free` list (remote frees to a full,
/// watched page) are linked the same way; that list mixes pages, so `heap`'s drain
/// checks each decoded link against the chunk map and the page's blocks instead.
///
/// Why not a plain link plus a keyed check word (`w1 = next ^ key`, compared on pop)?
/// It needs the key, the link and the check word in both malloc and free: two loads
/// per pair more than this scheme, and it measured slower (docs/RELIABILITY.md,
/// Hardening, has the figures).
pub const HARDENED: bool = cfg!(feature = "hardened");

/// The key links are encoded with: the per-process secret with its top bit set (so a
/// link overwritten with zero never decodes into a segment). Every heap keeps a copy
/// (`heap::Heap::link_key`), which the fast paths read from the heap they already hold
/// instead of loading the secret through the GOT. Zero unless hardened.
#[inline(always)]
pub fn link_key() -> usize {
    if HARDENED {
        crate::secret::get() | 1 << (usize::BITS - 1)
    } else {
        0
    }
}

/// The stored form of `next` as a link of a local or remote free list: `next ^ key`,
/// or `next` itself unless hardened (decoding is the same operation).
#[inline(always)]
pub fn encode_link(key: usize, next: *mut Block) -> *mut Block {
    if HARDENED {
        ((next as usize) ^ key) as *mut Block
    } else {
        next
    }
}

/// The first free block of `page` (null when it has none): `Page::free` decoded.
///
/// # Safety
/// `page` is a live page record (not a free span).
#[inline(always)]
pub unsafe fn free_head<H, R>(page: *const Page<H, R>) -> *mut Block {
    // SAFETY: per the contract.
    encode_link(link_key(), unsafe { (*page).free })
}

/// Makes `b` (null: none) the first free block of `page`; `b`'s link must already hold
/// the rest of the list.
///
/// # Safety
/// The caller has owner access to `page`, a live page record.
#[inline(always)]
pub unsafe fn set_free_head<H, R>(page: *mut Page<H, R>, b: *mut Block) {
    // SAFETY: per the contract.
    unsafe { (*page).free = encode_link(link_key(), b) };
}

/// Hardened builds' check of a block about to be handed out from `page`'s free list:
/// it lies in the page's segment. The list's end (null) fails it too, so on the fast
/// path this one comparison replaces the null test. A use-after-free write of a link
/// (any value chosen without knowing the key) decodes to an address outside the
/// segment, so the allocator never hands out or follows it: [`corrupted_link`] stops
/// the program instead.
#[inline(always)]
pub fn is_in_page_segment<H, R>(page: *const Page<H, R>, block: *mut Block) -> bool {
    ((block as usize) ^ (page as usize)) >> SEGMENT_SHIFT == 0
}

/// Stops the program: a free list led to `block`, which is no block of the page.
#[cold]
#[inline(never)]
pub fn corrupted_link(block: *mut Block) -> ! {
    crate::diag::misuse("corrupted free list (use after free?)", block as usize)
}

/// The mark a free block carries in its second word: the address of its page's record.
/// Ordinary user data never holds the address of allocator metadata, and the free path
/// has the record's address in a register already, so marking and testing cost no
/// arithmetic.
#[inline(always)]
pub fn freed_mark(page: *const Page) -> usize {
    page as usize
}

pub const STATE_NONE: usize = 0;
pub const STATE_WATCH: usize = 1;
pub const STATE_FREEING: usize = 2;
const STATE_MASK: usize = 3;
/// `Page::remote_free` holds, beside the state bits, the first block of the remote list
/// in bits 2..48 (blocks lie in segments, below 2^47) and in the top 16 bits how many
/// blocks the list holds, counted by the pushes themselves, modulo 2^16. Every block on
/// the list is one `used` still counts, so while `used` is below 2^16 the count is
/// exact ([`remote_count`]). So the owner takes a list without walking it when its own
/// list is empty (the remote list becomes the free list as it stands) and tells a page
/// all of whose blocks came back remotely without touching them: walking meant a cache
/// miss per block, blocks another thread had just freed (larson at 16 threads walked
/// 583k links at thread exits, 71% of them on pages that turned out empty).
const REMOTE_COUNT_SHIFT: u32 = 48;
const REMOTE_PTR_MASK: usize = ((1 << REMOTE_COUNT_SHIFT) - 1) & !STATE_MASK;
const REMOTE_COUNT_ONE: usize = 1 << REMOTE_COUNT_SHIFT;

/// The number of blocks on the remote list `word` heads, of a page whose `used` (without
/// [`IN_FULL_FLAG`]) is `used`: the pushes' count, when it cannot have wrapped.
#[inline(always)]
fn remote_count(word: usize, used: u32) -> Option<u32> {
    (used >> (usize::BITS - REMOTE_COUNT_SHIFT) == 0).then_some((word >> REMOTE_COUNT_SHIFT) as u32)
}

/// Set in `Page::used` while the page sits on its heap's full list. The free fast path
/// then needs one signed test after decrementing: a result of at most zero means "now
/// empty" or "on the full list" (a negative count), the two cases that need the slow path.
pub const IN_FULL_FLAG: u32 = 1 << 31;
/// Span flag: this is the head of a free span of slices (not a page).
pub const FLAG_FREE_SPAN: u8 = 2;
/// Span flag: part of the free span's memory may still be resident (not yet
/// decommitted): set exactly when the span's dirty slice count (`Page::used`) is not zero.
pub const FLAG_DIRTY: u8 = 4;
/// Page flag: the owner thread exited; the page waits to be adopted or swept.
pub const FLAG_ABANDONED: u8 = 8;
/// Span flag: a free span taken off the region's bins while its memory is decommitted
/// outside the region lock; it goes back to the bins, clean, right after.
pub const FLAG_PURGING: u8 = 16;

/// The atomic operations the remote-free protocol performs on `Page::remote_free`.
/// Implemented by `AtomicUsize`; the loom models (`rust-tests/loom.rs`) implement it for
/// loom's atomic, so they check these very functions.
pub trait RemoteWord {
    fn load(&self, order: Ordering) -> usize;
    fn fetch_and(&self, val: usize, order: Ordering) -> usize;
    fn compare_exchange(
        &self,
        current: usize,
        new: usize,
        success: Ordering,
        failure: Ordering,
    ) -> Result<usize, usize>;
    fn compare_exchange_weak(
        &self,
        current: usize,
        new: usize,
        success: Ordering,
        failure: Ordering,
    ) -> Result<usize, usize>;
    /// Called in each round of a wait for another thread (a model checker yields here).
    #[inline(always)]
    fn pause(&self) {
        core::hint::spin_loop();
    }
}

impl RemoteWord for AtomicUsize {
    #[inline(always)]
    fn load(&self, order: Ordering) -> usize {
        AtomicUsize::load(self, order)
    }
    #[inline(always)]
    fn fetch_and(&self, val: usize, order: Ordering) -> usize {
        AtomicUsize::fetch_and(self, val, order)
    }
    #[inline(always)]
    fn compare_exchange(
        &self,
        current: usize,
        new: usize,
        success: Ordering,
        failure: Ordering,
    ) -> Result<usize, usize> {
        AtomicUsize::compare_exchange(self, current, new, success, failure)
    }
    #[inline(always)]
    fn compare_exchange_weak(
        &self,
        current: usize,
        new: usize,
        success: Ordering,
        failure: Ordering,
    ) -> Result<usize, usize> {
        AtomicUsize::compare_exchange_weak(self, current, new, success, failure)
    }
}

/// The thread that owns a page, as this layer sees it: the thread's id (`tls::thread_id`,
/// or an id no thread has: see `heap::Heap::owner_id`), an address stored and compared,
/// never dereferenced. Null while the page is abandoned or free.
#[repr(C)]
pub struct Owner {
    _opaque: [u8; 0],
}

/// The heap that watches a full page for its next remote free, as this layer sees it:
/// an address carried in `remote_free` while the page is watched and handed to that
/// freer, never dereferenced here. Aligned to 4 bytes and below 2^48, as a block is.
#[repr(C)]
pub struct Watcher {
    _opaque: [u8; 0],
}

/// Metadata of one page (or of one free span, when `FLAG_FREE_SPAN` is set). Lives in
/// its segment's metadata area, one per slice, 64 bytes so pages of different threads
/// never share a cache line.
///
/// The allocator only uses the default parameters (`Page` is
/// `Page<AtomicPtr<Owner>, AtomicUsize>`); other atomics are for the loom models.
#[repr(C, align(64))]
pub struct Page<H = AtomicPtr<Owner>, R = AtomicUsize> {
    /// Owner-only: the first block ready to hand out, in link form
    /// ([`encode_link`]; plain unless hardened), null's encoding when there is none: a
    /// local free copies it into the freed block's link, a pop copies the popped
    /// block's link back. Read and set it through [`free_head`] and [`set_free_head`]
    /// outside the fast paths. In the head record of a free span: when it was freed.
    /// In a span taken from the region but not set up as a page yet (a heap's spare
    /// page): whether its memory reads as zero ([`mark_span_zeroed`]).
    pub free: *mut Block,
    /// Owner-only: blocks handed out and not yet back on `free` (includes blocks
    /// waiting on `remote_free`), plus [`IN_FULL_FLAG`] while the page is on the full
    /// list. Read it through [`Page::used`] and [`Page::in_full`].
    ///
    /// In the head record of a free span (`FLAG_FREE_SPAN`), written only under the
    /// region lock: how many of the span's slices may be resident (an upper bound, at
    /// most `slice_count`; see `segment::RegionInner::insert_free`).
    pub used: u32,
    /// How far blocks have been carved from the page start, as the free path's
    /// block-start check compares it (see [`is_block_start`]): carved blocks times the
    /// page's divisor excess when `div_magic` is set, carved bytes when it is zero (read
    /// it through [`carved_bytes`]). Zero for free spans, so no pointer into one passes
    /// as a block. Written by the owner (or under the region lock), read by any thread
    /// that frees a block of the page: atomic, accessed `Relaxed` (plain moves on
    /// x86-64). A freer always sees a value at least as large as when its block was
    /// carved, since the block reached it after that.
    pub carved: AtomicU32,
    /// Offset of the page (or span) start from its segment base.
    pub start_offset: u32,
    pub class: u8,
    pub flags: u8,
    /// Slices the page (or span) covers.
    pub slice_count: u16,
    /// The block-start multiplier: `2^32 / block size + 1` (see [`is_block_start`]), or
    /// zero where the one-comparison check does not apply (free spans, metadata, pages
    /// too large for 32-bit arithmetic), which sends every free of the page to the
    /// exact check.
    pub div_magic: u32,
    /// `div_magic` times the low 32 bits of the page start, so that
    /// `addr * div_magic - block_origin` is the page offset times `div_magic`. One
    /// where `div_magic` is zero (so the fast check fails for every address).
    pub block_origin: u32,
    /// The owning thread's id; null while abandoned or free.
    pub owner: H,
    /// Blocks freed by other threads, plus the notification state in the low bits.
    pub remote_free: R,
    /// Links in the owner's class list or full list, a free-span bin, or the
    /// abandoned list.
    pub next: *mut Page,
    pub prev: *mut Page,
}

// SAFETY: pages are shared between threads by design; every field other threads touch
// is atomic, the rest is owner-only or guarded by the region lock.
unsafe impl Sync for Page {}

// SAFETY: `next` and `prev` are the record's two list links; only the list's owner (the
// owner thread, or the region lock holder) writes them.
unsafe impl crate::list::Linked for Page {
    unsafe fn next(this: *mut Self) -> *mut *mut Self {
        // SAFETY: `this` is a live record per the contract.
        unsafe { &raw mut (*this).next }
    }
    unsafe fn prev(this: *mut Self) -> *mut *mut Self {
        // SAFETY: `this` is a live record per the contract.
        unsafe { &raw mut (*this).prev }
    }
}

impl Page {
    pub const fn empty() -> Page {
        Page::with_atomics(AtomicPtr::new(ptr::null_mut()), AtomicUsize::new(0))
    }

    /// First slice of the page (or span) in its segment.
    #[inline]
    pub fn slice_index(&self) -> usize {
        (self.start_offset >> SLICE_SHIFT) as usize
    }

    /// Bytes per block.
    #[inline]
    pub fn block_size(&self) -> usize {
        size_class::block_size(self.class as usize)
    }

    /// Bytes of the page that hold whole blocks.
    #[inline]
    pub fn usable_bytes(&self) -> u32 {
        let bs = self.block_size().max(1);
        (self.bytes() / bs * bs) as u32
    }

    /// Address of the first block (the record lives in the same segment as its page).
    #[inline]
    pub fn start(&self) -> *mut u8 {
        (segment_base(self as *const Page as usize) + self.start_offset as usize) as *mut u8
    }

    /// Bytes the page covers.
    #[inline]
    pub fn bytes(&self) -> usize {
        (self.slice_count as usize) << SLICE_SHIFT
    }
}

impl<H, R> Page<H, R> {
    /// An empty record holding the given `owner` and `remote_free` atomics.
    pub const fn with_atomics(owner: H, remote_free: R) -> Page<H, R> {
        Page {
            free: ptr::null_mut(),
            used: 0,
            carved: AtomicU32::new(0),
            start_offset: 0,
            class: 0,
            flags: 0,
            slice_count: 0,
            div_magic: 0,
            block_origin: 1,
            owner,
            remote_free,
            next: ptr::null_mut(),
            prev: ptr::null_mut(),
        }
    }

    /// Blocks in use (or waiting on the remote list).
    #[inline]
    pub fn used(&self) -> u32 {
        self.used & !IN_FULL_FLAG
    }

    /// True while the page sits on its heap's full list.
    #[inline]
    pub fn in_full(&self) -> bool {
        self.used & IN_FULL_FLAG != 0
    }
}

/// Bytes per block of the page at `page`, from any thread: read through the raw
/// pointer, so no reference covers the record its owner may be writing.
///
/// # Safety
/// `page` is the record of a page holding a live block the caller owns (`class` only
/// changes while no block of the page is live).
#[inline]
pub unsafe fn block_size_of(page: *const Page) -> usize {
    // SAFETY: per the contract; a plain read of one field through the raw pointer.
    size_class::block_size(unsafe { (*page).class } as usize)
}

/// Statistics' view of a record another thread may own: its class and blocks in use,
/// read through the raw pointer without forming a reference. `used` is owner-written
/// and read here as a snapshot (volatile, so the compiler keeps the one load).
///
/// # Safety
/// `page` is a page record of a live segment, and the region lock is held (so it stays
/// a page while it is read).
pub unsafe fn stats_snapshot(page: *const Page) -> (usize, u32) {
    // SAFETY: per the contract; field reads through the raw pointer.
    unsafe {
        let used = ptr::read_volatile(&raw const (*page).used);
        ((*page).class as usize, used & !IN_FULL_FLAG)
    }
}

/// Owner: counts one block of `page` back (`used -= 1`). True when the page needs the
/// free slow path: it is now empty (zero) or on the full list (negative, see
/// [`IN_FULL_FLAG`]). On x86-64 one decrement of the field and one signed branch on its
/// flags (the compiler would load, decrement, store and test).
///
/// # Safety
/// The calling thread owns `page`, and a block of it was in use.
#[inline(always)]
pub unsafe fn release_one(page: *mut Page) -> bool {
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    {
        // SAFETY: per the contract `used` is ours to write; the asm touches only it.
        unsafe {
            core::arch::asm!(
                "dec dword ptr [{page} + {used}]",
                "jle {slow}",
                page = in(reg) page,
                used = const core::mem::offset_of!(Page, used),
                slow = label { return true; },
                options(nostack),
            );
        }
        false
    }
    #[cfg(not(all(target_arch = "x86_64", not(miri))))]
    {
        // SAFETY: per the contract.
        unsafe {
            (*page).used -= 1;
            (*page).used as i32 <= 0
        }
    }
}

/// Prepares page metadata for a fresh page of `class` blocks, owned by the thread
/// `owner`.
///
/// The record's `flags` are left alone: the region cleared them under its lock when it
/// split the span off, and other threads may read them (a neighbour's `release_span`
/// checks whether this span is free) while this runs outside the lock.
///
/// # Safety
/// `page` heads a span the region just handed to the calling thread (its
/// `start_offset` and `slice_count` set).
pub unsafe fn init_page(page: *mut Page, owner: *mut Owner, class: usize) {
    let block_size = size_class::block_size(class);
    // SAFETY: per the contract the owner-side fields are the caller's; fields are
    // written one by one through the raw pointer, so no reference covers `flags`.
    unsafe {
        let start = segment_base(page as usize) + (*page).start_offset as usize;
        let bytes = ((*page).slice_count as usize) << SLICE_SHIFT;
        let magic = block_start_magic(block_size, bytes);
        set_free_head(page, ptr::null_mut());
        (*page).used = 0;
        (*page).carved.store(0, Ordering::Relaxed);
        (*page).div_magic = magic;
        (*page).block_origin = if magic == 0 {
            1
        } else {
            (start as u32).wrapping_mul(magic)
        };
        (*page).class = class as u8;
        (*page).owner.store(owner, Ordering::Release);
        (*page).remote_free.store(0, Ordering::Relaxed);
        (*page).next = ptr::null_mut();
        (*page).prev = ptr::null_mut();
    }
}

/// Bits of the `free` word of a span not set up as a page: all of its memory is known
/// to read as zero (never written since its segment was mapped); it is a run of slices
/// its heap cuts pages from ([`mark_span_run`]). Not an address any block can have
/// (blocks are 16-byte aligned), and `init_page` overwrites them.
const ZEROED_SPAN: usize = 1;
const RUN_SPAN: usize = 2;

/// Records whether the memory of `page`, a span taken from the region and not set up
/// as a page (or a page retired to a heap's spare pages), is known to read as zero, and
/// that it is not a run. `init_page` forgets it: read it with [`span_is_zeroed`]
/// before.
///
/// # Safety
/// The caller owns `page` (just taken under the region lock, or a spare of its heap).
pub unsafe fn mark_span_zeroed(page: *mut Page, zeroed: bool) {
    let word = if zeroed { ZEROED_SPAN } else { 0 };
    // SAFETY: per the contract; `free` is owner-only and unused by a span not set up.
    unsafe { (*page).free = ptr::without_provenance_mut(word) };
}

/// Whether [`mark_span_zeroed`] recorded `page`'s memory as reading zero.
///
/// # Safety
/// As for [`mark_span_zeroed`].
pub unsafe fn span_is_zeroed(page: *const Page) -> bool {
    // SAFETY: per the contract.
    unsafe { (*page).free.addr() & ZEROED_SPAN != 0 }
}

/// Marks `page`, a span not set up as a page, as a run of slices its heap cuts pages
/// from (`segment::split_spare` passes the mark on to what is left).
///
/// # Safety
/// As for [`mark_span_zeroed`].
pub unsafe fn mark_span_run(page: *mut Page) {
    // SAFETY: per the contract.
    unsafe { (*page).free = (*page).free.map_addr(|w| w | RUN_SPAN) };
}

/// Whether `page`, a span not set up as a page, is a run ([`mark_span_run`]).
///
/// # Safety
/// As for [`mark_span_zeroed`].
pub unsafe fn span_is_run(page: *const Page) -> bool {
    // SAFETY: per the contract.
    unsafe { (*page).free.addr() & RUN_SPAN != 0 }
}

/// The block-start multiplier `m = 2^32 / block_size + 1` for a page of `bytes`, or zero
/// when 32-bit arithmetic cannot tell its block starts apart (see [`is_block_start`]).
///
/// With `e = block_size * m - 2^32` (between 1 and `block_size`), the offset
/// `q * block_size + r` times `m` is `q * e + r * m` (mod 2^32). For a block start
/// (`r == 0`) that is `q * e`, growing with the block index `q`; for any other offset it
/// is at least `m`. So one comparison against `carved blocks * e` accepts exactly the
/// carved block starts, provided no product wraps and `(blocks + 1) * e < m`, which
/// holds when `bytes * block_size` stays well below 2^32 (every class up to 8 KiB in
/// pages up to 64 KiB); larger pages get zero and the exact check.
fn block_start_magic(block_size: usize, bytes: usize) -> u32 {
    let bs = block_size as u64;
    if bs < 2 {
        return 0;
    }
    let m = (1u64 << 32) / bs + 1;
    let e = bs * m - (1u64 << 32);
    let blocks = bytes as u64 / bs;
    if m > u32::MAX as u64 || (blocks + 1) * e >= m {
        return 0;
    }
    m as u32
}

/// `Page::carved` for `bytes` carved from a page with the given multiplier (see the
/// field).
#[inline]
fn carved_value(magic: u32, block_size: usize, bytes: usize) -> u32 {
    if magic == 0 {
        bytes as u32
    } else {
        (bytes / block_size) as u32 * (block_size as u32).wrapping_mul(magic)
    }
}

/// Bytes carved from the page so far (decoding `Page::carved`).
///
/// # Safety
/// `page` is a page (or span) record of a live segment; any thread may call this.
#[inline]
pub unsafe fn carved_bytes(page: *const Page) -> usize {
    // SAFETY: per the contract; field reads through the raw pointer.
    let (carved, magic, class) = unsafe {
        (
            (*page).carved.load(Ordering::Relaxed),
            (*page).div_magic,
            (*page).class,
        )
    };
    if magic == 0 {
        return carved as usize;
    }
    let bs = size_class::block_size(class as usize);
    let excess = (bs as u32).wrapping_mul(magic);
    (carved / excess) as usize * bs
}

/// Carves more blocks from the untouched tail onto `free`: one slice worth (at least one
/// block), and on to the end of the OS page the last of those starts in, so a page only
/// becomes resident as it is used.
///
/// # Safety
/// The calling thread owns `page`.
pub unsafe fn extend(page: *mut Page) {
    // SAFETY: owner access; the shared reference covers no field another thread writes
    // (`carved`, `owner` and `remote_free` are atomics).
    let (bs, usable, start, carved, magic) = unsafe {
        let p = &*page;
        (
            p.block_size(),
            p.usable_bytes() as usize,
            p.start(),
            carved_bytes(page),
            p.div_magic,
        )
    };
    let remaining = (usable - carved) / bs;
    if remaining == 0 {
        return;
    }
    let key = link_key();
    let mark = freed_mark(page);
    // One slice worth at a time: a thread that holds a few blocks touches (and keeps
    // resident) only what it uses, even when its page was planned large. Blocks whose
    // two words lie in the OS page that carving touches anyway come along: they cost no
    // memory, and a carve of one slice sent small classes to the slow path every 1 KiB
    // (larson: about one allocation in 18).
    let first = start.wrapping_add(carved);
    let slice_worth = (SLICE_SIZE / bs).clamp(1, remaining);
    let header = size_of::<Block>();
    let touched_end =
        (first.addr() + (slice_worth - 1) * bs + header).next_multiple_of(OS_PAGE_SIZE);
    let n = ((touched_end - header - first.addr()) / bs + 1).min(remaining);
    let mut cur = first;
    for _ in 1..n {
        let next = cur.wrapping_add(bs);
        // SAFETY: `cur` and `next` are blocks inside this page's slices that were never
        // handed out; the page owner has exclusive use of them. Marked free, so freeing
        // one that was never handed out is caught like a double free.
        unsafe {
            cur.cast::<Block>().write(Block {
                next: encode_link(key, next.cast()),
                freed_mark: mark,
            })
        };
        cur = next;
    }
    // SAFETY: `cur` is the last carved block, as above; owner access to the page.
    unsafe {
        cur.cast::<Block>().write(Block {
            next: (*page).free,
            freed_mark: mark,
        });
        (*page).free = encode_link(key, first.cast());
    }
    // Blocks carved here reach other threads only through later synchronisation (the
    // program handing them over), which also orders this store before their reads.
    // SAFETY: owner access.
    unsafe {
        (*page)
            .carved
            .store(carved_value(magic, bs, carved + n * bs), Ordering::Relaxed)
    };
}

/// The free path's block-start check: true only for the start of a block carved from
/// `page`, in one multiplication and one comparison (see [`block_start_magic`]). It
/// fails for every address of a page whose `div_magic` is zero; [`is_block_start`]
/// then decides.
///
/// # Safety
/// `page` is the record `segment::page_of` gives for `addr` (a page, free span or
/// metadata record of a live segment). Any thread may call this: it reads the record
/// through the raw pointer (no reference to a record whose owner is writing it),
/// `carved` atomically.
#[inline(always)]
pub unsafe fn is_block_start_fast(page: *const Page, addr: usize) -> bool {
    // SAFETY: per the contract.
    let (magic, origin) = unsafe { ((*page).div_magic, (*page).block_origin) };
    let scaled = (addr as u32).wrapping_mul(magic).wrapping_sub(origin);
    // SAFETY: per the contract; `carved` is compared in memory (an aligned 4-byte read,
    // atomic on x86-64), which the compiler does not do with an atomic load.
    unsafe { below_carved(page, scaled) }
}

/// `scaled < page.carved`, reading `carved` with a relaxed atomic load.
///
/// # Safety
/// `page` is a record of a live segment.
#[inline(always)]
unsafe fn below_carved(page: *const Page, scaled: u32) -> bool {
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    {
        // SAFETY: per the contract the field is readable; the asm only reads it.
        unsafe {
            core::arch::asm!(
                "cmp {scaled:e}, dword ptr [{page} + {carved}]",
                "jae {no}",
                scaled = in(reg) scaled,
                page = in(reg) page,
                carved = const core::mem::offset_of!(Page, carved),
                no = label { return false; },
                options(nostack, readonly),
            );
        }
        true
    }
    #[cfg(not(all(target_arch = "x86_64", not(miri))))]
    {
        // SAFETY: per the contract.
        scaled < unsafe { (*page).carved.load(Ordering::Relaxed) }
    }
}

/// Whether `page` belongs to `owner` (a relaxed read of `Page::owner`), compared in
/// memory on x86-64 rather than loaded first.
///
/// # Safety
/// `page` is a record of a live segment.
#[inline(always)]
pub unsafe fn is_owned_by(page: *const Page, owner: *mut Owner) -> bool {
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    {
        // SAFETY: per the contract the field is readable; an aligned 8-byte read is
        // atomic on x86-64, and the asm only reads it.
        unsafe {
            core::arch::asm!(
                "cmp qword ptr [{page} + {field}], {owner}",
                "jne {no}",
                owner = in(reg) owner,
                page = in(reg) page,
                field = const core::mem::offset_of!(Page, owner),
                no = label { return false; },
                options(nostack, readonly),
            );
        }
        true
    }
    #[cfg(not(all(target_arch = "x86_64", not(miri))))]
    {
        // SAFETY: per the contract.
        unsafe { (*page).owner.load(Ordering::Relaxed) == owner }
    }
}

/// True when `addr` is the start of a block carved from `page`: the fast check, or,
/// for pages it does not cover, the offset from the page start is below the carved
/// bytes and a multiple of the block size.
///
/// # Safety
/// As for [`is_block_start_fast`].
#[inline]
pub unsafe fn is_block_start(page: *const Page, addr: usize) -> bool {
    // SAFETY: per the contract.
    unsafe {
        if is_block_start_fast(page, addr) {
            return true;
        }
        if (*page).div_magic != 0 {
            return false;
        }
        let offset = (addr & SEGMENT_MASK).wrapping_sub((*page).start_offset as usize);
        let bs = block_size_of(page);
        offset < carved_bytes(page) && offset.is_multiple_of(bs)
    }
}

/// Moves the blocks other threads freed onto `free`. Returns how many. Owner only (or
/// the region lock holder for an abandoned page).
///
/// # Safety
/// `page` is a live record and the caller has owner access to its owner-side fields;
/// other threads may be pushing onto `remote_free` meanwhile.
pub unsafe fn collect_remote<H, R: RemoteWord>(page: *mut Page<H, R>) -> u32 {
    // SAFETY: a reference to the atomic word only (other threads use it atomically).
    let remote = unsafe { &(*page).remote_free };
    let word = remote.load(Ordering::Relaxed);
    // A watched page's word holds its watcher, not a list (and no freer pushes to it).
    if word & REMOTE_PTR_MASK == 0 || word & STATE_MASK == STATE_WATCH {
        return 0;
    }
    // Take the whole list, keep the state bits.
    let taken = remote.fetch_and(STATE_MASK, Ordering::Acquire);
    let head = (taken & REMOTE_PTR_MASK) as *mut Block;
    if head.is_null() {
        return 0;
    }
    let key = link_key();
    // SAFETY: the remote list holds blocks of this page that their freers handed over;
    // each one's first word links the next, encoded as on the local list, and the last
    // one's the end of a list; hardened, each decoded link is checked to stay in the
    // page's segment before it is followed here or popped. Owner access to `free` and
    // `used`.
    unsafe {
        let count = match remote_count(taken, (*page).used & !IN_FULL_FLAG) {
            // The remote list becomes the free list as it stands.
            Some(n) if free_head(page).is_null() => {
                (*page).free = encode_link(key, head);
                n
            }
            _ => {
                let (tail, n) = remote_tail(page, head, key);
                (*tail).next = (*page).free;
                (*page).free = encode_link(key, head);
                n
            }
        };
        let used = (*page).used;
        (*page).used = used - count.min(used & !IN_FULL_FLAG);
        count
    }
}

/// The last block of the remote list that starts at `head`, and the list's length.
///
/// # Safety
/// As for [`collect_remote`], whose list taken off the page starts at `head`.
unsafe fn remote_tail<H, R>(
    page: *mut Page<H, R>,
    head: *mut Block,
    key: usize,
) -> (*mut Block, u32) {
    let mut count = 1;
    let mut tail = head;
    // SAFETY: per the contract.
    unsafe {
        loop {
            let next = encode_link(key, (*tail).next);
            if next.is_null() {
                break;
            }
            if HARDENED && !is_in_page_segment(page, next) {
                corrupted_link(next);
            }
            tail = next;
            count += 1;
        }
    }
    (tail, count)
}

/// For a page about to be released if it is empty: whether it is. True when no block is
/// counted in use, or when every block still counted in `used` is on the remote list (as
/// its count says): then the list is dropped and no block counted in use any more, so
/// the page is empty without its blocks being touched. False (nothing changed)
/// otherwise. Owner only (or the region lock holder for an abandoned page).
///
/// # Safety
/// As for [`collect_remote`]; the caller releases the page when this returns true.
pub unsafe fn drop_remote_if_all_freed<H, R: RemoteWord>(page: *mut Page<H, R>) -> bool {
    // SAFETY: per the contract; a reference to the atomic word only.
    let remote = unsafe { &(*page).remote_free };
    // SAFETY: owner access to `used`.
    let used = unsafe { (*page).used } & !IN_FULL_FLAG;
    if used == 0 {
        // Every block on the remote list is counted in `used`: the list is empty too.
        return true;
    }
    let word = remote.load(Ordering::Acquire);
    // Once the count reaches `used` no block of the page is left to push, so the list
    // taken below is the one counted here.
    if remote_count(word, used) != Some(used) {
        return false;
    }
    remote.fetch_and(STATE_MASK, Ordering::Acquire);
    // SAFETY: owner access.
    unsafe { (*page).used &= IN_FULL_FLAG };
    true
}

/// Pushes a block freed by a thread that does not own `page`. Returns the heap that
/// must be told (the page is full and off its owner's list, watched by that heap)
/// together with ownership of the block, or null when the block was just queued on the
/// page.
///
/// Takes a raw pointer: the owner writes the record's other fields meanwhile, so this
/// side never holds a reference to the whole record, only to its atomics.
///
/// # Safety
/// `page` is a live record and `block` a live block of it that the caller gives up.
#[inline]
pub unsafe fn push_remote<H, R: RemoteWord>(
    page: *const Page<H, R>,
    block: *mut Block,
) -> *mut Watcher {
    // SAFETY: per the contract; a reference to the atomic word only.
    let remote = unsafe { &(*page).remote_free };
    debug_assert_eq!(
        block as usize & !REMOTE_PTR_MASK,
        0,
        "a block the word cannot hold"
    );
    let key = link_key();
    let mut cur = remote.load(Ordering::Relaxed);
    loop {
        let state = cur & STATE_MASK;
        if state == STATE_WATCH {
            // The word holds the watcher, not a list (`try_watch`): it leaves with us.
            match remote.compare_exchange_weak(
                cur,
                STATE_FREEING,
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => return (cur & REMOTE_PTR_MASK) as *mut Watcher,
                Err(now) => {
                    cur = now;
                    continue;
                }
            }
        }
        // SAFETY: the caller gave us the block; its first word is ours to write. The
        // link is stored encoded (hardened), as `collect_remote` expects; the word the
        // protocol swaps (`remote_free`) holds plain addresses.
        unsafe { (*block).next = encode_link(key, (cur & REMOTE_PTR_MASK) as *mut Block) };
        // The count's bits of `cur` plus one: the bits below it all set, then carried.
        let count = (cur | (REMOTE_COUNT_ONE - 1)).wrapping_add(1);
        let new = block as usize | state | count;
        match remote.compare_exchange_weak(cur, new, Ordering::Release, Ordering::Relaxed) {
            Ok(_) => return ptr::null_mut(),
            Err(now) => cur = now,
        }
    }
}

/// Ends a notification begun by `push_remote` (state `FREEING` -> `NONE`).
///
/// # Safety
/// `page` is a live record whose notification the caller began.
#[inline]
pub unsafe fn end_notification<H, R: RemoteWord>(page: *const Page<H, R>) {
    // SAFETY: per the contract; a reference to the atomic word only.
    unsafe { &(*page).remote_free }.fetch_and(!STATE_MASK, Ordering::Release);
}

/// Whether a remote freer is mid-notification about `page` (state `FREEING`): between
/// taking the watcher in `push_remote` and `end_notification`.
///
/// # Safety
/// `page` is a live record.
pub unsafe fn notification_in_flight<H, R: RemoteWord>(page: *const Page<H, R>) -> bool {
    // SAFETY: per the contract; a reference to the atomic word only.
    unsafe { &(*page).remote_free }.load(Ordering::Acquire) & STATE_MASK == STATE_FREEING
}

/// Owner: asks to be told about the next remote free, for a page leaving the
/// allocation list: the freer hands its block to `watcher` (the owner's heap), which
/// the word holds while the page is watched. Fails (returns false) when remote frees are
/// already waiting; the caller should collect them instead.
///
/// # Safety
/// `page` is a live record the caller owns; `watcher` is 4-byte aligned and below 2^48.
pub unsafe fn try_watch<H, R: RemoteWord>(page: *const Page<H, R>, watcher: *mut Watcher) -> bool {
    debug_assert_eq!(
        watcher as usize & !REMOTE_PTR_MASK,
        0,
        "a watcher the word cannot hold"
    );
    // SAFETY: per the contract; a reference to the atomic word only.
    unsafe { &(*page).remote_free }
        .compare_exchange(
            STATE_NONE,
            watcher as usize | STATE_WATCH,
            Ordering::AcqRel,
            Ordering::Relaxed,
        )
        .is_ok()
}

/// Owner: stops watching, waiting out a remote freer that is mid-notification. After
/// this returns no notification about `page` is in flight.
///
/// # Safety
/// `page` is a live record the caller owns.
pub unsafe fn unwatch<H, R: RemoteWord>(page: *const Page<H, R>) {
    // SAFETY: per the contract; a reference to the atomic word only.
    let remote = unsafe { &(*page).remote_free };
    let mut cur = remote.load(Ordering::Acquire);
    loop {
        match cur & STATE_MASK {
            STATE_NONE => return,
            STATE_FREEING => {
                remote.pause();
                cur = remote.load(Ordering::Acquire);
            }
            // Watched: the word holds the watcher and no list (a freer would have moved
            // the state on before pushing), so it empties.
            _ => match remote.compare_exchange_weak(
                cur,
                STATE_NONE,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return,
                Err(now) => cur = now,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record as `init_page` and `extend` leave it: a page of `bytes` bytes of
    /// `bs`-byte blocks at `start`, with its first `carved_blocks` blocks carved.
    fn record(bs: usize, bytes: usize, start: usize, carved_blocks: usize) -> Page {
        let mut page = Page::empty();
        let magic = block_start_magic(bs, bytes);
        page.div_magic = magic;
        page.block_origin = if magic == 0 {
            1
        } else {
            (start as u32).wrapping_mul(magic)
        };
        page.carved = AtomicU32::new(carved_value(magic, bs, carved_blocks * bs));
        page
    }

    fn fast(page: &Page, addr: usize) -> bool {
        // SAFETY: a live record; the check only reads it.
        unsafe { is_block_start_fast(page, addr) }
    }

    #[test]
    fn every_block_size_up_to_8_kib_in_pages_up_to_64_kib_gets_the_fast_check() {
        for bs in (16..=8192).step_by(16) {
            for shift in 10..=16 {
                let bytes = 1usize << shift;
                if bytes >= bs {
                    assert_ne!(block_start_magic(bs, bytes), 0, "{bs} in {bytes}");
                }
            }
        }
    }

    #[test]
    fn fast_check_accepts_exactly_the_carved_block_starts() {
        // Segments are 4 MiB aligned; this one lies just below a 4 GiB boundary, so the
        // low 32 bits of addresses are large.
        let seg = 0x7f3c_ffc0_0000usize;
        for bs in [
            16, 32, 48, 80, 112, 208, 496, 1008, 1024, 3072, 4080, 5456, 8176, 8192,
        ] {
            for shift in 10..=16 {
                let bytes = 1usize << shift;
                if bytes < bs {
                    continue;
                }
                let start = seg + (4 << 20) - bytes;
                let blocks = bytes / bs;
                for carved in [0, 1, blocks / 2, blocks] {
                    let page = record(bs, bytes, start, carved);
                    for off in 0..bytes {
                        let want = off % bs == 0 && off / bs < carved;
                        assert_eq!(
                            fast(&page, start + off),
                            want,
                            "{bs} {bytes} {carved} {off}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn records_without_a_multiplier_pass_no_address() {
        // Free spans and pages too large for the fast check; metadata records are all
        // zero, carved included.
        let mut page = record(256 << 10, 1 << 20, 0x7f00_0040_0000, 4);
        assert_eq!(page.div_magic, 0);
        for off in (0..(1 << 20)).step_by(16) {
            assert!(!fast(&page, 0x7f00_0040_0000 + off));
        }
        page = Page::empty();
        assert!(!fast(&page, 0x7f00_0040_0000));
        page.block_origin = 0;
        assert!(!fast(&page, 0x7f00_0040_0000));
    }
}
