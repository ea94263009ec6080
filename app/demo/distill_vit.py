"""A ViT-shaped twin of the demo model ("polar-demo-vit"), its image tower distilled on a CPU.

    python -m app.demo.distill_vit --minutes 30            # one thread, ~30 CPU minutes
    python -m app.demo.distill_vit --assemble PATH.safetensors   # the loadable checkpoint

Why: the demo model's image tower is a ModifiedResNet whose last feature map is 2x2 cells, too
coarse for regions pooled from the tower's one pass to say where an object stands; real
deployments run ViTs (ViT-B-32: 7x7 patches). This model makes crops vs pooled regions
measurable on a ViT: a 4-block, 128-wide ViT on 8-pixel patches of the 64-pixel input (an 8x8
grid), its text tower the demo model's, bit for bit (same text hash, so the demo model's
concept adapters fit it as they are).

How: the student image tower is trained to reproduce the demo model's image embeddings (the
teacher) on the synthetic world's training images, loss 1 - cos(student, teacher); half of each
batch is a random crop of its image (25-100 % of the area, resized back to 64 px) so the student
also matches the teacher on the crops the region code encodes. The learning rate follows the
clock (warmup, cosine to zero at the deadline, as in app.demo.pretrain), so the run ends on
time; the data, the initialisation and the batch order are fixed by --seed.

Only the image tower is stored (`visual.safetensors`, fp16, about 1.6 MB): the text tower is
the demo model's. `--assemble` writes a full open_clip checkpoint (demo text tower + distilled
image tower) with this model's polar.json beside it; `assembled_checkpoint()` does it once into
a cache folder for the benchmarks and tests.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from app.demo import quality
from app.demo.pretrain import MEAN, STD, lr_factor, param_groups, render_dataset

MODEL_NAME = "polar-demo-vit"
TEACHER_NAME = quality.MODEL_NAME
CONFIG_FILE = quality.CONFIG_DIR / f"{MODEL_NAME}.json"
ASSETS = quality.REPO_ROOT / "app" / "ml" / "assets" / MODEL_NAME
VISUAL_FILE = "visual.safetensors"
TEACHER_CHECKPOINT = quality.DEFAULT_CHECKPOINT


@dataclass(frozen=True)
class DistillConfig:
    """Everything that defines a distillation run."""

    minutes: float = 30.0  # wall-clock budget for the training loop
    images: int = 60_000  # training images rendered from the world's train split
    batch_size: int = 128
    lr: float = 1e-3  # AdamW peak learning rate
    weight_decay: float = 0.05
    warmup: float = 0.05
    crop_share: float = 0.5  # share of each batch replaced by random crops of its images
    seed: int = 0
    threads: int = 1
    eval_images: int = 1000
    out: Path = field(default=ASSETS)
    teacher: Path = field(default=TEACHER_CHECKPOINT)
    # a second stage: start from these image-tower weights (a visual.safetensors) instead of
    # random ones
    init: Path | None = None
    # weight of a contrastive term: each student embedding must pick its own teacher
    # embedding among the batch's (InfoNCE at `temperature`, both ways). The cosine alone
    # learnt the scene, which dominates every embedding, and not the objects (stage 1:
    # category accuracy 0.31 against the teacher's 1.00); telling apart images of the same
    # scene with other objects is what this term asks for.
    contrast: float = 0.0
    temperature: float = 0.05
    report: str = "training.json"  # the run's record, in `out`


def build_student(seed: int) -> torch.nn.Module:
    """The polar-demo-vit model, image tower randomly initialised from `seed`."""
    import open_clip

    open_clip.add_model_config(CONFIG_FILE)
    torch.manual_seed(seed)
    model: torch.nn.Module = open_clip.create_model(MODEL_NAME)
    return model


def share_text_tower(student: torch.nn.Module, teacher: torch.nn.Module) -> int:
    """Copy every non-visual tensor (text tower, logit scale) from teacher to student; the
    number copied. Shapes must agree (the two configs share text_cfg and embed_dim)."""
    src = teacher.state_dict()
    dst = student.state_dict()
    shared = {k: v for k, v in src.items() if not k.startswith("visual.")}
    missing = sorted(k for k in dst if not k.startswith("visual.") and k not in shared)
    if missing:
        raise ValueError(f"the teacher lacks {missing[:5]}")
    student.load_state_dict(shared, strict=False)
    return len(shared)


def random_crops(x: torch.Tensor, gen: torch.Generator, min_area: float = 0.25) -> torch.Tensor:
    """One random crop per image of x (B, 3, H, W) float, 25-100 % of the area, aspect 3:4 to
    4:3, resized back to H x W (bilinear, antialiased)."""
    b, _, h, w = x.shape
    out = torch.empty_like(x)
    area = min_area + (1.0 - min_area) * torch.rand(b, generator=gen)
    log_ratio = (torch.rand(b, generator=gen) * 2 - 1) * float(np.log(4 / 3))
    ratio = torch.exp(log_ratio)
    for i in range(b):
        cw = round(float(torch.sqrt(area[i] * ratio[i])) * w)
        ch = round(float(torch.sqrt(area[i] / ratio[i])) * h)
        cw, ch = min(max(cw, 8), w), min(max(ch, 8), h)
        x0 = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
        y0 = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
        crop = x[i : i + 1, :, y0 : y0 + ch, x0 : x0 + cw]
        out[i] = F.interpolate(crop, size=(h, w), mode="bilinear", antialias=True)[0]
    return out


def distill(
    student: Any, teacher: Any, images: torch.Tensor, cfg: DistillConfig, deadline: float
) -> dict[str, Any]:
    """Train the student's image tower to the teacher's image embeddings until `deadline`."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(STD).view(1, 3, 1, 1) * 255.0
    gen = torch.Generator().manual_seed(cfg.seed)
    visual = student.visual
    for name, p in student.named_parameters():
        p.requires_grad_(name.startswith("visual."))
    opt = torch.optim.AdamW(param_groups(visual, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98))
    n, batch = len(images), cfg.batch_size
    n_crops = int(batch * cfg.crop_share)
    order, cursor = torch.randperm(n, generator=gen), 0
    start = time.perf_counter()
    span = max(deadline - start, 1e-3)
    steps, losses, last_log = 0, [], start
    visual.train()
    while time.perf_counter() < deadline:
        lr = cfg.lr * lr_factor((time.perf_counter() - start) / span, cfg.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        if cursor + batch > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        idx = order[cursor : cursor + batch]
        cursor += batch
        x = (images[idx].float() - mean) / std
        if n_crops:
            x = torch.cat([x[: batch - n_crops], random_crops(x[batch - n_crops :], gen)])
        with torch.no_grad():
            target = F.normalize(teacher.encode_image(x), dim=-1)
        pred = F.normalize(visual(x), dim=-1)
        loss = (1.0 - (pred * target).sum(-1)).mean()
        if cfg.contrast > 0:
            logits = pred @ target.T / cfg.temperature  # (B, B): student i vs teacher j
            labels = torch.arange(len(logits))
            nce = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
            loss = loss + cfg.contrast * nce
        opt.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        opt.step()
        losses.append(float(loss.detach()))
        steps += 1
        now = time.perf_counter()
        if now - last_log > 60:
            print(
                f"step {steps:6d}  {now - start:6.0f}s  lr {lr:.2e}  "
                f"1-cos {np.mean(losses[-50:]):.4f}  {steps * batch / (now - start):6.0f} img/s",
                flush=True,
            )
            last_log = now
    visual.eval()
    seconds = time.perf_counter() - start
    return {
        "steps": steps,
        "images_seen": steps * batch,
        "epochs": round(steps * batch / n, 2),
        "final_one_minus_cos": round(float(np.mean(losses[-50:])), 5) if losses else None,
        "train_seconds": round(seconds, 1),
        "images_per_second": round(steps * batch / seconds, 1),
    }


def save_visual(student: torch.nn.Module, out: Path) -> Path:
    """The image tower's tensors, fp16, as `visual.safetensors` (keys as in the full model)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.half() if v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in student.state_dict().items()
        if k.startswith("visual.")
    }
    path = out / VISUAL_FILE
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"model": MODEL_NAME, "format": "pt"})
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def assemble(target: Path, assets: Path = ASSETS, teacher: Path = TEACHER_CHECKPOINT) -> Path:
    """Write the full polar-demo-vit checkpoint to `target`: the teacher's (demo model's)
    non-visual tensors plus the distilled image tower, with polar.json beside it."""
    from safetensors.torch import load_file, save_file

    state = {k: v for k, v in load_file(str(teacher)).items() if not k.startswith("visual.")}
    visual = load_file(str(assets / VISUAL_FILE))
    state |= visual
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"model": MODEL_NAME, "format": "pt"})
    os.replace(tmp, target)
    for name in ("polar.json", f"{MODEL_NAME}.json"):
        if (assets / name).is_file():
            shutil.copyfile(assets / name, target.parent / name)
    return target


def assembled_checkpoint(cache: Path | None = None) -> Path:
    """The full checkpoint, assembled once into `cache` (default: a folder under the system's
    temp dir) keyed by the hashes of the two source files."""
    import tempfile

    digest = hashlib.sha256()
    for src in (TEACHER_CHECKPOINT, ASSETS / VISUAL_FILE):
        digest.update(src.read_bytes())
    folder = (cache or Path(tempfile.gettempdir()) / "polar-demo-vit") / digest.hexdigest()[:16]
    target = folder / "weights.safetensors"
    if not target.is_file():
        assemble(target)
    return target


def run(cfg: DistillConfig) -> dict[str, Any]:
    """Render the data, distil to the deadline, save, and check quality against the teacher."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    teacher, t_pre, tokenizer = quality.load_demo_model(cfg.teacher)
    for p in teacher.parameters():
        p.requires_grad_(False)
    student: Any = build_student(cfg.seed)
    copied = share_text_tower(student, teacher)
    if cfg.init is not None:
        from safetensors.torch import load_file

        start = {k: v.float() for k, v in load_file(str(cfg.init)).items()}
        student.load_state_dict(start, strict=False)
        print(f"image tower from {cfg.init}")
    data_start = time.perf_counter()
    images_np, _, _ = render_dataset(cfg.seed, cfg.images, workers=1)
    images = torch.from_numpy(images_np).permute(0, 3, 1, 2).contiguous()
    data_seconds = time.perf_counter() - data_start
    print(f"data: {len(images)} images in {data_seconds:.0f}s; {copied} text tensors shared")
    stats = distill(student, teacher, images, cfg, time.perf_counter() + cfg.minutes * 60.0)
    del images, images_np
    path = save_visual(student, cfg.out)
    shutil.copyfile(CONFIG_FILE, cfg.out / CONFIG_FILE.name)

    # quality of the fp16 checkpoint as open_clip loads it, against the teacher on one pool
    full = assemble(cfg.out / "_check" / "weights.safetensors", cfg.out, cfg.teacher)
    model, _, s_pre = open_clip.create_model_and_transforms(MODEL_NAME, pretrained=str(full))
    model.eval()
    pool = quality.eval_pool(cfg.eval_images, cfg.seed)
    arrays = [ex.image for ex in pool]
    s_emb = quality.encode_images(model, s_pre, arrays)
    t_emb = quality.encode_images(teacher, t_pre, arrays)
    agreement = float((s_emb * t_emb).sum(-1).mean())
    student_q = quality.evaluate(model, s_pre, tokenizer, pool, cfg.seed)
    teacher_q = quality.evaluate(teacher, t_pre, tokenizer, pool, cfg.seed)
    shutil.rmtree(cfg.out / "_check")
    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    assert preprocess is not None
    report = {
        "model": MODEL_NAME,
        "teacher": f"{TEACHER_NAME} {cfg.teacher.name} sha256 "
        + hashlib.sha256(cfg.teacher.read_bytes()).hexdigest()[:12],
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "model_config": json.loads(CONFIG_FILE.read_text()),
        "command": "python -m app.demo.distill_vit " + " ".join(sys.argv[1:]),
        "device": f"cpu, {platform.processor() or platform.machine()} ({cfg.threads} threads)",
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "visual_parameters": sum(p.numel() for p in model.visual.parameters()),
        "visual_bytes": path.stat().st_size,
        "data_seconds": round(data_seconds, 1),
        **stats,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "eval_cosine_to_teacher": round(agreement, 4),
        "quality_student": student_q,
        "quality_teacher": teacher_q,
    }
    (cfg.out / cfg.report).write_text(json.dumps(report, indent=2) + "\n")
    rows = ["caption_r@10", "scene_accuracy", "category_accuracy", "shape_accuracy"]
    print(f"cosine to teacher on {len(pool)} held-out images: {agreement:.4f}")
    for key in rows:
        print(f"{key:20s} student {student_q[key]:.3f}  teacher {teacher_q[key]:.3f}")
    return report


