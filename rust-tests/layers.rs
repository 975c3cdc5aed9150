//! The layers of `src/` as ARCHITECTURE.md draws them are the layers of the code: every
//! `crate::` path in a module must name a module in a lower row of the layer table, or
//! be one of the upward calls the table lists. A new module must be placed in the table.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The layer table: the rows of the fenced block after `<!-- layers -->`, top row
/// first; each row holds module names, then `#` and a comment.
fn layer_rows(arch: &str) -> Vec<Vec<String>> {
    block_lines(arch, "<!-- layers -->")
        .into_iter()
        .filter(|l| !l.is_empty())
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}

/// The upward calls ARCHITECTURE.md allows: lines `from -> to` in the fenced block
/// after `<!-- upward -->`.
fn allowed_upward(arch: &str) -> BTreeSet<(String, String)> {
    block_lines(arch, "<!-- upward -->")
        .into_iter()
        .filter_map(|l| l.split_once("->"))
        .map(|(a, b)| (a.trim().to_string(), b.trim().to_string()))
        .collect()
}

/// The lines of the fenced block that follows `marker`, without `#` comments.
fn block_lines<'a>(arch: &'a str, marker: &str) -> Vec<&'a str> {
    let block = arch
        .split(marker)
        .nth(1)
        .and_then(|rest| rest.split("```").nth(1))
        .unwrap_or_else(|| panic!("ARCHITECTURE.md has no fenced block after {marker}"));
    block
        .lines()
        .skip(1) // the fence's language tag
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .collect()
}

/// Top-level module of each source file (`src/heap.rs` -> heap, `src/predict/x.rs` ->
/// predict), except the crate root and the binaries.
fn modules(src: &Path) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for entry in std::fs::read_dir(src).unwrap().flatten() {
        let path = entry.path();
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        if path.is_dir() {
            if name == "bin" {
                continue;
            }
            for f in std::fs::read_dir(&path).unwrap().flatten() {
                let text = std::fs::read_to_string(f.path()).unwrap();
                out.entry(name.clone()).or_default().push(text);
            }
        } else if name != "lib" {
            out.entry(name)
                .or_default()
                .push(std::fs::read_to_string(&path).unwrap());
        }
    }
    out
}

/// The top-level modules a source text names through `crate::` (in `use` lines, grouped
/// imports and inline paths), comments left out.
fn crate_paths(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        for (i, _) in code.match_indices("crate::") {
            let rest = &code[i + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                // `crate::{a, b::c, self}`: one group per line in this code base.
                let group = group.split('}').next().unwrap_or("");
                for part in group.split(',') {
                    let first = part.trim().split("::").next().unwrap_or("").trim();
                    if first.chars().next().is_some_and(|c| c.is_ascii_lowercase()) {
                        names.insert(first.to_string());
                    }
                }
            } else {
                let first: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if first.chars().next().is_some_and(|c| c.is_ascii_lowercase()) {
                    names.insert(first);
                }
            }
        }
    }
    names
}

#[test]
fn imports_follow_the_layer_table() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let arch = std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    let rows = layer_rows(&arch);
    let upward = allowed_upward(&arch);
    let mut row_of = BTreeMap::new();
    for (i, row) in rows.iter().enumerate() {
        for m in row {
            assert!(
                row_of.insert(m.clone(), i).is_none(),
                "{m} is in the table twice"
            );
        }
    }
    let mut violations = Vec::new();
    let mut used_upward = BTreeSet::new();
    for (module, texts) in modules(&root.join("src")) {
        let Some(&mine) = row_of.get(&module) else {
            violations.push(format!(
                "src/{module}: not in ARCHITECTURE.md's layer table"
            ));
            continue;
        };
        let mut deps = BTreeSet::new();
        for t in &texts {
            deps.extend(crate_paths(t));
        }
        deps.remove(&module);
        for dep in deps {
            let Some(&theirs) = row_of.get(&dep) else {
                violations.push(format!(
                    "{module} -> {dep}: {dep} is not in the layer table"
                ));
                continue;
            };
            // Rows are listed top first: a lower layer has a larger row number.
            if theirs > mine {
                continue;
            }
            if upward.contains(&(module.clone(), dep.clone())) {
                used_upward.insert((module.clone(), dep.clone()));
                continue;
            }
            let how = if theirs == mine { "same row" } else { "upward" };
            violations.push(format!("{module} -> {dep}: {how}"));
        }
    }
    for (a, b) in upward.difference(&used_upward) {
        violations.push(format!(
            "{a} -> {b} is listed as an allowed upward call but the code no longer makes it"
        ));
    }
    assert!(
        violations.is_empty(),
        "imports that break the layers of ARCHITECTURE.md:\n  {}",
        violations.join("\n  ")
    );
    // The goal this table was drawn for: one circle at most, heap and init.
    assert!(upward.len() <= 2, "more than two upward calls allowed");
}

#[test]
fn the_checker_sees_imports() {
    let text = "use crate::heap::{self, Heap};\nuse crate::{os, segment};\n\
                // crate::hidden\nlet x = crate::options::verify();";
    let found: Vec<String> = crate_paths(text).into_iter().collect();
    assert_eq!(found, ["heap", "options", "os", "segment"]);
}
