"""Rendering: the text table, markdown, csv and json (:func:`render`)."""

from __future__ import annotations

import csv
import io
import json
import shutil
from typing import Any

from pagctl.compare.model import Cell, Column, Comparison, Pair
from pagctl.compare.spec_columns import spec_cell, spec_header, spec_value
from pagctl.errors import SpecError

_TABLE_SPEC_COLUMNS = 6
"""The table shows at most this many differing spec fields (all in json/csv/markdown)."""
_TABLE_PAIRS = 40
"""The table lists at most this many pairs (all in json/csv/markdown)."""


def _cell_text(cell: Cell | None, *, two_lines: bool = False) -> str:
    if cell is None:
        return "-"
    mark = " !" if cell.reliable is False else ""
    n = f"n={cell.n}" if cell.n is not None else ""
    if cell.interval is None:
        return f"{cell.value:.3f}{mark} {n}".strip()
    lo, hi = cell.interval
    if two_lines:
        return f"{cell.value:.3f}{mark} {n}".rstrip() + f"\n[{lo:.3f}, {hi:.3f}]"
    return f"{cell.value:.3f}{mark} [{lo:.3f}, {hi:.3f}] {n}".rstrip()


def _header(column: Column) -> str:
    return column.id + (" ≠" if column.mismatch else "")


def _notes(comparison: Comparison, hidden_spec: list[str]) -> list[str]:
    notes = []
    if comparison.weights == "best":
        notes.append("weights: best (model-best.safetensors, by validation robust accuracy); "
                     "training-monitor numbers are left out, they measured the last weights")
    if hidden_spec:
        notes.append(f"also differing: {', '.join(hidden_spec)} (see --format json)")
    if any(c.reliable is False for r in comparison.rows for c in r.cells.values()):
        notes.append("! the attack's reliability checks failed; see its 'reliability' record")
    notes += [f"≠ not comparable: {m}" for m in comparison.mismatches]
    if not comparison.columns:
        notes.append("no evaluated metrics in these runs yet")
    return notes


def _pair_cells(p: Pair) -> list[str]:
    return [p.column, p.run_a, p.run_b, str(p.n), str(p.a_only), str(p.b_only), str(p.both),
            str(p.neither), f"{p.p_value:.3g}"]


_PAIR_HEADERS = ["column", "A", "B", "n", "A only", "B only", "both", "neither", "McNemar p"]


def render_text_table(comparison: Comparison, width: int | None = None) -> str:
    """The comparison as rich tables (plain text, no colour) ``width`` characters wide
    (default: the terminal's, else 100)."""
    from rich.console import Console
    from rich.table import Table

    width = width or shutil.get_terminal_size((100, 24)).columns
    rows, columns = comparison.rows, comparison.columns
    shown_spec = comparison.spec_columns[:_TABLE_SPEC_COLUMNS]
    spec_cells = [[spec_cell(r.spec, k) for k in shown_spec] for r in rows]
    one_line = [[_cell_text(r.cells.get(c.id)) for c in columns] for r in rows]
    widths = [max([len(r.label) for r in rows] + [3])]
    widths += [max(len(spec_header(k)), *(len(s[i]) for s in spec_cells))
               for i, k in enumerate(shown_spec)]
    widths += [max(min(len(_header(c)), 16), *(len(o[i]) for o in one_line))
               for i, c in enumerate(columns)]
    two_lines = sum(widths) + 3 * len(widths) + 1 > width

    table = Table(title="pagctl compare")
    table.add_column("run", no_wrap=True)
    for key in shown_spec:
        table.add_column(spec_header(key), overflow="fold")
    for column in columns:
        table.add_column(_header(column), justify="right")
    for row, spec_row in zip(rows, spec_cells, strict=True):
        table.add_row(row.label, *spec_row,
                      *(_cell_text(row.cells.get(c.id), two_lines=two_lines) for c in columns))
    console = Console(file=io.StringIO(), width=width, color_system=None, highlight=False,
                      markup=False, emoji=False)
    console.print(table)
    if comparison.pairs:
        pairs = Table(title="per-example robust results (points defended)")
        for i, head in enumerate(_PAIR_HEADERS):
            pairs.add_column(head, justify="left" if i < 3 else "right",
                             overflow="fold" if i < 3 else "ellipsis")
        for pair in comparison.pairs[:_TABLE_PAIRS]:
            pairs.add_row(*_pair_cells(pair))
        console.print(pairs)
        if len(comparison.pairs) > _TABLE_PAIRS:
            console.print(f"{len(comparison.pairs) - _TABLE_PAIRS} more pairs: see "
                          "--format json, csv or markdown")
    for note in _notes(comparison, comparison.spec_columns[_TABLE_SPEC_COLUMNS:]):
        console.print(note, soft_wrap=True)
    text: str = console.file.getvalue()  # type: ignore[attr-defined]
    return text


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(comparison: Comparison) -> str:
    heads = ["run", *(spec_header(k) for k in comparison.spec_columns),
             *(_header(c) for c in comparison.columns)]
    aligns = ["---"] * (1 + len(comparison.spec_columns)) + ["---:"] * len(comparison.columns)
    lines = ["| " + " | ".join(_md(h) for h in heads) + " |", "|" + "|".join(aligns) + "|"]
    for row in comparison.rows:
        cells = [row.label, *(spec_cell(row.spec, k)
                              for k in comparison.spec_columns),
                 *(_cell_text(row.cells.get(c.id)) for c in comparison.columns)]
        lines.append("| " + " | ".join(_md(c) for c in cells) + " |")
    if comparison.pairs:
        lines += ["", "Per-example robust results (points defended; McNemar exact test):", "",
                  "| " + " | ".join(_PAIR_HEADERS) + " |",
                  "|" + "|".join(["---"] * 3 + ["---:"] * 6) + "|"]
        lines += ["| " + " | ".join(_md(c) for c in _pair_cells(p)) + " |"
                  for p in comparison.pairs]
    notes = _notes(comparison, [])
    if notes:
        lines += [""] + [f"- {_md(n)}" for n in notes]
    return "\n".join(lines) + "\n"


