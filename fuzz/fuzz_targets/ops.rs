//! Sequences of allocator operations decoded from the input, checked against a model.
//!
//! Operations: malloc, calloc, realloc, aligned_alloc, posix_memalign, free, free_sized,
//! usable_size, trim, a hand-off of blocks to another (long-lived) thread that checks and
//! frees them, and a short-lived thread whose blocks outlive it. The model keeps every live
//! block's size, alignment and fill byte: each new block must be aligned, have
//! `usable_size >= size` and overlap no live block; calloc must zero; realloc must keep
//! the common prefix; every block keeps its contents until it is freed (checked on every
//! free, resize and at the end of each input).
#![no_main]

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Mutex, OnceLock};

use lgmalloc::c_api::*;
use libfuzzer_sys::fuzz_target;

#[derive(Clone, Copy, Debug)]
struct Live {
    size: usize,
    fill: u8,
}

/// The bytes of a block: every byte for small blocks, the edges and a sample otherwise.
fn offsets(size: usize) -> impl Iterator<Item = usize> {
    let full = size <= 4096;
    let step = if full { 1 } else { size / 64 };
    let head = if full { size } else { 256 };
    (0..head)
        .chain((head..size).step_by(step.max(1)))
        .chain(if full { size } else { size - 256 }..size)
}

fn pattern(fill: u8, i: usize) -> u8 {
    fill ^ (i as u8).wrapping_mul(167) ^ (i >> 9) as u8
}

fn write(p: usize, l: Live) {
    for i in offsets(l.size) {
        unsafe { *((p + i) as *mut u8) = pattern(l.fill, i) };
    }
}

fn verify(p: usize, l: Live) {
    for i in offsets(l.size) {
        let got = unsafe { *((p + i) as *const u8) };
        assert_eq!(
            got,
            pattern(l.fill, i),
            "block {p:#x} ({} bytes): byte {i}",
            l.size
        );
    }
}

type Batch = (Vec<(usize, Live)>, Sender<()>);

/// The long-lived thread that frees blocks handed to it.
fn freer() -> &'static Mutex<Sender<Batch>> {
    static FREER: OnceLock<Mutex<Sender<Batch>>> = OnceLock::new();
    FREER.get_or_init(|| {
        let (tx, rx): (Sender<Batch>, Receiver<Batch>) = channel();
        std::thread::spawn(move || {
            for (blocks, done) in rx {
                for (p, l) in blocks {
                    verify(p, l);
                    unsafe { lg_free(p as *mut c_void) };
                }
                let _ = done.send(());
            }
        });
        Mutex::new(tx)
    })
}

/// Reads the input as a stream of small numbers.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u16(&mut self) -> Option<usize> {
        Some(self.byte()? as usize | (self.byte()? as usize) << 8)
    }
    /// A request size: mostly small, sometimes up to the large range.
    fn size(&mut self) -> Option<usize> {
        let kind = self.byte()?;
        let v = self.u16()?;
        Some(match kind % 16 {
            0..=8 => v % 300,
            9..=12 => v % 9000,
            13 | 14 => (v << 2) % 300_000,
            _ => 200_000 + (v << 6),
        })
    }
}

struct Model {
    live: BTreeMap<usize, Live>,
}

impl Model {
    fn insert(&mut self, p: *mut c_void, size: usize, align: usize, fill: u8) {
        let p = p as usize;
        assert!(p != 0);
        assert_eq!(p % align.max(16), 0, "{p:#x} not aligned to {align}");
        let usable = unsafe { lg_usable_size(p as *const c_void) };
        assert!(usable >= size, "usable {usable} < requested {size}");
        if let Some((&q, l)) = self.live.range(..=p).next_back() {
            assert!(q + l.size.max(1) <= p, "{p:#x} overlaps {q:#x}+{}", l.size);
        }
        if let Some((&q, _)) = self.live.range(p..).next() {
            assert!(p + size.max(1) <= q, "{p:#x}+{size} overlaps {q:#x}");
        }
        let l = Live { size, fill };
        write(p, l);
        self.live.insert(p, l);
    }

    /// The `k`-th live block (mod the count), if any.
    fn pick(&self, k: usize) -> Option<usize> {
        if self.live.is_empty() {
            return None;
        }
        self.live.keys().nth(k % self.live.len()).copied()
    }

