"""Tenants' TARA weights φ: whether they fit the pool, serving them, and tuning them from
uploaded prompts in the background.

φ (`merge_engine.TaraPhi`) is tuned for one preference over particular adapters (their content
fingerprints). A tenant version that carries φ is served the `tara` merge with φ while

- the request takes the tenant's own preference (no inline preference),
- the resolved method is `tara` without Pico or SVC (a tuned tenant's own options), and
- every adapter φ weights is still in the pool with the same content.

Otherwise the merge is what the options say without φ (for the tenant's own options: the untuned
`tara` merge, TA on the exact basis), and GetTenant reports the tuning STALE with the reason. A
pool change that leaves φ's adapters alone (registering another adapter) keeps φ active: the
merge reads only the adapters with weight > 0. φ is never applied to a pool it does not fit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from loramerge.merge_engine import AdapterPool, MergeSpec, TaraPhi, normalize_preference
from loramerge.merge_engine.merge import phi_sizes
from loramerge.merge_engine.methods.tara import check_phi

from .domain import MergeChoice, TenantRecord, TunedSummary, TunedWeights
from .errors import ConflictError, InvalidRequestError, OverloadedError
from .registry import AdapterRegistry
from .store import Store

logger = logging.getLogger(__name__)

PREFERENCE_TOLERANCE = 1e-6  # |ρ − ρ_tuned| per adapter for "the preference φ was tuned for"
PHI_CACHE_ENTRIES = 64
TuningState = Literal["active", "stale", "running", "failed"]


class TuningUnavailableError(ConflictError):
    """This server cannot tune φ from prompts (FAILED_PRECONDITION)."""


@dataclass(frozen=True)
class TuningStatus:
    """What GetTenant says about a tenant's tuning."""

    state: TuningState
    message: str = ""
    digest: str = ""
    source: str = ""
    adapters: tuple[str, ...] = ()
    steps_done: int = 0
    steps_total: int = 0


def misfit(summary: TunedSummary, pool: AdapterPool | None) -> str | None:
    """Why φ no longer fits `pool` (None: it fits): an adapter it weights left or changed."""
    if pool is None:
        return "no adapters are registered"
    for name, fingerprint in zip(summary.adapters, summary.adapter_fingerprints, strict=True):
        if name not in pool.names:
            return f"adapter {name!r}, which φ weights, left the pool"
        if pool.adapter(name).fingerprint != fingerprint:
            return (
                f"adapter {name!r} changed since φ was tuned (fingerprint "
                f"{pool.adapter(name).fingerprint[:12]}…, φ is for {fingerprint[:12]}…)"
            )
    return None


def tuned_choice(choice: MergeChoice, field: str) -> MergeChoice:
    """A tuned tenant's merge options: method tara without Pico and SVC (φ weights the plain
    shared basis). Another method, Pico or SVC said explicitly is an error naming `field`."""
    if choice.method not in (None, "tara"):
        raise InvalidRequestError(
            f"{field}.method",
            f"a tenant with tuned weights merges with tara, not {choice.method!r}",
        )
    for stage in ("pico", "svc"):
        if getattr(choice, stage):
            raise InvalidRequestError(
                f"{field}.{stage}", "tuned weights apply to the plain tara merge: leave it off"
            )
    params = dict(choice.params) if choice.method == "tara" else {}
    return dataclasses.replace(
        choice, method="tara", pico=False, svc=False, params=MappingProxyType(params)
    )


def check_tuned(
    weights: TunedWeights,
    pool: AdapterPool,
    preference: Mapping[str, float],
    field: str = "tuned",
) -> None:
    """φ fits `pool` and is for `preference`: its adapters are the pool's (same content) and are
    exactly those `preference` weights, in pool order; `preference` equals the one φ was tuned
    for; every module has a φ of a valid shape. Errors name the field."""
    summary = weights.summary
    for index, (name, fingerprint) in enumerate(
        zip(summary.adapters, summary.adapter_fingerprints, strict=True)
    ):
        if name not in pool.names:
            raise InvalidRequestError(
                f"{field}.adapters[{index}]",
                f"adapter {name!r} is not in the pool ({', '.join(pool.names)})",
            )
        actual = pool.adapter(name).fingerprint
        if actual != fingerprint:
            raise InvalidRequestError(
                f"{field}.adapter_fingerprints[{index}]",
                f"φ was tuned for another {name!r} (fingerprint {fingerprint[:16]}…; the pool's "
                f"is {actual[:16]}…): tune again for this pool",
            )
    tuned_rho = normalize_preference(summary.preference, pool.names, f"{field}.preference")
    rho = normalize_preference(preference, pool.names, "tenant.preference")
    worst = max(abs(a - b) for a, b in zip(rho, tuned_rho, strict=True))
    if worst > PREFERENCE_TOLERANCE:
        raise InvalidRequestError(
            "tenant.preference",
            "differs from the preference the weights were tuned for "
            f"({_shown_rho(pool.names, tuned_rho)}); leave it empty to take that one",
        )
    active = tuple(i for i, weight in enumerate(rho) if weight > 0)
    merged = tuple(pool.names[i] for i in active)
    if merged != summary.adapters:
        raise InvalidRequestError(
            f"{field}.adapters",
            f"φ has rows for {', '.join(summary.adapters)}; the preference merges "
            f"{', '.join(merged)} (weight > 0, pool order)",
        )
    check_phi(weights.phi, merged, phi_sizes(pool, active), field)


