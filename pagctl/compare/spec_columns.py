"""Spec columns: the flattened spec fields that differ across the runs.

An imported run (`pagctl.importing`) has a spec too, but only its model and its evaluation
data are facts: its training fields hold the spec's defaults for a model pagctl did not
train. Its flat spec says so (`IMPORTED` for each of them, `origin` ``imported``), and a
training field is a differing column only where the runs that know it differ."""

from __future__ import annotations

import json
from typing import Any

_SPEC_EXCLUDED = ("name", "description", "out_dir")
_SPEC_HEADERS = {
    "origin": "origin", "model.arch": "arch", "target_gradients.name": "source",
    "train.pag_weight": "λ",
    "train.classes_per_image": "K", "train.epochs": "epochs", "data.dataset": "dataset",
}


IMPORTED = "imported"
"""An imported run's value of a training field: unknown, not the spec's default."""
_TRAINING = ("train.", "target_gradients.", "eval.", "data.batch_size", "data.augment",
             "data.shared_augmentation", "data.crop_padding", "data.validation_size",
             "data.toy_train_size")
"""The fields (or prefixes) that describe how a run was trained, not what it is evaluated
on: how an imported run was trained is not known."""


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}" if prefix else str(key), out)
    else:
        out[prefix] = value


def flat_spec(spec: Any, *, imported: bool = False) -> dict[str, Any]:
    """Every spec field as ``dotted.key: value`` (λ shown as 0 for the ``none`` source),
    without the fields that never describe a difference (name, description, out_dir), and
    ``origin``: ``trained``, or ``imported`` for a run of ``pagctl import``, whose training
    fields are then `IMPORTED` rather than the defaults its spec holds."""
    out: dict[str, Any] = {"origin": IMPORTED if imported else "trained"}
    _flatten(spec.model_dump(mode="json"), "", out)
    for key in _SPEC_EXCLUDED:
        out.pop(key, None)
    if out.get("target_gradients.name") == "none":
        out["train.pag_weight"] = 0.0
    if imported:
        for key in out:
            if key.startswith(_TRAINING):
                out[key] = IMPORTED
    return out


def _unknown(flat: dict[str, Any], key: str) -> bool:
    """Whether ``key`` is a training field of an imported run (whatever its spec holds)."""
    return flat.get("origin") == IMPORTED and key.startswith(_TRAINING)


def differing_fields(flats: list[dict[str, Any]]) -> list[str]:
    """The keys whose values differ across the runs, the usual columns first; an imported
    run's unknown training fields (`IMPORTED`) differ from nothing."""
    order: dict[str, None] = {}
    for flat in flats:
        order.update(dict.fromkeys(flat))
    keys = [k for k in order
            if len({json.dumps(f.get(k, None), sort_keys=True) if k in f else "\0missing"
                    for f in flats if not _unknown(f, k)}) > 1]
    preferred = [k for k in _SPEC_HEADERS if k in keys]
    return preferred + [k for k in keys if k not in _SPEC_HEADERS]


def spec_header(key: str) -> str:
    """A spec column's header: a short name for the usual ones (λ, K, source, ...)."""
    return _SPEC_HEADERS.get(key, key)


def spec_value(flat: dict[str, Any], key: str) -> Any:
    """A run's value of the spec field ``key`` (JSON): None when the run has no such field,
    `IMPORTED` for a training field of an imported run."""
    return IMPORTED if _unknown(flat, key) else flat.get(key)


def spec_cell(flat: dict[str, Any], key: str) -> str:
    """A run's value of the spec field ``key`` as a cell: "-" when the run has no such
    field, `IMPORTED` for a training field of an imported run."""
    if _unknown(flat, key):
        return IMPORTED
    if key not in flat:
        return "-"
    value = flat[key]
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)
