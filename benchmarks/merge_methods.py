"""Seconds per merge of every method (± Pico) on the default pool, warm caches, on the CPU.

    .venv/bin/python benchmarks/merge_methods.py [--threads 1 2] [--merges 4]

Each row: the median of `--merges` merges with random preferences over the 4 default adapters
(seeded), after one warm-up merge that fills the pool's stacks and the Pico calibration cache,
as a running server has them.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch
from hotswap import table

from loramerge.merge_engine import METHODS, AdapterPool, MergeSpec, merge
from loramerge.merge_engine.pico import CalibrationCache
from loramerge.server.defaults import prepare_defaults


def seconds_per_merge(pool: AdapterPool, spec: MergeSpec, merges: int, seed: int) -> float:
    cache = CalibrationCache(4)
    merge(pool, dict.fromkeys(pool.names, 1.0), spec, device="cpu", cache=cache)  # warm-up
    rng = random.Random(seed)
    times = []
    for _ in range(merges):
        preference = {name: rng.random() + 0.01 for name in pool.names}
        start = time.perf_counter()
        merge(pool, preference, spec, device="cpu", cache=cache)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, torch.get_num_threads()])
    parser.add_argument("--merges", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    assets = prepare_defaults(Path.home() / ".cache" / "loramerge")
    pool = AdapterPool.load(assets.adapters)
    rows = []
    for name in METHODS.names():
        if name == "tara":  # untuned tara is TA on the exact basis; tuned φ is per tenant
            continue
        for pico in (False, True):
            spec = MergeSpec(name, pico=pico)
            cells = [f"{name}{' + pico' if pico else ''}"]
            for threads in args.threads:
                torch.set_num_threads(threads)
                cells.append(f"{1000 * seconds_per_merge(pool, spec, args.merges, args.seed):.0f}")
            rows.append(cells)
            print(" | ".join(cells), flush=True)
    print()
    print(table(["method", *(f"ms/merge, {t} thread(s)" for t in args.threads)], rows))


if __name__ == "__main__":
    main()
