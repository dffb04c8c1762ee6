"""Diagonal-covariance GMM densities computed with matrix products (no [N, K, D] tensor).

log N(x | μ_k, diag v_k) = −½ [ Σ_d x_d²/v_kd − 2 Σ_d x_d μ_kd / v_kd + Σ_d μ_kd²/v_kd + Σ_d log(2π v_kd) ]
so the [N, K] matrix is (x²) @ (1/v)ᵀ − 2 x @ (μ/v)ᵀ + const_k, which is what makes K = 8192 feasible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from sourceflow.io import read_safetensors, save_safetensors


@dataclass
class DiagGMM:
    """Mixture weights [K], means [K, D] and per-dimension variances [K, D]."""

    weights: torch.Tensor
    means: torch.Tensor
    variances: torch.Tensor

    @property
    def num_modes(self) -> int:
        return int(self.weights.shape[0])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> DiagGMM:
        return DiagGMM(*(t.to(device=device, dtype=dtype or t.dtype) for t in (self.weights, self.means, self.variances)))

    def log_prob_components(self, x: torch.Tensor) -> torch.Tensor:
        """log w_k + log N(x | μ_k, v_k) for every row and mode: [N, K]."""
        return self.terms().log_prob_components(x)

    def terms(self, dtype: torch.dtype | None = None) -> DiagTerms:
        """The matrix-product form of :meth:`log_prob_components` (computed in float64 when the GMM is
        float64, then cast to ``dtype``), so a loop over chunks builds it once."""
        prec = 1.0 / self.variances
        bias = torch.log(self.weights.to(prec.dtype)) - 0.5 * (
            (self.means**2 * prec).sum(1) + torch.log(2 * math.pi * self.variances).sum(1))
        weight = torch.cat([-0.5 * prec.T, (self.means * prec).T, bias[None]], 0)
        return DiagTerms(weight.to(dtype or self.means.dtype).contiguous())

    def posterior(self, x: torch.Tensor) -> torch.Tensor:
        """Responsibilities p(k | x), [N, K]."""
        return torch.softmax(self.log_prob_components(x), dim=1)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(self.log_prob_components(x), dim=1)

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> None:
        """Write the mixture atomically (metadata as one sorted entry: equal mixtures, equal bytes)."""
        save_safetensors(path, {"weights": self.weights, "means": self.means, "variances": self.variances}, metadata)

    @classmethod
    def load(cls, path: str | Path) -> DiagGMM:
        t = load_gmm_tensors(path)
        means = t["means"].reshape(t["means"].shape[0], -1)
        var = t["variances"]
        var = var.reshape(var.shape[0], -1).expand_as(means) if var.dim() > 1 else var[:, None].expand_as(means)
        return cls(t["weights"], means, var.contiguous())


@dataclass
class DiagTerms:
    """log w_k + log N(x | μ_k, v_k) = [x², x, 1] @ weight[:, k], weight = [−½/v; μ/v; bias]ᵀ [2D+1, K]
    with bias_k = log w_k − ½ Σ_d μ_kd²/v_kd − ½ Σ_d log 2πv_kd: one matrix product per block of rows."""

    weight: torch.Tensor

    @staticmethod
    def augment(x: torch.Tensor) -> torch.Tensor:
        """[x², x, 1] for rows ``x`` [N, D] -> [N, 2D+1] (EM reuses it for Σ r·x², Σ r·x, Σ r)."""
        return torch.cat([x * x, x, x.new_ones(x.shape[0], 1)], 1)

    def log_prob_components(self, x: torch.Tensor) -> torch.Tensor:
        """[N, K] for rows ``x`` (cast to the terms' dtype)."""
        return self.augment(x.reshape(x.shape[0], -1).to(self.weight.dtype)) @ self.weight


def load_gmm_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """``weights``, ``means``, ``variances`` of a GMM file, with errors that name the file."""
    return read_safetensors(path, ("weights", "means", "variances"), "GMM file",
                            "run the fit_cls_gmm / build_spatial_gmm stage")[0]
