"""Attack speed: pagctl's PGD, newer attacks and AutoAttack against torchattacks, foolbox
and pyautoattack.

Three measurements, on the same models, the same points and the same machine, in one run:

1. **PGD, seconds per step.** `pagctl.attacks.pgd.pgd` against ``torchattacks.PGD`` (L∞) and
   ``torchattacks.PGDL2`` (L2) with the same ε, step size, number of steps and a random
   start, one restart, on
   - ``digits``: a small CNN (``pagctl_small_cnn``, width 0.5, one input channel) trained
     for a few seconds on scikit-learn's 8×8 digits (pixels /16), attacked on held-out
     digits;
   - ``resnet18``: the CIFAR ResNet-18 (``pagctl_cifar_resnet18``) with random weights on
     random 32×32×3 pixels and random labels (the cost of a step does not depend on them).

   A run's wall time divided by its number of steps is one sample; the median over
   ``--repeats`` runs is reported (the two implementations alternate, each after one
   untimed warm-up run). pagctl's time includes everything its ``pgd`` does besides the
   steps: one extra forward to check the last iterate and the final fit into the budget.
   Robust accuracies differ by design: the random starts come from different generators,
   and pagctl keeps, per point, the first iterate that fools the model, where torchattacks
   returns the last iterate.
2. **The newer attacks, seconds per step**, timed as PGD is (same models and points, one
   untimed warm-up run each, alternating runs, medians), each against the reference it was
   written after, configured alike (L∞ ε, step size and steps as PGD's above):
   - ``mifgsm`` (decay 1) against ``torchattacks.MIFGSM``;
   - ``eot_pgd`` (L∞, ``eot_iter=2``, random start) against ``torchattacks.EOTPGD``
     (``eot_iter=2``);
   - targeted PGD, ``target=least_likely`` on ``pgd_l2`` and ``pgd_linf``, against
     ``torchattacks.PGDL2`` / ``PGD`` after ``set_mode_targeted_least_likely()`` (both take the
     least-likely class other than the label, from one clean forward);
   - ``deepfool`` (L2, overshoot 0.02, 10 candidates, no budget) against foolbox's
     ``L2DeepFoolAttack`` (the same), both given the model's own predictions as labels:
     foolbox ranks the candidates after the prediction and keeps computing on every point until
     all are fooled, pagctl after the label and only on the points not yet fooled, so with the
     true labels they would not attack the same points. DeepFool stops early; its "per step"
     is a run's time divided by the steps allowed;
   - ``pgd_l1`` (quantile 0.99, step ε/4, no random start; L1 ε = 1.5 on the digits, 12 on the
     ResNet-18) against foolbox's ``SparseL1DescentAttack`` (the same; its projection onto the
     L1 ball is followed by a clip to the box where pagctl's is exact onto both).
   Every call goes through the public entry point a user calls: pagctl's plugin (built per
   run), torchattacks' ``attack(x, y)``, foolbox's ``attack(fmodel, x, y, epsilons=...)``
   (which adds one forward to check success).
3. **AutoAttack standard, end to end.** pagctl's `AutoAttack` plugin (APGD-CE → APGD-T →
   FAB-T → Square, each on the points still robust) against pyautoattack's
   ``run_standard_evaluation``, on the trained digits model, L2, L∞ and L1. Both get one untimed
   warm-up on a few points with a tiny budget. Per stage, the table gives the time and the
   forward passes (one per example; "grad" = forwards whose graph is kept for a backward),
   counted by a forward hook on the model.

Models are in eval mode, inputs in [0, 1], no normalisation inside the attacks; model
parameters keep ``requires_grad=True`` as a loaded model has them. Ratios are
pagctl / reference: below 1.0 pagctl is faster. Absolute times on a shared machine vary from
run to run; compare the ratios of one invocation. On CPU the process CPU time (summed over
threads) is reported as well: it is less disturbed than wall time by other processes.
Run from the repository root, e.g.::

    python benchmarks/bench_attacks.py --quick
    python benchmarks/bench_attacks.py --quick --threads 1 --only pgd,new
    python benchmarks/bench_attacks.py --device cuda --repeats 10
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DIGITS_TRAIN = 1400  # the first 1,400 of a seeded permutation train; the rest (397) test
DIGITS_WIDTH = 0.5
# (eps, step size) per norm; the step size is ε/4 (= 2.5·ε/steps at 10 steps).
PGD_BUDGETS = {
    "digits": {"l2": (0.5, 0.125), "linf": (0.1, 0.025)},
    "resnet18": {"l2": (0.5, 0.125), "linf": (8 / 255, 2 / 255)},
}
AA_EPS = {"l2": 0.5, "linf": 0.1, "l1": 1.5}
AA_STAGES = ("apgd_ce", "apgd_t", "fab_t", "square")


# ---------------------------------------------------------------------------------------
# timing helpers


class Clock:
    """Wall and process CPU time of a block, synchronising CUDA before reading the timers."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.wall = 0.0
        self.cpu = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def measure(self) -> Iterator[Clock]:
        self._sync()
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield self
        finally:
            self._sync()
            self.wall = time.perf_counter() - wall
            self.cpu = time.process_time() - cpu


