//! Large objects (above 256 KiB): contents and alignment survive reuse of cached
//! mappings, realloc's moves and shrinks; reused memory handed to calloc reads as zero;
//! a freed peak does not stay resident.

use lgmalloc::c_api::*;

const MIB: usize = 1 << 20;

fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

fn committed() -> u64 {
    let mut s = lgmalloc::LgStats::default();
    unsafe { lg_stats(&mut s) };
    s.bytes_committed
}

// These tests measure process-wide memory and the one large-object cache: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Byte `i` of a buffer filled by `fill(p, n, seed)`.
fn pattern(i: usize, seed: usize) -> u8 {
    (i.wrapping_mul(31).wrapping_add(seed) % 251) as u8
}

fn fill(p: *mut u8, n: usize, seed: usize) {
    let s = unsafe { std::slice::from_raw_parts_mut(p, n) };
    for (i, b) in s.iter_mut().enumerate() {
        *b = pattern(i, seed);
    }
}

/// The first byte of `[p, p + n)` that differs from the pattern, if any.
fn first_mismatch(p: *const u8, n: usize, seed: usize) -> Option<usize> {
    let s = unsafe { std::slice::from_raw_parts(p, n) };
    s.iter()
        .enumerate()
        .position(|(i, &b)| b != pattern(i, seed))
}

fn allocate_written(n: usize, seed: usize) -> *mut u8 {
    let p = lg_malloc(n) as *mut u8;
    assert!(!p.is_null(), "malloc({n}) failed");
    fill(p, n, seed);
    p
}

/// Mappings freed in every order and reused for smaller, equal and bigger requests
/// (a best fit, a split tail, pages gathered from several cached mappings) hand out
/// memory that holds what was written to it while the objects live side by side.
#[test]
fn contents_survive_reuse_of_cached_mappings() {
    let _g = serial();
    lg_trim();
    let sizes = [
        5 * MIB + 123,
        25 * MIB,
        300 << 10,
        9 * MIB + 4096,
        17 * MIB - 1,
    ];
    let mut live: Vec<(*mut u8, usize, usize)> = Vec::new();
    let mut seed = 0;
    for round in 0..40 {
        seed += 1;
        let n = sizes[(round * 7) % sizes.len()] + round * 4096;
        live.push((allocate_written(n, seed), n, seed));
        if live.len() > 6 {
            let (p, n, s) = live.remove((round * 5) % live.len());
            assert_eq!(first_mismatch(p, n, s), None, "round {round}: {n} bytes");
            unsafe { lg_free(p.cast()) };
        }
    }
    for (p, n, s) in live {
        assert_eq!(first_mismatch(p, n, s), None, "{n} bytes");
        unsafe { lg_free(p.cast()) };
    }
}

/// calloc on a reused mapping clears it: written mappings freed, then zeroed requests
/// served from them (one smaller, taking a split part; one bigger than any, gathered).
#[test]
fn calloc_on_reused_mappings_reads_zero() {
    let _g = serial();
    lg_trim();
    for &(freed, sizes) in &[(20 * MIB, 5 * MIB), (6 * MIB, 17 * MIB), (MIB, 3 * MIB)] {
        let ps: Vec<_> = (0..3).map(|i| allocate_written(freed, i)).collect();
        for p in ps {
            unsafe { lg_free(p.cast()) };
        }
        let z = lg_calloc(1, sizes) as *const u8;
        assert!(!z.is_null());
        let s = unsafe { std::slice::from_raw_parts(z, sizes) };
        assert_eq!(
            s.iter().position(|&b| b != 0),
            None,
            "calloc({sizes}) after freeing 3 x {freed}"
        );
        unsafe { lg_free(z as *mut _) };
    }
}

/// Large objects of every alignment the API accepts land on it, and their bytes stay.
#[test]
fn alignment_is_honoured() {
    let _g = serial();
    for shift in [12usize, 16, 21, 22, 23] {
        let align = 1usize << shift;
        for n in [300 << 10, 5 * MIB + 7] {
            let p = lg_aligned_alloc(align, n) as *mut u8;
            assert!(!p.is_null(), "aligned_alloc({align}, {n})");
            assert_eq!(p as usize % align, 0, "aligned_alloc({align}, {n})");
            assert!(unsafe { lg_usable_size(p.cast()) } >= n);
            fill(p, n, shift);
            assert_eq!(first_mismatch(p, n, shift), None);
            unsafe { lg_free(p.cast()) };
        }
    }
}

