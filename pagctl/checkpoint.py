"""The run folder: weights, config, spec, metrics and resumable state, without pickle.

```
runs/<name>/
  model.safetensors   the weights (a classifier: the timm model's, without normalisation)
  model-best.safetensors  with a validation split: the weights of the best epoch by
                      validation robust accuracy (same config.json)
  config.json         how to rebuild them (a classifier: timm-compatible architecture,
                      num_classes, model_args, pretrained_cfg; a score model: its config)
  spec.json           the validated spec
  metrics.jsonl       append-only records (`pagctl.records`: train epochs, attacks, ...)
  state.safetensors   model + optimiser tensors + RNG states, for --resume
  state.json          epoch/step counters, optimiser hyper-parameters, running sums
```

Every file is written to a temporary name in the same folder and renamed into place, so a
killed process never leaves a half-written file. `RunFolder` is the life of a training run's
folder (refuse or resume, create, save state), shared by ``pagctl train`` and
``pagctl train-score``; `load_run` rebuilds a classifier run's model.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pagctl.errors import CheckpointError, FieldError, SpecError
from pagctl.trust import UNTRUSTED, CodeTrust

if TYPE_CHECKING:
    import torch
    from pydantic import BaseModel
    from torch import nn

    from pagctl.models import NormalizedModel
    from pagctl.records import Metrics, Record
    from pagctl.spec import RunSpec

_Model = TypeVar("_Model", bound="BaseModel")

MODEL_FILE = "model.safetensors"
BEST_MODEL_FILE = "model-best.safetensors"
WEIGHTS = {"last": MODEL_FILE, "best": BEST_MODEL_FILE}
"""Which weights of a classifier run (``--weights``): the last epoch's, or the best by
validation robust accuracy."""
CONFIG_FILE = "config.json"
SPEC_FILE = "spec.json"
METRICS_FILE = "metrics.jsonl"
STATE_FILE = "state.safetensors"
STATE_META_FILE = "state.json"
RUN_FILES = (MODEL_FILE, BEST_MODEL_FILE, CONFIG_FILE, SPEC_FILE, METRICS_FILE, STATE_FILE,
             STATE_META_FILE)
SHARDS_DIR = "shards"
"""Where a run's sharded evaluations keep their files (``--shard``)."""
LOCK_FILE = ".pagctl.lock"
"""`RunLock`'s file, present while the folder is in use (the lock is the kernel's)."""
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
"""Opening a run folder's file to write never follows a symbolic link: a folder from
elsewhere could point its metrics or lock file at any file of the user's."""


def confined(run_dir: Path, name: str) -> Path:
    """``run_dir / name``, refused (CheckpointError, one line) when it is a symbolic link
    that leads out of ``run_dir``: a run folder is self-contained, and a link to another
    run's weights or metrics would show that run's numbers as this one's."""
    path = run_dir / name
    if path.is_symlink():
        target = path.resolve()
        if not target.is_relative_to(run_dir.resolve()):
            raise CheckpointError(f"{path}: a symbolic link out of the run folder (to "
                                  f"{target}); a run folder holds its own files: copy the "
                                  "file in, or drop the link")
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary file beside ``path`` to write; renamed onto ``path`` when the block ends
    without an error, removed otherwise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes 0600, and some writers (safetensors) make their file anew: give it
        # the usual mode of a new file
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


ALIASES_KEY = "pagctl_aliases"
"""The metadata key of a safetensors file (`atomic_save_tensors`) that names the tensors
stored once for several names: a JSON object {alias: stored name}."""


def _view(tensor: torch.Tensor) -> tuple[Any, ...] | None:
    """What makes two tensors one view of the same memory: its device and storage address,
    offset, shape, strides and dtype; None for a tensor that holds no memory (empty, meta,
    sparse), which shares none."""
    import torch

    if tensor.is_meta or tensor.layout is not torch.strided:
        return None
    address = tensor.untyped_storage().data_ptr()
    if address == 0:
        return None
    return (tensor.device, address, tensor.storage_offset(), tuple(tensor.shape),
            tensor.stride(), tensor.dtype)


