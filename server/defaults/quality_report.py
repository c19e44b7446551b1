"""The quality table as Markdown (spliced into docs/quality.md) and as a bar chart (PNG)."""

from __future__ import annotations

import re
from pathlib import Path

from .quality import Row, Split, SweepCell, Table

BEGIN, END = "<!-- quality-table:begin -->", "<!-- quality-table:end -->"
SWEEP_BEGIN, SWEEP_END = "<!-- quality-sweep:begin -->", "<!-- quality-sweep:end -->"


def _percent(value: float) -> str:
    return f"{100 * value:.0f}"


def _row(row: Row, tasks: list[str], how: str, pools: bool = False) -> str:
    cells = [row.variant.label]
    for task in tasks:
        low, high = row.interval[task]
        cells.append(f"{_percent(row.accuracy[task])} [{_percent(low)}–{_percent(high)}]")
    low, high = row.normalised_interval
    cells.append(f"**{row.normalised:.2f}** [{low:.2f}–{high:.2f}]")
    if pools:
        own = row.normalised if row.normalised_own is None else row.normalised_own
        cells.append(f"{own:.2f}")
    cells.append(f"{row.gain_share:.2f}")
    rank = "" if row.rank is None else str(row.rank)
    if row.retained_energy is not None and row.retained_energy < 0.9995:
        rank += f" ({100 * row.retained_energy:.0f}% kept)"
    cells.append(rank)
    cells.append("" if row.served is None else f"{row.served[0]}/{row.served[1]}")
    cells.append(how)
    return "| " + " | ".join(cells) + " |"


def _chosen(row: Row) -> str:
    if not row.tried:
        return ""
    params = dict(row.variant.params)
    shown = {k: v for k, v in params.items() if k != "inner"}
    chosen = ", ".join(f"{k}={v}" for k, v in shown.items()) or "defaults"
    tried = "; ".join(f"{name}: {value:.2f}" for name, value in row.tried)
    return f"{chosen} (validation: {tried})" if len(row.tried) > 1 else chosen


def markdown(table: Table) -> str:
    """The generated part of docs/quality.md: the table and how it was made."""
    tasks = list(table.base.accuracy)
    pools = table.has_pools
    header = (
        "| variant | "
        + " | ".join(f"{t} % [95%]" for t in tasks)
        + " | normalised [95%] | "
        + ("normalised to own pool | " if pools else "")
        + "gain share | rank | vLLM = folded | parameters (chosen on validation) |"
    )
    rule = "|" + "---|" * (len(tasks) + 6 + pools)
    about_pools = (
        ' Rows "<pool>: …" merge (or show alone) the adapters of another pool of the same '
        'tasks; "normalised" divides by the DEFAULT adapters\' own accuracy (the reference, '
        'also for choosing their parameters), "normalised to own pool" by that pool\'s '
        "adapters' own accuracy."
        if pools
        else ""
    )
    lines = [
        BEGIN,
        f"Test split: seed {table.test.seed}, n = {table.test.n} per task; parameters chosen on "
        f"the validation split (seed {table.validation.seed}, n = {table.validation.n} per task) "
        "by normalised accuracy. Uniform preference over the pool. Accuracy is exact match of "
        "greedy answers; intervals are Wilson (per task) and a paired bootstrap (normalised). "
        "Rank: the merged adapter's (and the share of ‖ΔW‖² the worst module keeps where a "
        "truncation drops some). vLLM = folded: of the first test items of each task, how many "
        "greedy answers vLLM serving the variant's adapter gives exactly as the folded model."
        + about_pools,
        "",
        header,
        rule,
        _row(table.base, tasks, "—", pools),
        *(_row(row, tasks, "—", pools) for row in (*table.adapters, *table.pool_adapters)),
        *(_row(row, tasks, _chosen(row), pools) for row in table.merges),
        *(_row(row, tasks, _home_relative(row.variant.path), pools) for row in table.tuned),
        "",
        f"Best: **{table.best().variant.label}**, normalised {table.best().normalised:.2f}.",
        END,
    ]
    return "\n".join(lines)


