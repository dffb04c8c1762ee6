"""The report: long-form metrics table, a markdown summary and the plots (matplotlib, Agg)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sourceflow.io import atomic_path, write_text

# What identifies a run's experiment: its labels, its combination (source, coupling, conditioning kinds) and,
# for reflow experiments, the base experiment it reflows ("" otherwise). Every per-experiment groupby keys on all.
COMBINATION = ["source", "coupling", "conditioning", "reflow_from"]
KEYS = ["dataset", "experiment", "method", *COMBINATION]
COLUMNS = [*KEYS, "solver", "steps", "nfe", "metric", "value", "seed"]


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
    """Long form: one row per (run, solver, steps, metric). Records written before the combination was
    recorded (no source / coupling / conditioning / reflow_from) get empty strings there."""
    rows = []
    for r in records:
        ident = {k: r[k] for k in ("dataset", "experiment", "method")}
        ident.update({k: r.get(k) or "" for k in COMBINATION})
        for metric, value in r["metrics"].items():
            rows.append({**ident, "solver": r["solver"], "steps": r["steps"], "nfe": r["nfe"], "metric": metric,
                         "value": float(value), "seed": r["seed"]})
    df = pd.DataFrame(rows, columns=COLUMNS)
    df["steps"] = df["steps"].astype("Int64")
    return df.sort_values(["dataset", "experiment", "solver", "steps", "metric", "seed"]).reset_index(drop=True)


def keyed(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with every key column present and no missing keys (a metrics.csv read back has NaN for empty
    strings, an old one lacks the combination columns): groupbys on :data:`KEYS` then drop no rows."""
    df = df.copy()
    for k in KEYS:
        df[k] = df[k].fillna("").astype(str) if k in df else ""
    return df


def _sweep_label(solver: str, steps: Any) -> str:
    return solver if pd.isna(steps) else f"{solver}-{int(steps)}"


def summary_table(df: pd.DataFrame, metric: str = "w2sq") -> pd.DataFrame:
    """Experiments × sweep entries: mean ± std over seeds of ``metric`` (dopri5 also shows its NFE)."""
    d = keyed(df[df.metric == metric])
    d["entry"] = [_sweep_label(s, k) for s, k in zip(d.solver, d.steps, strict=True)]
    g = d.groupby([*KEYS, "entry"])
    stats = g.value.agg(["mean", "std", "count"]).reset_index()
    nfe = g.nfe.mean().reset_index()
    stats = stats.merge(nfe, on=[*KEYS, "entry"])

    def cell(r: pd.Series) -> str:
        s = f"{r['mean']:.3f} ± {0.0 if pd.isna(r['std']) else r['std']:.3f}"
        return s + (f" (NFE {r['nfe']:.0f})" if r.entry.startswith("dopri5") else "")

    stats["cell"] = stats.apply(cell, axis=1)
    order = sorted(stats.entry.unique(), key=lambda e: (e.startswith("dopri5"), e.split("-")[0],
                                                         int(e.split("-")[1]) if "-" in e else 0))
    table = stats.pivot(index=KEYS, columns="entry", values="cell")[order]
    return table.reset_index()


def grid_entries(df: pd.DataFrame, dataset: str, euler_steps: list[int], limit: int = 6) -> list[str]:
    """The sweep entries a dataset's sample grid shows, by NFE (dopri5 last): the configured Euler step
    counts that some experiment sampled, then every other sampled entry (midpoint-k, dopri5, an Euler count
    not configured) by NFE, at most ``limit`` in all, so that a config sampling only Euler 49 or midpoint /
    dopri5 still gets a grid with its own entries rather than empty "not sampled" columns."""
    d = df[df.dataset == dataset]
    nfe = {_sweep_label(s, k): float(n) for s, k, n in zip(d.solver, d.steps, d.nfe, strict=True)}
    wanted = [f"euler-{s}" for s in euler_steps if f"euler-{s}" in nfe]
    def order(e: str) -> tuple:
        return e.startswith("dopri5"), nfe[e], e

    rest = sorted((e for e in nfe if e not in wanted), key=order)
    return sorted([*wanted, *rest][:limit], key=order)  # chosen: configured first; shown: by NFE, dopri5 last


