"""Reflow (rectified flow, Liu et al. 2023; shipped by LOOM-CFM and CSFM): draw (x0, x1) pairs from a
trained flow by integrating its ODE from source draws, so that a second training run on exactly those
pairs (independent of any other pairing) learns straighter paths and better few-step samples.

The conditions the pairs are generated with follow the training data: each pair takes the condition of a
training row from a seeded shuffle (toy: the train split; images: the unflipped images, as the sampler
does), and keeps it, so the reflow model is trained on (x0, x1, c) triples the base produced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from sourceflow.flow.method import Method
from sourceflow.sampling import generate


@dataclass
class ReflowPairs:
    x0: torch.Tensor  # [N, ...] source draws
    x1: torch.Tensor  # [N, ...] where the base flow carried them
    cond: torch.Tensor | None  # [N, ...] the data condition each pair was generated with
    mode: torch.Tensor | None  # [N] GMM mode of x0 (mixture sources)
    nfe: int
    seconds: float


def condition_rows(data: Any, n: int, seed: int) -> np.ndarray:
    """``n`` training rows whose conditions the pairs use: a seeded shuffle, repeated as needed."""
    if hasattr(data, "condition_rows"):  # image latents: unflipped images, as the sampler
        return data.condition_rows(n, seed)
    g = np.random.default_rng(seed)
    reps = -(-n // len(data))
    return np.concatenate([g.permutation(len(data)) for _ in range(reps)])[:n]


def generate_pairs(model: nn.Module, method: Method, data: Any, cond_kind: str, n: int, solver: str,
                   steps: int | None, seed: int, batch_size: int = 5000, sample: dict[str, Any] | None = None
                   ) -> ReflowPairs:
    """Integrate the trained ``model`` from ``n`` source draws; ``sample`` supplies the base experiment's
    solver settings (shift, t_end, rtol, atol). No guidance: the pairs are the plain flow's."""
    s = sample or {}
    cond = None
    if method.cond_from == "data":
        rows = torch.from_numpy(condition_rows(data, n, seed))
        cond = data.condition(cond_kind)[rows]
    g = torch.Generator().manual_seed(seed)
    out = generate(model, method, n, cond, solver, steps, g, batch_size=batch_size, shift=s.get("shift", 1.0),
                   rtol=s.get("rtol", 1e-4), atol=s.get("atol", 1e-4), t_end=s.get("t_end", 1.0))
    mode = None if out.mode is None else torch.from_numpy(out.mode)
    return ReflowPairs(torch.from_numpy(out.x0), torch.from_numpy(out.x), cond, mode, out.nfe, out.seconds)
