//! The cache directory as untrusted input, and its bound (`lgmalloc::analysis::cache_dir`).
//!
//! Hermetic: every test uses a directory of its own under `CARGO_TARGET_TMPDIR`, passed
//! to `CacheDir::open_at` (tests share one process, so no test sets an environment
//! variable of its own process); the `lgmalloc-analyze` runs get it in their environment.
//! Some checks need root (chown to another user); they are skipped with a note without it.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use lgmalloc::analysis::cache_dir::{CacheDir, LOCK_NAME, decode_analysis, encode_analysis};

const BIN: &str = env!("CARGO_BIN_EXE_lgmalloc-analyze");
/// The `nobody` user: a uid that is not ours.
const NOBODY: u32 = 65534;

/// A fresh, empty directory for one test (its parent is private, so the test can
/// create the cache directory in it).
fn scratch(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("cache-{}", std::process::id()))
        .join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn chown(p: &Path, uid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), None).unwrap();
}

/// Sets a file's mtime (the cache's "last use") to `secs_ago` seconds in the past.
fn age(p: &Path, secs_ago: i64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let t = libc::timespec {
        tv_sec: now - secs_ago,
        tv_nsec: 0,
    };
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid path and two timespecs.
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), [t, t].as_ptr(), 0) };
    assert_eq!(r, 0);
}

/// `du`-style usage of `dir` and lgmalloc's files in it, measured independently of the API.
fn du(dir: &Path) -> u64 {
    own_blocks(dir)
        + std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter(|e| {
                let n = e.file_name();
                let n = n.to_string_lossy();
                n.starts_with("b-") || n.starts_with("i-")
            })
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.blocks() * 512)
            .sum::<u64>()
}

/// The directory's own blocks, which `du` counts too.
fn own_blocks(dir: &Path) -> u64 {
    std::fs::metadata(dir).unwrap().blocks() * 512
}

#[test]
fn writable_by_group_or_others_is_refused() {
    let base = scratch("modes-refused");
    let dir = base.join("cache");
    std::fs::create_dir(&dir).unwrap();
    for bad in [0o770, 0o720, 0o702, 0o777, 0o1777] {
        chmod(&dir, bad);
        assert!(CacheDir::open_at(&dir).is_none(), "mode {bad:o} accepted");
    }
    for good in [0o700, 0o755, 0o500] {
        chmod(&dir, good);
        assert!(CacheDir::open_at(&dir).is_some(), "mode {good:o} refused");
    }
    chmod(&dir, 0o700);
}

#[test]
fn another_owner_is_refused() {
    if !is_root() {
        eprintln!("another_owner_is_refused: skipped (needs root to chown)");
        return;
    }
    let base = scratch("owner");
    let dir = base.join("cache");
    let c = CacheDir::open_at(&dir).expect("fresh directory");
    assert!(c.write("b-mine-1", b"mine"));
    // A file owned by someone else in our directory is not read.
    chown(&dir.join("b-mine-1"), NOBODY);
    assert_eq!(c.read("b-mine-1", 100), None);
    chown(&dir.join("b-mine-1"), 0);
    assert_eq!(c.read("b-mine-1", 100).as_deref(), Some(&b"mine"[..]));
    // The directory owned by someone else is not used at all.
    chown(&dir, NOBODY);
    assert!(CacheDir::open_at(&dir).is_none());
    chown(&dir, 0);
    assert!(CacheDir::open_at(&dir).is_some());
}

#[test]
fn created_private() {
    let base = scratch("created");
    let dir = base.join("a").join("b").join("cache");
    let c = CacheDir::open_at(&dir).expect("created with its parents");
    assert_eq!(mode(&dir), 0o700);
    assert!(c.write("b-1234-5", b"x"));
    assert!(c.write("b-1234-5.plan", b"y"));
    assert_eq!(mode(&dir.join("b-1234-5")), 0o600);
    assert_eq!(mode(&dir.join("b-1234-5.plan")), 0o600);
    assert!(c.lock(LOCK_NAME).is_some());
    assert_eq!(mode(&dir.join(LOCK_NAME)), 0o600);
    // Written by rename: no temporary is left.
    let names: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
    assert_eq!(names.len(), 3, "{names:?}");
}

