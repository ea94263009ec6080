"""POLAR training: fit one concept's rank-1 V update to its photos' embeddings (docs/POLAR.md)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from app.ml.adapter import ConceptAdapter
from app.ml.fast import FastObjective
from app.ml.model import ClipBundle
from app.ml.text import text_tower
from app.ml.tokens import pick_token

TEMPLATES: tuple[str, ...] = (
    "This is a photo of *",
    "This photo contains *",
    "A *",
    "A photo of *",
    "An image of *",
    "This is *",
    "An image showing *",
    "* is shown in this image",
    "* can be seen in this picture",
    "A * is visible in this photo",
    "This photo shows *",
    "We can see * in this scene",
    "A scene containing *",
)

Progress = Callable[[int, int, float], None]  # (step, steps, loss)
Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (a, b) -> scalar loss


def placeholder_phrase(token: str, category: str | None) -> str:
    """How a query names the concept: "sks hat", or "sks" without a category."""
    return f"{token} {category}" if category else token


def training_texts(token: str, category: str | None, n: int, seed: int) -> list[str]:
    """One template per image, drawn without replacement (seeded), cycling past 13."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(TEMPLATES), generator=gen).tolist()
    phrase = placeholder_phrase(token, category)
    return [TEMPLATES[order[i % len(order)]].replace("*", phrase) for i in range(n)]


def pick_concept_token(bundle: ClipBundle, taken: set[str], mode: str) -> str:
    """ "shared" -> "sks"; "distinct" -> an unused rare single-BPE vocabulary token."""
    vocab = text_tower(bundle.model).token_embedding.num_embeddings
    return pick_token(bundle.tokenizer, vocab, taken, mode)


def init_factors(
    d: int, seed: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b): a LoRA-style Kaiming-uniform (a=√5) row, b zero so training starts at CLIP."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.empty(1, d, dtype=torch.float64)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
    a = a.reshape(d).to(device=device, dtype=dtype)
    b = torch.zeros(d, dtype=dtype, device=device)
    return a, b


