//! Heap misuse is stopped with SIGABRT and the full message `lgmalloc: <what> at
//! <address>`, never silently. Each case runs in a child process (this test binary re-run
//! with one case selected); the child first prints the address it is about to misuse, so
//! the parent checks the exact message line.
//!
//! With the `unchecked` feature lgmalloc skips the checks of small-block frees (double
//! frees, interior pointers of small blocks): those cases are compiled out there. The
//! `hardened` feature adds the free-list corruption cases.

use lgmalloc::c_api::*;
use std::ffi::c_void;
use std::process::Command;

static STATIC_DATA: [u64; 8] = [0; 8];

/// Tells the parent which address the misuse is about (before lgmalloc aborts).
fn at<T>(p: *const T) -> *mut c_void {
    eprintln!("misuse-test: address {:#x}", p as usize);
    p as *mut c_void
}

/// `lg_malloc`, but never a sampled block (about one allocation per 256 KiB is served
/// from the sample arena): the cases rely on where blocks lie in their page. A sampled
/// allocation leaves the page as it was, so the next one is the block it would have
/// been.
fn page_block(size: usize) -> *mut c_void {
    loop {
        let p = lg_malloc(size);
        if !lgmalloc::profile::is_sampled(p as *const u8) {
            return p;
        }
    }
}

/// Performs one misuse. Returns only if lgmalloc failed to stop it.
fn perform(case: &str) {
    unsafe {
        match case {
            "double_free_small" => {
                let p = page_block(40);
                let q = page_block(40); // another free in between must not hide it
                lg_free(p);
                lg_free(q);
                lg_free(at(p));
            }
            "double_free_large" => {
                let p = page_block(1 << 20);
                lg_free(p);
                lg_free(at(p));
            }
            "free_stack" => {
                let mut local = [0u64; 4];
                std::hint::black_box(&mut local);
                lg_free(at(local.as_mut_ptr()));
            }
            "free_static" => lg_free(at(STATIC_DATA.as_ptr())),
            "free_interior" => {
                let p = page_block(96) as *mut u8;
                lg_free(at(p.add(48)));
            }
            "free_interior_unaligned" => {
                let p = page_block(64) as *mut u8;
                lg_free(at(p.add(8)));
            }
            "free_interior_large" => {
                let p = page_block(1 << 20) as *mut u8;
                lg_free(at(p.add(8192)));
            }
            "free_wild" => lg_free(at(0x1234_5678_9000usize as *const u8)),
            "free_uncarved" => {
                // A block-aligned address in the part of a page not yet carved into
                // blocks (pages of 2 KiB blocks are carved two blocks at a time).
                let p = page_block(2048) as *mut u8;
                lg_free(at(p.add(2048 * 3)));
            }
            "free_in_fresh_segment_memory" => {
                // An address in the middle of the 4 MiB segment holding a block: memory
                // of the segment no page has covered yet (this process allocated a few
                // blocks), whose slice-map entry was never written by a page or span.
                let p = page_block(32) as usize;
                let segment = p & !((4 << 20) - 1);
                lg_free(at((segment + (2 << 20) + 512) as *const u8));
            }
            "free_in_segment_metadata" => {
                let p = page_block(32) as usize;
                let segment = p & !((4 << 20) - 1);
                lg_free(at((segment + 64) as *const u8));
            }
            "free_never_handed_out" => {
                // A carved block still waiting on the free list.
                let p = page_block(16) as *mut u8;
                lg_free(at(p.add(16 * 40)));
            }
            "free_sized_too_large" => {
                let p = page_block(100);
                lg_free_sized(at(p), 100_000);
            }
            "realloc_freed" => {
                let p = page_block(200);
                let keep = page_block(200);
                lg_free(p);
                let _ = lg_realloc(at(p), 400);
                lg_free(keep);
            }
            "realloc_freed_large" => {
                let p = page_block(1 << 20);
                lg_free(p);
                let _ = lg_realloc(at(p), 2 << 20);
            }
            "realloc_stack" => {
                let mut local = [0u64; 4];
                std::hint::black_box(&mut local);
                let _ = lg_realloc(at(local.as_mut_ptr()), 100);
            }
            "realloc_static" => {
                let _ = lg_realloc(at(STATIC_DATA.as_ptr()), 100);
            }
            "realloc_interior" => {
                let p = page_block(96) as *mut u8;
                let _ = lg_realloc(at(p.add(32)), 200);
            }
            "realloc_interior_large" => {
                let p = page_block(1 << 20) as *mut u8;
                let _ = lg_realloc(at(p.add(4096)), 2 << 20);
            }
            "cross_thread_double_free" => {
                let p = page_block(48) as usize;
                std::thread::spawn(move || lg_free(p as *mut c_void))
                    .join()
                    .unwrap();
                lg_free(at(p as *const u8));
            }
            "use_after_free_write" => {
                let p = page_block(64) as *mut usize;
                let q = page_block(64);
                lg_free(q);
                lg_free(p.cast());
                // A dangling write steers the free list to an address of the attacker's
                // choosing (here: a stack slot).
                let mut target = [0usize; 8];
                *p = target.as_mut_ptr() as usize;
                let _ = page_block(64);
                let _ = page_block(64);
            }
            "use_after_free_garbage" => {
                // Any word written into a freed block's link, then two allocations of
                // its class: the second follows the link.
                let p = page_block(48) as *mut u64;
                lg_free(p.cast());
                *p = 0x4141_4141_4141_4141;
                let _ = page_block(48);
                let _ = page_block(48);
            }
            "use_after_free_garbage_calloc" => {
                // As above, then two callocs of the class: calloc's own path checks too.
                let p = page_block(48) as *mut u64;
                lg_free(p.cast());
                *p = 0x4141_4141_4141_4141;
                let _ = lg_calloc(1, 48);
                let _ = lg_calloc(1, 48);
            }
            "use_after_free_zero" => {
                // Zero written into a freed block's link (the list head is stored in
                // link form, so an encoded null ends the list: a plain zero must not).
                let p = page_block(48) as *mut u64;
                let q = page_block(48);
                lg_free(q);
                lg_free(p.cast());
                *p = 0;
                let _ = page_block(48);
                let _ = page_block(48);
            }
            "use_after_free_write_in_segment" => {
                // The link pointed at another free block of the same page: an address
                // inside the segment, which only a link of the right encoding reaches.
                let p = page_block(64) as *mut usize;
                let q = page_block(64);
                let r = page_block(64);
                lg_free(r);
                lg_free(q);
                lg_free(p.cast());
                *p = r as usize;
                let _ = page_block(64);
                let _ = page_block(64);
            }
            "use_after_free_write_remote" => {
                // A dangling write into a block another thread freed, while it waits
                // on the page's remote list: caught when the owner follows the link,
                // walking the list it collects or popping the blocks.
                let p = page_block(48) as usize;
                std::thread::spawn(move || lg_free(p as *mut c_void))
                    .join()
                    .unwrap();
                *(p as *mut u64) = 0x4141_4141_4141_4141;
                for _ in 0..100_000 {
                    let _ = page_block(48);
                }
            }
            other => panic!("unknown case {other}"),
        }
    }
}

