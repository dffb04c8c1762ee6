"""Draw samples from a trained method: source draw (by weight for GMM modes, conditional for CSFM),
condition / guidance, ODE solve; record NFE and per-sample kinetic energy and displacement."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sourceflow.flow.guidance import autoguidance, cfg
from sourceflow.flow.method import Method
from sourceflow.flow.solvers import solve
from sourceflow.metrics.paths import path_energy


@dataclass
class SampleSet:
    x: np.ndarray  # [N, ...] final samples
    x0: np.ndarray  # [N, ...] source draws
    energy: np.ndarray  # [N] ∫‖v‖²dt along each trajectory
    displacement: np.ndarray  # [N] ‖x1 − x0‖²
    nfe: float  # per sample: the mean over batches (adaptive solvers step each batch on its own, the C2OT harness
    # averages them); an int when every batch took the same number (fixed-step solvers)
    seconds: float
    mode: np.ndarray | None = None


PRECISIONS = ("fp32", "tf32", "bf16")


def at_precision(net: nn.Module, precision: str, device: torch.device) -> Callable:
    """``net(x, t, c)`` at the sample precision, returned in fp32 for the solver. Only the velocity model is
    affected: the solver's own arithmetic (dopri5's tableau products and error estimate) and the decoder stay
    fp32. bf16: autocast around the call; tf32: TF32 tensor-core matmuls and convolutions during the call
    (the global switches are restored after it); fp32, and any precision on a CPU: the call as it is."""
    if precision not in PRECISIONS:
        raise ValueError(f"sample.precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    if device.type != "cuda" or precision == "fp32":
        return net
    if precision == "bf16":
        def call(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = net(x, t, c)
            return out.float()
        return call

    def call_tf32(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            return net(x, t, c)
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    return call_tf32


@torch.no_grad()
def generate(model: nn.Module, method: Method, n: int, cond: torch.Tensor | None, solver: str, steps: int | None,
             generator: torch.Generator, batch_size: int = 5000, shift: float = 1.0, rtol: float = 1e-4,
             atol: float = 1e-4, guidance_scale: float = 1.0, null_id: int | None = None,
             traj_points: int = 17, guide: nn.Module | None = None, guide_scale: float = 1.5,
             t_end: float = 1.0, precision: str = "fp32") -> SampleSet:
    """Generate ``n`` samples; ``cond`` [n, ...] is the data condition of each sample (or None).

    ``guidance_scale`` != 1: classifier-free guidance against the null condition. ``guide``: autoguidance
    v_guide + guide_scale·(v − v_guide) with a weaker model on the same condition. Either way the
    source draw (CSFM: the conditional source sample) is shared by both branches. ``nfe`` counts
    velocity evaluations (a guided one runs two models). ``t_end``: the grid ends at shift(t_end)
    (RAE / MM-FM / CSFM: 0.999). ``precision``: the velocity models' arithmetic on a GPU (:func:`at_precision`).
    """
    if guide is not None and guidance_scale != 1.0:
        raise ValueError("use either classifier-free guidance (guidance_scale) or autoguidance (guide), not both")
    model.eval()
    if guide is not None:
        guide.eval()
    device = next(model.parameters()).device
    net = at_precision(model, precision, device)
    guide_net = None if guide is None else at_precision(guide, precision, device)
    xs, x0s, energies, disps, modes, nfes = [], [], [], [], [], []
    t0 = time.time()
    for lo in range(0, n, batch_size):
        hi = min(n, lo + batch_size)
        c = None if cond is None else cond[lo:hi].to(device)
        draw = method.source.sample(hi - lo, generator, cond=c if method.cond_from == "data" else None, device=device)
        model_cond = draw.mode if method.cond_from == "mode" else (c if method.cond_from == "data" else None)

        def v_cond(t, x, mc=model_cond):
            return net(x, t, mc)

        velocity = v_cond
        if guidance_scale != 1.0:
            if model_cond is None or null_id is None:
                raise ValueError("guidance_scale != 1 needs a class-conditional model trained with p_uncond > 0")
            null = torch.full_like(model_cond, null_id)
            velocity = cfg(v_cond, lambda t, x, nc=null: net(x, t, nc), guidance_scale)
        elif guide is not None:
            velocity = autoguidance(v_cond, lambda t, x, mc=model_cond: guide_net(x, t, mc), guide_scale)
        res = solve(velocity, draw.x0, solver, steps, shift=shift, rtol=rtol, atol=atol, return_traj=True,
                    traj_points=traj_points, t_end=t_end)
        xs.append(res.x.cpu())
        x0s.append(draw.x0.cpu())
        e, dsp = path_energy(res.traj, res.times)
        energies.append(e.cpu())
        disps.append(dsp.cpu())
        if draw.mode is not None:
            modes.append(draw.mode.cpu())
        nfes.append(res.nfe)
    return SampleSet(torch.cat(xs).numpy(), torch.cat(x0s).numpy(), torch.cat(energies).numpy(),
                     torch.cat(disps).numpy(), nfes[0] if len(set(nfes)) == 1 else float(np.mean(nfes)),
                     time.time() - t0, torch.cat(modes).numpy() if modes else None)


# ---- image samples: a resumable, row-sharded Zarr store per sweep entry --------------------------------

SAMPLE_DTYPES = {"images": "uint8", "cond_row": "int64", "label": "int64", "mode": "int64", "energy": "float32",
                 "displacement": "float32", "latents": "float32"}


def sample_store_arrays(n: int, resolution: int, latent_shape: tuple[int, ...] | None) -> dict[str, tuple]:
    """Arrays of a sample store: ``images`` uint8 [N, R, R, 3] (what FID reads), ``cond_row`` (the dataset
    row whose condition the sample used, -1 none), ``label`` (that row's class, -1), ``mode`` (the GMM mode,
    -1), per-trajectory ``energy`` and ``displacement``, and optionally the generated ``latents``."""
    arrays = {"images": ((n, resolution, resolution, 3), "uint8")}
    arrays.update({k: ((n,), SAMPLE_DTYPES[k]) for k in ("cond_row", "label", "mode", "energy", "displacement")})
    if latent_shape is not None:
        arrays["latents"] = ((n, *latent_shape), "float32")
    return arrays


def write_sample_store(path: Path, identity: dict, arrays: dict[str, tuple], shard_rows: int,
                       make_shard: Callable[[int, int, int], dict[str, np.ndarray]], rank: int = 0, world: int = 1,
                       barrier: Callable[[], None] = lambda: None, progress: bool = True,
                       max_shards: int | None = None) -> str:
    """Fill the sample store at ``path`` shard by shard. Returns ``"complete"`` on rank 0 once the store is
    complete, ``"written"`` on the other ranks, ``"stopped"`` after ``max_shards``.

    ``make_shard(s, a, b)`` returns rows [a, b) of every array and must be a pure function of ``s``
    (seeded by the shard), so a resumed or re-split run writes the same bytes. A store with another
    ``identity`` (model, settings) is deleted first. Process r writes the shards s ≡ r (mod world); all
    processes must call this (it synchronises with ``barrier``). ``max_shards``: stop after writing that
    many shards per process, as a kill would (for tests of the resume path; every process stops then).
    """
    import shutil

    from sourceflow.progress import bar
    from sourceflow.store.sharded import ShardedWriter, create_sharded_group, jsonable

    path = Path(path)
    if rank == 0:
        if path.exists():
            import zarr

            stored = dict(zarr.open_group(str(path), mode="r").attrs)
            if {k: stored.get(k) for k in jsonable(identity)} != jsonable(identity):
                shutil.rmtree(path)
        if not path.exists():
            create_sharded_group(path, arrays, shard_rows, identity)
        ShardedWriter(path, list(arrays)).clean_partial_files()
    barrier()
    writer = ShardedWriter(path, list(arrays))
    complete = bool(writer.attrs.get("complete", False))
    pending = [] if complete else writer.pending_shards()  # the same list on every rank (after the barrier)
    mine = [s for s in pending if s % world == rank]
    # every rank decides the same: stop if any rank has more than max_shards to write
    if max_shards is not None and any(len([s for s in pending if s % world == r]) > max_shards for r in range(world)):
        for s in mine[:max_shards]:
            writer.write_shard(s, make_shard(s, *writer.shard_range(s)))
        return "stopped"
    for s in bar(mine, desc=f"sample {path.parent.name}", unit="shard", disable=not progress or not mine):
        a, b = writer.shard_range(s)
        writer.write_shard(s, make_shard(s, a, b))
    barrier()
    if rank != 0:
        return "written"
    if not complete:
        problems = writer.file_problems()
        if problems:
            raise RuntimeError(f"{path}: sample store incomplete after every process finished: {problems[0]}")
        writer.mark_complete()
    return "complete"


RESAMPLE = "delete it and rerun the sample stage"


def open_sample_store(path: str | Path) -> dict[str, Any]:
    """The arrays of a complete sample store (``samples.zarr``), each a :class:`GuardedArray`: damaged metadata,
    a missing chunk file or a chunk that fails to decode becomes one error naming the store; an incomplete
    store is refused (Zarr would read its unwritten shards as zeros)."""
    import zarr

    from sourceflow.io import reading
    from sourceflow.store.sharded import GuardedArray, check_chunk_files

    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise FileNotFoundError(f"sample store not found: {path} (run the sample stage)")
    with reading(path / "zarr.json", "Zarr group metadata (sample store)", RESAMPLE):
        g = zarr.open_group(str(path), mode="r")
        if not g.attrs.get("complete", False):
            raise ValueError(f"{path} is incomplete (re-run the sample stage)")
    arrays = {}
    for name, _ in sorted(g.arrays()):
        with reading(path / name / "zarr.json", "Zarr array metadata (sample store)", RESAMPLE):
            arrays[name] = GuardedArray(g[name], path / name, "Zarr array of the sample store (a chunk file)", RESAMPLE)
    check_chunk_files(path, g, "the sample store", RESAMPLE)
    return arrays
