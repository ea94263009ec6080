"""Per-user FAISS indexes: a derived cache of the database, persisted under the data folder.

The database is the source of truth. `users.index_generation` is bumped in the same transaction
as every change of a user's embedded images, so any API process (on any host) notices a change
by comparing that number with the generation its cached index was built from. A stale, missing
or corrupt index file is rebuilt from the embeddings in the database.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy.orm import Session

from app import repositories
from app.errors import NotFound
from app.ml.index import IndexCorruptError, VectorIndex

log = logging.getLogger(__name__)


# What the ids of a saved index mean. 2: one id per vector (a re-embedded row has a new id).
# Files written under 1 (one id per row) may hold a replaced photo's old vector: rebuilt once.
ID_SCHEME = 2


@dataclass(frozen=True)
class CachedIndex:
    """An index and the database state it reflects."""

    index: VectorIndex
    generation: int
    model_id: str


def _model_slug(model_id: str) -> str:
    # Readable and filesystem-safe, unique by the digest suffix.
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_id)[:60]
    return f"{safe}-{hashlib.sha256(model_id.encode()).hexdigest()[:8]}"


def load_embeddings(
    *, db_session: Session, user_id: str, model_id: str
) -> tuple[np.ndarray, np.ndarray]:
    """(vec_ids (N,) int64, vectors (N, D) float32) of the user's images embedded by `model_id`."""
    rows = repositories.stream_embeddings(db_session=db_session, user_id=user_id, model_id=model_id)
    ids: list[int] = []
    chunks: list[bytes] = []
    for vec_id, blob in rows:
        if blob is not None:
            ids.append(vec_id)
            chunks.append(blob)
    if not ids:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    vectors = np.frombuffer(b"".join(chunks), dtype=np.float32).reshape(len(ids), -1)
    return np.asarray(ids, dtype=np.int64), vectors


def sync_index(
    index: VectorIndex,
    *,
    db_session: Session,
    user_id: str,
    model_id: str,
    max_changes: int | None = None,
) -> tuple[int, int] | None:
    """Bring `index` up to date by id difference: read only the ids, fetch only new vectors.

    Returns (added, removed), or None without touching the index when more than `max_changes`
    ids differ (a full rebuild is cheaper then). A vec_id names one vector, not a row: every
    write of an embedding gives the row a new vec_id (a library file replaced in place and
    embedded again, a rebuild, a model change), so ids alone tell what changed.
    """
    db_ids = np.fromiter(
        repositories.embedded_vec_ids(db_session=db_session, user_id=user_id, model_id=model_id),
        dtype=np.int64,
    )
    have = index.ids()
    new = np.setdiff1d(db_ids, have)
    gone = np.setdiff1d(have, db_ids)
    if max_changes is not None and len(new) + len(gone) > max_changes:
        return None
    found: list[tuple[int, bytes]] = []
    for start in range(0, len(new), 900):  # stay under SQLite's bound-parameter limit
        chunk = new[start : start + 900].tolist()
        rows = repositories.embeddings_of(
            db_session=db_session, user_id=user_id, model_id=model_id, vec_ids=chunk
        )
        found += [(int(v), b) for v, b in rows if b is not None]
    removed = index.remove(gone)
    if found:
        vectors = np.frombuffer(b"".join(b for _, b in found), np.float32).reshape(len(found), -1)
        index.add(np.array([v for v, _ in found], dtype=np.int64), vectors)
    return len(found), removed


def _current(meta: dict[str, object], generation: int, model_id: str) -> bool:
    """Whether a saved index's meta says it is the database's state now."""
    return (
        meta.get("generation") == generation
        and meta.get("model_id") == model_id
        and meta.get("id_scheme") == ID_SCHEME
    )


