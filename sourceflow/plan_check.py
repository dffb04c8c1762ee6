"""The resource plan (:mod:`sourceflow.plan`) checked against what Snakemake measured.

Every rule has a ``benchmark:`` file (``<results>/benchmarks/...tsv``: Snakemake's ``s``, ``max_rss`` in
MiB, ``cpu_time``, ...). For a finished workflow folder (a rehearsal's ``<out>/<config>/``) this plans the
folder's config from the folder (so the plan reads the manifests the run wrote), finds each planned job's
benchmark file from the rule's ``benchmark:`` path and the job's wildcards, and sets the plan's host memory
beside the measured ``max_rss`` (ratio = plan / measured: above 1 the plan over-asks, below 1 it under-asks)
and the plan's hours beside the measured seconds.

Why: the host-memory terms are formulas (a process baseline plus the arrays a stage holds); a benchmark is
the only check that they describe the real processes. What a benchmark can and cannot say:

- ``max_rss`` is the RSS summed over the job's process tree (the shell and its children), sampled every
  0.5 s for the first 15 s and every 30 s after that (snakemake.benchmark), so it is a lower bound of the
  peak; a job shorter than one interval may be sampled before Python starts (:data:`SHORT_S`).
- The plan's hours are compute at the stated throughput (or I/O at the stated rates) with no process start-up;
  for a GPU job they assume a GPU. The measured seconds are shown for the record, never as a test.
- Local jobs (``experiment_spec``, ``all``) run inside the Snakemake process, which their benchmark measures;
  the plan gives them no memory of their own, so they are listed and not compared.
- A job the plan gives a GPU ran on CPU in a rehearsal (it has none): its CUDA-process term
  (``IOAssumptions.process_gb``) is swapped for the CPU-process term before comparing, and the row says so.
"""

from __future__ import annotations

import contextlib
import csv
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MIB = 2**20
GB = 1e9
SHORT_S = 1.0  # a job shorter than this was sampled once or twice: its max_rss may miss the Python process
WITHIN = 1.5   # the aim: plan / measured within [1/1.5, 1.5]
# The workflow's order of rules (summaries are listed in it; a rule not named here comes last).
RULE_ORDER = ("prepare_data", "extract_latents", "latent_stats", "fit_cls_gmm", "build_spatial_gmm", "align_captions",
              "embed_captions", "train_feature_net", "reference_features", "make_toy_data", "reference_stats", "train",
              "reflow_pairs", "sample", "evaluate", "report")


@dataclass
class Measured:
    """One benchmark file (the maximum / mean over its rows, if the job was repeated)."""

    path: str
    s: float
    max_rss_mib: float | None
    cpu_s: float | None

    @property
    def rss_gb(self) -> float | None:
        return None if self.max_rss_mib is None else self.max_rss_mib * MIB / GB


def _num(x: str | None) -> float | None:
    try:
        return float(x) if x not in (None, "", "NA") else None
    except ValueError:
        return None


