"""Latent store: write/read round trip, shard-aligned batches, refusal of incomplete stores, the
extract_latents stage (rows vs direct image loading, kill-and-resume byte-identical, changed settings)
and latent_stats vs numpy."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sourceflow.io import read_timings, unpack_metadata
from sourceflow.store.latents import LatentStore, LatentWriter, expected_index_flip
from sourceflow.store.stats import LatentStats, compute_latent_stats

ROOT = Path(__file__).resolve().parents[2]


def make_dataset(root: Path, n: int = 50, size: int = 20) -> Path:
    """n random PNGs (a few non-square), every 5th in the test split; returns manifest.parquet."""
    from PIL import Image

    from sourceflow.data.manifest import write_manifest

    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    rows = []
    for i in range(n):
        img = rng.integers(0, 256, (size, size + 3 * (i % 3), 3), dtype=np.uint8)
        Image.fromarray(img).save(root / "img" / f"{i:03d}.png")
        rows.append((i, f"img/{i:03d}.png", i % 3, "test" if i % 5 == 0 else "train"))
    frame = pd.DataFrame(rows, columns=["index", "path", "label", "split"])
    write_manifest(root / "manifest.parquet", frame, {"source": "synthetic", "root": str(root), "num_classes": 3})
    return root / "manifest.parquet"


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


def run_stage(name: str, *args: str) -> None:
    """Run a stage in this process (no interpreter start-up); errors surface as SystemExit(2)."""
    argv = sys.argv
    sys.argv = [name, *map(str, args)]
    try:
        runpy.run_path(str(ROOT / "stages" / f"{name}.py"), run_name="__main__")
    finally:
        sys.argv = argv


def files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def random_store(path: Path, num_images: int = 37, flips: bool = False, shard_rows: int = 8,
                 order=None, write=None) -> tuple[LatentWriter, dict[str, np.ndarray]]:
    """A store of random rows written through LatentWriter; returns the writer and the full arrays."""
    rng = np.random.default_rng(1)
    LatentWriter.create(path, {"encoder": "test", "weights": None, "encoder_options": {}, "resolution": 4,
                               "manifest_hash": "0" * 16, "split": "train"}, cls_dim=5, spatial_shape=(3, 2, 4),
                        num_images=num_images, flips=flips, shard_rows=shard_rows)
    w = LatentWriter(path)
    index, flip = expected_index_flip(np.arange(num_images) * 2, flips)
    data = {"cls": rng.normal(size=(len(index), 5)).astype(np.float32),
            "spatial": (3 + 2 * rng.normal(size=(len(index), 3, 2, 4))).astype(np.float32),
            "index": index, "flip": flip}
    for s in (order if order is not None else range(w.num_shards)):
        if write is None or s in write:
            a, b = w.shard_range(s)
            w.write_shard(s, {k: v[a:b] for k, v in data.items()})
    return w, data


def test_round_trip_and_batches(tmp_path):
    path = tmp_path / "s.zarr"
    w, data = random_store(path, flips=True, order=range(9, -1, -1))  # 74 rows, last shard partial
    assert w.num_shards == 10 and w.pending_shards() == []
    assert w.verify(data["index"], data["flip"]) == []
    w.mark_complete()
    assert not (path / "_done").exists()
    st = LatentStore.open(path)
    assert (st.num_rows, st.num_images, st.cls_dim, st.spatial_shape) == (74, 37, 5, (3, 2, 4))
    for k, v in data.items():
        assert np.array_equal(st.read(k), v)
        assert np.array_equal(st.read(k, 5, 21), v[5:21])
    assert st.read("flip")[37:].all() and np.array_equal(st.read("index")[37:], st.read("index")[:37])
    for batch_rows, start, stop in [(3, 0, None), (8, 0, None), (13, 5, 70), (100, 0, None), (1, 70, 74)]:
        got = list(st.iter_batches(["cls", "spatial", "index"], batch_rows, start, stop))
        end = stop or 74
        assert [f for f, _ in got] == list(range(start, end, batch_rows))
        assert all(len(b["cls"]) == batch_rows for _, b in got[:-1])
        for k in ("cls", "spatial", "index"):
            assert np.array_equal(np.concatenate([b[k] for _, b in got]), data[k][start:end])
    with pytest.raises(ValueError, match="out of range"):
        st.read("cls", 0, 75)


def test_incomplete_store_refused(tmp_path):
    path = tmp_path / "s.zarr"
    w, data = random_store(path, write={0, 2, 4})
    with pytest.raises(ValueError, match=r"s.zarr: latent store is incomplete \(3 of 5 shards"):
        LatentStore.open(path)
    st = LatentStore.open(path, require_complete=False)
    assert np.array_equal(st.read("cls", 0, 8), data["cls"][:8])
    assert w.pending_shards() == [1, 3]
    assert "2 of 5 shards not written" in w.verify(data["index"], data["flip"])[0]
    for s in (1, 3):
        a, b = w.shard_range(s)
        w.write_shard(s, {k: v[a:b] for k, v in data.items()})
    assert w.verify(data["index"], data["flip"]) == []
    f = w.shard_files(3)["spatial"]
    f.write_bytes(f.read_bytes()[:-10])  # truncated after its marker was written
    assert "has" in w.verify(data["index"], data["flip"])[0]
    bad = data["index"].copy()
    bad[3] += 1
    w.write_shard(3, {k: v[24:32] for k, v in data.items()})
    assert w.verify(bad, data["flip"]) == ["the index column does not match the manifest rows"]
    with pytest.raises(FileNotFoundError, match="latent store not found"):
        LatentStore.open(tmp_path / "missing.zarr")


def test_stage_rows_match_direct_loading(manifest, tmp_path, capsys):
    from sourceflow.data.images import load_image, to_model_range
    from sourceflow.data.manifest import read_manifest

    out = tmp_path / "pixels" / "latents.zarr"
    run_stage("extract_latents", "--manifest", manifest, "--encoder", "pixels", "--resolution", 16, "--pool", 4,
              "--flips", "--batch-size", 3, "--shard-rows", 8, "--out", out)
    st = LatentStore.open(out)
    m = read_manifest(manifest).split("train")
    assert (st.num_images, st.num_rows, st.cls_dim) == (40, 80, 48)
    imgs = to_model_range(np.stack([load_image(m.abspath(i), 16) for i in range(40)]))
    spatial = st.read("spatial")
    assert np.array_equal(spatial[:40], imgs.numpy())
    assert np.array_equal(spatial[40:], imgs.flip(-1).numpy())
    pooled = torch.nn.functional.avg_pool2d(torch.from_numpy(spatial), 4).reshape(80, -1).numpy()
    np.testing.assert_allclose(st.read("cls"), pooled, rtol=1e-6, atol=1e-6)
    assert np.array_equal(st.read("index"), np.tile(m.frame["index"].to_numpy(), 2))
    assert st.attrs["manifest_hash"] and st.attrs["encoder"] == "pixels" and st.attrs["complete"] is True
    rep = json.loads((out.parent / "latents.json").read_text())
    assert rep["rows"] == 80 and not {"rows_this_run", "shards_resumed", "write_share"} & set(rep)
    (timings,) = read_timings(capsys.readouterr().out, "extract_latents")  # per-run facts: in the log only
    assert timings["rows_this_run"] == 80 and timings["shards_resumed"] == 0
    assert 0 <= timings["write_share"] <= 1 and timings["rows_per_s"] > 0


def test_kill_and_resume_byte_identical(manifest, tmp_path, env, capsys):
    args = ["--manifest", manifest, "--encoder", "pixels", "--resolution", 12, "--flips", "--batch-size", 3,
            "--shard-rows", 8]
    ref = tmp_path / "ref.zarr"
    run_stage("extract_latents", *args, "--out", ref)
    out = tmp_path / "killed.zarr"
    r = subprocess.run([sys.executable, str(ROOT / "stages" / "extract_latents.py"), *map(str, args), "--out",
                        str(out), "--stop-after-shards", "3"], env=env, capture_output=True, text=True)
    assert r.returncode == 17, r.stderr
    w = LatentWriter(out)
    assert w.pending_shards() == list(range(3, 10))
    with pytest.raises(ValueError, match="incomplete"):
        LatentStore.open(out)
    # what a kill in the middle of shard 3 can leave: a truncated shard file and a Zarr temp file
    for f in w.shard_files(3).values():
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"\x00garbage")
    tmp = w.shard_files(4)["spatial"].parent / "0.1234.partial"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_bytes(b"half")
    run_stage("extract_latents", *args, "--out", out)
    assert files(out) == files(ref)
    assert read_timings(capsys.readouterr().out, "extract_latents")[-1]["shards_resumed"] == 3
    # the report of a resumed run is the uninterrupted run's, but for the store's own path
    report = json.loads(out.with_suffix(".json").read_text())
    assert report == {**json.loads(ref.with_suffix(".json").read_text()), "store": str(out)}
    run_stage("extract_latents", *args, "--out", out)  # complete: nothing to do
    assert files(out) == files(ref)


def test_changed_settings_refused_or_overwritten(manifest, tmp_path, capsys):
    base = ["--manifest", manifest, "--encoder", "pixels", "--no-flips", "--shard-rows", 16]
    out = tmp_path / "s.zarr"
    run_stage("extract_latents", *base, "--resolution", 8, "--out", out)
    with pytest.raises(SystemExit) as e:
        run_stage("extract_latents", *base, "--resolution", 12, "--out", out)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "different settings" in err and "resolution: stored 8, now 12" in err and "--overwrite" in err
    run_stage("extract_latents", *base, "--resolution", 12, "--overwrite", "--out", out)
    assert LatentStore.open(out).spatial_shape == (3, 12, 12)


def test_latent_stats_match_numpy(tmp_path, capsys):
    path = tmp_path / "s.zarr"
    w, data = random_store(path, num_images=45, flips=True, shard_rows=8)
    out = tmp_path / "latent_stats.safetensors"
    with pytest.raises(SystemExit):  # not marked complete yet
        run_stage("latent_stats", "--store", path, "--out", out)
    assert "incomplete" in capsys.readouterr().err and not out.exists()
    w.mark_complete()
    run_stage("latent_stats", "--store", path, "--out", out, "--batch-rows", 7)
    st = LatentStats.load(out)
    x = data["spatial"].astype(np.float64)
    np.testing.assert_allclose(st.mean.numpy(), x.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(st.var.numpy(), x.var(0), rtol=1e-6)
    assert st.mean.dtype == torch.float32 and st.mean.shape == (3, 2, 4) and st.eps == 1e-6
    direct = compute_latent_stats(LatentStore.open(path), batch_rows=1000)
    torch.testing.assert_close(direct.var, st.var)
    z = st.normalize(torch.from_numpy(data["spatial"]))
    zz = z.double().numpy()
    np.testing.assert_allclose(zz.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(zz.var(0), 1, atol=1e-4)
    torch.testing.assert_close(st.denormalize(z), torch.from_numpy(data["spatial"]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="do not end in the stats shape"):
        st.normalize(torch.zeros(2, 3, 4, 2))


def test_running_moments_merge_is_exact_for_offset_data():
    """Large offset, small spread: naive E[x²] − E[x]² in float32 would lose the variance."""
    from sourceflow.store.stats import RunningMoments

    rng = np.random.default_rng(0)
    x = (1e4 + 1e-2 * rng.normal(size=(1000, 3))).astype(np.float32)
    m = RunningMoments((3,))
    for i in range(0, 1000, 37):
        m.update(x[i:i + 37])
    np.testing.assert_allclose(m.var, x.astype(np.float64).var(0), rtol=1e-9)
    np.testing.assert_allclose(m.mean, x.astype(np.float64).mean(0), rtol=1e-12)


def test_variance_only_normalization_matches_numpy_and_inverts(tmp_path):
    """RAE's DINOv2-B normalisation: z / sqrt(var + 1e-5) per (c, h, w), no mean subtracted; the stage
    records it in the file, the loader applies it, and denormalize inverts it."""
    path = tmp_path / "s.zarr"
    w, data = random_store(path, num_images=30, flips=True, shard_rows=8)
    w.mark_complete()
    out = tmp_path / "latent_stats.safetensors"
    run_stage("latent_stats", "--store", path, "--out", out, "--normalize", "std", "--eps", "1e-5", "--batch-rows", 9)
    st = LatentStats.load(out)
    assert st.mode == "std" and st.eps == 1e-5
    with safe_open(str(out), "np") as f:
        meta = unpack_metadata(f.metadata())
    assert meta["normalize"] == "std" and float(meta["eps"]) == 1e-5 and meta["num_rows"] == "60"
    x = data["spatial"].astype(np.float64)
    np.testing.assert_allclose(st.var.numpy(), x.var(0), rtol=1e-6)  # the variance around the mean
    z = st.normalize(torch.from_numpy(data["spatial"]))
    ref = x / np.sqrt(x.var(0) + 1e-5)
    np.testing.assert_allclose(z.double().numpy(), ref, rtol=1e-5, atol=1e-6)
    assert abs(z.double().mean().item()) > 1.0  # the data's mean (3) is not removed, only the scale
    np.testing.assert_allclose(z.double().numpy().var(0), x.var(0) / (x.var(0) + 1e-5), rtol=1e-4)
    torch.testing.assert_close(st.denormalize(z), torch.from_numpy(data["spatial"]), rtol=1e-6, atol=1e-5)
    zd = st.normalize(torch.from_numpy(x))  # float64 in, float64 out: the inverse is exact to rounding
    torch.testing.assert_close(st.denormalize(zd), torch.from_numpy(x), rtol=1e-12, atol=1e-12)
    # the default file records mean_std, and a file without the key (older) reads as mean_std
    run_stage("latent_stats", "--store", path, "--out", tmp_path / "ms.safetensors")
    assert LatentStats.load(tmp_path / "ms.safetensors").mode == "mean_std"
    save_file({"mean": st.mean, "var": st.var}, str(tmp_path / "old.safetensors"), metadata={"eps": "1e-06"})
    assert LatentStats.load(tmp_path / "old.safetensors").mode == "mean_std"
    save_file({"mean": st.mean, "var": st.var}, str(tmp_path / "bad.safetensors"), metadata={"normalize": "minmax"})
    with pytest.raises(ValueError, match="unknown normalization 'minmax'"):
        LatentStats.load(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="normalization must be one of"):
        LatentStats(st.mean, st.var, mode="center")


def test_subset_rows_are_seeded_sorted_and_one_per_stratum():
    from sourceflow.store.stats import subset_rows

    m, n = 1003, 37
    rows = subset_rows(m, n, seed=5)
    assert rows.dtype == np.int64 and len(rows) == n
    for i, r in enumerate(rows):  # stratum i is [floor(i*m/n), floor((i+1)*m/n)), from the definition
        assert (i * m) // n <= r < ((i + 1) * m) // n
    np.testing.assert_array_equal(rows, subset_rows(m, n, seed=5))
    assert not np.array_equal(rows, subset_rows(m, n, seed=6))
    np.testing.assert_array_equal(subset_rows(m, None), np.arange(m))
    np.testing.assert_array_equal(subset_rows(m, m + 10, seed=1), np.arange(m))  # more than there are: all
    with pytest.raises(ValueError, match="positive"):
        subset_rows(m, 0)


def test_read_rows_into_matches_numpy_fancy_indexing(tmp_path, monkeypatch):
    """Row-granular reads over 4-row inner chunks (runs capped at a few chunks) give exactly data[rows]."""
    import sourceflow.store.sharded as sharded
    from sourceflow.store.stats import read_rows_into

    monkeypatch.setattr(sharded, "chunk_rows", lambda shard_rows, row_bytes, target=0: 4)
    path = tmp_path / "s.zarr"
    w, data = random_store(path, num_images=61, flips=True, shard_rows=16)
    w.mark_complete()
    arr = LatentStore.open(path).array("spatial")
    assert arr.chunks[0] == 4 and arr.shards[0] == 16
    rng = np.random.default_rng(0)
    for rows in (np.arange(122), np.array([0, 3, 4, 5, 15, 16, 17, 60, 61, 121]),
                 np.sort(rng.choice(122, 30, replace=False))):
        for cap in (1, 4, 9, 1000):
            out = np.empty((len(rows), 3, 2, 4), np.float64)
            read_rows_into(arr, rows, out, cap)
            np.testing.assert_array_equal(out, data["spatial"][rows].astype(np.float64))
    with pytest.raises(ValueError, match="sorted"):
        read_rows_into(arr, np.array([5, 3]), np.empty((2, 3, 2, 4)), 8)


def test_latent_stats_subset_matches_numpy_of_those_rows(tmp_path, monkeypatch):
    """--images N: the stats of exactly the subset_rows(M, N, seed) unflipped rows (numpy on those rows),
    the subset size and seed in the file's metadata; the same seed gives the same file, another seed
    another subset; N >= M uses every unflipped row once."""
    import sourceflow.store.sharded as sharded
    from sourceflow.store.stats import subset_rows

    monkeypatch.setattr(sharded, "chunk_rows", lambda shard_rows, row_bytes, target=0: 2)
    path = tmp_path / "s.zarr"
    m = 53
    w, data = random_store(path, num_images=m, flips=True, shard_rows=8)
    w.mark_complete()
    x = data["spatial"].astype(np.float64)

    def stage(out: Path, *args) -> tuple[LatentStats, dict]:
        run_stage("latent_stats", "--store", path, "--out", out, "--batch-rows", 4, *args)
        with safe_open(str(out), "np") as f:
            return LatentStats.load(out), unpack_metadata(f.metadata())

    st, meta = stage(tmp_path / "a.safetensors", "--images", 11, "--seed", 3)
    rows = subset_rows(m, 11, 3)
    assert rows.max() < m and np.all(data["flip"][rows] == 0)
    np.testing.assert_allclose(st.mean.numpy(), x[rows].mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(st.var.numpy(), x[rows].var(0), rtol=1e-6)
    assert not np.allclose(st.var.numpy(), x.var(0), rtol=1e-3)  # not the all-rows statistics
    assert meta["stats_rows"] == "images" and meta["stats_images"] == "11" and meta["stats_seed"] == "3"
    assert meta["rows_used"] == "11" and meta["num_rows"] == str(2 * m)
    again, _ = stage(tmp_path / "b.safetensors", "--images", 11, "--seed", 3)
    assert torch.equal(again.mean, st.mean) and torch.equal(again.var, st.var)
    other, _ = stage(tmp_path / "c.safetensors", "--images", 11, "--seed", 4)
    assert not torch.equal(other.var, st.var)
    every, meta = stage(tmp_path / "d.safetensors", "--images", 10 * m)
    np.testing.assert_allclose(every.var.numpy(), x[:m].var(0), rtol=1e-6)
    assert meta["stats_images"] == str(m) and meta["stats_images_requested"] == str(10 * m)
    _, meta = stage(tmp_path / "e.safetensors")
    assert meta["stats_rows"] == "all" and meta["rows_used"] == str(2 * m) and "stats_seed" not in meta
    # a subset may only hold unflipped rows: a flipped row is refused, not silently used
    with pytest.raises(ValueError, match="holds flipped rows"):
        compute_latent_stats(LatentStore.open(path), rows=np.array([0, m + 1]))


def test_float16_store_round_trip_training_rows_and_overflow(manifest, tmp_path, capsys):
    """dtype float16: the stage writes half the bytes, every value is float32's nearest float16, the
    training rows come back as float32 equal to the stored halves normalised, an older store (no dtype
    attribute) counts as float32, and a latent beyond float16's range stops the write with one line."""
    from sourceflow.data.latent_data import StoreRows

    base = ["--manifest", manifest, "--encoder", "pixels", "--resolution", 12, "--flips", "--shard-rows", 8]
    ref, half = tmp_path / "f32.zarr", tmp_path / "f16.zarr"
    run_stage("extract_latents", *base, "--out", ref)
    run_stage("extract_latents", *base, "--dtype", "float16", "--out", half)
    a, b = LatentStore.open(ref), LatentStore.open(half)
    assert b.attrs["dtype"] == "float16" and a.attrs["dtype"] == "float32"
    for name in ("cls", "spatial"):
        assert b.array(name).dtype == np.float16
        assert np.array_equal(b.read(name), a.read(name).astype(np.float16))
    size = {p: sum(f.stat().st_size for f in (p / "spatial").rglob("*") if f.is_file()) for p in (ref, half)}
    assert size[half] < 0.55 * size[ref]
    stats = LatentStats(torch.zeros(3, 12, 12), torch.full((3, 12, 12), 4.0), 0.0, "mean_std")
    rows = StoreRows(b.array("spatial"), None, stats.normalize, in_memory=False)
    got = rows[np.array([5, 1, 5, 70])]
    assert got.dtype == torch.float32
    want = torch.from_numpy(b.read("spatial")[[5, 1, 5, 70]].astype(np.float32)) / 2
    assert torch.equal(got, want)
    # changing the dtype is a changed setting; a store without the attribute is float32
    with pytest.raises(SystemExit):
        run_stage("extract_latents", *base, "--out", half)
    assert "dtype: stored 'float16', now 'float32'" in capsys.readouterr().err
    full = {k: b.attrs[k] for k in ("encoder", "weights", "encoder_options", "resolution", "manifest_hash",
                                    "split", "flips", "num_images", "shard_rows", "cls_dim", "spatial_shape")}
    assert LatentWriter.identity_mismatch(half, {**full, "dtype": "float16"}) == {}
    import zarr
    g = zarr.open_group(str(ref), mode="r+")
    del g.attrs["dtype"]
    assert LatentWriter.identity_mismatch(ref, {**full, "dtype": "float32"}) == {}
    # overflow
    path = tmp_path / "big.zarr"
    LatentWriter.create(path, {"encoder": "t"}, cls_dim=2, spatial_shape=(1, 1, 2), num_images=4, flips=False,
                        shard_rows=4, dtype="float16")
    w = LatentWriter(path)
    idx, flip = expected_index_flip(np.arange(4), False)
    spatial = np.ones((4, 1, 1, 2), np.float32)
    spatial[2, 0, 0, 1] = -7e4
    with pytest.raises(ValueError, match=r"spatial latents reach 7e\+04, beyond float16's 65504; extract with dtype: float32"):
        w.write_shard(0, {"cls": np.zeros((4, 2), np.float32), "spatial": spatial, "index": idx, "flip": flip})
    assert w.pending_shards() == [0]


