//! The public C API (`lg_*`) and the request logic it shares with the Rust
//! `GlobalAlloc` and the libc override: size checks, errno, alignment, realloc.

use core::ffi::{c_char, c_int, c_void};
use core::ptr;

use crate::chunk_map::{self, KIND_LARGE, KIND_LARGE_AT_BASE, KIND_NONE, KIND_SEGMENT};
use crate::heap;
use crate::options::misuse;
use crate::os;
use crate::segment;
use crate::size_class::{self, MAX_SMALL_SIZE, TABLE_MAX_SIZE};
use crate::stats::{self, LgStats};

/// Requests above this fail with ENOMEM, as in glibc.
const MAX_REQUEST: usize = isize::MAX as usize;
/// Alignment every block has.
pub const MIN_ALIGN: usize = 16;

// ---- shared request logic ------------------------------------------------------------------

/// `malloc`: a block of at least `size` bytes, 16-byte aligned; null + ENOMEM on failure.
#[inline(always)]
pub fn malloc(size: usize) -> *mut u8 {
    let heap = crate::tls::thread_heap();
    if size <= TABLE_MAX_SIZE {
        // SAFETY: `heap` is the calling thread's heap; the class comes from the table.
        return unsafe { heap::alloc_small(heap, size_class::class_of_table_size(size), size) };
    }
    malloc_beyond_table(heap, size)
}

#[inline(never)]
fn malloc_beyond_table(heap: *mut heap::Heap, size: usize) -> *mut u8 {
    if size <= MAX_SMALL_SIZE {
        // SAFETY: as in `malloc`.
        return unsafe { heap::alloc_small(heap, size_class::size_class_of(size), size) };
    }
    if size > MAX_REQUEST {
        os::set_errno(libc::ENOMEM);
        return ptr::null_mut();
    }
    large_alloc(size, 0)
}

fn large_alloc(size: usize, align: usize) -> *mut u8 {
    if crate::plan::verify() {
        heap::verify_record(heap::thread_heap_or_create(), size);
    }
    let p = crate::large::alloc(size, align);
    if !p.is_null() {
        stats::LARGE_ALLOCS.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
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
    let kind = chunk_map::kind_of(addr);
    if kind == KIND_SEGMENT {
        let page = segment::page_of(addr);
        // SAFETY: the chunk map says `p` lies in one of our segments.
        unsafe { heap::free_block(page, p) };
    } else {
        free_not_small(addr, kind);
    }
}

#[cold]
#[inline(never)]
fn free_not_small(addr: usize, kind: u8) {
    if addr == 0 {
        return;
    }
    let saved = os::errno();
    match kind {
        KIND_LARGE | KIND_LARGE_AT_BASE if crate::large::free(addr, kind) => {
            stats::LARGE_FREES.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
        }
        KIND_LARGE | KIND_LARGE_AT_BASE => {
            misuse("free of an invalid or already freed pointer", addr)
        }
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
    let p = malloc(total);
    if p.is_null() {
        return p;
    }
    let kind = chunk_map::kind_of(p as usize);
    // Fresh (or decommitted) large mappings read as zero already; blocks do not.
    if kind == KIND_SEGMENT || !crate::large::known_zero(p as usize, kind) {
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
            unsafe { (*segment::page_of(addr)).block_size() }
        }
        k @ (KIND_LARGE | KIND_LARGE_AT_BASE) => crate::large::usable_size(addr, k),
        _ => 0,
    }
}

/// Memory aligned to `align` (a power of two). Null + ENOMEM on failure.
pub fn aligned(align: usize, size: usize) -> *mut u8 {
    if align <= MIN_ALIGN {
        return malloc(size);
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
        if crate::plan::verify() {
            heap::verify_record(heap, size);
        }
        // SAFETY: `heap` is the calling thread's live heap.
        return unsafe { heap::alloc_small(heap, class, size) };
    }
    large_alloc(size, align)
}

/// `realloc`: resizes keeping the contents; on failure returns null and `p` stays valid.
/// `realloc(p, 0)` returns a minimal block (like mimalloc and jemalloc).
///
/// # Safety
/// `p` is null or a live pointer from lgmalloc that the caller gives up on success.
pub unsafe fn realloc(p: *mut u8, size: usize) -> *mut u8 {
    if p.is_null() {
        return malloc(size);
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
            let bs = unsafe { (*page).block_size() };
            // Keep the block when it fits and is not more than twice too big.
            if size <= bs && size.max(MIN_ALIGN) * 2 > bs {
                return p;
            }
            bs
        }
        KIND_LARGE | KIND_LARGE_AT_BASE => {
            let usable = crate::large::usable_size(addr, kind);
            if usable == 0 {
                misuse("realloc of an invalid or already freed pointer", addr);
            }
            if size > MAX_SMALL_SIZE {
                let q = crate::large::realloc_in_place_or_move(addr, kind, size);
                if !q.is_null() {
                    return q;
                }
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
    let q = malloc(want);
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
    if !crate::init::ensure_initialized() {
        return 0;
    }
    heap::collect_own();
    segment::trim() + crate::large::cache_release()
}

// ---- the C API --------------------------------------------------------------------------------

/// Allocates `size` bytes aligned to 16. Returns NULL and sets errno to ENOMEM when
/// memory is exhausted or `size` exceeds PTRDIFF_MAX. `lg_malloc(0)` returns a unique
/// pointer that must be freed.
#[unsafe(no_mangle)]
pub extern "C" fn lg_malloc(size: usize) -> *mut c_void {
    malloc(size).cast()
}

/// Allocates zeroed memory for `count` elements of `size` bytes. NULL + ENOMEM when the
/// product overflows or memory is exhausted.
#[unsafe(no_mangle)]
pub extern "C" fn lg_calloc(count: usize, size: usize) -> *mut c_void {
    calloc(count, size).cast()
}

/// Resizes `ptr` to `size` bytes, keeping its contents. `lg_realloc(NULL, n)` is
/// `lg_malloc(n)`. On failure returns NULL (errno ENOMEM) and `ptr` stays valid.
///
/// # Safety
/// `ptr` is NULL or a live pointer returned by lgmalloc.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lg_realloc(ptr: *mut c_void, size: usize) -> *mut c_void {
    // SAFETY: forwarded contract.
    unsafe { realloc(ptr.cast(), size).cast() }
}

/// Frees `ptr` (NULL is ignored). Preserves errno. Aborts with an `lgmalloc:` message
/// for a pointer lgmalloc did not return or already freed.
///
/// # Safety
/// `ptr` is NULL or a live pointer returned by lgmalloc.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lg_free(ptr: *mut c_void) {
    // SAFETY: forwarded contract.
    unsafe { free(ptr.cast()) }
}

/// Frees `ptr`, whose allocation size the caller states as `size`.
///
/// # Safety
/// As `lg_free`; `size` is the size requested when `ptr` was allocated.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lg_free_sized(ptr: *mut c_void, size: usize) {
    if !ptr.is_null() && size > usable_size(ptr.cast()) && usable_size(ptr.cast()) != 0 {
        misuse("free_sized with a size larger than the block", ptr as usize);
    }
    // SAFETY: forwarded contract.
    unsafe { free(ptr.cast()) }
}