def to_json(comparison: Comparison) -> dict[str, Any]:
    runs = [{"run": r.label, "name": r.name, "run_dir": str(r.run_dir),
             "epochs": r.epochs_trained,
             "spec": {k: spec_value(r.spec, k) for k in comparison.spec_columns},
             "metrics": {c.id: r.cells[c.id].to_json() if c.id in r.cells else None
                         for c in comparison.columns}} for r in comparison.rows]
    columns = [{"id": k, "kind": "spec", "label": spec_header(k)}
               for k in comparison.spec_columns] + [c.to_json() for c in comparison.columns]
    return {"runs": runs, "columns": columns,
            "pairs": [p.to_json() for p in comparison.pairs],
            "mismatches": comparison.mismatches, "warnings": comparison.warnings,
            "weights": comparison.weights}


def _num(value: float | None) -> str:
    return "" if value is None else repr(value)


def render_csv(comparison: Comparison) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    header = ["run", "name", "run_dir", "epochs_trained", *comparison.spec_columns]
    for c in comparison.columns:
        header += [c.id, f"{c.id} lo", f"{c.id} hi", f"{c.id} n", f"{c.id} subset"]
    writer.writerow([*header, "mismatch"])
    for row in comparison.rows:
        values: list[str] = [row.label, row.name, str(row.run_dir),
                             "" if row.epochs_trained is None else str(row.epochs_trained)]
        values += [spec_cell(row.spec, k) if spec_value(row.spec, k) is not None
                   or k in row.spec else "" for k in comparison.spec_columns]
        flags = []
        for c in comparison.columns:
            cell = row.cells.get(c.id)
            if cell is None:
                values += [""] * 5
                continue
            lo, hi = cell.interval or (None, None)
            values += [_num(cell.value), _num(lo), _num(hi),
                       "" if cell.n is None else str(cell.n), cell.subset_sha or ""]
            if c.mismatch:
                flags.append(c.id)
        if any(m.startswith("the runs share no robust") for m in comparison.mismatches) and \
                any(c.kind == "robust" and c.id in row.cells for c in comparison.columns):
            flags.append("different ε or norms")
        writer.writerow([*values, "; ".join(flags)])
    if comparison.pairs:
        out.write("\n")
        writer.writerow(["column", "run_a", "run_b", "n", "a_only", "b_only", "both",
                         "neither", "p_value"])
        for p in comparison.pairs:
            writer.writerow([p.column, p.run_a, p.run_b, p.n, p.a_only, p.b_only, p.both,
                             p.neither, repr(p.p_value)])
    return out.getvalue()


FORMATS = ("table", "json", "csv", "markdown")


def render(comparison: Comparison, fmt: str, *, width: int | None = None) -> str:
    """The comparison as text: ``table`` (rich, plain text ``width`` wide, default the
    terminal's), ``json`` (the ``to_json`` object alone; ``pagctl compare --format json``
    prints that object as the one record of the CLI's JSON envelope instead), ``csv`` or
    ``markdown``. Warnings are not included (except in json): print ``comparison.warnings``
    on stderr."""
    if fmt == "table":
        return render_text_table(comparison, width)
    if fmt == "json":
        return json.dumps(to_json(comparison), indent=2, sort_keys=True,
                          ensure_ascii=False) + "\n"
    if fmt == "csv":
        return render_csv(comparison)
    if fmt == "markdown":
        return render_markdown(comparison)
    raise SpecError(f"--format: '{fmt}' is not one of {', '.join(FORMATS)}")
