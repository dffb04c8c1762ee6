"""Shared plumbing for the stage scripts: common flags, thread limits and one-line errors."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults and keeps the description's line breaks."""


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser whose description is the stage's module docstring."""
    return argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="random seed; same inputs + seed give the same outputs on CPU")
    p.add_argument("--threads", type=int, default=int(os.environ.get("SOURCEFLOW_THREADS", "1")),
                   help="torch intra-op threads for this process")


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(max(1, n))


def run(main: Callable[[], None]) -> None:
    """Run a stage; expected failures (bad config, missing or bad files) exit 2 with one line."""
    try:
        main()
    except (ValueError, KeyError, FileNotFoundError, FloatingPointError) as e:
        if os.environ.get("SOURCEFLOW_TRACEBACK"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
