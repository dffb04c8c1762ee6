"""Benchmark: the C2OT toy harness as a config (config/c2ot-moons.yaml), end to end, with its table.

Runs `snakemake --configfile config/c2ot-moons.yaml --cores N` (into the config's own results folder,
results/c2ot-moons, or --results), first every experiment's seed 0 (--seed-first, the default: at least
one seed per method early), then the rest. It samples the 1-minute load every 30 s, records wall times in
RESULTS/bench_run.json, then appends to benchmarks/RESULTS.md: command, machine and load, date, total wall
time, per-run training seconds (the loop: the train job's log, or train_log.jsonl for runs written before
issue 10 item 7; the train job's benchmark tsv: the whole process) and the table of W2^2 at Euler 1 and
dopri5 (mean +- std over seeds, population std as the harness's np.std; dopri5 with its mean NFE). Runs
that have not finished are listed as missing.

  python benchmarks/c2ot_moons.py --cores 2                  # run (hours on 2 CPU cores), then write
  python benchmarks/c2ot_moons.py --collect-only [--no-write] # table of what has finished so far
  python benchmarks/c2ot_moons.py --assign-bench               # scipy LSA vs POT's simplex, printed only
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from default_run import machine  # noqa: E402

from sourceflow.io import read_timings  # noqa: E402

CONFIG = ROOT / "config" / "c2ot-moons.yaml"
CONDITION = {"none": "unc", "label": "cls", "xcoord": "x", "mode": "mode"}
# hkchengrex/C2OT publishes no W2 numbers for moons.py in its README (checked 2026-12-02); its times per
# seed on one CPU thread, from issue 12: flow matching 4 min, OT 19-29 min (5,000 exact assignments of 1024).
HARNESS_MINUTES = {"fm": "4", "otcfm": "19-29", "c2ot": "19-29"}


def load_sampler(stop: threading.Event, out: list[float]) -> None:
    while not stop.is_set():
        out.append(float(Path("/proc/loadavg").read_text().split()[0]))
        stop.wait(30)


def snakemake(results: str, cores: int, targets: list[str], log, first: list[str] = ()) -> tuple[float, int]:
    """One snakemake invocation; ``first``: targets scheduled before the others (--prioritize)."""
    cmd = [sys.executable, "-m", "snakemake", *targets, *(["--prioritize", *first] if first else []),
           "--configfile", str(CONFIG.relative_to(ROOT)),
           "--config", f"results={results}", "--cores", str(cores), "--keep-going",
           # hours of finished runs survive edits of a rule's command text (e.g. quoting); a changed input,
           # parameter or environment still reruns
           "--rerun-triggers", "mtime", "input", "params", "software-env"]
    t0 = time.time()
    rc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=log, stderr=subprocess.STDOUT).returncode
    return time.time() - t0, rc


def experiments(results: str) -> list[dict]:
    cfg = yaml.safe_load(CONFIG.read_text())
    return [{**e, "seeds": e.get("seeds", cfg["seeds"]), "dir": Path(results) / e["data"] / "runs" / e["name"]}
            for e in cfg["experiments"]]


def run(a) -> None:
    exps = experiments(a.results)
    state_path = Path(a.results) / "bench_run.json"
    Path(a.results).mkdir(parents=True, exist_ok=True)
    # a rerun (after a kill) continues the record: its phases add to the wall time
    state = json.loads(state_path.read_text()) if state_path.exists() else {
        "command": " ".join(["python", "benchmarks/c2ot_moons.py", *sys.argv[1:]]),
        "start": dt.datetime.now().isoformat(timespec="seconds"), "phases": []}
    loads: list[float] = state.get("load_samples", [])
    stop = threading.Event()
    sampler = threading.Thread(target=load_sampler, args=(stop, loads), daemon=True)
    sampler.start()
    phases = []
    seed0 = {e["name"]: str(e["dir"] / "seed0" / "metrics" / "all.json") for e in exps}
    if a.phase1:  # seed 0 of these experiments alone first (e.g. the methods still missing late in a session)
        names = a.phase1.split(",")
        phases.append((f"seed 0 of {', '.join(names)}", [seed0[n] for n in names], []))
    if a.seed_first:
        # the first experiment of each method before the others: one seed per method as early as possible
        first = [seed0[e["name"]] for i, e in enumerate(exps) if e["method"] not in {x["method"] for x in exps[:i]}]
        phases.append(("seed 0 of every experiment, one per method first", list(seed0.values()), first))
    # --first METHODS: every seed of those methods' experiments scheduled before the others (e.g. the
    # harness's own fm, otcfm and c2ot when a session cannot finish all 36 runs)
    prio = [str(e["dir"] / f"seed{s}" / "metrics" / "all.json") for e in exps if e["method"] in a.first
            for s in e["seeds"]]
    phases.append(("everything" + (f", all seeds of {','.join(a.first)} first" if prio else ""), [], prio))
    with open(Path(a.results) / "bench_snakemake.log", "a") as log:
        for name, targets, first in phases:
            seconds, rc = snakemake(a.results, a.cores, targets, log, first)
            state["phases"].append({"phase": name, "seconds": round(seconds, 1), "returncode": rc,
                                    "end": dt.datetime.now().isoformat(timespec="seconds")})
            state["load_samples"] = loads
            state["load"] = {"mean": round(float(np.mean(loads)), 2), "max": max(loads), "samples": len(loads)}
            state_path.write_text(json.dumps(state, indent=1))
    stop.set()


def loop_seconds(log: Path, job_log: Path) -> float:
    """Training-loop seconds over all steps: a resumed run restarts its clock, so the segments are added
    (steps redone after a kill are not counted). The seconds of each record are in train_log.jsonl for runs
    written before issue 10 item 7; since then in the train job's log (``timings`` lines, stage "train"),
    which Snakemake rewrites when the job restarts: there only the last segment is known."""
    total, last = 0.0, 0.0
    records = [json.loads(line) for line in log.read_text().splitlines()]
    secs = [r["seconds"] for r in records if "seconds" in r]
    if len(secs) < len(records):  # new format (or a run resumed by the new code): the job log's records
        secs = [r["seconds"] for r in read_timings(job_log, "train") if "step" in r]
    for sec in secs:
        if sec < last:
            total += last
        last = sec
    return total + last


def summary_resumed(summary: Path) -> bool:
    """Whether a run's training resumed after a kill (its job times then cover only the last part)."""
    return bool(json.loads(summary.read_text())["resumed_from"]) if summary.exists() else False


