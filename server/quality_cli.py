"""`loramerge eval` (the measured merge-quality table) and `loramerge tune` (merge, then distill).

eval   score the base model, each default adapter and every merge method without/with Pico (and
       SVC) on the default tasks; parameters chosen on a validation split; writes the table into
       docs/quality.md and a PNG next to it. Results are cached per variant.
tune   on unlabeled prompts: train the merged factors to match the teacher adapters
       (`--objective distill`), or TARA Variant B's weights φ by the entropy pseudo-loss
       (`--objective entropy`); writes a PEFT adapter and tune.json (and phi.json for TARA).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from loramerge.merge_engine import METHODS, AdapterPool, MergeSpec, save_adapter
from loramerge_client.tuning import read_prompt_file

from .config import load_settings


def add_parser(commands: Any) -> None:
    """Register `eval` and `tune` on the `loramerge` subcommand parser."""
    evaluate = commands.add_parser("eval", help="measure merge quality on the default tasks")
    evaluate.add_argument("--config", type=Path, help="YAML config file (for cache_dir)")
    evaluate.add_argument("--n", type=int, default=100, help="test items per task (≥ 100)")
    evaluate.add_argument("--validation-n", type=int, default=40, help="validation items/task")
    evaluate.add_argument(
        "--methods", nargs="*", help="row names to score (default: all; e.g. ta 'core[tsvm]')"
    )
    evaluate.add_argument(
        "--tuned", action="append", default=[], metavar="LABEL=DIR",
        help="also score a tuned PEFT adapter directory as its own row",
    )  # fmt: skip
    evaluate.add_argument(
        "--routed", action="store_true",
        help="also score the per-request router rows (router + ta, router + regmean; "
        "`--methods router` selects them alone, `--methods 'router + ta'` one)",
    )  # fmt: skip
    evaluate.add_argument(
        "--pool", action="append", default=[], metavar="NAME=DIR",
        help="also score the chosen methods on another pool of the default tasks (DIR holds "
        "one adapter folder per task, e.g. <cache>/adapters-osrm)",
    )  # fmt: skip
    evaluate.add_argument(
        "--pool-methods", nargs="*", default=["ta", "ties", "tsvm", "regmean"], metavar="ROW",
        help="the rows (each with its + pico and + svc variants) scored on the --pool pools",
    )  # fmt: skip
    evaluate.add_argument("--results", type=Path, help="cache of per-variant results")
    evaluate.add_argument("--doc", type=Path, default=Path("docs/quality.md"))
    evaluate.add_argument("--plot", type=Path, default=Path("docs/quality.png"))
    evaluate.add_argument("--json", type=Path, help="also write the table as JSON here")
    evaluate.add_argument(
        "--sweep", type=int, default=0, metavar="N",
        help="also sweep λ/α per method over every pool subset of 2..N adapters, on N validation "
        "items per task (0: skip)",
    )  # fmt: skip
    evaluate.add_argument(
        "--check-vllm", type=int, default=2, metavar="K",
        help="per variant, serve its adapter with vLLM and compare the greedy answers of the "
        "first K test items per task with the folded model's (0: skip)",
    )  # fmt: skip
    evaluate.set_defaults(run=_eval)

    tune = commands.add_parser(
        "tune",
        help="tune a merge on unlabeled prompts: distill it, or TARA's φ (--objective entropy)",
    )
    tune.add_argument(
        "--adapter", action="append", default=[], metavar="NAME=DIR",
        help="a teacher adapter (default: the prepared default pool)",
    )  # fmt: skip
    tune.add_argument("--preference", action="append", default=[], metavar="NAME=WEIGHT")
    tune.add_argument(
        "--prompts", type=Path,
        help="JSONL (prompt or messages, optional task/adapter: the adapter whose task it is) "
        "or text lines",
    )  # fmt: skip
    tune.add_argument(
        "--task-prompts", type=int, metavar="N",
        help="instead of --prompts: N unlabeled prompts per default task (seed 2002)",
    )  # fmt: skip
    tune.add_argument(
        "--method", default="ta", choices=METHODS.names(),
        help="the merge to start from (entropy: ta or tara, TA on TARA's shared basis)",
    )  # fmt: skip
    tune.add_argument("--pico", action=argparse.BooleanOptionalAction, default=False)
    tune.add_argument("--objective", choices=["distill", "entropy"], default="distill")
    tune.add_argument("--weighting", choices=["confidence", "preference"], default="confidence")
    tune.add_argument("--steps", type=int, help="optimizer steps (distill 200, entropy 500)")
    tune.add_argument(
        "--scaling", type=float,
        help="entropy: λ of the initial φ_i = λ·n·ρ_i (default 1/n, TA's)",
    )  # fmt: skip
    tune.add_argument("--batch-size", type=int, default=16)
    tune.add_argument("--lr", type=float, default=1e-3)
    tune.add_argument("--model", type=Path, help="base model directory (default: embedded)")
    tune.add_argument("--config", type=Path, help="YAML config file (for cache_dir)")
    tune.add_argument("--out", type=Path, required=True, help="new adapter directory")
    tune.set_defaults(run=_tune)


def read_prompts(path: Path) -> list[str]:
    """Prompts from JSONL (`prompt`, or `messages` whose last user turn is taken) or plain
    lines. Errors name the file and line."""
    return [text for text, _task in read_task_prompts(path)]


def read_task_prompts(path: Path) -> list[tuple[str, str | None]]:
    """(prompt, task) from JSONL or plain lines, as `read_prompts`; a JSONL line may name the
    adapter whose task the prompt is in a `task` (or `adapter`) string field, else None."""
    try:
        return read_prompt_file(path)
    except ValueError as err:
        raise SystemExit(f"loramerge tune: {err}") from None


def _default_assets(config: Path | None) -> Any:
    from .defaults import prepare_defaults

    settings = load_settings(config)
    return prepare_defaults(settings.cache_dir, progress=lambda line: print(line, file=sys.stderr))


def _eval(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .defaults.quality import (
        DEFAULT_POOL,
        SWEEP_METHODS,
        TEST_SEED,
        VALIDATION_SEED,
        Scorer,
        Split,
        Variant,
        build_table,
        check_table,
        in_pool,
        merge_variants,
        pool_size_sweep,
        routed_variants,
    )
    from .defaults.quality_report import (
        SWEEP_BEGIN,
        SWEEP_END,
        sweep_markdown,
        write_block,
        write_markdown,
        write_plot,
    )

    assets = _default_assets(args.config)
    pool = AdapterPool.load(assets.adapters)
    results = args.results or assets.model_dir.parent.parent / "quality"
    bars: dict[str, Any] = {}

    def progress(label: str, done: int, total: int) -> None:
        bar = bars.get(label)
        if bar is None:
            bar = bars[label] = tqdm(total=total, desc=label, unit="item", file=sys.stderr)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    pools = _other_pools(args.pool, pool)
    scorer = Scorer(assets.model_dir, pool, results, progress, pools)
    variants = merge_variants() + (routed_variants() if args.routed else [])
    if args.methods:
        wanted = set(args.methods)
        variants = [v for v in variants if {v.label.split(" + ")[0], v.label} & wanted]
    on_pools = [
        v for v in variants if v.source != "routed" and v.label.split(" + ")[0] in args.pool_methods
    ]
    variants += [in_pool(v, name) for name in pools for v in on_pools]
    tuned = []
    for item in args.tuned:
        label, _, path = item.partition("=")
        tuned.append(Variant(label, "tuned", path=path))
    table = build_table(
        scorer,
        Split("validation", VALIDATION_SEED, args.validation_n),
        Split("test", TEST_SEED, args.n),
        variants,
        tuned,
    )
    if args.check_vllm > 0:
        table = check_table(
            scorer, table, args.check_vllm, emit=lambda line: print(line, file=sys.stderr)
        )
    write_markdown(table, args.doc)
    write_plot(table, args.plot)
    if args.sweep > 0:
        validation = Split("validation", VALIDATION_SEED, args.sweep)
        swept = [
            v
            for v in variants
            if v.method in SWEEP_METHODS and not v.svc and v.pool == DEFAULT_POOL
        ]
        sweep = pool_size_sweep(scorer, validation, swept)
        write_block(sweep_markdown(sweep, validation), SWEEP_BEGIN, SWEEP_END, args.doc)
    if args.json:
        args.json.write_text(json.dumps(_table_json(table), indent=2))
    best = table.best()
    print(f"best: {best.variant.label} normalised {best.normalised:.3f}; wrote {args.doc}")
    return 0


def _other_pools(items: list[str], default: AdapterPool) -> dict[str, AdapterPool]:
    """`--pool NAME=DIR`: DIR/<task> for every adapter of the default pool."""
    from .cli import _pairs

    pools = {}
    for name, raw in _pairs(items, "--pool").items():
        if name == "default":
            raise SystemExit("loramerge eval: --pool: the name 'default' is the default pool's")
        folder = Path(raw).expanduser()
        missing = [task for task in default.names if not (folder / task).is_dir()]
        if missing:
            raise SystemExit(
                f"loramerge eval: --pool {name}: {folder} has no adapter folder "
                f"{', '.join(repr(t) for t in missing)} (one per default task)"
            )
        pools[name] = AdapterPool.load({task: folder / task for task in default.names})
    return pools


def _table_json(table: Any) -> dict[str, Any]:
    return {
        "validation": dataclasses.asdict(table.validation),
        "test": dataclasses.asdict(table.test),
        "rows": [
            {
                "label": row.variant.label,
                "pool": row.variant.pool,
                "normalised_own": row.normalised_own,
                "params": dict(row.variant.params),
                "accuracy": dict(row.accuracy),
                "normalised": row.normalised,
                "normalised_interval": list(row.normalised_interval),
                "gain_share": row.gain_share,
                "rank": row.rank,
                "retained_energy": row.retained_energy,
                "served": row.served,
                "validation_normalised": row.validation_normalised,
                "tried": [list(pair) for pair in row.tried],
            }
            for row in table.rows
        ],
    }


def _tune(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .cli import _pairs, _weights
    from .defaults.distill import DistillConfig, distill
    from .defaults.tasks import CALIBRATION_SEED, TASKS

    if args.adapter:
        adapters = {name: Path(p) for name, p in _pairs(args.adapter, "--adapter").items()}
        model_dir = args.model
        if model_dir is None:
            model_dir = _default_assets(args.config).model_dir
    else:
        assets = _default_assets(args.config)
        adapters, model_dir = assets.adapters, args.model or assets.model_dir
    if args.prompts is not None:
        tasks = read_task_prompts(args.prompts)
    elif args.task_prompts:
        count = args.task_prompts
        tasks = [(e.prompt, t.name) for t in TASKS for e in t.examples(CALIBRATION_SEED, count)]
    else:
        raise SystemExit("loramerge tune: give --prompts FILE or --task-prompts N")
    prompts = [text for text, _task in tasks]
    pool = AdapterPool.load(adapters)
    preference = _weights(args.preference) or {name: 1.0 for name in pool.names}
    if args.objective == "entropy":
        return _tune_entropy(args, pool, preference, model_dir, tasks)
    config = DistillConfig(
        steps=args.steps if args.steps is not None else 200,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        weighting=args.weighting,
    )
    with tqdm(total=config.steps, desc="distilling", unit="step", file=sys.stderr) as bar:

        def step(done: int, total: int, loss: float) -> None:
            bar.update(done - bar.n)
            bar.set_postfix(loss=f"{loss:.4f}")

        result, losses = distill(
            model_dir,
            pool,
            preference,
            prompts,
            MergeSpec(args.method, pico=args.pico),
            config,
            progress=lambda line: print(line, file=sys.stderr),
            step_progress=step,
        )
    path = save_adapter(result, args.out)
    summary = {
        "path": str(path),
        "objective": args.objective,
        "init": {"method": args.method, "pico": args.pico},
        "preference": dict(result.report.preference),
        "prompts": len(prompts),
        "config": dataclasses.asdict(config),
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "losses": losses,
    }
    (path / "tune.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps({k: v for k, v in summary.items() if k != "losses"}, indent=2, default=str))
    return 0


def _tune_entropy(
    args: argparse.Namespace,
    pool: AdapterPool,
    preference: dict[str, float],
    model_dir: Path,
    tasks: list[tuple[str, str | None]],
) -> int:
    from tqdm import tqdm

    from .defaults.tara import Prompt, TuneConfig, tune, write_phi_json

    if args.method not in ("ta", "tara") or args.pico:
        raise SystemExit(
            "loramerge tune: --objective entropy tunes TARA's φ, which starts from TA on the "
            "shared basis: use --method ta (or tara) without --pico"
        )
    unknown = sorted({task for _text, task in tasks if task and task not in pool.names})
    if unknown:
        raise SystemExit(
            f"loramerge tune: prompts name tasks that are no adapter: {', '.join(unknown)} "
            f"(the adapters: {', '.join(pool.names)})"
        )
    try:
        config = TuneConfig(
            steps=args.steps if args.steps is not None else 500,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            scaling=args.scaling,
        )
    except ValueError as err:
        raise SystemExit(f"loramerge tune: {err}") from None
    with tqdm(total=config.steps, desc="tuning φ", unit="step", file=sys.stderr) as bar:

        def step(done: int, total: int, loss: float) -> None:
            bar.update(done - bar.n)
            bar.set_postfix(loss=f"{loss:.4f}")

        result = tune(
            model_dir,
            pool,
            preference,
            [Prompt(text, task) for text, task in tasks],
            config,
            progress=lambda line: print(line, file=sys.stderr),
            step_progress=step,
        )
    path = save_adapter(result.merged, args.out)
    summary = write_phi_json(result, pool, path / "phi.json")
    (path / "tune.json").write_text(json.dumps(summary, indent=2, default=str))
    shown = {k: v for k, v in summary.items() if k not in ("losses", "modules")}
    print(json.dumps({"path": str(path), **shown}, indent=2, default=str))
    return 0
