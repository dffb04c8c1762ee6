"""Image experiments end to end on digits through Snakemake (tiny DiTs, a few steps): every image
method's train → sample → evaluate → report, CFG and autoguidance, two-process training and sampling,
sampling resumed after a kill, the ADM sample layout, and FD of real images against their own
statistics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from .helpers import scratch_repo, snakemake

pytestmark = pytest.mark.slow

CONFIG = """
results: results
seeds: [0]
datasets:
  digits:
    kind: digits
    resolution: 8
    test_fraction: 0.15
    workers: 2
    encoders:
      pixels: {kind: pixels, shard_rows: 512}
    gmm:
      - {encoder: pixels, components: [4], variance: spherical}
    captions:
      text_encoders: {minilm: {kind: minilm, max_length: 16}}
    reference:
      features: [feature-net]
      feature_net: {epochs: 2}
    defaults:
      model: {kind: dit, size: DiT-XT/2}
      train: {steps: 12, batch_size: 64, lr: 0.002, checkpoint_every: 6, log_every: 4}
      sample:
        num_samples: 200
        batch_size: 100
        shard_rows: 100
        rtol: 0.01
        atol: 0.01
        solvers:
          - {solver: euler, steps: [1, 2]}
          - {solver: dopri5}
          - {solver: euler, steps: [4], num_samples: 20}
      evaluate: {min_samples: 100}
experiments:
  - name: fm-cfg
    method: fm
    data: digits
    conditioning: label
    overrides: {train: {p_uncond: 0.2}, sample: {guidance_scale: 2.0}}
  - {name: loom, method: loom, data: digits, coupling: {num_caches: 2}, overrides: {train: {processes: 2}}}
  - {name: guide, method: mmfm, data: digits, source: {kind: gmm, components: 4}, conditioning: mode,
     overrides: {train: {steps: 6}}}
  - name: mmfm
    method: mmfm
    data: digits
    source: {kind: gmm, components: 4}
    conditioning: mode
    regularizers: {focal_gamma: 2.0}
    overrides: {sample: {autoguidance: {experiment: guide, scale: 1.5}}}
  - name: csfm
    method: csfm
    data: digits
    conditioning: text
    source: {kind: learned, width: 32, depth: 1, heads: 2, patch: 2}
report:
  grid_steps: [1, 2, 4]
  grid_images: 16
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = scratch_repo(tmp_path_factory.mktemp("image-runs"), CONFIG)
    snakemake(repo, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=1500)
    return repo


def stage(repo: Path, script: str, *args: str, torchrun: int = 0) -> subprocess.CompletedProcess:
    launch = [sys.executable]
    if torchrun:
        launch += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(torchrun)]
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    res = subprocess.run([*launch, f"stages/{script}.py", *args], cwd=repo, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def data_args(repo: Path) -> list[str]:
    r = "results/digits"
    return ["--latents", f"{r}/pixels/latents.zarr", "--stats", f"{r}/pixels/latent_stats.safetensors",
            "--manifest", f"{r}/manifest.parquet"]


def test_report_covers_every_image_method(repo):
    rep = repo / "results" / "report"
    for f in ("metrics.csv", "summary.md", "fd_vs_nfe.png", "samples_digits.png", "training_curves.png"):
        assert (rep / f).stat().st_size > 0, f
    assert not (rep / "w2_vs_nfe.png").exists()  # no toy runs in this config
    df = pd.read_csv(rep / "metrics.csv")
    assert set(df.experiment) == {"fm-cfg", "loom", "guide", "mmfm", "csfm"}
    fd = df[df.metric == "fd"]
    assert set(zip(fd.solver, fd.steps.fillna(-1).astype(int), strict=True)) == {("euler", 1), ("euler", 2), ("dopri5", -1)}
    assert np.isfinite(fd.value).all() and (fd.value > 0).all()
    for metric in ("precision", "recall", "class_kl", "class_tv", "path_energy", "coupling_cost"):
        assert metric in set(df.metric), metric
    assert not ((df.metric == "fd") & (df.steps == 4)).any()  # 20 samples: below evaluate.min_samples
    summary = (rep / "summary.md").read_text()
    assert "## digits (images)" in summary and "Fréchet distance" in summary and "Data floor: FD" in summary


def test_runs_record_guidance_processes_and_method_state(repo):
    runs = repo / "results" / "digits" / "runs"
    assert json.loads((runs / "loom/seed0/train_summary.json").read_text())["world_size"] == 2
    fm_info = json.loads((runs / "fm-cfg/seed0/samples/euler-2/info.json").read_text())
    assert fm_info["model_evals_per_step"] == 2 and fm_info["nfe"] == 2
    mm_info = json.loads((runs / "mmfm/seed0/samples/euler-1/info.json").read_text())
    assert mm_info["guide_id"] is not None and mm_info["model_evals_per_step"] == 2
    from safetensors.torch import load_file

    t = load_file(str(runs / "mmfm/seed0/model.safetensors"))
    assert "method.focal.loss_ema" in t
    assert not any(k.startswith("method.source.") for k in t)  # the GMM is an input file, not saved state
    assert load_file(str(runs / "loom/seed0/model.safetensors"))["method.coupling.seeds"].shape[1] == 2
    with np.load(runs / "csfm/seed0/samples/euler-1/samples.npz") as z:
        assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (200, 8, 8, 3)  # ADM's layout
        assert (z["label"] >= 0).all()  # each sample's caption comes from a training image with a label
    res = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "2"], cwd=repo, capture_output=True,
                         text=True)
    assert "Nothing to be done" in res.stdout + res.stderr


