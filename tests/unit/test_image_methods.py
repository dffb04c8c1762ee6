"""Every method on image latents (a synthetic in-memory latent set, the real builders and loop): the loss
falls on a fixed batch, training resumes exactly, MM-FM's focal weight and mode coupling, CSFM's
Perceiver source, grad accumulation and the learning-rate schedule."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from snakemake.utils import validate

from sourceflow.build import build_method, build_model, training_dataset
from sourceflow.config import resolve_experiments
from sourceflow.data.latent_data import LatentData, StoreRows, TextRows
from sourceflow.flow.method import FocalModeWeights, Objective
from sourceflow.gmm.diag import DiagGMM
from sourceflow.store.stats import LatentStats
from sourceflow.train.loop import TrainSettings, step_generator, train

from .test_io_config import SCHEMA

SHAPE = (3, 8, 8)
K = 4


def image_config(method: str, **extra) -> dict:
    """A one-experiment config on an image dataset (tiny DiT), validated and resolved like the workflow's."""
    cfg = {"datasets": {"digits": {
        "kind": "digits", "encoders": {"pixels": {"kind": "pixels"}},
        "gmm": [{"encoder": "pixels", "components": [K]}],
        "captions": {"text_encoders": {"minilm": {"kind": "minilm"}}},
        "reference": {"features": ["feature-net"]},
        "defaults": {"model": {"kind": "dit", "size": "DiT-XT/2"},
                     "train": {"steps": 12, "batch_size": 16, "lr": 3e-3, "checkpoint_every": 5, "log_every": 2}}}},
        "experiments": [{"name": "x", "method": method, "data": "digits", **extra}]}
    validate(cfg, str(SCHEMA))
    return resolve_experiments(cfg)["x"]


CASES = {
    "fm": {},
    "fm-label-cfg": {"conditioning": "label", "overrides": {"train": {"p_uncond": 0.2}}},
    "otcfm": {},
    "loom": {"coupling": {"num_caches": 2}},
    "c2ot": {"conditioning": "label"},
    "mmfm": {"source": {"kind": "gmm", "components": K}, "conditioning": "mode"},
    "mmfm-focal": {"source": {"kind": "gmm", "components": K}, "conditioning": "mode",
                   "regularizers": {"focal_gamma": 2.0, "focal_ema": 0.9, "focal_clip": [0.3, 3.0]}},
    "csfm": {"conditioning": "text", "source": {"kind": "learned", "width": 32, "depth": 1, "heads": 2, "patch": 2}},
    "csfm-label": {"conditioning": "label", "source": {"kind": "learned", "width": 32, "depth": 1, "heads": 2}},
    "fm-unet": {"conditioning": "label",
                "overrides": {"model": {"kind": "unet", "block_out_channels": [32, 64], "layers_per_block": 1}}},
    "fm-ditdh-text": {"conditioning": "text", "overrides": {"model": {"size": "DiTDH-XT/2"}}},
}


def method_of(case: str) -> str:
    return case.split("-")[0]


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    """48 images with flipped copies (96 rows), 4 classes, 5-token captions, CLS descriptors, and the CLS /
    spatial GMM files MM-FM reads."""
    g = np.random.default_rng(0)
    m, n_cls, length, width = 48, 4, 5, 16
    labels = np.arange(m) % n_cls
    base = g.normal(size=(n_cls, *SHAPE)).astype(np.float32)
    x = base[labels] + 0.3 * g.normal(size=(m, *SHAPE)).astype(np.float32)
    x = np.concatenate([x, x[..., ::-1]])  # rows m.. are the flipped copies
    cls = x.reshape(2 * m, -1)[:, :12].copy()  # every row's own descriptor (a flipped row's differs)
    tokens = g.normal(size=(m, length, width)).astype(np.float32)
    mask = (np.arange(length)[None] < 2 + labels[:, None] % 3).astype(np.uint8)
    rows = np.concatenate([np.arange(m), np.arange(m)])
    stats = LatentStats(torch.from_numpy(x.mean(0)), torch.from_numpy(x.var(0)))
    data = LatentData(StoreRows(x, None, stats.normalize), torch.from_numpy(np.concatenate([labels, labels])), n_cls,
                      StoreRows(cls), rows, np.repeat([0, 1], m).astype(np.uint8), stats,
                      TextRows(StoreRows(tokens, rows), StoreRows(mask, rows)), {"encoder": "pixels"})
    d = tmp_path_factory.mktemp("gmm")
    cls_gmm = DiagGMM(torch.full((K,), 1 / K).double(), torch.from_numpy(cls[:K]).double(), torch.ones(K, 12).double())
    cls_gmm.save(d / "cls.safetensors")
    save_file({"weights": torch.full((K,), 1 / K).double(), "means": torch.randn(K, *SHAPE),
               "variances": torch.full((K,), 0.5)}, str(d / "spatial.safetensors"))
    return data, d / "cls.safetensors", d / "spatial.safetensors"


def build(case, latents, seed=0):
    data, cls_gmm, spatial = latents
    spec = image_config(method_of(case), **CASES[case])
    torch.manual_seed(seed)
    return spec, build_model(spec, data), build_method(spec, data, seed, cls_gmm, spatial)


