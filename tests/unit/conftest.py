"""Fixtures shared by the unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sourceflow.build import PointData, save_points
from sourceflow.data import toy


@pytest.fixture(scope="module")
def points(tmp_path_factory) -> tuple[PointData, Path]:
    """256 toy moons points in memory and as a toy.safetensors file (train split only)."""
    d = toy.sample("moons", 256, torch.Generator().manual_seed(0))
    pts = PointData(d.x, d.label, 2)
    path = tmp_path_factory.mktemp("toy") / "toy.safetensors"
    save_points(path, {"train": pts}, {"distribution": "moons", "seed": "0"})
    return pts, path
