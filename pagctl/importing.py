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
- none: the factory's own weights (a factory that loads its checkpoint itself), or for a
  RobustBench zoo entry (``robustbench:<name>``) its file in RobustBench's cache under
  ``model_dir`` (`pagctl.robustbench_zoo`: read as RobustBench reads it, with
  ``torch.load(weights_only=True)``, never downloaded).

A checkpoint may be the state dict itself or a dict holding it under one of
`CONTAINER_KEYS`; a ``module.`` prefix on every key (DataParallel) is removed. The weights
must fit the network exactly (no missing or unexpected key), and the model must give one
finite logit per class on the first test points, whose accuracy is recorded as a check.

The normalisation in front of the network (``model.mean``/``model.std``: both or neither),
when the spec leaves it null, is chosen by `import_normalisation`: none for
``package.module:factory`` (such a factory returns a model that takes [0, 1] pixels, as
RobustBench's do) and for a RobustBench zoo entry (it normalises inside), timm's pretrained
configuration for a timm name that has one with the data's channel count, and the dataset's
default otherwise. That choice is a guess, so the
check also scores the other normalisations that could apply (`normalisation_candidates`)
and warns when one does clearly better (`clearly_better`), or when the check is near chance
(`near_chance`); the warnings are `ImportResult.warnings`. An image folder without
``data.image_size`` gets timm's
pretrained input size, crop share and interpolation for a timm name that has them
(`timm_data_config`), so its images are resized and centre-cropped as that model expects.
The spec written to the folder holds the values chosen.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pagctl.errors import CheckpointError, FieldError, SpecError
from pagctl.trust import UNTRUSTED, CodeTrust

if TYPE_CHECKING:
    from torch import Tensor, nn

    from pagctl.data import DataBundle
    from pagctl.models import NormalizedModel
    from pagctl.spec import RunSpec

CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "net", "state")
"""Keys of a checkpoint dict that may hold the state dict, tried in this order."""
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")
N_CHECK = 256
"""Test points of the import check (the first ones)."""
BETTER_BY = 0.1
"""How much higher another normalisation's check accuracy must be to be warned about
(`clearly_better`)."""
SIGNIFICANCE = 0.01
"""The sign test's level in `clearly_better`."""
DETAIL_CHARS = 160
"""The longest quotation of a library's error inside one of ours (`_clip`)."""


@dataclass
class ImportResult:
    """The run folder written, what the import record says, and the warnings about the
    check (one line each; the CLI prints them on stderr): a normalisation that scores
    clearly better than the one used, or a check near chance."""

    run_dir: Path
    record: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


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
        obj = _torch_load(path, "--checkpoint", "save the state dict alone "
                          "(torch.save(model.state_dict(), f)) or as safetensors")
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


