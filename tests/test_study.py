"""The digits study (`pagctl.study`): its plan, the report's tests and verdicts, what it
reads of a run folder (only records that bear themselves out, of the study's own points),
where it may write, and the quick pipeline end to end (slow suite): trained, measured,
reported, and a second invocation that trains and measures nothing.

Most tests read small synthetic run folders (`_write_study`: the quick study's runs with
consistent records, no weights), so the reading and refusing are tested in seconds; the
engine and the training loop are faked where `run_study` would call them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pagctl.checkpoint import STATE_FILE, STATE_KEY, append_record
from pagctl.compare.pairing import pair
from pagctl.records import (
    AlignRecord,
    AttackRecord,
    PerExample,
    Reliability,
    ScoreDoneRecord,
    Subset,
    TrainEpochRecord,
)
from pagctl.stats import first_n_digest, mcnemar_exact, wilson_interval
from pagctl.study.plan import Measure, Study, digits_study
from pagctl.study.report import (
    REPORT_MARKER,
    Measured,
    RunResults,
    against_vanilla,
    claims,
    correlations,
    unpack_bits_int,
    verdict,
    write_report,
)
from pagctl.study.run import (
    Points,
    find_alignment,
    find_measurement,
    points,
    run_study,
    study_align_params,
    study_attack_params,
)


def _measured(bits: list[int], data: str = "images") -> Measured:
    n = len(bits)
    return Measured(n=n, clean=n, robust=sum(bits), interval=(0.0, 1.0),
                    bits=int("".join(map(str, bits)), 2), seconds=0.0, reliable=True,
                    indices_sha256=first_n_digest(n), data_sha256=data)


def _hex(bits: list[bool]) -> str:
    """`pagctl.stats.pack_bits` without torch: 8 points a byte, point 0 in the high bit."""
    padded = bits + [False] * (-len(bits) % 8)
    return bytes(int("".join("1" if b else "0" for b in padded[i:i + 8]), 2)
                 for i in range(0, len(padded), 8)).hex()


def _subset(at: Points) -> Subset:
    return Subset(count=at.n, indices_sha256=at.indices_sha256, data_sha256=at.data_sha256)


def _attack_record(study: Study, measure: Measure, at: Points, robust: int = 10,
                   clean: int = 50, **change: Any) -> AttackRecord:
    """A complete AutoAttack record of the study's measurement on ``at``, consistent with
    itself (the first ``clean`` points correct, the first ``robust`` defended)."""
    n = at.n
    record = AttackRecord(
        attack="autoattack", weights="last",
        params={**study_attack_params(study, measure), "runs_together": None},
        n=n, clean_correct=clean, robust_correct=robust, clean_accuracy=clean / n,
        robust_accuracy=robust / n, clean_interval=wilson_interval(clean, n),
        robust_interval=wilson_interval(robust, n), norm=measure.norm, eps=measure.eps,
        seconds=2.0, seed=0, subset=_subset(at),
        per_example=PerExample(clean=_hex([i < clean for i in range(n)]),
                               robust=_hex([i < robust for i in range(n)])),
        reliability=Reliability(reliable=True))
    return record.model_copy(update=change)


def _align_record(study: Study, at: Points, level: float = 0.2, **change: Any) -> AlignRecord:
    values = [round(level + 0.001 * (i % 7), 6) for i in range(at.n)]
    mean = sum(values) / at.n
    record = AlignRecord(
        source=study.align_source, source_params=study_align_params(study), n=at.n,
        classes_per_image=at.classes, mean=mean, interval=(mean - 0.01, mean + 0.01),
        subset=_subset(at), seed=0, weights="last", seconds=0.5, per_image=values)
    return record.model_copy(update=change)


def _write_study(out: Path) -> Study:
    """The quick study's folders with what a finished study records (a training epoch, every
    measurement, the alignment; run k defends 10 + 2k + j points at measure j) and its score
    model's end, but no weights: enough for the report and for `run_study`'s choices."""
    study = digits_study(out, quick=True)
    for k, (name, run) in enumerate(study.runs.items()):
        at = points(study, out, run)
        folder = study.run_dir(out, name)
        folder.mkdir(parents=True)
        append_record(folder, TrainEpochRecord(epoch=1, train_seconds=1.5))
        for j, measure in enumerate(study.measures):
            append_record(folder, _attack_record(study, measure, at, robust=10 + 2 * k + j))
        append_record(folder, _align_record(study, at, 0.1 + 0.02 * k))
    score = Study.score_dir(out)
    score.mkdir(parents=True)
    append_record(score, ScoreDoneRecord(steps=30, train_seconds=5.0, sample_seconds=0.0))
    return study


def _edit(path: Path, match: Callable[[dict[str, Any]], bool], **fields: Any) -> None:
    """Edit the one line of metrics.jsonl ``match`` picks by hand: set ``fields``."""
    lines = path.read_text().splitlines()
    hits = [i for i, line in enumerate(lines) if match(json.loads(line))]
    assert len(hits) == 1, hits
    record = json.loads(lines[hits[0]])
    record.update(fields)
    lines[hits[0]] = json.dumps(record)
    path.write_text("\n".join(lines) + "\n")


def _is_attack(measure: Measure) -> Callable[[dict[str, Any]], bool]:
    return lambda r: r["kind"] == "attack" and (r["norm"], r["eps"]) == (measure.norm,
                                                                         measure.eps)


def _is_align(r: dict[str, Any]) -> bool:
    return bool(r["kind"] == "align")


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for a folder): what "nothing written"
    compares."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


def test_the_plan_shares_runs_and_covers_every_part(tmp_path: Path) -> None:
    """Full: 6 λ × 2 sources, 3 seeds × 3 recipes, 4 architectures × 3 recipes and the
    four sources of the paper's Figure 1, with the shared runs trained once; every named run
    exists; SBG runs read the study's score model; 4 AutoAttack budgets."""
    study = digits_study(tmp_path)
    assert [study.runs[n].pag_weight for n in study.lambda_sweep["sbg"]] == \
        [0.0, 0.25, 0.5, 1.0, 2.0, 4.0]
    assert study.lambda_sweep["sbg"][0] == study.lambda_sweep["nearest_neighbor"][0] == \
        "digits-vanilla-s0" == study.seeds["vanilla"][0] == study.arches["small_cnn"]["vanilla"]
    named = {n for names in study.lambda_sweep.values() for n in names} | \
        {n for names in study.seeds.values() for n in names} | \
        {n for recipes in study.arches.values() for n in recipes.values()} | \
        set(study.sources.values())
    assert named == set(study.runs)
    # the sweeps, two more seeds each, three more families, one image and class mean
    assert len(study.runs) == 11 + 6 + 9 + 2
    assert study.sources["class_mean"] == "digits-pag-cm-l1-s0"
    sbg = study.runs["digits-vit-pag-sbg-l1-s0"]
    assert f"target_gradients.params.run={tmp_path / 'score-digits'}" in sbg.overrides
    assert [(m.norm, m.eps) for m in study.measures] == \
        [("l2", 0.5), ("l2", 1.0), ("linf", 0.1), ("linf", 0.15)]
    quick = digits_study(tmp_path, quick=True)
    assert len(quick.runs) == 11 and quick.limit == 60 and quick.quick


