"""Time and condition embeddings shared by every velocity model and learned source network."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

COND_KINDS = ("none", "discrete", "continuous", "text")


@dataclass(frozen=True)
class CondSpec:
    """What a model is conditioned on: ``none``; ``discrete`` ids in [0, size) (class or mode; id
    ``size`` is the null id used for classifier-free guidance); ``continuous`` vectors of ``size``; or
    ``text``: ``length`` token embeddings of width ``size`` with a padding mask, packed into one
    tensor by :func:`pack_text` so batches, gathers and indexing treat it like any other condition."""

    kind: str = "none"
    size: int = 0
    length: int = 0

    def __post_init__(self) -> None:
        if self.kind not in COND_KINDS:
            raise ValueError(f"condition kind must be one of {'|'.join(COND_KINDS)}, got {self.kind!r}")
        if self.kind != "none" and self.size < 1:
            raise ValueError(f"a {self.kind} condition needs size >= 1, got {self.size}")
        if self.kind == "text" and self.length < 1:
            raise ValueError(f"a text condition needs length >= 1, got {self.length}")

    @property
    def null_id(self) -> int:
        return self.size


def pack_text(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token embeddings [B, L, E] and mask [B, L] (1 = real token) as one float tensor [B, L, E + 1].

    One tensor rather than a pair: the data batch, ``accelerate.gather``, sample repetition and row
    selection then need no special case for text.
    """
    if tokens.shape[:2] != mask.shape:
        raise ValueError(f"text tokens {tuple(tokens.shape)} and mask {tuple(mask.shape)} disagree")
    return torch.cat([tokens.float(), mask.to(torch.float32)[..., None]], dim=-1)


def unpack_text(cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_text`: (tokens [B, L, E], bool mask [B, L])."""
    return cond[..., :-1], cond[..., -1] > 0.5


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the real tokens of each row ([B, L, E], [B, L] -> [B, E]); all-padding rows give 0."""
    m = mask.to(tokens.dtype)[..., None]
    return (tokens * m).sum(1) / m.sum(1).clamp_min(1.0)


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
    """Embeds a condition to one vector per sample: a table (with a null row) for discrete ids, an MLP
    for continuous vectors, an MLP of the masked mean of the tokens for text (the pooled form; models
    that attend to the tokens use :func:`unpack_text` themselves)."""

    def __init__(self, spec: CondSpec, width: int):
        super().__init__()
        self.spec = spec
        if spec.kind == "discrete":
            self.table = nn.Embedding(spec.size + 1, width)
        elif spec.kind in ("continuous", "text"):
            self.proj = nn.Sequential(nn.Linear(spec.size, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, cond: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor | None:
        if self.spec.kind == "none":
            return None
        if cond is None:
            raise ValueError(f"model expects a {self.spec.kind} condition, got None")
        if self.spec.kind == "discrete":
            return self.table(cond.long().to(device))
        if self.spec.kind == "text":
            tokens, mask = unpack_text(cond.to(device))
            return self.proj(masked_mean(tokens.float(), mask))
        return self.proj(cond.float().reshape(batch, -1).to(device))
