"""Fixtures shared by the integration tests."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from harness import ServerProcess, create_key
from loramerge.server.defaults import DefaultAssets, prepare_defaults
from loramerge.v1 import adapters_pb2_grpc, inference_pb2_grpc, merges_pb2_grpc, tenants_pb2_grpc


@pytest.fixture(scope="session")
def default_cache_dir() -> Path:
    """The real cache shared with the server: `$LORAMERGE_CACHE_DIR`, else `~/.cache/loramerge`."""
    return Path(os.environ.get("LORAMERGE_CACHE_DIR", "~/.cache/loramerge")).expanduser()


@pytest.fixture(scope="session")
def default_assets(default_cache_dir: Path) -> DefaultAssets:
    """The default model and adapters, prepared in (or found in) the real cache."""
    return prepare_defaults(default_cache_dir, progress=print)


# --- the real server, one per test session ------------------------------------------------


@pytest.fixture(scope="session")
def task_names(default_assets: DefaultAssets) -> list[str]:
    return sorted(default_assets.adapters)


@pytest.fixture(scope="session")
def allowed_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory RegisterAdapter may read from."""
    return tmp_path_factory.mktemp("allowed")


@pytest.fixture(scope="session")
def server(
    default_assets: DefaultAssets,
    default_cache_dir: Path,
    allowed_root: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServerProcess]:
    """`loramerge serve` with the real engine on the embedded model and default adapters, with
    authentication on: `server.api_key` is an admin key, which `server.channel()` sends."""
    workdir = tmp_path_factory.mktemp("server")
    process = ServerProcess(
        workdir,
        {
            "cache_dir": str(default_cache_dir),
            "log_format": "json",
            "engine": {"max_model_len": 1024},
            "adapters": {"use_default_pool": True, "allowed_roots": [str(allowed_root)]},
            "grpc": {"max_concurrent_requests": 3},
            "merge": {"export_dir": f"/dev/shm/loramerge-test-{uuid.uuid4().hex[:8]}"},
            "store": {"url": f"sqlite:///{workdir / 'loramerge.db'}"},
            "auth": {"enabled": True},
        },
    )
    process.api_key = create_key(process.write_config(), "--admin")
    process.start()
    yield process
    process.cleanup()


@pytest.fixture(scope="session")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with server.channel() as channel:
        yield channel


@pytest.fixture(scope="session")
def inference(channel: grpc.Channel) -> inference_pb2_grpc.InferenceStub:
    return inference_pb2_grpc.InferenceStub(channel)


@pytest.fixture(scope="session")
def tenants(channel: grpc.Channel) -> tenants_pb2_grpc.TenantsStub:
    return tenants_pb2_grpc.TenantsStub(channel)


@pytest.fixture(scope="session")
def adapters(channel: grpc.Channel) -> adapters_pb2_grpc.AdaptersStub:
    return adapters_pb2_grpc.AdaptersStub(channel)


@pytest.fixture(scope="session")
def merges(channel: grpc.Channel) -> merges_pb2_grpc.MergesStub:
    return merges_pb2_grpc.MergesStub(channel)


@pytest.fixture(scope="session")
def adapter_alone_answers(default_assets: DefaultAssets) -> dict[str, list[tuple[str, str, str]]]:
    """Per task: (prompt, greedy answer of its adapter alone, correct answer) for 4 held-out
    items, computed with transformers + peft (the adapter folded into fp32 weights)."""
    from loramerge.server.defaults.evaluate import generate_answers, load_model
    from loramerge.server.defaults.tasks import task_by_name

    model = load_model(default_assets.model_dir, default_assets.adapters["add"], torch.float32)
    examples = task_by_name("add").examples(seed=4242, n=4)
    answers = generate_answers(model, default_assets.model_dir, [e.prompt for e in examples], 8)
    return {"add": [(e.prompt, a, e.answer) for e, a in zip(examples, answers, strict=True)]}
