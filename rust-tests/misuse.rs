//! Heap misuse is stopped with an `lgmalloc:` message and SIGABRT, never silently.
//! Each case runs in a child process (this test binary re-run with one case selected).

use lgmalloc::c_api::*;
use std::ffi::c_void;
use std::process::Command;

static STATIC_DATA: [u64; 8] = [0; 8];

/// Performs one misuse. Returns only if lgmalloc failed to stop it.
fn perform(case: &str) {
    unsafe {
        match case {
            "double_free_small" => {
                let p = lg_malloc(40);
                let q = lg_malloc(40); // another free in between must not hide it
                lg_free(p);
                lg_free(q);
                lg_free(p);
            }
            "double_free_large" => {
                let p = lg_malloc(1 << 20);
                lg_free(p);
                lg_free(p);
            }
            "free_stack" => {
                let mut local = [0u64; 4];
                std::hint::black_box(&mut local);
                lg_free(local.as_mut_ptr().cast());
            }
            "free_static" => lg_free(STATIC_DATA.as_ptr() as *mut c_void),
            "free_interior" => {
                let p = lg_malloc(96) as *mut u8;
                lg_free(p.add(48).cast());
            }
            "free_interior_unaligned" => {
                let p = lg_malloc(64) as *mut u8;
                lg_free(p.add(8).cast());
            }
            "free_interior_large" => {
                let p = lg_malloc(1 << 20) as *mut u8;
                lg_free(p.add(8192).cast());
            }
            "free_wild" => lg_free(0x1234_5678_9000usize as *mut c_void),
            "free_uncarved" => {
                // A block-aligned address in the part of a page not yet carved into
                // blocks (pages of 2 KiB blocks are carved two blocks at a time).
                let p = lg_malloc(2048) as *mut u8;
                lg_free(p.add(2048 * 3).cast());
            }
            "free_never_handed_out" => {
                // A carved block still waiting on the free list.
                let p = lg_malloc(16) as *mut u8;
                lg_free(p.add(16 * 40).cast());
            }
            "realloc_freed" => {
                let p = lg_malloc(200);
                let keep = lg_malloc(200);
                lg_free(p);
                let _ = lg_realloc(p, 400);
                lg_free(keep);
            }
            "realloc_freed_large" => {
                let p = lg_malloc(1 << 20);
                lg_free(p);
                let _ = lg_realloc(p, 2 << 20);
            }
            "cross_thread_double_free" => {
                let p = lg_malloc(48) as usize;
                std::thread::spawn(move || lg_free(p as *mut c_void))
                    .join()
                    .unwrap();
                lg_free(p as *mut c_void);
            }
            "use_after_free_write" => {
                let p = lg_malloc(64) as *mut usize;
                let q = lg_malloc(64);
                lg_free(q);
                lg_free(p.cast());
                // A dangling write steers the free list to an address of the attacker's
                // choosing (here: a stack slot).
                let mut target = [0usize; 8];
                *p = target.as_mut_ptr() as usize;
                let _ = lg_malloc(64);
                let _ = lg_malloc(64);
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

fn expect_abort(case: &str, message: &str) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_entry", "--test-threads=1", "--nocapture"])
        .env("LGMALLOC_MISUSE_CASE", case)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGABRT),
        "{case}: status {:?}, stderr: {stderr}",
        out.status
    );
    assert!(
        stderr.contains(message),
        "{case}: expected {message:?} in stderr: {stderr}"
    );
    assert!(stderr.contains(" at 0x"), "{case}: no address in: {stderr}");
}

#[test]
fn double_free_of_a_small_block() {
    expect_abort("double_free_small", "lgmalloc: double free");
}
#[test]
fn double_free_of_a_large_block() {
    expect_abort("double_free_large", "lgmalloc: free of");
}
#[test]
fn free_of_a_stack_address() {
    expect_abort(
        "free_stack",
        "lgmalloc: free of a pointer lgmalloc never returned",
    );
}
#[test]
fn free_of_static_data() {
    expect_abort(
        "free_static",
        "lgmalloc: free of a pointer lgmalloc never returned",
    );
}
#[test]
fn free_of_an_interior_pointer() {
    expect_abort(
        "free_interior",
        "lgmalloc: free of a pointer lgmalloc never returned",
    );
    expect_abort(
        "free_interior_unaligned",
        "lgmalloc: free of a pointer lgmalloc never returned",
    );
    expect_abort("free_interior_large", "lgmalloc: free of");
}
#[test]
fn free_of_a_wild_address() {
    expect_abort(
        "free_wild",
        "lgmalloc: free of a pointer lgmalloc never returned",
    );
    expect_abort(
        "free_uncarved",
        "lgmalloc: free of a pointer lgmalloc never returned",
    );
    expect_abort("free_never_handed_out", "lgmalloc: double free");
}
#[test]
fn realloc_of_a_freed_block() {
    expect_abort("realloc_freed", "lgmalloc: realloc of a freed pointer");
    expect_abort("realloc_freed_large", "lgmalloc: realloc of");
}
#[test]
fn double_free_across_threads() {
    expect_abort("cross_thread_double_free", "lgmalloc: double free");
}

#[cfg(feature = "hardened")]
#[test]
fn use_after_free_write_is_caught_when_hardened() {
    expect_abort("use_after_free_write", "lgmalloc: corrupted free list");
}
