"""Merge quality on the default tasks: score variants, choose parameters on validation, report.

A variant is the base model, one adapter alone, a merge (method, parameters, Pico, SVC) of the
pool for a uniform preference, or a tuned adapter from a directory. It is scored by folding its
update into the base weights (`FoldedModel`) and generating greedy answers to held-out prompts
of every default task. Per-item results are cached as JSON under a key of everything that
determines them, so reruns only score what changed.

Splits: parameters are chosen on the validation seed, the table reports the test seed (the
issue's 1234); neither is the training seed of the adapters or the seed of the prompts that
tuning uses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import random
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from loramerge.merge_engine import (
    AdapterPool,
    LoraModule,
    MergeSpec,
    load_adapter,
    merge,
    save_adapter,
)

from .evaluate import left_padded_tokenizer
from .folded import FoldedModel
from .forced import exact_match
from .serving_check import Agreement, Served, check_serving
from .tasks import TASKS, Task

VALIDATION_SEED = 1001
DEFAULT_POOL = "default"
"""The pool of the default adapters: every accuracy is normalised by its adapters' own."""
TEST_SEED = 1234
BOOTSTRAP_SAMPLES = 2000

Progress = Callable[[str, int, int], None]  # (what, done, total)


@dataclass(frozen=True)
class Split:
    """`n` prompts per default task drawn with `seed`."""

    name: Literal["validation", "test"]
    seed: int
    n: int


@dataclass(frozen=True)
class Variant:
    """What is scored. `source` says which other fields apply."""

    label: str
    source: Literal["base", "adapter", "merge", "tuned", "routed"]
    adapter: str | None = None  # adapter: its name in the pool
    method: str | None = None  # merge: the method and its parameters
    params: tuple[tuple[str, Any], ...] = ()
    pico: bool = False
    svc: bool = False
    path: str | None = None  # tuned: a PEFT adapter directory
    subset: tuple[str, ...] = ()  # merge: the adapters with weight (uniform); () = all
    route: tuple[tuple[str, Any], ...] = ()  # routed: router settings (routed.DEFAULT_ROUTE)
    pool: str = DEFAULT_POOL  # adapter, merge: which pool (`Scorer.pools`) the adapters come from

    def preference(self, pool: AdapterPool) -> dict[str, float]:
        """The merge's preference: uniform over `subset`, or over the whole pool."""
        return {name: 1.0 for name in (self.subset or pool.names)}

    def spec(self) -> MergeSpec:
        assert self.method is not None
        return MergeSpec(self.method, dict(self.params), pico=self.pico, svc=self.svc)

    def with_params(self, **values: Any) -> Variant:
        merged = dict(self.params) | values
        return dataclasses.replace(self, params=tuple(sorted(merged.items())))

    def with_route(self, **values: Any) -> Variant:
        merged = dict(self.route) | values
        return dataclasses.replace(self, route=tuple(sorted(merged.items())))


@dataclass(frozen=True)
class Scores:
    """Per-task item results (True = correct) of one variant on one split."""

    variant: Variant
    split: Split
    items: Mapping[str, tuple[bool, ...]]

    def accuracy(self, task: str) -> float:
        values = self.items[task]
        return sum(values) / len(values)