def run_means(df: pd.DataFrame, metric: str, entry: str) -> pd.DataFrame:
    """Per experiment (:data:`KEYS`): mean, std and count over seeds of ``metric`` at one sweep entry."""
    d = keyed(df[df.metric == metric])
    d = d.loc[np.array([_sweep_label(s, k) == entry for s, k in zip(d.solver, d.steps, strict=True)], bool)]
    return d.groupby(KEYS).value.agg(["mean", "std", "count"]).reset_index()


METRIC_LABELS = {"w2sq": "W2² to held-out data", "fd": "FD to the training images (feature statistics)"}


SOLVER_STYLES = (("euler", "o", "-"), ("heun", "s", "--"), ("midpoint", "^", ":"))


def w2_vs_nfe_png(path: str | Path, df: pd.DataFrame, metric: str = "w2sq",
                  floors: dict[str, float] | None = None) -> None:
    """One panel per dataset: the metric (W2² for toy data, FD for images) against NFE for each
    experiment (mean ± std over seeds), with the data's own score (``floors``) as a dashed line.

    One colour per experiment (tab20 past ten, so no two share one); the legend, beside the panel so it
    hides no curve, names each experiment once and keys the markers: a line per fixed-step solver, a
    star at dopri5's mean NFE."""
    plt = _plt()
    from matplotlib.lines import Line2D

    d = df[df.metric == metric]
    if d.empty:
        raise ValueError(f"no {metric!r} values to plot")
    datasets = sorted(d.dataset.unique())
    fig, axes = plt.subplots(1, len(datasets), figsize=(8.5 * len(datasets), 4.2), squeeze=False)
    for ax, ds in zip(axes[0], datasets, strict=True):
        dd = d[d.dataset == ds]
        names = sorted(dd.experiment.unique())
        cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
        handles, solvers = [], []
        for i, (exp, de) in enumerate(dd.groupby("experiment")):
            color = cmap(i % cmap.N)
            for solver, marker, ls in SOLVER_STYLES:
                ds_ = de[de.solver == solver].groupby("steps").agg(nfe=("nfe", "mean"), m=("value", "mean"),
                                                                     s=("value", "std")).reset_index()
                if len(ds_):
                    ax.errorbar(ds_.nfe, ds_.m, yerr=ds_.s.fillna(0), marker=marker, ls=ls, capsize=2, color=color)
                    solvers += [(solver, marker, ls)] if (solver, marker, ls) not in solvers else []
            ad = de[de.solver == "dopri5"]
            if len(ad):
                ax.errorbar(ad.nfe.mean(), ad.value.mean(), xerr=ad.nfe.std() if len(ad) > 1 else 0,
                            yerr=ad.value.std() if len(ad) > 1 else 0, marker="*", ms=12, color=color, ls="none")
                solvers += [("dopri5 (mean NFE)", "*", "none")] if ("dopri5 (mean NFE)", "*", "none") not in \
                    solvers else []
            handles.append(Line2D([], [], color=color, lw=6, label=exp))
        if floors and ds in floors:
            ax.axhline(floors[ds], color="0.4", ls="--", lw=1)
            handles.append(Line2D([], [], color="0.4", ls="--", lw=1, label="data vs data (floor)"))
        handles += [Line2D([], [], color="k", marker=m, ls=ls, ms=10 if m == "*" else 6, label=name)
                    for name, m, ls in solvers]
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("NFE (function evaluations)")
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
        ax.set_title(ds)
        ax.grid(alpha=0.3, which="both")
        ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
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


