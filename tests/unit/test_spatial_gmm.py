"""MM-FM's spatial GMM against brute-force per-mode numpy moments: flipped copies are np.flip of the
normalized unflipped latent (the store's re-encoded flipped rows are deliberately different), one biased
scalar variance over all dims, an empty mode gets the global mean and the mean variance of the non-empty
modes; RAM and memmap paths, a store without flips, variance-only normalisation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file

from sourceflow.flow.sources import GMMSource
from sourceflow.gmm.diag import DiagGMM
from sourceflow.gmm.spatial import accumulate, label_lookup, write_safetensors_blocks, write_spatial_gmm
from sourceflow.store.stats import LatentStats
from tests.unit.test_gmm_em import tiny_store

ROOT = Path(__file__).resolve().parents[2]
M, K, SHAPE = 40, 5, (3, 2, 4)  # 40 images (+ 40 flips), 5 modes of which mode 3 gets no image
EMPTY = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("spatial")
    rng = np.random.default_rng(0)
    spatial = (2.0 + 1.5 * rng.normal(size=(2 * M, *SHAPE))).astype(np.float32)
    # "re-encoded" flipped rows: the flip plus noise, so they are NOT the flip of the unflipped rows
    spatial[M:] = spatial[:M, ..., ::-1] + 0.5 * rng.normal(size=(M, *SHAPE)).astype(np.float32)
    index = tiny_store(tmp / "latents.zarr", rng.normal(size=(2 * M, 4)), spatial, flips=True, shard_rows=16)
    labels = np.array([0, 1, 2, 4])[rng.integers(0, 4, M)]
    labels[7] = 1  # mode 1 keeps at least one image
    # the labels file lists the images in another order than the store (the join is on the index column)
    perm = rng.permutation(M)
    save_file({"index": torch.from_numpy(index[:M][perm]), "labels": torch.from_numpy(labels[perm])},
              str(tmp / "labels.safetensors"))
    stats = LatentStats(torch.from_numpy(rng.normal(size=SHAPE)).float() + 2,
                        torch.from_numpy(rng.uniform(1, 3, SHAPE)).float())
    stats.save(tmp / "stats.safetensors")
    w = rng.uniform(0.5, 1, K)
    DiagGMM(torch.from_numpy(w / w.sum()), torch.zeros(K, 4, dtype=torch.float64),
            torch.ones(K, 4, dtype=torch.float64)).save(tmp / "cls.safetensors")
    return tmp, spatial, labels, stats, w / w.sum()


def np_normalize(spatial: np.ndarray, stats: LatentStats) -> np.ndarray:
    """(x − mean) / sqrt(var + eps), or x / sqrt(var + eps) for variance-only stats, in float32 by
    ``LatentStats.normalize`` as the stage computes it (numpy's float32 division differs from torch's by an ulp
    on some CPUs, e.g. an AVX2-only AMD EPYC, which the moments' 1e-10 comparison would see), as float64."""
    out = stats.normalize(torch.from_numpy(np.ascontiguousarray(spatial, dtype=np.float32))).numpy()
    mean = stats.mean.numpy() if stats.mode == "mean_std" else np.float32(0)
    ref = (spatial.astype(np.float32) - mean) / np.sqrt(stats.var.numpy() + np.float32(stats.eps))
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)  # the formula, independently
    return out.astype(np.float64)


def rows_and_labels(spatial, labels, stats, flips=True, reencoded=False):
    """Every training row normalized [R, D] and its mode: the unflipped rows and, with flips, their flips
    along W (or, with ``reencoded``, the store's own flipped rows: the wrong answer)."""
    z = np_normalize(spatial[:M], stats)
    if not flips:
        return z.reshape(M, -1), labels
    flipped = np_normalize(spatial[M:], stats) if reencoded else z[..., ::-1]
    return np.concatenate([z, flipped]).reshape(2 * M, -1), np.concatenate([labels, labels])


