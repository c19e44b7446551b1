"""`loramerge osrm`: merge-friendly adapters by OSRM (orthogonal subspaces, Zhang et al. 2025).

osrm init     per adapter, the A-initialisation Ã from the OTHER adapters' input statistics
              (`<out>/<name>.safetensors`, tensors `<module>.lora_A.weight` [r, in]) and a JSON
              summary; train the task's LoRA from A = Ã, B = 0 (`loramerge prepare --osrm` does
              this for the default pool).
osrm project  the post-hoc variant for adapters that exist: each adapter re-expressed on its Ã
              (B̂ = ΔW Ãᵀ), written as PEFT adapters `<out>/<name>/` that PEFT and vLLM load,
              with its calibration prompts copied along. Input statistics include the adapter's
              own answers, so a projected adapter needs its own: `--stats` computes them from
              those prompts (or run `loramerge stats` later).

Every adapter needs `input_statistics.safetensors` (`loramerge stats`). `--out` is a new
directory, written atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import save

from loramerge.merge_engine import (
    AdapterPool,
    ExportError,
    InputStatistics,
    LoraAdapter,
    LoraModule,
    MissingStatisticsError,
    save_statistics,
)
from loramerge.merge_engine.export import save_modules
from loramerge.merge_engine.osrm import (
    FEATURES,
    WEIGHTINGS,
    OsrmBasis,
    diagnose,
    kept_energy,
    osrm_basis,
    project_modules,
)
from loramerge_client.cli import parse_pairs

PROMPTS_FILE = "calibration_prompts.jsonl"  # the default pool's name for an adapter's prompts
SUMMARY = {"init": "osrm_init.json", "project": "osrm_project.json"}


def add_parser(commands: Any) -> None:
    """Register `osrm init` and `osrm project` on the `loramerge` subcommand parser."""
    osrm = commands.add_parser("osrm", help="OSRM: merge-friendly LoRA subspaces")
    actions = osrm.add_subparsers(dest="osrm_command", required=True)
    for name, text in (
        ("init", "write each adapter's OSRM A-initialisation (train from it)"),
        ("project", "re-express existing adapters on their OSRM subspaces (PEFT adapters)"),
    ):
        action = actions.add_parser(name, help=text)
        action.add_argument(
            "--adapter", action="append", default=[], metavar="NAME=DIR", required=True,
            help="a PEFT adapter with input statistics; give every task of the pool (≥ 2)",
        )  # fmt: skip
        action.add_argument("--out", type=Path, required=True, help="new output directory")
        action.add_argument(
            "--features", choices=FEATURES, default="moment",
            help="moment: the other tasks' second moments (default); mean: the paper's one "
            "mean row per task (Eq. 4; degenerate with few tasks)",
        )  # fmt: skip
        action.add_argument(
            "--weighting", choices=WEIGHTINGS, default="task",
            help="task: every other task weighs the same (default); token: by token count "
            "(the paper's concatenation of samples)",
        )  # fmt: skip
        if name == "init":
            action.add_argument("--rank", type=int, help="rank of Ã (default: each module's)")
        else:
            action.add_argument(
                "--stats", action="store_true",
                help=f"also write each projected adapter's input statistics from its "
                f"{PROMPTS_FILE} (runs the base model; needed to merge them with regmean)",
            )  # fmt: skip
            action.add_argument("--model", type=Path, help="with --stats: base model directory "
                                "(default: engine.model, else the embedded model)")  # fmt: skip
            action.add_argument("--config", type=Path, help="with --stats: YAML config file")
        action.set_defaults(run=_init if name == "init" else _project)


def add_prepare_options(prepare: argparse.ArgumentParser) -> None:
    """`loramerge prepare --osrm`: also train the default pool from OSRM's init."""
    prepare.add_argument(
        "--osrm", action="store_true",
        help="also train the default pool from OSRM's A-init into <cache>/adapters-osrm "
        "(the standard pool is only read)",
    )  # fmt: skip
    prepare.add_argument(
        "--osrm-features", choices=FEATURES, default="moment",
        help="with --osrm: moment (default) or the paper's mean rows (<cache>/adapters-osrm-mean)",
    )  # fmt: skip


def prepare_osrm(args: argparse.Namespace, assets: Any, cache_dir: Path) -> None:
    """The `--osrm` part of `loramerge prepare`, after the standard assets are ready."""
    if not args.osrm:
        return
    from .defaults.osrm import ensure_osrm_adapters

    folders = ensure_osrm_adapters(
        assets.model_dir,
        cache_dir.expanduser(),
        assets.adapters,
        features=args.osrm_features,
        progress=lambda line: print(line, flush=True),
    )
    for name, path in folders.items():
        print(f"OSRM adapter {name}: {path}")


def _pool(args: argparse.Namespace) -> tuple[AdapterPool, dict[str, InputStatistics]]:
    adapters = {name: Path(path) for name, path in parse_pairs(args.adapter, "--adapter").items()}
    if len(adapters) < 2:
        raise SystemExit(
            "loramerge osrm: give at least two --adapter NAME=DIR (OSRM uses the other tasks)"
        )
    pool = AdapterPool.load(adapters)
    missing = [a.name for a in pool.adapters if a.statistics is None]
    if missing:
        raise MissingStatisticsError(missing)
    statistics = {a.name: a.statistics for a in pool.adapters if a.statistics is not None}
    return pool, statistics


