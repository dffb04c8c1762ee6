"""Images (ADM centre crop, strict decoding, model range) and manifests (prepare_data: digits, imagefolder)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from sourceflow.data import manifest as mf
from sourceflow.data.images import BadImageError, center_crop_arr, load_image, to_model_range, to_uint8

ROOT = Path(__file__).resolve().parents[2]


def adm_center_crop_reference(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """guided-diffusion's center_crop_arr, written out literally from its formula."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y:crop_y + image_size, crop_x:crop_x + image_size]


def random_image(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    # smooth-ish content so bicubic does not just clip noise
    x = np.linspace(0, 1, w)[None, :, None]
    y = np.linspace(0, 1, h)[:, None, None]
    base = (255 * (0.5 + 0.5 * np.sin(7 * x + 5 * y + np.arange(3)))).astype(np.float64)
    arr = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr).convert(mode)


@pytest.mark.parametrize(("w", "h", "r"), [(37, 53, 32), (517, 300, 64), (333, 1001, 64), (8, 8, 8), (5, 9, 16),
                                           (64, 64, 64), (129, 257, 64), (255, 256, 64)])
def test_center_crop_matches_adm(w, h, r):
    img = random_image(w, h, seed=w * h)
    ours = center_crop_arr(img, r)
    assert ours.shape == (r, r, 3) and ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, adm_center_crop_reference(img, r))


def test_center_crop_converts_mode():
    img = random_image(70, 90, mode="L")
    out = center_crop_arr(img, 32)
    assert out.shape == (32, 32, 3)
    np.testing.assert_array_equal(out, adm_center_crop_reference(img.convert("RGB"), 32))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK"])
def test_load_image_is_rgb(tmp_path, mode):
    img = random_image(40, 30, mode=mode)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    img.save(path)
    out = load_image(path, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    expected = adm_center_crop_reference(Image.open(path).convert("RGB"), 16)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_truncated_image_raises_with_path(tmp_path, fmt):
    path = tmp_path / f"ok.{fmt}"
    random_image(120, 80).save(path)
    data = path.read_bytes()
    bad = tmp_path / f"bad.{fmt}"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImageError, match=str(bad)):
        load_image(bad, 32)


def test_not_an_image_and_missing(tmp_path):
    (tmp_path / "x.png").write_text("hello")
    with pytest.raises(BadImageError, match="x.png"):
        load_image(tmp_path / "x.png", 8)
    with pytest.raises(BadImageError, match="nope.png"):
        load_image(tmp_path / "nope.png", 8)


