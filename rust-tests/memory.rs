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

/// The statistics less the sample arena, which a sampled block maps on first use and
/// fills a slot of: the heap's own memory.
fn heap_figures() -> lgmalloc::LgStats {
    // The arena first: a sample taken between the two reads then only adds to what
    // `lg_stats` counts. (Only a purge of idle slots between them could take away.)
    let (reserved, resident) = lgmalloc::profile::arena_figures();
    let mut s = stats();
    s.bytes_reserved = s
        .bytes_reserved
        .checked_sub(reserved as u64)
        .expect("lg_stats counts the sample arena's address space");
    s.bytes_committed = s
        .bytes_committed
        .checked_sub(resident as u64)
        .expect("lg_stats counts the sample arena's resident slots");
    s
}

#[test]
fn one_object_loop_never_maps_or_unmaps() {
    let _g = SERIAL.lock().unwrap();
    for size in [16usize, 1000, 20_000, 200_000, 1 << 20, 8 << 20] {
        let warm = lg_malloc(size);
        unsafe { lg_free(warm) };
        let before = heap_figures();
        for _ in 0..20_000 {
            let p = lg_malloc(size);
            unsafe { *(p as *mut u8) = 1 };
            unsafe { lg_free(p) };
        }
        let after = heap_figures();
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

/// Writes 16 KiB of the calling thread's stack (more than any lgmalloc call uses).
#[inline(never)]
fn touch_stack() {
    let mut buf = [0u8; 16 * 1024];
    std::hint::black_box(&mut buf).fill(1);
    std::hint::black_box(&buf);
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
                    // Both kinds of thread touch the same stack depth first, so the
                    // stack the allocator's own calls use (deeper in a debug build) is
                    // resident in the baseline too and only heap memory is measured.
                    touch_stack();
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
    // Issue 14 keeps it at most 8 KiB. Measured here since the page-supply, sampling
    // and fast-path changes: 5,447-5,480 or 6,062-6,111 bytes (debug; two modes from
    // run to run); the bound leaves about a KiB above the higher mode.
    assert!(per_thread <= 7 * 1024, "{per_thread} bytes per thread");
}

/// Frees a peak of written small blocks of many sizes; returns the statistics and RSS
/// at the start, right after the free, and right after one `lg_trim` (with its result).
fn peak_free_trim() -> [(lgmalloc::LgStats, usize); 3] {
    lg_trim();
    let base = (stats(), rss_bytes());
    let mut ptrs = Vec::with_capacity(40_000);
    for i in 0..40_000usize {
        let size = 200 + (i * 53) % 1800;
        let p = lg_malloc(size) as *mut u8;
        assert!(!p.is_null());
        unsafe { std::ptr::write_bytes(p, 3, size) };
        ptrs.push(p);
    }
    let peak = stats().bytes_committed;
    assert!(
        peak >= base.0.bytes_committed + (40 << 20),
        "no peak: {} -> {peak}",
        base.0.bytes_committed
    );
    for p in ptrs.drain(..) {
        unsafe { lg_free(p.cast()) };
    }
    let freed = (stats(), rss_bytes());
    let released = lg_trim();
    let trimmed = (stats(), rss_bytes());
    eprintln!(
        "committed: base {}, peak {peak}, after free {}, after trim {}; lg_trim returned \
         {released}; RSS: base {}, after free {}, after trim {}",
        base.0.bytes_committed,
        freed.0.bytes_committed,
        trimmed.0.bytes_committed,
        base.1,
        freed.1,
        trimmed.1
    );
    [base, freed, (trimmed.0, released)]
}

/// Only `lg_trim` explains this drop: right after a peak is freed, the automatic purge
/// keeps some free memory committed (below its threshold, for reuse); `lg_trim` gives
/// it back at once and returns how much (no time passes: there is no purge delay to
/// wait for, and nothing else allocates meanwhile).
#[test]
fn trim_returns_the_free_memory_the_purge_kept() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let [(base, _), (freed, _), (trimmed, released)] = peak_free_trim();
    assert!(
        released > 0,
        "lg_trim released nothing ({} bytes committed after the free, {} at the start)",
        freed.bytes_committed,
        base.bytes_committed
    );
    assert_eq!(
        freed.bytes_allocated, base.bytes_allocated,
        "blocks still live"
    );
    assert!(
        freed.bytes_committed >= base.bytes_committed + (1 << 20),
        "the automatic purge left nothing for lg_trim ({} -> {}): the test proves nothing",
        base.bytes_committed,
        freed.bytes_committed
    );
    let drop = freed
        .bytes_committed
        .saturating_sub(trimmed.bytes_committed);
    // lg_trim counts whole OS pages; the statistics count free spans of 1 KiB slices,
    // whose partial pages at the ends stay resident: the two differ by those edges.
    assert!(
        drop >= released as u64 && drop - released as u64 <= drop / 64,
        "lg_trim returned {released}, committed memory fell by {drop}"
    );
    assert_eq!(lg_trim(), 0, "a second lg_trim found more to release");
}

/// What may stay committed once a heap's kept and spare pages went back and were
/// purged: page records the pages wrote in their segments' metadata, and gaps under
/// 64 KiB between pages still in use, which the delayed purge leaves (about 0.9 MB after
/// 24 MB of 64 KiB pages; the 2 MiB of spare pages a heap keeps are more than this).
const LEFT_IN_METADATA_AND_GAPS: u64 = 1280 << 10;

/// Small-object work on the calling thread, a little every few milliseconds, until at
/// most `allowed` bytes more than `base` are committed or 5 s have passed (the purge
/// delay may have been lengthened by earlier tests, up to 1 s). Returns what is left.
fn small_object_work_until(base: u64, allowed: u64) -> u64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        for i in 0..32usize {
            let n = 16 + (i * 40) % 600;
            let p = lg_malloc(n) as *mut u8;
            assert!(!p.is_null());
            unsafe {
                p.write_volatile(1);
                lg_free(p.cast());
            }
        }
        let left = heap_figures().bytes_committed.saturating_sub(base);
        if left <= allowed || std::time::Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// A program that built tables of many sizes and moved on to small-object work gets
/// their memory back without `lg_trim`: a class's only page, kept when it empties (so a
/// one-object loop keeps its page), goes back to the region once it has lain unused for
/// a while and is purged there; freed large objects leave the cache once its delay has
/// passed, although no large object is allocated or freed again.
///
/// Failed before kept pages aged and the large-object cache decayed on the heaps'
/// purge checks: 18.3 of the tables' 19.4 MB stayed committed after 5 s of other work
/// (one page of each of the 25 medium classes, and the large objects the cache's
/// 16 MiB floor kept).
#[test]
fn tables_of_many_sizes_dropped_go_back_while_the_program_moves_on() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // A thread of its own: its heap starts with no kept page.
    std::thread::spawn(|| {
        let base = heap_figures().bytes_committed;
        // Medium sizes (one block per page, each its own class: 64 to 256 KiB) and
        // large ones (a mapping each), all written, all live at once, then freed.
        let mut sizes: Vec<usize> = (0..25).map(|i| (72 << 10) + i * (7 << 10)).collect();
        sizes.extend((0..6).map(|i| (1 << 20) + i * (512 << 10)));
        let tables: Vec<(*mut u8, usize)> = sizes
            .iter()
            .map(|&n| {
                let p = lg_malloc(n) as *mut u8;
                assert!(!p.is_null());
                unsafe { std::ptr::write_bytes(p, 5, n) };
                (p, n)
            })
            .collect();
        let peak = heap_figures().bytes_committed;
        let grown = peak.saturating_sub(base);
        assert!(grown >= 10 << 20, "no peak: {base} -> {peak}");
        for (p, _) in tables {
            unsafe { lg_free(p.cast()) };
        }
        // What may stay: page records and gaps between pages still in use (see the
        // next test), and a twentieth of the tables.
        let allowed = LEFT_IN_METADATA_AND_GAPS + grown / 20;
        let left = small_object_work_until(base, allowed);
        assert!(
            left <= allowed,
            "{left} of the tables' {grown} bytes still committed after 5 s of other work"
        );
    })
    .join()
    .unwrap();
}

