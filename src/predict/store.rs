//! The stored plan and the stored observations: small text files beside the main
//! program's analysis cache entry (`<entry>.plan`, `<entry>.static-plan`,
//! `<entry>.learned`), so a warm start reads a few hundred bytes instead of any
//! analysis. They go through [`CacheDir`] like every cache file.
//!
//! Both are untrusted input: anyone who can write the cache directory (or a crash, or a
//! full disk) decides what is in them. Every value is checked against the range the
//! allocator could have written; a file that fails is ignored (the next run rebuilds
//! it) with one `LGMALLOC_VERBOSE` line, never used in part.

use core::fmt::Write;

use super::learn::{Learned, MAX_RESERVED_CLASSES};
use super::modules::Module;
use super::{MAX_WRAPPER_RETURNS, PlannedClass, RuntimePlan, Source};
use crate::analysis::cache_dir::CacheDir;
use crate::diag::diag;
use crate::large::{
    DEPTH_BUCKETS, MAX_DELAY_MS, MAX_FLOOR, MAX_LIVE_SHIFT, MAX_WAIT_MS, MIN_DELAY_MS,
};
use crate::options;
use crate::size_class::{MAX_CLASSES, MAX_SMALL_SIZE, STANDARD_CLASSES, TABLE_MAX_SIZE};

/// Neither file is ever larger; a larger one is not read.
pub const MAX_FILE_BYTES: usize = 64 << 10;
/// A first page never spans more than this (the heap's largest page).
const MAX_FIRST_PAGE_BYTES: usize = 64 << 10;
/// Modules a plan may name (the program and its shared objects).
const MAX_MODULES: usize = 256;
/// Code addresses lie below this (the 47-bit user address space).
const MAX_CODE_ADDRESS: u64 = 1 << 47;
/// Entries of one kind a file may hold: one per class at most.
const MAX_ENTRIES: usize = 4 * MAX_CLASSES;

/// Why a stored file was refused.
type Refusal = &'static str;

/// The observations stored under `name`, if present and valid.
pub(super) fn read_learned(dir: &CacheDir, name: &str) -> Option<Learned> {
    let bytes = dir.read(name, MAX_FILE_BYTES)?;
    refused_if_err(name, parse_learned(&bytes))
}

/// The plan stored under `name`, if present, valid and built from the same `modules`
/// (the same files: cache entries are named by build-id, or inode, size and mtime).
/// An inert plan is read up to its `inert` line: start-up needs nothing after it.
pub(super) fn read_plan(dir: &CacheDir, name: &str, modules: &[Module]) -> Option<RuntimePlan> {
    let bytes = dir.read(name, MAX_FILE_BYTES)?;
    let plan = refused_if_err(name, parse_plan_until(&bytes, Stop::AtInert))?;
    let current = modules.iter().map(Module::entry_name);
    current.eq(plan.modules.iter().cloned()).then_some(plan)
}

/// The whole plan stored under `name` (what an inert plan's busy run learns from).
pub(super) fn read_whole_plan(dir: &CacheDir, name: &str) -> Option<RuntimePlan> {
    let bytes = dir.read(name, MAX_FILE_BYTES)?;
    refused_if_err(name, parse_plan(&bytes))
}

fn refused_if_err<T>(name: &str, parsed: Result<T, Refusal>) -> Option<T> {
    match parsed {
        Ok(v) => Some(v),
        Err(why) => {
            if options::verbose() {
                diag!("lgmalloc: stored {name} ignored: {why}");
            }
            None
        }
    }
}

/// Format: a first line `lgmalloc-learned 2`, then `threads N` and
/// `class BLOCK_SIZE ALLOCATIONS THREADS_USING` lines, and, once a run freed a large
/// object, one each of `large-policy DELAY_MS FLOOR_BYTES LIVE_SHIFT` (the retention
/// policy that run had), `large-reuse PUTS HITS GATHERED MISSES EVICTED EXPIRED` and
/// `large-ghosts EVICTED EXPIRED LONGEST_HIT_WAIT_MS LONGEST_GHOST_WAIT_MS`, and
/// `large-depths CPU_MS LOST_BYTES` followed by the bytes reused at each depth (see
/// `large::ReuseCounters`). A file without the `large-*` lines (written before they
/// existed) reads as a run that freed no large object; one without `large-depths`, as a
/// run that did not count depths.
pub(super) fn parse_learned(bytes: &[u8]) -> Result<Learned, Refusal> {
    let text = core::str::from_utf8(bytes).map_err(|_| "not text")?;
    let mut lines = text.lines();
    if lines.next() != Some("lgmalloc-learned 2") {
        return Err("not an observations file of this version");
    }
    let mut learned = Learned::default();
    for line in lines {
        parse_learned_line(&mut learned, line)?;
    }
    check_learned(&learned)?;
    Ok(learned)
}

