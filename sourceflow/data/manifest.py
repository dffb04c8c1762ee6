"""The dataset manifest: one row per image (index, path, label, split) in ``manifest.parquet`` and the
dataset facts in ``manifest.json`` beside it.

``path`` is a posix path relative to the image root. The root in ``manifest.json`` is stored as it was
given to prepare_data; a relative root is resolved against the current directory (the Snakemake working
directory), so a results tree with a relative root can be moved together with its images.
"""

from __future__ import annotations

import hashlib
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
