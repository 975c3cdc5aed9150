//! The segment space: one reservation of address space that small-object segments are
//! placed in, and beside it a flat map from each of its slices to the record of the
//! page holding the slice. `free` finds a block's page with a bounds check and one load
//! ([`page_of`]); a segment mapped on its own costs it the chunk map's byte, the
//! segment's base and the segment's own slice map (four instructions more). Segments
//! are mapped on their own only when the space cannot take them: the reservation was
//! refused (an address-space limit, Miri) or every slot of it is in use.
//!
//! A process under an address-space limit (`RLIMIT_AS`) maps every segment on its own,
//! as the limit then bounds what it uses (a limit set after the space was reserved stops
//! new slots from being made accessible).
//!
//! The space and its map are reserved inaccessible (no memory, no commit charge). A
//! slot and its window of the map become accessible the first time the slot is
//! claimed, and stay so: a released slot is decommitted, not unmapped, so its records
//! read as zero afterwards and a stale pointer into it finds a record no block passes
//! (`free` reports it). Slots are claimed lowest first; the map is read only below the
//! highest slot in use, where every window is written, and the windows above it are
//! decommitted when the top slots are released. (A stray pointer freed while another
//! thread releases the top slot may read such a window after its decommit and fault,
//! rather than be reported.)

use core::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

use crate::geometry::{SEGMENT_SHIFT, SEGMENT_SIZE, SLICE_SHIFT, SLICES};
use crate::lock::Locked;
use crate::os::{self, OS_PAGE_SIZE};

/// The space reserved, and the smallest worth reserving when the OS refuses more (each
/// try asks a quarter of the one before). 64 GiB holds 16,384 segments; its map is
/// 512 MiB of address space, of which the windows of slots in use are written (32 KiB
/// per 4 MiB segment, as each segment's own map would be).
const SPACE_BYTES: usize = 64 << 30;
const SPACE_MIN_BYTES: usize = 1 << 30;
const MAX_SLOTS: usize = SPACE_BYTES >> SEGMENT_SHIFT;
/// Map bytes per slot: one word per slice.
const WINDOW_BYTES: usize = SLICES * core::mem::size_of::<usize>();
const _: () = assert!(WINDOW_BYTES.is_multiple_of(OS_PAGE_SIZE));

/// What the free fast path reads, side by side (the asm of [`page_of`] knows the
/// offsets of the first three).
#[repr(C)]
struct Bounds {
    /// The space's first slice (its base >> `SLICE_SHIFT`).
    first_slice: AtomicUsize,
    /// Slices of the slots below the highest one in use; zero until the space is
    /// reserved, so no address passes before.
    slices: AtomicUsize,
    map: AtomicPtr<AtomicUsize>,
    /// Slices of the whole reservation (for [`window_of`]).
    reserved_slices: AtomicUsize,
}

static BOUNDS: Bounds = Bounds {
    first_slice: AtomicUsize::new(0),
    slices: AtomicUsize::new(0),
    map: AtomicPtr::new(core::ptr::null_mut()),
    reserved_slices: AtomicUsize::new(0),
};

struct Space {
    tried: bool,
    base: usize,
    map: usize,
    /// Slots reserved, and those made accessible so far (always a prefix: slots are
    /// claimed lowest first).
    slots: usize,
    accessible: usize,
    /// One more than the highest slot in use.
    high: usize,
    claimed: [u64; MAX_SLOTS / 64],
}

static SPACE: Locked<Space> = Locked::new(Space {
    tried: false,
    base: 0,
    map: 0,
    slots: 0,
    accessible: 0,
    high: 0,
    claimed: [0; MAX_SLOTS / 64],
});