#[test]
fn child_entry() {
    if let Ok(case) = std::env::var("LGMALLOC_MISUSE_CASE") {
        perform(&case);
        // Reaching here means the misuse went unnoticed.
        std::process::exit(42);
    }
}

/// Runs `case` in a child; checks SIGABRT and returns its stderr and the address it
/// announced (if any).
fn run_case(case: &str) -> (String, Option<String>) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_entry", "--test-threads=1", "--nocapture"])
        .env("LGMALLOC_MISUSE_CASE", case)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGABRT),
        "{case}: status {:?}, stderr: {stderr}",
        out.status
    );
    let addr = stderr
        .lines()
        .find_map(|l| l.strip_prefix("misuse-test: address "))
        .map(str::to_string);
    (stderr, addr)
}

/// `case` aborts with exactly the line `lgmalloc: <what> at <the address it misused>`.
fn expect_abort(case: &str, what: &str) {
    expect_abort_one_of(case, &[what]);
}

/// As [`expect_abort`], where lgmalloc may word what it found in one of `whats`.
fn expect_abort_one_of(case: &str, whats: &[&str]) {
    let (stderr, addr) = run_case(case);
    let addr = addr.unwrap_or_else(|| panic!("{case}: announced no address: {stderr}"));
    let want: Vec<String> = whats
        .iter()
        .map(|w| format!("lgmalloc: {w} at {addr}"))
        .collect();
    assert!(
        stderr.lines().any(|l| want.iter().any(|w| l == w)),
        "{case}: expected one of the lines {want:?} in stderr: {stderr}"
    );
}

