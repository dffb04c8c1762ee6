"""sourceflow.plan_check: a plan entry matched to its Snakemake benchmark file and compared (synthetic
tsv + entry, no rehearsal run); and the two plan changes the comparison led to (the report's sample-grid
terms; the sample forward of a continuous toy condition)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from sourceflow import plan, plan_check
from sourceflow.plan import Entry, IOAssumptions, Job, Throughput

ROOT = Path(__file__).resolve().parents[2]
HEAD = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def _tsv(path: Path, *rows: tuple[float, float, float]) -> Path:
    """A benchmark file with rows of (s, max_rss MiB, cpu_time)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEAD + "".join(f"{s}\t0:00:00\t{rss}\t1\t1\t1\t0\t0\t50\t{cpu}\n" for s, rss, cpu in rows))
    return path


def _entry(job: Job, host: float, gpus: int = 0, terms: dict | None = None, hours: float = 0.001) -> Entry:
    return Entry(job.rule, job.what, job.dataset, job.experiment, gpus, None, host, 0.0, 0.0, hours,
                 "fp32" if gpus else "cpu", "compute", {}, local=job.local, terms=terms or {})


def test_read_benchmark_takes_the_peak_and_mean(tmp_path: Path) -> None:
    m = plan_check.read_benchmark(_tsv(tmp_path / "b.tsv", (2.0, 500.0, 1.5), (4.0, 700.0, 2.5)))
    assert m.s == 3.0 and m.max_rss_mib == 700.0 and m.cpu_s == 2.0
    assert m.rss_gb == pytest.approx(700 * 2**20 / 1e9)
    (tmp_path / "empty.tsv").write_text(HEAD)
    assert plan_check.read_benchmark(tmp_path / "empty.tsv") is None


def test_templates_of_the_workflow_rules() -> None:
    t = plan_check.benchmark_templates(ROOT / "workflow" / "rules")
    assert t["train"] == "{results}/benchmarks/{dataset}/{exp}/seed{seed}/train.tsv"
    assert t["fit_cls_gmm"] == "{results}/benchmarks/{dataset}/{encoder}/fit_cls_gmm_K{K}.tsv"
    job = Job("embed_captions", dataset="imagenet256", text_encoder="clip")
    assert plan_check.benchmark_path(job, t, "res") == "res/benchmarks/imagenet256/embed_captions_clip.tsv"
    # every rule the plan enumerates has a benchmark file except the target rule
    rules = {r for r in plan.rule_resources(ROOT / "workflow" / "rules")}
    assert rules - set(t) == set()


