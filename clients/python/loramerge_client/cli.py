"""The `loramerge` command's remote subcommands, on a running server through `Client`:

loramerge generate "PROMPT" [--tenant T] [--preference NAME=W ...] [--method M] [--stream]
loramerge tenants set|get|list|delete|tune ...
loramerge adapters register|list|remove|diagnostics ...
loramerge remote-merge [--tenant T | --preference NAME=W ...] [--export DIR]

Every one takes --target HOST:PORT (default: $LORAMERGE_TARGET, then 127.0.0.1:50051), TLS and
token flags (the token also from $LORAMERGE_TOKEN) and --json (machine-readable output; tables
otherwise). `add_parser(subcommands)` registers them on an argparse parser.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ._common import DEFAULT_TARGET, TLS
from .client import Client
from .errors import LoramergeError
from .tuning import read_phi_file, read_prompt_file
from .types import PARAMETERS, MergeOptions, RouteOptions

TARGET_ENV = "LORAMERGE_TARGET"
TOKEN_ENV = "LORAMERGE_TOKEN"


# --- argument parsing --------------------------------------------------------------------


def parse_pairs(values: Sequence[str], flag: str) -> dict[str, str]:
    """NAME=VALUE arguments of `flag` as a dict (exits with a message on a malformed one)."""
    pairs = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name or not rest:
            raise SystemExit(f"loramerge: {flag} expects NAME=VALUE, got {value!r}")
        pairs[name] = rest
    return pairs


def parse_preference(values: Sequence[str]) -> dict[str, float]:
    """--preference NAME=WEIGHT arguments as adapter name → weight."""
    weights = {}
    for name, raw in parse_pairs(values, "--preference").items():
        try:
            weights[name] = float(raw)
        except ValueError:
            raise SystemExit(f"loramerge: --preference {name}={raw!r} is not a number") from None
    return weights


def _parameter(raw: str) -> Any:
    """A --param value: a JSON number/boolean, else the text itself (e.g. majority_sign=total)."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _merge_options(args: argparse.Namespace) -> MergeOptions:
    pairs = parse_pairs(args.param, "--param")
    parameters = {name: _parameter(raw) for name, raw in pairs.items()}
    unknown = set(parameters) - set(PARAMETERS)
    if unknown:
        raise SystemExit(
            f"loramerge: unknown --param {', '.join(sorted(unknown))}; known: "
            + ", ".join(PARAMETERS)
        )
    route = RouteOptions(
        enabled=args.route, temperature=args.route_temperature, min_weight=args.route_min_weight
    )
    return MergeOptions(
        method=args.method,
        pico=args.pico,
        parameters=parameters,
        svc=args.svc,
        rank=args.rank,
        route=route if route.to_dict() else None,
    )


def _connection_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection")
    group.add_argument(
        "--target", default=os.environ.get(TARGET_ENV, DEFAULT_TARGET),
        help=f"server HOST:PORT (default: ${TARGET_ENV}, then {DEFAULT_TARGET})",
    )  # fmt: skip
    group.add_argument("--tls", action="store_true", help="use TLS (system roots unless --ca)")
    group.add_argument("--ca", help="PEM file of the CA that signed the server's certificate")
    group.add_argument("--cert", help="client certificate (PEM) for mutual TLS")
    group.add_argument("--key", help="client private key (PEM) for mutual TLS")
    group.add_argument("--server-name", help="name to check in the server's certificate")
    group.add_argument(
        "--token", default=os.environ.get(TOKEN_ENV),
        help=f"API token, sent as a bearer token (default: ${TOKEN_ENV})",
    )  # fmt: skip
    group.add_argument("--timeout", type=float, default=120.0, help="deadline in seconds")
    group.add_argument("--json", action="store_true", help="print JSON for scripts")
    return common


def _tenant_flag() -> argparse.ArgumentParser:
    tenant = argparse.ArgumentParser(add_help=False)
    tenant.add_argument("--tenant", help="tenant id (its stored preference and merge options)")
    return tenant


def _preference_flag() -> argparse.ArgumentParser:
    preference = argparse.ArgumentParser(add_help=False)
    preference.add_argument(
        "--preference", action="append", default=[], metavar="NAME=WEIGHT",
        help="adapter weight (inline: overrides the tenant's preference)",
    )  # fmt: skip
    return preference


