//! The override build under real programs: `liblgmalloc.so` built with
//! `--features override` and preloaded (`LD_PRELOAD`) into python3, git, gcc, perl,
//! sort, C++ and C programs compiled from `rust-tests/fixtures/preload/`, plus a
//! `-static` executable linked with `liblgmalloc.a` and the `scripts/lgmalloc-run`
//! launcher.
//!
//! The library is built once per test run by a nested `cargo build --release --features
//! override --lib` into `<CARGO_TARGET_TMPDIR>/override-build` (a target directory of its
//! own: the outer `cargo test` holds the lock of the main one).
//!
//! Every program also preloads `probe.so` (fixtures/preload/probe.c), which appends
//! "lgprobe <comm> <pid> <allocations> <frees>" with lgmalloc's own counters to a file
//! when a process exits: proof that each process of the tree really allocated with
//! lgmalloc, even for programs that close stderr before exit.

use std::ffi::OsStr;
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

#[path = "common/override_build.rs"]
mod override_build;
use override_build::{STATIC_LINK_TAIL, build_override};

// ---- building ----------------------------------------------------------------------------

struct Build {
    so: PathBuf,
    archive: PathBuf,
    probe: PathBuf,
}

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> PathBuf {
    manifest_dir()
        .join("rust-tests/fixtures/preload")
        .join(name)
}

fn work_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("preload");
    fs::create_dir_all(&d).expect("create the test directory");
    d
}

/// A fresh, empty directory for one test.
fn scratch(name: &str) -> PathBuf {
    let d = work_dir().join("scratch").join(name);
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).expect("create a scratch directory");
    d
}

/// A fresh, empty `LGMALLOC_CACHE_DIR` for the programs of one run or test, never
/// `~/.cache/lgmalloc`. Dropping it waits (at most 90 s) until no process started with
/// it is left (the detached child that runs deferred analyses after a program exits),
/// then removes it.
struct FreshCache(PathBuf);

impl FreshCache {
    fn new(name: &str) -> FreshCache {
        static N: AtomicUsize = AtomicUsize::new(0);
        let d = work_dir().join("cache").join(format!(
            "{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).expect("create a cache directory");
        FreshCache(d)
    }

    /// Points `cmd`'s lgmalloc at this directory.
    fn set(&self, cmd: &mut Command) {
        cmd.env("LGMALLOC_CACHE_DIR", &self.0);
    }
}

impl std::ops::Deref for FreshCache {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for FreshCache {
    fn drop(&mut self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
        let mut left = processes_with_cache(&self.0);
        while !left.is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
            left = processes_with_cache(&self.0);
        }
        let _ = fs::remove_dir_all(&self.0);
        if !left.is_empty() && !std::thread::panicking() {
            panic!(
                "processes {left:?} started with LGMALLOC_CACHE_DIR={} still run after 90 s",
                self.0.display()
            );
        }
    }
}

/// Live processes (not zombies, not this one) whose environment sets
/// `LGMALLOC_CACHE_DIR` to `dir`: a program's forked children inherit it.
fn processes_with_cache(dir: &Path) -> Vec<u32> {
    let needle = format!("LGMALLOC_CACHE_DIR={}", dir.display());
    let Ok(procs) = fs::read_dir("/proc") else {
        panic!("/proc is not readable: cannot tell which test processes are left");
    };
    procs
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((e.file_name().to_str()?.parse::<u32>().ok()?, e.path())))
        .filter(|(pid, _)| *pid != std::process::id())
        .filter(|(_, path)| {
            fs::read(path.join("environ"))
                .is_ok_and(|env| env.split(|&b| b == 0).any(|v| v == needle.as_bytes()))
        })
        .map(|(pid, _)| pid)
        .collect()
}

/// The override build, made once per test run (a failure is reported by every test
/// without building again).
fn build() -> &'static Build {
    static BUILD: OnceLock<Result<Build, String>> = OnceLock::new();
    match BUILD.get_or_init(try_build) {
        Ok(b) => b,
        Err(e) => panic!("{e}"),
    }
}

fn try_build() -> Result<Build, String> {
    let release = build_override(manifest_dir(), Path::new(env!("CARGO_TARGET_TMPDIR")))?;
    let so = release.join("liblgmalloc.so");
    let archive = release.join("liblgmalloc.a");
    let probe = work_dir().join("probe.so");
    let o = Command::new("gcc")
        .args(["-O2", "-Wall", "-shared", "-fPIC"])
        .arg(fixture("probe.c"))
        .arg("-o")
        .arg(&probe)
        .output()
        .map_err(|e| format!("cannot run gcc: {e}"))?;
    if !o.status.success() {
        return Err(format!("probe.c: {}", String::from_utf8_lossy(&o.stderr)));
    }
    Ok(Build { so, archive, probe })
}

/// Runs a compiler; panics with its messages on failure.
fn compile(compiler: &str, args: &[&OsStr], out: &Path) {
    let o = Command::new(compiler)
        .args(["-O2", "-Wall", "-g"])
        .args(args)
        .arg("-o")
        .arg(out)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {compiler}: {e}"));
    assert!(
        o.status.success(),
        "{compiler} {args:?} failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Compiles fixture sources into an executable of the test directory.
fn fixture_exe(name: &str, sources: &[&str], extra: &[&str]) -> PathBuf {
    let exe = work_dir().join(name);
    let cxx = sources.iter().any(|s| s.ends_with(".cpp"));
    let mut args: Vec<std::ffi::OsString> = sources
        .iter()
        .map(|s| fixture(s).into_os_string())
        .collect();
    args.extend(extra.iter().map(|s| s.into()));
    if cxx {
        args.push("-std=c++17".into());
    }
    args.extend(["-pthread".into(), "-ldl".into()]);
    let refs: Vec<&OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    compile(if cxx { "g++" } else { "gcc" }, &refs, &exe);
    exe
}

// ---- running -----------------------------------------------------------------------------

/// One process's report from the probe.
#[derive(Debug)]
struct Probe {
    comm: String,
    allocations: u64,
}

struct Run {
    out: Output,
    probes: Vec<Probe>,
}

impl Run {
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.stdout).into_owned()
    }
    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }
    /// Panics unless the program exited 0.
    fn success(self, what: &str) -> Self {
        assert!(
            self.out.status.success(),
            "{what}: {}\nstdout:\n{}\nstderr:\n{}",
            self.out.status,
            self.stdout(),
            self.stderr()
        );
        self
    }
    /// Panics unless a process whose name starts with `comm` allocated with lgmalloc.
    fn ran_on_lgmalloc(&self, comm: &str) {
        assert!(
            self.probes
                .iter()
                .any(|p| p.comm.starts_with(comm) && p.allocations > 0),
            "no process named {comm}* reported lgmalloc allocations; probe lines: {:?}\nstderr:\n{}",
            self.probes,
            self.stderr()
        );
    }
}

