"""Shared pieces of the attack tests: a BatchNorm model, inputs on the [0, 1] box faces,
perturbation norms, and accuracy."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from pagctl.attacks.steps import norms_of

SHAPE = (1, 8, 8)


def norms(delta: Tensor, norm: str) -> Tensor:
    return norms_of(delta, norm)  # type: ignore[arg-type]


def bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 8 * 8, 10),
    )


def box_inputs(n: int = 16) -> tuple[Tensor, Tensor]:
    """Random (n, 1, 8, 8) images with rows on the box faces and just below them."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand((n, *SHAPE), generator=g)
    x[:, :, 0, :] = 1.0
    x[:, :, 1, :] = 0.0
    x[:, :, 2, :] = 1.0 - 1e-3
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def train_digits_mlp(num_test: int = 300) -> tuple[nn.Module, Tensor, Tensor]:
    """A small MLP trained for a few seconds on scikit-learn's 8×8 digits (/16), in eval
    mode, with ``num_test`` held-out points."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16
    y = torch.tensor(digits.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    train, test = perm[:1400], perm[1400:1400 + num_test]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(15):
        for batch in torch.split(torch.randperm(len(train), generator=g), 64):
            i = train[batch]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[i]), y[i])
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    return model, x[test], y[test]


def assert_grouping_does_not_matter(attack: Callable[[int, torch.Generator], Tensor],
                                    model: nn.Module, y: Tensor) -> None:
    """``attack(runs_together, generator)`` with its runs in groups of 1 (the reference's
    order), 2, 4 and all: the same verdict for every point, the same points up to the
    rounding of the model's arithmetic on batches of other sizes (within 1e-3; a wrong
    start or merge order moves points by far more), and the generator left in the same
    state (a plugin's next call continues the same stream); the later runs had something
    left to attack."""
    results = {}
    for together in (1, 2, 4, 0):
        generator = torch.Generator().manual_seed(5)
        out = attack(together, generator)
        results[together] = (out, torch.rand(3, generator=generator))
    base, after = results[1]
    fooled = model(base).argmax(1) != y
    assert 0 < int(fooled.sum()) < len(y)
    for together, (out, draw) in results.items():
        assert torch.equal(model(out).argmax(1) != y, fooled), together
        torch.testing.assert_close(out, base, rtol=0, atol=1e-3, msg=f"groups of {together}")
        assert torch.equal(draw, after), together
