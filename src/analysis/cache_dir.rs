//! The cache directory: every file lgmalloc keeps between runs (analyses, stored plans,
//! observations) is read and written through [`CacheDir`].
//!
//! The directory is untrusted input that steers the allocator of every program, so it
//! is treated as ssh treats `~/.ssh`:
//! - It is used only if it is a directory owned by the effective user and not writable
//!   by group or others (checked with `fstat` on a descriptor opened with `O_NOFOLLOW`).
//!   It is created with mode 0700 when missing. Otherwise there is no cache at all.
//! - Files are opened relative to that descriptor (`openat` with `O_NOFOLLOW`), so a
//!   symbolic link planted at an entry name is neither followed nor overwritten; a file
//!   that is not a regular file owned by the same user, or is larger than the caller's
//!   bound, is ignored. New files are created 0600 under a temporary name and renamed
//!   into place, so readers never see half a file.
//! - In secure-execution mode (setuid, setgid, file capabilities) no environment
//!   variable is read and nothing is written: only [`SYSTEM_DIR`] is read, and only if
//!   it exists, is owned by root and is not writable by group or others.
//!
//! Location: `$LGMALLOC_CACHE_DIR`, else `$XDG_CACHE_HOME/lgmalloc` (an absolute
//! `XDG_CACHE_HOME` only), else `$HOME/.cache/lgmalloc`.
//!
//! # Names
//! An entry is named after the file it describes: `b-<build-id>-<size>` or
//! `i-<dev>-<ino>-<size>-<mtime>.<nsec>` (the analysis), with companions that share the
//! text before the first `.` (`b-...-<size>.plan`, `.static-plan`, `.learned`) and
//! temporaries (`<name>.tmp.<pid>.<nanos>`). Eviction treats all files with the same
//! [`entry_stem`] as one entry. Other names in the directory are never touched.
//!
//! # Bound
//! The disk usage of the directory and its files (`st_blocks * 512`, as `du` counts
//! it) is kept under `LGMALLOC_CACHE_MAX_MB` (default 64) by removing the least
//! recently used entries after each write. The last use is the files' mtime: set by
//! the write, refreshed by a read when older than [`TOUCH_AFTER_SECS`]. Eviction runs
//! under an `flock` on [`LOCK_NAME`] (a process that finds it taken skips eviction: the
//! holder is evicting) and tolerates files vanishing under it.
//!
//! Nothing here panics: failures read as "no cache" and are ignored.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{Read as _, Write as _};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use super::Analysis;

/// The only cache a secure-execution (setuid, setgid, capabilities) process reads.
pub const SYSTEM_DIR: &str = "/var/cache/lgmalloc";

/// The default bound on the cache's disk usage (`LGMALLOC_CACHE_MAX_MB` overrides it).
pub const DEFAULT_MAX_BYTES: u64 = 64 << 20;

/// The lock file that serialises eviction between processes (with a `.`, like every
/// name that is not an analysis entry).
pub const LOCK_NAME: &str = "lgmalloc.lock";

/// A read refreshes an entry's last use only when the recorded one is older than this:
/// a program started in a loop then costs no inode write per start, and the LRU order
/// is still right to the minute.
pub const TOUCH_AFTER_SECS: i64 = 60;

/// Attempts, a millisecond apart, to take the eviction lock before leaving eviction to
/// whoever holds it.
const EVICTION_LOCK_TRIES: u32 = 20;

/// The largest analysis entry read (a 30 MB program's has a few MB).
pub const MAX_ANALYSIS_BYTES: usize = 32 << 20;

/// An open, checked cache directory.
#[derive(Debug)]
pub struct CacheDir {
    fd: OwnedFd,
    path: PathBuf,
    /// Owner required of the directory and of every file read from it.
    owner: libc::uid_t,
    /// False for the system directory in secure-execution mode.
    writable: bool,
    max_bytes: u64,
}

