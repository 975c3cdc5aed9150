//! C API semantics: errno, NULL handling, sizes, alignment, realloc and calloc.

use lgmalloc::c_api::*;
use std::ffi::c_void;
use std::ptr;

fn errno() -> i32 {
    lgmalloc::os::errno()
}
fn set_errno(v: i32) {
    lgmalloc::os::set_errno(v)
}

#[test]
fn malloc_zero_is_unique_and_freeable() {
    let a = lg_malloc(0);
    let b = lg_malloc(0);
    assert!(!a.is_null() && !b.is_null());
    assert_ne!(a, b);
    unsafe {
        assert!(lg_usable_size(a) >= 1);
        lg_free(a);
        lg_free(b);
    }
}

#[test]
fn huge_requests_fail_with_enomem() {
    for size in [usize::MAX, isize::MAX as usize + 1, usize::MAX - 4095] {
        set_errno(0);
        assert!(lg_malloc(size).is_null());
        assert_eq!(errno(), libc::ENOMEM);
        set_errno(0);
        assert!(lg_aligned_alloc(64, size).is_null());
        assert_eq!(errno(), libc::ENOMEM);
    }
    // More than the address space can hold, but below PTRDIFF_MAX: the OS refuses.
    set_errno(0);
    assert!(lg_malloc(1 << 62).is_null());
    assert_eq!(errno(), libc::ENOMEM);
}

#[test]
fn calloc_checks_overflow() {
    set_errno(0);
    assert!(lg_calloc(usize::MAX / 2, 3).is_null());
    assert_eq!(errno(), libc::ENOMEM);
    set_errno(0);
    assert!(lg_calloc(1 << 33, 1 << 31).is_null());
    assert_eq!(errno(), libc::ENOMEM);
}

#[test]
fn calloc_zeroes_reused_memory() {
    for size in [8usize, 24, 100, 1000, 5000, 70_000, 300_000] {
        let mut ptrs = Vec::new();
        for _ in 0..50 {
            let p = lg_malloc(size) as *mut u8;
            unsafe { ptr::write_bytes(p, 0xAB, size) };
            ptrs.push(p);
        }
        for p in ptrs {
            unsafe { lg_free(p.cast()) };
        }
        for _ in 0..50 {
            let p = lg_calloc(1, size) as *mut u8;
            let s = unsafe { std::slice::from_raw_parts(p, size) };
            assert!(s.iter().all(|&b| b == 0), "calloc({size}) not zeroed");
            unsafe { lg_free(p.cast()) };
        }
    }
}

