"""A full-scale config whose external inputs are missing: the dry run warns with the whole list, a real run
stops before any job (not one job at a time)."""

from __future__ import annotations

import pytest

from .helpers import ROOT, scratch_repo, snakemake

pytestmark = pytest.mark.slow


def test_missing_inputs_are_listed_at_once_and_stop_a_run_before_any_job(tmp_path):
    repo = scratch_repo(tmp_path, (ROOT / "config" / "imagenet256-mmfm.yaml").read_text())
    dry = snakemake(repo, "-n")
    out = dry.stdout + dry.stderr
    assert "4 external input(s) missing" in out and "datasets.imagenet256.reference.adm_npz:" in out
    run = snakemake(repo, "--cores", "1", check=False)
    out = run.stdout + run.stderr
    assert run.returncode != 0 and "nothing was run" in out
    assert "datasets.imagenet256.encoders.rae.weights: /models/rae-dinov2-b-reg not found" in out
    assert not (repo / "results").exists()  # not even the spec files
