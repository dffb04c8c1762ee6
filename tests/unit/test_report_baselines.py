"""The report's like-for-like comparisons: each experiment against the plain FM with its own conditioning
(a missing one is said to be missing), reflow against its base, combined source + coupling experiments
against both parents, and the combination columns in records and metrics.csv."""

from __future__ import annotations

import json
import re
import runpy
import sys
from pathlib import Path

import pandas as pd
import pytest
from snakemake.utils import validate

from sourceflow.config import resolve_experiments
from sourceflow.report import (
    COLUMNS,
    combination_parents,
    combination_sentences,
    compare_cell,
    grid_entries,
    match_baselines,
    match_reflows,
    metrics_frame,
    reflow_table,
    write_summary,
)

ROOT = Path(__file__).resolve().parents[2]
TOY = [("euler", 1, 1), ("euler", 2, 2), ("dopri5", None, 30)]
IMAGE = [("euler", 1, 1), ("euler", 2, 2), ("euler", 4, 4), ("dopri5", None, 50), ("euler", 50, 50)]


def runs(dataset: str, exp: str, combo: tuple[str, str, str], values: dict[str, float], method: str = "fm",
         reflow: str = "", seeds: tuple[int, ...] = (0, 1), image: bool = False) -> list[dict]:
    """Metrics records of one experiment: ``values`` maps a sweep entry to its mean over seeds (seed s adds
    (s − mean seed)·0.01, so the mean is exact); an entry without a value has no headline metric."""
    source, coupling, conditioning = combo
    out = []
    for s in seeds:
        for solver, steps, nfe in IMAGE if image else TOY:
            entry = solver if steps is None else f"{solver}-{steps}"
            mt = {"nfe": nfe, "path_energy": 0.1, "coupling_cost": 1.0}
            if entry in values:
                mt["fd" if image else "w2sq"] = values[entry] + (s - (len(seeds) - 1) / 2) * 0.01
            out.append({"dataset": dataset, "experiment": exp, "method": method, "source": source,
                        "coupling": coupling, "conditioning": conditioning, "reflow_from": reflow, "solver": solver,
                        "steps": steps, "nfe": nfe, "seed": s, "metrics": mt})
    return out


def w2(e1: float, e2: float, d: float = 0.1) -> dict[str, float]:
    return {"euler-1": e1, "euler-2": e2, "dopri5": d}


def moons() -> pd.DataFrame:
    """A toy dataset whose plain FM uses the 8-Gaussians toy source, with baselines for two conditionings."""
    recs = [*runs("moons", "fm", ("toy", "independent", "none"), w2(1.0, 0.6)),
            *runs("moons", "fm-label", ("toy", "independent", "label"), w2(0.8, 0.5)),
            *runs("moons", "c2ot", ("toy", "c2ot", "label"), w2(0.4, 0.3), method="c2ot"),
            *runs("moons", "c2ot-x", ("toy", "c2ot", "xcoord"), w2(0.45, 0.3), method="c2ot"),
            *runs("moons", "csfm", ("learned", "independent", "label"), w2(0.7, 0.45), method="csfm"),
            *runs("moons", "mmfm", ("gmm", "mode", "mode"), w2(0.55, 0.40), method="mmfm"),
            *runs("moons", "otcfm-gauss", ("gaussian", "ot", "none"), w2(0.7, 0.5), method="otcfm"),
            *runs("moons", "loom", ("toy", "loom", "none"), w2(0.5, 0.35), method="loom"),
            # beats both parents at 1 and 2 steps
            *runs("moons", "gmm-loom", ("gmm", "loom", "none"), w2(0.45, 0.30), method="loom"),
            # beats loom only at 1 step, neither at 2
            *runs("moons", "gmm-ot", ("gmm", "ot", "mode"), w2(0.6, 0.45), method="otcfm"),
            *runs("moons", "otcfm", ("toy", "ot", "none"), w2(0.65, 0.41), method="otcfm"),
            *runs("moons", "loom-reflow", ("toy", "reflow", "none"), w2(0.3, 0.4), method="loom", reflow="loom"),
            *runs("moons", "c2ot-reflow", ("toy", "reflow", "label"), w2(0.5, 0.2), method="c2ot", reflow="c2ot"),
            # a reflow whose coupling string says independent is still not a baseline
            *runs("moons", "fm-reflow", ("toy", "independent", "none"), w2(0.1, 0.1), reflow="fm")]
    return metrics_frame(recs)


