//! Small allocator tests through the `lg_*` API, sized to run under Miri:
//! `cargo +nightly miri test --test miri_smoke` (see `docs/RELIABILITY.md`). Under Miri
//! the OS layer maps with plain `mmap`, the thread heap lives in a `thread_local!`, and
//! the chunk map is small. They also run (quickly) as ordinary tests.
//!
//! Miri checks every access lgmalloc makes on these paths: pointer provenance through the
//! segment and page arithmetic, the free-list links in freed blocks, the page records,
//! cross-thread frees (data races between the owner and remote threads), and the large
//! object headers.

use lgmalloc::c_api::*;
use std::ffi::c_void;

/// The statistics are process-wide: the tests take turns so that each one's counts are
/// its own.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn stats() -> lgmalloc::LgStats {
    let mut s = lgmalloc::LgStats::default();
    unsafe { lg_stats(&mut s) };
    s
}

/// Live blocks of the class that serves `size` bytes (its block size is the usable size
/// of a block of that request).
fn live_blocks_of(s: &lgmalloc::LgStats, block_size: usize) -> u64 {
    s.classes
        .iter()
        .take(s.class_count as usize)
        .filter(|c| c.block_size == block_size as u64)
        .map(|c| c.live_blocks)
        .sum()
}

fn fill(p: *mut u8, n: usize, seed: u8) {
    for i in 0..n {
        unsafe { *p.add(i) = seed.wrapping_add(i as u8) };
    }
}

fn check(p: *const u8, n: usize, seed: u8) {
    for i in 0..n {
        assert_eq!(unsafe { *p.add(i) }, seed.wrapping_add(i as u8), "byte {i}");
    }
}

#[test]
fn small_blocks_keep_contents_and_are_reused() {
    let _g = serial();
    let sizes = [0usize, 1, 15, 16, 17, 48, 100, 128, 200, 1000, 4000, 9000];
    let mut live = Vec::new();
    for (k, &n) in sizes.iter().enumerate() {
        let p = lg_malloc(n) as *mut u8;
        assert!(!p.is_null());
        assert_eq!(p as usize % 16, 0);
        assert!(unsafe { lg_usable_size(p.cast()) } >= n);
        fill(p, n, k as u8);
        live.push((p, n, k as u8));
    }
    for &(p, n, k) in &live {
        check(p, n, k);
    }
    for &(p, _, _) in live.iter().step_by(2) {
        unsafe { lg_free(p.cast()) };
    }
    // Freed blocks come back for the same sizes.
    for &(_, n, k) in live.iter().step_by(2) {
        let p = lg_malloc(n) as *mut u8;
        fill(p, n, k ^ 0x55);
        check(p, n, k ^ 0x55);
        unsafe { lg_free(p.cast()) };
    }
    for &(p, n, k) in live.iter().skip(1).step_by(2) {
        check(p, n, k);
        unsafe { lg_free(p.cast()) };
    }
}

#[test]
fn calloc_zeroes_and_realloc_keeps_the_prefix() {
    let _g = serial();
    unsafe {
        let p = lg_calloc(10, 30) as *mut u8;
        assert!(!p.is_null());
        check_zero(p, 300);
        fill(p, 300, 7);
        let q = lg_realloc(p.cast(), 3000) as *mut u8;
        assert!(!q.is_null());
        check(q, 300, 7);
        let r = lg_realloc(q.cast(), 40) as *mut u8;
        check(r, 40, 7);
        let s = lg_realloc(std::ptr::null_mut(), 64) as *mut u8;
        assert!(!s.is_null());
        lg_free(r.cast());
        lg_free(s.cast());
        // Overflowing products fail cleanly.
        assert!(lg_calloc(usize::MAX / 2, 3).is_null());
    }
}

fn check_zero(p: *const u8, n: usize) {
    for i in 0..n {
        assert_eq!(unsafe { *p.add(i) }, 0, "byte {i} not zero");
    }
}

#[test]
fn aligned_allocations() {
    let _g = serial();
    unsafe {
        for shift in 4..=12 {
            let align = 1usize << shift;
            let p = lg_aligned_alloc(align, 24) as *mut u8;
            assert!(!p.is_null());
            assert_eq!(p as usize % align, 0, "align {align}");
            fill(p, 24, shift as u8);
            let mut q: *mut c_void = std::ptr::null_mut();
            assert_eq!(lg_posix_memalign(&mut q, align, 40), 0);
            assert_eq!(q as usize % align, 0);
            check(p, 24, shift as u8);
            lg_free(p.cast());
            lg_free(q);
        }
        let mut q: *mut c_void = std::ptr::null_mut();
        assert_eq!(lg_posix_memalign(&mut q, 24, 40), libc::EINVAL);
        assert!(lg_aligned_alloc(3, 40).is_null());
    }
}

#[test]
fn blocks_freed_by_another_thread() {
    let _g = serial();
    let blocks: Vec<usize> = (0..64)
        .map(|i| {
            let p = lg_malloc(48) as *mut u8;
            fill(p, 48, i as u8);
            p as usize
        })
        .collect();
    let t = std::thread::spawn(move || {
        for (i, &p) in blocks.iter().enumerate() {
            check(p as *const u8, 48, i as u8);
            unsafe { lg_free(p as *mut c_void) };
        }
    });
    t.join().unwrap();
    // The owner gets them back through its page's remote list.
    let again: Vec<usize> = (0..64).map(|_| lg_malloc(48) as usize).collect();
    for p in again {
        unsafe { lg_free(p as *mut c_void) };
    }
}

