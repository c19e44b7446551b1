"""Tenants with TARA weights φ on the real server: φ from a file serves the tenant's merge (the
exported adapter is the engine's tara merge with that φ), a pool change that touches φ's adapters
makes it stale (the untuned merge serves, GetTenant says why), and the server tunes φ from
uploaded prompts in the background."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from harness import ServerProcess, eventually
from loramerge.merge_engine import AdapterPool, MergeSpec, TaraPhi, load_adapter, merge
from loramerge.merge_engine.merge import phi_sizes
from loramerge_client import Client, InvalidArgument

pytestmark = pytest.mark.slow

EXTRA = "tara-extra"  # an API-registered adapter the tuned tenants weight


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Client:
    with Client(server.address, token=server.api_key, timeout=300) as connection:
        yield connection  # type: ignore[misc]


def phi_json(pool: AdapterPool, preference: dict[str, float], seed: int) -> dict[str, Any]:
    """A phi.json (as `loramerge tune` writes it) with seeded φ around TA's weights."""
    names = [n for n in pool.names if preference.get(n, 0) > 0]
    sizes = phi_sizes(pool, tuple(pool.names.index(n) for n in names))
    generator = torch.Generator().manual_seed(seed)
    modules = {
        key: (0.5 + 0.2 * torch.rand(len(names), size, generator=generator)).tolist()
        for key, size in sizes.items()
    }
    return {
        "format": "loramerge.tara-phi.v1",
        "adapters": names,
        "adapter_fingerprints": [pool.adapter(n).fingerprint for n in names],
        "preference": preference,
        "pool_fingerprint": pool.fingerprint,
        "modules": modules,
    }


def exported(client: Client, tenant_id: str, into: Path) -> dict[str, torch.Tensor]:
    client.export(into, tenant_id=tenant_id)
    adapter = load_adapter(into)
    return {k: m.scale * m.lora_b.double() @ m.lora_a.double() for k, m in adapter.modules.items()}


def test_tuned_weights_from_a_file_serve_the_tenant_until_their_adapter_changes(
    client: Client, allowed_root: Path, default_assets: Any, task_names: list[str], tmp_path: Path
) -> None:
    first, second = task_names[0], task_names[1]
    shutil.copytree(default_assets.adapters[first], allowed_root / "extra-a", dirs_exist_ok=True)
    shutil.copytree(default_assets.adapters[second], allowed_root / "extra-b", dirs_exist_ok=True)
    client.register_adapter(EXTRA, str(allowed_root / "extra-a"))
    try:
        paths = {**default_assets.adapters, EXTRA: allowed_root / "extra-a"}
        pool = AdapterPool.load({name: Path(path) for name, path in paths.items()})
        preference = {second: 1.0, EXTRA: 1.0}
        data = phi_json(pool, preference, seed=1)

        tenant = client.set_tenant("t-tara", None, tuned=data)  # the preference is φ's
        assert tenant.preference == preference and tenant.merge.method == "tara"
        assert tenant.merge.pico is False and tenant.tuning is not None
        assert tenant.tuning.state == "active" and tenant.tuning.source == "file"
        digest = tenant.tuning.phi_digest
        report = client.merge(tenant_id="t-tara")
        assert report.phi_digest == digest and report.method == "tara"

        # The served adapter is the engine's tara merge with exactly this φ.
        phi = TaraPhi(data["adapters"], {k: torch.tensor(v) for k, v in data["modules"].items()})
        assert phi.digest == digest
        expected = merge(pool, preference, MergeSpec("tara", pico=False, phi=phi), device="cpu")
        served = exported(client, "t-tara", tmp_path / "tuned")
        for key, delta in served.items():
            module = expected.modules[key]
            want = module.lora_b.double() @ module.lora_a.double()
            assert torch.linalg.norm(delta - want) <= 2e-2 * torch.linalg.norm(want), key

        # Another φ is another merged version; the same φ again is the cached one.
        other = client.set_tenant("t-tara-2", None, tuned=phi_json(pool, preference, seed=2))
        assert other.tuning is not None and other.tuning.phi_digest != digest
        assert client.merge(tenant_id="t-tara-2").adapter_id != report.adapter_id
        assert client.merge(tenant_id="t-tara").adapter_id == report.adapter_id

        # An inline preference is another merge: φ does not apply.
        untuned = client.merge(tenant_id="t-tara", preference={second: 1.0, EXTRA: 2.0})
        assert untuned.phi_digest == ""

        # EXTRA changes content under the same name: φ no longer fits; the untuned tara merge
        # serves and GetTenant says why. Registering an unrelated adapter would change nothing.
        client.remove_adapter(EXTRA, force=True)
        client.register_adapter(EXTRA, str(allowed_root / "extra-b"))
        stale = client.get_tenant("t-tara").tuning
        assert stale is not None and stale.state == "stale" and stale.phi_digest == digest
        assert f"'{EXTRA}' changed" in stale.message and "untuned" in stale.message
        after = client.merge(tenant_id="t-tara")
        assert after.phi_digest == "" and after.method == "tara"

        # φ for the old content is refused now, naming the field.
        with pytest.raises(InvalidArgument) as refused:
            client.set_tenant("t-tara", None, tuned=data)
        assert "tuned.adapter_fingerprints[1]" in str(refused.value)
        assert client.get_tenant("t-tara").version == 1  # nothing stored
    finally:
        for tenant_id in ("t-tara", "t-tara-2"):
            with contextlib.suppress(Exception):
                client.delete_tenant(tenant_id)
        client.remove_adapter(EXTRA, force=True)


