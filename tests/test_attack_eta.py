"""The attack engine's ETA: what each attack declares a point costs, the estimator of the
cost left (fixed pass counts and seconds, no clock), and the progress bar of a real
AutoAttack run ending complete, fresh, resumed and sharded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from pagctl import progress
from pagctl.attacks.apgd import APGDCE, APGDT
from pagctl.attacks.autoattack import AutoAttack
from pagctl.attacks.fab import FAB, FABT
from pagctl.attacks.sparse_rs import SparseRS
from pagctl.attacks.square import Square
from pagctl.data import TensorImageDataset
from pagctl.evaluation.request import EvaluationRequest
from pagctl.protocols import BuildContext, attack_stages, declared_passes
from pagctl.robustness.engine import (
    PerBatch,
    RemainingCost,
    StageCost,
    estimate_remaining,
    run_attack,
)
from pagctl.robustness.state import AttackState

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
SHAPE = (1, 8, 8)
SECONDS_PER_PASS = 1e-3
"""The fake clock: every pass of the scripted runs takes this long."""


def _unbreakable(classes: int = 10) -> nn.Module:
    """A linear model whose class 0 leads by 100 logits: no small budget breaks it."""
    model = nn.Linear(64, classes)
    with torch.no_grad():
        model.weight.copy_(0.01 * torch.randn(classes, 64, generator=torch.Generator()
                                              .manual_seed(0)))
        model.bias.zero_()
        model.bias[0] = 100.0
    return nn.Sequential(nn.Flatten(), model).eval()


@pytest.mark.parametrize(("cls", "params", "declared"), [
    (APGDCE, {"steps": 3, "restarts": 2}, 1 + 2 * 4 * 2),
    (APGDT, {"steps": 3, "n_target_classes": 3}, 1 + 3 * 4 * 2),
    (APGDCE, {"steps": 2, "eot_iter": 3}, 1 + 3 * 3 * 2),
    (APGDCE, {"steps": 10, "norm": "l1", "eps": 0.5, "large_eps": True}, 1 + (10 + 3) * 2),
    (FABT, {"steps": 3, "n_target_classes": 2}, 1 + 2 * 3 * 3),
    (FAB, {"steps": 2}, 1 + 2 * (2 + 9)),
    (Square, {"queries": 7, "restarts": 2}, 1 + 2 * 7),
    (SparseRS, {"eps": 2, "queries": 7, "restarts": 2}, 1 + 2 * 7),
])
def test_declared_passes_are_what_a_point_nobody_breaks_costs(
        cls: Any, params: dict[str, Any], declared: int) -> None:
    """Each built-in attack's passes_per_point is the formula its docstring gives, and it is
    exact on points it cannot break: the engine's pass counter measures just that many."""
    attack = cls(cls.Params(**{"eps": 0.01, **params}), BuildContext(10, SHAPE, CPU, 0))
    assert declared_passes(attack) == declared
    x = torch.rand(6, *SHAPE, generator=torch.Generator().manual_seed(1))
    report = run_attack(_unbreakable(), attack, TensorImageDataset(x, torch.zeros(6).long()),
                        torch.arange(6), name=cls.name, params=attack.params, origin="t")
    stage = report.stages[0]
    assert (stage.attacked, stage.broke) == (6, 0)
    assert (stage.forwards + stage.backwards) / stage.attacked == declared


def test_declared_passes_ignores_what_is_not_a_cost() -> None:
    class Odd:
        def __init__(self, value: Any) -> None:
            self.value = value

        def passes_per_point(self) -> Any:
            return self.value

    assert declared_passes(object()) is None
    assert [declared_passes(Odd(v)) for v in (0, -3, float("nan"), "many", 12)] \
        == [None, None, None, None, 12.0]


# ------------------------------------------------------------------ the estimator, scripted

N = 1000


def _standard_costs() -> list[float]:
    """What AutoAttack standard's stages declare per point in L∞ with 10 classes."""
    aa = AutoAttack(AutoAttack.Params(), BuildContext(10, SHAPE, CPU, 0))
    costs = [declared_passes(stage) for _, stage in attack_stages(aa, "autoattack")]
    assert costs == [1 + 2 * 101, 1 + 9 * 2 * 101, 1 + 9 * 100 * 3, 1 + 5000]
    return [c for c in costs if c is not None]


