"""align_captions: join a caption JSONL (CSFM format) to the manifest by image path.

Reads one JSON object per line with an image path (--path-field) and a caption (--caption-field),
normalises the caption paths (backslashes -> /, posixpath.normpath, which drops leading ./ and
collapses // and /./; then --prefix is cut when the path starts with it on a folder boundary) and the
manifest paths of the chosen split(s) (relative to their split's folder, manifest.json split_roots),
and joins on equal strings (case-sensitive). Writes OUT (aligned.parquet: index = manifest index,
path = manifest path, caption) for every image of the split(s) in manifest order, and
match_report.json beside it (images matched / without caption, caption paths matched / unmatched,
duplicate caption lines, the fraction, the manifest hash).

Fails with one line showing the first unmatched paths on both sides when fewer than
--min-match-fraction of the images have a caption (the report is still written, a previous OUT is removed). Above the threshold,
images without a caption get an empty caption "" and are all listed in the report
(images_without_caption_paths). A path captioned twice keeps its first line.

Example:
  python stages/align_captions.py --manifest results/digits/manifest.parquet \\
      --captions results/digits/captions.jsonl --out results/digits/captions/aligned.parquet
  python stages/align_captions.py --manifest results/imagenet/manifest.parquet \\
      --captions /data/csfm/imagenet_captions.jsonl --prefix /data/imagenet/train \\
      --out results/imagenet/captions/aligned.parquet
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sourceflow import cli  # noqa: E402


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--manifest", required=True, help="manifest.parquet from prepare_data")
    p.add_argument("--captions", required=True, help="caption JSONL, one object per line")
    p.add_argument("--path-field", default="path", help="JSON field holding the image path")
    p.add_argument("--caption-field", default="recaption_short", help="JSON field holding the caption")
    p.add_argument("--prefix", default="",
                   help="cut from the start of caption paths before matching (e.g. the ImageNet train root "
                        "or a split folder like train/)")
    p.add_argument("--split", default="train", choices=["train", "test", "all"],
                   help="manifest rows to caption (CSFM's captions cover the train split)")
    p.add_argument("--min-match-fraction", type=float, default=0.99,
                   help="stop unless at least this fraction of the images has a caption")
    p.add_argument("--out", required=True, help="output aligned.parquet (match_report.json beside it)")
    cli.add_common(p)
    a = p.parse_args()

    from sourceflow.data.captions import align_captions, mismatch_message, read_caption_jsonl
    from sourceflow.data.manifest import manifest_hash, read_manifest
    from sourceflow.io import atomic_path, write_json

    if not 0.0 <= a.min_match_fraction <= 1.0:
        raise ValueError(f"--min-match-fraction must be in [0, 1], got {a.min_match_fraction}")
    man = read_manifest(a.manifest)
    rows = man.frame if a.split == "all" else man.split(a.split).frame
    caps = read_caption_jsonl(a.captions, a.path_field, a.caption_field)
    result = align_captions(rows, caps, prefix=a.prefix, split_roots=man.meta.get("split_roots", {}))
    out = Path(a.out)
    report = {"manifest": str(a.manifest), "manifest_hash": manifest_hash(a.manifest), "captions": str(a.captions),
              "path_field": a.path_field, "caption_field": a.caption_field, "split": a.split,
              "min_match_fraction": a.min_match_fraction, "ok": result.fraction >= a.min_match_fraction,
              **result.report}
    report_path = out.with_name("match_report.json")
    if not report["ok"]:
        out.unlink(missing_ok=True)  # a previous run's table must not outlive a failed alignment
        write_json(report_path, report)
        raise ValueError(f"{a.captions}: {mismatch_message(result.report, a.min_match_fraction)}")
    # the report goes last: embed_captions takes (table, report with ok: true) as a finished alignment, so
    # a kill between the two writes must not leave an old ok report beside a new table
    report_path.unlink(missing_ok=True)
    with atomic_path(out) as tmp:
        result.aligned.to_parquet(tmp, index=False, engine="pyarrow")
    write_json(report_path, report)
    r = result.report
    print(f"wrote {out}: {r['images_matched']}/{r['images']} images captioned "
          f"({100 * result.fraction:.2f}%), {r['images_without_caption']} get an empty caption; "
          f"{r['caption_paths_unmatched']} caption paths match no image, {r['duplicate_caption_lines']} duplicate lines")


if __name__ == "__main__":
    cli.run(main)
