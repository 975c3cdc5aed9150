//! Tests of the call-site analysis (`lgmalloc::analysis`) and of `lgmalloc-analyze`.
//!
//! The fixtures in `rust-tests/fixtures/analysis` are compiled at test time with gcc,
//! g++ and rustc in several configurations. Their function names say what the analysis
//! must find (`k<N>_*`: every allocation site requests exactly N bytes; `d_*`: sizes
//! depend on data; `w_*`: wrappers). Sites are attributed to functions with the
//! fixture's own symbol table and checked against `objdump -d`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use goblin::elf::Elf;
use lgmalloc::analysis::{
    Analysis, AnalysisError, ArgReg, CallSite, SizeArg, analyze_elf, analyze_elf_within,
    analyze_path_within,
};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/rust-tests/fixtures/analysis");
const BIN: &str = env!("CARGO_BIN_EXE_lgmalloc-analyze");

/// One compiled fixture.
struct Fixture {
    name: &'static str,
    path: PathBuf,
    /// Built with optimisation: wrappers pass their argument in registers.
    optimized: bool,
    /// Has a symbol table (not stripped).
    symbols: bool,
    bytes: Vec<u8>,
}

/// `(name, compiler, source, flags)`
const BUILDS: &[(&str, &str, &str, &[&str])] = &[
    ("c-O0", "gcc", "sizes.c", &["-O0"]),
    ("c-O2", "gcc", "sizes.c", &["-O2"]),
    ("c-O2-stripped", "gcc", "sizes.c", &["-O2", "-s"]),
    ("c-O2-nopie", "gcc", "sizes.c", &["-O2", "-no-pie"]),
    ("c-O2-noplt", "gcc", "sizes.c", &["-O2", "-fno-plt"]),
    ("c-O2-static", "gcc", "sizes.c", &["-O2", "-static"]),
    (
        "c-O2-cet",
        "gcc",
        "sizes.c",
        &["-O2", "-fcf-protection=full"],
    ),
    (
        "c-O1-cet-noplt",
        "gcc",
        "sizes.c",
        &["-O1", "-fcf-protection", "-fno-plt", "-no-pie"],
    ),
    ("c-O3", "gcc", "sizes.c", &["-O3"]),
    ("cpp-O0", "g++", "new.cpp", &["-O0"]),
    ("cpp-O2", "g++", "new.cpp", &["-O2"]),
    ("cpp-O2-static", "g++", "new.cpp", &["-O2", "-static"]),
    ("rust-O", "rustc", "alloc.rs", &["-O", "--edition", "2021"]),
];

fn work_dir() -> PathBuf {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("analysis-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create the fixture directory");
    dir
}

/// Removes the fixture directories of earlier test processes that have exited.
fn remove_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(env!("CARGO_TARGET_TMPDIR")) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("analysis-")) else {
            continue;
        };
        let alive = Path::new("/proc").join(pid).exists();
        if !alive && pid.parse::<u32>().is_ok_and(|p| p != std::process::id()) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Compiles every fixture once (in parallel) for all tests of this binary.
fn fixtures() -> &'static [Fixture] {
    static ALL: OnceLock<Vec<Fixture>> = OnceLock::new();
    ALL.get_or_init(|| {
        remove_stale_dirs();
        let dir = work_dir();
        let children: Vec<_> = BUILDS
            .iter()
            .map(|&(name, cc, src, flags)| {
                let out = dir.join(name);
                let child = Command::new(cc)
                    .args(flags)
                    .arg("-o")
                    .arg(&out)
                    .arg(Path::new(FIXTURES).join(src))
                    .spawn()
                    .unwrap_or_else(|e| panic!("{cc} is needed to build the fixtures: {e}"));
                (name, flags, out, child)
            })
            .collect();
        children
            .into_iter()
            .map(|(name, flags, path, mut child)| {
                let status = child.wait().expect("wait for the compiler");
                assert!(status.success(), "building fixture {name} failed");
                let bytes = std::fs::read(&path).expect("read fixture");
                Fixture {
                    name,
                    path,
                    optimized: !flags.contains(&"-O0"),
                    symbols: !flags.contains(&"-s"),
                    bytes,
                }
            })
            .collect()
    })
}

fn fixture(name: &str) -> &'static Fixture {
    fixtures()
        .iter()
        .find(|f| f.name == name)
        .expect("known fixture")
}

