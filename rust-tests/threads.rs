//! Threads: cross-thread frees with content checks, frees after the allocating thread
//! exited, and thread churn that must not grow memory.

use lgmalloc::c_api::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Barrier};

mod common;
use common::Rng;

#[derive(Clone, Copy)]
struct Obj {
    ptr: usize,
    size: usize,
    tag: u8,
}
unsafe impl Send for Obj {}

fn make(rng: &mut Rng) -> Obj {
    let size = match rng.next() % 16 {
        0 => 1 + (rng.next() % 100_000) as usize,
        1 => 300_000 + (rng.next() % 200_000) as usize,
        _ => 1 + (rng.next() % 512) as usize,
    };
    let tag = rng.next() as u8;
    let p = lg_malloc(size) as *mut u8;
    assert!(!p.is_null());
    unsafe {
        std::ptr::write_bytes(p, tag, size.min(256));
        *p.add(size - 1) = tag;
    }
    Obj {
        ptr: p as usize,
        size,
        tag,
    }
}

fn verify_and_free(o: Obj) {
    let p = o.ptr as *mut u8;
    let head = unsafe { std::slice::from_raw_parts(p, o.size.min(256)) };
    assert!(
        head.iter().all(|&b| b == o.tag),
        "content of a {}-byte block changed",
        o.size
    );
    assert_eq!(unsafe { *p.add(o.size - 1) }, o.tag);
    unsafe { lg_free(p.cast()) };
}

#[test]
fn eight_threads_pass_objects_around_a_ring() {
    const THREADS: usize = 8;
    const OPS: usize = 150_000; // per thread: > 10^6 operations in all
    let (senders, receivers): (Vec<_>, Vec<_>) =
        (0..THREADS).map(|_| mpsc::channel::<Vec<Obj>>()).unzip();
    let done = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::new();
    for (i, rx) in receivers.into_iter().enumerate() {
        let tx = senders[(i + 1) % THREADS].clone();
        let done = done.clone();
        handles.push(std::thread::spawn(move || {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (i as u64 + 1));
            let mut local = Vec::new();
            let mut batch = Vec::new();
            for op in 0..OPS {
                let o = make(&mut rng);
                if op % 8 == 0 {
                    batch.push(o);
                } else {
                    local.push(o);
                }
                if local.len() > 64 {
                    let k = (rng.next() as usize) % local.len();
                    verify_and_free(local.swap_remove(k));
                }
                if batch.len() == 32 {
                    let _ = tx.send(std::mem::take(&mut batch));
                }
                while let Ok(remote) = rx.try_recv() {
                    remote.into_iter().for_each(verify_and_free);
                }
            }
            let _ = tx.send(batch);
            local.into_iter().for_each(verify_and_free);
            drop(tx);
            done.fetch_add(1, Ordering::SeqCst);
            // Keep draining until every sender is gone.
            while let Ok(remote) = rx.recv() {
                remote.into_iter().for_each(verify_and_free);
            }
        }));
    }
    drop(senders);
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(done.load(Ordering::SeqCst), THREADS);
}

#[test]
fn blocks_outlive_their_thread_and_are_freed_elsewhere() {
    let mut all = Vec::new();
    for t in 0..16 {
        let h = std::thread::spawn(move || {
            let mut rng = Rng(77 + t);
            (0..2000).map(|_| make(&mut rng)).collect::<Vec<_>>()
        });
        all.extend(h.join().unwrap());
    }
    // The allocating threads are gone; their heaps were abandoned.
    let half = all.split_off(all.len() / 2);
    let h = std::thread::spawn(move || half.into_iter().for_each(verify_and_free));
    all.into_iter().for_each(verify_and_free);
    h.join().unwrap();
}

fn committed() -> u64 {
    let mut s = lgmalloc::LgStats::default();
    unsafe { lg_stats(&mut s) };
    s.bytes_committed
}

fn live_heaps() -> u64 {
    let mut s = lgmalloc::LgStats::default();
    unsafe { lg_stats(&mut s) };
    s.live_heaps
}

#[test]
fn twenty_thousand_short_lived_threads_do_not_grow_memory() {
    let start = Arc::new(Barrier::new(1));
    let _ = start;
    let run = |n: usize| {
        for _ in 0..n / 4 {
            let hs: Vec<_> = (0..4)
                .map(|t| {
                    std::thread::spawn(move || {
                        let mut rng = Rng(1 + t);
                        let keep: Vec<_> = (0..20).map(|_| make(&mut rng)).collect();
                        // Half freed here, half handed to the parent after we exit.
                        let (a, b) = keep.split_at(10);
                        a.iter().copied().for_each(verify_and_free);
                        b.to_vec()
                    })
                })
                .collect();
            for h in hs {
                h.join().unwrap().into_iter().for_each(verify_and_free);
            }
        }
    };
    run(2000);
    lg_trim();
    let after_warmup = committed();
    run(18_000);
    lg_trim();
    let after = committed();
    assert!(
        after <= after_warmup + (8 << 20),
        "committed grew from {after_warmup} to {after} bytes over 18000 threads"
    );
    assert!(
        live_heaps() <= 8,
        "heaps of exited threads still live: {}",
        live_heaps()
    );
}

