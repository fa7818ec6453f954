"""RobustBench's model zoo as a source of architectures: ``model.arch = "robustbench:<name>"``.

A zoo entry is named by its ``<name>`` (``Carmon2019Unlabeled``), its dataset (``cifar10``,
``cifar100``) and its threat model (``Linf``, ``L2``); the last two travel as
``model.kwargs.dataset`` and ``model.kwargs.threat_model`` (`zoo_kwargs`), so a run folder's
spec and config.json name the entry completely. The network is the zoo's own constructor
(its ``model`` callable), imported from the installed ``robustbench`` package: code the user
installed and named, trusted as timm's architectures are (`pagctl.trust`). Building it
fetches nothing; the weights come from a file.

Where the weights are: RobustBench's cache, ``<model_dir>/<dataset>/<threat_model>/<name>.pt``
(`cache_file`; ``model_dir`` is ``./models`` by default, as in RobustBench's ``load_model``).
pagctl never downloads it: an absent file is refused with the call that fetches it
(``robustbench.utils.load_model``) and its Google Drive id. The file is read as
``load_model`` reads it (`zoo_state_dict`): the state dict under ``state_dict`` (or, for
the entries that keep two, under ``last``), else the file itself, with a ``module.`` and
then a ``model.`` prefix removed from each key; but with ``torch.load(weights_only=True)``
only (tensors and plain containers; nothing in the file runs).

Zoo models take [0, 1] pixels and normalise inside, so pagctl's own normalisation in front
of them is the identity (`pagctl.importing.import_normalisation`).

``import robustbench`` fails where its git-only ``autoattack`` dependency is missing (the
package's ``__init__`` imports it); the zoo itself does not need it, so `_model_dicts`
imports the zoo under a bare ``robustbench`` package module in that case (nothing else is
changed), and imports the package as it is otherwise.
"""

from __future__ import annotations

import difflib
import importlib.util
import sys
import types
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pagctl.errors import CheckpointError, SpecError

if TYPE_CHECKING:
    from torch import Tensor, nn

PREFIX = "robustbench:"
DATASETS = ("cifar10", "cifar100")
"""The zoo's datasets that pagctl reads (its ImageNet entries need ImageNet's preprocessing)."""
THREAT_MODELS = ("Linf", "L2")
DEFAULT_MODEL_DIR = Path("models")
"""RobustBench's default ``model_dir`` (``./models``)."""
INSTALL = "pip install 'pagctl[robustbench]'"


def is_zoo_name(arch: str) -> bool:
    """Whether ``arch`` names a RobustBench zoo entry (``robustbench:<name>``)."""
    return arch.startswith(PREFIX)


def zoo_kwargs(dataset: str, threat_model: str | None) -> dict[str, str]:
    """The ``model.kwargs`` that name a zoo entry besides its name: the dataset (the data
    evaluated on, when it is one of the zoo's; with your own, e.g. ``tensors``, the entry's
    dataset is ``model.kwargs.dataset``, given apart) and the threat model (Linf when not
    given, as RobustBench's ``load_model`` has it)."""
    named = {"dataset": dataset} if dataset in DATASETS else {}
    return {**named, "threat_model": threat_model or "Linf"}


def _model_dicts() -> Any:
    """RobustBench's ``model_dicts`` (dataset → threat model → name → entry); SpecError
    naming the install command when the package is not installed."""
    if "robustbench" not in sys.modules:
        found = importlib.util.find_spec("robustbench")
        if found is None or not found.submodule_search_locations:
            raise SpecError(f"model.arch: robustbench: models need RobustBench's model zoo, "
                            f"which is not installed; {INSTALL}")
        if importlib.util.find_spec("autoattack") is None:
            # its __init__ imports autoattack (git-only), which the zoo does not need
            bare = types.ModuleType("robustbench")
            bare.__path__ = list(found.submodule_search_locations)
            sys.modules["robustbench"] = bare
    with warnings.catch_warnings():  # deprecations of its imports, nothing of ours
        warnings.simplefilter("ignore")
        from robustbench.model_zoo import model_dicts

    return model_dicts


