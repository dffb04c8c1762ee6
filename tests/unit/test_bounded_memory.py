"""Bounded memory of the stages that read whole datasets (issue 8): latent_stats' peak is a function of its
batch and the row shape, not of the number of rows; the report reads only the sample rows it shows.

Peaks are measured with tracemalloc (numpy, Zarr and zipfile allocate through Python's allocator) and, for
latent_stats, also as the max RSS of a child process, on stores several times larger than a batch."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import sourceflow.store.sharded as sharded
from sourceflow.store.latents import LatentStore, LatentWriter, expected_index_flip
from sourceflow.store.stats import compute_latent_stats, subset_rows

ROOT = Path(__file__).resolve().parents[2]
SHAPE = (16, 8, 8)  # 4 KiB rows
SHARD_ROWS = 256  # 1 MiB shards of 4-row (16 KiB) inner chunks


def make_store(path: Path, num_images: int, shape: tuple[int, ...] = SHAPE, shard_rows: int = SHARD_ROWS,
               chunk_rows: int | None = 4) -> LatentStore:
    """A complete store of random rows with flips (2 × num_images rows); ``chunk_rows`` forces the inner
    chunking (None: the store's own rule, sourceflow.store.sharded.chunk_rows)."""
    if chunk_rows is not None:
        real = sharded.chunk_rows
        sharded.chunk_rows = lambda s, row_bytes, target=0: chunk_rows
    try:
        LatentWriter.create(path, {"encoder": "test"}, cls_dim=2, spatial_shape=shape, num_images=num_images,
                            flips=True, shard_rows=shard_rows)
    finally:
        if chunk_rows is not None:
            sharded.chunk_rows = real
    w = LatentWriter(path)
    index, flip = expected_index_flip(np.arange(num_images), True)
    rng = np.random.default_rng(0)
    for s in range(w.num_shards):
        a, b = w.shard_range(s)
        w.write_shard(s, {"cls": np.zeros((b - a, 2), np.float32), "index": index[a:b], "flip": flip[a:b],
                          "spatial": rng.normal(size=(b - a, *shape)).astype(np.float32)})
    w.mark_complete()
    return LatentStore.open(path)


def traced_peak(fn) -> int:
    fn()  # warm: imports and Zarr's first-use allocations are not part of the steady state
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("subset", [True, False], ids=["subset", "all-rows"])
def test_latent_stats_peak_does_not_grow_with_the_store(tmp_path, subset):
    """A store 4× larger (1024 → 4096 rows, 4 → 16 MiB) leaves the peak where it was, about the float64
    batch plus a few chunks, and below one shard (no whole-shard reads)."""
    batch = 32
    batch_f64 = batch * int(np.prod(SHAPE)) * 8
    peaks = {}
    for m in (512, 2048):
        store = make_store(tmp_path / f"s{m}.zarr", m)
        rows = subset_rows(m, 128, seed=0) if subset else None
        peaks[m] = traced_peak(lambda store=store, rows=rows: compute_latent_stats(store, batch, rows=rows))
    print(f"peaks (bytes): {peaks}; float64 batch {batch_f64}")
    assert peaks[2048] <= 1.15 * peaks[512] + 32 * 1024
    assert peaks[2048] < 2.5 * batch_f64
    assert peaks[2048] < SHARD_ROWS * int(np.prod(SHAPE)) * 4  # less than one shard of the 16 MiB store


CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
from sourceflow.store.latents import LatentStore
from sourceflow.store.stats import compute_latent_stats, subset_rows
def maxrss_mib():
    # VmHWM: this process's own peak RSS (getrusage's ru_maxrss carries the parent's peak across fork + exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
rss = []
for path in sys.argv[2:]:
    store = LatentStore.open(path)
    compute_latent_stats(store, 16, rows=subset_rows(store.num_images, 64, 0))
    compute_latent_stats(store, 16)
    rss.append(maxrss_mib())
whole = np.asarray(store.array("spatial")[:])  # what reading the store whole costs: the instrument's check
rss.append(maxrss_mib())
print(json.dumps(rss))
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc for the peak RSS (VmHWM)")
def test_latent_stats_max_rss_does_not_grow_with_the_store(tmp_path):
    """One child process computes the stats (a 64-image subset, then all rows; 16-row batches = 2 MiB in
    float64) on a 12 MiB store, then on a 96 MiB one: its max RSS grows by less than 12 MiB (three of the 4 MiB
    chunks this store had before chunks became row-granular; a
    read proportional to the store would add ~84 MiB). Measured: +4 MiB, and no more from 96 to 192 MiB
    stores (+4 MiB steps until Zarr's I/O threads have each kept a chunk buffer). Reading the big store
    whole afterwards does raise it by ~96 MiB, so the measurement sees such growth."""
    shape = (64, 16, 16)  # 64 KiB rows, the store's own chunking (one row per chunk in 16 MiB shards)
    paths = []
    for m in (96, 768):
        paths.append(tmp_path / f"s{m}.zarr")
        make_store(paths[-1], m, shape=shape, chunk_rows=None)
    out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), *map(str, paths)], capture_output=True,
                         text=True, check=True)
    small, big, whole = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"max RSS (MiB): after the 12 MiB store {small:.1f}, after the 96 MiB store {big:.1f}, "
          f"after reading it whole {whole:.1f}")
    assert big - small < 12
    assert whole - big > 64


