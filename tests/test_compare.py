"""`pagctl compare` engine: synthetic run folders (spec.json + metrics.jsonl, no weights)."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pagctl.checkpoint import write_spec
from pagctl.compare.build import compare_runs
from pagctl.compare.figure import check_against, draw, plot, scatter_columns
from pagctl.compare.model import Comparison, Row
from pagctl.compare.pairing import Paired, PointResults, pair, same_points
from pagctl.compare.rendering import render
from pagctl.errors import SpecError
from pagctl.spec import load_spec
from pagctl.stats import first_n_digest, wilson_interval

EPS = 8 / 255


def make_run(root: Path, name: str, overrides: list[str] | tuple[str, ...] = (),
             records: list[Any] | tuple[Any, ...] = ()) -> Path:
    """A run folder with a digits spec and ``records`` (dicts, or raw lines as str)."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    write_spec(run_dir, load_spec("digits-vanilla", [f"name={name}", *overrides]))
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    return run_dir


def epoch_rec(epoch: int = 1, clean: float = 0.9, n_test: int = 360,
              alignment: float | None = 0.2) -> dict[str, Any]:
    return {"kind": "train_epoch", "epoch": epoch, "epochs": epoch, "clean_accuracy": clean,
            "robust_accuracy": 0.3, "alignment": alignment, "n_test": n_test,
            "monitor": {"attack": "pgd_l2", "params": {"eps": 0.5, "steps": 7}}}


def bits_hex(bits: list[int]) -> str:
    """Same layout as pagctl.stats.pack_bits (first point in the high bit)."""
    padded = bits + [0] * (-len(bits) % 8)
    return bytes(int("".join(map(str, padded[i:i + 8])), 2)
                 for i in range(0, len(padded), 8)).hex()


def attack_rec(robust_correct: int, n: int = 360, *, attack: str = "autoattack",
               norm: str | None = "linf", eps: float | None = EPS, sha: str = "a" * 16,
               clean_correct: int | None = None, bits: list[int] | None = None,
               reliable: bool = True) -> dict[str, Any]:
    clean_correct = n if clean_correct is None else clean_correct
    rec: dict[str, Any] = {
        "kind": "attack", "attack": attack, "params": {"eps": eps}, "norm": norm, "eps": eps,
        "n": n, "clean_correct": clean_correct, "robust_correct": robust_correct,
        "clean_accuracy": clean_correct / n, "robust_accuracy": robust_correct / n,
        "clean_interval": list(wilson_interval(clean_correct, n)),
        "robust_interval": list(wilson_interval(robust_correct, n)),
        "subset": {"count": n, "indices_sha256": sha, "first": 0, "last": n - 1},
        "seed": 0, "reliability": {"reliable": reliable, "reasons": [], "probes": {}}}
    if bits is not None:
        assert len(bits) == n and sum(bits) == robust_correct
        rec["per_example"] = {"clean": bits_hex([1] * n), "robust": bits_hex(bits)}
    return rec


def align_rec(mean: float, n: int = 360, source: str = "nearest_neighbor",
              sha: str = "a" * 16) -> dict[str, Any]:
    return {"kind": "align", "source": source, "source_params": {}, "n": n,
            "classes_per_image": 10, "mean": mean, "interval": [mean - 0.02, mean + 0.02],
            "fraction_positive": 0.8, "per_true_class": {"0": mean},
            "per_target": {"true": mean, "other": mean}, "seed": 0, "seconds": 1.0,
            "subset": {"count": n, "indices_sha256": sha, "first": 0, "last": n - 1}}


def row(comparison: Comparison, label: str) -> Row:
    return next(r for r in comparison.rows if r.label == label)


ROBUST = f"robust autoattack linf eps={EPS:.4g}"


# ---------------------------------------------------------------------------------------
# columns


