"""Piecewise-linear schedules of a training quantity (learning rate, EMA decay) in steps or epochs.

A schedule is a list of ``[position, value]`` points in ``unit`` (``step`` or ``epoch``), linear in
between, constant before the first and after the last point; a position given twice is a jump. MM-FM's
published recipe in epochs (DESIGN.md):

* learning rate 4e-4 for epochs 0–20, then 2e-4, decaying linearly from epoch 40 toward 2e-5 at epoch
  800: ``[[0, 4e-4], [20, 4e-4], [20, 2e-4], [40, 2e-4], [800, 2e-5]]`` (≈ 1.9e-4 at epoch 80);
* EMA decay 0.999 for the first 20 epochs, then 0.9995: ``[[0, 0.999], [20, 0.999], [20, 0.9995]]``.

Epochs are converted with ``steps_per_epoch`` = images per epoch / global batch (fractional: an epoch of
1,281,167 ImageNet images at batch 1024 is 1251.1 steps). The value of step s is taken at the step's
start position s (0-based), so a jump at epoch 20 takes effect at the first step whose start is ≥ 20.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

UNITS = ("step", "epoch")


@dataclass(frozen=True)
class Schedule:
    """Piecewise-linear ``value(position)`` through ``points`` (sorted by position, ties = jumps)."""

    unit: str
    points: tuple[tuple[float, float], ...]

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"schedule unit must be one of {UNITS}, got {self.unit!r}")
        if not self.points:
            raise ValueError("a schedule needs at least one [position, value] point")
        pos = [p for p, _ in self.points]
        if any(b < a for a, b in zip(pos, pos[1:], strict=False)):
            raise ValueError(f"schedule positions must not decrease, got {pos}")

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Schedule:
        return cls(cfg["unit"], tuple((float(p), float(v)) for p, v in cfg["points"]))

    def value(self, position: float) -> float:
        """The value at ``position`` (in ``unit``): the last point at or before it, interpolated towards
        the next point; a jump (two points at one position) takes the later value from that position on."""
        pos = [p for p, _ in self.points]
        i = bisect.bisect_right(pos, position)  # points[:i] are at or before position
        if i == 0:
            return self.points[0][1]
        if i == len(self.points):
            return self.points[-1][1]
        (p0, v0), (p1, v1) = self.points[i - 1], self.points[i]
        return v0 + (v1 - v0) * (position - p0) / (p1 - p0)  # p1 > position >= p0, so p1 > p0

    def at_step(self, step: int, steps_per_epoch: float) -> float:
        """The value for (0-based) training step ``step``."""
        return self.value(step if self.unit == "step" else step / steps_per_epoch)
