"""Kill soak (issue 10, item 1, "kill anywhere, lose nothing"): SIGKILL the whole Snakemake process group
at random moments of each stage, unlock, rerun, and check every artifact byte-identical to an uninterrupted
run with no temporary files left behind.

One small config reaches every stage: digits through a tiny random-weight DINOv2 with registers (CLS GMM,
spatial GMM), MiniLM caption embeddings, a toy experiment trained by one process and one by two (gloo),
and a digits DiT whose samples go to the sharded Zarr store. The uninterrupted baseline runs once; each trial
copies it, deletes one stage's outputs, reruns that stage and kills it at the n-th progress mark (n and an
extra delay drawn from a seeded RNG), then unlocks, reruns and compares (sourceflow/soak.py). Stages take
turns, so a --minutes limit leaves every stage the same number of trials (±1).

Usage:
  python benchmarks/kill_soak.py --trials 10 --minutes 20 --record      # the soak; appends to RESULTS.md
  python benchmarks/kill_soak.py --stages train,sample --trials 2       # a quick look
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from sourceflow.soak import Stage, Trial, count_files, count_lines, run_snakemake, soak, summary  # noqa: E402

CONFIG = """
results: results
seeds: [0]
datasets:
  moons: {kind: toy, distribution: moons, n_train: 256, n_test: 200, seed: 0}
  digits:
    kind: digits
    resolution: 8
    test_fraction: 0.15
    workers: 2
    encoders:
      pixels: {kind: pixels, shard_rows: 512}
      dino: {kind: dinov2, weights: models/tiny-dinov2, resolution: 28, processes: 1, batch_size: 64, shard_rows: 128}
    gmm:
      - {encoder: pixels, components: [4], variance: spherical}
      - {encoder: dino, components: [4], variance: diag}
    captions:
      text_encoders: {minilm: {kind: minilm, max_length: 32}}
    reference:
      features: [feature-net]
      feature_net: {epochs: 1}
    defaults:
      model: {kind: dit, size: DiT-XT/2}
      train: {steps: 4, batch_size: 32, checkpoint_every: 2, log_every: 2}
      sample:
        num_samples: 800
        batch_size: 50
        shard_rows: 50
        solvers:
          - {solver: euler, steps: [4]}
      evaluate: {min_samples: 100}
defaults:
  model: {kind: mlp, width: 16, depth: 2, expansion: 1.0}
  train: {steps: 200, batch_size: 64, checkpoint_every: 20, log_every: 20}
  sample:
    num_samples: 2000
    solvers:
      - {solver: euler, steps: [1, 2, 4, 8]}
  evaluate: {num_points: 2000}
experiments:
  - {name: toy, method: mmfm, data: moons, source: {kind: gmm, components: 4}, conditioning: mode}
  - {name: toy2, method: fm, data: moons, source: {kind: toy, distribution: 8gaussians},
     overrides: {train: {processes: 2}}}
  - {name: img, method: mmfm, data: digits, encoder: pixels, source: {kind: gmm, components: 4}, conditioning: mode}
