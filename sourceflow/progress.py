"""Progress bars that read well both on a terminal and in a Snakemake log file.

On a terminal: a normal tqdm bar. Redirected to a file (every Snakemake job's `> {log} 2>&1`): tqdm's
carriage-return redraws would pile up as one ever-growing line, so each update becomes one plain line
with the count, rate and ETA, at most every ``SOURCEFLOW_PROGRESS_SECONDS`` (default 30 s), plus the
first and the final state. tqdm does the rate and ETA; only the output changes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import IO, Any

from tqdm import tqdm

LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed} elapsed, {remaining} left, {rate_fmt}]"


class _Lines:
    """A stream adapter: every tqdm redraw (``\\r``-prefixed) becomes one line; blank writes are dropped."""

    def __init__(self, stream: IO[str]):
        self.stream = stream
        self.last = ""

    def write(self, s: str) -> None:
        text = s.replace("\r", "").strip()
        if text and text != self.last:
            self.stream.write(text + "\n")
            self.last = text

    def flush(self) -> None:
        self.stream.flush()


def log_interval() -> float:
    return float(os.environ.get("SOURCEFLOW_PROGRESS_SECONDS", "30"))


def bar(iterable: Iterable[Any] | None = None, *, total: float | None = None, desc: str | None = None,
        unit: str = "it", disable: bool = False, initial: float = 0, file: IO[str] | None = None) -> tqdm:
    """A tqdm bar on ``file`` (default stderr): interactive on a terminal, throttled plain lines in a log."""
    stream = file if file is not None else sys.stderr
    is_tty = bool(getattr(stream, "isatty", lambda: False)())
    if is_tty:
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, initial=initial, file=stream,
                    mininterval=1.0, dynamic_ncols=True)
    return tqdm(iterable, total=total, desc=desc or "progress", unit=unit, disable=disable, initial=initial,
                file=_Lines(stream), mininterval=log_interval(), maxinterval=max(log_interval(), 10.0),
                bar_format=LOG_FORMAT, ascii=True)
