"""Every stage explains every flag in --help and fails with one clear line on bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STAGES = sorted(p.stem for p in (ROOT / "stages").glob("*.py"))


def test_all_stages_present():
    assert STAGES == ["align_captions", "build_spatial_gmm", "cls_posteriors", "embed_captions", "evaluate",
                      "extract_latents", "fit_cls_gmm", "latent_stats", "make_toy_data", "plan", "prepare_data",
                      "reference_stats", "reflow_pairs", "report", "sample", "train", "train_feature_net"]


@pytest.mark.parametrize("stage", STAGES)
def test_help_documents_every_flag(stage):
    res = subprocess.run([sys.executable, f"stages/{stage}.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0
    out = res.stdout
    assert out.startswith("usage:") and ("Example:" in out or "Examples:" in out)
    flags = [ln.split()[0] for ln in out.splitlines() if ln.startswith("  --") and not ln.startswith("  --help")]
    assert len(flags) >= 3
    # the formatter appends "(default: …)" to every flag that has help text, and only to those
    assert out.count("(default:") == len(flags), out


def test_missing_input_is_one_line(tmp_path):
    res = subprocess.run([sys.executable, "stages/fit_cls_gmm.py", "--data", str(tmp_path / "nope.safetensors"),
                          "--components", "3", "--out", str(tmp_path / "g.safetensors")],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"error: data file not found: {tmp_path / 'nope.safetensors'} "
                                               "(run the make_toy_data stage)"]


def test_bad_spec_is_one_line(tmp_path):
    (tmp_path / "toy.safetensors").write_bytes(b"")
    res = subprocess.run([sys.executable, "stages/train.py", "--spec", "{not json", "--data", "x", "--out",
                          str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.startswith("error: --spec: not valid JSON")
