# Helpers shared by every rule: resolved experiment specs, paths, launch commands.
import json
import sys

from snakemake.exceptions import WorkflowError

sys.path.insert(0, workflow.basedir)
from sourceflow.config import ConfigError, resolve_experiments, sweep_tags  # noqa: E402

PY = sys.executable  # the interpreter running Snakemake (the project's .venv)
R = config["results"]
NAME = "[A-Za-z0-9][A-Za-z0-9_.-]*"

wildcard_constraints:
    dataset=NAME,
    exp=NAME,
    seed=r"\d+",
    K=r"\d+",

try:
    SPECS = resolve_experiments(config)
except ConfigError as e:
    raise WorkflowError(str(e)) from None


def spec(wc):
    return SPECS[wc.exp]


def spec_for(stage):
    """The part of an experiment's spec a stage depends on, as JSON (a Snakemake param, so that
    changing a sampling setting reruns sample/evaluate but not train)."""
    drop = {"train": ("sample", "evaluate", "seeds"), "sample": ("evaluate", "seeds"), "evaluate": ("seeds",)}[stage]

    def fn(wc):
        s = {k: v for k, v in SPECS[wc.exp].items() if k not in drop}
        return json.dumps(s, sort_keys=True)

    return fn


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
        return f"{PY} -m torch.distributed.run --standalone --nproc_per_node {resources.gpu}"
    if procs > 1:
        return f"ACCELERATE_USE_CPU=1 {PY} -m torch.distributed.run --standalone --nproc_per_node {procs}"
    return PY


def report_outputs():
    datasets = sorted({d for d, _, _ in runs()})
    return [f"{R}/report/metrics.csv", f"{R}/report/summary.md", f"{R}/report/w2_vs_nfe.png"] + [
        f"{R}/report/samples_{d}.png" for d in datasets
    ]