/// A heap keeps spare pages (up to 2 MiB) for its next pages, but not for ever: one
/// that takes no page for a while (it goes on with a few small objects) gives them
/// back, and the region purges them.
///
/// Failed before spare pages aged with the kept ones: 1.9 MB stayed committed after
/// 5 s of small-object work (0.96 MB at d043676).
#[test]
fn a_heap_that_takes_no_page_gives_its_spare_pages_back() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    std::thread::spawn(|| {
        let base = heap_figures().bytes_committed;
        // 24 MB of 1000-byte blocks: pages of 64 KiB, all retired as they empty (the
        // heap keeps 2 MiB of them as spares, the region the rest).
        let blocks: Vec<*mut u8> = (0..24_000)
            .map(|_| {
                let p = lg_malloc(1000) as *mut u8;
                assert!(!p.is_null());
                unsafe { std::ptr::write_bytes(p, 7, 1000) };
                p
            })
            .collect();
        for p in blocks {
            unsafe { lg_free(p.cast()) };
        }
        let left = small_object_work_until(base, LEFT_IN_METADATA_AND_GAPS);
        assert!(
            left <= LEFT_IN_METADATA_AND_GAPS,
            "{left} bytes still committed after 5 s of small-object work"
        );
    })
    .join()
    .unwrap();
}

/// What `lg_trim` reports as released really leaves the process (every byte of the
/// peak was written, so free memory still counted as committed is resident).
///
/// Failed when a free span merged with already decommitted (clean) neighbours was
/// marked dirty as a whole (`RegionInner::release_span`): clean bytes counted as
/// committed again (11.6 MB committed, 4.6 MB resident) and `lg_trim` reported them as
/// released a second time (7.5 MB returned, RSS fell by 1.3 MB). Free spans now carry
/// a dirty slice count.
#[test]
fn trim_release_is_seen_in_rss() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let [(base, rss_base), (freed, rss_freed), (_, released)] = peak_free_trim();
    let resident = rss_freed.saturating_sub(rss_base) as u64;
    let committed = freed.bytes_committed - base.bytes_committed;
    // Statistics count conservatively: clean spans a heap took as spare pages count as
    // committed before they are touched (measured: up to 1.05 MiB over the resident
    // bytes after this peak, when all of a segment's metadata counted; now only the page
    // records written do, and committed came out 0.5 MiB under the RSS growth, which
    // includes the test's own vector). The bug this test caught counted 7 MB.
    assert!(
        committed <= resident + (2 << 20),
        "{committed} bytes counted as committed, {resident} resident"
    );
    assert!(
        rss_freed.saturating_sub(rss_bytes()) + (1 << 20) >= released,
        "lg_trim reported {released} released; RSS fell by {}",
        rss_freed.saturating_sub(rss_bytes())
    );
}

/// Free memory a thread leaves resident at its exit: the thread writes `bytes` of small
/// blocks and frees them all but every `keep_every`-th (which pin their segments, so
/// none is unmapped as it empties); after it has exited, `lg_trim` decommits all free
/// memory and returns how much that was. The kept blocks are freed afterwards.
fn free_memory_left_by_thread_exit(bytes: usize, keep_every: usize) -> usize {
    lg_trim();
    let kept = thread_round(bytes, keep_every);
    let left = lg_trim();
    for p in kept {
        unsafe { lg_free(p as *mut core::ffi::c_void) };
    }
    lg_trim();
    left
}

