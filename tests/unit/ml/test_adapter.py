"""Adapter storage: safetensors bytes with metadata; bad bytes fail clearly."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save

from app.ml.adapter import AdapterFormatError, ConceptAdapter
from app.ml.model import AdapterMismatchError, ModelFingerprint

FP = ModelFingerprint("polar-demo", "weights.safetensors", "ab" * 32)


def make(d: int = 512, category: str | None = "dog") -> ConceptAdapter:
    g = torch.Generator().manual_seed(0)
    return ConceptAdapter(
        b=torch.randn(d, generator=g),
        a=torch.randn(d, generator=g),
        fingerprint=FP,
        token="sks",
        category=category,
        lam=0.03,
        steps=500,
        lr=1e-3,
        final_loss=0.0123,
    )


@pytest.mark.parametrize("category", ["dog", None])
def test_round_trip(category: str | None) -> None:
    adapter = make(category=category)
    data = adapter.to_bytes()
    assert len(data) < 2 * 512 * 4 + 1024  # about 4 KB at d = 512
    back = ConceptAdapter.from_bytes(data)
    assert torch.equal(back.a, adapter.a) and torch.equal(back.b, adapter.b)
    assert back.fingerprint == FP and back.category == category
    assert (back.token, back.lam, back.steps, back.lr, back.final_loss, back.format_version) == (
        "sks", 0.03, 500, 1e-3, 0.0123, 1,
    )  # fmt: skip


def _header(data: bytes) -> dict:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n])


def _with_metadata(meta: dict[str, str], d: int = 4) -> bytes:
    return save({"a": torch.ones(d), "b": torch.ones(d)}, metadata=meta)


def test_metadata_is_readable_by_other_tools() -> None:
    meta = _header(make().to_bytes())["__metadata__"]
    assert meta["format"] == "polar-adapter" and meta["format_version"] == "1"
    assert json.loads(meta["polar"])["fingerprint"]["text_sha256"] == FP.text_sha256


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "too short"),
        (b"\x00" * 3, "too short"),
        (b"not a safetensors file at all", "header"),
        (make().to_bytes()[:-100], "corrupt"),
        (make().to_bytes()[:40], "truncated"),
        (save({"weight": torch.ones(3)}), "not a POLAR adapter"),
        (
            _with_metadata({"format": "polar-adapter", "format_version": "99", "polar": "{}"}),
            "newer",
        ),
        (
            _with_metadata({"format": "polar-adapter", "format_version": "1", "polar": "{bad"}),
            "corrupt",
        ),
        (
            _with_metadata({"format": "polar-adapter", "format_version": "1", "polar": "{}"}),
            "corrupt",
        ),
    ],
)
def test_bad_bytes_raise_a_clear_error(data: bytes, reason: str) -> None:
    with pytest.raises(AdapterFormatError, match=reason):
        ConceptAdapter.from_bytes(data)


def test_flipped_header_byte_is_detected() -> None:
    data = bytearray(make().to_bytes())
    data[10] ^= 0xFF
    with pytest.raises(AdapterFormatError):
        ConceptAdapter.from_bytes(bytes(data))


def test_invalid_tensors_are_rejected() -> None:
    bad = make()
    bad.a = torch.zeros_like(bad.a)
    with pytest.raises(AdapterFormatError, match="zero"):
        ConceptAdapter.from_bytes(bad.to_bytes())
    bad = make()
    bad.b[3] = float("nan")
    with pytest.raises(AdapterFormatError, match="NaN"):
        ConceptAdapter.from_bytes(bad.to_bytes())
    bad = make()
    bad.b = bad.b[:10]
    with pytest.raises(AdapterFormatError, match=r"\(d,\)"):
        ConceptAdapter.from_bytes(bad.to_bytes())


def test_check_compatible() -> None:
    adapter = make()
    adapter.check_compatible(FP)
    adapter.check_compatible(ModelFingerprint("renamed", "copy.safetensors", FP.text_sha256))
    other = ModelFingerprint("ViT-B-32", "openai", "cd" * 32)
    with pytest.raises(
        AdapterMismatchError, match=r"polar-demo/weights.safetensors@abab.*ViT-B-32"
    ):
        adapter.check_compatible(other)