def test_each_experiment_gets_the_plain_fm_with_its_own_conditioning():
    m = match_baselines(moons()).set_index("experiment")
    assert m.loc["c2ot", "baseline"] == "fm-label"  # class-conditional against class-conditional, not fm
    assert m.loc["csfm", "baseline"] == "fm-label"  # a learned source against the dataset's plain (toy) source
    assert m.loc["loom", "baseline"] == "fm" and m.loc["gmm-loom", "baseline"] == "fm"
    assert m.loc["mmfm", "baseline"] == "fm" and "unconditional" in m.loc["mmfm", "note"]
    # plain FMs are the baselines and reflows are compared with their base: no rows of their own
    assert not {"fm", "fm-label", "loom-reflow", "fm-reflow"} & set(m.index)


def test_a_missing_baseline_is_reported_not_substituted():
    m = match_baselines(moons()).set_index("experiment")
    # no x-coordinate-conditioned plain FM: not silently compared with the unconditional or the label one
    assert m.loc["c2ot-x", "baseline"] == ""
    assert "conditioning xcoord" in m.loc["c2ot-x", "note"] and "fm-label" in m.loc["c2ot-x", "note"]
    # a Gaussian-source OT run on a dataset whose plain FM starts from the toy source has no like-for-like FM
    assert m.loc["otcfm-gauss", "baseline"] == ""
    assert "no gaussian-source" in m.loc["otcfm-gauss", "note"]
    # ... and none at all on a dataset without a plain FM
    alone = metrics_frame(runs("other", "c2ot", ("gaussian", "c2ot", "label"), w2(0.4, 0.3)))
    assert match_baselines(alone).baseline.tolist() == [""]
    assert "no plain FM" in match_baselines(alone).note[0]


def test_reflow_compares_with_its_base_at_one_and_two_steps():
    df = moons()
    rf = match_reflows(df).set_index("experiment")
    assert rf.loc["loom-reflow", "base"] == "loom" and rf.loc["c2ot-reflow", "base"] == "c2ot"
    t = reflow_table(df, "moons").set_index("experiment")
    assert t.loc["loom-reflow", "1-step W2² improves?"] == "yes"  # 0.5 → 0.3
    assert t.loc["c2ot-reflow", "1-step W2² improves?"] == "no"  # 0.4 → 0.5
    assert t.loc["loom-reflow", "W2² euler-1"].startswith("0.500 ± 0.007 → 0.300 ± 0.007 (−40.0%)")
    assert t.loc["loom-reflow", "W2² euler-2"].endswith("(+14.3%)")  # 0.35 → 0.4
    orphan = metrics_frame(runs("moons", "r", ("toy", "reflow", "none"), w2(0.3, 0.2), reflow="gone"))
    assert "gone has no metrics" in match_reflows(orphan).note[0]
    assert reflow_table(orphan, "moons").empty


def test_combined_experiments_against_both_parents():
    df = moons()
    par = combination_parents(df).set_index("experiment")
    assert set(par.index) == {"gmm-loom", "gmm-ot"}  # not mmfm (mode coupling) nor csfm (independent)
    assert par.loc["gmm-loom"].tolist() == ["moons", "mmfm", "loom"]
    assert par.loc["gmm-ot"].tolist() == ["moons", "mmfm", "otcfm"]  # otcfm (toy, the plain source) over otcfm-gauss
    lines = {re.search(r"\*\*(.+?)\*\*", s).group(1): s for s in combination_sentences(df, "moons")}
    both = lines["gmm-loom"]
    assert "beats both parents at 1 and 2 Euler steps" in both
    assert "euler-1: beats both (0.450 vs mmfm 0.550, loom 0.500)" in both
    assert "conditioned on mode, not none" in both  # the source parent's conditioning differs: named
    some = lines["gmm-ot"]
    assert "does not beat both parents" in some
    assert "euler-1: beats only otcfm, not mmfm" in some  # 0.6 vs mmfm 0.55, otcfm 0.65
    assert "euler-2: beats neither parent" in some  # 0.45 vs 0.40 and 0.41
    assert "conditioned on none, not mode" in some


def test_a_combined_experiment_with_one_parent_says_which_is_missing():
    df = metrics_frame([*runs("moons", "fm", ("toy", "independent", "none"), w2(1.0, 0.6)),
                        *runs("moons", "loom", ("toy", "loom", "none"), w2(0.5, 0.35)),
                        *runs("moons", "gmm-loom", ("gmm", "loom", "none"), w2(0.45, 0.30))])
    (line,) = combination_sentences(df, "moons")
    assert "cannot be checked against both parents" in line and "no gmm source with the independent or mode" in line
    assert "loom (same coupling" in line


