"""A convolutional U-Net velocity model: diffusers' ``UNet2DModel`` behind the velocity contract
``(x [B, C, H, W], t [B] in [0, 1], cond) -> v [B, C, H, W]`` (t=0 source, t=1 data).

The UNet sees timestep 1000·t. Discrete conditions (class or mode ids, id ``size`` = null) use its own
class table (``num_class_embeds = size + 1``); continuous and pooled text conditions are embedded by our
:class:`CondEmbedding` to the UNet's time-embedding width and handed over as ``class_labels`` with
``class_embed_type="identity"`` (the UNet adds them to its time embedding).
"""

from __future__ import annotations

import math

import torch
from diffusers import UNet2DModel
from torch import nn

from sourceflow.models.embed import CondEmbedding, CondSpec


class UNetVelocity(nn.Module):
    """v(x, t, c) by a diffusers U-Net with ``len(block_out_channels)`` resolutions (level i at
    ``sample_size / 2^i``), self-attention in the down and up blocks of the levels whose side is in
    ``attention_resolutions`` (None: the lowest level only), plus the mid block's attention (always, as in
    DDPM's U-Net). ``dropout`` is the resnets' dropout (DDPM / LOOM on CIFAR-10: 0.1).

    GroupNorm groups are the largest divisor of 32 shared by all widths, so small widths work.
    """

    def __init__(self, sample_size: int, in_channels: int, cond: CondSpec | None = None,
                 block_out_channels: tuple[int, ...] = (64, 128), layers_per_block: int = 1,
                 out_channels: int | None = None, attention_head_dim: int = 32,
                 attention_resolutions: tuple[int, ...] | None = None, dropout: float = 0.0):
        super().__init__()
        cond = cond or CondSpec()
        self.cond_spec = cond
        channels = tuple(int(c) for c in block_out_channels)
        levels = len(channels)
        if sample_size % 2 ** (levels - 1):
            raise ValueError(f"sample size {sample_size} must be divisible by 2^{levels - 1} "
                             f"for {levels} resolutions")
        sides = [sample_size // 2**i for i in range(levels)]
        wanted = {sides[-1]} if attention_resolutions is None else {int(r) for r in attention_resolutions}
        if not wanted <= set(sides):
            raise ValueError(f"attention_resolutions {sorted(wanted - set(sides))} are not levels of this U-Net "
                             f"(sides {sides} for sample size {sample_size})")
        attn = [side in wanted for side in sides]
        self.attention_resolutions = tuple(side for side in sides if side in wanted)
        for level in [*(i for i in range(levels) if attn[i]), levels - 1]:  # the mid block runs at the lowest
            if channels[level] % attention_head_dim:
                raise ValueError(f"attention_head_dim {attention_head_dim} must divide the width {channels[level]} "
                                 f"of every level with attention (level {level}, side {sides[level]})")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        time_width = 4 * channels[0]  # UNet2DModel's time_embed_dim
        kw: dict = {}
        self.cond_embed: CondEmbedding | None = None
        if cond.kind == "discrete":
            kw["num_class_embeds"] = cond.size + 1  # + the null id
        elif cond.kind in ("continuous", "text"):
            kw["class_embed_type"] = "identity"
            self.cond_embed = CondEmbedding(cond, time_width)
        self.unet = UNet2DModel(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=out_channels or in_channels,
            # down block i and up block levels-1-i run at level i's side
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
            block_out_channels=channels,
            layers_per_block=layers_per_block,
            norm_num_groups=math.gcd(32, *channels),
            attention_head_dim=attention_head_dim,
            time_embedding_dim=time_width,
            dropout=dropout,
            **kw,
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        b = x.shape[0]
        timestep = 1000.0 * torch.as_tensor(t, device=x.device).float().reshape(-1).expand(b)
        labels = None
        if self.cond_spec.kind == "discrete":
            if cond is None:
                raise ValueError("model expects a discrete condition, got None")
            labels = cond.long().to(x.device)
        elif self.cond_embed is not None:
            labels = self.cond_embed(cond, b, x.device)
        return self.unet(x, timestep, class_labels=labels).sample
