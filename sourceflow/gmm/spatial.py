"""MM-FM's spatial GMM: per CLS mode, the mean and variance of the normalized spatial latents.

As MM-FM builds it on RAE: every image belongs to the mode of its unflipped image's CLS token (the CLS
GMM's hard label, joined on the manifest ``index``). Only the unflipped rows of the store are read;
when the store has flips, each image's flipped copy is ``torch.flip`` of its *normalized* latent along
W (not the store's re-encoded flipped row, which differs from it) and goes to the same mode. One
streaming pass accumulates per mode, in float64, the row count, Σx [D] and either Σ‖x‖² (``spherical``:
MM-FM's ONE scalar variance per mode, biased, averaged over all D dims: v_k = Σ‖x‖²/(n_k·D) −
mean_d μ_kd²) or Σx² [D] (``diag``: v_kd = Σx_d²/n_k − μ_kd²). An empty mode gets the global mean (over
all rows, flipped copies included) and the mean variance of the non-empty modes (unweighted; per dim
for ``diag``), not the global variance, which would add the spread between modes. Weights are the CLS
GMM's. The file has ``weights`` [K], ``means`` [K, C, H, W] and ``variances`` [K] or [K, C, H, W]
(what :meth:`DiagGMM.load` and :class:`GMMSource` read).

Memory: each [K, D] float64 accumulator is K·D·8 bytes (12.9 GB at K=8192, D=768·16·16). Above the
memory budget they live in ``np.memmap`` files in a temporary folder beside the output (deleted
afterwards). Each batch first sums its rows per distinct mode in RAM and then does one
read-modify-write of a D-row per distinct mode (in sorted mode order), so the cost is one row update
per (batch, mode present in it): fast while the files fit in the page cache, bounded by disk bandwidth
otherwise — still one pass over the store, which at ImageNet scale (2.56M rows × 786 KB) is the larger
cost. The output is written block by block (a streaming safetensors writer), so the [K, D] means are
never held whole in RAM either. (The alternative — several passes, each over a block of modes held in
RAM — would re-read the whole store once per block.)
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sourceflow.io import atomic_path

SAFETENSORS_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float64): "F64", np.dtype(np.int64): "I64"}


def label_lookup(index: np.ndarray, labels: np.ndarray, k: int, source: str = "labels") -> np.ndarray:
    """A dense array mapping manifest index -> CLS mode (−1 where the labels file has no entry)."""
    index = np.asarray(index, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    if index.shape != labels.shape or index.ndim != 1:
        raise ValueError(f"{source}: index {index.shape} and labels {labels.shape} must be equal 1-D arrays")
    if len(index) == 0:
        raise ValueError(f"{source}: no labels")
    if index.min() < 0:
        raise ValueError(f"{source}: negative manifest index {int(index.min())}")
    if len(np.unique(index)) != len(index):
        raise ValueError(f"{source}: the index column has duplicates")
    if labels.min() < 0 or labels.max() >= k:
        raise ValueError(f"{source}: labels outside [0, {k}) (min {int(labels.min())}, max {int(labels.max())})")
    table = np.full(int(index.max()) + 1, -1, dtype=np.int64)
    table[index] = labels
    return table


class ModeSums:
    """Float64 per-mode sums: counts [K], Σx [K, D], and Σ‖x‖² [K] (spherical) or Σx² [K, D] (diag),
    in RAM (torch) or in memory-mapped files (see the module docstring)."""

    def __init__(self, k: int, d: int, variance: str, memory_budget_bytes: int, tmp_dir: Path | None = None):
        if variance not in ("spherical", "diag"):
            raise ValueError(f"variance must be 'spherical' or 'diag', got {variance!r}")
        self.k, self.d, self.variance = k, d, variance
        self.counts = np.zeros(k, dtype=np.int64)
        self.sq_scalar = np.zeros(k, dtype=np.float64)           # Σ‖x‖² per mode (spherical)
        self.total = np.zeros(d, dtype=np.float64)               # global Σx per dim
        self._fill: tuple[np.ndarray, np.ndarray | float] | None = None
        n_big = 1 if variance == "spherical" else 2
        self.accumulator_bytes = n_big * k * d * 8
        self.on_disk = self.accumulator_bytes > memory_budget_bytes
        self._tmp: Path | None = None
        if self.on_disk:
            parent = Path(tmp_dir) if tmp_dir is not None else Path(tempfile.gettempdir())
            parent.mkdir(parents=True, exist_ok=True)
            self._tmp = Path(tempfile.mkdtemp(prefix=".spatial_gmm_acc.", dir=parent))
            self.sx = np.memmap(self._tmp / "sum.f64", dtype=np.float64, mode="w+", shape=(k, d))
            self.sxx = np.memmap(self._tmp / "sumsq.f64", dtype=np.float64, mode="w+", shape=(k, d)) \
                if variance == "diag" else None
        else:
            self.sx = torch.zeros(k, d, dtype=torch.float64)
            self.sxx = torch.zeros(k, d, dtype=torch.float64) if variance == "diag" else None

    def close(self) -> None:
        """Drop the memory-mapped files (if any)."""
        if self._tmp is not None:
            self.sx = self.sxx = None
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def add(self, modes: np.ndarray, x: torch.Tensor) -> None:
        """Rows ``x`` [B, D] (float64) of modes ``modes`` [B]."""
        modes_t = torch.from_numpy(np.ascontiguousarray(modes, dtype=np.int64))
        xx = x * x
        self.counts += np.bincount(modes, minlength=self.k)
        self.total += x.sum(0).numpy()
        self._fill = None
        if self.variance == "spherical":
            np.add.at(self.sq_scalar, modes, xx.sum(1).numpy())
        if not self.on_disk:
            self.sx.index_add_(0, modes_t, x)
            if self.sxx is not None:
                self.sxx.index_add_(0, modes_t, xx)
            return
        uniq, inv = torch.unique(modes_t, sorted=True, return_inverse=True)
        u = uniq.numpy()
        part = torch.zeros(len(u), self.d, dtype=torch.float64).index_add_(0, inv, x)
        self.sx[u] += part.numpy()
        if self.sxx is not None:
            part.zero_().index_add_(0, inv, xx)
            self.sxx[u] += part.numpy()

    # -- results -----------------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return int(self.counts.sum())

    def global_mean(self) -> np.ndarray:
        return self.total / self.num_rows

    def _rows(self, arr, a: int, b: int) -> np.ndarray:
        return np.asarray(arr[a:b]) if isinstance(arr, np.memmap) else arr[a:b].numpy()

    def _block(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(empty [b−a] bool, means [b−a, D], biased variances [b−a] or [b−a, D]) of modes [a, b);
        the rows of empty modes are meaningless."""
        n = self.counts[a:b].astype(np.float64)
        empty = n == 0
        nn = np.where(empty, 1.0, n)[:, None]
        mu = self._rows(self.sx, a, b) / nn
        if self.variance == "spherical":
            var = np.maximum(self.sq_scalar[a:b] / (nn[:, 0] * self.d) - (mu * mu).mean(1), 0.0)
        else:
            var = np.maximum(self._rows(self.sxx, a, b) / nn - mu * mu, 0.0)
        return empty, mu, var

    def empty_mode_fill(self, block_modes: int = 256) -> tuple[np.ndarray, np.ndarray | float]:
        """What an empty mode gets: (the global mean [D], the mean variance of the non-empty modes —
        a scalar for spherical, [D] for diag). One pass over the accumulators (cached)."""
        if self._fill is None:
            if self.num_rows == 0:
                raise ValueError("spatial GMM: no rows were accumulated")
            total = np.zeros(() if self.variance == "spherical" else self.d, dtype=np.float64)
            for a in range(0, self.k, block_modes):
                empty, _, var = self._block(a, min(a + block_modes, self.k))
                total = total + var[~empty].sum(0)
            fill = total / int((self.counts > 0).sum())
            self._fill = (self.global_mean(), float(fill) if self.variance == "spherical" else fill)
        return self._fill

    def blocks(self, block_modes: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(first mode, means [b, D], variances [b] or [b, D]) per block of modes, float64."""
        g_mu, fill = self.empty_mode_fill(block_modes)
        for a in range(0, self.k, block_modes):
            empty, mu, var = self._block(a, min(a + block_modes, self.k))
            mu[empty] = g_mu
            var[empty] = fill
            yield a, mu, var


def accumulate(batches: Iterator[tuple[np.ndarray, np.ndarray]], normalize: Callable[[torch.Tensor], torch.Tensor],
               label_of: np.ndarray, k: int, d: int, *, flips: bool, variance: str, memory_budget_bytes: int,
               tmp_dir: Path | None = None, total_rows: int | None = None, progress: bool = False) -> ModeSums:
    """One pass over ``(index [B], spatial [B, C, H, W])`` batches of *unflipped* images: normalize, look
    up each image's mode, accumulate; with ``flips`` also ``torch.flip`` of each normalized latent along
    W, in the same mode (MM-FM's flipped copies; see the module docstring)."""
    from sourceflow.progress import bar as progress_bar

    sums = ModeSums(k, d, variance, memory_budget_bytes, tmp_dir)
    try:
        with progress_bar(total=total_rows, desc="spatial GMM", unit="row", disable=not progress) as bar:
            for index, spatial in batches:
                if index.max(initial=-1) >= len(label_of) or (label_of[index] < 0).any():
                    bad = next(int(i) for i in index if i >= len(label_of) or label_of[i] < 0)
                    raise KeyError(f"manifest index {bad} of the store has no CLS label")
                z = normalize(torch.from_numpy(np.ascontiguousarray(spatial)).float()).to(torch.float64)
                if z.ndim != 4 or z[0].numel() != d:
                    raise ValueError(f"spatial rows of shape {tuple(z.shape[1:])} ({z[0].numel()} values), "
                                     f"expected [C, H, W] with {d} values")
                modes = label_of[index]
                if flips:
                    z = torch.cat([z, torch.flip(z, dims=[-1])])
                    modes = np.concatenate([modes, modes])
                sums.add(modes, z.reshape(len(z), d))
                bar.update(len(z))
    except BaseException:
        sums.close()
        raise
    return sums


def write_safetensors_blocks(path: str | Path, tensors: list[tuple[str, np.dtype, tuple[int, ...],
                                                                    Callable[[], Iterator[np.ndarray]]]],
                             metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file tensor by tensor from blocks (each ``blocks()`` yields C-order pieces
    whose concatenation is the tensor), atomically, without holding any tensor whole."""
    header: dict = {}
    offset = 0
    for name, dtype, shape, _ in tensors:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for name, dtype, _shape, blocks in tensors:
            written = 0
            for blk in blocks():
                buf = np.ascontiguousarray(blk, dtype=dtype).tobytes()
                f.write(buf)
                written += len(buf)
            want = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
            if written != want:
                raise RuntimeError(f"{path}: tensor {name} got {written} bytes, expected {want}")


def write_spatial_gmm(path: str | Path, sums: ModeSums, weights: np.ndarray, spatial_shape: tuple[int, ...],
                      dtype: np.dtype = np.float32, block_modes: int = 256,
                      metadata: dict[str, str] | None = None) -> None:
    """``weights`` [K] (float64), ``means`` [K, *spatial_shape], ``variances`` [K] or [K, *spatial_shape]."""
    k = sums.k
    var_shape = (k,) if sums.variance == "spherical" else (k, *spatial_shape)
    write_safetensors_blocks(path, [
        ("weights", np.dtype(np.float64), (k,), lambda: iter([np.asarray(weights, dtype=np.float64)])),
        ("means", np.dtype(dtype), (k, *spatial_shape), lambda: (mu for _, mu, _ in sums.blocks(block_modes))),
        ("variances", np.dtype(dtype), var_shape, lambda: (v for _, _, v in sums.blocks(block_modes))),
    ], metadata)


@dataclass
class SpatialReport:
    """What the stage writes to the JSON report."""

    counts: list[int]
    empty_modes: int
    singleton_modes: int
    num_rows: int
    on_disk: bool
    accumulator_bytes: int

    @classmethod
    def of(cls, sums: ModeSums) -> SpatialReport:
        return cls(sums.counts.tolist(), int((sums.counts == 0).sum()), int((sums.counts == 1).sum()),
                   sums.num_rows, sums.on_disk, sums.accumulator_bytes)
