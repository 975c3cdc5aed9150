"""The thread-scaling, test-stress and Rust-arm parts of bench/run.py (issue 14).

run.py defines the workloads and runs them; this module builds the Rust arm, counts
system calls with strace, writes the report sections of these workloads and draws the
thread-scaling plot as SVG (no plotting library needed). Standard library only.
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

SCALING_THREADS = [1, 2, 4, 8, 16, 32]
# (name, bench/src program, what it does)
SCALING_KINDS = [
    ("larson", "larson",
     "N chains of threads at once; each thread replaces random objects of its chain's table, "
     "then hands the table to a new thread and exits (objects freed by later threads)"),
    ("ring", "prodcons",
     "N threads in a ring: each allocates objects and passes them to the next thread, "
     "which frees them (every free is remote)"),
]
RUST_VARIANTS = {"lg": "lgmalloc (LgMalloc)", "mi": "mimalloc crate", "sys": "System (glibc)"}
RUST_FEATURES = {"lg": ["--features", "lg"], "mi": ["--features", "mi"], "sys": []}
# The strace pass: which system calls are counted.
STRACE_CALLS = ["futex", "madvise", "mmap", "munmap"]
COLORS = {"glibc": "#7f7f7f", "mimalloc": "#1f77b4", "jemalloc": "#2ca02c",
          "tcmalloc": "#9467bd", "scudo": "#8c564b", "lgmalloc": "#d62728",
          "mimalloc3": "#17becf", "snmalloc": "#ff7f0e"}


def scaling_name(kind: str, threads: int) -> str:
    return f"scaling-{kind}-{threads}"


# ---- building the Rust arm ----------------------------------------------------------


def build_rust_arm(crate: Path, bin_dir: Path, target_dir: Path, skip: bool, log) -> dict[str, str]:
    """Builds bench/rust-arm once per allocator and copies each binary to
    bin_dir/rust-arm-<variant>. Returns {variant: why it is missing} for those that are."""
    missing = {}
    bin_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, CARGO_TARGET_DIR=str(target_dir))
    for v, features in RUST_FEATURES.items():
        dest = bin_dir / f"rust-arm-{v}"
        if not skip:
            cmd = ["cargo", "build", "--release", "--locked", *features]
            t0 = time.monotonic()
            r = subprocess.run(cmd, cwd=crate, env=env, text=True, capture_output=True)
            if r.returncode != 0:
                missing[v] = f"`{' '.join(cmd)}` in bench/rust-arm failed: {r.stderr.strip()[-300:]}"
                log(f"note: Rust arm {v} not built: {r.stderr.strip()[-1500:]}")
                continue
            shutil.copy2(target_dir / "release" / "lgmalloc-rust-arm", dest)
            log(f"build: Rust arm {v} in {time.monotonic() - t0:.0f} s -> {dest}")
        if not dest.exists():
            missing[v] = f"{dest} is missing (run without --no-build)"
    return missing


# ---- system calls -------------------------------------------------------------------


def strace_counts(argv: list[str], env: dict[str, str], preload: str | None, timeout: int) -> dict:
    """Runs argv once under `strace -f -c` and returns {call: calls, call_errors: errors}
    for STRACE_CALLS, or {"error": why}. LD_PRELOAD is set for the traced program only."""
    strace = shutil.which("strace")
    if not strace:
        return {"error": "strace is not installed"}
    with tempfile.NamedTemporaryFile("r", prefix="lgbench-strace-", suffix=".txt") as out:
        cmd = [strace, "-f", "-c", "-e", "trace=" + ",".join(STRACE_CALLS), "-o", out.name]
        if preload:
            cmd += ["-E", f"LD_PRELOAD={preload}"]
        try:
            r = subprocess.run(cmd + argv, env=env, text=True, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timeout after {timeout} s"}
        if r.returncode != 0:
            return {"error": f"exit {r.returncode}: {r.stderr.strip()[-300:]}"}
        text = out.read()
    counts = {c: 0 for c in STRACE_CALLS}
    counts.update({f"{c}_errors": 0 for c in STRACE_CALLS})
    for line in text.splitlines():
        parts = line.split()
        if len(parts) in (5, 6) and parts[-1] in STRACE_CALLS and parts[3].isdigit():
            counts[parts[-1]] = int(parts[3])
            counts[f"{parts[-1]}_errors"] = int(parts[4]) if len(parts) == 6 else 0
    return counts


# ---- report sections ----------------------------------------------------------------


def fnum(x: float, digits: int = 3) -> str:
    """A number for the report tables (also used by run.py): thousands grouped, fewer
    decimals as the magnitude grows."""
    if x is None or not math.isfinite(x):
        return "–"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.{digits - 1}f}" if abs(x) >= 1 else f"{x:.{digits}f}"


def _vals(rep, arm, wl, alloc, key) -> list[float]:
    out = []
    for s in rep.samples.get((arm, wl, alloc), []):
        try:
            v = float(s.get(key))
        except (TypeError, ValueError):
            continue
        if math.isfinite(v):
            out.append(v)
    return out


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _strace_cell(rep, wl, alloc) -> tuple[str, str]:
    """(futex, madvise) cells from the strace pass."""
    s = rep.samples.get(("strace", wl, alloc))
    if not s:
        return "–", "–"
    if "error" in s[0]:
        return "failed", "failed"
    c = s[0]
    fut = f"{c['futex']:,}" + (f" ({c['futex_errors']:,} failed)" if c.get("futex_errors") else "")
    return fut, f"{c['madvise']:,}"


def _peak_threads(cpus: int | None) -> list[int]:
    """The thread counts from the CPU count up to (not including) 32."""
    ts = [t for t in SCALING_THREADS if (cpus or 2) <= t < 32]
    return ts or [t for t in SCALING_THREADS if t < 32][-1:]


def _peak_range(cpus: int | None) -> str:
    ts = _peak_threads(cpus)
    return f"{ts[0]}–{ts[-1]}" if len(ts) > 1 else str(ts[0])


def scaling_allocators(rep) -> list[str]:
    return [a for a in rep.pre if any(k[0] == "preload" and k[1].startswith("scaling-") and k[2] == a
                                      for k in rep.samples)]


def scaling_section(rep, svg_name: str | None) -> list[str]:
    allocs = scaling_allocators(rep)
    if not allocs:
        return []
    cpus = rep.meta.get("nproc")
    L = ["## Thread scaling (LD_PRELOAD arm)\n",
         f"Throughput at 1–32 threads on this {cpus}-CPU machine (threads beyond the CPUs are "
         "oversubscribed: a lock held by a descheduled thread stalls the others). Each run shares "
         "out the work of min(threads, CPUs) threads, so an allocator that scales keeps its "
         "throughput flat from the CPU count on. Median M ops/s of the rounds [min–max]; "
         "the last column is the throughput at 32 threads over the allocator's best at "
         f"{_peak_range(cpus)} threads (1.00 = no loss under oversubscription). On a shared "
         "machine, more threads also win a larger share of the CPUs from other processes, "
         "which favours the higher thread counts for every allocator alike.\n"]
    for kind, _, desc in SCALING_KINDS:
        ts = [t for t in SCALING_THREADS if any((("preload", scaling_name(kind, t), a) in rep.samples)
                                               for a in allocs)]
        if not ts:
            continue
        L += [f"**{kind}**: {desc}.\n",
              "| allocator | " + " | ".join(f"{t} thr" for t in ts) + f" | 32 / best of {_peak_range(cpus)} |",
              "|---|" + "---|" * (len(ts) + 1)]
        for a in allocs:
            cells = []
            for t in ts:
                v = _vals(rep, "preload", scaling_name(kind, t), a, "mops_per_s")
                cells.append(f"{fnum(_med(v))}<br><sub>[{fnum(min(v))}–{fnum(max(v))}]</sub>" if v else "–")
            hi = _med(_vals(rep, "preload", scaling_name(kind, 32), a, "mops_per_s"))
            peak = max([_med(_vals(rep, "preload", scaling_name(kind, t), a, "mops_per_s"))
                        for t in _peak_threads(cpus)] or [float("nan")])
            L.append(f"| {a} | " + " | ".join(cells) + f" | {fnum(hi / peak) if peak > 0 else '–'} |")
        L.append("")
    if svg_name:
        L.append(f"![thread scaling]({svg_name})\n")
    return L


def test_stress_section(rep) -> list[str]:
    wl = "test-stress"
    allocs = [a for a in rep.pre if ("preload", wl, a) in rep.samples]
    if not allocs:
        return []
    ref = "mimalloc3" if "mimalloc3" in allocs else allocs[0]
    ref_t = _med(_vals(rep, "preload", wl, ref, "time_s"))
    L = ["## mimalloc's test-stress (LD_PRELOAD arm)\n",
         "mimalloc v3.4.3's `test/test-stress.c` built with `-DUSE_STD_MALLOC` by "
         "`bench/build-peers.sh` (defaults: 32 threads, scale 50, 50 iterations; objects "
         "handed between threads, threads ended and restarted). Wall time of the process and "
         f"its peak RSS, median [min–max] of the rounds; system calls from one separate run "
         f"under `strace -f -c` (not timed).\n",
         f"| allocator | time s | × {ref} | peak RSS MiB | futex calls | madvise calls |",
         "|---|---|---|---|---|---|"]
    for a in allocs:
        t = _vals(rep, "preload", wl, a, "time_s")
        rss = _vals(rep, "preload", wl, a, "launch_maxrss_kib")
        fut, mad = _strace_cell(rep, wl, a)
        L.append(f"| {a} | {fnum(_med(t))} <sub>[{fnum(min(t))}–{fnum(max(t))}]</sub> | "
                 f"{fnum(_med(t) / ref_t)} | {fnum(_med(rss) / 1024)} <sub>[{fnum(min(rss) / 1024)}–"
                 f"{fnum(max(rss) / 1024)}]</sub> | {fut} | {mad} |")
    L.append("")
    return L


def rust_section(rep) -> list[str]:
    wl = "rust-arm"
    variants = [v for v in RUST_VARIANTS if ("rust", wl, v) in rep.samples]
    if not variants:
        return []
    ref = "mi" if "mi" in variants else variants[0]
    ref_t = _med(_vals(rep, "rust", wl, ref, "time_s"))
    L = ["## Rust arm (`#[global_allocator]`)\n",
         "One Rust program (`bench/rust-arm`: hash maps of formatted strings holding vectors, "
         "a BTreeMap, two worker threads pushing and removing boxed slices and handing some to "
         "each other; release build) built three ways: `lgmalloc::LgMalloc`, the `mimalloc` "
         "crate and std's `System`. Time of the work, median [min–max] of the rounds; peak RSS "
         "of the process; system calls from one separate run under `strace -f -c` (not timed). "
         "Issue 14's goal for lgmalloc: no slower than the mimalloc crate, at most 50 futex "
         "and 500 madvise calls.\n",
         f"| global allocator | time s | × {RUST_VARIANTS[ref]} | peak RSS MiB | futex calls "
         "| madvise calls |", "|---|---|---|---|---|---|"]
    for v in variants:
        t = _vals(rep, "rust", wl, v, "time_s")
        rss = _vals(rep, "rust", wl, v, "launch_maxrss_kib")
        fut, mad = _strace_cell(rep, wl, v)
        L.append(f"| {RUST_VARIANTS[v]} | {fnum(_med(t))} <sub>[{fnum(min(t))}–{fnum(max(t))}]</sub> | "
                 f"{fnum(_med(t) / ref_t)} | {fnum(_med(rss) / 1024)} | {fut} | {mad} |")
    L.append("")
    return L


def sections(rep, svg_name: str | None) -> list[str]:
    return test_stress_section(rep) + rust_section(rep) + scaling_section(rep, svg_name)


# ---- the scaling plot (SVG) ---------------------------------------------------------


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def write_scaling_svg(rep, path: Path) -> bool:
    """One panel per scaling workload: median throughput against threads (log2 axis),
    one line per allocator. Returns False (and writes nothing) without scaling data."""
    allocs = scaling_allocators(rep)
    kinds = [k for k, _, _ in SCALING_KINDS
             if any(("preload", scaling_name(k, t), a) in rep.samples for t in SCALING_THREADS for a in allocs)]
    if not kinds:
        return False
    pw, ph, ml, mr, mt, mb = 520, 340, 60, 20, 40, 50  # panel size and margins
    width, height = pw * len(kinds), ph + 70
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>']
    m = rep.meta
    out.append(f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="14">Thread scaling, '
               f'lgmalloc {_esc(m.get("lg_commit", "")[:10])} vs peers: {m.get("nproc")} CPUs, '
               f'medians of the rounds (higher is better)</text>')
    xs = {t: i for i, t in enumerate(SCALING_THREADS)}
    for p, kind in enumerate(kinds):
        x0 = p * pw + ml
        plot_w, plot_h = pw - ml - mr, ph - mt - mb
        y_top = mt + 10
        series = {a: [(t, _med(_vals(rep, "preload", scaling_name(kind, t), a, "mops_per_s")))
                      for t in SCALING_THREADS] for a in allocs}
        ymax = max([v for s in series.values() for _, v in s if math.isfinite(v)] or [1.0])
        step = 10 ** math.floor(math.log10(ymax / 4)) if ymax > 0 else 1
        for mult in (1, 2, 5, 10):
            if ymax / (step * mult) <= 6:
                step *= mult
                break
        ytop_val = step * math.ceil(ymax / step)

        def px(t: int) -> float:
            return x0 + plot_w * xs[t] / (len(SCALING_THREADS) - 1)

        def py(v: float) -> float:
            return y_top + plot_h * (1 - v / ytop_val)

        out.append(f'<text x="{x0 + plot_w / 2}" y="{y_top - 8}" text-anchor="middle" '
                   f'font-size="13">{kind} (M ops/s)</text>')
        v = 0.0
        while v <= ytop_val + 1e-9:
            y = py(v)
            out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + plot_w}" y2="{y:.1f}" stroke="#ddd"/>')
            out.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end">{v:g}</text>')
            v += step
        for t in SCALING_THREADS:
            out.append(f'<text x="{px(t):.1f}" y="{y_top + plot_h + 16}" text-anchor="middle">{t}</text>')
        out.append(f'<text x="{x0 + plot_w / 2}" y="{y_top + plot_h + 34}" text-anchor="middle">threads</text>')
        out.append(f'<rect x="{x0}" y="{y_top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#444"/>')
        for a, pts in series.items():
            pts = [(px(t), py(v)) for t, v in pts if math.isfinite(v)]
            if not pts:
                continue
            c = COLORS.get(a, "#333")
            w = 3 if a == "lgmalloc" else 1.6
            out.append(f'<polyline fill="none" stroke="{c}" stroke-width="{w}" points="'
                       + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts) + '"/>')
            out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{c}"/>' for x, y in pts]
    lx = 20
    for a in allocs:
        c = COLORS.get(a, "#333")
        out.append(f'<rect x="{lx}" y="{height - 22}" width="14" height="10" fill="{c}"/>')
        out.append(f'<text x="{lx + 18}" y="{height - 13}">{_esc(a)}</text>')
        lx += 30 + 8 * len(a)
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")
    return True
