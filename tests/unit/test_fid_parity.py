"""ADM-comparable FID (issue 12): our ``adm`` features equal clean-fid's legacy_tensorflow path on the same
uint8 images, the ``inception`` ("clean") features do not, both sides of an adm FD go through one
extractor, evaluate records the preprocessing and refuses mismatched statistics, and samples become uint8
by truncation as in ADM's and MM-FM's samplers.

The Inception file is ``sourceflow.standins.TFResizeInception``, a small TorchScript stand-in with the
interface ``InceptionV3W`` uses of the real ``inception-2015-12-05.pt``: ``base(x, return_features=True)``
(resize to 299 and normalise inside, used with ``resize_inside=True``) and ``base.layers`` (normalised 299²
input, used by the "clean" path).
"""

from __future__ import annotations

import json
import runpy
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sourceflow.data.images import to_model_range, to_uint8
from sourceflow.metrics.features import (
    INCEPTION_FILENAME,
    ADMInceptionFeatures,
    InceptionFeatures,
    clean_resize,
    extract_features,
    legacy_tensorflow_input,
    load_feature_extractor,
)
from sourceflow.metrics.frechet import read_reference_npz, save_reference_npz
from sourceflow.standins import save_inception


@pytest.fixture(scope="module")
def inception_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tf_inception")
    save_inception(folder / INCEPTION_FILENAME, seed=0)  # the TF-resize stand-in (sourceflow.standins)
    return folder


def images_256(n: int, seed: int) -> np.ndarray:
    """Smooth random uint8 images [n, 256, 256, 3] (noise alone averages out in the features)."""
    rng = np.random.default_rng(seed)
    low = torch.from_numpy(rng.uniform(0, 255, (n, 3, 9, 9)).astype(np.float32))
    up = F.interpolate(low, size=(256, 256), mode="bicubic", align_corners=False)
    up = up + torch.from_numpy(rng.normal(0, 12, up.shape).astype(np.float32))
    return up.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def clean_fid_legacy_tensorflow(folder: Path, images: np.ndarray) -> np.ndarray:
    """clean-fid's own legacy_tensorflow feature path on in-memory uint8 images.

    ``cleanfid.fid`` / ``cleanfid.utils`` import torchvision (never installed here), so their few lines are
    reproduced from the source: ``build_feature_extractor("legacy_tensorflow")`` = ``InceptionV3W(path,
    resize_inside=True)``; ``ResizeDataset.__getitem__`` = ``fn_resize = build_resizer(mode)`` on the uint8
    HWC array, then ``ToTensor()(img) * 255`` for a uint8 result (ToTensor: HWC → CHW, float, / 255);
    ``get_batch_features`` = ``model(batch)`` under no_grad. The clean-fid functions below are its own.
    """
    from cleanfid.inception_torchscript import InceptionV3W
    from cleanfid.resize import build_resizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = InceptionV3W(str(folder), download=False, resize_inside=True).eval()
    fn_resize = build_resizer("legacy_tensorflow")
    batch = []
    for img in images:
        r = fn_resize(img)
        assert r.dtype == np.uint8 and r.shape == img.shape  # legacy_tensorflow: no resize outside
        batch.append(torch.from_numpy(r.transpose((2, 0, 1))).contiguous().to(torch.float32).div(255) * 255)
    with torch.no_grad():
        return model(torch.stack(batch)).numpy()


def test_adm_features_equal_clean_fids_legacy_tensorflow(inception_dir):
    images = images_256(3, seed=1)
    ext = load_feature_extractor("adm", inception_dir / INCEPTION_FILENAME)
    assert isinstance(ext, ADMInceptionFeatures) and ext.name == "adm" and ext.preprocessing == "legacy_tensorflow"
    assert ext.model.resize_inside
    ours = ext(images).features
    ref = clean_fid_legacy_tensorflow(inception_dir, images)
    assert ours.shape == (3, 2048) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, ref)  # same input bits, same graph: identical features
    assert float(np.abs(ours[0] - ours[1]).max()) > 1e-2  # the stand-in separates images
    # batching (what evaluate does) changes nothing
    np.testing.assert_allclose(extract_features(ext, images, batch_size=2).features, ref, rtol=1e-5, atol=1e-6)

    # the input is the uint8 values as float32 NCHW, no resize, no rescaling
    x = legacy_tensorflow_input(images)
    assert x.shape == (3, 3, 256, 256) and x.dtype == torch.float32
    np.testing.assert_array_equal(x.permute(0, 2, 3, 1).numpy(), images.astype(np.float32))