def atomic_save_tensors(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    """``tensors`` as the safetensors file ``path``, written atomically, with ``metadata``.

    safetensors refuses tensors that share memory, and a module with tied weights gives
    them (its state dict names the encoder's weight and the decoder's: one tensor). Names
    that are the same view of one memory (storage, offset, shape, strides, dtype) are
    stored once, under the first of them, and the others listed in the metadata under
    `ALIASES_KEY`; `load_tensors` gives each alias the stored tensor itself, so the round
    trip is exact and ``load_state_dict`` into the tied module copies the same values into
    its one parameter, which stays tied. Tensors that share memory as different views (a
    slice or a transpose of another) are copied apart (``clone``): safetensors has no place
    for the relation, and a reader needs the values. ValueError when ``metadata`` uses
    ALIASES_KEY itself.
    """
    from collections import Counter

    from safetensors.torch import save_file

    if metadata and ALIASES_KEY in metadata:
        raise ValueError(f"metadata key {ALIASES_KEY!r} is reserved for atomic_save_tensors")
    stored: dict[str, tuple[torch.Tensor, tuple[Any, ...] | None]] = {}
    aliases: dict[str, str] = {}
    first: dict[tuple[Any, ...], str] = {}  # each view's first name
    for name, tensor in tensors.items():
        view = _view(tensor)
        if view is not None and view in first:
            aliases[name] = first[view]
            continue
        if view is not None:
            first[view] = name
        stored[name] = (tensor.detach(), view)
    views_of = Counter(view[:2] for view in first)  # distinct views per memory
    out = {}
    for name, (tensor, view) in stored.items():
        if view is not None and views_of[view[:2]] > 1:
            tensor = tensor.clone()
        out[name] = tensor.contiguous().cpu()
    meta = dict(metadata or {})
    if aliases:
        meta[ALIASES_KEY] = json.dumps(aliases, sort_keys=True)
    with atomic_path(path) as tmp:
        save_file(out, str(tmp), metadata=meta or None)


SAFETENSORS_DTYPES = {"float32": "F32", "float64": "F64", "float16": "F16", "int64": "I64",
                      "int32": "I32", "uint8": "U8", "bool": "BOOL"}
"""safetensors' names of the dtypes `save_tensor_chunks` writes (its format's table)."""


def save_tensor_chunks(path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...],
                                                        Iterable[torch.Tensor]]],
                       metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written piece by piece, atomically: each entry is (name, dtype,
    shape, chunks), the chunks its rows in order (any sizes, together the whole tensor).
    Only one chunk is in memory at a time, so a file larger than memory can be written.
    The bytes are the format's own (an 8-byte little-endian header length, the JSON
    header padded with spaces to a multiple of 8, then each tensor's little-endian data in
    header order), readable by ``safetensors.safe_open``. ValueError when the chunks of an
    entry do not add up to its shape or dtype."""
    import math
    import struct

    import torch

    header: dict[str, Any] = {}
    offset = 0
    for name, dtype, shape, _ in entries:
        size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[str(dtype).removeprefix("torch.")],
                        "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = dict(metadata)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        handle.write(struct.pack("<Q", len(text)))
        handle.write(text)
        for name, dtype, shape, chunks in entries:
            rows = 0
            for chunk in chunks:
                if chunk.dtype != dtype or tuple(chunk.shape[1:]) != tuple(shape[1:]):
                    raise ValueError(f"{name}: a chunk of {chunk.dtype} {tuple(chunk.shape)} "
                                     f"does not fit {dtype} {shape}")
                handle.write(chunk.detach().cpu().contiguous().numpy().tobytes())
                rows += int(chunk.shape[0])
            if rows != (shape[0] if shape else 1):
                raise ValueError(f"{name}: the chunks hold {rows} rows, not {shape[0]}")


def load_tensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file, each alias `atomic_save_tensors` listed given the tensor it
    names (the same object). CheckpointError (one line) for a missing, truncated or foreign
    file, and for aliases that name no tensor of the file (damaged metadata)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise CheckpointError(f"{path}: file is missing; is this a pagctl run folder?")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as fh:
            meta = fh.metadata() or {}
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({str(exc).splitlines()[0]}); the file "
            "is truncated or foreign; re-run training or restore the file"
        ) from None
    text = meta.get(ALIASES_KEY)
    if text is None:
        return tensors
    damaged = "the file is damaged; re-run training or restore the file"
    try:
        aliases: Any = json.loads(text)
    except ValueError:
        aliases = None
    if not isinstance(aliases, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise CheckpointError(f"{path}: metadata '{ALIASES_KEY}' is not a JSON object of "
                              f"tensor names; {damaged}")
    names = set(tensors)
    for alias, name in aliases.items():
        if name not in names:
            raise CheckpointError(f"{path}: metadata '{ALIASES_KEY}' makes '{alias}' the "
                                  f"tensor '{name}', which the file does not hold; {damaged}")
        if alias in names:
            raise CheckpointError(f"{path}: metadata '{ALIASES_KEY}' makes '{alias}' the "
                                  f"tensor '{name}', but the file holds its own '{alias}'; "
                                  f"{damaged}")
        tensors[alias] = tensors[name]
    return tensors


@functools.cache
def _storable(dtype: torch.dtype) -> bool:
    """Whether safetensors stores ``dtype``: asked of the installed safetensors itself (one
    element saved to bytes), so the answer follows its version, not a list kept here."""
    import warnings

    import torch
    from safetensors.torch import save

    try:
        with warnings.catch_warnings():  # torch warns about experimental dtypes it makes
            warnings.simplefilter("ignore")
            save({"x": torch.zeros(1, dtype=dtype)})
    except Exception:  # a KeyError for an unknown dtype, NotImplementedError, ...
        return False
    return True


def check_saveable(state: Mapping[str, Any], where: str) -> None:
    """ModelError, one line naming ``where``, the first entry of ``state`` (a state dict)
    that `atomic_save_tensors` could not store, and the fix: a value that is not a tensor
    (a module's extra state), a tensor on the meta device, a sparse one, or a dtype that
    safetensors has no code for (complex128, quantised, ...). Tied weights are fine
    (stored once). No tensor's values are read, so the check is cheap: commands run it
    before they start a run folder, so a model they could never save is refused at once,
    not at its first save with the folder begun (or after a training epoch)."""
    import torch

    from pagctl.errors import ModelError

    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            problem = f"is a {type(value).__name__}, not a tensor"
            fix = "keep only tensors in the module's state (see get_extra_state)"
        elif value.is_meta:
            problem = "is on the meta device (it holds no values)"
            fix = "materialise it in the factory (to_empty(), then initialise or load it)"
        elif value.layout is not torch.strided:
            problem = f"is a sparse tensor ({value.layout})"
            fix = "make it dense in the module (.to_dense()), or register it as a buffer " \
                "with persistent=False"
        elif not _storable(value.dtype):
            problem = f"has dtype {value.dtype}"
            fix = "convert it in the module to a dtype safetensors stores (e.g. float32, " \
                "int64, complex64), or register it as a buffer with persistent=False"
        else:
            continue
        raise ModelError(f"{where}: '{key}' {problem}, which safetensors (the format of a "
                         f"run folder's weights) cannot store; {fix}")


def spec_hash(spec: BaseModel) -> str:
    """A short digest of a validated spec, recorded with the weights and the state, so that
    files of different runs are told apart. ``out_dir`` is left out: the folder a run lives
    in (or was resumed from by another path) is not part of what the run is."""
    if "out_dir" in type(spec).model_fields:
        spec = spec.model_copy(update={"out_dir": None})
    return hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:16]


def accepted_spec_hashes(spec: BaseModel) -> set[str]:
    """The digests files written for ``spec`` may carry: `spec_hash`; the earlier form that
    also covered ``out_dir``; and both as each earlier version wrote the spec, before the
    fields of later `pagctl.spec.SPEC_GENERATIONS` existed (`pagctl.spec.earlier_forms`)."""
    from pagctl.spec import earlier_forms

    def digest(data: Any) -> str:
        text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    legacy = hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:16]
    hashes = {spec_hash(spec), legacy}
    for earlier in earlier_forms(spec):
        hashes.add(digest(earlier))
        if "out_dir" in earlier:
            hashes.add(digest({**earlier, "out_dir": None}))
    return hashes


def load_error_detail(exc: BaseException) -> str:
    """The informative line of a ``load_state_dict`` failure (its first line is a heading)."""
    cause = exc.__cause__ if isinstance(exc.__cause__, RuntimeError) else exc
    lines = [ln.strip() for ln in str(cause).splitlines() if ln.strip()]
    detail = next((ln for ln in lines if not ln.startswith("Error(s) in loading")),
                  lines[0] if lines else type(cause).__name__)
    return detail if len(detail) <= 200 else detail[:197] + "..."


# ---------------------------------------------------------------------------------------
# the spec in a run folder


def write_spec(run_dir: Path, spec: BaseModel) -> None:
    """spec.json: the validated spec, as JSON."""
    atomic_write_text(run_dir / SPEC_FILE, spec.model_dump_json(indent=2) + "\n")


def read_run_spec(run_dir: Path, model: type[_Model], *, folder: str = "pagctl run",
                  what: str = "spec") -> _Model:
    """``run_dir/spec.json`` validated as ``model``; CheckpointError, one line naming the
    file and the first problem, when it is missing ("not a ``folder`` folder"), unreadable
    or not a valid ``what``."""
    from pydantic import ValidationError

    from pagctl.spec import format_validation_error

    path = confined(run_dir, SPEC_FILE)
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: no {SPEC_FILE}; not a {folder} folder")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from None
    try:
        return model.model_validate_json(text)
    except ValidationError as exc:
        first = format_validation_error(exc).splitlines()[0]
        raise CheckpointError(f"{path}: invalid {what} ({first})") from None


def read_spec(run_dir: Path) -> RunSpec:
    """A classifier run's validated spec.json."""
    from pagctl.spec import RunSpec

    return read_run_spec(run_dir, RunSpec)


# ---------------------------------------------------------------------------------------
# one run per folder: the lock


NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL)
"""What ``flock`` fails with where the file system has none (some network file systems)."""


