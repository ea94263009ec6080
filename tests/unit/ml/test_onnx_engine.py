"""The optional ONNX Runtime image tower (app.ml.onnx_engine): equal vectors, cache, fallbacks.

The tests that run the engine need the onnx extra (`pip install -e '.[onnx]'`, which
`make install` installs); they skip only where onnxruntime cannot be imported. The fallback
tests run everywhere.
"""

from __future__ import annotations

import builtins
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.ml import onnx_engine
from app.ml.encode import encode_images
from app.ml.model import DEMO_MODEL_NAME, ClipBundle, demo_checkpoint_path, get_clip
from app.ml.regions import encode_boxes, layout_boxes
from tests.unit.ml.conftest import tiny_clip


@pytest.fixture(autouse=True)
def _fresh_engines() -> Iterator[None]:
    """Every test starts as a new process would: no engine loaded yet."""
    onnx_engine.forget_engines()
    yield
    onnx_engine.forget_engines()


@pytest.fixture(scope="module")
def demo_bundle() -> ClipBundle:
    return get_clip(DEMO_MODEL_NAME, str(demo_checkpoint_path()), "cpu")


def _pictures(n: int = 5) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 255, (48 + 8 * i, 64, 3), dtype=np.uint8)) for i in range(n)
    ]


def _needs_onnxruntime() -> None:
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")


def test_onnx_vectors_equal_torch_on_the_demo_model(demo_bundle: ClipBundle, tmp_path: Path):
    _needs_onnxruntime()
    engine = onnx_engine.image_engine(demo_bundle, tmp_path)
    assert isinstance(engine, onnx_engine.OnnxImageTower)
    pictures = _pictures()
    torch_vectors = encode_images(demo_bundle, pictures, batch_size=2)
    onnx_vectors = encode_images(demo_bundle, pictures, batch_size=2, engine=engine)
    assert onnx_vectors.shape == torch_vectors.shape == (5, demo_bundle.embed_dim)
    assert np.abs(onnx_vectors - torch_vectors).max() <= onnx_engine.TOLERANCE
    # crops go through it too
    boxes = layout_boxes("five")
    np.testing.assert_allclose(
        encode_boxes(demo_bundle, pictures, boxes, engine=engine),
        encode_boxes(demo_bundle, pictures, boxes),
        atol=onnx_engine.TOLERANCE,
    )


def test_one_session_per_thread_count(clip32: ClipBundle, tmp_path: Path) -> None:
    _needs_onnxruntime()
    engine = onnx_engine.image_engine(clip32, tmp_path)
    assert isinstance(engine, onnx_engine.OnnxImageTower)
    x = torch.rand(3, 3, 32, 32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = engine(x)
        torch.set_num_threads(2)
        two = engine(x)
    finally:
        torch.set_num_threads(before)
    assert engine.session(1) is not engine.session(2)
    np.testing.assert_allclose(one.numpy(), two.numpy(), atol=1e-5)


def test_the_export_is_cached_and_reused(
    clip32: ClipBundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _needs_onnxruntime()
    assert onnx_engine.image_engine(clip32, tmp_path) is not None
    files = list(tmp_path.glob("*.onnx"))
    assert len(files) == 1
    digest = onnx_engine.visual_state_sha256(clip32.model)
    assert files[0].name == f"{clip32.fingerprint.name}-{digest[:24]}.onnx"
    written = files[0].stat().st_mtime_ns
    # In the same process the loaded tower is kept ...
    assert onnx_engine.image_engine(clip32, tmp_path) is onnx_engine.image_engine(clip32, tmp_path)

    # ... and a new process reuses the file: no second export.
    def no_export(*_: object, **__: object) -> None:
        raise AssertionError("exported again")

    onnx_engine.forget_engines()
    monkeypatch.setattr(onnx_engine, "export_tower", no_export)
    engine = onnx_engine.image_engine(clip32, tmp_path)
    assert isinstance(engine, onnx_engine.OnnxImageTower) and engine.path == files[0]
    assert files[0].stat().st_mtime_ns == written
    # Other image-tower weights under the same model name: another file.
    other = tiny_clip(5)
    assert other.fingerprint.name == clip32.fingerprint.name
    assert onnx_engine.visual_state_sha256(other.model) != digest


def test_falls_back_to_torch_when_onnxruntime_is_missing(
    clip32: ClipBundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    real_import = builtins.__import__

    def without_onnxruntime(name: str, *args: object, **kwargs: object) -> object:
        if name == "onnxruntime" or name.startswith("onnxruntime."):
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "onnxruntime", raising=False)
    monkeypatch.setattr(builtins, "__import__", without_onnxruntime)
    with caplog.at_level(logging.INFO, logger="app.ml.onnx_engine"):
        assert onnx_engine.image_engine(clip32, tmp_path) is None
    assert "onnxruntime is not installed" in caplog.text
    assert not list(tmp_path.glob("*.onnx"))  # nothing exported


def test_falls_back_to_torch_when_the_check_fails(
    clip32: ClipBundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    _needs_onnxruntime()
    real_call = onnx_engine.OnnxImageTower.__call__

    def off_by_a_little(self: onnx_engine.OnnxImageTower, pixels: torch.Tensor) -> torch.Tensor:
        out = real_call(self, pixels)
        return out + 0.01 * out.abs().max()  # an engine that computes something else

    monkeypatch.setattr(onnx_engine.OnnxImageTower, "__call__", off_by_a_little)
    with caplog.at_level(logging.INFO, logger="app.ml.onnx_engine"):
        assert onnx_engine.image_engine(clip32, tmp_path) is None
    assert "differ from PyTorch's" in caplog.text
    # the answer is kept for the process: no second check
    monkeypatch.setattr(onnx_engine, "check_tower", lambda *_: pytest.fail("checked again"))
    assert onnx_engine.image_engine(clip32, tmp_path) is None


def test_falls_back_when_the_export_fails_and_when_turned_off(
    clip32: ClipBundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert onnx_engine.image_engine(clip32, tmp_path, enabled=False) is None
    _needs_onnxruntime()

    def broken_export(*_: object, **__: object) -> None:
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(onnx_engine, "export_tower", broken_export)
    tower, why = onnx_engine.load_tower(clip32, tmp_path)
    assert tower is None and "export failed" in why and "unsupported operator" in why


def test_a_float64_tower_stays_on_torch(clip64: ClipBundle, tmp_path: Path) -> None:
    tower, why = onnx_engine.load_tower(clip64, tmp_path)
    assert tower is None and "float32" in why
