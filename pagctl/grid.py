"""A grid of runs: one spec, some of its fields swept over lists of values, each combination
a run of its own in a folder named after its values.

``pagctl train SPEC --grid train.pag_weight=0,0.5,1 --grid target_gradients.name=class_mean,
nearest_neighbor`` expands to the Cartesian product of the value lists, in the order given
(the last key varies fastest). Point ``i`` is the spec with ``--set`` applied, then its grid
values (parsed as YAML, as ``--set`` values are); its run folder is
``ROOT/<key>=<value>__<key>=<value>…`` under the grid's root (``--out``, else
``runs/<spec name>-grid``). Every point is validated, and every folder checked, before any
run starts: an unknown key, an empty value list, a value one point's spec refuses, two
points with one folder name or one spec, or a folder holding another spec's run is refused
with one line naming the point.

A point's `status` decides what running the grid does with it: ``new`` starts it,
``partial`` (interrupted after a saved state) resumes it, ``unsaved`` (stopped before its
first state) starts it again, ``finished`` skips it. So the same grid command, run again,
finishes what is left, and ``--grid-point I`` runs one point the same way (a scheduler's
array job, or a torchrun launch).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pagctl.checkpoint import LOCK_FILE, STATE_FILE, read_run_spec, read_state_counters
from pagctl.errors import SpecError
from pagctl.spec import RunSpec, load_spec

Status = Literal["new", "partial", "unsaved", "finished"]

_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")


@dataclass(frozen=True)
class GridPoint:
    """One run of a grid: its position, its (key, value text) pairs and its spec (whose
    ``out_dir`` is the point's folder)."""

    index: int
    values: tuple[tuple[str, str], ...]
    spec: RunSpec

    @property
    def label(self) -> str:
        """``key=value key=value``, for messages."""
        return " ".join(f"{key}={value}" for key, value in self.values)

    @property
    def run_dir(self) -> Path:
        return self.spec.run_dir


def parse_axes(items: list[str]) -> list[tuple[str, list[str]]]:
    """``--grid KEY=V1,V2,…`` options as (key, value texts); SpecError, naming the option,
    for a missing ``=``, an empty list or value, or a key given twice."""
    axes: list[tuple[str, list[str]]] = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise SpecError(f"--grid: '{item}' is not KEY=V1,V2,… with a dotted key, e.g. "
                            "--grid train.pag_weight=0,0.5,1")
        values = [value.strip() for value in raw.split(",")]
        if not raw.strip() or any(not value for value in values):
            raise SpecError(f"--grid {key}: give a non-empty, comma-separated list of values "
                            f"(got '{raw}'), e.g. --grid {key}=0,0.5,1")
        if key in (k for k, _ in axes):
            raise SpecError(f"--grid {key}: given twice; list all its values in one --grid")
        axes.append((key, values))
    return axes


def folder_name(values: tuple[tuple[str, str], ...]) -> str:
    """A point's folder name: ``key=value`` pairs joined by ``__``, characters other than
    letters, digits and ``._+-`` in the values replaced by ``_``."""
    return "__".join(f"{key}={_UNSAFE.sub('_', value)}" for key, value in values)


def expand(source: str, overrides: list[str], values: dict[str, Any],
           items: list[str], root: Path | None, *, overwrite: bool = False) -> list[GridPoint]:
    """Every point of the grid ``items`` over the spec ``source`` (with ``overrides`` and
    the typed ``values`` as `pagctl.spec.load_spec` takes them), validated, with its folder
    under ``root`` (None: ``runs/<spec name>-grid``); SpecError (one line naming the point)
    for anything that would stop one of them (module docstring). ``overwrite``: the runs
    will be replaced, so a folder holding another spec's run is no obstacle."""
    axes = parse_axes(items)
    for item in overrides:
        key = item.partition("=")[0].strip()
        clash = next((k for k, _ in axes if k == key or k.startswith(f"{key}.")
                      or key.startswith(f"{k}.")), None)
        if clash is not None:
            raise SpecError(f"--set {key}, --grid {clash}: the grid sets it for every point; "
                            "drop one of them")
    base = load_spec(source, overrides, values)
    root = root if root is not None else Path("runs") / f"{base.name}-grid"
    points: list[GridPoint] = []
    folders: dict[str, GridPoint] = {}
    for index, combo in enumerate(itertools.product(*(vals for _, vals in axes))):
        pairs = tuple(zip((key for key, _ in axes), combo, strict=True))
        name = folder_name(pairs)
        if len(name.encode()) > 255:
            label = " ".join(f"{k}={v}" for k, v in pairs)
            raise SpecError(f"--grid point {index} ({label}): its folder name would have "
                            f"{len(name.encode())} characters, more than a file system "
                            "takes (255); use shorter values")
        try:
            spec = load_spec(source, [*overrides, *(f"{k}={v}" for k, v in pairs)],
                             {**values, "out_dir": root / name})
        except SpecError as exc:
            label = " ".join(f"{k}={v}" for k, v in pairs)
            raise SpecError(f"--grid point {index} ({label}): {exc}") from None
        point = GridPoint(index, pairs, spec)
        if name in folders:
            raise SpecError(f"--grid: points {folders[name].index} ({folders[name].label}) and "
                            f"{index} ({point.label}) would share the folder {root / name}; "
                            "make their values differ in letters or digits")
        folders[name] = point
        points.append(point)
    seen: dict[str, GridPoint] = {}
    for point in points:
        text = point.spec.model_copy(update={"out_dir": None}).model_dump_json()
        if text in seen:
            raise SpecError(f"--grid: points {seen[text].index} ({seen[text].label}) and "
                            f"{point.index} ({point.label}) are the same run; list each "
                            "value once")
        seen[text] = point
    if not overwrite:
        for point in points:
            check_folder(point)
    return points


def status(point: GridPoint) -> Status:
    """What the point's folder holds (module docstring)."""
    return run_status(point.spec)


def run_status(spec: RunSpec) -> Status:
    """What the run folder of ``spec`` holds: nothing (``new``), a run stopped before its
    first saved state (``unsaved``), an interrupted one (``partial``) or one trained for
    all of ``spec.train.epochs`` (``finished``); whose spec it is is not checked here
    (`check_folder`)."""
    run_dir = spec.run_dir
    if not run_dir.is_dir() or not any(p.name != LOCK_FILE for p in run_dir.iterdir()):
        return "new"
    if not (run_dir / STATE_FILE).is_file():
        return "unsaved"
    counters = read_state_counters(run_dir)
    epochs = spec.train.epochs
    done = int(counters.get("epoch", 0)) >= epochs and int(counters.get("step", 0)) == 0
    return "finished" if done else "partial"


def check_folder(point: GridPoint) -> None:
    """SpecError when the point's folder holds a run of another spec (a grid run before with
    other ``--set`` values, or another grid under the same root)."""
    problem = folder_problem(point.spec)
    if problem is not None:
        raise SpecError(f"--grid point {point.index} ({point.label}): {problem}; give "
                        "another --out, or --overwrite to replace the grid's runs")


def folder_problem(spec: RunSpec) -> str | None:
    """Why the run folder of ``spec`` cannot be resumed, restarted or skipped as a run of
    ``spec``: it is a file, or holds a run of another spec (even one stopped before its
    first state); None when it can (or is new)."""
    run_dir = spec.run_dir
    if run_dir.exists() and not run_dir.is_dir():
        return f"{run_dir} is a file"
    if run_status(spec) == "new" or not (run_dir / "spec.json").is_file():
        return None
    saved = read_run_spec(run_dir, RunSpec)
    if saved.model_copy(update={"out_dir": None}) != spec.model_copy(update={"out_dir": None}):
        return f"{run_dir} holds a run of another spec (other --set values?)"
    return None
