"""Stop signals (what SLURM sends before a job's wall time): the trainer finishes its step, checkpoints,
exits non-zero, and a rerun resumes there and ends bitwise identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sourceflow.build import PointData, build_method, build_model
from sourceflow.train import loop
from sourceflow.train.loop import EXIT_INTERRUPTED, ArrayDataset, Interrupted, TrainSettings, train

from .test_train import make_spec

ROOT = Path(__file__).resolve().parents[2]
STOPPED = re.compile(r"stopped on (SIG\w+) after step (\d+)")


def wait_for_log(path: Path, proc: subprocess.Popen | None = None, timeout: float = 300) -> None:
    """Block until the training log has its first record (the run is past its start-up)."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().strip()):
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"training ended before its first log record:\n{proc.stderr.read()}")
        assert time.monotonic() < deadline, f"no record in {path} after {timeout} s"
        time.sleep(0.02)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def checkpoint_step(run_dir: Path) -> int:
    return json.loads((run_dir / "checkpoints" / "last" / "trainer.json").read_text())["step"]


def test_sigusr1_checkpoints_the_current_step_exits_nonzero_and_the_rerun_resumes_bitwise(points, tmp_path):
    _, data = points
    spec = make_spec("fm")
    # long enough that the signal lands mid-run; no periodic checkpoint before the end, so the one the rerun
    # resumes from can only be the signal's
    spec["train"].update(steps=1000, checkpoint_every=1000, log_every=10)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def cmd(out: Path) -> list[str]:
        return [sys.executable, str(ROOT / "stages" / "train.py"), "--spec", str(spec_file), "--data", str(data),
                "--out", str(out), "--seed", "0", "--no-progress"]

    straight = subprocess.run(cmd(tmp_path / "straight"), env=env, capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr

    run = tmp_path / "signalled"
    proc = subprocess.Popen(cmd(run), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_log(run / "train_log.jsonl", proc)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == EXIT_INTERRUPTED, err
    m = STOPPED.search(err)
    assert m and m.group(1) == "SIGUSR1", err
    step = int(m.group(2))
    assert 10 <= step < 1000
    assert checkpoint_step(run) == step  # the step it was in when the signal came, not a periodic checkpoint
    assert not (run / "model.safetensors").exists()

    again = subprocess.run(cmd(run), env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert json.loads((run / "train_summary.json").read_text())["resumed_from"] == step
    assert_bitwise_equal(weights(tmp_path / "straight"), weights(run))


def _train_in_process(spec: dict, pts: PointData, out: Path) -> dict:
    torch.manual_seed(0)
    model = build_model(spec, pts)
    method = build_method(spec, pts, 0, None)
    ds = ArrayDataset(pts.x, pts.condition(spec["conditioning"]))
    return train(model, method, ds, TrainSettings.from_spec(spec["train"]), 0, out, "hash", progress=False)


@pytest.mark.parametrize("method, extra", [("otcfm", {}), ("loom", {"coupling": {"num_caches": 2}})])
def test_a_signal_with_a_pairing_prefetch_in_flight_stops_at_a_pairing_boundary(method, extra, points, tmp_path,
                                                                                monkeypatch):
    """One OT problem per pair_batch chunk, the next one paired in the background: the stop waits for a
    chunk boundary with no pairing in flight, so the checkpoint's coupling state (LOOM's seed cache) is
    the one the resumed run pairs from."""
    monkeypatch.setattr(loop, "_idle_core", lambda: True)  # prefetch whatever the machine's load
    pts, _ = points
    spec = make_spec(method, **extra)
    spec["train"].update(steps=400, batch_size=16, pair_batch=64, checkpoint_every=400, log_every=4)
    _train_in_process(spec, pts, tmp_path / "straight")

    run = tmp_path / "signalled"
    pid = os.getpid()
    sender = threading.Thread(target=lambda: (wait_for_log(run / "train_log.jsonl"), os.kill(pid, signal.SIGTERM)))
    before = signal.getsignal(signal.SIGTERM)
    sender.start()
    with pytest.raises(Interrupted) as stopped:
        _train_in_process(spec, pts, run)
    sender.join()
    assert signal.getsignal(signal.SIGTERM) == before  # the handlers are the caller's again
    assert stopped.value.code == EXIT_INTERRUPTED and stopped.value.signame == "SIGTERM"
    step = stopped.value.step
    assert step % 4 == 0 and 0 < step < 400 and checkpoint_step(run) == step
    assert _train_in_process(spec, pts, run)["resumed_from"] == step
    assert_bitwise_equal(weights(tmp_path / "straight"), weights(run))


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                continue
    return out


def _rank(pid: int) -> int | None:
    try:
        env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(e[5:]) for e in env if e.startswith(b"RANK=")]
    return ranks[0] if ranks else None


@pytest.mark.slow
def test_a_signal_to_one_process_stops_every_process_at_the_same_step(points, tmp_path):
    """Under torchrun each process may see the signal at another step (here only rank 1 gets it): they
    agree on one step, checkpoint together, and the resumed two-process run equals the uninterrupted one."""
    _, data = points
    spec = make_spec("fm")
    spec["train"].update(steps=1000, checkpoint_every=1000, log_every=10)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")

    def cmd(out: Path) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                str(ROOT / "stages" / "train.py"), "--spec", str(spec_file), "--data", str(data), "--out", str(out),
                "--seed", "0", "--no-progress"]

    straight = subprocess.run(cmd(tmp_path / "straight"), env=env, capture_output=True, text=True, timeout=900)
    assert straight.returncode == 0, straight.stderr[-3000:]

    run = tmp_path / "signalled"
    proc = subprocess.Popen(cmd(run), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_log(run / "train_log.jsonl", proc)
    rank1 = [p for p in _children(proc.pid) if _rank(p) == 1]
    assert len(rank1) == 1, _children(proc.pid)
    os.kill(rank1[0], signal.SIGUSR1)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode != 0, err[-3000:]  # torchrun reports its processes' exit status 75 as a failure
    m = STOPPED.search(err)  # rank 0 reports the step both stopped after
    assert m and m.group(1) == "SIGUSR1", err[-3000:]
    step = int(m.group(2))
    assert 10 <= step < 1000 and checkpoint_step(run) == step

    again = subprocess.run(cmd(run), env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((run / "train_summary.json").read_text())["resumed_from"] == step
    assert_bitwise_equal(weights(tmp_path / "straight"), weights(run))
