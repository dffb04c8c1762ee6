"""The tiny workflow through a real one-node SLURM cluster (tests/slurm/local-cluster.sh): every job
goes through sbatch, and the outputs equal those of a local run."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from ..workflow.helpers import ROOT, scratch_repo, snakemake

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

SCRIPT = ROOT / "tests" / "slurm" / "local-cluster.sh"
# Two experiments keep the cluster run short: an OT coupling and the mixture source (GMM job too).
CONFIG = (ROOT / "tests" / "data" / "tiny.yaml").read_text().split("experiments:")[0] + """experiments:
  - {name: otcfm, method: otcfm, data: moons}
  - {name: mmfm, method: mmfm, data: moons, source: {kind: gmm, components: 4}, conditioning: mode}
report:
  scatter_steps: [1, 2]
  scatter_points: 300
"""
# The local cluster has no accounting database: sacct cannot report job states, so the plugin asks squeue.
LOCAL_CLUSTER = ["--slurm-no-account", "--slurm-status-command", "squeue",
                 "--slurm-init-seconds-before-status-checks", "1", "--slurm-keep-successful-logs",
                 "--default-resources", "slurm_partition=debug", "runtime=10", "mem_mb=1000", "gpu=0", "--jobs", "2"]


def small_rule_resources() -> list[str]:
    """``--set-resources`` that shrink every per-rule request of the cluster profile to what the one-node
    test cluster has (its node offers ~90% of this machine's memory; the profile asks for cluster-sized
    memory and CPUs, which sbatch refuses: "Memory specification can not be satisfied")."""
    profile = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
    small = {"mem_mb": 1000, "runtime": 10, "cpus_per_task": 1, "cpus_per_gpu": 1}
    out = [f"{rule}:{key}={small[key]}" for rule, res in profile.get("set-resources", {}).items()
           for key in res if key in small]
    return ["--set-resources", *out] if out else []


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0 and shutil.which("sudo") is None:
        pytest.skip("starting the local SLURM cluster needs root or sudo")
    res = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"local cluster did not start:\n{res.stdout}\n{res.stderr}"
    yield


def test_workflow_through_sbatch_equals_a_local_run(cluster, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    remote = scratch_repo(tmp_path / "slurm", CONFIG)
    local = scratch_repo(tmp_path / "local", CONFIG)
    res = snakemake(remote, "--profile", "profiles/slurm", *LOCAL_CLUSTER, *small_rule_resources(), env=env,
                    timeout=1500)
    out = res.stdout + res.stderr
    submitted = re.findall(r"submitted with SLURM jobid (\d+)", out)
    # data, data floor, GMM, 2 x (train, sample, evaluate), report; the spec files are local rules
    assert len(set(submitted)) == 10, out[-3000:]
    slurm_logs = list((remote / ".snakemake" / "slurm_logs").rglob("*.log"))
    rules = {p.relative_to(remote / ".snakemake" / "slurm_logs").parts[0] for p in slurm_logs}
    assert {"rule_make_toy_data", "rule_reference_stats", "rule_fit_cls_gmm", "rule_train", "rule_sample",
            "rule_evaluate", "rule_report"} <= rules
    snakemake(local, env=env)
    for run in ("otcfm", "mmfm"):
        a = load_file(str(remote / f"results/moons/runs/{run}/seed0/model.safetensors"))
        b = load_file(str(local / f"results/moons/runs/{run}/seed0/model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma = pd.read_csv(remote / "results/report/metrics.csv")
    mb = pd.read_csv(local / "results/report/metrics.csv")
    pd.testing.assert_frame_equal(ma, mb)
    assert (Path(remote) / "results/report/summary.md").read_text() == (Path(local) / "results/report/summary.md").read_text()
