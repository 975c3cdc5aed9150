//! `LgMalloc` as the Rust global allocator: collections, over-aligned types, threads.

use std::collections::HashMap;
use std::sync::Arc;

#[global_allocator]
static GLOBAL: lgmalloc::LgMalloc = lgmalloc::LgMalloc;

fn alloc_count() -> u64 {
    let mut s = lgmalloc::LgStats::default();
    unsafe { lgmalloc::c_api::lg_stats(&mut s) };
    s.alloc_count
}

#[repr(align(64))]
struct Line([u8; 64]);

#[repr(align(4096))]
struct PageAligned([u8; 4096]);

#[test]
fn collections_run_on_lgmalloc() {
    let before = alloc_count();
    let mut map = HashMap::new();
    for i in 0..10_000u64 {
        map.insert(format!("key-{i}"), vec![i; (i % 17) as usize]);
    }
    for i in (0..10_000u64).step_by(7) {
        assert_eq!(map[&format!("key-{i}")], vec![i; (i % 17) as usize]);
    }
    assert!(
        alloc_count() >= before + 10_000,
        "the global allocator is not lgmalloc"
    );
    let mut s = String::new();
    for i in 0..10_000 {
        s.push_str(&i.to_string());
    }
    assert!(s.len() > 30_000);
}

#[test]
fn over_aligned_types_are_aligned() {
    let lines: Vec<Box<Line>> = (0..1000).map(|i| Box::new(Line([i as u8; 64]))).collect();
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(&**l as *const Line as usize % 64, 0);
        assert!(l.0.iter().all(|&b| b == i as u8));
    }
    let pages: Vec<Box<PageAligned>> = (0..50)
        .map(|i| Box::new(PageAligned([i as u8; 4096])))
        .collect();
    for (i, p) in pages.iter().enumerate() {
        assert_eq!(&**p as *const PageAligned as usize % 4096, 0);
        assert!(p.0.iter().all(|&b| b == i as u8));
    }
    // Growing an over-aligned vector goes through realloc with alignment.
    let mut v: Vec<Line> = Vec::new();
    for i in 0..5000 {
        v.push(Line([i as u8; 64]));
        assert_eq!(v.as_ptr() as usize % 64, 0);
    }
    assert!(v.iter().enumerate().all(|(i, l)| l.0[63] == i as u8));
}

#[test]
fn zeroed_allocations_are_zero() {
    for n in [1usize, 100, 5000, 300_000, 5 << 20] {
        let v = vec![0u8; n];
        assert!(v.iter().all(|&b| b == 0));
        drop(v);
        let mut w = vec![0xFFu8; n];
        w.clear();
        drop(w);
    }
}

#[test]
fn threads_share_data_across_heaps() {
    let data: Arc<Vec<String>> = Arc::new((0..1000).map(|i| format!("item {i}")).collect());
    let handles: Vec<_> = (0..8)
        .map(|t| {
            let data = data.clone();
            std::thread::spawn(move || {
                let mut out = Vec::new();
                for (i, s) in data.iter().enumerate() {
                    if i % 8 == t {
                        out.push(s.repeat(3));
                    }
                }
                out
            })
        })
        .collect();
    let mut total = 0;
    for h in handles {
        // Strings built by the worker are dropped here, by another thread.
        let out = h.join().unwrap();
        total += out.len();
        assert!(out.iter().all(|s| s.starts_with("item ")));
    }
    assert_eq!(total, 1000);
}
