"""The adversarial examples of an evaluation, kept for every attacked point
(``pagctl.api.attack(..., keep_adversarial=True)``, ``pagctl attack --save-adversarial``):
held in memory, or in a memory-mapped temporary file when they would take more than
`IN_MEMORY_BYTES` (ImageNet-sized points: 10,000 of them are 6 GB), read back in batches,
and written as one safetensors file without ever holding the whole of it in memory.

The engine attacks stage by stage over the whole subset (`pagctl.robustness.engine`), so a
point's adversarial example is final only when the last stage is done: the examples are kept
as the evaluation runs (`image_store` is where the engine writes them) and handed out once
it ends (`AdversarialExamples`). ``x_adv`` is the adversarial example where a stage broke the
point, the last stage's output where none did, and the clean image where the model already
misclassified the point (no stage attacks it).

The file (`AdversarialExamples.save`) is what ``--save-adversarial`` has always written:
``x`` (the clean images), ``x_adv``, ``y``, ``indices`` (positions in the test set, or in the
user's file), ``clean_correct`` and ``robust_correct`` (uint8), in attack order, with the
attack, norm and eps in its metadata.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor
    from torch.utils.data import Dataset

    from pagctl.robustness.report import AttackReport

__all__ = ["IN_MEMORY_BYTES", "AdversarialBatch", "AdversarialExamples", "adversarial_file",
           "image_store", "numbered"]

IN_MEMORY_BYTES = 256 * 2**20
"""Above this many bytes the kept adversarial examples live in a memory-mapped temporary
file (deleted when they are), not in memory: the operating system pages them in and out."""

_CHUNK = 256
"""Points read or written at a time when filling the store or writing the file."""


def image_store(dataset: Dataset[Any], indices: Tensor, count: int, *,
                limit: int | None = None) -> Tensor:
    """The clean images of the first ``count`` points of ``dataset[indices]`` as float32, a
    tensor the engine then overwrites with each point's adversarial example: in memory up to
    ``limit`` bytes (None: `IN_MEMORY_BYTES`), else backed by a memory-mapped file in the
    temporary folder (``TMPDIR``; unlinked at once, so it goes when the tensor does).
    Shape: -> (count, C, H, W)."""
    import tempfile

    import numpy as np
    import torch

    from pagctl.data import get_batch

    if count == 0:
        return torch.zeros(0)
    first, _ = get_batch(dataset, indices[:1])
    shape = (count, *first.shape[1:])
    if count * first[0].numel() * 4 <= (IN_MEMORY_BYTES if limit is None else limit):
        return get_batch(dataset, indices[:count])[0].float()
    with tempfile.NamedTemporaryFile(prefix="pagctl-adversarial-", suffix=".f32") as handle:
        mapped = np.memmap(handle.name, dtype=np.float32, mode="w+", shape=shape)
    store = torch.from_numpy(mapped)  # the mapping outlives the file's name
    for lo in range(0, count, _CHUNK):
        store[lo: lo + _CHUNK] = get_batch(dataset, indices[lo: min(lo + _CHUNK, count)])[0]
    return store


@dataclass(frozen=True)
class AdversarialBatch:
    """Consecutive attacked points: ``indices`` (n,) positions in the test set, ``x`` (n, C,
    H, W) the clean images, ``x_adv`` their adversarial examples, ``y`` the labels,
    ``clean_correct`` and ``robust_correct`` (n,) bool."""

    indices: Tensor
    x: Tensor
    x_adv: Tensor
    y: Tensor
    clean_correct: Tensor
    robust_correct: Tensor


class AdversarialExamples:
    """Every attacked point's adversarial example, in attack order, with the clean images
    read from the evaluated dataset on demand (so only the adversarial half is kept).

    ``len()`` is the number of points; `batches` hands them out a batch at a time, `x_adv`
    as one tensor (all in memory: for small evaluations), `save` writes the
    ``--save-adversarial`` file."""

    def __init__(self, report: AttackReport, dataset: Dataset[Any]) -> None:
        if report.images is None or report.indices is None or report.labels is None \
                or len(report.images) != report.n:
            raise ValueError("the report keeps no adversarial example for every point")
        self._report = report
        self._dataset = dataset
        self.indices: Tensor = report.indices
        self.labels: Tensor = report.labels

    def __len__(self) -> int:
        return int(self._report.n)

    def batches(self, batch_size: int = 256) -> Iterator[AdversarialBatch]:
        """The points ``batch_size`` at a time, in attack order (CPU tensors)."""
        from pagctl.data import get_batch

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        report = self._report
        assert report.images is not None
        for lo in range(0, len(self), batch_size):
            hi = min(lo + batch_size, len(self))
            x, y = get_batch(self._dataset, self.indices[lo:hi])
            yield AdversarialBatch(self.indices[lo:hi].clone(), x.float(),
                                   report.images[lo:hi].clone(), y,
                                   report.clean_mask[lo:hi].clone(),
                                   report.robust_mask[lo:hi].clone())

    def x_adv(self) -> Tensor:
        """All adversarial examples as one in-memory tensor. Shape: (n, C, H, W) float32."""
        assert self._report.images is not None
        return self._report.images.clone()

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> None:
        """The ``--save-adversarial`` file (module docstring) at ``path``, written atomically,
        a batch at a time."""
        import torch

        from pagctl.checkpoint import save_tensor_chunks

        report = self._report
        assert report.images is not None
        n, shape = len(self), tuple(report.images.shape)

        def column(get: Any) -> Iterator[Tensor]:
            return (get(batch) for batch in self.batches(_CHUNK))

        save_tensor_chunks(Path(path), [
            ("x", torch.float32, shape, column(lambda b: b.x)),
            ("x_adv", torch.float32, shape, column(lambda b: b.x_adv.float())),
            ("y", torch.int64, (n,), column(lambda b: b.y.to(torch.int64))),
            ("indices", torch.int64, (n,), column(lambda b: b.indices.to(torch.int64))),
            ("clean_correct", torch.uint8, (n,),
             column(lambda b: b.clean_correct.to(torch.uint8))),
            ("robust_correct", torch.uint8, (n,),
             column(lambda b: b.robust_correct.to(torch.uint8)))], metadata)


def numbered(path: Path, position: int, count: int) -> Path:
    """The file of budget ``position`` of ``count`` (an ε-sweep's: ``-eps<i>`` before the
    suffix), or ``path`` itself for a single budget."""
    return path if count == 1 else path.with_name(f"{path.stem}-eps{position}{path.suffix}")


def adversarial_file(path: Any) -> Path:
    """Where to write the adversarial examples (``save_adversarial``, ``--save-adversarial``),
    checked before any work: a ``.safetensors`` file name, not a folder, not the name of a
    run folder's own file, in a folder that can be written (a temporary file is made there
    and removed). FieldError naming ``save_adversarial`` otherwise."""
    import os
    import tempfile

    from pagctl.checkpoint import RESERVED_NAMES
    from pagctl.errors import FieldError

    def refuse(detail: str) -> FieldError:
        return FieldError("save_adversarial", detail)

    if not isinstance(path, (str, Path)):
        raise refuse(f"expected a file path, got {type(path).__name__}")
    out = Path(path)
    if out.suffix != ".safetensors":
        raise refuse(f"{out}: writes safetensors; give a file name ending in .safetensors")
    if out.is_dir():
        raise refuse(f"{out} is a folder; give a file name")
    if out.name in RESERVED_NAMES:
        raise refuse(f"{out} is the name of a run folder's own file ({out.name}); writing it "
                     "would replace that run's; give another name")
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".pagctl-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise refuse(f"cannot write in {folder} ({exc.strerror or type(exc).__name__}); give "
                     "a path in a folder you can write") from None
    return out
