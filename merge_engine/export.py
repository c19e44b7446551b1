"""Writing a merged adapter in PEFT format, atomically.

The directory holds `adapter_config.json` and `adapter_model.safetensors` with the scale folded
into the factors (`lora_alpha == r`), so PEFT and vLLM load it as is. It is written into a
temporary sibling directory and renamed into place: readers never see a partial adapter, and an
existing directory is never overwritten (a name and path always mean the same weights).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from .adapter import CONFIG_FILE, WEIGHTS_FILE, LoraModule
from .errors import ExportError
from .merge import MergeResult


def peft_config(result: MergeResult, base_model: str | None = None) -> dict[str, Any]:
    """The `adapter_config.json` of a merged adapter (scale 1: lora_alpha == r)."""
    return _config(result.rank, result.target_modules, base_model or result.base_model)


def _config(rank: int, target_modules: Sequence[str], base_model: str | None) -> dict[str, Any]:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": rank,
        "target_modules": list(target_modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "inference_mode": True,
    }


def save_adapter(
    result: MergeResult,
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    base_model: str | None = None,
) -> Path:
    """Write `result` to the new directory `path` (atomically); return `path`.

    `dtype` is the stored precision (e.g. the serving model's bfloat16). Raises `ExportError`
    if `path` exists or cannot be written; nothing is left behind on failure.
    """
    provenance = {
        "pool_fingerprint": result.pool_fingerprint,
        "method": result.report.method,
        "pico": str(result.report.pico),
        "rank": str(result.rank),
    }
    return save_modules(
        result.modules,
        path,
        target_modules=result.target_modules,
        base_model=base_model or result.base_model,
        metadata=provenance,
        dtype=dtype,
    )


def save_modules(
    modules: Mapping[str, LoraModule],
    path: str | Path,
    *,
    target_modules: Sequence[str],
    base_model: str | None,
    metadata: Mapping[str, str] | None = None,
    files: Mapping[str, bytes] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write `modules` (one rank for all; each module's scale is folded into lora_b) as the new
    PEFT adapter directory `path`, with `metadata` in the safetensors header and `files`
    (file name → bytes) beside the weights, atomically; return `path`. Raises `ExportError` as
    `save_adapter` does."""
    ranks = {module.rank for module in modules.values()}
    if len(ranks) != 1:
        raise ExportError(f"modules must share one rank, got {sorted(ranks)}", path=Path(path))
    target = Path(path)
    if target.exists():
        raise ExportError("already exists; merged adapters are never overwritten", path=target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ExportError(f"cannot create the parent directory: {err}", path=target) from None
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
    try:
        staging.mkdir()
        tensors: dict[str, torch.Tensor] = {}
        for module, factors in modules.items():
            lora_b = factors.lora_b if factors.scale == 1.0 else factors.lora_b * factors.scale
            tensors[f"{module}.lora_A.weight"] = factors.lora_a.to("cpu", dtype).contiguous()
            tensors[f"{module}.lora_B.weight"] = lora_b.to("cpu", dtype).contiguous()
        # Serialised in memory, written by Python: a full disk is an OSError with its errno
        # (safetensors' own file writer raises its own error type instead).
        data = save(tensors, metadata={"format": "pt", **(metadata or {})})
        (staging / WEIGHTS_FILE).write_bytes(data)
        config = json.dumps(_config(ranks.pop(), target_modules, base_model), indent=2)
        (staging / CONFIG_FILE).write_text(config + "\n")
        for name, content in (files or {}).items():
            (staging / name).write_bytes(content)
        os.rename(staging, target)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if not isinstance(err, OSError):
            raise
        raise ExportError(
            f"cannot write the adapter: {err}", path=target, errno=err.errno
        ) from None
    return target
