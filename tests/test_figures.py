"""Figures: formats and resolution, the compare figure's styles, columns and axes, and that
no text leaves the canvas (synthetic run folders, no weights)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_compare import align_rec, attack_rec, epoch_rec, make_run

from pagctl.compare.build import compare_runs
from pagctl.compare.figure import draw, plot, scatter_points, short_label
from pagctl.compare.model import Comparison
from pagctl.errors import SpecError
from pagctl.figures import ACCURACY_RANGE, eps_window, figure_format, padded_range

pytest.importorskip("matplotlib")

AA = "robust autoattack linf eps=0.1"
APGD = "robust apgd_ce linf eps=0.1"
LONG = "a-run-with-a-rather-long-name-that-used-to-be-clipped-at-the-edge"


def single_eps(root: Path, runs: int = 3) -> Comparison:
    """``runs`` runs attacked by autoattack and apgd_ce at one eps (0.1); apgd_ce spreads
    more across the runs, so it is the scatter's default column; the last run's name is
    long and it lies at the right edge of the scatter."""
    return compare_runs([make_run(root, LONG if i == runs - 1 else f"r{i}",
                                  [f"train.seed={i}"],
                                  [epoch_rec(), align_rec(0.1 * i),
                                   attack_rec(100 + 10 * i, attack="autoattack", eps=0.1),
                                   attack_rec(110 + 40 * i, attack="apgd_ce", eps=0.1)])
                         for i in range(runs)])


def sweep(root: Path) -> Comparison:
    """Three runs, apgd_ce at three eps and autoattack at one, a swept λ."""
    return compare_runs([make_run(root, f"lam{lam}", [f"train.pag_weight={lam}",
                                                      "target_gradients.name=nearest_neighbor"],
                                  [epoch_rec(), align_rec(0.1 * lam),
                                   *(attack_rec(300 - 80 * k + 20 * lam, attack="apgd_ce",
                                                eps=e) for k, e in enumerate((0.02, 0.05, 0.1))),
                                   attack_rec(100 + 20 * lam, attack="autoattack", eps=0.1)])
                         for lam in (0, 1, 2)])


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def png_dpi(data: bytes) -> float:
    """The pixels per inch written in the PNG's pHYs chunk."""
    at = data.index(b"pHYs")
    per_metre = int.from_bytes(data[at + 4:at + 8], "big")
    assert data[at + 12] == 1  # the unit is the metre
    return per_metre * 0.0254


@pytest.fixture
def figure() -> Iterator[list[Any]]:
    """Figures drawn by a test, closed after it."""
    import matplotlib.pyplot as plt

    drawn: list[Any] = []
    yield drawn
    for fig in drawn:
        plt.close(fig)


# ---------------------------------------------------------------------------------------
# formats and resolution


def test_formats_by_suffix_and_dpi_honoured(tmp_path: Path) -> None:
    c = single_eps(tmp_path / "runs")
    sizes = {}
    for dpi in (100, 250):
        path = tmp_path / f"fig{dpi}.PNG"  # the suffix's case does not matter
        plot(c, path, dpi=dpi)
        data = path.read_bytes()
        sizes[dpi] = png_size(data)
        assert png_dpi(data) == pytest.approx(dpi, abs=0.5)
        # 11 x 4.5 inches, cropped to what is drawn: constrained layout fills the canvas
        width, height = sizes[dpi]
        assert 0.96 * 11 * dpi <= width <= 11 * dpi + 1
        assert 0.9 * 4.5 * dpi <= height <= 4.5 * dpi + 1
    assert sizes[250][0] / sizes[100][0] == pytest.approx(2.5, rel=0.01)
    plot(c, tmp_path / "default.png")
    assert png_dpi((tmp_path / "default.png").read_bytes()) == pytest.approx(200, abs=0.5)

    plot(c, tmp_path / "fig.pdf")
    assert (tmp_path / "fig.pdf").read_bytes()[:5] == b"%PDF-"
    plot(c, tmp_path / "fig.svg")
    root = ET.parse(tmp_path / "fig.svg").getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert any(el.text and "robust accuracy" in el.text for el in root.iter()) or \
        b"robust" in (tmp_path / "fig.svg").read_bytes()


