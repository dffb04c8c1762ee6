"""The training loop, under accelerate: one process, or several under ``torchrun`` (NCCL on GPU,
gloo on CPU with ``ACCELERATE_USE_CPU=1``).

Determinism and resume. Every random draw of step s comes from generators seeded by
(seed, step, stream[, rank]) and the data order is a function of (seed, epoch), so a run resumed
from a checkpoint at step s replays exactly the draws an uninterrupted run makes after s: on CPU the
final weights are bitwise identical. The checkpoint holds the model, the EMA, the method state
(LOOM's seed cache, C2OT's w, CSFM's source network) and the optimizer.

Data parallelism. Each step takes a global batch of ``batch_size`` dataset indices; process r
loads rows [r·b, (r+1)·b) of it (the data are sharded). Methods that couple across the batch (OT,
LOOM, C2OT) gather the global batch, compute the same assignment on every process and each keeps
its own rows; so LOOM's cache stays identical on every process.

Stop signals. SIGUSR1, SIGTERM and SIGURG (the one SLURM sends before the wall time, see
profiles/slurm) make the loop finish the current step, checkpoint and end the process with
``EXIT_INTERRUPTED``: a failed attempt for Snakemake, whose resubmission resumes exactly from there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from sourceflow.flow.couplings import Batch, mean_coupling_cost
from sourceflow.flow.method import Method, Objective
from sourceflow.io import atomic_path, log_timings, save_safetensors, write_json
from sourceflow.progress import bar as progress_bar
from sourceflow.train.batches import resolve_workers, step_rows, to_device
from sourceflow.train.checkpoint import load_checkpoint, save_checkpoint
from sourceflow.train.ema import EMA
from sourceflow.train.schedule import Schedule


@dataclass
class TrainSettings:
    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    betas: tuple[float, float]
    warmup_steps: int
    ema_decay: float
    grad_clip: float
    checkpoint_every: int
    log_every: int
    mixed_precision: str = "no"
    lr_schedule: str | dict[str, Any] = "constant"
    min_lr: float = 0.0
    grad_accum: int = 1
    grad_accum_auto: bool = False  # chosen for this device (train.grad_accum: auto): a resume keeps the checkpoint's
    ema_schedule: dict[str, Any] | None = None
    ema_warmup: bool = True
    pair_batch: int | None = None
    epoch_size: int | None = None  # samples per epoch (images; flipped copies are not extra); None: the rows
    trackers: tuple[str, ...] = ()  # accelerate trackers beside the JSONL log: tensorboard, wandb
    nonfinite: str = "stop"  # a step with a non-finite loss or gradient: stop, or skip it (up to max_skipped_steps)
    max_skipped_steps: int = 10
    loader_workers: int | str = "auto"  # processes reading ahead (sourceflow.train.batches); auto: for streamed data
    loader_prefetch: int = 4  # steps each worker reads ahead

    @classmethod
    def from_spec(cls, train: dict[str, Any], epoch_size: int | None = None,
                  grad_accum: int | None = None) -> TrainSettings:
        """Settings of a spec's ``train`` section; ``epoch_size`` (samples per epoch) converts epoch
        schedules to steps when the spec does not fix ``train.epoch_size``; ``grad_accum``: what
        ``train.grad_accum: auto`` resolved to on this device (:func:`sourceflow.plan.device_grad_accum`)."""
        auto = train.get("grad_accum", 1) == "auto"
        if auto and grad_accum is None:
            raise ValueError("train.grad_accum is auto: resolve it for the device first (sourceflow.plan.device_grad_accum)")
        accum = grad_accum if auto else train.get("grad_accum", 1)
        return cls(train["steps"], train["batch_size"], train["lr"], train["weight_decay"], tuple(train["betas"]),
                   train["warmup_steps"], train["ema_decay"], train["grad_clip"], train["checkpoint_every"],
                   train["log_every"], train.get("mixed_precision", "no"), train.get("lr_schedule", "constant"),
                   train.get("min_lr", 0.0), accum, auto, train.get("ema_schedule"),
                   train.get("ema_warmup", True), train.get("pair_batch"), train.get("epoch_size") or epoch_size,
                   tuple(t for t in train.get("trackers", ()) if t != "jsonl"), train.get("nonfinite", "stop"),
                   train.get("max_skipped_steps", 10), train.get("loader", {}).get("workers", "auto"),
                   train.get("loader", {}).get("prefetch", 4))  # the schema's defaults (no default object there)

    def __post_init__(self) -> None:
        if isinstance(self.lr_schedule, dict):
            sched = Schedule.from_config(self.lr_schedule)
            if abs(sched.points[0][1] - self.lr) > 1e-12 * max(1.0, self.lr):
                raise ValueError(f"train.lr ({self.lr}) must equal the first value of train.lr_schedule "
                                 f"({sched.points[0][1]})")
        elif self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r} (constant, cosine or {{unit, points}})")
        if self.pair_batch is not None and self.pair_batch % self.batch_size:
            raise ValueError(f"train.pair_batch ({self.pair_batch}) must be a multiple of train.batch_size "
                             f"({self.batch_size})")
        k = self.pairing_steps
        if k > 1 and (self.checkpoint_every % k or self.steps % k):
            raise ValueError(f"train.checkpoint_every ({self.checkpoint_every}) and train.steps ({self.steps}) must be "
                             f"multiples of pair_batch / batch_size = {k} (a resume restarts at a pairing boundary)")

    @property
    def pairing_steps(self) -> int:
        """Steps that share one coupling problem: pair_batch / batch_size (the C2OT harness: 1024 / 256 = 4)."""
        return 1 if self.pair_batch is None else self.pair_batch // self.batch_size

    def steps_per_epoch(self, num_data: int) -> float:
        return (self.epoch_size or num_data) / self.batch_size

    def lr_at(self, step: int, num_data: int = 0) -> float:
        """Learning rate of (0-based) ``step``: linear warm-up times constant, cosine to ``min_lr``, or a
        piecewise schedule (in steps or epochs of ``num_data`` rows unless ``epoch_size`` is set)."""
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        if isinstance(self.lr_schedule, dict):
            base = Schedule.from_config(self.lr_schedule).at_step(step, self.steps_per_epoch(num_data))
        elif self.lr_schedule == "cosine":
            progress = max(0, step - self.warmup_steps) / max(1, self.steps - 1 - self.warmup_steps)
            base = self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        else:
            base = self.lr
        return base * warm

    def ema_decay_at(self, step: int, num_data: int = 0) -> float:
        """EMA decay after (0-based) ``step``: ``ema_decay``, or the piecewise ``ema_schedule``."""
        if self.ema_schedule is None:
            return self.ema_decay
        return Schedule.from_config(self.ema_schedule).at_step(step, self.steps_per_epoch(num_data))


def step_generator(seed: int, step: int, stream: str, rank: int = 0) -> torch.Generator:
    """A CPU generator that is a pure function of (seed, step, stream, rank)."""
    digest = hashlib.blake2b(f"{seed}/{step}/{stream}/{rank}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


class BatchPlan:
    """Global batch indices of every step: slices of per-epoch permutations, never crossing an epoch.

    An epoch is cut into ``num_data // chunk`` chunks (the last incomplete one is dropped, as a
    DataLoader with ``drop_last``), so a chunk never holds a datapoint twice: LOOM's seed cache would
    duplicate one seed and lose another. A chunk is one coupling problem (``chunk`` = pair_batch,
    default the batch) and is consumed by ``chunk // batch_size`` consecutive steps.
    """

    def __init__(self, num_data: int, batch_size: int, seed: int, chunk: int | None = None):
        chunk = chunk or batch_size
        if chunk > num_data:
            raise ValueError(f"batch_size / pair_batch {chunk} exceeds the dataset size {num_data}")
        if chunk % batch_size:
            raise ValueError(f"pair_batch {chunk} is not a multiple of batch_size {batch_size}")
        self.n, self.b, self.seed, self.chunk = num_data, batch_size, seed, chunk
        self.per_epoch = num_data // chunk
        self.k = chunk // batch_size
        self._perm: dict[int, torch.Tensor] = {}

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perm:
            self._perm = {epoch: torch.randperm(self.n, generator=step_generator(self.seed, epoch, "epoch")),
                          **{e: p for e, p in self._perm.items() if e == epoch - 1}}
        return self._perm[epoch]

    def chunk_indices(self, c: int) -> torch.Tensor:
        """Dataset indices of chunk ``c`` (distinct)."""
        epoch, w = divmod(c, self.per_epoch)
        return self._permutation(epoch)[w * self.chunk:(w + 1) * self.chunk]

    def indices(self, step: int) -> torch.Tensor:
        """Global batch indices of ``step``: slice ``step % k`` of chunk ``step // k``."""
        c, j = divmod(step, self.k)
        return self.chunk_indices(c)[j * self.b:(j + 1) * self.b]


