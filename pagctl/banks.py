"""Target-gradient banks: every training image's target for every class, computed once.

A bank is one safetensors file (see docs/banks.md):

- ``labels`` (N,) int64: the training labels, in training-set order;
- ``targets`` (N, num_classes, C, H, W) float16 or float32: ``targets[i, t]`` = g(x_i, t),
  the source's target for training image i and class t;
- metadata key ``pagctl_bank``: a JSON object with ``format`` (1), ``data_fingerprint``
  (the content hash of the training set it was made for), ``num_images``, ``num_classes``,
  ``input_shape``, ``dtype``, ``source`` and ``params`` (what computed it) and
  ``created_by`` (the pagctl version).

The ``precomputed`` source (`pagctl.target_gradients.precomputed`) serves it back by
training-set index. Size: N × num_classes × C·H·W × (2 bytes in float16, 4 in float32); for
CIFAR-10 50,000 × 10 × 3,072 × 2 B = 3.07 GB in float16 (6.1 GB in float32).

Writing is resumable and needs one chunk in memory, never the whole bank: chunks of
``chunk_size`` images are written as atomic safetensors files into ``<path>.parts/``; a rerun
with ``resume=True`` skips the chunks already there. The final file is then assembled by
streaming the chunks' bytes into a temporary file (the safetensors layout: an 8-byte
little-endian header length, a JSON header, the raw tensor bytes) and renamed into place,
so a reader never sees a partial bank. A bank's header is read without loading any tensor
data (`read_bank_metadata`, `bank_info`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pagctl.errors import CheckpointError, SpecError

if TYPE_CHECKING:
    import torch
    from torch.utils.data import Dataset

__all__ = ["BANK_FORMAT", "DTYPES", "METADATA_KEY", "BankInfo", "bank_info", "bank_nbytes",
           "read_bank_metadata", "write_bank"]

BANK_FORMAT = 1
METADATA_KEY = "pagctl_bank"
DTYPES = ("float16", "float32")
_ST_DTYPE = {"float16": "F16", "float32": "F32"}
_ITEMSIZE = {"float16": 2, "float32": 4}


@dataclass(frozen=True)
class BankInfo:
    """What a bank holds, read from its header (no tensor data is read)."""

    path: Path
    num_images: int
    num_classes: int
    input_shape: tuple[int, int, int]
    dtype: str
    data_fingerprint: str
    source: str
    params: dict[str, Any] = field(default_factory=dict)
    created_by: str = ""
    nbytes: int = 0
    """Size of the file in bytes."""

    def to_record(self) -> dict[str, Any]:
        """A JSON-ready dict (``kind: "bank"``)."""
        return {"kind": "bank", "path": str(self.path), "num_images": self.num_images,
                "num_classes": self.num_classes, "input_shape": list(self.input_shape),
                "dtype": self.dtype, "data_fingerprint": self.data_fingerprint,
                "source": self.source, "params": self.params, "created_by": self.created_by,
                "nbytes": self.nbytes}


def bank_nbytes(num_images: int, num_classes: int, input_shape: tuple[int, ...],
                dtype: str = "float16") -> int:
    """Bytes of a bank's ``targets`` tensor: N × num_classes × C·H·W × item size."""
    if dtype not in _ITEMSIZE:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return num_images * num_classes * math.prod(input_shape) * _ITEMSIZE[dtype]


# ---------------------------------------------------------------------------------------
# reading


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's JSON header and the byte position where its data start."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{path}: too short to be a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > 100 * 2**20:
            raise CheckpointError(f"{path}: not a safetensors file (header of {length} bytes)")
        raw = fh.read(length)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not an object)")
    return header, 8 + length