def test_differing_spec_fields_are_columns(tmp_path: Path) -> None:
    runs = [make_run(tmp_path, "base", ["train.pag_weight=3"], [epoch_rec()]),
            make_run(tmp_path, "nn1", ["target_gradients.name=nearest_neighbor",
                                       "train.pag_weight=1"], [epoch_rec()]),
            make_run(tmp_path, "nn2", ["target_gradients.name=nearest_neighbor",
                                       "train.pag_weight=2"], [epoch_rec()])]
    c = compare_runs(runs)
    assert c.spec_columns == ["target_gradients.name", "train.pag_weight"]
    assert [r.label for r in c.rows] == ["base", "nn1", "nn2"]
    assert row(c, "base").spec["train.pag_weight"] == 0.0  # source none: λ shown as 0
    text = render(c, "table", width=140)
    assert "λ" in text and "source" in text and "nearest_neighbor" in text
    assert "name" not in c.spec_columns and "description" not in c.spec_columns

    # two baselines that differ only in an unused λ do not differ
    same = compare_runs([runs[0], make_run(tmp_path, "base2", [], [epoch_rec()])])
    assert same.spec_columns == []


def test_latest_record_wins_and_cells_carry_n_and_interval(tmp_path: Path) -> None:
    run = make_run(tmp_path, "a", [], [epoch_rec(), attack_rec(100), attack_rec(220)])
    c = compare_runs([run])
    cell = c.rows[0].cells[ROBUST]
    assert cell.value == pytest.approx(220 / 360) and cell.n == 360 and cell.line == 3
    lo, hi = wilson_interval(220, 360)
    expected = f"0.611 [{lo:.3f}, {hi:.3f}] n=360"
    assert expected in render(c, "markdown")
    assert expected in render(c, "table", width=200)
    data = json.loads(render(c, "json"))
    assert set(data) >= {"runs", "columns", "pairs", "warnings"}
    metric = data["runs"][0]["metrics"][ROBUST]
    assert metric["value"] == pytest.approx(220 / 360) and metric["n"] == 360
    assert metric["interval"] == pytest.approx([lo, hi])
    assert data["runs"][0]["epochs"] == 1
    # the clean column comes from the latest record on the shared subset (the attack)
    assert data["runs"][0]["metrics"]["clean"]["record"] == "attack"


def test_narrow_table_still_shows_every_value(tmp_path: Path) -> None:
    runs = [make_run(tmp_path, f"run{i}", [f"train.seed={i}"],
                     [epoch_rec(), attack_rec(100 + i), attack_rec(50, attack="apgd_ce"),
                      align_rec(0.3 + i / 10)]) for i in range(3)]
    text = render(compare_runs(runs), "table", width=100)
    assert max(len(line) for line in text.splitlines()) <= 100
    assert all(f"run{i}" in text for i in range(3))
    assert "0.500 n=360" in text and "[0.480, 0.520]" in text


def test_alignment_columns_and_train_monitor_fallback(tmp_path: Path) -> None:
    from pagctl.stats import indices_digest

    torch = pytest.importorskip("torch")
    with_align = make_run(tmp_path, "a", [], [epoch_rec(alignment=0.1), align_rec(0.2),
                                              align_rec(0.4)])
    no_align = make_run(tmp_path, "b", [], [epoch_rec(alignment=0.3)])
    c = compare_runs([with_align, no_align])
    ids = [col.id for col in c.columns]
    assert "align nearest_neighbor" in ids
    monitor = "align (train monitor) nearest_neighbor"
    assert monitor in ids
    assert row(c, "a").cells["align nearest_neighbor"].value == 0.4
    assert row(c, "b").cells[monitor].value == 0.3
    assert "align nearest_neighbor" not in row(c, "b").cells
    # the monitor's subset digest is the one pagctl attack writes for the first n points
    assert row(c, "b").cells[monitor].subset_sha == indices_digest(torch.arange(360))
    # every run has align records: no monitor column
    only = compare_runs([with_align])
    assert [col.id for col in only.columns if "monitor" in col.id] == []


def test_clean_prefers_a_subset_all_runs_measured(tmp_path: Path) -> None:
    sha360 = first_n_digest(360)
    attacked = make_run(tmp_path, "a", [], [epoch_rec(clean=0.8),
                                            attack_rec(100, clean_correct=300, sha=sha360),
                                            attack_rec(30, n=100, clean_correct=90,
                                                       sha="b" * 16, eps=0.1)])
    trained = make_run(tmp_path, "b", [], [epoch_rec(clean=0.7)])
    c = compare_runs([attacked, trained])
    assert row(c, "a").cells["clean"].value == pytest.approx(300 / 360)
    assert row(c, "b").cells["clean"].value == 0.7
    assert c.mismatches == []