class Scorer:
    """Scores variants on splits with one folded model, caching item results in `cache_dir`.

    `pool` is the default pool; `pools` adds other pools of the same tasks (name → pool, e.g.
    adapters trained from OSRM's init) that variants name in `Variant.pool`."""

    def __init__(
        self,
        model_dir: Path,
        pool: AdapterPool,
        cache_dir: Path,
        progress: Progress | None = None,
        pools: Mapping[str, AdapterPool] | None = None,
    ) -> None:
        self.model_dir = model_dir
        self.pool = pool
        self.pools = {DEFAULT_POOL: pool, **(pools or {})}
        self.cache_dir = cache_dir
        self.progress = progress
        self._model: FoldedModel | None = None
        self._routed: Any = None  # routed.RoutedScorer, made on first use

    def score(self, variant: Variant, split: Split) -> Scores:
        path = self.cache_dir / split.name / f"{self._key(variant, split)}.json"
        if path.is_file():
            items = json.loads(path.read_text())["items"]
            return Scores(variant, split, {t: tuple(v) for t, v in items.items()})
        if variant.source == "routed":
            items = self.routed().items(variant, split)
        else:
            tasks = [t for t in TASKS if not variant.subset or t.name in variant.subset]
            items = self._evaluate(self.updates(variant), split, variant.label, tasks)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"variant": dataclasses.asdict(variant), "split": dataclasses.asdict(split)}
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps({**record, "items": items}))
        temporary.replace(path)
        return Scores(variant, split, {t: tuple(v) for t, v in items.items()})

    def pool_of(self, variant: Variant) -> AdapterPool:
        """The pool `variant`'s adapters come from."""
        pool = self.pools.get(variant.pool)
        if pool is None:
            raise ValueError(f"variant {variant.label!r}: no pool {variant.pool!r} was loaded")
        return pool

    def updates(self, variant: Variant) -> Mapping[str, LoraModule]:
        """The LoRA modules `variant` adds to the base model (none for the base)."""
        if variant.source == "base":
            return {}
        pool = self.pool_of(variant)
        if variant.source == "adapter":
            assert variant.adapter is not None
            return pool.adapter(variant.adapter).modules
        if variant.source == "tuned":
            assert variant.path is not None
            return load_adapter(Path(variant.path)).modules
        return merge(pool, variant.preference(pool), variant.spec(), device="cpu").modules

    def served(self, variant: Variant, scratch: Path) -> Served:
        """`variant` as vLLM would serve it: its modules and a PEFT directory (merges are
        exported into `scratch`)."""
        if variant.source == "base":
            return Served({}, None)
        pool = self.pool_of(variant)
        if variant.source == "adapter":
            assert variant.adapter is not None
            adapter = pool.adapter(variant.adapter)
            return Served(adapter.modules, adapter.path)
        if variant.source == "tuned":
            assert variant.path is not None
            return Served(load_adapter(Path(variant.path)).modules, Path(variant.path))
        result = merge(pool, variant.preference(pool), variant.spec(), device="cpu")
        path = save_adapter(result, scratch / self._key(variant, Split("test", 0, 0)))
        return Served(result.modules, path)

    def check_serving(
        self,
        variants: Sequence[Variant],
        split: Split,
        per_task: int,
        emit: Callable[[str], None] | None = None,
    ) -> dict[str, Agreement]:
        """vLLM's greedy answers against the folded model's on the first `per_task` items of
        each task of `split`, per variant (cached like scores)."""
        check = Split(split.name, split.seed, per_task)
        found: dict[str, Agreement] = {}
        todo: list[Variant] = []
        for variant in variants:
            path = self.cache_dir / "serving" / f"{self._key(variant, check)}.json"
            if path.is_file():
                data = json.loads(path.read_text())
                found[variant.label] = Agreement(variant.label, *map(tuple, data["answers"]))
            else:
                todo.append(variant)
        if not todo:
            return found
        prompts = [e.prompt for task in TASKS for e in task.examples(split.seed, per_task)]
        if self._model is None:
            self._model = FoldedModel(self.model_dir)
        with tempfile.TemporaryDirectory(prefix="loramerge-check-") as scratch:
            served = {v.label: self.served(v, Path(scratch)) for v in todo}
            checked = check_serving(self.model_dir, served, prompts, self._model, emit)
        for variant in todo:
            agreement = checked[variant.label]
            path = self.cache_dir / "serving" / f"{self._key(variant, check)}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"answers": [agreement.folded, agreement.served]}))
            found[variant.label] = agreement
        return found

    def _key(self, variant: Variant, split: Split) -> str:
        content = dataclasses.asdict(variant)
        content.pop("label")
        if not variant.route:
            content.pop("route")  # keys of variants from before routed rows stay valid
        content.pop("pool")  # the pool's fingerprint stands for it (same keys as before pools)
        if variant.source == "tuned":
            assert variant.path is not None
            content["path"] = load_adapter(Path(variant.path)).fingerprint
        else:
            content["pool"] = self.pool_of(variant).fingerprint
        content.update(split=dataclasses.asdict(split), model=self.model_dir.name)
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:24]

    def routed(self) -> Any:
        """The scorer of routed variants (server/defaults/routed.py)."""
        if self._routed is None:
            from .routed import RoutedScorer

            self._routed = RoutedScorer(self)
        return self._routed

    def hits(
        self,
        updates: Mapping[str, LoraModule],
        prompts: Sequence[str],
        answers: Sequence[str],
        label: str,
    ) -> list[bool]:
        """Exact-match results of `prompts` with `updates` folded into the base model."""
        if self._model is None:
            self._model = FoldedModel(self.model_dir)
        self._model.fold(updates)
        return exact_match(
            self._model.model,
            left_padded_tokenizer(self.model_dir),
            prompts,
            answers,
            progress=None if self.progress is None else _bound(self.progress, label),
        )

    def _evaluate(
        self,
        updates: Mapping[str, LoraModule],
        split: Split,
        label: str,
        tasks: Sequence[Task] = TASKS,
    ) -> dict[str, list[bool]]:
        examples = {task.name: task.examples(split.seed, split.n) for task in tasks}
        hits = self.hits(
            updates,
            [e.prompt for task in tasks for e in examples[task.name]],
            [e.answer for task in tasks for e in examples[task.name]],
            label,
        )
        return {
            task.name: hits[index * split.n : (index + 1) * split.n]
            for index, task in enumerate(tasks)
        }


