"""Feature extractors (clean-fid Inception loading path, the feature network), precision/recall against
brute-force nearest neighbours, class coverage, and the digits pipeline: prepare_data →
train_feature_net → reference_stats."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors
from torch import nn

from sourceflow.metrics.features import (
    INCEPTION_FILENAME,
    INCEPTION_URL,
    FeatureNetFeatures,
    InceptionFeatures,
    clean_resize,
    extract_features,
    load_feature_extractor,
)
from sourceflow.metrics.frechet import frechet_distance, load_reference_npz, read_reference_npz
from sourceflow.metrics.prdc import class_coverage, knn_radii_sq, label_histogram, prdc
from sourceflow.models.feature_net import FeatureNet, FeatureNetConfig, load_feature_net

# --- Inception ---------------------------------------------------------------------------------------------


class FakeInception(nn.Module):
    """The interface InceptionV3W uses of the real TorchScript file: a ``layers`` submodule mapping
    normalised [B, 3, 299, 299] images to [B, 2048, 1, 1], and forward(x, return_features)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(3, 2048, kernel_size=3, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1))

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers(x)


@pytest.fixture(scope="module")
def fake_inception(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("inception")
    module = FakeInception().eval()
    with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; clean-fid's file is TorchScript
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(module).save(str(folder / INCEPTION_FILENAME))
    return folder, module


def test_missing_inception_file_names_path_and_url(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        InceptionFeatures(tmp_path / "nope.pt")
    msg = str(e.value)
    assert str(tmp_path / "nope.pt") in msg and INCEPTION_URL in msg and "\n" not in msg
    with pytest.raises(FileNotFoundError, match=str(tmp_path / INCEPTION_FILENAME)):
        InceptionFeatures(tmp_path)  # a folder without the file
    (tmp_path / "junk.pt").write_bytes(b"not torchscript")
    with pytest.raises(ValueError, match="junk.pt: not a TorchScript"):
        InceptionFeatures(tmp_path / "junk.pt")


def test_clean_resize_is_clean_fids_pil_bicubic_in_float():
    from cleanfid.resize import make_resizer

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 17, 23, 3), dtype=np.uint8)
    out = clean_resize(images, workers=2)
    assert out.shape == (3, 3, 299, 299) and out.dtype == torch.float32
    ref = make_resizer("PIL", False, "bicubic", (299, 299))
    for i in range(3):
        np.testing.assert_array_equal(out[i].permute(1, 2, 0).numpy(), ref(images[i]))
    assert float(out.min()) >= 0 and float(out.max()) <= 255
    const = clean_resize(np.full((1, 8, 8, 3), 77, dtype=np.uint8))
    np.testing.assert_allclose(const.numpy(), 77.0, atol=1e-3)  # no quantisation, no rescaling
    with pytest.raises(ValueError, match="uint8 images"):
        clean_resize(np.zeros((1, 8, 8, 3), dtype=np.float32))


def test_inception_loads_torchscript_and_runs_clean_fids_forward(fake_inception):
    folder, module = fake_inception
    images = np.random.default_rng(1).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    for path in (folder, folder / INCEPTION_FILENAME):  # the folder or the file itself
        ext = load_feature_extractor("inception", path, "cpu")
        out = ext(images)
        assert out.features.shape == (2, 2048) and out.features.dtype == np.float32 and out.labels is None
    with torch.no_grad():
        expected = module.layers((clean_resize(images) - 128) / 128).reshape(2, 2048).numpy()
    np.testing.assert_allclose(out.features, expected, rtol=1e-5, atol=1e-6)


# --- feature network ----------------------------------------------------------------------------------------