fn analyze(f: &Fixture) -> Analysis {
    analyze_elf(&f.bytes).unwrap_or_else(|e| panic!("{}: {e}", f.name))
}

/// `(start, end, name)` of the fixture's function symbols.
fn functions(f: &Fixture) -> Vec<(u64, u64, String)> {
    let elf = Elf::parse(&f.bytes).expect("goblin parses the fixture");
    elf.syms
        .iter()
        .filter(|s| s.is_function() && s.st_size > 0)
        .filter_map(|s| {
            let name = elf.strtab.get_at(s.st_name)?.to_string();
            Some((s.st_value, s.st_value + s.st_size, name))
        })
        .collect()
}

fn function_of(funcs: &[(u64, u64, String)], addr: u64) -> Option<&str> {
    funcs
        .iter()
        .find(|(s, e, _)| addr >= *s && addr < *e)
        .map(|(_, _, n)| n.as_str())
}

/// The constant a `k<N>_...` name promises.
fn promised(name: &str) -> Option<u64> {
    let rest = name.strip_prefix('k')?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    if digits.is_empty() || !rest[digits.len()..].starts_with('_') {
        return None;
    }
    digits.parse().ok()
}

/// Sites grouped by the function containing them.
fn sites_by_function<'a>(
    a: &'a Analysis,
    funcs: &[(u64, u64, String)],
) -> HashMap<String, Vec<&'a CallSite>> {
    let mut by: HashMap<String, Vec<&CallSite>> = HashMap::new();
    for s in &a.call_sites {
        if let Some(f) = function_of(funcs, s.site) {
            by.entry(f.to_string()).or_default().push(s);
        }
    }
    by
}

/// Constant sites found with the exact size over those expected; panics on any wrong
/// constant or any constant at a data-dependent site.
fn check_fixture(f: &Fixture) -> (usize, usize) {
    let a = analyze(f);
    let funcs = functions(f);
    let by = sites_by_function(&a, &funcs);
    let (mut expected, mut exact) = (0, 0);
    for (_, _, name) in &funcs {
        let sites = by.get(name).map(Vec::as_slice).unwrap_or_default();
        if let Some(n) = promised(name) {
            for s in sites {
                assert!(
                    s.size.is_none_or(|z| z == n),
                    "{}: {name}: site {:#x} predicted {:?}, not {n}",
                    f.name,
                    s.site,
                    s.size
                );
                assert!((0.0..=1.0).contains(&s.confidence));
            }
            // At -O0 a wrapper spills its argument to the stack: not a wrapper then.
            let needs_wrapper = name.contains("xmalloc") || name.contains("xcalloc");
            if f.optimized || !needs_wrapper {
                expected += 1;
                if !sites.is_empty() && sites.iter().all(|s| s.size == Some(n)) {
                    exact += 1;
                } else {
                    eprintln!("{}: {name}: no exact constant ({sites:?})", f.name);
                }
            }
        }
        if name.starts_with("d_") {
            for s in sites {
                assert_eq!(
                    s.size, None,
                    "{}: {name}: data-dependent site {:#x} got a constant",
                    f.name, s.site
                );
                assert_eq!(s.confidence, 0.0);
            }
        }
    }
    (exact, expected)
}

#[test]
fn constant_sites_are_found_and_exact() {
    for f in fixtures().iter().filter(|f| f.symbols) {
        let (exact, expected) = check_fixture(f);
        let min = if f.name.starts_with("rust") { 3 } else { 5 };
        assert!(expected >= min, "{}: fixture lost its k_ functions", f.name);
        assert!(
            exact * 100 >= expected * 95,
            "{}: recall {exact}/{expected} < 95%",
            f.name
        );
    }
}

#[test]
fn sites_are_call_instructions_of_the_callee() {
    for name in [
        "c-O2",
        "c-O2-nopie",
        "c-O2-noplt",
        "c-O2-cet",
        "c-O1-cet-noplt",
        "cpp-O2",
    ] {
        let f = fixture(name);
        let a = analyze(f);
        let out = Command::new("objdump")
            .arg("-d")
            .arg("--no-show-raw-insn")
            .arg(&f.path)
            .output()
            .expect("objdump");
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: HashMap<u64, &str> = text
            .lines()
            .filter_map(|l| {
                let (addr, rest) = l.split_once(":\t")?;
                Some((u64::from_str_radix(addr.trim(), 16).ok()?, rest))
            })
            .collect();
        assert!(
            a.call_sites.len() >= 9,
            "{name}: only {} sites",
            a.call_sites.len()
        );
        for s in &a.call_sites {
            let line = lines
                .get(&s.site)
                .unwrap_or_else(|| panic!("{name}: {:#x} is not an instruction", s.site));
            let callee = &a.callee(s).expect("callee index").name;
            let mnemonic = line.split_whitespace().next().unwrap_or("");
            let is_jump = mnemonic.starts_with("jmp") || line.contains("bnd jmp");
            assert!(
                mnemonic.starts_with("call") || is_jump,
                "{name}: {:#x}: {line}",
                s.site
            );
            assert_eq!(s.tail, is_jump, "{name}: {:#x}: {line}", s.site);
            assert!(
                line.contains(callee.as_str()),
                "{name}: {:#x} calls {callee}? {line}",
                s.site
            );
        }
    }
}

