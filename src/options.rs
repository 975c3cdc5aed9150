//! Options read from the environment at start-up, without allocating, and the
//! allocator's own diagnostics (written with `write(2)`, never through stdio).

use core::sync::atomic::{AtomicBool, AtomicI32, Ordering};

static VERBOSE: AtomicBool = AtomicBool::new(false);
static SHOW_STATS: AtomicBool = AtomicBool::new(false);
/// Where diagnostics go: a duplicate of stderr taken at start-up, so the summary at
/// exit still reaches the terminal when the program closed its stderr (coreutils do).
static DIAG_FD: AtomicI32 = AtomicI32::new(2);

/// Reads `LGMALLOC_*` variables. `getenv` does not allocate.
pub fn init() {
    VERBOSE.store(flag("LGMALLOC_VERBOSE\0"), Ordering::Relaxed);
    SHOW_STATS.store(flag("LGMALLOC_SHOW_STATS\0"), Ordering::Relaxed);
    if show_stats() {
        // SAFETY: fcntl on fd 2 has no memory effects; failure leaves fd 2 in use.
        let fd = unsafe { libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 64) };
        if fd >= 0 {
            DIAG_FD.store(fd, Ordering::Relaxed);
        }
    }
}

/// The descriptor diagnostics are written to.
pub fn diag_fd() -> i32 {
    DIAG_FD.load(Ordering::Relaxed)
}

/// True when the variable is set to something other than empty, `0`, `no` or `off`.
pub fn flag(name_nul: &str) -> bool {
    match var(name_nul) {
        Some(v) => !matches!(v, b"" | b"0" | b"no" | b"off" | b"false"),
        None => false,
    }
}

/// The value of an environment variable (name must end in NUL), borrowed from environ.
pub fn var(name_nul: &str) -> Option<&'static [u8]> {
    // SAFETY: the name is NUL-terminated; getenv returns null or a C string that stays
    // valid as long as nobody modifies the environment (start-up reads only).
    unsafe {
        let v = libc::getenv(name_nul.as_ptr().cast());
        if v.is_null() {
            return None;
        }
        Some(core::ffi::CStr::from_ptr(v).to_bytes())
    }
}

pub fn verbose() -> bool {
    VERBOSE.load(Ordering::Relaxed)
}

pub fn show_stats() -> bool {
    SHOW_STATS.load(Ordering::Relaxed)
}

/// A fixed-size text buffer for messages: formatting never allocates.
pub struct Message {
    buf: [u8; 512],
    len: usize,
}

impl Message {
    pub const fn new() -> Self {
        Message {
            buf: [0; 512],
            len: 0,
        }
    }
    pub fn as_bytes(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or(&[])
    }
    pub fn clear(&mut self) {
        self.len = 0;
    }
}

impl Default for Message {
    fn default() -> Self {
        Self::new()
    }
}

impl core::fmt::Write for Message {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let room = self.buf.len() - self.len;
        let n = s.len().min(room);
        if let (Some(dst), Some(src)) = (
            self.buf.get_mut(self.len..self.len + n),
            s.as_bytes().get(..n),
        ) {
            dst.copy_from_slice(src);
            self.len += n;
        }
        Ok(())
    }
}

/// Heap misuse: report `lgmalloc: <what> at <address>` and abort. Continuing would
/// corrupt memory far from the bug.
#[cold]
#[inline(never)]
pub fn misuse(what: &str, addr: usize) -> ! {
    use core::fmt::Write;
    let mut m = Message::new();
    let _ = writeln!(m, "lgmalloc: {what} at {addr:#x}");
    crate::os::write_stderr(m.as_bytes());
    // SAFETY: abort has no preconditions.
    unsafe { libc::abort() }
}

/// Notes an OS refusal to map memory when verbose (the caller returns ENOMEM).
#[cold]
pub fn report_os_failure(bytes: usize) {
    if verbose() {
        use core::fmt::Write;
        let mut m = Message::new();
        let _ = writeln!(
            m,
            "lgmalloc: the OS refused {bytes} bytes of memory (ENOMEM)"
        );
        crate::os::write_stderr(m.as_bytes());
    }
}
