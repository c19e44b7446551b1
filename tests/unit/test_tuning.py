"""Tenants' TARA weights φ in the server: what fits a pool, when φ serves a request, and that
a phi.json survives the trip client → proto → server unchanged."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch

from factories import random_factors, write_adapter
from loramerge.merge_engine import AdapterPool, InvalidParameterError, MergeSpec, TaraPhi, merge
from loramerge.merge_engine.merge import phi_sizes
from loramerge.server import translate
from loramerge.server.domain import MergeChoice, TenantRecord
from loramerge.server.errors import InvalidRequestError
from loramerge.server.store import SqliteStore
from loramerge.server.tuning import (
    PhiCache,
    Tuner,
    apply_tuned,
    check_tuned,
    misfit,
    tuned_choice,
    tuned_weights,
)
from loramerge.server.version_key import version_key
from loramerge_client import _convert

PREFERENCE = {"code": 1.0, "math": 3.0}


def make_phi(pool: AdapterPool, names: list[str], extra: int = 0) -> TaraPhi:
    generator = torch.Generator().manual_seed(11)
    sizes = phi_sizes(pool, tuple(pool.names.index(n) for n in names))
    return TaraPhi(
        names, {k: torch.rand(len(names), q + extra, generator=generator) for k, q in sizes.items()}
    )


def record(
    weights: object | None = None, preference: dict[str, float] = PREFERENCE
) -> TenantRecord:
    summary = getattr(weights, "summary", None)
    return TenantRecord(
        "acme",
        preference,
        MergeChoice("tara", pico=False, svc=False),
        3,
        datetime.now(UTC),
        summary,
    )


def spec(**changes: object) -> MergeSpec:
    return dataclasses.replace(MergeSpec("tara", pico=False), **changes)  # type: ignore[arg-type]


def test_phi_for_the_pool_and_preference_is_accepted(pool3: AdapterPool) -> None:
    weights = tuned_weights(make_phi(pool3, ["code", "math"]), pool3, PREFERENCE, "file")
    check_tuned(weights, pool3, PREFERENCE)
    check_tuned(weights, pool3, {"code": 2.0, "math": 6.0})  # the same once normalised
    assert weights.summary.preference == {"code": 0.25, "finance": 0.0, "math": 0.75}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"preference": {"code": 1.0, "math": 1.0}}, "tenant.preference"),
        ({"preference": {"code": 1.0, "finance": 1.0, "math": 3.0}}, "tenant.preference"),
        ({"fingerprint": "0" * 64}, "tuned.adapter_fingerprints[1]"),
    ],
)
def test_phi_for_another_pool_or_preference_is_rejected(
    pool3: AdapterPool, change: dict, field: str
) -> None:
    weights = tuned_weights(make_phi(pool3, ["code", "math"]), pool3, PREFERENCE, "file")
    if "fingerprint" in change:
        summary = dataclasses.replace(
            weights.summary,
            adapter_fingerprints=(weights.summary.adapter_fingerprints[0], change["fingerprint"]),
        )
        weights = dataclasses.replace(weights, summary=summary)
    with pytest.raises(InvalidRequestError) as caught:
        check_tuned(weights, pool3, change.get("preference", PREFERENCE))
    assert caught.value.field == field


def test_phi_of_a_wrong_shape_is_rejected_naming_the_module(pool3: AdapterPool) -> None:
    weights = tuned_weights(make_phi(pool3, ["code", "math"], extra=1), pool3, PREFERENCE, "file")
    with pytest.raises(InvalidParameterError) as caught:
        check_tuned(weights, pool3, PREFERENCE)
    assert caught.value.field == f"tuned.modules[{pool3.module_names[0]!r}]"


def test_a_tuned_tenant_merges_with_tara_without_pico_or_svc() -> None:
    assert tuned_choice(MergeChoice(), "tenant.merge") == MergeChoice("tara", pico=False, svc=False)
    kept = tuned_choice(MergeChoice("tara", params={"scaling": 0.3}, rank=8), "m")
    assert kept.params == {"scaling": 0.3} and kept.rank == 8
    for choice, field in ((MergeChoice("ties"), "m.method"), (MergeChoice(pico=True), "m.pico")):
        with pytest.raises(InvalidRequestError) as caught:
            tuned_choice(choice, "m")
        assert caught.value.field == field


def _changed_pool(tmp_path: Path, pool: AdapterPool, name: str) -> AdapterPool:
    """`pool` with adapter `name` replaced by different content under the same name."""
    path = write_adapter(tmp_path / f"new-{name}", random_factors(77))
    from loramerge.merge_engine import load_adapter

    return pool.with_adapter(load_adapter(path, name))


def test_phi_serves_while_its_adapters_stay_and_never_after(
    pool3: AdapterPool, tmp_path: Path
) -> None:
    phi = make_phi(pool3, ["code", "math"])
    weights = tuned_weights(phi, pool3, PREFERENCE, "file")
    store = SqliteStore(tmp_path / "db.sqlite")
    store.set_tenant("acme", PREFERENCE, MergeChoice("tara"), None, weights)
    cache = PhiCache(store)
    tenant = record(weights)

    def applied(pool: AdapterPool, merge_spec: MergeSpec, inline: bool = False) -> bool:
        result = asyncio.run(apply_tuned(cache, tenant, pool, merge_spec, inline))
        return result.phi == phi

    assert applied(pool3, spec())
    extra = write_adapter(tmp_path / "legal", random_factors(9))
    from loramerge.merge_engine import load_adapter

    grown = pool3.with_adapter(load_adapter(extra))  # another adapter: φ still fits
    assert misfit(weights.summary, grown) is None and applied(grown, spec())
    assert not applied(pool3, spec(), inline=True)  # an inline preference is another merge
    assert not applied(pool3, spec(method="ta"))
    assert not applied(pool3, spec(pico=True))
    changed = _changed_pool(tmp_path, pool3, "math")
    assert "'math' changed" in (misfit(weights.summary, changed) or "")
    assert not applied(changed, spec())
    shrunk = pool3.without("code")
    assert "'code'" in (misfit(weights.summary, shrunk) or "") and not applied(shrunk, spec())
    store.close()


def test_get_tenant_says_active_or_stale_with_the_reason(
    pool3: AdapterPool, tmp_path: Path
) -> None:
    weights = tuned_weights(make_phi(pool3, ["code", "math"]), pool3, PREFERENCE, "file")
    tuner = Tuner(SqliteStore(tmp_path / "db.sqlite"), None, None, None)  # type: ignore[arg-type]
    active = tuner.status(record(weights), pool3)
    assert active is not None and active.state == "active" and active.digest == weights.phi.digest
    stale = tuner.status(record(weights), _changed_pool(tmp_path, pool3, "code"))
    assert stale is not None and stale.state == "stale"
    assert "untuned" in stale.message and "'code'" in stale.message
    assert tuner.status(record(None), pool3) is None


def test_the_version_key_includes_phi(pool3: AdapterPool) -> None:
    rho = (0.25, 0.0, 0.75)
    phi = make_phi(pool3, ["code", "math"])
    other = TaraPhi(phi.adapters, {k: v * 2 for k, v in phi.modules.items()})
    plain = version_key(pool3, spec(), rho, 0.01)
    tuned = version_key(pool3, spec(phi=phi), rho, 0.01)
    assert plain != tuned != version_key(pool3, spec(phi=other), rho, 0.01)
    assert tuned == version_key(
        pool3, spec(phi=TaraPhi(phi.adapters, dict(phi.modules))), rho, 0.01
    )


def test_phi_json_reaches_the_server_unchanged(pool3: AdapterPool) -> None:
    """phi.json rows (one per adapter) → the client's message → the server's TaraPhi."""
    phi = make_phi(pool3, ["code", "math"])
    data = {
        "adapters": list(phi.adapters),
        "adapter_fingerprints": [pool3.adapter(n).fingerprint for n in phi.adapters],
        "preference": PREFERENCE,
        "pool_fingerprint": pool3.fingerprint,
        "modules": {k: v.tolist() for k, v in phi.modules.items()},
    }
    received = translate.tuned_from_proto(_convert.tuned_weights(data), "tuned")
    assert received.phi == phi and received.summary.source == "file"
    check_tuned(received, pool3, PREFERENCE)
    served = merge(pool3, PREFERENCE, MergeSpec("tara", pico=False, phi=received.phi))
    assert served.report.phi == phi.digest


def test_without_transformers_tuning_is_a_failed_precondition_that_says_what_to_do(
    tmp_path: Path,
) -> None:
    """As in the serving image: transformers cannot be imported; TuneTenant's `start` refuses
    (TuningUnavailableError is a ConflictError: FAILED_PRECONDITION) before anything runs."""
    script = textwrap.dedent(
        f"""
        import importlib.machinery, sys
        class Hide(importlib.machinery.PathFinder):
            @classmethod
            def find_spec(cls, name, path=None, target=None):
                if name == "transformers" or name.startswith("transformers."):
                    return None
                return super().find_spec(name, path, target)

        sys.meta_path = [f for f in sys.meta_path if f is not importlib.machinery.PathFinder]
        sys.meta_path.append(Hide)
        from datetime import UTC, datetime
        from pathlib import Path
        from loramerge.server.domain import MergeChoice, TenantRecord
        from loramerge.server.errors import ConflictError
        from loramerge.server.store import SqliteStore
        from loramerge.server.tuning import Tuner, TuningUnavailableError

        store = SqliteStore(Path({str(tmp_path / "db.sqlite")!r}))
        tuner = Tuner(store, None, None, Path({str(tmp_path)!r}))
        record = TenantRecord("acme", {{"a": 1.0}}, MergeChoice(), 1, datetime.now(UTC))
        try:
            tuner.start(record, None, [], 10, 1e-3)
        except TuningUnavailableError as err:
            assert isinstance(err, ConflictError)
            print(err)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "transformers" in done.stdout and "loramerge tenants set --tuned" in done.stdout
