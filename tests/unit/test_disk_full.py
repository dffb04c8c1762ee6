"""A full disk while writing: the latent store (extract_latents, a real stage process) and the sample store
(``write_sample_store``, what stages/sample.py runs) on a small tmpfs stop with one line naming the store
and ENOSPC, exit 2, mark nothing complete and leave no temporary files; once the tmpfs is enlarged in place
(same path), the same command resumes and ends byte-identical to an uninterrupted run written elsewhere.
Mounting needs root (CI runs as root)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from sourceflow import cli
from sourceflow.io import read_timings, write_json
from sourceflow.sampling import write_sample_store
from sourceflow.store.latents import LatentStore, LatentWriter
from sourceflow.store.sharded import ShardedWriter
from tests.unit.test_store import files, make_dataset, run_stage

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root"),
    pytest.mark.skipif(shutil.which("mount") is None, reason="no mount command"),
]


def resize(disk: Path, size_kib: int) -> None:
    """Grow (or shrink) the tmpfs at ``disk`` in place: the files and the path stay, the free space changes."""
    subprocess.run(["mount", "-o", f"remount,size={size_kib}k", str(disk)], check=True, capture_output=True)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """Mount a tmpfs of the given size (KiB) under tmp_path; every mount is lazily unmounted at teardown."""
    mounted: list[Path] = []

    def mount(size_kib: int) -> Path:
        d = tmp_path / f"disk{len(mounted)}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(d)],
                           capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], check=False, capture_output=True)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


def error_lines(stderr: str) -> list[str]:
    """The lines that are not progress-bar lines (``desc: n/total unit [...]``)."""
    return [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith(("extract pixels:", "sample "))]


def assert_disk_full_line(stderr: str, store: Path) -> None:
    """One error line, no traceback: it says ENOSPC / disk full, names the store (Zarr's chunk writes) or the
    file inside it that did not fit (a done marker), and says what to do."""
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    where = rf"{re.escape(str(store))}(/\S+)?"
    assert re.fullmatch(rf"error: disk full \(ENOSPC: No space left on device\) while writing {where}: free space "
                        r"there and rerun the same command \(nothing half-written is marked complete; a Zarr store "
                        r"keeps its finished shards and resumes\)", lines[0]), lines[0]
    assert "Traceback" not in stderr


def leftovers(disk: Path) -> list[str]:
    """Temporary files or folders a writer could leave: Zarr's ``*.partial``, atomic writes' ``.*.tmp``."""
    return sorted(str(p.relative_to(disk)) for p in disk.rglob("*") if p.name.endswith((".partial", ".tmp")))


def test_extract_latents_on_a_full_disk_stops_cleanly_and_resumes_identical(manifest, tmp_path, tmpfs, env):
    """128 KiB holds the store's metadata and a few of its ten 8-row shards (about 18 KiB each with markers):
    the stage fails mid-write; after the tmpfs grows to 4 MiB the same command finishes the store."""
    args = ["--manifest", manifest, "--encoder", "pixels", "--resolution", 12, "--flips", "--batch-size", 3,
            "--shard-rows", 8]
    ref = tmp_path / "ref" / "latents.zarr"
    run_stage("extract_latents", *args, "--out", ref)

    disk = tmpfs(128)
    out = disk / "pixels" / "latents.zarr"
    cmd = [sys.executable, str(ROOT / "stages" / "extract_latents.py"), *map(str, args), "--out", str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert_disk_full_line(r.stderr, out)
    assert shutil.disk_usage(disk).free < 8 << 10  # it really ran out of space

    w = LatentWriter(out)
    done = sorted(w.done_shards())
    assert 1 <= len(done) < w.num_shards  # mid-write: some shards finished, the rest pending
    assert w.attrs["complete"] is False
    with pytest.raises(ValueError, match="latent store is incomplete"):
        LatentStore.open(out)
    for s in done:  # a marker only for a shard whose files are whole
        rec = json.loads(w.marker(s).read_text())
        assert {n: f.stat().st_size for n, f in w.shard_files(s).items()} == rec["bytes"]
    assert not (out.parent / "latents.json").exists()  # the report downstream rules depend on
    assert leftovers(disk) == []

    resize(disk, 4096)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"resuming, {len(done)} of {w.num_shards} shards already written" in r.stderr
    assert read_timings(r.stdout, "extract_latents")[-1]["shards_resumed"] == len(done)
    assert LatentStore.open(out).attrs["complete"] is True
    assert files(out) == files(ref)  # the store promises byte-identity with an uninterrupted run
    assert leftovers(disk) == []


def test_sample_store_full_at_creation_and_mid_write_then_resumes_identical(tmp_path, tmpfs, capsys):
    """The sample store through ``cli.run`` as stages/sample.py runs it: a disk too small for the empty store
    (the atomic creation leaves no temporary folder), then one too small for all shards, then enough."""
    rng = np.random.default_rng(0)
    data = {"images": rng.integers(0, 256, (64, 16, 16, 3), dtype=np.uint8),
            "energy": rng.normal(size=64).astype(np.float32)}
    arrays = {"images": ((64, 16, 16, 3), "uint8"), "energy": ((64,), "float32")}
    identity = {"model": "toy", "solver": "euler", "steps": 4}

    def write(path: Path) -> None:
        status = write_sample_store(path, identity, arrays, 8,
                                    lambda s, a, b: {k: v[a:b] for k, v in data.items()}, progress=False)
        assert status == "complete"

    write(tmp_path / "ref" / "samples.zarr")
    disk = tmpfs(4)  # one page: not even the group's metadata files fit
    out = disk / "samples.zarr"

    def stage() -> int:
        with pytest.raises(SystemExit) as e:
            cli.run(lambda: write(out))
        return e.value.code

    assert stage() == 2
    assert_disk_full_line(capsys.readouterr().err, out)
    assert not out.exists() and list(disk.iterdir()) == []  # no half-made store, no temporary folder

    resize(disk, 40)  # the metadata and a few 6 KiB shards (two files + a marker each)
    assert stage() == 2
    assert_disk_full_line(capsys.readouterr().err, out)
    w = ShardedWriter(out, list(arrays))
    assert 1 <= len(w.done_shards()) < w.num_shards and w.attrs["complete"] is False
    assert leftovers(disk) == []

    resize(disk, 1024)
    cli.run(lambda: write(out))
    assert capsys.readouterr().err == ""
    assert ShardedWriter(out, list(arrays)).attrs["complete"] is True
    assert files(out) == files(tmp_path / "ref" / "samples.zarr")


def test_atomic_file_write_on_a_full_disk_names_the_file_and_keeps_the_old_one(tmpfs):
    """Every JSON / safetensors artifact goes through ``atomic_path``: on a full disk the error names the
    file (a plain write names none), the previous version stays and no temporary file is left."""
    disk = tmpfs(8)
    path = disk / "report.json"
    write_json(path, {"old": True})
    with pytest.raises(OSError) as e:
        write_json(path, {"big": "x" * (64 << 10)})
    assert e.value.errno == 28 and e.value.filename == str(path)
    assert json.loads(path.read_text()) == {"old": True}
    assert sorted(p.name for p in disk.iterdir()) == ["report.json"]
    assert cli.disk_full_message(e.value).startswith(f"disk full (ENOSPC: No space left on device) while "
                                                     f"writing {path}: free space there and rerun")