def try_flock(fd: int, mode: int, *, tries: int = 1) -> bool | None:
    """``flock(fd, mode)`` without blocking, tried ``tries`` times 50 ms apart: True when
    taken (or converted), False when others hold it, None where there is no ``flock``."""
    import fcntl
    import time

    for attempt in range(tries):
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno in NO_FLOCK:
                return None
        if attempt + 1 < tries:
            time.sleep(0.05)
    return False


def holder_text(data: bytes) -> str:
    """A lock file's holder (``{"pid", "host", "command", "since"}``, as `FolderLock`
    writes it) in words."""
    holder: Any = None
    with suppress(ValueError):
        holder = json.loads(data.decode("utf-8", "replace") or "null")
    if not isinstance(holder, dict) or "pid" not in holder:
        return "another pagctl command"
    return (f"pid {holder.get('pid')} on {holder.get('host')} ('pagctl "
            f"{holder.get('command')}' since {holder.get('since')})")


class FolderLock:
    """``flock`` on a file in a folder, the mechanics every pagctl lock shares (`RunLock`
    on a run folder, `pagctl.grid.GridLock` on a grid's root); subclasses say which mode
    they hold and what a busy lock means.

    The kernel releases the lock when its holder exits, however it exits, so a lock left by
    a killed process is stale by construction and taken over without a word. The lock file
    is opened without following a symbolic link (a folder from elsewhere could point it at
    any file of the user's, which the holder line would overwrite), and is the one at the
    path once locked (a holder that released it meanwhile may have removed it). The last
    holder removes the file, so it exists only while the folder is in use. Where the
    platform or the file system has no ``flock`` (not POSIX, some network file systems), or
    the folder cannot be written, no lock is taken. ``create``: make the folder (and its
    missing parents) when it does not exist; `release` removes them again when nothing was
    written into them.
    """

    def __init__(self, folder: Path, name: str, *, command: str, create: bool) -> None:
        self.folder = folder
        self.path = folder / name
        self.command = command
        self.create = create
        self._fd: int | None = None
        self._created: list[Path] = []  # folders this lock made, outermost first

    def _hold(self, take: Callable[[int], bool | None]) -> int | None:
        """Open the lock file and ``take(fd)`` it (True: taken as wanted; None: no lock
        can be taken here; the callable raises when others hold it), until the file locked
        is the one at the path. The open descriptor, or None when nothing is locked."""
        if self.create:
            self._make_folder()
        for _ in range(100):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o666)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise CheckpointError(f"{self.path}: is a symbolic link; pagctl never "
                                          "writes through one (it could point at any file): "
                                          "remove the link") from None
                return None  # a read-only folder: nothing can be written into it
            if os.fstat(fd).st_nlink > 1:
                os.close(fd)
                raise CheckpointError(f"{self.path}: is a hard link shared with another file; "
                                      "pagctl writes who holds the lock into it: remove it")
            try:
                taken = take(fd)
            except BaseException:
                os.close(fd)
                raise
            if taken is None:
                os.close(fd)
                return None
            if self._same_file(fd):
                self._fd = fd
                return fd
            os.close(fd)  # removed by a holder that released it meanwhile: try again
        raise CheckpointError(  # pragma: no cover - a path replaced a hundred times in a row
            f"{self.path}: keeps changing; is another tool removing it?")

    def _make_folder(self) -> None:
        missing = []
        folder = self.folder
        while not folder.exists() and folder != folder.parent:
            missing.append(folder)
            folder = folder.parent
        for folder in reversed(missing):
            try:
                folder.mkdir()
                self._created.append(folder)
            except FileExistsError:
                pass  # made meanwhile by another process: the lock decides

    def _same_file(self, fd: int) -> bool:
        try:
            return os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _write_holder(self, fd: int, **extra: str) -> None:
        """Who holds the lock, for the message another command gets (`holder_text`)."""
        import platform
        import time

        holder = {**extra, "pid": os.getpid(), "host": platform.node(),
                  "command": self.command, "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)

    def release(self) -> None:
        """Unlock. The last holder removes the lock file (and the folders this lock made,
        when nothing else was written into them)."""
        if self._fd is None:
            return
        import fcntl

        if try_flock(self._fd, fcntl.LOCK_EX):  # no one else holds it: the file is ours
            self.path.unlink(missing_ok=True)  # acquirers check the inode they locked
            if self._created and not any(self.folder.iterdir()):
                for folder in reversed(self._created):
                    with suppress(OSError):  # not empty any more: someone else's now
                        folder.rmdir()
        os.close(self._fd)  # closing the descriptor releases the lock
        self._fd = None

    def acquire(self) -> FolderLock:
        raise NotImplementedError

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class RunLock(FolderLock):
    """An advisory lock on a run folder (`FolderLock` on ``<run>/.pagctl.lock``): exclusive
    for what trains into it (``pagctl train``, ``train-score``, ``--resume``), shared for
    what reads its weights and appends records (``pagctl attack``, ``align-score``), so a
    folder is never trained twice at once nor evaluated while its weights change. A lock
    held by a live process is refused with one line naming the holder (its pid, host,
    command and start, which an exclusive holder writes in the file). ``create``: make the
    folder when it does not exist (an exclusive lock taken before anything else is written
    there).
    """

    def __init__(self, run_dir: Path, *, exclusive: bool, command: str,
                 create: bool = False) -> None:
        super().__init__(run_dir, LOCK_FILE, command=command, create=create)
        self.run_dir = run_dir
        self.exclusive = exclusive

    def acquire(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self
        mode = fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH

        def take(fd: int) -> bool | None:
            taken = try_flock(fd, mode)
            if taken is False:
                raise CheckpointError(self._busy(os.pread(fd, 4096, 0)))
            return taken

        fd = self._hold(take)
        if fd is not None and self.exclusive:
            self._write_holder(fd)
        return self

    def _busy(self, data: bytes) -> str:
        who = holder_text(data)
        if self.exclusive:
            return (f"{self.run_dir}: in use by {who}; a run folder holds one run: wait for "
                    "it to end, or choose another --out")
        return (f"{self.run_dir}: being trained by {who}; its weights are changing: evaluate "
                "it when training ends")

    def __enter__(self) -> RunLock:
        return self.acquire()


def run_folder_holder(run_dir: Path) -> str | None:
    """Who trains the run folder now, in words (its `RunLock` holder), or None when no one
    holds it exclusively (a grid asks it of a point whose run was refused: is another job
    of the grid training it?)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no locks
        return None
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDONLY | _NOFOLLOW)
    except OSError:
        return None
    try:
        if try_flock(fd, fcntl.LOCK_SH) is not False:  # free, or shared by readers only
            return None
        return holder_text(os.pread(fd, 4096, 0))
    finally:
        os.close(fd)  # (a shared lock taken above ends with it)


# ---------------------------------------------------------------------------------------
# the life of a training run's folder (resumable state: tensors in safetensors, no pickle)


@dataclass
class SavedState:
    """What ``--resume`` continues from (`RunFolder.start`): the tensors of
    state.safetensors by name (``model.*``, ``optim.*``, ``rng.*``, ...) and the counters."""

    tensors: dict[str, torch.Tensor]
    counters: dict[str, Any]

    def module_state(self, prefix: str) -> dict[str, torch.Tensor]:
        """The state dict saved for the module under ``prefix`` (e.g. "model")."""
        cut = len(prefix) + 1
        return {k[cut:]: v for k, v in self.tensors.items() if k.startswith(prefix + ".")}

    def restore_optimizer(self, opt: torch.optim.Optimizer, device: torch.device) -> None:
        """Load the saved optimiser state (its tensors moved to ``device``)."""
        state: dict[int, dict[str, Any]] = {}
        for key, val in self.tensors.items():
            if key.startswith("optim."):
                _, idx, name = key.split(".", 2)
                state.setdefault(int(idx), {})[name] = val.to(device)
        meta = self.counters["optimizer"]
        for idx, vals in meta["scalars"].items():
            state.setdefault(int(idx), {}).update(vals)
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


STATE_KEY = "pagctl_state"
"""The metadata key of state.safetensors that holds the counters."""


def read_state_counters(run_dir: Path) -> dict[str, Any]:
    """The counters in ``run_dir``'s state.safetensors metadata (no tensor is read);
    CheckpointError for a file that is not a readable pagctl training state."""
    from safetensors import SafetensorError, safe_open

    path = run_dir / STATE_FILE
    try:
        with safe_open(str(path), framework="pt") as fh:
            text = (fh.metadata() or {}).get(STATE_KEY)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file "
                              f"({str(exc).splitlines()[0]}); the file is truncated or "
                              "foreign; start again with --overwrite") from None
    counters = json.loads(text) if text is not None else None
    if not isinstance(counters, dict):
        raise CheckpointError(f"{path}: not a pagctl training state; start again with "
                              "--overwrite")
    return counters


def read_saved_state(run_dir: Path) -> SavedState:
    """``run_dir``'s saved state as `RunFolder.start` gives it when resuming, read without
    the folder's checks or lock: for the other ranks of a data-parallel run, once rank 0
    (which holds the lock) has checked it."""
    return SavedState(load_tensors(run_dir / STATE_FILE), read_state_counters(run_dir))


class RunFolder:
    """The life of a training run's folder, the same for ``pagctl train`` and
    ``pagctl train-score``:

    1. ``RunFolder(spec, ...)`` checks before anything is built or written: an existing
       folder is refused unless resuming or overwriting, and a resumed folder must hold a
       saved state of the run its spec.json describes, and the same spec (``out_dir``
       aside);
    2. ``with folder:`` holds the folder's exclusive `RunLock` for the whole run (a second
       process training into it is refused) and checks again under it;
    3. `start` (after the data, model and plugins are built): resuming, the saved state;
       otherwise a fresh folder (the files of a replaced run removed) with spec.json;
    4. `save_state` after a stop or an epoch; `trim_metrics` on resume drops the records
       written after the saved state.

    ``command`` names the command in messages; ``folder`` / ``what`` name the folder and
    its spec (`read_run_spec`); ``files``: what a replaced run's folder holds besides the
    usual files.
    """

    def __init__(self, spec: Any, *, command: str, resume: bool, overwrite: bool,
                 folder: str = "pagctl run", what: str = "spec",
                 files: tuple[str, ...] = ()) -> None:
        self.path: Path = spec.run_dir
        self.spec = spec
        self.command = command
        self.resume = resume
        self.overwrite = overwrite
        self.folder, self.what = folder, what
        self.files = (*RUN_FILES, *files)
        if resume and overwrite:
            raise SpecError("--resume and --overwrite exclude each other; pick one")
        self._counters: dict[str, Any] | None = None
        self._lock = RunLock(self.path, exclusive=True, command=command, create=not resume)
        self._check()

    def _check(self) -> None:
        """Refuse what cannot be trained into (again under the lock, in `__enter__`)."""
        run_dir = self.path
        if self.resume:
            if not (run_dir / STATE_FILE).is_file():
                if not (run_dir / SPEC_FILE).is_file():
                    raise CheckpointError(f"{run_dir}: nothing to resume (no run folder "
                                          "here); start it without --resume")
                raise CheckpointError(
                    f"{run_dir}: nothing to resume (no {STATE_FILE}: the run stopped before "
                    "saving any state); start it again with --overwrite")
            saved = read_run_spec(run_dir, type(self.spec), folder=self.folder, what=self.what)
            # out_dir may differ (a folder resumed by path, or moved); the folder is what counts
            no_dir = {"out_dir": None}
            if saved.model_copy(update=no_dir) != self.spec.model_copy(update=no_dir):
                raise SpecError(f"--resume: the spec differs from {run_dir}/{SPEC_FILE}; "
                                f"resume with 'pagctl {self.command} {run_dir} --resume' or "
                                "use --overwrite")
            self._counters = read_state_counters(self.path)
            found = self._counters.get("spec_hash")
            if found not in accepted_spec_hashes(saved):
                raise CheckpointError(
                    f"{run_dir / STATE_FILE} was saved by another run than {run_dir / SPEC_FILE}"
                    f" describes (spec hash {found} vs {spec_hash(saved)}): the files come "
                    "from different runs; restore them or start again with --overwrite")
            return
        if run_dir.exists() and not run_dir.is_dir():
            raise CheckpointError(f"{run_dir}: exists and is not a folder; choose another "
                                  "out_dir")
        held = {p.name for p in run_dir.iterdir()} - {LOCK_FILE} if run_dir.is_dir() else set()
        if held and not self.overwrite:
            if STATE_FILE in held:
                raise CheckpointError(f"{run_dir}: run folder already exists; pass --resume "
                                      "to continue it, --overwrite to replace it, or set "
                                      "out_dir")
            raise CheckpointError(f"{run_dir}: folder already exists and holds no saved state "
                                  "to resume; pass --overwrite to replace it, or set out_dir")

    def __enter__(self) -> RunFolder:
        """Take the folder's exclusive lock (creating the folder for a new run) and check it
        again under the lock: held for the whole run, released however the run ends."""
        self._lock.acquire()
        try:
            self._check()
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def start(self) -> SavedState | None:
        """The saved state when resuming; otherwise create the folder and write spec.json."""
        if self.resume:
            assert self._counters is not None
            return SavedState(load_tensors(self.path / STATE_FILE), self._counters)
        if self.overwrite and self.path.is_dir():
            for name in self.files:
                (self.path / name).unlink(missing_ok=True)
        self.path.mkdir(parents=True, exist_ok=True)
        write_spec(self.path, self.spec)
        return None

    def save_state(self, modules: dict[str, nn.Module], opt: torch.optim.Optimizer,
                   rng: dict[str, torch.Tensor], counters: dict[str, Any]) -> None:
        """state.safetensors, in one atomic write: each module's state under its prefix
        (``model.*``, ...), the optimiser (``optim.*``), the RNG states (``rng.*``) and, in
        its metadata, the counters with the spec's hash and the optimiser's hyper-parameters
        (so tensors and counters can never come from different saves). state.json is a
        readable copy of the metadata."""
        import torch

        tensors = {f"{prefix}.{k}": v for prefix, module in modules.items()
                   for k, v in module.state_dict().items()}
        sd = opt.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for idx, st in sd["state"].items():
            for key, val in st.items():
                if isinstance(val, torch.Tensor):
                    tensors[f"optim.{idx}.{key}"] = val
                else:
                    scalars.setdefault(str(idx), {})[key] = val
        tensors.update({f"rng.{k}": v for k, v in rng.items()})
        meta = {**counters, "spec_hash": spec_hash(self.spec),
                "optimizer": {"param_groups": sd["param_groups"], "scalars": scalars}}
        full = json.dumps(meta, indent=2)
        atomic_save_tensors(tensors, self.path / STATE_FILE, {STATE_KEY: full})
        atomic_write_text(self.path / STATE_META_FILE, full + "\n")

    def trim_metrics(self, keep: Callable[[dict[str, Any]], bool]) -> None:
        """Rewrite metrics.jsonl without the records for which ``keep`` is False (a resumed
        run writes the records after its saved state again) and without damaged lines
        (an intact record after one is kept).

        ``keep`` sees each line's JSON object (`pagctl.records.json_object`), not its
        record: a rewrite must keep what this version cannot validate (a newer kind, a
        field it would refuse) as it is, since dropping it would destroy data that is not
        the resumed run's to drop."""
        from pagctl.records import json_object, split_lines

        data = _metrics_bytes(self.path)
        if data is not None:
            objects = (json_object(raw) for _, raw in split_lines(data))
            kept = [json.dumps(obj, sort_keys=True) + "\n" for obj in objects
                    if isinstance(obj, dict) and keep(obj)]
            atomic_write_text(self.path / METRICS_FILE, "".join(kept))


# ---------------------------------------------------------------------------------------
# weights


def save_weights(run_dir: Path, tensors: dict[str, torch.Tensor], config: str,
                 metadata: dict[str, str], *, file: str = MODEL_FILE) -> None:
    """``file`` (model.safetensors; with ``metadata`` and the library versions) and
    config.json."""
    import torch

    from pagctl import __version__

    meta = {"format": "pt", "pagctl_version": __version__, "torch_version": torch.__version__,
            **metadata}
    atomic_save_tensors(tensors, run_dir / file, meta)
    atomic_write_text(run_dir / CONFIG_FILE, config)


def save_model(run_dir: Path, model: NormalizedModel, config: dict[str, Any],
               spec: RunSpec, *, test_sha256: str, file: str = MODEL_FILE) -> None:
    """A classifier's weights (without the normalisation) as ``file`` and its timm config.
    ``test_sha256``: the digest of the test images and labels the run is measured on
    (`pagctl.data.subset_digest` of the whole test split), kept in the weights' metadata so
    that an evaluation given other data (another ``--data-dir``) is refused
    (`pagctl.provenance.check_test_images`)."""
    import timm

    save_weights(run_dir, dict(model.net.state_dict()), json.dumps(config, indent=2) + "\n",
                 {"timm_version": timm.__version__, "spec_hash": spec_hash(spec),
                  "architecture": str(config["architecture"]), TEST_DIGEST_KEY: test_sha256},
                 file=file)


TEST_DIGEST_KEY = "test_sha256"
"""The weights' metadata key that names the run's test images (`save_model`)."""


@dataclass
class LoadedRun:
    """A classifier run's spec, config and model; ``warnings`` says what looked wrong
    without stopping the load (weights saved by another run than spec.json describes)."""

    run_dir: Path
    spec: RunSpec
    config: dict[str, Any]
    model: NormalizedModel
    warnings: list[str] = field(default_factory=list)
    weights: str = "last"


def load_run(run_dir: Path, device: str | torch.device = "cpu", *,
             weights: str = "last", trust: CodeTrust = UNTRUSTED) -> LoadedRun:
    """Rebuild a run's model from config.json + model.safetensors (eval mode), or with
    ``weights="best"`` from model-best.safetensors (`WEIGHTS`). An architecture named
    ``package.module:factory`` is imported only when ``trust`` allows it (`pagctl.trust`:
    a run folder is data; by default nothing it names is run).

    The global RNG is left as it was (building the network draws initial weights that the
    saved ones then replace)."""
    import torch

    from pagctl.models import rebuild_from_config

    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run folder; train one with 'pagctl train'")
    if weights not in WEIGHTS:
        raise FieldError("weights", f"{weights!r} is not one of {', '.join(WEIGHTS)}")
    model_file = WEIGHTS[weights]
    spec = read_spec(run_dir)
    cfg_path = confined(run_dir, CONFIG_FILE)
    if weights == "best" and not (run_dir / model_file).is_file():
        raise CheckpointError(
            f"{run_dir}: no {model_file}: the best model is kept only for runs with a "
            "validation split (data.validation_size) once it has been evaluated; use "
            "--weights last")
    if not (run_dir / model_file).is_file():
        raise CheckpointError(f"{run_dir}: no {model_file} (training has not finished an "
                              "epoch); train or resume it first")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # not UTF-8, not JSON
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
        raise CheckpointError(f"{cfg_path}: unreadable ({first}); restore config.json") \
            from None
    arch = config.get("architecture") if isinstance(config, dict) else None
    if arch != spec.model.arch:
        raise CheckpointError(f"{cfg_path}: architecture {arch!r} but spec.json says "
                              f"{spec.model.arch!r}; the files come from different runs; "
                              "restore config.json")
    state = load_tensors(confined(run_dir, model_file))
    try:
        with torch.random.fork_rng(devices=[]):
            model = rebuild_from_config(config, state, trust=trust,
                                        folder=str(run_dir))
    except (CheckpointError, RuntimeError, KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, CheckpointError) and not isinstance(exc.__cause__, RuntimeError):
            raise  # a malformed config.json, already explained
        raise CheckpointError(
            f"{run_dir / model_file}: weights do not match config.json/spec "
            f"({load_error_detail(exc)}); the files come from different runs; restore them "
            "or re-run training"
        ) from None
    model.to(device).eval()
    found = weights_metadata(run_dir / model_file).get("spec_hash")
    warnings = []
    if found is not None and found not in accepted_spec_hashes(spec):
        warnings.append(f"warning: {run_dir / model_file} was saved by another run than "
                        f"{run_dir / SPEC_FILE} describes (spec hash {found} vs "
                        f"{spec_hash(spec)}); results on it belong to that other run")
    return LoadedRun(run_dir, spec, config, model, warnings, weights)


def weights_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's metadata (no tensor is read); empty when unreadable."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError):
        return {}


# ---------------------------------------------------------------------------------------
# metrics


@contextmanager
def _locked(fd: int) -> Iterator[None]:
    """An exclusive advisory lock on an open file for the block (none where the platform
    has no ``fcntl``)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _linked_metrics(path: Path) -> CheckpointError:
    return CheckpointError(f"{path}: is a symbolic link; pagctl never appends through one (it "
                           "could point at any file, another run's metrics too): replace it "
                           "with the file itself")


def _shared_metrics(path: Path) -> CheckpointError:
    return CheckpointError(f"{path}: is a hard link shared with another file; pagctl never "
                           "appends to one (the record would land in the other file too, "
                           "another run's metrics perhaps): copy the file instead of linking")


def check_appendable(run_dir: Path) -> None:
    """Before an evaluation whose record `append_record` will append: CheckpointError when
    metrics.jsonl is a symbolic link or a hard link shared with another file, refused now
    rather than after the work."""
    path = run_dir / METRICS_FILE
    if path.is_symlink():
        raise _linked_metrics(path)
    if path.is_file() and path.stat().st_nlink > 1:
        raise _shared_metrics(path)


RESERVED_NAMES = (*RUN_FILES, LOCK_FILE)
"""File names an output option never takes: a run folder's own files."""


def check_output(option: str, path: Path | None) -> None:
    """An option that writes a file (``--save-adversarial``, ``--state``, ``--plot``, ...)
    never names a run folder's own file (model.safetensors, spec.json, metrics.jsonl, ...):
    SpecError naming the option, before any work."""
    if path is not None and path.name in RESERVED_NAMES:
        raise SpecError(f"{option}: {path} is the name of a run folder's own file "
                        f"({path.name}); writing it would replace that run's; give another "
                        "name")


def append_record(run_dir: Path, record: Record) -> None:
    """Append one record to metrics.jsonl as one whole line, or nothing.

    The line goes out in one write on an append descriptor, under an exclusive lock of the
    file (concurrent appenders never interleave), after a newline when the file does not end
    in one (a damaged last line never swallows the record), then fsync. When the write
    fails (a full disk, a file-size limit) the file is cut back to its size before it, so no
    partial line is left. CheckpointError (one line) when the record holds a number that is
    not finite (the model's outputs are not), or when the file cannot be written.
    """
    from pagctl.records import non_finite

    path = run_dir / METRICS_FILE
    data = record.to_json()
    bad = non_finite(data)
    if bad is not None:
        raise CheckpointError(
            f"{path}: not recorded: {data.get('kind', 'the')} field '{bad}' is NaN or "
            "infinite, so the model's outputs are not finite numbers; check its weights")
    line = (json.dumps(data, sort_keys=True) + "\n").encode("utf-8")
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | _NOFOLLOW, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _linked_metrics(path) from None
        raise CheckpointError(f"{path}: cannot append the record ({exc.strerror or exc}); "
                              "make the run folder writable") from None
    try:
        if os.fstat(fd).st_nlink > 1:
            raise _shared_metrics(path)
        with _locked(fd):
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line
            try:
                if os.write(fd, line) != len(line):
                    raise OSError(errno.ENOSPC, "short write")
                os.fsync(fd)
            except BaseException:
                os.ftruncate(fd, size)
                raise
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot append the record ({exc.strerror or exc}); "
                              "nothing was written: free space or fix the folder") from None
    finally:
        os.close(fd)