/// Parses one `threads` or `class` line into `learned` (shared with the plan file).
fn parse_learned_line(learned: &mut Learned, line: &str) -> Result<(), Refusal> {
    let mut f = [""; MAX_FIELDS];
    match fields(line, &mut f)? {
        ["threads", n] => learned.threads = number(n)?,
        ["class", size, calls, using] => {
            if learned.classes.len() >= MAX_ENTRIES {
                return Err("too many classes");
            }
            let size: usize = number(size)?;
            if size == 0 || size > MAX_SMALL_SIZE || !size.is_multiple_of(16) {
                return Err("a class size out of range");
            }
            let calls: u64 = number(calls)?;
            learned.total = learned
                .total
                .checked_add(calls)
                .ok_or("allocation counts overflow")?;
            learned.classes.push((size, calls, number(using)?));
        }
        ["large-policy", delay, floor, shift] => {
            seen_once(learned, LARGE_POLICY)?;
            let policy = &mut learned.large.policy;
            policy.delay_ms = number(delay)?;
            policy.floor = number(floor)?;
            policy.live_shift = number(shift)?;
            // The default delay is no power of two; a learned one is.
            if !(MIN_DELAY_MS..=MAX_DELAY_MS).contains(&policy.delay_ms)
                || policy.floor > MAX_FLOOR
                || policy.live_shift > MAX_LIVE_SHIFT
            {
                return Err("a large retention policy out of range");
            }
        }
        [
            "large-reuse",
            puts,
            hits,
            gathered,
            misses,
            evicted,
            expired,
        ] => {
            seen_once(learned, LARGE_REUSE)?;
            let r = &mut learned.large.reuse;
            r.puts = number(puts)?;
            r.hits = number(hits)?;
            r.gathered = number(gathered)?;
            r.misses = number(misses)?;
            r.evicted = number(evicted)?;
            r.expired = number(expired)?;
        }
        ["large-ghosts", evicted, expired, hit_wait, ghost_wait] => {
            seen_once(learned, LARGE_GHOSTS)?;
            let r = &mut learned.large.reuse;
            r.ghost_evicted = number(evicted)?;
            r.ghost_expired = number(expired)?;
            r.longest_hit_wait_ms = number(hit_wait)?;
            r.longest_ghost_wait_ms = number(ghost_wait)?;
            if r.longest_hit_wait_ms > MAX_WAIT_MS || r.longest_ghost_wait_ms > MAX_DELAY_MS {
                return Err("a large-object wait out of range");
            }
        }
        ["large-depths", cpu_ms, lost, depths @ ..] => {
            seen_once(learned, LARGE_DEPTHS)?;
            let r = &mut learned.large.reuse;
            r.cpu_ms = number(cpu_ms)?;
            r.lost_bytes = number(lost)?;
            if depths.len() != DEPTH_BUCKETS {
                return Err("large-object depths of another count");
            }
            for (slot, field) in r.reused_by_depth.iter_mut().zip(depths) {
                *slot = number(field)?;
            }
            let mut bytes = r.reused_by_depth.iter().chain([&r.lost_bytes]);
            if r.cpu_ms > MAX_CPU_MS || bytes.any(|&b| b > MAX_COUNTED_BYTES) {
                return Err("large-object depths out of range");
            }
        }
        _ => return Err("an unknown line"),
    }
    Ok(())
}

/// Bounds of the `large-depths` values: a century of CPU time, 2^56 bytes.
const MAX_CPU_MS: u64 = 100 * 365 * 24 * 3600 * 1000;
const MAX_COUNTED_BYTES: u64 = 1 << 56;

