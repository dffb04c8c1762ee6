"""Exact W2² between equal-size point clouds: POT's network simplex (``ot.emd2``) against a linear
assignment (``scipy.optimize.linear_sum_assignment``), on the toy evaluation's own cases.

With uniform weights and equal sizes an optimal plan is a permutation matrix (Birkhoff–von Neumann), so
both solvers return the same exact value; which one is faster is a measurement. Cases: the held-out moons
against a second draw (the data floor), and against generated-like clouds from close to the data to the
8-Gaussian source (a one-step Euler sample of a poor model), at each ``--sizes`` on one thread.

    python benchmarks/w2_exact.py --sizes 2000,5000 --out /tmp/w2_exact.md
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sourceflow.data.toy import sample  # noqa: E402
from sourceflow.metrics.wasserstein import w2_squared  # noqa: E402  (the evaluation's emd2)
from sourceflow.rehearsal import machine  # noqa: E402


def cases(n: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Reference moons and the clouds compared with it (all float64 [n, 2])."""
    g = torch.Generator().manual_seed(0)
    ref = sample("moons", n, g).x.double().numpy()
    other = sample("moons", n, g).x.double().numpy()
    src = sample("8gaussians", n, g).x.double().numpy()
    noise = torch.randn(n, 2, generator=g, dtype=torch.float64).numpy()
    return {"data floor (two moons draws)": (other, ref),
            "near (moons + N(0, 0.1²))": (other + 0.1 * noise, ref),
            "mid (moons + N(0, 0.5²))": (other + 0.5 * noise, ref),
            "far (halfway to the 8 Gaussians)": (0.5 * (other + src), ref),
            "source (the 8 Gaussians)": (src, ref)}


def lsa(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist
    cost = cdist(a, b, "sqeuclidean")
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].mean())


def timed(fn, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    t0 = time.perf_counter()
    v = fn(a, b)
    return v, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="2000,5000", help="comma-separated point counts (each cloud)")
    p.add_argument("--out", default=None, help="also write the markdown table to this file")
    a = p.parse_args()
    import ot  # imported before timing: its ~3 s import is not the solver's
    import scipy
    import scipy.optimize  # noqa: F401

    rows = ["| n | case | W2² | emd2 s | assignment s | speed-up | |Δ| |", "|---:|---|---:|---:|---:|---:|---:|"]
    for n in (int(s) for s in a.sizes.split(",")):
        for name, (x, y) in cases(n).items():
            v1, t1 = timed(w2_squared, x, y)
            v2, t2 = timed(lsa, x, y)
            rows.append(f"| {n} | {name} | {v1:.5f} | {t1:.2f} | {t2:.2f} | {t1 / t2:.2f}x | {abs(v1 - v2):.1e} |")
            print(rows[-1], flush=True)
    head = (f"- command: `python benchmarks/w2_exact.py {' '.join(sys.argv[1:])}`\n- machine: {machine()}; one thread; "
            f"POT {ot.__version__}, scipy {scipy.__version__}, numpy {np.__version__}\n- date: {time.strftime('%Y-%m-%d')}")
    text = "\n".join([head, "", *rows]) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
