"""load_latent_data on a real store: a flipped row's CLS (what MM-FM's mode coupling reads) is the flipped
image's own, not its unflipped image's; the latents are normalised as the stats file says (variance only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from sourceflow.build import training_dataset
from sourceflow.data.latent_data import load_latent_data
from sourceflow.data.manifest import manifest_hash, write_manifest
from sourceflow.flow.couplings import ModeCoupling
from sourceflow.gmm.diag import DiagGMM
from sourceflow.store.latents import LatentStore, LatentWriter, expected_index_flip
from sourceflow.store.stats import compute_latent_stats

from .test_image_methods import CASES, image_config

M, SHAPE, D = 12, (3, 8, 8), 6


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path, Path, dict[str, np.ndarray]]:
    """A manifest of 15 images (3 of them in the test split), a complete store over the 12 train images
    with flipped rows whose CLS differs from the unflipped image's, and variance-only stats."""
    tmp = tmp_path_factory.mktemp("latent_data")
    frame = pd.DataFrame({"index": np.arange(15), "path": [f"img/{i}.png" for i in range(15)],
                          "label": np.arange(15) % 3, "split": ["test" if i % 5 == 0 else "train" for i in range(15)]})
    write_manifest(tmp / "manifest.parquet", frame, {"source": "synthetic", "root": str(tmp), "num_classes": 3})
    train = frame.loc[frame["split"] == "train", "index"].to_numpy()
    assert len(train) == M
    g = np.random.default_rng(0)
    index, flip = expected_index_flip(train, True)
    spatial = (1.5 + g.normal(size=(2 * M, *SHAPE))).astype(np.float32)
    cls = g.normal(size=(2 * M, D)).astype(np.float32)  # the flipped images' CLS are their own
    arrays = {"cls": cls, "spatial": spatial, "index": index, "flip": flip}
    store = tmp / "latents.zarr"
    LatentWriter.create(store, {"encoder": "pixels", "weights": None, "encoder_options": {}, "resolution": 8,
                                "manifest_hash": manifest_hash(tmp / "manifest.parquet"), "split": "train"},
                        cls_dim=D, spatial_shape=SHAPE, num_images=M, flips=True, shard_rows=5)
    w = LatentWriter(store)
    for s in range(w.num_shards):
        a, b = w.shard_range(s)
        w.write_shard(s, {n: v[a:b] for n, v in arrays.items()})
    assert w.verify(index, flip) == []
    w.mark_complete()
    compute_latent_stats(LatentStore.open(store), eps=1e-5, mode="std").save(tmp / "stats.safetensors")
    return store, tmp / "stats.safetensors", tmp / "manifest.parquet", arrays


def test_every_row_carries_its_own_cls(files):
    store, stats, manifest, arrays = files
    data = load_latent_data(store, stats, manifest)
    assert len(data) == 2 * M and data.cls.shape == (2 * M, D)
    np.testing.assert_array_equal(data.cls[torch.arange(2 * M)].numpy(), arrays["cls"])
    flipped = np.flatnonzero(data.flip == 1)
    assert len(flipped) == M and (data.image_index[flipped] == data.image_index[flipped - M]).all()
    assert not np.allclose(arrays["cls"][flipped], arrays["cls"][flipped - M])  # the test can tell them apart
    # what the mode coupling reads: the batch's CLS rows, through the builder's training dataset
    spec = image_config("mmfm", **CASES["mmfm"])
    idx = torch.tensor([M + 4, 4, M + 9])
    b = training_dataset(spec, data).batch(idx, torch.device("cpu"))
    np.testing.assert_array_equal(b.cls.numpy(), arrays["cls"][idx.numpy()])
    # and so a flipped row's mode posterior is the flipped image's: two modes centred on the two CLS
    gmm = DiagGMM(torch.full((2,), 0.5, dtype=torch.float64), torch.from_numpy(arrays["cls"][[4, M + 4]]).double(),
                  torch.full((2, D), 1e-2, dtype=torch.float64))
    assert ModeCoupling(gmm, "hard").modes(b.cls[:2], None).tolist() == [1, 0]


def test_latents_are_normalised_by_the_stats_files_rule(files):
    store, stats, manifest, arrays = files
    data = load_latent_data(store, stats, manifest)
    assert data.stats.mode == "std" and data.stats.eps == 1e-5
    x = arrays["spatial"].astype(np.float64)
    ref = x / np.sqrt(x.var(0) + 1e-5)  # RAE: variance only, no mean subtracted
    np.testing.assert_allclose(data.x[torch.arange(2 * M)].double().numpy(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(data.stats.denormalize(data.x[torch.arange(2 * M)]), torch.from_numpy(arrays["spatial"]),
                               rtol=1e-6, atol=1e-5)
