//! Large objects: requests above `MAX_SMALL_SIZE` get a mapping of their own.
//!
//! The page before the user pointer holds a header (mapping base and size, alignment,
//! a check word), so no header sits inside user memory and realloc can grow a mapping in
//! place or move it with `mremap` without copying. Mappings start on a 4 MiB boundary so
//! the chunk map can name the chunk of every user pointer without ambiguity, and they
//! cover at least that whole chunk (untouched pages cost no memory), so reading the page
//! before any page-aligned address of the chunk is safe when a wild pointer is checked.

use core::ptr;
use core::sync::atomic::{AtomicUsize, Ordering};

use crate::chunk_map::{self, CHUNK_SHIFT, KIND_LARGE, KIND_LARGE_AT_BASE, KIND_NONE};
use crate::lock::Locked;
use crate::os::{self, OS_PAGE_SIZE};

const CHUNK: usize = 1 << CHUNK_SHIFT;

#[repr(C)]
struct Header {
    /// `user ^ secret`: tells a real header from user data or a stale pointer.
    check: usize,
    map_base: usize,
    map_size: usize,
    /// Bytes the user may use from the user pointer.
    usable: usize,
    /// Alignment the object was allocated with (at least `OS_PAGE_SIZE`).
    align: usize,
    /// True while the user bytes are known to read as zero (a fresh or decommitted
    /// mapping), so calloc can skip clearing them.
    zeroed: bool,
}

/// Freed mappings kept for reuse, so a program that allocates and frees large buffers
/// in a loop does not map, fault in and unmap them every time. Resident cached bytes
/// are bounded, and a mapping that stays unused for a while is decommitted (checked
/// whenever the cache is used), so memory goes back to the OS after a burst.
struct CacheInner {
    slots: [Cached; CACHE_SLOTS],
    resident: usize,
}

#[derive(Clone, Copy, Default)]
struct Cached {
    base: usize,
    size: usize,
    resident: bool,
    /// When it was cached (coarse monotonic milliseconds).
    since_ms: u64,
}

const CACHE_SLOTS: usize = 16;
/// Mappings larger than this are never cached.
const CACHE_MAX_MAPPING: usize = 64 << 20;
/// Resident bytes the cache may hold.
const CACHE_MAX_RESIDENT: usize = 128 << 20;
/// A cached mapping unused for this long is decommitted.
const CACHE_DECAY_MS: u64 = 1000;

static CACHE: Locked<CacheInner> = Locked::new(CacheInner {
    slots: [Cached {
        base: 0,
        size: 0,
        resident: false,
        since_ms: 0,
    }; CACHE_SLOTS],
    resident: 0,
});

fn with_cache<R>(f: impl FnOnce(&mut CacheInner) -> R) -> R {
    CACHE.with(f)
}

/// Lock hooks for `fork`: a thread caching or taking a mapping while another forks
/// must not leave the child's cache locked.
pub fn lock_for_fork() {
    CACHE.lock_for_fork();
}
pub fn unlock_after_fork(child: bool) {
    CACHE.unlock_after_fork(child);
}

/// Acquisitions of this layer's lock so far, and the contended ones (statistics).
pub fn lock_counts() -> (u64, u64) {
    CACHE.lock_counts()
}

/// The smallest cached mapping of at least `needed` bytes (a page multiple), as
/// `(base, size, resident)`; one more than twice too big gives its tail back first,
/// so a reused mapping never holds much more than its object.
fn cache_take(needed: usize) -> Option<(usize, usize, bool)> {
    with_cache(|c| {
        c.decay(now_ms());
        // Resident mappings first (reusing one saves the page faults too), then the
        // smallest that fits.
        let rank = |s: &Cached| (s.resident, core::cmp::Reverse(s.size));
        let best = c
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.base != 0 && s.size >= needed)
            .max_by_key(|(_, s)| rank(s))
            .map(|(i, _)| i);
        let mut slot = core::mem::take(&mut c.slots[best?]);
        if slot.resident {
            c.resident -= slot.size;
        }
        if slot.size > 2 * needed {
            // SAFETY: the tail of a cached mapping is ours and holds nothing.
            unsafe { os::unmap((slot.base + needed) as *mut u8, slot.size - needed) };
            slot.size = needed;
        }
        Some((slot.base, slot.size, slot.resident))
    })
}

