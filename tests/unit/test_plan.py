"""The resource plan (sourceflow/plan.py, stages/plan.py): its jobs are the workflow's, its memory
measurement on fake tensors agrees with real tensors, its FLOPs and attention accounting with closed forms,
and the full-scale configs fit 80 GB devices after choose_grad_accum."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from sourceflow.config import resolve_experiments
from sourceflow.plan import (
    CPU_TRAIN_MEM_MB,
    JSON_KEYS,
    FlashAttentionMemory,
    Job,
    Planner,
    Profile,
    ShapeData,
    _peak,
    attn_flops,
    choose_grad_accum,
    enumerate_jobs,
    fill_defaults,
    latent_stats_mem_mb,
    load_config,
    param_counts,
    requested,
    rule_resources,
    run_fake_step,
    train_mem_mb,
)

ROOT = Path(__file__).resolve().parents[2]

# What `snakemake -n --configfile <config>` plans from an empty results folder (snakemake 9, 2026-12-02);
# test_jobs_match_snakemake_dry_run checks these against snakemake itself.
DRY_RUN = {
    "imagenet256-mmfm.yaml": {"experiment_spec": 11, "prepare_data": 1, "reference_features": 1, "extract_latents": 1,
                              "fit_cls_gmm": 1, "cls_posteriors": 1, "latent_stats": 1, "build_spatial_gmm": 1, "train": 3, "sample": 4,
                              "evaluate": 4, "report": 1, "all": 1},
    "imagenet256-csfm.yaml": {"experiment_spec": 14, "prepare_data": 1, "reference_features": 1, "align_captions": 1,
                              "extract_latents": 1, "embed_captions": 1, "latent_stats": 1, "train": 4, "sample": 5,
                              "evaluate": 5, "report": 1, "all": 1},
}


def _counts(config_name: str) -> Counter:
    cfg = load_config(ROOT / "config" / config_name)
    return Counter(j.rule for j in enumerate_jobs(cfg, resolve_experiments(cfg)))


@pytest.mark.parametrize("name", sorted(DRY_RUN))
def test_jobs_are_the_dry_runs(name):
    assert _counts(name) == Counter(DRY_RUN[name])


def _dry_run_counts(config: Path, results: Path) -> Counter:
    res = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--quiet", "rules", "--configfile", str(config),
                          "--config", f"results={results}"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    text = res.stdout + res.stderr
    block = text[text.index("Job stats"):]
    counts = Counter()
    for line in block.splitlines()[3:]:
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if not m or m[1] == "total":
            break
        counts[m[1]] = int(m[2])
    return counts


@pytest.mark.slow
@pytest.mark.parametrize("name", ["imagenet256-mmfm.yaml", "imagenet256-csfm.yaml", "config.yaml",
                                  "cifar10-loom.yaml", "celebahq256-dit.yaml", "c2ot-moons.yaml"])
def test_jobs_match_snakemake_dry_run(name, tmp_path):
    assert _counts(name) == _dry_run_counts(ROOT / "config" / name, tmp_path / "results")


def test_defaults_are_snakemakes():
    """fill_defaults gives the config Snakemake's validate gives (the Snakefile's config)."""
    import yaml
    from snakemake.utils import validate

    import sourceflow.config as cfgmod

    for name in ("imagenet256-mmfm.yaml", "imagenet256-csfm.yaml", "config.yaml"):
        raw = yaml.safe_load((ROOT / "config" / name).read_text())
        if hasattr(cfgmod, "normalize_experiments"):  # as the Snakefile does before validating
            cfgmod.normalize_experiments(raw)
        ours = fill_defaults(json.loads(json.dumps(raw)), yaml.safe_load(
            (ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text()))
        theirs = json.loads(json.dumps(raw))
        validate(theirs, str(ROOT / "workflow" / "schemas" / "config.schema.yaml"))
        assert ours == theirs
        assert load_config(ROOT / "config" / name) == theirs


def test_requests_follow_snakemakes_precedence(tmp_path):
    rules = rule_resources()
    assert rules["train"]["mem_mb"] == "function" and rules["train"]["gpu"] == "function"
    assert rules["latent_stats"]["mem_mb"] == "function"
    prof = tmp_path / "p.yaml"
    prof.write_text("retries: 2\ndefault-resources:\n  - runtime=60\n  - mem_mb=1000\nset-resources:\n"
                    "  train: {runtime: 1440}\n  sample: {mem_mb: 16000}\n")
    p = Profile.load(prof)
    assert p.retries == 2 and p.default == {"runtime": 60, "mem_mb": 1000}
    r = requested(Job("train", experiment="x", seed=0), p, rules, {"gpu": 8, "mem_mb": 1})
    assert (r["runtime"], r["mem_mb"], r["gpu"]) == (1440, 1, 8)  # profile rule > rule (functions: the plan's)
    assert r["source"]["gpu"].startswith("rule function") and r["source"]["mem_mb"].startswith("rule function")
    r = requested(Job("sample", experiment="x", seed=0), p, rules, {"gpu": 1})
    assert r["mem_mb"] == 16000 and r["source"]["mem_mb"] == "profile set-resources"  # > the rule's 2000
    r = requested(Job("sample", experiment="x", seed=0), p, {"sample": {}}, {"gpu": 1})
    assert (r["runtime"], r["mem_mb"]) == (60, 16000)  # a rule without a runtime: profile default
    r = requested(Job("evaluate", experiment="x", seed=0), p, rules, {"gpu": 0})
    assert r["mem_mb"] == rules["evaluate"]["mem_mb"] and r["source"]["mem_mb"] == "rule"  # rule > profile default
    r = requested(Job("latent_stats", dataset="d", encoder="e"), p, rules, {"mem_mb": 3619, "gpu": 0})
    assert r["mem_mb"] == 3619 and r["runtime"] == 120


def test_latent_stats_formula_is_the_rules():
    # the figure the rule's docstring states: 3619 MB for RAE 768x16x16 at 1024 rows
    assert latent_stats_mem_mb((768, 16, 16), 1024) == 3619


# ---- the measurement -------------------------------------------------------------------------------------


def _digits_spec(name: str) -> dict:
    cfg = load_config(ROOT / "config" / "config.yaml")
    return resolve_experiments(cfg)[name]


@pytest.mark.parametrize("exp,data", [
    ("digits-mmfm", ShapeData((3, 16, 16), 10, None, 64)),
    ("digits-csfm", ShapeData((3, 16, 16), 10, (16, 384), 64)),
])
def test_fake_peak_equals_real_peak(exp, data):
    """The independent check: the same step on real CPU tensors, tracked by MemTracker, peaks where the fake
    one does (bf16 autocast, AdamW, EMA, the GMM source / the Perceiver source)."""
    spec = _digits_spec(exp)
    spec["train"]["mixed_precision"] = "bf16"
    fake = run_fake_step(spec, data, 16, accumulate=True, fake=True, cls_dim=3 * 16 * 16)
    real = run_fake_step(spec, data, 16, accumulate=True, fake=False, cls_dim=3 * 16 * 16)
    assert fake.params == real.params and fake.forward_flops == real.forward_flops
    assert abs(fake.peak_bytes - real.peak_bytes) <= 0.03 * real.peak_bytes, (fake.peak_bytes, real.peak_bytes)


@pytest.mark.parametrize("exp", ["digits-csfm", "fm"])
def test_param_counts_are_the_fake_steps(exp):
    """The train rule's mem_mb counts parameters without running a step: the same numbers as the step's."""
    cfg = load_config(ROOT / "config" / "config.yaml")
    spec = resolve_experiments(cfg)[exp]
    image = spec["dataset"]["kind"] != "toy"
    data = ShapeData((3, 16, 16), 10, (16, 384), 64) if image else ShapeData((2,), 2, None, 64)
    cls_dim = 3 * 16 * 16 if image else 2
    step = run_fake_step(spec, data, 8, fake=True, cls_dim=cls_dim)
    assert param_counts(spec, data, cls_dim, use_cache=False) == (step.params, step.model_params)
    if exp == "digits-csfm":  # its learned source trains beside the model and is checkpointed with it
        assert step.params > step.model_params


def test_train_mem_mb_is_the_plans_host_memory_of_a_gpu_run():
    """A GPU run asks for the plan's host memory (here the digits MM-FM run on 4 GPUs, 2 micro-batches): the
    rule's function, the plan's request and the plan's own host figure agree; a CPU run asks for the fixed
    workstation amount."""
    cfg = load_config(ROOT / "config" / "config.yaml")
    # the two runs asked about (planning all 45 runs of the default took 36 s of this test)
    cfg["experiments"] = [e for e in cfg["experiments"] if e["name"] in ("digits-mmfm", "digits-fm")]
    next(e for e in cfg["experiments"] if e["name"] == "digits-mmfm").setdefault("train", {}).update(
        {"gpus": 4, "grad_accum": 2})
    planner = Planner(cfg, rules=rule_resources(), profile=Profile({}, {}, 0, "-"), use_cache=False)
    mb = train_mem_mb(cfg, "digits-mmfm")
    terms, total = planner.train_host("digits-mmfm")
    assert mb == int(-(-total * 1000 // 1)) and mb > 4 * 3000  # 4 processes with a CUDA context each
    assert any("(x4)" in k for k in terms) and any("CLS GMM" in k for k in terms)
    entry = next(e for e in planner.plan() if e.rule == "train" and e.experiment == "digits-mmfm")
    assert entry.requested["mem_mb"] == mb and entry.requested["source"]["mem_mb"].startswith("rule function")
    assert entry.host_mem_gb * 1000 <= mb and not any("host memory" in f for f in entry.flags)
    assert train_mem_mb(cfg, "digits-fm") == CPU_TRAIN_MEM_MB


def test_peak_grows_with_the_micro_batch_and_accumulation_keeps_gradients():
    spec = _digits_spec("digits-fm")
    data = ShapeData((3, 16, 16), 10, None, 64)
    a, b = (run_fake_step(spec, data, n, fake=True) for n in (8, 16))
    acc = run_fake_step(spec, data, 8, accumulate=True, fake=True)
    act = b.peak_bytes - a.peak_bytes
    assert act > 0
    # accumulating: the second micro-batch runs while the first one's gradients are held
    assert acc.peak_bytes >= a.peak_bytes + 0.9 * 4 * a.params


def _attention_stack(n: int, mode: str, layers: int = 3, b: int = 2, width: int = 64, heads: int = 4) -> tuple[int, list]:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from sourceflow.models.dit import SelfAttention

    with FakeTensorMode():
        stack = torch.nn.ModuleList([SelfAttention(width, heads) for _ in range(layers)])
        x = torch.zeros(b, n, width, requires_grad=True)
        tracker = MemTracker()
        tracker.track_external(stack, x)
        attn = FlashAttentionMemory() if mode == "flash" else contextlib.nullcontext()
        kernel = sdpa_kernel(SDPBackend.MATH) if mode == "math" else contextlib.nullcontext()
        with tracker, attn, kernel:
            y = x
            for layer in stack:
                y = layer(y)
            y.sum().backward()
        return _peak(tracker)[0], (attn.calls if mode == "flash" else [])


def test_flash_attention_memory_is_linear_in_the_sequence():
    """With the GPU kernels' memory the peak has no N² term: peaks at N, 2N, 4N have no second difference."""
    p1, p2, p4 = (_attention_stack(n, "flash")[0] for n in (64, 128, 256))
    assert abs((p4 - p2) - 2 * (p2 - p1)) <= 0.002 * p4


