"""fit_cls_gmm: fit a diagonal Gaussian mixture on global descriptors ("CLS"; for 2-D toy data the
points themselves), the mixture MM-FM's mode coupling and GMM source are built from.

Backend `sklearn` (scikit-learn GaussianMixture: k-means++ init, diag covariance). Writes weights,
means and variances to safetensors and a JSON beside it with the log-likelihood, convergence and the
hard-label counts per mode.

Example:
  python stages/fit_cls_gmm.py --data results/moons/toy.safetensors --components 8 \\
      --out results/moons/points/gmm/cls_K8.safetensors
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sourceflow import cli  # noqa: E402


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--data", required=True, help="toy data .safetensors (train split is used)")
    p.add_argument("--components", type=int, required=True, help="number of mixture components K")
    p.add_argument("--max-iter", type=int, default=100, help="EM iterations at most")
    p.add_argument("--tol", type=float, default=1e-3, help="EM convergence tolerance on the mean log-likelihood")
    p.add_argument("--reg-covar", type=float, default=1e-6, help="added to every variance")
    p.add_argument("--backend", default="sklearn", choices=["sklearn"], help="EM implementation")
    p.add_argument("--out", required=True, help="output .safetensors (a .json with the fit report is written beside it)")
    cli.add_common(p)
    a = p.parse_args()
    cli.set_threads(a.threads)

    import numpy as np
    import torch
    from sklearn.mixture import GaussianMixture

    from sourceflow.build import load_points
    from sourceflow.gmm.diag import DiagGMM
    from sourceflow.io import write_json

    x = load_points(a.data, "train").x.double().numpy()
    if a.components > len(x):
        raise ValueError(f"--components {a.components} exceeds the {len(x)} training points")
    gm = GaussianMixture(a.components, covariance_type="diag", init_params="k-means++", max_iter=a.max_iter,
                         tol=a.tol, reg_covar=a.reg_covar, random_state=a.seed).fit(x)
    gmm = DiagGMM(torch.from_numpy(gm.weights_), torch.from_numpy(gm.means_), torch.from_numpy(gm.covariances_))
    gmm.save(a.out, metadata={"backend": a.backend, "components": str(a.components)})
    counts = np.bincount(gm.predict(x), minlength=a.components)
    report = {"backend": a.backend, "components": a.components, "n": len(x), "converged": bool(gm.converged_),
              "n_iter": int(gm.n_iter_), "mean_log_likelihood": float(gm.score(x)),
              "hard_label_counts": counts.tolist(), "seed": a.seed}
    write_json(Path(a.out).with_suffix(".json"), report)
    print(f"wrote {a.out}: K={a.components}, mean log-likelihood {report['mean_log_likelihood']:.4f}, "
          f"converged={report['converged']} after {report['n_iter']} iterations")


if __name__ == "__main__":
    cli.run(main)
