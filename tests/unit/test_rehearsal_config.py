"""The rehearsal configs (sourceflow.rehearsal): derived from every full-scale config with only allow-listed
keys changed (walked key by key), valid for the workflow, on the same side of the scale thresholds as the
full runs (epochs, streamed latents), and an allow-list that leaves the method, schedules, solvers and
preprocessing alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sourceflow import rehearsal as R
from sourceflow.config import SCHEMA_PATH, resolve_experiments

ROOT = Path(__file__).resolve().parents[2]
NOT_FULL_SCALE = {"config.yaml", "toy-gaussian.yaml"}  # the embedded default and a toy variant of it


def full(name: str) -> dict:
    return yaml.safe_load((ROOT / "config" / name).read_text())


def test_every_full_scale_config_is_rehearsed():
    configs = {p.name for p in (ROOT / "config").glob("*.yaml")} - NOT_FULL_SCALE
    assert set(R.FULL_CONFIGS) == configs


@pytest.mark.parametrize("name", R.FULL_CONFIGS)
def test_only_allow_listed_keys_differ(name, tmp_path):
    cfg = R.rehearsal_config(full(name), tmp_path / "standins")
    assert R.disallowed(full(name), cfg) == []
    changed = {".".join(map(str, p)) for p, _, _ in R.differences(full(name), cfg)}
    assert changed, f"{name}: the rehearsal changed nothing"
    # the paths all point into the stand-ins
    for p, _, new in R.differences(full(name), cfg):
        if any(R.allowed(p) and p[-1] == key for key in ("root", "test_root", "weights", "file", "adm_npz", "inception_path")):
            assert str(new).startswith(str(tmp_path / "standins")), p


@pytest.mark.parametrize("name", R.FULL_CONFIGS)
def test_rehearsal_configs_are_valid_workflow_configs(name, tmp_path):
    from snakemake.utils import validate

    cfg = R.rehearsal_config(full(name), tmp_path)
    validate(cfg, str(SCHEMA_PATH))  # fills the schema defaults, as the Snakefile does
    specs = resolve_experiments(cfg)  # the semantic checks (pair_batch multiples, guides, reflow bases, ...)
    assert set(specs) == {e["name"] for e in cfg.get("experiments", [])}
    for spec in specs.values():
        assert spec["train"]["gpus"] == 0 and spec["train"]["steps"] <= R.Scale().steps
        assert spec["sample"]["num_samples"] <= max(R.Scale().image_samples, R.Scale().toy_samples)


def test_the_same_path_is_the_same_stand_in_in_every_config(tmp_path):
    plan = R.StandinPlan()
    for name in R.FULL_CONFIGS:
        R.standin_plan(R.rehearsal_config(full(name), tmp_path), plan)  # raises on a conflicting need
    kinds = {kind for kind, _ in plan.items.values()}
    assert kinds == {"images", "rae", "dinov2", "sd-vae", "clip", "captions", "adm_npz", "inception"}


def test_mmfm_keeps_its_epochs_and_streams_its_latents(tmp_path):
    f = full("imagenet256-mmfm.yaml")
    cfg = R.rehearsal_config(f, tmp_path)
    train_f, train_r = f["datasets"]["imagenet256"]["defaults"]["train"], cfg["datasets"]["imagenet256"]["defaults"]["train"]
    epochs_full = train_f["steps"] * train_f["batch_size"] / R.REAL_IMAGES["imagenet256"]
    epochs = train_r["steps"] * train_r["batch_size"] / train_r["epoch_size"]
    assert epochs == pytest.approx(epochs_full, rel=0.01)  # 80 epochs: the lr / EMA schedules pass all points
    assert train_r["lr_schedule"] == train_f["lr_schedule"] and train_r["ema_schedule"] == train_f["ema_schedule"]
    # the guide trains a quarter as long, in both
    guide_f, guide_r = (next(e for e in c["experiments"] if e["name"] == "mmfm-guide") for c in (f, cfg))
    assert guide_r["overrides"]["train"]["steps"] / train_r["steps"] == guide_f["overrides"]["train"]["steps"] / train_f["steps"]
    # the focal warm-up ends within the run, as it does at full scale
    assert 0 < cfg["experiments"][0]["regularizers"]["focal_warmup"] < train_r["steps"]
    # full scale: the 2.56M x 768x16x16 store does not fit 16000 MB over 8 processes, so it streams; so here
    budget = train_r["max_memory_mb"] * 2**20
    spatial_bytes, cls_bytes = 24 * 2 * R.RAE_HIDDEN * 16 * 16 * 4, 24 * 2 * R.RAE_HIDDEN * 4
    assert budget < cls_bytes < spatial_bytes  # the CLS rows stream too, as at full scale (7.9 GB > 2000 MB)


def test_in_memory_datasets_stay_in_memory(tmp_path):
    for name in ("celebahq256-dit.yaml", "cifar10-loom.yaml"):
        f = full(name)
        cfg = R.rehearsal_config(f, tmp_path)
        got, want = (next(iter(c["datasets"].values()))["defaults"]["train"].get("max_memory_mb") for c in (cfg, f))
        assert got == want  # both fit in memory at full scale (1 GB / 1.2 GB): the budget is left alone


def test_pair_batch_multiples_and_seeds():
    cfg = R.rehearsal_config(full("c2ot-moons.yaml"), "/s")
    t = cfg["defaults"]["train"]
    m = t["pair_batch"] // t["batch_size"]
    assert m == 4 and t["steps"] % m == 0 and t["checkpoint_every"] % m == 0
    assert cfg["seeds"] == [0]


def test_yaml_anchors_are_rewritten_once():
    """``<<: *csfm`` shares the source dict between experiments; each must be scaled once, not twice."""
    cfg = R.rehearsal_config(full("imagenet256-csfm.yaml"), "/s")
    widths = {e["name"]: e["source"]["width"] for e in cfg["experiments"] if "source" in e}
    assert widths["csfm"] == widths["csfm-ag"] == widths["csfm-learned-var"]


# --- the allow-list itself -------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [
    "experiments.0.method", "experiments.0.source.kind", "experiments.0.source.learn_var", "experiments.0.coupling.kind",
    "experiments.0.coupling.num_caches", "experiments.0.conditioning", "experiments.0.regularizers.focal_gamma",
    "experiments.0.regularizers.var_reg", "experiments.0.model_from", "experiments.0.overrides.sample.autoguidance.scale",
    "experiments.0.overrides.train.lr", "experiments.0.reflow.solver",
    "datasets.d.resolution", "datasets.d.test_fraction", "datasets.d.kind", "datasets.d.encoders.e.kind",
    "datasets.d.encoders.e.flips", "datasets.d.encoders.e.normalize", "datasets.d.encoders.e.resolution",
    "datasets.d.gmm.0.variance", "datasets.d.gmm.0.max_iter", "datasets.d.gmm.0.reg_covar",
    "datasets.d.captions.min_match_fraction", "datasets.d.captions.text_encoders.t.max_length",
    "datasets.d.reference.features", "datasets.d.reference.split",
    "datasets.d.defaults.time.shift", "datasets.d.defaults.time.t_max", "datasets.d.defaults.time.kind",
    "datasets.d.defaults.train.lr_schedule", "datasets.d.defaults.train.ema_schedule", "datasets.d.defaults.train.betas",
    "datasets.d.defaults.train.p_uncond", "datasets.d.defaults.train.ema_decay", "datasets.d.defaults.train.grad_clip",
    "datasets.d.defaults.model.kind", "datasets.d.defaults.model.attention_resolutions", "datasets.d.defaults.model.dropout",
    "datasets.d.defaults.model.text_mode", "datasets.d.defaults.sample.solvers", "datasets.d.defaults.sample.shift",
    "datasets.d.defaults.sample.t_end", "datasets.d.defaults.sample.uint8", "datasets.d.defaults.sample.guidance_scale",
    "datasets.d.defaults.evaluate.features", "defaults.sample.rtol", "defaults.train.lr", "defaults.time.kind",
    "report.grid_steps", "datasets.d.defaults", "defaults", "experiments.0", "datasets.d",
])
def test_method_keys_are_not_allowed(path):
    keys = tuple(int(k) if k.isdigit() else k for k in path.split("."))
    assert not R.allowed(keys), path


def test_allow_list_is_narrow():
    for pat in R.ALLOWED_PATTERNS:
        assert pat[-1] != "*", pat  # every pattern names its key
        assert len(pat) >= 2 or pat == ("seeds",), pat
    # a change outside the list is named with its old and new value
    f = full("imagenet256-mmfm.yaml")
    cfg = R.rehearsal_config(f, "/s")
    cfg["datasets"]["imagenet256"]["defaults"]["time"]["shift"] = 1.0
    cfg["experiments"][0]["coupling"] = "independent"
    cfg["experiments"][2]["overrides"]["sample"] = {"solvers": [{"solver": "heun", "steps": [2]}]}
    assert R.disallowed(f, cfg) == [
        "datasets.imagenet256.defaults.time.shift: 6.928203230275509 -> 1.0",
        "experiments.0.coupling: {'kind': 'mode', 'posterior': 'soft', 'posterior_topk': 16} -> 'independent'",
        "experiments.2.overrides.sample.solvers: (absent) -> [{'solver': 'heun', 'steps': [2]}]",
    ]


def test_differences():
    a = {"x": 1, "l": [1, 2], "d": {"k": [3]}, "gone": {"a": 1}}
    b = {"x": 1.0, "l": [1], "d": {"k": [4]}, "new": {"b": {"c": 2}}}
    got = {(".".join(map(str, p)), R._show(u), R._show(v)) for p, u, v in R.differences(a, b)}
    assert got == {("x", "1", "1.0"), ("l", "[1, 2]", "[1]"), ("d.k.0", "3", "4"), ("gone.a", "1", "(absent)"),
                   ("new.b.c", "(absent)", "2")}
    assert list(R.differences(a, a)) == []


# --- the data stand-ins ------------------------------------------------------------------------------------------


def test_data_standins_are_laid_out_as_the_real_inputs(tmp_path):
    import numpy as np
    from PIL import Image

    from sourceflow.data.captions import read_caption_jsonl
    from sourceflow.data.images import IMAGE_EXTENSIONS, load_image
    from sourceflow.data.manifest import scan_class_folders
    from sourceflow.metrics.frechet import read_reference_npz

    plan = R.standin_plan(R.rehearsal_config(full("imagenet256-csfm.yaml"), tmp_path))
    data = {kind: path for path, (kind, _) in plan.items.items() if kind in ("images", "captions", "adm_npz")}
    assert set(data) == {"images", "captions", "adm_npz"}
    R.write_standins(R.StandinPlan({p: v for p, v in plan.items.items() if v[0] in data}))
    root = Path(data["images"])
    classes, items = scan_class_folders(root, IMAGE_EXTENSIONS)
    assert classes == ["n01440764", "n01441764", "n01442764", "n01443764"] and len(items) == 24
    assert items[0][0] == "n01440764/n01440764_0.JPEG"
    opened = [Image.open(root / p) for p, _ in items]
    assert {im.format for im in opened} == {"JPEG"} and {im.mode for im in opened} == {"RGB", "L", "CMYK"}
    assert len({im.size for im in opened}) > 4 and min(min(im.size) for im in opened) < 256
    assert load_image(root / items[5][0], 256).shape == (256, 256, 3)  # CMYK decodes to an RGB crop
    caps = read_caption_jsonl(data["captions"])
    assert sorted(caps["path"]) == sorted(p for p, _ in items) and caps["caption"].str.len().min() > 0
    ref = read_reference_npz(data["adm_npz"])
    assert ref["mu"].shape == (2048,) and ref["sigma"].shape == (2048, 2048) and ref["mu_s"].shape == (64,)
    np.linalg.cholesky(ref["sigma"])  # positive definite, as ADM's
    # a second write with the same plan leaves the files alone (stamped)
    mtime = (root / items[0][0]).stat().st_mtime_ns
    R.write_standins(R.StandinPlan({p: v for p, v in plan.items.items() if v[0] in data}))
    assert (root / items[0][0]).stat().st_mtime_ns == mtime