/// calloc skips clearing a block carved just now from memory never used since it was
/// mapped; every other block it hands out must be cleared. In a new thread (a heap of
/// its own, so its first pages are new ones), per size (carved a slice's worth at a
/// time, one block per carve, the largest class): blocks `malloc` handed out, that
/// were dirtied and came back through another thread's free to calloc's slow path
/// (the page's free list empty, as when calloc carves); fresh blocks; blocks reused
/// after local frees and from pages retired and taken again; memory given back by
/// `lg_trim` and reused; and blocks served from the sample arena (sizes this large
/// are sampled often), dirtied and reused.
#[test]
fn calloc_reads_zero_however_the_memory_was_used_before() {
    fn assert_zero(p: *mut c_void, size: usize, what: &str) {
        assert!(!p.is_null());
        let s = unsafe { std::slice::from_raw_parts(p as *const u8, size) };
        if let Some(i) = s.iter().position(|&b| b != 0) {
            panic!("calloc({size}) {what}: byte {i} is {:#x}", s[i]);
        }
    }
    fn dirty(p: *mut c_void, size: usize) {
        unsafe { ptr::write_bytes(p as *mut u8, 0xAB, size) };
    }
    let sampled = std::thread::spawn(|| {
        let mut sampled = 0;
        for size in [
            16usize,
            48,
            100,
            1000,
            1024,
            5000,
            70_000,
            200_000,
            256 << 10,
        ] {
            // Blocks of one carve (at least one), all handed out by malloc, so the
            // page's free list is empty; dirtied and freed by another thread, first
            // block last (it heads the remote list).
            let carve = (1024 / size).max(1);
            let given: Vec<usize> = (0..carve)
                .map(|_| {
                    let p = lg_malloc(size);
                    dirty(p, size);
                    p as usize
                })
                .collect();
            std::thread::spawn(move || {
                for &p in given.iter().rev() {
                    unsafe { lg_free(p as *mut c_void) };
                }
            })
            .join()
            .unwrap();
            let mut held = Vec::new();
            for round in ["after remote frees", "fresh or reused", "reused locally"] {
                for _ in 0..40 {
                    let p = lg_calloc(1, size);
                    assert_zero(p, size, round);
                    sampled += lgmalloc::profile::is_sampled(p as *const u8) as usize;
                    dirty(p, size);
                    held.push(p);
                }
                for p in held.drain(..) {
                    unsafe { lg_free(p) };
                }
            }
        }
        // Pages retired to spares, reused by other classes; then given back and reused.
        for pass in ["pages reused by other classes", "after lg_trim"] {
            for size in [5000usize, 3000, 100, 70_000] {
                let ps: Vec<_> = (0..200).map(|_| lg_calloc(1, size)).collect();
                for &p in &ps {
                    assert_zero(p, size, pass);
                    sampled += lgmalloc::profile::is_sampled(p as *const u8) as usize;
                    dirty(p, size);
                }
                for p in ps {
                    unsafe { lg_free(p) };
                }
            }
            lg_trim();
        }
        sampled
    })
    .join()
    .unwrap();
    assert!(sampled > 0, "no calloc was served by the sample arena");
}

/// `calloc` under churn from several threads: random sizes up to the largest small
/// block (many ending inside a page), each block checked zero, dirtied and freed in
/// random order, with `lg_trim` now and then, so blocks come from fresh memory, from
/// memory given back and from sampled slots reused after a trim.
#[test]
fn calloc_reads_zero_under_churn_from_several_threads() {
    const SIZES: [usize; 10] = [
        24, 200, 3000, 5000, 9000, 20_000, 36_000, 70_000, 150_000, 250_000,
    ];
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            std::thread::spawn(move || {
                let mut rng =
                    0x9E37_79B9_7F4A_7C15u64 ^ (t + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
                let mut next = move || {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng
                };
                let mut live: Vec<(usize, usize)> = Vec::new();
                let mut sampled = 0;
                for i in 0..3000 {
                    let size =
                        SIZES[(next() % SIZES.len() as u64) as usize] + (next() % 64) as usize;
                    let p = lg_calloc(1, size) as *mut u8;
                    assert!(!p.is_null());
                    let s = unsafe { std::slice::from_raw_parts(p, size) };
                    if let Some(at) = s.iter().position(|&b| b != 0) {
                        panic!(
                            "thread {t}, calloc #{i} of {size}: byte {at} is {:#x}",
                            s[at]
                        );
                    }
                    sampled += lgmalloc::profile::is_sampled(p) as usize;
                    unsafe { ptr::write_bytes(p, 0xAB, size) };
                    live.push((p as usize, size));
                    if live.len() > 24 {
                        let (q, _) = live.swap_remove((next() % live.len() as u64) as usize);
                        unsafe { lg_free(q as *mut c_void) };
                    }
                    if i % 64 == 63 {
                        lg_trim();
                    }
                }
                for (q, _) in live {
                    unsafe { lg_free(q as *mut c_void) };
                }
                sampled
            })
        })
        .collect();
    let sampled: usize = threads.into_iter().map(|h| h.join().unwrap()).sum();
    assert!(sampled > 0, "no calloc was served by the sample arena");
}

#[test]
fn free_null_and_errno_preserved() {
    set_errno(1234);
    unsafe { lg_free(ptr::null_mut()) };
    assert_eq!(errno(), 1234);
    let p = lg_malloc(100);
    let big = lg_malloc(1 << 20);
    set_errno(4321);
    unsafe {
        lg_free(p);
        lg_free(big);
    }
    assert_eq!(errno(), 4321);
}

