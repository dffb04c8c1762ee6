"""ODE solvers for sampling: fixed-grid euler / heun / midpoint on a (shifted) time grid and adaptive
dopri5, all through torchdiffeq. Every solve reports its true number of function evaluations."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torchdiffeq import odeint

from sourceflow.flow.time import time_grid

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (t [B], x) -> v

FIXED = {"euler": "euler", "heun": "heun2", "midpoint": "midpoint"}
ADAPTIVE = {"dopri5": "dopri5"}
SOLVERS = (*FIXED, *ADAPTIVE)


@dataclass
class SolveResult:
    """Final samples, the number of velocity evaluations and (on request) the states at ``times``."""

    x: torch.Tensor
    nfe: int
    times: torch.Tensor
    traj: torch.Tensor | None = None  # [len(times), B, ...]


class _Counted(torch.nn.Module):
    """Wraps a velocity for torchdiffeq: broadcasts scalar t to the batch and counts calls."""

    def __init__(self, velocity: Velocity):
        super().__init__()
        self.velocity = velocity
        self.nfe = 0

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        return self.velocity(t.expand(x.shape[0]).to(x.dtype), x)


@torch.no_grad()
def solve(velocity: Velocity, x0: torch.Tensor, solver: str = "euler", steps: int | None = None,
          shift: float = 1.0, rtol: float = 1e-4, atol: float = 1e-4, return_traj: bool = False,
          traj_points: int = 17, t_end: float = 1.0) -> SolveResult:
    """Integrate dx/dt = v(t, x) from t=0 (source) to t=1 (data).

    Fixed-grid solvers take ``steps`` steps on the grid ``time_grid(steps, shift, t_end=t_end)`` (heun and
    midpoint cost 2 NFE per step; RAE's "50 steps" are 50 grid points: steps=49, t_end=0.999); ``dopri5``
    is adaptive with ``rtol``/``atol``, ignores ``steps`` and integrates to ``shift(t_end)``. With
    ``return_traj`` the states at every grid point (fixed) or at ``traj_points`` uniform times
    (dopri5, from its dense output, at no extra NFE) are returned.
    """
    f = _Counted(velocity)
    if solver in FIXED:
        if steps is None or steps < 1:
            raise ValueError(f"solver {solver!r} needs steps >= 1, got {steps}")
        times = time_grid(steps, shift, dtype=x0.dtype, t_end=t_end).to(x0.device)
        traj = odeint(f, x0, times, method=FIXED[solver])
    elif solver in ADAPTIVE:
        end = float(time_grid(1, shift, t_end=t_end)[-1])
        times = torch.linspace(0, end, traj_points if return_traj else 2, dtype=x0.dtype, device=x0.device)
        traj = odeint(f, x0, times, method=ADAPTIVE[solver], rtol=rtol, atol=atol)
    else:
        raise ValueError(f"unknown solver {solver!r}; choose from {list(SOLVERS)}")
    return SolveResult(traj[-1], f.nfe, times, traj if return_traj else None)
