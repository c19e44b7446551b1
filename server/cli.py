"""`loramerge`: the one command-line entry point.

loramerge serve      run the gRPC server (real vLLM engine)
loramerge prepare    convert the embedded model and train the default adapters (cached)
loramerge merge      merge local adapters into a PEFT adapter directory, offline
loramerge diagnose   interference diagnostics of local adapters
loramerge eval       measure merge quality on the default tasks (docs/quality.md)
loramerge tune       merge, then distill the merge on unlabeled prompts
loramerge osrm       OSRM: A-initialisation and post-hoc projection of adapters
loramerge keys       create, list and revoke API keys

On a running server (loramerge_client): generate, tenants, adapters, remote-merge.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import yaml

from loramerge.merge_engine import (
    METHODS,
    AdapterPool,
    MergeEngineError,
    MergeSpec,
    merge,
    merged_diagnostics,
    pool_diagnostics,
    save_adapter,
)
from loramerge.merge_engine.methods.parameters import PARAMETERS
from loramerge_client.cli import add_parser as add_remote_commands
from loramerge_client.cli import parse_pairs as _pairs
from loramerge_client.cli import parse_preference as _weights

from . import keys_cli, osrm_cli, quality_cli, statistics_cli
from .config import load_settings
from .errors import ServerError


def _params(values: Sequence[str]) -> dict[str, Any]:
    """--param density=0.3 → {"density": 0.3} (values read as YAML scalars)."""
    return {name: yaml.safe_load(raw) for name, raw in _pairs(values, "--param").items()}


def _serve_overrides(args: argparse.Namespace) -> dict[str, Any]:
    flags = {
        ("grpc", "host"): args.host,
        ("grpc", "port"): args.port,
        ("metrics", "host"): args.metrics_host,
        ("metrics", "port"): args.metrics_port,
        ("engine", "model"): args.model,
        ("cache_dir",): args.cache_dir,
        ("log_level",): args.log_level,
    }
    overrides: dict[str, Any] = {}
    for path, value in flags.items():
        if value is None:
            continue
        node = overrides
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return overrides


def _serve(args: argparse.Namespace) -> int:
    from .engine import quiet_vllm

    quiet_vllm()  # before vLLM is imported
    from .app import serve

    settings = load_settings(args.config, overrides=_serve_overrides(args))
    asyncio.run(serve(settings))
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from .defaults import prepare_defaults

    overrides = {"cache_dir": args.cache_dir} if args.cache_dir else {}
    settings = load_settings(args.config, overrides=overrides)
    started = time.monotonic()
    assets = prepare_defaults(settings.cache_dir, progress=lambda line: print(line, flush=True))
    print(f"model: {assets.model_dir}")
    for name, path in assets.adapters.items():
        print(f"adapter {name}: {path}")
    osrm_cli.prepare_osrm(args, assets, settings.cache_dir)
    print(f"ready in {time.monotonic() - started:.1f} s")
    return 0


def _pool(args: argparse.Namespace) -> AdapterPool:
    adapters = {name: Path(path) for name, path in _pairs(args.adapter, "--adapter").items()}
    if not adapters:
        raise SystemExit("loramerge: give at least one --adapter NAME=DIR")
    return AdapterPool.load(adapters)


def _spec(args: argparse.Namespace) -> MergeSpec:
    return MergeSpec(
        method=args.method,
        params=_params(args.param),
        pico=args.pico,
        svc=args.svc,
        rank=args.rank,
    )


def _merge(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    pool = _pool(args)
    preference = _weights(args.preference) or {name: 1.0 for name in pool.names}
    with tqdm(desc="merging module groups", unit="group", file=sys.stderr) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        result = merge(
            pool, preference, _spec(args), device=args.device, dtype=args.dtype, progress=progress
        )
    path = save_adapter(result, args.out)
    print(json.dumps({"path": str(path), **result.report.to_dict()}, indent=2))
    return 0


def _diagnose(args: argparse.Namespace) -> int:
    pool = _pool(args)
    diagnostics = pool_diagnostics(pool)
    output: dict[str, Any] = {"pool": asdict(diagnostics)}
    if args.plot is not None:
        from .diagnostics_plot import write_plots

        output["plots"] = [str(path) for path in write_plots(diagnostics, args.plot)]
    if not args.per_module:
        output["pool"].pop("modules")
    if args.preference:
        merged = merged_diagnostics(
            pool, _weights(args.preference), _spec(args), device=args.device
        )
        output["merged"] = {
            "without_pico": asdict(merged.mean_without_pico),
            "with_pico": asdict(merged.mean_with_pico),
        }
    print(json.dumps(output, indent=2))
    return 0


def _methods(args: argparse.Namespace) -> int:
    for name in METHODS.names():
        method = METHODS.get(name)
        kind = "exact low rank" if method.exact_low_rank else "dense, then SVD truncation"
        defaults = {f.name: f.default for f in fields(method.params_type)}
        print(f"{name:16} {method.summary}")
        print(f"{'':16} {kind}; parameters (None = published default): {defaults}")
    print("\nparameters:")
    for name, meaning in PARAMETERS.items():
        print(f"  {name:14} {meaning}")
    return 0


def _add_merge_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--adapter", action="append", default=[], metavar="NAME=DIR", help="a PEFT adapter"
    )
    parser.add_argument(
        "--preference", action="append", default=[], metavar="NAME=WEIGHT",
        help="adapter weight (default: uniform)",
    )  # fmt: skip
    parser.add_argument("--method", default="ta", choices=METHODS.names())
    parser.add_argument(
        "--param", action="append", default=[], metavar="NAME=VALUE",
        help="method parameter, e.g. density=0.3",
    )  # fmt: skip
    parser.add_argument("--pico", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--svc", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--rank", type=int, help="target rank / rank cap")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loramerge", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gRPC server")
    serve.add_argument("--config", type=Path, help="YAML config file")
    serve.add_argument("--host", help="gRPC listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="gRPC port (default 50051)")
    serve.add_argument("--metrics-host", help="metrics listen address (default 127.0.0.1)")
    serve.add_argument("--metrics-port", type=int, help="metrics port (default 9400)")
    serve.add_argument("--model", type=Path, help="HF model directory (default: embedded)")
    serve.add_argument("--cache-dir", type=Path, help="cache for the embedded model/adapters")
    serve.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.set_defaults(run=_serve)

    prepare = commands.add_parser("prepare", help="prepare the embedded model and adapters")
    prepare.add_argument("--config", type=Path, help="YAML config file")
    prepare.add_argument("--cache-dir", type=Path, help="where to cache them")
    osrm_cli.add_prepare_options(prepare)
    prepare.set_defaults(run=_prepare)

    merge_cmd = commands.add_parser("merge", help="merge local adapters into a new adapter")
    _add_merge_options(merge_cmd)
    merge_cmd.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    merge_cmd.add_argument("--out", type=Path, required=True, help="new adapter directory")
    merge_cmd.set_defaults(run=_merge)

    diagnose = commands.add_parser("diagnose", help="interference diagnostics of adapters")
    _add_merge_options(diagnose)
    diagnose.add_argument("--per-module", action="store_true", help="include every module")
    diagnose.add_argument("--plot", type=Path, metavar="DIR", help="draw the Pico §3 figures")
    diagnose.set_defaults(run=_diagnose)

    methods = commands.add_parser("methods", help="list the merge methods and their parameters")
    methods.set_defaults(run=_methods)
    quality_cli.add_parser(commands)
    statistics_cli.add_parser(commands)
    osrm_cli.add_parser(commands)
    keys_cli.add_parser(commands)
    add_remote_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except (MergeEngineError, ServerError) as err:
        print(f"loramerge {args.command}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