/// One of lgmalloc's files in the cache directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheFile {
    pub name: String,
    /// Bytes of disk used (`st_blocks * 512`).
    pub disk_bytes: u64,
    /// File length.
    pub len: u64,
    /// Last use (mtime), in nanoseconds since the Unix epoch.
    pub last_use_ns: i64,
}

/// An exclusive `flock` on a file in the cache directory, released on drop.
#[derive(Debug)]
pub struct CacheLock {
    _fd: OwnedFd,
}

/// What [`CacheDir::evict`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Eviction {
    /// Files removed.
    pub removed: usize,
    /// Disk usage of lgmalloc's files afterwards (before, if nothing was done).
    pub usage: u64,
}

/// The part of a name that identifies its entry: the text before the first `.`.
pub fn entry_stem(name: &str) -> &str {
    name.split('.').next().unwrap_or(name)
}

/// True for the names lgmalloc writes: entries (`b-*`, `i-*`), their companions and
/// temporaries, and the lock file.
pub fn is_cache_file(name: &str) -> bool {
    name == LOCK_NAME || name.starts_with("b-") || name.starts_with("i-")
}

/// A plain name inside the directory: no path separator, no hidden or dot name (so
/// `..` cannot escape), and short enough for one path component.
fn valid_name(name: &str) -> Option<CString> {
    let ok = !name.is_empty() && name.len() <= 255 && !name.contains('/') && !name.starts_with('.');
    ok.then(|| CString::new(name).ok()).flatten()
}

/// True when `LGMALLOC_VERBOSE` asks for diagnostics. Never in secure-execution mode,
/// where the environment is not read. (Read here rather than through `options` so this
/// module also works in the analysis tool and before the options are parsed.)
pub(crate) fn verbose() -> bool {
    !crate::os::secure_execution()
        && std::env::var_os("LGMALLOC_VERBOSE").is_some_and(|v| !v.is_empty() && v != "0")
}

/// Writes one `lgmalloc: ...` line on stderr when verbose.
pub(crate) fn report(line: &str) {
    if verbose() {
        crate::os::write_fd(2, format!("lgmalloc: {line}\n").as_bytes());
    }
}

fn errno_text() -> String {
    std::io::Error::last_os_error().to_string()
}

fn fstat(fd: libc::c_int) -> Option<libc::stat> {
    // SAFETY: `st` is plain data that fstat fills in; an all-zero value is valid.
    let mut st: libc::stat = unsafe { core::mem::zeroed() };
    // SAFETY: `st` is a valid, writable stat buffer; a bad fd only makes fstat fail.
    (unsafe { libc::fstat(fd, &mut st) } == 0).then_some(st)
}

