"""The toy experiment: does PAG with the exact score make a classifier more robust?

On the 2-D toy mixture (`pagctl.data.toy`) the score is known in closed form, so PAG can be
trained with the *exact* score-based target (``toy_score``) and compared with vanilla
training and with the Nearest Neighbour heuristic under one seed and budget. Three recipes
are trained, each on the same data and seeds:

- ``vanilla``: ``toy-vanilla`` (cross-entropy only);
- ``pag-score``: ``toy-pag-score`` (PAG with the exact posterior score, ``toy_score``);
- ``pag-nn``: ``toy-pag-nn`` (PAG with Nearest Neighbour targets), for reference.

By default each is trained on 60 points (10 per mode) and five seeds: with the built-in
6,000 points every recipe already reaches the robustness of the Bayes classifier, so there
is nothing left for PAG to add (docs/toy.md).

Robustness is measured two ways at each ε of an L2 sweep:

- **exactly**, by `grid_min_distance`: in two dimensions the model can be evaluated on a
  grid of spacing 0.001 over the data's neighbourhood, and each test point's distance to
  the nearest grid point of another class is its minimal adversarial perturbation (to the
  grid's resolution; each such grid point is a verified adversarial example);
- **by attacks**: PGD-L2 (50 steps, 5 random restarts), APGD-CE (L2, 100 steps) and FAB
  (L2), per-point worst case. AutoAttack's standard and rand versions need at least 3–4
  classes (their DLR losses), so on two classes these are the AutoAttack stages that apply.

Outputs in ``out_dir``: ``runs/<model>-seed<s>/`` (ordinary run folders),
``decision_boundaries.png`` (each model's decision regions, one row per seed, with the
training points, the mode centres and the Bayes boundaries), ``robustness.png`` (robust accuracy
against ε, one line per model, pooled over seeds, with 95% Wilson intervals, and the Bayes
classifier for reference) and ``results.json``.

Run it with ``make toy`` or ``python -m pagctl.toy_experiment --out runs/toy`` (the command
line: `pagctl.toy_experiment.__main__`). The exact measures are in
`pagctl.toy_experiment.measures`, the figures in `pagctl.toy_experiment.figures`.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pagctl.toy_experiment.figures import decision_boundaries_figure, robustness_figure
from pagctl.toy_experiment.measures import (
    GRID_RESOLUTION,
    bayes_classifier,
    grid_min_distance,
    score_alignment,
)

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from pagctl.data import DataBundle

__all__ = ["DEFAULT_EPS", "DEFAULT_SEEDS", "DEFAULT_TRAIN_SIZE", "MODELS", "attack_suite",
           "run_toy_experiment", "summary_table"]

DEFAULT_EPS: tuple[float, ...] = (0.01, 0.02, 0.03, 0.05, 0.07, 0.1)
"""The L2 budgets of the sweep; neighbouring modes are 0.134 apart, so the Bayes boundary
lies about 0.067 from each mode centre."""
MODELS: tuple[tuple[str, str], ...] = (
    ("vanilla", "toy-vanilla"), ("pag-score", "toy-pag-score"), ("pag-nn", "toy-pag-nn"))
"""(label, built-in spec) of the recipes compared."""
DEFAULT_TRAIN_SIZE = 60
DEFAULT_SEEDS: tuple[int, ...] = (0, 1, 2, 3, 4)
_ATTACKS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("pgd_l2", {"steps": 50, "restarts": 5}),
    ("apgd_ce", {"norm": "l2", "steps": 100}),
    ("fab", {"norm": "l2"}),
)


def default_budget(train_size: int) -> tuple[int, int]:
    """(batch size, epochs) for ``train_size`` points: the built-in 128 and 30 for the
    built-in 6,000 points; otherwise about five steps per epoch and at least 500 steps."""
    if train_size >= 6000:
        return 128, 30
    batch = max(4, min(128, train_size // 5))
    steps = max(1, train_size // batch)
    return batch, max(30, math.ceil(500 / steps))


# ---------------------------------------------------------------------------------------
# one run


def _overrides(seed: int, train_size: int, epochs: int, batch: int,
               run_dir: Path) -> list[str]:
    return [f"train.seed={seed}", f"data.split_seed={seed}",
            f"data.toy_train_size={train_size}", f"data.batch_size={batch}",
            f"train.epochs={epochs}", f"eval.every={epochs}",
            "eval.align_source.name=toy_score", f"out_dir={run_dir}"]


def attack_suite(model: nn.Module, bundle: DataBundle, eps: float, seed: int,
                 device: torch.device) -> dict[str, Any]:
    """PGD-L2 (5 restarts), APGD-CE and FAB at ``eps``; per-point worst case: robust count
    and accuracy, and each attack's own robust accuracy."""
    import torch

    from pagctl import registry
    from pagctl.build import build_context
    from pagctl.evaluation.request import EvaluationRequest
    from pagctl.robustness.engine import run_attack

    test = bundle.test
    indices = torch.arange(len(test))  # type: ignore[arg-type]
    robust: Tensor | None = None
    each = {}
    for name, extra in _ATTACKS:
        params = registry.attacks.validate_params(name, {"eps": eps, **extra}, name)
        attack = registry.attacks.instantiate(
            name, params, build_context(bundle, device, seed, None), name)
        report = run_attack(model, attack, test, indices, name=name, params=params,
                            request=EvaluationRequest(batch_size=len(indices), device=device,
                                                      seed=seed))
        mask = report.robust_mask
        robust = mask if robust is None else robust & mask
        each[name] = report.robust_accuracy
    assert robust is not None
    return {"robust_correct": int(robust.sum()), "robust_accuracy": float(robust.float().mean()),
            "per_attack": each}


