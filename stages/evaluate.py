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
  python stages/evaluate.py --spec results/moons/runs/fm/spec_evaluate.json --data results/moons/toy.safetensors \\
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

    from concurrent.futures import ThreadPoolExecutor

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
    ref_cond = test.condition(spec["conditioning"])
    summary = read_json(a.train_summary)
    tags = sorted(read_json(Path(a.samples) / "index.json"))
    # Gather every exact-W2 problem first, then solve them on --threads workers (POT's network
    # simplex releases the GIL, so threads run in parallel).
    records, tasks = {}, {}
    for tag in tags:
        info = read_json(Path(a.samples) / tag / "info.json")
        with np.load(Path(a.samples) / tag / "samples.npz") as z:
            s = {k: z[k] for k in z.files}
        if not np.isfinite(s["x"]).all():
            raise ValueError(f"{a.samples}/{tag}: samples contain NaN or inf")
        n = min(m, len(s["x"]), len(ref_x))
        records[tag] = {"dataset": spec["data"], "experiment": spec["name"], "method": spec["method"],
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
