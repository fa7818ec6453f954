"""The run folder: weights, config, spec, metrics and resumable state, without pickle.

```
runs/<name>/
  model.safetensors   the weights (a classifier: the timm model's, without normalisation)
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

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pagctl.errors import CheckpointError, SpecError

if TYPE_CHECKING:
    import torch
    from pydantic import BaseModel
    from torch import nn

    from pagctl.models import NormalizedModel
    from pagctl.records import Record
    from pagctl.spec import RunSpec

_Model = TypeVar("_Model", bound="BaseModel")

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
SPEC_FILE = "spec.json"
METRICS_FILE = "metrics.jsonl"
STATE_FILE = "state.safetensors"
STATE_META_FILE = "state.json"
RUN_FILES = (MODEL_FILE, CONFIG_FILE, SPEC_FILE, METRICS_FILE, STATE_FILE, STATE_META_FILE)


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
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; use the usual file mode
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_save_tensors(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata=metadata)


def load_tensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file; a truncated or foreign file raises CheckpointError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"{path}: file is missing; is this a pagctl run folder?")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({str(exc).splitlines()[0]}); the file "
            "is truncated or foreign; re-run training or restore the file"
        ) from None


def spec_hash(spec: BaseModel) -> str:
    """A short digest of a validated spec (recorded with the weights and the state)."""
    return hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:16]


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

    path = run_dir / SPEC_FILE
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


class RunFolder:
    """The life of a training run's folder, the same for ``pagctl train`` and
    ``pagctl train-score``:

    1. ``RunFolder(spec, ...)`` checks before anything is built or written: an existing
       folder is refused unless resuming or overwriting, and a resumed folder must hold a
       saved state and the same spec (``out_dir`` aside);
    2. `start` (after the data, model and plugins are built): resuming, the saved state;
       otherwise a fresh folder (the files of a replaced run removed) with spec.json;
    3. `save_state` after a stop or an epoch; `trim_metrics` on resume drops the records
       written after the saved state.

    ``command`` names the command in messages; ``folder`` / ``what`` name the folder and
    its spec (`read_run_spec`); ``files``: what a replaced run's folder holds besides the
    usual files.
    """

    STATE_KEY = "pagctl_state"
    """The metadata key of state.safetensors that holds the counters."""

    def __init__(self, spec: Any, *, command: str, resume: bool, overwrite: bool,
                 folder: str = "pagctl run", what: str = "spec",
                 files: tuple[str, ...] = ()) -> None:
        self.path: Path = spec.run_dir
        self.spec = spec
        self.resume = resume
        self.overwrite = overwrite
        self.files = (*RUN_FILES, *files)
        run_dir = self.path
        if resume and overwrite:
            raise SpecError("--resume and --overwrite exclude each other; pick one")
        if resume:
            if not (run_dir / STATE_FILE).is_file():
                raise CheckpointError(f"{run_dir}: nothing to resume (no {STATE_FILE}); "
                                      "start it without --resume")
            saved = read_run_spec(run_dir, type(spec), folder=folder, what=what)
            # out_dir may differ (a folder resumed by path, or moved); the folder is what counts
            no_dir = {"out_dir": None}
            if saved.model_copy(update=no_dir) != spec.model_copy(update=no_dir):
                raise SpecError(f"--resume: the spec differs from {run_dir}/{SPEC_FILE}; "
                                f"resume with 'pagctl {command} {run_dir} --resume' or use "
                                "--overwrite")
            return
        exists = any(run_dir.iterdir()) if run_dir.is_dir() else run_dir.exists()
        if exists and not overwrite:
            raise CheckpointError(f"{run_dir}: run folder already exists; pass --resume to "
                                  "continue it, --overwrite to replace it, or set out_dir")
        if run_dir.exists() and not run_dir.is_dir():
            raise CheckpointError(f"{run_dir}: exists and is not a folder; choose another "
                                  "out_dir")

    def start(self) -> SavedState | None:
        """The saved state when resuming; otherwise create the folder and write spec.json."""
        if self.resume:
            from safetensors import safe_open

            path = self.path / STATE_FILE
            tensors = load_tensors(path)
            with safe_open(str(path), framework="pt") as fh:
                text = (fh.metadata() or {}).get(self.STATE_KEY)
            if text is None:
                raise CheckpointError(f"{path}: not a pagctl training state; start again "
                                      "with --overwrite")
            return SavedState(tensors, json.loads(text))
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
        atomic_save_tensors(tensors, self.path / STATE_FILE, {self.STATE_KEY: full})
        atomic_write_text(self.path / STATE_META_FILE, full + "\n")

    def trim_metrics(self, keep: Callable[[dict[str, Any]], bool]) -> None:
        """Rewrite metrics.jsonl without the records for which ``keep`` is False (a resumed
        run writes the records after its saved state again) and without lines that are not
        JSON objects."""
        path = self.path / METRICS_FILE
        if not path.is_file():
            return
        out = []
        for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and keep(rec):
                out.append(line)
        atomic_write_text(path, "".join(out))


# ---------------------------------------------------------------------------------------
# weights


def save_weights(run_dir: Path, tensors: dict[str, torch.Tensor], config: str,
                 metadata: dict[str, str]) -> None:
    """model.safetensors (with ``metadata`` and the library versions) and config.json."""
    import torch

    from pagctl import __version__

    meta = {"format": "pt", "pagctl_version": __version__, "torch_version": torch.__version__,
            **metadata}
    atomic_save_tensors(tensors, run_dir / MODEL_FILE, meta)
    atomic_write_text(run_dir / CONFIG_FILE, config)


def save_model(run_dir: Path, model: NormalizedModel, config: dict[str, Any],
               spec: RunSpec) -> None:
    """A classifier's weights (without the normalisation) and its timm config."""
    import timm

    save_weights(run_dir, dict(model.net.state_dict()), json.dumps(config, indent=2) + "\n",
                 {"timm_version": timm.__version__, "spec_hash": spec_hash(spec),
                  "architecture": str(config["architecture"])})


