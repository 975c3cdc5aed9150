//! Out of memory: every entry point returns NULL with ENOMEM (posix_memalign returns
//! ENOMEM and leaves errno alone) when the address space runs out, nothing crashes, and
//! once the memory is freed allocation works again and live blocks kept their contents.
//!
//! The exhaustion runs in a child process (this test binary re-run with
//! `LGMALLOC_OOM_CHILD=1`) whose `RLIMIT_AS` is set a little above what it already uses.
//! While the limit is near, the child allocates nothing through the process allocator:
//! the blocks it takes are chained through their own first words, and results go into
//! a fixed array that is checked and printed once the limit is lifted.

use lgmalloc::c_api::*;
use lgmalloc::os::{errno, set_errno};
use std::ffi::c_void;
use std::process::{Command, Stdio};
use std::ptr;
use std::time::{Duration, Instant};

/// Address space the child may take beyond what it uses when the limit is set.
const HEADROOM: usize = 192 << 20;
/// No entry point may need more allocations than this to run out.
const MAX_ALLOCS: usize = 20_000_000;

#[test]
fn every_entry_point_fails_cleanly_and_recovers() {
    let start = Instant::now();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_entry", "--test-threads=1", "--nocapture"])
        .env("LGMALLOC_OOM_CHILD", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(120) {
            child.kill().ok();
            panic!("the out-of-memory child did not finish in 120 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: Vec<&str> = stdout.lines().filter(|l| l.starts_with("oom:")).collect();
    println!("{}", report.join("\n"));
    assert!(
        status.success(),
        "child failed ({status:?}):\n{stdout}\n{stderr}"
    );
    assert!(
        report.iter().any(|l| l.contains("all checks passed")),
        "child did not finish its checks:\n{stdout}\n{stderr}"
    );
    println!("oom: took {:.2} s", start.elapsed().as_secs_f64());
}

/// One exhausted entry point: how many allocations succeeded, what the failing call
/// returned and what errno was afterwards.
#[derive(Clone, Copy)]
struct Outcome {
    name: &'static str,
    allocated: usize,
    failed: bool,
    /// errno after the failing call (for posix_memalign: its return value).
    code: i32,
    /// posix_memalign only: errno after the failing call (must be unchanged).
    errno_after: i32,
    /// Blocks whose check word was intact when freed.
    intact: bool,
    /// After freeing, the same request succeeded again (under the same limit).
    recovered: bool,
}

const NO_OUTCOME: Outcome = Outcome {
    name: "",
    allocated: 0,
    failed: false,
    code: 0,
    errno_after: 0,
    intact: true,
    recovered: false,
};

/// Blocks taken by one phase, linked through their first word; the second word holds a
/// check value derived from the address.
struct Chain {
    head: *mut usize,
    count: usize,
}

fn check_word(p: *mut usize) -> usize {
    (p as usize).rotate_left(17) ^ 0x5a5a_1234_9876_abcd
}

impl Chain {
    fn new() -> Chain {
        Chain {
            head: ptr::null_mut(),
            count: 0,
        }
    }

    /// Links `p`, a fresh block of at least `size` (>= 16) bytes.
    fn push(&mut self, p: *mut c_void, size: usize) {
        let w = p.cast::<usize>();
        unsafe {
            *w = self.head as usize;
            *w.add(1) = check_word(w);
            // Touch the last byte too, so a block shorter than asked for shows up.
            *p.cast::<u8>().add(size - 1) = 0xa5;
        }
        self.head = w;
        self.count += 1;
    }

    /// Frees every block; false if some block's check word changed.
    fn free_all(&mut self) -> bool {
        let mut ok = true;
        let mut p = self.head;
        while !p.is_null() {
            unsafe {
                ok &= *p.add(1) == check_word(p);
                let next = *p as *mut usize;
                lg_free(p.cast());
                p = next;
            }
        }
        self.head = ptr::null_mut();
        self.count = 0;
        ok
    }
}

/// Allocates with `alloc` until it fails; records the outcome, frees everything, and
/// checks that the same request works again.
fn exhaust(
    name: &'static str,
    size: usize,
    alloc: &mut dyn FnMut() -> *mut c_void,
    out: &mut Outcome,
) {
    let mut chain = Chain::new();
    out.name = name;
    while chain.count < MAX_ALLOCS {
        set_errno(0);
        let p = alloc();
        if p.is_null() {
            out.failed = true;
            out.code = errno();
            break;
        }
        chain.push(p, size);
    }
    out.allocated = chain.count;
    out.intact = chain.free_all();
    lg_trim();
    let p = alloc();
    out.recovered = !p.is_null();
    if !p.is_null() {
        unsafe { lg_free(p) };
    }
}

/// `lg_posix_memalign` until it fails: its return value is the error, errno stays.
fn exhaust_posix_memalign(name: &'static str, align: usize, size: usize, out: &mut Outcome) {
    let mut chain = Chain::new();
    out.name = name;
    while chain.count < MAX_ALLOCS {
        let mut p: *mut c_void = ptr::null_mut();
        set_errno(4242);
        let r = unsafe { lg_posix_memalign(&mut p, align, size) };
        if r != 0 {
            out.failed = true;
            out.code = r;
            out.errno_after = errno();
            break;
        }
        chain.push(p, size);
    }
    out.allocated = chain.count;
    out.intact = chain.free_all();
    lg_trim();
    let mut p: *mut c_void = ptr::null_mut();
    out.recovered = unsafe { lg_posix_memalign(&mut p, align, size) } == 0;
    unsafe { lg_free(p) };
}

/// `lg_realloc` doubling one block until it fails: NULL + ENOMEM, and the old block still
/// holds its contents (one marked byte per 4 KiB and the first 4 KiB).
fn exhaust_realloc(out: &mut Outcome) {
    out.name = "lg_realloc growth";
    let mut size = 64usize;
    let mut p = lg_malloc(size) as *mut u8;
    let mark = |p: *mut u8, from: usize, to: usize| {
        let mut i = from;
        while i < to {
            unsafe { *p.add(i) = (i / 4096) as u8 ^ 0x3c };
            i += if i < 4096 { 1 } else { 4096 };
        }
    };
    let intact = |p: *mut u8, to: usize| {
        let mut i = 0;
        while i < to {
            if unsafe { *p.add(i) } != (i / 4096) as u8 ^ 0x3c {
                return false;
            }
            i += if i < 4096 { 1 } else { 4096 };
        }
        true
    };
    mark(p, 0, size);
    while out.allocated < 64 {
        let new_size = size * 2;
        set_errno(0);
        let q = unsafe { lg_realloc(p.cast(), new_size) } as *mut u8;
        if q.is_null() {
            out.failed = true;
            out.code = errno();
            break;
        }
        out.allocated += 1;
        out.intact &= intact(q, size);
        p = q;
        mark(p, size, new_size);
        size = new_size;
    }
    out.intact &= intact(p, size);
    unsafe { lg_free(p.cast()) };
    lg_trim();
    let q = lg_malloc(size / 2);
    out.recovered = !q.is_null();
    unsafe { lg_free(q) };
}

fn vm_size() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmSize:")).unwrap();
    let kb: usize = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

fn set_as_limit(bytes: libc::rlim_t) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_AS, &mut lim), 0);
        lim.rlim_cur = bytes;
        assert_eq!(libc::setrlimit(libc::RLIMIT_AS, &lim), 0);
    }
}

