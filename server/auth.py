"""Authentication (API key → principal) and authorization (what a principal may do), shared by
every transport: the gRPC interceptor and the HTTP endpoint both pass the `authorization` header
value to `Authenticator.authenticate` and ask the `authorize_*` functions below.

Keys look like `lm_<key id: 16 hex>.<secret: 43 url-safe characters>`. The store keeps the key id
in clear (to find the row) and only a salted scrypt hash of the secret, compared in constant
time. scrypt is slow on purpose (~50 ms); a key that verified once is remembered in memory by a
SHA-256 of the whole key, so later requests cost one indexed store read (which also sees a
revocation at once).

Roles: an admin key may do everything. A tenant key acts only as its tenant: it generates and
merges with `tenant_id` set to its tenant, reads and changes only that tenant record, lists
adapters; and it sends inline preferences or merge options only if the key allows it
(`loramerge keys create --tenant T --allow-inline`), since each distinct inline preference costs
a merge. With `auth.enabled` off every caller is `UNRESTRICTED`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import logging
import re
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime

from .config import Settings
from .domain import ApiKey, validate_tenant_id
from .errors import ConfigError, PermissionDeniedError, UnauthenticatedError
from .store import Store

logger = logging.getLogger(__name__)

_KEY = re.compile(r"lm_(?P<key_id>[0-9a-f]{16})\.(?P<secret>[A-Za-z0-9_-]{43})")
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}
_VERIFIED_CAPACITY = 10_000


@dataclass(frozen=True)
class Principal:
    """Who is calling. `key_id` is None when authentication is off."""

    role: str  # "admin" or "tenant"
    tenant_id: str | None = None
    allow_inline: bool = True
    key_id: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


UNRESTRICTED = Principal(role="admin")


def hash_secret(secret: str, salt: bytes | None = None) -> str:
    """`scrypt$n$r$p$<salt>$<hash>` (base64) of a key's secret."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(secret.encode(), salt=salt, dklen=32, **_SCRYPT)
    params = f"{_SCRYPT['n']}${_SCRYPT['r']}${_SCRYPT['p']}"
    return f"scrypt${params}${_b64(salt)}${_b64(digest)}"


def verify_secret(secret: str, stored: str) -> bool:
    """Whether `secret` hashes to `stored` (constant-time comparison)."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        computed = hashlib.scrypt(
            secret.encode(), salt=_unb64(salt), dklen=32, n=int(n), r=int(r), p=int(p)
        )
    except ValueError:  # a corrupt row never authenticates anyone
        return False
    return hmac.compare_digest(computed, _unb64(digest))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def new_key(
    role: str, tenant_id: str | None = None, allow_inline: bool = False
) -> tuple[str, ApiKey]:
    """A new key: (the key to hand out once, the record to store)."""
    if role == "tenant":
        if tenant_id is None:
            raise ValueError("a tenant key needs a tenant id")
        validate_tenant_id(tenant_id, "tenant")
    elif role == "admin":
        tenant_id, allow_inline = None, True
    else:
        raise ValueError(f"role must be 'admin' or 'tenant', got {role!r}")
    key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
    record = ApiKey(
        key_id=key_id,
        secret_hash=hash_secret(secret),
        role=role,
        tenant_id=tenant_id,
        allow_inline=allow_inline,
        created_at=datetime.now(UTC),
    )
    return f"lm_{key_id}.{secret}", record


class Authenticator:
    """Turns the `authorization` header of a request into a `Principal`."""

    def __init__(self, store: Store, enabled: bool) -> None:
        self._store = store
        self.enabled = enabled
        self._verified: OrderedDict[str, bytes] = OrderedDict()  # key id → SHA-256 of the key

    async def authenticate(self, authorization: str | None) -> Principal:
        """The caller behind `authorization` ("Bearer <key>"); `UnauthenticatedError` for a
        missing, malformed, unknown or revoked key. Everyone is `UNRESTRICTED` when off."""
        if not self.enabled:
            return UNRESTRICTED
        if not authorization:
            raise UnauthenticatedError("an API key is required: 'authorization: Bearer <key>'")
        scheme, _, token = authorization.strip().partition(" ")
        match = _KEY.fullmatch(token.strip()) if scheme.lower() == "bearer" else None
        if match is None:
            raise UnauthenticatedError(
                "malformed authorization: expected 'Bearer lm_<id>.<secret>'"
            )
        key_id, secret = match["key_id"], match["secret"]
        key = await asyncio.to_thread(self._store.get_api_key, key_id)
        if key is None or key.revoked_at is not None:
            raise UnauthenticatedError(f"API key {key_id} is unknown or revoked")
        fingerprint = hashlib.sha256(match[0].encode()).digest()
        known = self._verified.get(key_id)
        if known is None or not hmac.compare_digest(known, fingerprint):
            if not await asyncio.to_thread(verify_secret, secret, key.secret_hash):
                raise UnauthenticatedError(f"API key {key_id} is unknown or revoked")
            self._remember(key_id, fingerprint)
        return Principal(
            role=key.role, tenant_id=key.tenant_id, allow_inline=key.allow_inline, key_id=key_id
        )

    def _remember(self, key_id: str, fingerprint: bytes) -> None:
        self._verified[key_id] = fingerprint
        self._verified.move_to_end(key_id)
        while len(self._verified) > _VERIFIED_CAPACITY:
            self._verified.popitem(last=False)


def authorize_admin(principal: Principal, action: str) -> None:
    """Adapter and pool administration, listing and deleting tenants."""
    if not principal.is_admin:
        raise PermissionDeniedError(f"{action} needs an admin API key")


def authorize_tenant(principal: Principal, tenant_id: str, field: str = "tenant_id") -> None:
    """Reading or changing the record of `tenant_id`."""
    if principal.is_admin or tenant_id == principal.tenant_id:
        return
    raise PermissionDeniedError(f"this API key acts only as tenant {principal.tenant_id!r}", field)


def authorize_generate(principal: Principal, tenant_id: str, inline: bool) -> None:
    """Generating or merging as `tenant_id` ("" = none), `inline`: with a preference or merge
    options in the request itself."""
    if principal.is_admin:
        return
    if tenant_id != principal.tenant_id:
        raise PermissionDeniedError(
            f"this API key acts only as tenant {principal.tenant_id!r}: set tenant_id to it",
            "tenant_id",
        )
    if inline and not principal.allow_inline:
        raise PermissionDeniedError(
            f"tenant {principal.tenant_id!r} may not send an inline preference or merge options "
            "(its key was created without --allow-inline); use its stored preference",
            "preference",
        )


def subject(principal: Principal, tenant_id: str) -> str:
    """Whose budget a request spends (rate limits): the key's tenant, else the request's."""
    return principal.tenant_id or tenant_id


def check_exposure(settings: Settings) -> None:
    """Refuse to serve gRPC on a non-loopback address without authentication, unless the
    configuration says so explicitly (`auth.allow_unauthenticated_remote`)."""
    check_listener(settings, settings.grpc.host, "grpc.host")


def check_listener(settings: Settings, host: str, field: str) -> None:
    """The same check for any listener (the HTTP endpoint calls it with its own host)."""
    if settings.auth.enabled or settings.auth.allow_unauthenticated_remote:
        return
    if host == "localhost" or _is_loopback(host):
        return
    raise ConfigError(
        f"{field} {host!r} is not a loopback address and auth.enabled is false: anyone who "
        "can reach it could act as any tenant. Enable auth (LORAMERGE_AUTH__ENABLED=true, then "
        "`loramerge keys create --admin`) or set auth.allow_unauthenticated_remote: true",
        field,
    )


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