fn is_dir(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

fn is_regular(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFREG
}

fn mtime_ns(st: &libc::stat) -> i64 {
    st.st_mtime
        .saturating_mul(1_000_000_000)
        .saturating_add(st.st_mtime_nsec)
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

fn euid() -> libc::uid_t {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

impl CacheDir {
    /// Where the cache lives, from the environment (see the module docs); in
    /// secure-execution mode [`SYSTEM_DIR`] without reading the environment. Only
    /// computes the path: [`CacheDir::open`] decides whether it may be used.
    pub fn location() -> Option<PathBuf> {
        if crate::os::secure_execution() {
            return Some(PathBuf::from(SYSTEM_DIR));
        }
        let var = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        if let Some(d) = var("LGMALLOC_CACHE_DIR") {
            return Some(d);
        }
        if let Some(d) = var("XDG_CACHE_HOME").filter(|d| d.is_absolute()) {
            return Some(d.join("lgmalloc"));
        }
        var("HOME").map(|h| h.join(".cache").join("lgmalloc"))
    }

    /// The cache directory of this process (created when missing), bounded by
    /// `LGMALLOC_CACHE_MAX_MB`; `None` when there is none or it may not be used (one
    /// `LGMALLOC_VERBOSE` line per process says why).
    pub fn open() -> Option<CacheDir> {
        match Self::try_open() {
            Ok(d) => Some(d),
            Err(why) => {
                static REPORTED: AtomicBool = AtomicBool::new(false);
                if !why.is_empty() && !REPORTED.swap(true, Ordering::Relaxed) {
                    report(&format!("cache directory not used: {why}"));
                }
                None
            }
        }
    }

    /// [`CacheDir::open`], with the reason when there is no usable directory (empty when
    /// there is simply none: no location, or no system cache in secure-execution mode).
    pub fn try_open() -> Result<CacheDir, String> {
        if crate::os::secure_execution() {
            // Never created, never written: whoever installs a system cache fills it.
            let path = PathBuf::from(SYSTEM_DIR);
            return match Self::check(&path, 0, false) {
                Err(_) if !path.exists() => Err(String::new()),
                other => other,
            };
        }
        let path = Self::location().ok_or_else(String::new)?;
        let max_mb = std::env::var("LGMALLOC_CACHE_MAX_MB")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok());
        let dir = Self::create_and_check(&path)?;
        Ok(match max_mb {
            Some(mb) => dir.with_max_bytes(mb.saturating_mul(1 << 20)),
            None => dir,
        })
    }

    /// The directory at `path` (created 0700 when missing, its parents as needed),
    /// if it passes the ownership and mode checks; bounded by [`DEFAULT_MAX_BYTES`].
    /// Reads no environment variable: for tools and tests that name the directory.
    pub fn open_at(path: &Path) -> Option<CacheDir> {
        Self::create_and_check(path).ok()
    }

    /// The cache directory of this process and the name of `entry` in it, when `entry`
    /// is a path directly inside it (as [`crate::analysis::cache_entry`] returns).
    pub fn open_for(entry: &Path) -> Option<(CacheDir, String)> {
        let name = entry.file_name()?.to_str()?.to_owned();
        let dir = Self::open()?;
        (entry.parent() == Some(dir.path.as_path())).then_some((dir, name))
    }

    /// The same directory with another bound on its disk usage.
    pub fn with_max_bytes(mut self, max_bytes: u64) -> CacheDir {
        self.max_bytes = max_bytes;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// False for a read-only (system) cache.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    fn create_and_check(path: &Path) -> Result<CacheDir, String> {
        // The directory usually exists: open it first (four system calls in all, paid
        // per module at every start); create it only when it is missing.
        let first = Self::check(path, euid(), true);
        if first.is_ok() || std::fs::symlink_metadata(path).is_ok() {
            return first;
        }
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            // Parents get the usual mode (as `mkdir -p`); only the last one must be private.
            let _ = std::fs::create_dir_all(parent);
        }
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| format!("{}: invalid path", path.display()))?;
        // SAFETY: `c` is a NUL-terminated path; mkdir fails harmlessly if it exists.
        unsafe { libc::mkdir(c.as_ptr(), 0o700) };
        Self::check(path, euid(), true)
    }

    /// Opens `path` without following a final symbolic link and checks that it is a
    /// directory owned by `owner` that group and others cannot write.
    fn check(path: &Path, owner: libc::uid_t, writable: bool) -> Result<CacheDir, String> {
        let shown = path.display();
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| format!("{shown}: invalid path"))?;
        let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: `c` is a NUL-terminated path; the result is checked before use.
        let raw = unsafe { libc::open(c.as_ptr(), flags) };
        if raw < 0 {
            return Err(format!("{shown}: {}", errno_text()));
        }
        // SAFETY: `raw` is a descriptor just opened and owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let st = fstat(fd.as_raw_fd()).ok_or_else(|| format!("{shown}: {}", errno_text()))?;
        if !is_dir(&st) {
            return Err(format!("{shown} is not a directory"));
        }
        if st.st_uid != owner {
            return Err(format!(
                "{shown} is owned by uid {}, not {owner}",
                st.st_uid
            ));
        }
        if st.st_mode & 0o022 != 0 {
            return Err(format!(
                "{shown} is writable by group or others (mode {:o})",
                st.st_mode & 0o7777
            ));
        }
        Ok(CacheDir {
            fd,
            path: path.to_path_buf(),
            owner,
            writable,
            max_bytes: DEFAULT_MAX_BYTES,
        })
    }

    /// Opens `name` in the directory, never following a symbolic link.
    fn open_file(&self, name: &CStr, flags: libc::c_int) -> Option<OwnedFd> {
        let flags = flags | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NOCTTY;
        // SAFETY: `name` is NUL-terminated and the directory fd is open for `self`'s life.
        let raw = unsafe { libc::openat(self.fd.as_raw_fd(), name.as_ptr(), flags, 0o600) };
        // SAFETY: a non-negative result is a fresh descriptor owned by nothing else.
        (raw >= 0).then(|| unsafe { OwnedFd::from_raw_fd(raw) })
    }

    /// `name`'s metadata, without following a symbolic link.
    fn stat_at(&self, name: &CStr) -> Option<libc::stat> {
        // SAFETY: `st` is plain data; all-zero is a valid value.
        let mut st: libc::stat = unsafe { core::mem::zeroed() };
        // SAFETY: valid NUL-terminated name, writable buffer, open directory fd.
        let r = unsafe {
            libc::fstatat(
                self.fd.as_raw_fd(),
                name.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        (r == 0).then_some(st)
    }

    /// The contents of `name`, if it is a regular file owned by the directory's owner
    /// and at most `max_bytes` long. Refreshes its last use (see [`TOUCH_AFTER_SECS`]).
    pub fn read(&self, name: &str, max_bytes: usize) -> Option<Vec<u8>> {
        let c = valid_name(name)?;
        // O_NONBLOCK: opening a FIFO planted at the name must not hang the program.
        let fd = self.open_file(&c, libc::O_RDONLY | libc::O_NONBLOCK)?;
        let st = fstat(fd.as_raw_fd())?;
        let len = usize::try_from(st.st_size).ok()?;
        if !is_regular(&st) || st.st_uid != self.owner || len > max_bytes {
            return None;
        }
        if self.writable
            && now_ns().saturating_sub(mtime_ns(&st)) > TOUCH_AFTER_SECS * 1_000_000_000
        {
            // SAFETY: a null `times` sets both timestamps to now on an fd we own.
            unsafe { libc::futimens(fd.as_raw_fd(), core::ptr::null()) };
        }
        let mut data = Vec::new();
        data.try_reserve_exact(len).ok()?;
        // One byte more than allowed: a file that grew past the bound is rejected too.
        let limit = u64::try_from(max_bytes).ok()?.saturating_add(1);
        File::from(fd).take(limit).read_to_end(&mut data).ok()?;
        (data.len() <= max_bytes).then_some(data)
    }

    /// True when `name` is a regular file owned by the directory's owner (what
    /// [`CacheDir::read`] would accept, size aside), without opening it.
    pub fn contains(&self, name: &str) -> bool {
        valid_name(name)
            .and_then(|c| self.stat_at(&c))
            .is_some_and(|st| is_regular(&st) && st.st_uid == self.owner)
    }

    /// Stores `bytes` as `name` (a temporary file renamed into place, mode 0600), then
    /// evicts least recently used entries other than `name`'s down to the bound.
    /// False if it could not be stored (read-only cache, full disk, bad name).
    pub fn write(&self, name: &str, bytes: &[u8]) -> bool {
        let stored = self.write_no_evict(name, bytes);
        if stored {
            self.evict(name);
        }
        stored
    }

    fn write_no_evict(&self, name: &str, bytes: &[u8]) -> bool {
        if !self.writable {
            return false;
        }
        let Some(target) = valid_name(name) else {
            return false;
        };
        let tmp_name = format!(
            "{name}.tmp.{}.{}",
            std::process::id(),
            now_ns().rem_euclid(1_000_000_000)
        );
        let Some(tmp) = valid_name(&tmp_name) else {
            return false;
        };
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL;
        let Some(fd) = self.open_file(&tmp, flags) else {
            return false;
        };
        let dir = self.fd.as_raw_fd();
        let written = File::from(fd).write_all(bytes).is_ok();
        // SAFETY: both names are NUL-terminated and relative to the open directory fd;
        // renameat replaces a symbolic link at `target` without following it.
        if written && unsafe { libc::renameat(dir, tmp.as_ptr(), dir, target.as_ptr()) } == 0 {
            return true;
        }
        // SAFETY: as above; removes our own temporary.
        unsafe { libc::unlinkat(dir, tmp.as_ptr(), 0) };
        false
    }

    /// Removes `name` (a symbolic link is removed, not its target). True if it is gone.
    pub fn remove(&self, name: &str) -> bool {
        let Some(c) = valid_name(name) else {
            return false;
        };
        if !self.writable {
            return false;
        }
        // SAFETY: NUL-terminated name relative to the open directory fd.
        let r = unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOENT)
    }

    /// Takes an exclusive `flock` on the file `name` (created 0600), without waiting:
    /// `None` when another process holds it or the cache is read-only.
    pub fn lock(&self, name: &str) -> Option<CacheLock> {
        if !self.writable {
            return None;
        }
        let c = valid_name(name)?;
        let fd = self.open_file(&c, libc::O_RDWR | libc::O_CREAT | libc::O_NONBLOCK)?;
        let st = fstat(fd.as_raw_fd())?;
        if !is_regular(&st) || st.st_uid != self.owner {
            return None;
        }
        // SAFETY: flock on a descriptor we own; failure (EWOULDBLOCK) leaves no lock.
        let r = unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        (r == 0).then_some(CacheLock { _fd: fd })
    }

    /// Calls `f` with every name in the directory and its metadata (not following
    /// links); names that vanish meanwhile are skipped.
    fn scan(&self, mut f: impl FnMut(&str, &libc::stat)) {
        let dot = c".";
        // A descriptor of its own: readdir moves the file offset, which must not be
        // shared with `self.fd` (another thread may be listing through it).
        let Some(fd) = self.open_file(dot, libc::O_RDONLY | libc::O_DIRECTORY) else {
            return;
        };
        let raw = fd.as_raw_fd();
        // SAFETY: `raw` is an open directory descriptor; on success fdopendir owns it.
        let dir = unsafe { libc::fdopendir(raw) };
        if dir.is_null() {
            return; // `fd` is still ours and closes on drop.
        }
        core::mem::forget(fd); // Now owned by `dir`, closed by closedir below.
        loop {
            // SAFETY: `dir` is a valid DIR stream used by this thread only.
            let ent = unsafe { libc::readdir(dir) };
            if ent.is_null() {
                break;
            }
            // SAFETY: readdir returned a valid entry whose d_name is NUL-terminated; it
            // stays valid until the next readdir on `dir`, and is copied before that.
            let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) };
            if let (Ok(text), Some(st)) = (name.to_str(), self.stat_at(name)) {
                f(text, &st);
            }
        }
        // SAFETY: `dir` came from fdopendir and is closed once.
        unsafe { libc::closedir(dir) };
    }

    /// lgmalloc's files in the directory (regular files owned by the owner; not the lock
    /// file), most recently used first.
    pub fn entries(&self) -> Vec<CacheFile> {
        let mut files = Vec::new();
        self.scan(|name, st| {
            if is_cache_file(name) && name != LOCK_NAME && is_regular(st) && st.st_uid == self.owner
            {
                files.push(CacheFile {
                    name: name.to_owned(),
                    disk_bytes: u64::try_from(st.st_blocks).unwrap_or(0).saturating_mul(512),
                    len: u64::try_from(st.st_size).unwrap_or(0),
                    last_use_ns: mtime_ns(st),
                });
            }
        });
        files.sort_by(|a, b| b.last_use_ns.cmp(&a.last_use_ns).then(a.name.cmp(&b.name)));
        files
    }

    /// Disk usage of the directory and lgmalloc's files in it, as `du` counts it.
    pub fn usage(&self) -> u64 {
        self.own_disk_bytes() + self.entries().iter().map(|f| f.disk_bytes).sum::<u64>()
    }

    /// The directory's own blocks, which `du` counts too (a directory that held many
    /// entries keeps its larger size).
    fn own_disk_bytes(&self) -> u64 {
        fstat(self.fd.as_raw_fd()).map_or(0, |st| st.st_blocks as u64 * 512)
    }

    /// The eviction lock, waiting a little for it: besides another process evicting, a
    /// process that forks in another thread shares the lock's open file (and so the
    /// flock) with its child until the child's exec closes it, a millisecond or so.
    fn eviction_lock(&self) -> Option<CacheLock> {
        for _ in 0..EVICTION_LOCK_TRIES {
            if let Some(l) = self.lock(LOCK_NAME) {
                return Some(l);
            }
            if !self.writable {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        None
    }

    /// Removes least recently used entries (all files of an [`entry_stem`] together),
    /// never `keep`'s, until the usage is within the bound. Does nothing (and reports
    /// the usage as 0) when another process keeps the eviction lock for 20 ms.
    pub fn evict(&self, keep: &str) -> Eviction {
        let mut done = Eviction::default();
        let Some(_lock) = self.eviction_lock() else {
            return done;
        };
        let files = self.entries();
        done.usage = self.own_disk_bytes() + files.iter().map(|f| f.disk_bytes).sum::<u64>();
        if done.usage <= self.max_bytes {
            return done;
        }
        // Entries: (last use, stem), each with its files; oldest first.
        let mut groups: Vec<(i64, &str, Vec<&CacheFile>)> = Vec::new();
        for f in &files {
            let stem = entry_stem(&f.name);
            match groups.iter_mut().find(|g| g.1 == stem) {
                Some(g) => {
                    g.0 = g.0.max(f.last_use_ns);
                    g.2.push(f);
                }
                None => groups.push((f.last_use_ns, stem, vec![f])),
            }
        }
        groups.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(b.1)));
        let keep = entry_stem(keep);
        for (_, stem, members) in &groups {
            if done.usage <= self.max_bytes {
                break;
            }
            if *stem == keep {
                continue;
            }
            for f in members {
                // Gone already (another process's clear) counts as removed.
                if self.remove(&f.name) {
                    done.removed += 1;
                    done.usage = done.usage.saturating_sub(f.disk_bytes);
                }
            }
        }
        done
    }

    /// Removes all of lgmalloc's files (entries, companions, temporaries, the lock file;
    /// symbolic links at such names too, never what they point to). Other files stay.
    /// Returns the number removed.
    pub fn clear(&self) -> usize {
        let mut names = Vec::new();
        self.scan(|name, st| {
            if is_cache_file(name) && !is_dir(st) {
                names.push(name.to_owned());
            }
        });
        // The lock last, so that a concurrent eviction stays serialised meanwhile.
        names.sort_by_key(|n| n == LOCK_NAME);
        names.iter().filter(|n| self.remove(n)).count()
    }

    /// The analysis stored as `name`, if present and valid; an invalid one is reported
    /// (`LGMALLOC_VERBOSE`) and treated as absent, to be overwritten.
    pub fn load_analysis(&self, name: &str) -> Option<Analysis> {
        let data = self.read(name, MAX_ANALYSIS_BYTES)?;
        match super::cache::decode_checked(&data) {
            Ok(mut a) => {
                a.from_cache = true;
                Some(a)
            }
            Err(why) => {
                report(&format!(
                    "cache entry {} ignored: {why}",
                    self.path.join(name).display()
                ));
                None
            }
        }
    }

    /// Stores `a` as `name` (then evicts, see [`CacheDir::write`]).
    pub fn store_analysis(&self, name: &str, a: &Analysis) -> bool {
        self.write(name, &super::cache::encode(a))
    }
}

/// An analysis as the cache stores it (see the `cache` module for the format).
pub fn encode_analysis(a: &Analysis) -> Vec<u8> {
    super::cache::encode(a)
}

/// Decodes and validates a cache entry: `Err` says what is wrong (the fuzz target and
/// the tests drive the validation through this).
pub fn decode_analysis(data: &[u8]) -> Result<Analysis, &'static str> {
    super::cache::decode_checked(data)
}