fn clean_env(cmd: &mut Command) -> &mut Command {
    for var in [
        "LD_PRELOAD",
        "LGMALLOC_SHOW_STATS",
        "LGMALLOC_VERBOSE",
        "LGMALLOC_LIB",
        "LGPROBE_OUT",
        "LGMALLOC_CACHE_DIR",
        "LGMALLOC_PREDICT",
        "LGMALLOC_LEARN",
        "LGMALLOC_VERIFY",
        "LGMALLOC_ANALYSIS_BUDGET_MS",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// Runs `cmd` with lgmalloc and the probe preloaded.
fn run_lg(cmd: &mut Command) -> Run {
    run_lg_with(cmd, &[])
}

/// Runs `cmd` with lgmalloc and the probe preloaded, and `env` set.
fn run_lg_with(cmd: &mut Command, env: &[(&str, &str)]) -> Run {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let b = build();
    let probe_file = work_dir().join(format!(
        "probe-{}-{}.txt",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_file(&probe_file);
    let preload = format!("{}:{}", b.so.display(), b.probe.display());
    // A cache of its own unless the test gave one (a FreshCache it holds).
    let given_cache = cmd
        .get_envs()
        .find(|(k, _)| *k == "LGMALLOC_CACHE_DIR")
        .and_then(|(_, v)| v.map(|v| v.to_owned()));
    clean_env(cmd);
    let own_cache = match given_cache {
        Some(dir) => {
            cmd.env("LGMALLOC_CACHE_DIR", dir);
            None
        }
        None => {
            let c = FreshCache::new("run");
            c.set(cmd);
            Some(c)
        }
    };
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd
        .env("LD_PRELOAD", preload)
        .env("LGPROBE_OUT", &probe_file)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let probes = fs::read_to_string(&probe_file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            match f.as_slice() {
                ["lgprobe", comm, _pid, allocs, _frees] => Some(Probe {
                    comm: comm.to_string(),
                    allocations: allocs.parse().ok()?,
                }),
                _ => None,
            }
        })
        .collect();
    let _ = fs::remove_file(&probe_file);
    drop(own_cache);
    Run { out, probes }
}

/// Runs `cmd` with the system allocator (for reference output).
fn run_native(cmd: &mut Command) -> Output {
    let out = clean_env(cmd)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed natively: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The allocation counts of `lgmalloc: stats: N allocations, ...` lines.
fn stats_allocations(stderr: &str) -> Vec<u64> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("lgmalloc: stats: "))
        .filter_map(|l| l.split_once(" allocations, "))
        .filter_map(|(n, _)| n.parse().ok())
        .collect()
}

/// A program of the system (the distribution's, not a version manager's shim): panics
/// with an installation hint when it is missing.
fn system_program(name: &str) -> String {
    let usr = format!("/usr/bin/{name}");
    if Path::new(&usr).exists() {
        return usr;
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    assert!(on_path, "{name} is not installed (apt-get install {name})");
    name.to_string()
}

// ---- exported symbols ----------------------------------------------------------------------

const FAMILY: &[&str] = &[
    "malloc",
    "free",
    "calloc",
    "realloc",
    "reallocarray",
    "posix_memalign",
    "aligned_alloc",
    "memalign",
    "valloc",
    "pvalloc",
    "malloc_usable_size",
    "cfree",
    "free_sized",
    "free_aligned_sized",
    "__libc_malloc",
    "__libc_calloc",
    "__libc_realloc",
    "__libc_free",
    "__libc_memalign",
    "__libc_valloc",
    "__libc_pvalloc",
    "__posix_memalign",
    "malloc_trim",
    "mallopt",
    "mallinfo",
    "mallinfo2",
    "malloc_stats",
    "malloc_info",
    "_Znwm",
    "_Znam",
    "_ZnwmRKSt9nothrow_t",
    "_ZnamRKSt9nothrow_t",
    "_ZnwmSt11align_val_t",
    "_ZnamSt11align_val_t",
    "_ZnwmSt11align_val_tRKSt9nothrow_t",
    "_ZnamSt11align_val_tRKSt9nothrow_t",
    "_ZdlPv",
    "_ZdaPv",
    "_ZdlPvm",
    "_ZdaPvm",
    "_ZdlPvSt11align_val_t",
    "_ZdaPvSt11align_val_t",
    "_ZdlPvmSt11align_val_t",
    "_ZdaPvmSt11align_val_t",
    "_ZdlPvRKSt9nothrow_t",
    "_ZdaPvRKSt9nothrow_t",
    "_ZdlPvSt11align_val_tRKSt9nothrow_t",
    "_ZdaPvSt11align_val_tRKSt9nothrow_t",
];

/// Names of the defined dynamic symbols of a shared library.
fn dynamic_symbols(so: &Path) -> Vec<String> {
    let o = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(so)
        .output()
        .expect("run nm");
    assert!(
        o.status.success(),
        "nm -D {}: {}",
        so.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .map(|s| s.split('@').next().unwrap_or(s).to_string())
        .collect()
}

#[test]
fn override_library_exports_the_whole_family() {
    let syms = dynamic_symbols(&build().so);
    let missing: Vec<_> = FAMILY
        .iter()
        .filter(|n| !syms.iter().any(|s| s == *n))
        .collect();
    assert!(
        missing.is_empty(),
        "not exported by the override build: {missing:?}"
    );
}

#[test]
fn library_without_the_feature_exports_none_of_the_family() {
    // The cdylib cargo built for this test run, in the `deps/` directory of the test
    // executable (with the features of this run).
    let exe = std::env::current_exe().expect("test executable path");
    let so = exe.parent().map(|d| d.join("liblgmalloc.so"));
    let Some(so) = so.filter(|p| p.is_file()) else {
        panic!(
            "the cdylib of this build was not found next to {}",
            exe.display()
        );
    };
    let syms = dynamic_symbols(&so);
    assert!(
        syms.iter().any(|s| s == "lg_malloc"),
        "{} is not lgmalloc",
        so.display()
    );
    let exported: Vec<_> = FAMILY
        .iter()
        .filter(|n| syms.iter().any(|s| s == *n))
        .collect();
    if cfg!(feature = "override") {
        assert_eq!(
            exported.len(),
            FAMILY.len(),
            "{} (built with override)",
            so.display()
        );
    } else {
        assert!(
            exported.is_empty(),
            "exported without the override feature: {exported:?}"
        );
    }
}

// ---- C API semantics ---------------------------------------------------------------------

#[test]
fn c_family_semantics_under_preload() {
    let exe = fixture_exe(
        "semantics",
        &["semantics.c"],
        &["-Wno-deprecated-declarations"],
    );
    let r = run_lg(&mut Command::new(&exe)).success("semantics");
    assert_eq!(r.stdout(), "semantics ok\n");
    assert!(
        stats_allocations(&r.stderr()).iter().any(|&n| n > 0),
        "malloc_stats printed no summary:\n{}",
        r.stderr()
    );
    r.ran_on_lgmalloc("semantics");
}

#[test]
fn static_executable_links_with_the_archive() {
    let libc_a = Path::new("/usr/lib/x86_64-linux-gnu/libc.a");
    assert!(
        libc_a.exists(),
        "{} is missing: the -static test needs glibc's static library \
         (apt-get install libc6-dev)",
        libc_a.display()
    );
    let b = build();
    let exe = work_dir().join("semantics-static");
    let o = Command::new("gcc")
        .args([
            "-O2",
            "-static",
            "-DSTATIC_LINK",
            "-Wno-deprecated-declarations",
        ])
        .arg(fixture("semantics.c"))
        .arg(&b.archive)
        .args(STATIC_LINK_TAIL)
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("run gcc");
    let link_msgs = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "static link failed:\n{link_msgs}");
    assert!(!link_msgs.contains("multiple definition"), "{link_msgs}");
    // glibc's allocator must not have been linked in.
    let nm = Command::new("nm").arg(&exe).output().expect("run nm");
    let syms = String::from_utf8_lossy(&nm.stdout);
    for glibc_internal in [
        "_int_malloc",
        "__malloc_arena_thread_freeres",
        "__libc_mallinfo",
    ] {
        assert!(
            !syms
                .lines()
                .any(|l| l.ends_with(&format!(" {glibc_internal}"))),
            "glibc's malloc.o was linked ({glibc_internal})"
        );
    }
    let cache = FreshCache::new("static");
    let mut cmd = Command::new(&exe);
    cache.set(clean_env(&mut cmd));
    let out = cmd.output().expect("run the static executable");
    drop(cache);
    assert!(
        out.status.success(),
        "static executable: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "semantics ok\n");
    assert!(
        stats_allocations(&String::from_utf8_lossy(&out.stderr))
            .iter()
            .any(|&n| n > 0)
    );
}

// ---- real programs -----------------------------------------------------------------------

const PYTHON_SCRIPT: &str = r#"
import collections, json, threading
results = {}
lock = threading.Lock()
def work(i):
    d = {}
    for j in range(20000):
        d[(i, j)] = str(j) * (j % 7)
    values = sorted(d.values(), key=lambda s: (len(s), s))
    total = sum(len(v) for v in values)
    counts = collections.Counter(v[:2] for v in values)
    nested = [[k, list(range(k % 13))] for k in range(3000)]
    with lock:
        results[i] = [total, counts.most_common(1)[0][1], len(json.dumps(nested))]
threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(sorted(results.items())))
"#;

#[test]
fn python3_with_threads() {
    let python = system_program("python3");
    let expected = run_native(Command::new(&python).args(["-c", PYTHON_SCRIPT]));
    let r = run_lg(Command::new(&python).args(["-c", PYTHON_SCRIPT])).success("python3");
    assert_eq!(r.out.stdout, expected.stdout);
    assert!(r.stdout().starts_with("[[0, ["), "{}", r.stdout());
    r.ran_on_lgmalloc("python");
}

const PERL_SCRIPT: &str = r#"
use strict; use warnings;
my %h;
for my $i (1 .. 200000) { $h{"key" . ($i * 7919 % 100003)} .= chr(65 + $i % 26); }
my $total = 0;
$total += length($h{$_}) for keys %h;
my @top = (sort { length($h{$b}) <=> length($h{$a}) || $a cmp $b } keys %h)[0 .. 4];
my $s = "";
$s .= sprintf("%05d,", $_) for 1 .. 50000;
my @parts = split /,/, $s;
my %inv = reverse %h;
my @words = map { join("", reverse split //, $_) } @parts[0 .. 999];
print "keys ", scalar(keys %h), " total $total parts ", scalar(@parts),
      " inv ", scalar(keys %inv), " top @top last $words[-1]\n";
"#;

#[test]
fn perl_hashes_and_strings() {
    let perl = system_program("perl");
    let expected = run_native(Command::new(&perl).args(["-e", PERL_SCRIPT]));
    let r = run_lg(Command::new(&perl).args(["-e", PERL_SCRIPT])).success("perl");
    assert_eq!(r.out.stdout, expected.stdout);
    assert!(r.stdout().starts_with("keys "), "{}", r.stdout());
    r.ran_on_lgmalloc("perl");
}

#[test]
fn git_init_add_commit_log() {
    let dir = scratch("git");
    let repo = dir.join("repo");
    let git = |args: &[&str]| {
        let mut c = Command::new(system_program("git"));
        c.args([
            "-c",
            "user.name=lgmalloc test",
            "-c",
            "user.email=test@lgmalloc.invalid",
        ])
        .args([
            "-c",
            "init.defaultBranch=main",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .current_dir(&dir)
        .env("HOME", &dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("LC_ALL", "C");
        let r = run_lg(&mut c).success(&format!("git {args:?}"));
        r.ran_on_lgmalloc("git");
        r
    };
    git(&["init", "-q", "repo"]);
    for i in 0..20 {
        let body: String = (0..200)
            .map(|j| format!("line {j} of file {i}\n"))
            .collect();
        fs::write(repo.join(format!("file{i}.txt")), body).expect("write a file");
    }
    git(&["-C", "repo", "add", "."]);
    git(&["-C", "repo", "commit", "-q", "-m", "first commit"]);
    fs::write(repo.join("file3.txt"), "changed\n").expect("write a file");
    git(&["-C", "repo", "commit", "-q", "-a", "-m", "second commit"]);
    let log = git(&["-C", "repo", "log", "--format=%s"]);
    assert_eq!(log.stdout(), "second commit\nfirst commit\n");
    let stat = git(&["-C", "repo", "log", "--stat", "--format=%an"]);
    assert!(
        stat.stdout()
            .contains("20 files changed, 4000 insertions(+)"),
        "{}",
        stat.stdout()
    );
    let status = git(&["-C", "repo", "status", "--porcelain"]);
    assert_eq!(status.stdout(), "");
}

const C_PROGRAM: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
int main(void) {
    int n = 1000000;
    char *sieve = malloc(n);
    memset(sieve, 1, n);
    long count = 0, sum = 0;
    for (long i = 2; i < n; i++) {
        if (!sieve[i]) continue;
        count++;
        sum += i;
        for (long j = i * i; j < n; j += i) sieve[j] = 0;
    }
    free(sieve);
    printf("primes %ld sum %ld\n", count, sum);
    return 0;
}
"#;

#[test]
fn gcc_compiles_a_program_that_runs() {
    let dir = scratch("gcc");
    fs::write(dir.join("primes.c"), C_PROGRAM).expect("write the source");
    let r = run_lg(
        Command::new("gcc")
            .args(["-O2", "-Wall", "primes.c", "-o", "primes"])
            .current_dir(&dir),
    )
    .success("gcc");
    r.ran_on_lgmalloc("gcc");
    r.ran_on_lgmalloc("cc1");
    let run = run_lg(&mut Command::new(dir.join("primes"))).success("the compiled program");
    assert_eq!(run.stdout(), "primes 78498 sum 37550402023\n");
    run.ran_on_lgmalloc("primes");
}

#[test]
fn sort_of_a_large_input() {
    let dir = scratch("sort");
    let mut x: u64 = 0x2545f4914f6cdd1d;
    let mut lines: Vec<String> = (0..200_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = 8 + (x % 17) as usize;
            (0..len)
                .map(|i| (b'0' + ((x >> (i * 2)) % 75) as u8) as char)
                .collect()
        })
        .collect();
    let input = dir.join("input.txt");
    fs::write(&input, lines.join("\n") + "\n").expect("write the input");
    lines.sort();
    let expected = lines.join("\n") + "\n";
    let r = run_lg(
        Command::new(system_program("sort"))
            .args(["--parallel=2", "-S", "64M"])
            .arg(&input)
            .env("LC_ALL", "C")
            .current_dir(&dir),
    )
    .success("sort");
    assert!(
        r.out.stdout == expected.as_bytes(),
        "sort output differs from the expected order"
    );
    r.ran_on_lgmalloc("sort");
}

/// What lgmalloc writes at exit reaches the stderr a program had at start-up, even when
/// the program closes it before its exit handlers run, as sort (coreutils) does: verify
/// mode's summary and the statistics alike.
#[test]
fn exit_summaries_reach_the_stderr_a_program_closed() {
    let dir = scratch("sort-summaries");
    let input = dir.join("input.txt");
    let text: String = (0..5000)
        .map(|i| format!("{}\n", (i * 7919) % 5000))
        .collect();
    fs::write(&input, text).expect("write the input");
    for (var, line) in [
        ("LGMALLOC_VERIFY", "lgmalloc: verify calls="),
        ("LGMALLOC_SHOW_STATS", "lgmalloc: stats: "),
    ] {
        let r = run_lg_with(
            Command::new(system_program("sort"))
                .arg(&input)
                .env("LC_ALL", "C")
                .current_dir(&dir),
            &[(var, "1")],
        )
        .success("sort");
        assert!(r.stdout().starts_with("0\n1\n10\n100\n"), "{}", r.stdout());
        assert!(
            r.stderr().lines().any(|l| l.starts_with(line)),
            "{var}=1: no {line:?} line\n{}",
            r.stderr()
        );
        r.ran_on_lgmalloc("sort");
    }
}

#[test]
fn cxx_stl_with_eight_threads() {
    let exe = fixture_exe("stl_threads", &["stl_threads.cpp"], &[]);
    let expected = run_native(&mut Command::new(&exe));
    let r = run_lg(&mut Command::new(&exe)).success("stl_threads");
    assert_eq!(r.stdout(), String::from_utf8_lossy(&expected.stdout));
    assert!(r.stdout().starts_with("stl total "), "{}", r.stdout());
    r.ran_on_lgmalloc("stl_threads");
}

#[test]
fn cxx_operator_new_delete_and_new_handler() {
    let exe = fixture_exe("cxx_new", &["cxx_new.cpp"], &[]);
    let r = run_lg(&mut Command::new(&exe)).success("cxx_new");
    assert_eq!(r.stdout(), "cxx_new ok\n");
    r.ran_on_lgmalloc("cxx_new");
}

// ---- process and thread life cycle -------------------------------------------------------

#[test]
fn fork_while_other_threads_allocate() {
    let exe = fixture_exe("fork_threads", &["fork_threads.c"], &[]);
    let r = run_lg(&mut Command::new(&exe)).success("fork_threads");
    assert_eq!(r.stdout(), "fork ok\n");
    r.ran_on_lgmalloc("fork_threads");
    // The children exit with exit(): each reports too.
    let children = r
        .probes
        .iter()
        .filter(|p| p.comm.starts_with("fork_threads"))
        .count();
    assert!(children > 50, "{} processes reported", children);
}

#[test]
fn dlopen_dlclose_of_an_allocating_library() {
    let lib = work_dir().join("libdl_lib.so");
    compile(
        "gcc",
        &[
            fixture("dl_lib.c").as_os_str(),
            "-shared".as_ref(),
            "-fPIC".as_ref(),
        ],
        &lib,
    );
    let exe = fixture_exe("dl_main", &["dl_main.c"], &[]);
    let r = run_lg(Command::new(&exe).arg(&lib)).success("dl_main");
    assert_eq!(r.stdout(), "dlopen ok\n");
    r.ran_on_lgmalloc("dl_main");
}

#[test]
fn thread_exit_with_allocating_destructors() {
    let exe = fixture_exe("thread_exit", &["thread_exit.cpp"], &[]);
    let r = run_lg(&mut Command::new(&exe)).success("thread_exit");
    assert_eq!(r.stdout(), "thread_exit ok 128\n");
    r.ran_on_lgmalloc("thread_exit");
}

#[test]
fn sixty_four_pthread_keys_with_allocating_destructors() {
    let exe = fixture_exe("tsd_keys", &["tsd_keys.c"], &[]);
    let r = run_lg(&mut Command::new(&exe)).success("tsd_keys");
    assert_eq!(r.stdout(), "tsd ok 2304\n");
    r.ran_on_lgmalloc("tsd_keys");
}

#[test]
fn blocks_freed_after_their_thread_exited() {
    let exe = fixture_exe("remote_free", &["remote_free.c"], &[]);
    let r = run_lg(&mut Command::new(&exe)).success("remote_free");
    assert_eq!(r.stdout(), "remote ok\n");
    r.ran_on_lgmalloc("remote_free");
}

// ---- misuse ------------------------------------------------------------------------------

/// Runs the misuse fixture's `case`: it must abort with exactly the line
/// `lgmalloc: <what> at <address>` (for one of `whats`), at the address the fixture
/// announced.
fn assert_misuse_aborts(case: &str, whats: &[&str]) {
    // Built once: tests running at once must not rewrite the file another one runs
    // (an exec of it then fails with "Text file busy").
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    let exe =
        EXE.get_or_init(|| fixture_exe("misuse", &["misuse.c"], &["-Wno-free-nonheap-object"]));
    let r = run_lg(Command::new(exe).arg(case));
    let stderr = r.stderr();
    assert_eq!(
        r.out.status.signal(),
        Some(libc::SIGABRT),
        "misuse {case}: {}\nstdout: {}\nstderr: {stderr}",
        r.out.status,
        r.stdout(),
    );
    let addr = stderr
        .lines()
        .find_map(|l| l.strip_prefix("misuse-test: address "))
        .unwrap_or_else(|| panic!("misuse {case}: no address announced:\n{stderr}"));
    let want: Vec<String> = whats
        .iter()
        .map(|w| format!("lgmalloc: {w} at {addr}"))
        .collect();
    assert!(
        stderr.lines().any(|l| want.iter().any(|w| l == w)),
        "misuse {case}: expected one of the lines {want:?}:\n{stderr}"
    );
}

const NEVER_RETURNED: &str = "free of a pointer lgmalloc never returned";

#[test]
fn double_free_of_a_small_block_aborts() {
    assert_misuse_aborts("double", &["double free"]);
}

#[test]
fn double_free_of_a_large_block_aborts() {
    // The freed mapping is unmapped or cached: no lgmalloc memory, or no live block.
    assert_misuse_aborts(
        "double-large",
        &[
            NEVER_RETURNED,
            "free of an invalid or already freed pointer",
        ],
    );
}

#[test]
fn free_of_a_stack_pointer_aborts() {
    assert_misuse_aborts("stack", &[NEVER_RETURNED]);
}

#[test]
fn realloc_of_a_foreign_pointer_aborts() {
    let what = "realloc of a pointer lgmalloc never returned";
    assert_misuse_aborts("realloc-stack", &[what]);
    assert_misuse_aborts("realloc-static", &[what]);
    assert_misuse_aborts("realloc-interior", &[what]);
}

// ---- the launcher ------------------------------------------------------------------------

fn launcher() -> PathBuf {
    manifest_dir().join("scripts/lgmalloc-run")
}

#[test]
fn launcher_with_lib_and_stats() {
    let b = build();
    let cache = FreshCache::new("launcher-stats");
    let mut cmd = Command::new(launcher());
    cache.set(clean_env(&mut cmd));
    let out = cmd
        .args(["--stats", "--lib"])
        .arg(&b.so)
        .args([system_program("python3").as_str(), "-c", "print(6 * 7)"])
        .output()
        .expect("run lgmalloc-run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}: {stderr}", out.status);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "42\n");
    assert!(
        stats_allocations(&stderr).iter().any(|&n| n > 0),
        "no statistics:\n{stderr}"
    );
}

/// `--stats` prints the summary of the command's own process only; `--stats-all` one
/// per process (the programs it starts included).
#[test]
fn launcher_stats_of_the_command_only_or_all() {
    let b = build();
    let cache = FreshCache::new("launcher-stats-own");
    // A program that starts two more (dash, which exits with `_exit`, prints nothing).
    let python = system_program("python3");
    let script = format!(
        "import subprocess as s; s.run(['{python}', '-c', 'pass']); s.run(['{python}', '-c', 'pass'])"
    );
    let summaries = |flag: &str| {
        let mut cmd = Command::new(launcher());
        cache.set(clean_env(&mut cmd));
        let out = cmd
            .args([flag, "--lib"])
            .arg(&b.so)
            .args([python.as_str(), "-c", script.as_str()])
            .output()
            .expect("run lgmalloc-run");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{}: {stderr}", out.status);
        stats_allocations(&stderr).len()
    };
    assert_eq!(summaries("--stats"), 1, "one summary, the command's own");
    assert_eq!(summaries("--stats-all"), 3, "one per process");
}

#[test]
fn launcher_finds_the_installed_library_and_keeps_ld_preload() {
    let b = build();
    let prefix = scratch("launcher-install");
    fs::create_dir_all(prefix.join("bin")).expect("mkdir");
    fs::create_dir_all(prefix.join("lib")).expect("mkdir");
    let script = prefix.join("bin/lgmalloc-run");
    fs::copy(launcher(), &script).expect("copy the launcher");
    fs::copy(&b.so, prefix.join("lib/liblgmalloc.so")).expect("copy the library");
    let probe_file = prefix.join("probe.txt");
    // Installed layout, no --lib, an existing LD_PRELOAD (the probe) kept after lgmalloc.
    let cache = FreshCache::new("launcher-install");
    let mut cmd = Command::new(&script);
    cache.set(clean_env(&mut cmd));
    let out = cmd
        .arg("printenv")
        .arg("LD_PRELOAD")
        .env("LD_PRELOAD", &b.probe)
        .env("LGPROBE_OUT", &probe_file)
        .output()
        .expect("run the installed launcher");
    assert!(
        out.status.success(),
        "{}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let lib = fs::canonicalize(prefix.join("lib/liblgmalloc.so")).expect("canonical path");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim_end(),
        format!("{}:{}", lib.display(), b.probe.display())
    );
    let probes = fs::read_to_string(&probe_file).unwrap_or_default();
    assert!(probes.starts_with("lgprobe printenv "), "probe: {probes:?}");

    // LGMALLOC_LIB, and --verbose sets LGMALLOC_VERBOSE.
    let mut cmd = Command::new(launcher());
    cache.set(clean_env(&mut cmd));
    let out = cmd
        .args(["--verbose", "printenv", "LGMALLOC_VERBOSE", "LD_PRELOAD"])
        .env("LGMALLOC_LIB", &b.so)
        .output()
        .expect("run the launcher");
    assert!(
        out.status.success(),
        "{}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("1\n{}\n", b.so.display())
    );
}

#[test]
fn launcher_refuses_missing_or_non_override_libraries() {
    let help = Command::new(launcher())
        .arg("--help")
        .output()
        .expect("run lgmalloc-run --help");
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("Usage: lgmalloc-run"));

    let missing = clean_env(&mut Command::new(launcher()))
        .args(["--lib", "/nonexistent/liblgmalloc.so", "true"])
        .output()
        .expect("run lgmalloc-run");
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("library not found"));

    // A shared library that does not export malloc (libm) stands for a build without
    // the override feature.
    let libm = [
        "/lib/x86_64-linux-gnu/libm.so.6",
        "/usr/lib/x86_64-linux-gnu/libm.so.6",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .expect("libm.so.6");
    let plain = clean_env(&mut Command::new(launcher()))
        .args(["--lib", libm, "true"])
        .output()
        .expect("run lgmalloc-run");
    assert!(!plain.status.success());
    assert!(
        String::from_utf8_lossy(&plain.stderr).contains("does not export malloc"),
        "{}",
        String::from_utf8_lossy(&plain.stderr)
    );

    let nothing = Command::new(launcher()).output().expect("run lgmalloc-run");
    assert!(!nothing.status.success());
}

// ---- the predictive runtime --------------------------------------------------------------

/// `predict_main` linked with `libpredict_lib.so` (found through its rpath).
fn predict_exe() -> PathBuf {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| {
        let dir = work_dir().join("predict");
        fs::create_dir_all(&dir).expect("create the predict directory");
        let lib = dir.join("libpredict_lib.so");
        compile(
            "gcc",
            &[
                fixture("predict_lib.c").as_os_str(),
                "-shared".as_ref(),
                "-fPIC".as_ref(),
                "-pthread".as_ref(),
            ],
            &lib,
        );
        let exe = dir.join("predict_main");
        let rpath = format!("-Wl,-rpath,{}", dir.display());
        compile(
            "gcc",
            &[
                fixture("predict_main.c").as_os_str(),
                "-L".as_ref(),
                dir.as_os_str(),
                "-lpredict_lib".as_ref(),
                rpath.as_ref(),
            ],
            &exe,
        );
        exe
    })
    .clone()
}

/// Runs `predict_main ROUNDS` with lgmalloc, the cache in `cache` and `env`.
fn run_predict(cache: &Path, rounds: u32, env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(predict_exe());
    cmd.arg(rounds.to_string())
        .env("LGMALLOC_CACHE_DIR", cache)
        .env_remove("LGMALLOC_PREDICT")
        .env_remove("LGMALLOC_VERIFY")
        .env_remove("LGMALLOC_LEARN")
        .env_remove("LGMALLOC_ANALYSIS_BUDGET_MS");
    // A generous start-up budget unless the test sets one: on a loaded machine (CI runs
    // the debug build next to other jobs) the default can defer the library's analysis to
    // a child after exit, and a test that counts the entries right after the run would
    // see only the program's.
    let mut env = env.to_vec();
    if !env.iter().any(|(k, _)| *k == "LGMALLOC_ANALYSIS_BUDGET_MS") {
        env.push(("LGMALLOC_ANALYSIS_BUDGET_MS", "10000"));
    }
    let r = run_lg_with(&mut cmd, &env).success("predict_main");
    r.ran_on_lgmalloc("predict_main");
    r
}

/// Files of the cache directory, by name.
fn cache_files(cache: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(cache)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Files in the cache directory other than the sampled profile and the directory lock
/// taken to store it: every run with learning on may store a profile whatever the
/// prediction mode (the sampler is always on, and whether a short run drew a sample is
/// chance).
fn cache_files_but_profile(cache: &Path) -> Vec<String> {
    cache_files(cache)
        .into_iter()
        .filter(|n| !n.ends_with(".profile") && n != "lgmalloc.lock")
        .collect()
}

/// Analysis entries (no extension) in the cache directory.
fn analysis_entries(cache: &Path) -> usize {
    cache_files(cache)
        .iter()
        .filter(|n| !n.contains('.'))
        .count()
}

#[test]
fn verify_matches_the_sites_of_the_program_and_its_library() {
    let cache = FreshCache::new("predict-verify");
    let r = run_predict(
        &cache,
        20_000,
        &[("LGMALLOC_VERIFY", "1"), ("LGMALLOC_VERBOSE", "1")],
    );
    let err = r.stderr();
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("lgmalloc: verify calls="))
        .collect();
    assert_eq!(lines.len(), 1, "one verify line expected:\n{err}");
    let field = |name: &str| -> u64 {
        lines[0]
            .split(' ')
            .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {}", lines[0]))
    };
    let (calls, predicted, exact) = (field("calls"), field("predicted"), field("exact"));
    assert!(calls >= 60_000, "{}", lines[0]);
    assert!(
        predicted * 100 >= calls * 95,
        "under 95% predicted: {}",
        lines[0]
    );
    assert_eq!(exact, predicted, "{}", lines[0]);
    // The library's site (200 bytes) is among those matched: shared objects are analysed.
    assert!(
        err.lines().any(|l| l.starts_with("lgmalloc: verify site")
            && l.contains(" size=200 ")
            && l.contains(" calls=20000 exact=20000")),
        "the library's 200-byte site was not matched:\n{err}"
    );
}

/// Runs `wrapped` (allocations through a wrapper of its own, see the fixture) with its
/// own cache, the analysis within the start-up budget.
fn run_wrapped(cache: &Path, count: &str, env: &[(&str, &str)]) -> Run {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    let exe = EXE.get_or_init(|| fixture_exe("wrapped", &["wrapped.c"], &["-O2"]));
    let mut cmd = Command::new(exe);
    cmd.arg(count)
        .env("LGMALLOC_CACHE_DIR", cache)
        .env_remove("LGMALLOC_PREDICT")
        .env_remove("LGMALLOC_LEARN");
    let mut env = env.to_vec();
    env.push(("LGMALLOC_ANALYSIS_BUDGET_MS", "10000"));
    let r = run_lg_with(&mut cmd, &env).success("wrapped");
    r.ran_on_lgmalloc("wrapped");
    r
}

/// A program allocating through a wrapper (`xmalloc`) has its call sites where it calls
/// the wrapper, each with one size. Verify mode looks past the wrapper's frame to match
/// them (the analysis predicts 520 and 1040 there), and the sampled profile records
/// them, not the wrapper's one call of malloc with sizes from 520 to 1040.
#[test]
fn sites_that_call_a_wrapper_are_the_call_sites() {
    let cache = FreshCache::new("wrapped");
    let r = run_wrapped(&cache, "20000", &[("LGMALLOC_VERIFY", "1")]);
    let err = r.stderr();
    let line = err
        .lines()
        .find(|l| l.starts_with("lgmalloc: verify calls="))
        .unwrap_or_else(|| panic!("no verify line:\n{err}"));
    let field = |name: &str| -> u64 {
        line.split(' ')
            .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {line}"))
    };
    assert!(field("calls") >= 30_000, "{line}");
    assert!(
        field("predicted") >= 30_000,
        "the wrapper's callers unmatched: {line}"
    );
    assert_eq!(field("exact"), field("predicted"), "{line}");
    // Two more runs of about 21 MB (some 80 samples each): each size's site well sampled.
    for _ in 0..2 {
        run_wrapped(&cache, "20000", &[]);
    }
    let (profile, sizes) = profile_site_sizes(&cache);
    assert!(sizes.contains(&(520, 520)), "{profile}");
    assert!(sizes.contains(&(1040, 1040)), "{profile}");
    assert!(!sizes.contains(&(520, 1040)), "{profile}");
}

/// The stored profile in `cache`, and the (smallest, largest) size of each of its sites.
fn profile_site_sizes(cache: &Path) -> (String, Vec<(u64, u64)>) {
    let profile = cache_files(cache)
        .into_iter()
        .find(|n| n.ends_with(".profile"))
        .and_then(|n| fs::read_to_string(cache.join(n)).ok())
        .expect("a stored profile");
    // `site MODULE OFFSET SAMPLES FOLLOWED BYTES SIZE_MIN SIZE_MAX ...`
    let sizes = profile
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.first() == Some(&"site")).then(|| (f[6].parse().unwrap(), f[7].parse().unwrap()))
        })
        .collect();
    (profile, sizes)
}

/// A run that does not know the wrapper (prediction off: no analysis) records its
/// samples at the wrapper's own call of malloc, sizes 520 to 1040; the first run that
/// knows it forgets that site when it stores the profile.
#[test]
fn a_site_at_a_wrapper_is_forgotten_once_the_wrapper_is_known() {
    let cache = FreshCache::new("wrapped-stale");
    run_wrapped(&cache, "20000", &[("LGMALLOC_PREDICT", "0")]);
    let (profile, sizes) = profile_site_sizes(&cache);
    assert!(sizes.contains(&(520, 1040)), "{profile}");
    run_wrapped(&cache, "20000", &[]);
    let (profile, sizes) = profile_site_sizes(&cache);
    assert!(!sizes.contains(&(520, 1040)), "{profile}");
    assert!(sizes.contains(&(520, 520)), "{profile}");
}

/// A process in which another thread already runs when lgmalloc's start-up comes to the
/// plan (here a library's constructor started one that allocates 4112-byte blocks)
/// keeps the standard classes: a plan would rewrite the class table under that thread.
#[test]
fn no_plan_goes_in_force_once_other_threads_run() {
    let cache = FreshCache::new("predict-threads");
    let threaded = run_predict(
        &cache,
        10,
        &[("PREDICT_LIB_THREAD", "1"), ("LGMALLOC_VERBOSE", "1")],
    );
    let err = threaded.stderr();
    assert_eq!(threaded.stdout(), "usable 4608\n", "{err}");
    assert!(
        err.contains("lgmalloc: plan: not put in force: other threads ran"),
        "{err}"
    );
    // The same program without that thread is planned: 4112 bytes get their exact fit.
    let single = run_predict(&cache, 10, &[]);
    assert_eq!(single.stdout(), "usable 4112\n", "{}", single.stderr());
}

#[test]
fn a_predicted_size_gets_an_exact_fit_class_and_predict_0_turns_it_off() {
    let cache = FreshCache::new("predict-exact");
    let on = run_predict(&cache, 10, &[]);
    assert_eq!(on.stdout(), "usable 4112\n", "{}", on.stderr());
    // Analysed: the program and its library; not the C runtime, not the preloaded probe.
    assert_eq!(analysis_entries(&cache), 2, "{:?}", cache_files(&cache));
    // What the run observed is stored for the next (which drops the stored plan).
    let names = cache_files(&cache);
    assert!(names.iter().any(|n| n.ends_with(".learned")), "{names:?}");

    let off_cache = FreshCache::new("predict-off");
    let off = run_predict(&off_cache, 10, &[("LGMALLOC_PREDICT", "0")]);
    assert_eq!(off.stdout(), "usable 4608\n", "{}", off.stderr());
    assert!(
        cache_files_but_profile(&off_cache).is_empty(),
        "PREDICT=0 analysed anyway"
    );
}

#[test]
fn the_second_run_plans_from_the_cache_and_what_the_first_observed() {
    let cache = FreshCache::new("predict-learn");
    let verbose = [("LGMALLOC_VERBOSE", "1")];
    let first = run_predict(&cache, 1000, &verbose);
    assert!(
        first.stderr().contains("lgmalloc: plan: ") && !first.stderr().contains("(cached)"),
        "{}",
        first.stderr()
    );
    let second = run_predict(&cache, 1000, &verbose);
    let err = second.stderr();
    assert!(err.contains("(cached)"), "{err}");
    // Observed and predicted by the analysis: the confidence comes from both.
    assert!(
        err.lines().any(|l| l.contains("size   4112")
            && l.contains("from Both")
            && l.contains("exact-fit")),
        "{err}"
    );
    assert_eq!(second.stdout(), "usable 4112\n");
}

#[test]
fn an_analysis_over_the_start_up_budget_runs_at_exit_instead() {
    let cache = FreshCache::new("predict-budget");
    let env = [
        ("LGMALLOC_VERBOSE", "1"),
        ("LGMALLOC_ANALYSIS_BUDGET_MS", "0"),
    ];
    // No time for a cold analysis before main: the plain allocator serves this run, and
    // the analyses run when it exits, in a child process.
    let first = run_predict(&cache, 10, &env);
    let err = first.stderr();
    assert!(err.contains("deferred: over the start-up budget"), "{err}");
    assert!(!err.contains("lgmalloc: plan: "), "{err}");
    assert_eq!(first.stdout(), "usable 4608\n", "{err}");
    // The analyses run in a detached child after the program exited.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while analysis_entries(&cache) < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(analysis_entries(&cache), 2, "{:?}", cache_files(&cache));
    // Cached analyses cost no budget: the next run is planned before main.
    let second = run_predict(&cache, 10, &env);
    assert!(
        second.stderr().contains("lgmalloc: plan: "),
        "{}",
        second.stderr()
    );
    assert_eq!(second.stdout(), "usable 4112\n");
}

#[test]
fn deferred_analysis_can_be_turned_off_and_runs_once_per_file() {
    let budget0 = ("LGMALLOC_ANALYSIS_BUDGET_MS", "0");
    // Off: the run defers its analyses, and nothing analyses them after it.
    let off = FreshCache::new("predict-deferred-off");
    let r = run_predict(&off, 10, &[budget0, ("LGMALLOC_DEFERRED_ANALYSIS", "0")]);
    assert_eq!(r.stdout(), "usable 4608\n");
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(analysis_entries(&off), 0, "{:?}", cache_files(&off));

    // The names of the two files' cache entries, from a run that analyses before main.
    let named = FreshCache::new("predict-deferred-names");
    run_predict(&named, 10, &[("LGMALLOC_ANALYSIS_BUDGET_MS", "10000")]);
    let entries: Vec<String> = cache_files(&named)
        .into_iter()
        .filter(|n| !n.contains('.'))
        .collect();
    assert_eq!(entries.len(), 2, "{entries:?}");

    // Another process analysing those files holds their locks: this run's child skips
    // them rather than analyse them a second time.
    let busy = FreshCache::new("predict-deferred-busy");
    let locks: Vec<fs::File> = entries
        .iter()
        .map(|e| {
            let f = fs::File::create(busy.join(format!("{e}.lock"))).unwrap();
            // SAFETY: flock on a descriptor this test owns.
            let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            assert_eq!(r, 0, "flock");
            f
        })
        .collect();
    let r = run_predict(&busy, 10, &[budget0, ("LGMALLOC_VERBOSE", "1")]);
    assert!(
        r.stderr().contains("deferred: over the start-up budget"),
        "{}",
        r.stderr()
    );
    std::thread::sleep(std::time::Duration::from_millis(1000));
    assert_eq!(analysis_entries(&busy), 0, "{:?}", cache_files(&busy));
    // Released: the next run's child analyses both.
    drop(locks);
    run_predict(&busy, 10, &[budget0]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while analysis_entries(&busy) < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(analysis_entries(&busy), 2, "{:?}", cache_files(&busy));
}

/// The `lgmalloc: plan: size N ...` lines of a verbose run: (size, "from X" source).
fn plan_lines(stderr: &str) -> Vec<(usize, String)> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("lgmalloc: plan: size "))
        .map(|l| {
            let size = l.split_whitespace().next().and_then(|v| v.parse().ok());
            let source = l
                .split_once(" from ")
                .and_then(|(_, r)| r.split_whitespace().next());
            (
                size.unwrap_or_else(|| panic!("bad plan line {l:?}")),
                source
                    .unwrap_or_else(|| panic!("bad plan line {l:?}"))
                    .to_string(),
            )
        })
        .collect()
}

