"""TARA Variant B tuning: the weights φ of the shared-basis merge, on unlabeled prompts.

ΔW(φ) = U S Σ_i diag(φ_i) V_iᵀ per module (`merge_engine.methods.tara`); φ ∈ R^{n × q} starts at
TA (φ_i = λ · n · ρ_i) and is trained with AdamW to minimise the smooth Tchebycheff scalarisation
of entropy pseudo-losses under the preference ρ (the paper's eq. 10, μ = 1):

    L(φ) = μ log Σ_i exp(ρ_i (H_i(φ) − H_i^own) / μ)

H_i(φ) is the merged model's mean prediction entropy on task i's prompts, H_i^own that of adapter
i alone on the same prompts. For a generative model "prediction" means the next-token
distribution at every position of an answer: the answer is adapter i's own greedy answer to the
prompt (and its end-of-turn token), computed once before training, so no label is used.

Which task a prompt belongs to is given (a `task` field naming the adapter), or else the adapter
whose own first-answer-token entropy on the prompt is lowest (the most confident adapter).

Speed: one step is one forward and backward of the base model on the batch (the adapters and the
answers are computed once, before training); φ and the LoRA path stay float32. The base model
runs in the engine's precision (bfloat16 where the CPU computes it natively, else float32) with
eager attention, and the system turn every chat prompt shares runs once per batch
(`forced.hidden_states`). Measured on this project's 2-core Xeon (AMX) with nothing else running,
one step of 16 prompts: bfloat16 + eager 0.96 s, bfloat16 + SDPA 1.35 s, float32 (either) 1.65 s;
without the shared-prefix cache 1.18 / 1.57 / 2.2 s.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from loramerge.merge_engine import AdapterPool, LoraModule, MergeResult, MergeSpec, TaraPhi, merge
from loramerge.merge_engine.methods.tara import SharedBasis, combine, shared_bases

from .distill import ANSWER_TOKENS, LoraHooks, load_training_model
from .evaluate import generate_answers, left_padded_tokenizer
from .forced import Encoded, encode, target_logits

StepProgress = Callable[[int, int, float], None]  # (step, steps, loss)
Progress = Callable[[str], None]
CHUNK = 32  # prompts per forward pass outside training


@dataclass(frozen=True)
class TuneConfig:
    """How φ is tuned (the paper's settings by default)."""

    steps: int = 500
    batch_size: int = 16
    """Prompts per step, shared evenly by the tasks (every task is in every step)."""
    learning_rate: float = 1e-3
    scaling: float | None = None
    """λ of the initial φ_i = λ · n · ρ_i (TA on the exact basis); None: 1/n, TA's default."""
    mu: float = 1.0
    """μ of the smooth Tchebycheff scalarisation."""
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.steps < 0:
            problems.append(f"steps must be ≥ 0, got {self.steps}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be ≥ 1, got {self.batch_size}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            problems.append(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.scaling is not None and not math.isfinite(self.scaling):
            problems.append(f"scaling must be finite, got {self.scaling}")
        if not (math.isfinite(self.mu) and self.mu > 0):
            problems.append(f"mu must be > 0, got {self.mu}")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class Prompt:
    """An unlabeled prompt and, if known, the adapter whose task it is."""

    text: str
    task: str | None = None


@dataclass(frozen=True)
class Item:
    """A prompt of task `task` (index among the merged adapters) with the own adapter's answer
    and the own adapter's entropy at each answer position."""

    prompt: str
    task: int
    answer: tuple[int, ...]
    own_entropy: torch.Tensor  # [len(answer) + 1]


@dataclass(frozen=True)
class TuneResult:
    """φ, the merge it gives, and how the tuning went."""

    phi: TaraPhi
    merged: MergeResult
    rho: Mapping[str, float]  # the merged adapters' weights
    losses: list[float]
    gaps_first: Mapping[str, float]  # H_i − H_i^own at the first step, per task
    gaps_last: Mapping[str, float]  # ... averaged over the last 10% of steps
    prompts: Mapping[str, int]  # prompts per task
    assigned: int  # prompts whose task was chosen by entropy
    seconds_per_step: float
    prepare_seconds: float
    config: TuneConfig
    dtype: str = "float32"
    notes: list[str] = field(default_factory=list)


class PhiModel:
    """φ as one trainable [G, n, q] tensor per module group, and the LoRA factors it gives."""

    def __init__(self, bases: Sequence[SharedBasis], weights: torch.Tensor) -> None:
        self.bases = bases
        self.u = [b.basis.float() for b in bases]
        self.x = [b.coefficients.float() for b in bases]
        self.phi = [
            torch.nn.Parameter(
                weights.float()[None, :, None].expand(len(b.modules), -1, b.size).clone()
            )
            for b in bases
        ]

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Module key → (b [out, q], a [q, in]) of ΔW(φ), differentiable in φ."""
        out = {}
        for basis, u, x, phi in zip(self.bases, self.u, self.x, self.phi, strict=True):
            b, a = combine(u, x, phi)
            for index, key in enumerate(basis.modules):
                out[key] = (b[index], a[index])
        return out

    def to_phi(self, adapters: Sequence[str]) -> TaraPhi:
        modules = {}
        for basis, phi in zip(self.bases, self.phi, strict=True):
            for index, key in enumerate(basis.modules):
                modules[key] = phi[index].detach()
        return TaraPhi(adapters, modules)


def smooth_tchebycheff(gaps: torch.Tensor, rho: torch.Tensor, mu: float) -> torch.Tensor:
    """μ log Σ_i exp(ρ_i gap_i / μ). gaps, rho: [n] → scalar."""
    return mu * torch.logsumexp(rho * gaps / mu, dim=0)


def position_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each row's softmax, in nats. [positions, vocab] → [positions]"""
    log_p = logits.log_softmax(dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def first_token_entropy(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    hooks: LoraHooks,
    modules: Mapping[str, LoraModule],
    prompts: Sequence[str],
) -> torch.Tensor:
    """Entropy of the first answer token of each prompt under one adapter. → [prompts]"""
    rows = []
    with hooks.using(modules), torch.inference_mode():
        for start in range(0, len(prompts), CHUNK):
            chunk = prompts[start : start + CHUNK]
            rows.append(
                position_entropy(target_logits(model, encode(tokenizer, chunk, [[]] * len(chunk))))
            )
    return torch.cat(rows)


def assign_tasks(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    hooks: LoraHooks,
    adapters: Sequence[Mapping[str, LoraModule]],
    prompts: Sequence[str],
) -> list[int]:
    """Index of the adapter with the lowest first-answer-token entropy on each prompt."""
    if len(adapters) == 1:
        return [0] * len(prompts)
    entropy = torch.stack(
        [first_token_entropy(model, tokenizer, hooks, m, prompts) for m in adapters], dim=1
    )
    return [int(i) for i in entropy.argmin(dim=1)]


def build_items(
    model: LlamaForCausalLM,
    model_dir: Path,
    tokenizer: PreTrainedTokenizerBase,
    hooks: LoraHooks,
    adapters: Sequence[Mapping[str, LoraModule]],
    prompts: Sequence[str],
    tasks: Sequence[int],
    emit: Progress,
) -> list[Item]:
    """Each prompt's own-adapter answer and the own adapter's entropy along it."""
    items: list[Item | None] = [None] * len(prompts)
    for t, modules in enumerate(adapters):
        chosen = [i for i, task in enumerate(tasks) if task == t]
        if not chosen:
            continue
        emit(f"adapter {t + 1}/{len(adapters)}: answering its {len(chosen)} prompts")
        with hooks.using(modules):
            texts = generate_answers(model, model_dir, [prompts[i] for i in chosen], ANSWER_TOKENS)
        answers = [
            tuple(tokenizer(text.strip(), add_special_tokens=False)["input_ids"][:ANSWER_TOKENS])
            for text in texts
        ]
        for start in range(0, len(chosen), CHUNK):
            part = chosen[start : start + CHUNK]
            batch = encode(
                tokenizer,
                [prompts[i] for i in part],
                [list(a) for a in answers[start : start + CHUNK]],
            )
            with hooks.using(modules), torch.inference_mode():
                entropy = position_entropy(target_logits(model, batch))
            counts = batch.targets.sum(dim=1).tolist()
            for i, answer, values in zip(
                part, answers[start : start + CHUNK], entropy.split(counts), strict=True
            ):
                items[i] = Item(prompts[i], t, answer, values.clone())
    return [item for item in items if item is not None]


class Batches:
    """Endless stratified batches: each task's items in reshuffled passes, the batch shared
    evenly by the tasks that have items."""

    def __init__(self, items: Sequence[Item], tasks: int, batch_size: int, seed: int) -> None:
        self._by_task = [[it for it in items if it.task == t] for t in range(tasks)]
        present = [t for t in range(tasks) if self._by_task[t]]
        self._quota = {t: batch_size // len(present) for t in present}
        for t in present[: batch_size % len(present)]:
            self._quota[t] += 1
        self._rng = random.Random(seed)
        self._queues: dict[int, list[Item]] = {t: [] for t in present}

    def __iter__(self) -> Iterator[list[Item]]:
        return self

    def __next__(self) -> list[Item]:
        batch = []
        for t, quota in self._quota.items():
            for _ in range(max(quota, 1)):
                if not self._queues[t]:
                    self._queues[t] = list(self._by_task[t])
                    self._rng.shuffle(self._queues[t])
                batch.append(self._queues[t].pop())
        return batch


def entropy_gaps(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    batch: Sequence[Item],
    tasks: int,
) -> torch.Tensor:
    """H_i − H_i^own on the batch, per task (0 for a task without items). → [tasks]"""
    encoded: Encoded = encode(
        tokenizer, [it.prompt for it in batch], [list(it.answer) for it in batch]
    )
    merged = position_entropy(target_logits(model, encoded))  # [positions]
    own = torch.cat([it.own_entropy for it in batch])
    task = torch.cat([torch.full((len(it.own_entropy),), it.task) for it in batch])
    gaps = []
    for t in range(tasks):
        mask = task == t
        gaps.append((merged[mask] - own[mask]).mean() if bool(mask.any()) else merged.new_zeros(()))
    return torch.stack(gaps)


def tune(
    model_dir: Path,
    pool: AdapterPool,
    preference: Mapping[str, float],
    prompts: Sequence[Prompt],
    config: TuneConfig,
    progress: Progress | None = None,
    step_progress: StepProgress | None = None,
    model: LlamaForCausalLM | None = None,
) -> TuneResult:
    """Tune TARA's φ for `preference` over `pool` on `prompts` (see the module doc).

    Prompts whose task is an adapter of weight 0 are left out. Raises ValueError for a prompt
    naming an adapter the pool lacks, or when no prompt is left for any merged adapter.
    """
    emit = progress or (lambda _line: None)
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    names, rho, bases = shared_bases(pool, preference)
    unknown = sorted({p.task for p in prompts if p.task is not None and p.task not in pool.names})
    if unknown:
        raise ValueError(
            f"prompts name tasks that are no adapter of the pool: {', '.join(unknown)} "
            f"(the pool has {', '.join(pool.names)})"
        )
    if model is None:
        model = load_training_model(model_dir)
    tokenizer = left_padded_tokenizer(model_dir)
    hooks = LoraHooks(model, pool.module_names)
    adapters = [pool.adapter(name).modules for name in names]
    notes = []
    try:
        unassigned = [p.text for p in prompts if p.task is None]
        chosen = iter(
            assign_tasks(model, tokenizer, hooks, adapters, unassigned) if unassigned else []
        )
        if unassigned:
            emit(f"assigned {len(unassigned)} prompts to the adapter with the lowest entropy")
        texts, tasks = [], []
        skipped = 0
        for p in prompts:
            if p.task is None:
                texts.append(p.text)
                tasks.append(next(chosen))
            elif p.task in names:
                texts.append(p.text)
                tasks.append(names.index(p.task))
            else:
                skipped += 1
        if skipped:
            notes.append(f"{skipped} prompts of adapters with weight 0 were left out")
        if not texts:
            raise ValueError("no prompt belongs to an adapter with weight > 0")
        items = build_items(model, model_dir, tokenizer, hooks, adapters, texts, tasks, emit)
        counts = {name: sum(1 for it in items if it.task == t) for t, name in enumerate(names)}
        empty = [name for name, count in counts.items() if count == 0]
        if empty:
            notes.append(f"no prompts for {', '.join(empty)}: their entropy is not tuned for")
        scaling = config.scaling if config.scaling is not None else 1.0 / len(names)
        weights = torch.tensor([scaling * len(names) * r for r in rho])
        phi = PhiModel(bases, weights)
        optimizer = torch.optim.AdamW(phi.phi, lr=config.learning_rate, weight_decay=0.0)
        present = torch.tensor([counts[n] > 0 for n in names])
        rho_t = torch.tensor(rho, dtype=torch.float32)
        prepared = time.perf_counter()
        losses: list[float] = []
        gaps_log: list[torch.Tensor] = []
        batches = Batches(items, len(names), config.batch_size, config.seed)
        train_started = time.perf_counter()
        for step in range(config.steps):
            batch = next(batches)
            hooks.factors = phi.factors()
            gaps = entropy_gaps(model, tokenizer, batch, len(names))
            loss = smooth_tchebycheff(gaps[present], rho_t[present], config.mu)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            gaps_log.append(gaps.detach())
            if step_progress is not None:
                step_progress(step + 1, config.steps, losses[-1])
        trained = time.perf_counter()
    finally:
        hooks.remove()
    tuned = phi.to_phi(names)
    merged = merge(pool, preference, MergeSpec("tara", pico=False, phi=tuned), device="cpu")
    tail = max(1, len(gaps_log) // 10)
    return TuneResult(
        phi=tuned,
        merged=merged,
        rho=dict(zip(names, rho, strict=True)),
        losses=losses,
        gaps_first=_per_task(names, gaps_log[0]) if gaps_log else {},
        gaps_last=_per_task(names, torch.stack(gaps_log[-tail:]).mean(dim=0)) if gaps_log else {},
        prompts=counts,
        assigned=len(unassigned),
        seconds_per_step=(trained - train_started) / max(config.steps, 1),
        prepare_seconds=prepared - started,
        config=config,
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        notes=notes,
    )


def _per_task(names: Sequence[str], values: torch.Tensor) -> dict[str, float]:
    return {name: float(v) for name, v in zip(names, values, strict=True)}


PHI_FORMAT = "loramerge.tara-phi.v1"
"""`format` of phi.json: what `loramerge tenants set --tuned` reads (clients/python)."""


def write_phi_json(result: TuneResult, pool: AdapterPool, path: Path) -> dict[str, Any]:
    """Write φ and what it was tuned for to `path` (JSON); return the summary without φ.

    phi.json: `format`, `adapters` (φ's rows, pool order), `adapter_fingerprints`,
    `preference` (normalised, every pool adapter), `pool_fingerprint`, `method` ("tara"),
    `objective`, `config`, `losses` and the other fields of the summary, and `modules`:
    module key → φ as a list of rows (one per adapter, R weights each).
    """
    summary: dict[str, Any] = {
        "format": PHI_FORMAT,
        "method": "tara",
        "objective": "entropy",
        "adapters": list(result.phi.adapters),
        "adapter_fingerprints": [pool.adapter(n).fingerprint for n in result.phi.adapters],
        "preference": dict(result.merged.report.preference),
        "pool_fingerprint": pool.fingerprint,
        "base_model": pool.base_model,
        "phi_digest": result.phi.digest,
        "config": dataclasses.asdict(result.config),
        "prompts": dict(result.prompts),
        "assigned_by_entropy": result.assigned,
        "seconds_per_step": result.seconds_per_step,
        "prepare_seconds": result.prepare_seconds,
        "dtype": result.dtype,
        "loss_first": result.losses[0] if result.losses else None,
        "loss_last": result.losses[-1] if result.losses else None,
        "entropy_gap_first": dict(result.gaps_first),
        "entropy_gap_last": dict(result.gaps_last),
        "notes": list(result.notes),
        "losses": result.losses,
    }
    modules = {key: value.tolist() for key, value in result.phi.modules.items()}
    path.write_text(json.dumps({**summary, "modules": modules}, indent=1))
    return summary
