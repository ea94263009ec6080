"""The runner, the report and the CLI end to end on a tiny model and a tiny synthetic split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.bench import cli, report
from app.bench.runner import BenchSettings, embed_dataset, run_methods
from app.bench.synthetic import SyntheticConfig, build_synthetic
from app.cli.main import build_parser
from app.ml.model import ClipBundle

SMALL = SyntheticConfig(concepts=2, context_scenes=1, pair_scenes=1, background=3)
TINY_FLAGS = ["--concepts", "2", "--background", "3", "--steps", "20", "--no-plot"]


def test_run_methods_reports_every_query_kind(tiny: ClipBundle) -> None:
    ds = build_synthetic("test", SMALL)
    emb = embed_dataset(tiny, ds)
    assert emb.pool.shape == (len(ds.pool), tiny.embed_dim)
    out = run_methods(tiny, ds, ["text", "polar"], BenchSettings(lam=0.0, steps=20), emb)
    for name in ("text", "polar"):
        r = out[name]
        assert {"context", "concept", "multi", "retention", "train_seconds"} <= set(r)
        assert 0 < r["context"]["mrr"] <= 1 and r["multi"]["queries"] == 1
    assert out["text"]["retention"]["drop"] == 0.0  # text-only never changes the model
    assert out["polar"]["train_seconds"]["mean"] > 0
    with pytest.raises(ValueError, match="unknown methods"):
        run_methods(tiny, ds, ["nope"], BenchSettings(lam=0.0), emb)


def test_targets_check() -> None:
    results = {
        "text": {"context": {"mrr": 0.1}},
        "composed": {"context": {"mrr": 0.6}},
        "polar": {"context": {"mrr": 0.7}, "multi": {"mrr": 0.5}, "retention": {"drop": 0.01}},
    }
    t = report.check_targets(results, "polar")
    assert t["context_mrr_min"]["met"] and t["beats_composed"]["met"]
    assert t["context_gain_over_text_min"]["value"] == pytest.approx(0.6)
    assert t["retention_drop_max"]["met"]
    assert t["multi_over_single_min"]["met"] is False  # 0.5 / 0.7 < 0.8
    assert report.check_targets(results, "missing")["context_mrr_min"]["met"] is None
    assert "MISSED" in report.format_targets(t)
    assert "polar" in report.format_table(results)


def test_choose_lam_respects_the_retention_budget() -> None:
    rows = [
        {"lam": 0.0, "context_mrr": 0.9, "retention_drop": 0.08},
        {"lam": 0.01, "context_mrr": 0.7, "retention_drop": 0.02},
        {"lam": 0.1, "context_mrr": 0.3, "retention_drop": 0.0},
    ]
    assert cli.choose_lam(rows, 0.03) == 0.01
    assert cli.choose_lam(rows, 0.1) == 0.0
    assert cli.choose_lam(rows, -1.0) == 0.1  # nothing fits: the smallest drop
    near = [
        {"lam": 0.001, "context_mrr": 0.677, "retention_drop": 0.018},
        {"lam": 0.003, "context_mrr": 0.675, "retention_drop": 0.015},
    ]
    assert cli.choose_lam(near, 0.02) == 0.003  # near-ties go to the stronger regulariser


def test_cli_writes_results(
    tiny: ClipBundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "load_model", lambda _args: (tiny, "tiny.safetensors"))
    flags = [*TINY_FLAGS, "--methods", "text,composed,polar", "--out", str(tmp_path)]
    assert cli.main(["--dataset", "synthetic", *flags]) == 0
    doc = json.loads((tmp_path / "pervl_synthetic.json").read_text())
    assert set(doc["methods"]) == {"text", "composed", "polar"}
    assert doc["model"]["id"] == tiny.fingerprint.model_id
    assert doc["settings"]["steps"] == 20 and doc["settings"]["lam"] == tiny.default_lam
    assert doc["dataset"]["pool"] == 2 * 3 * 4 + 1 * 2 * 4 + 3  # default scenes per concept
    assert doc["default_method"] == "polar_multi_regions"  # not run here: its targets are n/a
    assert doc["dataset"]["region_embed_seconds"] == {}  # no region method ran
    assert doc["targets"]["context_mrr_min"]["met"] is None
    assert "sha" in doc["environment"]["git"]


def test_cli_calibrate_writes_default_lam(
    tiny: ClipBundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "load_model", lambda _args: (tiny, str(tmp_path / "w.safetensors")))
    polar_json = tmp_path / "polar.json"
    polar_json.write_text(json.dumps({"default_lam": 0.5, "other": 1}))
    flags = [
        *TINY_FLAGS,
        "--calibrate",
        "--lams",
        "0,0.1",
        "--max-drop",
        "1",
        "--out",
        str(tmp_path),
    ]
    assert cli.main(flags) == 0
    doc = json.loads(polar_json.read_text())
    assert doc["other"] == 1 and doc["default_lam"] in (0.0, 0.1)
    assert [r["lam"] for r in doc["calibration"]["grid"]] == [0.0, 0.1]
    assert doc["calibration"]["dataset"] == "synthetic/val"


def test_polar_cli_forwards_to_the_benchmark(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    monkeypatch.setattr(cli, "main", lambda argv: seen.append(list(argv)) or 0)
    args = build_parser().parse_args(["bench", "pervl", "--dataset", "synthetic", "--lam", "0.1"])
    assert args.func(args) == 0
    assert seen == [["--dataset", "synthetic", "--lam", "0.1"]]
