"""Per-position latent statistics (RAE-style): mean and variance over all rows of a store, for every
(c, h, w) separately, used to normalise spatial latents to roughly unit scale before flow matching.

Two normalisations (``NORMALIZATIONS``), recorded in the saved file so every reader applies the one the
stats were made for: ``mean_std`` = (x − mean) / sqrt(var + eps), and ``std`` = x / sqrt(var + eps),
RAE's choice for DINOv2-B (its statistics file has a variance and no mean; eps 1e-5). ``var`` is the
per-position variance around the mean in both cases; only whether the mean is subtracted differs.

Accumulated in float64 by merging per-batch means and sums of squared deviations (Chan et al.), which
stays exact where E[x²] − E[x]² would cancel; the variance is the biased one (divide by N, numpy's
default), saved as float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from sourceflow.io import atomic_path, read_safetensors

NORMALIZATIONS = ("mean_std", "std")


@dataclass
class LatentStats:
    """Per-position ``mean`` and ``var`` [C, H, W] (float32) and how they normalise (``mode``):
    ``mean_std``: (x − mean) / sqrt(var + eps); ``std``: x / sqrt(var + eps) (RAE, DINOv2-B)."""

    mean: torch.Tensor
    var: torch.Tensor
    eps: float = 1e-6
    mode: str = "mean_std"

    def __post_init__(self) -> None:
        if self.mode not in NORMALIZATIONS:
            raise ValueError(f"latent stats: normalization must be one of {', '.join(NORMALIZATIONS)}, "
                             f"got {self.mode!r}")

    def _stats_like(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        if tuple(x.shape[-3:]) != tuple(self.mean.shape):
            raise ValueError(f"latents of shape {tuple(x.shape)} do not end in the stats shape {tuple(self.mean.shape)}")
        mean = self.mean.to(x.device, x.dtype) if self.mode == "mean_std" else None
        return mean, torch.sqrt(self.var.to(x.device, x.dtype) + self.eps)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats_like(x)
        return (x if mean is None else x - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`normalize`."""
        mean, std = self._stats_like(x)
        return x * std if mean is None else x * std + mean

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> None:
        """Write ``mean`` and ``var`` (float32) with ``eps``, the normalization and ``metadata`` to a
        safetensors file, atomically."""
        meta = dict(metadata or {})
        meta.update(eps=repr(float(self.eps)), normalize=self.mode)
        with atomic_path(path) as tmp:
            save_file({"mean": self.mean.float().contiguous(), "var": self.var.float().contiguous()}, str(tmp),
                      metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> LatentStats:
        """Read a file written by :meth:`save`; one-line errors naming the file. A file without a
        ``normalize`` entry predates it and was made for ``mean_std``."""
        t, meta = read_safetensors(path, ("mean", "var"), "latent stats", "run the latent_stats stage")
        if t["mean"].shape != t["var"].shape:
            raise ValueError(f"{path}: mean {tuple(t['mean'].shape)} and var {tuple(t['var'].shape)} differ in shape")
        mode = meta.get("normalize", "mean_std")
        if mode not in NORMALIZATIONS:
            raise ValueError(f"{path}: unknown normalization {mode!r} (expected one of {', '.join(NORMALIZATIONS)})")
        return cls(t["mean"], t["var"], float(meta.get("eps", 1e-6)), mode)


class RunningMoments:
    """Streaming per-element mean and M2 (sum of squared deviations) in float64."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.n = 0
        self.mean = np.zeros(shape, np.float64)
        self.m2 = np.zeros(shape, np.float64)

    def update(self, batch: np.ndarray) -> None:
        x = np.asarray(batch, dtype=np.float64)
        nb = x.shape[0]
        if nb == 0:
            return
        mb = x.mean(axis=0)
        m2b = ((x - mb) ** 2).sum(axis=0)
        n = self.n + nb
        delta = mb - self.mean
        self.mean += delta * (nb / n)
        self.m2 += m2b + delta**2 * (self.n * nb / n)
        self.n = n

    @property
    def var(self) -> np.ndarray:
        return self.m2 / max(self.n, 1)


def compute_latent_stats(store, batch_rows: int = 1024, progress: bool = False, eps: float = 1e-6,
                         mode: str = "mean_std") -> LatentStats:
    """Mean and variance of ``store``'s ``spatial`` array per (c, h, w), over all rows (flipped ones
    included), to normalise with ``mode`` (see :data:`NORMALIZATIONS`)."""
    moments = RunningMoments(store.spatial_shape)
    batches = store.iter_batches(["spatial"], batch_rows)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, total=-(-store.num_rows // batch_rows), desc="latent stats", unit="batch")
    for _, b in batches:
        moments.update(b["spatial"])
    return LatentStats(torch.from_numpy(moments.mean.astype(np.float32)),
                       torch.from_numpy(moments.var.astype(np.float32)), eps, mode)
