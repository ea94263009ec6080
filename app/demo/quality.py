"""Demo model quality on held-out synthetic data: caption→image recall, zero-shot accuracy.

    python -m app.demo.quality --checkpoint app/ml/assets/polar-demo/weights.safetensors \
        --out app/ml/assets/polar-demo/quality.json

The pool is `World(seed).example(i, "eval")`, a stream the pretraining data (split "train")
never draws from. Queries are the pool's full captions ("a photo of a small red and blue
striped ball on the left on the beach"); the ground truth of each is its own image.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from app.demo.world import (
    CATEGORIES,
    COLORS,
    PATTERNS,
    SCENES,
    VARIANT_NAMES,
    Example,
    World,
    article,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_NAME = "polar-demo"
CONFIG_DIR = REPO_ROOT / "app" / "ml" / "model_configs"
DEFAULT_CHECKPOINT = REPO_ROOT / "app" / "ml" / "assets" / MODEL_NAME / "weights.safetensors"
TARGETS = {"caption_r@10": 0.85, "scene_accuracy": 0.95, "category_accuracy": 0.90}


# ---------------------------------------------------------------- metrics (numpy, no model)


def gt_ranks(scores: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """1-based rank of each query's ground truth; ties count against it (pessimistic)."""
    assert scores.ndim == 2 and gt.shape == (scores.shape[0],)
    gt_scores = scores[np.arange(len(gt)), gt][:, None]  # (Q, 1)
    ranks: np.ndarray = (scores >= gt_scores).sum(axis=1)  # (Q,)
    return ranks


def recall_at_k(scores: np.ndarray, gt: np.ndarray, k: int) -> float:
    """Fraction of queries whose ground truth ranks in the top k."""
    return float((gt_ranks(scores, gt) <= k).mean())


def mean_reciprocal_rank(scores: np.ndarray, gt: np.ndarray) -> float:
    """Mean of 1 / rank of the ground truth."""
    return float((1.0 / gt_ranks(scores, gt)).mean())


def accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of a (N, C) score matrix against (N,) labels; ties count as wrong."""
    return recall_at_k(scores, labels, 1)


def top1_in(scores: np.ndarray, allowed: Sequence[set[int]]) -> float:
    """Fraction of rows whose best-scoring columns all lie in that row's allowed set."""
    assert len(allowed) == len(scores)
    best = scores >= scores.max(axis=1, keepdims=True)  # (N, C), ties all count
    return float(np.mean([set(np.flatnonzero(b)) <= a for b, a in zip(best, allowed, strict=True)]))


# ---------------------------------------------------------------- model plumbing


def load_demo_model(
    checkpoint: Path, device: str = "cpu", config_dir: Path = CONFIG_DIR
) -> tuple[torch.nn.Module, Callable[..., Any], Callable[..., torch.Tensor]]:
    """(model, preprocess, tokenizer) through open_clip's own loading path, eval mode."""
    import open_clip

    open_clip.add_model_config(config_dir)
    model, _, preprocess = open_clip.create_model_and_transforms(
        MODEL_NAME, pretrained=str(checkpoint), device=device
    )
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(MODEL_NAME)


@torch.no_grad()
def encode_texts(
    model: Any, tokenizer: Callable[..., torch.Tensor], texts: Sequence[str], batch: int = 512
) -> np.ndarray:
    """(N, D) float32 L2-normalised text embeddings."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(texts), batch):
        emb = model.encode_text(tokenizer(list(texts[i : i + batch])).to(device))
        out.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu())
    return torch.cat(out).numpy()


@torch.no_grad()
def encode_images(
    model: Any,
    preprocess: Callable[..., torch.Tensor],
    images: Sequence[np.ndarray],
    batch: int = 256,
) -> np.ndarray:
    """(N, D) float32 L2-normalised image embeddings, via the PIL eval transform."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch):
        x = torch.stack([preprocess(Image.fromarray(a)) for a in images[i : i + batch]])
        emb = model.encode_image(x.to(device))
        out.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu())
    return torch.cat(out).numpy()


# ---------------------------------------------------------------- evaluation


def eval_pool(n_images: int = 1000, seed: int = 0) -> list[Example]:
    """The held-out pool: the first n examples of the world's eval split."""
    world = World(seed)
    return [world.example(i, "eval") for i in range(n_images)]


