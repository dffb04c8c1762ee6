"""Reading images the way ADM / MM-FM / RAE do: decode fully, convert to RGB, ADM centre crop.

Model range is [-1, 1] channels-first float32; stored and sampled images are uint8 channels-last
(the ADM npz convention, ``arr_0`` uint8 NHWC).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

    from sourceflow.data.manifest import Manifest

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class BadImageError(ValueError):
    """An image file that cannot be opened or fully decoded; the message starts with its path."""


def center_crop_arr(img: Image.Image, resolution: int) -> np.ndarray:
    """ADM's centre crop (guided-diffusion ``center_crop_arr``) to uint8 [R, R, 3].

    While the short side is at least 2R, halve both sides with a BOX filter (sizes floor-divided by 2);
    then resize with BICUBIC so the short side is exactly R (the long side is ``round(long * R / short)``,
    Python rounding); then cut the central R×R window (offsets floor((H-R)/2), floor((W-R)/2)).
    Images smaller than R are upsampled by the same bicubic step. Non-RGB images are converted first.
    """
    if resolution < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    if img.mode != "RGB":
        img = img.convert("RGB")
    while min(img.size) >= 2 * resolution:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.Resampling.BOX)
    scale = resolution / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8)
    top = (arr.shape[0] - resolution) // 2
    left = (arr.shape[1] - resolution) // 2
    return np.ascontiguousarray(arr[top:top + resolution, left:left + resolution])


def open_rgb(path: str | Path) -> Image.Image:
    """Open and fully decode an image as RGB; :class:`BadImageError` naming ``path`` if it fails.

    ``Image.load()`` forces the whole file to be decoded, so truncated files fail here rather than
    becoming partly black images (``ImageFile.LOAD_TRUNCATED_IMAGES`` is left at its default, False).
    """
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError:
        raise BadImageError(f"{path}: file not found") from None
    except UnidentifiedImageError:
        raise BadImageError(f"{path}: unreadable image (not an image format Pillow knows, or a damaged header)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, EOFError) as e:
        raise BadImageError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None


def load_image(path: str | Path, resolution: int) -> np.ndarray:
    """Decode ``path`` fully, convert to RGB and ADM-centre-crop to uint8 [R, R, 3]."""
    return center_crop_arr(open_rgb(path), resolution)


def to_model_range(images_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] (or [H, W, 3]) -> float32 [B, 3, H, W] (or [3, H, W]) in [-1, 1]: x / 127.5 - 1."""
    import torch

    if isinstance(images_uint8, torch.Tensor):
        x = images_uint8
    else:
        a = np.asarray(images_uint8)
        x = torch.from_numpy(a if a.flags.writeable else a.copy())
    if x.dtype != torch.uint8:
        raise ValueError(f"to_model_range expects uint8 images, got {x.dtype}")
    if x.ndim not in (3, 4) or x.shape[-1] != 3:
        raise ValueError(f"to_model_range expects [B, H, W, 3] images, got shape {tuple(x.shape)}")
    return (x.movedim(-1, -3).to(torch.float32) / 127.5 - 1.0).contiguous()


def to_uint8(images: torch.Tensor, mode: str = "truncate") -> np.ndarray:
    """float [B, 3, H, W] (or [3, H, W]) in [-1, 1] -> uint8 [B, H, W, 3], clamped to [0, 255].

    ``mode`` "truncate" (default, for samples): ``((x + 1) * 127.5).clamp(0, 255).to(uint8)``, what ADM's
    and MM-FM's samplers do before their FIDs, so our FIDs are comparable with theirs; it is NOT an inverse
    of :func:`to_model_range` (k / 127.5 − 1 maps back to k − 1 for some k in float32). "round": to the
    nearest integer, the exact inverse of :func:`to_model_range`.
    """
    import torch

    if mode not in ("truncate", "round"):
        raise ValueError(f"to_uint8 mode must be 'truncate' or 'round', got {mode!r}")
    x = torch.as_tensor(images).detach()
    if x.ndim not in (3, 4) or x.shape[-3] != 3:
        raise ValueError(f"to_uint8 expects [B, 3, H, W] images, got shape {tuple(x.shape)}")
    x = (x.to(torch.float32) + 1.0) * 127.5
    if mode == "round":
        x = x.round()
    x = x.clamp(0, 255).to(torch.uint8)  # after the clamp the cast truncates toward 0 (= floor)
    return x.movedim(-3, -1).cpu().numpy()


def iter_image_batches(manifest: Manifest, resolution: int, batch_size: int, workers: int = 1,
                       desc: str | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, uint8 [B, R, R, 3]) over the manifest's rows in order, decoded by a thread pool
    (Pillow releases the GIL), with a tqdm bar on stderr when ``desc`` is given."""
    from multiprocessing.pool import ThreadPool

    from sourceflow.progress import bar as progress_bar

    n = len(manifest.frame)
    paths = [manifest.abspath(i) for i in range(n)]
    bar = progress_bar(total=n, desc=desc, unit="img", disable=desc is None)
    with ThreadPool(max(1, workers)) as pool, bar:
        for start in range(0, n, batch_size):
            chunk = paths[start:start + batch_size]
            images = pool.map(lambda p: load_image(p, resolution), chunk) if workers > 1 else \
                [load_image(p, resolution) for p in chunk]
            bar.update(len(chunk))
            yield start, np.stack(images)


def load_images(manifest: Manifest, resolution: int, workers: int = 1, desc: str | None = None) -> np.ndarray:
    """All of a (small) manifest's images as uint8 [N, R, R, 3]."""
    return np.concatenate([b for _, b in iter_image_batches(manifest, resolution, 1024, workers, desc)])
