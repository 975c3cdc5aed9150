//! The Rust arm's workload: what an ordinary Rust program asks of its global allocator.
//!
//! The main thread builds and tears down hash maps of formatted strings holding vectors,
//! then churns a BTreeMap of formatted values; meanwhile two worker threads each keep a
//! window of boxed byte slices, pushing new ones and removing random old ones, and hand
//! every 8th removed slice to the other worker (through a channel), which frees it.
//! The allocator is chosen at build time: feature `lg` (lgmalloc's `LgMalloc`), feature
//! `mi` (the `mimalloc` crate) or neither (std's `System`, i.e. glibc).
//!
//!     rust-arm-<lg|mi|sys> [scale=N] [--quick]
//!
//! Prints one line `RESULT workload=rust-arm api=<lg|mi|sys> time_s=... hwm_kib=...` like
//! the C workloads (bench/src/bench.h); time_s covers the work only.

use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread;
use std::time::Instant;

#[cfg(all(feature = "lg", feature = "mi"))]
compile_error!("choose one allocator feature: `lg` or `mi`");

#[cfg(feature = "lg")]
#[global_allocator]
static GLOBAL: lgmalloc::LgMalloc = lgmalloc::LgMalloc;

#[cfg(feature = "mi")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const API: &str = if cfg!(feature = "lg") {
    "lg"
} else if cfg!(feature = "mi") {
    "mi"
} else {
    "sys"
};

/// xorshift64*: deterministic, one per thread.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        (self.next() >> 11) % n
    }
}

/// `key=value` from the command line, or the default (`quick` under `--quick`).
fn arg(key: &str, full: u64, quick: u64) -> u64 {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let prefix = format!("{key}=");
    if let Some(v) = args.iter().find_map(|a| a.strip_prefix(&prefix)) {
        return v.parse().unwrap_or(full);
    }
    if args.iter().any(|a| a == "--quick") {
        quick
    } else {
        full
    }
}

/// Hash maps of formatted keys holding small vectors: build, look up, remove half,
/// grow the rest, drop everything; `rounds` times.
fn maps(rounds: u64, entries: u64, rng: &mut Rng) -> u64 {
    let mut sum = 0u64;
    for r in 0..rounds {
        let mut map: HashMap<String, Vec<u32>> = HashMap::new();
        for i in 0..entries {
            let key = format!("item-{r}-{i}-{:x}", rng.next() & 0xffff);
            let len = rng.below(24) as u32;
            map.insert(key, (0..len).collect());
        }
        for i in (0..entries).step_by(3) {
            let key = format!("item-{r}-{i}-");
            sum += map.keys().take(1).filter(|k| k.starts_with(&key)).count() as u64;
        }
        let odd: Vec<String> = map.keys().filter(|k| k.len() % 2 == 1).cloned().collect();
        for k in &odd {
            sum += map.remove(k).map_or(0, |v| v.len() as u64);
        }
        for v in map.values_mut() {
            v.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8, 9]);
        }
        let mut names: Vec<&String> = map.keys().collect();
        names.sort();
        sum += names.len() as u64 + map.values().map(|v| v.len() as u64).sum::<u64>();
    }
    sum
}

/// A BTreeMap of formatted values under random keys: insert, replace, remove the first.
fn btree(steps: u64, rng: &mut Rng) -> u64 {
    let mut tree: BTreeMap<u64, String> = BTreeMap::new();
    let mut sum = 0u64;
    for s in 0..steps {
        let key = rng.below(steps / 4 + 1);
        tree.insert(key, format!("{key:016x}/{s}"));
        if s % 3 == 0
            && let Some((_, v)) = tree.pop_first()
        {
            sum += v.len() as u64;
        }
        if s % 65_536 == 0 {
            let mut all: Vec<String> = tree.values().cloned().collect();
            all.sort_unstable();
            sum += all.len() as u64;
        }
    }
    sum + tree.len() as u64
}

/// A window of `window` boxed slices of 8..2048 bytes (1 in 64 up to 64 KiB): push one,
/// remove a random one; every 8th removed slice goes to the other worker, which frees
/// what it receives (after checking its contents).
fn worker(
    seed: u64,
    steps: u64,
    window: usize,
    tx: Sender<Box<[u8]>>,
    rx: Receiver<Box<[u8]>>,
) -> u64 {
    let mut rng = Rng::new(seed);
    let mut live: Vec<Box<[u8]>> = Vec::with_capacity(window + 1);
    let mut sum = 0u64;
    for s in 0..steps {
        let len = if rng.below(64) == 0 {
            2048 + rng.below(63 * 1024)
        } else {
            8 + rng.below(2041)
        };
        live.push(vec![s as u8; len as usize].into_boxed_slice());
        if live.len() > window {
            let old = live.swap_remove(rng.below(live.len() as u64) as usize);
            if s % 8 == 0 {
                let _ = tx.send(old);
            } else {
                sum += old[old.len() - 1] as u64;
            }
        }
        while let Ok(b) = rx.try_recv() {
            sum += (b[0] == b[b.len() - 1]) as u64;
        }
    }
    sum + live.len() as u64
}

fn hwm_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let scale = arg("scale", 3, 1);
    let t0 = Instant::now();
    let (tx_a, rx_b) = mpsc::channel();
    let (tx_b, rx_a) = mpsc::channel();
    let steps = 600_000 * scale;
    let a = thread::spawn(move || worker(1, steps, 4096, tx_a, rx_a));
    let b = thread::spawn(move || worker(2, steps, 4096, tx_b, rx_b));
    let mut rng = Rng::new(3);
    let mut sum = maps(4 * scale, 100_000, &mut rng);
    sum += btree(500_000 * scale, &mut rng);
    sum += a.join().unwrap_or(0) + b.join().unwrap_or(0);
    let t = t0.elapsed().as_secs_f64();
    println!(
        "RESULT workload=rust-arm api={API} time_s={t:.6} scale={scale} check={} hwm_kib={}",
        sum & 0xffff,
        hwm_kib()
    );
}
