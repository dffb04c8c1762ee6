"""Run the Snakemake workflow in a scratch copy of the repository and read its dry-run plans."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COPY = ["Snakefile", "workflow", "stages", "config", "profiles", "envs", "sourceflow"]


def scratch_repo(dest: Path, config_text: str) -> Path:
    """A copy of the workflow with ``config_text`` as its config/config.yaml."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    (dest / "config" / "config.yaml").write_text(config_text)
    return dest


def snakemake(repo: Path, *args: str, env: dict[str, str] | None = None, check: bool = True,
              timeout: float = 900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", *args]
    res = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
    return res




def planned_jobs(dry_run_output: str) -> list[tuple[str, dict[str, str]]]:
    """(rule, wildcards) of every job in a ``snakemake -n`` output."""
    jobs = []
    blocks = re.split(r"\n(?=(?:local)?rule \w+:\n)", dry_run_output)
    for b in blocks:
        m = re.match(r"(?:local)?rule (\w+):\n", b)
        if not m:
            continue
        wc = re.search(r"^    wildcards: (.*)$", b, re.M)
        wildcards = dict(kv.split("=", 1) for kv in wc.group(1).split(", ")) if wc else {}
        jobs.append((m.group(1), wildcards))
    return jobs


def timed(fn, *args, **kwargs):
    t = time.time()
    out = fn(*args, **kwargs)
    return out, time.time() - t
