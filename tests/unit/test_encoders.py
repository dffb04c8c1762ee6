"""Image encoders: tiny random-weight models of the real transformers / diffusers classes, saved with
save_pretrained and loaded back through load_encoder; outputs checked against direct calls of the model
(token positions, non-affine final LayerNorm, patch order), plus shapes, determinism and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sourceflow import standins
from sourceflow.encoders import ImageEncoder, load_encoder

R = 42  # 3 x 3 patches of 14 px: a non-trivial grid, so a transposed patch order would show
PATCH = 14
G = R // PATCH
D = 32
TINY = dict(hidden_size=D, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict:
    """Tiny models saved to folders: {name: path}."""
    import transformers as tf

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("weights")
    models = {
        "dinov2_reg": standins.dinov2_registers(R, PATCH, num_register_tokens=4, seed=None, **TINY),
        "dinov2_plain": tf.Dinov2Model(tf.Dinov2Config(image_size=R, patch_size=PATCH, **TINY)),
        "siglip2_naflex": tf.Siglip2VisionModel(tf.Siglip2VisionConfig(num_patches=16, patch_size=PATCH, **TINY)),
        "siglip2_full": tf.Siglip2Model(tf.Siglip2Config(
            text_config=dict(vocab_size=50, max_position_embeddings=8, **TINY),
            vision_config=dict(num_patches=16, patch_size=PATCH, **TINY))),
        "siglip_fixed": tf.SiglipVisionModel(tf.SiglipVisionConfig(image_size=R, patch_size=PATCH, **TINY)),
        "mae": tf.ViTMAEForPreTraining(tf.ViTMAEConfig(
            image_size=R, patch_size=PATCH, decoder_hidden_size=16, decoder_num_hidden_layers=1,
            decoder_num_attention_heads=2, decoder_intermediate_size=32, **TINY)),
    }
    paths = {}
    for name, model in models.items():
        paths[name] = standins.save_pretrained(standins.randomize_layernorms(model), root / name)
    vae = standins.autoencoder_kl(R, (8, 16), latent_channels=4, norm_num_groups=4, scaling_factor=0.5, seed=None)
    paths["vae"] = standins.save_pretrained(vae, root / "vae")
    return paths


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(3, 3, R, R, generator=g) * 2 - 1


def ln_no_affine(h: torch.Tensor, eps: float) -> torch.Tensor:
    return (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + eps)


def check_grid(spatial: torch.Tensor, tokens: torch.Tensor) -> None:
    """spatial [B, D, G, G] holds patch token i*G + j at (i, j)."""
    assert spatial.shape == (tokens.shape[0], D, G, G)
    for i in range(G):
        for j in range(G):
            torch.testing.assert_close(spatial[:, :, i, j], tokens[:, i * G + j], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("folder, registers", [("dinov2_reg", 4), ("dinov2_plain", 0)])
def test_dinov2_tokens(weights, images, folder, registers):
    import transformers as tf

    enc = load_encoder("dinov2", str(weights[folder]), R)
    assert isinstance(enc, ImageEncoder) and not enc.decodable
    assert (enc.cls_dim, enc.spatial_shape) == (D, (D, G, G))
    cls, spatial = enc.encode(images)

    model_cls = tf.Dinov2WithRegistersModel if registers else tf.Dinov2Model
    model = model_cls.from_pretrained(weights[folder]).eval()
    x = ((images + 1) / 2 - IMAGENET_MEAN) / IMAGENET_STD
    with torch.no_grad():
        pre = model.encoder(model.embeddings(x)).last_hidden_state  # before the final LayerNorm
        post = model(pixel_values=x).last_hidden_state  # transformers' output: LayerNorm with affine
    assert pre.shape[1] == 1 + registers + G * G
    ref = ln_no_affine(pre, model.config.layer_norm_eps)
    torch.testing.assert_close(cls, ref[:, 0], rtol=1e-5, atol=1e-5)
    check_grid(spatial, ref[:, 1 + registers:])
    assert not torch.allclose(cls, post[:, 0], atol=1e-2)  # the affine really is left out
    # RAE's way (the model's own LayerNorm with the affine switched off) gives the same tokens
    model.layernorm.weight, model.layernorm.bias = None, None
    with torch.no_grad():
        rae = model(pixel_values=x).last_hidden_state
    torch.testing.assert_close(cls, rae[:, 0], rtol=1e-5, atol=1e-5)


def test_encoders_deterministic_and_batch_independent(weights, images):
    for name, folder in [("dinov2", "dinov2_reg"), ("siglip2", "siglip2_naflex"), ("mae", "mae"), ("sd-vae", "vae")]:
        enc = load_encoder(name, str(weights[folder]), R)
        a = enc.encode(images)
        b = enc.encode(images)
        one = enc.encode(images[1:2])
        for u, v, w in zip(a, b, one, strict=True):
            assert u.dtype == torch.float32
            assert torch.equal(u, v), name
            torch.testing.assert_close(u[1:2], w, rtol=1e-4, atol=1e-5)


def test_siglip2_naflex_patchify_and_pooler(weights, images):
    import transformers as tf
    from transformers.models.siglip2.image_processing_pil_siglip2 import convert_image_to_patches

    for folder in ("siglip2_naflex", "siglip2_full"):
        enc = load_encoder("siglip2", str(weights[folder]), R)
        assert (enc.cls_dim, enc.spatial_shape) == (D, (D, G, G))
        cls, spatial = enc.encode(images)
        model = tf.Siglip2VisionModel.from_pretrained(weights["siglip2_naflex"]).eval() if folder.endswith("naflex") \
            else tf.Siglip2Model.from_pretrained(weights[folder]).vision_model.eval()
        # the image processor's own patchify, image by image ([-1, 1] is SigLIP's mean = std = 0.5 range)
        seq = torch.from_numpy(np.stack([convert_image_to_patches(im.numpy(), PATCH) for im in images]))
        mask = torch.ones(len(images), G * G, dtype=torch.long)
        shapes = torch.tensor([[G, G]] * len(images))
        with torch.no_grad():
            out = model(pixel_values=seq, pixel_attention_mask=mask, spatial_shapes=shapes)
            pre = model.encoder(model.embeddings(seq, shapes)).last_hidden_state
        torch.testing.assert_close(cls, out.pooler_output, rtol=1e-5, atol=1e-5)
        check_grid(spatial, ln_no_affine(pre, model.config.layer_norm_eps))


def test_siglip_fixed_resolution(weights, images):
    import transformers as tf

    enc = load_encoder("siglip2", str(weights["siglip_fixed"]), R)
    cls, spatial = enc.encode(images)
    model = tf.SiglipVisionModel.from_pretrained(weights["siglip_fixed"]).eval()
    with torch.no_grad():
        out = model(pixel_values=images)
        pre = model.encoder(model.embeddings(images)).last_hidden_state
    torch.testing.assert_close(cls, out.pooler_output, rtol=1e-5, atol=1e-5)
    check_grid(spatial, ln_no_affine(pre, model.config.layer_norm_eps))


def test_mae_identity_patch_order(weights, images):
    import transformers as tf

    enc = load_encoder("mae", str(weights["mae"]), R)
    cls, spatial = enc.encode(images)
    model = tf.ViTMAEModel.from_pretrained(weights["mae"]).eval()
    assert model.config.mask_ratio == 0.75  # the saved config masks; load_encoder must have set 0
    x = ((images + 1) / 2 - IMAGENET_MEAN) / IMAGENET_STD
    emb = model.embeddings
    with torch.no_grad():  # the embedding without any shuffle or mask, written out
        patches = emb.patch_embeddings(x) + emb.position_embeddings[:, 1:]
        tok0 = (emb.cls_token + emb.position_embeddings[:, :1]).expand(len(x), -1, -1)
        pre = torch.cat([tok0, patches], dim=1)
        layers = model.layers if hasattr(model, "layers") else model.encoder.layer  # transformers 5 | 4
        for layer in layers:
            pre = layer(pre, None)
            pre = pre[0] if isinstance(pre, tuple) else pre
    ref = ln_no_affine(pre, model.config.layer_norm_eps)
    assert pre.shape[1] == 1 + G * G
    torch.testing.assert_close(cls, ref[:, 0], rtol=1e-5, atol=1e-5)
    check_grid(spatial, ref[:, 1:])


def test_sd_vae_encode_decode(weights, images):
    from diffusers import AutoencoderKL

    enc = load_encoder("sd-vae", str(weights["vae"]), R)
    assert enc.decodable and enc.scaling_factor == 0.5
    assert (enc.cls_dim, enc.spatial_shape) == (4, (4, R // 2, R // 2))
    cls, z = enc.encode(images)
    vae = AutoencoderKL.from_pretrained(weights["vae"]).eval()
    with torch.no_grad():
        mean = vae.encode(images).latent_dist.mean
        ref_dec = vae.decode(mean).sample.clamp(-1, 1)
    torch.testing.assert_close(z, mean * 0.5, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cls, z.mean(dim=(2, 3)))
    dec = enc.decode(z)
    assert dec.shape == images.shape
    torch.testing.assert_close(dec, ref_dec, rtol=1e-4, atol=1e-4)


def test_pixels(images):
    enc = load_encoder("pixels", None, R)
    cls, spatial = enc.encode(images)
    assert torch.equal(spatial, images) and torch.equal(enc.decode(spatial), images)
    assert torch.equal(cls, images.reshape(3, -1)) and enc.cls_dim == 3 * R * R
    enc = load_encoder("pixels", None, R, pool=6)
    cls, _ = enc.encode(images)
    ref = images.reshape(3, 3, 6, 7, 6, 7).mean(dim=(3, 5)).reshape(3, -1)  # 7 x 7 blocks
    assert enc.cls_dim == 3 * 36
    torch.testing.assert_close(cls, ref)


def test_input_size_resize(weights, images):
    enc = load_encoder("dinov2", str(weights["dinov2_reg"]), R, input_size=28)
    assert enc.spatial_shape == (D, 2, 2)
    assert enc.encode(images)[1].shape == (3, D, 2, 2)


def test_errors(weights, tmp_path, images):
    missing = tmp_path / "no" / "dinov2"
    with pytest.raises(FileNotFoundError, match=f"weights not found: {missing}"):
        load_encoder("dinov2", str(missing), R)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_encoder("sd-vae", str(tmp_path), R)
    with pytest.raises(ValueError, match="not a dinov2 model"):
        load_encoder("dinov2", str(weights["mae"]), R)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        load_encoder("dinov2", str(weights["dinov2_reg"]), 40)
    with pytest.raises(ValueError, match="takes no weights"):
        load_encoder("pixels", "x", R)
    with pytest.raises(ValueError, match="unknown encoder"):
        load_encoder("clip", None, R)
    with pytest.raises(ValueError, match="'sd-vae' does not take option\\(s\\) pool \\(it takes: none\\)"):
        load_encoder("sd-vae", None, R, pool=2)
    with pytest.raises(ValueError, match="'pixels' does not take option\\(s\\) input_size"):
        load_encoder("pixels", None, R, input_size=16)
    with pytest.raises(ValueError, match="cannot decode"):
        load_encoder("mae", str(weights["mae"]), R).decode(torch.zeros(1, D, G, G))
    with pytest.raises(ValueError, match="expects images"):
        load_encoder("pixels", None, R).encode(images[:, :, :20])
