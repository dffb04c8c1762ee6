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
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"

METHODS = ("fm", "otcfm", "loom", "c2ot", "mmfm", "csfm")
DATA_CONDITIONS = ("label", "angle", "xcoord")
IMAGE_CONDITIONS = ("label", "text")  # data conditions of image datasets (class ids, caption embeddings)
SETTINGS = ("model", "train", "time", "sample", "evaluate")
IMAGE_KINDS = ("digits", "imagefolder")

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
# Couplings that re-order x0 across the batch: with a condition-dependent (learned) source the re-ordered
# x0_i would no longer be a draw from p0(· | c_i) of its own condition, so they need a fixed source.
REORDERING_COUPLINGS = ("ot", "loom", "c2ot")


class ConfigError(ValueError):
    """A config problem, with the dotted path of the offending key in the message."""


def load_schema() -> dict[str, Any]:
    """The config schema (a fresh copy each call: callers may fill it in)."""
    return copy.deepcopy(_schema())


@functools.cache
def _schema() -> dict[str, Any]:
    # libyaml's loader when PyYAML has it: the pure-Python one takes ~0.5 s for this 33 KB file, paid by every
    # snakemake invocation (a dry run, each SLURM job's own snakemake) three times before this cache
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(SCHEMA_PATH.read_text(), Loader=loader)  # a safe loader either way: plain data only


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


def normalize_experiments(config: dict[str, Any]) -> dict[str, Any]:
    """Turn ``experiments`` written as a mapping name → experiment into the list the schema validates (in
    order, each with its ``name``), in place; a list is left as it is. The mapping form lets a second
    ``--configfile`` (or ``--config``) change one experiment: Snakemake merges mappings key by key but
    replaces lists whole."""
    exps = config.get("experiments")
    if isinstance(exps, dict):
        out = []
        for name, exp in exps.items():
            exp = dict(exp or {})
            if exp.setdefault("name", name) != name:
                raise ConfigError(f"config: experiments.{name}.name: {exp['name']!r} differs from its key {name!r}")
            out.append(exp)
        config["experiments"] = out
    return config


