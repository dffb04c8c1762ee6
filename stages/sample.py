"""sample: draw samples from a trained run over a solver × steps sweep.

For every entry of spec.sample.solvers (e.g. euler with steps [1, 2, 4, 8], dopri5) writes
OUT/{solver}-{steps}/samples.npz (or OUT/dopri5/…) with `x` (samples), `x0` (source draws),
`cond` (the data condition each sample was conditioned on, taken from the test split), `mode` (GMM
mode, MM-FM), `energy` (∫‖v‖²dt per trajectory) and `displacement` (‖x1 − x0‖²), plus info.json with the solver,
steps, true NFE and time; OUT/index.json lists them all once the sweep is complete. Entries already written for the same model are skipped (resumable).

Example:
  python stages/sample.py --spec results/moons/runs/fm/spec_sample.json --data results/moons/toy.safetensors \\
      --model results/moons/runs/fm/seed0/model.safetensors --out results/moons/runs/fm/seed0/samples
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sourceflow import cli  # noqa: E402


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--spec", required=True, help="resolved experiment spec: a JSON file or JSON text")
    p.add_argument("--data", required=True, help="toy data .safetensors (test-split conditions are used)")
    p.add_argument("--gmm", default=None, help="CLS GMM .safetensors (mmfm only)")
    p.add_argument("--model", required=True, help="model.safetensors written by the train stage")
    p.add_argument("--out", required=True, help="samples directory")
    cli.add_common(p)
    a = p.parse_args()
    cli.set_threads(a.threads)

    import hashlib

    import numpy as np
    import torch

    from sourceflow.build import build_method, build_model, cond_spec, load_points
    from sourceflow.config import load_spec, sweep_tags
    from sourceflow.io import atomic_path, read_json, write_json
    from sourceflow.sampling import generate
    from sourceflow.train.checkpoint import load_trained

    spec = load_spec(a.spec)
    s = spec["sample"]
    train_data = load_points(a.data, "train")
    test = load_points(a.data, "test")
    model = build_model(spec, train_data)
    method = build_method(spec, train_data, a.seed, a.gmm)
    load_trained(a.model, model, method)
    model_id = hashlib.sha256(Path(a.model).read_bytes()).hexdigest()[:16]
    n = s["num_samples"]
    reps = -(-n // len(test))
    cond_all = test.condition(spec["conditioning"])
    cond = None if cond_all is None else cond_all.repeat(reps, *([1] * (cond_all.dim() - 1)))[:n]
    cs = cond_spec(spec, train_data)
    index = {}
    for i, (tag, solver, steps) in enumerate(sweep_tags(s)):
        d = Path(a.out) / tag
        info_path = d / "info.json"
        if info_path.exists() and (d / "samples.npz").exists() and read_json(info_path).get("model_id") == model_id:
            print(f"{tag}: already sampled, skipping")
            index[tag] = read_json(info_path)
            continue
        g = torch.Generator().manual_seed(a.seed * 1000 + i)
        res = generate(model, method, n, cond, solver, steps, g, batch_size=s["batch_size"], shift=s["shift"],
                       rtol=s["rtol"], atol=s["atol"], guidance_scale=s["guidance_scale"],
                       null_id=cs.null_id if cs.kind == "discrete" else None, traj_points=s["traj_points"])
        arrays = {"x": res.x, "x0": res.x0, "energy": res.energy, "displacement": res.displacement}
        if cond is not None:
            arrays["cond"] = cond.numpy()
        if res.mode is not None:
            arrays["mode"] = res.mode
        with atomic_path(d / "samples.npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
        info = {"solver": solver, "steps": steps, "nfe": res.nfe, "seconds": round(res.seconds, 3),
                "num_samples": n, "model_id": model_id, "seed": a.seed}
        write_json(info_path, info)
        index[tag] = info
        print(f"{tag}: {n} samples, NFE {res.nfe}, {res.seconds:.2f} s")
    write_json(Path(a.out) / "index.json", index)  # last: marks the sweep complete


if __name__ == "__main__":
    cli.run(main)