@pytest.mark.parametrize("n", [128, 256])
def test_math_attention_excess_is_the_closed_form(n):
    """What the correction removes: the math kernel's peak exceeds the fused kernels' by the saved softmax of
    every call, Σ B·H·N²·itemsize, plus at most two transient score matrices."""
    flash, calls = _attention_stack(n, "flash")
    math_peak, _ = _attention_stack(n, "math")
    layers, b, heads = 3, 2, 4
    scores = [c.scores_bytes for c in calls]
    assert scores == [b * heads * n * n * 4] * layers
    excess = math_peak - flash
    assert sum(scores) <= excess <= sum(scores) + 2 * max(scores)


def test_flops_of_linear_and_attention_against_closed_forms():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from sourceflow.models.dit import SelfAttention

    b, n, i, h, o = 4, 10, 32, 64, 16
    with FakeTensorMode():
        net = torch.nn.Sequential(torch.nn.Linear(i, h), torch.nn.Linear(h, o))
        x = torch.zeros(b * n, i)
        with FlopCounterMode(display=False) as fwd:
            y = net(x)
        with FlopCounterMode(display=False) as bwd:
            y.sum().backward()
    assert fwd.get_total_flops() == 2 * b * n * (i * h + h * o)
    # backward: both weight gradients and the input gradient of the second layer (x needs none)
    assert bwd.get_total_flops() == 2 * b * n * (i * h + h * o) + 2 * b * n * h * o

    w, heads = 64, 4
    with FakeTensorMode():
        att = SelfAttention(w, heads)
        x = torch.zeros(b, n, w, requires_grad=True)
        with FlashAttentionMemory() as rec:
            with FlopCounterMode(display=False) as fwd:
                y = att(x)
            f_fwd = fwd.get_total_flops() + attn_flops(rec.calls, False)
            y.sum().backward()
            f_bwd = attn_flops(rec.backward_calls, True)
    linear = 2 * b * n * (w * 3 * w + w * w)
    product = 2 * b * n * n * w  # one [N, d] x [d, N] (or [N, N] x [N, d]) product over all heads (H·d = w)
    assert f_fwd == linear + 2 * product  # q·kᵀ and p·v
    assert f_bwd == 5 * product  # the fused backward: q·kᵀ recomputed, dV, dP, dQ, dK


