"""The study's report (`write_report`): read every run folder back and write markdown.

Every number comes from a run folder's records: clean and robust accuracy from the attack
records (n and the Wilson 95% interval beside each), alignment from the align records (mean
and its 95% interval). Comparisons between two runs are the exact McNemar test on the
points one run defends and the other does not (both were attacked on the same points); the
correlation between alignment and robustness is taken across runs, with 95% intervals from a
bootstrap over test points (`pagctl.stats.bootstrap_correlations`).
"""

from __future__ import annotations

import datetime
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pagctl.stats import bits_as_int, bootstrap_correlations, mcnemar_exact
from pagctl.study.plan import Measure, Study, StudyRun
from pagctl.study.run import find_alignment, find_measurement, points

SIGNIFICANCE = 0.05
"""A McNemar p-value below this makes a difference significant in the verdicts."""

PAPER_FIGURE_1 = {  # CIFAR-10, robust accuracy (%), the paper's Figure 1
    "Vanilla (CE only)": (0.00, 0.00), "PAG, One Image": (46.63, 13.50),
    "PAG, Class Mean": (47.25, 11.24), "PAG, Nearest Neighbor": (42.12, 7.51),
    "PAG, Score-Based Gradients": (55.39, 23.97),
}


@dataclass
class Measured:
    """One run's measurement under one attack: counts, interval, per-point robust bits."""

    n: int
    clean: int
    robust: int
    interval: tuple[float, float]
    bits: int  # robust per point, point 0 in the highest of n bits
    seconds: float
    reliable: bool | None

    @property
    def accuracy(self) -> float:
        return self.robust / self.n if self.n else 0.0


@dataclass
class RunResults:
    """What the report reads of one run folder."""

    run: StudyRun
    measured: dict[Measure, Measured]
    alignment: tuple[float, tuple[float, float] | None, list[float]] | None
    train_seconds: float
    align_seconds: float


def read_results(study: Study, out: Path) -> dict[str, RunResults]:
    """Every run's measurements, as recorded in its folder; KeyError naming a run and a
    measurement the folder lacks (run the study first)."""
    from pagctl.checkpoint import read_metrics

    results = {}
    for name, run in study.runs.items():
        records = read_metrics(study.run_dir(out, name))
        n_points, classes = points(study, out, run)
        measured = {}
        for measure in study.measures:
            rec = find_measurement(records, study, measure, n_points)
            if rec is None:
                raise KeyError(f"{name}: no {measure.label} record; run the study first")
            n = int(rec["n"])
            measured[measure] = Measured(
                n, int(rec["clean_correct"]), int(rec["robust_correct"]),
                (float(rec["robust_interval"][0]), float(rec["robust_interval"][1])),
                bits_as_int(rec["per_example"]["robust"], n), float(rec.get("seconds") or 0),
                (rec.get("reliability") or {}).get("reliable"))
        align = find_alignment(records, study, n_points, classes)
        alignment: tuple[float, tuple[float, float] | None, list[float]] | None = None
        if align is not None:
            interval = align.get("interval")
            alignment = (float(align["mean"]),
                         (float(interval[0]), float(interval[1])) if interval else None,
                         [float(v) for v in align.get("per_image") or []])
        epochs = [r for r in records if r.get("kind") == "train_epoch"]
        results[name] = RunResults(
            run, measured, alignment,
            sum(float(r.get("train_seconds") or 0) for r in epochs),
            float(align.get("seconds") or 0) if align else 0.0)
    return results


def score_seconds(study: Study, out: Path) -> float:
    """The study's score model's recorded training and sampling seconds (0 without one)."""
    from pagctl.checkpoint import read_metrics

    folder = study.score_dir(out)
    done = [r for r in read_metrics(folder) if r.get("kind") == "score_done"] \
        if folder.is_dir() else []
    return sum(float(done[-1].get(k) or 0) for k in ("train_seconds", "sample_seconds")) \
        if done else 0.0


def compare_runs(a: Measured, b: Measured) -> tuple[int, int, float]:
    """(points a defends and b does not, the reverse, McNemar's exact p-value); ValueError
    when the two were measured on different numbers of points."""
    if a.n != b.n:
        raise ValueError(f"cannot pair {a.n} points with {b.n}: measure both on the same points")
    full = (1 << a.n) - 1
    only_a = bin(a.bits & ~b.bits & full).count("1")
    only_b = bin(b.bits & ~a.bits & full).count("1")
    return only_a, only_b, mcnemar_exact(only_a, only_b)


