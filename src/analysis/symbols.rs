//! Function names by address from an ELF file's symbol tables (`.symtab` and
//! `.dynsym`), for the profile report and for telling allocator frames from the
//! program's own when lgmalloc is linked into the program.

use std::path::Path;

/// The functions of one file: `(start, end, name)` by link-time address.
pub struct Symbols {
    funcs: Vec<(u64, u64, String)>,
}

impl Symbols {
    /// The symbols of the file at `path`; `None` for an unreadable or non-ELF file.
    pub fn read(path: &Path) -> Option<Symbols> {
        let bytes = std::fs::read(path).ok()?;
        Symbols::parse(&bytes)
    }

    /// The symbols of an ELF image; `None` when it does not parse.
    pub fn parse(bytes: &[u8]) -> Option<Symbols> {
        let elf = goblin::elf::Elf::parse(bytes).ok()?;
        let mut funcs = Vec::new();
        for (syms, names) in [(&elf.syms, &elf.strtab), (&elf.dynsyms, &elf.dynstrtab)] {
            for s in syms.iter() {
                if !s.is_function() || s.st_value == 0 || s.st_shndx == 0 {
                    continue;
                }
                if let Some(n) = names.get_at(s.st_name).filter(|n| !n.is_empty()) {
                    let end = s.st_value.saturating_add(s.st_size.max(1));
                    funcs.push((s.st_value, end, n.to_string()));
                }
            }
        }
        // Aliases: keep the shortest name (`malloc` over `__libc_malloc`).
        funcs.sort_by(|a, b| a.0.cmp(&b.0).then(a.2.len().cmp(&b.2.len())));
        funcs.dedup_by_key(|f| f.0);
        Some(Symbols { funcs })
    }

    /// The function holding the instruction that ends at return address `ret` (a
    /// link-time address): its name and start.
    pub fn caller_of(&self, ret: u64) -> Option<(&str, u64)> {
        let at = ret.checked_sub(1)?;
        let i = self.funcs.partition_point(|f| f.0 <= at).checked_sub(1)?;
        let f = self.funcs.get(i)?;
        (at < f.1).then_some((f.2.as_str(), f.0))
    }
}

/// True for the allocator's own entry points and internals: lgmalloc (Rust paths, the
/// `lg_*` API), the C allocation functions, C++ `operator new`, Rust's allocation shims.
/// A profile's call site is the first frame that is none of these.
pub fn is_allocator_frame(name: &str) -> bool {
    const C_NAMES: [&str; 12] = [
        "malloc",
        "calloc",
        "realloc",
        "free",
        "aligned_alloc",
        "posix_memalign",
        "memalign",
        "valloc",
        "pvalloc",
        "reallocarray",
        "__libc_malloc",
        "__libc_calloc",
    ];
    names_lgmalloc_path(name)
        || name.starts_with("lg_")
        || C_NAMES.contains(&name)
        || name.starts_with("_Znw")
        || name.starts_with("_Zna")
        || name.contains("__rust_alloc")
        || name.contains("__rust_realloc")
        || name.contains("__rdl_alloc")
        || name.contains("__rg_alloc")
        || name.contains("5alloc5alloc")
}

/// Whether mangled `name` is a path into the lgmalloc crate: its identifier with its
/// length, `8lgmalloc`, then the next component (legacy `_ZN8lgmalloc4heap..`, v0
/// `Cs.._8lgmalloc4heap..`), or `lgmalloc..` in a legacy generic argument
/// (`drop_in_place$LT$lgmalloc..heap..Heap$GT$`). A crate whose name only contains the
/// word (`17lgmalloc_rust_arm`) is the program's.
fn names_lgmalloc_path(name: &str) -> bool {
    const CRATE: &str = "lgmalloc";
    let b = name.as_bytes();
    name.match_indices(CRATE).any(|(i, _)| {
        let before = |k: usize| i.checked_sub(k).and_then(|j| b.get(j).copied());
        let after = b.get(i + CRATE.len()).copied();
        let identifier = before(1) == Some(b'8')
            && !before(2).is_some_and(|c| c.is_ascii_digit())
            && after.is_none_or(|c| c.is_ascii_digit() || c == b'E');
        let generic_argument = before(1) == Some(b'$')
            && b.get(i + CRATE.len()..)
                .is_some_and(|rest| rest.starts_with(b".."));
        identifier || generic_argument
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_allocator_frames() {
        assert!(is_allocator_frame(
            "_ZN8lgmalloc4heap16alloc_sampled_at17h0E"
        ));
        assert!(is_allocator_frame(
            "_RNvNtCs1a2b_8lgmalloc4heap10alloc_slow"
        ));
        assert!(is_allocator_frame(
            "_ZN4core3ptr44drop_in_place$LT$lgmalloc..heap..Heap$GT$17h0E"
        ));
        assert!(!is_allocator_frame(
            "_ZN17lgmalloc_rust_arm6worker17h466e7e59ad22d847E"
        ));
        assert!(!is_allocator_frame("_ZN18lgmalloc12345678904main17h0E"));
        assert!(!is_allocator_frame("use_lgmalloc_here"));
        assert!(is_allocator_frame("lg_malloc"));
        assert!(is_allocator_frame("_Znwm"));
        assert!(!is_allocator_frame("xmalloc_user"));
        assert!(!is_allocator_frame("main"));
    }
}