def test_unknown_suffix_is_refused(tmp_path: Path) -> None:
    for name in ("fig.jpg", "fig"):
        with pytest.raises(SpecError, match=r"^--plot: .*\.png, \.pdf or \.svg$"):
            figure_format("--plot", Path(name))
    with pytest.raises(SpecError, match=r"^--save-images: writes a PNG; .* \.png$"):
        figure_format("--save-images", Path("g.svg"), ("png",))
    assert figure_format("--plot", Path("x.Svg")) == "svg"
    c = single_eps(tmp_path / "runs")
    with pytest.raises(SpecError, match="--plot"):
        plot(c, tmp_path / "fig.eps")
    assert list(tmp_path.glob("fig*")) == []


def cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    from pagctl import cli as app

    capsys.readouterr()
    try:
        app.main([str(x) for x in argv])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_refusals_are_one_line_and_write_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = [make_run(tmp_path, f"r{i}", [f"train.seed={i}"],
                     [epoch_rec(), align_rec(0.1 * i), attack_rec(100 + i, eps=0.1)])
            for i in range(2)]
    out_dir = tmp_path / "out"
    cases = [(["--plot", out_dir / "f.jpg"], ("--plot", "'.jpg'", ".pdf")),
             (["--dpi", "300"], ("--dpi", "--plot")),
             (["--robust-column", AA], ("--robust-column", "--plot")),
             (["--plot", out_dir / "f.png", "--robust-column", "robust pgd"],
              ("--robust-column", "'robust pgd'", f"'{AA}'"))]
    for argv, words in cases:
        code, out, err = cli(capsys, "compare", *runs, *argv)
        assert code == 2 and out == "", (argv, err)
        assert len(err.strip().splitlines()) == 1, err
        assert all(w in err for w in words), err
        assert not out_dir.exists()
    code, out, err = cli(capsys, "compare", *runs, "--plot", out_dir / "f.svg", "--dpi", "72",
                         "--robust-column", AA)
    assert code == 0, err
    assert (out_dir / "f.svg").read_bytes().lstrip().startswith(b"<?xml")


# ---------------------------------------------------------------------------------------
# what is drawn


def test_robust_column_picks_the_plotted_column(tmp_path: Path, figure: list[Any]) -> None:
    c = single_eps(tmp_path)
    default = scatter_points(c)
    assert default.y is not None and default.y.id == APGD  # the wider spread
    chosen = scatter_points(c, AA)
    assert chosen.y is not None and chosen.y.id == AA
    assert chosen.x is not None and chosen.x.id == "align nearest_neighbor"
    assert [round(cy.value * 360) for _, _, cy in chosen.points] == [100, 110, 120]
    with pytest.raises(SpecError, match=r"--robust-column: 'clean' .*give one of: "
                                        rf"'{APGD}', '{AA}'"):
        scatter_points(c, "clean")

    figure.append(draw(c, robust=AA))
    ax = figure[-1].axes[1]
    assert ax.get_ylabel() == AA
    drawn = sorted(float(bars.lines[0].get_ydata()[0]) for bars in ax.containers)
    assert drawn == pytest.approx([100 / 360, 110 / 360, 120 / 360])


def test_one_colour_per_run_one_marker_per_attack(tmp_path: Path, figure: list[Any]) -> None:
    for c in (sweep(tmp_path / "sweep"), single_eps(tmp_path / "single")):
        figure.append(draw(c))
        fig = figure[-1]
        styles: dict[tuple[str, str], tuple[Any, str]] = {}
        for container in fig.axes[0].containers:
            run, attack = container.get_label().split(": ")
            line = container.lines[0]
            styles[(run, attack.split()[0])] = (line.get_color(), line.get_marker())
        runs = sorted({r for r, _ in styles})
        attacks = sorted({a for _, a in styles})
        assert len(runs) == 3 and attacks == ["apgd_ce", "autoattack"]
        colour = {r: {styles[k][0] for k in styles if k[0] == r} for r in runs}
        marker = {a: {styles[k][1] for k in styles if k[1] == a} for a in attacks}
        assert all(len(v) == 1 for v in colour.values())  # one colour per run ...
        assert len({next(iter(v)) for v in colour.values()}) == len(runs)  # ... all different
        assert all(len(v) == 1 for v in marker.values())
        assert len({next(iter(v)) for v in marker.values()}) == len(attacks)
        legends = {lg.get_title().get_text(): [t.get_text() for t in lg.get_texts()]
                   for lg in fig.legends}
        assert legends["run (colour)"] == [r.label for r in c.rows]
        assert legends["attack (marker)"] == attacks


