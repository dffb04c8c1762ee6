"""The image-artifact rules end to end on digits (subprocess `snakemake`), nothing left to do
afterwards, config errors for image datasets, and the full-scale ImageNet config's dry run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from safetensors.torch import load_file

from .helpers import ROOT, planned_jobs, scratch_repo, snakemake

pytestmark = pytest.mark.slow

DIGITS = (ROOT / "tests" / "data" / "digits.yaml").read_text()


def save_tiny_dinov2(path: Path) -> None:
    """A random-weight DINOv2-with-registers of the real class, saved like a downloaded checkpoint."""
    from sourceflow.standins import dinov2_registers, save_pretrained

    save_pretrained(dinov2_registers(28, seed=None), path)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    repo = scratch_repo(tmp_path_factory.mktemp("digits"), DIGITS)
    save_tiny_dinov2(repo / "models" / "tiny-dinov2")
    snakemake(repo, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return repo


def test_digits_artifacts_are_complete_and_consistent(digits):
    res = digits / "results" / "digits"
    manifest = pd.read_parquet(res / "manifest.parquet")
    assert len(manifest) == 1797 and set(manifest.split) == {"train", "test"}
    n_train = int((manifest.split == "train").sum())

    for enc, rows, flips in (("pixels", n_train, False), ("dino", 2 * n_train, True)):
        store = zarr.open_group(str(res / enc / "latents.zarr"), mode="r")
        assert store.attrs["complete"] is True
        assert store["cls"].shape[0] == rows and store["spatial"].shape[0] == rows
        assert bool(np.asarray(store["flip"][:]).any()) == flips
        assert sorted(np.asarray(store["index"][:n_train]).tolist()) == sorted(manifest[manifest.split == "train"]["index"])
        stats = load_file(str(res / enc / "latent_stats.safetensors"))
        assert stats["mean"].shape == tuple(store["spatial"].shape[1:])

    from sourceflow.gmm.diag import DiagGMM

    for enc, k, shape in (("pixels", 10, (3, 8, 8)), ("dino", 4, (32, 2, 2))):
        gmm = res / enc / "gmm"
        cls_report = json.loads((gmm / f"cls_K{k}.json").read_text())
        assert cls_report["n"] == n_train
        labels = load_file(str(gmm / f"cls_K{k}_labels.safetensors"))["labels"]
        assert labels.shape == (n_train,) and int(labels.max()) < k
        spatial = load_file(str(gmm / f"spatial_K{k}.safetensors"))
        assert tuple(spatial["means"].shape) == (k, *shape)
        assert DiagGMM.load(gmm / f"spatial_K{k}.safetensors").num_modes == k

    captions = zarr.open_group(str(res / "captions" / "minilm.zarr"), mode="r")
    assert captions.attrs["complete"] is True and captions["pooled"].shape == (n_train, 384)

    ref = np.load(res / "reference" / "feature-net.npz", allow_pickle=False)
    assert ref["mu"].ndim == 1 and ref["sigma"].shape == (ref["mu"].shape[0],) * 2
    acc = json.loads((res / "feature_net" / "report.json").read_text())
    assert acc["test_accuracy"] > 0.8  # 3 epochs here; the default trains longer


def test_nothing_to_do_after_the_artifacts(digits):
    res = snakemake(digits, "-n")
    assert "Nothing to be done" in res.stdout + res.stderr


def test_changing_the_gmm_reruns_only_gmm_jobs(digits):
    try:
        changed = DIGITS.replace("components: [10], variance: spherical", "components: [10], variance: diag")
        (digits / "config" / "config.yaml").write_text(changed)
        res = snakemake(digits, "-n", "--rerun-triggers", "params")
        rules = {rule for rule, _ in planned_jobs(res.stdout + res.stderr)}
        assert rules == {"build_spatial_gmm", "all"}
    finally:
        (digits / "config" / "config.yaml").write_text(DIGITS)


# one cross-reference error (checked by the workflow) and one schema error; each case is a Snakemake start
@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("- {encoder: dino, components: [4]", "- {encoder: dinno, components: [4]"), "dinno"),
    (lambda t: t.replace("kind: dinov2,", "kind: dinov3,"), "dinov3"),
])
def test_image_config_errors_stop_before_any_job(tmp_path, edit, message):
    repo = scratch_repo(tmp_path, edit(DIGITS))
    res = snakemake(repo, "-n", check=False)
    assert res.returncode != 0
    assert message in res.stdout + res.stderr
    assert not (repo / "results").exists()


def test_imagenet256_config_plans_every_artifact(tmp_path):
    repo = scratch_repo(tmp_path, DIGITS)
    res = snakemake(repo, "-n", "-p", "--configfile", "config/imagenet256.yaml")
    out = res.stdout + res.stderr
    rules = {rule for rule, _ in planned_jobs(out)}
    assert rules == {"prepare_data", "extract_latents", "latent_stats", "fit_cls_gmm", "build_spatial_gmm",
                     "align_captions", "embed_captions", "reference_features", "all"}
    assert "--nproc_per_node 4 stages/extract_latents.py" in out and "--flips" in out
    assert "--components 8192" in out and "--device cuda" in out
