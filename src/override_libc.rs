//! The libc and C++ allocation family, exported with the `override` feature.
//!
//! With `--features override` the library defines `malloc`, `free` and the rest of the
//! glibc family (including the `__libc_*` aliases and the statistics calls a `-static`
//! program would otherwise pull from glibc's `malloc.o`) and the 20 Itanium C++
//! `operator new`/`operator delete` symbols. Preloaded (`LD_PRELOAD`) or linked first,
//! it replaces the system allocator for the whole process. Every function forwards to
//! the request logic in [`crate::api`]; this module only adds the libc conventions.
//!
//! Differences from glibc, by design:
//! - `realloc(p, 0)` with `p != NULL` frees `p` and returns NULL, exactly as glibc does
//!   (the `lg_realloc` API returns a minimal block instead).
//! - `aligned_alloc` rejects an alignment that is not a power of two with EINVAL (the
//!   C17 / glibc 2.38 rule); `memalign` rounds it up to one, like glibc.
//! - `mallopt` accepts the parameters of `<malloc.h>` and ignores their values.
//! - `mallinfo`/`mallinfo2` report lgmalloc's own figures in glibc's fields (see
//!   [`fill_mallinfo`]); fields glibc fills from its free lists that have no
//!   lgmalloc counterpart are 0.
//!
//! C++ `operator new`: on failure the current `std::new_handler` (read through a weak
//! reference to `std::get_new_handler`, so nothing is needed when libstdc++ is absent)
//! is called and the allocation retried while a handler is installed. With no handler,
//! the nothrow forms return NULL and the throwing forms throw `std::bad_alloc` through
//! libstdc++'s `std::__throw_bad_alloc` (weak too). Rust code cannot be unwound through
//! (the library is built with `panic = "abort"`), so on x86-64 the throwing forms are
//! small assembly functions: the exception leaves from an assembly frame with exact
//! unwind information or from a tail call, never through a Rust frame. A program without
//! libstdc++ in its global symbol scope (e.g. C++ loaded later with `dlopen`) gets
//! `lgmalloc: out of memory in operator new (<n> bytes)` and an abort instead. A
//! new-handler that throws from a *nothrow* `operator new` aborts the process (libstdc++
//! would return NULL; catching needs C++).
//!
//! None of these functions allocates through stdio or holds an allocator lock while
//! calling out (`malloc_info` formats into a fixed buffer and calls `fwrite`).

use core::ffi::{c_int, c_void};
use core::fmt::Write;
use core::ptr;

use crate::api::{self, MIN_ALIGN};
use crate::options::Message;
use crate::os;
use crate::stats::{self, LgStats};

// ---- shared helpers ----------------------------------------------------------------------

/// The system page size (`sysconf` reads a value the loader stored; it does not allocate).
#[inline]
fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 && (n as usize).is_power_of_two() {
        n as usize
    } else {
        os::OS_PAGE_SIZE
    }
}

/// glibc's `realloc`: `realloc(p, 0)` with a live `p` frees it and returns NULL.
///
/// # Safety
/// As [`api::realloc`].
#[inline(always)]
unsafe fn realloc_glibc(p: *mut c_void, size: usize) -> *mut c_void {
    if size == 0 && !p.is_null() {
        // SAFETY: the caller gives up `p`.
        unsafe { api::free(p.cast()) };
        return ptr::null_mut();
    }
    // SAFETY: forwarded contract.
    unsafe { api::realloc(p.cast(), size).cast() }
}

/// glibc's `memalign`: alignments up to 16 are plain malloc, others are rounded up to a
/// power of two; one that cannot be rounded fails with EINVAL, a size too large with
/// ENOMEM.
#[inline]
fn memalign_glibc(alignment: usize, size: usize) -> *mut c_void {
    if alignment <= MIN_ALIGN {
        return api::malloc(size).cast();
    }
    if alignment > usize::MAX / 2 + 1 {
        os::set_errno(libc::EINVAL);
        return ptr::null_mut();
    }
    api::aligned(alignment.next_power_of_two(), size).cast()
}

