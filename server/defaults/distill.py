"""Merge, then distill: train a merged adapter's factors to match its teachers on unlabeled prompts.

The student starts as a merge of the pool (any method, with or without Pico) and its LoRA
factors B, A are trained with AdamW. The target on prompt x is the mixture Σ_t w_t(x) p_t of
the teacher adapters' next-token distributions along one continuation y(x), with

    w_t(x) ∝ ρ_t · exp(−H_t(x) / τ)    (weighting "confidence"; "preference" uses w = ρ)

where ρ is the preference and H_t(x) the entropy of teacher t's first answer token on x: a
teacher trained for the prompt's task is confident, the others are not, so each task's format
comes from its own teacher (with w = ρ a uniform mixture of four formats can win with none).
y(x) is the greedy answer of the teacher with the largest weight; the loss is KL(mixture ‖
student) on the mixture's top-k tokens at every position of y and its end-of-turn token.

The teachers run once, before training (their targets are kept as top-k distributions), so a
step costs one student forward and backward. No labels are used: only prompts.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from loramerge.merge_engine import AdapterPool, LoraModule, MergeResult, MergeSpec, merge

from ..engine import native_bfloat16
from .evaluate import generate_answers, left_padded_tokenizer
from .folded import PEFT_PREFIX
from .forced import encode, target_logits

Weighting = Literal["confidence", "preference"]
StepProgress = Callable[[int, int, float], None]  # (step, steps, loss)
TOP_K = 16
ANSWER_TOKENS = 12
"""Longest teacher continuation kept (the default tasks' answers take ≤ 9 tokens)."""


@dataclass(frozen=True)
class DistillConfig:
    steps: int = 200
    batch_size: int = 16
    learning_rate: float = 1e-3
    weighting: Weighting = "confidence"
    temperature: float = 0.1  # τ of the confidence weighting, in nats
    seed: int = 0


@dataclass(frozen=True)
class Target:
    """What the student learns on one prompt: a continuation and the mixture along it."""

    prompt: str
    answer: tuple[int, ...]  # continuation token ids (EOS not included)
    top_ids: torch.Tensor  # [len(answer) + 1, TOP_K]
    top_probs: torch.Tensor  # [len(answer) + 1, TOP_K], renormalised
    weights: tuple[float, ...]  # w_t(x) per teacher


class LoraHooks:
    """Adds x Aᵀ Bᵀ to the output of each adapted linear layer, for the factors set last."""

    def __init__(self, model: PreTrainedModel, keys: Sequence[str]) -> None:
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        layers = dict(model.named_modules())
        self._handles = [
            layers[key.removeprefix(PEFT_PREFIX)].register_forward_hook(self._hook(key))
            for key in keys
        ]

    def _hook(self, key: str) -> Callable[..., torch.Tensor]:
        def add_update(
            _module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
        ) -> torch.Tensor:
            if key not in self.factors:
                return output
            b, a = self.factors[key]  # [out, r], [r, in]
            update = F.linear(F.linear(inputs[0].to(a.dtype), a), b)
            return output + update.to(output.dtype)

        return add_update

    @contextmanager
    def using(self, modules: Mapping[str, LoraModule]) -> Iterator[None]:
        """Apply `modules` (scale folded into A) inside the block."""
        saved = self.factors
        self.factors = {
            k: (m.lora_b.float(), m.scale * m.lora_a.float()) for k, m in modules.items()
        }
        try:
            yield
        finally:
            self.factors = saved

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def teacher_weights(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    hooks: LoraHooks,
    teachers: Sequence[Mapping[str, LoraModule]],
    rho: Sequence[float],
    prompts: Sequence[str],
    config: DistillConfig,
) -> torch.Tensor:
    """w_t(x) for every prompt and teacher. → [prompts, teachers]"""
    log_rho = torch.tensor(rho).log()
    if config.weighting == "preference":
        return log_rho.softmax(dim=-1).expand(len(prompts), -1).clone()
    entropies = []
    for modules in teachers:
        with hooks.using(modules), torch.inference_mode():
            rows = []
            for start in range(0, len(prompts), 32):
                chunk = prompts[start : start + 32]
                # empty answers: each row's one target position is the prompt's last token
                logits = target_logits(model, encode(tokenizer, chunk, [[]] * len(chunk)))
                rows.append(torch.distributions.Categorical(logits=logits).entropy())
            entropies.append(torch.cat(rows))
    entropy = torch.stack(entropies, dim=1)  # [prompts, teachers]
    return (log_rho - entropy / config.temperature).softmax(dim=-1)


def build_targets(
    model: PreTrainedModel,
    model_dir: Path,
    hooks: LoraHooks,
    teachers: Sequence[Mapping[str, LoraModule]],
    rho: Sequence[float],
    prompts: Sequence[str],
    config: DistillConfig,
    progress: Callable[[str], None] | None = None,
) -> list[Target]:
    tokenizer = left_padded_tokenizer(model_dir)
    emit = progress or (lambda _line: None)
    emit(f"weighting {len(prompts)} prompts over {len(teachers)} teachers ({config.weighting})")
    weights = teacher_weights(model, tokenizer, hooks, teachers, rho, prompts, config)
    leader = weights.argmax(dim=-1)
    answers: list[list[int]] = [[] for _ in prompts]
    for t, modules in enumerate(teachers):
        chosen = [i for i in range(len(prompts)) if int(leader[i]) == t]
        if not chosen:
            continue
        emit(f"teacher {t + 1}/{len(teachers)}: answering {len(chosen)} prompts")
        with hooks.using(modules):
            texts = generate_answers(model, model_dir, [prompts[i] for i in chosen], ANSWER_TOKENS)
        for i, text in zip(chosen, texts, strict=True):
            answers[i] = tokenizer(text.strip(), add_special_tokens=False)["input_ids"][
                :ANSWER_TOKENS
            ]
    mixture: list[torch.Tensor] = []  # per prompt [positions, vocab] accumulated in float32
    for start in range(0, len(prompts), 32):
        chunk = range(start, min(start + 32, len(prompts)))
        batch = encode(tokenizer, [prompts[i] for i in chunk], [answers[i] for i in chunk])
        counts = batch.targets.sum(dim=1).tolist()
        total: torch.Tensor | None = None
        for t, modules in enumerate(teachers):
            with hooks.using(modules), torch.inference_mode():
                probs = target_logits(model, batch).softmax(dim=-1)  # [positions, vocab]
            w = torch.cat([weights[i, t].expand(c) for i, c in zip(chunk, counts, strict=True)])
            total = probs * w[:, None] if total is None else total + probs * w[:, None]
        assert total is not None
        mixture += list(total.split(counts))
        emit(f"teacher distributions: {min(start + 32, len(prompts))}/{len(prompts)} prompts")
    targets = []
    for i, dist in enumerate(mixture):
        probs, ids = dist.topk(TOP_K, dim=-1)
        targets.append(
            Target(
                prompt=prompts[i],
                answer=tuple(answers[i]),
                top_ids=ids,
                top_probs=probs / probs.sum(dim=-1, keepdim=True),
                weights=tuple(float(w) for w in weights[i]),
            )
        )
    return targets


def distill_loss(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch: Sequence[Target]
) -> torch.Tensor:
    """Mean over target positions of KL(mixture ‖ student) on the mixture's top-k tokens."""
    encoded = encode(tokenizer, [t.prompt for t in batch], [list(t.answer) for t in batch])
    log_student = target_logits(model, encoded).log_softmax(dim=-1)  # [positions, vocab]
    ids = torch.cat([t.top_ids for t in batch])
    probs = torch.cat([t.top_probs for t in batch])
    cross = -(probs * log_student.gather(-1, ids)).sum(dim=-1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1)
    return (cross - entropy).mean()


def training_dtype() -> torch.dtype:
    """bfloat16 where the hardware computes it natively (as the engine serves), else float32."""
    return torch.bfloat16 if native_bfloat16() else torch.float32


def load_training_model(model_dir: Path, dtype: torch.dtype | None = None) -> LlamaForCausalLM:
    """The base model (in `dtype`, default `training_dtype()`) with eager attention, frozen
    (only the LoRA path trains). Eager attention: for these short sequences its backward is
    faster on the CPU than SDPA's (bfloat16 0.96 vs 1.35 s per step of 16 prompts)."""
    model = LlamaForCausalLM.from_pretrained(
        model_dir, dtype=dtype or training_dtype(), attn_implementation="eager"
    )
    model.train(False)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def distill(
    model_dir: Path,
    pool: AdapterPool,
    preference: Mapping[str, float],
    prompts: Sequence[str],
    spec: MergeSpec,
    config: DistillConfig,
    progress: Callable[[str], None] | None = None,
    step_progress: StepProgress | None = None,
) -> tuple[MergeResult, list[float]]:
    """Merge `pool` by `spec`, then train the merged factors on `prompts` (see module doc).

    Returns the tuned merge (same modules and rank as the merge) and the loss per step.
    """
    if not prompts:
        raise ValueError("distillation needs at least one prompt")
    torch.manual_seed(config.seed)
    merged = merge(pool, preference, spec, device="cpu")
    rho = dict(merged.report.preference)
    active = [name for name in pool.names if rho[name] > 0]
    teachers = [pool.adapter(name).modules for name in active]
    model = load_training_model(model_dir)
    hooks = LoraHooks(model, pool.module_names)
    try:
        targets = build_targets(
            model, model_dir, hooks, teachers, [rho[n] for n in active], prompts, config, progress
        )
        student = {
            key: (
                torch.nn.Parameter(m.lora_b.float().clone()),
                torch.nn.Parameter((m.scale * m.lora_a.float()).clone()),
            )
            for key, m in merged.modules.items()
        }
        hooks.factors = {key: pair for key, pair in student.items()}
        parameters = [p for pair in student.values() for p in pair]
        optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=0.0)
        tokenizer = left_padded_tokenizer(model_dir)
        order = random.Random(config.seed)
        losses = []
        for step in range(config.steps):
            batch = order.sample(targets, min(config.batch_size, len(targets)))
            loss = distill_loss(model, tokenizer, batch)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if step_progress is not None:
                step_progress(step + 1, config.steps, losses[-1])
    finally:
        hooks.remove()
    modules = {
        key: LoraModule(lora_a=a.detach().clone(), lora_b=b.detach().clone(), scale=1.0)
        for key, (b, a) in student.items()
    }
    return dataclasses.replace(merged, modules=modules), losses