#[test]
fn predict_analyze_analyses_but_plans_nothing() {
    let cache = FreshCache::new("predict-analyze");
    let env = [("LGMALLOC_VERBOSE", "1"), ("LGMALLOC_PREDICT", "analyze")];
    let r = run_predict(&cache, 10, &env);
    let err = r.stderr();
    // The analyses ran (and were cached) ...
    assert_eq!(analysis_entries(&cache), 2, "{:?}", cache_files(&cache));
    // ... but no plan is in force: no plan report, the standard class serves 4112 bytes
    // and nothing is learned for the next run.
    assert!(!err.contains("lgmalloc: plan"), "{err}");
    assert_eq!(r.stdout(), "usable 4608\n", "{err}");
    let names = cache_files(&cache);
    assert!(!names.iter().any(|n| n.ends_with(".learned")), "{names:?}");
}

#[test]
fn predict_naive_reserves_the_eight_smallest_classes_without_analysis() {
    let cache = FreshCache::new("predict-naive");
    let env = [("LGMALLOC_VERBOSE", "1"), ("LGMALLOC_PREDICT", "naive")];
    let r = run_predict(&cache, 10, &env);
    let err = r.stderr();
    assert!(
        err.lines()
            .any(|l| l.starts_with("lgmalloc: plan: 8 classes, 0 constant sites, analysis 0 us")),
        "{err}"
    );
    let classes = plan_lines(&err);
    let sizes: Vec<usize> = classes.iter().map(|c| c.0).collect();
    assert_eq!(sizes.len(), 8, "{err}");
    assert!(
        sizes.windows(2).all(|w| w[0] < w[1]) && sizes[0] == 16 && sizes[7] <= 128,
        "not the 8 smallest classes: {sizes:?}"
    );
    // No analysis: nothing cached, the 4112-byte size has no exact-fit class.
    assert!(
        cache_files_but_profile(&cache).is_empty(),
        "{:?}",
        cache_files(&cache)
    );
    assert_eq!(r.stdout(), "usable 4608\n", "{err}");
}

