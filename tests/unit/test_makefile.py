"""`make run` installs what serving needs; `make test` adds the dev tools (dry runs of make)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _plan(target: str, venv: Path) -> str:
    if shutil.which("make") is None:
        pytest.fail("make is missing")
    out = subprocess.run(
        ["make", "-n", target, f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_make_run_installs_no_dev_tools(tmp_path):
    plan = _plan("run", tmp_path / "venv")
    assert "pip install -q -e ." in plan
    assert "[dev" not in plan, plan
    assert "polar serve" in plan


def test_make_test_installs_the_dev_tools(tmp_path):
    plan = _plan("test", tmp_path / "venv")
    # The dev tools, and the onnx extra so the ONNX Runtime engine's tests run for real.
    assert "pip install -q -e '.[dev,onnx]'" in plan
    assert "pytest" in plan


def test_the_torch_step_says_in_one_line_when_cpu_wheels_cannot_be_had(tmp_path):
    plan = _plan("install-runtime", tmp_path / "venv")
    said = [line for line in plan.splitlines() if "CPU-only wheels cannot be had" in line]
    assert len(said) == 1, plan