#[test]
fn call_forms() {
    // -fno-plt: `call *malloc@GOTPCREL(%rip)`, six bytes.
    let a = analyze(fixture("c-O2-noplt"));
    assert!(
        a.call_sites
            .iter()
            .filter(|s| !s.via_wrapper)
            .all(|s| s.len == 6)
    );
    // PLT calls are five bytes; the tail call `jmp malloc@plt` in k64_tail.
    let f = fixture("c-O2");
    let a = analyze(f);
    let funcs = functions(f);
    let by = sites_by_function(&a, &funcs);
    let tail = by.get("k64_tail").expect("k64_tail has a site");
    assert!(
        tail.iter().all(|s| s.tail && s.size == Some(64)),
        "{tail:?}"
    );
    let plain = by.get("k72_malloc").expect("k72_malloc has a site");
    assert!(
        plain
            .iter()
            .all(|s| !s.tail && s.len == 5 && s.confidence >= 0.9)
    );
    // With IBT the calls go to .plt.sec stubs.
    let a = analyze(fixture("c-O2-cet"));
    let malloc = a
        .callees
        .iter()
        .find(|c| c.name == "malloc")
        .expect("malloc found");
    assert_ne!(malloc.addr, 0);
}

#[test]
fn stripped_binary_gives_the_same_sites() {
    let full = analyze(fixture("c-O2"));
    let stripped = analyze(fixture("c-O2-stripped"));
    let key = |a: &Analysis| {
        a.call_sites
            .iter()
            .map(|s| (s.site, s.size, s.tail))
            .collect::<Vec<_>>()
    };
    assert_eq!(key(&full), key(&stripped));
    assert_eq!(full.size_classes, stripped.size_classes);
    assert!(stripped.wrappers().all(|w| w.name.starts_with("fn_0x")));
}

#[test]
fn wrappers_are_promoted() {
    for name in [
        "c-O2",
        "c-O2-nopie",
        "c-O2-noplt",
        "c-O2-static",
        "c-O2-cet",
        "c-O3",
    ] {
        let a = analyze(fixture(name));
        let w = |n: &str| {
            a.wrappers()
                .find(|w| w.name == n)
                .unwrap_or_else(|| panic!("{name}: wrapper {n} missing"))
        };
        let x = w("w_xmalloc");
        assert_eq!(x.arg, SizeArg::Reg(ArgReg::Rdi));
        assert_eq!(x.depth, 1);
        assert_eq!(x.zero_to, Some(1), "{name}: n ? n : 1");
        assert_eq!(a.callees[x.wraps.unwrap() as usize].name, "malloc");
        let c = w("w_xcalloc");
        assert_eq!(c.arg, SizeArg::Product(ArgReg::Rdi, ArgReg::Rsi));
        let xx = w("w_xxmalloc");
        assert_eq!(xx.depth, 2);
        assert_eq!(a.callees[xx.wraps.unwrap() as usize].name, "w_xmalloc");
        // Sites calling wrappers carry the wrapper's argument as the size.
        let via: Vec<_> = a
            .call_sites
            .iter()
            .filter(|s| s.via_wrapper && s.size.is_some())
            .collect();
        for want in [56, 120, 200] {
            assert!(
                via.iter().any(|s| s.size == Some(want)),
                "{name}: no wrapper site of {want}"
            );
        }
        assert!(
            via.iter().all(|s| s.confidence < 0.9),
            "{name}: wrapper sites are less certain"
        );
        // The wrappers' own calls, and only they, lie in a wrapper: a sampled stack
        // looks past their frames to the program's call site.
        assert!(via.iter().all(|s| !s.in_wrapper), "{name}");
        let inside: Vec<_> = a.call_sites.iter().filter(|s| s.in_wrapper).collect();
        for w in [x, c, xx] {
            // The fixture's wrappers are a few instructions long.
            assert!(
                inside
                    .iter()
                    .any(|s| s.site >= w.addr && s.site - w.addr < 64),
                "{name}: no site in {}",
                w.name
            );
        }
        // Functions that are no wrapper: the constant sites.
        assert!(
            a.call_sites
                .iter()
                .filter(|s| s.size.is_some())
                .all(|s| !s.in_wrapper),
            "{name}"
        );
        for ret in a.wrapper_returns() {
            assert!(
                inside
                    .iter()
                    .any(|s| !s.tail && s.site + u64::from(s.len) == ret)
            );
        }
    }
    // Unoptimised code spills the argument: no false wrapper, and still no wrong size.
    assert!(analyze(fixture("c-O0")).wrappers().next().is_none());
}

