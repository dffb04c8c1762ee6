"""Predicted vs measured GPU memory of a training step of MM-FM's DiT-DH-XL/1 (config/imagenet256-mmfm.yaml:
8192 mode classes, RAE latents 768x16x16, bf16 autocast, fused AdamW, EMA, the 6.4 GB spatial-GMM source).

The prediction is the plan's (sourceflow.plan.measure_train_step: the same step on fake CPU tensors with
MemTracker, attention held as the GPU's fused kernels hold it; cached like the plan's). The measurement runs
that step for real on the GPU (sourceflow.plan.run_fake_step with fake=False, device="cuda", torch's own SDPA)
and reads torch.cuda.max_memory_allocated; it also times the steps and reports the achieved TFLOP/s and MFU
against the plan's FLOPs. One process, one GPU: no DDP buckets (the plan adds 4 bytes per parameter for them
with more than one GPU).

On a machine without a GPU it says so and exits 0.

Example:
  python benchmarks/gpu_memory.py                         # micro-batch 64 (batch 1024 / 8 GPUs / grad_accum 2)
  python benchmarks/gpu_memory.py --micro-batch 128 --no-accumulate --experiment mmfm
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="config/imagenet256-mmfm.yaml", help="the config of the experiment")
    p.add_argument("--experiment", default="mmfm", help="the experiment whose training step is run")
    p.add_argument("--micro-batch", type=int, default=64, help="samples per device per micro-batch")
    p.add_argument("--no-accumulate", action="store_true",
                   help="one micro-batch per step (default: two, as with grad_accum > 1: the second runs while "
                        "the first one's gradients are held)")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps run on the GPU (the first ones warm up)")
    p.add_argument("--tflops", type=float, default=None,
                   help="peak bf16 dense TFLOP/s of this GPU for the MFU (default: 989 for H100/H200, else none)")
    p.add_argument("--json", default=None, help="also write the numbers here")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: a smoke test of this script on real CPU tensors (measured = MemTracker; use a small "
                        "experiment, e.g. --config config/config.yaml --experiment digits-mmfm --micro-batch 8)")
    a = p.parse_args()

    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        print(f"no GPU (torch {torch.__version__}, cuda available: False): nothing to measure. "
              "Run `python stages/plan.py --configfile config/imagenet256-mmfm.yaml` for the prediction.")
        return 0

    from sourceflow.config import resolve_experiments
    from sourceflow.plan import (
        GB,
        _spec_cls_dim,
        dataset_facts,
        load_config,
        measure_train_step,
        run_fake_step,
        shape_data,
    )

    config = load_config(ROOT / a.config)
    spec = resolve_experiments(config)[a.experiment]
    facts = {spec["data"]: dataset_facts(config, spec["data"])}
    data = shape_data(config, spec, facts)
    cls_dim = _spec_cls_dim(spec)
    accumulate = not a.no_accumulate
    precision = "bf16" if spec["train"].get("mixed_precision") == "bf16" else "fp32"

    t0 = time.time()
    pred = measure_train_step(spec, data, a.micro_batch, accumulate, cls_dim)
    t_pred = time.time() - t0

    cuda = a.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    real = run_fake_step(spec, data, a.micro_batch, accumulate, precision, fake=False, cls_dim=cls_dim,
                         attention="native", device=a.device, steps=a.steps)
    peak = torch.cuda.max_memory_allocated() - base if cuda else real.peak_bytes
    reserved = torch.cuda.max_memory_reserved() if cuda else 0
    name = torch.cuda.get_device_name() if cuda else "cpu (smoke test: measured = MemTracker on real CPU tensors)"
    peak_tflops = a.tflops or (989.0 if any(s in name for s in ("H100", "H200", "GH200")) else None)
    n_micro = 2 if accumulate else 1
    steady = real.step_seconds[2:] or real.step_seconds[1:]
    step_s = sum(steady) / len(steady)
    achieved = pred.flops_per_sample * a.micro_batch * n_micro / step_s / 1e12

    rows = [("GPU", name), ("torch", torch.__version__),
            ("experiment", f"{a.experiment}: {spec['model'].get('size', spec['model']['kind'])}, {pred.params / 1e6:.2f}M parameters, "
                           f"micro-batch {a.micro_batch} x {n_micro} per step, {precision}"),
            ("predicted peak (plan, fake tensors)", f"{pred.peak_bytes / GB:.2f} GB  ({t_pred:.0f} s to predict)"),
            ("measured max_memory_allocated", f"{peak / GB:.2f} GB"),
            ("predicted / measured", f"{pred.peak_bytes / peak:.3f}"),
            ("MemTracker on the real step", f"{real.peak_bytes / GB:.2f} GB"),
            ("max_memory_reserved (allocator)", f"{reserved / GB:.2f} GB"),
            ("step seconds", ", ".join(f"{s:.3f}" for s in real.step_seconds)),
            ("achieved (plan FLOPs / steady step)", f"{achieved:.0f} TFLOP/s"
             + (f" = MFU {achieved / peak_tflops:.2f} of {peak_tflops:g}" if peak_tflops else ""))]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")
    print("breakdown at the predicted peak (GB): " + ", ".join(
        f"{k} {v / GB:.2f}" for k, v in pred.breakdown.items() if v and k != "Total"))
    if a.json:
        Path(a.json).write_text(json.dumps({
            "gpu": name, "torch": torch.__version__, "experiment": a.experiment, "micro_batch": a.micro_batch,
            "accumulate": accumulate, "predicted_bytes": pred.peak_bytes, "measured_max_allocated": peak,
            "max_reserved": reserved, "memtracker_real_bytes": real.peak_bytes, "step_seconds": real.step_seconds,
            "flops_per_sample": pred.flops_per_sample, "achieved_tflops": achieved}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
