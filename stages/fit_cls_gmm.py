"""fit_cls_gmm: fit a diagonal Gaussian mixture on global descriptors (the CLS tokens of a latent store;
for 2-D toy data the points themselves), the mixture MM-FM's mode coupling and GMM source are built from.

Input: either --data (toy .safetensors, train split) or --store (latents.zarr: the `cls` rows of the
unflipped images, rows [0, num_images); the whole [M, D] float32 matrix is held in memory, on --device).

Backends: `torch` (default) — chunked EM (sourceflow.gmm.em): the same algorithm and numbers as
scikit-learn (k-means++ seed rows identical to sklearn's for the same --seed, one-hot init, tol on the
change of mean log-likelihood), but never an N×K matrix beyond one chunk, on CPU or CUDA; `sklearn` —
GaussianMixture (full-batch; for cross-checks and small data).

Writes, beside --out (same stem): <stem>.safetensors (weights [K], means [K, D], variances [K, D]),
<stem>.json (backend, n, K, seed, init, iterations, converged, log-likelihood per iteration,
hard-label counts; the seconds go to the log as a `timings` line), <stem>_labels.safetensors (`index`
int64 [M]: manifest index per image (toy: row number), `labels` int64 [M]: hard mode), <stem>_weights.png
(sorted mixture weights, log scale).

Example:
  python stages/fit_cls_gmm.py --store results/imagenet256/dinov2-b-reg/latents.zarr --components 8192 \\
      --device cuda --out results/imagenet256/dinov2-b-reg/gmm/cls_K8192.safetensors
  python stages/fit_cls_gmm.py --data results/moons/toy.safetensors --components 8 \\
      --out results/moons/points/gmm/cls_K8.safetensors
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sourceflow import cli  # noqa: E402


def sibling(out: Path, suffix: str) -> Path:
    """``results/.../cls_K8.safetensors`` + ``_labels.safetensors`` -> ``results/.../cls_K8_labels.safetensors``."""
    return out.with_name(out.name.removesuffix(".safetensors") + suffix)


def load_store_cls(path: str):
    """(cls [M, D] float32 tensor of the unflipped rows, manifest index [M] int64) of a complete store."""
    import numpy as np
    import torch

    from sourceflow.progress import bar
    from sourceflow.store.latents import LatentStore

    store = LatentStore.open(path)
    m = store.num_images
    cls = np.empty((m, store.cls_dim), dtype=np.float32)
    index = np.empty(m, dtype=np.int64)
    with bar(total=m, desc="read cls", unit="row") as pbar:
        for first, arrays in store.iter_batches(["cls", "index"], store.shard_rows, 0, m):
            cls[first:first + len(arrays["cls"])] = arrays["cls"]
            index[first:first + len(arrays["index"])] = arrays["index"]
            pbar.update(len(arrays["cls"]))
    if not np.isfinite(cls).all():
        raise ValueError(f"{path}: the cls array holds non-finite values")
    return torch.from_numpy(cls), index


def weights_plot(weights, path: Path, title: str) -> None:
    """Sorted mixture weights (descending), log-scale y, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from sourceflow.io import atomic_path

    w = np.sort(np.asarray(weights, dtype=np.float64))[::-1]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(np.arange(1, len(w) + 1), w, drawstyle="steps-mid" if len(w) < 64 else "default")
    ax.axhline(1.0 / len(w), color="gray", lw=0.8, ls="--", label="uniform 1/K")
    ax.set_yscale("log")
    ax.set_xlabel("mode (sorted by weight)")
    ax.set_ylabel("mixture weight")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def main() -> None:
    p = cli.parser(__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="toy data .safetensors (its train split is fitted; labels index = row number)")
    src.add_argument("--store", help="latent store latents.zarr (its `cls` rows [0, num_images) are fitted)")
    p.add_argument("--components", type=int, required=True, help="number of mixture components K")
    p.add_argument("--max-iter", type=int, default=100, help="EM iterations at most")
    p.add_argument("--tol", type=float, default=1e-3,
                   help="stop when the mean log-likelihood per sample changes by less than this (sklearn's tol)")
    p.add_argument("--reg-covar", type=float, default=1e-6, help="added to every variance")
    p.add_argument("--backend", default="torch", choices=["torch", "sklearn"],
                   help="torch: chunked EM (CPU or CUDA); sklearn: GaussianMixture (full batch, CPU)")
    p.add_argument("--init", default="k-means++", choices=["auto", "k-means++", "cuml"],
                   help="torch backend: k-means++ seeds as sklearn (the same on every machine); cuml: cuML KMeans "
                        "labels (CUDA + cuML); auto: cuml when available on a CUDA device, else k-means++ (results "
                        "then depend on the machine; the workflow passes the config's gmm.init)")
    p.add_argument("--reuse-bounds", action="store_true",
                   help="torch backend: carry per-row bounds between EM passes and skip the dense product of rows "
                        "they prove unchanged (same fit up to summation order; pays in long, settled fits)")
    p.add_argument("--chunk-rows", type=int, default=0,
                   help="rows per EM chunk (memory: chunk-rows x K values); 0 = about 256 MB per chunk")
    p.add_argument("--device", default="cpu", help="torch device for the torch backend (cpu, cuda, cuda:1)")
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"],
                   help="torch backend compute dtype: float64 = sklearn's numbers; float32 = faster matrix "
                        "products (statistics still summed in float64)")
    p.add_argument("--out", required=True,
                   help="output <stem>.safetensors; <stem>.json, <stem>_labels.safetensors and "
                        "<stem>_weights.png are written beside it")
    cli.add_common(p)
    a = p.parse_args()
    cli.set_threads(a.threads)

    import logging
    import time

    import numpy as np
    import torch

    from sourceflow.gmm.em import fit_diag_gmm, fit_sklearn, score_and_predict
    from sourceflow.io import log_timings, save_safetensors, write_json

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    out = Path(a.out)
    if not out.name.endswith(".safetensors"):
        raise ValueError(f"--out must end in .safetensors: {out}")
    if a.components < 1:
        raise ValueError(f"--components must be positive, got {a.components}")
    if a.chunk_rows < 0:
        raise ValueError(f"--chunk-rows must be >= 0, got {a.chunk_rows}")
    if a.backend == "sklearn" and a.device != "cpu":
        raise ValueError(f"--backend sklearn runs on the CPU only, got --device {a.device}")
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {a.device}: CUDA is not available")
    dtype = getattr(torch, a.dtype)

    t0 = time.perf_counter()
    if a.data is not None:
        from sourceflow.build import load_points

        x = load_points(a.data, "train").x.double()
        x = x.reshape(len(x), -1)
        index = np.arange(len(x), dtype=np.int64)
        source = {"data": str(a.data)}
    else:
        x, index = load_store_cls(a.store)
        source = {"store": str(a.store)}
    n, d = x.shape
    if a.components > n:
        raise ValueError(f"--components {a.components} exceeds the {n} rows to fit")
    read_seconds = time.perf_counter() - t0
    print(f"fitting K={a.components} on {n} x {d} rows with backend {a.backend}", file=sys.stderr)

    chunk_rows = a.chunk_rows or None
    if a.backend == "sklearn":
        fit = fit_sklearn(x.double().numpy(), a.components, reg_covar=a.reg_covar, max_iter=a.max_iter, tol=a.tol,
                          seed=a.seed)
        label_device, label_dtype = torch.device("cpu"), torch.float64
    else:
        if device.type != "cpu":
            x = x.to(device)
        fit = fit_diag_gmm(x, a.components, reg_covar=a.reg_covar, max_iter=a.max_iter, tol=a.tol, seed=a.seed,
                           init=a.init, device=device, dtype=dtype, chunk_rows=chunk_rows, progress=True,
                           reuse_bounds=a.reuse_bounds)
        label_device, label_dtype = device, dtype
    labels, final_ll = score_and_predict(fit.gmm, x, chunk_rows=chunk_rows, device=label_device, dtype=label_dtype)
    labels = labels.numpy()

    gmm = fit.gmm
    gmm.save(out, metadata={"backend": a.backend, "components": str(a.components), "init": fit.init,
                            "seed": str(a.seed)})
    save_safetensors(sibling(out, "_labels.safetensors"), {"index": torch.from_numpy(index),
                                                          "labels": torch.from_numpy(labels)},
                     {"components": str(a.components)})
    counts = np.bincount(labels, minlength=a.components)
    weights_plot(gmm.weights.numpy(), sibling(out, "_weights.png"),
                 f"{out.stem}: K={a.components}, n={n}, {int((counts == 0).sum())} modes without a hard label")
    report = {
        **source, "backend": a.backend, "n": int(n), "dim": int(d), "K": a.components, "components": a.components,
        "seed": a.seed, "init": fit.init, "seed_rows": fit.seed_rows, "iterations": fit.n_iter, "n_iter": fit.n_iter,
        "converged": fit.converged, "log_likelihood": fit.log_likelihood,
        "mean_log_likelihood": final_ll,  # of the saved parameters (the trace ends one M-step earlier)
        "max_iter": a.max_iter, "tol": a.tol, "reg_covar": a.reg_covar, "device": str(device) if a.backend == "torch"
        else "cpu", "dtype": a.dtype if a.backend == "torch" else "float64", "chunk_rows": fit.settings.get("chunk_rows"),
        "hard_label_counts": counts.tolist(), "empty_modes": int((counts == 0).sum()),
        "reuse_bounds": a.reuse_bounds, "carried_share": fit.carried_share,
        "versions": {"torch": torch.__version__},
    }
    if a.backend == "sklearn":
        import sklearn

        report["versions"]["sklearn"] = sklearn.__version__
    write_json(sibling(out, ".json"), report)
    log_timings("fit_cls_gmm", read=read_seconds, init=fit.init_seconds, fit=fit.seconds,
                total=time.perf_counter() - t0)
    print(f"wrote {out}: K={a.components}, mean log-likelihood {final_ll:.6f}, converged={fit.converged} after "
          f"{fit.n_iter} iterations ({fit.seconds:.1f} s), {report['empty_modes']} modes without a hard label")


if __name__ == "__main__":
    cli.run(main)