/// realloc grows a large object (moving its pages) and shrinks it, keeping its bytes.
#[test]
fn realloc_keeps_contents_growing_and_shrinking() {
    let _g = serial();
    let mut n = 300 << 10;
    let mut p = allocate_written(n, 9);
    for next in [MIB, 7 * MIB + 5, 30 * MIB, 12 * MIB, 400 << 10, 9 * MIB] {
        let q = unsafe { lg_realloc(p.cast(), next) } as *mut u8;
        assert!(!q.is_null(), "realloc to {next}");
        let kept = n.min(next);
        assert_eq!(first_mismatch(q, kept, 9), None, "{n} -> {next}");
        fill(q, next, 9);
        p = q;
        n = next;
    }
    unsafe { lg_free(p.cast()) };
}

/// After a written peak of large objects is freed, little of it stays resident at once
/// (the cache keeps at most a floor once no large object is live), nothing beyond the
/// newest freed mapping once the delay has passed and a thread exits, and `lg_trim`
/// gives back the rest.
#[test]
fn a_freed_peak_goes_back() {
    let _g = serial();
    lg_trim();
    let start = rss_bytes();
    let ps: Vec<_> = (0..40).map(|i| allocate_written(8 * MIB, i)).collect();
    let peak = rss_bytes() - start;
    assert!(peak >= 300 * MIB, "peak not resident: {peak}");
    for p in ps {
        unsafe { lg_free(p.cast()) };
    }
    let after_free = rss_bytes().saturating_sub(start);
    assert!(
        after_free <= peak / 10,
        "{after_free} of a {peak}-byte peak still resident right after the free"
    );
    // Past the delay, a thread exit unmaps what waited.
    std::thread::sleep(std::time::Duration::from_millis(700));
    std::thread::spawn(|| {
        let p = lg_malloc(100);
        unsafe { lg_free(p) };
    })
    .join()
    .unwrap();
    let after_delay = rss_bytes().saturating_sub(start);
    assert!(
        after_delay <= 2 * MIB,
        "{after_delay} bytes still resident after the delay (peak {peak})"
    );
    // lg_trim releases what the cache holds at once.
    let p = allocate_written(12 * MIB, 1);
    unsafe { lg_free(p.cast()) };
    let before_trim = committed();
    let released = lg_trim();
    assert!(released >= 12 * MIB, "lg_trim released {released}");
    assert!(committed() + 12 * MIB as u64 <= before_trim);
}

/// Buffers grown by small reallocs pass through the block classes up to the largest
/// (blocks of 256 KiB, in pages of a megabyte or more) before they become large
/// objects: once they are freed, `lg_trim` gives back the emptied pages of every class,
/// the last page of each class included.
#[test]
fn buffers_grown_by_realloc_give_their_memory_back() {
    let _g = serial();
    lg_trim();
    let start = rss_bytes();
    let mut bufs: Vec<(*mut u8, usize)> = (0..48).map(|i| (allocate_written(16, i), 16)).collect();
    for round in 0..2000 {
        for (i, (p, n)) in bufs.iter_mut().enumerate() {
            let next = *n + 400 + (round + i) % 100;
            // SAFETY: `p` is live, of `n` bytes; it is replaced by the result.
            let q = unsafe { lg_realloc(p.cast(), next) } as *mut u8;
            assert!(!q.is_null());
            // SAFETY: `q` has `next` bytes.
            unsafe { std::ptr::write_bytes(q.add(*n), 0x5a, next - *n) };
            *p = q;
            *n = next;
        }
    }
    let peak = rss_bytes().saturating_sub(start);
    let live: usize = bufs.iter().map(|b| b.1).sum();
    assert!(
        peak >= live / 2,
        "peak {peak} below half the {live} live bytes"
    );
    for (p, _) in bufs {
        // SAFETY: each buffer is live and freed once.
        unsafe { lg_free(p.cast()) };
    }
    lg_trim();
    let after = rss_bytes().saturating_sub(start);
    assert!(
        after <= peak / 8,
        "{after} of a {peak}-byte peak ({live} live) still resident after free and trim; \
         lgmalloc counts {} bytes committed",
        committed()
    );
}

