"""plan: the resource plan of a config — for every job the workflow would run, its GPUs, peak GPU memory per
device, host memory, disk written, FLOPs and hours at a stated GPU throughput, and what the SLURM profile
requests for it; every job whose plan exceeds its request (host memory, runtime, GPUs) or the device memory
is flagged.

Peak GPU memory of training is measured by running the real modules (model, method, AdamW, EMA; bf16
autocast where the config says so) through a full step on fake tensors (FakeTensorMode + MemTracker), with
attention counted as the GPU's fused kernels hold it; FLOPs by FlopCounterMode on the same step. Where the
configured gradient accumulation does not fit the device, the plan uses the smallest power of two that does
(10 % headroom; `sourceflow.plan.choose_grad_accum`). Everything else is a formula of the config whose terms
are listed in the JSON. Measurements are cached (~/.cache/sourceflow/plan or $SOURCEFLOW_PLAN_CACHE): the
first plan of an ImageNet config takes minutes on a CPU, a rerun seconds.

Hours = FLOPs / (GPUs x peak x MFU) for compute-bound jobs (default H100 SXM: bf16 dense 989 TFLOP/s, fp32 67,
fp64 67, MFU 0.35), else the stated I/O rates (read/write GB/s, JPEG decodes per core). Exit status 0 even
with flags (the flags are the output); 2 for a bad config or flag.

Example:
  python stages/plan.py --configfile config/imagenet256-mmfm.yaml --json plan-mmfm.json
  python stages/plan.py --configfile config/imagenet256-csfm.yaml --gpu-mem-gb 80 --tflops 989 --mfu 0.35
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sourceflow import cli  # noqa: E402


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--configfile", required=True, nargs="+",
                   help="the workflow config to plan (as snakemake --configfile; later files are merged over earlier)")
    p.add_argument("--json", default=None, help="also write the plan as JSON here (one entry per job)")
    p.add_argument("--gpu-mem-gb", type=float, default=80.0, help="memory of one GPU, GB (H100 SXM: 80)")
    p.add_argument("--tflops", type=float, default=989.0, help="peak bf16 dense TFLOP/s of one GPU (H100 SXM: 989)")
    p.add_argument("--fp32-tflops", type=float, default=67.0,
                   help="peak fp32 TFLOP/s of one GPU (H100 SXM CUDA cores: 67; sampling and extraction run fp32)")
    p.add_argument("--fp64-tflops", type=float, default=67.0, help="peak fp64 TFLOP/s of one GPU (H100 SXM: 67)")
    p.add_argument("--mfu", type=float, default=0.35, help="model FLOPs utilisation assumed for every GPU job")
    p.add_argument("--headroom", type=float, default=0.10,
                   help="share of the device memory left free when choosing the gradient accumulation")
    p.add_argument("--profile", default="profiles/slurm/config.yaml", help="the Snakemake profile whose requests "
                   "are compared with the plan")
    p.add_argument("--images", nargs="*", default=[], metavar="DATASET=N",
                   help="training images of a dataset when results/<dataset>/manifest.json does not exist yet and "
                        "the dataset is not a known one (ImageNet, CIFAR-10, CelebA-HQ, FFHQ)")
    p.add_argument("--dopri5-nfe", type=int, default=100, help="model evaluations assumed per dopri5 solve")
    p.add_argument("--no-cache", action="store_true", help="measure again instead of reading the cache")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    a = p.parse_args()

    from sourceflow.config import ConfigError
    from sourceflow.io import write_json
    from sourceflow.plan import (
        IOAssumptions,
        Planner,
        Profile,
        Throughput,
        format_table,
        load_config,
        to_json,
    )

    images = {}
    for item in a.images:
        name, sep, n = item.partition("=")
        if not sep or not n.isdigit():
            raise ValueError(f"--images: expected DATASET=N, got {item!r}")
        images[name] = int(n)
    for path in a.configfile:
        if not Path(path).exists():
            raise FileNotFoundError(f"config file not found: {path}")
    try:
        config = load_config(*a.configfile)
    except ConfigError as e:
        raise ValueError(str(e)) from None
    except Exception as e:  # jsonschema's ValidationError: one line naming the key
        if type(e).__name__ == "ValidationError":
            raise ValueError(f"config: {'.'.join(map(str, e.absolute_path))}: {e.message}") from None
        raise
    tp = Throughput(bf16_tflops=a.tflops, fp32_tflops=a.fp32_tflops, fp64_tflops=a.fp64_tflops, mfu=a.mfu)

    def progress(msg: str) -> None:
        if not a.quiet:
            print(f"plan: {msg}", file=sys.stderr, flush=True)

    try:
        planner = Planner(config, gpu_mem_gb=a.gpu_mem_gb, throughput=tp, io=IOAssumptions(),
                          profile=Profile.load(a.profile), images=images, use_cache=not a.no_cache,
                          headroom=a.headroom, dopri5_nfe=a.dopri5_nfe, progress=progress)
        entries = planner.plan()
    except ConfigError as e:
        raise ValueError(str(e)) from None
    print(format_table(entries, planner))
    if a.json:
        write_json(a.json, to_json(entries, planner, " ".join(a.configfile)))
        print(f"\nwrote {a.json} ({len(entries)} jobs)")


if __name__ == "__main__":
    cli.run(main)
