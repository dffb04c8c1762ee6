"""Image encoders: images in [-1, 1] -> a global descriptor ("CLS", [B, D]) and a spatial latent [B, C, H, W].

Every encoder takes float images [B, 3, R, R] in [-1, 1] (``sourceflow.data.images.to_model_range``) and
returns float32 tensors on the encoder's device. ``load_encoder`` is the one entry point; the names:

- ``pixels``: the image itself (spatial [3, R, R]); CLS = the flattened image, optionally pooled first.
- ``dinov2``: DINOv2 (with registers) as RAE uses it; CLS token + patch tokens, final LayerNorm without affine.
- ``siglip2``: SigLIP / SigLIP2 vision tower; CLS = attention-pool head output, patch tokens as above.
- ``mae``: ViT-MAE encoder with mask ratio 0 (identity patch order); CLS = token 0.
- ``sd-vae``: the Stable Diffusion VAE (diffusers AutoencoderKL); decodable.
- ``rae``: a Representation Autoencoder (diffusers AutoencoderRAE; DINOv2-B with registers by default);
  spatial = RAE's normalised latent, CLS = token 0 of the same encoder forward; decodable.

Weights are ``from_pretrained(path_or_hub_id)`` folders (``save_pretrained`` layout: config.json +
*.safetensors). Nothing here downloads anything at import time; a missing local folder is a one-line
error naming the folder.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:  # annotations only: the workflow's preflight imports encoders.weights without torch
    import torch

ENCODERS = ("pixels", "dinov2", "siglip2", "mae", "sd-vae", "rae")
OPTIONS: dict[str, tuple[str, ...]] = {"pixels": ("pool",), "dinov2": ("input_size",), "siglip2": ("input_size",),
                                       "mae": ("input_size",), "sd-vae": (), "rae": ()}


@runtime_checkable
class ImageEncoder(Protocol):
    """What the latent extraction and the samplers rely on."""

    name: str
    resolution: int
    cls_dim: int
    spatial_shape: tuple[int, int, int]
    decodable: bool

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float [B, 3, R, R] in [-1, 1] -> (cls [B, D], spatial [B, C, H, W])."""
        ...

    def decode(self, spatial: torch.Tensor) -> torch.Tensor:
        """spatial [B, C, H, W] -> images [B, 3, R, R] in [-1, 1]; ValueError if not decodable."""
        ...


def load_encoder(name: str, weights: str | None, resolution: int, device: str | torch.device = "cpu",
                 **options) -> ImageEncoder:
    """Build encoder ``name`` for ``resolution``×``resolution`` images, in eval mode on ``device``.

    ``weights`` is a local ``save_pretrained`` folder or a Hugging Face hub id (``None``: the encoder's
    default id, which only works where the hub or its cache is reachable). Options per encoder:
    pixels: ``pool`` (side length of the average-pooled CLS); dinov2 / siglip2 / mae: ``input_size``
    (resize the images to this side, bicubic, before the model; RAE feeds DINOv2 224 px); sd-vae, rae: none
    (an RAE resizes to its own encoder input size and decodes at its decoder's size, resized to ``resolution``).
    Options that are ``None`` are ignored.
    """
    options = {k: v for k, v in options.items() if v is not None}
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r} (choose from {', '.join(ENCODERS)})")
    unknown = sorted(set(options) - set(OPTIONS[name]))
    if unknown:  # e.g. --pool with dinov2: one line, not a TypeError traceback from the constructor
        raise ValueError(f"encoder {name!r} does not take option(s) {', '.join(unknown)} "
                         f"(it takes: {', '.join(OPTIONS[name]) or 'none'})")
    if resolution < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    if name == "pixels":
        from sourceflow.encoders.pixels import PixelEncoder

        if weights:
            raise ValueError(f"the pixels encoder takes no weights (got --weights {weights})")
        enc: ImageEncoder = PixelEncoder(resolution, **options)
    elif name in ("dinov2", "siglip2", "mae"):
        from sourceflow.encoders.vit import load_vit

        enc = load_vit(name, weights, resolution, **options)
    elif name == "sd-vae":
        from sourceflow.encoders.vae import load_sd_vae

        enc = load_sd_vae(weights, resolution, **options)
    elif name == "rae":
        from sourceflow.encoders.rae import load_rae

        enc = load_rae(weights, resolution, **options)
    else:
        raise ValueError(f"unknown encoder {name!r} (choose from {', '.join(ENCODERS)})")
    return enc.to(device)  # type: ignore[attr-defined]
