//! Soak test (not run by CI: `#[ignore]`d). Run it with `scripts/reliability --soak` or
//! `LGMALLOC_SOAK_SECS=600 cargo test --release --test soak -- --ignored --nocapture`.
//!
//! For `LGMALLOC_SOAK_SECS` seconds (default 600) worker threads come and go, each doing
//! a random mix of malloc, calloc, realloc, aligned_alloc and posix_memalign over small,
//! medium and large sizes, freeing their own blocks and blocks other threads (some of
//! them long gone) left in a shared mailbox. Every block's contents are checked when it
//! is resized or freed. Once a second the test samples `lg_stats` and the process's
//! resident memory; it fails if resident memory outgrows what is live, or keeps
//! growing in the second half of the run, and prints the figures.

use lgmalloc::LgStats;
use lgmalloc::c_api::*;
use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Concurrent workers (each replaced by a new thread when it finishes).
const WORKERS: usize = 6;
/// Blocks a worker keeps at most.
const KEEP: usize = 1000;
/// Blocks the mailbox holds at most.
const MAILBOX: usize = 5000;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A live block and what it must contain.
#[derive(Clone, Copy)]
struct Obj {
    ptr: usize,
    size: usize,
    seed: u8,
}

fn byte(seed: u8, i: usize) -> u8 {
    seed ^ (i as u8).wrapping_mul(31) ^ (i >> 8) as u8
}

/// Offsets written and checked: the first and last 64 bytes and about 32 in between.
fn offsets(size: usize) -> impl Iterator<Item = usize> {
    let step = (size / 32).max(1);
    (0..size.min(64))
        .chain((64..size).step_by(step))
        .chain(size.saturating_sub(64).max(64)..size)
}

fn fill(o: Obj) {
    for i in offsets(o.size) {
        unsafe { *((o.ptr + i) as *mut u8) = byte(o.seed, i) };
    }
}

fn verify(o: Obj, what: &str) {
    for i in offsets(o.size) {
        let got = unsafe { *((o.ptr + i) as *const u8) };
        assert_eq!(
            got,
            byte(o.seed, i),
            "{what}: block {:#x} of {} bytes, byte {i} changed",
            o.ptr,
            o.size
        );
    }
}

fn release(o: Obj, what: &str) {
    verify(o, what);
    unsafe { lg_free(o.ptr as *mut c_void) };
}

fn random_size(rng: &mut Rng) -> usize {
    match rng.below(1000) {
        0..=699 => rng.below(257) as usize,
        700..=959 => 257 + rng.below(8 << 10) as usize,
        960..=997 => (8 << 10) + rng.below(248 << 10) as usize,
        _ => (256 << 10) + rng.below(4 << 20) as usize,
    }
}

#[derive(Default)]
struct Counters {
    ops: AtomicU64,
    threads: AtomicU64,
    remote_frees: AtomicU64,
}

