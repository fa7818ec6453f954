"""Conformance checks for plugins: call them from a plugin's own tests.

``check_attack(factory)`` and ``check_target_gradient_source(factory)`` build the plugin the
way pagctl does (validated ``Params``, a :class:`~pagctl.protocols.BuildContext`), call it
on a small model and data, and raise ``AssertionError`` with a specific message at the first
broken rule. They need only torch and pydantic, and run in well under a second for a
typical plugin::

    from pagctl.testing import check_attack
    from my_package import MyAttack

    def test_conforms():
        check_attack(MyAttack)                      # default Params
        check_attack(MyAttack, params={"eps": 0.5, "norm": "l2"})

Rules checked for both kinds: ``Params`` is a pydantic model that rejects unknown keys and
infinite or NaN floats, and whose defaults (merged with ``params``) validate; the factory
builds from a BuildContext; the call returns a tensor of the promised shape, dtype and
device, with finite values; the inputs are not modified (values, ``requires_grad``) and get
no ``.grad``; the model's parameters get no ``.grad``; the model's train/eval flags and
BatchNorm buffers are unchanged; the global RNG (CPU and, when present, CUDA) is unchanged;
two builds with the same seed give the same output. Attacks must also stay in [0, 1] and
inside their budget (``eps`` in ``norm``, from the params or the attack object), and return
a tensor that does not require grad.

The behaviour every attack owes beyond one call has a check each, which pagctl runs on
every built-in attack (tests/test_attack_suite.py) and the example plugins run on theirs:

- `check_attack_seeding`: the output depends on the seed alone (``ctx.seed``, or a
  ``seed`` parameter, which wins): not on the global RNG's state nor on other instances'
  draws, so a batch that ``pagctl attack`` builds afresh with its seed gives the same points
  when an evaluation resumes or runs sharded; another seed gives other points (for attacks
  that draw randomness);
- `check_attack_edge_cases`: an empty batch gives an empty output, ``eps = 0`` a copy of
  the inputs;
- `check_attack_in_train_mode`: called on a model in train mode (and in any dtype), the
  attack keeps every module's flag and leaves no ``.grad``;
- `check_attack_breaks`: with a budget that should, it lowers an undefended model's
  accuracy.

The rules on outputs, inputs and the model are `pagctl.protocols`' checks, the very ones
``pagctl attack`` and training apply to every call at run time; here they raise
``AssertionError``. The global RNG, the Params rules, ``requires_grad`` and the behaviour
checks are checked here only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from pydantic import BaseModel, ValidationError
from torch import Tensor, nn

from pagctl.errors import PluginContractError
from pagctl.protocols import (
    BuildContext,
    ModelSnapshot,
    check_attack_output,
    check_inputs_untouched,
    check_source_output,
    declared_budget,
)

__all__ = ["check_attack", "check_attack_breaks", "check_attack_edge_cases",
           "check_attack_in_train_mode", "check_attack_seeding", "check_target_gradient_source",
           "small_context", "small_data", "small_model"]


def small_model(channels: int = 1, classes: int = 10, size: int = 8) -> nn.Module:
    """A seeded conv + BatchNorm + linear classifier in eval mode (BatchNorm buffers are
    non-trivial, so a plugin that updates them is caught)."""
    gen_state = torch.get_rng_state()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(channels, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
        nn.Linear(6 * size * size, classes),
    )
    with torch.no_grad():
        model.train()
        model(torch.rand(32, channels, size, size))  # give BatchNorm real statistics
    torch.set_rng_state(gen_state)
    return model.eval()


def small_data(n: int = 12, channels: int = 1, size: int = 8, classes: int = 10,
               seed: int = 1) -> tuple[Tensor, Tensor]:
    """Seeded images in [0, 1] with rows exactly on the box faces (0 and 1), and labels
    covering every class. Shape: (n, channels, size, size), (n,)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, channels, size, size), generator=g)
    x[:, :, 0, :] = 1.0
    x[:, :, 1, :] = 0.0
    y = torch.arange(n) % classes
    return x, y


