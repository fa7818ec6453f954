"""Train and measure what a study is missing (`run_study`).

In order: the score model (when SBG runs are planned), every run (finished ones skipped,
interrupted ones resumed, `pagctl.grid.run_status`), then for every run each planned
AutoAttack and the alignment score, each skipped when the run's metrics.jsonl already holds
it for the same attack, parameters, points and weights. So the same command, run again,
finishes an interrupted study, and a finished study costs nothing but the report.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pagctl.study.plan import Measure, Study, StudyRun


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
    model must exist)."""
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


def _score_model(study: Study, out: Path, device: str, log: Callable[[str], None]) -> None:
    from pagctl.checkpoint import read_metrics
    from pagctl.score.spec import load_score_spec
    from pagctl.score.train import train_score

    folder = study.score_dir(out)
    if any(r.get("kind") == "score_done" for r in read_metrics(folder)) \
            if folder.is_dir() else False:
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


def find_measurement(records: list[dict[str, Any]], study: Study, measure: Measure,
                     n: int) -> dict[str, Any] | None:
    """The last attack record that is this measurement exactly: AutoAttack with the same
    params (every one, defaults included), seed 0, the run's last weights in float32, on the
    first ``n`` test points. A record of the same norm and ε made any other way (fewer
    steps, other points, the best weights) is not the study's and is never reused."""
    from pagctl.stats import first_n_digest

    params = study_attack_params(study, measure)
    digest = first_n_digest(n)
    for record in reversed(records):
        if (record.get("kind") == "attack" and record.get("attack") == "autoattack"
                and isinstance(record.get("params"), dict)
                and _without_grouping(record["params"]) == params
                and record.get("n") == n and record.get("seed") == 0
                and (record.get("subset") or {}).get("indices_sha256") == digest
                and record.get("weights") in (None, "last")
                and record.get("precision") in (None, "float32")):
            found: dict[str, Any] = record
            return found
    return None


def study_align_params(study: Study) -> dict[str, Any]:
    """The alignment source's validated params (all defaults), as its record holds them."""
    from pagctl import registry

    return registry.target_gradients.validate_params(
        study.align_source, {}, "source").model_dump(mode="json")


def find_alignment(records: list[dict[str, Any]], study: Study, n: int,
                   classes: int) -> dict[str, Any] | None:
    """The last align record that is the study's alignment: its source with default params,
    all ``classes`` target classes, seed 0, on the first ``n`` test points, with a score
    per point."""
    from pagctl.stats import first_n_digest

    params = study_align_params(study)
    digest = first_n_digest(n)
    for record in reversed(records):
        if (record.get("kind") == "align" and record.get("source") == study.align_source
                and record.get("source_params") == params and record.get("n") == n
                and record.get("classes_per_image") == classes and record.get("seed") == 0
                and (record.get("subset") or {}).get("indices_sha256") == digest
                and record.get("weights") in (None, "last")
                and len(record.get("per_image") or []) == n):
            found: dict[str, Any] = record
            return found
    return None


def _measure(study: Study, out: Path, run: StudyRun, device: str, head: str,
             log: Callable[[str], None]) -> None:
    from pagctl import api
    from pagctl.checkpoint import append_record, read_metrics

    folder = study.run_dir(out, run.name)
    n, classes = points(study, out, run)
    for measure in study.measures:
        if find_measurement(read_metrics(folder), study, measure, n) is not None:
            continue
        log(f"{head}: {measure.label}")
        report = api.attack(str(folder), attack="autoattack",
                            params=attack_params(study, measure.norm, measure.eps),
                            limit=study.limit, device=device, probes=not study.quick)
        api.record(folder, report)
    if find_alignment(read_metrics(folder), study, n, classes) is None:
        log(f"{head}: alignment with {study.align_source}")
        score = api.align_score(str(folder), source=study.align_source, limit=study.limit,
                                classes_per_image=classes, device=device)
        assert score is not None
        append_record(folder, score.to_record(study.align_source, study_align_params(study),
                                              {}))


_TEST_SIZES: dict[str, tuple[int, int]] = {}


def points(study: Study, out: Path, run: StudyRun) -> tuple[int, int]:
    """(how many test points the study measures a run on: its test set, or ``limit`` of it;
    how many classes its data has)."""
    from pagctl.data import load_data

    data = run_spec(study, out, run).data
    key = data.model_dump_json()
    if key not in _TEST_SIZES:
        bundle = load_data(data)
        _TEST_SIZES[key] = (len(bundle.test), bundle.num_classes)  # type: ignore[arg-type]
    total, classes = _TEST_SIZES[key]
    return (min(total, study.limit) if study.limit is not None else total), classes
