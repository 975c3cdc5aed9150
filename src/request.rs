//! The request layer: what every face of lgmalloc (the `lg_*` C API, the libc override,
//! the C++ operators, Rust's `GlobalAlloc`) asks of the allocator, with the rules they
//! share: size limits and errno, alignment, zeroing, realloc, misuse reports. It also
//! makes sure the allocator is initialised before any path that needs it beyond the
//! thread heap's own lazy start.

use core::ffi::{c_int, c_void};
use core::ptr;
use core::sync::atomic::Ordering;

use crate::chunk_map::{
    self, KIND_LARGE, KIND_LARGE_AT_BASE, KIND_NONE, KIND_SAMPLE, KIND_SEGMENT,
};
use crate::diag::misuse;
use crate::heap::{CallerOnStack, SampleCaller};
use crate::size_class::{self, HEAP_TABLE_MAX_SIZE, MAX_SMALL_SIZE};
use crate::stats::{self, LgStats};
use crate::{heap, init, large, options, os, page, sample, segment};

/// Requests above this fail with ENOMEM, as in glibc.
const MAX_REQUEST: usize = isize::MAX as usize;
/// Alignment every block has.
pub const MIN_ALIGN: usize = 16;

/// `malloc`: a block of at least `size` bytes, 16-byte aligned; null + ENOMEM on failure.
/// For entry points that reach it straight from the program (see [`malloc_for`]).
#[inline(always)]
pub fn malloc(size: usize) -> *mut u8 {
    malloc_for(size, CallerOnStack)
}

/// [`malloc`], with `caller` saying where a sampled allocation finds its call site.
#[inline(always)]
pub fn malloc_for(size: usize, caller: impl SampleCaller) -> *mut u8 {
    let heap = heap::thread_heap();
    if size <= heap::DIRECT_MAX_SIZE {
        // SAFETY: `heap` is the calling thread's heap, `size` within its direct pages.
        return unsafe { heap::alloc_by_size(heap, size, caller) };
    }
    malloc_beyond_direct(size, heap, caller)
}

#[inline(never)]
fn malloc_beyond_direct(size: usize, heap: *mut heap::Heap, caller: impl SampleCaller) -> *mut u8 {
    if size <= HEAP_TABLE_MAX_SIZE {
        // SAFETY: `heap` is the calling thread's heap, `size` within its class table.
        return unsafe { heap::alloc_small(heap, heap::class_of_small(heap, size), size, caller) };
    }
    if size <= MAX_SMALL_SIZE {
        // SAFETY: as in `malloc`.
        return unsafe { heap::alloc_small(heap, size_class::size_class_of(size), size, caller) };
    }
    if size > MAX_REQUEST {
        os::set_errno(libc::ENOMEM);
        return ptr::null_mut();
    }
    large_alloc(size, 0)
}

fn large_alloc(size: usize, align: usize) -> *mut u8 {
    if !init::ensure_initialized() {
        os::set_errno(libc::ENOMEM);
        return ptr::null_mut();
    }
    if options::verify() {
        heap::verify_record(heap::thread_heap_or_create(), size);
    }
    let p = large::alloc(size, align);
    if !p.is_null() {
        stats::LARGE_ALLOCS.fetch_add(1, Ordering::Relaxed);
    }
    p
}

/// `free`: gives `p` back. Null is ignored; anything lgmalloc did not hand out aborts.
///
/// # Safety
/// `p` is null or a pointer the caller owns and will not use again.
#[inline(always)]
pub unsafe fn free(p: *mut u8) {
    let addr = p as usize;
    if let Some(page) = segment::page_in_space(addr) {
        // SAFETY: `p` lies in a slot of the segment space, whose map named `page`.
        unsafe { heap::free_block(page, p) };
    } else {
        free_outside_space(addr);
    }
}

/// `free` of anything the segment space does not hold: null, a block of a segment
/// mapped on its own, a large object, a sampled block, or a pointer that is not ours.
#[cold]
#[inline(never)]
fn free_outside_space(addr: usize) {
    if addr == 0 {
        return;
    }
    if let Some(seg) = chunk_map::segment_holding(addr) {
        let page = segment::page_in(seg, addr);
        // SAFETY: the chunk map says `addr` lies in one of our segments.
        unsafe { heap::free_block(page, addr as *mut u8) };
        return;
    }
    free_not_small(addr);
}

