"""The ``rae`` encoder: tiny random-weight diffusers ``AutoencoderRAE`` models (the real class, encoder built
from config, no download), saved with save_pretrained and loaded back through load_encoder; spatial and decode
checked against AutoencoderRAE's own encode / decode, CLS against an independent encoder forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sourceflow import standins
from sourceflow.encoders import ImageEncoder, load_encoder

R = 12  # dataset side = the tiny decoder's output side (3 x 3 patches of 4 px)
C = 64  # AutoencoderRAE builds its encoder with head_dim 64: hidden 64 = one attention head
G = 3  # encoder grid: 42 px input / 14 px patches
TINY = dict(encoder_num_hidden_layers=1, decoder_hidden_size=32, decoder_num_hidden_layers=1,
            decoder_num_attention_heads=2, decoder_intermediate_size=64, decoder_patch_size=4)
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


KINDS = {"dinov2": 14, "siglip2": 16, "mae": 16}  # encoder patch size per encoder type


def build_rae(kind: str, folder) -> None:
    """A tiny RAE of ``kind`` with non-trivial latent statistics and scaling, saved to ``folder``."""
    standins.save_pretrained(standins.autoencoder_rae(kind, grid=G, encoder_patch_size=KINDS[kind], encoder_hidden_size=C,
                                                      scaling_factor=0.7, **TINY), folder)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict:
    """{encoder_type: saved folder}, or the AttributeError where diffusers cannot build that encoder."""
    root = tmp_path_factory.mktemp("rae")
    paths: dict = {}
    for kind in KINDS:
        try:
            build_rae(kind, root / kind)
            paths[kind] = root / kind
        except AttributeError as e:  # diffusers 0.42.1 + transformers 5: SiglipVisionModel has no .vision_model
            paths[kind] = e
    return paths


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(3, 3, R, R, generator=torch.Generator().manual_seed(0)) * 2 - 1


def load_rae_model(path):
    from diffusers import AutoencoderRAE

    return AutoencoderRAE.from_pretrained(path).eval()


def ln_no_affine(h: torch.Tensor, eps: float) -> torch.Tensor:
    return (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + eps)


def test_dinov2_rae_spatial_cls_decode(weights, images):
    enc = load_encoder("rae", str(weights["dinov2"]), R)
    assert isinstance(enc, ImageEncoder) and enc.decodable and enc.name == "rae"
    assert (enc.cls_dim, enc.spatial_shape) == (C, (C, G, G))
    cls, spatial = enc.encode(images)
    assert cls.dtype == spatial.dtype == torch.float32
    assert cls.shape == (3, C) and spatial.shape == (3, C, G, G)

    rae = load_rae_model(weights["dinov2"])
    x01 = (images + 1) / 2
    with torch.no_grad():
        ref_latent = rae.encode(x01).latent
        assert torch.equal(spatial, ref_latent)  # exactly AutoencoderRAE's latent
        # independent CLS: RAE's input pipeline, then the transformer blocks, then LayerNorm without affine
        x = F.interpolate(x01, size=(14 * G, 14 * G), mode="bicubic", align_corners=False)
        x = (x - IMAGENET_MEAN) / IMAGENET_STD
        model = rae.encoder
        pre = model.encoder(model.embeddings(x)).last_hidden_state
    assert model.layernorm.weight is None and model.layernorm.bias is None
    assert pre.shape[1] == 1 + 4 + G * G  # CLS, 4 registers, patches
    tokens = ln_no_affine(pre, model.config.layer_norm_eps)
    torch.testing.assert_close(cls, tokens[:, 0], rtol=1e-5, atol=1e-5)
    # the latent is RAE's normalised patch grid: (grid - mean) / (std + 1e-5) * scaling_factor
    grid = tokens[:, 5:].transpose(1, 2).reshape(3, C, G, G)
    mean, std = rae._latents_mean, rae._latents_std
    torch.testing.assert_close(spatial, (grid - mean) / (std + 1e-5) * 0.7, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(spatial, grid, atol=1e-2)  # the normalisation really is applied

    out = enc.decode(spatial)
    assert out.shape == (3, 3, R, R) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    with torch.no_grad():
        ref = rae.decode(ref_latent).sample
    torch.testing.assert_close(out, ref.clamp(0, 1) * 2 - 1, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="rae decode expects latents"):
        enc.decode(spatial[:, :, :2])


def test_rae_decode_resizes_to_resolution(weights):
    r = 20  # dataset side != decoder side 12: images go in at 20 px, come out at 20 px
    enc = load_encoder("rae", str(weights["dinov2"]), r)
    imgs = torch.rand(2, 3, r, r, generator=torch.Generator().manual_seed(2)) * 2 - 1
    cls, spatial = enc.encode(imgs)
    assert spatial.shape == (2, C, G, G)
    out = enc.decode(spatial)
    assert out.shape == (2, 3, r, r) and out.min() >= -1 and out.max() <= 1
    rae = load_rae_model(weights["dinov2"])
    with torch.no_grad():
        assert torch.equal(spatial, rae.encode((imgs + 1) / 2).latent)
        small = rae.decode(spatial).sample.clamp(0, 1) * 2 - 1
    ref = F.interpolate(small, size=(r, r), mode="bicubic", align_corners=False, antialias=True).clamp(-1, 1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[B, 3, 20, 20\]"):
        enc.encode(torch.zeros(1, 3, R, R))


@pytest.mark.parametrize("kind", ["siglip2", "mae"])
def test_siglip2_mae_rae_cls(weights, images, kind, tmp_path, monkeypatch):
    folder = weights[kind]
    if isinstance(folder, Exception):
        # diffusers 0.42.1 reaches the SigLIP tower's post_layernorm as ``model.vision_model.post_layernorm``;
        # transformers 5's SiglipVisionModel *is* the tower. Alias it (this test only) to test our side.
        from transformers import SiglipVisionModel

        monkeypatch.setattr(SiglipVisionModel, "vision_model", property(lambda self: self), raising=False)
        folder = tmp_path / kind
        build_rae(kind, folder)
    enc = load_encoder("rae", str(folder), R)
    cls, spatial = enc.encode(images)
    assert (cls.shape, spatial.shape) == ((3, C), (3, C, G, G))
    rae = load_rae_model(folder)
    x01 = (images + 1) / 2
    with torch.no_grad():
        assert torch.equal(spatial, rae.encode(x01).latent)
        x = F.interpolate(x01, size=(16 * G, 16 * G), mode="bicubic", align_corners=False)
        x = (x - IMAGENET_MEAN) / IMAGENET_STD
        if kind == "siglip2":
            out = rae.encoder(x, interpolate_pos_encoding=True)
            assert rae.encoder.post_layernorm.weight is None
            ref = out.pooler_output  # attention-pool head over the affine-free normalised tokens
            assert not torch.allclose(cls, out.last_hidden_state.mean(1), atol=1e-3)  # the head, not a mean
        else:
            n = G * G
            out = rae.encoder(x, torch.arange(n, dtype=x.dtype).expand(3, n), interpolate_pos_encoding=True)
            ref = out.last_hidden_state[:, 0]  # MAE's CLS token
    torch.testing.assert_close(cls, ref, rtol=1e-5, atol=1e-5)
    assert enc.decode(spatial).shape == (3, 3, R, R)


def test_rae_deterministic_batch_independent_and_slicing(weights, images):
    enc = load_encoder("rae", str(weights["dinov2"]), R)
    a, b, one = enc.encode(images), enc.encode(images), enc.encode(images[1:2])
    for u, v, w in zip(a, b, one, strict=True):
        assert torch.equal(u, v)
        torch.testing.assert_close(u[1:2], w, rtol=1e-4, atol=1e-5)
    enc.rae.use_slicing = True  # one encoder call per image: the CLS hook must collect all of them
    for u, s in zip(a, enc.encode(images), strict=True):
        torch.testing.assert_close(u, s, rtol=1e-4, atol=1e-5)


def test_rae_errors(weights, tmp_path):
    missing = tmp_path / "no_such_rae"
    with pytest.raises(FileNotFoundError) as e:
        load_encoder("rae", str(missing), R)
    assert str(missing) in str(e.value) and "\n" not in str(e.value)
    not_rae = tmp_path / "not_rae"
    not_rae.mkdir()
    (not_rae / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    with pytest.raises(ValueError, match="not an AutoencoderRAE"):
        load_encoder("rae", str(not_rae), R)
    with pytest.raises(ValueError, match="does not take option"):
        load_encoder("rae", str(weights["dinov2"]), R, input_size=224)


def test_rae_unbuildable_encoder_is_one_clear_error(weights, tmp_path):
    """Where diffusers cannot build the SigLIP2 tower with the installed transformers, loading says so."""
    import json
    import shutil

    if not isinstance(weights["siglip2"], Exception):
        pytest.skip("this diffusers / transformers pair builds SigLIP2 RAEs")
    folder = tmp_path / "siglip2_rae"
    shutil.copytree(weights["dinov2"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(encoder_type="siglip2", encoder_patch_size=16, encoder_input_size=16 * G)
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RuntimeError, match="cannot build this RAE's siglip2 encoder with transformers") as e:
        load_encoder("rae", str(folder), R)
    assert "\n" not in str(e.value)
