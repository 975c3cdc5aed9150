//! Size classes: which block size serves a request.
//!
//! Standard classes are 16..=128 in steps of 16, then eight classes per doubling up to
//! [`MAX_SMALL_SIZE`] (256 KiB), so that above 128 bytes no request wastes more than
//! 12.5% to rounding, and every block size is a multiple of 16 (the minimum alignment).
//! Between 64 and 128 the 16-byte step is the finer grain that alignment allows.
//!
//! The tables are data written once at start-up, not constants in the fast path, so the
//! predictive runtime can add exact-fit classes (up to [`MAX_CLASSES`]) for sizes the
//! program is known to request, before any thread allocates.

use core::cell::UnsafeCell;

/// Requests above this size get their own mapping (see `large`).
pub const MAX_SMALL_SIZE: usize = 256 * 1024;
/// Sizes up to this are classified with one table load.
pub const TABLE_MAX_SIZE: usize = 8192;
/// Sizes up to this are classified from the copy of the table's start that every heap
/// holds (`heap::Heap::class_of_small`): the malloc fast path then reads the class with
/// one load from the heap it already has in a register, instead of loading the table's
/// address first. Most requests are this small; the copy costs 65 bytes per thread.
pub const HEAP_TABLE_MAX_SIZE: usize = 1024;
/// Entries of a heap's copy of the table.
pub const HEAP_TABLE_LEN: usize = HEAP_TABLE_MAX_SIZE / 16 + 1;
/// Capacity of the class table, standard plus exact-fit classes.
pub const MAX_CLASSES: usize = 112;
/// Number of standard classes.
pub const STANDARD_CLASSES: usize = 8 + 11 * 8;

const TABLE_LEN: usize = TABLE_MAX_SIZE / 16 + 1;

/// What the heap needs to know about one class.
#[derive(Clone, Copy)]
pub struct ClassInfo {
    /// Bytes per block, a multiple of 16.
    pub block_size: u32,
    /// Blocks the first page of this class holds in a new thread heap; the predictive
    /// plan raises it for classes the program is known to use heavily.
    pub first_page_blocks: u32,
    /// True for an exact-fit class added by the predictive plan.
    pub predicted: bool,
    /// True when every new thread heap takes a first page of this class up front (the
    /// plan expects every thread to use it).
    pub reserved: bool,
}

impl ClassInfo {
    const NONE: ClassInfo = ClassInfo {
        block_size: 0,
        first_page_blocks: 0,
        predicted: false,
        reserved: false,
    };

    fn standard(block_size: usize) -> ClassInfo {
        ClassInfo {
            block_size: block_size as u32,
            first_page_blocks: default_first_page_blocks(block_size),
            ..ClassInfo::NONE
        }
    }
}

struct Tables {
    class_of_small: [u8; TABLE_LEN],
    classes: [ClassInfo; MAX_CLASSES],
    count: usize,
    /// Some class is reserved (saves new heaps a walk over the table when none is).
    any_reserved: bool,
}

struct TableCell(UnsafeCell<Tables>);
// SAFETY: the tables are written only during single-threaded start-up (`init` under the
// init lock; `add_exact_class` from the `.init_array` entry, before `main` can start
// threads) and read-only after.
unsafe impl Sync for TableCell {}

static TABLES: TableCell = TableCell(UnsafeCell::new(Tables {
    class_of_small: [0; TABLE_LEN],
    classes: [ClassInfo::NONE; MAX_CLASSES],
    count: 0,
    any_reserved: false,
}));

#[inline(always)]
fn tables() -> &'static Tables {
    // SAFETY: see `TableCell`: no writer runs once allocation has started.
    unsafe { &*TABLES.0.get() }
}

/// Block size of standard class `i` (`i < STANDARD_CLASSES`).
const fn standard_size(i: usize) -> usize {
    if i < 8 {
        return (i + 1) * 16;
    }
    let group = (i - 8) / 8; // doubling from 2^(7+group)
    let step = (i - 8) % 8 + 1;
    let base = 128usize << group;
    base + step * (base >> 3)
}

/// Largest page a class's pages grow to by doubling. A class of larger blocks takes its
/// pages one block each (a retired page a heap reuses whole may still hold more): four
/// to a page, one live block of 64 to 256 KiB kept its three freed neighbours resident
/// (up to 768 KiB) where no other class could reuse them and neither the purge nor
/// `lg_trim` could reach them (7 MB of the realloc-grow benchmark's 29 MB peak).
pub const MAX_PAGE_BYTES: usize = 64 * 1024;

