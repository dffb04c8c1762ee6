# Helpers shared by every rule: resolved experiment specs, paths, launch commands.
import hashlib
import json
import os
import sys
from shlex import quote as shq  # paths in shell arguments: results or data folders with spaces or quotes

from snakemake.exceptions import WorkflowError

sys.path.insert(0, workflow.basedir)
from sourceflow.config import ConfigError, resolve_experiments  # noqa: E402
from sourceflow.io import write_json  # noqa: E402

from snakemake.settings.types import DeploymentMethod  # noqa: E402

from sourceflow.launch import job_shell_prefix  # noqa: E402
from sourceflow.plan import build_spatial_gmm_mem_mb  # noqa: E402  (resources by the resource plan's formulas)

# Without --sdm conda jobs run `python` from the environment running Snakemake (the project's .venv); under
# --sdm conda the activated env's python (sourceflow.launch.job_shell_prefix says why).
USE_CONDA = DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
shell.prefix(job_shell_prefix(USE_CONDA, os.path.dirname(sys.executable)))
R = config["results"]
NAME = "[A-Za-z0-9][A-Za-z0-9_.-]*"

wildcard_constraints:
    dataset=NAME,
    exp=NAME,
    seed=r"\d+",
    K=r"\d+",
    topk=r"\d+",
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


def model_run(exp):
    """The experiment whose trained model ``exp`` samples: itself, or its ``model_from``."""
    return SPECS[exp].get("model_from") or exp


def spec_file(stage):
    """Input function: the experiment's spec file for ``stage``."""
    return lambda wc: f"{R}/{SPECS[wc.exp]['data']}/runs/{wc.exp}/spec_{stage}.json"


def run_dir(dataset, exp, seed):
    return f"{R}/{dataset}/runs/{exp}/seed{seed}"


def runs():
    """(dataset, experiment, seed) of every run the config asks for."""
    return [(s["data"], name, seed) for name, s in SPECS.items() for seed in s["seeds"]]


def is_image_run(wc):
    return SPECS[wc.exp]["dataset"]["kind"] in IMAGE_KINDS


def run_data_inputs(wc):
    """What a run reads: the toy file, or the latent store (its completion report), statistics, manifest,
    caption embeddings (text conditioning) and the GMMs (mmfm)."""
    s = SPECS[wc.exp]
    d = s["data"]
    if not is_image_run(wc):
        inputs = {"data": f"{R}/{d}/toy.safetensors"}
        if s["source"]["kind"] == "gmm":
            inputs["gmm"] = f"{R}/{d}/points/gmm/cls_K{s['source']['components']}.safetensors"
        return inputs
    enc = s["encoder"]
    inputs = {"latents": latents_done(d, enc), "stats": f"{R}/{d}/{enc}/latent_stats.safetensors",
              "manifest": f"{R}/{d}/manifest.parquet"}
    if s["conditioning"] == "text":
        inputs["captions"] = f"{R}/{d}/captions/{s['text_encoder']}.zarr"
    if s["source"]["kind"] == "gmm":
        k = s["source"]["components"]
        inputs["gmm"] = f"{R}/{d}/{enc}/gmm/cls_K{k}.safetensors"
        inputs["source_gmm"] = f"{R}/{d}/{enc}/gmm/spatial_K{k}.safetensors"
        topk = s["coupling"].get("posterior_topk", 0) if s["coupling"]["kind"] == "mode" else 0
        if topk:
            inputs["posteriors"] = f"{R}/{d}/{enc}/gmm/cls_K{k}_top{topk}_posteriors.safetensors"
    return inputs


