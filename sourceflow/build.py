"""Build the objects a stage needs (velocity model, method, data) from a resolved experiment spec.

The one place where configuration words become classes, so train, sample and evaluate always agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sourceflow.flow.couplings import (
    C2OTCoupling,
    Coupling,
    Independent,
    LoomCoupling,
    MinibatchOT,
    ModeCoupling,
)
from sourceflow.flow.method import Method
from sourceflow.flow.sources import GaussianSource, GMMSource, LearnedSource, Source, ToySource
from sourceflow.flow.time import TimeSampler
from sourceflow.gmm.diag import DiagGMM
from sourceflow.io import atomic_path
from sourceflow.models.embed import CondSpec
from sourceflow.models.mlp import ConditionMLP, MLPVelocity


@dataclass
class PointData:
    """An in-memory dataset of flat points with per-point conditions (toy data)."""

    x: torch.Tensor  # [N, D]
    label: torch.Tensor  # [N] int64
    num_classes: int

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def event_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def condition(self, kind: str) -> torch.Tensor | None:
        """The data condition an experiment conditions on: class ids, or continuous [N, d] vectors.

        The angle is encoded as (cos, sin) so the model sees no wrap-around at ±π.
        """
        if kind in ("none", "mode"):
            return None
        if kind == "label":
            return self.label
        if kind == "angle":
            a = torch.atan2(self.x[:, 1], self.x[:, 0])
            return torch.stack([torch.cos(a), torch.sin(a)], 1)
        if kind == "xcoord":
            return self.x[:, :1].clone()
        raise ValueError(f"unknown condition {kind!r}")


def save_points(path: str | Path, splits: dict[str, PointData], metadata: dict[str, str]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for name, d in splits.items():
        tensors[f"{name}.x"] = d.x.contiguous()
        tensors[f"{name}.label"] = d.label.contiguous()
        tensors[f"{name}.num_classes"] = torch.tensor(d.num_classes)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_points(path: str | Path, split: str) -> PointData:
    try:
        t = load_file(str(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"data file not found: {path} (run the make_toy_data stage)") from None
    if f"{split}.x" not in t:
        raise KeyError(f"{path}: no split {split!r}; has {sorted({k.split('.')[0] for k in t})}")
    return PointData(t[f"{split}.x"], t[f"{split}.label"].long(), int(t[f"{split}.num_classes"]))


def cond_spec(spec: dict[str, Any], data: PointData) -> CondSpec:
    """The velocity model's condition: data class, continuous data condition, GMM mode, or none."""
    kind = spec["conditioning"]
    if kind == "none":
        return CondSpec()
    if kind == "label":
        return CondSpec("discrete", data.num_classes)
    if kind == "mode":
        return CondSpec("discrete", int(spec["source"]["components"]))
    c = data.condition(kind)
    assert c is not None
    return CondSpec("continuous", int(c.shape[1]))


def build_model(spec: dict[str, Any], data: PointData) -> nn.Module:
    m = spec["model"]
    if m["kind"] != "mlp":
        raise ValueError(f"model.kind {m['kind']!r} is not available for point data")
    return MLPVelocity(dim=math.prod(data.event_shape), width=m["width"], depth=m["depth"],
                       expansion=m["expansion"], cond=cond_spec(spec, data))


def build_source(spec: dict[str, Any], data: PointData, gmm_path: str | Path | None) -> Source:
    s = spec["source"]
    kind = s["kind"]
    if kind == "gaussian":
        return GaussianSource(data.event_shape, std=s.get("std", 1.0))
    if kind == "toy":
        return ToySource(s["distribution"])
    if kind == "gmm":
        if gmm_path is None:
            raise ValueError("a GMM source needs --gmm (the fitted CLS GMM file)")
        return GMMSource.load(gmm_path, variance=s.get("variance", "spherical"))
    if kind == "learned":
        d = math.prod(data.event_shape)
        learn_var = bool(s.get("learn_var", True))
        net = ConditionMLP(cond_spec(spec, data), out_dim=2 * d if learn_var else d,
                           width=s.get("width", 128), depth=s.get("depth", 2))
        return LearnedSource(net, data.event_shape, learn_var=learn_var)
    raise ValueError(f"unknown source kind {kind!r}")


def build_coupling(spec: dict[str, Any], data: PointData, seed: int, gmm_path: str | Path | None) -> Coupling:
    c = spec["coupling"]
    kind = c["kind"]
    if kind == "independent":
        return Independent()
    if kind == "ot":
        return MinibatchOT()
    if kind == "loom":
        return LoomCoupling(num_data=len(data), num_caches=c.get("num_caches", 1), seed=seed)
    if kind == "c2ot":
        w = c.get("weight", "inf")
        return C2OTCoupling(weight=float(w), target_ratio=c.get("target_ratio"))
    if kind == "mode":
        if gmm_path is None:
            raise ValueError("the MM-FM mode coupling needs --gmm (the fitted CLS GMM file)")
        return ModeCoupling(DiagGMM.load(gmm_path).to("cpu", torch.float64), posterior=c.get("posterior", "soft"))
    raise ValueError(f"unknown coupling kind {kind!r}")


def build_method(spec: dict[str, Any], data: PointData, seed: int, gmm_path: str | Path | None = None) -> Method:
    cs = cond_spec(spec, data)
    cond_from = {"none": "none", "mode": "mode"}.get(spec["conditioning"], "data")
    t = spec["time"]
    reg = spec.get("regularizers", {})
    return Method(
        source=build_source(spec, data, gmm_path),
        coupling=build_coupling(spec, data, seed, gmm_path),
        cond_from=cond_from,
        time=TimeSampler(t["kind"], t["mean"], t["std"], t["shift"]),
        p_uncond=spec["train"]["p_uncond"],
        null_id=cs.null_id if cs.kind == "discrete" else None,
        var_reg_weight=reg.get("var_reg", 0.0),
        align_weight=reg.get("align", 0.0),
    )
