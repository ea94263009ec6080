"""General-knowledge retention of one concept adapter (docs/POLAR.md, the paper's new metric).

Two methods, the first one the model allows:
- `caption_r@10` (the paper's): the model ships a retention set, `retention.npz` next to its local
  checkpoint, holding `captions` (N,) str, `image_embeddings` (N, D) float32 of the image each
  caption describes, and the `model_id` it was built with. Each caption queries the N images;
  R@10 is measured without and with the adapter. score = adapted / base; the concept is flagged
  when base − adapted exceeds `training.retention_max_drop`.
- `text_cosine` (a text-only proxy, for models without a set, e.g. ViT-B-32 from the hub): mean
  cosine similarity between the base and the adapted embeddings of ~200 everyday captions
  (app/ml/assets/generic_captions.txt). score = that mean (1.0 = the update changes nothing);
  flagged when 1 − score exceeds the same `retention_max_drop`.
The base side of either method is computed once per model and cached.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np

from app.config import ModelSettings
from app.ml.adapter import ConceptAdapter
from app.ml.encode import encode_texts
from app.ml.model import ClipBundle, demo_checkpoint_path
from app.services.model import ServingModel

log = logging.getLogger(__name__)

RETENTION_FILE = "retention.npz"
GENERIC_CAPTIONS = Path(__file__).resolve().parents[1] / "ml" / "assets" / "generic_captions.txt"
RECALL_K = 10
CAPTION_METHOD = f"caption_r@{RECALL_K}"
PROXY_METHOD = "text_cosine"


@dataclass(frozen=True)
class RetentionSet:
    """Captions and the embeddings of the images they describe (caption i ↔ image i)."""

    captions: tuple[str, ...]
    image_embeddings: np.ndarray  # (N, D) float32, L2-normalised
    model_id: str  # ModelFingerprint.model_id of the model that embedded the images

    def __post_init__(self) -> None:
        emb = self.image_embeddings
        assert emb.ndim == 2 and emb.shape[0] == len(self.captions) > 0, "one image per caption"
        assert emb.dtype == np.float32, "image embeddings are float32"

    @property
    def digest(self) -> str:
        """Content hash: the cache key of the base recall."""
        h = hashlib.sha256("\n".join(self.captions).encode())
        h.update(np.ascontiguousarray(self.image_embeddings).tobytes())
        h.update(self.model_id.encode())
        return h.hexdigest()

    def save(self, path: Path) -> None:
        """Write the .npz (plain arrays: it loads without pickle)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            np.savez(
                f,
                captions=np.array(self.captions, dtype=np.str_),
                image_embeddings=self.image_embeddings,
                model_id=np.array(self.model_id, dtype=np.str_),
            )

    @classmethod
    def load(cls, path: Path) -> RetentionSet:
        """Read and validate a .npz written by save(); ValueError when it is malformed."""
        with np.load(path, allow_pickle=False) as data:
            try:
                captions = tuple(str(c) for c in data["captions"])
                emb = np.asarray(data["image_embeddings"], dtype=np.float32)
                model_id = str(data["model_id"])
            except KeyError as e:
                raise ValueError(f"{path}: missing array {e}") from e
        if emb.ndim != 2 or emb.shape[0] != len(captions) or not captions:
            raise ValueError(f"{path}: need N captions and (N, D) image embeddings")
        if not np.isfinite(emb).all():
            raise ValueError(f"{path}: image embeddings contain NaN or infinity")
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        return cls(captions, emb, model_id)


@dataclass(frozen=True)
class RetentionResult:
    """How much general retrieval one adapter keeps."""

    method: str  # CAPTION_METHOD or PROXY_METHOD
    base: float  # R@10 without the adapter (1.0 for the proxy: a model agrees with itself)
    adapted: float  # R@10 with the adapter (mean base/adapted cosine for the proxy)
    score: float  # adapted / base (the proxy: its mean cosine)
    flagged: bool  # base − adapted > max_drop
    n: int  # captions measured

    def as_metrics(self) -> dict[str, Any]:
        """The fields stored in a concept's training metrics."""
        return {
            "retention_method": self.method,
            "retention_base": round(self.base, 6),
            "retention_adapted": round(self.adapted, 6),
            "retention_captions": self.n,
        }


def recall_at_k(text: np.ndarray, images: np.ndarray, k: int = RECALL_K) -> float:
    """Fraction of captions whose own image (same row) ranks in the top k; ties count against."""
    assert text.shape == images.shape, "one image per caption"
    scores = text @ images.T  # (N, N): caption i vs image j
    own = np.diagonal(scores)[:, None]  # (N, 1)
    ranks = (scores >= own).sum(axis=1)  # (N,) 1-based, pessimistic
    return float((ranks <= k).mean())


T = TypeVar("T")
_lock = threading.Lock()
_base_cache: dict[tuple[str, str], object] = {}  # (model_id, what) -> base R@10 or embeddings