def test_compare_cell_is_baseline_to_experiment_with_the_relative_change():
    base = pd.Series({"mean": 2.0, "std": 0.1, "count": 3, "nfe": 40.0})
    exp = pd.Series({"mean": 1.5, "std": float("nan"), "count": 1, "nfe": 26.0})
    assert compare_cell(base, exp) == "2.000 ± 0.100 → 1.500 (−25.0%)"
    assert compare_cell(base, exp, nfe=True).endswith("; NFE 40 → 26")
    assert compare_cell(None, exp) == "—"


def images() -> pd.DataFrame:
    fd = {"euler-1": 300.0, "euler-2": 200.0, "euler-4": 120.0, "dopri5": 60.0}
    return metrics_frame([
        *runs("digits", "digits-fm", ("gaussian", "independent", "none"), fd, image=True),
        *runs("digits", "digits-mmfm", ("gmm", "mode", "mode"), {k: v / 2 for k, v in fd.items()}, "mmfm", image=True),
        *runs("digits", "digits-csfm", ("learned", "independent", "text"), fd, "csfm", image=True)])


def tables(md: str) -> list[list[str]]:
    """The markdown tables of a document, each as its lines."""
    out, cur = [], []
    for line in [*md.splitlines(), ""]:
        if line.startswith("|"):
            cur.append(line)
        elif cur:
            out.append(cur)
            cur = []
    return out


def test_summary_reads_as_a_like_for_like_comparison(tmp_path):
    df = pd.concat([moons(), images()], ignore_index=True)
    write_summary(tmp_path / "summary.md", df)
    md = (tmp_path / "summary.md").read_text()
    assert md.index("## Like-for-like comparisons") < md.index("## moons")
    assert "lower is better" in md and "### moons: W2² against the like-for-like baseline" in md
    assert "### digits: FD against the like-for-like baseline" in md
    # images: FD at euler-1, euler-2 and the highest-NFE entry with FD (dopri5 here; euler-50 has no FD)
    row = next(ln for ln in md.splitlines() if ln.startswith("| digits-mmfm"))
    assert "300.0 ± 0.0 → 150.0 ± 0.0 (−50.0%)" in row and "dopri5: 60.000 ± 0.007 → 30.000" in row
    assert "- digits-csfm (learned source, independent coupling, conditioning text): no gaussian-source" in md
    assert "- c2ot-x (toy source, c2ot coupling, conditioning xcoord)" in md
    assert "reflow against its base (does the 1-step W2² improve?)" in md
    assert "combined source and coupling against both parents" in md
    for t in tables(md):  # every table has a header, a rule and at least one row; no NaN leaks into cells
        assert len(t) >= 3, t
    assert not re.search(r"\bnan\b", md, re.I)


def test_old_records_without_the_combination_still_report():
    rec = runs("moons", "fm", ("", "", ""), w2(1.0, 0.6))
    for r in rec:
        for k in ("source", "coupling", "conditioning", "reflow_from"):
            del r[k]
    df = metrics_frame(rec)
    assert list(df.columns) == COLUMNS and (df[["source", "coupling", "conditioning", "reflow_from"]] == "").all().all()
    assert "combination not recorded" in match_baselines(df).note[0]


def test_evaluate_records_and_metrics_csv_carry_the_combination(tmp_path, monkeypatch, capsys):
    cfg = {"datasets": {"moons": {"kind": "toy", "distribution": "moons", "n_train": 512, "n_test": 256}},
           "experiments": [{"name": "mm-loom", "method": "loom", "data": "moons", "conditioning": "mode",
                            "source": {"kind": "gmm", "components": 4}},
                           {"name": "fm", "method": "fm", "data": "moons"},
                           {"name": "fm-reflow", "method": "fm", "data": "moons",
                            "reflow": {"experiment": "fm", "num_pairs": 200}}]}
    validate(cfg, str(ROOT / "workflow" / "schemas" / "config.schema.yaml"))
    specs = resolve_experiments(cfg)
    identity = runpy.run_path(str(ROOT / "stages" / "evaluate.py"), run_name="evaluate")["record_identity"]
    assert identity(specs["mm-loom"]) == {"dataset": "moons", "experiment": "mm-loom", "method": "loom",
                                          "source": "gmm", "coupling": "loom", "conditioning": "mode",
                                          "reflow_from": ""}
    rf = identity(specs["fm-reflow"])
    assert (rf["coupling"], rf["reflow_from"]) == ("reflow", "fm")
    dirs = []
    for name, spec in specs.items():
        d = tmp_path / name / "seed0"
        (d / "metrics").mkdir(parents=True)
        recs = [{**identity(spec), "solver": s, "steps": k, "nfe": n, "seed": 0,
                 "metrics": {"w2sq": 0.5, "nfe": n}} for s, k, n in TOY]
        (d / "metrics" / "all.json").write_text(json.dumps(recs))
        dirs.append(d)
    monkeypatch.setattr(sys, "argv", ["report.py", "--runs", *map(str, dirs), "--out", str(tmp_path / "report")])
    runpy.run_path(str(ROOT / "stages" / "report.py"), run_name="__main__")
    capsys.readouterr()
    csv = pd.read_csv(tmp_path / "report" / "metrics.csv", keep_default_na=False)
    assert list(csv.columns) == COLUMNS
    combos = set(csv[["experiment", "source", "coupling", "conditioning", "reflow_from"]].itertuples(index=False))
    assert combos == {("mm-loom", "gmm", "loom", "mode", ""), ("fm", "gaussian", "independent", "none", ""),
                      ("fm-reflow", "gaussian", "reflow", "none", "fm")}
    md = (tmp_path / "report" / "summary.md").read_text()
    assert re.search(r"^\| mm-loom +\| gmm / loom / mode +\| fm +\| 0\.500 → 0\.500 \(\+0\.0%\)", md, re.M)
    assert re.search(r"^\| fm-reflow +\| fm +\| 0\.500 → 0\.500 \(\+0\.0%\) .*\| no +\|$", md, re.M)


