"""Build the objects a stage needs (velocity model, method, data) from a resolved experiment spec.

The one place where configuration words become classes, so train, sample and evaluate always agree.
Data are either 2-D toy points (:class:`PointData`, a ``toy.safetensors`` file) or image latents
(:class:`~sourceflow.data.latent_data.LatentData`, a latent store with its statistics, the manifest
and optionally caption embeddings); both expose ``event_shape``, ``num_classes`` and ``condition``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file
from torch import nn

from sourceflow.flow.couplings import (
    C2OTCoupling,
    Coupling,
    FixedPairs,
    Independent,
    LoomCoupling,
    MinibatchOT,
    ModeCoupling,
)
from sourceflow.flow.method import Method
from sourceflow.flow.sources import GaussianSource, GMMSource, LearnedSource, Source, ToySource
from sourceflow.flow.time import TimeSampler
from sourceflow.gmm.diag import DiagGMM
from sourceflow.io import reading, save_safetensors
from sourceflow.models.embed import CondSpec
from sourceflow.models.mlp import ConditionMLP, MLPVelocity

if TYPE_CHECKING:
    import argparse

    from sourceflow.data.latent_data import LatentData


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
    save_safetensors(path, tensors, metadata)


def load_points(path: str | Path, split: str) -> PointData:
    try:
        with reading(path, "toy data file (safetensors)", "delete it and rerun the make_toy_data stage"):
            t = load_file(str(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"data file not found: {path} (run the make_toy_data stage)") from None
    if f"{split}.x" not in t:
        raise KeyError(f"{path}: no split {split!r}; has {sorted({k.split('.')[0] for k in t})}")
    return PointData(t[f"{split}.x"], t[f"{split}.label"].long(), int(t[f"{split}.num_classes"]))


def add_data_args(p: argparse.ArgumentParser, toy_split: str) -> None:
    """The data flags of train / sample / evaluate: a toy file, or image latents (+ captions)."""
    g = p.add_argument_group("data (either --data, or --latents with --stats and --manifest)")
    g.add_argument("--data", default=None, help=f"toy data .safetensors (the {toy_split} split is used)")
    g.add_argument("--latents", default=None, help="image latent store (latents.zarr of extract_latents)")
    g.add_argument("--stats", default=None, help="latent_stats.safetensors that normalizes the latents")
    g.add_argument("--manifest", default=None, help="manifest.parquet (class labels of the images)")
    g.add_argument("--captions", default=None, help="caption embeddings (.zarr of embed_captions; text conditioning)")
    g.add_argument("--posteriors", default=None,
                   help="MM-FM with coupling.posterior_topk: the cls_posteriors table the mode coupling samples "
                        "from in training (sampling does not pair and ignores it)")


def load_data(a: argparse.Namespace, spec: dict[str, Any], split: str = "train") -> PointData | LatentData:
    """The dataset named by the data flags (see :func:`add_data_args`); one-line errors for bad combinations."""
    if (a.data is None) == (a.latents is None):
        raise ValueError("give either --data (toy points) or --latents (image latents)")
    if a.data is not None:
        return load_points(a.data, split)
    from sourceflow.data.latent_data import load_latent_data

    for flag in ("stats", "manifest"):
        if getattr(a, flag) is None:
            raise ValueError(f"--latents needs --{flag}")
    if spec["conditioning"] == "text" and a.captions is None:
        raise ValueError("conditioning 'text' needs --captions (the embed_captions store)")
    # the budget is per machine: every local process holds its own copy
    per_process = spec["train"].get("max_memory_mb", 4000) / max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return load_latent_data(a.latents, a.stats, a.manifest, a.captions, per_process)


def is_image_data(data: Any) -> bool:
    return len(data.event_shape) == 3


def cond_spec(spec: dict[str, Any], data: PointData | LatentData) -> CondSpec:
    """The velocity model's condition: data class, continuous data condition, caption tokens, GMM mode, or none."""
    kind = spec["conditioning"]
    if kind == "none":
        return CondSpec()
    if kind == "label":
        return CondSpec("discrete", data.num_classes)
    if kind == "mode":
        return CondSpec("discrete", int(spec["source"]["components"]))
    if kind == "text":
        length, width = data.text_shape  # type: ignore[union-attr]
        return CondSpec("text", width, length)
    c = data.condition(kind)
    assert c is not None
    return CondSpec("continuous", int(c.shape[1]))


