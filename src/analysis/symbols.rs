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
    name.contains("lgmalloc")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_allocator_frames() {
        assert!(is_allocator_frame(
            "_ZN8lgmalloc4heap16alloc_sampled_at17h0E"
        ));
        assert!(is_allocator_frame("lg_malloc"));
        assert!(is_allocator_frame("_Znwm"));
        assert!(!is_allocator_frame("xmalloc_user"));
        assert!(!is_allocator_frame("main"));
    }
}