def small_context(channels: int = 1, size: int = 8, classes: int = 10, seed: int = 0,
                  device: str | torch.device = "cpu", train_size: int = 40,
                  cache_dir: Any = None) -> BuildContext:
    """A BuildContext with a small seeded training set (every class present)."""
    from pagctl.data import TensorImageDataset

    x, y = small_data(train_size, channels, size, classes, seed=seed + 100)
    train = TensorImageDataset(x, y)
    return BuildContext(num_classes=classes, input_shape=(channels, size, size),
                        device=torch.device(device), seed=seed, train_set=train,
                        cache_dir=cache_dir, data_fingerprint=train.fingerprint())


def _name(factory: Any) -> str:
    return getattr(factory, "__qualname__", None) or type(factory).__name__


def _validated_params(factory: Any, params: dict[str, Any] | None) -> BaseModel:
    name = _name(factory)
    model_cls = getattr(factory, "Params", None)
    assert isinstance(model_cls, type) and issubclass(model_cls, BaseModel), (
        f"{name}: needs a nested pydantic 'Params' class (a subclass of "
        "pagctl.protocols.PluginParams)")
    given = dict(params or {})
    try:
        validated = model_cls.model_validate(given)
    except ValidationError as exc:
        raise AssertionError(f"{name}: Params rejected {given!r} (defaults must validate): "
                             f"{exc.errors()[0]['msg']}") from None
    try:
        model_cls.model_validate({**given, "surely_not_a_parameter": 1})
    except ValidationError:
        pass
    else:
        raise AssertionError(f"{name}: Params accepted the unknown key "
                             "'surely_not_a_parameter'; set model_config extra='forbid' "
                             "(inherit pagctl.protocols.PluginParams)")
    for field, info in model_cls.model_fields.items():
        if not _holds_float(info.annotation):
            continue
        for bad in (float("nan"), float("inf")):
            try:
                model_cls.model_validate({**given, field: bad})
            except ValidationError:
                continue
            raise AssertionError(f"{name}: Params accepted {field}={bad}; floats must be "
                                 "finite: set model_config allow_inf_nan=False (inherit "
                                 "pagctl.protocols.PluginParams)")
    return validated


def _holds_float(annotation: Any) -> bool:
    """Whether a field's annotation is, or includes, float (Optional, Annotated, unions)."""
    import typing

    if annotation is float:
        return True
    return any(_holds_float(arg) for arg in typing.get_args(annotation))


def _build(factory: Any, params: BaseModel, ctx: BuildContext) -> Any:
    try:
        return factory(params, ctx)
    except Exception as exc:
        raise AssertionError(f"{_name(factory)}: building from a BuildContext raised "
                             f"{type(exc).__name__}: {exc}") from exc


@contextmanager
def _as_assertion() -> Iterator[None]:
    """The contract's checks (`pagctl.protocols`) raise PluginContractError; tests want
    AssertionError with the same message."""
    try:
        yield
    except PluginContractError as exc:
        raise AssertionError(str(exc)) from None


class _Untouched:
    """Snapshots what a plugin call must leave alone (its input tensors, the model, the
    global RNG), and checks it afterwards."""

    def __init__(self, name: str, model: nn.Module | None, *tensors: Tensor) -> None:
        self.name = name
        self.tensors = [(t, t.clone()) for t in tensors]
        self.requires_grad = [t.requires_grad for t in tensors]
        self.model = ModelSnapshot(model) if model is not None else None
        self.rng = torch.get_rng_state()
        self.cuda_rng = (torch.cuda.get_rng_state_all()
                         if torch.cuda.is_initialized() else None)  # type: ignore[no-untyped-call]

    def check(self) -> None:
        name = self.name
        with _as_assertion():
            check_inputs_untouched(name, self.tensors)
            if self.model is not None:
                self.model.check(name)
        for i, ((given, _), before) in enumerate(zip(self.tensors, self.requires_grad,
                                                     strict=True)):
            assert given.requires_grad == before, (
                f"{name}: it changed requires_grad of its input tensor #{i}; work on a "
                "detached copy")
        assert torch.equal(torch.get_rng_state(), self.rng), (
            f"{name}: used the global RNG; draw from a torch.Generator seeded from the "
            "params or BuildContext.seed")
        if self.cuda_rng is not None:
            assert all(torch.equal(a, b) for a, b in
                       zip(torch.cuda.get_rng_state_all(), self.cuda_rng, strict=True)), (
                f"{name}: used the global CUDA RNG")


