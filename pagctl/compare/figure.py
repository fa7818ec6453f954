"""The figure: robust accuracy vs ε, and alignment vs robust accuracy (:func:`draw`,
:func:`plot`); with a swept spec field (``against``, e.g. a grid's ``train.pag_weight``),
robust accuracy and alignment against that field too.

One colour per run in every panel and one marker per attack, each told in its own legend
beside the panels. At a single ε the first panel is robust accuracy by run at that ε, not a
line of one point; accuracies are drawn on all of [0, 1], except in the scatter, whose axes
hug the points with margins (at least 0.1 wide) so that close runs can be told apart."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pagctl.compare.model import Cell, Column, Comparison
from pagctl.stats import error_bars, pearson

_LEGEND_RUNS = 24
"""At most this many runs get a colour legend (more would hide the panels)."""
_LABELLED_POINTS = 20
"""At most this many scatter points are labelled with their run."""
_LABEL_CHARS = 28
"""Run names longer than this are shortened in the panels (the legend has them whole)."""

CurveKey = tuple[str, str, str | None]
"""(run label, attack, norm): one line of the robust accuracy vs ε panel."""


def scatter_columns(comparison: Comparison, robust: str | None = None
                    ) -> tuple[Column | None, Column | None]:
    """The (alignment, robust accuracy) columns of the scatter panel.

    Alignment: the column with values in most runs; at equal counts ``align`` records
    before the training monitor, then by name. Robust: the column named ``robust`` (a robust
    column's id, checked by :func:`check_robust_column`); by default the column with values
    in most runs, ties to the column whose values spread most across the runs (a budget at
    which every run scores 0 or 1 says nothing), then to the largest ε, then by name.
    """
    def count(column: Column) -> int:
        return sum(column.id in r.cells for r in comparison.rows)

    def spread(column: Column) -> float:
        values = [r.cells[column.id].value for r in comparison.rows if column.id in r.cells]
        return max(values) - min(values) if values else 0.0

    aligns = [c for c in comparison.columns if c.kind in ("align", "align_monitor")]
    robusts = [c for c in comparison.columns if c.kind == "robust"]
    x = min(aligns, key=lambda c: (-count(c), c.kind == "align_monitor", c.id), default=None)
    if robust is not None:
        check_robust_column(comparison, robust)
        return x, next(c for c in robusts if c.id == robust)
    y = min(robusts, key=lambda c: (-count(c), -round(spread(c), 9), -(c.eps or 0.0), c.id),
            default=None)
    return x, y


def check_robust_column(comparison: Comparison, name: str) -> None:
    """SpecError unless ``name`` is the id of a robust accuracy column of ``comparison``
    (what ``--robust-column`` can put on the scatter's y axis)."""
    from pagctl.errors import SpecError

    robusts = [c.id for c in comparison.columns if c.kind == "robust"]
    if name not in robusts:
        have = ", ".join(f"'{c}'" for c in robusts) or "none (no attack records)"
        raise SpecError(f"--robust-column: '{name}' is not a robust accuracy column of these "
                        f"runs; give one of: {have}")


@dataclass(frozen=True)
class Scatter:
    """What the alignment vs robustness panel draws: its columns and a point per run that
    has both (run label, alignment cell, robust cell)."""

    x: Column | None
    y: Column | None
    points: list[tuple[str, Cell, Cell]]


def scatter_points(comparison: Comparison, robust: str | None = None) -> Scatter:
    """The scatter panel's data: the columns of :func:`scatter_columns` and the runs'
    values in both."""
    x, y = scatter_columns(comparison, robust)
    if x is None or y is None:
        return Scatter(x, y, [])
    return Scatter(x, y, [(r.label, r.cells[x.id], r.cells[y.id]) for r in comparison.rows
                          if x.id in r.cells and y.id in r.cells])


def curves(comparison: Comparison) -> dict[CurveKey, list[tuple[float, Cell]]]:
    """The robust accuracy vs ε panel's data: per (run, attack, norm), its (ε, cell) points
    in increasing ε (robust columns with an ε only)."""
    out: dict[CurveKey, list[tuple[float, Cell]]] = {}
    for row in comparison.rows:
        for column in comparison.columns:
            cell = row.cells.get(column.id)
            if column.kind == "robust" and cell is not None and column.eps is not None:
                key = (row.label, column.attack or "?", column.norm)
                out.setdefault(key, []).append((column.eps, cell))
    for points in out.values():
        points.sort(key=lambda p: p[0])
    return out


@dataclass(frozen=True)
class Styles:
    """One colour per run (in the rows' order) and one marker per attack (by name)."""

    colours: dict[str, str]
    markers: dict[str, str]

    @classmethod
    def of(cls, comparison: Comparison) -> Styles:
        from pagctl.figures import MARKERS, distinct_colours

        labels = [r.label for r in comparison.rows]
        attacks = sorted({c.attack or "?" for c in comparison.columns if c.kind == "robust"})
        return cls(dict(zip(labels, distinct_colours(len(labels)), strict=True)),
                   {a: MARKERS[i % len(MARKERS)] for i, a in enumerate(attacks)})


def draw(comparison: Comparison, *, against: str | None = None,
         robust: str | None = None) -> Any:
    """The figure (a matplotlib Figure; the caller closes it). Two panels: robust accuracy vs
    ε (a line per run and (attack, norm); at a single ε, a point per run and attack at that
    ε instead), and alignment vs robust accuracy (a point per run, the columns of
    :func:`scatter_columns`, ``robust`` choosing the robust one) with Pearson's r in the
    title; 95% intervals as error bars. With ``against`` (a spec field, checked by
    :func:`check_against`) two more below: robust accuracy and alignment against that
    field, a line per combination of the other differing fields. A panel without enough
    data says so instead. Laid out so that no text leaves the canvas."""
    from pagctl.figures import pyplot

    plt = pyplot("--plot")
    rows = 1 if against is None else 2
    fig, axes = plt.subplots(rows, 2, figsize=(11, 4.5 * rows), squeeze=False,
                             layout="constrained")
    try:
        styles = Styles.of(comparison)
        drawn = _curve_panel(axes[0][0], comparison, styles)
        scatter = scatter_points(comparison, robust)
        _scatter_panel(axes[0][1], scatter, styles)
        _legends(fig, styles, drawn | {s[0] for s in scatter.points}, comparison)
        if against is not None:
            _against_panel(axes[1][0], comparison, against, scatter.y, "robust accuracy",
                           styles)
            _against_panel(axes[1][1], comparison, against, scatter.x, "alignment", styles)
    except BaseException:
        plt.close(fig)
        raise
    return fig


def plot(comparison: Comparison, path: Path, against: str | None = None, *,
         robust: str | None = None, dpi: int | None = None) -> None:
    """Write :func:`draw`'s figure to ``path``: PNG, PDF or SVG by its suffix, at ``dpi``
    (default `pagctl.figures.DEFAULT_DPI`; a PDF or SVG is vector and uses it only for
    raster parts)."""
    from pagctl.figures import DEFAULT_DPI, figure_format, pyplot, save_figure

    figure_format("--plot", Path(path))
    fig = draw(comparison, against=against, robust=robust)
    try:
        save_figure(fig, Path(path), dpi=DEFAULT_DPI if dpi is None else dpi)
    finally:
        pyplot("--plot").close(fig)


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
                   what: str, styles: Styles) -> None:
    """``what`` (the column's values, 95% intervals) against the spec field ``key``: one
    grey line per combination of the other differing spec fields (a line style each), its
    points in their runs' colours."""
    from pagctl.compare.spec_columns import spec_cell, spec_header

    if column is None:
        _empty(ax, f"{what} vs {key}: no run has {what} records")
        return
    others = [k for k in comparison.spec_columns if k != key]
    lines: dict[str, list[tuple[float, str, Cell]]] = {}
    for row in comparison.rows:
        cell = row.cells.get(column.id)
        if cell is None:
            continue
        label = ", ".join(f"{spec_header(k)}={spec_cell(row.spec, k)}" for k in others)
        lines.setdefault(label, []).append((float(row.spec[key]), row.label, cell))
    if not lines:
        _empty(ax, f"{what} vs {key}: no run has '{column.id}'")
        return
    marker = styles.markers.get(column.attack or "?", "o") if column.kind == "robust" else "o"
    for i, (label, points) in enumerate(sorted(lines.items())):
        points.sort(key=lambda p: p[0])
        ax.plot([x for x, _, _ in points], [c.value for _, _, c in points], color="0.45",
                linestyle=("-", "--", ":", "-.")[i % 4], label=label or None, zorder=1)
        for x, run, cell in points:
            ax.errorbar([x], [cell.value], yerr=error_bars([cell.value], [cell.interval]),
                        marker=marker, capsize=3, color=styles.colours[run], zorder=2)
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


def _legends(fig: Any, styles: Styles, runs: set[str], comparison: Comparison) -> None:
    """Beside the panels: the colour of each run drawn, and the marker of each attack."""
    from matplotlib.lines import Line2D

    shown = [r.label for r in comparison.rows if r.label in runs]
    if 0 < len(shown) <= _LEGEND_RUNS:
        handles = [Line2D([], [], color=styles.colours[label], marker="o", linestyle="-")
                   for label in shown]
        fig.legend(handles, shown, title="run (colour)", loc="outside right upper",
                   fontsize=7, title_fontsize=8)
    if styles.markers:
        handles = [Line2D([], [], color="0.3", marker=m, linestyle="none")
                   for m in styles.markers.values()]
        fig.legend(handles, list(styles.markers), title="attack (marker)",
                   loc="outside right lower", fontsize=7, title_fontsize=8)


def _curve_panel(ax: Any, comparison: Comparison, styles: Styles) -> set[str]:
    """Robust accuracy vs ε, or by run at a single ε; returns the runs drawn."""
    from pagctl.figures import ACCURACY_RANGE

    lines = curves(comparison)
    if not lines:
        _empty(ax, "robust accuracy vs ε: no attack records with an ε in these runs")
        return set()
    budgets = {(norm, eps) for (_, _, norm), points in lines.items() for eps, _ in points}
    if len({eps for _, eps in budgets}) == 1:
        _single_eps_panel(ax, comparison, lines, styles)
    else:
        dashes = {n: ("-", "--", ":", "-.")[i % 4]
                  for i, n in enumerate(sorted({k[2] or "" for k in lines}))}
        for (label, attack, norm), points in lines.items():
            acc = [c.value for _, c in points]
            ax.errorbar([e for e, _ in points], acc,
                        yerr=error_bars(acc, [c.interval for _, c in points]),
                        marker=styles.markers[attack], capsize=3, color=styles.colours[label],
                        linestyle=dashes[norm or ""], label=_curve_label(label, attack, norm))
        norms = sorted({norm or "?" for _, _, norm in lines})
        ax.set_xlabel(f"ε ({', '.join(norms)}" + ("; a line style per norm)"
                                                  if len(norms) > 1 else ")"))
        ax.set_title("robust accuracy vs ε\n(95% intervals)", fontsize=10)
    ax.set_ylabel("robust accuracy")
    ax.set_ylim(*ACCURACY_RANGE)
    ax.grid(alpha=0.3)
    return {label for label, _, _ in lines}


def short_label(label: str, chars: int = _LABEL_CHARS) -> str:
    """``label`` as written in a panel: whole up to ``chars`` characters, else its start and
    its end around an ellipsis (the end is kept, where the runs of a grid differ)."""
    if len(label) <= chars:
        return label
    head = (chars - 1) // 2
    return f"{label[:head]}…{label[-(chars - 1 - head):]}"


def _curve_label(run: str, attack: str, norm: str | None) -> str:
    return f"{run}: {attack}" + (f" {norm}" if norm else "")


def _single_eps_panel(ax: Any, comparison: Comparison,
                      lines: dict[CurveKey, list[tuple[float, Cell]]], styles: Styles) -> None:
    """Every robust number at one ε: a column of points per run (one per attack, side by
    side), the run on the x axis and the ε in the title."""
    runs = [r.label for r in comparison.rows if any(k[0] == r.label for k in lines)]
    attacks = sorted({(k[1], k[2] or "") for k in lines})
    width = 0.6 / max(len(attacks), 1)
    for (label, attack, norm), points in lines.items():
        offset = (attacks.index((attack, norm or "")) - (len(attacks) - 1) / 2) * width
        for _, cell in points:
            ax.errorbar([runs.index(label) + offset], [cell.value],
                        yerr=error_bars([cell.value], [cell.interval]),
                        marker=styles.markers[attack], capsize=3, linestyle="none",
                        color=styles.colours[label], label=_curve_label(label, attack, norm))
    eps = next(e for points in lines.values() for e, _ in points)
    norms = sorted({k[2] or "?" for k in lines})
    names = [short_label(r) for r in runs]
    slanted = sum(len(n) for n in names) > 60
    ax.set_xticks(range(len(runs)), names, fontsize=7, rotation=30 if slanted else 0,
                  ha="right" if slanted else "center", rotation_mode="anchor")
    ax.set_xlim(-0.6, len(runs) - 0.4)
    ax.set_xlabel("run")
    ax.set_title(f"robust accuracy at ε = {eps:.4g} ({', '.join(norms)})\n(95% intervals)",
                 fontsize=10)


def _scatter_panel(ax: Any, scatter: Scatter, styles: Styles) -> None:
    from pagctl.figures import padded_range

    x_col, y_col, points = scatter.x, scatter.y, scatter.points
    if x_col is None or y_col is None:
        missing = "alignment" if x_col is None else "robust accuracy"
        _empty(ax, f"alignment vs robust accuracy: no run has {missing} records")
        return
    if not points:
        _empty(ax, f"alignment vs robust accuracy: no run has both '{x_col.id}' and "
               f"'{y_col.id}'")
        return
    marker = styles.markers.get(y_col.attack or "?", "o")
    for label, cx, cy in points:
        xerr = None if cx.interval is None else error_bars([cx.value], [cx.interval])
        yerr = None if cy.interval is None else error_bars([cy.value], [cy.interval])
        ax.errorbar([cx.value], [cy.value], xerr=xerr, yerr=yerr, marker=marker, capsize=3,
                    color=styles.colours[label], label=label)
    xs = [v for _, cx, _ in points for v in (cx.value, *(cx.interval or ()))]
    ys = [v for _, _, cy in points for v in (cy.value, *(cy.interval or ()))]
    ax.set_xlim(*padded_range(min(xs), max(xs), min_span=0.1, bounds=(-1.0, 1.0)))
    ax.set_ylim(*padded_range(min(ys), max(ys), min_span=0.1, bounds=(0.0, 1.0)))
    if len(points) <= _LABELLED_POINTS:
        left, right = ax.get_xlim()
        for label, cx, cy in points:
            inward = cx.value > (left + right) / 2  # write toward the middle: never cut off
            ax.annotate(short_label(label), (cx.value, cy.value), fontsize=7,
                        xytext=(-5 if inward else 5, 5), textcoords="offset points",
                        ha="right" if inward else "left", va="bottom")
    r = pearson([cx.value for _, cx, _ in points], [cy.value for _, _, cy in points])
    k = len(points)
    runs = f"{k} run" + ("s" if k != 1 else "")
    if r is not None:
        title = f"alignment vs robustness\nPearson r = {r:.2f} ({runs})"
    elif k < 3:
        title = f"alignment vs robustness\n{runs}, too few for a correlation"
    else:
        title = f"alignment vs robustness\nno variation, no correlation ({runs})"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(x_col.id)
    ax.set_ylabel(y_col.id)
    ax.grid(alpha=0.3)