@pytest.mark.parametrize("case", list(CASES))
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(case, latents):
    spec, model, method = build(case, latents)
    data = latents[0]
    ds = training_dataset(spec, data)
    batch = ds.batch(torch.arange(0, 96, 6), torch.device("cpu"))  # 16 rows, flipped ones included
    obj = Objective(model, method)
    opt = torch.optim.Adam([p for p in obj.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(25):
        loss, terms = obj(batch, slice(None), step_generator(0, 0, "pair"), step_generator(0, 0, "loss"))
        assert math.isfinite(loss.item()) and terms["fm"] > 0
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert min(losses[-5:]) < 0.8 * losses[0], losses


@pytest.mark.parametrize("case", ["loom", "mmfm-focal", "csfm", "c2ot"])
def test_resume_on_latents_equals_uninterrupted(case, latents, tmp_path):
    data = latents[0]

    def run(out, **kw):
        spec, model, method = build(case, latents)
        return train(model, method, training_dataset(spec, data), TrainSettings.from_spec(spec["train"]), 0, out,
                     "hash", progress=False, **kw)

    run(tmp_path / "straight")
    assert run(tmp_path / "killed", stop_after=7) == {"stopped_at": 7}
    assert run(tmp_path / "killed")["resumed_from"] == 5
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    if case == "loom":  # the seed cache covers every row, flipped copies as datapoints of their own
        assert a["method.coupling.seeds"].shape == (96, 2)
    if case == "mmfm-focal":
        assert bool(a["method.focal.seen"].any()) and "method.focal.loss_ema" in a


def test_mode_coupling_reads_each_rows_own_cls(latents):
    """MM-FM samples the mode from the CLS of the image as seen after the flip: a flipped row's own CLS.
    (load_latent_data on a real store: tests/unit/test_latent_data.py.)"""
    data = latents[0]
    spec = image_config("mmfm", **CASES["mmfm"])
    ds = training_dataset(spec, data)
    b = ds.batch(torch.tensor([3, 3 + 48]), torch.device("cpu"))
    torch.testing.assert_close(b.cls, data.cls[torch.tensor([3, 3 + 48])])
    assert not torch.equal(b.cls[0], b.cls[1])  # the flipped row's descriptor is not its image's


def test_focal_weights_follow_mm_fm_warmup_normalisation_and_clip():
    """MM-FM (DESIGN.md): weight 1 for the first 2500 micro-batches; then w_k = (L_k / mean L)^2 over the
    seen modes, 1 for modes never seen, normalised so all K weights average 1, then clipped to [0.3, 3];
    no per-batch renormalisation."""
    f = FocalModeWeights(4, gamma=2.0, ema=0.5, clip=(0.3, 3.0), warmup=2)
    mode = torch.tensor([0, 0, 1, 2, 2, 2])
    assert torch.equal(f.weights(mode), torch.ones(6))  # nothing seen yet
    f.update(mode, torch.tensor([1.0, 3.0, 1.0, 4.0, 4.0, 4.0]))
    assert f.loss_ema.tolist() == [2.0, 1.0, 4.0, 0.0]  # first observations initialise the EMA
    assert torch.equal(f.weights(mode), torch.ones(6))  # still in the warm-up (1 of 2 micro-batches)
    f.update(torch.tensor([0]), torch.tensor([4.0]))
    assert f.loss_ema.tolist() == [3.0, 1.0, 4.0, 0.0]  # 0.5·2 + 0.5·4
    # independent computation of the published rule; mode 3 was never seen: raw weight 1
    ref = np.mean([3.0, 1.0, 4.0])
    raw = np.array([(3.0 / ref) ** 2, (1.0 / ref) ** 2, (4.0 / ref) ** 2, 1.0])
    w = np.clip(raw / raw.mean(), 0.3, 3.0)
    np.testing.assert_allclose(f.mode_weights().numpy(), w, rtol=1e-12)
    np.testing.assert_allclose(f.weights(mode).numpy(), w[mode.numpy()], rtol=1e-6)
    assert f.weights(mode).mean() != pytest.approx(1.0)  # no per-batch renormalisation
    # the clip acts after the normalisation: a dominant mode is capped at 3
    h = FocalModeWeights(4, warmup=0)
    h.update(torch.arange(4), torch.tensor([100.0, 1.0, 1.0, 1.0]))
    assert float(h.mode_weights()[0]) == 3.0 and float(h.mode_weights()[1]) == pytest.approx(0.3)
    g = FocalModeWeights(4, warmup=2)
    g.load_state_dict(f.state_dict())  # EMA, seen modes and the micro-batch count are state
    assert int(g.micro_batches) == 2 and torch.equal(g.weights(mode), f.weights(mode))


def test_csfm_source_is_a_function_of_the_caption(latents):
    spec, model, method = build("csfm", latents)
    data = latents[0]
    assert type(method.source.net).__name__ == "PerceiverSource"
    cond = data.condition("text")[torch.tensor([0, 1])]
    with torch.no_grad():
        for p in method.source.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
        mean, logvar = method.source.stats(cond)
    assert mean.shape == (2, *SHAPE) and not torch.allclose(mean[0], mean[1])


def test_cosine_schedule_and_warmup():
    s = TrainSettings(steps=11, batch_size=4, lr=1.0, weight_decay=0, betas=(0.9, 0.99), warmup_steps=2, ema_decay=0.9,
                      grad_clip=0, checkpoint_every=5, log_every=1, lr_schedule="cosine", min_lr=0.1)
    assert s.lr_at(0) == pytest.approx(0.5)  # warm-up: (step + 1) / warmup
    assert s.lr_at(2) == pytest.approx(1.0)
    assert s.lr_at(10) == pytest.approx(0.1)
    assert s.lr_at(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))


def test_grad_accumulation_trains_and_resumes(latents, tmp_path):
    data = latents[0]

    def run(out, **kw):
        spec, model, method = build("otcfm", latents)
        spec["train"]["grad_accum"] = 2
        return train(model, method, training_dataset(spec, data), TrainSettings.from_spec(spec["train"]), 0, out,
                     "hash", progress=False, **kw)

    run(tmp_path / "a")
    run(tmp_path / "b", stop_after=6)
    run(tmp_path / "b")
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(ln) for ln in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 6 and all(math.isfinite(r["loss"]) for r in log)


def test_image_experiment_config_errors():
    from sourceflow.config import ConfigError

    with pytest.raises(ConfigError, match=r"source.components: no spatial GMM with K=7"):
        image_config("mmfm", source={"kind": "gmm", "components": 7}, conditioning="mode")
    with pytest.raises(ConfigError, match="c2ot coupling needs a data condition"):
        image_config("c2ot", conditioning="text")
    with pytest.raises(ConfigError, match="'angle' is not available for image data"):
        image_config("fm", conditioning="angle")
    with pytest.raises(ConfigError, match="model.kind: image latents need an image model"):
        image_config("fm", overrides={"model": {"kind": "mlp"}})
    with pytest.raises(ConfigError, match="grad_accum: must divide batch_size"):
        image_config("fm", overrides={"train": {"grad_accum": 3}})
    with pytest.raises(ConfigError, match="guidance_scale: classifier-free guidance needs a class condition"):
        image_config("fm", conditioning="label", overrides={"sample": {"guidance_scale": 2.0}})
    with pytest.raises(ConfigError, match="guidance_scale: classifier-free guidance needs a class condition"):
        image_config("mmfm", **CASES["mmfm"], overrides={"sample": {"guidance_scale": 2.0}})


def test_encoder_names_are_filled_or_checked():
    from sourceflow.config import ConfigError

    assert image_config("fm")["encoder"] == "pixels"  # the only encoder
    assert image_config("csfm", **CASES["csfm"])["text_encoder"] == "minilm"
    with pytest.raises(ConfigError, match=r"\.encoder: dataset 'digits' has no encoder 'dino'"):
        image_config("fm", encoder="dino")
    with pytest.raises(ConfigError, match=r"\.text_encoder: only used with conditioning: text"):
        image_config("fm", text_encoder="minilm")


def test_input_fingerprint_follows_file_contents_and_store_attributes(tmp_path):
    """What keeps a checkpoint trained on another GMM / latent store from being resumed."""
    import zarr

    from sourceflow.io import input_fingerprint

    f = tmp_path / "gmm.safetensors"
    f.write_bytes(b"a" * 5000)
    store = tmp_path / "latents.zarr"
    zarr.open_group(str(store), mode="w").attrs["manifest_hash"] = "x"
    first = input_fingerprint([f, store, None])
    assert input_fingerprint([f, store]) == first
    f.write_bytes(b"a" * 4999 + b"b")
    assert input_fingerprint([f, store]) != first
    f.write_bytes(b"a" * 5000)
    zarr.open_group(str(store), mode="r+").attrs["manifest_hash"] = "y"
    assert input_fingerprint([f, store]) != first


def test_store_rows_read_per_batch_equal_rows_read_into_memory(tmp_path):
    """The ImageNet path (rows read from Zarr per batch) returns what the in-memory path returns, in the
    requested order, with repeats, through a row map and a transform."""
    import zarr

    g = np.random.default_rng(0)
    arr = zarr.create_array(str(tmp_path / "a.zarr"), shape=(40, 3, 2), chunks=(4, 3, 2), dtype="float32")
    arr[:] = g.normal(size=(40, 3, 2)).astype(np.float32)
    row_map = np.concatenate([np.arange(20), np.arange(20)])  # 40 dataset rows over the first 20 array rows
    lazy = StoreRows(arr, row_map, lambda t: 2 * t + 1, in_memory=False)
    eager = StoreRows(arr, row_map, lambda t: 2 * t + 1, in_memory=True)
    idx = torch.tensor([39, 3, 3, 25, 0, 17])
    assert lazy.shape == eager.shape == (40, 3, 2)
    assert torch.equal(lazy[idx], eager[idx])
    assert torch.equal(eager[idx][0], 2 * torch.from_numpy(np.asarray(arr[19])) + 1)
    assert eager.data.shape[0] == 20  # only the rows the map reaches were read
