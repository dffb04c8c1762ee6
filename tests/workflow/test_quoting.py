"""Issue 10, item 4: results, data and weight paths with spaces or quotes reach every stage whole.

A dry run (``snakemake -n -p``) of the digits artifacts and a toy + digits run set renders every job's shell
command with a results folder named ``out dir/it's`` and encoder weights in ``my models/tiny "dino"``; each
command is split as the shell would (``shlex``) and every argument that names a path under them must be one
whole argument. (tests/workflow/test_byte_identical.py runs such a results folder for real.)"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = "/tmp/out dir/it's"
WEIGHTS = 'my models/tiny "dino"'


def shell_commands(*config: str) -> list[str]:
    res = subprocess.run([sys.executable, "-m", "snakemake", "-n", "-p", "--cores", "2", *config,
                          "--config", f"results={RESULTS}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return [ln.split("Shell command: ", 1)[1] for ln in (res.stdout + res.stderr).splitlines()
            if ln.startswith("Shell command: ") and ln.strip() != "Shell command: None"]


def test_every_path_argument_is_one_shell_word(tmp_path):
    cfg = (ROOT / "tests" / "data" / "digits.yaml").read_text().replace("models/tiny-dinov2", f"'{WEIGHTS}'")
    (tmp_path / "digits.yaml").write_text(cfg)
    commands = shell_commands("--configfile", str(tmp_path / "digits.yaml"))
    commands += shell_commands("--configfile", str(ROOT / "tests" / "data" / "tiny.yaml"))
    assert len(commands) > 15
    seen_weights = 0
    for cmd in commands:
        words = shlex.split(cmd.split("; ")[-1])  # after the set -euo / PATH prefix
        for i, w in enumerate(words):
            # a word holding part of the results folder holds all of it
            if "out dir" in w or w.startswith("dir/it"):
                assert RESULTS in w, (w, cmd)
            if "my models" in w or "dino" in w and "tiny" in w:
                assert w == WEIGHTS and words[i - 1] == "--weights", cmd
                seen_weights += 1
        for w in words:
            if w.startswith(RESULTS) or re.match(r"^\w+=" + re.escape(RESULTS), w):
                assert not w.endswith(" "), w
    assert seen_weights == 1  # the dino extraction (one job, two processes)