def read_metrics(run_dir: Path) -> Metrics:
    """The records of ``run_dir``'s metrics.jsonl, as the models of `pagctl.records`, with
    their line numbers, and a warning per line skipped (`pagctl.records.parse_metrics`
    decides: a damaged or self-contradicting line is skipped with a warning, one of a kind
    this version does not know is passed over in silence, an intact record after a damaged
    part of its line is kept). No file: no records. The one reader of the file: compare
    and the study read through it too (`pagctl.compare.records.read_records`).

    The lines are read, not trusted, so nothing in them raises; the file itself does:
    CheckpointError when it is a symbolic link out of the folder (`confined`: another
    run's numbers would pass for this one's) or cannot be read. A reader that must go on
    without it (compare) turns that into its warning."""
    from pagctl.records import Metrics, parse_metrics

    data = _metrics_bytes(run_dir)
    return parse_metrics(data, run_dir / METRICS_FILE) if data is not None else Metrics()


def _metrics_bytes(run_dir: Path) -> bytes | None:
    """The bytes of ``run_dir``'s metrics.jsonl, None without one; CheckpointError when it
    links out of the folder or cannot be read."""
    path = confined(run_dir, METRICS_FILE)
    if not path.is_file():
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: unreadable ({exc.strerror or exc})") from None


