//! The faces of lgmalloc: every way a program reaches it. Each file adds only its
//! interface's conventions (names, errno rules, C++ exceptions) and forwards to the
//! request layer (`crate::request`), which holds the logic they share.
//!
//! | file | face |
//! |---|---|
//! | `c_api` | the `lg_*` C API of `include/lgmalloc.h` |
//! | `global_alloc` | `LgMalloc`, Rust's `#[global_allocator]` |
//! | `malloc_family` | (feature `override`) `malloc`, `free`, ... and glibc's aliases |
//! | `glibc_extras` | (feature `override`) `mallinfo`, `malloc_trim`, `malloc_info`, ... |
//! | `cxx_operators` | (feature `override`) C++ `operator new` / `operator delete` |

/// The body of an entry point that hands its own return address (the program's call
/// site) to `$target` as one more argument, in `$reg`, the register after its last
/// argument: on x86-64 the entry is naked and this is a `mov` and a `jmp`, so `$target`
/// runs as if the program had called it; elsewhere, and under Miri, a call passing 0.
/// An allocation `$target` makes then records that call site when it is sampled,
/// without walking the stack.
#[cfg(all(target_arch = "x86_64", not(miri)))]
macro_rules! pass_caller {
    ($target:ident($($arg:ident),*), $reg:literal) => {
        core::arch::naked_asm!(
            concat!("mov ", $reg, ", qword ptr [rsp]"),
            "jmp {target}",
            target = sym $target,
        )
    };
}

#[cfg(not(all(target_arch = "x86_64", not(miri))))]
macro_rules! pass_caller {
    ($target:ident($($arg:ident),*), $reg:literal) => {
        // SAFETY: forwarded contract; no return address known.
        unsafe { $target($($arg,)* 0) }
    };
}

pub mod c_api;
#[cfg(feature = "override")]
mod cxx_operators;
#[cfg(feature = "override")]
mod glibc_extras;
pub mod global_alloc;
#[cfg(feature = "override")]
mod malloc_family;
