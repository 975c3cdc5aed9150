//! The sampled allocation profile across runs: this run's samples (`sample`) resolved
//! to call sites as module + offset (stable under ASLR), merged at exit into the
//! program's stored profile (`<entry>.profile` beside its analysis cache entry, keyed
//! by build-id like every cache file), bounded to [`MAX_FILE_BYTES`].
//!
//! The file is untrusted input like the plan (see `store`): every value is checked
//! against what lgmalloc could have written, and a file that fails is ignored whole with
//! one `LGMALLOC_VERBOSE` line.

use core::fmt::Write;
use core::sync::atomic::{AtomicPtr, Ordering};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::modules::{code_range, executable_path, for_each_module};
use super::store::MAX_FILE_BYTES;
use crate::analysis::cache_dir::{self, CacheDir};
use crate::analysis::symbols::{Symbols, is_allocator_frame};
use crate::diag::diag;
use crate::sample;
use crate::size_class::{self, MAX_SMALL_SIZE};

/// Why a stored profile was refused.
pub type Refusal = &'static str;

const HEADER: &str = "lgmalloc-profile 3";
/// Modules a profile may name.
const MAX_MODULES: usize = 256;
/// Call sites a profile keeps: half of them the ones with the most sampled bytes (what
/// the plan's classes are shaped by), the rest the ones with the most estimated calls
/// (the many small requests that bytes alone would crowd out).
pub const MAX_SITES: usize = 400;
/// A site's most frequent standard class is its prediction when it held at least
/// [`MODAL_MIN_SHARE_PERCENT`] of the site's estimated calls over at least this many
/// samples (the share is an estimate: with 8, python3's learned sites were 88.6% exact
/// in the ablation at 33be360, below the 90% a prediction is held to).
pub const MODAL_MIN_SAMPLES: u64 = 32;
pub const MODAL_MIN_SHARE_PERCENT: u64 = 80;
/// A site whose samples all asked for one size predicts that size after this many.
/// Sampling is per byte, so a site's large requests are what its few samples see: the
/// dynamic loader's one allocation site (requests of 6 to 31,720 bytes, 12% of
/// python3's calls) was sampled twice at 20,480 bytes in 11 runs and learned as
/// constant, which made python3's predicted calls 43% exact. With 8, cc1plus's
/// predicted share moves from 54.6% to 53.7% and python3's calls are all exact.
pub const CONSTANT_MIN_SAMPLES: u64 = 8;
/// Once a profile holds [`SETTLED_RUNS`] runs, a run that took fewer samples than this
/// (under 4 MiB allocated) is not merged: it adds little, and an interpreter started
/// for one line should not pay a merge and a write (about 100k instructions) at every
/// exit. Larger runs are always merged.
pub const MIN_SAMPLES_TO_MERGE: u64 = 16;
pub const SETTLED_RUNS: u64 = 8;

/// One call site and what its samples saw, over all runs stored.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProfileSite {
    /// Index into [`Profile::modules`].
    pub module: usize,
    /// Return address of the call, as an offset from the module's load address (a
    /// link-time address for executables and shared objects).
    pub offset: u64,
    pub samples: u64,
    /// Samples followed to their free (`sample::FOLLOW_BYTES`): `freed` and the
    /// lifetimes count these only.
    pub followed: u64,
    /// Bytes requested by the sampled calls.
    pub bytes: u64,
    pub size_min: u64,
    pub size_max: u64,
    /// Largest alignment asked for.
    pub align: u64,
    /// Threads seen allocating here: 1, or 2 for several.
    pub threads: u64,
    /// Followed blocks freed before exit, their total and longest lifetime.
    pub freed: u64,
    pub lifetime_ns: u64,
    pub lifetime_max_ns: u64,
    /// Estimated calls (each sample of `size` bytes stands for `interval / size`).
    pub calls: u64,
    /// The standard block size that held the most estimated calls (0: none), and those
    /// calls. Across runs a different mode replaces the stored one only when it held
    /// more calls, and the other's calls stay in `calls` alone, so the share never
    /// grows by merging.
    pub mode_size: u64,
    pub mode_calls: u64,
}

/// What a profiled site predicts: a size it always asked for, or the standard class
/// most of its calls fell in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SitePrediction {
    Constant(u64),
    Modal(u64),
}

