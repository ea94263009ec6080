"""Pretrain the tiny demo CLIP ("polar-demo") on the synthetic world within a wall-clock budget.

    python -m app.demo.pretrain --minutes 20 --device auto --out app/ml/assets/polar-demo \
        --data-workers 2

The budget covers everything: data generation, training, saving and the final quality check.
`--init PATH` starts from an existing checkpoint instead of random weights (a warm start: the
CPU recipe for a new world version, see MODEL_CARD.md); rows a larger config adds to the
positional embedding start as copies of the checkpoint's last row.
The learning rate follows the clock (linear warmup, then cosine to zero at the deadline), so a
run ends on time on any machine; the number of steps therefore depends on the machine, while
the data, the initialisation and the batch order are fixed by --seed.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from app.demo import quality
from app.demo.world import TWIN_KINDS, render_examples

MODEL_NAME = quality.MODEL_NAME
CONFIG_FILE = quality.CONFIG_DIR / f"{MODEL_NAME}.json"
DEFAULT_OUT = quality.DEFAULT_CHECKPOINT.parent
WEIGHTS_FILE = "weights.safetensors"
CHUNK = 500  # images per data-generation task
MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's OpenAI normalisation, as at serving
STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that defines a pretraining run."""

    minutes: float = 20.0  # total wall-clock budget, data generation and saving included
    images: int = 100_000  # pre-generated training images, 4 captions each
    batch_size: int = 256
    lr: float = 1e-3  # AdamW peak learning rate
    weight_decay: float = 0.1  # on weight matrices only (not embeddings, norms, biases)
    warmup: float = 0.05  # fraction of the training time spent in linear warmup
    seed: int = 0  # world seed (data) and torch seed (init, batch order)
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    data_workers: int = 0  # processes generating data; 0 = one per CPU
    eval_images: int = 1000  # held-out pool for the final quality check
    reserve_seconds: float = 15.0  # kept back from training for saving and the quality check
    out: Path = field(default=DEFAULT_OUT)
    model_config: Path = field(default=CONFIG_FILE)  # open_clip config, named polar-demo.json
    data_cache: Path | None = None  # .npz to reuse generated data across runs (same seed/images)
    init: Path | None = None  # checkpoint to start from (warm start); None = random init
    # twin pairs (World.twin: shape twins, pattern twins, or both alternating): examples
    # images..images+twin_pairs-1 of the train split, each with its twin; `twin_share` of
    # every batch's rows are such pairs, with full captions
    twin_pairs: int = 0
    twin_share: float = 0.25
    twin_kind: str = "shape"


