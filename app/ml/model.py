"""Loading the CLIP model: one read-only instance per process, with a fingerprint."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.tokenizer import SimpleTokenizer
from torch import nn

from app.ml.text import text_tower

log = logging.getLogger(__name__)

DEMO_MODEL_NAME = "polar-demo"
DEFAULT_LAM = 0.1  # the paper's λ for DeepFashion2; small models want their own (polar.json)


@dataclass(frozen=True)
class TrainingRecipe:
    """How concepts are trained on a model where the settings leave it open.

    A model's own recipe sits in `polar.json` beside its checkpoint (key "recipe"), chosen on
    validation data for that model, as the demo model's is. Any other model gets the paper's
    objective (no keep term, Adam lr 1e-3, λ = its default_lam): the only recipe with
    published numbers on real CLIP weights.
    """

    keep_weight: float  # weight of the keep term (app.ml.selective); 0 = the paper's objective
    lr: float  # Adam learning rate
    source: str  # where it came from: "polar.json" or "paper"


PAPER_RECIPE = TrainingRecipe(keep_weight=0.0, lr=1e-3, source="paper")
_HERE = Path(__file__).parent
MODEL_CONFIG_DIR = _HERE / "model_configs"
_CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".npz")


def register_model_configs(directory: Path = MODEL_CONFIG_DIR) -> list[str]:
    """Make open_clip config JSONs (e.g. polar-demo) known by file stem; returns the names."""
    paths = sorted(directory.glob("*.json")) if directory.is_dir() else []
    for path in paths:
        open_clip.add_model_config(path)
    return [p.stem for p in paths]


register_model_configs()


def demo_checkpoint_path() -> Path:
    """Where the bundled demo checkpoint lives (it may be absent)."""
    return _HERE / "assets" / DEMO_MODEL_NAME / "weights.safetensors"


class ModelUnavailableError(RuntimeError):
    """The configured model cannot be built; the message names the setting to change."""


class AdapterMismatchError(ValueError):
    """An adapter was trained on a different text tower than the one loaded."""


@dataclass(frozen=True)
class ModelFingerprint:
    """Identity of the text tower an adapter was trained on."""

    name: str  # open_clip model name, e.g. "ViT-B-32" or "polar-demo"
    pretrained: str  # tag ("openai") or checkpoint file name (not the full path)
    text_sha256: str  # hash of the text tower's weights

    def as_dict(self) -> dict[str, str]:
        """Plain dict for JSON or safetensors metadata."""
        return {"name": self.name, "pretrained": self.pretrained, "text_sha256": self.text_sha256}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelFingerprint:
        """Inverse of as_dict."""
        return cls(
            name=str(d["name"]), pretrained=str(d["pretrained"]), text_sha256=str(d["text_sha256"])
        )

    @property
    def model_id(self) -> str:
        """Short stable id stored next to embeddings."""
        return f"{self.name}/{self.pretrained}@{self.text_sha256[:12]}"


@dataclass
class ClipBundle:
    """The loaded model and what goes with it; read-only after load."""

    model: nn.Module  # open_clip model, eval mode, never mutated after load
    tokenizer: Callable[..., torch.Tensor]  # open_clip tokenizer
    preprocess: Callable[..., torch.Tensor]  # PIL image -> tensor (open_clip eval transform)
    device: torch.device
    fingerprint: ModelFingerprint
    embed_dim: int  # joint embedding size D
    text_width: int  # d of the text transformer
    context_length: int  # 77 for OpenAI CLIP, 32 for the demo model
    default_lam: float  # λ calibrated for this model (demo model ships its own)
    recipe: TrainingRecipe = PAPER_RECIPE  # training defaults for this model (polar.json)


def text_state_sha256(model: nn.Module) -> str:
    """sha256 over the text tower's tensors (names, dtypes, shapes, bytes), in name order."""
    digest = hashlib.sha256()
    state = model.state_dict()
    for key in sorted(state):
        if key.startswith("visual.") or key in ("logit_scale", "logit_bias"):
            continue
        t = state[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when present; asking for absent CUDA is a configuration error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelUnavailableError(
            f"POLAR_MODEL__DEVICE={device} but no CUDA device is available; "
            "set POLAR_MODEL__DEVICE=cpu (or auto)."
        )
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ModelUnavailableError(
            f"POLAR_MODEL__DEVICE={device!r} is not a device; use auto, cpu or cuda."
        ) from e


def _looks_like_path(pretrained: str) -> bool:
    return "/" in pretrained or "\\" in pretrained or pretrained.endswith(_CHECKPOINT_SUFFIXES)


def _polar_json(pretrained: str) -> dict[str, Any]:
    """polar.json next to a local checkpoint, {} where there is none."""
    if not _looks_like_path(pretrained):
        return {}
    cfg = Path(pretrained).parent / "polar.json"
    if not cfg.is_file():
        return {}
    try:
        doc = json.loads(cfg.read_text())
    except ValueError as e:
        log.warning("ignoring unreadable %s: %s", cfg, e)
        return {}
    return doc if isinstance(doc, dict) else {}


def _default_lam(pretrained: str) -> float:
    """λ from polar.json next to a local checkpoint, else the paper's default."""
    try:
        return float(_polar_json(pretrained).get("default_lam", DEFAULT_LAM))
    except (ValueError, TypeError) as e:
        log.warning("ignoring default_lam of %s's polar.json: %s", pretrained, e)
        return DEFAULT_LAM


def training_recipe(pretrained: str) -> TrainingRecipe:
    """The training recipe from polar.json next to a local checkpoint, else the paper's."""
    raw = _polar_json(pretrained).get("recipe")
    if raw is None:
        return PAPER_RECIPE
    try:
        keep, lr = float(raw["keep_weight"]), float(raw["lr"])
        if keep < 0 or lr <= 0:
            raise ValueError(f"keep_weight {keep} must be >= 0 and lr {lr} > 0")
        return TrainingRecipe(keep_weight=keep, lr=lr, source="polar.json")
    except (ValueError, KeyError, TypeError) as e:
        log.warning("ignoring the recipe in %s's polar.json: %s", pretrained, e)
        return PAPER_RECIPE


def _offline_hint(name: str) -> str:
    demo = demo_checkpoint_path()
    hint = (
        "set POLAR_MODEL__PRETRAINED to a local checkpoint file (.safetensors or .pt) for "
        f"POLAR_MODEL__NAME={name}, or point open_clip's cache at pre-downloaded weights"
    )
    if demo.is_file():
        hint += (
            f"; or use the bundled demo model: POLAR_MODEL__NAME={DEMO_MODEL_NAME} "
            f"POLAR_MODEL__PRETRAINED={demo}"
        )
    return hint


def _create(
    name: str, pretrained: str, device: torch.device, cache_dir: str | None
) -> tuple[nn.Module, Callable[..., torch.Tensor]]:
    """open_clip model and eval transform, with configuration errors made actionable."""
    if name not in open_clip.list_models():
        raise ModelUnavailableError(
            f"unknown model POLAR_MODEL__NAME={name!r}; set it to an open_clip model name "
            f"such as ViT-B-32 or {DEMO_MODEL_NAME}."
        )
    if _looks_like_path(pretrained) and not Path(pretrained).is_file():
        raise ModelUnavailableError(
            f"checkpoint POLAR_MODEL__PRETRAINED={pretrained} does not exist; "
            f"set POLAR_MODEL__PRETRAINED to an existing file or an open_clip tag "
            f"({', '.join(open_clip.list_pretrained_tags_by_model(name)) or 'none known'})."
        )
    if pretrained and not _looks_like_path(pretrained):
        ensure_hub_or_offline()
    try:
        # open_clip >= 2.24 loads .safetensors itself when `pretrained` is a file path.
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained or None, device=device, cache_dir=cache_dir
        )
    except RuntimeError as e:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained and not _looks_like_path(pretrained) and pretrained not in tags:
            raise ModelUnavailableError(
                f"POLAR_MODEL__PRETRAINED={pretrained!r} is not a tag of {name} "
                f"(known: {', '.join(tags) or 'none'}) nor a checkpoint file."
            ) from e
        raise ModelUnavailableError(
            f"could not obtain weights for {name}/{pretrained} ({e}); {_offline_hint(name)}."
        ) from e
    return model, preprocess


