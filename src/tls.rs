//! Two pointer-sized thread-local slots, in the initial-exec TLS model, and the calling
//! thread's id.
//!
//! glibc requires a malloc replacement to use the initial-exec TLS model: the
//! general-dynamic model that stable Rust gives a cdylib's `thread_local!` calls
//! `__tls_get_addr`, which may itself allocate. Each slot is an 8-byte `.tdata` symbol
//! read through its GOT offset from `fs`; this marks the library `STATIC_TLS` and works
//! in a `.so`, a `.a` and a `-static` executable.
//!
//! The slots are defined by the heap layer (`heap.rs`), next to the empty heap the first
//! one starts pointing at, so the fast path needs no null check. This module only
//! reaches them, by symbol name, and knows nothing of what they point to.
//!
//! Elsewhere (Miri, other architectures) the slots are `thread_local!` cells that start
//! null ([`SLOTS_START_NULL`]); the heap layer then reads null as its empty heap.

/// True where the slots start null instead of at the empty heap.
pub const SLOTS_START_NULL: bool = cfg!(any(not(target_arch = "x86_64"), miri));

/// Reads the slot named `$slot` of the calling thread.
#[cfg(all(target_arch = "x86_64", not(miri)))]
macro_rules! read_slot {
    ($slot:literal) => {{
        let value: *mut ();
        // SAFETY: reads this thread's slot (defined in `heap.rs`); `fs` is the thread
        // pointer and the GOT entry holds the slot's offset from it.
        unsafe {
            core::arch::asm!(
                concat!("mov {v}, qword ptr [rip + ", $slot, "@GOTTPOFF]"),
                "mov {v}, qword ptr fs:[{v}]",
                v = out(reg) value,
                options(nostack, readonly, preserves_flags, pure)
            );
        }
        value
    }};
}

/// Writes `$value` into the slot named `$slot` of the calling thread.
#[cfg(all(target_arch = "x86_64", not(miri)))]
macro_rules! write_slot {
    ($slot:literal, $value:expr) => {{
        let value: *mut () = $value;
        // SAFETY: writes this thread's slot (defined in `heap.rs`).
        unsafe {
            core::arch::asm!(
                concat!("mov {t}, qword ptr [rip + ", $slot, "@GOTTPOFF]"),
                "mov qword ptr fs:[{t}], {v}",
                t = out(reg) _,
                v = in(reg) value,
                options(nostack, preserves_flags)
            );
        }
    }};
}

/// The calling thread's heap slot.
#[cfg(all(target_arch = "x86_64", not(miri)))]
#[inline(always)]
pub fn thread_heap() -> *mut () {
    read_slot!("__lgmalloc_thread_heap")
}

#[cfg(all(target_arch = "x86_64", not(miri)))]
#[inline]
pub fn set_thread_heap(heap: *mut ()) {
    write_slot!("__lgmalloc_thread_heap", heap)
}

/// The calling thread's id: its thread pointer, which the x86-64 TLS ABI keeps at
/// `fs:0` (the thread control block begins with its own address). One load and no GOT
/// entry, where a slot costs two. Unique among running threads; a thread started after
/// another exited may get the same one (its control block is reused). A multiple of 8.
#[cfg(all(target_arch = "x86_64", not(miri)))]
#[inline(always)]
pub fn thread_id() -> usize {
    let id: usize;
    // SAFETY: reads the first word of this thread's control block, present in every
    // thread (the ABI's TLS layout).
    unsafe {
        core::arch::asm!(
            "mov {v}, qword ptr fs:[0]",
            v = out(reg) id,
            options(nostack, readonly, preserves_flags, pure)
        );
    }
    id
}

/// The calling thread's second slot (verify mode's real heap).
#[cfg(all(target_arch = "x86_64", not(miri)))]
#[inline]
pub fn verify_heap() -> *mut () {
    read_slot!("__lgmalloc_verify_heap")
}

#[cfg(all(target_arch = "x86_64", not(miri)))]
#[inline]
pub fn set_verify_heap(heap: *mut ()) {
    write_slot!("__lgmalloc_verify_heap", heap)
}

#[cfg(any(not(target_arch = "x86_64"), miri))]
mod fallback {
    use core::cell::Cell;
    std::thread_local! {
        // A const-initialised Cell of a raw pointer has no destructor, so no TLS
        // destructor registration (which would call calloc) ever happens.
        pub static THREAD_HEAP: Cell<*mut ()> = const { Cell::new(core::ptr::null_mut()) };
        pub static VERIFY_HEAP: Cell<*mut ()> = const { Cell::new(core::ptr::null_mut()) };
    }
}

/// The calling thread's id: the address of its heap slot, unique among running
/// threads as the thread pointer is, and likewise a multiple of 8.
#[cfg(any(not(target_arch = "x86_64"), miri))]
#[inline(always)]
pub fn thread_id() -> usize {
    fallback::THREAD_HEAP.with(|h| core::ptr::from_ref(h).addr())
}

#[cfg(any(not(target_arch = "x86_64"), miri))]
#[inline(always)]
pub fn thread_heap() -> *mut () {
    fallback::THREAD_HEAP.with(|h| h.get())
}

#[cfg(any(not(target_arch = "x86_64"), miri))]
#[inline]
pub fn set_thread_heap(heap: *mut ()) {
    fallback::THREAD_HEAP.with(|h| h.set(heap))
}

#[cfg(any(not(target_arch = "x86_64"), miri))]
#[inline]
pub fn verify_heap() -> *mut () {
    fallback::VERIFY_HEAP.with(|h| h.get())
}

#[cfg(any(not(target_arch = "x86_64"), miri))]
#[inline]
pub fn set_verify_heap(heap: *mut ()) {
    fallback::VERIFY_HEAP.with(|h| h.set(heap))
}
