//! The allocation functions the analysis knows by name, and where each receives its size.

use iced_x86::Register;

/// An integer argument register of the System V x86-64 calling convention.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ArgReg {
    Rdi,
    Rsi,
    Rdx,
    Rcx,
    R8,
    R9,
}

impl ArgReg {
    /// All argument registers in parameter order.
    pub const ALL: [ArgReg; 6] = [
        ArgReg::Rdi,
        ArgReg::Rsi,
        ArgReg::Rdx,
        ArgReg::Rcx,
        ArgReg::R8,
        ArgReg::R9,
    ];

    /// The assembler name (`"rdi"`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Rdi => "rdi",
            Self::Rsi => "rsi",
            Self::Rdx => "rdx",
            Self::Rcx => "rcx",
            Self::R8 => "r8",
            Self::R9 => "r9",
        }
    }

    pub(crate) fn register(self) -> Register {
        match self {
            Self::Rdi => Register::RDI,
            Self::Rsi => Register::RSI,
            Self::Rdx => Register::RDX,
            Self::Rcx => Register::RCX,
            Self::R8 => Register::R8,
            Self::R9 => Register::R9,
        }
    }

    /// The argument register whose full (64-bit) register is `reg`.
    pub(crate) fn from_register(reg: Register) -> Option<ArgReg> {
        Self::ALL.into_iter().find(|a| a.register() == reg)
    }

    pub(crate) fn index(self) -> u8 {
        self as u8
    }

    pub(crate) fn from_index(i: u8) -> Option<ArgReg> {
        Self::ALL.get(usize::from(i)).copied()
    }
}

/// Where a function receives the number of bytes it allocates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SizeArg {
    /// One register holds the size.
    Reg(ArgReg),
    /// The size is the product of two registers (calloc: count * size).
    Product(ArgReg, ArgReg),
}

impl SizeArg {
    /// `"rdi"` or `"rdi*rsi"`.
    pub fn describe(self) -> String {
        match self {
            Self::Reg(r) => r.name().to_string(),
            Self::Product(a, b) => format!("{}*{}", a.name(), b.name()),
        }
    }
}

/// The allocation functions recognised by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AllocFn {
    Malloc,
    Calloc,
    Realloc,
    ReallocArray,
    AlignedAlloc,
    PosixMemalign,
    Memalign,
    Valloc,
    Pvalloc,
    /// `operator new(size_t)`
    New,
    /// `operator new[](size_t)`
    NewArray,
    NewNothrow,
    NewArrayNothrow,
    NewAligned,
    NewArrayAligned,
    NewAlignedNothrow,
    NewArrayAlignedNothrow,
    RustAlloc,
    RustAllocZeroed,
    RustRealloc,
    LgMalloc,
    LgCalloc,
    LgRealloc,
    LgAlignedAlloc,
    LgPosixMemalign,
}

use AllocFn as F;
use ArgReg::{Rcx, Rdi, Rdx, Rsi};

/// Exact symbol names (after any `@VERSION` suffix is removed), aliases included.
const EXACT: &[(&str, AllocFn)] = &[
    ("malloc", F::Malloc),
    ("__libc_malloc", F::Malloc),
    ("calloc", F::Calloc),
    ("__libc_calloc", F::Calloc),
    ("realloc", F::Realloc),
    ("__libc_realloc", F::Realloc),
    ("reallocarray", F::ReallocArray),
    ("__libc_reallocarray", F::ReallocArray),
    ("aligned_alloc", F::AlignedAlloc),
    ("__libc_aligned_alloc", F::AlignedAlloc),
    ("posix_memalign", F::PosixMemalign),
    ("__posix_memalign", F::PosixMemalign),
    ("memalign", F::Memalign),
    ("__libc_memalign", F::Memalign),
    ("__memalign", F::Memalign),
    ("valloc", F::Valloc),
    ("__libc_valloc", F::Valloc),
    ("__valloc", F::Valloc),
    ("pvalloc", F::Pvalloc),
    ("__libc_pvalloc", F::Pvalloc),
    ("_Znwm", F::New),
    ("_Znam", F::NewArray),
    ("_ZnwmRKSt9nothrow_t", F::NewNothrow),
    ("_ZnamRKSt9nothrow_t", F::NewArrayNothrow),
    ("_ZnwmSt11align_val_t", F::NewAligned),
    ("_ZnamSt11align_val_t", F::NewArrayAligned),
    ("_ZnwmSt11align_val_tRKSt9nothrow_t", F::NewAlignedNothrow),
    (
        "_ZnamSt11align_val_tRKSt9nothrow_t",
        F::NewArrayAlignedNothrow,
    ),
    ("__rust_alloc", F::RustAlloc),
    ("__rust_alloc_zeroed", F::RustAllocZeroed),
    ("__rust_realloc", F::RustRealloc),
    ("lg_malloc", F::LgMalloc),
    ("lg_calloc", F::LgCalloc),
    ("lg_realloc", F::LgRealloc),
    ("lg_aligned_alloc", F::LgAlignedAlloc),
    ("lg_posix_memalign", F::LgPosixMemalign),
];

/// Rust's allocator shims carry a crate hash in their mangled names
/// (`_RNvCs..._7___rustc12___rust_alloc`, legacy `_ZN..12__rust_alloc17h..E`), so they are
/// matched by a marker that must end the name or be followed by a legacy hash.
const RUST_MARKERS: &[(&str, AllocFn)] = &[
    ("__rust_alloc_zeroed", F::RustAllocZeroed),
    ("__rust_alloc", F::RustAlloc),
    ("__rust_realloc", F::RustRealloc),
];

