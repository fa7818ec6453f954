"""metrics.jsonl records (`pagctl.records`): what each producer writes reads back through the
same model, types are strict, presence is lenient, and a bad line is named in one phrase."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pagctl.records import (
    KINDS,
    AlignRecord,
    AttackRecord,
    Metrics,
    ScoreDoneRecord,
    ScoreTrainRecord,
    TrainEpochRecord,
    parse_record,
)


def _line(record: object) -> str:
    return json.dumps(record.to_json(), sort_keys=True, allow_nan=False)  # type: ignore[attr-defined]


def test_an_attack_report_round_trips() -> None:
    from pagctl.protocols import PluginParams
    from pagctl.robustness.engine import run_attack
    from pagctl.testing import small_data, small_model

    class Noop:
        def __call__(self, model: torch.nn.Module, x: torch.Tensor,
                     y: torch.Tensor) -> torch.Tensor:
            return x.clone()

    class Params(PluginParams):
        eps: float = 0.1
        norm: str = "linf"

    from pagctl.data import TensorImageDataset

    model = small_model()
    x, y = small_data(12)
    report = run_attack(model, Noop(), TensorImageDataset(x, y), torch.arange(12),
                        name="noop", params=Params())
    record = report.to_record(params_given={"eps": "1/10"})
    back = parse_record(_line(record))
    assert isinstance(back, AttackRecord) and back == record
    assert back.params_given == {"eps": "1/10"} and back.norm == "linf" and back.eps == 0.1
    assert back.subset is not None and back.subset.count == 12
    assert back.per_example is not None and back.per_example.robust == \
        report.per_example["robust"]
    assert [s.name for s in back.stages or []] == ["noop"]
    assert "params_given" not in report.to_record().to_json()  # only what was set


def test_each_kind_round_trips_and_writes_its_kind() -> None:
    records = [
        TrainEpochRecord(epoch=3, epochs=5, loss=0.5, ce=0.4, pag=None, n_test=40,
                         clean_accuracy=0.9, monitor={"attack": "pgd_l2", "params": {}}),
        AlignRecord(source="nearest_neighbor", source_params={}, n=10, mean=-0.25,
                    interval=(-0.3, -0.2), per_target={"true": 0.1, "other": None},
                    subset={"count": 10, "indices_sha256": "ab", "first": 0, "last": 9}),
        ScoreTrainRecord(step=10, steps=40, loss=0.7, lr=1e-3, seconds=1.5),
        ScoreDoneRecord(steps=40, train_seconds=3.0, sample_seconds=0.5),
    ]
    for record in records:
        data = record.to_json()
        assert data["kind"] == record.kind and KINDS[data["kind"]] is type(record)
        assert parse_record(_line(record)) == record
    assert "pag" in records[0].to_json() and "alignment" not in records[0].to_json()


@pytest.mark.parametrize(("line", "problem"), [
    ('{"kind": "attack", "attack": "a", "n": true, "robust_accuracy": 0.5}',
     "attack field 'n' is true, expected a non-negative integer"),
    ('{"kind": "attack", "attack": "a", "n": 3, "robust_accuracy": "0.5"}',
     "attack field 'robust_accuracy' is \"0.5\", expected a number in [0, 1]"),
    ('{"kind": "attack", "attack": "a", "n": 3, "robust_accuracy": NaN}',
     "attack field 'robust_accuracy' is NaN, expected a number in [0, 1]"),
    ('{"kind": "align", "source": "s", "n": 3, "mean": 1.5}',
     "align field 'mean' is 1.5, expected a number in [-1, 1]"),
    ('{"kind": "align", "source": "s", "n": 3, "mean": 0.5, "interval": [0.1]}',
     "align field 'interval' is [0.1], expected [low, high] in [-1, 1]"),
    ('{"kind": "train_epoch", "epoch": -1}',
     "train_epoch field 'epoch' is -1, expected a non-negative integer"),
    ('{"kind": "attack", "attack": "a", "robust_accuracy": 0.5}', "attack record without 'n'"),
    ('{"kind": "score_train"}', "score_train record without 'step'"),
    ("{", "not valid JSON"),
    ("[1]", "a JSON list, not an object"),
    ('{"epoch": 1}', "no 'kind' field"),
    (b"\xff\xfe", "not valid UTF-8"),
])
def test_a_bad_line_is_named_in_one_phrase(line: str | bytes, problem: str) -> None:
    assert parse_record(line) == problem


def test_presence_is_lenient_and_unknown_things_are_kept() -> None:
    minimal = parse_record('{"kind": "attack", "attack": "a", "n": 3, "robust_accuracy": 0.5}')
    assert isinstance(minimal, AttackRecord) and minimal.clean_accuracy is None
    extra = parse_record('{"kind": "train_epoch", "epoch": 1, "future_field": [1, 2]}')
    assert isinstance(extra, TrainEpochRecord)
    assert extra.to_json()["future_field"] == [1, 2]
    unknown = parse_record('{"kind": "bank", "path": "x"}')
    assert unknown == {"kind": "bank", "path": "x"}


def test_what_train_writes_is_what_compare_reads(tmp_path: Path) -> None:
    from pagctl.compare.records import read_records

    run = tmp_path / "r"
    run.mkdir()
    lines = [_line(TrainEpochRecord(epoch=1, clean_accuracy=0.5, n_test=4)),
             '{"kind": "score_train", "step": 1}', _line(AlignRecord(source="s", n=2, mean=0.1))]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    records, warnings = read_records(run)
    assert warnings == []
    assert [type(r).__name__ for _, r in records] == ["TrainEpochRecord", "AlignRecord"]


def test_read_metrics_gives_models_and_names_what_it_skips(tmp_path: Path) -> None:
    """The one reader: known kinds as their models with their lines; a line that is damaged
    or breaks its model skipped with a warning; an unknown kind passed over in silence (a
    newer pagctl's record is not damage); the same warnings compare gives."""
    from pagctl.checkpoint import read_metrics
    from pagctl.compare.records import read_records

    assert read_metrics(tmp_path) == Metrics()  # no file, no records
    lines = [_line(TrainEpochRecord(epoch=1)), '{"kind": "bank", "path": "x"}', "not json",
             '{"kind": "attack", "attack": "a", "n": -1, "robust_accuracy": 0.5}',
             _line(ScoreTrainRecord(step=3, loss=0.5))]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    metrics = read_metrics(tmp_path)
    assert [(line, type(r).__name__) for line, r in metrics.entries] == \
        [(1, "TrainEpochRecord"), (5, "ScoreTrainRecord")]
    assert [r.step for r in metrics.of(ScoreTrainRecord)] == [3]
    assert metrics.of(AttackRecord) == []
    path = tmp_path / "metrics.jsonl"
    assert metrics.warnings == (
        f"warning: {path} line 3: not valid JSON; skipped",
        f"warning: {path} line 4: attack field 'n' is -1, expected a non-negative integer; "
        "skipped")
    assert read_records(tmp_path)[1] == list(metrics.warnings)


def test_read_metrics_refuses_a_file_linked_out_of_the_folder(tmp_path: Path) -> None:
    """Another run's numbers never pass for this one's: the reader refuses the link, and
    compare's view turns the refusal into its one warning."""
    from pagctl.checkpoint import read_metrics
    from pagctl.compare.records import read_records
    from pagctl.errors import CheckpointError

    other, run = tmp_path / "other", tmp_path / "run"
    other.mkdir()
    run.mkdir()
    (other / "metrics.jsonl").write_text(_line(TrainEpochRecord(epoch=1)) + "\n")
    (run / "metrics.jsonl").symlink_to(other / "metrics.jsonl")
    with pytest.raises(CheckpointError, match="a symbolic link out of the run folder"):
        read_metrics(run)
    records, warnings = read_records(run)
    assert records == [] and len(warnings) == 1
    assert warnings[0].endswith("; its metrics are skipped")


def test_trim_keeps_what_this_version_cannot_read(tmp_path: Path) -> None:
    """A resumed run drops the records after its saved state and the damaged lines, but
    keeps, as they are, lines of unknown kinds and records this version would refuse."""
    from pagctl.checkpoint import RunFolder
    from pagctl.spec import load_spec

    spec = load_spec("digits-vanilla", ["train.epochs=3"], {"out_dir": tmp_path / "r"})
    folder = RunFolder(spec, command="train", resume=False, overwrite=False)
    folder.path.mkdir()
    unknown = {"kind": "bank", "path": "x"}
    refused = {"kind": "train_epoch", "epoch": "two"}
    lines = [_line(TrainEpochRecord(epoch=1)), json.dumps(unknown), "not json",
             json.dumps(refused), _line(TrainEpochRecord(epoch=2))]
    (folder.path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    folder.trim_metrics(lambda r: r.get("kind") != "train_epoch" or r.get("epoch") != 2)
    kept = [json.loads(line) for line in (folder.path / "metrics.jsonl").read_text()
            .splitlines()]
    assert kept == [TrainEpochRecord(epoch=1).to_json(), unknown, refused]
