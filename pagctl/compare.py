"""Put run folders side by side, from ``spec.json`` and ``metrics.jsonl`` only.

Weights are never read, and neither torch nor numpy is imported, so comparing a hundred runs
takes a fraction of a second (one pass over each metrics file, linear in its lines).

Rows and columns
----------------
One row per run. Spec columns: every dotted spec field (``model_dump()`` flattened,
plugin ``params`` included) whose value differs across the runs, except ``name``,
``description`` and ``out_dir``. λ (``train.pag_weight``) counts as 0 when the source is
``none``, so two baselines never differ by a weight nothing uses. The run name is always
shown (its folder instead when two runs share a name).

Metric columns, each from the *latest* record (file order) of its key:

- ``clean``: clean accuracy, from the attack records and the last evaluated training epoch.
  Each run contributes its latest measurement on a subset every run has measured (the
  largest such subset); when no subset is common to all runs, its latest measurement.
  Attack records written before the last training epoch (older weights) are not used here.
- ``robust ATTACK NORM eps=E``: robust accuracy, one column per (attack, norm, ε) of the
  ``attack`` records. ε are equal when they agree to 9 significant digits.
- ``align SOURCE``: mean cosine, one column per (source, source params) of the ``align``
  records.
- ``align (train monitor) SOURCE``: the alignment of the last training epoch that has one
  (its source is ``eval.align_source``, else the training source). Shown only when some run
  has no ``align`` record at all.

Every cell carries n and, where the record has it, the 95% Wilson interval (computed from
the counts for the training monitor's clean accuracy; the monitor's alignment has none).
The subset of the training monitor is the first ``n_test`` test points, whose digest is
computed the way ``pagctl attack`` computes it, so a ``--limit N`` attack and a monitor on N
points count as the same subset.

What is refused (``SpecError``) unless ``force=True``
------------------------------------------------------

1. *Different subsets*: two cells of one column whose ``subset.indices_sha256`` differ (a
   cell without a subset digest cannot be checked and is accepted).
2. *Different ε or norms*: the runs that have any robust accuracy share no (norm, ε)
   budget, i.e. no budget at which every one of them was attacked. A run lacking a column
   only shows "-"; different attacks at a shared budget are fine (each has its column).

Without ``force`` the first problem is the error (robust columns are checked first, then
alignment, clean accuracy and the training monitor; the count of the others is appended).
With ``force=True`` the comparison is made anyway and every such problem is listed in
``Comparison.mismatches`` and marked in the output (a ``≠`` on the column header in tables,
``mismatch`` fields in json and csv). The alignment's K (``classes_per_image``) is not
checked: K classes drawn uniformly without replacement estimate the same all-class mean.

Per-example comparison
----------------------
For every robust column and every pair of runs whose records hold ``per_example.robust``
bits on the same subset: the points both runs defend, only A, only B, neither, and the
exact two-sided McNemar p-value (binomial test of ``a_only`` against ``a_only + b_only``
draws at 1/2).

Warnings
--------
Corrupt metrics lines (not UTF-8, not JSON, not an object, no ``kind``, a known kind with
fields of the wrong type or out of range) are skipped and reported in
``Comparison.warnings`` as ``warning: runs/x/metrics.jsonl line 7: not valid JSON;
skipped``; the caller prints them on stderr. Records of unknown kinds are ignored. An
attack or align value written before the run's last training epoch measured older weights
and is reported too. A robust value whose attack failed its reliability checks is marked
``!`` in tables and markdown (``reliable`` in json).

Output formats (:func:`render`)
-------------------------------
``table`` (rich text, plain, as wide as the terminal: values as
``0.612 [0.561, 0.660] n=360``, the interval on a second line when one-line cells would not
fit; at most 6 spec columns and 40 pairs, the rest named below it), ``markdown`` (the same
as pipe tables, everything), ``json`` (``{"runs", "columns", "pairs", "mismatches",
"warnings"}``, numbers in separate fields), ``csv`` (one row per run with flat columns
``LABEL``, ``LABEL lo``, ``LABEL hi``, ``LABEL n``, ``LABEL subset`` and ``mismatch``; when
there are pairs, an empty line and then a second csv table of them).

Figure (:func:`plot`)
---------------------
Left: robust accuracy vs ε, a line per run and (attack, norm), 95% intervals as error bars.
Right: alignment vs robust accuracy, a point per run, Pearson's r in the title (from 3 runs
on; fewer, or no variation, is said instead). x is the alignment column with values in the
most runs (``align`` records before the training monitor at equal counts); y is the robust
column with values in the most runs, ties to the widest spread across runs, then the
largest ε.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import shutil
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pagctl.errors import SpecError

_SPEC_EXCLUDED = ("name", "description", "out_dir")
_SPEC_HEADERS = {
    "model.arch": "arch", "target_gradients.name": "source", "train.pag_weight": "λ",
    "train.classes_per_image": "K", "train.epochs": "epochs", "data.dataset": "dataset",
}
_TABLE_SPEC_COLUMNS = 6
"""The table shows at most this many differing spec fields (all in json/csv/markdown)."""
_TABLE_PAIRS = 40
"""The table lists at most this many pairs (all in json/csv/markdown)."""
_MISSING = object()


# ---------------------------------------------------------------------------------------
# data


@dataclass
class Column:
    """A metric column. ``kind``: clean | robust | align | align_monitor."""

    id: str
    kind: str
    attack: str | None = None
    norm: str | None = None
    eps: float | None = None
    source: str | None = None
    source_params: dict[str, Any] | None = None
    mismatch: str | None = None
    """Set (with force) when the column holds numbers measured on different subsets."""

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "attack": self.attack, "norm": self.norm,
                "eps": self.eps, "source": self.source, "source_params": self.source_params,
                "mismatch": self.mismatch}


@dataclass
class Cell:
    """One run's value in one metric column, and how it was measured."""

    value: float
    n: int | None
    interval: tuple[float, float] | None
    subset_sha: str | None
    subset_count: int | None
    line: int
    """Line of metrics.jsonl the value comes from (1-based)."""
    record_kind: str
    stale: bool = False
    """Written before the run's last training epoch: measured on older weights."""
    reliable: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    bits: int | None = field(default=None, repr=False)
    """Per-example robust bits, point 0 in the highest of n bits (robust columns only)."""

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "n": self.n,
                "interval": list(self.interval) if self.interval else None,
                "subset_sha256": self.subset_sha, "subset_count": self.subset_count,
                "record": self.record_kind, "line": self.line, "stale": self.stale,
                "reliable": self.reliable, **self.extra}


