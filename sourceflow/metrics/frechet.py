"""Fréchet distance between Gaussians fitted to features (FID and friends), streaming feature
statistics and ADM reference-batch npz files.

    FD = ‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1 Σ2)^½

pytorch-fid and clean-fid compute the last term with ``scipy.linalg.sqrtm(Σ1 Σ2, disp=False)``: a
Schur-based square root of a non-symmetric matrix, slow (minutes at 2048-d on two cores), complex
in floating point, and scipy 1.18 removed ``disp``. We use instead, exactly (not an approximation):

    tr (Σ1 Σ2)^½ = Σ_i √λ_i(M),   M = Aᵀ Σ2 A,   Σ1 = A Aᵀ

Why. For any square P, Q the products PQ and QP have the same eigenvalues. With P = A and
Q = Aᵀ Σ2, PQ = Σ1 Σ2 and QP = M. M is symmetric positive semi-definite, so its eigenvalues λ_i are
real and ≥ 0; the principal square root of Σ1 Σ2 has eigenvalues √λ_i, and its trace is their sum.
A is the Cholesky factor of Σ1 (or, when Σ1 is singular, its symmetric root Σ1^½ from ``eigh``), and
the eigenvalues of M come from ``eigvalsh``: backward-stable symmetric factorisations in float64, so
no complex parts and no "singular product" retries with an added ε. Singular covariances (fewer
samples than dimensions, constant features) are fine; round-off negatives are clipped to 0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sourceflow.io import atomic_path, reading


def _as_stats(mu: np.ndarray, sigma: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{name}: mu {mu.shape} and sigma {sigma.shape} do not describe one Gaussian")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{name}: statistics contain NaN or inf")
    return mu, sigma


def sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (eigenvalues clipped at 0)."""
    sigma = 0.5 * (sigma + sigma.T)
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr (Σ1 Σ2)^½ = Σ √λ(Aᵀ Σ2 A) for any factor Σ1 = A Aᵀ, exactly (see the module docstring).

    A is the Cholesky factor when Σ1 is numerically positive definite (5× cheaper than an ``eigh``)
    and the symmetric root Σ1^½ when it is not (singular: fewer samples than dimensions).
    """
    sigma1 = np.asarray(sigma1, dtype=np.float64)
    sigma1 = 0.5 * (sigma1 + sigma1.T)
    try:
        a = np.linalg.cholesky(sigma1)
    except np.linalg.LinAlgError:
        a = sqrt_psd(sigma1)
    m = a.T @ np.asarray(sigma2, dtype=np.float64) @ a
    lam = np.linalg.eigvalsh(0.5 * (m + m.T))
    return float(np.sqrt(np.clip(lam, 0.0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet (2-Wasserstein²) distance between N(μ1, Σ1) and N(μ2, Σ2), in float64."""
    mu1, sigma1 = _as_stats(mu1, sigma1, "first statistics")
    mu2, sigma2 = _as_stats(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]}")
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    return float(max(fd, 0.0))


class FeatureStats:
    """Streaming mean and covariance of feature rows, accumulated in float64.

    Sums of (x − s) and (x − s)(x − s)ᵀ with a shift s (the first chunk's mean) so the covariance does
    not lose digits to cancellation when |μ| ≫ σ. ``sigma`` uses the unbiased N − 1 normalisation,
    the same as ``numpy.cov(x, rowvar=False)`` and the FID reference implementations.
    """

    def __init__(self, dim: int, device: str | torch.device = "cpu"):
        self.dim = dim
        self.n = 0
        self.device = torch.device(device)
        self._shift: torch.Tensor | None = None
        self._s1 = torch.zeros(dim, dtype=torch.float64, device=self.device)
        self._s2 = torch.zeros(dim, dim, dtype=torch.float64, device=self.device)

    def update(self, x: np.ndarray | torch.Tensor) -> None:
        """Add a chunk of rows [B, dim]."""
        x = torch.as_tensor(x).to(device=self.device, dtype=torch.float64)
        x = x.reshape(x.shape[0], -1)
        if x.shape[1] != self.dim:
            raise ValueError(f"feature rows have {x.shape[1]} dimensions, expected {self.dim}")
        if len(x) == 0:
            return
        if not torch.isfinite(x).all():
            raise ValueError("features contain NaN or inf")
        if self._shift is None:
            self._shift = x.mean(0)
        xc = x - self._shift
        self._s1 += xc.sum(0)
        self._s2 += xc.T @ xc
        self.n += len(x)

    @property
    def mu(self) -> np.ndarray:
        if self.n == 0:
            raise ValueError("no features were added")
        return (self._shift + self._s1 / self.n).cpu().numpy()

    @property
    def sigma(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 feature rows, got {self.n}")
        m = self._s1 / self.n
        cov = (self._s2 - self.n * torch.outer(m, m)) / (self.n - 1)
        return (0.5 * (cov + cov.T)).cpu().numpy()


def save_reference_npz(path: str | Path, mu: np.ndarray, sigma: np.ndarray, features: np.ndarray | None = None,
                       label_hist: np.ndarray | None = None, **extra: np.ndarray) -> None:
    """Write reference statistics atomically: ``mu`` float64 [F], ``sigma`` float64 [F, F] (the ADM keys),
    optional ``features`` float32 [N, F] (for precision/recall), ``label_hist`` float64 [classes] and any
    further named arrays."""
    mu, sigma = _as_stats(mu, sigma, str(path))
    arrays: dict[str, np.ndarray] = {"mu": mu, "sigma": sigma}
    if features is not None:
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[1] != mu.shape[0]:
            raise ValueError(f"{path}: features {features.shape} do not match mu {mu.shape}")
        arrays["features"] = features
    if label_hist is not None:
        arrays["label_hist"] = np.asarray(label_hist, dtype=np.float64)
    arrays.update({k: np.asarray(v) for k, v in extra.items()})
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append ".npz"
        np.savez(f, **arrays)


def read_reference_npz(path: str | Path, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """The arrays of a reference npz (ours or an ADM reference batch), ``mu``/``sigma`` validated.

    ``keys``: read only these arrays (those present) besides ``mu`` and ``sigma``; npz members are read
    when accessed, so an ADM batch's ~2 GB ``arr_0`` or our [n, 2048] ``features`` stay on disk unless
    asked for. None reads every array.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics not found: {path}")
    fix = "delete it and rerun the reference_stats stage (or fetch the reference batch again)"
    # not a zip, a truncated member, object arrays that need pickle: one line naming the file
    with reading(path, "npz of plain arrays", fix), np.load(path, allow_pickle=False) as z:
        want = z.files if keys is None else [k for k in z.files if k in ("mu", "sigma", *keys)]
        arrays = {k: z[k] for k in want}
    for key in ("mu", "sigma"):
        if key not in arrays:
            raise KeyError(f"{path}: missing key '{key}' (a reference batch needs 'mu' and 'sigma'; "
                           f"found {sorted(arrays)})")
    arrays["mu"], arrays["sigma"] = _as_stats(arrays["mu"], arrays["sigma"], str(path))
    return arrays


def load_reference_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) in float64 from our reference npz or an ADM reference batch (VIRTUAL_*.npz)."""
    arrays = read_reference_npz(path)
    return arrays["mu"], arrays["sigma"]