impl ProfileSite {
    /// The site's prediction, if its samples make one (see [`MODAL_MIN_SAMPLES`]).
    pub fn prediction(&self) -> Option<SitePrediction> {
        if self.size_min == self.size_max && self.samples >= CONSTANT_MIN_SAMPLES {
            return Some(SitePrediction::Constant(self.size_min));
        }
        let share_ok = u128::from(self.mode_calls) * 100
            >= u128::from(self.calls) * u128::from(MODAL_MIN_SHARE_PERCENT);
        (self.mode_size != 0 && self.samples >= MODAL_MIN_SAMPLES && share_ok)
            .then_some(SitePrediction::Modal(self.mode_size))
    }

    /// Adds another record of the same site.
    fn absorb(&mut self, s: &ProfileSite) {
        self.samples = self.samples.saturating_add(s.samples);
        self.followed = self.followed.saturating_add(s.followed);
        self.bytes = self.bytes.saturating_add(s.bytes);
        self.size_min = self.size_min.min(s.size_min);
        self.size_max = self.size_max.max(s.size_max);
        self.align = self.align.max(s.align);
        self.threads = self.threads.max(s.threads);
        self.freed = self.freed.saturating_add(s.freed);
        self.lifetime_ns = self.lifetime_ns.saturating_add(s.lifetime_ns);
        self.lifetime_max_ns = self.lifetime_max_ns.max(s.lifetime_max_ns);
        self.calls = self.calls.saturating_add(s.calls);
        if self.mode_size == s.mode_size {
            self.mode_calls = self.mode_calls.saturating_add(s.mode_calls);
        } else if s.mode_calls > self.mode_calls {
            self.mode_size = s.mode_size;
            self.mode_calls = s.mode_calls;
        }
    }
}

/// A program's stored profile.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Profile {
    pub runs: u64,
    /// Mean bytes between samples: each sample stands for about this many bytes.
    pub interval: u64,
    /// File paths of the modules sites lie in.
    pub modules: Vec<String>,
    pub sites: Vec<ProfileSite>,
    /// `(block size, samples)` per size class.
    pub classes: Vec<(u64, u64)>,
}

impl Profile {
    /// Adds `other` (another run) into this profile.
    pub fn merge(&mut self, other: &Profile) {
        self.runs = self.runs.saturating_add(other.runs);
        self.interval = other.interval;
        for s in &other.sites {
            let Some(path) = other.modules.get(s.module) else {
                continue;
            };
            let module = match self.modules.iter().position(|m| m == path) {
                Some(i) => i,
                None => {
                    self.modules.push(path.clone());
                    self.modules.len() - 1
                }
            };
            let found = self
                .sites
                .iter_mut()
                .find(|t| t.module == module && t.offset == s.offset);
            match found {
                Some(t) => t.absorb(s),
                None => self.sites.push(ProfileSite {
                    module,
                    ..s.clone()
                }),
            }
        }
        for &(size, n) in &other.classes {
            match self.classes.iter_mut().find(|c| c.0 == size) {
                Some(c) => c.1 = c.1.saturating_add(n),
                None => self.classes.push((size, n)),
            }
        }
        self.classes.sort_unstable();
    }

    /// Forgets the sites at `returns` (module path, offset): return addresses of
    /// wrappers' calls, recorded by runs that did not yet know them as wrappers (the
    /// first run of a program, before its analysis). Later runs record the callers.
    pub fn forget_sites_at(&mut self, returns: &[(String, u64)]) {
        let modules = &self.modules;
        self.sites.retain(|s| {
            !returns
                .iter()
                .any(|(path, off)| *off == s.offset && modules.get(s.module) == Some(path))
        });
    }