def test_clean_and_wrong_preprocessing_change_the_features(inception_dir):
    """The stand-in is sensitive to what happens outside it: the "clean" mode (PIL bicubic outside),
    a resize outside, or a [0, 1] range all give features far from legacy_tensorflow's."""
    images = images_256(3, seed=2)
    ref = clean_fid_legacy_tensorflow(inception_dir, images)
    clean = load_feature_extractor("inception", inception_dir)
    assert isinstance(clean, InceptionFeatures) and not isinstance(clean, ADMInceptionFeatures)
    assert clean.name == "inception" and clean.preprocessing == "clean" and not clean.model.resize_inside
    scale = float(np.abs(ref).mean())
    assert float(np.abs(clean(images).features - ref).max()) > 1e-2 * scale
    adm = load_feature_extractor("adm", inception_dir)
    with torch.no_grad():
        resized_outside = adm.model(clean_resize(images)).numpy()
        unit_range = adm.model(legacy_tensorflow_input(images) / 255).numpy()
    for wrong in (resized_outside, unit_range):
        assert float(np.abs(wrong - ref).max()) > 1e-2 * scale


def test_unknown_feature_kind():
    with pytest.raises(ValueError, match="inception, adm or feature-net"):
        load_feature_extractor("clean", "x")


# --- both sides through one extractor; evaluate records and checks the preprocessing ------------------------