def read_bank_metadata(path: Path) -> dict[str, Any]:
    """The bank's ``pagctl_bank`` metadata, checked against the tensors' shapes.

    Raises ``CheckpointError`` for a missing, foreign or inconsistent file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such bank file; write one with 'pagctl bank'")
    header, _ = _read_header(path)
    raw = (header.get("__metadata__") or {}).get(METADATA_KEY)
    try:
        meta = json.loads(raw) if isinstance(raw, str) else None
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != BANK_FORMAT:
        raise CheckpointError(f"{path}: not a pagctl target-gradient bank (format "
                              f"{BANK_FORMAT}); write one with 'pagctl bank'")
    targets, labels = header.get("targets"), header.get("labels")
    n, k = int(meta["num_images"]), int(meta["num_classes"])
    shape = [n, k, *map(int, meta["input_shape"])]
    dtype = str(meta["dtype"])
    ok = (isinstance(targets, dict) and isinstance(labels, dict) and dtype in _ST_DTYPE
          and targets.get("shape") == shape and targets.get("dtype") == _ST_DTYPE[dtype]
          and labels.get("shape") == [n] and labels.get("dtype") == "I64")
    if not ok:
        raise CheckpointError(f"{path}: the bank's tensors do not match its metadata; the "
                              "file is damaged: write it again")
    return meta


def bank_info(path: Path | str) -> BankInfo:
    """Describe a bank from its header alone. Raises ``CheckpointError`` for a file that is
    missing or not a bank."""
    path = Path(path)
    meta = read_bank_metadata(path)
    return BankInfo(
        path=path, num_images=int(meta["num_images"]), num_classes=int(meta["num_classes"]),
        input_shape=tuple(int(v) for v in meta["input_shape"]),  # type: ignore[arg-type]
        dtype=str(meta["dtype"]), data_fingerprint=str(meta["data_fingerprint"]),
        source=str(meta.get("source", "")), params=dict(meta.get("params") or {}),
        created_by=str(meta.get("created_by", "")), nbytes=path.stat().st_size)


_COPY_BLOCK = 16 * 2**20  # bytes per read while streaming a chunk into the bank


# ---------------------------------------------------------------------------------------
# writing


def _same_bank(path: Path, key: dict[str, Any]) -> bool:
    """Whether the bank at ``path`` was written for ``key`` (the chunk size aside)."""
    try:
        meta = read_bank_metadata(path)
    except CheckpointError:
        return False
    return all(meta.get(k) == v for k, v in key.items() if k != "chunk_size")


def _parts_dir(path: Path) -> Path:
    return path.with_name(path.name + ".parts")


def _chunk_file(parts: Path, chunk: int) -> Path:
    return parts / f"chunk-{chunk:06d}.safetensors"


def _valid_chunk(path: Path, rows: int, row_shape: list[int], dtype: str) -> bool:
    """Whether a chunk file is complete and of the expected shape (a damaged or foreign one
    is recomputed)."""
    if not path.is_file():
        return False
    try:
        header, start = _read_header(path)
    except CheckpointError:
        return False
    targets, labels = header.get("targets"), header.get("labels")
    if not (isinstance(targets, dict) and isinstance(labels, dict)):
        return False
    if targets.get("shape") != [rows, *row_shape] or targets.get("dtype") != _ST_DTYPE[dtype]:
        return False
    if labels.get("shape") != [rows] or labels.get("dtype") != "I64":
        return False
    end = max(int(targets["data_offsets"][1]), int(labels["data_offsets"][1]))
    return path.stat().st_size == start + end


def _compute_chunk(source: Any, who: str, dataset: Dataset[Any], lo: int, hi: int, *,
                   num_classes: int, batch_size: int, dtype: torch.dtype,
                   device: torch.device, on_batch: Callable[[int], None]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets for training images [lo, hi) and every class, each call checked against the
    source contract (``who`` names the source). Shape: -> (hi − lo, num_classes, C, H, W)
    in ``dtype`` on the CPU, labels (hi − lo,) int64."""
    import torch

    from pagctl.data import iter_batches
    from pagctl.protocols import check_source_output

    parts, labels = [], []
    order = torch.arange(lo, hi, dtype=torch.int64)
    for idx, x, y in iter_batches(dataset, order, batch_size):
        classes = torch.arange(num_classes, dtype=torch.int64).expand(len(idx), -1)
        x, classes = x.to(device), classes.to(device).contiguous()
        with torch.no_grad():
            out = source(x, y.to(device), classes, index=idx.to(device))
        check_source_output(who, x, classes, out)
        stored = out.detach().to("cpu", dtype)
        if not bool(torch.isfinite(stored).all()):
            raise SpecError(f"bank: targets for images {int(idx[0])}..{int(idx[-1])} exceed "
                            "float16's range (65,504): use dtype float32")
        parts.append(stored)
        labels.append(y.to("cpu", torch.int64))
        on_batch(len(idx))
    return torch.cat(parts), torch.cat(labels)


