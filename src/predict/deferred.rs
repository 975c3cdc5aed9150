//! Analyses that did not fit the start-up budget: run at exit by a detached child
//! process, so the program's exit is not delayed and its next start is planned.

use core::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::path::{Path, PathBuf};

use crate::analysis;
use crate::analysis::cache_dir::{CacheDir, CacheLock};
use crate::diag::diag;
use crate::options;

/// Modules whose analysis was deferred, and the process that deferred them.
static DEFERRED: AtomicPtr<Vec<PathBuf>> = AtomicPtr::new(core::ptr::null_mut());

static DEFERRED_BY: AtomicU64 = AtomicU64::new(0);

/// Leaves the analysis of `paths` to the end of the run (see [`analyse_deferred_at_exit`]).
pub(super) fn defer_analysis(paths: Vec<PathBuf>) {
    // A privileged program must not leave a child running on its caller's behalf; and
    // `LGMALLOC_DEFERRED_ANALYSIS=0` turns the child off.
    if options::secure() || !options::deferred_analysis() {
        return;
    }
    if options::verbose() {
        for p in &paths {
            diag!(
                "lgmalloc: analysis of {} deferred: over the start-up budget",
                p.display()
            );
        }
    }
    // SAFETY: getpid has no preconditions.
    DEFERRED_BY.store(unsafe { libc::getpid() } as u64, Ordering::Relaxed);
    DEFERRED.store(Box::into_raw(Box::new(paths)), Ordering::Release);
    // SAFETY: registers a plain function.
    unsafe { libc::atexit(analyse_deferred_at_exit) };
}

/// At exit: analyses (and caches) the modules that did not fit the start-up budget in a
/// child process, so the program's exit is not delayed and its next start is warm (as
/// `git gc --auto` detaches). The child never forks or execs, and leaves with `_exit`
/// (no exit handlers), so it cannot start another.
extern "C" fn analyse_deferred_at_exit() {
    // Only the process that deferred them: not a child it forked that exits normally.
    // SAFETY: getpid has no preconditions.
    if DEFERRED_BY.load(Ordering::Relaxed) != unsafe { libc::getpid() } as u64 {
        return;
    }
    let p = DEFERRED.swap(core::ptr::null_mut(), Ordering::Acquire);
    if p.is_null() {
        return;
    }
    // SAFETY: `defer_analysis` published the list with `Box::into_raw`, and the swap
    // hands it to this call only. The parent frees it when this returns (the child
    // leaves with `_exit` first).
    let paths = unsafe { Box::from_raw(p) };
    // SAFETY: fork has no preconditions; lgmalloc's own locks are handled by its
    // atfork handlers, and the child only runs the analysis before `_exit`.
    match unsafe { libc::fork() } {
        0 => {
            detach_from_parent();
            for path in paths.iter() {
                // One analysis of a file at a time across processes: a program started
                // many times at once (a build running the same compiler) defers the
                // same file in each, and only the first child to get here analyses it;
                // the lock goes with this process.
                let Some(_lock) = analysis_lock(path) else {
                    continue;
                };
                let _ = analysis::analyze_path(path, true);
            }
            // SAFETY: ends the child without running the parent's exit handlers.
            unsafe { libc::_exit(0) }
        }
        pid if pid < 0 && options::verbose() => {
            diag!("lgmalloc: deferred analysis not started: fork failed")
        }
        _ => {}
    }
}

/// The lock on `path`'s cache entry (`<entry>.lock` beside it), if no other process
/// holds it. None without a cache, where the analysis could not be kept anyway.
fn analysis_lock(path: &Path) -> Option<CacheLock> {
    let entry = analysis::cache_entry(path)?;
    let (dir, name) = CacheDir::open_for(&entry)?;
    dir.lock(&format!("{name}.lock"))
}

/// In the analysis child: a session of its own (the terminal's signals are not for it),
/// low priority, and none of the parent's files, so a reader of the parent's pipes sees
/// end-of-file when the parent exits, not when the analysis ends.
fn detach_from_parent() {
    // SAFETY: plain system calls on this process's own attributes and descriptors;
    // `/dev/null` is a constant C string.
    unsafe {
        libc::setsid();
        libc::nice(10);
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        for fd in 0..3 {
            libc::dup2(null, fd);
        }
        if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) != 0 {
            for fd in 3..1024 {
                libc::close(fd);
            }
        }
        // A lock another thread of the parent held at the fork (the environment's,
        // stdio's) would stop the child for good: it gives up after a minute instead.
        libc::alarm(60);
    }
}