/// `fork` while other threads take and give back large mappings (the large-object
/// cache's lock): the child must find every allocator lock free. A child that hangs is
/// killed by its alarm and fails the test.
#[test]
fn fork_while_threads_cycle_large_objects() {
    use std::sync::atomic::AtomicBool;
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..2)
        .map(|t| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut rng = Rng(41 + t);
                while !stop.load(Ordering::Relaxed) {
                    let size = (300 << 10) + rng.below(2 << 20) as usize;
                    let p = lg_malloc(size);
                    assert!(!p.is_null());
                    // SAFETY: `p` holds `size` bytes and is freed once.
                    unsafe {
                        p.cast::<u8>().write(1);
                        lg_free(p);
                    }
                }
            })
        })
        .collect();
    for _ in 0..300 {
        // SAFETY: the child only allocates through lgmalloc and leaves with `_exit`.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            // SAFETY: async-signal-safe calls and lgmalloc's own API in the child.
            unsafe {
                libc::alarm(5);
                let p = lg_malloc(1 << 20);
                let ok = !p.is_null();
                if ok {
                    libc::memset(p, 7, 1 << 20);
                    lg_free(p);
                }
                libc::_exit(if ok { 0 } else { 1 });
            }
        }
        let mut status = 0;
        // SAFETY: waits for the child just forked.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "child failed or hung (status {status:#x})"
        );
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
}

fn stats() -> lgmalloc::LgStats {
    let mut s = lgmalloc::LgStats::default();
    unsafe { lg_stats(&mut s) };
    s
}

/// `lg_stats` counts the locks taken: each new thread's heap comes from the heap pool
/// (its lock) and goes back to it at thread exit, so 8 threads that allocate take at
/// least 16 more acquisitions; contended ones are a subset.
#[test]
fn lock_acquisitions_are_counted() {
    let before = stats();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            std::thread::spawn(move || {
                let blocks: Vec<usize> = (0..64)
                    .map(|i| lg_malloc(16 + i * 24 + t) as usize)
                    .collect();
                for b in blocks {
                    unsafe { lg_free(b as *mut core::ffi::c_void) };
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let after = stats();
    assert!(
        after.lock_acquisitions >= before.lock_acquisitions + 16,
        "lock acquisitions {} -> {} for 8 threads",
        before.lock_acquisitions,
        after.lock_acquisitions
    );
    assert!(after.lock_contended <= after.lock_acquisitions);
    assert!(after.lock_contended >= before.lock_contended);
}

/// `lg_stats` walks every segment's pages while threads cut new pages from their spare
/// runs without the region lock (`segment::split_spare`): the walk steps over a page by
/// its slice map, so it never lands inside a page being cut. Threads start many classes
/// in rounds while the main thread takes snapshots; each snapshot must be sane (no
/// crash, no runaway figures) and the blocks intact.
#[test]
fn statistics_walk_while_threads_cut_pages() {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|t| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut rounds = 0;
                while !stop.load(Ordering::Relaxed) || rounds < 20 {
                    std::thread::spawn(move || {
                        let blocks: Vec<(usize, usize)> = (1..=96)
                            .map(|i| {
                                let size = i * 16 + t;
                                let p = lg_malloc(size) as usize;
                                assert_ne!(p, 0);
                                unsafe { std::ptr::write_bytes(p as *mut u8, i as u8, size) };
                                (p, size)
                            })
                            .collect();
                        for (i, &(p, size)) in blocks.iter().enumerate() {
                            let s = unsafe { std::slice::from_raw_parts(p as *const u8, size) };
                            assert!(s.iter().all(|&b| b == (i + 1) as u8));
                            unsafe { lg_free(p as *mut core::ffi::c_void) };
                        }
                    })
                    .join()
                    .unwrap();
                    rounds += 1;
                }
            })
        })
        .collect();
    // At least half a second and at least a dozen walks while the workers run (a walk
    // is slow under ThreadSanitizer: a deadline alone left it a handful).
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(500);
    let mut snapshots = 0;
    while snapshots < 12 || std::time::Instant::now() < deadline {
        let s = stats();
        assert!(
            s.bytes_allocated < 1 << 30,
            "{} bytes allocated",
            s.bytes_allocated
        );
        assert!(s.bytes_committed <= s.bytes_reserved + (64 << 20));
        let pages: u64 = s.classes.iter().map(|c| c.pages).sum();
        assert!(pages < 1 << 20, "{pages} pages");
        snapshots += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
}
