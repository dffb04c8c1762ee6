"""Benchmark: the embedded default workflow end to end, then the no-op dry run.

Runs `snakemake --cores N` on config/config.yaml into a fresh results folder, times it, times
`snakemake -n` on the finished run (it must say there is nothing to do), sums the per-job
benchmark files per rule and appends command, machine, figures, date and the report's W2 table to
benchmarks/RESULTS.md.

  python benchmarks/default_run.py --cores 2 [--results /tmp/sf-bench]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent


def machine() -> str:
    cpu = "unknown CPU"
    info = Path("/proc/cpuinfo")
    names = [ln.split(":", 1)[1].strip() for ln in info.read_text().splitlines()
             if ln.startswith("model name")] if info.exists() else []
    if names:
        cpu = names[0]
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cores", type=int, default=2, help="snakemake --cores")
    p.add_argument("--results", default="/tmp/sourceflow-bench-results", help="scratch results folder (deleted first)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS.md"), help="results file to append to")
    a = p.parse_args()
    shutil.rmtree(a.results, ignore_errors=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    base = [sys.executable, "-m", "snakemake", "--config", f"results={a.results}"]
    cmd = [*base, "--cores", str(a.cores)]
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    full = time.time() - t0
    noops, nothing = [], True
    for _ in range(3):  # the no-op dry run is ~2 s of Snakemake start-up: report the median of three
        t0 = time.time()
        dry = subprocess.run([*base, "-n"], cwd=ROOT, env=env, check=True, capture_output=True, text=True)
        noops.append(time.time() - t0)
        nothing = nothing and "Nothing to be done" in dry.stdout + dry.stderr
    noop = sorted(noops)[1]
    per_rule = {}
    for f in Path(a.results, "benchmarks").rglob("*.tsv"):
        rule = f.stem
        per_rule[rule] = per_rule.get(rule, 0.0) + float(pd.read_csv(f, sep="\t")["s"].iloc[0])
    summary = Path(a.results, "report", "summary.md").read_text()
    today = dt.date.today().isoformat()
    lines = [f"## Default workflow (toy + digits), {today}", "",
             f"- command: `{' '.join(['snakemake', '--cores', str(a.cores)])}` (config/config.yaml; "
             f"run as `python benchmarks/default_run.py --cores {a.cores}`)",
             f"- machine: {machine()}",
             f"- wall time, full run: **{full:.0f} s ({full / 60:.1f} min)**",
             f"- wall time, `snakemake -n` on the finished run: **{noop:.2f} s** (median of "
             f"{', '.join(f'{x:.2f}' for x in noops)}; {'nothing to be done' if nothing else 'JOBS PLANNED'})",
             "- job seconds per rule (sum over jobs): "
             + ", ".join(f"{k} {v:.0f} s" for k, v in sorted(per_rule.items(), key=lambda kv: -kv[1])),
             "", "Report summary of that run:", "",
             *("> " + ln if ln else ">" for ln in summary.splitlines()), "", ""]
    with open(a.out, "a") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
