//! The OS layer: every call lgmalloc makes to obtain or return address space.
//!
//! Memory comes from anonymous private mappings. Linux only backs a page with RAM when
//! it is first touched, so "commit" is implicit; "decommit" is `madvise(MADV_DONTNEED)`,
//! which drops the pages and makes them read as zero on the next touch. Where many
//! pages will be written soon, `populate` backs them in one call
//! (`MADV_POPULATE_WRITE`, Linux 5.14) rather than one page fault each.
//!
//! Under Miri only plain `mmap`/`munmap` of whole mappings are modelled, so the Miri
//! variant over-maps, never trims, unmaps or advises, and never moves a mapping.

use core::ptr;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Size of an OS page (x86-64 Linux base pages).
pub const OS_PAGE_SIZE: usize = 4096;

/// Rounds `n` up to a multiple of `align` (a power of two). `None` on overflow.
#[inline]
pub const fn align_up(n: usize, align: usize) -> Option<usize> {
    match n.checked_add(align - 1) {
        Some(v) => Some(v & !(align - 1)),
        None => None,
    }
}

/// Maps `size` bytes of fresh zeroed read-write memory. Null when the OS refuses.
pub fn map(size: usize) -> *mut u8 {
    // SAFETY: an anonymous private mapping at an address the kernel picks touches no
    // existing memory.
    let p = unsafe {
        libc::mmap(
            ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            map_flags(),
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        ptr::null_mut()
    } else {
        p.cast()
    }
}

#[cfg(not(miri))]
fn map_flags() -> libc::c_int {
    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE
}

#[cfg(miri)]
fn map_flags() -> libc::c_int {
    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS
}

/// Returns a mapping (or a page-aligned part of one) to the OS.
///
/// # Safety
/// `[p, p + size)` must be memory lgmalloc mapped and no longer uses.
#[cfg(not(miri))]
pub unsafe fn unmap(p: *mut u8, size: usize) {
    if size == 0 {
        return;
    }
    // SAFETY: the caller owns the range; munmap only fails for bad arguments, which
    // would leave the range mapped (a leak, never corruption).
    unsafe { libc::munmap(p.cast(), size) };
}

/// Miri only unmaps whole mappings from their start, while lgmalloc unmaps parts of
/// them (the slack of an aligned reservation, the tail of a shrunk or reused large
/// object) and the Miri `map_aligned` hands out pointers inside a larger mapping. Under
/// Miri memory is therefore never given back: the ranges stay mapped, unused.
///
/// # Safety
/// As for the real `unmap`.
#[cfg(miri)]
pub unsafe fn unmap(_p: *mut u8, _size: usize) {}

/// Maps `size` bytes whose start is a multiple of `align` (a power of two that is a
/// multiple of the page size). Returns the start, or null when the OS refuses.
#[cfg(not(miri))]
pub fn map_aligned(size: usize, align: usize) -> *mut u8 {
    // A first try often lands aligned already (the kernel places new mappings next to
    // old ones, and our mappings are aligned multiples).
    let p = map(size);
    if p.is_null() || (p as usize) & (align - 1) == 0 {
        return p;
    }
    // SAFETY: `p` is our fresh mapping of `size` bytes.
    unsafe { unmap(p, size) };
    let Some(over) = size.checked_add(align) else {
        return ptr::null_mut();
    };
    let raw = map(over);
    if raw.is_null() {
        return raw;
    }
    let start = raw as usize;
    let aligned = (start + align - 1) & !(align - 1);
    let head = aligned - start;
    let tail = over - head - size;
    // SAFETY: head and tail are parts of our fresh mapping outside the aligned range.
    unsafe {
        unmap(raw, head);
        unmap((aligned + size) as *mut u8, tail);
    }
    aligned as *mut u8
}

/// Miri cannot unmap part of a mapping: keep the slack mapped.
#[cfg(miri)]
pub fn map_aligned(size: usize, align: usize) -> *mut u8 {
    let Some(over) = size.checked_add(align) else {
        return ptr::null_mut();
    };
    let raw = map(over);
    if raw.is_null() {
        return raw;
    }
    let aligned = ((raw as usize) + align - 1) & !(align - 1);
    aligned as *mut u8
}

/// Reserves `size` bytes of address space whose start is a multiple of `align` (a
/// power of two that is a multiple of the page size), inaccessible: no memory and no
/// commit charge until parts are made accessible ([`make_accessible`]). Null when the
/// OS refuses (an address-space limit); errno is left as it was.
#[cfg(not(miri))]
pub fn reserve_aligned(size: usize, align: usize) -> *mut u8 {
    let Some(over) = size.checked_add(align) else {
        return ptr::null_mut();
    };
    let saved_errno = errno();
    // SAFETY: an anonymous private mapping at an address the kernel picks touches no
    // existing memory.
    let raw = unsafe {
        libc::mmap(
            ptr::null_mut(),
            over,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        set_errno(saved_errno);
        return ptr::null_mut();
    }
    let start = raw as usize;
    let aligned = (start + align - 1) & !(align - 1);
    // SAFETY: the slack before and after the aligned range is our fresh reservation.
    unsafe {
        unmap(raw.cast(), aligned - start);
        unmap((aligned + size) as *mut u8, start + over - aligned - size);
    }
    aligned as *mut u8
}

/// Miri models no inaccessible mappings: nothing is reserved.
#[cfg(miri)]
pub fn reserve_aligned(_size: usize, _align: usize) -> *mut u8 {
    ptr::null_mut()
}

/// Whether the process's address space is limited (`RLIMIT_AS`, `ulimit -v`): memory
/// reserved ahead would count against the limit at once, and memory made accessible
/// inside a reservation would not count at all, so the limit would no longer bound what
/// the program uses.
pub fn address_space_limited() -> bool {
    if cfg!(miri) {
        return false;
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let saved_errno = errno();
    // SAFETY: getrlimit writes only the struct it is given.
    let r = unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut limit) };
    set_errno(saved_errno);
    r == 0 && limit.rlim_cur != libc::RLIM_INFINITY
}

/// Makes `[p, p + size)` (page-aligned) of a reservation readable and writable; it reads
/// as zero. False when the OS refuses (out of memory, a commit limit); errno is left as
/// it was.
///
/// # Safety
/// The range lies in a reservation of ours ([`reserve_aligned`]).
pub unsafe fn make_accessible(p: *mut u8, size: usize) -> bool {
    let saved_errno = errno();
    // SAFETY: per the contract the range is our own reservation.
    let r = unsafe { libc::mprotect(p.cast(), size, libc::PROT_READ | libc::PROT_WRITE) };
    set_errno(saved_errno);
    r == 0
}

/// Lets the OS drop the pages fully inside `[p, p + size)`; they read as zero later.
/// Returns how many bytes were given back.
///
/// # Safety
/// The range must be lgmalloc's mapped memory that holds nothing live.
pub unsafe fn decommit(p: *mut u8, size: usize) -> usize {
    let start = (p as usize + OS_PAGE_SIZE - 1) & !(OS_PAGE_SIZE - 1);
    let end = (p as usize + size) & !(OS_PAGE_SIZE - 1);
    if end <= start {
        return 0;
    }
    if cfg!(miri) {
        return 0;
    }
    DECOMMIT_CALLS.fetch_add(1, Ordering::Relaxed);
    // SAFETY: the caller guarantees the range is ours and unused.
    let r = unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
    if r == 0 { end - start } else { 0 }
}

/// Pages `resident_bytes` asks about per system call: its vector lives on the stack of
/// whichever thread frees, so it stays small (4 MiB of address space per call).
const RESIDENCY_BATCH: usize = 1024;

/// How many bytes of `[p, p + size)` (page-aligned start) are backed by memory now
/// (`mincore`). `None` when the kernel cannot say; the caller then assumes all of it.
/// A page swapped out counts as not resident: use this for memory budgets only, never
/// to conclude that memory reads as zero.
pub fn resident_bytes(p: *mut u8, size: usize) -> Option<usize> {
    if cfg!(miri) || !(p as usize).is_multiple_of(OS_PAGE_SIZE) {
        return None;
    }
    let pages = size.div_ceil(OS_PAGE_SIZE);
    let mut vec = [0u8; RESIDENCY_BATCH];
    let saved_errno = errno();
    let (mut done, mut resident) = (0, 0);
    while done < pages {
        let n = (pages - done).min(RESIDENCY_BATCH);
        let at = p as usize + done * OS_PAGE_SIZE;
        // SAFETY: mincore only reads the page tables of our mapping and writes one byte
        // per page into `vec`, which holds `n <= RESIDENCY_BATCH` of them.
        let r =
            unsafe { libc::mincore(at as *mut libc::c_void, n * OS_PAGE_SIZE, vec.as_mut_ptr()) };
        if r != 0 {
            // free() must not change errno; a failure only makes the caller assume more.
            set_errno(saved_errno);
            return None;
        }
        resident += vec.iter().take(n).filter(|&&b| b & 1 != 0).count();
        done += n;
    }
    Some(resident * OS_PAGE_SIZE)
}

/// False once the kernel turned `MADV_POPULATE_WRITE` down as unknown (Linux before
/// 5.14): the process then relies on page faults and never asks again.
static POPULATE_WORKS: AtomicBool = AtomicBool::new(true);
/// `populate` calls that reached the kernel, and the bytes they covered (statistics).
static POPULATE_CALLS: AtomicUsize = AtomicUsize::new(0);
static POPULATE_BYTES: AtomicUsize = AtomicUsize::new(0);

/// Backs the pages fully inside `[p, p + size)` with memory in one system call
/// (`MADV_POPULATE_WRITE`) instead of one page fault per 4 KiB as they are first
/// written. Pages already resident are left as they are (their contents kept). Returns
/// whether the kernel did it; on failure the memory simply faults in as it is touched.
///
/// # Safety
/// The range must be lgmalloc's mapped read-write memory.
pub unsafe fn populate(p: *mut u8, size: usize) -> bool {
    let start = (p as usize + OS_PAGE_SIZE - 1) & !(OS_PAGE_SIZE - 1);
    let end = (p as usize + size) & !(OS_PAGE_SIZE - 1);
    if end <= start || cfg!(miri) || !POPULATE_WORKS.load(Ordering::Relaxed) {
        return false;
    }
    let saved_errno = errno();
    // SAFETY: the caller guarantees the range is our read-write mapping; populating
    // writes nothing a program can see (missing pages come in zeroed, present ones stay).
    let r = unsafe {
        libc::madvise(
            start as *mut libc::c_void,
            end - start,
            libc::MADV_POPULATE_WRITE,
        )
    };
    POPULATE_CALLS.fetch_add(1, Ordering::Relaxed);
    if r == 0 {
        POPULATE_BYTES.fetch_add(end - start, Ordering::Relaxed);
        return true;
    }
    // EINVAL: an advice this kernel does not know; ENOSYS or EPERM: a sandbox that
    // refuses it. Any other error (out of memory, a signal) is left to the page faults
    // this time only. The caller's errno is not the allocator's business.
    let e = errno();
    if e == libc::EINVAL || e == libc::ENOSYS || e == libc::EPERM {
        POPULATE_WORKS.store(false, Ordering::Relaxed);
    }
    set_errno(saved_errno);
    false
}

/// `decommit` system calls made so far (statistics).
static DECOMMIT_CALLS: AtomicUsize = AtomicUsize::new(0);

/// System calls made so far by `decommit` and by `populate`, and the bytes `populate`
/// backed (statistics).
pub fn advice_counts() -> (usize, usize, usize) {
    (
        DECOMMIT_CALLS.load(Ordering::Relaxed),
        POPULATE_CALLS.load(Ordering::Relaxed),
        POPULATE_BYTES.load(Ordering::Relaxed),
    )
}

/// A coarse monotonic clock in milliseconds (a few milliseconds of resolution, read
/// through the vDSO without a system call), never zero: for the purge delay.
pub fn now_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    (ts.tv_sec as u64) * 1000 + (ts.tv_nsec as u64) / 1_000_000 + 1
}