def _torch_load(path: Path, where: str, fix: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors and plain containers
    only, never code. CheckpointError naming ``where`` with what torch said (`_load_refusal`)
    and ``fix`` when it refuses the file."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors have many types
        raise CheckpointError(
            f"{where}: {path}: torch.load(weights_only=True) refused it "
            f"({type(exc).__name__}: {_load_refusal(exc)}); {fix}") from None


def _clip(text: str, limit: int = DETAIL_CHARS) -> str:
    """``text`` cut at a word boundary, with an ellipsis, when longer than ``limit``: a
    quotation inside one of our one-line errors, whose own sentence (the fix) follows it."""
    if len(text) <= limit:
        return text
    cut = text[:limit - 1]
    space = cut.rfind(" ")
    if space > limit // 2:
        cut = cut[:space]
    return cut.rstrip(" ,;:.") + "…"


def _load_refusal(exc: BaseException) -> str:
    """What ``torch.load(weights_only=True)`` said, as one clause: its terminal colour codes
    removed; the unpickler's own line when there is one (it names the class that is not
    allowed), else the first line; its first sentence (the rest advises allow-listing the
    class, which is not our fix), clipped (`_clip`)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    said = next((line.split("error:", 1)[1].strip() for line in lines
                 if "Unpickler error:" in line), lines[0] if lines else "")
    sentence = re.split(r"(?<=\.)\s", said, maxsplit=1)[0].rstrip(".")
    return _clip(sentence or type(exc).__name__)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _kind(dtype: Any) -> str:
    """A dtype's kind: what ``load_state_dict`` may cast within (float16 to float32) but
    not across (an integer or boolean tensor is no weight of a floating-point layer)."""
    import torch

    if dtype == torch.bool:
        return "boolean"
    if dtype.is_complex:
        return "complex"
    return "floating-point" if dtype.is_floating_point else "integer"


def _tie_groups(net: nn.Module) -> list[list[str]]:
    """The names of ``net``'s state dict that are one tensor (tied weights), in groups of
    two or more."""
    groups: dict[tuple[Any, ...], list[str]] = {}
    for key, value in net.state_dict().items():
        if value.numel() and not value.is_meta:
            view = (value.device, value.data_ptr(), tuple(value.shape), value.stride(),
                    value.dtype)
            groups.setdefault(view, []).append(key)
    return [keys for keys in groups.values() if len(keys) > 1]


def _fit(net: nn.Module, weights: Weights, path: Path) -> None:
    """Load ``weights`` into ``net`` exactly; CheckpointError (one line) naming what does not
    fit: missing, unexpected or differently shaped keys, or a tensor of another dtype kind
    than the network's (`_kind`: ``load_state_dict`` would cast it silently).

    Tied weights (one parameter under two names) need only one of their names in the
    checkpoint, as safetensors' own ``save_model`` writes them; when the checkpoint holds
    several, they must be equal, since the network can hold one value only."""
    import torch

    own = net.state_dict()
    tensors = dict(weights.tensors)
    for keys in _tie_groups(net):
        present = [k for k in keys if k in tensors]
        if not present:
            continue
        differ = next((k for k in present[1:] if tensors[k].shape != tensors[present[0]].shape
                       or not torch.equal(tensors[k], tensors[present[0]])), None)
        if differ is not None:
            raise CheckpointError(
                f"--checkpoint: {path}: '{present[0]}' and '{differ}' differ, but the "
                "architecture ties them (one parameter); check --model and model.kwargs")
        tensors.update({k: tensors[present[0]] for k in keys if k not in tensors})
    missing = [k for k in own if k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    wrong = [k for k in own if k in tensors and tuple(own[k].shape) != tuple(tensors[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected),
                           ("of another shape", wrong)):
            if keys:
                shown = ", ".join(keys[:3]) + (f" (+{len(keys) - 3})" if len(keys) > 3 else "")
                parts.append(f"{len(keys)} {what}: {shown}")
        raise CheckpointError(f"--checkpoint: {path} does not fit the architecture "
                              f"({'; '.join(parts)}); check --model and model.kwargs")
    other = [k for k in own if _kind(tensors[k].dtype) != _kind(own[k].dtype)]
    if other:
        key = other[0]
        params = {name for name, _ in net.named_parameters(remove_duplicate=False)}
        role = "parameter" if key in params else "buffer"
        more = f" (and {len(other) - 1} more of another kind)" if len(other) > 1 else ""
        raise CheckpointError(
            f"--checkpoint: {path}: '{key}' is {tensors[key].dtype} but the architecture's "
            f"{role} is {own[key].dtype}{more}: loading would turn {_kind(tensors[key].dtype)} "
            f"values into {_kind(own[key].dtype)} ones; check --model, or convert that tensor "
            "in the checkpoint if its values are meant so")
    net.load_state_dict(tensors, strict=True)


def _broken_hint(net: nn.Module, checkpoint: Path | None) -> str:
    """`pagctl.models.check_finite_outputs`' advice for an imported model: its weights are
    to be checked where they came from (the checkpoint, or the factory), naming the first
    tensor with NaN or infinite values; with finite weights, the inputs may not suit it."""
    import torch

    source = f"check the checkpoint {checkpoint}" if checkpoint is not None else \
        "check the weights its factory gives"
    bad = next((k for k, v in net.state_dict().items()
                if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all())),
               None)
    if bad is not None:
        return f"its weights are broken (NaN/inf in '{bad}'): {source}"
    return f"its weights are finite but its outputs are not: {source} and --mean/--std"


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


@dataclass(frozen=True)
class Normalisation:
    """A normalisation that could be put in front of an imported network: ``source``
    (``none``, ``dataset`` or ``timm``), what it is in words, and its per-channel values."""

    source: str
    what: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def values(self) -> str:
        """The values in words, to 4 significant digits: ``mean 0.5, std 0.25`` (one
        number when every channel has it), ``mean [0.485, 0.456, 0.406], std [...]``."""
        def text(values: Sequence[float]) -> str:
            if len(set(values)) == 1:
                return f"{values[0]:.4g}"
            return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"

        return f"mean {text(self.mean)}, std {text(self.std)}"

    def options(self) -> str:
        """The values as the command line takes them, every channel to 6 significant
        digits: ``--mean 0.485,0.456,0.406 --std 0.229,0.224,0.225``."""
        return "--mean " + ",".join(f"{v:.6g}" for v in self.mean) + \
            " --std " + ",".join(f"{v:.6g}" for v in self.std)


def normalisation_candidates(arch: str, bundle: DataBundle) -> list[Normalisation]:
    """The normalisations that could apply to ``arch`` on ``bundle``'s data, without two of
    the same values: none (``[0, 1]`` pixels as they are: mean 0, std 1), the dataset's
    default, and timm's pretrained configuration of a timm name that has one with the
    data's channel count. `import_normalisation` picks one; the check scores them all."""
    from pagctl.robustbench_zoo import is_zoo_name
    from pagctl.trust import is_import_path

    channels = bundle.input_shape[0]
    none = "none: the factory's model takes [0, 1] pixels" if is_import_path(arch) else \
        "none: RobustBench's zoo models take [0, 1] pixels" if is_zoo_name(arch) else \
        "none ([0, 1] pixels as they are)"
    found = [Normalisation("none", none, (0.0,) * channels, (1.0,) * channels),
             Normalisation("dataset", f"the dataset's default ({bundle.name})",
                           tuple(bundle.mean), tuple(bundle.std))]
    cfg = None if is_import_path(arch) or is_zoo_name(arch) else _pretrained_cfg(arch)
    mean, std = (getattr(cfg, "mean", None), getattr(cfg, "std", None)) if cfg else (None, None)
    if mean is not None and std is not None and len(mean) == len(std) == channels:
        found.append(Normalisation("timm", f"timm's pretrained configuration of {arch}",
                                   tuple(float(v) for v in mean),
                                   tuple(float(v) for v in std)))
    unique: list[Normalisation] = []
    for cand in found:
        if all((cand.mean, cand.std) != (u.mean, u.std) for u in unique):
            unique.append(cand)
    return unique


def _chosen(arch: str, candidates: list[Normalisation]) -> Normalisation:
    """The default among ``candidates``: none for a factory or a RobustBench zoo entry,
    timm's for a timm name that has it, else the dataset's (see the module docstring)."""
    from pagctl.robustbench_zoo import is_zoo_name
    from pagctl.trust import is_import_path

    order = ("none",) if is_import_path(arch) or is_zoo_name(arch) else ("timm", "dataset")
    for source in order:
        for cand in candidates:
            if cand.source == source:
                return cand
    return candidates[0]  # pragma: no cover - "none" is always a candidate


def import_normalisation(spec: RunSpec, bundle: DataBundle) -> tuple[RunSpec, str]:
    """``spec`` with ``model.mean``/``model.std`` filled in when both are null (see the
    module docstring), and what is applied, in words with its values. SpecError naming the
    field when only one of the two is given: filling the other from a default would apply a
    normalisation that no one chose."""
    model = spec.model
    if (model.mean is None) != (model.std is None):
        given, other = ("mean", "std") if model.mean is not None else ("std", "mean")
        raise SpecError(f"model.{other}: model.{given} is given but model.{other} is not; "
                        f"give both (--mean and --std) or neither")
    if model.mean is not None and model.std is not None:
        applied = Normalisation("given", "given", model.mean, model.std)
        return spec, f"given ({applied.values()})"
    chosen = _chosen(model.arch, normalisation_candidates(model.arch, bundle))
    updated = model.model_copy(update={"mean": chosen.mean, "std": chosen.std})
    return spec.model_copy(update={"model": updated}), f"{chosen.what} ({chosen.values()})"


def clearly_better(better: Tensor, worse: Tensor) -> bool:
    """Whether the per-point correctness ``better`` beats ``worse`` clearly: an accuracy at
    least `BETTER_BY` higher, on a difference the points make significant: an exact
    one-sided sign test (McNemar's) on the points where the two disagree, p <
    `SIGNIFICANCE`. The first keeps a small gain from being called a wrong normalisation;
    the second keeps a few lucky points from doing so (it needs 7 disagreeing points at
    least: 4 test images never warn). Shape: (N,) bool each, the same points."""
    gain = float(better.float().mean() - worse.float().mean())
    wins = int((better & ~worse).sum())
    disagree = wins + int((worse & ~better).sum())
    p = sum(math.comb(disagree, k) for k in range(wins, disagree + 1)) / 2 ** disagree
    return gain >= BETTER_BY - 1e-9 and p < SIGNIFICANCE


def near_chance(accuracy: float, num_classes: int) -> bool:
    """Whether ``accuracy`` is near chance (1/K): at most 1.5 times chance, and never more
    than 0.1 above it (a two-class model at 0.7 is weak, not broken)."""
    chance = 1 / num_classes
    return accuracy <= min(1.5 * chance, chance + 0.1) + 1e-9


def _correct(net: nn.Module, norm: Normalisation, x: Tensor, y: Tensor) -> Tensor | None:
    """Which of the points ``net`` classifies right behind ``norm``; None when its outputs
    are not finite numbers (that normalisation does not suit it)."""
    import torch

    from pagctl.models import NormalizedModel

    with torch.no_grad():
        logits = NormalizedModel(net, norm.mean, norm.std).to(x.device)(x)
    if not bool(torch.isfinite(logits).all()):
        return None
    correct: Tensor = (logits.argmax(1) == y.to(x.device)).cpu()
    return correct


def check_normalisations(model: NormalizedModel, chosen: Normalisation,
                         candidates: list[Normalisation], x: Tensor, y: Tensor,
                         ) -> tuple[list[dict[str, Any]], str | None]:
    """The check under each candidate (the import record's ``normalisation_check``: its
    ``source``, ``mean``, ``std``, ``accuracy`` and whether it is the one ``used``), and the
    warning when one does clearly better than ``chosen`` (`clearly_better`; the best such),
    naming the options that apply it. Shape: x (N, C, H, W) on the model's device, y (N,)."""
    used = _correct(model.net, chosen, x, y)
    rows: list[dict[str, Any]] = []
    best: tuple[float, Normalisation] | None = None
    for cand in candidates:
        correct = used if cand == chosen else _correct(model.net, cand, x, y)
        if correct is None:
            continue
        accuracy = float(correct.float().mean())
        rows.append({"source": cand.source, "mean": list(cand.mean), "std": list(cand.std),
                     "accuracy": accuracy, "used": cand == chosen})
        if used is not None and cand != chosen and clearly_better(correct, used) and (
                best is None or accuracy > best[0]):
            best = (accuracy, cand)
    if best is None or used is None:
        return rows, None
    accuracy, cand = best
    return rows, (
        f"warning: the import check scores {float(used.float().mean()):.3f} with the "
        f"normalisation used ({chosen.what}) but {accuracy:.3f} with {cand.what}: if "
        f"the model expects that, import it again with {cand.options()}")


def import_spec(base: dict[str, Any] | None, values: dict[str, Any], *,
                checkpoint: Path | None, overrides: Sequence[str] = ()) -> RunSpec:
    """The run spec of an import, as ``pagctl import`` and `pagctl.api.import_model` both
    build it: ``base`` (a spec file's mapping; None: an empty spec), then the ``overrides``
    (``--set`` items), then ``values`` (dotted keys, typed: ``model.arch``,
    ``data.dataset``, ``model.mean``, ...), validated once. A new ``model.arch`` drops the
    base's ``model.kwargs`` (they were for its architecture). Named after ``out_dir`` (else
    the architecture), described by the architecture and the checkpoint's file name."""
    from pagctl import spec as specmod

    data: dict[str, Any] = dict(base) if base is not None else {"version": 1, "model": {},
                                                                "data": {}}
    section = data.get("model")
    if "model.arch" in values and "model.kwargs" not in values and isinstance(section, dict):
        section.pop("kwargs", None)
    arch = str(values.get("model.arch") or (section.get("arch", "model")
                                            if isinstance(section, dict) else "model"))
    out = values.get("out_dir")
    name = Path(out).name if out is not None else \
        re.sub(r"[^A-Za-z0-9_.-]+", "-", arch).strip("-.")
    data["name"] = name or "imported"
    data["description"] = f"imported: {arch}" + (f" from {checkpoint.name}" if checkpoint
                                                  else "")
    for item in overrides:
        specmod.apply_override(data, item)
    for key, value in values.items():
        specmod.set_value(data, key, value)
    return specmod.validate_spec(data)


def import_model(spec: RunSpec, checkpoint: Path | None, *, trust_pickle: bool = False,
                 overwrite: bool = False, device: str = "cpu",
                 trust: CodeTrust = UNTRUSTED, model_dir: Path | None = None,
                 ) -> ImportResult:
    """Write ``spec.run_dir`` for the model ``spec.model`` describes, with the weights of
    ``checkpoint`` (see the module docstring). The folder is refused when it exists unless
    ``overwrite``; nothing is written until the weights fit, the model has been checked on
    the data, and its state is one safetensors can store
    (`pagctl.checkpoint.check_saveable`). ``trust``: whether ``model.arch`` may name code to
    import (`pagctl.trust`); the folder records that name, and whoever reads the folder later
    needs to trust it in turn. The result's ``warnings`` say when the check looks wrong
    (module docstring). ``model_dir``: RobustBench's cache, where a zoo entry's weights are
    read from when ``checkpoint`` is None (``./models`` by default, as in RobustBench)."""
    import torch

    from pagctl.build import resolve_device
    from pagctl.checkpoint import (
        LOCK_FILE,
        RunFolder,
        append_record,
        check_saveable,
        save_model,
    )
    from pagctl.data import get_batch, load_data, subset_digest
    from pagctl.models import build_model, check_finite_outputs, timm_config
    from pagctl.records import ImportRecord

    # An existing folder first, in import's own words (it has no --resume to suggest)
    run_dir = spec.run_dir
    if not overwrite and run_dir.is_dir() and any(p.name != LOCK_FILE
                                                  for p in run_dir.iterdir()):
        raise CheckpointError(f"{run_dir}: already exists; pass --overwrite to replace it, or "
                              "choose another --out")
    # The checkpoint next: a pickle without the opt-in, or a file with no state dict, is
    # refused before anything loads the data or builds the network.
    weights = None if checkpoint is None else read_weights(checkpoint,
                                                           trust_pickle=trust_pickle)
    zoo = _zoo_record(spec, checkpoint, model_dir)
    if zoo is not None and checkpoint is None:
        from pagctl.robustbench_zoo import cache_file, zoo_state_dict

        checkpoint = cache_file(spec.model.arch, spec.model.kwargs, model_dir)
        tensors, container, stripped = zoo_state_dict(
            _torch_load(checkpoint, "model_dir", "fetch the file again"), checkpoint)
        weights = Weights(tensors, "pickle", container, stripped)
    spec, resize = timm_data_config(spec)
    bundle = load_data(spec.data)
    guessed = spec.model.mean is None and spec.model.std is None
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
        check_saveable(model.net.state_dict(), f"model.arch: {spec.model.arch}")
        dev = resolve_device(device)
        model.to(dev).eval()
        n = min(N_CHECK, len(bundle.test))  # type: ignore[arg-type]
        x, y = get_batch(bundle.test, torch.arange(n))
        x = x.to(dev)
        with torch.no_grad():
            logits = model(x)
        if logits.dim() != 2 or logits.shape[1] != bundle.num_classes:
            raise SpecError(f"model.arch: {spec.model.arch} gives outputs of shape "
                            f"{tuple(logits.shape)} for {n} inputs of {bundle.name}; expected "
                            f"({n}, {bundle.num_classes}): one logit per class")
        check_finite_outputs(logits, f"{spec.model.arch} on {bundle.name}",
                             hint=_broken_hint(model.net, checkpoint))
        accuracy = float((logits.argmax(1).cpu() == y).float().mean())
        warnings: list[str] = []
        checked: list[dict[str, Any]] | None = None
        if guessed:  # the normalisation was a guess: would another one fit better?
            options = normalisation_candidates(spec.model.arch, bundle)
            chosen = next(c for c in options
                          if (c.mean, c.std) == (spec.model.mean, spec.model.std))
            checked, better = check_normalisations(model, chosen, options, x, y)
            warnings += [better] if better is not None else []
        if not warnings and near_chance(accuracy, bundle.num_classes):
            warnings.append(
                f"warning: the import check scores {accuracy:.3f} on {n} test points, near "
                f"chance (1/{bundle.num_classes}): check --model, --checkpoint and the "
                "normalisation (--mean/--std)")
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
            std=list(spec.model.std or ()), n_check=n, check_accuracy=accuracy,
            normalisation_check=checked)
        if zoo is not None:  # absent from other imports' records
            record.zoo = zoo
        folder.start()
        test = torch.arange(len(bundle.test))  # type: ignore[arg-type]
        save_model(spec.run_dir, model, config, spec,
                   test_sha256=subset_digest(bundle.test, test))
        append_record(spec.run_dir, record)
    return ImportResult(spec.run_dir, record.to_json(), warnings)


def _zoo_record(spec: RunSpec, checkpoint: Path | None,
                model_dir: Path | None) -> dict[str, Any] | None:
    """The import record's ``zoo``: which RobustBench entry (``source``, ``name``,
    ``dataset``, ``threat_model``) and where its weights were looked for (``model_dir``;
    None when ``--checkpoint`` gave them); None for another architecture. SpecError when
    ``model_dir`` is given for one: it would be ignored."""
    from pagctl.robustbench_zoo import DEFAULT_MODEL_DIR, PREFIX, is_zoo_name

    arch = spec.model.arch
    if not is_zoo_name(arch):
        if model_dir is not None:
            raise FieldError("model_dir", f"RobustBench's cache, read for robustbench: models "
                             f"only, not {arch}; drop it")
        return None
    kwargs = spec.model.kwargs
    where = None if checkpoint is not None else str(
        (DEFAULT_MODEL_DIR if model_dir is None else model_dir).resolve())
    return {"source": "robustbench", "name": arch.removeprefix(PREFIX),
            "dataset": kwargs.get("dataset"), "threat_model": kwargs.get("threat_model", "Linf"),
            "model_dir": where}
