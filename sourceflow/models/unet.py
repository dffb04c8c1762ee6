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
    """v(x, t, c) by a diffusers U-Net with ``len(block_out_channels)`` resolutions, attention (and the
    mid block's attention) at the lowest one only.

    GroupNorm groups are the largest divisor of 32 shared by all widths, so small widths work.
    """

    def __init__(self, sample_size: int, in_channels: int, cond: CondSpec | None = None,
                 block_out_channels: tuple[int, ...] = (64, 128), layers_per_block: int = 1,
                 out_channels: int | None = None, attention_head_dim: int = 32):
        super().__init__()
        cond = cond or CondSpec()
        self.cond_spec = cond
        channels = tuple(int(c) for c in block_out_channels)
        levels = len(channels)
        if sample_size % 2 ** (levels - 1):
            raise ValueError(f"sample size {sample_size} must be divisible by 2^{levels - 1} "
                             f"for {levels} resolutions")
        if channels[-1] % attention_head_dim:
            raise ValueError(f"attention_head_dim {attention_head_dim} must divide the lowest-resolution "
                             f"width {channels[-1]}")
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
            down_block_types=("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D",),
            up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1),
            block_out_channels=channels,
            layers_per_block=layers_per_block,
            norm_num_groups=math.gcd(32, *channels),
            attention_head_dim=attention_head_dim,
            time_embedding_dim=time_width,
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
