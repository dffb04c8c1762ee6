"""Progress in Snakemake logs: throttled plain lines with rate and ETA (no carriage-return redraws), and every
rule benchmarked, every CPU-heavy rule given threads that reach its stage."""

from __future__ import annotations

import io
import re
from pathlib import Path

from sourceflow.progress import bar

ROOT = Path(__file__).resolve().parents[2]


def test_a_log_file_gets_one_plain_line_per_update_with_rate_and_eta(monkeypatch):
    monkeypatch.setenv("SOURCEFLOW_PROGRESS_SECONDS", "0")
    out = io.StringIO()  # not a terminal, like `> {log} 2>&1`
    for _ in bar(range(5), desc="extract", unit="img", file=out):
        pass
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0].startswith("extract: 0/5 img") and lines[-1].startswith("extract: 5/5 img")
    assert all(re.search(r"elapsed, .* left, .*img/s\]$", ln) for ln in lines)


def test_updates_are_throttled_in_a_log(monkeypatch):
    monkeypatch.setenv("SOURCEFLOW_PROGRESS_SECONDS", "3600")
    out = io.StringIO()
    for _ in bar(range(10000), desc="train", unit="step", file=out):
        pass
    assert len(out.getvalue().splitlines()) <= 3  # the first and the final state only


def _rules() -> dict[str, str]:
    rules = {}
    for smk in (ROOT / "workflow" / "rules").glob("*.smk"):
        for block in re.split(r"\n(?=rule \w+:)", smk.read_text()):
            m = re.match(r"rule (\w+):", block)
            if m:
                rules[m.group(1)] = block
    return rules


def test_every_rule_is_benchmarked_and_heavy_rules_pass_their_threads():
    rules = _rules()
    assert len(rules) >= 17
    assert [r for r, body in rules.items() if "    benchmark:" not in body] == []
    heavy = ("fit_cls_gmm", "build_spatial_gmm", "latent_stats", "embed_captions", "reference_features",
             "train_feature_net", "train", "sample", "extract_latents", "reflow_pairs")
    for r in heavy:
        assert "    threads:" in rules[r], r
        assert re.search(r"--threads \{(threads|params\.threads)\}|--workers \{threads\}|--nproc_per_node", rules[r]) \
            or r == "extract_latents", r
    assert "--no-progress" not in rules["sample"]  # hours of sampling show their progress in the log
