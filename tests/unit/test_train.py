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


COMBINATIONS = {
    # what none of the reference systems offers: a GMM source with OT / LOOM couplings (LOOM's seed then
    # regenerates the mode draw and the noise), C2OT's cost with a GMM source, mode conditioning with OT
    "gmm-loom": ("loom", {"source": {"kind": "gmm", "components": 4}, "coupling": {"num_caches": 2}}),
    "gmm-ot-mode": ("otcfm", {"source": {"kind": "gmm", "components": 4}, "conditioning": "mode"}),
    "gmm-c2ot": ("c2ot", {"source": {"kind": "gmm", "components": 4}, "conditioning": "label"}),
    "mode-coupling-label": ("mmfm", {"source": {"components": 4}, "conditioning": "label"}),
}


@pytest.mark.parametrize("name", sorted(COMBINATIONS))
def test_sources_and_couplings_combine_freely_and_resume_exactly(name, data, tmp_path):
    method, extra = COMBINATIONS[name]
    spec = make_spec(method, **extra)
    run(spec, data, tmp_path / "a")
    run(spec, data, tmp_path / "b", stop_after=7)
    assert run(spec, data, tmp_path / "b")["resumed_from"] == 5
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    if name == "gmm-loom":
        pts, gmm = data
        m = build_method(spec, pts, 0, gmm)
        seeds = m.coupling.seeds[:8, 0]
        # a seed is a pure function of the mode draw and the noise: the same seed, the same mode and x0
        d1, d2 = m.source.from_seeds(seeds), m.source.from_seeds(seeds)
        assert torch.equal(d1.mode, d2.mode) and torch.equal(d1.x0, d2.x0) and d1.mode.unique().numel() > 1


def test_ill_defined_combinations_are_refused_with_the_reason():
    from sourceflow.config import ConfigError

    with pytest.raises(ConfigError, match="re-orders x0"):
        make_spec("csfm", conditioning="label", coupling={"kind": "ot"})


def test_a_checkpoint_of_another_configuration_is_ignored(data, tmp_path):
    run(make_spec("fm"), data, tmp_path, stop_after=10)
    pts, gmm = data
    spec = make_spec("fm")
    model, method = build_model(spec, pts), build_method(spec, pts, 0, gmm)
    s = train(model, method, ArrayDataset(pts.x), TrainSettings.from_spec(spec["train"]), 0, tmp_path,
              "another-hash", progress=False)
    assert s["resumed_from"] == 0


def _poison_grad_at(model: torch.nn.Module, calls: set[int]):
    """Make the output bias's gradient NaN on the given backward calls (0-based) and count the calls."""
    count = {"n": 0}

    def hook(g):
        n = count["n"]
        count["n"] += 1
        return torch.full_like(g, float("nan")) if n in calls else g

    model.out.bias.register_hook(hook)
    return count


def _finite_state(path) -> dict:
    from safetensors.torch import load_file as lf

    t = {k: v for name in ("model", "ema") for k, v in lf(str(path / f"{name}.safetensors")).items()}
    assert all(torch.isfinite(v).all() for v in t.values() if v.is_floating_point())
    return t


def test_nan_gradient_at_a_checkpoint_step_stops_and_keeps_the_last_finite_checkpoint(data, tmp_path):
    """A finite loss with NaN gradients at a checkpoint step (step 9, saved as checkpoint 10) would otherwise
    have saved NaN weights as the last good checkpoint."""
    spec = make_spec("fm")  # checkpoint_every 5
    pts, gmm = data
    torch.manual_seed(0)
    model, method = build_model(spec, pts), build_method(spec, pts, 0, gmm)
    _poison_grad_at(model, {9})
    with pytest.raises(FloatingPointError, match=r"non-finite gradient of model\.out\.bias at step 9"):
        train(model, method, ArrayDataset(pts.x), TrainSettings.from_spec(spec["train"]), 0, tmp_path, "h", progress=False)
    info = json.loads((tmp_path / "checkpoints" / "last" / "trainer.json").read_text())
    assert info["step"] == 5  # the last finite state, not step 10
    before = _finite_state(tmp_path / "checkpoints" / "last")
    # equal to the same run stopped cleanly after its step-5 checkpoint
    run(spec, data, tmp_path / "clean", stop_after=5)
    assert all(torch.equal(before[k], v) for k, v in _finite_state(tmp_path / "clean" / "checkpoints" / "last").items())


