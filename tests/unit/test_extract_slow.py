"""extract_latents under torchrun: two gloo processes on CPU writing one store (tiny random DINOv2) lose
no row and end byte-identical to a single-process run; a killed two-process run resumed by one process
ends byte-identical too."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sourceflow.store.latents import LatentStore, LatentWriter
from tests.unit.test_store import ROOT, files, make_dataset, run_stage


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, env):
    from sourceflow.standins import dinov2_registers, save_pretrained

    weights = save_pretrained(dinov2_registers(28, seed=0), tmp_path / "dino")
    manifest = make_dataset(tmp_path / "data", n=50, size=28)
    args = ["--manifest", manifest, "--encoder", "dinov2", "--weights", weights, "--resolution", 28, "--flips",
            "--batch-size", 4, "--shard-rows", 8]
    one = tmp_path / "one.zarr"
    run_stage("extract_latents", *args, "--out", one)

    env = dict(env, ACCELERATE_USE_CPU="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                str(ROOT / "stages" / "extract_latents.py"), *map(str, args)]
    two = tmp_path / "two.zarr"
    r = subprocess.run([*torchrun, "--out", str(two)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "on 2 process(es)" in r.stdout
    assert files(two) == files(one)
    st = LatentStore.open(two)
    assert st.num_rows == 80 and sorted(st.read("index")[:40]) == sorted(st.read("index")[40:])



@pytest.mark.slow
def test_two_processes_killed_then_resumed_by_one(tmp_path, env):
    manifest = make_dataset(tmp_path / "data", n=50, size=20)
    args = ["--manifest", manifest, "--encoder", "pixels", "--resolution", 12, "--flips", "--batch-size", 4,
            "--shard-rows", 8]
    ref = tmp_path / "ref.zarr"
    run_stage("extract_latents", *args, "--out", ref)
    killed = tmp_path / "killed.zarr"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(ROOT / "stages" / "extract_latents.py"), *map(str, args), "--out", str(killed),
                        "--stop-after-shards", "1"], env=dict(env, ACCELERATE_USE_CPU="1"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert 1 <= 10 - len(LatentWriter(killed).pending_shards()) <= 2
    run_stage("extract_latents", *args, "--out", killed)
    assert files(killed) == files(ref)
