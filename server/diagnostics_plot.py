"""`loramerge diagnose --plot DIR`: the Pico paper's §3 diagnostics of a pool as PNG figures.

overlap.png          mean subspace overlap of the adapters' B column spaces and A row spaces
                     (pairwise, averaged over modules): Pico's "crowded in B-space" finding is
                     B overlap ≫ A overlap.
effective_rank.png   effective rank of each adapter's B and A per layer.
shared_energy.png    share of the joint B energy in the leading components of [B_1 | … | B_n],
                     per module type: the directions that TA's sum amplifies.
"""

from __future__ import annotations

from pathlib import Path

from loramerge.merge_engine import PoolDiagnostics


def _mean_matrix(rows: list[tuple[tuple[float, ...], ...]]) -> list[list[float]]:
    n = len(rows[0])
    return [[sum(m[i][j] for m in rows) / len(rows) for j in range(n)] for i in range(n)]


def write_plots(diagnostics: PoolDiagnostics, directory: Path) -> list[Path]:
    """Draw the three figures into `directory` (created). → the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    names = list(diagnostics.adapters)
    modules = diagnostics.modules
    written = []

    figure, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for axis, side in zip(axes, ("b", "a"), strict=True):
        matrix = _mean_matrix([getattr(m, f"overlap_{side}") for m in modules])
        image = axis.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                axis.text(j, i, f"{value:.2f}", ha="center", va="center", color="w", fontsize=8)
        axis.set_xticks(range(len(names)), names, rotation=30)
        axis.set_yticks(range(len(names)), names)
        axis.set_title(f"{side.upper()} subspace overlap (mean over {len(modules)} modules)")
    figure.colorbar(image, ax=axes.tolist(), shrink=0.8)
    written.append(directory / "overlap.png")
    figure.savefig(written[-1], dpi=110)
    plt.close(figure)

    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for axis, side in zip(axes, ("b", "a"), strict=True):
        for index, name in enumerate(names):
            values = [getattr(m, f"effective_rank_{side}")[index] for m in modules]
            axis.plot(values, marker=".", linewidth=0.8, label=name)
        axis.set_title(f"effective rank of {side.upper()} per module")
        axis.set_xlabel("module (layer order; q and v interleaved)")
    axes[0].legend(fontsize=8)
    written.append(directory / "effective_rank.png")
    figure.savefig(written[-1], dpi=110)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(6, 4))
    kinds = diagnostics.by_module_type
    width = 0.8 / max(1, len(kinds))
    for offset, (kind, summary) in enumerate(kinds.items()):
        xs = [k + offset * width for k in range(len(summary.mean_shared_energy))]
        axis.bar(xs, summary.mean_shared_energy, width, label=kind)
    axis.set_xlabel("leading component k of the joint B SVD")
    axis.set_ylabel("share of the joint B energy c_k")
    axis.set_title("energy concentrated in shared B directions")
    axis.legend()
    written.append(directory / "shared_energy.png")
    figure.savefig(written[-1], dpi=110)
    plt.close(figure)
    return written
