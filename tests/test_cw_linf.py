"""CW∞ (PGD-L∞ on the Carlini–Wagner margin): the loss by hand and its gradient, parity with
a from-scratch PGD-on-the-margin loop, invariance to scaling the logits, what it breaks that
cross-entropy PGD leaves on a saturated model, params. The contract and behaviour every
attack shares: test_attack_suite.py."""

from __future__ import annotations

import pytest
import torch
from attack_kit import SHAPE, accuracy, train_digits_mlp
from pydantic import ValidationError
from torch import Tensor, nn

from pagctl import registry
from pagctl.attacks.cw_linf import CWLinf
from pagctl.attacks.pgd import PGDLinf, cw_margin, pgd
from pagctl.protocols import BuildContext, declared_budget

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


def _ctx() -> BuildContext:
    return BuildContext(num_classes=10, input_shape=SHAPE, device=CPU, seed=0)


def test_the_loss_is_the_capped_margin_by_hand() -> None:
    logits = torch.tensor([[1.0, 4.0, 2.0], [-1.0, -3.0, -2.0], [0.0, 0.5, 9.0]],
                          requires_grad=True)
    labels = torch.tensor([1, 0, 0])
    # max over the other classes minus the label's logit: 2 − 4, −2 − (−1), 9 − 0
    assert cw_margin(logits, labels).tolist() == [-2.0, -1.0, 0.0]
    assert cw_margin(logits, labels, 5.0).tolist() == [-2.0, -1.0, 5.0]
    assert cw_margin(logits, labels, 100.0).tolist() == [-2.0, -1.0, 9.0]
    # Its gradient on the logits is e_j − e_y (j the best other class), zero once capped.
    (grad,) = torch.autograd.grad(cw_margin(logits, labels).sum(), logits)
    assert grad.tolist() == [[0.0, -1.0, 1.0], [-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]


@pytest.fixture(scope="module")
def digits_model() -> tuple[nn.Module, Tensor, Tensor]:
    pytest.importorskip("sklearn.datasets")
    return train_digits_mlp(300)


def _reference(model: nn.Module, x: Tensor, y: Tensor, eps: float, alpha: float,
               steps: int) -> Tensor:
    """PGD-L∞ on max_{j≠y} z_j − z_y, written out: the last iterate, no random start."""
    x_k = x.clone()
    for _ in range(steps):
        x_var = x_k.clone().requires_grad_(True)
        z = model(x_var)
        true = z.gather(1, y[:, None]).squeeze(1)
        other = torch.where(nn.functional.one_hot(y, z.shape[1]).bool(),
                            torch.full_like(z, -1e9), z).amax(1)
        (grad,) = torch.autograd.grad((other - true).clamp_max(0.0).sum(), x_var)
        x_k = torch.min(torch.max(x_k + alpha * grad.sign(), x - eps), x + eps).clamp(0, 1)
    return x_k.detach()


def test_matches_pgd_on_the_margin_written_out(
    digits_model: tuple[nn.Module, Tensor, Tensor],
) -> None:
    model, x, y = digits_model
    eps, alpha, steps = 0.05, 0.01, 10
    theirs = _reference(model, x, y, eps, alpha, steps)
    ours = CWLinf(CWLinf.Params(eps=eps, step_size=alpha, steps=steps, random_start=False,
                                keep="last"), _ctx())(model, x, y)
    robust = accuracy(model, theirs, y)
    assert 0.2 < robust < 0.9, robust  # mid-range: the comparison means something
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


class _Scaled(nn.Module):
    def __init__(self, inner: nn.Module, scale: float) -> None:
        super().__init__()
        self.inner, self.scale = inner, scale

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.inner(x) * self.scale
        return out


def test_breaks_what_saturated_cross_entropy_leaves(
    digits_model: tuple[nn.Module, Tensor, Tensor],
) -> None:
    """Logits × 1024: the softmax rounds to one on confident points and the cross-entropy's
    gradient to zero, so PGD on it breaks nothing (measured: robust accuracy 0.96 = clean,
    against 0.42 unscaled); the margin's sign steps are those on the unscaled model, point
    for point (robust accuracy 0.44)."""
    model, x, y = digits_model
    hot = _Scaled(model, 1024.0).eval()
    options = {"eps": 0.1, "steps": 10, "step_size": 0.02, "random_start": False}
    plain = CWLinf(CWLinf.Params(**options), _ctx())(model, x, y)
    scaled = CWLinf(CWLinf.Params(**options), _ctx())(hot, x, y)
    assert torch.equal(plain, scaled)
    ce = PGDLinf(PGDLinf.Params(**options), _ctx())(hot, x, y)
    clean, ce_robust, cw_robust = (accuracy(hot, a, y) for a in (x, ce, scaled))
    assert clean > 0.9 and cw_robust < 0.6, (clean, cw_robust)
    assert ce_robust >= clean - 0.01, (ce_robust, clean)


def test_confidence_keeps_climbing_past_the_boundary(
    digits_model: tuple[nn.Module, Tensor, Tensor],
) -> None:
    """κ = 0 stops a misclassified iterate; a large κ keeps raising the margin."""
    model, x, y = digits_model
    margins = []
    for confidence in (0.0, 50.0):
        adv = pgd(model, x, y, norm="linf", eps=0.1, steps=10, step_size=0.02,
                  random_start=False, restarts=1, generator=torch.Generator(),
                  loss="cw", confidence=confidence, keep="last")
        with torch.no_grad():
            margins.append(cw_margin(model(adv), y, 1e9))
    fooled = margins[0] > 0
    assert bool(fooled.any())
    assert float(margins[1][fooled].mean()) > float(margins[0][fooled].mean()) + 1.0


def test_params_defaults_and_registry() -> None:
    p = CWLinf.Params()
    assert (p.eps, p.steps, p.step_size, p.random_start, p.confidence, p.keep) == (
        8 / 255, 20, None, True, 0.0, "first_fooled")
    with pytest.raises(ValidationError):
        CWLinf.Params(confidence=-1.0)
    assert "norm" not in CWLinf.Params.model_fields
    attack = registry.attacks.get("cw_linf")(CWLinf.Params(eps="4/255"), _ctx())
    assert declared_budget(attack, attack.params) == ("linf", 4 / 255)
    assert attack.step_size == pytest.approx(4 / 255 / 4)
    with pytest.raises(ValueError, match="confidence"):
        pgd(torch.nn.Identity(), torch.zeros(1, 1), torch.zeros(1, dtype=torch.int64),
            norm="linf", eps=0.1, steps=1, step_size=None, random_start=False, restarts=1,
            generator=torch.Generator(), loss="cw", confidence=-1.0)
