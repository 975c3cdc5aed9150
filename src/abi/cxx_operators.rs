//! (feature `override`) The 20 Itanium C++ `operator new` and `operator delete` symbols.
//!
//! On failure `operator new` calls the current `std::new_handler` (read through a weak
//! reference to `std::get_new_handler`, so nothing is needed when libstdc++ is absent)
//! and retries while a handler is installed. With no handler, the nothrow forms return
//! NULL and the throwing forms throw `std::bad_alloc` through libstdc++'s
//! `std::__throw_bad_alloc` (weak too). Rust code cannot be unwound through (the
//! library is built with `panic = "abort"`), so on x86-64 the throwing forms are small
//! assembly functions: the exception leaves from an assembly frame with exact unwind
//! information or from a tail call, never through a Rust frame. A program without
//! libstdc++ in its global symbol scope (e.g. C++ loaded later with `dlopen`) gets
//! `lgmalloc: out of memory in operator new (<n> bytes)` and an abort instead. A
//! new-handler that throws from a *nothrow* `operator new` aborts the process (libstdc++
//! would return NULL; catching needs C++).

use core::ffi::c_void;
use core::ptr;

use crate::diag::diag;
use crate::heap::{CallerAt, CallerOnStack, SampleCaller};
use crate::request;

/// One allocation attempt for `operator new`: `align` 0 means the default alignment; an
/// alignment that is not a power of two fails.
#[inline(always)]
fn new_attempt(size: usize, align: usize) -> *mut u8 {
    new_attempt_for(size, align, CallerOnStack)
}

/// [`new_attempt`], with `caller` saying where a sampled allocation finds its call site.
#[inline(always)]
fn new_attempt_for(size: usize, align: usize, caller: impl SampleCaller) -> *mut u8 {
    if align == 0 {
        request::malloc_for(size, caller)
    } else if align.is_power_of_two() {
        request::aligned_for(align, size, caller)
    } else {
        ptr::null_mut()
    }
}

/// Address of a symbol that may be absent (0 then): a weak reference through the GOT.
#[cfg(target_arch = "x86_64")]
macro_rules! weak_symbol_address {
    ($name:literal) => {{
        let addr: usize;
        // SAFETY: loads a GOT entry the loader filled (0 for an absent weak symbol).
        unsafe {
            core::arch::asm!(
                concat!(".weak ", $name),
                concat!("mov {a}, qword ptr [rip + ", $name, "@GOTPCREL]"),
                a = out(reg) addr,
                options(nomem, nostack, preserves_flags, pure)
            );
        }
        addr
    }};
}

/// The installed `std::new_handler`, or 0 (also when libstdc++ is not loaded, or for an
/// invalid alignment, which fails at once as in libstdc++).
extern "C" fn current_new_handler(align: usize) -> usize {
    if align != 0 && !align.is_power_of_two() {
        return 0;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let get = weak_symbol_address!("_ZSt15get_new_handlerv");
        if get == 0 {
            return 0;
        }
        // SAFETY: `std::get_new_handler()` is a noexcept C++ function without arguments
        // returning a function pointer.
        let get: extern "C" fn() -> usize = unsafe { core::mem::transmute(get) };
        get()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        0
    }
}

/// No memory, no handler and no libstdc++ to throw `std::bad_alloc`.
#[cold]
extern "C" fn new_out_of_memory(size: usize) -> ! {
    diag!("lgmalloc: out of memory in operator new ({size} bytes)");
    // SAFETY: abort has no preconditions.
    unsafe { libc::abort() }
}