/// Region lock acquisitions in a `LGMALLOC_SHOW_STATS` summary ("region N/M").
fn region_acquisitions(stderr: &str) -> usize {
    let line = stderr
        .lines()
        .find(|l| l.contains("lock acquisitions"))
        .unwrap_or_else(|| panic!("no statistics: {stderr}"));
    let (_, rest) = line
        .split_once("region ")
        .unwrap_or_else(|| panic!("no region count: {line}"));
    rest.split('/')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("bad region count: {line}"))
}

/// The `thread_starts` fixture, built once (as the misuse fixture, for the tests that
/// run it at once).
fn thread_starts_exe() -> &'static Path {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| fixture_exe("thread_starts", &["thread_starts.c"], &[]))
}

/// A new thread's reserved classes (here the naive plan's eight) get their first pages
/// in one region visit, cut from one span: 40 threads that each use those eight classes
/// and exit visit the region at most 3 times each (2.2 measured; 9.2 with one visit per
/// class).
/// Each thread's blocks are filled and checked.
#[test]
fn reserved_classes_cost_a_new_thread_one_region_visit() {
    let exe = thread_starts_exe();
    let env = [("LGMALLOC_PREDICT", "naive"), ("LGMALLOC_SHOW_STATS", "1")];
    let r = run_lg_with(&mut Command::new(exe), &env).success("thread_starts");
    assert_eq!(r.stdout(), "threads ok\n");
    r.ran_on_lgmalloc("thread_starts");
    let visits = region_acquisitions(&r.stderr());
    eprintln!("40 threads: {visits} region visits");
    assert!(visits <= 3 * 40, "{visits} region visits for 40 threads");
}