def _cached(key: tuple[str, str], compute: Callable[[], T]) -> T:
    """compute() once per key and process (the base model's side never changes)."""
    with _lock:
        if key in _base_cache:
            return cast(T, _base_cache[key])
    value = compute()  # outside the lock: encoding may take a while; recomputing twice is harmless
    with _lock:
        return cast(T, _base_cache.setdefault(key, value))


def _flag(base: float, adapted: float, max_drop: float) -> bool:
    # A tolerance for float noise: an update that changes nothing must never be flagged.
    return base - adapted > max_drop + 1e-9


def caption_retention(
    bundle: ClipBundle, adapter: ConceptAdapter, rset: RetentionSet, *, max_drop: float
) -> RetentionResult:
    """The paper's metric: caption→image R@10 on the retention set, with vs. without the update."""
    if rset.image_embeddings.shape[1] != bundle.embed_dim:
        raise ValueError(
            f"retention set has {rset.image_embeddings.shape[1]}-d embeddings, "
            f"the model {bundle.embed_dim}"
        )
    key = (bundle.fingerprint.model_id, f"r@{RECALL_K}:{rset.digest}")
    base = _cached(
        key, lambda: recall_at_k(encode_texts(bundle, rset.captions), rset.image_embeddings)
    )
    text = encode_texts(bundle, rset.captions, [adapter])  # (N, D)
    adapted = recall_at_k(text, rset.image_embeddings)
    score = adapted / base if base > 0 else 1.0
    return RetentionResult(
        CAPTION_METHOD, base, adapted, score, _flag(base, adapted, max_drop), len(rset.captions)
    )


def proxy_retention(
    bundle: ClipBundle,
    adapter: ConceptAdapter,
    captions: Sequence[str] | None = None,
    *,
    max_drop: float,
) -> RetentionResult:
    """Text-only proxy: mean cosine of base and adapted embeddings of everyday captions."""
    captions = tuple(captions) if captions is not None else generic_captions()
    digest = hashlib.sha256("\n".join(captions).encode()).hexdigest()
    base = _cached(
        (bundle.fingerprint.model_id, f"texts:{digest}"), lambda: encode_texts(bundle, captions)
    )  # (N, D)
    adapted = encode_texts(bundle, captions, [adapter])  # (N, D)
    mean_cos = float(np.clip((base * adapted).sum(axis=1), -1.0, 1.0).mean())
    return RetentionResult(
        PROXY_METHOD, 1.0, mean_cos, mean_cos, _flag(1.0, mean_cos, max_drop), len(captions)
    )


@cache
def generic_captions() -> tuple[str, ...]:
    """The proxy's everyday captions, one per non-empty line (comments start with #)."""
    lines = GENERIC_CAPTIONS.read_text(encoding="utf-8").splitlines()
    return tuple(s for line in lines if (s := line.strip()) and not s.startswith("#"))


def retention_set_path(serving: ServingModel, cfg: ModelSettings) -> Path | None:
    """`retention.npz` next to the local checkpoint that is serving, if there is one."""
    checkpoint = demo_checkpoint_path() if serving.fallback_reason else Path(cfg.pretrained)
    if not checkpoint.is_file():
        return None  # a hub tag such as "openai": no local folder to ship a set in
    path = checkpoint.parent / RETENTION_FILE
    return path if path.is_file() else None


_sets: dict[tuple[Path, float, str], RetentionSet | None] = {}


def load_retention_set(path: Path, model_id: str) -> RetentionSet | None:
    """The set at `path` if it was built with this model (cached by path, mtime, model)."""
    key = (path.resolve(), path.stat().st_mtime, model_id)
    with _lock:
        if key in _sets:
            return _sets[key]
    rset: RetentionSet | None
    try:
        rset = RetentionSet.load(path)
    except (OSError, ValueError) as e:
        log.warning("ignoring retention set %s: %s", path, e)
        rset = None
    if rset is not None and rset.model_id != model_id:
        log.warning(
            "ignoring retention set %s: built with %s, serving %s; rebuild it "
            "(python -m app.demo.retention_set)",
            path,
            rset.model_id,
            model_id,
        )
        rset = None
    with _lock:
        _sets[key] = rset
    return rset


def measure_retention(
    serving: ServingModel, cfg: ModelSettings, adapter: ConceptAdapter, *, max_drop: float
) -> RetentionResult:
    """Retention of one adapter on the serving model: the caption set if shipped, else the proxy."""
    bundle = serving.bundle
    path = retention_set_path(serving, cfg)
    rset = load_retention_set(path, bundle.fingerprint.model_id) if path else None
    if rset is not None and rset.image_embeddings.shape[1] == bundle.embed_dim:
        return caption_retention(bundle, adapter, rset, max_drop=max_drop)
    return proxy_retention(bundle, adapter, max_drop=max_drop)
