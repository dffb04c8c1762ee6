"""Vectorised, seeded 2-D toy distributions with conditions.

Each distribution is a deterministic map from standard normals ``z`` [n, 2] and uniforms ``u``
[n, k] to points, so it can be drawn from a ``torch.Generator`` (datasets) or from per-sample seeds
(a toy distribution used as a LOOM-CFM source). Every draw also returns its conditions: the
component ``label`` (int), the ``angle`` of the point around the origin (radians) and its
``xcoord``. Scales follow the C2OT harness: 8 Gaussians of radius 5 and variance 0.1, two moons
(noise 0.2) scaled by 3 and shifted by −1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class ToyDraw:
    """Points and their conditions."""

    x: torch.Tensor  # [n, 2] float32
    label: torch.Tensor  # [n] int64 component / class
    num_classes: int

    @property
    def angle(self) -> torch.Tensor:
        return torch.atan2(self.x[:, 1], self.x[:, 0])

    @property
    def xcoord(self) -> torch.Tensor:
        return self.x[:, 0]

    def conditions(self) -> dict[str, torch.Tensor]:
        return {"label": self.label, "angle": self.angle, "xcoord": self.xcoord}


def _component(u: torch.Tensor, k: int) -> torch.Tensor:
    return torch.clamp((u * k).long(), max=k - 1)


def eight_gaussians(z: torch.Tensor, u: torch.Tensor, radius: float = 5.0, var: float = 0.1) -> ToyDraw:
    """Eight isotropic Gaussians on a circle (centres at multiples of 45°)."""
    k = _component(u[:, 0], 8)
    ang = k.to(torch.float64) * (math.pi / 4)
    centres = torch.stack([torch.cos(ang), torch.sin(ang)], 1) * radius
    x = centres + math.sqrt(var) * z.to(torch.float64)
    return ToyDraw(x.float(), k, 8)


def moons(z: torch.Tensor, u: torch.Tensor, noise: float = 0.2, scale: float = 3.0, offset: float = -1.0) -> ToyDraw:
    """Two interleaved half circles (scikit-learn's make_moons geometry), label = which moon."""
    k = _component(u[:, 0], 2)
    theta = u[:, 1] * math.pi
    outer = torch.stack([torch.cos(theta), torch.sin(theta)], 1)
    inner = torch.stack([1 - torch.cos(theta), 0.5 - torch.sin(theta)], 1)
    x = torch.where(k[:, None] == 0, outer, inner) + noise * z.to(torch.float64)
    return ToyDraw((x * scale + offset).float(), k, 2)


def checkerboard(z: torch.Tensor, u: torch.Tensor, cells: int = 4, size: float = 2.0) -> ToyDraw:
    """Uniform on the black squares of a ``cells``×``cells`` board of side ``size``, centred at 0."""
    del z
    n_black = cells * cells // 2
    k = _component(u[:, 0], n_black)
    row = k // (cells // 2)
    col = 2 * (k % (cells // 2)) + (row % 2)
    origin = -cells * size / 2
    x = torch.stack([origin + (col + u[:, 1]) * size, origin + (row + u[:, 2]) * size], 1)
    return ToyDraw(x.float(), k, n_black)


def spirals(z: torch.Tensor, u: torch.Tensor, turns: float = 1.5, radius: float = 4.0, noise: float = 0.1) -> ToyDraw:
    """Two interleaved Archimedean spirals, label = arm; density uniform along the arc length."""
    k = _component(u[:, 0], 2)
    s = torch.sqrt(u[:, 1])
    theta = s * turns * 2 * math.pi + k.to(torch.float64) * math.pi
    x = torch.stack([torch.cos(theta), torch.sin(theta)], 1) * (s * radius)[:, None] + noise * z.to(torch.float64)
    return ToyDraw(x.float(), k, 2)


# name -> (map, number of uniforms it needs)
DISTRIBUTIONS: dict[str, tuple[Callable[..., ToyDraw], int]] = {
    "8gaussians": (eight_gaussians, 1),
    "moons": (moons, 2),
    "checkerboard": (checkerboard, 3),
    "spirals": (spirals, 2),
}


def _lookup(name: str) -> tuple[Callable[..., ToyDraw], int]:
    if name not in DISTRIBUTIONS:
        raise ValueError(f"unknown toy distribution {name!r}; choose from {sorted(DISTRIBUTIONS)}")
    return DISTRIBUTIONS[name]


def num_uniforms(name: str) -> int:
    return _lookup(name)[1]


def transform(name: str, z: torch.Tensor, u: torch.Tensor, **params: float) -> ToyDraw:
    """Map normals ``z`` [n, 2] and uniforms ``u`` [n, k] to a draw of ``name``."""
    fn, _ = _lookup(name)
    return fn(z, u, **params)


def sample(name: str, n: int, generator: torch.Generator | None = None, **params: float) -> ToyDraw:
    """Draw ``n`` points of a toy distribution with a torch generator."""
    _, k = _lookup(name)
    z = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    u = torch.rand(n, k, generator=generator, dtype=torch.float64)
    return transform(name, z, u, **params)
