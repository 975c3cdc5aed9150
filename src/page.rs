//! Pages: a run of slices holding blocks of one size, and their free lists.
//!
//! A page belongs to one thread heap. Its owner allocates from `free` and pushes its own
//! frees back there without atomics. Other threads push onto `remote_free`, a lock-free
//! stack whose two low bits also carry the page's notification state (blocks are
//! 16-byte aligned, so those bits are free):
//!
//! * `NONE`: remote frees just push.
//! * `WATCH`: the page is full and off the owner's allocation list; the next remote
//!   freer moves the state to `FREEING`, hands its block to the owner heap's
//!   `delayed_free` list (so the owner learns the page has room again), then sets `NONE`.
//! * `FREEING`: a remote freer is between those steps; the owner waits for it to finish
//!   before it may give the page away, so the heap a notification reaches is always the
//!   page's owner.
//!
//! Blocks carry no header: the page metadata is found from any block address through
//! the segment (see `segment::page_of`).

use core::ptr;
use core::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

use crate::heap::Heap;
use crate::segment;

/// A free block: its first word links to the next free block; the second holds
/// [`freed_mark`] while it is free (and zero once handed out), which is how a second
/// free of the same block is recognised.
#[repr(C)]
pub struct Block {
    pub next: *mut Block,
    pub freed_mark: usize,
}

/// Whether links of the local free lists are stored encoded (the `hardened` feature).
pub const HARDENED: bool = cfg!(feature = "hardened");

/// The key a link stored in block `b` is mixed with: the process secret and the
/// block's own address, so a use-after-free write cannot choose where the allocator
/// goes next, and one leaked link does not reveal the key of another block.
#[inline(always)]
fn link_key(b: *const Block) -> usize {
    (b as usize).rotate_left(32) ^ crate::init::secret()
}

/// The stored form of `next` as the link of `b` (identity unless hardened).
#[inline(always)]
pub fn encode_link(b: *const Block, next: *mut Block) -> *mut Block {
    if HARDENED {
        ((next as usize) ^ link_key(b)) as *mut Block
    } else {
        next
    }
}

/// The next block of the local free list after `b`. Hardened builds check the decoded
/// link stays in `b`'s segment (or ends the list) and stop the program otherwise.
///
/// # Safety
/// `b` is a block on a local free list.
#[inline(always)]
pub unsafe fn next_free(b: *mut Block) -> *mut Block {
    // SAFETY: per the contract the block's first word is its link.
    let raw = unsafe { (*b).next };
    if !HARDENED {
        return raw;
    }
    let next = ((raw as usize) ^ link_key(b)) as *mut Block;
    if next.is_null() || ((next as usize) ^ (b as usize)) >> segment::SEGMENT_SHIFT == 0 {
        next
    } else {
        corrupted_link(b)
    }
}

#[cold]
#[inline(never)]
fn corrupted_link(b: *mut Block) -> ! {
    crate::options::misuse("corrupted free list (use after free?)", b as usize)
}

/// The mark a free block carries: its address mixed with its page's divisibility
/// constant (a large odd-looking number), so ordinary user data never matches it by
/// accident, at the cost of one register operation on the free path.
#[inline(always)]
pub fn freed_mark(page: &Page, addr: usize) -> usize {
    addr ^ page.magic as usize
}

pub const STATE_NONE: usize = 0;
pub const STATE_WATCH: usize = 1;
pub const STATE_FREEING: usize = 2;
const STATE_MASK: usize = 3;

/// Added to `Page::used` while the page is *not* on its heap's full list. The free fast
/// path then needs one comparison after decrementing: a result of at most `NOT_FULL`
/// means "now empty" or "on the full list", the two cases that need the slow path.
pub const NOT_FULL: u32 = 1 << 31;
/// Span flag: this is the head of a free span of slices (not a page).
pub const FLAG_FREE_SPAN: u8 = 2;
/// Span flag: the free span's memory may still be resident (not yet decommitted).
pub const FLAG_DIRTY: u8 = 4;
/// Page flag: the owner thread exited; the page waits to be adopted or swept.
pub const FLAG_ABANDONED: u8 = 8;

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

/// The atomic read of `Page::heap` the remote-free protocol performs (see [`RemoteWord`]).
pub trait HeapSlot {
    fn load(&self, order: Ordering) -> *mut Heap;
}

impl HeapSlot for AtomicPtr<Heap> {
    #[inline(always)]
    fn load(&self, order: Ordering) -> *mut Heap {
        AtomicPtr::load(self, order)
    }
}