/// Thread exit gives memory back at once, beyond a little: a thread that freed most of
/// a 32 MiB peak leaves at most the 4 MiB of free memory the exit keeps resident for
/// the next threads (without the exit's purge, the 16 MiB limit of the region's own
/// purge applies); one that freed 512 KiB leaves it resident, for the next thread to
/// reuse without refaulting (decommitting it at every exit cost larson, 8 chains of
/// threads that hand their objects on and exit, ~70 page faults per exit and half its
/// speed). Time does not matter: the exit's purge takes no account of age, and the
/// delayed purge never takes memory freed at the same moment.
#[test]
fn thread_exit_returns_memory_beyond_a_little_and_keeps_the_little() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let big = free_memory_left_by_thread_exit(32 << 20, 256);
    let small = free_memory_left_by_thread_exit(512 << 10, usize::MAX);
    eprintln!(
        "free memory left resident by thread exit: after a 32 MiB peak {big}, after 512 KiB {small}"
    );
    assert!(
        big <= (4 << 20) + (256 << 10),
        "{big} bytes of free memory resident after a thread that freed 32 MiB exited"
    );
    assert!(
        small >= 256 << 10,
        "{small} bytes of free memory resident after a thread that freed 512 KiB exited: \
         the exit decommitted what the next thread would reuse"
    );
}

/// In a new thread, writes `bytes` of small blocks and frees them all but every
/// `keep_every`-th, which it returns (they pin their segments, as in
/// `free_memory_left_by_thread_exit`); the thread has exited on return.
fn thread_round(bytes: usize, keep_every: usize) -> Vec<usize> {
    std::thread::spawn(move || {
        let (mut kept, mut ptrs) = (Vec::new(), Vec::new());
        let (mut total, mut i) = (0, 0usize);
        while total < bytes {
            let size = 200 + (i * 53) % 1800;
            let p = lg_malloc(size) as *mut u8;
            assert!(!p.is_null());
            unsafe { std::ptr::write_bytes(p, 5, size) };
            if i % keep_every == keep_every - 1 {
                kept.push(p as usize);
            } else {
                ptrs.push(p);
            }
            total += size;
            i += 1;
        }
        for p in ptrs {
            unsafe { lg_free(p.cast()) };
        }
        kept
    })
    .join()
    .unwrap()
}

/// Pages whose blocks other threads freed go back at their thread's exit, found empty
/// by their remote lists' counts (no block is touched): a thread writes 32 MiB of
/// 256-byte blocks and hands them to this thread, which frees all but one in 4096
/// (pinning the segments) while the writer still lives, so every free is remote; after
/// the writer's exit, what `lg_trim` finds left resident is at most the 4 MiB the exit
/// keeps (`thread_exit_returns_memory_beyond_a_little_and_keeps_the_little`). Pages
/// the exit left parked would come back only at `lg_trim`, 28 MiB of them.
#[test]
fn pages_other_threads_emptied_go_back_at_thread_exit() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    lg_trim();
    let (to_main, from_writer) = std::sync::mpsc::channel::<Vec<usize>>();
    let (to_writer, from_main) = std::sync::mpsc::channel::<()>();
    let writer = std::thread::spawn(move || {
        let blocks: Vec<usize> = (0..(32 << 20) / 256)
            .map(|_| {
                let p = lg_malloc(256) as *mut u8;
                assert!(!p.is_null());
                unsafe { std::ptr::write_bytes(p, 7, 256) };
                p as usize
            })
            .collect();
        to_main.send(blocks).unwrap();
        // Stay alive until every free has been made: they are remote frees.
        from_main.recv().unwrap();
    });
    let blocks = from_writer.recv().unwrap();
    let mut kept = Vec::new();
    for (i, &p) in blocks.iter().enumerate() {
        if i % 4096 == 0 {
            kept.push(p);
        } else {
            unsafe { lg_free(p as *mut core::ffi::c_void) };
        }
    }
    to_writer.send(()).unwrap();
    writer.join().unwrap();
    let left = lg_trim();
    for p in kept {
        unsafe { lg_free(p as *mut core::ffi::c_void) };
    }
    lg_trim();
    eprintln!("free memory left resident after the writer's exit: {left}");
    assert!(
        left <= (4 << 20) + (256 << 10),
        "{left} bytes resident after the exit of a thread whose blocks another thread freed"
    );
}

/// A program whose threads come in rounds, each taking back what the previous round's
/// exits decommitted (mimalloc's test-stress: ~460,000 page faults in 10 rounds of 32
/// threads when every exit kept 4 MiB only), teaches thread exit to keep that much
/// resident: a first thread frees most of a 24 MiB peak and exits (its exit decommits
/// all but 4 MiB, as for a lone thread), a second one takes the same again and exits,
/// and what it leaves resident is well above the 4 MiB a lone thread leaves
/// (`thread_exit_returns_memory_beyond_a_little_and_keeps_the_little`). `lg_trim`
/// gives it all back and forgets what was learned: the next lone thread keeps 4 MiB.
/// Time matters only in that the second round must end within the learned demand's
/// half-life (1 s) of the first exit; each round takes milliseconds.
#[test]
fn thread_exit_keeps_what_the_next_round_of_threads_took_back() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    lg_trim();
    let mut pinned = thread_round(24 << 20, 256);
    pinned.extend(thread_round(24 << 20, 256));
    let left = lg_trim();
    let lone = free_memory_left_by_thread_exit(24 << 20, 256);
    for p in pinned {
        unsafe { lg_free(p as *mut core::ffi::c_void) };
    }
    lg_trim();
    eprintln!(
        "free memory left resident by the second round's exit {left}, by a lone thread's after lg_trim {lone}"
    );
    assert!(
        left >= 7 << 20,
        "{left} bytes of free memory resident after a second round of threads took back \
         what the first round's exit decommitted: the exit decommitted it again"
    );
    assert!(
        lone <= (4 << 20) + (256 << 10),
        "{lone} bytes of free memory resident after a lone thread's exit that followed lg_trim"
    );
}