def evaluate(
    model: Any,
    preprocess: Callable[..., torch.Tensor],
    tokenizer: Callable[..., torch.Tensor],
    pool: Sequence[Example],
    world_seed: int = 0,
) -> dict[str, float]:
    """All quality metrics of one model on one pool (of the world with `world_seed`)."""
    img = encode_images(model, preprocess, [ex.image for ex in pool])  # (N, D)
    cap = encode_texts(model, tokenizer, [ex.captions[0] for ex in pool])  # (N, D)
    sim = cap @ img.T  # (N, N): caption i vs image j
    gt = np.arange(len(pool))
    metrics = {
        "caption_r@1": recall_at_k(sim, gt, 1),
        "caption_r@5": recall_at_k(sim, gt, 5),
        "caption_r@10": recall_at_k(sim, gt, 10),
        "caption_mrr": mean_reciprocal_rank(sim, gt),
    }
    scene_txt = encode_texts(model, tokenizer, [f"a photo of the {s}" for s in SCENES])
    scene_gt = np.array([SCENES.index(ex.scene) for ex in pool])
    metrics["scene_accuracy"] = accuracy(img @ scene_txt.T, scene_gt)

    # attribute accuracies on the single-object images, where the answer is unambiguous
    single = [i for i, ex in enumerate(pool) if len(ex.objects) == 1]
    objs = [pool[i].objects[0].instance for i in single]
    cat_txt = encode_texts(model, tokenizer, [f"a photo of a {c}" for c in CATEGORIES])
    cat_gt = np.array([CATEGORIES.index(o.category) for o in objs])
    metrics["category_accuracy"] = accuracy(img[single] @ cat_txt.T, cat_gt)
    cats = [o.category for o in objs]
    # stripes and checks show both colours equally, so either one is a right answer
    shown = [{o.color} if o.pattern == "plain" else {o.color, o.color2} for o in objs]
    metrics["color_accuracy"] = _attribute_accuracy(
        model, tokenizer, img[single], cats, shown, list(COLORS)
    )
    metrics["pattern_accuracy"] = _attribute_accuracy(
        model, tokenizer, img[single], cats, [{o.pattern} for o in objs], list(PATTERNS)
    )
    # world v2: the shape variant among its category's three ("a photo of a top hat")
    metrics["shape_accuracy"] = _shape_accuracy(model, tokenizer, img[single], objs)
    metrics |= twin_separation(model, preprocess, World(world_seed))
    metrics["pool_images"] = float(len(pool))
    metrics["single_object_images"] = float(len(single))
    return metrics


TWIN_INSTANCES = 60  # reserved instances of the look-alike check
_TWIN_BASE = 900_000  # their indices in the world's reserved-instance stream (unused elsewhere)


def twin_separation(
    model: Any, preprocess: Callable[..., torch.Tensor], world: World, n: int = TWIN_INSTANCES
) -> dict[str, float]:
    """How well the image tower alone tells an instance from each kind of look-alike.

    For each of `n` reserved instances: the mean embedding of 5 photos in random scenes against
    one image each of the instance and its three look-alikes (other colours, other pattern,
    other shape variant) in one shared random scene. The value per kind is the fraction of
    instances whose own image scores above that look-alike's image.
    """
    photos, tests = [], []
    kinds = ("colors", "pattern", "shape")
    for i in range(n):
        inst = world.instance(_TWIN_BASE + i)
        rng = np.random.default_rng([world.seed, 99, i])
        for _ in range(5):
            scene = SCENES[int(rng.integers(len(SCENES)))]
            photos.append(world.render_array(scene, world.layout([inst], rng), rng))
        looks = world.lookalikes(inst, rng)
        scene = SCENES[int(rng.integers(len(SCENES)))]
        for obj in (inst, *(looks[k] for k in kinds)):
            tests.append(world.render_array(scene, world.layout([obj], rng), rng))
    p = encode_images(model, preprocess, photos).reshape(n, 5, -1).mean(axis=1)  # (n, D)
    t = encode_images(model, preprocess, tests).reshape(n, 1 + len(kinds), -1)  # (n, 4, D)
    scores = np.einsum("nd,nkd->nk", p, t)  # (n, 4)
    return {
        f"{kind}_twin_separation": float((scores[:, 0] > scores[:, 1 + j]).mean())
        for j, kind in enumerate(kinds)
    }


def _shape_accuracy(
    model: Any, tokenizer: Callable[..., torch.Tensor], img: np.ndarray, objs: Sequence[Any]
) -> float:
    """Zero-shot choice among the category's shape variants ("a photo of a top hat")."""
    correct = 0.0
    for category in sorted({o.category for o in objs}):
        rows = [i for i, o in enumerate(objs) if o.category == category]
        names = VARIANT_NAMES[category]
        prompts = [f"a photo of {article(f'{n} {category}')}" for n in names]
        txt = encode_texts(model, tokenizer, prompts)  # (3, D)
        labels = np.array([objs[i].variant for i in rows])
        correct += accuracy(img[rows] @ txt.T, labels) * len(rows)
    return round(correct) / max(1, len(objs))


