"""Input gradients of class log-probabilities: the primitive behind the PAG loss.

For a classifier f and an image x, the model gradient for target class k is

    ∇ₓ log p(k | x) = ∇ₓ log softmax(f(x))_k = ∇ₓ f(x)_k − Σ_j p(j | x) ∇ₓ f(x)_j,

the quantity the official code differentiates, not the raw logit.
`logits_and_input_gradients` gets the logits and these K gradients per image from ONE forward
pass, so a training step uses the same logits for the cross-entropy term. With
``create_graph=True`` the gradients are differentiable with respect to the model parameters
(double backpropagation), so ``CE + λ·pag_loss`` trains with a single ``backward()``.

How the K gradients are computed (``method``; ``train.grad_method`` in a run spec), measured
on CPU (2 shared cores) and on one H200 GPU, train mode, B = 64, K = 10, 32×32×3, create_graph
and the backward of the total loss included (``benchmarks/bench_pag_step.py``,
``benchmarks/README.md``):

``train.grad_method: auto`` (the default) is ``"repeat"`` on a GPU and ``"loop"`` elsewhere
(`method_for`).

- ``"loop"``: K reverse passes through the one forward graph, each
  ``autograd.grad`` of Σᵢ log p(classes[i, j] | xᵢ). Fastest measured: 0.28× (small CNN)
  and 0.30× (CIFAR ResNet-18) the time of the official "repeat the batch K times"
  formulation on the CPU, with about half its peak memory; on the GPU 1.09–1.14× its time
  at 0.32–0.46× its memory.
- ``"batched"``: one vmapped reverse pass (``is_grads_batched=True``). About as fast as
  ``"loop"`` without ``create_graph`` on CPU, but 2–3× slower with it, because the backward
  of the vmapped pass materialises full-size zero tensors for each of the K slices. Kept as
  an option; on a GPU it was slower still (1.46× official for the ResNet-18 on an H200).
- ``"repeat"``: the official code's layout in one forward: every image repeated K times into
  an (N·K)-row batch, one forward, one reverse pass of Σ_rows log p(class_row | row); the
  logits of each image's first copy serve the cross-entropy term. K× the activation memory of
  ``"loop"``, but one large kernel per layer instead of K reverse passes: on a GPU, where the
  small per-pass kernels do not fill the device, this is the fast one: 0.97× the official
  step's time and memory on the H200 (185 ms vs 216 ms for ``"loop"``, ResNet-18).
  With BatchNorm in train mode the repeated batch has the same mean and (biased) variance as
  the batch, so the logits are the same as ``"loop"``'s; the train-mode coupling then runs over
  all K columns (1/K each) instead of column j alone. Layers that draw randomness (dropout,
  stochastic depth) draw it per copy.

``torch.func`` (``vjp`` + ``vmap``) was also measured and rejected: it refuses BatchNorm in
train mode (the running-statistics update mutates a captured buffer) and was about 3× slower
than ``"loop"`` in eval mode.

BatchNorm in train mode couples the rows of a batch through the batch statistics, so the
gradient for image i then also contains the effect of xᵢ on the other images' log-probabilities
(through the batch mean and variance) for the same column j of ``classes``. The official code
has the same kind of coupling (over its K-fold repeated batch). In eval mode every row depends
only on its own image and the result is exactly ∇ₓ log p(k | x) per image.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "METHODS",
    "Method",
    "input_gradients",
    "method_for",
    "logits_and_input_gradients",
    "official_input_gradients",
]

Method = Literal["loop", "batched", "repeat"]
METHODS: tuple[str, ...] = ("loop", "batched", "repeat")


def method_for(method: str, device: torch.device) -> Method:
    """The method ``train.grad_method`` names on ``device``: ``auto`` is ``repeat`` on a GPU
    (one large kernel per layer fills the device: 0.97× the official step's time on an H200,
    where ``loop`` took 1.09–1.14×) and ``loop`` elsewhere (0.28–0.30× the official time on
    the CPU, at about half its memory); any other name is itself."""
    if method == "auto":
        return "repeat" if device.type == "cuda" else "loop"
    if method not in METHODS:
        raise ValueError(f"method must be auto or one of {', '.join(METHODS)}, got {method!r}")
    chosen: Method = method  # type: ignore[assignment]
    return chosen


def _check(inputs: Tensor, classes: Tensor) -> None:
    if inputs.dim() < 2:
        raise ValueError(f"inputs must be shaped (N, ...), got {tuple(inputs.shape)}")
    if classes.dim() != 2 or classes.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"classes must be shaped (N, K) with N = {inputs.shape[0]}, got {tuple(classes.shape)}"
        )
    if classes.shape[1] < 1:
        raise ValueError("classes must hold at least one class per image (K >= 1)")
    if classes.dtype != torch.int64:
        raise ValueError(f"classes must be int64, got {classes.dtype}")
    if classes.device != inputs.device:
        raise ValueError(f"classes are on {classes.device} but inputs on {inputs.device}")


def _differentiable_copy(inputs: Tensor, create_graph: bool) -> Tensor:
    """The tensor to differentiate with respect to; never ``inputs`` itself.

    A caller's tensor that already carries a graph stays connected when ``create_graph`` is
    set (the gradients are then functions of whatever produced ``inputs``); otherwise a
    detached leaf that shares storage is used. Neither path writes to ``inputs`` or to any
    ``.grad``, because ``torch.autograd.grad`` returns gradients instead of accumulating them.
    """
    if inputs.is_inference():
        # Tensors made under torch.inference_mode() cannot enter an autograd graph.
        inputs = inputs.clone()
    if create_graph and inputs.requires_grad:
        return inputs.clone()
    return inputs.detach().requires_grad_(True)


def _one_hot_columns(classes: Tensor, log_probs: Tensor) -> Tensor:
    """Shape: classes (N, K), log_probs (N, M) -> (K, N, M), slice j one-hot at classes[:, j]."""
    k = classes.shape[1]
    onehot = torch.zeros(k, *log_probs.shape, dtype=log_probs.dtype, device=log_probs.device)
    return onehot.scatter_(2, classes.t().unsqueeze(2), 1.0)


def _check_logits(logits: Tensor, n: int) -> None:
    if logits.dim() != 2 or logits.shape[0] != n:
        raise ValueError(
            f"model must return logits shaped (N, num_classes), got {tuple(logits.shape)}"
        )


def _repeated_logits_and_input_gradients(
    model: nn.Module, inputs: Tensor, classes: Tensor, create_graph: bool
) -> tuple[Tensor, Tensor]:
    """``method="repeat"``: one forward over each image repeated K times, one reverse pass.

    Row i·K + j of the repeated batch is image i and asks for class classes[i, j]; summing
    log p over the rows and differentiating with respect to the rows gives every row its own
    gradient (the rows are separate inputs), and the logits of row i·K serve image i.
    """
    n, k = classes.shape
    with torch.enable_grad():
        if inputs.is_inference():
            inputs = inputs.clone()
        base = inputs if (create_graph and inputs.requires_grad) else inputs.detach()
        rows = base.repeat_interleave(k, dim=0)
        if not rows.requires_grad:
            rows.requires_grad_(True)
        row_logits: Tensor = model(rows)
        _check_logits(row_logits, n * k)
        selected = F.log_softmax(row_logits, dim=1).gather(1, classes.reshape(n * k, 1))
        (grad,) = torch.autograd.grad(
            selected.sum(), rows, retain_graph=create_graph, create_graph=create_graph
        )
        logits = row_logits[::k]
        gradients = grad.reshape(n, k, *inputs.shape[1:])
    if not create_graph:
        return logits.detach(), gradients.detach()
    return logits, gradients


def logits_and_input_gradients(
    model: nn.Module,
    inputs: Tensor,
    classes: Tensor,
    *,
    create_graph: bool = False,
    method: Method = "loop",
) -> tuple[Tensor, Tensor]:
    """Logits and ∇ₓ log softmax(model(x))_k for each target class, from one forward pass.

    Shape: inputs (N, C, H, W) (any (N, ...) works), classes (N, K) int64 in
    [0, num_classes) -> logits (N, num_classes), gradients (N, K, C, H, W).

    ``gradients[i, j] = ∇_{xᵢ} log p(classes[i, j] | xᵢ)`` in the units of ``inputs`` (pixels
    in [0, 1] for pagctl models). The model's mode is used as is (see the module docstring for
    BatchNorm in train mode, whose statistics this one forward pass updates once). Runs with
    gradients enabled even under ``torch.no_grad()``.

    ``create_graph=False``: both results are detached and the graph is freed.
    ``create_graph=True``: both stay differentiable with respect to the model parameters (and
    to ``inputs`` if it requires grad), for ``(CE(logits) + λ·pag_loss(gradients, g)).backward()``.
    ``inputs`` is never modified and no ``.grad`` is written anywhere.
    """
    _check(inputs, classes)
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "repeat":
        return _repeated_logits_and_input_gradients(model, inputs, classes, create_graph)
    k = classes.shape[1]
    with torch.enable_grad():
        x = _differentiable_copy(inputs, create_graph)
        logits: Tensor = model(x)
        _check_logits(logits, inputs.shape[0])
        log_probs = F.log_softmax(logits, dim=1)
        if method == "loop":
            selected = log_probs.gather(1, classes)  # (N, K)
            columns = []
            for j in range(k):
                # Summing over rows is exact: row i of the result depends on row i only
                # (up to BatchNorm train-mode coupling, documented above).
                (grad,) = torch.autograd.grad(
                    selected[:, j].sum(),
                    x,
                    retain_graph=create_graph or j < k - 1,
                    create_graph=create_graph,
                )
                columns.append(grad)
            gradients = torch.stack(columns, dim=1)
        else:
            (batched,) = torch.autograd.grad(
                log_probs,
                x,
                grad_outputs=_one_hot_columns(classes, log_probs),
                is_grads_batched=True,
                retain_graph=create_graph,
                create_graph=create_graph,
            )
            gradients = batched.transpose(0, 1)
    if not create_graph:
        return logits.detach(), gradients.detach()
    return logits, gradients


def input_gradients(
    model: nn.Module,
    inputs: Tensor,
    classes: Tensor,
    *,
    create_graph: bool = False,
    method: Method = "loop",
) -> Tensor:
    """∇ₓ log softmax(model(x))_k for each target class; `logits_and_input_gradients`
    without the logits.

    Shape: inputs (N, C, H, W), classes (N, K) int64 -> (N, K, C, H, W).
    """
    _, gradients = logits_and_input_gradients(
        model, inputs, classes, create_graph=create_graph, method=method
    )
    return gradients


def official_input_gradients(
    model: nn.Module, inputs: Tensor, classes: Tensor, create_graph: bool = False
) -> Tensor:
    """The official code's formulation, for the parity test and the benchmark only.

    Each image is repeated K times into one (N·K)-row batch that requires grad, the model runs
    on it, and the gradient of −mean CE(model(rows), targets) is taken with respect to the
    rows. That gradient is ∇ log p / (N·K) per row; it is multiplied back by N·K so that the
    values equal `input_gradients` (exactly so in eval mode; in BatchNorm train mode the
    coupling differs, since it runs over the repeated batch). No augmentation is applied.

    Shape: inputs (N, C, H, W), classes (N, K) int64 -> (N, K, C, H, W).
    """
    _check(inputs, classes)
    n, k = classes.shape
    with torch.enable_grad():
        rows = (
            inputs.detach()
            .unsqueeze(1)
            .expand(n, k, *inputs.shape[1:])
            .reshape(n * k, *inputs.shape[1:])
            .clone()
            .requires_grad_(True)
        )
        loss = F.cross_entropy(model(rows), classes.reshape(-1))
        (grad,) = torch.autograd.grad(-loss, rows, create_graph=create_graph)
    gradients = (grad * (n * k)).reshape(n, k, *inputs.shape[1:])
    return gradients if create_graph else gradients.detach()