impl AllocFn {
    /// The canonical symbol name.
    pub fn name(self) -> &'static str {
        EXACT
            .iter()
            .find(|(_, f)| *f == self)
            .map_or("?", |(name, _)| name)
    }

    /// Where the function receives its size.
    pub fn size_arg(self) -> SizeArg {
        match self {
            F::Malloc | F::Valloc | F::Pvalloc | F::LgMalloc => SizeArg::Reg(Rdi),
            F::New | F::NewArray | F::NewNothrow | F::NewArrayNothrow => SizeArg::Reg(Rdi),
            F::NewAligned | F::NewArrayAligned => SizeArg::Reg(Rdi),
            F::NewAlignedNothrow | F::NewArrayAlignedNothrow => SizeArg::Reg(Rdi),
            F::RustAlloc | F::RustAllocZeroed => SizeArg::Reg(Rdi),
            F::Calloc | F::LgCalloc => SizeArg::Product(Rdi, Rsi),
            F::Realloc | F::LgRealloc => SizeArg::Reg(Rsi),
            F::AlignedAlloc | F::Memalign | F::LgAlignedAlloc => SizeArg::Reg(Rsi),
            F::ReallocArray => SizeArg::Product(Rsi, Rdx),
            F::PosixMemalign | F::LgPosixMemalign => SizeArg::Reg(Rdx),
            // __rust_realloc(ptr, old_size, align, new_size)
            F::RustRealloc => SizeArg::Reg(Rcx),
        }
    }

    /// Stable small number for the cache file.
    pub(crate) fn code(self) -> u8 {
        ALL.iter().position(|f| *f == self).map_or(0, |i| i as u8)
    }

    pub(crate) fn from_code(c: u8) -> Option<AllocFn> {
        ALL.get(usize::from(c)).copied()
    }

    /// Recognises a symbol name; `name` may carry an `@VERSION` or `@@VERSION` suffix.
    pub fn from_symbol(name: &[u8]) -> Option<AllocFn> {
        let base = match name.iter().position(|&b| b == b'@') {
            Some(at) => name.get(..at)?,
            None => name,
        };
        if let Some((_, f)) = EXACT.iter().find(|(n, _)| n.as_bytes() == base) {
            return Some(*f);
        }
        rust_marker(base)
    }
}

const ALL: [AllocFn; 25] = [
    F::Malloc,
    F::Calloc,
    F::Realloc,
    F::ReallocArray,
    F::AlignedAlloc,
    F::PosixMemalign,
    F::Memalign,
    F::Valloc,
    F::Pvalloc,
    F::New,
    F::NewArray,
    F::NewNothrow,
    F::NewArrayNothrow,
    F::NewAligned,
    F::NewArrayAligned,
    F::NewAlignedNothrow,
    F::NewArrayAlignedNothrow,
    F::RustAlloc,
    F::RustAllocZeroed,
    F::RustRealloc,
    F::LgMalloc,
    F::LgCalloc,
    F::LgRealloc,
    F::LgAlignedAlloc,
    F::LgPosixMemalign,
];

fn rust_marker(name: &[u8]) -> Option<AllocFn> {
    // The marker ends the name, or is followed by `E` or a legacy hash
    // (`17h0123456789abcdefE`): only three places to look, whatever the name's length.
    for (marker, f) in RUST_MARKERS {
        let m = marker.as_bytes();
        for tail in [0usize, 1, 20] {
            let Some(end) = name.len().checked_sub(tail) else {
                continue;
            };
            let Some(start) = end.checked_sub(m.len()) else {
                continue;
            };
            let rest = name.get(end..).unwrap_or_default();
            let rest_ok = match tail {
                0 => true,
                1 => rest == b"E",
                _ => rest.starts_with(b"17h") && rest.ends_with(b"E"),
            };
            if rest_ok && name.get(start..end) == Some(m) {
                return Some(*f);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(AllocFn::from_symbol(b"malloc"), Some(F::Malloc));
        assert_eq!(AllocFn::from_symbol(b"malloc@GLIBC_2.2.5"), Some(F::Malloc));
        assert_eq!(AllocFn::from_symbol(b"__libc_malloc"), Some(F::Malloc));
        assert_eq!(AllocFn::from_symbol(b"mallocx"), None);
        assert_eq!(
            AllocFn::from_symbol(b"_RNvCsdZExvAaxgia_7___rustc12___rust_alloc"),
            Some(F::RustAlloc)
        );
        assert_eq!(
            AllocFn::from_symbol(b"_RNvCsdZExvAaxgia_7___rustc19___rust_alloc_zeroed"),
            Some(F::RustAllocZeroed)
        );
        assert_eq!(
            AllocFn::from_symbol(b"_RNvCsdZExvAaxgia_7___rustc14___rust_dealloc"),
            None
        );
        assert_eq!(AllocFn::from_symbol(b"__rust_alloc_error_handler"), None);
        assert_eq!(AllocFn::from_symbol(b"_Znwm"), Some(F::New));
        assert_eq!(
            AllocFn::from_symbol(b"_ZN5alloc5alloc12__rust_alloc17h0123456789abcdefE"),
            Some(F::RustAlloc)
        );
        assert_eq!(
            AllocFn::from_symbol(b"_ZN3foo14__rust_realloc17h0123456789abcdefE"),
            Some(F::RustRealloc)
        );
        assert_eq!(
            AllocFn::from_symbol(b"__rust_alloc_zeroed"),
            Some(F::RustAllocZeroed)
        );
        assert_eq!(AllocFn::from_symbol(b"x__rust_allocE"), Some(F::RustAlloc));
        for f in ALL {
            assert_eq!(AllocFn::from_code(f.code()), Some(f));
            assert_eq!(AllocFn::from_symbol(f.name().as_bytes()), Some(f));
        }
    }
}
