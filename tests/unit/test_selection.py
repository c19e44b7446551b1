"""Which merge serves a request: the default method falls back when it needs input statistics
an adapter lacks, and a method a tenant or request names never does."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from factories import random_factors, write_adapter, write_statistics
from loramerge.server.config import load_settings
from loramerge.server.domain import MergeChoice
from loramerge.server.registry import AdapterRegistry
from loramerge.server.selection import Selection, Selector
from loramerge.server.store import SqliteStore


@pytest.fixture
def selector(tmp_path: Path) -> Selector:
    """Default settings (regmean, falling back to tsvm + pico) over adapters a, b (with input
    statistics) and c (without)."""
    paths = {n: write_adapter(tmp_path / n, random_factors(i)) for i, n in enumerate("abc")}
    write_statistics(paths["a"], seed=1)
    write_statistics(paths["b"], seed=2)
    store = SqliteStore(tmp_path / "s.db")
    registry = AdapterRegistry(store, [tmp_path])
    registry.load_initial(paths)
    return Selector(load_settings(environ={}), store, registry)


NOT_SAID = MergeChoice()


def select(
    selector: Selector, preference: dict[str, float], choice: MergeChoice = NOT_SAID
) -> Selection:
    selection = asyncio.run(selector.select("", preference, choice))
    assert selection is not None
    return selection


def test_default_regmean_when_every_adapter_taking_part_has_statistics(selector: Selector) -> None:
    selection = select(selector, {"a": 1, "b": 2, "c": 0})
    assert (selection.spec.method, selection.spec.pico, selection.fallback_for) == (
        "regmean", False, ()
    )  # fmt: skip


def test_default_falls_back_and_names_the_adapters_without_statistics(
    selector: Selector, caplog: pytest.LogCaptureFixture
) -> None:
    selection = select(selector, {"a": 1, "c": 1})
    assert (selection.spec.method, selection.spec.pico) == ("tsvm", True)
    assert selection.fallback_for == ("c",)
    select(selector, {"b": 1, "c": 3})
    warnings = [r.getMessage() for r in caplog.records if "lack" in r.getMessage()]
    assert len(warnings) == 1 and "adapters c lack" in warnings[0]  # once per pool


def test_an_explicit_method_never_falls_back(selector: Selector) -> None:
    selection = select(selector, {"a": 1, "c": 1}, MergeChoice(method="regmean"))
    assert selection.spec.method == "regmean" and selection.fallback_for == ()
