"""Solvers against closed forms; NFE accounting; time samplers; guidance; path energy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.linalg import expm

from sourceflow.flow.guidance import autoguidance, cfg
from sourceflow.flow.solvers import solve
from sourceflow.flow.time import TimeSampler, resolution_shift, shift_time, time_grid
from sourceflow.metrics.paths import normalized_path_energy, path_energy

A = torch.tensor([[-0.5, 2.0], [-2.0, -0.5]], dtype=torch.float64)


def linear_field(t, x):
    return x @ A.T


def exact(x0):
    return x0 @ torch.from_numpy(expm(A.numpy())).T


@pytest.mark.parametrize("steps", [2, 4, 8, 16])
def test_heun_beats_euler_on_a_linear_ode(steps):
    x0 = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    target = exact(x0)
    err = {s: (solve(linear_field, x0, s, steps).x - target).norm(dim=1).max().item() for s in ("euler", "heun", "midpoint")}
    assert err["heun"] < err["euler"] and err["midpoint"] < err["euler"]
    if steps >= 4:
        assert err["heun"] < 0.25 * err["euler"]


def test_convergence_orders():
    x0 = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = exact(x0)

    def e(s, n):
        return (solve(linear_field, x0, s, n).x - target).norm(dim=1).max().item()

    assert np.log2(e("euler", 32) / e("euler", 64)) == pytest.approx(1.0, abs=0.15)
    assert np.log2(e("heun", 32) / e("heun", 64)) == pytest.approx(2.0, abs=0.15)


def test_nfe_is_counted_for_every_solver():
    calls = {"n": 0}

    def field(t, x):
        calls["n"] += 1
        return linear_field(t, x)

    x0 = torch.randn(4, 2, dtype=torch.float64)
    for solver, steps, expected in (("euler", 5, 5), ("heun", 5, 10), ("midpoint", 3, 6)):
        calls["n"] = 0
        res = solve(field, x0, solver, steps)
        assert res.nfe == calls["n"] == expected
    calls["n"] = 0
    res = solve(field, x0, "dopri5", rtol=1e-8, atol=1e-8)
    assert res.nfe == calls["n"] > 6
    torch.testing.assert_close(res.x, exact(x0), rtol=1e-6, atol=1e-6)
    loose = solve(field, x0, "dopri5", rtol=1e-3, atol=1e-3)
    assert loose.nfe < res.nfe


def test_trajectories_and_path_energy():
    x0 = torch.randn(32, 2, dtype=torch.float64)
    x1 = torch.randn(32, 2, dtype=torch.float64)
    res = solve(lambda t, x: x1 - x0, x0, "euler", 4, return_traj=True)
    assert res.traj.shape == (5, 32, 2)
    e, d = path_energy(res.traj, res.times)
    assert normalized_path_energy(e.numpy(), d.numpy()) == pytest.approx(0.0, abs=1e-9)
    curved = solve(linear_field, x0, "dopri5", return_traj=True, traj_points=33)
    assert curved.traj.shape[0] == 33
    e, d = path_energy(curved.traj, curved.times)
    assert normalized_path_energy(e.numpy(), d.numpy()) > 0.1


def test_shift_matches_the_formula_and_rae_factor():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    s = 3.0
    tau = 1 - t
    torch.testing.assert_close(shift_time(t, s), 1 - s * tau / (1 + (s - 1) * tau))
    assert torch.all(shift_time(t, s)[1:-1] < t[1:-1])  # more time near the source (t = 0)
    assert resolution_shift(768 * 16 * 16) == pytest.approx(6.928, abs=1e-3)
    g = time_grid(8, shift=s)
    assert g[0] == 0 and g[-1] == 1 and torch.all(g[1:] > g[:-1])


def test_rae_sampling_grid_50_points_shifted_to_0999():
    """RAE / MM-FM / CSFM: "50 steps" are 50 grid points (49 Euler steps, 49 NFE) from t=0 to 0.999,
    shifted with the training s = sqrt(768*16*16 / 4096) = sqrt(48) (DESIGN.md, MM-FM sampling)."""
    s = math.sqrt(48)
    g = time_grid(49, shift=s, dtype=torch.float64, t_end=0.999)
    assert len(g) == 50 and g[0] == 0
    # independent closed form in RAE's own direction: tau = 1 - t, tau' = s tau / (1 + (s - 1) tau)
    tau = 1 - 0.999 / 49
    assert float(g[1]) == pytest.approx(1 - s * tau / (1 + (s - 1) * tau), rel=1e-12)
    assert float(g[1]) == pytest.approx(0.0030, abs=1e-4)  # the first step is tiny
    assert float(g[-1]) == pytest.approx(1 - s * 0.001 / (1 + (s - 1) * 0.001), rel=1e-12)
    assert float(g[-1]) == pytest.approx(0.9931, abs=1e-4)  # the last grid point, not 1
    res = solve(lambda t, x: torch.ones_like(x), torch.zeros(3, 1, dtype=torch.float64), "euler", 49,
                shift=s, t_end=0.999)
    assert res.nfe == 49 and float(res.x[0, 0]) == pytest.approx(float(g[-1]), rel=1e-12)
    with pytest.raises(ValueError, match="t_end"):
        time_grid(4, t_end=1.5)


def test_training_times_are_clamped_before_the_shift():
    """MM-FM: logit-normal(0, 1) truncated to t <= 0.999, then the shift."""
    ts = TimeSampler("logit_normal", mean=4.0, std=2.0, t_max=0.999)  # many draws above 0.999
    t = ts.sample(20000, torch.Generator().manual_seed(0)).double()
    assert t.max().item() == pytest.approx(0.999, abs=1e-6)
    raw = torch.sigmoid(4.0 + 2.0 * torch.randn(20000, generator=torch.Generator().manual_seed(0))).double()
    torch.testing.assert_close(t, raw.clamp(max=0.999).float().double())
    s = math.sqrt(48)
    shifted = TimeSampler("logit_normal", mean=4.0, std=2.0, shift=s, t_max=0.999).sample(
        20000, torch.Generator().manual_seed(0))
    torch.testing.assert_close(shifted, shift_time(raw.clamp(max=0.999).float(), s))


def test_time_samplers():
    u = TimeSampler("uniform").sample(50000, torch.Generator().manual_seed(0))
    assert u.min() >= 0 and u.max() <= 1 and u.mean().item() == pytest.approx(0.5, abs=0.01)
    ln = TimeSampler("logit_normal", mean=0.5, std=1.0).sample(50000, torch.Generator().manual_seed(0))
    logit = torch.log(ln / (1 - ln))
    assert logit.mean().item() == pytest.approx(0.5, abs=0.02) and logit.std().item() == pytest.approx(1.0, abs=0.02)
    with pytest.raises(ValueError, match="time.kind"):
        TimeSampler("cosine")


def test_guidance_combinators():
    def vc(t, x):
        return x + 1

    def vu(t, x):
        return 2 * x

    x = torch.randn(3, 2)
    t = torch.zeros(3)
    torch.testing.assert_close(cfg(vc, vu, 2.5)(t, x), vu(t, x) + 2.5 * (vc(t, x) - vu(t, x)))
    assert cfg(vc, vu, 1.0) is vc
    torch.testing.assert_close(autoguidance(vc, vu, 1.5)(t, x), vu(t, x) + 1.5 * (vc(t, x) - vu(t, x)))


def test_sample_precision_touches_only_the_velocity_call():
    """sample.precision (sourceflow.sampling.at_precision): on a CPU every precision is the model itself (fp32);
    on CUDA bf16 autocasts the call and hands the solver fp32, tf32 turns TF32 on for the call only."""
    from sourceflow.sampling import at_precision

    seen = {}

    def net(x, t, c):
        seen["tf32"] = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        return (x * 2).to(torch.bfloat16)

    for p in ("fp32", "tf32", "bf16"):
        assert at_precision(net, p, torch.device("cpu")) is net
    assert at_precision(net, "fp32", torch.device("cuda")) is net
    with pytest.raises(ValueError, match="sample.precision: 'fp16'"):
        at_precision(net, "fp16", torch.device("cpu"))
    x = torch.ones(3, 2)
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        at_precision(net, "tf32", torch.device("cuda"))(x, torch.zeros(3), None)
        assert seen["tf32"] == (True, True) and torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no CUDA here: torch disables the cuda autocast with a warning
        out = at_precision(net, "bf16", torch.device("cuda"))(x, torch.zeros(3), None)
    assert out.dtype == torch.float32 and torch.equal(out, x * 2)
