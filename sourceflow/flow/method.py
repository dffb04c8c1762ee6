"""A method is data, not a fork of the training loop: a source, a coupling, what the model is
conditioned on, a time sampler and (CSFM) regularisers. ``Objective`` ties a method to a velocity
model in one ``nn.Module`` so that DDP sees every trainable parameter (the model and, for CSFM, the
source network) through a single forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from sourceflow.flow.couplings import Batch, Coupling, Independent, ModeCoupling, Pair
from sourceflow.flow.path import LinearPath
from sourceflow.flow.sources import LearnedSource, Source, alignment_loss, var_reg
from sourceflow.flow.time import TimeSampler

COND_FROM = ("none", "data", "mode")


class FocalModeWeights(nn.Module):
    """MM-FM's focal per-mode loss weight: modes the model fits badly weigh more.

    As MM-FM's code does it (DESIGN.md): an EMA L_k (decay ``ema``) of the per-sample flow-matching loss of
    every mode (a mode's first observation initialises it; each batch folds in its per-mode mean); for the
    first ``warmup`` micro-batches every weight is 1; afterwards w_k = (L_k / L̄)^γ with L̄ the mean of L
    over the modes seen so far and w_k = 1 for modes never seen, normalised so the weights of ALL K modes
    average 1, then clipped to ``clip``. A sample of mode k weighs w_k; there is no per-batch
    renormalisation (the loss scale moves with the batch's modes). Published values: γ = 2, EMA 0.9995,
    clip [0.3, 3], warm-up 2500 micro-batches. The EMA and the micro-batch count are training state
    (buffers), so a resume is exact; ``reduce`` (set by the training loop) sums the per-mode statistics
    over processes, so every process keeps the same EMA.
    """

    def __init__(self, num_modes: int, gamma: float = 2.0, ema: float = 0.9995, clip: tuple[float, float] = (0.3, 3.0),
                 warmup: int = 2500):
        super().__init__()
        self.gamma, self.ema, self.clip = float(gamma), float(ema), (float(clip[0]), float(clip[1]))
        self.warmup = int(warmup)
        self.register_buffer("loss_ema", torch.zeros(num_modes, dtype=torch.float64))
        self.register_buffer("seen", torch.zeros(num_modes, dtype=torch.bool))
        self.register_buffer("micro_batches", torch.zeros((), dtype=torch.int64))
        self.reduce = None

    def mode_weights(self) -> torch.Tensor:
        """w_k for all K modes (float64): 1 during the warm-up, else normalised to mean 1, then clipped."""
        k = self.loss_ema.shape[0]
        if int(self.micro_batches) < self.warmup or not bool(self.seen.any()):
            return torch.ones(k, dtype=torch.float64, device=self.loss_ema.device)
        ref = self.loss_ema[self.seen].mean().clamp_min(1e-12)
        raw = torch.where(self.seen, (self.loss_ema / ref).pow(self.gamma), torch.ones_like(self.loss_ema))
        return (raw / raw.mean()).clamp(*self.clip)

    def weights(self, mode: torch.Tensor) -> torch.Tensor:
        """Per-sample weights w_{mode_i} (float32)."""
        return self.mode_weights()[mode.to(self.loss_ema.device).long()].float().to(mode.device)

    @torch.no_grad()
    def update(self, mode: torch.Tensor, per_sample: torch.Tensor) -> None:
        """Fold one micro-batch's per-mode mean losses into the EMA and count the micro-batch. A micro-batch
        with a non-finite loss is left out (its step is skipped or stops the run; the EMA must stay finite)."""
        if not bool(torch.isfinite(per_sample.detach()).all()):
            return
        k = self.loss_ema.shape[0]
        m = mode.to(self.loss_ema.device).long()
        sums = torch.zeros(k, dtype=torch.float64, device=m.device).index_add_(0, m, per_sample.detach().double().to(m.device))
        counts = torch.zeros(k, dtype=torch.float64, device=m.device).index_add_(0, m, torch.ones_like(sums[m]))
        if self.reduce is not None:
            sums, counts = self.reduce(sums), self.reduce(counts)
        hit = counts > 0
        mean = sums[hit] / counts[hit]
        old = self.loss_ema[hit]
        self.loss_ema[hit] = torch.where(self.seen[hit], self.ema * old + (1 - self.ema) * mean, mean)
        self.seen |= hit
        self.micro_batches += 1


@dataclass
class LossOutput:
    loss: torch.Tensor
    terms: dict[str, float] = field(default_factory=dict)


class Method(nn.Module):
    """Source + coupling + conditioning + time (+ CSFM regularisers).

    ``cond_from``: ``none`` (unconditional), ``data`` (the batch's condition: class or continuous)
    or ``mode`` (the GMM mode x0 was drawn from, MM-FM). ``p_uncond`` drops discrete data
    conditions to the null id for classifier-free guidance.
    """

    def __init__(self, source: Source, coupling: Coupling | None = None, cond_from: str = "none",
                 time: TimeSampler | None = None, p_uncond: float = 0.0, null_id: int | None = None,
                 var_reg_weight: float = 0.0, align_weight: float = 0.0, focal: FocalModeWeights | None = None):
        super().__init__()
        if cond_from not in COND_FROM:
            raise ValueError(f"cond_from must be one of {COND_FROM}, got {cond_from!r}")
        self.source = source
        self.coupling = coupling or Independent()
        self.cond_from = cond_from
        self.time = time or TimeSampler()
        self.path = LinearPath()
        self.p_uncond = p_uncond
        self.null_id = null_id
        self.var_reg_weight = var_reg_weight
        self.align_weight = align_weight
        self.focal = focal
        if focal is not None and source.num_modes == 0:
            raise ValueError("the focal per-mode weight needs a mixture source (mmfm)")
        if self.coupling.requires_fixed_source and isinstance(source, LearnedSource):
            raise ValueError(f"{type(self.coupling).__name__} re-orders x0, so it cannot use a condition-dependent source")
        if cond_from == "mode" and source.num_modes == 0:
            raise ValueError("mode conditioning needs a mixture source")
        if p_uncond > 0 and null_id is None:
            raise ValueError("p_uncond > 0 needs the null id of a discrete condition")

    @property
    def global_pairing(self) -> bool:
        """Whether the pairing couples samples across the batch (then it runs on the gathered batch)."""
        return not isinstance(self.coupling, Independent | ModeCoupling)

    def pair(self, batch: Batch, generator: torch.Generator | None) -> Pair:
        """Draw x0 and couple it with x1; ``pair.cond`` becomes the model's condition."""
        p = self.coupling.pair(batch, self.source, generator)
        if self.cond_from == "none":
            p.cond = None
        elif self.cond_from == "mode":
            p.cond = p.mode
        return p

    def drop_condition(self, cond: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor | None:
        if cond is None or self.p_uncond <= 0 or self.cond_from != "data":
            return cond
        drop = torch.rand(cond.shape[0], generator=generator) < self.p_uncond
        return torch.where(drop.to(cond.device), torch.full_like(cond, self.null_id), cond)

    def loss(self, model: nn.Module, pair: Pair, generator: torch.Generator | None) -> LossOutput:
        """Flow-matching regression on the linear path (+ VarReg and alignment for learned sources)."""
        t = self.time.sample(pair.x0.shape[0], generator, device=pair.x0.device)
        ps = self.path.sample(pair.x0, pair.x1, t)
        cond = self.drop_condition(pair.cond, generator)
        v = model(ps.xt, t, cond)
        per_sample = (v.float() - ps.ut.float()).pow(2).reshape(v.shape[0], -1).mean(1)
        fm = per_sample.mean()
        terms = {"fm": float(fm.detach())}
        if self.focal is not None and pair.mode is not None:
            total = (self.focal.weights(pair.mode) * per_sample).mean()
            self.focal.update(pair.mode, per_sample)
            terms["fm_focal"] = float(total.detach())
        else:
            total = fm
        if pair.draw.logvar is not None and self.var_reg_weight > 0:
            vr = var_reg(pair.draw.logvar)
            total = total + self.var_reg_weight * vr
            terms["var_reg"] = float(vr.detach())
        if pair.draw.mean is not None and self.align_weight > 0:
            al = alignment_loss(pair.draw.mean, pair.x1)
            total = total + self.align_weight * al
            terms["align"] = float(al.detach())
        terms["coupling_cost"] = float(pair.cost().detach().mean())
        return LossOutput(total, terms)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything that must survive a restart: source parameters/buffers and coupling state."""
        out = {f"source.{k}": v for k, v in self.source.state_dict().items()}
        out.update({f"coupling.{k}": v for k, v in self.coupling.state_dict().items()})
        if self.focal is not None:
            out.update({f"focal.{k}": v for k, v in self.focal.state_dict().items()})
        return out

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        src = {k[len("source."):]: v for k, v in state.items() if k.startswith("source.")}
        cpl = {k[len("coupling."):]: v for k, v in state.items() if k.startswith("coupling.")}
        self.source.load_state_dict(src)
        self.coupling.load_state_dict(cpl)
        if self.focal is not None:
            self.focal.load_state_dict({k[len("focal."):]: v for k, v in state.items() if k.startswith("focal.")})


class Objective(nn.Module):
    """Velocity model + method as one module whose forward returns the training loss.

    ``forward(batch, local)``: ``batch`` is the batch the coupling sees (the gathered global batch
    when the method pairs across samples); ``local`` selects this process's rows for the loss.
    """

    def __init__(self, model: nn.Module, method: Method):
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, batch: Batch | None, local: slice, pair_generator: torch.Generator | None,
                loss_generator: torch.Generator, pair: Pair | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of ``pair`` (already coupled, e.g. a slice of a pair_batch assignment), or of pairing
        ``batch`` now and keeping rows ``local``."""
        p = pair if pair is not None else self.method.pair(batch, pair_generator).select(local)
        out = self.method.loss(self.model, p, loss_generator)
        return out.loss, out.terms