    /// The sites kept: up to half of [`MAX_SITES`] by sampled bytes, the rest by
    /// estimated calls; in that order.
    fn kept_sites(&self) -> Vec<&ProfileSite> {
        let mut by_bytes: Vec<&ProfileSite> = self.sites.iter().collect();
        by_bytes.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.offset.cmp(&b.offset)));
        let (first, rest) = by_bytes.split_at(by_bytes.len().min(MAX_SITES / 2));
        let mut rest = rest.to_vec();
        rest.sort_by(|a, b| b.calls.cmp(&a.calls).then(a.offset.cmp(&b.offset)));
        let mut sites = first.to_vec();
        sites.extend(rest);
        sites.truncate(MAX_SITES);
        sites
    }

    /// The text stored: the sites [`Self::kept_sites`] chooses, as many as fit in
    /// [`MAX_FILE_BYTES`]; only the modules they use.
    pub fn text(&self) -> String {
        let sites = self.kept_sites();
        let mut head = format!("{HEADER}\nruns {}\ninterval {}\n", self.runs, self.interval);
        for &(size, n) in &self.classes {
            let _ = writeln!(head, "class {size} {n}");
        }
        let mut modules: Vec<usize> = Vec::new();
        let mut body = String::new();
        for s in sites {
            // A path the parser would refuse (control characters break the line
            // format) is left out rather than spoiling the whole file.
            let Some(path) = self.modules.get(s.module).filter(|p| is_storable_path(p)) else {
                continue;
            };
            let (idx, module_line) = match modules.iter().position(|&m| m == s.module) {
                Some(i) => (i, String::new()),
                None if modules.len() < MAX_MODULES => {
                    (modules.len(), format!("module {} {path}\n", modules.len()))
                }
                None => continue,
            };
            let line = format!(
                "site {idx} {:x} {} {} {} {} {} {} {} {} {} {} {} {} {}\n",
                s.offset,
                s.samples,
                s.followed,
                s.bytes,
                s.size_min,
                s.size_max,
                s.align,
                s.threads,
                s.freed,
                s.lifetime_ns,
                s.lifetime_max_ns,
                s.calls,
                s.mode_size,
                s.mode_calls
            );
            if head.len() + body.len() + module_line.len() + line.len() > MAX_FILE_BYTES {
                break;
            }
            if !module_line.is_empty() {
                modules.push(s.module);
                body.push_str(&module_line);
            }
            body.push_str(&line);
        }
        head + &body
    }
}

/// Parses a stored profile; any value lgmalloc could not have written refuses the file.
pub fn parse(bytes: &[u8]) -> Result<Profile, Refusal> {
    if bytes.len() > MAX_FILE_BYTES {
        return Err("too large");
    }
    let text = core::str::from_utf8(bytes).map_err(|_| "not text")?;
    let mut lines = text.lines();
    if lines.next() != Some(HEADER) {
        return Err("not a profile of this version");
    }
    let mut p = Profile::default();
    for line in lines {
        parse_line(&mut p, line)?;
    }
    if p.runs == 0 || p.interval == 0 {
        return Err("no runs or no interval");
    }
    Ok(p)
}

/// Parses and writes out again (the fuzz target checks that this is stable).
pub fn reparse(bytes: &[u8]) -> Result<String, Refusal> {
    parse(bytes).map(|p| p.text())
}

/// Whether a module path can stand on a `module` line and read back the same: absolute,
/// bounded, and free of control characters (a `\r` before the line end, or a newline,
/// would not survive the round trip; found by the plan fuzz target).
fn is_storable_path(path: &str) -> bool {
    path.starts_with('/') && path.len() <= 4096 && !path.chars().any(char::is_control)
}

fn parse_line(p: &mut Profile, line: &str) -> Result<(), Refusal> {
    if let Some(rest) = line.strip_prefix("module ") {
        let (idx, path) = rest.split_once(' ').ok_or("a malformed module line")?;
        if number::<usize>(idx)? != p.modules.len() || p.modules.len() >= MAX_MODULES {
            return Err("module lines out of order or too many");
        }
        if !is_storable_path(path) {
            return Err("a module path that is not absolute, too long or has control characters");
        }
        p.modules.push(path.to_string());
        return Ok(());
    }
    let f: Vec<&str> = line.split_ascii_whitespace().collect();
    match f.as_slice() {
        // The sites' checks read the interval: a header line after them could change
        // what they were accepted against (found by the plan fuzz target: a second
        // `interval` after the sites, written first, refused them on reading back).
        ["runs" | "interval", _] if !p.modules.is_empty() || !p.classes.is_empty() => {
            return Err("a header line after the entries");
        }
        ["runs", n] => p.runs = number(n)?,
        ["interval", n] => p.interval = number(n)?,
        ["class", size, n] => {
            let size: u64 = number(size)?;
            if size == 0
                || size > MAX_SMALL_SIZE as u64
                || p.classes.len() >= 4 * size_class::MAX_CLASSES
            {
                return Err("a class out of range");
            }
            p.classes.push((size, number(n)?));
        }
        ["site", m, off, rest @ ..] if rest.len() == 13 => {
            let n: Vec<u64> = rest.iter().map(|v| number(v)).collect::<Result<_, _>>()?;
            let s = ProfileSite {
                module: number(m)?,
                offset: u64::from_str_radix(off, 16).map_err(|_| "a malformed offset")?,
                samples: n[0],
                followed: n[1],
                bytes: n[2],
                size_min: n[3],
                size_max: n[4],
                align: n[5],
                threads: n[6],
                freed: n[7],
                lifetime_ns: n[8],
                lifetime_max_ns: n[9],
                calls: n[10],
                mode_size: n[11],
                mode_calls: n[12],
            };
            check_site(p, &s)?;
            p.sites.push(s);
        }
        _ => return Err("an unknown line"),
    }
    Ok(())
}