#[test]
fn a_thread_frees_while_the_owner_allocates() {
    let _g = serial();
    // Fill a page so it goes on the full list (watched), then free its blocks from another
    // thread while this one keeps allocating: the notification path runs concurrently.
    let first: Vec<usize> = (0..200).map(|_| lg_malloc(32) as usize).collect();
    let t = std::thread::spawn(move || {
        for p in first {
            unsafe { lg_free(p as *mut c_void) };
        }
    });
    let mut mine = Vec::new();
    for i in 0..200 {
        let p = lg_malloc(32) as *mut u8;
        fill(p, 32, i as u8);
        mine.push((p as usize, i as u8));
    }
    t.join().unwrap();
    for (p, i) in mine {
        check(p as *const u8, 32, i);
        unsafe { lg_free(p as *mut c_void) };
    }
}

#[test]
fn blocks_outlive_their_thread() {
    let _g = serial();
    let blocks = std::thread::spawn(|| {
        (0..20)
            .map(|i| {
                let p = lg_malloc(100) as *mut u8;
                fill(p, 100, i);
                (p as usize, i)
            })
            .collect::<Vec<_>>()
    })
    .join()
    .unwrap();
    // The thread exited: its heap was abandoned, its page waits in the region.
    let block_size = unsafe { lg_usable_size(blocks[0].0 as *mut c_void) };
    let before = stats();
    for (p, i) in blocks {
        check(p as *const u8, 100, i);
        unsafe { lg_free(p as *mut c_void) };
    }
    // Frees of an exited thread's blocks are remote frees onto its abandoned page: the
    // stats snapshot collects them, lg_trim sweeps the page (and gives it back).
    lg_trim();
    let after = stats();
    assert_eq!(
        live_blocks_of(&before, block_size) - live_blocks_of(&after, block_size),
        20,
        "the 20 blocks of the exited thread are not all free after lg_trim"
    );
    assert!(after.bytes_allocated + 20 * block_size as u64 <= before.bytes_allocated);
    // Nothing is left to give back a second time. (Under Miri nothing is ever given back:
    // there is no madvise.)
    assert_eq!(lg_trim(), 0);
}

#[test]
fn large_objects() {
    let _g = serial();
    unsafe {
        let p = lg_malloc(300_000) as *mut u8;
        assert!(!p.is_null());
        assert_eq!(p as usize % 4096, 0);
        fill(p, 4096, 3);
        let q = lg_realloc(p.cast(), 100) as *mut u8;
        check(q, 100, 3);
        lg_free(q.cast());
        let z = lg_calloc(1, 400_000) as *mut u8;
        check_zero(z, 400_000);
        lg_free(z.cast());
        let a = lg_aligned_alloc(1 << 16, 300_000) as *mut u8;
        assert_eq!(a as usize % (1 << 16), 0);
        fill(a, 64, 9);
        lg_free(a.cast());
    }
}

#[test]
fn statistics() {
    let _g = serial();
    // Warm the class so that no page is taken during the measurement.
    let warm = lg_malloc(64);
    let s0 = stats();
    let p = lg_malloc(64);
    let s1 = stats();
    assert_eq!(s1.alloc_count, s0.alloc_count + 1);
    assert_eq!(s1.bytes_allocated, s0.bytes_allocated + 64);
    assert_eq!(live_blocks_of(&s1, 64), live_blocks_of(&s0, 64) + 1);
    assert_eq!(s1.free_count, s0.free_count);
    unsafe { lg_free(p) };
    let s2 = stats();
    assert_eq!(s2.alloc_count, s1.alloc_count);
    assert_eq!(s2.free_count, s1.free_count + 1);
    assert_eq!(s2.bytes_allocated, s0.bytes_allocated);
    assert_eq!(live_blocks_of(&s2, 64), live_blocks_of(&s0, 64));
    // A large object moves the large counters.
    let big = lg_malloc(300_000);
    let s3 = stats();
    assert_eq!(s3.large_live, s2.large_live + 1);
    assert_eq!(s3.alloc_count, s2.alloc_count + 1);
    assert!(s3.bytes_allocated >= s2.bytes_allocated + 300_000);
    unsafe { lg_free(big) };
    let s4 = stats();
    assert_eq!(s4.large_live, s2.large_live);
    assert_eq!(s4.free_count, s3.free_count + 1);
    assert_eq!(s4.bytes_allocated, s2.bytes_allocated);
    unsafe { lg_free(warm) };
}

#[test]
fn large_realloc_grows_and_shrinks() {
    let _g = serial();
    unsafe {
        let p = lg_malloc(300_000) as *mut u8;
        fill(p, 256, 1);
        let q = lg_realloc(p.cast(), 5 << 20) as *mut u8;
        assert!(!q.is_null());
        check(q, 256, 1);
        // Shrinking a mapping of more than one chunk gives its tail back.
        let r = lg_realloc(q.cast(), 300_000) as *mut u8;
        assert!(!r.is_null());
        check(r, 256, 1);
        lg_free(r.cast());
    }
}

#[test]
fn alignment_of_a_whole_chunk() {
    let _g = serial();
    unsafe {
        let p = lg_aligned_alloc(4 << 20, 1000) as *mut u8;
        assert!(!p.is_null());
        assert_eq!(p as usize % (4 << 20), 0);
        fill(p, 1000, 5);
        check(p, 1000, 5);
        lg_free(p.cast());
    }
}
