"""Train and measure what a study is missing (`run_study`).

In order: the score model (when SBG runs are planned), every run (finished ones skipped,
interrupted ones resumed, `pagctl.grid.run_status`), then for every run each planned
AutoAttack and the alignment score, each skipped when the run's metrics.jsonl already holds
it for the same attack, parameters, points and weights. So the same command, run again,
finishes an interrupted study, and a finished study costs nothing but the report.

What counts as "already holds" is decided in one place (`study_records`), which the report
reads through too: records are read through the validated record models
(`pagctl.compare.records.read_records`), so a line that is damaged or contradicts itself (a
hand-edited accuracy beside unedited per-point bits) is skipped with a warning, as if the
measurement were missing, and is measured again; and a measurement is the study's only when
it names the study's points by both digests, of their indices and of their images
(`Points`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pagctl.records import AlignRecord, AttackRecord, ScoreDoneRecord, TrainEpochRecord
from pagctl.study.plan import Measure, Study, StudyRun

if TYPE_CHECKING:
    from pagctl.compare.records import Usable


def run_spec(study: Study, out: Path, run: StudyRun) -> Any:
    """The run's validated RunSpec, its folder under ``out``."""
    from pagctl.spec import load_spec

    return load_spec(run.spec, [*run.overrides, *study.overrides],
                     {"out_dir": study.run_dir(out, run.name)})


def attack_params(study: Study, norm: str, eps: float) -> dict[str, Any]:
    """The AutoAttack params of one measurement (what its record carries)."""
    return {**study.attack_params, "norm": norm, "eps": eps}


def run_study(study: Study, out: Path, *, device: str = "cpu",
              log: Callable[[str], None] = print,
              part: tuple[int, int] | None = None) -> float:
    """Train and measure what is missing under ``out``; returns the seconds spent. ``part=(i,
    N)``: only the runs at positions ``k % N == i`` (a worker of `run_parallel`; the score
    model must exist). SpecError naming ``--out`` when ``out`` cannot hold the study."""
    from pagctl.errors import SpecError

    problem = out_problem(out)
    if problem is not None:
        raise SpecError(problem)
    start = time.perf_counter()
    if part is None and any(run.source == "sbg" for run in study.runs.values()):
        _score_model(study, out, device, log)
    total = len(study.runs)
    mine = [(i, run) for i, run in enumerate(study.runs.values(), 1)
            if part is None or (i - 1) % part[1] == part[0]]
    for i, run in mine:
        _train(study, out, run, device, f"[{i}/{total}] {run.name}", log)
    for i, run in mine:
        _measure(study, out, run, device, f"[{i}/{total}] {run.name}", log)
    return time.perf_counter() - start


def run_parallel(study: Study, out: Path, jobs: int, *, device: str = "cpu",
                 log: Callable[[str], None] = print) -> float:
    """`run_study` in ``jobs`` worker processes of one thread each (after the score model,
    which they share): worker i takes the runs ``k % jobs == i``. A Ctrl-C or SIGTERM stops
    them all (each saves its state); RuntimeError when a worker fails."""
    import os
    import signal
    import subprocess
    import sys

    start = time.perf_counter()
    if any(run.source == "sbg" for run in study.runs.values()):
        _score_model(study, out, device, log)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen(
        [sys.executable, "-m", "pagctl.study", "--out", str(out), "--device", device,
         "--worker", f"{i}/{jobs}", *(["--quick"] if study.quick else [])], env=env)
        for i in range(jobs)]
    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)  # a scheduler's stop reaches the workers
    try:
        codes = [w.wait() for w in workers]
    except BaseException:
        for w in workers:
            w.terminate()  # SIGTERM: each saves its state and stops
        for w in workers:
            w.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    if any(code == 130 for code in codes):
        raise KeyboardInterrupt
    failed = [i for i, code in enumerate(codes) if code != 0]
    if failed:
        raise RuntimeError(f"study worker(s) {', '.join(map(str, failed))} of {jobs} failed "
                           "(their errors are above); run the same command again to go on")
    return time.perf_counter() - start


def write_problem(path: Path) -> str | None:
    """Why nothing can be created at ``path`` (a file or folder, or an existing file replaced
    by renaming a new one beside it, as `pagctl.checkpoint.atomic_path` does): its nearest
    existing ancestor is a file, or takes no new entry. None when it can.

    Probed by opening an anonymous temporary file in that ancestor, which leaves nothing
    behind: permission bits do not give the answer for root, ACLs, read-only mounts or
    /proc, and asking before the work beats failing after hours of training."""
    import tempfile

    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return f"{folder} takes no new file ({exc.strerror or exc})"
    return None


