"""DiT / DiT^DH / U-Net velocity models: sizes, the forward contract for every condition kind,
DiT's zero initialisation, text padding masks, and that a few optimiser steps fit one batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sourceflow.models.dit import (
    DIT_DH_HEADS,
    DIT_SIZES,
    DiT,
    DiTDH,
    build_dit,
    count_parameters,
    parse_dit_dh_name,
    parse_dit_name,
)
from sourceflow.models.embed import CondSpec, pack_text
from sourceflow.models.unet import UNetVelocity

# (spec, text_mode) for every condition kind; text twice: cross-attention and pooled only.
CONDS = {
    "none": (CondSpec(), "cross"),
    "discrete": (CondSpec("discrete", 5), "cross"),
    "continuous": (CondSpec("continuous", 6), "cross"),
    "text-cross": (CondSpec("text", 8, length=5), "cross"),
    "text-pooled": (CondSpec("text", 8, length=5), "pooled"),
}
SHAPES = [(3, 8), (4, 16)]  # (channels, H=W), patch 2 for the transformers


def make_cond(spec: CondSpec, b: int, gen: torch.Generator) -> torch.Tensor | None:
    """A batch of conditions; discrete includes the null id, text includes an all-padding caption."""
    if spec.kind == "none":
        return None
    if spec.kind == "discrete":
        ids = torch.randint(0, spec.size, (b,), generator=gen)
        ids[-1] = spec.null_id
        return ids
    if spec.kind == "continuous":
        return torch.randn(b, spec.size, generator=gen)
    tokens = torch.randn(b, spec.length, spec.size, generator=gen)
    lengths = torch.arange(b) % (spec.length + 1)  # 0 (empty caption) .. length real tokens
    mask = torch.arange(spec.length)[None] < lengths[:, None]
    return pack_text(tokens, mask)


def tiny(family: str, channels: int, size: int, spec: CondSpec, text_mode: str) -> nn.Module:
    if family == "DiT":
        return build_dit("DiT-XT/2", size, channels, spec, text_mode=text_mode)
    if family == "DiTDH":
        return build_dit("DiTDH-XT/2", size, channels, spec, text_mode=text_mode)
    return UNetVelocity(size, channels, spec, block_out_channels=(16, 32), attention_head_dim=8)


def perturb_zeros(model: nn.Module, seed: int = 0) -> None:
    """Give the zero-initialised layers (adaLN, outputs) random values so every path is live."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


# ---------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("size,paper", [("S", 33e6), ("B", 130e6), ("L", 458e6), ("XL", 675e6)])
def test_dit_parameter_counts_match_the_paper(size, paper):
    with torch.device("meta"):  # no memory, no init cost
        model = build_dit(f"DiT-{size}/2", 32, 4, CondSpec("discrete", 1000), out_channels=8)
    assert abs(count_parameters(model) / paper - 1) < 0.01


def test_dit_dh_xl_default_head_matches_rae():
    config, head, patch = parse_dit_dh_name("DiTDH-XL/1")
    assert (config, patch) == (DIT_SIZES["XL"], 1)
    assert (head.depth, head.width) == (2, 2048)
    with torch.device("meta"):
        model = build_dit("DiTDH-XL/1", 16, 768, CondSpec("discrete", 1000))
    assert isinstance(model, DiTDH) and len(model.head_blocks) == 2
    assert abs(count_parameters(model) / 839e6 - 1) < 0.01  # RAE reports 839M for DiT^DH-XL
    assert count_parameters(model) == 837_966_592
    with torch.device("meta"):  # MM-FM's main model: 8192 mode classes (+ the null row)
        model = build_dit("DiTDH-XL/1", 16, 768, CondSpec("discrete", 8192))
    assert count_parameters(model) == 846_251_776  # DESIGN.md: 846.25M


def test_dit_dh_s_is_mmfm_autoguidance_guide():
    """MM-FM's guide DiT-DH-S: hidden [384, 2048], depth [12, 2], heads [6, 16]."""
    config, head, patch = parse_dit_dh_name("DiTDH-S/1")
    assert (config.width, config.depth, config.heads) == (384, 12, 6)
    assert (head.width, head.depth, head.heads) == (2048, 2, 16)
    with torch.device("meta"):
        model = build_dit("DiTDH-S/1", 16, 768, CondSpec("discrete", 8192))
    assert model.head_config == head and len(model.head_blocks) == 2
    assert {b.attn.heads for b in model.head_blocks} == {16}
    assert count_parameters(model) == 198_993_664