/// Bits of `Learned::large_lines`: each `large-*` line at most once.
const LARGE_POLICY: u8 = 1;
const LARGE_REUSE: u8 = 2;
const LARGE_GHOSTS: u8 = 4;
const LARGE_DEPTHS: u8 = 8;

fn seen_once(learned: &mut Learned, line: u8) -> Result<(), Refusal> {
    if learned.large_lines & line != 0 {
        return Err("a repeated line");
    }
    learned.large_lines |= line;
    Ok(())
}

/// What the whole file must satisfy once read: no class used by more threads than ran,
/// the large-object lines all or none, and no more misses served by unmapped mappings
/// than misses.
fn check_learned(learned: &Learned) -> Result<(), Refusal> {
    if learned.classes.iter().any(|c| c.2 > learned.threads) {
        return Err("a class used by more threads than ran");
    }
    if !matches!(learned.large_lines, 0 | 7 | 15) {
        return Err("large-object lines missing");
    }
    let r = &learned.large.reuse;
    if r.ghost_evicted.saturating_add(r.ghost_expired) > r.misses {
        return Err("more misses served by unmapped mappings than misses");
    }
    Ok(())
}

/// Fields on any line of a stored plan or observations, at most (`observed
/// large-depths` and its ten numbers).
const MAX_FIELDS: usize = 12;

/// Splits `line` at ASCII whitespace into `out`; the fields found. Refuses a line with
/// more than [`MAX_FIELDS`] (no line lgmalloc writes has as many). No allocation: this
/// runs for every line of the plan before `main`.
fn fields<'a>(line: &'a str, out: &'a mut [&'a str; MAX_FIELDS]) -> Result<&'a [&'a str], Refusal> {
    let mut n = 0;
    for field in line.split_ascii_whitespace() {
        *out.get_mut(n).ok_or("a line with too many fields")? = field;
        n += 1;
    }
    Ok(out.get(..n).unwrap_or_default())
}

fn number<T: core::str::FromStr>(field: &str) -> Result<T, Refusal> {
    field.parse().map_err(|_| "a malformed number")
}

/// Stores a run's observations under `name` and drops the plan built from the old
/// ones (`plan_name`), so the next run plans from these.
pub(super) fn write_learned(dir: &CacheDir, name: &str, plan_name: &str, learned: &Learned) {
    let mut text = String::from("lgmalloc-learned 2\n");
    learned_lines(learned, "", &mut text);
    dir.write(name, text.as_bytes());
    dir.remove(plan_name);
}

fn learned_lines(learned: &Learned, prefix: &str, text: &mut String) {
    let _ = writeln!(text, "{prefix}threads {}", learned.threads);
    for (size, calls, using) in &learned.classes {
        let _ = writeln!(text, "{prefix}class {size} {calls} {using}");
    }
    let large = &learned.large;
    // The CPU time alone (every run has one) is no large-object observation.
    let mut counted = *large;
    counted.reuse.cpu_ms = 0;
    if counted != Default::default() {
        let (p, r) = (&large.policy, &large.reuse);
        let _ = writeln!(
            text,
            "{prefix}large-policy {} {} {}",
            p.delay_ms, p.floor, p.live_shift
        );
        let _ = writeln!(
            text,
            "{prefix}large-reuse {} {} {} {} {} {}",
            r.puts, r.hits, r.gathered, r.misses, r.evicted, r.expired
        );
        let _ = writeln!(
            text,
            "{prefix}large-ghosts {} {} {} {}",
            r.ghost_evicted, r.ghost_expired, r.longest_hit_wait_ms, r.longest_ghost_wait_ms
        );
        let _ = write!(text, "{prefix}large-depths {} {}", r.cpu_ms, r.lost_bytes);
        for bytes in r.reused_by_depth {
            let _ = write!(text, " {bytes}");
        }
        text.push('\n');
    }
}

/// The first line of a stored plan: the format and its version.
const PLAN_HEADER: &str = "lgmalloc-plan 5";