#[test]
fn symbolic_links_are_not_followed() {
    let base = scratch("symlink");
    let dir = base.join("cache");
    let c = CacheDir::open_at(&dir).unwrap();
    let target = base.join("victim");
    std::fs::write(&target, b"secret").unwrap();
    symlink(&target, dir.join("b-planted-1")).unwrap();
    assert_eq!(c.read("b-planted-1", 1 << 20), None, "read through a link");
    assert!(!c.contains("b-planted-1"));
    assert!(c.write("b-planted-1", b"entry"));
    assert_eq!(
        std::fs::read(&target).unwrap(),
        b"secret",
        "target overwritten"
    );
    let meta = std::fs::symlink_metadata(dir.join("b-planted-1")).unwrap();
    assert!(
        meta.file_type().is_file(),
        "the link was replaced by a file"
    );
    // A link to a directory is not taken as the cache directory either.
    let link = base.join("link");
    symlink(&dir, &link).unwrap();
    assert!(CacheDir::open_at(&link).is_none());
    // Names that would leave the directory are refused.
    assert!(!c.write("../escape", b"x"));
    assert!(!c.write(".hidden", b"x"));
    assert_eq!(c.read("../victim", 100), None);
    assert!(!base.join("escape").exists());
}

#[test]
fn special_and_oversized_files_are_ignored() {
    let base = scratch("special");
    let dir = base.join("cache");
    let c = CacheDir::open_at(&dir).unwrap();
    // A FIFO must neither be read nor make the read wait for a writer.
    let fifo = CString::new(dir.join("b-fifo-1").as_os_str().as_bytes()).unwrap();
    // SAFETY: valid path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    assert_eq!(c.read("b-fifo-1", 100), None);
    std::fs::create_dir(dir.join("b-dir-1")).unwrap();
    assert_eq!(c.read("b-dir-1", 100), None);
    assert!(c.write("b-big-1", &[7; 1000]));
    assert_eq!(c.read("b-big-1", 999), None);
    assert_eq!(c.read("b-big-1", 1000).map(|v| v.len()), Some(1000));
    assert!(c.contains("b-big-1") && !c.contains("b-fifo-1") && !c.contains("b-dir-1"));
}

#[test]
fn eviction_keeps_usage_under_the_limit() {
    const LIMIT: u64 = 1 << 20;
    let base = scratch("evict");
    let dir = base.join("cache");
    let c = CacheDir::open_at(&dir).unwrap().with_max_bytes(LIMIT);
    let entry = vec![0x5a; 20 << 10];
    let start = std::time::Instant::now();
    for i in 0..300 {
        assert!(c.write(&format!("b-{i:04}-20480"), &entry));
        assert!(
            du(&dir) <= LIMIT,
            "over the limit after write {i}: du {} usage {} n {} evict {:?}",
            du(&dir),
            c.usage(),
            c.entries().len(),
            c.evict("x")
        );
    }
    let ms = start.elapsed().as_secs_f64() * 1e3;
    let kept = c.entries();
    eprintln!(
        "eviction: 300 writes of 20 KiB, limit 1 MiB: {} entries kept, {} bytes used (du), {ms:.0} ms",
        kept.len(),
        du(&dir)
    );
    assert_eq!(c.usage(), du(&dir));
    assert!(
        kept.iter().any(|f| f.name == "b-0299-20480"),
        "the last entry was evicted"
    );
    assert_eq!(c.read("b-0299-20480", 1 << 20), Some(entry));
    // The survivors are the most recent ones (writes are seconds apart at most, so
    // compare by order of writing, which the mtimes follow).
    let oldest_kept = kept.iter().map(|f| f.name.clone()).min().unwrap();
    assert!(oldest_kept.as_str() > "b-0200", "{oldest_kept}");
    // A foreign file in the directory is neither counted nor removed.
    std::fs::write(dir.join("notes.txt"), vec![1; 2 << 20]).unwrap();
    assert!(c.write("b-0300-20480", b"x"));
    assert!(dir.join("notes.txt").exists());
}

#[test]
fn least_recently_used_entry_goes_first_with_its_companions() {
    let base = scratch("lru");
    let dir = base.join("cache");
    let c = CacheDir::open_at(&dir).unwrap();
    let block = vec![1u8; 8 << 10];
    for name in ["b-a-1", "b-a-1.plan", "b-b-1", "b-b-1.learned", "b-c-1"] {
        assert!(c.write(name, &block));
    }
    // a was used an hour ago, b half an hour ago, c now.
    age(&dir.join("b-a-1"), 3600);
    age(&dir.join("b-a-1.plan"), 3600);
    age(&dir.join("b-b-1"), 1800);
    age(&dir.join("b-b-1.learned"), 1800);
    // Reading a refreshes its last use (it is older than the touch granularity).
    assert!(c.read("b-a-1", 1 << 20).is_some());
    // Room for four 8 KiB files (and the directory's own blocks, which count as `du`
    // counts them): writing d evicts one entry, b with its companion.
    let c = c.with_max_bytes(own_blocks(&dir) + 4 * (8 << 10));
    assert!(c.write("b-d-1", &block));
    let names: Vec<String> = c.entries().into_iter().map(|f| f.name).collect();
    assert!(!names.iter().any(|n| n.starts_with("b-b-1")), "{names:?}");
    for n in ["b-a-1", "b-a-1.plan", "b-c-1", "b-d-1"] {
        assert!(names.iter().any(|x| x == n), "{n} evicted: {names:?}");
    }
    // The entry just written stays even when it alone exceeds the bound.
    let c = c.with_max_bytes(1);
    assert!(c.write("b-e-1", &block));
    let names: Vec<String> = c.entries().into_iter().map(|f| f.name).collect();
    assert_eq!(names, ["b-e-1"]);
}

