"""The MM-FM rehearsal end to end (the config that exercises the most: RAE latents with flips, the CLS GMM
and the spherical spatial GMM, the focal per-mode weight, epoch lr / EMA schedules, streamed latents,
autoguidance by a smaller guide, ADM-style FID with the TorchScript Inception against an ADM npz): the
rehearsal config of config/imagenet256-mmfm.yaml with its stand-ins, through Snakemake. Where the local one-node SLURM cluster can be started (root or sudo, as in CI) every job
goes through sbatch with the real profiles/slurm (partition and account set for that cluster, as the SLURM
tests do); elsewhere it runs with `snakemake --cores 2`."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sourceflow import rehearsal as R

from ..slurm.test_slurm import CLUSTER, SUBMITTED, cluster_profile, job_resources, start_cluster

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mmfm(tmp_path_factory) -> R.Outcome:
    out = tmp_path_factory.mktemp("rehearsal")
    if not start_cluster():
        return R.rehearse("imagenet256-mmfm.yaml", out, cores=2, log=lambda m: None, timeout=3600)
    return R.rehearse("imagenet256-mmfm.yaml", out, cores=2, snakemake_args=("--profile", "profiles/slurm", *CLUSTER),
                      log=lambda m: None, timeout=3600, patch=cluster_profile)


def test_mmfm_rehearsal_runs_end_to_end(mmfm):
    assert mmfm.ok, mmfm.summary
    assert mmfm.jobs >= 20
    if os.geteuid() == 0 or shutil.which("sudo"):  # through the cluster (start_cluster): jobs went to sbatch
        log = (mmfm.folder / "snakemake.log").read_text()
        assert len(SUBMITTED.findall(log)) == len(job_resources(log)) >= 15, log[-3000:]  # all but local rules
    cfg = R.rehearsal_config(yaml.safe_load((R.ROOT / "config" / "imagenet256-mmfm.yaml").read_text()),
                             mmfm.folder.parent / "standins")
    for path in R.expected_outputs(cfg):
        assert (mmfm.folder / path).exists(), path


def test_report_has_an_adm_fid_for_every_experiment(mmfm):
    res = mmfm.folder / "results"
    rows = R.read_metrics(mmfm.folder, {"results": "results"})
    fd = {r["experiment"]: float(r["value"]) for r in rows if r["metric"] == "fd"}
    assert set(fd) == {"mmfm", "mmfm-ag", "mmfm-guide", "fm-gaussian"}
    assert all(math.isfinite(v) and v > 0 for v in fd.values())
    assert {(r["solver"], r["nfe"]) for r in rows if r["metric"] == "fd"} == {("euler", "49")}
    for exp in fd:
        rec = json.loads((res / "imagenet256" / "runs" / exp / "seed0" / "metrics" / "euler-49.json").read_text())
        assert rec["features"] == {"name": "adm", "preprocessing": "legacy_tensorflow"}
        assert rec["metrics"]["num_samples"] == R.Scale().image_samples
    summary = (res / "report" / "summary.md").read_text()
    assert "euler-49" in summary and "mmfm-ag" in summary


def test_training_followed_the_full_recipe(mmfm):
    run = mmfm.folder / "results" / "imagenet256" / "runs"
    log = [json.loads(ln) for ln in (run / "mmfm" / "seed0" / "train_log.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in log]
    # 80 epochs in 20 steps: 4e-4 for epochs 0-20, 2e-4 from epoch 20, linear decay from epoch 40 (~1.9e-4 at 80)
    assert lrs[0] == pytest.approx(4e-4) and 2e-4 in lrs and lrs[-1] == pytest.approx(1.9e-4, rel=0.02)
    # the focal weight is on after its warm-up: the weighted loss differs from the plain one
    assert log[0]["fm_focal"] == log[0]["fm"] and any(r["fm_focal"] != r["fm"] for r in log[2:])
    # the guide trained a quarter as long (20 of 80 epochs)
    guide = json.loads((run / "mmfm-guide" / "seed0" / "train_summary.json").read_text())
    assert guide["steps"] * 4 == json.loads((run / "mmfm" / "seed0" / "train_summary.json").read_text())["steps"]


def test_nothing_left_to_do(mmfm):
    res = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", "-n", "--configfile",
                          "config/rehearsal.yaml", *R.cpu_resources(())], cwd=mmfm.folder, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Nothing to be done" in res.stdout + res.stderr


def test_cli_lists_and_refuses(tmp_path):
    script = Path(R.ROOT / "benchmarks" / "rehearse.py")
    res = subprocess.run([sys.executable, str(script), "config", "--out", str(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "not full-scale configs: config.yaml" in res.stderr
