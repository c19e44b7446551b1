"""Hot-swap benchmark: loramerge's merged-version path against plain vLLM LoRA serving.

One process, one real vLLM engine, the embedded model and default adapters. Prints markdown
tables (medians; ratios measured in this run):

(a) A new preference → first token, split into merge / export / vLLM load (`add_lora`, 0 after
    the warm-up: vLLM loads a later version of the pool and spec in the first token's step) /
    first token, against
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
from loramerge.server.app import build_residency
from loramerge.server.config import load_settings
from loramerge.server.engine import adapter_dtype, lora_request, open_engine, quiet_vllm
from loramerge.server.metrics import Metrics
from loramerge.server.residency import Residency
from loramerge.server.selection import Selection

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


class Bench:
    """The engine, the pool and both ways of serving a merged adapter."""

    def __init__(self, engine: Any, pool: AdapterPool, settings: Any, shm: Path, disk: Path):
        self.engine, self.pool, self.settings = engine, pool, settings
        self.shm, self.disk = shm, disk
        self.spec = MergeSpec(rank=settings.engine.max_lora_rank)
        self.plain_ids = iter(range(100_000, 200_000))
        tokenizer = engine.get_tokenizer()
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
        )
        self.prompt = {"prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}
        self.residency: Residency | None = None

    async def versions(self) -> Residency:
        """One residency for the whole run (lora ids are unique within a residency only)."""
        if self.residency is None:
            metrics = Metrics(self.settings.metrics, CollectorRegistry())
            self.residency = build_residency(self.settings, self.engine, metrics, self.shm)
            self.residency.start()
            await self.residency.pool_changed(self.pool)
        return self.residency

    def lease(self, versions: Residency, preference: dict[str, float]) -> Any:
        return versions.lease(Selection(self.pool, self.spec, _rho(self.pool, preference), None))

    def plain_adapter(self, preference: dict[str, float]) -> Any:
        """The same merged adapter, written to disk ahead of time (not timed)."""
        result = merge(self.pool, preference, self.spec, device=self.settings.merge.device)
        name = f"plain-{uuid.uuid4().hex[:8]}"
        save_adapter(result, self.disk / name, dtype=adapter_dtype(self.settings.engine))
        return lora_request(name, next(self.plain_ids), str(self.disk / name))

    async def plain_first_token(self, preference: dict[str, float]) -> float:
        adapter = self.plain_adapter(preference)
        seconds = await first_token(self.engine, self.prompt, adapter)
        await self.engine.remove_lora(adapter.lora_int_id)
        return seconds

    async def hotswap(self, trials: int) -> dict[str, list[float]]:
        versions = await self.versions()
        for preference in preferences(self.pool.names, 2, offset=100):  # warm-up
            async with self.lease(versions, preference) as lease:
                await first_token(self.engine, self.prompt, lease.version.lora_request)
            await self.plain_first_token(preference)
        keys = ("merge", "export", "load", "first", "total", "resident", "plain")
        rows: dict[str, list[float]] = {key: [] for key in keys}
        for preference in preferences(self.pool.names, trials, offset=0):
            start = time.perf_counter()
            async with self.lease(versions, preference) as lease:
                token = await first_token(self.engine, self.prompt, lease.version.lora_request)
                rows["total"].append(time.perf_counter() - start)
                phases = lease.version.phase_seconds
                load = phases.get("load", 0.0)  # none after the first of a pool and spec
                rows["merge"].append(phases["total"] - phases["export"] - load)
                rows["export"].append(phases["export"])
                rows["load"].append(load)
                rows["first"].append(token)
            async with self.lease(versions, preference) as lease:
                assert lease.cached
                token = await first_token(self.engine, self.prompt, lease.version.lora_request)
                rows["resident"].append(token)
            rows["plain"].append(await self.plain_first_token(preference))
        return rows

    async def throughput(self, args: argparse.Namespace) -> tuple[list[float], list[float]]:
        """8 tenants: ours and the plain adapters, alternating which goes first per round.
        Exactly 16 adapters are loaded, within max_cpu_loras: nothing is evicted meanwhile."""
        versions = await self.versions()
        tenant_prefs = preferences(self.pool.names, 8, offset=50)
        plain_loras = [self.plain_adapter(p) for p in tenant_prefs]
        ours: list[float] = []
        plain: list[float] = []
        async with AsyncExitStack() as stack:
            leases = [
                await stack.enter_async_context(self.lease(versions, p)) for p in tenant_prefs
            ]
            loras = [lease.version.lora_request for lease in leases]
            for round_index in range(args.rounds):
                runs = [(ours, loras), (plain, plain_loras)]
                for rates, adapters in runs[:: 1 if round_index % 2 == 0 else -1]:
                    rates.append(
                        await run_all(self.engine, self.prompt, adapters, args.tokens, args.per)
                    )
        return ours, plain


async def benchmark(args: argparse.Namespace) -> None:
    from loramerge.server.defaults import prepare_defaults

    settings = load_settings(args.config)
    assets = prepare_defaults(settings.cache_dir, progress=print)
    pool = AdapterPool.load(assets.adapters)
    shm = Path(tempfile.mkdtemp(prefix="loramerge-bench-", dir="/dev/shm"))
    disk = Path(tempfile.mkdtemp(prefix="loramerge-bench-plain-"))
    try:
        async with open_engine(settings.engine, assets.model_dir) as engine:
            bench = Bench(engine, pool, settings, shm, disk)
            report_hotswap(await bench.hotswap(args.trials), args.trials, len(pool))
            ours, plain = await bench.throughput(args)
            report_throughput(ours, plain, args)
            await (await bench.versions()).close()
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
    parser.add_argument("--rounds", type=int, default=4, help="(b) rounds, order alternating")
    parser.add_argument("--per", type=int, default=2, help="prompts per tenant in (b)")
    parser.add_argument("--tokens", type=int, default=32)
    quiet_vllm()
    asyncio.run(benchmark(parser.parse_args()))


if __name__ == "__main__":
    main()
