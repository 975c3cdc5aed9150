//! The shape of lgmalloc's memory, in one place: segments are 4 MiB chunks, 4 MiB
//! aligned, cut into 1 KiB slices; pages are runs of slices. Constants and address
//! arithmetic only, so every layer can use them.

/// log2 of the segment size; a segment is exactly one chunk of the chunk map.
pub const SEGMENT_SHIFT: usize = 22;
pub const SEGMENT_SIZE: usize = 1 << SEGMENT_SHIFT;
pub const SEGMENT_MASK: usize = SEGMENT_SIZE - 1;
/// log2 of the slice size: the unit pages are made of.
pub const SLICE_SHIFT: usize = 10;
pub const SLICE_SIZE: usize = 1 << SLICE_SHIFT;
/// Slices per segment.
pub const SLICES: usize = SEGMENT_SIZE / SLICE_SIZE;

/// The base of the segment holding `addr`.
#[inline(always)]
pub const fn segment_base(addr: usize) -> usize {
    addr & !SEGMENT_MASK
}
