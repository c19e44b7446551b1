"""TARA Variant B: per-(task, component) weights φ on KnOTS's shared basis.

[ΔW_1 | … | ΔW_n] = U S [V_1ᵀ … V_nᵀ] (the KnOTS basis, `knots.shared_basis`, X_i = S V_iᵀ) and

    ΔW(φ) = U S Σ_i diag(φ_i) V_iᵀ = U · Σ_i diag(φ_i) X_i,    φ ∈ R^{n × R}

on the top R components (R ≤ q, the basis size; dropping components k > R is φ_ik = 0). The
result is the exact LoRA b = U[:, :R], a = Σ_i φ_i ∘ X_i[:R]: no out × in matrix is formed.

φ comes from tuning (`loramerge tune --objective entropy`) as one [n, R] matrix per module, rows
in pool order over the merged adapters (ρ_i > 0). Without φ the rule is TA on the exact basis:
φ_ik = λ_i = λ · n · ρ_i for every component, i.e. U Σ_i λ_i X_i = Σ_i λ_i ΔW_i.

The basis is computed in float64 whatever the merge dtype, so that a φ tuned on one machine
addresses the same components (ordered by singular value) where it is served.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import torch

from ..errors import InvalidParameterError
from ..linalg import LowRank
from ..pool import AdapterPool
from ..preference import normalize_preference
from .base import MergeMethod, MethodParams, TaskSet
from .knots import shared_basis

MAX_SHOWN = 3  # φ violations spelled out in one error; the rest are counted


@dataclass(frozen=True)
class TaraParams(MethodParams):
    """`scaling` λ of the untuned merge (φ_i = λ · n · ρ_i); the default 1/n makes it the
    preference-weighted average, TA's default. Ignored when φ is given."""


class TaraPhi:
    """TARA's φ for one merge: module key → [n, R] float32 weights, rows for `adapters`.

    Immutable; equal when the content is (`digest`, a SHA-256 of the adapters, module keys,
    shapes and values). Construction checks what needs no pool: names, 2-D shapes with one row
    per adapter, finite values. `check_phi` checks it against a pool.
    """

    def __init__(
        self, adapters: Sequence[str], modules: Mapping[str, torch.Tensor | Sequence[float]]
    ) -> None:
        names = tuple(adapters)
        if not names:
            raise InvalidParameterError("phi.adapters", "is empty: φ needs one row per adapter")
        if len(set(names)) != len(names):
            raise InvalidParameterError("phi.adapters", f"names an adapter twice: {names}")
        if not modules:
            raise InvalidParameterError("phi.modules", "is empty: φ needs one matrix per module")
        tensors: dict[str, torch.Tensor] = {}
        problems: list[tuple[str, str]] = []
        for key in sorted(modules):
            value = torch.as_tensor(modules[key]).detach().to("cpu", torch.float32).contiguous()
            field = f"phi.modules[{key!r}]"
            if value.dim() != 2 or value.shape[0] != len(names) or value.shape[1] < 1:
                problems.append(
                    (field, f"has shape {tuple(value.shape)}; expected ({len(names)}, R), R ≥ 1")
                )
            elif not bool(torch.isfinite(value).all()):
                problems.append((field, "holds a NaN or infinite weight"))
            tensors[key] = value.clone()
        _raise(problems)
        self.adapters: tuple[str, ...] = names
        self.modules: Mapping[str, torch.Tensor] = MappingProxyType(tensors)
        digest = hashlib.sha256()
        digest.update("\0".join(names).encode() + b"\n")
        for key, value in tensors.items():
            digest.update(f"{key}\0{tuple(value.shape)}\n".encode())
            digest.update(float32_bytes(value))
        self.digest: str = digest.hexdigest()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TaraPhi) and other.digest == self.digest

    def __hash__(self) -> int:
        return hash(self.digest)

    def __repr__(self) -> str:
        return f"TaraPhi(adapters={self.adapters}, modules={len(self.modules)}, {self.digest[:12]})"

    def components(self, module: str) -> int:
        """R of `module`."""
        return int(self.modules[module].shape[1])

    def max_abs(self) -> float:
        return max(float(v.abs().max()) for v in self.modules.values())


def float32_bytes(value: torch.Tensor) -> bytes:
    """The values of a float32 tensor, row-major, as little-endian bytes."""
    flat = value.detach().to("cpu", torch.float32).flatten().tolist()
    return struct.pack(f"<{len(flat)}f", *flat)


def tensor_from_float32_bytes(data: bytes, shape: Sequence[int]) -> torch.Tensor:
    """The inverse of `float32_bytes`."""
    count = len(data) // 4
    return torch.tensor(struct.unpack(f"<{count}f", data), dtype=torch.float32).reshape(*shape)


def basis_size(out_features: int, in_features: int, ranks: Sequence[int]) -> int:
    """q, the number of components of the shared basis of a module: min(out, n·in, Σ r_i)."""
    return min(out_features, len(ranks) * in_features, sum(ranks))


