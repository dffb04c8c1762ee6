"""Feature extractors for image metrics: clean-fid's Inception (FID at ImageNet scale) in two preprocessing
modes and our small feature network (digits-size images), behind one interface that takes uint8 images
[B, H, W, 3]. Each extractor says how it preprocesses (``preprocessing``), so metrics can record it.

Both Inception modes run the TorchScript network ``inception-2015-12-05.pt`` (the TF-FID Inception ported
by NVIDIA) through ``cleanfid.inception_torchscript.InceptionV3W``'s own forward (2048-d pool3 features);
the weights file is never downloaded here: it is read from a configured path.

- ``inception`` = clean-fid's "clean" mode: each uint8 image is resized to 299×299 per channel in float
  with PIL bicubic (``cleanfid.resize.build_resizer("clean")`` = ``make_resizer("PIL", False, "bicubic",
  (299, 299))``, no quantisation after the resize), values stay in [0, 255], then InceptionV3W with
  ``resize_inside=False`` ((x − 128) / 128, ``layers``). Comparable with clean-fid's "clean" statistics.
- ``adm`` = clean-fid's "legacy_tensorflow" mode, which reproduces ADM's TensorFlow evaluator (resize to
  299 inside the graph): no resize outside (``build_resizer("legacy_tensorflow")`` is the identity), the
  uint8 images become float32 NCHW in [0, 255] and go to InceptionV3W with ``resize_inside=True``, i.e.
  ``base(x, return_features=True)`` resizes (bilinear, TF-style) and normalises inside the TorchScript
  graph. Only these features are comparable with ADM reference batches (VIRTUAL_imagenet256_labeled.npz)
  and the FIDs published against them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

INCEPTION_FILENAME = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_SIZE = 299
INCEPTION_DIM = 2048


@dataclass
class FeatureBatch:
    features: np.ndarray          # float32 [B, F]
    labels: np.ndarray | None     # int64 [B] predicted classes (feature network), None for Inception


class FeatureExtractor(Protocol):
    name: str
    preprocessing: str            # how uint8 images become network input (recorded with the metrics)
    dim: int
    num_classes: int              # 0 when the extractor does not classify

    def __call__(self, images_uint8: np.ndarray) -> FeatureBatch: ...


def _check_uint8_nhwc(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [B, H, W, 3], got {images.dtype} {images.shape}")
    return images


# --- Inception (clean-fid) ------------------------------------------------------------------------------


def legacy_tensorflow_input(images_uint8: np.ndarray) -> torch.Tensor:
    """clean-fid's "legacy_tensorflow" input: uint8 [B, H, W, 3] → float32 [B, 3, H, W] in [0, 255], not
    resized (the network resizes inside, as ADM's TensorFlow graph does) and not rescaled.

    clean-fid's resizer for this mode is the identity and its loader makes ``ToTensor()(img) * 255``, which
    equals ``float(img)`` exactly for every uint8 value; ADM's evaluator feeds ``batch.astype(float32)``.
    """
    images = _check_uint8_nhwc(images_uint8)
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(torch.float32).contiguous()


def clean_resize(images_uint8: np.ndarray, workers: int = 1) -> torch.Tensor:
    """clean-fid's "clean" preprocessing: uint8 [B, H, W, 3] → float32 [B, 3, 299, 299] in [0, 255].

    ``workers`` > 1 resizes on a thread pool (PIL releases the GIL while resampling).
    """
    from cleanfid.resize import build_resizer

    images = _check_uint8_nhwc(images_uint8)
    fn = build_resizer("clean")
    if workers > 1 and len(images) > 1:
        from multiprocessing.pool import ThreadPool

        with ThreadPool(workers) as pool:
            resized = pool.map(fn, list(images))
    else:
        resized = [fn(img) for img in images]
    out = np.stack(resized).astype(np.float32, copy=False)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _inception_class():
    from cleanfid.inception_torchscript import InceptionV3W

    class InceptionFile(InceptionV3W):
        """clean-fid's wrapper around a TorchScript file given by its full path (any file name), loaded
        onto ``device`` without any download; ``forward`` is clean-fid's own (``resize_inside``: the
        legacy_tensorflow path ``base(x, return_features=True)``; otherwise the "clean" path on ``layers``)."""

        def __init__(self, path: Path, device: torch.device, resize_inside: bool = False):
            import warnings

            torch.nn.Module.__init__(self)
            with warnings.catch_warnings():  # torch ≥ 2.10 deprecates TorchScript; the file is TorchScript
                warnings.simplefilter("ignore", DeprecationWarning)
                self.base = torch.jit.load(str(path), map_location=device).eval()
            self.layers = self.base.layers
            self.resize_inside = resize_inside

    return InceptionFile


def resolve_inception_path(path: str | Path) -> Path:
    """The Inception TorchScript file: ``path`` itself, or ``path/inception-2015-12-05.pt`` for a folder."""
    p = Path(path)
    if p.is_dir():
        p = p / INCEPTION_FILENAME
    if not p.is_file():
        raise FileNotFoundError(f"Inception weights not found: {p} (download {INCEPTION_URL} and put it there, "
                                "or set reference.inception_path)")
    return p


class InceptionFeatures:
    """2048-d pool features of clean-fid's Inception, clean-fid "clean" mode (PIL bicubic resize to 299 in
    float outside the network), for uint8 images of any size. Not comparable with ADM reference batches."""

    name = "inception"
    preprocessing = "clean"
    resize_inside = False
    dim = INCEPTION_DIM
    num_classes = 0

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", workers: int = 1):
        self.path = resolve_inception_path(path)
        self.device = torch.device(device)
        self.workers = workers
        try:
            self.model = _inception_class()(self.path, self.device, self.resize_inside)
        except RuntimeError as e:  # torch.jit.load on a file that is not TorchScript
            raise ValueError(f"{self.path}: not a TorchScript Inception file ({str(e).splitlines()[0]})") from None

    def _input(self, images_uint8: np.ndarray) -> torch.Tensor:
        return clean_resize(images_uint8, self.workers)

    @torch.no_grad()
    def __call__(self, images_uint8: np.ndarray) -> FeatureBatch:
        feats = self.model(self._input(images_uint8).to(self.device))
        return FeatureBatch(feats.float().cpu().numpy(), None)


class ADMInceptionFeatures(InceptionFeatures):
    """2048-d pool features comparable with ADM's evaluator: clean-fid "legacy_tensorflow" mode (the images
    as float in [0, 255], resized to 299 inside the TorchScript graph). Use with ADM reference batches."""

    name = "adm"
    preprocessing = "legacy_tensorflow"
    resize_inside = True

    def _input(self, images_uint8: np.ndarray) -> torch.Tensor:
        return legacy_tensorflow_input(images_uint8)


# --- the feature network ---------------------------------------------------------------------------------


class FeatureNetFeatures:
    """Penultimate activations and predicted classes of a trained :class:`FeatureNet`."""

    name = "feature-net"
    preprocessing = "model_range"  # x / 127.5 − 1 at the images' own resolution

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        from sourceflow.models.feature_net import load_feature_net

        self.path = Path(path)
        self.device = torch.device(device)
        self.net = load_feature_net(path, self.device)
        self.dim = self.net.config.feature_dim
        self.num_classes = self.net.config.num_classes
        self.resolution = self.net.config.resolution

    @torch.no_grad()
    def __call__(self, images_uint8: np.ndarray) -> FeatureBatch:
        from sourceflow.data.images import to_model_range

        x = to_model_range(_check_uint8_nhwc(images_uint8)).to(self.device)
        feats = self.net.features(x)
        labels = self.net.head(feats).argmax(1)
        return FeatureBatch(feats.float().cpu().numpy(), labels.cpu().numpy().astype(np.int64))


def load_feature_extractor(kind: str, path: str | Path, device: str | torch.device = "cpu",
                           workers: int = 1) -> FeatureExtractor:
    """``kind`` "inception" (clean-fid TorchScript file, "clean" mode), "adm" (the same file, clean-fid's
    "legacy_tensorflow" mode, comparable with ADM reference batches) or "feature-net" (train_feature_net's
    safetensors); ``workers`` threads resize images for "inception". Samples and real images use this one
    function, so both sides of an FD are preprocessed alike."""
    if kind == "inception":
        return InceptionFeatures(path, device, workers)
    if kind == "adm":
        return ADMInceptionFeatures(path, device, workers)
    if kind == "feature-net":
        return FeatureNetFeatures(path, device)
    raise ValueError(f"unknown feature extractor {kind!r} (choose inception, adm or feature-net)")


def extract_features(extractor: FeatureExtractor, images_uint8: Any, batch_size: int = 256,
                     desc: str | None = None) -> FeatureBatch:
    """Features (and predicted labels) of uint8 [N, H, W, 3] images in batches: an in-memory array, or any
    array that reads rows by slicing (a Zarr array: the sample store), so only one batch of images is in
    memory at a time (50k ImageNet samples are 9.8 GB); a tqdm bar on stderr when ``desc`` is given."""
    from sourceflow.progress import bar

    shape, dtype = tuple(images_uint8.shape), np.dtype(images_uint8.dtype)
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"expected uint8 images [B, H, W, 3], got {dtype} {shape}")
    images = images_uint8
    feats, labels = [], []
    for s in bar(range(0, shape[0], batch_size), desc=desc, unit="batch", disable=desc is None):
        out = extractor(np.asarray(images[s:s + batch_size]))
        feats.append(out.features)
        if out.labels is not None:
            labels.append(out.labels)
    features = np.concatenate(feats) if feats else np.zeros((0, extractor.dim), np.float32)
    return FeatureBatch(features, np.concatenate(labels) if labels else None)