# ---------------------------------------------------------------------------------------
# evaluation files: tensors whose metadata carries a digest of the whole payload


PAYLOAD_KEY = "payload_sha256"
"""The field of a checked file's metadata that holds the digest of its tensors and the rest
of its metadata (`save_checked`)."""


def _payload_digest(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> str:
    from pagctl.stats import tensors_digest

    body = {k: v for k, v in meta.items() if k != PAYLOAD_KEY}
    digest = hashlib.sha256(tensors_digest(sorted(tensors.items())).encode())
    digest.update(json.dumps(body, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def save_checked(path: Path, tensors: dict[str, torch.Tensor], key: str,
                 meta: dict[str, Any]) -> None:
    """Write ``tensors`` to ``path`` (atomically) with ``meta`` as JSON under the metadata
    ``key``, and in it the digest of the tensors and the metadata together (`PAYLOAD_KEY`),
    so that `load_checked` tells a damaged or edited file from the one written. Used by the
    resumable evaluation files: ``--state`` files and shards."""
    written = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    full = {**meta, PAYLOAD_KEY: _payload_digest(written, meta)}
    atomic_save_tensors(written, path, {key: json.dumps(full)})


def load_checked(path: Path, key: str, what: str, *, version: int,
                 expected: dict[str, Any], names: Mapping[str, str] | None = None,
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and metadata `save_checked` wrote to ``path`` under ``key``, for the
    evaluation ``expected`` names (its key) at format ``version``. One-line errors naming
    the file: CheckpointError when it is not such a file (``what`` names the kind), its
    metadata is not JSON, or its contents do not match the digest written with them (a
    damaged file, or one edited by hand); SpecError when it was written by another version
    or for another evaluation (naming what differs, in ``names``' words where given)."""
    from safetensors import SafetensorError, safe_open

    tensors = load_tensors(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(key)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable ({str(exc).splitlines()[0]}); delete it "
                              "and run again") from None
    if raw is None:
        raise CheckpointError(f"{path}: not a pagctl {what}; pass another path or delete it")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):
        meta = None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: its {what} metadata is damaged (not a JSON object); "
                              "delete it and run again")
    found = meta.get(PAYLOAD_KEY)
    if found is None:
        raise CheckpointError(f"{path}: {what} without the digest of its contents "
                              "(written by an earlier pagctl, or edited); delete it and run "
                              "again")
    if found != _payload_digest(tensors, meta):
        raise CheckpointError(f"{path}: damaged or edited: its contents do not match the "
                              "digest written with them; delete it and run again")
    if meta.get("version") != version:
        raise SpecError(f"{path}: {what} of another version of pagctl (version "
                        f"{meta.get('version')}, this one reads {version}); pass another path "
                        "or delete it")
    if meta.get("key") != expected:
        written = meta.get("key")
        theirs: dict[str, Any] = written if isinstance(written, dict) else {}
        differ = [(names or {}).get(k, k) for k in sorted(set(expected) | set(theirs))
                  if expected.get(k) != theirs.get(k)]
        raise SpecError(f"{path}: {what} of another evaluation (its {', '.join(differ)} "
                        "differ); pass another path or delete it")
    return tensors, meta


def contradiction(path: Path, what: str, problem: str) -> CheckpointError:
    """The error for a checked file whose contents break their own invariants."""
    return CheckpointError(f"{path}: {what} that contradicts itself ({problem}); it was "
                           "damaged or edited: delete it and run again")
