"""The tenant-scale benchmark's results: ratios, goals, the JSON file and the plot (no engine)."""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def rep(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("tenant_scale_report")


def run(rep: ModuleType, tokens_per_second: float, ttfts: list[float], **counters: Any) -> Any:
    return rep.RunResult(
        seconds=10.0,
        tokens=int(tokens_per_second * 10),
        ttfts=ttfts,
        latencies=ttfts,
        waits=[0.0] * len(ttfts),
        **counters,
    )


def point(
    rep: ModuleType,
    tenants: int,
    ours: list[float],
    plain: list[float],
    ahead: list[float] | None = None,
) -> Any:
    """Rounds with the given throughputs; loramerge's TTFTs are 1.5× plain's in every round
    (merged ahead: 1.1×)."""
    counters = {
        "merges": 4.0,
        "merged_hits": 6.0,
        "merged_misses": 2.0,
        "calibration_hits": 3.0,
        "calibration_misses": 1.0,
        "evictions": 1.0,
        "merge_seconds": 0.1,
        "export_seconds": 0.2,
        "load_seconds": 0.3,
        "evict_seconds": 0.4,
    }
    return rep.Point(
        tenants,
        8,
        5,
        {
            "loramerge": [run(rep, t, [1.5, 3.0], **counters) for t in ours],
            "ahead": [run(rep, t, [1.1, 2.2], **counters) for t in ahead or []],
            "plain": [run(rep, t, [1.0, 2.0]) for t in plain],
            "base": [run(rep, 100.0, [0.5, 1.0]) for _ in plain],
        },
    )


def test_percentile_is_nearest_rank(rep: ModuleType) -> None:
    values = [float(v) for v in range(100, 0, -1)]
    assert rep.percentile(values, 0.5) == 50.0
    assert rep.percentile(values, 0.99) == 99.0
    assert rep.percentile(values[:32], 0.99) == 100.0  # fewer than 100 values: the largest


def test_ratio_is_the_median_of_per_round_ratios(rep: ModuleType) -> None:
    p = point(rep, 8, ours=[9.0, 20.0, 10.0], plain=[10.0, 10.0, 10.0])
    assert p.ratio("throughput") == pytest.approx(1.0)  # rounds: 0.9, 2.0, 1.0
    assert p.ratio("ttft_p99") == pytest.approx(1.5)


def test_tables_and_goals(rep: ModuleType) -> None:
    low = point(rep, 8, ours=[10.0, 10.0], plain=[10.0, 10.0])
    high = point(rep, 512, ours=[5.0, 5.0], plain=[10.0, 10.0])
    serving = rep.serving_table([low, high]).splitlines()
    assert len(serving) == 2 + 3 * 2  # header, rule, three systems per T
    assert all(line.count("|") == serving[0].count("|") for line in serving)
    assert "**0.50**" in serving[5]  # loramerge/plain throughput at T=512
    internals = rep.loramerge_table([low, high]).splitlines()
    assert "| 8 | loramerge, on demand | 5 / 8 | 4 | 0.40 | 0.75 | 0.75 |" in internals[2]
    low.runs["loramerge"] = [  # RegMean: nothing calibrated
        dataclasses.replace(r, calibration_hits=0.0, calibration_misses=0.0)
        for r in low.runs["loramerge"]
    ]
    internals = rep.loramerge_table([low]).splitlines()
    assert "| 0.75 | – |" in internals[2]  # not nan
    goals = rep.goals([low, high]).splitlines()
    assert "1.00× (met" in goals[0] and "1.50× (**missed**" in goals[0]
    assert "0.50× (**missed**" in goals[1]
    assert "at T=512 / T=8: 0.50× (**missed**" in goals[2]


def test_merged_ahead_is_a_system_of_its_own(rep: ModuleType) -> None:
    low = point(rep, 8, ours=[10.0, 10.0], plain=[10.0, 10.0], ahead=[9.6, 9.8])
    high = point(rep, 512, ours=[5.0, 5.0], plain=[10.0, 10.0], ahead=[9.0, 10.0])
    assert low.ratio("throughput", "ahead") == pytest.approx(0.97)
    assert low.ratio("ttft_p99", "ahead") == pytest.approx(1.1)
    serving = rep.serving_table([low, high]).splitlines()
    assert len(serving) == 2 + 4 * 2  # four systems per T
    assert "| 512 | loramerge, merged ahead |" in serving[7] and "**0.95**" in serving[7]
    goals = rep.goals([low, high]).splitlines()
    assert goals[1].startswith("* T=8, loramerge, merged ahead: throughput / plain 0.97× (met")
    assert "1.10× (met" in goals[1]
    assert any("merged ahead throughput at T=512 / T=8: 0.98× (met" in g for g in goals)
    assert len(rep.rounds_table([high]).splitlines()) == 2 + 2 * 2  # both of ours, two rounds
    old = point(rep, 8, ours=[10.0], plain=[10.0])  # measured before merging ahead existed
    assert old.systems == ["loramerge", "plain", "base"] and old.ours == ["loramerge"]


def test_results_round_trip_and_plot(rep: ModuleType, tmp_path: Path) -> None:
    args = type("Args", (), dict(requests=8, tokens=4, concurrency=2, rounds=2, seed=0))()
    results = rep.Results()
    for tenants in (64, 8):
        results.points[tenants] = point(rep, tenants, [9.0, 11.0], [10.0, 10.0]).to_json(args)
    path = tmp_path / "results.json"
    rep.save_results(path, results)
    loaded = rep.load_results(path)
    assert sorted(loaded.points) == [8, 64]
    again = rep.Point.from_json(loaded.points[8])
    assert again == rep.Point.from_json(results.points[8])
    plot = tmp_path / "plot.png"
    rep.report(loaded, plot)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rounds_compare_and_time_tables(rep: ModuleType) -> None:
    before = point(rep, 64, ours=[9.0, 9.5], plain=[10.0, 10.0])
    after = point(rep, 64, ours=[10.0, 9.8], plain=[10.0, 10.0])
    rounds = rep.rounds_table([after]).splitlines()
    assert len(rounds) == 2 + 2  # one row per round
    assert rounds[3] == (
        "| 64 | loramerge, on demand | 2 | 9.8 | 10.0 | 100.0 | 0.98 | 3.00 / 2.00 | 1.50 |"
    )
    compare = rep.compare_table([before], [after]).splitlines()
    assert compare[2].startswith("| 64 | 0.93 → 0.99 | 1.50 → 1.50 |")
    assert rep.compare_table([], [after]).count("\n") == 1  # no earlier point: header only
    assert rep.time_table([after]).count("\n") == 1  # runs without per-request timings: none
    timed = dataclasses.replace(
        after.runs["loramerge"][0], starts=[1.0, 2.0], missed=[True, False], add_lora=[0.3]
    )
    plain = dataclasses.replace(after.runs["plain"][0], starts=[0.5, 1.5])
    with_times = rep.Point(64, 8, 5, {"loramerge": [timed], "plain": [plain], "base": []})
    rows = rep.time_table([with_times]).splitlines()
    assert rows[2] == (
        "| 64 | loramerge, on demand | 1 | 0.00 / 0.00 | 1.00 / 2.00 | 75 | 0.30 / 0.30 |"
    )
    assert rows[3] == "| 64 | plain vLLM | – | – | 0.50 / 1.50 | – | – |"
