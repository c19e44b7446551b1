"""Pico: pre-merge interference calibration in B-space (yixuantt/Pico, `calibrate_layer` and
`compensate_energy`).

Per module, with the raw B factors of the n merged adapters (no LoRA scale, no task weight):
B_all = [B_1 | … | B_n] = U Σ Vᵀ, sharing score c_k = σ_k² / Σ_j σ_j², coefficient
a_k = 1 / (1 + (n − 1) c_k) ∈ [1/n, 1], and B_t' = B_t + U diag(a − 1) Uᵀ B_t; A_t is unchanged.
After any merge rule, energy compensation rescales the merged update to Σ_t ρ_t ‖ΔW_t‖_F (the
ρ-weighted mean norm of the ORIGINAL updates; the paper's plain mean for uniform ρ).

The calibrated factors depend on which adapters are merged, never on their weights, so they are
cached per (pool fingerprint, merged subset, device, dtype) and every later preference over the
same subset pays only for the rule. A subset of one adapter is left unchanged (n = 1: no-op).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .linalg import tall_svd
from .pool import AdapterPool, tensor_bytes


@dataclass(frozen=True)
class Calibration:
    """Pico's calibration of one module group for the adapters being merged."""

    basis: torch.Tensor  # U: [G, out, q], left singular vectors of B_all
    sharing: torch.Tensor  # c: [G, q], share of the joint B energy per component
    coefficients: torch.Tensor  # a: [G, q], 1 / (1 + (n − 1) c)
    lora_b: tuple[torch.Tensor, ...]  # calibrated B_t': [G, out, r_t] per merged adapter

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.basis, self.sharing, self.coefficients, *self.lora_b)


def calibrate(lora_b: Sequence[torch.Tensor]) -> Calibration:
    """Calibrate the raw B factors of n adapters, each [G, out, r_t], in one batched SVD."""
    count = len(lora_b)
    basis, sigma, _ = tall_svd(torch.cat(list(lora_b), dim=-1))  # [G, out, p], [G, p]
    energy = sigma.square()
    sharing = energy / energy.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    coefficients = 1.0 / (1.0 + (count - 1) * sharing)
    calibrated = tuple(
        b + basis @ ((coefficients - 1.0)[..., None] * (basis.mT @ b)) for b in lora_b
    )
    return Calibration(basis, sharing, coefficients, calibrated)


def compensation(norm: torch.Tensor, target_norm: torch.Tensor) -> torch.Tensor:
    """The factor that rescales merged modules of norm `norm` [G] to `target_norm` [G]
    (1 where the merge is 0; the denominator clamped at 1e-8 as in the authors' code)."""
    return torch.where(norm > 0, target_norm / norm.clamp_min(1e-8), 1.0)


class CalibrationCache:
    """LRU cache of Pico calibrations with hit and miss counts (thread-safe), bounded by entries
    and accounted in bytes (`nbytes`; `shrink_to` evicts least recently used entries)."""

    def __init__(self, max_entries: int = 64) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be ≥ 1")
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple[object, ...], tuple[Calibration, ...]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes held by every cached calibration."""
        return self._bytes

    def shrink_to(self, max_bytes: int) -> int:
        """Evict least recently used entries until at most `max_bytes` are held; returns the
        bytes released."""
        freed = 0
        with self._lock:
            while self._entries and self._bytes > max_bytes:
                freed += self._pop_oldest()
        return freed

    def retain(self, fingerprint: str) -> int:
        """Drop the calibrations of every other pool; returns the bytes released."""
        freed = 0
        with self._lock:
            for key in [k for k in self._entries if k[0] != fingerprint]:
                value = self._entries.pop(key)
                size = sum(c.nbytes for c in value)
                self._bytes -= size
                freed += size
        return freed

    def _pop_oldest(self) -> int:
        _, value = self._entries.popitem(last=False)
        size = sum(c.nbytes for c in value)
        self._bytes -= size
        return size

    def get(
        self,
        pool: AdapterPool,
        active: tuple[int, ...],
        device: torch.device,
        dtype: torch.dtype,
    ) -> tuple[tuple[Calibration, ...], bool]:
        """Calibrations of every module group of `pool` for the adapters `active` (indices).

        Returns (calibrations, hit). Computed outside the lock; a concurrent miss for the same
        key computes twice and keeps one (callers above single-flight whole merges).
        """
        key = (pool.fingerprint, active, str(device), dtype)
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return found, True
            self.misses += 1
        groups = pool.groups(device, dtype)
        value = tuple(calibrate([group.lora_b[i] for i in active]) for group in groups)
        with self._lock:
            if key not in self._entries:
                self._entries[key] = value
                self._bytes += sum(c.nbytes for c in value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._pop_oldest()
        return self._entries.get(key, value), False
