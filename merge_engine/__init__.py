"""loramerge's merge engine: exact low-rank LoRA merging with Pico calibration.

Pure torch (plus safetensors for files): no vLLM, gRPC or server code. Typical use::

    pool = AdapterPool.load([Path("adapters/math"), Path("adapters/code")])
    result = merge(pool, {"math": 2, "code": 1}, MergeSpec(method="ties", pico=True))
    save_adapter(result, Path("/dev/shm/merged-v1"))
"""

from .adapter import LoraAdapter, LoraModule, load_adapter, validate_adapter_name
from .device import resolve_device, resolve_dtype
from .diagnostics import (
    MergedDiagnostics,
    PoolDiagnostics,
    SpectrumStats,
    merged_diagnostics,
    pool_diagnostics,
)
from .errors import (
    AdapterError,
    AdapterFormatError,
    AdapterNotFoundError,
    ExportError,
    IncompatiblePoolError,
    InvalidAdapterTensorError,
    InvalidArgumentError,
    InvalidParameterError,
    InvalidPreferenceError,
    MergeEngineError,
    MissingStatisticsError,
    UnsupportedAdapterError,
)
from .export import save_adapter
from .merge import MergeReport, MergeResult, MergeSpec, merge
from .methods.registry import METHODS
from .pico import CalibrationCache
from .pool import AdapterPool
from .preference import normalize_preference
from .statistics import STATISTICS_FILE, InputStatistics, load_statistics, save_statistics

__all__ = [
    "METHODS",
    "STATISTICS_FILE",
    "AdapterError",
    "AdapterFormatError",
    "AdapterNotFoundError",
    "AdapterPool",
    "CalibrationCache",
    "ExportError",
    "IncompatiblePoolError",
    "InputStatistics",
    "InvalidAdapterTensorError",
    "InvalidArgumentError",
    "InvalidParameterError",
    "InvalidPreferenceError",
    "LoraAdapter",
    "LoraModule",
    "MergeEngineError",
    "MergeReport",
    "MergeResult",
    "MergeSpec",
    "MergedDiagnostics",
    "MissingStatisticsError",
    "PoolDiagnostics",
    "SpectrumStats",
    "UnsupportedAdapterError",
    "load_adapter",
    "load_statistics",
    "merge",
    "merged_diagnostics",
    "normalize_preference",
    "pool_diagnostics",
    "resolve_device",
    "resolve_dtype",
    "save_adapter",
    "save_statistics",
    "validate_adapter_name",
]