@dataclass
class TrainData:
    """Pre-generated training set, already on the training device."""

    images: torch.Tensor  # (N, 3, 64, 64) uint8
    caption_ids: torch.Tensor  # (N, C) int64 index into tokens, C captions per image
    tokens: torch.Tensor  # (U, context) int64, one row per distinct caption
    seconds: float
    twin_start: int = -1  # rows from here on are (example, twin) pairs; -1 = none


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def lr_factor(progress: float, warmup: float) -> float:
    """Learning-rate multiplier at a fraction of the training time: warmup, then cosine to 0."""
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup:
        return progress / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (progress - warmup) / (1.0 - warmup)))


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (the CLIP loss) over a batch of matching (image, text) rows.

    Short captions repeat within a batch ("a ball on the beach"). Making identical captions
    joint positives changes nothing: their embeddings are identical, so the loss is the same
    function. Its optimum ranks images by p(text | image), which is what retrieval needs.
    """
    logits = scale * image.float() @ text.float().T  # (B, B)
    labels = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def tokenize_captions(captions: Sequence[str], tokenizer: Any) -> torch.Tensor:
    """(U, context) token ids, identical to `tokenizer(captions)` for our plain-word captions.

    The caption vocabulary is a few dozen words, so each word is BPE-encoded once instead of
    running the full tokenizer on millions of captions.
    """
    ctx = tokenizer.context_length
    sot, eot = tokenizer.sot_token_id, tokenizer.eot_token_id
    words: dict[str, list[int]] = {}
    out = np.zeros((len(captions), ctx), np.int64)
    for i, caption in enumerate(captions):
        ids = [sot]
        for w in caption.split():
            if w not in words:
                words[w] = tokenizer.encode(w)
            ids += words[w]
        ids.append(eot)
        if len(ids) > ctx:
            raise ValueError(f"caption longer than {ctx} tokens: {caption!r}")
        out[i, : len(ids)] = ids
    tokens = torch.from_numpy(out)
    probe = list(captions[:64])
    assert torch.equal(tokens[: len(probe)], tokenizer(probe)), "fast tokenizer disagrees"
    return tokens


def render_dataset(
    seed: int, images: int, workers: int, start: int = 0, twins: str | None = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images (N, 64, 64, 3) uint8, caption ids (N, C) and distinct captions, in parallel.

    Examples start..start+images-1 of the train split (each followed by its twin of kind
    `twins`, World.twin). Workers are spawned, so a calling script needs the `__main__` guard.
    """
    stop = start + images
    ranges = [(s, min(s + CHUNK, stop)) for s in range(start, stop, CHUNK)]
    task = partial(render_examples, seed, "train", twins=twins)
    if workers == 1:
        parts = [task(*r) for r in ranges]
    else:  # spawn: forking a process that holds torch threads can deadlock
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            parts = pool.starmap(task, ranges)
    index: dict[str, int] = {}
    ids = np.array(
        [[index.setdefault(c, len(index)) for c in caps] for p in parts for caps in p[1]],
        np.int64,
    )  # (N, C)
    return np.concatenate([p[0] for p in parts]), ids, list(index)


def load_data(cfg: PretrainConfig, tokenizer: Any, device: torch.device) -> TrainData:
    """Render (or reuse from cfg.data_cache) the training set and move it to the device."""
    started = time.perf_counter()
    cache = cfg.data_cache
    workers = cfg.data_workers or os.cpu_count() or 1
    if cache is not None and cache.exists():
        with np.load(cache) as z:
            if (int(z["seed"]), len(z["images"])) != (cfg.seed, cfg.images):
                raise ValueError(f"{cache} holds other data (seed/images differ)")
            images, ids = z["images"], z["caption_ids"]
            captions = z["captions"].tobytes().decode().split("\n")
    else:
        images, ids, captions = render_dataset(cfg.seed, cfg.images, workers)
        if cache is not None:
            text = np.frombuffer("\n".join(captions).encode(), np.uint8)  # compact, no pickle
            np.savez(cache, images=images, caption_ids=ids, captions=text, seed=cfg.seed)
    twin_start = -1
    if cfg.twin_pairs:
        # shape twins keep the name earlier stages cached them under
        suffix = ".twins.npz" if cfg.twin_kind == "shape" else f".twins-{cfg.twin_kind}.npz"
        twin_cache = None if cache is None else cache.with_suffix(suffix)
        if twin_cache is not None and twin_cache.exists():
            with np.load(twin_cache) as z:
                if (int(z["seed"]), len(z["images"])) != (cfg.seed, 2 * cfg.twin_pairs):
                    raise ValueError(f"{twin_cache} holds other data (seed/pairs differ)")
                t_images, t_ids = z["images"], z["caption_ids"]
                t_captions = z["captions"].tobytes().decode().split("\n")
        else:
            t_images, t_ids, t_captions = render_dataset(
                cfg.seed, cfg.twin_pairs, workers, start=cfg.images, twins=cfg.twin_kind
            )
            if twin_cache is not None:
                text = np.frombuffer("\n".join(t_captions).encode(), np.uint8)
                np.savez(twin_cache, images=t_images, caption_ids=t_ids, captions=text,
                         seed=cfg.seed)  # fmt: skip
        twin_start = len(images)
        images = np.concatenate([images, t_images])
        ids = np.concatenate([ids, t_ids + len(captions)])
        captions = [*captions, *t_captions]
    tokens = tokenize_captions(captions, tokenizer)
    data = TrainData(
        images=torch.from_numpy(images).to(device).permute(0, 3, 1, 2).contiguous(),
        caption_ids=torch.from_numpy(ids).to(device),
        tokens=tokens.to(device),
        seconds=time.perf_counter() - started,
        twin_start=twin_start,
    )
    print(
        f"data: {len(images)} images, {len(captions)} distinct captions, "
        f"{workers} workers, {data.seconds:.1f}s",
        flush=True,
    )
    return data


