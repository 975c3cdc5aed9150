//! The stored plan and the stored observations: small text files beside the main
//! program's analysis cache entry, so a warm start reads a few hundred bytes instead of
//! any analysis.

use core::fmt::Write;
use std::path::Path;

use super::learn::Learned;
use super::modules::Module;
use super::{PlannedClass, RuntimePlan, Source};
use crate::size_class::{self, TABLE_MAX_SIZE};

/// Format: a first line `lgmalloc-learned 2`, then `threads N` and
/// `class BLOCK_SIZE ALLOCATIONS THREADS_USING` lines.
pub(super) fn read_learned(path: &Path) -> Option<Learned> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut lines = text.lines();
    if lines.next()? != "lgmalloc-learned 2" {
        return None;
    }
    let mut learned = Learned::default();
    for line in lines {
        parse_learned_line(&mut learned, line)?;
    }
    Some(learned)
}

/// Parses one `threads` or `class` line into `learned` (shared with the plan file).
fn parse_learned_line(learned: &mut Learned, line: &str) -> Option<()> {
    let f: Vec<&str> = line.split_ascii_whitespace().collect();
    match f.as_slice() {
        ["threads", n] => learned.threads = n.parse().ok()?,
        ["class", size, calls, using] => {
            let calls: u64 = calls.parse().ok()?;
            learned.total += calls;
            learned
                .classes
                .push((size.parse().ok()?, calls, using.parse().ok()?));
        }
        _ => return None,
    }
    Some(())
}

/// Stores a run's observations at `path` and drops the plan built from the old ones,
/// so the next run plans from these.
pub(super) fn write_learned(path: &Path, learned: &Learned) {
    let mut text = String::from("lgmalloc-learned 2\n");
    learned_lines(learned, "", &mut text);
    write_atomically(path, text.as_bytes());
    let _ = std::fs::remove_file(path.with_extension("plan"));
}

fn learned_lines(learned: &Learned, prefix: &str, text: &mut String) {
    let _ = writeln!(text, "{prefix}threads {}", learned.threads);
    for (size, calls, using) in &learned.classes {
        let _ = writeln!(text, "{prefix}class {size} {calls} {using}");
    }
}

/// Format: `lgmalloc-plan 3`, then `module CACHE_ENTRY` (the modules analysed, main
/// program first), `class SIZE CONFIDENCE SOURCE FIRST_PAGE_BLOCKS`, `eager BLOCK_SIZE`
/// and `observed ...` (the learned lines it was built from) lines.
pub(super) fn write_plan_file(path: &Path, plan: &RuntimePlan) {
    let mut text = String::from("lgmalloc-plan 3\n");
    for m in &plan.modules {
        let _ = writeln!(text, "module {m}");
    }
    for c in &plan.classes {
        let source = match c.source {
            Source::Static => 'S',
            Source::Learned => 'L',
            Source::Both => 'B',
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
    learned_lines(&plan.observed, "observed ", &mut text);
    write_atomically(path, text.as_bytes());
}

/// The plan stored at `path`, if it was built from the same `modules` (the same files:
/// cache entries are named by build-id, or inode, size and mtime).
pub(super) fn read_plan_file(path: &Path, modules: &[Module]) -> Option<RuntimePlan> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut lines = text.lines();
    if lines.next()? != "lgmalloc-plan 3" {
        return None;
    }
    let mut stored_modules = Vec::new();
    let mut classes = Vec::new();
    let mut observed = Learned::default();
    let mut reserved_sizes = Vec::new();
    for line in lines {
        let f: Vec<&str> = line.split_ascii_whitespace().collect();
        match f.as_slice() {
            ["class", size, confidence, source, blocks] => {
                let size: usize = size.parse().ok()?;
                let source = match *source {
                    "S" => Source::Static,
                    "L" => Source::Learned,
                    "B" => Source::Both,
                    _ => return None,
                };
                if size == 0 || size > TABLE_MAX_SIZE {
                    return None;
                }
                classes.push(PlannedClass {
                    size,
                    class: size_class::size_class_of(size),
                    confidence: confidence.parse().ok()?,
                    source,
                    first_page_blocks: blocks.parse().ok()?,
                    exact_fit: false,
                });
            }
            ["eager", size] => reserved_sizes.push(size.parse().ok()?),
            ["module", name] => stored_modules.push(name.to_string()),
            ["observed", ..] => parse_learned_line(&mut observed, line.strip_prefix("observed ")?)?,
            _ => return None,
        }
    }
    let current = modules.iter().map(Module::entry_name);
    if !current.eq(stored_modules.iter().cloned()) {
        return None;
    }
    Some(RuntimePlan {
        classes,
        modules: stored_modules,
        from_cache: true,
        observed,
        reserved_sizes,
        ..RuntimePlan::default()
    })
}

fn write_atomically(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    if std::fs::write(&tmp, bytes).is_err() || std::fs::rename(&tmp, path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}