/// How many of the OS pages in `[start, start + len)` are resident (`mincore`). A page
/// that is not mapped (the allocator gave its segment back) is not resident.
fn resident_pages(start: usize, len: usize) -> usize {
    let start = start & !4095;
    let pages = len.div_ceil(4096);
    (0..pages)
        .filter(|i| {
            let mut v = 0u8;
            let page = (start + i * 4096) as *mut libc::c_void;
            let r = unsafe { libc::mincore(page, 4096, &mut v) };
            let errno = std::io::Error::last_os_error().raw_os_error();
            assert!(
                r == 0 || errno == Some(libc::ENOMEM),
                "mincore failed: {errno:?}"
            );
            r == 0 && v & 1 != 0
        })
        .count()
}

/// Bytes at the start of a segment that hold its metadata (`segment::FIRST_SLICE`
/// slices): the header and the slice map (written in full when the segment is added:
/// its first `SEGMENT_MAP` bytes of OS pages, which also hold the first records), then
/// one 64-byte page record per 1 KiB slice.
const SEGMENT_METADATA: usize = 289 << 10;
const SEGMENT_MAP: usize = 9 << 12;

/// A segment writes the page record of each slice that starts a page or a free span,
/// nothing else, and lays its records out so that the starts of a run of large pages
/// share OS pages (`segment::record_slot`). With the records in slice order, every
/// 64 KiB page made a 4 KiB page of records resident: 6.25% of the memory it served,
/// besides the slice map's 0.8% (perl building a hash: 6.4 MB of its 100 in all). Here a
/// new thread fills 12 MiB with 4 KiB blocks (pages of 64 KiB) and writes them; the
/// resident record pages of the segments holding them must stay within 1% of that
/// (measured: 12 KiB per segment). In a process of its own: pages the other tests left
/// in the same segments (an idle-thread test's one-slice pages write records all over)
/// would count too.
#[test]
fn segment_metadata_stays_a_small_share_of_the_memory_it_serves() {
    let cache = std::env::temp_dir().join(format!("lgmalloc-metadata-{}", std::process::id()));
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "segment_metadata_child",
            "--ignored",
            "--test-threads=1",
            "--nocapture",
        ])
        .env("LGMALLOC_METADATA_CHILD", "1")
        .env("LGMALLOC_PREDICT", "0")
        .env("LGMALLOC_CACHE_DIR", &cache)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&cache);
    let err = String::from_utf8_lossy(&out.stderr);
    // The child asserts; its line shows it ran (a filter that matched no test passes).
    assert!(
        out.status.success() && err.contains("metadata: segments="),
        "{err}"
    );
}

/// The measurement and assertion of
/// `segment_metadata_stays_a_small_share_of_the_memory_it_serves`, run by it in a fresh
/// process.
#[test]
#[ignore]
fn segment_metadata_child() {
    if std::env::var_os("LGMALLOC_METADATA_CHILD").is_none() {
        return;
    }
    let blocks: Vec<usize> = (0..3072)
        .map(|_| {
            let p = lg_malloc(4096) as usize;
            assert_ne!(p, 0);
            unsafe { std::ptr::write_bytes(p as *mut u8, 5, 4096) };
            p
        })
        .collect();
    // Sampled blocks live in the sample arena, not in segments.
    let in_pages: Vec<usize> = blocks
        .iter()
        .copied()
        .filter(|&p| !lgmalloc::profile::is_sampled(p as *const u8))
        .collect();
    let mut segments: Vec<usize> = in_pages.iter().map(|&p| p & !((4 << 20) - 1)).collect();
    segments.sort_unstable();
    segments.dedup();
    let records: usize = segments
        .iter()
        .map(|&s| resident_pages(s + SEGMENT_MAP, SEGMENT_METADATA - SEGMENT_MAP) * 4096)
        .sum();
    let blocks_bytes = in_pages.len() * 4096;
    eprintln!(
        "metadata: segments={} blocks={blocks_bytes} records={records}",
        segments.len()
    );
    assert!(!segments.is_empty() && blocks_bytes >= 8 << 20);
    assert!(
        records * 100 <= blocks_bytes,
        "{records} bytes of page records resident for {blocks_bytes} bytes of blocks in {} segments",
        segments.len()
    );
    for &p in &blocks {
        unsafe { lg_free(p as *mut _) };
    }
}

