"""What the digits study trains and measures (`digits_study`), full or quick.

Every run is a built-in spec with overrides, named after what distinguishes it; a run that
several parts of the study need (vanilla at seed 0 is the λ = 0 point of both sweeps, the
first seed of the headline comparison and the small CNN's baseline) is trained once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

LAMBDAS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
SEEDS = (0, 1, 2)
ARCHES = ("small_cnn", "mlp", "vit", "resnet")
_ARCH_SPEC = {"small_cnn": "digits", "mlp": "digits-mlp", "vit": "digits-vit",
              "resnet": "digits-resnet"}
SOURCES = {"nearest_neighbor": "nn", "sbg": "sbg"}
"""The sources swept over λ, across seeds and architectures (spec suffixes)."""
ALL_SOURCES = {"one_image": "oi", "class_mean": "cm", **SOURCES}
"""Every source of the paper's Figure 1, compared once at λ = 1 on the small CNN."""
BUDGETS = {"l2": (0.5, 1.0), "linf": (0.1, 0.15)}


@dataclass(frozen=True)
class StudyRun:
    """One training run: its folder name, built-in spec and overrides, and what it varies."""

    name: str
    spec: str
    overrides: tuple[str, ...]
    source: str  # "none" for vanilla, else the target-gradient source
    pag_weight: float
    seed: int
    arch: str


@dataclass(frozen=True)
class Measure:
    """One attack every run gets: AutoAttack in ``norm`` at ``eps``."""

    norm: str
    eps: float

    @property
    def label(self) -> str:
        return f"AA {'L2' if self.norm == 'l2' else 'L∞'} ε={self.eps:g}"


@dataclass
class Study:
    """The runs, what each gets measured with, and the budgets of the measurements."""

    runs: dict[str, StudyRun]
    lambda_sweep: dict[str, list[str]]  # source -> run names, λ ascending (λ = 0: vanilla)
    seeds: dict[str, list[str]]  # "vanilla" / source -> run names, one per seed
    sources: dict[str, str]  # "vanilla" / every source -> its run at λ = 1 (small CNN, seed 0)
    arches: dict[str, dict[str, str]]  # arch -> {"vanilla" / source: run name}
    measures: list[Measure]
    attack_params: dict[str, object]  # AutoAttack params besides norm and eps
    limit: int | None  # test points attacked and scored (None: all)
    align_source: str = "nearest_neighbor"
    overrides: tuple[str, ...] = ()  # applied to every run (the quick variant's budgets)
    score_overrides: tuple[str, ...] = ()
    quick: bool = False
    notes: list[str] = field(default_factory=list)

    def run_dir(self, out: Path, name: str) -> Path:
        return out / "runs" / name

    @staticmethod
    def score_dir(out: Path) -> Path:
        """The study's score model (trained when SBG runs are planned)."""
        return out / "score-digits"


def _run(arch: str, source: str, pag_weight: float, seed: int,
         score_dir: Path) -> StudyRun:
    base = _ARCH_SPEC[arch]
    if source == "none" or pag_weight == 0:
        spec, source, pag_weight = f"{base}-vanilla", "none", 0.0
    else:
        spec = f"{base}-pag-{ALL_SOURCES[source]}"
    overrides = [f"train.seed={seed}"]
    if source != "none":
        overrides.append(f"train.pag_weight={pag_weight:g}")
    if source == "sbg":
        overrides.append(f"target_gradients.params.run={score_dir}")
    lam = "" if source == "none" else f"-l{pag_weight:g}"
    return StudyRun(f"{spec}{lam}-s{seed}", spec, tuple(overrides), source, pag_weight, seed,
                    arch)


def digits_study(out: Path, *, quick: bool = False) -> Study:
    """The study's plan, its runs' folders under ``out/runs`` and the score model in
    ``out/score-digits``. ``quick``: the same shape on a budget a test can afford (2 λ per
    source, 2 seeds, 2 architectures, 2 epochs, a weakened AutoAttack on 60 points) — its
    numbers say nothing about the paper."""
    score_dir = Study.score_dir(out)
    lambdas = (0.0, 1.0) if quick else LAMBDAS
    seeds = SEEDS[:2] if quick else SEEDS
    arches = ARCHES[:2] if quick else ARCHES
    runs: dict[str, StudyRun] = {}

    def add(run: StudyRun) -> str:
        runs.setdefault(run.name, run)
        return run.name

    sweep = {src: [add(_run("small_cnn", src, lam, 0, score_dir)) for lam in lambdas]
             for src in SOURCES}
    by_seed = {kind: [add(_run("small_cnn", kind, 1.0, seed, score_dir)) for seed in seeds]
               for kind in ("none", *SOURCES)}
    families = {arch: {kind: add(_run(arch, kind, 1.0, 0, score_dir))
                       for kind in ("none", *SOURCES)} for arch in arches}
    sources = {("vanilla" if kind == "none" else kind): add(_run("small_cnn", kind, 1.0, 0,
                                                                 score_dir))
               for kind in ("none", *ALL_SOURCES)}
    measures = [Measure(norm, eps) for norm, budgets in BUDGETS.items()
                for eps in (budgets[:1] if quick else budgets)]
    if quick:
        return Study(
            runs, sweep, {("vanilla" if k == "none" else k): v for k, v in by_seed.items()},
            sources,
            {a: {("vanilla" if k == "none" else k): v for k, v in f.items()}
             for a, f in families.items()},
            measures, {"version": "standard", "steps": 5, "square_queries": 20}, 60,
            overrides=("train.epochs=2", "eval.attack=null", "eval.limit=20"),
            score_overrides=("train.steps=30", "train.log_every=10", "train.save_every=30",
                             "sample.per_class=0", "model.width=16"),
            quick=True, notes=["quick variant: 2 epochs, AutoAttack with 5 steps and 20 "
                               "Square queries on 60 points; the numbers test the pipeline, "
                               "not the paper"])
    return Study(
        runs, sweep, {("vanilla" if k == "none" else k): v for k, v in by_seed.items()},
        sources,
        {a: {("vanilla" if k == "none" else k): v for k, v in f.items()}
         for a, f in families.items()},
        measures, {"version": "standard"}, None)
