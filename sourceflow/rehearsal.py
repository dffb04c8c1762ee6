"""The rehearsal: every full-scale config in config/ run end to end on CPU against stand-ins laid out exactly
as its real inputs, so what breaks at full scale breaks here first.

Three parts:

- :func:`rehearsal_config` derives the rehearsal config from a full config by code. Only keys matched by
  :data:`ALLOW` change (paths, counts, K, model sizes, steps, batch sizes, device keys); methods, sources,
  couplings, conditioning, time sampling, schedules' shapes, solvers, guidance, normalisation and
  preprocessing stay as in the full config. :func:`differences` and :func:`disallowed` let a test walk both
  configs and name any other change.
- :func:`write_standins` writes what the rehearsal config's paths point at: class folders of JPEGs / PNGs
  (:data:`STANDIN_DATA`), CSFM's caption JSONL, an ADM reference npz and tiny random-weight models of the
  real classes (:mod:`sourceflow.standins`). Nothing is downloaded.
- :func:`rehearse` runs one config: a scratch copy of the workflow in its own folder, ``snakemake --cores N
  --configfile <rehearsal config>`` (plus any extra Snakemake arguments, e.g. ``--profile profiles/slurm``),
  then checks the outputs (the report, FID entries) and returns a one-line summary with the wall time.

Scale-dependent code paths are kept on the same side of their thresholds: the training latents stream from
Zarr when the full-scale store would not fit ``train.max_memory_mb`` (see :func:`_memory_budget`), epoch
schedules see the same epochs (``train.epoch_size``, :func:`_epoch_size`), and every store, EM pass and
sample run spans several shards / chunks / batches.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent

# The full-scale configs, in the order `make rehearse` runs them (artifacts first, then the runs).
FULL_CONFIGS = ("imagenet256.yaml", "imagenet256-mmfm.yaml", "imagenet256-csfm.yaml", "cifar10-loom.yaml",
                "cifar10-dit-cfg.yaml", "celebahq256-dit.yaml", "c2ot-moons.yaml")

# What a scratch copy of the workflow needs (the same set the workflow tests copy).
WORKFLOW_FILES = ("Snakefile", "workflow", "stages", "config", "profiles", "envs", "sourceflow")

# ---- the allow-list ----------------------------------------------------------------------------------------

# Where experiment settings (model, train, time, sample, evaluate) live in a config.
SETTINGS_AT = ("defaults", "datasets.*.defaults", "experiments.*.overrides")


def _settings(*keys: str) -> tuple[str, ...]:
    return tuple(f"{where}.{k}" for where in SETTINGS_AT for k in keys)


# Dotted key patterns that may differ between a full config and its rehearsal; ``*`` is one key or list
# index. A pattern covers its whole value (a list such as ``seeds`` or ``components`` may change length).
ALLOW: dict[str, tuple[str, ...]] = {
    "paths": ("datasets.*.root", "datasets.*.test_root", "datasets.*.encoders.*.weights", "datasets.*.captions.file",
              "datasets.*.captions.text_encoders.*.weights", "datasets.*.reference.adm_npz",
              "datasets.*.reference.inception_path"),
    "counts": ("seeds", "experiments.*.seeds", "datasets.*.n_train", "datasets.*.n_test",
               "experiments.*.reflow.num_pairs", "report.grid_images",
               *_settings("sample.num_samples", "sample.solvers.*.num_samples", "evaluate.num_points",
                          "evaluate.min_samples")),
    "K": ("datasets.*.gmm.*.components", "experiments.*.source.components", "experiments.*.coupling.posterior_topk"),
    "model sizes": (*_settings("model.size", "model.width", "model.depth", "model.block_out_channels",
                               "model.head_depth", "model.head_width"),
                    "experiments.*.source.width", "experiments.*.source.depth", "experiments.*.source.heads"),
    "steps": (*_settings("train.steps", "train.checkpoint_every", "train.log_every", "train.warmup_steps",
                         "train.epoch_size"),
              "experiments.*.regularizers.focal_warmup"),
    "batch sizes": (*_settings("train.batch_size", "train.pair_batch", "sample.batch_size", "sample.shard_rows",
                               "evaluate.batch_size"),
                    "datasets.*.encoders.*.batch_size", "datasets.*.encoders.*.shard_rows", "datasets.*.gmm.*.chunk_rows",
                    "datasets.*.reference.batch_size", "datasets.*.captions.text_encoders.*.batch_size",
                    "experiments.*.reflow.batch_size"),
    "device": (*_settings("train.gpus", "train.processes", "train.threads", "train.mixed_precision",
                          "train.max_memory_mb"),
               "datasets.*.workers", "datasets.*.encoders.*.gpu", "datasets.*.encoders.*.processes",
               "datasets.*.encoders.*.workers", "datasets.*.gmm.*.memory_budget_mb"),
}
ALLOWED_PATTERNS: tuple[tuple[str, ...], ...] = tuple(tuple(p.split(".")) for ps in ALLOW.values() for p in ps)

MISSING = object()  # a key one side does not have


def differences(full: Any, other: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any, Any]]:
    """(path, full value, other value) of every leaf that differs; a key on one side only is compared with
    :data:`MISSING` leaf by leaf, a list whose length changed is one difference at the list's path."""
    if isinstance(full, dict) or isinstance(other, dict):
        a = full if isinstance(full, dict) else {}
        b = other if isinstance(other, dict) else {}
        if not (isinstance(full, dict) or full is MISSING) or not (isinstance(other, dict) or other is MISSING):
            yield path, full, other  # a dict replaced by a scalar (or the reverse)
            return
        for k in sorted(set(a) | set(b), key=str):
            yield from differences(a.get(k, MISSING), b.get(k, MISSING), (*path, k))
    elif isinstance(full, list) and isinstance(other, list) and len(full) == len(other):
        for i, (x, y) in enumerate(zip(full, other, strict=True)):
            yield from differences(x, y, (*path, i))
    elif full != other or type(full) is not type(other):
        yield path, full, other