/// In a new thread, allocates (never writes) blocks of 1000 bytes one by one: first
/// `filler` of them (enough to use up the free memory the region has, so what follows
/// comes from fresh segments), then 2048 more. Every 32 of those it looks at the memory
/// just ahead of the newest block, [p + 8 KiB, p + 32 KiB): blocks not carved yet (a
/// carve touches one block's OS page), so resident only if it came populated. Returns
/// how many looks there were and how many found all 6 OS pages resident; then, after
/// the thread freed everything and called `lg_trim` (measured before the thread exits),
/// the OS pages still resident in the 256 KiB around the 1024th of the 2048 (far from
/// the class's last page, which a live heap keeps).
fn populated_ahead(filler: usize) -> (usize, usize, usize) {
    std::thread::spawn(move || {
        let mut blocks: Vec<usize> = Vec::with_capacity(filler + 2048);
        let (mut looks, mut ahead) = (0, 0);
        for i in 0..filler + 2048 {
            let p = lg_malloc(1000) as usize;
            assert_ne!(p, 0);
            let stride = unsafe { lg_usable_size(p as *const _) };
            // Contiguous with the previous block: a page block (not a sampled one).
            let in_run = blocks.last().is_some_and(|&q| p == q + stride);
            blocks.push(p);
            if i >= filler && i % 32 == 0 && in_run {
                looks += 1;
                ahead += (resident_pages(p + (8 << 10), 24 << 10) == 6) as usize;
            }
        }
        let mid = blocks.get(filler + 1024).copied().unwrap_or(0);
        for &q in &blocks {
            unsafe { lg_free(q as *mut _) };
        }
        lg_trim();
        (looks, ahead, resident_pages(mid - (128 << 10), 256 << 10))
    })
    .join()
    .unwrap()
}

/// A busy class's fresh pages (and the spares taken with them), once the class has used
/// a whole batch, are backed in one batch (`MADV_POPULATE_WRITE`) when the region hands
/// them out, not one page fault per 4 KiB as blocks are carved (the filler below takes
/// many batches of the class first); that memory still leaves at once on `lg_trim`. (Thread exit
/// keeps up to 4 MiB of free memory resident for the next threads: its bound is
/// `thread_exit_returns_memory_beyond_a_little_and_keeps_the_little`'s.)
#[test]
fn busy_pages_come_populated_and_still_go_back() {
    let _g = SERIAL.lock().unwrap();
    // Kernels before 5.14 lack MADV_POPULATE_WRITE: memory faults in as before.
    let populates = kernel_at_least(5, 14);
    lg_trim();
    let s = stats();
    // Address space of segments not in pages (the large figures are zero here), in
    // blocks, and a few MiB more: the free spans a thread may be given first.
    let free = s.bytes_reserved.saturating_sub(s.bytes_allocated) as usize;
    let filler = free / 1000 + 4096;
    let (looks, ahead, after) = populated_ahead(filler);
    eprintln!(
        "after {filler} blocks, {ahead} of {looks} looks resident ahead; after trim: {after}/64"
    );
    assert!(looks >= 48, "only {looks} looks");
    if populates {
        assert!(
            ahead * 4 >= looks * 3,
            "memory ahead of carving resident in only {ahead} of {looks} looks"
        );
    }
    // At most the partial OS pages at the ends, shared with other spans.
    assert!(
        after <= 2,
        "{after} OS pages around block 1024 stayed resident after lg_trim"
    );
}

/// calloc does not clear a block carved from memory never used since it was mapped
/// (it reads as zero): its OS pages stay out of memory until the program writes them,
/// where clearing made all of them resident (and cost the instructions). After the free
/// memory the process has is used up (so what follows is new), a new thread callocs
/// blocks of 16 KiB, a class it has used little (its pages are not populated ahead);
/// each is carved alone, which writes its first 16 bytes, so the OS pages wholly past
/// its first stay untouched. Sampled blocks (served from the sample arena) are skipped.
#[test]
fn calloc_leaves_fresh_memory_untouched() {
    let _g = SERIAL.lock().unwrap();
    lg_trim();
    let s = stats();
    let free = s.bytes_reserved.saturating_sub(s.bytes_allocated) as usize;
    let filler: Vec<usize> = (0..free / 1000 + 4096)
        .map(|_| lg_malloc(1000) as usize)
        .collect();
    let (looks, untouched) = std::thread::spawn(|| {
        let size = 16 << 10;
        let (mut looks, mut untouched) = (0, 0);
        let mut held = Vec::new();
        for _ in 0..8 {
            let p = lg_calloc(1, size) as usize;
            assert_ne!(p, 0);
            held.push(p);
            if lgmalloc::profile::is_sampled(p as *const u8) {
                continue;
            }
            looks += 1;
            let (first, end) = ((p + 4096) & !4095, (p + size) & !4095);
            untouched += (resident_pages(first, end - first) == 0) as usize;
            let bytes = unsafe { std::slice::from_raw_parts(p as *const u8, size) };
            assert!(bytes.iter().all(|&b| b == 0), "calloc not zeroed");
        }
        for p in held {
            unsafe { lg_free(p as *mut _) };
        }
        (looks, untouched)
    })
    .join()
    .unwrap();
    for p in filler {
        unsafe { lg_free(p as *mut _) };
    }
    eprintln!("{untouched} of {looks} fresh 16 KiB callocs left untouched");
    assert!(looks >= 2, "only {looks} unsampled callocs");
    assert!(
        untouched * 2 >= looks,
        "only {untouched} of {looks} callocs of fresh memory left it untouched"
    );
}

/// True when the running kernel's version is at least `major.minor`.
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|s| s.parse::<u32>().unwrap_or(0));
    let (a, b) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (a, b) >= (major, minor)
}

/// Minor page faults of the calling thread so far.
fn thread_minor_faults() -> i64 {
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) }, 0);
    u.ru_minflt
}