def sweep_markdown(sweep: dict[str, list[SweepCell]], split: Split) -> str:
    """The generated pool-size block: per method and pool size, the mean best validation
    normalised accuracy over the subsets of that size and the winning parameters."""
    sizes = [cell.size for cell in next(iter(sweep.values()))]
    lines = [
        SWEEP_BEGIN,
        f"Validation split (seed {split.seed}, n = {split.n} per task). Each cell: the mean over "
        "every subset of that many adapters (uniform preference over the subset, accuracy over "
        "its tasks) of the best candidate's normalised accuracy; below it, the winning "
        "parameters and in how many subsets they won.",
        "",
        "| variant | " + " | ".join(f"N = {n}" for n in sizes) + " |",
        "|" + "---|" * (len(sizes) + 1),
    ]
    for label, cells in sweep.items():
        shown = []
        for cell in cells:
            wins = ", ".join(
                f"{params} ×{count}"
                for params, count in sorted(cell.winners.items(), key=lambda kv: -kv[1])
            )
            noun = "subset" if cell.subsets == 1 else "subsets"
            shown.append(f"**{cell.mean:.2f}** ({cell.subsets} {noun}: {wins})")
        lines.append(f"| {label} | " + " | ".join(shown) + " |")
    lines.append(SWEEP_END)
    return "\n".join(lines)


def write_markdown(table: Table, path: Path) -> None:
    """Replace the generated table block of `path` (or create the file with that block)."""
    write_block(markdown(table), BEGIN, END, path)


def write_block(block: str, begin: str, end: str, path: Path) -> None:
    """Replace the block between `begin` and `end` in `path` (appending it if absent)."""
    if path.is_file():
        text = path.read_text()
        pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.DOTALL)
        text = pattern.sub(lambda _: block, text) if pattern.search(text) else text + "\n" + block
    else:
        text = "# Merge quality\n\n" + block
    path.write_text(text.rstrip("\n") + "\n")


def write_plot(table: Table, path: Path) -> None:
    """Normalised accuracy per method: bars without Pico, with Pico and tuned, with 95% CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {row.variant.label: row for row in table.merges}
    methods = [label for label in rows if " + " not in label]
    series = [("without Pico", ""), ("with Pico", " + pico"), ("with SVC", " + svc")]
    figure, axis = plt.subplots(figsize=(max(8, 0.9 * len(methods)), 4.5))
    width = 0.27
    for offset, (name, suffix) in enumerate(series):
        xs, ys, errors = [], [], [[], []]
        for index, method in enumerate(methods):
            row = rows.get(method + suffix)
            if row is None:
                continue
            xs.append(index + (offset - 1) * width)
            ys.append(row.normalised)
            errors[0].append(row.normalised - row.normalised_interval[0])
            errors[1].append(row.normalised_interval[1] - row.normalised)
        axis.bar(xs, ys, width, yerr=errors, capsize=2, label=name)
    for index, row in enumerate(table.tuned):
        axis.axhline(row.normalised, linestyle="--", color=f"C{3 + index}", label=row.variant.label)
    axis.axhline(0.9, color="grey", linewidth=0.8, linestyle=":", label="goal 0.90")
    axis.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
    axis.set_ylabel("normalised accuracy (share of own adapter's)")
    axis.set_ylim(0, 1.1)
    axis.set_title(f"Merging the {len(table.adapters)} default adapters (uniform preference)")
    axis.legend(fontsize=8, loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _home_relative(path: str | None) -> str:
    """A tuned row's adapter folder, `~/…` under the home directory (no user names in docs)."""
    if not path:
        return ""
    folder, home = Path(path).expanduser(), Path.home()
    return f"~/{folder.relative_to(home)}" if folder.is_relative_to(home) else str(folder)
