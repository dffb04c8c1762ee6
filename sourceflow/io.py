"""Atomic writes: every artifact is written to a temporary sibling and renamed into place, so a
killed job never leaves a partial file that looks finished."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)


FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def naming_full_disk(path: str | Path) -> Iterator[None]:
    """Re-raise a disk-full OSError (ENOSPC, EDQUOT) that names no file with ``path`` as its file name: a plain
    ``write`` (and every Zarr chunk write) reports none, and the stage's one-line error (``sourceflow.cli.run``)
    should say where the disk filled up."""
    try:
        yield
    except OSError as e:
        if e.errno in FULL_DISK and not e.filename:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; an artifact gets the usual permissions (shared groups)
    tmp_path = Path(tmp)
    try:
        with naming_full_disk(path):
            yield tmp_path
            with open(tmp_path, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


REWRITE = "delete it and rerun the stage that writes it"


def _damage_types() -> tuple[type[BaseException], ...]:
    """The exception types a truncated or overwritten file makes its reader raise (beyond OSError,
    ValueError and KeyError): safetensors' own error, a broken zip (npz), a short read, a bad struct, a
    garbled Zarr metadata document (zarr raises TypeError for a retyped field)."""
    import struct
    import zipfile

    types: list[type[BaseException]] = [zipfile.BadZipFile, EOFError, struct.error, TypeError]
    from safetensors import SafetensorError

    types.append(SafetensorError)
    return tuple(types)


def damaged(path: str | Path, what: str, e: BaseException, fix: str = REWRITE) -> ValueError:
    """The one-line error for a damaged input: which file, what it is, what went wrong, what to do."""
    msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    msg = " ".join(msg.split())  # one line, even for multi-line library messages
    return ValueError(f"{path}: not a readable {what} (damaged or truncated? {type(e).__name__}: {msg}); {fix}")


@contextlib.contextmanager
def reading(path: str | Path, what: str, fix: str = REWRITE) -> Iterator[None]:
    """Turn what a truncated or corrupt ``path`` makes its reader raise into ONE ValueError naming the file
    (``sourceflow.cli.run`` prints it as the stage's one ``error:`` line, exit 2).

    Passed through unchanged: FileNotFoundError (the readers say which stage writes the file), a full disk,
    and ValueError / KeyError whose message already names ``path`` (the readers' own checks). Wrap only the
    reading itself, so a bug elsewhere keeps its traceback."""
    try:
        yield
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno in FULL_DISK:
            raise
        raise damaged(path, what, e, fix) from e
    except (ValueError, KeyError) as e:
        if str(path) in str(e):
            raise
        raise damaged(path, what, e, fix) from e
    except Exception as e:
        if isinstance(e, _damage_types()):
            raise damaged(path, what, e, fix) from e
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> Any:
    try:
        with reading(path, "JSON file"):
            return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"missing file: {path}") from None


TIMINGS_TAG = "timings "


def log_timings(stage: str, **fields: Any) -> dict[str, Any]:
    """Print one ``timings {json}`` line to stdout, which every rule redirects to its log under results/logs.

    Timings and host facts go here, never into an artifact: an artifact must be byte-identical across runs
    of the same inputs and seed (issue 10, item 7). Returns the record (stage added)."""
    rec = {"stage": stage, **fields}
    print(TIMINGS_TAG + json.dumps(rec, sort_keys=True), flush=True)
    return rec


def read_timings(text_or_log: str | Path, stage: str | None = None) -> list[dict[str, Any]]:
    """The ``log_timings`` records in a log file (a Path) or captured stdout (a str), oldest first; only
    ``stage``'s when given. A missing log file is no records."""
    if isinstance(text_or_log, Path):
        if not text_or_log.exists():
            return []
        text_or_log = text_or_log.read_text(errors="replace")
    out = []
    for line in text_or_log.splitlines():
        if line.startswith(TIMINGS_TAG):
            try:
                rec = json.loads(line[len(TIMINGS_TAG):])
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            if stage is None or rec.get("stage") == stage:
                out.append(rec)
    return out


META_KEY = "sourceflow"


def save_safetensors(path: str | Path, tensors: dict[str, Any], metadata: dict[str, Any] | None = None) -> None:
    """Write a safetensors file atomically with ``metadata`` as ONE entry of sorted JSON: safetensors writes
    a metadata map in an order that changes from process to process, so several keys would make equal
    artifacts differ in bytes (and "did anything change?" would not be a ``cmp``)."""
    from safetensors.torch import save_file

    meta = {META_KEY: json.dumps(metadata, sort_keys=True, default=str)} if metadata else None
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)


def unpack_metadata(meta: dict[str, str] | None) -> dict[str, str]:
    """A file's metadata as flat string values: the single sorted-JSON entry of :func:`save_safetensors`
    unpacked, or the map of a file written before it."""
    meta = dict(meta or {})
    packed = meta.pop(META_KEY, None)
    if packed is not None:
        meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in json.loads(packed).items()})
    return meta


