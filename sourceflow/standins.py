"""Stand-ins for what the pipeline reads but this machine cannot download: tiny random-weight models of the
real classes and small datasets laid out exactly as the real inputs.

Nothing here fetches anything. Models are built from configs with random weights and saved the way a
downloaded checkpoint is (``save_pretrained`` folders, a TorchScript file), so the pipeline loads them
through its real code paths (``from_pretrained``, ``torch.jit.load``). The unit tests and the rehearsal
(:mod:`sourceflow.rehearsal`) share these builders.

Models (each builder returns the unsaved model unless it says otherwise):

- :func:`dinov2_registers`: transformers ``Dinov2WithRegistersModel`` (MM-FM's DINOv2-B with registers).
- :func:`autoencoder_rae`: diffusers ``AutoencoderRAE`` (RAE's DINOv2 encoder + ViT decoder).
- :func:`autoencoder_kl`: diffusers ``AutoencoderKL`` (the SD-VAE).
- :func:`save_clip_text`: transformers ``CLIPTextModel`` + a ``CLIPTokenizer`` built from a generated
  character-level vocabulary and merges (CSFM's CLIP ViT-L/14 text tower).
- :class:`TFResizeInception` / :func:`save_inception`: a TorchScript file with the interface clean-fid's
  ``InceptionV3W`` uses of ``inception-2015-12-05.pt``.

Data: :func:`write_image_folder` (ImageNet-style class folders of JPEGs with odd sizes and modes, or
CIFAR-10 / CelebA-HQ style PNG folders), :func:`write_caption_jsonl` (CSFM's caption file) and
:func:`write_adm_reference_npz` (an ADM reference batch: ``mu``, ``sigma``, ``mu_s``, ``sigma_s``).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

INCEPTION_FEATURES = 2048  # pool3 width of the real Inception; the stand-in keeps it
ADM_SPATIAL_FEATURES = 64  # mu_s / sigma_s width of the stand-in ADM batch (ADM's evaluator never reads them here)


# --- models ------------------------------------------------------------------------------------------------


def randomize_layernorms(model: nn.Module, seed: int = 1) -> nn.Module:
    """Random LayerNorm affines (weight ~ 1 + 0.5·N, bias ~ 0.5·N), so "with affine" and "without affine"
    give different tokens: a fresh model's LayerNorms are the identity affine and would hide that."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm) and m.weight is not None:
                m.weight.copy_(1 + 0.5 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=g))
    return model


