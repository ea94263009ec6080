"""An optional ONNX Runtime engine for the image tower (`pip install polar-search[onnx]`).

ONNX Runtime (the engine Immich's machine learning runs) computes the same image tower faster
than PyTorch eager on a CPU (bench/index_speed.py measures both in one run). The tower is
exported with `torch.onnx` at first use and cached under the data folder, one file per set of
image-tower weights (`<model>-<sha256 of the tower's tensors>.onnx`), so a restart reuses it.

It is used only where it gives the same vectors: at each load a check batch runs through both
engines and the ONNX session is taken only when every unit vector agrees with PyTorch's within
`TOLERANCE` (1e-4). Otherwise (onnxruntime not installed, the export failing, a mismatch, a
model on a GPU, `POLAR_MODEL__ONNX=false`) the image tower stays PyTorch's, with one log line
saying why. Only the whole-image and crop passes use it: regions pooled from the tower's
spatial features (app.ml.region_pool) need the tower's insides and stay on PyTorch.

ONNX Runtime fixes a session's threads when it is made, so one session is kept per thread
count asked for (the torch thread count in force at the call: `app.ml.threads.cpu_threads`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import warnings
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from app.ml.encode import ImageEngine
from app.ml.model import ClipBundle

log = logging.getLogger(__name__)

TOLERANCE = 1e-4  # largest |difference| between the engines' unit vectors that is accepted
OPSET = 17
CHECK_BATCH = 4


def visual_state_sha256(model: nn.Module) -> str:
    """sha256 over the image tower's tensors (names, dtypes, shapes, bytes), in name order."""
    digest = hashlib.sha256()
    state = model.state_dict()
    for key in sorted(state):
        if not key.startswith("visual."):
            continue
        t = state[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _side(bundle: ClipBundle) -> tuple[int, int]:
    size: Any = bundle.model.visual.image_size  # type: ignore[union-attr]
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


def export_tower(bundle: ClipBundle, path: Path) -> None:
    """Export the bundle's image tower (pixels (B, 3, H, W) -> features (B, D)) to `path`,
    atomically (a half-written file never carries the final name)."""
    h, w = _side(bundle)
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused attention op has no ONNX form
    try:
        with warnings.catch_warnings():
            # the TorchScript exporter's deprecation and tracer notes: the check batch decides
            warnings.simplefilter("ignore")
            torch.onnx.export(
                bundle.model.visual,  # type: ignore[arg-type]
                (x,),
                str(tmp),
                input_names=["pixels"],
                output_names=["features"],
                dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}},
                opset_version=OPSET,
                dynamo=False,
            )
        os.replace(tmp, path)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
        tmp.unlink(missing_ok=True)


class OnnxImageTower:
    """The image tower as ONNX Runtime sessions, one per thread count, on one exported file."""

    def __init__(self, ort: Any, path: Path) -> None:
        self._ort = ort
        self.path = path
        self._sessions: dict[int, Any] = {}
        self._lock = threading.Lock()

    def session(self, threads: int) -> Any:
        """The session that runs on `threads` threads, made on first use."""
        threads = max(1, threads)
        with self._lock:
            sess = self._sessions.get(threads)
            if sess is None:
                opts = self._ort.SessionOptions()
                opts.intra_op_num_threads = threads
                opts.inter_op_num_threads = 1
                sess = self._ort.InferenceSession(
                    str(self.path), opts, providers=["CPUExecutionProvider"]
                )
                self._sessions[threads] = sess
        return sess

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unnormalised features (B, D) of preprocessed pixels, as `model.encode_image`; on the
        torch thread count in force."""
        x = np.ascontiguousarray(pixels.detach().to("cpu", torch.float32).numpy())
        out = self.session(torch.get_num_threads()).run(None, {"pixels": x})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32))


def _unit(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    return out


def check_tower(bundle: ClipBundle, tower: OnnxImageTower) -> float:
    """Largest |difference| between the two engines' unit vectors on a check batch."""
    h, w = _side(bundle)
    x = torch.rand(CHECK_BATCH, 3, h, w, generator=torch.Generator().manual_seed(1)) * 4 - 2
    with torch.inference_mode():
        ref = bundle.model.encode_image(x).float().numpy()  # type: ignore[operator]
    got = tower(x).numpy()
    if got.shape != ref.shape:
        return float("inf")
    return float(np.abs(_unit(ref) - _unit(got)).max())


def load_tower(
    bundle: ClipBundle, cache_dir: Path, digest: str | None = None
) -> tuple[OnnxImageTower | None, str]:
    """The bundle's image tower on ONNX Runtime, exported into `cache_dir` if not there yet,
    or None; and why (a line for the log). `digest`: `visual_state_sha256` if known."""
    if bundle.device.type != "cpu":
        return None, f"the model runs on {bundle.device}, ONNX Runtime here only on the CPU"
    dtype = next(bundle.model.parameters()).dtype
    if dtype != torch.float32:
        return None, f"the image tower is {dtype}; the engine runs float32 towers only"
    try:
        import onnxruntime as ort
    except ImportError:
        return None, "onnxruntime is not installed (pip install 'polar-search[onnx]')"
    name = bundle.fingerprint.name.replace("/", "_")
    digest = digest or visual_state_sha256(bundle.model)
    path = cache_dir / f"{name}-{digest[:24]}.onnx"
    exported = False
    if not path.is_file():
        try:
            export_tower(bundle, path)
        except Exception as e:  # any exporter failure: PyTorch serves
            return None, f"the export failed ({type(e).__name__}: {str(e)[:200]})"
        exported = True
    try:
        tower = OnnxImageTower(ort, path)
        diff = check_tower(bundle, tower)
    except Exception as e:  # a cached file ONNX Runtime cannot run
        return None, f"{path} cannot be run ({type(e).__name__}: {str(e)[:200]})"
    if not diff <= TOLERANCE:
        return None, f"its vectors differ from PyTorch's by {diff:.1e} (> {TOLERANCE:.0e})"
    how = "exported to" if exported else "reused from"
    return tower, f"{how} {path} (vectors within {diff:.1e} of PyTorch's)"


_hashes: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()
# (model name, image-tower hash) -> the tower, or None where PyTorch serves
_towers: dict[tuple[str, str], OnnxImageTower | None] = {}
_towers_lock = threading.Lock()


def image_engine(bundle: ClipBundle, cache_dir: Path, enabled: bool = True) -> ImageEngine | None:
    """The ONNX Runtime image tower of this bundle (None: use PyTorch's), loaded once per set of
    image-tower weights in this process (the tower's hash is taken once per model object); the
    first call exports into `cache_dir` (or reuses the file there) and checks it."""
    if not enabled:
        return None
    with _towers_lock:
        digest = _hashes.get(bundle.model)
        if digest is None:
            digest = _hashes[bundle.model] = visual_state_sha256(bundle.model)
        key = (bundle.fingerprint.name, digest)
        if key not in _towers:
            tower, why = load_tower(bundle, Path(cache_dir), digest)
            log.info("image tower on %s: %s", "PyTorch" if tower is None else "ONNX Runtime", why)
            _towers[key] = tower
        return _towers[key]


def forget_engines() -> None:
    """Drop every loaded engine, as a new process would start (tests)."""
    with _towers_lock:
        _towers.clear()
        _hashes.clear()
