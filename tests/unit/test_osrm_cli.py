"""`loramerge osrm init|project` on real adapter files, PEFT loading the projected adapters, and
the training hook that starts a LoRA from the written A-init."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import reference as ref
from factories import random_factors, tiny_llama, write_adapter, write_statistics
from loramerge.merge_engine import STATISTICS_FILE, load_adapter
from loramerge.server.cli import main

NAMES = ("code", "math", "medical")


@pytest.fixture
def adapters(tmp_path: Path) -> dict[str, Path]:
    paths = {}
    for seed, name in enumerate(NAMES):
        paths[name] = write_adapter(tmp_path / "pool" / name, random_factors(seed), alpha=8)
        write_statistics(paths[name], 30 + seed)
        (paths[name] / "calibration_prompts.jsonl").write_text('{"prompt": "hi"}\n')
    return paths


def adapter_args(paths: dict[str, Path]) -> list[str]:
    return [arg for name, path in paths.items() for arg in ("--adapter", f"{name}={path}")]


def test_init_writes_orthonormal_a_factors_and_a_summary(
    adapters: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "init"
    assert main(["osrm", "init", *adapter_args(adapters), "--rank", "3", "--out", str(out)]) == 0
    summary = json.loads((out / "osrm_init.json").read_text())
    assert json.loads(capsys.readouterr().out)["adapters"] == summary["adapters"]
    modules = set(load_adapter(adapters["code"]).modules)
    for name in NAMES:
        tensors = load_file(str(out / summary["adapters"][name]["file"]))
        assert {key.removesuffix(".lora_A.weight") for key in tensors} == modules
        for a in tensors.values():
            assert a.shape == (3, 24)
            assert torch.allclose(a.double() @ a.double().T, torch.eye(3, dtype=torch.float64),
                                  atol=1e-5)  # fmt: skip
        entry = summary["adapters"][name]
        assert entry["rank"] == [3]
        assert entry["interference_init"] < min(1.0, entry["interference_adapter"])


def test_training_starts_from_the_written_init(adapters: dict[str, Path], tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    from loramerge.server.defaults.train import _initialise_a

    out = tmp_path / "init"
    assert main(["osrm", "init", *adapter_args(adapters), "--out", str(out)]) == 0
    init = {
        k.removesuffix(".lora_A.weight"): v
        for k, v in load_file(str(out / "math.safetensors")).items()
    }
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(tiny_llama(), config)
    _initialise_a(model, init)
    for name, parameter in model.named_parameters():
        if name.endswith(".lora_A.default.weight"):
            assert torch.equal(
                parameter.detach(), init[name.removesuffix(".lora_A.default.weight")]
            )
    missing = dict(init)
    missing.pop(next(iter(missing)))
    with pytest.raises(ValueError, match="1 missing and 0 unknown"):
        _initialise_a(get_peft_model(tiny_llama(), config), missing)


def test_project_writes_peft_adapters_that_peft_loads(
    adapters: dict[str, Path], tmp_path: Path
) -> None:
    from peft import PeftModel

    out = tmp_path / "projected"
    init = tmp_path / "init"
    assert main(["osrm", "project", *adapter_args(adapters), "--out", str(out)]) == 0
    assert main(["osrm", "init", *adapter_args(adapters), "--out", str(init)]) == 0
    summary = json.loads((out / "osrm_project.json").read_text())
    for name in NAMES:
        source, projected = load_adapter(adapters[name]), load_adapter(out / name)
        # statistics include the adapter's own answers: not copied (`--stats` computes them)
        assert projected.statistics is None
        assert (out / name / "calibration_prompts.jsonl").read_text() == '{"prompt": "hi"}\n'
        basis = load_file(str(init / f"{name}.safetensors"))
        model = PeftModel.from_pretrained(tiny_llama(), str(out / name))
        for key, module in source.modules.items():
            dense = module.scale * module.lora_b.double() @ module.lora_a.double()
            expected = ref.osrm_project(dense, basis[f"{key}.lora_A.weight"].double())
            layer = model.base_model.model.get_submodule(key.removeprefix("base_model.model."))
            loaded = layer.get_delta_weight("default").double()
            assert float((loaded - expected).norm() / expected.norm()) < 1e-5
        entry = summary["adapters"][name]
        assert 0 < entry["kept_energy_min"] <= entry["kept_energy_mean"] < 1
        assert entry["interference_after"] < entry["interference_before"]


def test_errors_name_the_problem(
    adapters: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    assert main(["osrm", "project", *adapter_args(adapters), "--out", str(taken)]) == 2
    assert f"{taken}: already exists" in capsys.readouterr().err
    (adapters["math"] / STATISTICS_FILE).unlink()
    assert main(["osrm", "init", *adapter_args(adapters), "--out", str(tmp_path / "x")]) == 2
    error = capsys.readouterr().err
    assert "adapter 'math' has no input statistics" in error and "loramerge stats" in error
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit, match="at least two --adapter"):
        main(
            ["osrm", "init", "--adapter", f"code={adapters['code']}", "--out", str(tmp_path / "y")]
        )
    assert main(["osrm", "init", *adapter_args({k: adapters[k] for k in ("code", "medical")}),
                 "--rank", "25", "--out", str(tmp_path / "z")]) == 2  # fmt: skip
    assert "rank: must be between 1 and 24, got 25" in capsys.readouterr().err
    assert not list(tmp_path.glob(".z.tmp-*"))  # nothing half-written