def allowed(path: tuple) -> bool:
    """Whether a difference at ``path`` is covered by :data:`ALLOW` (a pattern matching the path or a prefix)."""
    keys = [str(k) for k in path]
    for pat in ALLOWED_PATTERNS:
        if len(pat) <= len(keys) and all(p in ("*", k) for p, k in zip(pat, keys, strict=False)):
            return True
    return False


def disallowed(full: dict, rehearsal: dict) -> list[str]:
    """Every difference between a full config and its rehearsal that :data:`ALLOW` does not cover."""
    return [f"{'.'.join(map(str, p))}: {_show(a)} -> {_show(b)}"
            for p, a, b in differences(full, rehearsal) if not allowed(p)]


def _show(v: Any) -> str:
    return "(absent)" if v is MISSING else repr(v)


# ---- rehearsal scale -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scale:
    """The rehearsal's sizes: what the allow-listed keys become."""

    steps: int = 20                 # the longest experiment's train.steps (others in proportion)
    image_batch: int = 8            # train.batch_size for images (pair_batch keeps its ratio)
    toy_batch: int = 32
    image_samples: int = 16         # sample.num_samples (and evaluate.min_samples) for images
    toy_samples: int = 256          # toy: samples, held-out points, W2 points
    toy_train: int = 2048           # toy n_train at most
    components: int = 8             # K at most (GMMs and GMM sources)
    io_batch: int = 8               # encoder / sample / evaluate / reference / text batch sizes
    shard_rows: int = 16            # latent store shard rows and GMM chunk rows (several shards / chunks)
    sample_shard_rows: int = 8      # sample store shard rows (two shards of 16 samples)
    reflow_pairs: int = 16
    workers: int = 2                # prepare_data decoding processes


# Stand-in image trees per dataset: laid out as the real ones (class folders; file types, names and sizes
# as the real files have them), a handful of images each.
@dataclass(frozen=True)
class ImageTree:
    classes: tuple[str, ...]
    per_class: int
    ext: str
    sizes: tuple[tuple[int, int], ...]
    modes: tuple[str, ...] = ("RGB",)
    name: str = "{cls}_{i}"
    seed: int = 0


def _imagenet_tree(per_class: int, name: str, seed: int) -> ImageTree:
    from sourceflow.standins import PHOTO_MODES, PHOTO_SIZES, imagenet_wnids

    return ImageTree(tuple(imagenet_wnids(4)), per_class, ".JPEG", PHOTO_SIZES, PHOTO_MODES, name, seed)


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def standin_data() -> dict[str, dict[str, ImageTree]]:
    """Stand-in trees by dataset name and key (``root`` / ``test_root``)."""
    return {
        "imagenet256": {"root": _imagenet_tree(6, "{cls}_{i}", 0),  # n01440764/n01440764_0.JPEG
                        "test_root": _imagenet_tree(2, "ILSVRC2012_val_{cls}_{i}", 1)},
        "cifar10": {"root": ImageTree(CIFAR10_CLASSES, 4, ".png", ((32, 32),), seed=2),
                    "test_root": ImageTree(CIFAR10_CLASSES, 2, ".png", ((32, 32),), seed=3)},
        "celebahq256": {"root": ImageTree(("images",), 16, ".png", ((256, 256),), name="{i:05d}", seed=4)},
    }


# Real dataset sizes (images, flips not counted) and the real encoders' latent shapes: what the full configs
# see, for keeping epoch schedules and the memory-or-stream decision the same in the rehearsal.
REAL_IMAGES = {"imagenet256": 1_281_167, "cifar10": 50_000, "celebahq256": 30_000}