fn valloc_impl(size: usize) -> *mut c_void {
    memalign_glibc(page_size(), size)
}

fn pvalloc_impl(size: usize) -> *mut c_void {
    let page = page_size();
    let Some(rounded) = os::align_up(size, page) else {
        os::set_errno(libc::ENOMEM);
        return ptr::null_mut();
    };
    memalign_glibc(page, rounded.max(page))
}

// ---- the C allocation family -------------------------------------------------------------

/// C `malloc`.
#[unsafe(no_mangle)]
pub extern "C" fn malloc(size: usize) -> *mut c_void {
    api::malloc(size).cast()
}

/// glibc's internal name of `malloc`.
#[unsafe(no_mangle)]
pub extern "C" fn __libc_malloc(size: usize) -> *mut c_void {
    api::malloc(size).cast()
}

/// C `free`; preserves errno.
///
/// # Safety
/// `p` is NULL or a live pointer from this allocator.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn free(p: *mut c_void) {
    // SAFETY: forwarded contract.
    unsafe { api::free(p.cast()) }
}

/// glibc's internal name of `free`.
///
/// # Safety
/// As [`free`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __libc_free(p: *mut c_void) {
    // SAFETY: forwarded contract.
    unsafe { api::free(p.cast()) }
}

/// The old SVID name of `free`.
///
/// # Safety
/// As [`free`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cfree(p: *mut c_void) {
    // SAFETY: forwarded contract.
    unsafe { api::free(p.cast()) }
}

/// C23 `free_sized`: aborts when `size` exceeds the block.
///
/// # Safety
/// As [`free`]; `size` is the size requested for `p`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn free_sized(p: *mut c_void, size: usize) {
    // SAFETY: forwarded contract.
    unsafe { api::lg_free_sized(p, size) }
}

/// C23 `free_aligned_sized`.
///
/// # Safety
/// As [`free`]; `p` came from `aligned_alloc(alignment, size)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn free_aligned_sized(p: *mut c_void, _alignment: usize, size: usize) {
    // SAFETY: forwarded contract.
    unsafe { api::lg_free_sized(p, size) }
}

/// C `calloc` (overflow of `count * size` fails with ENOMEM).
#[unsafe(no_mangle)]
pub extern "C" fn calloc(count: usize, size: usize) -> *mut c_void {
    api::calloc(count, size).cast()
}

/// glibc's internal name of `calloc`.
#[unsafe(no_mangle)]
pub extern "C" fn __libc_calloc(count: usize, size: usize) -> *mut c_void {
    api::calloc(count, size).cast()
}

/// C `realloc` with glibc's rules (`realloc(p, 0)` frees `p` and returns NULL).
///
/// # Safety
/// `p` is NULL or a live pointer from this allocator.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn realloc(p: *mut c_void, size: usize) -> *mut c_void {
    // SAFETY: forwarded contract.
    unsafe { realloc_glibc(p, size) }
}

/// glibc's internal name of `realloc`.
///
/// # Safety
/// As [`realloc`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __libc_realloc(p: *mut c_void, size: usize) -> *mut c_void {
    // SAFETY: forwarded contract.
    unsafe { realloc_glibc(p, size) }
}

/// `reallocarray`: `realloc(p, count * size)`, ENOMEM (and `p` untouched) on overflow.
///
/// # Safety
/// As [`realloc`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn reallocarray(p: *mut c_void, count: usize, size: usize) -> *mut c_void {
    let Some(total) = count.checked_mul(size) else {
        os::set_errno(libc::ENOMEM);
        return ptr::null_mut();
    };
    // SAFETY: forwarded contract.
    unsafe { realloc_glibc(p, total) }
}