"""

R = "results"
DINO = f"{R}/digits/dino"
GMM = f"{DINO}/gmm"
LOG = f"{R}/logs"


def train_stage(name: str, exp: str) -> Stage:
    """A toy training run: 200 steps, a checkpoint (and a timings line) every 20."""
    run = f"{R}/moons/runs/{exp}/seed0"
    return Stage(name, (f"{run}/model.safetensors", f"{run}/train_summary.json"),
                 (f"{run}/model.safetensors", f"{run}/train_summary.json", f"{run}/checkpoints",
                  f"{run}/train_log.jsonl", f"{run}/train_curves.png"),
                 count_lines(f"{LOG}/moons/{exp}/seed0/train.log", r'^timings .*"stage": "train"'), marks=9,
                 extra_delay=0.2)


STAGES = {
    # 12 shards of 128 rows; the shard markers under _done/ are the progress
    "extract_latents": Stage("extract_latents", (f"{DINO}/latents.json",),
                             (f"{DINO}/latents.json", f"{DINO}/latents.zarr"),
                             count_files(f"{DINO}/latents.zarr/_done/shard_*.json"), marks=10, extra_delay=0.05),
    # short jobs: the first progress line of the work proper, then a random moment of the (sub-second) rest
    "fit_cls_gmm": Stage("fit_cls_gmm", (f"{GMM}/cls_K4.safetensors",), (f"{GMM}/cls_K4*",),
                         count_lines(f"{LOG}/digits/dino/fit_cls_gmm_K4.log", r"^fitting K="), marks=1,
                         extra_delay=0.8),
    "build_spatial_gmm": Stage("build_spatial_gmm", (f"{GMM}/spatial_K4.safetensors",), (f"{GMM}/spatial_K4*",),
                               count_lines(f"{LOG}/digits/dino/build_spatial_gmm_K4.log", r"^spatial GMM: 0/"),
                               marks=1, extra_delay=1.0),
    # six batches of ~1.5 s after the text encoder loaded
    "embed_captions": Stage("embed_captions", (f"{R}/digits/captions/minilm.zarr",),
                            (f"{R}/digits/captions/minilm.zarr",),
                            count_lines(f"{LOG}/digits/embed_captions_minilm.log", r"^embedding captions"), marks=1,
                            extra_delay=9.0),
    "train": train_stage("train", "toy"),
    "train2": train_stage("train2", "toy2"),
    # 16 shards of 50 images: kill mid-store, after the n-th shard marker
    "sample": Stage("sample", (f"{R}/digits/runs/img/seed0/samples/index.json",),
                    (f"{R}/digits/runs/img/seed0/samples",),
                    count_files(f"{R}/digits/runs/img/seed0/samples/*/samples.zarr/_done/shard_*.json"), marks=14,
                    extra_delay=0.05),
    # four sweep entries, one W2 line each: kill after 1..3 of them
    "evaluate": Stage("evaluate", (f"{R}/moons/runs/toy/seed0/metrics/all.json",),
                      (f"{R}/moons/runs/toy/seed0/metrics",),
                      count_lines(f"{LOG}/moons/toy/seed0/evaluate.log", r"W2²"), marks=3, extra_delay=0.3),
}


def make_baseline(dest: Path, env: dict[str, str]) -> Path:
    """The uninterrupted run: a copy of the workflow with CONFIG and a tiny DINOv2 under models/."""
    from sourceflow.rehearsal import scratch_workflow
    from sourceflow.standins import dinov2_registers, save_pretrained

    scratch_workflow(dest)  # the same copy of the workflow the rehearsal and the workflow tests make
    (dest / "config" / "config.yaml").write_text(CONFIG)
    save_pretrained(dinov2_registers(28, seed=0), dest / "models" / "tiny-dinov2")
    run_snakemake(dest, env=env)
    return dest


def table(rows: list[dict[str, object]]) -> str:
    head = "| stage | trials | kills landed while the stage ran | identical | leftovers | failures |"
    lines = [head, "|:--|--:|--:|--:|--:|--:|"]
    lines += [f"| {r['stage']} | {r['trials']} | {r['landed']} | {r['identical']} | {r['leftovers']} | "
              f"{r['failures']} |" for r in rows]
    return "\n".join(lines)


def describe(t: Trial) -> str:
    """One line for a failed trial: stage, mark, delay, what differed or was left."""
    parts = [f"{t.stage} (mark {t.mark}, +{t.delay:.2f} s, landed {t.landed})"]
    if t.differences:
        parts.append("differ: " + ", ".join(f"{f} ({why})" for f, why in list(t.differences.items())[:5]))
    if t.leftovers:
        parts.append("left: " + ", ".join(t.leftovers[:5]))
    if t.survivors:
        parts.append(f"surviving pids: {t.survivors}")
    if t.error:
        parts.append("rerun failed: " + t.error.strip().splitlines()[-1])
    return "; ".join(parts)


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, Linux {platform.release()}, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", default=",".join(STAGES),
                    help=f"comma-separated stages to kill (default all: {','.join(STAGES)})")
    ap.add_argument("--trials", type=int, default=10, help="trials per stage (default 10)")
    ap.add_argument("--minutes", type=float, default=None,
                    help="stop starting new rounds after this many minutes of trials (default: no limit)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the RNG that draws each kill's mark and delay")
    ap.add_argument("--out", type=Path, default=None,
                    help="work folder for the baseline and the trial copy (default: a temporary folder, removed)")
    ap.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    ap.add_argument("--json", type=Path, default=None, help="also write every trial's findings to this JSON file")
    args = ap.parse_args(argv)
    names = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(names) - set(STAGES))
    if unknown:
        ap.error(f"unknown stages {unknown}; known: {list(STAGES)}")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    work = args.out or Path(tempfile.mkdtemp(prefix="kill_soak."))
    work.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    t0 = time.time()
    try:
        baseline = work / "baseline"
        reused = (baseline / "results" / "report").exists()
        if not reused:
            if baseline.exists():
                shutil.rmtree(baseline)
            make_baseline(baseline, env)
        baseline_s = time.time() - t0
        print(f"baseline {'reused' if reused else f'in {baseline_s:.0f} s'}", flush=True)

        def show(t: Trial) -> None:
            status = "ok" if t.ok else "FAIL " + describe(t)
            print(f"{t.stage:18s} mark {t.mark:2d} +{t.delay:.2f}s landed={t.landed!s:5s} {t.seconds:5.1f}s {status}",
                  flush=True)

        trials = soak(baseline, work, [STAGES[n] for n in names], args.trials, seed=args.seed,
                      minutes=args.minutes, env=env, on_trial=show)
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)
    wall = time.time() - t0
    rows = summary(trials)
    print(table(rows))
    failed = [describe(t) for t in trials if not t.ok]
    if args.json:
        args.json.write_text(json.dumps([vars(t) for t in trials], indent=1))
    if args.record:
        cmd = "python benchmarks/kill_soak.py " + shlex.join(argv if argv is not None else sys.argv[1:])
        entry = [f"\n## Kill soak: SIGKILL of the Snakemake process group, rerun, compare (issue 10), "
                 f"{datetime.date.today()}\n",
                 f"- command: `{cmd}`", f"- machine: {machine()}",
                 f"- load average at the start: {load[0]:.2f} (a nice'd benchmark and a test run shared the cores)",
                 f"- wall time: {wall / 60:.1f} min; the uninterrupted baseline "
                 + ("was reused from --out" if reused else f"took {baseline_s:.0f} s of it"), "", table(rows), "",
                 "Failures: " + ("none" if not failed else "\n" + "\n".join(f"- {f}" for f in failed)), ""]
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write("\n".join(entry))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
