"""Scoring the per-request router offline: "router + <merge method>" rows of the quality table.

Every item is routed on its own (server/router.py, the server's code): its prompt gives a
preference, rounded to the router's step. Items are grouped by that preference; each group's
merge is computed once, folded into the base model and scored on the group's items. So the row
is what the server would answer, request by request, with routing on.

`rule` says how a tenant's preference (`prior`) and the routed one combine — only `product` is
served; the others are measured against it:
- product: ρ ∝ ρ_prior ⊙ softmax(s / T) (the server's rule);
- mixture: ρ = α ρ_prior + (1 − α) softmax(s / T), α = `alpha`;
- static: ρ = ρ_prior for every item (one merge: the comparison without routing).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from loramerge.merge_engine import AdapterPool, MergeSpec, merge

from ..router import (
    Centroids,
    EmbeddingFeatures,
    EmbeddingTable,
    NgramFeatures,
    TextFeatures,
    on_step,
    routed_preference,
)
from .evaluate import left_padded_tokenizer
from .tasks import CALIBRATION_PROMPTS, CALIBRATION_SEED, TASKS

DEFAULT_ROUTE: tuple[tuple[str, Any], ...] = (
    ("alpha", 0.5),
    ("features", "embedding"),
    ("min_weight", 0.0),
    ("prior", ()),
    ("rule", "product"),
    ("step", 0.1),
    ("temperature", 0.05),
)
"""A routed variant's settings (`Variant.route`), sorted by name; `prior` is ((name, w), ...),
empty for uniform."""


def calibration_prompts(pool: AdapterPool, n: int = CALIBRATION_PROMPTS) -> dict[str, list[str]]:
    """Per adapter of `pool` named after a default task, `n` prompts of the task drawn with
    CALIBRATION_SEED: the `calibration_prompts.jsonl` that `loramerge prepare` writes."""
    tasks = {task.name: task for task in TASKS}
    return {
        name: [e.prompt for e in tasks[name].examples(CALIBRATION_SEED, n)] if name in tasks else []
        for name in pool.names
    }


def features_for(kind: str, model_dir: Path) -> TextFeatures:
    if kind == "ngram":
        return NgramFeatures()
    tokenizer = left_padded_tokenizer(model_dir)
    return EmbeddingFeatures(EmbeddingTable(model_dir), lambda: tokenizer)


def route_items(
    pool: AdapterPool,
    model_dir: Path,
    route: Mapping[str, Any],
    prompts: Sequence[str],
) -> list[tuple[float, ...]]:
    """Each prompt's served preference (pool order) under the routed variant's settings."""
    prior_weights = dict(route["prior"]) or {name: 1.0 for name in pool.names}
    prior = [float(prior_weights.get(name, 0.0)) for name in pool.names]
    total = sum(prior)
    prior = [w / total for w in prior]
    if route["rule"] == "static":
        return [on_step(prior, route["step"])] * len(prompts)
    features = features_for(route["features"], model_dir)
    centroids = Centroids.fit(features, calibration_prompts(pool))
    position = [pool.names.index(name) for name in centroids.names]
    similarities = centroids.similarities(features(list(prompts)))  # [n, routable]
    out = []
    for row in similarities.tolist():
        restricted = [prior[i] for i in position]
        if route["rule"] == "product":
            routed = routed_preference(row, restricted, route["temperature"], route["min_weight"])
        else:  # mixture: the prior mixed with the prior-free routed preference
            free = routed_preference(row, [1.0] * len(row), route["temperature"], 0.0)
            assert free is not None
            alpha = route["alpha"]
            routed = tuple(
                alpha * p + (1 - alpha) * f for p, f in zip(restricted, free, strict=True)
            )
        rho = [0.0] * len(pool.names)
        for i, weight in zip(position, routed or restricted, strict=True):
            rho[i] = weight
        out.append(on_step(rho, route["step"]))
    return out


class RoutedScorer:
    """Scores routed variants: items grouped by preference, one merge and fold per group.
    Item results are memoised per (merge, preference, prompt), so candidates that route the
    same way cost nothing more."""

    def __init__(self, scorer: Any) -> None:
        self.scorer = scorer  # quality.Scorer: pool, model_dir, hits()
        self._memo: dict[tuple[str, tuple[float, ...], str], bool] = {}

    def items(self, variant: Any, split: Any) -> dict[str, list[bool]]:
        pool: AdapterPool = self.scorer.pool
        examples = [(t.name, e) for t in TASKS for e in t.examples(split.seed, split.n)]
        prompts = [e.prompt for _, e in examples]
        spec = variant.spec()
        spec_key = json.dumps(
            {"spec": repr(spec), "pool": pool.fingerprint}, sort_keys=True, default=str
        )
        preferences = route_items(pool, self.scorer.model_dir, dict(variant.route), prompts)
        groups: dict[tuple[float, ...], list[int]] = {}
        for index, rho in enumerate(preferences):
            if (spec_key, rho, prompts[index]) not in self._memo:
                groups.setdefault(rho, []).append(index)
        for rho, indices in groups.items():
            modules = _merged(pool, rho, spec)
            hits = self.scorer.hits(
                modules,
                [prompts[i] for i in indices],
                [examples[i][1].answer for i in indices],
                f"{variant.label} {_short(pool, rho)}",
            )
            for i, hit in zip(indices, hits, strict=True):
                self._memo[(spec_key, rho, prompts[i])] = hit
        results: dict[str, list[bool]] = {t.name: [] for t in TASKS}
        for (task, _), prompt, rho in zip(examples, prompts, preferences, strict=True):
            results[task].append(self._memo[(spec_key, rho, prompt)])
        return results

    def versions(self, variant: Any, split: Any) -> int:
        """How many distinct merged versions the split's stream of prompts needs."""
        prompts = [e.prompt for t in TASKS for e in t.examples(split.seed, split.n)]
        routed = route_items(self.scorer.pool, self.scorer.model_dir, dict(variant.route), prompts)
        return len(set(routed))


def _merged(pool: AdapterPool, rho: tuple[float, ...], spec: MergeSpec) -> Mapping[str, Any]:
    """What the server serves for ρ (a one-hot ρ too goes through the method, as served)."""
    preference = {name: w for name, w in zip(pool.names, rho, strict=True) if w > 0}
    with torch.no_grad():
        return merge(pool, preference, spec, device="cpu").modules


def _short(pool: AdapterPool, rho: tuple[float, ...]) -> str:
    return ",".join(f"{n}={w:.2f}" for n, w in zip(pool.names, rho, strict=True) if w > 0)
