"""Improved precision and recall (Kynkäänniemi et al., 2019), density and coverage (Naeem et al., 2020)
on k-NN manifolds of features, and class coverage of generated samples.

Manifold of a set X: the union of balls B(x_i, r_i), r_i = distance from x_i to its k-th nearest
neighbour in X other than itself (k = 3 as in the paper).

    precision = fraction of generated samples inside the real manifold
    recall    = fraction of real samples inside the generated manifold
    density   = (1 / kM) Σ_j #{i : y_j ∈ B(x_i, r_i)}          (real balls, M generated samples)
    coverage  = fraction of real x_i whose ball holds at least one generated sample

Distances are computed block by block with matrix products (‖a‖² + ‖b‖² − 2 a·b, clamped at 0) on
the given device, so 50k × 50k sets need only a [chunk, N] block in memory at a time (three passes:
radii of each set, then the cross distances once); "inside" means squared distance ≤ r². 50k × 50k
128-d features take about 4 minutes on one CPU thread with ~1 GB peak memory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch


def _tensor(x: np.ndarray | torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    t = torch.as_tensor(x).to(device=device, dtype=dtype)
    return t.reshape(t.shape[0], -1)


def _sq_dists(a: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [len(a), len(b)] by one matrix product."""
    return ((a * a).sum(1, keepdim=True) + b_sq[None, :] - 2.0 * (a @ b.T)).clamp_min_(0.0)


def knn_radii_sq(x: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Squared distance from every row of x to its k-th nearest other row, [N]."""
    if not 1 <= k < len(x):
        raise ValueError(f"k = {k} needs more than k points, got {len(x)}")
    x_sq = (x * x).sum(1)
    out = torch.empty(len(x), dtype=x.dtype, device=x.device)
    for s in range(0, len(x), chunk):
        d = _sq_dists(x[s:s + chunk], x, x_sq)
        rows = torch.arange(len(d), device=x.device)
        d[rows, rows + s] = float("inf")  # exclude the point itself (not duplicates of it)
        out[s:s + chunk] = torch.topk(d, k, dim=1, largest=False).values[:, -1]
    return out


def _cross(fake: torch.Tensor, real: torch.Tensor, f_rad: torch.Tensor, r_rad: torch.Tensor, chunk: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass over the fake × real distances, block by block: per fake row, inside any real ball;
    per real ball, how many fake rows it holds; per real row, inside any fake ball."""
    r_sq = (real * real).sum(1)
    fake_in_real = torch.empty(len(fake), dtype=torch.bool, device=fake.device)
    real_counts = torch.zeros(len(real), dtype=torch.int64, device=fake.device)
    real_in_fake = torch.zeros(len(real), dtype=torch.bool, device=fake.device)
    for s in range(0, len(fake), chunk):
        d = _sq_dists(fake[s:s + chunk], real, r_sq)
        hit = d <= r_rad[None, :]
        fake_in_real[s:s + chunk] = hit.any(1)
        real_counts += hit.sum(0)
        real_in_fake |= (d <= f_rad[s:s + chunk, None]).any(0)
    return fake_in_real, real_counts, real_in_fake


@dataclass
class PRDC:
    precision: float
    recall: float
    density: float
    coverage: float
    k: int
    num_real: int
    num_fake: int

    def as_dict(self) -> dict:
        return asdict(self)


def prdc(real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor, k: int = 3, chunk: int = 1024,
         device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> PRDC:
    """Precision, recall, density and coverage of ``fake`` features against ``real`` ones (rows)."""
    device = torch.device(device)
    r, f = _tensor(real, device, dtype), _tensor(fake, device, dtype)
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"feature dimensions differ: real {r.shape[1]}, generated {f.shape[1]}")
    r_rad, f_rad = knn_radii_sq(r, k, chunk), knn_radii_sq(f, k, chunk)
    fake_in_real, real_ball_counts, real_in_fake = _cross(f, r, f_rad, r_rad, chunk)
    return PRDC(precision=float(fake_in_real.double().mean()), recall=float(real_in_fake.double().mean()),
                density=float(real_ball_counts.sum()) / (k * len(f)),
                coverage=float((real_ball_counts > 0).double().mean()), k=k, num_real=len(r), num_fake=len(f))


def label_histogram(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Fraction of rows per class, float64 [num_classes] (labels < 0, i.e. none, are ignored)."""
    labels = np.asarray(labels).astype(np.int64).ravel()
    labels = labels[labels >= 0]
    if len(labels) and labels.max() >= num_classes:
        raise ValueError(f"label {labels.max()} out of range for {num_classes} classes")
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    return counts / max(counts.sum(), 1.0)


def class_coverage(data_hist: np.ndarray, pred_hist: np.ndarray, eps: float = 1e-6) -> dict[str, float]:
    """How well the generated class distribution matches the data's.

    ``kl`` = KL(p_data ‖ p_gen) = Σ_c p_data(c) log(p_data(c) / p_gen(c)), the direction that punishes
    classes the generator drops (p_gen(c) → 0 where p_data(c) > 0). Both histograms get ``eps`` added
    to every class and are renormalised first, so a dropped class costs about p_data(c)·log(p_data(c)/eps)
    instead of infinity. ``tv`` = ½ Σ_c |p_data(c) − p_gen(c)| (no epsilon). ``classes_missing``: classes
    with data but no generated sample.
    """
    p = np.asarray(data_hist, dtype=np.float64)
    q = np.asarray(pred_hist, dtype=np.float64)
    if p.shape != q.shape or p.ndim != 1:
        raise ValueError(f"histograms differ in shape: {p.shape} vs {q.shape}")
    if p.sum() <= 0 or q.sum() <= 0:
        raise ValueError("class histograms must have positive mass")
    p, q = p / p.sum(), q / q.sum()
    tv = 0.5 * float(np.abs(p - q).sum())
    pe, qe = (p + eps) / (1 + eps * len(p)), (q + eps) / (1 + eps * len(q))
    kl = float(np.sum(pe * np.log(pe / qe)))
    return {"kl": kl, "tv": tv, "classes_missing": int(((p > 0) & (q == 0)).sum()), "eps": eps}
