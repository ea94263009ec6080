"""PerVL benchmark: POLAR vs text-only, composed image+text and textual inversion.

Prints a table and writes bench/results/pervl_<dataset>.json and .png; also `polar bench pervl`.

    .venv/bin/python bench/pervl.py --dataset synthetic            # about 3 minutes on 2 CPUs
    .venv/bin/python bench/pervl.py --dataset synthetic --calibrate
    .venv/bin/python bench/pervl.py --help
"""

from __future__ import annotations

import sys

from app.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
