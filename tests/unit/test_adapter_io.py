"""Reading adapters: valid ones load with the right scales; every broken one fails with a typed
error that names the file and tensor."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from factories import module_names, random_factors, write_adapter
from loramerge.merge_engine import (
    AdapterFormatError,
    AdapterNotFoundError,
    InvalidAdapterTensorError,
    InvalidArgumentError,
    UnsupportedAdapterError,
    load_adapter,
)

Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def test_loads_factors_scale_and_metadata(tmp_path: Path) -> None:
    factors = random_factors(0, rank=4)
    adapter = load_adapter(write_adapter(tmp_path / "math", factors, alpha=8))
    assert adapter.name == "math"
    assert adapter.base_model == "tiny-llama"
    assert adapter.target_modules == ("q_proj", "v_proj")
    assert set(adapter.modules) == set(module_names())
    module = adapter.modules[Q0]
    assert module.scale == 2.0  # alpha / r
    assert torch.equal(module.lora_a, factors[Q0][0])
    assert torch.equal(module.lora_b, factors[Q0][1])


def test_rslora_rank_pattern_and_alpha_pattern_set_the_scale(tmp_path: Path) -> None:
    factors = random_factors(0, rank=4)
    factors[Q0] = (factors[Q0][0][:2], factors[Q0][1][:, :2])  # rank 2 for one module
    adapter = load_adapter(
        write_adapter(
            tmp_path / "a",
            factors,
            rank=4,
            alpha=8,
            use_rslora=True,
            rank_pattern={"layers.0.self_attn.q_proj": 2},
            alpha_pattern={"v_proj": 3},
        )
    )
    assert adapter.modules[Q0].scale == pytest.approx(8 / math.sqrt(2))
    v0 = Q0.replace("q_proj", "v_proj")
    assert adapter.modules[v0].scale == pytest.approx(3 / math.sqrt(4))
    q1 = Q0.replace("layers.0", "layers.1")
    assert adapter.modules[q1].scale == pytest.approx(8 / math.sqrt(4))


def test_name_override_and_invalid_name(tmp_path: Path) -> None:
    path = write_adapter(tmp_path / "dir", random_factors(0))
    assert load_adapter(path, name="custom").name == "custom"
    with pytest.raises(InvalidArgumentError, match="not a valid adapter name"):
        load_adapter(path, name="../etc")


def test_fingerprint_is_content_hash(tmp_path: Path) -> None:
    first = load_adapter(write_adapter(tmp_path / "a", random_factors(0)))
    same = load_adapter(write_adapter(tmp_path / "b", random_factors(0)))
    changed_weights = load_adapter(write_adapter(tmp_path / "c", random_factors(1)))
    changed_config = load_adapter(write_adapter(tmp_path / "d", random_factors(0), alpha=9))
    assert first.fingerprint == same.fingerprint
    assert len({first.fingerprint, changed_weights.fingerprint, changed_config.fingerprint}) == 3


def corrupt(path: Path, file: str, data: bytes) -> Path:
    (path / file).write_bytes(data)
    return path


BROKEN = {
    "missing directory": (
        lambda p: p / "nope",
        AdapterNotFoundError,
        "nope",
        None,
        "does not exist",
    ),
    "missing config": (
        lambda p: (write_adapter(p, random_factors(0)) / "adapter_config.json").unlink() or p,
        AdapterNotFoundError,
        "adapter_config.json",
        None,
        "missing adapter_config.json",
    ),
    "missing weights": (
        lambda p: (write_adapter(p, random_factors(0)) / "adapter_model.safetensors").unlink() or p,
        AdapterNotFoundError,
        "adapter_model.safetensors",
        None,
        "missing",
    ),
    "bin only": (
        lambda p: corrupt(
            (write_adapter(p, random_factors(0)) / "adapter_model.safetensors").unlink() or p,
            "adapter_model.bin",
            b"pickle",
        ),
        AdapterFormatError,
        "adapter_model.bin",
        None,
        "safetensors",
    ),
    "corrupt json": (
        lambda p: corrupt(write_adapter(p, random_factors(0)), "adapter_config.json", b"{r: 4"),
        AdapterFormatError,
        "adapter_config.json",
        None,
        "not valid JSON",
    ),
    "corrupt safetensors": (
        lambda p: corrupt(
            write_adapter(p, random_factors(0)), "adapter_model.safetensors", b"\x08\x00garbage"
        ),
        AdapterFormatError,
        "adapter_model.safetensors",
        None,
        "not a readable safetensors",
    ),
    "rank 0 in config": (
        lambda p: write_adapter(p, random_factors(0), rank=0),
        AdapterFormatError,
        "adapter_config.json",
        None,
        "r must be an integer ≥ 1",
    ),
    "rank 0 tensors": (
        lambda p: write_adapter(p, {Q0: (torch.zeros(0, 16), torch.zeros(24, 0))}, rank=1),
        InvalidAdapterTensorError,
        "adapter_model.safetensors",
        f"{Q0}.lora_A.weight",
        "rank 0",
    ),
    "rank differs from config": (
        lambda p: write_adapter(p, random_factors(0, rank=4), rank=8),
        InvalidAdapterTensorError,
        "adapter_model.safetensors",
        "lora_A.weight",
        "differs from the configured rank 8",
    ),
    "shape mismatch": (
        lambda p: write_adapter(p, {Q0: (torch.randn(4, 16), torch.randn(24, 3))}, rank=4),
        InvalidAdapterTensorError,
        "adapter_model.safetensors",
        f"{Q0}.lora_B.weight",
        "does not match lora_A rank 4",
    ),
    "nan": (
        lambda p: write_adapter(
            p, {Q0: (torch.randn(4, 16), torch.full((24, 4), float("nan")))}, rank=4
        ),
        InvalidAdapterTensorError,
        "adapter_model.safetensors",
        f"{Q0}.lora_B.weight",
        "96 NaN/Inf",
    ),
    "inf": (
        lambda p: write_adapter(
            p, {Q0: (torch.tensor([[float("inf")] * 16] * 4), torch.randn(24, 4))}, rank=4
        ),
        InvalidAdapterTensorError,
        "adapter_model.safetensors",
        f"{Q0}.lora_A.weight",
        "NaN/Inf",
    ),
    "missing B": (
        lambda p: write_adapter(
            p, random_factors(0), extra_tensors={"x.lora_A.weight": torch.randn(4, 16)}
        ),
        InvalidAdapterTensorError,
        "adapter_model.safetensors",
        "x.lora_A.weight",
        "no matching lora_B",
    ),
    "dora config": (
        lambda p: write_adapter(p, random_factors(0), use_dora=True),
        UnsupportedAdapterError,
        "adapter_config.json",
        None,
        "DoRA",
    ),
    "dora tensor": (
        lambda p: write_adapter(
            p,
            random_factors(0),
            extra_tensors={f"{Q0}.lora_magnitude_vector": torch.ones(24)},
        ),
        UnsupportedAdapterError,
        "adapter_model.safetensors",
        f"{Q0}.lora_magnitude_vector",
        "DoRA",
    ),
    "bias config": (
        lambda p: write_adapter(p, random_factors(0), bias="lora_only"),
        UnsupportedAdapterError,
        "adapter_config.json",
        None,
        "bias='lora_only'",
    ),
    "bias tensor": (
        lambda p: write_adapter(
            p, random_factors(0), extra_tensors={f"{Q0}.lora_B.bias": torch.ones(24)}
        ),
        UnsupportedAdapterError,
        "adapter_model.safetensors",
        f"{Q0}.lora_B.bias",
        "bias",
    ),
    "modules_to_save": (
        lambda p: write_adapter(p, random_factors(0), modules_to_save=["lm_head"]),
        UnsupportedAdapterError,
        "adapter_config.json",
        None,
        "modules_to_save",
    ),
    "not lora": (
        lambda p: write_adapter(p, random_factors(0), peft_type="IA3"),
        UnsupportedAdapterError,
        "adapter_config.json",
        None,
        "IA3",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_adapter_raises_typed_error_naming_file_and_tensor(
    tmp_path: Path, case: str
) -> None:
    make, error_type, file, tensor, message = BROKEN[case]
    path = make(tmp_path / "adapter")
    with pytest.raises(error_type) as info:
        load_adapter(path)
    assert info.value.path.name == file
    assert info.value.tensor == tensor or (tensor is not None and tensor in str(info.value.tensor))
    assert message in str(info.value)
    assert str(info.value.path) in str(info.value)


def test_half_precision_adapters_load(tmp_path: Path) -> None:
    adapter = load_adapter(
        write_adapter(tmp_path / "bf16", random_factors(0), dtype=torch.bfloat16)
    )
    assert adapter.modules[Q0].lora_a.dtype == torch.bfloat16


def test_integer_tensors_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "ints"
    path.mkdir()
    save_file(
        {f"{Q0}.lora_A.weight": torch.ones(4, 16, dtype=torch.int32),
         f"{Q0}.lora_B.weight": torch.ones(24, 4)},
        str(path / "adapter_model.safetensors"),
    )  # fmt: skip
    (path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 4}))
    with pytest.raises(InvalidAdapterTensorError, match="floating-point"):
        load_adapter(path)