/// POSIX `posix_memalign`: 0, EINVAL (alignment not a power-of-two multiple of
/// `sizeof(void *)`) or ENOMEM; errno untouched; `*out` only written on success.
///
/// # Safety
/// `out` must be valid for a pointer write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn posix_memalign(
    out: *mut *mut c_void,
    alignment: usize,
    size: usize,
) -> c_int {
    // SAFETY: forwarded contract.
    unsafe { api::lg_posix_memalign(out, alignment, size) }
}

/// glibc's internal name of `posix_memalign`.
///
/// # Safety
/// As [`posix_memalign`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __posix_memalign(
    out: *mut *mut c_void,
    alignment: usize,
    size: usize,
) -> c_int {
    // SAFETY: forwarded contract.
    unsafe { api::lg_posix_memalign(out, alignment, size) }
}

/// C11 `aligned_alloc`: EINVAL when `alignment` is not a power of two.
#[unsafe(no_mangle)]
pub extern "C" fn aligned_alloc(alignment: usize, size: usize) -> *mut c_void {
    api::lg_aligned_alloc(alignment, size)
}

/// `memalign` with glibc's rounding of the alignment.
#[unsafe(no_mangle)]
pub extern "C" fn memalign(alignment: usize, size: usize) -> *mut c_void {
    memalign_glibc(alignment, size)
}

/// glibc's internal name of `memalign`.
#[unsafe(no_mangle)]
pub extern "C" fn __libc_memalign(alignment: usize, size: usize) -> *mut c_void {
    memalign_glibc(alignment, size)
}

/// `valloc`: page-aligned memory.
#[unsafe(no_mangle)]
pub extern "C" fn valloc(size: usize) -> *mut c_void {
    valloc_impl(size)
}

/// glibc's internal name of `valloc`.
#[unsafe(no_mangle)]
pub extern "C" fn __libc_valloc(size: usize) -> *mut c_void {
    valloc_impl(size)
}

/// `pvalloc`: page-aligned memory, size rounded up to whole pages (at least one).
#[unsafe(no_mangle)]
pub extern "C" fn pvalloc(size: usize) -> *mut c_void {
    pvalloc_impl(size)
}

/// glibc's internal name of `pvalloc`.
#[unsafe(no_mangle)]
pub extern "C" fn __libc_pvalloc(size: usize) -> *mut c_void {
    pvalloc_impl(size)
}

/// `malloc_usable_size`: bytes usable at `p`, 0 for NULL.
///
/// # Safety
/// `p` is NULL or a live pointer from this allocator.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn malloc_usable_size(p: *mut c_void) -> usize {
    api::usable_size(p.cast())
}

// ---- glibc's statistics and tuning calls -------------------------------------------------

/// `malloc_trim`: returns free memory to the OS; 1 if any was released, else 0.
#[unsafe(no_mangle)]
pub extern "C" fn malloc_trim(_pad: usize) -> c_int {
    c_int::from(api::trim() > 0)
}

/// `mallopt`: accepts (and ignores) the parameters `<malloc.h>` defines: returns 1 for
/// those, 0 for an unknown parameter.
#[unsafe(no_mangle)]
pub extern "C" fn mallopt(param: c_int, _value: c_int) -> c_int {
    // M_MXFAST, M_NLBLKS, M_GRAIN, M_KEEP, and M_TRIM_THRESHOLD (-1) ... M_ARENA_MAX (-8).
    c_int::from(matches!(param, 1..=4 | -8..=-1))
}

/// glibc's `struct mallinfo` (fields are `int`).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct Mallinfo {
    pub arena: c_int,
    pub ordblks: c_int,
    pub smblks: c_int,
    pub hblks: c_int,
    pub hblkhd: c_int,
    pub usmblks: c_int,
    pub fsmblks: c_int,
    pub uordblks: c_int,
    pub fordblks: c_int,
    pub keepcost: c_int,
}

/// glibc's `struct mallinfo2` (fields are `size_t`).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct Mallinfo2 {
    pub arena: usize,
    pub ordblks: usize,
    pub smblks: usize,
    pub hblks: usize,
    pub hblkhd: usize,
    pub usmblks: usize,
    pub fsmblks: usize,
    pub uordblks: usize,
    pub fordblks: usize,
    pub keepcost: usize,
}