def check_phi(
    phi: TaraPhi, adapters: Sequence[str], sizes: Mapping[str, int], field: str = "phi"
) -> None:
    """Raise one `InvalidParameterError` listing every way `phi` does not fit a merge of
    `adapters` (the merged ones, pool order) whose modules have `sizes` (key → q)."""
    problems: list[tuple[str, str]] = []
    if tuple(adapters) != phi.adapters:
        problems.append(
            (
                f"{field}.adapters",
                f"φ has rows for {', '.join(phi.adapters)}; this merge takes "
                f"{', '.join(adapters)} (the adapters with weight > 0, in pool order)",
            )
        )
    missing = [key for key in sizes if key not in phi.modules]
    extra = [key for key in phi.modules if key not in sizes]
    if missing:
        problems.append((f"{field}.modules", _listing("lacks modules of the pool", missing)))
    if extra:
        problems.append((f"{field}.modules", _listing("has modules the pool lacks", extra)))
    if problems:
        _raise(problems)  # the component counts below depend on the adapters
    for key, size in sizes.items():
        if key in phi.modules and not 1 <= phi.components(key) <= size:
            problems.append(
                (
                    f"{field}.modules[{key!r}]",
                    f"has {phi.components(key)} components; the shared basis of this module "
                    f"has {size}: expected shape ({len(adapters)}, R) with 1 ≤ R ≤ {size}",
                )
            )
    _raise(problems)


def _listing(what: str, keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:MAX_SHOWN])
    more = f" and {len(keys) - MAX_SHOWN} more" if len(keys) > MAX_SHOWN else ""
    return f"{what}: {shown}{more}"


def _raise(problems: Sequence[tuple[str, str]]) -> None:
    if not problems:
        return
    lines = [f"{field}: {message}" for field, message in problems[:MAX_SHOWN]]
    if len(problems) > MAX_SHOWN:
        lines.append(f"... and {len(problems) - MAX_SHOWN} more problems")
    first_field, first_message = problems[0]
    raise InvalidParameterError(first_field, "; ".join([first_message, *lines[1:]]))


def tara_basis(tasks: TaskSet) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared basis in float64. → U [G, out, q] and X [G, n, q, in] (X_i = S V_iᵀ)."""
    exact = tasks.replace(
        b=tuple(b.double() for b in tasks.b), a=tuple(a.double() for a in tasks.a)
    )
    return shared_basis(exact)


def combine(
    basis: torch.Tensor, coefficients: torch.Tensor, phi: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """ΔW(φ) as factors. basis U [G, out, q], coefficients X [G, n, q, in], φ [G, n, R] (R ≤ q)
    → b [G, out, R], a = Σ_i φ_i ∘ X_i [G, R, in]. Differentiable in φ."""
    rank = int(phi.shape[-1])
    a = (phi[..., None] * coefficients[..., :rank, :]).sum(dim=1)
    return basis[..., :rank], a


class Tara(MergeMethod[TaraParams]):
    name = "tara"
    summary = "TARA Variant B: tuned weights φ per (task, shared-basis component); TA without φ"
    exact_low_rank = True
    params_type = TaraParams
    takes_phi = True

    def merge(self, tasks: TaskSet, params: TaraParams, target_rank: int) -> LowRank:
        basis, coefficients = tara_basis(tasks)  # [G, out, q], [G, n, q, in]
        if tasks.phi is None:
            weights = tasks.weights(params.resolved_scaling(1.0 / tasks.count)).double()
            phi = weights[None, :, None].expand(basis.shape[0], -1, basis.shape[-1])
        else:
            phi = tasks.phi.double()
        b, a = combine(basis, coefficients, phi)
        dtype = tasks.b[0].dtype
        return LowRank.exact(b.to(dtype), a.to(dtype))


def stack_phi(phi: TaraPhi, modules: Sequence[str]) -> torch.Tensor:
    """φ of a module group, zero-padded to the group's largest R (a dropped component weighs
    0). → [G, n, R_max] float32."""
    rank = max(phi.components(m) for m in modules)
    pad = torch.nn.functional.pad
    return torch.stack([pad(phi.modules[m], (0, rank - phi.components(m))) for m in modules])


@dataclass(frozen=True)
class SharedBasis:
    """TARA's basis of one module group, for tuning φ: ΔW(φ) = `combine(basis, coefficients, φ)`."""

    modules: tuple[str, ...]  # G module keys
    basis: torch.Tensor  # U [G, out, q]
    coefficients: torch.Tensor  # X [G, n, q, in]

    @property
    def size(self) -> int:
        """q, the number of components."""
        return int(self.basis.shape[-1])


def shared_bases(
    pool: AdapterPool, preference: Mapping[str, float], dtype: torch.dtype = torch.float32
) -> tuple[tuple[str, ...], tuple[float, ...], tuple[SharedBasis, ...]]:
    """The merged adapters (ρ > 0, pool order), their ρ and the shared basis of every module
    group, on the CPU, from the pool stacked in `dtype` as `merge` stacks it (so a φ tuned on
    these bases addresses the components that `merge` computes). Bases are float64."""
    rho = normalize_preference(preference, pool.names)
    active = [i for i, weight in enumerate(rho) if weight > 0]
    names = tuple(pool.names[i] for i in active)
    bases = []
    for group in pool.groups(torch.device("cpu"), dtype):
        tasks = TaskSet(
            names=names,
            modules=group.modules,
            b=tuple(group.lora_b[i] for i in active),
            a=tuple(group.scaled_a[i] for i in active),
            rho=torch.tensor([rho[i] for i in active], dtype=dtype),
        )
        basis, coefficients = tara_basis(tasks)
        bases.append(SharedBasis(group.modules, basis, coefficients))
    return names, tuple(rho[i] for i in active), tuple(bases)
