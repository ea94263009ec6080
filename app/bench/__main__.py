"""`python -m app.bench {pervl,regions,multi} ...` (app.bench.cli)."""

import sys

from app.bench.cli import bench_main

sys.exit(bench_main())
