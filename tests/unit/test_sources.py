"""Sources: GMM sample moments, CSFM gradients and regularisers, toy distributions, seeded noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from sourceflow.data import toy
from sourceflow.flow.couplings import Batch, Independent
from sourceflow.flow.method import Method
from sourceflow.flow.rng import seeded_normal, seeded_uniform
from sourceflow.flow.sources import (
    GaussianSource,
    GMMSource,
    LearnedSource,
    ToySource,
    alignment_loss,
    var_reg,
)
from sourceflow.models.embed import CondSpec
from sourceflow.models.mlp import ConditionMLP, MLPVelocity


def test_gmm_source_moments_per_mode_and_mode_frequencies():
    w = torch.tensor([0.5, 0.3, 0.2])
    mu = torch.tensor([[0.0, 0.0, 0.0], [5.0, -5.0, 1.0], [-3.0, 2.0, 8.0]])
    var = torch.tensor([[1.0, 1.0, 1.0], [0.25, 4.0, 1.0], [2.0, 0.5, 0.1]])
    src = GMMSource(w, mu, var, variance="diag")
    n = 60000
    d = src.sample(n, torch.Generator().manual_seed(0))
    counts = torch.bincount(d.mode, minlength=3).numpy()
    assert stats.chisquare(counts, w.numpy() * n).pvalue > 1e-3
    for k in range(3):
        xk = d.x0[d.mode == k].double()
        se = (var[k].double() / len(xk)).sqrt()
        assert (xk.mean(0) - mu[k]).abs().max() < 5 * se.max()
        torch.testing.assert_close(xk.var(0), var[k].double(), rtol=0.05, atol=0)
    # spherical: one variance per mode = the mean of the diagonal
    sph = GMMSource(w, mu, var, variance="spherical")
    xs = sph.sample(n, torch.Generator().manual_seed(1), mode=torch.full((n,), 1))
    assert xs.x0.double().var(0).mean().item() == pytest.approx(var[1].mean().item(), rel=0.03)
    assert torch.all(xs.mode == 1)


def test_csfm_gradients_reach_the_source_network_and_varreg_is_zero_at_unit_variance():
    spec = CondSpec("discrete", 3)
    net = ConditionMLP(spec, out_dim=4, width=16, depth=1)  # no log-variance outputs: zero head
    src = LearnedSource(net, (2,), learn_var=True)
    # zero-initialised head: μ = 0, log σ² = 0 → VarReg exactly 0 (the released CSFM's σ = 1 case)
    d = src.sample(8, torch.Generator().manual_seed(0), cond=torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    assert var_reg(d.logvar).item() == 0.0
    # CSFM's learned-σ head starts at log σ² = init_logvar = 1 (weights N(0, 1e-4²)); VarReg then is
    # 0.5·(e − 1 − 1) per element, and log σ² is clamped to [-10, 10]
    csfm = LearnedSource(ConditionMLP(spec, out_dim=4, width=16, depth=1, logvar_dims=2), (2,), learn_var=True)
    lv = csfm.stats(torch.tensor([0, 1]))[1]
    torch.testing.assert_close(lv, torch.ones_like(lv), atol=1e-2, rtol=0)
    assert var_reg(torch.ones(2, 2)).item() == pytest.approx(0.5 * (math.e - 2))
    with torch.no_grad():
        csfm.net.head.bias[2:] = 50.0
    assert csfm.stats(torch.tensor([0]))[1].max().item() == pytest.approx(10.0, abs=1e-3)
    assert var_reg(torch.full((4, 2), math.log(4.0))).item() == pytest.approx(0.5 * (4 - 1 - math.log(4)))
    method = Method(src, Independent(), cond_from="data", var_reg_weight=5.0, align_weight=1.0)
    model = MLPVelocity(dim=2, width=16, depth=1, cond=spec)
    x1 = torch.randn(8, 2)
    pair = method.pair(Batch(x1, torch.arange(8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])),
                       torch.Generator().manual_seed(1))
    out = method.loss(model, pair, torch.Generator().manual_seed(2))
    out.loss.backward()
    assert net.head.weight.grad is not None and net.head.weight.grad.abs().sum() > 0
    assert {"fm", "var_reg", "align"} <= set(out.terms)
    # gradient of the flow-matching term alone also reaches φ (no stop-gradient through x0)
    net.zero_grad()
    method.var_reg_weight = method.align_weight = 0.0
    method.loss(model, method.pair(Batch(x1, torch.arange(8), torch.zeros(8, dtype=torch.long)),
                                   torch.Generator().manual_seed(1)), torch.Generator().manual_seed(2)).loss.backward()
    assert net.head.weight.grad.abs().sum() > 0


def test_alignment_loss_is_a_mean_over_all_elements_of_per_token_normalised_latents():
    """CSFM: mse_loss(normalize(μ), normalize(x1)), a MEAN over every element (not a per-token sum over
    the C channels, which is C = 768 times stronger at ImageNet scale); tokens normalised over channels."""
    x1 = torch.randn(4, 8, 3, 3)
    assert alignment_loss(2.5 * x1, x1).item() == pytest.approx(0.0, abs=1e-10)
    # opposite unit vectors differ by ‖2u‖² = 4 per token, spread over C = 8 channels: 4 / 8
    assert alignment_loss(-x1, x1).item() == pytest.approx(4.0 / 8, rel=1e-5)
    mu = torch.randn(4, 8, 3, 3)
    ref = (mu / mu.norm(dim=1, keepdim=True) - x1 / x1.norm(dim=1, keepdim=True)).pow(2).numpy().mean()
    assert alignment_loss(mu, x1).item() == pytest.approx(float(ref), rel=1e-5)
    # the scale at ImageNet's 768 channels: two independent directions give about 2 / C, not 2
    big = alignment_loss(torch.randn(2, 768, 4, 4), torch.randn(2, 768, 4, 4)).item()
    assert big == pytest.approx(2 / 768, rel=0.1)


def test_toy_eight_gaussians_geometry():
    d = toy.sample("8gaussians", 40000, torch.Generator().manual_seed(0))
    for k in range(8):
        xk = d.x[d.label == k].double()
        centre = 5 * torch.tensor([math.cos(k * math.pi / 4), math.sin(k * math.pi / 4)]).double()
        torch.testing.assert_close(xk.mean(0), centre, atol=0.03, rtol=0)
        # the C2OT harness variance, sqrt(0.1) (torchcfm passes sqrt(var) as the covariance)
        torch.testing.assert_close(xk.var(0), torch.full((2,), math.sqrt(0.1)).double(), rtol=0.08, atol=0)
    assert stats.chisquare(torch.bincount(d.label, minlength=8).numpy()).pvalue > 1e-3


@pytest.mark.parametrize("name", sorted(toy.DISTRIBUTIONS))
def test_toy_distributions_are_seeded_and_labelled(name):
    a = toy.sample(name, 500, torch.Generator().manual_seed(3))
    b = toy.sample(name, 500, torch.Generator().manual_seed(3))
    assert torch.equal(a.x, b.x) and torch.equal(a.label, b.label)
    assert a.x.shape == (500, 2) and a.x.dtype == torch.float32
    assert set(a.label.unique().tolist()) == set(range(a.num_classes))
    assert set(a.conditions()) == {"label", "angle", "xcoord"}


def test_toy_source_from_seeds_matches_its_distribution():
    src = ToySource("8gaussians")
    x = src.from_seeds(torch.arange(20000)).x0
    ref = toy.sample("8gaussians", 20000, torch.Generator().manual_seed(0)).x
    for dim in range(2):
        assert stats.ks_2samp(x[:, dim].numpy(), ref[:, dim].numpy()).pvalue > 1e-3


def test_seeded_noise_is_standard_normal_and_deterministic():
    z = seeded_normal(torch.arange(50000), (3,))
    for dim in range(3):
        assert stats.kstest(z[:, dim].numpy(), "norm").pvalue > 1e-3
    assert abs(np.corrcoef(z[:, 0].numpy(), z[:, 1].numpy())[0, 1]) < 0.02
    assert torch.equal(z[:10], seeded_normal(torch.arange(10), (3,)))
    u = seeded_uniform(torch.arange(50000), 1)[:, 0]
    assert stats.kstest(u.numpy(), "uniform").pvalue > 1e-3
    assert float(u.min()) > 0 and float(u.max()) < 1


def test_gaussian_source_scale():
    x = GaussianSource((2,), std=3.0).sample(40000, torch.Generator().manual_seed(0)).x0
    assert x.std().item() == pytest.approx(3.0, rel=0.02)
