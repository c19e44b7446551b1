"""Input statistics files: round trip, validation errors that name the file and tensor, and
what a pool does when RegMean needs statistics an adapter lacks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from factories import module_names, random_factors, write_adapter, write_statistics
from loramerge.merge_engine import (
    STATISTICS_FILE,
    AdapterFormatError,
    AdapterPool,
    InvalidAdapterTensorError,
    MergeSpec,
    MissingStatisticsError,
    load_adapter,
    merge,
)


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    return write_adapter(tmp_path / "math", random_factors(1))


def rewrite(path: Path, tensors: dict[str, torch.Tensor] | None = None, **metadata: object) -> None:
    """Rewrite the statistics file with other tensors and/or metadata fields."""
    header = json.loads(path.read_bytes()[8 : 8 + int.from_bytes(path.read_bytes()[:8], "little")])
    meta = json.loads(header["__metadata__"]["loramerge"]) | metadata
    save_file(tensors or load_file(path), str(path), metadata={"loramerge": json.dumps(meta)})


def test_round_trip_shares_one_site_per_layer(adapter_dir: Path) -> None:
    path = write_statistics(adapter_dir, seed=3, tokens=32)
    assert path == adapter_dir / STATISTICS_FILE
    statistics = load_adapter(adapter_dir).statistics
    assert statistics is not None
    assert len(statistics.moments) == 3  # q_proj and v_proj of a layer read the same input
    q, v = (f"base_model.model.model.layers.1.self_attn.{k}" for k in ("q_proj", "v_proj"))
    assert statistics.moment(q) is statistics.moment(v)
    assert statistics.tokens == 32
    moment = statistics.moment(q)
    assert moment.shape == (24, 24) and torch.allclose(moment, moment.T)
    assert bool((torch.linalg.eigvalsh(moment.double()) > -1e-6).all())


def test_statistics_change_the_fingerprint(adapter_dir: Path) -> None:
    before = load_adapter(adapter_dir).fingerprint
    write_statistics(adapter_dir, seed=3)
    with_statistics = load_adapter(adapter_dir).fingerprint
    write_statistics(adapter_dir, seed=4)
    assert len({before, with_statistics, load_adapter(adapter_dir).fingerprint}) == 3


def test_missing_module_names_the_file(adapter_dir: Path) -> None:
    path = write_statistics(adapter_dir, seed=3)
    modules = {m: 0 for m in module_names()[:-1]}
    rewrite(path, modules=modules)
    with pytest.raises(AdapterFormatError, match=r"input_statistics\.safetensors.*no statistics"):
        load_adapter(adapter_dir)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.update({"site.0.moment": torch.zeros(24, 23)}), "square moment"),
        (lambda t: t.update({"site.1.mean": torch.full((24,), float("nan"))}), "NaN"),
        (lambda t: t.pop("site.2.mean"), "missing"),
        (lambda t: t.update({"site.0.moment": torch.zeros(16, 16), "site.0.mean": torch.zeros(16)}),
         "reads 24 features"),
    ],
    ids=["not-square", "nan", "missing-tensor", "wrong-width"],
)  # fmt: skip
def test_bad_tensors_name_the_tensor(adapter_dir: Path, change: object, message: str) -> None:
    path = write_statistics(adapter_dir, seed=3)
    tensors = load_file(path)
    change(tensors)  # type: ignore[operator]
    rewrite(path, tensors)
    with pytest.raises(InvalidAdapterTensorError, match=message) as raised:
        load_adapter(adapter_dir)
    assert raised.value.path == path and raised.value.tensor is not None


@pytest.mark.parametrize(
    "metadata", [{"format": 2}, {"tokens": 0}, {"modules": {"x": -1}}, {"modules": [1]}]
)
def test_bad_metadata_is_refused(adapter_dir: Path, metadata: dict[str, object]) -> None:
    path = write_statistics(adapter_dir, seed=3)
    rewrite(path, **metadata)
    with pytest.raises(AdapterFormatError, match=str(path)):
        load_adapter(adapter_dir)


def test_corrupt_file_is_refused(adapter_dir: Path) -> None:
    (adapter_dir / STATISTICS_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(AdapterFormatError, match="not a readable safetensors"):
        load_adapter(adapter_dir)


def test_regmean_names_every_adapter_without_statistics(tmp_path: Path) -> None:
    paths = [write_adapter(tmp_path / n, random_factors(i)) for i, n in enumerate("abc")]
    write_statistics(paths[0], seed=1)
    pool = AdapterPool.load(paths)
    with pytest.raises(MissingStatisticsError) as raised:
        merge(pool, {"a": 1, "b": 1, "c": 1}, MergeSpec("regmean", pico=False))
    assert raised.value.adapters == ("b", "c")
    assert "loramerge stats" in str(raised.value)
    # adapters without statistics that take no part do not matter; other methods never need them
    merge(pool, {"a": 1}, MergeSpec("regmean", pico=False))
    merge(pool, {"a": 1, "b": 1, "c": 1}, MergeSpec("ta", pico=False))
