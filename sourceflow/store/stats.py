"""Per-position latent statistics (RAE-style): mean and variance over all rows of a store, for every
(c, h, w) separately, used to normalise spatial latents to roughly unit scale before flow matching.

Two normalisations (``NORMALIZATIONS``), recorded in the saved file so every reader applies the one the
stats were made for: ``mean_std`` = (x − mean) / sqrt(var + eps), and ``std`` = x / sqrt(var + eps),
RAE's choice for DINOv2-B (its statistics file has a variance and no mean; eps 1e-5). ``var`` is the
per-position variance around the mean in both cases; only whether the mean is subtracted differs.

Accumulated in float64 by merging per-batch means and sums of squared deviations (Chan et al.), which
stays exact where E[x²] − E[x]² would cancel; the variance is the biased one (divide by N, numpy's
default), saved as float32.

Which rows: all of them (flipped copies included; the default, e.g. digits), or a seeded, evenly spread
subset of the store's IMAGES (:func:`subset_rows`): unflipped rows only, each image once as it was
encoded (ADM centre crop, no flip). RAE normalises with per-element statistics over 50k ImageNet training
images (DESIGN.md); its released code does not include the script that made its statistics files, so
whether flips were part of them is not documented — we count each image once, unflipped, which is what
"50k images" says. For per-position statistics this matters little: a flipped row is (close to) the
image's latent mirrored along W, so including flips mostly symmetrises the statistics in W.

Bounded memory: rows are read row-granular in batches (:func:`iter_row_batches`), one Zarr call per run
of needed inner chunks (the store's chunking, a few MiB each; never a whole shard unless a shard is one
chunk), straight into a float64 batch buffer that the moments update consumes in place. The peak is
about ``batch_rows × C·H·W × 8`` bytes plus a few chunks, whatever the number of rows N.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sourceflow.io import read_safetensors, save_safetensors

NORMALIZATIONS = ("mean_std", "std")


@dataclass
class LatentStats:
    """Per-position ``mean`` and ``var`` [C, H, W] (float32) and how they normalise (``mode``):
    ``mean_std``: (x − mean) / sqrt(var + eps); ``std``: x / sqrt(var + eps) (RAE, DINOv2-B)."""

    mean: torch.Tensor
    var: torch.Tensor
    eps: float = 1e-6
    mode: str = "mean_std"

    def __post_init__(self) -> None:
        if self.mode not in NORMALIZATIONS:
            raise ValueError(f"latent stats: normalization must be one of {', '.join(NORMALIZATIONS)}, "
                             f"got {self.mode!r}")

    def _stats_like(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        if tuple(x.shape[-3:]) != tuple(self.mean.shape):
            raise ValueError(f"latents of shape {tuple(x.shape)} do not end in the stats shape {tuple(self.mean.shape)}")
        mean = self.mean.to(x.device, x.dtype) if self.mode == "mean_std" else None
        return mean, torch.sqrt(self.var.to(x.device, x.dtype) + self.eps)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats_like(x)
        return (x if mean is None else x - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`normalize`."""
        mean, std = self._stats_like(x)
        return x * std if mean is None else x * std + mean

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> None:
        """Write ``mean`` and ``var`` (float32) with ``eps``, the normalization and ``metadata`` to a
        safetensors file, atomically."""
        meta = dict(metadata or {})
        meta.update(eps=repr(float(self.eps)), normalize=self.mode)
        save_safetensors(path, {"mean": self.mean.float(), "var": self.var.float()}, meta)

    @classmethod
    def load(cls, path: str | Path) -> LatentStats:
        """Read a file written by :meth:`save`; one-line errors naming the file. A file without a
        ``normalize`` entry predates it and was made for ``mean_std``."""
        t, meta = read_safetensors(path, ("mean", "var"), "latent stats", "run the latent_stats stage")
        if t["mean"].shape != t["var"].shape:
            raise ValueError(f"{path}: mean {tuple(t['mean'].shape)} and var {tuple(t['var'].shape)} differ in shape")
        mode = meta.get("normalize", "mean_std")
        if mode not in NORMALIZATIONS:
            raise ValueError(f"{path}: unknown normalization {mode!r} (expected one of {', '.join(NORMALIZATIONS)})")
        return cls(t["mean"], t["var"], float(meta.get("eps", 1e-6)), mode)