#[test]
fn cpp_operator_new_variants() {
    for name in ["cpp-O0", "cpp-O2", "cpp-O2-static"] {
        let a = analyze(fixture(name));
        for callee in [
            "_Znwm",
            "_Znam",
            "_ZnamRKSt9nothrow_t",
            "_ZnwmSt11align_val_t",
            "_ZnamSt11align_val_t",
        ] {
            assert!(
                a.call_sites
                    .iter()
                    .any(|s| a.callee(s).is_some_and(|c| c.name == callee)),
                "{name}: no call to {callee}"
            );
        }
        let sizes: Vec<u64> = a.call_sites.iter().filter_map(|s| s.size).collect();
        for want in [40, 800, 48, 64, 192] {
            assert!(
                sizes.contains(&want),
                "{name}: size {want} missing from {sizes:?}"
            );
        }
        // A statically linked `operator new` is the file's own allocation function: its
        // call to `malloc` lies in a wrapper, so a sampled stack (and verify mode) looks
        // past it to the `new` expression, whose size means something.
        if name.ends_with("static") {
            let funcs = functions(fixture(name));
            let inside_new: Vec<_> = a
                .call_sites
                .iter()
                .filter(|s| function_of(&funcs, s.site) == Some("_Znwm"))
                .collect();
            assert!(!inside_new.is_empty(), "{name}: no call in _Znwm");
            let returns = a.wrapper_returns();
            for s in inside_new {
                assert!(s.in_wrapper, "{name}: {:#x} in _Znwm", s.site);
                assert!(
                    s.tail || returns.contains(&(s.site + u64::from(s.len))),
                    "{name}: {:#x} in _Znwm is no wrapper return",
                    s.site
                );
            }
        }
    }
}

#[test]
fn rust_allocations() {
    let f = fixture("rust-O");
    let a = analyze(f);
    let funcs = functions(f);
    let by = sites_by_function(&a, &funcs);
    let boxed = by.get("k48_box").expect("a site in k48_box");
    assert!(boxed.iter().all(|s| s.size == Some(48)), "{boxed:?}");
    let callee = a.callee(boxed[0]).unwrap();
    assert!(
        callee.name.contains("rust_alloc") || callee.name == "malloc",
        "{}",
        callee.name
    );
    assert!(
        by.get("d_vec")
            .is_none_or(|v| v.iter().all(|s| s.size.is_none()))
    );
    assert!(
        a.wrappers().any(|w| w.name.contains("__rdl_alloc")),
        "__rdl_alloc -> malloc is a wrapper"
    );
    assert!(
        a.size_classes
            .iter()
            .any(|c| c.size == 48 && c.sites >= 1 && c.confidence > 0.5)
    );
}

#[test]
fn predicted_sizes_ascend_and_count_sites() {
    let a = analyze(fixture("c-O2"));
    assert_eq!(a.predicted_sizes(), a.size_classes.as_slice());
    assert!(
        a.predicted_sizes()
            .windows(2)
            .all(|w| w[0].size < w[1].size)
    );
    let forty = a
        .predicted_sizes()
        .iter()
        .find(|c| c.size == 40)
        .expect("two sites of 40");
    assert_eq!(forty.sites, 2);
    let one = a
        .call_sites
        .iter()
        .find(|s| s.size == Some(40))
        .unwrap()
        .confidence;
    assert!(forty.confidence > one && forty.confidence <= 0.99);
    let total: u32 = a.predicted_sizes().iter().map(|c| c.sites).sum();
    assert_eq!(
        total as usize,
        a.call_sites.iter().filter(|s| s.size.is_some()).count()
    );
}

