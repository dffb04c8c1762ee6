"""Every config in config/ plans its whole workflow: `snakemake -n --configfile config/X.yaml` in a
scratch copy of the repository (no data, weights or results: full-scale configs are planned, not run)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sourceflow.config import normalize_experiments

from .helpers import ROOT, planned_jobs, scratch_repo, snakemake

pytestmark = pytest.mark.slow

CONFIGS = sorted(p.name for p in (ROOT / "config").glob("*.yaml"))

# What a config's dry run must also show (`-p` prints every shell command).
EXPECT: dict[str, list[str]] = {
    # LOOM: FID against the test split's statistics
    "cifar10-loom.yaml": ["stages/reference_stats.py --manifest results/cifar10/manifest.parquet --split test"],
    # the seed's FID against the dataset's own statistics (all images are training images)
    "celebahq256-dit.yaml": ["--encoder sd-vae", "--test-fraction 0",
                             "stages/reference_stats.py --manifest results/celebahq256/manifest.parquet --split train"],
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """One scratch copy for all dry runs (they write nothing but Snakemake's own metadata)."""
    return scratch_repo(tmp_path_factory.mktemp("configs"), (ROOT / "config" / "config.yaml").read_text())


def test_configs_are_found():
    assert {"config.yaml", "cifar10-loom.yaml", "cifar10-dit-cfg.yaml", "celebahq256-dit.yaml"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_dry_run_plans_every_experiment(repo, name):
    cfg = normalize_experiments(yaml.safe_load((ROOT / "config" / name).read_text()))
    res = snakemake(repo, "-n", "-p", "--configfile", f"config/{name}")
    out = res.stdout + res.stderr
    jobs = planned_jobs(out)
    assert jobs, f"{name}: nothing planned"
    experiments = cfg.get("experiments", [])
    trained = {e["name"] for e in experiments if "model_from" not in e}
    assert {w["exp"] for rule, w in jobs if rule == "train"} == trained
    assert {w["exp"] for rule, w in jobs if rule == "evaluate"} == {e["name"] for e in experiments}
    for ds_name, ds in cfg["datasets"].items():
        features = set((ds.get("reference") or {}).get("features", []))
        planned = {w["features"] for rule, w in jobs if rule == "reference_features" and w["dataset"] == ds_name}
        assert planned == features, f"{name}: datasets.{ds_name}.reference.features"
    for text in EXPECT.get(name, []):
        assert text in out, f"{name}: {text!r} not in the dry run"


def test_planning_the_default_imports_no_numerical_library(repo):
    """Every snakemake invocation (a dry run, each SLURM job's own snakemake) parses the workflow: for the
    default it must not import torch, scikit-learn, SciPy or POT (the preflight once pulled torch in through
    the encoders package, ~2 s a call); image configs import torch for the resource plan (train mem_mb)."""
    import os

    env = dict(os.environ, PYTHONPROFILEIMPORTTIME="1")
    res = snakemake(repo, "-n", "--forceall", env=env)
    imported = {ln.rsplit("|", 1)[1].strip() for ln in res.stderr.splitlines() if ln.startswith("import time:")}
    assert "snakemake" in imported and "sourceflow.config" in imported
    assert not imported & {"torch", "sklearn", "scipy", "ot"}, sorted(imported & {"torch", "sklearn", "scipy", "ot"})


def test_gmm_reuse_bounds_key_reaches_the_fit(repo, tmp_path):
    """`gmm[].reuse_bounds: true` (a small file layered over the default) adds --reuse-bounds to that fit only."""
    over = tmp_path / "bounds.yaml"
    over.write_text("datasets:\n  digits:\n    gmm:\n"
                    "      - {encoder: pixels, components: [10], variance: spherical, reuse_bounds: true}\n")
    fits = {}
    for args in ((), ("--configfile", "config/config.yaml", str(over))):
        out = snakemake(repo, "-n", "-p", "--forceall", *args).stdout
        fits[bool(args)] = [ln for ln in out.splitlines() if "stages/fit_cls_gmm.py" in ln]
    assert fits[False] and fits[True] and len(fits[False]) == len(fits[True])
    assert not any("--reuse-bounds" in ln for ln in fits[False])
    assert [("--store" in ln) for ln in fits[True] if "--reuse-bounds" in ln] == [True]  # digits, not moons' K=8
