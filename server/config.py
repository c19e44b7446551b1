"""The one typed configuration object, built once at start-up from, in rising priority: the
defaults, a YAML file, `LORAMERGE_*` environment variables and command-line flags.

Environment variables name a field by its path joined with `__`, e.g. `LORAMERGE_GRPC__PORT=50052`
or `LORAMERGE_MERGE__HOT_TENANTS='[acme, globex]'`; values are read as YAML scalars or lists.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError

ENV_PREFIX = "LORAMERGE_"
LoraRank = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]  # what vLLM accepts as max_lora_rank


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GrpcSettings(_Section):
    host: str = Field("127.0.0.1", description="Listen address; 0.0.0.0 exposes all interfaces.")
    port: int = Field(50051, ge=1, le=65535, description="gRPC port.")
    max_concurrent_requests: int = Field(
        64, ge=1, description="Generate calls in flight; more get RESOURCE_EXHAUSTED."
    )
    grace_seconds: float = Field(10.0, ge=0, description="In-flight time allowed on SIGTERM.")


class MetricsSettings(_Section):
    host: str = Field("127.0.0.1", description="Listen address of the Prometheus endpoint.")
    port: int = Field(9400, ge=1, le=65535, description="Port of /metrics.")
    tenant_labels: bool = Field(False, description="Label request metrics with tenant ids.")
    tenant_label_cap: int = Field(
        50, ge=1, description="Distinct tenant label values at most; the rest count as 'other'."
    )


class HttpSettings(_Section):
    """The OpenAI-compatible HTTP endpoint (same process, engine, tenants and merges as gRPC)."""

    enabled: bool = Field(True, description="Serve /v1/chat/completions, /v1/completions, ...")
    host: str = Field("127.0.0.1", description="Listen address; 0.0.0.0 exposes all interfaces.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    model_name: str | None = Field(
        None, description="The base model's id in `model`; unset: the model directory's name."
    )
    max_body_bytes: int = Field(
        1 << 20, ge=1024, description="Largest request body; larger gets 413."
    )


class EngineSettings(_Section):
    model: Path | None = Field(
        None, description="HF model directory; unset: the embedded SmolLM2-135M-Instruct."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="Model weights and LoRA compute type; auto: bfloat16 where the hardware "
        "computes it natively (CUDA with bf16, CPUs with AVX512-BF16 or AMX), else float32.",
    )
    max_model_len: int = Field(2048, ge=16, description="Context length (prompt + output).")
    gpu_memory_utilization: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Memory fraction for weights + KV cache (on CPU: of system memory). "
        "Unset: 0.9 on GPU, 0.25 on CPU.",
    )
    max_loras: int = Field(4, ge=1, description="Distinct adapters in one batch (GPU slots).")
    max_cpu_loras: int | None = Field(
        None, ge=1, description="Adapters kept loaded; unset: 4 × max_loras."
    )
    max_lora_rank: LoraRank = Field(64, description="Largest adapter rank vLLM accepts.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per model replica (tensor).")
    pipeline_parallel_size: int = Field(1, ge=1, description="Pipeline stages.")
    distributed_executor_backend: Literal["mp", "ray", "uni"] | None = Field(
        None, description="vLLM executor for multi-GPU (unset: vLLM's choice)."
    )
    seed: int = Field(0, ge=0, description="Engine seed.")

    @model_validator(mode="after")
    def _check(self) -> EngineSettings:
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(
                f"max_cpu_loras ({self.max_cpu_loras}) must be ≥ max_loras ({self.max_loras})"
            )
        return self

    @property
    def resident_adapters(self) -> int:
        return self.max_cpu_loras or 4 * self.max_loras


class AdapterSettings(_Section):
    use_default_pool: bool = Field(
        True, description="Serve the 4 embedded task adapters (trained on first start)."
    )
    paths: dict[str, Path] = Field(
        default_factory=dict, description="More adapters to load at start: name → directory."
    )
    allowed_roots: list[Path] = Field(
        default_factory=list,
        description="RegisterAdapter only reads directories under these (none: API disabled).",
    )


class MergeSettings(_Section):
    method: str = Field(
        "regmean",
        description="Default merge method (chosen by docs/quality.md). regmean needs every merged "
        "adapter's input statistics (`loramerge stats`); see fallback_method.",
    )
    pico: bool = Field(False, description="Default Pico calibration.")
    params: dict[str, Any] = Field(default_factory=dict, description="Default method parameters.")
    svc: bool = Field(False, description="Default SVC post-stage.")
    fallback_method: str = Field(
        "tsvm",
        description="Used, at its own defaults, instead of a default method that needs input "
        "statistics (regmean) when an adapter taking part has none; a method a tenant or request "
        "names itself never falls back (it fails, naming the adapters).",
    )
    fallback_pico: bool = Field(True, description="Pico calibration of the fallback method.")
    device: str = Field("auto", description="Merge device: auto (CUDA if present), cpu, cuda.")
    dtype: Literal["float32", "float64"] = Field("float32", description="Merge precision.")
    preference_step: float = Field(
        0.01,
        gt=0,
        le=0.5,
        description="Preferences are rounded to this step of the simplex before merging, so "
        "nearby preferences share one merged version.",
    )
    cache_size: int = Field(
        32, ge=1, description="Merged versions kept (LRU); also bounds the adapters in vLLM."
    )
    merge_ahead: bool = Field(
        True,
        description="Merge a tenant's version in the background when it is stored (SetTenant) "
        "and keep it on disk, so its first request only loads it; requests' merges go first, "
        "and it counts against merge.cache_size.",
    )
    calibration_cache_size: int = Field(64, ge=1, description="Pico calibrations kept (LRU).")
    export_dir: Path = Field(
        Path("/dev/shm/loramerge"), description="Where merged versions are written (tmpfs)."
    )
    hot_tenants: list[str] = Field(
        default_factory=list, description="Tenants whose merged version is never evicted."
    )
    max_concurrent_merges: int = Field(
        2, ge=1, description="Merge jobs (merges, diagnostics) running at once."
    )
    max_queued_merges: int = Field(
        16, ge=0, description="Merge jobs waiting for a worker; more get RESOURCE_EXHAUSTED."
    )
    cpu_threads: int = Field(
        1,
        ge=1,
        le=1024,
        description="CPU threads each merge job may use (torch intra-op). Merges run on the "
        "CPUs the engine has not pinned to itself (vLLM-CPU pins all cores but one).",
    )
    memory_budget_bytes: int | None = Field(
        None,
        ge=1 << 20,
        description="Bytes the merge side may keep cached on the merge device (calibrations, "
        "stacked factors). Unset: 80% of what is free on the GPU once vLLM has started; on "
        "the CPU 25% of the available memory, at most 8 GiB.",
    )


class RouterSettings(_Section):
    """Preference from the prompt (docs/router.md): requests and tenants that opt in
    (MergeOptions.route) are served the merge for ρ ∝ ρ_tenant ⊙ softmax(s / T), s the cosine
    similarities of the prompt's features to each adapter's calibration prompts."""

    enabled: bool = Field(
        True,
        description="Offer routing. Off: requests asking for it get FAILED_PRECONDITION and "
        "tenants that stored it are served their stored preference.",
    )
    features: Literal["embedding", "ngram"] = Field(
        "embedding",
        description="Prompt features: the mean of the base model's input-embedding rows over "
        "the prompt's tokens (memory-mapped from its safetensors), or hashed character n-grams "
        "(no model needed).",
    )
    temperature: float = Field(
        0.05, ge=0, le=10, description="Default softmax temperature; 0: the nearest adapter only."
    )
    min_weight: float = Field(
        0.0, ge=0, le=0.5, description="Default share below which a routed weight is dropped."
    )
    preference_step: float = Field(
        0.1,
        gt=0,
        le=0.5,
        description="Routed preferences are rounded to this step of the simplex (coarser than "
        "merge.preference_step: close prompts share one merged version).",
    )
    calibration: dict[str, Path] = Field(
        default_factory=dict,
        description="Adapter name → calibration prompt file (JSONL with prompt or messages, or "
        "text lines), for adapters without calibration_prompts.jsonl in their directory.",
    )
    max_calibration_prompts: int = Field(
        256, ge=1, le=100_000, description="Calibration prompts read per adapter at most."
    )
    max_text_chars: int = Field(
        2048, ge=16, description="Characters of a prompt the router reads (the rest is ignored)."
    )


class StoreSettings(_Section):
    url: str = Field(
        "sqlite:///~/.local/share/loramerge/loramerge.db",
        description="Tenant store: sqlite:///path (one replica) or postgresql://user@host/db "
        "(shared by replicas; see docs/deploy.md).",
    )


class AuthSettings(_Section):
    enabled: bool = Field(
        False,
        description="Require an API key ('authorization: Bearer <key>') on every RPC but health; "
        "create keys with `loramerge keys create`.",
    )
    allow_unauthenticated_remote: bool = Field(
        False,
        description="Allow grpc.host to be a non-loopback address with auth off (e.g. behind an "
        "authenticating proxy). Without it such a server refuses to start.",
    )


class TlsSettings(_Section):
    cert_file: Path | None = Field(
        None, description="PEM server certificate chain; with key_file, gRPC serves TLS only."
    )
    key_file: Path | None = Field(None, description="PEM private key of cert_file.")
    client_ca_file: Path | None = Field(
        None, description="PEM CA bundle: clients must present a certificate it signed (mTLS)."
    )

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None

    @model_validator(mode="after")
    def _check(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls.cert_file and tls.key_file go together")
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError("tls.client_ca_file needs tls.cert_file and tls.key_file")
        return self


class LimitSettings(_Section):
    """Per-tenant limits on Generate, GenerateStream, Merge and Export (unset: no limit). A
    request over a limit gets RESOURCE_EXHAUSTED with a google.rpc.RetryInfo delay."""

    requests_per_second: float | None = Field(
        None, gt=0, description="Sustained requests per second per tenant (token bucket)."
    )
    request_burst: int = Field(10, ge=1, description="Requests a tenant may send at once.")
    tokens_per_second: float | None = Field(
        None, gt=0, description="Sustained generated tokens per second per tenant."
    )
    token_burst: int = Field(2048, ge=1, description="Generated tokens a tenant may use at once.")
    max_concurrent_per_tenant: int | None = Field(
        None, ge=1, description="Requests of one tenant in flight at once."
    )
    max_tenants_tracked: int = Field(
        100_000, ge=1, description="Tenants whose budgets are remembered (least recent dropped)."
    )


class Settings(_Section):
    """Everything the server reads; see deploy/loramerge.example.yaml for a commented copy."""

    cache_dir: Path = Field(
        Path("~/.cache/loramerge"), description="Converted model and trained default adapters."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"
    grpc: GrpcSettings = GrpcSettings()
    metrics: MetricsSettings = MetricsSettings()
    http: HttpSettings = HttpSettings()
    engine: EngineSettings = EngineSettings()
    adapters: AdapterSettings = AdapterSettings()
    merge: MergeSettings = MergeSettings()
    router: RouterSettings = RouterSettings()
    store: StoreSettings = StoreSettings()
    auth: AuthSettings = AuthSettings()
    tls: TlsSettings = TlsSettings()
    limits: LimitSettings = LimitSettings()

    @model_validator(mode="after")
    def _expand_paths(self) -> Settings:
        object.__setattr__(self, "cache_dir", self.cache_dir.expanduser())
        return self


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as err:
        raise ConfigError(f"cannot read the config file {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of settings at the top level")
    return data


def _from_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        path = name.removeprefix(ENV_PREFIX).lower().split("__")
        try:
            value = yaml.safe_load(raw) if raw else raw
        except yaml.YAMLError:
            value = raw
        node = values
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return values


def load_settings(
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings from defaults < `config_file` < environment < `overrides` (flags).

    Raises `ConfigError` naming the setting, its value and where settings came from.
    """
    data: dict[str, Any] = {}
    sources = ["defaults"]
    if config_file is not None:
        data = _read_yaml(config_file)
        sources.append(str(config_file))
    env_values = _from_environment(os.environ if environ is None else environ)
    if env_values:
        data = _deep_merge(data, env_values)
        sources.append(f"{ENV_PREFIX}* environment variables")
    if overrides:
        data = _deep_merge(data, overrides)
        sources.append("command-line flags")
    try:
        return Settings.model_validate(data)
    except ValidationError as err:
        problems = []
        for issue in err.errors():
            where = ".".join(str(part) for part in issue["loc"]) or "(top level)"
            given = f" (got {issue['input']!r})" if "input" in issue else ""
            problems.append(f"{where}: {issue['msg']}{given}")
        raise ConfigError(
            "invalid configuration (from "
            + ", ".join(sources)
            + "):\n  - "
            + "\n  - ".join(problems)
        ) from None