class RunningMoments:
    """Streaming per-element mean and M2 (sum of squared deviations) in float64."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.n = 0
        self.mean = np.zeros(shape, np.float64)
        self.m2 = np.zeros(shape, np.float64)

    def update(self, batch: np.ndarray) -> None:
        """Merge ``batch`` [B, *shape] (any float dtype; not modified)."""
        self.update_consume(np.array(batch, dtype=np.float64))

    def update_consume(self, x: np.ndarray) -> None:
        """Merge the float64 batch ``x`` [B, *shape], overwriting it (no second batch-sized temporary)."""
        if x.dtype != np.float64:
            raise TypeError(f"update_consume needs a float64 batch, got {x.dtype}")
        nb = x.shape[0]
        if nb == 0:
            return
        mb = x.mean(axis=0)
        x -= mb
        np.square(x, out=x)
        m2b = x.sum(axis=0)
        n = self.n + nb
        delta = mb - self.mean
        self.mean += delta * (nb / n)
        self.m2 += m2b + delta**2 * (self.n * nb / n)
        self.n = n

    @property
    def var(self) -> np.ndarray:
        return self.m2 / max(self.n, 1)


def subset_rows(num_images: int, images: int | None, seed: int = 0) -> np.ndarray:
    """Sorted rows of an evenly spread, seeded subset of ``images`` of the ``num_images`` images (rows
    [0, num_images) of a latent store: the unflipped rows). [0, M) is cut into ``images`` equal strata
    and one row is drawn uniformly from each, so the subset follows the manifest order (class folders)
    evenly. ``None`` or ``images >= num_images``: every image."""
    if num_images < 1:
        raise ValueError(f"subset_rows: no images (num_images={num_images})")
    if images is None or images >= num_images:
        return np.arange(num_images, dtype=np.int64)
    if images < 1:
        raise ValueError(f"stats images must be positive, got {images}")
    k = np.arange(images + 1, dtype=np.int64)
    edges = k * num_images // images
    return np.random.default_rng(seed).integers(edges[:-1], edges[1:]).astype(np.int64)


def _runs(chunks: np.ndarray, max_chunks: int) -> Iterator[tuple[int, int]]:
    """Runs [c0, c1) of consecutive chunk ids from the sorted unique ``chunks``, at most ``max_chunks`` long."""
    start = prev = int(chunks[0])
    for c in map(int, chunks[1:]):
        if c != prev + 1 or c - start >= max_chunks:
            yield start, prev + 1
            start = c
        prev = c
    yield start, prev + 1


def read_rows_into(array, rows: np.ndarray, out: np.ndarray, max_read_rows: int) -> None:
    """``out[:] = array[rows]`` for sorted ``rows`` of a row-chunked Zarr ``array``, reading only the inner
    chunks that hold them: one basic-slice read per run of consecutive needed chunks (runs of at most
    ``max_read_rows`` rows, but at least one chunk), each run's rows cast into ``out`` (e.g. float64).

    Zarr's orthogonal (integer-array) selection would read the same chunks but holds ~25× the selected
    bytes in index temporaries; basic slices cost about 3× the slice, and only one run is live at a time."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        return
    if np.any(np.diff(rows) <= 0):
        raise ValueError("read_rows_into: rows must be sorted and distinct")
    n = int(array.shape[0])
    if rows[0] < 0 or rows[-1] >= n:
        raise ValueError(f"read_rows_into: rows out of range for {n} rows")
    cr = int(array.chunks[0])
    ids = rows // cr
    j = 0
    for c0, c1 in _runs(np.unique(ids), max(1, max_read_rows // cr)):
        a, b = c0 * cr, min(c1 * cr, n)
        k = j + int(np.searchsorted(rows[j:], b))
        block = array[a:b]
        out[j:k] = block[rows[j:k] - a]
        del block
        j = k


def iter_row_batches(store, name: str, batch_rows: int, rows: np.ndarray | None = None,
                     dtype: np.dtype | type = np.float64) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(rows, values)`` of array ``name`` of ``store`` for batches of ``batch_rows`` of the sorted
    ``rows`` (None: all rows in order), ``values`` a fresh ``dtype`` array the caller may overwrite. Reads
    are row-granular (see :func:`read_rows_into`), in runs of at most a quarter batch, so the peak is about
    one batch in ``dtype`` plus ~3/4 of a batch in the stored dtype, independent of the store's size."""
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be positive, got {batch_rows}")
    arr = store.array(name)
    n = int(arr.shape[0])
    total = n if rows is None else len(rows)
    for s in range(0, total, batch_rows):
        r = np.arange(s, min(s + batch_rows, n), dtype=np.int64) if rows is None else np.asarray(rows[s:s + batch_rows])
        out = np.empty((len(r), *arr.shape[1:]), dtype)
        read_rows_into(arr, r, out, max(1, batch_rows // 4))
        yield r, out
        del out  # the next batch is read while only the caller may still hold this one


def compute_latent_stats(store, batch_rows: int = 1024, progress: bool = False, eps: float = 1e-6,
                         mode: str = "mean_std", rows: np.ndarray | None = None) -> LatentStats:
    """Mean and variance of ``store``'s ``spatial`` array per (c, h, w), to normalise with ``mode`` (see
    :data:`NORMALIZATIONS`), over ``rows`` (sorted; e.g. :func:`subset_rows`, which must be unflipped
    rows: checked) or all rows (None; flipped ones included). Memory: see :func:`iter_row_batches`."""
    moments = RunningMoments(store.spatial_shape)
    if rows is not None:
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            raise ValueError("latent stats: no rows selected")
    total = store.num_rows if rows is None else len(rows)
    bar = None
    if progress:  # a bar updated by hand: tqdm wrapping the iterator would keep the last batch alive
        from sourceflow.progress import bar as progress_bar

        bar = progress_bar(total=-(-total // batch_rows), desc="latent stats", unit="batch")
    for r, x in iter_row_batches(store, "spatial", batch_rows, rows):
        if rows is not None:
            flip = np.empty(len(r), np.uint8)
            read_rows_into(store.array("flip"), r, flip, batch_rows)
            if flip.any():
                raise ValueError(f"{store.path}: the stats subset holds flipped rows (e.g. row {int(r[flip.argmax()])}); "
                                 "subsets are drawn from the unflipped rows [0, num_images)")
        moments.update_consume(x)
        del x
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return LatentStats(torch.from_numpy(moments.mean.astype(np.float32)),
                       torch.from_numpy(moments.var.astype(np.float32)), eps, mode)
