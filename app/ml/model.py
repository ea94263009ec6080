"""Loading the CLIP model: one read-only instance per process, with a fingerprint."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import QuickGELU
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


GELU = "gelu"
QUICK_GELU = "quick_gelu"
_QUICKGELU_SUFFIX = "-quickgelu"


@dataclass(frozen=True)
class ModelFingerprint:
    """Identity of the text tower an adapter was trained on."""

    name: str  # open_clip model name, e.g. "ViT-B-32" or "polar-demo"
    pretrained: str  # tag ("openai": also a local file declared as those weights) or file name
    text_sha256: str  # hash of the text tower's weights and activation (text_state_sha256)
    activation: str = GELU  # the MLP activation the model is built with: gelu or quick_gelu

    def as_dict(self) -> dict[str, str]:
        """Plain dict for JSON or safetensors metadata."""
        return {
            "name": self.name,
            "pretrained": self.pretrained,
            "text_sha256": self.text_sha256,
            "activation": self.activation,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelFingerprint:
        """Inverse of as_dict (adapters saved before the activation was recorded: GELU)."""
        return cls(
            name=str(d["name"]),
            pretrained=str(d["pretrained"]),
            text_sha256=str(d["text_sha256"]),
            activation=str(d.get("activation", GELU)),
        )

    @property
    def model_id(self) -> str:
        """Short stable id stored next to embeddings. A model built with QuickGELU on an
        architecture whose open_clip config has GELU reads as open_clip's `-quickgelu` twin
        ("ViT-B-32-quickgelu/openai@..."): the id says which activation made its vectors."""
        name = self.name
        if self.activation == QUICK_GELU and not name.endswith(_QUICKGELU_SUFFIX):
            name += _QUICKGELU_SUFFIX
        return f"{name}/{self.pretrained}@{self.text_sha256[:12]}"


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
    # The open_clip pretrained tag the weights are (a tag, or declared for a local file);
    # None = weights of unknown origin, which no Immich model name is answered with.
    weights_tag: str | None = None


def activation_of(model: nn.Module) -> str:
    """The MLP activation the model was built with, read from its modules: `quick_gelu`,
    `gelu`, or `mixed`/`none` (a model open_clip did not build alike in both towers)."""
    kinds = {
        QUICK_GELU if isinstance(m, QuickGELU) else GELU
        for m in model.modules()
        if isinstance(m, QuickGELU | nn.GELU)
    }
    if len(kinds) == 1:
        return kinds.pop()
    return "mixed" if kinds else "none"


def text_state_sha256(model: nn.Module) -> str:
    """sha256 over the text tower's tensors (names, dtypes, shapes, bytes), in name order, and
    its activation where it is QuickGELU: the same weights under another activation give other
    vectors, so adapters trained under GELU do not match (GELU hashes are the weights alone)."""
    digest = hashlib.sha256()
    if activation_of(model) == QUICK_GELU:
        digest.update(b"activation|quick_gelu|")
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


def declared_tag(pretrained: str, checkpoint_tag: str = "") -> str | None:
    """The open_clip pretrained tag the weights are: `pretrained` itself when it is a tag; for
    a local checkpoint file what it is declared to be (POLAR_MODEL__CHECKPOINT_TAG, or
    `"pretrained"` in polar.json beside it); None = undeclared weights."""
    if not _looks_like_path(pretrained):
        return pretrained or None
    in_file = _polar_json(pretrained).get("pretrained")
    if in_file is not None and not (isinstance(in_file, str) and in_file.strip()):
        raise ModelUnavailableError(
            f'"pretrained" in the polar.json beside {pretrained} must be an open_clip tag '
            '(e.g. "openai"), not ' + json.dumps(in_file)
        )
    setting = checkpoint_tag.strip()
    if setting and in_file and in_file.strip() != setting:
        raise ModelUnavailableError(
            f"POLAR_MODEL__CHECKPOINT_TAG={setting!r} but the polar.json beside {pretrained} "
            f"declares {in_file.strip()!r}; keep one of them"
        )
    return setting or (in_file.strip() if in_file else None)


def expected_activation(name: str, pretrained: str, tag: str | None) -> str:
    """The activation the weights were trained with: open_clip's pretrained config of the tag
    (`quick_gelu`), else `"quick_gelu"` (true/false) in polar.json beside a local file, else
    the architecture's own config."""
    if tag is not None:
        cfg = open_clip.get_pretrained_cfg(name, tag)
        if not cfg:
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
            what = (
                f"POLAR_MODEL__PRETRAINED={pretrained!r}"
                if not _looks_like_path(pretrained)
                else f"the checkpoint {pretrained} is declared as {tag!r}, which"
            )
            raise ModelUnavailableError(
                f"{what} is not a tag of {name} (known: {tags}) nor a checkpoint file."
            )
        return QUICK_GELU if cfg.get("quick_gelu") else GELU
    declared = _polar_json(pretrained).get("quick_gelu")
    if isinstance(declared, bool):
        return QUICK_GELU if declared else GELU
    model_cfg = open_clip.get_model_config(name) or {}
    return QUICK_GELU if model_cfg.get("quick_gelu") else GELU