def _shown_rho(names: Sequence[str], rho: Sequence[float]) -> str:
    return ", ".join(f"{n}={w:.4g}" for n, w in zip(names, rho, strict=True) if w > 0)


class PhiCache:
    """φ by digest, read from the store once (content-addressed, so never stale)."""

    def __init__(self, store: Store, entries: int = PHI_CACHE_ENTRIES) -> None:
        self._store = store
        self._entries = entries
        self._cache: OrderedDict[str, TaraPhi] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, phi: TaraPhi) -> None:
        with self._lock:
            self._cache[phi.digest] = phi
            self._cache.move_to_end(phi.digest)
            while len(self._cache) > self._entries:
                self._cache.popitem(last=False)

    async def get(self, digest: str) -> TaraPhi:
        with self._lock:
            phi = self._cache.get(digest)
            if phi is not None:
                self._cache.move_to_end(digest)
                return phi
        phi = await asyncio.to_thread(self._store.get_phi, digest)
        self.put(phi)
        return phi


async def apply_tuned(
    cache: PhiCache,
    record: TenantRecord,
    pool: AdapterPool,
    spec: MergeSpec,
    inline_preference: bool,
) -> MergeSpec:
    """`spec` with the tenant's φ when it applies (see the module doc), else `spec` as is."""
    tuned = record.tuned
    if (
        tuned is None
        or inline_preference
        or spec.method != "tara"
        or spec.pico
        or spec.svc
        or misfit(tuned, pool) is not None
    ):
        return spec
    return dataclasses.replace(spec, phi=await cache.get(tuned.digest))


# --- tuning from prompts ------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptItem:
    text: str
    task: str | None


@dataclass
class Job:
    """A tuning from prompts (one at a time per server): what it tunes, and how far it got."""

    record: TenantRecord  # the version tuned for; the result is stored only if still latest
    choice: MergeChoice  # the tuned tenant's merge options (tara)
    pool: AdapterPool
    prompts: Sequence[PromptItem]
    learning_rate: float
    steps_total: int
    steps_done: int = 0
    state: Literal["running", "done", "failed"] = "running"
    message: str = ""
    finished_at: datetime | None = None


def training_available(model_dir: Path | None) -> str | None:
    """Why this server cannot tune (None: it can)."""
    if importlib.util.find_spec("transformers") is None:
        return (
            "tuning from prompts needs the training dependencies (transformers), which this "
            "server lacks (the serving image has none): tune offline with `loramerge tune "
            "--objective entropy` and give the result with `loramerge tenants set --tuned "
            "phi.json`, or install 'loramerge[prepare]'"
        )
    if model_dir is None or not (model_dir / "config.json").is_file():
        return f"the base model directory {model_dir} holds no Hugging Face config.json to tune on"
    return None


