//! (feature `override`) glibc's statistics and tuning calls: `malloc_trim`, `mallopt`,
//! `mallinfo`, `mallinfo2`, `malloc_stats`, `malloc_info`. A `-static` program that
//! calls one of them would otherwise pull glibc's `malloc.o` and fail to link.
//!
//! - `mallopt` accepts the parameters of `<malloc.h>` and ignores their values.
//! - `mallinfo`/`mallinfo2` report lgmalloc's own figures in glibc's fields (see
//!   [`fill_mallinfo`]); fields glibc fills from its free lists that have no
//!   lgmalloc counterpart are 0.
//! - `malloc_info` formats into a fixed buffer and writes with `fwrite`, holding no
//!   lock of lgmalloc's.

use core::ffi::c_int;
use core::fmt::Write;

use crate::diag::Message;
use crate::large;
use crate::request;
use crate::stats::LgStats;

/// `malloc_trim`: returns free memory to the OS; 1 if any was released, else 0.
#[unsafe(no_mangle)]
pub extern "C" fn malloc_trim(_pad: usize) -> c_int {
    c_int::from(request::trim() > 0)
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
    request::collect_stats(s);
    let large = large::LIVE_BYTES.load(core::sync::atomic::Ordering::Relaxed) as u64;
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
    request::print_stats();
}

/// `malloc_info`'s output: one formatted line at a time, written with `fwrite` (stdio
/// may allocate its buffer: no lock of ours is held).
struct XmlOut {
    fp: *mut libc::FILE,
    ok: bool,
}

impl XmlOut {
    /// The free-list totals: lgmalloc has no fastbins, and its free bytes are `rest`.
    fn free_totals(&mut self, free_bytes: u64) {
        self.line(format_args!(
            "<total type=\"fast\" count=\"0\" size=\"0\"/>"
        ));
        self.line(format_args!(
            "<total type=\"rest\" count=\"0\" size=\"{free_bytes}\"/>"
        ));
    }

    /// Memory obtained from the system: committed now, at the peak, and reserved.
    fn system(&mut self, current: u64, peak: u64, reserved: u64) {
        self.line(format_args!(
            "<system type=\"current\" size=\"{current}\"/>"
        ));
        self.line(format_args!("<system type=\"max\" size=\"{peak}\"/>"));
        self.line(format_args!("<aspace type=\"total\" size=\"{reserved}\"/>"));
        self.line(format_args!(
            "<aspace type=\"mprotect\" size=\"{reserved}\"/>"
        ));
    }

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
    out.free_totals(free_bytes);
    out.system(small_committed, peak, reserved);
    out.line(format_args!("</heap>"));
    out.free_totals(free_bytes);
    let live = s.large_live;
    out.line(format_args!(
        "<total type=\"mmap\" count=\"{live}\" size=\"{large}\"/>"
    ));
    out.system(s.bytes_committed, peak, reserved);
    out.line(format_args!("</malloc>"));
    if out.ok { 0 } else { -1 }
}
