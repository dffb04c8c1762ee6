"""ViT representation encoders (DINOv2, SigLIP2, MAE) used the way RAE uses them.

For all three the spatial latent is the grid of patch tokens after the final LayerNorm *without* its
affine weight and bias (RAE removes the affine so every token has zero mean and unit variance over
channels), reshaped to [D, S/p, S/p] in row-major patch order. What "CLS" is differs:

- DINOv2 (with registers): token 0 of the same non-affine-normalised sequence (MM-FM's CLS). The
  sequence is [CLS, registers (4 in the -reg models, 0 in plain DINOv2), patches].
- SigLIP2: there is no CLS token. CLS = the attention-pooling head's ``pooler_output`` — the embedding
  SigLIP's contrastive loss trains as *the* image descriptor, so it plays the role DINO's CLS plays. A
  model built without the head (``vision_use_head=False``) falls back to the mean of the patch tokens.
- MAE: token 0 (MAE's encoder keeps a CLS token; it gets no loss of its own in pre-training).

Input normalisation follows each model's image processor: DINOv2 and MAE take ImageNet mean/std on
[0, 1] pixels, SigLIP2 takes mean = std = 0.5, which is exactly the [-1, 1] model range.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sourceflow.encoders.base import EncoderModule, imagenet_normalize
from sourceflow.encoders.weights import load_pretrained

DEFAULT_WEIGHTS = {
    "dinov2": "facebook/dinov2-with-registers-base",
    "siglip2": "google/siglip2-base-patch16-256",
    "mae": "facebook/vit-mae-base",
}
ACCEPTED_TYPES = {
    "dinov2": ("dinov2_with_registers", "dinov2"),
    "siglip2": ("siglip2", "siglip2_vision_model", "siglip", "siglip_vision_model"),
    "mae": ("vit_mae",),
}


class ViTEncoder(EncoderModule):
    """A transformers ViT wrapped as an :class:`~sourceflow.encoders.ImageEncoder` (see module docstring)."""

    decodable = False

    def __init__(self, name: str, model: torch.nn.Module, resolution: int, input_size: int | None = None) -> None:
        cfg = model.config
        self.patch = int(cfg.patch_size)
        size = int(input_size or resolution)
        if size % self.patch:
            raise ValueError(f"{name}: input size {size} is not a multiple of the patch size {self.patch} "
                             f"(choose --resolution or input_size divisible by {self.patch})")
        grid = size // self.patch
        dim = int(cfg.hidden_size)
        super().__init__(resolution, dim, (dim, grid, grid))
        self.name = name
        self.model = model.eval().requires_grad_(False)
        self.input_size = size
        self.grid = grid
        self.eps = float(cfg.layer_norm_eps)
        self.model_type = str(cfg.model_type)
        self.num_registers = int(getattr(cfg, "num_register_tokens", 0) or 0) if name == "dinov2" else 0

    def layer_norm(self, h: torch.Tensor) -> torch.Tensor:
        """The final LayerNorm without affine (RAE): per token, zero mean and unit variance over channels."""
        return F.layer_norm(h, (h.shape[-1],), weight=None, bias=None, eps=self.eps)

    def to_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """Patch tokens [B, L, D] (row-major) -> [B, D, S/p, S/p]."""
        b, n, d = tokens.shape
        if n != self.grid * self.grid:
            raise ValueError(f"{self.name}: expected {self.grid * self.grid} patch tokens, got {n}")
        return tokens.transpose(1, 2).reshape(b, d, self.grid, self.grid).contiguous()

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_size == self.resolution:
            return x
        return F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False,
                             antialias=True)

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.resize(self.check_images(images))
        if self.name == "dinov2":
            cls, patches = self._dinov2(x)
        elif self.name == "siglip2":
            cls, patches = self._siglip(x)
        else:
            cls, patches = self._mae(x)
        return cls.float().contiguous(), self.to_grid(patches).float()

    def _dinov2(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(pixel_values=imagenet_normalize(x), output_hidden_states=True)
        # transformers' last_hidden_state is layernorm(encoder output) WITH the affine weight/bias;
        # hidden_states[-1] is the encoder output before that LayerNorm (checked in the tests against
        # model.encoder(model.embeddings(x))), so normalising it without affine is RAE's
        # "Dinov2withNorm" (layernorm.elementwise_affine = False).
        h = self.layer_norm(out.hidden_states[-1])
        return h[:, 0], h[:, 1 + self.num_registers:]

    def _siglip(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # [-1, 1] is already SigLIP's normalisation (mean = std = 0.5).
        if self.model_type.startswith("siglip2"):
            # SigLIP2 "NaFlex" takes variable-resolution inputs as pre-patchified sequences: pixel_values
            # [B, L, p*p*3] in (row, col, dy, dx, channel) order (Siglip2ImageProcessor's
            # convert_image_to_patches), plus spatial_shapes (rows, cols) per image (the learned position
            # grid is resized to it) and a padding mask. Fixed grid: every image is S/p × S/p patches,
            # nothing padded, mask all ones.
            b, p, g = x.shape[0], self.patch, self.grid
            seq = x.reshape(b, 3, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(b, g * g, p * p * 3)
            mask = torch.ones(b, g * g, dtype=torch.long, device=x.device)
            shapes = torch.tensor([[g, g]] * b, dtype=torch.long, device=x.device)
            out = self.model(pixel_values=seq, pixel_attention_mask=mask, spatial_shapes=shapes,
                             output_hidden_states=True)
        else:  # fixed-resolution SigLIP / SigLIP2 checkpoints (model_type "siglip", e.g. siglip2-base-patch16-256)
            interpolate = self.input_size != int(self.model.config.image_size)
            out = self.model(pixel_values=x, interpolate_pos_encoding=interpolate, output_hidden_states=True)
        h = self.layer_norm(out.hidden_states[-1])  # hidden_states[-1]: before post_layernorm
        cls = out.pooler_output if out.pooler_output is not None else h.mean(dim=1)
        return cls, h

    def _mae(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n = x.shape[0], self.grid * self.grid
        # ViTMAE shuffles patches by argsort(noise) and keeps the first (1 - mask_ratio) of them. With
        # mask_ratio 0 (set at load) and noise = 0, 1, ..., n-1 the shuffle is the identity, so the patch
        # tokens come back in image order; ids_restore proves it.
        noise = torch.arange(n, device=x.device, dtype=torch.float32).expand(b, n)
        interpolate = self.input_size != int(self.model.config.image_size)
        out = self.model(pixel_values=imagenet_normalize(x), noise=noise, interpolate_pos_encoding=interpolate,
                         output_hidden_states=True)
        if out.ids_restore.shape[1] != n or not torch.equal(out.ids_restore, torch.arange(n, device=x.device).expand(b, n)):
            raise ValueError("mae: patch order is not the identity (is the model's mask_ratio 0?)")
        h = self.layer_norm(out.hidden_states[-1])  # hidden_states[-1]: before the final layernorm
        return h[:, 0], h[:, 1:]


def model_class(model_type: str):
    """The transformers class to load for ``model_type``, and whether its vision tower is ``.vision_model``."""
    import transformers

    name, tower = {
        "dinov2_with_registers": ("Dinov2WithRegistersModel", False),
        "dinov2": ("Dinov2Model", False),
        "siglip2": ("Siglip2Model", True),
        "siglip2_vision_model": ("Siglip2VisionModel", False),
        "siglip": ("SiglipModel", True),
        "siglip_vision_model": ("SiglipVisionModel", False),
        "vit_mae": ("ViTMAEModel", False),
    }[model_type]
    return getattr(transformers, name), tower  # only this model's module gets imported


def load_vit(name: str, weights: str | None, resolution: int, input_size: int | None = None) -> ViTEncoder:
    """Load ``name`` (dinov2 | siglip2 | mae) from a local folder or hub id and wrap it."""
    from transformers import AutoConfig

    what = name
    cfg = load_pretrained(AutoConfig.from_pretrained, weights, DEFAULT_WEIGHTS[name], what)
    source = weights or DEFAULT_WEIGHTS[name]
    if cfg.model_type not in ACCEPTED_TYPES[name]:
        raise ValueError(f"{source}: model_type {cfg.model_type!r} is not a {name} model "
                         f"(expected one of {', '.join(ACCEPTED_TYPES[name])})")
    cls, tower = model_class(cfg.model_type)
    kwargs: dict = {"dtype": torch.float32}
    if name == "mae":
        kwargs["mask_ratio"] = 0.0
    model = load_pretrained(cls.from_pretrained, weights, DEFAULT_WEIGHTS[name], what, **kwargs)
    if tower:
        model = model.vision_model
    if name == "mae" and float(model.config.mask_ratio) != 0.0:
        raise ValueError(f"{source}: could not set mask_ratio to 0")
    return ViTEncoder(name, model, resolution, input_size)