/// `LGMALLOC_PLAN` turns the plan's mechanisms on one at a time: without `exact-fit` the
/// predicted 4112-byte size stays in its standard class (4608), with it alone it gets
/// its class; without `reserve` new threads take their classes' pages one by one (more
/// region visits than `reserved_classes_cost_a_new_thread_one_region_visit` allows); an
/// unknown word is reported and leaves every mechanism on.
#[test]
fn lgmalloc_plan_turns_each_mechanism_on_and_off() {
    // A cache each: a run learns the classes it used, and the next would plan from that.
    let verbose = ("LGMALLOC_VERBOSE", "1");
    let cache = FreshCache::new("predict-plan-use");
    let no_exact = run_predict(
        &cache,
        10,
        &[verbose, ("LGMALLOC_PLAN", "first-pages,reserve")],
    );
    let err = no_exact.stderr();
    assert_eq!(no_exact.stdout(), "usable 4608\n", "{err}");
    assert!(
        err.contains("lgmalloc: plan: mechanisms in force (LGMALLOC_PLAN): first-pages reserve\n"),
        "{err}"
    );
    let cache = FreshCache::new("predict-plan-exact");
    let exact_only = run_predict(&cache, 10, &[verbose, ("LGMALLOC_PLAN", "exact-fit")]);
    assert_eq!(
        exact_only.stdout(),
        "usable 4112\n",
        "{}",
        exact_only.stderr()
    );
    let cache = FreshCache::new("predict-plan-unknown");
    let unknown = run_predict(&cache, 10, &[verbose, ("LGMALLOC_PLAN", "exact-fit,bogus")]);
    let err = unknown.stderr();
    assert!(err.contains("LGMALLOC_PLAN not understood"), "{err}");
    assert!(!err.contains("mechanisms in force"), "{err}");
    assert_eq!(unknown.stdout(), "usable 4112\n", "{err}");

    let exe = thread_starts_exe();
    let env = [
        ("LGMALLOC_PREDICT", "naive"),
        ("LGMALLOC_SHOW_STATS", "1"),
        ("LGMALLOC_PLAN", "exact-fit,first-pages"),
    ];
    let r = run_lg_with(&mut Command::new(exe), &env).success("thread_starts");
    assert_eq!(r.stdout(), "threads ok\n");
    let visits = region_acquisitions(&r.stderr());
    eprintln!("40 threads, no reservations: {visits} region visits");
    assert!(
        visits > 3 * 40,
        "{visits} region visits: reservations still in force?"
    );
}