def _create(
    name: str,
    pretrained: str,
    device: torch.device,
    cache_dir: str | None,
    tag: str | None,
) -> tuple[nn.Module, Callable[..., torch.Tensor]]:
    """open_clip model and eval transform, built with the activation its weights were trained
    with, with configuration errors made actionable."""
    if name not in open_clip.list_models():
        raise ModelUnavailableError(
            f"unknown model POLAR_MODEL__NAME={name!r}; set it to an open_clip model name "
            f"such as ViT-B-32 or {DEMO_MODEL_NAME}."
        )
    is_file = _looks_like_path(pretrained)
    if is_file and not Path(pretrained).is_file():
        raise ModelUnavailableError(
            f"checkpoint POLAR_MODEL__PRETRAINED={pretrained} does not exist; "
            f"set POLAR_MODEL__PRETRAINED to an existing file or an open_clip tag "
            f"({', '.join(open_clip.list_pretrained_tags_by_model(name)) or 'none known'})."
        )
    expected = expected_activation(name, pretrained, tag)
    options: dict[str, Any] = {"force_quick_gelu": expected == QUICK_GELU}
    if is_file and tag is not None:
        # A declared file gets its tag's preprocessing too (open_clip merges it only for tags).
        cfg = open_clip.get_pretrained_cfg(name, tag)
        options.update(
            {
                f"image_{key}": cfg[key]
                for key in ("mean", "std", "interpolation", "resize_mode")
                if key in cfg
            }
        )
    if pretrained and not is_file:
        ensure_hub_or_offline()
    try:
        # open_clip >= 2.24 loads .safetensors itself when `pretrained` is a file path.
        with _open_clip_errors_raised_not_logged():
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained or None, device=device, cache_dir=cache_dir, **options
            )
    except (RuntimeError, pickle.UnpicklingError) as e:  # an unreadable file too
        raise ModelUnavailableError(
            f"could not obtain weights for {name}/{pretrained} ({e}); {_offline_hint(name)}."
        ) from e
    built = activation_of(model)
    if built in (GELU, QUICK_GELU, "mixed") and built != expected:
        # open_clip only warns about this; every vector would be slightly wrong.
        raise ModelUnavailableError(
            f"{name} is built with {built} but its weights ({tag or pretrained}) were trained "
            f"with {expected}; use the open_clip model name whose activation matches them "
            f"(e.g. without or with the '{_QUICKGELU_SUFFIX}' suffix)."
        )
    return model, preprocess


_OPEN_CLIP_DIR = os.path.dirname(open_clip.__file__)


def _from_open_clip(record: logging.LogRecord) -> bool:
    """Drop open_clip's ERROR records: it logs (on the root logger) and then raises the same
    message, which the caller turns into one ModelUnavailableError and reports once."""
    return not (record.levelno >= logging.ERROR and record.pathname.startswith(_OPEN_CLIP_DIR))


