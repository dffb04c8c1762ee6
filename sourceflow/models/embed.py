"""Time and condition embeddings shared by every velocity model and learned source network."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class CondSpec:
    """What a model is conditioned on: ``none``; ``discrete`` ids in [0, size) (class or mode; id
    ``size`` is the null id used for classifier-free guidance); or ``continuous`` vectors of ``size``."""

    kind: str = "none"
    size: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("none", "discrete", "continuous"):
            raise ValueError(f"condition kind must be none|discrete|continuous, got {self.kind!r}")
        if self.kind != "none" and self.size < 1:
            raise ValueError(f"a {self.kind} condition needs size >= 1, got {self.size}")

    @property
    def null_id(self) -> int:
        return self.size


class TimeEmbedding(nn.Module):
    """Sinusoidal features of t ∈ [0, 1] followed by a two-layer MLP (as in DiT's TimestepEmbedder)."""

    def __init__(self, width: int, freqs: int = 64, max_period: float = 1000.0):
        super().__init__()
        half = freqs // 2
        self.register_buffer("freqs", torch.exp(-math.log(max_period) * torch.arange(half) / half), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * half, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = (t.float() * 1000.0)[:, None] * self.freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=1))


class CondEmbedding(nn.Module):
    """Embeds a condition: a table (with a null row) for discrete ids, a linear map for vectors."""

    def __init__(self, spec: CondSpec, width: int):
        super().__init__()
        self.spec = spec
        if spec.kind == "discrete":
            self.table = nn.Embedding(spec.size + 1, width)
        elif spec.kind == "continuous":
            self.proj = nn.Sequential(nn.Linear(spec.size, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, cond: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor | None:
        if self.spec.kind == "none":
            return None
        if cond is None:
            raise ValueError(f"model expects a {self.spec.kind} condition, got None")
        if self.spec.kind == "discrete":
            return self.table(cond.long().to(device))
        return self.proj(cond.float().reshape(batch, -1).to(device))