/// `free` of a large object, a sampled block, or a pointer that is not ours.
fn free_not_small(addr: usize) {
    let kind = chunk_map::kind_of(addr);
    let saved = os::errno();
    match kind {
        KIND_LARGE | KIND_LARGE_AT_BASE if large::free(addr, kind) => {
            stats::LARGE_FREES.fetch_add(1, Ordering::Relaxed);
        }
        KIND_LARGE | KIND_LARGE_AT_BASE => {
            misuse("free of an invalid or already freed pointer", addr)
        }
        KIND_SAMPLE if sample::free(addr) => {}
        KIND_SAMPLE => misuse("free of an invalid or already freed pointer", addr),
        _ => misuse("free of a pointer lgmalloc never returned", addr),
    }
    os::set_errno(saved);
}

/// `calloc`: zeroed memory for `count * size` bytes, overflow-checked.
pub fn calloc(count: usize, size: usize) -> *mut u8 {
    let Some(total) = count.checked_mul(size) else {
        os::set_errno(libc::ENOMEM);
        return ptr::null_mut();
    };
    if total <= MAX_SMALL_SIZE {
        let heap = heap::thread_heap();
        let class = if total <= HEAP_TABLE_MAX_SIZE {
            // SAFETY: `heap` is the calling thread's heap, `total` within its table.
            unsafe { heap::class_of_small(heap, total) }
        } else {
            size_class::size_class_of(total)
        };
        // SAFETY: as in `malloc`. The heap layer knows which blocks read as zero.
        return unsafe { heap::alloc_small_zeroed(heap, class, total) };
    }
    let p = malloc(total);
    if p.is_null() {
        return p;
    }
    let kind = chunk_map::kind_of(p as usize);
    // Fresh (or decommitted) large mappings read as zero already.
    if kind == KIND_SEGMENT || kind == KIND_SAMPLE || !large::known_zero(p as usize, kind) {
        // SAFETY: `p` is a fresh block of at least `total` bytes.
        unsafe { ptr::write_bytes(p, 0, total) };
    }
    p
}

/// Bytes usable at `p` (0 for null or a pointer lgmalloc does not know).
pub fn usable_size(p: *const u8) -> usize {
    let addr = p as usize;
    match chunk_map::kind_of(addr) {
        KIND_SEGMENT => {
            // SAFETY: the chunk is one of our segments.
            unsafe { page::block_size_of(segment::page_of(addr)) }
        }
        k @ (KIND_LARGE | KIND_LARGE_AT_BASE) => large::usable_size(addr, k),
        KIND_SAMPLE => sample::usable_size(addr),
        _ => 0,
    }
}

/// Memory aligned to `align` (a power of two). Null + ENOMEM on failure.
pub fn aligned(align: usize, size: usize) -> *mut u8 {
    aligned_for(align, size, CallerOnStack)
}

/// [`aligned`], with `caller` saying where a sampled allocation finds its call site.
#[inline]
pub fn aligned_for(align: usize, size: usize, caller: impl SampleCaller) -> *mut u8 {
    if align <= MIN_ALIGN {
        return malloc_for(size, caller);
    }
    if size > MAX_REQUEST {
        os::set_errno(libc::ENOMEM);
        return ptr::null_mut();
    }
    if let Some(class) = size_class::aligned_class_of(size, align) {
        let heap = heap::thread_heap_or_create();
        if heap.is_null() {
            os::set_errno(libc::ENOMEM);
            return ptr::null_mut();
        }
        if options::verify() {
            heap::verify_record(heap, size);
        }
        // SAFETY: `heap` is the calling thread's live heap.
        return unsafe { heap::alloc_small(heap, class, size, caller) };
    }
    large_alloc(size, align)
}

/// `realloc`: resizes keeping the contents; on failure returns null and `p` stays valid.
/// `realloc(p, 0)` returns a minimal block (like mimalloc and jemalloc).
///
/// # Safety
/// `p` is null or a live pointer from lgmalloc that the caller gives up on success.
pub unsafe fn realloc(p: *mut u8, size: usize) -> *mut u8 {
    // SAFETY: forwarded contract.
    unsafe { realloc_for(p, size, CallerOnStack) }
}

