"""Counter-based random numbers keyed by per-sample integer seeds.

LOOM-CFM stores one integer seed per (datapoint, cache slot) and regenerates that datapoint's noise
from it every time the datapoint is visited. A ``torch.Generator`` per sample would do, but costs a
generator and a kernel launch per row; hashing (seed, element index) with SplitMix64 gives the whole
batch in a few vectorised integer ops, the same numbers on CPU and GPU, and no state to save.
"""

from __future__ import annotations

import math

import torch

_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)  # SplitMix64 constants as signed int64
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser on int64 tensors (wrapping arithmetic), a bijection of 64-bit words."""
    z = x + _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def _bits(seeds: torch.Tensor, count: int, stream: int) -> torch.Tensor:
    """``count`` hashed 64-bit words per seed: word j of seed s is H(H(s) + stream·2^32 + j)."""
    seeds = seeds.to(torch.int64).reshape(-1, 1)
    counter = torch.arange(count, device=seeds.device, dtype=torch.int64) + (stream << 32)
    return splitmix64(splitmix64(seeds) + counter.reshape(1, -1))


def seeded_uniform(seeds: torch.Tensor, count: int, stream: int = 0) -> torch.Tensor:
    """Uniforms in (0, 1), shape [n, count], float64, a pure function of (seed, stream, index)."""
    mantissa = _shr(_bits(seeds, count, stream), 11).to(torch.float64)  # 53 random bits
    return (mantissa + 0.5) * 2.0**-53


def seeded_normal(seeds: torch.Tensor, shape: tuple[int, ...], stream: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normals of shape [n, *shape] by Box–Muller on :func:`seeded_uniform`."""
    numel = math.prod(shape)
    half = (numel + 1) // 2
    u = seeded_uniform(seeds, 2 * half, stream)
    r = torch.sqrt(-2.0 * torch.log(u[:, :half]))
    theta = 2.0 * math.pi * u[:, half:]
    z = torch.cat([r * torch.cos(theta), r * torch.sin(theta)], dim=1)[:, :numel]
    return z.to(dtype).reshape(-1, *shape)


def normal_on(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str | None) -> torch.Tensor:
    """Standard normals of ``shape`` on ``device`` from a CPU ``generator``.

    On CPU (or without a generator) they are the generator's own next numbers. On an accelerator they are
    drawn there, by a generator seeded with one 62-bit draw of ``generator``: an ImageNet step's source noise
    is [128, 768, 16, 16] = 25M numbers per GPU, ~0.1 s of CPU time and a 100 MB host-to-device copy per step
    if drawn on the host. Still a pure function of ``generator``'s state, so resumes stay exact.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cpu" or generator is None:
        return torch.randn(shape, generator=generator).to(device)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.randn(shape, generator=torch.Generator(device=device).manual_seed(seed), device=device)