/// Format: `lgmalloc-plan 5` (5: the wrapper returns include the calls made inside an
/// allocation function a module defines, such as a statically linked `operator new`),
/// then `module CACHE_ENTRY` (the modules analysed, main
/// program first), `wrapper-return MODULE_INDEX HEX_ADDRESS` (the return addresses of
/// the calls the modules' wrappers make to the allocator, link-time, ascending: read
/// by inert starts too, whose samples look past those frames), `inert` (when the plan predicts no saving: start-up stops reading
/// there and puts nothing in force), `class SIZE CONFIDENCE SOURCE FIRST_PAGE_BLOCKS` (source `S`tatic,
/// `L`earned, `B`oth or `P`rofile), `eager BLOCK_SIZE`
/// (a class reserved in every new heap), `profile-room N` and `profile-exact BLOCK_SIZE`
/// (the exact-fit sizes the sampled profile chose, ascending, and the room it had: see
/// `shape::ProfileChoice`) and `observed ...` (the learned lines it was built from)
/// lines.
pub(super) fn write_plan(dir: &CacheDir, name: &str, plan: &RuntimePlan) {
    dir.write(name, plan_text(plan).as_bytes());
}

/// The stored form of `plan` (see [`write_plan`]).
pub(super) fn plan_text(plan: &RuntimePlan) -> String {
    let mut text = format!("{PLAN_HEADER}\n");
    for m in &plan.modules {
        let _ = writeln!(text, "module {m}");
    }
    for (module, ret) in &plan.wrapper_returns {
        let _ = writeln!(text, "wrapper-return {module} {ret:x}");
    }
    if plan.inert {
        text.push_str("inert\n");
    }
    for c in &plan.classes {
        let source = match c.source {
            Source::Static => 'S',
            Source::Learned => 'L',
            Source::Both => 'B',
            Source::Profile => 'P',
        };
        let _ = writeln!(
            text,
            "class {} {} {} {}",
            c.size, c.confidence, source, c.first_page_blocks
        );
    }
    for size in &plan.reserved_sizes {
        let _ = writeln!(text, "eager {size}");
    }
    let _ = writeln!(text, "profile-room {}", plan.profile_choice.room);
    for size in &plan.profile_choice.sizes {
        let _ = writeln!(text, "profile-exact {size}");
    }
    learned_lines(&plan.observed, "observed ", &mut text);
    text
}

/// How much of a stored plan to read.
#[derive(Clone, Copy, PartialEq)]
enum Stop {
    /// Everything.
    AtEnd,
    /// Up to an `inert` line (the header and modules are still checked).
    AtInert,
}

/// Parses a stored plan (see [`write_plan`]), checking every value.
pub(super) fn parse_plan(bytes: &[u8]) -> Result<RuntimePlan, Refusal> {
    parse_plan_until(bytes, Stop::AtEnd)
}