def tsv_seconds(path: Path) -> float:
    """A Snakemake benchmark file's wall seconds."""
    return float(pd.read_csv(path, sep="\t")["s"].iloc[0])


def fmt(values: list[float], digits: int = 3) -> str:
    if not values:
        return "—"
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def collect(a) -> list[str]:
    results = Path(a.results)
    state_path = results / "bench_run.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    if a.in_progress_since:  # collecting while the run goes on: its current phase so far
        since = dt.datetime.fromisoformat(a.in_progress_since)
        state.setdefault("phases", []).append({"phase": "in progress when tabulated", "returncode": "running",
                                               "seconds": (dt.datetime.now() - since).total_seconds()})
    if a.load_file:  # "<iso time> <1-min load>" lines sampled outside the run (e.g. while it was killed)
        samples = [float(ln.split()[1]) for ln in Path(a.load_file).read_text().splitlines() if ln.strip()]
        loads = state.get("load_samples", []) + samples
        state["load"] = {"mean": round(float(np.mean(loads)), 2), "max": max(loads), "samples": len(loads)}
    rows, times, missing = [], [], []
    for e in experiments(a.results):
        w2 = {"euler-1": [], "dopri5": []}
        nfe, secs, job_secs, done, run_secs = [], [], [], [], []
        for seed in e["seeds"]:
            d = Path(a.run_dir.get(f"{e['name']}/seed{seed}", e["dir"] / f"seed{seed}"))
            summary = d / "train_summary.json"
            resumed = summary_resumed(summary)
            # job times are whole only for a run trained in one job here (not resumed, not read from elsewhere)
            whole = not resumed and f"{e['name']}/seed{seed}" not in a.run_dir
            if summary.exists():
                job_log = results / "logs" / e["data"] / e["name"] / f"seed{seed}" / "train.log"
                secs.append(f"{loop_seconds(d / 'train_log.jsonl', job_log):.0f}" + ("*" if resumed else ""))
                tsv = results / "benchmarks" / e["data"] / e["name"] / f"seed{seed}" / "train.tsv"
                if tsv.exists() and whole:  # a resumed job's tsv: its last part
                    job_secs.append(tsv_seconds(tsv))
            metrics = d / "metrics" / "all.json"
            if not metrics.exists():
                missing.append(f"{e['name']} seed {seed}" + (" (trained, not evaluated)" if summary.exists() else ""))
                continue
            done.append(seed)
            # the whole run's job time (train + sample + evaluate, start-up included), where every part is known
            bench = results / "benchmarks" / e["data"] / e["name"] / f"seed{seed}"
            parts = [bench / f"{r}.tsv" for r in ("train", "sample", "evaluate")]
            if whole and all(f.exists() for f in parts):
                run_secs.append(sum(tsv_seconds(f) for f in parts))
            for rec in json.loads(metrics.read_text()):
                tag = "dopri5" if rec["solver"] == "dopri5" else f"{rec['solver']}-{rec['steps']}"
                if tag in w2 and "w2sq" in rec["metrics"]:
                    w2[tag].append(rec["metrics"]["w2sq"])
                    if tag == "dopri5":
                        nfe.append(float(rec["nfe"]))
        cond = CONDITION.get(e.get("conditioning", "none"), e.get("conditioning"))
        rows.append({"experiment": e["name"], "method": e["method"], "condition": cond, "seeds": len(done),
                     "W2² euler-1": fmt(w2["euler-1"]),
                     "W2² dopri5 (NFE)": fmt(w2["dopri5"]) + (f" ({np.mean(nfe):.1f})" if nfe else "")})
        loop_s = [float(x.rstrip("*")) for x in secs]
        times.append({"experiment": e["name"], "train loop s per seed": ", ".join(secs) or "—",
                      "train job s per seed": ", ".join(f"{s:.0f}" for s in job_secs) or "—",
                      "mean loop min per seed": f"{np.mean(loop_s) / 60:.1f}" if secs else "—",
                      "mean run min per seed (train + sample + evaluate jobs)":
                          f"{np.mean(run_secs) / 60:.1f}" if run_secs else "—",
                      "harness min per seed": HARNESS_MINUTES.get(e["method"], "—")})
    per_rule: dict[str, float] = {}
    for f in (results / "benchmarks").rglob("*.tsv"):
        per_rule[f.stem] = per_rule.get(f.stem, 0.0) + tsv_seconds(f)
    total = sum(p["seconds"] for p in state.get("phases", []))
    load = state.get("load", {})
    lines = [f"## C2OT toy harness as a config (issue 12), {dt.date.today().isoformat()}", "",
             f"- command: `{state.get('command', 'python benchmarks/c2ot_moons.py --cores 2')}` "
             "(`snakemake --configfile config/c2ot-moons.yaml --cores N`, in the phases below)",
             f"- machine: {machine()}; load (1-min average, sampled every 30 s during the run, with whatever else "
             f"ran): mean {load.get('mean', '?')}, max {load.get('max', '?')}",
             f"- started {state.get('start', '?')}; wall time, whole run: **{total:.0f} s ({total / 3600:.2f} h)** ("
             + "; ".join(f"{p['phase']}: {p['seconds']:.0f} s, exit {p['returncode']}" for p in state.get("phases", []))
             + ")",
             "- job seconds per rule (sum over jobs): "
             + ", ".join(f"{k} {v:.0f} s" for k, v in sorted(per_rule.items(), key=lambda kv: -kv[1])),
             "", "Training time per seed (two jobs at a time on the 2 cores; the loop alone, and the whole train "
             "job with start-up and checkpoints; * = resumed after a kill: the loop's segments added, the job's "
             "time not known), beside the harness's per-seed time on one CPU thread (issue 12):",
             "", pd.DataFrame(times).to_markdown(index=False), "",
             "W2² between 10,000 generated points (fresh 8-Gaussian source draws; mmfm: its GMM, csfm: its learned "
             "source) and the 10,000 held-out moons points, exact EMD with squared-Euclidean cost, mean ± std "
             "(population, as the harness) over the seeds done; dopri5 at rtol = atol = 1e-4 on batches of 256 with "
             "the mean NFE over batches and seeds. The harness's README publishes no W2 numbers for this "
             "experiment, so there is nothing to set beside them.",
             "", pd.DataFrame(rows).to_markdown(index=False), ""]
    if missing:
        lines += [f"Missing ({len(missing)} of {sum(len(e['seeds']) for e in experiments(a.results))} runs): "
                  + ", ".join(missing) + ".", ""]
    return lines