/// Default blocks in a first page: enough to fill one 1 KiB slice, at least 4 blocks;
/// one block larger than `MAX_PAGE_BYTES`.
pub fn default_first_page_blocks(block_size: usize) -> u32 {
    if block_size > MAX_PAGE_BYTES {
        return 1;
    }
    let per_slice = 1024 / block_size;
    per_slice.max(4) as u32
}

/// Builds the standard tables. Called once during initialisation.
pub fn init() {
    // SAFETY: called under the init lock before any allocation reads the tables.
    let t = unsafe { &mut *TABLES.0.get() };
    for i in 0..STANDARD_CLASSES {
        let size = standard_size(i);
        t.classes[i] = ClassInfo::standard(size);
    }
    t.count = STANDARD_CLASSES;
    rebuild_small_table(t);
}

/// Points each table slot at the smallest class that fits it. The standard classes
/// ascend, so one pass pairs the slots with them (start-up cost matters: this runs
/// before every program's `main`).
fn rebuild_small_table(t: &mut Tables) {
    let mut c = 0;
    for slot in 0..TABLE_LEN {
        let size = (slot * 16).max(1);
        // The largest standard class (256 KiB) fits every slot, so `c` stays in range.
        while (t.classes[c].block_size as usize) < size {
            c += 1;
        }
        t.class_of_small[slot] = c as u8;
    }
}

/// Adds an exact-fit class for `size` (rounded up to 16). Returns its index, or the
/// existing class when one already has that block size. Fails when the table is full or
/// the size is not table-classified. Start-up only (before `main`); heaps made before
/// then keep their copy of the table's start until `heap::refresh_class_table`.
pub fn add_exact_class(size: usize, first_page_blocks: u32) -> Option<usize> {
    let size = crate::os::align_up(size.max(16), 16)?;
    if size > TABLE_MAX_SIZE {
        return None;
    }
    // SAFETY: start-up only, see `TableCell`.
    let t = unsafe { &mut *TABLES.0.get() };
    let count = t.count;
    if let Some(i) = t.classes[..count]
        .iter()
        .position(|c| c.block_size as usize == size)
    {
        let c = &mut t.classes[i];
        c.first_page_blocks = c.first_page_blocks.max(first_page_blocks);
        c.predicted = true;
        return Some(i);
    }
    if count >= MAX_CLASSES {
        return None;
    }
    let standard = ClassInfo::standard(size);
    t.classes[count] = ClassInfo {
        first_page_blocks: first_page_blocks.max(standard.first_page_blocks),
        predicted: true,
        ..standard
    };
    t.count = count + 1;
    // Only the slots this class fits better than their current one change.
    for slot in 0..TABLE_LEN {
        let want = (slot * 16).max(1);
        let cur = t.class_of_small[slot] as usize;
        if size >= want && size < t.classes[cur].block_size as usize {
            t.class_of_small[slot] = count as u8;
        }
    }
    Some(count)
}

/// Raises the first-page capacity of the class serving `size` (start-up only).
pub fn set_first_page_blocks(class: usize, blocks: u32) {
    // SAFETY: start-up only, see `TableCell`.
    let t = unsafe { &mut *TABLES.0.get() };
    if let Some(c) = t.classes.get_mut(class) {
        c.first_page_blocks = c.first_page_blocks.max(blocks);
    }
}

/// Marks `class` as reserved in every new thread heap (start-up only).
pub fn set_reserved(class: usize) {
    // SAFETY: start-up only, see `TableCell`.
    let t = unsafe { &mut *TABLES.0.get() };
    if let Some(c) = t.classes.get_mut(class) {
        c.reserved = true;
        t.any_reserved = true;
    }
}

/// True when some class is reserved in every new thread heap.
#[inline]
pub fn any_reserved() -> bool {
    tables().any_reserved
}

/// Class for a request of at most `TABLE_MAX_SIZE` bytes: one table load.
#[inline(always)]
pub fn class_of_table_size(size: usize) -> usize {
    let slot = (size + 15) >> 4;
    debug_assert!(slot < TABLE_LEN);
    // SAFETY: callers pass size <= TABLE_MAX_SIZE, so slot < TABLE_LEN.
    unsafe { *tables().class_of_small.get_unchecked(slot) as usize }
}

