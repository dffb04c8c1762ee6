"""The rehearsal: every full-scale config in config/ end to end on CPU against generated stand-ins.

For each config (all of them by default) this derives its rehearsal config (only allow-listed keys differ:
paths, counts, K, model sizes, steps, batch sizes, device keys; see sourceflow/rehearsal.py), writes the
stand-ins its paths point at (class folders of JPEGs / PNGs, CSFM's caption JSONL, an ADM reference npz,
tiny random-weight DINOv2 / AutoencoderRAE / CLIP / AutoencoderKL / Inception of the real classes), copies
the workflow into <out>/<config>/ and runs `snakemake --cores N --configfile config/rehearsal.yaml` there,
then checks the report and prints one line per config with its wall time. Exit status 1 if any failed.

  python benchmarks/rehearse.py                       # all configs (make rehearse)
  python benchmarks/rehearse.py imagenet256-mmfm      # one
  python benchmarks/rehearse.py --record              # and append the timings to benchmarks/RESULTS.md
  python benchmarks/rehearse.py cifar10-loom -- --profile profiles/slurm --default-resources slurm_partition=debug

Arguments after `--` go to every snakemake call. A rerun reuses the stand-ins and what Snakemake finds up to
date; --fresh deletes <out> first.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sourceflow import rehearsal  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="*", help="config names (with or without .yaml); default: all full-scale configs")
    p.add_argument("--out", default=str(ROOT / "results" / "rehearsal"), help="rehearsal folder (stand-ins and one folder per config)")
    p.add_argument("--cores", type=int, default=2, help="snakemake --cores")
    p.add_argument("--fresh", action="store_true", help="delete --out first")
    p.add_argument("--record", action="store_true", help="append command, machine, load and timings to benchmarks/RESULTS.md")
    a = p.parse_args(argv)
    names = [c if c.endswith(".yaml") else f"{c}.yaml" for c in a.configs] or list(rehearsal.FULL_CONFIGS)
    unknown = sorted(set(names) - set(rehearsal.FULL_CONFIGS))
    if unknown:
        p.error(f"not full-scale configs: {', '.join(unknown)} (choose from {', '.join(rehearsal.FULL_CONFIGS)})")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" bars of the stand-in models
    out = Path(a.out)
    if a.fresh:
        shutil.rmtree(out, ignore_errors=True)
    load0 = os.getloadavg()[0]
    t0 = time.time()
    outcomes = []
    for name in names:
        print(f"rehearsing config/{name} in {out / Path(name).stem}", flush=True)
        o = rehearsal.rehearse(name, out, a.cores, tuple(extra), log=lambda m: print(m, flush=True))
        outcomes.append(o)
        print(f"{'ok' if o.ok else 'FAILED':6s} {name:24s} {o.wall_s:6.0f} s wall {o.cpu_s:6.0f} s CPU {o.jobs:3d} jobs  "
              f"{o.summary}", flush=True)
    total = time.time() - t0
    load = f"1-minute load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} cores"
    print(f"total {total:.0f} s ({total / 60:.1f} min) wall, {sum(o.cpu_s for o in outcomes):.0f} s CPU; {load}")
    if a.record:
        cmd = "python benchmarks/rehearse.py " + " ".join([*a.configs, *(["--"] + extra if extra else [])])
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write("\n" + rehearsal.record(outcomes, cmd.strip(), rehearsal.machine(), load, total))
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
