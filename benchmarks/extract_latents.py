"""Benchmark extract_latents: rows per second and where the time goes (image loading, encoding, writing
the Zarr shards) on synthetic JPEG images.

Cases: the pixel encoder at 64 px; a tiny random DINOv2 (with registers) at 64 px; the pixel encoder at
256 px, whose rows (3x256x256 float32 = 768 KiB) are as large as DINOv2-B latents (768x16x16), i.e. the
write load of a real RAE/MM-FM extraction. Each case runs the real stage in a fresh process (one
torch thread unless --threads) and reads the report it writes beside the store; the wall time excludes
interpreter start-up and model loading. Shares are of the stage's wall time: waiting for decoded images,
encoding, writing shards (a background thread, overlapping the next shard's encoding) and the part of
writing the main loop had to wait for.

Usage:
  python benchmarks/extract_latents.py                 # all cases
  python benchmarks/extract_latents.py --images 500 --cases pixels-64 --keep /tmp/bench
Prints one markdown table row per case, with the command that ran it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from sourceflow.io import read_timings  # noqa: E402


def make_images(root: Path, n: int, size: int) -> Path:
    """n smooth random JPEGs of 5/4 size (so the ADM crop resizes), and a manifest; returns its path."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    from sourceflow.data.manifest import write_manifest

    manifest = root / "manifest.parquet"
    if manifest.is_file():
        return manifest
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True, exist_ok=True)
    side = size * 5 // 4
    for i in range(n):
        low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((side, side), Image.Resampling.BICUBIC)
        noise = rng.integers(-12, 13, (side, side, 3))
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.int64) + noise, 0, 255).astype(np.uint8))
        img.save(root / "img" / f"{i:06d}.jpg", quality=90)
    frame = pd.DataFrame({"index": range(n), "path": [f"img/{i:06d}.jpg" for i in range(n)], "label": -1,
                          "split": "train"})
    write_manifest(manifest, frame, {"source": "synthetic", "root": str(root), "num_classes": 0})
    return manifest


def make_dinov2(path: Path) -> Path:
    import torch
    import transformers as tf

    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        tf.Dinov2WithRegistersModel(tf.Dinov2WithRegistersConfig(
            image_size=64, patch_size=8, num_register_tokens=4, hidden_size=96, num_hidden_layers=4,
            num_attention_heads=4, intermediate_size=384)).save_pretrained(path)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000, help="images per 64 px case (the 256 px case uses a quarter)")
    p.add_argument("--cases", default="pixels-64,dinov2-tiny-64,pixels-256", help="comma-separated cases")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the stage")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers of the stage")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-rows", type=int, default=256)
    p.add_argument("--keep", default=None, help="work folder to keep (default: a temporary one)")
    a = p.parse_args()

    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="bench_extract_"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    rows = []
    for case in a.cases.split(","):
        encoder, res = ("dinov2", 64) if case.startswith("dinov2") else ("pixels", int(case.split("-")[1]))
        n = a.images if res <= 64 else max(1, a.images // 4)
        manifest = make_images(work / f"img{res}_{n}", n, res)
        out = work / case / "latents.zarr"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        cmd = [sys.executable, str(ROOT / "stages" / "extract_latents.py"), "--manifest", str(manifest),
               "--encoder", encoder, "--resolution", str(res), "--no-flips", "--batch-size", str(a.batch_size),
               "--shard-rows", str(a.shard_rows), "--workers", str(a.workers), "--threads", str(a.threads),
               "--out", str(out)]
        if encoder == "dinov2":
            cmd += ["--weights", str(make_dinov2(work / "dinov2-tiny"))]
        res = subprocess.run(cmd, check=True, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        rep = read_timings(res.stdout, "extract_latents")[-1]  # timings: on stdout, not in latents.json
        mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
        rows.append(f"| {case} | {n} | {rep['rows_per_s']:.1f} | {rep['load_share']:.1%} | {rep['encode_share']:.1%} "
                    f"| {rep['write_share']:.1%} | {rep['write_wait_share']:.1%} | {mb:.0f} MiB | `{shlex.join(cmd[1:]).replace(str(work), '$W')}` |")
        print(rows[-1], flush=True)
    print()
    print("| case | images | rows/s | load | encode | write (background) | waited for writes | store | command |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\n($W = {work}; threads {a.threads}, workers {a.workers}, cores {os.cpu_count()})")


if __name__ == "__main__":
    main()