def _prepared(
    factory: Any,
    params: dict[str, Any] | None,
    ctx: BuildContext | None,
    model: nn.Module | None,
    inputs: Tensor | None,
    labels: Tensor | None,
) -> tuple[BaseModel, BuildContext, nn.Module, Tensor, Tensor]:
    """The validated params and the defaults of the attack checks: :func:`small_context`,
    :func:`small_model`, :func:`small_data`, and labels the model's predictions (every point
    starts correctly classified, computed in the model's current mode)."""
    validated = _validated_params(factory, params)
    ctx = ctx or small_context()
    model = model if model is not None else small_model(ctx.input_shape[0], ctx.num_classes,
                                                        ctx.input_shape[1])
    if inputs is None:
        inputs, _ = small_data(12, *ctx.input_shape[:2], classes=ctx.num_classes)
    if labels is None:
        with torch.no_grad():
            labels = model(inputs).argmax(dim=1)
    return validated, ctx, model, inputs, labels


def _check_output(name: str, attack: Any, params: BaseModel, inputs: Tensor,
                  out: Any) -> None:
    """The contract on an attack's output (`pagctl.protocols.check_attack_output`, with the
    budget it declares), and no autograd graph attached."""
    assert not (isinstance(out, Tensor) and out.requires_grad), (
        f"{name}: returned a tensor that requires grad; return a detached result")
    norm, eps = declared_budget(attack, params)
    with _as_assertion():
        check_attack_output(name, inputs, out, norm, eps)


def check_attack(
    factory: Any,
    *,
    params: dict[str, Any] | None = None,
    ctx: BuildContext | None = None,
    model: nn.Module | None = None,
    inputs: Tensor | None = None,
    labels: Tensor | None = None,
) -> Tensor:
    """Check an attack plugin against the Attack contract; returns its output.

    Defaults: :func:`small_model`, :func:`small_data` (labels are the model's predictions,
    so every point starts correctly classified) and :func:`small_context`.
    Shape: inputs (N, C, H, W) in [0, 1], labels (N,).
    """
    name = _name(factory)
    validated, ctx, model, inputs, labels = _prepared(factory, params, ctx, model, inputs,
                                                      labels)
    attack = _build(factory, validated, ctx)
    assert callable(attack), f"{name}: the built object is not callable"
    untouched = _Untouched(name, model, inputs, labels)
    out: Tensor = attack(model, inputs, labels)
    untouched.check()
    _check_output(name, attack, validated, inputs, out)
    again = _build(factory, validated, ctx)(model, inputs, labels)
    assert torch.equal(again, out), (
        f"{name}: two builds with the same seed gave different outputs; seed every random "
        "draw from the params or BuildContext.seed")
    return out