def _bank_header(meta: dict[str, Any], n: int, num_classes: int, row_shape: list[int],
                 dtype: str) -> bytes:
    """The safetensors header (8-byte length + JSON, padded with spaces to a multiple of 8
    so that the data start aligned): labels first, then targets."""
    labels_bytes = n * 8
    targets_bytes = n * math.prod([num_classes, *row_shape]) * _ITEMSIZE[dtype]
    header = {
        "__metadata__": {METADATA_KEY: json.dumps(meta, sort_keys=True)},
        "labels": {"dtype": "I64", "shape": [n], "data_offsets": [0, labels_bytes]},
        "targets": {"dtype": _ST_DTYPE[dtype], "shape": [n, num_classes, *row_shape],
                    "data_offsets": [labels_bytes, labels_bytes + targets_bytes]},
    }
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(8 + len(text)) % 8)
    return struct.pack("<Q", len(text)) + text


def _copy_range(src: Path, start: int, length: int, out: Any) -> None:
    """Copy ``length`` bytes of ``src`` from ``start`` into the open file ``out``, in blocks."""
    with open(src, "rb") as fh:
        fh.seek(start)
        left = length
        while left > 0:
            block = fh.read(min(_COPY_BLOCK, left))
            if not block:
                raise CheckpointError(f"{src}: truncated chunk; delete it and resume")
            out.write(block)
            left -= len(block)


def _assemble(path: Path, chunks: list[Path], meta: dict[str, Any], n: int, num_classes: int,
              row_shape: list[int], dtype: str) -> None:
    """Stream the chunks into the bank file (atomically: a temporary file, then a rename)."""
    import torch
    from safetensors.torch import load_file

    from pagctl.checkpoint import atomic_path

    labels = torch.cat([load_file(str(c))["labels"] for c in chunks])
    with atomic_path(path) as tmp, open(tmp, "wb") as out:
        out.write(_bank_header(meta, n, num_classes, row_shape, dtype))
        out.write(labels.contiguous().numpy().tobytes())
        for chunk in chunks:
            header, start = _read_header(chunk)
            lo, hi = (int(v) for v in header["targets"]["data_offsets"])
            _copy_range(chunk, start + lo, hi - lo, out)
        out.flush()
        os.fsync(out.fileno())