@dataclass
class ArrayDataset:
    """Rows of an in-memory dataset: x, the condition the method uses, optional global descriptors."""

    x: torch.Tensor
    cond: torch.Tensor | None = None
    cls: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def rows(self, idx: torch.Tensor) -> Batch:
        """Rows ``idx`` where they are (CPU for stores; see ``sourceflow.train.batches``)."""
        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[idx]

        return Batch(self.x[idx], idx, pick(self.cond), pick(self.cls))

    def batch(self, idx: torch.Tensor, device: torch.device) -> Batch:
        b = self.rows(idx)
        return to_device((b.x1, b.idx, b.cond, b.cls), device)


def _gather_batch(acc: Accelerator, b: Batch) -> Batch:
    def g(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else acc.gather(t.contiguous())

    return Batch(g(b.x1), g(b.idx), g(b.cond), g(b.cls))


def state_digest(parts: dict[str, dict[str, torch.Tensor]], optimizer: dict[str, Any]) -> str:
    """SHA-256 over every tensor of the training state (name, dtype, shape, bytes) and the optimizer's groups:
    equal on every process of a run, and recorded in each checkpoint (``state_sha256``)."""
    h = hashlib.sha256()

    def add(name: str, t: torch.Tensor) -> None:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")

    for part in sorted(parts):
        for k in sorted(parts[part]):
            add(f"{part}.{k}", parts[part][k])
    for pid in sorted(optimizer["state"]):
        for k in sorted(optimizer["state"][pid]):
            v = optimizer["state"][pid][k]
            add(f"opt.{pid}.{k}", v if torch.is_tensor(v) else torch.tensor(v))
    h.update(json.dumps(optimizer["param_groups"], sort_keys=True, default=str).encode())
    return h.hexdigest()


def _first_nonfinite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating tensor holding NaN or inf (None if all are finite)."""
    for name, t in tensors.items():
        if torch.is_floating_point(t) and not bool(torch.isfinite(t.detach()).all()):
            return name
    return None


def _nonfinite_step(loss: float, terms: dict[str, float], named: list[tuple[str, torch.nn.Parameter]]) -> str | None:
    """What is non-finite in this step: a loss term, or the gradient of a named parameter (None: all finite).
    The gradient check is one norm over all gradients; only a non-finite norm scans for the parameter."""
    bad_terms = [f"{k}={v}" for k, v in terms.items() if not math.isfinite(v)]
    if bad_terms:
        return "loss term " + ", ".join(bad_terms)
    if not math.isfinite(loss):
        return f"loss {loss}"
    grads = [p.grad.detach() for _, p in named if p.grad is not None]
    grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.zeros(())
    if bool(torch.isfinite(grad_norm)):
        return None
    name = _first_nonfinite({n: p.grad for n, p in named if p.grad is not None})
    return f"gradient of {name}" if name else "gradient norm"


def make_accelerator(mixed_precision: str = "no", trackers: tuple[str, ...] = (),
                     project_dir: str | Path | None = None) -> Accelerator:
    """An Accelerator matching the launch: asserts that torchrun's WORLD_SIZE was honoured. ``trackers``
    (tensorboard, wandb) log under ``project_dir``; W&B runs offline unless WANDB_MODE says otherwise (the
    cluster nodes usually have no network; `wandb sync` uploads later)."""
    cuda = torch.cuda.is_available()
    from accelerate.utils import DistributedDataParallelKwargs

    if "wandb" in trackers:
        os.environ.setdefault("WANDB_MODE", "offline")
        if project_dir is not None:
            os.environ.setdefault("WANDB_DIR", str(project_dir))
    # no buffer broadcast: every buffer is either fixed (positions, the GMM source's 6.4 GB of means at
    # ImageNet scale) or kept equal by the method itself (the focal EMA sums over processes)
    acc = Accelerator(cpu=not cuda, mixed_precision=mixed_precision if cuda else "no",
                      kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
                      log_with=list(trackers) or None, project_dir=str(project_dir) if project_dir else None)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if acc.num_processes != world:
        raise ValueError(f"accelerate sees {acc.num_processes} process(es) but WORLD_SIZE={world}: on CPU launch "
                           "torchrun with ACCELERATE_USE_CPU=1, otherwise each process trains its own copy")
    return acc


def _idle_core() -> bool:
    """Whether a core is free for pairing in the background (1-minute load at most the usable cores minus
    one). Only the speed depends on it: with every core busy the extra thread made OT steps slower."""
    try:
        return os.getloadavg()[0] <= len(os.sched_getaffinity(0)) - 1
    except (AttributeError, OSError):
        return True


def _checksum(module: torch.nn.Module) -> float:
    return float(sum(p.detach().double().sum() for p in module.parameters()))


def _trim_log(path: Path, last_step: int) -> None:
    """Drop log lines after ``last_step`` (written after the checkpoint a resume starts from)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= last_step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(ln + "\n" for ln in keep))