@contextmanager
def _other_global_rng(seed: int) -> Iterator[None]:
    """The global RNG (CPU and initialised CUDA devices) seeded with ``seed`` inside, restored
    afterwards."""
    initialised = torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
    devices = list(range(torch.cuda.device_count())) if initialised else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def check_attack_seeding(
    factory: Any,
    *,
    params: dict[str, Any] | None = None,
    ctx: BuildContext | None = None,
    model: nn.Module | None = None,
    inputs: Tensor | None = None,
    labels: Tensor | None = None,
    random: bool | None = True,
) -> Tensor:
    """Check that an attack's output is a function of its seed; returns the output of a
    build with ``ctx.seed``.

    A build with ``ctx.seed`` gives the same output when the global RNG has another state and
    another instance with that seed has drawn first (what a resumed, sharded or parallel
    evaluation does: ``pagctl attack`` builds each batch's attack afresh with the batch's
    seed, so that seed must fix the batch's points). When ``Params`` have a ``seed`` field,
    ``seed = ctx.seed`` with another run seed gives the same output (the parameter wins).
    ``random=True``: the attack draws randomness that shows in its output, so
    ``ctx.seed + 1`` gives another output; ``random=False``: it draws none, so one built
    attack gives the same output on every call; ``random=None``: neither is checked (its
    draws do not change the output on these inputs, as random restarts that find nothing
    the first run did not). Defaults as :func:`check_attack`.
    """
    from dataclasses import replace

    name = _name(factory)
    validated, ctx, model, inputs, labels = _prepared(factory, params, ctx, model, inputs,
                                                      labels)
    first: Tensor = _build(factory, validated, ctx)(model, inputs, labels)
    with _other_global_rng(ctx.seed + 12345):
        _build(factory, validated, ctx)(model, inputs, labels)  # another instance draws first
        again = _build(factory, validated, ctx)(model, inputs, labels)
    assert torch.equal(again, first), (
        f"{name}: the same seed gave different outputs after the global RNG was reseeded and "
        "another instance had drawn; draw only from a torch.Generator the instance owns, "
        "seeded from the params or BuildContext.seed")
    if "seed" in type(validated).model_fields:
        own = validated.model_copy(update={"seed": ctx.seed})
        override = _build(factory, own, replace(ctx, seed=ctx.seed + 99))(model, inputs, labels)
        assert torch.equal(override, first), (
            f"{name}: Params seed={ctx.seed} with the run's seed {ctx.seed + 99} gave another "
            f"output than the run's seed {ctx.seed}; the seed parameter must win")
    if random is True:
        other = _build(factory, validated, replace(ctx, seed=ctx.seed + 1))(model, inputs,
                                                                             labels)
        assert not torch.equal(other, first), (
            f"{name}: seeds {ctx.seed} and {ctx.seed + 1} gave the same output; are its "
            "random draws seeded from the params or BuildContext.seed?")
    elif random is False:
        attack = _build(factory, validated, ctx)
        assert torch.equal(attack(model, inputs, labels), attack(model, inputs, labels)), (
            f"{name}: two calls of one deterministic attack gave different outputs")
    return first


def check_attack_edge_cases(
    factory: Any,
    *,
    params: dict[str, Any] | None = None,
    ctx: BuildContext | None = None,
    model: nn.Module | None = None,
    inputs: Tensor | None = None,
    labels: Tensor | None = None,
) -> None:
    """Check an attack on an empty batch (an empty output of the inputs' dtype and device)
    and, when its ``Params`` accept ``eps = 0``, with a zero budget (a copy of the inputs,
    not the inputs themselves). Defaults as :func:`check_attack`."""
    name = _name(factory)
    validated, ctx, model, inputs, labels = _prepared(factory, params, ctx, model, inputs,
                                                      labels)
    empty = _build(factory, validated, ctx)(model, inputs[:0], labels[:0])
    assert isinstance(empty, Tensor) and empty.shape == inputs[:0].shape and (
        empty.dtype == inputs.dtype and empty.device == inputs.device), (
        f"{name}: an empty batch of shape {tuple(inputs[:0].shape)} gave "
        f"{getattr(empty, 'shape', type(empty).__name__)}; return an empty tensor like it")
    if "eps" not in type(validated).model_fields:
        return
    try:
        zero = type(validated).model_validate({**(params or {}), "eps": 0})
    except ValidationError:
        return  # a budget that must be positive
    out = _build(factory, zero, ctx)(model, inputs, labels)
    assert isinstance(out, Tensor) and torch.equal(out, inputs), (
        f"{name}: with eps=0 it did not return the inputs unchanged")
    assert out is not inputs, (
        f"{name}: with eps=0 it returned the inputs tensor itself; return a copy")


def check_attack_in_train_mode(
    factory: Any,
    *,
    params: dict[str, Any] | None = None,
    ctx: BuildContext | None = None,
    model: nn.Module | None = None,
    inputs: Tensor | None = None,
    labels: Tensor | None = None,
) -> Tensor:
    """Check an attack called on a model in train mode (as adversarial training's inner
    attack may be): every module's flag is kept, no ``.grad`` is left, the inputs and the
    global RNG are untouched and the output keeps the contract. BatchNorm statistics may
    change: the attack runs in the mode its caller chose. Pass a float64 model and inputs to
    check another dtype. Defaults: :func:`small_model` in train mode, :func:`small_data`,
    labels covering every class (no forward pass before the call); returns the output."""
    name = _name(factory)
    ctx = ctx or small_context()
    if model is None:
        model = small_model(ctx.input_shape[0], ctx.num_classes, ctx.input_shape[1]).train()
    if inputs is None:
        inputs, _ = small_data(12, *ctx.input_shape[:2], classes=ctx.num_classes)
    if labels is None:
        labels = torch.arange(inputs.shape[0], device=inputs.device) % ctx.num_classes
    validated = _validated_params(factory, params)
    attack = _build(factory, validated, ctx)
    modes = [m.training for m in model.modules()]
    untouched = _Untouched(name, None, inputs, labels)
    out: Tensor = attack(model, inputs, labels)
    untouched.check()
    assert [m.training for m in model.modules()] == modes, (
        f"{name}: it changed the model's train/eval mode (restore each module's flag)")
    left = [k for k, p in model.named_parameters() if p.grad is not None]
    assert not left, f"{name}: it left a .grad on the model parameter '{left[0]}'"
    _check_output(name, attack, validated, inputs, out)
    return out


