"""The identity "encoder": flow matching in pixel space with the same store and pipeline as latents."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sourceflow.encoders.base import EncoderModule


class PixelEncoder(EncoderModule):
    """spatial = the image [3, R, R] in [-1, 1]; CLS = the image average-pooled to ``pool``×``pool``
    (``pool`` None: the full image) and flattened, so a CLS GMM can cluster pixels directly."""

    name = "pixels"
    decodable = True

    def __init__(self, resolution: int, pool: int | None = None) -> None:
        if pool is not None and not 1 <= pool <= resolution:
            raise ValueError(f"pixels encoder: pool must be in 1..{resolution}, got {pool}")
        self.pool = pool
        side = pool or resolution
        super().__init__(resolution, 3 * side * side, (3, resolution, resolution))

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.check_images(images)
        pooled = x if self.pool is None else F.adaptive_avg_pool2d(x, self.pool)
        return pooled.reshape(x.shape[0], -1).clone(), x.clone()

    def decode(self, spatial: torch.Tensor) -> torch.Tensor:
        return spatial