def test_skip_mode_drops_the_nonfinite_step_and_checkpoints_the_previous_state(data, tmp_path):
    spec = make_spec("mmfm", conditioning="mode", source={"components": 4})  # the focal EMA must stay finite too
    spec["regularizers"].update(focal_gamma=2.0, focal_warmup=0)
    spec["train"].update(nonfinite="skip", max_skipped_steps=2, steps=10)
    pts, gmm = data
    torch.manual_seed(0)
    model, method = build_model(spec, pts), build_method(spec, pts, 0, gmm)
    _poison_grad_at(model, {4})  # step 4: its checkpoint (step 5) must hold the state after step 3
    s = train(model, method, ArrayDataset(pts.x), TrainSettings.from_spec(spec["train"]), 0, tmp_path, "h",
              progress=False, stop_after=5)
    assert s == {"stopped_at": 5}
    info = json.loads((tmp_path / "checkpoints" / "last" / "trainer.json").read_text())
    assert info["step"] == 5 and info["skipped_steps"] == 1
    state = _finite_state(tmp_path / "checkpoints" / "last")
    torch.manual_seed(0)
    ref_model, ref_method = build_model(spec, pts), build_method(spec, pts, 0, gmm)
    train(ref_model, ref_method, ArrayDataset(pts.x), TrainSettings.from_spec({**spec["train"], "checkpoint_every": 4}),
          0, tmp_path / "ref", "h", progress=False, stop_after=4)
    ref = _finite_state(tmp_path / "ref" / "checkpoints" / "last")  # after step 3 (4 steps done)
    assert all(torch.equal(state[k], ref[k]) for k in ref if not k.startswith("__ema_updates"))
    focal = load_file(str(tmp_path / "checkpoints" / "last" / "method.safetensors"))
    assert torch.isfinite(focal["focal.loss_ema"]).all()
    # a third non-finite step exceeds max_skipped_steps = 2
    torch.manual_seed(0)
    m2, me2 = build_model(spec, pts), build_method(spec, pts, 0, gmm)
    _poison_grad_at(m2, {1, 2, 3})
    with pytest.raises(FloatingPointError, match=r"3 skipped steps, max 2"):
        train(m2, me2, ArrayDataset(pts.x), TrainSettings.from_spec(spec["train"]), 0, tmp_path / "many", "h",
              progress=False)


def test_nan_loss_stops_with_a_message_naming_the_step(data, tmp_path):
    spec = make_spec("fm")
    pts, gmm = data
    model, method = build_model(spec, pts), build_method(spec, pts, 0, gmm)
    run(spec, data, tmp_path, stop_after=10)
    with torch.no_grad():
        model.out.bias.fill_(float("nan"))
    settings = TrainSettings.from_spec(spec["train"])
    with pytest.raises(FloatingPointError, match="non-finite loss term fm=nan at step 0"):
        train(model, method, ArrayDataset(pts.x), settings, 0, tmp_path, "other", progress=False)
    # the other configuration's checkpoint (step 10) was not overwritten by a non-finite state
    assert json.loads((tmp_path / "checkpoints" / "last" / "trainer.json").read_text())["step"] == 10
    _finite_state(tmp_path / "checkpoints" / "last")


