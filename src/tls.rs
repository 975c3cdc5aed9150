//! The calling thread's heap pointer, in one initial-exec TLS slot.
//!
//! glibc requires a malloc replacement to use the initial-exec TLS model: the
//! general-dynamic model that stable Rust gives a cdylib's `thread_local!` calls
//! `__tls_get_addr`, which may itself allocate. One 8-byte `.tdata` slot is defined in
//! assembly and read through its GOT offset from `fs`; this marks the library
//! `STATIC_TLS` and works in a `.so`, a `.a` and a `-static` executable. The slot starts
//! pointing at the static empty heap, so the fast path needs no null check.

use crate::heap::{EMPTY_HEAP, Heap};

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
#[cfg(all(target_arch = "x86_64", not(miri)))]
#[inline(always)]
pub fn thread_heap() -> *mut Heap {
    let heap: *mut Heap;
    // SAFETY: reads this thread's slot, defined above; `fs` is the thread pointer.
    unsafe {
        core::arch::asm!(
            "mov {h}, qword ptr [rip + __lgmalloc_thread_heap@GOTTPOFF]",
            "mov {h}, qword ptr fs:[{h}]",
            h = out(reg) heap,
            options(nostack, readonly, preserves_flags, pure)
        );
    }
    heap
}

/// Makes `heap` the calling thread's heap.
#[cfg(all(target_arch = "x86_64", not(miri)))]
#[inline]
pub fn set_thread_heap(heap: *mut Heap) {
    // SAFETY: writes this thread's slot, defined above.
    unsafe {
        core::arch::asm!(
            "mov {t}, qword ptr [rip + __lgmalloc_thread_heap@GOTTPOFF]",
            "mov qword ptr fs:[{t}], {h}",
            t = out(reg) _,
            h = in(reg) heap,
            options(nostack, preserves_flags)
        );
    }
}

/// In verify mode the thread's real heap (the main slot then stays on the empty heap so
/// that every allocation reaches the slow path, where it is matched to its call site).
#[cfg(all(target_arch = "x86_64", not(miri)))]
#[inline]
pub fn verify_heap() -> *mut Heap {
    let heap: *mut Heap;
    // SAFETY: reads this thread's second slot, defined above.
    unsafe {
        core::arch::asm!(
            "mov {h}, qword ptr [rip + __lgmalloc_verify_heap@GOTTPOFF]",
            "mov {h}, qword ptr fs:[{h}]",
            h = out(reg) heap,
            options(nostack, readonly, preserves_flags)
        );
    }
    heap
}

#[cfg(all(target_arch = "x86_64", not(miri)))]
#[inline]
pub fn set_verify_heap(heap: *mut Heap) {
    // SAFETY: writes this thread's second slot, defined above.
    unsafe {
        core::arch::asm!(
            "mov {t}, qword ptr [rip + __lgmalloc_verify_heap@GOTTPOFF]",
            "mov qword ptr fs:[{t}], {h}",
            t = out(reg) _,
            h = in(reg) heap,
            options(nostack, preserves_flags)
        );
    }
}

#[cfg(any(not(target_arch = "x86_64"), miri))]
mod fallback {
    use super::Heap;
    use core::cell::Cell;
    std::thread_local! {
        // A const-initialised Cell of a raw pointer has no destructor, so no TLS
        // destructor registration (which would call calloc) ever happens.
        pub static THREAD_HEAP: Cell<*mut Heap> =
            const { Cell::new(&raw const crate::heap::EMPTY_HEAP as *mut Heap) };
        pub static VERIFY_HEAP: Cell<*mut Heap> = const { Cell::new(core::ptr::null_mut()) };
    }
}

#[cfg(any(not(target_arch = "x86_64"), miri))]
#[inline]
pub fn verify_heap() -> *mut Heap {
    fallback::VERIFY_HEAP.with(|h| h.get())
}

#[cfg(any(not(target_arch = "x86_64"), miri))]
#[inline]
pub fn set_verify_heap(heap: *mut Heap) {
    fallback::VERIFY_HEAP.with(|h| h.set(heap))
}

#[cfg(any(not(target_arch = "x86_64"), miri))]
#[inline(always)]
pub fn thread_heap() -> *mut Heap {
    fallback::THREAD_HEAP.with(|h| h.get())
}

#[cfg(any(not(target_arch = "x86_64"), miri))]
#[inline]
pub fn set_thread_heap(heap: *mut Heap) {
    fallback::THREAD_HEAP.with(|h| h.set(heap))
}
