"""evaluate: metrics of every sampled solver × steps of one run.

For each sweep entry listed in SAMPLES/index.json, writes OUT/{tag}.json with
  - W2² and W2 between the samples and the held-out test points (exact EMD with POT emd2 on the
    first evaluate.num_points of each; only at evaluate.w2_entries when that is set),
  - per-condition W2² for conditional runs (per class, or per quantile bin of a continuous
    condition, and their mean) at evaluate.per_condition_entries,
  - the normalised path energy of the sampling trajectories (straightness; 0 = straight),
  - the true NFE and the training coupling's mean cost ‖x0 − x1‖².
OUT/all.json holds every entry's record.

Example:
  python stages/evaluate.py --spec spec.json --data results/moons/toy.safetensors \\
      --samples results/moons/runs/fm/seed0/samples --train-summary results/moons/runs/fm/seed0/train_summary.json \\
      --out results/moons/runs/fm/seed0/metrics
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sourceflow import cli  # noqa: E402


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--spec", required=True, help="resolved experiment spec: a JSON file or JSON text")
    p.add_argument("--data", required=True, help="toy data .safetensors (the test split is the reference)")
    p.add_argument("--samples", required=True, help="samples directory written by the sample stage")
    p.add_argument("--train-summary", required=True, help="train_summary.json of the run")
    p.add_argument("--out", required=True, help="metrics directory")
    cli.add_common(p)
    a = p.parse_args()

    import numpy as np

    from sourceflow.build import load_points
    from sourceflow.config import load_spec
    from sourceflow.io import read_json, write_json
    from sourceflow.metrics.paths import normalized_path_energy
    from sourceflow.metrics.wasserstein import condition_groups, w2_squared

    spec = load_spec(a.spec)
    test = load_points(a.data, "test")
    ev = spec["evaluate"]
    m = ev["num_points"]
    ref_x = test.x.numpy()
    summary = read_json(a.train_summary)
    tags = sorted(read_json(Path(a.samples) / "index.json"))
    records = []
    for tag in tags:
        info = read_json(Path(a.samples) / tag / "info.json")
        with np.load(Path(a.samples) / tag / "samples.npz") as z:
            s = {k: z[k] for k in z.files}
        if not np.isfinite(s["x"]).all():
            raise ValueError(f"{a.samples}/{tag}: samples contain NaN or inf")
        n = min(m, len(s["x"]), len(ref_x))
        metrics = {"path_energy": normalized_path_energy(s["energy"], s["displacement"]), "nfe": info["nfe"],
                   "coupling_cost": summary["coupling_cost"]}
        if ev["w2_entries"] is None or tag in ev["w2_entries"]:
            w2sq = w2_squared(s["x"][:n], ref_x[:n])
            metrics.update({"w2sq": w2sq, "w2": float(np.sqrt(w2sq)), "eval_points": n})
        if "cond" in s and tag in ev["per_condition_entries"]:
            ref_cond = test.condition(spec["conditioning"]).numpy()
            per = {}
            for name, ms, mr in condition_groups(s["cond"][:n], ref_cond[:n], ev["condition_bins"]):
                if ms.sum() and mr.sum():
                    per[name] = w2_squared(s["x"][:n][ms], ref_x[:n][mr])
            metrics.update({f"w2sq_cond[{k}]": v for k, v in per.items()})
            metrics["w2sq_cond_mean"] = float(np.mean(list(per.values())))
        record = {"dataset": spec["data"], "experiment": spec["name"], "method": spec["method"],
                  "solver": info["solver"], "steps": info["steps"], "nfe": info["nfe"], "seed": a.seed,
                  "metrics": metrics}
        write_json(Path(a.out) / f"{tag}.json", record)
        records.append(record)
        w2txt = f"W2² {metrics['w2sq']:.4f}" if "w2sq" in metrics else "W2² not requested"
        print(f"{tag}: {w2txt}  path energy {metrics['path_energy']:.4f}  NFE {info['nfe']}")
    write_json(Path(a.out) / "all.json", records)


if __name__ == "__main__":
    cli.run(main)
