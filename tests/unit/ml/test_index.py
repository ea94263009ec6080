"""VectorIndex: exact inner-product search, removal, checksummed atomic persistence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.ml.index import IndexCorruptError, VectorIndex


def unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray]:
    ids = np.random.default_rng(0).choice(2**62, size=300, replace=False).astype(np.int64)
    return ids, unit(300, 32, 1)


def test_search_is_exact(data) -> None:
    ids, vecs = data
    index = VectorIndex.build(ids, vecs)
    q = unit(7, 32, 2)
    scores, got = index.search(q, 10)
    sims = q @ vecs.T
    order = np.argsort(-sims, axis=1)[:, :10]
    assert np.array_equal(got, ids[order])
    np.testing.assert_allclose(scores, np.take_along_axis(sims, order, 1), atol=1e-5)
    assert len(index) == 300 and index.dim == 32


def test_short_and_empty_results_are_padded(data) -> None:
    ids, vecs = data
    index = VectorIndex.build(ids[:3], vecs[:3])
    scores, got = index.search(unit(2, 32, 3), 5)
    assert scores.shape == got.shape == (2, 5)
    assert (got[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()
    assert set(got[0, :3]) == set(ids[:3])
    empty = VectorIndex.build(np.zeros(0, np.int64), np.zeros((0, 32), np.float32))
    s, i = empty.search(unit(1, 32, 4), 3)
    assert (i == -1).all() and np.isneginf(s).all()
    assert index.search(unit(1, 32, 4), 0)[1].shape == (1, 0)


def test_remove_and_add(data) -> None:
    ids, vecs = data
    index = VectorIndex.build(ids, vecs)
    assert index.remove(np.array([ids[0], ids[1], 12345])) == 2
    assert len(index) == 298
    _, got = index.search(vecs[:2], 300)
    assert ids[0] not in got and ids[1] not in got
    index.add(ids[:1], vecs[:1])
    assert index.search(vecs[:1], 1)[1][0, 0] == ids[0]
    with pytest.raises(ValueError, match="already"):
        index.add(ids[5:6], vecs[5:6])
    with pytest.raises(ValueError):
        index.add(np.array([1, 1]), vecs[:2])
    with pytest.raises(ValueError):
        index.add(np.array([7]), np.ones((1, 31), np.float32))
    assert index.remove(np.array([], np.int64)) == 0


def test_save_load_round_trip(data, tmp_path: Path) -> None:
    ids, vecs = data
    index = VectorIndex.build(ids, vecs)
    path = tmp_path / "user.faiss"
    meta = {"generation": 7, "model_id": "polar-demo/w@abc"}
    index.save(path, meta)
    loaded, got_meta = VectorIndex.load(path)
    assert got_meta == meta and len(loaded) == 300
    assert np.array_equal(np.sort(loaded.ids()), np.sort(ids))
    q = unit(5, 32, 5)
    assert all(
        np.array_equal(x, y) for x, y in zip(index.search(q, 20), loaded.search(q, 20), strict=True)
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["user.faiss", "user.faiss.json"]
    index.remove(ids[:10])
    index.save(path, {"generation": 8})  # overwrite in place
    again, m = VectorIndex.load(path)
    assert len(again) == 290 and m == {"generation": 8}


@pytest.mark.parametrize("damage", ["flip", "truncate", "no_sidecar", "bad_sidecar", "no_index"])
def test_corruption_is_detected(data, tmp_path: Path, damage: str) -> None:
    ids, vecs = data
    path = tmp_path / "user.faiss"
    VectorIndex.build(ids, vecs).save(path, {})
    side = tmp_path / "user.faiss.json"
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0x01
        path.write_bytes(bytes(raw))
    elif damage == "truncate":
        path.write_bytes(bytes(raw[: len(raw) // 2]))
    elif damage == "no_sidecar":
        side.unlink()
    elif damage == "bad_sidecar":
        side.write_text("{not json")
    else:
        path.unlink()
    with pytest.raises(IndexCorruptError):
        VectorIndex.load(path)


def test_search_among_ranks_only_the_allowed_ids_exactly():
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((50, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(100, 150, dtype=np.int64)
    index = VectorIndex.build(ids, vectors)
    allowed = np.array([103, 120, 149, 111], dtype=np.int64)
    scores, got = index.search(vectors[:2], 10, among=allowed)
    for row in range(2):
        expect = sorted(allowed, key=lambda i: -float(vectors[i - 100] @ vectors[row]))
        assert got[row, :4].tolist() == expect
        assert (got[row, 4:] == -1).all() and np.isneginf(scores[row, 4:]).all()
    assert index.search(vectors[:1], 3, among=np.array([], dtype=np.int64))[1].tolist() == [
        [-1, -1, -1]
    ]
