//! The loaded ELF files a plan covers: the main program and the shared objects worth
//! analysing, with their load bias and analysis cache entry (from `dl_iterate_phdr`).

use core::ffi::{c_int, c_void};
use std::path::{Path, PathBuf};

use crate::analysis;

/// Cold analysis speed used to estimate a module's cost before trying it, in bytes of
/// code per microsecond of CPU (measured: python3.11 270, cargo 370).
const COLD_BYTES_PER_US: u64 = 250;

/// A loaded ELF file whose allocation call sites the plan covers.
pub(super) struct Module {
    pub(super) path: PathBuf,
    /// Load bias: added to the analysis's link-time addresses (PIE, shared objects).
    pub(super) bias: usize,
    /// Its analysis cache entry; `None` without a cache directory.
    pub(super) entry: Option<PathBuf>,
    /// Bytes of executable segments, to estimate the cost of a cold analysis.
    code_bytes: u64,
}

impl Module {
    pub(super) fn entry_name(&self) -> String {
        self.entry
            .as_deref()
            .and_then(Path::file_name)
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
    }

    pub(super) fn cold_cost_us(&self) -> u64 {
        self.code_bytes / COLD_BYTES_PER_US
    }
}

/// Shared objects whose allocations are the C runtime's own: few, and not the program's
/// pattern, so analysing them does not pay.
const RUNTIME_LIBRARIES: [&str; 10] = [
    "ld-linux",
    "libc.so",
    "libm.so",
    "libmvec.so",
    "libpthread.so",
    "libdl.so",
    "librt.so",
    "libgcc_s.so",
    "libutil.so",
    "linux-vdso",
];

/// The main program, then the loaded shared objects worth analysing: not the C runtime,
/// not lgmalloc's own library, and none named in `LD_PRELOAD` (tools' shims: a probe,
/// valgrind's preloads; analysing them does not pay, and would make the plan of the
/// same program differ from one tool to the next).
pub(super) fn modules_to_plan(exe: &Path) -> Vec<Module> {
    let me = modules_to_plan as *const () as usize;
    let preload = std::env::var("LD_PRELOAD").unwrap_or_default();
    let preloaded = |name: &str| {
        let file = Path::new(name).file_name();
        preload
            .split([':', ' '])
            .filter(|p| !p.is_empty())
            .any(|p| p == name || (!p.contains('/') && Some(p.as_ref()) == file))
    };
    let mut modules = Vec::new();
    for_each_module(|base, phdrs, name| {
        let (lo, hi, code_bytes) = code_range(base, phdrs);
        let path = if modules.is_empty() {
            exe.to_path_buf()
        } else {
            let own = me >= lo && me < hi;
            let file = Path::new(name).file_name().map(|f| f.to_string_lossy());
            let runtime = file.is_none_or(|f| RUNTIME_LIBRARIES.iter().any(|r| f.starts_with(r)));
            if own || runtime || !name.starts_with('/') || preloaded(name) {
                return;
            }
            PathBuf::from(name)
        };
        modules.push(Module {
            entry: analysis::cache_entry(&path),
            path,
            bias: base,
            code_bytes,
        });
    });
    modules
}

/// Start and end of a module's executable segments, and their size.
pub(super) fn code_range(base: usize, phdrs: &[libc::Elf64_Phdr]) -> (usize, usize, u64) {
    let mut lo = usize::MAX;
    let mut hi = 0;
    let mut bytes = 0;
    for ph in phdrs {
        if ph.p_type == libc::PT_LOAD && ph.p_flags & libc::PF_X != 0 {
            lo = lo.min(base + ph.p_vaddr as usize);
            hi = hi.max(base + (ph.p_vaddr + ph.p_memsz) as usize);
            bytes += ph.p_memsz;
        }
    }
    (lo, hi, bytes)
}

/// True when libgcc's unwinder can find its own frame: the main program has a
/// `PT_GNU_EH_FRAME` header (a `-static` program linked without `--eh-frame-hdr` has
/// none, and there `_Unwind_Backtrace` aborts). Shared objects always carry one.
pub(super) fn unwinder_is_safe() -> bool {
    let mut first = true;
    let mut safe = false;
    for_each_module(|_, phdrs, _| {
        if first {
            safe = phdrs.iter().any(|p| p.p_type == libc::PT_GNU_EH_FRAME);
        }
        first = false;
    });
    safe
}

/// The executable's path, from `/proc/self/exe`.
pub(super) fn executable_path() -> Option<PathBuf> {
    std::fs::read_link("/proc/self/exe").ok()
}

/// What [`for_each_module`] calls: load bias, program headers, path ("" for the main
/// program, or a name that is not a path for the vDSO).
type ModuleVisitor<'a> = &'a mut dyn FnMut(usize, &[libc::Elf64_Phdr], &str);

/// Calls `f` for each loaded module, the main program first.
pub(super) fn for_each_module(mut f: impl FnMut(usize, &[libc::Elf64_Phdr], &str)) {
    extern "C" fn visit(info: *mut libc::dl_phdr_info, _size: usize, data: *mut c_void) -> c_int {
        // SAFETY: `data` is the closure passed below; `info`, its headers and its name
        // are valid for this call.
        unsafe {
            let f = &mut *data.cast::<ModuleVisitor>();
            let info = &*info;
            let phdrs = if info.dlpi_phdr.is_null() {
                &[][..]
            } else {
                core::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize)
            };
            let name = if info.dlpi_name.is_null() {
                ""
            } else {
                core::ffi::CStr::from_ptr(info.dlpi_name)
                    .to_str()
                    .unwrap_or("")
            };
            f(info.dlpi_addr as usize, phdrs, name);
        }
        0
    }
    let mut dynf: ModuleVisitor = &mut f;
    // SAFETY: the callback only uses `data` as the closure above.
    unsafe { libc::dl_iterate_phdr(Some(visit), (&raw mut dynf).cast()) };
}