/// Keeps a freed mapping for reuse. False when the cache has no room for it.
fn cache_put(base: usize, size: usize) -> bool {
    if size > CACHE_MAX_MAPPING {
        return false;
    }
    with_cache(|c| {
        let now = now_ms();
        c.decay(now);
        let Some(i) = c.slots.iter().position(|s| s.base == 0) else {
            return false;
        };
        // The newest mapping is the likeliest to be reused: make room for it by
        // decommitting the oldest resident ones.
        while c.resident + size > CACHE_MAX_RESIDENT && c.decommit_oldest() {}
        let resident = c.resident + size <= CACHE_MAX_RESIDENT;
        if resident {
            c.resident += size;
        } else {
            // SAFETY: the mapping is ours and holds nothing live.
            unsafe { os::decommit(base as *mut u8, size) };
        }
        c.slots[i] = Cached {
            base,
            size,
            resident,
            since_ms: now,
        };
        true
    })
}

impl CacheInner {
    /// Decommits the resident mapping cached longest ago. False when none is resident.
    fn decommit_oldest(&mut self) -> bool {
        let oldest = self
            .slots
            .iter_mut()
            .filter(|s| s.base != 0 && s.resident)
            .min_by_key(|s| s.since_ms);
        let Some(s) = oldest else {
            return false;
        };
        // SAFETY: cached mappings are ours and hold nothing live.
        unsafe { os::decommit(s.base as *mut u8, s.size) };
        s.resident = false;
        self.resident -= s.size;
        true
    }

    /// Decommits resident mappings that have waited longer than `CACHE_DECAY_MS`.
    fn decay(&mut self, now: u64) {
        for s in self.slots.iter_mut() {
            if s.base != 0 && s.resident && now.saturating_sub(s.since_ms) > CACHE_DECAY_MS {
                // SAFETY: cached mappings are ours and hold nothing live.
                unsafe { os::decommit(s.base as *mut u8, s.size) };
                s.resident = false;
                self.resident -= s.size;
            }
        }
    }
}

fn now_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes into `ts`; the coarse clock is a vDSO read.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// Unmaps every cached mapping (for `lg_trim`). Returns the resident bytes released.
pub fn cache_release() -> usize {
    with_cache(|c| {
        let released = c.resident;
        for s in c.slots.iter_mut() {
            if s.base != 0 {
                // SAFETY: cached mappings are ours and hold nothing live.
                unsafe { os::unmap(s.base as *mut u8, s.size) };
                *s = Cached::default();
            }
        }
        c.resident = 0;
        released
    })
}

/// Bytes of cached mappings, and how many of them are resident (statistics).
pub fn cache_figures() -> (usize, usize) {
    with_cache(|c| (c.slots.iter().map(|s| s.size).sum(), c.resident))
}

/// True when the bytes of the large object at `p` are known to be zero.
pub fn known_zero(p: usize, kind: u8) -> bool {
    // SAFETY: live header.
    lookup(p, kind).is_some_and(|h| unsafe { (*h).zeroed })
}

/// Live large objects and their bytes (statistics).
pub static LIVE_COUNT: AtomicUsize = AtomicUsize::new(0);
pub static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);

fn check_word(user: usize) -> usize {
    user ^ crate::secret::get()
}

#[inline]
fn header_of(user: usize) -> *mut Header {
    (user - OS_PAGE_SIZE) as *mut Header
}

/// Allocates `size` bytes aligned to `align` (any power of two). Null + ENOMEM on
/// failure. The caller has initialised the allocator (the check word needs the secret).
pub fn alloc(size: usize, align: usize) -> *mut u8 {
    let align = align.max(OS_PAGE_SIZE);
    let user = if align < CHUNK {
        map_below_chunk(size, align)
    } else {
        map_chunk_aligned(size, align)
    };
    if user == 0 {
        crate::diag::report_os_failure(size);
        os::set_errno(libc::ENOMEM);
        return ptr::null_mut();
    }
    user as *mut u8
}

