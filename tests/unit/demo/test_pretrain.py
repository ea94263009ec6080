"""Pretraining pieces: schedule, loss, tokenization, and a seconds-long end-to-end run."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from app.demo import pretrain
from app.demo.world import World


def test_lr_factor_warms_up_then_decays_to_zero() -> None:
    assert pretrain.lr_factor(0.0, 0.1) == 0.0
    assert pretrain.lr_factor(0.05, 0.1) == pytest.approx(0.5)
    assert pretrain.lr_factor(0.1, 0.1) == pytest.approx(1.0)
    values = [pretrain.lr_factor(p / 100, 0.1) for p in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(values))
    assert pretrain.lr_factor(1.0, 0.1) == pytest.approx(0.0, abs=1e-12)
    assert pretrain.lr_factor(2.0, 0.1) == pytest.approx(0.0, abs=1e-12)


def test_loss_is_the_clip_loss() -> None:
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(6, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(10.0)
    logits = scale * img @ txt.T
    loss_i2t = -torch.log_softmax(logits, dim=1).diag().mean()
    loss_t2i = -torch.log_softmax(logits, dim=0).diag().mean()
    loss = pretrain.contrastive_loss(img, txt, scale)
    assert torch.allclose(loss, (loss_i2t + loss_t2i) / 2)


def test_loss_is_low_for_aligned_pairs_and_high_for_shuffled() -> None:
    img = torch.eye(8)
    aligned = pretrain.contrastive_loss(img, img, torch.tensor(50.0))
    shuffled = pretrain.contrastive_loss(img, img.roll(1, dims=0), torch.tensor(50.0))
    assert aligned < 1e-6 and shuffled > 10


def test_fast_tokenizer_matches_open_clip() -> None:
    import open_clip

    open_clip.add_model_config(pretrain.quality.CONFIG_DIR)
    tokenizer = open_clip.get_tokenizer("polar-demo")
    captions = [c for i in range(100) for c in World(0).example(i).captions]
    assert torch.equal(pretrain.tokenize_captions(captions, tokenizer), tokenizer(captions))
    with pytest.raises(ValueError):
        pretrain.tokenize_captions(["ball " * 40], tokenizer)


def test_embeddings_are_not_decayed() -> None:
    model = pretrain.build_model(0, torch.device("cpu"))
    decay, keep = pretrain.param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and keep["weight_decay"] == 0.0
    assert any(p is model.token_embedding.weight for p in keep["params"])
    assert any(p is model.text_projection for p in decay["params"])
    assert len(decay["params"]) + len(keep["params"]) == len(list(model.parameters()))


@pytest.mark.slow
def test_short_run_writes_a_loadable_fp16_checkpoint(tmp_path: Path) -> None:
    cfg = pretrain.PretrainConfig(
        minutes=0.3,
        images=128,
        batch_size=32,
        data_workers=1,
        eval_images=32,
        reserve_seconds=6.0,
        out=tmp_path / "asset",
        device="cpu",
    )
    report = pretrain.run(cfg)
    stats = json.loads((tmp_path / "asset" / "training.json").read_text())
    assert stats["steps"] == report["steps"] > 0 and stats["images_seen"] > 0
    # (that training stops at the deadline is checked with a fake clock below, not wall time)
    assert (tmp_path / "asset" / "polar-demo.json").exists()

    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "asset" / pretrain.WEIGHTS_FILE))
    assert weights["token_embedding.weight"].dtype == torch.float16
    model, _, _ = pretrain.quality.load_demo_model(tmp_path / "asset" / pretrain.WEIGHTS_FILE)
    assert model.token_embedding.weight.dtype == torch.float32
    assert torch.equal(model.token_embedding.weight.half(), weights["token_embedding.weight"])


def test_training_stops_at_the_deadline_and_the_lr_follows_the_clock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fake clock that moves 1 s per reading: the loop checks it before every step."""
    import open_clip

    cfg = pretrain.PretrainConfig(images=64, batch_size=16, data_workers=1, out=tmp_path, seed=0)
    open_clip.add_model_config(cfg.model_config)
    data = pretrain.load_data(
        cfg, open_clip.get_tokenizer(pretrain.MODEL_NAME), torch.device("cpu")
    )
    model = pretrain.build_model(cfg.seed, torch.device("cpu"))
    ticks = itertools.count()
    lrs: list[float] = []
    original = torch.optim.AdamW.step

    def spy(self: torch.optim.Optimizer, *a: object, **k: object) -> object:
        lrs.append(self.param_groups[0]["lr"])
        return original(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    stats = pretrain.train(model, data, cfg, 20.0, log=lambda _: None, clock=lambda: next(ticks))
    # start reads 0; step i reads 2i+1 (loop test, < 20) and 2i+2 (its lr): 10 steps
    assert stats["steps"] == len(lrs) == 10
    assert lrs == [cfg.lr * pretrain.lr_factor((2 * i + 2) / 20, cfg.warmup) for i in range(10)]


def test_warm_start_loads_a_checkpoint_and_grows_the_context(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    source = pretrain.build_model(1, torch.device("cpu"))
    state = {k: v.detach().clone().half() for k, v in source.state_dict().items()}
    state["positional_embedding"] = state["positional_embedding"][:32].contiguous()  # v1
    path = tmp_path / "v1.safetensors"
    save_file(state, str(path))

    model = pretrain.build_model(2, torch.device("cpu"))
    assert pretrain.warm_start(model, path) == ["positional_embedding"]
    pos = model.positional_embedding.detach()
    assert torch.equal(pos[:32], state["positional_embedding"].float())
    assert torch.equal(pos[32:], pos[31:32].expand_as(pos[32:]))
    expected = source.token_embedding.weight.detach().half().float()
    assert torch.equal(model.token_embedding.weight.detach(), expected)

    state["text_projection"] = state["text_projection"][:, :64].contiguous()
    save_file(state, str(path))
    with pytest.raises(ValueError, match="text_projection"):
        pretrain.warm_start(model, path)
    with pytest.raises(FileNotFoundError):
        pretrain.warm_start(model, tmp_path / "missing.safetensors")


def test_trimmed_text_encoding_equals_the_full_context() -> None:
    import open_clip

    open_clip.add_model_config(pretrain.quality.CONFIG_DIR)
    tokenizer = open_clip.get_tokenizer("polar-demo")
    model = pretrain.build_model(0, torch.device("cpu")).eval()
    captions = [c for i in range(8) for c in World(0).example(i).captions]
    tokens = tokenizer(captions)
    assert int(tokens.argmax(-1).max()) + 1 < tokens.shape[1]  # there is padding to trim
    with torch.no_grad():
        full = model.encode_text(tokens)
        trimmed = pretrain.encode_text_trimmed(model, tokens)
    assert torch.allclose(full, trimmed, atol=1e-5)
    assert not torch.allclose(full[0], full[1], atol=1e-3)  # the captions do differ


@pytest.mark.parametrize(("share", "pairs_per_batch"), [(0.25, 4), (0.5, 8)])
def test_twin_pairs_fill_their_share_of_each_batch_with_full_captions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, share: float, pairs_per_batch: int
) -> None:
    import open_clip

    cfg = pretrain.PretrainConfig(
        images=48,
        twin_pairs=8,
        twin_share=share,
        batch_size=32,
        data_workers=1,
        out=tmp_path,
        seed=0,
    )
    open_clip.add_model_config(cfg.model_config)
    data = pretrain.load_data(
        cfg, open_clip.get_tokenizer(pretrain.MODEL_NAME), torch.device("cpu")
    )
    assert data.twin_start == 48 and len(data.images) == 48 + 16
    seen: list[torch.Tensor] = []
    model = pretrain.build_model(cfg.seed, torch.device("cpu"))
    original = pretrain.encode_text_trimmed

    def spy(m: object, text: torch.Tensor) -> torch.Tensor:
        seen.append(text)
        return original(m, text)

    monkeypatch.setattr(pretrain, "encode_text_trimmed", spy)
    ticks = itertools.count()
    pretrain.train(model, data, cfg, 6.0, log=lambda _: None, clock=lambda: next(ticks))
    full = {tuple(data.tokens[i].tolist()) for i in data.caption_ids[48:, 0].tolist()}
    for text in seen:
        assert len(text) == 32
        rows = [tuple(r) for r in text.tolist()]
        # the last rows are the twin pairs captioned in full; the rest random regular rows
        tail = rows[-2 * pairs_per_batch :]
        padded = [r + (0,) * (data.tokens.shape[1] - len(r)) for r in tail]
        assert all(r in full for r in padded)


@pytest.mark.parametrize(
    ("kind", "suffix"), [("pattern", ".twins-pattern.npz"), ("both", ".twins-both.npz")]
)
def test_twin_kind_picks_the_pairs_and_their_own_cache(
    tmp_path: Path, kind: str, suffix: str
) -> None:
    import numpy as np
    import open_clip

    cfg = pretrain.PretrainConfig(
        images=8, twin_pairs=4, twin_kind=kind, data_workers=1, out=tmp_path, seed=0,
        data_cache=tmp_path / "d.npz",
    )  # fmt: skip
    open_clip.add_model_config(cfg.model_config)
    tokenizer = open_clip.get_tokenizer(pretrain.MODEL_NAME)
    data = pretrain.load_data(cfg, tokenizer, torch.device("cpu"))
    world = World(0)
    assert data.twin_start == 8 and len(data.images) == 8 + 8
    for n in range(4):  # pair n: example 8 + n, then its twin of this kind
        want = world.twin(8 + n, "train", kind).image
        got = data.images[8 + 2 * n + 1].permute(1, 2, 0).numpy()
        assert np.array_equal(got, want)
    assert (tmp_path / f"d{suffix}").is_file()  # a shape-twin cache (d.twins.npz) is not reused
    assert not (tmp_path / "d.twins.npz").exists()
    again = pretrain.load_data(cfg, tokenizer, torch.device("cpu"))  # from the caches
    assert torch.equal(again.images, data.images)


def test_an_unknown_twin_kind_is_refused(tmp_path: Path) -> None:
    cfg = pretrain.PretrainConfig(twin_kind="colour", out=tmp_path)
    with pytest.raises(ValueError, match="--twin-kind must be one of"):
        pretrain.run(cfg)
    assert pretrain.parse_args(["--twin-kind", "pattern"]).twin_kind == "pattern"
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--twin-kind", "colour"])
