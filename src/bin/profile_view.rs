//! `lgmalloc-analyze --profile PROGRAM`: the program's stored allocation profile (what
//! sampled runs saw, see `predict::profile`) beside the static prediction and the plan:
//! top call sites by bytes and by count, as a table or JSON, and `--plot FILE.svg`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;

use lgmalloc::analysis::analyze_path;
use lgmalloc::analysis::symbols::Symbols;
use lgmalloc::profile::{self, Profile, ProfileSite, SitePrediction};
use lgmalloc::size_class;

/// Sites listed per table.
const TOP: usize = 20;

/// One site with everything the report shows.
struct Row<'a> {
    site: &'a ProfileSite,
    module: &'a str,
    symbol: String,
    est_bytes: f64,
    est_calls: f64,
    /// Constant size the static analysis proved for this call, if any.
    static_size: Option<u64>,
    plan: String,
}

/// Prints the report (or writes the plot); false when there is no valid profile.
pub fn show(program: &Path, json: bool, plot: Option<&Path>) -> bool {
    let Some(p) = profile::read(program) else {
        eprintln!(
            "lgmalloc-analyze: {}: no stored profile (none recorded yet, or the file was refused; LGMALLOC_VERBOSE=1 says why)",
            program.display()
        );
        return false;
    };
    let planned = planned_sizes(program);
    let mut symbols: HashMap<&str, Option<Symbols>> = HashMap::new();
    let mut statics: HashMap<&str, HashMap<u64, u64>> = HashMap::new();
    let mut rows: Vec<Row> = Vec::new();
    for s in &p.sites {
        let Some(module) = p.modules.get(s.module) else {
            continue;
        };
        let sy = symbols
            .entry(module)
            .or_insert_with(|| Symbols::read(Path::new(module)));
        let symbol = sy
            .as_ref()
            .and_then(|sy| sy.caller_of(s.offset))
            .map_or_else(
                || format!("{:#x}", s.offset),
                |(n, start)| format!("{n}+{:#x}", s.offset - start),
            );
        let st = statics
            .entry(module)
            .or_insert_with(|| static_sizes(Path::new(module)));
        let static_size = st.get(&s.offset).copied();
        let est_bytes = s.samples as f64 * p.interval as f64;
        let plan = plan_action(s, &planned);
        rows.push(Row {
            site: s,
            module,
            symbol,
            est_bytes,
            est_calls: s.calls as f64,
            static_size,
            plan,
        });
    }
    if let Some(svg) = plot
        && let Err(e) = std::fs::write(svg, plot_svg(&p, &rows))
    {
        eprintln!("lgmalloc-analyze: {}: {e}", svg.display());
        return false;
    }
    let out = if json {
        json_report(program, &p, &rows)
    } else {
        table(program, &p, &mut rows)
    };
    super::emit(&out);
    true
}

/// Call-site return offsets with a constant predicted size, from the (cached) analysis.
fn static_sizes(module: &Path) -> HashMap<u64, u64> {
    let Ok(a) = analyze_path(module, true) else {
        return HashMap::new();
    };
    a.call_sites
        .iter()
        .filter(|s| !s.tail)
        .filter_map(|s| Some((s.site + s.len as u64, s.size?)))
        .collect()
}

/// A size the stored plan predicts (`class SIZE CONFIDENCE SOURCE BLOCKS` lines), and
/// whether the sampled profile chose it (source `P`).
struct PlannedSize {
    size: usize,
    from_profile: bool,
}

/// Sizes the stored plan puts in force: none when it is inert (the lines after `inert`
/// are kept for the next plan's comparison, not applied).
fn planned_sizes(program: &Path) -> Vec<PlannedSize> {
    let Some((dir, name)) = profile::location(program) else {
        return Vec::new();
    };
    let plan = name.replace(".profile", ".plan");
    let Some(bytes) = dir.read(&plan, 64 << 10) else {
        return Vec::new();
    };
    String::from_utf8_lossy(&bytes)
        .lines()
        .take_while(|l| *l != "inert")
        .filter_map(|l| {
            let mut words = l.strip_prefix("class ")?.split(' ');
            let size = words.next()?.parse().ok()?;
            let from_profile = words.nth(1) == Some("P");
            Some(PlannedSize { size, from_profile })
        })
        .collect()
}

