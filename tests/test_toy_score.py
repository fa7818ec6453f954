"""The exact toy score source (toy_score) and the toy experiment."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pagctl.data import TensorImageDataset
from pagctl.data.toy import TOY_MEANS, toy_log_density, toy_sample, toy_score
from pagctl.protocols import BuildContext
from pagctl.target_gradients.toy_score import ToyScore, toy_posterior_gradient
from pagctl.testing import check_target_gradient_source, small_context

pytestmark = pytest.mark.usefixtures("one_thread")


def toy_context(n: int = 200, seed: int = 0) -> BuildContext:
    train = TensorImageDataset(*toy_sample(n, seed))
    return BuildContext(num_classes=2, input_shape=(2, 1, 1), device=torch.device("cpu"),
                        seed=0, train_set=train, data_fingerprint=train.fingerprint())


@pytest.fixture
def registered() -> Iterator[None]:
    """toy_score (and precomputed) in the registry, whether or not it lists them yet."""
    from pagctl import registry

    reg = registry.target_gradients
    added = {name: value for name, value in (
        ("toy_score", "pagctl.target_gradients.toy_score:ToyScore"),
        ("precomputed", "pagctl.target_gradients.precomputed:Precomputed"))
        if name not in reg._builtins}
    reg._builtins.update(added)
    reg.refresh()
    yield
    for name in added:
        del reg._builtins[name]
    reg.refresh()


def _points() -> torch.Tensor:
    """Training-like points, points between modes and points far out. Shape: (M, 2) f64."""
    x, _ = toy_sample(60, 5)
    means = torch.tensor(TOY_MEANS, dtype=torch.float64)
    between = (means[1:] + means[:-1]) / 2 + torch.tensor([0.01, -0.005], dtype=torch.float64)
    outside = torch.tensor([[0.02, 0.1], [0.5, 0.95], [0.3, 0.4]], dtype=torch.float64)
    return torch.cat([x.reshape(-1, 2).double(), between, outside])


def _finite_difference(f: object, x: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    """Central differences of f: (M, 2) -> (M,), in float64. Shape: -> (M, 2)."""
    cols = []
    for d in range(2):
        step = torch.zeros_like(x)
        step[:, d] = h
        cols.append((f(x + step) - f(x - step)) / (2 * h))  # type: ignore[operator]
    return torch.stack(cols, dim=1)


@pytest.mark.parametrize("noise", [0.0, 0.02, 0.05, 0.1])
@pytest.mark.parametrize("target", [0, 1])
def test_posterior_matches_finite_differences_of_the_log_posterior(noise: float,
                                                                    target: int) -> None:
    x = _points()
    fd = _finite_difference(
        lambda p: toy_log_density(p, target, noise) - toy_log_density(p, None, noise), x)
    exact = toy_posterior_gradient(x, torch.full((x.shape[0],), target), noise)
    scale = 1.0 / (0.02**2 + noise**2)  # the largest score component is of this order
    torch.testing.assert_close(exact, fd, rtol=1e-6, atol=1e-6 * scale)
    # The source returns the same values (float32, (N, K, 2, 1, 1)).
    source = ToyScore(ToyScore.Params(noise=noise), toy_context())
    classes = torch.full((x.shape[0], 1), target)
    out = source(x.float().reshape(-1, 2, 1, 1), classes[:, 0], classes)
    assert out.dtype == torch.float32 and out.shape == (x.shape[0], 1, 2, 1, 1)
    expected = toy_posterior_gradient(x.float().double(), classes[:, 0], noise)
    torch.testing.assert_close(out.reshape(-1, 2).double(), expected, rtol=1e-6,
                               atol=1e-30)


@pytest.mark.parametrize("noise", [0.0, 0.05])
def test_conditional_matches_finite_differences_of_the_log_density(noise: float) -> None:
    x = _points()
    source = ToyScore(ToyScore.Params(noise=noise, kind="conditional"), toy_context())
    classes = torch.tensor([[0, 1]]).expand(x.shape[0], 2).contiguous()
    out = source(x.float().reshape(-1, 2, 1, 1), classes[:, 0], classes).double()
    scale = 1.0 / (0.02**2 + noise**2)
    for k in (0, 1):
        fd = _finite_difference(lambda p, k=k: toy_log_density(p, k, noise), x.float().double())
        torch.testing.assert_close(out[:, k].reshape(-1, 2), fd, rtol=1e-5, atol=1e-5 * scale)
        torch.testing.assert_close(out[:, k].reshape(-1, 2),
                                   toy_score(x.float().double(), k, noise), rtol=1e-6, atol=1e-4)


def test_posterior_is_stable_where_the_naive_difference_cancels() -> None:
    # Deep inside a mode at noise 0, score(x|t) and score(x) agree to ~10 digits: their
    # float32 difference is rounding noise, the closed form is not. The target is always
    # parallel to the line of modes (direction (1, 2)), with a length p(other|x) / σ².
    x, y = toy_sample(400, 2)
    source = ToyScore(ToyScore.Params(noise=0.0), toy_context())
    classes = torch.stack([y, 1 - y], dim=1)
    out = source(x, y, classes).reshape(-1, 2, 2).double()
    line = torch.tensor([1.0, 2.0], dtype=torch.float64) / 5**0.5
    norms = out.norm(dim=2)
    assert bool((norms > 0).all())
    cosine = (out @ line) / norms
    assert bool((cosine.abs() > 1 - 1e-9).all())
    # Own class and other class point in opposite directions (two classes).
    assert bool((cosine[:, 0] * cosine[:, 1] < 0).all())
    # Toward the own mode centre's side: moving along the target raises p(y|x).
    step = 1e-4 * out[:, 0] / norms[:, :1]
    before = toy_log_density(x.double(), y) - toy_log_density(x.double(), None)
    after = (toy_log_density(x.double().reshape(-1, 2) + step, y)
             - toy_log_density(x.double().reshape(-1, 2) + step, None))
    assert bool((after >= before - 1e-12).all())


def test_conforms_to_the_source_contract() -> None:
    ctx = toy_context()
    check_target_gradient_source(ToyScore, ctx=ctx)
    check_target_gradient_source(ToyScore, ctx=ctx, params={"kind": "conditional",
                                                            "noise": 0.0})


def test_needs_the_toy_data() -> None:
    with pytest.raises(ValueError, match="toy"):
        ToyScore(ToyScore.Params(), small_context())
    with pytest.raises(ValueError, match="toy"):
        ToyScore(ToyScore.Params(), BuildContext(num_classes=3, input_shape=(2, 1, 1),
                                                 device=torch.device("cpu"), seed=0))


def test_params_are_validated() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        ToyScore.Params(noise=-0.1)
    with pytest.raises(ValidationError):
        ToyScore.Params(kind="joint")  # type: ignore[arg-type]


def test_wrong_call_shapes_raise() -> None:
    source = ToyScore(ToyScore.Params(), toy_context())
    with pytest.raises(ValueError, match="inputs"):
        source(torch.rand(3, 1, 8, 8), torch.zeros(3, dtype=torch.int64),
               torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="classes"):
        source(torch.rand(3, 2, 1, 1), torch.zeros(3, dtype=torch.int64),
               torch.full((3, 1), 2))


def test_builds_through_the_registry_and_spec(registered: None) -> None:
    from pagctl import registry
    from pagctl.build import build_context
    from pagctl.data import load_data
    from pagctl.spec import PluginRef, load_spec

    spec = load_spec("toy-pag-score")
    assert spec.target_gradients.name == "toy_score"
    bundle = load_data(spec.data.model_copy(update={"toy_train_size": 50}))
    ctx = build_context(bundle, torch.device("cpu"), 0, None)
    source = registry.target_gradients.build(spec.target_gradients, ctx, "target_gradients")
    x, y = bundle.train.images[:4], bundle.train.labels[:4]  # type: ignore[attr-defined]
    out = source(x, y, torch.tensor([[0, 1]] * 4), index=torch.arange(4))
    assert out.shape == (4, 2, 2, 1, 1)
    from pagctl.errors import SpecError

    with pytest.raises(SpecError, match="toy"):
        registry.target_gradients.build(PluginRef(name="toy_score"), small_context(),
                                        "target_gradients")


def test_grid_min_distance_is_exact_for_a_linear_boundary() -> None:
    from torch import nn

    from pagctl.toy_experiment.measures import grid_min_distance

    class Half(nn.Module):  # class 1 where x1 > 0.3
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z = (x.reshape(-1, 2)[:, 0] - 0.3) * 10
            return torch.stack([-z, z], dim=1)

    points = torch.tensor([[0.25, 0.5], [0.2, 0.4], [0.36, 0.6], [0.31, 0.5]])
    labels = torch.tensor([0, 0, 1, 0])
    dist = grid_min_distance(Half(), points, labels, max_eps=0.1)
    torch.testing.assert_close(dist[:3], torch.tensor([0.05, 0.1, 0.06]), atol=2e-3, rtol=0)
    assert float(dist[3]) == 0.0  # misclassified


def test_toy_experiment_smoke(registered: None, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from pagctl.toy_experiment import run_toy_experiment, summary_table
    from pagctl.toy_experiment.__main__ import main

    out = tmp_path / "toy"
    results = run_toy_experiment(out, device="cpu", epochs=2, progress=False, seeds=(0,),
                                 train_size=30, eps=(0.03, 0.07), attacks=False)
    assert set(results["models"]) == {"vanilla", "pag-score", "pag-nn"}
    for entry in results["models"].values():
        exact = entry["exact"]["robust_accuracy"]
        assert len(exact) == 2 and exact[0] >= exact[1]
        assert all(lo <= a <= hi for a, (lo, hi) in
                   zip(exact, entry["exact"]["interval"], strict=True))
    assert results["models"]["pag-score"]["target_gradients"]["name"] == "toy_score"
    for entry in results["models"].values():
        assert -1 <= entry["alignment"]["seed_mean"] <= entry["orientation"]["seed_mean"] <= 1
    assert (out / "decision_boundaries.png").stat().st_size > 1000
    assert (out / "robustness.png").stat().st_size > 1000
    assert json.loads((out / "results.json").read_text())["eps"] == [0.03, 0.07]
    assert "vanilla" in summary_table(results)
    assert main(["--out", str(tmp_path / "cli"), "--epochs", "1", "--seeds", "0",
                 "--train-size", "20", "--no-attacks", "-q"]) == 0


def test_attacks_find_no_more_than_the_exact_search(tmp_path: Path) -> None:
    """The attack suite and the grid search agree on a trained toy model: every point the
    grid calls robust survives the attacks (the grid's adversarial points are verified)."""
    from pagctl.checkpoint import load_run
    from pagctl.data import load_data
    from pagctl.spec import load_spec
    from pagctl.toy_experiment import attack_suite
    from pagctl.toy_experiment.measures import grid_min_distance
    from pagctl.train import train

    spec = load_spec("toy-vanilla", ["data.toy_train_size=300", "data.batch_size=50",
                                     "train.epochs=3", "eval.attack=null",
                                     "eval.align_source=null", f"out_dir={tmp_path / 'r'}"])
    train(spec, device="cpu", progress=False)
    model = load_run(tmp_path / "r").model
    bundle = load_data(spec.data)
    test = bundle.test
    dist = grid_min_distance(model, test.images, test.labels)  # type: ignore[attr-defined]
    suite = attack_suite(model, bundle, 0.05, 0, torch.device("cpu"))
    exact = float((dist > 0.05).float().mean())
    assert suite["robust_accuracy"] >= exact - 0.01
    assert set(suite["per_attack"]) == {"pgd_l2", "apgd_ce", "fab"}
