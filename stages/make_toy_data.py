"""make_toy_data: draw a 2-D toy distribution once into train and test splits.

Writes one safetensors file with `train.x`, `train.label`, `test.x`, `test.label` (and the number of
classes); the angle and x-coordinate conditions are functions of x. Optionally a PNG scatter.

Example:
  python stages/make_toy_data.py --distribution moons --n-train 20000 --n-test 5000 \\
      --out results/moons/toy.safetensors --plot results/moons/toy.png
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sourceflow import cli  # noqa: E402


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--distribution", required=True, help="8gaussians | moons | checkerboard | spirals")
    p.add_argument("--n-train", type=int, default=20000, help="training points")
    p.add_argument("--n-test", type=int, default=5000, help="held-out points (the evaluation reference)")
    p.add_argument("--out", required=True, help="output .safetensors")
    p.add_argument("--plot", default=None, help="optional PNG scatter of the training split")
    cli.add_common(p)
    a = p.parse_args()
    cli.set_threads(a.threads)

    import torch

    from sourceflow.build import PointData, save_points
    from sourceflow.data import toy

    g = torch.Generator().manual_seed(a.seed)
    splits = {}
    for name, n in (("train", a.n_train), ("test", a.n_test)):
        d = toy.sample(a.distribution, n, g)
        splits[name] = PointData(d.x, d.label, d.num_classes)
    save_points(a.out, splits, {"distribution": a.distribution, "seed": str(a.seed)})
    print(f"wrote {a.out}: {a.n_train} train / {a.n_test} test points of {a.distribution}")
    if a.plot:
        from sourceflow.report import scatter_png

        scatter_png(a.plot, splits["train"].x.numpy()[:5000], splits["train"].label.numpy()[:5000],
                    f"{a.distribution} (train, first 5000)")


if __name__ == "__main__":
    cli.run(main)