# SIGURG: ignored by default by every process SLURM signals in a job step (the job's snakemake, its bash,
# torchrun), so it reaches the trainer without ending them first; SIGUSR1 would kill the job's snakemake.
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGURG)
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped on purpose at a checkpoint; a rerun resumes


class Interrupted(SystemExit):
    """Raised by ``train`` after it checkpointed at ``step`` on a stop signal: ends the process with
    ``EXIT_INTERRUPTED`` (non-zero, so Snakemake counts a failed attempt and retries it)."""

    def __init__(self, step: int, signame: str):
        super().__init__(EXIT_INTERRUPTED)
        self.step, self.signame = step, signame


class StopSignals:
    """Records the first stop signal while training (handlers only set a flag; the loop acts at the end
    of a step). Installed from the main thread only; the previous handlers come back on exit."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)

    def _record(self, signum: int, frame: object) -> None:
        if self.signum is None:
            self.signum = signum

    def agreed(self, acc: Accelerator, world: int) -> int | None:
        """The signal to stop on after this step, the same on every process (any process's signal stops
        all of them at one step, as a checkpoint needs); None to go on. Several processes: one gather."""
        if world == 1:
            return self.signum
        got = acc.gather(torch.tensor([self.signum or 0], device=acc.device))
        return int(got.max()) or None


def train(model: torch.nn.Module, method: Method, data: ArrayDataset, settings: TrainSettings, seed: int,
          out_dir: str | Path, run_hash: str, resume: bool = True, accelerator: Accelerator | None = None,
          progress: bool = True, stop_after: int | None = None) -> dict[str, Any]:
    """Train and write ``out_dir/{model.safetensors, train_log.jsonl, train_summary.json}``.

    ``model.safetensors`` holds the EMA weights (``model.*``) and the method state (``method.*``, with
    the EMA of a learned source). ``stop_after`` ends the process after that many steps without
    writing final outputs (for tests of the resume path; a kill does the same). A stop signal
    (``STOP_SIGNALS``) checkpoints at the end of the current step and raises ``Interrupted``.
    The files hold no timings (byte-identical across runs): the seconds since this process's start at each
    log record and the loop's total go to stdout (``sourceflow.io.log_timings``, stage "train") and into the
    returned summary's "timings" ({"seconds", "steps_per_second", "log": [[step, seconds], ...]}).
    """
    with StopSignals() as stop:
        return _train(model, method, data, settings, seed, out_dir, run_hash, resume, accelerator, progress,
                      stop_after, stop)


def _train(model: torch.nn.Module, method: Method, data: ArrayDataset, settings: TrainSettings, seed: int,
           out_dir: str | Path, run_hash: str, resume: bool, accelerator: Accelerator | None, progress: bool,
           stop_after: int | None, stop: StopSignals) -> dict[str, Any]:
    """``train``, with the stop-signal flag of its caller."""

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir, log_path = out / "checkpoints" / "last", out / "train_log.jsonl"
    acc = accelerator or make_accelerator(settings.mixed_precision, settings.trackers, out / "tracking")
    rank, world = acc.process_index, acc.num_processes
    accum = settings.grad_accum
    if settings.batch_size % (world * accum):
        raise ValueError(f"batch_size {settings.batch_size} is not divisible by {world} process(es) x {accum} "
                         "gradient-accumulation micro-batches")
    micro_b = settings.batch_size // accum
    local_b = micro_b // world
    device = acc.device
    model.to(device)
    method.to(device)
    objective = Objective(model, method)
    # the source joins the optimizer and the EMA only when it learns (CSFM); a GMM source is fixed data
    learned_source = any(p.requires_grad for p in method.source.parameters())
    trainable = torch.nn.ModuleDict({"model": model, **({"source": method.source} if learned_source else {})})
    named = [(n, p) for n, p in trainable.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    # fused AdamW: one kernel for all parameters (4x faster steps for small models on CPU, also on CUDA)
    opt = torch.optim.AdamW(params, lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay,
                            fused=all(p.dtype == torch.float32 for p in params))
    ema = EMA(trainable, settings.ema_decay, warmup=settings.ema_warmup)

    start, skipped = 0, 0  # skipped: steps dropped for non-finite values (train.nonfinite: skip), part of the state
    if resume:
        loaded = load_checkpoint(ckpt_dir, ["model", "ema", "method"])
        if loaded is not None:
            parts, opt_state, info = loaded
            if info.get("run_hash") != run_hash:
                acc.print(f"checkpoint {ckpt_dir} belongs to another configuration ({info.get('run_hash')} != "
                          f"{run_hash}); starting from scratch")
            elif int(info.get("world_size", world)) != world:
                # per-process draws and data shares depend on the number of processes: a resume with another
                # number would match neither run, so it is refused
                raise ValueError(f"{ckpt_dir} was written by {info['world_size']} process(es), this run has {world}: "
                                 f"resume with {info['world_size']}, or start over (--no-resume / delete the checkpoint)")
            else:
                model.load_state_dict(parts["model"])
                ema.load_state_dict(parts["ema"])
                method.load_state_tensors(parts["method"])
                opt.load_state_dict(opt_state)
                start = int(info["step"])
                skipped = int(info.get("skipped_steps", 0))
                if settings.grad_accum_auto and int(info.get("grad_accum", accum)) != accum:
                    # the micro-batches' random streams depend on the accumulation: keep the run's own
                    acc.print(f"train.grad_accum auto: {accum} on this device; resuming with the checkpoint's "
                              f"{info['grad_accum']}")
                    accum = int(info["grad_accum"])
                    micro_b = settings.batch_size // accum
                    local_b = micro_b // world
                acc.print(f"resuming from {ckpt_dir} at step {start}")
    if start == 0 and acc.is_main_process and log_path.exists():
        log_path.unlink()
    if acc.is_main_process:
        _trim_log(log_path, start)

    if method.focal is not None and world > 1:
        method.focal.reduce = lambda t: acc.reduce(t, "sum")
    objective, opt = acc.prepare(objective, opt)
    plan = BatchPlan(len(data), settings.batch_size, seed, settings.pair_batch)
    local = slice(rank * local_b, (rank + 1) * local_b)
    # the C2OT harness solves one coupling over pair_batch samples and trains on it batch by batch
    chunked = method.global_pairing and settings.pairing_steps > 1
    if chunked and settings.pair_batch % world:
        raise ValueError(f"pair_batch {settings.pair_batch} is not divisible by {world} process(es)")
    chunk_pair, chunk_id = None, None
    # every step's rows, read ahead (worker processes for streamed stores); chunked pairing reads its chunks itself
    workers = resolve_workers(settings.loader_workers, data)
    ahead = None if chunked else step_rows(data, plan, micro_b, local, accum, start, settings.steps, workers,
                                           settings.loader_prefetch, pin_memory=device.type == "cuda")
    if workers:
        acc.print(f"train.loader: {workers} worker process(es) reading {settings.loader_prefetch} steps ahead")

    def close_readers() -> None:
        """End the pairing thread and the reading workers (the loop ends early on a stop or an error too)."""
        if prefetch is not None:
            prefetch.shutdown(wait=True)
        if ahead is not None:
            ahead.close()
    # One process: the next chunk is paired in a background thread while this one trains (the solvers
    # release the GIL). The pairing is a pure function of (seed, chunk) and of the coupling state, which
    # only the pairing changes, in chunk order, so the weights are bitwise those of pairing in line. A
    # chunk that starts at a checkpoint is paired in line: the checkpoint holds the state after its chunk.
    # Only while a core is idle: on busy cores (other training jobs) the extra thread slowed steps down.
    prefetch = ThreadPoolExecutor(1, thread_name_prefix="pair-chunk") if chunked and world == 1 else None
    pending: dict[int, Future] = {}

    def pair_chunk(c: int, indices: torch.Tensor) -> Any:
        with torch.no_grad():
            return method.pair(data.batch(indices, device), step_generator(seed, c, "pair-chunk"))

    def save(step: int) -> None:
        acc.wait_for_everyone()
        # every process checks its own copy (the same state everywhere, so the same decision everywhere)
        bad = _first_nonfinite({**dict(trainable.named_parameters()),
                                **{f"ema.{k}": v for k, v in ema.state_dict().items()}})
        if bad is not None:  # never let a non-finite state become the last good checkpoint
            raise FloatingPointError(f"refusing to checkpoint non-finite {bad} at step {step}; the last good "
                                     f"checkpoint is kept in {ckpt_dir}")
        parts = {"model": model.state_dict(), "ema": ema.state_dict(), "method": method.state_tensors()}
        opt_state = opt.state_dict()
        digest = state_digest(parts, opt_state)
        if world > 1:  # parameters, buffers, optimizer, EMA, LOOM seeds, focal EMA, learned source: all agree
            mine = torch.tensor([int(digest[:15], 16)], dtype=torch.int64, device=device)
            every = acc.gather(mine).tolist()
            if len(set(every)) > 1:
                raise RuntimeError(f"processes disagree on the training state at step {step} (state digests by "
                                   f"rank: {[format(d, 'x') for d in every]}); not checkpointing")
        if acc.is_main_process:
            save_checkpoint(ckpt_dir, parts, opt_state, {"step": step, "run_hash": run_hash, "world_size": world,
                                                         "skipped_steps": skipped, "state_sha256": digest,
                                                         "grad_accum": accum})
        acc.wait_for_everyone()

    bar = progress_bar(total=settings.steps, initial=start, desc="train", unit="step",
                       disable=not (progress and acc.is_main_process))
    if settings.trackers:
        # one run per training directory; a resumed run logs into the same project folder
        name = f"{out.parent.name}-{out.name}" if out.name.startswith("seed") else out.name  # <experiment>-seed<N>
        acc.init_trackers(name, config={k: v for k, v in vars(settings).items() if isinstance(v, int | float | str | bool)})
    window: dict[str, list[float]] = {}
    shards_disjoint = None
    t0 = time.time()
    log_seconds: list[list[float]] = []  # [step, seconds since t0] of each log record (not in the log file)
    step = start
    for step in range(start, settings.steps):
        for group in opt.param_groups:
            group["lr"] = settings.lr_at(step, len(data))
        if chunked and chunk_id != step // plan.k:
            # one assignment for the whole chunk (identical on every process), consumed by k steps
            chunk_id = step // plan.k
            if chunk_id in pending:
                chunk_pair = pending.pop(chunk_id).result()
            elif world == 1:
                chunk_pair = pair_chunk(chunk_id, plan.chunk_indices(chunk_id))
            else:
                share = plan.chunk_indices(chunk_id).chunk(world)[rank]
                cb = data.batch(share, device)
                allidx = acc.gather(cb.idx)
                shards_disjoint = bool(torch.unique(allidx).numel() == allidx.numel() == plan.chunk)
                with torch.no_grad():
                    chunk_pair = method.pair(_gather_batch(acc, cb), step_generator(seed, chunk_id, "pair-chunk"))
            nxt = (chunk_id + 1) * plan.k
            # no prefetch once a stop signal came: the checkpoint it ends with must not hold the next chunk's pairing
            if (prefetch is not None and stop.signum is None and nxt < settings.steps and nxt % settings.checkpoint_every
                    and _idle_core()):
                pending[chunk_id + 1] = prefetch.submit(pair_chunk, chunk_id + 1, plan.chunk_indices(chunk_id + 1))
        fetched = None if ahead is None else next(ahead)
        opt.zero_grad(set_to_none=True)
        terms: dict[str, float] = {}
        loss_sum = 0.0
        for m in range(accum):
            tag = "" if accum == 1 else f"/{m}"  # one micro-batch: the same streams as before accumulation existed
            loss_gen = step_generator(seed, step, "loss" + tag, rank)
            pair = None
            if chunked:
                lo = (step % plan.k) * settings.batch_size + m * micro_b
                pair = chunk_pair.select(slice(lo, lo + micro_b)).select(local)
                batch, sel, pair_gen = None, slice(None), None
            else:
                # micro-batch m of the global batch; process r takes its share of every micro-batch
                mine = to_device(fetched[m], device)
                if shards_disjoint is None and world > 1:
                    allidx = acc.gather(mine.idx)
                    shards_disjoint = bool(torch.unique(allidx).numel() == allidx.numel() == micro_b)
                if method.global_pairing and world > 1:
                    batch, sel = _gather_batch(acc, mine), local
                else:
                    batch, sel = mine, slice(None)
                pair_gen = step_generator(seed, step, "pair" + tag, 0 if method.global_pairing else rank)
            sync = contextlib.nullcontext() if m == accum - 1 else acc.no_sync(objective)
            with sync:
                with acc.autocast():
                    loss, mterms = objective(batch, sel, pair_gen, loss_gen, pair)
                # backward even on a non-finite loss: every process must join the gradient all-reduce
                acc.backward(loss / accum if accum > 1 else loss)
            loss_sum += float(loss.detach())
            for k, v in mterms.items():
                terms[k] = terms.get(k, 0.0) + v / accum
        loss = torch.tensor(loss_sum / accum)
        # checked before clipping: a NaN norm would scale every gradient to NaN and hide the culprit
        what = _nonfinite_step(loss_sum, terms, named)
        flag = torch.tensor([0.0 if what is None else 1.0], device=device)
        if world > 1:  # every process takes the same decision (a NaN on one rank reaches the others' grads too)
            flag = acc.reduce(flag, "sum")
        if float(flag) > 0:
            what = what or "values on another process"
            skipped += 1
            if settings.nonfinite == "stop" or skipped > settings.max_skipped_steps:
                bar.close()
                close_readers()
                why = "" if settings.nonfinite == "stop" else f" ({skipped} skipped steps, max {settings.max_skipped_steps})"
                raise FloatingPointError(f"non-finite {what} at step {step}{why}; the last good checkpoint is kept in "
                                         f"{ckpt_dir} (train.nonfinite: skip skips such steps)")
            acc.print(f"skipping step {step}: non-finite {what} ({skipped} of at most {settings.max_skipped_steps})")
            opt.zero_grad(set_to_none=True)  # no optimizer step, no EMA update: the state stays the last finite one
        else:
            grad_norm = acc.clip_grad_norm_(params, settings.grad_clip) if settings.grad_clip > 0 else None
            opt.step()
            ema.update(settings.ema_decay_at(step, len(data)))
            terms["loss"] = float(loss.detach())
            if grad_norm is not None:
                terms["grad_norm"] = float(grad_norm)
            for k, v in terms.items():
                window.setdefault(k, []).append(v)
        done = step + 1
        if done % settings.log_every == 0 or done == settings.steps:
            means = {k: sum(v) / len(v) for k, v in window.items()}
            keys = sorted(means)
            red = acc.reduce(torch.tensor([means[k] for k in keys], device=device), "mean") if world > 1 else None
            if red is not None:
                means = dict(zip(keys, red.tolist(), strict=True))
            window = {}
            if acc.is_main_process:
                rec = {"step": done, "lr": opt.param_groups[0]["lr"], **means}
                with open(log_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                log_seconds.append([done, round(time.time() - t0, 3)])
                log_timings("train", step=done, seconds=log_seconds[-1][1])
                bar.set_postfix(loss=f"{means['loss']:.4f}")
            if settings.trackers:
                acc.log({"lr": opt.param_groups[0]["lr"], **means}, step=done)
        bar.update(1)
        if done % settings.checkpoint_every == 0 or done == settings.steps:
            save(done)
        if stop_after is not None and done - start >= stop_after:
            bar.close()
            close_readers()
            return {"stopped_at": done}
        signum = stop.agreed(acc, world)
        # at a pairing boundary with no pairing in flight, so that a resume re-pairs from the saved coupling state
        if signum is not None and done < settings.steps and done % plan.k == 0 and not pending:
            if done % settings.checkpoint_every:
                save(done)
            bar.close()
            close_readers()
            name = signal.Signals(signum).name
            if acc.is_main_process:
                print(f"stopped on {name} after step {done}: checkpoint in {ckpt_dir} (a rerun resumes there)",
                      file=sys.stderr, flush=True)
            raise Interrupted(done, name)
    bar.close()
    close_readers()
    if settings.trackers:
        acc.end_training()
    seconds = time.time() - t0

    # Consistency across processes: every rank must hold the same weights.
    checks = acc.gather(torch.tensor([_checksum(model)], dtype=torch.float64, device=device)).tolist()
    if max(checks) - min(checks) > 1e-9 * max(1.0, abs(checks[0])):
        raise RuntimeError(f"processes disagree on the weights after training: checksums {checks}")

    ema_model = ema.module["model"]
    ema_source = ema.module["source"] if learned_source else None
    eval_batches = [data.batch(plan.indices(settings.steps + i), device) for i in range(4)]
    with torch.no_grad():
        cost = mean_coupling_cost(method.coupling, eval_batches, method.source, step_generator(seed, -1, "cost"))
    timings = {"seconds": round(seconds, 3), "steps_per_second": round((settings.steps - start) / max(seconds, 1e-9), 2)}
    summary = {"steps": settings.steps, "resumed_from": start, "skipped_steps": skipped,
               "world_size": world, "rank_weight_checksums": checks, "shards_disjoint": shards_disjoint,
               "coupling_cost": cost, "run_hash": run_hash,
               "num_parameters": sum(p.numel() for p in model.parameters())}
    if acc.is_main_process:
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in ema_model.state_dict().items()}
        state = method.state_tensors()
        if ema_source is not None:
            state.update({f"source.{k}": v for k, v in ema_source.state_dict().items()})
        tensors.update({f"method.{k}": v.detach().cpu().contiguous() for k, v in state.items()})
        save_safetensors(out / "model.safetensors", tensors, {"run_hash": run_hash, "step": str(settings.steps)})
        write_json(out / "train_summary.json", summary)
        log_timings("train", **timings)
    acc.wait_for_everyone()
    return {**summary, "timings": {**timings, "log": log_seconds}}
