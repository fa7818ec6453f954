"""Reading target-gradient banks: the file format's constants, `BankInfo`, and a bank's
header (`read_bank_metadata`, `bank_info`) read without loading any tensor data.

The format and how a bank is written: `pagctl.banks` (and docs/banks.md).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pagctl.errors import CheckpointError

__all__ = ["BANK_FORMAT", "DTYPES", "METADATA_KEY", "BankInfo", "bank_info", "bank_nbytes",
           "read_bank_metadata"]

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
