//! The `lg_*` C API (declared in `include/lgmalloc.h`), also callable from Rust.
//! Each function states the C contract and forwards to the request layer.

use core::ffi::{c_char, c_int, c_void};

use crate::heap::CallerAt;
use crate::request;
use crate::stats::LgStats;

/// Allocates `size` bytes aligned to 16. Returns NULL and sets errno to ENOMEM when
/// memory is exhausted or `size` exceeds PTRDIFF_MAX. `lg_malloc(0)` returns a unique
/// pointer that must be freed.
#[unsafe(no_mangle)]
pub extern "C" fn lg_malloc(size: usize) -> *mut c_void {
    request::malloc(size).cast()
}

/// Allocates zeroed memory for `count` elements of `size` bytes. NULL + ENOMEM when the
/// product overflows or memory is exhausted.
#[unsafe(no_mangle)]
pub extern "C" fn lg_calloc(count: usize, size: usize) -> *mut c_void {
    request::calloc(count, size).cast()
}

/// Resizes `ptr` to `size` bytes, keeping its contents. `lg_realloc(NULL, n)` is
/// `lg_malloc(n)`. On failure returns NULL (errno ENOMEM) and `ptr` stays valid.
///
/// # Safety
/// `ptr` is NULL or a live pointer returned by lgmalloc.
#[unsafe(no_mangle)]
#[cfg_attr(all(target_arch = "x86_64", not(miri)), unsafe(naked))]
pub unsafe extern "C" fn lg_realloc(ptr: *mut c_void, size: usize) -> *mut c_void {
    // One definition, naked on x86-64 (see `pass_caller`), so cbindgen sees one
    // declaration.
    pass_caller!(realloc_from(ptr, size), "rdx")
}

/// `lg_realloc` handed the program's return address, for a sample of the new block
/// (see `heap::CallerAt`); 0 where it is not known.
///
/// # Safety
/// As for `lg_realloc`.
unsafe extern "C" fn realloc_from(ptr: *mut c_void, size: usize, ret: usize) -> *mut c_void {
    // SAFETY: forwarded contract.
    unsafe { request::realloc_for(ptr.cast(), size, CallerAt(ret)).cast() }
}

/// Frees `ptr` (NULL is ignored). Preserves errno. Aborts with an `lgmalloc:` message
/// for a pointer lgmalloc did not return or already freed.
///
/// # Safety
/// `ptr` is NULL or a live pointer returned by lgmalloc.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lg_free(ptr: *mut c_void) {
    // SAFETY: forwarded contract.
    unsafe { request::free(ptr.cast()) }
}

/// Frees `ptr`, whose allocation size the caller states as `size`.
///
/// # Safety
/// As `lg_free`; `size` is the size requested when `ptr` was allocated.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lg_free_sized(ptr: *mut c_void, size: usize) {
    // SAFETY: forwarded contract.
    unsafe { request::free_sized(ptr.cast(), size) }
}

/// Allocates `size` bytes aligned to `alignment`, which must be a power of two (else
/// NULL + EINVAL). NULL + ENOMEM when memory is exhausted.
#[unsafe(no_mangle)]
pub extern "C" fn lg_aligned_alloc(alignment: usize, size: usize) -> *mut c_void {
    request::aligned_alloc(alignment, size).cast()
}

/// POSIX `posix_memalign`: stores memory aligned to `alignment` in `*out`. Returns 0,
/// EINVAL when `alignment` is not a power of two multiple of `sizeof(void *)`, or ENOMEM.
/// errno is left unchanged.
///
/// # Safety
/// `out` must be valid for a pointer write.
#[unsafe(no_mangle)]
#[cfg_attr(all(target_arch = "x86_64", not(miri)), unsafe(naked))]
pub unsafe extern "C" fn lg_posix_memalign(
    out: *mut *mut c_void,
    alignment: usize,
    size: usize,
) -> c_int {
    // One definition, naked on x86-64 (see `pass_caller`).
    pass_caller!(posix_memalign_from(out, alignment, size), "rcx")
}

/// `lg_posix_memalign` (and, with the override, `posix_memalign`) handed the program's
/// return address (it writes `*out` after allocating, so a sample could not find it on
/// the stack); 0 where it is not known.
///
/// # Safety
/// As for `lg_posix_memalign`.
pub(super) unsafe extern "C" fn posix_memalign_from(
    out: *mut *mut c_void,
    alignment: usize,
    size: usize,
    ret: usize,
) -> c_int {
    // SAFETY: forwarded contract.
    unsafe { request::posix_memalign_for(out, alignment, size, CallerAt(ret)) }
}

/// Bytes usable at `ptr` (at least the size requested); 0 for NULL.
///
/// # Safety
/// `ptr` is NULL or a live pointer returned by lgmalloc.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lg_usable_size(ptr: *const c_void) -> usize {
    request::usable_size(ptr.cast())
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
    request::collect_stats(&mut s);
    // SAFETY: the caller guarantees `out` is writable.
    unsafe { out.write(s) };
}

/// Returns free memory to the OS now. Returns the number of bytes given back.
#[unsafe(no_mangle)]
pub extern "C" fn lg_trim() -> usize {
    request::trim()
}

/// The lgmalloc version as a NUL-terminated string, e.g. "0.1.0".
#[unsafe(no_mangle)]
pub extern "C" fn lg_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}
