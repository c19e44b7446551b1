"""Collect an adapter's input statistics: run the base model over its unlabeled prompts and the
adapter's own answers to them.

For each adapted module the statistics (`merge_engine.statistics`) hold E[x xᵀ] and E[x] of the
module's input over every real token of each sequence: the prompt in the model's chat template
(a user turn and the assistant header) followed by the adapter's own greedy answer (up to
`answer_tokens` tokens; the adapter is folded into the weights to answer, then removed). The
answer tokens are where an adapter's update acts when it generates: measured on the default
pool, RegMean with prompt-only statistics kept 0.88 of the adapters' accuracy, with the answers
0.93 (validation, n = 40 per task). No labels are needed, only prompts.

Modules that receive the same input tensor (q/k/v of one attention block) share one site, found
by a first forward pass. Each batch's products are float32, their sums float64.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from loramerge.merge_engine import InputStatistics, LoraModule
from loramerge.merge_engine.statistics import ANSWER_TOKENS, statistics_from_sums

from .evaluate import generate_answers, left_padded_tokenizer
from .folded import PEFT_PREFIX, FoldedModel
from .train import chat_prompt

BATCH_SIZE = 16
MAX_PROMPT_TOKENS = 1024
"""Longer prompts are cut (from the left, keeping the end the model answers after)."""

Progress = Callable[[str, int, int], None]  # (stage, done, total)


def collect_statistics(
    model_dir: Path,
    prompts: Sequence[str],
    modules: Mapping[str, LoraModule],
    *,
    answer_tokens: int = ANSWER_TOKENS,
    device: str = "cpu",
    progress: Progress | None = None,
) -> InputStatistics:
    """E[x xᵀ] and E[x] of the inputs of the adapter's `modules` (PEFT keys → factors) in the
    model of `model_dir` (run on `device`, in float32), over the tokens of `prompts` and of the
    adapter's greedy answers to them (`answer_tokens` = 0: prompts only).
    `progress(stage, done, total)` after each batch."""
    if not prompts:
        raise ValueError("input statistics need at least one prompt")
    folded = FoldedModel(model_dir, torch.float32)
    model = folded.model.to(device)
    layers = dict(model.named_modules())
    missing = [m for m in modules if m.removeprefix(PEFT_PREFIX) not in layers]
    if missing:
        raise ValueError(
            f"{len(missing)} adapted module(s) are not layers of {model_dir}, e.g. {missing[0]!r}"
        )
    tokenizer = left_padded_tokenizer(model_dir)
    answers = [""] * len(prompts)
    if answer_tokens > 0:
        folded.fold(modules)
        answers = generate_answers(
            model,
            model_dir,
            list(prompts),
            answer_tokens,
            progress=None if progress is None else _stage(progress, "answering"),
        )
        folded.fold({})
    sequences = [
        _sequence(tokenizer, prompt, answer, answer_tokens)
        for prompt, answer in zip(prompts, answers, strict=True)
    ]
    return _accumulate(model, layers, list(modules), sequences, len(prompts), progress)


def _sequence(
    tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str, answer_tokens: int
) -> list[int]:
    prompt_ids = tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer.strip(), add_special_tokens=False)["input_ids"][:answer_tokens]
    return [*prompt_ids[-MAX_PROMPT_TOKENS:], *answer_ids]


def _accumulate(
    model: PreTrainedModel,
    layers: dict[str, torch.nn.Module],
    modules: list[str],
    sequences: list[list[int]],
    prompts: int,
    progress: Progress | None,
) -> InputStatistics:
    site_of = _sites(model, layers, modules, sequences[0])
    representatives = {site: module for module, site in reversed(site_of.items())}
    sites = range(len(representatives))
    width = [layers[representatives[s].removeprefix(PEFT_PREFIX)].in_features for s in sites]
    outer = [torch.zeros(w, w, dtype=torch.float64, device=model.device) for w in width]
    sums = [torch.zeros(w, dtype=torch.float64, device=model.device) for w in width]
    mask: list[torch.Tensor] = []

    def accumulate(site: int) -> Callable[..., None]:
        def hook(
            _module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], _output: object
        ) -> None:
            x = inputs[0][mask[0]].float()  # [real tokens, in]
            outer[site].add_(x.T @ x)
            sums[site].add_(x.sum(dim=0))

        return hook

    handles = [
        layers[module.removeprefix(PEFT_PREFIX)].register_forward_hook(accumulate(site))
        for site, module in representatives.items()
    ]
    tokens = 0
    try:
        with torch.inference_mode():
            for start in range(0, len(sequences), BATCH_SIZE):
                ids, attention = _right_padded(sequences[start : start + BATCH_SIZE], model.device)
                mask[:] = [attention.bool()]
                tokens += int(attention.sum())
                model.model(input_ids=ids, attention_mask=attention)
                if progress is not None:
                    progress("statistics", min(start + BATCH_SIZE, len(sequences)), len(sequences))
    finally:
        for handle in handles:
            handle.remove()
    return statistics_from_sums(
        site_of, [o.cpu() for o in outer], [s.cpu() for s in sums], tokens, prompts
    )


def _right_padded(
    sequences: list[list[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, each [batch, longest], padded on the right with 0."""
    length = max(len(s) for s in sequences)
    ids = torch.zeros((len(sequences), length), dtype=torch.long)
    attention = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence)
        attention[row, : len(sequence)] = 1
    return ids.to(device), attention.to(device)


def _sites(
    model: PreTrainedModel,
    layers: dict[str, torch.nn.Module],
    modules: Sequence[str],
    sequence: list[int],
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
            model.model(input_ids=torch.tensor([sequence], device=model.device))
    finally:
        for handle in handles:
            handle.remove()
    sites: dict[int, int] = {}
    return {key: sites.setdefault(id(seen[key]), len(sites)) for key in modules}


def _stage(progress: Progress, stage: str) -> Callable[[int, int], None]:
    return lambda done, total: progress(stage, done, total)
