"""The tiny workflow through a real one-node SLURM cluster (tests/slurm/local-cluster.sh) with the real
cluster profile, profiles/slurm, changed only where a cluster must: partition and account. Every job
goes through sbatch with the profile's own per-rule requests (the test node is declared large enough),
and the outputs equal those of a local run. A training job whose time limit is cut to a minute or two
while it runs stops on SLURM's signal, is resubmitted and resumes to the weights of an uninterrupted
local run."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file
from snakemake.utils import validate

from ..workflow.helpers import ROOT, scratch_repo, snakemake

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

SCRIPT = ROOT / "tests" / "slurm" / "local-cluster.sh"
TINY = (ROOT / "tests" / "data" / "tiny.yaml").read_text().split("experiments:")[0]
# One experiment keeps the cluster run short; the mixture source brings every kind of job (data, data
# floor, GMM, train, sample, evaluate, report).
CONFIG = TINY + """experiments:
  - {name: mmfm, method: mmfm, data: moons, source: {kind: gmm, components: 4}, conditioning: mode}
report:
  scatter_steps: [1, 2]
  scatter_points: 300
"""
# The cluster's facts, not job shapes: no accounting database, so job states come from squeue (which
# keeps finished jobs for MinJobAge); the first status check soon after a submission and then every 2 s
# (the default 10 s between rounds made a chain of short jobs mostly waiting).
CLUSTER = ["--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "1",
           "--seconds-between-status-checks", "2", "--slurm-keep-successful-logs"]
SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+)")
FAILED = re.compile(r"SLURM-job '(\d+)' failed, SLURM status is: '(\w+)'")


def cluster_profile(repo: Path) -> dict:
    """profiles/slurm as it is, with this cluster's partition and no account, written into ``repo``."""
    prof = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
    rest = [r for r in prof["default-resources"] if not r.startswith(("slurm_partition=", "slurm_account="))]
    assert len(rest) == len(prof["default-resources"]) - 2  # both placeholders were there
    prof["default-resources"] = ["slurm_partition=debug", *rest]
    prof["slurm-no-account"] = True
    (repo / "profiles" / "slurm" / "config.yaml").write_text(yaml.safe_dump(prof, sort_keys=False))
    return prof


def job_resources(output: str) -> list[tuple[str, dict[str, str]]]:
    """(rule, resources) of every job Snakemake started (local rules excluded)."""
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:\n)", output):
        m = re.match(r"(local)?rule (\w+):\n", block)
        res = re.search(r"^    resources: (.*)$", block, re.M)
        if m and not m.group(1) and res:
            jobs.append((m.group(2), dict(kv.split("=", 1) for kv in res.group(1).split(", "))))
    return jobs


