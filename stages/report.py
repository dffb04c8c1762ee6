"""report: collect every run's metrics into results/report/.

Writes metrics.csv (long form: dataset, experiment, method, source, coupling, conditioning,
reflow_from, solver, steps, nfe, metric, value, seed; runs evaluated before the combination was recorded
have those four empty), summary.md (first each experiment against its like-for-like baseline: same
dataset and conditioning, plain source, independent coupling; reflow experiments against their base;
combined source + coupling experiments against both parents; then the experiments' combinations; toy
data: W2² over the sweep and per condition; images: FD, precision, recall and class coverage over the
sweep; straightness and coupling cost), w2_vs_nfe.png (toy datasets),
fd_vs_nfe.png (image datasets), training_curves.png (loss and coupling cost against step for every run)
and one samples_{dataset}.png per dataset: each experiment's first seed at the configured Euler step
counts (then the other sampled entries: midpoint, dopri5) next to the data (scatter plots for toy data,
image tiles for images).

Example:
  python stages/report.py --runs results/moons/runs/*/seed* --data moons=results/moons/toy.safetensors \\
      --out results/report
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sourceflow import cli  # noqa: E402


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--runs", nargs="+", required=True, help="run directories (each with metrics/ and samples/)")
    p.add_argument("--data", nargs="*", default=[], help="DATASET=PATH of toy data, for the scatter reference")
    p.add_argument("--reference", nargs="*", default=[],
                   help="DATASET=PATH of reference_stats JSON (the data's own W2² floor, shown in table and plot)")
    p.add_argument("--images", nargs="*", default=[],
                   help="DATASET=MANIFEST of image datasets: real images for the grid's data column")
    p.add_argument("--fd-reference", nargs="*", default=[],
                   help="DATASET=NPZ reference statistics whose holdout_fd is the FD floor shown in the table")
    p.add_argument("--scatter-steps", type=int, nargs="+", default=[1, 2, 8], help="Euler steps shown first in the toy grids (then the other sampled entries, 6 columns at most)")
    p.add_argument("--scatter-points", type=int, default=2000, help="points per scatter panel")
    p.add_argument("--grid-steps", type=int, nargs="+", default=[1, 2, 4, 50], help="Euler steps shown first in the image grids (then the other sampled entries, 6 columns at most)")
    p.add_argument("--grid-images", type=int, default=36, help="images per cell of the image grids")
    p.add_argument("--out", required=True, help="report directory")
    a = p.parse_args()

    import numpy as np

    from sourceflow.build import load_points
    from sourceflow.data.images import load_images
    from sourceflow.data.manifest import read_manifest
    from sourceflow.io import atomic_path, read_json
    from sourceflow.metrics.frechet import read_reference_npz
    from sourceflow.report import (
        grid_entries,
        image_grid_png,
        metrics_frame,
        read_npz_rows,
        scatter_grid_png,
        training_curves_png,
        w2_vs_nfe_png,
        write_summary,
    )

    records, first_seed = [], {}
    for run in sorted(a.runs):
        recs = read_json(Path(run) / "metrics" / "all.json")
        if not recs:
            raise ValueError(f"{run}/metrics/all.json lists no metrics")
        records += recs
        key = (recs[0]["dataset"], recs[0]["experiment"])
        if key not in first_seed or recs[0]["seed"] < first_seed[key][0]:
            first_seed[key] = (recs[0]["seed"], Path(run))
    df = metrics_frame(records)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "metrics.csv") as tmp:
        df.to_csv(tmp, index=False)
    floors = {ds: read_json(path)["w2sq"] for ds, path in (item.split("=", 1) for item in a.reference)}
    fd_floors = {}
    for ds, path in (item.split("=", 1) for item in a.fd_reference):
        ref = read_reference_npz(path, keys=("holdout_fd",))  # not the [n, F] features
        if "holdout_fd" in ref:
            fd_floors[ds] = float(ref["holdout_fd"])
    if (df.metric == "w2sq").any():
        w2_vs_nfe_png(out / "w2_vs_nfe.png", df, floors=floors)
    if (df.metric == "fd").any():
        w2_vs_nfe_png(out / "fd_vs_nfe.png", df, metric="fd", floors=fd_floors)
    logs: dict[str, list[Path]] = {}
    for run in a.runs:
        log = Path(run) / "train_log.jsonl"
        if log.exists():
            logs.setdefault(f"{Path(run).parent.parent.parent.name}/{Path(run).parent.name}", []).append(log)
    if logs:
        training_curves_png(out / "training_curves.png", logs)
    def first_seed_samples(ds: str, cols: list[str], key: str, limit: int | None = None) -> dict:
        """Experiment → {sweep entry: the first ``limit`` rows of array ``key`` of its samples.npz} of each
        experiment's first seed; only those rows are read (a 50k-image arr_0 is ~10 GB)."""
        out: dict[str, dict] = {}
        for (d, exp), (_, run) in first_seed.items():
            if d == ds:
                out[exp] = {}
                for c in cols:
                    f = run / "samples" / c / "samples.npz"
                    if f.exists():
                        out[exp][c] = read_npz_rows(f, key, limit)
        return out

    data_paths = dict(item.split("=", 1) for item in a.data)
    for ds in sorted(df.dataset.unique()):
        if ds in data_paths:
            cols = grid_entries(df, ds, a.scatter_steps)
            ref = load_points(data_paths[ds], "test").x.numpy()
            scatter_grid_png(out / f"samples_{ds}.png", first_seed_samples(ds, cols, "x", a.scatter_points), cols, ref,
                             a.scatter_points)
    for ds, manifest in (item.split("=", 1) for item in a.images):
        grid_cols = grid_entries(df, ds, a.grid_steps)
        tiles = first_seed_samples(ds, grid_cols, "arr_0", a.grid_images)
        m = read_manifest(manifest).split("train")
        rows = np.random.default_rng(0).choice(len(m.frame), min(a.grid_images, len(m.frame)), replace=False)
        m.frame = m.frame.iloc[np.sort(rows)].reset_index(drop=True)
        real = load_images(m, int(m.meta["resolution"]))
        image_grid_png(out / f"samples_{ds}.png", tiles, grid_cols, real, a.grid_images)
    write_summary(out / "summary.md", df, floors=floors, fd_floors=fd_floors)
    print(f"report: {out}/summary.md ({len(df)} metric rows from {len(a.runs)} runs)")


if __name__ == "__main__":
    cli.run(main)
