"""Shared fixtures: the repository root, the venv's python, a fast thread setting, and a clean in-process
environment (no SOURCEFLOW_TRACEBACK, CPU only)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
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


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: may use a GPU in this process (every other test sees none)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The slow (workflow) tests first, otherwise in collection order: under pytest-xdist (`make test`: `-n 2
    --dist loadscope --no-loadscope-reorder`, a module per worker, dealt out in this order) the minutes-long
    modules start at once instead of leaving one worker running the last of them alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # a stable sort


@pytest.fixture(autouse=True)
def _no_traceback_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stages print expected failures as one line unless SOURCEFLOW_TRACEBACK is set (sourceflow.cli.run); a
    developer's shell setting must not change what the in-process stage tests see."""
    monkeypatch.delenv("SOURCEFLOW_TRACEBACK", raising=False)


_cuda_is_available = torch.cuda.is_available


@pytest.fixture(scope="session", autouse=True)
def _cpu_only() -> Iterator[None]:
    """In-process code sees no GPU: the training loop's accelerator (``make_accelerator``) and the stages pick
    CUDA (and bf16 autocast) whenever it is available, and the bitwise tests (exact resume, prefetched pairing,
    equal weights or samples for equal seeds) hold on CPU ("same inputs + seed give the same outputs on CPU").
    Session-wide, so module fixtures see it too and the session keeps one device, as accelerate's process-wide
    state requires (an Accelerator on CUDA followed by one with cpu=True, or another mixed precision, raises).
    Subprocesses keep their own environment; tests marked ``cuda`` see the GPU again."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: False)
        yield


@pytest.fixture(autouse=True)
def _cuda_marked_tests_see_the_gpu(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.node.get_closest_marker("cuda") is not None:
        monkeypatch.setattr(torch.cuda, "is_available", _cuda_is_available)