/// Metadata of one page (or of one free span, when `FLAG_FREE_SPAN` is set). Lives in
/// its segment's metadata area, one per slice, 64 bytes so pages of different threads
/// never share a cache line.
///
/// The allocator only uses the default parameters (`Page` is
/// `Page<AtomicPtr<Heap>, AtomicUsize>`); other atomics are for the loom models.
#[repr(C, align(64))]
pub struct Page<H = AtomicPtr<Heap>, R = AtomicUsize> {
    /// Owner-only: blocks ready to hand out.
    pub free: *mut Block,
    /// Owner-only: blocks handed out and not yet back on `free` (includes blocks
    /// waiting on `remote_free`), plus [`NOT_FULL`] unless the page is on the full list.
    /// Read it through [`Page::used`] and [`Page::in_full`].
    pub used: u32,
    /// Bytes carved into blocks from the page start so far (the rest is untouched).
    /// Zero for free spans, so no pointer into one passes as a block.
    pub carved: u32,
    /// Offset of the page (or span) start from its segment base.
    pub start_offset: u32,
    pub class: u8,
    pub flags: u8,
    /// Slices the page (or span) covers.
    pub slice_count: u16,
    /// The class's divisibility constant (`size_class::div_magic`), kept here so the
    /// free path checks block starts without touching the class table; zero for free
    /// spans and metadata, which no offset passes.
    pub magic: u64,
    /// The owning heap; null while abandoned or free.
    pub heap: H,
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

impl Page {
    pub const fn empty() -> Page {
        Page::with_atomics(AtomicPtr::new(ptr::null_mut()), AtomicUsize::new(0))
    }

    /// First slice of the page (or span) in its segment.
    #[inline]
    pub fn slice_index(&self) -> usize {
        (self.start_offset >> segment::SLICE_SHIFT) as usize
    }

    /// Bytes per block.
    #[inline]
    pub fn block_size(&self) -> usize {
        crate::size_class::block_size(self.class as usize)
    }

    /// Bytes of the page that hold whole blocks.
    #[inline]
    pub fn usable_bytes(&self) -> u32 {
        let bs = self.block_size().max(1);
        (self.bytes() / bs * bs) as u32
    }

    /// Address of the first block.
    #[inline]
    pub fn start(&self) -> *mut u8 {
        segment::slice_address(self)
    }

    /// Bytes the page covers.
    #[inline]
    pub fn bytes(&self) -> usize {
        (self.slice_count as usize) << segment::SLICE_SHIFT
    }
}

impl<H, R> Page<H, R> {
    /// An empty record holding the given `heap` and `remote_free` atomics.
    pub const fn with_atomics(heap: H, remote_free: R) -> Page<H, R> {
        Page {
            free: ptr::null_mut(),
            used: 0,
            carved: 0,
            start_offset: 0,
            class: 0,
            flags: 0,
            slice_count: 0,
            magic: 0,
            heap,
            remote_free,
            next: ptr::null_mut(),
            prev: ptr::null_mut(),
        }
    }

    /// Blocks in use (or waiting on the remote list).
    #[inline]
    pub fn used(&self) -> u32 {
        self.used & !NOT_FULL
    }