/// In a new thread, takes one block of each of `sizes` and counts the lock acquisitions
/// that took (the heap exists before counting: its creation takes the pool's lock).
/// Checks that the blocks are usable and apart, and that each whose size is a multiple
/// of 16 KiB starts at a multiple of its size's largest power of two (as its class
/// promises aligned allocation); frees them. Returns the acquisitions.
fn lock_acquisitions_to_start(sizes: Vec<usize>) -> u64 {
    std::thread::spawn(move || {
        let first = lg_malloc(8) as usize;
        let before = stats().lock_acquisitions;
        let after_stats = stats().lock_acquisitions;
        let stats_cost = after_stats - before;
        let blocks: Vec<(usize, usize)> = sizes
            .iter()
            .map(|&size| (lg_malloc(size) as usize, size))
            .collect();
        let after = stats().lock_acquisitions;
        for &(p, size) in &blocks {
            assert_ne!(p, 0);
            let align = 1usize << size.trailing_zeros().min(18);
            if align >= 16 << 10 {
                assert_eq!(p % align, 0, "block of {size} at {p:#x}");
            }
            unsafe { std::ptr::write_bytes(p as *mut u8, size as u8, size) };
        }
        for &(p, size) in &blocks {
            let s = unsafe { std::slice::from_raw_parts(p as *const u8, size) };
            assert!(
                s.iter().all(|&b| b == size as u8),
                "block of {size} overwritten"
            );
        }
        let mut sorted = blocks.clone();
        sorted.sort();
        for w in sorted.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "blocks overlap: {w:?}");
        }
        for &(p, _) in &blocks {
            unsafe { lg_free(p as *mut _) };
        }
        unsafe { lg_free(first as *mut _) };
        after - after_stats - stats_cost
    })
    .join()
    .unwrap()
}

/// A thread starting many classes cuts their first pages from runs of slices it takes
/// from the region a few at a time (`segment::split_spare`; its first 4 young pages
/// come one by one), not one region visit per class: 64 sizes from 16 B to 1 KiB
/// (about 40 classes) cost at most 10 lock acquisitions (6 measured; 31 without runs).
#[test]
fn a_thread_starting_many_classes_visits_the_region_a_few_times() {
    let _g = SERIAL.lock().unwrap();
    let visits = lock_acquisitions_to_start((1..=64).map(|i| i * 16).collect());
    eprintln!("64 sizes: {visits} lock acquisitions");
    assert!(visits <= 10, "{visits} lock acquisitions to start 64 sizes");
}

/// A thread that takes one block of each large-block class (8 to 128 KiB, pages of
/// four blocks, one over 64 KiB) cuts most of their pages from runs without the
/// region's lock, aligned as the class needs: 32 sizes cost at most 16 lock
/// acquisitions (12-13 measured; 28 when each young page of these classes visited the
/// region).
#[test]
fn a_thread_starting_many_large_classes_visits_the_region_a_few_times() {
    let _g = SERIAL.lock().unwrap();
    // Eight sizes per doubling, as the classes go.
    let sizes = (0..4)
        .flat_map(|d| (1..=8).map(move |s| (8192usize << d) + s * ((8192usize << d) / 8)))
        .collect();
    let visits = lock_acquisitions_to_start(sizes);
    eprintln!("32 large sizes: {visits} lock acquisitions");
    assert!(
        visits <= 16,
        "{visits} lock acquisitions to start 32 large classes"
    );
}

/// Segments are mapped and unmapped with the region's lock released (a system call under
/// it made every thread wanting a page wait). Four threads at once fill 16 MiB each in
/// blocks of 60,000 bytes, so segments are mapped while other threads take pages, and
/// exit; the main thread checks the blocks' contents and frees them. `lg_trim` then
/// releases all segments but one, and their memory goes back to the OS: a segment of the
/// segment space is decommitted (RSS shrinks), one mapped on its own is unmapped
/// (VmSize shrinks). A second round maps new ones, passes the same checks, and takes
/// the space's released slots again rather than more address space.
#[test]
fn segments_are_mapped_and_unmapped_while_threads_take_pages() {
    let _g = SERIAL.lock().unwrap();
    const SIZE: usize = 60_000;
    let mut peak_vm = [0; 2];
    for round in 0..2u8 {
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                std::thread::spawn(move || {
                    let fill = t.wrapping_mul(16).wrapping_add(round);
                    let blocks: Vec<usize> = (0..(16 << 20) / SIZE)
                        .map(|_| {
                            let p = lg_malloc(SIZE);
                            assert!(!p.is_null());
                            unsafe { std::ptr::write_bytes(p as *mut u8, fill, SIZE) };
                            p as usize
                        })
                        .collect();
                    (fill, blocks)
                })
            })
            .collect();
        for t in threads {
            let (fill, blocks) = t.join().unwrap();
            for p in blocks {
                let s = unsafe { std::slice::from_raw_parts(p as *const u8, SIZE) };
                assert!(s.iter().all(|&b| b == fill), "block {p:#x} overwritten");
                unsafe { lg_free(p as *mut _) };
            }
        }
        // Segments only: the sample arena stays mapped.
        let (reserved, vm, rss) = (
            heap_figures().bytes_reserved as usize,
            vm_size(),
            rss_bytes(),
        );
        peak_vm[round as usize] = vm;
        lg_trim();
        let (reserved_after, vm_after, rss_after) = (
            heap_figures().bytes_reserved as usize,
            vm_size(),
            rss_bytes(),
        );
        let released = reserved - reserved_after;
        let given_back = vm.saturating_sub(vm_after) + rss.saturating_sub(rss_after);
        eprintln!(
            "round {round}: reserved {} -> {} MiB, VmSize {} -> {} MiB, RSS {} -> {} MiB",
            reserved >> 20,
            reserved_after >> 20,
            vm >> 20,
            vm_after >> 20,
            rss >> 20,
            rss_after >> 20
        );
        assert!(
            reserved >= 32 << 20,
            "{reserved} bytes reserved at the peak"
        );
        assert!(reserved_after <= 4 << 20, "{reserved_after} bytes reserved");
        assert!(
            given_back >= released / 2,
            "released {released} bytes, VmSize and RSS shrank by {given_back}"
        );
    }
    assert!(
        peak_vm[1] <= peak_vm[0] + (8 << 20),
        "VmSize at the second peak {} MiB, at the first {} MiB",
        peak_vm[1] >> 20,
        peak_vm[0] >> 20
    );
}

