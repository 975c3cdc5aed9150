#!/usr/bin/env python3
"""What the `hardened` feature costs on the hot path (issue 13, item 8).

Builds liblgmalloc.so twice for LD_PRELOAD (`--features override`, and
`--features override,hardened`), then runs two loops under each, interleaved:

- hotpath.c: 64 live blocks of 16..256 bytes, one freed and one allocated per pair (the
  suite's hot-path workload; throughput);
- one_block.c: one 32-byte block allocated, written and freed again and again (the
  latency of a free followed by the malloc that takes the same block back).

Rounds alternate the order of the two libraries (ABBA), each library with its own
temporary cache directory. The report gives, per loop, each build's median, minimum and
maximum time per pair, the ratio of the medians and the median of the per-round ratios,
and for hotpath the instructions per pair under callgrind (as the suite counts them).

    python3 bench/hardened.py [--rounds N] [--no-build] [--no-callgrind]

Standard library only; reuses the suite's runner (bench/run.py) for launching, building
paths and callgrind.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as suite  # noqa: E402  (bench/run.py, the suite's runner)

OUT = suite.BUILD / "hardened-cost"
BUILDS = {"default": ["override"], "hardened": ["override", "hardened"]}
LOOPS = {"hotpath": 20_000_000, "one_block": 50_000_000}  # pairs per run
CALLGRIND_PAIRS = 1_000_000


def build(skip: bool) -> dict[str, Path]:
    libs = {name: OUT / name / "liblgmalloc.so" for name in BUILDS}
    if not skip:
        env = dict(os.environ, CARGO_TARGET_DIR=str(suite.cargo_target_dir()))
        for name, features in BUILDS.items():
            cmd = ["cargo", "build", "--release", "--locked", "--lib", "--features", ",".join(features)]
            suite.log(f"build: {' '.join(cmd)}")
            r = subprocess.run(cmd, cwd=suite.ROOT, env=env, text=True, capture_output=True)
            if r.returncode != 0:
                suite.log(r.stderr[-4000:])
                sys.exit(f"cargo build failed: {' '.join(cmd)}")
            libs[name].parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(suite.cargo_target_dir() / "release" / "liblgmalloc.so", libs[name])
    for name, lib in libs.items():
        if not lib.exists():
            sys.exit(f"{lib} is missing (run without --no-build)")
    return libs


def compile_loops() -> None:
    suite.BIN.mkdir(parents=True, exist_ok=True)
    cc = os.environ.get("CC", "gcc")
    for stem in ("launch", *LOOPS):
        cmd = [cc, "-O2", "-g", "-Wall", "-Wextra", "-pthread", f"-I{suite.SRC}",
               "-o", str(suite.BIN / stem), str(suite.SRC / f"{stem}.c")]
        r = subprocess.run(cmd, text=True, capture_output=True)
        if r.returncode != 0:
            sys.exit(f"compile failed: {' '.join(cmd)}\n{r.stderr}")


def time_per_pair(loop: str, pairs: int, lib: Path, cache: Path) -> float:
    argv = [str(suite.BIN / loop), f"pairs={pairs}"]
    r = suite.run_program(argv, str(lib), 300, {"LGMALLOC_CACHE_DIR": str(cache)})
    if not r.ok or "ns_per_pair" not in r.result:
        sys.exit(f"run failed ({r.status}): {r.cmdline}\n{r.stderr}")
    return float(r.result["ns_per_pair"])


def measure(libs: dict[str, Path], rounds: int, caches: Path) -> dict[str, dict[str, list[float]]]:
    times = {loop: {name: [] for name in libs} for loop in LOOPS}
    order = list(libs)
    for i in range(rounds):
        for loop, pairs in LOOPS.items():
            for name in (order if i % 2 == 0 else order[::-1]):
                times[loop][name].append(time_per_pair(loop, pairs, libs[name], caches / name))
        suite.log(f"round {i + 1}/{rounds} done")
    return times


def instructions(libs: dict[str, Path], caches: Path) -> dict[str, float | None]:
    counts = {}
    for name, lib in libs.items():
        # Two ordinary runs first, so the program's plan is learned as in the suite.
        for _ in range(2):
            time_per_pair("hotpath", CALLGRIND_PAIRS, lib, caches / name)
        res = suite.hotpath_instructions(suite.BIN / "hotpath", str(lib), CALLGRIND_PAIRS,
                                         {"LGMALLOC_CACHE_DIR": str(caches / name)})
        counts[name] = res["instr_per_pair"] if res.get("ok") else None
        if not res.get("ok"):
            suite.log(f"callgrind failed for {name}: {res.get('status')} {res.get('stderr', '')[-300:]}")
    return counts


def report(times: dict[str, dict[str, list[float]]], counts: dict[str, float | None], rounds: int) -> None:
    commit = suite.sh(["git", "-C", str(suite.ROOT), "rev-parse", "--short=12", "HEAD"]).stdout.strip()
    print(f"\nhardened vs default at {commit}, {rounds} interleaved rounds (ns per malloc+free pair)\n")
    print("| loop | build | median | min | max | ratio of medians | median of per-round ratios |")
    print("|---|---|---|---|---|---|---|")
    for loop, by_build in times.items():
        base = by_build["default"]
        for name, values in by_build.items():
            ratio = statistics.median(values) / statistics.median(base)
            per_round = statistics.median(v / b for v, b in zip(values, base))
            print(f"| {loop} | {name} | {statistics.median(values):.3f} | {min(values):.3f} | "
                  f"{max(values):.3f} | {ratio:.4f} | {per_round:.4f} |")
    if counts:
        print("\nhotpath under callgrind, instructions per pair:")
        for name, n in counts.items():
            print(f"  {name}: {'failed' if n is None else f'{n:.2f}'}")
        if all(counts.values()):
            extra = counts["hardened"] - counts["default"]
            print(f"  hardened - default: {extra:+.2f} ({extra / counts['default']:+.1%})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=41)
    ap.add_argument("--no-build", action="store_true", help="reuse the libraries in bench/build/hardened-cost")
    ap.add_argument("--no-callgrind", action="store_true")
    a = ap.parse_args()
    t0 = time.monotonic()
    libs = build(a.no_build)
    compile_loops()
    with tempfile.TemporaryDirectory(prefix="lgbench-hardened-") as d:
        caches = Path(d)
        times = measure(libs, a.rounds, caches)
        have_valgrind = shutil.which("valgrind") is not None
        if not have_valgrind and not a.no_callgrind:
            suite.log("valgrind not found: no instruction counts")
        counts = {} if a.no_callgrind or not have_valgrind else instructions(libs, caches)
    report(times, counts, a.rounds)
    suite.log(f"done in {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
