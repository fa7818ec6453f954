"""Sharded evaluation, one driver for every kind: an evaluation over n points in batches,
split into N shards that run as independent jobs (``shard=(i, N)``, ``--shard I/N``) or as
the ranks of a torchrun launch, then merged (``merge_shards=N``).

Shard i owns the batches ``b`` with ``b % N == i`` (`owned_batches`); each batch is measured
exactly as in the unsharded run (its randomness depends on its number only), so the N
shards' per-point results merge into the unsharded result. Each shard keeps its progress in
a `pagctl.evaluation.state.KeyedState` file named by the evaluation's key (`shard_files`),
so shards of different evaluations never mix and a stopped shard resumes. The attack and the
alignment score are this driver's two payloads: each says where its progress goes
(`progress_file`), each merge goes through `merged_state`, and `across_ranks` runs either
under torchrun.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pagctl.errors import FieldError

if TYPE_CHECKING:
    from pagctl.distributed.launch import Launch
    from pagctl.evaluation.request import EvaluationRequest
    from pagctl.evaluation.state import KeyedState

S = TypeVar("S", bound="KeyedState")
T = TypeVar("T")


def owned_batches(batches: int, shard: tuple[int, int] | None) -> list[int]:
    """The batch numbers shard ``(i, N)`` evaluates (all of them for None); ValueError when
    the index is out of range."""
    if shard is None:
        return list(range(batches))
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: the index must be in [0, {count})")
    return list(range(index, batches, count))


def shard_files(folder: Path, stem: str, key: dict[str, Any], count: int) -> list[Path]:
    """The N shard files of the evaluation ``key`` in ``folder``:
    ``<stem>-<digest of the key>-shard<i>of<N>.safetensors``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return [folder / f"{stem}-{digest}-shard{i}of{count}.safetensors" for i in range(count)]


def progress_file(request: EvaluationRequest, stem: str, key: dict[str, Any]) -> Path | None:
    """Where a run of ``request`` keeps its progress: the ``state`` file, or, for
    ``shard=(i, N)``, shard i's file of the evaluation ``key`` in ``shard_dir`` (its folder
    made; the run keys it with the shard as well); None when the run keeps none."""
    if request.shard is None:
        return request.state
    assert request.shard_dir is not None  # EvaluationRequest.check
    index, count = request.shard
    path = shard_files(request.shard_dir, stem, key, count)[index]
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def merged_state(kind: type[S], request: EvaluationRequest, stem: str, key: dict[str, Any],
                 what: str) -> S:
    """The whole evaluation's state from the ``merge_shards`` finished shard files of
    ``key`` in ``shard_dir``, each loaded and checked as its ``kind`` is
    (`KeyedState.load`). FieldError naming ``merge_shards`` for a shard that has not run
    (naming the one to run; ``what``: the kind of evaluation), one that stopped before its
    end, or parts that do not merge."""
    from pagctl.evaluation.request import check_shard_files

    count = request.merge_shards
    assert count is not None and request.shard_dir is not None  # EvaluationRequest.check
    files = shard_files(request.shard_dir, stem, key, count)
    check_shard_files(files, what, "options, model and data")
    parts = [kind.load(path, {**key, "shard": [i, count]}) for i, path in enumerate(files)]
    for i, part in enumerate(parts):
        stopped = part.unfinished()
        if stopped is not None:
            raise FieldError("merge_shards", f"shard {i}/{count} stopped before the end "
                             f"({stopped}); run shard {i}/{count} (shard=({i}, {count}), "
                             f"--shard {i}/{count} on the command line) again to finish it")
    try:
        return kind.merge(parts)
    except ValueError as exc:
        raise FieldError("merge_shards", str(exc)) from None


def across_ranks(evaluate: Callable[[EvaluationRequest], T], request: EvaluationRequest,
                 launch: Launch | None) -> T | None:
    """``evaluate(request)`` as asked, or, under a torchrun ``launch``, on every rank: each
    evaluates its shard (rank i of N: shard i/N), all wait at a barrier, then rank 0 merges
    the N shards and returns the whole result; the other ranks return None."""
    if launch is None:
        return evaluate(request)
    from pagctl.distributed.launch import barrier, process_group

    with process_group(launch):
        evaluate(request.part(shard=(launch.rank, launch.world_size), merge_shards=None))
        barrier()  # every shard finished: rank 0 merges
    if not launch.leader:
        return None
    return evaluate(request.part(shard=None, merge_shards=launch.world_size))
