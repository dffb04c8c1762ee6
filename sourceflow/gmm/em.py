"""Diagonal-covariance GMM fitted by chunked EM in torch (scikit-learn's GaussianMixture, made scalable).

One pass over the rows per EM iteration does sklearn's E-step and the M-step's sufficient statistics
together: per chunk of ``chunk_rows`` rows the [rows, K] log-densities (two matrix products, see
:class:`~sourceflow.gmm.diag.DiagTerms`), their log-sum-exp (the log-likelihood) and the
responsibilities r, accumulated into float64 Nk = Σ r, Σ r·x, Σ r·x². Then the M-step is sklearn's:

    nk = Nk + 10·eps,  μ = Σ r·x / nk,  v = Σ r·x² / nk − μ² + reg_covar,  w = nk / Σ nk

so nothing of size N×K outlives a chunk (sklearn holds several N×K float64 matrices: 42 GB each at
1.28M × 8192). The log-likelihood recorded for iteration t is the mean log-likelihood of the parameters
*entering* iteration t (sklearn's ``lower_bounds_``); EM stops when it changes by less than ``tol``.

Speed: when few responsibilities are non-zero (high-dimensional data: most exp() underflow to exactly
0), the statistics are gathered from the non-zero entries only (``index_add_``, O(nnz·D)) instead of
the dense r.T @ x products (O(N·K·D)); exact zeros contribute nothing, so this changes nothing but the
order of summation. ``resp_threshold`` > 0 also drops entries ≤ that value (an approximation; off by
default). ``dtype=torch.float32`` runs the matrix products in float32 (statistics still summed in
float64, data centred on its mean first to limit cancellation in x² terms); float64 is the exact mode.

bf16 screen (float32 only; by default for D ≥ 128 on a CPU with AMX/AVX512-BF16; CUDA: screen=True):
the [rows, K] log-densities are first computed with bf16 operands (fp32 accumulation; ~4x faster on
AMX) with a rigorous per-(row, mode group) bound on their error, and the modes that provably sit more
than −EXP_CUT below the row's best are dropped: the float32 path clamps them to e^EXP_CUT, leaves them
out of the statistics, and their ≤ K·e^-87 in the row sum (≥ 1) is below float32 resolution. Only the
remaining (row, mode) pairs get exact float32 log-densities (a sampled dense-dense product), then the
plain path's max/clamp/exp/sum/sparse statistics on them: the result equals the plain float32 path up
to the order of float32 summation. A chunk with more candidates than ``sparse_density`` takes the
plain path. The bound (:class:`Screen`): bf(a) = a(1+δ) with |δ| ≤ 2^-8 (any rounding mode) for both
operands and the bf16 result, fp32 accumulation over n = 2D+1 terms (γ_n = n·2^-24/(1−n·2^-24)) and
the float32 product's own γ_n·S_ik give |q̃_ik − q32_ik| ≤ c·S_ik with S_ik = Σ_j |xa_ij|·|W_jk| and
c = 2^-7 + 2^-16 + 2.1·γ_n + 2^-8·(1+c₀) ≈ 0.012 at D = 768. S_ik ≤ xa_i·s_g for the mode's group g
(one extra non-negative column per group in the same bf16 product, which comes out ≥ (1−c)·xa_i·s_g),
so B̂_ik = c/(1−c)·(xa_i·s_g)~ bounds the error; L_i = max_k(q̃_ik − B̂_ik) ≤ max_k q32_ik, and (i, k)
is dropped only when q̃_ik + B̂_ik < L_i + EXP_CUT, i.e. q32_ik < max_k q32_ik + EXP_CUT.

Init (``init``): ``"k-means++"`` — sklearn's k-means++ seed rows (:mod:`sourceflow.gmm.kmeans`), turned
into parameters the way sklearn does (one-hot responsibilities on the seed rows: w = (1+10·eps)/N, not
normalised; μ = x/(1+10·eps); v ≈ reg_covar); ``"cuml"`` — cuML KMeans labels as one-hot
responsibilities (sklearn's ``init_params="kmeans"`` formula; needs cuML and a CUDA device);
``"auto"`` — cuML when available on a CUDA device, else k-means++; or a :class:`DiagGMM` to start from.
"""

from __future__ import annotations

import functools
import logging
import math
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sourceflow.gmm.diag import DiagGMM, DiagTerms
from sourceflow.gmm.kmeans import Reader, Rows, as_rows, default_chunk_rows, kmeans_plusplus

log = logging.getLogger("sourceflow.gmm")

EPS64 = float(np.finfo(np.float64).eps)
# log-responsibilities (relative to a row's best mode) are clamped here before exp(): exp() of inputs
# that underflow is ~20-50x slower on CPU, and e^-87 (float32) / e^-700 (float64) count for nothing
# beside the row's largest term (which is 1); the sparse path treats these entries as zeros.
EXP_CUT = {torch.float32: -87.0, torch.float64: -700.0}


@dataclass
class SuffStats:
    """Float64 sufficient statistics of one pass, one [K, 2D+1] matrix: Σ r·x², Σ r·x, Σ r per mode
    (the responsibilities times :meth:`DiagTerms.augment` rows), plus Σ log p(x) and the row count."""

    acc: torch.Tensor
    loglik: float = 0.0
    n: int = 0
    nnz: int = 0  # non-zero responsibilities gathered by the sparse path (for the log)
    dense_chunks: int = 0  # chunks that took the dense r.T @ xa path
    screened_chunks: int = 0  # chunks whose log-densities were screened in bf16 (exact on candidates only)
    carried_rows: int = 0  # rows whose dense log-densities were skipped by the carried bounds (:class:`Carry`)

    @classmethod
    def zeros(cls, k: int, d: int, device: torch.device | str) -> SuffStats:
        return cls(torch.zeros(k, 2 * d + 1, dtype=torch.float64, device=device))

    @property
    def d(self) -> int:
        return (self.acc.shape[1] - 1) // 2

    def m_step(self, reg_covar: float, normalize_weights: bool = True) -> DiagGMM:
        """sklearn's ``_estimate_gaussian_parameters`` (diag) from the accumulated statistics."""
        d = self.d
        nk = self.acc[:, 2 * d] + 10 * EPS64
        means = self.acc[:, d:2 * d] / nk[:, None]
        var = self.acc[:, :d] / nk[:, None] - means**2 + reg_covar
        weights = nk / nk.sum() if normalize_weights else nk / self.n
        return DiagGMM(weights, means, var)


