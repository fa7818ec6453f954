"""Correctness of the PAG primitive `pagctl.gradients` (finite differences, analytic cases,
parity with the official formulation, double backpropagation, no side effects)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pagctl.gradients import (
    METHODS,
    input_gradients,
    logits_and_input_gradients,
    method_for,
    official_input_gradients,
)
from pagctl.losses import pag_loss


def _tiny_net(seed: int = 0, in_chans: int = 2, num_classes: int = 4) -> nn.Module:
    """Conv + BatchNorm + smooth activation + linear: smooth, so finite differences apply."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(in_chans, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(3 * 2 * 2, num_classes),
    )


def _trained_bn(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """Give BatchNorm non-trivial running statistics, then switch to eval mode."""
    gen = torch.Generator().manual_seed(1)
    first = next(model.parameters())
    with torch.no_grad():
        model.train()
        for _ in range(3):
            model(torch.rand(8, *shape, generator=gen, dtype=first.dtype) * 2)
    return model.eval()


def _central_differences(fn: object, x: Tensor, h: float = 1e-6) -> Tensor:
    """Gradient of the scalar ``fn(x)`` by central differences, one coordinate at a time."""
    assert callable(fn)
    grad = torch.zeros_like(x)
    flat, out = x.reshape(-1), grad.reshape(-1)
    for idx in range(flat.numel()):
        saved = flat[idx].item()
        flat[idx] = saved + h
        plus = float(fn(x))
        flat[idx] = saved - h
        minus = float(fn(x))
        flat[idx] = saved
        out[idx] = (plus - minus) / (2 * h)
    return grad


@pytest.mark.parametrize("method", METHODS)
def test_matches_finite_differences_eval_mode(method: str) -> None:
    model = _trained_bn(_tiny_net().double(), (2, 4, 4))
    x = torch.rand(3, 2, 4, 4, dtype=torch.float64)
    classes = torch.tensor([[0, 3], [2, 1], [1, 1]])
    grads = input_gradients(model, x, classes, method=method)  # type: ignore[arg-type]
    assert grads.shape == (3, 2, 2, 4, 4)
    h = 1e-6
    steps = h * torch.eye(x[0].numel(), dtype=torch.float64).view(-1, *x.shape[1:])
    for i in range(3):
        # In eval mode rows are independent, so every perturbed copy of image i can go
        # through the model in one batch.
        with torch.no_grad():
            plus = F.log_softmax(model(x[i] + steps), dim=1)
            minus = F.log_softmax(model(x[i] - steps), dim=1)
        for j in range(2):
            k = int(classes[i, j])
            expected = ((plus[:, k] - minus[:, k]) / (2 * h)).view(x.shape[1:])
            torch.testing.assert_close(grads[i, j], expected, rtol=1e-6, atol=1e-8)


def test_train_mode_is_gradient_of_summed_column() -> None:
    """With BatchNorm in train mode the rows couple through the batch statistics: column j
    is the gradient of Σᵢ log p(classes[i, j] | x) with respect to the whole batch."""
    model = _tiny_net(seed=3).double().train()
    x = torch.rand(3, 2, 4, 4, dtype=torch.float64)
    classes = torch.tensor([[0, 3], [2, 1], [1, 0]])
    grads = input_gradients(model, x, classes)
    for j in range(2):

        def column(batch: Tensor, j: int = j) -> Tensor:
            with torch.no_grad():
                return F.log_softmax(model(batch), dim=1).gather(1, classes[:, j:j + 1]).sum()

        expected = _central_differences(column, x.clone())
        torch.testing.assert_close(grads[:, j], expected, rtol=1e-6, atol=1e-8)


def test_linear_model_is_analytic() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(3 * 2 * 2, 5).double()
    model = nn.Sequential(nn.Flatten(), linear)
    x = torch.rand(4, 3, 2, 2, dtype=torch.float64)
    classes = torch.tensor([[0, 1, 2], [4, 3, 2], [1, 1, 0], [2, 4, 3]])
    logits, grads = logits_and_input_gradients(model, x, classes)
    weight = linear.weight.detach()  # (M, D)
    p = F.softmax(x.flatten(1) @ weight.t() + linear.bias.detach(), dim=1)  # (N, M)
    mean_row = p @ weight  # (N, D): Σ_j p_j W_j
    expected = (weight[classes] - mean_row[:, None, :]).reshape(4, 3, 3, 2, 2)
    torch.testing.assert_close(grads, expected)
    torch.testing.assert_close(logits, model(x).detach())


def test_non_image_inputs() -> None:
    """Any (N, ...) input works, e.g. the 2-D toy data."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    x = torch.rand(5, 2, dtype=torch.float64)
    classes = torch.tensor([[0, 1]] * 5)
    grads = input_gradients(model, x, classes)
    assert grads.shape == (5, 2, 2)
    # Two classes: log p0 and log p1 have opposite-sign gradients (p0 + p1 = 1).
    p = F.softmax(model(x), dim=1).detach()
    torch.testing.assert_close(grads[:, 0] * p[:, :1], -grads[:, 1] * p[:, 1:])


@pytest.mark.parametrize("method", METHODS)
def test_equals_official_formulation_in_eval_mode(method: str) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )
    model = _trained_bn(net, (3, 8, 8))
    x = torch.rand(6, 3, 8, 8)
    gen = torch.Generator().manual_seed(0)
    classes = torch.stack([torch.randperm(10, generator=gen)[:4] for _ in range(6)])
    ours = input_gradients(model, x, classes, method=method)  # type: ignore[arg-type]
    official = official_input_gradients(model, x, classes)
    assert ours.shape == official.shape == (6, 4, 3, 8, 8)
    scale = official.abs().max()
    torch.testing.assert_close(ours / scale, official / scale, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_pag_loss_parameter_gradient_matches_finite_differences(method: str) -> None:
    """Double backpropagation: d pag_loss / dθ through create_graph=True, BatchNorm in train
    mode (the training setting), checked coordinate-wise against central differences."""
    model = _tiny_net(seed=5, num_classes=3).double().train()
    x = torch.rand(3, 2, 4, 4, dtype=torch.float64)
    classes = torch.tensor([[0, 2], [1, 0], [2, 1]])
    targets = torch.randn(3, 2, 2, 4, 4, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2])

    def objective() -> Tensor:
        logits, grads = logits_and_input_gradients(
            model, x, classes, create_graph=True, method=method  # type: ignore[arg-type]
        )
        return F.cross_entropy(logits, labels) + 3.0 * pag_loss(grads, targets)

    model.zero_grad(set_to_none=True)
    torch.autograd.backward(objective())
    h = 1e-6
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        flat, grad = param.data.view(-1), param.grad.view(-1)
        for idx in range(flat.numel()):
            saved = flat[idx].item()
            flat[idx] = saved + h
            plus = float(objective().detach())
            flat[idx] = saved - h
            minus = float(objective().detach())
            flat[idx] = saved
            expected = (plus - minus) / (2 * h)
            assert abs(float(grad[idx]) - expected) <= 1e-6 + 1e-5 * abs(expected), (
                f"{name}[{idx}]: autograd {float(grad[idx])} vs finite differences {expected}"
            )


def test_create_graph_false_returns_detached_results() -> None:
    model = _tiny_net()
    x = torch.rand(2, 2, 4, 4)
    logits, grads = logits_and_input_gradients(model, x, torch.tensor([[0], [1]]))
    assert not logits.requires_grad and logits.grad_fn is None
    assert not grads.requires_grad and grads.grad_fn is None
    assert all(p.grad is None for p in model.parameters())


def test_create_graph_true_reaches_every_parameter() -> None:
    model = _tiny_net()
    x = torch.rand(4, 2, 4, 4)
    classes = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0]])
    _, grads = logits_and_input_gradients(model, x, classes, create_graph=True)
    assert grads.requires_grad
    torch.autograd.backward(pag_loss(grads, torch.randn_like(grads)))
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("create_graph", [False, True])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_no_side_effects_on_inputs(create_graph: bool, requires_grad: bool, method: str) -> None:
    model = _tiny_net().eval()
    x = torch.rand(3, 2, 4, 4).requires_grad_(requires_grad)
    before = x.detach().clone()
    version = x._version
    classes = torch.tensor([[0, 1], [2, 3], [1, 0]])
    grads = input_gradients(model, x, classes, create_graph=create_graph,
                            method=method)  # type: ignore[arg-type]
    assert torch.equal(x.detach(), before) and x._version == version
    assert x.grad is None
    assert all(p.grad is None for p in model.parameters())
    assert x.requires_grad == requires_grad
    expected = input_gradients(model, before, classes)
    torch.testing.assert_close(grads.detach(), expected)


@pytest.mark.parametrize("method", METHODS)
def test_graph_through_inputs_when_they_require_grad(method: str) -> None:
    """With create_graph, inputs that carry a graph stay connected (second order in x)."""
    model = _tiny_net(seed=2).eval()
    x = torch.rand(2, 2, 4, 4, requires_grad=True)
    grads = input_gradients(model, x * 1.0, torch.tensor([[0], [1]]), create_graph=True,
                            method=method)  # type: ignore[arg-type]
    torch.autograd.backward(pag_loss(grads, torch.randn_like(grads)))
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_works_under_no_grad_and_inference_mode() -> None:
    model = _tiny_net().eval()
    x = torch.rand(2, 2, 4, 4)
    classes = torch.tensor([[0], [1]])
    expected = input_gradients(model, x, classes)
    with torch.no_grad():
        torch.testing.assert_close(input_gradients(model, x, classes), expected)
    with torch.inference_mode():
        frozen = x.clone()
    torch.testing.assert_close(input_gradients(model, frozen, classes), expected)


def test_model_mode_and_train_mode_statistics() -> None:
    """The mode is left as is; one call is one forward pass (BatchNorm counts one batch)."""
    model = _tiny_net().train()
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert bn.num_batches_tracked is not None
    logits_and_input_gradients(model, torch.rand(4, 2, 4, 4), torch.tensor([[0, 1, 2]] * 4),
                               create_graph=True)
    assert model.training and int(bn.num_batches_tracked) == 1


def test_repeat_method_in_train_mode_gives_the_loop_logits() -> None:
    """The repeated batch has the batch's BatchNorm mean and biased variance, so "repeat"
    returns the same logits as "loop" in train mode; its gradients differ only by the
    train-mode coupling, which is small next to the gradients themselves."""
    x = torch.rand(6, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    classes = torch.tensor([[0, 1, 2]] * 3 + [[3, 2, 1]] * 3)
    out = {}
    for method in ("loop", "repeat"):
        model = _tiny_net(seed=5).train()
        out[method] = logits_and_input_gradients(model, x, classes,
                                                 method=method)  # type: ignore[arg-type]
    torch.testing.assert_close(out["repeat"][0], out["loop"][0], rtol=1e-5, atol=1e-6)
    cos = F.cosine_similarity(out["repeat"][1].flatten(1), out["loop"][1].flatten(1), dim=1)
    assert bool((cos > 0.9).all()), cos


def test_rejects_bad_arguments() -> None:
    model = _tiny_net()
    x = torch.rand(2, 2, 4, 4)
    with pytest.raises(ValueError, match="int64"):
        input_gradients(model, x, torch.tensor([[0], [1]], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        input_gradients(model, x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        input_gradients(model, x, torch.tensor([[0], [1], [2]]))
    with pytest.raises(ValueError, match="K >= 1"):
        input_gradients(model, x, torch.zeros(2, 0, dtype=torch.int64))
    with pytest.raises(ValueError, match="method"):
        input_gradients(model, x, torch.tensor([[0], [1]]), method="vmap")  # type: ignore[arg-type]


def test_the_spec_offers_exactly_the_methods() -> None:
    """train.grad_method spells its choices out (pagctl.spec imports no torch); they must
    stay the methods pagctl.gradients implements, and ``auto``, which picks one of them."""
    from typing import get_args

    from pagctl.spec import TrainSpec

    assert get_args(TrainSpec.model_fields["grad_method"].annotation) == ("auto", *METHODS)


def test_auto_is_repeat_on_a_gpu_and_loop_elsewhere() -> None:
    assert method_for("auto", torch.device("cpu")) == "loop"
    assert method_for("auto", torch.device("cuda", 1)) == "repeat"
    for method in METHODS:
        assert method_for(method, torch.device("cuda")) == method
    with pytest.raises(ValueError, match="auto or one of loop, batched, repeat"):
        method_for("vmap", torch.device("cpu"))
