"""Per-tenant token buckets and concurrency caps, on a controlled clock."""

from __future__ import annotations

import pytest

from loramerge.server.config import LimitSettings
from loramerge.server.errors import OverloadedError
from loramerge.server.limits import TenantLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_no_limits_configured_admits_everything() -> None:
    limiter = TenantLimiter(LimitSettings())
    assert not limiter.enabled
    for _ in range(1000):
        with limiter.admit("acme"):
            pass


def test_request_bucket_allows_the_burst_then_the_rate() -> None:
    clock = Clock()
    limiter = TenantLimiter(LimitSettings(requests_per_second=2, request_burst=3), clock)
    for _ in range(3):
        with limiter.admit("acme"):
            pass
    with (
        pytest.raises(OverloadedError, match="2 requests per second") as refused,
        limiter.admit("acme"),
    ):
        pass
    assert refused.value.retry_after == pytest.approx(0.5)
    with limiter.admit("globex"):  # another tenant has its own bucket
        pass
    clock.now += 0.5
    with limiter.admit("acme"):
        pass
    with pytest.raises(OverloadedError), limiter.admit("acme"):
        pass


def test_token_debt_blocks_until_paid_off() -> None:
    clock = Clock()
    limiter = TenantLimiter(LimitSettings(tokens_per_second=10, token_burst=20), clock)
    with limiter.admit("acme") as admission:
        admission.charge_tokens(50)  # known only afterwards: the balance goes to -30
    with pytest.raises(OverloadedError, match="generated tokens") as refused, limiter.admit("acme"):
        pass
    assert refused.value.retry_after == pytest.approx(3.0, rel=1e-6)
    clock.now += 3.01
    with limiter.admit("acme"):
        pass


def test_concurrency_cap_counts_requests_in_flight() -> None:
    limiter = TenantLimiter(LimitSettings(max_concurrent_per_tenant=2))
    with limiter.admit("acme"), limiter.admit("acme"):
        with pytest.raises(OverloadedError, match="2 requests in flight"), limiter.admit("acme"):
            pass
        with limiter.admit("globex"):
            pass
    with limiter.admit("acme"):  # released on exit, also after an error
        pass
    with pytest.raises(RuntimeError), limiter.admit("acme"):
        raise RuntimeError
    with limiter.admit("acme"), limiter.admit("acme"):
        pass


def test_tracked_tenants_are_bounded_and_busy_ones_kept() -> None:
    clock = Clock()
    settings = LimitSettings(requests_per_second=1, request_burst=1, max_tenants_tracked=2)
    limiter = TenantLimiter(settings, clock)
    with limiter.admit("busy"):
        for index in range(10):
            with limiter.admit(f"t{index}"):
                pass
        with (
            pytest.raises(OverloadedError),
            limiter.admit("busy"),
        ):  # still remembered while in flight
            pass
    assert len(limiter._tenants) <= 3