/// The record of the page holding `addr`, read from the map, if `addr` lies in a slot of
/// the space below the highest one in use (for a slot not in use now: a record of its
/// last segment, which reads as zero). `None` for anything else: a segment mapped on
/// its own, a large object, a pointer that is not ours.
///
/// On x86-64 the three words are read by the instructions that use them (the compiler
/// does not fold atomic loads into an operand, and reaches a static through the GOT):
/// seven instructions in all.
#[inline(always)]
pub fn page_of(addr: usize) -> Option<usize> {
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    {
        let idx: usize;
        let record: usize;
        // SAFETY: the three asm blocks read the three words of `BOUNDS` (plain loads are
        // atomic on x86-64) and, below the high-water mark, where every window is
        // accessible and written (its slot was claimed, which fills it, before the mark
        // covered it), one entry of the map. (A jump out of an asm block with outputs
        // is not stable Rust: the bounds check is a block of its own.)
        unsafe {
            core::arch::asm!(
                "mov {idx}, {addr}",
                "shr {idx}, {shift}",
                "sub {idx}, qword ptr [rip + {bounds}]",
                addr = in(reg) addr,
                idx = out(reg) idx,
                shift = const SLICE_SHIFT,
                bounds = sym BOUNDS,
                options(nostack, readonly, pure),
            );
            core::arch::asm!(
                "cmp {idx}, qword ptr [rip + {bounds} + 8]",
                "jae {no}",
                idx = in(reg) idx,
                bounds = sym BOUNDS,
                no = label { return None; },
                options(nostack, readonly),
            );
            core::arch::asm!(
                "mov {record}, qword ptr [rip + {bounds} + 16]",
                "mov {record}, qword ptr [{record} + 8 * {idx}]",
                idx = in(reg) idx,
                record = out(reg) record,
                bounds = sym BOUNDS,
                options(nostack, readonly, pure),
            );
        }
        Some(record)
    }
    #[cfg(not(all(target_arch = "x86_64", not(miri))))]
    {
        let idx = (addr >> SLICE_SHIFT).wrapping_sub(BOUNDS.first_slice.load(Ordering::Relaxed));
        if idx >= BOUNDS.slices.load(Ordering::Relaxed) {
            return None;
        }
        // SAFETY: below the high-water mark every window is accessible and written.
        Some(unsafe { (*BOUNDS.map.load(Ordering::Relaxed).add(idx)).load(Ordering::Relaxed) })
    }
}

// The fast path's asm reads `BOUNDS` relative to the instruction pointer, which a
// shared object may do only for a symbol that no other module can interpose.
#[cfg(all(target_arch = "x86_64", not(miri)))]
core::arch::global_asm!(".hidden {bounds}", bounds = sym BOUNDS);

/// The slice map of the segment at `seg`, if the segment lies in the space: its window
/// of the space's map.
#[inline]
pub fn window_of(seg: usize) -> Option<*const AtomicUsize> {
    let idx = (seg >> SLICE_SHIFT).wrapping_sub(BOUNDS.first_slice.load(Ordering::Relaxed));
    if idx >= BOUNDS.reserved_slices.load(Ordering::Relaxed) {
        return None;
    }
    // SAFETY: `idx` lies in the map's reservation (only accessible windows are read, of
    // segments that live in claimed slots).
    Some(unsafe { BOUNDS.map.load(Ordering::Relaxed).add(idx).cast_const() })
}

/// Claims the lowest free slot of the space for a new segment, its memory reading as
/// zero, and points every slice of it at the record `fill_offset` bytes past its base
/// (one that reads as zero: no block in it) until the region names them. Null when the
/// space cannot take another segment; the caller then maps one on its own.
pub fn claim(fill_offset: usize) -> *mut u8 {
    SPACE.with(|s| {
        if !s.tried {
            s.tried = true;
            s.reserve();
        }
        let Some(slot) = s.lowest_free() else {
            return core::ptr::null_mut();
        };
        let seg = s.base + (slot << SEGMENT_SHIFT);
        let window = s.window(slot);
        if slot == s.accessible {
            // Under an address-space limit, set after the space was reserved, memory
            // made accessible here would escape it: map segments on their own, which
            // the limit bounds. (Slots used before stay usable: they are counted.)
            if os::address_space_limited() {
                return core::ptr::null_mut();
            }
            // SAFETY: the slot and its window lie in our reservations.
            let ok = unsafe {
                os::make_accessible(seg as *mut u8, SEGMENT_SIZE)
                    && os::make_accessible(window.cast_mut().cast(), WINDOW_BYTES)
            };
            if !ok {
                return core::ptr::null_mut();
            }
            s.accessible += 1;
        }
        for i in 0..SLICES {
            // SAFETY: the window is accessible; `i < SLICES`.
            unsafe { (*window.add(i)).store(seg + fill_offset, Ordering::Relaxed) };
        }
        s.claimed[slot / 64] |= 1 << (slot % 64);
        if slot >= s.high {
            s.high = slot + 1;
            // Release: whoever reads the raised mark finds the window filled.
            BOUNDS.slices.store(s.high * SLICES, Ordering::Release);
        }
        seg as *mut u8
    })
}

/// Gives back the segment at `seg` if it lies in the space: decommits it (its records
/// then read as zero) and frees its slot. False for a segment mapped on its own, which
/// the caller unmaps.
///
/// # Safety
/// Nothing uses the segment any more, and it is off the chunk map.
pub unsafe fn give_back(seg: *mut u8) -> bool {
    SPACE.with(|s| {
        let Some(slot) = s.slot_of(seg as usize) else {
            return false;
        };
        // SAFETY: per the contract nothing of the segment is in use.
        unsafe { os::decommit(seg, SEGMENT_SIZE) };
        s.claimed[slot / 64] &= !(1 << (slot % 64));
        let old_high = s.high;
        while s.high > 0 && !s.is_claimed(s.high - 1) {
            s.high -= 1;
        }
        if s.high < old_high {
            BOUNDS.slices.store(s.high * SLICES, Ordering::Release);
            // SAFETY: the windows of slots at or above the mark are read no more.
            unsafe {
                os::decommit(
                    s.window(s.high).cast_mut().cast(),
                    (old_high - s.high) * WINDOW_BYTES,
                )
            };
        }
        true
    })
}