@dataclass
class Row:
    label: str
    """The run's name, or its folder when the name is not unique among the runs."""
    name: str
    run_dir: Path
    spec: dict[str, Any]
    """Flattened spec (every field); the table shows ``Comparison.spec_columns`` of it."""
    epochs_trained: int | None
    cells: dict[str, Cell] = field(default_factory=dict)


@dataclass
class Pair:
    """Per-example robust results of two runs on one column (same subset)."""

    column: str
    run_a: str
    run_b: str
    n: int
    both: int
    a_only: int
    b_only: int
    neither: int
    p_value: float

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class Comparison:
    rows: list[Row]
    spec_columns: list[str]
    """Dotted spec fields that differ across the runs, in display order."""
    columns: list[Column]
    pairs: list[Pair]
    warnings: list[str]
    mismatches: list[str] = field(default_factory=list)
    """What ``force=True`` let through (empty otherwise)."""


# ---------------------------------------------------------------------------------------
# statistics


def wilson_interval(k: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of ``k / n`` (the one ``pagctl attack`` reports)."""
    from pagctl.attack import wilson_interval as wilson

    return wilson(k, n)


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: 2·P(X <= min(b, c)), X ~ Binomial(b + c, 1/2),
    capped at 1. The binomial sum is taken in exact integers from the largest term down and
    stops once a term no longer changes a double (terms shrink geometrically there)."""
    n, k = b + c, min(b, c)
    if n == 0 or 2 * k == n:
        return 1.0
    term = math.comb(n, k)
    total = 0
    i = k
    while i >= 0 and term:
        total += term
        if term < total >> 64:
            break
        term = term * i // (n - i + 1)
        i -= 1
    return min(1.0, 2 * total / (1 << n))


def pearson(xs: list[float], ys: list[float]) -> float | None:
    """Pearson correlation; None with fewer than 3 points or without variation."""
    n = len(xs)
    if n < 3:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx <= 0 or syy <= 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / math.sqrt(sxx * syy)


_DIGESTS: dict[int, str] = {}


def first_n_digest(n: int) -> str:
    """``pagctl.attack.indices_digest(arange(n))`` without numpy: sha256 of int64s."""
    if n not in _DIGESTS:
        _DIGESTS[n] = hashlib.sha256(array("q", range(n)).tobytes()).hexdigest()[:16]
    return _DIGESTS[n]


# ---------------------------------------------------------------------------------------
# tolerant metrics reader


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _prob(v: Any) -> bool:
    return _is_num(v) and 0.0 <= v <= 1.0


def _cos(v: Any) -> bool:
    return _is_num(v) and -1.0 - 1e-6 <= v <= 1.0 + 1e-6


def _pair_of(check: Any) -> Any:
    return lambda v: isinstance(v, list) and len(v) == 2 and all(check(x) for x in v)


def _subset(v: Any) -> bool:
    return isinstance(v, dict) and isinstance(v.get("indices_sha256", ""), str) and \
        (v.get("count") is None or _is_int(v.get("count")))


_TYPES = {  # checker, description
    "str": (lambda v: isinstance(v, str), "a string"),
    "int": (_is_int, "a non-negative integer"),
    "anyint": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "num": (_is_num, "a finite number"),
    "prob": (_prob, "a number in [0, 1]"),
    "cos": (_cos, "a number in [-1, 1]"),
    "dict": (lambda v: isinstance(v, dict), "an object"),
    "prob2": (_pair_of(_prob), "[low, high] in [0, 1]"),
    "cos2": (_pair_of(_cos), "[low, high] in [-1, 1]"),
    "subset": (_subset, "a subset object"),
}
_SCHEMA: dict[str, tuple[dict[str, str], dict[str, str]]] = {  # kind: (required, optional)
    "train_epoch": ({"epoch": "int"},
                    {"clean_accuracy": "prob", "robust_accuracy": "prob", "alignment": "cos",
                     "n_test": "int", "monitor": "dict"}),
    "attack": ({"attack": "str", "n": "int", "robust_accuracy": "prob"},
               {"clean_accuracy": "prob", "norm": "str", "eps": "num", "clean_correct": "int",
                "robust_correct": "int", "clean_interval": "prob2", "robust_interval": "prob2",
                "subset": "subset", "per_example": "dict", "reliability": "dict",
                "params": "dict", "seed": "anyint"}),
    "align": ({"source": "str", "n": "int", "mean": "cos"},
              {"interval": "cos2", "subset": "subset", "classes_per_image": "int",
               "source_params": "dict", "fraction_positive": "prob", "seed": "anyint"}),
}


def _problem(rec: Any) -> str | None:
    """Why a parsed line cannot be used, or None."""
    if not isinstance(rec, dict):
        return f"a JSON {type(rec).__name__}, not an object"
    kind = rec.get("kind")
    if not isinstance(kind, str):
        return "no 'kind' field"
    if kind not in _SCHEMA:
        return None
    required, optional = _SCHEMA[kind]
    for name, typ in [*required.items(), *optional.items()]:
        value = rec.get(name)
        if value is None:
            if name in required:
                return f"{kind} record without '{name}'"
            continue
        check, desc = _TYPES[typ]
        if not check(value):
            return f"{kind} field '{name}' is {json.dumps(value)[:40]}, expected {desc}"
    return None


def read_records(run_dir: Path) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    """(line number, record) of every usable line of ``run_dir/metrics.jsonl``, and one
    warning per skipped line. A missing file is an empty list; nothing raises."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return [], []
    try:
        data = path.read_bytes()
    except OSError as exc:
        return [], [f"warning: {path}: unreadable ({exc.strerror or exc}); its metrics are "
                    "skipped"]
    records: list[tuple[int, dict[str, Any]]] = []
    warnings: list[str] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            problem: str | None = "not valid UTF-8"
        except (json.JSONDecodeError, RecursionError):
            problem = "not valid JSON"
        else:
            problem = _problem(rec)
        if problem is not None:
            warnings.append(f"warning: {path} line {number}: {problem}; skipped")
            continue
        if rec.get("kind") == "attack":
            _check_bits(rec, path, number, warnings)
        records.append((number, rec))
    return records, warnings


def _check_bits(rec: dict[str, Any], path: Path, number: int, warnings: list[str]) -> None:
    """Drop ``per_example`` (keeping the record) unless its robust bits are n bits of hex."""
    per = rec.get("per_example")
    if per is None:
        return
    text = per.get("robust")
    ok = isinstance(text, str) and len(text) == 2 * ((rec["n"] + 7) // 8)
    if ok and text:
        try:
            int(text, 16)
        except ValueError:
            ok = False
    if not ok:
        warnings.append(f"warning: {path} line {number}: per_example.robust is not "
                        f"{rec['n']} bits of hex; per-example comparison skipped")
        rec["per_example"] = None


def _bits(text: str, n: int) -> int:
    """Hex bit string (``pagctl.attack.pack_bits``) as an int, point 0 in bit n - 1."""
    if n == 0:
        return 0
    return int(text, 16) >> (4 * len(text) - n)


# ---------------------------------------------------------------------------------------
# spec columns


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}" if prefix else str(key), out)
    else:
        out[prefix] = value


def _flat_spec(spec: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    _flatten(spec.model_dump(mode="json"), "", out)
    for key in _SPEC_EXCLUDED:
        out.pop(key, None)
    if out.get("target_gradients.name") == "none":
        out["train.pag_weight"] = 0.0
    return out


def _differing(flats: list[dict[str, Any]]) -> list[str]:
    order: dict[str, None] = {}
    for flat in flats:
        order.update(dict.fromkeys(flat))
    keys = [k for k in order
            if len({json.dumps(f.get(k, None), sort_keys=True) if k in f else "\0missing"
                    for f in flats}) > 1]
    preferred = [k for k in _SPEC_HEADERS if k in keys]
    return preferred + [k for k in keys if k not in _SPEC_HEADERS]


def spec_header(key: str) -> str:
    return _SPEC_HEADERS.get(key, key)


def _spec_text(value: Any) -> str:
    if value is _MISSING:
        return "-"
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


# ---------------------------------------------------------------------------------------
# building the comparison


def _eps_key(eps: Any) -> float | None:
    return float(f"{eps:.9g}") if _is_num(eps) else None


def _labels(runs: list[tuple[Path, str]]) -> list[str]:
    names = Counter(name for _, name in runs)
    labels = [name if names[name] == 1 else str(path) for path, name in runs]
    seen: Counter[str] = Counter()
    counts = Counter(labels)
    out = []
    for label in labels:
        seen[label] += 1
        out.append(label if counts[label] == 1 else f"{label}#{seen[label]}")
    return out


def _subset_of(rec: dict[str, Any]) -> tuple[str | None, int | None]:
    subset = rec.get("subset") or {}
    sha = subset.get("indices_sha256")
    return (sha or None, subset.get("count", rec.get("n")))


def _attack_cell(rec: dict[str, Any], line: int, stale: bool, which: str) -> Cell:
    n = rec["n"]
    value = rec[f"{which}_accuracy"]
    correct = rec.get(f"{which}_correct")
    interval = rec.get(f"{which}_interval")
    if interval is None and n:
        interval = wilson_interval(correct if correct is not None else round(value * n), n)
    sha, count = _subset_of(rec)
    reliability = rec.get("reliability") or {}
    reliable = reliability.get("reliable")
    cell = Cell(value=value, n=n, interval=tuple(interval) if interval else None,
                subset_sha=sha, subset_count=count, line=line, record_kind="attack",
                stale=stale,
                reliable=reliable if which == "robust" and isinstance(reliable, bool) else None,
                extra={"correct": correct, "params": rec.get("params"),
                       "seed": rec.get("seed")})
    per = rec.get("per_example")
    if which == "robust" and per is not None:
        cell.bits = _bits(per["robust"], n)
    return cell


def _monitor_clean_cell(rec: dict[str, Any], line: int) -> Cell | None:
    value, n = rec.get("clean_accuracy"), rec.get("n_test")
    if value is None:
        return None
    interval = wilson_interval(round(value * n), n) if n else None
    return Cell(value=value, n=n, interval=interval,
                subset_sha=first_n_digest(n) if n is not None else None, subset_count=n,
                line=line, record_kind="train_epoch", extra={"epoch": rec["epoch"]})


@dataclass
class _RunData:
    row: Row
    clean: list[Cell]
    robust: dict[tuple[str, str | None, float | None], Cell]
    align: dict[tuple[str, str], Cell]
    monitor: tuple[str, Cell] | None
    warnings: list[str]


def _read_run(run_dir: Path, label: str, spec: Any, flat: dict[str, Any]) -> _RunData:
    records, warnings = read_records(run_dir)
    epochs = [(ln, r) for ln, r in records if r["kind"] == "train_epoch"]
    last_epoch_line = epochs[-1][0] if epochs else 0
    row = Row(label=label, name=spec.name, run_dir=run_dir, spec=flat,
              epochs_trained=epochs[-1][1]["epoch"] if epochs else None)
    clean: list[Cell] = []
    robust: dict[tuple[str, str | None, float | None], Cell] = {}
    align: dict[tuple[str, str], Cell] = {}
    monitor: tuple[str, Cell] | None = None
    last_clean_epoch: Cell | None = None
    for line, rec in records:
        kind, stale = rec["kind"], line < last_epoch_line
        if kind == "train_epoch":
            cell = _monitor_clean_cell(rec, line)
            last_clean_epoch = cell or last_clean_epoch
            if rec.get("alignment") is not None:
                n = rec.get("n_test")
                ref = spec.eval.align_source or (
                    spec.target_gradients if spec.target_gradients.name != "none" else None)
                monitor = (ref.name if ref is not None else "?", Cell(
                    value=rec["alignment"], n=n, interval=None,
                    subset_sha=first_n_digest(n) if n is not None else None, subset_count=n,
                    line=line, record_kind="train_epoch", extra={"epoch": rec["epoch"]}))
        elif kind == "attack":
            key = (rec["attack"], rec.get("norm"), _eps_key(rec.get("eps")))
            robust[key] = _attack_cell(rec, line, stale, "robust")
            if rec.get("clean_accuracy") is not None and not stale:
                clean.append(_attack_cell(rec, line, stale, "clean"))
        elif kind == "align":
            params = rec.get("source_params") or {}
            interval = rec.get("interval")
            sha, count = _subset_of(rec)
            align[(rec["source"], json.dumps(params, sort_keys=True))] = Cell(
                value=rec["mean"], n=rec["n"], interval=tuple(interval) if interval else None,
                subset_sha=sha, subset_count=count, line=line, record_kind="align",
                stale=stale, extra={"classes_per_image": rec.get("classes_per_image"),
                                    "fraction_positive": rec.get("fraction_positive"),
                                    "seed": rec.get("seed")})
    if last_clean_epoch is not None:
        clean.append(last_clean_epoch)
    clean.sort(key=lambda c: c.line)
    return _RunData(row, clean, robust, align, monitor, warnings)


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


_REMEDY = {"clean": "re-attack on the same --indices/--limit",
           "robust": "re-attack on the same --indices/--limit",
           "align": "re-score with pagctl align-score on the same --indices/--limit",
           "align_monitor": "score them with pagctl align-score on the same --indices/--limit"}


def _subset_problem(column: Column, rows: list[Row]) -> str | None:
    groups: dict[str, list[Row]] = {}
    for row in rows:
        cell = row.cells.get(column.id)
        if cell is not None and cell.subset_sha is not None:
            groups.setdefault(cell.subset_sha, []).append(row)
    if len(groups) < 2:
        return None
    parts = []
    for sha, members in groups.items():
        count = members[0].cells[column.id].subset_count
        points = f"{count} points" if count is not None else "points"
        parts.append(f"{_runs_text([r.label for r in members])}: {points} sha {sha[:8]}…")
    return f"{_what(column)} was measured on different subsets ({'; '.join(parts)})"


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


def _pairs(rows: list[Row], columns: list[Column]) -> list[Pair]:
    pairs = []
    for column in columns:
        if column.kind != "robust":
            continue
        have = [(row, cell) for row in rows
                if (cell := row.cells.get(column.id)) is not None and cell.bits is not None]
        for i, (row_a, a) in enumerate(have):
            for row_b, b in have[i + 1:]:
                if a.n is None or a.n != b.n or a.subset_sha is None or \
                        a.subset_sha != b.subset_sha:
                    continue
                assert a.bits is not None and b.bits is not None
                full = (1 << a.n) - 1
                both = (a.bits & b.bits).bit_count()
                a_only = (a.bits & ~b.bits & full).bit_count()
                b_only = (b.bits & ~a.bits & full).bit_count()
                pairs.append(Pair(column=column.id, run_a=row_a.label, run_b=row_b.label,
                                  n=a.n, both=both, a_only=a_only, b_only=b_only,
                                  neither=a.n - both - a_only - b_only,
                                  p_value=mcnemar_exact(a_only, b_only)))
    return pairs


def _choose_clean(data: list[_RunData]) -> list[Cell | None]:
    """Per run: its latest clean measurement on the largest subset all runs measured, or
    its latest measurement when no subset is common to all."""
    measured = [d for d in data if d.clean]
    common: set[str] | None = None
    for d in measured:
        shas = {c.subset_sha for c in d.clean if c.subset_sha is not None}
        common = shas if common is None else common & shas
    chosen_sha = None
    if common:
        sizes = {c.subset_sha: c.subset_count or 0 for d in measured for c in d.clean}
        chosen_sha = max(sorted(common), key=lambda s: sizes.get(s, 0))
    out: list[Cell | None] = []
    for d in data:
        cells = [c for c in d.clean if chosen_sha is None or c.subset_sha == chosen_sha]
        out.append(cells[-1] if cells else None)
    return out


def compare_runs(run_dirs: list[Path], *, force: bool = False) -> Comparison:
    """Read each run's spec.json and metrics.jsonl (never weights) and line them up.

    Raises CheckpointError for a folder without a valid spec.json and SpecError for numbers
    measured on different subsets, ε or norms (see the module docstring) unless ``force``.
    """
    from pagctl.checkpoint import read_spec

    if not run_dirs:
        raise SpecError("compare: pass at least one run folder")
    specs = [read_spec(Path(d)) for d in run_dirs]
    flats = [_flat_spec(s) for s in specs]
    labels = _labels([(Path(d), s.name) for d, s in zip(run_dirs, specs, strict=True)])
    data = [_read_run(Path(d), label, spec, flat)
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
    if problems and not force:
        text, remedy = problems[0]
        more = len(problems) - 1
        more_text = f" ({more} more mismatch{'es' if more > 1 else ''})" if more else ""
        raise SpecError(f"compare: {text}; {remedy} or pass --force{more_text}")

    return Comparison(rows=rows, spec_columns=_differing(flats), columns=columns,
                      pairs=_pairs(rows, columns), warnings=warnings,
                      mismatches=[text for text, _ in problems])


# ---------------------------------------------------------------------------------------
# rendering


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
    if hidden_spec:
        notes.append(f"also differing: {', '.join(hidden_spec)} (see --format json)")
    if any(c.reliable is False for r in comparison.rows for c in r.cells.values()):
        notes.append("! the attack's reliability checks failed; see its 'reliability' record")
    notes += [f"≠ forced: {m}" for m in comparison.mismatches]
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
    spec_cells = [[_spec_text(r.spec.get(k, _MISSING)) for k in shown_spec] for r in rows]
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
        cells = [row.label, *(_spec_text(row.spec.get(k, _MISSING))
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
             "spec": {k: r.spec.get(k) for k in comparison.spec_columns},
             "metrics": {c.id: r.cells[c.id].to_json() if c.id in r.cells else None
                         for c in comparison.columns}} for r in comparison.rows]
    columns = [{"id": k, "kind": "spec", "label": spec_header(k)}
               for k in comparison.spec_columns] + [c.to_json() for c in comparison.columns]
    return {"runs": runs, "columns": columns,
            "pairs": [p.to_json() for p in comparison.pairs],
            "mismatches": comparison.mismatches, "warnings": comparison.warnings}


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
        values += ["" if row.spec.get(k, _MISSING) is _MISSING else
                   _spec_text(row.spec[k]) for k in comparison.spec_columns]
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
    terminal's), ``json``, ``csv`` or ``markdown``. Warnings are not included (except in
    json): print ``comparison.warnings`` on stderr."""
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


def render_table(comparison: Comparison | list[Path]) -> None:
    """Print the table to stdout (kept for callers of the former API)."""
    import sys

    if not isinstance(comparison, Comparison):
        comparison = compare_runs(list(comparison))
    sys.stdout.write(render_text_table(comparison))


# ---------------------------------------------------------------------------------------
# figure


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
    from pagctl.figures import _pyplot, _save

    plt = _pyplot("--plot")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    try:
        _curve_panel(left, comparison)
        _scatter_panel(right, comparison)
        fig.tight_layout()
        _save(fig, Path(path))
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
        low = [c.value - (c.interval or (c.value, c.value))[0] for _, c in points]
        high = [(c.interval or (c.value, c.value))[1] - c.value for _, c in points]
        ax.errorbar(eps, acc, yerr=[low, high], marker="o", capsize=3, color=colours[label],
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
        xerr = None if cx.interval is None else \
            [[cx.value - cx.interval[0]], [cx.interval[1] - cx.value]]
        yerr = None if cy.interval is None else \
            [[cy.value - cy.interval[0]], [cy.interval[1] - cy.value]]
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