/// `profile_shape` holding 3840 blocks of 4360 bytes (4368-byte blocks: the 4608 class
/// wastes 5.2%), 3840 of 4512 (2.1%: under the 1/32 bar) and 3 of 2176 (5.6%, but
/// 6.5 KB: less than the partly used page its class would cost), each from its own call
/// site. The sizes come from the command line: only the profile can plan for them.
/// Three 2176-byte blocks, not more: a sample stands for 256 KiB on average, so three
/// samples of that site in one run would pay for its class (120 blocks each, 128 bytes
/// saved on each); by the sampler's odds (computed), twenty blocks (43 KB) draw three
/// about once in 1,500 runs, three blocks about once in 400,000.
fn run_profile_shape(cache: &Path, env: &[(&str, &str)]) -> Run {
    run_profile_shape_with(cache, ["4360", "3840", "4512", "3840", "2176", "3"], env)
}

/// `profile_shape ARGS` (three pairs of size and count) with lgmalloc, the cache in
/// `cache`, the plan reported, a budget that analyses it before `main`, and `env`.
fn run_profile_shape_with(cache: &Path, args: [&str; 6], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(profile_shape_exe());
    cmd.args(args)
        .env("LGMALLOC_CACHE_DIR", cache)
        .env_remove("LGMALLOC_PREDICT")
        .env_remove("LGMALLOC_LEARN");
    let mut env = env.to_vec();
    env.extend([
        ("LGMALLOC_VERBOSE", "1"),
        ("LGMALLOC_ANALYSIS_BUDGET_MS", "10000"),
    ]);
    let r = run_lg_with(&mut cmd, &env).success("profile_shape");
    r.ran_on_lgmalloc("profile_shape");
    r
}

fn profile_shape_exe() -> &'static Path {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| fixture_exe("profile_shape", &["profile_shape.c"], &[]))
}

/// The `plan` field of each site in `lgmalloc-analyze --profile --json`'s report on
/// `profile_shape`, by the site's (constant) size.
fn profile_shape_report(cache: &Path) -> Vec<(u64, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_lgmalloc-analyze"))
        .arg("--profile")
        .arg(profile_shape_exe())
        .arg("--json")
        .env("LGMALLOC_CACHE_DIR", cache)
        .output()
        .unwrap();
    let json = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |row: &str, name: &str| {
        let at = row.find(&format!("\"{name}\":"))? + name.len() + 3;
        let rest = &row[at..];
        // A string (the plan) ends at its closing quote, a number at the next comma.
        let end = match rest.strip_prefix('"') {
            Some(text) => text.find('"')? + 2,
            None => rest.find([',', '}'])?,
        };
        Some(rest[..end].trim_matches('"').to_string())
    };
    json.split("\"module\":")
        .skip(1)
        .filter_map(|row| {
            let (min, max) = (field(row, "size_min")?, field(row, "size_max")?);
            (min == max).then_some(())?;
            Some((min.parse().ok()?, field(row, "plan")?))
        })
        .collect()
}

/// The text of the plan stored in `cache`, if any.
fn stored_plan_text(cache: &Path) -> Option<String> {
    let name = cache_files(cache)
        .into_iter()
        .find(|n| n.ends_with(".plan"))?;
    fs::read_to_string(cache.join(name)).ok()
}

/// The plan lines of a verbose run that name `size` (the block size planned).
fn plan_lines_of(stderr: &str, size: usize) -> Vec<String> {
    let prefix = format!("lgmalloc: plan: size {size:>6} ");
    stderr
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .map(str::to_string)
        .collect()
}

/// A size that holds many live bytes and wastes more than 1/32 in its standard class gets
/// an exact-fit class once the sampled profile has seen it (the first run has no profile
/// yet); the plan stores it as the profile's, and a stored plan brings it back. A size
/// under the waste bar, and one with too few bytes to repay a page, stay standard.
#[test]
fn the_profile_gives_a_live_size_wasting_over_1_32_an_exact_fit_class() {
    let cache = FreshCache::new("profile-shape");
    let first = run_profile_shape(&cache, &[]);
    assert_eq!(
        first.stdout(),
        "usable 4608 4608 2304\n",
        "{}",
        first.stderr()
    );
    assert!(
        cache_files(&cache).iter().any(|n| n.ends_with(".profile")),
        "{:?}",
        cache_files(&cache)
    );
    // The first run's observations dropped its plan: this one is built with the profile.
    let second = run_profile_shape(&cache, &[]);
    let err = second.stderr();
    assert_eq!(second.stdout(), "usable 4368 4608 2304\n", "{err}");
    let shaped = plan_lines_of(&err, 4368);
    assert!(
        shaped.len() == 1 && shaped[0].contains("from Profile exact-fit"),
        "{err}"
    );
    assert!(!err.contains("size   4512"), "{err}");
    assert!(!err.contains("size   2176"), "{err}");
    // Without the exact-fit mechanism the size stays in its standard class.
    let off = run_profile_shape(&cache, &[("LGMALLOC_PLAN", "first-pages,reserve")]);
    assert_eq!(off.stdout(), "usable 4608 4608 2304\n", "{}", off.stderr());
    // Runs go on until a plan is stored (the one after the exact class first appears
    // observes a new class and drops the plan it ran with).
    let stored_plan = || stored_plan_text(&cache);
    for _ in 0..4 {
        if stored_plan().is_some() {
            break;
        }
        run_profile_shape(&cache, &[]);
    }
    let text = stored_plan().expect("no run stored its plan");
    assert!(
        text.lines()
            .any(|l| l.starts_with("class 4368 ") && l.contains(" P ")),
        "{text}"
    );
    // The analyzer's report names the class each size gets: 4360 bytes their exact fit;
    // 4512 (1/48 wasted in 4608) their standard class, which the plan learned (its first
    // page sized); 2176, with few bytes, its standard class unplanned (when a sample
    // caught it at all).
    let report = profile_shape_report(&cache);
    let plan_of = |size: u64| {
        report
            .iter()
            .find(|(s, _)| *s == size)
            .map(|(_, p)| p.as_str())
    };
    assert_eq!(
        plan_of(4360),
        Some("exact-fit class (4368 B)"),
        "{report:?}"
    );
    assert_eq!(
        plan_of(4512),
        Some("predicted, class 4608 B"),
        "{report:?} {text}"
    );
    assert!(
        plan_of(2176).is_none_or(|p| p == "standard class (2304 B)"),
        "{report:?}"
    );
    // Without the profile, only the stored plan can bring the class back.
    for name in cache_files(&cache) {
        if name.ends_with(".profile") {
            fs::remove_file(cache.join(name)).unwrap();
        }
    }
    let from_plan = run_profile_shape(&cache, &[]);
    let err = from_plan.stderr();
    assert_eq!(from_plan.stdout(), "usable 4368 4608 2304\n", "{err}");
    assert!(
        plan_lines_of(&err, 4368)
            .iter()
            .any(|l| l.contains("from Profile exact-fit")),
        "{err}"
    );
}

/// Sizes up to 1 KiB are classified from each heap's own copy of the class table, and
/// the main thread's heap exists before the plan adds its classes (its first
/// allocations come before the plan is read): the copy is refreshed then, so the main
/// thread gets a small exact-fit class too (520 bytes: 528 instead of 576).
#[test]
fn a_small_exact_fit_class_serves_the_main_thread() {
    let cache = FreshCache::new("profile-small-exact");
    let args = ["520", "20000", "4608", "3", "2304", "3"];
    let first = run_profile_shape_with(&cache, args, &[]);
    assert_eq!(
        first.stdout(),
        "usable 576 4608 2304\n",
        "{}",
        first.stderr()
    );
    let second = run_profile_shape_with(&cache, args, &[]);
    let err = second.stderr();
    assert!(
        plan_lines_of(&err, 528)
            .iter()
            .any(|l| l.contains("exact-fit")),
        "{err}"
    );
    assert_eq!(second.stdout(), "usable 528 4608 2304\n", "{err}");
}

/// The sampled profile grows with every run, and the plan follows it even when the
/// observations stay the same. Two runs with three 520-byte blocks among 600,000 small
/// ones make a plan without an exact fit for 520 (the profile holds too few of its
/// bytes). Runs with 5,000 of them keep the mix of allocations (520 stays under the
/// 5% share observations count) but make the profile choose a 528-byte class: the run
/// that tips it drops the stored plan, and later runs are served 528-byte blocks. The
/// observations file is the same throughout: the profile, not the observations, made
/// the plan anew.
///
/// Why three: a sample stands for 256 KiB on average, so two samples of the site in
/// the first run already pay for the class (504 blocks each, 48 bytes saved on each,
/// against the 32 KiB of a partly used page). By the odds of the sampler's exponential
/// intervals (computed, not counted), twenty blocks (10 KB) draw two about once in 1,300
/// runs (test-all failed so at b08ec04); three (1.5 KB), about once in 57,000.
#[test]
fn the_plan_follows_the_profile_as_it_grows() {
    let cache = FreshCache::new("profile-grows");
    let few = ["520", "3", "16", "300000", "32", "300000"];
    let many = ["520", "5000", "16", "300000", "32", "300000"];
    let learned = || {
        let name = cache_files(&cache)
            .into_iter()
            .find(|n| n.ends_with(".learned"))
            .expect("observations stored");
        fs::read_to_string(cache.join(name)).expect("readable observations")
    };
    for _ in 0..2 {
        let run = run_profile_shape_with(&cache, few, &[]);
        assert_eq!(run.stdout(), "usable 576 16 32\n", "{}", run.stderr());
    }
    let plan = stored_plan_text(&cache).expect("a stored plan");
    assert!(plan.lines().any(|l| l == "profile-room 16"), "{plan}");
    assert!(!plan.contains("profile-exact"), "{plan}");
    let observed = learned();
    // Two runs of 2.6 MB of 520-byte blocks merge about 20 samples of them: far past the
    // 5 the choice needs (over 4 runs).
    for _ in 0..2 {
        run_profile_shape_with(&cache, many, &[]);
    }
    let after = run_profile_shape_with(&cache, many, &[]);
    let err = after.stderr();
    assert_eq!(after.stdout(), "usable 528 16 32\n", "{err}");
    assert!(
        plan_lines_of(&err, 528)
            .iter()
            .any(|l| l.contains("from Profile exact-fit")),
        "{err}"
    );
    let plan = stored_plan_text(&cache).expect("the plan stored again");
    assert!(plan.lines().any(|l| l == "profile-exact 528"), "{plan}");
    assert_eq!(learned(), observed);
}

