"""Fréchet distance against the scipy sqrtm formula (pytorch-fid's, without disp), closed forms and
numpy; streaming statistics against numpy; reference npz I/O."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from threadpoolctl import threadpool_limits

from sourceflow.metrics.frechet import (
    FeatureStats,
    frechet_distance,
    load_reference_npz,
    read_reference_npz,
    save_reference_npz,
    trace_sqrt_product,
)


@pytest.fixture(autouse=True)
def one_blas_thread():
    """One BLAS thread: on a shared 2-core machine OpenBLAS threads that wait on a busy core made the
    2048-d sqrtm take 100 s instead of 20 s."""
    with threadpool_limits(1):
        yield


def sqrtm_fd(mu1, s1, mu2, s2) -> float:
    """pytorch-fid's formula: sqrtm of the product, real part."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def stats_pair(d: int, n: int, seed: int = 0):
    """Two different, realistically conditioned sample statistics (from n samples each)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.uniform(0.2, 2.0, size=d)
    mix = np.eye(d) + rng.normal(scale=0.5 / np.sqrt(d), size=(d, d))
    y = rng.normal(size=(n, d)) @ mix + 0.05
    return x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)


def test_equals_the_sqrtm_formula_small():
    mu1, s1, mu2, s2 = stats_pair(256, 600)
    ref = sqrtm_fd(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-6)
    # the trace term alone, both orders (tr (Σ1Σ2)^½ = tr (Σ2Σ1)^½)
    tr = np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
    assert trace_sqrt_product(s1, s2) == pytest.approx(tr, rel=1e-9)
    assert trace_sqrt_product(s2, s1) == pytest.approx(tr, rel=1e-9)


@pytest.mark.slow
def test_equals_the_sqrtm_formula_2048d():
    """The Inception case: 2048-d covariances from 3000 samples (scipy sqrtm takes ~20 s here)."""
    mu1, s1, mu2, s2 = stats_pair(2048, 3000, seed=1)
    ref = sqrtm_fd(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-6)


def test_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(2)
    a, b = rng.uniform(0.1, 3, 50), rng.uniform(0.1, 3, 50)
    mu1, mu2 = rng.normal(size=50), rng.normal(size=50)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_singular_covariances_fewer_samples_than_dims():
    rng = np.random.default_rng(3)
    d = 128
    x, y = rng.normal(size=(40, d)), rng.normal(size=(60, d)) * 1.3
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    assert np.linalg.matrix_rank(s1) < d
    # independent reference: eigenvalues of the non-symmetric product Σ1Σ2 (real, ≥ 0 up to round-off)
    lam = np.linalg.eigvals(s1 @ s2)
    tr = np.sqrt(np.clip(lam.real, 0, None)).sum()
    assert trace_sqrt_product(s1, s2) == pytest.approx(tr, rel=1e-8)
    assert trace_sqrt_product(s2, s1) == pytest.approx(tr, rel=1e-8)
    fd = frechet_distance(x.mean(0), s1, y.mean(0), s2)
    assert np.isfinite(fd) and fd > 0
    # a covariance of rank 1 and an all-zero one
    assert frechet_distance(np.zeros(3), np.zeros((3, 3)), np.zeros(3), np.diag([4.0, 0, 0])) == pytest.approx(4.0)


def test_identical_statistics_give_zero_and_noise_increases_it():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2000, 64)) @ rng.normal(size=(64, 64))
    mu, s = x.mean(0), np.cov(x, rowvar=False)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-8 * np.trace(s)
    fds = []
    for scale in (0.1, 0.5, 1.0, 2.0):
        y = x + scale * rng.normal(size=x.shape)
        fds.append(frechet_distance(mu, s, y.mean(0), np.cov(y, rowvar=False)))
    assert all(a < b for a, b in zip(fds, fds[1:], strict=False)), fds


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="do not describe one Gaussian"):
        frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))


def test_feature_stats_equal_numpy_mean_and_cov():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(1037, 32)) * 0.01 + 1000.0  # |μ| ≫ σ: the shifted sums keep the digits
    fs = FeatureStats(32)
    for start in range(0, len(x), 100):
        fs.update(torch.from_numpy(x[start:start + 100]).float() if start == 0 else x[start:start + 100])
    x[:100] = x[:100].astype(np.float32)  # the first chunk went in as float32
    assert fs.n == 1037
    np.testing.assert_allclose(fs.mu, x.mean(0), rtol=1e-13)
    np.testing.assert_allclose(fs.sigma, np.cov(x, rowvar=False), rtol=1e-8, atol=1e-14)
    with pytest.raises(ValueError, match="expected 32"):
        fs.update(np.zeros((2, 31)))
    with pytest.raises(ValueError, match="at least 2"):
        _ = FeatureStats(4).sigma


def test_reference_npz_roundtrip_and_errors(tmp_path):
    rng = np.random.default_rng(6)
    feats = rng.normal(size=(50, 8)).astype(np.float32)
    mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
    path = tmp_path / "ref" / "feature-net.npz"
    save_reference_npz(path, mu, sigma, features=feats, label_hist=np.full(10, 0.1))
    assert sorted(p.name for p in path.parent.iterdir()) == ["feature-net.npz"]  # no temp file left
    m2, s2 = load_reference_npz(path)
    assert m2.dtype == np.float64 and s2.dtype == np.float64
    np.testing.assert_allclose(m2, mu)
    np.testing.assert_allclose(s2, sigma)
    arrays = read_reference_npz(path)
    assert arrays["features"].dtype == np.float32 and arrays["label_hist"].shape == (10,)

    # an ADM reference batch: float32 mu/sigma plus the spatial keys, read as float64
    adm = tmp_path / "VIRTUAL_tiny.npz"
    np.savez(adm, mu=mu.astype(np.float32), sigma=sigma.astype(np.float32), mu_s=mu, sigma_s=sigma)
    m3, s3 = load_reference_npz(adm)
    assert m3.dtype == np.float64 and np.allclose(m3, mu, atol=1e-6)

    bad = tmp_path / "bad.npz"
    np.savez(bad, mu=mu)
    with pytest.raises(KeyError, match=f"{bad}: missing key 'sigma'"):
        load_reference_npz(bad)
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_reference_npz(tmp_path / "nope.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.npz"):
        load_reference_npz(tmp_path / "junk.npz")


def test_reference_npz_reads_only_the_arrays_asked_for(tmp_path):
    """An ADM reference batch holds ~2 GB of images (arr_0) beside mu / sigma: readers that need the
    statistics only must not load them."""
    from sourceflow.metrics.frechet import read_reference_npz

    path = tmp_path / "ref.npz"
    np.savez(path, mu=np.zeros(3), sigma=np.eye(3), mu_s=np.ones(2), arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    some = read_reference_npz(path, keys=("mu_s", "holdout_fd"))
    assert sorted(some) == ["mu", "mu_s", "sigma"]
    assert sorted(read_reference_npz(path)) == ["arr_0", "mu", "mu_s", "sigma"]