/// `case` aborts with the line `lgmalloc: <what> at 0x<hex>`, at an address the test
/// cannot know (a decoded free-list link).
#[cfg_attr(not(feature = "hardened"), allow(dead_code))]
fn expect_abort_at_some_address(case: &str, what: &str) {
    let (stderr, _) = run_case(case);
    let prefix = format!("lgmalloc: {what} at 0x");
    assert!(
        stderr.lines().any(|l| l
            .strip_prefix(&prefix)
            .is_some_and(|hex| !hex.is_empty() && hex.chars().all(|c| c.is_ascii_hexdigit()))),
        "{case}: expected a line {prefix}<hex> in stderr: {stderr}"
    );
}

const NEVER_RETURNED: &str = "free of a pointer lgmalloc never returned";
const INVALID_OR_FREED: &str = "free of an invalid or already freed pointer";
const REALLOC_NEVER_RETURNED: &str = "realloc of a pointer lgmalloc never returned";
const REALLOC_INVALID_OR_FREED: &str = "realloc of an invalid or already freed pointer";

// ---- checked in every build: large objects and addresses outside lgmalloc's memory

/// A freed large block's mapping is unmapped or cached: its second free finds either no
/// lgmalloc memory at all or no live block there.
#[test]
fn double_free_of_a_large_block() {
    expect_abort_one_of("double_free_large", &[NEVER_RETURNED, INVALID_OR_FREED]);
}
#[test]
fn free_of_a_stack_address() {
    expect_abort("free_stack", NEVER_RETURNED);
}
#[test]
fn free_of_static_data() {
    expect_abort("free_static", NEVER_RETURNED);
}
#[test]
fn free_of_an_interior_pointer_of_a_large_block() {
    expect_abort("free_interior_large", INVALID_OR_FREED);
}
#[test]
fn free_of_a_wild_address() {
    expect_abort("free_wild", NEVER_RETURNED);
}
#[test]
fn free_sized_with_a_size_larger_than_the_block() {
    expect_abort(
        "free_sized_too_large",
        "free_sized with a size larger than the block",
    );
}
#[test]
fn realloc_of_a_freed_large_block() {
    expect_abort_one_of(
        "realloc_freed_large",
        &[REALLOC_NEVER_RETURNED, REALLOC_INVALID_OR_FREED],
    );
}
#[test]
fn realloc_of_a_foreign_pointer() {
    expect_abort("realloc_stack", REALLOC_NEVER_RETURNED);
    expect_abort("realloc_static", REALLOC_NEVER_RETURNED);
    expect_abort("realloc_interior_large", REALLOC_INVALID_OR_FREED);
}

// ---- small-block checks, which the `unchecked` feature removes

#[cfg(not(feature = "unchecked"))]
#[test]
fn double_free_of_a_small_block() {
    expect_abort("double_free_small", "double free");
}
#[cfg(not(feature = "unchecked"))]
#[test]
fn free_of_an_interior_pointer() {
    expect_abort("free_interior", NEVER_RETURNED);
    expect_abort("free_interior_unaligned", NEVER_RETURNED);
}
#[cfg(not(feature = "unchecked"))]
#[test]
fn free_of_a_small_block_address_never_handed_out() {
    expect_abort("free_uncarved", NEVER_RETURNED);
    expect_abort("free_in_fresh_segment_memory", NEVER_RETURNED);
    expect_abort("free_in_segment_metadata", NEVER_RETURNED);
    expect_abort("free_never_handed_out", "double free");
}
#[cfg(not(feature = "unchecked"))]
#[test]
fn realloc_of_a_freed_block() {
    expect_abort("realloc_freed", "realloc of a freed pointer");
}
#[cfg(not(feature = "unchecked"))]
#[test]
fn realloc_of_an_interior_pointer() {
    expect_abort("realloc_interior", REALLOC_NEVER_RETURNED);
}
#[cfg(not(feature = "unchecked"))]
#[test]
fn double_free_across_threads() {
    expect_abort("cross_thread_double_free", "double free");
}

// ---- hardened: free-list links are checked before they are followed

#[cfg(feature = "hardened")]
#[test]
fn use_after_free_write_is_caught_when_hardened() {
    expect_abort_at_some_address(
        "use_after_free_write",
        "corrupted free list (use after free?)",
    );
    expect_abort_at_some_address(
        "use_after_free_garbage",
        "corrupted free list (use after free?)",
    );
    expect_abort_at_some_address(
        "use_after_free_garbage_calloc",
        "corrupted free list (use after free?)",
    );
    expect_abort_at_some_address(
        "use_after_free_zero",
        "corrupted free list (use after free?)",
    );
    expect_abort_at_some_address(
        "use_after_free_write_in_segment",
        "corrupted free list (use after free?)",
    );
    expect_abort_at_some_address(
        "use_after_free_write_remote",
        "corrupted free list (use after free?)",
    );
}