# ---------------------------------------------------------------------------------------
# what is marked, or refused with strict


def test_different_subsets_are_marked_or_refused_when_strict(tmp_path: Path) -> None:
    a = make_run(tmp_path, "a", [], [attack_rec(200, sha="1a2b" * 4)])
    b = make_run(tmp_path, "b", [], [attack_rec(50, n=100, sha="9f8e" * 4)])
    with pytest.raises(SpecError) as info:
        compare_runs([a, b], strict=True)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"compare: robust accuracy '{ROBUST.removeprefix('robust ')}' was "
                          "measured on different subsets (")
    assert "different subsets" in msg and "drop --strict" in msg
    assert "run a: 360 points sha 1a2b1a2b" in msg and "run b: 100 points sha 9f8e9f8e" in msg

    c = compare_runs([a, b])
    assert c.mismatches and all("different subsets" in m for m in c.mismatches)
    column = next(col for col in c.columns if col.id == ROBUST)
    assert column.mismatch is not None
    assert ROBUST + " ≠" in render(c, "table", width=200)
    assert "≠ not comparable: robust accuracy" in render(c, "markdown")
    data = json.loads(render(c, "json"))
    assert any(col.get("mismatch") for col in data["columns"]) and data["mismatches"]
    rows = list(csv.DictReader(io.StringIO(render(c, "csv"))))
    assert all(ROBUST in r["mismatch"] for r in rows)
    assert c.pairs == []  # per-example results on different subsets are not paired


def test_different_eps_or_norms(tmp_path: Path) -> None:
    a = make_run(tmp_path, "a", [], [attack_rec(200, eps=0.03)])
    b = make_run(tmp_path, "b", [], [attack_rec(150, eps=0.031)])
    with pytest.raises(SpecError) as info:
        compare_runs([a, b], strict=True)
    msg = str(info.value)
    assert "different ε or norms" in msg and "run a: linf eps=0.03" in msg
    assert "run b: linf eps=0.031" in msg and "drop --strict" in msg
    c = compare_runs([a, b])
    assert len([col for col in c.columns if col.kind == "robust"]) == 2
    assert any("different ε or norms" in m for m in c.mismatches)
    assert "different ε or norms" in list(csv.DictReader(io.StringIO(render(c, "csv"))))[0][
        "mismatch"]

    # a shared budget is enough: extra columns show "-" for the runs that lack them
    b2 = make_run(tmp_path, "b2", [], [attack_rec(150, eps=0.03), attack_rec(90, norm="l2",
                                                                           eps=0.5)])
    ok = compare_runs([a, b2], strict=True)
    assert ok.mismatches == []
    assert "robust autoattack l2 eps=0.5" not in row(ok, "a").cells
    assert "| - |" in render(ok, "markdown")
    # different attacks at the same budget are not a mismatch either
    b3 = make_run(tmp_path, "b3", [], [attack_rec(150, attack="apgd_ce", eps=0.03)])
    assert compare_runs([a, b3], strict=True).mismatches == []
    # a run with no attack at all does not count
    marked = compare_runs([a, make_run(tmp_path, "c", [], [epoch_rec()])])
    assert not any("ε" in m for m in marked.mismatches)


# ---------------------------------------------------------------------------------------
# per-example pairs


def test_one_pairing_counts_the_points_and_refuses_strangers() -> None:
    """`pair` (compare's pairs and the study's verdicts): both, A only, B only, neither and
    McNemar's p on the same points; other images, or indices never recorded, are not the
    same points."""
    a, b = PointResults(4, 0b1100, "i", "d"), PointResults(4, 0b1010, "i", "d")
    assert same_points(a, b)
    assert pair(a, b) == Paired(n=4, both=1, a_only=1, b_only=1, neither=1, p_value=1.0)
    for other in (PointResults(4, 0b1010, "i", "other images"),
                  PointResults(5, 0b1010, "i", "d")):
        assert not same_points(a, other)
        with pytest.raises(ValueError, match="cannot pair 4 points with"):
            pair(a, other)
    unknown = PointResults(4, 0b1100, None, "d")
    assert not same_points(unknown, unknown)


