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
    encoder=NAME,
    text_encoder=NAME,
    features="feature-net|inception|adm",
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
    if not datasets:
        return []
    return [f"{R}/report/metrics.csv", f"{R}/report/summary.md", f"{R}/report/w2_vs_nfe.png",
            f"{R}/report/training_curves.png"] + [
        f"{R}/report/samples_{d}.png" for d in datasets
    ]


# ---- image datasets: which artifacts the config asks for -------------------------------------------

IMAGE_KINDS = ("digits", "imagefolder")


def image_datasets():
    return {name: ds for name, ds in config["datasets"].items() if ds["kind"] in IMAGE_KINDS}


def dataset(wc):
    return config["datasets"][wc.dataset]


def encoder_spec(wc):
    """The config of encoder ``wc.encoder`` of dataset ``wc.dataset`` (a clear error if undeclared)."""
    encs = dataset(wc).get("encoders", {})
    if wc.encoder not in encs:
        raise WorkflowError(f"config: datasets.{wc.dataset}.encoders: no encoder named {wc.encoder!r}; declared: {sorted(encs)}")
    return encs[wc.encoder]


def encoder_resolution(wc):
    return encoder_spec(wc)["resolution"] or dataset(wc)["resolution"]


def gmm_spec(wc):
    """The gmm entry of dataset ``wc.dataset`` that covers (encoder, K)."""
    for g in dataset(wc).get("gmm", []):
        if g["encoder"] == wc.encoder and int(wc.K) in g["components"]:
            return g
    # toy data (encoder "points"): the MM-FM source of an experiment, fitted with the defaults
    return {"backend": "sklearn", "max_iter": 100, "tol": 1e-3, "reg_covar": 1e-6, "chunk_rows": 65536}


def latents_done(dataset_name, encoder):
    """The file that marks an encoder's latent store complete (the store is beside it)."""
    return f"{R}/{dataset_name}/{encoder}/latents.json"


def latents_store(dataset_name, encoder):
    return f"{R}/{dataset_name}/{encoder}/latents.zarr"


def check_image_datasets():
    """Cross-references the schema cannot express, as one-line errors naming the key."""
    for name, ds in image_datasets().items():
        seen = set()
        for i, g in enumerate(ds["gmm"]):
            if g["encoder"] not in ds["encoders"]:
                raise WorkflowError(f"config: datasets.{name}.gmm[{i}].encoder: unknown encoder {g['encoder']!r}; "
                                    f"declared: {sorted(ds['encoders'])}")
            for k in g["components"]:
                if (g["encoder"], k) in seen:
                    raise WorkflowError(f"config: datasets.{name}.gmm[{i}].components: K={k} for encoder "
                                        f"{g['encoder']!r} appears twice")
                seen.add((g["encoder"], k))
        for enc, spec in ds["encoders"].items():
            if spec["kind"] != "pixels" and not spec["weights"]:
                raise WorkflowError(f"config: datasets.{name}.encoders.{enc}.weights: encoder kind {spec['kind']!r} "
                                    "needs weights (a local folder or a hub id)")
        cap = ds.get("captions")
        if cap is not None and ds["kind"] != "digits" and not cap["file"]:
            raise WorkflowError(f"config: datasets.{name}.captions.file: needed for kind {ds['kind']!r} "
                                "(only digits generates captions from its labels)")
        ref = ds.get("reference", {})
        if "inception" in ref.get("features", []) and not ref.get("inception_path"):
            raise WorkflowError(f"config: datasets.{name}.reference.inception_path: needed for inception features")
        if "adm" in ref.get("features", []) and not ref.get("adm_npz"):
            raise WorkflowError(f"config: datasets.{name}.reference.adm_npz: needed for adm features")


check_image_datasets()


def artifact_outputs():
    """Every cached image artifact the config declares (rule all builds them even without experiments)."""
    out = []
    for name, ds in image_datasets().items():
        out.append(f"{R}/{name}/manifest.parquet")
        for enc in ds["encoders"]:
            out += [latents_done(name, enc), f"{R}/{name}/{enc}/latent_stats.safetensors"]
        for g in ds["gmm"]:
            for k in g["components"]:
                out.append(f"{R}/{name}/{g['encoder']}/gmm/cls_K{k}.safetensors")
                if g["spatial"]:
                    out.append(f"{R}/{name}/{g['encoder']}/gmm/spatial_K{k}.safetensors")
        if ds.get("captions") is not None:
            out += [f"{R}/{name}/captions/{te}.zarr" for te in ds["captions"]["text_encoders"]]
        out += [f"{R}/{name}/reference/{f}.npz" for f in ds.get("reference", {}).get("features", [])]
    return out


