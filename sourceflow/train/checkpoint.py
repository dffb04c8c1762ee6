"""Atomic, pickle-free checkpoints.

A checkpoint is a directory of safetensors files plus a JSON file; it is written to a temporary
directory and swapped in with two renames (``sourceflow.io.replace_dir``), so ``last/`` is always a
complete checkpoint. accelerate's ``save_state`` is not used because it pickles RNG states; our
randomness is a pure function of (seed, step), so there is no RNG state to save.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sourceflow.io import reading, replace_dir, resolve_dir


def optimizer_to_tensors(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer ``state_dict`` into flat tensors and JSON-able param groups."""
    tensors: dict[str, torch.Tensor] = {}
    for pid, st in state["state"].items():
        for name, value in st.items():
            tensors[f"{pid}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, {"param_groups": state["param_groups"]}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _contiguous(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in d.items()}


def save_checkpoint(final_dir: Path, parts: dict[str, dict[str, torch.Tensor]], optimizer: dict[str, Any],
                    info: dict[str, Any]) -> None:
    """Write ``parts`` (name → state dict), the optimizer and ``info`` as one atomic directory."""
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.", dir=final_dir.parent))
    try:
        for name, tensors in parts.items():
            save_file(_contiguous(tensors), str(tmp / f"{name}.safetensors"))
        opt_tensors, opt_meta = optimizer_to_tensors(optimizer)
        save_file(_contiguous(opt_tensors), str(tmp / "optimizer.safetensors"))
        (tmp / "trainer.json").write_text(json.dumps({**info, "optimizer": opt_meta}, indent=2))
        replace_dir(tmp, final_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def load_checkpoint(final_dir: Path, names: list[str]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any], dict[str, Any]] | None:
    """(parts, optimizer state, info) of the newest complete checkpoint, or None if there is none."""
    d = resolve_dir(Path(final_dir))
    if d is None or not (d / "trainer.json").exists():
        return None
    fix = f"delete {d} to start this run over (or rerun with --no-resume)"
    with reading(d / "trainer.json", "checkpoint file", fix):
        info = json.loads((d / "trainer.json").read_text())
        opt_meta = info.pop("optimizer")
    parts = {}
    for name in [*names, "optimizer"]:
        f = d / f"{name}.safetensors"
        if not f.is_file():
            raise FileNotFoundError(f"{f}: checkpoint part missing; {fix}")
        with reading(f, "checkpoint file", fix):
            parts[name] = load_file(str(f))
    opt = optimizer_from_tensors(parts.pop("optimizer"), opt_meta)
    return parts, opt, info


def load_trained(path: str | Path, model: torch.nn.Module, method: torch.nn.Module) -> None:
    """Load the ``model.safetensors`` a training run ends with (``model.*`` EMA weights, ``method.*``
    method state) into a freshly built model and method."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"trained model not found: {path} (run the train stage)")
    with reading(path, "trained model (safetensors)", "delete it and rerun the train stage"):
        t = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
    method.load_state_tensors({k[7:]: v for k, v in t.items() if k.startswith("method.")})

