"""cls_posteriors: MM-FM's mode posteriors p(k | CLS) of every latent-store row, computed once, top-k kept.

Reads the `cls` rows of a complete latent store (all rows: a flipped row has its own CLS) shard by shard
and the CLS GMM of fit_cls_gmm, and writes OUT (.safetensors): `modes` int32 [N, k] (ascending mode
index per row) and `probs` float32 [N, k], with metadata: k, rows, the largest and mean probability mass
the top-k leave out, the store and GMM paths. Training with `coupling.posterior_topk: k` samples each
row's mode from this table (sourceflow.gmm.posteriors) instead of evaluating the CLS GMM every step; the
left-out mass is printed so a too-small k shows. Float64 on --device (a GPU takes minutes at ImageNet
scale: rows x K x (2D+1) x 2 FLOPs). The file is written atomically; a killed run starts over.

Example:
  python stages/cls_posteriors.py --store results/imagenet256/rae/latents.zarr \\
      --gmm results/imagenet256/rae/gmm/cls_K8192.safetensors --top-k 16 --device cuda \\
      --out results/imagenet256/rae/gmm/cls_K8192_top16_posteriors.safetensors
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sourceflow import cli  # noqa: E402


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--store", required=True, help="complete latent store (latents.zarr)")
    p.add_argument("--gmm", required=True, help="CLS GMM .safetensors of fit_cls_gmm")
    p.add_argument("--top-k", type=int, required=True, help="modes kept per row")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--batch-rows", type=int, default=4096, help="store rows per posterior batch")
    p.add_argument("--out", required=True, help="output .safetensors")
    cli.add_common(p)
    a = p.parse_args()
    cli.set_threads(a.threads)

    import time

    import torch

    from sourceflow.gmm.diag import DiagGMM
    from sourceflow.gmm.posteriors import top_k_posteriors
    from sourceflow.io import log_timings
    from sourceflow.progress import bar
    from sourceflow.store.latents import LatentStore

    if a.batch_rows < 1:
        raise ValueError(f"--batch-rows must be positive, got {a.batch_rows}")
    t0 = time.perf_counter()
    store = LatentStore.open(a.store)
    gmm = DiagGMM.load(a.gmm).to("cpu", torch.float64)
    if gmm.means.shape[1] != store.cls_dim:
        raise ValueError(f"{a.gmm}: a GMM over {gmm.means.shape[1]} dimensions, the store's CLS has {store.cls_dim}")
    device = torch.device(a.device)
    with bar(total=store.num_rows, desc=f"posteriors top-{a.top_k}", unit="row") as pb:
        batches = (b["cls"] for _, b in store.iter_batches(["cls"], a.batch_rows))
        table, residual = top_k_posteriors(gmm, batches, store.num_rows, a.top_k, device=device, progress=pb.update)
    worst, mean = float(residual.max()), float(residual.mean())
    table.save(a.out, {"k": str(a.top_k), "rows": str(store.num_rows), "max_residual": f"{worst:.3e}",
                       "mean_residual": f"{mean:.3e}", "store": str(a.store), "gmm": str(a.gmm)})
    log_timings("cls_posteriors", wall_s=round(time.perf_counter() - t0, 3), rows=store.num_rows, device=str(device))
    print(f"wrote {a.out}: top-{a.top_k} of {gmm.num_modes} modes for {store.num_rows} rows; probability left out: "
          f"max {worst:.2e}, mean {mean:.2e}")


if __name__ == "__main__":
    cli.run(main)