def read_benchmark(path: str | Path) -> Measured | None:
    """A Snakemake benchmark tsv: mean ``s`` and ``cpu_time``, maximum ``max_rss`` over its rows; None when
    the file has no rows."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows:
        return None
    s = [v for v in (_num(r.get("s")) for r in rows) if v is not None]
    rss = [v for v in (_num(r.get("max_rss")) for r in rows) if v is not None]
    cpu = [v for v in (_num(r.get("cpu_time")) for r in rows) if v is not None]
    return Measured(str(path), statistics.fmean(s) if s else math.nan, max(rss) if rss else None,
                    statistics.fmean(cpu) if cpu else None)


def benchmark_templates(rules_dir: str | Path) -> dict[str, str]:
    """``rule -> benchmark path template`` from workflow/rules/*.smk: the ``benchmark:`` f-string with
    ``{R}`` kept as ``{results}`` and the wildcards ``{{w}}`` as ``{w}`` (``str.format`` fields)."""
    out: dict[str, str] = {}
    for path in sorted(Path(rules_dir).glob("*.smk")):
        rule, want = None, False
        for line in path.read_text().splitlines():
            m = re.match(r"^rule (\w+):", line)
            if m:
                rule, want = m[1], False
                continue
            if rule and re.match(r"^\s+benchmark:\s*$", line):
                want = True
                continue
            if want:
                m = re.match(r'^\s+f?"([^"]+)"', line)
                if m:
                    text = m[1].replace("{R}", "\0results\1")
                    text = re.sub(r"\{\{(\w+)\}\}", "\0\\1\1", text)
                    out[rule] = text.replace("\0", "{").replace("\1", "}")
                want = False
    return out


def job_wildcards(job: Any) -> dict[str, Any]:
    """The wildcards of a :class:`sourceflow.plan.Job` under the names the rules use."""
    return {"dataset": job.dataset, "encoder": job.encoder, "K": job.K, "text_encoder": job.text_encoder,
            "features": job.features, "exp": job.experiment, "seed": job.seed, "stage": job.stage}


def benchmark_path(job: Any, templates: dict[str, str], results: str) -> str | None:
    """The benchmark file of ``job`` (relative to the workflow folder), or None if its rule has none."""
    t = templates.get(job.rule)
    if t is None:
        return None
    return t.format(results=results, **job_wildcards(job))


@dataclass
class Row:
    """One planned job beside its measurement."""

    config: str
    rule: str
    what: str
    experiment: str | None
    local: bool
    gpus: int                       # what the plan gives the job
    plan_host_gb: float             # the host memory compared (after the GPU -> CPU process swap, if any)
    plan_time_s: float              # the plan's hours x 3600
    time_basis: str                 # what the plan's time assumes
    benchmark: str | None           # relative path of the benchmark file
    measured: Measured | None
    notes: list[str] = field(default_factory=list)

    @property
    def rss_gb(self) -> float | None:
        return self.measured.rss_gb if self.measured else None

    @property
    def ratio(self) -> float | None:
        """plan host GB / measured max_rss GB (None for local jobs and jobs without a measurement)."""
        if self.local or self.rss_gb is None or self.rss_gb <= 0:
            return None
        return self.plan_host_gb / self.rss_gb

    @property
    def short(self) -> bool:
        return self.measured is not None and self.measured.s < SHORT_S


def time_basis(entry: Any, throughput: Any, io: Any) -> str:
    """What the plan's hours of ``entry`` assume, in words."""
    if entry.gpus:
        return f"GPU ({throughput.name}, {entry.precision}): not comparable with a CPU run"
    if entry.precision == "cpu":
        return f"CPU at {throughput.cpu_tflops:g} TFLOP/s, compute only"
    if entry.bound in ("read", "write", "decode"):
        return f"{entry.bound} at the I/O assumptions"
    return entry.bound


def compare(config: str, entries: list[Any], jobs: list[Any], folder: str | Path, results: str,
            templates: dict[str, str], throughput: Any, io: Any) -> tuple[list[Row], list[str]]:
    """Rows for the plan ``entries`` of ``jobs`` (same order, as :meth:`Planner.plan` makes them) against
    the benchmark files under ``folder``; and the benchmark files no planned job accounts for."""
    if len(entries) != len(jobs) or any(e.rule != j.rule or e.what != j.what for e, j in zip(entries, jobs, strict=False)):
        raise ValueError("plan entries and jobs do not line up (plan them from the same config)")
    folder = Path(folder)
    rows: list[Row] = []
    seen: set[str] = set()
    for e, job in zip(entries, jobs, strict=True):
        rel = benchmark_path(job, templates, results)
        measured = None
        notes: list[str] = []
        if rel is not None:
            seen.add(str(Path(rel)))
            if (folder / rel).is_file():
                measured = read_benchmark(folder / rel)
            else:
                notes.append("no benchmark file (the job did not run)")
        host = float(e.host_mem_gb)
        proc = e.terms.get("host", {}).get("process")
        if e.gpus and proc is not None and math.isclose(proc, io.process_gb):
            host = round(host - io.process_gb + io.cpu_process_gb, 3)
            notes.append(f"plan gives it {e.gpus} GPU(s); ran on CPU: its CUDA-process term {io.process_gb:g} GB "
                         f"swapped for the CPU-process {io.cpu_process_gb:g} GB (plan as is: {e.host_mem_gb:g} GB)")
        if e.local:
            notes.append("local: runs inside the Snakemake process (its benchmark measures that process)")
        if measured is not None and measured.s < SHORT_S:
            notes.append(f"ran {measured.s:.2f} s (< {SHORT_S:g} s): sampled once or twice, max_rss a lower bound")
        rows.append(Row(config, e.rule, e.what, e.experiment, bool(e.local), int(e.gpus), host, e.hours * 3600,
                        time_basis(e, throughput, io), rel, measured, notes))
    bench_dir = folder / results / "benchmarks"
    unplanned = sorted(str(p.relative_to(folder)) for p in bench_dir.rglob("*.tsv")
                       if str(p.relative_to(folder)) not in seen) if bench_dir.is_dir() else []
    return rows, unplanned


def check_folder(folder: str | Path, configfile: str = "config/rehearsal.yaml",
                 images: dict[str, int] | None = None, progress: Any = None) -> tuple[list[Row], list[str], Any]:
    """Plan ``folder``'s config from inside ``folder`` (its results' manifests give the image counts; its
    own copy of the rules and profile give the requests) and compare it with the folder's benchmarks.
    Returns the rows, the unplanned benchmark files and the planner (for its assumptions)."""
    from sourceflow import plan

    folder = Path(folder).resolve()
    with contextlib.chdir(folder):
        config = plan.load_config(configfile)
        profile = plan.Profile.load(folder / "profiles" / "slurm" / "config.yaml")
        rules = plan.rule_resources(folder / "workflow" / "rules")
        planner = plan.Planner(config, profile=profile, rules=rules, images=images, progress=progress)
        entries = planner.plan()
        jobs = plan.enumerate_jobs(planner.config, planner.specs)
    templates = benchmark_templates(folder / "workflow" / "rules")
    rows, unplanned = compare(folder.name, entries, jobs, folder, str(config.get("results", "results")), templates,
                              planner.tp, planner.io)
    return rows, unplanned, planner


# ---- summaries and tables ----------------------------------------------------------------------------------


@dataclass
class RuleSummary:
    """RAM ratios of one rule over the compared jobs."""

    rule: str
    n: int
    median: float
    worst: float      # the ratio farthest from 1 (in log terms)
    low: float
    high: float
    within: int       # jobs within x WITHIN
    short: int        # jobs shorter than SHORT_S (their max_rss is a lower bound)
    plan_gb: tuple[float, float]
    rss_gb: tuple[float, float]


def summarise(rows: list[Row]) -> list[RuleSummary]:
    """Per rule (in :data:`RULE_ORDER`): median, worst, range and count within x :data:`WITHIN` of the RAM
    ratio over the jobs that have one, and how many of them ran under :data:`SHORT_S`."""
    by: dict[str, list[Row]] = {}
    for r in rows:
        if r.ratio is not None:
            by.setdefault(r.rule, []).append(r)
    out = []
    for rule, rs in by.items():
        ratios = [r.ratio for r in rs]
        out.append(RuleSummary(rule, len(rs), statistics.median(ratios), max(ratios, key=lambda x: abs(math.log(x))),
                               min(ratios), max(ratios), sum(1 / WITHIN <= x <= WITHIN for x in ratios),
                               sum(r.short for r in rs),
                               (min(r.plan_host_gb for r in rs), max(r.plan_host_gb for r in rs)),
                               (min(r.rss_gb for r in rs), max(r.rss_gb for r in rs))))
    order = {r: i for i, r in enumerate(RULE_ORDER)}
    return sorted(out, key=lambda s: order.get(s.rule, len(order)))


def _f(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _range(lo_hi: tuple[float, float]) -> str:
    lo, hi = lo_hi
    return f"{lo:.2f}" if math.isclose(lo, hi, abs_tol=5e-3) else f"{lo:.2f}-{hi:.2f}"


def summary_markdown(summaries: list[RuleSummary]) -> str:
    """The per-rule RAM table (markdown)."""
    lines = [f"| rule | jobs | plan host GB | measured max_rss GB | median plan/measured | worst | range | within x{WITHIN:g} "
             f"| under {SHORT_S:g} s |", "|:--|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for s in summaries:
        lines.append(f"| {s.rule} | {s.n} | {_range(s.plan_gb)} | {_range(s.rss_gb)} | {s.median:.2f} | {s.worst:.2f} "
                     f"| {s.low:.2f}-{s.high:.2f} | {s.within}/{s.n} | {s.short or ''} |")
    return "\n".join(lines)


def rows_markdown(rows: list[Row], with_local: bool = False) -> str:
    """The per-job table (markdown): RAM plan vs measured and ratio; time plan vs measured, for the record."""
    lines = ["| config | rule | job | plan host GB | max_rss GB | plan/measured | plan s (basis) | measured s | CPU s | notes |",
             "|:--|:--|:--|--:|--:|--:|--:|--:|--:|:--|"]
    for r in rows:
        if r.local and not with_local:
            continue
        m = r.measured
        lines.append(f"| {r.config} | {r.rule} | {r.what} | {r.plan_host_gb:.2f} | {_f(r.rss_gb)} | {_f(r.ratio)} "
                     f"| {_f(r.plan_time_s, '.3g')} ({r.time_basis}) | {_f(m.s if m else None, '.1f')} "
                     f"| {_f(m.cpu_s if m else None, '.1f')} | {'; '.join(r.notes)} |")
    return "\n".join(lines)


def local_line(rows: list[Row]) -> str:
    """One line on the local jobs: how many, and the Snakemake process RSS their benchmarks saw."""
    loc = [r for r in rows if r.local and r.rss_gb is not None]
    if not loc:
        return "no local jobs measured"
    rss = [r.rss_gb for r in loc]
    return (f"{len(loc)} local jobs (experiment_spec) not compared: their benchmarks measure the Snakemake process "
            f"({min(rss):.2f}-{max(rss):.2f} GB, median {statistics.median(rss):.2f}); the plan gives them none")


__all__ = ["Measured", "Row", "RuleSummary", "benchmark_path", "benchmark_templates", "check_folder", "compare",
           "local_line", "read_benchmark", "rows_markdown", "summarise", "summary_markdown", "time_basis"]