def test_choose_grad_accum_picks_the_smallest_power_of_two_that_fits(tmp_path, monkeypatch):
    # a fresh cache: each fake step is measured once here, and choose_grad_accum's probes reuse them
    monkeypatch.setenv("SOURCEFLOW_PLAN_CACHE", str(tmp_path))
    spec = _digits_spec("digits-fm")
    spec["train"].update(batch_size=64, gpus=1)
    data = ShapeData((3, 16, 16), 10, None, 64)
    from sourceflow.plan import train_device_bytes

    need = {a: train_device_bytes(spec, data, a)[0] for a in (1, 2, 4)}
    assert need[1] > need[2] > need[4]
    budget_gb = need[2] / 1e9 / 0.9 * 1.001  # grad_accum 2 just fits with 10 % headroom
    assert choose_grad_accum(spec, budget_gb, data=data) == 2
    assert choose_grad_accum(spec, need[1] / 1e9 / 0.9 * 1.001, data=data) == 1
    with pytest.raises(ValueError, match="even one sample"):
        choose_grad_accum(spec, 1e-6, data=data)


# ---- the full-scale plans (minutes with a cold cache: DiT-DH-XL steps on fake tensors) ------------------


@pytest.fixture(scope="module")
def full_plans(tmp_path_factory):
    """Both configs planned at once, one process each (a plan is one single-threaded Python process: the
    fake steps compute nothing, so two use two cores)."""
    runs = {}
    for name in ("imagenet256-mmfm.yaml", "imagenet256-csfm.yaml"):
        path = tmp_path_factory.mktemp("plan") / "p.json"
        proc = subprocess.Popen([sys.executable, "stages/plan.py", "--configfile", f"config/{name}", "--json",
                                 str(path), "--quiet"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        runs[name] = (proc, path)
    out = {}
    try:
        for name, (proc, path) in runs.items():
            stdout, stderr = proc.communicate(timeout=7200)
            assert proc.returncode == 0, stderr[-3000:]
            out[name] = (json.loads(path.read_text()), stdout)
    finally:
        for proc, _ in runs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(DRY_RUN))
def test_full_plan_has_every_job_and_fits_80gb(full_plans, name):
    plan, table = full_plans[name]
    jobs = plan["jobs"]
    assert Counter(j["rule"] for j in jobs) == Counter(DRY_RUN[name])
    for j in jobs:
        assert set(JSON_KEYS) <= set(j)
        assert {"mem_mb", "runtime", "gpu"} <= set(j["requested"]) or j["local"]
        if j["gpus"]:
            assert 0 < j["gpu_mem_gb"] <= 80, j
            assert not any("GPU memory" in f for f in j["flags"]), j
        if j["rule"] == "train":
            assert j["grad_accum"] >= 1 and j["flops"] > 1e18 and j["hours"] > 0
            # mem_mb is the plan's own host memory of the run (the rule's function), not a fixed profile value
            assert j["requested"]["source"]["mem_mb"].startswith("rule function"), j["requested"]
            assert j["host_mem_gb"] * 1000 <= j["requested"]["mem_mb"], j
            assert not any("host memory" in f for f in j["flags"]), j
    assert "assumptions: H100 SXM: bf16 dense 989" in table
    assert plan["assumptions"]["throughput"]["mfu"] == 0.35