/// Allocates `size` bytes aligned to `alignment`, which must be a power of two (else
/// NULL + EINVAL). NULL + ENOMEM when memory is exhausted.
#[unsafe(no_mangle)]
pub extern "C" fn lg_aligned_alloc(alignment: usize, size: usize) -> *mut c_void {
    if !alignment.is_power_of_two() {
        os::set_errno(libc::EINVAL);
        return ptr::null_mut();
    }
    aligned(alignment, size).cast()
}

/// POSIX `posix_memalign`: stores memory aligned to `alignment` in `*out`. Returns 0,
/// EINVAL when `alignment` is not a power of two multiple of `sizeof(void *)`, or ENOMEM.
/// errno is left unchanged.
///
/// # Safety
/// `out` must be valid for a pointer write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lg_posix_memalign(
    out: *mut *mut c_void,
    alignment: usize,
    size: usize,
) -> c_int {
    if !alignment.is_power_of_two()
        || !alignment.is_multiple_of(core::mem::size_of::<*mut c_void>())
    {
        return libc::EINVAL;
    }
    let saved = os::errno();
    let p = aligned(alignment, size);
    os::set_errno(saved);
    if p.is_null() {
        return libc::ENOMEM;
    }
    // SAFETY: the caller guarantees `out` is writable.
    unsafe { *out = p.cast() };
    0
}

/// Bytes usable at `ptr` (at least the size requested); 0 for NULL.
///
/// # Safety
/// `ptr` is NULL or a live pointer returned by lgmalloc.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lg_usable_size(ptr: *const c_void) -> usize {
    usable_size(ptr.cast())
}

/// Fills `*out` with a snapshot of the allocator's figures.
///
/// # Safety
/// `out` must be valid for writing one `struct lg_stats`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lg_stats(out: *mut LgStats) {
    if out.is_null() {
        return;
    }
    let mut s = LgStats::default();
    if crate::init::ensure_initialized() {
        stats::collect(&mut s);
    }
    // SAFETY: the caller guarantees `out` is writable.
    unsafe { out.write(s) };
}

/// Returns free memory to the OS now. Returns the number of bytes given back.
#[unsafe(no_mangle)]
pub extern "C" fn lg_trim() -> usize {
    trim()
}

/// The lgmalloc version as a NUL-terminated string, e.g. "0.1.0".
#[unsafe(no_mangle)]
pub extern "C" fn lg_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}
