//! (feature `override`) The C allocation family under the libc names, so that a
//! preloaded or first-linked lgmalloc replaces the system allocator for the whole
//! process: `malloc`, `free` and the rest, glibc's internal `__libc_*` names, and the
//! old and newer spellings (`cfree`, `__posix_memalign`, C23 `free_sized`). Every
//! function forwards to the request layer; this file adds only the libc conventions.
//!
//! Differences from glibc, by design:
//! - `realloc(p, 0)` with `p != NULL` frees `p` and returns NULL, exactly as glibc does
//!   (the `lg_realloc` API returns a minimal block instead).
//! - `aligned_alloc` rejects an alignment that is not a power of two with EINVAL (the
//!   C17 / glibc 2.38 rule); `memalign` rounds it up to one, like glibc.
//!
//! None of these functions allocates through stdio or holds an allocator lock while
//! calling out.

use core::ffi::{c_int, c_void};
use core::ptr;

use super::c_api::posix_memalign_from;
use crate::heap::CallerAt;
use crate::os;
use crate::request::{self, MIN_ALIGN};

/// The system page size (`sysconf` reads a value the loader stored; it does not allocate).
#[inline]
fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 && (n as usize).is_power_of_two() {
        n as usize
    } else {
        os::OS_PAGE_SIZE
    }
}

/// glibc's `realloc`: `realloc(p, 0)` with a live `p` frees it and returns NULL.
/// `ret` is the program's return address (0: unknown), for a sample of the new block.
///
/// # Safety
/// As [`request::realloc`].
#[inline(always)]
unsafe fn realloc_glibc(p: *mut c_void, size: usize, ret: usize) -> *mut c_void {
    if size == 0 && !p.is_null() {
        // SAFETY: the caller gives up `p`.
        unsafe { request::free(p.cast()) };
        return ptr::null_mut();
    }
    // SAFETY: forwarded contract.
    unsafe { request::realloc_for(p.cast(), size, CallerAt(ret)).cast() }
}

/// `realloc` and `__libc_realloc`, handed the program's return address by their entry.
///
/// # Safety
/// As [`request::realloc`].
unsafe extern "C" fn realloc_from(p: *mut c_void, size: usize, ret: usize) -> *mut c_void {
    // SAFETY: forwarded contract.
    unsafe { realloc_glibc(p, size, ret) }
}

/// `reallocarray`: `realloc(p, count * size)`, ENOMEM (and `p` untouched) on overflow;
/// handed the program's return address by its entry.
///
/// # Safety
/// As [`request::realloc`].
unsafe extern "C" fn reallocarray_from(
    p: *mut c_void,
    count: usize,
    size: usize,
    ret: usize,
) -> *mut c_void {
    let Some(total) = count.checked_mul(size) else {
        os::set_errno(libc::ENOMEM);
        return ptr::null_mut();
    };
    // SAFETY: forwarded contract.
    unsafe { realloc_glibc(p, total, ret) }
}

