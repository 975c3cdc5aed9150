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

pub mod c_api;
#[cfg(feature = "override")]
mod cxx_operators;
#[cfg(feature = "override")]
mod glibc_extras;
pub mod global_alloc;
#[cfg(feature = "override")]
mod malloc_family;
