"""`loramerge keys`: create, list and revoke API keys in the configured store.

loramerge keys create --admin                        a key that may do everything
loramerge keys create --tenant acme [--allow-inline] a key acting only as tenant acme
loramerge keys list                                  every key (ids, roles, never secrets)
loramerge keys revoke KEY_ID                         refuse the key from now on

`create` prints the new key once, alone on the last line of stdout (`| tail -n1` captures it);
only a slow hash of it is stored. The store is the server's (`store.url` of the same config, or
`LORAMERGE_STORE__URL`), so every replica sharing it sees new and revoked keys at once.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .auth import new_key
from .config import load_settings
from .domain import ApiKey
from .store import Store, open_store


def add_parser(subparsers: Any) -> None:
    keys = subparsers.add_parser("keys", help="create, list and revoke API keys")
    keys.add_argument("--config", type=Path, help="YAML config file (for store.url)")
    actions = keys.add_subparsers(dest="keys_command", required=True)

    create = actions.add_parser("create", help="create a key and print it once")
    role = create.add_mutually_exclusive_group(required=True)
    role.add_argument("--admin", action="store_true", help="a key with every permission")
    role.add_argument("--tenant", metavar="TENANT_ID", help="a key acting only as this tenant")
    create.add_argument(
        "--allow-inline",
        action="store_true",
        help="let the tenant send inline preferences and merge options (each costs a merge)",
    )
    create.set_defaults(run=_create)

    listing = actions.add_parser("list", help="list keys (never their secrets)")
    listing.set_defaults(run=_list)

    revoke = actions.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id", help="the id shown by create and list (16 hex digits)")
    revoke.set_defaults(run=_revoke)


def _store(args: argparse.Namespace) -> Store:
    return open_store(load_settings(args.config).store.url)


def _create(args: argparse.Namespace) -> int:
    if args.admin and args.allow_inline:
        raise SystemExit("loramerge keys create: --allow-inline applies to tenant keys only")
    key, record = new_key(
        "admin" if args.admin else "tenant", args.tenant, allow_inline=args.allow_inline
    )
    store = _store(args)
    try:
        store.add_api_key(record)
    finally:
        store.close()
    print(f"created {_describe(record)}")
    print("the key follows; it is shown only this once:")
    print(key)
    return 0


def _list(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        keys = store.list_api_keys()
    finally:
        store.close()
    for record in keys:
        print(_describe(record))
    return 0


def _revoke(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        record = store.revoke_api_key(args.key_id)
    finally:
        store.close()
    print(f"revoked {_describe(record)}")
    return 0


def _describe(record: ApiKey) -> str:
    who = "admin" if record.role == "admin" else f"tenant {record.tenant_id}"
    inline = " allow-inline" if record.role == "tenant" and record.allow_inline else ""
    revoked = f" revoked {record.revoked_at.isoformat()}" if record.revoked_at else ""
    return f"key {record.key_id} {who}{inline} created {record.created_at.isoformat()}{revoked}"
