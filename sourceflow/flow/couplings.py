"""Couplings: how a minibatch of source draws is paired with a minibatch of data.

A coupling receives the (global) data batch and the source and returns x0 aligned row by row with
x1. The OT couplings re-order x0, never x1, so data, conditions and dataset indices stay together.

* :class:`Independent` — x0 ~ p0 independently (flow matching, CSFM).
* :class:`MinibatchOT` — exact assignment minimising Σ‖x0−x1‖², each source used once (OT-CFM,
  Tong et al. 2024; Pooladian et al. 2023).
* :class:`LoomCoupling` — minibatch OT whose assignments persist across minibatches through
  per-datapoint noise seeds (LOOM-CFM, Davtyan et al., ICLR 2025), on the plain Euclidean distance
  ‖x0 − x1‖ as LOOM's code solves it (its "ot" baseline too); OT-CFM and C2OT use the squared one.
* :class:`C2OTCoupling` — cost ‖x0−x1‖² + w·d(c_i, c_j), w = ∞ for classes (C2OT, Cheng & Schwing 2025).
* :class:`ModeCoupling` — x0 drawn from the mode of x1 under the CLS GMM (MM-FM).
* :class:`FixedPairs` — the (x0, x1) pairs a trained model generated (reflow: LOOM-CFM, CSFM).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sourceflow.flow.sources import GMMSource, Source, SourceDraw
from sourceflow.gmm.diag import DiagGMM


@dataclass
class Batch:
    """A data minibatch: x1, dataset indices, the data condition and (for MM-FM) a global descriptor."""

    x1: torch.Tensor
    idx: torch.Tensor
    cond: torch.Tensor | None = None  # class ids (int64) or continuous conditions [B, d]
    cls: torch.Tensor | None = None  # global descriptor for mode posteriors; defaults to x1

    def __len__(self) -> int:
        return int(self.x1.shape[0])


@dataclass
class Pair:
    """Coupled (x0, x1) with the source draw that produced x0."""

    x0: torch.Tensor
    x1: torch.Tensor
    draw: SourceDraw
    cond: torch.Tensor | None = None
    mode: torch.Tensor | None = None

    def select(self, index: torch.Tensor | slice) -> Pair:
        """Rows ``index`` of the pair (e.g. this process's share of a globally coupled batch)."""
        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[index]

        return Pair(self.x0[index], self.x1[index], self.draw.select(index), cut(self.cond), cut(self.mode))

    def cost(self) -> torch.Tensor:
        """Per-pair squared distance ‖x0 − x1‖²."""
        return sq_dist_rows(self.x0, self.x1)


def sq_dist_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b).reshape(a.shape[0], -1) ** 2).sum(1)