class IndexCache:
    """In-memory LRU of per-user indexes, backed by files under `root`.

    Bounded by users and by bytes (`VectorIndex.nbytes`): the least recently searched indexes
    are dropped first (their files stay, so the next search of that user loads the file). The
    index just asked for is always kept, even when it alone is over the byte budget.

    A cached index whose generation moved on is brought up to date in place by id difference
    (`sync_index`) and written to its file in the background; a missing one is loaded from its
    file or rebuilt from the database (bench/scale.py compares the two).
    """

    def __init__(self, root: Path, max_users: int = 256, max_bytes: int | None = None) -> None:
        self.root = Path(root)
        self.max_users = max_users
        self.max_bytes = max_bytes
        self.evictions = 0  # indexes dropped to stay within the bounds (for tests/metrics)
        self.refreshes = 0  # indexes updated in place by id difference (for tests/metrics)
        self._saver = ThreadPoolExecutor(max_workers=1, thread_name_prefix="index-save")
        self._entries: OrderedDict[tuple[str, str], CachedIndex] = OrderedDict()
        self._lock = threading.Lock()
        self._user_locks: dict[tuple[str, str], threading.Lock] = {}
        self.rebuilds = 0  # how often the database was read to build an index (for tests/metrics)

    def path(self, user_id: str, model_id: str) -> Path:
        return self.root / _model_slug(model_id) / f"{user_id}.faiss"

    def get(self, *, db_session: Session, user_id: str, model_id: str, dim: int) -> CachedIndex:
        """The user's index at the database's current generation."""
        generation = repositories.index_generation(db_session=db_session, user_id=user_id)
        if generation is None:
            raise NotFound.of("user")
        key = (user_id, model_id)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.generation == generation:
                self._entries.move_to_end(key)
                return entry
            user_lock = self._user_locks.setdefault(key, threading.Lock())
        with user_lock:
            with self._lock:
                entry = self._entries.get(key)
            if entry is not None and entry.generation != generation:
                entry = self._refresh(db_session, entry, user_id, generation)
            if entry is None:
                entry = self._load_file(user_id, model_id, generation)
            if entry is None:
                entry = self._rebuild(db_session, user_id, model_id, generation, dim)
            with self._lock:
                self._entries[key] = entry
                self._entries.move_to_end(key)
                self._evict()
            return entry

    @property
    def nbytes(self) -> int:
        """Approximate memory held by the cached indexes."""
        with self._lock:
            return sum(e.index.nbytes for e in self._entries.values())

    def _evict(self) -> None:
        """Drop least recently used entries beyond the bounds (caller holds the lock)."""
        total = sum(e.index.nbytes for e in self._entries.values())
        while len(self._entries) > 1 and (
            len(self._entries) > self.max_users
            or (self.max_bytes is not None and total > self.max_bytes)
        ):
            _, dropped = self._entries.popitem(last=False)
            total -= dropped.index.nbytes
            self.evictions += 1

    def _refresh(
        self, db_session: Session, stale: CachedIndex, user_id: str, generation: int
    ) -> CachedIndex | None:
        """The stale in-memory index updated in place; None when a rebuild is cheaper."""
        # `generation` was read before the ids, as in _rebuild: a racing change bumps it again.
        index, model_id = stale.index, stale.model_id
        limit = len(index) // 2 + 1000
        changed = sync_index(
            index, db_session=db_session, user_id=user_id, model_id=model_id, max_changes=limit
        )
        if changed is None:
            return None
        self.refreshes += 1
        try:
            self._saver.submit(self._save, index, user_id, model_id, generation)
        except RuntimeError:  # closed (the app is stopping): write it now
            self._save(index, user_id, model_id, generation)
        return CachedIndex(index, generation, model_id)

    def _save(self, index: VectorIndex, user_id: str, model_id: str, generation: int) -> None:
        path = self.path(user_id, model_id)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            meta = {"generation": generation, "model_id": model_id, "user_id": user_id}
            index.save(path, {**meta, "id_scheme": ID_SCHEME})
        except OSError as e:  # a read-only or full disk costs speed, not correctness
            log.warning("could not persist the index of user %s: %s", user_id, e)

    def flush(self) -> None:
        """Wait until every background index write has finished."""
        with contextlib.suppress(RuntimeError):  # closed: shutdown already waited for them
            self._saver.submit(lambda: None).result()

    def close(self) -> None:
        """Finish the background writes and stop the writer thread."""
        self._saver.shutdown(wait=True)

    def _load_file(self, user_id: str, model_id: str, generation: int) -> CachedIndex | None:
        path = self.path(user_id, model_id)
        if not path.exists():
            return None
        try:  # the small sidecar first: a stale file is not worth reading and checksumming
            side = json.loads(path.with_name(path.name + ".json").read_text())
            meta = side.get("meta") or {}
            if not _current(meta, generation, model_id):
                return None
        except (OSError, ValueError, AttributeError):
            return None
        try:
            index, meta = VectorIndex.load(path)
        except IndexCorruptError as e:
            log.warning("rebuilding the index of user %s: %s", user_id, e)
            return None
        if not _current(meta, generation, model_id):
            return None
        return CachedIndex(index, generation, model_id)

    def _rebuild(
        self, db_session: Session, user_id: str, model_id: str, generation: int, dim: int
    ) -> CachedIndex:
        # `generation` was read before the rows: a change racing with this read bumps it
        # again, so the next search rebuilds rather than trusting a half-old index.
        ids, vectors = load_embeddings(db_session=db_session, user_id=user_id, model_id=model_id)
        index = VectorIndex.build(ids, vectors) if len(ids) else VectorIndex.empty(dim)
        self.rebuilds += 1
        self._save(index, user_id, model_id, generation)
        return CachedIndex(index, generation, model_id)

    def forget(self, user_id: str) -> None:
        """Drop the user's cached indexes and files (e.g. when the user is deleted)."""
        self.flush()  # a queued write must not bring a file back afterwards
        with self._lock:
            for key in [k for k in self._entries if k[0] == user_id]:
                del self._entries[key]
        for path in self.root.glob(f"*/{user_id}.faiss*"):
            path.unlink(missing_ok=True)