def _merge_flags() -> argparse.ArgumentParser:
    merge = argparse.ArgumentParser(add_help=False)
    group = merge.add_argument_group("merge options")
    group.add_argument("--method", help="merge method (default: the tenant's, then the server's)")
    group.add_argument(
        "--param", action="append", default=[], metavar="NAME=VALUE",
        help="merge method parameter, e.g. density=0.3",
    )  # fmt: skip
    group.add_argument("--pico", action=argparse.BooleanOptionalAction, default=None)
    group.add_argument("--svc", action=argparse.BooleanOptionalAction, default=None)
    group.add_argument("--rank", type=int, help="target rank / rank cap")
    group.add_argument(
        "--route", action=argparse.BooleanOptionalAction, default=None,
        help="route generation requests to the adapters by their prompt",
    )  # fmt: skip
    group.add_argument("--route-temperature", type=float, help="router temperature, [0, 10]")
    group.add_argument(
        "--route-min-weight", type=float, help="routed weights below this are dropped, [0, 0.5]"
    )
    return merge


def _client(args: argparse.Namespace) -> Client:
    tls: TLS | bool = False
    if args.tls or args.ca or args.cert or args.key or args.server_name:
        tls = TLS(ca=args.ca, cert=args.cert, key=args.key, server_name=args.server_name)
    return Client(args.target, tls=tls, token=args.token, timeout=args.timeout)


# --- output ------------------------------------------------------------------------------


