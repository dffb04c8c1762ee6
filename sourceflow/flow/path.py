"""The linear (rectified / OT) probability path.

Convention (DESIGN.md): t=0 is the source, t=1 is data; x_t = (1−t)·x0 + t·x1 and the regression
target is the constant velocity u = x1 − x0 (Lipman et al. 2023, eq. 20–23 with σ_min = 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def expand_time(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape per-sample times [B] so they broadcast against a batch shaped like ``like``."""
    return t.reshape(-1, *([1] * (like.dim() - 1)))


@dataclass
class PathSample:
    """A point on the path and the velocity to regress there."""

    t: torch.Tensor
    xt: torch.Tensor
    ut: torch.Tensor


class LinearPath:
    """x_t = (1−t)·x0 + t·x1, u_t = x1 − x0."""

    def interpolate(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = expand_time(t, x0)
        return (1 - tt) * x0 + tt * x1

    def velocity(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        return x1 - x0

    def sample(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> PathSample:
        return PathSample(t=t, xt=self.interpolate(x0, x1, t), ut=self.velocity(x0, x1))
