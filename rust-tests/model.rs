//! Randomised operations checked against a shadow model: every live block keeps its
//! contents, no two live blocks overlap, sizes and alignments hold, including blocks
//! handed to another thread to free.

use lgmalloc::c_api::*;
use std::collections::BTreeMap;
use std::sync::mpsc;

mod common;
use common::Rng;

#[derive(Clone, Copy)]
struct Live {
    size: usize,
    fill: u8,
}

struct Model {
    live: BTreeMap<usize, Live>,
}

fn pattern(addr: usize, i: usize, fill: u8) -> u8 {
    fill ^ (i as u8).wrapping_mul(13) ^ (addr >> 4) as u8
}

fn write(p: usize, size: usize, fill: u8) {
    // Write the edges and a sample, enough to catch overlap without O(size) cost.
    for i in sample(size) {
        unsafe { *((p + i) as *mut u8) = pattern(p, i, fill) };
    }
}

fn verify(p: usize, l: Live) {
    for i in sample(l.size) {
        let got = unsafe { *((p + i) as *const u8) };
        assert_eq!(
            got,
            pattern(p, i, l.fill),
            "block {p:#x} size {} byte {i} corrupted",
            l.size
        );
    }
}

fn sample(size: usize) -> impl Iterator<Item = usize> {
    let step = (size / 32).max(1);
    (0..size.min(64))
        .chain((0..size).step_by(step))
        .chain(size.saturating_sub(64)..size)
}

impl Model {
    fn insert(&mut self, p: usize, size: usize, align: usize, fill: u8) {
        assert!(p != 0);
        assert_eq!(p % align.max(16), 0, "{p:#x} not aligned to {align}");
        let usable = unsafe { lg_usable_size(p as *const _) };
        assert!(usable >= size, "usable {usable} < {size}");
        if let Some((&q, l)) = self.live.range(..=p).next_back() {
            assert!(
                q + l.size.max(1) <= p,
                "{p:#x} overlaps block {q:#x}+{}",
                l.size
            );
        }
        if let Some((&q, _)) = self.live.range(p..).next() {
            assert!(p + size.max(1) <= q, "{p:#x}+{size} overlaps block {q:#x}");
        }
        write(p, size, fill);
        self.live.insert(p, Live { size, fill });
    }

    fn remove(&mut self, p: usize) -> Live {
        let l = self.live.remove(&p).unwrap();
        verify(p, l);
        l
    }

    fn pick(&self, rng: &mut Rng) -> Option<usize> {
        if self.live.is_empty() {
            return None;
        }
        let key = rng.next() as usize;
        self.live
            .range(key..)
            .next()
            .or_else(|| self.live.iter().next())
            .map(|(&p, _)| p)
    }
}

fn random_size(rng: &mut Rng) -> usize {
    match rng.below(100) {
        0..=59 => rng.below(128) as usize,
        60..=89 => rng.below(4096) as usize,
        90..=97 => rng.below(300_000) as usize,
        _ => rng.below(3 << 20) as usize,
    }
}

fn run(seed: u64, ops: usize) {
    let mut rng = Rng(seed);
    let mut m = Model {
        live: BTreeMap::new(),
    };
    let (tx, rx) = mpsc::channel::<Vec<(usize, Live)>>();
    let freer = std::thread::spawn(move || {
        for batch in rx {
            for (p, l) in batch {
                verify(p, l);
                unsafe { lg_free(p as *mut _) };
            }
        }
    });
    let mut handoff = Vec::new();
    for _ in 0..ops {
        let fill = rng.next() as u8;
        match rng.below(100) {
            0..=34 => {
                let size = random_size(&mut rng);
                let p = lg_malloc(size) as usize;
                m.insert(p, size, 16, fill);
            }
            35..=39 => {
                let size = random_size(&mut rng) / 4;
                let p = lg_calloc(1, size) as usize;
                for i in sample(size) {
                    assert_eq!(unsafe { *((p + i) as *const u8) }, 0, "calloc not zeroed");
                }
                m.insert(p, size, 16, fill);
            }
            40..=44 => {
                let align = 1usize << (3 + rng.below(17));
                let size = random_size(&mut rng);
                let p = lg_aligned_alloc(align, size) as usize;
                m.insert(p, size, align, fill);
            }
            45..=54 => {
                if let Some(p) = m.pick(&mut rng) {
                    let old = m.remove(p);
                    let size = random_size(&mut rng);
                    let q = unsafe { lg_realloc(p as *mut _, size) } as usize;
                    // The common prefix survived the move.
                    let keep = old.size.min(size);
                    for i in sample(old.size).filter(|&i| i < keep) {
                        let got = unsafe { *((q + i) as *const u8) };
                        assert_eq!(
                            got,
                            pattern(p, i, old.fill),
                            "realloc {p:#x}+{} -> {q:#x}+{size} byte {i}",
                            old.size
                        );
                    }
                    m.insert(q, size, 16, fill);
                }
            }
            55..=59 => {
                if let Some(p) = m.pick(&mut rng) {
                    let l = m.remove(p);
                    handoff.push((p, l));
                    if handoff.len() >= 16 {
                        tx.send(std::mem::take(&mut handoff)).unwrap();
                    }
                }
            }
            _ => {
                if let Some(p) = m.pick(&mut rng) {
                    m.remove(p);
                    unsafe { lg_free(p as *mut _) };
                }
            }
        }
    }
    tx.send(handoff).unwrap();
    drop(tx);
    freer.join().unwrap();
    for p in m.live.keys().copied().collect::<Vec<_>>() {
        m.remove(p);
        unsafe { lg_free(p as *mut _) };
    }
}

#[test]
fn random_operations_match_the_model() {
    for seed in 1..=4u64 {
        run(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15), 60_000);
    }
}

#[test]
fn random_operations_in_parallel() {
    let hs: Vec<_> = (0..4u64)
        .map(|t| std::thread::spawn(move || run(0xDEAD_BEEF + t, 40_000)))
        .collect();
    for h in hs {
        h.join().unwrap();
    }
}