def parse_args(argv: Sequence[str] | None = None) -> tuple[DistillConfig, Path | None]:
    """Command-line flags -> (DistillConfig, --assemble target or None)."""
    d = DistillConfig()
    p = argparse.ArgumentParser(description="Distil a ViT image tower from the demo model's.")
    p.add_argument("--minutes", type=float, default=d.minutes, help="training-loop budget")
    p.add_argument("--images", type=int, default=d.images)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--crop-share", type=float, default=d.crop_share)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--eval-images", type=int, default=d.eval_images)
    p.add_argument("--out", type=Path, default=d.out)
    p.add_argument("--init", type=Path, default=None, help="visual.safetensors to start from")
    p.add_argument("--contrast", type=float, default=d.contrast)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--report", default=d.report, help="file name of the run's record")
    p.add_argument("--assemble", type=Path, default=None, help="write the full checkpoint here")
    a = p.parse_args(argv)
    cfg = DistillConfig(
        minutes=a.minutes,
        images=a.images,
        batch_size=a.batch_size,
        lr=a.lr,
        crop_share=a.crop_share,
        seed=a.seed,
        threads=a.threads,
        eval_images=a.eval_images,
        out=a.out,
        init=a.init,
        contrast=a.contrast,
        temperature=a.temperature,
        report=a.report,
    )
    return cfg, a.assemble


def main(argv: Sequence[str] | None = None) -> int:
    cfg, target = parse_args(argv)
    if target is not None:
        print(assemble(target, cfg.out))
        return 0
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