def read_npz_rows(path: str | Path, key: str, stop: int | None = None) -> np.ndarray:
    """Rows [0, ``stop``) of array ``key`` of an .npz (``None``: all), reading only those rows: the member
    ``key.npy`` is streamed from the zip (stored, as np.savez writes it, or deflated), its .npy header
    parsed and just ``stop`` rows' bytes read. A grid of 36 tiles from a 50k-image ``arr_0`` (9.8 GB at
    256²) reads 7 MB, where ``np.load(path)[key]`` reads all of it (an NpzFile member is read whole; there
    is no mmap for npz). Object arrays are refused (no pickle); Fortran-order or 0-d arrays are read whole."""
    import zipfile

    from numpy.lib import format as npformat

    with zipfile.ZipFile(path) as zf:
        name = f"{key}.npy"
        if name not in zf.namelist():
            raise KeyError(f"{path}: no array {key!r} (arrays: {', '.join(n.removesuffix('.npy') for n in zf.namelist())})")
        with zf.open(name) as f:
            version = npformat.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = npformat.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = npformat.read_array_header_2_0(f)
            else:  # (3, 0): utf-8 field names, rare; numpy reads it whole
                shape, fortran, dtype = None, True, None
            if dtype is not None and dtype.hasobject:
                raise ValueError(f"{path}: array {key!r} holds Python objects (needs pickle; refused)")
            if fortran or not shape:
                with np.load(path, allow_pickle=False) as z:
                    arr = z[key]
                return arr if arr.ndim == 0 else arr[:stop]
            n = shape[0] if stop is None else max(0, min(int(stop), shape[0]))
            out = np.empty((n, *shape[1:]), dtype)
            buf = memoryview(out.reshape(-1).view(np.uint8))
            got = 0
            while got < len(buf):
                k = f.readinto(buf[got:got + (1 << 20)])  # 1 MiB at a time: zipfile copies what it reads
                if not k:
                    raise ValueError(f"{path}: array {key!r} is truncated ({got} of {len(buf)} bytes for {n} rows)")
                got += k
            return out


GRID_TILE_TARGET_PX = 512  # a grid tile is enlarged (nearest) until about this size, 4x at most


