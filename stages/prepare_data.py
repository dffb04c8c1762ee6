"""prepare_data: list a dataset's images once into a manifest (index, path, label, split).

Writes OUT (manifest.parquet: index, path, label, split; paths are posix and relative to the image
root), manifest.json beside it (source, root, resolution, num_classes, class_names, counts per split,
skipped count, split_roots, seed) and skipped.csv (path, reason; only a header when nothing was
skipped). Images are not resized here: readers crop at read time (ADM centre crop, --resolution).

Sources:
  digits       scikit-learn's bundled 8×8 digits (1797 images, labels 0..9), written once as grayscale
               PNGs ROOT/{label}/{i:04d}.png (pixel values 0..16 scaled to 0..255, rounded; i is the
               sklearn order, which is also the manifest index), plus captions.jsonl beside OUT in CSFM's
               format ({"path": ..., "recaption_short": ...}) generated from the labels (seeded).
  imagefolder  torchvision class folders ROOT/<class>/**/<image> (classes sorted -> labels 0..C-1;
               extensions jpg, jpeg, png, bmp, webp, any case). Every image is decoded once (a thread
               pool) so corrupt or truncated files are caught here: --on-bad-image stop ends with the
               path, skip leaves it out and lists it in skipped.csv. Test split: --test-root (same classes;
               the manifest root is then the common parent of both trees, e.g. train/... and val/...)
               or a seeded, per-class --test-fraction.

Example:
  python stages/prepare_data.py --source digits --root results/digits/images \\
      --out results/digits/manifest.parquet
  python stages/prepare_data.py --source imagefolder --root /data/imagenet/train \\
      --test-root /data/imagenet/val --resolution 256 --workers 16 --out results/imagenet/manifest.parquet
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sourceflow import cli  # noqa: E402


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--source", required=True, choices=["digits", "imagefolder"], help="where the images come from")
    p.add_argument("--root", default=None,
                   help="imagefolder: the class-folder tree (required); digits: where the PNGs are written "
                        "(when omitted: images/ beside --out)")
    p.add_argument("--test-root", default=None,
                   help="imagefolder: a second class-folder tree holding the test split (same classes); "
                        "replaces --test-fraction")
    p.add_argument("--resolution", type=int, default=None,
                   help="image side R the readers crop to (recorded in manifest.json; default 8 for digits, "
                        "256 for imagefolder)")
    p.add_argument("--test-fraction", type=float, default=0.15,
                   help="share of each class put in the test split (seeded by --seed); ignored with --test-root")
    p.add_argument("--on-bad-image", choices=["stop", "skip"], default="stop",
                   help="an image that does not decode: stop with its path, or skip it and list it in skipped.csv")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="threads decoding images (imagefolder)")
    p.add_argument("--captions", default=None,
                   help="digits: where the generated caption JSONL goes (when omitted: captions.jsonl beside --out)")
    p.add_argument("--out", required=True, help="output manifest.parquet (manifest.json and skipped.csv beside it)")
    cli.add_common(p)
    a = p.parse_args()

    import numpy as np
    import pandas as pd

    from sourceflow.data import manifest as mf
    from sourceflow.data.captions import digit_captions, write_caption_jsonl
    from sourceflow.data.images import IMAGE_EXTENSIONS
    from sourceflow.io import atomic_path

    out = Path(a.out)
    if out.suffix != ".parquet":
        raise ValueError(f"--out must be a .parquet file, got {out}")
    resolution = a.resolution or (8 if a.source == "digits" else 256)
    if resolution < 1:
        raise ValueError(f"--resolution must be positive, got {resolution}")
    skipped: list[tuple[str, str]] = []
    if a.source == "digits":
        if a.test_root:
            raise ValueError("--test-root applies to --source imagefolder only")
        root = Path(a.root) if a.root else out.parent / "images"
        paths, labels = mf.write_digits_images(root)
        split = mf.stratified_split(labels, a.test_fraction, a.seed)
        class_names = [str(d) for d in range(10)]
        split_roots = {"train": "", "test": ""}
        cap_path = Path(a.captions) if a.captions else out.parent / "captions.jsonl"
        write_caption_jsonl(cap_path, paths, digit_captions(labels, a.seed))
        extra = {"captions": str(cap_path), "pixel_scale": "round(v * 255 / 16), v in 0..16"}
    else:
        if not a.root:
            raise ValueError("--source imagefolder needs --root (the class-folder tree)")
        train_root = Path(a.root)
        class_names, items = mf.scan_class_folders(train_root, IMAGE_EXTENSIONS)
        if a.test_root:
            test_root = Path(a.test_root)
            test_classes, test_items = mf.scan_class_folders(test_root, IMAGE_EXTENSIONS)
            if test_classes != class_names:
                diff = sorted(set(class_names) ^ set(test_classes))[:5]
                raise ValueError(f"--test-root {test_root} has different classes from --root {train_root} "
                                 f"({len(test_classes)} vs {len(class_names)}; e.g. {diff})")
            ra, rb = train_root.absolute(), test_root.absolute()
            if ra == rb:
                raise ValueError("--test-root is the same folder as --root")
            common = Path(os.path.commonpath([ra, rb]))
            pre_train = ra.relative_to(common).as_posix() if ra != common else ""
            pre_test = rb.relative_to(common).as_posix() if rb != common else ""
            both_relative = not (train_root.is_absolute() or test_root.is_absolute())
            root = Path(os.path.relpath(common)) if both_relative else common  # a relative root stays relative
            join = lambda pre, q: f"{pre}/{q}" if pre else q  # noqa: E731
            rel = [join(pre_train, q) for q, _ in items] + [join(pre_test, q) for q, _ in test_items]
            lab = [y for _, y in items] + [y for _, y in test_items]
            spl = ["train"] * len(items) + ["test"] * len(test_items)
            split_roots = {"train": pre_train, "test": pre_test}
        else:
            root = train_root
            rel = [q for q, _ in items]
            lab = [y for _, y in items]
            spl = None
            split_roots = {"train": "", "test": ""}
        errors, sizes = mf.check_images(root, rel, a.workers)
        bad = [i for i, e in enumerate(errors) if e is not None]
        if bad and a.on_bad_image == "stop":
            raise ValueError(f"{errors[bad[0]]} ({len(bad)} bad image(s) in all; --on-bad-image skip leaves "
                             "them out and lists them in skipped.csv)")
        keep = np.array([e is None for e in errors], dtype=bool)
        skipped = [(rel[i], str(errors[i])) for i in bad]
        paths = [q for q, k in zip(rel, keep, strict=True) if k]
        labels = np.asarray(lab, dtype=np.int64)[keep]
        if len(paths) == 0:
            raise ValueError(f"{root}: no readable images")
        split = (np.asarray(spl, dtype=object)[keep] if spl is not None
                 else mf.stratified_split(labels, a.test_fraction, a.seed))
        short = np.array([min(s) for s, k in zip(sizes, keep, strict=True) if k])
        extra = {"test_root": a.test_root, "image_short_side": {"min": int(short.min()),
                 "median": float(np.median(short)), "max": int(short.max())},
                 "workers": a.workers}

    frame = pd.DataFrame({"index": np.arange(len(paths), dtype=np.int64), "path": list(paths),
                          "label": np.asarray(labels, dtype=np.int64), "split": list(split)})
    counts = {s: int((frame["split"] == s).sum()) for s in mf.SPLITS}
    meta = {"source": a.source, "root": str(root), "resolution": resolution, "num_classes": len(class_names),
            "class_names": class_names, "counts": counts, "skipped": len(skipped), "split_roots": split_roots,
            "seed": a.seed, "test_fraction": None if a.test_root else a.test_fraction,
            "on_bad_image": a.on_bad_image, **extra}
    with atomic_path(out.parent / "skipped.csv") as tmp:
        pd.DataFrame(skipped, columns=["path", "reason"]).to_csv(tmp, index=False)
    mf.write_manifest(out, frame, meta)
    print(f"wrote {out}: {len(frame)} images ({counts['train']} train, {counts['test']} test), "
          f"{len(class_names)} classes, {len(skipped)} skipped; root {root}")


if __name__ == "__main__":
    cli.run(main)
