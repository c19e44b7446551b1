"""The per-request router end to end, offline: quality of routed merges against one static merge,
how a tenant's preference should combine with the route, and how many merged versions a stream
of prompts creates.

Scoring is the quality table's (server/defaults/quality.py: folded model, teacher-forced exact
match); routed items are grouped by their preference, one merge per group
(server/defaults/routed.py). Parameters of the router rows are chosen on validation by
`loramerge eval --routed`; this script reports, on the test split (seed 1234, n per task):

1. static vs routed: the uniform static merge and the routed one, TA and TSV-M + Pico;
2. tenant preferences: ρ_tenant ⊙ r(x) (served) against α ρ_tenant + (1 − α) r(x) and the
   static tenant merge, for tenants that weight only some tasks;
3. versions: distinct routed preferences of the test stream per temperature and step.

    .venv/bin/python benchmarks/router_quality.py [--n 100] [--results /tmp/router/results]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from loramerge.merge_engine import AdapterPool
from loramerge.server.config import load_settings
from loramerge.server.defaults import prepare_defaults
from loramerge.server.defaults.quality import TEST_SEED, Scorer, Split, Variant, normalised
from loramerge.server.defaults.routed import DEFAULT_ROUTE, route_items
from loramerge.server.defaults.tasks import TASKS

MERGES = {"ta": ("ta", False), "tsvm + pico": ("tsvm", True)}
TENANTS = {"add=2,date=1": (("add", 2.0), ("date", 1.0)),
           "caesar,date,reverse": (("caesar", 1.0), ("date", 1.0), ("reverse", 1.0))}  # fmt: skip
RULES = (("product", 0.5), ("mixture", 0.5), ("static", 0.5))
TEMPERATURES = (0.0, 0.02, 0.05, 0.1, 0.2, 0.5)
STEPS = (0.01, 0.05, 0.1, 0.25)


def routed(label: str, method: str, pico: bool, **route: Any) -> Variant:
    variant = Variant(label, "routed", method=method, pico=pico, route=DEFAULT_ROUTE)
    return variant.with_route(**route)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100, help="test items per task")
    parser.add_argument("--results", type=Path, default=Path("/tmp/router/results"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/router/quality_router.json"))
    parser.add_argument("--temperature", type=float, default=0.05, help="chosen on validation")
    parser.add_argument("--step", type=float, default=0.1, help="chosen on validation")
    parser.add_argument("--features", default="embedding", help="chosen on validation")
    args = parser.parse_args()
    assets = prepare_defaults(load_settings().cache_dir)
    pool = AdapterPool.load(assets.adapters)
    scorer = Scorer(assets.model_dir, pool, args.results, _progress)
    test = Split("test", TEST_SEED, args.n)
    chosen = {"temperature": args.temperature, "step": args.step, "features": args.features}
    own = {
        t: scorer.score(Variant(f"adapter {t} alone", "adapter", adapter=t), test)
        for t in pool.names
    }
    report: dict[str, Any] = {"chosen": chosen, "n": args.n}

    lines = ["| merge | preference | " + " | ".join(t.name for t in TASKS) + " | normalised |",
             "|---|---|" + "---|" * (len(TASKS) + 1)]  # fmt: skip
    rows = report["static_vs_routed"] = []
    for name, (method, pico) in MERGES.items():
        for rule in ("static", "product"):
            variant = routed(f"{rule} {name}", method, pico, rule=rule, **chosen)
            scores = scorer.score(variant, test)
            row = {"merge": name, "rule": rule, "normalised": normalised(scores, own),
                   "accuracy": {t.name: scores.accuracy(t.name) for t in TASKS}}  # fmt: skip
            rows.append(row)
            lines.append(_line(name, "uniform" if rule == "static" else "routed", row))
    print("\n## Static uniform merge vs routed, test\n\n" + "\n".join(lines), flush=True)

    lines = ["| tenant | rule | " + " | ".join(t.name for t in TASKS) + " | tenant's tasks |",
             "|---|---|" + "---|" * (len(TASKS) + 1)]  # fmt: skip
    rows = report["tenants"] = []
    for tenant, prior in TENANTS.items():
        for rule, alpha in RULES:
            variant = routed(f"{tenant} {rule}", "ta", False, rule=rule, alpha=alpha,
                             prior=prior, **chosen)  # fmt: skip
            scores = scorer.score(variant, test)
            support = [name for name, _ in prior]
            kept = [scores.accuracy(t) / max(own[t].accuracy(t), 1e-9) for t in support]
            row = {"tenant": tenant, "rule": rule, "alpha": alpha,
                   "accuracy": {t.name: scores.accuracy(t.name) for t in TASKS},
                   "normalised_on_support": sum(kept) / len(kept)}  # fmt: skip
            rows.append(row)
            label = rule if rule != "mixture" else f"mixture α={alpha}"
            cells = " | ".join(f"{row['accuracy'][t.name]:.2f}" for t in TASKS)
            lines.append(f"| {tenant} | {label} | {cells} | {row['normalised_on_support']:.3f} |")
    print("\n## Tenant preference × route (TA), test\n\n" + "\n".join(lines), flush=True)

    prompts = [e.prompt for t in TASKS for e in t.examples(TEST_SEED, args.n)]
    counts: dict[str, dict[str, int]] = {}
    for features in ("embedding", "ngram"):
        for temperature in TEMPERATURES:
            route = dict(DEFAULT_ROUTE) | {"features": features, "temperature": temperature}
            counts[f"{features} T={temperature}"] = {
                str(step): len(
                    set(route_items(pool, assets.model_dir, route | {"step": step}, prompts))
                )
                for step in STEPS
            }
    report["versions"] = counts
    lines = ["| features, T | " + " | ".join(f"step {s}" for s in STEPS) + " |",
             "|---|" + "---|" * len(STEPS)]  # fmt: skip
    lines += [
        f"| {k} | " + " | ".join(str(v[str(s)]) for s in STEPS) + " |" for k, v in counts.items()
    ]
    print(
        f"\n## Distinct merged versions for the {len(prompts)} test prompts\n\n" + "\n".join(lines)
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


def _line(merge: str, preference: str, row: dict[str, Any]) -> str:
    cells = " | ".join(f"{row['accuracy'][t.name]:.2f}" for t in TASKS)
    return f"| {merge} | {preference} | {cells} | {row['normalised']:.3f} |"


def _progress(label: str, done: int, total: int) -> None:
    if done == total:
        print(f"  scored {label}: {total} items", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