def test_pairs_from_per_example_bits(tmp_path: Path) -> None:
    # 20 points: both 5, only A 10, only B 2, neither 3
    a_bits = [1] * 5 + [1] * 10 + [0] * 2 + [0] * 3
    b_bits = [1] * 5 + [0] * 10 + [1] * 2 + [0] * 3
    c_bits = [0] * 20
    runs = [make_run(tmp_path, name, [], [attack_rec(sum(bits), n=20, bits=bits)])
            for name, bits in (("a", a_bits), ("b", b_bits), ("c", c_bits))]
    comp = compare_runs(runs)
    assert [(p.run_a, p.run_b) for p in comp.pairs] == [("a", "b"), ("a", "c"), ("b", "c")]
    ab = comp.pairs[0]
    assert (ab.n, ab.both, ab.a_only, ab.b_only, ab.neither) == (20, 5, 10, 2, 3)
    assert ab.p_value == pytest.approx(0.03857, abs=1e-5)
    bc = comp.pairs[2]
    assert (bc.both, bc.a_only, bc.b_only, bc.neither) == (0, 7, 0, 13)

    data = json.loads(render(comp, "json"))
    assert data["pairs"][0]["a_only"] == 10 and data["pairs"][0]["column"] == ROBUST
    assert "McNemar p" in render(comp, "table", width=140)
    md = render(comp, "markdown")
    assert "| " + ROBUST + " | a | b | 20 | 10 | 2 | 5 | 3 | 0.0386 |" in md
    sections = render(comp, "csv").split("\n\n")
    assert len(sections) == 2
    pairs = list(csv.DictReader(io.StringIO(sections[1])))
    assert pairs[0]["b_only"] == "2" and float(pairs[0]["p_value"]) == pytest.approx(ab.p_value)


# ---------------------------------------------------------------------------------------
# tolerance


def test_corrupt_metrics_lines_are_skipped_with_warnings(tmp_path: Path) -> None:
    bad = attack_rec(100)
    bad["robust_accuracy"] = "abc"
    run = make_run(tmp_path, "x", [], [epoch_rec(), "{not json", "[1, 2]", bad, "",
                                       attack_rec(120), {"no": "kind"}, "3"])
    c = compare_runs([run])
    path = run / "metrics.jsonl"
    assert c.warnings == [
        f"warning: {path} line 2: not valid JSON; skipped",
        f"warning: {path} line 3: a JSON list, not an object; skipped",
        f"warning: {path} line 4: attack field 'robust_accuracy' is \"abc\", expected a "
        "number in [0, 1]; skipped",
        f"warning: {path} line 7: no 'kind' field; skipped",
        f"warning: {path} line 8: a JSON int, not an object; skipped",
    ]
    assert c.rows[0].cells[ROBUST].value == pytest.approx(120 / 360)
    assert json.loads(render(c, "json"))["warnings"] == c.warnings
    assert "warning" not in render(c, "table")


def test_the_same_indices_of_other_images_are_never_paired(tmp_path: Path) -> None:
    """Points 0..19 of two different test sets (another split) are not the same points: the
    records' image digests differ, so no paired test is shown, the column is marked and
    --strict refuses; the same digests pair. Records that predate the digest fall back to
    the runs' data sources: another split_seed is another source."""
    bits_a, bits_b = [1] * 15 + [0] * 5, [0] * 5 + [1] * 15
    rec_a = attack_rec(15, n=20, bits=bits_a, sha="b" * 16)
    rec_b = attack_rec(15, n=20, bits=bits_b, sha="b" * 16)
    for rec, images in ((rec_a, "1" * 16), (rec_b, "2" * 16)):
        rec["subset"]["data_sha256"] = images
    a = make_run(tmp_path, "a", [], [rec_a])
    b = make_run(tmp_path, "b", [], [rec_b])
    c = compare_runs([a, b])
    assert c.pairs == [] and len(c.mismatches) == 2  # robust and clean accuracy
    assert all("the same indices of different images" in m for m in c.mismatches)
    with pytest.raises(SpecError, match="different images.*same data and --indices"):
        compare_runs([a, b], strict=True)
    rec_b["subset"]["data_sha256"] = "1" * 16
    same = make_run(tmp_path, "same", [], [rec_b])
    [pair] = compare_runs([a, same], strict=True).pairs
    assert (pair.a_only, pair.b_only) == (5, 5)
    # earlier records (no data_sha256): the data source decides
    for rec in (rec_a, rec_b):
        del rec["subset"]["data_sha256"]
    old_a = make_run(tmp_path, "old-a", [], [rec_a])
    old_split = make_run(tmp_path, "old-split", ["data.split_seed=3"], [rec_b])
    assert compare_runs([old_a, old_split]).pairs == []
    old_same = make_run(tmp_path, "old-same", ["train.seed=4"], [rec_b])
    assert len(compare_runs([old_a, old_same], strict=True).pairs) == 1