@dataclass
class GMMFit:
    """A fitted GMM (float64, CPU, in the data's coordinates) and how the fit went."""

    gmm: DiagGMM
    log_likelihood: list[float]  # mean log-likelihood per sample, per iteration (of the parameters entering it)
    n_iter: int
    converged: bool
    init: str
    seconds: float
    init_seconds: float
    seed_rows: list[int] | None = None
    settings: dict = field(default_factory=dict)
    dense_share: list[float] = field(default_factory=list)  # per iteration: share of chunks on the dense path
    screen_share: list[float] = field(default_factory=list)  # per iteration: share of chunks screened in bf16
    carried_share: list[float] = field(default_factory=list)  # per iteration: share of rows skipped by the bounds

    def labels(self, data: torch.Tensor | np.ndarray | Reader | Rows, **kw) -> torch.Tensor:
        """Hard mode per row (argmax posterior), in chunks; keywords as :func:`predict`."""
        return predict(self.gmm, data, **{**self._kw(), **kw})

    def posteriors(self, data: torch.Tensor | np.ndarray | Reader | Rows, **kw) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, [rows, K] posteriors) per chunk; keywords as :func:`iter_posteriors`."""
        return iter_posteriors(self.gmm, data, **{**self._kw(), **kw})

    def _kw(self) -> dict:
        return {k: self.settings[k] for k in ("chunk_rows", "device", "dtype") if k in self.settings}


def _terms(gmm: DiagGMM, dtype: torch.dtype, device: torch.device | str, shift: torch.Tensor | None):
    g = gmm.to(device, torch.float64)
    if shift is not None:
        g = DiagGMM(g.weights, g.means - shift, g.variances)
    return g.terms(dtype)


def _label_shift(gmm: DiagGMM, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor | None:
    """In float32, centre rows on the mixture mean Σ w_k μ_k (≈ the data mean) before the products."""
    if dtype == torch.float64:
        return None
    w = gmm.weights.to(device, torch.float64)
    return ((w / w.sum()) @ gmm.means.to(device, torch.float64)).to(dtype).to(torch.float64)


def _auto_rows(gmm: DiagGMM) -> int:
    return default_chunk_rows(max(gmm.num_modes, 2 * gmm.means.shape[1] + 1))


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def iter_posteriors(gmm: DiagGMM, data: torch.Tensor | np.ndarray | Reader | Rows, *, chunk_rows: int | None = None,
                    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64,
                    num_rows: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, p(k | x) [rows, K]) for each chunk of rows."""
    rows = as_rows(data, num_rows)
    shift = _label_shift(gmm, dtype, device)
    terms = _terms(gmm, dtype, device, shift)
    for s, x in rows.chunks(chunk_rows or _auto_rows(gmm), device, dtype, _cast(shift, dtype)):
        yield s, torch.softmax(terms.log_prob_components(x), dim=1)


def predict(gmm: DiagGMM, data: torch.Tensor | np.ndarray | Reader | Rows, *, chunk_rows: int | None = None,
            device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64,
            num_rows: int | None = None) -> torch.Tensor:
    """Hard labels (int64, CPU) = argmax_k log w_k + log N(x | μ_k, v_k), in chunks."""
    return score_and_predict(gmm, data, chunk_rows=chunk_rows, device=device, dtype=dtype, num_rows=num_rows)[0]


def score_and_predict(gmm: DiagGMM, data: torch.Tensor | np.ndarray | Reader | Rows, *,
                      chunk_rows: int | None = None, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float64, num_rows: int | None = None) -> tuple[torch.Tensor, float]:
    """(hard labels [N] int64 on CPU, mean log-likelihood per row) in one chunked pass."""
    rows = as_rows(data, num_rows)
    shift = _label_shift(gmm, dtype, device)
    terms = _terms(gmm, dtype, device, shift)
    out = torch.empty(rows.num_rows, dtype=torch.long)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for s, x in rows.chunks(chunk_rows or _auto_rows(gmm), device, dtype, _cast(shift, dtype)):
        lp = terms.log_prob_components(x)
        total += torch.logsumexp(lp, 1).sum(dtype=torch.float64)
        out[s:s + len(x)] = lp.argmax(1).cpu()
    return out, float(total) / rows.num_rows


class Workspace:
    """Buffers reused across chunks and iterations (fresh multi-MB allocations page-fault every time)."""

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}
        self.screen_fails = 0  # consecutive passes in which no chunk passed the bf16 screen
        self.screen_skip = 0  # passes left to run without trying the screen (2^fails − 1 after a failure)
        self.carry = Carry()  # bounds carried between passes (e_step_stats(reuse_bounds=True))

    def get(self, name: str, rows: int, cols: int, dtype: torch.dtype, device: torch.device | str,
            fill_last_col: float | None = None, fill: float | None = None) -> torch.Tensor:
        """A [rows, cols] view of buffer ``name`` (set to ``fill`` and its last column to ``fill_last_col``
        once, when new)."""
        b = self._bufs.get(name)
        if b is None or b.shape[0] < rows or b.shape[1] != cols or b.dtype != dtype or b.device != torch.device(device):
            b = self._bufs[name] = torch.empty(rows, cols, dtype=dtype, device=device)
            if fill is not None:
                b.fill_(fill)
            if fill_last_col is not None:
                b[:, -1] = fill_last_col
        return b[:rows]