// ------------------------------------------------------------------ bad input

fn patched(base: &[u8], at: usize, with: &[u8]) -> Vec<u8> {
    let mut b = base.to_vec();
    b[at..at + with.len()].copy_from_slice(with);
    b
}

#[test]
fn budget_stops_the_analysis() {
    use std::time::Duration;
    // The test binary itself: several MiB of code, many allocation sites.
    let exe = std::env::current_exe().unwrap();
    let bytes = std::fs::read(&exe).unwrap();
    assert_eq!(
        analyze_elf_within(&bytes, Duration::from_nanos(1)),
        Err(AnalysisError::BudgetExceeded)
    );
    assert_eq!(
        analyze_path_within(&exe, false, Duration::from_nanos(1)),
        Err(AnalysisError::BudgetExceeded)
    );
    assert!(!AnalysisError::BudgetExceeded.to_string().is_empty());
    let full = analyze_elf(&bytes).unwrap();
    assert!(!full.call_sites.is_empty());
    let generous = Duration::from_secs(600);
    assert_eq!(analyze_elf_within(&bytes, generous).as_ref(), Ok(&full));
    assert_eq!(
        analyze_path_within(&exe, false, generous).as_ref(),
        Ok(&full)
    );
}

#[test]
fn bad_inputs_are_errors() {
    let good = &fixture("c-O2").bytes;
    assert_eq!(analyze_elf(b""), Err(AnalysisError::NotElf));
    assert_eq!(
        analyze_elf(b"#!/bin/sh\necho hi\n"),
        Err(AnalysisError::NotElf)
    );
    assert!(matches!(
        analyze_elf(&good[..40]),
        Err(AnalysisError::Truncated(_))
    ));
    assert!(matches!(
        analyze_elf(&good[..good.len() / 2]),
        Err(AnalysisError::Truncated(_))
    ));
    assert!(matches!(
        analyze_elf(&patched(good, 4, &[1])),
        Err(AnalysisError::Unsupported(_))
    ));
    assert!(matches!(
        analyze_elf(&patched(good, 5, &[2])),
        Err(AnalysisError::Unsupported(_))
    ));
    assert_eq!(
        analyze_elf(&patched(good, 18, &183u16.to_le_bytes())),
        Err(AnalysisError::WrongArch(183))
    );
    assert!(matches!(
        analyze_elf(&patched(good, 16, &1u16.to_le_bytes())),
        Err(AnalysisError::Unsupported(_))
    ));
    // e_shoff and e_phoff far outside the file.
    assert!(analyze_elf(&patched(good, 0x28, &u64::MAX.to_le_bytes())).is_err());
    assert!(analyze_elf(&patched(good, 0x20, &(1u64 << 40).to_le_bytes())).is_err());
    for e in [
        AnalysisError::NotElf,
        AnalysisError::WrongArch(183),
        AnalysisError::Truncated("x"),
    ] {
        assert!(!e.to_string().is_empty());
    }
    assert!(
        AnalysisError::WrongArch(183)
            .to_string()
            .contains("aarch64")
    );
}

/// xorshift64*: deterministic pseudo-random numbers.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Byte ranges worth corrupting: headers, program and section header tables, and the
/// tables the analysis reads (dynamic, symbols, relocations, .eh_frame_hdr).
fn hot_ranges(bytes: &[u8]) -> Vec<(usize, usize)> {
    let elf = Elf::parse(bytes).unwrap();
    let mut v = vec![(0, 64)];
    let ph = elf.header.e_phoff as usize;
    v.push((ph, ph + 56 * elf.header.e_phnum as usize));
    let sh = elf.header.e_shoff as usize;
    v.push((sh, sh + 64 * elf.header.e_shnum as usize));
    for s in &elf.section_headers {
        let name = elf.shdr_strtab.get_at(s.sh_name).unwrap_or("");
        if [
            ".dynamic",
            ".dynsym",
            ".dynstr",
            ".rela.dyn",
            ".rela.plt",
            ".eh_frame_hdr",
            ".eh_frame",
            ".symtab",
            ".plt",
            ".plt.sec",
        ]
        .contains(&name)
        {
            let start = s.sh_offset as usize;
            v.push((start, (start + s.sh_size as usize).min(bytes.len())));
        }
    }
    v
}

