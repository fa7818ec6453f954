"""Building the comparison, per run: labels, and a run's records as cells."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pagctl.compare.model import Cell, Row
from pagctl.compare.records import read_records
from pagctl.records import AttackRecord, Subset, TrainEpochRecord
from pagctl.stats import bits_as_int, first_n_digest, wilson_interval


def _eps_key(eps: float | None) -> float | None:
    return float(f"{eps:.9g}") if eps is not None else None


def run_labels(runs: list[tuple[Path, str]]) -> list[str]:
    """A label per (folder, run name): the name, or the folder when names repeat, with a
    ``#k`` suffix when even those do."""
    names = Counter(name for _, name in runs)
    labels = [name if names[name] == 1 else str(path) for path, name in runs]
    seen: Counter[str] = Counter()
    counts = Counter(labels)
    out = []
    for label in labels:
        seen[label] += 1
        out.append(label if counts[label] == 1 else f"{label}#{seen[label]}")
    return out


def _subset_of(subset: Subset | None, n: int) -> tuple[str | None, int | None]:
    if subset is None:
        return None, n
    return (subset.indices_sha256 or None, subset.count if subset.count is not None else n)


SOURCE_FIELDS = ("dataset", "root", "split_seed", "test_fraction", "toy_train_size",
                 "toy_test_size", "validation_size", "image_size", "crop_pct", "interpolation")
"""The ``data`` fields that decide which images a run's test indices are (`source_points`);
batch sizes, workers and augmentation do not."""


def source_points(spec: Any) -> str:
    """``spec:<digest>`` of the run's data source (`SOURCE_FIELDS`): what names the images of
    a record written before records carried ``subset.data_sha256``. Two runs of one source
    share it; another split, test fraction or data folder gives another."""
    import hashlib

    data = spec.data
    fields = {name: str(getattr(data, name)) for name in SOURCE_FIELDS}
    if data.dataset in ("digits", "mnist5k", "toy"):
        fields.pop("root")  # embedded: the folder is not where the images come from
    text = json.dumps(fields, sort_keys=True)
    return "spec:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def _attack_cell(rec: AttackRecord, line: int, stale: bool, which: str, source: str) -> Cell:
    n = rec.n
    value = rec.clean_accuracy if which == "clean" else rec.robust_accuracy
    assert value is not None
    correct = rec.clean_correct if which == "clean" else rec.robust_correct
    interval = rec.clean_interval if which == "clean" else rec.robust_interval
    if interval is None and n:
        interval = wilson_interval(correct if correct is not None else round(value * n), n)
    sha, count = _subset_of(rec.subset, n)
    reliable = rec.reliability.reliable if rec.reliability is not None else None
    cell = Cell(value=value, n=n, interval=(interval[0], interval[1]) if interval else None,
                subset_sha=sha, subset_count=count, line=line, record_kind="attack",
                stale=stale, reliable=reliable if which == "robust" else None,
                extra={"correct": correct, "params": rec.params, "seed": rec.seed},
                images_sha=_images_of(rec.subset, source))
    if which == "robust" and rec.per_example is not None and rec.per_example.robust is not None:
        cell.bits = bits_as_int(rec.per_example.robust, n)
    return cell


def _images_of(subset: Subset | None, source: str) -> str:
    """The images a record measured: its ``data_sha256``, else its run's data source."""
    found = subset.data_sha256 if subset is not None else None
    return found if found is not None else source


def _monitor_clean_cell(rec: TrainEpochRecord, line: int, source: str) -> Cell | None:
    value, n = rec.clean_accuracy, rec.n_test
    if value is None:
        return None
    interval = wilson_interval(round(value * n), n) if n else None
    return Cell(value=value, n=n, interval=interval,
                subset_sha=first_n_digest(n) if n is not None else None, subset_count=n,
                line=line, record_kind="train_epoch", extra={"epoch": rec.epoch},
                images_sha=rec.data_sha256 or source)


@dataclass
class RunData:
    """One run's cells before the columns are laid out: clean-accuracy measurements (oldest
    first), robust accuracy per (attack, norm, ε), alignment per (source, params), the
    training monitor's alignment, and the warnings about its metrics file."""

    row: Row
    clean: list[Cell]
    robust: dict[tuple[str, str | None, float | None], Cell]
    align: dict[tuple[str, str], Cell]
    monitor: tuple[str, Cell] | None
    warnings: list[str]


def read_run(run_dir: Path, label: str, spec: Any, flat: dict[str, Any],
             weights: str = "last") -> RunData:
    """A run's metrics.jsonl as cells: each key's latest record wins; records written before
    the last training epoch are marked stale. Only attack and align records of ``weights``
    count (a record without the field measured the last weights); with ``"best"`` the
    training monitor's numbers, which measured the last weights, are left out."""
    records, warnings = read_records(run_dir)
    epochs = [(ln, r) for ln, r in records if isinstance(r, TrainEpochRecord)]
    last_epoch_line = epochs[-1][0] if epochs else 0
    row = Row(label=label, name=spec.name, run_dir=run_dir, spec=flat,
              epochs_trained=epochs[-1][1].epoch if epochs else None)
    clean: list[Cell] = []
    robust: dict[tuple[str, str | None, float | None], Cell] = {}
    align: dict[tuple[str, str], Cell] = {}
    monitor: tuple[str, Cell] | None = None
    last_clean_epoch: Cell | None = None
    source = source_points(spec)
    for line, rec in records:
        stale = line < last_epoch_line
        if isinstance(rec, TrainEpochRecord) and weights != "last":
            continue
        if not isinstance(rec, TrainEpochRecord) and (rec.weights or "last") != weights:
            continue
        if isinstance(rec, TrainEpochRecord):
            cell = _monitor_clean_cell(rec, line, source)
            last_clean_epoch = cell or last_clean_epoch
            if rec.alignment is not None:
                n = rec.n_test
                ref = spec.eval.align_source or (
                    spec.target_gradients if spec.target_gradients.name != "none" else None)
                monitor = (ref.name if ref is not None else "?", Cell(
                    value=rec.alignment, n=n, interval=None,
                    subset_sha=first_n_digest(n) if n is not None else None, subset_count=n,
                    line=line, record_kind="train_epoch", extra={"epoch": rec.epoch},
                    images_sha=rec.data_sha256 or source))
        elif isinstance(rec, AttackRecord):
            # a mixed-precision evaluation is its own column, never taken for float32's
            attack = rec.attack if rec.precision is None else f"{rec.attack} ({rec.precision})"
            key = (attack, rec.norm, _eps_key(rec.eps))
            robust[key] = _attack_cell(rec, line, stale, "robust", source)
            if rec.clean_accuracy is not None and not stale:
                clean.append(_attack_cell(rec, line, stale, "clean", source))
        else:
            sha, count = _subset_of(rec.subset, rec.n)
            params = json.dumps(rec.source_params or {}, sort_keys=True)
            align[(rec.source, params)] = Cell(
                value=rec.mean, n=rec.n,
                interval=(rec.interval[0], rec.interval[1]) if rec.interval else None,
                subset_sha=sha, subset_count=count, line=line, record_kind="align",
                stale=stale, extra={"classes_per_image": rec.classes_per_image,
                                    "fraction_positive": rec.fraction_positive,
                                    "seed": rec.seed},
                images_sha=_images_of(rec.subset, source))
    if last_clean_epoch is not None:
        clean.append(last_clean_epoch)
    clean.sort(key=lambda c: c.line)
    return RunData(row, clean, robust, align, monitor, warnings)