def build_model(spec: dict[str, Any], data: PointData | LatentData) -> nn.Module:
    """The velocity model: an MLP on flat points, a DiT / DiT-DH or a diffusers U-Net on [C, H, W] latents."""
    m = spec["model"]
    cs = cond_spec(spec, data)
    if m["kind"] == "mlp":
        if is_image_data(data):
            raise ValueError("model.kind 'mlp' is for toy points; image latents need 'dit' or 'unet'")
        return MLPVelocity(dim=math.prod(data.event_shape), width=m["width"], depth=m["depth"],
                           expansion=m["expansion"], cond=cs, time_embed=m.get("time_embed", "linear"))
    if not is_image_data(data):
        raise ValueError(f"model.kind {m['kind']!r} needs image latents [C, H, W]; toy points use 'mlp'")
    c, h, w = data.event_shape
    if m["kind"] == "dit":
        from sourceflow.models.dit import build_dit

        kw: dict[str, Any] = {"text_mode": m.get("text_mode", "cross")}
        if m["size"].startswith("DiTDH-"):
            kw.update(head_depth=m.get("head_depth"), head_width=m.get("head_width"))
        return build_dit(m["size"], (h, w), c, cs, **kw)
    if m["kind"] == "unet":
        from sourceflow.models.unet import UNetVelocity

        if h != w:
            raise ValueError(f"the U-Net needs square latents, got {h}x{w}")
        attn = m.get("attention_resolutions")
        return UNetVelocity(h, c, cs, block_out_channels=tuple(m["block_out_channels"]),
                            layers_per_block=m["layers_per_block"],
                            attention_resolutions=None if attn is None else tuple(attn),
                            dropout=m.get("dropout", 0.0))
    raise ValueError(f"unknown model.kind {m['kind']!r}")


def build_source(spec: dict[str, Any], data: PointData | LatentData, gmm_path: str | Path | None) -> Source:
    s = spec["source"]
    kind = s["kind"]
    if kind == "gaussian":
        return GaussianSource(data.event_shape, std=s.get("std", 1.0))
    if kind == "toy":
        return ToySource(s["distribution"])
    if kind == "gmm":
        if gmm_path is None:
            raise ValueError("a GMM source needs its mixture file (--gmm for points; --source-gmm, the spatial GMM, "
                             "for images)")
        src = GMMSource.load(gmm_path, variance=s.get("variance", "spherical"), means_on=s.get("means_on", "device"))
        if src.event_shape != tuple(data.event_shape):
            raise ValueError(f"{gmm_path}: GMM of shape {src.event_shape} does not match the data {tuple(data.event_shape)}"
                             + (" (an image GMM source is the spatial GMM, not the CLS GMM)" if is_image_data(data) else ""))
        return src
    if kind == "learned":
        d = math.prod(data.event_shape)
        learn_var = bool(s.get("learn_var", True))
        if is_image_data(data):  # CSFM's Perceiver over the latent's tokens
            from sourceflow.models.perceiver import PerceiverSource

            net: nn.Module = PerceiverSource(cond_spec(spec, data), data.event_shape, patch=s.get("patch", 1),
                                             width=s.get("width", 128), depth=s.get("depth", 2),
                                             heads=s.get("heads", 4), learn_var=learn_var)
        else:
            net = ConditionMLP(cond_spec(spec, data), out_dim=2 * d if learn_var else d,
                               width=s.get("width", 128), depth=s.get("depth", 2), logvar_dims=d if learn_var else 0)
        return LearnedSource(net, data.event_shape, learn_var=learn_var)
    raise ValueError(f"unknown source kind {kind!r}")


def build_coupling(spec: dict[str, Any], data: PointData | LatentData, seed: int, gmm_path: str | Path | None,
                   posteriors: str | Path | None = None) -> Coupling:
    c = spec["coupling"]
    kind = c["kind"]
    if kind == "independent":
        return Independent()
    if kind == "ot":
        return MinibatchOT(cost=c.get("cost", "sqeuclidean"))
    if kind == "loom":
        return LoomCoupling(num_data=len(data), num_caches=c.get("num_caches", 1), seed=seed,
                            cost=c.get("cost", "euclidean"))
    if kind == "c2ot":
        w = c.get("weight", "inf")
        return C2OTCoupling(weight=float(w), target_ratio=c.get("target_ratio"))
    if kind == "reflow":
        return FixedPairs()  # the train stage sets the pairs (load_reflow_pairs); sampling never pairs
    if kind == "mode":
        if gmm_path is None:
            raise ValueError("the MM-FM mode coupling needs --gmm (the fitted CLS GMM file)")
        table, top_k = None, int(c.get("posterior_topk", 0)) if uses_posterior_table(spec) else 0
        if top_k and posteriors is not None:  # sampling never pairs: without the file, pairing raises
            from sourceflow.gmm.posteriors import PosteriorTable

            table = PosteriorTable.load(posteriors, len(data))
            if table.k != top_k:
                raise ValueError(f"{posteriors}: top-{table.k} posteriors, coupling.posterior_topk is {top_k}")
        return ModeCoupling(DiagGMM.load(gmm_path).to("cpu", torch.float64), posterior=c.get("posterior", "soft"),
                            table=table, table_k=top_k)
    raise ValueError(f"unknown coupling kind {kind!r}")


def uses_posterior_table(spec: dict[str, Any]) -> bool:
    """MM-FM on images with ``coupling.posterior_topk`` > 0: modes come from the cls_posteriors table."""
    c = spec["coupling"]
    return c["kind"] == "mode" and int(c.get("posterior_topk", 0)) > 0 and spec.get("encoder") is not None


