"""Diffusion Transformers as velocity fields: DiT (Peebles & Xie, 2023) and DiT^DH, a DiT backbone with a
wide, shallow DDT head (RAE, Zheng et al. 2025; used by MM-FM).

Sizes are a table of configs. A model is named like DiT's: ``DiT-XL/2`` is the XL config with 2×2
patches, ``DiTDH-XL/1`` the XL backbone with its default head and 1×1 patches.

Every model maps ``(x [B, C, H, W], t [B] in [0, 1], cond) -> v [B, C', H, W]`` (t=0 source, t=1 data).
The condition (see :class:`CondSpec`) is embedded to one vector and added to the time embedding; that
vector ``c`` drives adaLN-Zero in every block. Text conditions can also be attended to: with
``text_mode="cross"`` every block has a cross-attention to the (projected) tokens, with their padding
mask, after its self-attention (as in PixArt-α).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sourceflow.models.embed import CondEmbedding, CondSpec, TimeEmbedding, unpack_text

TEXT_MODES = ("cross", "pooled")


@dataclass(frozen=True)
class DiTConfig:
    """Transformer shape: ``depth`` blocks of ``width`` channels, ``heads`` attention heads, an MLP of
    ``mlp_ratio·width`` hidden units."""

    depth: int
    width: int
    heads: int
    mlp_ratio: float = 4.0


# DiT's sizes (Table 1 of the paper), two tiny ones for CPU tests and toy runs, and M, the DiT of the
# "flow matching in SD-VAE latents" CelebA-HQ 256 system (patch 2, width 512, 8 blocks, 16 heads: 38.75M
# parameters at 32x32x4 unconditional; ours counts 38,746,640 with DiT's fixed sin-cos positions, adaLN-Zero
# in every block and an adaLN final layer). B (768 wide, 12 layers, 12 heads) is also the CIFAR-10 pixel DiT
# of the "minimal DiT with CFG" system: 129,537,036 parameters as DiT-B/2 on 3x32x32 with 10 classes.
DIT_SIZES: dict[str, DiTConfig] = {
    "XT": DiTConfig(depth=2, width=32, heads=2),
    "T": DiTConfig(depth=4, width=64, heads=4),
    "S": DiTConfig(depth=12, width=384, heads=6),
    "M": DiTConfig(depth=8, width=512, heads=16),
    "B": DiTConfig(depth=12, width=768, heads=12),
    "L": DiTConfig(depth=24, width=1024, heads=16),
    "XL": DiTConfig(depth=28, width=1152, heads=16),
}

# Default DDT heads per backbone size (sizes without one have no DiTDH variant). RAE's DiT^DH-XL is the XL
# backbone with a 2-layer, 2048-wide head (16 heads); MM-FM's autoguidance guide DiT-DH-S has the same head
# on the S backbone (hidden [384, 2048], depth [12, 2], heads [6, 16]). B and L are our choice; XT and T
# are tiny heads for CPU tests.
DIT_DH_HEADS: dict[str, DiTConfig] = {
    "XT": DiTConfig(depth=1, width=48, heads=2),
    "T": DiTConfig(depth=1, width=128, heads=4),
    "S": DiTConfig(depth=2, width=2048, heads=16),
    "B": DiTConfig(depth=2, width=1536, heads=16),
    "L": DiTConfig(depth=2, width=2048, heads=16),
    "XL": DiTConfig(depth=2, width=2048, heads=16),
}

_NAME = re.compile(r"^(?:(?P<family>DiT|DiTDH)-)?(?P<size>[A-Za-z]+)/(?P<patch>\d+)$")


def _parse(name: str, family: str, sizes: dict[str, DiTConfig]) -> tuple[str, int]:
    """``"{family}-S/2"`` or ``"S/2"`` -> ("S", 2); anything else is a ValueError naming the choices."""
    m = _NAME.match(name.strip())
    size = m["size"].upper() if m else ""
    if m is None or (m["family"] not in (None, family)) or size not in sizes or int(m["patch"]) < 1:
        raise ValueError(f"bad {family} name {name!r}: expected '{family}-<size>/<patch>' or '<size>/<patch>' "
                         f"with size in {'|'.join(sizes)}")
    return size, int(m["patch"])


def parse_dit_name(name: str) -> tuple[DiTConfig, int]:
    """``"DiT-S/2"`` (or ``"S/2"``) -> (DIT_SIZES["S"], 2)."""
    size, patch = _parse(name, "DiT", DIT_SIZES)
    return DIT_SIZES[size], patch


def parse_dit_dh_name(name: str) -> tuple[DiTConfig, DiTConfig, int]:
    """``"DiTDH-XL/1"`` (or ``"XL/1"``) -> (backbone config, default head config, patch)."""
    size, patch = _parse(name, "DiTDH", DIT_DH_HEADS)
    return DIT_SIZES[size], DIT_DH_HEADS[size], patch


# ---------------------------------------------------------------------------------------------- layers


def sincos_2d(width: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D sin-cos positional embedding [grid_h·grid_w, width] (as in MAE/DiT): the first half of
    the channels encodes the row, the second half the column."""
    if width % 4:
        raise ValueError(f"a 2-D sin-cos embedding needs width divisible by 4, got {width}")
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:
        args = pos[:, None] * omega[None]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)

    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                                torch.arange(grid_w, dtype=torch.float64), indexing="ij")
    return torch.cat([embed_1d(rows.flatten()), embed_1d(cols.flatten())], dim=1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x·(1 + scale) + shift; shift/scale are [B, 1, D] (one per sample) or [B, N, D] (per token)."""
    return x * (1 + scale) + shift


def _modulation(ada: nn.Module, c: torch.Tensor, chunks: int) -> tuple[torch.Tensor, ...]:
    """Shift/scale/gate tensors from c [B, D] (broadcast over tokens) or c [B, N, D] (per token)."""
    mod = ada(c)
    if mod.dim() == 2:
        mod = mod[:, None]
    return mod.chunk(chunks, dim=-1)


class SelfAttention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention`` (one fused qkv linear, as DiT)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class CrossAttention(nn.Module):
    """Multi-head attention from tokens to context tokens (the tokens themselves for self-attention) with
    an optional key padding mask (True = real).

    A row with no real token attends to nothing: its output is zero (SDPA alone would give NaN)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        hd = d // self.heads
        q = self.q(x).reshape(b, n, self.heads, hd).transpose(1, 2)
        k, v = self.kv(context).reshape(b, context.shape[1], 2, self.heads, hd).permute(2, 0, 3, 1, 4)
        if mask is None:
            return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))
        any_real = mask.any(dim=1)
        attn_mask = (mask | ~any_real[:, None])[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2).reshape(b, n, d)
        return self.proj(out * any_real[:, None, None].to(out.dtype))


