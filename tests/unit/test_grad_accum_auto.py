"""train.grad_accum: auto — the accumulation the plan chooses for the GPU the run finds (1 without one), and a
resumed run keeps the accumulation its checkpoint was written with (the micro-batches' random streams depend
on it)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from sourceflow.build import PointData, build_method, build_model
from sourceflow.config import ConfigError
from sourceflow.data import toy
from sourceflow.plan import _spec_shape_data, device_grad_accum, train_device_bytes
from sourceflow.train.loop import ArrayDataset, TrainSettings, train

from .test_plan import _digits_spec
from .test_train import make_spec


def test_auto_is_a_valid_setting_and_needs_resolving():
    spec = make_spec("fm", overrides={"train": {"grad_accum": "auto"}})
    assert spec["train"]["grad_accum"] == "auto"
    with pytest.raises(ValueError, match="resolve it for the device"):
        TrainSettings.from_spec(spec["train"])
    s = TrainSettings.from_spec(spec["train"], grad_accum=4)
    assert (s.grad_accum, s.grad_accum_auto) == (4, True)
    fixed = TrainSettings.from_spec(make_spec("fm", overrides={"train": {"grad_accum": 2}})["train"], grad_accum=4)
    assert (fixed.grad_accum, fixed.grad_accum_auto) == (2, False)  # an explicit value is never replaced
    with pytest.raises(ConfigError, match="must divide batch_size"):
        make_spec("fm", overrides={"train": {"grad_accum": 3}})


def test_without_a_gpu_auto_is_one():
    n, why = device_grad_accum(make_spec("fm", overrides={"train": {"grad_accum": "auto", "gpus": 1}}))
    assert n == 1 and "no GPU" in why


def test_on_a_gpu_auto_is_the_smallest_accumulation_whose_planned_peak_fits(monkeypatch, tmp_path):
    """A GPU whose memory holds the step at accumulation 2 but not 1 (10 % headroom) gets 2; a larger one 1."""
    monkeypatch.setenv("SOURCEFLOW_PLAN_CACHE", str(tmp_path))
    spec = _digits_spec("digits-fm")  # a DiT on images: activations dominate, so accumulating saves memory
    spec["train"].update(batch_size=64, gpus=1, grad_accum="auto")
    data = _spec_shape_data(spec, None)  # the shapes device_grad_accum plans with (measured once, cached)
    need = {a: train_device_bytes(spec, data, a)[0] for a in (1, 2)}
    assert need[1] > need[2] * 1.01

    def gpu(total: float) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda i: SimpleNamespace(total_memory=int(total), name="Fake GPU"))

    gpu(need[2] / 0.9 * 1.001)
    n, why = device_grad_accum(spec)
    assert n == 2 and "Fake GPU" in why
    gpu(need[1] / 0.9 * 1.001)
    assert device_grad_accum(spec)[0] == 1


def _train(spec: dict, out, accum: int, **kw) -> dict:
    d = toy.sample("moons", 256, torch.Generator().manual_seed(0))
    pts = PointData(d.x, d.label, 2)
    torch.manual_seed(0)
    model, method = build_model(spec, pts), build_method(spec, pts, 0, None)
    return train(model, method, ArrayDataset(pts.x), TrainSettings.from_spec(spec["train"], grad_accum=accum), 0,
                 out, "hash", progress=False, **kw)


def test_a_resumed_auto_run_keeps_its_checkpoints_accumulation(tmp_path):
    """Started with auto = 2 and resumed where auto gives 1 (another GPU): the run goes on with 2 and ends
    with the weights of an uninterrupted run with 2, not of one with 1."""
    spec = make_spec("fm", overrides={"train": {"grad_accum": "auto", "steps": 12, "checkpoint_every": 4}})
    _train(spec, tmp_path / "two", 2)
    _train(spec, tmp_path / "one", 1)
    _train(spec, tmp_path / "resumed", 2, stop_after=4)
    info = json.loads((tmp_path / "resumed" / "checkpoints" / "last" / "trainer.json").read_text())
    assert info["grad_accum"] == 2 and info["step"] == 4
    _train(spec, tmp_path / "resumed", 1)
    got, two, one = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("resumed", "two", "one"))
    assert all(torch.equal(got[k], two[k]) for k in two)
    assert not all(torch.equal(two[k], one[k]) for k in two)  # the accumulation does change the weights
