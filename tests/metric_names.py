"""The metric names the server exports, as PromQL sees them: loramerge's own (built from the
`Metrics` class, whatever it holds when the tests run) and the vLLM engine's that deploy/ uses
(checked against a real server's /metrics by tests/integration/test_deploy_metrics.py)."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry

from loramerge.server.config import MetricsSettings
from loramerge.server.metrics import Metrics

# vLLM engine metrics named by deploy/ (dashboards, alerts), in exposition form.
VLLM_METRICS = frozenset(
    {
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:generation_tokens_total",
        "vllm:prompt_tokens_total",
        "vllm:num_preemptions_total",
    }
)
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
}
# Metric names in PromQL: loramerge's, vLLM's and recording rules ("loramerge:...").
_NAME = re.compile(r"\b(loramerge_[a-z0-9_]+|loramerge:[a-z0-9_:]+|vllm:[a-z0-9_:]+)")


def loramerge_metrics() -> frozenset[str]:
    """Every series name loramerge's `Metrics` can expose (tenant labels on)."""
    registry = CollectorRegistry()
    Metrics(MetricsSettings(tenant_labels=True), registry)
    names = set()
    for family in registry.collect():
        names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
    return frozenset(names)


def exported_metrics() -> frozenset[str]:
    return loramerge_metrics() | VLLM_METRICS


def names_in(promql: str) -> set[str]:
    """The loramerge/vLLM metric names a PromQL expression uses."""
    return set(_NAME.findall(promql))