def augment_into(out: torch.Tensor, x: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
    """``DiagTerms.augment(x − shift)`` written into ``out`` [n, 2D+1] whose last column already holds 1."""
    d = x.shape[1]
    xs = out[:, d:2 * d]
    if shift is not None:
        torch.sub(x, shift, out=xs)
    else:
        xs.copy_(x)
    torch.mul(xs, xs, out=out[:, :d])
    return out


def fast_bf16(device: torch.device | str) -> bool:
    """Whether bf16 matrix products are much faster than float32 here: the condition for the bf16 screen.

    CUDA: a device with bf16. CPU: a bf16 ISA (AMX or AVX512-BF16, via oneDNN) is necessary but not enough:
    the screen paid 7.4x / 6.3x over sklearn on an Intel Xeon with AMX but only 6.0x / 4.4x on an AMD EPYC
    with AVX512-BF16 and no AMX, where the plain float32 path is faster. So the CPU answer is measured once
    per machine (:func:`bf16_probe`, cached on disk) rather than read off the ISA flags.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if dev.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    cpu = getattr(torch, "cpu", None)
    amx = getattr(cpu, "_is_amx_tile_supported", lambda: False)()
    avx = getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
    if not (amx or avx) or not hasattr(torch.backends.mkldnn, "matmul"):
        return False
    return bf16_probe()["fast"]


# the screen pays when a bf16 product of the screen's shape is at least this much faster than float32:
# it also does element-wise work on the [rows, K] block and exact float32 products on candidate pairs
BF16_MIN_SPEEDUP = 2.5


def _probe_cache() -> Path:
    import os

    base = os.environ.get("SOURCEFLOW_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sourceflow")
    return Path(base) / "bf16_probe.json"


def _cpu_key() -> str:
    import platform

    model = platform.processor() or platform.machine()
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                model = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def _time_matmul(dtype: torch.dtype, rows: int, d: int, k: int, repeats: int) -> float:
    """Best-of-``repeats`` seconds of one [rows, 2d+1] x [2d+1, k] product (the screen's shape)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(rows, 2 * d + 1, generator=g).to(dtype)
    b = torch.randn(2 * d + 1, k, generator=g).to(dtype)
    a @ b  # warm-up (oneDNN primitive creation)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return best


@functools.cache
def bf16_probe(rows: int = 4096, d: int = 768, k: int = 272, repeats: int = 5) -> dict:
    """Measured float32 / bf16 product times on this CPU (interleaved best-of runs, so a busy machine
    slows both alike) and whether bf16 is ≥ ``BF16_MIN_SPEEDUP`` faster; cached in
    ``$SOURCEFLOW_CACHE_DIR`` (default ``~/.cache/sourceflow``) per CPU model, torch version and thread
    count, so the choice is made once per machine (about 1 s)."""
    import json

    path, key = _probe_cache(), _cpu_key()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if isinstance(cached.get(key), dict) and "fast" in cached[key]:
        return cached[key]
    t32 = t16 = float("inf")
    for _ in range(2):  # interleave, so a load change affects both
        t32 = min(t32, _time_matmul(torch.float32, rows, d, k, repeats))
        t16 = min(t16, _time_matmul(torch.bfloat16, rows, d, k, repeats))
    result = {"float32_s": t32, "bf16_s": t16, "speedup": t32 / t16, "fast": t32 / t16 >= BF16_MIN_SPEEDUP}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        cached[key] = result
        from sourceflow.io import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(cached, indent=1))
    except OSError:  # a read-only home: measure again next time
        pass
    return result


# the screen's default needs D ≥ this: below it the float32 product is cheap next to the element-wise
# work on the [rows, K] block, which the screen has too (measured: no gain at D = 64)
SCREEN_MIN_FEATURES = 128
# unit roundoff terms of the screen's error bound (module docstring): operands rounded to bf16 with a
# relative error ≤ 2^-8 each (holds for truncation too, RNE gives 2^-9)
BF16_REL = 2.0**-8


def screen_constant(n_terms: int, bf16_output: bool) -> float:
    """c with |q̃_ik − q32_ik| ≤ c·S_ik (module docstring); ``bf16_output`` adds the rounding of the
    product itself to bf16 (2^-8·|q̃| ≤ 2^-8·(1+c)·S)."""
    gamma = n_terms * 2.0**-24 / (1 - n_terms * 2.0**-24)
    c = 2 * BF16_REL + BF16_REL**2 + 2.1 * gamma
    if bf16_output:
        c += BF16_REL * (1 + c)
    return c


def screen_groups(k: int, max_groups: int = 16, singles: int = 8) -> list[int]:
    """Group sizes over modes sorted by their typical bound (ascending): the ``singles`` largest get a
    bound column each, then groups of 2, 4, 8, ... below them, the rest share the first column. One
    near-degenerate mode (variance ≈ reg_covar: |w| ~ 1e6) would otherwise loosen every mode's bound."""
    sizes: list[int] = []
    rem, nxt = k, 1
    while rem > 0:
        if len(sizes) == max_groups - 1:
            sizes.append(rem)
            break
        if len(sizes) < singles:
            sz = 1
        else:
            sz, nxt = nxt, nxt * 2
        sz = min(sz, rem)
        sizes.append(sz)
        rem -= sz
    return sizes[::-1]


def feature_rms(gmm: DiagGMM) -> torch.Tensor:
    """[D] the mixture's rms of each feature (clamped above 0): where the |x| ≤ x²/(2t) + t/2 bound is tight."""
    return ((gmm.weights / gmm.weights.sum()) @ (gmm.means**2 + gmm.variances)).sqrt().clamp_min(1e-30)


def abs_bound(v: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(coef [D, m], const [m]) with |xa|·v ≤ x²·coef + const for non-negative v [2D+1, m] and any row
    xa = [x², x, 1], by |x_j| ≤ x_j²/(2t_j) + t_j/2 (t > 0): one product with the x² block, no |x| pass."""
    d = (v.shape[0] - 1) // 2
    return v[:d] + v[d:2 * d] / (2 * t[:, None]), v[2 * d] + (v[d:2 * d] * t[:, None]).sum(0) / 2


@dataclass
class Screen:
    """The bf16 screen's product matrix [2D+1, K+G]: ``w`` with its modes permuted (``perm``: column ->
    mode) so that the G groups are contiguous column ranges (``bounds``), then one non-negative bound
    column per group (also as ``w_bf16``); ``c`` is :func:`screen_constant`."""

    w_ext: torch.Tensor
    perm: torch.Tensor
    bounds: list[tuple[int, int]]
    c: float
    w_bf16: torch.Tensor

    @property
    def k(self) -> int:
        return len(self.perm)

    @classmethod
    def build(cls, gmm: DiagGMM, w: torch.Tensor) -> Screen:
        """Bound columns s_g with xa_i·s_g ≥ S_ik = Σ_j |xa_ij|·|w_jk| for every mode k of group g: by
        |x|·b ≤ (x²·b/t + b·t)/2 (any t > 0; t_j = the mixture's rms of feature j, where it is tight),
        S_ik ≤ Σ_j x_j²(|w_x²,jk| + |w_x,jk|/(2t_j)) + |bias_k| + Σ_j |w_x,jk|·t_j/2, maximised over the
        group (zero on the x rows). Every product xa_ij·s_gj is ≥ 0, so its bf16 product is ≥ (1−c)·S."""
        d = (w.shape[0] - 1) // 2
        g = gmm.to(w.device, torch.float64)
        t = feature_rms(g)
        s_k, c_k = abs_bound(w.to(torch.float64).abs(), t)                   # [D, K], [K]
        perm = torch.argsort(t**2 @ s_k + c_k)                              # typical bound, ascending
        cols, bounds, start = [], [], 0
        for size in screen_groups(len(perm)):
            members = perm[start:start + size]
            col = torch.zeros(2 * d + 1, dtype=torch.float64, device=w.device)
            col[:d] = s_k[:, members].amax(1)
            col[2 * d] = c_k[members].amax()
            cols.append(col * (1 + 2.0**-20))  # rounding s to float32 must not lower it
            bounds.append((start, start + size))
            start += size
        w_ext = torch.cat([w[:, perm], torch.stack(cols, 1).to(w.dtype)], 1)
        c = screen_constant(2 * d + 1, bf16_output=True)
        return cls(w_ext, perm, bounds, c, w_ext.to(torch.bfloat16))

    def candidates(self, q: torch.Tensor, mask: torch.Tensor, cut: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, permuted columns) whose exact float32 log-density may lie within −``cut`` of the row's
        best, from the bf16 product q [n, K+G] (consumed; ``mask``: a [n, ≥K] bool buffer, columns ≥ K
        False, width a multiple of 8): with B̂_ik = c/(1−c)·S̃_i,g(k) ≥ |q̃_ik − q32_ik|,
        L_i = max_k q̃_ik − B̂_ik ≤ max_k q32_ik, and pair (i, k) is dropped when
        q̃_ik + B̂_ik < L_i + cut."""
        k = self.k
        # 1% and 2^-20·|L| cover the float32 rounding of these few operations
        b = q[:, k:].mul_(1.01 * self.c / (1 - self.c))                      # [n, G]
        tops = torch.stack([q[:, a:z].amax(1) for a, z in self.bounds], 1)
        low = (tops - b).amax(1)
        for g, (a, z) in enumerate(self.bounds):
            q[:, a:z].add_(b[:, g:g + 1])
        thr = low + cut - low.abs() * 2.0**-20
        torch.ge(q[:, :k], thr[:, None], out=mask[:, :k])
        return nonzero_rows_cols(mask, k)


def _approx_mm(xa: torch.Tensor, w_bf16: torch.Tensor, xa_bf16: torch.Tensor, out: torch.Tensor
               ) -> torch.Tensor:
    """xa @ w with bf16 operands (fp32 accumulation, bf16 result, widened into ``out``)."""
    return out.copy_(torch.mm(xa_bf16.copy_(xa), w_bf16))


def nonzero_rows_cols(mask: torch.Tensor, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``mask[:, :cols].nonzero(as_tuple=True)`` for a sparse [n, C] bool mask with C a multiple of 8 (and
    columns ≥ ``cols`` False): scans it as int64 words (8x fewer elements), then the few non-zero words."""
    width = mask.shape[1]
    words = mask.view(torch.int64).view(-1).nonzero().squeeze(1)
    wj, bj = mask.view(-1, 8)[words].nonzero(as_tuple=True)
    flat = words[wj] * 8 + bj
    return flat // width, flat % width


def _screen_candidates(xa: torch.Tensor, sc: Screen, ws: Workspace, cut: float, density: float,
                       head_rows: int = 1024) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Candidate (rows, permuted columns) of a chunk, or None when more than ``density`` of the pairs are
    candidates: judged on the first ``head_rows`` rows first (against half of ``density``, so that a
    chunk near the limit does not pay for a full product in vain), then on the whole chunk."""
    n, k = xa.shape[0], sc.k

    def pairs(a: int, b: int, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        # head and tail use separate buffers: a chunk that fails on its head allocates no big ones
        q = ws.get("q" + part, b - a, sc.w_ext.shape[1], xa.dtype, xa.device)
        xb = ws.get("xa_bf16" + part, b - a, xa.shape[1], torch.bfloat16, xa.device)
        mask = ws.get("mask" + part, b - a, -(-k // 8) * 8, torch.bool, xa.device, fill=False)
        return sc.candidates(_approx_mm(xa[a:b], sc.w_bf16, xb, q), mask, cut)

    h = min(n, head_rows)
    r, kk = pairs(0, h, "_head")
    if len(r) > density * h * k * (0.5 if n > h else 1.0):
        return None
    if n > h:
        r2, k2 = pairs(h, n, "")
        if len(r) + len(r2) > density * n * k:
            return None
        r, kk = torch.cat([r, r2 + h]), torch.cat([kk, k2])
    return r, kk


def _exact_pairs(xa: torch.Tensor, w: torch.Tensor, r: torch.Tensor, kk: torch.Tensor) -> torch.Tensor:
    """Float32 xa_r · w[:, k] for each pair (rows ascending, as from nonzero): a sampled dense product."""
    n, k = xa.shape[0], w.shape[1]
    crow = torch.zeros(n + 1, dtype=torch.long, device=xa.device)
    torch.cumsum(torch.bincount(r, minlength=n), 0, out=crow[1:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        zeros = torch.zeros(len(r), dtype=xa.dtype, device=xa.device)
        mask = torch.sparse_csr_tensor(crow, kk, zeros, (n, k), check_invariants=False)
        return torch.sparse.sampled_addmm(mask, xa, w, beta=0.0).values()


_POOL: ThreadPoolExecutor | None = None


def _row_parallel(fn, xa: torch.Tensor, r_idx: torch.Tensor, k_idx: torch.Tensor, **kw) -> list:
    """``fn(xa_part, r_local, k_local, pair_slice=..., **kw)`` over row ranges of a chunk, in one thread per
    torch thread on CPU (the sparse kernels used on the pairs run single-threaded; torch releases the
    GIL), else once. ``r_idx`` must be ascending; each part sees its rows renumbered from 0."""
    n = xa.shape[0]
    parts = torch.get_num_threads() if xa.device.type == "cpu" and len(r_idx) >= 4096 else 1
    if parts <= 1:
        return [fn(xa, r_idx, k_idx, pair_slice=slice(0, len(r_idx)), **kw)]
    global _POOL
    if _POOL is None or _POOL._max_workers < parts:
        _POOL = ThreadPoolExecutor(parts, thread_name_prefix="sourceflow-em")
    cuts = [n * i // parts for i in range(parts + 1)]
    at = torch.searchsorted(r_idx, torch.tensor(cuts, device=r_idx.device)).tolist()
    jobs = [_POOL.submit(fn, xa[cuts[i]:cuts[i + 1]], r_idx[at[i]:at[i + 1]] - cuts[i],
                         k_idx[at[i]:at[i + 1]], pair_slice=slice(at[i], at[i + 1]), **kw)
            for i in range(parts)]
    return [j.result() for j in jobs]


def _sparse_stats(xa: torch.Tensor, r_idx: torch.Tensor, k_idx: torch.Tensor, *, pair_slice: slice,
                  r: torch.Tensor, k: int) -> torch.Tensor:
    """Σ r·xa per mode [K, 2D+1] from the responsibilities ``r[pair_slice]`` at (rows, modes)."""
    resp = torch.sparse_coo_tensor(torch.stack([k_idx, r_idx]), r[pair_slice], (k, xa.shape[0]),
                                   is_coalesced=False, check_invariants=False)
    return torch.sparse.mm(resp, xa)


def _screened_stats(xa: torch.Tensor, r_idx: torch.Tensor, k_idx: torch.Tensor, *, pair_slice: slice,
                    w: torch.Tensor, perm: torch.Tensor, cut: float, resp_threshold: float,
                    regular: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None]:
    """(Σ r·xa [K, 2D+1], Σ log p(x) (float64), non-zero responsibilities, per-row top) of rows ``xa`` from
    their screened candidate pairs (rows ascending, columns of the permuted ``w``): exact log-densities
    of the pairs, then the plain path's max → clamp → exp → row sum → sparse statistics on them. With
    ``regular`` (bool [K]) the top is each row's largest log-density over its pairs with a regular mode
    (−inf where it has none; for :class:`Carry`), else None."""
    n = xa.shape[0]
    v = _exact_pairs(xa, w, r_idx, k_idx)
    k_idx = perm[k_idx]
    top = None
    if regular is not None:
        reg = regular[k_idx]
        top = torch.full((n,), -math.inf, dtype=xa.dtype, device=xa.device).scatter_reduce_(
            0, r_idx[reg], v[reg], "amax")
    m = torch.full((n,), -math.inf, dtype=xa.dtype, device=xa.device).scatter_reduce_(0, r_idx, v, "amax")
    v.sub_(m[r_idx]).clamp_min_(cut).exp_()
    tot = torch.zeros(n, dtype=xa.dtype, device=xa.device).index_add_(0, r_idx, v)
    ll = (m + tot.log()).sum(dtype=torch.float64) if regular is None else (m + tot.log())[tot > 0].sum(
        dtype=torch.float64)  # (Carry: rows without pairs are not in this pass)
    keep = (tot * resp_threshold).clamp_min_(math.exp(cut))
    sel = (v > keep[r_idx]).nonzero(as_tuple=True)[0]
    r_idx, k_idx = r_idx[sel], k_idx[sel]
    r = v[sel].div_(tot[r_idx])
    return _sparse_stats(xa, r_idx, k_idx, pair_slice=slice(None), r=r, k=len(perm)), ll, len(r), top


# Carried bounds (:class:`Carry`): the margin, in nats below the cut, down to which a fresh row's regular
# modes are kept as candidates, so that a row stays skippable while its parameters move by up to ~this much
CARRY_EXTRA = 16.0
# a mode is "special" (its pairs are computed for every row, outside the bounds) when its typical |terms| exceed
# this many times the median mode's: a mode on (nearly) one point (variance ≈ reg_covar) has |−½/v| ~ 1e6 and
# would otherwise loosen every row's rounding bound
SPECIAL_RATIO = 16.0
# a chunk whose fresh rows have more candidate pairs than this share is not carried: its sampled products would
# cost as much as the dense one
CARRY_DENSITY = 0.25
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}


@dataclass
class ChunkBounds:
    """One chunk's carried state: its rows' regular candidate pairs (rows ascending, mode ids) and, per row
    (float64), ``upper`` ≥ the exact log-density of every other regular mode and ``top`` ≤ that of its best
    regular candidate, both under the parameters of the last pass."""

    r: torch.Tensor
    k: torch.Tensor
    upper: torch.Tensor
    top: torch.Tensor


@dataclass
class Carry:
    """Bounds carried from one E-step to the next (exact skipping of the [rows, K] product).

    A row's dense product is skipped when no mode outside its candidates can come within −EXP_CUT of its
    best one under the new parameters, proven by ``top + cut − upper > 2δ + 2σ``: δ bounds the change of
    every regular log-density (|Δq_ik| ≤ |xa_i|·max_k |ΔW_·k|, exact arithmetic) and σ the rounding of a
    computed one (γ_n·|xa_i|·max_k |W_·k|, any summation order). Then only the candidate pairs and the few
    special modes are evaluated (a sampled product), with the same max → clamp → exp → statistics as the
    plain path, so the result equals it up to the order of summation (as the bf16 screen's)."""

    w: torch.Tensor | None = None          # float64 copy of the weights of the last pass
    special: torch.Tensor | None = None    # bool [K] of the last pass
    chunks: dict[int, ChunkBounds] = field(default_factory=dict)
    retry: dict[int, int] = field(default_factory=dict)  # untracked (too dense) chunks: passes until a retry
    fails: dict[int, int] = field(default_factory=dict)


def special_modes(w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """bool [K]: modes whose typical |terms| (features at their rms ``t``) exceed SPECIAL_RATIO x the median
    (at most a quarter of the modes)."""
    d = (w.shape[0] - 1) // 2
    wa = w.to(torch.float64).abs()
    typ = (t**2) @ wa[:d] + t @ wa[d:2 * d] + wa[2 * d]
    big = typ > SPECIAL_RATIO * typ.median()
    limit = w.shape[1] // 4
    if int(big.sum()) > limit:
        big = torch.zeros_like(big)
        big[torch.topk(typ, limit).indices] = True
    return big


def _finite_abs(v: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(v), v.abs(), torch.zeros_like(v))


def _dense_bounds(p: torch.Tensor, m: torch.Tensor, regular: torch.Tensor, sigma: torch.Tensor, density: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(rows, modes, upper, top) of :class:`ChunkBounds` from a chunk's dense log-densities, given as
    p = q − m [n, K] (m: the row max [n, 1]) before the clamp; None when more than ``density`` of the pairs
    are candidates. ``sigma`` bounds each computed q's rounding; 2^-22 of |m| + |p| covers q − m and back."""
    cut = EXP_CUT[p.dtype]
    cand = torch.ge(p, cut - CARRY_EXTRA)
    cand &= regular
    if int(cand.sum()) > density * cand.numel():
        return None
    rr, kk = cand.nonzero(as_tuple=True)
    if bool(regular.all()):  # the row max is a (regular) candidate: p = 0 there
        best = torch.zeros(p.shape[0], dtype=torch.float64, device=p.device)
        other = p.masked_fill(cand, -math.inf).amax(1).to(torch.float64)
    else:
        pr = p.masked_fill(~regular, -math.inf)
        best = pr.masked_fill(~cand, -math.inf).amax(1).to(torch.float64)
        other = pr.masked_fill_(cand, -math.inf).amax(1).to(torch.float64)
    m64 = m.squeeze(1).to(torch.float64)
    top = m64 + best - (m64.abs() + _finite_abs(best)) * 2.0**-22 - sigma
    upper = m64 + other + (m64.abs() + _finite_abs(other)) * 2.0**-22 + sigma
    return rr, kk, upper, top


def e_step_stats(gmm: DiagGMM, rows: Rows, *, chunk_rows: int, device: torch.device | str, dtype: torch.dtype,
                 shift: torch.Tensor | None = None, resp_threshold: float = 0.0, sparse_density: float = 0.02,
                 workspace: Workspace | None = None, screen: bool | None = None,
                 reuse_bounds: bool = False) -> SuffStats:
    """One fused pass: log-likelihood and the M-step statistics under ``gmm`` (rows minus ``shift``).

    Per chunk: xa = [x², x, 1]; lp = xa @ W; lp − max → clamp at EXP_CUT → exp → ÷ row sum (in place,
    one [n, K] buffer); then Σ r·xa either densely (r.T @ xa) or, when at most ``sparse_density`` of
    the responsibilities of the chunk's first 1024 rows are non-zero (above e^EXP_CUT and above
    ``resp_threshold``), as a sparse [K, n] × [n, 2D+1] product over the non-zero entries only.
    Both are summed in the compute dtype within a chunk and in float64 across chunks.
    ``screen`` (default: float32, D ≥ SCREEN_MIN_FEATURES, a CPU with fast bf16) first drops the
    modes that a bf16 product proves to be clamped (module docstring); a chunk with more than
    ``sparse_density`` candidate pairs takes the plain path. ``reuse_bounds`` carries per-row bounds in
    ``workspace`` from one call to the next and skips the dense product of every row they prove
    unchanged (:class:`Carry`); a chunk too dense for it takes the paths above, retried with backoff.
    """
    k, d = gmm.num_modes, rows.num_features
    ws = workspace or Workspace()
    st = SuffStats.zeros(k, d, device)
    w = _terms(gmm, dtype, device, None).weight
    cut = EXP_CUT[dtype]
    floor = math.exp(cut)
    if screen is None:  # CPU only by default: the CUDA path (explicit bf16 operands) is not yet tested on a GPU
        screen = (dtype == torch.float32 and d >= SCREEN_MIN_FEATURES and torch.device(device).type == "cpu"
                  and fast_bf16(device))
    screen = screen and dtype == torch.float32 and sparse_density > 0
    if screen and ws.screen_skip > 0:  # it failed on every chunk lately: retry with exponential backoff
        ws.screen_skip -= 1
        screen = False
    if screen:
        sc = Screen.build(gmm, w)
        w_perm = sc.w_ext[:, :k].contiguous()
    reuse = reuse_bounds and sparse_density > 0
    if reuse:
        cy = ws.carry
        wd = w.to(torch.float64)
        t = feature_rms(gmm.to(device, torch.float64))
        special = special_modes(wd, t)
        regular = ~special
        valid = cy.w is not None and cy.special is not None and torch.equal(cy.special, special)
        if not valid:
            cy.chunks.clear()
        zero = torch.zeros(2 * d + 1, dtype=torch.float64, device=device)
        u = (wd - cy.w)[:, regular].abs().amax(1) if valid and bool(regular.any()) else zero
        s_reg = wd[:, regular].abs().amax(1) if bool(regular.any()) else zero
        coef, const = abs_bound(torch.stack([u, s_reg], 1), t)              # [D, 2], [2]: δ and σ / γ
        coef = coef.to(dtype)
        n_terms, ur = 2 * d + 1, UNIT_ROUNDOFF[dtype]
        gamma = n_terms * ur / (1 - n_terms * ur)
        ident = torch.arange(k, device=device)
    loglik = torch.zeros((), dtype=torch.float64, device=device)
    for start, x in rows.chunks(chunk_rows, device, dtype):
        n = len(x)
        xa = augment_into(ws.get("xa", n, 2 * d + 1, dtype, device, fill_last_col=1.0), x, shift)
        track = None
        if reuse and cy.retry.get(start, 0) > 0:
            cy.retry[start] -= 1
        elif reuse and valid:  # (the first pass only records the parameters: δ needs two)
            # 1% covers the rounding of this product of non-negative terms
            b = ((xa[:, :d] @ coef).to(torch.float64) + const) * 1.01
            delta, sigma = b[:, 0], b[:, 1] * gamma
            cb = cy.chunks.pop(start, None)
            ok = (cb.top + cut - cb.upper > 2 * delta + 2 * sigma if cb is not None
                  else torch.zeros(n, dtype=torch.bool, device=device))
            if cb is not None and not bool(ok.any()):
                # the parameters moved too much for every row: no bounds (nor their cost) for a while
                cy.fails[start] = cy.fails.get(start, 0) + 1
                cy.retry[start] = 2 ** min(cy.fails[start], 4) - 1
            # without bounds yet, take them only once the parameters move slowly (while the median row's change
            # bound is above CARRY_EXTRA, the next pass could not use them)
            elif cb is not None or float(delta.median()) < CARRY_EXTRA:
                none = torch.zeros(0, dtype=torch.long, device=device)
                new = ChunkBounds(none, none,
                                  torch.full((n,), math.inf, dtype=torch.float64, device=device),
                                  torch.full((n,), -math.inf, dtype=torch.float64, device=device))
                pairs_r, pairs_k = [], []
                carried = ok.nonzero().squeeze(1)
                if len(carried):
                    # rows the bounds prove unchanged: their candidates and the special modes, exact on the pairs
                    # (the other rows have no pairs here: they are not in this sum)
                    keep = ok[cb.r]
                    rc, kc = cb.r[keep], cb.k[keep]
                    sp = special.nonzero().squeeze(1)
                    if len(sp):
                        rc = torch.cat([rc, carried.repeat_interleave(len(sp))])
                        kc = torch.cat([kc, sp.repeat(len(carried))])
                        order = torch.argsort(rc, stable=True)
                        rc, kc = rc[order], kc[order]
                    tops = []
                    for acc, ll, nnz, top in _row_parallel(_screened_stats, xa, rc, kc, w=w, perm=ident, cut=cut,
                                                           resp_threshold=resp_threshold, regular=regular):
                        st.acc += acc.to(torch.float64)
                        loglik += ll
                        st.nnz += nnz
                        tops.append(top)
                    new.top[carried] = torch.cat(tops).to(torch.float64)[carried] - sigma[carried]
                    new.upper[carried] = cb.upper[carried] + delta[carried]
                    reg = regular[kc]
                    pairs_r.append(rc[reg])
                    pairs_k.append(kc[reg])
                    st.carried_rows += len(carried)
                    st.n += len(carried)
                fresh = (~ok).nonzero().squeeze(1)
                if len(fresh) == 0:
                    new.r, new.k = torch.cat(pairs_r), torch.cat(pairs_k)
                    cy.chunks[start] = new
                    continue
                if len(fresh) < n:  # the rest of this pass works on the fresh rows only
                    xa, n = xa[fresh], len(fresh)
                track = (new, pairs_r, pairs_k, fresh, sigma[fresh])
        pairs = _screen_candidates(xa, sc, ws, cut, sparse_density) if screen and track is None else None
        if pairs is not None:
            for acc, ll, nnz, _ in _row_parallel(_screened_stats, xa, *pairs, w=w_perm, perm=sc.perm, cut=cut,
                                                 resp_threshold=resp_threshold):
                st.acc += acc.to(torch.float64)
                loglik += ll
                st.nnz += nnz
            st.screened_chunks += 1
            st.n += n
            continue
        p = torch.mm(xa, w, out=ws.get("p", n, k, dtype, device))   # [n, K] log w_k + log N(x | k)
        m = p.amax(1, keepdim=True)
        p.sub_(m)
        if track is not None:
            new, pairs_r, pairs_k, fresh, sig = track
            got = _dense_bounds(p, m, regular, sig, CARRY_DENSITY)
            if got is None:  # too dense to carry: the chunk leaves the bounds for a while
                cy.fails[start] = cy.fails.get(start, 0) + 1
                cy.retry[start] = 2 ** min(cy.fails[start], 4) - 1
            else:
                rr, kk, new.upper[fresh], new.top[fresh] = got
                r_all, k_all = torch.cat([*pairs_r, fresh[rr]]), torch.cat([*pairs_k, kk])
                order = torch.argsort(r_all, stable=True)
                new.r, new.k = r_all[order], k_all[order]
                cy.chunks[start] = new
                cy.fails.pop(start, None)
        p.clamp_min_(cut).exp_()
        tot = p.sum(1, keepdim=True)
        loglik += (m + tot.log()).sum(dtype=torch.float64)
        keep = (tot * resp_threshold).clamp_min_(floor)   # [n, 1]: entries above this are non-zero
        head = slice(0, min(n, 1024))
        if int((p[head] > keep[head]).sum()) <= sparse_density * p[head].numel():
            r_idx, k_idx = (p > keep).nonzero(as_tuple=True)
            r = p[r_idx, k_idx].div_(tot[r_idx, 0])
            for acc in _row_parallel(_sparse_stats, xa, r_idx, k_idx, r=r, k=k):
                st.acc += acc.to(torch.float64)
            st.nnz += len(r)
        else:
            if resp_threshold > 0:
                p.masked_fill_(p <= keep, 0)
            st.acc += (p.div_(tot).T @ xa).to(torch.float64)
            st.dense_chunks += 1
        st.n += n
    if screen:
        ws.screen_fails = 0 if st.screened_chunks else ws.screen_fails + 1
        ws.screen_skip = 2 ** min(ws.screen_fails, 4) - 1
    if reuse:
        cy.w, cy.special = wd, special
    st.loglik = float(loglik)
    return st


def init_from_rows(x_seed: torch.Tensor, n: int, reg_covar: float) -> DiagGMM:
    """sklearn's parameters from one-hot responsibilities on K seed rows (weights not normalised)."""
    x = x_seed.to(torch.float64)
    nk = torch.full((x.shape[0],), 1.0 + 10 * EPS64, dtype=torch.float64, device=x.device)
    means = x / nk[:, None]
    var = (x * x) / nk[:, None] - means**2 + reg_covar
    return DiagGMM(nk / n, means, var)


def init_from_labels(rows: Rows, labels: torch.Tensor, k: int, reg_covar: float, *, chunk_rows: int,
                     device: torch.device | str, shift: torch.Tensor | None = None) -> DiagGMM:
    """sklearn's ``init_params="kmeans"`` parameters: one-hot responsibilities from hard labels."""
    st = SuffStats.zeros(k, rows.num_features, device)
    labels = labels.to(device)
    for s, x in rows.chunks(chunk_rows, device, torch.float64, shift):
        st.acc.index_add_(0, labels[s:s + len(x)], DiagTerms.augment(x))
        st.n += len(x)
    return st.m_step(reg_covar, normalize_weights=False)


def cuml_available(device: torch.device | str) -> bool:
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        import cuml  # noqa: F401
    except Exception:  # an incomplete RAPIDS install raises more than ImportError
        return False
    return True


def cuml_kmeans_labels(x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """cuML KMeans (scalable k-means++ init, Lloyd iterations) labels for rows on a CUDA device."""
    from cuml.cluster import KMeans

    km = KMeans(n_clusters=k, init="scalable-k-means++", n_init=1, random_state=seed, output_type="cupy")
    km.fit(x.float().contiguous())
    return torch.as_tensor(km.labels_, device=x.device).long()


def fit_diag_gmm(data: torch.Tensor | np.ndarray | Reader | Rows, n_components: int, *, reg_covar: float = 1e-6,
                 max_iter: int = 100, tol: float = 1e-3, seed: int = 0, init: str | DiagGMM = "k-means++",
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64,
                 chunk_rows: int | None = None, center: bool | None = None, resp_threshold: float = 0.0,
                 sparse_density: float = 0.02, num_rows: int | None = None, progress: bool = False,
                 screen: bool | None = None, reuse_bounds: bool = False) -> GMMFit:
    """Fit a K-mode diagonal GMM by EM (see the module docstring for the algorithm and the options).

    ``data`` is a [N, D] tensor/array (kept where it is; chunks are moved to ``device``), a
    ``read(start, stop)`` callable with ``num_rows``, or a :class:`Rows`. ``center`` (default: on for
    float32) subtracts the data mean before the matrix products; results are in the data's coordinates.
    ``screen``: the bf16 screen of :func:`e_step_stats` (default: float32, D ≥ 128, CPU with fast bf16).
    ``reuse_bounds``: skip the dense product of rows whose carried bounds prove it unchanged (:class:`Carry`;
    opt-in: measured on one Intel Xeon only, see benchmarks/RESULTS.md).
    """
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    rows = as_rows(data, num_rows)
    n, d = rows.num_rows, rows.num_features
    k = n_components
    if not 1 <= k <= n:
        raise ValueError(f"n_components={k} must be between 1 and the number of rows ({n})")
    device = torch.device(device)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # underflowing responsibilities made resp.T @ x 8x slower
    chunk_rows = chunk_rows or default_chunk_rows(max(k, 2 * d + 1))  # [rows, K] and [rows, 2D+1] buffers
    center = (dtype == torch.float32) if center is None else center
    t0 = time.perf_counter()

    shift = None
    if center:
        total = torch.zeros(d, dtype=torch.float64, device=device)
        for _, x in rows.chunks(chunk_rows, device, torch.float64):
            total += x.sum(0)
        shift = (total / n).to(dtype).to(torch.float64)  # representable in the compute dtype
    seed_rows = None
    if isinstance(init, DiagGMM):
        init_name = "given"
        gmm = init.to(device, torch.float64)
        if shift is not None:
            gmm = DiagGMM(gmm.weights, gmm.means - shift, gmm.variances)
        if gmm.means.shape != (k, d):
            raise ValueError(f"init GMM has means {tuple(gmm.means.shape)}, expected {(k, d)}")
    else:
        if init not in ("k-means++", "cuml", "auto"):
            raise ValueError(f"init must be 'k-means++', 'cuml', 'auto' or a DiagGMM, got {init!r}")
        use_cuml = init == "cuml" or (init == "auto" and cuml_available(device))
        if init == "cuml" and not cuml_available(device):
            raise ValueError(f"init 'cuml' needs cuML and a CUDA device (device={device})")
        if init == "auto" and not use_cuml:
            log.info("GMM init: k-means++ seeds in torch (cuML KMeans needs cuML and a CUDA device; device=%s)", device)
        if use_cuml:
            init_name = "cuml-kmeans"
            log.info("GMM init: cuML KMeans on %s (K=%d)", device, k)
            x_all = torch.cat([x for _, x in rows.chunks(chunk_rows, device, torch.float32)])
            labels = cuml_kmeans_labels(x_all, k, seed)
            del x_all
            gmm = init_from_labels(rows, labels, k, reg_covar, chunk_rows=chunk_rows, device=device, shift=shift)
        else:
            init_name = "k-means++"
            _, idx = kmeans_plusplus(rows, k, random_state=seed, chunk_rows=chunk_rows, device=device,
                                     progress=progress)
            seed_rows = idx.tolist()
            x_seed = rows.take(idx).to(device, torch.float64)
            gmm = init_from_rows(x_seed - shift if shift is not None else x_seed, n, reg_covar)
    init_seconds = time.perf_counter() - t0

    from sourceflow.progress import bar as progress_bar

    trace: list[float] = []
    dense_share: list[float] = []
    screen_share: list[float] = []
    carried_share: list[float] = []
    num_chunks = -(-n // chunk_rows)
    ws = Workspace()
    converged = False
    prev = -math.inf
    bar = progress_bar(range(1, max_iter + 1), desc=f"EM K={k}", unit="iteration", disable=not progress)
    n_iter = 0
    for n_iter in bar:
        st = e_step_stats(gmm, rows, chunk_rows=chunk_rows, device=device, dtype=dtype, shift=_cast(shift, dtype),
                          resp_threshold=resp_threshold, sparse_density=sparse_density, workspace=ws,
                          screen=screen, reuse_bounds=reuse_bounds)
        ll = st.loglik / n
        if not math.isfinite(ll):
            raise FloatingPointError(f"EM iteration {n_iter}: log-likelihood is {ll} (degenerate data or modes)")
        trace.append(ll)
        dense_share.append(st.dense_chunks / num_chunks)
        screen_share.append(st.screened_chunks / num_chunks)
        carried_share.append(st.carried_rows / n)
        gmm = st.m_step(reg_covar)
        bar.set_postfix(ll=f"{ll:.6g}", dense=st.dense_chunks)
        log.debug("EM iteration %d: mean log-likelihood %.10g; %d dense chunks, %d screened, %d rows carried, "
                  "%d sparse responsibilities", n_iter, ll, st.dense_chunks, st.screened_chunks, st.carried_rows,
                  st.nnz)
        if abs(ll - prev) < tol:
            converged = True
            break
        prev = ll
    if shift is not None:
        gmm = DiagGMM(gmm.weights, gmm.means + shift, gmm.variances)
    gmm = gmm.to("cpu", torch.float64)
    settings = {"chunk_rows": chunk_rows, "device": device, "dtype": dtype}
    return GMMFit(gmm, trace, n_iter, converged, init_name, time.perf_counter() - t0, init_seconds, seed_rows,
                  settings, dense_share, screen_share, carried_share)


def fit_sklearn(x: np.ndarray, n_components: int, *, reg_covar: float = 1e-6, max_iter: int = 100,
                tol: float = 1e-3, seed: int = 0, init: DiagGMM | None = None) -> GMMFit:
    """The scikit-learn reference (full-batch GaussianMixture, k-means++ init unless ``init`` given)."""
    from sklearn.mixture import GaussianMixture

    t0 = time.perf_counter()
    kw = {}
    if init is not None:
        w = init.weights.double().numpy()
        kw = dict(weights_init=w / w.sum(), means_init=init.means.double().numpy(),
                  precisions_init=1.0 / init.variances.double().numpy())
    gm = GaussianMixture(n_components, covariance_type="diag", init_params="k-means++", max_iter=max_iter, tol=tol,
                         reg_covar=reg_covar, random_state=seed, **kw).fit(x)
    gmm = DiagGMM(torch.from_numpy(gm.weights_), torch.from_numpy(gm.means_), torch.from_numpy(gm.covariances_))
    secs = time.perf_counter() - t0
    return GMMFit(gmm, [float(v) for v in gm.lower_bounds_], int(gm.n_iter_), bool(gm.converged_),
                  "given" if init is not None else "k-means++", secs, 0.0, None,
                  {"chunk_rows": len(x), "device": "cpu", "dtype": torch.float64})
