"""The merge-quality table's logic without a model: prompts files, statistics, candidates, and the
Markdown block spliced into docs/quality.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from loramerge.server.defaults.quality import (
    Scores,
    Split,
    Table,
    Variant,
    candidates,
    make_row,
    merge_variants,
    normalised,
    normalised_interval,
    pool_size_sweep,
    wilson,
)
from loramerge.server.defaults.quality_report import BEGIN, END, sweep_markdown, write_markdown
from loramerge.server.quality_cli import read_prompts

SPLIT = Split("test", 1234, 4)


def scores(label: str, **items: tuple[bool, ...]) -> Scores:
    return Scores(Variant(label, "base"), SPLIT, items)


def test_prompts_file_accepts_jsonl_messages_and_plain_lines(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        '{"prompt": "What is 1 + 2?"}\n'
        "\n"
        '{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]}\n'
        "plain line\n"
    )
    assert read_prompts(path) == ["What is 1 + 2?", "hi", "plain line"]


@pytest.mark.parametrize(
    ("text", "message"),
    [('{"prompt": 3}\n', "prompts.jsonl:1"), ("{oops\n", "invalid JSON"), ("\n", "no prompts")],
)
def test_bad_prompts_file_names_the_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text(text)
    with pytest.raises(SystemExit, match=message):
        read_prompts(path)


def test_wilson_interval_contains_the_estimate_and_narrows_with_n() -> None:
    low, high = wilson(50, 100)
    assert low < 0.5 < high
    assert wilson(500, 1000)[1] - wilson(500, 1000)[0] < high - low
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0


def test_normalised_accuracy_divides_by_the_own_adapter_on_the_same_items() -> None:
    own = {
        "add": scores("own add", add=(True, True, True, True)),
        "date": scores("own date", date=(True, True, False, False)),
    }
    merged = scores("merge", add=(True, True, False, False), date=(True, False, False, False))
    assert normalised(merged, own) == pytest.approx((0.5 + 0.5) / 2)
    low, high = normalised_interval(merged, own, samples=400)
    assert low <= 0.5 <= high


def test_pico_variants_sweep_no_scale_since_compensation_cancels_it() -> None:
    variants = {v.label: v for v in merge_variants()}
    assert len(candidates(variants["ta + pico"])) == 1
    assert {dict(c.params).get("scaling") for c in candidates(variants["ta"])} >= {0.25, 1.0}
    assert {dict(c.params).get("mix") for c in candidates(variants["svd_cur + pico"])} >= {None}
    assert "core[tsvm] + pico" in variants and "tsvm + svc" in variants


def test_markdown_block_is_replaced_in_place(tmp_path: Path) -> None:
    own = {"add": scores("adapter add alone", add=(True, True, True, False))}
    base = scores("base model", add=(False, False, False, False))
    row = make_row(scores("merge", add=(True, False, True, False)), own, base)
    table = Table(
        validation=SPLIT,
        test=SPLIT,
        base=make_row(base, own, base),
        adapters=(make_row(own["add"], own, base),),
        merges=(row,),
        tuned=(),
    )
    doc = tmp_path / "quality.md"
    doc.write_text(f"# Title\n\nbefore\n\n{BEGIN}\nstale block\n{END}\n\nafter\n")
    write_markdown(table, doc)
    text = doc.read_text()
    assert text.startswith("# Title") and text.rstrip().endswith("after")
    assert "stale block" not in text and text.count(BEGIN) == 1
    assert "**0.67**" in text  # 2 of the own adapter's 3 correct items


class _FakeScorer:
    """Scores a merge of a subset by a rule of its parameters (a unit test of the sweep's
    bookkeeping only; the real scorer runs in tests/integration/test_quality_commands.py)."""

    def __init__(self) -> None:
        self.pool = type("Pool", (), {"names": ("add", "date", "reverse")})()

    def score(self, variant: Variant, split: Split) -> Scores:
        if variant.source == "adapter":
            return scores(variant.label, **{t: (True, True) for t in self.pool.names})
        # λ = 0.5 wins on pairs, λ = 1 on the triple; tasks outside the subset score 0
        good = dict(variant.params).get("scaling") == (0.5 if len(variant.subset) == 2 else 1.0)
        hits = (True, good)
        return scores(
            variant.label,
            **{t: hits if t in variant.subset else (False, False) for t in self.pool.names},
        )


def test_pool_size_sweep_averages_the_best_candidate_per_subset() -> None:
    ta = next(v for v in merge_variants() if v.label == "ta")
    sweep = pool_size_sweep(_FakeScorer(), SPLIT, [ta])  # type: ignore[arg-type]
    pairs, triple = sweep["ta"]
    assert (pairs.size, pairs.subsets, triple.size, triple.subsets) == (2, 3, 3, 1)
    assert pairs.mean == pytest.approx(1.0) and triple.mean == pytest.approx(1.0)
    assert pairs.winners == {"scaling=0.5": 3} and triple.winners == {"scaling=1.0": 1}
    block = sweep_markdown(sweep, SPLIT)
    assert "| ta | **1.00** (3 subsets: scaling=0.5 ×3)" in block


def test_regmean_sweeps_its_off_diagonal_weight() -> None:
    regmean = next(v for v in merge_variants() if v.label == "regmean")
    values = {dict(c.params).get("off_diagonal") for c in candidates(regmean)}
    assert {None, 0.5, 1.0} <= values