def test_verdicts_are_mcnemar_on_the_points_one_run_alone_defends() -> None:
    a = _measured([1] * 12 + [0] * 2 + [1] * 6)  # defends 12 points b does not
    b = _measured([0] * 12 + [1] * 2 + [1] * 6)
    paired = pair(a.results, b.results)
    assert (paired.a_only, paired.b_only) == (12, 2)
    assert paired.p_value == pytest.approx(mcnemar_exact(12, 2))
    assert verdict(a, b, "PAG", "vanilla").startswith("PAG more robust; McNemar p = 0.013")
    assert verdict(b, a, "vanilla", "PAG").startswith("PAG more robust")
    even = _measured([1, 0] * 10)
    assert verdict(even, _measured([0, 1] * 10), "x", "y") == \
        "no significant difference; McNemar p = 1 (10 vs 10 points)"
    assert unpack_bits_int(a.bits, a.n) == [1] * 12 + [0] * 2 + [1] * 6


def test_a_claim_against_vanilla_agrees_only_when_pag_wins_every_comparison() -> None:
    win = verdict(_measured([1] * 12 + [0] * 8), _measured([0] * 20), "PAG NN", "vanilla")
    loss = verdict(_measured([0] * 20), _measured([1] * 12 + [0] * 8), "PAG SBG", "vanilla")
    level = verdict(_measured([1, 0] * 10), _measured([0, 1] * 10), "PAG SBG", "vanilla")
    assert against_vanilla([win]) == against_vanilla([win, win]) == "agrees"
    assert against_vanilla([win, level]) == "not shown"
    assert against_vanilla([win, loss]) == against_vanilla([level, loss]) == "opposite"


