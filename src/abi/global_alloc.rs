//! lgmalloc as Rust's global allocator.

use core::alloc::{GlobalAlloc, Layout};

use crate::request::{self, MIN_ALIGN};

/// lgmalloc as a Rust global allocator:
///
/// ```ignore
/// #[global_allocator]
/// static GLOBAL: lgmalloc::LgMalloc = lgmalloc::LgMalloc;
/// ```
pub struct LgMalloc;

// SAFETY: every method returns memory as `GlobalAlloc` requires: null on failure, at
// least `layout.size()` bytes aligned to `layout.align()`, valid until deallocated.
unsafe impl GlobalAlloc for LgMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= MIN_ALIGN {
            request::malloc(layout.size())
        } else {
            request::aligned(layout.align(), layout.size())
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator and is given up.
        unsafe { request::free(ptr) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= MIN_ALIGN {
            request::calloc(1, layout.size())
        } else {
            let p = request::aligned(layout.align(), layout.size());
            if !p.is_null() {
                // SAFETY: fresh block of at least `layout.size()` bytes.
                unsafe { core::ptr::write_bytes(p, 0, layout.size()) };
            }
            p
        }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.align() <= MIN_ALIGN {
            // SAFETY: `ptr` came from this allocator.
            return unsafe { request::realloc(ptr, new_size) };
        }
        let new = request::aligned(layout.align(), new_size);
        if !new.is_null() {
            // SAFETY: both blocks are live and distinct.
            unsafe {
                core::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                request::free(ptr);
            }
        }
        new
    }
}

#[cfg(feature = "global-allocator")]
#[global_allocator]
static GLOBAL: LgMalloc = LgMalloc;