def test_model_range_round_trip():
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    x = to_model_range(u8)
    assert x.shape == (2, 3, 5, 7) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(x[1, 2, 3, 4], torch.tensor(u8[1, 3, 4, 2] / 127.5 - 1, dtype=torch.float32))
    np.testing.assert_array_equal(to_uint8(x, mode="round"), u8)
    np.testing.assert_array_equal(to_uint8(x + 0.003, mode="round"), u8)  # rounds to nearest, not truncation
    np.testing.assert_array_equal(to_uint8(torch.full((1, 3, 1, 1), 5.0)), np.full((1, 1, 1, 3), 255, np.uint8))
    np.testing.assert_array_equal(to_uint8(torch.full((1, 3, 1, 1), -5.0)), np.zeros((1, 1, 1, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        to_model_range(u8.astype(np.float32))


# --- manifests ---------------------------------------------------------------------------------------


def test_manifest_round_trip_and_split(tmp_path):
    frame = pd.DataFrame({"index": [0, 1, 2], "path": ["a/1.png", "b/2.png", "a/3.png"], "label": [0, 1, 0],
                          "split": ["train", "test", "train"]})
    out = tmp_path / "m" / "manifest.parquet"
    mf.write_manifest(out, frame, {"root": str(tmp_path / "img"), "num_classes": 2, "counts": {"train": 2, "test": 1}})
    m = mf.read_manifest(out)
    assert m.frame["index"].dtype == np.int64 and m.frame["label"].dtype == np.int64
    assert m.abspath(1) == tmp_path / "img" / "b/2.png"
    test = m.split("test")
    assert test.frame["index"].tolist() == [1] and test.abspath(0) == tmp_path / "img" / "b/2.png"
    assert len(m.split("train")) == 2 and m.num_classes == 2
    h = mf.manifest_hash(out)
    assert len(h) == 16 and h == mf.manifest_hash(out)
    mf.write_manifest(out, frame.assign(label=[1, 1, 0]), m.meta)
    assert mf.manifest_hash(out) != h
    with pytest.raises(ValueError, match="unknown split"):
        m.split("val")
    with pytest.raises(ValueError, match="no rows"):
        mf.Manifest(frame[frame.split == "train"], m.root, m.meta).split("test")


def test_manifest_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare_data"):
        mf.read_manifest(tmp_path / "manifest.parquet")
    frame = pd.DataFrame({"index": [0], "path": ["a.png"], "label": [0], "split": ["train"]})
    frame.to_parquet(tmp_path / "manifest.parquet")
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        mf.read_manifest(tmp_path / "manifest.parquet")
    with pytest.raises(ValueError, match="lacks column"):
        mf.write_manifest(tmp_path / "x.parquet", frame.drop(columns="split"), {})
    with pytest.raises(ValueError, match="unknown split"):
        mf.write_manifest(tmp_path / "x.parquet", frame.assign(split="val"), {})


def test_stratified_split():
    labels = np.repeat(np.arange(4), [10, 20, 41, 1])
    a = mf.stratified_split(labels, 0.25, seed=3)
    np.testing.assert_array_equal(a, mf.stratified_split(labels, 0.25, seed=3))
    assert not np.array_equal(a, mf.stratified_split(labels, 0.25, seed=4))
    for c, n in enumerate([10, 20, 41, 1]):
        assert (a[labels == c] == "test").sum() == round(0.25 * n)
    assert (mf.stratified_split(labels, 0.0, 0) == "train").all()


def test_scan_class_folders(tmp_path):
    for rel in ["b/x.PNG", "b/sub/y.jpeg", "a/z.JpG", "a/notes.txt", "a/.hidden.png", "c/w.webp", "c/v.bmp"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    (tmp_path / ".cache").mkdir()
    classes, items = mf.scan_class_folders(tmp_path, (".jpg", ".jpeg", ".png", ".bmp", ".webp"))
    assert classes == ["a", "b", "c"]
    assert items == [("a/z.JpG", 0), ("b/sub/y.jpeg", 1), ("b/x.PNG", 1), ("c/v.bmp", 2), ("c/w.webp", 2)]
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        mf.scan_class_folders(tmp_path, (".png",))


# --- the prepare_data stage ----------------------------------------------------------------------------


def run_stage(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "stages" / "prepare_data.py"), *args], cwd=ROOT,
                          capture_output=True, text=True)


def make_folder(root: Path, classes: dict[str, int], size=(20, 14), seed=0) -> None:
    for ci, (name, n) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            random_image(size[0] + i, size[1], seed=seed + 100 * ci + i).save(root / name / f"img{i}.{'png' if i % 2 else 'jpg'}")


def test_prepare_imagefolder_bad_image_stop_and_skip(tmp_path):
    root = tmp_path / "train"
    make_folder(root, {"cat": 6, "dog": 5})
    random_image(300, 200).save(root / "dog" / "img0.jpg")
    good = (root / "dog" / "img0.jpg").read_bytes()
    (root / "dog" / "img0.jpg").write_bytes(good[: len(good) // 2])
    out = tmp_path / "res" / "manifest.parquet"
    res = run_stage("--source", "imagefolder", "--root", str(root), "--resolution", "16", "--workers", "2",
                    "--out", str(out))
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.startswith("error:")]  # (and the progress bar)
    assert len(lines) == 1 and lines[0].startswith(f"error: {root / 'dog' / 'img0.jpg'}: unreadable image"), lines
    assert not out.exists()

    res = run_stage("--source", "imagefolder", "--root", str(root), "--resolution", "16", "--on-bad-image", "skip",
                    "--test-fraction", "0.2", "--seed", "1", "--out", str(out))
    assert res.returncode == 0, res.stderr
    skipped = pd.read_csv(out.parent / "skipped.csv")
    assert skipped["path"].tolist() == ["dog/img0.jpg"] and "truncated" in skipped["reason"].iat[0]
    m = mf.read_manifest(out)
    assert len(m) == 10 and "dog/img0.jpg" not in set(m.frame["path"])
    assert m.meta["skipped"] == 1 and m.meta["class_names"] == ["cat", "dog"] and m.meta["resolution"] == 16
    assert m.frame["index"].tolist() == list(range(10))
    assert m.meta["counts"] == {"train": 8, "test": 2}
    assert (m.frame.groupby("label")["split"].apply(lambda s: (s == "test").sum()) == 1).all()
    assert m.frame["path"].iat[0] == "cat/img0.jpg" and m.abspath(0) == root / "cat" / "img0.jpg"
    img = load_image(m.abspath(3), 16)
    assert img.shape == (16, 16, 3)


def test_prepare_imagefolder_test_root(tmp_path):
    make_folder(tmp_path / "data" / "train", {"a": 3, "b": 2})
    make_folder(tmp_path / "data" / "val", {"a": 1, "b": 2}, seed=7)
    out = tmp_path / "res" / "manifest.parquet"
    res = run_stage("--source", "imagefolder", "--root", str(tmp_path / "data" / "train"), "--test-root",
                    str(tmp_path / "data" / "val"), "--out", str(out))
    assert res.returncode == 0, res.stderr
    m = mf.read_manifest(out)
    assert m.root == tmp_path / "data" and m.meta["split_roots"] == {"train": "train", "test": "val"}
    assert m.frame["split"].tolist() == ["train"] * 5 + ["test"] * 3
    assert m.frame["path"].tolist()[4:6] == ["train/b/img1.png", "val/a/img0.jpg"]
    assert all(m.abspath(i).is_file() for i in range(len(m)))
    make_folder(tmp_path / "data" / "val", {"c": 1})
    res = run_stage("--source", "imagefolder", "--root", str(tmp_path / "data" / "train"), "--test-root",
                    str(tmp_path / "data" / "val"), "--out", str(out))
    assert res.returncode == 2 and "different classes" in res.stderr


def test_prepare_digits_end_to_end(tmp_path):
    from sklearn.datasets import load_digits

    out = tmp_path / "digits" / "manifest.parquet"
    res = run_stage("--source", "digits", "--test-fraction", "0.15", "--seed", "2", "--out", str(out))
    assert res.returncode == 0, res.stderr
    m = mf.read_manifest(out)
    d = load_digits()
    assert len(m) == 1797 and m.meta["num_classes"] == 10 and m.meta["resolution"] == 8
    np.testing.assert_array_equal(m.frame["label"].to_numpy(), d.target)
    assert m.root == tmp_path / "digits" / "images"
    assert m.meta["counts"]["test"] == sum(round(0.15 * n) for n in np.bincount(d.target))
    expected = np.rint(d.images * 255 / 16).astype(np.uint8)
    for i in [0, 1, 500, 1796]:
        assert m.frame["path"].iat[i] == f"{d.target[i]}/{i:04d}.png"
        png = np.asarray(Image.open(m.abspath(i)))
        assert png.dtype == np.uint8 and png.shape == (8, 8)
        np.testing.assert_array_equal(png, expected[i])
        rgb = load_image(m.abspath(i), 8)  # the same read path as any folder: an exact round trip at R = 8
        np.testing.assert_array_equal(rgb, np.repeat(expected[i][..., None], 3, axis=2))
    caps = pd.read_json(out.parent / "captions.jsonl", lines=True)
    assert caps["path"].tolist() == m.frame["path"].tolist()
    assert caps["recaption_short"].str.len().min() > 5
    # deterministic by seed: a second run gives the same manifest bytes
    h = mf.manifest_hash(out)
    assert run_stage("--source", "digits", "--test-fraction", "0.15", "--seed", "2", "--out", str(out)).returncode == 0
    assert mf.manifest_hash(out) == h
    # a foreign folder is never replaced by the digits writer
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    res = run_stage("--source", "digits", "--root", str(tmp_path / "mine"), "--out", str(out))
    assert res.returncode == 2 and "refusing to replace" in res.stderr
    assert (tmp_path / "mine" / "keep.txt").is_file()
