"""Issue 10, item 7: every artifact that is a pure function of its inputs and seed is byte-identical
across runs on the same machine. One toy and one digits experiment run twice, in two scratch folders (so
an absolute path written into an artifact shows too); every file under results/ except the logs and the
benchmarks (where timings and host facts belong) must be the same bytes, the report's PNGs included.
The results folder has a space and a quote in its name and the second scratch folder a space: every path
reaches the stages' command lines quoted (issue 10, item 4)."""

from __future__ import annotations

import pytest

from sourceflow.io import read_timings
from sourceflow.soak import artifacts, first_difference  # logs and benchmarks excluded

from .helpers import scratch_repo, snakemake

pytestmark = pytest.mark.slow

# The smallest settings that still reach every stage of the two kinds: toy data, a points GMM, MM-FM
# training, sampling, evaluation; digits through the pixel encoder, CLS + spatial GMMs, latent statistics,
# the feature network and its reference statistics, a tiny DiT; and the report.
RESULTS = "out dir/it's"
CONFIG = """
results: "RESULTS"
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
    gmm:
      - {encoder: pixels, components: [4], variance: spherical}
    reference:
      features: [feature-net]
      feature_net: {epochs: 1}
    defaults:
      model: {kind: dit, size: DiT-XT/2}
      train: {steps: 4, batch_size: 32, checkpoint_every: 2, log_every: 2}
      sample:
        num_samples: 100
        batch_size: 100
        shard_rows: 100
        solvers:
          - {solver: euler, steps: [2]}
      evaluate: {min_samples: 100}
defaults:
  model: {kind: mlp, width: 16, depth: 2, expansion: 1.0}
  train: {steps: 10, batch_size: 64, checkpoint_every: 5, log_every: 5}
  sample:
    num_samples: 200
    solvers:
      - {solver: euler, steps: [2]}
  evaluate: {num_points: 200}
experiments:
  - {name: toy-mmfm, method: mmfm, data: moons, source: {kind: gmm, components: 4}, conditioning: mode}
  - {name: digits-mmfm, method: mmfm, data: digits, source: {kind: gmm, components: 4}, conditioning: mode}
report:
  scatter_steps: [2]
  scatter_points: 200
  grid_steps: [2]
  grid_images: 16
""".replace("RESULTS", RESULTS)

def test_two_runs_write_byte_identical_artifacts(tmp_path):
    runs = [scratch_repo(tmp_path / name, CONFIG) for name in ("a", "b c")]
    for repo in runs:
        snakemake(repo)
    ra, rb = (repo / RESULTS for repo in runs)
    fa, fb = artifacts(ra), artifacts(rb)
    assert fa == fb, f"only in the first run: {sorted(fa - fb)}; only in the second: {sorted(fb - fa)}"
    assert {"report/metrics.csv", "report/summary.md", "report/training_curves.png",
            "moons/runs/toy-mmfm/seed0/train_summary.json", "digits/pixels/latents.json"} <= fa
    differ = {f: off for f in sorted(fa) if (off := first_difference(ra / f, rb / f)) is not None}
    assert not differ, "differ between two identical runs (file: first differing byte offset):\n" + "\n".join(
        f"  {f}: {off}" for f, off in differ.items())
    # the timings are not lost: they are in the job logs
    log = ra / "logs" / "moons" / "toy-mmfm" / "seed0" / "train.log"
    assert {"seconds", "steps_per_second"} <= set(read_timings(log, "train")[-1])