@pytest.mark.parametrize(("edit", "why"), [
    ({"per_example": {"clean": "fffff0", "robust": "zzzzzz"}},
     "per_example.robust is not hexadecimal"),
    ({"per_example": {"clean": "fffff0", "robust": "ffc"}}, "holds 3 hex digits"),
    ({"per_example": {"clean": "fffff0", "robust": "ffc001"}}, "sets bits past its 20 points"),
    ({"robust_correct": 12, "robust_accuracy": 0.6}, "robust_correct is 12 but its "
     "per-example bits count 10"),
    ({"robust_accuracy": 0.9}, "robust_accuracy is 0.9 but robust_correct / n is 10/20"),
    ({"per_example": {"clean": "0ffc00", "robust": "ffc000"}, "clean_correct": 10,
      "clean_accuracy": 0.5}, "a point is robust but not classified correctly clean"),
    ({"subset": {"count": 19, "indices_sha256": "a" * 16}}, "its subset has 19 points"),
])
def test_a_record_that_contradicts_itself_is_skipped(tmp_path: Path, edit: dict[str, Any],
                                                     why: str) -> None:
    """Damaged bits, or a summary the bits do not bear out (a hand-edited record), are not a
    measurement: the line is skipped with a warning naming the contradiction."""
    rec = {**attack_rec(10, n=20, bits=[1] * 10 + [0] * 10), **edit}
    run = make_run(tmp_path, "x", [], [attack_rec(10, n=20, bits=[1] * 10 + [0] * 10), rec])
    c = compare_runs([run])
    assert c.rows[0].cells[ROBUST].line == 1  # the intact record, not the edited one
    assert len(c.warnings) == 1 and "line 2: attack record" in c.warnings[0]
    assert why in c.warnings[0], c.warnings


def test_unreliable_attack_is_marked(tmp_path: Path) -> None:
    run = make_run(tmp_path, "x", [], [attack_rec(100, reliable=False)])
    c = compare_runs([run])
    assert c.rows[0].cells[ROBUST].reliable is False
    assert c.rows[0].cells["clean"].reliable is None
    md = render(c, "markdown")
    assert "0.278 ! [" in md and "reliability checks failed" in md
    assert "1.000 [" in md  # the clean value is not marked


def test_stale_attack_is_warned_about(tmp_path: Path) -> None:
    run = make_run(tmp_path, "x", [], [epoch_rec(1), attack_rec(100), epoch_rec(2)])
    c = compare_runs([run])
    assert any("before the last training epoch" in w for w in c.warnings)
    assert c.rows[0].cells["clean"].record_kind == "train_epoch"


def test_missing_spec_and_no_metrics(tmp_path: Path) -> None:
    from pagctl.errors import CheckpointError

    with pytest.raises(CheckpointError, match="no spec.json"):
        compare_runs([tmp_path / "nowhere"])
    empty = make_run(tmp_path, "empty")
    (empty / "metrics.jsonl").unlink()
    c = compare_runs([empty])
    assert c.columns == [] and c.warnings == []
    assert "no evaluated metrics" in render(c, "table")


def test_same_run_twice_gets_distinct_labels(tmp_path: Path) -> None:
    run = make_run(tmp_path, "x", [], [epoch_rec()])
    c = compare_runs([run, run])
    assert len({r.label for r in c.rows}) == 2
    assert [r["name"] for r in json.loads(render(c, "json"))["runs"]] == ["x", "x"]


# ---------------------------------------------------------------------------------------
# formats