def test_sampling_resumes_and_splits_over_processes_identically(repo, tmp_path):
    runs = repo / "results" / "digits" / "runs"
    base = [*data_args(repo), "--gmm", "results/digits/pixels/gmm/cls_K4.safetensors",
            "--source-gmm", "results/digits/pixels/gmm/spatial_K4.safetensors",
            "--model", str(runs / "mmfm/seed0/model.safetensors"),
            "--guide-model", str(runs / "guide/seed0/model.safetensors"),
            "--guide-spec", str(runs / "guide/spec_train.json"),
            "--spec", str(runs / "mmfm/spec_sample.json"), "--seed", "0", "--no-progress"]
    killed = tmp_path / "killed"
    out = stage(repo, "sample", *base, "--out", str(killed), "--stop-after-shards", "1").stdout
    assert "stopped after 1 shard" in out and not (killed / "index.json").exists()
    assert not (killed / "dopri5" / "samples.npz").exists()
    stage(repo, "sample", *base, "--out", str(killed))
    assert "already sampled" in stage(repo, "sample", *base, "--out", str(killed)).stdout
    two = tmp_path / "two"
    stage(repo, "sample", *base, "--out", str(two), torchrun=2)
    for tag in ("euler-1", "euler-2", "dopri5", "euler-4"):
        ref = np.load(runs / "mmfm/seed0/samples" / tag / "samples.npz")
        for other in (killed, two):
            got = np.load(other / tag / "samples.npz")
            assert sorted(got.files) == ["arr_0", "label", "mode"]
            for k in got.files:
                assert np.array_equal(got[k], ref[k]), (other.name, tag, k)
    # a changed sampling setting is not taken for the finished entries
    spec = json.loads((runs / "mmfm/spec_sample.json").read_text())
    spec["sample"].update(batch_size=50, shard_rows=50, solvers=[{"solver": "euler", "steps": [2]}])
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    base[base.index("--spec") + 1] = str(tmp_path / "spec.json")
    assert "already sampled" not in stage(repo, "sample", *base, "--out", str(killed)).stdout
    # killed while two processes sample (4 shards, 2 each: every process stops after 1), resumed by one
    two_killed = tmp_path / "two-killed"
    out = stage(repo, "sample", *base, "--out", str(two_killed), "--stop-after-shards", "1", torchrun=2).stdout
    assert "stopped after 1 shard" in out and not (two_killed / "index.json").exists()
    stage(repo, "sample", *base, "--out", str(two_killed))
    a, b = (np.load(d / "euler-2" / "samples.npz") for d in (killed, two_killed))
    assert all(np.array_equal(a[k], b[k]) for k in a.files)


def test_fd_of_real_images_is_zero_and_grows_with_noise(repo, tmp_path):
    """The evaluate stage on 'samples' that are the reference images themselves, then with noise added."""
    from sourceflow.data.images import load_images
    from sourceflow.data.manifest import read_manifest
    from sourceflow.io import write_json
    from sourceflow.sampling import sample_store_arrays, write_sample_store

    res = repo / "results" / "digits"
    manifest = read_manifest(res / "manifest.parquet")
    manifest.root = repo / manifest.root  # the manifest's root is relative to the workflow's folder
    real = load_images(manifest.split("train"), 8)
    g = np.random.default_rng(0)
    index = {}
    for sigma in (0, 10, 40):
        tag = f"euler-{sigma + 1}"
        imgs = np.clip(real.astype(np.float64) + sigma * g.normal(size=real.shape), 0, 255).round().astype(np.uint8)
        d = tmp_path / "samples" / tag
        n = len(imgs)
        write_sample_store(d / "samples.zarr", {"tag": tag}, sample_store_arrays(n, 8, None), 512,
                           lambda s, a, b, imgs=imgs: {"images": imgs[a:b], "cond_row": np.full(b - a, -1),
                                                       "label": np.full(b - a, -1), "mode": np.full(b - a, -1),
                                                       "energy": np.ones(b - a), "displacement": np.ones(b - a)})
        np.savez(d / "samples.npz", arr_0=imgs)
        info = {"solver": "euler", "steps": sigma + 1, "nfe": sigma + 1, "num_samples": n}
        write_json(d / "info.json", info)
        index[tag] = info
    write_json(tmp_path / "samples" / "index.json", index)
    write_json(tmp_path / "summary.json", {"coupling_cost": 1.0})
    stage(repo, "evaluate", "--spec", str(res / "runs/fm-cfg/spec_evaluate.json"),
          "--reference", "results/digits/reference/feature-net.npz",
          "--feature-net", "results/digits/feature_net/model.safetensors", "--samples", str(tmp_path / "samples"),
          "--train-summary", str(tmp_path / "summary.json"), "--out", str(tmp_path / "metrics"))
    fd = {r["steps"] - 1: r["metrics"]["fd"] for r in json.loads((tmp_path / "metrics/all.json").read_text())}
    assert abs(fd[0]) < 1e-5 * fd[40]
    assert fd[0] < fd[10] < fd[40]
    m0 = json.loads((tmp_path / "metrics/euler-1.json").read_text())["metrics"]
    assert m0["precision"] == 1.0 and m0["recall"] == 1.0  # every point lies in its own k-NN ball


def test_snakemake_report_includes_the_image_results(repo):
    res = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", "--report", "report.html"], cwd=repo,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    html = (repo / "report.html").read_text()
    for name in ("fd_vs_nfe.png", "samples_digits.png", "summary.md", "training_curves.png"):
        assert name in html, name
