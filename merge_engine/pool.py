"""A pool of compatible adapters, stacked into batches of equal-shape modules.

The pool is immutable: registering or removing an adapter makes a new pool with a new
fingerprint, so everything cached against a fingerprint stays valid for exactly that content.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapter import LoraAdapter, load_adapter
from .errors import IncompatiblePoolError, MissingStatisticsError
from .linalg import frobenius_sq

logger = logging.getLogger(__name__)
_SHOWN = 3  # violations of one kind spelled out; the rest are counted


@dataclass(frozen=True)
class ModuleGroup:
    """Modules that share (out, in) shape and per-adapter ranks, stacked along a batch axis.

    Factors are raw (the LoRA scale is kept apart in `scales`): ΔW_i[g] = scales[g, i] ·
    lora_b[i][g] @ lora_a[i][g] = lora_b[i][g] @ scaled_a[i][g]. The scaled A factors and the
    norms do not depend on any preference, so they are computed once, with the stack.
    """

    modules: tuple[str, ...]  # G module keys
    lora_b: tuple[torch.Tensor, ...]  # per adapter: [G, out, r_i]
    lora_a: tuple[torch.Tensor, ...]  # per adapter: [G, r_i, in]
    scales: torch.Tensor  # [G, N]
    scaled_a: tuple[torch.Tensor, ...]  # per adapter: [G, r_i, in], scale folded in
    norms: torch.Tensor  # [G, N]: ‖ΔW_i‖_F of each module, scale included

    @property
    def out_features(self) -> int:
        return int(self.lora_b[0].shape[1])

    @property
    def in_features(self) -> int:
        return int(self.lora_a[0].shape[2])

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor held (the stacks, scaled A factors, scales and norms)."""
        return tensor_bytes(*self.lora_b, *self.lora_a, *self.scaled_a, self.scales, self.norms)