def write_npz(path: Path, compressed: bool = False, n: int = 8192, side: int = 64) -> np.ndarray:
    """An ADM-layout samples.npz: arr_0 uint8 [n, side, side, 3] (100 MiB at the defaults) and label."""
    images = np.random.default_rng(0).integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    with open(path, "wb") as f:
        (np.savez_compressed if compressed else np.savez)(f, arr_0=images, label=np.arange(n))
    return images


def test_report_reads_only_the_rows_it_shows(tmp_path):
    """The grid's 36 tiles from a 100 MiB arr_0: the same rows as the old full read (np.load, then [:36]),
    with a peak of about those rows (442 KiB), not the array."""
    from sourceflow.report import read_npz_rows

    path = tmp_path / "samples.npz"
    images = write_npz(path)
    assert path.stat().st_size > 100e6
    with np.load(path) as z:
        old = z["arr_0"][:36]
    got = read_npz_rows(path, "arr_0", 36)
    assert got.dtype == np.uint8 and got.flags.writeable
    np.testing.assert_array_equal(got, old)
    peak = traced_peak(lambda: read_npz_rows(path, "arr_0", 36))
    print(f"peak reading 36 of {len(images)} rows: {peak} bytes (rows: {old.nbytes})")
    assert peak < old.nbytes + 2 * 2**20
    del images
    np.testing.assert_array_equal(read_npz_rows(path, "label", 5), np.arange(5))
    np.testing.assert_array_equal(read_npz_rows(path, "label"), np.arange(8192))  # None: all rows
    assert read_npz_rows(path, "label", 10**6).shape == (8192,)
    with pytest.raises(KeyError, match="no array 'x'"):
        read_npz_rows(path, "x", 3)


def test_npz_rows_from_compressed_and_odd_members(tmp_path):
    """A deflated member streams too; a Fortran-order array (rows not contiguous) is read whole, still right;
    a truncated member is an error, not short data; object arrays are refused."""
    from sourceflow.report import read_npz_rows

    path = tmp_path / "c.npz"
    images = write_npz(path, compressed=True, n=64, side=8)
    np.testing.assert_array_equal(read_npz_rows(path, "arr_0", 7), images[:7])
    f_order = np.asfortranarray(np.arange(60.0).reshape(10, 6))
    np.savez(tmp_path / "f.npz", a=f_order)
    np.testing.assert_array_equal(read_npz_rows(tmp_path / "f.npz", "a", 3), f_order[:3])
    np.savez(tmp_path / "o.npz", a=np.array([{"k": 1}], dtype=object))
    with pytest.raises(ValueError, match="objects"):
        read_npz_rows(tmp_path / "o.npz", "a", 1)
    import zipfile

    # the header says 64 rows, the data holds 2
    with zipfile.ZipFile(tmp_path / "t.npz", "w") as zf, zf.open("arr_0.npy", "w") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (64, 8, 8, 3)})
        f.write(images[:2].tobytes())
    with pytest.raises(ValueError, match="truncated"):
        read_npz_rows(tmp_path / "t.npz", "arr_0", 5)


