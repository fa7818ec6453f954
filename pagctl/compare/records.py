"""The tolerant metrics reader: every usable ``metrics.jsonl`` record, read through the
record models of `pagctl.records`, and one warning per skipped line."""

from __future__ import annotations

from pathlib import Path

from pagctl.records import (
    AlignRecord,
    AttackRecord,
    Record,
    TrainEpochRecord,
    parse_record,
    split_lines,
)

Usable = TrainEpochRecord | AttackRecord | AlignRecord
"""The kinds a comparison reads (score-model records and unknown kinds are passed over)."""


def read_records(run_dir: Path) -> tuple[list[tuple[int, Usable]], list[str]]:
    """(line number, record) of every usable record of ``run_dir/metrics.jsonl``, and one
    warning per skipped line: damaged, of the wrong types, or contradicting itself (a summary
    that its per-point bits do not bear out; an intact record after a damaged part of the
    same line is kept: `pagctl.records.split_lines`). A missing file is an empty list;
    nothing raises."""
    from pagctl.checkpoint import METRICS_FILE, confined
    from pagctl.errors import CheckpointError

    try:
        path = confined(run_dir, METRICS_FILE)
    except CheckpointError as exc:
        return [], [f"warning: {exc}; its metrics are skipped"]
    if not path.is_file():
        return [], []
    try:
        data = path.read_bytes()
    except OSError as exc:
        return [], [f"warning: {path}: unreadable ({exc.strerror or exc}); its metrics are "
                    "skipped"]
    records: list[tuple[int, Usable]] = []
    warnings: list[str] = []
    for number, raw in split_lines(data):
        rec: Record | dict[str, object] | str = parse_record(raw)
        if isinstance(rec, str):
            warnings.append(f"warning: {path} line {number}: {rec}; skipped")
            continue
        if isinstance(rec, (TrainEpochRecord, AttackRecord, AlignRecord)):
            records.append((number, rec))
    return records, warnings

