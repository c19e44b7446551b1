"""Hot-swap benchmark: loramerge's merged-version path against plain vLLM LoRA serving.

One process, one real vLLM engine, the embedded model and default adapters. Prints markdown
tables (medians; ratios measured in this run):

(a) A new preference → first token, split into merge / export / vLLM load / first token, against
    (i) the same request on an already-resident version and (ii) vLLM loading an equivalent
    precomputed adapter from disk the plain way (a LoRARequest it has never seen).
(b) 8 tenants with distinct merged versions against vLLM serving the 8 equivalent precomputed
    adapters directly: the same prompts, throughput ratio.

    .venv/bin/python benchmarks/hotswap.py [--trials 5] [--rounds 2] [--per 2] [--tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from loramerge.merge_engine import AdapterPool, MergeSpec, merge, save_adapter
from loramerge.server.config import load_settings
from loramerge.server.engine import adapter_dtype, lora_request, open_engine, quiet_vllm
from loramerge.server.metrics import Metrics
from loramerge.server.versions import MergedVersions

PROMPT = "Write the date 12 March 1987 as DD/MM/YY."


def preferences(names: Sequence[str], count: int, offset: int) -> list[dict[str, float]]:
    """`count` distinct preferences over all adapters (distinct after 1% rounding)."""
    return [
        {name: 1.0 + ((offset + i) * (j + 1) % 7) / 3 for j, name in enumerate(names)}
        for i in range(count)
    ]


async def first_token(engine: Any, prompt: dict[str, list[int]], lora: Any) -> float:
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, output_kind=RequestOutputKind.DELTA)
    start = time.perf_counter()
    async for _ in engine.generate(prompt, params, uuid.uuid4().hex, lora_request=lora):
        break
    return time.perf_counter() - start


async def run_all(
    engine: Any, prompt: dict[str, list[int]], loras: Sequence[Any], tokens: int, per: int
) -> float:
    """Generate `per` completions of `tokens` tokens for each adapter at once; → tokens/s."""
    from vllm.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)

    async def one(lora: Any) -> int:
        produced = 0
        async for output in engine.generate(prompt, params, uuid.uuid4().hex, lora_request=lora):
            produced = len(output.outputs[0].token_ids)
        return produced

    start = time.perf_counter()
    counts = await asyncio.gather(*[one(lora) for lora in loras for _ in range(per)])
    return sum(counts) / (time.perf_counter() - start)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def report_hotswap(rows: dict[str, list[float]], trials: int, pool_size: int) -> None:
    ms = {key: median_ms(values) for key, values in rows.items()}
    print(f"\n## (a) New preference → first token (median of {trials} trials, ms)\n")
    print(
        table(
            ["path", "merge", "export", "vLLM load", "first token", "total"],
            [
                [
                    "loramerge hot-swap, new preference",
                    ms["merge"],
                    ms["export"],
                    ms["load"],
                    ms["first"],
                    ms["total"],
                ],
                [
                    "loramerge, version already resident",
                    "–",
                    "–",
                    "–",
                    ms["resident"],
                    ms["resident"],
                ],
                [
                    "plain vLLM, precomputed adapter from disk",
                    "–",
                    "–",
                    "(inside)",
                    "–",
                    ms["plain"],
                ],
            ],
        )
    )
    ratio = statistics.median(t / p for t, p in zip(rows["total"], rows["plain"], strict=True))
    merge_export = [m + e for m, e in zip(rows["merge"], rows["export"], strict=True)]
    print(f"\nhot-swap / plain load (median of per-trial ratios): **{ratio:.2f}×** (goal ≤ 1.5×)")
    print(f"merge + export: **{median_ms(merge_export)} ms** (goal ≤ 50 ms, N = {pool_size})")


def report_throughput(ours: list[float], plain: list[float], args: argparse.Namespace) -> None:
    print(
        f"\n## (b) 8 tenants, {args.per} prompts × {args.tokens} tokens each "
        f"(tokens/s, median of {args.rounds} rounds)\n"
    )
    print(
        table(
            ["serving", "tokens/s"],
            [
                ["loramerge, 8 merged versions", f"{statistics.median(ours):.1f}"],
                ["plain vLLM, 8 precomputed adapters", f"{statistics.median(plain):.1f}"],
            ],
        )
    )
    ratio = statistics.median(o / p for o, p in zip(ours, plain, strict=True))
    print(f"\nthroughput loramerge / plain: **{ratio:.2f}×** (goal ≥ 0.95×)")


def median_ms(values: Sequence[float]) -> str:
    return f"{statistics.median(values) * 1000:.1f}"


async def benchmark(args: argparse.Namespace) -> None:
    from loramerge.server.defaults import prepare_defaults

    settings = load_settings(args.config)
    assets = prepare_defaults(settings.cache_dir, progress=print)
    pool = AdapterPool.load(assets.adapters)
    shm = Path(tempfile.mkdtemp(prefix="loramerge-bench-", dir="/dev/shm"))
    disk = Path(tempfile.mkdtemp(prefix="loramerge-bench-plain-"))
    plain_ids = iter(range(100_000, 200_000))
    spec = MergeSpec(rank=settings.engine.max_lora_rank)
    try:
        async with open_engine(settings.engine, assets.model_dir) as engine:
            versions = MergedVersions(
                engine,
                lora_request,
                Metrics(settings.metrics, CollectorRegistry()),
                capacity=settings.engine.resident_adapters,
                export_dir=shm,
                export_dtype=adapter_dtype(settings.engine),
                preference_step=settings.merge.preference_step,
                device=settings.merge.device,
                dtype=settings.merge.dtype,
                max_concurrent_merges=1,
                calibration_cache_size=settings.merge.calibration_cache_size,
            )
            await versions.pool_changed(pool)
            tokenizer = engine.get_tokenizer()
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
            )
            prompt = {"prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}

            def plain_adapter(preference: dict[str, float]) -> Any:
                """The same merged adapter, written to disk ahead of time (not timed)."""
                result = merge(pool, preference, spec, device=settings.merge.device)
                name = f"plain-{uuid.uuid4().hex[:8]}"
                save_adapter(result, disk / name, dtype=adapter_dtype(settings.engine))
                return lora_request(name, next(plain_ids), str(disk / name))

            # Warm-up: kernels, the LoRA path and the calibration of the full pool.
            for preference in preferences(pool.names, 2, offset=100):
                async with versions.lease(pool, spec, _rho(pool, preference)) as lease:
                    await first_token(engine, prompt, lease.version.lora_request)
                await first_token(engine, prompt, plain_adapter(preference))

            rows: dict[str, list[float]] = {
                k: [] for k in ("merge", "export", "load", "first", "total", "resident", "plain")
            }
            for preference in preferences(pool.names, args.trials, offset=0):
                plain = plain_adapter(preference)
                start = time.perf_counter()
                async with versions.lease(pool, spec, _rho(pool, preference)) as lease:
                    token = await first_token(engine, prompt, lease.version.lora_request)
                    rows["total"].append(time.perf_counter() - start)
                    phases = lease.version.phase_seconds
                    rows["merge"].append(phases["total"] - phases["export"] - phases["load"])
                    rows["export"].append(phases["export"])
                    rows["load"].append(phases["load"])
                    rows["first"].append(token)
                async with versions.lease(pool, spec, _rho(pool, preference)) as lease:
                    assert lease.cached
                    rows["resident"].append(
                        await first_token(engine, prompt, lease.version.lora_request)
                    )
                rows["plain"].append(await first_token(engine, prompt, plain))

            report_hotswap(rows, args.trials, len(pool))

            # (b) throughput: 8 tenants with distinct versions vs the 8 plain adapters.
            tenant_prefs = preferences(pool.names, 8, offset=50)
            plain_loras = [plain_adapter(p) for p in tenant_prefs]
            ours: list[float] = []
            plain_rates: list[float] = []
            for _ in range(args.rounds):
                async with AsyncExitStack() as stack:
                    leases = [
                        await stack.enter_async_context(versions.lease(pool, spec, _rho(pool, p)))
                        for p in tenant_prefs
                    ]
                    loras = [lease.version.lora_request for lease in leases]
                    ours.append(await run_all(engine, prompt, loras, args.tokens, args.per))
                plain_rates.append(
                    await run_all(engine, prompt, plain_loras, args.tokens, args.per)
                )
            report_throughput(ours, plain_rates, args)
            await versions.close()
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(disk, ignore_errors=True)


def _rho(pool: AdapterPool, preference: dict[str, float]) -> tuple[float, ...]:
    total = sum(preference.values())
    return tuple(preference[name] / total for name in pool.names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="server YAML config (engine settings)")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--per", type=int, default=2, help="prompts per tenant in (b)")
    parser.add_argument("--tokens", type=int, default=32)
    quiet_vllm()
    asyncio.run(benchmark(parser.parse_args()))


if __name__ == "__main__":
    main()
