"""Build what a run needs from a spec: device, data, model, plugins."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pagctl.errors import DataError, FieldError, SpecError, UnknownPluginError
from pagctl.trust import UNTRUSTED, CodeTrust

if TYPE_CHECKING:
    import torch

    from pagctl.data import DataBundle
    from pagctl.models import NormalizedModel
    from pagctl.protocols import BuildContext
    from pagctl.spec import PluginRef, RunSpec


def resolve_device(name: str) -> torch.device:
    import torch

    if not isinstance(name, str):
        raise FieldError("device", f"expected text such as auto, cpu or cuda:0, got "
                         f"{name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FieldError("device", f"{name}: CUDA is not available here; use cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FieldError("device", f"'{name}' is not a device; use auto, cpu or cuda") \
            from None
    if device.type == "meta":
        raise FieldError("device", "'meta' holds no values to evaluate; use auto, cpu or cuda")
    return device



@dataclass
class Setup:
    spec: RunSpec
    device: torch.device
    bundle: DataBundle
    model: NormalizedModel
    config: dict[str, Any]
    source: Any
    pag_active: bool
    test_sha256: str
    """The digest of the test images and labels (`pagctl.data.subset_digest`), which the
    saved weights carry (`pagctl.checkpoint.save_model`)."""


def build_context(bundle: DataBundle, device: torch.device, seed: int,
                  cache_dir: Path | None) -> BuildContext:
    """The context plugins are built with: the data's classes, shape, training set and
    fingerprint, the device, a seed and a cache folder."""
    from pagctl.protocols import BuildContext

    return BuildContext(num_classes=bundle.num_classes, input_shape=bundle.input_shape,
                        device=device, seed=seed, train_set=bundle.train,
                        cache_dir=cache_dir, data_fingerprint=bundle.fingerprint)


def default_cache_dir() -> Path:
    import os

    env = os.environ.get("PAGCTL_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "pagctl"


def setup(spec: RunSpec, device: torch.device, *, build_plugins: bool = True,
          cache_dir: Path | None = None, trust: CodeTrust = UNTRUSTED) -> Setup:
    """Load data, build the model and validate (and optionally build) the plugins.
    ``trust``: whether ``model.arch`` may name code to import (`pagctl.trust`)."""
    import torch

    from pagctl import registry
    from pagctl.data import load_data, split_validation, subset_digest
    from pagctl.models import build_model, timm_config, twice_differentiable
    from pagctl.protocols import disables_pag

    bundle = load_data(spec.data)
    if len(bundle.train) == 0 and spec.data.dataset == "tensors":  # type: ignore[arg-type]
        raise DataError(f"data.root: {spec.data.root} has no training split; training needs "
                        "the arrays 'x_train' and 'y_train' in the file besides 'x' and 'y'")
    if len(bundle.train) == 0:  # type: ignore[arg-type]
        raise DataError(f"data.root: {spec.data.root} has no training images (an evaluation "
                        "set: test/ without train/); training needs DIR/train/<class>/<image>")
    if spec.data.validation_size:
        bundle = split_validation(bundle, spec.data.validation_size, spec.data.split_seed)
    k = spec.train.classes_per_image
    if k > bundle.num_classes:
        raise SpecError(f"train.classes_per_image: K={k} but '{bundle.name}' has "
                        f"{bundle.num_classes} classes; use at most {bundle.num_classes}")
    torch.manual_seed(spec.train.seed)
    model = build_model(spec.model, num_classes=bundle.num_classes,
                        in_chans=bundle.input_shape[0], default_mean=bundle.mean,
                        default_std=bundle.std, trust=trust,
                        allow_download=spec.data.download)
    config = timm_config(model, spec.model, bundle.num_classes, bundle.input_shape[0],
                         bundle.input_shape)
    refs: list[tuple[PluginRef, Any, str]] = [
        (spec.target_gradients, registry.target_gradients, "target_gradients")]
    if spec.train.inner_attack is not None:
        refs.append((spec.train.inner_attack, registry.attacks, "train.inner_attack"))
    if spec.eval.attack is not None:
        refs.append((spec.eval.attack, registry.attacks, "eval.attack"))
    if spec.eval.align_source is not None:
        refs.append((spec.eval.align_source, registry.target_gradients, "eval.align_source"))
    for ref, reg, where in refs:
        try:
            reg.validate_params(ref.name, ref.params, where)
        except UnknownPluginError as exc:  # name the spec field that holds the name
            raise UnknownPluginError(f"{where}.name: {exc}") from None
    source = None
    if build_plugins:
        ctx = build_context(bundle, device, spec.train.seed, cache_dir or default_cache_dir())
        source = registry.target_gradients.build(spec.target_gradients, ctx,
                                                 "target_gradients")
    pag_active = spec.train.pag_weight > 0 and not disables_pag(source) \
        and spec.target_gradients.name != "none"
    if pag_active:
        twice_differentiable(model)  # the PAG loss differentiates input gradients
    test_sha256 = subset_digest(bundle.test, torch.arange(len(bundle.test)))  # type: ignore[arg-type]
    return Setup(spec, device, bundle, model, config, source, pag_active, test_sha256)