fn check_site(p: &Profile, s: &ProfileSite) -> Result<(), Refusal> {
    let ok = s.module < p.modules.len()
        && p.sites.len() < MAX_SITES
        && s.samples > 0
        && s.freed <= s.followed
        && s.followed <= s.samples
        && s.size_min <= s.size_max
        && s.size_max <= MAX_SMALL_SIZE as u64
        && s.bytes >= s.size_min.saturating_mul(s.samples)
        && s.bytes <= s.size_max.saturating_mul(s.samples)
        && s.align.is_power_of_two()
        && s.align <= MAX_SMALL_SIZE as u64
        && (1..=2).contains(&s.threads)
        && s.lifetime_max_ns <= s.lifetime_ns
        && calls_in_range(p, s)
        && mode_in_range(s);
    if ok {
        Ok(())
    } else {
        Err("a site out of range")
    }
}

/// Each sample stands for `interval / size` calls: at least one (no small size exceeds
/// the interval lgmalloc samples at), at most `interval`.
fn calls_in_range(p: &Profile, s: &ProfileSite) -> bool {
    s.calls >= s.samples && s.calls <= s.samples.saturating_mul(p.interval.max(1))
}

/// A mode is a standard block size within the site's sizes, holding some of its
/// calls; or there is none.
fn mode_in_range(s: &ProfileSite) -> bool {
    if s.mode_size == 0 {
        return s.mode_calls == 0;
    }
    let Ok(mode) = usize::try_from(s.mode_size) else {
        return false;
    };
    s.mode_calls > 0
        && s.mode_calls <= s.calls
        && s.mode_size >= s.size_min
        && s.mode_size <= MAX_SMALL_SIZE as u64
        && size_class::standard_block_size(mode) == mode
        && size_class::standard_block_size(s.size_max as usize) >= mode
}

fn number<T: core::str::FromStr>(field: &str) -> Result<T, Refusal> {
    field.parse().map_err(|_| "a malformed number")
}

// ---- this run ------------------------------------------------------------------------

/// A loaded module: load bias, code range, file path.
struct Loaded {
    base: usize,
    lo: usize,
    hi: usize,
    path: PathBuf,
}

fn loaded_modules() -> Vec<Loaded> {
    let exe = executable_path().unwrap_or_default();
    let mut out = Vec::new();
    for_each_module(|base, phdrs, name| {
        let (lo, hi, _) = code_range(base, phdrs);
        let path = if out.is_empty() {
            exe.clone()
        } else {
            PathBuf::from(name)
        };
        out.push(Loaded { base, lo, hi, path });
    });
    out
}

/// What resolving a sampled stack to its call site reads, each file at most once.
struct Resolver {
    loaded: Vec<Loaded>,
    own: (usize, usize),
    /// Symbols are read only when lgmalloc is linked into the program (then its frames
    /// are told apart by name), and only for the main program.
    symbols: HashMap<usize, Option<Symbols>>,
}

