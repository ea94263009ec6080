"""Serving: functional, exact, order-free and thread-safe stacking of adapters."""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from app.ml.adapter import ConceptAdapter, stack_factors
from app.ml.encode import encode_texts
from app.ml.model import AdapterMismatchError, ClipBundle, ModelFingerprint
from app.ml.text import encode_tokens, text_tower

QUERIES = [
    "sks dog at the beach",
    "a photo of a cat",
    "sks",
    "two sks skirts and a very long description of the rest of the scene here",
]


def random_adapter(bundle: ClipBundle, seed: int, scale: float = 0.5) -> ConceptAdapter:
    """An adapter with random factors, in the model's dtype."""
    g = torch.Generator().manual_seed(seed)
    d, dtype = bundle.text_width, text_tower(bundle.model).dtype
    return ConceptAdapter(
        b=(scale * torch.randn(d, generator=g)).to(dtype),
        a=torch.randn(d, generator=g).to(dtype),
        fingerprint=bundle.fingerprint,
        token="sks",
        category=None,
        lam=0.1,
        steps=0,
        lr=1e-3,
        final_loss=0.0,
    )


def full_context(bundle: ClipBundle, texts: list[str], model: torch.nn.Module | None = None):
    """open_clip's own encode_text on untruncated tokens, normalised."""
    model = model or bundle.model
    with torch.no_grad():
        f = model.encode_text(bundle.tokenizer(texts))  # type: ignore[operator]
    return torch.nn.functional.normalize(f, dim=-1).float().numpy()


def merged_copy(bundle: ClipBundle, adapters: list[ConceptAdapter]) -> torch.nn.Module:
    """A deep copy with V += Σ B_k Â_k merged in place: the explicit (non-functional) result."""
    model = copy.deepcopy(bundle.model)
    w = text_tower(model).last.attn.in_proj_weight
    d = w.shape[1]
    with torch.no_grad():
        for ad in adapters:
            w[2 * d :] += torch.outer(ad.b, ad.a / ad.a.norm()).to(w.dtype)
    return model


def test_truncating_after_eot_gives_the_full_context_embedding(
    clip32: ClipBundle, clip64: ClipBundle
) -> None:
    assert int(clip32.tokenizer(QUERIES).argmax(-1).max()) + 1 < clip32.context_length
    np.testing.assert_allclose(
        encode_texts(clip32, QUERIES), full_context(clip32, QUERIES), atol=2e-6
    )
    np.testing.assert_allclose(
        encode_texts(clip64, QUERIES), full_context(clip64, QUERIES), atol=1e-7
    )


def test_empty_stack_is_the_base_model_bit_for_bit(clip32: ClipBundle) -> None:
    model = clip32.model
    tokens = clip32.tokenizer(QUERIES)
    length = int(tokens.argmax(-1).max()) + 1
    tokens = tokens[:, :length]
    with torch.no_grad():  # open_clip's own modules on the truncated sequence
        x = model.token_embedding(tokens) + model.positional_embedding[:length]
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
        x = x[torch.arange(len(QUERIES)), tokens.argmax(-1)] @ model.text_projection
    expected = torch.nn.functional.normalize(x, dim=-1).numpy()
    assert np.array_equal(encode_texts(clip32, QUERIES), expected)
    assert np.array_equal(encode_texts(clip32, QUERIES, []), expected)


@pytest.mark.parametrize(
    ("name", "atol"), [("clip64", 1e-12), ("custom64", 1e-12), ("clip32", 2e-6)]
)
def test_functional_stack_equals_explicit_merge(
    name: str, atol: float, request: pytest.FixtureRequest
) -> None:
    bundle = request.getfixturevalue(name)
    adapters = [random_adapter(bundle, s) for s in range(3)]
    merged = merged_copy(bundle, adapters)
    tokens = bundle.tokenizer(QUERIES)
    a_hat, b = stack_factors(adapters, bundle.fingerprint)
    tower = text_tower(bundle.model)
    with torch.no_grad():  # in the model's dtype, before the float32 API output
        got = F.normalize(
            encode_tokens(tower, tokens, a_hat.to(tower.dtype), b.to(tower.dtype)), dim=-1
        )
        expected = F.normalize(merged.encode_text(tokens), dim=-1)  # type: ignore[operator]
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)
    api = encode_texts(bundle, QUERIES, adapters)
    np.testing.assert_allclose(api, expected.float().numpy(), atol=max(atol, 2e-7), rtol=0)
    assert np.abs(api - encode_texts(bundle, QUERIES)).max() > 1e-3  # the stack does something


def test_order_of_adapters_does_not_matter(clip32: ClipBundle) -> None:
    adapters = [random_adapter(clip32, s) for s in range(4)]
    one = encode_texts(clip32, QUERIES, adapters)
    assert np.array_equal(one, encode_texts(clip32, QUERIES, adapters[::-1]))
    assert np.array_equal(one, encode_texts(clip32, QUERIES, adapters[2:] + adapters[:2]))


def test_base_weights_are_unchanged_after_use(clip32: ClipBundle, unit_rows) -> None:
    from app.ml.train import train_adapter

    before = {k: v.clone() for k, v in clip32.model.state_dict().items()}
    adapter = train_adapter(
        clip32, unit_rows(3, clip32.embed_dim, 0), "sks", None, lam=0.1, steps=5
    )
    encode_texts(clip32, QUERIES, [adapter, random_adapter(clip32, 9)])
    after = clip32.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in clip32.model.parameters())


def test_concurrent_requests_with_different_stacks_get_their_sequential_results(
    clip32: ClipBundle,
) -> None:
    pool = [random_adapter(clip32, s) for s in range(6)]
    stacks = [[], pool[:1], pool[1:3], pool[3:6], pool[::2], pool]
    expected = [encode_texts(clip32, QUERIES, s) for s in stacks]
    jobs = [i % len(stacks) for i in range(48)]
    with ThreadPoolExecutor(max_workers=8) as ex:
        results = list(ex.map(lambda i: encode_texts(clip32, QUERIES, stacks[i]), jobs))
    for i, got in zip(jobs, results, strict=True):
        assert np.array_equal(got, expected[i])


def test_adapter_from_another_model_is_refused(clip32: ClipBundle) -> None:
    foreign = random_adapter(clip32, 0)
    foreign.fingerprint = ModelFingerprint("ViT-B-32", "openai", "0" * 64)
    with pytest.raises(AdapterMismatchError, match="ViT-B-32/openai"):
        encode_texts(clip32, QUERIES, [foreign])


def test_text_embeddings_are_normalised_float32(clip64: ClipBundle) -> None:
    out = encode_texts(clip64, QUERIES, [random_adapter(clip64, 1)])
    assert out.dtype == np.float32 and out.shape == (len(QUERIES), clip64.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    assert encode_texts(clip64, []).shape == (0, clip64.embed_dim)
