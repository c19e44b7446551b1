"""Real PEFT adapter directories for tests: random factors written as safetensors files."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

# A small "model": 3 layers, hidden 24, q_proj 24×24 and v_proj 8×24 (3 heads, 1 KV head).
SHAPES = {"q_proj": (24, 24), "v_proj": (8, 24)}
LAYERS = 3


def module_names(layers: int = LAYERS) -> list[str]:
    return [
        f"base_model.model.model.layers.{i}.self_attn.{kind}"
        for i in range(layers)
        for kind in SHAPES
    ]


def random_factors(
    seed: int, rank: int = 4, layers: int = LAYERS, shared: torch.Tensor | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module → (A [r, in], B [out, r]); `shared` mixes common output directions into B."""
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in module_names(layers):
        d, k = SHAPES[name.rsplit(".", 1)[-1]]
        a = torch.randn(rank, k, generator=generator) / k**0.5
        b = torch.randn(d, rank, generator=generator) / rank**0.5
        if shared is not None:
            b = b + shared[:d, :rank]
        out[name] = (a, b)
    return out


def write_adapter(
    directory: Path,
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    rank: int | None = None,
    alpha: float = 8.0,
    dtype: torch.dtype = torch.float32,
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
    **config: Any,
) -> Path:
    """Write a PEFT adapter directory; `config` entries override adapter_config.json."""
    directory.mkdir(parents=True, exist_ok=True)
    first = next(iter(factors.values()))[0]
    settings = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "tiny-llama",
        "r": rank if rank is not None else int(first.shape[0]),
        "lora_alpha": alpha,
        "target_modules": sorted(SHAPES),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    settings.update(config)
    tensors = {}
    for name, (a, b) in factors.items():
        tensors[f"{name}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"{name}.lora_B.weight"] = b.to(dtype).contiguous()
    tensors.update(extra_tensors or {})
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps(settings))
    return directory


def write_statistics(
    directory: Path, seed: int, layers: int = LAYERS, tokens: int = 40, per_module: bool = False
) -> Path:
    """Write `input_statistics.safetensors` into an adapter directory: per layer one input site
    (q_proj and v_proj read the same input) with the moments of `tokens` random features, some
    of them correlated, so that RegMean's solve is well-posed but not trivial. `per_module`
    stores the same moments once per module instead (a file that does not tell the sharing)."""
    from loramerge.merge_engine import save_statistics
    from loramerge.merge_engine.statistics import statistics_from_sums

    generator = torch.Generator().manual_seed(seed)
    features = SHAPES["q_proj"][1]
    site_of, outer_sums, sums = {}, [], []
    for layer in range(layers):
        mixing = torch.eye(features) + 0.5 * torch.randn(features, features, generator=generator)
        x = (
            torch.randn(tokens, features, generator=generator, dtype=torch.float64)
            @ mixing.double()
        )
        x = x + torch.randn(features, generator=generator, dtype=torch.float64)  # a mean
        for kind in SHAPES:
            if per_module or kind == next(iter(SHAPES)):
                outer_sums.append(x.T @ x)
                sums.append(x.sum(dim=0))
            site_of[f"base_model.model.model.layers.{layer}.self_attn.{kind}"] = len(sums) - 1
    statistics = statistics_from_sums(site_of, outer_sums, sums, tokens=tokens, prompts=tokens // 8)
    return save_statistics(statistics, directory)


def tiny_llama() -> torch.nn.Module:
    """A random Llama whose q_proj is 24×24 and v_proj 8×24, like the test adapters."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32, hidden_size=24, intermediate_size=32, num_hidden_layers=LAYERS,
        num_attention_heads=3, num_key_value_heads=1, head_dim=8,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config)
