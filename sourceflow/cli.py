"""Shared plumbing for the stage scripts: common flags, thread limits and one-line errors."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable

from sourceflow.io import FULL_DISK


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


def disk_full_message(e: OSError) -> str:
    """The one line for a full disk or quota: where, and that a rerun after freeing space finishes the job
    (outputs are written atomically or marked complete last, so nothing half-written counts as done)."""
    where = e.filename or "an output file"
    return (f"disk full ({errno.errorcode.get(e.errno, e.errno)}: {e.strerror}) while writing {where}: free space "
            f"there and rerun the same command (nothing half-written is marked complete; a Zarr store keeps its "
            f"finished shards and resumes)")


def run(main: Callable[[], None]) -> None:
    """Run a stage; expected failures (bad config, missing or bad files, a full disk) exit 2 with one line."""
    try:
        main()
    except (ValueError, KeyError, FileNotFoundError, FloatingPointError) as e:
        if os.environ.get("SOURCEFLOW_TRACEBACK"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    except OSError as e:  # other OS errors are not expected: they keep their traceback
        if os.environ.get("SOURCEFLOW_TRACEBACK") or e.errno not in FULL_DISK:
            raise
        msg = disk_full_message(e)
    else:
        return
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)
