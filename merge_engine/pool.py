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


@dataclass(frozen=True)
class GroupStatistics:
    """The adapters' input statistics for one module group, stacked once per input site.

    Modules that read the same input (q_proj and v_proj of one layer) share a site, within a
    group and across the groups of one input width, which share one `moments` stack. For adapter
    i, E[x xᵀ] of module g's input is `moments[i][sites[g]]`, and `products[i][g]` is that moment
    times the module's scaled Aᵀ (no preference enters it, so it is computed with the stack). An
    adapter without statistics has empty tensors.
    """

    sites: torch.Tensor  # [G] long: each module's row in `moments`
    in_order: bool  # sites == 0, 1, …, S − 1: the rows of `moments` are the modules'
    moments: tuple[torch.Tensor, ...]  # per adapter: [S, in, in], every site of this width
    products: tuple[torch.Tensor, ...]  # per adapter: [G, in, r_i] = E[x xᵀ] scaled_aᵀ

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.sites, *self.moments, *self.products)


def tensor_bytes(*tensors: torch.Tensor) -> int:
    """Bytes of the tensors' elements (what they hold on their device), each tensor once."""
    unique = {id(t): t for t in tensors}.values()
    return sum(t.numel() * t.element_size() for t in unique)


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
        self._statistics: dict[tuple[str, torch.dtype], tuple[GroupStatistics, ...]] = {}
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

    def statistics(
        self, device: torch.device, dtype: torch.dtype, active: Sequence[int]
    ) -> tuple[GroupStatistics, ...]:
        """Per module group (as `groups` orders them), the adapters' input statistics (cached;
        stacked only when a data-aware rule asks).

        Raises:
            MissingStatisticsError: an adapter in `active` (pool indices) has no statistics.
        """
        missing = [self.names[i] for i in active if self.adapters[i].statistics is None]
        if missing:
            raise MissingStatisticsError(missing)
        groups = self.groups(device, dtype)
        key = (str(device), dtype)
        with self._lock:
            if key not in self._statistics:
                self._statistics[key] = self._stack_statistics(groups, device, dtype)
            return self._statistics[key]

    def cached_bytes(self) -> int:
        """Bytes held by the cached stacks, every (device, dtype) together."""
        with self._lock:
            return sum(g.nbytes for groups in self._groups.values() for g in groups) + sum(
                _statistics_bytes(stacks) for stacks in self._statistics.values()
            )

    def drop_groups(self, keep: tuple[torch.device, torch.dtype] | None = None) -> int:
        """Forget the cached stacks (except those for `keep`); returns the bytes released."""
        kept = (str(keep[0]), keep[1]) if keep is not None else None
        with self._lock:
            dropped = [key for key in self._groups if key != kept]
            freed = sum(g.nbytes for key in dropped for g in self._groups[key])
            for key in dropped:
                del self._groups[key]
            for key in [key for key in self._statistics if key != kept]:
                freed += _statistics_bytes(self._statistics.pop(key))
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

    def _stack_statistics(
        self, groups: tuple[ModuleGroup, ...], device: torch.device, dtype: torch.dtype
    ) -> tuple[GroupStatistics, ...]:
        statistics = [adapter.statistics for adapter in self.adapters]
        # Two modules share a site when every adapter's file maps both to the same stored moment
        # (decided from the files' site maps, never by comparing values).
        rows: dict[int, dict[tuple[int, ...], int]] = {}  # in_features → site key → row
        sites: list[list[int]] = []  # per group: each module's row
        for group in groups:
            keys = rows.setdefault(group.in_features, {})
            sites.append([])
            for module in group.modules:
                key = tuple(-1 if s is None else s.site_of[module] for s in statistics)
                sites[-1].append(keys.setdefault(key, len(keys)))
        stacks = {
            width: tuple(
                torch.stack([s.moments[key[i]] for key in keys]).to(device, dtype)
                if (s := statistics[i]) is not None
                else torch.empty(0)
                for i in range(len(statistics))
            )
            for width, keys in rows.items()
        }
        stacked = []
        for group, group_sites in zip(groups, sites, strict=True):
            index = torch.tensor(group_sites, device=device)
            moments = stacks[group.in_features]
            products = tuple(
                moment[index] @ a.mT if moment.numel() else torch.empty(0)
                for moment, a in zip(moments, group.scaled_a, strict=True)
            )
            in_order = group_sites == list(range(len(rows[group.in_features])))
            stacked.append(GroupStatistics(index, in_order, moments, products))
        return tuple(stacked)


def _statistics_bytes(stacks: tuple[GroupStatistics, ...]) -> int:
    """Bytes of a pool's statistics stacks (site stacks shared by groups counted once)."""
    return tensor_bytes(*(t for group in stacks for t in group.tensors))


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