def _targets(
    bundle: ClipBundle, image_embeddings: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Validated, L2-normalised image embeddings on the model's device, (N, D)."""
    y = torch.as_tensor(image_embeddings).to(device=bundle.device, dtype=dtype)
    if y.ndim != 2 or y.shape[0] == 0 or y.shape[1] != bundle.embed_dim:
        raise ValueError(
            f"image_embeddings must be (N>0, {bundle.embed_dim}), got {tuple(y.shape)}"
        )
    if not torch.isfinite(y).all():
        raise ValueError("image_embeddings contain NaN or infinity")
    return F.normalize(y, dim=-1)


def away_from(target: torch.Tensor, negatives: torch.Tensor | None, weight: float) -> torch.Tensor:
    """The regression target with the negative term folded in, (N, D).

    The negative term rewards distance from the rejected photos r_k (unit rows) with the
    positive term's own form and scale, per element:

        L = mean_{i,e}(n(f_i) - y_i)²  -  ν · mean_{i,k,e}(n(f_i) - r_k)²  (+ λ·mean(B²) ...)

    n(f_i) and r_k are unit vectors, so (n(f_i) - r_k)² sums to 2 - 2·n(f_i)·r_k and the
    second mean is linear in n(f_i): the whole equals mean((n(f_i) - (y_i - ν·r̄))²) plus a
    constant, r̄ the mean of the r_k. Training on the shifted target y_i - ν·r̄ is therefore
    exactly that objective, at no cost per step, with the same trainer; no negatives (or ν = 0)
    leaves the target, and so the whole run, bit for bit as before.
    """
    if negatives is None or weight == 0.0 or negatives.shape[0] == 0:
        return target
    if weight < 0:
        raise ValueError("the negative weight must be >= 0")
    r = torch.as_tensor(negatives).to(device=target.device, dtype=target.dtype)
    if r.ndim != 2 or r.shape[1] != target.shape[1]:
        raise ValueError(f"negatives must be (K, {target.shape[1]}), got {tuple(r.shape)}")
    if not torch.isfinite(r).all():
        raise ValueError("negatives contain NaN or infinity")
    return target - weight * F.normalize(r, dim=-1).mean(dim=0, keepdim=True)


def _loss(
    features: torch.Tensor, target: torch.Tensor, b: torch.Tensor, lam: float
) -> torch.Tensor:
    """Per-element MSE of normalised text features to image embeddings + λ·mean(B²)."""
    return (F.normalize(features, dim=-1) - target).pow(2).mean() + lam * b.pow(2).mean()


class _RankOneV(nn.Module):
    """Parametrization W -> W + [0; 0; B·Â] of a copied in_proj_weight (reference only)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        d = w.shape[1]
        update = torch.outer(self.b, self.a / self.a.norm())  # (d, d)
        return torch.cat([w[: 2 * d], w[2 * d :] + update])


class ReferenceObjective:
    """The same loss through open_clip's own full forward (full context, every block)."""

    def __init__(self, bundle: ClipBundle, tokens: torch.Tensor, target: torch.Tensor, lam: float):
        model = bundle.model
        # Copy the text side only; the shared model is never touched.
        memo = {id(m): m for m in (getattr(model, "visual", None),) if m is not None}
        self.model: Any = copy.deepcopy(model, memo)
        d = text_tower(self.model).width
        self.update = _RankOneV(torch.ones(d), torch.zeros(d))  # replaced on every call
        parametrize.register_parametrization(
            text_tower(self.model).last.attn, "in_proj_weight", self.update, unsafe=True
        )
        self.tokens, self.target, self.lam = tokens, target, lam

    def features(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Unnormalised text features under V + B·Â via model.encode_text, (N, D)."""
        self.update.a, self.update.b = a, b
        features: torch.Tensor = self.model.encode_text(self.tokens)
        return features

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return _loss(self.features(a, b), self.target, b, self.lam)


GradsOut = tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]  # (loss or None, dL/da, dL/db)
Grads = Callable[[torch.Tensor, torch.Tensor, bool], GradsOut]  # (a, b, want_loss)


def autograd_grads(objective: Objective) -> Grads:
    """(loss, dL/da, dL/db) of any differentiable objective by autograd."""

    def grads(a: torch.Tensor, b: torch.Tensor, _want_loss: bool) -> GradsOut:
        a, b = a.detach().requires_grad_(True), b.detach().requires_grad_(True)
        loss = objective(a, b)
        ga, gb = torch.autograd.grad(loss, (a, b))
        return loss.detach(), ga, gb

    return grads


class Adam:
    """torch.optim.Adam's update (no weight decay, single-tensor path) without the optimizer
    machinery, whose per-step overhead rivals the fast path's whole step."""

    def __init__(
        self, params: list[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:  # fmt: skip
        self.params, self.lr, self.betas, self.eps, self.t = params, lr, betas, eps, 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor]) -> None:
        """One update of every parameter in place."""
        self.t += 1
        beta1, beta2 = self.betas
        step_size = self.lr / (1 - beta1**self.t)
        bias2_sqrt = math.sqrt(1 - beta2**self.t)
        for p, g, m, v in zip(self.params, grads, self.m, self.v, strict=True):
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            p.addcdiv_(m, (v.sqrt() / bias2_sqrt).add_(self.eps), value=-step_size)


def optimize(
    grads: Grads,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    steps: int,
    lr: float,
    progress: Progress | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-batch Adam from (a, b); returns the trained (a, b)."""
    ab = torch.stack([a.detach(), b.detach()])  # (2, d): Adam is elementwise, one tensor will do
    opt = Adam([ab], lr=lr)
    every = max(1, steps // 50)  # reading the loss syncs the device: not every step
    for step in range(1, steps + 1):
        report = progress is not None and (step % every == 0 or step == steps)
        loss, ga, gb = grads(ab[0], ab[1], report)
        opt.step([torch.stack([ga, gb])])
        if report and progress is not None and loss is not None:
            progress(step, steps, float(loss))
    return ab[0], ab[1]


def _train(
    bundle: ClipBundle,
    image_embeddings: torch.Tensor,
    token: str,
    category: str | None,
    *,
    lam: float,
    steps: int,
    lr: float,
    seed: int,
    progress: Progress | None,
    fast: bool,
    negatives: torch.Tensor | None = None,
    negative_weight: float = 0.0,
) -> ConceptAdapter:
    """Shared setup of the fast and the reference trainer."""
    if steps < 1 or lr <= 0 or lam < 0:
        raise ValueError("steps must be >= 1, lr > 0 and lam >= 0")
    tower = text_tower(bundle.model)
    target = away_from(_targets(bundle, image_embeddings, tower.dtype), negatives, negative_weight)
    texts = training_texts(token, category, target.shape[0], seed)
    tokens = bundle.tokenizer(texts).to(bundle.device)  # (N, C)
    objective: Objective
    if fast:
        objective = FastObjective.build(tower, tokens, target, lam)
        grads: Grads = objective.loss_and_grads  # gradients written by hand
    else:
        objective = ReferenceObjective(bundle, tokens, target, lam)
        grads = autograd_grads(objective)
    a, b = init_factors(tower.width, seed, tower.dtype, bundle.device)
    a, b = optimize(grads, a, b, steps=steps, lr=lr, progress=progress)
    with torch.no_grad():
        final = float(objective(a, b))
    return ConceptAdapter(
        b=b.detach().to("cpu", torch.float32).clone(),  # own storage, not a view of (2, d)
        a=a.detach().to("cpu", torch.float32).clone(),
        fingerprint=bundle.fingerprint,
        token=token,
        category=category,
        lam=lam,
        steps=steps,
        lr=lr,
        final_loss=final,
    )


def train_adapter(
    bundle: ClipBundle,
    image_embeddings: torch.Tensor,
    token: str,
    category: str | None,
    *,
    lam: float,
    steps: int = 500,
    lr: float = 1e-3,
    seed: int = 0,
    progress: Progress | None = None,
    negatives: torch.Tensor | None = None,
    negative_weight: float = 0.0,
) -> ConceptAdapter:
    """Train one concept with the exact fast path (frozen part computed once); `negatives`
    (K, D) are rejected photos' embeddings, pushed away with weight ν (`away_from`)."""
    return _train(
        bundle, image_embeddings, token, category, lam=lam, steps=steps, lr=lr, seed=seed,
        progress=progress, fast=True, negatives=negatives, negative_weight=negative_weight,
    )  # fmt: skip


def train_adapter_reference(
    bundle: ClipBundle,
    image_embeddings: torch.Tensor,
    token: str,
    category: str | None,
    *,
    lam: float,
    steps: int = 500,
    lr: float = 1e-3,
    seed: int = 0,
    progress: Progress | None = None,
    negatives: torch.Tensor | None = None,
    negative_weight: float = 0.0,
) -> ConceptAdapter:
    """The straightforward trainer (full forward every step): the baseline tests compare to."""
    return _train(
        bundle, image_embeddings, token, category, lam=lam, steps=steps, lr=lr, seed=seed,
        progress=progress, fast=False, negatives=negatives, negative_weight=negative_weight,
    )  # fmt: skip