def test_celebahq_latent_dit_is_the_seeds_38_75m():
    """The SD-VAE latent DiT (CelebA-HQ 256): patch 2, width 512, 8 blocks, 16 heads = 38.75M parameters
    at 32x32x4, unconditional; ours with fixed sin-cos positions and adaLN-Zero: 38,746,640."""
    config, patch = parse_dit_name("DiT-M/2")
    assert (config.width, config.depth, config.heads, patch) == (512, 8, 16, 2)
    with torch.device("meta"):
        model = build_dit("DiT-M/2", 32, 4, CondSpec())
    assert abs(count_parameters(model) / 38.75e6 - 1) < 0.01
    assert count_parameters(model) == 38_746_640


def test_cifar10_cfg_dit_is_dit_b():
    """The minimal CIFAR-10 DiT with CFG (768 wide, 12 layers, 12 heads) is DiT-B; at 3x32x32, patch 2, 10
    classes it has 129.5M parameters, not the ~50M its description says (12 blocks of 10.6M each)."""
    config, _ = parse_dit_name("DiT-B/2")
    assert (config.width, config.depth, config.heads) == (768, 12, 12)
    with torch.device("meta"):
        model = build_dit("DiT-B/2", 32, 3, CondSpec("discrete", 10))
    assert count_parameters(model) == 129_537_036
    assert count_parameters(model.backbone.blocks[0]) == 10_628_352


def test_schema_size_pattern_matches_the_tables():
    """The config schema's model.size pattern admits exactly the sizes of the two tables."""
    import re
    from pathlib import Path

    import yaml

    schema = yaml.safe_load((Path(__file__).resolve().parents[2] / "workflow/schemas/config.schema.yaml").read_text())
    pattern = re.compile(schema["$defs"]["model"]["properties"]["size"]["pattern"])
    for size in ("XT", "T", "S", "M", "B", "L", "XL", "Q"):
        assert bool(pattern.match(f"DiT-{size}/2")) == (size in DIT_SIZES)
        assert bool(pattern.match(f"DiTDH-{size}/1")) == (size in DIT_DH_HEADS)
    with pytest.raises(ValueError, match="DiTDH"):
        build_dit("DiTDH-M/1", 8, 3, CondSpec())  # M has no default head


def test_name_parsing():
    assert parse_dit_name("DiT-S/2") == (DIT_SIZES["S"], 2)
    assert parse_dit_name("S/2") == (DIT_SIZES["S"], 2)
    assert parse_dit_name("XL/4") == (DIT_SIZES["XL"], 4)
    assert parse_dit_dh_name("S/1") == (DIT_SIZES["S"], DIT_DH_HEADS["S"], 1)
    for bad in ("DiT-Q/2", "DiT-S", "DiTDH-S/2", "DiT-S/0", "UNet-S/2"):
        with pytest.raises(ValueError, match="DiT"):
            parse_dit_name(bad)
    with pytest.raises(ValueError, match="unknown model name"):
        build_dit("S/2", 8, 3, CondSpec())
    assert isinstance(build_dit("DiT-XT/2", 8, 3, CondSpec()), DiT)
    model = build_dit("DiTDH-XT/2", 8, 3, CondSpec(), head_width=64)
    assert model.head_config.width == 64 and model.head_config.depth == DIT_DH_HEADS["XT"].depth


def test_bad_patch_or_size_raises():
    with pytest.raises(ValueError, match=r"10.*10.*4"):
        DiT(10, 3, 4, DIT_SIZES["XT"])
    with pytest.raises(ValueError, match=r"12.*16.*8"):
        build_dit("DiTDH-XT/8", (12, 16), 3, CondSpec())
    model = build_dit("DiT-XT/2", 8, 3, CondSpec())
    with pytest.raises(ValueError, match="differs"):
        model(torch.zeros(1, 3, 10, 10), torch.zeros(1))
    with pytest.raises(ValueError, match="text_mode"):
        build_dit("DiT-XT/2", 8, 3, CondSpec("text", 4, 3), text_mode="concat")
    with pytest.raises(ValueError, match="divisible"):
        UNetVelocity(9, 3, block_out_channels=(16, 32))


