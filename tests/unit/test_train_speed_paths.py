"""The toy path's speed-ups change no result: the network simplex returns scipy's permutation, and pairing
the next pair_batch chunk in a background thread gives bitwise the weights of pairing it in line."""

from __future__ import annotations

from concurrent.futures import Future

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from snakemake.utils import validate

from sourceflow.build import PointData, build_method, build_model
from sourceflow.config import resolve_experiments
from sourceflow.data import toy
from sourceflow.flow import couplings
from sourceflow.flow.couplings import assign, assign_within_groups, cost_matrix, sq_cost_matrix
from sourceflow.train import loop
from sourceflow.train.loop import ArrayDataset, TrainSettings, train

from .test_io_config import SCHEMA


def _scipy(cost: torch.Tensor) -> torch.Tensor:
    return assign(cost)  # no dim: always scipy's Jonker–Volgenant


@pytest.mark.parametrize("n", [256, 512])
def test_network_simplex_returns_scipys_permutation_on_toy_costs(n, monkeypatch):
    used = []
    real = couplings._simplex_perm
    monkeypatch.setattr(couplings, "_simplex_perm", lambda c: used.append(c.shape[0]) or real(c))
    g = torch.Generator().manual_seed(n)
    for _ in range(3):
        x0 = toy.sample("8gaussians", n, g).x
        d = toy.sample("moons", n, g)
        for kind in ("sqeuclidean", "euclidean"):
            c = cost_matrix(x0, d.x, kind)
            assert torch.equal(assign(c, 2), _scipy(c)), kind
        gauss = torch.randn(n, 2, generator=g)
        c = sq_cost_matrix(gauss, d.x)
        assert torch.equal(assign(c, 2), _scipy(c))
        # C2OT with class labels: one problem per moon (each about n/2 points)
        c = sq_cost_matrix(x0, d.x)
        assert torch.equal(assign_within_groups(c, d.label, 2), assign_within_groups(c, d.label))
    assert used and min(used) >= couplings.SIMPLEX_MIN_N


def test_scipy_solves_small_high_dimensional_and_failed_simplex_problems(monkeypatch):
    calls = []
    monkeypatch.setattr(couplings, "_simplex_perm", lambda c: calls.append(c.shape) or None)  # a failed simplex
    g = torch.Generator().manual_seed(0)
    c = sq_cost_matrix(torch.randn(300, 2, generator=g), torch.randn(300, 2, generator=g))
    assert torch.equal(assign(c, 2), _scipy(c)) and calls == [(300, 300)]  # fell back to scipy
    calls.clear()
    small = sq_cost_matrix(torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g))
    high = sq_cost_matrix(torch.randn(300, 192, generator=g), torch.randn(300, 192, generator=g))
    assign(small, 2), assign(high, 192)
    assert calls == []  # below SIMPLEX_MIN_N points or above SIMPLEX_MAX_DIM dims: scipy directly


def test_simplex_plan_that_is_not_a_permutation_is_refused(monkeypatch):
    import ot

    n = 300
    monkeypatch.setattr(ot, "emd", lambda a, b, c, **kw: (np.full((n, n), 1.0 / n**2), {"warning": None}))
    assert couplings._simplex_perm(np.random.default_rng(0).random((n, n))) is None


class InlineExecutor:
    """Runs each submitted pairing at once: the order of pairing in line, through the prefetch code."""

    submitted = 0

    def __init__(self, *args, **kwargs):
        pass

    def submit(self, fn, *args):
        InlineExecutor.submitted += 1
        f: Future = Future()
        f.set_result(fn(*args))
        return f

    def shutdown(self, wait=True):
        pass


def _spec(method: str, **extra) -> dict:
    cfg = {"datasets": {"moons": {"kind": "toy", "distribution": "moons", "n_train": 1024}},
           "defaults": {"model": {"width": 32, "depth": 2, "expansion": 1.0},
                        "train": {"steps": 32, "batch_size": 64, "pair_batch": 256, "checkpoint_every": 8,
                                  "log_every": 4, "ema_decay": 0, "ema_warmup": False, "grad_clip": 0}},
           "experiments": [{"name": "x", "method": method, "data": "moons", **extra}]}
    validate(cfg, str(SCHEMA))
    return resolve_experiments(cfg)["x"]


@pytest.fixture(scope="module")
def points():
    d = toy.sample("moons", 1024, torch.Generator().manual_seed(0))
    return PointData(d.x, d.label, 2)


def _run(spec, pts, out, **kw):
    torch.manual_seed(0)
    model = build_model(spec, pts)
    method = build_method(spec, pts, 0)
    ds = ArrayDataset(pts.x, pts.condition(spec["conditioning"]))
    summary = train(model, method, ds, TrainSettings.from_spec(spec["train"]), 0, out, "hash", progress=False, **kw)
    return summary, method


CASES = [
    ("otcfm", {"source": {"kind": "toy", "distribution": "8gaussians"}}),
    ("loom", {"coupling": {"num_caches": 2}}),  # the seed cache changes with every pairing
    ("c2ot", {"conditioning": "label"}),
    ("c2ot", {"conditioning": "xcoord", "coupling": {"weight": 100, "target_ratio": 0.05}}),  # w warm-starts
]


@pytest.mark.parametrize("method, extra", CASES, ids=["otcfm", "loom", "c2ot-label", "c2ot-xcoord"])
def test_prefetched_pairing_gives_bitwise_the_weights_and_state_of_pairing_in_line(method, extra, points, tmp_path,
                                                                                   monkeypatch):
    spec = _spec(method, **extra)
    monkeypatch.setattr(loop, "_idle_core", lambda: True)  # prefetch whatever the machine's load
    _, threaded = _run(spec, points, tmp_path / "threaded")  # the real background thread
    _run(spec, points, tmp_path / "resumed", stop_after=12)  # killed mid-way, a prefetch in flight
    assert _run(spec, points, tmp_path / "resumed")[0]["resumed_from"] == 8
    monkeypatch.setattr(loop, "ThreadPoolExecutor", InlineExecutor)
    InlineExecutor.submitted = 0
    _, inline = _run(spec, points, tmp_path / "inline")
    # 8 chunks of 4 steps; chunks 1, 3, 5, 7 are prefetched (0, 2, 4, 6 start at a checkpoint: in line)
    assert InlineExecutor.submitted == 4
    ref = load_file(str(tmp_path / "inline" / "model.safetensors"))
    for name in ("threaded", "resumed"):
        got = load_file(str(tmp_path / name / "model.safetensors"))
        assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref), name
    a, b = threaded.state_tensors(), inline.state_tensors()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_no_prefetch_while_every_core_is_busy(points, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "_idle_core", lambda: False)
    monkeypatch.setattr(loop, "ThreadPoolExecutor", InlineExecutor)
    InlineExecutor.submitted = 0
    _run(_spec("otcfm"), points, tmp_path / "busy")
    assert InlineExecutor.submitted == 0