def verdict(a: Measured, b: Measured, what_a: str, what_b: str) -> str:
    """Which of two runs is more robust on the same points, by McNemar's test; none when
    either evaluation was judged unreliable (a gradient-masking probe fired)."""
    only_a, only_b, p = compare_runs(a, b)
    test = f"McNemar p = {p:.2g} ({only_a} vs {only_b} points)"
    if a.reliable is False or b.reliable is False:
        return f"no verdict: an evaluation was judged unreliable; {test}"
    if p >= SIGNIFICANCE:
        return f"no significant difference; {test}"
    winner = what_a if only_a > only_b else what_b
    return f"{winner} more robust; {test}"


def _cell(m: Measured) -> str:
    lo, hi = m.interval
    flag = "" if m.reliable in (True, None) else " (unreliable)"
    return f"{m.accuracy:.3f} [{lo:.2f}, {hi:.2f}]{flag}"


def _align_cell(r: RunResults) -> str:
    if r.alignment is None:
        return "-"
    mean, interval, _ = r.alignment
    return f"{mean:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")


def _clean(r: RunResults, study: Study) -> str:
    m = r.measured[study.measures[0]]
    return f"{m.clean / m.n:.3f}" if m.n else "-"


def _label(run: StudyRun) -> str:
    if run.source == "none":
        return "vanilla"
    return f"PAG {'NN' if run.source == 'nearest_neighbor' else 'SBG'} λ={run.pag_weight:g}"


def _torch_version() -> str:
    import torch

    return str(torch.__version__)


def _provenance() -> str:
    """pagctl's version and, in a git checkout, its commit."""
    from pagctl import __version__

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True, cwd=Path(__file__).parent,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True,
                               text=True, check=True, cwd=Path(__file__).parent,
                               timeout=10).stdout.strip()
        commit += " (uncommitted changes)" if dirty else ""
    except (OSError, subprocess.SubprocessError):
        commit = "not a git checkout"
    return f"pagctl {__version__}, commit {commit}"


def write_report(study: Study, out: Path, path: Path, *, seconds: float | None = None,
                 figure: Path | None = None) -> str:
    """Write the report to ``path`` (and return it); ``figure``: a PNG of robust accuracy
    and alignment against λ (needs matplotlib)."""
    results = read_results(study, out)
    main = study.measures[0]
    header = "| recipe | clean | " + " | ".join(m.label for m in study.measures) + \
        " | alignment |"
    rule = "|---|---:|" + "---:|" * len(study.measures) + "---:|"
    n = next(iter(results.values())).measured[main].n
    lines = ["# Results: the paper's claims on the embedded digits", "",
             "Generated by `python -m pagctl.study` (`make study`); do not edit by hand.", ""]
    beside = [(page, what) for page, what in SEE_ALSO
              if (path.parent / page.partition("#")[0]).exists()]
    if beside:
        lines += ["Read closely by hand elsewhere: " + "; ".join(
            f"[{what}]({page})" for page, what in beside) + ".", ""]
    if study.quick:
        lines += [f"**{note}.**" for note in study.notes] + [""]
    settings = ", ".join(f"{k}={v}" for k, v in study.attack_params.items())
    total = sum(r.train_seconds for r in results.values())
    measure_seconds = sum(m.seconds for r in results.values() for m in r.measured.values())
    align_seconds = sum(r.align_seconds for r in results.values())
    score = score_seconds(study, out)
    per_run = [r.train_seconds + r.align_seconds + sum(m.seconds for m in r.measured.values())
               for r in results.values()]
    compute = score + sum(per_run)
    wall_two = score + max(sum(per_run[0::2]), sum(per_run[1::2]))  # run_parallel's split
    lines += [
        "## How it was measured", "",
        f"- Report written by {_provenance()}; {datetime.date.today().isoformat()}; "
        f"{platform.machine()}, Python {platform.python_version()}, torch {_torch_version()}.",
        f"- Data: scikit-learn's 8×8 digits, the built-in split; every run measured on the "
        f"same {n} test points.",
        f"- Attacks: pagctl's AutoAttack ({settings}), "
        f"{', '.join(m.label for m in study.measures)}; robust accuracy with its Wilson 95% "
        "interval.",
        f"- Alignment: `align-score` against `{study.align_source}` targets (mean cosine "
        "over images and all classes, 95% interval). The runs trained toward these very "
        "targets are partly circular in that column (their score says the objective was "
        "met); for every other run it is an independent yardstick.",
        f"- Compute, as recorded in the run folders: score model {score / 60:.1f} min, "
        f"training {total / 60:.1f} min ({len(results)} runs), attacks "
        f"{measure_seconds / 60:.1f} min, alignment {align_seconds / 60:.1f} min; "
        f"{compute / 60:.0f} min in all. With `--jobs 2` (the score model, then two "
        f"workers taking alternate runs) that is about {wall_two / 60:.0f} min of wall time "
        "from nothing on 2 cores, the slower worker's sum (each run's seconds were measured "
        "beside the other worker's; start-up and data loading, which the records do not "
        "count, come on top)" + (f"; this invocation took {seconds / 60:.1f} min"
                                        if seconds is not None else "") + ".", ""]
    corr = correlations(study, results)
    lines += _claims(study, results, corr) + _sources(study, results, header, rule) + \
        _sweep(study, results, header, rule) + \
        _correlation(study, results, corr) + _seeds(study, results) + \
        _arches(study, results, header, rule) + _paper(study, results) + _runs(results, out)
    if figure is not None:
        _figure(study, results, figure)
        lines += ["## Figure", "", f"![robust accuracy and alignment against λ]({figure.name})",
                  ""]
    text = "\n".join(lines).rstrip() + "\n"
    from pagctl.checkpoint import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    return text