@dataclass(frozen=True)
class _Job:
    """One adapter of an `osrm` command: its basis, where its files go, the pool's statistics."""

    args: argparse.Namespace
    adapter: LoraAdapter
    basis: OsrmBasis
    staging: Path
    statistics: dict[str, InputStatistics]

    def diagnose(self, modules: Mapping[str, LoraModule]) -> dict[str, float]:
        return diagnose(modules, self.statistics, self.adapter.name, weighting=self.args.weighting)


def _each_adapter(
    args: argparse.Namespace,
    rank: Callable[[LoraAdapter, str], int],
    write: Callable[[_Job], dict[str, Any]],
) -> int:
    """Compute each adapter's OSRM basis (its modules' ranks from `rank`), let `write` put its
    files into the staging directory and return its summary entry; then write the summary and
    move the directory into place."""
    from tqdm import tqdm

    pool, statistics = _pool(args)
    summary: dict[str, Any] = {"features": args.features, "weighting": args.weighting}
    adapters: dict[str, Any] = {}
    with _new_directory(args.out) as staging:
        for adapter in tqdm(pool.adapters, desc=f"osrm {args.osrm_command}", unit="adapter",
                            file=sys.stderr):  # fmt: skip
            ranks = {key: rank(adapter, key) for key in adapter.modules}
            basis = osrm_basis(
                statistics, adapter.name, ranks, features=args.features, weighting=args.weighting
            )
            adapters[adapter.name] = write(_Job(args, adapter, basis, staging, statistics))
        summary["adapters"] = adapters
        (staging / SUMMARY[args.osrm_command]).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({"out": str(args.out), **summary}, indent=2))
    return 0


def _init(args: argparse.Namespace) -> int:
    if args.rank is not None and args.rank < 1:
        raise SystemExit(f"loramerge osrm init: --rank must be ≥ 1, got {args.rank}")
    return _each_adapter(args, lambda a, key: args.rank or a.modules[key].rank, _write_init)


def _write_init(job: _Job) -> dict[str, Any]:
    """`<name>.safetensors` with Ã of every module as `<module>.lora_A.weight`."""
    name, basis = job.adapter.name, job.basis
    tensors = {f"{key}.lora_A.weight": a.clone() for key, a in basis.a.items()}  # unshared
    (job.staging / f"{name}.safetensors").write_bytes(
        save(tensors, metadata={"format": "pt", "osrm_target": name})
    )
    current = job.diagnose(job.adapter.modules)
    return {
        "file": f"{name}.safetensors",
        "modules": len(basis.a),
        "rank": sorted({int(a.shape[0]) for a in basis.a.values()}),
        "interference_init": _mean(basis.interference.values()),
        "interference_init_max": max(basis.interference.values()),
        "interference_adapter": current["interference"],
        "cross_talk_adapter": current["cross_talk"],
    }


def _project(args: argparse.Namespace) -> int:
    if args.stats:
        from .statistics_cli import _configured_model

        args.model = args.model or _configured_model(args.config)
    return _each_adapter(args, lambda a, key: a.modules[key].rank, _write_project)


def _write_project(job: _Job) -> dict[str, Any]:
    """The projected PEFT adapter `<name>/`, with the statistics and prompts copied along."""
    adapter = job.adapter
    modules = project_modules(adapter.modules, job.basis.a)
    prompts = adapter.path / PROMPTS_FILE
    if job.args.stats and not prompts.is_file():
        raise SystemExit(f"loramerge osrm project --stats: {prompts} does not exist")
    files = {PROMPTS_FILE: prompts.read_bytes()} if prompts.is_file() else {}
    written = save_modules(
        modules,
        job.staging / adapter.name,
        target_modules=adapter.target_modules,
        base_model=adapter.base_model,
        metadata={"osrm": "project", "source_fingerprint": adapter.fingerprint},
        files=files,
    )
    if job.args.stats:
        _write_statistics(job.args.model, written, modules)
    kept = [kept_energy(module, job.basis.a[key]) for key, module in adapter.modules.items()]
    before, after = job.diagnose(adapter.modules), job.diagnose(modules)
    return {
        "path": adapter.name,
        "kept_energy_mean": _mean(kept),
        "kept_energy_min": min(kept),
        "interference_before": before["interference"],
        "interference_after": after["interference"],
        "cross_talk_before": before["cross_talk"],
        "cross_talk_after": after["cross_talk"],
    }


def _write_statistics(model_dir: Path, folder: Path, modules: Mapping[str, LoraModule]) -> None:
    """The projected adapter's own input statistics (its answers to its calibration prompts)."""
    from .defaults.statistics import collect_statistics
    from .quality_cli import read_prompts

    prompts = read_prompts(folder / PROMPTS_FILE)
    save_statistics(collect_statistics(model_dir, prompts, modules), folder)


def _mean(values: Iterable[float]) -> float:
    items = list(values)
    return float(sum(items)) / len(items)


@contextmanager
def _new_directory(target: Path) -> Iterator[Path]:
    """A staging directory beside `target`, renamed to `target` when the block succeeds and
    deleted otherwise; `target` must not exist."""
    if target.exists():
        raise ExportError("already exists; choose a new --out directory", path=target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
        staging.mkdir()
    except OSError as err:
        raise ExportError(f"cannot create the output directory: {err}", path=target) from None
    try:
        yield staging
        os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