@pytest.mark.slow
def test_the_quick_study_trains_measures_reports_and_resumes(tmp_path: Path) -> None:
    """`python -m pagctl.study --quick --jobs 2` (two worker processes; about a minute): the
    report has every section, every run a number; run again (one process), it trains and
    attacks nothing."""
    pytest.importorskip("matplotlib")
    command = [sys.executable, "-m", "pagctl.study", "--quick", "--out", str(tmp_path / "s")]
    env = {"OMP_NUM_THREADS": "1", "PAGCTL_DISABLE_PLUGIN_AUTOLOAD": "1",
           "PATH": "/usr/bin:/bin"}
    first = subprocess.run([*command, "--jobs", "2"], capture_output=True, text=True,
                           cwd=tmp_path, env=env, timeout=900, check=False,
                           stdin=subprocess.DEVNULL)
    assert first.returncode == 0, first.stderr[-3000:]
    report = (tmp_path / "s" / "results.md").read_text()
    for section in ("## The claims", "## Sources", "## λ sweep", "## Alignment and robustness",
                    "## Seeds", "## Architectures", "## Beside the paper's Figure 1",
                    "## Runs"):
        assert section in report
    assert "quick variant" in report and "Spearman ρ = " in report
    assert "**Where the digits agree with the paper**" in report
    runs_table = report[report.index("## Runs"):]
    assert sum(line.startswith("| digits-") for line in runs_table.splitlines()) == 11
    assert (tmp_path / "s" / "results-lambda.png").read_bytes()[:4] == b"\x89PNG"
    again = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env,
                           timeout=900, check=False, stdin=subprocess.DEVNULL)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("trained before") == 11 and "AA " not in again.stderr
    assert "score model: done before" in again.stderr


def test_a_measurement_is_reused_only_when_it_is_the_studys_exactly(tmp_path: Path) -> None:
    """An AutoAttack record at the same norm and ε made any other way (fewer steps, other
    points, other images at the same indices, a version that did not digest the images,
    another seed, the best weights, bfloat16, without per-point bits) is never taken for the
    study's; the number of runs stacked together does not matter."""
    study = digits_study(tmp_path)
    measure = study.measures[0]
    at = Points(360, 10, first_n_digest(360), "a" * 16)
    exact = _attack_record(study, measure, at)
    assert find_measurement([exact], study, measure, at) is exact
    assert exact.params is not None
    grouped = _attack_record(study, measure, at, params={**exact.params, "runs_together": 4})
    assert find_measurement([grouped], study, measure, at) is grouped
    weaker = {**exact.params, "steps": 5}
    for other in (_attack_record(study, measure, at, params=weaker),
                  _attack_record(study, measure, at, n=100),
                  _attack_record(study, measure, at, subset=Subset(
                      indices_sha256="0" * 16, data_sha256=at.data_sha256)),
                  _attack_record(study, measure, at, subset=Subset(
                      indices_sha256=at.indices_sha256, data_sha256="b" * 16)),
                  _attack_record(study, measure, at, subset=Subset(
                      indices_sha256=at.indices_sha256)),
                  _attack_record(study, measure, at, seed=1),
                  _attack_record(study, measure, at, weights="best"),
                  _attack_record(study, measure, at, precision="bfloat16"),
                  _attack_record(study, measure, at, per_example=None),
                  _attack_record(study, study.measures[1], at)):
        assert find_measurement([exact, other], study, measure, at) is exact
        assert find_measurement([other], study, measure, at) is None


