"""The Representation Autoencoder (RAE, diffusers ``AutoencoderRAE``) as a decodable encoder.

An RAE is a frozen representation encoder (DINOv2 with registers, SigLIP2 or MAE, built by diffusers
from transformers classes with the final LayerNorm's affine removed) plus a trained ViT decoder, so
flows trained in its latent space decode back to images (the FID evaluation needs that).

Where which normalisation happens (all inside ``AutoencoderRAE``; we only map ranges):

- images: ours are [-1, 1]; RAE takes [0, 1] (its docs feed ``to_tensor`` images), so encode passes
  (x + 1) / 2. RAE resizes to its ``encoder_input_size`` (bicubic, align_corners=False, *no*
  antialias: RAE's own choice, kept so the latents are RAE's) and applies ``encoder_norm_mean/std``
  (ImageNet by default).
- tokens: the encoder's final LayerNorm has no affine (weight = bias = None), so every token of its
  ``last_hidden_state`` has zero mean and unit variance over channels.
- spatial latent: exactly ``AutoencoderRAE.encode(x).latent`` = (patch grid − latents_mean) /
  (latents_std + 1e-5) × scaling_factor, in eval mode, so no training noise (``noise_tau``) is added.
  decode inverts the scaling and the latent statistics inside ``AutoencoderRAE.decode``.
- CLS: taken from the same encoder forward (a forward hook on ``rae.encoder`` sees the transformers
  output of the call that ``encode`` makes), *not* latent-normalised (the statistics are per patch
  position):
  DINOv2: ``last_hidden_state[:, 0]`` (MM-FM's CLS; the sequence is [CLS, 4 registers, patches]).
  SigLIP2: no CLS token; ``pooler_output`` of the attention-pool head (as in ``vit.py``), fed — as
  inside RAE — the affine-free normalised tokens; the mean patch token if the tower has no head.
  (diffusers 0.42.1 cannot build SigLIP2 RAEs with transformers 5: it reaches for
  ``SiglipVisionModel.vision_model``, which transformers 5 removed; loading says so in one line.)
  MAE: ``last_hidden_state[:, 0]`` (MAE's CLS token).
- decode: ``AutoencoderRAE.decode`` un-normalises with ``encoder_norm_mean/std`` to ~[0, 1] without
  clamping; like diffusers' ``RAEDiTPipeline`` we clamp to [0, 1], then map to [-1, 1]. The decoder
  outputs its own ``image_size`` (e.g. 256); if that is not our ``resolution`` the images are resized
  to it (bicubic, antialias) and clamped again (bicubic overshoots).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sourceflow.encoders.base import EncoderModule
from sourceflow.encoders.weights import load_pretrained

# The DINOv2-B (with registers) RAE of the RAE paper, ViT-XL decoder, ImageNet latent statistics
# (diffusers' AutoencoderRAE docs list it with the other released RAEs under nyu-visionx/).
DEFAULT_WEIGHTS = "nyu-visionx/RAE-dinov2-wReg-base-ViTXL-n08"


class RAEEncoder(EncoderModule):
    """``AutoencoderRAE`` wrapped as a decodable :class:`~sourceflow.encoders.ImageEncoder` (see module docstring)."""

    name = "rae"
    decodable = True

    def __init__(self, rae: torch.nn.Module, resolution: int) -> None:
        cfg = rae.config
        if not cfg.reshape_to_2d:
            raise ValueError("rae: the model has reshape_to_2d=False (token latents); a [C, H, W] latent is needed")
        dim = int(cfg.encoder_hidden_size)
        grid = int(cfg.encoder_input_size) // int(cfg.encoder_patch_size)
        super().__init__(resolution, dim, (dim, grid, grid))
        self.rae = rae.eval().requires_grad_(False)
        self.encoder_type = str(cfg.encoder_type)
        self.encoder_input_size = int(cfg.encoder_input_size)
        self.decoder_image_size = int(rae.decoder_image_size)

    def _cls(self, out) -> torch.Tensor:
        """The global descriptor from one transformers encoder output (see module docstring)."""
        h = out.last_hidden_state
        if self.encoder_type == "siglip2":
            pooled = getattr(out, "pooler_output", None)
            return pooled if pooled is not None else h.mean(dim=1)
        return h[:, 0]

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (self.check_images(images) + 1.0) * 0.5  # [-1, 1] -> RAE's [0, 1]
        outputs: list = []  # one entry per encoder call (several if rae.use_slicing is on)
        handle = self.rae.encoder.register_forward_hook(lambda _m, _a, out: outputs.append(out))
        try:
            spatial = self.rae.encode(x).latent
        finally:
            handle.remove()
        cls = torch.cat([self._cls(o) for o in outputs], dim=0)
        if cls.shape[0] != spatial.shape[0]:
            raise RuntimeError(f"rae: encoder hook saw {cls.shape[0]} images for a batch of {spatial.shape[0]}")
        return cls.float().contiguous(), spatial.float().contiguous()

    @torch.inference_mode()
    def decode(self, spatial: torch.Tensor) -> torch.Tensor:
        if spatial.ndim != 4 or tuple(spatial.shape[1:]) != self.spatial_shape:
            raise ValueError(f"rae decode expects latents [B, {', '.join(map(str, self.spatial_shape))}], "
                             f"got {tuple(spatial.shape)}")
        z = spatial.to(self.device, torch.float32)
        x = self.rae.decode(z).sample.float().clamp(0.0, 1.0) * 2.0 - 1.0  # clamp as RAEDiTPipeline does
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bicubic", align_corners=False,
                              antialias=True).clamp(-1.0, 1.0)
        return x.contiguous()


def load_rae(weights: str | None, resolution: int) -> RAEEncoder:
    """Load an ``AutoencoderRAE`` folder (``save_pretrained`` layout) or hub id and wrap it."""
    from diffusers import AutoencoderRAE

    source = weights or DEFAULT_WEIGHTS
    cfg = load_pretrained(AutoencoderRAE.load_config, weights, DEFAULT_WEIGHTS, "rae")
    if cfg.get("_class_name") != "AutoencoderRAE":
        raise ValueError(f"{source}: config.json is not an AutoencoderRAE's "
                         f"(_class_name {cfg.get('_class_name')!r}; model_type {cfg.get('model_type')!r})")
    try:
        rae = load_pretrained(AutoencoderRAE.from_pretrained, weights, DEFAULT_WEIGHTS, "rae",
                              torch_dtype=torch.float32)
    except AttributeError as e:  # diffusers builds the encoder itself; a transformers it does not fit breaks there
        import diffusers
        import transformers

        raise RuntimeError(f"{source}: diffusers {diffusers.__version__} cannot build this RAE's "
                           f"{cfg.get('encoder_type')} encoder with transformers {transformers.__version__} "
                           f"({e})") from None
    return RAEEncoder(rae, resolution)
