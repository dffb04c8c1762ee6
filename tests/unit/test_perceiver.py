"""PerceiverSource (CSFM's source network): output contract with LearnedSource, zero init, masking,
unpatchify layout, gradients through x0 = μ + σ·ε, and that it can fit a condition-dependent mean."""

from __future__ import annotations

import math

import pytest
import torch

from sourceflow.flow.sources import LearnedSource
from sourceflow.models.dit import patchify, unpatchify
from sourceflow.models.embed import CondSpec, pack_text
from sourceflow.models.perceiver import PerceiverSource

E, L = 12, 6
TEXT = CondSpec("text", E, L)
SHAPE = (3, 4, 6)
D = math.prod(SHAPE)


def small(cond: CondSpec = TEXT, shape=SHAPE, **kw) -> PerceiverSource:
    kw = {"width": 32, "depth": 2, "heads": 4, **kw}
    return PerceiverSource(cond, shape, **kw)


def text_batch(b: int, lengths: list[int], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(b, L, E, generator=g)
    mask = torch.arange(L)[None] < torch.tensor(lengths)[:, None]
    return pack_text(tokens, mask)


def perturb_heads(net: PerceiverSource, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in (net.mean_head, net.logvar_head):
            if head is not None:
                head.weight.copy_(0.3 * torch.randn(head.weight.shape, generator=g))
                head.bias.copy_(0.1 * torch.randn(head.bias.shape, generator=g))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("learn_var, width", [(True, 2 * D), (False, D)])
@pytest.mark.parametrize("patch", [1, 2])
def test_output_shape_matches_learned_source_contract(learn_var, width, patch):
    net = small(patch=patch, learn_var=learn_var)
    assert net.num_tokens == (4 // patch) * (6 // patch)
    out = net(text_batch(5, [6, 3, 1, 2, 6]))
    assert out.shape == (5, width)
    mean, logvar = LearnedSource(net, SHAPE, learn_var=learn_var).stats(text_batch(5, [6, 3, 1, 2, 6]))
    assert mean.shape == logvar.shape == (5, *SHAPE)


def test_initial_source_starts_like_csfm_for_every_condition():
    """CSFM's log-variance head: weights N(0, 1e-4²), bias init_logvar = 1, so log σ² ≈ 1 everywhere;
    the mean head small (not the alignment loss's singular μ = 0)."""
    net = small()
    assert float(net.logvar_head.weight.detach().std()) == pytest.approx(1e-4, rel=0.2)
    assert torch.equal(net.logvar_head.bias, torch.ones_like(net.logvar_head.bias))
    src = LearnedSource(net, SHAPE, learn_var=True)
    cond = text_batch(4, [6, 2, 0, 5])
    mean, logvar = src.stats(cond)
    torch.testing.assert_close(logvar, torch.ones_like(logvar), atol=1e-2, rtol=0)
    assert 0 < mean.abs().max() < 0.5 and mean.std() < 0.2
    z = torch.randn(4, *SHAPE)
    torch.testing.assert_close(src.transform(z, torch.rand(4, 1), cond).x0, mean + torch.exp(0.5 * logvar) * z)
    # the released model fixes σ = 1: no log-variance head at all
    fixed = LearnedSource(small(learn_var=False), SHAPE, learn_var=False)
    m2, lv2 = fixed.stats(cond)
    assert torch.equal(lv2, torch.zeros_like(lv2))


def test_padding_does_not_change_the_output_but_a_real_token_does():
    net = small()
    perturb_heads(net)
    cond = text_batch(3, [2, 4, 6])
    base = net(cond)
    assert base.abs().max() > 1e-3
    # different (even non-finite) contents at padded positions: same output
    noisy = cond.clone()
    noisy[0, 2:, :-1] = torch.randn(L - 2, E) * 100
    noisy[1, 4:, :-1] = float("nan")
    assert torch.allclose(net(noisy), base, atol=1e-6)
    # dropping the padding altogether (shorter L): same output for the rows that fit
    assert torch.allclose(net(cond[:2, :4]), base[:2], atol=1e-5)
    # changing a real token changes that row only
    changed = cond.clone()
    changed[0, 1, :-1] += 1.0
    out = net(changed)
    assert (out[0] - base[0]).abs().max() > 1e-4
    assert torch.allclose(out[1:], base[1:], atol=1e-6)


def test_all_padding_rows_are_finite_and_condition_independent():
    net = small()
    perturb_heads(net)
    a = net(text_batch(2, [0, 0], seed=1))
    b = net(text_batch(2, [0, 3], seed=2))
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    # an empty caption attends only to the learned null token: one output whatever the padding holds
    assert torch.allclose(a[0], a[1], atol=1e-6) and torch.allclose(a[0], b[0], atol=1e-6)
    assert (b[1] - b[0]).abs().max() > 1e-4
    b[0].sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


@pytest.mark.parametrize("patch", [1, 2])
def test_unpatchify_is_the_exact_inverse_of_a_reference_patchify(patch):
    c, h, w = SHAPE
    hp, wp = h // patch, w // patch
    f = c * patch * patch
    # token n, feature k carries the value 1000·n + k
    tokens = (1000 * torch.arange(hp * wp)[:, None] + torch.arange(f)[None]).float()[None].repeat(2, 1, 1)
    x = unpatchify(tokens, (hp, wp), patch, c)
    for ci in range(c):
        for y in range(h):
            for xx in range(w):
                n = (y // patch) * wp + xx // patch
                k = ((y % patch) * patch + xx % patch) * c + ci
                assert x[1, ci, y, xx].item() == 1000 * n + k
    assert torch.equal(patchify(x, patch), tokens)
    img = torch.randn(2, *SHAPE)
    assert torch.equal(unpatchify(patchify(img, patch), (hp, wp), patch, c), img)


@pytest.mark.parametrize("patch", [1, 2])
def test_network_output_layout_is_mean_then_logvar_in_chw_order(patch):
    """Feed known per-token features into the heads and check where they land in the flat output."""
    net = small(patch=patch)
    c, h, w = SHAPE
    wp = w // patch
    f = c * patch * patch
    with torch.no_grad():
        net.mean_head.weight.zero_()
        net.mean_head.weight[:, 0] = 1.0
        net.mean_head.bias.copy_(1000.0 * torch.arange(f))
        net.logvar_head.weight.copy_(-net.mean_head.weight)
        net.logvar_head.bias.copy_(-net.mean_head.bias)

    def known(module, args, out):  # token n's feature 0 = n, the rest 0
        h_ = torch.zeros_like(out)
        h_[..., 0] = torch.arange(out.shape[1], dtype=out.dtype)
        return h_

    net.norm_out.register_forward_hook(known)
    out = net(text_batch(2, [3, 5]))
    mean = out[:, :D].reshape(2, *SHAPE)
    logvar = out[:, D:].reshape(2, *SHAPE)
    for ci in range(c):
        for y in range(h):
            for xx in range(w):
                n = (y // patch) * wp + xx // patch
                k = ((y % patch) * patch + xx % patch) * c + ci
                assert mean[0, ci, y, xx].item() == n + 1000 * k
    assert torch.equal(logvar, -mean)


def test_flow_matching_gradients_reach_the_network_through_x0():
    net = small()
    src = LearnedSource(net, SHAPE, learn_var=True)
    cond = text_batch(4, [6, 3, 2, 5])
    x1 = torch.randn(4, *SHAPE)
    a = torch.randn(D, D) / math.sqrt(D)

    def fm_loss() -> torch.Tensor:
        draw = src.sample(4, torch.Generator().manual_seed(3), cond=cond)
        t = torch.rand(4, generator=torch.Generator().manual_seed(4)).view(-1, 1, 1, 1)
        xt = (1 - t) * draw.x0 + t * x1
        v = (xt.reshape(4, -1) @ a).reshape_as(xt)  # a fixed velocity field
        return (v - (x1 - draw.x0)).pow(2).mean()

    # at init the log-variance head is zero: the heads get gradients (x0 = μ + σ·ε depends on each)
    fm_loss().backward()
    assert net.mean_head.weight.grad.abs().sum() > 0 and net.logvar_head.weight.grad.abs().sum() > 0
    # once the heads are nonzero, the gradient reaches every parameter (no stop-gradient through x0)
    perturb_heads(net)
    net.zero_grad()
    fm_loss().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing


def test_discrete_and_continuous_conditions():
    net = small(CondSpec("discrete", 5))
    perturb_heads(net)
    ids = torch.tensor([0, 1, 4, 5])  # 5 = the CFG null id
    out = net(ids)
    assert out.shape == (4, 2 * D) and torch.isfinite(out).all()
    assert (out[0] - out[1]).abs().max() > 1e-4
    assert torch.allclose(net(ids[:1]), out[:1], atol=1e-6)

    net = small(CondSpec("continuous", 3), learn_var=False)
    perturb_heads(net)
    v = torch.randn(4, 3)
    out = net(v)
    assert out.shape == (4, D) and (out[0] - out[1]).abs().max() > 1e-4
    mean, logvar = LearnedSource(net, SHAPE, learn_var=False).stats(v)
    assert mean.shape == (4, *SHAPE) and torch.equal(logvar, torch.zeros_like(logvar))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="condition"):
        PerceiverSource(CondSpec(), SHAPE)
    with pytest.raises(ValueError, match=r"H=4, W=6.*patch=4"):
        PerceiverSource(TEXT, SHAPE, patch=4)
    with pytest.raises(ValueError, match="packed"):
        small()(torch.randn(2, L, E))


@pytest.mark.parametrize("cond", ["text", "discrete"])
def test_adam_fits_a_condition_dependent_mean(cond):
    g = torch.Generator().manual_seed(0)
    if cond == "text":
        net = small(patch=2)
        c = text_batch(4, [6, 4, 2, 5], seed=5)
    else:
        net = small(CondSpec("discrete", 4), patch=2)
        c = torch.arange(4)
    target = torch.randn(4, *SHAPE, generator=g)
    src = LearnedSource(net, SHAPE, learn_var=True)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        mean, _ = src.stats(c)
        loss = (mean - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