    /// True while the page sits on its heap's full list.
    #[inline]
    pub fn in_full(&self) -> bool {
        self.used & NOT_FULL == 0
    }
}

/// Prepares page metadata for a fresh page of `block_size` blocks owned by `heap`.
pub fn init_page(page: &mut Page, heap: *mut Heap, class: usize) {
    page.free = ptr::null_mut();
    page.used = NOT_FULL;
    page.carved = 0;
    page.magic = crate::size_class::div_magic_of(class);
    page.class = class as u8;
    page.flags = 0;
    page.heap.store(heap, Ordering::Release);
    page.remote_free.store(0, Ordering::Relaxed);
    page.next = ptr::null_mut();
    page.prev = ptr::null_mut();
}

/// Carves more blocks from the untouched tail onto `free`: at most one slice worth
/// (at least one block), so a page only becomes resident as it is used.
pub fn extend(page: &mut Page) {
    let bs = page.block_size();
    let remaining = (page.usable_bytes() - page.carved) as usize / bs;
    if remaining == 0 {
        return;
    }
    // One slice worth at a time: a thread that holds a few blocks touches (and keeps
    // resident) only what it uses, even when its page was planned large.
    let n = (segment::SLICE_SIZE / bs).clamp(1, remaining);
    let first = page.start().wrapping_add(page.carved as usize);
    let mut cur = first;
    for _ in 1..n {
        let next = cur.wrapping_add(bs);
        // SAFETY: `cur` and `next` are blocks inside this page's slices that were never
        // handed out; the page owner has exclusive use of them. Marked free, so freeing
        // one that was never handed out is caught like a double free.
        unsafe {
            cur.cast::<Block>().write(Block {
                next: encode_link(cur.cast(), next.cast()),
                freed_mark: freed_mark(page, cur as usize),
            })
        };
        cur = next;
    }
    // SAFETY: `cur` is the last carved block, as above.
    unsafe {
        cur.cast::<Block>().write(Block {
            next: encode_link(cur.cast(), page.free),
            freed_mark: freed_mark(page, cur as usize),
        })
    };
    page.free = first.cast();
    page.carved += (n * bs) as u32;
}

/// True when `addr` is the start of a block carved from `page`: the offset from the page
/// start is below `carved` and a multiple of the block size. Divisibility is the
/// multiplicative check of `size_class::divides`, not a division.
#[inline(always)]
pub fn is_block_start(page: &Page, addr: usize) -> bool {
    let offset = (addr & (segment::SEGMENT_SIZE - 1)).wrapping_sub(page.start_offset as usize);
    offset < page.carved as usize && (offset as u64).wrapping_mul(page.magic) < page.magic
}

/// Moves the blocks other threads freed onto `free`. Returns how many. Owner only (or
/// the region lock holder for an abandoned page).
pub fn collect_remote<H, R: RemoteWord>(page: &mut Page<H, R>) -> u32 {
    if page.remote_free.load(Ordering::Relaxed) & !STATE_MASK == 0 {
        return 0;
    }
    // Take the whole list, keep the state bits.
    let taken = page.remote_free.fetch_and(STATE_MASK, Ordering::Acquire) & !STATE_MASK;
    let head = taken as *mut Block;
    if head.is_null() {
        return 0;
    }
    let mut count = 1;
    let mut tail = head;
    // SAFETY: the remote list holds blocks of this page that their freers handed over;
    // each one's first word links the next (plainly: encoded links are only used on
    // the owner's list, so they are encoded here, on the way over).
    unsafe {
        while !(*tail).next.is_null() {
            let next = (*tail).next;
            (*tail).next = encode_link(tail, next);
            tail = next;
            count += 1;
        }
        (*tail).next = encode_link(tail, page.free);
    }
    page.free = head;
    page.used -= count.min(page.used());
    count
}

/// Pushes a block freed by a thread that does not own `page`. Returns the heap that
/// must be told (the page is full and off its owner's list) together with ownership of
/// the block, or null when the block was just queued on the page.
///
/// # Safety
/// `block` must be a live block of `page` that the caller gives up.
#[inline]
pub unsafe fn push_remote<H: HeapSlot, R: RemoteWord>(
    page: &Page<H, R>,
    block: *mut Block,
) -> *mut Heap {
    let mut cur = page.remote_free.load(Ordering::Relaxed);
    loop {
        let state = cur & STATE_MASK;
        if state == STATE_WATCH {
            let freeing = (cur & !STATE_MASK) | STATE_FREEING;
            match page.remote_free.compare_exchange_weak(
                cur,
                freeing,
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => return page.heap.load(Ordering::Acquire),
                Err(now) => {
                    cur = now;
                    continue;
                }
            }
        }
        // SAFETY: the caller gave us the block; its first word is ours to write.
        unsafe { (*block).next = (cur & !STATE_MASK) as *mut Block };
        let new = block as usize | state;
        match page
            .remote_free
            .compare_exchange_weak(cur, new, Ordering::Release, Ordering::Relaxed)
        {
            Ok(_) => return ptr::null_mut(),
            Err(now) => cur = now,
        }
    }
}

/// Ends a notification begun by `push_remote` (state `FREEING` -> `NONE`).
#[inline]
pub fn end_notification<H, R: RemoteWord>(page: &Page<H, R>) {
    page.remote_free.fetch_and(!STATE_MASK, Ordering::Release);
}

/// Owner: asks to be told about the next remote free, for a page leaving the
/// allocation list. Fails (returns false) when remote frees are already waiting; the
/// caller should collect them instead.
pub fn try_watch<H, R: RemoteWord>(page: &Page<H, R>) -> bool {
    page.remote_free
        .compare_exchange(STATE_NONE, STATE_WATCH, Ordering::AcqRel, Ordering::Relaxed)
        .is_ok()
}

/// Owner: stops watching, waiting out a remote freer that is mid-notification. After
/// this returns no notification about `page` is in flight.
pub fn unwatch<H, R: RemoteWord>(page: &Page<H, R>) {
    let mut cur = page.remote_free.load(Ordering::Acquire);
    loop {
        match cur & STATE_MASK {
            STATE_NONE => return,
            STATE_FREEING => {
                page.remote_free.pause();
                cur = page.remote_free.load(Ordering::Acquire);
            }
            _ => {
                match page.remote_free.compare_exchange_weak(
                    cur,
                    cur & !STATE_MASK,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => return,
                    Err(now) => cur = now,
                }
            }
        }
    }
}
