"""Turning benchmark results into a table, a results JSON, a chart and a target check."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
Results = dict[str, dict[str, Any]]  # method -> metrics (see runner.evaluate)

# Issue 7's targets on the synthetic test split, checked for the default method.
TARGETS = {
    "context_mrr_min": 0.60,  # default method's context mRR
    "context_gain_over_text_min": 0.45,  # ... minus text-only's
    "retention_drop_max": 0.03,  # base caption R@10 minus R@10 with one concept applied
    "multi_over_single_min": 0.80,  # two-concept mRR / single-concept context mRR
    "beats_composed": True,  # default context mRR > composed image+text baseline's
}


def _get(results: Results, method: str, *path: str) -> float | None:
    node: Any = results.get(method)
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return float(node)


def check_targets(results: Results, default: str) -> dict[str, Any]:
    """Each target with the measured value and whether it is met (None when not measurable)."""
    ctx = _get(results, default, "context", "mrr")
    text = _get(results, "text", "context", "mrr")
    composed = _get(results, "composed", "context", "mrr")
    drop = _get(results, default, "retention", "drop")
    multi = _get(results, default, "multi", "mrr")
    ratio = None if multi is None or not ctx else multi / ctx
    gain = None if ctx is None or text is None else ctx - text

    def row(value: float | None, ok: bool | None) -> dict[str, Any]:
        return {"value": value, "met": ok}

    return {
        "context_mrr_min": row(ctx, None if ctx is None else ctx >= TARGETS["context_mrr_min"]),
        "context_gain_over_text_min": row(
            gain, None if gain is None else gain >= TARGETS["context_gain_over_text_min"]
        ),
        "retention_drop_max": row(
            drop, None if drop is None else drop <= TARGETS["retention_drop_max"]
        ),
        "multi_over_single_min": row(
            ratio, None if ratio is None else ratio >= TARGETS["multi_over_single_min"]
        ),
        "beats_composed": row(
            composed, None if ctx is None or composed is None else ctx > composed
        ),
    }


def format_table(results: Results) -> str:
    """One row per method: context, concept-only and multi-concept metrics, retention, seconds."""
    head = (
        f"{'method':<21}{'ctx mRR':>8}{'R@1':>6}{'R@5':>6}{'R@10':>6}{'mAP':>6}"
        f"{'con mRR':>8}{'con mAP':>8}{'2c mRR':>8}{'ret R@10':>9}{'drop':>7}{'train s':>8}"
    )
    lines = [head, "-" * len(head)]

    def f(v: float | None, w: int, p: int = 3) -> str:
        return f"{'-':>{w}}" if v is None else f"{v:>{w}.{p}f}"

    for name in results:

        def g(*path: str, name: str = name) -> float | None:
            return _get(results, name, *path)

        lines.append(
            f"{name:<21}{f(g('context', 'mrr'), 8)}{f(g('context', 'r@1'), 6, 2)}"
            f"{f(g('context', 'r@5'), 6, 2)}{f(g('context', 'r@10'), 6, 2)}"
            f"{f(g('context', 'map'), 6)}{f(g('concept', 'mrr'), 8)}{f(g('concept', 'map'), 8)}"
            f"{f(g('multi', 'mrr'), 8)}{f(g('retention', 'r@10'), 9)}"
            f"{f(g('retention', 'drop'), 7)}{f(g('train_seconds', 'mean'), 8, 2)}"
        )
    return "\n".join(lines)


def format_targets(targets: dict[str, Any]) -> str:
    """The target check as lines: name, value, verdict."""
    lines = []
    for name, row in targets.items():
        value = "-" if row["value"] is None else f"{row['value']:.3f}"
        verdict = {True: "ok", False: "MISSED", None: "n/a"}[row["met"]]
        lines.append(f"{name:<28}{value:>8}  {verdict}")
    return "\n".join(lines)


def git_commit(root: Path = REPO_ROOT) -> dict[str, Any]:
    """HEAD commit of the repository and whether the working tree differs from it."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "app", "bench"],
            cwd=root, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return {"sha": None, "dirty": None}
    return {"sha": sha, "dirty": bool(dirty)}


def environment() -> dict[str, Any]:
    """Where the numbers were measured."""
    return {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} ({os.cpu_count()} CPUs)",
        "git": git_commit(),
    }


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Pretty JSON, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def plot(results: Results, path: Path, title: str) -> bool:
    """Grouped bars per method (context, concept-only, two-concept mRR; retention R@10)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib is a dev extra
        return False
    series = [
        ("context mRR", ("context", "mrr")),
        ("concept-only mRR", ("concept", "mrr")),
        ("two-concept mRR", ("multi", "mrr")),
        ("retention R@10", ("retention", "r@10")),
    ]
    names = list(results)
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(names)), 4.0))
    for k, (label, key) in enumerate(series):
        values = [_get(results, n, *key) for n in names]
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, [0.0 if v is None else v for v in values], width, label=label)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.legend(fontsize=8, ncols=2, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
