"""How jobs are launched: the shell prefix of every rule's command (no Snakemake import here; the rules
call these with what Snakemake tells them)."""

from __future__ import annotations


def job_shell_prefix(conda: bool, python_dir: str) -> str:
    """``set -euo pipefail`` for every job; without ``--sdm conda`` also the Snakemake interpreter's folder
    first on PATH, so jobs run `python` from the environment running Snakemake (the project's .venv)
    without its absolute path in commands or params (which would rerun everything when the checkout moves).
    Under ``--sdm conda`` nothing is put before the activated env: its python must come first. Stages import
    the project from the workflow folder (each stage puts its parent on sys.path), so the env needs only
    the dependencies."""
    import shlex

    prefix = "set -euo pipefail; "
    return prefix if conda else prefix + f"export PATH={shlex.quote(python_dir)}:\"$PATH\"; "
