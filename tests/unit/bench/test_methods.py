"""Methods on a tiny random model: each one's query embedding is what it claims to be."""

from __future__ import annotations

import numpy as np
import torch

from app.bench.datasets import Concept, Query
from app.bench.inversion import encode_with_vectors, forward_with_vectors, token_id, train_inversion
from app.bench.methods import Composed, Inversion, Polar, PolarPlusImage, TextOnly, normalize
from app.bench.variants import train_selective
from app.ml.encode import encode_texts
from app.ml.model import ClipBundle
from app.ml.text import encode_tokens, text_tower
from app.ml.train import train_adapter

STEPS = 30


def photos(bundle: ClipBundle, seed: int, n: int = 3) -> np.ndarray:
    g = np.random.default_rng(seed)
    return normalize(g.normal(size=(n, bundle.embed_dim))).astype(np.float32)


CONCEPTS = [Concept("a", "ball", ()), Concept("b", None, ())]
QUERIES = [
    Query("a * on the beach", ("a",), (0,), "context"),
    Query("a photo of *", ("b",), (0,), "concept"),
    Query("a * and a * at night", ("a", "b"), (0,), "multi"),
]


def fitted(method, bundle):  # type: ignore[no-untyped-def]
    for i, c in enumerate(CONCEPTS):
        method.fit(c, photos(bundle, i))
    return method


def test_text_only_says_the_category(tiny: ClipBundle) -> None:
    got = fitted(TextOnly(tiny, "t"), tiny).encode(QUERIES)
    want = encode_texts(
        tiny, ["a ball on the beach", "a photo of object", "a ball and a object at night"]
    )
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert fitted(TextOnly(tiny, "t"), tiny).retention_texts("a", ["x"]) is None


def test_composed_adds_the_photo_mean(tiny: ClipBundle) -> None:
    m = fitted(Composed(tiny, "c"), tiny)
    got = m.encode(QUERIES[:1])[0]
    mean = normalize(photos(tiny, 0).mean(axis=0))
    want = normalize(mean + encode_texts(tiny, ["a ball on the beach"])[0])
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_polar_uses_its_adapters_and_sums_them(tiny: ClipBundle) -> None:
    m = fitted(Polar(tiny, "p", lam=0.0, steps=STEPS), tiny)
    a, b = m.adapters["a"], m.adapters["b"]
    assert a.token == b.token == "sks"
    got = m.encode(QUERIES)
    np.testing.assert_allclose(
        got[0], encode_texts(tiny, ["a sks ball on the beach"], [a])[0], atol=1e-6
    )
    np.testing.assert_allclose(got[1], encode_texts(tiny, ["a photo of sks"], [b])[0], atol=1e-6)
    both = encode_texts(tiny, ["a sks ball and a sks at night"], [a, b])[0]
    np.testing.assert_allclose(got[2], both, atol=1e-6)
    base = encode_texts(tiny, ["a sks ball on the beach"])[0]
    assert np.abs(got[0] - base).max() > 1e-4  # the update changed the query
    ret = m.retention_texts("a", ["a ball on the beach"])
    assert ret is not None and ret.shape == (1, tiny.embed_dim)


def test_polar_distinct_tokens_and_embedding_stack(tiny: ClipBundle) -> None:
    m = fitted(
        Polar(tiny, "p", lam=0.0, steps=STEPS, token_mode="distinct", stack="embeddings"), tiny
    )
    ta, tb = m.adapters["a"].token, m.adapters["b"].token
    assert ta != tb and "sks" not in (ta, tb)
    text = f"a {ta} ball and a {tb} at night"
    parts = [encode_texts(tiny, [text], [m.adapters[c]])[0] for c in "ab"]
    np.testing.assert_allclose(m.encode(QUERIES[2:])[0], normalize(parts[0] + parts[1]), atol=1e-6)


def test_polar_plus_image(tiny: ClipBundle) -> None:
    m = fitted(PolarPlusImage(tiny, "f", lam=0.0, steps=STEPS, weight=0.5), tiny)
    plain = Polar.encode(m, QUERIES[:1])[0]
    want = normalize(plain + 0.5 * normalize(photos(tiny, 0).mean(axis=0)))
    np.testing.assert_allclose(m.encode(QUERIES[:1])[0], want, atol=1e-6)


def test_vector_override_is_exact_with_the_original_embedding(tiny: ClipBundle) -> None:
    tower = text_tower(tiny.model)
    tokens = tiny.tokenizer(["a sks ball on the beach", "a photo of a cup"])
    tid = token_id(tiny, "sks")
    with torch.no_grad():
        same = forward_with_vectors(tower, tokens, {tid: tower.token_embedding.weight[tid]})
        moved = forward_with_vectors(tower, tokens, {tid: torch.ones(tower.width)})
        base = encode_tokens(tower, tokens)
    torch.testing.assert_close(same, base)
    assert (moved[0] - base[0]).abs().max() > 1e-4  # the text with the token changes
    torch.testing.assert_close(moved[1], base[1])  # the one without it does not


def test_inversion_learns_towards_the_photos(tiny: ClipBundle) -> None:
    y = torch.from_numpy(photos(tiny, 3))
    vec = train_inversion(tiny, y, "sks", "ball", steps=60, lr=1e-2)
    tid = token_id(tiny, "sks")
    before = encode_texts(tiny, ["A photo of sks ball"])[0]
    after = encode_with_vectors(tiny, ["A photo of sks ball"], {tid: vec})[0]
    target = normalize(y.numpy().mean(axis=0))
    assert after @ target > before @ target + 0.05
    m = fitted(Inversion(tiny, "i", steps=5), tiny)
    assert len(set(m.tokens.values())) == 2  # a distinct token per concept
    assert m.retention_texts("a", ["x"]) is None  # the model is untouched
    assert m.encode(QUERIES).shape == (3, tiny.embed_dim)


def test_selective_trainer_without_keep_is_polar(tiny: ClipBundle) -> None:
    y = torch.from_numpy(photos(tiny, 4))
    ref = train_adapter(tiny, y, "sks", "ball", lam=0.01, steps=STEPS)
    got = train_selective(tiny, y, "sks", "ball", lam=0.01, steps=STEPS, keep=0.0)
    torch.testing.assert_close(got.b, ref.b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.a, ref.a, atol=1e-5, rtol=1e-4)


def test_keep_term_leaves_texts_without_the_token_alone(tiny: ClipBundle) -> None:
    y = torch.from_numpy(photos(tiny, 5))
    plain = train_selective(tiny, y, "sks", "ball", lam=0.0, steps=100, lr=1e-2, keep=0.0)
    kept = train_selective(tiny, y, "sks", "ball", lam=0.0, steps=100, lr=1e-2, keep=10.0)
    probe = ["A photo of ball", "This photo shows ball"]  # keep texts: the bare category
    base = encode_texts(tiny, probe)

    def moved(ad) -> float:  # type: ignore[no-untyped-def]
        return float(np.abs(encode_texts(tiny, probe, [ad]) - base).max())

    assert moved(kept) < 0.5 * moved(plain)