def dinov2_registers(image_size: int, patch_size: int = 14, hidden_size: int = 32, num_hidden_layers: int = 2,
                     num_attention_heads: int = 2, intermediate_size: int = 64, num_register_tokens: int = 4,
                     seed: int | None = 0) -> nn.Module:
    """A random ``Dinov2WithRegistersModel`` (transformers), eval mode; ``seed`` None keeps the global RNG."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    if seed is not None:
        torch.manual_seed(seed)
    cfg = Dinov2WithRegistersConfig(image_size=image_size, patch_size=patch_size, hidden_size=hidden_size,
                                    num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                                    intermediate_size=intermediate_size, num_register_tokens=num_register_tokens)
    return Dinov2WithRegistersModel(cfg).eval()


def autoencoder_rae(encoder_type: str = "dinov2", grid: int = 3, encoder_patch_size: int = 14,
                    encoder_hidden_size: int = 64, encoder_num_hidden_layers: int = 1, decoder_patch_size: int = 4,
                    decoder_hidden_size: int = 32, decoder_num_hidden_layers: int = 1,
                    decoder_num_attention_heads: int = 2, decoder_intermediate_size: int = 64,
                    scaling_factor: float = 0.7, seed: int = 0) -> nn.Module:
    """A random diffusers ``AutoencoderRAE`` with non-trivial per-position latent statistics.

    The encoder sees ``grid·encoder_patch_size`` pixels (``grid``² patches); the decoder writes
    ``grid·decoder_patch_size`` pixels. diffusers builds the encoder with 64-channel heads, so
    ``encoder_hidden_size`` must be a multiple of 64. ``latents_mean`` ~ 0.3·N and ``latents_std`` ~ 0.5 + U
    per (c, h, w), so the normalisation inside ``encode`` is visible.
    """
    from diffusers import AutoencoderRAE

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    shape = (encoder_hidden_size, grid, grid)
    return AutoencoderRAE(
        encoder_type=encoder_type, encoder_hidden_size=encoder_hidden_size, encoder_patch_size=encoder_patch_size,
        encoder_num_hidden_layers=encoder_num_hidden_layers, encoder_input_size=encoder_patch_size * grid,
        decoder_hidden_size=decoder_hidden_size, decoder_num_hidden_layers=decoder_num_hidden_layers,
        decoder_num_attention_heads=decoder_num_attention_heads, decoder_intermediate_size=decoder_intermediate_size,
        patch_size=decoder_patch_size, latents_mean=0.3 * torch.randn(shape, generator=g),
        latents_std=0.5 + torch.rand(shape, generator=g), scaling_factor=scaling_factor,
    ).eval()


def autoencoder_kl(sample_size: int, block_out_channels: tuple[int, ...] = (8, 16), latent_channels: int = 4,
                   norm_num_groups: int = 4, layers_per_block: int = 1, scaling_factor: float = 0.5,
                   seed: int | None = 0) -> nn.Module:
    """A random diffusers ``AutoencoderKL``: downsampling 2^(levels − 1) (SD-VAE: 4 levels = f8)."""
    from diffusers import AutoencoderKL

    if seed is not None:
        torch.manual_seed(seed)
    levels = len(block_out_channels)
    return AutoencoderKL(block_out_channels=tuple(block_out_channels), down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, latent_channels=latent_channels,
                         norm_num_groups=norm_num_groups, layers_per_block=layers_per_block, sample_size=sample_size,
                         scaling_factor=scaling_factor).eval()


CLIP_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,!-'"


def save_clip_text(path: str | Path, hidden_size: int = 32, num_hidden_layers: int = 2, num_attention_heads: int = 4,
                   intermediate_size: int = 64, max_position_embeddings: int = 77, seed: int = 0) -> Path:
    """A random ``CLIPTextModel`` with a character-level BPE ``CLIPTokenizer`` (built here from a generated
    vocabulary and two merges, "c a" and "ca t</w>"), saved together like a downloaded CLIP folder."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path = Path(path)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CLIP_CHARS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    merges = [("c", "a"), ("ca", "t</w>")]
    vocab["ca"], vocab["cat</w>"] = len(vocab), len(vocab) + 1
    CLIPTokenizer(vocab=vocab, merges=merges).save_pretrained(path)
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                         max_position_embeddings=max_position_embeddings, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1, projection_dim=16)
    CLIPTextModel(cfg).save_pretrained(path)
    return path


class TFResizeInception(nn.Module):
    """Stand-in for clean-fid's TorchScript Inception (``inception-2015-12-05.pt``) with the interface
    ``InceptionV3W`` uses: ``forward(img, return_features)`` does what the real file does before its layers,
    a TF-style bilinear resize of float [0, 255] images to 299² (affine grid, half-pixel offset, border
    padding), then (x − 128) / 128; ``layers`` maps normalised 299² input to [B, 2048, 1, 1] and keeps a 4×4
    spatial grid of features (128 channels × 16 cells), so resize details change the output."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(3, 128, kernel_size=5, stride=4), nn.Tanh(), nn.AdaptiveAvgPool2d(4),
                                    nn.Flatten(), nn.Unflatten(1, (INCEPTION_FEATURES, 1, 1)))

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        b, c, h, w = img.shape
        x = img.to(torch.float32)
        theta = torch.eye(2, 3, device=x.device)
        theta[0, 2] += theta[0, 0] / w - theta[0, 0] / 299
        theta[1, 2] += theta[1, 1] / h - theta[1, 1] / 299
        grid = F.affine_grid(theta.unsqueeze(0).repeat(b, 1, 1), [b, c, 299, 299], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return self.layers((x - 128) / 128)


def save_inception(path: str | Path, seed: int = 0) -> Path:
    """Script :class:`TFResizeInception` with random weights and save it as a TorchScript file at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    with warnings.catch_warnings():  # torch ≥ 2.10 deprecates TorchScript; clean-fid's file is TorchScript
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(TFResizeInception().eval()).save(str(path))
    return path


def save_pretrained(model: nn.Module, path: str | Path) -> Path:
    """``model.save_pretrained(path)`` (safetensors, config.json) and the path."""
    path = Path(path)
    model.save_pretrained(path)
    return path


# --- data --------------------------------------------------------------------------------------------------

