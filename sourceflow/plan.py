"""The resource plan of a config: for every job the workflow would run, its GPUs, peak GPU memory per
device, host memory, disk written, FLOPs and hours at a stated GPU throughput, next to what the SLURM
profile requests, with a flag wherever the plan exceeds the request or the device.

Nothing here needs a GPU. Where a number depends on the real modules (the velocity model, the method's
source and coupling, the optimizer, the EMA copy) it is *measured* by running them on fake tensors:

- **Peak GPU memory of a training step** (:func:`measure_train_step`): ``build_model`` / ``build_method``
  of the resolved spec, with a stand-in data object of the config's shapes (:class:`ShapeData`), run a
  full step as ``sourceflow.train.loop.train`` does it — the method's pairing and loss under bf16
  autocast (where ``train.mixed_precision`` says bf16), backward, gradient clipping, AdamW (fused), the
  EMA update — under torch's ``FakeTensorMode`` with ``MemTracker`` counting every storage (fake CPU
  tensors: fake CUDA tensors fail with a CPU build of torch). Two optimizer steps (the first creates the
  AdamW state), and with gradient accumulation two micro-batches in the second (the second runs while the
  first one's gradients are held). See :func:`measure_train_step` for what is added by formula (DDP's
  gradient buckets) and :class:`FlashAttentionMemory` for attention.
- **FLOPs** with ``torch.utils.flop_counter.FlopCounterMode`` on the same fake step, forward and backward
  counted separately (the counter counts backward matmuls too; a linear layer's backward is 2× its
  forward, so fwd+bwd ≈ 3× fwd; measured, not assumed).
- **Encoders and decoders** (extraction, sample decoding) likewise on the real diffusers / transformers
  classes built at their published sizes (:func:`encoder_costs`).

Everything else is a formula of the config whose terms are named in the output (``terms``). Hours are
FLOPs / (GPUs × peak × MFU) at the stated :class:`Throughput` (default: H100 SXM, bf16 dense 989 TFLOP/s,
fp32 67, fp64 67, MFU 0.35), or I/O at the stated :class:`IOAssumptions` where a job is I/O-bound.

Measurements are cached on disk (:func:`cache_dir`), keyed by a hash of what they depend on (the spec's
model / method / train sections, the data shapes, micro-batch, precision, torch version and the source of
the modules that run), so a rerun of the plan is fast.

The same formulas serve the workflow's resource functions: :func:`latent_stats_mem_mb` is
``latent_stats``' mem_mb formula, :func:`build_spatial_gmm_mem_mb` ``build_spatial_gmm``'s;
:func:`choose_grad_accum` picks the gradient accumulation for ``train.grad_accum: auto``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MEASURE_VERSION = 2  # bump when the measured step changes meaning (invalidates the cache)

GB = 1e9


# ---- assumptions -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Throughput:
    """Peak dense throughput of one GPU per precision and the model FLOPs utilisation assumed for all.

    Defaults: NVIDIA H100 SXM — bf16 dense tensor cores 989 TFLOP/s; fp32 67 TFLOP/s (CUDA cores: torch
    leaves TF32 matmuls off by default, and the sample / extraction stages run fp32); fp64 67 TFLOP/s
    (DGEMM on tensor cores; the CLS GMM's EM runs float64 unless told otherwise). MFU 0.35.
    """

    bf16_tflops: float = 989.0
    fp32_tflops: float = 67.0
    fp64_tflops: float = 67.0
    mfu: float = 0.35
    cpu_tflops: float = 0.1  # a CPU-only job (a few cores, fp32/fp64 BLAS), already at its utilisation
    name: str = "H100 SXM"

    def flops_per_s(self, precision: str) -> float:
        # TF32 tensor cores: half the bf16 dense rate on A100 / H100 (H100 SXM: 494.7 of 989.4)
        peak = {"bf16": self.bf16_tflops, "fp16": self.bf16_tflops, "tf32": self.bf16_tflops / 2,
                "fp32": self.fp32_tflops, "fp64": self.fp64_tflops}[precision]
        return peak * 1e12 * self.mfu

    def describe(self) -> str:
        return (f"{self.name}: bf16 dense {self.bf16_tflops:g}, fp32 {self.fp32_tflops:g}, fp64 {self.fp64_tflops:g} "
                f"TFLOP/s per GPU at MFU {self.mfu:g}; CPU jobs {self.cpu_tflops:g} TFLOP/s")


@dataclass(frozen=True)
class IOAssumptions:
    """What I/O-bound jobs are timed with (per job, sustained)."""

    read_gbps: float = 1.0        # sequential read of a parallel file system, GB/s
    write_gbps: float = 1.0       # sequential write, GB/s
    jpeg_per_core: float = 150.0  # ImageNet-size JPEG decodes + crop per core per second (PIL)
    process_gb: float = 3.0       # host RSS of a torch process with a CUDA context (libraries, context, allocator)
    cpu_process_gb: float = 0.6   # host RSS of a CPU-only stage process (python, torch, zarr)
    zarr_concurrency: int = 10    # chunks Zarr decodes at once for one read (its async.concurrency default)

    def describe(self) -> str:
        return (f"I/O {self.read_gbps:g} GB/s read, {self.write_gbps:g} GB/s write; JPEG {self.jpeg_per_core:g}/s per "
                f"core; a GPU process {self.process_gb:g} GB host, a CPU stage {self.cpu_process_gb:g} GB")


# ---- measuring on fake tensors -----------------------------------------------------------------------------


@dataclass
class AttentionCall:
    """Shapes of one scaled_dot_product_attention call: q [B, H, Nq, d], k [B, H, Nk, d], v [B, H, Nk, dv]."""

    q: tuple[int, ...]
    k: tuple[int, ...]
    v: tuple[int, ...]
    itemsize: int

    @property
    def scores_bytes(self) -> int:
        """B·H·Nq·Nk·itemsize: one [B, H, Nq, Nk] matrix of attention scores in the compute dtype."""
        b, h, nq, _ = self.q
        return b * h * nq * self.k[2] * self.itemsize


class FlashAttentionMemory:
    """Replaces ``torch.nn.functional.scaled_dot_product_attention`` while a step is measured by an op
    with the memory behaviour of the GPU's fused kernels (flash / memory-efficient / cuDNN attention).

    Why: on the CPU, SDPA may take the *math* path (``_scaled_dot_product_attention_math``), which
    materialises the scores ``q·kᵀ`` and their softmax, [B, heads, Nq, Nk] each, and keeps the softmax for
    the backward; the fused GPU kernels never store them (they recompute them blockwise in the backward).
    Which CPU kernel runs depends on the torch build and the inputs (this torch 2.13 CPU build picks its
    fused ``_scaled_dot_product_flash_attention_for_cpu`` for the DiT's calls, masked ones included, which
    is linear in N too; DESIGN.md records the math path for an earlier measurement), so instead of
    subtracting B·heads·N² terms after the fact, every call is replaced by an autograd function that
    allocates exactly what the GPU kernel keeps:

    - forward: the output [B, H, Nq, dv] (compute dtype) and the log-sum-exp [B, H, Nq] (fp32); saved for
      the backward: q, k, v (views of the qkv projection, already alive), the output and the log-sum-exp;
    - backward: dq, dk, dv (compute dtype) and, transiently, flash-attention-2's fp32 accumulator for dq
      [B, H, Nq, d] (it dominates the kernel's workspace; the others are O(B·H·N) fp32).

    The values are zeros: only memory and shapes matter on fake tensors. The calls are recorded
    (:attr:`calls`) for the FLOP count (torch's own ``sdpa_flop_count`` / ``sdpa_backward_flop_count``
    formulas; the CPU fused op is not in FlopCounterMode's registry, so it would count 0) and for
    :meth:`math_scores_bytes`, what the math path would have kept: one softmax matrix per call
    (Σ B·H·Nq·Nk·itemsize) at the end of the forward, plus up to two transient score matrices (scores
    and softmax of the call being computed; in the backward the score gradient and softmax gradient).
    The unit test checks both directions: with this op the step's peak is linear in the sequence length
    (peaks at N, 2N, 4N have no second difference), and with the math kernel forced the excess over it
    lies within [Σ scores, Σ scores + 2 · max scores] of the closed form.
    """

    def __init__(self) -> None:
        self.calls: list[AttentionCall] = []
        self.backward_calls: list[AttentionCall] = []
        self._orig = None

    def __enter__(self) -> FlashAttentionMemory:
        import torch
        import torch.nn.functional as F

        recorder = self

        class _Flash(torch.autograd.Function):
            @staticmethod
            def forward(ctx, q, k, v):  # noqa: ANN001, ANN205
                out = q.new_zeros((*q.shape[:-1], v.shape[-1]))
                lse = q.new_zeros(q.shape[:-1], dtype=torch.float32)
                ctx.save_for_backward(q, k, v, out, lse)
                return out

            @staticmethod
            def backward(ctx, dout):  # noqa: ANN001, ANN205
                q, k, v, _out, _lse = ctx.saved_tensors
                recorder.backward_calls.append(AttentionCall(tuple(q.shape), tuple(k.shape), tuple(v.shape),
                                                             q.element_size()))
                dq_accum = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
                dq = torch.zeros_like(q)
                del dq_accum
                return dq, torch.zeros_like(k), torch.zeros_like(v)

        def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,  # noqa: ANN001
                 enable_gqa=False):  # noqa: ANN001
            if torch.is_autocast_enabled("cpu"):
                dt = torch.get_autocast_dtype("cpu")
                query, key, value = query.to(dt), key.to(dt), value.to(dt)
            recorder.calls.append(AttentionCall(tuple(query.shape), tuple(key.shape), tuple(value.shape),
                                                query.element_size()))
            return _Flash.apply(query, key, value)

        self._orig = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = sdpa
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch.nn.functional as F

        F.scaled_dot_product_attention = self._orig

    def math_scores_bytes(self) -> int:
        """Σ B·H·Nq·Nk·itemsize over the forward calls: the softmax matrices a math kernel keeps for the backward."""
        return sum(c.scores_bytes for c in self.calls)


def attn_flops(calls: list[AttentionCall], backward: bool) -> int:
    """FLOPs of attention calls by torch's SDPA formulas (``sdpa_flop_count``: 4·B·H·Nq·Nk·d forward;
    ``sdpa_backward_flop_count``: 10·B·H·Nq·Nk·d, the fused backward's five products: q·kᵀ recomputed,
    dV, dP, dQ, dK)."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    if backward:
        return int(sum(sdpa_backward_flop_count((*c.q[:-1], c.v[-1]), c.q, c.k, c.v) for c in calls))
    return int(sum(sdpa_flop_count(c.q, c.k, c.v) for c in calls))


class _ScalarStub:
    """A dispatch mode over fake tensors that answers ``.item()`` (``aten._local_scalar_dense``) with 0.

    The method's loss reports its terms as Python floats (``float(loss.detach())``) and the focal weight
    tests its warm-up with ``int(...)``; on fake tensors those reads have no value. 0 takes the warm-up
    branch of the focal weight (weights 1: the same [K] buffers, the same memory)."""

    def __new__(cls):  # noqa: ANN204
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
                if func is torch.ops.aten._local_scalar_dense.default:
                    t = args[0]
                    return False if t.dtype == torch.bool else (0 if not t.is_floating_point() else 0.0)
                return func(*args, **(kwargs or {}))

        return Mode()


@dataclass
class ShapeData:
    """A stand-in for the data objects ``sourceflow.build`` reads: only shapes and sizes (see ``cond_spec``,
    ``build_model``, ``build_source``, ``build_coupling``)."""

    event_shape: tuple[int, ...]
    num_classes: int = 0
    text_shape: tuple[int, int] | None = None  # (tokens L, width E) of caption embeddings
    num_rows: int = 1
    cond_dim: int = 0  # continuous toy conditions (angle: 2, xcoord: 1)

    def __len__(self) -> int:
        return self.num_rows

    def condition(self, kind: str) -> Any:
        import torch

        if kind in ("none", "mode"):
            return None
        if kind == "label":
            return torch.zeros(self.num_rows, dtype=torch.int64)
        return torch.zeros(1, self.cond_dim or {"angle": 2, "xcoord": 1}.get(kind, 1))


@dataclass
class StepMeasure:
    """One measured training step (per device) or sampling forward: peak bytes by MemTracker and FLOPs."""

    peak_bytes: int
    breakdown: dict[str, int]           # MemTracker categories at the peak (Parameter, Gradient, Optstate, ...)
    params: int                         # trainable parameters (model + learned source)
    model_params: int                   # velocity model parameters
    buffer_bytes: int                   # module buffers (the GMM source's means, positions, focal EMA)
    forward_flops: int                  # one micro-batch forward (method + model), attention included
    backward_flops: int                 # its backward
    micro_batch: int
    attention_scores_bytes: int         # what a math attention kernel would add (not in peak_bytes)
    seconds: float
    torch: str
    key: str = ""
    step_seconds: list[float] = field(default_factory=list)

    @property
    def flops_per_sample(self) -> float:
        return (self.forward_flops + self.backward_flops) / self.micro_batch

    @property
    def forward_flops_per_sample(self) -> float:
        return self.forward_flops / self.micro_batch


def cache_dir() -> Path:
    """Where measurements are cached: $SOURCEFLOW_PLAN_CACHE, else ~/.cache/sourceflow/plan."""
    return Path(os.environ.get("SOURCEFLOW_PLAN_CACHE") or Path.home() / ".cache" / "sourceflow" / "plan")


def _code_text(source: str) -> str:
    """Python source without docstrings and comments (``ast.dump``), so editing documentation keeps the cache."""
    import ast

    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(
                getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


@functools.lru_cache(maxsize=1)
def _code_hash() -> str:
    """Hash of the code a measurement runs: the modules it builds (models, flow, build, EMA, the diagonal GMM)
    and this module's measuring functions (not the rest of this file, so editing a formula keeps the cache);
    docstrings and comments do not count."""
    import inspect
    import textwrap

    h = hashlib.sha256()
    files = sorted([*(ROOT / "sourceflow" / "models").glob("*.py"), *(ROOT / "sourceflow" / "flow").glob("*.py"),
                    ROOT / "sourceflow" / "build.py", ROOT / "sourceflow" / "train" / "ema.py",
                    ROOT / "sourceflow" / "gmm" / "diag.py"])
    for f in files:
        h.update(f.name.encode())
        h.update(_code_text(f.read_text()).encode())
    for obj in (FlashAttentionMemory, attn_flops, _ScalarStub, _standin_gmm_files, _deepcopy_in, _measurable_spec,
                _peak_tracker_class, _peak, run_fake_step, run_fake_forward, _build_encoder, encoder_costs):
        h.update(_code_text(textwrap.dedent(inspect.getsource(obj))).encode())
    return h.hexdigest()[:16]


def migrate_cache() -> int:
    """Re-key cached measurements whose stored payload is still valid under the current code hash (after a
    change of the hashing itself); returns how many files were re-keyed."""
    n = 0
    for path in cache_dir().glob("*.json"):
        d = json.loads(path.read_text())
        if "payload" not in d:
            continue
        kind = path.name.split("-", 1)[0]
        key = _cache_key(kind, d["payload"])
        if key != d.get("key"):
            d["key"] = key
            (cache_dir() / f"{kind}-{key}.json").write_text(json.dumps(d, indent=1, sort_keys=True))
            n += 1
    return n


def _cache_key(kind: str, payload: dict[str, Any]) -> str:
    import torch

    blob = json.dumps({"kind": kind, "v": MEASURE_VERSION, "torch": torch.__version__, "code": _code_hash(), **payload},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _cached(kind: str, payload: dict[str, Any], compute: Any, use_cache: bool = True) -> dict[str, Any]:
    key = _cache_key(kind, payload)
    path = cache_dir() / f"{kind}-{key}.json"
    if use_cache and path.exists():
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            pass
    out = compute()
    out["key"] = key
    out["payload"] = json.loads(json.dumps(payload, default=str))
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(out, indent=1, sort_keys=True))
        tmp.replace(path)
    return out


TRAIN_KEYS = ("model", "source", "coupling", "conditioning", "regularizers", "time", "method")


def _train_payload(spec: dict[str, Any], data: ShapeData, micro_batch: int, accumulate: bool, precision: str) -> dict:
    return {"spec": {k: spec.get(k) for k in TRAIN_KEYS},
            "train": {k: spec["train"].get(k) for k in ("grad_clip", "p_uncond", "betas", "weight_decay")},
            "data": asdict(data) | {"num_rows": 0}, "micro_batch": micro_batch, "accumulate": accumulate,
            "precision": precision}


@contextlib.contextmanager
def _standin_gmm_files(data: ShapeData, k: int | None, cls_dim: int) -> Iterator[None]:
    """While building the method of a GMM experiment: the CLS GMM [K, cls_dim] and the spatial GMM
    [K, *event_shape] (weights, means, spherical variances) as tensors of the current (fake) mode,
    instead of files that do not exist yet."""
    import torch

    import sourceflow.flow.sources as sources_mod
    import sourceflow.gmm.diag as diag_mod

    if k is None:
        yield
        return

    def spatial(path: Any) -> dict[str, torch.Tensor]:
        return {"weights": torch.full((k,), 1.0 / k, dtype=torch.float64),
                "means": torch.zeros(k, *data.event_shape), "variances": torch.ones(k)}

    def cls(path: Any) -> dict[str, torch.Tensor]:
        return {"weights": torch.full((k,), 1.0 / k, dtype=torch.float64),
                "means": torch.zeros(k, cls_dim), "variances": torch.ones(k, cls_dim)}

    orig_src, orig_diag = sources_mod.load_gmm_tensors, diag_mod.load_gmm_tensors
    sources_mod.load_gmm_tensors, diag_mod.load_gmm_tensors = spatial, cls
    try:
        yield
    finally:
        sources_mod.load_gmm_tensors, diag_mod.load_gmm_tensors = orig_src, orig_diag


@contextlib.contextmanager
def _deepcopy_in(mode: Any) -> Iterator[None]:
    """The EMA's ``copy.deepcopy`` of fake modules, kept in the same FakeTensorMode (a plain deepcopy of a
    fake tensor makes a new mode, and tensors of two modes cannot meet in one op)."""
    import types

    import sourceflow.train.ema as ema_mod

    orig = ema_mod.copy
    if hasattr(mode, "fake_tensor_converter"):
        ema_mod.copy = types.SimpleNamespace(deepcopy=lambda obj: copy.deepcopy(obj, memo={id(mode): mode}))
    try:
        yield
    finally:
        ema_mod.copy = orig


def _measurable_spec(spec: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """The spec a fake step can run, and the pairing's device bytes added by formula per sample².

    Couplings that solve an assignment (ot, loom, c2ot) read values (scipy on the cost matrix, LOOM's
    duplicate check) that fake tensors do not have; they pair under ``no_grad`` before the loss, so the
    step is measured with the independent coupling and the pairing's [B, B] float32 cost matrix (+ one
    copy) is added by formula. Reflow pairs are an input file: x0 comes from the source like independent."""
    s = copy.deepcopy(spec)
    kind = s["coupling"]["kind"]
    if kind in ("ot", "loom", "c2ot", "reflow"):
        s["coupling"] = {"kind": "independent"}
        return s, (8 if kind != "reflow" else 0)
    if kind == "mode":  # a posterior table is host memory, like the exact posterior's CLS GMM: same device bytes
        s["coupling"].pop("posterior_topk", None)
    return s, 0


@functools.lru_cache(maxsize=1)
def _peak_tracker_class() -> type:
    """torch's ``MemTracker`` without the per-module peaks it updates after every op.

    ``MemTracker._update_peak_stats`` walks every module it has seen (a ``WeakIdKeyDictionary``, ~300 for a
    DiT-DH-XL) after every dispatched op to keep each active module's local peak; over the 65k ops of a
    DiT-DH-XL step that walk was ~70 % of the measurement. The plan reads only the global peak
    (:func:`_peak`: ``get_tracker_snapshot("peak")``), which the same method updates from the current
    snapshot alone, so the walk is skipped by hiding the modules while it runs; the module hooks still
    categorise every storage (parameters, gradients, activations, ...) as before, so the peak and its
    breakdown are unchanged."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class PeakMemTracker(MemTracker):
        def _update_peak_stats(self, peak_state: Any) -> None:
            modules, self.memory_tracking = self.memory_tracking, {}
            try:
                super()._update_peak_stats(peak_state)
            finally:
                self.memory_tracking = modules

    return PeakMemTracker


def _peak_tracker() -> Any:
    """A new :func:`_peak_tracker_class` tracker."""
    return _peak_tracker_class()()


def _peak(tracker: Any) -> tuple[int, dict[str, int]]:
    snap = tracker.get_tracker_snapshot("peak")
    if not snap:
        return 0, {}
    dev = max(snap, key=lambda d: snap[d]["Total"])
    return int(snap[dev]["Total"]), {str(getattr(k, "value", k)): int(v) for k, v in snap[dev].items()}


def run_fake_step(spec: dict[str, Any], data: ShapeData, micro_batch: int, accumulate: bool = False,
                  precision: str = "bf16", fake: bool = True, cls_dim: int = 768, attention: str = "flash",
                  device: str = "cpu", steps: int = 2) -> StepMeasure:
    """Run ``steps`` training steps of the real modules (see the module docstring) and measure them.

    ``fake=False`` runs the same on real tensors: on the CPU it is the independent check of the fake
    measurement (only for small models); ``device="cuda"`` is benchmarks/gpu_memory.py's real step (the
    modules are built on the CPU and moved, as the training loop does; per-step seconds are recorded).
    ``attention``: ``flash`` (:class:`FlashAttentionMemory`, the GPU kernels' memory), ``native`` (what
    this torch's SDPA does on the device) or ``math`` (the math kernel forced)."""
    import warnings

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from sourceflow.build import build_method, build_model
    from sourceflow.flow.couplings import Batch
    from sourceflow.flow.method import Objective
    from sourceflow.models.embed import pack_text
    from sourceflow.train.ema import EMA
    from sourceflow.train.loop import step_generator

    t0 = time.time()
    run_spec, _ = _measurable_spec(spec)
    k = int(run_spec["source"]["components"]) if run_spec["source"]["kind"] == "gmm" else None
    fake_mode = FakeTensorMode() if fake else contextlib.nullcontext()
    attn = FlashAttentionMemory() if attention == "flash" else contextlib.nullcontext()
    kernel = contextlib.nullcontext()
    if attention == "math":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kernel = sdpa_kernel(SDPBackend.MATH)
    bf16 = precision == "bf16"
    dev_type = torch.device(device).type
    seconds: list[float] = []
    with warnings.catch_warnings(), fake_mode, _standin_gmm_files(data, k, cls_dim):
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
        model = build_model(run_spec, data)
        method = build_method(run_spec, data, 0, "cls-gmm" if k else None, "spatial-gmm" if k else None)
        if method.focal is not None:
            # the focal EMA update indexes with boolean masks, which have no fake shape; it allocates a few
            # [K] float64 vectors (0.3 MB at K = 8192), so it is left out (also on real tensors, to compare)
            method.focal.update = lambda mode, per_sample: None
        if dev_type != "cpu":
            model.to(device)
            method.to(device)
        learned = any(p.requires_grad for p in method.source.parameters())
        trainable = torch.nn.ModuleDict({"model": model, **({"source": method.source} if learned else {})})
        params = [p for p in trainable.parameters() if p.requires_grad]
        t = spec["train"]
        opt = torch.optim.AdamW(params, lr=1e-4, betas=tuple(t.get("betas", (0.9, 0.999))),
                                weight_decay=t.get("weight_decay", 0.0),
                                fused=all(p.dtype == torch.float32 for p in params))
        with _deepcopy_in(fake_mode):
            ema = EMA(trainable, 0.999, warmup=False)
        objective = Objective(model, method)

        def batch() -> Batch:
            b = micro_batch
            x1 = torch.zeros(b, *data.event_shape, device=device)
            cond = None
            if spec["conditioning"] == "label":
                cond = torch.zeros(b, dtype=torch.int64, device=device)
            elif spec["conditioning"] == "text":
                length, width = data.text_shape
                cond = pack_text(torch.zeros(b, length, width, device=device),
                                 torch.ones(b, length, dtype=torch.bool, device=device))
            elif spec["conditioning"] not in ("none", "mode"):
                cond = torch.zeros(b, data.cond_dim or 1, device=device)
            cls = torch.zeros(b, cls_dim, device=device) if k and len(data.event_shape) == 3 else None
            return Batch(x1, torch.arange(b, device=device), cond, cls)

        tracker = _peak_tracker()
        tracker.track_external(model, method, ema.module, opt)
        fwd_flops = bwd_flops = 0
        # step 0 creates AdamW's state with a step on zero gradients (what the first real step leaves behind,
        # without its forward: the steady-state step that follows peaks higher); the steps after it run
        # 1 micro-batch, or 2 when accumulating
        micro = [0] + [2 if accumulate else 1] * (steps - 1)
        stub = _ScalarStub() if fake else contextlib.nullcontext()
        with tracker, attn, kernel, stub:
            for step, n_micro in enumerate(micro):
                ts = time.time()
                if n_micro == 0:
                    for p in params:
                        p.grad = torch.zeros_like(p)
                opt.zero_grad(set_to_none=n_micro > 0)
                for m in range(n_micro):
                    counting = step == 1 and m == 0
                    counter = FlopCounterMode(display=False) if counting else contextlib.nullcontext()
                    n_calls = len(attn.calls) if isinstance(attn, FlashAttentionMemory) else 0
                    with counter, torch.autocast(dev_type, dtype=torch.bfloat16, enabled=bf16):
                        loss, _ = objective(batch(), slice(None), step_generator(0, step, "pair"),
                                            step_generator(0, step, "loss"))
                    if counting:
                        fwd_flops = counter.get_total_flops()
                        if isinstance(attn, FlashAttentionMemory):
                            fwd_flops += attn_flops(attn.calls[n_calls:], backward=False)
                        n_bwd = len(attn.backward_calls) if isinstance(attn, FlashAttentionMemory) else 0
                        counter = FlopCounterMode(display=False)
                    with counter if counting else contextlib.nullcontext():
                        (loss / n_micro).backward()
                    if counting:
                        bwd_flops = counter.get_total_flops()
                        if isinstance(attn, FlashAttentionMemory):
                            bwd_flops += attn_flops(attn.backward_calls[n_bwd:], backward=True)
                    del loss
                    tracker.reset_mod_stats()  # per-module stats only; the peak is kept
                if spec["train"].get("grad_clip", 0) > 0:
                    torch.nn.utils.clip_grad_norm_(params, spec["train"]["grad_clip"])
                opt.step()
                ema.update(0.999)
                tracker.reset_mod_stats()
                if dev_type == "cuda":
                    torch.cuda.synchronize()
                seconds.append(round(time.time() - ts, 4))
        peak, breakdown = _peak(tracker)
        n_params = sum(p.numel() for p in params)
        model_params = sum(p.numel() for p in model.parameters())
        buffers = sum(b.numel() * b.element_size() for mod in (model, method) for b in mod.buffers())
    scores = 0
    if isinstance(attn, FlashAttentionMemory):  # one forward's calls (every pass makes the same ones)
        scores = sum(c.scores_bytes for c in attn.calls[:len(attn.calls) // max(1, sum(micro))])
    return StepMeasure(peak, breakdown, n_params, model_params, buffers, int(fwd_flops), int(bwd_flops), micro_batch,
                       int(scores), round(time.time() - t0, 2), torch.__version__, step_seconds=seconds)


# ---- the config ------------------------------------------------------------------------------------------


def fill_defaults(config: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """Validate ``config`` against the workflow's JSON schema and fill its defaults in place, as
    ``snakemake.utils.validate(config, schema)`` does in the Snakefile (every ``properties`` entry with a
    ``default`` is set where missing, also inside ``$ref``s and ``if/then`` branches)."""
    from jsonschema import Draft202012Validator, validators

    validate_properties = Draft202012Validator.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):  # noqa: ANN001, ANN202
        if isinstance(instance, dict):
            for prop, sub in properties.items():
                if "default" in sub:
                    instance.setdefault(prop, copy.deepcopy(sub["default"]))
        yield from validate_properties(validator, properties, instance, schema)

    validators.extend(Draft202012Validator, {"properties": set_defaults})(schema).validate(config)
    return config


def _update(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Snakemake's merge of config files: mappings key by key, anything else replaced."""
    for k, v in over.items():
        base[k] = _update(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base


def load_config(*paths: str | Path) -> dict[str, Any]:
    """The workflow's ``config`` for ``--configfile`` ``paths`` (later files merged over earlier ones, as
    Snakemake does), normalised and with the schema's defaults filled in, as the Snakefile does it."""
    import yaml

    import sourceflow.config as cfgmod

    config: dict[str, Any] = {}
    for path in paths:
        with open(path) as f:
            _update(config, yaml.safe_load(f) or {})
    normalize = getattr(cfgmod, "normalize_experiments", None)  # experiments as a mapping (newer Snakefiles)
    if normalize is not None:
        normalize(config)
    return fill_defaults(config, cfgmod.load_schema())


IMAGE_KINDS = ("digits", "imagefolder")

# Training images (and classes) of datasets the config cannot tell: used when results/{dataset}/manifest.json
# (written by prepare_data) does not exist yet; matched against the dataset's name and root.
KNOWN_DATASETS: dict[str, tuple[int, int]] = {
    "imagenet": (1_281_167, 1000),   # ILSVRC-2012 train
    "cifar10": (50_000, 10),
    "celebahq": (30_000, 0),
    "ffhq": (70_000, 0),
}


@dataclass
class DatasetFacts:
    images: int        # training images (the train split)
    classes: int
    source: str        # where the numbers come from


class UnknownDatasetSize(ValueError):
    """An image dataset whose size neither its manifest, ``--images`` nor a known name tells."""


def dataset_facts(config: dict[str, Any], name: str, images: dict[str, int] | None = None) -> DatasetFacts:
    """Training images and classes of an image dataset: ``images[name]`` if given, else the counts in
    ``results/{name}/manifest.json`` (prepare_data), else :data:`KNOWN_DATASETS` by name / root; digits
    has 1797 images, of which ``test_fraction`` are held out."""
    ds = config["datasets"][name]
    if images and name in images:
        return DatasetFacts(int(images[name]), _known(name, ds)[1] if _known(name, ds) else 0, "--images")
    meta = Path(config.get("results", "results")) / name / "manifest.json"
    if meta.exists():
        m = json.loads(meta.read_text())
        counts = m.get("counts", {})
        return DatasetFacts(int(counts.get("train", sum(counts.values()))), int(m.get("num_classes", 0)), str(meta))
    if ds["kind"] == "digits":
        return DatasetFacts(round(1797 * (1 - ds.get("test_fraction", 0.15))), 10, "sklearn digits")
    known = _known(name, ds)
    if known is None:
        raise UnknownDatasetSize(f"dataset {name!r}: how many training images? No {meta} yet and no known dataset matches "
                         f"its name or root; pass --images {name}=N")
    n = known[0]
    if not ds.get("test_root"):
        n = round(n * (1 - ds.get("test_fraction", 0.0)))
    return DatasetFacts(n, known[1], f"known size of {next(k for k in KNOWN_DATASETS if KNOWN_DATASETS[k] == known)}")


def _known(name: str, ds: dict[str, Any]) -> tuple[int, int] | None:
    hay = re.sub(r"[^a-z0-9]", "", f"{name} {ds.get('root', '')}".lower())
    for key, v in KNOWN_DATASETS.items():
        if key in hay:
            return v
    return None


@dataclass(frozen=True)
class EncoderGeometry:
    """What an encoder writes per image: the CLS descriptor width and the spatial latent [C, H, W]."""

    cls_dim: int
    spatial: tuple[int, int, int]
    input_px: int  # the side the encoder network sees
    itemsize: int = 4  # bytes per stored latent value: the encoder's dtype (float32 4, float16 2)

    @property
    def row_bytes(self) -> int:
        """Bytes of one store row (spatial + CLS at the store's dtype; index and flip add 9 bytes)."""
        return self.itemsize * (math.prod(self.spatial) + self.cls_dim) + 9


# Published sizes of the encoders' networks (the weights are not here): DINOv2-B and the RAE's DINOv2-B with
# registers (768 wide, patch 14, RAE feeds 224 px), SigLIP2-B/16, MAE-B/16.
VIT_SIZES = {"dinov2": (768, 14), "rae": (768, 14), "siglip2": (768, 16), "mae": (768, 16)}


def encoder_geometry(enc: dict[str, Any], resolution: int) -> EncoderGeometry:
    """The shapes (and bytes per value) an encoder config writes per image."""
    geo = _encoder_shapes(enc, resolution)
    return EncoderGeometry(geo.cls_dim, geo.spatial, geo.input_px, 2 if enc.get("dtype") == "float16" else 4)


def _encoder_shapes(enc: dict[str, Any], resolution: int) -> EncoderGeometry:
    kind = enc["kind"]
    res = enc.get("resolution") or resolution
    if kind == "pixels":
        side = enc.get("pool") or res
        return EncoderGeometry(3 * side * side, (3, res, res), res)
    if kind == "sd-vae":
        return EncoderGeometry(4, (4, res // 8, res // 8), res)
    width, patch = VIT_SIZES[kind]
    size = 224 if kind == "rae" else res  # an RAE resizes to its encoder_input_size (224 for DINOv2-B)
    return EncoderGeometry(width, (width, size // patch, size // patch), size)


# Text encoders: (token width, parameters) of the published models.
TEXT_ENCODERS = {"clip": (768, 123_000_000), "minilm": (384, 22_700_000)}


def text_shape(config: dict[str, Any], spec: dict[str, Any]) -> tuple[int, int] | None:
    """(tokens L, width E) of the caption embeddings a text-conditioned experiment trains on."""
    if spec.get("conditioning") != "text":
        return None
    te = config["datasets"][spec["data"]]["captions"]["text_encoders"][spec["text_encoder"]]
    return int(te.get("max_length", 77)), TEXT_ENCODERS[te["kind"]][0]


def shape_data(config: dict[str, Any], spec: dict[str, Any], facts: dict[str, DatasetFacts]) -> ShapeData:
    """The stand-in data object of an experiment: latent shape, classes, caption shape, rows."""
    d = spec["data"]
    ds = config["datasets"][d]
    if ds["kind"] not in IMAGE_KINDS:
        return ShapeData((2,), 2 if ds.get("distribution") == "moons" else 8, None, int(ds.get("n_train", 20000)))
    enc = ds["encoders"][spec["encoder"]]
    geo = encoder_geometry(enc, ds["resolution"])
    f = facts[d]
    return ShapeData(geo.spatial, f.classes, text_shape(config, spec), f.images * (2 if enc.get("flips") else 1))


# ---- the jobs ------------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One job of the workflow (a rule and its wildcards)."""

    rule: str
    dataset: str | None = None
    encoder: str | None = None
    K: int | None = None
    text_encoder: str | None = None
    features: str | None = None
    experiment: str | None = None
    seed: int | None = None
    stage: str | None = None
    local: bool = False  # runs inside the Snakemake process (localrules, rules without an action)
    topk: int | None = None  # cls_posteriors: modes kept per row

    @property
    def what(self) -> str:
        if self.experiment is not None:
            return f"{self.experiment}" + (f"/seed{self.seed}" if self.seed is not None else "") + \
                (f" ({self.stage})" if self.stage else "")
        parts = [p for p in (self.dataset, self.encoder, f"K{self.K}" if self.K else None,
                             f"top{self.topk}" if self.topk else None, self.text_encoder, self.features) if p]
        return "/".join(parts)


def enumerate_jobs(config: dict[str, Any], specs: dict[str, dict[str, Any]]) -> list[Job]:
    """Every job ``snakemake`` would run for ``config`` from an empty results folder, as the rules in
    workflow/rules/*.smk derive them: per image dataset its artifacts (``artifact_outputs``: manifest,
    latents and statistics per encoder, CLS and spatial GMM per K, captions per text encoder, the
    feature network, reference statistics per feature kind); per toy dataset with runs its data, W2
    reference and point GMMs; per experiment the spec files (local); per experiment × seed train (unless
    ``model_from``), reflow_pairs (reflow experiments), sample and evaluate; the report; rule all."""
    jobs: list[Job] = []
    runs = [(s["data"], name, seed) for name, s in specs.items() for seed in s["seeds"]]
    for name, ds in config["datasets"].items():
        if ds["kind"] not in IMAGE_KINDS:
            continue
        jobs.append(Job("prepare_data", dataset=name))
        for enc in ds.get("encoders", {}):
            jobs += [Job("extract_latents", dataset=name, encoder=enc), Job("latent_stats", dataset=name, encoder=enc)]
        for g in ds.get("gmm", []):
            for k in g["components"]:
                jobs.append(Job("fit_cls_gmm", dataset=name, encoder=g["encoder"], K=int(k)))
                if g.get("spatial", True):
                    jobs.append(Job("build_spatial_gmm", dataset=name, encoder=g["encoder"], K=int(k)))
        tables = sorted({(s["encoder"], int(s["source"]["components"]), int(s["coupling"]["posterior_topk"]))
                         for s in specs.values() if s["data"] == name and s["coupling"]["kind"] == "mode"
                         and s["coupling"].get("posterior_topk")})
        jobs += [Job("cls_posteriors", dataset=name, encoder=e, K=k, topk=t) for e, k, t in tables]
        if ds.get("captions") is not None:
            jobs.append(Job("align_captions", dataset=name))
            jobs += [Job("embed_captions", dataset=name, text_encoder=te) for te in ds["captions"]["text_encoders"]]
        feats = (ds.get("reference") or {}).get("features", [])
        net = "feature-net" in feats or any(
            s["data"] == name and (s["evaluate"]["features"] == "feature-net" or s["evaluate"].get("classifier"))
            for s in specs.values())
        if net:
            jobs.append(Job("train_feature_net", dataset=name))
        jobs += [Job("reference_features", dataset=name, features=f) for f in feats]
    toy = sorted({d for d, _, _ in runs if config["datasets"][d]["kind"] not in IMAGE_KINDS})
    for d in toy:
        jobs += [Job("make_toy_data", dataset=d), Job("reference_stats", dataset=d)]
        ks = sorted({int(s["source"]["components"]) for s in specs.values() if s["data"] == d
                     and s["source"]["kind"] == "gmm"})
        jobs += [Job("fit_cls_gmm", dataset=d, encoder="points", K=k) for k in ks]
    for name, s in specs.items():
        stages = ([] if s.get("model_from") else ["train"]) + ["sample", "evaluate"]
        jobs += [Job("experiment_spec", dataset=s["data"], experiment=name, stage=st, local=True) for st in stages]
    for d, name, seed in runs:
        s = specs[name]
        if not s.get("model_from"):
            jobs.append(Job("train", dataset=d, experiment=name, seed=seed))
        if s.get("reflow"):
            jobs.append(Job("reflow_pairs", dataset=d, experiment=name, seed=seed))
        jobs += [Job("sample", dataset=d, experiment=name, seed=seed), Job("evaluate", dataset=d, experiment=name, seed=seed)]
    if runs:
        jobs.append(Job("report"))
    jobs.append(Job("all", local=True))
    return jobs


# ---- what the SLURM profile requests ------------------------------------------------------------------------

FUNCTION = "function"


def rule_resources(rules_dir: str | Path = ROOT / "workflow" / "rules") -> dict[str, dict[str, Any]]:
    """The ``resources:`` of every rule in workflow/rules/*.smk: literal values (ints, strings) as they
    are, anything else (a function, a lambda, an expression) as :data:`FUNCTION`."""
    import ast

    out: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(rules_dir).glob("*.smk")):
        rule = None
        in_res = False
        for line in path.read_text().splitlines():
            m = re.match(r"^rule (\w+):", line)
            if m:
                rule, in_res = m[1], False
                out[rule] = {}
                continue
            if rule is None:
                continue
            if re.match(r"^\S", line):  # a def or anything else at column 0 ends the rule
                rule, in_res = None, False
                continue
            if re.match(r"^    resources:\s*$", line):
                in_res = True
                continue
            if in_res:
                m = re.match(r"^        (\w+)\s*=\s*(.*?)\s*$", line)
                if m is None:
                    in_res = bool(re.match(r"^         ", line))  # a continuation line
                    continue
                value = re.sub(r"\s*#.*$", "", m[2]).rstrip(",").strip()
                try:
                    out[rule][m[1]] = ast.literal_eval(value)
                except (ValueError, SyntaxError):
                    out[rule][m[1]] = FUNCTION
    return out


def _parse_resource_value(v: Any) -> Any:
    if isinstance(v, str):
        try:
            return int(v)
        except ValueError:
            return v
    return v


@dataclass
class Profile:
    """A Snakemake profile's resources: ``default-resources`` and ``set-resources`` per rule, ``retries``."""

    default: dict[str, Any]
    per_rule: dict[str, dict[str, Any]]
    retries: int
    path: str

    @classmethod
    def load(cls, path: str | Path = ROOT / "profiles" / "slurm" / "config.yaml") -> Profile:
        import yaml

        y = yaml.safe_load(Path(path).read_text()) or {}
        default: dict[str, Any] = {}
        dr = y.get("default-resources") or []
        for item in dr if isinstance(dr, list) else [f"{k}={v}" for k, v in dr.items()]:
            k, _, v = str(item).partition("=")
            default[k.strip()] = _parse_resource_value(v.strip())
        per_rule = {r: {k: _parse_resource_value(v) for k, v in (res or {}).items()}
                    for r, res in (y.get("set-resources") or {}).items()}
        return cls(default, per_rule, int(y.get("retries", 0) or 0), str(path))


def requested(job: Job, profile: Profile, rules: dict[str, dict[str, Any]], plan_values: dict[str, Any]
              ) -> dict[str, Any]:
    """What a job asks the scheduler for, as Snakemake resolves it: the profile's ``set-resources`` of the
    rule, else the rule's own resource, else the profile's ``default-resources``. A rule resource that is a
    function is evaluated by the plan's own number for it (``plan_values``) and marked as such."""
    out: dict[str, Any] = {}
    source: dict[str, str] = {}
    for key in ("mem_mb", "runtime", "gpu"):
        if key in profile.per_rule.get(job.rule, {}):
            out[key], source[key] = profile.per_rule[job.rule][key], "profile set-resources"
        elif key in rules.get(job.rule, {}):
            v = rules[job.rule][key]
            if v == FUNCTION:
                out[key], source[key] = plan_values.get(key), "rule function (evaluated by the plan's formula)"
            else:
                out[key], source[key] = v, "rule"
        elif key in profile.default:
            out[key], source[key] = profile.default[key], "profile default-resources"
        else:
            out[key], source[key] = None, "none"
    out["source"] = source
    return out


# ---- formulas the workflow's resource functions share ------------------------------------------------------


def latent_stats_mem_mb(spatial_shape: tuple[int, ...] | list[int], stats_batch_rows: int) -> int:
    """``latent_stats``' memory (MB) from its batch and the store's row shape: the float64 batch
    (stats_batch_rows × C·H·W × 8 bytes) plus one Zarr read in flight (a quarter batch or one chunk of at most
    max(4 MiB, a row); ~3× its bytes inside Zarr and one copy of the rows taken), +25 %, plus 600 MB for
    Python, torch and Zarr. The latent_stats rule's mem_mb (workflow/rules/latents.smk calls this)."""
    row = 4 * math.prod(int(d) for d in spatial_shape)
    rows = int(stats_batch_rows)
    read = 4 * max(rows // 4 * row, row, 4 << 20)
    return int(1.25 * (2 * rows * row + read) / 1e6) + 600


def build_spatial_gmm_mem_mb(memory_budget_mb: int) -> int:
    """``build_spatial_gmm``'s memory request (MB): the accumulator budget plus 4000 MB for the batch being
    accumulated and the process (the build_spatial_gmm rule's mem_mb calls this)."""
    return int(memory_budget_mb) + 4000


# A training run on CPUs only (toy data, digits, a rehearsal) asks for a fixed workstation-sized amount: its
# largest term, the training step's activations, is known only from a fake step, too slow for a resource
# function; the plan measures it and flags a run that needs more.
CPU_TRAIN_MEM_MB = 4000


def resource_planner(config: dict[str, Any]) -> Planner:
    """A :class:`Planner` for the workflow's resource functions: no profile or rules to read, and each dataset's
    size read only when a job asks for it (:class:`UnknownDatasetSize` before prepare_data for an unknown one)."""
    return Planner(config, profile=Profile({}, {}, 0, "-"), rules={}, lazy_facts=True)


def train_mem_mb(config: dict[str, Any], exp: str) -> int:
    """The train rule's mem_mb: the plan's host memory of ``exp``'s training job (:meth:`Planner.train_mem_mb`,
    the configured micro-batch or the largest one under ``grad_accum: auto``), or :data:`CPU_TRAIN_MEM_MB`
    for a run without GPUs. Needs the model's parameter count (built on fake tensors, cached on disk)."""
    return resource_planner(config).train_mem_mb(exp)


def nfe_of(solver: str, steps: int | None, dopri5_nfe: int = 100) -> int:
    """Model evaluations of one solve: euler 1 per step, heun and midpoint 2; dopri5 is adaptive (the
    plan assumes ``dopri5_nfe``; the sample stage records the true number)."""
    if solver == "dopri5":
        return dopri5_nfe
    return int(steps or 1) * (2 if solver in ("heun", "midpoint") else 1)


# ---- encoders, decoders and Inception on fake tensors ------------------------------------------------------

INCEPTION_FLOPS = 2 * 5.71e9  # InceptionV3 at 299 px: 5.71 G multiply-adds per image (FID features)
INCEPTION_PARAMS = 23_900_000

# Host bytes matplotlib adds per pixel of the tile it is drawing in the report's image grids (the tile is
# uint8 RGB; 64 B is what two float64 RGBA copies would take, 2 x 4 x 8 B; not traced further). Measured
# with stages/report.py on the imagenet256-mmfm rehearsal (VmHWM): 2, 4, 8 tiles at grid_images 4 and 16 fit
# peak = 0.53 GB + tiles x tile bytes + 64.6 B x tile pixels, which predicts grid_images 36 (3.91 GB) within
# 0.1 % (benchmarks/RESULTS.md, "Plan vs rehearsal").
GRID_RENDER_BYTES_PER_PX = 64


def _build_encoder(kind: str, geo: EncoderGeometry, resolution: int) -> tuple[Any, Any, Any]:
    """(module, encode(x), decode(z) or None) of an encoder kind at its published size (the real classes)."""
    import torch

    if kind == "rae":
        from diffusers import AutoencoderRAE

        # RAE's DINOv2-B with registers encoder and its ViT-XL decoder ("RAE-dinov2-wReg-base-ViTXL"):
        # hidden 1152, 28 layers, 16 heads, MLP 4096, patch 16, 256 px
        m = AutoencoderRAE(encoder_type="dinov2", encoder_hidden_size=768, encoder_patch_size=14,
                           encoder_num_hidden_layers=12, decoder_hidden_size=1152, decoder_num_hidden_layers=28,
                           decoder_num_attention_heads=16, decoder_intermediate_size=4096, patch_size=16,
                           encoder_input_size=224, image_size=resolution)
        return m, (lambda x: m.encode(x)), (lambda z: m.decode(z))
    if kind == "sd-vae":
        from diffusers import AutoencoderKL

        m = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                          block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                          sample_size=resolution)
        return m, (lambda x: m.encode(x)), (lambda z: m.decode(z))
    if kind in ("dinov2", "siglip2", "mae"):
        from transformers import Dinov2Config, Dinov2Model

        # a ViT-B of the encoder's patch size (DINOv2-B; SigLIP2-B/16 and MAE-B/16 have the same transformer)
        width, patch = VIT_SIZES[kind]
        m = Dinov2Model(Dinov2Config(hidden_size=width, num_hidden_layers=12, num_attention_heads=12,
                                     patch_size=patch, image_size=geo.input_px))
        return m, (lambda x: m(pixel_values=torch.nn.functional.interpolate(x, size=geo.input_px))), None
    raise ValueError(kind)


def encoder_costs(kind: str, geo: EncoderGeometry, resolution: int, batch: int, use_cache: bool = True
                  ) -> dict[str, float]:
    """Parameters, FLOPs per image and peak device bytes at ``batch`` (no grad, fp32) of encoding and
    decoding with an encoder kind, measured on fake tensors of the real class at its published size
    (pixels: nothing)."""
    if kind == "pixels":
        return {"params": 0, "encode_flops": 0.0, "decode_flops": 0.0, "encode_peak": 0, "decode_peak": 0}

    def compute() -> dict[str, Any]:
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.utils.flop_counter import FlopCounterMode

        out: dict[str, Any] = {}
        with FakeTensorMode(), _ScalarStub():  # the stub answers the initialisers' value reads
            m, enc, dec = _build_encoder(kind, geo, resolution)
            m.eval().requires_grad_(True)  # MemTracker hooks every parameter's gradient (none is made: no_grad)
            out["params"] = sum(p.numel() for p in m.parameters())
            for name, fn, x in (("encode", enc, lambda: torch.zeros(batch, 3, resolution, resolution)),
                                ("decode", dec, lambda: torch.zeros(batch, *geo.spatial))):
                if fn is None:
                    out[f"{name}_flops"], out[f"{name}_peak"] = 0.0, 0
                    continue
                attn = FlashAttentionMemory()
                tracker = _peak_tracker()
                tracker.track_external(m)
                counter = FlopCounterMode(display=False)
                with torch.no_grad(), tracker, attn, counter:
                    fn(x())
                out[f"{name}_flops"] = (counter.get_total_flops() + attn_flops(attn.calls, False)) / batch
                out[f"{name}_peak"] = _peak(tracker)[0]
        return out

    shapes = {k: v for k, v in asdict(geo).items() if k != "itemsize"}  # the stored dtype costs the network nothing
    return _cached("encoder", {"kind": kind, "geo": shapes, "res": resolution, "batch": batch}, compute, use_cache)


def run_fake_forward(specs: list[dict[str, Any]], data: ShapeData, batch: int, cls_dim: int = 768) -> dict[str, Any]:
    """One guided velocity evaluation as the sample stage runs it (fp32, no grad): every model of ``specs``
    (the run's model, then its guide) on a batch of ``batch``, with the run's method (the GMM source's
    buffers). Peak device bytes, resident bytes and forward FLOPs per sample of each model."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from sourceflow.build import build_method, build_model
    from sourceflow.models.embed import pack_text

    main = _measurable_spec(specs[0])[0]
    k = int(main["source"]["components"]) if main["source"]["kind"] == "gmm" else None
    out: dict[str, Any] = {"flops": []}
    with FakeTensorMode(), _standin_gmm_files(data, k, cls_dim):
        models = [build_model(s, data).eval() for s in specs]
        method = build_method(main, data, 0, "cls-gmm" if k else None, "spatial-gmm" if k else None)
        tracker = _peak_tracker()
        tracker.track_external(*models, method)
        attn = FlashAttentionMemory()
        with torch.no_grad(), tracker, attn:
            x = torch.zeros(batch, *data.event_shape)
            t = torch.zeros(batch)
            cond = None
            if specs[0]["conditioning"] == "text":
                length, width = data.text_shape
                cond = pack_text(torch.zeros(batch, length, width), torch.ones(batch, length, dtype=torch.bool))
            elif specs[0]["conditioning"] in ("label", "mode"):
                cond = torch.zeros(batch, dtype=torch.int64)
            elif specs[0]["conditioning"] != "none":  # continuous toy conditions (angle, xcoord)
                cond = torch.zeros(batch, data.condition(specs[0]["conditioning"]).shape[-1])
            if method.source.__class__.__name__ == "LearnedSource":
                x = method.source.transform(torch.zeros_like(x), torch.zeros(batch, 1), cond).x0
            vs = []
            for m in models:
                n = len(attn.calls)
                counter = FlopCounterMode(display=False)
                with counter:
                    vs.append(m(x, t, cond))
                out["flops"].append((counter.get_total_flops() + attn_flops(attn.calls[n:], False)) / batch)
            del vs
        out["peak"] = _peak(tracker)[0]
        out["resident"] = sum(t.numel() * t.element_size() for mod in (*models, method)
                              for t in [*mod.parameters(), *mod.buffers()])
    return out


def train_precision(spec: dict[str, Any]) -> str:
    """bf16 where train.mixed_precision says so and the run trains on GPUs (accelerate applies mixed precision
    only on CUDA; CPU runs train in fp32)."""
    t = spec["train"]
    return "bf16" if t.get("mixed_precision", "no") == "bf16" and int(t.get("gpus", 0)) > 0 else "fp32"


def measure_train_step(spec: dict[str, Any], data: ShapeData, micro_batch: int, accumulate: bool = False,
                       cls_dim: int = 768, use_cache: bool = True) -> StepMeasure:
    """:func:`run_fake_step` of ``spec`` at ``micro_batch`` samples per device, cached (see :func:`cache_dir`)."""
    precision = train_precision(spec)
    payload = _train_payload(spec, data, micro_batch, accumulate, precision) | {"cls_dim": cls_dim}
    out = _cached("train", payload, lambda: asdict(run_fake_step(spec, data, micro_batch, accumulate, precision,
                                                                 cls_dim=cls_dim)), use_cache)
    return StepMeasure(**{k: v for k, v in out.items() if k in StepMeasure.__dataclass_fields__})


def param_counts(spec: dict[str, Any], data: ShapeData, cls_dim: int = 768, use_cache: bool = True) -> tuple[int, int]:
    """(trainable parameters: the velocity model + a learned source, the velocity model's own) of ``spec``'s
    real modules built on fake tensors, as :func:`run_fake_step` builds them (no step run: seconds for
    DiT-DH-XL, cached). What a training job's checkpoint holds; the train rule's mem_mb needs it."""
    def compute() -> dict[str, int]:
        import warnings

        from torch._subclasses.fake_tensor import FakeTensorMode

        from sourceflow.build import build_method, build_model

        run_spec, _ = _measurable_spec(spec)
        k = int(run_spec["source"]["components"]) if run_spec["source"]["kind"] == "gmm" else None
        with warnings.catch_warnings(), FakeTensorMode(), _standin_gmm_files(data, k, cls_dim):
            warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
            model = build_model(run_spec, data)
            method = build_method(run_spec, data, 0, "cls-gmm" if k else None, "spatial-gmm" if k else None)
            model_params = sum(p.numel() for p in model.parameters())
            source = sum(p.numel() for p in method.source.parameters() if p.requires_grad)
        return {"params": model_params + source, "model_params": model_params}

    payload = {"spec": {k: spec.get(k) for k in TRAIN_KEYS}, "data": asdict(data) | {"num_rows": 0},
               "cls_dim": cls_dim}
    out = _cached("params", payload, compute, use_cache)
    return int(out["params"]), int(out["model_params"])


def ddp_bucket_bytes(params: int, gpus: int) -> int:
    """DDP (accelerate's, ``gradient_as_bucket_view=False``) keeps its own flat fp32 copy of the gradients in
    its all-reduce buckets: 4 bytes per trainable parameter, on every device, when there is more than one."""
    return 4 * params if gpus > 1 else 0


def train_device_bytes(spec: dict[str, Any], data: ShapeData, accum: int, cls_dim: int = 768,
                       use_cache: bool = True) -> tuple[int, StepMeasure, dict[str, float]]:
    """Peak device bytes of a training job with ``accum`` micro-batches per step: the measured step at the
    per-device micro-batch batch_size / gpus / accum, + DDP buckets, + the pairing's cost matrix."""
    t = spec["train"]
    gpus = max(1, int(t.get("gpus", 0)) or 1)
    per_device = t["batch_size"] // gpus
    micro = max(1, per_device // accum)
    m = measure_train_step(spec, data, micro, accum > 1, cls_dim, use_cache)
    _, pair_bytes = _measurable_spec(spec)
    cost = pair_bytes * (t["batch_size"] // accum) ** 2  # global micro-batch², float32 cost + one copy
    ddp = ddp_bucket_bytes(m.params, gpus)
    terms = {"measured step peak (MemTracker)": m.peak_bytes / GB, "DDP gradient buckets": ddp / GB,
             "pairing cost matrix": cost / GB}
    return m.peak_bytes + ddp + cost, m, terms


def choose_grad_accum(spec: dict[str, Any], gpu_mem_gb: float, headroom: float = 0.10,
                      data: ShapeData | None = None, config: dict[str, Any] | None = None,
                      cls_dim: int | None = None, use_cache: bool = True) -> int:
    """The smallest power-of-two gradient accumulation (dividing the per-device batch) whose planned peak
    per device fits ``gpu_mem_gb`` with ``headroom`` to spare (10 %: the CUDA context and the caching
    allocator's fragmentation come on top of what tensors hold). For ``train.grad_accum: auto``.

    ``data``: the shapes (default: from ``config``, or from the spec alone for image latents). Raises
    ValueError when even one sample per device does not fit."""
    if data is None:
        data = _spec_shape_data(spec, config)
    if cls_dim is None:
        cls_dim = _spec_cls_dim(spec)
    t = spec["train"]
    gpus = max(1, int(t.get("gpus", 0)) or 1)
    per_device = t["batch_size"] // gpus
    budget = gpu_mem_gb * GB * (1 - headroom)
    accum = 1
    while accum <= per_device:
        if per_device % accum == 0:
            need, _, _ = train_device_bytes(spec, data, accum, cls_dim, use_cache)
            if need <= budget:
                return accum
        accum *= 2
    raise ValueError(f"{spec.get('name', 'experiment')}: even one sample per device needs more than "
                     f"{gpu_mem_gb:g} GB x {1 - headroom:.2f}")


def device_grad_accum(spec: dict[str, Any], headroom: float = 0.10) -> tuple[int, str]:
    """What ``train.grad_accum: auto`` is on this machine, and a line saying why: on a GPU,
    :func:`choose_grad_accum` for that GPU's memory (the same measurement as the plan, cached, so the plan and
    the run agree); without one, 1 (no device memory to fit). Under torchrun each process asks for its own
    LOCAL_RANK GPU (equal GPUs give equal answers)."""
    import os

    import torch

    if not torch.cuda.is_available():
        return 1, "train.grad_accum auto: 1 (no GPU, nothing to fit)"
    props = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0")))
    mem = props.total_memory / GB
    n = choose_grad_accum(spec, mem, headroom)
    return n, (f"train.grad_accum auto: {n} (the planned peak per device fits the {mem:.1f} GB of {props.name} "
               f"with {headroom:.0%} headroom)")


def _spec_cls_dim(spec: dict[str, Any]) -> int:
    ds = spec.get("dataset", {})
    if ds.get("kind") in IMAGE_KINDS and "encoder" in ds:
        return encoder_geometry(ds["encoder"], ds["resolution"]).cls_dim
    return 2


def _spec_shape_data(spec: dict[str, Any], config: dict[str, Any] | None) -> ShapeData:
    """Shapes from a resolved spec (its ``dataset`` holds the encoder); classes and caption shapes from the
    config when given (else 1000 classes and CLIP's 77 x 768 tokens)."""
    if config is not None:
        facts = {spec["data"]: dataset_facts(config, spec["data"])} if spec["dataset"]["kind"] in IMAGE_KINDS else {}
        return shape_data(config, spec, facts)
    ds = spec["dataset"]
    if ds["kind"] not in IMAGE_KINDS:
        return ShapeData((2,), 8, None, 1)
    geo = encoder_geometry(ds["encoder"], ds["resolution"])
    text = (77, 768) if spec.get("conditioning") == "text" else None
    return ShapeData(geo.spatial, 1000, text, 1)


# ---- the plan -------------------------------------------------------------------------------------------------


@dataclass
class Entry:
    """The plan of one job (the JSON has one per job)."""

    rule: str
    what: str
    dataset: str | None
    experiment: str | None
    gpus: int
    gpu_mem_gb: float | None      # peak per device (None: no GPU)
    host_mem_gb: float
    disk_gb: float                # written by the job (its outputs; temporary files counted at their peak)
    flops: float
    hours: float
    precision: str                # the arithmetic the hours assume
    bound: str                    # what the hours are limited by (compute, decode, read, write, negligible)
    requested: dict[str, Any]
    local: bool = False
    grad_accum: int | None = None         # train: the accumulation the plan uses
    grad_accum_configured: int | None = None
    flags: list[str] = field(default_factory=list)
    terms: dict[str, dict[str, float]] = field(default_factory=dict)  # named terms: gpu / host / disk (GB)
    notes: list[str] = field(default_factory=list)


def _gb(x: float) -> float:
    return round(float(x) / GB, 3)


class _Facts(dict):
    """Image datasets' :class:`DatasetFacts` by name, each read (:func:`dataset_facts`) when first asked for."""

    def __init__(self, config: dict[str, Any], images: dict[str, int] | None) -> None:
        super().__init__()
        self.config, self.images = config, images

    def __missing__(self, name: str) -> DatasetFacts:
        self[name] = dataset_facts(self.config, name, self.images)
        return self[name]


class Planner:
    """Builds the plan of a config; see the module docstring."""

    def __init__(self, config: dict[str, Any], gpu_mem_gb: float = 80.0, throughput: Throughput = Throughput(),
                 io: IOAssumptions = IOAssumptions(), profile: Profile | None = None,
                 rules: dict[str, dict[str, Any]] | None = None, images: dict[str, int] | None = None,
                 use_cache: bool = True, headroom: float = 0.10, dopri5_nfe: int = 100, progress: Any = None,
                 lazy_facts: bool = False):
        from sourceflow.config import resolve_experiments

        self.config = config
        self.specs = resolve_experiments(config)
        self.gpu_mem_gb, self.tp, self.io = gpu_mem_gb, throughput, io
        self.profile = profile or Profile.load()
        self.rules = rules if rules is not None else rule_resources()
        self.use_cache, self.headroom, self.dopri5_nfe = use_cache, headroom, dopri5_nfe
        self.progress = progress or (lambda msg: None)
        self.facts = _Facts(config, images)
        if not lazy_facts:  # every image dataset's size now (the plan reports them all); lazy: when first used
            for name, ds in config["datasets"].items():
                if ds["kind"] in IMAGE_KINDS:
                    self.facts[name]
        self._train_plans: dict[str, dict[str, Any]] = {}

    # -- helpers
    def ds(self, name: str) -> dict[str, Any]:
        return self.config["datasets"][name]

    def geo(self, dataset: str, encoder: str) -> EncoderGeometry:
        return encoder_geometry(self.ds(dataset)["encoders"][encoder], self.ds(dataset)["resolution"])

    def rows(self, dataset: str, encoder: str) -> int:
        return self.facts[dataset].images * (2 if self.ds(dataset)["encoders"][encoder].get("flips") else 1)

    def hours_of(self, flops: float, gpus: int, precision: str) -> float:
        if gpus and precision != "cpu":
            return flops / (gpus * self.tp.flops_per_s(precision)) / 3600
        return flops / (self.tp.cpu_tflops * 1e12) / 3600

    def plan(self) -> list[Entry]:
        out = []
        for job in enumerate_jobs(self.config, self.specs):
            self.progress(f"{job.rule} {job.what}")
            e = getattr(self, f"_{job.rule}")(job)
            e.local = job.local
            if e.gpus == 0 and e.precision in ("bf16", "tf32", "fp32", "fp64"):
                e.precision = "cpu"  # timed at Throughput.cpu_tflops
            plan_values = {"gpu": e.gpus, "mem_mb": int(math.ceil(e.host_mem_gb * 1000)),
                           "runtime": int(math.ceil(e.hours * 60))}
            if job.rule == "latent_stats":
                enc = self.ds(job.dataset)["encoders"][job.encoder]
                plan_values["mem_mb"] = latent_stats_mem_mb(self.geo(job.dataset, job.encoder).spatial,
                                                            enc["stats_batch_rows"])
            elif job.rule == "build_spatial_gmm":
                plan_values["mem_mb"] = build_spatial_gmm_mem_mb(self._gmm(job)["memory_budget_mb"])
            elif job.rule == "train":
                plan_values["mem_mb"] = self.train_mem_mb(job.experiment)
            e.requested = {"local": True} if job.local else requested(job, self.profile, self.rules, plan_values)
            self._flag(e)
            out.append(e)
        return out

    def _flag(self, e: Entry) -> None:
        if e.local:
            return
        r = e.requested
        if e.gpu_mem_gb is not None and e.gpu_mem_gb > self.gpu_mem_gb:
            e.flags.append(f"GPU memory {e.gpu_mem_gb:.1f} GB > {self.gpu_mem_gb:g} GB per device")
        if r.get("mem_mb") is not None and e.host_mem_gb * 1000 > r["mem_mb"]:
            e.flags.append(f"host memory {e.host_mem_gb:.1f} GB > requested mem_mb {r['mem_mb']}")
        if r.get("gpu") is not None and e.gpus and r["gpu"] < e.gpus:
            e.flags.append(f"GPUs {e.gpus} > requested gpu {r['gpu']}")
        runtime = r.get("runtime")
        if runtime is not None and e.hours * 60 > runtime:
            if e.rule == "train" and self.profile.retries:
                attempts = math.ceil(e.hours * 60 / runtime)
                allowed = self.profile.retries + 1
                e.flags.append(f"runtime {e.hours:.1f} h > {runtime / 60:g} h wall time: {attempts} attempts "
                               f"(resubmitted, resuming from checkpoints/last; retries {self.profile.retries} allow "
                               f"{allowed})" + ("" if attempts <= allowed else " — NOT ENOUGH"))
            else:
                e.flags.append(f"runtime {e.hours:.1f} h > requested {runtime / 60:g} h")

    def _entry(self, job: Job, **kw: Any) -> Entry:
        base = {"rule": job.rule, "what": job.what, "dataset": job.dataset, "experiment": job.experiment, "gpus": 0,
                "gpu_mem_gb": None, "host_mem_gb": 0.0, "disk_gb": 0.0, "flops": 0.0, "hours": 0.0,
                "precision": "-", "bound": "negligible", "requested": {}}
        base.update(kw)
        return Entry(**base)

    def _gmm(self, job: Job) -> dict[str, Any]:
        for g in self.ds(job.dataset).get("gmm", []):
            if g["encoder"] == job.encoder and job.K in g["components"]:
                return g
        return {"memory_budget_mb": 16000, "max_iter": 100, "chunk_rows": 65536, "variance": "spherical"}

    def _terms(self, **groups: dict[str, float]) -> dict[str, dict[str, float]]:
        return {k: {n: round(v, 3) for n, v in g.items()} for k, g in groups.items() if g}

    # -- local rules
    def _experiment_spec(self, job: Job) -> Entry:
        return self._entry(job, notes=["written inside the Snakemake process"])

    def _all(self, job: Job) -> Entry:
        return self._entry(job, notes=["the target rule: no action"])

    # -- data, latents, GMMs, captions, reference statistics
    def _make_toy_data(self, job: Job) -> Entry:
        ds = self.ds(job.dataset)
        n = int(ds.get("n_train", 20000)) + int(ds.get("n_test", 5000))
        return self._entry(job, host_mem_gb=self.io.cpu_process_gb, disk_gb=_gb(n * 2 * 4 * 2))

    def _reference_stats(self, job: Job) -> Entry:
        n = max(s["evaluate"]["num_points"] for s in self.specs.values() if s["data"] == job.dataset)
        return self._entry(job, host_mem_gb=round(self.io.cpu_process_gb + 3 * n * n * 8 / GB, 3),
                           terms=self._terms(host={"process": self.io.cpu_process_gb,
                                                   "exact EMD cost matrices 3 x n^2 x 8 B": 3 * n * n * 8 / GB}))

    def _prepare_data(self, job: Job) -> Entry:
        ds = self.ds(job.dataset)
        n = self.facts[job.dataset].images
        workers = int(ds.get("workers", 4))
        frame = n * 300  # the manifest frame: index, path string, label, split per image
        decode = workers * 50e6  # one decoded image (up to ~16 MP RGB) per decoding thread
        host = {"process": self.io.cpu_process_gb, "manifest frame N x 300 B": frame / GB,
                "decoding threads x 50 MB": decode / GB}
        hours = n / (workers * self.io.jpeg_per_core) / 3600 if ds["kind"] != "digits" else 0.0
        disk = n * 100 + (n * 2000 if ds["kind"] == "digits" else 0)
        return self._entry(job, host_mem_gb=round(sum(host.values()), 3), disk_gb=_gb(disk), hours=hours,
                           bound="decode" if hours else "negligible", precision="-",
                           terms=self._terms(host=host, disk={"manifest N x 100 B": n * 100 / GB}),
                           notes=[f"{n} training images ({self.facts[job.dataset].source}); every image is decoded "
                                  f"once by {workers} threads at {self.io.jpeg_per_core:g}/s each"])

    def _extract_latents(self, job: Job) -> Entry:
        ds = self.ds(job.dataset)
        enc = ds["encoders"][job.encoder]
        geo = self.geo(job.dataset, job.encoder)
        rows = self.rows(job.dataset, job.encoder)
        gpus = int(enc.get("gpu", False)) * int(enc.get("processes", 1))
        procs = max(int(enc.get("processes", 1)), gpus)
        workers = int(enc.get("workers", 0))
        res = enc.get("resolution") or ds["resolution"]
        batch = int(enc.get("batch_size", 256))
        cost = encoder_costs(enc["kind"], geo, res, batch, self.use_cache)
        store = rows * geo.row_bytes
        shard = int(enc.get("shard_rows", 1024)) * 4 * (math.prod(geo.spatial) + geo.cls_dim)  # float32 buffers
        batch_bytes = batch * res * res * 3  # the loader's batches are uint8 [B, R, R, 3] (ADM crops)
        host_proc = {"process": self.io.process_gb if gpus else self.io.cpu_process_gb,
                     "two shard buffers (shard_rows x row, one being written)": 2 * shard / GB,
                     "DataLoader prefetch: workers x 4 batches x B x R^2 x 3 B (uint8)": max(workers, 1) * 4 * batch_bytes / GB,
                     "decoding worker processes": workers * self.io.cpu_process_gb}
        host = {f"{k} (x{procs} processes)" if procs > 1 else k: v * procs for k, v in host_proc.items()}
        flops = rows * cost["encode_flops"]
        t_compute = self.hours_of(flops, gpus, "fp32")
        t_decode = rows / (procs * max(workers, 1) * self.io.jpeg_per_core) / 3600
        t_write = store / (self.io.write_gbps * GB) / 3600
        hours, bound = max((t_compute, "compute"), (t_decode, "decode"), (t_write, "write"))
        gpu_mem = None
        gpu_terms: dict[str, float] = {}
        if gpus:
            gpu_terms = {"encoder forward at batch_size (fp32, no grad; measured)": cost["encode_peak"] / GB}
            gpu_mem = round(sum(gpu_terms.values()), 3)
        return self._entry(job, gpus=gpus, gpu_mem_gb=gpu_mem, host_mem_gb=round(sum(host.values()), 3),
                           disk_gb=_gb(store), flops=flops, hours=hours, precision="fp32", bound=bound,
                           terms=self._terms(gpu=gpu_terms, host=host,
                                             disk={f"store: {rows} rows x {geo.row_bytes} B": store / GB}),
                           notes=[f"{enc['kind']}: {cost['params'] / 1e6:.0f}M parameters, "
                                  f"{cost['encode_flops'] / 1e9:.1f} GFLOP per image (measured); latents "
                                  f"{geo.spatial} + CLS {geo.cls_dim}, {enc.get('dtype', 'float32')}; hours: max of compute "
                                  f"{t_compute:.2f}, decode {t_decode:.2f}, write {t_write:.2f}"])

    def _latent_stats(self, job: Job) -> Entry:
        enc = self.ds(job.dataset)["encoders"][job.encoder]
        geo = self.geo(job.dataset, job.encoder)
        rows = enc["stats_images"] or self.rows(job.dataset, job.encoder)
        mem = latent_stats_mem_mb(geo.spatial, enc["stats_batch_rows"])
        read = rows * geo.itemsize * math.prod(geo.spatial)
        hours = read / (self.io.read_gbps * GB) / 3600
        return self._entry(job, host_mem_gb=mem / 1000, disk_gb=_gb(2 * 4 * math.prod(geo.spatial)), hours=hours,
                           bound="read", terms=self._terms(host={"latent_stats_mem_mb (the rule's formula)": mem / 1000}),
                           notes=[f"{rows} rows read row-granular ({read / GB:.0f} GB)"])

    def _fit_cls_gmm(self, job: Job) -> Entry:
        g = self._gmm(job)
        k = int(job.K)
        if job.encoder == "points":
            ds = self.ds(job.dataset)
            m, d, gpus = int(ds.get("n_train", 20000)), 2, 0
        else:
            m = self.facts[job.dataset].images
            d = self.geo(job.dataset, job.encoder).cls_dim
            gpus = int(self.ds(job.dataset)["encoders"][job.encoder].get("gpu", False))
        chunk = min(int(g.get("chunk_rows", 65536)), m)
        iters = int(g.get("max_iter", 100))
        # per EM iteration: the [n, 2D+1] x [2D+1, K] log-density product and the [K, n] x [n, 2D+1]
        # statistics product; k-means++ init: (2 + ln K) candidate distances per centre over all rows
        flops = iters * 4.0 * m * k * (2 * d + 1) + 2.0 * m * d * k * (2 + math.log(k))
        data = m * d * 4
        work = 3 * chunk * k * 8 + 2 * (2 * d + 1) * k * 8 + chunk * (2 * d + 1) * 8
        host = {"process": self.io.process_gb if gpus else self.io.cpu_process_gb,
                "CLS rows M x D x 4 B": data / GB, "labels / index M x 16 B": m * 16 / GB}
        if not gpus:
            host["EM chunk (3 x chunk x K + 2 x (2D+1) x K) x 8 B"] = work / GB
        gpu_terms = {"CLS rows M x D x 4 B": data / GB,
                     "EM chunk (3 x chunk x K + 2 x (2D+1) x K) x 8 B": work / GB} if gpus else {}
        out = k * (2 * d + 1) * 8 + m * 8
        return self._entry(job, gpus=gpus, gpu_mem_gb=round(sum(gpu_terms.values()), 3) if gpus else None,
                           host_mem_gb=round(sum(host.values()), 3), disk_gb=_gb(out), flops=flops,
                           hours=self.hours_of(flops, gpus, "fp64"), precision="fp64", bound="compute",
                           terms=self._terms(gpu=gpu_terms, host=host),
                           notes=[f"K={k}, {m} x {d} rows, {iters} iterations: 4 M K (2D+1) FLOPs each, float64 (the "
                                  "rule passes no --dtype; --dtype float32 with the bf16 screen would run on "
                                  "tensor cores)"])

    def _cls_posteriors(self, job: Job) -> Entry:
        k, top = int(job.K), int(job.topk)
        rows = self.rows(job.dataset, job.encoder)
        d = self.geo(job.dataset, job.encoder).cls_dim
        gpus = int(self.ds(job.dataset)["encoders"][job.encoder].get("gpu", False))
        batch = 4096  # the stage's --batch-rows default
        from sourceflow.gmm.kmeans import default_chunk_rows

        chunk = min(batch, default_chunk_rows(max(k, 2 * d + 1)))  # iter_posteriors' chunks
        flops = 2.0 * rows * k * (2 * d + 1)
        table = rows * top * 8 + rows * 8  # modes int32 + probs float32, and the float64 residual
        work = {"GMM terms (2D+1) x K x 8 B": (2 * d + 1) * k * 8 / GB,
                "posterior chunk (log-density, softmax, top-k) 3 x chunk x K x 8 B": 3 * chunk * k * 8 / GB}
        host = {"process": self.io.process_gb if gpus else self.io.cpu_process_gb,
                "CLS batch (store rows, float32)": batch * d * 4 / GB, "table N x k x 8 B + residual N x 8 B": table / GB,
                "CLS GMM float64 (means, variances K x D x 8 B)": 2 * k * d * 8 / GB}
        if not gpus:
            host.update(work)
        return self._entry(job, gpus=gpus, gpu_mem_gb=round(sum(work.values()), 3) if gpus else None,
                           host_mem_gb=round(sum(host.values()), 3), disk_gb=_gb(rows * top * 8), flops=flops,
                           hours=self.hours_of(flops, gpus, "fp64"), precision="fp64", bound="compute",
                           terms=self._terms(gpu=work if gpus else {}, host=host),
                           notes=[f"p(k | CLS) of {rows} rows x K={k} modes, 2 (2D+1) FLOPs each, float64; top-{top} kept"])

    def _build_spatial_gmm(self, job: Job) -> Entry:
        g = self._gmm(job)
        k = int(job.K)
        geo = self.geo(job.dataset, job.encoder)
        d = math.prod(geo.spatial)
        m = self.facts[job.dataset].images
        flips = bool(self.ds(job.dataset)["encoders"][job.encoder].get("flips"))
        acc = k * d * 8 * (1 if g.get("variance", "spherical") == "spherical" else 2)
        on_disk = acc > g["memory_budget_mb"] * 1e6 * 1.048576
        batch_rows = 256  # the stage's --batch-rows default (the rule does not set it)
        batch = batch_rows * d * (4 + 8 + (16 if flips else 0))
        host = {"process": self.io.cpu_process_gb,
                ("accumulators K x D x 8 B (on disk: memmap)" if on_disk else "accumulators K x D x 8 B"):
                    0.0 if on_disk else acc / GB,
                "batch: 256 rows x D x (4 read + 8 float64" + (" + 16 flipped copy)" if flips else ")"): batch / GB,
                "output blocks (256 modes x D x 8 B x 2)": 256 * d * 16 / GB}
        out = k * d * 4 + k * 8 * 2
        disk = {"spatial GMM K x D x 4 B": out / GB}
        if on_disk:
            disk["temporary memmap accumulators"] = acc / GB
        read = m * 4 * d
        hours = read / (self.io.read_gbps * GB) / 3600
        return self._entry(job, host_mem_gb=round(sum(host.values()), 3), disk_gb=round(sum(disk.values()), 3),
                           hours=hours, bound="read", terms=self._terms(host=host, disk=disk),
                           notes=[f"reads the {m} unflipped rows once ({read / GB:.0f} GB)"])

    def _align_captions(self, job: Job) -> Entry:
        n = self.facts[job.dataset].images
        return self._entry(job, host_mem_gb=round(self.io.cpu_process_gb + n * 1500 / GB, 3), disk_gb=_gb(n * 150),
                           terms=self._terms(host={"process": self.io.cpu_process_gb,
                                                   "caption JSONL + manifest frames N x 1500 B": n * 1500 / GB}))

    def _embed_captions(self, job: Job) -> Entry:
        te = self.ds(job.dataset)["captions"]["text_encoders"][job.text_encoder]
        n = self.facts[job.dataset].images
        length = int(te.get("max_length", 77))
        width, params = TEXT_ENCODERS[te["kind"]]
        gpus = int(te["kind"] == "clip")
        flops = 2.0 * params * length * n
        store = n * (length * width * 4 + length + width * 4 + 8)
        chunk = min(1024, n) * length * width * 4
        host = {"process": self.io.process_gb if gpus else self.io.cpu_process_gb,
                "token chunks in flight (2 x 1024 x L x E x 4 B)": 2 * chunk / GB}
        t_write = store / (self.io.write_gbps * GB) / 3600
        t_compute = self.hours_of(flops, gpus, "fp32")
        hours, bound = max((t_compute, "compute"), (t_write, "write"))
        gpu = {"text encoder + batch (estimate: params x 4 B x 2)": params * 8 / GB} if gpus else {}
        return self._entry(job, gpus=gpus, gpu_mem_gb=round(sum(gpu.values()), 3) if gpus else None,
                           host_mem_gb=round(sum(host.values()), 3), disk_gb=_gb(store), flops=flops, hours=hours,
                           precision="fp32", bound=bound,
                           terms=self._terms(gpu=gpu, host=host, disk={f"tokens N x {length} x {width} x 4 B + mask, "
                                                                         "pooled, index": store / GB}))

    def _train_feature_net(self, job: Job) -> Entry:
        ds = self.ds(job.dataset)
        n = self.facts[job.dataset].images
        images = n * 3 * ds["resolution"] ** 2 * 4
        return self._entry(job, host_mem_gb=round(self.io.cpu_process_gb + images / GB, 3), disk_gb=0.01,
                           terms=self._terms(host={"process": self.io.cpu_process_gb,
                                                   "images in memory N x 3 x R^2 x 4 B": images / GB}))

    def _reference_features(self, job: Job) -> Entry:
        ds = self.ds(job.dataset)
        if job.features == "adm":
            return self._entry(job, host_mem_gb=round(self.io.cpu_process_gb + 4 * 2048 * 2048 * 8 / GB, 3),
                               disk_gb=_gb(4 * 2048 * 2048 * 8),
                               notes=["copies mu, sigma, mu_s, sigma_s of the ADM batch (never its arr_0)"])
        ref = ds.get("reference", {})
        n = self.facts[job.dataset].images
        gpus = int(job.features == "inception")
        flops = n * (INCEPTION_FLOPS if job.features == "inception" else 1e7)
        batch = int(ref.get("batch_size", 256))
        host = {"process": self.io.process_gb if gpus else self.io.cpu_process_gb,
                "features N x 2048 x 8 B": n * 2048 * 8 / GB,
                "image batch B x 3 x 299^2 x 4 B": batch * 3 * 299 * 299 * 4 / GB}
        t_decode = n / (self.io.jpeg_per_core * int(ds.get("workers", 4))) / 3600
        hours, bound = max((self.hours_of(flops, gpus, "fp32"), "compute"), (t_decode, "decode"))
        gpu = {"Inception + batch activations (estimate)": (INCEPTION_PARAMS * 4 + batch * 40e6) / GB} if gpus else {}
        return self._entry(job, gpus=gpus, gpu_mem_gb=round(sum(gpu.values()), 3) if gpus else None,
                           host_mem_gb=round(sum(host.values()), 3), disk_gb=_gb(2 * 2048 * 2048 * 8), flops=flops,
                           hours=hours, precision="fp32", bound=bound, terms=self._terms(gpu=gpu, host=host))

    # -- runs
    def train_plan(self, exp: str) -> dict[str, Any]:
        """Measured device memory of ``exp``'s training at the configured accumulation and at
        :func:`choose_grad_accum`'s, and the accumulation the plan uses (cached per experiment)."""
        if exp in self._train_plans:
            return self._train_plans[exp]
        spec = self.specs[exp]
        data = shape_data(self.config, spec, self.facts)
        cls_dim = _spec_cls_dim(spec)
        t = spec["train"]
        gpus = int(t.get("gpus", 0))
        conf = t.get("grad_accum", 1)
        conf_n = conf if isinstance(conf, int) else None
        self.progress(f"  measuring {exp}: {spec['model'].get('size', spec['model']['kind'])}, "
                      f"{t['batch_size'] // max(gpus, 1) // (conf_n or 1)} samples per device")
        out: dict[str, Any] = {"configured": conf, "data": data, "cls_dim": cls_dim}
        if conf_n is None and not gpus:
            conf_n = 1  # auto without GPUs trains with 1 (sourceflow.plan.device_grad_accum)
        if conf_n is not None:
            need, m, terms = train_device_bytes(spec, data, conf_n, cls_dim, self.use_cache)
            out.update(accum=conf_n, need=need, measure=m, terms=terms)
        if gpus and (conf_n is None or out["need"] > self.gpu_mem_gb * GB * (1 - self.headroom)):
            chosen = choose_grad_accum(spec, self.gpu_mem_gb, self.headroom, data, cls_dim=cls_dim,
                                       use_cache=self.use_cache)
            need, m, terms = train_device_bytes(spec, data, chosen, cls_dim, self.use_cache)
            out.update(configured_need=out.get("need"), accum=chosen, need=need, measure=m, terms=terms)
        self._train_plans[exp] = out
        return out

    def _data_host(self, spec: dict[str, Any], procs: int, local_batch: int) -> dict[str, float]:
        """Host bytes per process of a run's training data (see ``sourceflow.data.latent_data``): arrays that fit
        train.max_memory_mb / processes are read into memory, larger ones are read a batch at a time from Zarr
        (the rows taken plus the inner chunks Zarr decodes at once)."""
        from sourceflow.store.sharded import CHUNK_TARGET_BYTES, chunk_rows

        d = spec["data"]
        ds = self.ds(d)
        budget = spec["train"].get("max_memory_mb", 4000) / max(1, procs) * 2**20
        if ds["kind"] not in IMAGE_KINDS:
            return {"toy points": int(ds.get("n_train", 20000)) * 2 * 4 / GB}
        enc = ds["encoders"][spec["encoder"]]
        geo = self.geo(d, spec["encoder"])
        rows = self.rows(d, spec["encoder"])
        shard = int(enc.get("shard_rows", 1024))
        arrays = {"spatial latents": (rows, geo.itemsize * math.prod(geo.spatial), shard)}
        if spec["coupling"]["kind"] == "mode" and not spec["coupling"].get("posterior_topk"):
            arrays["CLS descriptors"] = (rows, geo.itemsize * geo.cls_dim, shard)
        if spec["conditioning"] == "text":
            length, width = text_shape(self.config, spec)
            te = ds["captions"]["text_encoders"][spec["text_encoder"]]
            n = self.facts[d].images
            item = 2 if te.get("dtype") == "float16" else 4  # length: max_length, an upper bound under trim
            arrays["caption tokens"] = (n, item * length * width + length, min(int(te.get("batch_size", 256)), n))
        out: dict[str, float] = {}
        for name, (n_rows, row, shard_rows) in arrays.items():
            if n_rows * row <= budget:
                out[f"{name} in memory ({n_rows} x {row} B)"] = n_rows * row / GB
            else:
                crow = chunk_rows(shard_rows, row, CHUNK_TARGET_BYTES)
                chunks = min(self.io.zarr_concurrency, local_batch)
                out[f"{name} streamed: 2 x {local_batch} rows + {chunks} chunks of {crow} rows"] = (
                    2 * local_batch * row + chunks * crow * row) / GB
        return out

    def train_host(self, exp: str, accum: int | None = None, step_peak_bytes: int | None = None
                   ) -> tuple[dict[str, float], float]:
        """Host memory of ``exp``'s training job: its named terms (GB) and their total. Per process: the process,
        the training data (:meth:`_data_host`), GMM means kept on the host, the CLS GMM and posterior table,
        LOOM's seed cache; once: the larger of the spatial GMM means every process reads before moving them to
        its GPU and rank 0's checkpoint copy; on the CPU the training step itself (``step_peak_bytes``).
        ``accum=None`` takes the configured grad_accum, or 1 for ``auto`` (the largest micro-batch: an upper
        bound). The train rule's mem_mb is this total (:func:`train_mem_mb`), so it needs no fake step."""
        spec = self.specs[exp]
        t = spec["train"]
        gpus = int(t.get("gpus", 0))
        procs = gpus if gpus else int(t.get("processes", 1))
        if accum is None:
            accum = t.get("grad_accum", 1) if isinstance(t.get("grad_accum", 1), int) else 1
        data = shape_data(self.config, spec, self.facts)
        cls_dim = _spec_cls_dim(spec)
        params, model_params = param_counts(spec, data, cls_dim, self.use_cache)
        local_batch = t["batch_size"] // max(procs, 1) // accum
        image = self.ds(spec["data"])["kind"] in IMAGE_KINDS
        per_proc = {"process": self.io.process_gb if gpus else self.io.cpu_process_gb}
        per_proc.update(self._data_host(spec, procs, local_batch))
        startup: dict[str, float] = {}
        if spec["source"]["kind"] == "gmm" and image:
            k = int(spec["source"]["components"])
            d = math.prod(data.event_shape)
            if gpus and spec["source"].get("means_on") == "host":  # kept in pinned host memory, not on the GPUs
                per_proc["spatial GMM means in pinned host memory (K x D x 4 B)"] = k * d * 4 / GB
            else:
                startup["spatial GMM means read before moving to the GPU (K x D x 4 B)" if gpus else
                        "spatial GMM means K x D x 4 B"] = k * d * 4 / GB
        if spec["coupling"]["kind"] == "mode":
            k = int(spec["source"]["components"])
            per_proc["CLS GMM float64 (means, variances K x D x 8 B) + posterior terms"] = 3 * k * (2 * cls_dim + 1) * 8 / GB
            if spec["coupling"].get("posterior_topk"):
                top = int(spec["coupling"]["posterior_topk"])
                per_proc[f"posterior table rows x {top} x 8 B"] = data.num_rows * top * 8 / GB
        if spec["coupling"]["kind"] == "loom":
            caches = int(spec["coupling"].get("num_caches", 1))
            per_proc[f"LOOM seed cache rows x {caches} x 8 B"] = data.num_rows * caches * 8 / GB
        ckpt_parts = {"model": 4 * model_params, "ema": 4 * params, "optimizer": 8 * params}
        host: dict[str, float] = {f"{k} (x{procs})" if procs > 1 else k: v * procs for k, v in per_proc.items()}
        save = 2 * max(ckpt_parts.values()) / GB  # rank 0: a CPU copy of the largest part + safetensors' bytes
        if gpus == 0 and step_peak_bytes is not None:
            host["training step (MemTracker peak)"] = step_peak_bytes / GB * max(procs, 1)
        steady = sum(host.values())
        load = sum(startup.values()) * max(procs, 1)
        if load > save:
            host.update({f"{k} (x{procs}, at start)" if procs > 1 else f"{k} (at start)": v * max(procs, 1)
                         for k, v in startup.items()})
        else:
            host["checkpoint on rank 0: CPU copy + serialised bytes of the largest part"] = save
        return host, steady + max(load, save)

    def train_mem_mb(self, exp: str) -> int:
        """The train rule's mem_mb for ``exp`` (:func:`train_mem_mb`)."""
        if not int(self.specs[exp]["train"].get("gpus", 0)):
            return CPU_TRAIN_MEM_MB
        return int(math.ceil(self.train_host(exp)[1] * 1000))

    def _train(self, job: Job) -> Entry:
        spec = self.specs[job.experiment]
        t = spec["train"]
        gpus = int(t.get("gpus", 0))
        procs = gpus if gpus else int(t.get("processes", 1))
        tp = self.train_plan(job.experiment)
        m: StepMeasure = tp["measure"]
        accum = tp["accum"]
        precision = train_precision(spec) if gpus else "cpu"
        flops = m.flops_per_sample * t["batch_size"] * t["steps"]
        local_batch = t["batch_size"] // max(procs, 1) // accum
        host, host_gb = self.train_host(job.experiment, accum, m.peak_bytes)
        ckpt = 4 * m.model_params + 12 * m.params  # model, EMA (+ a learned source), AdamW's two moments
        if spec["coupling"]["kind"] == "loom":
            ckpt += tp["data"].num_rows * int(spec["coupling"].get("num_caches", 1)) * 8
        final = 4 * m.params + 8 * (int(spec["source"].get("components", 0)) if spec["regularizers"].get("focal_gamma") else 0)
        disk = {"checkpoints/last (model, EMA, AdamW state) x 2 while swapped": 2 * ckpt / GB,
                "model.safetensors (EMA weights + method state)": final / GB}
        gpu_mem = None
        gpu_terms: dict[str, float] = {}
        if gpus:
            gpu_terms = dict(tp["terms"])
            gpu_terms.update({f"  of which {k}": v / GB for k, v in m.breakdown.items() if k != "Total" and v})
            gpu_mem = round(tp["need"] / GB, 3)
        notes = [f"{m.params / 1e6:.1f}M trainable parameters; {m.flops_per_sample / 1e12:.3f} TFLOP per sample "
                 f"(forward {m.forward_flops_per_sample / 1e12:.3f}, backward/forward "
                 f"{m.backward_flops / max(m.forward_flops, 1):.2f}); {t['batch_size']} x {t['steps']} steps",
                 f"micro-batch {local_batch} per device x {accum} accumulation (configured: {tp['configured']})"]
        if tp.get("configured_need") is not None:
            notes.append(f"the configured grad_accum {tp['configured']} needs {tp['configured_need'] / GB:.1f} GB per "
                         f"device; grad_accum {accum} (choose_grad_accum, {self.headroom:.0%} headroom) fits")
        if m.attention_scores_bytes:
            notes.append(f"a math attention kernel would add {m.attention_scores_bytes / GB:.2f} GB of saved softmax "
                         "scores (not counted: the GPU's fused kernels keep none)")
        e = self._entry(job, gpus=gpus, gpu_mem_gb=gpu_mem, host_mem_gb=round(host_gb, 3),
                        disk_gb=round(sum(disk.values()), 3), flops=flops, hours=self.hours_of(flops, gpus, precision),
                        precision=precision, bound="compute", grad_accum=accum,
                        grad_accum_configured=tp["configured"] if isinstance(tp["configured"], int) else None,
                        terms=self._terms(gpu=gpu_terms, host=host, disk=disk), notes=notes)
        if tp.get("configured_need") is not None:
            e.flags.append(f"configured grad_accum {tp['configured']}: {tp['configured_need'] / GB:.1f} GB per device "
                           f"> {self.gpu_mem_gb:g} GB - {self.headroom:.0%}; plan uses grad_accum {accum}")
        return e

    def _guide_specs(self, spec: dict[str, Any]) -> list[dict[str, Any]]:
        g = spec["sample"].get("autoguidance")
        if g is None:
            return []
        name = self.specs[g["experiment"]].get("model_from") or g["experiment"]
        return [self.specs[name]]

    def _velocity_flops(self, spec: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        """Forward FLOPs per sample of one guided velocity evaluation and the fake forward's measurement."""
        data = shape_data(self.config, spec, self.facts)
        specs = [self.specs[spec.get("model_from") or spec["name"]], *self._guide_specs(spec)]
        batch = int(spec["sample"]["batch_size"])
        payload = {"specs": [{k: s.get(k) for k in TRAIN_KEYS} for s in specs], "data": asdict(data) | {"num_rows": 0},
                   "batch": batch}
        fw = _cached("forward", payload, lambda: run_fake_forward(specs, data, batch, _spec_cls_dim(spec)),
                     self.use_cache)
        per = sum(fw["flops"])
        if spec["sample"].get("guidance_scale", 1.0) != 1.0:
            per += fw["flops"][0]  # classifier-free guidance evaluates the model twice
        return per, fw

    def _sample_like(self, job: Job, n_total: int, nfe_entries: list[tuple[int, int]], decode: bool
                     ) -> tuple[Entry, dict[str, Any]]:
        spec = self.specs[job.experiment]
        train_exp = spec.get("model_from") or job.experiment
        train_gpus = int(self.specs[train_exp]["train"].get("gpus", 0))
        if job.rule == "sample":  # sample.gpus (default train.gpus: the experiment's node), as the rule asks
            own = spec["sample"].get("gpus")
            gpus = int(train_gpus if own is None else own)
            precision = spec["sample"].get("precision", "fp32")
        else:  # reflow_pairs: one GPU, fp32
            gpus, precision = min(train_gpus, 1), "fp32"
        image = self.ds(job.dataset)["kind"] in IMAGE_KINDS
        per, fw = self._velocity_flops(spec)
        flops = sum(n * nfe for n, nfe in nfe_entries) * per
        dec_terms: dict[str, float] = {}
        gpu_terms = {"velocity model(s) + method buffers + one guided evaluation at sample.batch_size "
                     "(fp32, no grad; measured)": fw["peak"] / GB}
        if image and decode:
            enc = self.ds(job.dataset)["encoders"][spec["encoder"]]
            geo = self.geo(job.dataset, spec["encoder"])
            cost = encoder_costs(enc["kind"], geo, enc.get("resolution") or self.ds(job.dataset)["resolution"],
                                 int(spec["sample"]["batch_size"]), self.use_cache)
            flops += n_total * cost["decode_flops"]
            if cost["decode_peak"]:
                vel_act = fw["peak"] - fw["resident"]
                dec_act = cost["decode_peak"] - 4 * cost["params"]
                gpu_terms["decoder: its parameters + what its activations add over the velocity's (measured)"] = (
                    4 * cost["params"] + max(0, dec_act - vel_act)) / GB
            dec_terms["decode"] = cost["decode_flops"]
        # the decoder's FLOPs run fp32 whatever the velocity model's precision (sourceflow.sampling.at_precision)
        dec_flops = n_total * dec_terms["decode"] if dec_terms else 0.0
        hours = self.hours_of(flops - dec_flops, gpus, precision) + self.hours_of(dec_flops, gpus, "fp32")
        e = self._entry(job, gpus=gpus, gpu_mem_gb=round(sum(gpu_terms.values()), 3) if gpus else None, flops=flops,
                        hours=hours, precision=precision, bound="compute",
                        terms=self._terms(gpu=gpu_terms if gpus else {}))
        return e, {"per": per, "fw": fw, "dec": dec_terms}

    def _sample(self, job: Job) -> Entry:
        from sourceflow.config import sweep_entries

        spec = self.specs[job.experiment]
        s = spec["sample"]
        entries = [(n, nfe_of(solver, steps, self.dopri5_nfe)) for _, solver, steps, n in sweep_entries(s)]
        n_total = sum(n for n, _ in entries)
        e, info = self._sample_like(job, n_total, entries, decode=True)
        image = self.ds(job.dataset)["kind"] in IMAGE_KINDS
        host = {"process": self.io.process_gb if e.gpus else self.io.cpu_process_gb}
        disk: dict[str, float] = {}
        if image:
            geo = self.geo(job.dataset, spec["encoder"])
            res = self.ds(job.dataset)["resolution"]
            shard = int(s["shard_rows"])
            host["one shard: latents shard_rows x D x 4 B + images shard_rows x R^2 x 3"] = (
                shard * math.prod(geo.spatial) * 4 + shard * res * res * 3) / GB
            if spec["source"]["kind"] == "gmm":
                host["spatial GMM means read before moving to the GPU"] = (
                    int(spec["source"]["components"]) * math.prod(geo.spatial) * 4 / GB)
            disk["samples.zarr + samples.npz: 2 x N x R^2 x 3 per entry"] = 2 * n_total * res * res * 3 / GB
        else:
            disk["samples N x 2 x 4 B"] = n_total * 2 * 4 / GB
        e.host_mem_gb = round(sum(host.values()), 3)
        e.disk_gb = round(sum(disk.values()), 3)
        e.terms.update(self._terms(host=host, disk=disk))
        e.notes.append(f"{len(entries)} sweep entries, {n_total} samples, NFE {[nfe for _, nfe in entries]}; "
                       f"{info['per'] / 1e12:.3f} TFLOP per sample per evaluation (model"
                       + (" + guide" if self._guide_specs(spec) else "") + f"), velocity at {s['precision']} "
                       f"(sample.precision), decoder fp32, over {e.gpus} GPU(s)")
        return e

    def _reflow_pairs(self, job: Job) -> Entry:
        spec = self.specs[job.experiment]
        rf = spec["reflow"]
        base = dict(self.specs[rf["experiment"]])
        n = int(rf.get("num_pairs", 20000))
        nfe = nfe_of(rf.get("solver", "dopri5"), rf.get("steps"), self.dopri5_nfe)
        fake_job = Job("reflow_pairs", dataset=job.dataset, experiment=rf["experiment"], seed=job.seed)
        e, _ = self._sample_like(fake_job, n, [(n, nfe)], decode=False)
        e.what, e.experiment = job.what, job.experiment
        d = math.prod(shape_data(self.config, base, self.facts).event_shape)
        pairs = 2 * n * d * 4
        e.host_mem_gb = round(self.io.cpu_process_gb + 2 * pairs / GB, 3)
        e.disk_gb = _gb(pairs)
        e.terms.update(self._terms(host={"process": self.io.cpu_process_gb, "pairs x0, x1 (N x D x 4 B) x 2": 2 * pairs / GB},
                                   disk={"reflow_pairs.safetensors": pairs / GB}))
        return e

    def _evaluate(self, job: Job) -> Entry:
        from sourceflow.config import sweep_entries

        spec = self.specs[job.experiment]
        ev = spec["evaluate"]
        train_exp = spec.get("model_from") or job.experiment
        gpus = min(int(self.specs[train_exp]["train"].get("gpus", 0)), 1)
        entries = sweep_entries(spec["sample"])
        if self.ds(job.dataset)["kind"] not in IMAGE_KINDS:
            n = int(ev.get("num_points", 5000))
            host = {"process": self.io.cpu_process_gb, "exact EMD: 3 x n^2 x 8 B": 3 * n * n * 8 / GB}
            return self._entry(job, host_mem_gb=round(sum(host.values()), 3), disk_gb=0.001,
                               terms=self._terms(host=host))
        n_eval = sum(n for *_, n in entries if n >= ev.get("min_samples", 500))
        n_max = max(n for *_, n in entries)
        flops = n_eval * INCEPTION_FLOPS if ev["features"] in ("inception", "adm") else n_eval * 1e7
        batch = int(ev.get("batch_size", 500))
        k = int(ev.get("prdc_k", 3))
        host = {"process": self.io.process_gb if gpus else self.io.cpu_process_gb,
                "features of one entry N x 2048 x 8 B (+ reference)": 2 * n_max * 2048 * 8 / GB,
                "image batch B x 3 x 299^2 x 4 B": batch * 3 * 299 * 299 * 4 / GB,
                f"precision/recall k-NN distances (blocks of 1024 x N x 4 B x {k})": 1024 * n_max * 4 * k / GB}
        gpu = {"Inception + batch activations (estimate)": (INCEPTION_PARAMS * 4 + batch * 40e6) / GB} if gpus else {}
        return self._entry(job, gpus=gpus, gpu_mem_gb=round(sum(gpu.values()), 3) if gpus else None,
                           host_mem_gb=round(sum(host.values()), 3), disk_gb=0.001, flops=flops,
                           hours=self.hours_of(flops, gpus, "fp32"), precision="fp32", bound="compute",
                           terms=self._terms(gpu=gpu, host=host))

    def _report(self, job: Job) -> Entry:
        """The report's peak is its largest image sample grid (``sourceflow.report.image_grid_png``): per image
        dataset with runs, rows = its experiments, columns = its sweep entries (at most 6) + the real images;
        each cell a tile of grid_images images, ``side = ceil(sqrt(grid_images))`` to a side, (side (R + 1) + 1)
        px square, enlarged by ``sourceflow.report.grid_scale`` (nearest) as uint8 RGB. The figure keeps every tile; drawing one costs
        :data:`GRID_RENDER_BYTES_PER_PX` per tile pixel more. One grid at a time (each figure is closed)."""
        from sourceflow.config import sweep_entries
        from sourceflow.report import grid_scale, grid_tile_px

        gi = int(self.config.get("report", {}).get("grid_images", 36))
        host = {"process": self.io.cpu_process_gb}
        grids: dict[str, tuple[float, float]] = {}
        for d in self.facts:
            exps = [s for s in self.specs.values() if s["data"] == d]
            if not exps:
                continue
            cols = min(6, len({tag for s in exps for tag, *_ in sweep_entries(s["sample"])})) + 1
            tile = grid_tile_px(gi, self.ds(d)["resolution"])
            px = (tile * grid_scale(tile)) ** 2
            grids[f"{d}: {len(exps)} x {cols} tiles of {math.isqrt(px)}^2 px x 3 B"] = (len(exps) * cols * 3 * px / GB,
                                                                                      GRID_RENDER_BYTES_PER_PX * px / GB)
        if grids:
            name, (tiles, render) = max(grids.items(), key=lambda kv: sum(kv[1]))
            host[f"sample grid {name}"] = tiles
            host[f"drawing one tile: {GRID_RENDER_BYTES_PER_PX} B per tile pixel"] = render
        return self._entry(job, host_mem_gb=round(sum(host.values()), 3), disk_gb=0.05, terms=self._terms(host=host))


def plan_config(config: dict[str, Any], **kw: Any) -> list[Entry]:
    """The plan of a loaded config (see :class:`Planner` for the keywords)."""
    return Planner(config, **kw).plan()


# ---- output -------------------------------------------------------------------------------------------------

JSON_KEYS = ("rule", "what", "dataset", "experiment", "gpus", "gpu_mem_gb", "host_mem_gb", "disk_gb", "flops",
             "hours", "precision", "bound", "requested", "local", "grad_accum", "grad_accum_configured", "flags",
             "terms", "notes")


def to_json(entries: list[Entry], planner: Planner, config_path: str) -> dict[str, Any]:
    import torch

    return {"config": str(config_path),
            "assumptions": {"throughput": asdict(planner.tp), "throughput_text": planner.tp.describe(),
                            "io": asdict(planner.io), "io_text": planner.io.describe(),
                            "gpu_mem_gb": planner.gpu_mem_gb, "headroom": planner.headroom,
                            "dopri5_nfe": planner.dopri5_nfe, "profile": planner.profile.path,
                            "retries": planner.profile.retries, "torch": torch.__version__,
                            "datasets": {k: asdict(v) for k, v in planner.facts.items()}},
            "jobs": [{k: getattr(e, k) for k in JSON_KEYS} | {"experiment": e.experiment or e.what}
                     for e in entries]}


def _fmt(x: float | None, digits: int = 1) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    if abs(x) < 10 ** -digits:
        return f"{x:.1g}"
    return f"{x:.{digits}f}"


def _req(e: Entry, key: str, scale: float = 1.0) -> str:
    v = e.requested.get(key)
    if v is None:
        return "-"
    mark = "*" if "function" in e.requested.get("source", {}).get(key, "") else ""
    return f"{round(v / scale, 2):g}{mark}"


def format_table(entries: list[Entry], planner: Planner) -> str:
    """The plan as a text table (local jobs folded into one line) with the assumptions and the flags."""
    head = ["rule", "job", "GPUs", "GPU GB/dev", "host GB", "req GB", "disk GB", "PFLOP", "hours", "req h",
            "prec", "bound", "ok"]
    rows = []
    local = [e for e in entries if e.local]
    for e in entries:
        if e.local:
            continue
        gpu = _fmt(e.gpu_mem_gb)
        if e.grad_accum and e.grad_accum > 1:
            gpu += f" (acc {e.grad_accum})"
        rows.append([e.rule, e.what, str(e.gpus), gpu, _fmt(e.host_mem_gb), _req(e, "mem_mb", 1000),
                     _fmt(e.disk_gb), _fmt(e.flops / 1e15, 2), _fmt(e.hours, 2), _req(e, "runtime", 60),
                     e.precision, e.bound, "FLAG" if e.flags else "ok"])
    if local:
        by_rule: dict[str, int] = {}
        for e in local:
            by_rule[e.rule] = by_rule.get(e.rule, 0) + 1
        rows.append(["(local)", ", ".join(f"{r} x{n}" for r, n in by_rule.items()), "0", "-", "-", "-", "0", "0", "0",
                     "-", "-", "in Snakemake", "ok"])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    out = [*lines, "",
           f"assumptions: {planner.tp.describe()}; {planner.io.describe()}; device {planner.gpu_mem_gb:g} GB "
           f"(grad_accum chosen with {planner.headroom:.0%} headroom); dopri5 {planner.dopri5_nfe} NFE",
           f"requests: {planner.profile.path} (set-resources > the rule's resources > default-resources); "
           "* = a rule function, evaluated by the plan's formula; GB = 1e9 bytes, mem_mb = 1e6 bytes",
           "datasets: " + "; ".join(f"{k} {v.images} images, {v.classes} classes ({v.source})"
                                    for k, v in planner.facts.items())]
    flagged = [e for e in entries if e.flags]
    if flagged:
        out += ["", "flags:"]
        out += [f"  {e.rule} {e.what}: {f}" for e in flagged for f in e.flags]
    return "\n".join(out)
