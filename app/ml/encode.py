"""Embedding images and texts; texts may carry a stack of concept adapters."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from app.ml.adapter import ConceptAdapter, stack_factors
from app.ml.model import ClipBundle
from app.ml.text import encode_tokens, text_tower
from app.ml.tokens import count_tokens as _count_tokens

TEXT_BATCH = 256  # texts per forward pass; bounds memory for bulk caption encoding
# Another engine for the image tower: preprocessed pixels (B, 3, H, W) -> features (B, D) as
# `model.encode_image` gives them (app.ml.onnx_engine); None = the model's own PyTorch pass.
ImageEngine = Callable[[torch.Tensor], torch.Tensor]


def preprocess_images(bundle: ClipBundle, images: Sequence[Image.Image]) -> torch.Tensor:
    """The model's preprocessing of each image, stacked: (N, 3, H, W) float32 on the CPU. The
    embedding job runs it in its decoding thread, ahead of the model (app.services.embedding)."""
    if not images:
        return torch.zeros((0, 3, 1, 1))
    return torch.stack([bundle.preprocess(im) for im in images])


def encode_pixels(
    bundle: ClipBundle,
    pixels: torch.Tensor,
    batch_size: int = 64,
    engine: ImageEngine | None = None,
) -> np.ndarray:
    """L2-normalised embeddings (N, D) float32 of preprocessed images (`preprocess_images`),
    through `engine` when one is given, else the model's PyTorch pass."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    out = [np.zeros((0, bundle.embed_dim), dtype=np.float32)]
    dtype = text_tower(bundle.model).dtype
    for start in range(0, len(pixels), batch_size):
        batch = pixels[start : start + batch_size]
        with torch.inference_mode():
            if engine is not None:
                f = engine(batch)
            else:
                f = bundle.model.encode_image(batch.to(bundle.device, dtype))  # type: ignore[operator]
            out.append(F.normalize(f.float(), dim=-1).cpu().numpy())
    return np.concatenate(out)


def encode_images(
    bundle: ClipBundle,
    images: Sequence[Image.Image],
    batch_size: int = 64,
    engine: ImageEngine | None = None,
) -> np.ndarray:
    """L2-normalised image embeddings, (N, D) float32 (through `engine` when one is given)."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    out = [np.zeros((0, bundle.embed_dim), dtype=np.float32)]
    for start in range(0, len(images), batch_size):
        pixels = preprocess_images(bundle, images[start : start + batch_size])
        out.append(encode_pixels(bundle, pixels, batch_size, engine))
    return np.concatenate(out)


def encode_texts(
    bundle: ClipBundle, texts: Sequence[str], adapters: Sequence[ConceptAdapter] = ()
) -> np.ndarray:
    """L2-normalised text embeddings, (N, D) float32, with V + Σ_k B_k Â_k in the last block.

    The shared model is never modified: the update is applied functionally per call, so
    concurrent calls with different stacks are independent. No adapters = the base model.
    """
    tower = text_tower(bundle.model)
    a_hat = b = None
    if adapters:
        a_hat, b = stack_factors(adapters, bundle.fingerprint)  # (K, d) each
        if a_hat.shape[1] != tower.width:
            raise ValueError(f"adapter width {a_hat.shape[1]} != text width {tower.width}")
        a_hat = a_hat.to(bundle.device, tower.dtype)
        b = b.to(bundle.device, tower.dtype)
    out = [np.zeros((0, bundle.embed_dim), dtype=np.float32)]
    for start in range(0, len(texts), TEXT_BATCH):
        tokens = bundle.tokenizer(list(texts[start : start + TEXT_BATCH])).to(bundle.device)
        with torch.inference_mode():
            f = encode_tokens(tower, tokens, a_hat, b)  # (B, D)
            out.append(F.normalize(f.float(), dim=-1).cpu().numpy())
    return np.concatenate(out)


def count_tokens(bundle: ClipBundle, text: str) -> int:
    """Tokens including start/end; more than bundle.context_length means the query is too long."""
    return _count_tokens(bundle.tokenizer, text)
