"""Benchmark: the training input path on a latent store larger than this machine's page cache can keep warm.

Writes a synthetic latent store of ImageNet-RAE geometry (spatial 768x16x16 and CLS 768 per row, float16,
4096-row shards, the layout `config/imagenet256-mmfm.yaml` writes) of at least --gb GB through the real
`LatentWriter`, then reads training batches from it exactly as `stages/train.py` does
(`sourceflow.train.batches.step_rows` over a `BatchPlan` of random rows; spatial rows normalised, CLS rows
for MM-FM's posterior, labels in memory) at --batch rows per step:

- cold: every store file dropped from the page cache first (posix_fadvise DONTNEED), in the training
  process (workers 0) and with --workers reading processes; rows/s, and the bytes read from storage per row
  (/proc/self/io read_bytes, or the reading processes' block input from getrusage) against the row's own
  bytes (read amplification);
- warm: the same rows again from the page cache: the CPU cost of Zarr's decoding per reading process
  (what bounds input when storage is fast).

Then projects the full-scale input time per step, per GPU, beside the GPU step time of the plan
(`stages/plan.py`: the train job's hours / steps of --config's first GMM-source experiment): rows per step per
GPU = batch / GPUs; reading processes per GPU as `train.loader.workers: auto` picks them on a node of
--node-cores; and the storage bandwidth the node needs beside the one measured here. Appends the table to
benchmarks/RESULTS.md (--no-write: print only). The store is deleted at the end unless --keep.

  python benchmarks/data_path.py                     # 20 GB store in /tmp, batch 1024
  python benchmarks/data_path.py --gb 2 --no-write   # a quick look
  python benchmarks/data_path.py --plan p.json       # GPU step time from a saved plan (else planned here)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from default_run import machine  # noqa: E402

SPATIAL, CLS = (768, 16, 16), 768


def proc_io() -> dict[str, int]:
    return {k: int(v) for k, v in (ln.split(": ") for ln in Path("/proc/self/io").read_text().splitlines())}


def drop_cache(path: Path) -> None:
    """Evict every file of ``path`` from the page cache (works without root for files we can open)."""
    for f in path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def write_store(path: Path, num_images: int, shard_rows: int) -> float:
    """A complete float16 store of ``2 * num_images`` rows (flips) of cheap pseudo-random latents; seconds."""
    import numpy as np

    from sourceflow.progress import bar
    from sourceflow.store.latents import LatentWriter, expected_index_flip

    t0 = time.perf_counter()
    LatentWriter.create(path, {"encoder": "synthetic", "weights": None, "encoder_options": {}, "resolution": 256,
                               "manifest_hash": None, "split": "train"}, cls_dim=CLS, spatial_shape=SPATIAL,
                        num_images=num_images, flips=True, shard_rows=shard_rows, dtype="float16")
    w = LatentWriter(path)
    index, flip = expected_index_flip(np.arange(num_images), True)
    g = np.random.default_rng(0)
    base = g.normal(size=(64, *SPATIAL)).astype(np.float32)
    with bar(total=w.num_rows, desc="write store", unit="row") as pb:
        for s in range(w.num_shards):
            a, b = w.shard_range(s)
            rows = np.arange(a, b)
            spatial = base[rows % 64] + (rows % 997).astype(np.float32)[:, None, None, None] * 1e-3
            cls = spatial[:, :, 0, 0].copy()
            w.write_shard(s, {"cls": cls, "spatial": spatial, "index": index[a:b], "flip": flip[a:b]})
            pb.update(b - a)
    assert w.verify(index, flip) == []
    w.mark_complete()
    return time.perf_counter() - t0


def read_steps(store: Path, batch: int, steps: int, workers: int, seed: int, prefetch: int = 4) -> dict:
    """Read ``steps`` training batches of random rows as the training loop does; rows/s and bytes read."""
    import torch

    from sourceflow.data.latent_data import StoreRows
    from sourceflow.store.latents import LatentStore
    from sourceflow.store.stats import LatentStats
    from sourceflow.train.batches import step_rows
    from sourceflow.train.loop import ArrayDataset, BatchPlan

    st = LatentStore.open(store)
    stats = LatentStats(torch.zeros(SPATIAL), torch.ones(SPATIAL), 1e-5, "std")
    data = ArrayDataset(StoreRows(st.array("spatial"), None, stats.normalize, in_memory=False),
                        torch.zeros(st.num_rows, dtype=torch.int64),
                        StoreRows(st.array("cls"), None, None, in_memory=False))
    plan = BatchPlan(st.num_rows, batch, seed)
    io0, ru0 = proc_io(), resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    first = None
    n = 0
    for item in step_rows(data, plan, batch, slice(None), 1, 0, steps, workers, prefetch):
        (x, idx, cond, cls), = item
        assert x.shape == (batch, *SPATIAL) and x.dtype == torch.float32 and cls.shape == (batch, CLS)
        n += len(idx)
        first = first or time.perf_counter() - t0
    wall = time.perf_counter() - t0
    io1, ru1 = proc_io(), resource.getrusage(resource.RUSAGE_CHILDREN)
    disk = (io1["read_bytes"] - io0["read_bytes"]) + 512 * (ru1.ru_inblock - ru0.ru_inblock)
    return {"workers": workers, "rows": n, "wall_s": wall, "first_step_s": first, "rows_per_s": n / wall,
            "disk_bytes_per_row": disk / n, "rchar_per_row": (io1["rchar"] - io0["rchar"]) / n if workers == 0 else None}


def plan_step(config: str, plan_json: str | None) -> dict:
    """GPU step time of the config's first GMM-source (else first) train job, from the plan."""
    import yaml

    if plan_json:
        jobs = json.loads(Path(plan_json).read_text())["jobs"]
    else:
        from sourceflow.plan import Planner, load_config, to_json

        planner = Planner(load_config(config))
        jobs = to_json(planner.plan(), planner, config)["jobs"]
    cfg = yaml.safe_load(Path(config).read_text())
    names = [e["name"] for e in cfg["experiments"]]
    gmm = [e["name"] for e in cfg["experiments"] if (e.get("source") or {}).get("kind") == "gmm"]
    train = {j["experiment"]: j for j in jobs if j["rule"] == "train"}
    name = next(n for n in gmm + names if n in train)
    exp = next(e for e in cfg["experiments"] if e["name"] == name)
    t = {**cfg["datasets"][exp["data"]].get("defaults", {}).get("train", {}), **(exp.get("overrides") or {}).get("train", {})}
    j = train[name]
    return {"experiment": name, "gpus": j["gpus"], "batch": t["batch_size"], "steps": t["steps"],
            "step_s": j["hours"] * 3600 / t["steps"], "grad_accum": j["grad_accum"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=20.0, help="store size to write (GB, 1e9 bytes)")
    p.add_argument("--dir", default="/tmp/sourceflow-data-path", help="scratch folder for the store (deleted first)")
    p.add_argument("--batch", type=int, default=1024, help="rows per training step read")
    p.add_argument("--steps", type=int, default=6, help="steps read per measurement")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="reading-process counts to measure")
    p.add_argument("--config", default=str(ROOT / "config" / "imagenet256-mmfm.yaml"), help="config to project to")
    p.add_argument("--plan", default=None, help="a stages/plan.py --json file of --config (else planned here)")
    p.add_argument("--node-cores", type=int, default=64, help="CPU cores of a full-scale GPU node (for workers: auto)")
    p.add_argument("--shard-rows", type=int, default=None, help="rows per shard (default: --config's RAE encoder's)")
    p.add_argument("--keep", action="store_true", help="keep the store")
    p.add_argument("--no-write", action="store_true", help="print without appending to --out")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    a = p.parse_args()

    import yaml

    cfg = yaml.safe_load(Path(a.config).read_text())
    shard = a.shard_rows or next(int(e.get("shard_rows", 1024)) for d in cfg["datasets"].values()
                                 for e in (d.get("encoders") or {}).values() if e.get("kind") == "rae")
    row_bytes = 2 * (CLS + SPATIAL[0] * SPATIAL[1] * SPATIAL[2]) + 9
    num_images = -(-int(a.gb * 1e9 / row_bytes) // 2)
    base = Path(a.dir)
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    store = base / "latents.zarr"
    try:
        write_s = write_store(store, num_images, shard)
        size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
        print(f"store: {2 * num_images} rows, {size / 1e9:.1f} GB written in {write_s:.0f} s", flush=True)
        runs = []
        for i, w in enumerate(a.workers):
            drop_cache(store)
            r = read_steps(store, a.batch, a.steps, w, seed=100 + i)
            r["cache"] = "cold"
            runs.append(r)
            print(json.dumps(r), flush=True)
        # the rows of the last cold run again, now in the page cache: the reading processes' CPU cost
        warm = read_steps(store, a.batch, a.steps, 0, seed=100 + len(a.workers) - 1)
        warm["cache"] = "warm"
        runs.append(warm)
        print(json.dumps(warm), flush=True)
    finally:
        if not a.keep:
            shutil.rmtree(base, ignore_errors=True)

    ps = plan_step(a.config, a.plan)
    local = ps["batch"] // ps["gpus"]
    workers = max(1, min(8, a.node_cores // ps["gpus"] - 1))  # sourceflow.train.batches.resolve_workers
    cold0 = runs[0]
    cpu_rate = warm["rows_per_s"]  # one reading process, storage not limiting
    input_s = local / (cpu_rate * workers)
    need_gbps = ps["batch"] * row_bytes / ps["step_s"] / 1e9
    lines = [
        f"\n## Training input path on a {size / 1e9:.1f} GB latent store ({dt.date.today().isoformat()})\n",
        f"`python benchmarks/data_path.py {' '.join(sys.argv[1:])}`".rstrip() + f" on {machine()}, load "
        f"{'/'.join(f'{v:.2f}' for v in os.getloadavg())} at the end. Store: {2 * num_images} rows of ImageNet-RAE "
        f"geometry (spatial {SPATIAL} + CLS {CLS}, float16: {row_bytes} B per row), {shard}-row shards, "
        f"row-granular chunks, written in {write_s:.0f} s. Each measurement reads {a.steps} steps of {a.batch} "
        "random rows through `sourceflow.train.batches.step_rows` (spatial normalised to float32, CLS rows, "
        "labels in memory); cold = every store file evicted from the page cache first.\n",
        "| cache | reading processes | rows/s | first step s | bytes from storage per row | read amplification |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        amp = r["disk_bytes_per_row"] / row_bytes
        lines.append(f"| {r['cache']} | {r['workers'] or 'in the training process'} | {r['rows_per_s']:.0f} | "
                     f"{r['first_step_s']:.2f} | {r['disk_bytes_per_row'] / 1e3:.0f} kB | "
                     f"{amp:.2f}x{' (cached)' if r['cache'] == 'warm' else ''} |")
    if cold0["rchar_per_row"]:
        lines.append(f"\nBytes the training process asked for per row (rchar, cold, in process): "
                     f"{cold0['rchar_per_row'] / 1e3:.0f} kB = {cold0['rchar_per_row'] / row_bytes:.2f}x the row.")
    lines += [
        f"\nProjection to `{Path(a.config).name}` ({ps['experiment']}): {ps['batch']} rows per step over "
        f"{ps['gpus']} GPUs = {local} rows per GPU per step; `workers: auto` on a {a.node_cores}-core node = "
        f"{workers} reading processes per GPU, each decoding {cpu_rate:.0f} rows/s (warm, measured here) -> "
        f"**input {input_s:.3f} s per step** (in the background, `prefetch` steps ahead) vs **GPU step "
        f"{ps['step_s']:.3f} s** (the plan: train hours x 3600 / {ps['steps']} steps, grad_accum "
        f"{ps['grad_accum']}). Storage: the node reads {need_gbps:.2f} GB/s of rows at that step rate "
        f"(measured here, cold, one process: {cold0['rows_per_s'] * row_bytes / 1e9:.2f} GB/s; "
        f"with {runs[-2]['workers']} processes {runs[-2]['rows_per_s'] * row_bytes / 1e9:.2f} GB/s).",
        "Before this change (float32 store, 4-row chunks, rows read in line): a random row read 4 rows "
        f"({4 * 4 * SPATIAL[0] * SPATIAL[1] * SPATIAL[2] / 1e6:.1f} MB) and the CLS row its 1024-row chunk "
        f"({1024 * 4 * CLS / 1e6:.1f} MB), both in the training step.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not a.no_write:
        with open(a.out, "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
