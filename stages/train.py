"""train: train one experiment (method + model from a resolved spec) with accelerate.

One process: `python stages/train.py ...`. Several: `torchrun --nproc_per_node 2 stages/train.py ...`
(on CPU with ACCELERATE_USE_CPU=1: gloo). Checkpoints go to OUT/checkpoints/last every
train.checkpoint_every steps (atomically); a rerun resumes from there unless --no-resume, and a
checkpoint from a different configuration or from other input files (data, latents, GMMs, captions) is
ignored. Every random draw is a function of (seed,
step), so a resumed run ends with the same weights as an uninterrupted one (on CPU, bitwise).

Data: 2-D toy points (--data toy.safetensors, the train split) or image latents (--latents STORE
--stats latent_stats.safetensors --manifest manifest.parquet [--captions CAPTIONS.zarr] for text
conditioning), normalized with the latent statistics; flipped rows are datapoints of their own.

Outputs: OUT/model.safetensors (EMA weights and method state), OUT/train_log.jsonl (loss terms,
coupling cost, grad norm, lr every train.log_every steps), OUT/train_summary.json and
OUT/train_curves.png.

Examples:
  python stages/train.py --spec results/moons/runs/fm/spec_train.json --data results/moons/toy.safetensors \\
      --out results/moons/runs/fm/seed0 --seed 0
  python stages/train.py --spec results/digits/runs/mmfm/spec_train.json \\
      --latents results/digits/pixels/latents.zarr --stats results/digits/pixels/latent_stats.safetensors \\
      --manifest results/digits/manifest.parquet --gmm results/digits/pixels/gmm/cls_K10.safetensors \\
      --source-gmm results/digits/pixels/gmm/spatial_K10.safetensors --out results/digits/runs/mmfm/seed0
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sourceflow import build, cli  # noqa: E402


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--spec", required=True, help="resolved experiment spec: a JSON file or JSON text")
    p.add_argument("--gmm", default=None, help="CLS GMM .safetensors (mmfm: the mode coupling; toy points: also the source)")
    p.add_argument("--source-gmm", default=None, help="spatial GMM .safetensors (mmfm on images: the source x0 is drawn from)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from OUT/checkpoints/last when it belongs to this spec and seed (--no-resume: start over)")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many steps without final outputs (simulates a kill; for tests)")
    p.add_argument("--pairs", default=None, help="reflow: the (x0, x1) pairs of reflow_pairs (the training data)")
    p.add_argument("--init-from", default=None,
                   help="reflow: the base run's model.safetensors to start from (EMA weights and source)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    build.add_data_args(p, "train")
    cli.add_common(p)
    a = p.parse_args()
    cli.set_threads(a.threads)

    import torch

    from sourceflow.config import load_spec, spec_hash
    from sourceflow.io import input_fingerprint
    from sourceflow.report import training_curves_png
    from sourceflow.train.loop import TrainSettings, train

    spec = load_spec(a.spec)
    data = build.load_data(a, spec, "train")
    torch.manual_seed(a.seed)  # the initial weights depend on the seed
    model = build.build_model(spec, data)
    method = build.build_method(spec, data, a.seed, a.gmm, a.source_gmm, a.posteriors)
    if (spec.get("reflow") is None) != (a.pairs is None) or (a.pairs is None) != (a.init_from is None):
        raise ValueError("a reflow experiment needs --pairs and --init-from (and only a reflow experiment takes them)")
    if a.pairs is not None:
        build.init_from_trained(a.init_from, model, method)  # before train(): the EMA starts from these weights
        ds = build.load_reflow_pairs(a.pairs, spec, method)
    else:
        ds = build.training_dataset(spec, data)
    # an epoch is a pass over the images (flipped copies are extra rows, not extra images)
    accum = None
    if spec["train"]["grad_accum"] == "auto":
        from sourceflow.plan import device_grad_accum

        accum, why = device_grad_accum(spec)
        print(why)
    settings = TrainSettings.from_spec(spec["train"], None if a.pairs else getattr(data, "num_images", None), accum)
    inputs = input_fingerprint([a.data, a.latents, a.stats, a.manifest, a.captions, a.gmm, a.source_gmm, a.pairs,
                                a.init_from, a.posteriors])
    summary = train(model, method, ds, settings, a.seed, a.out, f"{spec_hash(spec)}-{inputs}-seed{a.seed}",
                    resume=a.resume, progress=not a.no_progress, stop_after=a.stop_after)
    if "stopped_at" in summary:
        print(f"stopped after step {summary['stopped_at']} (checkpoint in {a.out}/checkpoints/last)")
        return
    if int(os.environ.get("RANK", "0")) == 0:
        training_curves_png(Path(a.out) / "train_curves.png", {spec["name"]: [Path(a.out) / "train_log.jsonl"]})
    t = summary["timings"]
    print(f"trained {spec['name']} seed {a.seed}: {summary['steps']} steps in {t['seconds']} s "
          f"({t['steps_per_second']} steps/s), coupling cost {summary['coupling_cost']:.4f}")


if __name__ == "__main__":
    cli.run(main)
