"""Shared fixtures: the repository root, the venv's python and a fast thread setting."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable


@pytest.fixture
def env() -> dict[str, str]:
    """Environment for subprocesses: one thread, the venv first on PATH."""
    e = dict(os.environ)
    e["PATH"] = f"{Path(sys.executable).parent}:{e.get('PATH', '')}"
    e["OMP_NUM_THREADS"] = "1"
    e.pop("SOURCEFLOW_TRACEBACK", None)
    return e
