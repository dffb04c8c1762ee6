"""The dataset manifest: one row per image (index, path, label, split) in ``manifest.parquet`` and the
dataset facts in ``manifest.json`` beside it.

``path`` is a posix path relative to the image root. The root in ``manifest.json`` is stored as it was
given to prepare_data; a relative root is resolved against the current directory (the Snakemake working
directory), so a results tree with a relative root can be moved together with its images.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from sourceflow.io import atomic_path, read_json, write_json

COLUMNS = ("index", "path", "label", "split")
SPLITS = ("train", "test")


@dataclass
class Manifest:
    """Rows of a dataset (``frame``), its image root and its ``manifest.json`` facts (``meta``)."""

    frame: pd.DataFrame
    root: Path
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.frame)

    def abspath(self, i: int) -> Path:
        """Path of the image in row ``i`` (a row position of this frame, not the ``index`` column)."""
        return self.root / self.frame["path"].iat[i]

    def split(self, name: str) -> Manifest:
        """The rows of one split, in manifest order; the ``index`` column keeps the global index."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r} (choose from {', '.join(SPLITS)})")
        rows = self.frame[self.frame["split"] == name].reset_index(drop=True)
        if rows.empty:
            raise ValueError(f"split {name!r} of the manifest (root {self.root}) has no rows; "
                             f"counts: {self.meta.get('counts', {})}")
        return Manifest(rows, self.root, self.meta)

    @property
    def num_classes(self) -> int:
        return int(self.meta.get("num_classes", 0))


def meta_path(path: str | Path) -> Path:
    """``manifest.json`` beside ``manifest.parquet``."""
    return Path(path).with_suffix(".json")


def validate_frame(frame: pd.DataFrame, where: str) -> pd.DataFrame:
    """Check columns and types; return the frame with canonical dtypes."""
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{where}: manifest lacks column(s) {', '.join(missing)} (has {', '.join(frame.columns)})")
    frame = frame.copy()
    frame["index"] = frame["index"].astype("int64")
    frame["label"] = frame["label"].astype("int64")
    frame["path"] = frame["path"].astype(str)
    frame["split"] = frame["split"].astype(str)
    n = len(frame)
    if n and not np.array_equal(frame["index"].to_numpy(), np.arange(n)):
        raise ValueError(f"{where}: manifest 'index' column must be 0..N-1 in order")
    bad = sorted(set(frame["split"]) - set(SPLITS))
    if bad:
        raise ValueError(f"{where}: unknown split value(s) {bad} (allowed: {', '.join(SPLITS)})")
    if frame["path"].duplicated().any():
        dup = frame.loc[frame["path"].duplicated(), "path"].iat[0]
        raise ValueError(f"{where}: duplicate path {dup!r} in manifest")
    return frame


def write_manifest(path: str | Path, frame: pd.DataFrame, meta: dict) -> None:
    """Write ``manifest.parquet`` and ``manifest.json`` atomically (json second: it marks completion)."""
    path = Path(path)
    frame = validate_frame(frame, str(path))[list(COLUMNS) + [c for c in frame.columns if c not in COLUMNS]]
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False, engine="pyarrow")
    write_json(meta_path(path), meta)


def read_manifest(path: str | Path, root: str | Path | None = None) -> Manifest:
    """Read ``manifest.parquet`` and ``manifest.json`` beside it; ``root`` overrides the stored root."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path} (run the prepare_data stage)")
    mpath = meta_path(path)
    if not mpath.is_file():
        raise FileNotFoundError(f"manifest metadata not found: {mpath} (re-run the prepare_data stage)")
    meta = read_json(mpath)
    try:
        frame = pd.read_parquet(path, engine="pyarrow")
    except Exception as e:  # pyarrow raises its own error types for broken files
        raise ValueError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    frame = validate_frame(frame, str(path))
    if root is None:
        if "root" not in meta:
            raise KeyError(f"{mpath}: no 'root' entry")
        root = meta["root"]
    return Manifest(frame, Path(root), meta)


def manifest_hash(path: str | Path) -> str:
    """First 16 hex digits of the sha256 of the parquet file's bytes (stores record it to detect drift)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except FileNotFoundError:
        raise FileNotFoundError(f"manifest not found: {path} (run the prepare_data stage)") from None
    return h.hexdigest()[:16]