def _after_first_stage(costs: list[float], broken: int) -> RemainingCost:
    """The estimate once APGD-CE has attacked all N points (every pass timed by the fake
    clock) and broken ``broken`` of them."""
    spent = int(N * costs[0])
    first = StageCost(costs[0], attacked=N, passes=spent, seconds=spent * SECONDS_PER_PASS)
    later = [StageCost(c) for c in costs[1:]]
    return estimate_remaining([first, *later], 1, N - broken, N - broken)


def _stage_counting(stages_done: int, stages: int, elapsed: float) -> float:
    """The ETA the bar showed when it counted one step per stage and batch: the steps left
    at the rate of the steps done."""
    return (stages - stages_done) * elapsed / stages_done


def _true_seconds(passes_per_point: list[list[int]]) -> float:
    """What the scripted later stages really cost: each stage's list of the passes each
    point it attacked took."""
    return sum(sum(points) for points in passes_per_point) * SECONDS_PER_PASS


def test_eta_after_apgd_ce_breaks_most_points_counts_the_few_left() -> None:
    """APGD-CE breaks 90%: the estimate is within 2x of the scripted truth (an upper bound:
    Square stops early on the points it breaks), the stage-counting ETA further off; and in
    the reviewer's case (all but 2 broken) the stage-counting ETA is off 30-fold."""
    costs = _standard_costs()
    apgd_ce = N * costs[0] * SECONDS_PER_PASS
    # 100 left: APGD-T breaks 10 of them, FAB-T none, Square 10 after 500 queries
    truth = _true_seconds([[int(costs[1])] * 100, [int(costs[2])] * 90,
                           [int(costs[3])] * 80 + [501] * 10])
    left = _after_first_stage(costs, broken=900)
    assert left.seconds is not None
    assert truth <= left.seconds <= 2 * truth
    old = _stage_counting(1, 4, apgd_ce)
    assert abs(left.seconds / truth - 1) < 0.2 < abs(old / truth - 1)

    truth = _true_seconds([[int(costs[1])] * 2, [int(costs[2])] * 2, [int(costs[3])] * 2])
    left = _after_first_stage(costs, broken=N - 2)
    assert left.seconds == pytest.approx(truth)
    assert _stage_counting(1, 4, apgd_ce) > 30 * truth


def test_eta_with_no_point_broken_is_exact() -> None:
    """Nobody breaks anything: every stage attacks every point at its declared cost, which
    the estimate is; the stage-counting ETA promised the later stages APGD-CE's time."""
    costs = _standard_costs()
    truth = _true_seconds([[int(c)] * N for c in costs[1:]])
    left = _after_first_stage(costs, broken=0)
    assert left.seconds == pytest.approx(truth)
    assert left.done == N * costs[0] and left.seconds_per_pass == SECONDS_PER_PASS
    assert truth > 15 * _stage_counting(1, 4, N * costs[0] * SECONDS_PER_PASS)


def test_eta_bounds_square_which_stops_early_per_point() -> None:
    """Square stops querying a point once it breaks it: before it runs, the estimate (all
    its queries for every point still robust) is an upper bound, and from its first batch
    on, its measured passes per point price the rest."""
    costs = _standard_costs()
    # 100 points reach Square; each batch of 50 has 30 broken after 100 queries
    batch = [101] * 30 + [int(costs[3])] * 20
    done = [StageCost(c, attacked=100, passes=int(100 * c), seconds=100 * c * 1e-3)
            for c in costs[:3]]
    before = estimate_remaining([*done, StageCost(costs[3])], 3, 100, 100)
    assert before.seconds is not None and before.seconds >= _true_seconds([batch * 2])
    spent = sum(batch)
    square = StageCost(costs[3], attacked=50, passes=spent, seconds=spent * 1e-3)
    during = estimate_remaining([*done, square], 3, 50, 70)
    assert during.passes == pytest.approx(spent)  # the second batch priced as the first
    assert during.after(spent).passes == 0


