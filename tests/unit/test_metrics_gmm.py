"""W2 against brute force; GMM densities against scipy / scikit-learn."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.mixture import GaussianMixture

from sourceflow.gmm.diag import DiagGMM
from sourceflow.metrics.wasserstein import condition_groups, w2_squared


@pytest.mark.parametrize("n", [3, 6])
def test_w2_equals_the_best_matching(n):
    rng = np.random.default_rng(n)
    a, b = rng.normal(size=(n, 2)), rng.normal(size=(n, 2)) + 1
    best = min(np.mean(np.sum((a[list(p)] - b) ** 2, axis=1)) for p in itertools.permutations(range(n)))
    assert w2_squared(a, b) == pytest.approx(best, rel=1e-9)


def test_w2_of_shifted_copies_is_the_squared_shift():
    a = np.random.default_rng(0).normal(size=(400, 2))
    assert w2_squared(a, a + np.array([3.0, 4.0])) == pytest.approx(25.0, rel=1e-9)
    assert w2_squared(a, a) == pytest.approx(0.0, abs=1e-12)


def test_condition_groups_classes_and_bins():
    groups = condition_groups(np.array([0, 1, 1, 2]), np.array([0, 0, 1, 2]), bins=3)
    assert [g[0] for g in groups] == ["label=0", "label=1", "label=2"]
    c = np.linspace(-1, 1, 100)[:, None]
    bins = condition_groups(c, c, bins=4)
    assert len(bins) == 4 and sum(int(m.sum()) for _, m, _ in bins) == 100


def test_diag_gmm_log_prob_matches_scipy_and_sklearn():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 3)) * 2
    gm = GaussianMixture(4, covariance_type="diag", random_state=0).fit(x)
    gmm = DiagGMM(torch.from_numpy(gm.weights_), torch.from_numpy(gm.means_), torch.from_numpy(gm.covariances_))
    np.testing.assert_allclose(gmm.log_prob(torch.from_numpy(x)).numpy(), gm.score_samples(x), rtol=1e-10)
    np.testing.assert_allclose(gmm.posterior(torch.from_numpy(x)).numpy(), gm.predict_proba(x), atol=1e-10)
    k = 2
    ref = np.log(gm.weights_[k]) + stats.multivariate_normal(gm.means_[k], np.diag(gm.covariances_[k])).logpdf(x)
    np.testing.assert_allclose(gmm.log_prob_components(torch.from_numpy(x))[:, k].numpy(), ref, rtol=1e-10)


def test_diag_gmm_round_trip(tmp_path):
    g = DiagGMM(torch.tensor([0.3, 0.7]).double(), torch.randn(2, 5).double(), torch.rand(2, 5).double() + 0.1)
    g.save(tmp_path / "g.safetensors")
    h = DiagGMM.load(tmp_path / "g.safetensors")
    assert torch.equal(g.means, h.means) and torch.equal(g.variances, h.variances)
    with pytest.raises(FileNotFoundError, match="GMM file not found"):
        DiagGMM.load(tmp_path / "missing.safetensors")
