"""What PGD's modes alone promise: targeted PGD (``target`` on pgd_linf and pgd_l2), EOT-PGD
(``eot_pgd``) and MI-FGSM (``mifgsm``, pgd's momentum step). Parity with torchattacks from
the same start (no random start), point for point, on the shared digits MLP; target rules;
EOT's average on a randomised model. The contract every attack shares:
test_attack_suite.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from attack_kit import SHAPE, train_digits_mlp
from pydantic import ValidationError
from torch import Tensor, nn

from pagctl.attacks.mifgsm import MIFGSM
from pagctl.attacks.pgd import EOTPGD, PGDL2, PGDLinf
from pagctl.attacks.steps import choose_targets, normalize_l2
from pagctl.protocols import BuildContext

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


def _ctx(seed: int = 0, classes: int = 10) -> BuildContext:
    return BuildContext(num_classes=classes, input_shape=SHAPE, device=CPU, seed=seed)


@pytest.fixture(scope="module")
def digits_model() -> tuple[nn.Module, Tensor, Tensor]:
    """The shared digits MLP; 120 test points."""
    pytest.importorskip("sklearn.datasets")
    return train_digits_mlp(120)


def _torchattacks(build: Callable[[Any], Any], x: Tensor, y: Tensor,
                  mode: Callable[[Any], None] | None = None) -> Tensor:
    """A torchattacks attack built by ``build(torchattacks)``, in ``mode``, on (x, y); the
    global RNG restored afterwards."""
    torchattacks = pytest.importorskip("torchattacks")
    state = torch.get_rng_state()
    attack = build(torchattacks)
    if mode is not None:
        mode(attack)
    out: Tensor = attack(x, y)
    torch.set_rng_state(state)
    return out


def _fooled(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x).argmax(1) != y


# ------------------------------------------------------------------------- target rules


def test_choose_targets_rules() -> None:
    labels = torch.tensor([0, 3, 9, 9, 5])
    logits = torch.randn(5, 10, generator=torch.Generator().manual_seed(0))
    logits[0, 0] = -100.0  # the label is the lowest: the next-lowest is the target
    least = choose_targets("least_likely", labels, 10, torch.Generator(), logits)
    others = logits.scatter(1, labels[:, None], float("inf"))
    assert torch.equal(least, others.argmin(1)) and bool((least != labels).all())
    assert torch.equal(choose_targets("next", labels, 10, torch.Generator()),
                       torch.tensor([1, 4, 0, 0, 6]))
    many = torch.arange(10).repeat(200)
    drawn = choose_targets("random", many, 10, torch.Generator().manual_seed(1))
    again = choose_targets("random", many, 10, torch.Generator().manual_seed(1))
    assert torch.equal(drawn, again) and bool((drawn != many).all())
    for label in range(10):  # every other class is drawn
        assert set(drawn[many == label].tolist()) == set(range(10)) - {label}
    with pytest.raises(ValueError, match="clean logits"):
        choose_targets("least_likely", labels, 10, torch.Generator())


def test_target_param_validation_and_default() -> None:
    assert PGDLinf.Params().target is None and PGDL2.Params().target is None
    for rule in ("least_likely", "random", "next"):
        assert PGDLinf.Params(target=rule).target == rule
    with pytest.raises(ValidationError):
        PGDLinf.Params(target="most_likely")
    with pytest.raises(ValueError, match="needs loss 'ce'"):
        PGDL2(PGDL2.Params(target="next", loss="kl"), _ctx())
    with pytest.raises(ValueError, match="at least 2 classes"):
        PGDL2(PGDL2.Params(target="next"), _ctx(classes=1))


# --------------------------------------------------------------- targeted PGD, torchattacks


EPS_LINF, EPS_L2, STEPS = 0.07, 0.6, 15


def _ours(norm: str, target: str, keep: str = "last") -> PGDL2 | PGDLinf:
    common: dict[str, Any] = {"steps": STEPS, "random_start": False, "target": target,
                              "keep": keep}
    if norm == "l2":
        return PGDL2(PGDL2.Params(eps=EPS_L2, step_size=0.1, **common), _ctx())
    return PGDLinf(PGDLinf.Params(eps=EPS_LINF, step_size=0.01, **common), _ctx())


def _theirs(norm: str, model: nn.Module) -> Callable[[Any], Any]:
    def build(ta: Any) -> Any:
        if norm == "l2":
            return ta.PGDL2(model, eps=EPS_L2, alpha=0.1, steps=STEPS, random_start=False)
        return ta.PGD(model, eps=EPS_LINF, alpha=0.01, steps=STEPS, random_start=False)
    return build


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("target", ["least_likely", "next", "random"])
def test_targeted_pgd_matches_torchattacks(
    digits_model: tuple[nn.Module, Tensor, Tensor], norm: str, target: str,
) -> None:
    """torchattacks.PGD / PGDL2 without random start, in its targeted modes: least-likely
    with ``set_mode_targeted_least_likely``, next and random with
    ``set_mode_targeted_by_function`` (random: the classes pagctl drew from its seed). The
    same points, to float tolerance, and closer to their target."""
    model, x, y = digits_model
    # A fresh attack's target draw is the first of its stream: the classes it attacks with.
    targets = _ours(norm, target).targets(model, x, y)
    assert targets is not None and bool((targets != y).all())
    adv = _ours(norm, target)(model, x, y)

    def mode(attack: Any) -> None:
        if target == "least_likely":
            attack.set_mode_targeted_least_likely(quiet=True)
        else:
            attack.set_mode_targeted_by_function(lambda images, labels: targets, quiet=True)

    theirs = _torchattacks(_theirs(norm, model), x, y, mode)
    torch.testing.assert_close(adv, theirs, rtol=0, atol=1e-5)
    with torch.no_grad():
        ce = nn.functional.cross_entropy
        closer = ce(model(adv), targets, reduction="none") < ce(model(x), targets,
                                                                reduction="none")
    assert bool(closer.all())


def test_targeted_first_fooled_keeps_misclassified_points(
    digits_model: tuple[nn.Module, Tensor, Tensor],
) -> None:
    """Targeted with keep=first_fooled, success is still misclassification: every point the
    last iterate fools stays fooled, and more are (iterates that left the label before
    turning toward a target the budget cannot reach)."""
    model, x, y = digits_model
    last = _ours("linf", "least_likely")(model, x, y)
    first = _ours("linf", "least_likely", keep="first_fooled")(model, x, y)
    fooled_last, fooled_first = _fooled(model, last, y), _fooled(model, first, y)
    assert bool(fooled_first[fooled_last].all())
    assert int(fooled_first.sum()) > int(fooled_last.sum())


def test_untargeted_pgd_is_unchanged_by_the_target_field(
    digits_model: tuple[nn.Module, Tensor, Tensor],
) -> None:
    """target=null runs exactly the untargeted PGD (torchattacks.PGD without random start)."""
    model, x, y = digits_model
    ours = PGDLinf(PGDLinf.Params(eps=EPS_LINF, steps=STEPS, step_size=0.01,
                                  random_start=False, keep="last"), _ctx())
    theirs = _torchattacks(lambda ta: ta.PGD(model, eps=EPS_LINF, alpha=0.01, steps=STEPS,
                                             random_start=False), x, y)
    torch.testing.assert_close(ours(model, x, y), theirs, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------ MI-FGSM


def test_mifgsm_defaults() -> None:
    p = MIFGSM.Params()
    assert (p.eps, p.steps, p.step_size, p.decay, p.keep) == (8 / 255, 10, None, 1.0,
                                                              "first_fooled")
    assert MIFGSM(MIFGSM.Params(eps=0.1, steps=4), _ctx()).step_size == pytest.approx(0.025)
    with pytest.raises(ValidationError):
        MIFGSM.Params(decay=-0.5)


@pytest.mark.parametrize("decay", [1.0, 0.5])
def test_mifgsm_matches_torchattacks(
    digits_model: tuple[nn.Module, Tensor, Tensor], decay: float,
) -> None:
    """torchattacks.MIFGSM with the same ε, step, steps and decay: the same points."""
    model, x, y = digits_model
    eps, alpha, steps = 0.06, 0.01, 12
    ours = MIFGSM(MIFGSM.Params(eps=eps, steps=steps, step_size=alpha, decay=decay,
                                keep="last"), _ctx())(model, x, y)
    theirs = _torchattacks(lambda ta: ta.MIFGSM(model, eps=eps, alpha=alpha, steps=steps,
                                                decay=decay), x, y)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    fooled = _fooled(model, ours, y)
    assert 0 < int(fooled.sum()) < len(y)  # mid-range: the comparison means something
    # Momentum matters: without it (decay 0) the path differs.
    plain = MIFGSM(MIFGSM.Params(eps=eps, steps=steps, step_size=alpha, decay=0.0,
                                 keep="last"), _ctx())(model, x, y)
    assert not torch.allclose(plain, ours, atol=1e-3)


def test_mifgsm_first_fooled(digits_model: tuple[nn.Module, Tensor, Tensor]) -> None:
    """keep=first_fooled: points fooled by the last iterate stay fooled, and points the
    model misclassifies clean come back unchanged (the clean input is the first iterate)."""
    model, x, y = digits_model
    params = {"eps": 0.06, "steps": 12, "step_size": 0.01}
    last = MIFGSM(MIFGSM.Params(**params, keep="last"), _ctx())(model, x, y)
    first = MIFGSM(MIFGSM.Params(**params), _ctx())(model, x, y)
    assert bool(_fooled(model, first, y)[_fooled(model, last, y)].all())
    wrong = _fooled(model, x, y)
    assert bool(wrong.any()) and torch.equal(first[wrong], x[wrong])


# ------------------------------------------------------------------------------ EOT-PGD


def test_eot_pgd_defaults() -> None:
    p = EOTPGD.Params()
    assert (p.eps, p.norm, p.eot_iter, p.target) == (8 / 255, "linf", 20, None)
    assert EOTPGD.Params(norm="L2").norm == "l2"
    with pytest.raises(ValidationError):
        EOTPGD.Params(eot_iter=0)


def test_eot_pgd_matches_torchattacks_on_a_deterministic_model(
    digits_model: tuple[nn.Module, Tensor, Tensor],
) -> None:
    """torchattacks.EOTPGD without random start: the same points."""
    model, x, y = digits_model
    eps, alpha, steps = 0.07, 0.01, 10
    ours = EOTPGD(EOTPGD.Params(eps=eps, steps=steps, step_size=alpha, eot_iter=3,
                                random_start=False, keep="last"), _ctx())(model, x, y)
    theirs = _torchattacks(lambda ta: ta.EOTPGD(model, eps=eps, alpha=alpha, steps=steps,
                                                eot_iter=3, random_start=False), x, y)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


class NoisyInput(nn.Module):
    """A randomised model: Gaussian noise added to the input, drawn from the module's own
    generator (so a test can replay the draws)."""

    def __init__(self, inner: nn.Module, std: float, seed: int) -> None:
        super().__init__()
        self.inner, self.std = inner, std
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, x: Tensor) -> Tensor:
        noise = torch.randn(x.shape, generator=self.generator).to(x.dtype)
        out: Tensor = self.inner(x + self.std * noise)
        return out


def _pass_gradients(model: nn.Module, x: Tensor, y: Tensor, passes: int) -> list[Tensor]:
    grads = []
    for _ in range(passes):
        x_var = x.clone().requires_grad_(True)
        loss = nn.functional.cross_entropy(model(x_var), y, reduction="sum")
        grads.append(torch.autograd.grad(loss, x_var)[0])
    return grads


def test_eot_pgd_steps_along_the_mean_of_the_passes_gradients(
    digits_model: tuple[nn.Module, Tensor, Tensor],
) -> None:
    """On a noisy model, one L2 step of eot_pgd is the step along the mean of eot_iter
    per-pass gradients (replayed from the same noise), not along any single pass's."""
    inner, x, y = digits_model
    x, y, passes, step = x[:40], y[:40], 5, 0.3
    params = EOTPGD.Params(norm="l2", eps=10.0, steps=1, step_size=step, eot_iter=passes,
                           random_start=False, keep="last")
    adv = EOTPGD(params, _ctx())(NoisyInput(inner, 0.3, seed=4), x, y)
    grads = _pass_gradients(NoisyInput(inner, 0.3, seed=4), x, y, passes)
    expected = (x + step * normalize_l2(torch.stack(grads).mean(0))).clamp(0, 1)
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-5)
    for grad in grads:  # the noise matters: no single pass gives the same step
        single = (x + step * normalize_l2(grad)).clamp(0, 1)
        assert float((single - expected).abs().max()) > 1e-2


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_eot_pgd_with_one_pass_is_pgd(
    digits_model: tuple[nn.Module, Tensor, Tensor], norm: str,
) -> None:
    """eot_iter=1 on a randomised model is PGD exactly (same noise, same random start)."""
    inner, x, y = digits_model
    common: dict[str, Any] = {"eps": 0.07 if norm == "linf" else 0.6, "steps": 5,
                              "restarts": 2, "seed": 3}
    eot = EOTPGD(EOTPGD.Params(norm=norm, eot_iter=1, **common), _ctx())
    plain = (PGDLinf(PGDLinf.Params(**common), _ctx()) if norm == "linf"
             else PGDL2(PGDL2.Params(**common), _ctx()))
    ours = eot(NoisyInput(inner, 0.2, seed=7), x, y)
    assert torch.equal(ours, plain(NoisyInput(inner, 0.2, seed=7), x, y))


