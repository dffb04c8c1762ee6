"""The diffusers U-Net wrapper: attention only at the configured resolutions, resnet dropout, and LOOM's
CIFAR-10 U-Net built from config/cifar10-loom.yaml through build_model."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from snakemake.utils import validate

from sourceflow.build import build_model
from sourceflow.config import resolve_experiments
from sourceflow.models.dit import count_parameters
from sourceflow.models.unet import UNetVelocity

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"


def attention_sides(model: UNetVelocity, size: int, channels: int = 3) -> dict[str, int]:
    """Attention module name -> the side of the feature map it attends over, from one forward pass."""
    seen: dict[str, int] = {}

    def hook(name: str):
        def record(module, args, kwargs, out):
            seen[name] = int(args[0].shape[-1])
        return record

    handles = [m.register_forward_hook(hook(n), with_kwargs=True)
               for n, m in model.named_modules() if isinstance(m, Attention)]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, channels, size, size), torch.full((1,), 0.5))
    for h in handles:
        h.remove()
    return seen


def test_loom_cifar10_unet_from_the_config():
    """ch 128, mult (1, 2, 2, 2), 2 res blocks, attention at 16x16 (plus the mid block), dropout 0.1."""
    cfg = yaml.safe_load((ROOT / "config" / "cifar10-loom.yaml").read_text())
    validate(cfg, str(SCHEMA))
    specs = resolve_experiments(cfg)
    data = SimpleNamespace(event_shape=(3, 32, 32), num_classes=10)
    model = build_model(specs["loom"], data)
    assert isinstance(model, UNetVelocity) and model.attention_resolutions == (16,)
    assert count_parameters(model) == 35_746_307  # DDPM's CIFAR-10 U-Net: 35.7M

    sides = attention_sides(model, 32)
    mid = {n: s for n, s in sides.items() if n.startswith("unet.mid_block.")}
    levels = {n: s for n, s in sides.items() if n not in mid}
    assert set(mid.values()) == {4}
    assert set(levels.values()) == {16}
    # 2 per down block (one per resnet) and 3 per up block, at level 1 only
    assert sorted(n.rsplit(".", 2)[0] for n in levels) == ["unet.down_blocks.1"] * 2 + ["unet.up_blocks.2"] * 3
    resnets = [m for m in model.modules() if isinstance(m, ResnetBlock2D)]
    assert resnets and {m.dropout.p for m in resnets} == {0.1}
    assert all(build_model(s, data).attention_resolutions == (16,) for s in specs.values())


def test_default_attention_is_the_lowest_level_only_and_no_dropout():
    model = UNetVelocity(16, 3, block_out_channels=(16, 32, 32), attention_head_dim=8)
    assert model.attention_resolutions == (4,)
    assert set(attention_sides(model, 16).values()) == {4}
    assert {m.dropout.p for m in model.modules() if isinstance(m, ResnetBlock2D)} == {0.0}


def test_attention_at_several_levels():
    model = UNetVelocity(16, 3, block_out_channels=(16, 32, 32), attention_resolutions=(16, 8),
                         attention_head_dim=8)
    sides = attention_sides(model, 16)
    assert {s for n, s in sides.items() if "mid_block" not in n} == {16, 8}


def test_bad_attention_settings_raise():
    with pytest.raises(ValueError, match=r"attention_resolutions \[12\]"):
        UNetVelocity(16, 3, block_out_channels=(16, 32), attention_resolutions=(12,), attention_head_dim=8)
    with pytest.raises(ValueError, match="attention_head_dim 32 .* width 16"):
        UNetVelocity(16, 3, block_out_channels=(16, 32), attention_resolutions=(16,), attention_head_dim=32)
    with pytest.raises(ValueError, match="dropout"):
        UNetVelocity(16, 3, block_out_channels=(16, 32), attention_head_dim=8, dropout=1.0)
