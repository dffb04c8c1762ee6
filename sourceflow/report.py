"""The report: long-form metrics table, a markdown summary and the plots (matplotlib, Agg)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sourceflow.io import atomic_path, write_text

COLUMNS = ["dataset", "experiment", "method", "solver", "steps", "nfe", "metric", "value", "seed"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> None:
    plt = _plt()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def scatter_png(path: str | Path, x: np.ndarray, labels: np.ndarray | None, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(x[:, 0], x[:, 1], s=1, c=labels if labels is not None else "k", cmap="tab10")
    ax.set_title(title)
    ax.set_aspect("equal")
    _save(fig, path)


def training_curves_png(path: str | Path, logs: dict[str, list[Path]]) -> None:
    """Loss and training-pair cost against step: one column per experiment, one line per seed. Keys
    ``"dataset/experiment"`` put each dataset's experiments in a block of two rows of their own."""
    plt = _plt()
    groups: dict[str, list[str]] = {}
    for key in sorted(logs):
        groups.setdefault(key.split("/", 1)[0] if "/" in key else "", []).append(key)
    ncols = max(len(v) for v in groups.values())
    fig, axes = plt.subplots(2 * len(groups), ncols, figsize=(3.2 * ncols, 2.8 * 2 * len(groups)), squeeze=False)
    for g, (ds, keys) in enumerate(groups.items()):
        top, bottom = axes[2 * g], axes[2 * g + 1]
        for j in range(len(keys), ncols):
            top[j].set_visible(False)
            bottom[j].set_visible(False)
        for j, key in enumerate(keys):
            for log in sorted(logs[key]):
                recs = [json.loads(ln) for ln in Path(log).read_text().splitlines() if ln.strip()]
                steps = [r["step"] for r in recs]
                label = Path(log).parent.name
                top[j].plot(steps, [r["loss"] for r in recs], lw=1, label=label)
                bottom[j].plot(steps, [r.get("coupling_cost", np.nan) for r in recs], lw=1, label=label)
            top[j].set_title(key.split("/", 1)[-1] + (f" ({ds})" if ds else ""), fontsize=9)
            top[j].set_yscale("log")
            top[j].yaxis.set_minor_formatter(plt.NullFormatter())
            bottom[j].set_xlabel("step")
        top[0].set_ylabel("training loss")
        bottom[0].set_ylabel("mean ‖x0 − x1‖²\nof training pairs")
        top[0].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def metrics_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Long form: one row per (run, solver, steps, metric)."""
    rows = []
    for r in records:
        for metric, value in r["metrics"].items():
            rows.append({"dataset": r["dataset"], "experiment": r["experiment"], "method": r["method"],
                         "solver": r["solver"], "steps": r["steps"], "nfe": r["nfe"], "metric": metric,
                         "value": float(value), "seed": r["seed"]})
    df = pd.DataFrame(rows, columns=COLUMNS)
    df["steps"] = df["steps"].astype("Int64")
    return df.sort_values(["dataset", "experiment", "solver", "steps", "metric", "seed"]).reset_index(drop=True)


def _sweep_label(solver: str, steps: Any) -> str:
    return solver if pd.isna(steps) else f"{solver}-{int(steps)}"


def summary_table(df: pd.DataFrame, metric: str = "w2sq") -> pd.DataFrame:
    """Experiments × sweep entries: mean ± std over seeds of ``metric`` (dopri5 also shows its NFE)."""
    d = df[df.metric == metric].copy()
    d["entry"] = [_sweep_label(s, k) for s, k in zip(d.solver, d.steps, strict=True)]
    g = d.groupby(["dataset", "experiment", "method", "entry"])
    stats = g.value.agg(["mean", "std", "count"]).reset_index()
    nfe = g.nfe.mean().reset_index()
    stats = stats.merge(nfe, on=["dataset", "experiment", "method", "entry"])

    def cell(r: pd.Series) -> str:
        s = f"{r['mean']:.3f} ± {0.0 if pd.isna(r['std']) else r['std']:.3f}"
        return s + (f" (NFE {r['nfe']:.0f})" if r.entry.startswith("dopri5") else "")

    stats["cell"] = stats.apply(cell, axis=1)
    order = sorted(stats.entry.unique(), key=lambda e: (e.startswith("dopri5"), e.split("-")[0],
                                                         int(e.split("-")[1]) if "-" in e else 0))
    table = stats.pivot(index=["dataset", "experiment", "method"], columns="entry", values="cell")[order]
    return table.reset_index()


def run_means(df: pd.DataFrame, metric: str, entry: str) -> pd.DataFrame:
    d = df[df.metric == metric]
    d = d[[_sweep_label(s, k) == entry for s, k in zip(d.solver, d.steps, strict=True)]]
    return d.groupby(["dataset", "experiment", "method"]).value.agg(["mean", "std", "count"]).reset_index()


METRIC_LABELS = {"w2sq": "W2² to held-out data", "fd": "FD to the training images (feature statistics)"}


def w2_vs_nfe_png(path: str | Path, df: pd.DataFrame, metric: str = "w2sq",
                  floors: dict[str, float] | None = None) -> None:
    """One panel per dataset: the metric (W2² for toy data, FD for images) against NFE for each
    experiment (mean ± std over seeds), with the data's own score (``floors``) as a dashed line."""
    plt = _plt()
    d = df[df.metric == metric]
    if d.empty:
        raise ValueError(f"no {metric!r} values to plot")
    datasets = sorted(d.dataset.unique())
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.2), squeeze=False)
    for ax, ds in zip(axes[0], datasets, strict=True):
        for exp, de in d[d.dataset == ds].groupby("experiment"):
            color = None
            for solver, marker, ls in (("euler", "o", "-"), ("heun", "s", "--"), ("midpoint", "^", ":")):
                ds_ = de[de.solver == solver].groupby("steps").agg(nfe=("nfe", "mean"), m=("value", "mean"),
                                                                     s=("value", "std")).reset_index()
                if len(ds_):
                    line = ax.errorbar(ds_.nfe, ds_.m, yerr=ds_.s.fillna(0), marker=marker, ls=ls, capsize=2,
                                       label=f"{exp} ({solver})")
                    color = line[0].get_color()
            ad = de[de.solver == "dopri5"]
            if len(ad):
                ax.errorbar(ad.nfe.mean(), ad.value.mean(), xerr=ad.nfe.std() if len(ad) > 1 else 0,
                            yerr=ad.value.std() if len(ad) > 1 else 0, marker="*", ms=12, color=color, ls="none",
                            label=f"{exp} (dopri5)")
        if floors and ds in floors:
            ax.axhline(floors[ds], color="0.4", ls="--", lw=1, label="data vs data (floor)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("NFE (function evaluations)")
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
        ax.set_title(ds)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, ncol=2)
    _save(fig, path)


