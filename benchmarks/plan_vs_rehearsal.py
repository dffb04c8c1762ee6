"""The resource plan against what a rehearsal measured (issue 9): for every job of every rehearsed config,
the plan's host memory beside Snakemake's measured max_rss (ratio plan / measured; aim: within x1.5) and the
plan's hours beside the measured seconds (for the record only: see below).

Each rehearsal folder <out>/<config>/ (benchmarks/rehearse.py) is planned with sourceflow.plan from inside
that folder, from its config/rehearsal.yaml, so the plan reads the image counts from the manifests the run
wrote and the requests from the folder's own rules and profile. Each planned job is matched to the
benchmark: file of its rule and wildcards (<results>/benchmarks/...tsv). The matching and tables are
sourceflow.plan_check.

Reading the numbers:
  - max_rss is Snakemake's RSS of the job's process tree, sampled every 0.5 s for the first 15 s and every
    30 s after: a lower bound of the peak; a sub-second job may be sampled before Python has started.
  - plan/measured > 1: the plan (and a request made from it) over-asks; < 1: it under-asks.
  - Time is not a test: the plan's hours are compute at the stated throughput (CPU jobs at
    Throughput.cpu_tflops) or I/O at the stated rates, with no process start-up; a job the plan gives a
    GPU is timed on a GPU. At rehearsal scale the measured seconds are mostly start-up (imports, models).
  - A job the plan gives a GPU ran on CPU in the rehearsal: its CUDA-process host term is swapped for the
    CPU-process one before comparing (the row says so).
  - Local jobs (experiment_spec) run inside Snakemake; their benchmarks measure the Snakemake process and
    are listed, not compared.

  python benchmarks/plan_vs_rehearsal.py --out /tmp/reh/out             # every rehearsed config there
  python benchmarks/plan_vs_rehearsal.py imagenet256-mmfm --out /tmp/reh/out
  python benchmarks/plan_vs_rehearsal.py --out /tmp/reh/out --record    # and append to benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sourceflow import plan_check  # noqa: E402


def folders(out: Path, names: list[str], configfile: str) -> list[Path]:
    """The rehearsal folders to check: the named ones, or every folder under ``out`` with ``configfile``."""
    if names:
        picked = [out / Path(n).stem for n in names]
        missing = [str(p) for p in picked if not (p / configfile).is_file()]
        if missing:
            raise SystemExit(f"no {configfile} in: {', '.join(missing)} (run benchmarks/rehearse.py first)")
        return picked
    found = sorted(p for p in out.iterdir() if (p / configfile).is_file()) if out.is_dir() else []
    if not found:
        raise SystemExit(f"no rehearsal folders with {configfile} under {out} (run benchmarks/rehearse.py first)")
    return found


def overall(rows: list[plan_check.Row]) -> str:
    """One paragraph: how many compared jobs are within x1.5, and which under- / over-ask beyond it."""
    r = [x for x in rows if x.ratio is not None]
    w = plan_check.WITHIN
    within = [x for x in r if 1 / w <= x.ratio <= w]
    under = sorted({x.rule for x in r if x.ratio < 1 / w})
    over = sorted({x.rule for x in r if x.ratio > w})
    return (f"{len(within)} of {len(r)} compared jobs within x{w:g} (plan / measured max_rss); plan under-asks "
            f"(< 1/{w:g}) in: {', '.join(under) or 'none'}; over-asks (> {w:g}) in: {', '.join(over) or 'none'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="*", help="rehearsal folder names under --out (config stems, e.g. "
                   "imagenet256-mmfm; .yaml is dropped); default: every folder under --out with --configfile")
    p.add_argument("--out", default=str(ROOT / "results" / "rehearsal"),
                   help="the rehearsal folder, as benchmarks/rehearse.py --out (default: results/rehearsal)")
    p.add_argument("--configfile", default="config/rehearsal.yaml",
                   help="each folder's config, relative to the folder (default: the one rehearse.py writes)")
    p.add_argument("--images", nargs="*", default=[], metavar="DATASET=N",
                   help="training images of a dataset for the plan; only needed where a folder has no "
                        "results/<dataset>/manifest.json (the plan reads the counts from there)")
    p.add_argument("--json", default=None, help="also write every row (plan, measurement, ratio, notes) as JSON here")
    p.add_argument("--with-local", action="store_true",
                   help="list the local jobs (experiment_spec) in the per-job table too (never compared)")
    p.add_argument("--record", action="store_true",
                   help="append command, machine, date, the per-rule summary and the per-job table to "
                        "benchmarks/RESULTS.md")
    a = p.parse_args(argv)
    images = {}
    for item in a.images:
        name, sep, n = item.partition("=")
        if not sep or not n.isdigit():
            p.error(f"--images: expected DATASET=N, got {item!r}")
        images[name] = int(n)

    rows: list[plan_check.Row] = []
    unplanned: list[str] = []
    planner = None
    for folder in folders(Path(a.out), a.configs, a.configfile):
        print(f"planning {folder / a.configfile}", file=sys.stderr, flush=True)
        r, u, planner = plan_check.check_folder(folder, a.configfile, images or None)
        rows += r
        unplanned += [f"{folder.name}/{x}" for x in u]

    summary = plan_check.summary_markdown(plan_check.summarise(rows))
    table = plan_check.rows_markdown(rows, a.with_local)
    assumptions = (f"plan assumptions: {planner.tp.describe()}; {planner.io.describe()}" if planner else "")
    time_note = ("Time columns are for the record, not a test: the plan's hours are compute at the stated "
                 "throughput or I/O at the stated rates, without process start-up, and a GPU-planned job's "
                 "hours assume a GPU (marked 'not comparable'); the measured s are wall seconds on this CPU.")
    lines = [table, "", summary, "", overall(rows), plan_check.local_line(rows),
             "benchmark files no planned job accounts for: " + (", ".join(unplanned) or "none"), time_note,
             assumptions]
    print("\n".join(lines))
    if a.json:
        Path(a.json).write_text(json.dumps([{
            "config": x.config, "rule": x.rule, "job": x.what, "local": x.local, "gpus": x.gpus,
            "plan_host_gb": x.plan_host_gb, "max_rss_gb": x.rss_gb, "ratio": x.ratio, "plan_s": x.plan_time_s,
            "time_basis": x.time_basis, "measured_s": x.measured.s if x.measured else None,
            "cpu_s": x.measured.cpu_s if x.measured else None, "benchmark": x.benchmark, "notes": x.notes}
            for x in rows], indent=1))
    if a.record:
        from sourceflow import rehearsal

        cmd = "python benchmarks/plan_vs_rehearsal.py " + " ".join(argv if argv is not None else sys.argv[1:])
        entry = [f"## Plan vs rehearsal: host memory and time against the benchmarks (issue 9), "
                 f"{dt.date.today().isoformat()}", "",
                 f"- command: `{cmd.strip()}`", f"- machine: {rehearsal.machine()}",
                 f"- rehearsal: {len({x.config for x in rows})} configs, {len(rows)} planned jobs, "
                 f"{sum(x.ratio is not None for x in rows)} compared", f"- {assumptions}", "",
                 "Per rule, plan host GB / measured max_rss GB:", "", summary, "",
                 f"- {overall(rows)}", f"- {plan_check.local_line(rows)}",
                 "- benchmark files no planned job accounts for: " + (", ".join(unplanned) or "none"),
                 f"- {time_note}", "", "<details><summary>per job</summary>", "", table, "", "</details>", ""]
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write("\n" + "\n".join(entry))
        print("appended to benchmarks/RESULTS.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
