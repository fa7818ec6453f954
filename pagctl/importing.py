"""``pagctl import``: a model pagctl did not train, made into a run folder.

A run folder is what every other command reads (``attack``, ``align-score``, ``compare``),
so a foreign model becomes one: its spec (the architecture, the data it is evaluated on, the
normalisation in front of it), its weights as ``model.safetensors`` with a timm-style
``config.json``, and an ``import`` record saying where the weights came from. The folder is
then indistinguishable from a trained one to those commands, and loads the same way
(`pagctl.checkpoint.load_run`).

The architecture is any ``model.arch`` (`pagctl.models.create_network`): a timm name, a
model provider, or ``package.module:factory``. The weights come from ``checkpoint``:

- safetensors: read as tensors, nothing executed;
- a pickle (``.pt``, ``.pth``, ``.bin``, ``.ckpt``, ``.tar``, or anything that is not
  safetensors): only with ``trust_pickle``, because unpickling can run code; read with
  ``torch.load(weights_only=True)`` (tensors and plain containers only) even then;
- none: the factory's own weights (a factory that loads its checkpoint itself).

A checkpoint may be the state dict itself or a dict holding it under one of
`CONTAINER_KEYS`; a ``module.`` prefix on every key (DataParallel) is removed. The weights
must fit the network exactly (no missing or unexpected key), and the model must give one
finite logit per class on the first test points, whose accuracy is recorded as a check.

The normalisation in front of the network (``model.mean``/``model.std``), when the spec
leaves it null, is chosen by `import_normalisation`: none for ``package.module:factory``
(such a factory returns a model that takes [0, 1] pixels, as RobustBench's do), timm's
pretrained configuration for a timm name that has one with the data's channel count, and the
dataset's default otherwise. An image folder without ``data.image_size`` gets timm's
pretrained input size, crop share and interpolation for a timm name that has them
(`timm_data_config`), so its images are resized and centre-cropped as that model expects.
The spec written to the folder holds the values chosen.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pagctl.errors import CheckpointError, SpecError
from pagctl.trust import UNTRUSTED, CodeTrust

if TYPE_CHECKING:
    from torch import Tensor

    from pagctl.data import DataBundle
    from pagctl.spec import RunSpec

CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "net", "state")
"""Keys of a checkpoint dict that may hold the state dict, tried in this order."""
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")
N_CHECK = 256
"""Test points of the import check (the first ones)."""


@dataclass
class ImportResult:
    """The run folder written, and what the import record says."""

    run_dir: Path
    record: dict[str, Any]


@dataclass
class Weights:
    """A checkpoint's state dict and how it was found in the file."""

    tensors: dict[str, Tensor]
    format: str
    container: str | None
    stripped_prefix: str | None


def _is_safetensors(path: Path) -> bool:
    """Whether ``path`` holds a safetensors header (8-byte length, then a JSON object)."""
    with path.open("rb") as fh:
        head = fh.read(9)
    if len(head) < 9:
        return False
    size = int.from_bytes(head[:8], "little")
    return 0 < size < 100_000_000 and head[8:9] == b"{"


