"""Image training data: the normalized spatial latents of a latent store, with what the methods
condition on (class labels from the manifest, caption embeddings) and the CLS descriptors MM-FM's
mode coupling needs.

One row per store row: with flips, the flipped copy of an image is a datapoint of its own (LOOM-CFM
keeps a seed cache per row), carrying its image's label and caption. Its CLS descriptor is its *own*
(the store's CLS of the flipped image): MM-FM samples each batch's modes from the soft CLS posterior of
the image as seen after the random flip. (The spatial GMM, built offline, puts a flipped copy in its
unflipped image's hard mode instead; see ``sourceflow.gmm.spatial``.)

Arrays that fit ``max_memory_mb`` are read into memory once; larger ones (ImageNet's 1.28M × 768×16×16
latents) stay in the Zarr store and every batch reads its rows (:class:`StoreRows`), so the same code
trains on digits and at full scale.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sourceflow.io import reading
from sourceflow.models.embed import pack_text
from sourceflow.store.latents import LatentStore
from sourceflow.store.sharded import GuardedArray, check_chunk_files
from sourceflow.store.stats import LatentStats


def _float32(t: torch.Tensor) -> torch.Tensor:
    """float16 rows of a half-precision store as float32 (what the models and normalisation compute in)."""
    return t.float() if t.dtype == torch.float16 else t


class StoreRows:
    """Rows of a Zarr array, indexable like a tensor: ``rows[idx]`` → tensor of ``len(idx)`` rows.

    ``row_map`` maps dataset rows to array rows (identity when None); ``transform`` is applied to the
    rows read (e.g. the latent normalization). With ``in_memory`` the rows the map can reach are read
    once, on first use (so a CLS table only MM-FM reads costs nothing for the other methods).
    """

    def __init__(self, array: Any, row_map: np.ndarray | None = None,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None, in_memory: bool = True):
        self.array = array
        self.row_map = None if row_map is None else np.asarray(row_map, dtype=np.int64)
        self.transform = transform
        self.in_memory = in_memory
        self.data: torch.Tensor | None = None
        n = len(self.row_map) if self.row_map is not None else int(array.shape[0])
        self.shape = (n, *(int(s) for s in array.shape[1:]))

    def _load(self) -> torch.Tensor:
        if self.data is None:
            stop = int(self.row_map.max()) + 1 if self.row_map is not None and len(self.row_map) else None
            full = _float32(torch.from_numpy(np.ascontiguousarray(self.array[:stop])))
            self.data = self.transform(full) if self.transform else full
        return self.data

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx: torch.Tensor | np.ndarray | slice) -> torch.Tensor:
        if isinstance(idx, slice):
            idx = np.arange(len(self))[idx]
        i = np.asarray(idx.cpu() if torch.is_tensor(idx) else idx, dtype=np.int64).reshape(-1)
        rows = self.row_map[i] if self.row_map is not None else i
        if self.in_memory:
            return self._load()[torch.from_numpy(rows)]
        uniq, inverse = np.unique(rows, return_inverse=True)
        out = _float32(torch.from_numpy(read_rows(self.array, uniq)))[torch.from_numpy(inverse)]
        return self.transform(out) if self.transform else out


def read_rows(array: Any, rows: np.ndarray) -> np.ndarray:
    """Sorted unique ``rows`` of a Zarr array, one basic slice per run of consecutive rows.

    Not Zarr's orthogonal selection: on a sharded array with row-granular chunks (Zarr 3.1.6) it took ~30 ms
    per random row of 768x16x16 float16 against ~2 ms for a slice of one row (benchmarks/data_path.py).
    """
    out = np.empty((len(rows), *array.shape[1:]), dtype=array.dtype)
    if not len(rows):
        return out
    starts = np.flatnonzero(np.diff(rows, prepend=rows[0] - 2) != 1)
    for j, k in zip(starts, [*starts[1:], len(rows)], strict=True):
        out[j:k] = array[int(rows[j]):int(rows[j]) + (k - j)]
    return out


class TextRows:
    """Caption embeddings of dataset rows, packed (tokens + mask, see ``pack_text``) for the models."""

    def __init__(self, tokens: StoreRows, mask: StoreRows):
        self.tokens, self.mask = tokens, mask
        self.shape = (tokens.shape[0], tokens.shape[1], tokens.shape[2] + 1)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx: torch.Tensor | np.ndarray | slice) -> torch.Tensor:
        return pack_text(self.tokens[idx], self.mask[idx] > 0)


def _fits(array: Any, max_memory_mb: float) -> bool:
    return int(np.prod(array.shape, dtype=np.int64)) * np.dtype(array.dtype).itemsize <= max_memory_mb * 2**20


@dataclass
class LatentData:
    """An image training set (see module docstring). ``x`` [N, C, H, W] normalized latents."""

    x: StoreRows
    label: torch.Tensor  # [N] int64 class of each row's image (-1: unlabelled)
    num_classes: int
    cls: StoreRows  # [N, D] CLS descriptor of each row (a flipped row's is the flipped image's own)
    image_index: np.ndarray  # [N] manifest index of each row
    flip: np.ndarray  # [N] 1 = flipped copy
    stats: LatentStats
    text: TextRows | None = None
    store_attrs: dict | None = None

    def __len__(self) -> int:
        return len(self.x)

    @property
    def event_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    @property
    def num_images(self) -> int:
        return int((self.flip == 0).sum())

    @property
    def text_shape(self) -> tuple[int, int]:
        """(tokens L, width E) of the caption embeddings."""
        if self.text is None:
            raise ValueError("this dataset was loaded without captions (--captions)")
        return self.text.shape[1], self.text.shape[2] - 1

    def condition(self, kind: str) -> torch.Tensor | TextRows | None:
        """What a model conditions on: class ids (``label``), caption embeddings (``text``) or nothing."""
        if kind in ("none", "mode"):
            return None
        if kind == "label":
            if self.num_classes < 1 or bool((self.label < 0).any()):
                raise ValueError("conditioning 'label' needs a manifest with labels for every image")
            return self.label
        if kind == "text":
            if self.text is None:
                raise ValueError("conditioning 'text' needs caption embeddings (--captions)")
            return self.text
        raise ValueError(f"conditioning {kind!r} is not available for image data (label, text, mode or none)")

    def condition_rows(self, n: int, seed: int) -> np.ndarray:
        """``n`` dataset rows whose conditions a sampler uses: a seeded shuffle of the unflipped rows,
        repeated as needed, so the conditions follow the data's label / caption distribution."""
        rows = np.flatnonzero(self.flip == 0)
        g = np.random.default_rng(seed)
        reps = -(-n // len(rows))
        return np.concatenate([g.permutation(rows) for _ in range(reps)])[:n]


def load_latent_data(store_path: str | Path, stats_path: str | Path, manifest_path: str | Path,
                     captions_path: str | Path | None = None, max_memory_mb: float = 4000.0) -> LatentData:
    """Open a complete latent store with its statistics, labels and (optionally) caption embeddings."""
    from sourceflow.data.manifest import manifest_hash, read_manifest

    store = LatentStore.open(store_path)
    stats = LatentStats.load(stats_path)
    if tuple(stats.mean.shape) != store.spatial_shape:
        raise ValueError(f"{stats_path}: stats of shape {tuple(stats.mean.shape)} do not match the store's "
                         f"latents {store.spatial_shape} ({store_path})")
    mh = manifest_hash(manifest_path)
    if store.attrs.get("manifest_hash") not in (None, mh):
        raise ValueError(f"{store_path} was extracted from another manifest ({store.attrs.get('manifest_hash')} != "
                         f"{mh} of {manifest_path}); re-run extract_latents")
    index = store.read("index")
    flip = store.read("flip")
    manifest = read_manifest(manifest_path)
    frame = manifest.frame.set_index("index")
    missing = np.setdiff1d(index, frame.index.to_numpy())
    if len(missing):
        raise ValueError(f"{store_path}: {len(missing)} store rows name images absent from {manifest_path} "
                         f"(first index {int(missing[0])})")
    labels = np.array(frame["label"].reindex(index).fillna(-1), dtype=np.int64) if "label" in frame else np.full(len(index), -1)
    x_arr = store.array("spatial")
    x = StoreRows(x_arr, None, stats.normalize, in_memory=_fits(x_arr, max_memory_mb))
    # every row's own CLS: a flipped row's posterior is the one of the flipped image (MM-FM)
    cls_arr = store.array("cls")
    cls = StoreRows(cls_arr, None, None, in_memory=_fits(cls_arr, max_memory_mb))
    text = None
    if captions_path is not None:
        text = _caption_rows(captions_path, index, mh, max_memory_mb)
    return LatentData(x, torch.from_numpy(labels), manifest.num_classes, cls, index, flip, stats, text,
                      dict(store.attrs))


def _caption_rows(path: str | Path, image_index: np.ndarray, mhash: str, max_memory_mb: float) -> TextRows:
    """Caption embeddings (embed_captions' Zarr store) of each store row, joined on the manifest index."""
    import zarr

    p = Path(path)
    if not (p / "zarr.json").is_file():
        raise FileNotFoundError(f"caption embeddings not found: {p} (run the embed_captions stage)")
    fix = "delete it and rerun the embed_captions stage"
    with reading(p / "zarr.json", "Zarr group metadata (caption store)", fix):
        g = zarr.open_group(str(p), mode="r")
    if not g.attrs.get("complete", False):
        raise ValueError(f"{p}: caption store is incomplete (re-run embed_captions)")
    arrays = {}
    for name in ("index", "tokens", "mask"):
        with reading(p / name / "zarr.json", "Zarr array metadata (caption store)", fix):
            arrays[name] = GuardedArray(g[name], p / name, "Zarr array of the caption store (a chunk file)", fix)
    # no write_empty_chunks there, but an index chunk (fill -1) or a mask chunk (fill 0: no token) is never empty
    check_chunk_files(p, g, "the caption store", fix, ("index", "mask"))
    if g.attrs.get("manifest_hash") not in (None, mhash):
        raise ValueError(f"{p} was embedded for another manifest; re-run align_captions and embed_captions")
    cap_index = np.asarray(arrays["index"][:])
    pos = {int(i): r for r, i in enumerate(cap_index)}
    missing = [int(i) for i in np.unique(image_index) if int(i) not in pos]
    if missing:
        raise ValueError(f"{p}: no caption for {len(missing)} training images (first manifest index {missing[0]})")
    row_map = np.array([pos[int(i)] for i in image_index], dtype=np.int64)
    tok = arrays["tokens"]
    mask = arrays["mask"]
    return TextRows(StoreRows(tok, row_map, None, _fits(tok, max_memory_mb)),
                    StoreRows(mask, row_map, None, _fits(mask, max_memory_mb)))
