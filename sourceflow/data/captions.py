"""Captions: CSFM-style JSONL files (one object per line with an image path and a caption), joined to the
manifest by normalised relative path; and generated captions for the digits.

Path normalisation (both for caption paths and for the manifest paths they are matched against):

1. backslashes become ``/``;
2. ``posixpath.normpath``: leading ``./`` removed, ``a//b``, ``a/./b`` and ``a/x/../b`` collapsed,
   trailing ``/`` dropped;
3. a configured prefix (normalised the same way) is removed when the path starts with it on a
   component boundary (e.g. ``/data/imagenet/train`` or ``train``: ``train/n01/x.JPEG`` -> ``n01/x.JPEG``,
   but ``trainer/x.JPEG`` is kept);
4. nothing else: matching is case-sensitive, extensions are kept, absolute paths stay absolute
   (so an absolute caption path only matches after its prefix is stripped).

Manifest paths are matched relative to their split's own root (``manifest.json`` ``split_roots``:
with a separate ``--test-root`` the manifest root is the common parent, e.g. ``train/`` and ``val/``).
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

DIGIT_TEMPLATES = (
    "a handwritten digit {word}",
    "the number {digit} written by hand",
    "a handwritten {word}",
    "a low-resolution scan of a handwritten {digit}",
    "the digit {word}, drawn by hand",
    "a small grayscale image of the number {word}",
)


def digit_captions(labels: np.ndarray | list[int], seed: int) -> list[str]:
    """One caption per digit label from :data:`DIGIT_TEMPLATES`, the template drawn per image (seeded)."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError("digit labels must be in 0..9")
    choice = np.random.default_rng(seed).integers(0, len(DIGIT_TEMPLATES), size=len(labels))
    return [DIGIT_TEMPLATES[t].format(word=NUMBER_WORDS[y], digit=y) for y, t in zip(labels, choice, strict=True)]


def write_caption_jsonl(path: str | Path, paths: list[str], captions: list[str],
                        path_field: str = "path", caption_field: str = "recaption_short") -> None:
    """Write a CSFM-format caption file atomically (one ``{"path": ..., "recaption_short": ...}`` per line)."""
    from sourceflow.io import write_text

    lines = [json.dumps({path_field: p, caption_field: c}, ensure_ascii=False) for p, c in
             zip(paths, captions, strict=True)]
    write_text(path, "\n".join(lines) + ("\n" if lines else ""))


def _norm(path: str) -> str:
    p = str(path).replace("\\", "/")
    if not p:
        return ""
    p = posixpath.normpath(p)
    return "" if p == "." else p


def normalize_path(path: str, prefix: str = "") -> str:
    """Normalise an image path for matching (see the module docstring for exactly what)."""
    p = _norm(path)
    pre = _norm(prefix).rstrip("/") if prefix else None
    if pre is not None:
        if p == pre:
            return ""
        if p.startswith(pre + "/"):
            p = p[len(pre) + 1:]
    return p