/// CPU time the process has used so far (user and system, all threads), in ms.
pub fn cpu_time_ms() -> u64 {
    // SAFETY: an all-zero rusage is a valid value for getrusage to overwrite.
    let mut ru: libc::rusage = unsafe { core::mem::zeroed() };
    // SAFETY: getrusage writes into `ru`.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0;
    }
    let ms = |t: libc::timeval| (t.tv_sec as u64) * 1000 + (t.tv_usec as u64) / 1000;
    ms(ru.ru_utime) + ms(ru.ru_stime)
}

/// Moves a mapping to `dest` (an address range we reserved) while growing it, without
/// copying the data. Returns false when the OS refuses (the old mapping is intact).
///
/// # Safety
/// `old` must be a whole mapping of `old_size` bytes owned by lgmalloc, and
/// `[dest, dest + new_size)` a reservation owned by lgmalloc that may be replaced.
#[cfg(not(miri))]
pub unsafe fn remap_to(old: *mut u8, old_size: usize, dest: *mut u8, new_size: usize) -> bool {
    // SAFETY: per the contract both ranges are ours; MREMAP_FIXED replaces `dest`.
    let r = unsafe {
        libc::mremap(
            old.cast(),
            old_size,
            new_size,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            dest.cast::<libc::c_void>(),
        )
    };
    r != libc::MAP_FAILED
}