def read_safetensors(path: str | Path, keys: Iterable[str], what: str, hint: str = "", framework: str = "pt"
                     ) -> tuple[dict[str, Any], dict[str, str]]:
    """Tensors ``keys`` (torch, or numpy with ``framework="np"``) and the metadata of a safetensors file.

    One-line errors name the file: FileNotFoundError "<what> not found: <path> (<hint>)" (the hint
    says e.g. which stage writes it), ValueError for a file that is not safetensors (truncated, a
    stray file), KeyError for a missing tensor.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}" + (f" ({hint})" if hint else ""))
    keys = list(keys)
    with reading(path, "safetensors file", f"delete this {what} and rerun the stage that writes it"
                 + (f" ({hint})" if hint else "")), safe_open(str(path), framework=framework) as f:
        have = set(f.keys())
        missing = [k for k in keys if k not in have]
        if missing:
            raise KeyError(f"{path}: missing tensor(s) {missing} (has {sorted(have)})")
        return {k: f.get_tensor(k) for k in keys}, unpack_metadata(f.metadata())


def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Swap a fully written directory into place: final → .old, tmp → final, drop .old.

    A crash between the two renames leaves ``final.old`` holding the previous complete version, which
    :func:`resolve_dir` falls back to.
    """
    old = final_dir.with_name(final_dir.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final_dir.exists():
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old.exists():
        shutil.rmtree(old)


def resolve_dir(final_dir: Path) -> Path | None:
    """The newest complete version of a directory written by :func:`replace_dir`, or None."""
    if final_dir.is_dir():
        return final_dir
    old = final_dir.with_name(final_dir.name + ".old")
    return old if old.is_dir() else None


def input_fingerprint(paths: Iterable[str | Path | None]) -> str:
    """A short hash that changes when any input changes: a file by its size and its first and last MiB
    (cheap for multi-GB GMMs, and what a refit or re-extraction changes); a Zarr folder by its group
    attributes (``zarr.json``: encoder, manifest hash, settings). Resume uses it so a checkpoint trained
    on other inputs is not continued (Snakemake reruns a job when an input changes, but checkpoints are
    not outputs)."""
    import hashlib

    h = hashlib.sha256()
    for p in paths:
        if p is None:
            continue
        p = Path(p)
        h.update(p.name.encode())
        if p.is_dir():
            meta = p / "zarr.json"
            h.update(meta.read_bytes() if meta.is_file() else b"<dir>")
        else:
            size = p.stat().st_size
            h.update(str(size).encode())
            with open(p, "rb") as f:
                h.update(f.read(1 << 20))
                if size > 2 << 20:
                    f.seek(-(1 << 20), 2)
                    h.update(f.read())
    return h.hexdigest()[:16]


def write_npz_rows(path: str | Path, arrays: dict[str, Any], chunk_bytes: int = 64 << 20) -> None:
    """An uncompressed npz (what ``np.savez`` writes, readable by ``np.load`` and ADM's evaluator) whose
    members are copied from array-likes that read rows by slicing (e.g. Zarr arrays), ``chunk_bytes`` at a
    time, so writing 50k 256² samples (9.8 GB) needs one chunk of memory, not the whole array. Atomic."""
    import zipfile

    import numpy as np
    from numpy.lib import format as npf

    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, arr in arrays.items():
            shape, dtype = tuple(arr.shape), np.dtype(arr.dtype)
            if dtype.hasobject:
                raise ValueError(f"{path}: member {name!r} is an object array (not allowed: no pickle)")
            header = {"descr": npf.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                try:
                    npf.write_array_header_1_0(f, header)
                except ValueError:  # a header too long for format 1.0
                    npf.write_array_header_2_0(f, header)
                if not shape:
                    f.write(np.asarray(arr[()], dtype).tobytes())
                    continue
                row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)
                step = max(1, chunk_bytes // row_bytes)
                for i in range(0, shape[0], step):
                    f.write(np.ascontiguousarray(np.asarray(arr[i:i + step]), dtype=dtype).tobytes())
