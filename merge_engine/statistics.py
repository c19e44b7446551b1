"""Input statistics of an adapter's task: what the adapted layers read on its prompts.

Data-aware merge rules (RegMean) weigh each adapter's update by the inputs it is used on. For
every adapted module the statistics hold the second moment E[x xᵀ] and the mean E[x] of the
module's input x over the tokens of the adapter's calibration prompts and the adapter's own
answers to them (unlabeled: no reference answers), run through the base model. Modules that
read the same input (q/k/v of one attention block) share one *site*, stored once.

On disk: `input_statistics.safetensors` in the adapter's directory, tensors `site.<i>.moment`
[in, in] and `site.<i>.mean` [in] (float32), and the metadata key `loramerge` holding JSON
{"format": 1, "modules": {module key: site index}, "tokens": n, "prompts": m}. `loramerge
stats` (the server package, which runs the model) writes it; this module only reads and writes
the file. Every read error names the file and tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .errors import AdapterFormatError, InvalidAdapterTensorError
from .files import read_capped

STATISTICS_FILE = "input_statistics.safetensors"
ANSWER_TOKENS = 32
"""How many tokens of the adapter's own answer per prompt the statistics include by default."""
FORMAT = 1
MAX_STATISTICS_BYTES = 8 << 30
_METADATA_KEY = "loramerge"


@dataclass(frozen=True)
class InputStatistics:
    """Per-site input moments of an adapter's calibration prompts.

    `site_of` maps a PEFT module key to its site index; `moments[i]` is E[x xᵀ] [in, in] and
    `means[i]` is E[x] [in] of site i, both float32. `fingerprint` is the SHA-256 of the file.
    """

    site_of: Mapping[str, int]
    moments: tuple[torch.Tensor, ...]  # per site: [in, in]
    means: tuple[torch.Tensor, ...]  # per site: [in]
    tokens: int
    prompts: int
    fingerprint: str

    def moment(self, module: str) -> torch.Tensor:
        """E[x xᵀ] of the input of `module`. → [in, in]"""
        return self.moments[self.site_of[module]]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.moments, *self.means))


def statistics_from_sums(
    site_of: Mapping[str, int],
    outer_sums: list[torch.Tensor],
    sums: list[torch.Tensor],
    tokens: int,
    prompts: int,
) -> InputStatistics:
    """Statistics from accumulated Σ x xᵀ [in, in] and Σ x [in] per site over `tokens` tokens."""
    if tokens < 1:
        raise ValueError("input statistics need at least one token")
    moments = tuple((s / tokens).float().contiguous() for s in outer_sums)
    means = tuple((s / tokens).float().contiguous() for s in sums)
    return InputStatistics(
        MappingProxyType(dict(site_of)), moments, means, tokens, prompts, fingerprint=""
    )


def save_statistics(statistics: InputStatistics, path: Path) -> Path:
    """Write `statistics` to `path` (a file, or a directory that gets `STATISTICS_FILE`)
    atomically: a temporary file in the same directory, then a rename."""
    target = path / STATISTICS_FILE if path.is_dir() else path
    tensors = {}
    for index, (moment, mean) in enumerate(zip(statistics.moments, statistics.means, strict=True)):
        tensors[f"site.{index}.moment"] = moment.detach().float().cpu().contiguous()
        tensors[f"site.{index}.mean"] = mean.detach().float().cpu().contiguous()
    metadata = {
        "format": FORMAT,
        "modules": dict(statistics.site_of),
        "tokens": statistics.tokens,
        "prompts": statistics.prompts,
    }
    data = save_safetensors(tensors, metadata={_METADATA_KEY: json.dumps(metadata)})
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=".stats-", dir=target.parent)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


def load_statistics(path: Path, in_features: Mapping[str, int]) -> InputStatistics:
    """Read and validate the statistics at `path` for an adapter whose modules read inputs of
    `in_features[module]` features. Every module must have a site of that size."""
    data = read_capped(path, MAX_STATISTICS_BYTES)
    try:
        tensors: dict[str, torch.Tensor] = load_safetensors(data)
        header_length = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_length])
    except Exception as err:  # safetensors raises its own and several builtin types
        raise AdapterFormatError(f"not a readable safetensors file: {err}", path=path) from None
    metadata = _metadata(header, path)
    site_of: dict[str, int] = metadata["modules"]
    sites = sorted(set(site_of.values()))
    if sites != list(range(len(sites))):
        raise AdapterFormatError("site indices must be 0, 1, … without gaps", path=path)
    missing = sorted(set(in_features) - set(site_of))
    if missing:
        raise AdapterFormatError(
            f"no statistics for {len(missing)} adapted module(s), e.g. {missing[0]!r}", path=path
        )
    moments, means = [], []
    for site in sites:
        moment = _tensor(tensors, f"site.{site}.moment", path)
        mean = _tensor(tensors, f"site.{site}.mean", path)
        size = int(mean.shape[0]) if mean.ndim == 1 else -1
        if mean.ndim != 1 or tuple(moment.shape) != (size, size):
            raise InvalidAdapterTensorError(
                f"expected a square moment and a mean of the same size, got "
                f"{tuple(moment.shape)} and {tuple(mean.shape)}",
                path=path,
                tensor=f"site.{site}.moment",
            )
        moments.append(moment.float())
        means.append(mean.float())
    for module, features in in_features.items():
        size = int(means[site_of[module]].shape[0])
        if size != features:
            raise InvalidAdapterTensorError(
                f"module {module!r} reads {features} features, its site has {size}",
                path=path,
                tensor=f"site.{site_of[module]}.moment",
            )
    return InputStatistics(
        site_of=MappingProxyType({m: site_of[m] for m in in_features}),
        moments=tuple(moments),
        means=tuple(means),
        tokens=metadata["tokens"],
        prompts=metadata["prompts"],
        fingerprint=hashlib.sha256(data).hexdigest(),
    )


def _metadata(header: Any, path: Path) -> dict[str, Any]:
    raw = header.get("__metadata__", {}).get(_METADATA_KEY) if isinstance(header, dict) else None
    if raw is None:
        raise AdapterFormatError(f"missing the {_METADATA_KEY!r} metadata", path=path)
    try:
        metadata = json.loads(raw)
    except json.JSONDecodeError as err:
        raise AdapterFormatError(f"metadata is not valid JSON: {err}", path=path) from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise AdapterFormatError(f"unsupported statistics format (expected {FORMAT})", path=path)
    modules = metadata.get("modules")
    valid_modules = isinstance(modules, dict) and all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
        for k, v in modules.items()
    )
    if not valid_modules:
        raise AdapterFormatError("metadata 'modules' must map module keys to indices", path=path)
    for key in ("tokens", "prompts"):
        value = metadata.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise AdapterFormatError(f"metadata {key!r} must be an integer ≥ 1", path=path)
    return metadata


def _tensor(tensors: Mapping[str, torch.Tensor], key: str, path: Path) -> torch.Tensor:
    tensor = tensors.get(key)
    if tensor is None:
        raise InvalidAdapterTensorError("missing", path=path, tensor=key)
    if not tensor.is_floating_point():
        raise InvalidAdapterTensorError(f"expected floating point, got {tensor.dtype}", path=path,
                                        tensor=key)  # fmt: skip
    if not bool(torch.isfinite(tensor).all()):
        raise InvalidAdapterTensorError("contains NaN/Inf values", path=path, tensor=key)
    return tensor