def test_an_alignment_is_reused_only_when_it_is_the_studys_exactly(tmp_path: Path) -> None:
    study = digits_study(tmp_path)
    at = Points(360, 10, first_n_digest(360), "a" * 16)
    exact = _align_record(study, at)
    assert exact.source_params is not None
    assert find_alignment([exact], study, at) is exact
    for change in ({"classes_per_image": 1}, {"seed": 3}, {"n": 100}, {"weights": "best"},
                   {"source_params": {**exact.source_params, "pool_size": 1}},
                   {"source": "sbg"}, {"per_image": None},
                   {"subset": Subset(indices_sha256=at.indices_sha256, data_sha256="b" * 16)},
                   {"subset": Subset(indices_sha256=at.indices_sha256)}):
        other = exact.model_copy(update=change)
        assert find_alignment([exact, other], study, at) is exact
        assert find_alignment([other], study, at) is None


def test_runs_measured_on_different_points_are_not_paired(tmp_path: Path) -> None:
    """Other n, other indices or other images at the same indices: no McNemar test (bit i
    of one run would be another image than bit i of the other), and no verdict."""
    bits = [1] * 12 + [0] * 8
    base = _measured(bits)
    other_indices = _measured(bits)
    other_indices.indices_sha256 = "0" * 16
    for other in (_measured([0] * 16), other_indices, _measured([0] * 20, data="other")):
        with pytest.raises(ValueError, match="cannot pair 20 points with"):
            pair(base.results, other.results)
        assert verdict(base, other, "PAG", "vanilla") == \
            "no verdict: measured on different points"
        assert against_vanilla([verdict(base, other, "PAG", "vanilla")]) == "not shown"
    study = digits_study(tmp_path, quick=True)
    results = {name: RunResults(run, {m: _measured([1] * 40 + [0] * 20) for m in
                                      study.measures}, None, 1.0, 1.0)
               for name, run in study.runs.items()}
    for name in (study.sources["vanilla"],):
        results[name].measured = {m: _measured([0] * 60, data="other")
                                  for m in study.measures}
    found = {c.short: c for c in claims(study, results, correlations(study, results))}
    nn = found["robustness without adversarial examples with NN targets"]
    assert nn.verdict == "not shown"
    assert nn.test == "no verdict: measured on different points"


def test_an_unreliable_evaluation_gives_no_verdict() -> None:
    a, b = _measured([1] * 12 + [0] * 8), _measured([0] * 20)
    b.reliable = False
    assert verdict(a, b, "PAG", "vanilla").startswith("no verdict: an evaluation was judged "
                                                      "unreliable; McNemar p = 0.00049")
    assert against_vanilla([verdict(a, b, "PAG", "vanilla")]) == "not shown"


@pytest.mark.parametrize(("robust", "order"), [
    ({"one_image": 30, "class_mean": 30, "nearest_neighbor": 60, "sbg": 60},
     "partly (SBG beats OI, CM only)"),
    ({"one_image": 30, "class_mean": 30, "nearest_neighbor": 60, "sbg": 40},
     "opposite for NN"),
    ({"one_image": 30, "class_mean": 30, "nearest_neighbor": 30, "sbg": 60}, "agrees"),
])
def test_the_source_order_claim_follows_sbgs_mcnemar_tests(
        tmp_path: Path, robust: dict[str, int], order: str) -> None:
    """Synthetic results (vanilla defends 10 of 60 points, each source the first k): the
    "SBG is the best source" verdict follows from SBG's tests against each other source,
    and the other claims from theirs; every run aligned as robust."""
    study = digits_study(tmp_path, quick=True)
    robust = {"vanilla": 10, **robust}
    kind = {name: source for source, name in study.sources.items()}
    results = {}
    for name, run in study.runs.items():
        k = robust[kind.get(name, "vanilla" if run.source == "none" else run.source)]
        bits = [1] * k + [0] * (60 - k)
        results[name] = RunResults(
            run, {m: _measured(bits) for m in study.measures},
            (k / 60, (0.0, 1.0), [float(b) + 0.01 * i for i, b in enumerate(bits)]), 1.0, 1.0)
    found = {c.short: c for c in claims(study, results, correlations(study, results))}
    assert found["SBG is the best source"].verdict == order
    assert found["robustness without adversarial examples with OI targets"].verdict == \
        "agrees"
    assert found["better alignment goes with more robustness"].verdict == "agrees"
    assert found["PAG (NN and SBG) helps the small_cnn"].verdict == "agrees"


