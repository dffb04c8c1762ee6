"""A small CNN classifier whose penultimate activations are the feature space for Fréchet distance,
precision/recall and class coverage on small images (digits), where Inception's 299×299 ImageNet
features say little.

Input [B, 3, R, R] in [-1, 1] for any R ≥ 4 (adaptive pooling to a fixed 4×4 grid; trained at the
dataset's R). ``features(x)`` is the 128-d post-ReLU penultimate layer, ``forward(x)`` the class logits.
Weights are saved as safetensors with the architecture config (JSON) in the file's metadata, so one
file is enough to rebuild the network; no pickle.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from sourceflow.io import atomic_path

META_KEY = "feature_net"
FORMAT = "sourceflow.feature_net/1"


@dataclass
class FeatureNetConfig:
    num_classes: int = 10
    widths: tuple[int, ...] = (32, 64, 128)
    feature_dim: int = 128
    grid: int = 4
    resolution: int = 8
    class_names: list[str] = field(default_factory=list)


class FeatureNet(nn.Module):
    """conv-ReLU ×2 → adaptive avg-pool to grid×grid → conv-ReLU → flatten → linear-ReLU (features) → logits."""

    def __init__(self, config: FeatureNetConfig):
        super().__init__()
        self.config = config
        w1, w2, w3 = config.widths
        self.body = nn.Sequential(
            nn.Conv2d(3, w1, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w1, w2, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(config.grid),
            nn.Conv2d(w2, w3, 3, padding=1), nn.ReLU(),
            nn.Flatten(),
            nn.Linear(w3 * config.grid * config.grid, config.feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations [B, feature_dim]."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"FeatureNet expects images [B, 3, R, R], got shape {tuple(x.shape)}")
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits [B, num_classes]."""
        return self.head(self.features(x))

    def save(self, path: str | Path, info: dict | None = None) -> None:
        """Weights (safetensors), written atomically, with one metadata entry ``feature_net``: JSON of
        {"format", "config", **info}. One key, sorted JSON: safetensors writes several metadata keys in
        a random order, which would make the bytes differ between identical runs."""
        meta = {"format": FORMAT, "config": asdict(self.config), **(info or {})}
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_path(path) as tmp:
            save_file(state, str(tmp), metadata={META_KEY: json.dumps(meta, sort_keys=True)})


def read_feature_net_metadata(path: str | Path) -> dict:
    """The ``feature_net`` metadata JSON of a weights file: format, config and the training info."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature network not found: {path} (run the train_feature_net stage)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error type for a broken header
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    if META_KEY not in meta:
        raise KeyError(f"{path}: no '{META_KEY}' entry in the safetensors metadata (not written by train_feature_net)")
    try:
        return json.loads(meta[META_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: metadata '{META_KEY}' is not valid JSON ({e})") from None


def load_feature_net(path: str | Path, device: str | torch.device = "cpu") -> FeatureNet:
    """Rebuild a :class:`FeatureNet` from its safetensors file, in eval mode."""
    meta = read_feature_net_metadata(path)
    if meta.get("format") != FORMAT or "config" not in meta:
        raise ValueError(f"{path}: unknown feature network format {meta.get('format')!r} (expected {FORMAT})")
    cfg = dict(meta["config"])
    cfg["widths"] = tuple(cfg["widths"])
    net = FeatureNet(FeatureNetConfig(**cfg))
    state = load_file(str(path))
    missing, unexpected = set(net.state_dict()) - set(state), set(state) - set(net.state_dict())
    if missing or unexpected:
        raise KeyError(f"{path}: tensors do not match the config (missing {sorted(missing)}, "
                       f"unexpected {sorted(unexpected)})")
    net.load_state_dict(state)
    return net.to(device).eval()
