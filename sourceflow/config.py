"""Experiment configuration: the checks a JSON schema cannot express and the resolution of one
experiment into the full, self-contained spec every stage receives.

The workflow validates the config file against ``workflow/schemas/config.schema.yaml`` (which also
fills defaults), then calls :func:`resolve_experiments`. A spec is plain JSON-able data: the
experiment's method, source, coupling and conditioning plus the ``defaults`` sections with the
experiment's ``overrides`` merged in. Changing one experiment's setting changes only its spec, so
only its train/sample/evaluate jobs rerun.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"

METHODS = ("fm", "otcfm", "loom", "c2ot", "mmfm", "csfm")
DATA_CONDITIONS = ("label", "angle", "xcoord")
SETTINGS = ("model", "train", "time", "sample", "evaluate")

# What each method means when the experiment says nothing more.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "fm": {"source": {"kind": "gaussian"}, "coupling": {"kind": "independent"}},
    "otcfm": {"source": {"kind": "gaussian"}, "coupling": {"kind": "ot"}},
    "loom": {"source": {"kind": "gaussian"}, "coupling": {"kind": "loom", "num_caches": 4}},
    "c2ot": {"source": {"kind": "gaussian"}, "coupling": {"kind": "c2ot", "weight": "inf", "target_ratio": None}},
    "mmfm": {"source": {"kind": "gmm", "components": 8, "variance": "spherical"},
             "coupling": {"kind": "mode", "posterior": "soft"}},
    "csfm": {"source": {"kind": "learned", "learn_var": True, "width": 128, "depth": 2},
             "coupling": {"kind": "independent"}, "regularizers": {"var_reg": 5.0, "align": 1.0}},
}
ALLOWED_SOURCES = {"fm": ("gaussian", "toy"), "otcfm": ("gaussian", "toy"), "loom": ("gaussian", "toy"),
                   "c2ot": ("gaussian", "toy"), "mmfm": ("gmm",), "csfm": ("learned",)}


class ConfigError(ValueError):
    """A config problem, with the dotted path of the offending key in the message."""


def load_schema() -> dict[str, Any]:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; values in ``over`` win; lists are replaced, not merged."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _check(instance: Any, schema: dict[str, Any], root: dict[str, Any], where: str) -> None:
    """Validate against a sub-schema of the config schema; raise one line naming the key."""
    validator = jsonschema.Draft202012Validator({**schema, "$defs": root.get("$defs", {})})
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        keys = [str(k) for k in e.absolute_path]
        if keys and keys[0] in SETTINGS:
            keys.insert(0, "overrides")  # settings reach a resolved spec through defaults/overrides
        path = ".".join([where, *keys])
        raise ConfigError(f"config: {path}: {e.message}")


def resolve_experiments(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """name → resolved spec for every experiment; raises :class:`ConfigError` naming the bad key."""
    root = load_schema()
    datasets = config.get("datasets", {})
    specs: dict[str, dict[str, Any]] = {}
    for i, exp in enumerate(config.get("experiments", [])):
        name = exp["name"]
        where = f"experiments[{i}] ({name})"
        if name in specs:
            raise ConfigError(f"config: {where}.name: duplicate experiment name {name!r}")
        method = exp["method"]
        if exp["data"] not in datasets:
            raise ConfigError(f"config: {where}.data: unknown dataset {exp['data']!r}; declared: {sorted(datasets)}")
        if datasets[exp["data"]]["kind"] != "toy":
            raise ConfigError(f"config: {where}.data: {exp['data']!r} is an image dataset; training on images "
                              "is not in this version yet (image datasets build their artifacts only)")
        spec = deep_merge(METHOD_DEFAULTS[method], {k: v for k, v in exp.items() if k != "overrides"})
        spec = deep_merge(deep_merge({k: v for k, v in config["defaults"].items()}, spec), exp.get("overrides", {}))
        spec.setdefault("conditioning", "none")
        spec.setdefault("regularizers", {"var_reg": 0.0, "align": 0.0})
        spec.setdefault("seeds", config["seeds"])
        spec["dataset"] = datasets[exp["data"]]
        _check(spec, root["$defs"]["resolved_experiment"], root, where)
        _semantic_checks(spec, where)
        specs[name] = spec
    return specs


def _semantic_checks(spec: dict[str, Any], where: str) -> None:
    method, cond, src = spec["method"], spec["conditioning"], spec["source"]["kind"]
    if src not in ALLOWED_SOURCES[method]:
        raise ConfigError(f"config: {where}.source.kind: method {method} needs a source of kind "
                          f"{' or '.join(ALLOWED_SOURCES[method])}, got {src!r}")
    if method == "c2ot" and cond not in DATA_CONDITIONS:
        raise ConfigError(f"config: {where}.conditioning: c2ot needs a data condition {DATA_CONDITIONS}, got {cond!r}")
    if method == "csfm" and cond not in DATA_CONDITIONS:
        raise ConfigError(f"config: {where}.conditioning: csfm's source is a function of the condition; "
                          f"choose one of {DATA_CONDITIONS}, got {cond!r}")
    if cond == "mode" and method != "mmfm":
        raise ConfigError(f"config: {where}.conditioning: 'mode' exists only for mmfm (GMM source)")
    if method == "mmfm" and cond not in ("none", "mode"):
        raise ConfigError(f"config: {where}.conditioning: mmfm is unconditional or mode-conditional, got {cond!r}")
    cpl = spec["coupling"]
    if method == "c2ot" and cond in ("angle", "xcoord") and cpl.get("weight") == "inf" and cpl.get("target_ratio") is None:
        raise ConfigError(f"config: {where}.coupling: c2ot on a continuous condition needs a finite weight "
                          "or a target_ratio")
    if spec["train"]["p_uncond"] > 0 and cond not in ("label",):
        raise ConfigError(f"config: {where}.overrides.train.p_uncond: CFG dropout needs a class condition (label)")
    ds = spec["dataset"]
    if method == "loom" and spec["train"]["batch_size"] > ds["n_train"]:
        raise ConfigError(f"config: {where}.overrides.train.batch_size: larger than the dataset ({ds['n_train']})")


def spec_hash(spec: dict[str, Any]) -> str:
    """Stable short hash of what determines a run's training (stored in checkpoints)."""
    keep = {k: v for k, v in spec.items() if k not in ("sample", "evaluate", "seeds")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def load_spec(arg: str) -> dict[str, Any]:
    """A stage's ``--spec``: a path to a JSON file or the JSON text itself."""
    text = arg
    if not arg.lstrip().startswith("{"):
        try:
            text = Path(arg).read_text()
        except FileNotFoundError:
            raise ConfigError(f"--spec: no such file {arg!r} (give a JSON file or JSON text)") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--spec: not valid JSON ({e})") from None


def sweep_tags(sample: dict[str, Any]) -> list[tuple[str, str, int | None]]:
    """(tag, solver, steps) for every point of a sample sweep; adaptive solvers have no steps."""
    out: list[tuple[str, str, int | None]] = []
    for entry in sample["solvers"]:
        if entry["solver"] == "dopri5":
            out.append(("dopri5", "dopri5", None))
        else:
            out += [(f"{entry['solver']}-{s}", entry["solver"], s) for s in entry.get("steps", [1])]
    return out