def run_data_args(wc, input):
    """The data flags of train / sample for ``run_data_inputs``."""
    keys = input.keys()
    if "data" in keys:
        args = f"--data {shq(input.data)}"
    else:
        s = SPECS[wc.exp]
        args = (f"--latents {shq(latents_store(s['data'], s['encoder']))} --stats {shq(input.stats)} "
                f"--manifest {shq(input.manifest)}")
        if "captions" in keys:
            args += f" --captions {shq(input.captions)}"
    if "gmm" in keys:
        args += f" --gmm {shq(input.gmm)}"
    if "source_gmm" in keys:
        args += f" --source-gmm {shq(input.source_gmm)}"
    if "posteriors" in keys:
        args += f" --posteriors {shq(input.posteriors)}"
    return args


def reflow_base(wc):
    """The base experiment of a reflow experiment (None for others)."""
    rf = SPECS[wc.exp].get("reflow")
    return None if rf is None else rf["experiment"]


def reflow_pairs_file(dataset_name, exp, seed):
    return f"{run_dir(dataset_name, exp, seed)}/reflow_pairs.safetensors"


def reflow_train_inputs(wc):
    """A reflow run trains on its pairs, starting from its base run's weights (same seed)."""
    base = reflow_base(wc)
    if base is None:
        return {}
    return {"pairs": reflow_pairs_file(wc.dataset, wc.exp, wc.seed),
            "init_from": f"{run_dir(wc.dataset, base, wc.seed)}/model.safetensors"}


def reflow_train_args(wc, input):
    keys = input.keys()
    return f"--pairs {shq(input.pairs)} --init-from {shq(input.init_from)}" if "pairs" in keys else ""


def reflow_pairs_inputs(wc):
    base = reflow_base(wc)
    if base is None:
        raise WorkflowError(f"experiment {wc.exp!r} has no reflow section")
    return {**run_data_inputs(wc), "spec": spec_file("train")(wc),
            "base_spec": f"{R}/{SPECS[base]['data']}/runs/{base}/spec_train.json",
            "model": f"{run_dir(wc.dataset, base, wc.seed)}/model.safetensors"}


def sample_inputs(wc):
    """A run's data, its model and (autoguidance) the guide run's model and training spec."""
    inputs = {**run_data_inputs(wc), "spec": spec_file("sample")(wc),
              "model": f"{run_dir(wc.dataset, model_run(wc.exp), wc.seed)}/model.safetensors"}
    guide = SPECS[wc.exp]["sample"].get("autoguidance")
    if guide is not None:
        g = model_run(guide["experiment"])
        inputs["guide_model"] = f"{run_dir(SPECS[g]['data'], g, wc.seed)}/model.safetensors"
        inputs["guide_spec"] = f"{R}/{SPECS[g]['data']}/runs/{g}/spec_train.json"
    return inputs


def guide_args(wc, input):
    keys = input.keys()
    return f"--guide-model {shq(input.guide_model)} --guide-spec {shq(input.guide_spec)}" if "guide_model" in keys else ""


def evaluate_inputs(wc):
    """Toy runs: the data (held-out points); image runs: the reference statistics and the feature network."""
    s = SPECS[wc.exp]
    d = s["data"]
    inputs = {"spec": spec_file("evaluate")(wc),
              "samples": f"{run_dir(wc.dataset, wc.exp, wc.seed)}/samples/index.json",
              "summary": f"{run_dir(wc.dataset, model_run(wc.exp), wc.seed)}/train_summary.json"}
    if not is_image_run(wc):
        inputs["data"] = f"{R}/{d}/toy.safetensors"
        return inputs
    ev = s["evaluate"]
    inputs["reference"] = f"{R}/{d}/reference/{ev['features']}.npz"
    if ev["features"] == "feature-net" or ev["classifier"]:
        inputs["feature_net"] = f"{R}/{d}/feature_net/model.safetensors"
    return inputs


