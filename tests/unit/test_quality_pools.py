"""The quality table with other pools of the same tasks (e.g. OSRM-trained adapters): each
pool's adapters alone, its merges normalised by the default adapters and by its own, cache keys
by content, and the Markdown columns."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest
import torch

from factories import random_factors, write_adapter
from loramerge.merge_engine import AdapterPool, merge
from loramerge.server.defaults.quality import (
    Scorer,
    Scores,
    Split,
    Variant,
    build_table,
    in_pool,
    merge_variants,
)
from loramerge.server.defaults.quality_report import markdown

SPLIT = Split("test", 1234, 4)
TASKS = ("add", "date")


def make_pool(root: Path, seed: int) -> AdapterPool:
    return AdapterPool.load(
        {t: write_adapter(root / t, random_factors(seed + i)) for i, t in enumerate(TASKS)}
    )


class TableScorer(Scorer):
    """A real Scorer (pools, keys, merges for the report) whose items come from a table of
    accuracies per (pool, kind) instead of a model."""

    ACCURACY: ClassVar[dict[tuple[str, str], float]] = {
        ("default", "adapter"): 1.0,  # each adapter alone: 4/4 on its task, 0 elsewhere
        ("osrm", "adapter"): 0.5,  # 2/4 on its task
        ("default", "merge"): 0.25,
        ("osrm", "merge"): 0.5,
    }

    def score(self, variant: Variant, split: Split) -> Scores:
        items = {}
        for task in TASKS:
            silent = variant.source == "base" or variant.adapter not in (None, task)
            hits = 0 if silent else round(4 * self.ACCURACY[variant.pool, variant.source])
            items[task] = tuple(i < hits for i in range(4))
        return Scores(variant, split, items)


@pytest.fixture
def scorer(tmp_path: Path) -> TableScorer:
    default = make_pool(tmp_path / "default", 0)
    return TableScorer(tmp_path / "model", default, tmp_path / "cache", None,
                       {"osrm": make_pool(tmp_path / "osrm", 10)})  # fmt: skip


def test_pool_merges_are_normalised_by_the_default_and_by_their_own_adapters(
    scorer: TableScorer,
) -> None:
    ta = [v for v in merge_variants() if v.label in ("ta", "ta + pico")]
    variants = ta + [in_pool(v, "osrm") for v in ta]
    table = build_table(scorer, SPLIT, SPLIT, variants)
    rows = {row.variant.label: row for row in table.rows}
    assert {"osrm: adapter add alone", "osrm: ta", "osrm: ta + pico"} <= set(rows)
    assert rows["osrm: ta"].normalised == pytest.approx(0.5)  # 2/4 over the default's 4/4
    assert rows["osrm: ta"].normalised_own == pytest.approx(1.0)  # 2/4 over its own 2/4
    assert rows["ta"].normalised == rows["ta"].normalised_own == pytest.approx(0.25)
    alone = rows["osrm: adapter add alone"]
    assert alone.accuracy == {"add": 0.5, "date": 0.0}
    assert alone.normalised == pytest.approx(0.25) and alone.normalised_own == pytest.approx(0.5)
    assert table.best().variant.label.startswith("osrm: ta")
    text = markdown(table)
    assert "normalised to own pool" in text
    assert "| osrm: ta | 50 [" in text and "| 1.00 |" in text


def test_markdown_has_no_pool_column_without_pools(scorer: TableScorer) -> None:
    table = build_table(scorer, SPLIT, SPLIT, [v for v in merge_variants() if v.label == "ta"])
    assert not table.has_pools and "normalised to own pool" not in markdown(table)


def test_cache_keys_follow_the_pools_content_not_its_name(
    scorer: TableScorer, tmp_path: Path
) -> None:
    ta = next(v for v in merge_variants() if v.label == "ta")
    assert scorer._key(ta, SPLIT) != scorer._key(in_pool(ta, "osrm"), SPLIT)
    scorer.pools["same"] = scorer.pool  # the default adapters under another name
    assert scorer._key(ta, SPLIT) == scorer._key(in_pool(ta, "same"), SPLIT)
    with pytest.raises(ValueError, match="no pool 'missing'"):
        scorer.updates(in_pool(ta, "missing"))
    osrm = scorer.pools["osrm"]
    merged = scorer.updates(in_pool(ta, "osrm"))
    expected = merge(osrm, dict.fromkeys(osrm.names, 1.0), ta.spec(), device="cpu").modules
    for key, module in merged.items():
        assert torch.equal(
            module.lora_b @ module.lora_a, expected[key].lora_b @ expected[key].lora_a
        )
