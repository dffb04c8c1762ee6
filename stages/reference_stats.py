"""reference_stats: what a perfect generator would score, as the reference for every metric.

Three modes (exactly one of --data, --manifest, --adm-npz):

--data (2-D toy data): the exact W2² (POT emd2) between the first N training points and the first N
held-out test points, two independent draws of the data distribution: the floor of the W2² the
evaluate stage reports at the same N (finite-sample W2 is not 0 even for a perfect model). Writes JSON.

--manifest (images): features of every image of one split (ADM centre crop to --resolution), from the
feature network (--features feature-net --feature-net WEIGHTS) or clean-fid's Inception (--inception FILE,
2048-d pool features) in clean-fid's "clean" mode (--features inception: PIL bicubic resize to 299 outside
the network) or its "legacy_tensorflow" mode (--features adm: no resize outside, the network resizes as
ADM's TensorFlow evaluator does; the same extractor the evaluate stage uses for evaluate.features adm).
Writes an npz with
the ADM keys mu (float64 [F]) and sigma (float64 [F, F], unbiased N−1 covariance), plus features
(float32 [n, F], for precision/recall; all N images, or a seeded random subset of --max-features) with
features_index (int64 [n], their manifest index), with --holdout-split the FD of that split's images to
these statistics (holdout_fd, holdout_count: the data floor), label_hist (float64 [classes], fraction of images per true
label, when the manifest has labels) and, for the feature network, pred_label_hist (the same for its
predicted labels, the classifier's own view of real data) and preprocessing (a string: clean,
legacy_tensorflow or model_range; evaluate refuses features preprocessed differently).

--adm-npz (an existing ADM reference batch, e.g. VIRTUAL_imagenet256_labeled.npz): check that it holds
mu and sigma of matching shapes and finite values, and write them (float64) in our format, with
preprocessing "legacy_tensorflow" (ADM's evaluator resized inside its TensorFlow graph; only evaluate.features
adm reproduces that; nothing here resizes or recomputes these statistics).

Example:
  python stages/reference_stats.py --data results/moons/toy.safetensors --num-points 5000 \\
      --out results/moons/reference/points_w2.json
  python stages/reference_stats.py --manifest results/digits/manifest.parquet --split train --resolution 8 \\
      --features feature-net --feature-net results/digits/feature_net/model.safetensors \\
      --out results/digits/reference/feature-net.npz
  python stages/reference_stats.py --adm-npz /data/VIRTUAL_imagenet256_labeled.npz \\
      --out results/imagenet/reference/adm.npz
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sourceflow import cli  # noqa: E402


def toy_mode(a) -> None:
    import numpy as np

    from sourceflow.build import load_points
    from sourceflow.io import write_json
    from sourceflow.metrics.wasserstein import w2_squared

    train, test = load_points(a.data, "train").x.numpy(), load_points(a.data, "test").x.numpy()
    n = min(a.num_points, len(train), len(test))
    w2sq = w2_squared(train[:n], test[:n])
    write_json(a.out, {"w2sq": w2sq, "w2": float(np.sqrt(w2sq)), "num_points": n})
    print(f"data floor at {n} points: W2² {w2sq:.4f}")


def adm_mode(a) -> None:
    import numpy as np

    from sourceflow.metrics.features import ADMInceptionFeatures
    from sourceflow.metrics.frechet import read_reference_npz, save_reference_npz

    arrays = read_reference_npz(a.adm_npz, keys=("mu_s", "sigma_s"))  # not the batch's ~2 GB arr_0
    extra = {k: v for k, v in arrays.items() if k in ("mu_s", "sigma_s")}
    save_reference_npz(a.out, arrays["mu"], arrays["sigma"], **extra,
                       preprocessing=np.array(ADMInceptionFeatures.preprocessing))  # the features they match
    print(f"wrote {a.out}: ADM reference {a.adm_npz}, {arrays['mu'].shape[0]}-d")


def image_mode(a) -> None:
    import time

    import numpy as np
    import torch

    from sourceflow.data.images import iter_image_batches
    from sourceflow.data.manifest import read_manifest
    from sourceflow.metrics.features import load_feature_extractor
    from sourceflow.metrics.frechet import FeatureStats, frechet_distance, save_reference_npz
    from sourceflow.metrics.prdc import label_histogram

    if a.features is None:
        raise ValueError("--manifest needs --features (feature-net, inception or adm)")
    flag = "feature-net" if a.features == "feature-net" else "inception"
    weights = a.feature_net if a.features == "feature-net" else a.inception
    if not weights:
        raise ValueError(f"--features {a.features} needs --{flag}")
    if a.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {a.batch_size}")
    t0 = time.perf_counter()
    m = read_manifest(a.manifest).split(a.split)
    res = a.resolution or int(m.meta.get("resolution", 0))
    if res < 1:
        raise ValueError("--resolution is needed (the manifest records none)")
    if a.max_images and a.max_images < len(m.frame):  # a seeded random subset, kept in manifest order
        pick = np.sort(np.random.default_rng([a.seed, 1]).choice(len(m.frame), a.max_images, replace=False))
        m.frame = m.frame.iloc[pick].reset_index(drop=True)
    extractor = load_feature_extractor(a.features, weights, a.device, workers=a.workers)
    if a.features == "feature-net" and extractor.resolution != res:
        print(f"warning: the feature network was trained at resolution {extractor.resolution}, "
              f"images are read at {res}", file=sys.stderr)

    n = len(m.frame)
    stats = FeatureStats(extractor.dim, device="cpu")
    # features kept for precision/recall: all rows, or a seeded random subset (manifests are often
    # sorted by class, so the first rows would be a few classes only); mu/sigma always use every row
    keep = np.arange(n) if not a.max_features or a.max_features >= n else \
        np.sort(np.random.default_rng(a.seed).choice(n, a.max_features, replace=False))
    slot = np.full(n, -1, dtype=np.int64)
    slot[keep] = np.arange(len(keep))
    feats = np.empty((len(keep), extractor.dim), dtype=np.float32)
    preds = np.empty(n, dtype=np.int64) if extractor.num_classes else None
    for start, images in iter_image_batches(m, res, a.batch_size, a.workers, desc=f"{a.features} features"):
        out = extractor(images)
        rows = slot[start:start + len(images)]
        feats[rows[rows >= 0]] = out.features[rows >= 0]
        stats.update(torch.from_numpy(out.features))
        if preds is not None:
            preds[start:start + len(images)] = out.labels
    extra = {}
    labels = m.frame["label"].to_numpy()
    num_classes = m.num_classes or (int(labels.max()) + 1 if (labels >= 0).any() else 0)
    label_hist = label_histogram(labels, num_classes) if (labels >= 0).any() else None
    if preds is not None:
        extra["pred_label_hist"] = label_histogram(preds, extractor.num_classes)
    extra["features_index"] = m.frame["index"].to_numpy()[keep]
    extra["preprocessing"] = np.array(extractor.preprocessing)
    if a.holdout_split:
        held = read_manifest(a.manifest).split(a.holdout_split)
        hstats = FeatureStats(extractor.dim, device="cpu")
        for _, images in iter_image_batches(held, res, a.batch_size, a.workers, desc=f"{a.holdout_split} features"):
            hstats.update(torch.from_numpy(extractor(images).features))
        extra["holdout_fd"] = np.array(frechet_distance(hstats.mu, hstats.sigma, stats.mu, stats.sigma))
        extra["holdout_count"] = np.array(hstats.n)
        print(f"data floor: FD of the {hstats.n} {a.holdout_split} images to these statistics "
              f"{float(extra['holdout_fd']):.4f}")
    save_reference_npz(a.out, stats.mu, stats.sigma, features=feats, label_hist=label_hist, **extra)
    msg = f"wrote {a.out}: {a.features} features ({extractor.preprocessing}) of {n} {a.split} images at {res}px, {extractor.dim}-d"
    if preds is not None and label_hist is not None:
        msg += f", feature-net accuracy on them {float(np.mean(preds[labels >= 0] == labels[labels >= 0])):.4f}"
    print(msg + f", {time.perf_counter() - t0:.1f} s")


def main() -> None:
    p = cli.parser(__doc__)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--data", help="toy mode: toy data .safetensors (train and test splits)")
    mode.add_argument("--manifest", help="image mode: manifest.parquet of the dataset")
    mode.add_argument("--adm-npz", help="ADM mode: an existing ADM reference batch (.npz with mu, sigma)")
    p.add_argument("--num-points", type=int, default=5000, help="toy mode: points from each split (use evaluate.num_points)")
    p.add_argument("--split", default="train", choices=["train", "test"], help="image mode: split whose images are the reference")
    p.add_argument("--resolution", type=int, default=None, help="image mode: image side R (unset: the manifest's resolution)")
    p.add_argument("--features", default=None, choices=["feature-net", "inception", "adm"],
                   help="image mode: feature extractor (inception: clean-fid \"clean\" mode; adm: clean-fid "
                        "legacy_tensorflow mode, comparable with ADM reference batches)")
    p.add_argument("--feature-net", default=None, help="image mode: feature network .safetensors (train_feature_net)")
    p.add_argument("--inception", default=None,
                   help="image mode: clean-fid's inception-2015-12-05.pt (a file, or the folder holding it)")
    p.add_argument("--holdout-split", default=None, choices=["train", "test"],
                   help="image mode: also store holdout_fd, the FD of this split's images to the reference "
                        "statistics (the finite-sample floor a perfect generator would score)")
    p.add_argument("--batch-size", type=int, default=256, help="image mode: images per forward pass")
    p.add_argument("--max-images", type=int, default=0, help="image mode: use only N images of the split, a random subset drawn with --seed (0: all)")
    p.add_argument("--max-features", type=int, default=50000,
                   help="image mode: store the features of at most this many images (a random subset drawn with "
                        "--seed; mu and sigma still use every image; 0: store all)")
    p.add_argument("--workers", type=int, default=4, help="image mode: threads decoding and resizing images")
    p.add_argument("--device", default="cpu", help="image mode: torch device of the feature extractor (cpu, cuda)")
    p.add_argument("--out", required=True, help="output: .json (toy mode) or .npz (image and ADM modes)")
    cli.add_common(p)
    a = p.parse_args()

    if a.data:
        toy_mode(a)
        return
    if Path(a.out).suffix != ".npz":
        raise ValueError(f"--out must be an .npz file in image and ADM modes, got {a.out}")
    cli.set_threads(a.threads)
    if a.adm_npz:
        adm_mode(a)
    else:
        image_mode(a)


if __name__ == "__main__":
    cli.run(main)
