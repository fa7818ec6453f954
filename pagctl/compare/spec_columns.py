"""Spec columns: the flattened spec fields that differ across the runs."""

from __future__ import annotations

import json
from typing import Any

_SPEC_EXCLUDED = ("name", "description", "out_dir")
_SPEC_HEADERS = {
    "model.arch": "arch", "target_gradients.name": "source", "train.pag_weight": "λ",
    "train.classes_per_image": "K", "train.epochs": "epochs", "data.dataset": "dataset",
}


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}" if prefix else str(key), out)
    else:
        out[prefix] = value


def flat_spec(spec: Any) -> dict[str, Any]:
    """Every spec field as ``dotted.key: value`` (λ shown as 0 for the ``none`` source),
    without the fields that never describe a difference (name, description, out_dir)."""
    out: dict[str, Any] = {}
    _flatten(spec.model_dump(mode="json"), "", out)
    for key in _SPEC_EXCLUDED:
        out.pop(key, None)
    if out.get("target_gradients.name") == "none":
        out["train.pag_weight"] = 0.0
    return out


def differing_fields(flats: list[dict[str, Any]]) -> list[str]:
    """The keys whose values differ across the runs, the usual columns first."""
    order: dict[str, None] = {}
    for flat in flats:
        order.update(dict.fromkeys(flat))
    keys = [k for k in order
            if len({json.dumps(f.get(k, None), sort_keys=True) if k in f else "\0missing"
                    for f in flats}) > 1]
    preferred = [k for k in _SPEC_HEADERS if k in keys]
    return preferred + [k for k in keys if k not in _SPEC_HEADERS]


def spec_header(key: str) -> str:
    """A spec column's header: a short name for the usual ones (λ, K, source, ...)."""
    return _SPEC_HEADERS.get(key, key)


def spec_cell(flat: dict[str, Any], key: str) -> str:
    """A run's value of the spec field ``key`` as a cell: "-" when the run has no such
    field."""
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