def out_problem(out: Path, *, report_only: bool = False) -> str | None:
    """Why ``out`` cannot be the study's folder, as one line naming ``--out`` and the fix:
    it is a file, or cannot be written (``report_only``: it does not exist, since then
    nothing is written into it). None when it can."""
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file; give the study's folder (a new one, or one it wrote)"
    if report_only:
        if not out.is_dir():
            return (f"--out {out} does not exist; give the folder the study wrote, or run the "
                    "study without --report-only")
        return None
    problem = write_problem(out / "runs" / "run")  # the deepest folder that may exist
    if problem is not None:
        return f"--out {out} cannot be written: {problem}; give a folder you can write"
    return None


def score_done(folder: Path) -> ScoreDoneRecord | None:
    """The last ``score_done`` record of a score model's metrics.jsonl, read by the file's
    one reader (`pagctl.checkpoint.read_metrics`: a damaged or ill-typed line is passed
    over); None without one, or when the file cannot be read or links out of the folder:
    the model is then trained again, or resumed."""
    from pagctl.checkpoint import read_metrics
    from pagctl.errors import CheckpointError

    try:
        done = read_metrics(folder).of(ScoreDoneRecord)
    except CheckpointError:
        return None
    return done[-1] if done else None


def _score_model(study: Study, out: Path, device: str, log: Callable[[str], None]) -> None:
    from pagctl.score.spec import load_score_spec
    from pagctl.score.train import train_score

    folder = study.score_dir(out)
    if score_done(folder) is not None:
        log(f"score model: done before ({folder})")
        return
    spec = load_score_spec("score-digits", list(study.score_overrides), {"out_dir": folder})
    resume = (folder / "state.safetensors").is_file()
    log(f"score model: {'resuming' if resume else 'training'} {folder}")
    result = train_score(spec, device=device, progress=False, resume=resume,
                         overwrite=not resume)
    if result.interrupted:
        raise KeyboardInterrupt


def _train(study: Study, out: Path, run: StudyRun, device: str, head: str,
           log: Callable[[str], None]) -> None:
    from pagctl.errors import SpecError
    from pagctl.grid import folder_problem, run_status
    from pagctl.train import train

    spec = run_spec(study, out, run)
    problem = folder_problem(spec)
    if problem is not None:
        raise SpecError(f"study run {run.name}: {problem}; delete it, or give another --out")
    status = run_status(spec)
    if status == "finished":
        log(f"{head}: trained before")
        return
    log(f"{head}: {'resuming' if status == 'partial' else 'training'}")
    result = train(spec, device=device, resume=status == "partial",
                   overwrite=status == "unsaved", progress=False)
    if result.interrupted:
        raise KeyboardInterrupt


def _without_grouping(params: dict[str, Any]) -> dict[str, Any]:
    """Attack params less ``runs_together``, which changes the cost, not the algorithm."""
    return {k: v for k, v in params.items() if k != "runs_together"}


def study_attack_params(study: Study, measure: Measure) -> dict[str, Any]:
    """Every validated AutoAttack param of one measurement, defaults included, as its record
    holds them (less ``runs_together``)."""
    from pagctl import registry

    validated = registry.attacks.validate_params(
        "autoattack", attack_params(study, measure.norm, measure.eps), "attack")
    return _without_grouping(validated.model_dump(mode="json"))


def find_measurement(records: Sequence[Usable], study: Study, measure: Measure,
                     at: Points) -> AttackRecord | None:
    """The last attack record that is this measurement exactly: AutoAttack with the same
    params (every one, defaults included), seed 0, the run's last weights in float32, on the
    points ``at`` (the first n test points, by the digests of their indices and of their
    images), with the counts, interval and per-point bits the report reads. A record of the
    same norm and ε made any other way (fewer steps, other points or images, the best
    weights, or by a version that did not digest the images) is not the study's and is
    never reused; ``records`` hold only lines that bear themselves out (`study_records`)."""
    params = study_attack_params(study, measure)
    for record in reversed(records):
        if not isinstance(record, AttackRecord):
            continue
        subset, bits = record.subset, record.per_example
        if (record.attack == "autoattack" and record.params is not None
                and _without_grouping(record.params) == params
                and record.n == at.n and record.seed == 0
                and subset is not None and subset.indices_sha256 == at.indices_sha256
                and subset.data_sha256 == at.data_sha256
                and record.weights in (None, "last") and record.precision in (None, "float32")
                and record.clean_correct is not None and record.robust_correct is not None
                and record.robust_interval is not None
                and bits is not None and bits.robust is not None):
            return record
    return None


