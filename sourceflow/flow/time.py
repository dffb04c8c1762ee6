"""Training-time samplers, sampling time grids and the resolution shift.

The shift spends more time near the source. With τ = 1 − t (RAE's direction, τ=1 noise),
τ' = s·τ / (1 + (s−1)·τ) and t' = 1 − τ'. RAE uses s = sqrt(D / 4096) with D the latent numel.

RAE / MM-FM / CSFM sample on ``N`` grid points (``N − 1`` Euler steps) from t=0 to t=0.999, shifted
with the training s: for s = √48 and 50 points the first step ends at t ≈ 0.0030 and the last at
t ≈ 0.9931 (our direction), so the sample is the state at t ≈ 0.9931, never extrapolated to 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Apply the resolution shift to times in [0, 1] (t=0 source); shift=1 is the identity."""
    if shift == 1.0:
        return t
    tau = 1.0 - t
    tau = shift * tau / (1.0 + (shift - 1.0) * tau)
    return 1.0 - tau


def resolution_shift(numel: int, base: int = 4096) -> float:
    """RAE's shift factor s = sqrt(D / base) for a latent with D elements."""
    return math.sqrt(numel / base)


def time_grid(steps: int, shift: float = 1.0, dtype: torch.dtype = torch.float32, t_end: float = 1.0) -> torch.Tensor:
    """``steps + 1`` increasing times: uniform on [0, ``t_end``], then shifted (RAE: t_end 0.999)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 < t_end <= 1.0:
        raise ValueError(f"t_end must be in (0, 1], got {t_end}")
    grid = torch.linspace(0.0, t_end, steps + 1, dtype=torch.float64)
    return shift_time(grid, shift).to(dtype)


@dataclass(frozen=True)
class TimeSampler:
    """Draws training times: ``uniform`` or ``logit_normal(mean, std)``, clamped to ``t_max`` (MM-FM:
    0.999, before the shift, as its sampling grid ends there), then the shift."""

    kind: str = "uniform"
    mean: float = 0.0
    std: float = 1.0
    shift: float = 1.0
    t_max: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("uniform", "logit_normal"):
            raise ValueError(f"time.kind must be 'uniform' or 'logit_normal', got {self.kind!r}")
        if self.shift <= 0:
            raise ValueError(f"time.shift must be > 0, got {self.shift}")
        if not 0.0 < self.t_max <= 1.0:
            raise ValueError(f"time.t_max must be in (0, 1], got {self.t_max}")

    def sample(self, n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        if self.kind == "uniform":
            t = torch.rand(n, generator=generator)
        else:
            t = torch.sigmoid(self.mean + self.std * torch.randn(n, generator=generator))
        if self.t_max < 1.0:
            t = t.clamp(max=self.t_max)
        return shift_time(t, self.shift).to(device)