/// The first [`HEAP_TABLE_LEN`] entries of the table, for a heap's own copy.
pub fn heap_table() -> [u8; HEAP_TABLE_LEN] {
    let mut copy = [0; HEAP_TABLE_LEN];
    for (entry, class) in copy.iter_mut().zip(tables().class_of_small.iter()) {
        *entry = *class;
    }
    copy
}

/// The block size of the standard class that serves `size` (at most
/// [`MAX_SMALL_SIZE`]), whatever exact-fit classes the table holds: the plan compares a
/// size's exact fit with it before the table changes.
pub fn standard_block_size(size: usize) -> usize {
    if size <= 128 {
        return size.max(1).next_multiple_of(16);
    }
    // (2^k, 2^(k+1)] holds eight classes 2^k + j * 2^(k-3), j = 1..=8.
    let k = (usize::BITS - 1 - (size - 1).leading_zeros()) as usize;
    size.next_multiple_of(1 << (k - 3))
}

/// Class for any request of at most [`MAX_SMALL_SIZE`] bytes.
#[inline]
pub fn size_class_of(size: usize) -> usize {
    if size <= TABLE_MAX_SIZE {
        return class_of_table_size(size);
    }
    // (2^k, 2^(k+1)] holds eight classes 2^k + j * 2^(k-3), j = 1..=8.
    let k = (usize::BITS - 1 - (size - 1).leading_zeros()) as usize;
    let step_shift = k - 3;
    let j = (size - (1 << k) + (1 << step_shift) - 1) >> step_shift;
    8 + (k - 7) * 8 + (j - 1)
}

/// The block size of class `c`.
#[inline(always)]
pub fn block_size(c: usize) -> usize {
    // SAFETY: class indices come from `size_class_of`/`class_count` and are in range.
    unsafe { tables().classes.get_unchecked(c).block_size as usize }
}

/// Full description of class `c`.
#[inline]
pub fn class_info(c: usize) -> ClassInfo {
    tables().classes.get(c).copied().unwrap_or(ClassInfo::NONE)
}

/// How many classes exist now.
#[inline]
pub fn class_count() -> usize {
    tables().count
}

/// The smallest class at or above `size` whose block size is a multiple of `align`
/// (a power of two, at most `MAX_SMALL_SIZE`). Blocks of such a class are `align`
/// aligned because pages are aligned to the largest power of two dividing their block
/// size (see `segment::span_alignment`).
pub fn aligned_class_of(size: usize, align: usize) -> Option<usize> {
    let want = size.max(align);
    if want > MAX_SMALL_SIZE {
        return None;
    }
    let mut c = size_class_of(want);
    // Standard classes ascend; powers of two from 128 up are all classes, so this ends
    // within one doubling.
    while c < STANDARD_CLASSES {
        if block_size(c).is_multiple_of(align) {
            return Some(c);
        }
        c += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_classes_ascend_and_bound_waste() {
        init();
        let mut prev = 0;
        for c in 0..STANDARD_CLASSES {
            let bs = block_size(c);
            assert!(bs > prev && bs.is_multiple_of(16), "class {c} size {bs}");
            prev = bs;
        }
        assert_eq!(block_size(STANDARD_CLASSES - 1), MAX_SMALL_SIZE);
        for size in 1..=MAX_SMALL_SIZE {
            let c = size_class_of(size);
            let bs = block_size(c);
            assert!(bs >= size, "size {size} got {bs}");
            if c > 0 {
                assert!(
                    block_size(c - 1) < size || c >= STANDARD_CLASSES,
                    "size {size} not tightest"
                );
            }
            if size > 128 {
                assert!((bs - size) * 8 <= bs, "size {size} wastes {}", bs - size);
            }
        }
    }

    #[test]
    fn standard_block_size_is_the_standard_class() {
        for size in (1..=MAX_SMALL_SIZE)
            .step_by(7)
            .chain([128, 129, 4096, 4097])
        {
            let want = (0..STANDARD_CLASSES)
                .map(standard_size)
                .find(|&b| b >= size)
                .unwrap();
            assert_eq!(standard_block_size(size), want, "size {size}");
        }
    }

    #[test]
    fn aligned_classes_are_multiples() {
        init();
        for shift in 4..=18 {
            let align = 1usize << shift;
            for size in [1, 17, 100, 1000, 5000, 70000] {
                if let Some(c) = aligned_class_of(size, align) {
                    assert_eq!(block_size(c) % align, 0);
                    assert!(block_size(c) >= size);
                } else {
                    assert!(size.max(align) > MAX_SMALL_SIZE);
                }
            }
        }
    }
}