/// A statistics snapshot plus the bytes of live large objects (own mappings).
fn snapshot(s: &mut LgStats) -> usize {
    if crate::init::ensure_initialized() {
        stats::collect(s);
    }
    let large = crate::large::LIVE_BYTES.load(core::sync::atomic::Ordering::Relaxed) as u64;
    large.min(s.bytes_allocated).min(s.bytes_committed) as usize
}

/// lgmalloc's figures in glibc's layout, kept consistent the way glibc's are:
/// `arena` (memory committed for small blocks) = `uordblks` (in small blocks) +
/// `fordblks` (free in those pages); `hblks`/`hblkhd` are the large objects, which have
/// mappings of their own (glibc's mmapped chunks). So `arena + hblkhd` is all committed
/// memory and `uordblks + hblkhd` all allocated bytes, as with glibc.
fn fill_mallinfo() -> Mallinfo2 {
    let mut s = LgStats::default();
    let large = snapshot(&mut s);
    let committed = s.bytes_committed as usize;
    let allocated = s.bytes_allocated as usize;
    let arena = committed - large;
    let uordblks = (allocated - large).min(arena);
    Mallinfo2 {
        arena,
        ordblks: 0,
        smblks: 0,
        hblks: s.large_live as usize,
        hblkhd: large,
        usmblks: 0,
        fsmblks: 0,
        uordblks,
        fordblks: arena - uordblks,
        keepcost: 0,
    }
}

/// glibc's `mallinfo2`.
#[unsafe(no_mangle)]
pub extern "C" fn mallinfo2() -> Mallinfo2 {
    fill_mallinfo()
}

/// glibc's `mallinfo` (figures saturate at `INT_MAX`).
#[unsafe(no_mangle)]
pub extern "C" fn mallinfo() -> Mallinfo {
    let m = fill_mallinfo();
    let int = |v: usize| c_int::try_from(v).unwrap_or(c_int::MAX);
    Mallinfo {
        arena: int(m.arena),
        ordblks: int(m.ordblks),
        smblks: int(m.smblks),
        hblks: int(m.hblks),
        hblkhd: int(m.hblkhd),
        usmblks: int(m.usmblks),
        fsmblks: int(m.fsmblks),
        uordblks: int(m.uordblks),
        fordblks: int(m.fordblks),
        keepcost: int(m.keepcost),
    }
}

/// glibc's `malloc_stats`: a summary on stderr (the `LGMALLOC_SHOW_STATS` format).
#[unsafe(no_mangle)]
pub extern "C" fn malloc_stats() {
    if crate::init::ensure_initialized() {
        stats::print_summary();
    }
}

/// `malloc_info`'s output: one formatted line at a time, written with `fwrite` (stdio
/// may allocate its buffer: no lock of ours is held).
struct XmlOut {
    fp: *mut libc::FILE,
    ok: bool,
}

impl XmlOut {
    fn line(&mut self, args: core::fmt::Arguments<'_>) {
        if !self.ok {
            return;
        }
        let mut m = Message::new();
        let _ = m.write_fmt(args);
        let _ = m.write_str("\n");
        let b = m.as_bytes();
        // SAFETY: `fp` is the writable stream `malloc_info` was given; `b` is valid.
        self.ok = unsafe { libc::fwrite(b.as_ptr().cast(), 1, b.len(), self.fp) } == b.len();
    }
}