SEE_ALSO = [
    ("results-sources.md", "the five sources, stage by stage, against SBG targets"),
    ("results-at.md", "adversarial training with and without the PAG term"),
    ("sbg.md#the-noise-level-σ-on-digits", "the SBG noise level σ"),
]
"""Hand-written result pages linked from the report when it is written beside them."""

SOURCE_LABELS = {"vanilla": "vanilla", "one_image": "OI", "class_mean": "CM",
                 "nearest_neighbor": "NN", "sbg": "SBG"}
PAPER_L2 = {"one_image": 46.63, "class_mean": 47.25, "nearest_neighbor": 42.12, "sbg": 55.39}
"""The paper's Figure 1 robust accuracy (CIFAR-10, L2, %) of each source."""


@dataclass
class Claim:
    """One of the paper's claims as measured on the digits."""

    claim: str
    digits: str
    verdict: str  # "agrees", "not shown", "no difference shown" or "opposite for ..."
    test: str
    short: str  # the claim in a few words, for the summary


def claims(study: Study, results: dict[str, RunResults],
           corr: dict[Measure, Correlations]) -> list[Claim]:
    """Every claim's verdict at the study's first measure (McNemar p < SIGNIFICANCE, or a
    correlation interval above 0); ``corr``: `correlations`."""
    main = study.measures[0]
    vanilla = results[study.sources["vanilla"]].measured[main]
    out = []
    for source, label in SOURCE_LABELS.items():
        if source == "vanilla":
            continue
        pag = results[study.sources[source]].measured[main]
        v = verdict(pag, vanilla, f"PAG {label}", "vanilla")
        out.append(Claim(
            f"PAG makes a model robust without adversarial examples ({label}, λ = 1)",
            f"{pag.accuracy:.3f} vs vanilla {vanilla.accuracy:.3f}", against_vanilla([v]), v,
            f"robustness without adversarial examples with {label} targets"))
    rho, interval = corr[main]["spearman"]
    agrees = interval is not None and interval[0] > 0
    out.append(Claim(f"better alignment, more robustness (across the {correlated(results)} "
                     "runs with an alignment)",
                     f"Spearman ρ = {_num(rho)} {_interval(interval)}",
                     "agrees" if agrees else "not shown", "bootstrap over test points",
                     "better alignment goes with more robustness"))
    sbg = results[study.sources["sbg"]].measured[main]
    against = {s: verdict(sbg, results[study.sources[s]].measured[main], "SBG",
                          SOURCE_LABELS[s]) for s in ("one_image", "class_mean",
                                                      "nearest_neighbor")}
    beaten = [SOURCE_LABELS[s] for s, v in against.items() if v.startswith("SBG more")]
    beating = [SOURCE_LABELS[s] for s, v in against.items()
               if v.startswith(f"{SOURCE_LABELS[s]} more")]
    if beating:
        order = "opposite for " + ", ".join(beating)
    elif len(beaten) == len(against):
        order = "agrees"
    elif beaten:
        order = f"partly (SBG beats {', '.join(beaten)} only)"
    else:
        order = "no difference shown"
    out.append(Claim(
        "SBG is the best source (CIFAR-10 L2: SBG 55.39%, CM 47.25%, OI 46.63%, NN 42.12%)",
        f"SBG {sbg.accuracy:.3f}; " + ", ".join(
            f"{SOURCE_LABELS[s]} {results[study.sources[s]].measured[main].accuracy:.3f}"
            for s in against),
        order, "; ".join(f"vs {SOURCE_LABELS[s]}: {v}" for s, v in against.items()),
        "SBG is the best source"))
    for arch, recipes in study.arches.items():
        base = results[recipes["vanilla"]].measured[main]
        verdicts = [verdict(results[recipes[s]].measured[main], base, f"PAG {lab}", "vanilla")
                    for s, lab in (("nearest_neighbor", "NN"), ("sbg", "SBG"))]
        out.append(Claim(
            f"PAG helps on every architecture: {arch}",
            f"NN {results[recipes['nearest_neighbor']].measured[main].accuracy:.3f}, SBG "
            f"{results[recipes['sbg']].measured[main].accuracy:.3f} vs vanilla "
            f"{base.accuracy:.3f}", against_vanilla(verdicts), "; ".join(verdicts),
            f"PAG (NN and SBG) helps the {arch}"))
    return out