def assign_bench() -> None:
    """Exact 1024 x 1024 assignments of the toy costs by scipy's LSA and POT's network simplex (min of 3)."""
    import torch
    from scipy.optimize import linear_sum_assignment

    sys.path.insert(0, str(ROOT))
    from sourceflow.data import toy
    from sourceflow.flow.couplings import _simplex_perm, cost_matrix, search_weight, sq_cost_matrix

    def best(f) -> float:
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        return 1e3 * min(ts)

    g = torch.Generator().manual_seed(1)
    print(f"load {Path('/proc/loadavg').read_text().split()[0]}")
    print("| cost | n | scipy LSA (ms) | POT emd (ms) | emd speed-up | same permutation |")
    print("|---|---:|---:|---:|---:|---|")
    for n in (256, 512, 1024, 2048):
        x0, d = toy.sample("8gaussians", n, g).x, toy.sample("moons", n, g)
        m = sq_cost_matrix(x0, d.x)
        cc = sq_cost_matrix(d.x[:, :1], d.x[:, :1])
        w = search_weight(m, cc, 0.05, 100.0)
        cases = {"8 Gaussians -> moons, squared": m, "8 Gaussians -> moons, Euclidean": cost_matrix(x0, d.x, "euclidean"),
                 "N(0, I) -> moons, squared": sq_cost_matrix(torch.randn(n, 2, generator=g), d.x),
                 f"c2ot-x: squared + {w:.0f}·C(x)": m + w * cc,
                 "192-d noise -> 192-d uniform": sq_cost_matrix(torch.randn(n, 192, generator=g),
                                                                torch.rand(n, 192, generator=g) * 2 - 1)}
        for name, cost in cases.items():
            c = cost.numpy()
            if n == 2048 and not name.startswith("8 Gaussians -> moons, sq"):
                continue
            t_lsa, t_emd = best(lambda c=c: linear_sum_assignment(c)), best(lambda c=c: _simplex_perm(c))
            rows, cols = linear_sum_assignment(c)
            ref = np.empty(n, dtype=np.int64)
            ref[cols] = rows
            print(f"| {name} | {n} | {t_lsa:.1f} | {t_emd:.1f} | {t_lsa / t_emd:.1f}x | "
                  f"{np.array_equal(ref, _simplex_perm(c))} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cores", type=int, default=2, help="snakemake --cores")
    p.add_argument("--results", default=yaml.safe_load(CONFIG.read_text())["results"],
                   help="results folder (default: the config's own; finished jobs are kept, not rerun)")
    p.add_argument("--seed-first", action=argparse.BooleanOptionalAction, default=True,
                   help="run seed 0 of every experiment before the other seeds")
    p.add_argument("--phase1", default=None, help="comma-separated experiments whose seed 0 runs alone first")
    p.add_argument("--first", default="", type=lambda v: [m for m in v.split(",") if m],
                   help="comma-separated methods whose experiments (every seed) are scheduled before the rest")
    p.add_argument("--collect-only", action="store_true", help="do not run: tabulate what has finished")
    p.add_argument("--no-write", action="store_true", help="print the entry without appending it to --out")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS.md"), help="results file to append to")
    p.add_argument("--assign-bench", action="store_true", help="only time the exact-assignment solvers (printed)")
    p.add_argument("--in-progress-since", default=None, help="--collect-only during a run: ISO start of its phase")
    p.add_argument("--load-file", default=None, help="--collect-only: extra '<time> <load>' samples to include")
    p.add_argument("--run-dir", action="append", default=[],
                   help="EXP/seedN=DIR: read that run from DIR (a run made with the same stage commands elsewhere)")
    a = p.parse_args()
    a.run_dir = dict(x.split("=", 1) for x in a.run_dir)
    if a.assign_bench:
        assign_bench()
        return
    if not a.collect_only:
        run(a)
    lines = collect(a)
    if not a.no_write:
        with open(a.out, "a") as f:
            f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