/// Minor page faults of the calling thread so far.
fn thread_minor_faults() -> i64 {
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) }, 0);
    u.ru_minflt
}

/// Writes one byte per OS page of the first `head` bytes of `p`, and its last byte.
fn touch_head_and_end(p: *mut u8, n: usize, head: usize) {
    for off in (0..head.min(n)).step_by(4096) {
        // SAFETY: `p` has `n` bytes.
        unsafe { p.add(off).write_volatile(1) };
    }
    // SAFETY: as above.
    unsafe { p.add(n - 1).write_volatile(1) };
}

/// A program that keeps a window of buffers of 1 to 32 MiB, replacing a random one at
/// each step and writing the head (first MiB) and last byte of each new buffer, faults
/// little in once the window turned over: a mapping bigger than the request is handed
/// out whole when the part past the request holds next to nothing resident (it would
/// otherwise be cached alone, serve a later request whose head faults in anew, and
/// crowd resident mappings out of the cache). Splitting every such mapping cost about
/// 37 faults per step here, against 4.
#[test]
fn a_window_of_big_buffers_reuses_their_resident_heads() {
    let _g = serial();
    lg_trim();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut draw = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        // Log-uniform in [1, 32] MiB.
        let e = (rng >> 11) as f64 / (1u64 << 53) as f64 * 5.0;
        ((MIB as f64) * e.exp2()) as usize
    };
    let mut slot: Vec<(*mut u8, usize)> = Vec::new();
    let replace = |k: usize, n: usize, slot: &mut Vec<(*mut u8, usize)>| {
        if let Some(&(p, _)) = slot.get(k) {
            // SAFETY: live, replaced below.
            unsafe { lg_free(p.cast()) };
        }
        let p = lg_malloc(n) as *mut u8;
        assert!(!p.is_null());
        touch_head_and_end(p, n, MIB);
        if k < slot.len() {
            slot[k] = (p, n);
        } else {
            slot.push((p, n));
        }
    };
    for k in 0..8 {
        let n = draw();
        replace(k, n, &mut slot);
    }
    let steps = 400;
    let mut faults = 0;
    for i in 0..steps {
        let (k, n) = ((draw() >> 3) % 8, draw());
        let before = thread_minor_faults();
        replace(k, n, &mut slot);
        if i >= steps / 4 {
            faults += thread_minor_faults() - before;
        }
    }
    for (p, _) in slot {
        // SAFETY: live, freed once.
        unsafe { lg_free(p.cast()) };
    }
    lg_trim();
    let per_step = faults / (steps - steps / 4) as i64;
    eprintln!("{per_step} minor faults per step (a MiB head is 256 pages)");
    assert!(
        per_step < 16,
        "{per_step} minor faults per step: buffers' heads fault in again"
    );
}

/// A freed 32 MiB buffer of which a program wrote one MiB is charged as about one MiB
/// resident (the kernel is asked), not as all of its 32: the cache's budget counts
/// memory, not address space, so it can keep many such buffers.
#[test]
fn cached_buffers_are_charged_what_is_resident() {
    let _g = serial();
    lg_trim();
    let before = committed();
    let n = 32 * MIB;
    let p = lg_malloc(n) as *mut u8;
    assert!(!p.is_null());
    touch_head_and_end(p, n, MIB);
    // SAFETY: live, freed once.
    unsafe { lg_free(p.cast()) };
    let charged = committed().saturating_sub(before);
    lg_trim();
    assert!(
        charged < 4 * MIB as u64,
        "a freed 32 MiB buffer with 1 MiB written counts {charged} bytes committed"
    );
    assert!(
        charged >= MIB as u64,
        "a freed buffer with 1 MiB written counts only {charged} bytes committed"
    );
}