    fn take(&mut self, p: usize) -> Live {
        let l = self.live.remove(&p).unwrap();
        verify(p, l);
        l
    }
}

fn run(data: &[u8]) {
    let mut input = Input(data);
    let mut m = Model {
        live: BTreeMap::new(),
    };
    let mut handoff: Vec<(usize, Live)> = Vec::new();
    let mut fill = 1u8;
    while let Some(op) = input.byte() {
        fill = fill.wrapping_add(1);
        let Some(arg) = input.byte() else { break };
        let arg = arg as usize;
        match op % 12 {
            0 | 1 => {
                let Some(size) = input.size() else { break };
                let p = lg_malloc(size);
                m.insert(p, size, 16, fill);
            }
            2 => {
                let Some(size) = input.size() else { break };
                let n = 1 + arg % 4;
                let p = lg_calloc(n, size / n);
                let total = n * (size / n);
                for i in offsets(total) {
                    assert_eq!(unsafe { *(p as *const u8).add(i) }, 0, "calloc byte {i}");
                }
                m.insert(p, total, 16, fill);
            }
            3 => {
                let Some(size) = input.size() else { break };
                if let Some(p) = m.pick(arg) {
                    let old = m.take(p);
                    let q = unsafe { lg_realloc(p as *mut c_void, size) } as usize;
                    assert!(q != 0, "realloc to {size} failed");
                    let keep = old.size.min(size);
                    for i in offsets(old.size).filter(|&i| i < keep) {
                        let got = unsafe { *((q + i) as *const u8) };
                        assert_eq!(got, pattern(old.fill, i), "realloc lost byte {i}");
                    }
                    m.insert(q as *mut c_void, size, 16, fill);
                }
            }
            4 => {
                let Some(size) = input.size() else { break };
                let align = 1usize << (arg % 23);
                let p = lg_aligned_alloc(align, size);
                m.insert(p, size, align, fill);
            }
            5 => {
                let Some(size) = input.size() else { break };
                let align = 8usize << (arg % 18);
                let mut p: *mut c_void = std::ptr::null_mut();
                assert_eq!(unsafe { lg_posix_memalign(&mut p, align, size) }, 0);
                m.insert(p, size, align, fill);
            }
            6 | 7 => {
                if let Some(p) = m.pick(arg) {
                    m.take(p);
                    unsafe { lg_free(p as *mut c_void) };
                }
            }
            8 => {
                if let Some(p) = m.pick(arg) {
                    let l = m.take(p);
                    unsafe { lg_free_sized(p as *mut c_void, l.size) };
                }
            }
            9 => {
                // Hand blocks to the other thread; it frees them when the batch is sent.
                if let Some(p) = m.pick(arg) {
                    let l = m.take(p);
                    handoff.push((p, l));
                }
                if arg % 4 == 0 && !handoff.is_empty() {
                    send(std::mem::take(&mut handoff));
                }
            }
            10 => {
                // A thread allocates blocks and exits; they are freed here later.
                let n = arg % 16;
                let Some(size) = input.size() else { break };
                let made = std::thread::spawn(move || {
                    (0..n).map(|_| lg_malloc(size) as usize).collect::<Vec<_>>()
                })
                .join()
                .unwrap();
                for p in made {
                    fill = fill.wrapping_add(1);
                    m.insert(p as *mut c_void, size, 16, fill);
                }
            }
            _ => {
                if let Some(p) = m.pick(arg) {
                    let usable = unsafe { lg_usable_size(p as *const c_void) };
                    assert!(usable >= m.live[&p].size);
                }
                if arg == 255 {
                    lg_trim();
                }
            }
        }
    }
    send(handoff);
    for p in m.live.keys().copied().collect::<Vec<_>>() {
        m.take(p);
        unsafe { lg_free(p as *mut c_void) };
    }
}

/// Sends a batch to the freeing thread and waits until it is done.
fn send(blocks: Vec<(usize, Live)>) {
    if blocks.is_empty() {
        return;
    }
    let (done_tx, done_rx) = channel();
    freer().lock().unwrap().send((blocks, done_tx)).unwrap();
    done_rx.recv().unwrap();
}

fuzz_target!(|data: &[u8]| run(data));
