//! Every size and alignment: blocks are big enough, aligned, disjoint and keep content.

use lgmalloc::c_api::*;

fn fill(p: *mut u8, n: usize, seed: usize) {
    for i in 0..n {
        unsafe { *p.add(i) = (i.wrapping_mul(31) ^ seed) as u8 };
    }
}

fn check(p: *const u8, n: usize, seed: usize) {
    for i in 0..n {
        let got = unsafe { *p.add(i) };
        assert_eq!(
            got,
            (i.wrapping_mul(31) ^ seed) as u8,
            "byte {i} of {n}-byte block corrupted"
        );
    }
}

#[test]
fn every_size_up_to_4096_is_aligned_disjoint_and_keeps_content() {
    let mut blocks = Vec::new();
    for size in 1..=4096usize {
        let p = lg_malloc(size) as *mut u8;
        assert!(!p.is_null());
        assert_eq!(p as usize % 16, 0, "size {size} misaligned");
        assert!(unsafe { lg_usable_size(p.cast()) } >= size);
        fill(p, size, size);
        blocks.push((p as usize, size));
    }
    // No two live blocks overlap.
    let mut sorted = blocks.clone();
    sorted.sort();
    for w in sorted.windows(2) {
        assert!(
            w[0].0 + w[0].1 <= w[1].0,
            "blocks {:x}+{} and {:x} overlap",
            w[0].0,
            w[0].1,
            w[1].0
        );
    }
    for &(p, size) in &blocks {
        check(p as *const u8, size, size);
    }
    for (p, _) in blocks {
        unsafe { lg_free(p as *mut _) };
    }
}

#[test]
fn powers_of_two_up_to_64_mib() {
    for shift in 0..=26 {
        for delta in [-1isize, 0, 1] {
            let size = ((1isize << shift) + delta).max(1) as usize;
            let p = lg_malloc(size) as *mut u8;
            assert!(!p.is_null(), "size {size}");
            assert_eq!(p as usize % 16, 0);
            // Touch first, last and a stride in between.
            let stride = (size / 64).max(1);
            for i in (0..size).step_by(stride).chain([size - 1]) {
                unsafe { *p.add(i) = (i % 253) as u8 };
            }
            for i in (0..size).step_by(stride).chain([size - 1]) {
                assert_eq!(unsafe { *p.add(i) }, (i % 253) as u8);
            }
            unsafe { lg_free(p.cast()) };
        }
    }
}

#[test]
fn alignment_matrix_up_to_4_mib() {
    let sizes = [
        1usize,
        8,
        16,
        24,
        100,
        1000,
        4096,
        5000,
        65536,
        300_000,
        5 << 20,
    ];
    for shift in 3..=22 {
        let align = 1usize << shift;
        let mut live = Vec::new();
        for &size in &sizes {
            for _ in 0..3 {
                let p = lg_aligned_alloc(align, size) as *mut u8;
                assert!(!p.is_null(), "align {align} size {size}");
                assert_eq!(p as usize % align, 0, "align {align} size {size}");
                assert!(unsafe { lg_usable_size(p.cast()) } >= size);
                let n = size.min(4096);
                fill(p, n, align ^ size);
                live.push((p, n, align ^ size));
            }
        }
        for &(p, n, seed) in &live {
            check(p, n, seed);
        }
        for (p, _, _) in live {
            unsafe { lg_free(p.cast()) };
        }
    }
}

#[test]
fn posix_memalign_matrix() {
    for shift in 3..=22 {
        let align = 1usize << shift;
        for size in [1usize, 33, 4097, 1 << 20] {
            let mut out = std::ptr::null_mut();
            assert_eq!(unsafe { lg_posix_memalign(&mut out, align, size) }, 0);
            assert_eq!(out as usize % align, 0);
            unsafe { std::ptr::write_bytes(out as *mut u8, 1, size) };
            unsafe { lg_free(out) };
        }
    }
}

#[test]
fn zero_size_with_huge_alignment_is_usable() {
    // Found by fuzzing: the usable bytes of a 0-byte, 4 MiB-aligned block must be mapped.
    for align in [4usize << 20, 8 << 20] {
        let p = lg_aligned_alloc(align, 0) as *mut u8;
        assert!(!p.is_null());
        let n = unsafe { lg_usable_size(p.cast()) };
        unsafe { std::ptr::write_bytes(p, 1, n) };
        let q = unsafe { lg_realloc(p.cast(), 10_000) };
        assert!(!q.is_null());
        unsafe { lg_free(q) };
    }
}
