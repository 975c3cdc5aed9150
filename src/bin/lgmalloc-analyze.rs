//! `lgmalloc-analyze`: the allocation call sites of ELF executables, their predicted
//! sizes and the wrappers found, as a table or as JSON.
//!
//! JSON: one object for one file; an array of objects (one per file analysed
//! successfully) for several files. Failures go to stderr as
//! `lgmalloc-analyze: <path>: <reason>` and make the exit code 1.
//!
//! `--cache-list` and `--cache-clear` show and empty the cache directory instead.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use lgmalloc::analysis::cache_dir::{CacheDir, CacheFile};
use lgmalloc::analysis::{Analysis, CallSite, analyze_path, analyze_path_within};

#[path = "profile_view.rs"]
mod profile_view;

const USAGE: &str = "\
usage: lgmalloc-analyze [--json] [--no-cache] [--budget-ms N] ELF...
       lgmalloc-analyze --cache-list [--json] | --cache-clear
       lgmalloc-analyze --profile PROGRAM [--json] [--plot FILE.svg]

Finds the allocation call sites of x86-64 ELF executables (malloc, calloc, realloc,
aligned/posix_memalign, C++ operator new, Rust __rust_alloc, lg_* and their wrappers)
and the request size at each site where the code proves it.

options:
  --json       print JSON (one object per file; an array for several files)
  --no-cache   analyse afresh; neither read nor write the result cache
  --budget-ms N  give up on a file whose analysis takes more than N ms of CPU time
  --cache-list lgmalloc's files in the cache directory: last use, disk usage, name
               (most recent first); with --json, one object
  --cache-clear  remove lgmalloc's files from the cache directory (analyses, plans,
               observations, temporaries, the lock file); other files stay
  --profile PROGRAM  the allocation profile sampled runs of PROGRAM stored (about one
               allocation per 256 KiB allocated): top call sites by bytes and by count,
               symbolized, with sizes, lifetimes, the static prediction and the plan
  --plot FILE.svg  with --profile: draw bytes by size class, observed vs predicted
  -h, --help   print this help

The cache lives in $LGMALLOC_CACHE_DIR, else $XDG_CACHE_HOME/lgmalloc, else
$HOME/.cache/lgmalloc, and is used only if owned by you and not writable by group or
others. Its disk usage is kept under $LGMALLOC_CACHE_MAX_MB (default 64) MiB by removing
the least recently used entries.

exit status: 0 success, 1 a file could not be analysed, 2 usage error
";

#[derive(Clone, Copy, PartialEq)]
enum CacheCmd {
    List,
    Clear,
}

struct Options {
    json: bool,
    cache_cmd: Option<CacheCmd>,
    cache: bool,
    budget: Option<Duration>,
    files: Vec<PathBuf>,
    profile: Option<PathBuf>,
    plot: Option<PathBuf>,
}

enum Cli {
    Run(Options),
    Help,
    Usage(String),
}

fn parse_args(args: impl Iterator<Item = std::ffi::OsString>) -> Cli {
    let mut opts = Options {
        json: false,
        cache_cmd: None,
        cache: true,
        budget: None,
        files: Vec::new(),
        profile: None,
        plot: None,
    };
    let mut only_files = false;
    let mut args = args;
    while let Some(arg) = args.next() {
        if only_files {
            opts.files.push(arg.into());
            continue;
        }
        match arg.to_str() {
            Some("--json") => opts.json = true,
            Some("--no-cache") => opts.cache = false,
            Some("--cache-list") => opts.cache_cmd = Some(CacheCmd::List),
            Some("--cache-clear") => opts.cache_cmd = Some(CacheCmd::Clear),
            Some("--budget-ms") => {
                match args.next().and_then(|v| v.to_str()?.parse::<u64>().ok()) {
                    Some(ms) => opts.budget = Some(Duration::from_millis(ms)),
                    None => return Cli::Usage("--budget-ms needs a number of milliseconds".into()),
                }
            }
            Some("--profile") => match args.next() {
                Some(p) => opts.profile = Some(p.into()),
                None => return Cli::Usage("--profile needs a program".into()),
            },
            Some("--plot") => match args.next() {
                Some(p) => opts.plot = Some(p.into()),
                None => return Cli::Usage("--plot needs a file name".into()),
            },
            Some("-h" | "--help") => return Cli::Help,
            Some("--") => only_files = true,
            Some(s) if s.starts_with('-') && s.len() > 1 => {
                return Cli::Usage(format!("unknown option '{s}'"));
            }
            _ => opts.files.push(arg.into()),
        }
    }
    if opts.profile.is_some() || opts.plot.is_some() {
        if opts.profile.is_none() || !opts.files.is_empty() || opts.cache_cmd.is_some() {
            return Cli::Usage("--profile takes one program (and --plot needs --profile)".into());
        }
        return Cli::Run(opts);
    }
    if opts.cache_cmd.is_some() {
        if !opts.files.is_empty() {
            return Cli::Usage("--cache-list and --cache-clear take no file".into());
        }
        return Cli::Run(opts);
    }
    if opts.files.is_empty() {
        return Cli::Usage("no ELF file given".into());
    }
    Cli::Run(opts)
}

