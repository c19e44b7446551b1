"""Without the `prepare` extra (the serving images), the server serves a configured model and
names the missing extra only when the embedded defaults are asked for."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from loramerge.server.app import resolve_assets
from loramerge.server.config import load_settings
from loramerge.server.defaults import PrepareExtraMissingError


@pytest.fixture
def without_peft(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if peft (a `prepare` dependency) were not installed."""
    monkeypatch.setitem(sys.modules, "peft", None)
    for module in ("loramerge.server.defaults.train", "loramerge.server.defaults.model"):
        monkeypatch.delitem(sys.modules, module, raising=False)


def test_the_default_pool_names_the_missing_extra(without_peft: None, tmp_path: Path) -> None:
    settings = load_settings(environ={}, overrides={"cache_dir": str(tmp_path)})
    with pytest.raises(PrepareExtraMissingError) as missing:
        resolve_assets(settings)
    message = str(missing.value)
    assert "loramerge[prepare]" in message and "'peft'" in message
    assert "use_default_pool: false" in message
    assert not any(tmp_path.iterdir()), "nothing half-prepared is left behind"


def test_a_configured_model_and_adapters_need_no_extra(without_peft: None, tmp_path: Path) -> None:
    adapter = tmp_path / "adapters" / "math"
    settings = load_settings(
        environ={},
        overrides={
            "engine": {"model": str(tmp_path / "model")},
            "adapters": {"use_default_pool": False, "paths": {"math": str(adapter)}},
        },
    )
    assert resolve_assets(settings) == (tmp_path / "model", {"math": adapter})
    assert "loramerge.server.defaults.train" not in sys.modules