#[test]
fn aligned_alloc_rejects_bad_alignment() {
    for a in [0usize, 3, 24, 100, 4097] {
        set_errno(0);
        assert!(lg_aligned_alloc(a, 64).is_null(), "alignment {a}");
        assert_eq!(errno(), libc::EINVAL);
    }
}

#[test]
fn posix_memalign_contract() {
    let mut out: *mut c_void = ptr::null_mut();
    unsafe {
        assert_eq!(lg_posix_memalign(&mut out, 4, 16), libc::EINVAL);
        assert_eq!(lg_posix_memalign(&mut out, 24, 16), libc::EINVAL);
        assert!(out.is_null());
        set_errno(77);
        assert_eq!(lg_posix_memalign(&mut out, 64, usize::MAX), libc::ENOMEM);
        assert_eq!(errno(), 77);
        assert_eq!(lg_posix_memalign(&mut out, 4096, 10), 0);
        assert_eq!(out as usize % 4096, 0);
        lg_free(out);
    }
}

#[test]
fn realloc_keeps_contents_across_sizes() {
    let sizes = [
        1usize, 15, 16, 17, 100, 1024, 4000, 9000, 100_000, 262_144, 300_000, 5_000_000, 64, 1,
    ];
    let mut p = lg_malloc(sizes[0]) as *mut u8;
    let mut cur = sizes[0];
    unsafe { *p = 0x5A };
    for &n in &sizes[1..] {
        // Fill what we have with a pattern, resize, check the common prefix.
        for i in 0..cur {
            unsafe { *p.add(i) = (i * 7 + n) as u8 };
        }
        let q = unsafe { lg_realloc(p.cast(), n) } as *mut u8;
        assert!(!q.is_null());
        for i in 0..cur.min(n) {
            assert_eq!(
                unsafe { *q.add(i) },
                (i * 7 + n) as u8,
                "byte {i} after realloc {cur}->{n}"
            );
        }
        assert!(unsafe { lg_usable_size(q.cast()) } >= n);
        p = q;
        cur = n;
    }
    unsafe { lg_free(p.cast()) };
}

#[test]
fn realloc_failure_leaves_block_valid() {
    let p = lg_malloc(64) as *mut u8;
    unsafe { ptr::write_bytes(p, 0x33, 64) };
    set_errno(0);
    let q = unsafe { lg_realloc(p.cast(), usize::MAX) };
    assert!(q.is_null());
    assert_eq!(errno(), libc::ENOMEM);
    assert!(
        unsafe { std::slice::from_raw_parts(p, 64) }
            .iter()
            .all(|&b| b == 0x33)
    );
    unsafe { lg_free(p.cast()) };
}

#[test]
fn realloc_null_is_malloc_and_zero_gives_minimal_block() {
    let p = unsafe { lg_realloc(ptr::null_mut(), 40) };
    assert!(!p.is_null());
    let q = unsafe { lg_realloc(p, 0) };
    assert!(!q.is_null());
    unsafe { lg_free(q) };
}

#[test]
fn large_realloc_grows_in_place_or_moves_without_losing_data() {
    let mut n = 300_000usize;
    let p = lg_malloc(n) as *mut u8;
    let mut p = p;
    for i in 0..n {
        unsafe { *p.add(i) = (i % 251) as u8 };
    }
    for _ in 0..6 {
        let m = n * 3;
        let q = unsafe { lg_realloc(p.cast(), m) } as *mut u8;
        assert!(!q.is_null());
        for i in (0..n).step_by(997) {
            assert_eq!(unsafe { *q.add(i) }, (i % 251) as u8);
        }
        for i in n..m {
            unsafe { *q.add(i) = (i % 251) as u8 };
        }
        p = q;
        n = m;
    }
    unsafe { lg_free(p.cast()) };
}

#[test]
fn usable_size_covers_request() {
    for size in (1..20_000)
        .step_by(37)
        .chain([262_144, 262_145, 1 << 22, (1 << 22) + 1])
    {
        let p = lg_malloc(size);
        let u = unsafe { lg_usable_size(p) };
        assert!(u >= size, "size {size} usable {u}");
        // The whole usable size is writable.
        unsafe { ptr::write_bytes(p as *mut u8, 0xEE, u) };
        unsafe { lg_free(p) };
    }
    assert_eq!(unsafe { lg_usable_size(ptr::null()) }, 0);
}

