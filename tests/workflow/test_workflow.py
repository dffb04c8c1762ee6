"""The Snakemake workflow end to end on a tiny config (subprocess `snakemake`): a full run, nothing
left to do afterwards, partial reruns, resume after a kill, two-process training, config errors."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from .helpers import ROOT, planned_jobs, scratch_repo, snakemake

pytestmark = pytest.mark.slow

TINY = (ROOT / "tests" / "data" / "tiny.yaml").read_text()
# loom trains with two processes (torchrun + gloo), so the global-pairing path runs end to end
TINY_2PROC = TINY.replace("coupling: {num_caches: 2}}", "coupling: {num_caches: 2}, overrides: {train: {processes: 2}}}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, ) -> Path:
    repo = scratch_repo(tmp_path_factory.mktemp("tiny"), TINY_2PROC)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    snakemake(repo, env=env)
    return repo


def test_full_run_writes_the_report(tiny):
    rep = tiny / "results" / "report"
    for name in ("metrics.csv", "summary.md", "w2_vs_nfe.png", "samples_moons.png"):
        assert (rep / name).stat().st_size > 0, name
    df = pd.read_csv(rep / "metrics.csv")
    assert list(df.columns) == ["dataset", "experiment", "method", "source", "coupling", "conditioning", "reflow_from",
                                "solver", "steps", "nfe", "metric", "value", "seed"]
    combos = set(df[["experiment", "source", "coupling", "conditioning"]].itertuples(index=False))
    assert ("mmfm", "gmm", "mode", "mode") in combos and ("fm", "toy", "independent", "none") in combos
    assert set(df.reflow_from.dropna()) == {"fm"} and set(df[df.reflow_from.notna()].experiment) == {"fm-reflow"}
    assert set(df.experiment) == {"fm", "otcfm", "loom", "c2ot", "fm-label", "mmfm", "csfm", "fm-reflow", "gmm-loom"}
    w2 = df[df.metric == "w2sq"]
    assert set(zip(w2.solver, w2.steps.fillna(0).astype(int), strict=True)) == {("euler", 1), ("euler", 2), ("dopri5", 0)}
    assert (w2.value > 0).all()
    assert (df[(df.metric == "nfe") & (df.solver == "euler")].value == df[(df.metric == "nfe") & (df.solver == "euler")].steps).all()
    assert (df[(df.metric == "nfe") & (df.solver == "dopri5")].value > 2).all()
    # per-condition W2 for the conditional runs only
    cond = df[df.metric.str.startswith("w2sq_cond[")]
    assert set(cond.experiment) == {"c2ot", "csfm", "fm-label"}
    summary = (rep / "summary.md").read_text()
    assert "## moons" in summary and "### moons: W2² against the like-for-like baseline" in summary
    # mmfm (mode-conditional) against the unconditional fm; the label-conditioned runs against fm-label
    assert re.search(r"^\| mmfm +\| gmm / mode / mode +\| fm +\|", summary, re.M)
    assert re.search(r"^\| c2ot +\| toy / c2ot / label +\| fm-label +\|", summary, re.M)
    assert re.search(r"^\| csfm +\| learned / independent / label +\| fm-label +\|", summary, re.M)
    assert re.search(r"^\| fm-reflow +\| fm +\| .+ \| (yes|no) +\|$", summary, re.M)  # reflow against its base
    assert "- **gmm-loom** (gmm source + loom coupling, conditioning mode)" in summary  # against both parents
    assert "Parents: mmfm (same source: gmm source, mode coupling) and loom (same coupling" in summary


def test_two_process_training_shards_the_data_and_keeps_one_model(tiny):
    s = json.loads((tiny / "results/moons/runs/loom/seed0/train_summary.json").read_text())
    assert s["world_size"] == 2
    assert s["shards_disjoint"] is True
    assert len(s["rank_weight_checksums"]) == 2 and s["rank_weight_checksums"][0] == s["rank_weight_checksums"][1]


def test_nothing_to_do_after_a_full_run(tiny):
    res = snakemake(tiny, "-n")
    assert "Nothing to be done" in res.stdout + res.stderr


def _plan(repo: Path, config_text: str) -> set[tuple[str, str]]:
    (repo / "config" / "config.yaml").write_text(config_text)
    res = snakemake(repo, "-n")
    return {(rule, wc.get("exp", "")) for rule, wc in planned_jobs(res.stdout + res.stderr)}


def test_changing_one_experiment_reruns_only_its_jobs(tiny):
    try:
        changed = TINY_2PROC.replace("{name: fm, method: fm, data: moons,",
                                     "{name: fm, method: fm, data: moons, overrides: {train: {lr: 0.002}},")
        # fm-reflow trains on pairs fm's model generates, so it reruns too (and nothing else)
        assert _plan(tiny, changed) == {("experiment_spec", "fm"), ("train", "fm"), ("sample", "fm"),
                                        ("evaluate", "fm"), ("reflow_pairs", "fm-reflow"), ("train", "fm-reflow"),
                                        ("sample", "fm-reflow"), ("evaluate", "fm-reflow"), ("report", ""), ("all", "")}
        # a sampling setting: sample and evaluate rerun, training does not
        changed = TINY_2PROC.replace("{name: fm, method: fm, data: moons,",
                                     "{name: fm, method: fm, data: moons, overrides: {sample: {num_samples: 200}},")
        assert _plan(tiny, changed) == {("experiment_spec", "fm"), ("sample", "fm"), ("evaluate", "fm"),
                                        ("report", ""), ("all", "")}
    finally:
        (tiny / "config" / "config.yaml").write_text(TINY_2PROC)


def test_killed_training_resumes_to_the_same_weights(tmp_path):
    cfg = TINY.replace("train: {steps: 40, batch_size: 64, checkpoint_every: 10, log_every: 10}",
                       "train: {steps: 600, batch_size: 64, checkpoint_every: 50, log_every: 50}")
    repo = scratch_repo(tmp_path / "repo", cfg)
    target = "results/moons/runs/otcfm/seed0/model.safetensors"
    ckpt = repo / "results/moons/runs/otcfm/seed0/checkpoints/last/trainer.json"
    proc = subprocess.Popen([sys.executable, "-m", "snakemake", "--cores", "1", target], cwd=repo,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if ckpt.exists() and json.loads(ckpt.read_text())["step"] >= 100:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(ckpt.read_text())["step"]
    assert 100 <= killed_at < 600 and not (repo / target).exists()
    snakemake(repo, "--unlock")  # Snakemake itself was killed: release its lock, as a user would
    snakemake(repo, target)
    log = (repo / "results/logs/moons/otcfm/seed0/train.log").read_text()
    assert re.search(r"resuming from .* at step (\d+)", log)
    # the same stage, uninterrupted, in another directory
    spec = repo / "results/moons/runs/otcfm/spec_train.json"
    subprocess.run([sys.executable, "stages/train.py", "--spec", str(spec), "--data", "results/moons/toy.safetensors",
                    "--out", str(tmp_path / "straight"), "--seed", "0", "--no-progress"], cwd=repo, check=True,
                   capture_output=True)
    a, b = load_file(str(repo / target)), load_file(str(tmp_path / "straight" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("seeds: [0]", "sedes: [0]"), "sedes"),
    (lambda t: t.replace("train: {steps: 40,", "train: {stpes: 40,"), "stpes"),
    (lambda t: t.replace("8gaussians}, conditioning: label}\n  - {name: fm-label", "8gaussians}, conditioning: none}\n  - {name: fm-label"),
     "c2ot coupling needs a data condition"),
    (lambda t: t.replace("n_test: 300", "n_test: -3"), "n_test"),
])
def test_config_errors_stop_before_any_job(tmp_path, edit, message):
    repo = scratch_repo(tmp_path, edit(TINY))
    res = snakemake(repo, "-n", check=False)
    assert res.returncode != 0
    assert message in res.stdout + res.stderr
    assert not (repo / "results").exists()


def test_lint_is_clean(tmp_path):
    repo = scratch_repo(tmp_path, TINY)
    res = snakemake(repo, "--lint")
    assert "Congratulations, your workflow is in a good condition!" in res.stdout + res.stderr