def brute_force(spatial, labels, stats, variance, flips=True, reencoded=False):
    """Per-mode moments by numpy loops: (means [K, *SHAPE], variances [K] or [K, *SHAPE], counts [K])."""
    x, lab = rows_and_labels(spatial, labels, stats, flips, reencoded)
    means, var = [], []
    for k in range(K):
        xs = x[lab == k]
        if len(xs):
            mu = xs.sum(0) / len(xs)
            dev2 = (xs - mu) ** 2  # biased: divide by the row count
            means.append(mu)
            var.append(dev2.mean() if variance == "spherical" else dev2.mean(0))
        else:
            means.append(None)
            var.append(None)
    full = [k for k in range(K) if means[k] is not None]
    for k in range(K):
        if means[k] is None:  # the global mean; the mean variance of the non-empty modes
            means[k] = x.mean(0)
            var[k] = np.mean([var[j] for j in full], axis=0)
    var = np.stack(var) if variance == "spherical" else np.stack(var).reshape(K, *SHAPE)
    return np.stack(means).reshape(K, *SHAPE), var, np.bincount(lab, minlength=K)


def run_spatial(tmp, out, variance="spherical", budget_mb="1000", store="latents.zarr", stats="stats.safetensors"):
    res = subprocess.run([sys.executable, "stages/build_spatial_gmm.py", "--store", str(tmp / store),
                          "--stats", str(tmp / stats), "--cls-gmm", str(tmp / "cls.safetensors"),
                          "--labels", str(tmp / "labels.safetensors"), "--variance", variance,
                          "--memory-budget-mb", budget_mb, "--batch-rows", "7", "--save-dtype", "float64",
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return load_file(str(out))


@pytest.fixture(scope="module")
def spherical(setup):
    """The stage's spherical output on the setup store (in RAM)."""
    tmp = setup[0]
    return run_spatial(tmp, tmp / "spherical" / f"spatial_K{K}.safetensors")


@pytest.mark.parametrize("variance", ["spherical", "diag"])
@pytest.mark.parametrize("budget_mb", ["1000", "0"])  # in RAM, or memory-mapped files (budget 0)
def test_stage_equals_brute_force(setup, variance, budget_mb):
    tmp, spatial, labels, stats, weights = setup
    out = tmp / f"out_{variance}_{budget_mb}" / f"spatial_K{K}.safetensors"
    t = run_spatial(tmp, out, variance, budget_mb)
    ref_mu, ref_var, counts = brute_force(spatial, labels, stats, variance)
    np.testing.assert_allclose(t["means"], ref_mu, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(t["variances"], ref_var, rtol=1e-9)
    np.testing.assert_allclose(t["weights"], weights, rtol=1e-15)
    rep = json.loads(out.with_suffix(".json").read_text())
    assert rep["counts"] == counts.tolist() and rep["empty_modes"] == 1 and rep["rows"] == 2 * M
    assert rep["memory_mapped"] is (budget_mb == "0")
    assert rep["empty_mode_variance"] == pytest.approx(float(np.mean(ref_var[EMPTY])), rel=1e-9)
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([out.name, out.with_suffix(".json").name])
    g = DiagGMM.load(out)  # the existing loader reads both variance layouts
    assert g.means.shape == (K, int(np.prod(SHAPE))) and g.variances.shape == g.means.shape
    src = GMMSource.load(out, variance=variance)
    assert src.event_shape == SHAPE


def test_flipped_copies_are_the_flip_of_the_normalized_unflipped_latent(setup, spherical):
    """The store's flipped rows are not the flip of the unflipped ones; the GMM must not read them."""
    _, spatial, labels, stats, _ = setup
    z = np_normalize(spatial, stats)
    assert np.abs(z[M:] - z[:M, ..., ::-1]).max() > 0.1  # the store's flipped rows really differ
    right_mu, right_var, _ = brute_force(spatial, labels, stats, "spherical")
    wrong_mu, wrong_var, _ = brute_force(spatial, labels, stats, "spherical", reencoded=True)
    np.testing.assert_allclose(spherical["means"], right_mu, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(spherical["variances"], right_var, rtol=1e-9)
    assert np.abs(spherical["means"] - wrong_mu).max() > 1e-3
    assert np.abs(spherical["variances"] - wrong_var).max() > 1e-3
    # a flipped copy joins its image's mode: mode 1's mean is symmetric under the flip along W
    np.testing.assert_allclose(spherical["means"][1], spherical["means"][1][..., ::-1], rtol=1e-10, atol=1e-10)


def test_variance_is_one_biased_scalar_over_all_dims(setup, spherical):
    _, spatial, labels, stats, _ = setup
    x, lab = rows_and_labels(spatial, labels, stats)
    for k in set(range(K)) - {EMPTY}:
        xs = x[lab == k]
        assert spherical["variances"][k] == pytest.approx(np.var(xs, axis=0).mean(), rel=1e-9)
        assert spherical["variances"][k] == pytest.approx(((xs - xs.mean(0)) ** 2).sum() / xs.size, rel=1e-9)
        unbiased = np.var(xs, axis=0, ddof=1).mean()
        assert abs(spherical["variances"][k] - unbiased) > 1e-3 * unbiased


def test_empty_mode_gets_global_mean_and_mean_variance_of_nonempty_modes(setup, spherical):
    _, spatial, labels, stats, _ = setup
    x, lab = rows_and_labels(spatial, labels, stats)
    assert (lab == EMPTY).sum() == 0
    np.testing.assert_allclose(spherical["means"][EMPTY].reshape(-1), x.mean(0), rtol=1e-10, atol=1e-10)
    full = [np.var(x[lab == k], axis=0).mean() for k in range(K) if k != EMPTY]
    assert spherical["variances"][EMPTY] == pytest.approx(np.mean(full), rel=1e-9)
    global_var = np.var(x, axis=0).mean()  # today's rule, which adds the spread between modes
    assert abs(spherical["variances"][EMPTY] - global_var) > 1e-3


def test_store_without_flips_and_variance_only_stats(setup, tmp_path):
    """Without flips only the images count; with ``std`` stats no mean is subtracted before the moments."""
    tmp, spatial, labels, stats, _ = setup
    rng = np.random.default_rng(1)
    tiny_store(tmp_path / "noflip.zarr", rng.normal(size=(M, 4)), spatial[:M], flips=False)
    std_stats = LatentStats(stats.mean, stats.var, 1e-5, "std")
    std_stats.save(tmp_path / "std.safetensors")
    for name in ("cls.safetensors", "labels.safetensors"):
        (tmp_path / name).write_bytes((tmp / name).read_bytes())
    for variance in ("spherical", "diag"):
        t = run_spatial(tmp_path, tmp_path / f"s_{variance}.safetensors", variance, store="noflip.zarr",
                        stats="std.safetensors")
        ref_mu, ref_var, counts = brute_force(spatial, labels, std_stats, variance, flips=False)
        np.testing.assert_allclose(t["means"], ref_mu, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(t["variances"], ref_var, rtol=1e-9)
        rep = json.loads((tmp_path / f"s_{variance}.json").read_text())
        assert rep["rows"] == M and rep["counts"] == counts.tolist() and rep["flipped_copies"] == "none"


def test_float32_output_and_library_paths_agree(setup, tmp_path):
    tmp, spatial, labels, stats, weights = setup
    from sourceflow.store.latents import LatentStore

    store = LatentStore.open(tmp / "latents.zarr")
    lab = load_file(str(tmp / "labels.safetensors"))
    table = label_lookup(lab["index"], lab["labels"], K)

    def batches():
        for _, a in store.iter_batches(["index", "spatial"], 16, 0, M):
            yield a["index"], a["spatial"]

    ram = accumulate(batches(), stats.normalize, table, K, 24, flips=True, variance="diag",
                     memory_budget_bytes=1 << 30)
    disk = accumulate(batches(), stats.normalize, table, K, 24, flips=True, variance="diag", memory_budget_bytes=0,
                      tmp_dir=tmp_path)
    assert disk.on_disk and not ram.on_disk and list(tmp_path.iterdir())
    np.testing.assert_allclose(np.asarray(disk.sx), ram.sx.numpy(), rtol=1e-14)
    write_spatial_gmm(tmp_path / "a.safetensors", disk, weights, SHAPE, block_modes=2)
    disk.close()
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # accumulator files removed
    ref_mu, ref_var, _ = brute_force(spatial, labels, stats, "diag")
    t = load_file(str(tmp_path / "a.safetensors"))
    assert t["means"].dtype == np.float32 and t["weights"].dtype == np.float64
    np.testing.assert_allclose(t["means"], ref_mu, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(t["variances"], ref_var, rtol=1e-6)


def test_missing_label_is_one_line(setup, tmp_path):
    tmp, *_ = setup
    save_file({"index": torch.arange(3) * 3, "labels": torch.zeros(3, dtype=torch.long)},
              str(tmp_path / "few.safetensors"))
    res = subprocess.run([sys.executable, "stages/build_spatial_gmm.py", "--store", str(tmp / "latents.zarr"),
                          "--stats", str(tmp / "stats.safetensors"), "--cls-gmm", str(tmp / "cls.safetensors"),
                          "--labels", str(tmp_path / "few.safetensors"), "--out", str(tmp_path / "s.safetensors")],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == "error: manifest index 9 of the store has no CLS label"
    assert not (tmp_path / "s.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["few.safetensors"]
    with pytest.raises(ValueError, match="outside"):
        label_lookup(np.arange(3), np.array([0, 1, K]), K)


def test_streaming_safetensors_writer_round_trips(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.array([1.5, 2.5])
    write_safetensors_blocks(tmp_path / "t.safetensors", [
        ("a", np.dtype(np.float32), (3, 4), lambda: iter([a[:1], a[1:]])),
        ("b", np.dtype(np.float64), (2,), lambda: iter([b]))], metadata={"x": "y"})
    t = load_file(str(tmp_path / "t.safetensors"))
    np.testing.assert_array_equal(t["a"], a)
    np.testing.assert_array_equal(t["b"], b)
    with pytest.raises(RuntimeError, match="expected 48"):
        write_safetensors_blocks(tmp_path / "u.safetensors", [("a", np.dtype(np.float32), (3, 4), lambda: iter([a[:1]]))])
    assert not (tmp_path / "u.safetensors").exists()


def test_broken_input_files_are_one_line_errors(setup, tmp_path):
    """A truncated or missing stats / GMM / labels file is a one-line error naming it, not a traceback."""
    from sourceflow.gmm.diag import load_gmm_tensors

    tmp, *_ = setup
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes((tmp / "stats.safetensors").read_bytes()[:20])
    for load in (LatentStats.load, load_gmm_tensors):
        with pytest.raises(ValueError, match=f"{broken}: not a readable safetensors file"):
            load(broken)
    with pytest.raises(FileNotFoundError, match="latent stats not found: .*run the latent_stats stage"):
        LatentStats.load(tmp_path / "nope.safetensors")
    with pytest.raises(KeyError, match=r"missing tensor\(s\) \['weights', 'means', 'variances'\]"):
        load_gmm_tensors(tmp / "stats.safetensors")
    res = subprocess.run([sys.executable, "stages/build_spatial_gmm.py", "--store", str(tmp / "latents.zarr"),
                          "--stats", str(tmp / "stats.safetensors"), "--cls-gmm", str(tmp / "cls.safetensors"),
                          "--labels", str(broken), "--out", str(tmp_path / "s.safetensors")],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.stderr.startswith(f"error: {broken}: not a readable safetensors file")
