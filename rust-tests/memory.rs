//! Memory comes back: RSS after freeing a large working set, no page churn in a
//! one-object loop, and lean thread heaps.

use lgmalloc::c_api::*;
use std::sync::{Arc, Barrier};

fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

fn stats() -> lgmalloc::LgStats {
    let mut s = lgmalloc::LgStats::default();
    unsafe { lg_stats(&mut s) };
    s
}

// These tests measure process-wide memory: run them one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn rss_returns_after_freeing_everything() {
    let _g = SERIAL.lock().unwrap();
    let start = rss_bytes();
    let mut ptrs = Vec::with_capacity(400_000);
    for i in 0..400_000usize {
        let size = 16 + (i * 37) % 1000;
        let p = lg_malloc(size) as *mut u8;
        unsafe { std::ptr::write_bytes(p, 1, size) };
        ptrs.push(p);
    }
    let peak = rss_bytes();
    assert!(
        peak > start + (100 << 20),
        "working set not resident? {start} -> {peak}"
    );
    for p in ptrs.drain(..) {
        unsafe { lg_free(p.cast()) };
    }
    drop(ptrs);
    let after = rss_bytes();
    // Without any call to lg_trim, free memory beyond the purge threshold went back.
    assert!(
        after < start + (24 << 20),
        "RSS stayed high: start {start}, peak {peak}, after free {after}"
    );
    lg_trim();
    let trimmed = rss_bytes();
    assert!(
        trimmed < start + (16 << 20),
        "RSS after trim {trimmed}, start {start}"
    );
}

#[test]
fn one_object_loop_never_maps_or_unmaps() {
    let _g = SERIAL.lock().unwrap();
    for size in [16usize, 1000, 20_000, 200_000, 1 << 20, 8 << 20] {
        let warm = lg_malloc(size);
        unsafe { lg_free(warm) };
        let before = stats();
        for _ in 0..20_000 {
            let p = lg_malloc(size);
            unsafe { *(p as *mut u8) = 1 };
            unsafe { lg_free(p) };
        }
        let after = stats();
        assert_eq!(
            before.bytes_reserved, after.bytes_reserved,
            "size {size}: address space changed"
        );
        assert!(
            after.bytes_committed <= before.bytes_committed + 65536,
            "size {size}: committed grew {} -> {}",
            before.bytes_committed,
            after.bytes_committed
        );
    }
}

/// Resident bytes per thread for threads that each hold 14 small objects of three
/// sizes, over threads that hold nothing (the thread stacks and kernel structures).
fn per_thread_bytes(threads: usize, hold: bool) -> usize {
    let ready = Arc::new(Barrier::new(threads + 1));
    let release = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (ready, release) = (ready.clone(), release.clone());
            std::thread::Builder::new()
                .stack_size(64 * 1024)
                .spawn(move || {
                    let mut held = [0usize; 14];
                    if hold {
                        for (i, slot) in held.iter_mut().enumerate() {
                            let size = [24, 56, 120][i % 3];
                            let p = lg_malloc(size) as *mut u8;
                            unsafe { std::ptr::write_bytes(p, 7, size) };
                            *slot = p as usize;
                        }
                    }
                    ready.wait();
                    release.wait();
                    for p in held {
                        unsafe { lg_free(p as *mut _) };
                    }
                })
                .unwrap()
        })
        .collect();
    ready.wait();
    let rss = rss_bytes();
    release.wait();
    for h in handles {
        h.join().unwrap();
    }
    rss
}

#[test]
fn idle_threads_holding_a_few_objects_stay_lean() {
    let _g = SERIAL.lock().unwrap();
    let _ = per_thread_bytes(50, true); // warm up the segments and heap pool
    let idle = per_thread_bytes(500, false);
    let holding = per_thread_bytes(500, true);
    let per_thread = holding.saturating_sub(idle) / 500;
    eprintln!("resident bytes per thread holding 14 objects: {per_thread}");
    assert!(per_thread <= 12 * 1024, "{per_thread} bytes per thread");
}
