"""The ViT twin of the demo model (app.demo.distill_vit): its text tower is the demo model's,
its image tower a ViT on an 8x8 patch grid that regions can be pooled from."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from app.demo import distill_vit
from app.demo.quality import load_demo_model
from app.ml.model import DEMO_MODEL_NAME, demo_checkpoint_path, load_clip
from app.ml.region_pool import supports_pooling, tower_family
from app.ml.regions import region_method


@pytest.mark.slow
def test_the_assembled_checkpoint_shares_the_demo_text_tower(tmp_path: Path) -> None:
    path = distill_vit.assembled_checkpoint(tmp_path)
    assert path.is_file() and (path.parent / "polar.json").is_file()
    assert distill_vit.assembled_checkpoint(tmp_path) == path  # made once, then reused
    vit = load_clip(distill_vit.MODEL_NAME, str(path), "cpu")
    demo = load_clip(DEMO_MODEL_NAME, str(demo_checkpoint_path()), "cpu")
    # the same text tower bit for bit: the demo model's concept adapters fit it as they are
    assert vit.fingerprint.text_sha256 == demo.fingerprint.text_sha256
    assert vit.default_lam == demo.default_lam and vit.recipe == demo.recipe
    assert tower_family(vit) == "vit" and tuple(vit.model.visual.grid_size) == (8, 8)
    assert supports_pooling(vit) and region_method(vit, "auto") == "late"
    assert region_method(demo, "auto") == "both"


def test_random_crops_are_seeded_and_keep_the_shape() -> None:
    x = torch.rand(4, 3, 64, 64)
    a = distill_vit.random_crops(x, torch.Generator().manual_seed(0))
    b = distill_vit.random_crops(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.allclose(a, x)


@pytest.mark.slow
def test_distilling_moves_only_the_image_tower_toward_the_teacher() -> None:
    torch.manual_seed(0)
    teacher = load_demo_model(demo_checkpoint_path())[0]
    student = distill_vit.build_student(0)
    assert distill_vit.share_text_tower(student, teacher) > 0
    text_before = {k: v.clone() for k, v in student.state_dict().items() if "visual" not in k}
    images = torch.randint(0, 256, (64, 3, 64, 64), dtype=torch.uint8)
    cfg = distill_vit.DistillConfig(batch_size=32, lr=3e-3, warmup=0.0)
    x = (images.float() - 127.5) / 64.0

    def gap() -> float:
        with torch.no_grad():
            t = torch.nn.functional.normalize(teacher.encode_image(x), dim=-1)
            s = torch.nn.functional.normalize(student.visual(x), dim=-1)
        return float((1 - (s * t).sum(-1)).mean())

    before = gap()
    stats = distill_vit.distill(student, teacher, images, cfg, time.perf_counter() + 4.0)
    assert stats["steps"] > 0 and gap() < before
    for k, v in student.state_dict().items():
        if "visual" not in k:
            assert torch.equal(v, text_before[k]), k
    assert np.isfinite(stats["final_one_minus_cos"])
