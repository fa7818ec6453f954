"""The figure: robust accuracy vs ε, and alignment vs robust accuracy (:func:`plot`); with a
swept spec field (``against``, e.g. a grid's ``train.pag_weight``), robust accuracy and
alignment against that field too."""

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


def plot(comparison: Comparison, path: Path, against: str | None = None) -> None:
    """Two panels: robust accuracy vs ε (a line per run and (attack, norm): one colour per
    run, one line style per (attack, norm); 95% Wilson intervals as error bars), and
    alignment vs robust accuracy (a point per run, the columns of :func:`scatter_columns`)
    with Pearson's r in the title. With ``against`` (a spec field, checked by
    :func:`check_against`) two more below: robust accuracy and alignment against that
    field, a line per combination of the other differing fields. A panel without enough data
    says so instead."""
    from pagctl.figures import pyplot, save_png

    plt = pyplot("--plot")
    rows = 1 if against is None else 2
    fig, axes = plt.subplots(rows, 2, figsize=(11, 4.5 * rows), squeeze=False)
    try:
        _curve_panel(axes[0][0], comparison)
        _scatter_panel(axes[0][1], comparison)
        if against is not None:
            x_col, y_col = scatter_columns(comparison)
            _against_panel(axes[1][0], comparison, against, y_col, "robust accuracy")
            _against_panel(axes[1][1], comparison, against, x_col, "alignment")
        fig.tight_layout()
        save_png(fig, Path(path))
    finally:
        plt.close(fig)


def check_against(comparison: Comparison, key: str) -> None:
    """SpecError unless ``key`` is a spec field that differs across the runs and is a number
    in every one of them (what ``--against`` can put on an axis)."""
    from pagctl.errors import SpecError

    def numeric(field: str) -> bool:
        return all(isinstance(r.spec.get(field), (int, float))
                   and not isinstance(r.spec.get(field), bool) for r in comparison.rows)

    usable = ", ".join(f for f in comparison.spec_columns if numeric(f)) or "none"
    if key not in comparison.spec_columns:
        raise SpecError(f"--against: '{key}' is not a spec field that differs across these "
                        f"runs (numeric ones that do: {usable})")
    if not numeric(key):
        bad = [r.label for r in comparison.rows if isinstance(r.spec.get(key), bool)
               or not isinstance(r.spec.get(key), (int, float))]
        raise SpecError(f"--against: '{key}' is not a number in {', '.join(bad[:3])}; give a "
                        f"numeric field (here: {usable})")


def _against_panel(ax: Any, comparison: Comparison, key: str, column: Column | None,
                   what: str) -> None:
    """``what`` (the column's values, 95% intervals) against the spec field ``key``: one
    line per combination of the other differing spec fields."""
    from pagctl.compare.spec_columns import spec_cell, spec_header

    if column is None:
        _empty(ax, f"{what} vs {key}: no run has {what} records")
        return
    others = [k for k in comparison.spec_columns if k != key]
    lines: dict[str, list[tuple[float, Cell]]] = {}
    for row in comparison.rows:
        cell = row.cells.get(column.id)
        if cell is None:
            continue
        label = ", ".join(f"{spec_header(k)}={spec_cell(row.spec, k)}" for k in others)
        lines.setdefault(label, []).append((float(row.spec[key]), cell))
    if not lines:
        _empty(ax, f"{what} vs {key}: no run has '{column.id}'")
        return
    for i, (label, points) in enumerate(sorted(lines.items())):
        points.sort(key=lambda p: p[0])
        values = [c.value for _, c in points]
        intervals = [c.interval for _, c in points]
        yerr = error_bars(values, intervals)
        ax.errorbar([x for x, _ in points], values, yerr=yerr, marker="o", capsize=3,
                    color=f"C{i % 10}", label=label or None)
    ax.set_xlabel(f"{spec_header(key)} ({key})" if spec_header(key) != key else key)
    ax.set_ylabel(column.id)
    ax.grid(alpha=0.3)
    ax.set_title(f"{what} vs {spec_header(key)} (95% intervals)", fontsize=10)
    if 1 < len(lines) <= 12:
        ax.legend(fontsize=7)


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