def test_training_reduces_the_loss(data, tmp_path):
    spec = make_spec("otcfm")
    spec["train"].update(steps=150, log_every=10, lr=3e-3)
    run(spec, data, tmp_path)
    log = [json.loads(ln) for ln in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["coupling_cost"] > 0 and summary["world_size"] == 1


def test_batch_plan_never_repeats_a_datapoint_within_a_batch_or_chunk():
    """A batch spanning an epoch boundary could hold one datapoint twice (LOOM would then duplicate a
    seed and lose another): the plan drops the incomplete tail of every epoch, like drop_last."""
    plan = BatchPlan(10, 4, seed=0)
    for e in range(3):  # two batches per epoch, from one permutation
        a, b = plan.indices(2 * e), plan.indices(2 * e + 1)
        both = torch.cat([a, b]).tolist()
        assert len(set(both)) == 8 and set(both) <= set(range(10))
    assert torch.equal(plan.indices(3), BatchPlan(10, 4, seed=0).indices(3))
    # a chunk (pair_batch) of 3 batches: 9 distinct indices consumed by 3 consecutive steps
    plan = BatchPlan(20, 3, seed=1, chunk=9)
    for c in range(4):
        steps = torch.cat([plan.indices(3 * c + j) for j in range(3)])
        assert torch.equal(steps, plan.chunk_indices(c)) and len(set(steps.tolist())) == 9
    with pytest.raises(ValueError, match="multiple"):
        BatchPlan(20, 3, seed=0, chunk=10)


def test_pair_batch_solves_one_assignment_per_chunk_and_resumes_exactly(data, tmp_path, monkeypatch):
    """The C2OT harness couples 1024 samples once and trains on them 256 at a time."""
    from sourceflow.flow import couplings

    sizes: list[int] = []
    real = couplings.assign

    def spy(cost, *args):
        sizes.append(int(cost.shape[0]))
        return real(cost, *args)

    monkeypatch.setattr(couplings, "assign", spy)
    spec = make_spec("otcfm")
    spec["train"].update(steps=24, batch_size=16, pair_batch=64, checkpoint_every=8)
    run(spec, data, tmp_path / "straight")
    assert sizes[:6] == [64] * 6  # 24 steps / 4 steps per chunk = 6 assignments of 64 (then the cost check)
    sizes.clear()
    for name, extra in (("loom", {"coupling": {"num_caches": 2}}), ("otcfm", {})):
        spec = make_spec(name, **extra)
        spec["train"].update(steps=24, batch_size=16, pair_batch=64, checkpoint_every=8)
        run(spec, data, tmp_path / f"{name}-a")
        run(spec, data, tmp_path / f"{name}-b", stop_after=10)
        assert run(spec, data, tmp_path / f"{name}-b")["resumed_from"] == 8
        a = load_file(str(tmp_path / f"{name}-a" / "model.safetensors"))
        b = load_file(str(tmp_path / f"{name}-b" / "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    spec["train"].update(checkpoint_every=6)
    with pytest.raises(ValueError, match="multiples of pair_batch"):
        TrainSettings.from_spec(spec["train"])


def test_piecewise_lr_and_ema_schedules_follow_mm_fm_in_epochs():
    """MM-FM: lr 4e-4 for epochs 0-20, then 2e-4, linear decay from epoch 40 toward 2e-5 at epoch 800
    (about 1.9e-4 at epoch 80); EMA 0.999 for 20 epochs, then 0.9995 (DESIGN.md)."""
    train = {"steps": 100000, "batch_size": 1024, "lr": 4e-4, "weight_decay": 0.0, "betas": [0.9, 0.95],
             "warmup_steps": 0, "ema_decay": 0.9995, "grad_clip": 1.0, "checkpoint_every": 2000, "log_every": 100,
             "lr_schedule": {"unit": "epoch", "points": [[0, 4e-4], [20, 4e-4], [20, 2e-4], [40, 2e-4], [800, 2e-5]]},
             "ema_schedule": {"unit": "epoch", "points": [[0, 0.999], [20, 0.999], [20, 0.9995]]}}
    s = TrainSettings.from_spec(train, epoch_size=1_281_167)
    spe = 1_281_167 / 1024
    epoch = lambda e: int(e * spe) + 1  # noqa: E731  (the first step starting after epoch e)
    assert s.lr_at(0) == 4e-4 and s.lr_at(epoch(19.9)) == 4e-4
    assert s.lr_at(epoch(20)) == 2e-4 and s.lr_at(epoch(39.9)) == 2e-4
    assert s.lr_at(epoch(80)) == pytest.approx(2e-4 - (2e-4 - 2e-5) * 40 / 760, rel=1e-3)  # 1.905e-4
    assert s.lr_at(99999) == pytest.approx(1.9e-4, abs=2e-6)
    assert s.ema_decay_at(epoch(19.9)) == 0.999 and s.ema_decay_at(epoch(20)) == 0.9995
    assert 100000 / spe == pytest.approx(80, abs=0.1)  # 100k steps are MM-FM's 80 epochs
    with pytest.raises(ValueError, match="first value"):
        TrainSettings.from_spec({**train, "lr": 1e-3}, epoch_size=1000)


def test_ema_without_warmup_uses_the_scheduled_decay():
    from sourceflow.train.ema import EMA

    m = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(0.0)
    ema = EMA(m, 0.9, warmup=False)
    with torch.no_grad():
        m.weight.fill_(1.0)
    ema.update(0.5)
    assert float(ema.module.weight) == pytest.approx(0.5)
    ema.update()
    assert float(ema.module.weight) == pytest.approx(0.5 * 0.9 + 0.1)
    warm = EMA(m, 0.9)  # with the warm-up the first decay is (1 + 0) / (10 + 0) = 0.1
    with torch.no_grad():
        warm.module.weight.fill_(0.0)
    warm.update()
    assert float(warm.module.weight) == pytest.approx(0.9)


def test_tensorboard_tracker_writes_the_logged_curves(data, tmp_path):
    """train.trackers: [tensorboard] logs through accelerate's tracker beside the JSONL log: the event files
    hold the same loss at the same steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    spec = make_spec("fm")
    spec["train"].update(steps=20, log_every=5, trackers=["jsonl", "tensorboard"])
    run(spec, data, tmp_path / "seed0")
    events = list((tmp_path / "seed0" / "tracking").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tb = {e.step: e.value for e in acc.Scalars("loss")}
    log = {r["step"]: r["loss"] for r in map(json.loads, (tmp_path / "seed0" / "train_log.jsonl").read_text().splitlines())}
    assert sorted(tb) == sorted(log) == [5, 10, 15, 20]
    assert all(tb[k] == pytest.approx(log[k], rel=1e-6) for k in log)
    assert "lr" in acc.Tags()["scalars"]