@dataclass
class LoadedRun:
    run_dir: Path
    spec: RunSpec
    config: dict[str, Any]
    model: NormalizedModel


def load_run(run_dir: Path, device: str | torch.device = "cpu") -> LoadedRun:
    """Rebuild a run's model from config.json + model.safetensors (eval mode).

    The global RNG is left as it was (building the network draws initial weights that the
    saved ones then replace)."""
    import torch

    from pagctl.models import rebuild_from_config

    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run folder; train one with 'pagctl train'")
    spec = read_spec(run_dir)
    cfg_path = run_dir / CONFIG_FILE
    if not (run_dir / MODEL_FILE).is_file():
        raise CheckpointError(f"{run_dir}: no {MODEL_FILE} (training has not finished an "
                              "epoch); train or resume it first")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{cfg_path}: unreadable ({exc}); restore config.json") from None
    arch = config.get("architecture") if isinstance(config, dict) else None
    if arch != spec.model.arch:
        raise CheckpointError(f"{cfg_path}: architecture {arch!r} but spec.json says "
                              f"{spec.model.arch!r}; the files come from different runs; "
                              "restore config.json")
    state = load_tensors(run_dir / MODEL_FILE)
    try:
        with torch.random.fork_rng(devices=[]):
            model = rebuild_from_config(config, state)
    except (CheckpointError, RuntimeError, KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, CheckpointError) and not isinstance(exc.__cause__, RuntimeError):
            raise  # a malformed config.json, already explained
        raise CheckpointError(
            f"{run_dir / MODEL_FILE}: weights do not match config.json/spec "
            f"({load_error_detail(exc)}); the files come from different runs; restore them "
            "or re-run training"
        ) from None
    model.to(device).eval()
    return LoadedRun(run_dir, spec, config, model)


# ---------------------------------------------------------------------------------------
# metrics


def append_record(run_dir: Path, record: Record) -> None:
    """Append one record as a JSON line (flushed and fsynced; a line is never split)."""
    line = json.dumps(record.to_json(), sort_keys=True, allow_nan=False) + "\n"
    with open(run_dir / METRICS_FILE, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every line of metrics.jsonl that is a JSON object, as a dict (others skipped)."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records