def test_csv_has_one_row_per_run(tmp_path: Path) -> None:
    runs = [make_run(tmp_path, f"r{i}", [f"train.pag_weight={i}",
                                         "target_gradients.name=nearest_neighbor"],
                     [epoch_rec(), attack_rec(100 + i)]) for i in range(3)]
    text = render(compare_runs(runs), "csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["run"] for r in rows] == ["r0", "r1", "r2"]
    assert rows[1]["train.pag_weight"] == "1"
    assert float(rows[1][ROBUST]) == pytest.approx(101 / 360)
    assert float(rows[1][ROBUST + " lo"]) < float(rows[1][ROBUST]) < \
        float(rows[1][ROBUST + " hi"])
    assert rows[1][ROBUST + " n"] == "360" and rows[1][ROBUST + " subset"] == "a" * 16


def test_markdown_is_a_pipe_table(tmp_path: Path) -> None:
    runs = [make_run(tmp_path, f"r{i}", [f"train.seed={i}"], [epoch_rec(), attack_rec(100)])
            for i in range(2)]
    lines = render(compare_runs(runs), "markdown").splitlines()
    assert lines[0].startswith("| run | train.seed |")
    assert set(lines[1]) <= set("|-:") and lines[1].count("|") == lines[0].count("|")
    assert lines[2].startswith("| r0 | 0 |")
    with pytest.raises(SpecError, match="--format"):
        render(compare_runs(runs), "yaml")


# ---------------------------------------------------------------------------------------
# figure


def _plot_titles(comparison: Comparison, path: Path, against: str | None = None) -> list[str]:
    import matplotlib.pyplot as plt

    fig = draw(comparison, against=against)
    titles = [ax.get_title() or " ".join(t.get_text() for t in ax.texts) for ax in fig.axes]
    plt.close(fig)
    plot(comparison, path, against)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return titles


def test_plot_curves_and_correlation(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    runs = [make_run(tmp_path, f"r{i}", [f"train.pag_weight={i}",
                                         "target_gradients.name=nearest_neighbor"],
                     [epoch_rec(), attack_rec(300 - 50 * i, eps=0.01),
                      attack_rec(200 - 40 * i), align_rec(0.5 - 0.1 * i)]) for i in range(4)]
    c = compare_runs(runs)
    x, y = scatter_columns(c)
    assert x is not None and x.id == "align nearest_neighbor"
    # both budgets cover every run: the one whose values spread more (0.01: 300..150 robust
    # points against 200..80) is the informative one
    assert y is not None and y.eps == pytest.approx(0.01)
    titles = _plot_titles(c, tmp_path / "out" / "cmp.png")
    assert "robust accuracy vs ε" in titles[0]
    assert "Pearson r = 1.00 (4 runs)" in titles[1]


def test_plot_single_run_and_no_data(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    one = compare_runs([make_run(tmp_path, "one", [], [epoch_rec(), attack_rec(100)])])
    titles = _plot_titles(one, tmp_path / "one.png")
    assert "1 run, too few for a correlation" in titles[1]  # the train monitor is the x
    bare = compare_runs([make_run(tmp_path, "bare", [], [epoch_rec(alignment=None)])])
    titles = _plot_titles(bare, tmp_path / "bare.png")
    assert "no attack records" in titles[0] and "no run has" in titles[1]


@pytest.mark.parametrize("n", [100, 10_000])
def test_plot_robust_accuracy_of_exactly_0_and_1(tmp_path: Path, n: int) -> None:
    """Robust accuracies of 0 and 1 plot (their intervals used to miss them by float noise,
    which matplotlib refuses as negative error bars), and so do records an older version
    wrote with that noise in them."""
    pytest.importorskip("matplotlib")
    noisy = attack_rec(n, n, eps=0.3)
    noisy["robust_interval"] = [0.96, 1.0 - 1e-16]
    runs = [make_run(tmp_path, "all", [], [epoch_rec(n_test=n), attack_rec(n, n), noisy]),
            make_run(tmp_path, "none", [], [epoch_rec(n_test=n), attack_rec(0, n),
                                            attack_rec(0, n, eps=0.3)])]
    titles = _plot_titles(compare_runs(runs), tmp_path / "cmp.png")
    assert "robust accuracy vs ε" in titles[0]


def test_attack_sweep_curve_of_exactly_0_and_1(tmp_path: Path) -> None:
    """The curve `pagctl attack --eps-sweep --plot` draws, at robust accuracies 1 and 0."""
    pytest.importorskip("matplotlib")
    from pagctl.figures import robustness_curve

    for n in (100, 10_000):
        path = tmp_path / f"curve{n}.png"
        robustness_curve(path, [{"label": "run", "eps": [0.5, 1.0, 8.0],
                                 "accuracy": [1.0, 0.5, 0.0],
                                 "interval": [wilson_interval(n, n), wilson_interval(n // 2, n),
                                              wilson_interval(0, n)]}],
                         norm="l2", title="t", option="--plot")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_a_clean_error(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    c = compare_runs([make_run(tmp_path, "x", [], [epoch_rec()])])
    with pytest.raises(SpecError, match="matplotlib"):
        plot(c, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------------------------------
# scale and imports


def test_hundred_runs(tmp_path: Path) -> None:
    runs = []
    for i in range(100):
        records: list[Any] = [epoch_rec(e) for e in range(1, 16)]
        records += [attack_rec(100 + i, bits=[1] * (100 + i) + [0] * (260 - i)),
                    attack_rec(50, eps=0.5, norm="l2", attack="pgd_l2"),
                    align_rec(0.2 + i / 1000), attack_rec(101), align_rec(0.3),
                    attack_rec(100 + i % 7, bits=[1] * (100 + i % 7) + [0] * (260 - i % 7))]
        runs.append(make_run(tmp_path, f"run{i:03d}", [f"train.pag_weight={i}"], records))
    c = compare_runs(runs)
    assert len(c.rows) == 100 and len(c.pairs) == 100 * 99 // 2
    assert "more pairs: see --format json" in render(c, "table")
    runs_csv = render(c, "csv").split("\n\n")[0]
    assert len(list(csv.DictReader(io.StringIO(runs_csv)))) == 100


def test_compare_imports_no_torch(tmp_path: Path) -> None:
    runs = [make_run(tmp_path, f"r{i}", [], [epoch_rec(), attack_rec(100, bits=[1] * 100 +
                                                                       [0] * 260)])
            for i in range(2)]
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from pagctl.compare.build import compare_runs\n"
        "from pagctl.compare.rendering import render\n"
        f"c = compare_runs([Path(p) for p in {[str(r) for r in runs]!r}])\n"
        "assert len(c.pairs) == 1\n"
        "for fmt in ('table', 'json', 'csv', 'markdown'):\n"
        "    render(c, fmt)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr


def test_cli_marks_mismatches_and_refuses_them_with_strict(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pagctl import cli

    a = make_run(tmp_path, "a", [], [attack_rec(200, eps=0.03)])
    b = make_run(tmp_path, "b", [], [attack_rec(150, eps=0.031)])

    def run(*argv: object) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            cli.main([str(x) for x in argv])
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = run("compare", a, b, "--format", "markdown")
    assert code == 0, err
    assert "≠ not comparable: the runs share no robust accuracy budget" in out
    code, out, err = run("compare", a, b, "--strict")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "drop --strict" in err


def test_plot_against_a_swept_field(tmp_path: Path) -> None:
    """--against train.pag_weight: two more panels, robust accuracy and alignment against λ,
    one line per source (the other differing field); a field that does not differ, or is
    not a number, is refused naming the fields that do."""
    pytest.importorskip("matplotlib")
    runs = [make_run(tmp_path, f"{source}-{lam}", [f"train.pag_weight={lam}",
                                                   f"target_gradients.name={source}"],
                     [epoch_rec(), attack_rec(100 + 40 * lam + (20 if source == "class_mean"
                                                                else 0)),
                      align_rec(0.1 * lam)])
            for source in ("class_mean", "nearest_neighbor") for lam in (0, 1, 2)]
    c = compare_runs(runs)
    check_against(c, "train.pag_weight")
    titles = _plot_titles(c, tmp_path / "grid.png", against="train.pag_weight")
    assert len(titles) == 4
    assert titles[2] == "robust accuracy vs λ (95% intervals)"
    assert titles[3] == "alignment vs λ (95% intervals)"
    with pytest.raises(SpecError, match=r"train\.lr.*numeric ones that do: train\.pag_weight\)"):
        check_against(c, "train.lr")
    with pytest.raises(SpecError, match="not a number"):
        check_against(c, "target_gradients.name")
