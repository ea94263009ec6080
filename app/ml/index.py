"""Per-user exact inner-product index over image embeddings, persisted with a checksum."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import faiss
import numpy as np

INDEX_FORMAT_VERSION = 1


ID_MAP_BYTES = 48  # IndexIDMap2's reverse map: one std::unordered_map node per vector (approx.)
INDEX_OVERHEAD_BYTES = 4096


class IndexCorruptError(RuntimeError):
    """The saved index is missing, unreadable or fails its checksum: rebuild it."""


def _sidecar(path: Path) -> Path:
    """The JSON file holding the checksum and the caller's meta."""
    return path.with_name(path.name + ".json")


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over the target."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class VectorIndex:
    """faiss IndexIDMap2(IndexFlatIP): exact cosine search for L2-normalised vectors."""

    def __init__(self, index: faiss.IndexIDMap2) -> None:
        self._index = index
        self._lock = threading.Lock()  # faiss mutations are not thread-safe

    @property
    def dim(self) -> int:
        """Vector dimension D."""
        return int(self._index.d)

    @classmethod
    def empty(cls, dim: int) -> VectorIndex:
        """An index with no vectors."""
        return cls(faiss.IndexIDMap2(faiss.IndexFlatIP(dim)))

    @classmethod
    def build(cls, ids: np.ndarray, vectors: np.ndarray) -> VectorIndex:
        """ids int64 (N,), vectors float32 (N, D)."""
        vectors = np.asarray(vectors)
        if vectors.ndim != 2:
            raise ValueError(f"vectors must be (N, D), got shape {vectors.shape}")
        index = cls.empty(vectors.shape[1])
        index.add(ids, vectors)
        return index

    def _check(self, ids: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim or vectors.shape[0] != ids.shape[0]:
            raise ValueError(
                f"need ids (N,) and vectors (N, {self.dim}); got {ids.shape}, {vectors.shape}"
            )
        if not np.isfinite(vectors).all():
            raise ValueError("vectors contain NaN or infinity")
        if (ids < 0).any() or len(np.unique(ids)) != len(ids):
            raise ValueError("ids must be unique and non-negative")
        return ids, vectors

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors under new ids (an id already present is an error)."""
        ids, vectors = self._check(ids, vectors)
        with self._lock:
            if np.isin(ids, self._ids()).any():
                raise ValueError("some ids are already in the index")
            if len(ids):
                self._index.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> int:
        """Remove these ids; returns how many were present."""
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        if not len(ids):
            return 0
        with self._lock:
            return int(self._index.remove_ids(ids))  # type: ignore[arg-type]  # numpy accepted

    def search(
        self, queries: np.ndarray, k: int, among: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids), each (Q, k), best first; missing slots have id -1 and score -inf.

        `among` (int64 ids) restricts the search to those ids (e.g. the images a filter allows),
        inside FAISS, without ranking the rest.
        """
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be (Q, {self.dim}), got {q.shape}")
        if k < 0:
            raise ValueError("k must be >= 0")
        scores = np.full((q.shape[0], k), -np.inf, dtype=np.float32)
        ids = np.full((q.shape[0], k), -1, dtype=np.int64)
        params = selector = None
        if among is not None:
            allowed = np.ascontiguousarray(among, dtype=np.int64)
            # `selector` stays referenced here until the search is done (SWIG does not own it).
            selector = faiss.IDSelectorBatch(allowed)
            params = faiss.SearchParameters()
            params.sel = selector
        with self._lock:
            n = self._index.ntotal if among is None else min(self._index.ntotal, len(among))
            kk = min(k, n)
            if kk and q.shape[0]:
                scores[:, :kk], ids[:, :kk] = self._index.search(q, kk, params=params)
        del selector
        scores[ids < 0] = -np.inf
        return scores, ids

    def range_search(self, query: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """Every vector scoring above `threshold` for one query: (scores, ids), each (M,), in
        no particular order (FAISS's range search: no top-k to guess, no Python loop)."""
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
        if q.shape[1] != self.dim:
            raise ValueError(f"query must be ({self.dim},), got {query.shape}")
        with self._lock:
            if self._index.ntotal == 0:
                return np.zeros(0, np.float32), np.zeros(0, np.int64)
            lims, scores, ids = self._index.range_search(q, float(threshold))
        return scores[lims[0] : lims[1]].astype(np.float32), ids[lims[0] : lims[1]].astype(np.int64)

    def _ids(self) -> np.ndarray:
        return faiss.vector_to_array(self._index.id_map).astype(np.int64)

    def ids(self) -> np.ndarray:
        """All ids present, int64 (N,)."""
        with self._lock:
            return self._ids()

    def __len__(self) -> int:
        return int(self._index.ntotal)

    @property
    def nbytes(self) -> int:
        """Approximate memory held: float32 vectors, int64 ids and the id -> row hash map."""
        return len(self) * (4 * self.dim + 8 + ID_MAP_BYTES) + INDEX_OVERHEAD_BYTES

    def save(self, path: Path, meta: dict[str, Any]) -> None:
        """Atomically write the index and a sidecar JSON with its sha256 and `meta`."""
        path = Path(path)
        with self._lock:
            data = faiss.serialize_index(self._index).tobytes()
        side = {
            "format_version": INDEX_FORMAT_VERSION,
            "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data),
            "dim": self.dim,
            "count": len(self),
            "meta": meta,
        }
        _atomic_write(path, data)
        _atomic_write(_sidecar(path), json.dumps(side, sort_keys=True).encode())

    @classmethod
    def load(cls, path: Path) -> tuple[VectorIndex, dict[str, Any]]:
        """Read and verify an index written by save(); raises IndexCorruptError."""
        path = Path(path)
        try:
            side = json.loads(_sidecar(path).read_bytes())
            data = path.read_bytes()
        except (OSError, ValueError) as e:
            raise IndexCorruptError(f"cannot read index {path}: {e}") from e
        if not isinstance(side, dict) or side.get("format_version") != INDEX_FORMAT_VERSION:
            raise IndexCorruptError(f"index sidecar of {path} is not a known format")
        if hashlib.sha256(data).hexdigest() != side.get("sha256"):
            raise IndexCorruptError(f"index {path} fails its sha256 checksum")
        try:
            index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        except RuntimeError as e:
            raise IndexCorruptError(f"index {path} cannot be parsed: {e}") from e
        if not isinstance(index, faiss.IndexIDMap2):
            index = faiss.downcast_index(index)
        if not isinstance(index, faiss.IndexIDMap2) or index.ntotal != side.get("count"):
            raise IndexCorruptError(f"index {path} does not match its sidecar")
        return cls(index), dict(side.get("meta") or {})