def _bound(progress: Progress, label: str) -> Callable[[int, int], None]:
    return lambda done, total: progress(label, done, total)


# ----------------------------------------------------------------------------- what is scored


METHOD_CONFIGS: tuple[tuple[str, str, tuple[tuple[str, Any], ...]], ...] = (
    ("ta", "ta", ()),
    ("ties", "ties", ()),
    ("dare_linear", "dare_linear", ()),
    ("dare_ties", "dare_ties", ()),
    ("tsvm", "tsvm", ()),
    ("knots_ties", "knots_ties", ()),
    ("knots_dare_ties", "knots_dare_ties", ()),
    ("core[ta]", "core", (("inner", "ta"),)),
    ("core[ties]", "core", (("inner", "ties"),)),
    ("core[tsvm]", "core", (("inner", "tsvm"),)),
    ("core[dare_linear]", "core", (("inner", "dare_linear"),)),
    ("core[dare_ties]", "core", (("inner", "dare_ties"),)),
    ("svd_cur", "svd_cur", ()),
    ("regmean", "regmean", ()),
)
"""(row name, method, fixed parameters) of every merge the table lists."""

SVC_METHODS = ("ta", "ties", "tsvm", "knots_ties")
"""Rows that also get SVC (without Pico, whose compensation would undo SVC's rescaling)."""

# λ candidates: rules that sum (λ_t = λ·N·ρ_t, so λ = 1/N is the average, 1 the sum) and rules
# that take a (disjoint) mean. The method's default is always a candidate too.
SUM_GRID = (0.25, 0.5, 1.0)
MEAN_GRID = (0.5, 1.0, 2.0)
MIX_GRID = (None, 0.5, 0.65, 0.8)  # svd_cur α: eq. 33's rule or a fixed weight
OFF_DIAGONAL_GRID = (0.3, 0.5, 0.7, 0.9, 1.0)  # regmean α
_SUMMING = {"ta", "dare_linear", "tsvm"}
# The router's grid (routed variants): features, temperature (0: the nearest adapter), step.
ROUTE_FEATURES = ("embedding", "ngram")
ROUTE_TEMPERATURES = (0.05, 0.0, 0.1)
ROUTE_STEPS = (0.1,)  # the router's default; finer steps only add merges here
ROUTE_SWEPT = ("features", "temperature", "step")


def base_variants(pool: AdapterPool) -> list[Variant]:
    return [Variant("base model", "base"), *adapter_variants(pool)]