def build_model(seed: int, device: torch.device) -> torch.nn.Module:
    """Randomly initialised polar-demo model from the registered open_clip config."""
    import open_clip

    torch.manual_seed(seed)
    model: torch.nn.Module = open_clip.create_model(MODEL_NAME, device=device)
    return model


def warm_start(model: torch.nn.Module, checkpoint: Path) -> list[str]:
    """Load a checkpoint's weights (fp16 or fp32) into `model`, in place; the keys it grew.

    Only the positional embedding may differ in shape, and only by growing (a longer context):
    the new rows start as copies of the checkpoint's last row. Any other mismatch is an error.
    """
    from safetensors.torch import load_file

    if not checkpoint.is_file():
        raise FileNotFoundError(f"--init: no checkpoint at {checkpoint}")
    source = load_file(str(checkpoint))
    target = model.state_dict()
    missing = sorted(set(target) - set(source))
    unexpected = sorted(set(source) - set(target))
    if missing or unexpected:
        raise ValueError(f"--init {checkpoint}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    grown = []
    for name, value in source.items():
        want = target[name].shape
        if value.shape != want:
            grows = name == "positional_embedding" and value.shape[1:] == want[1:]
            if not grows or len(value) > want[0]:
                raise ValueError(
                    f"--init {checkpoint}: {name} has shape {tuple(value.shape)}, "
                    f"the model {tuple(want)}"
                )
            extra = value[-1:].expand(want[0] - len(value), *value.shape[1:])
            source[name] = torch.cat([value, extra])
            grown.append(name)
    model.load_state_dict({k: v.to(target[k].dtype) for k, v in source.items()})
    return grown


def encode_text_trimmed(model: Any, text: torch.Tensor) -> torch.Tensor:
    """`model.encode_text(text)` (unnormalised), computed only up to the batch's last end token.

    Exact for open_clip's causal text tower with argmax (end-token) pooling: no position attends
    to a later one, so the padding after the longest caption changes nothing. Captions use about
    a third of the 40-token context, so this cuts the text tower's cost on a CPU about 2-3x.
    """
    eot = text.argmax(dim=-1)  # (B,) the end token has the largest id
    length = int(eot.max()) + 1
    text = text[:, :length]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(text).to(cast) + model.positional_embedding[:length].to(cast)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)[torch.arange(len(text), device=text.device), eot]  # (B, width)
    proj = model.text_projection
    out: torch.Tensor = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
    return out


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay weight matrices; leave embeddings alone so unseen tokens ('sks') keep their scale."""
    decay: list[torch.nn.Parameter] = []
    keep: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        exempt = p.ndim < 2 or "embedding" in name or "logit_scale" in name
        (keep if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def train(
    model: torch.nn.Module,
    data: TrainData,
    cfg: PretrainConfig,
    deadline: float,
    log: Callable[[str], None] = print,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Any]:
    """Train until `deadline` (`clock` seconds) with the time-driven schedule."""
    device = data.images.device
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255.0
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    opt = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(0.9, 0.98),
        fused=device.type == "cuda",  # one kernel per step instead of one per tensor
    )
    logit_scale: torch.Tensor = model.logit_scale  # type: ignore[assignment]
    n, batch = len(data.images), min(cfg.batch_size, len(data.images))
    n_reg = n if data.twin_start < 0 else data.twin_start
    n_pairs = (n - n_reg) // 2
    per_batch = min(int(batch * cfg.twin_share) // 2, n_pairs)  # twin pairs per batch
    batch_reg = batch - 2 * per_batch
    order, cursor = torch.randperm(n_reg, generator=gen, device=device), 0
    pairs = torch.randperm(max(n_pairs, 1), generator=gen, device=device)
    pair_cursor = 0
    start = clock()
    span = max(deadline - start, 1e-3)
    steps, recent, last_log = 0, torch.zeros((), device=device), start
    losses: list[float] = []
    model.train()
    while clock() < deadline:
        lr = cfg.lr * lr_factor((clock() - start) / span, cfg.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        if cursor + batch_reg > n_reg:
            order, cursor = torch.randperm(n_reg, generator=gen, device=device), 0
        idx = order[cursor : cursor + batch_reg]
        cursor += batch_reg
        pick = torch.randint(
            0, data.caption_ids.shape[1], (batch_reg,), generator=gen, device=device
        )
        if per_batch:
            if pair_cursor + per_batch > n_pairs:
                pairs, pair_cursor = torch.randperm(n_pairs, generator=gen, device=device), 0
            p = pairs[pair_cursor : pair_cursor + per_batch]
            pair_cursor += per_batch
            twins = (n_reg + 2 * p[:, None] + torch.arange(2, device=device)).reshape(-1)
            idx = torch.cat([idx, twins])
            # full captions name what the twin changes (the variant word, the pattern words)
            pick = torch.cat([pick, torch.zeros_like(twins)])
        caption = data.caption_ids[idx, pick]  # (B,)
        x = (data.images[idx].float() - mean) / std  # (B, 3, 64, 64)
        # bf16 autocast on CUDA only: on a CPU without bf16 units it ran 25x slower than fp32
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            if device.type == "cpu":  # trimming needs the length on the host: no GPU sync
                image_f = F.normalize(model.encode_image(x), dim=-1)  # type: ignore[operator]
                text_f = F.normalize(encode_text_trimmed(model, data.tokens[caption]), dim=-1)
                scale = logit_scale.exp()
            else:
                image_f, text_f, scale = model(x, data.tokens[caption])[:3]
            loss = contrastive_loss(image_f, text_f, scale)
        opt.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)  # = loss.backward(), which torch leaves unannotated
        opt.step()
        with torch.no_grad():
            logit_scale.clamp_(0.0, math.log(100.0))
        recent += loss.detach()
        steps += 1
        if steps % 25 == 0:  # syncing every step would stall a GPU
            losses.append(recent.item() / 25)
            recent.zero_()
            now = clock()
            if now - last_log > 30:
                seen = steps * batch
                log(
                    f"step {steps:6d}  {now - start:6.0f}s  lr {lr:.2e}  loss {losses[-1]:.3f}  "
                    f"scale {logit_scale.exp().item():5.1f}  {seen / (now - start):7.0f} img/s"
                )
                last_log = now
    if device.type == "cuda":
        torch.cuda.synchronize()
    model.eval()
    seconds = clock() - start
    return {
        "steps": steps,
        "images_seen": steps * batch,
        "epochs": round(steps * batch / n, 2),
        "final_loss": round(float(np.mean(losses[-4:])), 4) if losses else None,  # last 100 steps
        "logit_scale": round(float(logit_scale.exp().item()), 2),
        "train_seconds": round(seconds, 1),
        "images_per_second": round(steps * batch / seconds, 1),
    }


def save_checkpoint(model: torch.nn.Module, out: Path, config: Path = CONFIG_FILE) -> Path:
    """fp16 safetensors (floats halved; open_clip casts them back to fp32 on load) + config."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.half() if v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in model.state_dict().items()
    }
    path = out / WEIGHTS_FILE
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"model": MODEL_NAME, "format": "pt"})
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    if config.resolve() != (out / config.name).resolve():
        shutil.copyfile(config, out / config.name)
    return path