#[test]
fn free_sized_frees_keeps_errno_and_the_block_is_reused() {
    // NULL is a no-op whatever the size, and errno survives.
    set_errno(1234);
    unsafe {
        lg_free_sized(ptr::null_mut(), 0);
        lg_free_sized(ptr::null_mut(), 123);
    }
    assert_eq!(errno(), 1234);
    for (size, stated) in [(123usize, 123usize), (123, 1), (4000, 4000), (40, 0)] {
        // A neighbour of the same class stays live, so the page stays in use.
        let keep = lg_malloc(size) as *mut u8;
        let p = lg_malloc(size) as *mut u8;
        assert!(!keep.is_null() && !p.is_null() && keep != p);
        unsafe {
            ptr::write_bytes(keep, 0x11, size);
            ptr::write_bytes(p, 0x22, size);
            set_errno(4321);
            lg_free_sized(p.cast(), stated);
        }
        assert_eq!(
            errno(),
            4321,
            "lg_free_sized({size}, {stated}) changed errno"
        );
        assert!(
            unsafe { std::slice::from_raw_parts(keep, size) }
                .iter()
                .all(|&b| b == 0x11),
            "lg_free_sized({size}) changed a neighbour"
        );
        // The freed block is really free: the next allocation of its class gets it back
        // (unless one of the two was a sampled allocation, about one per 256 KiB, which
        // comes from the sample arena instead).
        let again = lg_malloc(size) as *mut u8;
        let sampled = |q: *mut u8| lgmalloc::profile::is_sampled(q);
        if !sampled(p.cast()) && !sampled(again) {
            assert_eq!(
                again, p,
                "the block freed by lg_free_sized({size}) was not reused"
            );
        }
        unsafe {
            ptr::write_bytes(again, 0x33, size);
            assert!(
                std::slice::from_raw_parts(keep, size)
                    .iter()
                    .all(|&b| b == 0x11)
            );
            lg_free_sized(again.cast(), size);
            lg_free_sized(keep.cast(), size);
        }
    }
    // A large block: errno preserved. (Whether its address is still known right after
    // is not checked: other tests of this binary may take it from the mapping cache.)
    let big = lg_malloc(3 << 20) as *mut u8;
    assert!(!big.is_null());
    unsafe { ptr::write_bytes(big, 0x44, 3 << 20) };
    set_errno(99);
    unsafe { lg_free_sized(big.cast(), 3 << 20) };
    assert_eq!(errno(), 99);
}

#[test]
fn stats_move_with_allocation() {
    let mut before = lgmalloc::LgStats::default();
    unsafe { lg_stats(&mut before) };
    let ptrs: Vec<_> = (0..1000).map(|_| lg_malloc(48)).collect();
    let big = lg_malloc(3 << 20);
    let mut during = lgmalloc::LgStats::default();
    unsafe { lg_stats(&mut during) };
    assert!(during.alloc_count >= before.alloc_count + 1001);
    assert!(during.large_live >= 1);
    assert!(during.bytes_allocated >= 1000 * 48 + (3 << 20));
    assert!(during.bytes_committed >= during.bytes_allocated / 2);
    assert!(during.bytes_reserved >= during.bytes_committed);
    assert!(during.class_count as usize >= 96);
    let c48 = during.classes.iter().find(|c| c.block_size == 48).unwrap();
    assert!(c48.allocations >= 1000 && c48.live_blocks >= 1000 && c48.pages >= 1);
    for p in ptrs {
        unsafe { lg_free(p) };
    }
    unsafe { lg_free(big) };
    let mut after = lgmalloc::LgStats::default();
    unsafe { lg_stats(&mut after) };
    assert!(after.free_count >= during.free_count + 1001);
}

#[test]
fn version_is_the_crate_version() {
    let v = unsafe { std::ffi::CStr::from_ptr(lg_version()) };
    assert_eq!(v.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
}
