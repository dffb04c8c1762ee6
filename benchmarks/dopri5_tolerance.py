"""Benchmark: the dopri5 entry of a finished default run resampled at another solver tolerance.

Takes a finished results folder (e.g. from `python benchmarks/default_run.py --results DIR`), asks Snakemake
for the exact `stages/sample.py` / `stages/evaluate.py` commands of every run (`-n -p --forcerun`), and reruns
them with the spec's `sample.rtol`/`sample.atol` set to --tol and dopri5 as the only solver, writing into
--out (the results folder is not touched). Then prints a markdown table: per experiment the W2² (toy) or FD
(images) and the NFE of dopri5 at the run's own tolerance and at --tol, mean ± std over seeds. The models and
the source draws are the run's own, so the difference is the solver's.

  python benchmarks/dopri5_tolerance.py --results /tmp/sf-before --tol 1e-3 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics as st
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def stage_commands(results: Path) -> dict[tuple[str, str, str], dict[str, list[str]]]:
    """(dataset, experiment, seed) -> {"sample": argv, "evaluate": argv} as the workflow would run them."""
    dry = subprocess.run([sys.executable, "-m", "snakemake", "--config", f"results={results}", "-n", "-p",
                          "--forcerun", "sample", "evaluate"], cwd=ROOT, check=True, capture_output=True, text=True)
    out: dict[tuple[str, str, str], dict[str, list[str]]] = {}
    for line in dry.stdout.splitlines():
        m = re.match(r"Shell command: python stages/(sample|evaluate)\.py (.*?) > ", line)
        if not m:
            continue
        argv = shlex.split(m.group(2))
        spec = Path(argv[argv.index("--spec") + 1])
        seed = argv[argv.index("--seed") + 1]
        out.setdefault((spec.parent.parent.parent.name, spec.parent.name, seed), {})[m.group(1)] = argv
    return out


def _set(argv: list[str], flag: str, value: str) -> list[str]:
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


def resample(key: tuple[str, str, str], cmds: dict[str, list[str]], tol: float, out: Path) -> Path:
    """Sample dopri5 at ``tol`` from the run's model and evaluate it; returns the metrics file."""
    ds, exp, seed = key
    run = out / ds / exp / f"seed{seed}"
    run.mkdir(parents=True, exist_ok=True)
    spec = json.loads(Path(cmds["sample"][cmds["sample"].index("--spec") + 1]).read_text())
    spec["sample"].update(rtol=tol, atol=tol, solvers=[{"solver": "dopri5"}])
    (run / "spec_sample.json").write_text(json.dumps(spec))
    sample = _set(_set(cmds["sample"], "--spec", str(run / "spec_sample.json")), "--out", str(run / "samples"))
    evaluate = _set(_set(cmds["evaluate"], "--samples", str(run / "samples")), "--out", str(run / "metrics"))
    for name, argv in (("sample", sample), ("evaluate", evaluate)):
        with open(run / f"{name}.log", "w") as log:
            subprocess.run([sys.executable, f"stages/{name}.py", *argv], cwd=ROOT, check=True, stdout=log,
                           stderr=subprocess.STDOUT)
    return run / "metrics" / "all.json"


def dopri5(metrics: Path) -> dict:
    return next(r for r in json.loads(metrics.read_text()) if r["solver"] == "dopri5")["metrics"]


def table(pairs: dict[tuple[str, str, str], tuple[dict, dict]], tol: float) -> str:
    """Markdown: per experiment, metric and NFE at the run's tolerance and at ``tol``."""
    by_exp: dict[str, list[tuple[dict, dict]]] = {}
    for (_, exp, _), pair in sorted(pairs.items()):
        by_exp.setdefault(exp, []).append(pair)

    def ms(v: list[float]) -> str:
        return f"{st.mean(v):.4g} ± {st.stdev(v):.2g}" if len(v) > 1 else f"{v[0]:.4g}"

    lines = [f"| experiment | seeds | metric | run's tolerance | NFE | tolerance {tol:g} | NFE | change |",
             "|---|---:|---|---|---:|---|---:|---:|"]
    for exp, prs in by_exp.items():
        key = "fd" if "fd" in prs[0][0] else "w2sq"
        a, b = [p[0][key] for p in prs], [p[1][key] for p in prs]
        na, nb = st.mean(p[0]["nfe"] for p in prs), st.mean(p[1]["nfe"] for p in prs)
        lines.append(f"| {exp} | {len(prs)} | {'FD' if key == 'fd' else 'W2²'} | {ms(a)} | {na:.0f} | {ms(b)} | "
                     f"{nb:.0f} | {(st.mean(b) - st.mean(a)) / st.mean(a) * 100:+.1f}% |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", required=True, type=Path, help="a finished results folder of the default config")
    p.add_argument("--tol", type=float, default=1e-3, help="dopri5 rtol and atol to resample at")
    p.add_argument("--out", type=Path, default=None, help="where the resampled runs go (default: /tmp/dopri5-tol-TOL)")
    p.add_argument("--jobs", type=int, default=2, help="runs resampled at once (one thread each)")
    p.add_argument("--experiments", default=None, help="comma-separated experiment names (default: all)")
    a = p.parse_args()
    out = a.out or Path(f"/tmp/dopri5-tol-{a.tol:g}")
    wanted = set(a.experiments.split(",")) if a.experiments else None
    cmds = {k: v for k, v in stage_commands(a.results.resolve()).items()
            if (wanted is None or k[1] in wanted) and set(v) == {"sample", "evaluate"}}
    if not cmds:
        raise SystemExit(f"no sample/evaluate commands found for {a.results}")
    with ThreadPoolExecutor(a.jobs) as pool:
        files = dict(zip(cmds, pool.map(lambda kv: resample(kv[0], kv[1], a.tol, out), cmds.items()), strict=True))
    pairs = {}
    for (ds, exp, seed), new in files.items():
        base = a.results / ds / "runs" / exp / f"seed{seed}" / "metrics" / "all.json"
        pairs[(ds, exp, seed)] = (dopri5(base), dopri5(new))
    print(table(pairs, a.tol))


if __name__ == "__main__":
    main()
