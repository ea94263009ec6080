"""The same exactness guarantees on a CUDA device (run where one is present)."""

from __future__ import annotations

import copy
import time

import numpy as np
import open_clip
import pytest
import torch

from app.ml.encode import encode_texts
from app.ml.model import ClipBundle, bundle_from_model
from app.ml.text import text_tower
from app.ml.train import train_adapter, train_adapter_reference

from .conftest import tiny_clip, tiny_custom

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
QUERIES = ["sks dog at the beach", "a photo of a cat", "sks"]


def _to_cuda(bundle: ClipBundle) -> ClipBundle:
    model = copy.deepcopy(bundle.model).cuda()
    return bundle_from_model(model, bundle.preprocess, name="tiny", pretrained="cuda")


@pytest.mark.parametrize("make", [tiny_clip, tiny_custom])
def test_cuda_trainers_agree_and_stack_equals_merge(make) -> None:
    bundle = _to_cuda(make(0, torch.float64))
    y = torch.nn.functional.normalize(torch.randn(5, bundle.embed_dim, dtype=torch.float64), dim=-1)
    fast = train_adapter(bundle, y, "sks", "dog", lam=0.1, steps=60)
    ref = train_adapter_reference(bundle, y, "sks", "dog", lam=0.1, steps=60)
    assert fast.a.device.type == "cpu" and fast.b.abs().max() > 1e-3
    assert (fast.a - ref.a).abs().max() < 1e-6 and (fast.b - ref.b).abs().max() < 1e-6
    merged = copy.deepcopy(bundle.model)
    w = text_tower(merged).last.attn.in_proj_weight
    d = w.shape[1]
    with torch.no_grad():
        w[2 * d :] += torch.outer(fast.b, fast.a / fast.a.norm()).to(w)
        expected = merged.encode_text(bundle.tokenizer(QUERIES).cuda())
    expected = torch.nn.functional.normalize(expected, dim=-1).float().cpu().numpy()
    np.testing.assert_allclose(encode_texts(bundle, QUERIES, [fast]), expected, atol=2e-7)


def test_cuda_vit_b_32_training_speed_and_parity() -> None:
    torch.manual_seed(0)
    model, _, pre = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    bundle = bundle_from_model(model.cuda(), pre, name="ViT-B-32", pretrained="random")
    y = torch.nn.functional.normalize(torch.randn(5, 512), dim=-1)
    train_adapter(bundle, y, "sks", "dog", lam=0.1, steps=20)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fast = train_adapter(bundle, y, "sks", "dog", lam=0.1)
    fast_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = train_adapter_reference(bundle, y, "sks", "dog", lam=0.1)
    naive_s = time.perf_counter() - t0
    diff = max(float((fast.a - ref.a).abs().max()), float((fast.b - ref.b).abs().max()))
    print(f"\nCUDA ViT-B-32: fast {fast_s:.3f}s naive {naive_s:.3f}s diff {diff:.2e}")
    assert diff <= 1e-4