#[cfg(miri)]
pub unsafe fn remap_to(_: *mut u8, _: usize, _: *mut u8, _: usize) -> bool {
    false
}

/// Sets the calling thread's `errno`.
#[inline]
pub fn set_errno(code: i32) {
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() = code };
}

/// Reads the calling thread's `errno`.
#[inline]
pub fn errno() -> i32 {
    // SAFETY: as in `set_errno`.
    unsafe { *libc::__errno_location() }
}

/// Writes all of `bytes` to `fd`, without allocating.
pub fn write_fd(fd: i32, bytes: &[u8]) {
    let mut rest = bytes;
    while !rest.is_empty() {
        // SAFETY: writes from a valid slice.
        let n = unsafe { libc::write(fd, rest.as_ptr().cast(), rest.len()) };
        if n <= 0 {
            return;
        }
        rest = rest.get(n as usize..).unwrap_or(&[]);
    }
}

/// A 64-bit secret from the kernel, for hardening encodings. Never zero.
pub fn random_u64() -> u64 {
    let mut v: u64 = 0;
    // SAFETY: getrandom writes at most 8 bytes into `v`.
    let n = unsafe { libc::getrandom((&raw mut v).cast(), 8, libc::GRND_NONBLOCK) };
    if n != 8 {
        // Fall back to address-space randomness and the clock: weaker, never fatal.
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes into `ts`.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        v = (ts.tv_nsec as u64)
            ^ ((&raw const v) as u64).rotate_left(17)
            ^ (ts.tv_sec as u64) << 32;
    }
    v | 1
}