def tensor_bytes(*tensors: torch.Tensor) -> int:
    """Bytes of the tensors' elements (what they hold on their device)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def _natural_key(text: str) -> list[tuple[int, int | str]]:
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", text)]


class AdapterPool:
    """Validated, name-ordered set of adapters that can be merged together."""

    def __init__(self, adapters: Iterable[LoraAdapter]) -> None:
        ordered = sorted(adapters, key=lambda a: a.name)
        self.warnings: tuple[str, ...] = _validate(ordered)
        for warning in self.warnings:
            logger.warning("%s", warning)
        self.adapters: tuple[LoraAdapter, ...] = tuple(ordered)
        self.names: tuple[str, ...] = tuple(a.name for a in ordered)
        self.module_names: tuple[str, ...] = tuple(sorted(ordered[0].modules, key=_natural_key))
        digest = hashlib.sha256()
        for adapter in ordered:
            digest.update(f"{adapter.name}\0{adapter.fingerprint}\n".encode())
        self.fingerprint: str = digest.hexdigest()
        self._groups: dict[tuple[str, torch.dtype], tuple[ModuleGroup, ...]] = {}
        self._moments: dict[tuple[str, torch.dtype], tuple[tuple[torch.Tensor, ...], ...]] = {}
        self._lock = threading.Lock()

    @classmethod
    def load(cls, paths: dict[str, Path] | Sequence[Path]) -> AdapterPool:
        """Load every adapter (name → directory, or directories named after their adapter).

        All adapters are read before the pool is built: any failure raises and nothing is kept.
        """
        if isinstance(paths, dict):
            return cls(load_adapter(path, name) for name, path in paths.items())
        return cls(load_adapter(path) for path in paths)

    def __len__(self) -> int:
        return len(self.adapters)

    def adapter(self, name: str) -> LoraAdapter:
        return self.adapters[self.names.index(name)]

    @property
    def base_model(self) -> str | None:
        return self.adapters[0].base_model

    @property
    def target_modules(self) -> tuple[str, ...]:
        """Short names of the adapted layers (`q_proj`, `v_proj`, ...)."""
        return tuple(sorted({name.rsplit(".", 1)[-1] for name in self.module_names}))

    def with_adapter(self, adapter: LoraAdapter) -> AdapterPool:
        """A new pool with `adapter` added (or replacing the one of the same name)."""
        return AdapterPool([a for a in self.adapters if a.name != adapter.name] + [adapter])

    def without(self, name: str) -> AdapterPool:
        """A new pool without adapter `name`."""
        return AdapterPool([a for a in self.adapters if a.name != name])

    def groups(self, device: torch.device, dtype: torch.dtype) -> tuple[ModuleGroup, ...]:
        """The modules stacked into equal-shape batches on `device` in `dtype` (cached)."""
        key = (str(device), dtype)
        with self._lock:
            if key not in self._groups:
                self._groups[key] = self._stack(device, dtype)
            return self._groups[key]

    def moments(
        self, device: torch.device, dtype: torch.dtype, active: Sequence[int]
    ) -> tuple[tuple[torch.Tensor, ...], ...]:
        """Per module group (as `groups` orders them), per adapter: E[x xᵀ] of each module's
        input, [G, in, in] (cached; stacked only when a data-aware rule asks).

        Raises:
            MissingStatisticsError: an adapter in `active` (pool indices) has no statistics.
        """
        missing = [self.names[i] for i in active if self.adapters[i].statistics is None]
        if missing:
            raise MissingStatisticsError(missing)
        groups = self.groups(device, dtype)
        key = (str(device), dtype)
        with self._lock:
            if key not in self._moments:
                self._moments[key] = tuple(
                    tuple(
                        torch.stack([s.moment(m) for m in group.modules]).to(device, dtype)
                        if (s := adapter.statistics) is not None
                        else torch.empty(0)
                        for adapter in self.adapters
                    )
                    for group in groups
                )
            return self._moments[key]

    def cached_bytes(self) -> int:
        """Bytes held by the cached stacks, every (device, dtype) together."""
        with self._lock:
            return sum(g.nbytes for groups in self._groups.values() for g in groups) + sum(
                tensor_bytes(*stack) for stacks in self._moments.values() for stack in stacks
            )

    def drop_groups(self, keep: tuple[torch.device, torch.dtype] | None = None) -> int:
        """Forget the cached stacks (except those for `keep`); returns the bytes released."""
        kept = (str(keep[0]), keep[1]) if keep is not None else None
        with self._lock:
            dropped = [key for key in self._groups if key != kept]
            freed = sum(g.nbytes for key in dropped for g in self._groups[key])
            for key in dropped:
                del self._groups[key]
            for key in [key for key in self._moments if key != kept]:
                freed += sum(tensor_bytes(*stack) for stack in self._moments.pop(key))
        return freed

    def _stack(self, device: torch.device, dtype: torch.dtype) -> tuple[ModuleGroup, ...]:
        buckets: dict[tuple[int, int, tuple[int, ...]], list[str]] = {}
        for module in self.module_names:
            parts = [a.modules[module] for a in self.adapters]
            shape = (parts[0].out_features, parts[0].in_features, tuple(p.rank for p in parts))
            buckets.setdefault(shape, []).append(module)
        groups = []
        for modules in buckets.values():
            lora_b, lora_a = [], []
            for adapter in self.adapters:
                parts = [adapter.modules[m] for m in modules]
                lora_b.append(torch.stack([p.lora_b for p in parts]).to(device, dtype))
                lora_a.append(torch.stack([p.lora_a for p in parts]).to(device, dtype))
            scales = torch.tensor(
                [[a.modules[m].scale for a in self.adapters] for m in modules],
                device=device,
                dtype=dtype,
            )
            scaled_a = tuple(a * scales[:, i, None, None] for i, a in enumerate(lora_a))
            norms = torch.stack(
                [frobenius_sq(b, a).sqrt() for b, a in zip(lora_b, scaled_a, strict=True)], dim=1
            )
            groups.append(
                ModuleGroup(tuple(modules), tuple(lora_b), tuple(lora_a), scales, scaled_a, norms)
            )
        return tuple(groups)


def _validate(adapters: Sequence[LoraAdapter]) -> tuple[str, ...]:
    """Raise `IncompatiblePoolError` listing every violation; return the warnings."""
    if not adapters:
        raise IncompatiblePoolError(["the pool is empty: register at least one adapter"])
    violations: list[str] = []
    seen: set[str] = set()
    for adapter in adapters:
        if adapter.name in seen:
            violations.append(f"adapter name {adapter.name!r} is used twice")
        seen.add(adapter.name)

    every_module = set().union(*(a.modules for a in adapters))
    for adapter in adapters:
        missing = sorted(every_module - set(adapter.modules), key=_natural_key)
        if missing:
            violations.append(
                f"adapter {adapter.name!r} ({adapter.path}) lacks modules the others adapt: "
                f"{_preview(missing)}"
            )
    mismatched = []
    for module in sorted(every_module, key=_natural_key):
        shapes = {
            a.name: (a.modules[module].out_features, a.modules[module].in_features)
            for a in adapters
            if module in a.modules
        }
        if len(set(shapes.values())) > 1:
            listing = ", ".join(f"{name}: {d}x{k}" for name, (d, k) in shapes.items())
            mismatched.append(f"module {module} has different shapes ({listing})")
    violations.extend(mismatched[:_SHOWN])
    if len(mismatched) > _SHOWN:
        violations.append(f"... and {len(mismatched) - _SHOWN} more modules with different shapes")
    if violations:
        raise IncompatiblePoolError(violations)

    bases = {a.base_model for a in adapters if a.base_model}
    if len(bases) > 1:
        listing = ", ".join(f"{a.name}={a.base_model!r}" for a in adapters)
        return (f"adapters name different base models ({listing}); merging anyway",)
    return ()


def _preview(names: list[str], limit: int = 3) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