fn worker(seed: u64, ops: u64, mailbox: Arc<Mutex<Vec<Obj>>>, counters: Arc<Counters>) {
    let mut rng = Rng(seed | 1);
    let mut mine: Vec<Obj> = Vec::with_capacity(KEEP);
    for _ in 0..ops {
        let seed = rng.next() as u8;
        match rng.below(100) {
            // Allocate.
            0..=39 if mine.len() < KEEP => {
                let size = random_size(&mut rng);
                let (p, align) = match rng.below(10) {
                    0..=5 => (lg_malloc(size), 16),
                    6 => {
                        let p = lg_calloc(1, size);
                        let z = Obj {
                            ptr: p as usize,
                            size,
                            seed: 0,
                        };
                        for i in offsets(size) {
                            assert_eq!(unsafe { *((z.ptr + i) as *const u8) }, 0, "calloc");
                        }
                        (p, 16)
                    }
                    7 | 8 => {
                        let align = 1usize << (4 + rng.below(if size > 65536 { 20 } else { 9 }));
                        (lg_aligned_alloc(align, size), align)
                    }
                    _ => {
                        let align = 1usize << (3 + rng.below(10));
                        let mut p: *mut c_void = std::ptr::null_mut();
                        assert_eq!(unsafe { lg_posix_memalign(&mut p, align, size) }, 0);
                        (p, align)
                    }
                };
                assert!(!p.is_null(), "allocation of {size} bytes failed");
                assert_eq!(p as usize % align, 0, "{size} bytes not aligned to {align}");
                assert!(unsafe { lg_usable_size(p) } >= size);
                let o = Obj {
                    ptr: p as usize,
                    size,
                    seed,
                };
                fill(o);
                mine.push(o);
            }
            // Resize.
            40..=51 if !mine.is_empty() => {
                let k = rng.below(mine.len() as u64) as usize;
                let old = mine[k];
                verify(old, "before realloc");
                let size = if rng.below(2) == 0 && old.size < (1 << 20) {
                    old.size + rng.below(old.size as u64 + 64) as usize
                } else {
                    random_size(&mut rng)
                };
                let p = unsafe { lg_realloc(old.ptr as *mut c_void, size) };
                assert!(!p.is_null(), "realloc to {size} failed");
                let kept = Obj {
                    ptr: p as usize,
                    size: old.size.min(size),
                    seed: old.seed,
                };
                for i in offsets(old.size).filter(|&i| i < kept.size) {
                    let got = unsafe { *((kept.ptr + i) as *const u8) };
                    assert_eq!(
                        got,
                        byte(old.seed, i),
                        "realloc {} -> {size}: byte {i}",
                        old.size
                    );
                }
                let o = Obj {
                    ptr: p as usize,
                    size,
                    seed,
                };
                fill(o);
                mine[k] = o;
            }
            // Hand a block to whoever comes next.
            52..=61 if !mine.is_empty() => {
                let k = rng.below(mine.len() as u64) as usize;
                let o = mine.swap_remove(k);
                let mut m = mailbox.lock().unwrap();
                if m.len() < MAILBOX {
                    m.push(o);
                } else {
                    drop(m);
                    release(o, "local free");
                }
            }
            // Free blocks other threads left.
            62..=71 => {
                let taken: Vec<Obj> = {
                    let mut m = mailbox.lock().unwrap();
                    let n = m.len().min(1 + rng.below(64) as usize);
                    let at = m.len() - n;
                    m.split_off(at)
                };
                counters
                    .remote_frees
                    .fetch_add(taken.len() as u64, Ordering::Relaxed);
                for o in taken {
                    release(o, "cross-thread free");
                }
            }
            // Free one of ours.
            _ if !mine.is_empty() => {
                let k = rng.below(mine.len() as u64) as usize;
                release(mine.swap_remove(k), "local free");
            }
            _ => {}
        }
        counters.ops.fetch_add(1, Ordering::Relaxed);
    }
    // Leave about half of what is left for other threads: blocks of an exited thread.
    let mut m = mailbox.lock().unwrap();
    for (i, o) in mine.into_iter().enumerate() {
        if i % 2 == 0 && m.len() < MAILBOX {
            m.push(o);
        } else {
            release(o, "exit free");
        }
    }
}

fn stats() -> LgStats {
    let mut s = LgStats::default();
    unsafe { lg_stats(&mut s) };
    s
}

fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

