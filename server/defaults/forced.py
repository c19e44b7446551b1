"""Exact-match scoring and answer log-probabilities by teacher forcing, with a shared prefix.

Greedy decoding returns exactly the expected answer iff, fed the prompt and that answer, the
model's most likely next token is the answer's next token at every answer position and the
end-of-turn token after it. One forward pass per item decides that, instead of a generation
loop: the cheap way to score many merged adapters on a CPU. It is a sufficient condition for
`Task.is_correct` (which also accepts a trailing full stop or another tokenization of the same
text), so teacher-forced accuracy is a lower bound of greedy accuracy; `quality` checks the two
agree on a sample.

Every chat prompt starts with the same system turn; its keys and values are computed once per
batch (batch size 1) and shared by the batch's items.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from .train import chat_prompt

BATCH_SIZE = 32


@dataclass(frozen=True)
class Encoded:
    """Chat sequences split into the shared prefix and right-padded per-item suffixes."""

    prefix: torch.Tensor  # [1, P] token ids shared by every item
    ids: torch.Tensor  # [B, S] suffix ids: the rest of the prompt, then the answer and EOS
    attention: torch.Tensor  # [B, P + S] 1 on real tokens (prefix included)
    targets: torch.Tensor  # [B, S] bool: positions whose NEXT token is an answer token or EOS


def encode(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], answers: Sequence[Sequence[int]]
) -> Encoded:
    """Encode user `prompts` with the chat template and the answer token ids (EOS appended)."""
    sequences = [
        tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
        for prompt in prompts
    ]
    shared = _common_prefix_length(sequences) - 1  # keep ≥ 1 prompt token per item
    prefix = torch.tensor([sequences[0][:shared]])
    rows = [
        (prompt[shared:], [*answer, tokenizer.eos_token_id])
        for prompt, answer in zip(sequences, answers, strict=True)
    ]
    length = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(rows), shared + length), dtype=torch.long)
    attention[:, :shared] = 1
    targets = torch.zeros((len(rows), length), dtype=torch.bool)
    for row, (prompt, answer) in enumerate(rows):
        end = len(prompt) + len(answer)
        ids[row, :end] = torch.tensor(prompt + answer)
        attention[row, shared : shared + end] = 1
        targets[row, len(prompt) - 1 : end - 1] = True
    return Encoded(prefix, ids, attention, targets)


def _common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    first = sequences[0]
    length = min(len(s) for s in sequences)
    for s in sequences[1:]:
        length = next((i for i in range(length) if s[i] != first[i]), length)
    return length


def hidden_states(model: PreTrainedModel, batch: Encoded) -> torch.Tensor:
    """Last hidden states of the suffix positions. → [B, S, hidden]

    The prefix runs once with batch size 1; its cache is repeated over the batch (gradients flow
    through the repeat when grad is enabled).
    """
    cache = DynamicCache(config=model.config)
    model.model(input_ids=batch.prefix, past_key_values=cache, use_cache=True)
    cache.batch_repeat_interleave(int(batch.ids.shape[0]))
    output = model.model(
        input_ids=batch.ids, attention_mask=batch.attention, past_key_values=cache, use_cache=True
    )
    hidden: torch.Tensor = output.last_hidden_state
    return hidden


def target_logits(model: PreTrainedModel, batch: Encoded) -> torch.Tensor:
    """Logits at the positions that predict an answer token or EOS, in row-major order.
    → [positions, vocab] (the LM head runs on those positions only)."""
    hidden = hidden_states(model, batch)
    logits: torch.Tensor = model.lm_head(hidden[batch.targets]).float()
    return logits


def next_tokens(batch: Encoded) -> torch.Tensor:
    """The token each target position must predict, aligned with `target_logits`. → [positions]"""
    following = batch.ids.roll(-1, dims=1)
    return following[batch.targets]


def exact_match(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    answers: Sequence[str],
    progress: Callable[[int, int], None] | None = None,
) -> list[bool]:
    """Whether greedy decoding would answer each prompt with exactly its answer, then stop."""
    results: list[bool] = []
    if progress is not None:
        progress(0, len(prompts))
    for start in range(0, len(prompts), BATCH_SIZE):
        chunk = slice(start, start + BATCH_SIZE)
        answer_ids = [
            tokenizer(answer, add_special_tokens=False)["input_ids"] for answer in answers[chunk]
        ]
        batch = encode(tokenizer, prompts[chunk], answer_ids)
        with torch.inference_mode():
            hits = target_logits(model, batch).argmax(dim=-1) == next_tokens(batch)
        counts = batch.targets.sum(dim=1).tolist()
        results += [bool(part.all()) for part in hits.split(counts)]
        if progress is not None:
            progress(len(results), len(prompts))
    return results
