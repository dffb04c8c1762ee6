"""Kill anywhere, lose nothing: SIGKILL a Snakemake run's whole process group while one stage runs, unlock,
rerun, and check that every artifact is byte-identical to an uninterrupted run and that no temporary file
is left behind (issue 10, item 1).

A trial copies a finished baseline repository, deletes one stage's outputs (and its working state, e.g.
training checkpoints) so that Snakemake must run that stage again, starts ``snakemake`` in a new session,
waits for a progress marker of the stage (a log line, a checkpoint directory, a store shard marker), kills
the process group, runs ``snakemake --unlock`` and the same targets again, and compares. Markers, not
sleeps, decide when to kill, so the CI version is deterministic; the soak draws the marker count and an
extra delay from a seeded RNG. Used by ``benchmarks/kill_soak.py`` and ``tests/workflow/test_kill_soak.py``.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

EXCLUDED = ("logs", "benchmarks")  # per-run timings and host facts, not artifacts


def artifacts(results: Path) -> set[str]:
    """Paths (relative to ``results``) of every file except those under the logs and benchmarks."""
    return {p.relative_to(results).as_posix() for p in results.rglob("*")
            if p.is_file() and p.relative_to(results).parts[0] not in EXCLUDED}


def first_difference(a: Path, b: Path) -> int | None:
    """Offset of the first differing byte (the shorter file's length if one is a prefix), None if equal."""
    x, y = a.read_bytes(), b.read_bytes()
    if x == y:
        return None
    n = min(len(x), len(y))
    return next((i for i in range(n) if x[i] != y[i]), n)


def differences(expected: Path, actual: Path) -> dict[str, str]:
    """Artifact files that differ between two results folders: path → why (missing, extra, first offset)."""
    fa, fb = artifacts(expected), artifacts(actual)
    out = {f: "missing" for f in sorted(fa - fb)}
    out.update({f: "extra" for f in sorted(fb - fa)})
    for f in sorted(fa & fb):
        if (off := first_difference(expected / f, actual / f)) is not None:
            out[f] = f"first differing byte {off}"
    return out


# Temporary names of the atomic writers: sourceflow.io.atomic_path (.NAME.XXXX.tmp files),
# sourceflow.store.sharded / stages.embed_captions (.NAME.XXXX.tmp directories), Zarr's *.partial chunk files,
# replace_dir's NAME.old and plan's NAME.tmpPID.
_TEMP = re.compile(r"(\.tmp\d*$)|(\.partial$)|(\.old$)")


def leftovers(results: Path) -> list[str]:
    """Temporary files or directories under ``results`` (logs included): what a killed write left behind."""
    return sorted(p.relative_to(results).as_posix() for p in results.rglob("*") if _TEMP.search(p.name))


def snakemake_cmd(*args: str, cores: int = 2) -> list[str]:
    return [sys.executable, "-m", "snakemake", "--cores", str(cores), *args]


def run_snakemake(repo: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 1800) -> None:
    """``snakemake ARGS`` in ``repo``; raises with the output's tail on failure."""
    res = subprocess.run(snakemake_cmd(*args), cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"snakemake {' '.join(args)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n"
                           f"{res.stderr[-3000:]}")


def count_files(pattern: str) -> Callable[[Path], int]:
    """Progress = how many paths match ``pattern`` (a glob relative to the repository)."""
    return lambda repo: sum(1 for _ in repo.glob(pattern))


def count_lines(log: str, regex: str) -> Callable[[Path], int]:
    """Progress = how many lines of the log file ``log`` (relative to the repository) match ``regex``."""
    rx = re.compile(regex)

    def progress(repo: Path) -> int:
        try:
            text = (repo / log).read_text(errors="replace")
        except FileNotFoundError:
            return 0
        return sum(1 for line in text.splitlines() if rx.search(line))
    return progress


@dataclass(frozen=True)
class Stage:
    """One stage to kill: the Snakemake targets it writes, what to delete so that it runs again, and its
    progress marker (``progress(repo)`` counts marks; a kill waits for the ``n``-th, n in 1..``marks``)."""

    name: str
    targets: tuple[str, ...]
    clear: tuple[str, ...]
    progress: Callable[[Path], int]
    marks: int
    extra_delay: float = 0.0  # the soak adds uniform(0, extra_delay) seconds after the mark


@dataclass
class Trial:
    """What one kill/rerun of one stage found."""

    stage: str
    mark: int
    delay: float
    landed: bool  # the kill hit while the stage's targets were still incomplete
    differences: dict[str, str] = field(default_factory=dict)
    leftovers: list[str] = field(default_factory=list)
    survivors: list[int] = field(default_factory=list)
    error: str = ""
    seconds: float = 0.0

    @property
    def identical(self) -> bool:
        return not self.differences and not self.error

    @property
    def ok(self) -> bool:
        return self.identical and not self.leftovers and not self.survivors


def processes_in(repo: Path) -> list[int]:
    """Pids of processes whose working directory is inside ``repo`` (a kill that missed some child)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                cwd = Path(os.readlink(d / "cwd"))
            except OSError:
                continue
            if cwd == repo or repo in cwd.parents:
                pids.append(int(d.name))
    return pids


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def kill_trial(baseline: Path, work: Path, stage: Stage, mark: int, delay: float = 0.0,
               env: dict[str, str] | None = None, timeout: float = 900) -> Trial:
    """Copy ``baseline`` to ``work``, rerun ``stage`` there, SIGKILL the process group at the ``mark``-th
    progress mark (+``delay`` s), unlock, rerun and compare with the baseline's results."""
    t0 = time.time()
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(baseline, work, symlinks=True)
    for rel in stage.clear:
        for p in sorted(work.glob(rel)):
            _remove(p)
    trial = Trial(stage.name, mark, delay, landed=False)
    proc = subprocess.Popen(snakemake_cmd(*stage.targets), cwd=work, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + timeout
        while proc.poll() is None and stage.progress(work) < mark and time.time() < deadline:
            time.sleep(0.02)
        if delay and proc.poll() is None:
            time.sleep(delay)
        trial.landed = proc.poll() is None and not all((work / t).exists() for t in stage.targets)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    time.sleep(0.2)  # let the kernel reap the group before looking for survivors
    trial.survivors = processes_in(work)
    for pid in trial.survivors:  # started by this trial; end them so they cannot write after the rerun
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    try:
        run_snakemake(work, "--unlock", env=env)
        run_snakemake(work, *stage.targets, env=env, timeout=timeout)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        trial.error = str(e)[-2000:]
    trial.differences = differences(baseline / "results", work / "results")
    trial.leftovers = leftovers(work / "results")
    trial.seconds = time.time() - t0
    return trial


def soak(baseline: Path, work: Path, stages: Iterable[Stage], trials: int, seed: int = 0,
         minutes: float | None = None, env: dict[str, str] | None = None,
         on_trial: Callable[[Trial], None] | None = None) -> list[Trial]:
    """Round-robin over ``stages`` up to ``trials`` rounds (or until ``minutes`` run out, checked between
    rounds), each kill at a mark and delay drawn from ``random.Random(seed)``."""
    rng = random.Random(seed)
    stages = list(stages)
    out: list[Trial] = []
    t0 = time.time()
    for _ in range(trials):
        if minutes is not None and out and time.time() - t0 > 60 * minutes:
            break
        for stage in stages:
            mark = rng.randint(1, stage.marks)
            delay = rng.uniform(0, stage.extra_delay)
            trial = kill_trial(baseline, work / "trial", stage, mark, delay, env=env)
            out.append(trial)
            if on_trial:
                on_trial(trial)
    return out


def summary(trials: list[Trial]) -> list[dict[str, object]]:
    """Per stage: trials, kills that landed while the stage ran, identical reruns, leftovers, failures."""
    rows = []
    for name in dict.fromkeys(t.stage for t in trials):
        ts = [t for t in trials if t.stage == name]
        rows.append({"stage": name, "trials": len(ts), "landed": sum(t.landed for t in ts),
                     "identical": sum(t.identical for t in ts), "leftovers": sum(bool(t.leftovers) for t in ts),
                     "failures": sum(not t.ok for t in ts)})
    return rows
