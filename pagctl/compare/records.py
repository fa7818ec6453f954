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
    warning per skipped line (an intact record after a damaged part of the same line is
    kept: `pagctl.records.split_lines`). A missing file is an empty list; nothing raises."""
    path = run_dir / "metrics.jsonl"
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
        if isinstance(rec, AttackRecord):
            _check_bits(rec, path, number, warnings)
        if isinstance(rec, (TrainEpochRecord, AttackRecord, AlignRecord)):
            records.append((number, rec))
    return records, warnings


def _check_bits(rec: AttackRecord, path: Path, number: int, warnings: list[str]) -> None:
    """Drop ``per_example`` (keeping the record) unless its robust bits are n bits of hex."""
    if rec.per_example is None:
        return
    text = rec.per_example.robust
    ok = isinstance(text, str) and len(text) == 2 * ((rec.n + 7) // 8)
    if ok and text:
        try:
            int(text, 16)
        except ValueError:
            ok = False
    if not ok:
        warnings.append(f"warning: {path} line {number}: per_example.robust is not "
                        f"{rec.n} bits of hex; per-example comparison skipped")
        rec.per_example = None