fn main() -> ExitCode {
    let opts = match parse_args(std::env::args_os().skip(1)) {
        Cli::Run(o) => o,
        Cli::Help => {
            emit(USAGE);
            return ExitCode::SUCCESS;
        }
        Cli::Usage(msg) => {
            eprint!("lgmalloc-analyze: {msg}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let ok = match (&opts.profile, opts.cache_cmd) {
        (Some(program), _) => profile_view::show(program, opts.json, opts.plot.as_deref()),
        (None, Some(cmd)) => cache_command(cmd, opts.json),
        (None, None) => run(&opts),
    };
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Analyses every file and prints the results; false if any file failed.
fn run(opts: &Options) -> bool {
    let mut ok = true;
    let mut objects = Vec::new();
    for path in &opts.files {
        let start = Instant::now();
        let result = match opts.budget {
            Some(b) => analyze_path_within(path, opts.cache, b),
            None => analyze_path(path, opts.cache),
        };
        match result {
            Ok(a) => {
                let us = start.elapsed().as_micros();
                if opts.json {
                    objects.push(json(path, &a, us));
                } else {
                    emit(&table(path, &a, us));
                }
            }
            Err(e) => {
                eprintln!("lgmalloc-analyze: {}: {e}", path.display());
                ok = false;
            }
        }
    }
    if opts.json {
        if opts.files.len() == 1 {
            for o in &objects {
                emit(&format!("{o}\n"));
            }
        } else {
            emit(&format!("[{}]\n", objects.join(",\n")));
        }
    }
    ok
}

/// `--cache-list` / `--cache-clear`; false when there is no usable cache directory.
fn cache_command(cmd: CacheCmd, json: bool) -> bool {
    let dir = match CacheDir::try_open() {
        Ok(d) => d,
        Err(why) if why.is_empty() => {
            eprintln!(
                "lgmalloc-analyze: no cache directory (set LGMALLOC_CACHE_DIR, XDG_CACHE_HOME or HOME)"
            );
            return false;
        }
        Err(why) => {
            eprintln!("lgmalloc-analyze: cache directory not used: {why}");
            return false;
        }
    };
    match cmd {
        CacheCmd::Clear => {
            let n = dir.clear();
            emit(&format!(
                "removed {n} files from {}\n",
                dir.path().display()
            ));
        }
        CacheCmd::List if json => emit(&cache_json(&dir)),
        CacheCmd::List => emit(&cache_table(&dir)),
    }
    true
}

/// The cache's files, most recent first, and its disk usage as the bound counts it
/// (the directory's own blocks included, as `du` counts them).
fn cache_listing(dir: &CacheDir) -> (Vec<CacheFile>, u64) {
    (dir.entries(), dir.usage())
}

fn cache_table(dir: &CacheDir) -> String {
    let (files, used) = cache_listing(dir);
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{}  {} used by {} files, limit {}",
        dir.path().display(),
        human(used),
        files.len(),
        human(dir.max_bytes()),
    );
    if files.is_empty() {
        return o;
    }
    let _ = writeln!(o, "  {:<23} {:>10}  name", "last use (UTC)", "disk");
    for f in &files {
        let _ = writeln!(
            o,
            "  {:<23} {:>10}  {}",
            utc(f.last_use_ns.div_euclid(1_000_000_000)),
            human(f.disk_bytes),
            f.name
        );
    }
    o
}

fn cache_json(dir: &CacheDir) -> String {
    let (files, used) = cache_listing(dir);
    let mut o = String::new();
    let _ = write!(
        o,
        "{{\"dir\":{},\"max_bytes\":{},\"used_bytes\":{used},\"files\":[",
        jstr(&dir.path().to_string_lossy()),
        dir.max_bytes(),
    );
    for (i, f) in files.iter().enumerate() {
        if i > 0 {
            o.push(',');
        }
        let _ = write!(
            o,
            "{{\"name\":{},\"disk_bytes\":{},\"bytes\":{},\"last_use\":{}}}",
            jstr(&f.name),
            f.disk_bytes,
            f.len,
            f.last_use_ns.div_euclid(1_000_000_000),
        );
    }
    o.push_str("]}\n");
    o
}

/// Bytes as KiB or MiB with one decimal.
fn human(bytes: u64) -> String {
    if bytes < 1 << 20 {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
    }
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of Unix time `secs` (civil-from-days, H. Hinnant).
fn utc(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Writes to stdout; a closed pipe (`| head`) is not an error worth a panic.
fn emit(text: &str) {
    use std::io::Write as _;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

fn callee_name<'a>(a: &'a Analysis, s: &CallSite) -> &'a str {
    a.callee(s).map_or("?", |c| c.name.as_str())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

// ---------------------------------------------------------------- table

fn table(path: &Path, a: &Analysis, us: u128) -> String {
    let mut o = String::new();
    let sized = a.call_sites.iter().filter(|s| s.size.is_some()).count();
    let share = percent(sized, a.call_sites.len());
    let _ = writeln!(o, "{}", path.display());
    let _ = writeln!(
        o,
        "  build-id {}  code {:.1} MiB  {}  analysed in {:.2} ms{}",
        a.build_id.as_deref().map_or("none".into(), hex),
        a.text_bytes as f64 / (1024.0 * 1024.0),
        if a.pie { "PIE" } else { "non-PIE" },
        us as f64 / 1000.0,
        if a.from_cache { " (cached)" } else { "" },
    );
    let _ = writeln!(
        o,
        "  {} call sites, {sized} with a constant size ({share:.1}%), {} wrappers",
        a.call_sites.len(),
        a.wrappers().count()
    );
    callee_rows(&mut o, a);
    wrapper_rows(&mut o, a);
    class_rows(&mut o, a);
    o.push('\n');
    o
}

fn percent(part: usize, whole: usize) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

fn callee_rows(o: &mut String, a: &Analysis) {
    let _ = writeln!(
        o,
        "\n  {:<40} {:>6} {:>6}  size argument",
        "callee", "sites", "const"
    );
    for (i, c) in a.callees.iter().enumerate() {
        let sites: Vec<&CallSite> = a
            .call_sites
            .iter()
            .filter(|s| s.callee as usize == i)
            .collect();
        if sites.is_empty() {
            continue;
        }
        let sized = sites.iter().filter(|s| s.size.is_some()).count();
        let _ = writeln!(
            o,
            "  {:<40} {:>6} {:>6}  {}",
            c.name,
            sites.len(),
            sized,
            c.arg.describe()
        );
    }
}

fn wrapper_rows(o: &mut String, a: &Analysis) {
    if a.wrappers().next().is_none() {
        return;
    }
    let _ = writeln!(o, "\n  wrappers");
    for w in a.wrappers() {
        let inner = w
            .wraps
            .and_then(|i| a.callees.get(i as usize))
            .map_or("?", |c| c.name.as_str());
        let zero = w.zero_to.map_or(String::new(), |z| format!(" (0 -> {z})"));
        let _ = writeln!(
            o,
            "  {:#10x}  {:<40} {} -> {inner}{zero}",
            w.addr,
            w.name,
            w.arg.describe()
        );
    }
}

fn class_rows(o: &mut String, a: &Analysis) {
    if a.size_classes.is_empty() {
        return;
    }
    let _ = writeln!(o, "\n  {:>10} {:>6}  confidence", "size", "sites");
    for c in a.predicted_sizes() {
        let _ = writeln!(o, "  {:>10} {:>6}  {:.3}", c.size, c.sites, c.confidence);
    }
}

// ---------------------------------------------------------------- JSON

/// A JSON string literal.
fn jstr(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for ch in s.chars() {
        match ch {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            '\t' => o.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{2028}' || c == '\u{2029}' => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn json(path: &Path, a: &Analysis, us: u128) -> String {
    let mut o = String::new();
    let _ = write!(
        o,
        "{{\"path\":{},\"build_id\":{},\"text_bytes\":{},\"pie\":{},\"cached\":{},\"analysis_us\":{us},",
        jstr(&path.to_string_lossy()),
        a.build_id
            .as_deref()
            .map_or("null".into(), |b| jstr(&hex(b))),
        a.text_bytes,
        a.pie,
        a.from_cache,
    );
    o.push_str("\"call_sites\":[");
    for (i, s) in a.call_sites.iter().enumerate() {
        if i > 0 {
            o.push(',');
        }
        let _ = write!(
            o,
            "{{\"site\":\"{:#x}\",\"callee\":{},\"size\":{},\"confidence\":{:.3},\"via_wrapper\":{},\"in_wrapper\":{},\"tail\":{}}}",
            s.site,
            jstr(callee_name(a, s)),
            s.size.map_or("null".into(), |z| z.to_string()),
            s.confidence,
            s.via_wrapper,
            s.in_wrapper,
            s.tail,
        );
    }
    o.push_str("],\"wrappers\":[");
    for (i, w) in a.wrappers().enumerate() {
        if i > 0 {
            o.push(',');
        }
        let inner = w
            .wraps
            .and_then(|i| a.callees.get(i as usize))
            .map_or("?", |c| c.name.as_str());
        let _ = write!(
            o,
            "{{\"name\":{},\"addr\":\"{:#x}\",\"arg\":{},\"wraps\":{},\"allocator\":{},\"depth\":{}}}",
            jstr(&w.name),
            w.addr,
            jstr(&w.arg.describe()),
            jstr(inner),
            jstr(w.func.name()),
            w.depth,
        );
    }
    o.push_str("],\"size_classes\":[");
    for (i, c) in a.predicted_sizes().iter().enumerate() {
        if i > 0 {
            o.push(',');
        }
        let _ = write!(
            o,
            "{{\"size\":{},\"sites\":{},\"confidence\":{:.3}}}",
            c.size, c.sites, c.confidence
        );
    }
    o.push_str("]}");
    o
}