def against_vanilla(verdicts: list[str]) -> str:
    """"agrees" when PAG won every comparison with vanilla, "opposite" when vanilla won one,
    "not shown" otherwise."""
    if any(v.startswith("vanilla more") for v in verdicts):
        return "opposite"
    return "agrees" if all(v.startswith("PAG") for v in verdicts) else "not shown"


def _claims(study: Study, results: dict[str, RunResults],
            corr: dict[Measure, Correlations]) -> list[str]:
    main = study.measures[0]
    found = claims(study, results, corr)
    agree = [c.short for c in found if c.verdict == "agrees"]
    other = [f"{c.short} ({c.verdict})" for c in found if c.verdict != "agrees"]
    summary = [f"**Where the digits agree with the paper** ({main.label}): "
               + ("; ".join(agree) if agree else "nowhere") + ".", "",
               "**Where they do not, or show nothing:** "
               + ("; ".join(other) if other else "nowhere") + ".", ""]
    return ["## The claims", "",
            f"Each at {main.label} on the same points; a verdict needs McNemar p < "
            f"{SIGNIFICANCE} (or a correlation interval above 0).", "", *summary,
            "| claim (paper) | digits | verdict | test |", "|---|---|---|---|",
            *(f"| {c.claim} | {c.digits} | {c.verdict} | {c.test} |" for c in found), ""]


def _sources(study: Study, results: dict[str, RunResults], header: str,
             rule: str) -> list[str]:
    """Every source of the paper's Figure 1 at λ = 1 (small CNN, seed 0), beside vanilla."""
    lines = ["## Sources (small CNN, λ = 1, seed 0)", "",
             header.replace("recipe", "source"), rule]
    for source, name in study.sources.items():
        lines.append(_row(SOURCE_LABELS[source], results[name], study))
    return [*lines, ""]


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _interval(interval: tuple[float, float] | None) -> str:
    return "" if interval is None else f"[{interval[0]:.2f}, {interval[1]:.2f}]"


def _row(label: str, r: RunResults, study: Study) -> str:
    return (f"| {label} | {_clean(r, study)} | "
            + " | ".join(_cell(r.measured[m]) for m in study.measures)
            + f" | {_align_cell(r)} |")