def experiment_entries(config: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where, experiment) in order, ``where`` naming the experiment for error messages."""
    exps = normalize_experiments(dict(config)).get("experiments") or []
    return [(f"experiments[{i}] ({exp['name']})", exp) for i, exp in enumerate(exps)]


def resolve_experiments(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """name → resolved spec for every experiment; raises :class:`ConfigError` naming the bad key."""
    root = load_schema()
    datasets = config.get("datasets", {})
    specs: dict[str, dict[str, Any]] = {}
    for where, exp in experiment_entries(config):
        name = exp["name"]
        if name in specs:
            raise ConfigError(f"config: {where}.name: duplicate experiment name {name!r}")
        method = exp["method"]
        if exp["data"] not in datasets:
            raise ConfigError(f"config: {where}.data: unknown dataset {exp['data']!r}; declared: {sorted(datasets)}")
        ds = datasets[exp["data"]]
        image = ds["kind"] in IMAGE_KINDS
        spec = deep_merge(METHOD_DEFAULTS[method], {k: v for k, v in exp.items() if k != "overrides"})
        if "reflow" in exp:
            if "coupling" in exp and exp["coupling"].get("kind", "reflow") != "reflow":
                raise ConfigError(f"config: {where}.coupling: a reflow experiment trains on its base's (x0, x1) "
                                  "pairs (coupling kind reflow); drop the coupling")
            spec["coupling"] = {"kind": "reflow"}
        # settings: the config's defaults, then the dataset's own defaults, then the experiment's overrides
        settings = deep_merge(dict(config["defaults"]), ds.get("defaults", {}))
        spec = deep_merge(deep_merge(settings, spec), exp.get("overrides", {}))
        spec.setdefault("conditioning", "none")
        spec.setdefault("regularizers", {"var_reg": 0.0, "align": 0.0})
        spec.setdefault("seeds", config["seeds"])
        spec["dataset"] = {k: v for k, v in ds.items() if k != "defaults"}
        if image:
            _resolve_image_inputs(spec, exp["data"], where)
            # only what training depends on beyond its input files: a change to another encoder, GMM or
            # the reference statistics must not retrain this experiment
            spec["dataset"] = {"kind": ds["kind"], "resolution": ds["resolution"],
                               "encoder": ds["encoders"][spec["encoder"]]}
        elif "encoder" in spec or "text_encoder" in spec:
            raise ConfigError(f"config: {where}.encoder: only image datasets have encoders ({exp['data']!r} is toy data)")
        _check(spec, root["$defs"]["resolved_experiment"], root, where)
        _semantic_checks(spec, where)
        specs[name] = spec
    wheres = dict((exp["name"], where) for where, exp in experiment_entries(config))
    for name, spec in specs.items():
        _check_model_from(specs, name, spec, f"{wheres[name]}.model_from")
        _check_reflow(specs, name, spec, f"{wheres[name]}.reflow.experiment")
        guide = spec["sample"].get("autoguidance")
        if guide is None:
            continue
        g = specs.get(guide["experiment"])
        where = f"{wheres[name]}.overrides.sample.autoguidance.experiment"
        if g is None:
            raise ConfigError(f"config: {where}: unknown experiment {guide['experiment']!r}")
        keys = ("data", "encoder", "conditioning", "text_encoder")
        if tuple(g.get(k) for k in keys) != tuple(spec.get(k) for k in keys):
            raise ConfigError(f"config: {where}: the guide {guide['experiment']!r} must train on the same data, "
                              "encoder, conditioning and text encoder")
        if not set(spec["seeds"]) <= set(g["seeds"]):
            raise ConfigError(f"config: {where}: the guide {guide['experiment']!r} lacks seeds "
                              f"{sorted(set(spec['seeds']) - set(g['seeds']))} (seed s is guided by the guide's seed s)")
        if g["source"]["kind"] != spec["source"]["kind"] or (spec["source"]["kind"] == "gmm" and g["source"] != spec["source"]):
            # a learned (CSFM) guide may be smaller: sampling draws x0 from the main run's source only
            raise ConfigError(f"config: {where}: the guide {guide['experiment']!r} must use the same source"
                              + (" (the same mixture: modes condition both models)" if spec["source"]["kind"] == "gmm" else ""))
    return specs


TRAIN_FREE_KEYS = ("name", "sample", "evaluate", "seeds", "model_from")  # what may differ from a model_from run


def _check_model_from(specs: dict[str, dict[str, Any]], name: str, spec: dict[str, Any], where: str) -> None:
    """An experiment that samples another experiment's trained model must train exactly like it."""
    src = spec.get("model_from")
    if src is None:
        return
    if src not in specs or src == name:
        raise ConfigError(f"config: {where}: {src!r} is not another experiment")
    other = specs[src]
    if other.get("model_from"):
        raise ConfigError(f"config: {where}: {src!r} itself reuses {other['model_from']!r}; name that one")
    for key in sorted(set(spec) | set(other)):
        if key not in TRAIN_FREE_KEYS and spec.get(key) != other.get(key):
            raise ConfigError(f"config: {where}: {name!r} differs from {src!r} in {key!r}, which changes training "
                              "(only sample and evaluate settings may differ)")
    if not set(spec["seeds"]) <= set(other["seeds"]):
        raise ConfigError(f"config: {where}: {src!r} lacks seeds {sorted(set(spec['seeds']) - set(other['seeds']))}")


REFLOW_SAME_KEYS = ("data", "dataset", "source", "conditioning", "model", "encoder", "text_encoder")


def _check_reflow(specs: dict[str, dict[str, Any]], name: str, spec: dict[str, Any], where: str) -> None:
    """A reflow experiment starts from its base's weights and trains on pairs its base samples, so it must
    keep the base's data, source, conditioning and model."""
    rf = spec.get("reflow")
    if rf is None:
        return
    base = specs.get(rf["experiment"])
    if base is None or rf["experiment"] == name:
        raise ConfigError(f"config: {where}: {rf['experiment']!r} is not another experiment")
    if base.get("model_from") or base.get("reflow") or spec.get("model_from"):
        raise ConfigError(f"config: {where}: reflow from a trained experiment of its own (not model_from, not "
                          "another reflow)")
    for key in REFLOW_SAME_KEYS:
        if spec.get(key) != base.get(key):
            raise ConfigError(f"config: {where}: {name!r} differs from its base {rf['experiment']!r} in {key!r} "
                              "(it starts from the base's weights and source)")
    if not set(spec["seeds"]) <= set(base["seeds"]):
        raise ConfigError(f"config: {where}: {rf['experiment']!r} lacks seeds "
                          f"{sorted(set(spec['seeds']) - set(base['seeds']))} (seed s reflows the base's seed s)")


