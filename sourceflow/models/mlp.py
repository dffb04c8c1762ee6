"""Residual MLP velocity field for 2-D toy data, by default the C2OT harness's network
(``SimpleNet`` / ``ConditionalNet`` in its ``playground_utils.py``): h = Linear(x) + Linear(t) (+ Linear(c)),
then ``depth`` blocks h + Linear(GELU(Linear(h))) with hidden width ``expansion``·width, no
normalisation, then Linear(h) to the output. Width 128, depth 3, expansion 4: 396,034 parameters
unconditional."""

from __future__ import annotations

import torch
from torch import nn

from sourceflow.models.embed import CondEmbedding, CondSpec, TimeEmbedding

TIME_EMBEDS = ("linear", "sinusoidal")


class MLPBlock(nn.Module):
    def __init__(self, width: int, expansion: float):
        super().__init__()
        hidden = max(1, int(width * expansion))
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.net(h)


class LinearTime(nn.Module):
    """Linear(1, width) of the raw t ∈ [0, 1] (the harness's ``time_emb``)."""

    def __init__(self, width: int):
        super().__init__()
        self.proj = nn.Linear(1, width)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.proj(t.float().reshape(-1, 1))


class MLPVelocity(nn.Module):
    """v(x, t, c): input projection + time embedding (+ condition embedding), ``depth`` residual
    blocks, linear output. Works on any flat [B, D] data.

    ``time_embed``: ``linear`` (the harness: Linear(1, width) of t) or ``sinusoidal`` (DiT-style
    sinusoidal features + 2-layer MLP, :class:`TimeEmbedding`). A continuous condition goes through
    Linear(size, width) as in the harness; discrete ids (class / mode) use an embedding table with a
    null row for CFG, where the harness feeds the class as ±1 through its Linear(1, width) (same
    capacity for two classes, and the table also serves modes and guidance); text uses
    :class:`CondEmbedding`'s pooled MLP.
    """

    def __init__(self, dim: int = 2, width: int = 128, depth: int = 3, expansion: float = 4.0,
                 cond: CondSpec | None = None, time_embed: str = "linear"):
        super().__init__()
        if time_embed not in TIME_EMBEDS:
            raise ValueError(f"time_embed must be one of {'|'.join(TIME_EMBEDS)}, got {time_embed!r}")
        self.dim = dim
        cond = cond or CondSpec()
        self.cond_spec = cond
        self.inp = nn.Linear(dim, width)
        self.time = LinearTime(width) if time_embed == "linear" else TimeEmbedding(width)
        self.cond: nn.Module = nn.Linear(cond.size, width) if cond.kind == "continuous" else CondEmbedding(cond, width)
        self.blocks = nn.ModuleList([MLPBlock(width, expansion) for _ in range(depth)])
        self.out = nn.Linear(width, dim)

    def _embed_cond(self, cond: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor | None:
        if self.cond_spec.kind != "continuous":
            return self.cond(cond, batch, device)
        if cond is None:
            raise ValueError("model expects a continuous condition, got None")
        return self.cond(cond.float().reshape(batch, -1).to(device))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        h = self.inp(x.reshape(shape[0], -1)) + self.time(t)
        c = self._embed_cond(cond, shape[0], x.device)
        if c is not None:
            h = h + c
        for block in self.blocks:
            h = block(h)
        return self.out(h).reshape(shape)


class ConditionMLP(nn.Module):
    """Maps a condition to a flat vector (CSFM's source network for toy data: μ and log σ²).

    The mean outputs start at zero; the last ``logvar_dims`` outputs (log σ²) start as CSFM's log-variance
    head: weights N(0, 1e-4²), bias ``init_logvar`` (1.0), so the initial source is N(0, e·I).
    """

    def __init__(self, cond: CondSpec, out_dim: int, width: int = 128, depth: int = 2, logvar_dims: int = 0,
                 init_logvar: float = 1.0):
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
        if logvar_dims:
            with torch.no_grad():
                nn.init.normal_(self.head.weight[out_dim - logvar_dims:], std=1e-4)
                self.head.bias[out_dim - logvar_dims:] = init_logvar

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        h = self.embed(cond, cond.shape[0], self.head.weight.device)
        return self.head(self.body(h))
