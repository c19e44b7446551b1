"""loramerge_client and the CLI's remote commands against the session's real server, and the
client package installed with pip into a fresh venv (no torch, no vLLM)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import venv
from pathlib import Path

import pytest
from safetensors.torch import load_file

from harness import ServerProcess
from loramerge.merge_engine import load_adapter
from loramerge.server.cli import main
from loramerge_client import (
    AsyncClient,
    Client,
    FailedPrecondition,
    InvalidArgument,
    MergeOptions,
    NotFound,
)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CLIENT_DIR = REPO / "clients" / "python"
# What `pip install ./clients/python` may bring: the client, gRPC, protobuf and their own needs.
ALLOWED_DISTRIBUTIONS = {
    "loramerge-client", "grpcio", "grpcio-status", "protobuf", "googleapis-common-protos",
    "typing-extensions", "pip", "setuptools",
}  # fmt: skip


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Client:
    with Client(server.address, token=server.api_key, timeout=120) as connection:
        yield connection  # type: ignore[misc]


def test_generate_and_stream_on_the_base_model(client: Client) -> None:
    result = client.generate("The capital of France is", max_tokens=6)
    assert "Paris" in result.text
    assert (result.adapter_id, result.finish_reason) == ("", "length")
    assert (result.prompt_tokens, result.completion_tokens) == (5, 6)
    chunks = list(client.stream("The capital of France is", max_tokens=6))
    assert len(chunks) >= 3 and "".join(c.text for c in chunks) == result.text
    assert chunks[-1].finish_reason == "length" and chunks[-1].completion_tokens == 6
    chat = client.generate(messages=[("user", "What is 2+2?")], max_tokens=3)
    assert chat.prompt_tokens > 10  # the chat template was applied


def test_tenants_round_trip_and_typed_errors(client: Client, task_names: list[str]) -> None:
    first, second = task_names[:2]
    ties = MergeOptions(method="ties", parameters={"density": 0.5})
    created = client.set_tenant("client-t1", {first: 2.0, second: 1.0}, ties)
    assert created.version == 1 and created.merge.method == "ties"
    assert created.merge.parameters == {"density": 0.5}
    client.set_tenant("client-t2", {first: 1.0}, {"pico": False}, expected_version=0)
    with pytest.raises(FailedPrecondition):
        client.set_tenant("client-t2", {first: 1.0}, expected_version=0)
    fetched = client.get_tenant("client-t1")
    assert fetched.preference == {first: 2.0, second: 1.0} and fetched.update_time.tzinfo
    listed = [t.tenant_id for t in client.list_tenants(page_size=1)]  # one page per tenant
    assert {"client-t1", "client-t2"} <= set(listed) and listed == sorted(listed)
    with pytest.raises(InvalidArgument) as invalid:
        client.set_tenant("client-t3", {first: -1.0})
    assert invalid.value.field == f"tenant.preference[{first!r}]"
    client.delete_tenant("client-t2")
    with pytest.raises(NotFound) as missing:
        client.get_tenant("client-t2")
    assert missing.value.code.name == "NOT_FOUND"


def test_adapters_and_diagnostics(client: Client, task_names: list[str]) -> None:
    adapters = client.list_adapters()
    assert sorted(a.name for a in adapters) == task_names
    assert all(a.rank > 0 and a.target_modules for a in adapters)
    report = client.diagnostics()
    assert report["adapters"] == [a.name for a in adapters]
    assert report["overall"]["modules"] > 0
    with pytest.raises(NotFound):
        client.remove_adapter("no-such-adapter")


def test_merge_and_export_a_peft_folder(
    client: Client, task_names: list[str], tmp_path: Path
) -> None:
    preference = {task_names[0]: 1.0}
    report = client.merge(preference=preference)
    assert report.adapter_id and report.rank > 0 and report.method == "regmean"
    out = client.export(tmp_path / "merged", preference=preference)
    adapter = load_adapter(out)  # the PEFT folder loads
    assert adapter.modules and (out / "adapter_config.json").is_file()
    assert load_file(out / "adapter_model.safetensors")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"


def test_async_client_has_the_same_calls(server: ServerProcess) -> None:
    async def run() -> tuple[str, str, list[str]]:
        async with AsyncClient(server.address, token=server.api_key, timeout=120) as aclient:
            whole = await aclient.generate("The capital of France is", max_tokens=4)
            parts = [c.text async for c in aclient.stream("The capital of France is",
                                                           max_tokens=4)]  # fmt: skip
            tenants = [t.tenant_id async for t in aclient.list_tenants(page_size=2)]
            with pytest.raises(NotFound):
                await aclient.get_tenant("nobody-at-all")
            return whole.text, "".join(parts), tenants

    whole, streamed, tenants = asyncio.run(run())
    assert whole == streamed and "Paris" in whole
    assert tenants == sorted(tenants)


def test_cli_remote_commands(
    server: ServerProcess, task_names: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert server.api_key is not None
    target = ["--target", server.address, "--token", server.api_key]
    assert main(["generate", "The capital of France is", "--max-tokens", "4", "--json",
                 *target]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert "Paris" in result["text"] and result["completion_tokens"] == 4
    assert main(["generate", "The capital of France is", "--max-tokens", "4", "--stream",
                 *target]) == 0  # fmt: skip
    streamed = capsys.readouterr()
    assert streamed.out.strip() == result["text"].strip() and "base model" in streamed.err
    assert main(["tenants", "set", "cli-t", "--preference", f"{task_names[1]}=1",
                 "--method", "ties", "--param", "density=0.4", *target]) == 0  # fmt: skip
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["TENANT", "VERSION", "PREFERENCE"]
    assert table[1].split()[:2] == ["cli-t", "1"] and "density=0.4" in table[1]
    assert main(["tenants", "list", "--json", *target]) == 0
    assert "cli-t" in [t["tenant_id"] for t in json.loads(capsys.readouterr().out)]
    assert main(["adapters", "list", *target]) == 0
    assert sum(line.split()[0] in task_names for line in capsys.readouterr().out.splitlines()) == 4
    assert main(["tenants", "get", "no-such-tenant", *target]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    assert main(["generate", "x", "--max-tokens", "0", *target]) == 1
    assert "INVALID_ARGUMENT: max_tokens:" in capsys.readouterr().err
    os.environ.update(LORAMERGE_TARGET=server.address, LORAMERGE_TOKEN=server.api_key)
    try:
        assert main(["tenants", "delete", "cli-t"]) == 0  # target and token from the environment
    finally:
        del os.environ["LORAMERGE_TARGET"], os.environ["LORAMERGE_TOKEN"]
    assert "deleted tenant cli-t" in capsys.readouterr().out


def test_pip_install_into_a_fresh_venv_and_run_the_readme_example(
    server: ServerProcess, tmp_path: Path
) -> None:
    """`pip install ./clients/python` into a new venv pulls only gRPC and protobuf (no torch,
    no vLLM), and the README's example runs there against the real server."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         str(CLIENT_DIR)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=json"],
                            capture_output=True, text=True, check=True)  # fmt: skip
    installed = {d["name"].lower().replace("_", "-") for d in json.loads(listed.stdout)}
    assert installed <= ALLOWED_DISTRIBUTIONS, installed - ALLOWED_DISTRIBUTIONS
    readme = (CLIENT_DIR / "README.md").read_text()
    example = re.search(r"```python\n(.*?)```", readme, re.DOTALL)
    assert example is not None
    script = (
        "import importlib.util, sys\n"
        "assert importlib.util.find_spec('torch') is None\n"
        "assert importlib.util.find_spec('vllm') is None\n"
        + example.group(1)
        + "assert 'torch' not in sys.modules\n"
    )
    run = subprocess.run(
        [str(python), "-c", script], capture_output=True, text=True, timeout=300,
        env={"PATH": os.environ["PATH"], "LORAMERGE_TARGET": server.address,
             "LORAMERGE_TOKEN": server.api_key or ""},
        cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Paris" in run.stdout