def zoo_entry(name: str, dataset: str, threat_model: str) -> dict[str, Any]:
    """The zoo's entry (``model``: its constructor, ``gdrive_id``) for ``name``; SpecError
    naming the field for a dataset, threat model or name the zoo does not have."""
    if dataset not in DATASETS:
        raise SpecError(f"model.kwargs.dataset: '{dataset}' is not a RobustBench dataset pagctl "
                        f"reads; use one of {', '.join(DATASETS)}")
    if threat_model not in THREAT_MODELS:
        raise SpecError(f"model.kwargs.threat_model: '{threat_model}' is not one of "
                        f"{', '.join(THREAT_MODELS)} (--threat-model)")
    model_dicts = _model_dicts()
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    models = model_dicts[BenchmarkDataset(dataset)].get(ThreatModel(threat_model), {})
    if name not in models:
        close = difflib.get_close_matches(name, list(models), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise SpecError(f"model.arch: RobustBench's zoo has no '{name}' for {dataset} "
                        f"{threat_model}{hint} (robustbench.model_zoo lists {len(models)})")
    entry: dict[str, Any] = dict(models[name])
    return entry


def zoo_dataset(kwargs: Mapping[str, Any]) -> str:
    """The zoo dataset an entry's ``model.kwargs`` name; SpecError naming the field, and
    how to give it, when they name none."""
    if "dataset" not in kwargs:
        raise SpecError("model.kwargs.dataset: a robustbench: model needs its zoo dataset "
                        f"({', '.join(DATASETS)}); evaluated on your own data (--dataset "
                        "tensors), name it with --set model.kwargs.dataset=cifar10")
    return str(kwargs["dataset"])


def create_zoo_network(arch: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """The zoo entry's network, freshly initialised (its weights come from a file). SpecError
    for other keywords than ``dataset`` and ``threat_model``, or an ensemble entry (several
    checkpoints: pagctl imports one)."""
    from torch import nn

    extra = sorted(set(kwargs) - {"dataset", "threat_model"})
    if extra:
        raise SpecError(f"model.kwargs.{extra[0]}: not an argument of a RobustBench zoo entry "
                        "(it takes dataset and threat_model); remove it")
    name = arch.removeprefix(PREFIX)
    entry = zoo_entry(name, zoo_dataset(kwargs), str(kwargs.get("threat_model", "Linf")))
    if isinstance(entry.get("gdrive_id"), list):
        raise SpecError(f"model.arch: {arch} is an ensemble of {len(entry['gdrive_id'])} "
                        "checkpoints in RobustBench's zoo; pagctl imports single models only")
    net = entry["model"]()
    if not isinstance(net, nn.Module):
        raise SpecError(f"model.arch: {arch}'s zoo constructor returned "
                        f"{type(net).__name__}, not a torch.nn.Module")
    return net


def cache_file(arch: str, kwargs: Mapping[str, Any], model_dir: Path | None) -> Path:
    """Where RobustBench keeps the entry's weights: ``<model_dir>/<dataset>/<threat_model>/
    <name>.pt``. CheckpointError (one line: the file expected and how to fetch it) when it
    is not there; pagctl never downloads it."""
    name = arch.removeprefix(PREFIX)
    dataset = zoo_dataset(kwargs)
    threat_model = str(kwargs.get("threat_model", "Linf"))
    root = DEFAULT_MODEL_DIR if model_dir is None else model_dir
    path = root / dataset / threat_model / f"{name}.pt"
    if not path.is_file():
        gdrive = zoo_entry(name, dataset, threat_model).get("gdrive_id")
        where = f" (Google Drive id {gdrive})" if isinstance(gdrive, str) else ""
        raise CheckpointError(
            f"model_dir: {path}: no such file; fetch it with RobustBench "
            f"(robustbench.utils.load_model('{name}', model_dir='{root}', "
            f"dataset='{dataset}', threat_model='{threat_model}'){where}), or give "
            "the folder that holds it; pagctl does not download")
    return path


def _strip(keys: dict[str, Any], prefix: str) -> tuple[dict[str, Any], bool]:
    stripped = {k.removeprefix(prefix): v for k, v in keys.items()}
    return stripped, any(k.startswith(prefix) for k in keys)


def zoo_state_dict(obj: Any, path: Path) -> tuple[dict[str, Tensor], str | None,
                                                 str | None]:
    """The state dict in ``obj``, a zoo checkpoint ``path`` as ``torch.load(weights_only=
    True)`` read it (`pagctl.importing` reads it), found as RobustBench's ``load_model``
    finds it (module docstring): (the tensors, the container it was found in, the prefixes
    stripped from its names). CheckpointError (one line) when it holds no state dict."""
    import torch

    container = None
    if isinstance(obj, dict) and isinstance(obj.get("last"), dict) and "state_dict" not in obj:
        obj, container = obj["last"], "last"
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj, container = obj["state_dict"], ("last.state_dict" if container else "state_dict")
    if not (isinstance(obj, dict) and obj and
            all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())):
        raise CheckpointError(f"model_dir: {path} holds no state dict (expected one under "
                              "'state_dict', as RobustBench's files have it); fetch it again")
    tensors, module = _strip(dict(obj), "module.")
    tensors, model = _strip(tensors, "model.")
    prefixes = [p for p, found in (("module.", module), ("model.", model)) if found]
    return tensors, container, "+".join(prefixes) or None
