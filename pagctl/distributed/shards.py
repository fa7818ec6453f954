"""Sharded evaluation: an evaluation over n points in batches, split into N shards that run
as independent jobs (``--shard I/N``) or as the ranks of a torchrun launch.

Shard i owns the batches ``b`` with ``b % N == i``; each batch is evaluated exactly as in the
unsharded run (its randomness depends on its number only), so the N shards' per-point results
merge into the unsharded result. Each shard keeps its progress in a file named by the
evaluation's key, so shards of different evaluations never mix and a stopped shard resumes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pagctl.errors import SpecError


def parse_shard(text: str, flag: str = "--shard") -> tuple[int, int]:
    """``I/N`` as (I, N); SpecError naming ``flag`` unless 0 <= I < N."""
    index, _, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise SpecError(f"{flag}: expected I/N with 0 <= I < N, shards being numbered from "
                        f"0 (e.g. {flag} 0/4 … {flag} 3/4), or 'torchrun', got '{text}'")
    return i, n


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