def test_feature_net_is_resolution_agnostic_and_round_trips(tmp_path):
    torch.manual_seed(0)
    net = FeatureNet(FeatureNetConfig(num_classes=10, resolution=8, class_names=list("abcdefghij"))).eval()
    for r in (8, 16):
        x = torch.rand(4, 3, r, r) * 2 - 1
        assert net.features(x).shape == (4, 128) and net(x).shape == (4, 10)
    path = tmp_path / "net.safetensors"
    net.save(path, info={"test_accuracy": 0.5})
    back = load_feature_net(path)
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(back(x), net(x), rtol=0, atol=0)
    assert back.config == net.config and not back.training

    images = np.random.default_rng(2).integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    ext = FeatureNetFeatures(path)
    out = ext(images)
    with torch.no_grad():
        logits = net((torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5) - 1)
    np.testing.assert_array_equal(out.labels, logits.argmax(1).numpy())
    assert out.features.shape == (5, 128) and ext.num_classes == 10
    batched = extract_features(ext, images, batch_size=2)
    np.testing.assert_allclose(batched.features, out.features, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(batched.labels, out.labels)

    with pytest.raises(FileNotFoundError, match="train_feature_net"):
        load_feature_net(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(KeyError, match="no 'feature_net' entry"):
        load_feature_net(tmp_path / "other.safetensors")


# --- precision / recall / density / coverage ----------------------------------------------------------------


def brute_force_prdc(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float, float, float]:
    """Kynkäänniemi et al. / Naeem et al. with scikit-learn's exact nearest neighbours."""
    def radii(x):  # k-th neighbour other than the point itself: query k+1, the first is the point
        return NearestNeighbors(n_neighbors=k + 1, algorithm="brute").fit(x).kneighbors(x)[0][:, k]

    r_rad, f_rad = radii(real), radii(fake)
    d_fr = np.linalg.norm(fake[:, None, :] - real[None, :, :], axis=2)  # [M, N]
    inside = d_fr <= r_rad[None, :]
    precision = inside.any(1).mean()
    d_rf = d_fr.T  # [N, M]
    recall = (d_rf <= f_rad[None, :]).any(1).mean()
    density = inside.sum() / (k * len(fake))
    coverage = inside.any(0).mean()
    return precision, recall, density, coverage


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_prdc_matches_brute_force(dtype):
    rng = np.random.default_rng(3)
    real = rng.normal(size=(300, 16))
    fake = rng.normal(size=(250, 16)) * 1.3 + 0.4
    ref = brute_force_prdc(real, fake, k=3)
    got = prdc(real, fake, k=3, chunk=64, dtype=dtype)  # chunks smaller than the sets
    assert (got.precision, got.recall, got.density, got.coverage) == pytest.approx(ref, abs=1e-12)
    assert 0 < got.precision < 1 and 0 < got.recall < 1
    same = prdc(real, real, k=3)
    assert same.precision == same.recall == same.coverage == 1.0


def test_knn_radii_match_sklearn():
    x = np.random.default_rng(4).normal(size=(200, 5))
    for k in (1, 3, 5):
        nn_d = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)[0][:, k]
        got = knn_radii_sq(torch.from_numpy(x), k, chunk=37).sqrt().numpy()
        np.testing.assert_allclose(got, nn_d, rtol=1e-10)
    with pytest.raises(ValueError, match="more than k points"):
        knn_radii_sq(torch.zeros(3, 2), 3)


def test_class_coverage_kl_direction_and_tv():
    data = label_histogram(np.array([0, 0, 1, 1, 2, 2, 3, 3]), 4)
    np.testing.assert_allclose(data, 0.25)
    assert class_coverage(data, data) == {"kl": pytest.approx(0.0, abs=1e-15), "tv": 0.0,
                                          "classes_missing": 0, "eps": 1e-6}
    gen = np.array([0.5, 0.5, 0.0, 0.0])  # two classes dropped
    cc = class_coverage(data, gen, eps=1e-6)
    p = (data + 1e-6) / (1 + 4e-6)
    q = (gen + 1e-6) / (1 + 4e-6)
    assert cc["kl"] == pytest.approx(float(np.sum(p * np.log(p / q))), rel=1e-12)
    # 0.5·log(0.25/1e-6) + 0.5·log(0.25/0.5) ≈ 5.87: a dropped class is expensive in this direction
    assert cc["kl"] == pytest.approx(0.5 * np.log(0.25 / 1e-6) + 0.5 * np.log(0.5), rel=1e-4)
    assert cc["kl"] > class_coverage(gen, data)["kl"]  # the reverse direction barely notices
    assert cc["tv"] == pytest.approx(0.5) and cc["classes_missing"] == 2
    assert label_histogram(np.array([-1, 0, 0]), 2).tolist() == [1.0, 0.0]  # unlabelled rows ignored


# --- the digits pipeline ------------------------------------------------------------------------------------


def run_stage(root, *args):
    res = subprocess.run([sys.executable, *args], cwd=root, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return res


@pytest.mark.slow
def test_digits_feature_net_and_reference_stats(tmp_path, root, monkeypatch, capsys):
    """prepare_data → train_feature_net (a real subprocess) → reference_stats on the real digits (~20 s)."""
    manifest = tmp_path / "digits" / "manifest.parquet"
    def stage(script, *args):
        code, err = stage_in_process(root, monkeypatch, capsys, script, *args)
        assert code == 0, err

    stage("stages/prepare_data.py", "--source", "digits", "--out", manifest)
    net = tmp_path / "digits" / "feature_net" / "model.safetensors"
    run_stage(root, "stages/train_feature_net.py", "--manifest", str(manifest), "--resolution", "8",
              "--epochs", "10", "--batch-size", "128", "--lr", "0.002", "--seed", "0", "--out", str(net))
    report = json.loads((net.parent / "report.json").read_text())
    assert report["test_accuracy"] >= 0.9 and report["num_test"] > 200  # 30 epochs (the default) reach ~97%
    assert sorted(p.name for p in net.parent.iterdir()) == ["model.safetensors", "report.json"]
    # same inputs and seed: byte-identical weights
    twins = [tmp_path / f"twin{i}" / "model.safetensors" for i in range(2)]
    for t in twins:
        stage("stages/train_feature_net.py", "--manifest", manifest, "--epochs", "1", "--out", t)
    assert twins[0].read_bytes() == twins[1].read_bytes()

    refs = {}
    for split in ("train", "test"):
        out = tmp_path / "digits" / "reference" / f"feature-net-{split}.npz"
        stage("stages/reference_stats.py", "--manifest", manifest, "--split", split, "--resolution", "8",
              "--batch-size", "100", "--features", "feature-net", "--feature-net", net, "--device", "cpu", "--out", out)
        refs[split] = read_reference_npz(out)
    tr, te = refs["train"], refs["test"]
    f = tr["features"].astype(np.float64)
    assert f.shape == (report["num_train"], 128) and tr["features"].dtype == np.float32
    np.testing.assert_allclose(tr["mu"], f.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(tr["sigma"], np.cov(f, rowvar=False), rtol=1e-6, atol=1e-9)
    assert tr["label_hist"].sum() == pytest.approx(1.0) and tr["pred_label_hist"].shape == (10,)
    # held-out digits are close to the training digits in this feature space; shuffled pixels are not
    fd_floor = frechet_distance(tr["mu"], tr["sigma"], te["mu"], te["sigma"])
    scrambled = FeatureNetFeatures(net)(np.random.default_rng(0).integers(0, 256, (500, 8, 8, 3), dtype=np.uint8))
    fd_noise = frechet_distance(tr["mu"], tr["sigma"], scrambled.features.mean(0), np.cov(scrambled.features, rowvar=False))
    assert fd_floor < 0.1 * fd_noise
    p = prdc(tr["features"], te["features"])
    assert p.precision > 0.8 and p.recall > 0.8
    assert class_coverage(tr["label_hist"], te["pred_label_hist"])["tv"] < 0.1


def stage_in_process(root, monkeypatch, capsys, script, *args) -> tuple[int, str]:
    """Run a stage's __main__ in this process (no 3 s torch import per call): (exit code, stderr)."""
    import runpy

    monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
    code = 0
    try:
        runpy.run_path(str(root / script), run_name="__main__")
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err


def test_reference_stats_modes_and_errors(tmp_path, root, fake_inception, monkeypatch, capsys):
    """ADM mode copies and validates; bad inputs are one line; the image mode runs with Inception."""
    mu, sigma = np.arange(4.0), np.eye(4)
    adm = tmp_path / "VIRTUAL_x.npz"
    np.savez(adm, mu=mu.astype(np.float32), sigma=sigma.astype(np.float32), mu_s=mu[:2], sigma_s=np.eye(2))
    out = tmp_path / "ref" / "adm.npz"
    def stage(*args):
        return stage_in_process(root, monkeypatch, capsys, "stages/reference_stats.py", *args)

    assert stage("--adm-npz", adm, "--device", "cpu", "--out", out)[0] == 0
    m2, s2 = load_reference_npz(out)
    assert m2.dtype == np.float64 and np.array_equal(m2, mu) and np.array_equal(s2, sigma)
    assert "mu_s" in read_reference_npz(out)

    bad = tmp_path / "bad.npz"
    np.savez(bad, mu=mu)
    code, err = stage("--adm-npz", bad, "--out", out)
    assert code == 2 and err.strip().splitlines() == [
        f"error: {bad}: missing key 'sigma' (a reference batch needs 'mu' and 'sigma'; found ['mu'])"]
    code, err = stage("--data", "x", "--adm-npz", adm, "--out", out)
    assert code == 2 and "not allowed with argument" in err

    # image mode through Inception on a hand-made manifest of PNGs
    import pandas as pd
    from PIL import Image

    from sourceflow.data.manifest import write_manifest

    img_root = tmp_path / "images"
    rows = []
    rng = np.random.default_rng(5)
    for i in range(6):
        (img_root / str(i % 2)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(img_root / f"{i % 2}/{i}.png")
        rows.append({"index": i, "path": f"{i % 2}/{i}.png", "label": i % 2, "split": "train" if i < 5 else "test"})
    manifest = tmp_path / "manifest.parquet"
    write_manifest(manifest, pd.DataFrame(rows), {"root": str(img_root), "resolution": 8, "num_classes": 2,
                                                  "class_names": ["a", "b"]})
    folder, _ = fake_inception
    out = tmp_path / "ref" / "inception.npz"
    assert stage("--manifest", manifest, "--features", "inception", "--inception", folder / INCEPTION_FILENAME,
                 "--batch-size", "2", "--out", out)[0] == 0
    z = read_reference_npz(out)
    assert z["features"].shape == (5, 2048) and z["sigma"].shape == (2048, 2048)
    assert z["label_hist"].tolist() == [0.6, 0.4] and "pred_label_hist" not in z
    assert z["features_index"].tolist() == [0, 1, 2, 3, 4]
    # keep the features of a random subset only: mu/sigma unchanged, the kept rows are the same rows
    sub = tmp_path / "ref" / "inception-sub.npz"
    assert stage("--manifest", manifest, "--features", "inception", "--inception", folder, "--batch-size", "2",
                 "--max-features", "3", "--out", sub)[0] == 0
    zs = read_reference_npz(sub)
    np.testing.assert_allclose(zs["mu"], z["mu"], rtol=1e-12)
    assert zs["features"].shape == (3, 2048) and len(set(zs["features_index"].tolist())) == 3
    np.testing.assert_array_equal(zs["features"], z["features"][zs["features_index"]])
    code, err = stage("--manifest", manifest, "--features", "inception", "--inception", tmp_path / "none.pt",
                      "--out", out)
    assert code == 2 and len(err.strip().splitlines()) == 1 and INCEPTION_URL in err
