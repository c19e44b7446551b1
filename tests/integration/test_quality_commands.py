"""`loramerge tune` and `loramerge eval` end to end on the default model and adapters, at tiny
sizes (the real table is `make quality`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loramerge.merge_engine import load_adapter
from loramerge.server.cli import main
from loramerge.server.defaults import DefaultAssets
from loramerge.server.defaults.quality import ROUTE_FEATURES, ROUTE_STEPS, ROUTE_TEMPERATURES

pytestmark = pytest.mark.slow


def test_tune_distills_a_merge_into_a_peft_adapter(
    default_assets: DefaultAssets, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "What is 12 + 30?"}\nReverse the order of these words: a b c\n')
    pairs = default_assets.adapters.items()
    adapters = [arg for n, p in pairs for arg in ("--adapter", f"{n}={p}")]
    out = tmp_path / "tuned"
    code = main(
        ["tune", *adapters, "--model", str(default_assets.model_dir), "--prompts", str(prompts),
         "--steps", "2", "--batch-size", "2", "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    summary = json.loads((out / "tune.json").read_text())
    assert summary["prompts"] == 2 and len(summary["losses"]) == 2
    assert all(loss >= 0 for loss in summary["losses"])  # a KL divergence
    tuned = load_adapter(out)
    assert set(tuned.modules) == set(load_adapter(default_assets.adapters["add"]).modules)


def test_eval_writes_the_table_and_plot(
    default_assets: DefaultAssets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"cache_dir: {default_assets.model_dir.parent.parent}\n")
    doc, plot, table = tmp_path / "quality.md", tmp_path / "quality.png", tmp_path / "table.json"
    code = main(
        ["eval", "--config", str(config), "--n", "1", "--validation-n", "1", "--methods", "ta",
         "--results", str(tmp_path / "results"), "--doc", str(doc), "--plot", str(plot),
         "--json", str(table), "--check-vllm", "0"]
    )  # fmt: skip
    assert code == 0
    rows = {row["label"]: row for row in json.loads(table.read_text())["rows"]}
    assert {"base model", "ta", "ta + pico", "ta + svc"} <= set(rows)
    assert rows["adapter add alone"]["accuracy"]["add"] in (0.0, 1.0)
    assert "| ta + pico |" in doc.read_text()
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_eval_scores_the_router_rows_request_by_request(
    default_assets: DefaultAssets, tmp_path: Path
) -> None:
    """Routed rows: each item gets the merge of its own route; on the default tasks the router
    picks each item's own adapter, so router + ta scores exactly what the adapters alone do."""
    config = tmp_path / "config.yaml"
    config.write_text(f"cache_dir: {default_assets.model_dir.parent.parent}\n")
    table = tmp_path / "table.json"
    code = main(
        ["eval", "--config", str(config), "--n", "2", "--validation-n", "1", "--routed",
         "--methods", "router + ta", "--results", str(tmp_path / "results"), "--doc",
         str(tmp_path / "quality.md"), "--plot", str(tmp_path / "quality.png"), "--json",
         str(table), "--check-vllm", "0"]
    )  # fmt: skip
    assert code == 0
    rows = {row["label"]: row for row in json.loads(table.read_text())["rows"]}
    assert "router + ta" in rows and "router + regmean" not in rows
    routed = rows["router + ta"]
    grid = len(ROUTE_FEATURES) * len(ROUTE_TEMPERATURES) * len(ROUTE_STEPS)
    assert len(routed["tried"]) == grid  # every point of the router's grid, on validation
    for task, accuracy in routed["accuracy"].items():
        assert accuracy == rows[f"adapter {task} alone"]["accuracy"][task]


def test_stats_writes_statistics_that_regmean_merges_with(
    default_assets: DefaultAssets, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`loramerge stats` on a copy of an adapter, then a RegMean merge of a pool using it."""
    import shutil

    from loramerge.merge_engine import STATISTICS_FILE, AdapterPool, MergeSpec, merge

    adapter = tmp_path / "add"
    shutil.copytree(default_assets.adapters["add"], adapter)
    (adapter / STATISTICS_FILE).unlink()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is 12 + 30?\nWhat is 71 + 18?\n")
    code = main(
        ["stats", "--adapter", str(adapter), "--prompts", str(prompts), "--answer-tokens", "4",
         "--model", str(default_assets.model_dir), "--device", "cpu"]
    )  # fmt: skip
    assert code == 0
    assert "30 input sites" in capsys.readouterr().out
    statistics = load_adapter(adapter).statistics
    assert statistics is not None and statistics.prompts == 2
    pool = AdapterPool.load({"add": adapter, "date": default_assets.adapters["date"]})
    result = merge(pool, {"add": 1, "date": 1}, MergeSpec("regmean", pico=False), device="cpu")
    assert result.rank == 32 and result.report.method == "regmean"