fn parse_plan_until(bytes: &[u8], stop: Stop) -> Result<RuntimePlan, Refusal> {
    let text = core::str::from_utf8(bytes).map_err(|_| "not text")?;
    let mut lines = text.lines();
    if lines.next() != Some(PLAN_HEADER) {
        return Err("not a plan of this version");
    }
    let mut plan = RuntimePlan {
        from_cache: true,
        ..RuntimePlan::default()
    };
    let mut room_seen = false;
    for line in lines {
        let mut f = [""; MAX_FIELDS];
        match fields(line, &mut f)? {
            ["class", size, confidence, source, blocks] => {
                if plan.classes.len() >= MAX_CLASSES {
                    return Err("too many classes");
                }
                plan.classes
                    .push(planned_class(size, confidence, source, blocks)?);
            }
            ["eager", size] => {
                let size: usize = number(size)?;
                if size == 0 || size > MAX_SMALL_SIZE {
                    return Err("a reserved size out of range");
                }
                if plan.reserved_sizes.len() >= MAX_RESERVED_CLASSES {
                    return Err("too many reserved classes");
                }
                plan.reserved_sizes.push(size);
            }
            ["module", name] => {
                if plan.modules.len() >= MAX_MODULES {
                    return Err("too many modules");
                }
                if name.len() > 255 || name.contains('/') {
                    return Err("a module name that is no cache entry");
                }
                plan.modules.push(name.to_string());
            }
            ["profile-room", room] => {
                if room_seen {
                    return Err("a second profile-room line");
                }
                room_seen = true;
                plan.profile_choice.room = number(room)?;
                if plan.profile_choice.room > MAX_CLASSES - STANDARD_CLASSES {
                    return Err("a profile room larger than the class table's");
                }
            }
            ["profile-exact", size] => {
                let size: usize = number(size)?;
                let chosen = &mut plan.profile_choice;
                if !room_seen || chosen.sizes.len() >= chosen.room {
                    return Err("a profile-chosen size beyond its room");
                }
                if size == 0 || size > TABLE_MAX_SIZE || !size.is_multiple_of(16) {
                    return Err("a profile-chosen size out of range");
                }
                if chosen.sizes.last().is_some_and(|&last| last >= size) {
                    return Err("profile-chosen sizes out of order");
                }
                chosen.sizes.push(size);
            }
            ["wrapper-return", module, ret] => {
                let module: usize = number(module)?;
                let ret = u64::from_str_radix(ret, 16).map_err(|_| "a malformed number")?;
                if module >= plan.modules.len() || ret == 0 || ret >= MAX_CODE_ADDRESS {
                    return Err("a wrapper return address out of range");
                }
                let returns = &mut plan.wrapper_returns;
                if returns.len() >= MAX_WRAPPER_RETURNS {
                    return Err("too many wrapper return addresses");
                }
                if returns.last().is_some_and(|&last| last >= (module, ret)) {
                    return Err("wrapper return addresses out of order");
                }
                returns.push((module, ret));
            }
            ["observed", ..] => {
                let rest = line.strip_prefix("observed ").ok_or("an unknown line")?;
                parse_learned_line(&mut plan.observed, rest)?;
            }
            ["inert"] => {
                if plan.inert || !plan.classes.is_empty() || !plan.reserved_sizes.is_empty() {
                    return Err("an inert line out of place");
                }
                plan.inert = true;
                if stop == Stop::AtInert {
                    return Ok(plan);
                }
            }
            _ => return Err("an unknown line"),
        }
    }
    if !room_seen {
        return Err("no profile-room line");
    }
    check_learned(&plan.observed)?;
    Ok(plan)
}

/// One `class` line of a stored plan.
fn planned_class(
    size: &str,
    confidence: &str,
    source: &str,
    blocks: &str,
) -> Result<PlannedClass, Refusal> {
    let size: usize = number(size)?;
    if size == 0 || size > TABLE_MAX_SIZE {
        return Err("a class size out of range");
    }
    let confidence: f32 = number(confidence)?;
    if !(0.0..=1.0).contains(&confidence) {
        // Also refuses NaN, which no range contains.
        return Err("a confidence outside [0, 1]");
    }
    let source = match source {
        "S" => Source::Static,
        "L" => Source::Learned,
        "B" => Source::Both,
        "P" => Source::Profile,
        _ => return Err("an unknown source"),
    };
    let first_page_blocks: u32 = number(blocks)?;
    let block = size.next_multiple_of(16);
    if first_page_blocks == 0
        || first_page_blocks as usize * block > MAX_FIRST_PAGE_BYTES.max(block)
    {
        return Err("a first page out of range");
    }
    Ok(PlannedClass {
        size,
        // Set when the plan is applied to the class table.
        class: 0,
        confidence,
        source,
        first_page_blocks,
        exact_fit: false,
    })
}

/// For the fuzz target: the stored form of the plan `bytes` parse to.
pub fn reparse_plan(bytes: &[u8]) -> Result<String, Refusal> {
    parse_plan(bytes).map(|plan| plan_text(&plan))
}

