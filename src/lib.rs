//! lgmalloc: a predictive memory allocator.
//!
//! The C API is in [`api`] (`lg_malloc`, `lg_free`, ...); Rust programs use [`LgMalloc`]
//! as their `#[global_allocator]`. See `ARCHITECTURE.md` for the modules, their layers and
//! the path of one malloc and one free.

#![warn(unsafe_op_in_unsafe_fn)]

pub mod analysis;
pub mod api;
mod chunk_map;
mod heap;
mod init;
mod large;
mod lock;
mod options;
pub mod os;
#[cfg(feature = "override")]
mod override_libc;
mod page;
mod plan;
mod segment;
pub mod size_class;
pub mod stats;
mod tls;

use core::alloc::{GlobalAlloc, Layout};

pub use stats::{LG_MAX_CLASSES, LgClassStats, LgStats};

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
        if layout.align() <= api::MIN_ALIGN {
            api::malloc(layout.size())
        } else {
            api::aligned(layout.align(), layout.size())
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator and is given up.
        unsafe { api::free(ptr) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= api::MIN_ALIGN {
            api::calloc(1, layout.size())
        } else {
            let p = api::aligned(layout.align(), layout.size());
            if !p.is_null() {
                // SAFETY: fresh block of at least `layout.size()` bytes.
                unsafe { core::ptr::write_bytes(p, 0, layout.size()) };
            }
            p
        }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.align() <= api::MIN_ALIGN {
            // SAFETY: `ptr` came from this allocator.
            return unsafe { api::realloc(ptr, new_size) };
        }
        let new = api::aligned(layout.align(), new_size);
        if !new.is_null() {
            // SAFETY: both blocks are live and distinct.
            unsafe {
                core::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                api::free(ptr);
            }
        }
        new
    }
}

#[cfg(feature = "global-allocator")]
#[global_allocator]
static GLOBAL: LgMalloc = LgMalloc;

/// The lock-free page protocol, for the loom models in `rust-tests/loom.rs` only.
#[cfg(loom)]
#[doc(hidden)]
pub mod loom_api {
    pub use crate::heap::Heap;
    pub use crate::page::*;
}