def test_eta_prices_an_attack_that_declares_nothing_by_the_stages_measured() -> None:
    unknown = [StageCost(None, attacked=10, passes=400, seconds=2.0), StageCost(None)]
    left = estimate_remaining(unknown, 1, 5, 5)
    assert (left.passes, left.seconds) == (5 * 40, 5 * 40 * 2.0 / 400)
    fresh = estimate_remaining([StageCost(None), StageCost(30.0)], 0, 4, 4)
    assert (fresh.passes, fresh.seconds) == (4 * 30 + 4 * 30, None)  # nothing timed yet
    assert estimate_remaining([StageCost(None)], 0, 3, 3).passes == 3
    over = estimate_remaining([StageCost(5.0, attacked=2, passes=10, seconds=1.0)], 1, 0, 2)
    assert (over.done, over.passes, over.seconds) == (10, 0.0, 0.0)


# --------------------------------------------------------------------- the bar of a real run


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()


def _aa(seed_base: int = 0) -> tuple[PerBatch, AutoAttack.Params]:
    params = AutoAttack.Params(eps=0.1, steps=2, square_queries=5)
    return PerBatch(lambda b: AutoAttack(params, BuildContext(10, SHAPE, CPU, seed_base + b))
                    ), params


def _points() -> tuple[TensorImageDataset, Tensor]:
    x = torch.rand(24, *SHAPE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = _model()(x).argmax(1)
    return TensorImageDataset(x, y), torch.arange(24)


def _last_line(err: str) -> str:
    lines = [line for line in err.splitlines() if ": " in line and "elapsed" in line]
    assert lines, err
    return lines[-1]


def _attack(**request: Any) -> Any:
    attack, params = _aa()
    ds, idx = _points()
    return run_attack(_model(), attack, ds, idx, name="autoattack", params=params,
                      request=EvaluationRequest(batch_size=8, **request))


def test_a_real_autoattack_run_ends_with_the_bar_complete(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    """With progress on, the run gives the same results as with it off, and its last line
    is the bar complete: every pass it spent, of as many, 100%, nothing left."""
    monkeypatch.setenv(progress.PROGRESS_SECONDS_ENV, "3600")  # the final line only
    quiet = _attack(progress=False)
    assert capsys.readouterr().err == ""
    shown = _attack(progress=True)
    assert shown.per_example == quiet.per_example
    assert [s.model_dump(exclude={"seconds"}) for s in shown.stages] \
        == [s.model_dump(exclude={"seconds"}) for s in quiet.stages]
    passes = shown.forwards + shown.backwards
    assert passes > 0 and any(s.broke for s in shown.stages)
    line = _last_line(capsys.readouterr().err)
    assert line.startswith(f"square: {passes}/{passes} (100%)") and " eta 0:00:00 " in line

    half = _attack(progress=True, shard=(1, 2))
    passes = half.forwards + half.backwards
    assert _last_line(capsys.readouterr().err).startswith(f"square: {passes}/{passes} (100%)")

    state = tmp_path / "aa.state"
    calls = {"n": 0}
    save = AttackState.save

    def save_then_stop(self: AttackState, path: Path) -> None:
        save(self, path)
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(AttackState, "save", save_then_stop)
        _attack(progress=True, state=state)
    capsys.readouterr()
    resumed = _attack(progress=True, state=state)
    assert resumed.per_example == quiet.per_example
    passes = resumed.forwards + resumed.backwards
    assert _last_line(capsys.readouterr().err).startswith(f"square: {passes}/{passes} (100%)")


def test_the_bar_shows_the_loops_own_estimate(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A loop that hands its estimate of the seconds left sees it as the ETA (not the rate's,
    which would say 0:00:00 for a count that jumped), with its revised total; a resumed
    loop's first count is the base of the rate, not progress."""
    monkeypatch.setenv(progress.PROGRESS_SECONDS_ENV, "0")
    with progress.ProgressBar("apgd_t", 1) as bar:
        bar.update(completed=0, total=100)
        bar.update(completed=90, total=400, remaining=3725.0)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("apgd_t")]
    assert lines[-1].startswith("apgd_t: 90/400 (22%) elapsed 0:00:00 eta 1:02:0"), lines
    with progress.ProgressBar("resumed", 10) as bar:
        bar.update(completed=6)  # where a resumed loop starts: no rate yet
    with progress.ProgressBar("fresh", 10) as bar:
        bar.update(completed=0)
        bar.update(completed=5)  # the first five steps of a fresh loop: a rate
    lines = capsys.readouterr().err.splitlines()
    assert [line.endswith("eta ?") for line in lines] == [True, True, False, False], lines
