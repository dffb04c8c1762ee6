"""Shared pieces of the image encoders: the module base class and the ImageNet normalisation."""

from __future__ import annotations

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class EncoderModule(nn.Module):
    """An ``nn.Module`` with the :class:`~sourceflow.encoders.ImageEncoder` attributes; eval mode, no grads."""

    name: str = ""
    decodable: bool = False

    def __init__(self, resolution: int, cls_dim: int, spatial_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.resolution = int(resolution)
        self.cls_dim = int(cls_dim)
        self.spatial_shape = tuple(int(s) for s in spatial_shape)

    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    def check_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images as float32 on the encoder's device; ValueError on a wrong shape."""
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2:] != (self.resolution, self.resolution):
            raise ValueError(f"{self.name} encoder expects images [B, 3, {self.resolution}, {self.resolution}], "
                             f"got {tuple(images.shape)}")
        return images.to(self.device, torch.float32)

    def decode(self, spatial: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"the {self.name} encoder cannot decode latents back to images")


def imagenet_normalize(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> ImageNet-normalised ((x+1)/2 - mean) / std, as the DINOv2 / MAE processors do."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return ((images + 1.0) * 0.5 - mean) / std
