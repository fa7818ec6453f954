"""Where a recorded number comes from: the digests that name what was measured, and the one
gate every measurement passes on its way into a run folder.

A run folder's ``metrics.jsonl`` is what ``compare``, the study and a reader of a paper
believe about that run, so a record may enter it only if it measured *that folder's*
weights on the points it names. Two digests say so, both carried by the record:

- ``model_sha256`` (`model_digest`): the weights and the normalisation in front of them
  (a `pagctl.models.NormalizedModel`'s ``mean``/``std`` are buffers that ``state_dict``
  leaves out, yet they change every output). A folder's digest is computed from its files
  alone (`folder_model_digest`), without building the network, so checking a folder that
  names code runs none;
- ``subset.data_sha256`` (`pagctl.data.subset_digest`): the images and labels measured,
  with ``subset.indices_sha256`` the indices; another split, test fraction or data folder
  gives other images at the same indices.

`record_measurements` is the gate (``pagctl attack``, ``pagctl align-score``,
``pagctl.api.record``, the study): it refuses a folder that is not a run, an empty report, a
report of other weights or of other images, each with one line, and appends nothing unless
every record passes. The training loop and ``pagctl import`` write their own records about
the model they hold, so they append directly.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pagctl.checkpoint import (
    CONFIG_FILE,
    WEIGHTS,
    append_record,
    confined,
    load_tensors,
    read_spec,
)
from pagctl.errors import CheckpointError, SpecError
from pagctl.records import AlignRecord, AttackRecord

if TYPE_CHECKING:
    from torch import Tensor, nn

    from pagctl.data import DataBundle

__all__ = ["Measurement", "folder_model_digest", "model_digest", "record_measurements",
           "weights_digest"]


def weights_digest(tensors: Mapping[str, Tensor]) -> str:
    """`pagctl.stats.tensors_digest` of named tensors in name order (so a state dict and the
    same tensors read back from a file give one digest)."""
    from pagctl.stats import tensors_digest

    return tensors_digest(sorted(tensors.items()))


def model_digest(model: nn.Module) -> str:
    """The digest of what a model computes with: its state dict and its buffers that the
    state dict leaves out (a `NormalizedModel`'s ``mean`` and ``std``)."""
    named = dict(model.state_dict())
    for name, buffer in model.named_buffers():
        named.setdefault(name, buffer)
    return weights_digest(named)


def folder_model_digest(run_dir: Path, weights: str = "last") -> str:
    """`model_digest` of the model a classifier run folder holds (``weights``: last or best),
    read from its weights file and config.json alone: no network is built, no code runs.
    CheckpointError when the files are missing or unreadable."""
    import torch

    if weights not in WEIGHTS:
        raise SpecError(f"weights: {weights!r} is not one of {', '.join(WEIGHTS)}")
    tensors = load_tensors(confined(run_dir, WEIGHTS[weights]))
    path = confined(run_dir, CONFIG_FILE)
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
        pretrained = cfg["pretrained_cfg"]
        mean = [float(v) for v in pretrained["mean"]]
        std = [float(v) for v in pretrained["std"]]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable or without pretrained_cfg.mean/std "
                              f"({type(exc).__name__}); restore config.json") from None
    named: dict[str, Tensor] = {f"net.{k}": v for k, v in tensors.items()}
    named["mean"] = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    named["std"] = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return weights_digest(named)


@dataclass(frozen=True)
class Measurement:
    """A record on its way into a run folder, with the test-set positions it measured
    (the record names them by digest only). Shape: indices (n,) int64."""

    record: AttackRecord | AlignRecord
    indices: Tensor


def record_measurements(run_dir: Path, measurements: Sequence[Measurement], *,
                        weights: str = "last", bundle: DataBundle | None = None,
                        data_dir: Path | None = None) -> None:
    """Append each measurement's record to ``run_dir``'s metrics.jsonl, after checking them
    all: ``run_dir`` is a classifier run folder with the ``weights`` file; every record
    measured at least one point, names ``weights``, carries ``model_sha256`` equal to the
    folder's (`folder_model_digest`) and ``subset.data_sha256`` equal to the digest of the
    folder's test images at its indices (read from ``bundle`` when the caller holds the
    folder's data, else loaded from its spec, with ``data_dir`` as ``--data-dir``). One
    CheckpointError naming the folder and the mismatch otherwise; then nothing is
    appended."""
    from pagctl.data import load_data, subset_digest
    from pagctl.stats import indices_digest

    spec = read_spec(run_dir)  # "not a pagctl run folder" when it is not one
    if not measurements:
        raise SpecError("record: no report to record")
    folder_digest = folder_model_digest(run_dir, weights)
    for m in measurements:
        rec, what = m.record, _what(m.record)
        if rec.n == 0 or len(m.indices) == 0:
            raise CheckpointError(f"{run_dir}: not recorded: the {what} measured no point "
                                  "(n = 0)")
        if (rec.weights or "last") != weights:
            raise CheckpointError(f"{run_dir}: not recorded: the {what} measured the "
                                  f"{rec.weights} weights, not the {weights} ones")
        if rec.model_sha256 is None:
            raise CheckpointError(f"{run_dir}: not recorded: the {what} does not say which "
                                  "weights it measured (no model_sha256); measure the run "
                                  "folder itself")
        if rec.model_sha256 != folder_digest:
            raise CheckpointError(
                f"{run_dir}: not recorded: the {what} measured another model (weights digest "
                f"{rec.model_sha256} vs the folder's {weights} weights {folder_digest}); "
                "a record enters only the run whose model it measured")
        subset = rec.subset
        if subset is None or subset.data_sha256 is None:
            raise CheckpointError(f"{run_dir}: not recorded: the {what} does not say which "
                                  "images it measured (no subset.data_sha256)")
        if subset.indices_sha256 != indices_digest(m.indices) or len(m.indices) != rec.n:
            raise CheckpointError(f"{run_dir}: not recorded: the {what}'s indices are not "
                                  "the points its record names")
    if bundle is None:
        data_spec = spec.data if data_dir is None else \
            spec.data.model_copy(update={"root": data_dir})
        bundle = load_data(data_spec)
    size = len(bundle.test)  # type: ignore[arg-type]
    for m in measurements:
        rec, what = m.record, _what(m.record)
        if int(m.indices.min()) < 0 or int(m.indices.max()) >= size:
            raise CheckpointError(f"{run_dir}: not recorded: the {what} measured points "
                                  f"beyond the run's {size} test images")
        assert rec.subset is not None
        found = subset_digest(bundle.test, m.indices)
        if rec.subset.data_sha256 != found:
            raise CheckpointError(
                f"{run_dir}: not recorded: the {what} measured other images than the run's "
                f"test points {_span(m.indices)} (images digest {rec.subset.data_sha256} vs "
                f"{found}); measure it on the run's own data")
    for m in measurements:
        append_record(run_dir, m.record)


def _what(record: AttackRecord | AlignRecord) -> str:
    if isinstance(record, AttackRecord):
        budget = f" {record.norm} eps={record.eps:.4g}" if record.eps is not None else ""
        return f"'{record.attack}{budget}' report"
    return f"'{record.source}' alignment report"


def _span(indices: Iterable[Any]) -> str:
    values = [int(i) for i in indices]
    return f"{values[0]}…{values[-1]}" if len(values) > 1 else str(values[0])