def is_image_spec(spec: dict[str, Any]) -> bool:
    """Whether an experiment trains on an image dataset's latents (else on 2-D toy points)."""
    return spec["dataset"]["kind"] in IMAGE_KINDS


def _pick_named(spec: dict[str, Any], key: str, declared: list[str], owner: str, where: str) -> None:
    """Set ``spec[key]`` to the only declared name when it is unset; check that it is declared."""
    if key not in spec:
        if len(declared) != 1:
            raise ConfigError(f"config: {where}.{key}: {owner} declares {declared}; name the one to use")
        spec[key] = declared[0]
    if spec[key] not in declared:
        raise ConfigError(f"config: {where}.{key}: {owner} has no {key} {spec[key]!r}; declared: {declared}")


def _resolve_image_inputs(spec: dict[str, Any], data: str, where: str) -> None:
    """Fill ``encoder`` (and ``text_encoder`` for text conditioning) from the dataset when unambiguous."""
    ds = spec["dataset"]
    _pick_named(spec, "encoder", sorted(ds.get("encoders", {})), f"dataset {data!r}", where)
    if spec.get("conditioning") == "text":
        tes = sorted((ds.get("captions") or {}).get("text_encoders", {}))
        if not tes:
            raise ConfigError(f"config: {where}.conditioning: text conditioning needs datasets.{data}.captions")
        _pick_named(spec, "text_encoder", tes, f"the captions of dataset {data!r}", where)
    elif "text_encoder" in spec:
        raise ConfigError(f"config: {where}.text_encoder: only used with conditioning: text")
    feats = (ds.get("reference") or {}).get("features", [])
    ev = spec["evaluate"]
    if ev.get("features", "feature-net") not in feats:
        raise ConfigError(f"config: {where}.overrides.evaluate.features: {ev.get('features', 'feature-net')!r} is not "
                          f"among datasets.{data}.reference.features {feats}")
    if ev.get("classifier", True) and "feature-net" not in feats:
        raise ConfigError(f"config: {where}.overrides.evaluate.classifier: class coverage needs the feature network "
                          f"(add feature-net to datasets.{data}.reference.features, or set classifier: false)")
    if spec["source"]["kind"] == "gmm":
        k = spec["source"].get("components")
        fitted = [kk for g in ds.get("gmm", []) if g["encoder"] == spec["encoder"] and g.get("spatial", True)
                  for kk in g["components"]]
        if k not in fitted:
            raise ConfigError(f"config: {where}.source.components: no spatial GMM with K={k} for encoder "
                              f"{spec['encoder']!r} in datasets.{data}.gmm (fitted: {fitted})")


def combination(spec: dict[str, Any]) -> dict[str, str]:
    """What an experiment combines, for grouping like with like: source, coupling and conditioning kinds
    (the method name is only the label of a named combination)."""
    return {"source": spec["source"]["kind"], "coupling": spec["coupling"]["kind"], "conditioning": spec["conditioning"]}


