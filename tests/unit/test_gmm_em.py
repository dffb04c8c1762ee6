"""Chunked EM and k-means++ seeds against scikit-learn; the fit_cls_gmm stage end to end on a tiny store."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file
from sklearn.cluster import kmeans_plusplus as sk_kmeans_plusplus
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from sourceflow.gmm.diag import DiagGMM
from sourceflow.gmm.em import fit_diag_gmm, init_from_rows, iter_posteriors, predict
from sourceflow.gmm.kmeans import Rows, kmeans_plusplus
from sourceflow.io import read_timings

ROOT = Path(__file__).resolve().parents[2]


def mixture_data(n: int, d: int, k: int, seed: int = 0, sep: float = 3.0) -> np.ndarray:
    """Rows drawn from a random diagonal GMM (float64)."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(k, d)) * sep
    sd = rng.uniform(0.3, 1.5, size=(k, d))
    z = rng.integers(0, k, n)
    return mu[z] + sd[z] * rng.normal(size=(n, d))


def sklearn_gm(x: np.ndarray, k: int, **kw) -> GaussianMixture:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return GaussianMixture(k, covariance_type="diag", reg_covar=1e-6, **kw).fit(x)


@pytest.mark.parametrize(("n", "d", "k"), [(400, 2, 7), (3000, 16, 40)])
def test_kmeans_plusplus_rows_equal_sklearn(n, d, k):
    x = mixture_data(n, d, max(2, k // 3), seed=n)
    for seed in range(3):
        centers, idx = kmeans_plusplus(x, k, random_state=seed, chunk_rows=97)
        ref_centers, ref_idx = sk_kmeans_plusplus(x, k, random_state=seed)
        np.testing.assert_array_equal(idx, ref_idx)
        np.testing.assert_array_equal(centers.numpy(), ref_centers)
    # the same from a read(start, stop) callable (e.g. a zarr array) instead of an in-memory matrix
    _, idx = kmeans_plusplus(Rows(lambda a, b: x[a:b], num_rows=n), k, random_state=5, chunk_rows=64)
    np.testing.assert_array_equal(idx, sk_kmeans_plusplus(x, k, random_state=5)[1])


def test_em_equals_sklearn_from_its_own_kmeanspp_init():
    """Same seed rows, same one-hot init, same iterations: parameters and log-likelihood trace agree."""
    x = mixture_data(2000, 6, 5, seed=1, sep=1.5)
    k, seed = 8, 3
    for tol, max_iter in [(0.0, 12), (1e-3, 200)]:
        ref = sklearn_gm(x, k, init_params="k-means++", random_state=seed, tol=tol, max_iter=max_iter)
        for chunk_rows in (len(x), 37):
            fit = fit_diag_gmm(x, k, tol=tol, max_iter=max_iter, seed=seed, chunk_rows=chunk_rows)
            assert fit.init == "k-means++" and fit.n_iter == ref.n_iter_ and fit.converged == ref.converged_
            np.testing.assert_array_equal(fit.seed_rows, sk_kmeans_plusplus(x, k, random_state=seed)[1])
            np.testing.assert_allclose(fit.gmm.means.numpy(), ref.means_, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(fit.gmm.variances.numpy(), ref.covariances_, rtol=1e-9)
            np.testing.assert_allclose(fit.gmm.weights.numpy(), ref.weights_, rtol=1e-9)
            np.testing.assert_allclose(fit.log_likelihood, ref.lower_bounds_, rtol=1e-12)
    np.testing.assert_array_equal(predict(fit.gmm, x, chunk_rows=100).numpy(), ref.predict(x))
    post = torch.cat([p for _, p in fit.posteriors(x, chunk_rows=300)])
    np.testing.assert_allclose(post.numpy(), ref.predict_proba(x), atol=1e-9)


def test_em_equals_sklearn_from_a_given_init():
    x = mixture_data(1500, 4, 4, seed=2, sep=2.0)
    rng = np.random.default_rng(0)
    w = rng.uniform(0.5, 1, 6)
    init = DiagGMM(torch.from_numpy(w / w.sum()), torch.from_numpy(x[rng.choice(len(x), 6, replace=False)]),
                   torch.from_numpy(rng.uniform(0.5, 2, (6, 4))))
    ref = sklearn_gm(x, 6, weights_init=init.weights.numpy(), means_init=init.means.numpy(),
                     precisions_init=1 / init.variances.numpy(), tol=0, max_iter=15)
    fit = fit_diag_gmm(x, 6, init=init, tol=0, max_iter=15, chunk_rows=128)
    assert fit.init == "given" and fit.n_iter == 15
    np.testing.assert_allclose(fit.gmm.means.numpy(), ref.means_, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(fit.log_likelihood, ref.lower_bounds_, rtol=1e-12)


def test_chunked_sparse_and_reader_paths_agree():
    """Chunk size, the sparse/dense statistics paths and the data source only change summation order."""
    x = mixture_data(3000, 12, 6, seed=3, sep=4.0)  # well separated: most responsibilities are exactly 0
    kw = dict(tol=0, max_iter=8, seed=1)
    base = fit_diag_gmm(torch.from_numpy(x), 6, chunk_rows=len(x), sparse_density=0.0, **kw)  # dense only
    for other in (fit_diag_gmm(x, 6, chunk_rows=101, sparse_density=1.0, **kw),  # sparse only
                  fit_diag_gmm(Rows(lambda a, b: x[a:b], num_rows=len(x)), 6, chunk_rows=256, **kw)):
        np.testing.assert_allclose(other.gmm.means.numpy(), base.gmm.means.numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(other.gmm.variances.numpy(), base.gmm.variances.numpy(), rtol=1e-10)
        np.testing.assert_allclose(other.log_likelihood, base.log_likelihood, rtol=1e-12)


def test_float32_mode_is_close_to_float64():
    x = mixture_data(4000, 32, 8, seed=4, sep=1.0) + 20.0  # an offset: centring keeps float32 accurate
    f64 = fit_diag_gmm(x, 8, tol=0, max_iter=10, seed=0)
    f32 = fit_diag_gmm(torch.from_numpy(x).float(), 8, tol=0, max_iter=10, seed=0, dtype=torch.float32,
                       chunk_rows=500)
    assert f32.seed_rows is not None
    np.testing.assert_allclose(f32.log_likelihood[1:], f64.log_likelihood[1:], rtol=1e-6)
    np.testing.assert_allclose(f32.gmm.means.numpy(), f64.gmm.means.numpy(), atol=1e-4)
    assert (predict(f32.gmm, x, dtype=torch.float32) == predict(f64.gmm, x)).float().mean() > 0.999


def test_init_from_seed_rows_is_sklearns_one_hot_init():
    x = mixture_data(500, 3, 3, seed=5)
    idx = np.array([3, 70, 400])
    resp = np.zeros((500, 3))
    resp[idx, np.arange(3)] = 1
    from sklearn.mixture._gaussian_mixture import _estimate_gaussian_parameters

    nk, means, cov = _estimate_gaussian_parameters(x, resp, 1e-6, "diag")
    g = init_from_rows(torch.from_numpy(x[idx]), 500, 1e-6)
    np.testing.assert_array_equal(g.weights.numpy(), nk / 500)
    np.testing.assert_array_equal(g.means.numpy(), means)
    np.testing.assert_array_equal(g.variances.numpy(), cov)


def test_auto_init_falls_back_to_kmeanspp_without_cuml(caplog):
    x = mixture_data(300, 2, 3, seed=6)
    with caplog.at_level(logging.INFO, logger="sourceflow.gmm"):
        fit = fit_diag_gmm(x, 3, init="auto", max_iter=3)
    assert fit.init == "k-means++"
    assert "k-means++ seeds in torch" in caplog.text and "cuML KMeans needs cuML and a CUDA device" in caplog.text
    with pytest.raises(ValueError, match="needs cuML and a CUDA device"):
        fit_diag_gmm(x, 3, init="cuml", max_iter=3)
    with pytest.raises(ValueError, match="n_components=400"):
        fit_diag_gmm(x, 400)


def test_iter_posteriors_chunks_cover_all_rows():
    x = mixture_data(250, 3, 2, seed=7)
    g = fit_diag_gmm(x, 2, max_iter=5).gmm
    chunks = list(iter_posteriors(g, x, chunk_rows=100))
    assert [s for s, _ in chunks] == [0, 100, 200]
    torch.testing.assert_close(torch.cat([p for _, p in chunks]), g.posterior(torch.from_numpy(x)))


# -- the stage -----------------------------------------------------------------------------------------

def tiny_store(path: Path, cls: np.ndarray, spatial: np.ndarray, flips: bool, shard_rows: int = 16) -> np.ndarray:
    """A complete latent store (written through LatentWriter) over images with manifest index 3·i;
    with flips the second half repeats the images flipped. Returns the index column."""
    from sourceflow.store.latents import LatentWriter, expected_index_flip

    m = len(cls) // (2 if flips else 1)
    LatentWriter.create(path, {"encoder": "test", "weights": None, "encoder_options": {}, "resolution": 8,
                               "manifest_hash": "0" * 16, "split": "train"}, cls_dim=cls.shape[1],
                        spatial_shape=spatial.shape[1:], num_images=m, flips=flips, shard_rows=shard_rows)
    w = LatentWriter(path)
    index, flip = expected_index_flip(np.arange(m) * 3, flips)
    data = {"cls": cls.astype(np.float32), "spatial": spatial.astype(np.float32), "index": index, "flip": flip}
    for s in range(w.num_shards):
        a, b = w.shard_range(s)
        w.write_shard(s, {n: v[a:b] for n, v in data.items()})
    assert w.verify(index, flip) == []
    w.mark_complete()
    return index


def run_stage(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "stages/fit_cls_gmm.py", *args], cwd=ROOT, capture_output=True, text=True)


def test_stage_on_a_store(tmp_path):
    m, k = 120, 4
    cls = mixture_data(m, 5, k, seed=8).astype(np.float32)
    # flipped rows carry different CLS values: the fit must use rows [0, M) only
    cls_all = np.concatenate([cls, cls + 100.0])
    spatial = np.random.default_rng(0).normal(size=(2 * m, 2, 2, 3))
    index = tiny_store(tmp_path / "latents.zarr", cls_all, spatial, flips=True)
    out = tmp_path / "gmm" / f"cls_K{k}.safetensors"
    res = run_stage("--store", str(tmp_path / "latents.zarr"), "--components", str(k), "--chunk-rows", "50",
                    "--seed", "2", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "cuML" not in res.stderr  # the default init is k-means++ as sklearn, not a machine-dependent auto
    rep = json.loads((tmp_path / "gmm" / f"cls_K{k}.json").read_text())
    assert (rep["backend"], rep["n"], rep["K"], rep["seed"], rep["init"]) == ("torch", m, k, 2, "k-means++")
    assert rep["iterations"] == len(rep["log_likelihood"]) and rep["converged"] is True
    assert sum(rep["hard_label_counts"]) == m and "seconds" not in rep  # timings: in the log, not the artifact
    (timings,) = read_timings(res.stdout, "fit_cls_gmm")
    assert set(timings) >= {"read", "init", "fit", "total"}
    ref = sklearn_gm(cls.astype(np.float64), k, init_params="k-means++", random_state=2, tol=1e-3, max_iter=100)
    gmm = DiagGMM.load(out)
    np.testing.assert_allclose(gmm.means.numpy(), ref.means_, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(rep["log_likelihood"], ref.lower_bounds_, rtol=1e-10)
    lab = load_file(str(tmp_path / "gmm" / f"cls_K{k}_labels.safetensors"))
    np.testing.assert_array_equal(lab["index"], index[:m])
    np.testing.assert_array_equal(lab["labels"], ref.predict(cls.astype(np.float64)))
    png = tmp_path / "gmm" / f"cls_K{k}_weights.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stage_on_toy_data_both_backends_and_errors(tmp_path):
    x = torch.from_numpy(mixture_data(500, 2, 3, seed=9)).float()
    save_file({"train.x": x, "train.label": torch.zeros(500, dtype=torch.long), "train.num_classes": torch.tensor(1)},
              str(tmp_path / "toy.safetensors"))
    reps = {}
    for backend in ("torch", "sklearn"):
        out = tmp_path / backend / "cls_K3.safetensors"
        res = run_stage("--data", str(tmp_path / "toy.safetensors"), "--components", "3", "--backend", backend,
                        "--out", str(out))
        assert res.returncode == 0, res.stderr
        reps[backend] = json.loads(out.with_suffix(".json").read_text())
        lab = load_file(str(tmp_path / backend / "cls_K3_labels.safetensors"))
        np.testing.assert_array_equal(lab["index"], np.arange(500))
    assert reps["torch"]["iterations"] == reps["sklearn"]["iterations"]
    np.testing.assert_allclose(reps["torch"]["log_likelihood"], reps["sklearn"]["log_likelihood"], rtol=1e-9)
    assert reps["torch"]["hard_label_counts"] == reps["sklearn"]["hard_label_counts"]
    out = tmp_path / "bounds" / "cls_K3.safetensors"  # the carried bounds: the same fit (float64: bit for bit here)
    res = run_stage("--data", str(tmp_path / "toy.safetensors"), "--components", "3", "--reuse-bounds", "--out", str(out))
    assert res.returncode == 0, res.stderr
    rep = json.loads(out.with_suffix(".json").read_text())
    assert rep["reuse_bounds"] is True and len(rep["carried_share"]) == rep["iterations"] == reps["torch"]["iterations"]
    np.testing.assert_allclose(rep["log_likelihood"], reps["torch"]["log_likelihood"], rtol=1e-12)
    both = run_stage("--data", "a", "--store", "b", "--components", "3", "--out", str(tmp_path / "g.safetensors"))
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    missing = run_stage("--store", str(tmp_path / "none.zarr"), "--components", "3", "--out",
                        str(tmp_path / "g.safetensors"))
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1].startswith("error: latent store not found:")


# -- the bf16 screen (float32) -------------------------------------------------------------------------

def _float32_fits(x: np.ndarray, k: int, **kw) -> tuple:
    """The same float32 fit with the bf16 screen forced on and off."""
    xt = torch.from_numpy(x).float()
    on = fit_diag_gmm(xt, k, dtype=torch.float32, screen=True, **kw)
    off = fit_diag_gmm(xt, k, dtype=torch.float32, screen=False, **kw)
    assert on.seed_rows == off.seed_rows and sum(off.screen_share) == 0
    return on, off


def test_bf16_screen_equals_plain_float32_on_separated_data():
    """Well separated modes: every chunk is screened and only the float32 summation order changes, so the
    screened fit is as close to the float64 fit as the plain float32 one (variances of tight modes far
    from the mean carry float32 cancellation: ~1e-4 relative on both)."""
    x = mixture_data(6000, 32, 40, seed=11, sep=3.0) + 5.0
    kw = dict(tol=0, max_iter=6, seed=2, chunk_rows=5000, sparse_density=0.1)  # a 5000-row and a 1000-row chunk
    on, off = _float32_fits(x, 64, **kw)
    f64 = fit_diag_gmm(x, 64, **kw)
    assert on.screen_share == [1.0] * 6
    np.testing.assert_allclose(on.log_likelihood, off.log_likelihood, rtol=1e-6)
    for name in ("means", "variances", "weights"):
        ref = getattr(f64.gmm, name).numpy()
        err_on, err_off = (np.abs(getattr(f.gmm, name).numpy() - ref).max() / np.abs(ref).max() for f in (on, off))
        assert err_on <= 2 * err_off + 1e-7 and err_on < 1e-4, (name, err_on, err_off)


def test_bf16_screen_falls_back_on_overlapping_data():
    """Heavily overlapping modes: too many candidates, so the chunks take the plain path (same result)."""
    x = mixture_data(3000, 16, 10, seed=12, sep=0.1)
    on, off = _float32_fits(x, 32, tol=0, max_iter=4, seed=3)
    assert sum(on.screen_share) == 0
    np.testing.assert_allclose(on.log_likelihood, off.log_likelihood, rtol=1e-12)
    np.testing.assert_allclose(on.gmm.means.numpy(), off.gmm.means.numpy(), rtol=1e-12, atol=1e-12)


def test_bf16_screen_keeps_every_mode_within_the_exp_cut():
    """The bound is rigorous: every (row, mode) whose float32 log-density is within −EXP_CUT of the row's
    best is a candidate, also with a near-degenerate mode (variance ≈ reg_covar) and an offset."""
    from sourceflow.gmm.em import EXP_CUT, Screen, Workspace, _screen_candidates, augment_into

    rng = np.random.default_rng(13)
    n, d, k = 2500, 24, 48
    mu, sd = rng.normal(size=(k, d)) * 2.5, rng.uniform(0.3, 1.5, (k, d))
    x = torch.from_numpy(mu[rng.integers(0, k, n)] + 3.0 + rng.normal(size=(n, d)) * sd.max()).float()
    shift = x.double().mean(0).float()
    means = torch.from_numpy(mu + 3.0 + rng.normal(size=(k, d)) * 0.1) - shift.double()
    var = torch.from_numpy(sd**2 * rng.uniform(0.8, 1.25, (k, d)))
    var[5] = 1e-6  # a mode sitting on (near) one point
    g = DiagGMM(torch.from_numpy(rng.dirichlet(np.ones(k))), means, var)
    w = g.terms(torch.float32).weight
    sc = Screen.build(g, w)
    xa = torch.empty(n, 2 * d + 1)
    xa[:, -1] = 1
    augment_into(xa, x, shift)
    cut = EXP_CUT[torch.float32]
    r, kk = _screen_candidates(xa, sc, Workspace(), cut, density=2.0)
    cand = torch.zeros(n, k, dtype=torch.bool)
    cand[r, sc.perm[kk]] = True
    q = xa @ w
    needed = q - q.amax(1, keepdim=True) > cut
    assert not (needed & ~cand).any()
    assert cand.sum() < 0.2 * n * k  # and it does prune


def test_nonzero_rows_cols_equals_nonzero():
    from sourceflow.gmm.em import nonzero_rows_cols

    g = torch.Generator().manual_seed(0)
    for n, k in [(1, 5), (37, 13), (200, 64)]:
        mask = torch.zeros(n, -(-k // 8) * 8, dtype=torch.bool)
        mask[:, :k] = torch.rand(n, k, generator=g) < 0.05
        mask[n // 2, k - 1] = True
        r, c = nonzero_rows_cols(mask, k)
        r0, c0 = mask[:, :k].nonzero(as_tuple=True)
        assert torch.equal(r, r0) and torch.equal(c, c0)


def test_bf16_screen_is_chosen_by_a_measured_probe_cached_per_machine(tmp_path, monkeypatch):
    """The ISA flags are not enough (AVX512-BF16 without AMX made the screen slower on an AMD EPYC): the
    screen is used where a bf16 product of its shape measured >= BF16_MIN_SPEEDUP faster, once per machine."""
    from sourceflow.gmm import em

    monkeypatch.setenv("SOURCEFLOW_CACHE_DIR", str(tmp_path))
    calls = []

    def timed(speedup):
        def fake(dtype, rows, d, k, repeats):
            calls.append(dtype)
            return 1.0 if dtype == torch.float32 else 1.0 / speedup
        return fake

    for speedup, fast in ((4.0, True), (1.6, False)):
        em.bf16_probe.cache_clear()
        (tmp_path / "bf16_probe.json").unlink(missing_ok=True)
        monkeypatch.setattr(em, "_time_matmul", timed(speedup))
        r = em.bf16_probe()
        assert r["fast"] is fast and r["speedup"] == pytest.approx(speedup)
    # cached on disk: a new process (cleared memo) does not measure again
    n = len(calls)
    em.bf16_probe.cache_clear()
    assert em.bf16_probe()["fast"] is False and len(calls) == n
    assert em._cpu_key() in json.loads((tmp_path / "bf16_probe.json").read_text())
    em.bf16_probe.cache_clear()


def _carry_fits(x: np.ndarray, k: int, **kw):
    xt = torch.from_numpy(x).float()
    on = fit_diag_gmm(xt, k, dtype=torch.float32, screen=False, reuse_bounds=True, **kw)
    off = fit_diag_gmm(xt, k, dtype=torch.float32, screen=False, reuse_bounds=False, **kw)
    assert on.seed_rows == off.seed_rows and sum(off.carried_share) == 0
    return on, off


def test_carried_bounds_skip_rows_and_change_only_the_summation_order():
    """Well separated modes: once the parameters settle, the bounds prove every row's candidates unchanged, so
    the dense product is skipped; the fit is as close to the float64 one as the plain float32 fit."""
    x = mixture_data(6000, 32, 40, seed=11, sep=3.0) + 5.0
    kw = dict(tol=0, max_iter=12, seed=2, chunk_rows=2500)  # chunks of 2500, 2500 and 1000 rows
    on, off = _carry_fits(x, 40, **kw)
    f64 = fit_diag_gmm(x, 40, **kw)
    assert on.carried_share[0] == 0 and max(on.carried_share) > 0.9, on.carried_share
    np.testing.assert_allclose(on.log_likelihood, off.log_likelihood, rtol=1e-6)
    for name in ("means", "variances", "weights"):  # float32 accuracy (~1e-6 of the largest value) on both
        ref = getattr(f64.gmm, name).numpy()
        err_on, err_off = (np.abs(getattr(f.gmm, name).numpy() - ref).max() / np.abs(ref).max() for f in (on, off))
        assert err_on <= 4 * err_off + 1e-6 and err_on < 1e-5, (name, err_on, err_off)


def test_carried_bounds_change_nothing_on_overlapping_data():
    """Heavily overlapping modes: the bounds never hold (or the chunks are too dense), so every pass is the plain
    float32 one, bit for bit."""
    x = mixture_data(3000, 16, 10, seed=12, sep=0.1)
    on, off = _carry_fits(x, 32, tol=0, max_iter=6, seed=3)
    np.testing.assert_allclose(on.log_likelihood, off.log_likelihood, rtol=1e-12)
    np.testing.assert_allclose(on.gmm.means.numpy(), off.gmm.means.numpy(), rtol=1e-12, atol=1e-12)


def test_carried_bounds_do_not_miss_a_moved_mode():
    """At fixed parameters the first pass records them, the second takes the bounds and the third carries every
    row; then a mode moved onto another mode's rows voids the proof (the change bound covers every mode), and the
    pass is the plain one: nothing is skipped wrongly."""
    from sourceflow.gmm.em import Workspace, e_step_stats

    x = torch.from_numpy(mixture_data(4000, 24, 8, seed=14, sep=3.0)).float()
    g = fit_diag_gmm(x, 8, tol=0, max_iter=8, seed=0, dtype=torch.float32).gmm
    rows, kw = Rows(x), dict(chunk_rows=1500, device="cpu", dtype=torch.float32, screen=False)
    ws = Workspace()
    first, _, again = [e_step_stats(g, rows, workspace=ws, reuse_bounds=True, **kw) for _pass in range(3)]
    assert first.carried_rows == 0 and again.carried_rows == len(x)
    np.testing.assert_allclose(again.acc.numpy(), first.acc.numpy(), rtol=1e-5, atol=1e-6 * first.acc.abs().max().item())
    moved_to = int(predict(g, x)[0])
    means = g.means.clone()
    means[(moved_to + 1) % 8] = means[moved_to] + 0.05  # another mode lands on mode moved_to's rows
    g2 = DiagGMM(g.weights, means, g.variances)
    on = e_step_stats(g2, rows, workspace=ws, reuse_bounds=True, **kw)
    off = e_step_stats(g2, rows, workspace=Workspace(), **kw)
    assert on.carried_rows == 0
    np.testing.assert_allclose(on.acc.numpy(), off.acc.numpy(), rtol=1e-12)
    assert on.loglik == off.loglik