def sq_cost_matrix(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """C[i, j] = ‖x0_i − x1_j‖², computed in float64 so the assignment is not decided by round-off."""
    a = x0.detach().reshape(x0.shape[0], -1).double()
    b = x1.detach().reshape(x1.shape[0], -1).double()
    return ((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T).clamp_min(0)


COSTS = ("sqeuclidean", "euclidean")


def cost_matrix(x0: torch.Tensor, x1: torch.Tensor, kind: str = "sqeuclidean") -> torch.Tensor:
    """The assignment cost: ‖x0_i − x1_j‖² (``sqeuclidean``, OT-CFM / C2OT) or ‖x0_i − x1_j‖ (``euclidean``,
    LOOM-CFM's ``torch.cdist``). The two give different optimal assignments in general."""
    if kind not in COSTS:
        raise ValueError(f"coupling cost must be one of {COSTS}, got {kind!r}")
    c = sq_cost_matrix(x0, x1)
    return c if kind == "sqeuclidean" else c.sqrt()


# Both solvers are exact, so where the optimum is unique (almost surely, for continuous data) they
# return the same permutation. POT's network simplex is 2-4x faster than scipy's shortest augmenting
# path on costs between low-dimensional points (8 Gaussians -> moons, 1024 x 1024: 0.13 s vs 0.49 s;
# 2048: 0.9 s vs 5.7 s) and 2-5x slower on high-dimensional or condition-weighted costs.
SIMPLEX_MAX_DIM = 3
SIMPLEX_MIN_N = 256


def _simplex_perm(c: np.ndarray) -> np.ndarray | None:
    """perm from POT's exact network simplex on uniform marginals, or None when its plan is not a
    permutation (iteration limit, round-off): the caller then falls back to scipy."""
    import ot  # imported on first use

    n = c.shape[0]
    marg = np.full(n, 1.0 / n)
    plan, log = ot.emd(marg, marg, np.ascontiguousarray(c, dtype=np.float64), numItermax=10**8, log=True)
    perm = plan.argmax(0)
    if log.get("warning") is None and (plan[perm, np.arange(n)] > 0.5 / n).all() and np.unique(perm).size == n:
        return perm.astype(np.int64)
    return None


def assign(cost: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Optimal assignment: perm with x0[perm[j]] paired to x1[j]. ``dim``: the dimension of the points
    the cost is a distance between (None: another cost); up to SIMPLEX_MAX_DIM with at least
    SIMPLEX_MIN_N points it is solved by POT's network simplex, otherwise by scipy's Jonker–Volgenant."""
    from scipy.optimize import linear_sum_assignment  # imported on first use: 1 s of start-up otherwise

    c = cost.detach().cpu().numpy()
    if dim is not None and dim <= SIMPLEX_MAX_DIM and c.shape[0] == c.shape[1] >= SIMPLEX_MIN_N:
        perm = _simplex_perm(c)
        if perm is not None:
            return torch.from_numpy(perm).to(cost.device)
    rows, cols = linear_sum_assignment(c)
    perm = np.empty(len(cols), dtype=np.int64)
    perm[cols] = rows
    return torch.from_numpy(perm).to(cost.device)


def point_dim(x: torch.Tensor) -> int:
    """Features per point (the ``dim`` of :func:`assign`)."""
    return int(x[0].numel()) if x.shape[0] else 0


def assign_within_groups(cost: torch.Tensor, groups: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Optimal assignment that never pairs across groups (row i and column i share group i).

    Equivalent to adding w = ∞ to every cross-group entry, but solved as independent smaller problems.
    """
    perm = torch.empty(cost.shape[0], dtype=torch.int64)
    g = groups.cpu()
    for value in torch.unique(g):
        members = torch.nonzero(g == value).flatten()
        sub = assign(cost[members][:, members].cpu(), dim)
        perm[members] = members[sub]
    return perm.to(cost.device)


class Coupling(abc.ABC):
    """Pairs a data batch with source draws. Stateful couplings override the state methods."""

    requires_fixed_source: bool = False  # True: the pairing re-orders x0, so p0 must not depend on c

    @abc.abstractmethod
    def pair(self, batch: Batch, source: Source, generator: torch.Generator | None) -> Pair:
        """Draw x0 for ``batch`` and pair it with x1."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise KeyError(f"{type(self).__name__} has no state, got keys {sorted(state)}")


class Independent(Coupling):
    """x0 ~ p0(·|c) independently of x1."""

    def pair(self, batch, source, generator):
        draw = source.sample(len(batch), generator, cond=batch.cond, device=batch.x1.device)
        return Pair(draw.x0, batch.x1, draw, batch.cond, draw.mode)


class MinibatchOT(Coupling):
    """Exact minibatch OT: a permutation of the source draws minimising Σ‖x0 − x1‖² (``cost``
    ``euclidean``: Σ‖x0 − x1‖, LOOM's "ot" baseline)."""

    requires_fixed_source = True

    def __init__(self, cost: str = "sqeuclidean"):
        cost_matrix(torch.zeros(1, 1), torch.zeros(1, 1), cost)  # validates the name
        self.cost = cost

    def pair(self, batch, source, generator):
        draw = source.sample(len(batch), generator, device=batch.x1.device)
        perm = assign(cost_matrix(draw.x0, batch.x1, self.cost), point_dim(batch.x1))
        draw = draw.select(perm)
        return Pair(draw.x0, batch.x1, draw, batch.cond, draw.mode)


class LoomCoupling(Coupling):
    """LOOM-CFM: persistent minibatch OT through per-datapoint noise seeds.

    Each datapoint keeps ``num_caches`` integer seeds, drawn once at construction (the "first
    epoch"). Per step: pick one slot per datapoint, regenerate its noise from the seed, solve the
    batch assignment on ``cost`` (LOOM: the plain Euclidean distance), hand the seeds around as the
    assignment says and write them back. The current pairing is always feasible for the next batch
    problem, so the total cost of every slot never increases. A batch must not hold a datapoint twice
    (its seed would be duplicated and another lost). The seed table is training state
    (``state_dict``) and must survive a resume. With a GMM source a seed regenerates the mode draw and
    the noise together.
    """

    requires_fixed_source = True

    def __init__(self, num_data: int, num_caches: int = 1, seed: int = 0, cost: str = "euclidean"):
        if num_data < 1 or num_caches < 1:
            raise ValueError(f"LOOM needs num_data >= 1 and num_caches >= 1, got {num_data}, {num_caches}")
        cost_matrix(torch.zeros(1, 1), torch.zeros(1, 1), cost)
        self.cost = cost
        g = torch.Generator().manual_seed(seed)
        self.seeds = torch.randint(0, 2**62, (num_data, num_caches), generator=g, dtype=torch.int64)

    @property
    def num_caches(self) -> int:
        return int(self.seeds.shape[1])

    def pick_slots(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        return torch.randint(0, self.num_caches, (n,), generator=generator)

    def pair(self, batch, source, generator, update: bool = True):
        idx = batch.idx.cpu().long()
        if int(idx.max()) >= self.seeds.shape[0] or int(idx.min()) < 0:
            raise IndexError(f"LOOM cache holds {self.seeds.shape[0]} datapoints, got index {int(idx.max())}")
        if update and torch.unique(idx).numel() != idx.numel():
            raise ValueError("LOOM: a batch holds the same datapoint twice (its seed would be duplicated and "
                             "another lost)")
        slots = self.pick_slots(len(idx), generator)
        seeds = self.seeds[idx, slots]
        draw = source.from_seeds(seeds, device=batch.x1.device)
        perm = assign(cost_matrix(draw.x0, batch.x1, self.cost), point_dim(batch.x1)).cpu()
        if update:
            self.seeds[idx, slots] = seeds[perm]
        draw = draw.select(perm)
        return Pair(draw.x0, batch.x1, draw, batch.cond, draw.mode)

    def current_pairs(self, batch: Batch, source: Source, slot: int = 0) -> Pair:
        """The pairing the cache holds now for ``batch`` in ``slot`` (no assignment, no update)."""
        draw = source.from_seeds(self.seeds[batch.idx.cpu().long(), slot], device=batch.x1.device)
        return Pair(draw.x0, batch.x1, draw, batch.cond, draw.mode)

    def state_dict(self):
        return {"seeds": self.seeds.clone()}

    def load_state_dict(self, state):
        seeds = state["seeds"]
        if seeds.shape != self.seeds.shape:
            raise ValueError(f"LOOM cache shape {tuple(seeds.shape)} does not match {tuple(self.seeds.shape)} "
                             "(num_data or num_caches changed since the checkpoint)")
        self.seeds = seeds.clone().long()


class C2OTCoupling(Coupling):
    """C2OT: minibatch OT on ‖x0_i − x1_j‖² + w·C(c_i, c_j), c_i the condition first paired with x0_i.

    Class conditions (int64) use w = ∞: the assignment never crosses classes, so x0 given c stays
    distributed as p0. Continuous conditions use C = ‖c_i − c_j‖² and either a fixed ``weight`` or,
    with ``target_ratio`` r, the w for which a fraction r of all entries cost no more than the
    original pairing of their column (M_ij + w·C_ij ≤ M_jj), found by exponential + bisection search
    warm-started from the previous batch's w (kept in the state so a resume is exact).
    """

    requires_fixed_source = True

    def __init__(self, weight: float = float("inf"), target_ratio: float | None = None,
                 max_iter: int = 30, ratio_tol: float = 1e-3):
        self.weight = float(weight)
        self.target_ratio = target_ratio
        self.max_iter = max_iter
        self.ratio_tol = ratio_tol

    def pair(self, batch, source, generator):
        if batch.cond is None:
            raise ValueError("C2OT needs a condition (conditioning: label, angle or xcoord)")
        draw = source.sample(len(batch), generator, device=batch.x1.device)
        m = sq_cost_matrix(draw.x0, batch.x1)
        c = batch.cond
        if not torch.is_floating_point(c):
            perm = assign_within_groups(m, c, point_dim(batch.x1))
        else:
            cf = c.reshape(c.shape[0], -1)
            ccost = sq_cost_matrix(cf, cf)
            if self.target_ratio is not None:
                self.weight = search_weight(m, ccost, self.target_ratio, self.weight, self.max_iter, self.ratio_tol)
            if np.isinf(self.weight):
                raise ValueError("C2OT with continuous conditions needs a finite weight or a target_ratio")
            perm = assign(m + self.weight * ccost)
        draw = draw.select(perm)
        return Pair(draw.x0, batch.x1, draw, batch.cond, draw.mode)

    def state_dict(self):
        return {"weight": torch.tensor(self.weight, dtype=torch.float64)}

    def load_state_dict(self, state):
        self.weight = float(state["weight"])


def search_weight(m: torch.Tensor, c: torch.Tensor, ratio: float, initial: float, max_iter: int = 30,
                  tol: float = 1e-3, max_weight: float = 1e8) -> float:
    """The w ≥ 0 with mean(M + w·C ≤ diag(M)[None, :]) ≈ ratio (the fraction falls as w grows)."""
    diag = torch.diagonal(m)[None, :]

    def frac(w: float) -> float:
        return float(((m + w * c) <= diag).double().mean())

    if frac(0.0) <= ratio:
        return 0.0
    lo, hi = 0.0, (initial if np.isfinite(initial) and initial > 0 else 1.0)
    while frac(hi) > ratio:  # exponential search for an upper bracket
        lo, hi = hi, hi * 2
        if hi > max_weight:
            return max_weight
    mid = hi
    for _ in range(max_iter):
        mid = 0.5 * (lo + hi)
        f = frac(mid)
        if abs(f - ratio) < tol:
            break
        if f > ratio:
            lo = mid
        else:
            hi = mid
    return mid


class ModeCoupling(Coupling):
    """MM-FM: x0 ~ N(μ_k, σ_k²I) with k the mode of x1's global descriptor under the CLS GMM.

    ``posterior='soft'`` samples k ~ p(k | cls) every batch (MM-FM's default), ``'hard'`` takes the
    argmax. The descriptor is ``batch.cls`` (a CLS token for images), or x1 itself for toy points. With a
    ``table`` (:class:`sourceflow.gmm.posteriors.PosteriorTable`, the top-k posterior of every dataset row,
    computed once) the modes are drawn from the rows' table entries with the same uniforms instead.
    """

    def __init__(self, cls_gmm: DiagGMM, posterior: str = "soft", table: Any = None, table_k: int = 0):
        if posterior not in ("soft", "hard"):
            raise ValueError(f"posterior must be 'soft' or 'hard', got {posterior!r}")
        self.gmm = cls_gmm
        self.posterior = posterior
        self.table = table
        self.table_k = table.k if table is not None else table_k  # > 0: pairing needs the table

    def modes(self, cls: torch.Tensor | None, generator: torch.Generator | None,
              rows: torch.Tensor | None = None) -> torch.Tensor:
        """Modes of a batch from its descriptors ``cls`` (or, with a table, from dataset ``rows``)."""
        if self.table_k and self.table is None:
            raise ValueError(f"coupling.posterior_topk {self.table_k}: the mode coupling needs --posteriors (the "
                             "cls_posteriors table)")
        if self.table is not None:
            if rows is None:
                raise ValueError("a posterior table needs the batch's dataset rows")
            u = None if self.posterior == "hard" else torch.rand(len(rows), 1, generator=generator, dtype=torch.float64)
            return self.table.draw(rows, u).to(rows.device)
        logp = self.gmm.log_prob_components(cls.detach().to(self.gmm.means.device).double())
        if self.posterior == "hard":
            return logp.argmax(1)
        u = torch.rand(logp.shape[0], 1, generator=generator, dtype=torch.float64).to(logp.device)
        cdf = torch.cumsum(torch.softmax(logp, 1), 1)
        return torch.clamp((cdf < u).sum(1), max=logp.shape[1] - 1)

    def pair(self, batch, source, generator):
        if not isinstance(source, GMMSource):
            raise TypeError("the MM-FM mode coupling needs a GMM source")
        if source.num_modes != self.gmm.num_modes:
            raise ValueError(f"source has {source.num_modes} modes, CLS GMM {self.gmm.num_modes}")
        k = self.modes(batch.cls if batch.cls is not None else batch.x1, generator, batch.idx)
        draw = source.sample(len(batch), generator, mode=k, device=batch.x1.device)
        return Pair(draw.x0, batch.x1, draw, batch.cond, draw.mode)


class FixedPairs(Coupling):
    """Reflow: x0 of datapoint i is the source draw ``x0[i]`` a trained model carried to x1[i] (and its
    GMM mode, for mode conditioning). The pairs are an input file, not training state; the source is not
    sampled (a learned source keeps its base weights)."""

    def __init__(self, x0: torch.Tensor | None = None, mode: torch.Tensor | None = None):
        self.x0, self.mode = x0, mode

    def set_pairs(self, x0: torch.Tensor, mode: torch.Tensor | None = None) -> None:
        self.x0, self.mode = x0, mode

    def pair(self, batch, source, generator):
        if self.x0 is None:
            raise ValueError("reflow coupling without pairs (the train stage needs --pairs)")
        idx = batch.idx.cpu().long()
        x0 = self.x0[idx].to(batch.x1.device)
        mode = None if self.mode is None else self.mode[idx].to(batch.x1.device)
        return Pair(x0, batch.x1, SourceDraw(x0, mode), batch.cond, mode)


def mean_coupling_cost(coupling: Coupling, batches: list[Batch], source: Source,
                       generator: torch.Generator | None) -> float:
    """Mean ‖x0 − x1‖² of the pairs a coupling produces on ``batches`` (no state is changed).

    For LOOM this is the cost of the pairs its cache holds now, averaged over all slots; for the
    other couplings, of fresh pairings of each batch.
    """
    costs = []
    for b in batches:
        if isinstance(coupling, LoomCoupling):
            costs += [coupling.current_pairs(b, source, slot).cost() for slot in range(coupling.num_caches)]
        else:
            costs.append(coupling.pair(b, source, generator).cost())
    return float(torch.cat(costs).double().mean())