def test_wide_rows_get_row_granular_chunks(tmp_path):
    """A random row of a wide array (ImageNet RAE: 768x16x16) is one inner chunk: reading 64 random rows
    of a 4096-row shard reads ~64 rows' bytes plus the shard index, not whole multi-row chunks."""
    import os

    from sourceflow.store.sharded import chunk_rows

    assert chunk_rows(4096, 768 * 16 * 16 * 2) == 1 and chunk_rows(4096, 768 * 16 * 16 * 4) == 1
    assert chunk_rows(4096, 768 * 4) == 16  # CLS rows share 48 KiB chunks
    assert chunk_rows(1000, 8) == 1000
    path = tmp_path / "wide.zarr"
    assert chunk_rows(4096, 16 << 10) == 1 and chunk_rows(4096, 8 << 10) == 8
    n, shape = 512, (16, 32, 32)  # 32 KiB float16 rows
    LatentWriter.create(path, {"encoder": "t"}, cls_dim=4, spatial_shape=shape, num_images=n, flips=False,
                        shard_rows=256, dtype="float16")
    w = LatentWriter(path)
    rng = np.random.default_rng(0)
    idx, flip = expected_index_flip(np.arange(n), False)
    for s in range(w.num_shards):
        lo, hi = w.shard_range(s)
        w.write_shard(s, {"cls": np.zeros((hi - lo, 4), np.float32), "index": idx[lo:hi], "flip": flip[lo:hi],
                          "spatial": rng.normal(size=(hi - lo, *shape)).astype(np.float32)})
    w.mark_complete()
    st = LatentStore.open(path)
    assert st.array("spatial").chunks[0] == 1 and st.array("spatial").shards[0] == 256

    def rchar() -> int:
        return int(next(line for line in open("/proc/self/io") if line.startswith("rchar")).split()[1])

    rows = np.sort(rng.choice(n, 64, replace=False))
    before = rchar()
    got = st.array("spatial").get_orthogonal_selection((rows,))
    read = rchar() - before
    row_bytes = 2 * int(np.prod(shape))
    assert got.shape == (64, *shape)
    assert 64 * row_bytes <= read <= 1.2 * 64 * row_bytes, (read, 64 * row_bytes)
    assert os.path.getsize(w.shard_files(0)["spatial"]) < 1.01 * 256 * row_bytes
