"""Row-sharded Zarr v3 groups that several processes write shard by shard and a killed run resumes.

The mechanism behind the latent store (``sourceflow.store.latents``) and the sample store
(``sourceflow.sampling_store``): every array of the group is sharded along rows with the same
``shard_rows``; a process owns whole shards (Zarr 3 writers that share a shard lose rows silently).
A shard is written in one call per array, the files are fsynced, and only then is a small done marker
``_done/shard_XXXXXX.json`` written (atomically) recording each file's size. A kill mid-shard leaves at
most a shard without a marker, which a resumed run rewrites; the marker, not the presence of data,
decides what is finished (missing Zarr chunks silently read as the fill value). ``complete`` is set
only once every marker is present and every file has its recorded size; the markers are then removed.
A full disk fails the write with an OSError naming the store (Zarr's own names no file), which the stages
report as one line; the store stays incomplete and resumes once space is freed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sourceflow.io import naming_full_disk, reading

DONE_DIR = "_done"
# Inner chunks: a row of at least ROW_CHUNK_MIN_BYTES is a chunk of its own, so a training batch of random
# rows (ImageNet's RAE latents: 384 KiB per float16 row) reads its rows and the shard indexes, not the
# neighbours (read amplification ~1.0 instead of the chunk's row count: benchmarks/data_path.py); narrower
# rows (CLS, labels) share chunks of at most CHUNK_TARGET_BYTES, about a disk read. Sequential readers read
# whole shards either way.
ROW_CHUNK_MIN_BYTES = 16 << 10
CHUNK_TARGET_BYTES = 64 << 10


def _zarr():
    import zarr

    return zarr


def chunk_rows(shard_rows: int, row_bytes: int, target: int = CHUNK_TARGET_BYTES) -> int:
    """Rows per inner chunk: the largest divisor of ``shard_rows`` whose chunk stays under ``target`` bytes
    (at least 1); 1 for rows of ROW_CHUNK_MIN_BYTES or more, so a random row read touches one wide row or
    at most ``target`` bytes."""
    best = 1
    if row_bytes >= ROW_CHUNK_MIN_BYTES:
        return best
    for d in range(1, shard_rows + 1):
        if shard_rows % d == 0 and d * row_bytes <= target:
            best = d
    return best


def jsonable(attrs: dict) -> dict:
    """Attributes as they come back from JSON (tuples become lists), for comparisons."""
    return json.loads(json.dumps(attrs))


def compressors(name: str) -> Any:
    """Zarr codecs for ``none`` (float latents barely compress) or ``lz4`` (Blosc)."""
    if name == "none":
        return None
    if name == "lz4":
        from zarr.codecs import BloscCodec

        return [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]
    raise ValueError(f"unknown compressor {name!r} (choose none or lz4)")


class GuardedArray:
    """A read-only Zarr array whose reads turn a damaged chunk file into the one-line error of
    :func:`sourceflow.io.reading` naming the array's folder (a truncated chunk fails its checksum or its
    decompression deep inside Zarr, with no file name); everything else is the wrapped array's."""

    def __init__(self, array: Any, path: Path, what: str, fix: str) -> None:
        self._array, self._path, self._what, self._fix = array, Path(path), what, fix

    def __getattr__(self, name: str) -> Any:
        return getattr(self._array, name)

    def __len__(self) -> int:
        return len(self._array)

    def __getitem__(self, key: Any) -> Any:
        with reading(self._path, self._what, self._fix):
            return self._array[key]

    def get_orthogonal_selection(self, selection: Any) -> Any:
        with reading(self._path, self._what, self._fix):
            return self._array.get_orthogonal_selection(selection)