def evaluate_args(wc, input):
    keys = input.keys()
    if "data" in keys:
        return f"--data {shq(input.data)}"
    args = f"--reference {shq(input.reference)}"
    if "feature_net" in keys:
        args += f" --feature-net {shq(input.feature_net)}"
    if SPECS[wc.exp]["evaluate"]["features"] in ("inception", "adm"):
        ref = config["datasets"][SPECS[wc.exp]["data"]].get("reference", {})
        if not ref.get("inception_path"):
            raise WorkflowError(f"config: datasets.{SPECS[wc.exp]['data']}.reference.inception_path: needed for FID "
                                f"of experiment {wc.exp}")
        args += f" --inception {shq(ref['inception_path'])}"
    return args


def run_gpu(stage):
    """Resource function: GPUs of a run's ``stage`` job (train: train.gpus, one process per GPU; sample:
    sample.gpus, by default train.gpus; evaluate: one GPU when the experiment trains on GPUs)."""

    def gpu(wc):
        n = SPECS[wc.exp]["train"]["gpus"]
        if stage == "sample":
            return n if SPECS[wc.exp]["sample"]["gpus"] is None else SPECS[wc.exp]["sample"]["gpus"]
        return n if stage == "train" else min(n, 1)

    return gpu


def one_node(exp, resources, key="train.gpus"):
    """Refuse multi-node training with one line naming the key: a training job is one torchrun --standalone
    on one node, so nodes > 1, or more train.gpus than a node has (resource gpus_per_node, set in
    profiles/slurm), would not run."""
    nodes = resources.get("nodes", 1)
    if nodes > 1:
        raise WorkflowError(f"train of {exp}: resource nodes={nodes}, but multi-node training is not supported "
                            "(one torchrun --standalone per job): set nodes=1")
    per_node = resources.get("gpus_per_node", 0)
    if per_node and resources.gpu > per_node:
        raise WorkflowError(f"experiment {exp}: {key} = {resources.gpu} is more than the {per_node} GPUs of one "
                            "node (gpus_per_node in profiles/slurm); multi-node training is not supported")


def train_launcher(wc, resources):
    """python, or torchrun for several processes (gloo on CPU, one process per GPU on GPU nodes); one node."""
    one_node(wc.exp, resources)
    procs = SPECS[wc.exp]["train"]["processes"]
    return launcher(resources.gpu, procs)


def sample_launcher(wc, resources):
    """python, or torchrun with one process per GPU of the sample job (sample.gpus); one node."""
    one_node(wc.exp, resources, "sample.gpus")
    return launcher(resources.gpu, 1)


def launcher(gpus, procs):
    """python; torchrun --standalone over ``gpus`` GPUs; or over ``procs`` CPU processes (gloo)."""
    if gpus > 1:
        return f"python -m torch.distributed.run --standalone --nproc_per_node {gpus}"
    if procs > 1:
        return f"ACCELERATE_USE_CPU=1 python -m torch.distributed.run --standalone --nproc_per_node {procs}"
    return "python"


def run_datasets(image):
    """Datasets with runs: the image ones (``image=True``) or the toy ones."""
    return sorted({d for d, e, _ in runs() if (SPECS[e]["dataset"]["kind"] in IMAGE_KINDS) == image})


def fd_reference(d):
    """The reference statistics the report's FD floor comes from: the one most of a dataset's runs use."""
    feats = [s["evaluate"]["features"] for s in SPECS.values() if s["data"] == d]
    return f"{R}/{d}/reference/{max(sorted(set(feats)), key=feats.count)}.npz"


def report_file(name, caption, category):
    """A report/ output with its caption (workflow/report/*.rst) for `snakemake --report`."""
    return report(f"{R}/report/{name}", caption=f"../report/{caption}", category=category)


def report_outputs():
    toy, image = run_datasets(False), run_datasets(True)
    if not toy and not image:
        return []
    out = [f"{R}/report/metrics.csv", f"{R}/report/summary.md", f"{R}/report/training_curves.png"]
    out += [f"{R}/report/w2_vs_nfe.png"] if toy else []
    out += [f"{R}/report/fd_vs_nfe.png"] if image else []
    return out + [f"{R}/report/samples_{d}.png" for d in toy + image]


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