/// The nothrow forms' retry loop. A handler that throws aborts the process (no Rust
/// frame can be unwound through).
#[cold]
#[inline(never)]
fn new_nothrow_slow(size: usize, align: usize) -> *mut c_void {
    loop {
        let h = current_new_handler(align);
        if h == 0 {
            return ptr::null_mut();
        }
        // SAFETY: `h` is the program's `std::new_handler`, a `void (*)()`.
        let handler: extern "C-unwind" fn() = unsafe { core::mem::transmute(h) };
        handler();
        let p = new_attempt(size, align);
        if !p.is_null() {
            return p.cast();
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod throwing {
    //! The throwing `operator new` forms. Their fast path calls the allocator and returns;
    //! a failure jumps (a tail call) to `new_slow`, whose frame has exact unwind
    //! information, so a new-handler may throw through it, and which finally tail-calls
    //! `std::__throw_bad_alloc()`: the exception starts as if the caller of
    //! `operator new` had called it.

    use super::{current_new_handler, new_attempt, new_out_of_memory};
    use core::arch::naked_asm;
    use core::ffi::c_void;

    extern "C" fn attempt(size: usize, align: usize) -> *mut u8 {
        new_attempt(size, align)
    }

    /// An aligned `operator new`'s attempt, handed the program's return address (`ret`)
    /// by its entry, which pushes three words before the call: a sampled allocation
    /// records the call site without walking the stack.
    extern "C" fn attempt_aligned(size: usize, align: usize, ret: usize) -> *mut u8 {
        super::new_attempt_for(size, align, crate::heap::CallerAt(ret))
    }

    /// `operator new(size)`'s attempt: called by it with its argument pushed, so a
    /// sampled allocation finds the program's return address two words up the stack
    /// (`heap::CallerOfNew`) and records the call site without walking the stack.
    extern "C" fn attempt_default(size: usize) -> *mut u8 {
        crate::request::malloc_for(size, crate::heap::CallerOfNew)
    }

    /// `new_slow`'s epilogue before it leaves (by `ret` or a tail jump): pops what its
    /// prologue pushed, remembering the unwind state for the code after the exit.
    macro_rules! restore_saved {
        () => {
            concat!(
                ".cfi_remember_state\n",
                "pop rcx\n",
                ".cfi_adjust_cfa_offset -8\n",
                "pop r12\n",
                ".cfi_adjust_cfa_offset -8\n",
                ".cfi_restore r12\n",
                "pop rbx\n",
                ".cfi_adjust_cfa_offset -8\n",
                ".cfi_restore rbx",
            )
        };
    }

    /// `new_slow(size, align)`, entered by a jump from an `operator new` with the
    /// caller's return address on the stack.
    #[unsafe(naked)]
    unsafe extern "C" fn new_slow(size: usize, align: usize) -> *mut c_void {
        naked_asm!(
            ".cfi_startproc",
            "push rbx",
            ".cfi_adjust_cfa_offset 8",
            ".cfi_offset rbx, -16",
            "push r12",
            ".cfi_adjust_cfa_offset 8",
            ".cfi_offset r12, -24",
            "push rax",
            ".cfi_adjust_cfa_offset 8",
            "mov rbx, rdi",
            "mov r12, rsi",
            "2:",
            "mov rdi, r12",
            "call {handler}",
            "test rax, rax",
            "jz 3f",
            // The handler may throw: this frame unwinds by its CFI.
            "call rax",
            "mov rdi, rbx",
            "mov rsi, r12",
            "call {attempt}",
            "test rax, rax",
            "jz 2b",
            restore_saved!(),
            "ret",
            ".cfi_restore_state",
            "3:",
            ".weak _ZSt17__throw_bad_allocv",
            "mov rax, qword ptr [rip + _ZSt17__throw_bad_allocv@GOTPCREL]",
            "test rax, rax",
            "jz 4f",
            restore_saved!(),
            "jmp rax",
            ".cfi_restore_state",
            "4:",
            "mov rdi, rbx",
            "call {oom}",
            "ud2",
            ".cfi_endproc",
            handler = sym current_new_handler,
            attempt = sym attempt,
            oom = sym new_out_of_memory,
        )
    }

    /// A throwing `operator new`: save the argument registers, try to allocate, restore
    /// them; on failure set up `new_slow`'s arguments and jump there.
    macro_rules! throwing_new {
        (
            $rust:ident, $sym:literal, $what:literal, ($($arg:ident: $ty:ty),*), $attempt:path,
            save [$($save:literal),*], restore [$($restore:literal),*],
            before_slow [$($before_slow:literal),*]
        ) => {
            #[doc = concat!("C++ `", $sym, "` (throwing ", $what, ").")]
            #[unsafe(naked)]
            #[unsafe(export_name = $sym)]
            pub unsafe extern "C" fn $rust($($arg: $ty),*) -> *mut c_void {
                naked_asm!(
                    ".cfi_startproc",
                    $($save,)*
                    "call {attempt}",
                    $($restore,)*
                    "test rax, rax",
                    "jz 2f",
                    "ret",
                    "2:",
                    $($before_slow,)*
                    "jmp {slow}",
                    ".cfi_endproc",
                    attempt = sym $attempt,
                    slow = sym new_slow,
                )
            }
        };
    }

    /// `operator new(size)`: only `rdi` to keep (one word, which `heap::CallerOfNew`
    /// counts on); the slow path gets alignment 0.
    macro_rules! new_default {
        ($rust:ident, $sym:literal) => {
            throwing_new!(
                $rust, $sym, "`operator new`", (size: usize), attempt_default,
                save ["push rdi", ".cfi_adjust_cfa_offset 8"],
                restore ["pop rdi", ".cfi_adjust_cfa_offset -8"],
                before_slow ["xor esi, esi"]
            );
        };
    }

    /// `operator new(size, align)`: `rdi` and `rsi` to keep (and `rax` pushed to keep the
    /// stack 16-byte aligned at the call); the attempt gets the return address in `rdx`.
    macro_rules! new_aligned {
        ($rust:ident, $sym:literal) => {
            throwing_new!(
                $rust, $sym, "aligned `operator new`", (size: usize, align: usize),
                attempt_aligned,
                save [
                    "mov rdx, qword ptr [rsp]",
                    "push rdi", ".cfi_adjust_cfa_offset 8",
                    "push rsi", ".cfi_adjust_cfa_offset 8",
                    "push rax", ".cfi_adjust_cfa_offset 8"
                ],
                restore [
                    "pop rcx", ".cfi_adjust_cfa_offset -8",
                    "pop rsi", ".cfi_adjust_cfa_offset -8",
                    "pop rdi", ".cfi_adjust_cfa_offset -8"
                ],
                before_slow []
            );
        };
    }

    new_default!(op_new, "_Znwm");
    new_default!(op_new_array, "_Znam");
    new_aligned!(op_new_aligned, "_ZnwmSt11align_val_t");
    new_aligned!(op_new_array_aligned, "_ZnamSt11align_val_t");
}

#[cfg(not(target_arch = "x86_64"))]
mod throwing {
    //! Elsewhere the throwing forms cannot throw: they abort with a message.

    use super::{new_attempt, new_nothrow_slow, new_out_of_memory};
    use core::ffi::c_void;

    fn new_or_abort(size: usize, align: usize) -> *mut c_void {
        let p = new_attempt(size, align);
        if !p.is_null() {
            return p.cast();
        }
        let p = new_nothrow_slow(size, align);
        if p.is_null() {
            new_out_of_memory(size)
        }
        p
    }

    /// C++ `operator new(size_t)`.
    #[unsafe(export_name = "_Znwm")]
    pub extern "C" fn op_new(size: usize) -> *mut c_void {
        new_or_abort(size, 0)
    }
    /// C++ `operator new[](size_t)`.
    #[unsafe(export_name = "_Znam")]
    pub extern "C" fn op_new_array(size: usize) -> *mut c_void {
        new_or_abort(size, 0)
    }
    /// C++ `operator new(size_t, align_val_t)`.
    #[unsafe(export_name = "_ZnwmSt11align_val_t")]
    pub extern "C" fn op_new_aligned(size: usize, align: usize) -> *mut c_void {
        new_or_abort(size, align)
    }
    /// C++ `operator new[](size_t, align_val_t)`.
    #[unsafe(export_name = "_ZnamSt11align_val_t")]
    pub extern "C" fn op_new_array_aligned(size: usize, align: usize) -> *mut c_void {
        new_or_abort(size, align)
    }
}

/// The nothrow `operator new(size_t)` forms, handed the program's return address by
/// their entry (they call the allocator and check for failure, so the sampler could not
/// find it on the stack).
///
/// # Safety
/// None: it is `unsafe` only so that every entry's fallback body (`pass_caller`) calls
/// its target the same way.
unsafe extern "C" fn new_nothrow_from(size: usize, _nt: *const c_void, ret: usize) -> *mut c_void {
    new_nothrow_at(size, 0, ret)
}

/// C++ `operator new(size_t, const nothrow_t&)`.
#[unsafe(export_name = "_ZnwmRKSt9nothrow_t")]
#[cfg_attr(all(target_arch = "x86_64", not(miri)), unsafe(naked))]
pub extern "C" fn op_new_nothrow(size: usize, nt: *const c_void) -> *mut c_void {
    pass_caller!(new_nothrow_from(size, nt), "rdx")
}

/// C++ `operator new[](size_t, const nothrow_t&)`.
#[unsafe(export_name = "_ZnamRKSt9nothrow_t")]
#[cfg_attr(all(target_arch = "x86_64", not(miri)), unsafe(naked))]
pub extern "C" fn op_new_array_nothrow(size: usize, nt: *const c_void) -> *mut c_void {
    pass_caller!(new_nothrow_from(size, nt), "rdx")
}

/// The nothrow `operator new(size_t, align_val_t)` forms, handed the program's return
/// address by their entry, as [`new_nothrow_from`].
///
/// # Safety
/// None, as for [`new_nothrow_from`].
unsafe extern "C" fn new_aligned_nothrow_from(
    size: usize,
    align: usize,
    _nt: *const c_void,
    ret: usize,
) -> *mut c_void {
    new_nothrow_at(size, align, ret)
}

/// A nothrow `operator new` told the program's return address `ret` (0 if unknown).
#[inline(always)]
fn new_nothrow_at(size: usize, align: usize, ret: usize) -> *mut c_void {
    let p = new_attempt_for(size, align, CallerAt(ret));
    if !p.is_null() {
        return p.cast();
    }
    new_nothrow_slow(size, align)
}

/// C++ `operator new(size_t, align_val_t, const nothrow_t&)`.
#[unsafe(export_name = "_ZnwmSt11align_val_tRKSt9nothrow_t")]
#[cfg_attr(all(target_arch = "x86_64", not(miri)), unsafe(naked))]
pub extern "C" fn op_new_aligned_nothrow(
    size: usize,
    align: usize,
    nt: *const c_void,
) -> *mut c_void {
    pass_caller!(new_aligned_nothrow_from(size, align, nt), "rcx")
}

/// C++ `operator new[](size_t, align_val_t, const nothrow_t&)`.
#[unsafe(export_name = "_ZnamSt11align_val_tRKSt9nothrow_t")]
#[cfg_attr(all(target_arch = "x86_64", not(miri)), unsafe(naked))]
pub extern "C" fn op_new_array_aligned_nothrow(
    size: usize,
    align: usize,
    nt: *const c_void,
) -> *mut c_void {
    pass_caller!(new_aligned_nothrow_from(size, align, nt), "rcx")
}

/// Defines `operator delete` forms: every one frees its first argument.
macro_rules! operator_delete {
    ($($rust:ident, $sym:literal, ($($arg:ident: $ty:ty),*);)*) => {$(
        #[doc = concat!("C++ `", $sym, "` (`operator delete`).")]
        ///
        /// # Safety
        /// `p` is NULL or a live pointer from this allocator.
        #[unsafe(export_name = $sym)]
        pub unsafe extern "C" fn $rust(p: *mut c_void $(, $arg: $ty)*) {
            // SAFETY: forwarded contract.
            unsafe { request::free(p.cast()) }
        }
    )*};
}

operator_delete! {
    op_delete, "_ZdlPv", ();
    op_delete_array, "_ZdaPv", ();
    op_delete_sized, "_ZdlPvm", (_size: usize);
    op_delete_array_sized, "_ZdaPvm", (_size: usize);
    op_delete_aligned, "_ZdlPvSt11align_val_t", (_align: usize);
    op_delete_array_aligned, "_ZdaPvSt11align_val_t", (_align: usize);
    op_delete_sized_aligned, "_ZdlPvmSt11align_val_t", (_size: usize, _align: usize);
    op_delete_array_sized_aligned, "_ZdaPvmSt11align_val_t", (_size: usize, _align: usize);
    op_delete_nothrow, "_ZdlPvRKSt9nothrow_t", (_nt: *const c_void);
    op_delete_array_nothrow, "_ZdaPvRKSt9nothrow_t", (_nt: *const c_void);
    op_delete_aligned_nothrow, "_ZdlPvSt11align_val_tRKSt9nothrow_t", (_align: usize, _nt: *const c_void);
    op_delete_array_aligned_nothrow, "_ZdaPvSt11align_val_tRKSt9nothrow_t", (_align: usize, _nt: *const c_void);
}