def test_report_stage_grid_is_the_one_a_whole_array_read_draws(tmp_path, monkeypatch, capsys):
    """The report stage asks for grid_images rows only, and its samples_{dataset}.png is byte-identical to
    the one drawn when every samples.npz is read whole (the old np.load path)."""
    import runpy

    import pandas as pd
    from PIL import Image

    import sourceflow.report as report
    from sourceflow.data.manifest import write_manifest

    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
    frame = pd.DataFrame({"index": range(12), "path": [f"img/{i}.png" for i in range(12)], "label": [0] * 12,
                          "split": ["train"] * 12})
    write_manifest(tmp_path / "manifest.parquet", frame, {"root": str(tmp_path), "resolution": 8, "num_classes": 1})
    runs = []
    for exp in ("fm", "otcfm"):
        d = tmp_path / "runs" / exp / "seed0"
        (d / "metrics").mkdir(parents=True)
        recs = []
        for steps in (1, 2):
            (d / "samples" / f"euler-{steps}").mkdir(parents=True)
            images = rng.integers(0, 256, (300, 8, 8, 3), dtype=np.uint8)
            np.savez(d / "samples" / f"euler-{steps}" / "samples.npz", arr_0=images, label=np.zeros(300))
            recs.append({"dataset": "imgs", "experiment": exp, "method": exp, "source": "gaussian",
                         "coupling": "independent", "conditioning": "none", "reflow_from": "", "solver": "euler",
                         "steps": steps, "nfe": steps, "seed": 0, "metrics": {"fd": 10.0 / steps, "nfe": steps}})
        (d / "metrics" / "all.json").write_text(json.dumps(recs))
        runs.append(d)
    calls = []
    real = report.read_npz_rows

    def whole(path, key, stop=None):
        calls.append(stop)
        with np.load(path) as z:
            return z[key][:stop]

    def draw(out: Path, reader) -> bytes:
        monkeypatch.setattr(report, "read_npz_rows", reader)
        monkeypatch.setattr(sys, "argv", ["report.py", "--runs", *map(str, runs), "--images",
                                          f"imgs={tmp_path / 'manifest.parquet'}", "--grid-steps", "1", "2",
                                          "--grid-images", "9", "--out", str(out)])
        runpy.run_path(str(ROOT / "stages" / "report.py"), run_name="__main__")
        capsys.readouterr()
        return (out / "samples_imgs.png").read_bytes()

    new = draw(tmp_path / "new", lambda p, k, stop=None: calls.append(stop) or real(p, k, stop))
    assert calls == [9] * 4
    assert draw(tmp_path / "old", whole) == new


def test_npz_written_row_chunk_by_chunk_loads_as_np_savez_wrote_it(tmp_path):
    """The sample stage streams a store into samples.npz (ADM's arr_0 layout) without holding all images."""
    import zarr

    from sourceflow.io import write_npz_rows

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (37, 8, 8, 3), dtype=np.uint8)
    z = zarr.create_array(str(tmp_path / "s.zarr"), shape=images.shape, chunks=(5, 8, 8, 3), dtype="uint8")
    z[:] = images
    label = np.arange(37, dtype=np.int64)
    write_npz_rows(tmp_path / "a.npz", {"arr_0": z, "label": label, "scalar": np.float32(3.5)}, chunk_bytes=700)
    np.savez(tmp_path / "b.npz", arr_0=images, label=label, scalar=np.float32(3.5))
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        assert a.files == b.files
        for k in a.files:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and np.array_equal(a[k], b[k])
