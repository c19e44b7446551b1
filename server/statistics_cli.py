"""`loramerge stats`: write an adapter's input statistics (what RegMean merges by).

The adapter answers its unlabeled calibration prompts (greedy, folded into the base model),
then the base model reads each prompt and answer and the inputs of the adapted layers are
summed; `input_statistics.safetensors` goes into the adapter's directory (or `--out`). The
server reads it with the adapter; a pool whose adapters all have statistics can be merged with
`regmean`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from loramerge.merge_engine import load_adapter, resolve_device, save_statistics
from loramerge.merge_engine.statistics import ANSWER_TOKENS

from .config import load_settings


def add_parser(commands: Any) -> None:
    """Register `stats` on the `loramerge` subcommand parser."""
    stats = commands.add_parser(
        "stats", help="write an adapter's input statistics from unlabeled prompts (for regmean)"
    )
    stats.add_argument("--adapter", type=Path, required=True, help="PEFT adapter directory")
    stats.add_argument(
        "--prompts", type=Path, required=True,
        help="the adapter's task prompts: JSONL (prompt or messages) or plain lines; ~64 suffice",
    )  # fmt: skip
    stats.add_argument("--model", type=Path, help="base model directory (default: engine.model, "
                       "else the embedded model)")  # fmt: skip
    stats.add_argument("--out", type=Path, help="file to write (default: in the adapter dir)")
    stats.add_argument(
        "--answer-tokens", type=int, default=ANSWER_TOKENS, metavar="N",
        help=f"include up to N tokens of the adapter's own answer per prompt (default "
        f"{ANSWER_TOKENS}; 0: prompts only)",
    )  # fmt: skip
    stats.add_argument("--device", default="auto", help="auto, cpu or cuda")
    stats.add_argument("--config", type=Path, help="YAML config file (engine.model, cache_dir)")
    stats.set_defaults(run=_stats)


def _stats(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .defaults.statistics import collect_statistics
    from .quality_cli import read_prompts

    if args.answer_tokens < 0:
        raise SystemExit(f"loramerge stats: --answer-tokens must be ≥ 0, got {args.answer_tokens}")
    adapter = load_adapter(args.adapter)
    prompts = read_prompts(args.prompts)
    model_dir = args.model or _configured_model(args.config)
    bars: dict[str, Any] = {}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=stage, unit="prompt", file=sys.stderr)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    statistics = collect_statistics(
        model_dir,
        prompts,
        adapter.modules,
        answer_tokens=args.answer_tokens,
        device=str(resolve_device(args.device)),
        progress=progress,
    )
    path = save_statistics(statistics, args.out or args.adapter)
    print(
        f"{path}: {len(statistics.moments)} input sites, {statistics.tokens} tokens of "
        f"{statistics.prompts} prompts"
    )
    return 0


def _configured_model(config: Path | None) -> Path:
    settings = load_settings(config)
    if settings.engine.model is not None:
        return Path(settings.engine.model)
    from .defaults import prepare_defaults

    return prepare_defaults(settings.cache_dir).model_dir
