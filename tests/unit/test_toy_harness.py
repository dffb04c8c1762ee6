"""The C2OT toy harness reproduced: 8-Gaussian variance, torchdyn's moons construction, the MLP's size.

References are independent: a numpy re-implementation of torchdyn's ``generate_moons`` (written from
its definition), angles recovered from the points by geometry, and a parameter count by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from sourceflow.data import toy
from sourceflow.flow.sources import ToySource
from sourceflow.models.embed import CondSpec
from sourceflow.models.mlp import MLPVelocity


def numpy_generate_moons(n: int, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """torchdyn.datasets.generate_moons(n, noise) with its ``np.random.rand(n, 1) * noise`` given as
    ``offsets`` [n], followed by the harness's ×3 − 1 (``sample_moons``)."""
    n_out, n_in = n // 2, n - n // 2
    a_out, a_in = np.linspace(0, np.pi, n_out), np.linspace(0, np.pi, n_in)
    xs = np.append(np.cos(a_out), 1 - np.cos(a_in))
    ys = np.append(np.sin(a_out), 1 - np.sin(a_in) - 0.5)
    pts = np.vstack([xs, ys]).T + offsets[:, None]
    labels = np.hstack([np.zeros(n_out, dtype=np.intp), np.ones(n_in, dtype=np.intp)])
    return pts * 3 - 1, labels