impl Resolver {
    /// The call site of a sampled stack (module index and offset): its first frame
    /// outside lgmalloc (its own module when it has one, else the allocator's functions
    /// by name) and outside the wrappers the module's analysis found (`xmalloc`,
    /// `Perl_safesysmalloc`: their callers are the sites whose sizes mean something).
    /// A stack with nothing but wrappers in the frames kept resolves to its first.
    fn call_site(&mut self, frames: &[usize]) -> Option<(usize, u64)> {
        let mut first = None;
        for &ip in frames.iter().filter(|&&ip| ip != 0) {
            let (lo, hi) = self.own;
            if lo != hi && ip >= lo && ip < hi {
                continue;
            }
            let Some(m) = self.loaded.iter().position(|m| ip >= m.lo && ip < m.hi) else {
                continue;
            };
            let module = self.loaded.get(m)?;
            let offset = (ip - module.base) as u64;
            if lo == hi && m == 0 {
                let sy = self
                    .symbols
                    .entry(m)
                    .or_insert_with(|| Symbols::read(&module.path));
                let name = sy.as_ref().and_then(|sy| sy.caller_of(offset)).map(|f| f.0);
                if name.is_some_and(is_allocator_frame) {
                    continue;
                }
            }
            first = first.or(Some((m, offset)));
            if !sample::is_wrapper_return(ip) {
                return Some((m, offset));
            }
        }
        first
    }
}

/// This run's samples, resolved to call sites ([`Resolver::call_site`]).
pub fn this_run() -> Profile {
    let mut resolver = Resolver {
        loaded: loaded_modules(),
        own: sample::own_code(),
        symbols: HashMap::new(),
    };
    let mut p = Profile {
        runs: 1,
        interval: sample::MEAN_INTERVAL as u64,
        ..Profile::default()
    };
    let mut run = Profile::default();
    // Per site (path, offset): estimated calls per standard block size, summed over
    // the call stacks that resolve to it, for its mode.
    let mut class_calls: HashMap<(String, u64), HashMap<usize, u64>> = HashMap::new();
    sample::for_each_site(|s| {
        let Some((m, offset)) = resolver.call_site(&s.frames) else {
            return;
        };
        let Some(module) = resolver.loaded.get(m) else {
            return;
        };
        let path = module.path.to_string_lossy().into_owned();
        if !path.starts_with('/') || s.samples == 0 {
            return;
        }
        let per_class = class_calls.entry((path.clone(), offset)).or_default();
        for &(size, n) in s.classes.iter().filter(|c| c.0 != 0) {
            *per_class.entry(size).or_default() += n;
        }
        // The counts are read one at a time while other threads may still sample and
        // free: the stored file requires freed <= followed <= samples.
        let followed = s.followed.min(s.samples);
        let one = Profile {
            runs: 0,
            interval: p.interval,
            modules: vec![path],
            sites: vec![ProfileSite {
                module: 0,
                offset,
                samples: s.samples,
                followed,
                bytes: s.bytes,
                size_min: s.size_min as u64,
                size_max: s.size_max as u64,
                align: s.align as u64,
                threads: if s.several_threads { 2 } else { 1 },
                freed: s.freed.min(followed),
                lifetime_ns: s.lifetime_ns,
                lifetime_max_ns: s.lifetime_max_ns,
                // At least one call per sample, as the stored file requires.
                calls: s.calls.max(s.samples),
                mode_size: 0,
                mode_calls: 0,
            }],
            classes: Vec::new(),
        };
        run.merge(&one);
    });
    for site in &mut run.sites {
        let Some(path) = run.modules.get(site.module) else {
            continue;
        };
        let mode = class_calls.get(&(path.clone(), site.offset)).and_then(|c| {
            c.iter()
                .filter(|c| *c.1 > 0)
                .max_by_key(|&(&size, &n)| (n, size))
        });
        if let Some((&size, &n)) = mode {
            site.mode_size = size as u64;
            site.mode_calls = n.min(site.calls);
        }
    }
    for (class, n) in sample::CLASS_SAMPLES.iter().enumerate() {
        let n = n.load(core::sync::atomic::Ordering::Relaxed);
        if n > 0 && class < size_class::class_count() {
            run.classes.push((size_class::block_size(class) as u64, n));
        }
    }
    run.runs = 0;
    p.merge(&run);
    p
}

/// This run's wrapper return addresses (`sample::wrapper_returns`) as module path and
/// offset, the way sites are stored.
fn wrapper_return_sites() -> Vec<(String, u64)> {
    let loaded = loaded_modules();
    sample::wrapper_returns()
        .iter()
        .filter_map(|&ret| {
            let m = loaded.iter().find(|m| ret >= m.lo && ret < m.hi)?;
            Some((m.path.to_string_lossy().into_owned(), (ret - m.base) as u64))
        })
        .collect()
}