def same_weights(a: Path, b: Path) -> bool:
    ta, tb = load_file(str(a)), load_file(str(b))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def start_cluster() -> bool:
    """Starts the local cluster (idempotent); False where it cannot be (it needs root or sudo)."""
    if os.geteuid() != 0 and shutil.which("sudo") is None:
        return False
    # one start at a time: under pytest-xdist (`make test`) this module and the rehearsal's may start it at once
    with open(Path(tempfile.gettempdir()) / "sourceflow-local-cluster.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        res = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"local cluster did not start:\n{res.stdout}\n{res.stderr}"
    return True


@pytest.fixture(scope="module")
def cluster():
    if not start_cluster():
        pytest.skip("starting the local SLURM cluster needs root or sudo")
    yield


def test_workflow_through_sbatch_with_the_real_profile_equals_a_local_run(cluster, walltime, tmp_path):
    # (walltime: the wall-time test's cluster run, started now to run beside this one)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    remote = scratch_repo(tmp_path / "slurm", CONFIG)
    local = background(scratch_repo(tmp_path / "local", CONFIG), env=env, cores=2)  # the reference, alongside
    prof = cluster_profile(remote)
    res = snakemake(remote, "--profile", "profiles/slurm", *CLUSTER, env=env, timeout=1500)
    out = res.stdout + res.stderr
    submitted = SUBMITTED.findall(out)
    # data, data floor, GMM, train, sample, evaluate, report; the spec files are local rules
    assert len({s for _, s in submitted}) == 7, out[-3000:]
    # every job asked SLURM for what the profile says (its per-rule values where it has them)
    defaults = dict(r.split("=", 1) for r in prof["default-resources"])
    jobs = job_resources(out)
    assert len(jobs) == 7
    for rule, resources in jobs:
        assert resources["slurm_partition"] == "debug" and resources["nodes"] == defaults["nodes"], (rule, resources)
        for key, value in prof["set-resources"].get(rule, {}).items():
            assert resources[key] == str(value).strip("'"), (rule, key, resources)
    slurm_logs = list((remote / ".snakemake" / "slurm_logs").rglob("*.log"))
    rules = {p.relative_to(remote / ".snakemake" / "slurm_logs").parts[0] for p in slurm_logs}
    assert {"rule_make_toy_data", "rule_reference_stats", "rule_fit_cls_gmm", "rule_train", "rule_sample",
            "rule_evaluate", "rule_report"} <= rules
    ref = local.wait(timeout=1500)
    assert local.proc.returncode == 0, ref[-3000:]
    local = local.repo
    assert same_weights(remote / "results/moons/runs/mmfm/seed0/model.safetensors",
                        local / "results/moons/runs/mmfm/seed0/model.safetensors")
    ma = pd.read_csv(remote / "results/report/metrics.csv")
    mb = pd.read_csv(local / "results/report/metrics.csv")
    pd.testing.assert_frame_equal(ma, mb)
    assert (remote / "results/report/summary.md").read_text() == (local / "results/report/summary.md").read_text()


def steps_per_second(batch_size: int) -> float:
    """This machine's speed now, for the wall-time run's training: warm steps of a short run in this process."""
    from sourceflow.build import PointData, build_method, build_model
    from sourceflow.config import resolve_experiments
    from sourceflow.data import toy
    from sourceflow.train.loop import ArrayDataset, TrainSettings, train

    cfg = yaml.safe_load(TINY + "experiments:\n  - {name: x, method: fm, data: moons}\n")
    validate(cfg, str(ROOT / "workflow" / "schemas" / "config.schema.yaml"))
    spec = resolve_experiments(cfg)["x"]
    spec["train"].update(steps=600, batch_size=batch_size, checkpoint_every=600, log_every=100)
    d = toy.sample("moons", 512, torch.Generator().manual_seed(0))
    pts = PointData(d.x, d.label, 2)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        summary = train(build_model(spec, pts), build_method(spec, pts, 0, None), ArrayDataset(pts.x),
                        TrainSettings.from_spec(spec["train"]), 0, out, "calibration", progress=False)
    log = summary["timings"]["log"]  # [step, seconds] of each log record (train_log.jsonl holds no timings)
    return (log[-1][0] - log[0][0]) / (log[-1][1] - log[0][1])


WORK_SECONDS = 90  # training the wall-time job needs at this machine's measured speed
TARGET = "results/moons/runs/fm/seed0/model.safetensors"


@dataclass
class Background:
    """A command running in a repository, its output going to a file."""

    repo: Path
    proc: subprocess.Popen
    log: Path

    def wait(self, timeout: float) -> str:
        self.proc.wait(timeout=timeout)
        return self.log.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # Snakemake cancels its SLURM jobs on an interrupt
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def background(repo: Path, *args: str, env: dict[str, str], cores: int = 1) -> Background:
    """``snakemake ARGS`` in ``repo``, in the background."""
    log = repo / "test-output.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "snakemake", "--cores", str(cores), *args], cwd=repo, env=env,
                                stdout=f, stderr=subprocess.STDOUT, text=True)
    return Background(repo, proc, log)


def seconds(elapsed: str) -> int:
    """squeue's elapsed time ([days-][hours:]minutes:seconds) in seconds."""
    days, _, clock = elapsed.rpartition("-")
    total = 0
    for part in clock.split(":"):
        total = 60 * total + int(part)
    return total + 86400 * int(days or 0)