def _evaluate_run(run_dir: Path, eps_list: Sequence[float], device: torch.device,
                  seed: int, attacks: bool) -> dict[str, Any]:
    from pagctl.checkpoint import load_run
    from pagctl.data import load_data

    loaded = load_run(run_dir, device=device)
    bundle = load_data(loaded.spec.data)
    test = bundle.test
    images, labels = test.images, test.labels  # type: ignore[attr-defined]
    model = loaded.model.cpu()
    dist = grid_min_distance(model, images, labels, max_eps=max(eps_list))
    alignment, orientation = score_alignment(model, images, labels)
    model.to(device)
    out: dict[str, Any] = {
        "seed": seed, "run_dir": str(run_dir), "n_test": int(labels.numel()),
        "clean_accuracy": float((dist > 0).float().mean()),
        "alignment": alignment, "orientation": orientation,
        "exact": {"robust_correct": [int((dist > e).sum()) for e in eps_list],
                  "robust_accuracy": [float((dist > e).float().mean()) for e in eps_list],
                  "mean_min_distance": float(dist.clamp_max(1.0).mean())},
    }
    if attacks:
        suite = [attack_suite(model, bundle, e, seed, device) for e in eps_list]
        out["attacks"] = {
            "robust_correct": [s["robust_correct"] for s in suite],
            "robust_accuracy": [s["robust_accuracy"] for s in suite],
            "per_attack": {name: [s["per_attack"][name] for s in suite]
                           for name, _ in _ATTACKS},
        }
    return out


def _pool(per_seed: list[dict[str, Any]], key: str, n_eps: int) -> dict[str, Any]:
    """Robust accuracy pooled over seeds (Wilson 95% intervals on the pooled counts) and the
    spread across seeds."""
    from pagctl.stats import wilson_interval

    n = sum(r["n_test"] for r in per_seed)
    correct = [sum(r[key]["robust_correct"][i] for r in per_seed) for i in range(n_eps)]
    accs = [[r[key]["robust_accuracy"][i] for r in per_seed] for i in range(n_eps)]
    return {"n": n, "robust_correct": correct,
            "robust_accuracy": [k / n for k in correct],
            "interval": [list(wilson_interval(k, n)) for k in correct],
            "seed_mean": [statistics.fmean(a) for a in accs],
            "seed_sd": [statistics.pstdev(a) if len(a) > 1 else 0.0 for a in accs]}


