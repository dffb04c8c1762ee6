"""Reflow: pairs are the base flow's ODE map, the reflow run starts from the base weights and trains on
exactly those pairs, and the config keeps a reflow experiment consistent with its base."""

from __future__ import annotations

import subprocess

import pytest
import torch
from safetensors.torch import load_file
from snakemake.utils import validate

from sourceflow.build import (
    PointData,
    build_method,
    build_model,
    init_from_trained,
    load_reflow_pairs,
    save_points,
)
from sourceflow.config import ConfigError, resolve_experiments
from sourceflow.data import toy
from sourceflow.flow.couplings import Batch, FixedPairs
from sourceflow.flow.solvers import solve
from sourceflow.io import write_json
from sourceflow.train.checkpoint import load_trained
from sourceflow.train.loop import ArrayDataset, TrainSettings, train

from .test_io_config import ROOT, SCHEMA


def config(base_extra: dict | None = None, reflow_extra: dict | None = None) -> dict:
    cfg = {"datasets": {"moons": {"kind": "toy", "distribution": "moons", "n_train": 512, "n_test": 256}},
           "defaults": {"model": {"width": 32, "depth": 2, "expansion": 1.0},
                        "train": {"steps": 30, "batch_size": 64, "checkpoint_every": 10, "log_every": 10}},
           "experiments": [{"name": "base", "method": "fm", "data": "moons", "conditioning": "label",
                            **(base_extra or {})},
                           {"name": "base-reflow", "method": "fm", "data": "moons", "conditioning": "label",
                            "reflow": {"experiment": "base", "num_pairs": 200, "solver": "euler", "steps": 8},
                            **(reflow_extra or {})}]}
    validate(cfg, str(SCHEMA))
    return cfg


def test_reflow_experiment_must_match_its_base():
    specs = resolve_experiments(config())
    assert specs["base-reflow"]["coupling"] == {"kind": "reflow"}
    with pytest.raises(ConfigError, match="differs from its base 'base' in 'conditioning'"):
        resolve_experiments(config(reflow_extra={"conditioning": "none"}))
    with pytest.raises(ConfigError, match="differs from its base 'base' in 'model'"):
        resolve_experiments(config(reflow_extra={"overrides": {"model": {"width": 64}}}))
    with pytest.raises(ConfigError, match="drop the coupling"):
        resolve_experiments(config(reflow_extra={"coupling": {"kind": "ot"}}))
    cfg = config()
    cfg["experiments"][1]["reflow"]["experiment"] = "nope"
    with pytest.raises(ConfigError, match="'nope' is not another experiment"):
        resolve_experiments(cfg)


def test_pairs_are_the_base_flow_and_reflow_trains_on_them_from_the_base_weights(tmp_path, python, env):
    specs = resolve_experiments(config())
    base, rf = specs["base"], specs["base-reflow"]
    g = torch.Generator().manual_seed(0)
    splits = {k: PointData(*(lambda d: (d.x, d.label))(toy.sample("moons", n, g)), 2) for k, n in
              (("train", 512), ("test", 256))}
    data_path = tmp_path / "toy.safetensors"
    save_points(data_path, splits, {"distribution": "moons"})
    pts = splits["train"]
    torch.manual_seed(0)
    model, method = build_model(base, pts), build_method(base, pts, 0)
    ds = ArrayDataset(pts.x, pts.condition("label"))
    train(model, method, ds, TrainSettings.from_spec(base["train"]), 0, tmp_path / "base", "h", progress=False)
    for name, spec in specs.items():
        write_json(tmp_path / f"{name}.json", {k: v for k, v in spec.items() if k not in ("seeds",)})
    pairs_path = tmp_path / "pairs.safetensors"
    res = subprocess.run([python, str(ROOT / "stages" / "reflow_pairs.py"), "--spec", str(tmp_path / "base-reflow.json"),
                          "--base-spec", str(tmp_path / "base.json"), "--model", str(tmp_path / "base" / "model.safetensors"),
                          "--data", str(data_path), "--out", str(pairs_path), "--seed", "3"],
                         env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    t = load_file(str(pairs_path))
    assert t["x0"].shape == t["x1"].shape == (200, 2) and t["cond"].shape == (200,)
    assert set(t["cond"].tolist()) == {0, 1}  # conditions of training rows, kept with their pairs

    # x1 is the base's Euler-8 solve of x0 under the pair's condition (independent re-solve)
    trained, tmethod = build_model(base, pts), build_method(base, pts, 0)
    load_trained(tmp_path / "base" / "model.safetensors", trained, tmethod)
    trained.eval()
    with torch.no_grad():
        x1 = solve(lambda tt, x: trained(x, tt, t["cond"][:50]), t["x0"][:50], "euler", 8).x
    torch.testing.assert_close(x1, t["x1"][:50], rtol=1e-5, atol=1e-5)

    # the reflow run: base weights in, the pairs' x0 handed out row by row
    model2, method2 = build_model(rf, pts), build_method(rf, pts, 0)
    assert isinstance(method2.coupling, FixedPairs)
    init_from_trained(tmp_path / "base" / "model.safetensors", model2, method2)
    for (k, a), b in zip(trained.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    ds2 = load_reflow_pairs(pairs_path, rf, method2)
    assert len(ds2) == 200 and torch.equal(ds2.x, t["x1"]) and torch.equal(ds2.cond, t["cond"])
    idx = torch.tensor([5, 0, 199])
    pair = method2.pair(ds2.batch(idx, torch.device("cpu")), None)
    assert torch.equal(pair.x0, t["x0"][idx]) and torch.equal(pair.x1, t["x1"][idx])
    assert torch.equal(pair.cond, t["cond"][idx])
    summary = train(model2, method2, ds2, TrainSettings.from_spec(rf["train"]), 0, tmp_path / "rf", "h2",
                    progress=False)
    # a reflowed coupling is the base's ODE map: its pairs cost no more than independent pairs would
    assert summary["coupling_cost"] < float(((t["x0"][torch.randperm(200)] - t["x1"]) ** 2).sum(1).mean())
    with pytest.raises(ValueError, match="without pairs"):
        FixedPairs().pair(Batch(torch.zeros(2, 2), torch.arange(2)), method2.source, None)


def test_train_stage_refuses_pairs_for_a_plain_experiment(tmp_path, python, env):
    spec = resolve_experiments(config())["base"]
    write_json(tmp_path / "base.json", spec)
    d = toy.sample("moons", 64, torch.Generator().manual_seed(0))
    save_points(tmp_path / "toy.safetensors", {k: PointData(d.x.clone(), d.label.clone(), 2) for k in ("train", "test")}, {})
    res = subprocess.run([python, str(ROOT / "stages" / "train.py"), "--spec", str(tmp_path / "base.json"),
                          "--data", str(tmp_path / "toy.safetensors"), "--pairs", "p.safetensors",
                          "--init-from", "m.safetensors", "--out", str(tmp_path / "o")],
                         env=env, capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 2 and "a reflow experiment needs --pairs and --init-from" in res.stderr