/// Blocks allocated before the limit, checked after everything: the heap stayed intact.
fn sentinels() -> Vec<(usize, usize, u8)> {
    let sizes = [48usize, 48, 700, 20_000, 200_000, 1 << 20, 3 << 20];
    sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let p = lg_malloc(n) as *mut u8;
            assert!(!p.is_null());
            for k in (0..n).step_by(61) {
                unsafe { *p.add(k) = (k as u8).wrapping_add(i as u8) };
            }
            (p as usize, n, i as u8)
        })
        .collect()
}

fn sentinels_intact(s: &[(usize, usize, u8)]) -> bool {
    s.iter().all(|&(p, n, i)| {
        (0..n)
            .step_by(61)
            .all(|k| unsafe { *(p as *const u8).add(k) } == (k as u8).wrapping_add(i))
    })
}

#[test]
fn child_entry() {
    if std::env::var_os("LGMALLOC_OOM_CHILD").is_none() {
        return;
    }
    let keep = sentinels();
    let mut outcomes = [NO_OUTCOME; 16];
    let limit = vm_size() + HEADROOM;
    println!(
        "oom: address-space limit {} MiB ({} MiB headroom)",
        limit >> 20,
        HEADROOM >> 20
    );
    set_as_limit(limit as libc::rlim_t);
    // From here until the limit is lifted nothing may use the process allocator.
    {
        let mut o = outcomes.iter_mut();
        exhaust(
            "lg_malloc 48 B",
            48,
            &mut || lg_malloc(48),
            o.next().unwrap(),
        );
        exhaust(
            "lg_malloc 20000 B",
            20_000,
            &mut || lg_malloc(20_000),
            o.next().unwrap(),
        );
        exhaust(
            "lg_malloc 200000 B",
            200_000,
            &mut || lg_malloc(200_000),
            o.next().unwrap(),
        );
        exhaust(
            "lg_malloc 1 MiB (large)",
            1 << 20,
            &mut || lg_malloc(1 << 20),
            o.next().unwrap(),
        );
        exhaust(
            "lg_malloc 9 MiB (large)",
            9 << 20,
            &mut || lg_malloc(9 << 20),
            o.next().unwrap(),
        );
        exhaust(
            "lg_calloc 10 x 10 B",
            100,
            &mut || lg_calloc(10, 10),
            o.next().unwrap(),
        );
        exhaust(
            "lg_calloc 1 x 2 MiB",
            2 << 20,
            &mut || lg_calloc(1, 2 << 20),
            o.next().unwrap(),
        );
        exhaust_realloc(o.next().unwrap());
        exhaust(
            "lg_aligned_alloc 256, 1000 B",
            1000,
            &mut || lg_aligned_alloc(256, 1000),
            o.next().unwrap(),
        );
        exhaust(
            "lg_aligned_alloc 1 MiB, 100000 B",
            100_000,
            &mut || lg_aligned_alloc(1 << 20, 100_000),
            o.next().unwrap(),
        );
        exhaust(
            "lg_aligned_alloc 8 MiB, 4096 B",
            4096,
            &mut || lg_aligned_alloc(8 << 20, 4096),
            o.next().unwrap(),
        );
        exhaust_posix_memalign("lg_posix_memalign 64, 5000 B", 64, 5000, o.next().unwrap());
        exhaust_posix_memalign(
            "lg_posix_memalign 2 MiB, 1 MiB",
            2 << 20,
            1 << 20,
            o.next().unwrap(),
        );
    }
    let kept = sentinels_intact(&keep);
    set_as_limit(libc::RLIM_INFINITY);

    let mut failures = Vec::new();
    for o in outcomes.iter().filter(|o| !o.name.is_empty()) {
        let posix = o.name.starts_with("lg_posix_memalign");
        println!(
            "oom: {:<34} {:>9} allocations, then {} {} ({}), blocks {}, {}",
            o.name,
            o.allocated,
            if o.failed { "NULL" } else { "no failure" },
            if posix { "returned" } else { "errno" },
            o.code,
            if o.intact { "intact" } else { "CORRUPTED" },
            if o.recovered {
                "works again after freeing"
            } else {
                "STILL FAILING after freeing"
            }
        );
        if !o.failed {
            failures.push(format!("{}: never failed", o.name));
        }
        if o.failed && o.code != libc::ENOMEM {
            failures.push(format!("{}: error {} instead of ENOMEM", o.name, o.code));
        }
        if posix && o.failed && o.errno_after != 4242 {
            failures.push(format!("{}: errno changed to {}", o.name, o.errno_after));
        }
        if !o.intact {
            failures.push(format!("{}: a block's contents changed", o.name));
        }
        if !o.recovered {
            failures.push(format!(
                "{}: fails again after everything was freed",
                o.name
            ));
        }
        if o.failed && o.allocated == 0 && o.name != "lg_realloc growth" {
            failures.push(format!("{}: failed without allocating anything", o.name));
        }
    }
    if !kept {
        failures.push("blocks allocated before the limit lost their contents".into());
    }
    // The heap still works without a limit.
    let p = lg_malloc(100 << 20) as *mut u8;
    assert!(!p.is_null());
    unsafe {
        *p.add((100 << 20) - 1) = 1;
        lg_free(p.cast());
    }
    for (p, _, _) in keep {
        unsafe { lg_free(p as *mut c_void) };
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    println!("oom: all checks passed");
}