def preflight():
    """Every external input the config names, checked when the workflow is parsed: all missing ones listed
    at once with their config keys, as a warning (so `snakemake -n` shows it); a real run then stops in
    `onstart` (Snakefile) before any job."""
    from snakemake.logging import logger

    from sourceflow.config import missing_external_inputs

    missing = missing_external_inputs(config)
    if missing:
        logger.warning(f"{len(missing)} external input(s) missing:\n  " + "\n  ".join(missing))
    return missing


MISSING_INPUTS = preflight()


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
        return f"--source digits --root {shq(f'{R}/{wc.dataset}/images')} --captions {shq(f'{R}/{wc.dataset}/captions.jsonl')}"
    args = f"--source imagefolder --root {shq(ds['root'])}"
    return args + (f" --test-root {shq(ds['test_root'])}" if ds["test_root"] else "")

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
    if e["dtype"] != "float32":  # only when set, so stores made before the key existed are not rerun
        args += f" --dtype {e['dtype']}"
    if e["weights"]:
        args += f" --weights {shq(e['weights'])}"
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
    src = f"--data {shq(input.data)}" if "data" in input.keys() else f"--store {shq(latents_store(wc.dataset, wc.encoder))}"
    return (f"{src} --backend {g['backend']} --max-iter {g['max_iter']} --tol {g['tol']} "
            f"--reg-covar {g['reg_covar']} --chunk-rows {g['chunk_rows']} --init {g.get('init', 'k-means++')}"
            + (" --reuse-bounds" if g.get("reuse_bounds") else ""))


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
        return f"--adm-npz {shq(ref['adm_npz'])}"
    res = dataset(wc)["resolution"]
    args = f"--manifest {shq(input.manifest)} --split {ref['split']} --resolution {res} --batch-size {ref['batch_size']} "
    ds = dataset(wc)
    if ref["split"] == "train" and (ds.get("test_root") or ds.get("test_fraction", 0) > 0):
        args += "--holdout-split test "
    if wc.features == "feature-net":
        return args + f"--features feature-net --feature-net {shq(input.net)}"
    return args + f"--features inception --inception {shq(ref['inception_path'])}"


_PLANNER = []


def train_mem_mb(wc, input):
    """train's memory: the resource plan's host memory of the run (sourceflow.plan.train_mem_mb: the processes,
    the data, the GMMs, the checkpoint; a fixed 4000 MB for CPU-only runs). A dataset whose size the config
    does not tell is counted from prepare_data's manifest.json: before it exists the FileNotFoundError on the
    manifest input makes Snakemake evaluate this again once the job is ready (a dry run shows <TBD>)."""
    import errno

    from sourceflow.plan import UnknownDatasetSize, resource_planner

    if not _PLANNER:  # one per workflow: parameter counts and dataset sizes are computed once
        _PLANNER.append(resource_planner(config))
    try:
        return _PLANNER[0].train_mem_mb(wc.exp)
    except UnknownDatasetSize as e:  # no manifest.json yet
        raise FileNotFoundError(errno.ENOENT, str(e), input.get("manifest", "")) from None


def latent_stats_subset(wc):
    """The stage's --images/--seed for an encoder's stats_images subset ("" = all rows)."""
    spec = encoder_spec(wc)
    return "" if spec["stats_images"] is None else f"--images {spec['stats_images']} --seed {spec['stats_seed']} "


def latent_stats_mem_mb(wc, input):
    """latent_stats' memory from its settings and the store's row shape (latents.json), by the resource
    plan's formula (sourceflow.plan.latent_stats_mem_mb). Before extraction latents.json does not exist: the
    FileNotFoundError makes Snakemake evaluate this again once the job is ready (a dry run shows <TBD>)."""
    from sourceflow.plan import latent_stats_mem_mb as formula

    with open(input.done) as f:
        shape = json.load(f)["spatial_shape"]
    return formula(shape, encoder_spec(wc)["stats_batch_rows"])
