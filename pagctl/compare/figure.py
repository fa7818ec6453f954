"""The figure: robust accuracy vs ε, and alignment vs robust accuracy (:func:`plot`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pagctl.compare.model import Cell, Column, Comparison
from pagctl.stats import error_bars, pearson


def scatter_columns(comparison: Comparison) -> tuple[Column | None, Column | None]:
    """The (alignment, robust accuracy) columns of the scatter panel.

    Alignment: the column with values in most runs; at equal counts ``align`` records
    before the training monitor, then by name. Robust: the column with values in most runs;
    ties go to the column whose values spread most across the runs (a budget at which every
    run scores 0 or 1 says nothing), then to the largest ε, then by name.
    """
    def count(column: Column) -> int:
        return sum(column.id in r.cells for r in comparison.rows)

    def spread(column: Column) -> float:
        values = [r.cells[column.id].value for r in comparison.rows if column.id in r.cells]
        return max(values) - min(values) if values else 0.0

    aligns = [c for c in comparison.columns if c.kind in ("align", "align_monitor")]
    robust = [c for c in comparison.columns if c.kind == "robust"]
    x = min(aligns, key=lambda c: (-count(c), c.kind == "align_monitor", c.id), default=None)
    y = min(robust, key=lambda c: (-count(c), -round(spread(c), 9), -(c.eps or 0.0), c.id),
            default=None)
    return x, y


def plot(comparison: Comparison, path: Path) -> None:
    """Two panels: robust accuracy vs ε (a line per run and (attack, norm): one colour per
    run, one line style per (attack, norm); 95% Wilson intervals as error bars), and
    alignment vs robust accuracy (a point per run, the columns of :func:`scatter_columns`)
    with Pearson's r in the title. A panel without enough data says so instead."""
    from pagctl.figures import pyplot, save_png

    plt = pyplot("--plot")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    try:
        _curve_panel(left, comparison)
        _scatter_panel(right, comparison)
        fig.tight_layout()
        save_png(fig, Path(path))
    finally:
        plt.close(fig)


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=9,
            transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _curve_panel(ax: Any, comparison: Comparison) -> None:
    curves: dict[tuple[str, str, str | None], list[tuple[float, Cell]]] = {}
    for row in comparison.rows:
        for column in comparison.columns:
            cell = row.cells.get(column.id)
            if column.kind == "robust" and cell is not None and column.eps is not None:
                key = (row.label, column.attack or "?", column.norm)
                curves.setdefault(key, []).append((column.eps, cell))
    if not curves:
        _empty(ax, "robust accuracy vs ε: no attack records with an ε in these runs")
        return
    runs = dict.fromkeys(k[0] for k in curves)
    colours = {label: f"C{i % 10}" for i, label in enumerate(runs)}
    styles = {key: ("-", "--", ":", "-.")[i % 4]
              for i, key in enumerate(sorted({(k[1], k[2] or "") for k in curves}))}
    for (label, attack, norm), points in curves.items():
        points.sort(key=lambda p: p[0])
        eps = [e for e, _ in points]
        acc = [c.value for _, c in points]
        yerr = error_bars(acc, [c.interval for _, c in points])
        ax.errorbar(eps, acc, yerr=yerr, marker="o", capsize=3, color=colours[label],
                    linestyle=styles[(attack, norm or "")],
                    label=f"{label}: {attack}" + (f" {norm}" if norm else ""))
    norms = sorted({norm or "?" for _, _, norm in curves})
    ax.set_xlabel(f"ε ({', '.join(norms)})")
    ax.set_ylabel("robust accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title("robust accuracy vs ε (95% intervals)", fontsize=10)
    if len(curves) <= 12:
        ax.legend(fontsize=7)
    else:
        ax.text(0.98, 0.98, f"{len(curves)} curves (legend omitted)", ha="right", va="top",
                fontsize=7, transform=ax.transAxes)


def _scatter_panel(ax: Any, comparison: Comparison) -> None:
    x_col, y_col = scatter_columns(comparison)
    if x_col is None or y_col is None:
        missing = "alignment" if x_col is None else "robust accuracy"
        _empty(ax, f"alignment vs robust accuracy: no run has {missing} records")
        return
    points = [(r.label, r.cells[x_col.id], r.cells[y_col.id]) for r in comparison.rows
              if x_col.id in r.cells and y_col.id in r.cells]
    if not points:
        _empty(ax, f"alignment vs robust accuracy: no run has both '{x_col.id}' and "
               f"'{y_col.id}'")
        return
    for label, cx, cy in points:
        xerr = None if cx.interval is None else error_bars([cx.value], [cx.interval])
        yerr = None if cy.interval is None else error_bars([cy.value], [cy.interval])
        ax.errorbar([cx.value], [cy.value], xerr=xerr, yerr=yerr, marker="o", capsize=3,
                    color="C0")
        if len(points) <= 20:
            ax.annotate(label, (cx.value, cy.value), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
    r = pearson([cx.value for _, cx, _ in points], [cy.value for _, _, cy in points])
    k = len(points)
    runs = f"{k} run" + ("s" if k != 1 else "")
    if r is not None:
        title = f"alignment vs robustness: Pearson r = {r:.2f} ({runs})"
    elif k < 3:
        title = f"alignment vs robustness: {runs}, too few for a correlation"
    else:
        title = f"alignment vs robustness: no variation, no correlation ({runs})"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(x_col.id)
    ax.set_ylabel(y_col.id)
    ax.grid(alpha=0.3)