def offset_solutions(x: np.ndarray, label: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Solve each point as moon(θ) + o·(1, 1) with θ ∈ [0, π], o ∈ [0, 0.2): roots (o, θ) [n, 2] and
    which roots satisfy both ranges (within ``tol``).

    After undoing ×3 − 1, r = p − centre (outer moon centre (0, 0), inner (1, 0.5)) must satisfy
    |r − o·(1, 1)| = 1: 2o² − 2(r_x + r_y)o + |r|² − 1 = 0, two roots. The half circle is sin θ ≥ 0
    (outer: r_y − o = sin θ; inner: r_y − o = −sin θ). Near θ = 3π/4 the moon's tangent is (1, 1),
    so two (θ, o) can give the same point and float32 rounding moves a root by ~sqrt(1e-7).
    """
    p = (x.astype(np.float64) + 1) / 3
    centre = np.where(label[:, None] == 0, [0.0, 0.0], [1.0, 0.5])
    r = p - centre
    disc = np.clip(2 - (r[:, 0] - r[:, 1]) ** 2, 0, None)
    o = (r.sum(1, keepdims=True) + np.sqrt(disc)[:, None] * np.array([1.0, -1.0])) / 2
    sign = np.where(label == 0, 1.0, -1.0)[:, None]
    sin_t = sign * (r[:, 1:] - o)
    cos_t = sign * (r[:, :1] - o)
    theta = np.arctan2(sin_t, cos_t)
    ok = (sin_t > -tol) & (o > -tol) & (o < 0.2 + tol)
    return o, theta, ok


def test_eight_gaussians_component_variance_is_sqrt_point_one():
    n = 200_000
    d = toy.sample("8gaussians", n, torch.Generator().manual_seed(0))
    ang = d.label.double() * (math.pi / 4)
    centres = 5 * torch.stack([torch.cos(ang), torch.sin(ang)], 1)
    r = (d.x.double() - centres).numpy()
    var = r.var(0)
    # sample variance of n normals: relative standard error sqrt(2 / n) ≈ 0.32%; allow 5 of them
    np.testing.assert_allclose(var, math.sqrt(0.1), rtol=5 * math.sqrt(2 / n))
    assert abs(var.mean() - 0.1) > 0.2  # not the nominal 0.1
    assert np.abs(r.mean(0)).max() < 5 * math.sqrt(math.sqrt(0.1) / n)
    assert stats.chisquare(torch.bincount(d.label, minlength=8).numpy()).pvalue > 1e-3


def test_eight_gaussians_var_stays_a_parameter():
    d = toy.sample("8gaussians", 50_000, torch.Generator().manual_seed(1), var=0.1)
    ang = d.label.double() * (math.pi / 4)
    r = d.x.double() - 5 * torch.stack([torch.cos(ang), torch.sin(ang)], 1)
    np.testing.assert_allclose(r.var(0).numpy(), 0.1, rtol=0.04)


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 1001])
def test_moons_grid_equals_torchdyn_given_the_same_offsets(n):
    offsets = np.random.default_rng(n).random(n) * 0.2
    ref_x, ref_label = numpy_generate_moons(n, offsets)
    d = toy.moons_grid(n, torch.from_numpy(offsets))
    np.testing.assert_allclose(d.x.numpy(), ref_x, rtol=0, atol=2e-6)
    np.testing.assert_array_equal(d.label.numpy(), ref_label)
    assert d.num_classes == 2


def test_moons_dataset_without_offset_is_exactly_the_linspace():
    n = 1001
    d = toy.sample("moons", n, torch.Generator().manual_seed(0), noise=0.0)
    p = (d.x.double().numpy() + 1) / 3
    label = d.label.numpy()
    assert (label == 0).sum() == n // 2 and (label == 1).sum() == n - n // 2
    outer = np.arctan2(p[label == 0, 1], p[label == 0, 0])
    inner = np.arctan2(0.5 - p[label == 1, 1], 1 - p[label == 1, 0])
    # float32 points: atan2 of (x + 1)/3 is good to ~1e-7 rad
    np.testing.assert_allclose(np.sort(outer), np.linspace(0, np.pi, n // 2), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.sort(inner), np.linspace(0, np.pi, n - n // 2), rtol=0, atol=1e-6)


def test_moons_dataset_is_torchdyn_with_the_same_uniforms_then_shuffled():
    n = 4001
    d = toy.sample("moons", n, torch.Generator().manual_seed(0))
    assert d.x.dtype == torch.float32 and d.x.shape == (n, 2)
    # replay the draw: n uniforms for torchdyn's offsets, then a permutation of the rows
    g = torch.Generator().manual_seed(0)
    offsets = (torch.rand(n, generator=g, dtype=torch.float64) * 0.2).numpy()
    perm = torch.randperm(n, generator=g).numpy()
    ref_x, ref_label = numpy_generate_moons(n, offsets)
    np.testing.assert_allclose(d.x.numpy(), ref_x[perm], rtol=0, atol=2e-6)
    np.testing.assert_array_equal(d.label.numpy(), ref_label[perm])
    # shuffled: the first rows are not one moon
    assert 0.4 < d.label[:1000].double().mean().item() < 0.6


def test_moons_dataset_offsets_are_one_bounded_uniform_per_point():
    """Without replaying the generator: every point is moon(θ) + o·(1, 1) with o ∈ [0, 0.2), and o
    is uniform there (torchdyn's noise is this offset, not Gaussian noise)."""
    n = 20_000
    d = toy.sample("moons", n, torch.Generator().manual_seed(5))
    o, theta, ok = offset_solutions(d.x.numpy(), d.label.numpy(), tol=1e-3)
    assert ok.any(1).all()
    # away from θ = 3π/4 the solution is unique; that selection depends on θ only, not on o
    first = np.where(ok[:, 0], 0, 1)
    rows = np.arange(n)
    far = np.abs(np.abs(theta[rows, first]) - 3 * math.pi / 4) > 0.2
    assert far.mean() > 0.8
    assert (ok[far].sum(1) == 1).all()
    assert stats.kstest(o[rows, first][far], stats.uniform(0, 0.2).cdf).pvalue > 1e-3
    # the same solver rejects Gaussian noise of the same size (the old construction)
    g = torch.Generator().manual_seed(6)
    noisy = toy.moon_points(torch.rand(n, generator=g, dtype=torch.float64) * math.pi, d.label,
                            torch.zeros(n)).x + 0.6 * torch.randn(n, 2, generator=g)
    assert not offset_solutions(noisy.numpy(), d.label.numpy(), tol=1e-3)[2].any(1).all()


def test_moons_dataset_is_seeded():
    a = toy.sample("moons", 500, torch.Generator().manual_seed(3))
    b = toy.sample("moons", 500, torch.Generator().manual_seed(3))
    c = toy.sample("moons", 500, torch.Generator().manual_seed(4))
    assert torch.equal(a.x, b.x) and torch.equal(a.label, b.label)
    assert not torch.equal(a.x, c.x)


def test_per_sample_moons_map():
    u = torch.rand(1000, toy.num_uniforms("moons"), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    d = toy.transform("moons", torch.randn(1000, 2, dtype=torch.float64), u)
    un = u.numpy()
    label = (un[:, 0] >= 0.5).astype(np.int64)
    th, o = np.pi * un[:, 1], 0.2 * un[:, 2]
    ref = np.where(label[:, None] == 0, np.stack([np.cos(th), np.sin(th)], 1),
                   np.stack([1 - np.cos(th), 0.5 - np.sin(th)], 1)) + o[:, None]
    np.testing.assert_array_equal(d.label.numpy(), label)
    np.testing.assert_allclose(d.x.numpy(), ref * 3 - 1, rtol=0, atol=2e-6)


def test_per_sample_moons_is_the_limit_of_the_dataset_draw():
    n = 20_000
    u = torch.rand(n, toy.num_uniforms("moons"), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    per = toy.transform("moons", torch.zeros(n, 2, dtype=torch.float64), u)
    ref = toy.sample("moons", n, torch.Generator().manual_seed(1))
    for dim in range(2):
        assert stats.ks_2samp(per.x[:, dim].numpy(), ref.x[:, dim].numpy()).pvalue > 1e-3
    assert abs(per.label.double().mean().item() - 0.5) < 4 * 0.5 / math.sqrt(n)
    # seeded draws (a toy source) give the same distribution
    seeded = ToySource("moons").from_seeds(torch.arange(n)).x0
    for dim in range(2):
        assert stats.ks_2samp(seeded[:, dim].numpy(), ref.x[:, dim].numpy()).pvalue > 1e-3


def harness_parameter_count(width: int = 128, depth: int = 3, expansion: int = 4, dim: int = 2,
                            cond_dim: int = 0) -> int:
    """SimpleNet / ConditionalNet by hand: Linear(dim, w) + Linear(1, w) [+ Linear(c, w)] + depth ×
    (Linear(w, 4w) + Linear(4w, w)) + Linear(w, dim)."""
    hidden = expansion * width
    n = dim * width + width + width + width
    if cond_dim:
        n += cond_dim * width + width
    n += depth * (width * hidden + hidden + hidden * width + width)
    return n + width * dim + dim


def test_harness_parameter_count():
    assert harness_parameter_count() == 2 * 128 + 128 + 128 + 128 + 3 * (128 * 512 + 512 + 512 * 128 + 128) + 128 * 2 + 2
    assert harness_parameter_count() == 396_034
    model = MLPVelocity(dim=2, width=128, depth=3, expansion=4)
    assert sum(p.numel() for p in model.parameters()) == 396_034
    # defaults are the harness's network
    assert sum(p.numel() for p in MLPVelocity().parameters()) == 396_034
    cond = MLPVelocity(cond=CondSpec("continuous", 1))
    assert sum(p.numel() for p in cond.parameters()) == harness_parameter_count(cond_dim=1) == 396_034 + 256


def test_linear_time_embedding_is_linear_in_t():
    torch.manual_seed(0)
    model = MLPVelocity(width=16, depth=1, expansion=4)
    t = torch.tensor([0.0, 0.25, 1.0])
    e = model.time(t)
    w, b = model.time.proj.weight[:, 0], model.time.proj.bias
    torch.testing.assert_close(e, t[:, None] * w + b)
    sin = MLPVelocity(width=16, depth=1, time_embed="sinusoidal")
    assert sin(torch.zeros(3, 2), t).shape == (3, 2)
    with pytest.raises(ValueError, match="time_embed"):
        MLPVelocity(time_embed="fourier")


def test_continuous_condition_is_one_linear_layer():
    torch.manual_seed(0)
    model = MLPVelocity(width=16, depth=1, cond=CondSpec("continuous", 1))
    assert isinstance(model.cond, torch.nn.Linear) and model.cond.in_features == 1
    x, t = torch.randn(4, 2), torch.rand(4)
    c = torch.randn(4, 1)
    # the output depends on c only through h0 = inp(x) + time(t) + Linear(c)
    h0 = model.inp(x) + model.time(t) + c * model.cond.weight[:, 0] + model.cond.bias
    for block in model.blocks:
        h0 = block(h0)
    torch.testing.assert_close(model(x, t, c), model.out(h0))
    with pytest.raises(ValueError, match="continuous condition"):
        model(x, t)
