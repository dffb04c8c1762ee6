"""train: train one experiment (method + model from a resolved spec) with accelerate.

One process: `python stages/train.py ...`. Several: `torchrun --nproc_per_node 2 stages/train.py ...`
(on CPU with ACCELERATE_USE_CPU=1: gloo). Checkpoints go to OUT/checkpoints/last every
train.checkpoint_every steps (atomically); a rerun resumes from there unless --no-resume, and a
checkpoint from a different configuration is ignored. Every random draw is a function of (seed,
step), so a resumed run ends with the same weights as an uninterrupted one (on CPU, bitwise).

Outputs: OUT/model.safetensors (EMA weights and method state), OUT/train_log.jsonl (loss terms,
coupling cost, grad norm, lr every train.log_every steps) and OUT/train_summary.json.

Example:
  python stages/train.py --spec results/moons/runs/fm/spec_train.json --data results/moons/toy.safetensors \\
      --out results/moons/runs/fm/seed0 --seed 0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sourceflow import cli  # noqa: E402


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--spec", required=True, help="resolved experiment spec: a JSON file or JSON text")
    p.add_argument("--data", required=True, help="toy data .safetensors (train split is used)")
    p.add_argument("--gmm", default=None, help="CLS GMM .safetensors (mmfm only)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from OUT/checkpoints/last when it belongs to this spec and seed (--no-resume: start over)")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many steps without final outputs (simulates a kill; for tests)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    cli.add_common(p)
    a = p.parse_args()
    cli.set_threads(a.threads)

    import torch

    from sourceflow.build import build_method, build_model, load_points
    from sourceflow.config import load_spec, spec_hash
    from sourceflow.train.loop import ArrayDataset, TrainSettings, train

    spec = load_spec(a.spec)
    data = load_points(a.data, "train")
    torch.manual_seed(a.seed)  # the initial weights depend on the seed
    model = build_model(spec, data)
    method = build_method(spec, data, a.seed, a.gmm)
    ds = ArrayDataset(data.x, data.condition(spec["conditioning"]))
    settings = TrainSettings.from_spec(spec["train"])
    summary = train(model, method, ds, settings, a.seed, a.out, f"{spec_hash(spec)}-seed{a.seed}",
                    resume=a.resume, progress=not a.no_progress, stop_after=a.stop_after)
    if "stopped_at" in summary:
        print(f"stopped after step {summary['stopped_at']} (checkpoint in {a.out}/checkpoints/last)")
        return
    print(f"trained {spec['name']} seed {a.seed}: {summary['steps']} steps in {summary['seconds']} s "
          f"({summary['steps_per_second']} steps/s), coupling cost {summary['coupling_cost']:.4f}")


if __name__ == "__main__":
    cli.run(main)
