//! lgmalloc: a predictive memory allocator.
//!
//! The C API is in [`c_api`] (`lg_malloc`, `lg_free`, ...); Rust programs use [`LgMalloc`]
//! as their `#[global_allocator]`. See `ARCHITECTURE.md` for the modules, their layers and
//! the path of one malloc and one free.

#![warn(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

/// The body of a function that hands its own return address (an entry point's: the
/// program's call site) to `$target` as one more argument, in `$reg`, the register after
/// its last argument: on x86-64 the function is naked and this is a `mov` and a `jmp`,
/// so `$target` runs as if the function's caller had called it; elsewhere, and under
/// Miri, a call passing 0. An allocation `$target` makes then records that call site
/// when it is sampled, without walking the stack. Defined here, before the modules,
/// for both the entry points (`abi`) and `heap`'s slow path of `calloc`.
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

mod abi;
pub mod analysis;
mod chunk_map;
mod diag;
mod geometry;
mod heap;
mod init;
mod large;
mod list;
mod lock;
mod options;
pub mod os;
mod page;
mod predict;
mod request;
mod sample;
mod secret;
mod segment;
mod segment_space;
pub mod size_class;
pub mod stats;
mod tls;

pub use abi::c_api;
pub use abi::global_alloc::LgMalloc;
pub use stats::{LG_MAX_CLASSES, LgClassStats, LgStats};

/// The parsers of the stored plan and observation files, for the fuzz targets only.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::predict::profile::reparse as reparse_profile;
    pub use crate::predict::store::{MAX_FILE_BYTES, reparse_learned, reparse_plan};
}

/// The sampled allocation profile (for `lgmalloc-analyze --profile` and the tests).
#[doc(hidden)]
pub mod profile {
    pub use crate::predict::profile::{
        MAX_SITES, MIN_SAMPLES_TO_MERGE, Profile, ProfileSite, SETTLED_RUNS, SitePrediction,
        location, parse, read, this_run,
    };
    pub use crate::sample::MEAN_INTERVAL;

    /// Samples this process has taken so far.
    pub fn samples_taken() -> u64 {
        crate::sample::TAKEN.load(core::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the plan gives a predicted `size` an exact-fit class (its standard class
    /// wastes more than 1/16 of a block, or 1/32 for a size the sampled profile chose)
    /// rather than sizing its standard class's first page.
    pub fn exact_fit_wanted(size: usize, from_profile: bool) -> bool {
        use crate::predict::Source;
        let source = if from_profile {
            Source::Profile
        } else {
            Source::Static
        };
        crate::predict::build::exact_fit_wanted(size, source)
    }

    /// Whether `p` is a sampled block (served from the sample arena, so it is not the
    /// block a free of the same class would hand back next).
    pub fn is_sampled(p: *const u8) -> bool {
        crate::chunk_map::kind_of(p as usize) == crate::chunk_map::KIND_SAMPLE
    }

    /// The sample arena's address space and resident bytes, as `lg_stats` counts them
    /// in `bytes_reserved` and `bytes_committed`.
    pub fn arena_figures() -> (usize, usize) {
        crate::sample::arena_figures()
    }

    /// Samples whose call site was found by unwinding the stack (the others took the
    /// return address they were handed).
    pub fn samples_unwound() -> u64 {
        crate::sample::UNWOUND.load(core::sync::atomic::Ordering::Relaxed)
    }

    /// Samples skipped because every slot of the sample arena held a live block.
    pub fn samples_skipped() -> u64 {
        crate::sample::SKIPPED.load(core::sync::atomic::Ordering::Relaxed)
    }
}

/// The lock-free page protocol, for the loom models in `rust-tests/loom.rs` only.
#[cfg(loom)]
#[doc(hidden)]
pub mod loom_api {
    pub use crate::page::*;
}