def check_attack_breaks(
    factory: Any,
    *,
    params: dict[str, Any] | None = None,
    ctx: BuildContext | None = None,
    model: nn.Module | None = None,
    inputs: Tensor | None = None,
    labels: Tensor | None = None,
) -> tuple[float, float]:
    """Check that the attack, with a budget that should, lowers the accuracy of an
    undefended model (a broken attack that returns its inputs, or points on the wrong side,
    does not); returns (clean accuracy, robust accuracy). Pass a model trained on real data
    and a budget it is not robust to; defaults as :func:`check_attack`."""
    name = _name(factory)
    validated, ctx, model, inputs, labels = _prepared(factory, params, ctx, model, inputs,
                                                      labels)
    attack = _build(factory, validated, ctx)
    out: Tensor = attack(model, inputs, labels)
    _check_output(name, attack, validated, inputs, out)
    with torch.no_grad():
        clean = float((model(inputs).argmax(dim=1) == labels).float().mean())
        robust = float((model(out).argmax(dim=1) == labels).float().mean())
    assert robust < clean, (
        f"{name}: robust accuracy {robust:.4g} is not below the clean accuracy {clean:.4g}; "
        "with this budget an undefended model should lose points")
    return clean, robust


def check_target_gradient_source(
    factory: Any,
    *,
    params: dict[str, Any] | None = None,
    ctx: BuildContext | None = None,
    inputs: Tensor | None = None,
    labels: Tensor | None = None,
    classes_per_image: int = 3,
    index_only: bool = False,
) -> Tensor:
    """Check a target-gradient source against the TargetGradientSource contract; returns
    its output for the training images (called with ``index``).

    The source is called twice: on training images with ``index`` (their positions in
    ``ctx.train_set``), and on the same images with ``index=None`` (as for test images);
    ``index_only=True`` skips the second call, for sources that serve training images only
    (a precomputed bank). Shape: -> (N, K, C, H, W).
    """
    name = _name(factory)
    validated = _validated_params(factory, params)
    ctx = ctx or small_context()
    train = ctx.train_set
    if inputs is None:
        assert train is not None, "check_target_gradient_source: ctx needs a train_set"
        picks = list(range(min(8, len(train))))  # type: ignore[arg-type]
        inputs = torch.stack([train[i][0] for i in picks])
        labels = torch.tensor([int(train[i][1]) for i in picks])
        index: Tensor | None = torch.tensor(picks)
    else:
        index = None
    assert labels is not None, "check_target_gradient_source: pass labels with inputs"
    n, k = inputs.shape[0], min(classes_per_image, ctx.num_classes)
    g = torch.Generator().manual_seed(0)
    classes = torch.stack([torch.randperm(ctx.num_classes, generator=g)[:k] for _ in range(n)])
    source = _build(factory, validated, ctx)
    assert callable(source), f"{name}: the built object is not callable"
    outputs = []
    calls = [index] if index is not None and index_only else (
        [index, None] if index is not None else [None])
    for idx in calls:
        untouched = _Untouched(name, None, inputs, labels, classes)
        out: Tensor = source(inputs, labels, classes, index=idx)
        untouched.check()
        where = "with index" if idx is not None else "with index=None"
        with _as_assertion():
            check_source_output(f"{name} ({where})", inputs, classes, out)
        outputs.append(out)
    again = _build(factory, validated, ctx)(inputs, labels, classes, index=index)
    assert torch.equal(again, outputs[0]), (
        f"{name}: two builds with the same seed gave different outputs")
    return outputs[0]
