"""The full-scale configs are the published recipes (DESIGN.md, "What the reference systems do"): each
fact is stated here with its source, read from the resolved config the workflow would run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

from sourceflow.config import normalize_experiments, resolve_experiments
from sourceflow.flow.time import time_grid
from sourceflow.train.loop import TrainSettings

ROOT = Path(__file__).resolve().parents[2]
IMAGENET_IMAGES = 1_281_167
S = math.sqrt(768 * 16 * 16 / 4096)  # RAE's shift for 768x16x16 latents = sqrt(48)


def load(name: str) -> tuple[dict, dict]:
    cfg = normalize_experiments(yaml.safe_load((ROOT / "config" / name).read_text()))
    validate(cfg, str(ROOT / "workflow" / "schemas" / "config.schema.yaml"))
    return cfg, resolve_experiments(cfg)


def test_mmfm_recipe():
    cfg, specs = load("imagenet256-mmfm.yaml")
    ds = cfg["datasets"]["imagenet256"]
    assert ds["test_fraction"] == 0  # all of ImageNet train; FID is against ADM's reference batch
    enc = ds["encoders"]["rae"]
    assert enc["normalize"] == "std" and enc["normalize_eps"] == 1e-5  # RAE: z / sqrt(var + 1e-5), no mean
    m = specs["mmfm"]
    # MM-FM re-draws the mode from the CLS posterior every batch (here from the top-16 table of cls_posteriors)
    assert m["conditioning"] == "mode" and m["coupling"] == {"kind": "mode", "posterior": "soft", "posterior_topk": 16}
    assert m["source"] == {"kind": "gmm", "components": 8192, "variance": "spherical"}
    assert m["regularizers"] == {"focal_gamma": 2.0, "focal_ema": 0.9995, "focal_clip": [0.3, 3.0], "focal_warmup": 2500}
    assert m["train"]["grad_accum"] == "auto"  # the recipe's batch in micro-batches that fit the GPU
    t = TrainSettings.from_spec(m["train"], IMAGENET_IMAGES, grad_accum=2)
    assert (t.batch_size, t.betas, t.weight_decay, t.grad_clip) == (1024, (0.9, 0.95), 0.0, 1.0)
    assert t.steps * t.batch_size / IMAGENET_IMAGES == pytest.approx(80, abs=0.1)  # 80 epochs
    spe = IMAGENET_IMAGES / 1024
    assert t.lr_at(0) == 4e-4 and t.lr_at(int(25 * spe)) == 2e-4
    assert t.lr_at(t.steps - 1) == pytest.approx(1.9e-4, abs=2e-6)  # "about 1.9e-4 at epoch 80"
    assert t.ema_decay_at(0) == 0.999 and t.ema_decay_at(int(21 * spe)) == 0.9995 and not t.ema_warmup
    assert m["time"] == {"kind": "logit_normal", "mean": 0.0, "std": 1.0, "t_max": 0.999, "shift": pytest.approx(S)}
    smp = m["sample"]
    assert smp["solvers"] == [{"solver": "euler", "steps": [49]}]  # "50 steps" = 50 grid points
    assert smp["shift"] == pytest.approx(S) and smp["t_end"] == 0.999 and smp["uint8"] == "truncate"
    g = time_grid(49, smp["shift"], t_end=smp["t_end"])
    assert float(g[-1]) == pytest.approx(0.9931, abs=1e-4)
    assert m["evaluate"]["features"] == "adm"  # ADM's evaluator: clean-fid legacy_tensorflow
    ag = specs["mmfm-ag"]["sample"]["autoguidance"]
    assert ag == {"experiment": "mmfm-guide", "scale": 1.5}
    guide = specs["mmfm-guide"]
    assert guide["model"]["size"] == "DiTDH-S/1" and "focal_gamma" not in guide["regularizers"]
    gt = TrainSettings.from_spec(guide["train"], IMAGENET_IMAGES, grad_accum=1)
    assert gt.lr_at(10**4) == 2e-4 and gt.ema_decay_at(0) == 0.9995
    assert gt.steps * 1024 / IMAGENET_IMAGES == pytest.approx(20, abs=0.1)  # 20 epochs
    base = TrainSettings.from_spec(specs["fm-gaussian"]["train"], IMAGENET_IMAGES, grad_accum=2)
    assert specs["fm-gaussian"]["source"]["kind"] == "gaussian"
    assert base.lr_at(0) == 2e-4 and base.ema_decay_at(0) == 0.995  # its initial lr and EMA


def test_csfm_recipe():
    cfg, specs = load("imagenet256-csfm.yaml")
    ds = cfg["datasets"]["imagenet256"]
    assert ds["test_fraction"] == 0 and ds["encoders"]["rae"]["flips"] is False  # captions describe the unflipped image
    c = specs["csfm"]
    # the released model fixes sigma = 1 (VarReg identically 0); alignment weight 1
    assert c["source"]["learn_var"] is False and c["regularizers"] == {"var_reg": 0.0, "align": 1.0}
    assert (c["source"]["width"], c["source"]["depth"], c["source"]["heads"], c["source"]["patch"]) == (768, 8, 12, 1)
    v = specs["csfm-learned-var"]  # the paper's variant
    assert v["source"]["learn_var"] is True and v["regularizers"] == {"var_reg": 5.0, "align": 1.0}
    t = TrainSettings.from_spec(c["train"], IMAGENET_IMAGES, grad_accum=4)
    assert t.lr_at(0) == t.lr_at(99_999) == 2e-4 and t.betas == (0.9, 0.95) and t.grad_clip == 1.0
    assert c["train"]["p_uncond"] == 0.0  # no condition dropout: evaluated with autoguidance
    assert c["time"]["kind"] == "uniform" and c["time"]["shift"] == pytest.approx(S)
    assert c["sample"]["solvers"] == [{"solver": "euler", "steps": [49]}] and c["sample"]["t_end"] == 0.999
    assert specs["fm-text"]["conditioning"] == "text" and specs["fm-text"]["source"]["kind"] == "gaussian"
    assert specs["csfm-ag"]["sample"]["autoguidance"]["experiment"] == "csfm-guide"


def test_loom_cifar10_recipe():
    cfg, specs = load("cifar10-loom.yaml")
    lm = specs["loom"]
    assert lm["coupling"]["num_caches"] == 6 and lm["coupling"].get("cost", "euclidean") == "euclidean"
    assert lm["model"]["attention_resolutions"] == [16] and lm["model"]["dropout"] == 0.1
    assert lm["model"]["block_out_channels"] == [128, 256, 256, 256] and lm["model"]["layers_per_block"] == 2
    t = lm["train"]
    assert (t["lr"], t["warmup_steps"], t["ema_decay"]) == (2e-4, 5000, 0.9999)
    assert lm["sample"]["solvers"] == [{"solver": "midpoint", "steps": [1, 2, 4, 6]}, {"solver": "dopri5"}]
    assert cfg["datasets"]["cifar10"]["reference"]["split"] == "test"  # FID against the test split
    assert cfg["datasets"]["cifar10"]["encoders"]["pixels"]["flips"] is True  # a flip is a datapoint of its own
    rf = specs["loom-reflow"]  # reflow: from the LOOM checkpoint, lr 2e-5, independent pairs
    assert rf["coupling"] == {"kind": "reflow"} and rf["reflow"]["experiment"] == "loom" and rf["train"]["lr"] == 2e-5
    assert {"fm", "otcfm"} <= set(specs)


def test_embedded_default_toy_uses_the_c2ot_harness_model():
    _, specs = load("config.yaml")
    m = specs["fm"]["model"]
    assert (m["width"], m["depth"], m["expansion"]) == (128, 3, 4.0)