def adapter_variants(pool: AdapterPool, name: str = DEFAULT_POOL) -> list[Variant]:
    """Each adapter of the pool `name` alone."""
    return [
        in_pool(Variant(f"adapter {adapter} alone", "adapter", adapter=adapter), name)
        for adapter in pool.names
    ]


def in_pool(variant: Variant, pool: str) -> Variant:
    """`variant` on the adapters of the pool `pool` (labelled "<pool>: …" unless default)."""
    if pool == DEFAULT_POOL:
        return variant
    return dataclasses.replace(variant, label=f"{pool}: {variant.label}", pool=pool)


def merge_variants() -> list[Variant]:
    """Every method without and with Pico, plus SVC rows, at their default parameters."""
    variants = []
    for row, method, fixed in METHOD_CONFIGS:
        for pico in (False, True):
            label = f"{row} + pico" if pico else row
            variants.append(Variant(label, "merge", method=method, params=fixed, pico=pico))
        if row in SVC_METHODS:
            variants.append(Variant(f"{row} + svc", "merge", method=method, params=fixed, svc=True))
    return variants


def routed_variants() -> list[Variant]:
    """The router rows: per-request preferences from the prompt (server/router.py), merged
    with TA and RegMean at their defaults (docs/router.md)."""
    from .routed import DEFAULT_ROUTE

    return [
        Variant("router + ta", "routed", method="ta", route=DEFAULT_ROUTE),
        Variant("router + regmean", "routed", method="regmean", route=DEFAULT_ROUTE),
    ]


def candidates(variant: Variant) -> list[Variant]:
    """Parameter settings of `variant` tried on validation.

    With Pico, energy compensation rescales every module to the preference-weighted norm of the
    adapters, so λ cancels and only non-scale parameters (svd_cur's α) are swept. A routed
    variant sweeps the router's features, temperature and step (the merge at its defaults).
    """
    assert variant.method is not None
    if variant.source == "routed":
        return [
            variant.with_route(features=features, temperature=temperature, step=step)
            for features in ROUTE_FEATURES
            for temperature in ROUTE_TEMPERATURES
            for step in ROUTE_STEPS
        ]
    if variant.method == "svd_cur":
        return [variant.with_params(mix=mix) for mix in MIX_GRID]
    if variant.method == "regmean":  # λ = 1 is the regression solution; α sets its conditioning
        return [variant] + [variant.with_params(off_diagonal=a) for a in OFF_DIAGONAL_GRID]
    if variant.pico:
        return [variant]
    inner = dict(variant.params).get("inner", variant.method)
    grid = SUM_GRID if inner in _SUMMING else MEAN_GRID
    return [variant] + [variant.with_params(scaling=value) for value in grid]


# ----------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Row:
    """One line of the table: test accuracy per task and the normalised average, with 95%
    intervals, and the parameters chosen on validation."""

    variant: Variant
    accuracy: Mapping[str, float]
    interval: Mapping[str, tuple[float, float]]
    normalised: float
    normalised_interval: tuple[float, float]
    gain_share: float  # (acc − base) / (own − base), averaged over tasks
    validation_normalised: float | None = None
    tried: tuple[tuple[str, float], ...] = field(default=())  # (parameters, validation score)
    rank: int | None = None  # merges: the merged rank
    retained_energy: float | None = None  # merges: worst module's ‖ΔW‖² share kept by truncation
    served: tuple[int, int] | None = None  # (vLLM answers equal to the folded model's, items)
    normalised_own: float | None = None
    """Other pools: normalised by that pool's own adapters instead of the default ones."""


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def normalised(
    scores: Scores, own: Mapping[str, Scores], tasks: Sequence[str] | None = None
) -> float:
    """Mean over `tasks` (default: all scored) of accuracy / the task's own adapter's accuracy
    (same items)."""
    ratios = [scores.accuracy(t) / max(own[t].accuracy(t), 1e-9) for t in tasks or scores.items]
    return sum(ratios) / len(ratios)


def gain_share(scores: Scores, own: Mapping[str, Scores], base: Scores) -> float:
    shares = [
        (scores.accuracy(t) - base.accuracy(t)) / max(own[t].accuracy(t) - base.accuracy(t), 1e-9)
        for t in scores.items
    ]
    return sum(shares) / len(shares)


