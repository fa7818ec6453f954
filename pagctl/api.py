"""pagctl's Python API: what the commands do, for notebooks and scripts.

Every function here is what a command runs, called with Python values instead of options;
errors are the commands' (`pagctl.errors.PagctlError` subclasses, one line each). A model is
a run folder (a path), a loaded run (`load`), or any ``nn.Module`` that maps [0, 1] pixels
to logits (`wrap` puts a normalisation in front of one that expects normalised inputs).
Data is the run's test set (the default for a run), a `pagctl.data.DataBundle`
(`dataset`), or images and labels as tensors (`tensors`).

    import pagctl.api as pg

    run = pg.load("runs/digits-pag-nn")
    report = pg.attack(run, attack="autoattack", norm="L2", eps=0.5)
    report.robust_accuracy, report.robust_interval, report.reliable
    rows = report.to_records()              # one dict per point: pandas.DataFrame(rows)
    report.per_class()                      # counts per true class
    pg.align_score(run, source="nearest_neighbor").mean
    pg.compare(["runs/digits-vanilla", "runs/digits-pag-nn"]).rows

    my_model = ...                          # any nn.Module taking [0, 1] pixels
    x, y = ...                              # (N, C, H, W) float in [0, 1], (N,) int64
    pg.attack(my_model, (x, y), "pgd_linf", eps=8 / 255).robust_accuracy

Results are not written anywhere: `attack` and `align_score` return reports, whose
``to_record()`` is the line the commands append to a run's metrics.jsonl (`record` does
that append for a run folder's attack reports).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pagctl.errors import FieldError, SpecError

if TYPE_CHECKING:
    from torch import Tensor, nn

    from pagctl.align import AlignReport
    from pagctl.checkpoint import LoadedRun
    from pagctl.compare.model import Comparison
    from pagctl.data import DataBundle
    from pagctl.evaluation.request import EvaluationRequest
    from pagctl.importing import ImportResult
    from pagctl.models import NormalizedModel
    from pagctl.robustness.report import AttackReport
    from pagctl.train import TrainResult

__all__ = ["align_score", "attack", "compare", "dataset", "import_model", "load", "record",
           "tensors", "train", "wrap"]

def load(run: str | Path, *, weights: str = "last", device: str = "cpu",
         trust_code: bool = False) -> LoadedRun:
    """A run folder's model (eval mode, on ``device``), spec and config; ``weights``: last
    (model.safetensors) or best (model-best.safetensors). ``trust_code``: allow an
    architecture the folder names as ``package.module:factory`` to be imported and run (a
    run folder is data; docs: run-folder.md#trust)."""
    from pagctl.build import resolve_device
    from pagctl.checkpoint import load_run
    from pagctl.trust import CodeTrust

    if not isinstance(run, (str, Path)):
        raise FieldError("run", f"expected a run folder's path, got {type(run).__name__}")
    return load_run(Path(run), resolve_device(device), weights=weights,
                    trust=CodeTrust.of(trust_code))


def wrap(module: nn.Module, *, mean: Sequence[float] | None = None,
         std: Sequence[float] | None = None) -> NormalizedModel:
    """``module`` behind a per-channel normalisation ``(x - mean) / std`` (both or neither;
    neither: the identity, for a module that takes [0, 1] pixels)."""
    from torch import nn

    from pagctl.models import NormalizedModel

    if not isinstance(module, nn.Module):
        raise FieldError("module", f"expected a torch.nn.Module, got {type(module).__name__}")
    if (mean is None) != (std is None):
        raise FieldError("mean" if mean is None else "std", "give mean and std together, or "
                         "neither")
    if mean is None or std is None:
        return NormalizedModel(module, [0.0], [1.0])
    import math

    try:
        values = [float(v) for v in mean], [float(v) for v in std]
    except (TypeError, ValueError):
        raise FieldError("mean", "expected numbers, one per channel") from None
    if not all(math.isfinite(v) for v in (*values[0], *values[1])):
        raise FieldError("std", "expected finite numbers, one per channel")
    try:
        return NormalizedModel(module, *values)
    except ValueError as exc:
        raise FieldError("std", f"{exc}; give one positive number per channel") from None


def dataset(name: str = "digits", *, root: str | Path | None = None,
            **fields: Any) -> DataBundle:
    """A dataset as `pagctl.data.load_data` loads it for a spec's ``data`` section
    (``name`` is ``data.dataset``; ``fields`` are other ``data`` fields, e.g.
    ``split_seed``)."""
    from pydantic import ValidationError

    from pagctl.data import load_data
    from pagctl.spec import DataSpec, format_validation_error

    try:
        spec = DataSpec(dataset=name, root=root, **fields)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = format_validation_error(exc, model=DataSpec).splitlines()
        raise SpecError("\n".join(line.replace("dataset:", "name:", 1) for line in lines)) \
            from None
    return load_data(spec)


def tensors(images: Any, labels: Any, *, num_classes: int | None = None,
            name: str = "tensors") -> DataBundle:
    """Images (N, C, H, W) in [0, 1] (float, or uint8 0..255) and integer labels (N,), as
    tensors or numpy arrays, as an evaluation set: the test split is these points, the
    training split is empty (attacks need none; a target-gradient source that needs
    training images refuses it). ``num_classes`` defaults to the largest label + 1.
    FieldError (one line) for anything else: other shapes or dtypes, no image, pixels
    outside [0, 1] or not finite, labels outside the classes."""
    from pagctl.data import DataBundle, TensorImageDataset, validate_tensors
    from pagctl.data.tensor_file import as_image_pair

    try:
        x, y = as_image_pair(_tensor("images", images), _tensor("labels", labels))
    except ValueError as exc:
        field, _, detail = str(exc).partition(": ")
        raise FieldError(field, detail) from None
    if num_classes is None:
        classes = int(y.max()) + 1
        if classes > MAX_CLASSES:
            raise FieldError("labels", f"a label is {classes - 1}, more classes than "
                             f"{MAX_CLASSES:,}; check the labels, or give num_classes")
    elif isinstance(num_classes, bool) or not isinstance(num_classes, int) \
            or not 1 <= num_classes <= MAX_CLASSES:
        raise FieldError("num_classes", f"expected a whole number from 1 to {MAX_CLASSES}, "
                         f"got {num_classes!r}")
    else:
        classes = num_classes
    validate_tensors(x, y, num_classes=classes, name=name)
    test = TensorImageDataset(x, y)
    c = int(x.shape[1])
    empty = TensorImageDataset(x[:0], y[:0])
    return DataBundle(train=empty, test=test, num_classes=classes,
                      input_shape=test.input_shape, mean=(0.0,) * c, std=(1.0,) * c,
                      name=name, class_names=tuple(str(i) for i in range(classes)))


MAX_CLASSES = 100_000
"""The most classes `tensors` takes (ImageNet-21k has about 21,000)."""


def _tensor(field: str, value: Any) -> Tensor:
    """A tensor or numpy array as a CPU tensor; FieldError naming ``field`` otherwise."""
    import numpy as np
    import torch

    if isinstance(value, torch.Tensor):
        if value.device.type == "meta":
            raise FieldError(field, "a tensor on the meta device holds no values")
        return value.detach().cpu()
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise FieldError(field, "expected a numeric array, got dtype object")
        return torch.from_numpy(np.ascontiguousarray(value))
    raise FieldError(field, f"expected a torch.Tensor or numpy array, got "
                     f"{type(value).__name__}")


def _model_and_data(model: Any, data: Any, device: str, weights: str,
                    trust_code: bool) -> tuple[Any, DataBundle, Any]:
    """(the module, the data, the device) for a model given as a path, a loaded run or a
    module, and data given as None (the run's test set), a bundle or (x, y)."""
    from torch import nn

    from pagctl.build import resolve_device
    from pagctl.checkpoint import LoadedRun
    from pagctl.data import DataBundle, load_data
    from pagctl.provenance import check_test_images

    dev = resolve_device(device)
    if isinstance(model, (str, Path)):
        model = load(model, weights=weights, device=str(dev), trust_code=trust_code)

    module: nn.Module
    if isinstance(model, LoadedRun):
        bundle = None
        if data is None:  # the run's own test set, checked to be the one it was made with
            bundle = load_data(model.spec.data)
            check_test_images(model.run_dir, bundle, model.weights)
        module = model.model
    elif isinstance(model, nn.Module):
        bundle, module = None, model
    else:
        raise FieldError("model", f"expected a run folder, a loaded run or a torch.nn.Module, "
                         f"got {type(model).__name__}")
    if data is None and bundle is None:
        raise FieldError("data", "a module has no test set of its own; pass a dataset "
                         "(pagctl.api.dataset) or images and labels (pagctl.api.tensors)")
    if bundle is None:
        if isinstance(data, DataBundle):
            bundle = data
        elif isinstance(data, (tuple, list)) and len(data) == 2:
            bundle = tensors(*data)
        else:
            raise FieldError("data", f"expected a DataBundle or (images, labels), got "
                             f"{type(data).__name__}")
    return module.to(dev), bundle, dev


def attack(model: Any, data: Any = None, attack: str = "autoattack", *,
           eps: float | str | None = None, norm: str | None = None,
           params: dict[str, Any] | None = None, eps_sweep: Sequence[float] | None = None,
           indices: Sequence[int] | Tensor | None = None, limit: int | None = None,
           seed: int = 0, batch_size: int = 256, device: str = "cpu",
           probes: bool = True, probe_size: int = 100, weights: str = "last",
           progress: bool = False, shard: tuple[int, int] | None = None,
           merge_shards: int | None = None, shard_dir: str | Path | None = None,
           precision: str = "float32", keep_adversarial: bool = False,
           save_adversarial: str | Path | None = None,
           trust_code: bool = False) -> AttackReport | list[AttackReport]:
    """Attack ``model`` on ``data`` as ``pagctl attack`` does: clean and robust accuracy with
    95% intervals, what each stage broke and cost, per-example and per-class results, and
    the reliability verdict of the gradient-masking probes (``report.reliable``).

    ``attack`` is a registered attack (``pagctl plugins``); ``eps`` (a number or "8/255"),
    ``norm`` ("linf", "l2"; also "l1" for APGD, FAB, Square and AutoAttack; any case; none
    for ``sparse_rs``, whose ``eps`` is a number of pixels, an ``l0`` budget) and
    ``params`` are its parameters. With ``eps_sweep`` the result is one report per budget,
    else one report. ``weights`` chooses a run's weights when ``model`` is a path.
    ``shard=(i, N)`` runs shard i of N only (a partial report, no verdict) and
    ``merge_shards=N`` merges N finished shards into the whole evaluation's report, as
    ``--shard`` / ``--merge-shards`` do; the shards live in ``shard_dir`` (default: the
    run folder's ``shards/`` when ``model`` is a path). ``precision="bfloat16"`` runs the
    model's forward under bfloat16 autocast (opt-in; marked in the report).
    ``keep_adversarial=True`` keeps every point's adversarial example:
    ``report.adversarial`` (`pagctl.robustness.adversarial.AdversarialExamples`) hands them
    out in batches (``.batches(256)``: indices, x, x_adv, y and the per-point results), as
    one tensor (``.x_adv()``), or as a file (``.save(path)``); above 256 MiB they live in a
    memory-mapped temporary file, not in memory. ``save_adversarial`` writes that file
    itself, as ``pagctl attack --save-adversarial`` does (``-eps<i>`` before the suffix with
    a sweep). ``trust_code``: as for `load`."""

    from pagctl import registry
    from pagctl.robustness.evaluate import AttackJob, evaluate_attack

    given = _params(params)
    for key, value in (("eps", eps), ("norm", norm)):
        if value is not None:
            given[key] = value
    request = _request(model, indices=indices, limit=limit, batch_size=batch_size,
                       seed=seed, device=device, progress=progress, shard=shard,
                       merge_shards=merge_shards, shard_dir=shard_dir, precision=precision)
    request.check(probe_size)
    keep = keep_adversarial or save_adversarial is not None
    if keep and (shard is not None or merge_shards is not None):
        raise FieldError("keep_adversarial" if keep_adversarial else "save_adversarial",
                         "a shard or a merge of shards keeps no adversarial example; "
                         "evaluate whole to keep them")
    out = None
    if save_adversarial is not None:
        from pagctl.robustness.adversarial import adversarial_file

        out = adversarial_file(save_adversarial)
    job = AttackJob(attack, registry.attacks.validate_params(attack, given, "params"),
                    budgets=eps_sweep, probes=probes, probe_size=probe_size)
    module, bundle, dev = _model_and_data(model, data, device, weights, trust_code)
    if keep:
        job = replace(job, keep_images=len(bundle.test))  # type: ignore[arg-type]
    reports, _ = evaluate_attack(module, bundle, job, request.part(device=dev))
    if out is not None:
        from pagctl.robustness.adversarial import numbered

        for i, report in enumerate(reports):
            assert report.adversarial is not None
            report.adversarial.save(numbered(out, i, len(reports)), {
                "attack": report.attack, "norm": str(report.norm), "eps": str(report.eps)})
    return reports if eps_sweep is not None else reports[0]


def align_score(model: Any, data: Any = None, source: str = "nearest_neighbor", *,
                params: dict[str, Any] | None = None, classes_per_image: int | None = None,
                indices: Sequence[int] | Tensor | None = None, limit: int | None = None,
                seed: int = 0, batch_size: int = 256, device: str = "cpu",
                weights: str = "last", shard: tuple[int, int] | None = None,
                merge_shards: int | None = None, shard_dir: str | Path | None = None,
                trust_code: bool = False) -> AlignReport | None:
    """How well ``model``'s input gradients align with a target-gradient ``source``, as
    ``pagctl align-score`` measures it: mean cosine with a 95% interval, per true class and
    per target. Sources that need training images need a dataset that has them.
    ``classes_per_image`` defaults to the run's K, or all classes for a module.
    ``shard=(i, N)`` scores shard i of N only (returns None) and ``merge_shards=N`` merges N
    finished shards into the whole score's report, as ``--shard`` / ``--merge-shards`` do;
    the shards live in ``shard_dir`` (default: the run folder's ``shards/`` when ``model``
    is a path). ``trust_code``: as for `load`."""

    from pagctl import registry
    from pagctl.align import AlignmentJob, evaluate_alignment
    from pagctl.checkpoint import LoadedRun

    request = _request(model, indices=indices, limit=limit, batch_size=batch_size,
                       seed=seed, device=device, progress=False, shard=shard,
                       merge_shards=merge_shards, shard_dir=shard_dir)
    request.check()
    validated = registry.target_gradients.validate_params(source, _params(params), "params")
    run = load(model, weights=weights, device=device, trust_code=trust_code) \
        if isinstance(model, (str, Path)) else model
    module, bundle, dev = _model_and_data(run, data, device, weights, trust_code)
    if classes_per_image is None:
        k = run.spec.train.classes_per_image if isinstance(run, LoadedRun) else \
            bundle.num_classes
        k = min(k, bundle.num_classes)
    else:
        k = classes_per_image
    return evaluate_alignment(module, bundle, AlignmentJob(source, validated, k),
                              request.part(device=dev))


def _params(params: Any) -> dict[str, Any]:
    """A plugin's ``params`` as given (a mapping, or None for the defaults)."""
    from collections.abc import Mapping

    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise FieldError("params", f"expected a dict of parameter values, got "
                         f"{type(params).__name__}")
    return dict(params)


def _request(model: Any, *, shard: tuple[int, int] | None, merge_shards: int | None,
             shard_dir: str | Path | None, **settings: Any) -> EvaluationRequest:
    """The evaluation request of the API's keywords; the shards of a run folder live in its
    ``shards/`` unless ``shard_dir`` says otherwise. FieldError for a sharded evaluation of
    a module without ``shard_dir``, or a ``shard_dir`` that is a file (the rest is checked
    with every evaluation's request, `EvaluationRequest.check`)."""
    from pagctl.checkpoint import SHARDS_DIR, confined
    from pagctl.evaluation.request import EvaluationRequest

    folder = None
    if shard is not None or merge_shards is not None:
        if shard_dir is None and not isinstance(model, (str, Path)):
            raise FieldError("shard_dir", "the shards need a folder when the model is not a "
                             "run folder; give shard_dir=...")
        if shard_dir is not None and Path(shard_dir).exists() and not Path(shard_dir).is_dir():
            raise FieldError("shard_dir", f"{shard_dir} is a file; give a folder")
        folder = Path(shard_dir) if shard_dir is not None else confined(Path(model),
                                                                        SHARDS_DIR)
    return EvaluationRequest(shard=shard, merge_shards=merge_shards, shard_dir=folder,
                             **settings)


def record(run: str | Path, reports: AttackReport | AlignReport
           | Sequence[AttackReport | AlignReport], *,
           params_given: dict[str, Any] | None = None, weights: str = "last",
           data_dir: str | Path | None = None, trust_code: bool = False) -> None:
    """Append attack or alignment ``reports`` to the run folder's metrics.jsonl, as
    ``pagctl attack`` and ``pagctl align-score`` do, so that ``compare`` shows them
    (``weights``: which of the run's weights they measured; ``params_given``: the
    parameters as typed, e.g. eps "8/255"; ``data_dir``: where the run's data lives, as
    ``--data-dir``). Only a report of this run's model (those ``weights``, its normalisation)
    on this run's test images is recorded (`pagctl.provenance.record_measurements`): a
    report of another model, other images or no point is refused with one line, and then
    none of ``reports`` is recorded. ``trust_code``: as for `load` (the folder's model is
    rebuilt to check the report against it)."""
    from pydantic import ValidationError

    from pagctl.provenance import Measurement, record_measurements
    from pagctl.trust import CodeTrust

    if not isinstance(run, (str, Path)):
        raise FieldError("run", f"expected a run folder's path, got {type(run).__name__}")
    items = [reports] if not isinstance(reports, Sequence) else list(reports)
    measurements = []
    for report in items:
        indices = getattr(report, "indices", None)
        if not hasattr(report, "to_record") or indices is None:
            raise SpecError(f"record: {type(report).__name__} is not a report of "
                            "pagctl.api.attack or pagctl.api.align_score")
        try:
            rec = report.to_record(params_given=params_given)
        except ValidationError as exc:  # a report whose numbers were changed by hand
            first = exc.errors()[0]
            raise FieldError("reports", "a report that contradicts itself: "
                             f"{str(first['msg']).removeprefix('Value error, ')}") from None
        rec.weights = weights
        measurements.append(Measurement(rec, indices))
    record_measurements(Path(run), measurements, weights=weights,
                        data_dir=None if data_dir is None else Path(data_dir),
                        trust=CodeTrust.of(trust_code))


def compare(runs: Sequence[str | Path], *, strict: bool = False,
            weights: str = "last") -> Comparison:
    """Runs side by side as ``pagctl compare`` puts them (reads spec.json and metrics.jsonl,
    never weights); ``render(comparison, "markdown")`` of `pagctl.compare.rendering` prints
    it. Mismatched columns are marked; ``strict`` refuses them."""
    from pagctl.compare.build import compare_runs

    if isinstance(runs, (str, Path)):
        runs = [runs]  # one run folder
    return compare_runs([Path(r) for r in runs], strict=strict, weights=weights)


def train(spec: str | Path, *, overrides: Sequence[str] = (), device: str = "auto",
          resume: bool = False, overwrite: bool = False, progress: bool = False,
          trust_code: bool = False) -> TrainResult:
    """Train a spec (a file or a built-in name, with ``KEY=VALUE`` overrides as ``--set``
    takes them) into its run folder, as ``pagctl train`` does; in a script that torchrun
    launched, data-parallel over its processes as well (docs: distributed.md). An
    architecture named ``package.module:factory`` runs when given in ``overrides``
    (``"model.arch=pkg.mod:make"``), or, named in the spec file, with ``trust_code``."""
    import pagctl.train
    from pagctl.distributed.launch import training_launch
    from pagctl.spec import load_spec
    from pagctl.trust import CodeTrust, named_architectures

    return pagctl.train.train(load_spec(spec, list(overrides)), device=device, resume=resume,
                     overwrite=overwrite, progress=progress, launch=training_launch(),
                     trust=CodeTrust.of(trust_code, named_architectures(overrides)))


def import_model(out: str | Path, model: str, dataset: str, *,
                 checkpoint: str | Path | None = None, trust_pickle: bool = False,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 kwargs: dict[str, Any] | None = None, root: str | Path | None = None,
                 overwrite: bool = False, device: str = "cpu",
                 threat_model: str | None = None, model_dir: str | Path | None = None,
                 ) -> ImportResult:
    """Write the run folder ``out`` for a model pagctl did not train, as ``pagctl import``
    does (docs: own-models.md): ``model`` a timm name, a model provider,
    ``package.module:factory`` or ``robustbench:<name>`` (a RobustBench zoo entry of
    ``dataset`` and ``threat_model``, Linf by default, its weights read from RobustBench's
    cache ``model_dir``, ``./models`` by default); ``dataset`` the data it is evaluated
    on."""
    import pagctl.importing
    from pagctl.robustbench_zoo import is_zoo_name, zoo_kwargs
    from pagctl.trust import CodeTrust

    if not isinstance(model, str):
        raise FieldError("model", f"expected an architecture's name (a timm name, a model "
                         f"provider or package.module:factory), got {type(model).__name__}")
    values: dict[str, Any] = {"model.arch": model, "model.kwargs": dict(kwargs or {}),
                              "data.dataset": dataset, "out_dir": Path(out)}
    if is_zoo_name(model):
        values["model.kwargs"] = {**zoo_kwargs(dataset, threat_model), **values["model.kwargs"]}
    elif threat_model is not None:
        raise FieldError("threat_model", "names a RobustBench zoo entry's threat model; give "
                         "it with model='robustbench:<name>'")
    if root is not None:
        values["data.root"] = Path(root)
    if mean is not None:
        values["model.mean"] = list(mean)
    if std is not None:
        values["model.std"] = list(std)
    path = None if checkpoint is None else Path(checkpoint)
    return pagctl.importing.import_model(
        pagctl.importing.import_spec(None, values, checkpoint=path), path,
        trust_pickle=trust_pickle, overwrite=overwrite, device=device,
        trust=CodeTrust.of(named=[model]),
        model_dir=None if model_dir is None else Path(model_dir))
