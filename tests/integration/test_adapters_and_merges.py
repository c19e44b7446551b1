"""The adapter pool and merged versions over real gRPC: register, remove, diagnostics, merge,
export — with real files and the real engine loading every version."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import grpc
import pytest

from loramerge.merge_engine import load_adapter
from loramerge.v1 import (
    adapters_pb2,
    adapters_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    merges_pb2,
    merges_pb2_grpc,
)

pytestmark = pytest.mark.slow


def test_the_default_pool_is_listed(
    adapters: adapters_pb2_grpc.AdaptersStub, task_names: list[str]
) -> None:
    listing = adapters.ListAdapters(adapters_pb2.ListAdaptersRequest())
    assert sorted(a.name for a in listing.adapters) == sorted(task_names)
    for adapter in listing.adapters:
        assert adapter.rank == 16 and list(adapter.target_modules) == ["q_proj", "v_proj"]
        assert len(adapter.fingerprint) == 64
    assert len(listing.pool_fingerprint) == 64


def test_merge_reports_phases_and_reuses_versions(
    merges: merges_pb2_grpc.MergesStub,
    inference: inference_pb2_grpc.InferenceStub,
    task_names: list[str],
) -> None:
    preference = {task_names[0]: 1.0, task_names[1]: 1.0, task_names[2]: 2.0}
    first = merges.Merge(merges_pb2.MergeRequest(preference=preference))
    assert first.adapter_id and not first.cached
    assert first.rank == 48  # three rank-16 adapters, exact
    assert first.retained_energy_min == pytest.approx(1.0)
    assert first.final_norm > 0 and first.method == "regmean"  # the server's default
    assert {"merge", "export", "total"} <= set(first.phase_seconds)
    assert sum(first.preference.values()) == pytest.approx(1.0)
    again = merges.Merge(merges_pb2.MergeRequest(preference=preference))
    assert again.cached and again.adapter_id == first.adapter_id

    ties = {"method": "ties", "pico": True, "rank": 8, "parameters": {"density": 0.5}}
    capped = merges.Merge(merges_pb2.MergeRequest(preference=preference, merge=ties))
    assert capped.rank == 8 and 0 < capped.retained_energy_min < 1
    assert {"calibrate", "merge", "compensate"} <= set(capped.phase_seconds)
    assert "load" in capped.phase_seconds  # the first of its pool and spec: add_lora'd
    other = {task_names[0]: 1.0, task_names[3]: 1.0}
    later = merges.Merge(merges_pb2.MergeRequest(preference=other, merge=ties))
    assert not later.cached and "load" not in later.phase_seconds  # vLLM loads it in its step
    reply = inference.Generate(
        inference_pb2.GenerateRequest(prompt="Hi", max_tokens=2, preference=other, merge=ties)
    )
    assert reply.adapter_id == later.adapter_id and reply.completion_tokens == 2


def test_export_streams_the_served_peft_adapter(
    merges: merges_pb2_grpc.MergesStub, task_names: list[str], tmp_path: Path
) -> None:
    request = merges_pb2.MergeRequest(preference={task_names[0]: 1.0, task_names[3]: 1.0})
    files: dict[str, bytearray] = {}
    headers = {}
    current = ""
    for part in merges.Export(merges_pb2.ExportRequest(merge=request)):
        if part.HasField("file"):
            current = part.file.name
            headers[current] = part.file
            files[current] = bytearray()
        else:
            files[current] += part.chunk
    assert set(files) == {"adapter_config.json", "adapter_model.safetensors"}
    for name, data in files.items():
        assert headers[name].size == len(data)
        assert headers[name].sha256 == hashlib.sha256(data).hexdigest()
        (tmp_path / name).write_bytes(data)
    config = json.loads(files["adapter_config.json"])
    assert config["r"] == config["lora_alpha"] == 32
    exported = load_adapter(tmp_path, "exported")
    assert len(exported.modules) == 60  # 30 layers × (q_proj, v_proj)
    merged = merges.Merge(request)
    assert merged.cached and merged.adapter_id == headers["adapter_config.json"].adapter_id


def test_register_and_remove_change_the_pool(
    adapters: adapters_pb2_grpc.AdaptersStub,
    merges: merges_pb2_grpc.MergesStub,
    default_assets: object,
    allowed_root: Path,
    task_names: list[str],
) -> None:
    source = default_assets.adapters[task_names[0]]  # type: ignore[attr-defined]
    copy = allowed_root / "copy"
    shutil.copytree(source, copy, dirs_exist_ok=True)
    preference = {task_names[0]: 1.0, task_names[1]: 1.0}
    before = merges.Merge(merges_pb2.MergeRequest(preference=preference))

    registered = adapters.RegisterAdapter(
        adapters_pb2.RegisterAdapterRequest(name="extra", path=str(copy))
    )
    assert (
        registered.adapter.name == "extra"
        and registered.pool_fingerprint != before.pool_fingerprint
    )
    during = merges.Merge(merges_pb2.MergeRequest(preference=preference))
    assert during.adapter_id != before.adapter_id  # new pool: nothing stale is served
    assert during.pool_fingerprint == registered.pool_fingerprint

    with pytest.raises(grpc.RpcError) as info:
        adapters.RegisterAdapter(adapters_pb2.RegisterAdapterRequest(name="extra", path=str(copy)))
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS

    removed = adapters.RemoveAdapter(adapters_pb2.RemoveAdapterRequest(name="extra"))
    assert removed.pool_fingerprint == before.pool_fingerprint
    after = merges.Merge(merges_pb2.MergeRequest(preference=preference))
    assert after.adapter_id not in (before.adapter_id, during.adapter_id)


def test_registration_errors(
    adapters: adapters_pb2_grpc.AdaptersStub, allowed_root: Path, tmp_path: Path
) -> None:
    cases = []
    outside = tmp_path / "outside"
    outside.mkdir()
    cases.append((str(outside), grpc.StatusCode.PERMISSION_DENIED, "not under an allowed root"))
    cases.append((str(allowed_root / "missing"), grpc.StatusCode.NOT_FOUND, "does not exist"))
    broken = allowed_root / "broken"
    broken.mkdir(exist_ok=True)
    (broken / "adapter_config.json").write_text("{not json")
    (broken / "adapter_model.safetensors").write_bytes(b"x")
    cases.append((str(broken), grpc.StatusCode.INVALID_ARGUMENT, "not valid JSON"))
    for path, code, message in cases:
        with pytest.raises(grpc.RpcError) as info:
            adapters.RegisterAdapter(adapters_pb2.RegisterAdapterRequest(name="bad", path=path))
        assert info.value.code() == code, info.value.details()
        assert message in info.value.details()


def test_incompatible_adapter_is_a_failed_precondition(
    adapters: adapters_pb2_grpc.AdaptersStub,
    allowed_root: Path,
    default_assets: object,
    task_names: list[str],
) -> None:
    """An adapter for another model (other shapes) cannot join the pool."""
    import torch
    from safetensors.torch import load_file, save_file

    source = default_assets.adapters[task_names[0]]  # type: ignore[attr-defined]
    other = allowed_root / "other-model"
    other.mkdir(exist_ok=True)
    shutil.copy(source / "adapter_config.json", other / "adapter_config.json")
    tensors = load_file(str(source / "adapter_model.safetensors"))
    tensors = {k: torch.zeros(v.shape[0], 100) if "lora_A" in k else v for k, v in tensors.items()}
    save_file(tensors, str(other / "adapter_model.safetensors"))
    with pytest.raises(grpc.RpcError) as info:
        adapters.RegisterAdapter(adapters_pb2.RegisterAdapterRequest(name="other", path=str(other)))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "different shapes" in info.value.details()


def test_diagnostics_of_the_pool_and_a_merge(
    adapters: adapters_pb2_grpc.AdaptersStub, task_names: list[str]
) -> None:
    report = adapters.GetDiagnostics(
        adapters_pb2.GetDiagnosticsRequest(per_module=True, preference={n: 1.0 for n in task_names})
    )
    assert sorted(report.adapters) == sorted(task_names)
    assert report.overall.modules == 60 and len(report.modules) == 60
    assert set(report.by_module_type) == {"q_proj", "v_proj"}
    assert 0 < report.overall.mean_overlap_b <= 1 and 0 < report.overall.mean_overlap_a <= 1
    assert 1 <= report.overall.mean_effective_rank_b <= 16
    assert len(report.modules[0].overlap_b.values) == 16
    for stats in (report.merged_with_pico, report.merged_without_pico):
        assert 0 < stats.max_energy_share <= 1 and stats.frobenius_norm > 0


def test_concurrent_requests_for_a_new_preference_share_one_merge(
    merges: merges_pb2_grpc.MergesStub, task_names: list[str]
) -> None:
    preference = {task_names[0]: 0.37, task_names[2]: 0.63}
    futures = [
        merges.Merge.future(merges_pb2.MergeRequest(preference=preference)) for _ in range(6)
    ]
    replies = [f.result() for f in futures]
    assert len({r.adapter_id for r in replies}) == 1
    assert sum(not r.cached for r in replies) >= 1
    assert len({tuple(sorted(r.phase_seconds.items())) for r in replies}) == 1  # one merge ran


def test_in_flight_requests_finish_on_their_version_across_a_pool_change(
    inference: inference_pb2_grpc.InferenceStub,
    adapters: adapters_pb2_grpc.AdaptersStub,
    default_assets: object,
    allowed_root: Path,
    task_names: list[str],
) -> None:
    preference = {task_names[1]: 1.0, task_names[3]: 1.0}
    stream = inference.GenerateStream(
        inference_pb2.GenerateRequest(
            prompt="Once upon a time", max_tokens=8, preference=preference
        )
    )
    first = next(stream)
    source = default_assets.adapters[task_names[1]]  # type: ignore[attr-defined]
    shutil.copytree(source, allowed_root / "mid-stream", dirs_exist_ok=True)
    adapters.RegisterAdapter(
        adapters_pb2.RegisterAdapterRequest(name="midstream", path=str(allowed_root / "mid-stream"))
    )
    try:
        rest = list(stream)
        assert {c.adapter_id for c in rest} == {first.adapter_id}
        assert rest[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
        after = inference.Generate(
            inference_pb2.GenerateRequest(prompt="Once", max_tokens=1, preference=preference)
        )
        assert after.adapter_id not in ("", first.adapter_id)
    finally:
        adapters.RemoveAdapter(adapters_pb2.RemoveAdapterRequest(name="midstream"))
