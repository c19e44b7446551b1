"""The quality table's cross-check: does vLLM, serving a variant's adapter, answer as the folded
model that scored it?

The table scores each variant with its update folded into the base weights (fast on the CPU).
A user gets the same update as a LoRA served by vLLM: another code path, another order of
floating-point operations. For a few test items per task and variant, both generate greedy
answers; the check reports how many are identical. vLLM runs the server's own engine
construction (`server.engine.open_engine`) with the prompts' token ids, so both read exactly
the same tokens.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from loramerge.merge_engine import LoraModule

from ..config import EngineSettings
from ..engine import lora_request, open_engine, quiet_vllm
from .evaluate import MAX_NEW_TOKENS, generate_answers, left_padded_tokenizer
from .folded import FoldedModel
from .train import chat_prompt


@dataclass(frozen=True)
class Agreement:
    """Greedy answers of the folded model and of vLLM on the same items."""

    label: str
    folded: tuple[str, ...]
    served: tuple[str, ...]

    @property
    def same(self) -> int:
        return sum(a.strip() == b.strip() for a, b in zip(self.folded, self.served, strict=True))

    @property
    def total(self) -> int:
        return len(self.folded)


@dataclass(frozen=True)
class Served:
    """A variant as both paths see it: the modules folded into the weights, and the PEFT
    adapter directory vLLM loads (None for the base model)."""

    modules: Mapping[str, LoraModule]
    adapter_dir: Path | None


def check_serving(
    model_dir: Path,
    variants: Mapping[str, Served],
    prompts: Sequence[str],
    folded: FoldedModel,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Agreement]:
    """For each variant (by label), the folded model's and vLLM's greedy answers to
    `prompts`."""
    emit = progress or (lambda _line: None)
    local: dict[str, tuple[str, ...]] = {}
    for label, variant in variants.items():
        folded.fold(variant.modules)
        local[label] = tuple(generate_answers(folded.model, model_dir, list(prompts)))
    folded.fold({})
    tokenizer = left_padded_tokenizer(model_dir)
    ids = [
        tokenizer(chat_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts
    ]
    rank = max((m.rank for v in variants.values() for m in v.modules.values()), default=1)
    served = asyncio.run(_serve(model_dir, variants, ids, rank, emit))
    return {label: Agreement(label, local[label], served[label]) for label in variants}


async def _serve(
    model_dir: Path,
    variants: Mapping[str, Served],
    ids: Sequence[Sequence[int]],
    rank: int,
    emit: Callable[[str], None],
) -> dict[str, tuple[str, ...]]:
    from vllm.sampling_params import SamplingParams

    quiet_vllm()
    settings = EngineSettings(max_loras=1, max_lora_rank=_lora_rank(rank))
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS)
    answers: dict[str, tuple[str, ...]] = {}
    async with open_engine(settings, model_dir) as engine:
        for number, (label, variant) in enumerate(variants.items(), start=1):
            request = None
            if variant.adapter_dir is not None:
                request = lora_request(f"check-{number}", number, str(variant.adapter_dir))

            async def answer(prompt: Sequence[int], request: object = request) -> str:
                text = ""
                async for output in engine.generate(
                    {"prompt_token_ids": list(prompt)},
                    params,
                    uuid.uuid4().hex,
                    lora_request=request,
                ):
                    text = output.outputs[0].text
                return text

            answers[label] = tuple(await asyncio.gather(*(answer(p) for p in ids)))
            if request is not None:
                await engine.remove_lora(number)
            emit(f"vLLM check {number}/{len(variants)}: {label}")
    return answers


def _lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts that holds `rank`."""
    return next(r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= rank)
