"""MM-FM's CLS posteriors, computed once: the top-k modes of every store row and their probabilities.

MM-FM draws each training row's mode from p(k | CLS) under the CLS GMM every step. At ImageNet scale that
is an [B, 8192] float64 log-density product over 768 dimensions per step and process, on the CPU where
the coupling lives (:class:`sourceflow.flow.couplings.ModeCoupling`). The posterior of a row never
changes, so the ``cls_posteriors`` stage computes it once per store row (flipped rows with their own CLS)
and keeps the ``k`` most probable modes. In 768 dimensions the posteriors are nearly one-hot, so a small k
keeps all but a negligible mass; the stage records the largest and mean mass left out (``residual``).

Sampling from the table uses the step's uniform exactly as the exact sampler does (inverse CDF over the
modes in index order), so a draw equals the exact draw unless the uniform falls within the left-out mass
of a boundary (tests/unit/test_cls_posteriors.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sourceflow.gmm.diag import DiagGMM
from sourceflow.gmm.em import iter_posteriors


@dataclass
class PosteriorTable:
    """``modes`` int32 [N, k] (ascending mode index per row) and ``probs`` float32 [N, k] of every row."""

    modes: torch.Tensor
    probs: torch.Tensor

    @property
    def k(self) -> int:
        return int(self.modes.shape[1])

    def __len__(self) -> int:
        return int(self.modes.shape[0])

    def draw(self, rows: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
        """Modes (int64) of dataset ``rows``: inverse CDF of the renormalised top-k at uniforms ``u`` [n, 1]
        (float64), or the most probable mode when ``u`` is None (the hard posterior)."""
        rows = rows.cpu().long()
        modes, probs = self.modes[rows].long(), self.probs[rows].double()
        if u is None:
            return modes.gather(1, probs.argmax(1, keepdim=True))[:, 0]
        cdf = torch.cumsum(probs, 1) / probs.sum(1, keepdim=True)
        j = torch.clamp((cdf < u.cpu()).sum(1), max=self.k - 1)
        return modes.gather(1, j[:, None])[:, 0]

    def save(self, path: str | Path, metadata: dict[str, str]) -> None:
        from sourceflow.io import save_safetensors

        save_safetensors(path, {"modes": self.modes.contiguous(), "probs": self.probs.contiguous()}, metadata)

    @classmethod
    def load(cls, path: str | Path, num_rows: int | None = None) -> PosteriorTable:
        from sourceflow.io import read_safetensors

        t, _ = read_safetensors(path, ("modes", "probs"), "CLS posterior table", "run the cls_posteriors stage")
        table = cls(t["modes"], t["probs"])
        if num_rows is not None and len(table) != num_rows:
            raise ValueError(f"{path}: posteriors of {len(table)} rows, the training data has {num_rows} "
                             "(rerun the cls_posteriors stage for this store)")
        return table


def top_k_posteriors(gmm: DiagGMM, batches: Iterable[np.ndarray | torch.Tensor], num_rows: int, k: int, *,
                     device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64,
                     progress=None) -> tuple[PosteriorTable, torch.Tensor]:
    """The top-``k`` posterior table of ``num_rows`` rows given in consecutive ``batches`` [B, D], and the
    probability mass each row's table leaves out (float64 [N])."""
    if not 1 <= k <= gmm.num_modes:
        raise ValueError(f"top-k must be in [1, {gmm.num_modes}] (the GMM's modes), got {k}")
    modes = torch.empty(num_rows, k, dtype=torch.int32)
    probs = torch.empty(num_rows, k, dtype=torch.float32)
    residual = torch.empty(num_rows, dtype=torch.float64)
    row = 0
    for x in batches:
        x = torch.as_tensor(np.asarray(x)).float()
        for s, p in iter_posteriors(gmm, x, device=device, dtype=dtype):
            v, i = p.topk(k, dim=1)
            order = i.argsort(1)  # ascending mode index: the exact sampler's CDF order
            a, b = row + s, row + s + len(p)
            modes[a:b] = i.gather(1, order).to(torch.int32).cpu()
            probs[a:b] = v.gather(1, order).float().cpu()
            residual[a:b] = (1.0 - v.double().sum(1)).clamp_min(0.0).cpu()
        row += len(x)
        if progress is not None:
            progress(len(x))
    if row != num_rows:
        raise ValueError(f"posteriors: got {row} rows, expected {num_rows}")
    return PosteriorTable(modes, probs), residual
