"""Exported adapters: PEFT format with the scale folded, loadable by us and by PEFT, written
atomically, never overwritten. PEFT's own `cat` merge is a peer oracle for Task Arithmetic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import delta
from factories import tiny_llama
from loramerge.merge_engine import (
    AdapterPool,
    ExportError,
    MergeSpec,
    load_adapter,
    merge,
    save_adapter,
)


def test_roundtrip_folds_the_scale(pool3: AdapterPool, tmp_path: Path) -> None:
    result = merge(pool3, {"code": 1, "math": 1}, MergeSpec(method="tsvm"))
    path = save_adapter(result, tmp_path / "out" / "merged")
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == result.rank
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "tiny-llama"
    loaded = load_adapter(path)
    for module, part in result.modules.items():
        assert loaded.modules[module].scale == 1.0
        assert torch.equal(loaded.modules[module].lora_a, part.lora_a)
        assert torch.equal(loaded.modules[module].lora_b, part.lora_b)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["merged"]  # no temporary


def test_existing_directory_is_never_overwritten(pool3: AdapterPool, tmp_path: Path) -> None:
    result = merge(pool3, {"code": 1})
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="never overwritten") as info:
        save_adapter(result, tmp_path / "taken")
    assert info.value.path == tmp_path / "taken"
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_unwritable_destination_leaves_nothing(pool3: AdapterPool, tmp_path: Path) -> None:
    result = merge(pool3, {"code": 1})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "file").write_text("not a directory")
    with pytest.raises(ExportError, match="cannot"):
        save_adapter(result, tmp_path / "out" / "file" / "merged")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["file"]


def test_bfloat16_export(pool3: AdapterPool, tmp_path: Path) -> None:
    result = merge(pool3, {"code": 1, "finance": 1})
    loaded = load_adapter(save_adapter(result, tmp_path / "bf16", dtype=torch.bfloat16))
    module = pool3.module_names[0]
    assert loaded.modules[module].lora_a.dtype == torch.bfloat16
    error = torch.linalg.norm(delta(loaded.modules[module]) - delta(result.modules[module]))
    assert float(error / torch.linalg.norm(delta(result.modules[module]))) < 1e-2


def test_peft_loads_the_export_and_its_cat_merge_equals_our_ta(
    pool3: AdapterPool, tmp_path: Path
) -> None:
    from peft import PeftModel

    weights = {"code": 0.2, "finance": 0.5, "math": 0.3}
    ours = merge(pool3, weights, MergeSpec(method="ta", pico=False), dtype="float64")
    exported = save_adapter(ours, tmp_path / "ours")

    model = PeftModel.from_pretrained(
        tiny_llama(), str(pool3.adapter("code").path), adapter_name="code"
    )
    for name in ("finance", "math"):
        model.load_adapter(str(pool3.adapter(name).path), adapter_name=name)
    model.load_adapter(str(exported), adapter_name="ours")
    model.add_weighted_adapter(
        list(weights), list(weights.values()), adapter_name="peft_cat", combination_type="cat"
    )
    for module in pool3.module_names:
        path = module.removeprefix("base_model.model.")
        layer = model.base_model.model.get_submodule(path)
        peft_cat = layer.get_delta_weight("peft_cat").double()
        loaded = layer.get_delta_weight("ours").double()
        ours_delta = delta(ours.modules[module])
        assert (
            float(torch.linalg.norm(peft_cat - ours_delta) / torch.linalg.norm(ours_delta)) < 1e-5
        )
        assert float(torch.linalg.norm(loaded - ours_delta) / torch.linalg.norm(ours_delta)) < 1e-5