#[test]
fn mutated_files_never_panic() {
    for name in ["c-O2", "cpp-O2"] {
        let base = &fixture(name).bytes;
        let hot = hot_ranges(base);
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ base.len() as u64);
        let mut outcomes = [0usize; 2];
        for i in 0..1200 {
            let mut b = base.clone();
            for _ in 0..1 + rng.below(4) {
                let at = if i % 8 == 7 {
                    rng.below(b.len())
                } else {
                    let (s, e) = hot[rng.below(hot.len())];
                    s + rng.below(e - s)
                };
                let value = match rng.below(4) {
                    0 => !b[at],
                    1 => 0xff,
                    2 => 0,
                    _ => rng.next() as u8,
                };
                b[at] = value;
                // Sometimes a whole 8-byte field (offsets, sizes, addresses).
                if rng.below(3) == 0 && at + 8 <= b.len() {
                    b[at..at + 8].copy_from_slice(&rng.next().to_le_bytes());
                }
            }
            outcomes[usize::from(analyze_elf(&b).is_ok())] += 1;
        }
        for _ in 0..300 {
            let len = rng.below(base.len());
            outcomes[usize::from(analyze_elf(&base[..len]).is_ok())] += 1;
        }
        // Both kinds of outcome happen: the mutations reach the parser and past it.
        assert!(
            outcomes[0] > 100 && outcomes[1] > 100,
            "{name}: {outcomes:?}"
        );
    }
}

// ------------------------------------------------------------------ the binary

/// A minimal JSON parser, enough to check the tool's output structurally.
#[derive(Debug, Clone, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    fn get(&self, key: &str) -> &Json {
        match self {
            Json::Obj(m) => m
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v)
                .unwrap_or_else(|| panic!("no field {key}")),
            _ => panic!("not an object"),
        }
    }
    fn arr(&self) -> &[Json] {
        match self {
            Json::Arr(v) => v,
            _ => panic!("not an array: {self:?}"),
        }
    }
    fn str(&self) -> &str {
        match self {
            Json::Str(s) => s,
            _ => panic!("not a string: {self:?}"),
        }
    }
    fn num(&self) -> f64 {
        match self {
            Json::Num(n) => *n,
            _ => panic!("not a number: {self:?}"),
        }
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn parse(text: &str) -> Json {
        let mut p = Parser {
            s: text.as_bytes(),
            i: 0,
        };
        let v = p.value();
        p.ws();
        assert_eq!(p.i, p.s.len(), "trailing characters in JSON");
        v
    }
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }
    fn eat(&mut self, c: u8) {
        self.ws();
        assert_eq!(
            self.s.get(self.i),
            Some(&c),
            "expected {:?} at {}",
            c as char,
            self.i
        );
        self.i += 1;
    }
    fn value(&mut self) -> Json {
        self.ws();
        match self.s[self.i] {
            b'{' => {
                self.i += 1;
                let mut m = Vec::new();
                self.ws();
                if self.s[self.i] == b'}' {
                    self.i += 1;
                    return Json::Obj(m);
                }
                loop {
                    self.ws();
                    let Json::Str(k) = self.value() else {
                        panic!("key")
                    };
                    self.eat(b':');
                    m.push((k, self.value()));
                    self.ws();
                    self.i += 1;
                    match self.s[self.i - 1] {
                        b',' => continue,
                        b'}' => return Json::Obj(m),
                        c => panic!("unexpected {:?}", c as char),
                    }
                }
            }
            b'[' => {
                self.i += 1;
                let mut v = Vec::new();
                self.ws();
                if self.s[self.i] == b']' {
                    self.i += 1;
                    return Json::Arr(v);
                }
                loop {
                    v.push(self.value());
                    self.ws();
                    self.i += 1;
                    match self.s[self.i - 1] {
                        b',' => continue,
                        b']' => return Json::Arr(v),
                        c => panic!("unexpected {:?}", c as char),
                    }
                }
            }
            b'"' => {
                self.i += 1;
                let mut out = String::new();
                loop {
                    let c = self.s[self.i];
                    self.i += 1;
                    match c {
                        b'"' => return Json::Str(out),
                        b'\\' => {
                            let e = self.s[self.i];
                            self.i += 1;
                            match e {
                                b'"' | b'\\' | b'/' => out.push(e as char),
                                b'n' => out.push('\n'),
                                b't' => out.push('\t'),
                                b'r' => out.push('\r'),
                                b'u' => {
                                    let hex =
                                        std::str::from_utf8(&self.s[self.i..self.i + 4]).unwrap();
                                    out.push(
                                        char::from_u32(u32::from_str_radix(hex, 16).unwrap())
                                            .unwrap(),
                                    );
                                    self.i += 4;
                                }
                                _ => panic!("bad escape"),
                            }
                        }
                        c if c < 0x20 => panic!("raw control character in a JSON string"),
                        _ => {
                            let start = self.i - 1;
                            let len = std::str::from_utf8(&self.s[start..])
                                .map_or(1, |s| s.chars().next().unwrap().len_utf8());
                            out.push_str(std::str::from_utf8(&self.s[start..start + len]).unwrap());
                            self.i = start + len;
                        }
                    }
                }
            }
            b't' => self.word("true", Json::Bool(true)),
            b'f' => self.word("false", Json::Bool(false)),
            b'n' => self.word("null", Json::Null),
            _ => {
                let start = self.i;
                while self.i < self.s.len() && b"+-0123456789.eE".contains(&self.s[self.i]) {
                    self.i += 1;
                }
                Json::Num(
                    std::str::from_utf8(&self.s[start..self.i])
                        .unwrap()
                        .parse()
                        .expect("number"),
                )
            }
        }
    }
    fn word(&mut self, w: &str, v: Json) -> Json {
        assert!(self.s[self.i..].starts_with(w.as_bytes()));
        self.i += w.len();
        v
    }
}