_hub_lock = threading.Lock()
_hub_reachable: bool | None = None


def _hub_address() -> tuple[str, int]:
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


def _can_connect(address: tuple[str, int], timeout: float) -> bool:
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection(address, timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    # Name resolution has no timeout of its own; the thread bounds the whole probe.
    thread = threading.Thread(target=probe, name="polar-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def ensure_hub_or_offline(timeout: float = 3.0) -> bool:
    """Whether the model hub can be reached, probed once per process; if it cannot, the
    Hugging Face client is switched to offline mode (HF_HUB_OFFLINE) for the whole process.

    Without this every weight file is retried five times with back-off: an offline start
    took 50-58 s and printed 34 warning lines before the demo-model fallback; offline mode
    answers from the local cache at once (weights cached earlier still load).
    """
    global _hub_reachable
    with _hub_lock:
        if _hub_reachable is not None:
            return _hub_reachable
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            _hub_reachable = False
            return False
        address = _hub_address()
        _hub_reachable = _can_connect(address, timeout)
        if not _hub_reachable:
            log.warning(
                "the model hub (%s:%d) cannot be reached; using only locally cached weights "
                "(HF_HUB_OFFLINE=1 for this process)",
                *address,
            )
            os.environ["HF_HUB_OFFLINE"] = "1"
            constants.HF_HUB_OFFLINE = True
        return _hub_reachable


def load_clip(
    name: str, pretrained: str, device: str = "auto", cache_dir: str | None = None
) -> ClipBundle:
    """Build the model in eval mode with frozen weights; raises ModelUnavailableError."""
    if not pretrained:
        raise ModelUnavailableError(
            "POLAR_MODEL__PRETRAINED is empty; set it to an open_clip tag or a checkpoint file."
        )
    dev = resolve_device(device)
    model, preprocess = _create(name, pretrained, dev, cache_dir)
    label = Path(pretrained).name if _looks_like_path(pretrained) else pretrained
    bundle = bundle_from_model(
        model,
        preprocess,
        name=name,
        pretrained=label,
        default_lam=_default_lam(pretrained),
        recipe=training_recipe(pretrained),
    )
    log.info("loaded %s on %s", bundle.fingerprint.model_id, dev)
    return bundle


def _tokenizer(name: str, context_length: int) -> Callable[..., torch.Tensor]:
    """The model's tokenizer; OpenAI's BPE for architectures open_clip does not know by name."""
    tokenizer: Callable[..., torch.Tensor]  # open_clip's tokenizers are not annotated
    if name in open_clip.list_models():
        tokenizer = open_clip.get_tokenizer(name, context_length=context_length)
    else:
        tokenizer = SimpleTokenizer(context_length=context_length)
    return tokenizer


def bundle_from_model(
    model: nn.Module,
    preprocess: Callable[..., torch.Tensor],
    *,
    name: str,
    pretrained: str,
    default_lam: float = DEFAULT_LAM,
    recipe: TrainingRecipe = PAPER_RECIPE,
) -> ClipBundle:
    """Wrap an already built open_clip model (tests and benchmarks use random weights)."""
    model.eval().requires_grad_(False)
    tower = text_tower(model)
    return ClipBundle(
        model=model,
        tokenizer=_tokenizer(name, tower.context_length),
        preprocess=preprocess,
        device=tower.last.attn.in_proj_weight.device,
        fingerprint=ModelFingerprint(name, pretrained, text_state_sha256(model)),
        embed_dim=tower.embed_dim,
        text_width=tower.width,
        context_length=tower.context_length,
        default_lam=default_lam,
        recipe=recipe,
    )


_cache: dict[tuple[str, str, str, str | None], ClipBundle] = {}
_lock = threading.Lock()


def get_clip(
    name: str, pretrained: str, device: str = "auto", cache_dir: str | None = None
) -> ClipBundle:
    """The process-wide bundle for this configuration, loaded on first use under a lock."""
    key = (name, pretrained, str(resolve_device(device)), cache_dir)
    bundle = _cache.get(key)
    if bundle is None:
        with _lock:
            bundle = _cache.get(key)
            if bundle is None:
                bundle = _cache[key] = load_clip(name, pretrained, device, cache_dir)
    return bundle
