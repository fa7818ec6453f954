"""Where a recorded number comes from: the digests that name what was measured, and the one
gate every measurement passes on its way into a run folder.

A run folder's ``metrics.jsonl`` is what ``compare``, the study and a reader of a paper
believe about that run, so a record may enter it only if it measured *that folder's*
weights on the points it names. Two digests say so, both carried by the record:

- ``model_sha256`` (`model_digest`): the weights, the normalisation in front of them (a
  `pagctl.models.NormalizedModel`'s ``mean``/``std`` are buffers that ``state_dict`` leaves
  out, yet they change every output) and the network's structure (each module's class and
  settings, and the hooks on it: the same weights in another architecture, or behind a
  hook that rewrites the outputs, compute something else). A folder's digest is that of the
  model it holds, built as every command builds it (`folder_model_digest`, under the
  caller's `pagctl.trust.CodeTrust`);
- ``subset.data_sha256`` (`pagctl.data.subset_digest`): the images and labels measured,
  with ``subset.indices_sha256`` the indices; another split, test fraction or data folder
  gives other images at the same indices. A run's weights also carry the digest of its
  whole test split, as it was when it was trained or imported (`check_test_images`), so an
  evaluation handed other data (``--data-dir`` elsewhere) is refused before it starts.

`record_measurements` is the gate (``pagctl attack``, ``pagctl align-score``,
``pagctl.api.record``, the study): it refuses a folder that is not a run, an empty report, a
report of other weights or of other images, each with one line, and appends nothing unless
every record passes. The training loop and ``pagctl import`` write their own records about
the model they hold, so they append directly.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pagctl.checkpoint import (
    TEST_DIGEST_KEY,
    WEIGHTS,
    append_record,
    confined,
    read_spec,
    weights_metadata,
)
from pagctl.errors import CheckpointError, SpecError
from pagctl.records import AlignRecord, AttackRecord
from pagctl.trust import UNTRUSTED, CodeTrust

if TYPE_CHECKING:
    from torch import Tensor, nn

    from pagctl.data import DataBundle

__all__ = ["Measurement", "check_test_images", "folder_model_digest", "holds_test_images",
           "model_digest", "record_measurements", "weights_digest"]


def weights_digest(tensors: Mapping[str, Tensor]) -> str:
    """`pagctl.stats.tensors_digest` of named tensors in name order (so a state dict and the
    same tensors read back from a file give one digest)."""
    from pagctl.stats import tensors_digest

    return tensors_digest(sorted(tensors.items()))


def model_digest(model: nn.Module) -> str:
    """The digest of what a model computes with: its state dict, its buffers that the state
    dict leaves out (a `NormalizedModel`'s ``mean`` and ``std``), and its structure: each
    module's name, class and settings (``extra_repr``) and the hooks registered on it."""
    named = dict(model.state_dict())
    for name, buffer in model.named_buffers():
        named.setdefault(name, buffer)
    structure = [[name, f"{type(m).__module__}.{type(m).__qualname__}",
                  _ADDRESS.sub("", m.extra_repr()),
                  [_hook_name(h) for hooks in (m._forward_pre_hooks, m._forward_hooks)
                   for h in hooks.values()]]
                 for name, m in model.named_modules()]
    digest = hashlib.sha256(weights_digest(named).encode())
    digest.update(json.dumps(structure).encode())
    return digest.hexdigest()[:16]


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
"""An object's memory address in a repr (``<function f at 0x7f...>``): not part of what a
module computes, and another in every process."""


def _hook_name(hook: Any) -> str:
    return str(getattr(hook, "__qualname__", type(hook).__qualname__))


def folder_model_digest(run_dir: Path, weights: str = "last",
                        trust: CodeTrust = UNTRUSTED) -> str:
    """`model_digest` of the model a classifier run folder holds (``weights``: last or
    best), rebuilt as every command rebuilds it (`pagctl.checkpoint.load_run`: a factory it
    names runs only under ``trust``). CheckpointError when the files are missing, unreadable
    or do not fit together."""
    from pagctl.checkpoint import load_run

    return model_digest(load_run(run_dir, weights=weights, trust=trust).model)


def holds_test_images(run_dir: Path, bundle: DataBundle, weights: str = "last") -> bool:
    """Whether ``bundle``'s test split holds the images and labels the run was trained or
    imported with (the digest its weights carry: `pagctl.checkpoint.TEST_DIGEST_KEY`); True
    for weights saved before they carried it."""
    return _test_digests(run_dir, bundle, weights) is None


def check_test_images(run_dir: Path, bundle: DataBundle, weights: str = "last") -> None:
    """CheckpointError unless ``bundle``'s test split holds the images and labels the run
    was trained or imported with (`holds_test_images`)."""
    differ = _test_digests(run_dir, bundle, weights)
    if differ is not None:
        found, recorded = differ
        raise CheckpointError(
            f"{run_dir}: the data given ({bundle.name}, {len(bundle.test)} test images) are "  # type: ignore[arg-type]
            f"not the test images the run was trained or imported with (digest {found} vs "
            f"{recorded}); point --data-dir (data_dir) at the run's own data")


def _test_digests(run_dir: Path, bundle: DataBundle, weights: str) -> tuple[str, str] | None:
    """(the digest of ``bundle``'s test split, the one the weights carry) when they differ;
    None when they agree or the weights carry none."""
    import torch

    from pagctl.data import subset_digest

    recorded = weights_metadata(confined(run_dir, WEIGHTS[weights])).get(TEST_DIGEST_KEY)
    if recorded is None:
        return None
    size = len(bundle.test)  # type: ignore[arg-type]
    found = subset_digest(bundle.test, torch.arange(size))
    return None if found == recorded else (found, recorded)


@dataclass(frozen=True)
class Measurement:
    """A record on its way into a run folder, with the test-set positions it measured
    (the record names them by digest only). Shape: indices (n,) int64."""

    record: AttackRecord | AlignRecord
    indices: Tensor


def record_measurements(run_dir: Path, measurements: Sequence[Measurement], *,
                        weights: str = "last", bundle: DataBundle | None = None,
                        data_dir: Path | None = None, trust: CodeTrust = UNTRUSTED) -> None:
    """Append each measurement's record to ``run_dir``'s metrics.jsonl, after checking them
    all: ``run_dir`` is a classifier run folder with the ``weights`` file; every record
    measured at least one point, names ``weights``, carries ``model_sha256`` equal to the
    folder's (`folder_model_digest`, the folder's model built under ``trust``) and
    ``subset.data_sha256`` equal to the digest of the folder's test images at its indices
    (read from ``bundle`` when the caller holds the folder's data, else loaded from its
    spec, with ``data_dir`` as ``--data-dir``; either must be the run's own test split,
    `check_test_images`). One CheckpointError naming the folder and the mismatch
    otherwise; then nothing is appended."""
    from pagctl.data import load_data, subset_digest
    from pagctl.stats import indices_digest

    spec = read_spec(run_dir)  # "not a pagctl run folder" when it is not one
    if not measurements:
        raise SpecError("record: no report to record")
    folder_digest = folder_model_digest(run_dir, weights, trust)
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
    check_test_images(run_dir, bundle, weights)
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
