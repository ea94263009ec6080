"""Build the demo model's retention set: held-out world images, one caption each, embedded.

    python -m app.demo.retention_set            # after app.demo.pretrain wrote the checkpoint

Writes `retention.npz` next to the checkpoint (app/services/retention.py reads it to score every
trained concept): `captions` (N,) str, `image_embeddings` (N, D) float32, `model_id`. The images
are `World(seed).example(i, "eval")` for i in [start, start + n): the eval split, which pretraining
never draws from, past the first 1000 that app.demo.quality scores the model on. Each caption is
the world's "minimal" one, category and scene ("there is a ball on a kitchen counter"): short
and true like a person's caption, and vague enough that R@10 stays off the ceiling, so damage
shows. Measured on the demo model (500 images): base R@10 0.89; concepts trained with λ = 0 cut
it to 0.75 and 0.82 (flagged; a third stayed at 0.90), with the calibrated λ = 0.03 all stay at
0.90. With the examples' longer captions the base is 0.99 and even λ = 0 loses under 0.03 there,
so the flag could never fire.
Rerun it whenever the checkpoint changes; the service ignores a set built with another model.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from app.demo.world import World
from app.ml.encode import encode_images, encode_texts
from app.ml.model import DEMO_MODEL_NAME, ClipBundle, demo_checkpoint_path, load_clip
from app.services.retention import RETENTION_FILE, RetentionSet, recall_at_k

DEFAULT_IMAGES = 500
DEFAULT_START = 1000  # app.demo.quality's pool is eval examples 0..999
_CAPTION_STREAM = 7  # seeds the caption wording apart from the world's own streams


def build(bundle: ClipBundle, n: int, start: int = DEFAULT_START, seed: int = 0) -> RetentionSet:
    """Render, caption and embed held-out examples with the model that will serve."""
    world = World(seed)
    examples = [world.example(i, "eval") for i in range(start, start + n)]
    captions = tuple(
        world.caption(
            ex.scene, ex.objects, np.random.default_rng([seed, _CAPTION_STREAM, i]), "minimal"
        )
        for i, ex in zip(range(start, start + n), examples, strict=True)
    )
    images = encode_images(bundle, [Image.fromarray(ex.image) for ex in examples])  # (N, D)
    return RetentionSet(captions, images, bundle.fingerprint.model_id)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=demo_checkpoint_path())
    parser.add_argument("--images", type=int, default=DEFAULT_IMAGES, help="set size N")
    parser.add_argument("--start", type=int, default=DEFAULT_START, help="first eval example")
    parser.add_argument("--seed", type=int, default=0, help="world seed (as in pretraining)")
    parser.add_argument("--out", type=Path, default=None, help="default: next to the checkpoint")
    args = parser.parse_args(argv)
    if not args.checkpoint.is_file():
        print(f"no checkpoint at {args.checkpoint}; run python -m app.demo.pretrain first")
        return 1
    started = time.perf_counter()
    bundle = load_clip(DEMO_MODEL_NAME, str(args.checkpoint), "cpu")
    rset = build(bundle, args.images, args.start, args.seed)
    out = args.out or args.checkpoint.parent / RETENTION_FILE
    rset.save(out)
    base = recall_at_k(encode_texts(bundle, rset.captions), rset.image_embeddings)
    print(
        f"wrote {out}: {len(rset.captions)} captions, {rset.image_embeddings.shape[1]}-d, "
        f"model {rset.model_id}, base caption R@10 {base:.3f} "
        f"({time.perf_counter() - started:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