def normalised_interval(
    scores: Scores, own: Mapping[str, Scores], samples: int = BOOTSTRAP_SAMPLES
) -> tuple[float, float]:
    """95% paired bootstrap interval of `normalised`: items are resampled per task, the same
    resample for the variant and the task's own adapter."""
    rng = random.Random(0)
    values = []
    for _ in range(samples):
        ratios = []
        for task, items in scores.items.items():
            reference = own[task].items[task]
            picks = [rng.randrange(len(items)) for _ in items]
            hits = sum(items[i] for i in picks)
            ratios.append(hits / max(sum(reference[i] for i in picks), 1))
        values.append(sum(ratios) / len(ratios))
    values.sort()
    return values[int(0.025 * samples)], values[int(0.975 * samples) - 1]


def make_row(
    scores: Scores,
    own: Mapping[str, Scores],
    base: Scores,
    validation: float | None = None,
    tried: Sequence[tuple[str, float]] = (),
) -> Row:
    return Row(
        variant=scores.variant,
        accuracy={t: scores.accuracy(t) for t in scores.items},
        interval={t: wilson(sum(v), len(v)) for t, v in scores.items.items()},
        normalised=normalised(scores, own),
        normalised_interval=normalised_interval(scores, own),
        gain_share=gain_share(scores, own, base),
        validation_normalised=validation,
        tried=tuple(tried),
    )


def describe_params(variant: Variant) -> str:
    fixed = {"inner"}
    shown = [f"{k}={v}" for k, v in variant.params if k not in fixed]
    shown += [f"{k}={v}" for k, v in variant.route if k in ROUTE_SWEPT]
    return ", ".join(shown) or "defaults"


# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Table:
    validation: Split
    test: Split
    base: Row
    adapters: tuple[Row, ...]
    merges: tuple[Row, ...]
    tuned: tuple[Row, ...]
    pool_adapters: tuple[Row, ...] = ()  # the adapters of the other pools, each alone

    def best(self) -> Row:
        return max((*self.merges, *self.tuned), key=lambda row: row.normalised)

    @property
    def rows(self) -> tuple[Row, ...]:
        return (self.base, *self.adapters, *self.pool_adapters, *self.merges, *self.tuned)

    @property
    def has_pools(self) -> bool:
        return any(row.variant.pool != DEFAULT_POOL for row in self.rows)

    def replace_rows(self, change: Callable[[Row], Row]) -> Table:
        return dataclasses.replace(
            self,
            base=change(self.base),
            adapters=tuple(map(change, self.adapters)),
            pool_adapters=tuple(map(change, self.pool_adapters)),
            merges=tuple(map(change, self.merges)),
            tuned=tuple(map(change, self.tuned)),
        )