def cut_wall_time(run: Background, record: dict) -> None:
    """Shortens the first train job's time limit once its trainer is past its first step (its first log
    record: the stop handler is in place), so that SLURM's pre-limit signal (``--signal=URG@120`` of the
    profile) comes at its next time-limit check, within ~30 s, while the limit itself is >= 45 s away."""
    marker = run.repo / TARGET.replace("model.safetensors", "train_log.jsonl")
    first_train = re.compile(r"submitted with SLURM jobid (\d+) \(log: [^)]*rule_train/")
    jobid = None
    while run.proc.poll() is None:
        jobid = jobid or next(iter(first_train.findall(run.log.read_text())), None)
        if jobid and marker.exists() and marker.read_text().strip():
            break
        time.sleep(0.2)
    else:
        return
    elapsed = seconds(subprocess.run(["squeue", "-h", "-j", jobid, "-o", "%M"], capture_output=True, text=True,
                                     check=True).stdout.strip())
    minutes = -(-(elapsed + 45) // 60)  # SLURM keeps time limits in whole minutes
    subprocess.run(["scontrol", "update", f"JobId={jobid}", f"TimeLimit={minutes}"], check=True)
    record.update(jobid=jobid, elapsed=elapsed, limit_minutes=minutes)


@pytest.fixture(scope="module")
def walltime(cluster, tmp_path_factory):
    """The wall-time run: a training that needs WORK_SECONDS here, through the cluster with the real profile,
    and the same training locally. Both start in the background when first asked for (the workflow test
    asks, so that the two cluster runs overlap) and the wall-time test checks them. Once the cluster's
    trainer runs, its job's time limit is cut to a minute or two (``cut_wall_time``)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    steps = max(1000, int(WORK_SECONDS * steps_per_second(64)) // 10 * 10)
    config = TINY.replace("steps: 40, batch_size: 64, checkpoint_every: 10, log_every: 10",
                          f"steps: {steps}, batch_size: 64, checkpoint_every: {steps}, log_every: 10")
    assert config != TINY
    config += "experiments:\n  - {name: fm, method: fm, data: moons}\n"
    tmp = tmp_path_factory.mktemp("walltime")
    remote, local = scratch_repo(tmp / "slurm", config), scratch_repo(tmp / "local", config)
    prof = cluster_profile(remote)
    assert prof["retries"] >= 1
    slurm = background(remote, "--profile", "profiles/slurm", *CLUSTER, TARGET, env=env)
    cut: dict = {}
    cutter = threading.Thread(target=cut_wall_time, args=(slurm, cut), daemon=True)
    cutter.start()
    runs = {"steps": steps, "slurm": slurm, "local": background(local, TARGET, env=env), "cut": cut}
    yield runs
    slurm.stop()
    runs["local"].stop()
    cutter.join(timeout=10)


def test_a_training_that_hits_its_wall_time_is_resubmitted_and_resumes_exactly(walltime):
    """The real profile's signal and retries: the trainer whose time limit comes checkpoints on SLURM's
    signal and exits, the job fails (not TIMEOUT), Snakemake resubmits it (with the profile's runtime),
    the retry resumes there and ends with the weights of the uninterrupted local run."""
    slurm, local = walltime["slurm"], walltime["local"]
    out = slurm.wait(timeout=1500)
    assert slurm.proc.returncode == 0, out[-4000:]
    assert walltime["cut"], "the train job's time limit was never cut"
    failed = FAILED.findall(out)
    # it stopped itself before the limit: the job FAILED (exit 75), it was not killed (TIMEOUT)
    assert failed == [(walltime["cut"]["jobid"], "FAILED")], out[-4000:]
    assert len(SUBMITTED.findall(out)) == 3, out[-4000:]  # the data, the train job and its resubmission
    summary = json.loads((slurm.repo / TARGET).with_name("train_summary.json").read_text())
    # no periodic checkpoint before the end: the resumed run started from the one taken on the signal
    assert 0 < summary["resumed_from"] < walltime["steps"], summary
    ref = local.wait(timeout=1500)
    assert local.proc.returncode == 0, ref[-3000:]
    assert same_weights(slurm.repo / TARGET, local.repo / TARGET)
