# Helpers shared by every rule: resolved experiment specs, paths, launch commands.
import hashlib
import json
import os
import sys

from snakemake.exceptions import WorkflowError

sys.path.insert(0, workflow.basedir)
from sourceflow.config import ConfigError, resolve_experiments  # noqa: E402
from sourceflow.io import write_json  # noqa: E402

# Jobs run `python` from the environment running Snakemake (the project's .venv), without putting its
# absolute path into commands or params (which would rerun everything when the checkout moves).
shell.prefix(f"set -euo pipefail; export PATH={os.path.dirname(sys.executable)}:$PATH; ")
R = config["results"]
NAME = "[A-Za-z0-9][A-Za-z0-9_.-]*"

wildcard_constraints:
    dataset=NAME,
    exp=NAME,
    seed=r"\d+",
    K=r"\d+",
    stage="train|sample|evaluate",

try:
    SPECS = resolve_experiments(config)
except ConfigError as e:
    raise WorkflowError(str(e)) from None


STAGE_DROPS = {"train": ("sample", "evaluate", "seeds"), "sample": ("evaluate", "seeds"), "evaluate": ("seeds",)}


def stage_spec(exp, stage):
    """The part of an experiment's spec a stage depends on."""
    return {k: v for k, v in SPECS[exp].items() if k not in STAGE_DROPS[stage]}


def stage_spec_hash(exp, stage):
    return hashlib.sha256(json.dumps(stage_spec(exp, stage), sort_keys=True).encode()).hexdigest()[:16]


def write_stage_spec(exp, stage, path, log):
    write_json(path, stage_spec(exp, stage))
    with open(log, "w") as f:
        f.write(f"wrote {path} ({stage_spec_hash(exp, stage)})\n")


def spec_file(stage):
    """Input function: the experiment's spec file for ``stage``."""
    return lambda wc: f"{R}/{SPECS[wc.exp]['data']}/runs/{wc.exp}/spec_{stage}.json"


def run_dir(dataset, exp, seed):
    return f"{R}/{dataset}/runs/{exp}/seed{seed}"


def runs():
    """(dataset, experiment, seed) of every run the config asks for."""
    return [(s["data"], name, seed) for name, s in SPECS.items() for seed in s["seeds"]]


def data_file(wc):
    return f"{R}/{SPECS[wc.exp]['data']}/toy.safetensors"


def gmm_file(wc):
    """The CLS GMM an mmfm experiment needs (empty list otherwise)."""
    s = SPECS[wc.exp]
    if s["source"]["kind"] != "gmm":
        return []
    return f"{R}/{s['data']}/points/gmm/cls_K{s['source']['components']}.safetensors"


def gmm_flag(wc, input):
    return f"--gmm {input.gmm}" if input.gmm else ""


def train_launcher(wc, resources):
    """python, or torchrun for several processes (gloo on CPU, one process per GPU on GPU nodes)."""
    procs = SPECS[wc.exp]["train"]["processes"]
    if resources.gpu > 1:
        return f"python -m torch.distributed.run --standalone --nproc_per_node {resources.gpu}"
    if procs > 1:
        return f"ACCELERATE_USE_CPU=1 python -m torch.distributed.run --standalone --nproc_per_node {procs}"
    return "python"


def report_outputs():
    datasets = sorted({d for d, _, _ in runs()})
    return [f"{R}/report/metrics.csv", f"{R}/report/summary.md", f"{R}/report/w2_vs_nfe.png",
            f"{R}/report/training_curves.png"] + [
        f"{R}/report/samples_{d}.png" for d in datasets
    ]
