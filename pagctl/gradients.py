"""Input gradients of class log-probabilities: the PAG primitive (draft)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

Method = Literal["loop", "batched", "func"]


def _prepare(inputs: Tensor) -> Tensor:
    if inputs.requires_grad:
        return inputs.view_as(inputs)
    return inputs.detach().requires_grad_(True)


def logits_and_input_gradients(
    model: nn.Module,
    inputs: Tensor,
    classes: Tensor,
    *,
    create_graph: bool = False,
    method: Method = "loop",
) -> tuple[Tensor, Tensor]:
    x = _prepare(inputs)
    k = classes.shape[1]
    if method == "func":
        return _func(model, x, classes, create_graph)
    logits = model(x)
    logp = torch.log_softmax(logits, dim=1)
    if method == "loop":
        selected = logp.gather(1, classes)
        grads = []
        for j in range(k):
            (g,) = torch.autograd.grad(
                selected[:, j].sum(),
                x,
                retain_graph=create_graph or j < k - 1,
                create_graph=create_graph,
            )
            grads.append(g)
        out = torch.stack(grads, dim=1)
    else:
        onehot = torch.zeros(k, *logp.shape, dtype=logp.dtype, device=logp.device)
        onehot.scatter_(2, classes.t().unsqueeze(2), 1.0)
        (g,) = torch.autograd.grad(
            logp, x, grad_outputs=onehot, is_grads_batched=True,
            retain_graph=create_graph, create_graph=create_graph,
        )
        out = g.transpose(0, 1)
    if not create_graph:
        return logits.detach(), out.detach()
    return logits, out


def _func(model: nn.Module, x: Tensor, classes: Tensor, create_graph: bool) -> tuple[Tensor, Tensor]:
    from torch.func import vjp, vmap

    def f(xx: Tensor) -> tuple[Tensor, Tensor]:
        logits = model(xx)
        return torch.log_softmax(logits, dim=1), logits

    logp, vjp_fn, logits = vjp(f, x, has_aux=True)
    k = classes.shape[1]
    onehot = torch.zeros(k, *logp.shape, dtype=logp.dtype, device=logp.device)
    onehot.scatter_(2, classes.t().unsqueeze(2), 1.0)
    (g,) = vmap(vjp_fn)(onehot)
    out = g.transpose(0, 1)
    if not create_graph:
        return logits.detach(), out.detach()
    return logits, out


def official_input_gradients(
    model: nn.Module, inputs: Tensor, classes: Tensor, create_graph: bool = False
) -> Tensor:
    n, k = classes.shape
    ims = inputs.detach().unsqueeze(1).expand(n, k, *inputs.shape[1:]).reshape(
        n * k, *inputs.shape[1:]
    ).clone().requires_grad_(True)
    logits = model(ims)
    loss = nn.functional.cross_entropy(logits, classes.reshape(-1))
    (g,) = torch.autograd.grad(-loss, ims, create_graph=create_graph)
    out = (g * (n * k)).reshape(n, k, *inputs.shape[1:])
    return out if create_graph else out.detach()