class MLP(nn.Module):
    """Transformer feed-forward: Linear–GELU(tanh)–Linear, as DiT."""

    def __init__(self, width: int, hidden: int, out: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, out or width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """DiT block with adaLN-Zero: shift/scale/gate for attention and MLP from SiLU+Linear of c.

    ``c`` is [B, D] (DiT) or [B, N, D] (the DDT head: one modulation per token). With ``cross=True`` a
    cross-attention to context tokens sits between self-attention and MLP (un-gated; its output
    projection starts at zero, as in PixArt-α, so the block starts as the identity).
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, cross: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(width, heads)
        self.norm_cross = nn.LayerNorm(width, eps=1e-6) if cross else None
        self.cross = CrossAttention(width, heads) if cross else None
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(width, int(width * mlp_ratio))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = _modulation(self.ada, c, 6)
        x = x + gate_a * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        if self.cross is not None and context is not None:
            x = x + self.cross(self.norm_cross(x), context, mask)
        return x + gate_m * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    """adaLN (shift, scale; no gate) then a linear to p·p·C values per token."""

    def __init__(self, width: int, patch: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, patch * patch * out_channels)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = _modulation(self.ada, c, 2)
        return self.linear(modulate(self.norm(x), shift, scale))


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches -> tokens [B, N, width], plus a fixed sin-cos positional embedding
    (a non-persistent buffer: it is recomputed from the grid, never trained or saved)."""

    def __init__(self, size: tuple[int, int], in_channels: int, patch: int, width: int):
        super().__init__()
        h, w = size
        if h % patch or w % patch:
            raise ValueError(f"height {h} and width {w} must be divisible by the patch size {patch}")
        self.size, self.patch, self.grid = (h, w), patch, (h // patch, w // patch)
        self.proj = nn.Conv2d(in_channels, width, kernel_size=patch, stride=patch)
        self.register_buffer("pos", sincos_2d(width, *self.grid)[None], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.size:
            raise ValueError(f"input height×width {tuple(x.shape[-2:])} differs from the model's {self.size} "
                             f"(patch {self.patch})")
        return self.proj(x).flatten(2).transpose(1, 2) + self.pos.to(x.dtype)


def _size2(input_size: int | tuple[int, int]) -> tuple[int, int]:
    return (input_size, input_size) if isinstance(input_size, int) else (int(input_size[0]), int(input_size[1]))


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> tokens [B, (H/p)·(W/p), p·p·C]: token n = i·(W/p) + j holds patch (i, j) with its
    values laid out (p, p, C), i.e. ``x[b, c, i·p + u, j·p + v]`` sits at feature ``(u·p + v)·C + c``."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int], patch: int, channels: int) -> torch.Tensor:
    """Exact inverse of :func:`patchify`: [B, gh·gw, p·p·C] -> [B, C, gh·p, gw·p]."""
    b = tokens.shape[0]
    gh, gw = grid
    x = tokens.reshape(b, gh, gw, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, gh * patch, gw * patch)


# ---------------------------------------------------------------------------------------------- models


class DiTBackbone(nn.Module):
    """Patch embedding, time + condition embedding and the DiT blocks; returns the tokens and c.

    Shared by :class:`DiT` (which adds the final layer) and :class:`DiTDH` (which adds the DDT head).
    """

    def __init__(self, input_size: int | tuple[int, int], in_channels: int, patch: int, config: DiTConfig,
                 cond: CondSpec | None = None, text_mode: str = "cross"):
        super().__init__()
        cond = cond or CondSpec()
        if text_mode not in TEXT_MODES:
            raise ValueError(f"text_mode must be one of {'|'.join(TEXT_MODES)}, got {text_mode!r}")
        self.cond_spec, self.config = cond, config
        self.cross = cond.kind == "text" and text_mode == "cross"
        width = config.width
        self.patch_embed = PatchEmbed(_size2(input_size), in_channels, patch, width)
        self.time = TimeEmbedding(width, freqs=256)  # DiT's 256 frequencies
        self.cond = CondEmbedding(cond, width)
        # Text tokens for cross-attention: a two-layer MLP to the model width (PixArt's caption projection).
        self.context = MLP(cond.size, width, width) if self.cross else None
        self.blocks = nn.ModuleList([DiTBlock(width, config.heads, config.mlp_ratio, cross=self.cross)
                                     for _ in range(config.depth)])

    def embed_context(self, cond: torch.Tensor | None, device: torch.device
                      ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Projected text tokens [B, L, width] and their mask [B, L] (None, None without cross-attention)."""
        if not self.cross:
            return None, None
        if cond is None:
            raise ValueError("model expects a text condition, got None")
        spec = self.cond_spec
        if cond.dim() != 3 or cond.shape[-1] != spec.size + 1:
            raise ValueError(f"text condition must be packed [B, L, {spec.size + 1}] (pack_text), "
                             f"got {tuple(cond.shape)}")
        tokens, mask = unpack_text(cond.to(device))
        return self.context(tokens.float()), mask

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        b = x.shape[0]
        h = self.patch_embed(x)
        c = self.time(torch.as_tensor(t, device=x.device).reshape(-1).expand(b))
        e = self.cond(cond, b, x.device)
        if e is not None:
            c = c + e
        context, mask = self.embed_context(cond, x.device)
        for block in self.blocks:
            h = block(h, c, context, mask)
        return h, c


def _init_dit(model: nn.Module) -> None:
    """DiT's initialisation: xavier-uniform linears (patch convs as linears) with zero biases, N(0, 0.02)
    time MLP and label table, zero adaLN modulation and zero output layers, zero cross-attention output
    projections. The blocks start as the identity and the velocity as exactly 0."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, PatchEmbed):
            nn.init.xavier_uniform_(m.proj.weight.view(m.proj.weight.shape[0], -1))
            nn.init.zeros_(m.proj.bias)
    for m in model.modules():
        if isinstance(m, TimeEmbedding):
            nn.init.normal_(m.mlp[0].weight, std=0.02)
            nn.init.normal_(m.mlp[2].weight, std=0.02)
        elif isinstance(m, CondEmbedding) and hasattr(m, "table"):
            nn.init.normal_(m.table.weight, std=0.02)
        elif isinstance(m, DiTBlock | FinalLayer):
            nn.init.zeros_(m.ada[-1].weight)
            nn.init.zeros_(m.ada[-1].bias)
        elif isinstance(m, CrossAttention):
            nn.init.zeros_(m.proj.weight)
            nn.init.zeros_(m.proj.bias)
        if isinstance(m, FinalLayer):
            nn.init.zeros_(m.linear.weight)
            nn.init.zeros_(m.linear.bias)


class DiT(nn.Module):
    """DiT velocity model: patchify, DiT blocks with adaLN-Zero, final adaLN layer, unpatchify.

    ``out_channels`` defaults to ``in_channels`` (DiT's learn_sigma doubles it; a velocity needs C).
    ``text_mode``: ``"cross"`` attends to the text tokens in every block and adds their pooled vector
    to c; ``"pooled"`` uses the pooled vector only. It is ignored for other condition kinds.
    """

    def __init__(self, input_size: int | tuple[int, int], in_channels: int, patch: int, config: DiTConfig,
                 cond: CondSpec | None = None, out_channels: int | None = None, text_mode: str = "cross"):
        super().__init__()
        self.in_channels, self.patch = in_channels, patch
        self.out_channels = out_channels or in_channels
        self.backbone = DiTBackbone(input_size, in_channels, patch, config, cond, text_mode)
        self.final = FinalLayer(config.width, patch, self.out_channels)
        _init_dit(self)

    @property
    def cond_spec(self) -> CondSpec:
        return self.backbone.cond_spec

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        h, c = self.backbone(x, t, cond)
        return unpatchify(self.final(h, c), self.backbone.patch_embed.grid, self.patch, self.out_channels)


class DiTDH(nn.Module):
    """DiT^DH (RAE): a DiT backbone without final layer whose output tokens condition a wide, shallow
    DDT head.

    The head patch-embeds x_t again at ``head.width``; its per-token condition is
    s = Linear(SiLU(backbone token + c)) (RAE's ``s_projector(silu(t + s))``), which drives per-token
    adaLN-Zero in the head blocks and its final layer. ``head`` defaults to ``DIT_DH_HEADS`` of the
    backbone size when built by name; ``head_depth``/``head_width``/``head_heads`` override it.
    """

    def __init__(self, input_size: int | tuple[int, int], in_channels: int, patch: int, config: DiTConfig,
                 cond: CondSpec | None = None, out_channels: int | None = None, text_mode: str = "cross",
                 head: DiTConfig | None = None, head_depth: int | None = None, head_width: int | None = None,
                 head_heads: int | None = None):
        super().__init__()
        head = head or DiTConfig(depth=2, width=2048, heads=16, mlp_ratio=config.mlp_ratio)
        head = DiTConfig(depth=head_depth or head.depth, width=head_width or head.width,
                         heads=head_heads or head.heads, mlp_ratio=head.mlp_ratio)
        self.in_channels, self.patch, self.head_config = in_channels, patch, head
        self.out_channels = out_channels or in_channels
        self.backbone = DiTBackbone(input_size, in_channels, patch, config, cond, text_mode)
        self.head_embed = PatchEmbed(_size2(input_size), in_channels, patch, head.width)
        self.head_cond = nn.Linear(config.width, head.width)
        self.head_blocks = nn.ModuleList([DiTBlock(head.width, head.heads, head.mlp_ratio)
                                          for _ in range(head.depth)])
        self.final = FinalLayer(head.width, patch, self.out_channels)
        _init_dit(self)

    @property
    def cond_spec(self) -> CondSpec:
        return self.backbone.cond_spec

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        tokens, c = self.backbone(x, t, cond)
        s = self.head_cond(F.silu(tokens + c[:, None]))
        h = self.head_embed(x)
        for block in self.head_blocks:
            h = block(h, s)
        return unpatchify(self.final(h, s), self.head_embed.grid, self.patch, self.out_channels)


def build_dit(name: str, input_size: int | tuple[int, int], in_channels: int, cond: CondSpec | None = None,
              **kw) -> nn.Module:
    """A DiT or DiT^DH by name: ``"DiT-S/2"`` -> :class:`DiT`, ``"DiTDH-XL/1"`` -> :class:`DiTDH` with
    the size's default head; ``kw`` go to the constructor (out_channels, text_mode, head_width, …)."""
    if name.strip().startswith("DiTDH-"):
        config, head, patch = parse_dit_dh_name(name)
        return DiTDH(input_size, in_channels, patch, config, cond, head=kw.pop("head", head), **kw)
    if name.strip().startswith("DiT-"):
        config, patch = parse_dit_name(name)
        return DiT(input_size, in_channels, patch, config, cond, **kw)
    raise ValueError(f"unknown model name {name!r}: expected 'DiT-<size>/<patch>' with size in "
                     f"{'|'.join(DIT_SIZES)} or 'DiTDH-<size>/<patch>' with size in {'|'.join(DIT_DH_HEADS)}")


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (as DiT counts them: every ``nn.Parameter``)."""
    return sum(p.numel() for p in model.parameters())


__all__ = ["DIT_DH_HEADS", "DIT_SIZES", "DiT", "DiTConfig", "DiTDH", "build_dit", "count_parameters",
           "parse_dit_dh_name", "parse_dit_name"]