def _tensor_dict(obj: Any) -> bool:
    import torch

    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def read_weights(path: Path, *, trust_pickle: bool) -> Weights:
    """The state dict in ``path`` (see the module docstring). CheckpointError (one line,
    naming the file and the fix) for a missing or unreadable file, a pickle without
    ``trust_pickle``, or a file holding no state dict."""
    import torch

    if not path.is_file():
        raise CheckpointError(f"--checkpoint: {path}: no such file")
    if _is_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"--checkpoint: {path}: not a readable safetensors file "
                                  f"({str(exc).splitlines()[0]})") from None
        fmt = "safetensors"
    else:
        if not trust_pickle:
            kind = "a pickle" if path.suffix.lower() in PICKLE_SUFFIXES else \
                "not safetensors, so a pickle"
            raise CheckpointError(
                f"--checkpoint: {path} is {kind}, and loading a pickle can run code; pass "
                "--trust-pickle if you trust its source, or convert it to safetensors")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle errors have many types
            detail = (str(exc).strip().splitlines() or [""])[0][:160]
            raise CheckpointError(
                f"--checkpoint: {path}: torch.load(weights_only=True) refused it "
                f"({type(exc).__name__}: {detail}); save the state dict alone "
                "(torch.save(model.state_dict(), f)) or as safetensors") from None
        fmt = "pickle"
    container = None
    if not _tensor_dict(obj):
        if isinstance(obj, dict):
            container = next((k for k in CONTAINER_KEYS if _tensor_dict(obj.get(k))), None)
        if container is None:
            keys = ", ".join(sorted(map(str, obj))[:8]) if isinstance(obj, dict) else \
                type(obj).__name__
            raise CheckpointError(
                f"--checkpoint: {path} holds no state dict (found: {keys}); expected a dict "
                f"of tensors, or one under {', '.join(CONTAINER_KEYS)}")
        obj = obj[container]
    prefix = None
    if all(k.startswith("module.") for k in obj):
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
        prefix = "module."
    return Weights(dict(obj), fmt, container, prefix)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fit(net: Any, weights: Weights, path: Path) -> None:
    """Load ``weights`` into ``net`` exactly; CheckpointError naming what does not fit."""
    own = net.state_dict()
    missing = [k for k in own if k not in weights.tensors]
    unexpected = [k for k in weights.tensors if k not in own]
    wrong = [k for k in own if k in weights.tensors
             and tuple(own[k].shape) != tuple(weights.tensors[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected),
                           ("of another shape", wrong)):
            if keys:
                shown = ", ".join(keys[:3]) + (f" (+{len(keys) - 3})" if len(keys) > 3 else "")
                parts.append(f"{len(keys)} {what}: {shown}")
        raise CheckpointError(f"--checkpoint: {path} does not fit the architecture "
                              f"({'; '.join(parts)}); check --model and model.kwargs")
    net.load_state_dict(weights.tensors, strict=True)


def _pretrained_cfg(arch: str) -> Any:
    import timm

    if not timm.is_model(arch.split(".", 1)[0]):
        return None
    return timm.models.get_pretrained_cfg(arch)


def timm_data_config(spec: RunSpec) -> tuple[RunSpec, str | None]:
    """``spec`` with an image folder's resize filled in from timm's pretrained configuration
    of ``model.arch`` (input size, crop share, interpolation), and what was set, in words;
    unchanged (None) for other data, a given ``data.image_size``, or no such config."""
    data = spec.data
    if data.dataset != "imagefolder" or data.image_size is not None:
        return spec, None
    cfg = _pretrained_cfg(spec.model.arch)
    size = getattr(cfg, "input_size", None) if cfg is not None else None
    if not size or len(size) != 3 or size[1] != size[2]:
        return spec, None
    crop = float(getattr(cfg, "crop_pct", None) or 1.0)
    mode = str(getattr(cfg, "interpolation", "") or "bilinear")
    mode = mode if mode in ("bilinear", "bicubic", "nearest") else "bilinear"
    updated = data.model_copy(update={"image_size": int(size[1]), "crop_pct": crop,
                                      "interpolation": mode})
    return spec.model_copy(update={"data": updated}), (
        f"{size[1]}x{size[2]}, crop {crop:g}, {mode} (timm's pretrained configuration of "
        f"{spec.model.arch})")


def import_normalisation(spec: RunSpec, bundle: DataBundle) -> tuple[RunSpec, str]:
    """``spec`` with ``model.mean``/``model.std`` filled in where null (see the module
    docstring), and where the values come from, in words."""
    from pagctl.trust import is_import_path

    model = spec.model
    if model.mean is not None and model.std is not None:
        return spec, "given"
    channels = bundle.input_shape[0]
    if is_import_path(model.arch):
        mean, std, origin = (0.0,) * channels, (1.0,) * channels, \
            "none: the factory's model takes [0, 1] pixels"
    else:
        mean, std = bundle.mean, bundle.std
        origin = f"the dataset's default ({bundle.name})"
        cfg = _pretrained_cfg(model.arch)
        found = (getattr(cfg, "mean", None), getattr(cfg, "std", None)) if cfg else (None, None)
        if found[0] is not None and found[1] is not None and len(found[0]) == channels:
            mean, std = tuple(found[0]), tuple(found[1])
            origin = f"timm's pretrained configuration of {model.arch}"
    updated = model.model_copy(update={"mean": model.mean or tuple(mean),
                                       "std": model.std or tuple(std)})
    return spec.model_copy(update={"model": updated}), origin


def import_model(spec: RunSpec, checkpoint: Path | None, *, trust_pickle: bool = False,
                 overwrite: bool = False, device: str = "cpu",
                 trust: CodeTrust = UNTRUSTED) -> ImportResult:
    """Write ``spec.run_dir`` for the model ``spec.model`` describes, with the weights of
    ``checkpoint`` (see the module docstring). The folder is refused when it exists unless
    ``overwrite``; nothing is written until the weights fit and the model has been checked
    on the data. ``trust``: whether ``model.arch`` may name code to import
    (`pagctl.trust`); the folder records that name, and whoever reads the folder later
    needs to trust it in turn."""
    import torch

    from pagctl.build import resolve_device
    from pagctl.checkpoint import RunFolder, append_record, save_model
    from pagctl.data import get_batch, load_data
    from pagctl.models import build_model, check_finite_outputs, timm_config
    from pagctl.records import ImportRecord

    # The checkpoint first: a pickle without the opt-in, or a file with no state dict, is
    # refused before anything loads the data or builds the network.
    weights = None if checkpoint is None else read_weights(checkpoint,
                                                           trust_pickle=trust_pickle)
    spec, resize = timm_data_config(spec)
    bundle = load_data(spec.data)
    spec, normalisation = import_normalisation(spec, bundle)
    folder = RunFolder(spec, command="import", resume=False, overwrite=overwrite)
    with folder:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = build_model(spec.model, num_classes=bundle.num_classes,
                                in_chans=bundle.input_shape[0], default_mean=bundle.mean,
                                default_std=bundle.std, trust=trust,
                                allow_download=spec.data.download)
        if checkpoint is not None and weights is not None:
            _fit(model.net, weights, checkpoint)
        dev = resolve_device(device)
        model.to(dev).eval()
        n = min(N_CHECK, len(bundle.test))  # type: ignore[arg-type]
        x, y = get_batch(bundle.test, torch.arange(n))
        with torch.no_grad():
            logits = model(x.to(dev))
        if logits.dim() != 2 or logits.shape[1] != bundle.num_classes:
            raise SpecError(f"model.arch: {spec.model.arch} gives outputs of shape "
                            f"{tuple(logits.shape)} for {n} inputs of {bundle.name}; expected "
                            f"({n}, {bundle.num_classes}): one logit per class")
        check_finite_outputs(logits, f"{spec.model.arch} on {bundle.name}")
        accuracy = float((logits.argmax(1).cpu() == y).float().mean())
        config = timm_config(model.cpu(), spec.model, bundle.num_classes,
                             bundle.input_shape[0], bundle.input_shape,
                             class_names=bundle.class_names)
        record = ImportRecord(
            arch=spec.model.arch,
            checkpoint=None if checkpoint is None else str(checkpoint.resolve()),
            checkpoint_sha256=None if checkpoint is None else _sha256(checkpoint),
            format=None if weights is None else weights.format,
            container=None if weights is None else weights.container,
            stripped_prefix=None if weights is None else weights.stripped_prefix,
            normalisation=normalisation, resize=resize, mean=list(spec.model.mean or ()),
            std=list(spec.model.std or ()), n_check=n, check_accuracy=accuracy)
        folder.start()
        save_model(spec.run_dir, model, config, spec)
        append_record(spec.run_dir, record)
    return ImportResult(spec.run_dir, record.to_json())
