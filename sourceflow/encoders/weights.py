"""Where encoder weights come from: a local ``save_pretrained`` folder or a Hugging Face hub id.

Run time here has no network, so the common case is a local folder; the errors say which folder is
missing and how to fill it. A hub id still goes through ``from_pretrained`` (it works where the hub or
its cache is reachable).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any


def looks_local(weights: str) -> bool:
    """True for things that can only be a filesystem path (hub ids are ``name`` or ``org/name`` of letters,
    digits, ``-``, ``_`` and ``.``: a space or a quote makes it a path)."""
    return (weights.startswith(("/", ".", "~")) or "\\" in weights or weights.count("/") > 1
            or re.search(r"[^A-Za-z0-9._/-]", weights) is not None or Path(weights).exists())


def load_pretrained(loader: Callable[..., Any], weights: str | None, default: str, what: str, **kwargs) -> Any:
    """``loader(weights or default, **kwargs)`` with one-line errors naming the folder or id.

    ``loader`` is a ``from_pretrained`` bound method (transformers or diffusers).
    """
    source = weights or default
    hint = (f"put a save_pretrained folder (config.json + *.safetensors) there, e.g. "
            f"`huggingface-cli download {default} --local-dir <folder>`, and pass it as the weights")
    if looks_local(source):
        path = Path(source).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"{what} weights not found: {path} ({hint})")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{what} weights folder {path} has no config.json ({hint})")
        try:
            return loader(str(path), local_files_only=True, **kwargs)
        except OSError as e:
            raise FileNotFoundError(f"{what} weights in {path} are incomplete ({str(e).splitlines()[0]}; {hint})") from None
    try:
        return loader(source, **kwargs)
    except OSError as e:
        raise FileNotFoundError(f"could not load {what} weights {source!r} from the hub or its cache "
                                f"({str(e).splitlines()[0]}); {hint}") from None
