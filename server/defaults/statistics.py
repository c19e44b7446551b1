"""Collect an adapter's input statistics: run the base model over its unlabeled prompts.

For each adapted module the statistics (`merge_engine.statistics`) hold E[x xᵀ] and E[x] of the
module's input over every real token of the prompts, each prompt in the model's chat template
as a user turn followed by the assistant header (what the model reads before it answers).
Modules that receive the same input tensor (q/k/v of one attention block) share one site, found
by a first forward pass. Sums accumulate in float64. Only prompts are needed, never answers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from loramerge.merge_engine import InputStatistics
from loramerge.merge_engine.statistics import statistics_from_sums

from .folded import PEFT_PREFIX
from .train import chat_prompt

BATCH_SIZE = 16
MAX_PROMPT_TOKENS = 1024
"""Longer prompts are cut (from the left, keeping the end the model answers after)."""


def collect_statistics(
    model_dir: Path,
    prompts: Sequence[str],
    modules: Sequence[str],
    *,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> InputStatistics:
    """E[x xᵀ] and E[x] of the inputs of `modules` (PEFT keys) of the model in `model_dir` over
    the tokens of `prompts`. `progress(done, total)` after each batch of prompts."""
    if not prompts:
        raise ValueError("input statistics need at least one prompt")
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="right")
    tokenizer.truncation_side = "left"
    layers = dict(model.named_modules())
    missing = [m for m in modules if m.removeprefix(PEFT_PREFIX) not in layers]
    if missing:
        raise ValueError(
            f"{len(missing)} adapted module(s) are not layers of {model_dir}, e.g. {missing[0]!r}"
        )

    def batches() -> list[dict[str, torch.Tensor]]:
        out = []
        for start in range(0, len(prompts), BATCH_SIZE):
            texts = [chat_prompt(tokenizer, p) for p in prompts[start : start + BATCH_SIZE]]
            encoded = tokenizer(
                texts,
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=MAX_PROMPT_TOKENS,
                add_special_tokens=False,
            )
            out.append({k: v.to(device) for k, v in encoded.items()})
        return out

    encoded = batches()
    site_of = _sites(model, layers, modules, encoded[0])
    representatives = {site: module for module, site in reversed(site_of.items())}
    count = len(representatives)
    width = {s: layers[m.removeprefix(PEFT_PREFIX)].in_features for s, m in representatives.items()}
    outer = [
        torch.zeros(width[s], width[s], dtype=torch.float64, device=device) for s in range(count)
    ]
    sums = [torch.zeros(width[s], dtype=torch.float64, device=device) for s in range(count)]
    mask: list[torch.Tensor] = []

    def accumulate(site: int) -> Callable[..., None]:
        def hook(
            _module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], _output: object
        ) -> None:
            x = inputs[0][mask[0]].double()  # [real tokens, in]
            outer[site].addmm_(x.T, x)
            sums[site].add_(x.sum(dim=0))

        return hook

    handles = [
        layers[module.removeprefix(PEFT_PREFIX)].register_forward_hook(accumulate(site))
        for site, module in representatives.items()
    ]
    tokens = 0
    try:
        with torch.inference_mode():
            for index, batch in enumerate(encoded):
                mask[:] = [batch["attention_mask"].bool()]
                tokens += int(mask[0].sum())
                model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                if progress is not None:
                    progress(min((index + 1) * BATCH_SIZE, len(prompts)), len(prompts))
    finally:
        for handle in handles:
            handle.remove()
    return statistics_from_sums(
        site_of, [o.cpu() for o in outer], [s.cpu() for s in sums], tokens, len(prompts)
    )


def _sites(
    model: PreTrainedModel,
    layers: dict[str, torch.nn.Module],
    modules: Sequence[str],
    batch: dict[str, torch.Tensor],
) -> dict[str, int]:
    """Module key → site index; modules whose input is the same tensor share a site. The
    inputs are held until the end of the pass, so no address is reused by another tensor."""
    seen: dict[str, torch.Tensor] = {}

    def record(key: str) -> Callable[..., None]:
        def hook(
            _module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], _output: object
        ) -> None:
            seen[key] = inputs[0]

        return hook

    handles = [
        layers[key.removeprefix(PEFT_PREFIX)].register_forward_hook(record(key)) for key in modules
    ]
    try:
        with torch.inference_mode():
            model.model(
                input_ids=batch["input_ids"][:1], attention_mask=batch["attention_mask"][:1]
            )
    finally:
        for handle in handles:
            handle.remove()
    sites: dict[int, int] = {}
    return {key: sites.setdefault(id(seen[key]), len(sites)) for key in modules}
