"""Per-tenant rate limits and concurrency caps, shared by every transport.

A transport wraps each generation or merge request in `TenantLimiter.admit(tenant)`: over a limit
it raises `OverloadedError` carrying `retry_after` seconds (gRPC turns it into RESOURCE_EXHAUSTED
with google.rpc.RetryInfo, HTTP into 429 with Retry-After); inside, it reports the tokens it
generated with `Admission.charge_tokens`.

Requests use a token bucket: `request_burst` at once, refilled at `requests_per_second`. Generated
tokens are only known afterwards, so their bucket may go into debt: a request is admitted while
the tenant's token balance is positive, and its tokens are charged as they are produced; a tenant
in debt waits until the refill pays it off. Call from one event loop (no locking).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from .config import LimitSettings
from .errors import OverloadedError


@dataclass
class TokenBucket:
    """`capacity` tokens at most, refilled at `rate` per second; the level may go negative."""

    rate: float
    capacity: float
    level: float
    updated: float

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait(self, amount: float, now: float) -> float:
        """Seconds until `amount` tokens are there (0: now)."""
        self.refill(now)
        missing = amount - self.level
        return 0.0 if missing <= 0 else missing / self.rate

    def take(self, amount: float, now: float) -> None:
        self.refill(now)
        self.level -= amount


@dataclass
class _Tenant:
    requests: TokenBucket | None
    tokens: TokenBucket | None
    in_flight: int = 0


@dataclass
class Admission:
    """One admitted request: charge the tokens it generates here."""

    _tenant: _Tenant
    _clock: Callable[[], float]
    charged: int = field(default=0)

    def charge_tokens(self, count: int) -> None:
        if self._tenant.tokens is not None and count > 0:
            self._tenant.tokens.take(count, self._clock())
        self.charged += max(count, 0)


class TenantLimiter:
    def __init__(
        self, settings: LimitSettings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._tenants: OrderedDict[str, _Tenant] = OrderedDict()

    @property
    def enabled(self) -> bool:
        s = self._settings
        return (
            s.requests_per_second is not None
            or s.tokens_per_second is not None
            or s.max_concurrent_per_tenant is not None
        )

    @contextmanager
    def admit(self, tenant: str) -> Iterator[Admission]:
        """Admit one request of `tenant` ("" for requests without one) or raise
        `OverloadedError` with `retry_after`."""
        state = self._state(tenant)
        now = self._clock()
        who = f"tenant {tenant!r}" if tenant else "requests without a tenant"
        cap = self._settings.max_concurrent_per_tenant
        if cap is not None and state.in_flight >= cap:
            raise OverloadedError(
                f"{who} already has {cap} requests in flight; retry when one ends",
                retry_after=1.0,
            )
        if state.requests is not None:
            delay = state.requests.wait(1, now)
            if delay > 0:
                raise OverloadedError(
                    f"{who} is over {self._settings.requests_per_second:g} requests per second",
                    retry_after=delay,
                )
        if state.tokens is not None:
            delay = state.tokens.wait(math.ulp(0.0), now)  # any positive balance admits
            if delay > 0:
                raise OverloadedError(
                    f"{who} is over {self._settings.tokens_per_second:g} generated tokens per "
                    "second",
                    retry_after=delay,
                )
        if state.requests is not None:
            state.requests.take(1, now)
        state.in_flight += 1
        try:
            yield Admission(state, self._clock)
        finally:
            state.in_flight -= 1

    def _state(self, tenant: str) -> _Tenant:
        state = self._tenants.get(tenant)
        if state is None:
            now, s = self._clock(), self._settings
            state = _Tenant(
                requests=_bucket(s.requests_per_second, s.request_burst, now),
                tokens=_bucket(s.tokens_per_second, s.token_burst, now),
            )
            self._tenants[tenant] = state
            self._forget_idle()
        self._tenants.move_to_end(tenant)
        return state

    def _forget_idle(self) -> None:
        """Drop the least recently seen idle tenants beyond `max_tenants_tracked` (a dropped
        tenant starts again with full buckets)."""
        excess = len(self._tenants) - self._settings.max_tenants_tracked
        for name in [n for n, t in self._tenants.items() if t.in_flight == 0][: max(excess, 0)]:
            del self._tenants[name]


def _bucket(rate: float | None, burst: int, now: float) -> TokenBucket | None:
    return None if rate is None else TokenBucket(rate, float(burst), float(burst), now)