/// The process's mapped address space in bytes (VmSize).
fn vm_size() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmSize:")).unwrap();
    let kib: usize = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib << 10
}

/// A segment emptied while its memory is resident stays mapped until a purge decommits
/// it (unmapping it at once made the next allocations fault in a fresh one): a thread
/// that frees 12 MiB of blocks and allocates as much again right away (well within the
/// purge delay) faults in few pages. Attempts that take near the purge delay prove
/// nothing and are repeated.
#[test]
fn memory_freed_and_taken_again_at_once_is_not_faulted_in_again() {
    let _g = SERIAL.lock().unwrap();
    let count = (12 << 20) / 1000;
    let faults = std::thread::spawn(move || {
        lg_trim();
        let fill = |ptrs: &mut Vec<usize>| {
            for _ in 0..count {
                let p = lg_malloc(1000) as usize;
                assert_ne!(p, 0);
                unsafe { std::ptr::write_bytes(p as *mut u8, 7, 1000) };
                ptrs.push(p);
            }
        };
        let mut ptrs = Vec::with_capacity(count);
        fill(&mut ptrs);
        for _ in 0..10 {
            let start = std::time::Instant::now();
            for p in ptrs.drain(..) {
                unsafe { lg_free(p as *mut _) };
            }
            let before = thread_minor_faults();
            fill(&mut ptrs);
            let faults = thread_minor_faults() - before;
            if start.elapsed() < std::time::Duration::from_millis(90) {
                for p in ptrs.drain(..) {
                    unsafe { lg_free(p as *mut _) };
                }
                return Some(faults);
            }
        }
        for p in ptrs.drain(..) {
            unsafe { lg_free(p as *mut _) };
        }
        None
    })
    .join()
    .unwrap();
    let Some(faults) = faults else {
        panic!("no attempt ran within 90 ms: the machine is too loaded to tell");
    };
    let pages = (12 << 20) / 4096;
    eprintln!("{faults} minor faults taking 12 MiB ({pages} OS pages) again");
    assert!(
        faults * 10 < pages,
        "{faults} faults taking {pages} OS pages again"
    );
}

/// The purge delay adapts: memory a purge decommitted and the program took back within
/// one delay of the purge doubles it (up to a second), and `lg_trim` resets it. A
/// thread frees 8 MiB of blocks, waits past the starting delay (100 ms) and takes as
/// much again, in rounds: the first round's memory was purged and faults back in; by
/// the third, the longer delay has kept it resident. Rounds whose wait overran (a
/// loaded machine) prove nothing and the sequence is tried again.
#[test]
fn memory_purged_and_taken_back_soon_lengthens_the_purge_delay() {
    let _g = SERIAL.lock().unwrap();
    let count = (8 << 20) / 1000;
    let pages = (8 << 20) / 4096;
    let rounds = std::thread::spawn(move || {
        for _ in 0..5 {
            lg_trim();
            let mut ptrs: Vec<usize> = Vec::with_capacity(count);
            let mut faults = Vec::new();
            let mut overran = false;
            for round in 0..4 {
                let before = thread_minor_faults();
                for _ in 0..count {
                    let p = lg_malloc(1000) as usize;
                    assert_ne!(p, 0);
                    unsafe { std::ptr::write_bytes(p as *mut u8, round as u8, 1000) };
                    ptrs.push(p);
                }
                if round > 0 {
                    faults.push(thread_minor_faults() - before);
                }
                let start = std::time::Instant::now();
                for p in ptrs.drain(..) {
                    unsafe { lg_free(p as *mut _) };
                }
                std::thread::sleep(std::time::Duration::from_millis(130));
                overran |= start.elapsed() > std::time::Duration::from_millis(180);
            }
            lg_trim();
            if !overran {
                return Some(faults);
            }
        }
        None
    })
    .join()
    .unwrap();
    let Some(faults) = rounds else {
        panic!("every attempt overran its waits: the machine is too loaded to tell");
    };
    eprintln!("faults taking {pages} OS pages again after 130 ms, by round: {faults:?}");
    assert!(
        faults[0] * 4 > pages,
        "the first wait should have purged: {faults:?} faults of {pages} pages"
    );
    assert!(
        faults[2] * 10 < pages,
        "the third wait should have kept the memory: {faults:?} faults of {pages} pages"
    );
}

