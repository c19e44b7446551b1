"""The quality table as Markdown (spliced into docs/quality.md) and as a bar chart (PNG)."""

from __future__ import annotations

import re
from pathlib import Path

from .quality import Row, Table

BEGIN, END = "<!-- quality-table:begin -->", "<!-- quality-table:end -->"


def _percent(value: float) -> str:
    return f"{100 * value:.0f}"


def _row(row: Row, tasks: list[str], how: str) -> str:
    cells = [row.variant.label]
    for task in tasks:
        low, high = row.interval[task]
        cells.append(f"{_percent(row.accuracy[task])} [{_percent(low)}–{_percent(high)}]")
    low, high = row.normalised_interval
    cells.append(f"**{row.normalised:.2f}** [{low:.2f}–{high:.2f}]")
    cells.append(f"{row.gain_share:.2f}")
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
    header = (
        "| variant | "
        + " | ".join(f"{t} % [95%]" for t in tasks)
        + " | normalised [95%] | gain share | parameters (chosen on validation) |"
    )
    rule = "|" + "---|" * (len(tasks) + 4)
    lines = [
        BEGIN,
        f"Test split: seed {table.test.seed}, n = {table.test.n} per task; parameters chosen on "
        f"the validation split (seed {table.validation.seed}, n = {table.validation.n} per task) "
        "by normalised accuracy. Uniform preference over the pool. Accuracy is exact match of "
        "greedy answers; intervals are Wilson (per task) and a paired bootstrap (normalised).",
        "",
        header,
        rule,
        _row(table.base, tasks, "—"),
        *(_row(row, tasks, "—") for row in table.adapters),
        *(_row(row, tasks, _chosen(row)) for row in table.merges),
        *(_row(row, tasks, row.variant.path or "") for row in table.tuned),
        "",
        f"Best: **{table.best().variant.label}**, normalised {table.best().normalised:.2f}.",
        END,
    ]
    return "\n".join(lines)


def write_markdown(table: Table, path: Path) -> None:
    """Replace the generated block of `path` (or create the file with only that block)."""
    block = markdown(table)
    if path.is_file():
        text = path.read_text()
        pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.DOTALL)
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
