"""Building the comparison, per run: labels, and a run's records as cells."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pagctl.compare.model import Cell, Row
from pagctl.compare.records import _bits, _is_num, read_records
from pagctl.compare.stats import first_n_digest, wilson_interval


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
