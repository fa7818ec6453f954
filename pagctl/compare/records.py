"""Compare's view of a metrics file: the records a comparison reads
(`pagctl.checkpoint.read_metrics`, the file's one reader) and one warning per line or file
it could not use; a comparison never stops for one run's metrics."""

from __future__ import annotations

from pathlib import Path

from pagctl.records import AlignRecord, AttackRecord, TrainEpochRecord

Usable = TrainEpochRecord | AttackRecord | AlignRecord
"""The kinds a comparison reads (score-model and import records, and unknown kinds, are
passed over)."""


def read_records(run_dir: Path) -> tuple[list[tuple[int, Usable]], list[str]]:
    """(line number, record) of every usable record of ``run_dir/metrics.jsonl``, and one
    warning per skipped line: damaged, of the wrong types, or contradicting itself (a summary
    that its per-point bits do not bear out; an intact record after a damaged part of the
    same line is kept: `pagctl.records.split_lines`). A missing file is an empty list;
    nothing raises: a file that links out of the folder or cannot be read is one warning
    (``...; its metrics are skipped``) and no records, so the other runs are still
    compared."""
    from pagctl.checkpoint import read_metrics
    from pagctl.errors import CheckpointError

    try:
        metrics = read_metrics(run_dir)
    except CheckpointError as exc:
        return [], [f"warning: {exc}; its metrics are skipped"]
    usable = [(line, record) for line, record in metrics.entries
              if isinstance(record, (TrainEpochRecord, AttackRecord, AlignRecord))]
    return usable, list(metrics.warnings)


def is_imported(run_dir: Path) -> bool:
    """Whether ``run_dir`` is a folder of ``pagctl import`` (its metrics hold an import
    record): a model pagctl did not train, whose spec's training fields are defaults. A
    metrics file that cannot be read says no (`read_records` warns about it)."""
    from pagctl.checkpoint import read_metrics
    from pagctl.errors import CheckpointError
    from pagctl.records import ImportRecord

    try:
        return bool(read_metrics(run_dir).of(ImportRecord))
    except CheckpointError:
        return False