def build_method(spec: dict[str, Any], data: PointData | LatentData, seed: int, gmm_path: str | Path | None = None,
                 source_gmm: str | Path | None = None, posteriors: str | Path | None = None) -> Method:
    """The method of ``spec``. ``gmm_path``: the CLS GMM (MM-FM's mode coupling); ``source_gmm``: the GMM
    x0 is drawn from (the spatial GMM for images; for toy points the CLS GMM itself, the default);
    ``posteriors``: the top-k posterior table the mode coupling samples from (``coupling.posterior_topk``)."""
    from sourceflow.flow.method import FocalModeWeights

    cs = cond_spec(spec, data)
    cond_from = {"none": "none", "mode": "mode"}.get(spec["conditioning"], "data")
    t = spec["time"]
    reg = spec.get("regularizers", {})
    source = build_source(spec, data, source_gmm if source_gmm is not None else gmm_path)
    focal = None
    if reg.get("focal_gamma", 0.0) > 0:
        focal = FocalModeWeights(source.num_modes, reg["focal_gamma"], reg.get("focal_ema", 0.9995),
                                 tuple(reg.get("focal_clip", (0.3, 3.0))), reg.get("focal_warmup", 2500))
    return Method(
        source=source,
        coupling=build_coupling(spec, data, seed, gmm_path, posteriors),
        cond_from=cond_from,
        time=TimeSampler(t["kind"], t["mean"], t["std"], t["shift"], t.get("t_max", 1.0)),
        p_uncond=spec["train"]["p_uncond"],
        null_id=cs.null_id if cs.kind == "discrete" else None,
        var_reg_weight=reg.get("var_reg", 0.0),
        align_weight=reg.get("align", 0.0),
        focal=focal,
    )


def training_dataset(spec: dict[str, Any], data: PointData | LatentData) -> Any:
    """The loop's dataset: rows, the model's data condition, and (images) the CLS descriptors MM-FM's
    mode coupling reads (none with a posterior table: the coupling reads the table by row)."""
    from sourceflow.train.loop import ArrayDataset

    cls = getattr(data, "cls", None) if spec["coupling"]["kind"] == "mode" and not uses_posterior_table(spec) else None
    return ArrayDataset(data.x, data.condition(spec["conditioning"]), cls)


def save_reflow_pairs(path: str | Path, x0: torch.Tensor, x1: torch.Tensor, cond: torch.Tensor | None,
                      mode: torch.Tensor | None, metadata: dict[str, str]) -> None:
    """Write reflow pairs (x0 [N, ...], x1 [N, ...], the condition each was generated with, the GMM mode)."""
    tensors = {"x0": x0.float().contiguous(), "x1": x1.float().contiguous()}
    if cond is not None:
        tensors["cond"] = cond.contiguous()
    if mode is not None:
        tensors["mode"] = mode.long().contiguous()
    save_safetensors(path, tensors, metadata)


def load_reflow_pairs(path: str | Path, spec: dict[str, Any], method: Method) -> Any:
    """The training dataset of a reflow run: the pairs' x1 (with their conditions), and ``method``'s coupling
    set to hand out the pairs' x0 (and modes)."""
    from sourceflow.io import read_safetensors
    from sourceflow.train.loop import ArrayDataset

    if not isinstance(method.coupling, FixedPairs):
        raise ValueError(f"{path}: reflow pairs need the reflow coupling, the spec has {spec['coupling']['kind']!r}")
    keys = ["x0", "x1"] + {"data": ["cond"], "mode": ["mode"]}.get(method.cond_from, [])
    t, _ = read_safetensors(path, keys, "reflow pairs", "the reflow_pairs stage writes them")
    method.coupling.set_pairs(t["x0"], t.get("mode"))
    return ArrayDataset(t["x1"], t.get("cond"))


def init_from_trained(path: str | Path, model: nn.Module, method: Method) -> None:
    """Start from another run's final weights (reflow): its EMA model and its source (a learned source's
    network); the coupling state of the base (LOOM's seeds) does not carry over."""
    try:
        with reading(path, "base model (safetensors)", "delete it and rerun the base experiment's train stage"):
            t = load_file(str(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"base model not found: {path} (train the base experiment first)") from None
    model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
    method.source.load_state_dict({k[14:]: v for k, v in t.items() if k.startswith("method.source.")})


def load_decoder(data: LatentData, device: str | torch.device = "cpu") -> Any:
    """The encoder that made ``data``'s latents, rebuilt from the store's attributes, for decoding samples
    (pixels: identity; sd-vae: ``AutoencoderKL.decode``); a one-line error for encoders without a decoder."""
    from sourceflow.encoders import load_encoder

    attrs = data.store_attrs or {}
    enc = load_encoder(attrs["encoder"], attrs.get("weights"), int(attrs["resolution"]), device,
                       **(attrs.get("encoder_options") or {}))
    if not getattr(enc, "decodable", False):
        raise ValueError(f"encoder {attrs['encoder']!r} has no decoder: its samples cannot become images for FID "
                         "(train on pixels or sd-vae latents, or add a decoder for this encoder)")
    return enc
