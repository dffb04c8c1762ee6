"""Straightness of sampling trajectories: kinetic energy against displacement."""

from __future__ import annotations

import numpy as np
import torch


def path_energy(traj: torch.Tensor, times: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample kinetic energy Σ_k ‖x_{k+1}−x_k‖²/Δt_k of a trajectory and its squared displacement
    ‖x_N − x_0‖².

    The energy is the discrete ∫‖v‖²dt and never below the displacement (Cauchy–Schwarz); equality
    means a straight path at constant speed. :func:`normalized_path_energy` turns the pair into the
    straightness measure of rectified flow.
    """
    steps = traj[1:] - traj[:-1]
    dt = (times[1:] - times[:-1]).reshape(-1, *([1] * (traj.dim() - 1)))
    energy = (steps.pow(2) / dt).reshape(steps.shape[0], steps.shape[1], -1).sum(-1).sum(0)
    disp = (traj[-1] - traj[0]).reshape(traj.shape[1], -1).pow(2).sum(-1)
    return energy, disp


def normalized_path_energy(energy: np.ndarray, displacement: np.ndarray) -> float:
    """E[∫‖v‖²dt] / E[‖x1 − x0‖²] − 1 over samples: 0 for straight paths.

    A ratio of means, not a mean of per-sample ratios, so samples that barely move (a source already
    close to the data, as in MM-FM) do not dominate.
    """
    return float(energy.sum() / max(float(displacement.sum()), 1e-12) - 1.0)
