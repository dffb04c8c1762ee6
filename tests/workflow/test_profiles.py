"""Profile precedence: Snakemake adds profiles/default (the workflow profile) to every run, also beside
`--profile profiles/slurm`, and its keys win. So it must hold nothing that changes a cluster run, and a
dry run with the SLURM profile must show the SLURM profile's resources on every job."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from sourceflow.config import resolve_experiments
from sourceflow.plan import enumerate_jobs, load_config, train_mem_mb

from .helpers import ROOT, scratch_repo, snakemake

PROFILES = ROOT / "profiles"
FULL_SCALE = "imagenet256-mmfm.yaml"
# Keys the workflow profile may hold: the same meaning for local and cluster runs (force-use-threads only
# concerns local `run:` jobs, which a cluster run also runs in its own process).
HARMLESS = {"rerun-incomplete", "show-failed-logs", "printshellcmds", "force-use-threads"}


def profile(name: str) -> dict:
    return yaml.safe_load((PROFILES / name / "config.yaml").read_text())


def as_dict(items: list[str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in items)


def planned_resources(dry_run_output: str) -> list[tuple[str, dict[str, str]]]:
    """(rule, resources) of every job in a ``snakemake -n`` output."""
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:\n)", dry_run_output):
        m = re.match(r"(local)?rule (\w+):\n", block)
        if not m or m.group(1):  # local rules run beside Snakemake, not through the executor
            continue
        res = re.search(r"^    resources: (.*)$", block, re.M)
        jobs.append((m.group(2), as_dict(res.group(1).split(", ")) if res else {}))
    return jobs


def test_the_workflow_profile_holds_nothing_that_would_override_the_cluster_profile():
    default, slurm = profile("default"), profile("slurm")
    assert set(default) <= HARMLESS, f"profiles/default would override {sorted(set(default) - HARMLESS)}"
    for key in set(default) & set(slurm):
        assert default[key] == slurm[key], key


def test_the_cluster_profile_keeps_jobs_on_one_node_and_trains_with_wall_time_safety():
    slurm = profile("slurm")
    defaults = as_dict(slurm["default-resources"])
    assert defaults["nodes"] == "1" and {"slurm_partition", "slurm_account"} <= set(defaults)
    train = slurm["set-resources"]["train"]
    assert re.fullmatch(r"'--signal=URG@\d+'", train["slurm_extra"])
    assert slurm["retries"] >= 1 and slurm["keep-going"] is True
    assert "--ntasks-per-gpu" not in (PROFILES / "slurm" / "config.yaml").read_text().replace(
        "never `--ntasks-per-gpu`", "")


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return scratch_repo(tmp_path_factory.mktemp("profiles"), (ROOT / "config" / "config.yaml").read_text())


@pytest.mark.slow
def test_a_dry_run_with_the_slurm_profile_shows_its_resources_on_every_job(repo):
    res = snakemake(repo, "-n", "-p", "--profile", "profiles/slurm", "--configfile", f"config/{FULL_SCALE}")
    out = res.stdout + res.stderr
    assert "workflow specific profile profiles/default" in out  # the precedence this guards against is in play
    slurm = profile("slurm")
    defaults = as_dict(slurm["default-resources"])
    per_rule = slurm["set-resources"]
    jobs = planned_resources(out)
    assert {"train", "sample", "evaluate", "extract_latents", "fit_cls_gmm", "build_spatial_gmm"} <= {r for r, _ in jobs}
    for rule, resources in jobs:
        for key in ("slurm_partition", "slurm_account", "nodes"):
            assert resources.get(key) == defaults[key], (rule, key, resources)
        for key, value in per_rule.get(rule, {}).items():
            assert resources.get(key) == str(value).strip("'"), (rule, key, resources)
        for key in ("runtime", "mem_mb", "gpu"):
            assert key in resources, (rule, key, resources)
    trains = [r for rule, r in jobs if rule == "train"]
    assert trains and all(r["slurm_extra"].startswith("--signal=URG@") and r["nodes"] == "1" for r in trains)
    # each training job asks for the resource plan's host memory of its run (81 GB for MM-FM on 8 GPUs)
    cfg = load_config(ROOT / "config" / FULL_SCALE)
    planned = [train_mem_mb(cfg, j.experiment) for j in enumerate_jobs(cfg, resolve_experiments(cfg))
               if j.rule == "train"]
    assert sorted(int(r["mem_mb"]) for r in trains) == sorted(planned) and max(planned) > 64000
    assert max(int(r["gpu"]) for r in trains) > 1  # a multi-GPU job, on one node
    # sampling on the experiment's node: sample.gpus defaults to train.gpus, one torchrun process per GPU
    samples = [r for rule, r in jobs if rule == "sample"]
    assert sorted(int(r["gpu"]) for r in samples) == sorted(int(r["gpu"]) for r in trains) + [8]  # + model_from (8)
    assert all(r["nodes"] == "1" for r in samples)
    assert re.search(r"torch\.distributed\.run --standalone --nproc_per_node 8 stages/sample\.py", out)


@pytest.mark.slow
@pytest.mark.parametrize("setting, message", [
    ("train:nodes=2", r"resource nodes=2, but multi-node training is not supported"),
    ("train:gpus_per_node=4", r"train\.gpus = 8 is more than the 4 GPUs of one node"),
    ("sample:gpus_per_node=4", r"sample\.gpus = 8 is more than the 4 GPUs of one node"),
])
def test_multi_node_training_is_refused_before_any_job(repo, setting, message):
    res = snakemake(repo, "-n", "--profile", "profiles/slurm", "--configfile", f"config/{FULL_SCALE}",
                    "--set-resources", setting, check=False)
    assert res.returncode != 0
    assert re.search(message, res.stdout + res.stderr), (res.stdout + res.stderr)[-3000:]
