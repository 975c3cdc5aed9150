#!/usr/bin/env python3
"""lgmalloc benchmark runner.

    python3 bench/run.py [--quick] [--only NAME,...] [--allocators NAME,...] [--reps N]

Builds lgmalloc (release, plain and with --features override) and the workloads in
bench/src, runs every workload under every allocator with interleaved repetitions,
and writes bench/results.md (+ results.json and results.png). Quick or filtered runs
write bench/results-partial.* instead, so they never overwrite the full results.
See bench/README.md. Python 3.11 standard library only; matplotlib is optional
(pip install matplotlib) and only needed for the plot.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import math
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import suite_extra

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SRC = BENCH / "src"
BUILD = BENCH / "build"
BIN = BUILD / "bin"
LIBDIR = "/usr/lib/x86_64-linux-gnu"


# ---- allocators ---------------------------------------------------------------------


@dataclass
class Allocator:
    name: str
    preload: str | None  # library for LD_PRELOAD; None = the system malloc
    package: str | None  # Debian package, for the version table
    valgrind: bool = True  # runs under valgrind (for the instruction counts)


def scudo_path() -> str | None:
    found = sorted(glob.glob("/usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.scudo_standalone-x86_64.so"))
    return found[-1] if found else None


def preload_allocators() -> list[Allocator]:
    return [
        Allocator("glibc", None, "libc6"),
        Allocator("mimalloc", f"{LIBDIR}/libmimalloc.so.2", "libmimalloc2.0"),
        Allocator("jemalloc", f"{LIBDIR}/libjemalloc.so.2", "libjemalloc2"),
        Allocator("tcmalloc", f"{LIBDIR}/libtcmalloc_minimal.so.4", "libtcmalloc-minimal4"),
        # scudo aborts under valgrind ("internal map or unmap failure": valgrind refuses
        # its address-space reservations), so it has no instruction count.
        Allocator("scudo", scudo_path(), "libclang-rt-14-dev", valgrind=False),
        # The newest anchors, built from their sources by bench/build-peers.sh (skipped
        # with a note when not built). snmalloc does not start under valgrind.
        Allocator("mimalloc3", str(BUILD / "peers" / "libmimalloc-3.4.3.so"), None),
        Allocator("snmalloc", str(BUILD / "peers" / "libsnmalloc-0.7.5.so"), None, valgrind=False),
        Allocator("lgmalloc", str(BUILD / "lg-override" / "liblgmalloc.so"), None),
    ]


# The direct-API arm: one source built three ways (bench/src/alloc_api.h).
API_VARIANTS = {"lg": "lgmalloc lg_*", "mi": "mimalloc mi_*", "malloc": "glibc malloc"}
API_FOR = {"lgmalloc": "lg", "mimalloc": "mi", "glibc": "malloc"}


# ---- workloads ----------------------------------------------------------------------


@dataclass
class Workload:
    name: str
    binary: str  # source stem in bench/src ("" for the python start-up)
    args: list[str]
    metric: str  # headline figure in the RESULT line
    unit: str
    higher_better: bool
    desc: str
    extras: list[str] = field(default_factory=list)  # more RESULT keys to show
    timed: bool = True  # counts in the geometric mean of time ratios
    api: bool = False  # also run in the direct-API arm
    inner: int = 1  # runs per allocator per round
    # Issue 14's additions (report sections in suite_extra.py):
    group: str = ""  # "scaling" / "rust": own section, not in the main tables and summary
    max_reps: int = 0  # run in the first N rounds only (0: every round)
    program: str = ""  # a program built elsewhere, relative to bench/build (time = wall time)
    quick_args: list[str] | None = None  # its arguments under --quick (instead of --quick)
    rust: bool = False  # the Rust arm (bench/rust-arm), not the LD_PRELOAD arm


WORKLOADS = [
    Workload("churn-fixed", "churn", ["sizes=fixed"], "mops_per_s", "M pairs/s", True,
             "1 thread, 2048 live 64-byte objects, random free+malloc", api=True),
    Workload("churn-random", "churn", ["sizes=random"], "mops_per_s", "M pairs/s", True,
             "1 thread, 2048 live objects of 16..1024 bytes, random free+malloc", api=True),
    Workload("larson", "larson", [], "mops_per_s", "M pairs/s", True,
             "4 chains of threads, each thread hands its objects to its successor and exits",
             ["threads"]),
    Workload("server2", "server2", [], "mops_per_s", "M pairs/s", True,
             "2 server threads, constant request sizes, 1/8 of objects freed by the other thread",
             api=True),
    Workload("prodcons", "prodcons", [], "mops_per_s", "M objects/s", True,
             "one thread allocates, the other frees everything"),
    Workload("false-active", "falseshare", ["mode=active"], "time_s", "s", False,
             "2 threads allocate 8-byte objects and write them hard", ["shared_lines"]),
    Workload("false-passive", "falseshare", ["mode=passive"], "time_s", "s", False,
             "as false-active, after freeing neighbouring blocks handed out by main",
             ["shared_lines"]),
    Workload("realloc-grow", "realloc_grow", [], "mops_per_s", "M reallocs/s", True,
             "64 buffers grown by 8..128 bytes per realloc up to 1..256 KiB"),
    Workload("large", "large", [], "kops_per_s", "k allocs/s", True,
             "blocks of 1..32 MiB, first MiB touched", ["faults_per_op", "rss_after_free_kib"]),
    Workload("malloc-large", "malloc_large", [], "time_s", "s", False,
             "mimalloc-bench's malloc-large: 20 slots of 5..25 MiB buffers, fully zeroed",
             ["faults_per_step", "rss_after_free_kib"]),
    Workload("retention", "retention", [], "retained_kib", "KiB", False,
             "RSS left after freeing a 256 MiB peak of mixed objects (2 threads)",
             ["peak_kib", "retained_pct", "retained_later_kib"]),
    Workload("retention-idle", "retention_idle", [], "retained_later_kib", "KiB", False,
             "RSS left 1 s after tables of 8 KiB..4 MiB are dropped, with small-object work",
             ["peak_kib", "retained_kib", "retained_later_pct"], timed=False),
    Workload("short-threads", "threads_short", [], "kthreads_per_s", "k threads/s", True,
             "15000 threads in waves of 4, each 64 allocations, 4 freed by main",
             ["rss_growth_kib"]),
    Workload("idle-threads", "threads_idle", ["mode=alloc"], "per_thread_b", "B/thread", False,
             "500 threads holding 14 objects (24/56/120 B); RSS growth per thread",
             ["growth_kib"], timed=False, api=True),
    Workload("idle-baseline", "threads_idle", ["mode=idle"], "per_thread_b", "B/thread", False,
             "the same 500 threads allocating nothing (baseline)", ["growth_kib"],
             timed=False, api=True),
    Workload("startup", "", [], "wall_ms", "ms", False,
             "wall time of `python3 -c pass`", timed=True),
]
# Issue 14: thread scaling, mimalloc's test-stress and the Rust arm.
WORKLOADS += [
    Workload(suite_extra.scaling_name(kind, t), binary, [f"threads={t}"], "mops_per_s", "M ops/s", True,
             f"{kind} at {t} threads", timed=False, group="scaling", max_reps=5)
    for kind, binary, _ in suite_extra.SCALING_KINDS for t in suite_extra.SCALING_THREADS
] + [
    Workload("test-stress", "", [], "time_s", "s", False,
             "mimalloc v3.4.3 test/test-stress.c (32 threads, objects handed between threads)",
             program="peers/test-stress-3.4.3", quick_args=["32", "50", "5"], max_reps=3),
    Workload("rust-arm", "", [], "time_s", "s", False,
             "a Rust program with lgmalloc, the mimalloc crate or System as global allocator",
             timed=False, group="rust", rust=True, max_reps=7),
]
HOTPATH = "hotpath"
STARTUP_COLD = "startup-cold"


def python_for_startup() -> str:
    # Debian's interpreter, not a pyenv shim (a shell script) that would dominate.
    if os.path.exists("/usr/bin/python3"):
        return "/usr/bin/python3"
    return shutil.which("python3") or sys.executable


# ---- helpers ------------------------------------------------------------------------


def log(msg: str = "") -> None:
    print(msg, flush=True)


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, text=True, capture_output=True, **kw)


def fmt_dur(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}:{s % 60:02d}"


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def geomean(xs: list[float]) -> float:
    xs = [x for x in xs if x > 0 and math.isfinite(x)]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


fnum = suite_extra.fnum


def parse_kv(line: str) -> dict[str, str]:
    out = {}
    for tok in line.split()[1:]:
        if "=" in tok:
            k, v = tok.split("=", 1)
            out[k] = v
    return out


def to_float(v: str | None) -> float:
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("nan")


# ---- build --------------------------------------------------------------------------


def cargo_target_dir() -> Path:
    return Path(os.environ.get("CARGO_TARGET_DIR", "/work/target-bench"))


def build_lgmalloc(skip: bool) -> dict:
    """Builds lgmalloc twice (plain for the lg_* arm, override for LD_PRELOAD) and copies
    each library into bench/build. Returns facts for the report."""
    # The source state being built: commit, and tracked files changed outside bench/.
    status = sh(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"]).stdout
    info = {"override_exports_malloc": False,
            "commit": sh(["git", "-C", str(ROOT), "rev-parse", "HEAD"]).stdout.strip(),
            "subject": sh(["git", "-C", str(ROOT), "log", "-1", "--format=%s"]).stdout.strip(),
            "dirty": [line[3:] for line in status.splitlines() if not line[3:].startswith("bench/")]}
    api_so = BUILD / "lg-api" / "liblgmalloc.so"
    ovr_so = BUILD / "lg-override" / "liblgmalloc.so"
    if not skip:
        env = dict(os.environ, CARGO_TARGET_DIR=str(cargo_target_dir()))
        for features, dest in (([], api_so), (["--features", "override"], ovr_so)):
            cmd = ["cargo", "build", "--release", *features]
            log(f"build: {' '.join(cmd)} (CARGO_TARGET_DIR={env['CARGO_TARGET_DIR']})")
            t0 = time.monotonic()
            r = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True)
            if r.returncode != 0:
                log(r.stderr[-4000:])
                sys.exit(f"cargo build failed: {' '.join(cmd)}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(cargo_target_dir() / "release" / "liblgmalloc.so", dest)
            log(f"build: done in {time.monotonic() - t0:.0f} s -> {dest.relative_to(ROOT)}")
    for so in (api_so, ovr_so):
        if not so.exists():
            sys.exit(f"{so} is missing (run without --no-build)")
    r = sh(["nm", "-D", "--defined-only", str(ovr_so)])
    info["override_exports_malloc"] = any(
        line.split()[-1] == "malloc" for line in r.stdout.splitlines() if line.split())
    return info


def compile_workloads(quiet: bool = False) -> None:
    BIN.mkdir(parents=True, exist_ok=True)
    cc = os.environ.get("CC", "gcc")
    base = [cc, "-O2", "-g", "-Wall", "-Wextra", "-pthread"]
    jobs = [(SRC / "launch.c", BIN / "launch", [])]
    stems = sorted({w.binary for w in WORKLOADS if w.binary} | {HOTPATH})  # C sources only
    api_stems = sorted({w.binary for w in WORKLOADS if w.api} | {HOTPATH})
    lg_dir = BUILD / "lg-api"
    for stem in stems:
        jobs.append((SRC / f"{stem}.c", BIN / f"{stem}-malloc", []))
    for stem in api_stems:
        jobs.append((SRC / f"{stem}.c", BIN / f"{stem}-lg",
                     ["-DUSE_LG", f"-I{ROOT / 'include'}", f"-L{lg_dir}", "-llgmalloc",
                      f"-Wl,-rpath,{lg_dir}"]))
        jobs.append((SRC / f"{stem}.c", BIN / f"{stem}-mi", ["-DUSE_MI", "-lmimalloc"]))
    for src, out, extra in jobs:
        cmd = base + ["-o", str(out), str(src)] + extra
        r = sh(cmd)
        if r.returncode != 0:
            log(r.stderr)
            sys.exit(f"compile failed: {' '.join(cmd)}")
    if not quiet:
        log(f"build: {len(jobs)} workload binaries in {BIN.relative_to(ROOT)}")


# ---- running one program ------------------------------------------------------------


@dataclass
class Run:
    ok: bool
    status: str
    result: dict
    launch: dict
    cmdline: str
    stderr: str


def child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k != "LD_PRELOAD" and not k.startswith(("MALLOC_", "LGMALLOC_", "MIMALLOC_"))}
    env["LGMALLOC_CACHE_DIR"] = str(BUILD / "lgcache")
    env.update(extra)
    return env


def run_program(argv: list[str], preload: str | None, timeout: int,
                extra_env: dict[str, str] | None = None) -> Run:
    extra = dict(extra_env or {})
    if preload:
        extra["LD_PRELOAD"] = preload
    with tempfile.NamedTemporaryFile("r", prefix="lgbench-", suffix=".txt") as rep:
        cmd = [str(BIN / "launch"), "-r", rep.name, "-t", str(timeout)]
        cmd += [f"{k}={v}" for k, v in extra.items()] + ["--"] + argv
        busy0 = cpu_busy_s()
        p = subprocess.run(cmd, env=child_env({}), text=True, capture_output=True,
                           timeout=timeout + 30)
        busy1 = cpu_busy_s()
        launch_line = rep.read().strip()
    launch = parse_kv(launch_line) if launch_line.startswith("LAUNCH") else {}
    # CPU used by other processes while this one ran, in cores (0 .. nproc)
    wall = to_float(launch.get("wall_s"))
    mine = to_float(launch.get("utime_s")) + to_float(launch.get("stime_s"))
    if wall > 0.05 and math.isfinite(mine):
        launch["others_cores"] = f"{max(0.0, (busy1 - busy0 - mine) / wall):.2f}"
    result = {}
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            result = parse_kv(line)
    status = launch.get("status", f"launcher-failed:{p.returncode}")
    envs = " ".join(f"{k}={v}" for k, v in extra.items() if k != "LGMALLOC_CACHE_DIR")
    cmdline = (envs + " " if envs else "") + " ".join(argv)
    ok = status == "exit:0" and (bool(result) or not argv[0].startswith(str(BIN)))
    return Run(ok, status, result, launch, cmdline, p.stderr[-2000:])


def cpu_busy_s() -> float:
    """Seconds of CPU time all processors spent busy since boot (from /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
        v = [int(x) for x in fields[:8]]
        return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def check_preload(a: Allocator) -> str | None:
    """None when the allocator can be preloaded, else why not."""
    if a.preload is None:
        return None
    if not os.path.exists(a.preload):
        return f"{a.preload} not found"
    r = run_program(["/bin/true"], a.preload, 30)
    if not r.ok or "cannot be preloaded" in r.stderr or "ERROR" in r.stderr:
        return f"preload test failed: {r.status} {r.stderr.strip()[:200]}"
    return None


# ---- callgrind ----------------------------------------------------------------------


def hotpath_instructions(binary: Path, preload: str | None, pairs: int,
                         extra_env: dict[str, str] | None = None) -> dict:
    # One output file per process (%p): a child forked under valgrind, such as lgmalloc's
    # deferred analysis after a cold start, would otherwise overwrite the program's.
    with tempfile.TemporaryDirectory(prefix="lgbench-cg-") as d:
        argv = ["/usr/bin/valgrind", "--tool=callgrind", f"--callgrind-out-file={d}/callgrind.out.%p",
                "--toggle-collect=run_pairs", "--toggle-collect=run_empty",
                str(binary), f"pairs={pairs}"]
        r = run_program(argv, preload, 600, {"LD_BIND_NOW": "1", **(extra_env or {})})
        outs = sorted(Path(d).glob("callgrind.out.*"))
        if not r.ok or not outs:
            return {"ok": False, "status": r.status, "cmd": r.cmdline, "stderr": r.stderr}
        incl, ann = {}, ""
        for out in outs:  # the program's file is the one that has the two loops
            ann = sh(["callgrind_annotate", "--inclusive=yes", "--threshold=100", "--auto=no",
                      str(out)]).stdout
            incl = {}
            for line in ann.splitlines():
                m = re.match(r"\s*([\d,]+)\s.*:(run_pairs|run_empty) \[", line)
                if m and m.group(2) not in incl:
                    incl[m.group(2)] = int(m.group(1).replace(",", ""))
            if len(incl) == 2:
                break
    if len(incl) != 2:
        return {"ok": False, "status": "could not parse callgrind_annotate", "cmd": r.cmdline,
                "stderr": ann[-1000:]}
    per_pair = (incl["run_pairs"] - incl["run_empty"] * 1.1) / (1.1 * pairs)
    return {"ok": True, "instr_per_pair": per_pair, "run_pairs": incl["run_pairs"],
            "run_empty": incl["run_empty"], "pairs": pairs, "cmd": r.cmdline}


# ---- the plan -----------------------------------------------------------------------


@dataclass
class Job:
    arm: str  # "preload" or "api"
    workload: Workload
    alloc: str  # allocator name (preload arm) or API variant (api arm)
    argv: list[str]
    preload: str | None
    extra_env: dict[str, str] = field(default_factory=dict)


def select(names: list[str], only: list[str] | None) -> list[str]:
    if not only:
        return names
    keep = []
    for n in names:
        if any(n == o or n.startswith(o) for o in only):
            keep.append(n)
    return keep


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes and 3 rounds (< 5 minutes)")
    ap.add_argument("--only", help="comma-separated workload names or prefixes "
                    f"({', '.join(w.name for w in WORKLOADS)}, {HOTPATH})")
    ap.add_argument("--allocators", help="comma-separated: glibc,mimalloc,jemalloc,tcmalloc,scudo,lgmalloc")
    ap.add_argument("--arm", choices=["both", "preload", "api", "rust"], default="both",
                    help="both = every arm (LD_PRELOAD, direct API, Rust)")
    ap.add_argument("--scaling", action="store_true", help="the thread-scaling workloads only "
                    "(same as --only scaling)")
    ap.add_argument("--reps", type=int, help="rounds (default 9, quick 3)")
    ap.add_argument("--no-build", action="store_true", help="reuse the lgmalloc libraries in bench/build")
    ap.add_argument("--out", help="results file (default bench/results.md, or results-partial.md "
                    "for quick or filtered runs)")
    ap.add_argument("--seed", type=int, default=1, help="seed for the allocator order")
    ap.add_argument("--report-only", metavar="JSON",
                    help="rewrite the .md and .png from a saved results .json, running nothing")
    args = ap.parse_args()
    if args.report_only:
        return report_only(Path(args.report_only))

    t_start = time.monotonic()
    started_at = datetime.datetime.now(datetime.timezone.utc)
    reps = args.reps or (3 if args.quick else 9)
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    if args.scaling:
        only = (only or []) + ["scaling"]
    want_allocs = [s.strip() for s in args.allocators.split(",")] if args.allocators else None
    partial = args.quick or bool(only) or bool(want_allocs) or args.arm != "both"
    out_md = Path(args.out) if args.out else BENCH / ("results-partial.md" if partial else "results.md")
    if not out_md.is_absolute():
        out_md = Path.cwd() / out_md
    load_start = os.getloadavg()

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log("note: matplotlib is not installed, so there will be no plot "
            "(install it with `pip install matplotlib`); the tables are written anyway")

    # -- build
    BUILD.mkdir(exist_ok=True)
    lg_info = build_lgmalloc(args.no_build)
    compile_workloads()
    wants_rust = args.arm in ("both", "rust") and bool(select(["rust-arm"], only))
    rust_missing = (suite_extra.build_rust_arm(BENCH / "rust-arm", BIN, cargo_target_dir() / "rust-arm",
                                              args.no_build, log)
                    if wants_rust else {})
    rust_variants = [v for v in suite_extra.RUST_VARIANTS if v not in rust_missing]

    # -- allocators
    allocs = preload_allocators()
    if want_allocs:
        unknown = set(want_allocs) - {a.name for a in allocs}
        if unknown:
            sys.exit(f"unknown allocator(s): {', '.join(sorted(unknown))}")
        allocs = [a for a in allocs if a.name in want_allocs]
    skipped = {}
    for a in allocs:
        why = check_preload(a)
        if a.name == "lgmalloc" and not lg_info["override_exports_malloc"]:
            why = "the override build does not export malloc yet (feature unfinished)"
        if why:
            skipped[a.name] = why
            log(f"note: {a.name} skipped in the LD_PRELOAD arm: {why}")
    pre_allocs = [a for a in allocs if a.name not in skipped]
    api_variants = ["lg", "mi", "malloc"]
    if want_allocs:
        api_variants = [API_FOR[n] for n in want_allocs if n in API_FOR]
    if "mimalloc" not in [a.name for a in pre_allocs]:
        log("note: mimalloc is not selected: ratios are reported against the first allocator")

    wl_names = select([w.name for w in WORKLOADS] + [HOTPATH], only)
    if any(n == "idle-threads" for n in wl_names) and "idle-baseline" not in wl_names:
        wl_names.append("idle-baseline")
    workloads = [w for w in WORKLOADS if w.name in wl_names]
    for w in [w for w in workloads if w.program and not (BUILD / w.program).exists()]:
        skipped[f"{w.name} (workload)"] = f"bench/build/{w.program} is missing (run bench/build-peers.sh)"
        log(f"note: {w.name} skipped: bench/build/{w.program} is missing (run bench/build-peers.sh)")
        workloads.remove(w)
    for v, why in rust_missing.items():
        skipped[f"Rust arm {v}"] = why
    do_hotpath = HOTPATH in wl_names
    quick_arg = ["--quick"] if args.quick else []
    timeout = 120 if not args.quick else 60
    startup_inner = 6 if not args.quick else 4
    py = python_for_startup()

    # -- the rounds
    jobs_by_round: list[list[Job]] = []
    rng = random.Random(args.seed)
    for r in range(reps):
        jobs: list[Job] = []
        for w in workloads:
            if w.max_reps and r >= w.max_reps:
                continue
            if w.rust:
                if args.arm in ("both", "rust"):
                    order = list(rust_variants)
                    rng.shuffle(order)
                    jobs += [Job("rust", w, v, [str(BIN / f"rust-arm-{v}"), *w.args, *quick_arg], None)
                             for v in order]
                continue
            if args.arm in ("both", "preload"):
                order = [a for a in pre_allocs]
                rng.shuffle(order)
                for a in order:
                    if w.name == "startup":
                        argv = [py, "-c", "pass"]
                        for _ in range(startup_inner):
                            jobs.append(Job("preload", w, a.name, argv, a.preload))
                    elif w.program:
                        wargs = w.quick_args if args.quick and w.quick_args is not None else w.args
                        jobs.append(Job("preload", w, a.name, [str(BUILD / w.program), *wargs], a.preload))
                    else:
                        argv = [str(BIN / f"{w.binary}-malloc"), *w.args, *quick_arg]
                        jobs.append(Job("preload", w, a.name, argv, a.preload))
            if args.arm in ("both", "api") and w.api:
                order = list(api_variants)
                rng.shuffle(order)
                for v in order:
                    argv = [str(BIN / f"{w.binary}-{v}"), *w.args, *quick_arg]
                    jobs.append(Job("api", w, v, argv, None))
        jobs_by_round.append(jobs)

    lg_pre = next((a for a in pre_allocs if a.name == "lgmalloc"), None)
    cold_runs = (10 if not args.quick else 3) if lg_pre and "startup" in wl_names and \
        args.arm in ("both", "preload") else 0
    total = sum(len(j) for j in jobs_by_round) + cold_runs
    hot_targets: list[tuple[str, str, Path, str | None]] = []
    hot: dict[tuple[str, str], dict] = {}
    if do_hotpath:
        if args.arm in ("both", "preload"):
            for a in pre_allocs:
                if a.valgrind:
                    hot_targets.append(("preload", a.name, BIN / "hotpath-malloc", a.preload))
                else:
                    hot[("preload", a.name)] = {"ok": False, "status": "n/a: aborts under valgrind"}
        if args.arm in ("both", "api"):
            for v in api_variants:
                hot_targets.append(("api", v, BIN / f"hotpath-{v}", None))
    total += len(hot_targets)
    # One run of each under strace -f -c, not timed (issue 14's system-call goals).
    strace_targets = [(j.arm, j.workload.name, j.alloc, j.argv, j.preload) for j in jobs_by_round[0]
                      if j.workload.rust or (j.workload.name == "test-stress"
                                             and j.alloc in ("lgmalloc", "mimalloc3"))] if reps else []
    total += len(strace_targets)
    log(f"plan: {len(workloads)} workloads, {len(pre_allocs)} preloaded allocators, "
        f"API arm {api_variants if args.arm != 'preload' else []}, {reps} rounds, "
        f"{total} runs{' (quick)' if args.quick else ''}")

    samples: dict[tuple[str, str, str], list[dict]] = {}
    failures: list[dict] = []
    done = 0
    t_runs = time.monotonic()

    def progress(label: str, secs: float, ok: bool) -> None:
        el = time.monotonic() - t_runs
        eta = el / done * (total - done) if done else 0
        log(f"[{done:4d}/{total} {100 * done // total:3d}%] {label:<44} {secs:7.3f} s"
            f"{'' if ok else '  FAILED'}  (elapsed {fmt_dur(el)}, eta {fmt_dur(eta)})")

    # callgrind first: instruction counts are deterministic, one run each
    pairs = 200000 if args.quick else 1000000
    for arm, name, binary, preload in hot_targets:
        t0 = time.monotonic()
        res = hotpath_instructions(binary, preload, pairs)
        done += 1
        hot[(arm, name)] = res
        if not res["ok"]:
            failures.append({"arm": arm, "workload": HOTPATH, "alloc": name,
                             "status": res["status"], "cmd": res["cmd"],
                             "stderr": res.get("stderr", "")})
        label = f"{arm}/hotpath (callgrind) {name}"
        progress(label + (f" = {res['instr_per_pair']:.1f} instr/pair" if res["ok"] else ""),
                 time.monotonic() - t0, res["ok"])

    # warm-up: lgmalloc's analysis cache for python3, so `startup` measures warm starts
    if "startup" in wl_names:
        for a in pre_allocs:
            run_program([py, "-c", "pass"], a.preload, 60)

    for r, jobs in enumerate(jobs_by_round):
        for job in jobs:
            run = run_program(job.argv, job.preload, timeout, job.extra_env)
            done += 1
            rec = dict(run.result)
            rec.update({f"launch_{k}": v for k, v in run.launch.items()})
            if (job.workload.name == "startup" or job.workload.program) and run.ok:
                rec["wall_ms"] = str(to_float(run.launch.get("wall_s")) * 1000)
                rec["time_s"] = run.launch.get("wall_s", "nan")
            if run.ok:
                samples.setdefault((job.arm, job.workload.name, job.alloc), []).append(rec)
            else:
                failures.append({"arm": job.arm, "workload": job.workload.name, "alloc": job.alloc,
                                 "status": run.status, "cmd": run.cmdline, "stderr": run.stderr})
            secs = to_float(run.launch.get("wall_s"))
            progress(f"r{r + 1}/{reps} {job.arm}/{job.workload.name} {job.alloc}", secs, run.ok)

    for arm, wl, name, argv, preload in strace_targets:
        t0 = time.monotonic()
        counts = suite_extra.strace_counts(argv, child_env({}), preload, 4 * timeout)
        done += 1
        samples.setdefault(("strace", wl, name), []).append(counts)
        if "error" in counts:
            failures.append({"arm": arm, "workload": f"{wl} (strace)", "alloc": name,
                             "status": counts["error"], "cmd": "strace -f -c " + " ".join(argv),
                             "stderr": ""})
        progress(f"strace {arm}/{wl} {name}: futex {counts.get('futex', '?')} "
                 f"madvise {counts.get('madvise', '?')}", time.monotonic() - t0, "error" not in counts)

    # cold starts: lgmalloc with an empty analysis cache every time
    for i in range(cold_runs):
        with tempfile.TemporaryDirectory(prefix="lgbench-cache-") as d:
            run = run_program([py, "-c", "pass"], lg_pre.preload, 60, {"LGMALLOC_CACHE_DIR": d})
        done += 1
        if run.ok:
            samples.setdefault(("preload", STARTUP_COLD, "lgmalloc"), []).append(
                {"wall_ms": str(to_float(run.launch.get("wall_s")) * 1000),
                 "time_s": run.launch.get("wall_s"),
                 **{f"launch_{k}": v for k, v in run.launch.items()}})
        else:
            failures.append({"arm": "preload", "workload": STARTUP_COLD, "alloc": "lgmalloc",
                             "status": run.status, "cmd": "LGMALLOC_CACHE_DIR=<empty dir> " + run.cmdline,
                             "stderr": run.stderr})
        progress(f"cold start (empty cache) lgmalloc", to_float(run.launch.get("wall_s")), run.ok)

    elapsed = time.monotonic() - t_start
    load_end = os.getloadavg()
    meta = collect_meta(args, reps, elapsed, started_at, load_start, load_end, lg_info, skipped,
                        pre_allocs, py, partial)
    data = {"meta": meta, "samples": {"|".join(k): v for k, v in samples.items()},
            "hotpath": {"|".join(k): v for k, v in hot.items()}, "failures": failures}
    out_json = out_md.with_suffix(".json")
    out_json.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    report = Report(meta, samples, hot, failures, [a.name for a in pre_allocs], api_variants,
                    workloads, args.arm)
    png = out_md.with_suffix(".png")
    plot_note = make_plot(report, png)
    report.scaling_svg = write_scaling_svg(report, out_md)
    out_md.write_text(report.markdown(png if plot_note is None else None, plot_note))
    log(f"\nwrote {out_md}, {out_json.name}" + ("" if plot_note else f", {png.name}"))
    if plot_note:
        log(f"plot: {plot_note}")
    log(f"total time {fmt_dur(elapsed)}")
    if failures:
        log(f"\n{len(failures)} FAILED RUN(S):")
        for f in failures:
            log(f"  {f['arm']}/{f['workload']} {f['alloc']}: {f['status']}\n    {f['cmd']}")
    return 1 if failures else 0


def report_only(path: Path) -> int:
    data = json.loads(path.read_text())
    samples = {tuple(k.split("|")): v for k, v in data["samples"].items()}
    hot = {tuple(k.split("|")): v for k, v in data["hotpath"].items()}
    meta = data["meta"]
    names = {k[1] for k in samples} | {k[1] for k in hot}
    pre = [a.name for a in preload_allocators() if a.name in meta["preloads"]]
    api = [v for v in API_VARIANTS if any(k[0] == "api" and k[2] == v for k in samples)
           or ("api", v) in hot]
    workloads = [w for w in WORKLOADS if w.name in names]
    arm = "both" if pre and api else ("preload" if pre else "api")
    if not pre and not api:
        arm = "rust"
    rep = Report(meta, samples, hot, data["failures"], pre, api, workloads, arm)
    out_md = path.with_suffix(".md")
    png = path.with_suffix(".png")
    note = make_plot(rep, png)
    rep.scaling_svg = write_scaling_svg(rep, out_md)
    out_md.write_text(rep.markdown(png if note is None else None, note))
    log(f"wrote {out_md}" + ("" if note else f", {png.name}") + (f" ({note})" if note else ""))
    return 0


# ---- facts about the machine and versions -------------------------------------------


def collect_meta(args, reps, elapsed, started_at, load_start, load_end, lg_info, skipped,
                 pre_allocs, py, partial) -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) // 1024} MiB"
    except OSError:
        pass
    pkgs = ["libc6", "libmimalloc2.0", "libjemalloc2", "libtcmalloc-minimal4", "libclang-rt-14-dev",
            "gcc-12", "valgrind", "python3.11"]
    r = sh(["dpkg-query", "-W", "-f", "${Package} ${Version}\n", *pkgs])
    versions = dict(line.split(" ", 1) for line in r.stdout.splitlines() if " " in line)
    rustc = sh(["rustc", "--version"]).stdout.strip()
    cmd = "python3 bench/run.py" + "".join(f" {a}" for a in sys.argv[1:])
    return {
        "command": cmd, "quick": args.quick, "partial": partial, "reps": reps,
        "elapsed_s": elapsed, "started_utc": started_at.strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release(), "memory": mem,
        "load_start": [round(x, 2) for x in load_start], "load_end": [round(x, 2) for x in load_end],
        "versions": versions, "lg_commit": lg_info["commit"], "lg_subject": lg_info["subject"],
        "lg_dirty": lg_info["dirty"], "rustc": rustc, "lg_info": lg_info, "skipped": skipped,
        "preloads": {a.name: a.preload for a in pre_allocs}, "python": py,
    }


