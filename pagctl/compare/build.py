"""Building the comparison: columns, the subset and budget checks, pairs, and
:func:`compare_runs`."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from pagctl.compare.model import Cell, Column, Comparison, Pair, Row
from pagctl.compare.pairing import PointResults, pair, same_points
from pagctl.compare.records import is_imported
from pagctl.compare.runs import RunData, read_run, run_labels
from pagctl.compare.spec_columns import differing_fields, flat_spec
from pagctl.errors import FieldError, SpecError


def _eps_text(eps: float, digits: int) -> str:
    return f"{eps:.{digits}g}"


def _robust_columns(keys: set[tuple[str, str | None, float | None]]
                    ) -> dict[tuple[str, str | None, float | None], Column]:
    def label(key: tuple[str, str | None, float | None], digits: int) -> str:
        attack, norm, eps = key
        parts = ["robust", attack] + ([norm] if norm else []) + \
            ([f"eps={_eps_text(eps, digits)}"] if eps is not None else [])
        return " ".join(parts)

    ordered = sorted(keys, key=lambda k: (k[0], k[1] or "", -1.0 if k[2] is None else k[2]))
    short = Counter(label(k, 4) for k in ordered)
    return {k: Column(id=label(k, 4) if short[label(k, 4)] == 1 else label(k, 9),
                      kind="robust", attack=k[0], norm=k[1], eps=k[2]) for k in ordered}


def _align_columns(keys: set[tuple[str, str]]) -> dict[tuple[str, str], Column]:
    per_source = Counter(source for source, _ in keys)
    out = {}
    for source, params in sorted(keys):
        loaded = json.loads(params)
        text = f"align {source}"
        if per_source[source] > 1:
            text += " " + ",".join(f"{k}={json.dumps(v)}" for k, v in sorted(loaded.items()))
        out[(source, params)] = Column(id=text, kind="align", source=source,
                                       source_params=loaded)
    return out


def _runs_text(labels: list[str]) -> str:
    shown = ", ".join(labels[:3]) + (f" (+{len(labels) - 3} more)" if len(labels) > 3 else "")
    return f"run {shown}" if len(labels) == 1 else f"runs {shown}"


def _what(column: Column) -> str:
    """The column in words, e.g. ``robust accuracy 'autoattack linf eps=0.03137'``."""
    if column.kind == "clean":
        return "clean accuracy"
    if column.kind == "robust":
        return f"robust accuracy '{column.id.removeprefix('robust ')}'"
    if column.kind == "align":
        return f"alignment '{column.id.removeprefix('align ')}'"
    return f"training-monitor alignment '{column.source}'"


_REMEDY = {"clean": "re-attack on the same data and --indices/--limit",
           "robust": "re-attack on the same data and --indices/--limit",
           "align": "re-score with pagctl align-score on the same data and --indices/--limit",
           "align_monitor": "score them with pagctl align-score on the same data and "
                            "--indices/--limit"}


def _subset_problem(column: Column, rows: list[Row]) -> str | None:
    """Why ``column`` puts numbers of different points side by side (other indices, or other
    images at the same indices: another split, test fraction or data folder), or None."""
    groups: dict[tuple[str | None, str | None], list[Row]] = {}
    for row in rows:
        cell = row.cells.get(column.id)
        if cell is not None and cell.subset_sha is not None:
            groups.setdefault(cell.points, []).append(row)
    if len(groups) < 2:
        return None
    indices = {sha for sha, _ in groups}
    parts = []
    for (sha, images), members in groups.items():
        count = members[0].cells[column.id].subset_count
        points = f"{count} points" if count is not None else "points"
        shown = f"sha {(sha or '')[:8]}…" if len(indices) > 1 else \
            f"images {_images_text(images)}"
        parts.append(f"{_runs_text([r.label for r in members])}: {points} {shown}")
    if len(indices) > 1:
        return f"{_what(column)} was measured on different subsets ({'; '.join(parts)})"
    return (f"{_what(column)} was measured on the same indices of different images: another "
            f"split, test fraction or data folder ({'; '.join(parts)})")


def _images_text(images: str | None) -> str:
    if images is None:
        return "unknown"
    if images.startswith("spec:"):
        return f"of data source {images[5:13]}… (an earlier record)"
    return f"{images[:8]}…"


def _budget_problem(rows: list[Row], columns: list[Column]) -> str | None:
    robust = [c for c in columns if c.kind == "robust"]
    budgets: dict[str, set[tuple[str | None, float | None]]] = {}
    for row in rows:
        have = {(c.norm, c.eps) for c in robust if c.id in row.cells}
        if have:
            budgets[row.label] = have
    if len(budgets) < 2 or set.intersection(*budgets.values()):
        return None

    def budget_text(b: tuple[str | None, float | None]) -> str:
        norm, eps = b
        return " ".join([norm or "no norm"] + ([f"eps={eps:.4g}"] if eps is not None else []))

    parts = [f"run {label}: {', '.join(sorted(budget_text(b) for b in have))}"
             for label, have in list(budgets.items())[:4]]
    more = f"; +{len(budgets) - 4} more runs" if len(budgets) > 4 else ""
    return ("the runs share no robust accuracy budget: different ε or norms "
            f"({'; '.join(parts)}{more})")


def _results(cell: Cell | None) -> PointResults | None:
    """A cell's per-point robust results (`pagctl.compare.pairing`), None without bits."""
    if cell is None or cell.bits is None or cell.n is None:
        return None
    return PointResults(cell.n, cell.bits, cell.subset_sha, cell.images_sha)


