"""evaluate: metrics of every sampled solver × steps of one run.

For each sweep entry listed in SAMPLES/index.json, writes OUT/{tag}.json; OUT/all.json holds every
entry's record. Each record names its run: dataset, experiment, method, the combination (source,
coupling and conditioning kinds) and reflow_from (a reflow experiment's base; empty otherwise).

Toy points (--data), with
  - W2² and W2 between the samples and the held-out test points (exact EMD with POT emd2 on the
    first evaluate.num_points of each; only at evaluate.w2_entries when that is set),
  - per-condition W2² for conditional runs (per class, or per quantile bin of a continuous
    condition, and their mean) at evaluate.per_condition_entries,
  - the normalised path energy of the sampling trajectories (straightness; 0 = straight),
  - the true NFE and the training coupling's mean cost ‖x0 − x1‖².

Images (--reference NPZ with --feature-net or --inception), per entry of at least evaluate.min_samples
samples:
  - fd: the Fréchet distance of the samples' features to the reference statistics (FID with Inception;
    the feature network's penultimate features for digits). evaluate.features picks the features:
    inception = clean-fid "clean" mode (PIL bicubic resize to 299 outside the network); adm = clean-fid
    "legacy_tensorflow" mode (the uint8 images as float in [0, 255], resized inside the network as ADM's
    TensorFlow evaluator does: the only mode comparable with published FIDs against ADM reference batches);
    each record names them under "features" (name, preprocessing),
  - precision, recall, density, coverage on k-NN manifolds (k = evaluate.prdc_k) against the
    reference's feature rows (when the reference npz holds them),
  - class coverage from the feature network's predicted classes against the data's label histogram:
    class_kl = KL(p_data ‖ p_gen), class_tv, classes_missing (evaluate.classifier),
and for every entry the normalised path energy, the NFE and the training coupling's mean cost.

Examples:
  python stages/evaluate.py --spec results/moons/runs/fm/spec_evaluate.json --data results/moons/toy.safetensors \\
      --samples results/moons/runs/fm/seed0/samples --train-summary results/moons/runs/fm/seed0/train_summary.json \\
      --out results/moons/runs/fm/seed0/metrics
  python stages/evaluate.py --spec results/digits/runs/fm/spec_evaluate.json \\
      --reference results/digits/reference/feature-net.npz --feature-net results/digits/feature_net/model.safetensors \\
      --samples results/digits/runs/fm/seed0/samples --train-summary results/digits/runs/fm/seed0/train_summary.json \\
      --out results/digits/runs/fm/seed0/metrics
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sourceflow import cli  # noqa: E402


def record_identity(spec: dict) -> dict:
    """What every metrics record says about its run: dataset, experiment, method label, the combination
    (source, coupling and conditioning kinds) and ``reflow_from`` (the base of a reflow experiment, else "")."""
    from sourceflow.config import combination

    keys = ("source", "coupling", "conditioning")
    combo = combination(spec) if all(k in spec for k in keys) else dict.fromkeys(keys, "")  # partial specs (tests)
    return {"dataset": spec["data"], "experiment": spec["name"], "method": spec["method"], **combo,
            "reflow_from": (spec.get("reflow") or {}).get("experiment", "")}



def image_mode(a) -> None:
    import numpy as np
    import torch

    from sourceflow.config import load_spec
    from sourceflow.io import read_json, write_json
    from sourceflow.metrics.features import extract_features, load_feature_extractor
    from sourceflow.metrics.frechet import FeatureStats, frechet_distance, read_reference_npz
    from sourceflow.metrics.paths import normalized_path_energy
    from sourceflow.metrics.prdc import class_coverage, label_histogram, prdc
    from sourceflow.sampling import open_sample_store

    spec = load_spec(a.spec)
    ev = spec["evaluate"]
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ref = read_reference_npz(a.reference, keys=("features", "label_hist", "preprocessing"))  # not an ADM arr_0
    kind = ev["features"]  # inception (clean-fid "clean"), adm (clean-fid legacy_tensorflow) or feature-net
    flag = "feature-net" if kind == "feature-net" else "inception"
    path = a.feature_net if kind == "feature-net" else a.inception
    if path is None:
        raise ValueError(f"evaluate.features {kind!r} needs --{flag}")
    extractor = load_feature_extractor(kind, path, device)
    if extractor.dim != ref["mu"].shape[0]:
        raise ValueError(f"{a.reference}: {ref['mu'].shape[0]}-d statistics, but the {kind} features are "
                         f"{extractor.dim}-d (reference and features disagree)")
    if "preprocessing" in ref and str(ref["preprocessing"]) != extractor.preprocessing:
        raise ValueError(f"{a.reference}: statistics of {str(ref['preprocessing'])!r} features, but evaluate.features "
                         f"{kind!r} preprocesses {extractor.preprocessing!r} (FDs would not be comparable)")
    print(f"FD features: {kind} (preprocessing {extractor.preprocessing}) against {a.reference}")
    classifier = None
    if ev["classifier"]:
        if a.feature_net is None:
            raise ValueError("evaluate.classifier needs --feature-net (class coverage uses its predictions)")
        classifier = extractor if kind == "feature-net" else load_feature_extractor("feature-net", a.feature_net, device)
        if "label_hist" not in ref:
            raise ValueError(f"{a.reference}: no label_hist (the data's class histogram) for class coverage")
    summary = read_json(a.train_summary)
    records = {}
    for tag in sorted(read_json(Path(a.samples) / "index.json")):
        d = Path(a.samples) / tag
        info = read_json(d / "info.json")
        z = open_sample_store(d / "samples.zarr")
        mt = {"path_energy": normalized_path_energy(np.asarray(z["energy"][:]), np.asarray(z["displacement"][:])),
              "nfe": info["nfe"], "coupling_cost": summary["coupling_cost"], "num_samples": info["num_samples"]}
        if info["num_samples"] >= ev["min_samples"]:
            images = z["images"]  # the complete sample store, read a batch at a time (the npz holds the same bytes)
            feats = extract_features(extractor, images, ev["batch_size"])
            st = FeatureStats(extractor.dim)
            st.update(feats.features)
            mt["fd"] = frechet_distance(st.mu, st.sigma, ref["mu"], ref["sigma"])
            if "features" in ref:
                mt.update({k: v for k, v in prdc(ref["features"], feats.features, k=ev["prdc_k"], device=device)
                           .as_dict().items() if k in ("precision", "recall", "density", "coverage")})
            if classifier is not None:
                pred = feats.labels if classifier is extractor else extract_features(classifier, images, ev["batch_size"]).labels
                cov = class_coverage(ref["label_hist"], label_histogram(pred, len(ref["label_hist"])))
                mt.update({"class_kl": cov["kl"], "class_tv": cov["tv"], "classes_missing": cov["classes_missing"]})
        records[tag] = {**record_identity(spec),
                        "solver": info["solver"], "steps": info["steps"], "nfe": info["nfe"], "seed": a.seed,
                        "features": {"name": extractor.name, "preprocessing": extractor.preprocessing},
                        "metrics": mt}
        write_json(Path(a.out) / f"{tag}.json", records[tag])
        fd = f"FD {mt['fd']:.3f}" if "fd" in mt else f"no FD ({info['num_samples']} samples)"
        print(f"{tag}: {fd}  path energy {mt['path_energy']:.4f}  NFE {info['nfe']}")
    write_json(Path(a.out) / "all.json", list(records.values()))


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--spec", required=True, help="resolved experiment spec: a JSON file or JSON text")
    p.add_argument("--data", default=None, help="toy data .safetensors (the test split is the reference)")
    p.add_argument("--reference", default=None, help="images: reference statistics npz (reference_stats; ADM keys)")
    p.add_argument("--feature-net", default=None,
                   help="images: feature network (train_feature_net) for FD features and/or class coverage")
    p.add_argument("--inception", default=None,
                   help="images: clean-fid's inception-2015-12-05.pt for FID features (evaluate.features inception or adm)")
    p.add_argument("--device", default=None, help="torch device for the features (unset: cuda if available, else cpu)")
    p.add_argument("--samples", required=True, help="samples directory written by the sample stage")
    p.add_argument("--train-summary", required=True, help="train_summary.json of the run")
    p.add_argument("--out", required=True, help="metrics directory")
    cli.add_common(p)
    a = p.parse_args()
    cli.set_threads(a.threads)
    if (a.data is None) == (a.reference is None):
        raise ValueError("give either --data (toy points) or --reference (images)")
    if a.reference is not None:
        image_mode(a)
        return

    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from sourceflow.build import load_points
    from sourceflow.config import load_spec
    from sourceflow.io import read_json, reading, write_json
    from sourceflow.metrics.paths import normalized_path_energy
    from sourceflow.metrics.wasserstein import condition_groups, w2_squared

    spec = load_spec(a.spec)
    test = load_points(a.data, "test")
    ev = spec["evaluate"]
    m = ev["num_points"]
    ref_x = test.x.numpy()
    ref_cond = test.condition(spec["conditioning"])
    summary = read_json(a.train_summary)
    tags = sorted(read_json(Path(a.samples) / "index.json"))
    # Gather every exact-W2 problem first, then solve them on --threads workers (POT's network
    # simplex releases the GIL, so threads run in parallel).
    records, tasks = {}, {}
    for tag in tags:
        info = read_json(Path(a.samples) / tag / "info.json")
        npz = Path(a.samples) / tag / "samples.npz"
        with reading(npz, "sample file", "delete it and rerun the sample stage"), np.load(npz) as z:
            s = {k: z[k] for k in z.files}
        if not np.isfinite(s["x"]).all():
            raise ValueError(f"{a.samples}/{tag}: samples contain NaN or inf")
        n = min(m, len(s["x"]), len(ref_x))
        records[tag] = {**record_identity(spec),
                        "solver": info["solver"], "steps": info["steps"], "nfe": info["nfe"], "seed": a.seed,
                        "metrics": {"path_energy": normalized_path_energy(s["energy"], s["displacement"]),
                                    "nfe": info["nfe"], "coupling_cost": summary["coupling_cost"]}}
        if ev["w2_entries"] is None or tag in ev["w2_entries"]:
            records[tag]["metrics"]["eval_points"] = n
            tasks[(tag, "w2sq")] = (s["x"][:n], ref_x[:n])
        if "cond" in s and tag in ev["per_condition_entries"]:
            for name, ms, mr in condition_groups(s["cond"][:n], ref_cond[:n].numpy(), ev["condition_bins"]):
                if ms.sum() and mr.sum():
                    tasks[(tag, f"w2sq_cond[{name}]")] = (s["x"][:n][ms], ref_x[:n][mr])
    with ThreadPoolExecutor(max_workers=max(1, a.threads)) as pool:
        values = dict(zip(tasks, pool.map(lambda pq: w2_squared(*pq), tasks.values()), strict=True))
    for (tag, metric), value in values.items():
        records[tag]["metrics"][metric] = value
    for tag, rec in records.items():
        mt = rec["metrics"]
        if "w2sq" in mt:
            mt["w2"] = float(np.sqrt(mt["w2sq"]))
        per = [v for k, v in mt.items() if k.startswith("w2sq_cond[")]
        if per:
            mt["w2sq_cond_mean"] = float(np.mean(per))
        write_json(Path(a.out) / f"{tag}.json", rec)
        w2txt = f"W2² {mt['w2sq']:.4f}" if "w2sq" in mt else "W2² not requested"
        print(f"{tag}: {w2txt}  path energy {mt['path_energy']:.4f}  NFE {rec['nfe']}")
    write_json(Path(a.out) / "all.json", list(records.values()))


if __name__ == "__main__":
    cli.run(main)