# ---- the report ---------------------------------------------------------------------


class Report:
    def __init__(self, meta, samples, hot, failures, pre_names, api_variants, workloads, arm):
        self.meta = meta
        self.samples = samples
        self.hot = hot
        self.failures = failures
        self.pre = pre_names
        self.api = api_variants if arm not in ("preload", "rust") else []
        if arm in ("api", "rust"):
            self.pre = []
        self.workloads = workloads
        self.main_workloads = [w for w in workloads if not w.group]  # those of the main tables
        self.ref = "mimalloc" if "mimalloc" in self.pre else (self.pre[0] if self.pre else None)
        self.api_ref = "mi" if "mi" in self.api else (self.api[0] if self.api else None)
        self.scaling_svg: str | None = None  # file name of the scaling plot, when drawn

    # figures
    def vals(self, arm, wl, alloc, key) -> list[float]:
        return [v for v in (to_float(s.get(key)) for s in self.samples.get((arm, wl, alloc), []))
                if math.isfinite(v)]

    def med(self, arm, wl, alloc, key) -> float:
        return median(self.vals(arm, wl, alloc, key))

    def spread(self, arm, wl, alloc, key) -> tuple[float, float]:
        v = self.vals(arm, wl, alloc, key)
        return (min(v), max(v)) if v else (float("nan"), float("nan"))

    def rel_spread(self, arm, wl, alloc, key) -> float:
        """Half the min-max range as a percentage of the median."""
        v = self.vals(arm, wl, alloc, key)
        return 50.0 * (max(v) - min(v)) / median(v) if v and median(v) else float("nan")

    def per_thread(self, arm, alloc) -> tuple[float, float, float]:
        """(median, low, high) resident bytes per thread above the idle baseline."""
        a = self.vals(arm, "idle-threads", alloc, "growth_kib")
        b = self.vals(arm, "idle-baseline", alloc, "growth_kib")
        n = self.vals(arm, "idle-threads", alloc, "threads")
        if not a or not b or not n:
            return (float("nan"),) * 3
        t = n[0]
        return ((median(a) - median(b)) * 1024 / t, (min(a) - max(b)) * 1024 / t,
                (max(a) - min(b)) * 1024 / t)

    def time_ratio(self, arm, wl, alloc, ref) -> float:
        return self.med(arm, wl, alloc, "time_s") / self.med(arm, wl, ref, "time_s")

    def best_ratio(self, arm, wl, alloc, ref) -> float:
        """Ratio of the fastest rounds: least disturbed by other load on the machine."""
        a, b = self.vals(arm, wl, alloc, "time_s"), self.vals(arm, wl, ref, "time_s")
        return min(a) / min(b) if a and b else float("nan")

    def contention(self, wl) -> float:
        """Median number of cores other processes kept busy during this workload's runs."""
        v = [x for k, ss in self.samples.items() if k[1] == wl
             for x in (to_float(s.get("launch_others_cores")) for s in ss) if math.isfinite(x)]
        return median(v)

    def rss_ratio(self, arm, wl, alloc, ref) -> float:
        return self.med(arm, wl, alloc, "launch_maxrss_kib") / self.med(arm, wl, ref, "launch_maxrss_kib")

    def timed_workloads(self) -> list[Workload]:
        return [w for w in self.main_workloads if w.timed]

    def summary(self, alloc) -> dict:
        ratios = {w.name: self.time_ratio("preload", w.name, alloc, self.ref) for w in self.timed_workloads()}
        ratios = {k: v for k, v in ratios.items() if math.isfinite(v)}
        rss = {w.name: self.rss_ratio("preload", w.name, alloc, self.ref) for w in self.main_workloads}
        rss = {k: v for k, v in rss.items() if math.isfinite(v)}
        worst = max(ratios.items(), key=lambda kv: kv[1]) if ratios else ("–", float("nan"))
        best = min(ratios.items(), key=lambda kv: kv[1]) if ratios else ("–", float("nan"))
        bests = {w.name: self.best_ratio("preload", w.name, alloc, self.ref) for w in self.timed_workloads()}
        bests = {k: v for k, v in bests.items() if math.isfinite(v)}
        worst_b = max(bests.items(), key=lambda kv: kv[1]) if bests else ("–", float("nan"))
        return {"time_geo": geomean(list(ratios.values())), "worst": worst, "best": best,
                "rss_geo": geomean(list(rss.values())), "n": len(ratios),
                "best_geo": geomean(list(bests.values())), "worst_best": worst_b}

    # markdown
    def markdown(self, png: Path | None, plot_note: str | None) -> str:
        m = self.meta
        L: list[str] = []
        L.append("# lgmalloc benchmark results\n")
        kind = "quick" if m["quick"] else "full"
        L.append(f"Generated by `{m['command']}` ({kind} run, {m['reps']} interleaved rounds, "
                 f"{fmt_dur(m['elapsed_s'])} min:s, started {m['started_utc']}). "
                 "See [README.md](README.md) for what each workload does and how to read this.\n")
        if self.failures:
            L.append("## ⚠ Failed runs\n")
            L.append("| arm | workload | allocator | status | reproduce (from the repository root) |")
            L.append("|---|---|---|---|---|")
            for f in self.failures:
                L.append(f"| {f['arm']} | {f['workload']} | {f['alloc']} | {f['status']} | `{f['cmd']}` |")
            L.append("")
            for f in self.failures:
                if f.get("stderr"):
                    L.append(f"<details><summary>{f['workload']} {f['alloc']} stderr</summary>\n\n```\n"
                             f"{f['stderr'].strip()[-1500:]}\n```\n</details>\n")
        L.append("## Machine and versions\n")
        L.append(f"- CPU: {m['cpu']}, {m['nproc']} logical CPUs (`nproc`), {m['memory']} RAM")
        L.append(f"- Kernel: {m['kernel']}; load average at start {m['load_start'][0]}, "
                 f"at end {m['load_end'][0]} (other jobs shared the machine: medians and "
                 "interleaving are meant to absorb that)")
        dirty = (f" plus uncommitted changes to {', '.join(f'`{d}`' for d in m['lg_dirty'])}"
                 if m["lg_dirty"] else "")
        L.append(f"- lgmalloc: commit `{m['lg_commit'][:12]}` ({m['lg_subject']}){dirty}; "
                 f"{m['rustc']}; release profile; LD_PRELOAD arm built with `--features override` "
                 "(commit and changes as of the build at the start of the run)")
        v = m["versions"]
        L.append("- Peers (Debian packages): " + ", ".join(
            f"{p} {v[p]}" for p in ["libc6", "libmimalloc2.0", "libjemalloc2", "libtcmalloc-minimal4",
                                    "libclang-rt-14-dev"] if p in v) + " (scudo = `libclang_rt.scudo_standalone`)")
        L.append("- Tools: " + ", ".join(f"{p} {v[p]}" for p in ["gcc-12", "valgrind", "python3.11"] if p in v)
                 + f"; start-up measured with `{m['python']}`")
        for name, why in m["skipped"].items():
            L.append(f"- **{name} not measured through LD_PRELOAD**: {why}")
        L.append("")

        if self.pre and self.ref:
            L += self.summary_section()
            L += self.preload_tables()
        L += self.hotpath_section()
        if self.api and any(w.api for w in self.main_workloads):
            L += self.api_section()
        L += suite_extra.sections(self, self.scaling_svg)
        L += self.per_thread_section()
        L += self.startup_section()
        if png is not None:
            L.append("## Plot\n")
            L.append(f"![time and memory ratios]({png.name})\n")
        elif plot_note:
            L.append(f"_No plot: {plot_note}_\n")
        return "\n".join(L) + "\n"

    def summary_section(self) -> list[str]:
        if not self.timed_workloads():
            return []
        L = ["## Summary (LD_PRELOAD arm, ratios to " + self.ref + ")\n",
             f"Time ratio = median time / median time of {self.ref} on the same workload "
             "(below 1 is faster). Geometric means over the timed workloads "
             f"({', '.join(w.name for w in self.timed_workloads())}); "
             "peak RSS over all workloads run natively.\n",
             "The two right-hand time columns use each allocator's fastest round instead of the "
             "median (the runs least disturbed by other jobs on the machine).\n",
             "| allocator | time geomean | best workload | worst workload | peak RSS geomean "
             "| time geomean, fastest rounds | worst, fastest rounds |",
             "|---|---|---|---|---|---|---|"]
        for a in self.pre:
            s = self.summary(a)
            L.append(f"| {a} | {fnum(s['time_geo'])} | {s['best'][0]} {fnum(s['best'][1])} | "
                     f"{s['worst'][0]} {fnum(s['worst'][1])} | {fnum(s['rss_geo'])} | "
                     f"{fnum(s['best_geo'])} | {s['worst_best'][0]} {fnum(s['worst_best'][1])} |")
        L.append("")
        cont = [(w.name, self.contention(w.name)) for w in self.main_workloads]
        cont = [(n, c) for n, c in cont if math.isfinite(c)]
        if cont:
            L.append("Load from other processes during the runs (median cores busy outside the "
                     f"benchmark, of {self.meta['nproc']}): "
                     + ", ".join(f"{n} {c:.2f}" for n, c in cont) + ".\n")
        return L

    def preload_tables(self) -> list[str]:
        if not self.main_workloads:
            return []
        L = ["## Workloads through LD_PRELOAD\n",
             "Median of the rounds, with [min–max] below. Headline figure per workload "
             "(↑ higher is better, ↓ lower is better).\n"]
        head = "| workload | figure | " + " | ".join(self.pre) + " |"
        L += [head, "|---|---|" + "---|" * len(self.pre)]
        for w in self.main_workloads:
            if w.name == "startup" or w.name.startswith("idle"):
                continue  # own sections below
            key = w.metric
            cells = []
            for a in self.pre:
                med = self.med("preload", w.name, a, key)
                lo, hi = self.spread("preload", w.name, a, key)
                cells.append(f"{fnum(med)}<br><sub>[{fnum(lo)}–{fnum(hi)}]</sub>" if math.isfinite(med) else "–")
            arrow = "↑" if w.higher_better else "↓"
            L.append(f"| {w.name} | {w.unit} {arrow} | " + " | ".join(cells) + " |")
        L.append("")

        L += ["### Time ratio to " + self.ref + " (median time / median time; < 1 is faster; "
              "± is half the allocator's own min–max range, in % of its median; "
              "fastest = ratio of the fastest rounds)\n",
              head, "|---|---|" + "---|" * len(self.pre)]
        for w in self.main_workloads:
            if not w.timed:
                continue
            cells = [f"{fnum(self.time_ratio('preload', w.name, a, self.ref))}"
                     f"<br><sub>±{fnum(self.rel_spread('preload', w.name, a, 'time_s'), 2)}%, "
                     f"fastest ×{fnum(self.best_ratio('preload', w.name, a, self.ref))}</sub>"
                     for a in self.pre]
            L.append(f"| {w.name} | {'wall' if w.name == 'startup' else 'time_s'} | " + " | ".join(cells) + " |")
        L.append("")

        L += ["### Peak RSS (MiB, max RSS of the process, ± half range in %; ratio to " + self.ref + " below)\n",
              head, "|---|---|" + "---|" * len(self.pre)]
        for w in self.main_workloads:
            cells = []
            for a in self.pre:
                med = self.med("preload", w.name, a, "launch_maxrss_kib")
                cells.append(f"{fnum(med / 1024)} <sub>±{fnum(self.rel_spread('preload', w.name, a, 'launch_maxrss_kib'), 2)}%</sub>"
                             f"<br><sub>×{fnum(self.rss_ratio('preload', w.name, a, self.ref))}</sub>"
                             if math.isfinite(med) else "–")
            L.append(f"| {w.name} | MiB | " + " | ".join(cells) + " |")
        L.append("")

        extra_rows = [(w, k) for w in self.main_workloads for k in w.extras]
        if extra_rows:
            L += ["### Secondary figures (medians)\n", head, "|---|---|" + "---|" * len(self.pre)]
            for w, k in extra_rows:
                cells = [fnum(self.med("preload", w.name, a, k)) for a in self.pre]
                L.append(f"| {w.name} | {k} | " + " | ".join(cells) + " |")
            L.append("")
        return L

    def hot_rows(self) -> list[tuple[tuple[str, str], dict]]:
        keys = [("preload", a) for a in self.pre] + [("api", v) for v in self.api]
        return [(k, self.hot[k]) for k in keys if k in self.hot]

    def hotpath_section(self) -> list[str]:
        if not self.hot:
            return []
        L = ["## Instructions per malloc+free pair (hotpath, callgrind)\n",
             "64 live objects, sizes 16..256, random slot replacement; "
             "(inclusive run_pairs − 1.1 × run_empty) / (1.1 × pairs). Deterministic: one run each.\n",
             "| arm | allocator | instructions per pair |", "|---|---|---|"]
        for (arm, name), r in self.hot_rows():
            label = API_VARIANTS.get(name, name) if arm == "api" else name
            L.append(f"| {'direct API' if arm == 'api' else 'LD_PRELOAD'} | {label} | "
                     f"{fnum(r['instr_per_pair']) if r['ok'] else r['status']} |")
        L.append("")
        return L

    def api_section(self) -> list[str]:
        L = ["## Direct API arm (one source, three builds: lg_*, mi_*, glibc malloc)\n",
             "Median [min–max]; ratio of time to " + API_VARIANTS.get(self.api_ref, str(self.api_ref)) + " below.\n",
             "| workload | figure | " + " | ".join(API_VARIANTS[v] for v in self.api) + " |",
             "|---|---|" + "---|" * len(self.api)]
        for w in self.workloads:
            if not w.api or w.name.startswith("idle"):
                continue
            cells = []
            for v in self.api:
                med = self.med("api", w.name, v, w.metric)
                lo, hi = self.spread("api", w.name, v, w.metric)
                ratio = self.time_ratio("api", w.name, v, self.api_ref)
                fast = self.best_ratio("api", w.name, v, self.api_ref)
                cells.append(f"{fnum(med)} <sub>[{fnum(lo)}–{fnum(hi)}]</sub><br>"
                             f"<sub>time ×{fnum(ratio)}, fastest ×{fnum(fast)}</sub>"
                             if math.isfinite(med) else "–")
            L.append(f"| {w.name} | {w.unit} {'↑' if w.higher_better else '↓'} | " + " | ".join(cells) + " |")
        L.append("")
        return L

    def per_thread_section(self) -> list[str]:
        rows = []
        for a in self.pre:
            rows.append(("LD_PRELOAD", a, self.per_thread("preload", a)))
        for v in self.api:
            rows.append(("direct API", API_VARIANTS[v], self.per_thread("api", v)))
        rows = [r for r in rows if math.isfinite(r[2][0])]
        if not rows:
            return []
        L = ["## Resident memory per idle thread\n",
             "500 threads with 64 KiB stacks, each holding 14 objects (5×24, 5×56, 4×120 B): "
             "(RSS growth − RSS growth of the same threads allocating nothing) / 500. "
             "Range from the extreme rounds.\n",
             "| arm | allocator | bytes per thread | range |", "|---|---|---|---|"]
        for arm, name, (med, lo, hi) in rows:
            L.append(f"| {arm} | {name} | {med:,.0f} | {lo:,.0f} … {hi:,.0f} |")
        L.append("")
        return L

    def startup_section(self) -> list[str]:
        if not any(k[1] == "startup" for k in self.samples):
            return []
        g = self.vals("preload", "startup", "glibc", "wall_ms") if "glibc" in self.pre else []
        base, base_min = (median(g), min(g)) if g else (float("nan"), float("nan"))
        L = ["## Start-up: `python3 -c pass`\n",
             "Wall time from fork to exit over all runs (warm: lgmalloc's analysis cache "
             "filled by an earlier run; cold: an empty cache directory for every run). "
             "Under a loaded machine the fastest run is the steadier figure.\n",
             "| allocator | runs | median ms | fastest ms | slowest ms | ratio to glibc (medians) "
             "| ratio to glibc (fastest) |", "|---|---|---|---|---|---|---|"]
        rows = [(a, self.vals("preload", "startup", a, "wall_ms")) for a in self.pre]
        rows.append(("lgmalloc, cold cache", self.vals("preload", STARTUP_COLD, "lgmalloc", "wall_ms")))
        for a, v in rows:
            if v:
                L.append(f"| {a} | {len(v)} | {median(v):.2f} | {min(v):.2f} | {max(v):.2f} | "
                         f"{fnum(median(v) / base)} | {fnum(min(v) / base_min)} |")
        L.append("")
        return L