def missing_chunk_files(path: str | Path, group: Any, names: Sequence[str] | None = None) -> list[str]:
    """The chunk (or shard) files of arrays ``names`` (default: all) of a Zarr v3 ``group`` at ``path`` that
    are absent, relative to ``path``. Zarr reads a missing chunk as the fill value without a word, so a store
    marked complete that lost a file must be refused by looking, not by reading."""
    import itertools

    path = Path(path)
    missing = []
    for name in sorted(names if names is not None else (n for n, _ in group.arrays())):
        arr = group[name]
        grid = arr.shards or arr.chunks
        counts = [-(-int(n) // int(g)) for n, g in zip(arr.shape, grid, strict=True)]
        for idx in itertools.product(*map(range, counts)):
            rel = f"{name}/{arr.metadata.encode_chunk_key(idx)}"
            if not (path / rel).is_file():
                missing.append(rel)
    return missing


def check_chunk_files(path: str | Path, group: Any, what: str, fix: str, names: Sequence[str] | None = None) -> None:
    """ValueError naming the store and its first missing chunk file when a complete store lost files."""
    missing = missing_chunk_files(path, group, names)
    if missing:
        raise ValueError(f"{path}: {what} is marked complete but {len(missing)} chunk file(s) are missing "
                         f"(first: {missing[0]}); {fix}")


def create_sharded_group(path: str | Path, arrays: dict[str, tuple[Sequence[int], str]], shard_rows: int,
                         attrs: dict, compressor: str = "none") -> None:
    """Create an empty group at ``path`` (must not exist) atomically (temp folder + rename).

    ``arrays``: name → (shape with rows first, dtype); every array is sharded by ``shard_rows`` rows.
    ``attrs`` go into the group attributes with ``shard_rows``, ``compressor`` and ``complete: false``.
    """
    zarr = _zarr()
    path = Path(path)
    if path.exists():
        raise ValueError(f"{path}: already exists")
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be positive, got {shard_rows}")
    rows = {int(shape[0]) for shape, _ in arrays.values()}
    if len(rows) != 1 or min(rows) < 1:
        raise ValueError(f"{path}: every array needs the same positive number of rows, got {sorted(rows)}")
    with temp_store_dir(path) as tmp, naming_full_disk(path):  # names the store, not the temporary folder
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        codecs = compressors(compressor)
        for name, (shape, dtype) in arrays.items():
            shape = tuple(int(s) for s in shape)
            row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
            group.create_array(name, shape=shape, dtype=dtype,
                               chunks=(chunk_rows(shard_rows, row_bytes), *shape[1:]),
                               shards=(shard_rows, *shape[1:]), compressors=codecs, fill_value=0,
                               config={"write_empty_chunks": True})
        group.attrs.update(jsonable({**attrs, "shard_rows": int(shard_rows), "compressor": compressor,
                                     "complete": False}))
        (tmp / DONE_DIR).mkdir()
        os.replace(tmp, path)


@contextlib.contextmanager
def temp_store_dir(path: Path) -> Iterator[Path]:
    """A temporary folder beside ``path`` for building a Zarr store that the caller renames to ``path``;
    removed if it is still there at the end, after Zarr's in-flight writes have ended
    (:func:`settle_zarr_writes`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        settle_zarr_writes()  # a sibling write still in flight would recreate the folder after the removal
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


SETTLE_TIMEOUT_S = 60.0


def settle_zarr_writes() -> None:
    """Wait until every write Zarr has in flight has ended.

    Zarr gathers a node's metadata writes (the array's ``zarr.json`` and its parents') concurrently and raises
    on the first failure (ENOSPC) while the others run on in its IO threads; LocalStore's ``mkdir(parents=True)``
    then recreates a folder that the cleanup removed meanwhile. Called after a failed write, before cleaning up.
    """
    import asyncio

    async def drain() -> None:
        me = asyncio.current_task()
        await asyncio.gather(*(t for t in asyncio.all_tasks() if t is not me), return_exceptions=True)

    # bounded, and never masking the failure being handled: a write hung on a dead file system (or a Zarr without
    # this loop helper) leaves at worst the temporary folder behind
    with contextlib.suppress(Exception):
        from zarr.core.sync import sync  # Zarr's own event loop, where its writes run

        sync(drain(), timeout=SETTLE_TIMEOUT_S)


class ShardedWriter:
    """Writes, resumes and completes a group made by :func:`create_sharded_group` (see module docstring)."""

    def __init__(self, path: str | Path, names: Sequence[str]) -> None:
        self.path = Path(path)
        zarr = _zarr()
        self.group = zarr.open_group(str(self.path), mode="r+")
        self.attrs = dict(self.group.attrs)
        # write_empty_chunks is a runtime setting (not stored): without it an all-zero shard (e.g. the
        # flip column of unflipped rows) would not be written at all and could not be told from a missing one.
        self.arrays = {n: self.group[n].with_config({"write_empty_chunks": True}) for n in names}
        self.num_rows = int(self.arrays[names[0]].shape[0])
        self.shard_rows = int(self.attrs["shard_rows"])
        self.num_shards = -(-self.num_rows // self.shard_rows)

    def shard_range(self, s: int) -> tuple[int, int]:
        return s * self.shard_rows, min((s + 1) * self.shard_rows, self.num_rows)

    def marker(self, s: int) -> Path:
        return self.path / DONE_DIR / f"shard_{s:06d}.json"

    def shard_files(self, s: int) -> dict[str, Path]:
        """The file of shard ``s`` of every array, relative to the store (a full-row shard key)."""
        out = {}
        for name, arr in self.arrays.items():
            key = arr.metadata.encode_chunk_key((s,) + (0,) * (arr.ndim - 1))
            out[name] = self.path / name / key
        return out

    def done_shards(self) -> set[int]:
        d = self.path / DONE_DIR
        if not d.is_dir():
            return set()
        return {int(p.stem.split("_")[1]) for p in d.glob("shard_*.json")}

    def pending_shards(self) -> list[int]:
        done = self.done_shards()
        return [s for s in range(self.num_shards) if s not in done]

    def clean_partial_files(self) -> int:
        """Delete temporary ``*.partial`` files a killed Zarr write leaves behind; returns how many."""
        n = 0
        for p in self.path.rglob("*.partial"):
            p.unlink(missing_ok=True)
            n += 1
        return n

    def write_shard(self, s: int, arrays: dict[str, np.ndarray]) -> None:
        """Write all rows of shard ``s`` of every array, fsync the files, then write its done marker."""
        a, b = self.shard_range(s)
        for name, arr in self.arrays.items():
            if name not in arrays:
                raise KeyError(f"write_shard: missing array {name!r}")
            shape = (b - a, *arr.shape[1:])
            if tuple(arrays[name].shape) != shape:
                raise ValueError(f"write_shard {s}: {name} has shape {tuple(arrays[name].shape)}, expected {shape}")
        self.marker(s).unlink(missing_ok=True)
        files = self.shard_files(s)
        for f in files.values():  # a previous attempt's (maybe truncated) shard file: never read it back
            f.unlink(missing_ok=True)
        with naming_full_disk(self.path):
            for name, arr in self.arrays.items():
                arr[a:b] = np.ascontiguousarray(arrays[name], dtype=arr.dtype)
            sizes = {}
            for name, f in files.items():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                sizes[name] = f.stat().st_size
        from sourceflow.io import write_json

        write_json(self.marker(s), {"shard": s, "rows": [a, b], "bytes": sizes})

    def file_problems(self) -> list[str]:
        """Missing shards and shard files whose size differs from their marker (empty list: all written)."""
        done = self.done_shards()
        missing = [s for s in range(self.num_shards) if s not in done]
        if missing:
            return [f"{len(missing)} of {self.num_shards} shards not written (first: {missing[0]})"]
        problems = []
        for s in range(self.num_shards):
            rec = json.loads(self.marker(s).read_text())
            for name, f in self.shard_files(s).items():
                size = f.stat().st_size if f.is_file() else None
                if size != rec["bytes"].get(name):
                    problems.append(f"shard {s}: {f.relative_to(self.path)} has {size} bytes, marker says "
                                    f"{rec['bytes'].get(name)}")
        return problems

    def mark_complete(self) -> None:
        """Set ``complete`` (after the checks passed), then drop the done markers."""
        with naming_full_disk(self.path):
            self.group.attrs["complete"] = True
        shutil.rmtree(self.path / DONE_DIR, ignore_errors=True)
