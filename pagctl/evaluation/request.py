"""What every evaluation is asked, validated once for the command line and the Python API.

An attack (`pagctl.robustness.evaluate.evaluate_attack`) and an alignment score
(`pagctl.align.evaluate_alignment`) both measure a model on some of a dataset's test points,
in batches, with a seed, at a precision, possibly resumable or in shards. Those settings
travel as one frozen value, `EvaluationRequest`, from the face that took them (the command's
options, the API's keywords) to the batch loop, instead of the same keywords re-declared at
every layer. Both evaluations check it here before anything is measured, so ``pagctl
attack`` and `pagctl.api.attack` refuse the same input with the same words: a limit or batch
size below one, indices that repeat or leave the test set, budgets the attack's parameters
refuse, a shard that would own no batch, and a model whose outputs do not fit the data
(three logits for ten classes measures nothing). Every refusal is a `FieldError` naming the
Python parameter (``limit``, ``batch_size``, ...); the command line prints its flag instead
(`pagctl.cli.FLAGS`).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pagctl.errors import FieldError

if TYPE_CHECKING:
    import torch
    from pydantic import BaseModel
    from torch import Tensor, nn

    from pagctl.data import DataBundle

__all__ = ["EvaluationRequest", "as_indices", "check_outputs", "check_settings",
           "check_shard_files", "check_shards", "evaluation_points", "sweep_budgets"]

MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class EvaluationRequest:
    """How an evaluation measures, whatever it measures (an attack, an alignment score).

    ``indices``: the test-set positions to measure (a tensor, numpy array or sequence of
    ints; None: the whole test set), of which the first ``limit``. ``batch_size`` and
    ``seed`` fix every batch's randomness (batch b is seeded from ``seed`` and b alone, so
    a resumed or sharded evaluation equals a whole one). ``precision``: the model's forward,
    float32 or bfloat16 autocast (opt-in; attacks only). ``state``: a progress file, read to
    resume and rewritten after every batch. ``shard=(i, N)``: evaluate shard i of N into its
    file in ``shard_dir``; ``merge_shards=N``: evaluate nothing, merge the N finished shards
    there (`pagctl.evaluation.sharding`). ``progress``: a progress line on stderr.

    Frozen: a layer that needs another part (a shard's file as the state) makes a copy
    (`part`, `dataclasses.replace`), so no layer changes what its caller asked.
    """

    indices: Any = None
    limit: int | None = None
    batch_size: int = 256
    seed: int = 0
    device: Any = "cpu"
    precision: str = "float32"
    progress: bool = False
    state: Path | None = None
    shard: tuple[int, int] | None = None
    merge_shards: int | None = None
    shard_dir: Path | None = None

    def check(self, probe_size: Any = 1) -> None:
        """The settings on their own (before any data is read): batch size, seed, probe
        size, precision, and a shard or a merge with the folder they live in. FieldError
        naming the field."""
        from pagctl.models import PRECISIONS

        check_settings(batch_size=self.batch_size, seed=self.seed, probe_size=probe_size)
        if self.precision not in PRECISIONS:
            raise FieldError("precision", f"{self.precision!r} is not one of "
                             f"{', '.join(PRECISIONS)}")
        if self.shard is not None and self.merge_shards is not None:
            raise FieldError("merge_shards", "run one shard, or merge them all; not both")
        if self.sharded and self.state is not None:
            raise FieldError("state", "shards keep their progress in shard_dir themselves; "
                             "drop state")
        if self.sharded and self.shard_dir is None:
            raise FieldError("shard_dir", "a shard or a merge needs the folder its shards "
                             "live in; give shard_dir")

    @property
    def sharded(self) -> bool:
        """Whether this is one shard of an evaluation, or the merge of its shards."""
        return self.shard is not None or self.merge_shards is not None

    def points(self, num_test: int) -> Tensor:
        """The test points this request measures (`evaluation_points`), checked to split
        into its shards (`check_shards`). Shape: -> (n,) int64."""
        indices = evaluation_points(num_test, as_indices(self.indices), self.limit)
        check_shards(len(indices), self.batch_size, self.shard, self.merge_shards)
        return indices

    def part(self, **changes: Any) -> EvaluationRequest:
        """A copy with ``changes`` (e.g. one shard of this request, or its merge)."""
        return replace(self, **changes)


def _whole(field: str, value: Any, low: int, high: int | None = None) -> int:
    """``value`` as an int in [low, high]; FieldError otherwise (bools are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise FieldError(field, f"expected a whole number, got {value!r}")
    number = int(value)
    if number < low or (high is not None and number > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise FieldError(field, f"{number} is not {bound}")
    return number


def check_settings(*, batch_size: Any, seed: Any, probe_size: Any = 1) -> None:
    """The batch size and the probes' sample size (each at least 1) and the seed (0 to
    2³²−1) of an evaluation."""
    _whole("batch_size", batch_size, 1)
    _whole("probe_size", probe_size, 1)
    _whole("seed", seed, 0, MAX_SEED)


def as_indices(value: Any) -> Tensor | None:
    """Test-set indices given as a tensor, a numpy array or a sequence of ints, as a 1-D
    int64 tensor (None stays None); FieldError for anything else."""
    import numpy as np
    import torch

    if value is None:
        return None
    if isinstance(value, (str, bytes)):
        raise FieldError("indices", "expected integers, got text")
    if isinstance(value, torch.Tensor) and value.device.type == "meta":
        raise FieldError("indices", "a tensor on the meta device holds no values")
    try:
        array = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value)
    except (TypeError, ValueError):
        raise FieldError("indices", f"expected integers, got {type(value).__name__}") from None
    if array.dtype == bool or not (array.size == 0 or np.issubdtype(array.dtype, np.integer)):
        raise FieldError("indices", f"expected integers, got {array.dtype} values")
    if array.ndim != 1:
        raise FieldError("indices", f"expected a flat list of integers, got shape "
                         f"{tuple(array.shape)}")
    if array.size and (int(array.max()) >= 2**63 or int(array.min()) < -2**63):
        raise FieldError("indices", "an index is far outside any test set")
    return torch.as_tensor(array.astype(np.int64))


def evaluation_points(num_test: int, indices: Tensor | None, limit: Any) -> Tensor:
    """The test points an evaluation measures: ``indices`` (all ``num_test`` when None),
    each once and inside the test set, then the first ``limit`` (at least 1).
    Shape: -> (n,) int64, n >= 1."""
    import torch

    if limit is not None:
        _whole("limit", limit, 1)
    if num_test == 0:
        raise FieldError("data", "the test set holds no image")
    if indices is None:
        indices = torch.arange(num_test)
    elif indices.numel() == 0:
        raise FieldError("indices", "no index given; give at least one, or none for the "
                         "whole test set")
    else:
        outside = indices[(indices < 0) | (indices >= num_test)]
        if outside.numel():
            raise FieldError("indices", f"index {int(outside[0])} is outside the test set "
                             f"(0..{num_test - 1})")
        unique, counts = torch.unique(indices, return_counts=True)
        if bool((counts > 1).any()):
            raise FieldError("indices", f"index {int(unique[counts > 1][0])} appears twice; "
                             "list each once")
    return indices if limit is None else indices[:limit]


def sweep_budgets(params: BaseModel, values: Sequence[Any]) -> list[float]:
    """The budgets of an ε-sweep, each validated as the attack's ``eps`` (numbers or exact
    fractions such as "8/255"); FieldError naming ``eps_sweep`` for a budget the attack's
    parameters refuse, an attack without ``eps``, an empty sweep or a budget given twice."""
    from pydantic import ValidationError

    if "eps" not in type(params).model_fields:
        raise FieldError("eps_sweep", "this attack has no eps parameter to sweep")
    if isinstance(values, (str, bytes)):
        raise FieldError("eps_sweep", f"expected a list of budgets, got the text {values!r}")
    try:
        values = list(values)
    except TypeError:
        raise FieldError("eps_sweep", f"expected a list of budgets, got "
                         f"{type(values).__name__}") from None
    if len(values) == 0:
        raise FieldError("eps_sweep", "give at least one budget, e.g. 0.25,0.5,1")
    budgets: list[float] = []
    for value in values:
        try:
            checked: Any = type(params).model_validate({**params.model_dump(), "eps": value})
        except ValidationError:
            raise FieldError("eps_sweep", f"{value!r} is not a valid eps for this attack; give "
                             "numbers >= 0 or fractions such as 8/255") from None
        budgets.append(float(checked.eps))
    if len(set(budgets)) != len(budgets):
        raise FieldError("eps_sweep", "a budget appears twice; list each once")
    return budgets


def check_shards(points: int, batch_size: int, shard: tuple[int, int] | None,
                 merge_shards: int | None) -> None:
    """A sharded evaluation of ``points`` points in batches of ``batch_size``: shard ``(i,
    N)`` with 0 <= i < N, and N (or ``merge_shards``) at most the number of batches, since
    shard i owns the batches b with b % N == i and one that owns none measures nothing."""
    batches = -(-points // batch_size)
    if shard is not None and (
            not isinstance(shard, (tuple, list)) or len(shard) != 2
            or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                       for v in shard)
            or not 0 <= shard[0] < shard[1]):
        raise FieldError("shard", f"expected (i, N) with 0 <= i < N, got {shard!r}")
    count = shard[1] if shard is not None else merge_shards
    if count is None:
        return
    field = "shard" if shard is not None else "merge_shards"
    _whole(field, count, 1)
    if count > batches:
        raise FieldError(field, f"{count} shards of {points} points in batches of "
                         f"{batch_size} ({batches} batch{'es' if batches > 1 else ''}): a "
                         f"shard owns whole batches; use at most {batches} shards, or a "
                         "smaller batch_size")


def check_shard_files(files: Sequence[Path], what: str, same: str) -> None:
    """Before a merge: each of the N shard files of one evaluation is there (and not a link
    out of its folder, `pagctl.checkpoint.confined`); FieldError naming ``merge_shards``,
    the first missing shard and how to run it (``what``: the kind of evaluation; ``same``:
    what its run must share) otherwise."""
    from pagctl.checkpoint import confined

    count = len(files)
    for i, path in enumerate(files):
        if not confined(path.parent, path.name).exists():
            raise FieldError("merge_shards", f"shard {i}/{count} of this {what} has not run "
                             f"({path} is missing); run shard {i}/{count} (shard=({i}, "
                             f"{count}), --shard {i}/{count} on the command line) with the "
                             f"same {same}")


def check_outputs(model: nn.Module, bundle: DataBundle, device: torch.device | str) -> None:
    """The model takes the data's images and gives one logit per class of the data: one
    forward on the first test points (two at most), in eval mode, without gradients.
    FieldError naming ``model`` otherwise."""
    import torch

    from pagctl.data import get_batch
    from pagctl.models import eval_mode

    count = min(2, len(bundle.test))  # type: ignore[arg-type]
    x, _ = get_batch(bundle.test, torch.arange(count))
    try:
        with eval_mode(model), torch.no_grad():
            logits = model(x.to(device))
    except Exception as exc:  # the model's own code failed on the data's images
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise FieldError("model", f"fails on {count} image(s) of {bundle.name} shaped "
                         f"{tuple(x.shape[1:])}: {type(exc).__name__}: {first}") from None
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 \
            or logits.shape != (count, bundle.num_classes):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else \
            type(logits).__name__
        raise FieldError("model", f"gives outputs {shape} for {count} image(s) of "
                         f"{bundle.name}; expected ({count}, {bundle.num_classes}): one logit "
                         "per class of the data")