/// What the plan does with a site's calls, as the runtime applies it
/// (`predict::build::apply`): a predicted size whose standard class wastes enough gets
/// an exact-fit class (its size rounded up to 16), which serves every size that rounds
/// to it; another predicted size stays in its standard class, whose first page the plan
/// sizes.
fn plan_action(s: &ProfileSite, planned: &[PlannedSize]) -> String {
    if s.size_min != s.size_max {
        return "standard classes (varying size)".into();
    }
    let size = s.size_min as usize;
    if size > size_class::MAX_SMALL_SIZE {
        return "large object".into();
    }
    let block = size.max(1).next_multiple_of(16);
    let standard = size_class::standard_block_size(size);
    let exact_fit = |p: &PlannedSize| {
        p.size <= size_class::TABLE_MAX_SIZE && profile::exact_fit_wanted(p.size, p.from_profile)
    };
    let serves = |p: &PlannedSize| p.size.max(1).next_multiple_of(16) == block;
    let sizes = |p: &PlannedSize| size_class::standard_block_size(p.size) == standard;
    if planned.iter().any(|p| exact_fit(p) && serves(p)) {
        format!("exact-fit class ({block} B)")
    } else if planned.iter().any(|p| !exact_fit(p) && sizes(p)) {
        format!("predicted, class {standard} B")
    } else {
        format!("standard class ({standard} B)")
    }
}

/// The share of the site's estimated calls in its most frequent standard class.
fn mode_share(s: &ProfileSite) -> f64 {
    s.mode_calls as f64 / s.calls.max(1) as f64
}

/// What the site's samples predict (`ProfileSite::prediction`), for the table.
fn learned(s: &ProfileSite) -> String {
    match s.prediction() {
        Some(SitePrediction::Constant(size)) => size.to_string(),
        Some(SitePrediction::Modal(block)) => {
            format!("{block} ({:.0}%)", 100.0 * mode_share(s))
        }
        None => "-".into(),
    }
}

fn learned_json(s: &ProfileSite) -> String {
    match s.prediction() {
        Some(SitePrediction::Constant(size)) => format!("{{\"size\":{size}}}"),
        Some(SitePrediction::Modal(block)) => format!(
            "{{\"standard_class\":{block},\"share\":{:.3}}}",
            mode_share(s)
        ),
        None => "null".into(),
    }
}

fn human(b: f64) -> String {
    if b >= 1e9 {
        format!("{:.1}G", b / (1u64 << 30) as f64)
    } else if b >= 1e6 {
        format!("{:.1}M", b / (1u64 << 20) as f64)
    } else if b >= 1e3 {
        format!("{:.1}K", b / 1024.0)
    } else {
        format!("{b:.0}")
    }
}

/// The mean lifetime of the site's followed samples (a share of those over 8 KiB are
/// followed to their free, see the README), and the share of them freed before exit.
fn lifetime(s: &ProfileSite) -> String {
    if s.followed == 0 {
        return "not followed".into();
    }
    if s.freed == 0 {
        return "live at exit".into();
    }
    let ns = s.lifetime_ns / s.freed;
    let text = if ns >= 1_000_000_000 {
        format!("{:.1}s", ns as f64 / 1e9)
    } else if ns >= 1_000_000 {
        format!("{:.1}ms", ns as f64 / 1e6)
    } else {
        format!("{:.1}us", ns as f64 / 1e3)
    };
    if s.freed < s.followed {
        format!("{text} ({}% freed)", s.freed * 100 / s.followed)
    } else {
        text
    }
}

fn table(program: &Path, p: &Profile, rows: &mut [Row]) -> String {
    let mut o = String::new();
    let total: f64 = rows.iter().map(|r| r.est_bytes).sum();
    let _ = writeln!(
        o,
        "{}: {} runs, {} samples (one per {} bytes on average), about {} allocated",
        program.display(),
        p.runs,
        rows.iter().map(|r| r.site.samples).sum::<u64>(),
        p.interval,
        human(total)
    );
    for (title, by_count) in [("by bytes", false), ("by count", true)] {
        rows.sort_by(|a, b| {
            let (x, y) = if by_count {
                (a.est_calls, b.est_calls)
            } else {
                (a.est_bytes, b.est_bytes)
            };
            y.total_cmp(&x)
        });
        let _ = writeln!(o, "\ntop call sites {title}:");
        let _ = writeln!(
            o,
            "{:>8} {:>8} {:>5} {:>13} {:>22} {:>8} {:>12}  {:<30} site",
            "bytes", "calls", "share", "size", "lifetime", "static", "learned", "plan"
        );
        for r in rows.iter().take(TOP) {
            let s = r.site;
            let size = if s.size_min == s.size_max {
                s.size_min.to_string()
            } else {
                format!("{}-{}", s.size_min, s.size_max)
            };
            let _ = writeln!(
                o,
                "{:>8} {:>8} {:>4.0}% {:>13} {:>22} {:>8} {:>12}  {:<30} {} ({})",
                human(r.est_bytes),
                human(r.est_calls),
                100.0 * r.est_bytes / total.max(1.0),
                size,
                lifetime(s),
                r.static_size.map_or("-".into(), |v| v.to_string()),
                learned(s),
                r.plan,
                r.symbol,
                Path::new(r.module)
                    .file_name()
                    .map_or(r.module.into(), |f| f.to_string_lossy())
            );
        }
    }
    o
}