def stage_in_process(root: Path, monkeypatch, capsys, script: str, *args) -> tuple[int, str, str]:
    """Run a stage's __main__ in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
    code = 0
    try:
        runpy.run_path(str(root / script), run_name="__main__")
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def write_samples(d: Path, images: np.ndarray) -> None:
    """A finished sample entry as the sample stage writes it (index.json, info.json, samples.zarr, .npz)."""
    import zarr

    (d / "euler-1").mkdir(parents=True)
    n = len(images)
    (d / "index.json").write_text(json.dumps({"euler-1": {}}))
    (d / "euler-1" / "info.json").write_text(json.dumps({"solver": "euler", "steps": 1, "nfe": 1, "num_samples": n}))
    z = zarr.open_group(str(d / "euler-1" / "samples.zarr"), mode="w")
    z.create_array("images", data=images)
    z.create_array("energy", data=np.ones(n))
    z.create_array("displacement", data=np.ones(n))
    z.attrs["complete"] = True
    np.savez(d / "euler-1" / "samples.npz", arr_0=images)


def test_reference_and_evaluate_share_the_adm_path(tmp_path, root, inception_dir, monkeypatch, capsys):
    """reference_stats --features adm and evaluate (evaluate.features adm) give the same features for the
    same images (FD ≈ 0), the metrics name the preprocessing, the ADM-npz mode is tagged legacy_tensorflow,
    and clean-mode features against legacy_tensorflow statistics are refused."""
    import pandas as pd
    from PIL import Image

    from sourceflow.data.manifest import write_manifest

    images = images_256(4, seed=3)
    img_root = tmp_path / "images"
    img_root.mkdir()
    rows = []
    for i, im in enumerate(images):
        Image.fromarray(im).save(img_root / f"{i}.png")
        rows.append({"index": i, "path": f"{i}.png", "label": -1, "split": "train"})
    manifest = tmp_path / "manifest.parquet"
    write_manifest(manifest, pd.DataFrame(rows), {"root": str(img_root), "resolution": 256})
    ref = tmp_path / "reference" / "adm.npz"
    code, _, err = stage_in_process(root, monkeypatch, capsys, "stages/reference_stats.py", "--manifest", manifest,
                                    "--features", "adm", "--inception", inception_dir, "--batch-size", "3",
                                    "--out", ref)
    assert code == 0, err
    z = read_reference_npz(ref)
    assert str(z["preprocessing"]) == "legacy_tensorflow"
    direct = load_feature_extractor("adm", inception_dir)(images).features
    np.testing.assert_allclose(z["features"], direct, rtol=1e-5, atol=1e-6)  # PNG round trip is lossless

    samples = tmp_path / "samples"
    write_samples(samples, images)
    summary = tmp_path / "train_summary.json"
    summary.write_text(json.dumps({"coupling_cost": 0.0}))
    spec = {"data": "toyimg", "name": "exp", "method": "fm",
            "evaluate": {"features": "adm", "classifier": False, "min_samples": 2, "prdc_k": 1, "batch_size": 3}}

    def evaluate(spec: dict, out: Path, reference: Path) -> tuple[int, str, str]:
        return stage_in_process(root, monkeypatch, capsys, "stages/evaluate.py", "--spec", json.dumps(spec),
                                "--reference", reference, "--inception", inception_dir, "--device", "cpu",
                                "--samples", samples, "--train-summary", summary, "--out", out)

    code, out, err = evaluate(spec, tmp_path / "metrics", ref)
    assert code == 0, err
    assert "preprocessing legacy_tensorflow" in out
    rec = json.loads((tmp_path / "metrics" / "euler-1.json").read_text())
    assert rec["features"] == {"name": "adm", "preprocessing": "legacy_tensorflow"}
    assert abs(rec["metrics"]["fd"]) < 1e-3  # the same images on both sides, through the same function
    assert "features" not in rec["metrics"]  # the report turns every metric into a float

    # an ADM reference batch passes through untouched and is tagged as legacy_tensorflow statistics
    adm_src = tmp_path / "VIRTUAL_x.npz"
    np.savez(adm_src, mu=z["mu"], sigma=z["sigma"])
    adm_ref = tmp_path / "reference" / "adm-batch.npz"
    code, _, err = stage_in_process(root, monkeypatch, capsys, "stages/reference_stats.py", "--adm-npz", adm_src,
                                    "--out", adm_ref)
    assert code == 0, err
    za = read_reference_npz(adm_ref)
    assert str(za["preprocessing"]) == "legacy_tensorflow"
    np.testing.assert_array_equal(za["mu"], z["mu"])
    np.testing.assert_array_equal(za["sigma"], z["sigma"])

    # clean-mode features against those statistics: refused, in one line naming both
    code, _, err = evaluate({**spec, "evaluate": {**spec["evaluate"], "features": "inception"}},
                            tmp_path / "metrics-clean", adm_ref)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "'legacy_tensorflow'" in err and "'clean'" in err
    # statistics without the tag (older files, or a plain ADM npz) are accepted
    plain = tmp_path / "reference" / "untagged.npz"
    save_reference_npz(plain, z["mu"], z["sigma"])
    assert evaluate(spec, tmp_path / "metrics-plain", plain)[0] == 0


# --- uint8 conversion ---------------------------------------------------------------------------------------


def _px(values: list[float]) -> torch.Tensor:
    """Model-range values x such that (x + 1) · 127.5 = the given pixel values, as [1, 3, 1, len] images."""
    v = torch.tensor(values, dtype=torch.float64) / 127.5 - 1
    return v.view(1, 1, 1, -1).expand(1, 3, 1, len(values)).to(torch.float32)


def test_to_uint8_truncates_like_adm_and_mmfm():
    x = torch.cat([_px([254.99, 254.5, 0.7, 100.999, 128.0]), torch.tensor([-1.2, 1.3]).view(1, 1, 1, 2)
                   .expand(1, 3, 1, 2)], dim=3)
    got = to_uint8(x)  # the default
    assert got.shape == (1, 1, 7, 3) and got.dtype == np.uint8
    assert got[0, 0, :, 0].tolist() == [254, 254, 0, 100, 128, 0, 255]
    assert to_uint8(x, mode="round")[0, 0, :, 0].tolist() == [255, 254, 1, 101, 128, 0, 255]
    # exactly ADM's ((x + 1) * 127.5).clamp(0, 255).to(uint8) and MM-FM's (clamp(0, 1) * 255).to(uint8)
    rnd = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2.4 - 1.2
    adm = ((rnd + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(to_uint8(rnd, mode="truncate"), adm)
    mmfm = (((rnd + 1) / 2).clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(to_uint8(rnd).astype(int) - mmfm.astype(int)).max() <= 1  # same up to float rounding
    assert (to_uint8(rnd) != to_uint8(rnd, mode="round")).any()
    with pytest.raises(ValueError, match="'truncate' or 'round'"):
        to_uint8(x, mode="floor")


def test_to_uint8_round_is_the_exact_inverse_of_to_model_range():
    u8 = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    np.testing.assert_array_equal(to_uint8(to_model_range(u8), mode="round"), u8)
    # truncation is not an inverse: k / 127.5 − 1 comes back as k − 1 for some k in float32
    assert (to_uint8(to_model_range(u8), mode="truncate") != u8).any()