# --- building manifests (used by stages/prepare_data.py) ---------------------------------------------


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Split names per row ("train"/"test"): per label, round(fraction · n) seeded-random rows go to test.

    Deterministic for the same labels, fraction and seed; every label keeps the same test share
    (a class with one image stays in train unless the fraction rounds it to test).
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"--test-fraction must be in [0, 1), got {test_fraction}")
    labels = np.asarray(labels)
    split = np.full(len(labels), "train", dtype=object)
    rng = np.random.default_rng(seed)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        n_test = int(round(test_fraction * len(rows)))
        split[rng.permutation(rows)[:n_test]] = "test"
    return split


def scan_class_folders(root: str | Path, extensions: tuple[str, ...]) -> tuple[list[str], list[tuple[str, int]]]:
    """torchvision ImageFolder layout: ``root/<class>/**/<file>``.

    Classes are the sorted non-hidden subdirectories (labels 0..C-1); files are those whose suffix is
    in ``extensions`` (case-insensitive), walked recursively in sorted order (symlinks followed).
    Returns (class names, [(posix path relative to root, label)]). A class without images is an error.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{root}: no class subfolders (expected root/<class>/<image>)")
    exts = tuple(e.lower() for e in extensions)
    items: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in sorted(filenames):
                if not fn.startswith(".") and fn.lower().endswith(exts):
                    found.append(Path(dirpath, fn).relative_to(root).as_posix())
        if not found:
            raise ValueError(f"{root / name}: class folder holds no images ({', '.join(exts)})")
        items.extend((p, label) for p in sorted(found))
    return classes, items


def _check_one(path: Path) -> tuple[str | None, tuple[int, int]]:
    from sourceflow.data.images import BadImageError, open_rgb

    try:
        im = open_rgb(path)
    except BadImageError as e:
        return str(e), (0, 0)
    return None, im.size


def check_images(root: Path, paths: list[str], workers: int, desc: str = "decoding images"
                 ) -> tuple[list[str | None], list[tuple[int, int]]]:
    """Decode every image fully once (thread pool; Pillow releases the GIL while decoding).

    Returns per path the error message (None when it decoded) and its (width, height).
    """
    from multiprocessing.pool import ThreadPool

    from sourceflow.progress import bar

    full = [root / p for p in paths]
    errors: list[str | None] = []
    sizes: list[tuple[int, int]] = []
    chunk = max(1, min(64, len(full) // (8 * max(1, workers)) or 1))
    with ThreadPool(max(1, workers)) as pool, bar(total=len(full), desc=desc, unit="img") as pbar:
        for err, size in pool.imap(_check_one, full, chunksize=chunk):
            errors.append(err)
            sizes.append(size)
            pbar.update(1)
    return errors, sizes


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as uint8 [1797, 8, 8] (0..16 scaled by 255/16, rounded) and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return images, d.target.astype(np.int64)


DIGITS_MARKER = ".sourceflow-digits"


def digits_path(i: int, label: int) -> str:
    return f"{label}/{i:04d}.png"


def write_digits_images(root: str | Path) -> tuple[list[str], np.ndarray]:
    """Write the digits once as grayscale PNGs ``root/{label}/{i:04d}.png`` (i = sklearn order).

    The folder is written beside ``root`` and swapped in whole, so a killed run leaves no partial tree.
    A marker file ``DIGITS_MARKER`` identifies the tree; an existing non-empty ``root`` without it is
    never replaced (it is someone else's folder). Returns the relative paths and labels in sklearn order.
    """
    from PIL import Image

    from sourceflow.io import replace_dir

    root = Path(root)
    if root.exists() and (not root.is_dir() or (any(root.iterdir()) and not (root / DIGITS_MARKER).is_file())):
        raise ValueError(f"{root} exists and was not written by prepare_data --source digits; refusing to replace "
                         "it (choose another --root)")
    images, labels = digits_arrays()
    paths = [digits_path(i, int(y)) for i, y in enumerate(labels)]
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        for d in sorted(set(int(y) for y in labels)):
            (tmp / str(d)).mkdir()
        for img, p in zip(images, paths, strict=True):
            Image.fromarray(img).save(tmp / p)
        (tmp / DIGITS_MARKER).write_text("written by stages/prepare_data.py --source digits\n")
        replace_dir(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return paths, labels
