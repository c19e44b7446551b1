"""Train the default adapter pool: one PEFT LoRA per default task on the default model.

The recipe is the Pico paper's adapter setting (rank 16, alpha 16, q_proj and v_proj, no bias, no
DoRA) trained with a fixed seed on a fixed stream of generated examples, so the same inputs give
bit-identical adapter files on the same machine. The loss covers only the answer tokens.
"""

from __future__ import annotations

import sys
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from tqdm import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .cache import build_atomically, is_built
from .tasks import TASKS, Example, Task

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TRAIN_SEED = 0
"""Seed of the training examples of every task; held-out evaluation uses other seeds."""


@dataclass(frozen=True)
class Recipe:
    """How every default adapter is trained."""

    rank: int = 16
    alpha: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    batch_size: int = 8
    """Small batches and a high learning rate: the most accuracy per CPU second (measured)."""
    learning_rate: float = 4e-3
    warmup_steps: int = 5


RECIPE = Recipe()


def adapters_dir(cache_dir: Path) -> Path:
    """Where `ensure_default_adapters` keeps the adapters, one folder per task name."""
    return cache_dir / "adapters"


def ensure_default_adapters(
    model_dir: Path, cache_dir: Path, progress: Callable[[str], None] | None = None
) -> dict[str, Path]:
    """Return {task name: adapter folder} for every default task, training the missing ones.

    Each folder holds a PEFT adapter (`adapter_config.json` + `adapter_model.safetensors`) for the
    model in `model_dir`, written atomically so an interrupted run leaves nothing that looks
    complete.
    """
    emit = progress or (lambda _line: None)
    folders = {task.name: adapters_dir(cache_dir) / task.name for task in TASKS}
    missing = [task for task in TASKS if not is_built(folders[task.name], ADAPTER_FILES)]
    if not missing:
        return folders
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for task in missing:
        started = time.monotonic()
        emit(f"training adapter {task.name} ({task.train_steps} steps) ...")
        with build_atomically(folders[task.name]) as staging:
            loss = _train(_load_base(model_dir), tokenizer, task, staging)
        emit(
            f"training adapter {task.name}: {task.train_steps} steps, final loss {loss:.3f}, "
            f"done in {time.monotonic() - started:.1f} s"
        )
    return folders


def _load_base(model_dir: Path) -> PreTrainedModel:
    """A fresh copy of the base model for training (peft modifies the model it wraps)."""
    # float32: the same adapters on every machine, and fast everywhere (CPUs without AVX512-BF16
    # emulate bfloat16 matrix products 10–50× slower). Eager attention: for these ~50-token
    # sequences its backward is several times faster on the CPU than the fused SDPA kernel's.
    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    )


def _train(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    out: Path,
    lora_a: Mapping[str, torch.Tensor] | None = None,
) -> float:
    """Train a fresh LoRA for `task` on `model`, save it into `out` and return the last loss.

    `lora_a` (PEFT module key → [r, in]) replaces PEFT's random A-initialisation of every
    adapted module (B starts at zero either way); A and B both train (OSRM's init)."""
    torch.manual_seed(zlib.crc32(task.name.encode()))  # adapters must not share their init
    config = LoraConfig(
        r=RECIPE.rank,
        lora_alpha=RECIPE.alpha,
        target_modules=list(RECIPE.target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    if lora_a is not None:
        _initialise_a(peft_model, lora_a)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=RECIPE.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _learning_rate_factor(step, task.train_steps)
    )
    examples = task.examples(TRAIN_SEED, task.train_steps * RECIPE.batch_size)
    loss = torch.zeros(())
    peft_model.train()
    steps = tqdm(range(task.train_steps), desc=task.name, unit="step", file=sys.stderr, leave=False)
    for step in steps:
        batch = examples[step * RECIPE.batch_size : (step + 1) * RECIPE.batch_size]
        loss = _answer_loss(model, *_encode(tokenizer, batch))
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    peft_model.save_pretrained(str(out))
    return loss.item()


def _initialise_a(peft_model: torch.nn.Module, lora_a: Mapping[str, torch.Tensor]) -> None:
    """Copy `lora_a` into the fresh adapter's A factors; every adapted module needs one of the
    adapter's shape."""
    suffix = ".lora_A.default.weight"
    parameters = {
        name.removesuffix(suffix): p
        for name, p in peft_model.named_parameters()
        if name.endswith(suffix)
    }
    missing = sorted(set(parameters) - set(lora_a))
    unknown = sorted(set(lora_a) - set(parameters))
    if missing or unknown:
        example = (missing or unknown)[0]
        raise ValueError(
            f"the A-initialisation covers {len(lora_a)} modules, the adapter has "
            f"{len(parameters)}: {len(missing)} missing and {len(unknown)} unknown, e.g. "
            f"{example!r}"
        )
    with torch.no_grad():
        for key, parameter in parameters.items():
            value = lora_a[key]
            if tuple(value.shape) != tuple(parameter.shape):
                raise ValueError(
                    f"A-initialisation of {key!r} has shape {tuple(value.shape)}, the adapter's "
                    f"A has {tuple(parameter.shape)}"
                )
            parameter.copy_(value.to(parameter.dtype))


def _learning_rate_factor(step: int, steps: int) -> float:
    """Linear warm-up over `RECIPE.warmup_steps`, then linear decay to zero at `steps`."""
    warmup = min(1.0, (step + 1) / RECIPE.warmup_steps)
    return warmup * (1.0 - step / steps)


def _encode(
    tokenizer: PreTrainedTokenizerBase, batch: list[Example]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded chat sequences for `batch`: (input ids, attention mask, answer mask), each
    [batch, seq]. The answer mask marks the answer tokens and the closing end-of-turn token."""
    sequences = []
    for example in batch:
        prompt = tokenizer(chat_prompt(tokenizer, example.prompt), add_special_tokens=False)[
            "input_ids"
        ]
        answer = tokenizer(example.answer, add_special_tokens=False)["input_ids"]
        sequences.append((prompt, [*answer, tokenizer.eos_token_id]))
    length = max(len(prompt) + len(answer) for prompt, answer in sequences)
    ids = torch.full((len(batch), length), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(batch), length), dtype=torch.long)
    answer_mask = torch.zeros((len(batch), length), dtype=torch.bool)
    for row, (prompt, answer) in enumerate(sequences):
        end = len(prompt) + len(answer)
        ids[row, :end] = torch.tensor(prompt + answer)
        attention[row, :end] = 1
        answer_mask[row, len(prompt) : end] = True
    return ids, attention, answer_mask


def chat_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """`prompt` as a user turn in the model's chat template, followed by the assistant's header."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    assert isinstance(text, str)
    return text


def _answer_loss(
    model: PreTrainedModel,
    ids: torch.Tensor,  # [batch, seq]
    attention: torch.Tensor,  # [batch, seq]
    answer_mask: torch.Tensor,  # [batch, seq]
) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens.

    Only the positions that predict an answer token go through the LM head: it is a fifth of the
    model's compute per position, and slicing the logits after the fact (`logits_to_keep`) makes
    transformers copy the 49152×576 head once per sequence.
    """
    hidden = model.model(input_ids=ids, attention_mask=attention).last_hidden_state
    predicts_answer = answer_mask.roll(-1, dims=1)  # position t predicts token t + 1
    predicts_answer[:, -1] = False
    logits = model.lm_head(hidden[predicts_answer]).float()  # [answer tokens, vocab]
    return F.cross_entropy(logits, ids[answer_mask])
