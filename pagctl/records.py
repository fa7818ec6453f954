"""The records of ``metrics.jsonl``: one pydantic model per kind, the file's one schema.

Producers build a record from these models and append its JSON
(`pagctl.checkpoint.append_record`); `pagctl.compare` reads every line back through the same
models (`parse_record`). Kinds:

| kind | written by | one per |
|---|---|---|
| ``train_epoch`` (`TrainEpochRecord`) | ``pagctl train`` | training epoch |
| ``attack`` (`AttackRecord`) | ``pagctl attack`` | attack (per ε of a sweep) |
| ``align`` (`AlignRecord`) | ``pagctl align-score`` | alignment score |
| ``score_train`` (`ScoreTrainRecord`) | ``pagctl train-score`` | ``train.log_every`` steps |
| ``score_done`` (`ScoreDoneRecord`) | ``pagctl train-score`` | finished score run |
| ``import`` (`ImportRecord`) | ``pagctl import`` | model brought in from elsewhere |

Reading is strict about types (a string is not a number, ``true`` is not a count, no NaN)
and lenient about presence: the fields a reader cannot do without are required, the others
may be missing (records written by hand, or by older versions), and unknown fields are kept.
This module is the file's one parser: `split_lines` recovers an intact record that an
append continued on a damaged line, `json_object` decodes a line, `parse_record` validates
it, and `parse_metrics` reads a whole file into `Metrics` (every reader goes through it:
`pagctl.checkpoint.read_metrics`, and through that compare and the study). A line that
fails is described in one phrase and skipped with a warning; a line of a kind this version
does not know is passed over in silence (see `parse_metrics`). Writing is
`pagctl.checkpoint.append_record` (whole lines, finite numbers). Importing this module
imports neither torch nor numpy.
"""

from __future__ import annotations

import json
import math
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = ["AlignRecord", "AttackRecord", "ClassCounts", "ImportRecord", "KINDS", "Metrics",
           "PerExample", "Record", "Reliability", "ScoreDoneRecord", "ScoreTrainRecord",
           "StageRecord", "Subset", "TrainEpochRecord", "json_object", "non_finite",
           "parse_metrics", "parse_record", "split_lines"]


class _Expect:
    """What a field holds, in words, for the message about a line that breaks it."""

    def __init__(self, text: str) -> None:
        self.text = text


Count = Annotated[int, Field(ge=0), _Expect("a non-negative integer")]
Integer = Annotated[int, _Expect("an integer")]
Number = Annotated[float, Field(allow_inf_nan=False), _Expect("a finite number")]
Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False), _Expect("a non-negative number")]
Prob = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False), _Expect("a number in [0, 1]")]
Cos = Annotated[float, Field(ge=-1 - 1e-6, le=1 + 1e-6, allow_inf_nan=False),
                _Expect("a number in [-1, 1]")]
ProbPair = Annotated[tuple[Prob, Prob], _Expect("[low, high] in [0, 1]")]
CosPair = Annotated[tuple[Cos, Cos], _Expect("[low, high] in [-1, 1]")]
Params = Annotated[dict[str, Any], _Expect("an object")]


