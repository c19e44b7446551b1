"""The `loramerge` command's offline subcommands on real adapter files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from factories import random_factors, write_adapter
from loramerge.merge_engine import load_adapter
from loramerge.server.cli import main


@pytest.fixture
def adapter_args(tmp_path: Path) -> list[str]:
    paths = {name: write_adapter(tmp_path / name, random_factors(i)) for i, name in enumerate("ab")}
    return [arg for name, path in paths.items() for arg in ("--adapter", f"{name}={path}")]


def test_merge_writes_a_peft_adapter_and_prints_the_report(
    adapter_args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "merged"
    code = main(
        ["merge", *adapter_args, "--preference", "a=2", "--preference", "b=1", "--method", "ties",
         "--param", "density=0.5", "--rank", "4", "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "ties" and report["rank"] == 4
    assert report["params"]["density"] == 0.5
    assert report["preference"] == {"a": pytest.approx(2 / 3), "b": pytest.approx(1 / 3)}
    assert load_adapter(out).modules


def test_diagnose_prints_pool_and_merge_statistics(
    adapter_args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["diagnose", *adapter_args, "--preference", "a=1", "--preference", "b=1"]) == 0
    output = json.loads(capsys.readouterr().out)
    assert output["pool"]["adapters"] == ["a", "b"]
    assert "modules" not in output["pool"]
    assert set(output["merged"]) == {"with_pico", "without_pico"}


def test_errors_are_reported_without_a_traceback(
    adapter_args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["merge", *adapter_args, "--preference", "zzz=1", "--out", str(tmp_path / "x")])
    assert code == 2
    assert "preference['zzz']: unknown adapter" in capsys.readouterr().err


def test_methods_lists_every_method_with_its_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    for name in ("ta", "ties", "dare_linear", "dare_ties", "tsvm", "knots_ties", "core", "svd_cur"):
        assert f"\n{name} " in f"\n{text}"
    assert "'density': 0.2" in text and "dense, then SVD truncation" in text


def test_diagnose_plot_draws_the_pico_figures(
    adapter_args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["diagnose", *adapter_args, "--plot", str(tmp_path / "figures")]) == 0
    plots = [Path(p) for p in json.loads(capsys.readouterr().out)["plots"]]
    assert {p.name for p in plots} == {"overlap.png", "effective_rank.png", "shared_energy.png"}
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in plots)