/// A class of blocks over 64 KiB takes pages of one block
/// (`size_class::MAX_PAGE_BYTES`). With four to a page, one live block kept its page,
/// and so its three freed neighbours, resident for as long as it lived: out of reach of
/// other classes, of the purge and of `lg_trim` (7 MB of the realloc-grow benchmark's
/// 29 MB peak). Here a new thread writes four blocks of each of eight classes from 72
/// to 256 KiB and frees three of each; after its `lg_trim` none of the freed blocks may
/// stay resident (the OS pages at their ends excepted), and the live ones keep their
/// contents.
#[test]
fn freed_blocks_of_a_page_each_go_back_while_their_class_has_live_ones() {
    let _g = SERIAL.lock().unwrap();
    std::thread::spawn(|| {
        let sizes = [
            72 << 10,
            80 << 10,
            96 << 10,
            112 << 10,
            128 << 10,
            160 << 10,
            192 << 10,
            256 << 10,
        ];
        let mut live = Vec::new();
        let mut freed = Vec::new();
        for (i, &size) in sizes.iter().enumerate() {
            for k in 0..4 {
                let p = malloc_unsampled(size);
                unsafe { std::ptr::write_bytes(p as *mut u8, i as u8 + 1, size) };
                if k == 0 {
                    live.push((p, size, i as u8 + 1));
                } else {
                    freed.push((p, size));
                }
            }
        }
        for &(p, _) in &freed {
            unsafe { lg_free(p as *mut _) };
        }
        lg_trim();
        let resident: usize = freed
            .iter()
            .map(|&(p, size)| {
                let start = p.next_multiple_of(4096) + 4096;
                let end = ((p + size) & !4095) - 4096;
                resident_pages(start, end - start) * 4096
            })
            .sum();
        for &(p, size, byte) in &live {
            let block = unsafe { std::slice::from_raw_parts(p as *const u8, size) };
            assert!(
                block.iter().all(|&b| b == byte),
                "live block of {size} bytes changed"
            );
            unsafe { lg_free(p as *mut _) };
        }
        let freed_bytes: usize = freed.iter().map(|&(_, size)| size).sum();
        eprintln!("{resident} of {freed_bytes} freed bytes resident after lg_trim");
        assert_eq!(
            resident, 0,
            "{resident} of {freed_bytes} bytes of freed blocks still resident after lg_trim"
        );
    })
    .join()
    .unwrap();
}

/// `lg_malloc(size)`, taken again until the block is not a sampled one (a sampled block
/// lives in the sample arena, not in a page of its class, about once per 256 KiB
/// allocated); the sampled ones are freed. For tests about which page a block comes
/// from.
fn malloc_unsampled(size: usize) -> usize {
    let mut sampled = Vec::new();
    let p = loop {
        let p = lg_malloc(size) as usize;
        assert_ne!(p, 0);
        if !lgmalloc::profile::is_sampled(p as *const u8) {
            break p;
        }
        sampled.push(p);
    };
    for q in sampled {
        unsafe { lg_free(q as *mut _) };
    }
    p
}

/// A thread that frees a block of an exited thread's page, and has no page of that
/// class with room, takes the page over (`heap::reclaim`): from then on the page is its
/// own, so its next allocation of the size gets the freed block back, and another
/// thread that needs a page of the class meanwhile cannot adopt it. Without the
/// takeover the block waits on the abandoned page's remote list, and the first thread
/// to allocate the class adopts the page and gets the block.
#[test]
fn a_thread_freeing_an_exited_threads_block_takes_its_page_over() {
    let _g = SERIAL.lock().unwrap();
    // A class no other test here allocates, so no other abandoned page of it is around.
    const SIZE: usize = 5000;
    let blocks: Vec<usize> =
        std::thread::spawn(|| (0..4).map(|_| malloc_unsampled(SIZE)).collect())
            .join()
            .unwrap();
    let freed = Arc::new(Barrier::new(2));
    let allocated = Arc::new(Barrier::new(2));
    let freer = {
        let (freed, allocated, blocks) =
            (Arc::clone(&freed), Arc::clone(&allocated), blocks.clone());
        std::thread::spawn(move || {
            // A heap of its own first, with no page of SIZE's class.
            let own = lg_malloc(24);
            unsafe { lg_free(blocks[0] as *mut _) };
            freed.wait();
            allocated.wait();
            let again = malloc_unsampled(SIZE);
            unsafe { lg_free(own) };
            again
        })
    };
    freed.wait();
    let other = std::thread::spawn(move || {
        let p = malloc_unsampled(SIZE);
        unsafe { lg_free(p as *mut _) };
        p
    })
    .join()
    .unwrap();
    allocated.wait();
    let again = freer.join().unwrap();
    assert_ne!(
        other, blocks[0],
        "another thread adopted the page the freeing thread took"
    );
    assert_eq!(
        again, blocks[0],
        "the freed block did not come back to the thread that freed it"
    );
    for &p in &blocks[1..] {
        unsafe { lg_free(p as *mut _) };
    }
    unsafe { lg_free(again as *mut _) };
}

/// A thread whose page of the class still has room does not take an exited thread's
/// page over when it frees into it (a thread that only frees into other threads' pages
/// would otherwise collect pages it never allocates from: mimalloc's test-stress grew
/// from 215 to 600 MiB that way): its next allocation comes from its own page.
#[test]
fn a_thread_with_room_in_the_class_leaves_an_exited_threads_page_alone() {
    let _g = SERIAL.lock().unwrap();
    // Small blocks: the first page holds many, so it still has room after one.
    const SIZE: usize = 256;
    let (tx, rx) = std::sync::mpsc::channel::<usize>();
    let has_page = Arc::new(Barrier::new(2));
    let freer = {
        let has_page = Arc::clone(&has_page);
        std::thread::spawn(move || {
            // Its page of the class exists (with room) before the other thread's does,
            // so it adopts none of them.
            let mine = malloc_unsampled(SIZE);
            has_page.wait();
            let first = rx.recv().unwrap();
            unsafe { lg_free(first as *mut _) };
            let next = malloc_unsampled(SIZE);
            unsafe { lg_free(mine as *mut _) };
            unsafe { lg_free(next as *mut _) };
            (mine, next)
        })
    };
    has_page.wait();
    let blocks: Vec<usize> =
        std::thread::spawn(|| (0..4).map(|_| malloc_unsampled(SIZE)).collect())
            .join()
            .unwrap();
    tx.send(blocks[0]).unwrap();
    let (mine, next) = freer.join().unwrap();
    for &p in &blocks[1..] {
        unsafe { lg_free(p as *mut _) };
    }
    assert_ne!(mine, 0);
    assert_ne!(
        next, blocks[0],
        "the freeing thread took the page over although its own had room"
    );
}
