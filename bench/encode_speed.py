"""Query-encoding latency with 0, 1, 3 and 10 stacked adapters, vs the base model and vs
open_clip's full-context encode_text, all in one run (interleaved, medians).

ViT-B-32 architecture with random weights and random adapters (cost does not depend on the
values). Writes bench/results/encode_speed.json.

    .venv/bin/python bench/encode_speed.py [--threads 1] [--repeats 200]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

from app.ml.adapter import ConceptAdapter
from app.ml.encode import encode_texts
from app.ml.model import ClipBundle, bundle_from_model

OUT = Path(__file__).parent / "results" / "encode_speed.json"
QUERIES = [
    "sks dog at the beach",
    "a photo of sks dog and sks cat on the sofa",
    "sks skirt",
    "a person wearing sks skirt poses on a couch in a sunny living room",
]
STACKS = (0, 1, 3, 10)


def adapters(bundle: ClipBundle, k: int) -> list[ConceptAdapter]:
    """k random adapters for this model."""
    g = torch.Generator().manual_seed(k)
    d = bundle.text_width
    stack = []
    for _ in range(k):
        b, a = 0.1 * torch.randn(d, generator=g), torch.randn(d, generator=g)
        meta = {"token": "sks", "category": None, "lam": 0.1, "steps": 500, "lr": 1e-3}
        stack.append(ConceptAdapter(b, a, bundle.fingerprint, final_loss=0.0, **meta))
    return stack


def main() -> None:
    """Time each configuration round-robin and report medians and ratios."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # One thread: a query is one short sequence, and the cores are shared by the API workers.
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--repeats", type=int, default=200, help="timed calls per configuration")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    bundle = bundle_from_model(model, preprocess, name="ViT-B-32", pretrained="random")

    def full_context(q: str) -> None:
        with torch.inference_mode():
            F.normalize(model.encode_text(bundle.tokenizer([q])), dim=-1).numpy()

    cases: dict[str, Callable[[str], object]] = {"full_context": full_context}
    for k in STACKS:
        stack = adapters(bundle, k)
        cases[f"adapters_{k}"] = lambda q, s=stack: encode_texts(bundle, [q], s)
    times: dict[str, list[float]] = {name: [] for name in cases}
    load_before = os.getloadavg()[0]
    for i in range(args.repeats + 10):
        q = QUERIES[i % len(QUERIES)]
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn(q)
            if i >= 10:  # the first rounds warm up caches and the allocator
                times[name].append(time.perf_counter() - t0)
    ms = {name: 1000 * statistics.median(v) for name, v in times.items()}
    base = ms["adapters_0"]
    rows = {
        name: {
            "median_ms": round(v, 3),
            "vs_base": round(v / base, 3),
            "vs_full_context": round(v / ms["full_context"], 3),
        }
        for name, v in ms.items()
    }
    result = {
        "model": "ViT-B-32 (random weights)",
        "batch": 1,
        "threads": args.threads,
        "repeats": args.repeats,
        "queries": QUERIES,
        "results": rows,
        "ratio_3_adapters_vs_base": rows["adapters_3"]["vs_base"],
        "loadavg_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "command": f"bench/encode_speed.py --threads {args.threads} --repeats {args.repeats}",
    }
    print(f"{'case':<16}{'median ms':>11}{'vs base':>9}{'vs full':>9}")
    for name, row in rows.items():
        print(
            f"{name:<16}{row['median_ms']:>11.2f}{row['vs_base']:>9.2f}{row['vs_full_context']:>9.2f}"
        )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