# ---------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("family", ["DiT", "DiTDH", "UNet"])
@pytest.mark.parametrize("channels,size", SHAPES)
@pytest.mark.parametrize("case", list(CONDS))
def test_forward_shape_for_every_condition(family, channels, size, case):
    spec, text_mode = CONDS[case]
    gen = torch.Generator().manual_seed(0)
    model = tiny(family, channels, size, spec, text_mode)
    perturb_zeros(model)
    b = 6
    x = torch.randn(b, channels, size, size, generator=gen)
    t = torch.rand(b, generator=gen)
    v = model(x, t, make_cond(spec, b, gen))
    assert v.shape == x.shape and v.dtype == x.dtype
    assert torch.isfinite(v).all()
    if spec.kind != "none":  # the condition reaches the output
        assert not torch.allclose(model(x, t, make_cond(spec, b, gen)), v)


@pytest.mark.parametrize("family", ["DiT", "DiTDH"])
def test_dit_starts_at_exactly_zero(family):
    spec = CondSpec("text", 8, length=5)
    model = tiny(family, 4, 16, spec, "cross")
    gen = torch.Generator().manual_seed(1)
    v = model(torch.randn(3, 4, 16, 16, generator=gen), torch.rand(3, generator=gen), make_cond(spec, 3, gen))
    assert torch.equal(v, torch.zeros_like(v))
    assert not model.backbone.patch_embed.pos.requires_grad


def test_out_channels():
    model = build_dit("DiT-XT/2", 8, 3, CondSpec(), out_channels=6)
    assert model(torch.zeros(2, 3, 8, 8), torch.zeros(2)).shape == (2, 6, 8, 8)


@pytest.mark.parametrize("family", ["DiT", "DiTDH"])
def test_text_cross_attention_ignores_padding(family):
    spec = CondSpec("text", 8, length=5)
    model = tiny(family, 3, 8, spec, "cross").eval()
    perturb_zeros(model)
    gen = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 3, 8, 8, generator=gen), torch.rand(2, generator=gen)
    tokens = torch.randn(2, 5, 8, generator=gen)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    with torch.no_grad():
        v = model(x, t, pack_text(tokens, mask))
        padded = tokens.clone()
        padded[~mask] = 100 * torch.randn(int((~mask).sum()), 8, generator=gen)
        assert torch.allclose(model(x, t, pack_text(padded, mask)), v, atol=1e-6, rtol=0)
        real = tokens.clone()
        real[0, 1] += 1.0
        changed = model(x, t, pack_text(real, mask))
    assert not torch.allclose(changed[0], v[0], atol=1e-4)
    torch.testing.assert_close(changed[1], v[1], atol=1e-6, rtol=0)  # rows do not mix


def test_null_id_has_its_own_row():
    spec = CondSpec("discrete", 5)
    dit = tiny("DiT", 3, 8, spec, "cross")
    assert dit.backbone.cond.table.num_embeddings == spec.size + 1
    unet = tiny("UNet", 3, 8, spec, "cross")
    assert unet.unet.class_embedding.num_embeddings == spec.size + 1
    perturb_zeros(dit)
    x, t = torch.randn(2, 3, 8, 8), torch.full((2,), 0.5)
    for model in (dit, unet):
        v_null = model(x, t, torch.full((2,), spec.null_id))
        v_zero = model(x, t, torch.zeros(2, dtype=torch.long))
        assert torch.isfinite(v_null).all() and not torch.allclose(v_null, v_zero)


# ---------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("family,case", [("DiT", "discrete"), ("DiT", "text-cross"), ("DiTDH", "continuous"),
                                         ("UNet", "discrete"), ("UNet", "text-pooled")])
def test_a_few_adam_steps_fit_one_batch(family, case):
    spec, text_mode = CONDS[case]
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    model = tiny(family, 3, 8, spec, text_mode)
    b = 8
    x1 = torch.randn(b, 3, 8, 8, generator=gen)
    x0 = torch.randn(b, 3, 8, 8, generator=gen)
    t = torch.rand(b, generator=gen)
    cond = make_cond(spec, b, gen)
    xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * x1
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(20):
        loss = (model(xt, t, cond) - (x1 - x0)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
