"""Vectorised, seeded 2-D toy distributions with conditions.

Each distribution is a deterministic map from standard normals ``z`` [n, 2] and uniforms ``u``
[n, k] to points (:func:`transform`), so it can be drawn from a ``torch.Generator`` or from
per-sample seeds (a toy distribution used as a LOOM-CFM source). :func:`sample` draws a dataset of
``n`` points; for moons it is torchdyn's whole-dataset construction (see :func:`moons_dataset`),
which the per-sample map only matches in the limit. Every draw also returns its conditions: the
component ``label`` (int), the ``angle`` of the point around the origin (radians) and its ``xcoord``.

The defaults are the C2OT toy harness (``moons.py`` / ``c2ot/utils/playground_utils.py``):

* source, 8 Gaussians: centres on a circle of radius 5, covariance sqrt(0.1)·I per component, i.e.
  per-coordinate variance 0.316 (torchcfm's ``eight_normal_sample(n, 2, scale=5, var=0.1)`` hands
  ``sqrt(var)`` to ``MultivariateNormal`` as the covariance);
* target, moons: torchdyn ``generate_moons(n, noise=0.2)`` then ×3 − 1. torchdyn puts the angles on
  a linspace over [0, π] (n//2 outer points, n − n//2 inner), outer moon (cos, sin) with label 0,
  inner moon (1 − cos, 1 − sin − 0.5) with label 1, and adds ONE uniform offset U[0, noise) per point
  to both coordinates (no Gaussian noise; the "noise" is that offset, so after ×3 it is U[0, 0.6)).
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


# torchcfm's eight_normal_sample(var=0.1) uses sqrt(0.1) as the covariance: the harness's variance
HARNESS_8G_VAR = math.sqrt(0.1)


def eight_gaussians(z: torch.Tensor, u: torch.Tensor, radius: float = 5.0,
                    var: float = HARNESS_8G_VAR) -> ToyDraw:
    """Eight isotropic Gaussians on a circle (centres at multiples of 45°, label = centre index).

    ``var`` is the per-coordinate variance of a component. The default, sqrt(0.1) ≈ 0.316, is what
    the C2OT harness draws: torchcfm's ``eight_normal_sample(..., var=0.1)`` passes
    ``math.sqrt(var) * I`` as the covariance matrix, so its "var 0.1" is really variance 0.316.
    """
    k = _component(u[:, 0], 8)
    ang = k.to(torch.float64) * (math.pi / 4)
    centres = torch.stack([torch.cos(ang), torch.sin(ang)], 1) * radius
    x = centres + math.sqrt(var) * z.to(torch.float64)
    return ToyDraw(x.float(), k, 8)


def moon_points(theta: torch.Tensor, label: torch.Tensor, shift: torch.Tensor, scale: float = 3.0,
                offset: float = -1.0) -> ToyDraw:
    """Points at angles ``theta`` on the outer (label 0: (cos, sin)) or inner (label 1:
    (1 − cos, 0.5 − sin)) moon, ``shift`` [n] added to both coordinates, then ×scale + offset."""
    theta = theta.to(torch.float64)
    outer = torch.stack([torch.cos(theta), torch.sin(theta)], 1)
    inner = torch.stack([1 - torch.cos(theta), 0.5 - torch.sin(theta)], 1)
    x = torch.where(label[:, None] == 0, outer, inner) + shift.to(torch.float64)[:, None]
    return ToyDraw((x * scale + offset).float(), label.long(), 2)


def moons_grid(n: int, shift: torch.Tensor, scale: float = 3.0, offset: float = -1.0) -> ToyDraw:
    """torchdyn's ``generate_moons`` layout for ``n`` points, given the per-point offsets ``shift`` [n]
    (in moon units, before ×scale + offset): n//2 outer points then n − n//2 inner points, each moon's
    angles ``linspace(0, π, count)``, rows in that order (unshuffled)."""
    if shift.shape != (n,):
        raise ValueError(f"need one offset per point: shift {tuple(shift.shape)} for n={n}")
    n_out = n // 2
    n_in = n - n_out
    theta = torch.cat([torch.linspace(0, math.pi, n_out, dtype=torch.float64),
                       torch.linspace(0, math.pi, n_in, dtype=torch.float64)])
    label = torch.cat([torch.zeros(n_out, dtype=torch.long), torch.ones(n_in, dtype=torch.long)])
    return moon_points(theta, label, shift, scale, offset)


def moons_dataset(n: int, generator: torch.Generator | None = None, noise: float = 0.2, scale: float = 3.0,
                  offset: float = -1.0) -> ToyDraw:
    """A dataset draw of ``n`` moons points exactly as the C2OT harness makes one
    (``generate_moons(n, noise)`` ×3 − 1): :func:`moons_grid` with offsets U[0, noise), rows then
    shuffled with ``generator`` so that the first k rows (a plot, ``evaluate.num_points``) are a fair
    subsample rather than part of the outer moon. Only the row order differs from torchdyn's."""
    shift = torch.rand(n, generator=generator, dtype=torch.float64) * noise
    d = moons_grid(n, shift, scale, offset)
    perm = torch.randperm(n, generator=generator)
    return ToyDraw(d.x[perm], d.label[perm], d.num_classes)


def moons(z: torch.Tensor, u: torch.Tensor, noise: float = 0.2, scale: float = 3.0, offset: float = -1.0) -> ToyDraw:
    """Per-sample moons (for seeded draws): moon from ``u[:, 0]`` (label 0 outer, 1 inner), angle
    π·``u[:, 1]``, offset noise·``u[:, 2]`` on both coordinates; ``z`` is unused.

    This is the limit of :func:`moons_dataset` as n grows: there the angles are a linspace and the two
    moons hold exactly n//2 and n − n//2 points; here the angle is uniform and the moon a fair coin,
    so a finite draw is not the harness's grid (use :func:`sample` for datasets).
    """
    del z
    k = _component(u[:, 0], 2)
    return moon_points(u[:, 1] * math.pi, k, noise * u[:, 2], scale, offset)


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
    "moons": (moons, 3),
    "checkerboard": (checkerboard, 3),
    "spirals": (spirals, 2),
}


# name -> dataset draw ``fn(n, generator, **params)`` where a dataset is not n independent per-sample draws
DATASET_DRAWS: dict[str, Callable[..., ToyDraw]] = {"moons": moons_dataset}


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
    """Draw a dataset of ``n`` points of a toy distribution with a torch generator (moons: the
    harness's linspace construction; the others: ``n`` per-sample draws of :func:`transform`)."""
    _, k = _lookup(name)
    if name in DATASET_DRAWS:
        return DATASET_DRAWS[name](n, generator, **params)
    z = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    u = torch.rand(n, k, generator=generator, dtype=torch.float64)
    return transform(name, z, u, **params)
