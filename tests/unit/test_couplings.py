"""Couplings against brute force over all permutations (n <= 7) and LOOM's invariants."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from sourceflow.flow.couplings import (
    Batch,
    C2OTCoupling,
    Independent,
    LoomCoupling,
    MinibatchOT,
    ModeCoupling,
    assign,
    mean_coupling_cost,
    search_weight,
    sq_cost_matrix,
)
from sourceflow.flow.sources import GaussianSource, GMMSource, SourceDraw, ToySource
from sourceflow.gmm.diag import DiagGMM
from sourceflow.train.checkpoint import load_checkpoint, save_checkpoint


def brute_force(cost: np.ndarray, allowed=None) -> float:
    """Minimum of Σ_j cost[perm[j], j] over all permutations (optionally only allowed pairs)."""
    n = cost.shape[0]
    best = np.inf
    for perm in itertools.permutations(range(n)):
        if allowed is not None and not all(allowed[perm[j], j] for j in range(n)):
            continue
        best = min(best, sum(cost[perm[j], j] for j in range(n)))
    return best


@pytest.mark.parametrize("n", [2, 3, 5, 7])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_minibatch_ot_is_the_brute_force_optimum(n, seed):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(n, 3, generator=g) * 2
    src = GaussianSource((3,))
    pair = MinibatchOT().pair(Batch(x1, torch.arange(n)), src, torch.Generator().manual_seed(seed + 10))
    fresh = src.sample(n, torch.Generator().manual_seed(seed + 10)).x0  # the same draws, unpaired
    cost = sq_cost_matrix(fresh, x1).numpy()
    assert pair.cost().double().sum().item() == pytest.approx(brute_force(cost), rel=1e-6)
    # each source draw used exactly once
    assert sorted(map(tuple, pair.x0.tolist())) == sorted(map(tuple, fresh.tolist()))
    torch.testing.assert_close(pair.x1, x1)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_c2ot_classes_never_cross_and_are_optimal(seed):
    n = 7
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(n, 2, generator=g)
    labels = torch.tensor([0, 1, 0, 1, 1, 2, 0])
    src = GaussianSource((2,))
    pair = C2OTCoupling().pair(Batch(x1, torch.arange(n), labels), src, torch.Generator().manual_seed(seed))
    fresh = src.sample(n, torch.Generator().manual_seed(seed)).x0
    cost = sq_cost_matrix(fresh, x1).numpy()
    allowed = (labels[:, None] == labels[None, :]).numpy()  # x0_i carries the label of x1_i
    assert pair.cost().double().sum().item() == pytest.approx(brute_force(cost, allowed), rel=1e-6)
    rows = [int(np.flatnonzero((fresh == r).all(1).numpy())[0]) for r in pair.x0]
    assert all(labels[i] == labels[j] for j, i in enumerate(rows))


def test_c2ot_continuous_fixed_weight_is_brute_force_optimum():
    n, w = 6, 3.0
    g = torch.Generator().manual_seed(5)
    x1 = torch.randn(n, 2, generator=g)
    c = torch.randn(n, 1, generator=g)
    src = GaussianSource((2,))
    pair = C2OTCoupling(weight=w).pair(Batch(x1, torch.arange(n), c), src, torch.Generator().manual_seed(1))
    fresh = src.sample(n, torch.Generator().manual_seed(1)).x0
    total = (sq_cost_matrix(fresh, x1) + w * sq_cost_matrix(c, c)).numpy()
    rows = [int(np.flatnonzero((fresh == r).all(1).numpy())[0]) for r in pair.x0]
    assert sum(total[i, j] for j, i in enumerate(rows)) == pytest.approx(brute_force(total), rel=1e-9)


def test_c2ot_weight_search_hits_the_target_ratio():
    g = torch.Generator().manual_seed(0)
    m = sq_cost_matrix(torch.randn(200, 2, generator=g), torch.randn(200, 2, generator=g))
    cc = torch.randn(200, 1, generator=g)
    c = sq_cost_matrix(cc, cc)
    w = search_weight(m, c, 0.05, initial=100.0, max_iter=60, tol=1e-3)
    frac = float(((m + w * c) <= torch.diagonal(m)[None, :]).double().mean())
    assert abs(frac - 0.05) < 2e-3
    assert float(((m + 0.0 * c) <= torch.diagonal(m)[None, :]).double().mean()) > 0.05


def test_assign_returns_inverse_of_scipy_columns():
    cost = torch.tensor([[1.0, 10.0, 10.0], [10.0, 10.0, 1.0], [10.0, 1.0, 10.0]])
    perm = assign(cost)  # x0[perm[j]] pairs with x1[j]
    assert perm.tolist() == [0, 2, 1]


def test_loom_total_cost_never_increases_and_cache_survives_a_checkpoint(tmp_path):
    n, b = 64, 16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, generator=g) * 3 + 2
    src = ToySource("8gaussians")
    loom = LoomCoupling(num_data=n, num_caches=2, seed=3)

    def total() -> float:
        # seeds move between (datapoint, slot) cells, so the invariant is the total over all cells
        full = Batch(x, torch.arange(n))
        # LOOM minimises the plain Euclidean distance, so that total is the one that never increases
        return sum(float(loom.current_pairs(full, src, s).cost().double().sqrt().sum()) for s in range(2))

    history = [total()]
    for epoch in range(6):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
        for k in range(0, n, b):
            idx = perm[k:k + b]
            loom.pair(Batch(x[idx], idx), src, torch.Generator().manual_seed(100 * epoch + k))
            history.append(total())
    for before, after in zip(history, history[1:], strict=False):
        assert after <= before + 1e-6
    assert history[-1] < 0.8 * history[0]  # it actually learns a better coupling
    # seeds are only permuted, never redrawn
    assert sorted(loom.seeds.flatten().tolist()) == sorted(LoomCoupling(n, 2, seed=3).seeds.flatten().tolist())

    save_checkpoint(tmp_path / "last", {"method": {f"coupling.{k}": v for k, v in loom.state_dict().items()}},
                    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1).state_dict(), {"step": 1})
    parts, _, info = load_checkpoint(tmp_path / "last", ["method"])
    fresh = LoomCoupling(num_data=n, num_caches=2, seed=99)
    fresh.load_state_dict({k[len("coupling."):]: v for k, v in parts["method"].items()})
    assert torch.equal(fresh.seeds, loom.seeds) and info["step"] == 1
    with pytest.raises(ValueError, match="does not match"):
        LoomCoupling(num_data=n + 1, num_caches=2).load_state_dict(loom.state_dict())


def test_loom_solves_on_the_plain_euclidean_distance_like_loom_cfm():
    """LOOM-CFM's assignment minimises sum ||x0 - x1|| (torch.cdist), not the squared distance that
    OT-CFM uses; checked against brute force over all permutations where the two optima differ."""
    n = 6
    src = GaussianSource((2,))
    found = 0
    for trial in range(60):
        x1 = torch.randn(n, 2, generator=torch.Generator().manual_seed(1000 + trial)) * 2
        loom = LoomCoupling(num_data=n, num_caches=1, seed=trial)
        x0 = src.from_seeds(loom.seeds[:, 0]).x0
        d = torch.cdist(x0.double(), x1.double())

        def best(c: torch.Tensor) -> tuple[int, ...]:
            # perm[j] = the x0 row paired with x1[j]
            return min(itertools.permutations(range(n)), key=lambda p: float(sum(c[p[j], j] for j in range(n))))

        euclid, squared = best(d), best(d ** 2)
        if euclid == squared:
            continue
        found += 1
        pair = loom.pair(Batch(x1, torch.arange(n)), src, torch.Generator().manual_seed(0))
        torch.testing.assert_close(pair.x0, x0[list(euclid)])
        sq = MinibatchOT().pair(Batch(x1, torch.arange(n)), _FixedDraw(x0), None)
        torch.testing.assert_close(sq.x0, x0[list(squared)])
        eu = MinibatchOT(cost="euclidean").pair(Batch(x1, torch.arange(n)), _FixedDraw(x0), None)
        torch.testing.assert_close(eu.x0, x0[list(euclid)])
    assert found >= 3  # the two costs really disagree on some of these instances


class _FixedDraw(GaussianSource):
    """A source whose every draw is the same fixed x0 (to compare couplings on one instance)."""

    def __init__(self, x0: torch.Tensor):
        super().__init__(tuple(x0.shape[1:]))
        self.fixed = x0

    def sample(self, n, generator=None, cond=None, mode=None, device=None):
        return SourceDraw(self.fixed[:n].clone())


def test_loom_refuses_a_batch_that_holds_a_datapoint_twice():
    loom = LoomCoupling(num_data=8, num_caches=1, seed=0)
    idx = torch.tensor([0, 1, 2, 2])
    with pytest.raises(ValueError, match="twice"):
        loom.pair(Batch(torch.randn(4, 2), idx), GaussianSource((2,)), None)


def test_loom_regenerates_the_same_noise_from_seeds():
    src = GaussianSource((4,))
    seeds = torch.tensor([5, 7, 5])
    a = src.from_seeds(seeds).x0
    assert torch.equal(a[0], a[2]) and not torch.equal(a[0], a[1])
    assert torch.equal(a, src.from_seeds(seeds).x0)


def test_mode_coupling_hard_matches_argmax_posterior_and_soft_samples_it():
    means = torch.tensor([[-4.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    gmm = DiagGMM(torch.tensor([0.2, 0.5, 0.3]).double(), means.double(), torch.ones(3, 2).double())
    src = GMMSource(gmm.weights, gmm.means, gmm.variances, variance="spherical")
    x1 = torch.tensor([[-4.1, 0.2], [3.8, -0.1], [0.1, 4.2], [0.0, 0.0]])
    hard = ModeCoupling(gmm, "hard").pair(Batch(x1, torch.arange(4)), src, torch.Generator().manual_seed(0))
    assert hard.mode.tolist()[:3] == [0, 1, 2]
    assert hard.mode.tolist()[3] == int(gmm.posterior(x1[3:].double()).argmax())
    # soft: empirical mode frequencies follow the posterior of an ambiguous point
    xs = torch.zeros(20000, 2)
    soft = ModeCoupling(gmm, "soft").pair(Batch(xs, torch.arange(20000)), src, torch.Generator().manual_seed(1))
    freq = torch.bincount(soft.mode, minlength=3).double() / 20000
    torch.testing.assert_close(freq, gmm.posterior(xs[:1].double())[0], atol=0.015, rtol=0)


def test_mean_coupling_cost_orders_the_couplings():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 2, generator=g) * 2 + 1
    batches = [Batch(x[i:i + 32], torch.arange(i, i + 32)) for i in range(0, 128, 32)]
    src = GaussianSource((2,))
    ind = mean_coupling_cost(Independent(), batches, src, torch.Generator().manual_seed(0))
    ot = mean_coupling_cost(MinibatchOT(), batches, src, torch.Generator().manual_seed(0))
    assert ot < ind