class _Model(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    def to_json(self) -> dict[str, Any]:
        """The JSON object of the line: its ``kind`` and the fields the producer set."""
        data = self.model_dump(mode="json", exclude_unset=True)
        kind = getattr(self, "kind", None)
        return {"kind": kind, **data} if kind is not None else data


class Subset(_Model):
    """Which test points: their count, the digest of their indices
    (`pagctl.stats.subset_record`) and the digest of their images and labels
    (``data_sha256``, `pagctl.data.subset_digest`; absent in records of earlier versions).
    Two measurements are of the same points only when both digests agree."""

    count: Count | None = None
    indices_sha256: str = ""
    data_sha256: str | None = None
    first: Integer | None = None
    last: Integer | None = None


class StageRecord(_Model):
    """What one stage of an attack did: points attacked and broken, passes (one per
    example) and time. The engine counts into it as the stage runs (`pagctl.robustness`)."""

    name: str
    attacked: Count = 0
    broke: Count = 0
    forwards: Count = 0
    backwards: Count = 0
    seconds: Seconds = 0.0


class PerExample(_Model):
    """Which points were correct, as `pagctl.stats.pack_bits` hex strings."""

    clean: str | None = None
    robust: str | None = None


class ClassCounts(_Model):
    """One true class of an attacked subset: its points, and how many were correct clean and
    under attack."""

    n: Count
    clean_correct: Count
    robust_correct: Count


class Reliability(_Model):
    """The gradient-masking probes' verdict (`pagctl.robustness.reliability.Verdict`)."""

    reliable: bool | None = None
    reasons: list[str] = Field(default_factory=list)
    probes: Params = Field(default_factory=dict)


class TrainEpochRecord(_Model):
    """One training epoch: the loss terms, what its steps cost and, when evaluated, the
    per-epoch monitor on the first ``n_test`` test points (clean accuracy, robust accuracy
    under ``monitor``, mean alignment with ``eval.align_source``) and on the ``n_val``
    validation images. ``best`` marks the epochs whose weights became model-best.

    Cost (`pagctl.train.StepCost`): ``passes_per_image`` maps each phase (attack, pag, step)
    to its forward and backward passes per training image; ``attack_seconds``,
    ``pag_seconds`` and ``step_seconds`` are the phases' wall times over the epoch (the
    slowest process's, under torchrun). ``processes``: how many processes trained the epoch
    (torchrun's world size; absent for one)."""

    kind: Literal["train_epoch"] = "train_epoch"
    epoch: Count
    epochs: Count | None = None
    lr: Number | None = None
    pag_weight: Number | None = None
    loss: Number | None = None
    ce: Number | None = None
    pag: Number | None = None
    objective: str | None = None
    robust: Number | None = None
    train_accuracy: Prob | None = None
    train_adv_accuracy: Prob | None = None
    train_seconds: Seconds | None = None
    passes_per_image: Params | None = None
    attack_seconds: Seconds | None = None
    pag_seconds: Seconds | None = None
    step_seconds: Seconds | None = None
    n_test: Count | None = None
    data_sha256: str | None = None
    """The digest of the ``n_test`` test images and labels the monitor measured
    (`pagctl.data.subset_digest`)."""
    clean_accuracy: Prob | None = None
    robust_accuracy: Prob | None = None
    monitor: Params | None = None
    alignment: Cos | None = None
    n_val: Count | None = None
    val_clean_accuracy: Prob | None = None
    val_robust_accuracy: Prob | None = None
    best: bool | None = None
    eval_seconds: Seconds | None = None
    processes: Count | None = None


class AttackRecord(_Model):
    """One attack on one subset: clean and robust accuracy with 95% Wilson intervals, the
    budget, what each stage did and cost, per-example bits and the reliability verdict."""

    kind: Literal["attack"] = "attack"
    attack: str
    weights: str | None = None
    params: Params | None = None
    params_given: Params | None = None
    n: Count
    clean_correct: Count | None = None
    robust_correct: Count | None = None
    clean_accuracy: Prob | None = None
    robust_accuracy: Prob
    clean_interval: ProbPair | None = None
    robust_interval: ProbPair | None = None
    norm: str | None = None
    eps: Number | None = None
    max_l2: Number | None = None
    max_linf: Number | None = None
    max_l1: Number | None = None
    max_l0: Number | None = None
    """The most pixels changed in one point (a pixel counts once, whatever its channels);
    absent in records written before pagctl measured it."""
    pixel_min: Number | None = None
    pixel_max: Number | None = None
    nan_count: Count | None = None
    forwards: Count | None = None
    backwards: Count | None = None
    seconds: Seconds | None = None
    stages: list[StageRecord] | None = None
    subset: Subset | None = None
    seed: Integer | None = None
    per_example: PerExample | None = None
    per_class: dict[str, ClassCounts] | None = None
    reliability: Reliability | None = None
    precision: str | None = None
    """``bfloat16`` when the model ran under bfloat16 autocast (opt-in); absent: float32."""
    model_sha256: str | None = None
    """The digest of the weights (and normalisation) measured (`pagctl.stats.model_digest`):
    a record enters only the run folder whose weights have it."""

    @model_validator(mode="after")
    def _summary_matches_the_bits(self) -> AttackRecord:
        """The counts, accuracies and stage tallies agree with the per-point bits: a
        hand-edited summary beside unedited bits (or the reverse) is not a measurement."""
        n = self.n
        if self.subset is not None and self.subset.count is not None and self.subset.count != n:
            raise ValueError(f"its subset has {self.subset.count} points but n is {n}")
        clean = _bits("clean", self.per_example.clean if self.per_example else None, n)
        robust = _bits("robust", self.per_example.robust if self.per_example else None, n)
        if clean is not None and robust is not None and robust & ~clean:
            raise ValueError("a point is robust but not classified correctly clean")
        for what, bits, count in (("clean", clean, self.clean_correct),
                                  ("robust", robust, self.robust_correct)):
            if bits is not None and count is not None and bits.bit_count() != count:
                raise ValueError(f"{what}_correct is {count} but its per-example bits count "
                                 f"{bits.bit_count()}")
        for what, count, value in (("clean", self.clean_correct, self.clean_accuracy),
                                   ("robust", self.robust_correct, self.robust_accuracy)):
            if count is not None and value is not None and n and abs(count / n - value) > 1e-9:
                raise ValueError(f"{what}_accuracy is {value} but {what}_correct / n is "
                                 f"{count}/{n}")
        for what, value, interval in (
                ("clean", self.clean_accuracy, self.clean_interval),
                ("robust", self.robust_accuracy, self.robust_interval)):
            if value is not None and interval is not None and \
                    not interval[0] - 1e-9 <= value <= interval[1] + 1e-9:
                raise ValueError(f"its {what}_interval {list(interval)} does not hold its "
                                 f"{what}_accuracy {value}")
        if self.clean_correct is not None and self.robust_correct is not None:
            if not self.robust_correct <= self.clean_correct <= n:
                raise ValueError("expected robust_correct <= clean_correct <= n")
            if self.stages and sum(st.broke for st in self.stages) != \
                    self.clean_correct - self.robust_correct:
                raise ValueError("its stages broke another number of points than clean_correct "
                                 "- robust_correct")
        if self.per_class is not None and self.clean_correct is not None \
                and self.robust_correct is not None:
            totals = [sum(getattr(c, k) for c in self.per_class.values())
                      for k in ("n", "clean_correct", "robust_correct")]
            if totals != [n, self.clean_correct, self.robust_correct]:
                raise ValueError("its per-class counts do not add up to n, clean_correct and "
                                 "robust_correct")
        return self


class AlignRecord(_Model):
    """One alignment score: the mean cosine of ∇ₓ log p(t|x) with a source's g(x, t) and its
    95% interval, per true class and per target kind."""

    kind: Literal["align"] = "align"
    source: str
    weights: str | None = None
    source_params: Params | None = None
    params_given: Params | None = None
    n: Count
    classes_per_image: Count | None = None
    mean: Cos
    interval: CosPair | None = None
    fraction_positive: Prob | None = None
    per_true_class: dict[str, float] | None = None
    per_target: dict[str, float | None] | None = None
    subset: Subset | None = None
    seed: Integer | None = None
    seconds: Seconds | None = None
    per_image: list[Cos] | None = None
    """Each scored image's mean cosine over its K targets, in subset order (6 decimals):
    what a bootstrap over test points resamples."""
    model_sha256: str | None = None
    """As `AttackRecord.model_sha256`."""

    @model_validator(mode="after")
    def _summary_matches_the_images(self) -> AlignRecord:
        """The mean agrees with the per-image cosines it summarises."""
        if self.subset is not None and self.subset.count is not None \
                and self.subset.count != self.n:
            raise ValueError(f"its subset has {self.subset.count} points but n is {self.n}")
        if self.per_image is not None:
            if len(self.per_image) != self.n:
                raise ValueError(f"per_image holds {len(self.per_image)} values but n is "
                                 f"{self.n}")
            if self.n and abs(sum(self.per_image) / self.n - self.mean) > 1e-5:
                raise ValueError(f"mean is {self.mean} but its per-image cosines average "
                                 f"{sum(self.per_image) / self.n:.6f}")
        if self.interval is not None and \
                not self.interval[0] - 1e-9 <= self.mean <= self.interval[1] + 1e-9:
            raise ValueError(f"its interval {list(self.interval)} does not hold its mean "
                             f"{self.mean}")
        return self


class ScoreTrainRecord(_Model):
    """Score-model training: the mean loss over the last ``train.log_every`` steps."""

    kind: Literal["score_train"] = "score_train"
    step: Count
    steps: Count | None = None
    loss: Number | None = None
    lr: Number | None = None
    seconds: Seconds | None = None


class ScoreDoneRecord(_Model):
    """A finished score run: training and sampling time."""

    kind: Literal["score_done"] = "score_done"
    steps: Count
    train_seconds: Seconds | None = None
    sample_seconds: Seconds | None = None


class ImportRecord(_Model):
    """A model pagctl did not train, brought into the run folder by ``pagctl import``: where
    its weights came from (``checkpoint`` and its SHA-256, None when the architecture's
    factory made them), how they were read (``format``: safetensors or pickle, ``container``:
    the key of a checkpoint dict that held them, ``stripped_prefix``), the normalisation put
    in front of it (``mean``, ``std``, and where they came from), the resize taken from
    timm's configuration (``resize``, None when none was), and a first check on the first
    ``n_check`` test points (``check_accuracy``). When the normalisation was not given but
    chosen by default, ``normalisation_check`` holds the check under each normalisation
    that could apply (`pagctl.importing.check_normalisations`): objects with ``source``
    (none, dataset, timm), ``mean``, ``std``, ``accuracy`` and ``used``. ``zoo``: for a
    RobustBench zoo entry, its ``source`` (robustbench), ``name``, ``dataset``,
    ``threat_model`` and the ``model_dir`` its weights were read from (None when
    ``--checkpoint`` gave them); absent otherwise."""

    kind: Literal["import"] = "import"
    arch: str
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    format: str | None = None
    container: str | None = None
    stripped_prefix: str | None = None
    normalisation: str | None = None
    resize: str | None = None
    mean: list[Number] | None = None
    std: list[Number] | None = None
    n_check: Count | None = None
    check_accuracy: Prob | None = None
    normalisation_check: list[Params] | None = None
    zoo: Params | None = None


def _bits(what: str, text: str | None, n: int) -> int | None:
    """A per-example bit string (`pagctl.stats.pack_bits`) as an int; ValueError when it is
    not n points' worth of hex with zero padding."""
    if text is None:
        return None
    if len(text) != 2 * (-(-n // 8)):
        raise ValueError(f"per_example.{what} holds {len(text)} hex digits, not the "
                         f"{2 * (-(-n // 8))} of {n} points")
    try:
        value = int(text, 16) if text else 0
    except ValueError:
        raise ValueError(f"per_example.{what} is not hexadecimal") from None
    pad = 4 * len(text) - n
    if value & ((1 << pad) - 1):
        raise ValueError(f"per_example.{what} sets bits past its {n} points")
    return value >> pad


Record = (TrainEpochRecord | AttackRecord | AlignRecord | ScoreTrainRecord | ScoreDoneRecord
          | ImportRecord)
KINDS: dict[str, type[_Model]] = {
    "train_epoch": TrainEpochRecord, "attack": AttackRecord, "align": AlignRecord,
    "score_train": ScoreTrainRecord, "score_done": ScoreDoneRecord, "import": ImportRecord}


def _expectation(annotation: Any) -> str | None:
    """The `_Expect` text inside a (possibly Optional, Annotated) field annotation."""
    for meta in getattr(annotation, "__metadata__", ()):
        if isinstance(meta, _Expect):
            return meta.text
    for arg in typing.get_args(annotation):
        found = _expectation(arg)
        if found is not None:
            return found
    return None


def _described(kind: str, model: type[_Model], data: dict[str, Any],
               exc: ValidationError) -> str:
    err = exc.errors()[0]
    if not err["loc"]:  # a check of the whole record (`AttackRecord._summary_matches_the_bits`)
        return f"{kind} record that contradicts itself: " + \
            str(err["msg"]).removeprefix("Value error, ")
    name = str(err["loc"][0])
    if err["type"] == "missing" and len(err["loc"]) == 1:
        return f"{kind} record without '{name}'"
    info = model.model_fields.get(name)
    expected = None
    if info is not None:
        expected = next((m.text for m in info.metadata if isinstance(m, _Expect)),
                        _expectation(info.annotation))
    expected = expected or err["msg"].lower()
    shown = json.dumps(data.get(name))[:40]
    return f"{kind} field '{name}' is {shown}, expected {expected}"


def json_object(raw: bytes | str) -> dict[str, Any] | str:
    """One line of metrics.jsonl as the JSON object it holds, or a phrase saying why it
    holds none ("not valid UTF-8", "not valid JSON", "a JSON list, not an object"). The
    first step of `parse_record`; on its own, what a rewrite of the file keeps
    (`pagctl.checkpoint.RunFolder.trim_metrics`: lines this version cannot validate are
    still someone's data)."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        return "not valid UTF-8"
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return "not valid JSON"
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}, not an object"
    return data


def parse_record(raw: bytes | str) -> Record | dict[str, Any] | str:
    """One line of metrics.jsonl: its record (a plain dict for a kind this version does not
    know), or a phrase saying why it cannot be used ("not valid JSON", "attack field 'n' is
    -1, expected a non-negative integer", ...)."""
    data = json_object(raw)
    if isinstance(data, str):
        return data
    kind = data.get("kind")
    if not isinstance(kind, str):
        return "no 'kind' field"
    model = KINDS.get(kind)
    if model is None:
        return data
    try:
        return model.model_validate_json(raw)  # type: ignore[return-value]
    except ValidationError as exc:
        return _described(kind, model, data, exc)


RecordT = TypeVar("RecordT", bound=_Model)


@dataclass(frozen=True)
class Metrics:
    """One metrics.jsonl read through the record models (`parse_metrics`): its records with
    their line numbers, and a warning per line that could not be used."""

    entries: tuple[tuple[int, Record], ...] = ()
    """(line number, record) of every usable line, in file order. Lines count from 1; an
    intact record recovered after a damaged part (`split_lines`) has that line's number."""
    warnings: tuple[str, ...] = ()
    """``warning: PATH line N: WHY; skipped``, one per line skipped, in file order."""

    @property
    def records(self) -> list[Record]:
        """Every usable record, in file order."""
        return [record for _, record in self.entries]

    def of(self, kind: type[RecordT]) -> list[RecordT]:
        """The records of one model (``of(TrainEpochRecord)``: the training epochs), in
        file order."""
        return [record for _, record in self.entries if isinstance(record, kind)]


def parse_metrics(data: bytes, path: Path) -> Metrics:
    """The contents of the metrics.jsonl at ``path`` (named in the warnings), line by line
    (`split_lines`, `parse_record`).

    - A record of a known kind that validates is kept, with its line number.
    - A line that is not a usable record (not UTF-8, not JSON, not an object, no ``kind``, a
      known kind with a field of the wrong type or out of range, or a record that
      contradicts itself) is skipped with a warning naming the file, the line and why in
      one phrase: it is damage or a hand edit, and whoever reads the numbers should know
      that some are missing.
    - A line of a kind this version does not know is passed over in silence: it is no
      damage but a record of a newer pagctl or another tool, with nothing here to read it
      (it stays in the file). A warning for it would tell every reader of an older pagctl
      that its folders are broken when they are not.
    """
    entries: list[tuple[int, Record]] = []
    warnings: list[str] = []
    for number, raw in split_lines(data):
        record = parse_record(raw)
        if isinstance(record, str):
            warnings.append(f"warning: {path} line {number}: {record}; skipped")
        elif not isinstance(record, dict):
            entries.append((number, record))
    return Metrics(tuple(entries), tuple(warnings))


_MAX_CANDIDATES = 256
"""Start positions tried when recovering a record from the end of a damaged line."""


def split_lines(data: bytes) -> Iterator[tuple[int, bytes]]:
    """The non-empty lines of metrics.jsonl with their 1-based numbers. A line that is not
    valid JSON but ends in an intact JSON object (a partial record, from a full disk or a
    hand edit, that the next append continued on the same line) is split in two: the
    damaged part, then the intact record, both with the line's number."""
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        damaged, intact = _recover(raw)
        if damaged:
            yield number, damaged
        if intact:
            yield number, intact


def _loads_object(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw), dict)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError
        return False


def _recover(raw: bytes) -> tuple[bytes, bytes]:
    """(damaged part, intact record) of one line; the whole line is one or the other when
    it cannot be split."""
    try:
        json.loads(raw)
        return b"", raw
    except (ValueError, RecursionError):
        pass
    start, tried = raw.find(b'{"', 1), 0
    while start > 0 and tried < _MAX_CANDIDATES:
        if _loads_object(raw[start:]):
            return raw[:start], raw[start:]
        start, tried = raw.find(b'{"', start + 1), tried + 1
    return raw, b""


def non_finite(value: Any, path: str = "") -> str | None:
    """The dotted path of the first infinite or NaN number in a JSON-ready value, or None.
    JSON has no such numbers; a record holding one comes from a model whose outputs are not
    finite."""
    if isinstance(value, float) and not math.isfinite(value):
        return path or "(the record)"
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = non_finite(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None