/// A program whose sizes all fit their standard classes stores an inert plan: later
/// runs read it up to its `inert` line and put nothing in force (no plan line). Inert
/// does not mean deaf: a later run big enough to sample (4360-byte blocks, 16 MB) learns
/// at exit, drops the inert plan, and the run after it gets the exact-fit class.
#[test]
fn a_plan_that_saves_nothing_is_inert_until_a_big_run_teaches_otherwise() {
    let cache = FreshCache::new("plan-inert");
    // The third pair's site allocates nothing in small runs (the profile keeps only
    // the smallest and largest size of a site: a site that asked for another size
    // before would not count as asking for 4360).
    let small = ["4608", "100", "2304", "10", "4360", "0"];
    let plan_text = || stored_plan_text(&cache);
    for _ in 0..4 {
        if plan_text().is_some() {
            break;
        }
        run_profile_shape_with(&cache, small, &[]);
    }
    let text = plan_text().expect("no run stored its plan");
    assert!(text.lines().any(|l| l == "inert"), "{text}");
    let run = run_profile_shape_with(&cache, small, &[]);
    let err = run.stderr();
    assert!(
        err.contains("lgmalloc: plan: inert (predicts no saving), nothing put in force"),
        "{err}"
    );
    assert!(plan_lines(&err).is_empty(), "{err}");
    assert_eq!(run.stdout(), "usable 4608 2304 0\n", "{err}");
    // A big run under the inert plan learns; the next one plans the exact fit.
    let big = ["4608", "100", "2304", "10", "4360", "3840"];
    let busy = run_profile_shape_with(&cache, big, &[]);
    assert_eq!(
        busy.stdout(),
        "usable 4608 2304 4608\n",
        "{}",
        busy.stderr()
    );
    let after = run_profile_shape_with(&cache, big, &[]);
    let err = after.stderr();
    assert_eq!(after.stdout(), "usable 4608 2304 4368\n", "{err}");
    assert!(!err.contains("inert"), "{err}");
}

#[test]
fn learn_0_neither_uses_nor_records_observations() {
    let cache = FreshCache::new("predict-learn-0");
    let verbose = [("LGMALLOC_VERBOSE", "1")];
    // Two learning runs: the second plans from what the first observed ("from Both").
    run_predict(&cache, 1000, &verbose);
    let learned = cache_files(&cache)
        .into_iter()
        .find(|n| n.ends_with(".learned"))
        .unwrap_or_else(|| panic!("nothing learned: {:?}", cache_files(&cache)));
    let learned_path = cache.join(&learned);
    let learned_before = fs::read(&learned_path).expect("read the learned file");
    let with = run_predict(&cache, 1000, &verbose);
    assert!(
        plan_lines(&with.stderr())
            .iter()
            .any(|(size, from)| *size == 4112 && from == "Both"),
        "{}",
        with.stderr()
    );
    // LEARN=0, with a very different workload (10 rounds): static analysis only, and
    // the observations on file stay as they were.
    fs::write(&learned_path, &learned_before).expect("restore the learned file");
    let env = [("LGMALLOC_VERBOSE", "1"), ("LGMALLOC_LEARN", "0")];
    let without = run_predict(&cache, 10, &env);
    let err = without.stderr();
    let plan = plan_lines(&err);
    assert!(!plan.is_empty(), "no plan: {err}");
    assert!(
        plan.iter().all(|(_, from)| from == "Static"),
        "LEARN=0 used observations: {plan:?}"
    );
    assert_eq!(without.stdout(), "usable 4112\n", "{err}");
    assert_eq!(
        fs::read(&learned_path).expect("read the learned file"),
        learned_before,
        "LEARN=0 rewrote {learned}"
    );
    // A fresh cache: LEARN=0 writes no observations at all.
    let fresh = FreshCache::new("predict-learn-0-fresh");
    run_predict(&fresh, 1000, &env);
    let names = cache_files(&fresh);
    assert!(!names.iter().any(|n| n.ends_with(".learned")), "{names:?}");
    assert_eq!(analysis_entries(&fresh), 2, "{names:?}");
}

/// The large objects python3's analysis allocates and frees before `main` are not
/// learned as python3's own large-object reuse (a program that frees none would
/// otherwise learn a retention policy, and never get an inert plan): the counters start
/// at zero when the program does.
#[test]
fn large_objects_of_the_analysis_before_main_are_not_counted_as_the_programs() {
    let python = system_program("python3");
    let cache = FreshCache::new("analysis-large");
    let mut cmd = Command::new(&python);
    cmd.args(["-c", "print(6 * 7)"]);
    cache.set(&mut cmd);
    let env = [
        ("LGMALLOC_ANALYSIS_BUDGET_MS", "10000"),
        ("LGMALLOC_SHOW_STATS", "1"),
    ];
    let r = run_lg_with(&mut cmd, &env).success("python3");
    assert_eq!(r.stdout(), "42\n");
    let err = r.stderr();
    assert!(!err.contains("deferred"), "{err}");
    assert!(
        err.contains("lgmalloc: stats: large cache: 0 cached, 0 reused, 0 gathered, 0 missed"),
        "{err}"
    );
}

#[test]
fn a_larger_analysis_budget_plans_python_before_main() {
    let python = system_program("python3");
    let run = |budget: Option<&str>| {
        let cache = FreshCache::new("budget-python");
        let mut cmd = Command::new(&python);
        cmd.args(["-c", "print(6 * 7)"]);
        cache.set(&mut cmd);
        let mut env = vec![("LGMALLOC_VERBOSE", "1")];
        if let Some(b) = budget {
            env.push(("LGMALLOC_ANALYSIS_BUDGET_MS", b));
        }
        let r = run_lg_with(&mut cmd, &env).success("python3");
        assert_eq!(r.stdout(), "42\n");
        r.stderr()
        // `cache` is dropped here: a deferred analysis child is waited for.
    };
    // "lgmalloc: plan: N classes, S constant sites, ..." (0 without a plan).
    let sites = |err: &str| -> usize {
        err.lines()
            .filter_map(|l| l.strip_prefix("lgmalloc: plan: "))
            .filter_map(|l| l.split_once(" classes, "))
            .filter_map(|(_, r)| r.split_whitespace().next()?.parse().ok())
            .next()
            .unwrap_or(0)
    };
    // The default budget (2 ms CPU) is too small for python3's cold analysis: it is
    // deferred to a child after exit; this run plans from the small libraries only.
    let default = run(None);
    assert!(
        default
            .lines()
            .any(|l| l.starts_with("lgmalloc: analysis of ")
                && l.contains("python3")
                && l.ends_with(" deferred: over the start-up budget")),
        "{default}"
    );
    // Ten seconds: python3 is analysed before main, nothing is deferred, and its own
    // constant sites join the plan.
    let large = run(Some("10000"));
    assert!(!large.contains("deferred"), "{large}");
    assert!(
        sites(&large) > sites(&default),
        "budget 10000 planned {} sites, the default {}:\n{large}\n{default}",
        sites(&large),
        sites(&default)
    );
}

// ---- large-object retention --------------------------------------------------------------

/// Runs `large_reuse ARGS` with lgmalloc (statistics and the plan reported), the cache
/// in `cache` and `env`; its one output line's number, and its stderr.
fn run_large_reuse(cache: &Path, args: &[&str], env: &[(&str, &str)]) -> (i64, String) {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    let exe = EXE.get_or_init(|| fixture_exe("large_reuse", &["large_reuse.c"], &[]));
    let mut cmd = Command::new(exe);
    cmd.args(args).env("LGMALLOC_CACHE_DIR", cache);
    let mut env = env.to_vec();
    env.extend([
        ("LGMALLOC_VERBOSE", "1"),
        ("LGMALLOC_SHOW_STATS", "1"),
        ("LGMALLOC_ANALYSIS_BUDGET_MS", "10000"),
    ]);
    let r = run_lg_with(&mut cmd, &env).success("large_reuse");
    r.ran_on_lgmalloc("large_reuse");
    let out = r.stdout();
    let n = out
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("bad output {out:?}\n{}", r.stderr()));
    (n, r.stderr())
}