def study_align_params(study: Study) -> dict[str, Any]:
    """The alignment source's validated params (all defaults), as its record holds them."""
    from pagctl import registry

    return registry.target_gradients.validate_params(
        study.align_source, {}, "source").model_dump(mode="json")


def find_alignment(records: Sequence[Usable], study: Study, at: Points) -> AlignRecord | None:
    """The last align record that is the study's alignment: its source with default params,
    all ``at.classes`` target classes, seed 0, the last weights, on the points ``at`` (both
    digests), with a score per point."""
    params = study_align_params(study)
    for record in reversed(records):
        if not isinstance(record, AlignRecord):
            continue
        subset = record.subset
        if (record.source == study.align_source and record.source_params == params
                and record.n == at.n and record.classes_per_image == at.classes
                and record.seed == 0
                and subset is not None and subset.indices_sha256 == at.indices_sha256
                and subset.data_sha256 == at.data_sha256
                and record.weights in (None, "last")
                and record.per_image is not None and len(record.per_image) == at.n):
            return record
    return None


@dataclass(frozen=True)
class RunRecords:
    """What one run folder holds for the study (`study_records`): the points it is measured
    on, every usable record in file order, one warning per line skipped (damaged, or
    contradicting itself), and the study's measurements among the records."""

    points: Points
    records: list[Usable]
    warnings: list[str]
    attacks: dict[Measure, AttackRecord]
    alignment: AlignRecord | None

    @property
    def epochs(self) -> list[TrainEpochRecord]:
        return [r for r in self.records if isinstance(r, TrainEpochRecord)]


def study_records(study: Study, out: Path, run: StudyRun) -> RunRecords:
    """Read ``run``'s folder through the record models (`pagctl.compare.records.read_records`,
    which never raises) and find the study's measurements in it: what `run_study` skips and
    the report shows are one and the same."""
    from pagctl.compare.records import read_records

    at = points(study, out, run)
    pairs, warnings = read_records(study.run_dir(out, run.name))
    records = [record for _, record in pairs]
    attacks = {}
    for measure in study.measures:
        found = find_measurement(records, study, measure, at)
        if found is not None:
            attacks[measure] = found
    return RunRecords(at, records, warnings, attacks, find_alignment(records, study, at))


def _measure(study: Study, out: Path, run: StudyRun, device: str, head: str,
             log: Callable[[str], None]) -> None:
    from pagctl import api

    folder = study.run_dir(out, run.name)
    held = study_records(study, out, run)
    for warning in held.warnings:  # a skipped study measurement is measured again below
        log(f"{head}: {warning}")
    for measure in study.measures:
        if measure in held.attacks:
            continue
        log(f"{head}: {measure.label}")
        report = api.attack(str(folder), attack="autoattack",
                            params=attack_params(study, measure.norm, measure.eps),
                            limit=study.limit, device=device, probes=not study.quick)
        api.record(folder, report)
    if held.alignment is None:
        log(f"{head}: alignment with {study.align_source}")
        score = api.align_score(str(folder), source=study.align_source, limit=study.limit,
                                classes_per_image=held.points.classes, device=device)
        assert score is not None
        api.record(folder, score, params_given={})


@dataclass(frozen=True)
class Points:
    """The test points the study measures a run on, named as a record names them: the
    first ``n`` of its data's test set, by the digest of their indices
    (``indices_sha256``, `pagctl.stats.first_n_digest`) and of their images and labels
    (``data_sha256``, `pagctl.data.subset_digest`); ``classes``: how many classes the data
    has. Two measurements are of the same points only when both digests agree: the same
    indices of another split, test fraction or data folder are other images."""

    n: int
    classes: int
    indices_sha256: str
    data_sha256: str


_POINTS: dict[str, Points] = {}


def points(study: Study, out: Path, run: StudyRun) -> Points:
    """The points the study measures ``run`` on: its test set, or ``limit`` of it. Computed
    once per distinct data spec and limit in a process (the data is loaded and its n images
    digested; every run of one dataset shares the answer)."""
    import torch

    from pagctl.data import load_data, subset_digest
    from pagctl.stats import first_n_digest

    data = run_spec(study, out, run).data
    key = f"{study.limit}|{data.model_dump_json()}"
    if key not in _POINTS:
        bundle = load_data(data)
        total = len(bundle.test)  # type: ignore[arg-type]
        n = min(total, study.limit) if study.limit is not None else total
        _POINTS[key] = Points(n, bundle.num_classes, first_n_digest(n),
                              subset_digest(bundle.test, torch.arange(n)))
    return _POINTS[key]
