"""Exponential moving average of a module's parameters, with warm-up.

torch's ``AveragedModel`` walks the module tree on every update (2.4 ms a step for the toy MLP,
15 % of the step); this keeps flat parameter lists and does one ``_foreach_lerp_``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Shadow copy of ``module`` updated as θ̄ ← d·θ̄ + (1−d)·θ with d_n = min(decay, (1+n)/(10+n)).

    Without the warm-up a 0.999 EMA of a 2000-step run still carries e^-2 ≈ 14 % of the initial
    weights. ``warmup=False`` uses the decay as given from the first update (MM-FM / RAE: a plain EMA
    with a per-epoch decay schedule). ``n`` is part of the state, so a resumed run continues the same
    schedule.
    """

    def __init__(self, module: nn.Module, decay: float, warmup: bool = True):
        self.decay = decay
        self.warmup = warmup
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        self._src = [p for p in module.parameters()]
        self._dst = [p for p in self.module.parameters()]
        self.n = 0

    @torch.no_grad()
    def update(self, decay: float | None = None) -> None:
        """One EMA step with ``decay`` (default: the constructor's; a schedule passes each step's)."""
        d = self.decay if decay is None else decay
        if self.warmup:
            d = min(d, (1.0 + self.n) / (10.0 + self.n))
        torch._foreach_lerp_(self._dst, [p.detach() for p in self._src], 1.0 - d)
        self.n += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.module.state_dict(), "__ema_updates__": torch.tensor(self.n, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        self.n = int(state.pop("__ema_updates__"))
        self.module.load_state_dict(state)