def read_caption_jsonl(path: str | Path, path_field: str = "path", caption_field: str = "recaption_short"
                       ) -> pd.DataFrame:
    """Read a caption JSONL into a frame (``path``, ``caption``, ``line``: 1-based line number).

    Blank lines are skipped; a line that is not a JSON object, lacks a field or holds a non-string
    is a one-line error naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption file not found: {path}")
    paths, caps, lines = [], [], []
    with open(path, encoding="utf-8") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e}); fix or drop that line") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            for key in (path_field, caption_field):
                if key not in obj:
                    raise KeyError(f"{path}:{n}: no field {key!r} (fields: {', '.join(obj)}); "
                                   "set --path-field / --caption-field")
                if not isinstance(obj[key], str):
                    raise ValueError(f"{path}:{n}: field {key!r} is {type(obj[key]).__name__}, expected a string")
            paths.append(obj[path_field])
            caps.append(obj[caption_field])
            lines.append(n)
    return pd.DataFrame({"path": paths, "caption": caps, "line": np.asarray(lines, dtype=np.int64)})


@dataclass
class Alignment:
    """Result of joining captions to manifest rows."""

    aligned: pd.DataFrame  # index (manifest), path (manifest path), caption ("" when the image has none)
    report: dict

    @property
    def fraction(self) -> float:
        return float(self.report["fraction_images_matched"])


def align_captions(rows: pd.DataFrame, captions: pd.DataFrame, *, prefix: str = "",
                   split_roots: dict[str, str] | None = None, max_listed: int = 1000) -> Alignment:
    """Join caption rows to manifest rows by normalised path.

    ``rows``: manifest rows (index, path, split); ``captions``: from :func:`read_caption_jsonl`;
    ``prefix``: stripped from caption paths; ``split_roots``: per split, the folder (relative to the
    manifest root) its images live in, stripped from manifest paths before matching.
    A path captioned twice keeps its first caption (counted in the report, with examples).
    Images without a caption get ``""`` and are all listed in the report; caption paths that match no
    image are counted and listed up to ``max_listed``.
    """
    split_roots = split_roots or {}
    keys = [normalize_path(p, split_roots.get(s, "")) for p, s in zip(rows["path"], rows["split"], strict=True)]
    if len(set(keys)) != len(keys):
        k = pd.Series(keys)
        raise ValueError(f"manifest paths collide after normalisation (e.g. {k[k.duplicated()].iat[0]!r}); "
                         "align one split at a time")
    cap_keys = pd.Series([normalize_path(p, prefix) for p in captions["path"]], dtype=object)
    dup_mask = cap_keys.duplicated(keep="first").to_numpy()
    dup_keys = cap_keys[dup_mask]
    first = pd.DataFrame({"key": cap_keys[~dup_mask].to_numpy(), "caption": captions["caption"].to_numpy()[~dup_mask]})
    conflicting = 0
    if dup_mask.any():
        by_key = dict(zip(first["key"], first["caption"], strict=True))
        conflicting = int(sum(by_key[k] != c for k, c in zip(dup_keys, captions["caption"].to_numpy()[dup_mask],
                                                              strict=True)))
    lookup = dict(zip(first["key"], first["caption"], strict=True))
    has = np.array([k in lookup for k in keys], dtype=bool)
    aligned = pd.DataFrame({
        "index": rows["index"].to_numpy(dtype=np.int64),
        "path": rows["path"].astype(str).to_numpy(),
        "caption": [lookup.get(k, "") for k in keys],
    })
    key_set = set(keys)
    unmatched_captions = [p for p, k in zip(captions["path"].to_numpy()[~dup_mask], first["key"], strict=True)
                          if k not in key_set]
    n = len(keys)
    report = {
        "images": n,
        "images_matched": int(has.sum()),
        "images_without_caption": int(n - has.sum()),
        "fraction_images_matched": float(has.mean()) if n else 0.0,
        "caption_lines": int(len(captions)),
        "caption_paths_unique": int(len(first)),
        "caption_paths_matched": int(len(first) - len(unmatched_captions)),
        "caption_paths_unmatched": len(unmatched_captions),
        "duplicate_caption_lines": int(dup_mask.sum()),
        "duplicate_caption_lines_with_a_different_caption": conflicting,
        "duplicate_examples": sorted(set(dup_keys))[:20],
        "empty_captions_among_matched": int(sum(1 for c, h in zip(aligned["caption"], has, strict=True)
                                                if h and not c.strip())),
        "images_without_caption_paths": aligned.loc[~has, "path"].tolist(),
        "unmatched_caption_paths_examples": unmatched_captions[:max_listed],
        "prefix": prefix,
        "split_roots": split_roots,
    }
    return Alignment(aligned, report)


def mismatch_message(report: dict, threshold: float, examples: int = 5) -> str:
    """One line for a failed alignment: the fraction and the first unmatched paths on both sides."""
    img = report["images_without_caption_paths"][:examples]
    cap = report["unmatched_caption_paths_examples"][:examples]
    return (f"captions match only {report['images_matched']} of {report['images']} images "
            f"({100 * report['fraction_images_matched']:.2f}% < --min-match-fraction {100 * threshold:.2f}%); "
            f"images without a caption, e.g. {img}; caption paths matching no image "
            f"({report['caption_paths_unmatched']}), e.g. {cap}; check --prefix / --path-field")