def write_bank(
    source: Any,
    dataset: Dataset[Any],
    path: Path | str,
    *,
    num_classes: int,
    batch_size: int = 256,
    dtype: str = "float16",
    device: torch.device | str = "cpu",
    progress: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    chunk_size: int = 4096,
    source_name: str = "unknown",
    source_params: dict[str, Any] | None = None,
    data_fingerprint: str | None = None,
    on_chunk: Callable[[int, int], None] | None = None,
) -> BankInfo:
    """Call ``source`` on every image of ``dataset`` (the training set) with every class and
    write the bank to ``path``; returns its description.

    Each call gets ``classes`` = arange(num_classes) per image and ``index`` = the images'
    positions, as training does. ``chunk_size`` images are held in memory at a time: about
    chunk_size × num_classes × C·H·W × item size bytes.
    ``resume``: keep the chunks an interrupted run left in ``<path>.parts/`` (they must have
    been written for the same data, source, parameters, dtype and chunk size); otherwise that
    folder is cleared first. ``overwrite``: replace an existing bank file.
    ``source_name`` / ``source_params``: recorded in the metadata. ``data_fingerprint``: the
    dataset's content hash (computed when None). ``on_chunk(done, total)`` is called after
    each chunk is on disk. Progress with an ETA goes to stderr.

    Raises ``SpecError`` for bad arguments, ``PluginContractError`` for a source whose output
    breaks the contract, and ``CheckpointError`` for an existing bank (without
    ``overwrite``), a folder in its place, or parts written for something else.
    """
    import torch

    from pagctl import __version__
    from pagctl.checkpoint import atomic_save_tensors, atomic_write_text
    from pagctl.data import dataset_fingerprint, get_batch

    path = Path(path)
    if dtype not in DTYPES:
        raise SpecError(f"--dtype: must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if batch_size < 1 or chunk_size < 1:
        raise SpecError("bank: batch_size and chunk_size must be >= 1")
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise SpecError("bank: the training set is empty")
    first, _ = get_batch(dataset, torch.tensor([0]))
    row_shape = [num_classes, *map(int, first.shape[1:])]
    input_shape = [int(v) for v in first.shape[1:]]
    fingerprint = data_fingerprint or dataset_fingerprint(dataset)
    meta = {"format": BANK_FORMAT, "data_fingerprint": fingerprint, "num_images": n,
            "num_classes": num_classes, "input_shape": input_shape, "dtype": dtype,
            "source": source_name, "params": source_params or {},
            "created_by": f"pagctl {__version__}"}
    meta = json.loads(json.dumps(meta, default=str))  # params as they read back
    key = {k: v for k, v in meta.items() if k != "created_by"}
    key["chunk_size"] = chunk_size
    if path.exists() and not path.is_file():
        raise CheckpointError(f"{path}: is a folder, not a bank file; give --out a file name "
                              "ending in .safetensors")
    if path.exists() and resume and _same_bank(path, key):
        return bank_info(path)  # finished by an earlier run
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path}: already exists; pass --overwrite to replace it or "
                              "choose another --out")
    parts = _parts_dir(path)
    manifest = parts / "manifest.json"
    if parts.exists() and resume:
        try:
            found = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            found = None  # cannot tell what the chunks are: start over
        if isinstance(found, dict) and found != key:
            differ = sorted(k for k in set(key) | set(found) if found.get(k) != key.get(k))
            raise CheckpointError(
                f"{parts}: written for a different bank ({', '.join(differ)} differ); "
                "delete the folder or run without --resume to start over")
        if not isinstance(found, dict):
            shutil.rmtree(parts)
    elif parts.exists():
        shutil.rmtree(parts)
    try:
        parts.mkdir(parents=True, exist_ok=True)
        atomic_write_text(manifest, json.dumps(key, sort_keys=True, indent=2) + "\n")
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot write a bank there ({exc.strerror or exc}); "
                              "choose a writable --out") from None

    torch_dtype = torch.float16 if dtype == "float16" else torch.float32
    dev = torch.device(device)
    bounds = [(lo, min(lo + chunk_size, n)) for lo in range(0, n, chunk_size)]
    files = [_chunk_file(parts, i) for i in range(len(bounds))]
    done = [_valid_chunk(f, hi - lo, row_shape, dtype) for f, (lo, hi) in
            zip(files, bounds, strict=True)]
    from pagctl.progress import ProgressBar

    with ProgressBar("bank", n, enabled=progress) as bar:
        bar.update(advance=sum(hi - lo for (lo, hi), ok in zip(bounds, done, strict=True) if ok))
        for i, ((lo, hi), file) in enumerate(zip(bounds, files, strict=True)):
            if done[i]:
                continue
            targets, labels = _compute_chunk(
                source, f"target-gradient source '{source_name}'", dataset, lo, hi,
                num_classes=num_classes, batch_size=batch_size,
                dtype=torch_dtype, device=dev,
                on_batch=lambda images: bar.update(advance=images))
            atomic_save_tensors({"targets": targets, "labels": labels}, file)
            done[i] = True
            if on_chunk is not None:
                on_chunk(sum(done), len(bounds))
    _assemble(path, files, meta, n, num_classes, row_shape[1:], dtype)
    shutil.rmtree(parts, ignore_errors=True)
    return bank_info(path)