# (width, height) of stand-in photos: square, landscape, portrait, smaller than a 256 crop, odd sides
PHOTO_SIZES = ((256, 256), (500, 375), (333, 500), (200, 150), (301, 257), (640, 427), (257, 301))
# the few modes ImageNet's JPEGs come in besides RGB (a handful of grayscale and CMYK files)
PHOTO_MODES = ("RGB", "RGB", "RGB", "L", "RGB", "CMYK", "RGB")


def _smooth_image(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A smooth random uint8 [H, W, 3] picture (a bicubic upsample of 6×6 noise plus grain), so crops,
    flips and resizes change the pixels the way they change photos."""
    low = torch.from_numpy(rng.uniform(0, 255, (1, 3, 6, 6)).astype(np.float32))
    up = F.interpolate(low, size=(height, width), mode="bicubic", align_corners=False)[0]
    up = up + torch.from_numpy(rng.normal(0, 8, up.shape).astype(np.float32))
    return up.clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def write_image_folder(root: str | Path, classes: list[str], per_class: int, ext: str = ".JPEG",
                       sizes: tuple[tuple[int, int], ...] = PHOTO_SIZES, modes: tuple[str, ...] = ("RGB",),
                       seed: int = 0, name: str = "{cls}_{i}") -> list[str]:
    """``root/<class>/<name><ext>`` images, ``per_class`` per class, cycling through ``sizes`` and ``modes``
    (JPEG quality 90; PNG lossless). Returns the written paths relative to ``root`` (POSIX)."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    fmt = "JPEG" if ext.lower() in (".jpg", ".jpeg") else ext.lstrip(".").upper()
    paths = []
    k = 0
    for cls in classes:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = sizes[k % len(sizes)]
            img = Image.fromarray(_smooth_image(rng, w, h)).convert(modes[k % len(modes)])
            rel = f"{cls}/{name.format(cls=cls, i=i)}{ext}"
            img.save(root / rel, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
            paths.append(rel)
            k += 1
    return paths


def imagenet_wnids(n: int) -> list[str]:
    """``n`` class-folder names shaped like ImageNet's WordNet ids (n01440764, …)."""
    return [f"n{1440764 + 1000 * i:08d}" for i in range(n)]


WORDS = ("a", "photo", "of", "small", "large", "red", "green", "dog", "cat", "bird", "on", "the", "grass",
         "in", "water", "near", "tree", "two", "blue", "car")


def write_caption_jsonl(path: str | Path, rel_paths: list[str], seed: int = 0, path_field: str = "path",
                        caption_field: str = "recaption_short") -> Path:
    """CSFM's caption file: one JSON object per line, ``path`` relative to the train root and a short caption
    of random words (plus a second field CSFM's files carry, which readers must ignore)."""
    rng = np.random.default_rng(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for rel in rel_paths:
            words = rng.choice(WORDS, size=int(rng.integers(3, 9)))
            f.write(json.dumps({path_field: rel, caption_field: " ".join(words),
                                "recaption_long": " ".join(words) + ", in more words."}) + "\n")
    return path


def write_adm_reference_npz(path: str | Path, dim: int = INCEPTION_FEATURES, spatial_dim: int = ADM_SPATIAL_FEATURES,
                            seed: int = 0) -> Path:
    """An ADM reference batch (VIRTUAL_*.npz layout): ``mu`` [dim], ``sigma`` [dim, dim] and the spatial
    statistics ``mu_s``, ``sigma_s``, all float64: the mean and covariance of 2·dim random feature rows with
    uneven scales (so ``sigma`` is positive definite, as ADM's are)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for suffix, d in (("", dim), ("_s", spatial_dim)):
        x = rng.normal(0.0, 1.0, (2 * d, d)) * rng.uniform(0.1, 1.0, d) + rng.normal(0.0, 0.5, d)
        arrays["mu" + suffix] = x.mean(0)
        arrays["sigma" + suffix] = np.cov(x, rowvar=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to some names
        np.savez(f, **arrays)
    return path


__all__ = ["INCEPTION_FEATURES", "PHOTO_MODES", "PHOTO_SIZES", "TFResizeInception", "autoencoder_kl",
           "autoencoder_rae", "dinov2_registers", "imagenet_wnids", "randomize_layernorms", "save_clip_text",
           "save_inception", "save_pretrained", "write_adm_reference_npz", "write_caption_jsonl",
           "write_image_folder"]
