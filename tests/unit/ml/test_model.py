"""Model loading: configs, local safetensors checkpoints, fingerprints, actionable errors."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU
from safetensors.torch import save_file

from app.ml import model as model_mod
from app.ml.model import (
    DEMO_MODEL_NAME,
    PAPER_RECIPE,
    ModelFingerprint,
    ModelUnavailableError,
    TrainingRecipe,
    activation_of,
    demo_checkpoint_path,
    get_clip,
    load_clip,
    register_model_configs,
    text_state_sha256,
    training_recipe,
)

from .conftest import perturb_

TINY_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, dict]:
    """A registered tiny config and a .safetensors checkpoint of random weights for it."""
    root = tmp_path_factory.mktemp("ckpt")
    (root / "configs").mkdir()
    (root / "configs" / "polar-test-tiny.json").write_text(json.dumps(TINY_CONFIG))
    assert register_model_configs(root / "configs") == ["polar-test-tiny"]
    model = perturb_(open_clip.create_model("polar-test-tiny"), 3)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = root / "weights.safetensors"
    save_file(state, str(path))
    return "polar-test-tiny", path, state


def test_project_model_configs_are_registered() -> None:
    names = register_model_configs()
    assert set(names) <= set(open_clip.list_models())
    assert demo_checkpoint_path().parts[-3:] == ("assets", DEMO_MODEL_NAME, "weights.safetensors")


def test_load_local_safetensors_checkpoint(tiny_checkpoint) -> None:
    name, path, state = tiny_checkpoint
    bundle = load_clip(name, str(path), device="cpu")
    loaded = bundle.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert not bundle.model.training
    assert (bundle.embed_dim, bundle.text_width, bundle.context_length) == (16, 32, 32)
    assert bundle.fingerprint.name == name
    assert bundle.fingerprint.pretrained == "weights.safetensors"  # file name, not the path
    assert bundle.default_lam == 0.1  # no polar.json next to it
    assert bundle.recipe == PAPER_RECIPE  # nor a recipe: the paper's objective
    assert bundle.tokenizer(["a photo"]).shape == (1, 32)
    assert bundle.preprocess.__class__.__name__ == "Compose"


def test_default_lam_comes_from_polar_json(tiny_checkpoint, tmp_path: Path) -> None:
    name, path, _ = tiny_checkpoint
    copy = tmp_path / "model.safetensors"
    copy.write_bytes(path.read_bytes())
    (tmp_path / "polar.json").write_text(json.dumps({"default_lam": 0.03}))
    bundle = load_clip(name, str(copy), device="cpu")
    assert bundle.default_lam == 0.03
    assert bundle.fingerprint.text_sha256 == load_clip(name, str(path)).fingerprint.text_sha256


@pytest.mark.parametrize(
    ("doc", "want"),
    [
        ({"recipe": {"keep_weight": 3.0, "lr": 0.003}}, TrainingRecipe(3.0, 0.003, "polar.json")),
        ({"default_lam": 0.02}, PAPER_RECIPE),  # λ only: the paper's objective with it
        ({"recipe": {"keep_weight": -1, "lr": 0.003}}, PAPER_RECIPE),  # refused, with a warning
        ({"recipe": {"lr": 0.003}}, PAPER_RECIPE),
        ({"recipe": "fast"}, PAPER_RECIPE),
    ],
)
def test_the_training_recipe_comes_from_polar_json(
    tiny_checkpoint, tmp_path: Path, doc: dict[str, object], want: TrainingRecipe
) -> None:
    name, path, _ = tiny_checkpoint
    copy = tmp_path / "model.safetensors"
    copy.write_bytes(path.read_bytes())
    (tmp_path / "polar.json").write_text(json.dumps(doc))
    assert load_clip(name, str(copy), device="cpu").recipe == want


def test_the_demo_model_brings_its_keep_term_recipe() -> None:
    recipe = training_recipe(str(demo_checkpoint_path()))
    assert recipe.source == "polar.json" and recipe.keep_weight > 0 and recipe.lr == 3e-3


def test_text_hash_tracks_the_text_tower_only(tiny_checkpoint) -> None:
    name, path, _ = tiny_checkpoint
    model = load_clip(name, str(path), device="cpu").model
    before = text_state_sha256(model)
    with torch.no_grad():
        model.visual.conv1.weight.add_(1.0)
        assert text_state_sha256(model) == before
        model.transformer.resblocks[0].attn.in_proj_weight[0, 0] += 1e-3
        assert text_state_sha256(model) != before


def test_fingerprint_dict_round_trip_and_model_id() -> None:
    fp = ModelFingerprint("ViT-B-32", "openai", "0123456789abcdef" * 4)
    assert ModelFingerprint.from_dict(fp.as_dict()) == fp
    assert fp.model_id == "ViT-B-32/openai@0123456789ab"


def test_unknown_model_name_names_the_setting() -> None:
    with pytest.raises(ModelUnavailableError, match="POLAR_MODEL__NAME"):
        load_clip("no-such-model", "openai", device="cpu")


def test_missing_checkpoint_names_the_setting(tiny_checkpoint, tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailableError, match=r"POLAR_MODEL__PRETRAINED=.*does not exist"):
        load_clip(tiny_checkpoint[0], str(tmp_path / "missing.safetensors"), device="cpu")
    with pytest.raises(ModelUnavailableError, match="POLAR_MODEL__PRETRAINED"):
        load_clip("ViT-B-32", "", device="cpu")


def test_unknown_tag_names_the_setting() -> None:
    with pytest.raises(ModelUnavailableError, match="POLAR_MODEL__PRETRAINED='no-such-tag'"):
        load_clip("ViT-B-32", "no-such-tag", device="cpu")


def test_offline_download_failure_says_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*_args: object, **_kwargs: object) -> str:
        raise OSError("network unreachable")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)
    with pytest.raises(ModelUnavailableError) as err:
        load_clip("ViT-B-32", "openai", device="cpu")
    assert "POLAR_MODEL__PRETRAINED" in str(err.value) and "local checkpoint" in str(err.value)


def test_absent_cuda_names_the_device_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelUnavailableError, match="POLAR_MODEL__DEVICE"):
        load_clip("ViT-B-32", "openai", device="cuda")


def test_get_clip_loads_once_per_process_under_concurrency(
    tiny_checkpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, path, _ = tiny_checkpoint
    calls: list[str] = []
    real = model_mod.load_clip

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(model_mod, "load_clip", counting)
    monkeypatch.setattr(model_mod, "_cache", {})
    got: list[object] = []
    threads = [
        threading.Thread(target=lambda: got.append(get_clip(name, str(path), "cpu")))
        for _ in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(got) == 6 and all(b is got[0] for b in got)


# --- Activation and declared weights (issue: QuickGELU, model identity) -------------------


def _beside(tmp_path: Path, path: Path, polar: dict) -> Path:
    """A copy of the checkpoint with a polar.json beside it."""
    folder = tmp_path / "declared"
    folder.mkdir()
    copy = folder / "weights.safetensors"
    copy.write_bytes(path.read_bytes())
    (folder / "polar.json").write_text(json.dumps(polar))
    return copy


def test_a_file_declared_quickgelu_is_built_with_it_and_says_so(tiny_checkpoint, tmp_path) -> None:
    name, path, _ = tiny_checkpoint
    gelu = load_clip(name, str(path), device="cpu")
    quick = load_clip(name, str(_beside(tmp_path, path, {"quick_gelu": True})), device="cpu")
    assert activation_of(gelu.model) == "gelu" and gelu.fingerprint.activation == "gelu"
    assert activation_of(quick.model) == "quick_gelu" == quick.fingerprint.activation
    assert {type(b.mlp.gelu) for b in quick.model.transformer.resblocks} == {QuickGELU}
    # Same weights, other vectors: another id, and adapters trained under GELU do not apply.
    assert quick.fingerprint.model_id.startswith(f"{name}-quickgelu/")
    assert quick.fingerprint.text_sha256 != gelu.fingerprint.text_sha256
    tokens = gelu.tokenizer(["a photo of a dog"])
    assert not torch.allclose(gelu.model.encode_text(tokens), quick.model.encode_text(tokens))


def test_an_adapter_saved_before_activations_were_recorded_reads_as_gelu() -> None:
    old = {"name": "ViT-B-32", "pretrained": "openai", "text_sha256": "0" * 64}
    assert ModelFingerprint.from_dict(old).activation == "gelu"


def test_a_declared_tag_must_be_one_of_the_architecture(tiny_checkpoint, tmp_path) -> None:
    name, path, _ = tiny_checkpoint
    with pytest.raises(ModelUnavailableError, match=r"declared as 'openai'.*not a tag"):
        load_clip(name, str(path), device="cpu", checkpoint_tag="openai")
    declared = _beside(tmp_path, path, {"pretrained": "laion2b"})
    with pytest.raises(ModelUnavailableError, match="keep one of them"):
        load_clip(name, str(declared), device="cpu", checkpoint_tag="openai")
    (declared.parent / "polar.json").write_text(json.dumps({"pretrained": 3}))
    with pytest.raises(ModelUnavailableError, match="must be an open_clip tag"):
        load_clip(name, str(declared), device="cpu")
