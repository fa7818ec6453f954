"""The run spec: one validated, frozen description of a training run.

A spec comes from a YAML/JSON file or a built-in name, plus ``--set a.b=c`` overrides (values
parsed as YAML) and typed values set by options (``--out``, ``--data-dir``: applied as they
are, never parsed). It is validated once, here; plugin parameters are validated right after
against the plugin's own ``Params``. Errors carry full dotted paths.
"""

from __future__ import annotations

import json
import typing
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pagctl.errors import SpecError

_NAME_PATTERN = r"^[a-z][a-z0-9_]*$"


def _a_folder(path: Path) -> Path:
    if path == Path("."):
        raise ValueError("give a folder name: '' or '.' is the current folder, which cannot be "
                         "a run folder")
    return path


RunFolderPath = Annotated[Path, AfterValidator(_a_folder)]
"""A run folder (``out_dir``, ``--out``): any path but the current folder itself."""
Seed = Annotated[int, Field(ge=0, lt=2**32)]
"""A seed: 0 <= seed < 2**32 (what every generator and scikit-learn accept)."""


class FrozenModel(BaseModel):
    """The one base of every value pagctl validates once and then passes inward: frozen,
    unknown keys refused, every float finite (inf and NaN refused).

    The run spec and its sections, the score-model specs and config
    (`pagctl.score.spec`, `pagctl.score.model`) and every plugin's ``Params`` (through
    `pagctl.protocols.PluginParams`) share it, so the three rules cannot drift apart. It
    lives here, in the room of validation at the edge, because this room sits in layer 1
    (docs/architecture.md) and imports only `pagctl.errors`: `pagctl.protocols` (the same
    layer) and `pagctl.score` (above) can import it without a cycle. The metrics records
    (`pagctl.records`) are deliberately not built on it: they are read from files others
    wrote, so they are strict but keep unknown keys.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class PluginRef(FrozenModel):
    """A plugin by registry name, with its parameters (validated against its ``Params``)."""

    name: str = Field(pattern=_NAME_PATTERN, description="registered plugin name")
    params: dict[str, Any] = Field(default_factory=dict, description="the plugin's Params")


class ModelSpec(FrozenModel):
    arch: str = Field(description="architecture: a timm name, a model provider of the "
                      "pagctl.models group (pagctl_small_cnn, pagctl_cifar_resnet18, pagctl_mlp, "
                      "and installed packages'), or package.module:factory (any callable "
                      "returning an nn.Module)")
    kwargs: dict[str, Any] = Field(default_factory=dict,
                                   description="extra keyword arguments for the architecture "
                                   "(timm.create_model or the factory)")
    mean: tuple[float, ...] | None = Field(
        default=None, description="per-channel normalisation mean inside the model; "
        "null = the dataset's default")
    std: tuple[float, ...] | None = Field(
        default=None, description="per-channel normalisation std; null = the dataset's default")

    @field_validator("std")
    @classmethod
    def _positive_std(cls, v: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if v is not None and any(s <= 0 for s in v):
            raise ValueError("every std entry must be > 0")
        return v


class DataSpec(FrozenModel):
    dataset: Literal["digits", "mnist5k", "toy", "cifar10", "cifar100", "stl10", "svhn",
                     "mnist", "fashion_mnist", "imagefolder", "tensors"] = Field(
        description="dataset name; tensors: your own images in one .safetensors or .npz "
        "file (x, y; optionally x_train, y_train) given as root")
    root: Path | None = Field(default=None, description="data directory (--data-dir), or "
                              "the file of the dataset tensors; required for all but "
                              "digits, mnist5k and toy")
    num_classes: int | None = Field(
        default=None, ge=1, le=100_000, description="tensors: the number of classes; null = "
        "the largest label + 1 (other datasets know theirs)")
    download: bool = Field(default=False, description="allow the network: torchvision "
                           "downloads the dataset into root, timm fetches pretrained weights")
    batch_size: int = Field(default=64, ge=1, description="training batch size (images)")
    eval_batch_size: int = Field(default=256, ge=1, description="batch size for evaluation")
    workers: int = Field(default=0, ge=0, description="worker processes reading batches of "
                         "image-folder datasets (in-memory datasets are sliced directly)")
    augment: Literal["none", "crop_flip", "crop"] = Field(
        default="none", description="training augmentation, applied inside the loop and "
        "differentiated through (gradients are taken w.r.t. the un-augmented image)")
    shared_augmentation: bool = Field(
        default=False, description="one crop/flip draw per batch (the official code's "
        "behaviour) instead of one per image")
    crop_padding: int = Field(default=4, ge=0, description="zero padding for random crops")
    split_seed: Seed = Field(default=0, description="seed of the stratified train/test split "
                            "(digits, mnist5k, toy)")
    test_fraction: float = Field(default=0.2, gt=0, lt=1,
                                 description="test share of the split (digits, mnist5k)")
    toy_train_size: int = Field(default=6000, ge=10, description="toy training points")
    toy_test_size: int = Field(default=600, ge=10, description="toy test points")
    validation_size: int = Field(
        default=0, ge=0, description="images carved from the training set (stratified, "
        "seeded by split_seed) for model selection under robust overfitting: the per-epoch "
        "monitor also evaluates them and the run keeps the best model by their robust "
        "accuracy (model-best.safetensors); 0 = none. Never the test set")
    image_size: int | None = Field(
        default=None, ge=1, description="imagefolder: resize and centre-crop every image to "
        "image_size x image_size, as timm evaluates (shorter side to image_size / crop_pct, "
        "then the centre crop); null = the images as they are, all of one size")
    crop_pct: float = Field(default=1.0, gt=0, le=1, description="imagefolder with "
                            "image_size: the centre crop's share of the resized image")
    interpolation: Literal["bilinear", "bicubic", "nearest"] = Field(
        default="bilinear", description="imagefolder with image_size: the resize filter")

    @model_validator(mode="after")
    def _num_classes_is_for_tensors(self) -> DataSpec:
        if self.num_classes is not None and self.dataset != "tensors":
            raise ValueError(f"data.num_classes: sets the classes of the dataset tensors; "
                             f"'{self.dataset}' knows its own, set it to null")
        return self

    @model_validator(mode="after")
    def _image_size_is_for_image_folders(self) -> DataSpec:
        if self.image_size is not None and self.dataset != "imagefolder":
            raise ValueError(f"data.image_size: resizes image folders only; dataset "
                             f"'{self.dataset}' has a fixed size, set it to null")
        return self


class TrainSpec(FrozenModel):
    epochs: int = Field(default=30, ge=1)
    lr: float = Field(default=0.05, gt=0, description="base learning rate (SGD)")
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=5e-4, ge=0)
    nesterov: bool = False
    schedule: Literal["step", "cosine", "constant", "multistep"] = Field(
        default="cosine", description="step: the paper's drops (x0.1 at 50% and 75% of the "
        "epochs, x0.01 more in the last epoch); cosine: per step to 0; constant; multistep: "
        "x lr_gamma after each of the milestones (as TRADES and Rice et al. train)")
    milestones: tuple[int, ...] = Field(
        default=(), description="multistep: numbers of finished epochs after which the "
        "learning rate is multiplied by lr_gamma (torch's MultiStepLR), increasing")
    lr_gamma: float = Field(default=0.1, gt=0, le=1, description="multistep: the factor")
    seed: Seed = Field(default=0, description="seeds data order, class sampling, init, attacks")
    pag_weight: float = Field(
        default=1.0, ge=0, description="lambda, the real weight on mean_k(1 - cos); the "
        "official code's pag_coeff c corresponds to lambda = 10 c")
    classes_per_image: int = Field(
        default=10, ge=1, description="K: target classes sampled per image without "
        "replacement (all classes when K = number of classes)")
    pag_warmup_epochs: int = Field(
        default=0, ge=0, description="epochs (from 1) that use pag_weight * pag_warmup_factor")
    pag_warmup_factor: float = Field(default=1.0, ge=0)
    objective: Literal["ce", "pgd_at", "trades", "mart", "fast_at"] = Field(
        default="ce", description="ce: cross-entropy on clean inputs; pgd_at: CE on "
        "adversarial inputs (Madry et al. 2018); trades: CE(x) + beta KL(p(x) || p(x_adv)) "
        "(Zhang et al. 2019); mart: boosted CE on x_adv + beta KL weighted by 1 - p_y(x) "
        "(Wang et al. 2020); fast_at: pgd_at with a one-step inner attack (Wong et al. "
        "2020); the PAG term adds to any of them")
    beta: float = Field(default=6.0, ge=0, description="trades/mart: weight on the robust "
                        "KL term (both references use 6)")
    inner_attack: PluginRef | None = Field(
        default=None, description="the registered attack that makes x_adv for every "
        "objective but ce, with its params (it must declare a budget: eps)")
    attack_mode: Literal["auto", "train", "eval"] = Field(
        default="auto", description="BatchNorm mode while the inner attack runs: auto = each "
        "objective's reference (train for pgd_at and fast_at, eval for trades and mart)")
    pag_on: Literal["clean", "adversarial"] = Field(
        default="clean", description="where the PAG term's input gradients are taken: the "
        "clean inputs or the inner attack's adversarial inputs")
    drop_last: bool = True
    amp: bool = Field(default=False, description="bfloat16 autocast of the training step, "
                      "through the PAG double backward (GPU, or a CPU with bfloat16 units; "
                      "attacks and the monitor stay float32)")
    channels_last: bool = Field(default=False, description="channels_last memory format "
                                "(CUDA only: slower on the CPU)")
    grad_method: Literal["auto", "loop", "batched", "repeat"] = Field(
        default="auto", description="how the K input gradients are computed: auto (repeat on "
        "a GPU, loop elsewhere), loop (K reverse passes over one forward; least memory, "
        "fastest on CPU), repeat (each image repeated K times, one forward and one reverse "
        "pass; K x the activation memory, fastest on a GPU), batched (one vmapped reverse "
        "pass); see benchmarks/README.md")
    accumulation_steps: int = Field(
        default=1, ge=1, description="micro-batches per optimiser step: data.batch_size (the "
        "global batch) is cut into processes x accumulation_steps slices whose gradients add "
        "up to the whole batch's; BatchNorm then normalises each micro-batch on its own")
    sync_batchnorm: bool = Field(
        default=True, description="under torchrun: BatchNorm statistics over the micro-batch "
        "of every process, so the result does not depend on the process count (false: each "
        "process normalises by its own slice, as DDP without SyncBatchNorm); no effect on "
        "one process")

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(m < 1 for m in v) or any(b <= a for a, b in zip(v, v[1:], strict=False)):
            raise ValueError("milestones must be increasing epoch counts >= 1, e.g. [75, 90]")
        return v

    @model_validator(mode="after")
    def _objective_needs(self) -> TrainSpec:
        if self.objective == "ce":
            if self.inner_attack is not None:
                raise ValueError("inner_attack is set but objective 'ce' makes no adversarial "
                                 "examples; remove it or choose pgd_at, trades, mart or fast_at")
            if self.pag_on == "adversarial":
                raise ValueError("pag_on 'adversarial' needs adversarial inputs, which "
                                 "objective 'ce' does not make; use pag_on: clean")
        elif self.inner_attack is None:
            raise ValueError(f"objective '{self.objective}' needs inner_attack, e.g. "
                             "{name: pgd_linf, params: {eps: 0.1, steps: 10, keep: last}}")
        if self.schedule == "multistep" and not self.milestones:
            raise ValueError("schedule 'multistep' needs milestones, e.g. [75, 90]")
        return self


class EvalSpec(FrozenModel):
    attack: PluginRef | None = Field(
        default_factory=lambda: PluginRef(name="pgd_l2", params={"eps": 0.5, "steps": 7}),
        description="monitoring attack run on the test set after each epoch (null: none); "
        "unset with a train.inner_attack: that attack at its eps (the trained threat)")
    align_source: PluginRef | None = Field(
        default=None, description="source for the per-epoch alignment cosine on test; "
        "null = the training source (skipped when that is 'none')")
    limit: int | None = Field(default=None, ge=1,
                              description="first N test images for the per-epoch monitor")
    every: int = Field(default=1, ge=1, description="evaluate every N epochs (and the last)")


def training_monitor(inner: PluginRef) -> PluginRef | None:
    """The per-epoch monitor of a run trained against ``inner``: the same attack at the same
    ``eps`` (so the same norm and radius), every other param its default (an evaluation's:
    cross-entropy, the first fooled iterate), rather than `EvalSpec`'s L2 default, which
    measures a threat an L∞-trained model was never trained for. None when ``inner``'s
    params name no ``eps``."""
    if "eps" not in inner.params:
        return None
    return PluginRef(name=inner.name, params={"eps": inner.params["eps"]})


class RunSpec(FrozenModel):
    """A whole training run. Field names are the keys of the spec file and of ``--set``."""

    version: Literal[1] = 1
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="run name")
    description: str = ""
    model: ModelSpec
    data: DataSpec
    train: TrainSpec = Field(default_factory=TrainSpec)
    target_gradients: PluginRef = Field(default_factory=lambda: PluginRef(name="none"))
    eval: EvalSpec = Field(default_factory=EvalSpec)
    out_dir: RunFolderPath | None = Field(default=None,
                                          description="run folder; null = runs/<name>")

    @model_validator(mode="after")
    def _monitor_follows_the_training_threat(self) -> RunSpec:
        """An adversarially trained run whose spec leaves ``eval.attack`` unset is monitored
        under the threat it is trained against (`training_monitor`); one that sets it, to
        anything or null, keeps what it set."""
        inner = self.train.inner_attack
        if inner is not None and "attack" not in self.eval.model_fields_set:
            monitor = training_monitor(inner)
            if monitor is not None:
                object.__setattr__(self, "eval", self.eval.model_copy(update={"attack": monitor}))
        return self

    @property
    def run_dir(self) -> Path:
        return self.out_dir if self.out_dir is not None else Path("runs") / self.name


SPEC_GENERATIONS: tuple[dict[str, tuple[str, ...]], ...] = (
    {"train": ("milestones", "lr_gamma", "objective", "beta", "inner_attack", "attack_mode",
               "pag_on"),
     "data": ("validation_size",)},                                # adversarial training
    {"data": ("image_size", "crop_pct", "interpolation")},         # resized image folders
    {"train": ("accumulation_steps", "sync_batchnorm")},          # data-parallel training
    {"data": ("num_classes",)},                                    # the dataset tensors
)
"""The `RunSpec` fields added since run folders were first written, one mapping (section ->
field names) per version that added some, oldest first. A folder written before a
generation does not carry its fields; `pagctl.checkpoint` recognises its spec digest by
leaving them out where they hold their defaults (`earlier_forms`)."""


def earlier_forms(spec: BaseModel) -> list[dict[str, Any]]:
    """``spec`` as JSON data the way each earlier version recorded it: without the fields of
    the last `SPEC_GENERATIONS` entry, then of the last two, and so on, each left out only
    where it holds its default (a spec that sets a newer field has no earlier form)."""
    data = spec.model_dump(mode="json")
    if not isinstance(spec, RunSpec):
        return []
    forms = []
    for generation in reversed(SPEC_GENERATIONS):
        for section, names in generation.items():
            sub = getattr(spec, section)
            fields = type(sub).model_fields
            for name in names:
                if getattr(sub, name) == fields[name].get_default(call_default_factory=True):
                    data[section].pop(name, None)
        forms.append(json.loads(json.dumps(data)))
    return forms


# ---------------------------------------------------------------------------------------
# reading YAML and JSON, bounded

MAX_SPEC_BYTES = 1 << 20
"""The largest spec file read (1 MiB; the built-ins are under 2 KiB)."""
MAX_DEPTH = 16
"""The deepest nesting of sections, lists and mappings a spec may have."""


class _Refused(ValueError):
    """What the bounded readers refuse, with the reason."""


class _SpecLoader(yaml.SafeLoader):  # type: ignore[misc]
    """YAML's safe loader without aliases (a few lines of them expand to gigabytes), with
    nesting bounded by `MAX_DEPTH` and duplicate keys refused (not silently last-wins)."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise _Refused("YAML aliases (*name) are not allowed in a spec; write the value "
                           "out")
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(f"nested deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise _Refused(f"a key is a {type(key).__name__}, not a name; spec keys are "
                               "names (text)")
            if key in seen:
                raise _Refused(f"the key {str(key)[:40]!r} appears twice in one mapping; "
                               "keep one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"the key {key[:40]!r} appears twice in one object; keep one")
        out[key] = value
    return out


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def parse_text(text: str, *, json_text: bool = False) -> Any:
    """YAML (or JSON) as a spec reads it: no aliases, no duplicate keys, at most
    `MAX_DEPTH` levels. Raises ValueError with the reason (yaml.YAMLError for bad syntax)."""
    if json_text:
        try:
            data = json.loads(text, object_pairs_hook=_no_duplicates)
        except RecursionError:
            raise _Refused(f"nested deeper than {MAX_DEPTH} levels") from None
        if _depth(data) > MAX_DEPTH:
            raise _Refused(f"nested deeper than {MAX_DEPTH} levels")
        return data
    return yaml.load(text, Loader=_SpecLoader)  # noqa: S506 - a SafeLoader subclass


def parse_value(raw: str) -> Any:
    """An option's ``KEY=VALUE`` value (``--set``, ``--param``): YAML as a spec reads it,
    else the text itself; a refused value (an alias, too deep) is a ValueError."""
    if not raw.strip():
        return None
    try:
        return parse_text(raw)
    except _Refused:
        raise
    except yaml.YAMLError:
        return raw


# ---------------------------------------------------------------------------------------
# loading


def builtin_spec_names() -> list[str]:
    """Names of the specs shipped in ``pagctl/specs``."""
    folder = resources.files("pagctl") / "specs"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def read_spec_mapping(source: str, *, names: list[str], folder: Any, kind: str = "spec",
                      listing: str = "pagctl train --list",
                      sections: str = "model, data, train, ...") -> tuple[dict[str, Any], str]:
    """Read a spec file, or the built-in ``folder/<source>.yaml`` when ``source`` is one of
    ``names``; returns (mapping, where it came from). SpecError, one line, otherwise."""
    path = Path(source)
    if path.suffix not in (".yaml", ".yml", ".json") and not path.exists():
        if source not in names:
            from difflib import get_close_matches

            close = get_close_matches(source, names, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise SpecError(
                f"spec: '{source}' is neither a file nor a built-in {kind}.{hint} "
                f"Built-ins: {', '.join(names)} ({listing})."
            )
        text = (folder / f"{source}.yaml").read_text()
        origin = f"built-in {kind} '{source}'"
    else:
        if not path.is_file():
            raise SpecError(f"spec: file '{source}' does not exist; pass a {kind} file or a "
                            f"built-in name ({listing})")
        if path.stat().st_size > MAX_SPEC_BYTES:
            raise SpecError(f"spec: '{source}' is {path.stat().st_size:,} bytes; a {kind} is "
                            f"at most {MAX_SPEC_BYTES:,}: is it the right file?")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SpecError(f"spec: cannot read '{source}': {exc}") from None
        origin = f"'{source}'"
    try:
        data = parse_text(text, json_text=path.suffix == ".json")
    except _Refused as exc:
        raise SpecError(f"spec: {origin}: {exc}") from None
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise SpecError(f"spec: {origin} is not valid YAML/JSON ({first}); fix the syntax") \
            from None
    if not isinstance(data, dict):
        raise SpecError(f"spec: {origin} must be a mapping of sections ({sections}), got "
                        + type(data).__name__)
    return data, origin


def read_run_spec_mapping(source: str) -> tuple[dict[str, Any], str]:
    """A run spec file or built-in name as a mapping, not yet validated (with where it came
    from)."""
    return read_spec_mapping(source, names=builtin_spec_names(),
                             folder=resources.files("pagctl") / "specs")


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override in place (value parsed as YAML)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise SpecError(f"--set: '{item}' is not KEY=VALUE with a dotted key, "
                        "e.g. --set train.epochs=5")
    try:
        value = parse_value(raw)
    except ValueError as exc:
        raise SpecError(f"--set {key}: {exc}") from None
    set_value(data, key, value)


def set_value(data: dict[str, Any], key: str, value: Any) -> None:
    """Set the dotted ``key`` of a spec mapping to ``value`` in place, as it is (a typed
    value, e.g. the Path of ``--out``), creating missing sections."""
    node: Any = data
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part) if isinstance(node, dict) else None
        if child is None:
            child = {}
            node[part] = child
        if not isinstance(child, dict):
            raise SpecError(f"--set {key}: '{'.'.join(parts[: depth + 1])}' is not a section")
        node = child
    node[parts[-1]] = value


MAX_ERROR_LINES = 20
"""At most this many problems are listed (the rest are counted)."""


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside a field annotation (Optional, unions, containers)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _close_key(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> str | None:
    """A field name of the model at ``loc[:-1]`` close to the unknown key ``loc[-1]``."""
    from difflib import get_close_matches

    node = model
    for part in loc[:-1]:
        field = node.model_fields.get(str(part)) if node is not None else None
        if field is None:
            return None
        node = _model_in(field.annotation)
    if node is None or not loc:
        return None
    close = get_close_matches(str(loc[-1]), list(node.model_fields), n=1, cutoff=0.6)
    return close[0] if close else None


def format_validation_error(exc: ValidationError, prefix: str = "",
                            schema: str = "pagctl train --schema",
                            model: type[BaseModel] | None = None) -> str:
    """One line per problem: ``dotted.path: message (got value)``, at most
    `MAX_ERROR_LINES` lines, each path and value shortened (a value may be huge). ``schema``
    is the command that lists the valid keys, for the unknown-key hint; ``model`` (the
    validated class) lets an unknown key suggest the closest valid one."""
    lines = []
    errors = exc.errors()
    for err in errors[:MAX_ERROR_LINES]:
        loc = ".".join(str(p) for p in (prefix.split(".") if prefix else []) + list(err["loc"]))
        msg = err["msg"].removeprefix("Value error, ")  # pydantic's prefix for ValueError
        if err["type"] == "extra_forbidden":
            close = _close_key(model, tuple(err["loc"]))
            hint = f"did you mean '{close}'? " if close else ""
            msg = f"unknown key; {hint}remove it or check the spelling ({schema})"
        elif err["type"] == "missing":
            msg = "required field is missing; add it"
        got = err.get("input")
        shown = "" if err["type"] in ("extra_forbidden", "missing") or isinstance(got, dict) \
            else f" (got {_clip(repr(got), 80)})"
        lines.append(f"{_clip(loc or prefix or 'spec', 120)}: {_clip(msg, 300)}{shown}")
    if len(errors) > MAX_ERROR_LINES:
        lines.append(f"({len(errors) - MAX_ERROR_LINES} more problems not shown)")
    return "\n".join(lines)


def load_spec(source: str | Path, overrides: list[str] | tuple[str, ...] = (),
              values: dict[str, Any] | None = None) -> RunSpec:
    """Read a spec file (or built-in name), apply ``a.b=c`` overrides (values parsed as
    YAML), then the typed ``values`` (dotted key: value, set as they are), validate once."""
    data, _ = read_run_spec_mapping(str(source))
    for item in overrides:
        apply_override(data, item)
    for key, value in (values or {}).items():
        set_value(data, key, value)
    return validate_spec(data)


def validate_spec(data: dict[str, Any]) -> RunSpec:
    """A mapping as a RunSpec; SpecError with one ``dotted.path: message`` line per problem
    (a setting the run would ignore among them, `_unused_settings`)."""
    try:
        spec = RunSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, model=RunSpec)) from None
    unused = _unused_settings(spec.train)
    if unused:
        raise SpecError("\n".join(unused))
    return spec