def grid_scale(tile_px: int) -> int:
    """Nearest-neighbour enlargement of a grid tile of ``tile_px`` pixels a side: small images (8-px digits)
    up to 4x so that matplotlib's resampling keeps their pixels square; a tile of 256-px images (1,543 px for
    36) as it is: 4x would be 114 MB of uint8 that matplotlib draws at ~64 B per pixel (~3.7 GB)."""
    return max(1, min(4, GRID_TILE_TARGET_PX // max(tile_px, 1)))


def grid_tile_px(per_cell: int, image_px: int) -> int:
    """Side in pixels of one grid tile of ``per_cell`` images of ``image_px``, 1-px white gutters, before
    :func:`grid_scale`."""
    side = int(np.ceil(np.sqrt(per_cell)))
    return side * (image_px + 1) + 1


def image_grid_png(path: str | Path, samples: dict[str, dict[str, np.ndarray]], columns: list[str],
                   reference: np.ndarray, per_cell: int = 36) -> None:
    """Rows: experiments; columns: sweep entries (e.g. euler-1 … euler-50) and the real images. Each cell
    is a square tile of the first ``per_cell`` uint8 NHWC images, enlarged by :func:`grid_scale` (nearest)."""
    side = int(np.ceil(np.sqrt(per_cell)))
    scale = grid_scale(grid_tile_px(per_cell, reference.shape[1]))

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


# --- like-for-like comparisons -------------------------------------------------------------------------------

PLAIN_SOURCES = ("gaussian", "toy")  # N(0, I), or a fixed toy distribution (the C2OT harness's 8 Gaussians)
PARENT_COUPLINGS = ("independent", "mode")  # couplings that keep x0 with its own draw (no re-ordering)
HEADLINE_LABELS = {"w2sq": "W2²", "fd": "FD"}
BEST = "highest NFE"  # the image tables' third column: the highest-NFE entry both runs have FD for


def experiments(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, experiment): its :data:`KEYS` and the number of seeds with metrics."""
    return keyed(df).groupby(KEYS).seed.nunique().rename("seeds").reset_index()


def _is_plain_fm(e: Any) -> bool:
    """Plain flow matching: a plain source, the independent coupling, not a reflow."""
    return e.source in PLAIN_SOURCES and e.coupling == "independent" and not e.reflow_from


def _is_combined(e: Any) -> bool:
    """A non-plain source (GMM, learned) with a re-ordering coupling (OT, LOOM, C2OT), e.g. gmm + loom."""
    return (e.source not in (*PLAIN_SOURCES, "") and e.coupling not in (*PARENT_COUPLINGS, "reflow", "")
            and not e.reflow_from)


def plain_source(exps: pd.DataFrame, dataset: str) -> str | None:
    """The dataset's plain source: that of its plain-FM experiment (unconditional and labelled fm preferred);
    None when the dataset has no plain FM."""
    cands = [e for e in exps[exps.dataset == dataset].itertuples() if _is_plain_fm(e)]
    best = min(cands, key=lambda e: (e.conditioning != "none", e.method != "fm", e.source != "gaussian",
                                     e.experiment), default=None)
    return None if best is None else best.source


def _experiment_info(df: pd.DataFrame, dataset: str) -> dict[str, Any]:
    """experiment → its row of :func:`experiments` (a named tuple) for one dataset."""
    exps = experiments(df)
    return {e.experiment: e for e in exps[exps.dataset == dataset].itertuples()}


def _describe(e: Any) -> str:
    return f"{e.experiment} ({e.source} source, {e.coupling} coupling, conditioning {e.conditioning})"


def match_baselines(df: pd.DataFrame) -> pd.DataFrame:
    """Each experiment's like-for-like baseline: the experiment on the same dataset with the same
    conditioning, a plain source (the experiment's own when that is plain, else the dataset's
    :func:`plain_source`) and the independent coupling, not a reflow. Mode conditioning (the mode x0 was drawn
    from, which only a GMM source has) is compared with the unconditional plain FM, and the note says so.
    Columns: dataset, experiment, baseline ("" when the config has none), note (why none, or the
    conditioning difference). Plain FMs (the baselines) and reflow experiments (see :func:`match_reflows`)
    get no row."""
    exps = experiments(df)
    rows = []
    for e in exps.itertuples():
        if _is_plain_fm(e) or e.reflow_from:
            continue
        row = {"dataset": e.dataset, "experiment": e.experiment, "baseline": "", "note": ""}
        rows.append(row)
        if "" in (e.source, e.coupling, e.conditioning):
            row["note"] = "combination not recorded (metrics from before evaluate recorded it; re-run evaluate)"
            continue
        plain = [c for c in exps[exps.dataset == e.dataset].itertuples() if _is_plain_fm(c)]
        src = e.source if e.source in PLAIN_SOURCES else plain_source(exps, e.dataset)
        conds = ["mode", "none"] if e.conditioning == "mode" else [e.conditioning]
        cands = [c for c in plain if c.source == src and c.conditioning in conds]
        b = min(cands, key=lambda c: (conds.index(c.conditioning), c.method != "fm", c.experiment), default=None)
        if b is not None:
            row["baseline"] = b.experiment
            if b.conditioning != e.conditioning:
                row["note"] = "mode conditioning comes with the GMM source: compared with the unconditional FM"
            continue
        row["note"] = (f"no {src or 'plain'}-source, independent-coupling experiment with conditioning "
                       f"{' or '.join(conds)} on {e.dataset}")
        row["note"] += (" (plain FMs there: " + ", ".join(f"{c.experiment} ({c.source} source, conditioning "
                                                          f"{c.conditioning})" for c in plain) + ")") if plain else \
            " (it has no plain FM at all)"
    return pd.DataFrame(rows, columns=["dataset", "experiment", "baseline", "note"])


def match_reflows(df: pd.DataFrame) -> pd.DataFrame:
    """Reflow experiments and their base (``reflow_from``). Columns: dataset, experiment, base, note (when the
    base has no metrics in the report)."""
    exps = experiments(df)
    rows = []
    for e in exps[exps.reflow_from != ""].itertuples():
        present = ((exps.dataset == e.dataset) & (exps.experiment == e.reflow_from)).any()
        rows.append({"dataset": e.dataset, "experiment": e.experiment, "base": e.reflow_from,
                     "note": "" if present else f"its base {e.reflow_from} has no metrics in this report"})
    return pd.DataFrame(rows, columns=["dataset", "experiment", "base", "note"])


def combination_parents(df: pd.DataFrame) -> pd.DataFrame:
    """The two parents of each combined experiment (a non-plain source with a re-ordering coupling, e.g.
    gmm + loom): the source parent (same source, independent or mode coupling, e.g. mmfm) and the coupling
    parent (a plain source, same coupling, e.g. loom), neither a reflow, same conditioning preferred.
    Columns: dataset, experiment, source_parent, coupling_parent ("" when the config has none)."""
    exps = experiments(df)
    rows = []
    for e in exps.itertuples():
        if not _is_combined(e):
            continue
        same = [c for c in exps[exps.dataset == e.dataset].itertuples() if not c.reflow_from]
        sp = min((c for c in same if c.source == e.source and c.coupling in PARENT_COUPLINGS),
                 key=lambda c: (c.conditioning != e.conditioning, c.coupling != "mode", c.experiment), default=None)
        ps = plain_source(exps, e.dataset)
        cp = min((c for c in same if c.source in PLAIN_SOURCES and c.coupling == e.coupling),
                 key=lambda c: (c.conditioning != e.conditioning, c.source != ps, c.experiment), default=None)
        rows.append({"dataset": e.dataset, "experiment": e.experiment,
                     "source_parent": "" if sp is None else sp.experiment,
                     "coupling_parent": "" if cp is None else cp.experiment})
    return pd.DataFrame(rows, columns=["dataset", "experiment", "source_parent", "coupling_parent"])


def entry_stats(df: pd.DataFrame, metric: str) -> dict[tuple[str, str, str], pd.Series]:
    """(dataset, experiment, sweep entry) → mean, std and count over seeds of ``metric``, and the mean NFE."""
    d = df[df.metric == metric].copy()
    d["entry"] = [_sweep_label(s, k) for s, k in zip(d.solver, d.steps, strict=True)]
    g = d.groupby(["dataset", "experiment", "entry"]).agg(mean=("value", "mean"), std=("value", "std"),
                                                            count=("value", "count"), nfe=("nfe", "mean"))
    return {k: r for k, r in g.iterrows()}


def headline(df: pd.DataFrame, dataset: str) -> tuple[str, list[str]] | None:
    """The metric and sweep entries a dataset's comparisons report: W2² at euler-1, euler-2 and dopri5 for toy
    data; FD at euler-1, euler-2 and the highest-NFE entry with FD (:data:`BEST`) for images."""
    metrics = set(df[df.dataset == dataset].metric)
    if "w2sq" in metrics:
        return "w2sq", ["euler-1", "euler-2", "dopri5"]
    if "fd" in metrics:
        return "fd", ["euler-1", "euler-2", BEST]
    return None


def _num(x: float, scale: float | None = None) -> str:
    """3 decimals, or 1 when ``scale`` (default ``x``) is 100 or more (FDs of hundreds)."""
    return f"{x:.{3 if abs(x if scale is None else scale) < 100 else 1}f}"


def _mean_std(s: pd.Series) -> str:
    std = f" ± {_num(s['std'], s['mean'])}" if s["count"] > 1 and pd.notna(s["std"]) else ""
    return _num(s["mean"]) + std


def _change(base: float, new: float) -> str:
    """Relative change (new − base) / base as a signed percentage (typographic minus)."""
    return "n/a" if base == 0 else f"{(new - base) / base:+.1%}".replace("-", "−")


def compare_cell(base: pd.Series | None, exp: pd.Series | None, nfe: bool = False) -> str:
    """``baseline → experiment (relative change)``, each mean ± std over seeds; "—" when either is missing."""
    if base is None or exp is None:
        return "—"
    cell = f"{_mean_std(base)} → {_mean_std(exp)} ({_change(base['mean'], exp['mean'])})"
    return cell + (f"; NFE {base['nfe']:.0f} → {exp['nfe']:.0f}" if nfe else "")


def _pair_cells(stats: dict, dataset: str, base: str, exp: str, entries: list[str]) -> list[str]:
    cells = []
    for entry in entries:
        if entry == BEST:
            have = [{k[2] for k in stats if k[:2] == (dataset, x)} for x in (base, exp)]
            common = (have[0] & have[1]) - set(entries)
            top = max(common, key=lambda t: (stats[(dataset, exp, t)]["nfe"], t), default=None)
            cells.append("—" if top is None else
                         f"{top}: " + compare_cell(stats[(dataset, base, top)], stats[(dataset, exp, top)],
                                                   nfe=top.startswith("dopri5")))
        else:
            cells.append(compare_cell(stats.get((dataset, base, entry)), stats.get((dataset, exp, entry)),
                                      nfe=entry.startswith("dopri5")))
    return cells


def _drop_empty_columns(t: pd.DataFrame) -> pd.DataFrame:
    return t[[c for c in t.columns if not (t[c] == "—").all()]]


def baseline_table(df: pd.DataFrame, dataset: str) -> tuple[pd.DataFrame, list[str]]:
    """The dataset's experiments against their like-for-like baselines (:func:`match_baselines`) at the
    :func:`headline` entries, and one line per experiment without a baseline."""
    head = headline(df, dataset)
    matches = match_baselines(df)
    matches = matches[matches.dataset == dataset]
    info = _experiment_info(df, dataset)
    missing = [f"{_describe(info[r.experiment])}: {r.note}" for r in matches.itertuples() if not r.baseline]
    rows = []
    if head is not None:
        metric, entries = head
        stats = entry_stats(df, metric)
        label = HEADLINE_LABELS.get(metric, metric)
        for r in matches[matches.baseline != ""].itertuples():
            e = info[r.experiment]
            row = {"experiment": r.experiment, "source / coupling / conditioning":
                   f"{e.source} / {e.coupling} / {e.conditioning}", "baseline": r.baseline}
            cells = _pair_cells(stats, dataset, r.baseline, r.experiment, entries)
            row.update({f"{label} {'at the highest NFE' if en == BEST else en}": c
                        for en, c in zip(entries, cells, strict=True)})
            row["note"] = r.note
            rows.append(row)
    t = pd.DataFrame(rows)
    if len(t):
        t = _drop_empty_columns(t)
        if not t.note.astype(bool).any():
            t = t.drop(columns="note")
    return t, missing


def reflow_table(df: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """Reflow experiments against their base at euler-1 and euler-2, and whether one Euler step improves."""
    head = headline(df, dataset)
    rf = match_reflows(df)
    rf = rf[(rf.dataset == dataset) & (rf.note == "")]
    if head is None or rf.empty:
        return pd.DataFrame()
    metric = head[0]
    label = HEADLINE_LABELS.get(metric, metric)
    stats = entry_stats(df, metric)
    rows = []
    for r in rf.itertuples():
        b1, e1 = stats.get((dataset, r.base, "euler-1")), stats.get((dataset, r.experiment, "euler-1"))
        row = {"experiment": r.experiment, "base": r.base}
        for entry in ("euler-1", "euler-2"):
            row[f"{label} {entry}"] = compare_cell(stats.get((dataset, r.base, entry)),
                                                   stats.get((dataset, r.experiment, entry)))
        row[f"1-step {label} improves?"] = ("—" if b1 is None or e1 is None
                                            else "yes" if e1["mean"] < b1["mean"] else "no")
        rows.append(row)
    return pd.DataFrame(rows)


def _verdict(stats: dict, dataset: str, exp: str, parents: list[str], entry: str) -> tuple[str, str]:
    """(kind, text) of how ``exp`` fares against ``parents`` at one entry: kind is both, some, neither or
    missing; text lists the means."""
    mine = stats.get((dataset, exp, entry))
    theirs = {p: stats.get((dataset, p, entry)) for p in parents}
    gone = [p for p, s in theirs.items() if s is None] + ([exp] if mine is None else [])
    if gone:
        return "missing", f"at {entry} not comparable (no value for {', '.join(gone)})"
    beaten = [p for p in parents if mine["mean"] < theirs[p]["mean"]]
    values = f"{_num(mine['mean'])} vs " + ", ".join(f"{p} {_num(theirs[p]['mean'])}" for p in parents)
    if len(beaten) == len(parents):
        return "both", f"{entry}: beats both ({values})"
    if beaten:
        lost = [p for p in parents if p not in beaten]
        return "some", f"{entry}: beats only {', '.join(beaten)}, not {', '.join(lost)} ({values})"
    return "neither", f"{entry}: beats neither parent ({values})"


def combination_sentences(df: pd.DataFrame, dataset: str) -> list[str]:
    """One markdown bullet per combined experiment of the dataset: whether it beats BOTH of its parents
    (:func:`combination_parents`) at 1 and 2 Euler steps, by the mean over seeds of the headline metric."""
    head = headline(df, dataset)
    par = combination_parents(df)
    par = par[par.dataset == dataset]
    if head is None or par.empty:
        return []
    metric = head[0]
    label = HEADLINE_LABELS.get(metric, metric)
    stats = entry_stats(df, metric)
    info = _experiment_info(df, dataset)
    lines = []
    for r in par.itertuples():
        e = info[r.experiment]
        who = f"**{r.experiment}** ({e.source} source + {e.coupling} coupling, conditioning {e.conditioning})"
        named, absent = [], []
        for parent, role, kind in ((r.source_parent, "same source", f"{e.source} source with the independent or "
                                    "mode coupling"), (r.coupling_parent, "same coupling",
                                                       f"plain source with the {e.coupling} coupling")):
            if not parent:
                absent.append(kind)
                continue
            p = info[parent]
            diff = "" if p.conditioning == e.conditioning else \
                f"; conditioned on {p.conditioning}, not {e.conditioning}"
            named.append(f"{parent} ({role}: {p.source} source, {p.coupling} coupling{diff})")
        parents = [p for p in (r.source_parent, r.coupling_parent) if p]
        if absent:
            lines.append(f"- {who}: cannot be checked against both parents — the config has no "
                         f"{' and no '.join(absent)}" + (f" (the other parent: {named[0]})" if named else "") + ".")
            continue
        verdicts = [_verdict(stats, dataset, r.experiment, parents, en) for en in ("euler-1", "euler-2")]
        if all(k == "both" for k, _ in verdicts):
            lead = "beats both parents at 1 and 2 Euler steps"
        else:
            lead = "does not beat both parents at 1 and 2 Euler steps"
        lines.append(f"- {who} {lead}. Mean {label} at {'; '.join(t for _, t in verdicts)}. "
                     f"Parents: {' and '.join(named)}.")
    return lines


def comparison_lines(df: pd.DataFrame) -> list[str]:
    """The summary's like-for-like section: per dataset the table against each experiment's own baseline,
    experiments without one, reflow against its base, and the combined experiments against their parents."""
    df = keyed(df)
    exps = experiments(df)
    lines = ["## Like-for-like comparisons", "",
             "Each experiment against its own baseline: plain flow matching on the same dataset with the same "
             "conditioning — a plain source (N(0, I) for images; for toy data the source of the dataset's plain FM, "
             "e.g. the 8 Gaussians) and the independent coupling, not a reflow. A mode-conditioned experiment (the "
             "mode its x0 was drawn from, which only a GMM source has) is compared with the unconditional FM. Cells: "
             "baseline → experiment, each the mean ± std over seeds, and the relative change (experiment − baseline) "
             "/ baseline. W2² (toy data, to held-out points) and FD (images, to the reference feature "
             "statistics) are distances: lower is better, so a negative change is an improvement. dopri5 cells also "
             "give the mean NFE of both runs.", ""]
    for ds in sorted(exps.dataset.unique()):
        head = headline(df, ds)
        if head is None:
            continue
        metric = head[0]
        label = HEADLINE_LABELS.get(metric, metric)
        lines += [f"### {ds}: {label} against the like-for-like baseline", ""]
        table, missing = baseline_table(df, ds)
        if len(table):
            lines += [table.to_markdown(index=False), ""]
        base = sorted({b for b in match_baselines(df).query("dataset == @ds").baseline if b})
        if base:
            lines += ["Baselines (plain source, independent coupling): " + ", ".join(
                _describe(e) for e in exps[(exps.dataset == ds) & exps.experiment.isin(base)].itertuples()) + ".", ""]
        if missing:
            lines += ["No like-for-like baseline in the config (not compared, rather than compared with a "
                      "differently conditioned or differently sourced run):", "", *[f"- {m}" for m in missing], ""]
        rf = reflow_table(df, ds)
        orphans = match_reflows(df).query("dataset == @ds and note != ''")
        if len(rf) or len(orphans):
            lines += [f"#### {ds}: reflow against its base (does the 1-step {label} improve?)", ""]
            if len(rf):
                lines += [rf.to_markdown(index=False), ""]
            lines += [f"- {r.experiment}: {r.note}." for r in orphans.itertuples()]
            lines += [""] * bool(len(orphans))
        combined = combination_sentences(df, ds)
        if not (len(table) or missing or len(rf) or len(orphans) or combined):
            lines += [f"Only plain-FM runs on {ds}: nothing to compare.", ""]
        if combined:
            lines += [f"#### {ds}: combined source and coupling against both parents", "",
                      f"By the mean {label} over seeds at 1 and 2 Euler steps (lower is better); the parents are the "
                      "run with the same source and an independent or mode coupling, and the run with a plain source "
                      "and the same coupling.", "", *combined, ""]
    return lines


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


def _sweep(t: pd.DataFrame) -> pd.DataFrame:
    """A :func:`summary_table` for one dataset as shown: the combination is in the experiments table."""
    return t.drop(columns=["dataset", *COMBINATION])


def experiments_table(df: pd.DataFrame) -> pd.DataFrame:
    """dataset, experiment, method label, source, coupling, conditioning, reflow base (when any) and seeds."""
    t = experiments(keyed(df)).rename(columns={"reflow_from": "reflow from"})
    t = t.replace({"source": {"": "?"}, "coupling": {"": "?"}, "conditioning": {"": "?"}})
    return t if (t["reflow from"] != "").any() else t.drop(columns="reflow from")


def write_summary(path: str | Path, df: pd.DataFrame, floors: dict[str, float] | None = None,
                  fd_floors: dict[str, float] | None = None) -> None:
    """Markdown: each experiment against its like-for-like baseline (reflow against its base, combined
    experiments against their parents); the experiments and their combinations; per toy dataset the W2² table
    over the sweep; per image dataset FD, precision, recall and class-coverage tables; then straightness and
    coupling cost per experiment."""
    df = keyed(df)
    lines = ["# sourceflow report", "", *comparison_lines(df), "## Experiments", "",
             "What each experiment combines (the method is only the label of a named combination); "
             "? = not recorded by an older evaluate.", "", experiments_table(df).to_markdown(index=False), ""]
    toy = df[df.dataset.isin(df[df.metric == "w2sq"].dataset.unique())]
    for ds, t in (summary_table(toy).groupby("dataset") if len(toy) else []):
        lines += [f"## {ds}", "", "W2² between generated samples and held-out data (exact EMD), mean ± std over "
                  "seeds; dopri5 shows its mean NFE. Lower is better.", "", _sweep(t).to_markdown(index=False), ""]
        if floors and ds in floors:
            lines += [f"Data floor: W2² between two independent samples of the data at the same size is "
                      f"{floors[ds]:.4f}; a perfect generator scores about this.", ""]
    for ds in sorted(df[df.metric == "fd"].dataset.unique()):
        d = df[df.dataset == ds]
        lines += [f"## {ds} (images)", ""]
        for metric, text in IMAGE_TABLES:
            if (d.metric == metric).any():
                lines += [text, "", _sweep(summary_table(d, metric)).to_markdown(index=False), ""]
        if fd_floors and ds in fd_floors:
            lines += [f"Data floor: FD of the held-out real images to the same statistics is {fd_floors[ds]:.3f} "
                      "(finite-sample FD of real data; a perfect generator scores about this at that sample size).", ""]
    pe = run_means(df, "path_energy", "dopri5")
    cc = run_means(df, "coupling_cost", "dopri5")
    if len(pe):
        t = pe.merge(cc, on=KEYS, suffixes=("_pe", "_cc"))
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
                  summary_table(df, "w2sq_cond_mean").drop(columns=COMBINATION).to_markdown(index=False), ""]
    write_text(path, "\n".join(lines))
