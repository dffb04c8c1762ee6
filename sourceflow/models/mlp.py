"""Residual MLP velocity field for 2-D toy data (the C2OT harness: width 128, depth 3, blocks
Linear–GELU–Linear with a skip, no normalisation)."""

from __future__ import annotations

import torch
from torch import nn

from sourceflow.models.embed import CondEmbedding, CondSpec, TimeEmbedding


class MLPBlock(nn.Module):
    def __init__(self, width: int, expansion: float):
        super().__init__()
        hidden = max(1, int(width * expansion))
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.net(h)


class MLPVelocity(nn.Module):
    """v(x, t, c): input projection + time embedding (+ condition embedding), ``depth`` residual
    blocks, linear output. Works on any flat [B, D] data."""

    def __init__(self, dim: int = 2, width: int = 128, depth: int = 3, expansion: float = 4.0,
                 cond: CondSpec | None = None):
        super().__init__()
        self.dim = dim
        cond = cond or CondSpec()
        self.cond_spec = cond
        self.inp = nn.Linear(dim, width)
        self.time = TimeEmbedding(width)
        self.cond = CondEmbedding(cond, width)
        self.blocks = nn.ModuleList([MLPBlock(width, expansion) for _ in range(depth)])
        self.out = nn.Linear(width, dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        h = self.inp(x.reshape(shape[0], -1)) + self.time(t)
        c = self.cond(cond, shape[0], x.device)
        if c is not None:
            h = h + c
        for block in self.blocks:
            h = block(h)
        return self.out(h).reshape(shape)


class ConditionMLP(nn.Module):
    """Maps a condition to a flat vector (CSFM's source network for toy data: μ and log σ²).

    The output layer starts at zero, so the initial source is N(0, I) whatever the condition.
    """

    def __init__(self, cond: CondSpec, out_dim: int, width: int = 128, depth: int = 2):
        super().__init__()
        if cond.kind == "none":
            raise ValueError("a condition network needs a condition")
        self.embed = CondEmbedding(cond, width)
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.SiLU(), nn.Linear(width, width)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, out_dim)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        h = self.embed(cond, cond.shape[0], self.head.weight.device)
        return self.head(self.body(h))
