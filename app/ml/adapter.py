"""A trained POLAR concept: the rank-1 factors of V' = V + B·Â, as data, plus its storage format."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from app.ml.model import AdapterMismatchError, ModelFingerprint

FORMAT_NAME = "polar-adapter"
FORMAT_VERSION = 1


class AdapterFormatError(ValueError):
    """Bytes that are not a readable POLAR adapter (corrupt, foreign or from a newer version)."""


@dataclass
class ConceptAdapter:
    """Rank-1 update of the last text block's V projection for one concept."""

    b: torch.Tensor  # (d,) what the update adds
    a: torch.Tensor  # (d,) un-normalised; Â = a/‖a‖ at use decides when it fires
    fingerprint: ModelFingerprint  # the text tower it was trained on
    token: str  # placeholder token, e.g. "sks"
    category: str | None  # coarse class name appended to the token, e.g. "dog"
    lam: float  # λ of the mean(B²) regulariser
    steps: int  # Adam steps taken
    lr: float  # Adam learning rate
    final_loss: float  # objective at the returned parameters
    format_version: int = FORMAT_VERSION

    @property
    def a_hat(self) -> torch.Tensor:
        """Unit-norm row Â, (d,)."""
        norm: torch.Tensor = self.a.norm()
        return self.a / norm

    def check_compatible(self, fp: ModelFingerprint) -> None:
        """Refuse to apply this adapter to a different text tower."""
        if fp.text_sha256 != self.fingerprint.text_sha256:
            raise AdapterMismatchError(
                f"adapter for {self.token!r} was trained on model {self.fingerprint.model_id}, "
                f"but the loaded model is {fp.model_id}; retrain the concept on this model."
            )

    def to_bytes(self) -> bytes:
        """safetensors bytes: tensors `a`, `b` (float32) and the metadata as JSON strings."""
        meta: dict[str, Any] = {
            "fingerprint": self.fingerprint.as_dict(),
            "token": self.token,
            "category": self.category,
            "lam": self.lam,
            "steps": self.steps,
            "lr": self.lr,
            "final_loss": self.final_loss,
        }
        header = {
            "format": FORMAT_NAME,
            "format_version": str(self.format_version),
            "polar": json.dumps(meta, sort_keys=True),
        }
        tensors = {
            "a": self.a.detach().to("cpu", torch.float32).contiguous(),
            "b": self.b.detach().to("cpu", torch.float32).contiguous(),
        }
        return st_save(tensors, metadata=header)

    @classmethod
    def from_bytes(cls, data: bytes) -> ConceptAdapter:
        """Parse and validate; raises AdapterFormatError with the reason."""
        header = _read_metadata(data)
        if header.get("format") != FORMAT_NAME:
            raise AdapterFormatError("not a POLAR adapter (safetensors without polar metadata)")
        try:
            version = int(header["format_version"])
        except (KeyError, ValueError) as e:
            raise AdapterFormatError("adapter format_version is missing or not an integer") from e
        if version > FORMAT_VERSION:
            raise AdapterFormatError(
                f"adapter format version {version} is newer than supported ({FORMAT_VERSION})"
            )
        try:
            tensors = st_load(data)
            meta = json.loads(header["polar"])
            adapter = cls(
                b=tensors["b"],
                a=tensors["a"],
                fingerprint=ModelFingerprint.from_dict(meta["fingerprint"]),
                token=str(meta["token"]),
                category=None if meta["category"] is None else str(meta["category"]),
                lam=float(meta["lam"]),
                steps=int(meta["steps"]),
                lr=float(meta["lr"]),
                final_loss=float(meta["final_loss"]),
                format_version=version,
            )
        except (SafetensorError, KeyError, TypeError, ValueError) as e:
            raise AdapterFormatError(f"corrupt POLAR adapter: {e}") from e
        adapter._validate()
        return adapter

    def _validate(self) -> None:
        """Shapes, finiteness and a usable Â."""
        if self.a.ndim != 1 or self.a.shape != self.b.shape:
            shapes = f"a{tuple(self.a.shape)} b{tuple(self.b.shape)}"
            raise AdapterFormatError(f"adapter tensors must both be (d,), got {shapes}")
        if not (torch.isfinite(self.a).all() and torch.isfinite(self.b).all()):
            raise AdapterFormatError("adapter tensors contain NaN or infinity")
        if not float(self.a.norm()) > 0.0:
            raise AdapterFormatError("adapter row A is zero, Â is undefined")
        if not self.token or not math.isfinite(self.lam):
            raise AdapterFormatError("adapter token is empty or λ is not finite")


def _read_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors blob (8-byte little-endian header length + JSON)."""
    if len(data) < 8:
        raise AdapterFormatError(f"adapter bytes too short ({len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise AdapterFormatError("truncated adapter: header runs past the end of the data")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFormatError("adapter header is not valid safetensors JSON") from e
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def stack_factors(
    adapters: Sequence[ConceptAdapter], fp: ModelFingerprint
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Â, B) as (K, d) float64 matrices in a canonical order: the sum is order-free bit for bit."""
    for adapter in adapters:
        adapter.check_compatible(fp)
    ordered = sorted(adapters, key=_canonical_key)
    d = adapters[0].a.shape[0] if adapters else 0
    if not ordered:
        return torch.zeros(0, d, dtype=torch.float64), torch.zeros(0, d, dtype=torch.float64)
    # Normalise in float64 once; callers cast to the model's dtype.
    a = torch.stack([ad.a.detach().to("cpu", torch.float64) for ad in ordered])  # (K, d)
    b = torch.stack([ad.b.detach().to("cpu", torch.float64) for ad in ordered])  # (K, d)
    return a / a.norm(dim=1, keepdim=True), b


def _canonical_key(adapter: ConceptAdapter) -> bytes:
    """Content-derived sort key (floating-point sums depend on order)."""
    a = adapter.a.detach().to("cpu", torch.float32).contiguous()
    b = adapter.b.detach().to("cpu", torch.float32).contiguous()
    return b.numpy().tobytes() + a.numpy().tobytes()