def build_table(
    scorer: Scorer,
    validation: Split,
    test: Split,
    merges: Iterable[Variant],
    tuned: Iterable[Variant] = (),
) -> Table:
    """Score everything: own adapters and base on both splits, each merge's candidates on
    validation (the best by normalised accuracy wins; the default on ties), the winner on test.

    Merges of another pool (`Variant.pool`) are normalised by the DEFAULT adapters' own
    accuracy too (the user's reference; their parameters are chosen by it) and, in
    `Row.normalised_own`, by their own pool's adapters; that pool's adapters get rows alone."""
    merges = list(merges)
    fixed = base_variants(scorer.pool)
    on_validation = {v.label: scorer.score(v, validation) for v in fixed}
    on_test = {v.label: scorer.score(v, test) for v in fixed}
    own_validation = {t: on_validation[f"adapter {t} alone"] for t in scorer.pool.names}
    own_test = {t: on_test[f"adapter {t} alone"] for t in scorer.pool.names}
    base = on_test["base model"]
    pool_tests: dict[str, dict[str, Scores]] = {DEFAULT_POOL: own_test}
    pool_rows = []
    for name in dict.fromkeys(v.pool for v in merges if v.pool != DEFAULT_POOL):
        alone = {
            v.adapter: scorer.score(v, test) for v in adapter_variants(scorer.pools[name], name)
        }
        pool_tests[name] = {str(t): scores for t, scores in alone.items()}
        for scores in alone.values():
            row = make_row(scores, own_test, base)
            own = normalised(scores, pool_tests[name])
            pool_rows.append(dataclasses.replace(row, normalised_own=own))

    merge_rows = []
    for variant in merges:
        tried = []
        for candidate in candidates(variant):
            value = normalised(scorer.score(candidate, validation), own_validation)
            tried.append((candidate, value))
        chosen, value = max(tried, key=lambda pair: pair[1])  # first (default) wins ties
        on_test_split = scorer.score(chosen, test)
        row = make_row(
            on_test_split,
            own_test,
            base,
            validation=value,
            tried=[(describe_params(c), v) for c, v in tried],
        )
        if chosen.source == "routed":  # one merge per route: no single rank
            merge_rows.append(row)
            continue
        pool = scorer.pool_of(chosen)
        report = merge(pool, chosen.preference(pool), chosen.spec()).report
        merge_rows.append(
            dataclasses.replace(
                row,
                rank=report.rank,
                retained_energy=report.retained_energy_min,
                normalised_own=normalised(on_test_split, pool_tests[chosen.pool]),
            )
        )
    tuned_rows = [make_row(scorer.score(v, test), own_test, base) for v in tuned]
    return Table(
        validation=validation,
        test=test,
        base=make_row(base, own_test, base),
        adapters=tuple(make_row(on_test[v.label], own_test, base) for v in fixed[1:]),
        merges=tuple(merge_rows),
        tuned=tuple(tuned_rows),
        pool_adapters=tuple(pool_rows),
    )


def check_table(
    scorer: Scorer, table: Table, per_task: int, emit: Callable[[str], None] | None = None
) -> Table:
    """The table with every row's vLLM cross-check (`Scorer.check_serving`) filled in."""
    variants = [row.variant for row in table.rows if row.variant.source != "routed"]
    agreements = scorer.check_serving(variants, table.test, per_task, emit)

    def annotate(row: Row) -> Row:
        agreement = agreements.get(row.variant.label)
        if agreement is None:  # routed rows: one merge per route (tests/integration/test_routing)
            return row
        return dataclasses.replace(row, served=(agreement.same, agreement.total))

    return table.replace_rows(annotate)


# ----------------------------------------------------------------------------- pool size


SWEEP_METHODS = ("ta", "ties", "tsvm", "knots_ties", "regmean")
"""Rows of the pool-size sweep (each without and with Pico)."""


@dataclass(frozen=True)
class SweepCell:
    """One method at one pool size: the mean over every subset of that size of the best
    validation normalised accuracy, and which candidate won how often."""

    size: int
    subsets: int
    mean: float
    winners: Mapping[str, int]  # parameters → subsets where they were best


def pool_size_sweep(
    scorer: Scorer, split: Split, variants: Iterable[Variant]
) -> dict[str, list[SweepCell]]:
    """For each variant (label → cells by pool size 2..N): every subset of the pool merged
    with a uniform preference over it, each candidate parameter setting scored on `split`
    over the subset's tasks; the best per subset, averaged per size."""
    pool_names = scorer.pool.names
    own = {t: scorer.score(Variant(f"adapter {t} alone", "adapter", adapter=t), split)
           for t in pool_names}  # fmt: skip
    table: dict[str, list[SweepCell]] = {}
    for variant in variants:
        cells = []
        for size in range(2, len(pool_names) + 1):
            best, winners = [], {}
            for subset in itertools.combinations(pool_names, size):
                tried = [
                    (c, normalised(scorer.score(c, split), own, subset))
                    for c in candidates(dataclasses.replace(variant, subset=subset))
                ]
                chosen, value = max(tried, key=lambda pair: pair[1])
                best.append(value)
                label = describe_params(chosen)
                winners[label] = winners.get(label, 0) + 1
            cells.append(SweepCell(size, len(best), sum(best) / len(best), winners))
        table[variant.label] = cells
    return table