class PassCounter:
    """Counts forward passes through ``model`` (one per example), per label.

    ``label`` is set by the caller (the AutoAttack stage running); ``grad`` counts the
    forwards whose output requires grad, i.e. those a backward may follow.
    """

    def __init__(self, model: nn.Module) -> None:
        self.label = "other"
        self.forward: dict[str, int] = {}
        self.grad: dict[str, int] = {}
        self._handle = model.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        rows = int(output.shape[0])
        self.forward[self.label] = self.forward.get(self.label, 0) + rows
        if output.requires_grad:
            self.grad[self.label] = self.grad.get(self.label, 0) + rows

    def reset(self) -> None:
        self.label = "other"
        self.forward, self.grad = {}, {}

    def remove(self) -> None:
        self._handle.remove()


def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


Samples = dict[str, list[float]]


def _alternate(runners: dict[str, Callable[[Tensor, Tensor, int], Tensor]], model: nn.Module,
               x: Tensor, y: Tensor, norm: str, eps: float, args: argparse.Namespace,
               clock: Clock, what: str, model_name: str,
               ) -> tuple[Samples, Samples, Samples, Samples]:
    """Each runner timed ``args.repeats`` times at ``args.steps`` steps, in alternating
    order, after one untimed one-step warm-up (allocator, oneDNN/cuDNN primitives): per
    runner the wall and CPU seconds per step, the robust accuracy and the largest
    perturbation of each run. Exits when a runner leaves the ε-ball."""
    torch.manual_seed(0)  # torchattacks draws its random start from the global RNG
    for run in runners.values():
        run(x, y, 1)
    wall: Samples = {k: [] for k in runners}
    cpu: Samples = {k: [] for k in runners}
    robust: Samples = {k: [] for k in runners}
    size: Samples = {k: [] for k in runners}
    order = list(runners)
    for rep in range(args.repeats):
        for name in order if rep % 2 == 0 else order[::-1]:
            with clock.measure():
                adv = runners[name](x, y, args.steps)
            wall[name].append(clock.wall / args.steps)
            cpu[name].append(clock.cpu / args.steps)
            robust[name].append(_accuracy(model, adv, y))
            size[name].append(_max_norm(x, adv, norm))
            if size[name][-1] > eps * (1 + 1e-5) + 1e-7:
                raise SystemExit(f"{name} {what} left the ε-ball on {model_name}")
    return wall, cpu, robust, size


def _max_norm(x: Tensor, x_adv: Tensor, norm: str) -> float:
    from pagctl.attacks.steps import norms_of

    per = norms_of(x_adv - x, norm)  # type: ignore[arg-type]
    return float(per.max()) if per.numel() else 0.0


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


# ---------------------------------------------------------------------------------------
# models and data