def _sweep(study: Study, results: dict[str, RunResults], header: str,
           rule: str) -> list[str]:
    lines = ["## λ sweep (small CNN, seed 0)", "", header.replace("recipe", "source, λ"), rule]
    for source, names in study.lambda_sweep.items():
        label = "NN" if source == "nearest_neighbor" else "SBG"
        for name in names:
            r = results[name]
            lines.append(_row(f"{label}, λ = {r.run.pag_weight:g}"
                              + (" (vanilla)" if r.run.source == "none" else ""), r, study))
    return [*lines, ""]


Correlations = dict[str, tuple[float | None, tuple[float, float] | None]]


def _correlated(r: RunResults) -> bool:
    return r.alignment is not None and bool(r.alignment[2])


def correlated(results: dict[str, RunResults]) -> int:
    """How many runs the correlation is taken across (those with a per-point alignment)."""
    return sum(_correlated(r) for r in results.values())


def correlations(study: Study, results: dict[str, RunResults]
                 ) -> dict[Measure, Correlations]:
    """Pearson and Spearman between the runs' mean alignment and robust accuracy, for each
    measure, with 95% intervals from 1,000 bootstrap resamples of the test points."""
    runs = [r for r in results.values() if _correlated(r)]
    out: dict[Measure, Correlations] = {}
    for measure in study.measures:
        n = runs[0].measured[measure].n if runs else 0
        xs = [r.alignment[2][:n] for r in runs if r.alignment is not None]
        ys = [[float(b) for b in unpack_bits_int(r.measured[measure].bits, n)] for r in runs]
        none: Correlations = {"pearson": (None, None), "spearman": (None, None)}
        out[measure] = bootstrap_correlations(xs, ys, resamples=1000) if runs else none
    return out


def unpack_bits_int(bits: int, n: int) -> list[int]:
    """Per-point bits of `bits_as_int`'s integer, point 0 first."""
    return [(bits >> (n - 1 - i)) & 1 for i in range(n)]


def _correlation(study: Study, results: dict[str, RunResults],
                 corr: dict[Measure, Correlations]) -> list[str]:
    missing = len(results) - correlated(results)
    lines = ["## Alignment and robustness", "",
             f"Across the {correlated(results)} runs with an alignment (every λ, seed and "
             "architecture" + (f"; {missing} without one left out" if missing else "")
             + "): the runs' mean "
             "alignment against their robust accuracy; 95% intervals from 1,000 bootstrap "
             "resamples of the test points.", "",
             "| attack | Pearson r | Spearman ρ |", "|---|---|---|"]
    for measure, values in corr.items():
        (r, ri), (rho, rhoi) = values["pearson"], values["spearman"]
        lines.append(f"| {measure.label} | {_num(r)} {_interval(ri)} | "
                     f"{_num(rho)} {_interval(rhoi)} |")
    return [*lines, ""]


def _seeds(study: Study, results: dict[str, RunResults]) -> list[str]:
    main = study.measures[0]
    seeds = len(next(iter(study.seeds.values())))
    lines = ["## Seeds (small CNN, λ = 1)", "",
             f"{main.label}, one run per training seed; the spread is what a single run's "
             "difference must exceed.", "",
             "| recipe | " + " | ".join(f"seed {i}" for i in range(seeds))
             + " | mean | sd | range |", "|---|" + "---:|" * (seeds + 3)]
    for kind, names in study.seeds.items():
        values = [results[n].measured[main].accuracy for n in names]
        mean = sum(values) / len(values)
        sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 \
            if len(values) > 1 else 0.0
        label = {"vanilla": "vanilla", "nearest_neighbor": "PAG NN", "sbg": "PAG SBG"}[kind]
        lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in values)
                     + f" | {mean:.3f} | {sd:.3f} | {max(values) - min(values):.3f} |")
    return [*lines, ""]


def _arches(study: Study, results: dict[str, RunResults], header: str,
            rule: str) -> list[str]:
    main = study.measures[0]
    lines = ["## Architectures (λ = 1, seed 0)", "",
             header.replace("recipe", "architecture, recipe") + " verdict vs vanilla |",
             rule + "---|"]
    for arch, recipes in study.arches.items():
        base = results[recipes["vanilla"]]
        for kind, name in recipes.items():
            r = results[name]
            v = "" if kind == "vanilla" else verdict(r.measured[main], base.measured[main],
                                                     "PAG", "vanilla")
            lines.append(_row(f"{arch}, {_label(r.run)}", r, study) + f" {v} |")
    return [*lines, ""]


