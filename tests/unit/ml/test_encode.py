"""Image and text encoding entry points."""

from __future__ import annotations

import numpy as np
from PIL import Image

from app.ml.encode import count_tokens, encode_images, encode_texts
from app.ml.model import ClipBundle


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    rgb = [Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)) for _ in range(4)]
    gray = Image.fromarray(rng.integers(0, 255, (50, 50), dtype=np.uint8), mode="L")
    return [*rgb, gray]


def test_encode_images_normalised_float32_and_batch_independent(clip32: ClipBundle) -> None:
    images = _images()
    out = encode_images(clip32, images, batch_size=2)
    assert out.dtype == np.float32 and out.shape == (5, clip32.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(out, encode_images(clip32, images, batch_size=64), atol=1e-5)
    assert not np.allclose(out[0], out[1])
    assert encode_images(clip32, []).shape == (0, clip32.embed_dim)


def test_text_and_image_embeddings_share_the_space(clip32: ClipBundle) -> None:
    img = encode_images(clip32, _images()[:1])
    txt = encode_texts(clip32, ["a photo"])
    assert img.shape[1] == txt.shape[1] == clip32.embed_dim


def test_count_tokens_includes_start_and_end(clip32: ClipBundle) -> None:
    assert count_tokens(clip32, "a photo") == 4
    assert count_tokens(clip32, "sks dog") == 4
    long = " ".join(["word"] * 100)
    assert count_tokens(clip32, long) == 102 > clip32.context_length