# ---- data rules --------------------------------------------------------------------------------------

def prepare_data_args(wc):
    """Source-specific flags of prepare_data (external folders are params, not inputs, so `-n` works
    on a machine without the data; the stage stops with the missing path)."""
    ds = dataset(wc)
    if ds["kind"] == "digits":
        return f"--source digits --root {R}/{wc.dataset}/images --captions {R}/{wc.dataset}/captions.jsonl"
    args = f"--source imagefolder --root {ds['root']}"
    return args + (f" --test-root {ds['test_root']}" if ds["test_root"] else "")

# ---- latents rules -----------------------------------------------------------------------------------

def extract_launcher(wc, resources):
    """python, or torchrun with one process per GPU (gloo processes on CPU); each process owns shards."""
    procs = max(encoder_spec(wc)["processes"], resources.gpu)
    if procs <= 1:
        return "python"
    cpu = "" if resources.gpu else "ACCELERATE_USE_CPU=1 "
    return f"{cpu}python -m torch.distributed.run --standalone --nproc_per_node {procs}"


def encoder_args(wc):
    e = encoder_spec(wc)
    args = f"--encoder {e['kind']} --resolution {encoder_resolution(wc)} --batch-size {e['batch_size']} "
    args += f"--shard-rows {e['shard_rows']} --workers {e['workers']} " + ("--flips" if e["flips"] else "--no-flips")
    if e["weights"]:
        args += f" --weights {e['weights']}"
    if e["pool"]:
        args += f" --pool {e['pool']}"
    return args

# ---- gmm rules ---------------------------------------------------------------------------------------

def cls_gmm_input(wc):
    if dataset(wc)["kind"] == "toy":
        return {"data": f"{R}/{wc.dataset}/toy.safetensors"}
    return {"done": latents_done(wc.dataset, wc.encoder)}


def cls_gmm_args(wc, input):
    g = gmm_spec(wc)
    src = f"--data {input.data}" if "data" in input.keys() else f"--store {latents_store(wc.dataset, wc.encoder)}"
    return (f"{src} --backend {g['backend']} --max-iter {g['max_iter']} --tol {g['tol']} "
            f"--reg-covar {g['reg_covar']} --chunk-rows {g['chunk_rows']}")


def gmm_device(wc, resources):
    return "cuda" if resources.gpu else "cpu"


def gmm_gpu(wc):
    """The CLS GMM runs where the encoder's latents were made (a GPU for K = 8192 at ImageNet scale)."""
    if dataset(wc)["kind"] == "toy":
        return 0
    return int(encoder_spec(wc)["gpu"])

# ---- captions rules ----------------------------------------------------------------------------------

def caption_spec(wc):
    cap = dataset(wc).get("captions")
    if cap is None:
        raise WorkflowError(f"config: datasets.{wc.dataset}.captions: not configured")
    return cap


def caption_file(wc):
    """Digits captions come from prepare_data (generated from the labels); others are configured files,
    passed as a param so `-n` works without them (align_captions stops with the missing path)."""
    return f"{R}/{wc.dataset}/captions.jsonl" if dataset(wc)["kind"] == "digits" else caption_spec(wc)["file"]


def text_encoder_spec(wc):
    encs = caption_spec(wc)["text_encoders"]
    if wc.text_encoder not in encs:
        raise WorkflowError(f"config: datasets.{wc.dataset}.captions.text_encoders: no text encoder named "
                            f"{wc.text_encoder!r}; declared: {sorted(encs)}")
    return encs[wc.text_encoder]

# ---- reference rules ---------------------------------------------------------------------------------

def reference_spec(wc):
    return dataset(wc).get("reference", {})


def reference_input(wc):
    if wc.features == "adm":
        return {}  # an existing ADM reference batch, passed as a param (external file)
    inputs = {"manifest": f"{R}/{wc.dataset}/manifest.parquet"}
    if wc.features == "feature-net":
        inputs["net"] = f"{R}/{wc.dataset}/feature_net/model.safetensors"
    return inputs


def reference_args(wc, input):
    ref = reference_spec(wc)
    if wc.features == "adm":
        return f"--adm-npz {ref['adm_npz']}"
    res = dataset(wc)["resolution"]
    args = f"--manifest {input.manifest} --split {ref['split']} --resolution {res} --batch-size {ref['batch_size']} "
    if wc.features == "feature-net":
        return args + f"--features feature-net --feature-net {input.net}"
    return args + f"--features inception --inception {ref['inception_path']}"