def test_the_server_tunes_from_uploaded_prompts_in_the_background(
    client: Client, task_names: list[str]
) -> None:
    first, second = task_names[0], task_names[1]
    preference = {first: 1.0, second: 1.0}
    created = client.set_tenant("t-tune", preference)
    prompts = [("What is 12 + 30?", "add"), ("Reverse the order of these words: a b c", None)]
    prompts = [(text, task if task in preference else None) for text, task in prompts]
    try:
        started = client.tune_tenant("t-tune", prompts, steps=2)
        assert started.state == "running" and started.steps_total == 2

        def finished() -> bool:
            tuning = client.get_tenant("t-tune").tuning
            return tuning is not None and tuning.state != "running"

        eventually(finished, timeout=600)
        tenant = client.get_tenant("t-tune")
        assert tenant.tuning is not None, tenant
        assert tenant.tuning.state == "active", tenant.tuning.message
        assert tenant.tuning.source == "prompts" and tenant.version == created.version + 1
        assert tenant.merge.method == "tara" and tenant.preference == preference
        assert client.merge(tenant_id="t-tune").phi_digest == tenant.tuning.phi_digest
    finally:
        client.delete_tenant("t-tune")


def test_tune_entropy_writes_phi_and_the_adapter_it_gives(
    default_assets: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from loramerge.server.cli import main
    from loramerge_client.tuning import read_phi_file

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"prompt": "What is 12 + 30?", "task": "add"}\n'
        '{"messages": [{"role": "user", "content": "What is 41 + 17?"}], "adapter": "add"}\n'
        "Reverse the order of these words: stone river lamp\n"
    )
    pairs = [(n, default_assets.adapters[n]) for n in ("add", "reverse")]
    adapters = [arg for n, p in pairs for arg in ("--adapter", f"{n}={p}")]
    out = tmp_path / "tara"
    code = main(
        ["tune", "--objective", "entropy", *adapters, "--preference", "add=3",
         "--preference", "reverse=1", "--model", str(default_assets.model_dir), "--prompts",
         str(prompts), "--steps", "2", "--batch-size", "2", "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    summary = json.loads((out / "tune.json").read_text())
    assert len(summary["losses"]) == 2 and summary["assigned_by_entropy"] == 1
    assert summary["prompts"]["add"] >= 2 and summary["config"]["steps"] == 2
    assert summary["preference"] == {"add": 0.75, "reverse": 0.25}
    data = read_phi_file(out / "phi.json")  # what `tenants set --tuned` reads
    assert data["adapters"] == ["add", "reverse"]
    phi = TaraPhi(data["adapters"], {k: torch.tensor(v) for k, v in data["modules"].items()})
    assert phi.digest == data["phi_digest"]
    # the PEFT adapter written is the tara merge with exactly this φ
    pool = AdapterPool.load({n: Path(p) for n, p in pairs})
    expected = merge(pool, {"add": 3, "reverse": 1}, MergeSpec("tara", pico=False, phi=phi))
    written = load_adapter(out)
    for key, module in expected.modules.items():
        got = written.modules[key]
        want = module.lora_b.double() @ module.lora_a.double()
        delta = got.scale * got.lora_b.double() @ got.lora_a.double()
        assert torch.linalg.norm(delta - want) <= 1e-5 * torch.linalg.norm(want), key