/// Mapping starts on a chunk boundary; the user pointer is `align` past it.
fn map_below_chunk(size: usize, align: usize) -> usize {
    let Some(map_size) = mapping_size(align, size) else {
        return 0;
    };
    if let Some((base, cached_size, resident)) = cache_take(map_size) {
        let user = finish(base, cached_size, base + align, size, align, KIND_LARGE);
        // SAFETY: `finish` wrote the header of this live object.
        unsafe { (*header_of(user)).zeroed = !resident };
        return user;
    }
    let base = os::map_aligned(map_size, CHUNK);
    if base.is_null() {
        return 0;
    }
    finish(
        base as usize,
        map_size,
        base as usize + align,
        size,
        align,
        KIND_LARGE,
    )
}

/// Bytes to map for `size` bytes at offset `offset` from a chunk-aligned base.
fn mapping_size(offset: usize, size: usize) -> Option<usize> {
    let n = os::align_up(offset.checked_add(size)?, OS_PAGE_SIZE)?;
    Some(n.max(CHUNK))
}

/// Alignment of 4 MiB or more: the user pointer is a chunk base and the header page
/// sits just before it.
fn map_chunk_aligned(size: usize, align: usize) -> usize {
    let Some(over) = size
        .checked_add(align)
        .and_then(|n| n.checked_add(OS_PAGE_SIZE))
        .and_then(|n| os::align_up(n, OS_PAGE_SIZE))
    else {
        return 0;
    };
    let raw = os::map(over);
    if raw.is_null() {
        return 0;
    }
    let raw = raw as usize;
    let user = (raw + OS_PAGE_SIZE + align - 1) & !(align - 1);
    let base = user - OS_PAGE_SIZE;
    let Some(end) = os::align_up(user + size.max(1), OS_PAGE_SIZE) else {
        return 0;
    };
    // SAFETY: head and tail are parts of our fresh mapping outside [base, end).
    unsafe {
        os::unmap(raw as *mut u8, base - raw);
        os::unmap(end as *mut u8, raw + over - end);
    }
    finish(base, end - base, user, size, align, KIND_LARGE_AT_BASE)
}

fn finish(base: usize, map_size: usize, user: usize, size: usize, align: usize, kind: u8) -> usize {
    let usable = os::align_up(size.max(1), OS_PAGE_SIZE).unwrap_or(size);
    if !chunk_map::set_kind(user, kind) {
        // SAFETY: our fresh mapping.
        unsafe { os::unmap(base as *mut u8, map_size) };
        return 0;
    }
    // SAFETY: the header page lies inside our fresh mapping.
    unsafe {
        header_of(user).write(Header {
            check: check_word(user),
            map_base: base,
            map_size,
            usable,
            align,
            zeroed: true,
        });
    }
    LIVE_COUNT.fetch_add(1, Ordering::Relaxed);
    LIVE_BYTES.fetch_add(usable, Ordering::Relaxed);
    user
}

/// The header of `p` if `p` is exactly a live large object's user pointer.
fn lookup(p: usize, kind: u8) -> Option<*mut Header> {
    let offset = p & (CHUNK - 1);
    let plausible = match kind {
        KIND_LARGE => p.is_multiple_of(OS_PAGE_SIZE) && offset >= OS_PAGE_SIZE,
        KIND_LARGE_AT_BASE => offset == 0,
        _ => false,
    };
    if !plausible {
        return None;
    }
    let h = header_of(p);
    // SAFETY: for a plausible pointer the page before `p` belongs to the mapping whose
    // user pointer lies in this chunk: its header page, or for an interior page-aligned
    // pointer, the object's own memory. Either is mapped; the check word decides.
    let check = unsafe { (*h).check };
    if check == check_word(p) {
        Some(h)
    } else {
        None
    }
}

