"""reflow_pairs: generate the (x0, x1) pairs a reflow experiment trains on, from its base experiment.

Loads the base run's trained model (EMA weights and method state: a GMM or learned source), draws
`reflow.num_pairs` source samples with the conditions of a seeded shuffle of the training rows, and
integrates the base flow with `reflow.solver` (default dopri5; the base's shift, t_end and tolerances).
Writes OUT (safetensors): `x0`, `x1`, `cond` (the condition each pair was generated with, if the
experiment is conditional), `mode` (the GMM mode of x0, mixture sources), with the base model's hash,
the solver and its NFE as metadata. The train stage then trains the reflow experiment on exactly these
pairs (`--pairs`), starting from the base weights (`--init-from`).

Example:
  python stages/reflow_pairs.py --spec results/moons/runs/fm-reflow/spec_train.json \\
      --base-spec results/moons/runs/fm/spec_train.json --model results/moons/runs/fm/seed0/model.safetensors \\
      --data results/moons/toy.safetensors --out results/moons/runs/fm-reflow/seed0/reflow_pairs.safetensors --seed 0
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sourceflow import build, cli  # noqa: E402


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--spec", required=True, help="the reflow experiment's spec (its `reflow` section: pairs, solver)")
    p.add_argument("--base-spec", required=True, help="the base experiment's spec_train.json")
    p.add_argument("--model", required=True, help="the base run's model.safetensors")
    p.add_argument("--gmm", default=None, help="CLS GMM .safetensors (mixture sources on toy points; mode coupling)")
    p.add_argument("--source-gmm", default=None, help="spatial GMM .safetensors (mixture sources on images)")
    p.add_argument("--out", required=True, help="output pairs .safetensors")
    build.add_data_args(p, "train (conditions)")
    cli.add_common(p)
    a = p.parse_args()
    cli.set_threads(a.threads)

    import torch

    from sourceflow.config import load_spec
    from sourceflow.reflow import generate_pairs
    from sourceflow.train.checkpoint import load_trained

    spec, base = load_spec(a.spec), load_spec(a.base_spec)
    rf = spec.get("reflow")
    if rf is None:
        raise ValueError(f"--spec {a.spec}: not a reflow experiment (no `reflow` section)")
    if rf["experiment"] != base["name"]:
        raise ValueError(f"--base-spec is {base['name']!r}, the reflow experiment names {rf['experiment']!r}")
    data = build.load_data(a, base, "train")
    model = build.build_model(base, data)
    method = build.build_method(base, data, a.seed, a.gmm, a.source_gmm)
    load_trained(a.model, model, method)
    n = int(rf.get("num_pairs", 20000))
    pairs = generate_pairs(model, method, data, base["conditioning"], n, rf.get("solver", "dopri5"), rf.get("steps"),
                           a.seed, int(rf.get("batch_size", 5000)), base.get("sample"))
    if not (torch.isfinite(pairs.x1).all() and torch.isfinite(pairs.x0).all()):
        raise FloatingPointError(f"{a.model}: the base flow produced non-finite samples; no pairs written")
    import hashlib

    meta = {"base": base["name"], "base_model_sha256": hashlib.sha256(Path(a.model).read_bytes()).hexdigest()[:16],
            "solver": rf.get("solver", "dopri5"), "nfe": str(pairs.nfe), "seed": str(a.seed)}
    build.save_reflow_pairs(a.out, pairs.x0, pairs.x1, pairs.cond, pairs.mode, meta)
    print(f"wrote {a.out}: {n} pairs from {base['name']} ({meta['solver']}, NFE {pairs.nfe}, {pairs.seconds:.1f} s)")


if __name__ == "__main__":
    cli.run(main)
