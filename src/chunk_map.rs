//! Which 4 MiB chunks of the address space hold lgmalloc memory, and of what kind.
//!
//! One byte per chunk of the 47-bit user address space (32 MiB of `.bss`, backed by
//! RAM only where touched). `free` reads it first: a pointer lgmalloc never returned is
//! recognised and reported before any of its metadata is trusted, and a small block is
//! told from a large object with one load.

use core::sync::atomic::{AtomicU8, Ordering};

/// log2 of the chunk size; segments are exactly one chunk, aligned.
pub const CHUNK_SHIFT: usize = crate::geometry::SEGMENT_SHIFT;
/// 2^47 bytes of user address space, in chunks.
const CHUNKS: usize = 1 << (47 - CHUNK_SHIFT);

/// Not lgmalloc memory.
pub const KIND_NONE: u8 = 0;
/// A small-object segment starts at the chunk base.
pub const KIND_SEGMENT: u8 = 1;
/// A large object whose user pointer lies in this chunk, at least one page past its
/// base; its header is the page before the user pointer.
pub const KIND_LARGE: u8 = 2;
/// A large object whose user pointer is exactly the chunk base (alignment >= 4 MiB);
/// its header is the page before, in the previous chunk.
pub const KIND_LARGE_AT_BASE: u8 = 3;
/// The arena of sampled blocks (`sample`): every free of one leaves the fast path.
pub const KIND_SAMPLE: u8 = 4;

#[cfg(not(miri))]
const LEN: usize = CHUNKS;
// Miri cannot afford 32 MiB; its tests allocate near the bottom of a small space.
#[cfg(miri)]
const LEN: usize = 1 << 12;

struct Map([AtomicU8; LEN]);

static MAP: Map = Map([const { AtomicU8::new(KIND_NONE) }; LEN]);

/// The kind of the chunk holding `addr`. Addresses above the 47-bit user space (which
/// no mapping of ours can have) wrap onto the map instead of costing a bounds check on
/// every free; such a pointer faults when its metadata is read.
#[inline(always)]
pub fn kind_of(addr: usize) -> u8 {
    let idx = (addr >> CHUNK_SHIFT) & (LEN - 1);
    // SAFETY: the index is masked into range.
    unsafe { MAP.0.get_unchecked(idx).load(Ordering::Relaxed) }
}

/// The base of the small-object segment holding `addr`, if the chunk holding it is one
/// (`kind_of(addr) == KIND_SEGMENT`). On x86-64 the map byte is compared in memory
/// rather than loaded first, and the base is the chunk index shifted back, which the
/// index the comparison needed already holds (the free fast path).
#[inline(always)]
pub fn segment_holding(addr: usize) -> Option<usize> {
    let idx = (addr >> CHUNK_SHIFT) & (LEN - 1);
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    {
        let base = MAP.0.as_ptr();
        // SAFETY: the index is masked into range; a byte read is atomic, and the asm
        // only reads it.
        unsafe {
            core::arch::asm!(
                "cmp byte ptr [{base} + {idx}], {segment}",
                "jne {no}",
                base = in(reg) base,
                idx = in(reg) idx,
                segment = const KIND_SEGMENT,
                no = label { return None; },
                options(nostack, readonly),
            );
        }
    }
    #[cfg(not(all(target_arch = "x86_64", not(miri))))]
    {
        // SAFETY: the index is masked into range.
        if unsafe { MAP.0.get_unchecked(idx).load(Ordering::Relaxed) } != KIND_SEGMENT {
            return None;
        }
    }
    // An address above the 47-bit user space wraps onto the map: its chunk index names
    // some chunk of ours, and the free path faults on reading the pointer's own words.
    #[cfg(not(miri))]
    {
        Some(idx << CHUNK_SHIFT)
    }
    // Miri's map covers less than the addresses it hands out: the base from the address.
    #[cfg(miri)]
    {
        Some(addr & !((1 << CHUNK_SHIFT) - 1))
    }
}

/// As [`kind_of`], with a bounds check instead of the wrap: `KIND_NONE` for an address
/// the map does not cover (for addresses that may be anything, such as a decoded
/// free-list link, whose metadata must not be read unless they are ours).
#[inline]
pub fn kind_of_any(addr: usize) -> u8 {
    MAP.0
        .get(addr >> CHUNK_SHIFT)
        .map_or(KIND_NONE, |k| k.load(Ordering::Relaxed))
}

/// Records the kind of the chunk holding `addr`. Returns false when the address lies
/// outside the space the map covers (the caller then gives the memory back).
pub fn set_kind(addr: usize, kind: u8) -> bool {
    match MAP.0.get(addr >> CHUNK_SHIFT) {
        Some(k) => {
            k.store(kind, Ordering::Release);
            true
        }
        None => false,
    }
}