/// Frees a large object. Returns false when `p` is not one (the caller reports misuse).
pub fn free(p: usize, kind: u8) -> bool {
    let Some(h) = lookup(p, kind) else {
        return false;
    };
    // SAFETY: `h` is the live header of `p`'s mapping.
    let (base, size, usable) = unsafe {
        (*h).check = 0;
        ((*h).map_base, (*h).map_size, (*h).usable)
    };
    chunk_map::set_kind(p, KIND_NONE);
    LIVE_COUNT.fetch_sub(1, Ordering::Relaxed);
    LIVE_BYTES.fetch_sub(usable, Ordering::Relaxed);
    // Mappings placed for alignments of 4 MiB and more do not start on a chunk
    // boundary and are not reused.
    if kind == KIND_LARGE && cache_put(base, size) {
        return true;
    }
    // SAFETY: the whole mapping belongs to this object, which the caller gave up.
    unsafe { os::unmap(base as *mut u8, size) };
    true
}

/// Bytes usable at `p` (a live large object).
pub fn usable_size(p: usize, kind: u8) -> usize {
    match lookup(p, kind) {
        // SAFETY: live header.
        Some(h) => unsafe { (*h).usable },
        None => 0,
    }
}

/// Resizes a large object in place or by moving its pages. Returns the new user
/// pointer, or null when it cannot (the caller then copies; `p` stays valid).
pub fn realloc_in_place_or_move(p: usize, kind: u8, new_size: usize) -> *mut u8 {
    let Some(h) = lookup(p, kind) else {
        return ptr::null_mut();
    };
    // SAFETY: live header.
    let (base, map_size, usable, align) =
        unsafe { ((*h).map_base, (*h).map_size, (*h).usable, (*h).align) };
    let offset = p - base;
    let Some(new_usable) = os::align_up(new_size.max(1), OS_PAGE_SIZE) else {
        return ptr::null_mut();
    };
    let Some(new_map) = mapping_size(offset, new_size) else {
        return ptr::null_mut();
    };
    if offset + new_usable <= map_size {
        resize_within(h, p, base, map_size, new_map, usable, new_usable);
        return p as *mut u8;
    }
    if kind != KIND_LARGE {
        return ptr::null_mut();
    }
    // Grow: reserve a chunk-aligned destination and move the pages there.
    let dest = os::map_aligned(new_map, CHUNK);
    if dest.is_null() {
        return ptr::null_mut();
    }
    // Forget the old chunk before its pages move away: once they are gone another
    // thread may map that chunk and record it.
    chunk_map::set_kind(p, KIND_NONE);
    // SAFETY: the old mapping is ours and whole; `dest` is our fresh reservation.
    if !unsafe { os::remap_to(base as *mut u8, map_size, dest, new_map) } {
        chunk_map::set_kind(p, KIND_LARGE);
        // SAFETY: our fresh reservation.
        unsafe { os::unmap(dest, new_map) };
        return ptr::null_mut();
    }
    let new_user = dest as usize + offset;
    chunk_map::set_kind(new_user, KIND_LARGE);
    // SAFETY: the header moved with the pages.
    unsafe {
        header_of(new_user).write(Header {
            check: check_word(new_user),
            map_base: dest as usize,
            map_size: new_map,
            usable: new_usable,
            align,
            zeroed: false,
        });
    }
    LIVE_BYTES.fetch_add(new_usable - usable, Ordering::Relaxed);
    new_user as *mut u8
}

/// Grows or shrinks within the current mapping; a shrink gives the tail back.
fn resize_within(
    h: *mut Header,
    p: usize,
    base: usize,
    map_size: usize,
    new_map: usize,
    usable: usize,
    new_usable: usize,
) {
    if new_usable < usable {
        // SAFETY: the bytes past the new size are ours and hold nothing the caller keeps.
        unsafe {
            if new_map < map_size {
                os::unmap((base + new_map) as *mut u8, map_size - new_map);
                (*h).map_size = new_map;
            }
            let keep_end = (base + new_map).min(p + usable);
            if keep_end > p + new_usable {
                os::decommit((p + new_usable) as *mut u8, keep_end - p - new_usable);
            }
        }
        LIVE_BYTES.fetch_sub(usable - new_usable, Ordering::Relaxed);
    } else {
        LIVE_BYTES.fetch_add(new_usable - usable, Ordering::Relaxed);
    }
    // SAFETY: live header.
    unsafe { (*h).usable = new_usable };
}