def test_the_report_of_a_finished_study_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """``--report-only`` on the quick study's synthetic folders, under a one-letter ``--out``:
    every run's numbers, the marker line, the Runs table with OUT only where a value is the
    folder (``train.seed=0`` intact), the figure; run again, it replaces its own report and
    figure."""
    pytest.importorskip("matplotlib")
    from pagctl.study.__main__ import main

    monkeypatch.chdir(tmp_path)
    study = _write_study(Path("s"))
    assert main(["--quick", "--report-only", "--out", "s", "-q"]) == 0
    assert capsys.readouterr().err == ""
    report = Path("s/results.md").read_text()
    assert report.splitlines()[2] == REPORT_MARKER
    assert "| vanilla | 0.833 | 0.167 [" in report  # 50 clean, 10 robust of 60
    assert "every run measured on the same 60 test points (the same images" in report
    runs = report[report.index("## Runs"):].splitlines()
    vanilla = next(line for line in runs if line.startswith("| digits-vanilla-s0 |"))
    assert "| train.seed=0 |" in vanilla
    sbg = next(line for line in runs if line.startswith(f"| {study.sources['sbg']} |"))
    assert "target_gradients.params.run=OUT/score-digits" in sbg
    assert "OUTeed" not in report and "gradientOUT" not in report
    assert Path("s/results-lambda.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    Path("s/results-lambda.png").write_bytes(b"\x89PNG\r\n\x1a\nold")
    assert main(["--quick", "--report-only", "--out", "s", "-q"]) == 0
    assert Path("s/results-lambda.png").read_bytes()[8:11] != b"old"


@pytest.mark.parametrize("edit", [
    {"robust_accuracy": 0.967},  # the summary alone, beside the bits
    {"robust_correct": 58, "robust_accuracy": 58 / 60},  # counts and accuracy, not the bits
    {"per_example": {"clean": _hex([True] * 50 + [False] * 10),
                     "robust": _hex([True] * 58 + [False] * 2)}},  # robust but not clean
], ids=["accuracy", "count-and-accuracy", "bits"])
def test_a_hand_edited_record_is_refused_by_the_report(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: dict[str, Any]) -> None:
    """A record whose summary its per-point bits do not bear out is no measurement: the
    report says in one line which run and measurement is missing and why (the reader's
    warning), exits 2, and leaves the report it wrote before as it was."""
    pytest.importorskip("matplotlib")
    from pagctl.study.__main__ import main

    out = tmp_path / "s"
    study = _write_study(out)
    assert main(["--quick", "--report-only", "--out", str(out), "-q"]) == 0
    before = _tree(tmp_path)
    capsys.readouterr()
    metrics = study.run_dir(out, "digits-vanilla-s0") / "metrics.jsonl"
    _edit(metrics, _is_attack(study.measures[0]), **edit)
    assert main(["--quick", "--report-only", "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"error: digits-vanilla-s0: no usable AA L2 ε=0.5 record ({metrics} "
                          "line 2: attack record that contradicts itself: ")
    assert err.rstrip().endswith("skipped); run the study to measure it")
    after = _tree(tmp_path)
    assert after.pop("s/runs/digits-vanilla-s0/metrics.jsonl") != \
        before.pop("s/runs/digits-vanilla-s0/metrics.jsonl")
    assert after == before
    assert "0.967" not in (out / "results.md").read_text()


def _finish(folder: Path, epochs: int) -> None:
    """Make ``folder`` a finished training run for `pagctl.grid.run_status`: a state file
    whose counters say all ``epochs`` are done."""
    import torch
    from safetensors.torch import save_file

    save_file({"step": torch.zeros(1)}, str(folder / STATE_FILE),
              metadata={STATE_KEY: json.dumps({"epoch": epochs, "step": 0})})


def test_run_study_measures_again_what_it_cannot_trust(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """`run_study` on a finished synthetic study trains and measures nothing; after a hand
    edit of one record's summary, a record without the images' digest (an earlier version)
    and an alignment of other images, it measures exactly those three again (the engine
    faked), says which line it skipped, and the report shows the new number."""
    import pagctl.api
    import pagctl.train

    out = tmp_path / "s"
    study = _write_study(out)
    for name in study.runs:
        _finish(study.run_dir(out, name), epochs=2)
    measured: list[tuple[str, str]] = []

    def attack(run: str, *, params: dict[str, Any], **_: Any) -> AttackRecord:
        measure = Measure(params["norm"], params["eps"])
        measured.append((Path(run).name, measure.label))
        return _attack_record(study, measure, points(study, out, study.runs[Path(run).name]),
                              robust=33)

    def align_score(run: str, **_: Any) -> AlignRecord:
        measured.append((Path(run).name, "alignment"))
        return _align_record(study, points(study, out, study.runs[Path(run).name]), 0.5)

    def train(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(pagctl.api, "attack", attack)
    monkeypatch.setattr(pagctl.api, "align_score", align_score)
    monkeypatch.setattr(pagctl.api, "record",
                        lambda run, report, **_: append_record(Path(run), report))
    monkeypatch.setattr(pagctl.train, "train", lambda *a, **k: train())
    log: list[str] = []
    run_study(study, out, log=log.append)
    assert measured == []
    assert sum("trained before" in line for line in log) == 11
    assert log[0].startswith("score model: done before")
    first, second, third = list(study.runs)[:3]
    l2 = study.measures[0]
    _edit(study.run_dir(out, first) / "metrics.jsonl", _is_attack(l2),
          robust_correct=58, robust_accuracy=58 / 60)
    at = points(study, out, study.runs[second])
    _edit(study.run_dir(out, second) / "metrics.jsonl", _is_attack(l2),
          subset={"count": 60, "indices_sha256": at.indices_sha256})
    _edit(study.run_dir(out, third) / "metrics.jsonl", _is_align,
          subset={"count": 60, "indices_sha256": at.indices_sha256, "data_sha256": "f" * 16})
    log.clear()
    run_study(study, out, log=log.append)
    assert measured == [(first, l2.label), (second, l2.label), (third, "alignment")]
    assert any(line.startswith(f"[1/11] {first}: warning: ") and "contradicts itself" in line
               for line in log)
    text = write_report(study, out, tmp_path / "r.md")
    assert "| vanilla | 0.833 | 0.550 [" in text and "0.967" not in text


def _proc_missing() -> str:
    if not Path("/proc/self").is_dir():
        pytest.skip("needs Linux's /proc, where no file can be made")
    return "/proc/pagctl-study-test/x"


def _read_only(tmp: Path) -> Path:
    if os.geteuid() == 0:
        pytest.skip("root writes into a read-only folder")
    folder = tmp / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


def _file(tmp: Path, *parts: str, text: str = '{"kind": "train_epoch", "epoch": 1}\n') -> Path:
    """A file at ``tmp``/``parts`` holding ``text`` (by default a line of a run's metrics)."""
    path = tmp.joinpath(*parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


BAD_ARGUMENTS: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "out-empty": (lambda t: ["--out", ""], "error: --out is empty"),
    "out-blank": (lambda t: ["--out", "  "], "error: --out is empty"),
    "out-file": (lambda t: ["--out", str(_file(t, "afile"))], "is a file"),
    "out-under-a-file": (lambda t: ["--out", str(_file(t, "afile") / "s")],
                         "is a file, not a folder"),
    "out-uncreatable": (lambda t: ["--out", _proc_missing()], "cannot be written"),
    "out-read-only": (lambda t: ["--out", str(_read_only(t) / "s")], "cannot be written"),
    "out-missing-report-only": (lambda t: ["--report-only", "--out", str(t / "none")],
                                "does not exist"),
    "report-empty": (lambda t: ["--report", ""], "error: --report is empty"),
    "report-folder": (lambda t: ["--report", str(t)], "is a folder"),
    "report-not-markdown": (lambda t: ["--report", str(t / "r.txt")], "ending in .md"),
    "report-under-a-file": (lambda t: ["--report", str(_file(t, "afile") / "r.md")],
                            "is a file, not a folder"),
    "report-uncreatable": (lambda t: ["--report", _proc_missing() + ".md"],
                           "cannot be written"),
    "report-read-only": (lambda t: ["--report", str(_read_only(t) / "r.md")],
                         "cannot be written"),
    "report-a-run-file": (
        lambda t: ["--report", str(_file(t, "s", "runs", "r", "metrics.jsonl"))],
        "run folder's file name"),
    "report-in-a-study-run": (
        lambda t: ["--report", str(_file(t, "s", "runs", "r", "metrics.jsonl").parent
                                   / "notes.md")], "inside the study's run folders"),
    "report-in-the-score-model": (lambda t: ["--report", str(t / "s/score-digits/r.md")],
                                  "inside the study's run folders"),
    "report-in-another-run": (
        lambda t: ["--report", str(_file(t, "other", "spec.json").parent / "notes.md")],
        "is a run folder"),
    "report-hand-written": (
        lambda t: ["--report", str(_file(t, "notes.md"))],
        "was not written by the study"),
    "report-marker-too-late": (
        lambda t: ["--report", str(_file(t, "notes.md", text="# Notes\n" + "\n" * 9
                                         + REPORT_MARKER + "\n"))],
        "was not written by the study"),
    "figure-not-png": (
        lambda t: ["--report", str(_file(t, "r-lambda.png").with_name("r.md"))],
        "its figure"),
    "figure-a-folder": (
        lambda t: ["--report", str(_file(t, "r-lambda.png", "x").parent.with_name("r.md"))],
        "is not a regular file"),
    "jobs-zero": (lambda t: ["--jobs", "0"], "error: --jobs 0"),
    "jobs-not-a-number": (lambda t: ["--jobs", "two"], "error: argument --jobs"),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_path_arguments_get_one_line_exit_2_and_write_nothing(
        case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Each refusal is one line ``error: ...`` naming the option (and the fix), exit 2, no
    traceback, the tree under the test folder byte for byte as it was; nothing trains."""
    import pagctl.study.run
    from pagctl.study.__main__ import main

    def never(*args: Any, **kwargs: Any) -> float:
        raise AssertionError("the study started")

    monkeypatch.setattr(pagctl.study.run, "run_study", never)
    monkeypatch.setattr(pagctl.study.run, "run_parallel", never)
    make, needle = BAD_ARGUMENTS[case]
    argv = make(tmp_path)
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "s")]
    before = _tree(tmp_path)
    try:
        code = main(["--quick", *argv])
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code  # type: ignore[assignment]
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    option = "--jobs" if case.startswith("jobs") else \
        "--out" if case.startswith("out") else "--report"
    assert option in lines[0]
    assert _tree(tmp_path) == before


def test_a_report_of_a_study_not_run_names_the_first_missing_measurement(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pagctl.study.__main__ import main

    (tmp_path / "s").mkdir()
    assert main(["--quick", "--report-only", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err == "error: digits-vanilla-s0: no usable AA L2 ε=0.5 record; run the study to " \
                  "measure it\n"
    assert [p.name for p in tmp_path.rglob("*")] == ["s"]


def test_a_record_of_other_images_is_not_the_studys(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A record that names no images (an earlier version) or other images at the study's
    indices is passed over, and the refusal says there is one made another way."""
    from pagctl.study.__main__ import main

    out = tmp_path / "s"
    study = _write_study(out)
    metrics = study.run_dir(out, "digits-vanilla-s0") / "metrics.jsonl"
    _edit(metrics, _is_attack(study.measures[0]),
          subset={"count": 60, "indices_sha256": first_n_digest(60)})
    assert main(["--quick", "--report-only", "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: digits-vanilla-s0: no usable AA L2 ε=0.5 record (1 "
                          "AutoAttack record(s) at this budget were made another way")
    assert not (out / "results.md").exists()


def test_the_library_refuses_to_overwrite_what_the_study_did_not_write(tmp_path: Path) -> None:
    """`write_report` from Python checks as the command line does: a run's metrics.jsonl
    given as the report is refused before anything is read or written."""
    from pagctl.errors import SpecError

    out = tmp_path / "s"
    study = _write_study(out)
    metrics = study.run_dir(out, "digits-vanilla-s0") / "metrics.jsonl"
    before = metrics.read_bytes()
    with pytest.raises(SpecError, match="run folder's file name"):
        write_report(study, out, metrics)
    notes = tmp_path / "notes.md"
    notes.write_text("# mine\n")
    with pytest.raises(SpecError, match="was not written by the study"):
        write_report(study, out, notes)
    assert metrics.read_bytes() == before and notes.read_text() == "# mine\n"
    text = write_report(study, out, tmp_path / "r.md")
    assert (tmp_path / "r.md").read_text() == text
    assert write_report(study, out, tmp_path / "r.md") == text  # its own: replaced