/// True while the process is known to run one thread only (glibc's
/// `__libc_single_threaded`, which the first `pthread_create` clears for good). False
/// means other threads may run: a library constructor that ran before lgmalloc's may
/// have started one, and it may be allocating already.
pub fn single_threaded() -> bool {
    #[cfg(not(miri))]
    {
        unsafe extern "C" {
            static __libc_single_threaded: core::ffi::c_char;
        }
        // SAFETY: a byte glibc defines (2.32 and later) and only ever clears; reading
        // it has no other effect.
        unsafe { ptr::read_volatile(&raw const __libc_single_threaded) != 0 }
    }
    #[cfg(miri)]
    {
        true
    }
}

/// True in secure-execution mode: a setuid or setgid program, or one with file
/// capabilities, run by a user who may not have those rights. The environment then
/// belongs to a less privileged caller, so nothing in it may steer the process.
#[cfg(not(miri))]
pub fn secure_execution() -> bool {
    // SAFETY: getauxval has no preconditions; an absent entry reads as 0.
    unsafe { libc::getauxval(libc::AT_SECURE) != 0 }
}

/// Miri has no auxiliary vector (`getauxval` is foreign code it cannot run), and a
/// program it interprets is never set-user-ID.
#[cfg(miri)]
pub fn secure_execution() -> bool {
    false
}