@pytest.mark.parametrize("missing", ["source", "coupling"])
def test_a_partial_spec_gives_empty_combination(missing):
    identity = runpy.run_path(str(ROOT / "stages" / "evaluate.py"), run_name="evaluate")["record_identity"]
    spec = {"data": "d", "name": "e", "method": "fm", "source": {"kind": "gaussian"},
            "coupling": {"kind": "independent"}, "conditioning": "none"}
    del spec[missing]
    assert identity(spec)["source"] == "" and identity(spec)["reflow_from"] == ""


def test_grid_entries_show_what_was_sampled():
    """The configured Euler counts that were sampled come first, then the other entries by NFE: a config
    that samples Euler 49 only, or midpoint and dopri5 (cifar10-loom), gets its own columns."""
    rows = [("a", "euler", 1, 1), ("a", "euler", 4, 4), ("a", "dopri5", None, 80), ("a", "midpoint", 2, 4),
            ("a", "euler", 49, 49), ("b", "euler", 2, 2)]
    df = pd.DataFrame([{"dataset": d, "experiment": "x", "solver": s, "steps": k, "nfe": n, "metric": "fd",
                        "value": 1.0, "seed": 0} for d, s, k, n in rows])
    df["steps"] = df["steps"].astype("Int64")
    assert grid_entries(df, "a", [1, 2, 4, 50]) == ["euler-1", "euler-4", "midpoint-2", "euler-49", "dopri5"]
    assert grid_entries(df, "a", [1, 2, 4, 50], limit=3) == ["euler-1", "euler-4", "midpoint-2"]
    assert grid_entries(df, "b", [1, 2, 4, 50]) == ["euler-2"]
    assert grid_entries(df, "a", [49], limit=3) == ["euler-1", "euler-4", "euler-49"]  # chosen first, shown by NFE
    assert grid_entries(df, "c", [1]) == []


def test_nfe_plot_names_each_experiment_once_in_its_own_colour_beside_the_panel(monkeypatch, tmp_path):
    """14 experiments: one legend entry each (no per-solver repeats), 14 distinct colours (tab20 past ten), the
    floor and a marker key; the legend lies right of the axes so it hides no curve, and every curve is drawn
    in its experiment's colour."""
    import matplotlib.colors as mcolors

    from sourceflow import report

    figs = []
    monkeypatch.setattr(report, "_save", lambda fig, path: figs.append(fig))
    df = moons()
    report.w2_vs_nfe_png(tmp_path / "w2.png", df, floors={"moons": 0.01})
    ax = figs[0].axes[0]
    leg = ax.get_legend()
    labels = [t.get_text() for t in leg.get_texts()]
    names = sorted(df.experiment.unique())
    assert labels == [*names, "data vs data (floor)", "euler", "dopri5 (mean NFE)"]
    colours = [mcolors.to_hex(h.get_color()) for h in leg.legend_handles[:len(names)]]
    assert len(set(colours)) == len(names) == 14
    drawn = {mcolors.to_hex(line.get_color()) for line in ax.get_lines() if line.get_marker() in ("o", "*")}
    assert drawn == set(colours)
    figs[0].canvas.draw()
    assert leg.get_window_extent().x0 >= ax.get_window_extent().x1
