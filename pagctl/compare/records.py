"""The tolerant metrics reader: usable ``metrics.jsonl`` records and one warning per
skipped line."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _prob(v: Any) -> bool:
    return _is_num(v) and 0.0 <= v <= 1.0


def _cos(v: Any) -> bool:
    return _is_num(v) and -1.0 - 1e-6 <= v <= 1.0 + 1e-6


def _pair_of(check: Any) -> Any:
    return lambda v: isinstance(v, list) and len(v) == 2 and all(check(x) for x in v)


def _subset(v: Any) -> bool:
    return isinstance(v, dict) and isinstance(v.get("indices_sha256", ""), str) and \
        (v.get("count") is None or _is_int(v.get("count")))


_TYPES = {  # checker, description
    "str": (lambda v: isinstance(v, str), "a string"),
    "int": (_is_int, "a non-negative integer"),
    "anyint": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "num": (_is_num, "a finite number"),
    "prob": (_prob, "a number in [0, 1]"),
    "cos": (_cos, "a number in [-1, 1]"),
    "dict": (lambda v: isinstance(v, dict), "an object"),
    "prob2": (_pair_of(_prob), "[low, high] in [0, 1]"),
    "cos2": (_pair_of(_cos), "[low, high] in [-1, 1]"),
    "subset": (_subset, "a subset object"),
}
_SCHEMA: dict[str, tuple[dict[str, str], dict[str, str]]] = {  # kind: (required, optional)
    "train_epoch": ({"epoch": "int"},
                    {"clean_accuracy": "prob", "robust_accuracy": "prob", "alignment": "cos",
                     "n_test": "int", "monitor": "dict"}),
    "attack": ({"attack": "str", "n": "int", "robust_accuracy": "prob"},
               {"clean_accuracy": "prob", "norm": "str", "eps": "num", "clean_correct": "int",
                "robust_correct": "int", "clean_interval": "prob2", "robust_interval": "prob2",
                "subset": "subset", "per_example": "dict", "reliability": "dict",
                "params": "dict", "seed": "anyint"}),
    "align": ({"source": "str", "n": "int", "mean": "cos"},
              {"interval": "cos2", "subset": "subset", "classes_per_image": "int",
               "source_params": "dict", "fraction_positive": "prob", "seed": "anyint"}),
}


def _problem(rec: Any) -> str | None:
    """Why a parsed line cannot be used, or None."""
    if not isinstance(rec, dict):
        return f"a JSON {type(rec).__name__}, not an object"
    kind = rec.get("kind")
    if not isinstance(kind, str):
        return "no 'kind' field"
    if kind not in _SCHEMA:
        return None
    required, optional = _SCHEMA[kind]
    for name, typ in [*required.items(), *optional.items()]:
        value = rec.get(name)
        if value is None:
            if name in required:
                return f"{kind} record without '{name}'"
            continue
        check, desc = _TYPES[typ]
        if not check(value):
            return f"{kind} field '{name}' is {json.dumps(value)[:40]}, expected {desc}"
    return None


def read_records(run_dir: Path) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    """(line number, record) of every usable line of ``run_dir/metrics.jsonl``, and one
    warning per skipped line. A missing file is an empty list; nothing raises."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return [], []
    try:
        data = path.read_bytes()
    except OSError as exc:
        return [], [f"warning: {path}: unreadable ({exc.strerror or exc}); its metrics are "
                    "skipped"]
    records: list[tuple[int, dict[str, Any]]] = []
    warnings: list[str] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            problem: str | None = "not valid UTF-8"
        except (json.JSONDecodeError, RecursionError):
            problem = "not valid JSON"
        else:
            problem = _problem(rec)
        if problem is not None:
            warnings.append(f"warning: {path} line {number}: {problem}; skipped")
            continue
        if rec.get("kind") == "attack":
            _check_bits(rec, path, number, warnings)
        records.append((number, rec))
    return records, warnings


def _check_bits(rec: dict[str, Any], path: Path, number: int, warnings: list[str]) -> None:
    """Drop ``per_example`` (keeping the record) unless its robust bits are n bits of hex."""
    per = rec.get("per_example")
    if per is None:
        return
    text = per.get("robust")
    ok = isinstance(text, str) and len(text) == 2 * ((rec["n"] + 7) // 8)
    if ok and text:
        try:
            int(text, 16)
        except ValueError:
            ok = False
    if not ok:
        warnings.append(f"warning: {path} line {number}: per_example.robust is not "
                        f"{rec['n']} bits of hex; per-example comparison skipped")
        rec["per_example"] = None


def _bits(text: str, n: int) -> int:
    """Hex bit string (``pagctl.attack.pack_bits``) as an int, point 0 in bit n - 1."""
    if n == 0:
        return 0
    return int(text, 16) >> (4 * len(text) - n)