/// For the fuzz target: the stored form of the observations `bytes` parse to.
pub fn reparse_learned(bytes: &[u8]) -> Result<String, Refusal> {
    parse_learned(bytes).map(|learned| {
        let mut text = String::from("lgmalloc-learned 2\n");
        learned_lines(&learned, "", &mut text);
        text
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAN: &str = "lgmalloc-plan 5\nmodule b-0123-16208\nwrapper-return 0 f6fa6\n\
                        class 40 0.975 B 85\neager 48\n\
                        profile-room 15\nprofile-exact 528\nprofile-exact 4368\n\
                        observed threads 7\nobserved class 48 768000 7\n";

    fn with_class_line(line: &str) -> String {
        PLAN.replace("class 40 0.975 B 85", line)
    }

    #[test]
    fn a_written_plan_reads_back() {
        let plan = parse_plan(PLAN.as_bytes()).expect("valid plan");
        assert_eq!(plan.modules, ["b-0123-16208"]);
        assert_eq!(plan.classes.len(), 1);
        let c = plan.classes[0];
        assert_eq!(
            (c.size, c.first_page_blocks, c.source),
            (40, 85, Source::Both)
        );
        assert!((c.confidence - 0.975).abs() < 1e-6);
        assert_eq!(plan.reserved_sizes, [48]);
        assert_eq!(plan.profile_choice.room, 15);
        assert_eq!(plan.profile_choice.sizes, [528, 4368]);
        assert_eq!(plan.wrapper_returns, [(0, 0xf6fa6)]);
        assert_eq!((plan.observed.threads, plan.observed.total), (7, 768000));
        assert_eq!(plan_text(&plan), PLAN);
    }

    #[test]
    fn an_inert_plan_reads_back_and_start_up_stops_at_its_inert_line() {
        let text = PLAN
            .replace("class 40", "inert\nclass 40")
            .replace("eager 48\n", "");
        let plan = parse_plan(text.as_bytes()).expect("valid plan");
        assert!(plan.inert);
        assert_eq!(plan.classes.len(), 1);
        assert_eq!(plan_text(&plan), text);
        // Start-up reads no further: what follows is not even parsed.
        let spoilt = text.replace("class 40 0.975 B 85", "class 40 NaN B 85");
        let head = parse_plan_until(spoilt.as_bytes(), Stop::AtInert).expect("header and modules");
        assert!(head.inert && head.classes.is_empty());
        assert_eq!(head.modules, ["b-0123-16208"]);
        // The whole file (what a busy run learns from) is checked as ever.
        assert!(parse_plan(spoilt.as_bytes()).is_err());
        // An inert line after what it would switch off is refused.
        let late = PLAN.replace("eager 48\n", "eager 48\ninert\n");
        assert_eq!(
            parse_plan(late.as_bytes()).err(),
            Some("an inert line out of place")
        );
    }

    #[test]
    fn a_profile_chosen_class_reads_back() {
        let text = with_class_line("class 4368 0.99 P 4");
        let plan = parse_plan(text.as_bytes()).expect("valid plan");
        assert_eq!(plan.classes[0].source, Source::Profile);
        assert_eq!(plan.classes[0].size, 4368);
        assert_eq!(plan_text(&plan), text);
    }

    #[test]
    fn planted_values_are_refused() {
        for (line, why) in [
            ("class 40 NaN B 85", "a confidence outside [0, 1]"),
            ("class 40 -5 B 85", "a confidence outside [0, 1]"),
            ("class 40 1e308 B 85", "a confidence outside [0, 1]"),
            ("class 40 inf B 85", "a confidence outside [0, 1]"),
            ("class 40 0.9 B 4294967295", "a first page out of range"),
            ("class 40 0.9 B 0", "a first page out of range"),
            ("class 0 0.9 B 4", "a class size out of range"),
            ("class 9000 0.9 B 4", "a class size out of range"),
            ("class 40 0.9 X 4", "an unknown source"),
            ("class 40 0.9 p 4", "an unknown source"),
            ("class 40 0.9 B", "an unknown line"),
            ("klass 40 0.9 B 4", "an unknown line"),
            ("class -40 0.9 B 4", "a malformed number"),
        ] {
            let text = with_class_line(line);
            assert_eq!(parse_plan(text.as_bytes()).err(), Some(why), "{line}");
        }
        // (what is replaced in a valid plan, by what, why the result is refused)
        let planted = [
            ("eager 48", "eager 0", "a reserved size out of range"),
            (
                "module b-0123-16208",
                "module ../../etc",
                "a module name that is no cache entry",
            ),
            (
                "observed threads 7",
                "observed threads 2",
                "a class used by more threads than ran",
            ),
            (
                "lgmalloc-plan 5",
                "lgmalloc-plan 4",
                "not a plan of this version",
            ),
            (
                "profile-room 15\n",
                "",
                "a profile-chosen size beyond its room",
            ),
            (
                "profile-room 15\nprofile-exact 528\nprofile-exact 4368\n",
                "",
                "no profile-room line",
            ),
            (
                "profile-room 15",
                "profile-room 1",
                "a profile-chosen size beyond its room",
            ),
            (
                "profile-room 15",
                "profile-room 17",
                "a profile room larger than the class table's",
            ),
            (
                "profile-room 15",
                "profile-room 15\nprofile-room 15",
                "a second profile-room line",
            ),
            (
                "profile-exact 528",
                "profile-exact 520",
                "a profile-chosen size out of range",
            ),
            (
                "profile-exact 528",
                "profile-exact 9008",
                "a profile-chosen size out of range",
            ),
            (
                "profile-exact 4368",
                "profile-exact 528",
                "profile-chosen sizes out of order",
            ),
            (
                "wrapper-return 0 f6fa6",
                "wrapper-return 1 f6fa6",
                "a wrapper return address out of range",
            ),
            (
                "wrapper-return 0 f6fa6",
                "wrapper-return 0 800000000000",
                "a wrapper return address out of range",
            ),
            (
                "wrapper-return 0 f6fa6",
                "wrapper-return 0 f6fa6\nwrapper-return 0 f6fa6",
                "wrapper return addresses out of order",
            ),
            (
                "wrapper-return 0 f6fa6",
                "wrapper-return 0 xyz",
                "a malformed number",
            ),
        ];
        for (from, to, why) in planted {
            let text = PLAN.replace(from, to);
            assert_ne!(text, PLAN, "{from}");
            assert_eq!(parse_plan(text.as_bytes()).err(), Some(why), "{text}");
        }
        assert_eq!(parse_plan(b"lgmalloc-plan 5\n\xff").err(), Some("not text"));
        let many = format!("{PLAN}{}", "eager 16\n".repeat(MAX_RESERVED_CLASSES));
        assert_eq!(
            parse_plan(many.as_bytes()).err(),
            Some("too many reserved classes")
        );
    }

    #[test]
    fn planted_observations_are_refused() {
        let ok = "lgmalloc-learned 2\nthreads 3\nclass 48 100 3\n";
        assert_eq!(parse_learned(ok.as_bytes()).map(|l| l.total), Ok(100));
        for (text, why) in [
            (
                "lgmalloc-learned 2\nclass 40 1 0\n",
                "a class size out of range",
            ),
            (
                "lgmalloc-learned 2\nclass 0 1 0\n",
                "a class size out of range",
            ),
            (
                "lgmalloc-learned 2\nclass 524288 1 0\n",
                "a class size out of range",
            ),
            (
                "lgmalloc-learned 2\nthreads 1\nclass 48 1 5\n",
                "a class used by more threads than ran",
            ),
            (
                "lgmalloc-learned 2\nclass 48 18446744073709551615 0\nclass 64 1 0\n",
                "allocation counts overflow",
            ),
            ("lgmalloc-learned 2\nthreads x\n", "a malformed number"),
            (
                "lgmalloc-learned 1\n",
                "not an observations file of this version",
            ),
        ] {
            assert_eq!(parse_learned(text.as_bytes()).err(), Some(why), "{text}");
        }
        let many = format!(
            "lgmalloc-learned 2\n{}",
            "class 48 1 0\n".repeat(MAX_ENTRIES + 1)
        );
        assert_eq!(
            parse_learned(many.as_bytes()).err(),
            Some("too many classes")
        );
    }

    const LARGE: &str = "large-policy 2048 16777216 1\nlarge-reuse 2 1 0 1 0 0\nlarge-ghosts 0 0 700 0\nlarge-depths 420 0 0 0 0 8388608 0 0 0 0\n";

    #[test]
    fn large_object_observations_read_back_and_old_files_still_read() {
        let text = format!("lgmalloc-learned 2\nthreads 1\nclass 48 100 1\n{LARGE}");
        let learned = parse_learned(text.as_bytes()).expect("valid observations");
        let large = learned.large;
        assert_eq!(
            (
                large.policy.delay_ms,
                large.policy.floor,
                large.policy.live_shift
            ),
            (2048, 16 << 20, 1)
        );
        assert_eq!((large.reuse.puts, large.reuse.hits), (2, 1));
        assert_eq!(large.reuse.longest_hit_wait_ms, 700);
        assert_eq!(large.reuse.cpu_ms, 420);
        assert_eq!(large.reuse.reused_by_depth[3], 8 << 20);
        assert_eq!(
            reparse_learned(text.as_bytes()).as_deref(),
            Ok(text.as_str())
        );
        // In a plan, as what it was built from.
        let plan_text_in = format!(
            "{PLAN}{}",
            LARGE
                .lines()
                .map(|l| format!("observed {l}\n"))
                .collect::<String>()
        );
        let plan = parse_plan(plan_text_in.as_bytes()).expect("valid plan");
        assert_eq!(plan.observed.large, large);
        assert_eq!(plan_text(&plan), plan_text_in);
        // A file from before the large-object lines: no large object observed.
        let old = parse_learned(b"lgmalloc-learned 2\nthreads 1\nclass 48 100 1\n")
            .expect("an old file reads");
        assert_eq!(old.large, Default::default());
        // One from before the depths were counted: no CPU time, no depths.
        let before_depths = text.replace("large-depths 420 0 0 0 0 8388608 0 0 0 0\n", "");
        let old = parse_learned(before_depths.as_bytes()).expect("a file without depths reads");
        assert_eq!((old.large.reuse.cpu_ms, old.large.reuse.hits), (0, 1));
    }

    #[test]
    fn a_run_that_freed_no_large_object_writes_no_large_object_lines() {
        let mut learned = parse_learned(b"lgmalloc-learned 2\nthreads 1\nclass 48 100 1\n")
            .expect("valid observations");
        learned.large.reuse.cpu_ms = 420;
        let mut text = String::new();
        learned_lines(&learned, "", &mut text);
        assert_eq!(text, "threads 1\nclass 48 100 1\n");
        learned.large.reuse.puts = 1;
        text.clear();
        learned_lines(&learned, "", &mut text);
        assert!(text.contains("large-depths 420 "), "{text}");
    }

    #[test]
    fn planted_large_object_observations_are_refused() {
        for (from, to, why) in [
            (
                "large-policy 2048",
                "large-policy 99",
                "a large retention policy out of range",
            ),
            (
                "large-policy 2048",
                "large-policy 6000",
                "a large retention policy out of range",
            ),
            (
                "16777216 1",
                "999999999999 1",
                "a large retention policy out of range",
            ),
            (
                "16777216 1",
                "16777216 64",
                "a large retention policy out of range",
            ),
            (
                "large-ghosts 0 0 700 0",
                "large-ghosts 0 0 70000 0",
                "a large-object wait out of range",
            ),
            (
                "large-ghosts 0 0 700 0",
                "large-ghosts 0 0 700 9000",
                "a large-object wait out of range",
            ),
            (
                "large-ghosts 0 0",
                "large-ghosts 1 1",
                "more misses served by unmapped mappings than misses",
            ),
            (
                "large-reuse 2 1 0 1 0 0\n",
                "",
                "large-object lines missing",
            ),
            (
                "large-reuse 2 1 0 1 0 0",
                "large-reuse 2 1 0 1 0",
                "an unknown line",
            ),
            ("large-reuse 2 1", "large-reuse -2 1", "a malformed number"),
            (
                "large-depths 420 0 0 0 0 8388608 0 0 0 0",
                "large-depths 420 0 0 0 0 8388608 0 0 0",
                "large-object depths of another count",
            ),
            (
                "large-depths 420 0",
                "large-depths 420 72057594037927937",
                "large-object depths out of range",
            ),
            (
                "large-depths 420",
                "large-depths 9999999999999",
                "large-object depths out of range",
            ),
            (
                "large-depths 420 0 0 0 0 8388608 0 0 0 0\n",
                "large-depths 420 0 0 0 0 8388608 0 0 0 0\nlarge-depths 1 0 0 0 0 0 0 0 0 0\n",
                "a repeated line",
            ),
        ] {
            let text = format!("lgmalloc-learned 2\n{}", LARGE.replace(from, to));
            assert_eq!(parse_learned(text.as_bytes()).err(), Some(why), "{text}");
        }
        let twice = format!("lgmalloc-learned 2\n{LARGE}large-ghosts 0 0 0 0\n");
        assert_eq!(
            parse_learned(twice.as_bytes()).err(),
            Some("a repeated line")
        );
    }
}