/// The "N reused" of the statistics' large cache line.
fn large_cache_reused(stderr: &str) -> u64 {
    let line = stderr
        .lines()
        .find_map(|l| l.strip_prefix("lgmalloc: stats: large cache: "))
        .unwrap_or_else(|| panic!("no large cache statistics: {stderr}"));
    line.split(", ")
        .find_map(|f| f.strip_suffix(" reused"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("bad large cache line: {line}"))
}

/// A program that wants a freed 8 MiB buffer back after 700 ms (longer than the default
/// 500 ms delay): the first run unmaps it and faults the new one in; it learns that a
/// longer delay would have kept it, and the next run reuses the mapping (no page
/// faults). With `LGMALLOC_PLAN=none` no run does.
#[test]
fn a_large_buffer_wanted_after_the_delay_is_kept_on_a_later_run() {
    let pause = ["pause", "700"];
    let cache = FreshCache::new("large-retention");
    let (first, err) = run_large_reuse(&cache, &pause, &[]);
    assert_eq!(large_cache_reused(&err), 0, "{err}");
    let (second, err) = run_large_reuse(&cache, &pause, &[]);
    eprintln!("8 MiB rewritten after 700 ms: {first} faults, then {second} on the next run");
    assert_eq!(large_cache_reused(&err), 1, "{err}");
    assert!(
        err.contains("lgmalloc: plan: large retention: delay 2048 ms"),
        "{err}"
    );
    assert!(
        first >= 1024 && second * 16 < first,
        "faults {first} then {second}\n{err}"
    );

    let off = FreshCache::new("large-retention-none");
    for _ in 0..2 {
        let (faults, err) = run_large_reuse(&off, &pause, &[("LGMALLOC_PLAN", "none")]);
        assert_eq!(large_cache_reused(&err), 0, "{err}");
        assert!(faults >= 1024, "{faults} faults\n{err}");
        assert!(!err.contains("large retention"), "{err}");
    }
}

/// A program that frees large buffers it never wants again and then reuses one scratch
/// buffer, always the newest mapping freed: the first run keeps up to the default 16 MiB
/// floor resident; it learns that every reuse was found within 4 MiB of the newest
/// mapping (the scratch buffer's mapping, 3 MiB resident from its first user), so the
/// next run's budget is 4 MiB: it keeps a fraction of that, and reuses as often.
#[test]
fn a_budget_learned_from_reuse_depth_keeps_what_is_reused_and_returns_the_rest() {
    let cache = FreshCache::new("large-retention-depth");
    let (first, err) = run_large_reuse(&cache, &["scratch"], &[]);
    let (second, err2) = run_large_reuse(&cache, &["scratch"], &[]);
    eprintln!("scratch reuse after 24 MiB freed: {first} KiB kept, then {second} KiB");
    assert!(first >= 12 << 10, "{first} KiB kept\n{err}");
    assert!(
        second * 3 <= first,
        "{first} then {second} KiB kept\n{err2}"
    );
    let (reused, reused2) = (large_cache_reused(&err), large_cache_reused(&err2));
    assert!(
        reused >= 399 && reused2 >= reused,
        "reused {reused} then {reused2}"
    );
    // The delay follows how long reuse waited, which a loaded machine can stretch.
    assert!(
        err2.lines()
            .any(|l| l.starts_with("lgmalloc: plan: large retention: delay ")
                && l.contains(" ms, floor 4096 KiB, live share 1/256 ")),
        "{err2}"
    );
}

/// A program that frees 40 large buffers (more than the default budget keeps) and then
/// asks for the same sizes again: every request the cache misses was one of the
/// mappings the budget unmapped, and each is counted as reuse a larger budget would
/// have served, however many were unmapped in between (so the learned budget weighs
/// all the reuse it lost, not the last few).
#[test]
fn every_reuse_lost_to_the_budget_is_counted_behind_many_unmapped_mappings() {
    let cache = FreshCache::new("large-retention-ghosts");
    let (n, err) = run_large_reuse(&cache, &["again"], &[]);
    assert_eq!(n, 40, "{err}");
    let line = err
        .lines()
        .find_map(|l| l.strip_prefix("lgmalloc: stats: large cache: "))
        .unwrap_or_else(|| panic!("no large cache statistics: {err}"));
    let count = |suffix: &str| -> u64 {
        line.split([',', '(', ')'])
            .flat_map(|f| f.split(" and "))
            .find_map(|f| f.trim().strip_suffix(suffix))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {suffix:?} in: {line}"))
    };
    // The first 40 requests find nothing cached: those misses are no lost reuse.
    let missed_again = count(" missed") - 40;
    let lost = count(" a larger budget would have served");
    eprintln!("{missed_again} missed on asking again, {lost} a larger budget would have served");
    assert!(missed_again >= 20, "{line}");
    assert_eq!(lost, missed_again, "{line}");
}

/// A program that frees large buffers it never wants again: the first run keeps up to
/// the default 16 MiB floor of them resident; it learns they were never reused, and
/// the next run keeps only the newest.
#[test]
fn large_buffers_never_reused_are_returned_on_a_later_run() {
    let cache = FreshCache::new("large-retention-drop");
    let (first, err) = run_large_reuse(&cache, &["drop"], &[]);
    let (second, err2) = run_large_reuse(&cache, &["drop"], &[]);
    eprintln!("24 MiB freed: {first} KiB kept, then {second} KiB on the next run");
    assert!(first >= 12 << 10, "{first} KiB kept\n{err}");
    assert!(second <= 4 << 10, "{second} KiB kept\n{err2}");
    assert!(
        err2.contains("lgmalloc: plan: large retention: delay 100 ms, floor 0 KiB"),
        "{err2}"
    );
}

/// The sampled-profile line of the statistics: (samples, found by unwinding the stack).
fn samples_and_unwound(stderr: &str) -> (u64, u64) {
    let line = stderr
        .lines()
        .find_map(|l| l.strip_prefix("lgmalloc: stats: sampled profile: "))
        .unwrap_or_else(|| panic!("no sampled-profile statistics: {stderr}"));
    let number = |s: &str| s.parse().unwrap_or_else(|_| panic!("bad line: {line}"));
    // `N samples (F followed to their free, U found their call site by unwinding ...`
    let (samples, rest) = line.split_once(" samples (").expect("samples");
    let (_, rest) = rest
        .split_once(" followed to their free, ")
        .expect("followed");
    let (unwound, _) = rest.split_once(' ').expect("unwound");
    (number(samples), number(unwound))
}

/// A sample of a call straight from the program takes the return address the entry
/// point was handed as its call site: no walk of the stack (about 8,000 instructions
/// through libgcc). For `malloc` and `calloc` (whose fast path clears the block after
/// the pop, and hands a sampled block to a clearing tail instead) the sampler finds it
/// on the stack; `operator new` calls the allocator with one word pushed, so its
/// sampler reads two words up; the entries of `realloc`, `posix_memalign`, their `lg_`
/// forms and the nothrow `operator new` read it themselves and pass it on (they do more
/// after allocating).
/// The same holds on the slow path (the `-big` forms keep 8 blocks of 128 KiB live, a
/// block per page), where `calloc`'s reads it itself too (it clears the block after the
/// pop). Each run's stored profile must put (nearly) every sample in the program: a
/// read at the wrong stack slot would record some other word as the site.
#[test]
fn samples_of_direct_calls_take_their_site_without_unwinding() {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    let exe = EXE.get_or_init(|| fixture_exe("sampled_calls", &["sampled_calls.cpp"], &[]));
    let calls = [
        "malloc",
        "calloc",
        "realloc",
        "lg_realloc",
        "posix_memalign",
        "lg_posix_memalign",
        "new",
        "new-nothrow",
        "new-aligned",
        "new-aligned-nothrow",
        "new-small",
        "calloc-big",
        "realloc-big",
        "new-big",
    ];
    for call in calls {
        let cache = FreshCache::new("sampled-calls");
        let mut cmd = Command::new(exe);
        cmd.arg(call);
        cache.set(&mut cmd);
        let r = run_lg_with(&mut cmd, &[("LGMALLOC_SHOW_STATS", "1")]).success("sampled_calls");
        r.ran_on_lgmalloc("sampled_calls");
        let (samples, unwound) = samples_and_unwound(&r.stderr());
        assert!(
            samples >= 128,
            "{call}: about 256 samples expected, {samples}"
        );
        assert!(
            unwound * 10 <= samples,
            "{call}: {unwound} of {samples} samples unwound the stack"
        );
        let (in_program, stored) = samples_in_module(&cache, exe);
        assert!(
            stored >= 128 && in_program * 10 >= stored * 9,
            "{call}: {in_program} of the {stored} samples stored have their site in the program"
        );
    }
}

/// From `lgmalloc-analyze --profile EXE --json` with the cache in `cache`: the samples
/// whose call site lies in `exe` itself, and all samples stored.
fn samples_in_module(cache: &Path, exe: &Path) -> (u64, u64) {
    let out = Command::new(env!("CARGO_BIN_EXE_lgmalloc-analyze"))
        .arg("--profile")
        .arg(exe)
        .arg("--json")
        .env("LGMALLOC_CACHE_DIR", cache)
        .output()
        .expect("run lgmalloc-analyze");
    let json = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let module = format!("\"{}\"", exe.display());
    let (mut in_program, mut stored) = (0, 0);
    for row in json.split("{\"module\":").skip(1) {
        let at = row.find("\"samples\":").expect("a samples field") + "\"samples\":".len();
        let rest = &row[at..];
        let end = rest.find([',', '}']).expect("a number");
        let n: u64 = rest[..end].parse().expect("a sample count");
        stored += n;
        if row.starts_with(&module) {
            in_program += n;
        }
    }
    (in_program, stored)
}

/// The sampler's tables (slots and call-stack entries, about 248 KiB) start all zero, so
/// they lie in `.bss`: a page of them that no sample wrote costs no memory when read.
/// In `.data`, a read faulted its page in from the library file, and the profile's walk
/// of every entry at exit made them all resident (0.25-0.3 MB on a 3 MB peak).
#[test]
fn the_sample_tables_take_no_file_backed_pages() {
    let bytes = fs::read(&build().so).expect("read the library");
    let elf = goblin::elf::Elf::parse(&bytes).expect("parse the library");
    let tables = elf
        .syms
        .iter()
        .find(|s| {
            elf.strtab
                .get_at(s.st_name)
                .is_some_and(|n| n.contains("8lgmalloc6sample6TABLES"))
        })
        .expect("the library's symbol table names sample::TABLES");
    assert!(tables.st_size >= 200 << 10, "{} bytes", tables.st_size);
    let section = &elf.section_headers[tables.st_shndx];
    let name = elf.shdr_strtab.get_at(section.sh_name).unwrap_or("?");
    assert_eq!(
        section.sh_type,
        goblin::elf::section_header::SHT_NOBITS,
        "sample::TABLES lies in {name}, not in .bss"
    );
}

/// The code every process runs through the library lies in the section `build.rs` has
/// the linker gather at the start of the text (`scripts/hot-text.ld`): the entry points
/// and the allocator's fast and slow paths, so a process touches a few 64 KiB windows of
/// the library's code rather than most of them. Fails when the list went stale (the
/// entry points no longer match it: run `scripts/hot-text`) or when the build left the
/// script out (build.rs warns; `LGMALLOC_NO_HOT_TEXT=1` leaves it out on purpose).
#[test]
fn the_code_every_process_runs_is_gathered() {
    if std::env::var_os("LGMALLOC_NO_HOT_TEXT").is_some_and(|v| v != "0") {
        eprintln!(
            "LGMALLOC_NO_HOT_TEXT is set: the library is built without the gathering, not checked"
        );
        return;
    }
    let bytes = fs::read(&build().so).expect("read the library");
    let elf = goblin::elf::Elf::parse(&bytes).expect("parse the library");
    let hot = elf
        .section_headers
        .iter()
        .find(|s| elf.shdr_strtab.get_at(s.sh_name) == Some(".text.lgmalloc_hot"))
        .expect("no .text.lgmalloc_hot section: the linker did not take scripts/hot-text.ld");
    let range = hot.sh_addr..hot.sh_addr + hot.sh_size;
    let address_of = |name: &str| {
        elf.syms
            .iter()
            .find(|s| s.is_function() && elf.strtab.get_at(s.st_name) == Some(name))
            .map(|s| s.st_value)
    };
    for name in [
        "malloc",
        "free",
        "calloc",
        "realloc",
        "_Znwm",
        "_ZdlPv",
        "lg_malloc",
        "lg_free",
    ] {
        let addr = address_of(name).unwrap_or_else(|| panic!("{name} is not in the symbol table"));
        assert!(
            range.contains(&addr),
            "{name} at {addr:#x}, outside the gathered code {range:x?}: scripts/hot-text.ld is stale"
        );
    }
    let text = elf
        .section_headers
        .iter()
        .find(|s| elf.shdr_strtab.get_at(s.sh_name) == Some(".text"))
        .expect("a .text section");
    assert!(
        hot.sh_addr < text.sh_addr,
        "the gathered code follows .text instead of preceding it"
    );
}