def _pairs(rows: list[Row], columns: list[Column]) -> list[Pair]:
    pairs = []
    for column in columns:
        if column.kind != "robust":
            continue
        have = [(row, results) for row in rows
                if (results := _results(row.cells.get(column.id))) is not None]
        for i, (row_a, a) in enumerate(have):
            for row_b, b in have[i + 1:]:
                if not same_points(a, b):
                    continue  # not the same points: no paired test (the column says why)
                pairs.append(Pair(**vars(pair(a, b)), column=column.id, run_a=row_a.label,
                                  run_b=row_b.label))
    return pairs


def _choose_clean(data: list[RunData]) -> list[Cell | None]:
    """Per run: its latest clean measurement on the largest subset (indices and images) all
    runs measured, or its latest measurement when no subset is common to all."""
    measured = [d for d in data if d.clean]
    common: set[tuple[str, str]] | None = None
    for d in measured:
        found = {(c.subset_sha, c.images_sha or "") for c in d.clean if c.subset_sha is not None}
        common = found if common is None else common & found
    chosen = None
    if common:
        sizes = {(c.subset_sha, c.images_sha or ""): c.subset_count or 0
                 for d in measured for c in d.clean}
        chosen = max(sorted(common), key=lambda k: sizes.get(k, 0))
    out: list[Cell | None] = []
    for d in data:
        cells = [c for c in d.clean
                 if chosen is None or (c.subset_sha, c.images_sha or "") == chosen]
        out.append(cells[-1] if cells else None)
    return out


def compare_runs(run_dirs: list[Path], *, strict: bool = False,
                 weights: str = "last") -> Comparison:
    """Read each run's spec.json and metrics.jsonl (never weights) and line them up: the
    results measured on each run's ``weights`` (last, or best by validation).

    Numbers measured on different subsets, ε or norms (see the ``pagctl.compare``
    docstring) are put side by side and listed in ``Comparison.mismatches`` (each such column
    marked); with ``strict`` the first of them is a SpecError instead. A folder without a
    valid spec.json is a CheckpointError.
    """
    from pagctl.checkpoint import read_spec

    if not run_dirs:
        raise SpecError("compare: pass at least one run folder")
    specs = [read_spec(Path(d)) for d in run_dirs]
    flats = [flat_spec(s, imported=is_imported(Path(d)))
             for d, s in zip(run_dirs, specs, strict=True)]
    labels = run_labels([(Path(d), s.name) for d, s in zip(run_dirs, specs, strict=True)])
    if weights not in ("last", "best"):
        raise FieldError("weights", f"{weights!r} is not one of last, best")
    data = [read_run(Path(d), label, spec, flat, weights)
            for d, label, spec, flat in zip(run_dirs, labels, specs, flats, strict=True)]
    rows = [d.row for d in data]
    warnings = [w for d in data for w in d.warnings]

    columns: list[Column] = []
    clean = _choose_clean(data)
    if any(c is not None for c in clean):
        columns.append(Column(id="clean", kind="clean"))
        for row, cell in zip(rows, clean, strict=True):
            if cell is not None:
                row.cells["clean"] = cell
    robust_cols = _robust_columns({k for d in data for k in d.robust})
    align_cols = _align_columns({k for d in data for k in d.align})
    for d in data:
        for rkey, cell in d.robust.items():
            d.row.cells[robust_cols[rkey].id] = cell
        for akey, cell in d.align.items():
            d.row.cells[align_cols[akey].id] = cell
    columns += list(robust_cols.values()) + list(align_cols.values())
    if any(not d.align for d in data):
        monitor_ids: dict[str, Column] = {}
        for d in data:
            if d.monitor is not None:
                source, cell = d.monitor
                col = monitor_ids.setdefault(source, Column(
                    id=f"align (train monitor) {source}", kind="align_monitor", source=source))
                d.row.cells[col.id] = cell
        columns += [monitor_ids[s] for s in sorted(monitor_ids)]

    for row in rows:
        for column in columns:
            cell = row.cells.get(column.id)
            if cell is not None and cell.stale:
                warnings.append(
                    f"warning: {row.run_dir}: {_what(column)} (metrics.jsonl line "
                    f"{cell.line}) was measured before the last training epoch, on older "
                    "weights; measure it again")

    problems: list[tuple[str, str]] = []
    priority = {"robust": 0, "align": 1, "clean": 2, "align_monitor": 3}
    for column in sorted(columns, key=lambda c: priority[c.kind]):
        problem = _subset_problem(column, rows)
        if problem is not None:
            problems.append((problem, _REMEDY[column.kind]))
            column.mismatch = problem
    budget = _budget_problem(rows, columns)
    if budget is not None:
        problems.append((budget, "attack them at a common --param eps (and norm)"))
    if problems and strict:
        text, remedy = problems[0]
        more = len(problems) - 1
        more_text = f" ({more} more mismatch{'es' if more > 1 else ''})" if more else ""
        raise SpecError(f"compare: {text}; {remedy}, or drop --strict to see them side by "
                        f"side, marked{more_text}")

    return Comparison(rows=rows, spec_columns=differing_fields(flats), columns=columns,
                      pairs=_pairs(rows, columns), warnings=warnings,
                      mismatches=[text for text, _ in problems], weights=weights)
