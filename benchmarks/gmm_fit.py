"""Benchmark: chunked torch EM (sourceflow.gmm.em) against scikit-learn's GaussianMixture (diag).

Both start from the SAME initial parameters (our k-means++ seed rows turned into sklearn's one-hot init,
weights normalised so sklearn accepts them as weights_init/means_init/precisions_init) and run the SAME
number of EM iterations (tol=0). Data: a random diagonal GMM (means ~ N(0, sep²), std ~ U(0.5, 1.5),
seeded). Both sides get the same threads (torch.set_num_threads and threadpoolctl for numpy/scipy
BLAS). The final models are scored in float64 on the data (mean log-likelihood per row); the table
also shows the last value of each log-likelihood trace and the relative difference, and which share of
the chunks took the dense statistics path / the bf16 screen (float32 on AMX or CUDA, D ≥ 128) in the
last iteration.

Prints a markdown table (and the machine load, since the timings depend on it); --json writes the rows.

  python benchmarks/gmm_fit.py --threads 2 --iters 20
  python benchmarks/gmm_fit.py --cases 20000x768x256 --sep 0.1   # overlapping modes: dense responsibilities
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def machine() -> str:
    names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
             if ln.startswith("model name")] if Path("/proc/cpuinfo").exists() else []
    return f"{names[0] if names else 'unknown CPU'}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def load() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=["100000x64x64", "20000x768x256"], help="NxDxK per case")
    p.add_argument("--iters", type=int, default=20, help="EM iterations (both sides, tol=0)")
    p.add_argument("--threads", type=int, default=2, help="threads for torch and for sklearn's BLAS")
    p.add_argument("--sep", type=float, default=1.0, help="std of the true component means (data are seeded)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "float64"], help="our compute dtypes to time")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per side (the fastest counts)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--screen", choices=["auto", "on", "off"], default="auto",
                   help="our bf16 screen: the machine's default (auto), forced on, or off (the path of a CPU without it)")
    p.add_argument("--reuse-bounds", action="store_true",
                   help="our carried per-row bounds (skip rows whose dense product they prove unchanged)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    a = p.parse_args()

    import numpy as np
    import sklearn
    import torch
    from threadpoolctl import threadpool_limits

    from sourceflow.gmm.diag import DiagGMM
    from sourceflow.gmm.em import fit_diag_gmm, fit_sklearn, init_from_rows, score_and_predict
    from sourceflow.gmm.kmeans import kmeans_plusplus

    torch.set_num_threads(a.threads)
    rows = []
    print(f"machine: {machine()}; torch {torch.__version__}, sklearn {sklearn.__version__}, numpy {np.__version__}; "
          f"{a.threads} threads; {a.iters} iterations; sep {a.sep}", flush=True)
    for case in a.cases:
        n, d, k = (int(v) for v in case.split("x"))
        rng = np.random.default_rng(a.seed)
        mu = rng.normal(size=(k, d)) * a.sep
        sd = rng.uniform(0.5, 1.5, size=(k, d))
        z = rng.integers(0, k, n)
        x = mu[z] + sd[z] * rng.normal(size=(n, d))
        _, idx = kmeans_plusplus(x, k, random_state=a.seed)
        g0 = init_from_rows(torch.from_numpy(x[idx]), n, 1e-6)
        init = DiagGMM(g0.weights / g0.weights.sum(), g0.means, g0.variances)

        def timed(f, *args, **kw):
            best, out = float("inf"), None
            for _ in range(a.repeats):
                t = time.perf_counter()
                out = f(*args, **kw)
                best = min(best, time.perf_counter() - t)
            return best, out

        load_before = load()
        with threadpool_limits(a.threads), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t_sk, sk = timed(fit_sklearn, x, k, max_iter=a.iters, tol=0.0, init=init)
        sk_score = score_and_predict(sk.gmm, x)[1]
        for name in a.dtypes:
            dtype = getattr(torch, name)
            xt = torch.from_numpy(x).to(dtype)  # float32 mode reads float32 data, as from a latent store
            t_ours, ours = timed(fit_diag_gmm, xt, k, max_iter=a.iters, tol=0.0, init=init, dtype=dtype,
                                 screen={"auto": None, "on": True, "off": False}[a.screen],
                                 reuse_bounds=a.reuse_bounds)
            ours_score = score_and_predict(ours.gmm, x)[1]
            assert ours.n_iter == sk.n_iter == a.iters
            rows.append({"case": f"{n} x {d}, K={k}", "dtype": name, "sklearn_s": t_sk, "ours_s": t_ours,
                         "speedup": t_sk / t_ours, "sklearn_ll": sk_score, "ours_ll": ours_score,
                         "rel_diff": abs(ours_score - sk_score) / abs(sk_score),
                         "trace_rel_diff": abs(ours.log_likelihood[-1] - sk.log_likelihood[-1]) / abs(sk.log_likelihood[-1]),
                         "dense_share": ours.dense_share[-1], "screen_share": ours.screen_share[-1],
                         "carried": ours.carried_share,
                         "load_before": load_before, "load_after": load()})
            r = rows[-1]
            print(f"  {r['case']} ours/{name}: sklearn {t_sk:.2f} s, ours {t_ours:.2f} s ({r['speedup']:.1f}x), "
                  f"rel. diff {r['rel_diff']:.1e}; rows carried per iteration {[round(c, 2) for c in ours.carried_share]}; "
                  f"load {load_before} -> {r['load_after']}", file=sys.stderr, flush=True)

    print()
    print("| data | ours dtype | sklearn s | ours s | speedup | sklearn mean log-lik | ours mean log-lik | rel. diff "
          "| last-trace rel. diff | dense chunks (last it.) | bf16-screened chunks (last it.) | load avg before → after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['dtype']} | {r['sklearn_s']:.2f} | {r['ours_s']:.2f} | {r['speedup']:.1f}× | "
              f"{r['sklearn_ll']:.10g} | {r['ours_ll']:.10g} | {r['rel_diff']:.1e} | {r['trace_rel_diff']:.1e} | "
              f"{r['dense_share']:.0%} | {r['screen_share']:.0%} | {r['load_before']} → {r['load_after']} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": machine(), "args": vars(a), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