/// [`realloc`], with `caller` saying where a sampled allocation of the new block finds
/// its call site: realloc calls the allocator and copies after it, so the sampler's
/// tail jump cannot see the program's return address; an entry point that read it
/// passes it (`CallerAt`), which spares each such sample a walk of the stack.
///
/// # Safety
/// As for [`realloc`].
#[inline]
pub unsafe fn realloc_for(p: *mut u8, size: usize, caller: impl SampleCaller) -> *mut u8 {
    if p.is_null() {
        return malloc_for(size, caller);
    }
    if size > MAX_REQUEST {
        os::set_errno(libc::ENOMEM);
        return ptr::null_mut();
    }
    let addr = p as usize;
    let kind = chunk_map::kind_of(addr);
    let old_usable = match kind {
        KIND_SEGMENT => {
            let page = segment::page_of(addr);
            // SAFETY: the chunk is one of our segments.
            unsafe {
                heap::check_live(
                    page,
                    p,
                    "realloc of a pointer lgmalloc never returned",
                    "realloc of a freed pointer",
                )
            };
            // SAFETY: as above.
            let bs = unsafe { page::block_size_of(page) };
            // Keep the block when it fits and is not more than twice too big.
            if size <= bs && size.max(MIN_ALIGN) * 2 > bs {
                return p;
            }
            bs
        }
        KIND_LARGE | KIND_LARGE_AT_BASE => {
            let usable = large::usable_size(addr, kind);
            if usable == 0 {
                misuse("realloc of an invalid or already freed pointer", addr);
            }
            if size > MAX_SMALL_SIZE {
                let q = large::realloc_in_place_or_move(addr, kind, size);
                if !q.is_null() {
                    return q;
                }
            }
            usable
        }
        KIND_SAMPLE => {
            let usable = sample::usable_size(addr);
            if usable == 0 {
                misuse("realloc of an invalid or already freed pointer", addr);
            }
            if size <= usable && size.max(MIN_ALIGN) * 2 > usable {
                return p;
            }
            usable
        }
        KIND_NONE => misuse("realloc of a pointer lgmalloc never returned", addr),
        _ => misuse("realloc of a pointer lgmalloc never returned", addr),
    };
    // A block that outgrows its class is likely to keep growing (strings, logs,
    // buffers): give it a quarter more room than asked, so growth by small steps
    // copies every ~25% instead of at every (finer) class boundary.
    let want = if size > old_usable && size <= MAX_SMALL_SIZE {
        size.max(old_usable + old_usable / 4).min(MAX_SMALL_SIZE)
    } else {
        size
    };
    let q = malloc_for(want, caller);
    if q.is_null() {
        return q;
    }
    // SAFETY: both blocks are live and distinct; we copy what fits in both.
    unsafe {
        ptr::copy_nonoverlapping(p, q, old_usable.min(size));
        free(p);
    }
    q
}

/// Returns free memory to the OS: collects the caller's pending frees, sweeps pages of
/// exited threads and decommits free spans. Returns the bytes given back.
pub fn trim() -> usize {
    if !init::ensure_initialized() {
        return 0;
    }
    let before = segment::released_total();
    heap::collect_own();
    segment::trim();
    segment::released_total().wrapping_sub(before) + large::cache_release() + sample::trim()
}

/// Frees `p`, whose allocation size the caller states as `size`: a size larger than the
/// block is misuse (C23 `free_sized`).
///
/// # Safety
/// As [`free`].
pub unsafe fn free_sized(p: *mut u8, size: usize) {
    if !p.is_null() && size > usable_size(p) && usable_size(p) != 0 {
        misuse("free_sized with a size larger than the block", p as usize);
    }
    // SAFETY: forwarded contract.
    unsafe { free(p) }
}

/// C11 `aligned_alloc`: an alignment that is not a power of two fails with EINVAL.
pub fn aligned_alloc(alignment: usize, size: usize) -> *mut u8 {
    if !alignment.is_power_of_two() {
        os::set_errno(libc::EINVAL);
        return ptr::null_mut();
    }
    aligned(alignment, size)
}

/// POSIX `posix_memalign`: 0, EINVAL (alignment not a power-of-two multiple of
/// `sizeof(void *)`) or ENOMEM; errno untouched; `*out` only written on success.
/// `caller` says where a sampled allocation finds its call site: this writes `*out`
/// after allocating, so the sampler cannot find it on the stack, and the entry points
/// pass it (`CallerAt`).
///
/// # Safety
/// `out` must be valid for a pointer write.
pub unsafe fn posix_memalign_for(
    out: *mut *mut c_void,
    alignment: usize,
    size: usize,
    caller: impl SampleCaller,
) -> c_int {
    if !alignment.is_power_of_two()
        || !alignment.is_multiple_of(core::mem::size_of::<*mut c_void>())
    {
        return libc::EINVAL;
    }
    let saved = os::errno();
    let p = aligned_for(alignment, size, caller);
    os::set_errno(saved);
    if p.is_null() {
        return libc::ENOMEM;
    }
    // SAFETY: the caller guarantees `out` is writable.
    unsafe { *out = p.cast() };
    0
}

/// A snapshot of the allocator's figures (all zero before initialisation).
pub fn collect_stats(out: &mut LgStats) {
    if init::ensure_initialized() {
        stats::collect(out);
    }
}

/// Prints the statistics summary on stderr.
#[cfg(feature = "override")]
pub fn print_stats() {
    if init::ensure_initialized() {
        stats::print_summary();
    }
}
