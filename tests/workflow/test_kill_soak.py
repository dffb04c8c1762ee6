"""Issue 10, item 1 (CI version of benchmarks/kill_soak.py): SIGKILL the whole Snakemake process group while
toy training and while toy sampling run, unlock, rerun; every artifact is byte-identical to the uninterrupted
run's and no temporary file is left. The kill waits for a progress line in the stage's log (not a sleep),
so the test does not depend on timing."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from sourceflow.soak import Stage, count_lines, kill_trial, run_snakemake

from .helpers import scratch_repo

pytestmark = pytest.mark.slow

# one toy experiment: 400 steps with a timings line every 20; four sweep entries (dopri5 last and slowest)
CONFIG = """
results: results
seeds: [0]
datasets:
  moons: {kind: toy, distribution: moons, n_train: 256, n_test: 200, seed: 0}
defaults:
  model: {kind: mlp, width: 16, depth: 2, expansion: 1.0}
  train: {steps: 400, batch_size: 64, checkpoint_every: 20, log_every: 20}
  sample:
    num_samples: 2000
    solvers:
      - {solver: euler, steps: [1, 2, 4]}
      - {solver: dopri5}
  evaluate: {num_points: 200}
experiments:
  - {name: toy, method: mmfm, data: moons, source: {kind: gmm, components: 4}, conditioning: mode}
"""

RUN = "results/moons/runs/toy/seed0"
LOGS = "results/logs/moons/toy/seed0"
TRAIN = Stage("train", (f"{RUN}/model.safetensors", f"{RUN}/train_summary.json"),
              (f"{RUN}/model.safetensors", f"{RUN}/train_summary.json", f"{RUN}/checkpoints",
               f"{RUN}/train_log.jsonl", f"{RUN}/train_curves.png"),
              count_lines(f"{LOGS}/train.log", r'^timings .*"stage": "train"'), marks=19)
SAMPLE = Stage("sample", (f"{RUN}/samples/index.json",), (f"{RUN}/samples",),
               count_lines(f"{LOGS}/sample.log", r"samples, NFE"), marks=3)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    repo = scratch_repo(tmp_path_factory.mktemp("baseline"), CONFIG)
    run_snakemake(repo, TRAIN.targets[0], SAMPLE.targets[0], env=dict(os.environ, OMP_NUM_THREADS="1"))
    return repo


@pytest.mark.parametrize("stage, mark", [(TRAIN, 2), (TRAIN, 7), (SAMPLE, 1), (SAMPLE, 3)],
                         ids=["train-step40", "train-step140", "sample-entry1", "sample-entry3"])
def test_a_killed_stage_reruns_to_the_same_bytes(baseline, tmp_path, stage, mark):
    trial = kill_trial(baseline, tmp_path / "trial", stage, mark, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert trial.landed, f"{stage.name} finished before its mark {mark}: the kill hit nothing"
    assert not trial.error, trial.error
    assert not trial.survivors, f"processes outlived the process-group kill: {trial.survivors}"
    assert not trial.differences, f"differ from the uninterrupted run: {trial.differences}"
    assert not trial.leftovers, f"temporary files left behind: {trial.leftovers}"
    shutil.rmtree(tmp_path / "trial")