def test_compare_ratios_swaps_notes_and_unplanned(tmp_path: Path) -> None:
    templates = {"train": "{results}/benchmarks/{dataset}/{exp}/seed{seed}/train.tsv",
                 "embed_captions": "{results}/benchmarks/{dataset}/embed_captions_{text_encoder}.tsv",
                 "experiment_spec": "{results}/benchmarks/{dataset}/{exp}/spec_{stage}.tsv",
                 "prepare_data": "{results}/benchmarks/{dataset}/prepare_data.tsv"}
    io = IOAssumptions()
    jobs = [Job("train", dataset="d", experiment="fm", seed=0),
            Job("embed_captions", dataset="d", text_encoder="clip"),
            Job("experiment_spec", dataset="d", experiment="fm", stage="train", local=True),
            Job("prepare_data", dataset="d"),
            Job("report")]
    entries = [_entry(jobs[0], 1.2, hours=1 / 3600),
               _entry(jobs[1], io.process_gb + 0.1, gpus=1, terms={"host": {"process": io.process_gb, "x": 0.1}}),
               _entry(jobs[2], 0.0), _entry(jobs[3], 0.7), _entry(jobs[4], 0.6)]
    gb = 1e9 / 2**20  # MiB per GB
    _tsv(tmp_path / "r/benchmarks/d/fm/seed0/train.tsv", (10.0, 0.8 * gb, 9.0))
    _tsv(tmp_path / "r/benchmarks/d/embed_captions_clip.tsv", (5.0, 0.5 * gb, 5.0))
    _tsv(tmp_path / "r/benchmarks/d/fm/spec_train.tsv", (0.01, 0.43 * gb, 3.0))
    _tsv(tmp_path / "r/benchmarks/d/prepare_data.tsv", (0.5, 0.1 * gb, 0.4))
    _tsv(tmp_path / "r/benchmarks/d/stray.tsv", (1.0, 1.0, 1.0))
    rows, unplanned = plan_check.compare("cfg", entries, jobs, tmp_path, "r", templates, Throughput(), io)
    train, embed, spec, prep, report = rows
    assert train.ratio == pytest.approx(1.2 / 0.8) and train.measured.s == 10.0 and train.plan_time_s == pytest.approx(1)
    assert "CPU at 0.1 TFLOP/s" in train.time_basis
    # a GPU-planned job ran on CPU: the CUDA-process term is swapped for the CPU one
    assert embed.plan_host_gb == pytest.approx(io.cpu_process_gb + 0.1)
    assert embed.ratio == pytest.approx((io.cpu_process_gb + 0.1) / 0.5)
    assert "not comparable" in embed.time_basis and "swapped" in embed.notes[0]
    assert spec.ratio is None and spec.local
    assert prep.short and "lower bound" in prep.notes[0] and prep.ratio == pytest.approx(7.0)
    assert report.measured is None and report.benchmark is None and report.ratio is None
    assert unplanned == ["r/benchmarks/d/stray.tsv"]

    summary = {s.rule: s for s in plan_check.summarise(rows)}
    assert set(summary) == {"train", "embed_captions", "prepare_data"}
    assert [s.rule for s in plan_check.summarise(rows)] == ["prepare_data", "embed_captions", "train"]
    assert summary["prepare_data"].within == 0 and summary["prepare_data"].short == 1
    assert summary["train"].within == 1
    md = plan_check.rows_markdown(rows)
    assert "| cfg | train | fm/seed0 | 1.20 | 0.80 | 1.50 |" in md and "spec_train" not in md
    assert plan_check.local_line(rows).startswith("1 local jobs")
    with pytest.raises(ValueError, match="line up"):
        plan_check.compare("cfg", entries[:2], jobs, tmp_path, "r", templates, Throughput(), io)


def test_summarise_median_and_worst() -> None:
    def row(ratio: float) -> plan_check.Row:
        m = plan_check.Measured("x", 5.0, 1e9 / 2**20, 1.0)  # 1 GB
        return plan_check.Row("c", "sample", "e", "e", False, 0, ratio, 0.0, "", "x", m)

    (s,) = plan_check.summarise([row(0.5), row(1.1), row(1.8)])
    assert s.median == pytest.approx(1.1) and s.worst == pytest.approx(0.5) and s.within == 1
    assert (s.low, s.high) == (pytest.approx(0.5), pytest.approx(1.8))


def test_report_grid_terms() -> None:
    """The report's host memory is its largest image grid: tiles kept by the figure plus one being drawn;
    a tile of 36 256-px images (1,543 px) is drawn as it is, one of 8-px digits enlarged 4x."""
    from sourceflow.report import grid_scale

    assert grid_scale(6 * 257 + 1) == 1 and grid_scale(6 * 9 + 1) == 4 and grid_scale(6 * 33 + 1) == 2
    cfg = plan.load_config(ROOT / "config" / "imagenet256-mmfm.yaml")
    planner = plan.Planner(cfg)
    e = planner._report(Job("report"))
    exps = [s for s in planner.specs.values() if s["data"] == "imagenet256"]
    side = math.ceil(math.sqrt(cfg["report"]["grid_images"]))
    px = (side * (256 + 1) + 1) ** 2
    tiles = len(exps) * 2 * 3 * px  # one sweep entry (euler-49) + the real images per row
    assert e.host_mem_gb == pytest.approx(0.6 + tiles / 1e9 + plan.GRID_RENDER_BYTES_PER_PX * px / 1e9, abs=1e-3)
    toy = plan.Planner(plan.load_config(ROOT / "config" / "c2ot-moons.yaml"))._report(Job("report"))
    assert toy.host_mem_gb == pytest.approx(IOAssumptions().cpu_process_gb)


def test_sample_forward_of_a_continuous_toy_condition() -> None:
    """The fake sample forward gives a continuous condition (xcoord) a [B, dim] tensor (it passed None)."""
    planner = plan.Planner(plan.load_config(ROOT / "config" / "c2ot-moons.yaml"), use_cache=False)
    per, fw = planner._velocity_flops(planner.specs["fm-x"])
    assert per > 0 and fw["peak"] > 0
