"""Two `snakemake` runs on the same results folder: while one runs (and holds Snakemake's lock), a second one
is refused with Snakemake's lock error and changes nothing; the first still finishes and releases the lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .helpers import ROOT, scratch_repo

pytestmark = pytest.mark.slow

TINY = (ROOT / "tests" / "data" / "tiny.yaml").read_text()
TARGET = "results/moons/runs/fm/seed0/model.safetensors"


def fm_only(config_text: str, steps: int) -> str:
    """The tiny config with only the fm experiment, trained for ``steps`` steps."""
    head, rest = config_text.split("experiments:\n")
    fm = next(line for line in rest.splitlines() if line.startswith("  - {name: fm, "))
    head = head.replace("train: {steps: 40, batch_size: 64, checkpoint_every: 10, log_every: 10}",
                        f"train: {{steps: {steps}, batch_size: 64, checkpoint_every: 50, log_every: 50}}")
    assert f"steps: {steps}," in head
    return f"{head}experiments:\n{fm}\n{rest[rest.index('report:'):]}"


def locks(repo: Path) -> list[str]:
    d = repo / ".snakemake" / "locks"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def test_second_snakemake_on_the_same_results_is_refused_while_one_runs(tmp_path):
    """The first run is waited on until it holds the lock and its training job has written a checkpoint, then
    frozen (SIGSTOP on its process group) while the second starts, so the refusal cannot race the first run's
    end on a loaded machine; it is thawed afterwards and must finish normally."""
    steps = 1000
    repo = scratch_repo(tmp_path / "repo", fm_only(TINY, steps))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "snakemake", "--cores", "1", TARGET]
    log = tmp_path / "first.log"
    ckpt = repo / "results/moons/runs/fm/seed0/checkpoints/last/trainer.json"
    with open(log, "w") as out:
        first = subprocess.Popen(cmd, cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        while not (locks(repo) and ckpt.exists()):  # holds the lock, and a job is running under it
            assert first.poll() is None, f"the first run ended early ({first.returncode}):\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, f"the first run never got going:\n{log.read_text()[-3000:]}"
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGSTOP)
        held = locks(repo)
        assert held and all(n.endswith(".lock") for n in held)

        second = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        said = second.stdout + second.stderr
        assert second.returncode != 0, said
        assert "LockException" in said and "Directory cannot be locked" in said, said
        assert str(repo) in said and "--unlock" in said, said
        assert first.poll() is None  # the first run was still holding the lock the whole time
        assert locks(repo) == held  # the refused run neither took nor removed a lock
        assert not (repo / TARGET).exists()

        os.killpg(first.pid, signal.SIGCONT)
        assert first.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGCONT)
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    assert (repo / TARGET).stat().st_size > 0
    train_log = (repo / "results/logs/moons/fm/seed0/train.log").read_text()
    assert f"trained fm seed 0: {steps} steps" in train_log
    assert locks(repo) == []  # released at the end
    again = subprocess.run([*cmd, "-n"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
