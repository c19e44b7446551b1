"""Reading PEFT LoRA adapters (`adapter_config.json` + `adapter_model.safetensors`).

An adapter is read whole, validated, and only then returned: a failure never leaves a partly
loaded adapter behind. Every error names the file and, where there is one, the tensor.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from safetensors.torch import load as load_safetensors

from .errors import (
    AdapterFormatError,
    AdapterNotFoundError,
    InvalidAdapterTensorError,
    InvalidArgumentError,
    UnsupportedAdapterError,
)
from .files import read_capped
from .statistics import STATISTICS_FILE, InputStatistics, load_statistics

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_BIN_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])\.weight$")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_CONFIG_BYTES = 1 << 20  # adapter_config.json
MAX_WEIGHTS_BYTES = 8 << 30  # adapter_model.safetensors


@dataclass(frozen=True)
class LoraModule:
    """One adapted linear layer, in factored form: ΔW = scale · lora_b @ lora_a."""

    lora_a: torch.Tensor  # [r, in]
    lora_b: torch.Tensor  # [out, r]
    scale: float

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.lora_b.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.lora_a.shape[1])


@dataclass(frozen=True)
class LoraAdapter:
    """A validated LoRA adapter.

    `modules` maps the tensor prefix PEFT writes (e.g.
    `base_model.model.model.layers.0.self_attn.q_proj`) to its factors. `fingerprint` is the
    SHA-256 of the config and weights bytes (and of the input statistics file, when there is
    one): it changes whenever one of them changes.
    """

    name: str
    path: Path
    base_model: str | None
    target_modules: tuple[str, ...]
    modules: Mapping[str, LoraModule]
    fingerprint: str
    statistics: InputStatistics | None = None
    """Input statistics of the adapter's task (`input_statistics.safetensors` in its directory,
    optional): what data-aware merge rules (RegMean) weigh its update by."""


def validate_adapter_name(name: str, field: str = "name") -> str:
    """Return `name` if it is a usable adapter name (letters, digits, `._-`, ≤ 64 chars)."""
    if not _NAME.fullmatch(name):
        shown = repr(name) if len(name) <= 64 else f"{name[:64]!r}… ({len(name)} characters)"
        raise InvalidArgumentError(
            field, f"{shown} is not a valid adapter name (letters, digits, '.', '_', '-'; ≤ 64)"
        )
    return name


def load_adapter(path: str | Path, name: str | None = None) -> LoraAdapter:
    """Load and validate the PEFT LoRA adapter in directory `path`.

    `name` defaults to the directory name. Raises a subclass of `AdapterError` naming the file
    (and tensor) for a missing file, corrupt JSON or safetensors, a `.bin`-only adapter, DoRA,
    bias or `modules_to_save`, a shape mismatch, a rank of 0, or a non-finite value.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise AdapterNotFoundError("adapter directory does not exist", path=directory)
    adapter_name = validate_adapter_name(name if name is not None else directory.name)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config_path.is_file():
        raise AdapterNotFoundError(f"missing {CONFIG_FILE}", path=config_path)
    if not weights_path.is_file():
        present = [f for f in _BIN_FILES if (directory / f).is_file()]
        if present:
            raise AdapterFormatError(
                f"only {present[0]} (pickle) is present; save the adapter with safetensors "
                "(PEFT: `model.save_pretrained(dir, safe_serialization=True)`)",
                path=directory / present[0],
            )
        raise AdapterNotFoundError(f"missing {WEIGHTS_FILE}", path=weights_path)

    config_bytes = read_capped(config_path, MAX_CONFIG_BYTES)
    weights_bytes = read_capped(weights_path, MAX_WEIGHTS_BYTES)
    config = _parse_config(config_bytes, config_path)
    tensors = _parse_weights(weights_bytes, weights_path)
    modules = _build_modules(config, tensors, weights_path)

    statistics_path = directory / STATISTICS_FILE
    statistics = None
    if statistics_path.is_file():
        in_features = {key: module.in_features for key, module in modules.items()}
        statistics = load_statistics(statistics_path, in_features)

    digest = hashlib.sha256()
    digest.update(config_bytes)
    digest.update(b"\0")
    digest.update(weights_bytes)
    if statistics is not None:
        digest.update(b"\0" + statistics.fingerprint.encode())
    target = config.get("target_modules")
    targets = (target,) if isinstance(target, str) else tuple(sorted(target or ()))
    base = config.get("base_model_name_or_path")
    return LoraAdapter(
        name=adapter_name,
        path=directory,
        base_model=str(base) if base else None,
        target_modules=targets,
        modules=MappingProxyType(modules),
        fingerprint=digest.hexdigest(),
        statistics=statistics,
    )


