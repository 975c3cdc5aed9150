//! Secure-execution mode: a setuid-root program linked with lgmalloc (statically, with
//! the override), run by an unprivileged user who sets every `LGMALLOC_*` variable to
//! something that would write files, print diagnostics and start an analysis child.
//! glibc ignores its `MALLOC_*` variables there; lgmalloc must ignore its own: no file
//! or directory created, no output, no process left behind.
//!
//! Needs root (to make the program setuid root and to run it as `nobody`), `libc.a`
//! (`libc6-dev`) and `setpriv` (util-linux); CI has all three. A missing one fails the
//! test: it is the only check of this path.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "common/override_build.rs"]
mod override_build;
use override_build::{STATIC_LINK_TAIL, build_override};

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Processes whose command name is `comm`.
fn processes_named(comm: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.bytes().all(|b| b.is_ascii_digit())
            && let Ok(c) = std::fs::read_to_string(entry.path().join("comm"))
            && c.trim() == comm
        {
            found.push(name);
        }
    }
    found
}

#[test]
fn a_setuid_program_ignores_the_callers_lgmalloc_variables() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test needs root: it makes a setuid-root program and runs it as nobody"
    );
    let libc_a = Path::new("/usr/lib/x86_64-linux-gnu/libc.a");
    assert!(
        libc_a.exists(),
        "{} is missing (apt-get install libc6-dev)",
        libc_a.display()
    );
    let work =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("secure-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o755)).unwrap();

    let release = build_override(manifest_dir(), Path::new(env!("CARGO_TARGET_TMPDIR")))
        .unwrap_or_else(|e| panic!("{e}"));
    // A short, distinctive name, so leftover processes can be found by command name.
    let exe = work.join("lgsecure");
    let o = Command::new("gcc")
        .args(["-O2", "-static"])
        .arg(manifest_dir().join("rust-tests/fixtures/secure/privileged.c"))
        .arg(release.join("liblgmalloc.a"))
        .args(STATIC_LINK_TAIL)
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("run gcc");
    assert!(
        o.status.success(),
        "static link failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o4755)).unwrap();

    // The directory a hostile caller points the cache at: world-writable, like /tmp.
    let shared = work.join("world-writable");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let cache = shared.join("cache");

    let run = |extra: &[(&str, &str)]| {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
            .arg(&exe)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", &shared)
            .env("LGMALLOC_CACHE_DIR", &cache)
            .env("LGMALLOC_VERBOSE", "1")
            .env("LGMALLOC_SHOW_STATS", "1")
            .env("LGMALLOC_VERIFY", "1")
            .env("LGMALLOC_ANALYSIS_BUDGET_MS", "0");
        for (k, v) in extra {
            cmd.env(k, v);
        }
        cmd.output().expect("run setpriv (util-linux)")
    };
    let out = run(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the setuid program failed: {stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "done\n");
    assert_eq!(stderr, "", "lgmalloc wrote diagnostics for the caller");
    // No analysis child: give one a moment to show up, then look.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        processes_named("lgsecure"),
        Vec::<String>::new(),
        "a process was left running"
    );
    assert!(
        !cache.exists(),
        "lgmalloc created the caller's cache directory"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&shared)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(leftovers.is_empty(), "files created: {leftovers:?}");

    // The same program without the setuid bit obeys the variables: the check above is
    // not passing for want of a working setup.
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = run(&[("LGMALLOC_ANALYSIS_BUDGET_MS", "1000")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("lgmalloc: stats:"),
        "no summary without secure mode: {stderr}"
    );
    assert!(cache.is_dir(), "no cache without secure mode");
    std::fs::remove_dir_all(&work).unwrap();
}
