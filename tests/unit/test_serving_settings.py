"""Serving capacity: API workers need a broker; the pool is sized to the request threads."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.config import Settings
from app.db import POOL_OVERFLOW, make_engine


def test_several_workers_need_a_broker(tmp_path):
    with pytest.raises(ValidationError, match="broker"):
        Settings(data_dir=tmp_path, workers=2, broker_url="")
    ok = Settings(data_dir=tmp_path, workers=2, broker_url="redis://127.0.0.1:6379/0")
    assert ok.workers == 2


def test_postgres_pool_holds_a_connection_per_request_thread():
    # No connection is made: the engine only records the pool's bounds.
    engine = make_engine("postgresql://nobody@127.0.0.1:1/none", pool_size=12)
    try:
        assert engine.pool.size() == 12  # type: ignore[attr-defined]
        assert engine.pool._max_overflow == POOL_OVERFLOW  # type: ignore[attr-defined]
    finally:
        engine.dispose()