fn jstr(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn json_report(program: &Path, p: &Profile, rows: &[Row]) -> String {
    let mut o = format!(
        "{{\"program\":{},\"runs\":{},\"interval\":{},\"sites\":[",
        jstr(&program.to_string_lossy()),
        p.runs,
        p.interval
    );
    for (i, r) in rows.iter().enumerate() {
        let s = r.site;
        let _ = write!(
            o,
            "{}{{\"module\":{},\"offset\":{},\"symbol\":{},\"samples\":{},\"followed\":{},\"est_bytes\":{:.0},\"est_calls\":{:.0},\"size_min\":{},\"size_max\":{},\"align\":{},\"threads\":{},\"freed\":{},\"mean_lifetime_ns\":{},\"max_lifetime_ns\":{},\"static_size\":{},\"learned\":{},\"plan\":{}}}",
            if i > 0 { "," } else { "" },
            jstr(r.module),
            s.offset,
            jstr(&r.symbol),
            s.samples,
            s.followed,
            r.est_bytes,
            r.est_calls,
            s.size_min,
            s.size_max,
            s.align,
            s.threads,
            s.freed,
            s.lifetime_ns / s.freed.max(1),
            s.lifetime_max_ns,
            r.static_size.map_or("null".into(), |v| v.to_string()),
            learned_json(s),
            jstr(&r.plan)
        );
    }
    o.push_str("],\"classes\":[");
    for (i, (size, n)) in p.classes.iter().enumerate() {
        let _ = write!(
            o,
            "{}{{\"block_size\":{size},\"samples\":{n},\"est_bytes\":{}}}",
            if i > 0 { "," } else { "" },
            n * p.interval
        );
    }
    o.push_str("]}\n");
    o
}

/// Bytes by size class: observed (all samples) beside predicted (the sites whose size
/// the static analysis proved, placed at the class of the predicted size).
fn plot_svg(p: &Profile, rows: &[Row]) -> String {
    let classes: Vec<u64> = p.classes.iter().map(|c| c.0).collect();
    let class_of = |size: u64| classes.iter().position(|&b| b >= size);
    let mut observed = vec![0f64; classes.len()];
    for (i, c) in p.classes.iter().enumerate() {
        observed[i] = (c.1 * p.interval) as f64;
    }
    let mut predicted = vec![0f64; classes.len()];
    for r in rows {
        if let Some(i) = r.static_size.and_then(class_of) {
            predicted[i] += r.est_bytes;
        }
    }
    let max = observed
        .iter()
        .chain(&predicted)
        .copied()
        .fold(1.0, f64::max);
    let (bar, gap, h, left, top) = (14.0, 10.0, 300.0, 60.0, 40.0);
    let width = left + classes.len() as f64 * (2.0 * bar + gap) + 40.0;
    let mut o = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{:.0}\" font-family=\"sans-serif\" font-size=\"10\">\n",
        top + h + 60.0
    );
    let _ = writeln!(
        o,
        "<text x=\"{left}\" y=\"16\" font-size=\"13\">bytes by size class: observed (blue) vs predicted by static analysis (orange); max {}</text>",
        human(max)
    );
    let _ = writeln!(
        o,
        "<line x1=\"{left}\" y1=\"{}\" x2=\"{:.0}\" y2=\"{}\" stroke=\"black\"/>",
        top + h,
        width - 20.0,
        top + h
    );
    for (i, &size) in classes.iter().enumerate() {
        let x = left + i as f64 * (2.0 * bar + gap);
        for (k, (v, color)) in [(observed[i], "#3b6fb6"), (predicted[i], "#e8892b")]
            .iter()
            .enumerate()
        {
            let bh = h * v / max;
            let _ = writeln!(
                o,
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{bar}\" height=\"{bh:.1}\" fill=\"{color}\"><title>{size} B: {}</title></rect>",
                x + k as f64 * bar,
                top + h - bh,
                human(*v)
            );
        }
        let _ = writeln!(
            o,
            "<text x=\"{:.1}\" y=\"{:.1}\" transform=\"rotate(60 {:.1} {:.1})\">{size}</text>",
            x,
            top + h + 12.0,
            x,
            top + h + 12.0
        );
    }
    o.push_str("</svg>\n");
    o
}
