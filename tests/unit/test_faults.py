"""Faults on the merge and storage side, with real files, merges, SQLite and processes (the
engine is a test double here; engine faults run against the real one in
tests/integration/test_lifecycle.py)."""

from __future__ import annotations

import asyncio
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from serving import EngineDouble, fail_first_merge, make_residency, select

from loramerge.merge_engine import AdapterPool
from loramerge.server.errors import OverloadedError
from loramerge.server.registry import AdapterRegistry
from loramerge.server.store import open_store
from loramerge.server.versions import ExportSpaceError


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real tmpfs of 8 KiB: smaller than one merged version of `pool3`."""
    mount = tmp_path / "shm"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(mount)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_export_dir_is_resource_exhausted_and_leaves_nothing(
    pool3: AdapterPool, tiny_tmpfs: Path
) -> None:
    async def scenario() -> None:
        engine = EngineDouble()
        run_dir = tiny_tmpfs / "run-test"
        residency = make_residency(engine, run_dir)
        residency.start()
        for _ in range(2):  # and again: the failure left no space taken
            with pytest.raises(ExportSpaceError, match=r"no space left in merge\.export_dir"):
                async with residency.lease(select(pool3, 1, 1, 0)):
                    pass
            assert list(run_dir.iterdir()) == []  # no partial adapter, no staging directory
        assert isinstance(ExportSpaceError("x"), OverloadedError)  # → RESOURCE_EXHAUSTED
        assert engine.added == [] and residency.resident == 0
        await residency.close()

    asyncio.run(scenario())


def test_a_merge_that_raises_reaches_its_waiters_and_is_not_cached(
    pool3: AdapterPool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = fail_first_merge(monkeypatch)

    async def scenario() -> None:
        engine = EngineDouble()
        residency = make_residency(engine, tmp_path / "run")
        residency.start()

        async def request() -> str:
            async with residency.lease(select(pool3, 2, 1, 0)) as lease:
                return lease.version.adapter_id

        results = await asyncio.gather(request(), request(), return_exceptions=True)
        assert [type(r) for r in results] == [RuntimeError, RuntimeError]
        assert list((tmp_path / "run").glob("*")) == []
        assert await request()  # the next request merges again and succeeds
        assert calls == [True, False]
        await residency.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("damage", ["delete", "corrupt"])
def test_an_adapter_file_damaged_after_registration(
    pool3: AdapterPool, tmp_path: Path, damage: str
) -> None:
    """The pool keeps the adapter's tensors: serving goes on; a restart skips the damaged
    registration with a warning and serves the rest."""
    source = pool3.adapters[0].path
    registered = tmp_path / "allowed" / "extra"
    shutil.copytree(source, registered)
    store = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    registry = AdapterRegistry(store, [tmp_path / "allowed"])
    registry.load_initial({a.name: a.path for a in pool3.adapters})

    async def scenario() -> None:
        _, pool = await registry.register("extra", str(registered))
        weights = registered / "adapter_model.safetensors"
        if damage == "delete":
            weights.unlink()
        else:
            weights.write_bytes(weights.read_bytes()[:100])
        engine = EngineDouble()
        residency = make_residency(engine, tmp_path / "run")
        residency.start()
        async with residency.lease(select(pool, 1, 1, 1, 1)) as lease:
            assert lease.version.lora_id in engine.loaded
        await residency.close()

    asyncio.run(scenario())
    restarted = AdapterRegistry(store, [tmp_path / "allowed"])
    restarted.load_initial({a.name: a.path for a in pool3.adapters})
    assert restarted.pool is not None and restarted.pool.names == pool3.names
    store.close()


WRITER = textwrap.dedent(
    """
    import sys
    from loramerge.server.domain import MergeChoice
    from loramerge.server.store import open_store

    store = open_store(sys.argv[1])
    for i in range(100000):
        record = store.set_tenant(f"t{i % 50}", {"code": float(i + 1)}, MergeChoice(), None)
        print(record.tenant_id, record.version, i + 1, flush=True)  # acknowledged
    """
)


def test_kill_9_of_a_writer_keeps_every_acknowledged_write(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, url], stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout is not None
    acknowledged: dict[str, tuple[int, float]] = {}

    def acknowledge(line: str) -> None:
        if line.endswith("\n"):  # a line the kill cut short was never acknowledged
            tenant, version, weight = line.split()
            acknowledged[tenant] = (int(version), float(weight))

    for line in writer.stdout:
        acknowledge(line)
        if len(acknowledged) == 50 and float(line.split()[-1]) >= 400:
            writer.send_signal(signal.SIGKILL)
            break
    writer.wait()
    for line in writer.stdout:  # acknowledged before the kill landed
        acknowledge(line)

    with sqlite3.connect(tmp_path / "store.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    store = open_store(url)
    for tenant, (version, weight) in acknowledged.items():
        record = store.get_tenant(tenant)
        assert record.version >= version  # a later unacknowledged write may be there too
        if record.version == version:
            assert record.preference == {"code": weight}
        assert store.get_tenant(tenant, version).preference == {"code": weight}
    store.close()
