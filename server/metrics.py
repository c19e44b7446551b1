"""Prometheus metrics: loramerge's own (prefix `loramerge_`) and vLLM's engine metrics, served
together on one `/metrics` endpoint. Label values come from closed sets; tenant ids appear only
when enabled, and then at most `tenant_label_cap` distinct ones (the rest count as "other")."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from .config import MetricsSettings

_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_SLOW = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
OTHER_TENANT = "other"
ROUTE_OUTCOMES = ("routed", "prior_only", "unavailable")


class Metrics:
    """All of loramerge's metrics, registered in `registry` (by default the process registry,
    where vLLM's engine metrics live too)."""

    def __init__(self, settings: MetricsSettings, registry: CollectorRegistry = REGISTRY) -> None:
        self.settings = settings
        self.merge_duration = Histogram(
            "loramerge_merge_duration_seconds",
            "Time of one merge, by method and phase (calibrate, merge, svc, truncate, "
            "compensate, export, load, total).",
            ["method", "phase"],
            buckets=_FAST,
            registry=registry,
        )
        self.calibration_hits = Counter(
            "loramerge_calibration_cache_hits", "Merges whose Pico calibration was cached.",
            registry=registry,
        )  # fmt: skip
        self.calibration_misses = Counter(
            "loramerge_calibration_cache_misses", "Merges that computed Pico's calibration.",
            registry=registry,
        )  # fmt: skip
        self.merged_hits = Counter(
            "loramerge_merged_adapter_cache_hits",
            "Requests served by an already merged and loaded adapter version.",
            registry=registry,
        )
        self.merged_misses = Counter(
            "loramerge_merged_adapter_cache_misses",
            "Requests that had to wait for a merge (joined or started).",
            registry=registry,
        )
        self.merged_evictions = Counter(
            "loramerge_merged_adapter_cache_evictions",
            "Merged adapter versions evicted from the resident set (parked or deleted).",
            registry=registry,
        )
        self.merged_ahead = Counter(
            "loramerge_merged_ahead",
            "Merged versions built ahead of their first request (when a tenant is stored) and "
            "kept on disk.",
            registry=registry,
        )  # fmt: skip
        self.eviction_errors = Counter(
            "loramerge_merged_adapter_eviction_errors",
            "Removals of a stale pool's versions from the engine that failed (the files are "
            "deleted all the same).",
            registry=registry,
        )
        self.adapter_load_duration = Histogram(
            "loramerge_adapter_load_duration_seconds",
            "Time for the engine to load a merged adapter (add_lora: the first version of each "
            "pool and spec; vLLM loads later ones in its step).",
            buckets=_FAST,
            registry=registry,
        )
        self.resident_adapters = Gauge(
            "loramerge_resident_adapters",
            "Merged adapter versions resident: leased or recently used (vLLM keeps them loaded).",
            registry=registry,
        )
        self.parked_adapters = Gauge(
            "loramerge_parked_adapters",
            "Merged adapter versions evicted whose files are kept for a reload (vLLM may still "
            "hold them until its own LRU drops them).",
            registry=registry,
        )
        self.ahead_backlog = Gauge(
            "loramerge_merge_ahead_backlog",
            "Merged versions waiting to be merged ahead of their first request, or merging.",
            registry=registry,
        )
        self.resident_capacity = Gauge(
            "loramerge_resident_adapters_capacity",
            "Merged adapter versions that may be resident at once (engine.max_cpu_loras, at most "
            "merge.cache_size).",
            registry=registry,
        )
        self.export_dir_bytes = Gauge(
            "loramerge_export_dir_bytes",
            "Bytes of merged adapter versions written in the export directory (tmpfs).",
            registry=registry,
        )
        self.merge_queue_depth = Gauge(
            "loramerge_merge_queue_depth",
            "Merge jobs (merges, exports, diagnostics) waiting for a merge worker.",
            registry=registry,
        )
        self.merge_memory = Gauge(
            "loramerge_merge_memory_bytes",
            "Bytes the merge side keeps on the merge device (calibrations, stacked factors).",
            registry=registry,
        )
        self.requests_in_flight = Gauge(
            "loramerge_requests_in_flight",
            "Generate requests being served, by protocol (grpc, http).",
            ["protocol"],
            registry=registry,
        )
        self.requests = Counter(
            "loramerge_requests",
            "Finished requests by protocol (grpc, http), method and status code (gRPC names).",
            ["protocol", "rpc", "code"],
            registry=registry,
        )  # fmt: skip
        self.request_duration = Histogram(
            "loramerge_request_duration_seconds", "Request latency by protocol and method.",
            ["protocol", "rpc"], buckets=_SLOW,
            registry=registry,
        )  # fmt: skip
        self.time_to_first_token = Histogram(
            "loramerge_time_to_first_token_seconds",
            "From request arrival to the first generated token (merge and load included).",
            buckets=_SLOW,
            registry=registry,
        )
        self.generated_tokens = Counter(
            "loramerge_generated_tokens", "Tokens generated.", registry=registry
        )
        self.route_decisions = Counter(
            "loramerge_route_decisions",
            "Requests that asked for routing (MergeOptions.route), by outcome: routed; "
            "prior_only (the preference gives no adapter with calibration prompts a weight: "
            "served as is); unavailable (routing off or no calibration prompts: a tenant's "
            "stored preference served instead).",
            ["outcome"],
            registry=registry,
        )
        for outcome in ROUTE_OUTCOMES:
            self.route_decisions.labels(outcome=outcome)
        self.route_duration = Histogram(
            "loramerge_route_duration_seconds",
            "Time to route one prompt (features, similarities, preference).",
            buckets=_FAST,
            registry=registry,
        )
        self.route_top_weight = Histogram(
            "loramerge_route_top_weight",
            "Largest weight of a routed preference (1: one adapter).",
            buckets=(0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0),
            registry=registry,
        )
        self.route_adapters = Histogram(
            "loramerge_route_adapters",
            "Adapters with a non-zero weight in a routed preference.",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64),
            registry=registry,
        )
        self.tenant_requests = (
            Counter(
                "loramerge_tenant_requests",
                "Generate requests per tenant (at most tenant_label_cap tenants, then 'other').",
                ["tenant"],
                registry=registry,
            )
            if settings.tenant_labels
            else None
        )
        self._tenants: set[str] = set()
        self._lock = threading.Lock()

    def count_tenant(self, tenant_id: str) -> None:
        """Count a request for `tenant_id` if tenant labels are enabled."""
        if self.tenant_requests is None or not tenant_id:
            return
        with self._lock:
            if (
                tenant_id not in self._tenants
                and len(self._tenants) < self.settings.tenant_label_cap
            ):
                self._tenants.add(tenant_id)
            label = tenant_id if tenant_id in self._tenants else OTHER_TENANT
        self.tenant_requests.labels(tenant=label).inc()


# vLLM metric families with unbounded label values: vllm:lora_requests_info keeps one series per
# set of adapter names ever seen, and every merged version has a new name.
UNBOUNDED_FAMILIES = frozenset({"vllm:lora_requests_info"})


class _Bounded(Collector):
    """Everything in `source` except the families with unbounded label values."""

    def __init__(self, source: CollectorRegistry) -> None:
        self._source = source

    def collect(self) -> Iterable[Metric]:
        return (m for m in self._source.collect() if m.name not in UNBOUNDED_FAMILIES)


def serve_metrics(
    settings: MetricsSettings, source: CollectorRegistry = REGISTRY
) -> tuple[WSGIServer, threading.Thread]:
    """Serve `source` (ours and vLLM's metrics) on http://host:port/metrics in a daemon
    thread, without the unbounded families."""
    exposed = CollectorRegistry(auto_describe=False)
    exposed.register(_Bounded(source))
    server, thread = start_http_server(settings.port, addr=settings.host, registry=exposed)
    return server, thread