def _parse_config(data: bytes, path: Path) -> dict[str, Any]:
    try:
        config = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFormatError(f"not valid JSON: {err}", path=path) from None
    except RecursionError:
        raise AdapterFormatError("JSON nested too deeply", path=path) from None
    if not isinstance(config, dict):
        raise AdapterFormatError("must hold a JSON object", path=path)

    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise UnsupportedAdapterError(f"peft_type {peft_type!r} is not LORA", path=path)
    unsupported = {
        "use_dora": "DoRA adapters (use_dora=true) are not supported",
        "lora_bias": "LoRA bias (lora_bias=true) is not supported",
        "fan_in_fan_out": "fan_in_fan_out=true is not supported",
    }
    for key, message in unsupported.items():
        if config.get(key):
            raise UnsupportedAdapterError(message, path=path)
    if config.get("bias", "none") != "none":
        raise UnsupportedAdapterError(
            f"bias={config['bias']!r} is not supported (only 'none')", path=path
        )
    if config.get("modules_to_save"):
        raise UnsupportedAdapterError(
            f"modules_to_save={config['modules_to_save']!r} is not supported", path=path
        )
    if config.get("layer_replication"):
        raise UnsupportedAdapterError("layer_replication is not supported", path=path)

    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterFormatError(f"r must be an integer ≥ 1, got {rank!r}", path=path)
    alpha = config.get("lora_alpha", 8)
    if not _is_finite_number(alpha):
        raise AdapterFormatError(f"lora_alpha must be a finite number, got {alpha!r}", path=path)
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise AdapterFormatError(f"{key} must be an object, got {pattern!r}", path=path)
        for pattern_key, value in pattern.items():
            valid = _is_finite_number(value) and (key == "alpha_pattern" or value >= 1)
            if not valid or (key == "rank_pattern" and not isinstance(value, int)):
                raise AdapterFormatError(
                    f"{key}[{pattern_key!r}] has invalid value {value!r}", path=path
                )
            try:
                re.compile(pattern_key)
            except re.error as err:
                raise AdapterFormatError(
                    f"{key} key {pattern_key!r} is not a valid pattern: {err}", path=path
                ) from None
    return config


def _is_finite_number(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _parse_weights(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    try:
        tensors: dict[str, torch.Tensor] = load_safetensors(data)
    except Exception as err:  # safetensors raises its own and several builtin types
        raise AdapterFormatError(f"not a readable safetensors file: {err}", path=path) from None
    if not tensors:
        raise AdapterFormatError("contains no tensors", path=path)
    return tensors


def _unsupported_key_reason(key: str) -> str:
    if "lora_magnitude_vector" in key:
        return "DoRA magnitude vector: DoRA adapters are not supported"
    if key.endswith(".bias"):
        return "bias tensor: adapters with bias are not supported"
    if "modules_to_save" in key:
        return "modules_to_save tensor: fully trained modules are not supported"
    if "lora_embedding" in key:
        return "embedding LoRA is not supported"
    return "unexpected tensor (expected only <module>.lora_A.weight / <module>.lora_B.weight)"


def _build_modules(
    config: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path
) -> dict[str, LoraModule]:
    sides: dict[str, dict[str, torch.Tensor]] = {}
    for key in sorted(tensors):
        match = _LORA_KEY.match(key)
        if match is None:
            raise UnsupportedAdapterError(_unsupported_key_reason(key), path=path, tensor=key)
        sides.setdefault(match["module"], {})[match["side"]] = tensors[key]

    modules: dict[str, LoraModule] = {}
    for module, pair in sides.items():
        for side in ("A", "B"):
            if side not in pair:
                other = "B" if side == "A" else "A"
                raise InvalidAdapterTensorError(
                    f"lora_{other} has no matching lora_{side}",
                    path=path,
                    tensor=f"{module}.lora_{other}.weight",
                )
        lora_a, lora_b = pair["A"], pair["B"]
        key_a, key_b = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
        for key, tensor in ((key_a, lora_a), (key_b, lora_b)):
            if tensor.ndim != 2:
                raise InvalidAdapterTensorError(
                    f"expected a 2-D tensor, got shape {tuple(tensor.shape)}", path=path, tensor=key
                )
            if not tensor.is_floating_point():
                raise InvalidAdapterTensorError(
                    f"expected a floating-point tensor, got {tensor.dtype}", path=path, tensor=key
                )
            if not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                raise InvalidAdapterTensorError(
                    f"contains {bad} NaN/Inf value(s)", path=path, tensor=key
                )
        rank = int(lora_a.shape[0])
        if rank == 0:
            raise InvalidAdapterTensorError("rank 0 (empty lora_A)", path=path, tensor=key_a)
        if int(lora_b.shape[1]) != rank:
            raise InvalidAdapterTensorError(
                f"shape {tuple(lora_b.shape)} does not match lora_A rank {rank} "
                f"(lora_A shape {tuple(lora_a.shape)})",
                path=path,
                tensor=key_b,
            )
        configured_rank = int(_pattern_value(config.get("rank_pattern"), module, config["r"]))
        if configured_rank != rank:
            raise InvalidAdapterTensorError(
                f"rank {rank} differs from the configured rank {configured_rank}",
                path=path,
                tensor=key_a,
            )
        alpha = float(_pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"]))
        denominator = math.sqrt(rank) if config.get("use_rslora") else float(rank)
        modules[module] = LoraModule(lora_a=lora_a, lora_b=lora_b, scale=alpha / denominator)
    return modules


def _pattern_value(pattern: dict[str, float] | None, module: str, default: float) -> float:
    """PEFT's rule: a pattern key applies to a module whose name ends with it at a dot."""
    for key, value in (pattern or {}).items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", module):
            return value
    return default
