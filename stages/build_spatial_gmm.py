"""build_spatial_gmm: MM-FM's spatial GMM — per CLS mode, the mean and variance of the normalized
spatial latents of the images in that mode (the GMM source x0 ~ N(μ_k, σ_k² I) is drawn from).

As MM-FM does it on RAE: one streaming pass over the store's unflipped rows; each image takes the mode
of its CLS token (joined on the store's `index` column with the CLS labels file). Latents are
normalized with the latent stats first. When the store has flips, each image's flipped copy is
torch.flip of its normalized latent along W, in the same mode — the store's re-encoded flipped rows are
not read. Per mode, in float64: the mean, and either ONE scalar variance (--variance spherical, MM-FM:
biased, averaged over all C·H·W dims) or a per-dim variance (diag). Modes without images get the
global mean and the mean variance of the non-empty modes; mixture weights are copied from the CLS GMM.

Memory and disk: each [K, C·H·W] float64 accumulator takes K·C·H·W·8 bytes (spherical needs one,
diag two): 12.9 GB each at K=8192 and 768x16x16 latents. When that exceeds --memory-budget-mb they are
np.memmap files in a temporary folder beside --out (that much free disk; deleted at the end); each
batch then does one read-modify-write of a row per distinct mode in it — fast while the files fit in
the page cache, disk-bound otherwise. The output is written block by block either way. The output
file itself is K·C·H·W·4 bytes of means (float32; plus as much again for diag variances).

Writes --out (weights [K] float64, means [K, C, H, W], variances [K] or [K, C, H, W]) and a .json
beside it (counts per mode, empty and single-row modes, timings).

Example:
  python stages/build_spatial_gmm.py --store results/imagenet256/dinov2-b-reg/latents.zarr \\
      --stats results/imagenet256/dinov2-b-reg/latent_stats.safetensors \\
      --cls-gmm results/imagenet256/dinov2-b-reg/gmm/cls_K8192.safetensors \\
      --labels results/imagenet256/dinov2-b-reg/gmm/cls_K8192_labels.safetensors \\
      --variance spherical --memory-budget-mb 48000 \\
      --out results/imagenet256/dinov2-b-reg/gmm/spatial_K8192.safetensors
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sourceflow import cli  # noqa: E402


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--store", required=True,
                   help="latent store latents.zarr (its unflipped rows; flipped copies are torch.flip of them)")
    p.add_argument("--stats", required=True, help="latent_stats.safetensors used to normalize the spatial latents")
    p.add_argument("--cls-gmm", required=True, help="CLS GMM cls_K{K}.safetensors (its weights are copied)")
    p.add_argument("--labels", required=True, help="cls_K{K}_labels.safetensors: `index` (manifest) and `labels`")
    p.add_argument("--variance", default="spherical", choices=["spherical", "diag"],
                   help="spherical: one biased variance per mode averaged over all dims (MM-FM); diag: per dim")
    p.add_argument("--memory-budget-mb", type=float, default=4000,
                   help="RAM for the float64 [K, C*H*W] accumulators; above it they are memory-mapped files "
                        "beside --out")
    p.add_argument("--batch-rows", type=int, default=256, help="store rows read and accumulated at a time")
    p.add_argument("--save-dtype", default="float32", choices=["float32", "float64"],
                   help="dtype of the saved means and variances (weights are float64)")
    p.add_argument("--out", required=True, help="output spatial_K{K}.safetensors (a .json report is written beside it)")
    cli.add_common(p)
    a = p.parse_args()
    cli.set_threads(a.threads)

    import time

    import numpy as np

    from sourceflow.gmm.diag import load_gmm_tensors
    from sourceflow.gmm.spatial import SpatialReport, accumulate, label_lookup, write_spatial_gmm
    from sourceflow.io import log_timings, read_safetensors, write_json
    from sourceflow.store.latents import LatentStore
    from sourceflow.store.stats import LatentStats

    out = Path(a.out)
    if not out.name.endswith(".safetensors"):
        raise ValueError(f"--out must end in .safetensors: {out}")
    if a.batch_rows < 1:
        raise ValueError(f"--batch-rows must be positive, got {a.batch_rows}")
    t0 = time.perf_counter()
    store = LatentStore.open(a.store)
    stats = LatentStats.load(a.stats)
    weights = load_gmm_tensors(a.cls_gmm)["weights"].double().numpy()
    k = len(weights)
    lab, _ = read_safetensors(a.labels, ("index", "labels"), "labels file", "run the fit_cls_gmm stage",
                              framework="np")
    label_of = label_lookup(lab["index"], lab["labels"], k, str(a.labels))
    shape = tuple(store.spatial_shape)
    d = int(np.prod(shape))

    flips = bool(store.attrs.get("flips", False))

    def batches():
        # rows [0, M) are the unflipped images (the store layout); the flip column checks it
        for first, arrs in store.iter_batches(["index", "flip", "spatial"], a.batch_rows, 0, store.num_images):
            if arrs["flip"].any():
                raise ValueError(f"{a.store}: row {first + int(np.argmax(arrs['flip']))} is flipped, but rows "
                                 f"[0, {store.num_images}) should be the unflipped images")
            yield arrs["index"], arrs["spatial"]

    sums = accumulate(batches(), stats.normalize, label_of, k, d, flips=flips, variance=a.variance,
                      memory_budget_bytes=int(a.memory_budget_mb * 2**20), tmp_dir=out.parent,
                      total_rows=store.num_rows, progress=True)
    try:
        if sums.num_rows != store.num_rows:
            raise ValueError(f"{a.store}: accumulated {sums.num_rows} rows (with flipped copies), the store has "
                             f"{store.num_rows}")
        if sums.on_disk:
            print(f"accumulators: {sums.accumulator_bytes / 2**30:.1f} GiB > budget {a.memory_budget_mb:.0f} MB: "
                  f"memory-mapped files beside {out}", file=sys.stderr)
        acc_seconds = time.perf_counter() - t0
        write_spatial_gmm(out, sums, weights, shape, dtype=np.dtype(a.save_dtype),
                          metadata={"variance": a.variance, "components": str(k), "store": str(a.store),
                                    "flips": "torch.flip of the normalized unflipped latent" if flips else "none"})
        rep = SpatialReport.of(sums)
        fill = sums.empty_mode_fill()[1]
    finally:
        sums.close()
    report = {"store": str(a.store), "stats": str(a.stats), "cls_gmm": str(a.cls_gmm), "labels": str(a.labels),
              "variance": a.variance, "K": k, "spatial_shape": list(shape), "rows": rep.num_rows,
              "num_images": store.num_images, "flips": flips,
              "flipped_copies": "torch.flip of the normalized unflipped latent" if flips else "none",
              "counts": rep.counts, "empty_modes": rep.empty_modes, "singleton_modes": rep.singleton_modes,
              "empty_mode_variance": float(np.mean(fill)),
              "accumulator_bytes": rep.accumulator_bytes, "memory_mapped": rep.on_disk,
              "memory_budget_mb": a.memory_budget_mb, "save_dtype": a.save_dtype}
    write_json(out.with_name(out.name.removesuffix(".safetensors") + ".json"), report)
    log_timings("build_spatial_gmm", accumulate=acc_seconds, total=time.perf_counter() - t0)
    print(f"wrote {out}: K={k}, {rep.num_rows} rows, {rep.empty_modes} empty modes, {rep.singleton_modes} "
          f"single-row modes ({a.variance} variances)")


if __name__ == "__main__":
    cli.run(main)