def _paper(study: Study, results: dict[str, RunResults]) -> list[str]:
    l2 = next((m for m in study.measures if m.norm == "l2"), study.measures[0])
    li = next((m for m in study.measures if m.norm == "linf"), study.measures[-1])
    digits = {"Vanilla (CE only)": study.sources["vanilla"],
              "PAG, One Image": study.sources["one_image"],
              "PAG, Class Mean": study.sources["class_mean"],
              "PAG, Nearest Neighbor": study.sources["nearest_neighbor"],
              "PAG, Score-Based Gradients": study.sources["sbg"]}
    lines = ["## Beside the paper's Figure 1 (CIFAR-10: a different dataset)", "",
             "The paper's robust accuracies are CIFAR-10 ResNet-18 numbers at ε it does not "
             "print; the digits numbers are another dataset, model and budget. Compare the "
             "direction and the order, not the values.", "",
             f"| method | CIFAR-10 L2 (paper) | CIFAR-10 L∞ (paper) | digits {l2.label} | "
             f"digits {li.label} |", "|---|---:|---:|---:|---:|"]
    for method, (pl2, pli) in PAPER_FIGURE_1.items():
        name = digits[method]
        d2 = f"{results[name].measured[l2].accuracy:.3f}"
        di = f"{results[name].measured[li].accuracy:.3f}"
        lines.append(f"| {method} | {pl2:.2f}% | {pli:.2f}% | {d2} | {di} |")
    return [*lines, ""]


def _runs(results: dict[str, RunResults], out: Path) -> list[str]:
    lines = ["## Runs", "", f"OUT is the study's folder (`--out`, here `{out.name}`); every run "
             "lives in OUT/runs/<run>.", "",
             "| run | spec | overrides | train s | attacks s | alignment s |",
             "|---|---|---|---:|---:|---:|"]
    for name, r in results.items():
        overrides = " ".join(o.replace(str(out), "OUT") for o in r.run.overrides)
        lines.append(f"| {name} | {r.run.spec} | {overrides} | "
                     f"{r.train_seconds:.1f} | "
                     f"{sum(m.seconds for m in r.measured.values()):.1f} | "
                     f"{r.align_seconds:.1f} |")
    return [*lines, ""]


def _figure(study: Study, results: dict[str, RunResults], path: Path) -> None:
    """Robust accuracy (each measure) and alignment against λ, one line per source."""
    from pagctl.figures import pyplot, save_png
    from pagctl.stats import error_bars

    plt = pyplot("--figure")
    fig, axes = plt.subplots(1, len(study.measures) + 1,
                             figsize=(3.6 * (len(study.measures) + 1), 3.4), squeeze=False)
    try:
        for j, measure in enumerate([*study.measures, None]):
            ax = axes[0][j]
            for i, (source, names) in enumerate(study.lambda_sweep.items()):
                runs = [results[n] for n in names]
                lams = [r.run.pag_weight for r in runs]
                if measure is None:
                    values = [r.alignment[0] if r.alignment else float("nan") for r in runs]
                    intervals = [r.alignment[1] if r.alignment else None for r in runs]
                else:
                    values = [r.measured[measure].accuracy for r in runs]
                    intervals = [r.measured[measure].interval for r in runs]
                ax.errorbar(lams, values, yerr=error_bars(values, intervals), marker="o",
                            capsize=3, color=f"C{i}",
                            label="NN" if source == "nearest_neighbor" else "SBG")
            lams_all = sorted({results[n].run.pag_weight for names in
                               study.lambda_sweep.values() for n in names})
            ax.set_xscale("symlog", linthresh=0.25)  # λ = 0, 0.25, 0.5 apart; 4 in view
            ax.set_xticks(lams_all, [f"{v:g}" for v in lams_all])
            ax.minorticks_off()
            ax.set_xlabel("λ (symmetric log scale)")
            ax.set_title(measure.label if measure else "alignment", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        axes[0][0].set_ylabel("robust accuracy (95% interval)")
        axes[0][-1].set_ylabel("mean cosine (95% interval)")
        fig.tight_layout()
        save_png(fig, path)
    finally:
        plt.close(fig)


