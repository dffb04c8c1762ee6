"""reference_stats: what a perfect generator would score, as the reference for every metric.

For 2-D toy data: the exact W2² (POT emd2) between the first N training points and the first N
held-out test points, two independent draws of the data distribution: the floor of the W2² the
evaluate stage reports at the same N (finite-sample W2 is not 0 even for a perfect model).

Example:
  python stages/reference_stats.py --data results/moons/toy.safetensors --num-points 5000 \\
      --out results/moons/reference/points_w2.json
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sourceflow import cli  # noqa: E402


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--data", required=True, help="toy data .safetensors (train and test splits)")
    p.add_argument("--num-points", type=int, default=5000, help="points from each split (use evaluate.num_points)")
    p.add_argument("--out", required=True, help="output .json")
    a = p.parse_args()

    import numpy as np

    from sourceflow.build import load_points
    from sourceflow.io import write_json
    from sourceflow.metrics.wasserstein import w2_squared

    train, test = load_points(a.data, "train").x.numpy(), load_points(a.data, "test").x.numpy()
    n = min(a.num_points, len(train), len(test))
    w2sq = w2_squared(train[:n], test[:n])
    write_json(a.out, {"w2sq": w2sq, "w2": float(np.sqrt(w2sq)), "num_points": n})
    print(f"data floor at {n} points: W2² {w2sq:.4f}")


if __name__ == "__main__":
    cli.run(main)
