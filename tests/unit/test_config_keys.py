"""Every key of a valid small config (tests/data/tiny.yaml), at every nesting level, misspelt or given a
value of the wrong type, fails validation (``sourceflow.config.validate_config``, what the Snakefile runs
before Snakemake's validate) with ONE line ``config: <dotted.key.path>: <reason>`` naming that key
(issue 10, item 4). In process: one jsonschema pass per key, no Snakemake subprocess."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sourceflow.config import ConfigError, normalize_experiments, validate_config

ROOT = Path(__file__).resolve().parents[2]


_VALID = normalize_experiments(yaml.safe_load((ROOT / "tests" / "data" / "tiny.yaml").read_text()))


def valid_config() -> dict[str, Any]:
    return copy.deepcopy(_VALID)


def keys(node: Any, path: tuple = ()) -> Iterator[tuple]:
    """The path of every mapping key (list positions included in the path) at every level."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield (*path, k)
            yield from keys(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from keys(v, (*path, i))


def parent(cfg: dict, path: tuple) -> dict:
    for k in path[:-1]:
        cfg = cfg[k]
    return cfg


def wrong_type(value: Any) -> Any:
    """A value of another JSON type than ``value`` that no key of the schema accepts."""
    return {"not": ["a", "valid", "value"]} if not isinstance(value, dict) else [["not", "valid"]]


KEYS = list(keys(valid_config()))


def dotted(path: tuple) -> str:
    return ".".join(map(str, path))


def error_line(cfg: dict) -> str:
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("config: "), msg
    return msg


def test_every_key_misspelt_and_retyped_is_named():
    """All keys in one test (a parametrized case per key would be ~150 tests of a few ms each)."""
    assert len(KEYS) > 50
    bad, free = [], set()
    for path in KEYS:
        cfg = valid_config()
        p = parent(cfg, path)
        p[f"{path[-1]}x"] = p.pop(path[-1])  # misspelt: the parent is named, and the unexpected key
        try:
            validate_config(cfg)
        except ConfigError:
            msg = error_line(cfg)
        else:  # a name the user chooses (a dataset, an experiment): any spelling is valid
            free.add(dotted(path[:-1]))
            msg = f"{path[-1]}x config: {dotted(path[:-1])}:"
        if f"{path[-1]}x" not in msg or (len(path) > 1 and f"config: {dotted(path[:-1])}:" not in msg):
            bad.append(("misspelt", dotted(path), msg))
        cfg = valid_config()
        p = parent(cfg, path)
        p[path[-1]] = wrong_type(p[path[-1]])
        msg = error_line(cfg)
        if not msg.startswith(f"config: {dotted(path)}"):
            bad.append(("retyped", dotted(path), msg))
    assert not bad, "\n".join(map(str, bad))
    assert free <= {"datasets", "experiments"}, free


def test_errors_are_independent_of_the_valid_config():
    cfg = valid_config()
    before = copy.deepcopy(cfg)
    validate_config(cfg)
    assert cfg == before  # validation alone fills no defaults (Snakemake's validate does that afterwards)