/// Runs the analyzer with `cache` as its cache directory, or a fresh one of its own that
/// is removed afterwards (never `~/.cache/lgmalloc`). `LGMALLOC_PREDICT=0`: the
/// analyzer's own copy of lgmalloc does not plan the analyzer before `main`, so it
/// writes nothing of its own to the cache and defers no analysis to a child that
/// would outlive the test.
fn run(args: &[&str], cache: Option<&Path>) -> Output {
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let own = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "analyze-cache-{}-{}",
        std::process::id(),
        RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("LGMALLOC_PREDICT", "0")
        .env_remove("LGMALLOC_ANALYSIS_BUDGET_MS")
        .env_remove("LGMALLOC_LEARN");
    match cache {
        Some(dir) => cmd.env("LGMALLOC_CACHE_DIR", dir),
        None => {
            let _ = std::fs::remove_dir_all(&own);
            cmd.env("LGMALLOC_CACHE_DIR", &own)
        }
    };
    let out = cmd.output().expect("run lgmalloc-analyze");
    let _ = std::fs::remove_dir_all(&own);
    out
}

#[test]
fn json_output() {
    let f = fixture("c-O2");
    let out = run(&["--json", "--no-cache", f.path.to_str().unwrap()], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j = Parser::parse(&String::from_utf8(out.stdout).unwrap());
    let a = analyze(f);
    assert_eq!(j.get("path").str(), f.path.to_str().unwrap());
    let hex: String = a
        .build_id
        .as_ref()
        .unwrap()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(j.get("build_id").str(), hex);
    assert_eq!(j.get("text_bytes").num() as u64, a.text_bytes);
    assert!(j.get("analysis_us").num() >= 0.0);
    let sites = j.get("call_sites").arr();
    assert_eq!(sites.len(), a.call_sites.len());
    let funcs = functions(f);
    for (js, s) in sites.iter().zip(&a.call_sites) {
        assert_eq!(js.get("site").str(), format!("{:#x}", s.site));
        assert_eq!(js.get("callee").str(), a.callee(s).unwrap().name);
        match s.size {
            Some(z) => assert_eq!(js.get("size").num() as u64, z),
            None => assert_eq!(js.get("size"), &Json::Null),
        }
        let c = js.get("confidence").num();
        assert!((c - f64::from(s.confidence)).abs() < 0.001 && (0.0..=1.0).contains(&c));
        assert_eq!(js.get("via_wrapper"), &Json::Bool(s.via_wrapper));
    }
    let k72 = sites
        .iter()
        .find(|s| {
            function_of(
                &funcs,
                u64::from_str_radix(&s.get("site").str()[2..], 16).unwrap(),
            ) == Some("k72_malloc")
        })
        .expect("k72_malloc site in JSON");
    assert_eq!(k72.get("size").num(), 72.0);
    assert_eq!(k72.get("callee").str(), "malloc");
    let wrappers = j.get("wrappers").arr();
    assert!(
        wrappers
            .iter()
            .any(|w| w.get("name").str() == "w_xmalloc" && w.get("arg").str() == "rdi")
    );
    let classes = j.get("size_classes").arr();
    assert_eq!(classes.len(), a.size_classes.len());
    assert!(
        classes
            .iter()
            .any(|c| c.get("size").num() == 216.0 && c.get("sites").num() == 1.0)
    );
}

#[test]
fn json_escapes_paths() {
    let dir = work_dir();
    let odd = dir.join("odd \"name\"\\\t.elf");
    std::fs::copy(&fixture("c-O2").path, &odd).unwrap();
    let out = run(&["--json", "--no-cache", odd.to_str().unwrap()], None);
    assert!(out.status.success());
    let j = Parser::parse(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(j.get("path").str(), odd.to_str().unwrap());
}

#[test]
fn errors_and_usage() {
    let dir = work_dir();
    let text = dir.join("not-elf.txt");
    std::fs::write(&text, "hello\n").unwrap();
    let out = run(&[text.to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "lgmalloc-analyze: {}: not an ELF file",
            text.display()
        )),
        "{err}"
    );

    let missing = dir.join("does-not-exist");
    let out = run(&[missing.to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(1));

    // A good and a bad file: JSON array with the good one, exit 1.
    let good = fixture("c-O2").path.to_str().unwrap();
    let out = run(
        &["--json", "--no-cache", good, text.to_str().unwrap()],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    let j = Parser::parse(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(j.arr().len(), 1);

    let out = run(&[good], Some(&dir.join("cache-table")));
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("malloc") && table.contains("w_xmalloc") && table.contains("analysed in"),
        "{table}"
    );

    assert_eq!(run(&[], None).status.code(), Some(2));
    assert_eq!(run(&["--frobnicate", good], None).status.code(), Some(2));
    let help = run(&["--help"], None);
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).contains("usage: lgmalloc-analyze"));
}

#[test]
fn cache_round_trip() {
    let cache = work_dir().join("cache");
    let _ = std::fs::remove_dir_all(&cache);
    let f = fixture("cpp-O2");
    let path = f.path.to_str().unwrap();
    let first =
        Parser::parse(&String::from_utf8(run(&["--json", path], Some(&cache)).stdout).unwrap());
    assert_eq!(first.get("cached"), &Json::Bool(false));
    // Keyed by build-id; written by rename, so no temporary file is left. (The tool's
    // own start-up plan may add entries for the tool itself.)
    let id = first.get("build_id").str().to_string();
    let entries: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.to_string_lossy().contains(".tmp"))
        .filter(|p| p.file_name().unwrap().to_str().unwrap().contains(&id))
        .collect();
    assert_eq!(entries.len(), 1, "one entry for the fixture: {entries:?}");
    assert!(
        entries[0]
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with(&format!("b-{id}-"))
    );
    let leftovers = std::fs::read_dir(&cache)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .to_string_lossy()
                .contains(".tmp.")
        })
        .count();
    assert_eq!(leftovers, 0);
    if let Some(entry) = lgmalloc::analysis::cache_entry(&f.path) {
        assert_eq!(
            entry.file_name(),
            entries[0].file_name(),
            "same key in any cache directory"
        );
    }
    let second =
        Parser::parse(&String::from_utf8(run(&["--json", path], Some(&cache)).stdout).unwrap());
    assert_eq!(second.get("cached"), &Json::Bool(true));
    assert_eq!(first.get("call_sites"), second.get("call_sites"));
    assert_eq!(first.get("wrappers"), second.get("wrappers"));
    assert_eq!(first.get("size_classes"), second.get("size_classes"));
    // A corrupt entry is ignored and replaced.
    let mut data = std::fs::read(&entries[0]).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0x55;
    std::fs::write(&entries[0], &data).unwrap();
    let third =
        Parser::parse(&String::from_utf8(run(&["--json", path], Some(&cache)).stdout).unwrap());
    assert_eq!(third.get("cached"), &Json::Bool(false));
    assert_eq!(first.get("call_sites"), third.get("call_sites"));
    let fourth =
        Parser::parse(&String::from_utf8(run(&["--json", path], Some(&cache)).stdout).unwrap());
    assert_eq!(fourth.get("cached"), &Json::Bool(true));
    // --no-cache neither reads nor writes.
    let fresh = Parser::parse(
        &String::from_utf8(run(&["--json", "--no-cache", path], Some(&cache)).stdout).unwrap(),
    );
    assert_eq!(fresh.get("cached"), &Json::Bool(false));
}