def test_turning_toward_every_class_raises_each_targets_probability(
        digits_model: tuple[nn.Module, Tensor, Tensor]) -> None:
    """The class grid's targeted PGD (`pagctl.robustness.targeted`): image i toward class t
    is inside the budget and the box, and t's log-probability is higher there than at the
    clean image, for every pair."""
    from pagctl.robustness.targeted import turn_toward_classes

    model, x, _ = digits_model
    for norm, eps in (("l2", 2.0), ("linf", 0.3)):
        turned = turn_toward_classes(model, x[:4], num_classes=10, norm=norm, eps=eps,
                                     steps=20)
        assert turned.shape == (4, 10, *x.shape[1:])
        delta = (turned - x[:4, None]).flatten(2)
        size = delta.norm(dim=2) if norm == "l2" else delta.abs().amax(dim=2)
        assert float(size.max()) <= eps * (1 + 1e-6)
        assert float(turned.min()) >= 0 and float(turned.max()) <= 1
        with torch.no_grad():
            before = model(x[:4]).log_softmax(1)                          # (4, 10)
            after = model(turned.flatten(0, 1)).log_softmax(1).reshape(4, 10, 10)
        gained = after.diagonal(dim1=1, dim2=2) - before                  # (4, 10)
        assert bool((gained >= 0).all())