@contextmanager
def _open_clip_errors_raised_not_logged() -> Iterator[None]:
    root = logging.getLogger()
    root.addFilter(_from_open_clip)
    try:
        yield
    finally:
        root.removeFilter(_from_open_clip)


def hub_unreachable() -> bool:
    """Whether the model hub was probed (ensure_hub_or_offline) and could not be reached."""
    return _hub_reachable is False


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
            # Info, not a warning: cached weights still load; when they are not there the
            # demo-model fallback's one warning says so (app/services/model.py).
            log.info(
                "the model hub (%s:%d) cannot be reached; using only locally cached weights "
                "(HF_HUB_OFFLINE=1 for this process)",
                *address,
            )
            os.environ["HF_HUB_OFFLINE"] = "1"
            constants.HF_HUB_OFFLINE = True
        return _hub_reachable


def load_clip(
    name: str,
    pretrained: str,
    device: str = "auto",
    cache_dir: str | None = None,
    checkpoint_tag: str = "",
) -> ClipBundle:
    """Build the model in eval mode with frozen weights; raises ModelUnavailableError.

    `checkpoint_tag`: for a local checkpoint file, the open_clip tag of the weights it holds
    (else polar.json's "pretrained" beside it): the model is then built with that tag's
    activation and preprocessing, and is identified as those weights (Immich's names too)."""
    if not pretrained:
        raise ModelUnavailableError(
            "POLAR_MODEL__PRETRAINED is empty; set it to an open_clip tag or a checkpoint file."
        )
    dev = resolve_device(device)
    tag = declared_tag(pretrained, checkpoint_tag)
    model, preprocess = _create(name, pretrained, dev, cache_dir, tag)
    label = tag or Path(pretrained).name
    bundle = bundle_from_model(
        model,
        preprocess,
        name=name,
        pretrained=label,
        default_lam=_default_lam(pretrained),
        recipe=training_recipe(pretrained),
        weights_tag=tag,
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
    weights_tag: str | None = None,
) -> ClipBundle:
    """Wrap an already built open_clip model (tests and benchmarks use random weights)."""
    model.eval().requires_grad_(False)
    tower = text_tower(model)
    activation = activation_of(model)
    return ClipBundle(
        model=model,
        tokenizer=_tokenizer(name, tower.context_length),
        preprocess=preprocess,
        device=tower.last.attn.in_proj_weight.device,
        fingerprint=ModelFingerprint(
            name,
            pretrained,
            text_state_sha256(model),
            QUICK_GELU if activation == QUICK_GELU else GELU,
        ),
        embed_dim=tower.embed_dim,
        text_width=tower.width,
        context_length=tower.context_length,
        default_lam=default_lam,
        recipe=recipe,
        weights_tag=weights_tag,
    )


_cache: dict[tuple[str, str, str, str | None, str], ClipBundle] = {}
_lock = threading.Lock()


def forget_clips(keep: Callable[[ClipBundle], bool]) -> int:
    """Drop the process-wide bundles `keep` rejects; how many. A service loads one model and
    keeps it; a process that loads many in turn (the test suite, a benchmark sweep) lets go of
    those it is done with, or each stays in memory (a ViT-B-32 is about 600 MB)."""
    with _lock:
        gone = [key for key, bundle in _cache.items() if not keep(bundle)]
        for key in gone:
            del _cache[key]
    return len(gone)


def get_clip(
    name: str,
    pretrained: str,
    device: str = "auto",
    cache_dir: str | None = None,
    checkpoint_tag: str = "",
) -> ClipBundle:
    """The process-wide bundle for this configuration, loaded on first use under a lock."""
    key = (name, pretrained, str(resolve_device(device)), cache_dir, checkpoint_tag)
    bundle = _cache.get(key)
    if bundle is None:
        with _lock:
            bundle = _cache.get(key)
            if bundle is None:
                bundle = _cache[key] = load_clip(
                    name, pretrained, device, cache_dir, checkpoint_tag
                )
    return bundle