def _semantic_checks(spec: dict[str, Any], where: str) -> None:
    """Any source, coupling and conditioning combine, except the ill-defined combinations refused here
    with their reason (the method only names the defaults)."""
    cond, src = spec["conditioning"], spec["source"]["kind"]
    cpl = spec["coupling"]
    image = is_image_spec(spec)
    conditions = IMAGE_CONDITIONS if image else DATA_CONDITIONS
    if cond not in (*conditions, "none", "mode"):
        raise ConfigError(f"config: {where}.conditioning: {cond!r} is not available for "
                          f"{'image' if image else 'toy'} data (choose from none, mode, {', '.join(conditions)})")
    if image and src == "toy":
        raise ConfigError(f"config: {where}.source.kind: a toy source cannot start a flow on image latents")
    if src == "learned" and cpl["kind"] in REORDERING_COUPLINGS:
        raise ConfigError(f"config: {where}.coupling.kind: {cpl['kind']!r} re-orders x0 across the batch, so it cannot "
                          "pair a condition-dependent (learned) source: x0_i would come from another sample's condition")
    if cpl["kind"] == "c2ot" and (cond not in conditions or cond == "text"):
        raise ConfigError(f"config: {where}.conditioning: the c2ot coupling needs a data condition "
                          f"{tuple(c for c in conditions if c != 'text')}, got {cond!r}")
    if src == "learned" and cond not in conditions:
        raise ConfigError(f"config: {where}.conditioning: a learned source is a function of the condition; "
                          f"choose one of {conditions}, got {cond!r}")
    if cpl["kind"] == "mode" and src != "gmm":
        raise ConfigError(f"config: {where}.coupling.kind: the mode coupling draws x0 from a mode of a GMM source, "
                          f"got source {src!r}")
    if cond == "mode" and src != "gmm":
        raise ConfigError(f"config: {where}.conditioning: 'mode' conditions on the GMM mode x0 was drawn from; "
                          f"it needs source kind gmm, got {src!r}")
    k = spec["train"].get("pair_batch")
    if k is not None:
        b = spec["train"]["batch_size"]
        if k % b:
            raise ConfigError(f"config: {where}.overrides.train.pair_batch: {k} is not a multiple of batch_size {b}")
        for key in ("steps", "checkpoint_every"):
            if spec["train"][key] % (k // b):
                raise ConfigError(f"config: {where}.overrides.train.{key}: must be a multiple of pair_batch / "
                                  f"batch_size = {k // b} (a resume restarts at a pairing boundary)")
    lr_sched = spec["train"].get("lr_schedule")
    if isinstance(lr_sched, dict) and abs(lr_sched["points"][0][1] - spec["train"]["lr"]) > 1e-12:
        raise ConfigError(f"config: {where}.overrides.train.lr: {spec['train']['lr']} differs from the first value "
                          f"of train.lr_schedule ({lr_sched['points'][0][1]})")
    if image and spec["model"]["kind"] == "mlp":
        raise ConfigError(f"config: {where}.overrides.model.kind: image latents need an image model (dit, unet), "
                          "e.g. in datasets.<name>.defaults.model")
    if not image and spec["model"]["kind"] != "mlp":
        raise ConfigError(f"config: {where}.overrides.model.kind: toy points use the mlp model")
    if cpl["kind"] == "c2ot" and cond in ("angle", "xcoord") and cpl.get("weight") == "inf" and cpl.get("target_ratio") is None:
        raise ConfigError(f"config: {where}.coupling: c2ot on a continuous condition needs a finite weight "
                          "or a target_ratio")
    if spec["train"]["p_uncond"] > 0 and cond not in ("label",):
        raise ConfigError(f"config: {where}.overrides.train.p_uncond: CFG dropout needs a class condition (label)")
    ds = spec["dataset"]
    if cpl["kind"] == "loom" and not image and spec["train"]["batch_size"] > ds["n_train"]:
        raise ConfigError(f"config: {where}.overrides.train.batch_size: larger than the dataset ({ds['n_train']})")
    if spec["train"]["grad_accum"] != "auto" and spec["train"]["batch_size"] % spec["train"]["grad_accum"]:
        raise ConfigError(f"config: {where}.overrides.train.grad_accum: must divide batch_size "
                          f"({spec['train']['batch_size']})")
    guide = spec["sample"].get("autoguidance")
    if guide is not None and guide["experiment"] == spec["name"]:
        raise ConfigError(f"config: {where}.overrides.sample.autoguidance.experiment: a run cannot guide itself")
    if spec["sample"]["guidance_scale"] != 1.0:
        if guide is not None:
            raise ConfigError(f"config: {where}.overrides.sample.guidance_scale: classifier-free guidance and "
                              "autoguidance together are not supported; use one")
        if cond != "label" or spec["train"]["p_uncond"] <= 0:
            raise ConfigError(f"config: {where}.overrides.sample.guidance_scale: classifier-free guidance needs a "
                              "class condition trained with dropout (conditioning: label, train.p_uncond > 0); the "
                              "null condition is untrained otherwise")


def external_inputs(config: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(config key, value, kind) of every input the config names outside the results folder: data roots,
    caption files, weight folders or hub ids, the Inception file and ADM reference batches. ``kind`` is
    ``path`` (must exist) or ``weights`` (a local folder, or a hub id that must be in the local cache)."""
    out: list[tuple[str, str, str]] = []
    for name, ds in config.get("datasets", {}).items():
        key = f"datasets.{name}"
        if ds.get("kind") == "imagefolder":
            out.append((f"{key}.root", ds["root"], "path"))
            if ds.get("test_root"):
                out.append((f"{key}.test_root", ds["test_root"], "path"))
        for enc, e in (ds.get("encoders") or {}).items():
            if e.get("weights"):
                out.append((f"{key}.encoders.{enc}.weights", e["weights"], "weights"))
        cap = ds.get("captions") or {}
        if cap.get("file"):
            out.append((f"{key}.captions.file", cap["file"], "path"))
        for te, t in (cap.get("text_encoders") or {}).items():
            if t.get("weights"):
                out.append((f"{key}.captions.text_encoders.{te}.weights", t["weights"], "weights"))
        ref = ds.get("reference") or {}
        for k in ("inception_path", "adm_npz"):
            if ref.get(k):
                out.append((f"{key}.reference.{k}", ref[k], "path"))
    return out


def missing_external_inputs(config: dict[str, Any]) -> list[str]:
    """One line per external input that is not there (all of them at once, each with its config key), so a
    full-scale run stops before any job rather than one job at a time."""
    from sourceflow.encoders.weights import looks_local

    missing = []
    for key, value, kind in external_inputs(config):
        if kind == "weights" and not looks_local(value):
            if not _in_hub_cache(value):
                missing.append(f"{key}: hub id {value!r} is not in the local Hugging Face cache (download it on a "
                               "machine with network, or give a local save_pretrained folder)")
        elif not Path(value).expanduser().exists():
            missing.append(f"{key}: {value} not found")
    return missing


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return False
    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def spec_hash(spec: dict[str, Any]) -> str:
    """Stable short hash of what determines a run's training (stored in checkpoints)."""
    keep = {k: v for k, v in spec.items() if k not in ("sample", "evaluate", "seeds", "model_from")}
    if "train" in keep:  # how rows are read ahead changes no result: a checkpoint stays valid across it
        keep["train"] = {k: v for k, v in keep["train"].items() if k != "loader"}
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
    return [(tag, solver, steps) for tag, solver, steps, _ in sweep_entries(sample)]


def sweep_entries(sample: dict[str, Any]) -> list[tuple[str, str, int | None, int]]:
    """(tag, solver, steps, num_samples) for every point of a sample sweep; an entry's own
    ``num_samples`` (e.g. a few samples at 50 steps, for the sample grids only) overrides the sweep's."""
    out: list[tuple[str, str, int | None, int]] = []
    for entry in sample["solvers"]:
        n = int(entry.get("num_samples", sample["num_samples"]))
        if entry["solver"] == "dopri5":
            out.append(("dopri5", "dopri5", None, n))
        else:
            out += [(f"{entry['solver']}-{s}", entry["solver"], s, n) for s in entry.get("steps", [1])]
    tags = [t for t, *_ in out]
    dup = sorted({t for t in tags if tags.count(t) > 1})
    if dup:
        raise ConfigError(f"config: sample.solvers: entry {dup[0]} appears twice")
    return out


def validate_config(config: dict[str, Any]) -> None:
    """Validate a whole (normalized) config against the schema; ConfigError ``config: <dotted.key>: <reason>``
    (one line) for the first error. The Snakefile calls it before ``snakemake.utils.validate`` (which fills
    defaults), whose own message spans many lines and names the key only inside a dump of the schema."""
    validator = _config_validator()
    # the deepest error names the key most exactly (a retyped discriminator also fails its parent's branch)
    errors = sorted(validator.iter_errors(config), key=lambda e: (-len(e.absolute_path), [str(k) for k in e.absolute_path]))
    if errors:
        e = errors[0]
        where = ".".join(str(k) for k in e.absolute_path) or "<top level>"
        raise ConfigError(f"config: {where}: {' '.join(e.message.split())}")


@functools.lru_cache(maxsize=1)
def _config_validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(load_schema())