#[test]
fn concurrent_writers_and_vanishing_files() {
    const LIMIT: u64 = 256 << 10;
    let base = scratch("concurrent");
    let dir = base.join("cache");
    CacheDir::open_at(&dir).unwrap();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let dir = dir.clone();
            std::thread::spawn(move || {
                // Each its own descriptor, as separate processes have: flock excludes.
                let c = CacheDir::open_at(&dir).unwrap().with_max_bytes(LIMIT);
                for i in 0..100 {
                    // A clear by another thread may remove this write's temporary
                    // before its rename: then the write fails, harmlessly.
                    let _ = c.write(&format!("b-{t}-{i:03}"), &[t as u8; 12 << 10]);
                    if i % 10 == 0 {
                        c.clear(); // files vanish under the other threads' eviction
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // A writer that found the lock taken skipped eviction; the next write catches up.
    let c = CacheDir::open_at(&dir).unwrap().with_max_bytes(LIMIT);
    assert!(c.write("b-last-1", b"x"));
    assert!(du(&dir) <= LIMIT);
    let leftovers = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp."))
        .count();
    assert_eq!(leftovers, 0);
}

/// A small real ELF to analyse.
fn small_elf() -> &'static Path {
    ["/bin/true", "/usr/bin/true", "/usr/bin/env"]
        .iter()
        .map(Path::new)
        .find(|p| p.exists())
        .expect("a small ELF such as /bin/true")
}

fn analyze_tool(args: &[&str], cache: &Path) -> Output {
    Command::new(BIN)
        .args(args)
        .env("LGMALLOC_CACHE_DIR", cache)
        // The tool's own start-up plan would add entries for the tool itself.
        .env("LGMALLOC_PREDICT", "0")
        .env_remove("LGMALLOC_CACHE_MAX_MB")
        .output()
        .expect("run lgmalloc-analyze")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn planted_entry_with_out_of_range_values_is_rejected() {
    let base = scratch("planted");
    let dir = base.join("cache");
    let elf = small_elf().to_str().unwrap();
    let first = analyze_tool(&["--json", elf], &dir);
    assert!(first.status.success(), "{}", text(&first.stderr));
    assert!(text(&first.stdout).contains("\"cached\":false"));
    let c = CacheDir::open_at(&dir).unwrap();
    let entry = c
        .entries()
        .into_iter()
        .find(|f| !f.name.contains('.'))
        .expect("the analysis entry")
        .name;
    let good = c.load_analysis(&entry).expect("a valid entry loads");
    let second = analyze_tool(&["--json", elf], &dir);
    assert!(text(&second.stdout).contains("\"cached\":true"));

    // Plant values no analysis produces, each in an entry with a correct checksum.
    let plants: [fn(&mut lgmalloc::analysis::Analysis); 4] = [
        |a| a.text_bytes = u64::MAX,
        |a| a.build_id = Some(vec![0; 4096]),
        |a| {
            if let Some(s) = a.call_sites.first_mut() {
                s.confidence = f32::NAN;
            } else {
                a.pie = !a.pie;
                a.text_bytes = 1 << 60;
            }
        },
        |a| {
            if let Some(s) = a.call_sites.first_mut() {
                s.callee = u32::MAX;
            } else {
                a.text_bytes = 1 << 60;
            }
        },
    ];
    for (i, plant) in plants.iter().enumerate() {
        let mut bad = good.clone();
        plant(&mut bad);
        let bytes = encode_analysis(&bad);
        assert!(decode_analysis(&bytes).is_err(), "plant {i} decoded");
        std::fs::write(dir.join(&entry), &bytes).unwrap();
        assert_eq!(c.load_analysis(&entry), None, "plant {i} used");
        // Through the tool: ignored with one verbose line, re-analysed and overwritten.
        let out = Command::new(BIN)
            .args(["--json", elf])
            .env("LGMALLOC_CACHE_DIR", &dir)
            .env("LGMALLOC_PREDICT", "0")
            .env("LGMALLOC_VERBOSE", "1")
            .output()
            .unwrap();
        assert!(text(&out.stdout).contains("\"cached\":false"), "plant {i}");
        let stderr = text(&out.stderr);
        assert_eq!(stderr.matches("ignored").count(), 1, "plant {i}: {stderr}");
        assert_eq!(
            c.load_analysis(&entry).as_ref(),
            Some(&good),
            "not overwritten"
        );
    }
    // Garbage and truncations of a valid entry are rejected too.
    let bytes = encode_analysis(&good);
    for n in 0..bytes.len() {
        assert!(decode_analysis(&bytes[..n]).is_err());
    }
    assert!(decode_analysis(b"LGMACACH\x02\0\0\0\xff\xff\xff\xff\xff\xff\xff\xff").is_err());
}

#[test]
fn cache_list_and_clear() {
    let base = scratch("list");
    let dir = base.join("cache");
    let c = CacheDir::open_at(&dir).unwrap();
    for name in [
        "b-00aa-100",
        "b-00aa-100.plan",
        "b-00aa-100.static-plan",
        "b-00aa-100.learned",
        "i-1-2-3-4.5",
        "i-1-2-3-4.plan",
    ] {
        assert!(c.write(name, name.as_bytes()));
    }
    std::fs::write(dir.join("b-00bb-1.tmp.123.456"), b"stale").unwrap();
    std::fs::write(dir.join("README"), b"mine").unwrap();
    std::fs::create_dir(dir.join("subdir")).unwrap();
    let victim = base.join("victim");
    std::fs::write(&victim, b"keep").unwrap();
    symlink(&victim, dir.join("b-link-1")).unwrap();
    age(&dir.join("i-1-2-3-4.5"), 7200);

    let out = analyze_tool(&["--cache-list"], &dir);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    assert!(table.contains("7 files"), "{table}");
    for name in [
        "b-00aa-100.static-plan",
        "i-1-2-3-4.5",
        "b-00bb-1.tmp.123.456",
    ] {
        assert!(table.contains(name), "{name} not listed:\n{table}");
    }
    assert!(!table.contains("README") && !table.contains("b-link-1"));
    // Most recent first: the aged entry is last.
    assert!(table.trim_end().ends_with("i-1-2-3-4.5"), "{table}");

    let out = analyze_tool(&["--cache-list", "--json"], &dir);
    let json = text(&out.stdout);
    assert!(json.starts_with("{\"dir\":"), "{json}");
    assert!(json.contains("\"name\":\"b-00aa-100.plan\""), "{json}");
    assert_eq!(json.matches("\"name\":").count(), 7);

    let out = analyze_tool(&["--cache-clear"], &dir);
    assert!(out.status.success());
    assert!(
        text(&out.stdout).contains("removed 9 files"),
        "{}",
        text(&out.stdout)
    );
    let mut left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["README", "subdir"]);
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep");

    // A directory that may not be used is reported, not listed.
    chmod(&dir, 0o777);
    let out = analyze_tool(&["--cache-list"], &dir);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("writable by group or others"));
    chmod(&dir, 0o700);
    let out = analyze_tool(&["--cache-list", "extra"], &dir);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn secure_execution_ignores_the_environment() {
    if !is_root() {
        eprintln!(
            "secure_execution_ignores_the_environment: skipped (needs root for a setuid copy)"
        );
        return;
    }
    let base = scratch("secure");
    let dir = base.join("cache");
    CacheDir::open_at(&dir).unwrap();
    // A setuid copy of the tool owned by another user: the kernel runs it with
    // AT_SECURE set, as it would a setuid program.
    let tool = base.join("lgmalloc-analyze-setuid");
    std::fs::copy(BIN, &tool).unwrap();
    chown(&tool, NOBODY);
    chmod(&tool, 0o4755);
    let run = |args: &[&str]| {
        Command::new(&tool)
            .args(args)
            .env("LGMALLOC_CACHE_DIR", &dir)
            .env("LGMALLOC_VERBOSE", "1")
            .output()
            .unwrap()
    };
    let out = run(&[small_elf().to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(du(&dir) == own_blocks(&dir) && CacheDir::open_at(&dir).unwrap().entries().is_empty());
    if !Path::new("/var/cache/lgmalloc").exists() {
        let out = run(&["--cache-list"]);
        assert!(!out.status.success());
        assert!(
            text(&out.stderr).contains("no cache directory"),
            "{}",
            text(&out.stderr)
        );
    }
}
