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
device, with finite values; the inputs are not modified and get no ``.grad``; the model's
parameters get no ``.grad``; the model's train/eval flags and BatchNorm buffers are
unchanged; the global RNG (CPU and, when present, CUDA) is unchanged; two builds with the
same seed give the same output. Attacks must also stay in [0, 1] and inside their budget
(``eps`` in ``norm``, from the params or the attack object).

The rules on outputs, inputs and the model are `pagctl.protocols`' checks, the very ones
``pagctl attack`` and training apply to every call at run time; here they raise
``AssertionError``. The global RNG, the Params rules and determinism are checked here only.
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

__all__ = ["check_attack", "check_target_gradient_source", "small_model", "small_data",
           "small_context"]


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
        assert torch.equal(torch.get_rng_state(), self.rng), (
            f"{name}: used the global RNG; draw from a torch.Generator seeded from the "
            "params or BuildContext.seed")
        if self.cuda_rng is not None:
            assert all(torch.equal(a, b) for a, b in
                       zip(torch.cuda.get_rng_state_all(), self.cuda_rng, strict=True)), (
                f"{name}: used the global CUDA RNG")


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
    validated = _validated_params(factory, params)
    ctx = ctx or small_context()
    model = model if model is not None else small_model(ctx.input_shape[0], ctx.num_classes,
                                                        ctx.input_shape[1])
    if inputs is None:
        inputs, _ = small_data(12, *ctx.input_shape[:2], classes=ctx.num_classes)
    if labels is None:
        with torch.no_grad():
            labels = model(inputs).argmax(dim=1)
    attack = _build(factory, validated, ctx)
    assert callable(attack), f"{name}: the built object is not callable"
    untouched = _Untouched(name, model, inputs, labels)
    out: Tensor = attack(model, inputs, labels)
    untouched.check()
    norm, eps = declared_budget(attack, validated)
    with _as_assertion():
        check_attack_output(name, inputs, out, norm, eps)
    again = _build(factory, validated, ctx)(model, inputs, labels)
    assert torch.equal(again, out), (
        f"{name}: two builds with the same seed gave different outputs; seed every random "
        "draw from the params or BuildContext.seed")
    return out


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
