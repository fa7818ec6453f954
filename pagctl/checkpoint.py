"""The run folder: weights, timm config, spec, metrics and resumable state, without pickle.

```
runs/<name>/
  model.safetensors   the timm model's weights (no normalisation; that is in config.json)
  config.json         timm-compatible: architecture, num_classes, model_args, pretrained_cfg
  spec.json           the validated RunSpec
  metrics.jsonl       append-only records (train epochs, attacks, ...)
  state.safetensors   model + optimiser tensors + RNG states, for --resume
  state.json          epoch/step counters, optimiser hyper-parameters, running sums
```

Every file is written to a temporary name in the same folder and renamed into place, so a
killed process never leaves a half-written file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
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
def _atomic_path(path: Path) -> Iterator[Path]:
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
    with _atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_save_tensors(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    from safetensors.torch import save_file

    with _atomic_path(path) as tmp:
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


def spec_hash(spec: RunSpec) -> str:
    return hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------
# run folder lifecycle


def prepare_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse an existing run folder unless resuming or overwriting. Creates nothing."""
    if resume and overwrite:
        raise SpecError("--resume and --overwrite exclude each other; pick one")
    exists = run_dir.exists() and any(run_dir.iterdir()) if run_dir.is_dir() else run_dir.exists()
    if resume:
        if not (run_dir / STATE_FILE).is_file():
            raise CheckpointError(f"{run_dir}: nothing to resume (no {STATE_FILE}); "
                                  "start it without --resume")
        return
    if exists and not overwrite:
        raise CheckpointError(f"{run_dir}: run folder already exists; pass --resume to "
                              "continue it, --overwrite to replace it, or set out_dir")
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: exists and is not a folder; choose another out_dir")


def create_run_dir(run_dir: Path, *, overwrite: bool) -> None:
    """Start a fresh run folder (after all validation has passed)."""
    if overwrite and run_dir.is_dir():
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)


def write_spec(run_dir: Path, spec: RunSpec) -> None:
    atomic_write_text(run_dir / SPEC_FILE, spec.model_dump_json(indent=2) + "\n")


def read_spec_file(path: Path, model: type[_Model], what: str) -> _Model:
    """``path`` (a saved spec.json) validated as ``model``; CheckpointError, one line naming
    the file and the first problem, for an unreadable file or an invalid ``what``."""
    from pydantic import ValidationError

    from pagctl.spec import format_validation_error

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
    from pagctl.spec import RunSpec

    path = run_dir / SPEC_FILE
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: no {SPEC_FILE}; not a pagctl run folder")
    return read_spec_file(path, RunSpec, "spec")


def save_model(run_dir: Path, model: NormalizedModel, config: dict[str, Any],
               spec: RunSpec) -> None:
    import timm
    import torch

    from pagctl import __version__

    meta = {"format": "pt", "pagctl_version": __version__, "torch_version": torch.__version__,
            "timm_version": timm.__version__, "spec_hash": spec_hash(spec),
            "architecture": str(config["architecture"])}
    atomic_save_tensors(dict(model.net.state_dict()), run_dir / MODEL_FILE, meta)
    atomic_write_text(run_dir / CONFIG_FILE, json.dumps(config, indent=2) + "\n")


def _load_error_detail(exc: BaseException) -> str:
    """The informative line of a ``load_state_dict`` failure (its first line is a heading)."""
    cause = exc.__cause__ if isinstance(exc.__cause__, RuntimeError) else exc
    lines = [ln.strip() for ln in str(cause).splitlines() if ln.strip()]
    detail = next((ln for ln in lines if not ln.startswith("Error(s) in loading")),
                  lines[0] if lines else type(cause).__name__)
    return detail if len(detail) <= 200 else detail[:197] + "..."


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
            f"({_load_error_detail(exc)}); the files come from different runs; restore them "
            "or re-run training"
        ) from None
    model.to(device).eval()
    return LoadedRun(run_dir, spec, config, model)


# ---------------------------------------------------------------------------------------
# metrics


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    """Append one JSON line (flushed and fsynced; a line is never split)."""
    line = json.dumps(record, sort_keys=True, allow_nan=False) + "\n"
    with open(run_dir / METRICS_FILE, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
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


def truncate_metrics(run_dir: Path, keep: int) -> None:
    """Keep the first ``keep`` training-epoch records (resume drops epochs after the state)."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return
    out, epochs = [], 0
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("kind") == "train_epoch":
            epochs += 1
            if epochs > keep:
                continue
        out.append(line)
    atomic_write_text(path, "".join(out))


# ---------------------------------------------------------------------------------------
# resumable state (no pickle: tensors in safetensors, the rest in JSON)


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], Any]:
    import torch

    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = val
            else:
                scalars.setdefault(str(idx), {})[key] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                        meta: Any) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, val in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = val
    for idx, vals in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(vals)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_state(run_dir: Path, model: nn.Module, opt: torch.optim.Optimizer,
               rng: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write the resumable state in one atomic file; state.json is a readable copy.

    The counters travel in the safetensors metadata, so tensors and counters can never come
    from different saves, even if the process dies between the two writes.
    """
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = optimizer_to_flat(opt)
    tensors.update(opt_tensors)
    tensors.update({f"rng.{k}": v for k, v in rng.items()})
    full = json.dumps({**meta, "optimizer": opt_meta}, indent=2)
    atomic_save_tensors(tensors, run_dir / STATE_FILE, {"pagctl_state": full})
    atomic_write_text(run_dir / STATE_META_FILE, full + "\n")


def load_state(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read state.safetensors (tensors and, in its metadata, the counters)."""
    from safetensors import safe_open

    tensors = load_tensors(run_dir / STATE_FILE)
    with safe_open(str(run_dir / STATE_FILE), framework="pt") as fh:
        text = (fh.metadata() or {}).get("pagctl_state")
    if text is None:
        raise CheckpointError(f"{run_dir / STATE_FILE}: not a pagctl training state; "
                              "start again with --overwrite")
    meta: dict[str, Any] = json.loads(text)
    return tensors, meta


def remove_run_dir(run_dir: Path) -> None:
    shutil.rmtree(run_dir, ignore_errors=True)