# ---- plot ---------------------------------------------------------------------------


def write_scaling_svg(rep: Report, out_md: Path) -> str | None:
    """The thread-scaling plot beside the report (results-threads.svg); its file name."""
    svg = out_md.with_name(out_md.stem + "-threads.svg")
    return svg.name if suite_extra.write_scaling_svg(rep, svg) else None


def make_plot(rep: Report, png: Path) -> str | None:
    """Draws the plot; returns None on success, else why there is none."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (`pip install matplotlib`, then run again)"
    if not rep.pre or not rep.ref:
        return "no LD_PRELOAD results to plot"
    colors = {"glibc": "#7f7f7f", "mimalloc": "#1f77b4", "jemalloc": "#2ca02c",
              "tcmalloc": "#9467bd", "scudo": "#8c564b", "lgmalloc": "#d62728",
              "mimalloc3": "#17becf", "snmalloc": "#ff7f0e"}
    fig, axes = plt.subplots(2, 2, figsize=(15, 10), gridspec_kw={"width_ratios": [3, 1.2]})

    def bars(ax, names, series, title, ylabel, log=True, refline=True):
        n = len(series)
        width = 0.8 / max(n, 1)
        for i, (label, ys) in enumerate(series):
            xs = [j + (i - (n - 1) / 2) * width for j in range(len(names))]
            ys = [y if math.isfinite(y) and y > 0 else float("nan") for y in ys]
            ax.bar(xs, ys, width, label=label, color=colors.get(label.split()[0], None))
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=9)
        if log:
            ax.set_yscale("log")
        if refline:
            ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_title(title, fontsize=11)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", which="both", alpha=0.3)

    timed = [w.name for w in rep.timed_workloads()]
    bars(axes[0][0], timed,
         [(a, [rep.time_ratio("preload", w, a, rep.ref) for w in timed]) for a in rep.pre],
         f"Time ratio to {rep.ref} (lower is better, log scale)", "time / time(" + rep.ref + ")")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.955), ncol=len(rep.pre),
               fontsize=10, frameon=False)
    allw = [w.name for w in rep.main_workloads]
    bars(axes[1][0], allw,
         [(a, [rep.rss_ratio("preload", w, a, rep.ref) for w in allw]) for a in rep.pre],
         f"Peak RSS ratio to {rep.ref} (lower is better, log scale)", "max RSS / max RSS(" + rep.ref + ")")

    # instructions per pair
    hot = [(("API " if arm == "api" else "") + (API_VARIANTS.get(n, n).split()[-1] if arm == "api" else n),
            r["instr_per_pair"], n) for (arm, n), r in rep.hot_rows() if r["ok"]]
    ax = axes[0][1]
    if hot:
        ax.barh([h[0] for h in hot], [h[1] for h in hot],
                color=[colors.get({"lg": "lgmalloc", "mi": "mimalloc", "malloc": "glibc"}.get(h[2], h[2]), "#333")
                       for h in hot])
        ax.invert_yaxis()
        for i, h in enumerate(hot):
            ax.text(h[1], i, f" {h[1]:.0f}", va="center", fontsize=8)
    ax.set_title("Instructions per malloc+free pair (lower is better)", fontsize=11)
    ax.grid(axis="x", alpha=0.3)

    ax = axes[1][1]
    pt = [(a, rep.per_thread("preload", a)[0]) for a in rep.pre]
    pt = [(a, v) for a, v in pt if math.isfinite(v)]
    if pt:
        ax.barh([a for a, _ in pt], [v / 1024 for _, v in pt], color=[colors.get(a, "#333") for a, _ in pt])
        ax.invert_yaxis()
        for i, (_, v) in enumerate(pt):
            ax.text(max(v / 1024, 0), i, f" {v / 1024:.1f}", va="center", fontsize=8)
    ax.set_title("Resident KiB per idle thread (lower is better)", fontsize=11)
    ax.grid(axis="x", alpha=0.3)

    m = rep.meta
    fig.suptitle(f"lgmalloc {m['lg_commit'][:10]} vs peers — {m['cpu']}, {m['nproc']} CPUs, "
                 f"{'quick' if m['quick'] else 'full'} run, medians of {m['reps']} rounds", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return None


if __name__ == "__main__":
    sys.exit(main())
