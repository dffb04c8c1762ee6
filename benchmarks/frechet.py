"""Benchmark: our Fréchet distance (Cholesky / eigh + eigvalsh, float64) against the scipy ``sqrtm``
formula pytorch-fid and clean-fid use, on Inception-sized statistics (2048-d, from 3000 samples each).

Prints a markdown table (median wall time of a few repeats, speedup, relative difference of the FD
values) and the command that produced it. BLAS threads are limited with threadpoolctl.

  python benchmarks/frechet.py [--dim 2048] [--samples 3000] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def sqrtm_fd(mu1, s1, mu2, s2) -> float:
    """pytorch-fid's formula (without the removed ``disp`` argument)."""
    import scipy.linalg

    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def timed(fns, repeats: int) -> list[tuple[float, float]]:
    """(median seconds, value) per function; the repeats alternate between the functions, so load
    from other processes on a shared machine hits both alike."""
    times: list[list[float]] = [[] for _ in fns]
    values = [0.0] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            values[i] = fn()
            times[i].append(time.perf_counter() - t0)
    return [(statistics.median(t), v) for t, v in zip(times, values, strict=True)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=2048, help="feature dimension")
    p.add_argument("--samples", type=int, default=3000, help="samples behind each covariance")
    p.add_argument("--threads", type=int, default=2, help="BLAS/LAPACK threads")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per method (median reported)")
    a = p.parse_args()

    from threadpoolctl import threadpool_limits

    from sourceflow.metrics.frechet import frechet_distance

    rng = np.random.default_rng(0)
    x = rng.normal(size=(a.samples, a.dim)) * rng.uniform(0.2, 2.0, size=a.dim)
    mix = np.eye(a.dim) + rng.normal(scale=0.5 / np.sqrt(a.dim), size=(a.dim, a.dim))
    y = rng.normal(size=(a.samples, a.dim)) @ mix + 0.05
    mu1, s1, mu2, s2 = x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)

    with threadpool_limits(a.threads):
        (t_ours, fd_ours), (t_ref, fd_ref) = timed(
            [lambda: frechet_distance(mu1, s1, mu2, s2), lambda: sqrtm_fd(mu1, s1, mu2, s2)], a.repeats)

    rel = abs(fd_ours - fd_ref) / abs(fd_ref)
    cmd = "python benchmarks/frechet.py " + " ".join(sys.argv[1:])
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    print(f"Fréchet distance, {a.dim}-d statistics from {a.samples} samples, {a.threads} BLAS threads, "
          f"median of {a.repeats} ({cpu}, {os.cpu_count()} cores)\n")
    print("| method | median time (s) | FD | speedup |")
    print("|---|---:|---:|---:|")
    print(f"| scipy sqrtm(Σ1Σ2) (pytorch-fid / clean-fid) | {t_ref:.2f} | {fd_ref:.9g} | 1.0× |")
    print(f"| ours: Cholesky/eigh + eigvalsh | {t_ours:.2f} | {fd_ours:.9g} | {t_ref / t_ours:.1f}× |")
    print(f"\nrelative difference of the FD values: {rel:.1e}")
    print(f"command: {cmd.strip()}")


if __name__ == "__main__":
    main()
