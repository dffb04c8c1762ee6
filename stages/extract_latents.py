"""extract_latents: encode the images of one manifest split into a Zarr latent store: a global
descriptor ("CLS") and a spatial latent per image, optionally followed by the horizontally flipped
copies (rows M..2M-1 are the flips of rows 0..M-1).

The store is written shard by shard in place; each process owns whole shards. A killed run resumes
where it stopped when started again with the same arguments (finished shards are kept, a half-written
one is redone) and ends byte-identical to an uninterrupted run: the model runs in eval mode, and every
shard is encoded in the same fixed batches whatever the number of processes. The store is marked
complete only after every shard is verified; then a JSON report (rows, shards, settings) is written
beside it (`latents.zarr` -> `latents.json`), which is the file to depend on. Its timings (rows/s, share
of time spent writing) go to the log only (a `timings` line), so the report is byte-identical across runs.

Several processes: launch with torchrun (one process per GPU; on CPU they talk over gloo):
  torchrun --standalone --nproc_per_node 2 stages/extract_latents.py ... --device cuda

Example:
  python stages/extract_latents.py --manifest results/digits/manifest.parquet --split train \\
      --encoder pixels --resolution 8 --no-flips --out results/digits/pixels/latents.zarr
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sourceflow import cli  # noqa: E402


class ImageRows:
    """Dataset over store rows: row r is image r mod M of the split, flipped left-right when r >= M.

    Returns (uint8 [R, R, 3] or None, row, error message or ""): a bad image is reported by the main
    process as one line instead of a DataLoader worker traceback.
    """

    def __init__(self, paths: list[str], num_images: int, resolution: int) -> None:
        self.paths = paths
        self.num_images = num_images
        self.resolution = resolution

    def __len__(self) -> int:
        return 2 * self.num_images

    def __getitem__(self, row: int):
        import numpy as np

        from sourceflow.data.images import BadImageError, load_image

        try:
            img = load_image(self.paths[row % self.num_images], self.resolution)
        except BadImageError as e:
            return None, row, str(e)
        if row >= self.num_images:
            img = np.ascontiguousarray(img[:, ::-1])
        return img, row, ""


def collate(batch):
    """Stack a batch of :class:`ImageRows` items: (uint8 [B, R, R, 3] or None, rows [B], first error)."""
    import numpy as np

    errors = [e for _, _, e in batch if e]
    rows = np.array([r for _, r, _ in batch], dtype=np.int64)
    if errors:
        return None, rows, errors[0]
    return np.stack([img for img, _, _ in batch]), rows, ""


def shard_batches(shards: list[int], shard_rows: int, num_rows: int, batch_size: int) -> list[list[int]]:
    """Row lists per batch: each shard cut into batches from its first row, so batch composition per
    shard does not depend on how shards are spread over processes or on where a run resumed."""
    out = []
    for s in shards:
        a, b = s * shard_rows, min((s + 1) * shard_rows, num_rows)
        out.extend(list(range(i, min(i + batch_size, b))) for i in range(a, b, batch_size))
    return out


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--manifest", required=True, help="manifest.parquet (manifest.json beside it)")
    p.add_argument("--image-root", default=None, help="image root; default: the root recorded in manifest.json")
    p.add_argument("--split", default="train", choices=["train", "test"], help="manifest split to encode")
    p.add_argument("--encoder", required=True, choices=["pixels", "dinov2", "siglip2", "mae", "sd-vae", "rae"],
                   help="image encoder (see sourceflow/encoders)")
    p.add_argument("--weights", default=None,
                   help="encoder weights: a local save_pretrained folder or a hub id; left out: the encoder's "
                        "standard hub id, which needs the hub or its cache; pixels takes none")
    p.add_argument("--resolution", type=int, required=True, help="images are ADM-centre-cropped to R x R")
    p.add_argument("--pool", type=int, default=None,
                   help="pixels encoder only: average-pool the image to pool x pool for the CLS descriptor")
    p.add_argument("--input-size", type=int, default=None,
                   help="dinov2/siglip2/mae only: resize images to this side (bicubic) before the model "
                        "(RAE resizes its 256 px images to 224 for DINOv2); default: --resolution")
    p.add_argument("--flips", action=argparse.BooleanOptionalAction, default=False,
                   help="also store horizontally flipped copies (rows M..2M-1)")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder call")
    p.add_argument("--shard-rows", type=int, default=256,
                   help="rows per shard: the unit of writing, ownership between processes and resume")
    p.add_argument("--workers", type=int, default=0,
                   help="DataLoader worker processes decoding images (0: decode in the main process)")
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda (each torchrun process takes cuda:LOCAL_RANK) or an explicit device")
    p.add_argument("--compressor", default="none", choices=["none", "lz4"],
                   help="codec for the arrays (float latents barely compress)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"],
                   help="float type of the stored latents (float16: half the disk and the bytes per training batch)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete an existing store made with different settings instead of refusing")
    p.add_argument("--out", required=True, help="output store, e.g. results/digits/pixels/latents.zarr; "
                                                "the report goes beside it with suffix .json")
    p.add_argument("--stop-after-shards", type=int, default=None, help=argparse.SUPPRESS)  # tests: exit hard
    cli.add_common(p)
    a = p.parse_args()
    cli.set_threads(a.threads)

    import numpy as np
    import torch

    from sourceflow.data.images import BadImageError, to_model_range
    from sourceflow.data.manifest import manifest_hash, read_manifest
    from sourceflow.encoders import load_encoder
    from sourceflow.io import log_timings, read_json, write_json
    from sourceflow.progress import bar as progress_bar
    from sourceflow.store.latents import (
        LAYOUT_VERSION,
        LatentStore,
        LatentWriter,
        expected_index_flip,
        num_rows_of,
    )

    for flag in ("batch_size", "shard_rows"):
        if getattr(a, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {getattr(a, flag)}")
    torch.manual_seed(a.seed)
    dist = Dist()
    device = torch.device(f"cuda:{dist.local_rank}" if a.device == "cuda" else a.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # same kernels for the same batch on every run, so a resumed store stays byte-identical
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True

    out = Path(a.out)
    report_path = out.with_suffix(".json")
    manifest = read_manifest(a.manifest, root=a.image_root).split(a.split)
    num_images = len(manifest)
    image_index = manifest.frame["index"].to_numpy()
    num_rows = num_rows_of(num_images, a.flips)
    options = {k: v for k, v in (("pool", a.pool), ("input_size", a.input_size)) if v is not None}
    encoder = load_encoder(a.encoder, a.weights, a.resolution, device, **options)
    identity = {"encoder": a.encoder, "weights": a.weights, "encoder_options": options, "resolution": a.resolution,
                "manifest_hash": manifest_hash(a.manifest), "split": a.split}
    shape_args = {"cls_dim": encoder.cls_dim, "spatial_shape": encoder.spatial_shape, "num_images": num_images,
                  "flips": a.flips, "shard_rows": a.shard_rows}

    # Rank 0 creates the store or checks that the existing one is the same extraction, then everyone opens it.
    if dist.rank == 0:
        if out.exists():
            if not (out / "zarr.json").is_file():
                raise ValueError(f"{out}: exists but is not a Zarr store; delete it")
            full = dict(identity, **shape_args, compressor=a.compressor, dtype=a.dtype, layout_version=LAYOUT_VERSION)
            full["spatial_shape"] = list(full["spatial_shape"])
            diff = LatentWriter.identity_mismatch(out, full)
            if diff and not a.overwrite:
                what = "; ".join(f"{k}: stored {v[0]!r}, now {v[1]!r}" for k, v in diff.items())
                raise ValueError(f"{out}: existing latent store was made with different settings ({what}); "
                                 f"delete it or pass --overwrite")
            if diff:
                import shutil

                print(f"{out}: settings changed ({', '.join(diff)}); starting over", file=sys.stderr)
                shutil.rmtree(out)
        if not out.exists():
            LatentWriter.create(out, identity, compressor=a.compressor, dtype=a.dtype, **shape_args)
        else:
            LatentWriter(out).clean_partial_files()
    dist.barrier()
    writer = LatentWriter(out)
    if writer.attrs.get("complete"):
        if dist.rank == 0:
            writer.mark_complete()  # idempotent; drops done markers a kill right after completion left behind
            if not report_path.is_file():
                write_json(report_path, {"store": str(out), "already_complete": True, "rows": num_rows})
            print(f"{out}: already complete ({num_rows} rows); nothing to do")
        dist.close()
        return
    pending = writer.pending_shards()
    dist.barrier()  # everyone has listed the finished shards before anyone writes a new one
    mine = pending[dist.rank::dist.world]
    resumed = writer.num_shards - len(pending)
    if dist.rank == 0 and resumed:
        print(f"{out}: resuming, {resumed} of {writer.num_shards} shards already written", file=sys.stderr)

    paths = [str(manifest.abspath(i)) for i in range(num_images)]
    batches = shard_batches(mine, a.shard_rows, num_rows, a.batch_size)
    loader = torch.utils.data.DataLoader(ImageRows(paths, num_images, a.resolution), batch_sampler=batches,
                                         num_workers=a.workers, collate_fn=collate,
                                         persistent_workers=False, prefetch_factor=4 if a.workers else None)
    rows_mine = sum(len(b) for b in batches)
    bar = progress_bar(total=rows_mine, desc=f"extract {a.encoder}", unit="img", disable=dist.rank != 0)
    t_start = time.perf_counter()
    t_load = t_encode = 0.0
    shards_out = ShardWriter(writer, a.stop_after_shards)
    shard = None
    buf: dict[str, np.ndarray] = {}
    all_index, all_flip = expected_index_flip(image_index, a.flips)
    t0 = time.perf_counter()
    for images, rows, error in loader:
        t_load += time.perf_counter() - t0
        if error:
            raise BadImageError(error)
        s = int(rows[0]) // a.shard_rows
        if s != shard:  # a fresh buffer per shard: the previous one may still be being written
            shard = s
            lo, hi = writer.shard_range(s)
            buf = {"cls": np.empty((hi - lo, encoder.cls_dim), np.float32),
                   "spatial": np.empty((hi - lo, *encoder.spatial_shape), np.float32)}
        t1 = time.perf_counter()
        cls, spatial = encoder.encode(to_model_range(images).to(device))
        buf["cls"][rows - lo] = cls.cpu().numpy()
        buf["spatial"][rows - lo] = spatial.cpu().numpy()
        t_encode += time.perf_counter() - t1
        if rows[-1] == hi - 1:
            shards_out.submit(s, {"cls": buf["cls"], "spatial": buf["spatial"], "index": all_index[lo:hi],
                                  "flip": all_flip[lo:hi]})
        bar.update(len(rows))
        t0 = time.perf_counter()
    shards_out.close()
    bar.close()
    t_mine = time.perf_counter() - t_start
    dist.barrier()
    totals = dist.sum([float(rows_mine), t_mine, t_load, t_encode, shards_out.busy, shards_out.wait])
    if dist.rank == 0:
        problems = writer.verify(all_index, all_flip)
        if problems:
            raise ValueError(f"{out}: store incomplete after extraction: {'; '.join(problems[:3])}")
        writer.mark_complete()
        wall = time.perf_counter() - t_start
        rows_done, busy, load_s, encode_s, write_s, wait_s = totals
        report = {
            "store": str(out), "encoder": a.encoder, "weights": a.weights, "encoder_options": options,
            "resolution": a.resolution, "split": a.split, "flips": a.flips, "num_images": num_images,
            "rows": num_rows, "shards": writer.num_shards, "processes": dist.world, "device": str(device), "batch_size": a.batch_size,
            "shard_rows": a.shard_rows, "workers": a.workers, "threads": a.threads,
            "cls_dim": encoder.cls_dim, "spatial_shape": list(encoder.spatial_shape),
        }
        write_json(report_path, report)
        assert read_json(report_path)["rows"] == num_rows
        LatentStore.open(out)  # complete and readable
        # shares of the processes' summed wall time: waiting for images, encoding (incl. the copy to host
        # memory), writing shards (in a background thread, overlapping the next shard's encoding) and waiting
        # for that thread (the part of writing that is not hidden); in the log, not in latents.json, like the
        # rows encoded and shards resumed by this run: a resumed store's latents.json must be the bytes of an
        # uninterrupted run's (issue 10, item 1: benchmarks/kill_soak.py)
        t = log_timings("extract_latents", wall_s=round(wall, 3), rows_this_run=int(rows_done),
                        shards_resumed=resumed,
                        rows_per_s=round(rows_done / wall, 2) if wall > 0 else None,
                        load_share=round(load_s / busy, 4) if busy else None,
                        encode_share=round(encode_s / busy, 4) if busy else None,
                        write_share=round(write_s / busy, 4) if busy else None,
                        write_wait_share=round(wait_s / busy, 4) if busy else None)
        share = {k: f"{t[k]:.1%}" if t[k] is not None else "?" for k in t if k.endswith("_share")}
        print(f"wrote {out}: {num_rows} rows ({num_images} images{' + flips' if a.flips else ''}), "
              f"{int(rows_done)} encoded now in {wall:.1f} s = {t['rows_per_s']} rows/s on {dist.world} "
              f"process(es); share of time loading {share['load_share']}, encoding {share['encode_share']}, "
              f"writing {share['write_share']} (waited for writes {share['write_wait_share']})")
    dist.close()


class ShardWriter:
    """Writes finished shards in one background thread while the next shard is encoded (at most one
    shard in flight, so memory holds two shard buffers); ``busy`` is the thread's writing time, ``wait``
    the time the main loop blocked on it."""

    def __init__(self, writer, stop_after: int | None = None) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.writer = writer
        self.stop_after = stop_after
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self.future = None
        self.busy = self.wait = 0.0
        self.written = 0

    def _write(self, s: int, arrays: dict) -> None:
        t = time.perf_counter()
        self.writer.write_shard(s, arrays)
        self.busy += time.perf_counter() - t

    def submit(self, s: int, arrays: dict) -> None:
        self.drain()
        self.future = self.pool.submit(self._write, s, arrays)

    def drain(self) -> None:
        if self.future is None:
            return
        t = time.perf_counter()
        self.future.result()  # re-raises a failed write here
        self.wait += time.perf_counter() - t
        self.future = None
        self.written += 1
        if self.stop_after is not None and self.written >= self.stop_after:
            sys.stderr.flush()
            os._exit(17)  # tests: die like a killed job, no cleanup

    def close(self) -> None:
        self.drain()
        self.pool.shutdown()


class Dist:
    """torch.distributed (gloo) when launched by torchrun with WORLD_SIZE > 1, else a single process.

    gloo also works beside CUDA: the only collectives are barriers and one small sum.
    """

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.pg = None
        if self.world > 1:
            from datetime import timedelta

            import torch.distributed as td

            td.init_process_group("gloo", timeout=timedelta(hours=6))
            if td.get_world_size() != self.world:
                raise ValueError(f"torch.distributed world size {td.get_world_size()} != WORLD_SIZE {self.world}")
            self.pg = td

    def barrier(self) -> None:
        if self.pg is not None:
            self.pg.barrier()

    def sum(self, values: list[float]) -> list[float]:
        if self.pg is None:
            return values
        import torch

        t = torch.tensor(values, dtype=torch.float64)
        self.pg.all_reduce(t)
        return t.tolist()

    def close(self) -> None:
        if self.pg is not None:
            self.pg.destroy_process_group()


if __name__ == "__main__":
    cli.run(main)
