//! The allocator's own messages: formatted into a fixed buffer and written with
//! `write(2)`, never through stdio and never allocating, so they are safe inside malloc.
//!
//! Every message goes to one descriptor: stderr, or a duplicate of it taken at start-up
//! when something is to be written at exit (statistics, verify mode's summary, verbose
//! lines): coreutils close stderr before exit handlers run.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicI32, Ordering};

use crate::os;

static DIAG_FD: AtomicI32 = AtomicI32::new(2);

/// Writes one formatted line: `diag!("lgmalloc: {} ...", x)` (the newline is added).
macro_rules! diag {
    ($($arg:tt)*) => {
        $crate::diag::write_line(format_args!($($arg)*))
    };
}
pub(crate) use diag;

/// Keeps writing diagnostics to a duplicate of the current stderr, so a summary at exit
/// still reaches it after the program closed descriptor 2.
pub fn keep_stderr_copy() {
    // SAFETY: fcntl on fd 2 has no memory effects; failure leaves fd 2 in use.
    let fd = unsafe { libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 64) };
    if fd >= 0 {
        DIAG_FD.store(fd, Ordering::Relaxed);
    }
}

/// Writes raw bytes to the diagnostics descriptor.
pub fn write_stderr(bytes: &[u8]) {
    os::write_fd(DIAG_FD.load(Ordering::Relaxed), bytes);
}

/// Formats `args` and a newline into a [`Message`] and writes it (see [`diag!`]).
#[cold]
pub fn write_line(args: fmt::Arguments<'_>) {
    let mut m = Message::new();
    let _ = m.write_fmt(args);
    let _ = m.write_str("\n");
    write_stderr(m.as_bytes());
}

/// A fixed-size text buffer: formatting into it never allocates; what does not fit is cut.
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
}

impl Default for Message {
    fn default() -> Self {
        Self::new()
    }
}

impl Write for Message {
    fn write_str(&mut self, s: &str) -> fmt::Result {
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
    diag!("lgmalloc: {what} at {addr:#x}");
    // SAFETY: abort has no preconditions.
    unsafe { libc::abort() }
}

/// Notes an OS refusal to map memory when verbose (the caller returns ENOMEM).
#[cold]
pub fn report_os_failure(bytes: usize) {
    if crate::options::verbose() {
        diag!("lgmalloc: the OS refused {bytes} bytes of memory (ENOMEM)");
    }
}