#[test]
#[ignore = "runs for minutes: scripts/reliability --soak"]
fn soak() {
    let secs: u64 = std::env::var("LGMALLOC_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let duration = Duration::from_secs(secs);
    let start = Instant::now();
    let mailbox = Arc::new(Mutex::new(Vec::with_capacity(MAILBOX)));
    let counters = Arc::new(Counters::default());
    let mut rng = Rng(0x50AC_0000 ^ secs);
    let spawn = |rng: &mut Rng| {
        let (m, c) = (mailbox.clone(), counters.clone());
        c.threads.fetch_add(1, Ordering::Relaxed);
        let seed = rng.next();
        // Lifetimes from a few hundred operations to a few hundred thousand.
        let scale = 8 + rng.below(11);
        let ops = 200 + rng.below(1 << scale);
        std::thread::spawn(move || worker(seed, ops, m, c))
    };
    let mut workers: Vec<_> = (0..WORKERS).map(|_| spawn(&mut rng)).collect();

    // (elapsed s, live bytes, committed, rss)
    let mut samples: Vec<(f64, u64, u64, u64)> = Vec::new();
    let mut next_sample = Instant::now();
    let mut next_report = Instant::now();
    println!(
        "soak: {secs} s, {WORKERS} workers at a time\n\
         soak: {:>7} {:>10} {:>8} {:>12} {:>12} {:>12} {:>8}",
        "time s", "ops", "threads", "live MiB", "committed", "RSS MiB", "heaps"
    );
    while start.elapsed() < duration {
        for w in workers.iter_mut() {
            if w.is_finished() {
                let done = std::mem::replace(w, spawn(&mut rng));
                if let Err(e) = done.join() {
                    std::panic::resume_unwind(e);
                }
            }
        }
        if Instant::now() >= next_sample {
            let s = stats();
            let r = rss();
            let t = start.elapsed().as_secs_f64();
            samples.push((t, s.bytes_allocated, s.bytes_committed, r));
            next_sample += Duration::from_secs(1);
            if Instant::now() >= next_report {
                println!(
                    "soak: {:>7.0} {:>10} {:>8} {:>12.1} {:>12.1} {:>12.1} {:>8}",
                    t,
                    counters.ops.load(Ordering::Relaxed),
                    counters.threads.load(Ordering::Relaxed),
                    mib(s.bytes_allocated),
                    mib(s.bytes_committed),
                    mib(r),
                    s.live_heaps
                );
                next_report += Duration::from_secs((secs / 20).max(1));
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    for w in workers {
        if let Err(e) = w.join() {
            std::panic::resume_unwind(e);
        }
    }
    let rest: Vec<Obj> = std::mem::take(&mut *mailbox.lock().unwrap());
    for o in rest {
        release(o, "final free");
    }
    lg_trim();
    let end = stats();

    let peak_live = samples.iter().map(|s| s.1).max().unwrap_or(0);
    let peak_committed = samples.iter().map(|s| s.2).max().unwrap_or(0);
    let peak_rss = samples.iter().map(|s| s.3).max().unwrap_or(0);
    let half = samples.len() / 2;
    let first_half_rss = samples[..half].iter().map(|s| s.3).max().unwrap_or(0);
    let second_half_rss = samples[half..].iter().map(|s| s.3).max().unwrap_or(0);
    println!(
        "soak: {} ops, {} threads, {} cross-thread frees",
        counters.ops.load(Ordering::Relaxed),
        counters.threads.load(Ordering::Relaxed),
        counters.remote_frees.load(Ordering::Relaxed)
    );
    println!(
        "soak: peak live {:.1} MiB, peak committed {:.1} MiB, peak RSS {:.1} MiB \
         (first half {:.1}, second half {:.1}); RSS/live {:.2}",
        mib(peak_live),
        mib(peak_committed),
        mib(peak_rss),
        mib(first_half_rss),
        mib(second_half_rss),
        peak_rss as f64 / peak_live.max(1) as f64
    );
    println!(
        "soak: after freeing everything: live {:.1} MiB, committed {:.1} MiB, RSS {:.1} MiB, \
         {} live heaps",
        mib(end.bytes_allocated),
        mib(end.bytes_committed),
        mib(rss()),
        end.live_heaps
    );
    assert!(
        peak_rss <= 3 * peak_live + (160 << 20),
        "resident memory {:.1} MiB is out of proportion to live {:.1} MiB",
        mib(peak_rss),
        mib(peak_live)
    );
    assert!(
        second_half_rss <= first_half_rss + first_half_rss / 2 + (32 << 20),
        "resident memory kept growing: {:.1} MiB in the first half, {:.1} MiB in the second",
        mib(first_half_rss),
        mib(second_half_rss)
    );
    assert!(end.live_heaps <= 2, "heaps of exited threads still live");
    assert!(
        end.bytes_allocated < (1 << 20),
        "{} bytes still counted live after freeing everything",
        end.bytes_allocated
    );
}