/// The cache directory and file name of `program`'s stored profile.
pub fn location(program: &Path) -> Option<(CacheDir, String)> {
    let entry = crate::analysis::cache_entry(program)?;
    let (dir, name) = CacheDir::open_for(&entry)?;
    let stem = cache_dir::entry_stem(&name).to_string();
    Some((dir, format!("{stem}.profile")))
}

/// `program`'s stored profile, if present and valid.
pub fn read(program: &Path) -> Option<Profile> {
    let (dir, name) = location(program)?;
    read_in(&dir, &name)
}

/// The profile stored beside the cache entry named by `stem` (the plan's main program),
/// if present and valid.
pub(super) fn read_beside(dir: &CacheDir, stem: &str) -> Option<Profile> {
    read_in(dir, &format!("{stem}.profile"))
}

/// Hands the sampler the run-time return addresses that the stored profile resolved
/// to call sites in the main program (lgmalloc linked into it), so a sample returning
/// to one takes it as its site without unwinding the stack.
pub(super) fn hand_known_sites_to_sampler(stored: &Profile) {
    let Some(main) = loaded_modules().into_iter().next() else {
        return;
    };
    let Some(m) = stored
        .modules
        .iter()
        .position(|p| Path::new(p) == main.path)
    else {
        return;
    };
    let mut sites: Vec<usize> = stored
        .sites
        .iter()
        .filter(|s| s.module == m)
        .filter_map(|s| main.base.checked_add(usize::try_from(s.offset).ok()?))
        // A return address follows a call in the program's code.
        .filter(|&ret| ret > main.lo && ret <= main.hi)
        .collect();
    sites.sort_unstable();
    sites.dedup();
    sample::set_known_sites(Box::leak(sites.into_boxed_slice()));
}

fn read_in(dir: &CacheDir, name: &str) -> Option<Profile> {
    parse_or_say(&dir.read(name, MAX_FILE_BYTES)?, name)
}

/// The run count a stored profile states on its second line, read without parsing the
/// rest (whether to merge a small run is decided from it alone).
fn stored_runs(bytes: &[u8]) -> Option<u64> {
    let mut lines = bytes.split(|&b| b == b'\n');
    if lines.next() != Some(HEADER.as_bytes()) {
        return None;
    }
    core::str::from_utf8(lines.next()?.strip_prefix(b"runs ")?)
        .ok()?
        .parse()
        .ok()
}

fn parse_or_say(bytes: &[u8], name: &str) -> Option<Profile> {
    match parse(bytes) {
        Ok(p) => Some(p),
        Err(why) => {
            if crate::options::verbose() {
                diag!("lgmalloc: stored {name} ignored: {why}");
            }
            None
        }
    }
}

/// Registered at start-up: merges this run's samples into the stored profile.
pub(super) extern "C" fn write_at_exit() {
    let taken = sample::TAKEN.load(Ordering::Relaxed);
    if taken == 0 {
        return;
    }
    let Some(exe) = executable_path() else { return };
    let Some((dir, name)) = location(&exe) else {
        return;
    };
    let bytes = dir.read(&name, MAX_FILE_BYTES);
    if taken < MIN_SAMPLES_TO_MERGE
        && bytes
            .as_deref()
            .and_then(stored_runs)
            .is_some_and(|runs| runs >= SETTLED_RUNS)
    {
        return;
    }
    let mut stored = bytes
        .and_then(|b| parse_or_say(&b, &name))
        .unwrap_or_default();
    stored.forget_sites_at(&wrapper_return_sites());
    stored.merge(&this_run());
    dir.write(&name, stored.text().as_bytes());
    MERGED.store(Box::into_raw(Box::new(stored)), Ordering::Release);
}

/// The stored profile with this run merged in, once `write_at_exit` has stored it.
static MERGED: AtomicPtr<Profile> = AtomicPtr::new(core::ptr::null_mut());

/// The profile `write_at_exit` stored in this run, if it stored one: the exit checks
/// that run after it (`learn`) ask whether it still makes the plan's choice.
pub(super) fn merged_this_run() -> Option<&'static Profile> {
    // SAFETY: set once at exit from a leaked box, never freed.
    unsafe { MERGED.load(Ordering::Acquire).as_ref() }
}