def _digits(n_test: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's digits as (N, 1, 8, 8) pixels k/16: train x, y and ``n_test`` test x, y."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:DIGITS_TRAIN], perm[DIGITS_TRAIN:DIGITS_TRAIN + n_test]
    return x[train], y[train], x[test], y[test]


def _timm_model(name: str, **kwargs: Any) -> nn.Module:
    import timm

    import pagctl.architectures  # noqa: F401  (registers the pagctl_* names in timm)

    model: nn.Module = timm.create_model(name, **kwargs)
    return model


def _train_digits_cnn(x: Tensor, y: Tensor, epochs: int) -> nn.Module:
    """``pagctl_small_cnn`` (width 0.5) trained with Adam on CPU; returned in eval mode."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = _timm_model("pagctl_small_cnn", num_classes=10, in_chans=1, width=DIGITS_WIDTH)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for batch in torch.split(torch.randperm(len(x), generator=gen), 64):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[batch]), y[batch])
            torch.autograd.backward(loss)
            opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    return model


# ---------------------------------------------------------------------------------------
# PGD


def _pgd_runners(model: nn.Module, norm: str, eps: float, alpha: float
                 ) -> dict[str, Callable[[Tensor, Tensor, int], Tensor]]:
    """``{"pagctl": run, "torchattacks": run}``, ``run(x, y, steps) -> x_adv``."""
    import torchattacks

    from pagctl.attacks.pgd import pgd

    generator = torch.Generator().manual_seed(0)

    def run_pagctl(x: Tensor, y: Tensor, steps: int) -> Tensor:
        return pgd(model, x, y, norm=norm, eps=eps, steps=steps,  # type: ignore[arg-type]
                   step_size=alpha, random_start=True, restarts=1, generator=generator)

    def run_torchattacks(x: Tensor, y: Tensor, steps: int) -> Tensor:
        cls = torchattacks.PGDL2 if norm == "l2" else torchattacks.PGD
        attack = cls(model, eps=eps, alpha=alpha, steps=steps, random_start=True)
        # torchattacks' defaults, stated: eval mode during the attack, no normalisation.
        attack.set_model_training_mode(model_training=False)
        assert attack.normalization_used is None
        adv: Tensor = attack(x, y)
        return adv

    return {"pagctl": run_pagctl, "torchattacks": run_torchattacks}


def bench_pgd(model: nn.Module, model_name: str, x: Tensor, y: Tensor, args: argparse.Namespace
              ) -> list[dict[str, Any]]:
    """One row per norm: median seconds per step of both implementations, robust accuracy."""
    device = torch.device(args.device)
    clock = Clock(device)
    rows = []
    for norm in ("l2", "linf"):
        eps, alpha = PGD_BUDGETS[model_name][norm]
        runners = _pgd_runners(model, norm, eps, alpha)
        wall, cpu, robust, _ = _alternate(runners, model, x, y, norm, eps, args, clock,
                                          f"PGD-{norm}", model_name)
        med = {k: statistics.median(v) for k, v in wall.items()}
        med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
        rows.append({
            "model": model_name, "norm": norm, "eps": eps, "step_size": alpha,
            "steps": args.steps, "batch": int(x.shape[0]), "repeats": args.repeats,
            "pagctl_s_per_step": med["pagctl"], "torchattacks_s_per_step": med["torchattacks"],
            "ratio": _ratio(med["pagctl"], med["torchattacks"]),
            "pagctl_cpu_s_per_step": med_cpu["pagctl"],
            "torchattacks_cpu_s_per_step": med_cpu["torchattacks"],
            "cpu_ratio": _ratio(med_cpu["pagctl"], med_cpu["torchattacks"]),
            "pagctl_robust_acc": statistics.mean(robust["pagctl"]),
            "torchattacks_robust_acc": statistics.mean(robust["torchattacks"]),
            "clean_acc": _accuracy(model, x, y),
            "pagctl_wall_samples": wall["pagctl"],
            "torchattacks_wall_samples": wall["torchattacks"],
        })
    return rows


# ---------------------------------------------------------------------------------------
# the newer attacks


L1_EPS = {"digits": 1.5, "resnet18": 12.0}
"""pgd_l1's L1 radius: AutoAttack's L1 budget on the digits, its CIFAR-10 one (12) on the
ResNet-18; the step is ε/4 in both libraries."""
NEW_ATTACKS = ("mifgsm", "eot_pgd", "pgd_ll", "deepfool", "pgd_l1")
"""The rows of the newer-attacks section, in order (``pgd_ll``: targeted least-likely
PGD, L2 and L∞)."""


def _ctx(x: Tensor) -> Any:
    from pagctl.protocols import BuildContext

    return BuildContext(num_classes=10, input_shape=tuple(x.shape[1:]),  # type: ignore[arg-type]
                        device=x.device, seed=0)


def _torchattacks_eval(attack: Any) -> Any:
    """torchattacks' defaults, stated: eval mode during the attack, no normalisation."""
    attack.set_model_training_mode(model_training=False)
    assert attack.normalization_used is None
    return attack


def _new_runners(model: nn.Module, model_name: str, x: Tensor
                 ) -> list[tuple[str, str, str, float, Callable[[Tensor, Tensor, int], Tensor],
                                 Callable[[Tensor, Tensor, int], Tensor]]]:
    """``(attack, norm, reference name, eps, run_pagctl, run_reference)`` per row; each
    ``run(x, y, steps) -> x_adv`` builds its attack and calls it the way a user would (pagctl's
    plugin ``__call__``, torchattacks' ``attack(x, y)``, foolbox's ``attack(fmodel, x, y,
    epsilons=...)``)."""
    import torchattacks
    from foolbox.attacks.deepfool import L2DeepFoolAttack
    from foolbox.attacks.sparse_l1_descent_attack import SparseL1DescentAttack
    from foolbox.models.pytorch import PyTorchModel

    from pagctl.attacks.deepfool import DeepFool
    from pagctl.attacks.mifgsm import MIFGSM
    from pagctl.attacks.pgd import EOTPGD, PGDL2, PGDLinf
    from pagctl.attacks.pgd_l1 import PGDL1

    ctx = _ctx(x)
    fmodel = PyTorchModel(model, bounds=(0.0, 1.0), device=x.device)
    linf_eps, linf_alpha = PGD_BUDGETS[model_name]["linf"]
    l2_eps, l2_alpha = PGD_BUDGETS[model_name]["l2"]
    l1_eps = L1_EPS[model_name]
    rows: list[Any] = []

    def mifgsm_p(x: Tensor, y: Tensor, steps: int) -> Tensor:
        params = MIFGSM.Params(eps=linf_eps, steps=steps, step_size=linf_alpha, decay=1.0)
        adv: Tensor = MIFGSM(params, ctx)(model, x, y)
        return adv

    def mifgsm_r(x: Tensor, y: Tensor, steps: int) -> Tensor:
        attack = torchattacks.MIFGSM(model, eps=linf_eps, alpha=linf_alpha, steps=steps,
                                     decay=1.0)
        adv: Tensor = _torchattacks_eval(attack)(x, y)
        return adv

    rows.append(("mifgsm", "linf", "torchattacks.MIFGSM", linf_eps, mifgsm_p, mifgsm_r))

    def eot_p(x: Tensor, y: Tensor, steps: int) -> Tensor:
        params = EOTPGD.Params(eps=linf_eps, norm="linf", steps=steps, step_size=linf_alpha,
                               eot_iter=2, random_start=True)
        adv: Tensor = EOTPGD(params, ctx)(model, x, y)
        return adv

    def eot_r(x: Tensor, y: Tensor, steps: int) -> Tensor:
        attack = torchattacks.EOTPGD(model, eps=linf_eps, alpha=linf_alpha, steps=steps,
                                     eot_iter=2, random_start=True)
        adv: Tensor = _torchattacks_eval(attack)(x, y)
        return adv

    rows.append(("eot_pgd", "linf", "torchattacks.EOTPGD", linf_eps, eot_p, eot_r))

    for norm, eps, alpha in (("l2", l2_eps, l2_alpha), ("linf", linf_eps, linf_alpha)):
        cls: Any = PGDL2 if norm == "l2" else PGDLinf
        ref_cls: Any = torchattacks.PGDL2 if norm == "l2" else torchattacks.PGD

        def ll_p(x: Tensor, y: Tensor, steps: int, cls: Any = cls, eps: float = eps,
                 alpha: float = alpha) -> Tensor:
            params = cls.Params(eps=eps, steps=steps, step_size=alpha, random_start=True,
                                target="least_likely")
            adv: Tensor = cls(params, ctx)(model, x, y)
            return adv

        def ll_r(x: Tensor, y: Tensor, steps: int, ref_cls: Any = ref_cls, eps: float = eps,
                 alpha: float = alpha) -> Tensor:
            attack = ref_cls(model, eps=eps, alpha=alpha, steps=steps, random_start=True)
            attack.set_mode_targeted_least_likely(quiet=True)
            adv: Tensor = _torchattacks_eval(attack)(x, y)
            return adv

        rows.append(("pgd_ll", norm, f"torchattacks.{ref_cls.__name__} least-likely", eps,
                     ll_p, ll_r))

    def deepfool_p(x: Tensor, y: Tensor, steps: int) -> Tensor:
        params = DeepFool.Params(eps=1e6, norm="l2", steps=steps, overshoot=0.02,
                                 candidates=10)
        adv: Tensor = DeepFool(params, ctx)(model, x, y)
        return adv

    def deepfool_r(x: Tensor, y: Tensor, steps: int) -> Tensor:
        attack = L2DeepFoolAttack(steps=steps, candidates=10, overshoot=0.02)
        adv: Tensor = attack(fmodel, x, y, epsilons=None)[0]
        return adv

    rows.append(("deepfool", "l2", "foolbox L2DeepFoolAttack", math.inf, deepfool_p,
                 deepfool_r))

    def l1_p(x: Tensor, y: Tensor, steps: int) -> Tensor:
        params = PGDL1.Params(eps=l1_eps, steps=steps, step_size=l1_eps / 4, quantile=0.99)
        adv: Tensor = PGDL1(params, ctx)(model, x, y)
        return adv

    def l1_r(x: Tensor, y: Tensor, steps: int) -> Tensor:
        attack = SparseL1DescentAttack(quantile=0.99, abs_stepsize=l1_eps / 4, steps=steps,
                                       random_start=False)
        adv: Tensor = attack(fmodel, x, y, epsilons=l1_eps)[1]
        return adv

    rows.append(("pgd_l1", "l1", "foolbox SparseL1DescentAttack", l1_eps, l1_p, l1_r))
    return rows


def bench_new(model: nn.Module, model_name: str, x: Tensor, y: Tensor, args: argparse.Namespace
              ) -> list[dict[str, Any]]:
    """One row per newer attack (and norm): median seconds per step of pagctl and of the
    reference, timed as :func:`bench_pgd` times PGD (one untimed warm-up run of one step each,
    then alternating runs of ``--steps`` steps). DeepFool runs on the model's own predictions
    as labels, so that both implementations attack every point (module docstring)."""
    device = torch.device(args.device)
    clock = Clock(device)
    with torch.no_grad():
        predicted = model(x).argmax(dim=1)
    rows = []
    for attack, norm, ref_name, eps, run_p, run_r in _new_runners(model, model_name, x):
        if attack not in args.new_attacks:
            continue
        labels = predicted if attack == "deepfool" else y
        runners = {"pagctl": run_p, "reference": run_r}
        wall, cpu, robust, size = _alternate(runners, model, x, labels, norm, eps, args,
                                             clock, f"{attack}-{norm}", model_name)
        med = {k: statistics.median(v) for k, v in wall.items()}
        med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
        rows.append({
            "model": model_name, "attack": attack, "norm": norm, "reference": ref_name,
            "eps": eps, "steps": args.steps, "batch": int(x.shape[0]), "repeats": args.repeats,
            "pagctl_s_per_step": med["pagctl"], "reference_s_per_step": med["reference"],
            "ratio": _ratio(med["pagctl"], med["reference"]),
            "pagctl_cpu_s_per_step": med_cpu["pagctl"],
            "reference_cpu_s_per_step": med_cpu["reference"],
            "cpu_ratio": _ratio(med_cpu["pagctl"], med_cpu["reference"]),
            "pagctl_robust_acc": statistics.mean(robust["pagctl"]),
            "reference_robust_acc": statistics.mean(robust["reference"]),
            "pagctl_max_norm": max(size["pagctl"]),
            "reference_max_norm": max(size["reference"]),
            "clean_acc": _accuracy(model, x, labels),
            "pagctl_wall_samples": wall["pagctl"],
            "reference_wall_samples": wall["reference"],
        })
    return rows


# ---------------------------------------------------------------------------------------
# AutoAttack


RUNS_TOGETHER: list[int | None] = [None]
"""The pagctl AutoAttack's ``runs_together`` (``--runs-together``; None: its default)."""


def _pagctl_autoattack(norm: str, eps: float, device: torch.device, *, steps: int = 100,
                       queries: int = 5000) -> Any:
    from pagctl.attacks.autoattack import AutoAttack
    from pagctl.protocols import BuildContext

    params = AutoAttack.Params(eps=eps, norm=norm, version="standard", seed=0, steps=steps,
                               square_queries=queries, runs_together=RUNS_TOGETHER[0])
    return AutoAttack(params, BuildContext(num_classes=10, input_shape=(1, 8, 8),
                                           device=device, seed=0))


def _reference_autoattack(model: nn.Module, norm: str, eps: float, device: torch.device, *,
                          steps: int = 100, queries: int = 5000) -> Any:
    from pyautoattack import AutoAttack

    ref = AutoAttack(model, norm={"l2": "L2", "linf": "Linf", "l1": "L1"}[norm], eps=eps,
                     version="standard", seed=0, device=device)
    ref.verbose = False
    if steps != 100 or queries != 5000:  # the warm-up's tiny budget
        ref.apgd.n_iter = ref.apgd_targeted.n_iter = ref.fab.n_iter = steps
        # L1's 3ε → 2ε → ε schedule splits the iterations it was built with
        ref.apgd.n_iter_orig = ref.apgd_targeted.n_iter_orig = steps
        ref.square.n_queries = queries
    return ref


class _Stages:
    """Times each stage and labels the pass counter with it, by wrapping the callables."""

    def __init__(self, clock_device: torch.device, counter: PassCounter) -> None:
        self.device = clock_device
        self.counter = counter
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def wrap(self, name: str, fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        def timed(*args: Any, **kwargs: Any) -> Tensor:
            clock = Clock(self.device)
            self.counter.label = name
            with clock.measure():
                out = fn(*args, **kwargs)
            self.counter.label = "other"
            self.wall[name] = self.wall.get(name, 0.0) + clock.wall
            self.cpu[name] = self.cpu.get(name, 0.0) + clock.cpu
            return out

        return timed


def _run_pagctl_aa(model: nn.Module, x: Tensor, y: Tensor, norm: str, eps: float,
                   device: torch.device, stages: _Stages | None = None, **budget: int) -> Tensor:
    attack = _pagctl_autoattack(norm, eps, device, **budget)
    if stages is not None:
        # The plugin runs its stages from this list in order; wrap each one to time it.
        attack._stages = [(name, stages.wrap(name, st)) for name, st in attack.stages()]
    adv: Tensor = attack(model, x, y)
    return adv


def _run_reference_aa(model: nn.Module, x: Tensor, y: Tensor, norm: str, eps: float,
                      device: torch.device, stages: _Stages | None = None,
                      **budget: int) -> Tensor:
    ref = _reference_autoattack(model, norm, eps, device, **budget)
    if stages is not None:
        for name, obj in (("apgd_ce", ref.apgd), ("apgd_t", ref.apgd_targeted),
                          ("fab_t", ref.fab), ("square", ref.square)):
            obj.perturb = stages.wrap(name, obj.perturb)
    rng = torch.get_rng_state()  # the reference seeds the global RNG
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        adv: Tensor = ref.run_standard_evaluation(x, y, batch_size=max(1, x.shape[0]))[0]
    finally:
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    return adv


def _median_sample(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of the repeats' times (overall and per stage); the last repeat's counts."""
    stage_names = {k for smp in samples for k in smp["stage_wall"]}
    return {
        **samples[-1],
        "wall": statistics.median(smp["wall"] for smp in samples),
        "cpu": statistics.median(smp["cpu"] for smp in samples),
        "robust": statistics.mean(smp["robust"] for smp in samples),
        "max_norm": max(smp["max_norm"] for smp in samples),
        "stage_wall": {k: statistics.median(smp["stage_wall"].get(k, 0.0) for smp in samples)
                       for k in stage_names},
        "stage_cpu": {k: statistics.median(smp["stage_cpu"].get(k, 0.0) for smp in samples)
                      for k in stage_names},
    }


def bench_autoattack(model: nn.Module, x: Tensor, y: Tensor, args: argparse.Namespace
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per norm: end-to-end seconds, robust accuracies; per stage: seconds and passes."""
    device = torch.device(args.device)
    runners = {"pagctl": _run_pagctl_aa, "pyautoattack": _run_reference_aa}
    counter = PassCounter(model)
    rows, stage_rows = [], []
    try:
        for norm in args.norms:
            eps = AA_EPS[norm]
            for run in runners.values():  # warm-up: tiny budget on a few points
                run(model, x[:8], y[:8], norm, eps, device, steps=2, queries=10)
            samples: dict[str, list[dict[str, Any]]] = {k: [] for k in runners}
            order = list(runners)
            for rep in range(args.aa_repeats):
                for name in order if rep % 2 == 0 else order[::-1]:
                    stages = _Stages(device, counter)
                    counter.reset()
                    clock = Clock(device)
                    with clock.measure():
                        adv = runners[name](model, x, y, norm, eps, device, stages)
                    samples[name].append({
                        "wall": clock.wall, "cpu": clock.cpu,
                        "robust": _accuracy(model, adv, y), "max_norm": _max_norm(x, adv, norm),
                        "stage_wall": dict(stages.wall), "stage_cpu": dict(stages.cpu),
                        "forward": dict(counter.forward),
                        "grad": dict(counter.grad),
                    })
            result = {k: _median_sample(v) for k, v in samples.items()}
            p, r = result["pagctl"], result["pyautoattack"]
            rows.append({
                "norm": norm, "eps": eps, "points": int(x.shape[0]),
                "clean_acc": _accuracy(model, x, y),
                "pagctl_s": p["wall"], "pyautoattack_s": r["wall"],
                "ratio": _ratio(p["wall"], r["wall"]),
                "pagctl_cpu_s": p["cpu"], "pyautoattack_cpu_s": r["cpu"],
                "cpu_ratio": _ratio(p["cpu"], r["cpu"]),
                "pagctl_robust_acc": p["robust"], "pyautoattack_robust_acc": r["robust"],
                "robust_diff_pp": 100 * (p["robust"] - r["robust"]),
                "pagctl_max_norm": p["max_norm"], "pyautoattack_max_norm": r["max_norm"],
            })
            for stage in (*AA_STAGES, "other"):
                stage_rows.append({
                    "norm": norm, "stage": stage,
                    **{f"{k}_s": result[k]["stage_wall"].get(stage, 0.0) for k in runners},
                    **{f"{k}_cpu_s": result[k]["stage_cpu"].get(stage, 0.0) for k in runners},
                    **{f"{k}_forward": result[k]["forward"].get(stage, 0) for k in runners},
                    **{f"{k}_grad_forward": result[k]["grad"].get(stage, 0) for k in runners},
                })
    finally:
        counter.remove()
    return rows, stage_rows


# ---------------------------------------------------------------------------------------
# output


def bench_model_share(model: nn.Module, x: Tensor, y: Tensor, args: argparse.Namespace
                      ) -> list[dict[str, Any]]:
    """Per norm and implementation, one AutoAttack run under cProfile: the seconds spent in
    the model's forward (the digits CNN's ``forward``) and in autograd's backward, and their
    share of the run. No implementation that makes the same forward and backward passes can
    take less than that share of the reference's time (cProfile slows the Python between
    the passes, so the shares are lower bounds of the unprofiled ones)."""
    import cProfile
    import pstats

    device = torch.device(args.device)
    runners = {"pagctl": _run_pagctl_aa, "pyautoattack": _run_reference_aa}
    rows = []
    for norm in args.norms:
        for name, run in runners.items():
            profile = cProfile.Profile()
            clock = Clock(device)
            with clock.measure():
                profile.enable()
                run(model, x, y, norm, AA_EPS[norm], device)
                profile.disable()
            stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
            forward = sum(v[3] for k, v in stats.items()
                          if k[2] == "forward" and k[0].endswith("architectures.py"))
            backward = sum(v[3] for k, v in stats.items() if k[2] == "_engine_run_backward")
            rows.append({"norm": norm, "impl": name, "wall": clock.wall, "forward": forward,
                         "backward": backward, "share": (forward + backward) / clock.wall})
    return rows


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def _tables(res: dict[str, Any]) -> str:
    meta = res["meta"]
    on_cpu = meta["device"] == "cpu"
    out = [f"device {meta['device']}, {meta['threads']} thread(s), torch {meta['torch']}, "
           f"torchattacks {meta['torchattacks']}, pyautoattack {meta['pyautoattack']}"]
    if res["pgd"]:
        r0 = res["pgd"][0]
        out += ["", f"PGD: ms per step, median of {r0['repeats']} run(s) of {r0['steps']} steps "
                "after a warm-up; ratio = pagctl / torchattacks",
                "(robust accuracies differ by design: other random starts; pagctl keeps the "
                "first fooling iterate)"]
        head = (f"{'model':<9} {'norm':<4} {'eps':>6} {'batch':>5} {'pagctl':>8} "
                f"{'torchatt':>8} {'ratio':>6}")
        head += f" {'cpu rat':>7}" if on_cpu else ""
        head += f" {'rob pagctl':>10} {'rob ta':>7}"
        out.append(head)
        for r in res["pgd"]:
            line = (f"{r['model']:<9} {r['norm']:<4} {r['eps']:>6.4g} {r['batch']:>5} "
                    f"{1e3 * r['pagctl_s_per_step']:>8.2f} "
                    f"{1e3 * r['torchattacks_s_per_step']:>8.2f} {r['ratio']:>6.2f}")
            line += f" {r['cpu_ratio']:>7.2f}" if on_cpu else ""
            line += (f" {_pct(r['pagctl_robust_acc']):>10} "
                     f"{_pct(r['torchattacks_robust_acc']):>7}")
            out.append(line)
    if res.get("new"):
        n0 = res["new"][0]
        out += ["", f"Newer attacks: ms per step, median of {n0['repeats']} run(s) of "
                f"{n0['steps']} steps after a warm-up; ratio = pagctl / reference",
                "(pgd_ll: targeted least-likely PGD; deepfool: L2, overshoot 0.02, 10 "
                "candidates, labels = the model's predictions, a run's time / steps allowed)"]
        head = (f"{'model':<9} {'attack':<9} {'norm':<4} {'reference':<34} {'batch':>5} "
                f"{'pagctl':>8} {'ref':>8} {'ratio':>6}")
        head += f" {'cpu rat':>7}" if on_cpu else ""
        head += f" {'rob pagctl':>10} {'rob ref':>7}"
        out.append(head)
        for r in res["new"]:
            line = (f"{r['model']:<9} {r['attack']:<9} {r['norm']:<4} {r['reference']:<34} "
                    f"{r['batch']:>5} {1e3 * r['pagctl_s_per_step']:>8.2f} "
                    f"{1e3 * r['reference_s_per_step']:>8.2f} {r['ratio']:>6.2f}")
            line += f" {r['cpu_ratio']:>7.2f}" if on_cpu else ""
            line += (f" {_pct(r['pagctl_robust_acc']):>10} "
                     f"{_pct(r['reference_robust_acc']):>7}")
            out.append(line)
    if res["autoattack"]:
        a0 = res["autoattack"][0]
        out += ["", f"AutoAttack standard on the digits CNN, {a0['points']} points "
                f"(clean {_pct(a0['clean_acc'])}); seconds end to end,",
                f"median of {meta['aa_repeats']} run(s); ratio = pagctl / pyautoattack"]
        head = f"{'norm':<4} {'eps':>5} {'pagctl s':>9} {'ref s':>8} {'ratio':>6}"
        head += f" {'cpu rat':>7}" if on_cpu else ""
        head += f" {'rob pagctl':>10} {'rob ref':>8} {'diff pp':>7}"
        out.append(head)
        for r in res["autoattack"]:
            line = (f"{r['norm']:<4} {r['eps']:>5.3g} {r['pagctl_s']:>9.1f} "
                    f"{r['pyautoattack_s']:>8.1f} {r['ratio']:>6.2f}")
            line += f" {r['cpu_ratio']:>7.2f}" if on_cpu else ""
            line += (f" {_pct(r['pagctl_robust_acc']):>10} "
                     f"{_pct(r['pyautoattack_robust_acc']):>8} {r['robust_diff_pp']:>+7.1f}")
            out.append(line)
        for r in res["autoattack"]:
            if not 0.2 <= r["pyautoattack_robust_acc"] <= 0.8:
                out.append(f"note: {r['norm']} eps {r['eps']} leaves robust accuracy "
                           f"{_pct(r['pyautoattack_robust_acc'])}, outside 20-80%")
            if abs(r["robust_diff_pp"]) > 0.5:
                out.append(f"note: {r['norm']} robust accuracies differ by "
                           f"{r['robust_diff_pp']:+.1f} pp (more than 0.5 pp)")
        out += ["", "Per stage: seconds; forward passes, one per example (grad: kept for a "
                "backward)",
                f"{'norm':<4} {'stage':<8} {'pagctl s':>9} {'ref s':>8} {'ratio':>6} "
                + (f"{'cpu rat':>7} " if on_cpu else "")
                + f"{'pagctl fwd':>11} {'(grad)':>9} {'ref fwd':>9} {'(grad)':>9}"]
        for r in res["autoattack_stages"]:
            line = (f"{r['norm']:<4} {r['stage']:<8} {r['pagctl_s']:>9.2f} "
                    f"{r['pyautoattack_s']:>8.2f} ")
            timed = r["stage"] != "other"
            ratio = _ratio(r["pagctl_s"], r["pyautoattack_s"])
            line += f"{ratio:>6.2f} " if timed else f"{'':>6} "
            if on_cpu:
                ratio = _ratio(r["pagctl_cpu_s"], r["pyautoattack_cpu_s"])
                line += f"{ratio:>7.2f} " if timed else f"{'':>7} "
            line += (f"{r['pagctl_forward']:>11,} {r['pagctl_grad_forward']:>9,} "
                     f"{r['pyautoattack_forward']:>9,} {r['pyautoattack_grad_forward']:>9,}")
            out.append(line)
        out.append("('other': outside the stages: clean and final checks, the reference's "
                   "model checks)")
    if res.get("model_share"):
        out += ["", "AutoAttack under cProfile: seconds in the model's forward and backward "
                "passes, and their share of the run (a floor for the same passes)",
                f"{'norm':<5} {'impl':<13} {'wall s':>7} {'fwd s':>7} {'bwd s':>7} {'share':>6}"]
        out += [f"{r['norm']:<5} {r['impl']:<13} {r['wall']:>7.2f} {r['forward']:>7.2f} "
                f"{r['backward']:>7.2f} {r['share']:>6.2f}" for r in res["model_share"]]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------
# command line


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes: 100 digits points, ResNet-18 batch 16, 1 PGD repeat")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed PGD runs per implementation (median reported; default 5, "
                        "1 with --quick)")
    parser.add_argument("--aa-repeats", type=int, default=1,
                        help="timed AutoAttack runs per implementation and norm (median "
                        "reported; default 1)")
    parser.add_argument("--model-share", action="store_true",
                        help="also run AutoAttack once per implementation and norm under "
                        "cProfile and report the share of its time spent in the model's "
                        "forward and backward passes (needs the autoattack part)")
    parser.add_argument("--runs-together", type=int, default=None,
                        help="pagctl AutoAttack's runs_together: APGD-T/FAB-T runs stacked "
                        "along the batch (0 = all; default: all on CUDA, 1 on the CPU)")
    parser.add_argument("--steps", type=int, default=10, help="PGD steps per run")
    parser.add_argument("--points", type=int, default=None,
                        help="digits test points for PGD and AutoAttack (default 300, 100 "
                        "with --quick; at most 397)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="ResNet-18 batch for PGD (default 64, 16 with --quick)")
    parser.add_argument("--epochs", type=int, default=8, help="training epochs of the digits CNN")
    parser.add_argument("--skip", default="",
                        help="comma-separated parts to leave out: pgd-digits, pgd-resnet18, "
                        "new-digits, new-resnet18, autoattack (pgd and new name both models' "
                        "parts)")
    parser.add_argument("--only", default="",
                        help="comma-separated parts to run, the others left out (the names of "
                        "--skip), e.g. --only pgd,new: PGD and the newer attacks, no "
                        "AutoAttack")
    parser.add_argument("--attacks", default=",".join(NEW_ATTACKS),
                        help="the newer attacks' rows, comma-separated (default: all of "
                        f"{', '.join(NEW_ATTACKS)})")
    parser.add_argument("--norms", default="l2,linf,l1",
                        help="AutoAttack's norms, comma-separated (default l2,linf,l1)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    args.norms = [n for n in args.norms.split(",") if n]
    if not args.norms or set(args.norms) - set(AA_EPS):
        parser.error(f"--norms: choose from {', '.join(AA_EPS)}")
    if args.repeats is None:
        args.repeats = 1 if args.quick else 5
    if args.points is None:
        args.points = 100 if args.quick else 300
    if args.batch_size is None:
        args.batch_size = 16 if args.quick else 64
    parts = {"pgd-digits", "pgd-resnet18", "new-digits", "new-resnet18", "autoattack"}
    groups = {"pgd": {"pgd-digits", "pgd-resnet18"}, "new": {"new-digits", "new-resnet18"}}
    RUNS_TOGETHER[0] = args.runs_together

    def _parts(flag: str, value: str) -> set[str]:
        named = {s for s in value.split(",") if s}
        if named - parts - set(groups):
            parser.error(f"unknown {flag} {sorted(named - parts - set(groups))}; choose from "
                         f"{sorted(parts | set(groups))}")
        return {p for n in named for p in groups.get(n, {n})}

    args.skip = _parts("--skip", args.skip)
    if args.only:
        args.skip |= parts - _parts("--only", args.only)
    args.new_attacks = [a for a in args.attacks.split(",") if a]
    if set(args.new_attacks) - set(NEW_ATTACKS):
        parser.error(f"--attacks: choose from {', '.join(NEW_ATTACKS)}")
    if min(args.repeats, args.aa_repeats, args.steps, args.batch_size) < 1:
        parser.error("--repeats, --aa-repeats, --steps and --batch-size must be >= 1")
    if not 1 <= args.points <= 1797 - DIGITS_TRAIN:
        parser.error(f"--points must be in 1..{1797 - DIGITS_TRAIN}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    import pyautoattack
    import torchattacks

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    res: dict[str, Any] = {
        "meta": {
            "device": str(device), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "torchattacks": torchattacks.__version__,
            "pyautoattack": getattr(pyautoattack, "__version__", "?"),
            "quick": args.quick, "digits_points": args.points,
            "resnet18_batch": args.batch_size, "steps": args.steps, "repeats": args.repeats,
            "aa_repeats": args.aa_repeats,
        },
        "pgd": [], "new": [], "autoattack": [], "autoattack_stages": [],
    }
    if {"pgd-digits", "new-digits", "autoattack"} - args.skip:
        log("training the digits CNN ...")
        x_tr, y_tr, x_te, y_te = _digits(args.points)
        digits = _train_digits_cnn(x_tr, y_tr, args.epochs).to(device)
        x_te, y_te = x_te.to(device), y_te.to(device)
        if "pgd-digits" not in args.skip:
            log("PGD on the digits CNN ...")
            res["pgd"] += bench_pgd(digits, "digits", x_te, y_te, args)
        if "new-digits" not in args.skip:
            log("the newer attacks on the digits CNN ...")
            res["new"] += bench_new(digits, "digits", x_te, y_te, args)
    if {"pgd-resnet18", "new-resnet18"} - args.skip:
        torch.manual_seed(0)
        resnet = _timm_model("pagctl_cifar_resnet18", num_classes=10).to(device).eval()
        gen = torch.Generator().manual_seed(1)
        x = torch.rand(args.batch_size, 3, 32, 32, generator=gen).to(device)
        y = torch.randint(0, 10, (args.batch_size,), generator=gen).to(device)
        if "pgd-resnet18" not in args.skip:
            log("PGD on ResNet-18 ...")
            res["pgd"] += bench_pgd(resnet, "resnet18", x, y, args)
        if "new-resnet18" not in args.skip:
            log("the newer attacks on ResNet-18 ...")
            res["new"] += bench_new(resnet, "resnet18", x, y, args)
    if "autoattack" not in args.skip:
        log("AutoAttack on the digits CNN ...")
        res["autoattack"], res["autoattack_stages"] = bench_autoattack(digits, x_te, y_te, args)
    if args.model_share:
        log("AutoAttack under cProfile: time in the model ...")
        res["model_share"] = bench_model_share(digits, x_te, y_te, args)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(_tables(res))


if __name__ == "__main__":
    main()
