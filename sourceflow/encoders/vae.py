"""The Stable Diffusion VAE (diffusers ``AutoencoderKL``) as a decodable encoder.

spatial = (posterior mean − shift_factor) × scaling_factor, both from the VAE config (SD-VAE: 0.18215 and
no shift); using the mean rather than a sample keeps extraction deterministic (DiT samples; LightningDiT
and RAE-style pipelines cache the mean). CLS = spatial mean-pooled over H, W ([B, C]).
decode = vae.decode(z / scaling_factor + shift_factor), clamped to [-1, 1].
"""

from __future__ import annotations

import torch

from sourceflow.encoders.base import EncoderModule
from sourceflow.encoders.weights import load_pretrained

DEFAULT_WEIGHTS = "stabilityai/sd-vae-ft-ema"


class SDVAEEncoder(EncoderModule):
    name = "sd-vae"
    decodable = True

    def __init__(self, vae: torch.nn.Module, resolution: int) -> None:
        cfg = vae.config
        down = 2 ** (len(cfg.block_out_channels) - 1)
        if resolution % down:
            raise ValueError(f"sd-vae: resolution {resolution} is not a multiple of the VAE's downsampling factor {down}")
        c = int(cfg.latent_channels)
        super().__init__(resolution, c, (c, resolution // down, resolution // down))
        self.vae = vae.eval().requires_grad_(False)
        self.scaling_factor = float(cfg.scaling_factor)
        shift = getattr(cfg, "shift_factor", None)
        self.shift_factor = float(shift) if shift is not None else 0.0

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.check_images(images)
        mean = self.vae.encode(x).latent_dist.mean
        z = ((mean - self.shift_factor) * self.scaling_factor).float().contiguous()
        return z.mean(dim=(2, 3)), z

    @torch.inference_mode()
    def decode(self, spatial: torch.Tensor) -> torch.Tensor:
        z = spatial.to(self.device, torch.float32) / self.scaling_factor + self.shift_factor
        return self.vae.decode(z).sample.clamp(-1, 1).float()


def load_sd_vae(weights: str | None, resolution: int) -> SDVAEEncoder:
    from diffusers import AutoencoderKL

    vae = load_pretrained(AutoencoderKL.from_pretrained, weights, DEFAULT_WEIGHTS, "sd-vae", torch_dtype=torch.float32)
    return SDVAEEncoder(vae, resolution)
