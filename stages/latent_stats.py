"""latent_stats: per-position mean and variance of a complete latent store's spatial latents (RAE-style:
separately for every (c, h, w)), accumulated in float64 in one streaming pass, saved as float32 `mean`
and `var` [C, H, W] in a safetensors file that `sourceflow.store.stats.LatentStats.load` reads. The
file's metadata records how to normalise (--normalize, --eps), so every reader applies the same:
mean_std = (x - mean) / sqrt(var + eps); std = x / sqrt(var + eps), no mean subtracted (RAE on DINOv2-B,
with eps 1e-5).

Rows: all of them, flipped copies included (the default), or with --images N a seeded (--seed), evenly
spread subset of N images: unflipped rows only, each image once as encoded (RAE's statistics are over 50k
images). The metadata records which (stats_rows: all | images, stats_images, stats_seed, rows_used).
Reads are row-granular in batches of --batch-rows, so memory is about batch-rows x C*H*W x 8 bytes plus
a few chunks, whatever the store's size.

Refuses a store that is not marked complete (a killed or running extraction).

Example:
  python stages/latent_stats.py --store results/digits/pixels/latents.zarr \\
      --out results/digits/pixels/latent_stats.safetensors
  python stages/latent_stats.py --store results/imagenet256/rae/latents.zarr --normalize std --eps 1e-5 \\
      --images 50000 --batch-rows 256 --out results/imagenet256/rae/latent_stats.safetensors
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sourceflow import cli  # noqa: E402


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--store", required=True, help="latent store (latents.zarr) written by extract_latents")
    p.add_argument("--out", required=True, help="output .safetensors with mean and var [C, H, W]")
    p.add_argument("--batch-rows", type=int, default=1024,
                   help="rows read and accumulated at a time (peak memory ~ batch-rows x C*H*W x 8 bytes)")
    p.add_argument("--images", type=int, default=None,
                   help="statistics over a seeded, evenly spread subset of this many images (unflipped rows; "
                        "RAE: 50000); unset: all rows, flipped copies included")
    p.add_argument("--normalize", default="mean_std", choices=["mean_std", "std"],
                   help="mean_std: (x - mean) / sqrt(var + eps); std: x / sqrt(var + eps) (RAE, DINOv2-B)")
    p.add_argument("--eps", type=float, default=1e-6, help="eps stored with the stats (RAE: 1e-5)")
    cli.add_common(p)
    a = p.parse_args()
    cli.set_threads(a.threads)

    from sourceflow.store.latents import LatentStore
    from sourceflow.store.stats import compute_latent_stats, subset_rows

    if not a.eps > 0:
        raise ValueError(f"--eps must be positive, got {a.eps}")
    if a.batch_rows < 1:
        raise ValueError(f"--batch-rows must be positive, got {a.batch_rows}")
    if a.images is not None and a.images < 1:
        raise ValueError(f"--images must be positive, got {a.images}")
    store = LatentStore.open(a.store)
    rows = None if a.images is None else subset_rows(store.num_images, a.images, a.seed)
    used = store.num_rows if rows is None else len(rows)
    stats = compute_latent_stats(store, a.batch_rows, progress=True, eps=a.eps, mode=a.normalize, rows=rows)
    meta = {k: str(store.attrs.get(k)) for k in ("encoder", "weights", "resolution", "manifest_hash", "split", "flips")}
    meta["num_rows"] = str(store.num_rows)
    meta["rows_used"] = str(used)
    if rows is None:
        meta["stats_rows"] = "all"
    else:
        meta.update(stats_rows="images", stats_images=str(used), stats_images_requested=str(a.images),
                    stats_seed=str(a.seed))
    stats.save(a.out, metadata=meta)
    what = (f"all {used} rows" if rows is None else
            f"{used} of {store.num_images} images (unflipped rows, seed {a.seed})")
    print(f"wrote {a.out}: mean/var {tuple(stats.mean.shape)} over {what} ({a.normalize}, eps {a.eps:g}); "
          f"mean |mean| {stats.mean.abs().mean():.4g}, mean var {stats.var.mean():.4g}")


if __name__ == "__main__":
    cli.run(main)
