"""k-means++ seeding in torch, chunked over rows, reproducing scikit-learn's ``kmeans_plusplus``.

scikit-learn's ``GaussianMixture(init_params="k-means++")`` picks K seed rows with greedy k-means++
(Arthur & Vassilvitskii; at each step ``2 + int(log K)`` candidates drawn ∝ D², keep the one that
lowers the potential Σ D² most) and turns them into a one-hot responsibility matrix. The random
draws here come from the same ``numpy.random.RandomState`` calls in the same order (``choice`` for
the first row, ``uniform(size=trials)`` per further seed), and the distances use sklearn's formula
(−2 x·c + ‖c‖² + ‖x‖², clipped at 0) in float64, so for the same ``random_state`` the same rows come
out (up to ties within float64 rounding of the cumulative potential, which do not happen in practice).

Rows are read in chunks (:class:`Rows`), so only the [trials, N] float64 candidate distances and the
[N] closest distances are held, never [N, K]. Cost: K passes over the data of ``trials × N × D``
multiply-adds each — fine on a GPU at ImageNet scale (1.28M × 768, K = 8192), slow on a CPU there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

Reader = Callable[[int, int], "np.ndarray | torch.Tensor"]


class Rows:
    """A [N, D] matrix read by row ranges: an in-memory tensor/array, or ``read(start, stop)`` (e.g.
    ``lambda a, b: zarr_array[a:b]``) with ``num_rows`` given. Every pass over the data re-reads it."""

    def __init__(self, source: torch.Tensor | np.ndarray | Reader, num_rows: int | None = None):
        if isinstance(source, np.ndarray):
            source = torch.from_numpy(source)
        if isinstance(source, torch.Tensor):
            if source.dim() != 2:
                raise ValueError(f"data must be a [N, D] matrix, got shape {tuple(source.shape)}")
            self.tensor: torch.Tensor | None = source
            self._read: Reader | None = None
            self.num_rows = int(source.shape[0]) if num_rows is None else int(num_rows)
            self.num_features = int(source.shape[1])
        elif callable(source):
            if num_rows is None:
                raise ValueError("a reader callable needs num_rows")
            self.tensor, self._read, self.num_rows = None, source, int(num_rows)
            self.num_features = int(_as_tensor(source(0, 1)).reshape(1, -1).shape[1])
        else:
            raise TypeError(f"data must be a tensor, an array or a read(start, stop) callable, got {type(source)}")
        if self.num_rows < 1:
            raise ValueError("data has no rows")

    def read(self, start: int, stop: int) -> torch.Tensor:
        if self.tensor is not None:
            return self.tensor[start:stop]
        assert self._read is not None
        return _as_tensor(self._read(start, stop)).reshape(stop - start, -1)

    def take(self, idx: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Rows by index (a reader does one read per row)."""
        idx = torch.as_tensor(np.asarray(idx if not isinstance(idx, torch.Tensor) else idx.cpu()), dtype=torch.long)
        if self.tensor is not None:
            return self.tensor[idx.to(self.tensor.device)]
        return torch.cat([self.read(int(i), int(i) + 1) for i in idx])

    def chunks(self, chunk_rows: int, device: torch.device | str, dtype: torch.dtype,
               shift: torch.Tensor | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, chunk [n, D] on ``device`` in ``dtype``, minus ``shift`` when given)."""
        for start in range(0, self.num_rows, chunk_rows):
            stop = min(start + chunk_rows, self.num_rows)
            x = self.read(start, stop).to(device=device, dtype=dtype, non_blocking=True)
            yield start, (x - shift if shift is not None else x)


def _as_tensor(a: np.ndarray | torch.Tensor) -> torch.Tensor:
    return a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))


def as_rows(data: torch.Tensor | np.ndarray | Reader | Rows, num_rows: int | None = None) -> Rows:
    return data if isinstance(data, Rows) else Rows(data, num_rows)


def default_chunk_rows(width: int) -> int:
    """Rows per chunk so that one [rows, width] float32 block (width: K, or 2D+1 for EM) is about 256 MB
    (between 256 and 65,536 rows)."""
    return int(min(65536, max(256, 2**26 // max(1, width))))


def _sq_dist(c: torch.Tensor, c_norm: torch.Tensor, x: torch.Tensor, x_norm: torch.Tensor) -> torch.Tensor:
    """sklearn's ``_euclidean_distances(c, x, squared=True)``: −2 c·x + ‖c‖² + ‖x‖², clipped at 0."""
    d = -2.0 * (c @ x.T)
    d += c_norm[:, None]
    d += x_norm[None, :]
    return d.clamp_min_(0)


def kmeans_plusplus(data: torch.Tensor | np.ndarray | Reader | Rows, n_clusters: int, *,
                    random_state: int | np.random.RandomState = 0, n_local_trials: int | None = None,
                    chunk_rows: int | None = None, device: torch.device | str = "cpu",
                    num_rows: int | None = None, progress: bool = False) -> tuple[torch.Tensor, np.ndarray]:
    """Greedy k-means++ seeds: (centers [K, D] float64 on ``device``, row indices [K] int64).

    Same random stream and rules as ``sklearn.cluster.kmeans_plusplus(X, K, random_state=...)``.
    """
    rows = as_rows(data, num_rows)
    n = rows.num_rows
    if not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters={n_clusters} must be between 1 and the number of rows ({n})")
    rs = random_state if isinstance(random_state, np.random.RandomState) else np.random.RandomState(random_state)
    trials = n_local_trials if n_local_trials is not None else 2 + int(np.log(n_clusters))
    chunk_rows = chunk_rows or default_chunk_rows(max(trials, 2 * rows.num_features))  # float64 chunks
    f64 = torch.float64

    weight = np.ones(n)
    indices = np.full(n_clusters, -1, dtype=np.int64)
    indices[0] = rs.choice(n, p=weight / weight.sum())
    centers = torch.empty(n_clusters, rows.num_features, dtype=f64, device=device)
    centers[0] = rows.take([indices[0]])[0].to(device, f64)

    x_norm = torch.empty(n, dtype=f64, device=device)
    closest = torch.empty(n, dtype=f64, device=device)
    c0, c0_norm = centers[:1], (centers[:1] ** 2).sum(1)
    for s, x in rows.chunks(chunk_rows, device, f64):
        x_norm[s:s + len(x)] = (x * x).sum(1)
        closest[s:s + len(x)] = _sq_dist(c0, c0_norm, x, x_norm[s:s + len(x)])[0]
    pot = closest.sum()

    from sourceflow.progress import bar

    dist = torch.empty(trials, n, dtype=f64, device=device)
    for c in bar(range(1, n_clusters), desc="k-means++", unit="centre", disable=not progress):
        rand = torch.from_numpy(rs.uniform(size=trials)).to(device) * pot
        cand = torch.searchsorted(torch.cumsum(closest, 0), rand).clamp_max_(n - 1)
        cx = rows.take(cand).to(device, f64)
        cx_norm = (cx * cx).sum(1)
        for s, x in rows.chunks(chunk_rows, device, f64):
            e = s + len(x)
            torch.minimum(closest[None, s:e], _sq_dist(cx, cx_norm, x, x_norm[s:e]), out=dist[:, s:e])
        pots = dist.sum(1)
        best = int(torch.argmin(pots))
        pot = pots[best]
        closest = dist[best].clone()
        indices[c] = int(cand[best])
        centers[c] = cx[best]
    return centers, indices