/// glibc's `malloc_info`: an XML description of the heap, in glibc's element names.
/// `options` must be 0 (else EINVAL is returned). Returns 0, or -1 (errno from stdio)
/// when writing failed.
///
/// The `<sizes>` list has one `<size>` per size class holding live blocks (block size,
/// live count, their bytes); glibc lists its free chunks there.
///
/// # Safety
/// `fp` is a valid `FILE *` open for writing.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn malloc_info(options: c_int, fp: *mut libc::FILE) -> c_int {
    if options != 0 || fp.is_null() {
        return libc::EINVAL;
    }
    let mut s = LgStats::default();
    let large = snapshot(&mut s) as u64;
    let small_committed = s.bytes_committed - large;
    let small_used = (s.bytes_allocated - large).min(small_committed);
    let free_bytes = small_committed - small_used;
    let (peak, reserved) = (s.peak_bytes_committed, s.bytes_reserved);
    let mut out = XmlOut { fp, ok: true };
    out.line(format_args!("<malloc version=\"1\">"));
    out.line(format_args!("<heap nr=\"0\">"));
    out.line(format_args!("<sizes>"));
    for c in s.classes.iter().take(s.class_count as usize) {
        if c.live_blocks != 0 {
            let (bs, n) = (c.block_size, c.live_blocks);
            let total = bs.saturating_mul(n);
            out.line(format_args!(
                "  <size from=\"{bs}\" to=\"{bs}\" total=\"{total}\" count=\"{n}\"/>"
            ));
        }
    }
    out.line(format_args!("</sizes>"));
    out.line(format_args!(
        "<total type=\"fast\" count=\"0\" size=\"0\"/>"
    ));
    out.line(format_args!(
        "<total type=\"rest\" count=\"0\" size=\"{free_bytes}\"/>"
    ));
    out.line(format_args!(
        "<system type=\"current\" size=\"{small_committed}\"/>"
    ));
    out.line(format_args!("<system type=\"max\" size=\"{peak}\"/>"));
    out.line(format_args!("<aspace type=\"total\" size=\"{reserved}\"/>"));
    out.line(format_args!(
        "<aspace type=\"mprotect\" size=\"{reserved}\"/>"
    ));
    out.line(format_args!("</heap>"));
    out.line(format_args!(
        "<total type=\"fast\" count=\"0\" size=\"0\"/>"
    ));
    out.line(format_args!(
        "<total type=\"rest\" count=\"0\" size=\"{free_bytes}\"/>"
    ));
    let live = s.large_live;
    out.line(format_args!(
        "<total type=\"mmap\" count=\"{live}\" size=\"{large}\"/>"
    ));
    let committed = s.bytes_committed;
    out.line(format_args!(
        "<system type=\"current\" size=\"{committed}\"/>"
    ));
    out.line(format_args!("<system type=\"max\" size=\"{peak}\"/>"));
    out.line(format_args!("<aspace type=\"total\" size=\"{reserved}\"/>"));
    out.line(format_args!(
        "<aspace type=\"mprotect\" size=\"{reserved}\"/>"
    ));
    out.line(format_args!("</malloc>"));
    if out.ok { 0 } else { -1 }
}

// ---- C++ operator new / delete -----------------------------------------------------------