def _real_latent_numel(kind: str, resolution: int, enc_resolution: int) -> int:
    if kind in ("rae", "dinov2"):  # DINOv2-B: 768 channels, one token per 14 px of the encoder input
        return 768 * (enc_resolution // 14) ** 2
    if kind == "sd-vae":
        return 4 * (resolution // 8) ** 2
    if kind == "pixels":
        return 3 * resolution**2
    raise ValueError(f"rehearsal: no real latent size known for encoder kind {kind!r}")


# Stand-in model shapes: tiny, of the real classes, with the real input and output sides.
RAE_HIDDEN = 64     # diffusers builds the RAE encoder with 64-channel heads: one head
DINO_HIDDEN = 32
VAE_CHANNELS = (8, 8, 16, 16)  # four levels: f8 and 4 latent channels, as SD-VAE


def _standin_latent_numel(kind: str, resolution: int, enc_resolution: int) -> int:
    if kind == "rae":
        return RAE_HIDDEN * (enc_resolution // 14) ** 2
    if kind == "dinov2":
        return DINO_HIDDEN * (enc_resolution // 14) ** 2
    return _real_latent_numel(kind, resolution, enc_resolution)


# ---- deriving the rehearsal config -------------------------------------------------------------------------


def standin_path(value: str, standins: Path) -> str:
    """Where the stand-in for a configured path or hub id lives: ``/data/x`` -> ``<standins>/data/x``,
    ``org/name`` (a hub id) -> ``<standins>/hub/org/name``."""
    from sourceflow.encoders.weights import looks_local

    if value.startswith("/"):
        return str(standins / value.lstrip("/"))
    return str(standins / ("local" if looks_local(value) else "hub") / value)


@functools.cache
def _schema_default(section: str, key: str) -> Any:
    from sourceflow.config import load_schema

    return load_schema()["$defs"][section]["properties"][key].get("default")


def _setting(cfg: dict, exp: dict | None, dataset: str | None, section: str, key: str) -> Any:
    """A setting as an experiment resolves it: overrides, then the dataset's defaults, then the config's,
    then the schema's default."""
    holders = [exp.get("overrides", {}) if exp else {},
               cfg["datasets"].get(dataset, {}).get("defaults", {}) if dataset else {}, cfg.get("defaults", {})]
    for h in holders:
        if key in (h.get(section) or {}):
            return h[section][key]
    return _schema_default(section, key)


def _scaled(v: int, factor: float) -> int:
    """A step count in proportion (at least 1 unless it was 0)."""
    return 0 if v == 0 else max(1, math.ceil(v * factor))


def _small_size(name: str) -> str:
    """``DiTDH-XL/1`` -> ``DiTDH-XT/1``: the family and patch stay, the width/depth table row is the tiny one."""
    m = re.fullmatch(r"(DiT|DiTDH)-([A-Z]+)/(\d+)", name)
    if not m:
        raise ValueError(f"rehearsal: unknown model size {name!r}")
    return f"{m[1]}-XT/{m[3]}"


def _is_image(ds: dict) -> bool:
    return ds["kind"] in ("digits", "imagefolder")


def rehearsal_config(full: dict, standins: str | Path, scale: Scale = Scale()) -> dict:
    """The rehearsal of ``full`` (a parsed full-scale config): the same config with only allow-listed keys
    changed, its paths pointing into ``standins`` (see :func:`write_standins`).

    - paths: ``/x/y`` -> ``standins/x/y``, a hub id ``org/name`` -> ``standins/hub/org/name``;
    - steps: the longest experiment trains ``scale.steps``; every other step count (other experiments,
      checkpoint / log intervals, warm-ups, MM-FM's focal warm-up) shrinks by the same factor (at least 1);
      OT pairing keeps steps and checkpoints at multiples of pair_batch / batch_size;
    - epochs: ``train.epoch_size`` so the run spans as many epochs as the full one (epoch schedules pass
      every point); memory: ``train.max_memory_mb`` in proportion to the store, so latents that stream at
      full scale stream here (:func:`_memory_budget`);
    - sizes: DiT / DiT-DH -> their XT row (same family and patch), U-Net channels / 8 (same multipliers),
      the CSFM Perceiver width / 24, depth 1, 2 heads; K at most ``scale.components``;
    - counts and batches: the first seed; a few samples, pairs, toy points; small batches, shards and EM
      chunks so every store and pass still spans several; evaluate.min_samples and report.grid_images down
      to the sample count;
    - devices: no GPUs, one process per job, two decoding workers.
    """
    cfg = json.loads(json.dumps(full))  # a copy without YAML's shared anchors (``<<: *x`` aliases dicts)
    standins = Path(standins)
    datasets = cfg["datasets"]
    experiments = cfg.get("experiments", [])
    image_data = {n for n, ds in datasets.items() if _is_image(ds)}

    # steps: the longest experiment gets scale.steps, every other step count the same factor
    longest = max((_setting(full, e, e["data"], "train", "steps") for e in experiments), default=scale.steps)
    factor = scale.steps / longest

    if "seeds" in cfg:
        cfg["seeds"] = cfg["seeds"][:1]
    for ds in datasets.values():
        _rehearse_dataset(ds, standins, scale)
    for where, holder, data in _settings_holders(cfg):
        image = (data in image_data) if data else bool(image_data) and len(image_data) == len(datasets)
        _rehearse_settings(holder, image, factor, scale, where)
    for exp in experiments:
        if "seeds" in exp:
            exp["seeds"] = exp["seeds"][:1]
        src = exp.get("source", {})
        if "components" in src:
            src["components"] = min(src["components"], scale.components)
        cpl = exp.get("coupling", {})
        if cpl.get("posterior_topk"):  # a posterior table keeps at most every mode
            cpl["posterior_topk"] = min(cpl["posterior_topk"], scale.components // 2)
        if src.get("kind") == "learned" and image_data:  # the CSFM Perceiver: one layer, 2 heads, narrow
            for key, small in (("width", max(16, src.get("width", 128) // 24)), ("depth", 1), ("heads", 2)):
                if key in src:
                    src[key] = small
        reg = exp.get("regularizers", {})
        if "focal_warmup" in reg:
            reg["focal_warmup"] = _scaled(reg["focal_warmup"], factor)
        rf = exp.get("reflow")
        if rf is not None:
            rf["num_pairs"] = min(rf.get("num_pairs", 20000), scale.reflow_pairs)
            rf["batch_size"] = min(rf.get("batch_size", 5000), scale.io_batch)
    _fit_pair_batches(cfg)
    for name in image_data:
        _keep_thresholds(cfg, full, name, scale)
    if image_data and experiments:  # FD on the few rehearsal samples (the full configs sample 50k)
        ev = cfg.setdefault("defaults", {}).setdefault("evaluate", {})
        ev["min_samples"] = min(ev.get("min_samples", 500), scale.image_samples)
        # sample grids of as many images as there are samples (a 256-px grid of 36 per cell takes a minute)
        rep = cfg.setdefault("report", {})
        rep["grid_images"] = min(rep.get("grid_images", 36), scale.image_samples)
    return cfg


def _settings_holders(cfg: dict) -> Iterator[tuple[str, dict, str | None]]:
    """(where, settings dict, dataset name or None) for the config's, each dataset's and each experiment's
    settings."""
    if "defaults" in cfg:
        yield "defaults", cfg["defaults"], None
    for name, ds in cfg["datasets"].items():
        if "defaults" in ds:
            yield f"datasets.{name}.defaults", ds["defaults"], name
    for i, exp in enumerate(cfg.get("experiments", [])):
        if "overrides" in exp:
            yield f"experiments.{i}.overrides", exp["overrides"], exp["data"]


def _rehearse_dataset(ds: dict, standins: Path, scale: Scale) -> None:
    """A dataset's paths, counts, K, batch sizes and device keys (in place)."""
    for key in ("root", "test_root"):
        if ds.get(key):
            ds[key] = standin_path(ds[key], standins)
    if ds["kind"] == "toy":
        if "n_train" in ds:
            ds["n_train"] = min(ds["n_train"], scale.toy_train)
        if "n_test" in ds:
            ds["n_test"] = min(ds["n_test"], scale.toy_samples)
        return
    if "workers" in ds:
        ds["workers"] = min(ds["workers"], scale.workers)
    for enc in ds.get("encoders", {}).values():
        if enc.get("weights"):
            enc["weights"] = standin_path(enc["weights"], standins)
        enc["batch_size"] = min(enc.get("batch_size", 256), scale.io_batch)
        enc["shard_rows"] = min(enc.get("shard_rows", 1024), scale.shard_rows)
        for key, cpu in (("gpu", False), ("processes", 1), ("workers", 0)):
            if key in enc:
                enc[key] = cpu
    for g in ds.get("gmm", []):
        g["components"] = sorted({min(k, scale.components) for k in g["components"]})
        g["chunk_rows"] = min(g.get("chunk_rows", 65536), scale.shard_rows)
    cap = ds.get("captions")
    if cap:
        if cap.get("file"):
            cap["file"] = standin_path(cap["file"], standins)
        for te in cap.get("text_encoders", {}).values():
            if te.get("weights"):
                te["weights"] = standin_path(te["weights"], standins)
            if "batch_size" in te:
                te["batch_size"] = min(te["batch_size"], scale.io_batch)
    ref = ds.get("reference")
    if ref:
        for key in ("adm_npz", "inception_path"):
            if ref.get(key):
                ref[key] = standin_path(ref[key], standins)
        if "batch_size" in ref:
            ref["batch_size"] = min(ref["batch_size"], scale.io_batch)


def _rehearse_settings(s: dict, image: bool, factor: float, scale: Scale, where: str) -> None:
    """One settings section (defaults or overrides): model sizes, steps, batches, samples, devices (in place)."""
    model = s.get("model", {})
    if "size" in model:
        model["size"] = _small_size(model["size"])
    if "block_out_channels" in model:  # U-Net: channel multipliers kept, ch 128 -> 16
        model["block_out_channels"] = [max(16, c // 8) for c in model["block_out_channels"]]
    train = s.get("train", {})
    for key in ("steps", "checkpoint_every", "log_every", "warmup_steps"):
        if key in train:
            train[key] = _scaled(train[key], factor)
    if "batch_size" in train:
        b = min(train["batch_size"], scale.image_batch if image else scale.toy_batch)
        if train.get("pair_batch"):
            train["pair_batch"] = train["pair_batch"] // train["batch_size"] * b
        train["batch_size"] = b
    for key, cpu in (("gpus", 0), ("processes", 1)):
        if key in train:
            train[key] = cpu
    for lr_key in ("lr_schedule", "ema_schedule"):
        sched = train.get(lr_key)
        if isinstance(sched, dict) and sched["unit"] == "step":
            raise ValueError(f"rehearsal: {where}.train.{lr_key} is in steps; scaling its positions is not "
                             "implemented (add it here and to ALLOW)")
    sample = s.get("sample", {})
    n = scale.image_samples if image else scale.toy_samples
    if "num_samples" in sample:
        sample["num_samples"] = min(sample["num_samples"], n)
    for entry in sample.get("solvers", []):
        if "num_samples" in entry:
            entry["num_samples"] = min(entry["num_samples"], n)
    if "batch_size" in sample:
        sample["batch_size"] = min(sample["batch_size"], scale.io_batch if image else n)
    if "shard_rows" in sample:
        sample["shard_rows"] = min(sample["shard_rows"], scale.sample_shard_rows)
    ev = s.get("evaluate", {})
    if "num_points" in ev:
        ev["num_points"] = min(ev["num_points"], scale.toy_samples)
    if "batch_size" in ev:
        ev["batch_size"] = min(ev["batch_size"], scale.io_batch)


def _fit_pair_batches(cfg: dict) -> None:
    """OT pairing: train.steps and checkpoint_every must stay multiples of pair_batch / batch_size."""
    for exp in cfg.get("experiments", []):
        pb = _setting(cfg, exp, exp["data"], "train", "pair_batch")
        if not pb:
            continue
        m = pb // _setting(cfg, exp, exp["data"], "train", "batch_size")
        for _, holder, data in _settings_holders(cfg):
            train = holder.get("train", {})
            for key in ("steps", "checkpoint_every"):
                if data in (None, exp["data"]) and key in train and train[key] % m:
                    train[key] += m - train[key] % m


def _epoch_size(full: dict, cfg: dict, name: str) -> int | None:
    """train.epoch_size that gives the rehearsal as many epochs as the full run has (its epoch schedules
    then pass the same points), or None when no experiment on ``name`` schedules by epoch."""
    exps = [e for e in full.get("experiments", []) if e["data"] == name]
    if not any(isinstance(_setting(full, e, name, "train", k), dict) and _setting(full, e, name, "train", k)["unit"] == "epoch"
               for e in exps for k in ("lr_schedule", "ema_schedule")):
        return None
    if name not in REAL_IMAGES:
        raise ValueError(f"rehearsal: dataset {name!r} schedules by epoch; add its real size to REAL_IMAGES")
    size = _setting(full, None, name, "train", "epoch_size") or REAL_IMAGES[name]
    epochs = _setting(full, None, name, "train", "steps") * _setting(full, None, name, "train", "batch_size") / size
    return max(1, round(_setting(cfg, None, name, "train", "steps") * _setting(cfg, None, name, "train", "batch_size")
                        / epochs))


def _keep_thresholds(cfg: dict, full: dict, name: str, scale: Scale) -> None:
    """Epoch schedules and the in-memory-or-streamed decision of training as at full scale (dataset defaults)."""
    train = cfg["datasets"][name].setdefault("defaults", {}).setdefault("train", {})
    epoch_size = _epoch_size(full, cfg, name)
    if epoch_size is not None:
        train["epoch_size"] = epoch_size
    budget = _memory_budget(full, cfg, name, scale)
    if budget is not None:
        train["max_memory_mb"] = budget
    if not train:
        del cfg["datasets"][name]["defaults"]["train"]
        if not cfg["datasets"][name]["defaults"]:
            del cfg["datasets"][name]["defaults"]


def _memory_budget(full: dict, cfg: dict, name: str, scale: Scale) -> float | None:
    """train.max_memory_mb of the rehearsal, in proportion: the full budget per training process times
    (rehearsal store bytes / full-scale store bytes), so latents that stream from Zarr at full scale stream
    here too. None when the dataset has no experiments or no full-scale size is known and nothing streams."""
    exps = [e for e in full.get("experiments", []) if e["data"] == name]
    if not exps:
        return None
    ds = full["datasets"][name]
    encs = ds.get("encoders", {})
    enc_name = exps[0].get("encoder") or next(iter(encs))
    enc = encs[enc_name]
    res = ds.get("resolution", 8)
    enc_res = enc.get("resolution") or res
    rows = 2 if enc.get("flips") else 1
    full_bytes = REAL_IMAGES[name] * rows * _real_latent_numel(enc["kind"], res, enc_res) * 4
    tree = standin_data()[name]["root"]
    mine = len(tree.classes) * tree.per_class * rows * _standin_latent_numel(enc["kind"], res, enc_res) * 4
    gpus = max(1, _setting(full, None, name, "train", "gpus"))
    full_mb = _setting(full, None, name, "train", "max_memory_mb") / gpus
    if full_bytes <= full_mb * 2**20:
        return None  # in memory at full scale, and the rehearsal's store is smaller still
    return float(f"{full_mb * mine / full_bytes:.3g}")


# ---- stand-ins ------------------------------------------------------------------------------------------------


@dataclass
class StandinPlan:
    """What :func:`write_standins` writes: ``{path: (kind, arguments)}``."""

    items: dict[str, tuple[str, dict]] = field(default_factory=dict)

    def add(self, path: str, kind: str, **kwargs: Any) -> None:
        if path in self.items and self.items[path] != (kind, kwargs):
            raise ValueError(f"rehearsal: two configs need different stand-ins at {path}: "
                             f"{self.items[path]} vs {(kind, kwargs)}")
        self.items[path] = (kind, kwargs)


def standin_plan(rehearsal: dict, plan: StandinPlan | None = None) -> StandinPlan:
    """The stand-ins a rehearsal config's paths point at (what each path must hold, by the key that names it)."""
    plan = plan or StandinPlan()
    data = standin_data()
    for name, ds in rehearsal["datasets"].items():
        if not _is_image(ds) or ds["kind"] != "imagefolder":
            continue
        if name not in data:
            raise ValueError(f"rehearsal: no stand-in image tree for dataset {name!r} (add it to standin_data)")
        for key in ("root", "test_root"):
            if ds.get(key):
                plan.add(ds[key], "images", **asdict(data[name][key]))
        res = ds.get("resolution", 8)
        for enc in ds.get("encoders", {}).values():
            enc_res = enc.get("resolution") or res
            if enc["kind"] == "rae":
                plan.add(enc["weights"], "rae", grid=enc_res // 14, decoder_patch_size=res // (enc_res // 14))
            elif enc["kind"] == "dinov2":
                plan.add(enc["weights"], "dinov2", image_size=enc_res)
            elif enc["kind"] == "sd-vae":
                plan.add(enc["weights"], "sd-vae", sample_size=res)
            elif enc["kind"] != "pixels":
                raise ValueError(f"rehearsal: no stand-in for encoder kind {enc['kind']!r}")
        cap = ds.get("captions")
        if cap and cap.get("file"):
            tree = data[name]["root"]
            plan.add(cap["file"], "captions", tree=asdict(tree), path_field=cap.get("path_field", "path"),
                     caption_field=cap.get("caption_field", "recaption_short"))
            for te in cap.get("text_encoders", {}).values():
                if te["kind"] == "clip":
                    plan.add(te["weights"], "clip", max_position_embeddings=te.get("max_length", 77))
        ref = ds.get("reference", {})
        if ref.get("adm_npz"):
            plan.add(ref["adm_npz"], "adm_npz")
        if ref.get("inception_path"):
            plan.add(ref["inception_path"], "inception")
    return plan


def _tree(kw: dict) -> ImageTree:
    """An :class:`ImageTree` back from its ``asdict`` form."""
    return ImageTree(**{**kw, "classes": tuple(kw["classes"]), "sizes": tuple(tuple(s) for s in kw["sizes"]),
                        "modes": tuple(kw["modes"])})


def _tree_paths(tree: ImageTree) -> list[str]:
    """The files of a stand-in tree, relative to its root (what :func:`write_image_folder` writes)."""
    return [f"{c}/{tree.name.format(cls=c, i=i)}{tree.ext}" for c in tree.classes for i in range(tree.per_class)]


def write_standins(plan: StandinPlan, log: Any = None) -> None:
    """Write every planned stand-in that is not there yet with the same plan (a ``.standin.json`` stamp
    beside or inside it records what was written)."""
    from sourceflow import standins as S

    for path, (kind, kw) in plan.items.items():
        p = Path(path)
        stamp = (p / ".standin.json") if kind in ("images", "rae", "dinov2", "sd-vae", "clip") else \
            p.with_name(p.name + ".standin.json")
        want = json.dumps({"kind": kind, **kw}, sort_keys=True)
        if stamp.is_file() and stamp.read_text() == want:
            continue
        if p.is_dir():
            shutil.rmtree(p)
        p.parent.mkdir(parents=True, exist_ok=True)
        t = time.time()
        if kind == "images":
            tree = _tree(kw)
            S.write_image_folder(p, list(tree.classes), tree.per_class, tree.ext, tree.sizes, tree.modes, tree.seed,
                                 tree.name)
        elif kind == "rae":
            S.save_pretrained(S.autoencoder_rae("dinov2", grid=kw["grid"], encoder_patch_size=14,
                                                encoder_hidden_size=RAE_HIDDEN, decoder_patch_size=kw["decoder_patch_size"],
                                                scaling_factor=1.0), p)
        elif kind == "dinov2":
            S.save_pretrained(S.dinov2_registers(kw["image_size"], hidden_size=DINO_HIDDEN), p)
        elif kind == "sd-vae":
            S.save_pretrained(S.autoencoder_kl(kw["sample_size"], VAE_CHANNELS, scaling_factor=0.18215), p)
        elif kind == "clip":
            S.save_clip_text(p, max_position_embeddings=kw["max_position_embeddings"])
        elif kind == "captions":
            S.write_caption_jsonl(p, _tree_paths(_tree(kw["tree"])), path_field=kw["path_field"],
                                  caption_field=kw["caption_field"])
        elif kind == "adm_npz":
            S.write_adm_reference_npz(p)
        elif kind == "inception":
            S.save_inception(p)
        else:
            raise ValueError(f"unknown stand-in kind {kind!r}")
        stamp.write_text(want)
        if log:
            log(f"  stand-in {kind:9s} {p} ({time.time() - t:.1f} s)")


# ---- running -----------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One rehearsal's result."""

    config: str
    ok: bool
    wall_s: float
    jobs: int
    summary: str
    folder: Path
    cpu_s: float = 0.0  # user + system seconds of Snakemake and every job (load-independent, unlike wall_s)


def scratch_workflow(dest: Path) -> Path:
    """A fresh copy of the workflow (Snakefile, rules, stages, library, configs, profiles) in ``dest``;
    results of an earlier rehearsal there are kept (Snakemake decides what is out of date)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        src, dst = ROOT / name, dest / name
        if dst.is_dir():
            shutil.rmtree(dst)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dst)
    return dest


def prepare(config_name: str, out: Path, scale: Scale = Scale()) -> tuple[Path, dict]:
    """The rehearsal folder of one full config with its derived config written to
    ``config/rehearsal.yaml`` (stand-ins under ``out/standins``), and the derived config."""
    full = yaml.safe_load((ROOT / "config" / config_name).read_text())
    cfg = rehearsal_config(full, out.resolve() / "standins", scale)
    folder = scratch_workflow(out / Path(config_name).stem)
    header = (f"# Rehearsal of config/{config_name}, derived by sourceflow.rehearsal.rehearsal_config: only\n"
              "# allow-listed keys (paths, counts, K, model sizes, steps, batch sizes, device keys) differ.\n")
    (folder / "config" / "rehearsal.yaml").write_text(header + yaml.safe_dump(cfg, sort_keys=False))
    return folder, cfg


def rehearse(config_name: str, out: Path, cores: int = 2, snakemake_args: tuple[str, ...] = (),
             scale: Scale = Scale(), log: Any = print, timeout: float | None = None,
             patch: Callable[[Path], Any] | None = None) -> Outcome:
    """Derive, write stand-ins, run Snakemake in the config's own folder, check the outputs. ``patch``
    is called with the folder before Snakemake starts (a cluster's partition and account in its copy of
    profiles/slurm, say)."""
    folder, cfg = prepare(config_name, out, scale)
    if patch is not None:
        patch(folder)
    write_standins(standin_plan(cfg), log)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "snakemake", "--cores", str(cores), "--configfile", "config/rehearsal.yaml",
           *cpu_resources(snakemake_args), *snakemake_args]
    t0, ru0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(folder / "snakemake.log", "w") as f:
        res = subprocess.run(cmd, cwd=folder, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    wall, ru = time.time() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = ru.ru_utime - ru0.ru_utime + ru.ru_stime - ru0.ru_stime
    text = (folder / "snakemake.log").read_text()
    done = re.findall(r"(\d+) of (\d+) steps", text)
    jobs = int(done[-1][0]) if done else 0
    if res.returncode != 0:
        return Outcome(config_name, False, wall, jobs, failure(folder, text), folder, cpu)
    problems = check_outputs(folder, cfg)
    summary = "; ".join(problems) if problems else describe(folder, cfg)
    return Outcome(config_name, not problems, wall, jobs, summary, folder, cpu)


# Rules that take a GPU whatever the config says (CLIP text embedding, clean-fid Inception reference
# features): on a CPU machine their `--device cuda` fails, so a plain rehearsal sets their gpu resource to 0.
# A run with its own --profile or --set-resources keeps its own (a command-line --set-resources would replace
# a profile's whole set-resources list).
CPU_RESOURCES = ("embed_captions:gpu=0", "reference_features:gpu=0")


def cpu_resources(snakemake_args: tuple[str, ...]) -> tuple[str, ...]:
    """``--set-resources`` for :data:`CPU_RESOURCES`, unless the arguments bring a profile or resources."""
    if any(a.startswith(("--profile", "--set-resources", "--workflow-profile")) for a in snakemake_args):
        return ()
    return ("--set-resources", *CPU_RESOURCES)


def failure(folder: Path, text: str) -> str:
    """``FAILED`` with the failed rules and the last line of the first failed job's log."""
    rules = sorted(set(re.findall(r"Error in rule (\w+):", text)))
    logs = re.findall(r"^Error in rule \w+:\n(?:    .*\n)*?    log: (\S+)", text, re.M)
    last = ""
    if logs and (folder / logs[0]).is_file():
        lines = [ln for ln in (folder / logs[0]).read_text(errors="replace").splitlines() if ln.strip()]
        last = f": {lines[-1].strip()[:300]}" if lines else ""
    return f"FAILED in {', '.join(rules) or '?'}{last} (see {folder / 'snakemake.log'})"


def expected_outputs(cfg: dict) -> list[str]:
    """Files a finished rehearsal must have (relative to its folder): each dataset's artifacts, and the
    report with every experiment's metrics when there are experiments."""
    r = cfg.get("results", "results")
    out = []
    for name, ds in cfg["datasets"].items():
        if not _is_image(ds):
            continue
        out.append(f"{r}/{name}/manifest.parquet")
        for enc in ds.get("encoders", {}):
            out += [f"{r}/{name}/{enc}/latents.json", f"{r}/{name}/{enc}/latent_stats.safetensors"]
        for g in ds.get("gmm", []):
            out += [f"{r}/{name}/{g['encoder']}/gmm/cls_K{k}.safetensors" for k in g["components"]]
        if ds.get("captions"):
            out += [f"{r}/{name}/captions/{te}.zarr" for te in ds["captions"].get("text_encoders", {"minilm": 0})]
        out += [f"{r}/{name}/reference/{f}.npz" for f in ds.get("reference", {}).get("features", [])]
    if cfg.get("experiments"):
        out += [f"{r}/report/summary.md", f"{r}/report/metrics.csv"]
    return out


def read_metrics(folder: Path, cfg: dict) -> list[dict[str, str]]:
    path = folder / cfg.get("results", "results") / "report" / "metrics.csv"
    if not path.is_file():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def check_outputs(folder: Path, cfg: dict) -> list[str]:
    """What is missing: expected files, and (image experiments) an FD for every experiment at every sampled
    entry with enough samples, finite."""
    problems = [f"missing {p}" for p in expected_outputs(cfg) if not (folder / p).exists()]
    rows = read_metrics(folder, cfg)
    for exp in cfg.get("experiments", []):
        ds = cfg["datasets"][exp["data"]]
        mine = [r for r in rows if r["experiment"] == exp["name"]]
        if not mine:
            problems.append(f"no metrics for experiment {exp['name']}")
            continue
        metric = "fd" if _is_image(ds) else "w2sq"
        vals = [float(r["value"]) for r in mine if r["metric"] == metric]
        if not vals or not all(math.isfinite(v) for v in vals):
            problems.append(f"experiment {exp['name']}: no finite {metric}")
    return problems


def describe(folder: Path, cfg: dict) -> str:
    """One line: the metric of each experiment at its largest-NFE entry (FD for images, W2² for toy)."""
    rows = read_metrics(folder, cfg)
    if not rows:
        n = len(expected_outputs(cfg))
        return f"{n} artifacts built (no experiments)"
    parts = []
    for exp in cfg["experiments"]:
        mine = [r for r in rows if r["experiment"] == exp["name"] and r["metric"] in ("fd", "w2sq")]
        if not mine:
            continue
        best = max(mine, key=lambda r: float(r["nfe"] or 0))
        tag = best["solver"] + (f"-{int(float(best['steps']))}" if best.get("steps") not in ("", None) else "")
        name = "FID" if best["metric"] == "fd" else "W2²"
        parts.append(f"{exp['name']} {name}@{tag} {float(best['value']):.4g}")
    return ", ".join(parts)


def record(outcomes: list[Outcome], command: str, machine: str, load: str, total_s: float) -> str:
    """A RESULTS.md entry: command, machine, load, per-config wall time and summary, total."""
    import datetime as dt

    lines = [f"## Rehearsal of every full-scale config on CPU, {dt.date.today().isoformat()}", "",
             f"- command: `{command}`", f"- machine: {machine}", f"- load: {load}",
             f"- total wall time: **{total_s:.0f} s ({total_s / 60:.1f} min)**; CPU time of all jobs "
             f"{sum(o.cpu_s for o in outcomes):.0f} s", "",
             "| config | result | jobs | wall time | CPU time | summary |", "|:--|:--|--:|--:|--:|:--|"]
    for o in outcomes:
        lines.append(f"| {o.config} | {'ok' if o.ok else 'FAILED'} | {o.jobs} | {o.wall_s:.0f} s | {o.cpu_s:.0f} s "
                     f"| {o.summary} |")
    return "\n".join(lines) + "\n"


def machine() -> str:
    """CPU model, cores, memory, OS and Python of this machine."""
    import platform

    cpu = "unknown CPU"
    info = Path("/proc/cpuinfo")
    names = [ln.split(":", 1)[1].strip() for ln in info.read_text().splitlines()
             if ln.startswith("model name")] if info.exists() else []
    if names:
        cpu = names[0]
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


__all__ = ["ALLOW", "FULL_CONFIGS", "Outcome", "Scale", "allowed", "differences", "disallowed", "machine",
           "prepare", "record", "rehearsal_config", "rehearse", "standin_plan", "write_standins"]
