"""Training state is one checksum: every checkpoint records a digest of all of it (parameters, buffers,
optimizer, EMA, LOOM seeds, focal EMA, learned source), processes of a multi-process run must agree on it,
and a resume with another number of processes is refused with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sourceflow.build import build_method, build_model
from sourceflow.train.checkpoint import load_checkpoint
from sourceflow.train.loop import ArrayDataset, TrainSettings, state_digest, train

from .test_train import make_spec

ROOT = Path(__file__).resolve().parents[2]


def _train(spec, pts, out, gmm=None, **kw):
    torch.manual_seed(0)
    model, method = build_model(spec, pts), build_method(spec, pts, 0, gmm)
    return train(model, method, ArrayDataset(pts.x, pts.condition(spec["conditioning"])),
                 TrainSettings.from_spec(spec["train"]), 0, out, "h", progress=False, **kw)


def test_the_digest_covers_every_part_of_the_training_state(points, tmp_path):
    pts, _ = points
    spec = make_spec("loom", coupling={"num_caches": 2})
    _train(spec, pts, tmp_path, stop_after=10)
    parts, opt, info = load_checkpoint(tmp_path / "checkpoints" / "last", ["model", "ema", "method"])
    digest = state_digest(parts, opt)
    assert info["state_sha256"] == digest  # recorded in the checkpoint
    for part, key in (("model", next(iter(parts["model"]))), ("ema", next(iter(parts["ema"]))),
                      ("method", "coupling.seeds")):
        changed = {p: dict(v) for p, v in parts.items()}
        t = changed[part][key].clone()
        t.view(-1)[0] += 1
        changed[part][key] = t
        assert state_digest(changed, opt) != digest, (part, key)
    opt2 = {"state": {k: dict(v) for k, v in opt["state"].items()}, "param_groups": opt["param_groups"]}
    opt2["state"][0]["exp_avg"] = opt2["state"][0]["exp_avg"] + 1
    assert state_digest(parts, opt2) != digest


def test_a_resume_with_another_number_of_processes_is_refused(points, tmp_path):
    pts, _ = points
    spec = make_spec("fm")
    _train(spec, pts, tmp_path, stop_after=10)
    info_path = tmp_path / "checkpoints" / "last" / "trainer.json"
    info = json.loads(info_path.read_text())
    info["world_size"] = 2
    info_path.write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"written by 2 process\(es\), this run has 1: resume with 2, or start over"):
        _train(spec, pts, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("method, extra", [
    ("mmfm", {"conditioning": "mode", "source": {"components": 4},
              "regularizers": {"focal_gamma": 2.0, "focal_ema": 0.9, "focal_clip": [0.3, 3.0], "focal_warmup": 2}}),
    ("csfm", {"conditioning": "label"}),
], ids=["mmfm-focal", "csfm"])
def test_two_processes_agree_on_every_checkpointed_state(method, extra, points, tmp_path):
    """MM-FM (its focal EMA is reduced over processes) and CSFM (a learned source in the optimizer) on two
    processes: the loop gathers the state digest at every checkpoint and stops if the processes differ."""
    pts, data = points
    spec = make_spec(method, **extra)
    spec["train"].update(steps=20, checkpoint_every=5, log_every=5)
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    gmm = []
    if spec["source"]["kind"] == "gmm":
        from sourceflow.gmm.diag import DiagGMM

        g = DiagGMM(torch.full((4,), 0.25).double(), torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
                    .double() * 2, torch.ones(4, 2).double())
        g.save(tmp_path / "gmm.safetensors")
        gmm = ["--gmm", str(tmp_path / "gmm.safetensors")]
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    env.pop("SOURCEFLOW_TRACEBACK", None)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(ROOT / "stages" / "train.py"), "--spec", str(tmp_path / "spec.json"), "--data", str(data),
                          *gmm, "--out", str(tmp_path / "run"), "--seed", "0", "--no-progress"],
                         env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and len(set(summary["rank_weight_checksums"])) == 1
    info = json.loads((tmp_path / "run" / "checkpoints" / "last" / "trainer.json").read_text())
    assert info["step"] == 20 and info["world_size"] == 2 and len(info["state_sha256"]) == 64
