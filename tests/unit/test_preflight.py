"""Preflight: every external input a config names is checked at once, each with its config key."""

from __future__ import annotations

from pathlib import Path

import yaml

from sourceflow.config import external_inputs, missing_external_inputs

ROOT = Path(__file__).resolve().parents[2]


def test_every_external_input_of_the_mmfm_config_is_listed_with_its_key(tmp_path):
    cfg = yaml.safe_load((ROOT / "config" / "imagenet256-mmfm.yaml").read_text())
    keys = {k for k, _, _ in external_inputs(cfg)}
    assert keys == {"datasets.imagenet256.root", "datasets.imagenet256.encoders.rae.weights",
                    "datasets.imagenet256.reference.inception_path", "datasets.imagenet256.reference.adm_npz"}
    missing = missing_external_inputs(cfg)
    assert len(missing) == 4 and missing[0] == "datasets.imagenet256.root: /data/imagenet/train not found"
    # present inputs drop out of the list
    ds = cfg["datasets"]["imagenet256"]
    ds["root"] = str(tmp_path)
    (tmp_path / "inception.pt").write_bytes(b"x")
    ds["reference"]["inception_path"] = str(tmp_path / "inception.pt")
    assert [m.split(":")[0] for m in missing_external_inputs(cfg)] == [
        "datasets.imagenet256.encoders.rae.weights", "datasets.imagenet256.reference.adm_npz"]


def test_hub_ids_are_checked_in_the_local_cache_and_the_default_has_no_external_inputs(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    cfg = yaml.safe_load((ROOT / "config" / "imagenet256-csfm.yaml").read_text())
    clip = [m for m in missing_external_inputs(cfg) if ".text_encoders.clip.weights" in m]
    assert len(clip) == 1 and "openai/clip-vit-large-patch14" in clip[0] and "cache" in clip[0]
    default = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    assert external_inputs(default) == [] and missing_external_inputs(default) == []


def test_weights_with_spaces_or_quotes_are_paths_not_hub_ids():
    """A value the hub could never accept as an id is a (missing) folder, reported as such; before, the hub's
    id validation raised out of the preflight with a traceback."""
    from sourceflow.encoders.weights import looks_local

    assert looks_local('my models/tiny "dino"') and looks_local("it's") and looks_local("a b")
    assert not looks_local("facebook/dinov2-with-registers-base") and not looks_local("gpt2")