def run(cfg: PretrainConfig) -> dict[str, Any]:
    """The whole pipeline: data, model, training to the deadline, save, reload and check."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    started = time.perf_counter()
    deadline = started + cfg.minutes * 60.0
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest convolutions
    if cfg.model_config.name != f"{MODEL_NAME}.json":
        raise ValueError(f"the model config must be named {MODEL_NAME}.json")
    if not 0.0 < cfg.twin_share < 1.0:
        raise ValueError(f"--twin-share must lie between 0 and 1, not {cfg.twin_share}")
    if cfg.twin_kind not in TWIN_KINDS:
        raise ValueError(f"--twin-kind must be one of {list(TWIN_KINDS)}, not {cfg.twin_kind!r}")
    open_clip.add_model_config(cfg.model_config)
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    data = load_data(cfg, tokenizer, device)
    model: Any = build_model(cfg.seed, device)  # open_clip CLIP
    if cfg.init is not None:
        grown = warm_start(model, cfg.init)
        print(f"warm start from {cfg.init}" + (f" (grown: {', '.join(grown)})" if grown else ""))
    train_deadline = deadline - cfg.reserve_seconds
    if train_deadline <= time.perf_counter():
        raise RuntimeError("no time left to train: raise --minutes or lower --images")
    stats = train(model, data, cfg, train_deadline)
    data_seconds = data.seconds
    del data

    path = save_checkpoint(model, cfg.out, cfg.model_config)
    pool = quality.eval_pool(cfg.eval_images, cfg.seed)
    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    fp32 = quality.evaluate(model, preprocess, tokenizer, pool, cfg.seed)
    reloaded, preprocess, tokenizer = quality.load_demo_model(path, str(device), cfg.out)
    text_weight = reloaded.state_dict()["transformer.resblocks.0.attn.in_proj_weight"]
    assert text_weight.dtype == torch.float32, "text tower must load back in fp32"
    fp16 = quality.evaluate(reloaded, preprocess, tokenizer, pool, cfg.seed)
    report = {
        "model": MODEL_NAME,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "model_config": json.loads(cfg.model_config.read_text()),
        "device": str(device),
        "device_name": _device_name(device),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "python": platform.python_version(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_bytes": path.stat().st_size,
        "data_seconds": round(data_seconds, 1),
        **stats,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "quality_fp16_checkpoint": fp16,
        "quality_fp32_in_memory": fp32,
    }
    (cfg.out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(quality.format_table(fp16))
    return report


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def parse_args(argv: Sequence[str] | None = None) -> PretrainConfig:
    """Command-line flags -> PretrainConfig."""
    d = PretrainConfig()
    p = argparse.ArgumentParser(description="Pretrain the polar-demo CLIP on the synthetic world.")
    p.add_argument("--minutes", type=float, default=d.minutes, help="total wall-clock budget")
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda[:N]")
    p.add_argument("--out", type=Path, default=d.out, help="asset folder to write")
    p.add_argument("--data-workers", type=int, default=d.data_workers, help="0 = all CPUs")
    p.add_argument("--images", type=int, default=d.images)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup", type=float, default=d.warmup, help="fraction of training time")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--eval-images", type=int, default=d.eval_images)
    p.add_argument("--reserve-seconds", type=float, default=d.reserve_seconds)
    p.add_argument("--model-config", type=Path, default=d.model_config)
    p.add_argument("--data-cache", type=Path, default=None, help=".npz to reuse or create")
    p.add_argument("--init", type=Path, default=None, help="checkpoint to start from")
    p.add_argument(
        "--twin-pairs", type=int, default=d.twin_pairs, help="twin pairs (hard negatives)"
    )
    p.add_argument(
        "--twin-share", type=float, default=d.twin_share, help="share of a batch's rows in pairs"
    )
    p.add_argument(
        "--twin-kind",
        choices=TWIN_KINDS,
        default=d.twin_kind,
        help="what a pair's twin changes: the shape, the pattern, or both kinds alternating",
    )
    a = p.parse_args(argv)
    return PretrainConfig(
        minutes=a.minutes,
        images=a.images,
        batch_size=a.batch_size,
        lr=a.lr,
        weight_decay=a.weight_decay,
        warmup=a.warmup,
        seed=a.seed,
        device=a.device,
        data_workers=a.data_workers,
        eval_images=a.eval_images,
        reserve_seconds=a.reserve_seconds,
        out=a.out,
        model_config=a.model_config,
        data_cache=a.data_cache,
        init=a.init,
        twin_pairs=a.twin_pairs,
        twin_share=a.twin_share,
        twin_kind=a.twin_kind,
    )


def main(argv: Sequence[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
