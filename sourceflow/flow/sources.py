"""Source distributions p0: where the flow starts.

Every source is a reparameterisation ``x0 = transform(z, u, cond, mode)`` of standard normals ``z``
(shaped like one sample) and uniforms ``u`` [n, k]. The same map serves fresh draws (from a torch
generator) and draws regenerated from per-sample integer seeds (LOOM-CFM), and for learned sources it
is differentiable, so gradients reach the source network through x0 (CSFM).
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sourceflow.data import toy
from sourceflow.flow.rng import normal_on, seeded_normal, seeded_uniform
from sourceflow.gmm.diag import load_gmm_tensors


@dataclass
class SourceDraw:
    """x0 and what produced it: the mode (GMM sources) and, for learned sources, mean and log-variance."""

    x0: torch.Tensor
    mode: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    logvar: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def select(self, index: torch.Tensor | slice) -> SourceDraw:
        """Rows ``index`` of every field (a permutation, a mask or a slice)."""

        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            return t[index.to(t.device)] if isinstance(index, torch.Tensor) else t[index]

        return SourceDraw(cut(self.x0), cut(self.mode), cut(self.mean), cut(self.logvar),
                          {k: cut(v) for k, v in self.extras.items()})


class Source(nn.Module, abc.ABC):
    """Base class: subclasses set ``event_shape`` and ``num_uniforms`` and implement ``transform``."""

    event_shape: tuple[int, ...]
    num_uniforms: int = 0
    num_modes: int = 0  # > 0 for sources that are mixtures a model can be conditioned on

    @abc.abstractmethod
    def transform(self, z: torch.Tensor, u: torch.Tensor, cond: torch.Tensor | None = None,
                  mode: torch.Tensor | None = None) -> SourceDraw:
        """Map noise (and the condition / mode) to x0."""

    def _device(self) -> torch.device:
        for t in [*self.parameters(), *self.buffers()]:
            return t.device
        return torch.device("cpu")

    def sample(self, n: int, generator: torch.Generator | None = None, cond: torch.Tensor | None = None,
               mode: torch.Tensor | None = None, device: torch.device | str | None = None) -> SourceDraw:
        """Fresh draw of ``n`` samples on ``device`` (the data's / model's; a source without tensors of its
        own, like N(0, I), has no device): the normals from ``generator`` on CPU, drawn on the device itself
        on an accelerator (:func:`normal_on`); the few uniforms always on CPU."""
        dev = device if device is not None else self._device()
        z = normal_on((n, *self.event_shape), generator, dev)
        u = torch.rand(n, max(self.num_uniforms, 1), generator=generator, dtype=torch.float64)
        return self.transform(z, u.to(dev), cond, mode)

    def from_seeds(self, seeds: torch.Tensor, cond: torch.Tensor | None = None,
                   mode: torch.Tensor | None = None, device: torch.device | str | None = None) -> SourceDraw:
        """Deterministic draw: row i is a pure function of ``seeds[i]``."""
        dev = device if device is not None else self._device()
        seeds = seeds.to(dev)
        z = seeded_normal(seeds, self.event_shape)
        u = seeded_uniform(seeds, max(self.num_uniforms, 1))
        return self.transform(z, u, cond, mode)


class GaussianSource(Source):
    """N(0, σ²I)."""

    def __init__(self, event_shape: tuple[int, ...], std: float = 1.0):
        super().__init__()
        self.event_shape = tuple(event_shape)
        self.std = std

    def transform(self, z, u, cond=None, mode=None):
        return SourceDraw(self.std * z)


class ToySource(Source):
    """A 2-D toy distribution as the source (e.g. the C2OT harness starts from 8 Gaussians)."""

    def __init__(self, name: str, **params: float):
        super().__init__()
        self.name = name
        self.params = params
        self.event_shape = (2,)
        self.num_uniforms = toy.num_uniforms(name)

    def transform(self, z, u, cond=None, mode=None):
        d = toy.transform(self.name, z, u, **self.params)
        return SourceDraw(d.x.to(z.device), extras={"label": d.label})


class GMMSource(Source):
    """Mixture source: mode k ~ p(k), x0 ~ N(μ_k, diag σ_k²) (MM-FM uses one σ_k per mode).

    ``means`` [K, *event_shape]; ``variances`` either [K] (spherical) or [K, *event_shape] (diagonal).
    Given ``mode`` the draw is mode-conditional; otherwise the mode is drawn by weight from ``u``.
    Spherical standard deviations stay [K, 1, …] (broadcast), and the buffers are not part of the
    state dict: the mixture is an input file, not training state (at ImageNet scale the means alone
    are 8192 × 768×16×16 floats, 6.4 GB, which checkpoints and the EMA copy must not duplicate).
    """

    def __init__(self, weights: torch.Tensor, means: torch.Tensor, variances: torch.Tensor,
                 variance: str = "diag", means_on: str = "device"):
        super().__init__()
        if variance not in ("diag", "spherical"):
            raise ValueError(f"variance must be 'diag' or 'spherical', got {variance!r}")
        if means_on not in ("device", "host"):
            raise ValueError(f"means_on must be 'device' or 'host', got {means_on!r}")
        weights = weights.to(torch.float64)
        means = means.float()
        variances = variances.float()
        if variances.dim() > 1 and variance == "spherical":
            variances = variances.reshape(variances.shape[0], -1).mean(1)
        if variances.dim() == 1:
            variances = variances.reshape(-1, *([1] * (means.dim() - 1)))
        if not (weights.shape[0] == means.shape[0] == variances.shape[0]):
            raise ValueError(f"GMM shapes disagree: weights {tuple(weights.shape)}, means {tuple(means.shape)}")
        self.event_shape = tuple(means.shape[1:])
        self.num_uniforms = 1
        self.num_modes = int(weights.shape[0])
        self.register_buffer("weights", weights / weights.sum(), persistent=False)
        stds = variances.clamp_min(0).sqrt()
        self.means_on = means_on
        if means_on == "host":
            # not buffers: ``.to(device)`` leaves them in host memory (pinned on a GPU machine) and every draw
            # copies only its batch's modes, so K x D means are not replicated on every GPU of a node
            pin = torch.cuda.is_available()
            self.means = means.pin_memory() if pin else means
            self.stds = stds.pin_memory() if pin and stds[0].numel() > 1 else stds
        else:
            self.register_buffer("means", means, persistent=False)
            self.register_buffer("stds", stds, persistent=False)

    @classmethod
    def load(cls, path: str | Path, variance: str = "diag", means_on: str = "device") -> GMMSource:
        """Load ``weights``, ``means``, ``variances`` from a safetensors file."""
        t = load_gmm_tensors(path)
        return cls(t["weights"], t["means"], t["variances"], variance, means_on)

    def sample_modes(self, u: torch.Tensor) -> torch.Tensor:
        """Inverse-CDF mode draw from uniforms [n]."""
        cdf = torch.cumsum(self.weights, 0)
        return torch.clamp(torch.searchsorted(cdf, u.to(cdf.dtype).contiguous()), max=self.num_modes - 1)

    def transform(self, z, u, cond=None, mode=None):
        if mode is None:
            mode = self.sample_modes(u[:, 0])
        mode = mode.long()
        at = mode.to(self.means.device)
        mean = self.means[at].to(z.device, non_blocking=True)
        std = self.stds[at.to(self.stds.device)].to(z.device, non_blocking=True)
        return SourceDraw(mean + std * z, mode=mode.to(z.device))


class LearnedSource(Source):
    """CSFM's condition-dependent source N(μφ(c), σφ(c)²) with x0 = μ + σ·ε (no stop-gradient).

    ``net`` maps the condition to a tensor of [n, 2·D] (mean and log-variance) when ``learn_var``,
    else [n, D] (σ = 1). Gradients of the flow-matching loss reach ``net`` through x_t and u.
    """

    def __init__(self, net: nn.Module, event_shape: tuple[int, ...], learn_var: bool = True):
        super().__init__()
        self.net = net
        self.event_shape = tuple(event_shape)
        self.learn_var = learn_var

    LOGVAR_CLAMP = (-10.0, 10.0)  # CSFM clamps log σ² to [-10, 10]

    def stats(self, cond: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """μφ(c) and log σφ(c)² (clamped as CSFM; zeros when σ is fixed at 1)."""
        if cond is None:
            raise ValueError("a learned (CSFM) source needs a condition")
        out = self.net(cond)
        d = math.prod(self.event_shape)
        mean = out[:, :d].reshape(-1, *self.event_shape)
        if not self.learn_var:
            return mean, torch.zeros_like(mean)
        logvar = out[:, d:2 * d].reshape(-1, *self.event_shape).clamp(*self.LOGVAR_CLAMP)
        return mean, logvar

    def transform(self, z, u, cond=None, mode=None):
        mean, logvar = self.stats(cond)
        return SourceDraw(mean + torch.exp(0.5 * logvar) * z, mean=mean, logvar=logvar)


def var_reg(logvar: torch.Tensor) -> torch.Tensor:
    """CSFM VarReg: the variance part of KL(N(μ,σ²) ‖ N(μ,1)), ½(σ² − 1 − log σ²); 0 iff σ = 1."""
    return 0.5 * (torch.exp(logvar) - 1.0 - logvar).mean()


def alignment_loss(mean: torch.Tensor, x1: torch.Tensor, channel_dim: int = 1, eps: float = 1e-12) -> torch.Tensor:
    """CSFM alignment: ``mse_loss(normalize(μ), normalize(x1))``, a MEAN over all elements, each token
    normalised over its channels (the paper's intent; CSFM's code normalises along the width axis by
    accident, a mean either way). For [B, C, H, W] latents the tokens are the H·W positions, so the term
    is (1/C)·mean over tokens of ‖μ̂ − x̂‖² ∈ [0, 4/C]; for flat [B, D] points the vector is one token.
    ``eps`` as ``F.normalize``'s.
    """
    from torch.nn import functional as F

    mu = F.normalize(mean, dim=channel_dim, eps=eps)
    x = F.normalize(x1, dim=channel_dim, eps=eps)
    return F.mse_loss(mu, x)
