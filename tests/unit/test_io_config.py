"""Atomic writes, checkpoint directories, config validation and resolution."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from snakemake.utils import validate

from sourceflow.config import ConfigError, normalize_experiments, resolve_experiments, spec_hash, sweep_tags
from sourceflow.io import atomic_path, replace_dir, resolve_dir, write_json
from sourceflow.train.checkpoint import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "a.json"
    write_json(target, {"x": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"x": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_replace_dir_falls_back_to_the_previous_complete_version(tmp_path):
    final = tmp_path / "last"
    for v in ("1", "2"):
        tmp = tmp_path / f"tmp{v}"
        tmp.mkdir()
        (tmp / "v").write_text(v)
        replace_dir(tmp, final)
    assert (resolve_dir(final) / "v").read_text() == "2"
    final.rename(tmp_path / "last.old")  # a crash between the two renames
    assert (resolve_dir(final) / "v").read_text() == "2"
    assert resolve_dir(tmp_path / "none") is None


def test_checkpoint_round_trip_with_optimizer(tmp_path):
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    m(torch.randn(5, 3)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "last", {"model": m.state_dict()}, opt.state_dict(), {"step": 7, "run_hash": "h"})
    parts, opt_state, info = load_checkpoint(tmp_path / "last", ["model"])
    assert info == {"step": 7, "run_hash": "h"}
    m2 = torch.nn.Linear(3, 2)
    m2.load_state_dict(parts["model"])
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-3)
    opt2.load_state_dict(opt_state)
    for k in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(opt2.state_dict()["state"][0][k], opt.state_dict()["state"][0][k])
    assert load_checkpoint(tmp_path / "nothing", ["model"]) is None


def default_config() -> dict:
    cfg = normalize_experiments(yaml.safe_load((ROOT / "config" / "config.yaml").read_text()))
    validate(cfg, str(SCHEMA))
    return cfg


def test_a_small_file_layered_over_the_default_changes_one_experiment(tmp_path):
    """The default writes its experiments as a mapping by name, so `--configfile config/config.yaml mine.yaml`
    (Snakemake merges the files with snakemake.utils.update_config: mappings key by key) changes one."""
    from snakemake.utils import update_config

    base = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    overlay = yaml.safe_load("experiments:\n  fm: {overrides: {train: {lr: 0.002}}}\n")
    merged = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    update_config(merged, overlay)
    for cfg in (base, merged):
        validate(normalize_experiments(cfg), str(SCHEMA))
    a, b = resolve_experiments(base), resolve_experiments(merged)
    assert [n for n in a if spec_hash(a[n]) != spec_hash(b[n])] == ["fm"] and b["fm"]["train"]["lr"] == 0.002
    assert list(a) == list(b)  # the order and every other experiment are kept
    with pytest.raises(ConfigError, match="experiments.fm.name: 'x' differs from its key 'fm'"):
        normalize_experiments({"experiments": {"fm": {"name": "x", "method": "fm", "data": "moons"}}})


def test_default_config_resolves_every_method():
    specs = resolve_experiments(default_config())
    assert {s["method"] for s in specs.values()} == {"fm", "otcfm", "loom", "c2ot", "mmfm", "csfm"}
    assert specs["loom"]["coupling"] == {"kind": "loom", "num_caches": 4}
    assert specs["csfm"]["regularizers"] == {"var_reg": 5.0, "align": 1.0}
    assert [t for t, _, _ in sweep_tags(specs["fm"]["sample"])][-1] == "dopri5"


def test_overrides_change_only_their_experiment():
    cfg = default_config()
    base = resolve_experiments(cfg)
    cfg2 = copy.deepcopy(cfg)
    cfg2["experiments"][0].setdefault("overrides", {})["train"] = {"lr": 0.01}
    new = resolve_experiments(cfg2)
    changed = [n for n in base if spec_hash(base[n]) != spec_hash(new[n])]
    assert changed == [cfg["experiments"][0]["name"]]
    assert new[changed[0]]["train"]["lr"] == 0.01


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["experiments"][0].setdefault("overrides", {}).update({"train": {"stpes": 3}}),
     r"experiments\[0\] \(fm\)\.overrides\.train: Additional properties are not allowed \('stpes'"),
    (lambda c: c["experiments"][0].setdefault("overrides", {}).update({"train": {"lr": -1}}),
     r"overrides\.train\.lr: -1 is less than or equal to the minimum"),
    (lambda c: c["experiments"][0].update({"data": "nope"}), r"experiments\[0\] \(fm\)\.data: unknown dataset 'nope'"),
    (lambda c: c["experiments"][3].update({"conditioning": "none"}), r"c2ot coupling needs a data condition"),
    (lambda c: c["experiments"].append(dict(c["experiments"][0])), r"duplicate experiment name 'fm'"),
    (lambda c: c["experiments"][5].update({"coupling": {"kind": "loom"}}), r"re-orders x0 .* \(learned\) source"),
    (lambda c: c["experiments"][0].update({"conditioning": "mode"}), r"'mode' .* needs source kind gmm"),
    (lambda c: c["experiments"][0].update({"coupling": {"kind": "mode"}}), r"mode coupling .* GMM source"),
])
def test_config_errors_name_the_key(mutate, message):
    cfg = default_config()
    mutate(cfg)
    with pytest.raises(ConfigError, match=message):
        resolve_experiments(cfg)


def test_schema_rejects_misspelt_top_level_and_dataset_keys():
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["datasets"]["moons"]["n_trian"] = 5
    with pytest.raises(Exception, match="n_trian"):
        validate(cfg, str(SCHEMA))


def test_safetensors_metadata_is_one_sorted_entry_so_equal_artifacts_are_equal_bytes(tmp_path):
    """safetensors writes a metadata map in an order that changes from process to process: one sorted-JSON
    entry makes the bytes a pure function of the content; readers see the flat map either way."""
    import subprocess
    import sys

    from safetensors import safe_open

    from sourceflow.io import read_safetensors, save_safetensors

    code = ("import sys, torch; from sourceflow.io import save_safetensors; "
            "save_safetensors(sys.argv[1], {'b': torch.arange(3.0), 'a': torch.ones(2)}, "
            "{'zeta': '1', 'alpha': '2', 'mid': '3', 'run_hash': 'abc', 'step': '7'})")
    for name in ("x", "y", "z"):  # separate processes: separate hash seeds
        subprocess.run([sys.executable, "-c", code, str(tmp_path / name)], check=True, cwd=ROOT)
    data = {(tmp_path / n).read_bytes() for n in ("x", "y", "z")}
    assert len(data) == 1
    with safe_open(str(tmp_path / "x"), framework="pt") as f:
        assert list(f.metadata()) == ["sourceflow"]
    t, meta = read_safetensors(tmp_path / "x", ["a"], "test file")
    assert meta == {"alpha": "2", "mid": "3", "run_hash": "abc", "step": "7", "zeta": "1"}
    save_safetensors(tmp_path / "w", {"a": torch.zeros(1)})
    assert read_safetensors(tmp_path / "w", ["a"], "test file")[1] == {}
