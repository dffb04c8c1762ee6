"""Draw samples from a trained method: source draw (by weight for GMM modes, conditional for CSFM),
condition / guidance, ODE solve; record NFE and per-sample kinetic energy and displacement."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from sourceflow.flow.guidance import cfg
from sourceflow.flow.method import Method
from sourceflow.flow.solvers import solve
from sourceflow.metrics.paths import path_energy


@dataclass
class SampleSet:
    x: np.ndarray  # [N, ...] final samples
    x0: np.ndarray  # [N, ...] source draws
    energy: np.ndarray  # [N] ∫‖v‖²dt along each trajectory
    displacement: np.ndarray  # [N] ‖x1 − x0‖²
    nfe: int  # per sample (max over batches; equal for fixed-step solvers)
    seconds: float
    mode: np.ndarray | None = None


@torch.no_grad()
def generate(model: nn.Module, method: Method, n: int, cond: torch.Tensor | None, solver: str, steps: int | None,
             generator: torch.Generator, batch_size: int = 5000, shift: float = 1.0, rtol: float = 1e-4,
             atol: float = 1e-4, guidance_scale: float = 1.0, null_id: int | None = None,
             traj_points: int = 17) -> SampleSet:
    """Generate ``n`` samples; ``cond`` [n, ...] is the data condition of each sample (or None)."""
    model.eval()
    device = next(model.parameters()).device
    xs, x0s, energies, disps, modes, nfe = [], [], [], [], [], 0
    t0 = time.time()
    for lo in range(0, n, batch_size):
        hi = min(n, lo + batch_size)
        c = None if cond is None else cond[lo:hi].to(device)
        draw = method.source.sample(hi - lo, generator, cond=c if method.cond_from == "data" else None)
        model_cond = draw.mode if method.cond_from == "mode" else (c if method.cond_from == "data" else None)

        def v_cond(t, x, mc=model_cond):
            return model(x, t, mc)

        velocity = v_cond
        if guidance_scale != 1.0:
            if model_cond is None or null_id is None:
                raise ValueError("guidance_scale != 1 needs a class-conditional model trained with p_uncond > 0")
            null = torch.full_like(model_cond, null_id)
            velocity = cfg(v_cond, lambda t, x, nc=null: model(x, t, nc), guidance_scale)
        res = solve(velocity, draw.x0, solver, steps, shift=shift, rtol=rtol, atol=atol, return_traj=True,
                    traj_points=traj_points)
        xs.append(res.x.cpu())
        x0s.append(draw.x0.cpu())
        e, dsp = path_energy(res.traj, res.times)
        energies.append(e.cpu())
        disps.append(dsp.cpu())
        if draw.mode is not None:
            modes.append(draw.mode.cpu())
        nfe = max(nfe, res.nfe)
    return SampleSet(torch.cat(xs).numpy(), torch.cat(x0s).numpy(), torch.cat(energies).numpy(),
                     torch.cat(disps).numpy(), nfe,
                     time.time() - t0, torch.cat(modes).numpy() if modes else None)