/// One allocation attempt for `operator new`: `align` 0 means the default alignment; an
/// alignment that is not a power of two fails.
#[inline(always)]
fn new_attempt(size: usize, align: usize) -> *mut u8 {
    if align == 0 {
        api::malloc(size)
    } else if align.is_power_of_two() {
        api::aligned(align, size)
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
    let mut m = Message::new();
    let _ = writeln!(m, "lgmalloc: out of memory in operator new ({size} bytes)");
    os::write_stderr(m.as_bytes());
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

    extern "C" fn attempt_default(size: usize) -> *mut u8 {
        crate::api::malloc(size)
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
            ".cfi_remember_state",
            "pop rcx",
            ".cfi_adjust_cfa_offset -8",
            "pop r12",
            ".cfi_adjust_cfa_offset -8",
            ".cfi_restore r12",
            "pop rbx",
            ".cfi_adjust_cfa_offset -8",
            ".cfi_restore rbx",
            "ret",
            ".cfi_restore_state",
            "3:",
            ".weak _ZSt17__throw_bad_allocv",
            "mov rax, qword ptr [rip + _ZSt17__throw_bad_allocv@GOTPCREL]",
            "test rax, rax",
            "jz 4f",
            ".cfi_remember_state",
            "pop rcx",
            ".cfi_adjust_cfa_offset -8",
            "pop r12",
            ".cfi_adjust_cfa_offset -8",
            ".cfi_restore r12",
            "pop rbx",
            ".cfi_adjust_cfa_offset -8",
            ".cfi_restore rbx",
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

    macro_rules! new_default {
        ($rust:ident, $sym:literal) => {
            #[doc = concat!("C++ `", $sym, "` (throwing `operator new`).")]
            #[unsafe(naked)]
            #[unsafe(export_name = $sym)]
            pub unsafe extern "C" fn $rust(size: usize) -> *mut c_void {
                naked_asm!(
                    ".cfi_startproc",
                    "push rdi",
                    ".cfi_adjust_cfa_offset 8",
                    "call {attempt}",
                    "pop rdi",
                    ".cfi_adjust_cfa_offset -8",
                    "test rax, rax",
                    "jz 2f",
                    "ret",
                    "2:",
                    "xor esi, esi",
                    "jmp {slow}",
                    ".cfi_endproc",
                    attempt = sym attempt_default,
                    slow = sym new_slow,
                )
            }
        };
    }

    macro_rules! new_aligned {
        ($rust:ident, $sym:literal) => {
            #[doc = concat!("C++ `", $sym, "` (throwing aligned `operator new`).")]
            #[unsafe(naked)]
            #[unsafe(export_name = $sym)]
            pub unsafe extern "C" fn $rust(size: usize, align: usize) -> *mut c_void {
                naked_asm!(
                    ".cfi_startproc",
                    "push rdi",
                    ".cfi_adjust_cfa_offset 8",
                    "push rsi",
                    ".cfi_adjust_cfa_offset 8",
                    "push rax",
                    ".cfi_adjust_cfa_offset 8",
                    "call {attempt}",
                    "pop rcx",
                    ".cfi_adjust_cfa_offset -8",
                    "pop rsi",
                    ".cfi_adjust_cfa_offset -8",
                    "pop rdi",
                    ".cfi_adjust_cfa_offset -8",
                    "test rax, rax",
                    "jz 2f",
                    "ret",
                    "2:",
                    "jmp {slow}",
                    ".cfi_endproc",
                    attempt = sym attempt,
                    slow = sym new_slow,
                )
            }
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

#[inline(always)]
fn new_nothrow(size: usize, align: usize) -> *mut c_void {
    let p = new_attempt(size, align);
    if !p.is_null() {
        return p.cast();
    }
    new_nothrow_slow(size, align)
}

/// C++ `operator new(size_t, const nothrow_t&)`.
#[unsafe(export_name = "_ZnwmRKSt9nothrow_t")]
pub extern "C" fn op_new_nothrow(size: usize, _nt: *const c_void) -> *mut c_void {
    new_nothrow(size, 0)
}

/// C++ `operator new[](size_t, const nothrow_t&)`.
#[unsafe(export_name = "_ZnamRKSt9nothrow_t")]
pub extern "C" fn op_new_array_nothrow(size: usize, _nt: *const c_void) -> *mut c_void {
    new_nothrow(size, 0)
}

/// C++ `operator new(size_t, align_val_t, const nothrow_t&)`.
#[unsafe(export_name = "_ZnwmSt11align_val_tRKSt9nothrow_t")]
pub extern "C" fn op_new_aligned_nothrow(
    size: usize,
    align: usize,
    _nt: *const c_void,
) -> *mut c_void {
    new_nothrow(size, align)
}

/// C++ `operator new[](size_t, align_val_t, const nothrow_t&)`.
#[unsafe(export_name = "_ZnamSt11align_val_tRKSt9nothrow_t")]
pub extern "C" fn op_new_array_aligned_nothrow(
    size: usize,
    align: usize,
    _nt: *const c_void,
) -> *mut c_void {
    new_nothrow(size, align)
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
            unsafe { api::free(p.cast()) }
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
