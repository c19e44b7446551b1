"""TARA's φ at the merge engine's boundary: every misfit is one error naming the field."""

from __future__ import annotations

import math

import pytest
import torch

from loramerge.merge_engine import AdapterPool, InvalidParameterError, MergeSpec, TaraPhi, merge
from loramerge.merge_engine.merge import phi_sizes


def full_phi(pool: AdapterPool, names: list[str], extra_components: int = 0) -> TaraPhi:
    sizes = phi_sizes(pool, tuple(pool.names.index(n) for n in names))
    return TaraPhi(
        names,
        {k: torch.full((len(names), q + extra_components), 0.5) for k, q in sizes.items()},
    )


def test_phi_for_other_adapters_is_rejected_naming_both_sets(pool3: AdapterPool) -> None:
    phi = full_phi(pool3, ["code", "math"])
    with pytest.raises(InvalidParameterError) as caught:
        merge(pool3, {"code": 1, "finance": 1}, MergeSpec("tara", pico=False, phi=phi))
    assert caught.value.field == "phi.adapters"
    assert "code, math" in str(caught.value) and "code, finance" in str(caught.value)


def test_phi_with_too_many_components_names_the_module_and_the_limit(pool3: AdapterPool) -> None:
    phi = full_phi(pool3, ["code", "math"], extra_components=1)
    with pytest.raises(InvalidParameterError) as caught:
        merge(pool3, {"code": 1, "math": 1}, MergeSpec("tara", pico=False, phi=phi))
    module = pool3.module_names[0]
    assert caught.value.field == f"phi.modules[{module!r}]"
    assert "1 ≤ R ≤ 8" in str(caught.value)


def test_phi_missing_a_module_is_rejected(pool3: AdapterPool) -> None:
    phi = full_phi(pool3, ["code", "math"])
    partial = TaraPhi(phi.adapters, dict(list(phi.modules.items())[1:]))
    with pytest.raises(InvalidParameterError) as caught:
        merge(pool3, {"code": 1, "math": 1}, MergeSpec("tara", pico=False, phi=partial))
    assert caught.value.field == "phi.modules"
    assert pool3.module_names[0] in str(caught.value)


@pytest.mark.parametrize(
    ("matrix", "message"),
    [
        (torch.tensor([[0.5, math.nan], [0.1, 0.2]]), "NaN or infinite"),
        (torch.tensor([[0.5, math.inf], [0.1, 0.2]]), "NaN or infinite"),
        (torch.ones(3, 2), "expected (2, R)"),
        (torch.ones(2), "expected (2, R)"),
        (torch.ones(2, 0), "expected (2, R)"),
    ],
)
def test_phi_values_are_checked_on_construction(matrix: torch.Tensor, message: str) -> None:
    with pytest.raises(InvalidParameterError) as caught:
        TaraPhi(["a", "b"], {"m": matrix})
    assert caught.value.field == "phi.modules['m']" and message in str(caught.value)


def test_phi_is_only_for_tara() -> None:
    phi = TaraPhi(["a"], {"m": torch.ones(1, 2)})
    with pytest.raises(InvalidParameterError) as caught:
        MergeSpec("ties", phi=phi)
    assert caught.value.field == "phi"


def test_phi_equality_and_digest_follow_the_content() -> None:
    first = TaraPhi(["a"], {"m": torch.tensor([[1.0, 2.0]])})
    same = TaraPhi(["a"], {"m": [[1.0, 2.0]]})
    other = TaraPhi(["a"], {"m": torch.tensor([[1.0, 2.5]])})
    assert first == same and first.digest == same.digest
    assert first != other and first.digest != other.digest
