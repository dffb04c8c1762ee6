"""Guidance as velocity combinators: each takes velocities and returns a velocity, so any solver can
use it unchanged. Both published forms are the same extrapolation v_weak + w·(v_strong − v_weak):

* classifier-free guidance (Ho & Salimans 2022): strong = v(x|c), weak = v(x|∅);
* autoguidance (Karras et al. 2024): strong = the main model, weak = a smaller / less-trained guide
  model on the same condition (MM-FM uses w = 1.5 with a DiT-DH-S guide).
"""

from __future__ import annotations

import torch

from sourceflow.flow.solvers import Velocity


def extrapolate(strong: Velocity, weak: Velocity, scale: float) -> Velocity:
    """v = v_weak + scale·(v_strong − v_weak); scale 1 returns ``strong`` (one NFE per call)."""
    if scale == 1.0:
        return strong

    def v(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        vw = weak(t, x)
        return vw + scale * (strong(t, x) - vw)

    return v


def cfg(conditional: Velocity, unconditional: Velocity, scale: float) -> Velocity:
    """Classifier-free guidance."""
    return extrapolate(conditional, unconditional, scale)


def autoguidance(main: Velocity, guide: Velocity, scale: float) -> Velocity:
    """Autoguidance with a weaker guide model."""
    return extrapolate(main, guide, scale)
