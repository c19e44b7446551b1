"""`loramerge osrm project` on the default adapters and `loramerge eval --pool` scoring the
projected pool next to the default one, at tiny sizes (the real rows: docs/osrm.md)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from loramerge.merge_engine import load_adapter
from loramerge.server.cli import main
from loramerge.server.defaults import DefaultAssets

pytestmark = pytest.mark.slow


def test_projected_default_pool_is_scored_as_its_own_rows(
    default_assets: DefaultAssets, tmp_path: Path
) -> None:
    pairs = default_assets.adapters.items()
    adapters = [arg for name, path in pairs for arg in ("--adapter", f"{name}={path}")]
    projected = tmp_path / "projected"
    assert main(["osrm", "project", *adapters, "--out", str(projected)]) == 0
    summary = json.loads((projected / "osrm_project.json").read_text())
    for name in default_assets.adapters:
        # the other tasks' inputs barely reach the projected adapter: most of it is dropped
        entry = summary["adapters"][name]
        assert entry["cross_talk_after"] < entry["cross_talk_before"]
        assert (projected / name / "calibration_prompts.jsonl").is_file()
        assert load_adapter(projected / name).modules

    config = tmp_path / "config.yaml"
    config.write_text(f"cache_dir: {default_assets.model_dir.parent.parent}\n")
    table = tmp_path / "table.json"
    code = main(
        ["eval", "--config", str(config), "--n", "1", "--validation-n", "1", "--methods", "ta",
         "--pool", f"projected={projected}", "--check-vllm", "0",
         "--results", str(tmp_path / "results"), "--doc", str(tmp_path / "quality.md"),
         "--plot", str(tmp_path / "quality.png"), "--json", str(table)]
    )  # fmt: skip
    assert code == 0
    rows = {row["label"]: row for row in json.loads(table.read_text())["rows"]}
    assert {"ta", "projected: ta", "projected: ta + pico", "projected: adapter add alone"} <= set(
        rows
    )
    assert rows["projected: ta"]["pool"] == "projected"
    assert rows["projected: ta"]["normalised_own"] is not None
    assert "normalised to own pool" in (tmp_path / "quality.md").read_text()


def test_project_with_stats_writes_the_projected_adapters_own_statistics(
    default_assets: DefaultAssets, tmp_path: Path
) -> None:
    pool = {}
    for name in ("add", "date"):  # copies with two calibration prompts each, to stay fast
        folder = pool[name] = tmp_path / "pool" / name
        shutil.copytree(default_assets.adapters[name], folder)
        (folder / "calibration_prompts.jsonl").write_text(
            '{"prompt": "What is 12 + 30?"}\n{"prompt": "Write the date 3 May 1999 as DD/MM/YY."}\n'
        )
    adapters = [arg for name, path in pool.items() for arg in ("--adapter", f"{name}={path}")]
    out = tmp_path / "projected"
    code = main(
        ["osrm", "project", *adapters, "--stats", "--model", str(default_assets.model_dir),
         "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    for name in pool:
        statistics = load_adapter(out / name).statistics
        assert statistics is not None and statistics.prompts == 2