def text_outside(fig: Any) -> list[str]:
    """What of ``fig`` is drawn outside it: each text (titles, labels, legends, annotations)
    not wholly inside, and "ticks" when the drawn tick labels are not (matplotlib keeps
    labels of unused ticks at stale places, so those count through the axes' bounds)."""
    from matplotlib.text import Text

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    width, height = fig.bbox.width, fig.bbox.height

    def out(box: Any) -> bool:
        return box.x0 < -0.5 or box.y0 < -0.5 or box.x1 > width + 0.5 or box.y1 > height + 0.5

    ticks = {id(label) for ax in fig.axes for axis in (ax.xaxis, ax.yaxis)
             for tick in axis.get_major_ticks() + axis.get_minor_ticks()
             for label in (tick.label1, tick.label2)}
    outside = [text.get_text() for text in fig.findobj(Text)
               if id(text) not in ticks and text.get_visible() and text.get_text().strip()
               and out(text.get_window_extent(renderer))]
    if any(out(ax.get_tightbbox(renderer)) for ax in fig.axes):
        outside.append("ticks")
    return outside


def test_no_text_leaves_the_canvas(tmp_path: Path, figure: list[Any]) -> None:
    many = compare_runs([make_run(tmp_path / "many", f"{LONG}-{i}", [f"train.seed={i}"],
                                  [epoch_rec(), align_rec(0.01 * i),
                                   attack_rec(100 + 5 * i, eps=0.1)]) for i in range(14)])
    for c, against in ((single_eps(tmp_path / "single"), None), (many, None),
                       (sweep(tmp_path / "sweep"), "train.pag_weight")):
        figure.append(draw(c, against=against))
        assert text_outside(figure[-1]) == []
    # the check can fail: a label written past the right edge is found
    fig = figure[-1]
    fig.text(0.98, 0.5, LONG, ha="left")
    assert text_outside(fig) == [LONG]


def test_single_eps_axes(tmp_path: Path, figure: list[Any]) -> None:
    c = single_eps(tmp_path)
    figure.append(draw(c))
    curve, scatter = figure[-1].axes[:2]
    # by run at the one eps: the runs on x, the eps in the title, all of [0, 1] on y
    assert [t.get_text() for t in curve.get_xticklabels()] == \
        [short_label(r.label) for r in c.rows] == ["r0", "r1", "a-run-with-a-…ed-at-the-edge"]
    assert "ε = 0.1 (linf)" in curve.get_title()
    assert curve.get_ylim() == pytest.approx(ACCURACY_RANGE)
    # the scatter hugs its points (robust 110..190 of 360 with intervals), with margins
    low, high = scatter.get_ylim()
    assert 0.2 < low < 110 / 360 - 0.05 and 190 / 360 + 0.05 < high < 0.7
    # attack --plot at a single eps: from 0 to twice it, not a needle around it
    assert eps_window([0.1, 0.1]) == (0.0, pytest.approx(0.2))
    assert eps_window([0.1, 0.2]) is None


def test_padded_range_keeps_a_readable_window() -> None:
    assert padded_range(0.4, 0.4, min_span=0.1) == pytest.approx((0.35, 0.45))
    lo, hi = padded_range(0.2, 0.7, min_span=0.1)
    assert lo == pytest.approx(0.2 - 0.04) and hi == pytest.approx(0.7 + 0.04)
    # near a bound: shifted inside it (with a 2% margin), still as wide
    lo, hi = padded_range(0.99, 1.0, min_span=0.1, bounds=(0.0, 1.0))
    assert hi == pytest.approx(1.02) and hi - lo == pytest.approx(0.1)
