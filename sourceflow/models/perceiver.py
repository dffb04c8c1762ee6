"""Perceiver source network for CSFM: a condition -> mean and log-variance of a Gaussian over a latent.

CSFM's source net is a Perceiver with one learned query per latent token (256 queries for a 16×16
latent, plus learned 2-D positions), 8 layers of cross-attention to the CLIP text tokens (77×768, with
the padding mask) followed by self-attention and a SwiGLU FFN, RMSNorm, width 768, 12 heads, and a
mean head (+ the paper's optional log-variance head) whose per-token outputs are reshaped to the
latent. This module follows that shape; sizes are arguments (CSFM: ``width=768, depth=8, heads=12``).

Output contract with :class:`sourceflow.flow.sources.LearnedSource`: ``net(cond)`` is a flat
[B, 2·D] tensor (mean flattened in C, H, W order, then the log-variance flattened the same way) when
``learn_var``, else [B, D]; D = C·H·W.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from sourceflow.models.dit import CrossAttention, sincos_2d, unpatchify
from sourceflow.models.embed import CondSpec, unpack_text

MEAN_INIT_STD = 0.02  # the mean head's initial weights (ViT-style head init)
LOGVAR_INIT_STD = 1e-4  # CSFM's log-variance head: weights N(0, 1e-4²), bias init_logvar
INIT_LOGVAR = 1.0


class SwiGLU(nn.Module):
    """SwiGLU feed-forward: W2(SiLU(W1 x) * W3 x), hidden = 2/3 of ``mlp_ratio``·width (LLaMA's sizing)."""

    def __init__(self, width: int, mlp_ratio: float):
        super().__init__()
        hidden = max(1, int(2 * width * mlp_ratio / 3))
        self.w12 = nn.Linear(width, 2 * hidden)
        self.w3 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class PerceiverLayer(nn.Module):
    """Pre-norm (RMSNorm) residual block: cross-attention queries -> context, self-attention, SwiGLU FFN."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm_q = nn.RMSNorm(width)
        self.norm_kv = nn.RMSNorm(width)
        self.cross = CrossAttention(width, heads)
        self.norm_self = nn.RMSNorm(width)
        self.self_attn = CrossAttention(width, heads)
        self.norm_mlp = nn.RMSNorm(width)
        self.mlp = SwiGLU(width, mlp_ratio)

    def forward(self, h: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = h + self.cross(self.norm_q(h), self.norm_kv(context), mask)
        s = self.norm_self(h)
        h = h + self.self_attn(s, s)
        return h + self.mlp(self.norm_mlp(h))


class PerceiverSource(nn.Module):
    """CSFM source network: learned latent-token queries attend to the condition tokens.

    Tokens are the (H/p)·(W/p) patches of the (C, H, W) latent (``patch=1``: every position, CSFM's
    16×16 case). Each has a learned query plus a learned 2-D position (initialised to the sin-cos code).
    After ``depth`` layers (see :class:`PerceiverLayer`) and a final RMSNorm, ``Linear(width, C·p·p)`` heads give each
    token's mean (and log-variance) patch, unpatchified back to (C, H, W) by :func:`unpatchify`.

    Conditions (the keys/values): ``text`` packed tokens [B, L, E+1] -> ``Linear(E, width)`` per real
    token, padding masked out (and zeroed, so even non-finite padding cannot leak); ``discrete`` ids [B]
    -> ``Embedding(size + 1, width)`` (row ``size`` = CFG null id), one token; ``continuous`` [B, size]
    -> ``Linear(size, width)``, one token. A learned null token is appended to every row's context and
    is always attendable, so an all-padding row (e.g. a dropped caption) attends only to it: a finite,
    condition-independent output instead of the NaN that a fully masked softmax gives.

    The mean head starts small (std ``MEAN_INIT_STD``, see the comment at the heads for why not exactly
    0); the log-variance head as CSFM's: weights N(0, 1e-4²) and bias ``init_logvar`` = 1, so the initial
    σ² ≈ e for every condition.
    """

    def __init__(self, cond: CondSpec, event_shape: tuple[int, int, int], patch: int = 1, width: int = 128,
                 depth: int = 2, heads: int = 4, mlp_ratio: float = 4.0, learn_var: bool = True):
        super().__init__()
        if cond.kind == "none":
            raise ValueError("a conditional source network needs a condition (got kind 'none')")
        if len(event_shape) != 3:
            raise ValueError(f"event_shape must be (C, H, W), got {tuple(event_shape)}")
        c, h, w = (int(s) for s in event_shape)
        if patch < 1 or h % patch or w % patch:
            raise ValueError(f"latent H={h}, W={w} must be divisible by patch={patch}")
        self.cond_spec = cond
        self.event_shape = (c, h, w)
        self.patch = patch
        self.learn_var = learn_var
        self.grid = (h // patch, w // patch)
        self.num_tokens = self.grid[0] * self.grid[1]

        if cond.kind == "text":
            self.embed: nn.Module = nn.Linear(cond.size, width)
        elif cond.kind == "discrete":
            self.embed = nn.Embedding(cond.size + 1, width)
        else:
            self.embed = nn.Linear(cond.size, width)
        self.null_token = nn.Parameter(torch.randn(width) * 0.02)
        self.queries = nn.Parameter(torch.randn(self.num_tokens, width) * 0.02)
        self.pos = nn.Parameter(sincos_2d(width, h // patch, w // patch).clone())
        self.layers = nn.ModuleList([PerceiverLayer(width, heads, mlp_ratio) for _ in range(depth)])
        self.norm_out = nn.RMSNorm(width)
        out = c * patch * patch
        self.mean_head = nn.Linear(width, out)
        self.logvar_head = nn.Linear(width, out) if learn_var else None
        # The mean head starts small and random, not at zero: CSFM's alignment loss normalises μ per token,
        # which is singular at μ = 0 (its first step would throw μ in a random direction). The
        # log-variance head starts as CSFM's (σ² ≈ e^init_logvar everywhere).
        nn.init.normal_(self.mean_head.weight, std=MEAN_INIT_STD)
        nn.init.zeros_(self.mean_head.bias)
        if self.logvar_head is not None:
            nn.init.normal_(self.logvar_head.weight, std=LOGVAR_INIT_STD)
            nn.init.constant_(self.logvar_head.bias, INIT_LOGVAR)

    def context(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Condition -> context tokens [B, M + 1, width] and key mask [B, M + 1] (last = null token)."""
        dev = self.queries.device
        spec = self.cond_spec
        if spec.kind == "text":
            if cond.dim() != 3 or cond.shape[-1] != spec.size + 1:
                raise ValueError(f"text condition must be packed [B, L, {spec.size + 1}], got {tuple(cond.shape)}")
            tokens, mask = unpack_text(cond.to(dev))
            tokens = tokens.float().masked_fill(~mask[..., None], 0.0)
            ctx = self.embed(tokens)
        elif spec.kind == "discrete":
            ctx = self.embed(cond.to(dev).long().reshape(-1))[:, None]
            mask = torch.ones(ctx.shape[:2], dtype=torch.bool, device=dev)
        else:
            ctx = self.embed(cond.to(dev).float().reshape(cond.shape[0], -1))[:, None]
            mask = torch.ones(ctx.shape[:2], dtype=torch.bool, device=dev)
        b = ctx.shape[0]
        ctx = torch.cat([ctx, self.null_token.expand(b, 1, -1)], dim=1)
        mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.bool, device=dev)], dim=1)
        return ctx, mask

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        """[B, 2·D] (mean then log-variance, each flattened C, H, W) or [B, D] without learned variance."""
        ctx, mask = self.context(cond)
        b = ctx.shape[0]
        h = (self.queries + self.pos).expand(b, -1, -1)
        for layer in self.layers:
            h = layer(h, ctx, mask)
        h = self.norm_out(h)
        parts = [unpatchify(self.mean_head(h), self.grid, self.patch, self.event_shape[0]).reshape(b, -1)]
        if self.logvar_head is not None:
            parts.append(unpatchify(self.logvar_head(h), self.grid, self.patch, self.event_shape[0]).reshape(b, -1))
        return torch.cat(parts, dim=1)