def _unused_settings(t: TrainSpec) -> list[str]:
    """One line per ``train`` setting that the spec sets and its objective or schedule would
    ignore: ``beta`` without trades or mart, ``milestones`` and ``lr_gamma`` without the
    multistep schedule, ``attack_mode`` without an inner attack (objective ce).

    Only a value other than the default counts, and only where the spec sets it (pydantic's
    ``model_fields_set``): writing a default out changes nothing (spec.json holds every
    field), while ``beta: 3`` beside ``objective: ce`` describes a run other than the one
    that would be trained. It is checked here, where specs come in (files, ``--set``, the
    Python API), not by `TrainSpec` itself, so that a run folder written before (whose
    spec.json may hold such a value) stays readable by every command."""
    fields = type(t).model_fields
    unused = [name for name in ("beta", "attack_mode", "milestones", "lr_gamma")
              if name in t.model_fields_set and getattr(t, name) != fields[name].default]
    fixes = {
        "beta": (t.objective not in ("trades", "mart"),
                 f"weighs the robust KL term of objectives trades and mart; objective "
                 f"'{t.objective}' ignores it: remove it, or choose objective trades or mart"),
        "attack_mode": (t.objective == "ce",
                        "sets BatchNorm's mode during the inner attack; objective 'ce' makes "
                        "no attack: remove it, or choose objective pgd_at, trades, mart or "
                        "fast_at"),
        "milestones": (t.schedule != "multistep",
                       f"are the drops of schedule 'multistep'; schedule '{t.schedule}' ignores "
                       "them: remove them, or set train.schedule: multistep"),
        "lr_gamma": (t.schedule != "multistep",
                     f"is the factor of schedule 'multistep'; schedule '{t.schedule}' ignores "
                     "it: remove it, or set train.schedule: multistep"),
    }
    shown = {name: list(v) if isinstance(v := getattr(t, name), tuple) else v
             for name in unused}
    return [f"train.{name}: {shown[name]!r} {fixes[name][1]}" for name in unused
            if fixes[name][0]]
