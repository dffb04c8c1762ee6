"""The training loop: exact resume, NaN handling, outputs, learning on a toy problem."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from snakemake.utils import validate

from sourceflow.build import PointData, build_method, build_model
from sourceflow.config import resolve_experiments
from sourceflow.data import toy
from sourceflow.gmm.diag import DiagGMM
from sourceflow.train.loop import ArrayDataset, BatchPlan, TrainSettings, train

from .test_io_config import SCHEMA


def make_spec(method: str, **extra) -> dict:
    cfg = {"datasets": {"moons": {"kind": "toy", "distribution": "moons", "n_train": 256}},
           "defaults": {"model": {"width": 32, "depth": 2, "expansion": 1.0},
                        "train": {"steps": 24, "batch_size": 32, "checkpoint_every": 5, "log_every": 4}},
           "experiments": [{"name": "x", "method": method, "data": "moons", **extra}]}
    validate(cfg, str(SCHEMA))
    return resolve_experiments(cfg)["x"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = toy.sample("moons", 256, torch.Generator().manual_seed(0))
    pts = PointData(d.x, d.label, 2)
    path = tmp_path_factory.mktemp("gmm") / "cls_K4.safetensors"
    g = DiagGMM(torch.full((4,), 0.25).double(), torch.randn(4, 2).double() * 2, torch.ones(4, 2).double())
    g.save(path)
    return pts, path


def run(spec, data, out, **kw):
    pts, gmm = data
    torch.manual_seed(0)
    model = build_model(spec, pts)
    method = build_method(spec, pts, 0, gmm)
    ds = ArrayDataset(pts.x, pts.condition(spec["conditioning"]))
    return train(model, method, ds, TrainSettings.from_spec(spec["train"]), 0, out, "hash", progress=False, **kw)


CASES = [
    ("fm", {}),
    ("loom", {"coupling": {"num_caches": 2}}),
    ("c2ot", {"conditioning": "xcoord", "coupling": {"target_ratio": 0.1, "weight": 10}}),
    ("mmfm", {"conditioning": "mode", "source": {"components": 4}}),
    ("csfm", {"conditioning": "label"}),
]


@pytest.mark.parametrize("method, extra", CASES, ids=[c[0] for c in CASES])
def test_resume_equals_uninterrupted(method, extra, data, tmp_path):
    spec = make_spec(method, **extra)
    run(spec, data, tmp_path / "straight")
    assert run(spec, data, tmp_path / "killed", stop_after=13) == {"stopped_at": 13}
    assert not (tmp_path / "killed" / "model.safetensors").exists()
    summary = run(spec, data, tmp_path / "killed")
    assert summary["resumed_from"] == 10  # the last checkpoint before the "kill"
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "killed" / "train_log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 24  # no duplicated log lines after the resume


def test_a_checkpoint_of_another_configuration_is_ignored(data, tmp_path):
    run(make_spec("fm"), data, tmp_path, stop_after=10)
    pts, gmm = data
    spec = make_spec("fm")
    model, method = build_model(spec, pts), build_method(spec, pts, 0, gmm)
    s = train(model, method, ArrayDataset(pts.x), TrainSettings.from_spec(spec["train"]), 0, tmp_path,
              "another-hash", progress=False)
    assert s["resumed_from"] == 0


def test_nan_loss_stops_with_a_message_and_keeps_the_checkpoint(data, tmp_path):
    spec = make_spec("fm")
    pts, gmm = data
    model, method = build_model(spec, pts), build_method(spec, pts, 0, gmm)
    run(spec, data, tmp_path, stop_after=10)
    with torch.no_grad():
        model.out.bias.fill_(float("nan"))
    settings = TrainSettings.from_spec(spec["train"])
    with pytest.raises(FloatingPointError, match="non-finite loss nan at step 0"):
        train(model, method, ArrayDataset(pts.x), settings, 0, tmp_path, "other", progress=False)
    assert (tmp_path / "checkpoints" / "last" / "trainer.json").exists()


def test_training_reduces_the_loss(data, tmp_path):
    spec = make_spec("otcfm")
    spec["train"].update(steps=150, log_every=10, lr=3e-3)
    run(spec, data, tmp_path)
    log = [json.loads(ln) for ln in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["coupling_cost"] > 0 and summary["world_size"] == 1


def test_batch_plan_covers_each_epoch_once():
    plan = BatchPlan(10, 4, seed=0)
    first = torch.cat([plan.indices(s) for s in range(5)])  # 20 indices = 2 epochs
    assert sorted(first[:10].tolist()) == list(range(10)) and sorted(first[10:].tolist()) == list(range(10))
    assert torch.equal(plan.indices(3), BatchPlan(10, 4, seed=0).indices(3))
