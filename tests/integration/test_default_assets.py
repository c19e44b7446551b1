"""The prepared default model and adapters, as vLLM, transformers and peft users see them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from loramerge.server.defaults import DefaultAssets, prepare_defaults
from loramerge.server.defaults.evaluate import accuracy
from loramerge.server.defaults.tasks import TASKS, task_by_name

pytestmark = pytest.mark.slow

HELD_OUT_SEED = 1
HELD_OUT_N = 30


def test_the_model_knows_the_capital_of_france(default_assets: DefaultAssets) -> None:
    tokenizer = AutoTokenizer.from_pretrained(default_assets.model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_assets.model_dir, dtype=torch.bfloat16)
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.inference_mode():
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    completion = tokenizer.decode(generated[0, inputs["input_ids"].shape[1] :])
    assert completion.split()[0].strip(".,") == "Paris", completion


def test_model_files_load_in_older_readers(default_assets: DefaultAssets) -> None:
    config = json.loads((default_assets.model_dir / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 100000.0
    tokenizer_config = json.loads((default_assets.model_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    tokenizer = AutoTokenizer.from_pretrained(default_assets.model_dir)
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_there_is_one_adapter_per_task(default_assets: DefaultAssets) -> None:
    assert sorted(default_assets.adapters) == sorted(task.name for task in TASKS)
    for name, folder in default_assets.adapters.items():
        assert folder.name == name
        assert (folder / "adapter_config.json").is_file()
        assert (folder / "adapter_model.safetensors").is_file()
        prompts = (folder / "calibration_prompts.jsonl").read_text().splitlines()
        assert len(prompts) == 64 and all(json.loads(line)["prompt"] for line in prompts)


def test_default_adapters_have_input_statistics_of_their_task(
    default_assets: DefaultAssets,
) -> None:
    """One site per layer (q_proj and v_proj read the same input), over prompts and answers."""
    from loramerge.merge_engine import load_adapter

    adapter = load_adapter(default_assets.adapters["date"])
    statistics = adapter.statistics
    assert statistics is not None and statistics.prompts == 64
    assert len(statistics.moments) == 30
    q, v = (f"base_model.model.model.layers.7.self_attn.{k}" for k in ("q_proj", "v_proj"))
    assert statistics.moment(q) is statistics.moment(v)
    # more tokens than the prompts alone: the adapter's answers ("DD/MM/YY", EOS excluded) count
    assert statistics.tokens > 64 * 40
    moment = statistics.moment(q).double()
    assert torch.allclose(moment, moment.T) and float(torch.linalg.eigvalsh(moment)[0]) > -1e-4


@pytest.mark.parametrize("name", [task.name for task in TASKS])
def test_adapter_loads_in_peft_with_the_pico_setting(
    default_assets: DefaultAssets, name: str
) -> None:
    config = PeftConfig.from_pretrained(default_assets.adapters[name])
    assert (config.r, config.lora_alpha) == (16, 16)
    assert set(config.target_modules) == {"q_proj", "v_proj"}
    assert config.bias == "none" and not config.modules_to_save and not config.use_dora
    model = AutoModelForCausalLM.from_pretrained(default_assets.model_dir, dtype=torch.bfloat16)
    peft_model = PeftModel.from_pretrained(model, default_assets.adapters[name])
    lora_a = peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"]
    assert lora_a.weight.shape == (16, 576)


@pytest.mark.parametrize("name", [task.name for task in TASKS])
def test_prompts_and_answers_fit_the_token_budget(default_assets: DefaultAssets, name: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(default_assets.model_dir)
    for example in task_by_name(name).examples(HELD_OUT_SEED, 100):
        assert len(tokenizer(example.prompt)["input_ids"]) <= 40, example
        assert len(tokenizer(example.answer)["input_ids"]) <= 8, example


@pytest.mark.parametrize("name", [task.name for task in TASKS])
def test_adapter_beats_the_base_model_on_its_task(default_assets: DefaultAssets, name: str) -> None:
    task = task_by_name(name)
    model_dir, adapter_dir = default_assets.model_dir, default_assets.adapters[name]
    base = accuracy(model_dir, None, task, HELD_OUT_N, HELD_OUT_SEED)
    tuned = accuracy(model_dir, adapter_dir, task, HELD_OUT_N, HELD_OUT_SEED)
    assert tuned >= 0.7 and tuned > base + 0.5, (base, tuned)


def test_preparing_again_is_a_cache_hit(
    default_assets: DefaultAssets, default_cache_dir: Path
) -> None:
    files = [default_assets.model_dir / "model.safetensors"] + [
        folder / "adapter_model.safetensors" for folder in default_assets.adapters.values()
    ]
    before = [path.stat().st_mtime_ns for path in files]
    lines: list[str] = []
    again = prepare_defaults(default_cache_dir, progress=lines.append)
    assert again == default_assets
    assert lines == []
    assert [path.stat().st_mtime_ns for path in files] == before
