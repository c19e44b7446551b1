"""The base model with a LoRA update folded into its weights, swappable in place.

Scoring many merged adapters on the CPU is fast this way: W = W0 + ΔW is set into the loaded
model (the base weights are kept apart in float32), and answers are generated at base-model speed
instead of vLLM-CPU's LoRA speed. `server.defaults.evaluate.load_model` folds one PEFT adapter
with peft; this folds any update in the merge engine's form without reloading the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from loramerge.merge_engine import LoraModule

from ..engine import native_bfloat16
from .evaluate import load_model

PEFT_PREFIX = "base_model.model."
"""The prefix PEFT writes before a module's path in the base model."""


def module_delta(module: LoraModule) -> torch.Tensor:
    """ΔW = scale · B A of one adapted module, in float32. → [out, in]"""
    delta: torch.Tensor = module.scale * module.lora_b.float() @ module.lora_a.float()
    return delta


class FoldedModel:
    """A base model whose adapted weights can be set to W0 + ΔW and back, without reloading."""

    def __init__(self, model_dir: Path, dtype: torch.dtype | None = None) -> None:
        """`dtype`: default as the engine serves the model (bfloat16 where the hardware computes
        it natively, else float32: emulated bf16 made scoring ~10× slower on an AVX2 CPU)."""
        self.model_dir = model_dir
        if dtype is None:
            dtype = torch.bfloat16 if native_bfloat16() else torch.float32
        self.model: LlamaForCausalLM = load_model(model_dir, None, dtype)
        self._weights = dict(self.model.named_parameters())
        self._base: dict[str, torch.Tensor] = {}  # parameter name → W0 in float32

    def fold(self, modules: Mapping[str, LoraModule]) -> None:
        """Set W = W0 + ΔW for every module in `modules` (PEFT module keys) and W = W0 for every
        module folded before and absent now."""
        targets = {self._parameter(key): module_delta(m) for key, m in modules.items()}
        with torch.no_grad():
            for name in set(self._base) - set(targets):
                self._weights[name].copy_(self._base[name])
            for name, delta in targets.items():
                weight = self._weights[name]
                base = self._base.setdefault(name, weight.detach().float().clone())
                if delta.shape != base.shape:
                    raise ValueError(f"{name}: update {tuple(delta.shape)} ≠ {tuple(base.shape)}")
                weight.copy_(base + delta)

    def _parameter(self, key: str) -> str:
        name = key.removeprefix(PEFT_PREFIX) + ".weight"
        if name not in self._weights:
            raise ValueError(f"module {key!r} is not a linear layer of {self.model_dir}")
        return name
