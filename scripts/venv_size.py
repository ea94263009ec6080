"""How big a venv is for `make run` (runtime only) and for `make test` (with the dev extras).

Measured from one installed dev venv, without building a second one: the distributions that
`polar-search` needs (its requirements, followed transitively through the installed metadata),
with and without the `dev` extra, each summed from the files its RECORD lists. What no
distribution owns (the interpreter's links, pip's own files, caches) is counted in both.

    .venv/bin/python scripts/venv_size.py   # a table; bench/results/venv_size.json
"""

from __future__ import annotations

import json
import os
import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "polar-search"


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _size(dist: metadata.Distribution) -> int:
    total = 0
    for file in dist.files or []:
        path = Path(str(dist.locate_file(file)))
        if path.is_file() and not path.is_symlink():
            total += path.stat().st_size
    return total


def closure(dists: dict[str, metadata.Distribution], extras: set[str]) -> set[str]:
    """The installed distributions PACKAGE needs with `extras`, markers evaluated here."""
    seen: set[str] = set()
    todo: list[tuple[str, set[str]]] = [(_key(PACKAGE), extras)]
    while todo:
        name, wanted = todo.pop()
        dist = dists.get(name)
        if dist is None:
            continue
        new = name not in seen
        seen.add(name)
        for raw in dist.requires or []:
            req = Requirement(raw)
            envs = [{"extra": e} for e in wanted] or [{"extra": ""}]
            if req.marker and not any(req.marker.evaluate(env) for env in envs):
                continue
            child = _key(req.name)
            if new or req.extras:
                todo.append((child, set(req.extras)))
    return seen


def du(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            p = Path(dirpath) / f
            if not p.is_symlink():
                total += p.stat().st_size
    return total


def main() -> int:
    venv = Path(sys.prefix)
    dists = {_key(d.metadata["Name"]): d for d in metadata.distributions()}
    sizes = {name: _size(d) for name, d in dists.items()}
    whole = du(venv)
    unowned = whole - sum(sizes.values())
    runtime = closure(dists, set())
    dev = closure(dists, {"dev"})
    cuda = sum(s for n, s in sizes.items() if n.startswith(("nvidia-", "triton")) and n in runtime)
    rows = {
        "runtime (make run)": unowned + sum(sizes[n] for n in runtime),
        "dev (make install / make test)": unowned + sum(sizes[n] for n in dev),
        "this venv (du)": whole,
    }
    gb = 1024**3
    print(f"{'install':<32} {'GiB':>6}  distributions")
    counts = (len(runtime), len(dev), len(dists))
    for (label, size), count in zip(rows.items(), counts, strict=True):
        print(f"{label:<32} {size / gb:>6.2f}  {count}")
    print(f"of which CUDA libraries (nvidia-*, triton) in the runtime set: {cuda / gb:.2f} GiB")
    out = ROOT / "bench" / "results" / "venv_size.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "venv": str(venv.name),
                "bytes": rows,
                "cuda_bytes_in_runtime": cuda,
                "runtime_only": sorted(runtime),
                "dev_only": sorted(dev - runtime),
            },
            indent=2,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