def _panel_grid(path: str | Path, rows: list[str], columns: list[str], draw, size: tuple[float, float]) -> None:
    """A rows × columns figure of bare panels titled by column and labelled by row; ``draw(ax, row, col)``
    fills a panel and returns False when there is nothing to show ("not sampled")."""
    plt = _plt()
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(size[0] * len(columns), size[1] * len(rows)),
                             squeeze=False)
    for i, row in enumerate(rows):
        for j, col in enumerate(columns):
            ax = axes[i, j]
            if not draw(ax, row, col):
                ax.text(0.5, 0.5, "not sampled", ha="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(col)
            if j == 0:
                ax.set_ylabel(row)
    _save(fig, path)


def scatter_grid_png(path: str | Path, samples: dict[str, dict[str, np.ndarray]], columns: list[str],
                     reference: np.ndarray, points: int = 2000) -> None:
    """Rows: experiments; columns: sweep entries (e.g. euler-1, euler-2, euler-8) and the data."""
    lim = np.abs(reference).max() * 1.3

    def draw(ax, exp: str, col: str) -> bool:
        x = reference[:points] if col == "data" else samples[exp].get(col)
        if x is not None:
            ax.scatter(x[:points, 0], x[:points, 1], s=0.6, alpha=0.6, color="k" if col == "data" else "C0")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        return x is not None

    _panel_grid(path, sorted(samples), [*columns, "data"], draw, (2.6, 2.6))


def image_grid_png(path: str | Path, samples: dict[str, dict[str, np.ndarray]], columns: list[str],
                   reference: np.ndarray, per_cell: int = 36, scale: int = 4) -> None:
    """Rows: experiments; columns: sweep entries (e.g. euler-1 … euler-50) and the real images. Each cell
    is a square tile of the first ``per_cell`` uint8 NHWC images, upscaled ``scale``× (nearest)."""
    side = int(np.ceil(np.sqrt(per_cell)))

    def tile(x: np.ndarray) -> np.ndarray:
        x = x[:side * side]
        h, w = x.shape[1:3]
        canvas = np.full((side * (h + 1) + 1, side * (w + 1) + 1, 3), 255, np.uint8)
        for k, img in enumerate(x):
            r, c = divmod(k, side)
            canvas[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = img
        return canvas.repeat(scale, 0).repeat(scale, 1)

    def draw(ax, exp: str, col: str) -> bool:
        x = reference if col == "data" else samples[exp].get(col)
        if x is not None:
            ax.imshow(tile(x), interpolation="nearest")
        return x is not None

    _panel_grid(path, sorted(samples), [*columns, "data"], draw, (2.4, 2.5))


IMAGE_TABLES = [
    ("fd", "Fréchet distance of the samples' features to the training images' statistics (FID with Inception; "
           "the feature network's penultimate features for digits), mean ± std over seeds; dopri5 shows its mean "
           "NFE. Lower is better."),
    ("precision", "Precision (fraction of samples on the k-NN manifold of real features). Higher is better."),
    ("recall", "Recall (fraction of real images on the samples' k-NN manifold). Higher is better."),
    ("class_kl", "Class coverage: KL(p_data ‖ p_gen) of the feature network's predicted classes of the samples "
                 "against the data's label histogram (0 = the classes in the data's proportions). Lower is better."),
    ("class_tv", "Class coverage: total variation between the two class histograms. Lower is better."),
]


def write_summary(path: str | Path, df: pd.DataFrame, floors: dict[str, float] | None = None,
                  fd_floors: dict[str, float] | None = None) -> None:
    """Markdown: per toy dataset the W2² table over the sweep; per image dataset FD, precision, recall and
    class-coverage tables; then straightness and coupling cost per experiment."""
    lines = ["# sourceflow report", ""]
    toy = df[df.dataset.isin(df[df.metric == "w2sq"].dataset.unique())]
    if len(toy):
        lines += ["W2² between generated samples and held-out data (exact EMD), mean ± std over seeds; "
                  "dopri5 shows its mean NFE. Lower is better.", ""]
    for ds, t in (summary_table(toy).groupby("dataset") if len(toy) else []):
        lines += [f"## {ds}", "", t.drop(columns="dataset").to_markdown(index=False), ""]
        if floors and ds in floors:
            lines += [f"Data floor: W2² between two independent samples of the data at the same size is "
                      f"{floors[ds]:.4f}; a perfect generator scores about this.", ""]
    for ds in sorted(df[df.metric == "fd"].dataset.unique()):
        d = df[df.dataset == ds]
        lines += [f"## {ds} (images)", ""]
        for metric, text in IMAGE_TABLES:
            if (d.metric == metric).any():
                lines += [text, "", summary_table(d, metric).drop(columns="dataset").to_markdown(index=False), ""]
        if fd_floors and ds in fd_floors:
            lines += [f"Data floor: FD of the held-out real images to the same statistics is {fd_floors[ds]:.3f} "
                      "(finite-sample FD of real data; a perfect generator scores about this at that sample size).", ""]
    pe = run_means(df, "path_energy", "dopri5")
    cc = run_means(df, "coupling_cost", "dopri5")
    if len(pe):
        t = pe.merge(cc, on=["dataset", "experiment", "method"], suffixes=("_pe", "_cc"))
        t["path energy (dopri5)"] = [f"{m:.4f} ± {0 if pd.isna(s) else s:.4f}" for m, s in zip(t.mean_pe, t.std_pe, strict=True)]
        t["coupling cost"] = [f"{m:.3f} ± {0 if pd.isna(s) else s:.3f}" for m, s in zip(t.mean_cc, t.std_cc, strict=True)]
        lines += ["## Straightness and coupling", "",
                  "Normalised path energy ∫‖v‖²dt / ‖x1−x0‖² − 1 of the sampling trajectories (0 = straight) and "
                  "the mean training-pair cost ‖x0 − x1‖² of the final coupling (fresh batches; for LOOM the "
                  "pairs its seed cache holds, over all slots, including slots not visited yet).", "",
                  t[["dataset", "experiment", "method", "path energy (dopri5)", "coupling cost"]].to_markdown(index=False), ""]
    cond = df[df.metric == "w2sq_cond_mean"]
    if len(cond):
        lines += ["## Per-condition W2² (mean over condition groups)", "",
                  summary_table(df, "w2sq_cond_mean").to_markdown(index=False), ""]
    write_text(path, "\n".join(lines))