def _attribute_accuracy(
    model: Any,
    tokenizer: Callable[..., torch.Tensor],
    img: np.ndarray,
    categories: Sequence[str],
    truth: Sequence[set[str]],
    values: Sequence[str],
) -> float:
    """Zero-shot choice among attribute values ("a photo of a red ball"), category given."""
    correct = 0.0
    for category in sorted(set(categories)):
        rows = [i for i, c in enumerate(categories) if c == category]
        prompts = [f"a photo of {article(f'{v} {category}')}" for v in values]
        txt = encode_texts(model, tokenizer, prompts)  # (V, D)
        allowed = [{values.index(v) for v in truth[i]} for i in rows]
        correct += top1_in(img[rows] @ txt.T, allowed) * len(rows)
    return round(correct) / max(1, len(categories))


def format_table(metrics: dict[str, float]) -> str:
    """Metrics as an aligned text table with the targets next to them."""
    lines = [f"{'metric':<22}{'value':>8}{'target':>9}"]
    for name, value in metrics.items():
        target = TARGETS.get(name)
        mark = "" if target is None else ("  ok" if value >= target else "  BELOW")
        shown = f"{value:8.0f}" if name.endswith("images") else f"{value:8.3f}"
        lines.append(f"{name:<22}{shown}{'' if target is None else f'{target:9.2f}'}{mark}")
    return "\n".join(lines)


CARD_START, CARD_END = "<!-- metrics:start -->", "<!-- metrics:end -->"


def card_metrics(report: dict[str, Any], training: dict[str, Any] | None) -> str:
    """Markdown for the model card's metrics block, from a quality report (+ training stats)."""
    m = report["metrics"]
    lines = [
        f"Held-out pool: {int(m['pool_images'])} images of the world's eval split "
        f"(seed {report['world_seed']}), {int(m['single_object_images'])} with one object.",
        "",
        "| metric | value | target |",
        "|---|---|---|",
    ]
    for name, value in m.items():
        if not name.endswith("images"):
            target = TARGETS.get(name)
            lines.append(f"| {name} | {value:.3f} | {'' if target is None else f'≥ {target}'} |")
    if training is not None:
        lines += [
            "",
            f"Training: {training['steps']} steps, {training['images_seen']} images seen "
            f"({training['epochs']} epochs of {training['config']['images']}), batch "
            f"{training['config']['batch_size']}, lr {training['config']['lr']}, "
            f"{training['wall_seconds']:.0f} s wall on {training['device_name']} "
            f"(torch {training['torch']}), final loss {training['final_loss']}, "
            f"{training['parameters']} parameters, {training['weights_bytes']} bytes (fp16).",
        ]
    return "\n".join(lines)


def update_card(card: Path, block: str) -> None:
    """Replace the text between the card's metrics markers."""
    text = card.read_text()
    head, _, rest = text.partition(CARD_START)
    _, _, tail = rest.partition(CARD_END)
    if not rest:
        raise ValueError(f"{card} has no {CARD_START} ... {CARD_END} block")
    card.write_text(f"{head}{CARD_START}\n{block}\n{CARD_END}{tail}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--out", type=Path, default=None, help="write the metrics JSON here")
    parser.add_argument("--images", type=int, default=1000, help="held-out pool size")
    parser.add_argument("--seed", type=int, default=0, help="world seed")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument("--card", type=Path, default=None, help="model card to update")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    model, preprocess, tokenizer = load_demo_model(args.checkpoint, args.device)
    pool = eval_pool(args.images, args.seed)
    metrics = evaluate(model, preprocess, tokenizer, pool, args.seed)
    print(format_table(metrics))
    report = {
        "model": MODEL_NAME,
        "checkpoint": args.checkpoint.name,
        "world_seed": args.seed,
        "split": "eval",
        "queries": "full caption of each pool image; ground truth = that image",
        "metrics": metrics,
        "targets": TARGETS,
        "seconds": round(time.perf_counter() - started, 2),
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.card is not None:
        stats = args.checkpoint.parent / "training.json"
        training = json.loads(stats.read_text()) if stats.exists() else None
        update_card(args.card, card_metrics(report, training))
    missed = [k for k, v in TARGETS.items() if metrics[k] < v]
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