class Tuner:
    """Runs tunings from prompts in the background, one at a time, and stores the result as a
    new tenant version (when the tenant and φ's adapters did not change meanwhile)."""

    def __init__(
        self, store: Store, registry: AdapterRegistry, cache: PhiCache, model_dir: Path | None
    ) -> None:
        self._store = store
        self._registry = registry
        self._cache = cache
        self._model_dir = model_dir
        self._jobs: dict[str, Job] = {}
        self._running: asyncio.Task[None] | None = None

    @property
    def pool(self) -> AdapterPool | None:
        return self._registry.pool

    def job(self, tenant_id: str) -> Job | None:
        return self._jobs.get(tenant_id)

    def forget(self, tenant_id: str) -> None:
        self._jobs.pop(tenant_id, None)

    def start(
        self,
        record: TenantRecord,
        pool: AdapterPool,
        prompts: Sequence[PromptItem],
        steps: int,
        learning_rate: float,
    ) -> Job:
        """Start tuning `record`'s preference on `prompts`. Raises `TuningUnavailableError`
        without training dependencies, `OverloadedError` while another tuning runs."""
        reason = training_available(self._model_dir)
        if reason is not None:
            raise TuningUnavailableError(reason)
        if self._running is not None and not self._running.done():
            raise OverloadedError("a tuning is running on this server; retry later", None, 60.0)
        if not record.preference:
            raise ConflictError(f"tenant {record.tenant_id!r} has no preference to tune for")
        if record.merge.method not in (None, "tara"):
            choice = MergeChoice(method="tara", rank=record.merge.rank)
        else:
            choice = record.merge
        choice = tuned_choice(dataclasses.replace(choice, pico=None, svc=None), "merge")
        job = Job(record, choice, pool, prompts, learning_rate, steps)
        self._jobs[record.tenant_id] = job
        self._running = asyncio.create_task(self._run(job), name=f"tune-{record.tenant_id}")
        return job

    async def _run(self, job: Job) -> None:
        record, choice = job.record, job.choice
        try:
            weights = await asyncio.to_thread(self._tune, job)
            now = self._registry.pool
            reason = misfit(weights.summary, now)
            if reason is not None:
                raise ConflictError(f"the pool changed while tuning ({reason}); tune again")
            try:
                stored = await asyncio.to_thread(
                    self._store.set_tenant,
                    record.tenant_id,
                    record.preference,
                    choice,
                    record.version,
                    weights,
                )
            except ConflictError as err:
                raise ConflictError(
                    f"the tenant changed while tuning ({_without_field(err)}); tune again"
                ) from None
            self._cache.put(weights.phi)
            job.state, job.message = "done", f"stored as version {stored.version}"
            logger.info(
                "tuned tenant %s: version %d, φ %s",
                record.tenant_id,
                stored.version,
                weights.phi.digest[:12],
            )
        except ConflictError as err:
            job.state, job.message = "failed", _without_field(err)
        except Exception as err:  # the job's failure is reported through GetTenant
            logger.exception("tuning tenant %s failed", record.tenant_id)
            job.state, job.message = "failed", f"tuning failed: {type(err).__name__}: {err}"
        finally:
            job.finished_at = datetime.now(UTC)

    def _tune(self, job: Job) -> TunedWeights:
        from .defaults.tara import Prompt, TuneConfig, tune

        assert self._model_dir is not None
        scaling = job.choice.params.get("scaling")
        config = TuneConfig(
            steps=job.steps_total,
            learning_rate=job.learning_rate,
            scaling=float(scaling) if scaling is not None else None,
        )

        def step(done: int, total: int, loss: float) -> None:
            job.steps_done = done

        result = tune(
            self._model_dir,
            job.pool,
            job.record.preference,
            [Prompt(p.text, p.task) for p in job.prompts],
            config,
            step_progress=step,
        )
        return tuned_weights(result.phi, job.pool, job.record.preference, "prompts")

    def status(self, record: TenantRecord, pool: AdapterPool | None) -> TuningStatus | None:
        """The tuning GetTenant reports for `record` (None: it has none)."""
        job = self._jobs.get(record.tenant_id)
        if job is not None and job.state == "running":
            return TuningStatus(
                "running",
                f"tuning version {job.record.version} on this server",
                source="prompts",
                steps_done=job.steps_done,
                steps_total=job.steps_total,
            )
        # A failure is news until the tenant is stored again.
        failed = (
            job is not None
            and job.state == "failed"
            and job.finished_at is not None
            and job.finished_at >= record.updated_at
        )
        failure = job.message if failed and job is not None else ""
        summary = record.tuned
        if summary is None:
            return TuningStatus("failed", failure, source="prompts") if failed else None
        reason = misfit(summary, pool)
        state: TuningState = "failed" if failed else ("stale" if reason else "active")
        notes = [failure] if failure else []
        if reason is not None:
            notes.append(f"{reason}: serving the untuned tara merge")
        return TuningStatus(
            state, "; ".join(notes), summary.digest, summary.source, summary.adapters
        )


def tuned_weights(
    phi: TaraPhi, pool: AdapterPool, preference: Mapping[str, float], source: str
) -> TunedWeights:
    """φ tuned for `preference` over `pool`, with its summary."""
    rho = normalize_preference(preference, pool.names)
    summary = TunedSummary(
        digest=phi.digest,
        adapters=phi.adapters,
        adapter_fingerprints=tuple(pool.adapter(n).fingerprint for n in phi.adapters),
        preference=MappingProxyType(dict(zip(pool.names, rho, strict=True))),
        pool_fingerprint=pool.fingerprint,
        source=source,
    )
    return TunedWeights(summary, phi)


def _without_field(err: ConflictError) -> str:
    text = str(err)
    return text.removeprefix(f"{err.field}: ") if err.field else text