# ---------------------------------------------------------------------------------------
# the experiment


def run_toy_experiment(
    out_dir: Path | str,
    *,
    device: str = "cpu",
    epochs: int | None = None,
    progress: bool = True,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    train_size: int = DEFAULT_TRAIN_SIZE,
    eps: Sequence[float] = DEFAULT_EPS,
    attacks: bool = True,
    figures: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train the three toy recipes (``MODELS``) for every seed, measure their robustness
    (exactly and by attacks) over the ε sweep, write the figures and ``results.json`` into
    ``out_dir`` and return the results.

    ``epochs`` / ``train_size``: the budget shared by every recipe (``epochs`` None: see
    `default_budget`). ``attacks``: also run the attack suite (the exact measure is always
    computed). ``figures``: write the PNGs (needs matplotlib). ``log``: where status lines
    go (default: stderr when ``progress``).
    """
    import torch

    threads = torch.get_num_threads()
    if str(device) == "cpu":
        torch.set_num_threads(1)  # tiny models: one thread is fastest, more only contend
    try:
        return _run(Path(out_dir), device=device, epochs=epochs, progress=progress,
                    seeds=seeds, train_size=train_size, eps=eps, attacks=attacks,
                    figures=figures, log=log)
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, *, device: str, epochs: int | None, progress: bool, seeds: Sequence[int],
         train_size: int, eps: Sequence[float], attacks: bool, figures: bool,
         log: Callable[[str], None] | None) -> dict[str, Any]:
    from pagctl.build import resolve_device
    from pagctl.data import load_data
    from pagctl.spec import load_spec
    from pagctl.train import train

    out.mkdir(parents=True, exist_ok=True)
    emit = log or ((lambda msg: print(msg, file=sys.stderr, flush=True)) if progress
                   else (lambda msg: None))
    dev = resolve_device(device)
    eps_list = [float(e) for e in eps]
    batch, default_epochs = default_budget(train_size)
    n_epochs = default_epochs if epochs is None else epochs
    started = time.perf_counter()
    results: dict[str, Any] = {
        "kind": "toy_experiment", "eps": eps_list, "seeds": list(seeds),
        "train_size": train_size, "batch_size": batch, "epochs": n_epochs,
        "grid_resolution": GRID_RESOLUTION,
        "attacks": [{"name": n, "params": p} for n, p in _ATTACKS] if attacks else [],
        "models": {},
    }
    panels: list[list[dict[str, Any]]] = [[] for _ in seeds]
    for label, spec_name in MODELS:
        per_seed = []
        for row, seed in enumerate(seeds):
            run_dir = out / "runs" / f"{label}-seed{seed}"
            spec = load_spec(spec_name, _overrides(seed, train_size, n_epochs, batch, run_dir))
            tick = time.perf_counter()
            train(spec, device=str(dev), overwrite=True, progress=progress)
            train_seconds = time.perf_counter() - tick
            tick = time.perf_counter()
            record = _evaluate_run(run_dir, eps_list, dev, seed, attacks)
            record["train_seconds"] = train_seconds
            record["eval_seconds"] = time.perf_counter() - tick
            per_seed.append(record)
            mid = eps_list.index(0.05) if 0.05 in eps_list else len(eps_list) // 2
            emit(f"{label} seed {seed}: clean {record['clean_accuracy']:.3f}, exact robust "
                 f"@{eps_list[mid]:g} {record['exact']['robust_accuracy'][mid]:.3f} "
                 f"(training {train_seconds:.1f}s, evaluation {record['eval_seconds']:.1f}s)")
            if figures:
                from pagctl.checkpoint import load_run

                bundle = load_data(spec.data)
                panels[row].append({
                    "model": load_run(run_dir).model,
                    "train": (bundle.train.images, bundle.train.labels),  # type: ignore[attr-defined]
                    "title": f"{label}, seed {seed}: clean {record['clean_accuracy']:.3f}\n"
                             f"robust @{eps_list[mid]:g}: "
                             f"{record['exact']['robust_accuracy'][mid]:.3f}"})
        entry: dict[str, Any] = {"spec": spec_name,
                                 "target_gradients": spec.target_gradients.model_dump(),
                                 "pag_weight": spec.train.pag_weight, "per_seed": per_seed,
                                 "exact": _pool(per_seed, "exact", len(eps_list))}
        if attacks:
            entry["attacks"] = _pool(per_seed, "attacks", len(eps_list))
        for key in ("alignment", "orientation"):
            values = [r[key] for r in per_seed]
            entry[key] = {"seed_mean": statistics.fmean(values),
                          "seed_sd": statistics.pstdev(values) if len(values) > 1 else 0.0}
        results["models"][label] = entry
    # The Bayes classifier on the same test sets, for reference.
    bayes = bayes_classifier()
    bayes_runs = []
    for seed in seeds:
        data = load_spec("toy-vanilla", [f"data.split_seed={seed}"]).data
        test = load_data(data).test
        dist = grid_min_distance(bayes, test.images, test.labels,  # type: ignore[attr-defined]
                                 max_eps=max(eps_list))
        bayes_runs.append({"n_test": int(dist.numel()), "exact": {
            "robust_correct": [int((dist > e).sum()) for e in eps_list],
            "robust_accuracy": [float((dist > e).float().mean()) for e in eps_list]}})
    results["bayes"] = {"exact": _pool(bayes_runs, "exact", len(eps_list))}
    results["seconds"] = time.perf_counter() - started
    if figures:
        decision_boundaries_figure(out / "decision_boundaries.png", panels)
        curves = [{"label": f"{label} (exact)", "accuracy": entry["exact"]["robust_accuracy"],
                   "interval": entry["exact"]["interval"]}
                  for label, entry in results["models"].items()]
        curves.append({"label": "Bayes classifier (exact)",
                       "accuracy": results["bayes"]["exact"]["robust_accuracy"],
                       "interval": results["bayes"]["exact"]["interval"],
                       "style": {"color": "0.5", "ls": "--", "marker": "s"}})
        robustness_figure(
            out / "robustness.png", eps_list, curves,
            f"toy, {train_size} training points, {len(seeds)} seed(s) pooled "
            f"({len(seeds) * per_seed[0]['n_test']} test points per curve)")
    from pagctl.checkpoint import atomic_write_text

    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    return results


def summary_table(results: dict[str, Any]) -> str:
    """Robust accuracy per model and ε as a plain-text table (exact; attacks in brackets),
    then each model's alignment with the exact score."""
    eps = results["eps"]
    head = f"{'model':<22}" + "".join(f"{'ε=' + format(e, 'g'):>16}" for e in eps)
    lines = [head]
    rows = list(results["models"].items()) + [("bayes", results["bayes"])]
    for label, entry in rows:
        cells = []
        for i in range(len(eps)):
            text = f"{entry['exact']['robust_accuracy'][i]:.3f}"
            if "attacks" in entry:
                text += f" [{entry['attacks']['robust_accuracy'][i]:.3f}]"
            cells.append(f"{text:>16}")
        lines.append(f"{label:<22}" + "".join(cells))
    lines.append("")
    lines.append("cosine with the exact score on test points (mean over seeds): signed | absolute")
    for label, entry in results["models"].items():
        lines.append(f"{label:<22}{entry['alignment']['seed_mean']:>8.3f} |"
                     f"{entry['orientation']['seed_mean']:>7.3f}")
    return "\n".join(lines)