/// Defines a C entry point that hands its own return address to `$target` as one more
/// argument, in `$reg` (see `pass_caller`).
macro_rules! entry_passing_caller {
    (
        $(#[$attr:meta])*
        $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty => $target:ident, $reg:literal
    ) => {
        $(#[$attr])*
        #[unsafe(no_mangle)]
        #[cfg_attr(all(target_arch = "x86_64", not(miri)), unsafe(naked))]
        pub unsafe extern "C" fn $name($($arg: $ty),*) -> $ret {
            pass_caller!($target($($arg),*), $reg)
        }
    };
}

entry_passing_caller!(
    /// C `realloc` with glibc's rules (`realloc(p, 0)` frees `p` and returns NULL).
    ///
    /// # Safety
    /// `p` is NULL or a live pointer from this allocator.
    realloc(p: *mut c_void, size: usize) -> *mut c_void => realloc_from, "rdx"
);

entry_passing_caller!(
    /// glibc's internal name for `realloc`.
    ///
    /// # Safety
    /// As `realloc`.
    __libc_realloc(p: *mut c_void, size: usize) -> *mut c_void => realloc_from, "rdx"
);

entry_passing_caller!(
    /// `reallocarray`: `realloc(p, count * size)`, ENOMEM (and `p` untouched) on overflow.
    ///
    /// # Safety
    /// As `realloc`.
    reallocarray(p: *mut c_void, count: usize, size: usize) -> *mut c_void
        => reallocarray_from, "rcx"
);

entry_passing_caller!(
    /// POSIX `posix_memalign`: 0, EINVAL (alignment not a power-of-two multiple of
    /// `sizeof(void *)`) or ENOMEM; errno untouched; `*out` only written on success.
    ///
    /// # Safety
    /// `out` must be valid for a pointer write.
    posix_memalign(out: *mut *mut c_void, alignment: usize, size: usize) -> c_int
        => posix_memalign_from, "rcx"
);

entry_passing_caller!(
    /// glibc's other name for `posix_memalign`.
    ///
    /// # Safety
    /// As `posix_memalign`.
    __posix_memalign(out: *mut *mut c_void, alignment: usize, size: usize) -> c_int
        => posix_memalign_from, "rcx"
);

/// glibc's `memalign`: alignments up to 16 are plain malloc, others are rounded up to a
/// power of two; one that cannot be rounded fails with EINVAL, a size too large with
/// ENOMEM.
#[inline]
fn memalign_glibc(alignment: usize, size: usize) -> *mut c_void {
    if alignment <= MIN_ALIGN {
        return request::malloc(size).cast();
    }
    if alignment > usize::MAX / 2 + 1 {
        os::set_errno(libc::EINVAL);
        return ptr::null_mut();
    }
    request::aligned(alignment.next_power_of_two(), size).cast()
}

fn valloc_impl(size: usize) -> *mut c_void {
    memalign_glibc(page_size(), size)
}

fn pvalloc_impl(size: usize) -> *mut c_void {
    let page = page_size();
    let Some(rounded) = os::align_up(size, page) else {
        os::set_errno(libc::ENOMEM);
        return ptr::null_mut();
    };
    memalign_glibc(page, rounded.max(page))
}

/// Defines a C function once and exports it under every name of its list (the libc name
/// and glibc's aliases), each a real symbol of its own, so `dlsym` and static links find
/// any of them.
macro_rules! c_exports {
    () => {};
    // One symbol per name of the list, peeled off one at a time.
    (@each [$($attrs:tt)*] [$($unsafe:tt)?] [] $params:tt [$($ret:tt)*] $body:block) => {};
    (
        @each [$($attrs:tt)*] [$($unsafe:tt)?] [$name:ident $(, $more:ident)*]
        $params:tt [$($ret:tt)*] $body:block
    ) => {
        $($attrs)*
        #[unsafe(no_mangle)]
        pub $($unsafe)? extern "C" fn $name $params $($ret)* $body
        c_exports!(@each [$($attrs)*] [$($unsafe)?] [$($more),*] $params [$($ret)*] $body);
    };
    (
        $(#[$attr:meta])*
        [$($name:ident),+] fn $params:tt $(-> $ret:ty)? $body:block
        $($rest:tt)*
    ) => {
        c_exports!(@each [$(#[$attr])*] [] [$($name),+] $params [$(-> $ret)?] $body);
        c_exports!($($rest)*);
    };
    (
        $(#[$attr:meta])*
        [$($name:ident),+] unsafe fn $params:tt $(-> $ret:ty)? $body:block
        $($rest:tt)*
    ) => {
        c_exports!(@each [$(#[$attr])*] [unsafe] [$($name),+] $params [$(-> $ret)?] $body);
        c_exports!($($rest)*);
    };
}

c_exports! {
    /// C `malloc` (and glibc's internal name).
    [malloc, __libc_malloc] fn(size: usize) -> *mut c_void {
        request::malloc(size).cast()
    }

    /// C `free` (and glibc's internal name, and the old SVID `cfree`); preserves errno.
    ///
    /// # Safety
    /// `p` is NULL or a live pointer from this allocator.
    [free, __libc_free, cfree] unsafe fn(p: *mut c_void) {
        // SAFETY: forwarded contract.
        unsafe { request::free(p.cast()) }
    }

    /// C23 `free_sized`: aborts when `size` exceeds the block.
    ///
    /// # Safety
    /// As `free`; `size` is the size requested for `p`.
    [free_sized] unsafe fn(p: *mut c_void, size: usize) {
        // SAFETY: forwarded contract.
        unsafe { request::free_sized(p.cast(), size) }
    }

    /// C23 `free_aligned_sized`.
    ///
    /// # Safety
    /// As `free`; `p` came from `aligned_alloc(alignment, size)`.
    [free_aligned_sized] unsafe fn(p: *mut c_void, _alignment: usize, size: usize) {
        // SAFETY: forwarded contract.
        unsafe { request::free_sized(p.cast(), size) }
    }

    /// C `calloc` (overflow of `count * size` fails with ENOMEM).
    [calloc, __libc_calloc] fn(count: usize, size: usize) -> *mut c_void {
        request::calloc(count, size).cast()
    }

    /// C11 `aligned_alloc`: EINVAL when `alignment` is not a power of two.
    [aligned_alloc] fn(alignment: usize, size: usize) -> *mut c_void {
        request::aligned_alloc(alignment, size).cast()
    }

    /// `memalign` with glibc's rounding of the alignment.
    [memalign, __libc_memalign] fn(alignment: usize, size: usize) -> *mut c_void {
        memalign_glibc(alignment, size)
    }

    /// `valloc`: page-aligned memory.
    [valloc, __libc_valloc] fn(size: usize) -> *mut c_void {
        valloc_impl(size)
    }

    /// `pvalloc`: page-aligned memory, size rounded up to whole pages (at least one).
    [pvalloc, __libc_pvalloc] fn(size: usize) -> *mut c_void {
        pvalloc_impl(size)
    }

    /// `malloc_usable_size`: bytes usable at `p`, 0 for NULL.
    ///
    /// # Safety
    /// `p` is NULL or a live pointer from this allocator.
    [malloc_usable_size] unsafe fn(p: *mut c_void) -> usize {
        request::usable_size(p.cast())
    }
}
