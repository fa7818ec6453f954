"""The digits study (`pagctl.study`): its plan, the report's tests and verdicts, and the quick
pipeline end to end (slow suite): trained, measured, reported, and a second invocation that
trains and measures nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pagctl.stats import first_n_digest, mcnemar_exact
from pagctl.study.plan import Measure, Study, digits_study
from pagctl.study.report import (
    Measured,
    RunResults,
    against_vanilla,
    claims,
    compare_runs,
    correlations,
    unpack_bits_int,
    verdict,
)
from pagctl.study.run import (
    find_alignment,
    find_measurement,
    study_align_params,
    study_attack_params,
)


def _measured(bits: list[int]) -> Measured:
    n = len(bits)
    return Measured(n=n, clean=n, robust=sum(bits), interval=(0.0, 1.0),
                    bits=int("".join(map(str, bits)), 2), seconds=0.0, reliable=True)


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
    only_a, only_b, p = compare_runs(a, b)
    assert (only_a, only_b) == (12, 2) and p == pytest.approx(mcnemar_exact(12, 2))
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


def _attack_record(study: Study, measure: Measure, n: int, **change: object) -> dict:
    record = {"kind": "attack", "attack": "autoattack", "n": n, "seed": 0, "weights": "last",
              "params": {**study_attack_params(study, measure), "runs_together": None},
              "subset": {"indices_sha256": first_n_digest(n)}}
    record.update(change)
    return record


def test_a_measurement_is_reused_only_when_it_is_the_studys_exactly(tmp_path: Path) -> None:
    """An AutoAttack record at the same norm and ε made any other way (fewer steps, other
    points or seed, the best weights, bfloat16) is never taken for the study's; the number
    of runs stacked together does not matter."""
    study = digits_study(tmp_path)
    measure = study.measures[0]
    exact = _attack_record(study, measure, 360)
    assert find_measurement([exact], study, measure, 360) is exact
    grouped = _attack_record(study, measure, 360, params={**exact["params"],
                                                          "runs_together": 4})
    assert find_measurement([grouped], study, measure, 360) is grouped
    weaker = {**exact["params"], "steps": 5}
    for other in (_attack_record(study, measure, 360, params=weaker),
                  _attack_record(study, measure, 100),
                  _attack_record(study, measure, 360, subset={"indices_sha256": "0" * 16}),
                  _attack_record(study, measure, 360, seed=1),
                  _attack_record(study, measure, 360, weights="best"),
                  _attack_record(study, measure, 360, precision="bfloat16"),
                  _attack_record(study, study.measures[1], 360)):
        assert find_measurement([exact, other], study, measure, 360) is exact
        assert find_measurement([other], study, measure, 360) is None


def test_an_alignment_is_reused_only_when_it_is_the_studys_exactly(tmp_path: Path) -> None:
    study = digits_study(tmp_path)
    exact = {"kind": "align", "source": study.align_source, "n": 360, "seed": 0,
             "source_params": study_align_params(study), "classes_per_image": 10,
             "subset": {"indices_sha256": first_n_digest(360)}, "per_image": [0.5] * 360}
    assert find_alignment([exact], study, 360, 10) is exact
    for change in ({"classes_per_image": 1}, {"seed": 3}, {"n": 100}, {"weights": "best"},
                   {"source_params": {**exact["source_params"], "pool_size": 1}},
                   {"source": "sbg"}, {"per_image": []}):
        assert find_alignment([exact, {**exact, **change}], study, 360, 10) is exact
        assert find_alignment([{**exact, **change}], study, 360, 10) is None


def test_runs_measured_on_different_points_are_not_paired() -> None:
    with pytest.raises(ValueError, match="cannot pair 8 points with 16"):
        compare_runs(_measured([1] * 8), _measured([1] * 16))


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


def test_bad_study_arguments_get_one_line_and_exit_2(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A file as --out, a folder as --report, --jobs 0, and a report of a study not run:
    one line naming the option or the missing run, exit 2, nothing written."""
    from pagctl.study.__main__ import main

    afile = tmp_path / "afile"
    afile.write_text("")
    for argv, needle in ((["--out", str(afile)], "--out"),
                         (["--out", str(tmp_path / "s"), "--report", str(tmp_path)],
                          "--report"),
                         (["--jobs", "0", "--out", str(tmp_path / "s")], "--jobs")):
        with pytest.raises(SystemExit) as exit_info:
            main(["--quick", "--report-only", *argv])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert needle in err[-1] and "Traceback" not in "".join(err)
    assert main(["--quick", "--report-only", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: digits-vanilla-s0: no AA L2 ε=0.5 record; run the study first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
