"""The serving model: the configured CLIP, or the bundled demo model when it cannot be had."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch

from app.config import ModelSettings
from app.errors import ModelUnavailable
from app.ml.model import (
    DEMO_MODEL_NAME,
    ClipBundle,
    ModelUnavailableError,
    demo_checkpoint_path,
    get_clip,
    hub_unreachable,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServingModel:
    """The loaded model and how it came to be the one serving."""

    bundle: ClipBundle
    requested: str  # "name/pretrained" as configured
    fallback_reason: str | None  # why the demo model serves instead; None = as configured

    @property
    def model_id(self) -> str:
        return self.bundle.fingerprint.model_id

    @property
    def is_demo(self) -> bool:
        return self.bundle.fingerprint.name == DEMO_MODEL_NAME


def fallback_line(cfg: ModelSettings) -> str:
    """Why the demo model serves, in one line anyone may read (no file-system paths: the
    configured weights may be a file; the public /readyz shows this)."""
    return (
        f"the weights configured for {cfg.name} could not be loaded, so the small demo model "
        "serves: it knows only the demo's generated pictures"
    )


def load_model(cfg: ModelSettings) -> ServingModel:
    """Load the configured model, or the demo model (loudly) when it cannot be had."""
    cache_dir = str(cfg.cache_dir) if cfg.cache_dir else None
    requested = f"{cfg.name}/{cfg.pretrained}"
    if cfg.threads:
        # On cores shared with other work, torch's multi-threaded kernels stall (training
        # 0.34 s -> 6.4 s measured); one thread held 0.56 s (bench/train_speed.py).
        torch.set_num_threads(cfg.threads)
    try:
        return ServingModel(
            get_clip(cfg.name, cfg.pretrained, cfg.device, cache_dir, cfg.checkpoint_tag),
            requested,
            None,
        )
    except ModelUnavailableError as e:
        if not cfg.fallback_to_demo or cfg.name == DEMO_MODEL_NAME:
            raise ModelUnavailable(str(e)) from e
        reason = fallback_line(cfg)
        # The whole story once, for whoever reads the logs closely; one warning line for all.
        log.info("why %s could not be loaded: %s", requested, e)
        offline = (
            " (the model hub cannot be reached and they are not cached)"
            if (hub_unreachable())
            else ""
        )
        log.warning(
            "serving the small demo model, not %s: its weights could not be loaded%s. Searches "
            "of real photos will be poor; set POLAR_MODEL__PRETRAINED to a local checkpoint "
            "(POLAR_MODEL__FALLBACK_TO_DEMO=false refuses to start instead)",
            requested,
            offline,
        )
        try:
            bundle = get_clip(DEMO_MODEL_NAME, str(demo_checkpoint_path()), cfg.device)
        except ModelUnavailableError as demo_error:
            raise ModelUnavailable(f"{e}; the demo model failed too: {demo_error}") from e
        return ServingModel(bundle, requested, reason)


@dataclass(frozen=True)
class LoaderState:
    serving: ServingModel | None
    detail: str
    ok: bool  # ready as far as the model goes (loaded, or deliberately loaded on first use)
    loading: bool = False  # the startup load is still running


class ModelLoader:
    """The one model of a process: loaded once (in the background at startup, or on first use),
    shared by searches and jobs. Built by the composition root (app/runtime/container.py)."""

    def __init__(self, cfg: ModelSettings) -> None:
        self.cfg = cfg
        self._lock = threading.Lock()  # held for the whole load: one load at a time
        self._thread: threading.Thread | None = None
        self._error: str | None = None
        self._serving: ServingModel | None = None

    def get(self) -> ServingModel:
        """The serving model, loading it first if needed (ModelUnavailable if it cannot be)."""
        serving = self._serving
        if serving is not None:
            return serving
        with self._lock:
            if self._serving is None:
                self._serving = load_model(self.cfg)
                self._error = None
            return self._serving

    def install(self, bundle: ClipBundle) -> ServingModel:
        """Serve `bundle` as the configured model (tests inject tiny models)."""
        with self._lock:
            self._serving = ServingModel(bundle, f"{self.cfg.name}/{self.cfg.pretrained}", None)
            return self._serving

    def start(self) -> None:
        """Start loading in the background (POLAR_MODEL__PRELOAD), so the API answers at once."""
        if not self.cfg.preload or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._load, name="polar-model-load", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        try:
            self.get()
        except ModelUnavailable as e:
            self._error = e.message
            log.error("model unavailable: %s", e.message)

    @property
    def loading(self) -> bool:
        """The startup load is still running (and nothing else has loaded the model)."""
        thread = self._thread
        return thread is not None and thread.is_alive() and self._serving is None

    def state(self) -> LoaderState:
        """What /readyz reports, at once; a model loaded on first use by a request counts too.

        Never takes the lock: the loader holds it for the whole load (tens of seconds), and a
        readiness probe must answer while it does.
        """
        serving = self._serving
        if serving is not None:
            return LoaderState(serving, f"{serving.model_id} loaded", True)
        if self._error is not None:
            return LoaderState(None, self._error, False)
        if self._thread is not None:
            return LoaderState(
                None, f"loading {self.cfg.name}/{self.cfg.pretrained}", False, loading=True
            )
        return LoaderState(None, "loads on first use (POLAR_MODEL__PRELOAD=false)", True)
