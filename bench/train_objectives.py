"""Training time per concept: the paper's objective (fast path) vs the keep term (demo recipe).

    python bench/train_objectives.py [--threads 1] [--repeats 3]

ViT-B-32 architecture with random weights (speed does not depend on the weights), 5 photos,
500 steps, both trainers in the same run; prints a table and writes
bench/results/train_objectives.json with seconds per concept and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

from app.ml.model import bundle_from_model
from app.ml.selective import train_selective
from app.ml.train import train_adapter

OUT = Path(__file__).parent / "results" / "train_objectives.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default="ViT-B-32")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = open_clip.create_model(a.model, pretrained=None)
    bundle = bundle_from_model(model, None, name=a.model, pretrained="random")  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(0)
    photos = F.normalize(torch.randn(5, bundle.embed_dim, generator=gen), dim=-1)
    trainers = {
        "paper objective (fast path)": lambda: train_adapter(bundle, photos, "sks", "dog", lam=0.1),
        "keep term (service default)": lambda: train_selective(
            bundle, photos, "httr", "dog", lam=0.0, lr=3e-3, keep=3.0, others=0
        ),
    }
    times: dict[str, list[float]] = {k: [] for k in trainers}
    for fn in trainers.values():
        fn()  # warm-up
    for _ in range(a.repeats):  # interleaved, so both see the same machine load
        for name, fn in trainers.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    names = list(trainers)
    ratio = med[names[1]] / med[names[0]]
    print(f"{'trainer':<30} {'s/concept':>10}")
    for k, v in med.items():
        print(f"{k:<30} {v:>10.3f}")
    print(f"keep / paper: {ratio:.1f}x  (threads {a.threads}, loadavg {os.getloadavg()[0]:.1f})")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(
        json.dumps(
            {
                "model": f"{a.model} (random weights)",
                "photos": 5,
                "steps": 500,
                "threads": a.threads,
                "paper_s_per_concept": round(med[names[0]], 3),
                "keep_s_per_concept": round(med[names[1]], 3),
                "keep_over_paper": round(ratio, 2),
                "runs": {k: [round(x, 3) for x in v] for k, v in times.items()},
                "loadavg_1min": os.getloadavg()[0],
                "command": "python bench/train_objectives.py "
                f"--threads {a.threads} --repeats {a.repeats}",
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
