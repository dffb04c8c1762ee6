"""The Zarr latent store: CLS descriptors and spatial latents of one dataset split under one encoder.

Layout (a Zarr v3 group, e.g. ``results/{dataset}/{encoder}/latents.zarr``):

- ``cls`` [N, D], ``spatial`` [N, C, H, W] (float32, or float16 with the ``dtype`` attribute: half the
  bytes on disk and per training batch), ``index`` int64 [N] (manifest index of the image), ``flip`` uint8
  [N] (1 = horizontally flipped copy).
- Rows [0, M) are the M images of the split in manifest order; with flips, rows [M, 2M) are their
  flipped copies in the same order (row i + M is the flip of row i), so N = 2M.
- Every array is sharded along rows: shard ``s`` holds rows [s·shard_rows, (s+1)·shard_rows) of every
  array, one file per array. No compressor by default (float latents barely compress).
- Group attributes: encoder, weights, encoder_options, resolution, manifest_hash, split, flips,
  num_images (M), shard_rows, cls_dim, spatial_shape, dtype, layout_version, complete.
- Inner chunks are row-granular for wide rows (``sourceflow.store.sharded.chunk_rows``): a training batch of
  random rows reads each row's bytes and the shard index, not its neighbours.

Writing (``LatentWriter``, on the generic row-sharded writer of ``sourceflow.store.sharded``): the store is created once, atomically (built in a temporary folder and
renamed). Writers reopen it read-write; each process owns whole shards (Zarr 3 writers that share a
shard lose rows silently). A shard is written in one call per array (a full-shard write: Zarr writes
the shard file to a temporary name and renames it), the files are fsynced, and only then is a small
done marker ``_done/shard_XXXXXX.json`` written (atomically) recording each file's size. A kill
mid-shard therefore leaves at most a shard without a marker, which a resumed run deletes and rewrites;
the marker, not the presence of data, decides what is finished. (Zarr 3.1.6 has no
``read_missing_chunks`` switch: missing chunks silently read as zeros, so they cannot be used to
detect unfinished writes.) ``complete`` is set only after every marker is present, every file has its
recorded size and the ``index``/``flip`` columns hold exactly the expected rows; the markers are then
removed. Everything inside the store is a deterministic function of the inputs, so a killed-and-resumed
extraction ends byte-identical to an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sourceflow.io import reading
from sourceflow.store.sharded import (
    DONE_DIR,
    GuardedArray,
    ShardedWriter,
    check_chunk_files,
    create_sharded_group,
    jsonable,
)

ARRAYS = ("cls", "spatial", "index", "flip")
DTYPES = {"cls": "float32", "spatial": "float32", "index": "int64", "flip": "uint8"}
FLOAT_DTYPES = ("float32", "float16")  # the ``dtype`` of cls and spatial
LAYOUT_VERSION = 1
# Attributes that say what a store holds: a store is resumed only if all of these match.
IDENTITY_KEYS = ("encoder", "weights", "encoder_options", "resolution", "manifest_hash", "split", "flips",
                 "num_images", "shard_rows", "cls_dim", "spatial_shape", "compressor", "dtype", "layout_version")
# what a store made before an identity key existed holds
IDENTITY_DEFAULTS = {"dtype": "float32"}


def _zarr():
    import zarr

    return zarr


def num_rows_of(num_images: int, flips: bool) -> int:
    return num_images * (2 if flips else 1)


def expected_index_flip(image_index: np.ndarray, flips: bool) -> tuple[np.ndarray, np.ndarray]:
    """The ``index`` and ``flip`` columns of a store over images ``image_index`` (manifest order)."""
    idx = np.asarray(image_index, dtype=np.int64)
    m = len(idx)
    if flips:
        return np.concatenate([idx, idx]), np.concatenate([np.zeros(m, np.uint8), np.ones(m, np.uint8)])
    return idx.copy(), np.zeros(m, np.uint8)


REWRITE_STORE = "delete the store and rerun the extract_latents stage"


class LatentStore:
    """Read access to a latent store (see the module docstring for the layout)."""

    def __init__(self, path: Path, group: Any) -> None:
        self.path = path
        self.group = group
        self.attrs: dict = dict(group.attrs)
        self._arrays: dict[str, Any] = {}
        for name in ARRAYS:
            meta = path / name / "zarr.json"
            if not meta.is_file():
                raise ValueError(f"{path}: latent store lacks the {name!r} array")
            with reading(meta, "Zarr array metadata", REWRITE_STORE):
                self._arrays[name] = GuardedArray(group[name], path / name, "Zarr array (a chunk file)", REWRITE_STORE)
        self.num_rows = int(self._arrays["cls"].shape[0])
        self.num_images = int(self.attrs.get("num_images", self.num_rows))
        self.cls_dim = int(self._arrays["cls"].shape[1])
        self.spatial_shape: tuple[int, int, int] = tuple(int(s) for s in self._arrays["spatial"].shape[1:])
        self.shard_rows = int(self.attrs.get("shard_rows", self._arrays["cls"].shards[0]))

    @classmethod
    def open(cls, path: str | Path, *, require_complete: bool = True) -> LatentStore:
        """Open a store for reading; ValueError if it is not marked complete (unless ``require_complete=False``)."""
        path = Path(path)
        if not (path / "zarr.json").is_file():
            if path.exists():
                raise ValueError(f"{path}: not a Zarr v3 group (no zarr.json)")
            raise FileNotFoundError(f"latent store not found: {path} (run the extract_latents stage)")
        zarr = _zarr()
        with reading(path / "zarr.json", "Zarr group metadata", REWRITE_STORE):
            group = zarr.open_group(str(path), mode="r")
        store = cls(path, group)
        if require_complete and not store.attrs.get("complete", False):
            n_done = len(list((path / DONE_DIR).glob("shard_*.json"))) if (path / DONE_DIR).is_dir() else 0
            raise ValueError(f"{path}: latent store is incomplete ({n_done} of {store.num_shards} shards marked "
                             f"written; re-run extract_latents to resume it)")
        if require_complete:
            check_chunk_files(path, group, "the latent store", REWRITE_STORE, ARRAYS)
        return store

    @property
    def num_shards(self) -> int:
        return -(-self.num_rows // self.shard_rows)

    def shard_range(self, s: int) -> tuple[int, int]:
        return s * self.shard_rows, min((s + 1) * self.shard_rows, self.num_rows)

    def array(self, name: str) -> Any:
        if name not in self._arrays:
            raise KeyError(f"{self.path}: no array {name!r} (arrays: {', '.join(ARRAYS)})")
        return self._arrays[name]

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of array ``name`` (cls | spatial | index | flip) as a numpy array."""
        arr = self.array(name)
        stop = self.num_rows if stop is None else stop
        if not 0 <= start <= stop <= self.num_rows:
            raise ValueError(f"{self.path}: rows [{start}, {stop}) out of range for {self.num_rows} rows")
        return np.asarray(arr[start:stop])

    def iter_batches(self, names: Sequence[str], batch_rows: int, start: int = 0, stop: int | None = None
                     ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Yield ``(first_row, {name: rows})`` for consecutive batches of ``batch_rows`` rows of [start, stop).

        Reads go shard by shard (each shard file is read once, whole), so memory holds about one shard
        plus one batch; every batch has exactly ``batch_rows`` rows except the last.
        """
        if batch_rows < 1:
            raise ValueError(f"batch_rows must be positive, got {batch_rows}")
        for n in names:
            self.array(n)
        stop = self.num_rows if stop is None else stop
        if not 0 <= start <= stop <= self.num_rows:
            raise ValueError(f"{self.path}: rows [{start}, {stop}) out of range for {self.num_rows} rows")
        if not names:
            raise ValueError("iter_batches: name at least one array")
        pending: dict[str, np.ndarray] = {}
        size = offset = 0
        first = start
        for s in range(start // self.shard_rows, self.num_shards):
            a, b = self.shard_range(s)
            a, b = max(a, start), min(b, stop)
            if a >= b:
                break
            data = {n: self.read(n, a, b) for n in names}
            if offset == size:
                pending = data
            else:
                pending = {n: np.concatenate([pending[n][offset:], data[n]]) for n in names}
            size, offset = size - offset + (b - a), 0
            while size - offset >= batch_rows:
                yield first, {n: pending[n][offset:offset + batch_rows] for n in names}
                offset += batch_rows
                first += batch_rows
        if offset < size:
            yield first, {n: pending[n][offset:] for n in names}


class LatentWriter(ShardedWriter):
    """Creates, resumes and completes a store; each process writes whole shards (see module docstring)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, ARRAYS)

    # -- creation and identity -------------------------------------------------------------------
    @staticmethod
    def create(path: str | Path, identity: dict, *, cls_dim: int, spatial_shape: Sequence[int],
               num_images: int, flips: bool, shard_rows: int, compressor: str = "none", dtype: str = "float32") -> None:
        """Create an empty store at ``path`` (must not exist), atomically: temp folder + rename; ``dtype`` is
        the float type of ``cls`` and ``spatial`` (float32 or float16)."""
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"{path}: latent dtype must be one of {', '.join(FLOAT_DTYPES)}, got {dtype!r}")
        n = num_rows_of(num_images, flips)
        if n < 1:
            raise ValueError(f"{path}: no rows to store (num_images={num_images})")
        shapes = {"cls": (n, int(cls_dim)), "spatial": (n, *(int(x) for x in spatial_shape)), "index": (n,),
                  "flip": (n,)}
        attrs = dict(identity)
        attrs.update(num_images=int(num_images), flips=bool(flips), cls_dim=int(cls_dim),
                     spatial_shape=[int(x) for x in spatial_shape], dtype=dtype, layout_version=LAYOUT_VERSION)
        dtypes = {**DTYPES, "cls": dtype, "spatial": dtype}
        create_sharded_group(path, {k: (shapes[k], dtypes[k]) for k in ARRAYS}, shard_rows, attrs, compressor)

    @staticmethod
    def identity_mismatch(path: str | Path, identity: dict) -> dict[str, tuple[Any, Any]]:
        """Identity attributes of the store at ``path`` that differ from ``identity``: {key: (stored, wanted)}."""
        stored = dict(_zarr().open_group(str(path), mode="r").attrs)
        want = jsonable(identity)
        have = {k: stored.get(k, IDENTITY_DEFAULTS.get(k)) for k in IDENTITY_KEYS}
        return {k: (have[k], want[k]) for k in IDENTITY_KEYS if k in want and have[k] != want[k]}

    def write_shard(self, s: int, arrays: dict[str, np.ndarray]) -> None:
        """:meth:`ShardedWriter.write_shard`, refusing float32 latents that a float16 store cannot hold."""
        for name in ("cls", "spatial"):
            a = arrays.get(name)
            if a is not None and self.arrays[name].dtype == np.float16 and a.size:
                top = max(float(np.max(a)), -float(np.min(a)))  # NaN stays NaN; no temporary the size of a shard
                if top > float(np.finfo(np.float16).max):
                    raise ValueError(f"{self.path}: {name} latents reach {top:.4g}, beyond float16's "
                                     f"{float(np.finfo(np.float16).max):g}; extract with dtype: float32")
        super().write_shard(s, arrays)

    # -- completion -----------------------------------------------------------------------------
    def verify(self, expected_index: np.ndarray, expected_flip: np.ndarray) -> list[str]:
        """Problems that keep the store from being complete (empty list: complete)."""
        problems = self.file_problems()
        if problems:
            return problems
        if not np.array_equal(np.asarray(self.arrays["index"][:]), expected_index):
            problems.append("the index column does not match the manifest rows")
        if not np.array_equal(np.asarray(self.arrays["flip"][:]), expected_flip):
            problems.append("the flip column does not match the expected layout")
        return problems