def _json(value: Any) -> None:
    print(json.dumps(_plain(value), indent=2, default=str))


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Columns padded to their widest cell."""
    cells = [[str(c) for c in header]] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_cell(v)}" for k, v in value.items()) or "-"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value) or "-"
    return "-" if value in (None, "") else str(value)


# --- commands ----------------------------------------------------------------------------


def _generate(args: argparse.Namespace) -> int:
    text: dict[str, Any] = (
        {"messages": [{"role": "user", "content": args.prompt}]}
        if args.chat
        else {"prompt": args.prompt}
    )
    options = {
        "tenant_id": args.tenant,
        "preference": parse_preference(args.preference) or None,
        "merge": _merge_options(args),
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "stop": args.stop or None,
        "seed": args.seed,
    }
    with _client(args) as client:
        if not args.stream:
            result = client.generate(**text, **options)
            if args.json:
                _json(result)
            else:
                print(result.text)
                _footer(result.adapter_id, result.finish_reason, result.completion_tokens)
            return 0
        last = None
        for chunk in client.stream(**text, **options):
            if args.json:
                print(json.dumps(_plain(chunk)), flush=True)
            else:
                print(chunk.text, end="", flush=True)
            last = chunk
        if not args.json and last is not None:
            print()
            _footer(last.adapter_id, last.finish_reason, last.completion_tokens)
    return 0


def _footer(adapter_id: str, finish_reason: str, tokens: int) -> None:
    print(f"[{adapter_id or 'base model'} · {tokens} tokens · {finish_reason}]", file=sys.stderr)


def _tuning_cell(tuning: Any) -> str:
    if tuning is None:
        return "-"
    if tuning.state == "running":
        return f"running {tuning.steps_done}/{tuning.steps_total}"
    digest = f" {tuning.phi_digest[:12]}" if tuning.phi_digest else ""
    return f"{tuning.state}{digest}" + (f" ({tuning.message})" if tuning.message else "")


def _tenant_rows(tenants: Iterable[Any]) -> None:
    _table(
        ["TENANT", "VERSION", "PREFERENCE", "MERGE", "TUNING", "UPDATED"],
        ((t.tenant_id, t.version, t.preference, t.merge.to_dict(), _tuning_cell(t.tuning),
          t.update_time.isoformat(timespec="seconds")) for t in tenants),
    )  # fmt: skip


def _tenants(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.action == "set":
            preference = parse_preference(args.preference)
            if not preference and not args.tuned:
                raise SystemExit("loramerge tenants set: give at least one --preference NAME=W")
            try:
                tuned = read_phi_file(args.tuned) if args.tuned else None
            except ValueError as err:
                raise SystemExit(f"loramerge tenants set: {err}") from None
            tenant = client.set_tenant(
                args.tenant_id,
                preference,
                _merge_options(args),
                expected_version=args.expected_version,
                tuned=tuned,
            )
            tenants = [tenant]
        elif args.action == "tune":
            try:
                prompts = read_prompt_file(args.prompts)
            except (OSError, ValueError) as err:
                raise SystemExit(f"loramerge tenants tune: {err}") from None
            tuning = client.tune_tenant(
                args.tenant_id, prompts, steps=args.steps, learning_rate=args.lr
            )
            if args.json:
                _json(tuning)
            else:
                print(f"tenant {args.tenant_id}: {_tuning_cell(tuning)}; follow it with "
                      f"`loramerge tenants get {args.tenant_id}`")  # fmt: skip
            return 0
        elif args.action == "get":
            tenants = [client.get_tenant(args.tenant_id, version=args.version)]
        elif args.action == "list":
            tenants = list(client.list_tenants())
        else:
            client.delete_tenant(args.tenant_id)
            if args.json:
                _json({"deleted": args.tenant_id})
            else:
                print(f"deleted tenant {args.tenant_id}")
            return 0
    if args.json:
        _json(tenants if args.action == "list" else tenants[0])
    else:
        _tenant_rows(tenants)
    return 0


def _adapters(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.action == "register":
            registered = client.register_adapter(args.name, args.path)
            if args.json:
                _json(registered)
                return 0
            _adapter_rows([registered.adapter])
            for warning in registered.warnings:
                print(f"warning: {warning}", file=sys.stderr)
            print(f"pool {registered.pool_fingerprint}")
        elif args.action == "remove":
            fingerprint = client.remove_adapter(args.name, force=args.force)
            if args.json:
                _json({"removed": args.name, "pool_fingerprint": fingerprint})
            else:
                print(f"removed {args.name}; pool {fingerprint or '(empty)'}")
        elif args.action == "list":
            adapters = client.list_adapters()
            if args.json:
                _json(adapters)
            else:
                _adapter_rows(adapters)
        else:
            report = client.diagnostics(
                preference=parse_preference(args.preference) or None,
                merge=_merge_options(args),
                per_module=args.per_module,
            )
            if args.json:
                _json(report)
            else:
                _diagnostics_table(report)
    return 0


def _adapter_rows(adapters: Sequence[Any]) -> None:
    _table(
        ["NAME", "RANK", "MODULES", "FINGERPRINT", "PATH"],
        ((a.name, a.rank, a.target_modules, a.fingerprint[:12], a.path) for a in adapters),
    )


def _diagnostics_table(report: dict[str, Any]) -> None:
    print("adapters: " + ", ".join(report.get("adapters", [])))
    summaries = {"overall": report["overall"], **report.get("by_module_type", {})}
    _table(
        ["MODULES", "COUNT", "OVERLAP_B", "OVERLAP_A", "EFF_RANK_B", "EFF_RANK_A"],
        ((name, s["modules"], s["mean_overlap_b"], s["mean_overlap_a"],
          s["mean_effective_rank_b"], s["mean_effective_rank_a"])
         for name, s in summaries.items()),
    )  # fmt: skip
    for label in ("merged_without_pico", "merged_with_pico"):
        stats = report.get(label)
        if stats and any(stats.values()):
            print(f"{label}: " + ", ".join(f"{k}={_cell(v)}" for k, v in stats.items()))


def _remote_merge(args: argparse.Namespace) -> int:
    preference = parse_preference(args.preference) or None
    with _client(args) as client:
        report = client.merge(
            tenant_id=args.tenant, preference=preference, merge=_merge_options(args)
        )
        exported = None
        if args.export:
            exported = client.export(
                args.export,
                tenant_id=args.tenant,
                preference=preference,
                merge=_merge_options(args),
            )
    if args.json:
        _json({**_plain(report), "exported_to": str(exported) if exported else None})
        return 0
    _table(
        ["ADAPTER_ID", "CACHED", "METHOD", "RANK", "ENERGY_MIN", "NORM", "SECONDS"],
        [(report.adapter_id, report.cached, report.method, report.rank,
          report.retained_energy_min, report.final_norm, report.phase_seconds.get("total", 0.0))],
    )  # fmt: skip
    print("preference: " + _cell(report.preference))
    if exported:
        print(f"exported to {exported}")
    return 0


def _guarded(command: Callable[[argparse.Namespace], int], name: str) -> Callable[..., int]:
    """Remote failures print `CODE: message (field)` and exit with status 1."""

    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except LoramergeError as error:
            named = error.field and not error.message.startswith(f"{error.field}:")
            field = f" (field: {error.field})" if named else ""
            print(f"loramerge {name}: {error}{field}", file=sys.stderr)
            return 1

    return run


def add_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register generate, tenants, adapters and remote-merge on `commands`."""
    connection, merge = _connection_options(), _merge_flags()
    tenant, preference = _tenant_flag(), _preference_flag()

    generate = commands.add_parser(
        "generate", parents=[connection, tenant, preference, merge],
        help="generate text on a running server",
    )  # fmt: skip
    generate.add_argument("prompt", help="the prompt (with --chat: the user's message)")
    generate.add_argument("--chat", action="store_true", help="apply the chat template")
    generate.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    generate.add_argument("--max-tokens", type=int)
    generate.add_argument("--temperature", type=float)
    generate.add_argument("--top-p", type=float)
    generate.add_argument("--top-k", type=int)
    generate.add_argument("--stop", action="append", default=[], help="a stop string")
    generate.add_argument("--seed", type=int)
    generate.set_defaults(run=_guarded(_generate, "generate"))

    tenants = commands.add_parser("tenants", help="tenants and their stored preferences")
    actions = tenants.add_subparsers(dest="action", required=True)
    set_cmd = actions.add_parser(
        "set", parents=[connection, preference, merge], help="create or replace a tenant"
    )
    set_cmd.add_argument("tenant_id")
    set_cmd.add_argument("--expected-version", type=int, help="only if it is at this version")
    set_cmd.add_argument(
        "--tuned", metavar="PHI_JSON",
        help="TARA weights from `loramerge tune --objective entropy` (admin): the tenant is "
        "served the tuned tara merge; --preference may be left out (φ's own)",
    )  # fmt: skip
    get = actions.add_parser("get", parents=[connection], help="read a tenant")
    get.add_argument("tenant_id")
    get.add_argument("--version", type=int, help="a past version")
    actions.add_parser("list", parents=[connection], help="every tenant")
    delete = actions.add_parser("delete", parents=[connection], help="delete a tenant")
    delete.add_argument("tenant_id")
    tune = actions.add_parser(
        "tune", parents=[connection],
        help="tune the tenant's TARA weights on unlabeled prompts, on the server (background)",
    )  # fmt: skip
    tune.add_argument("tenant_id")
    tune.add_argument(
        "--prompts", required=True,
        help="JSONL (prompt or messages, optional task: the adapter whose task it is) or lines",
    )  # fmt: skip
    tune.add_argument("--steps", type=int, help="optimizer steps (server default 200)")
    tune.add_argument("--lr", type=float, help="AdamW learning rate (default 1e-3)")
    tenants.set_defaults(run=_guarded(_tenants, "tenants"))

    adapters = commands.add_parser("adapters", help="the server's adapter pool")
    actions = adapters.add_subparsers(dest="action", required=True)
    register = actions.add_parser("register", parents=[connection], help="add an adapter")
    register.add_argument("name")
    register.add_argument("path", help="server-side directory under an allowed root")
    actions.add_parser("list", parents=[connection], help="the pool's adapters")
    remove = actions.add_parser("remove", parents=[connection], help="remove an adapter")
    remove.add_argument("name")
    remove.add_argument(
        "--force", action="store_true", help="even while stored tenants give it a weight"
    )
    diagnostics = actions.add_parser(
        "diagnostics",
        parents=[connection, preference, merge],
        help="interference diagnostics of the pool (and of one merge, with --preference)",
    )
    diagnostics.add_argument("--per-module", action="store_true")
    adapters.set_defaults(run=_guarded(_adapters, "adapters"))

    remote_merge = commands.add_parser(
        "remote-merge", parents=[connection, tenant, preference, merge],
        help="merge on a running server (the report); --export downloads the PEFT adapter",
    )  # fmt: skip
    remote_merge.add_argument("--export", metavar="DIR", help="write the merged adapter here")
    remote_merge.set_defaults(run=_guarded(_remote_merge, "remote-merge"))