impl Space {
    /// Reserves the space and its map, as large as the OS allows down to
    /// `SPACE_MIN_BYTES`; leaves the space empty when it allows none.
    fn reserve(&mut self) {
        // Under an address-space limit the space would take most of it at once.
        if os::address_space_limited() {
            return;
        }
        let mut bytes = SPACE_BYTES;
        while bytes >= SPACE_MIN_BYTES {
            let slots = bytes >> SEGMENT_SHIFT;
            let base = os::reserve_aligned(bytes, SEGMENT_SIZE);
            if !base.is_null() {
                let map = os::reserve_aligned(slots * WINDOW_BYTES, OS_PAGE_SIZE);
                if !map.is_null() {
                    self.base = base as usize;
                    self.map = map as usize;
                    self.slots = slots;
                    BOUNDS.map.store(map.cast(), Ordering::Relaxed);
                    BOUNDS
                        .first_slice
                        .store(self.base >> SLICE_SHIFT, Ordering::Relaxed);
                    BOUNDS
                        .reserved_slices
                        .store(slots * SLICES, Ordering::Release);
                    return;
                }
                // SAFETY: our fresh reservation, unused.
                unsafe { os::unmap(base, bytes) };
            }
            bytes /= 4;
        }
    }

    fn lowest_free(&self) -> Option<usize> {
        let words = self.slots.div_ceil(64);
        let (w, bits) = self.claimed[..words]
            .iter()
            .enumerate()
            .find(|(_, bits)| **bits != u64::MAX)?;
        let slot = w * 64 + bits.trailing_ones() as usize;
        (slot < self.slots).then_some(slot)
    }

    fn is_claimed(&self, slot: usize) -> bool {
        self.claimed[slot / 64] & (1 << (slot % 64)) != 0
    }

    fn slot_of(&self, seg: usize) -> Option<usize> {
        let slot = seg.wrapping_sub(self.base) >> SEGMENT_SHIFT;
        (self.slots > 0 && slot < self.slots).then_some(slot)
    }

    fn window(&self, slot: usize) -> *const AtomicUsize {
        (self.map + slot * WINDOW_BYTES) as *const AtomicUsize
    }
}

/// Acquisitions of the space's lock so far, and the contended ones.
pub fn lock_counts() -> (u64, u64) {
    SPACE.lock_counts()
}

/// Lock hooks for `fork` (taken after the region's, which may be waiting for a
/// segment to be claimed).
pub fn lock_for_fork() {
    SPACE.lock_for_fork();
}
pub fn unlock_after_fork(child: bool) {
    SPACE.unlock_after_fork(child);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg_attr(miri, ignore = "Miri reserves no space")]
    fn a_claimed_slot_maps_every_slice_to_its_fill_record_until_given_back() {
        let seg = claim(4096);
        assert!(!seg.is_null());
        let base = seg as usize;
        assert_eq!(base % SEGMENT_SIZE, 0);
        for slice in [0, 1, SLICES / 2, SLICES - 1] {
            let addr = base + (slice << SLICE_SHIFT) + 17;
            assert_eq!(page_of(addr), Some(base + 4096));
            // SAFETY: the slot is ours and accessible.
            let entry = unsafe { (*window_of(base).unwrap().add(slice)).load(Ordering::Relaxed) };
            assert_eq!(entry, base + 4096);
        }
        // SAFETY: the segment is ours, fresh and accessible.
        unsafe { seg.add(12345).write(7) };
        // Not ours: the stack, and the address just below the space.
        let local = 0u64;
        assert_eq!(page_of(&raw const local as usize), None);
        let space_start = BOUNDS.first_slice.load(Ordering::Relaxed) << SLICE_SHIFT;
        assert!(page_of(space_start).is_some());
        assert_eq!(page_of(space_start - 1), None);
        // SAFETY: the test's own segment, unused; the stack is not in the space.
        unsafe {
            assert!(give_back(seg));
            assert!(!give_back((&raw const local).cast_mut().cast()));
        }
        let again = claim(4096);
        assert!(!again.is_null());
        // SAFETY: as above.
        unsafe { assert!(give_back(again)) };
    }
}
