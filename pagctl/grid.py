"""A grid of runs: one spec, some of its fields swept over lists of values, each combination
a run of its own in a folder named after its values.

``pagctl train SPEC --grid train.pag_weight=0,0.5,1 --grid target_gradients.name=class_mean,
nearest_neighbor`` expands to the Cartesian product of the value lists, in the order given
(the last key varies fastest). Point ``i`` is the spec with ``--set`` applied, then its grid
values (parsed as YAML, as ``--set`` values are); its run folder is
``ROOT/<key>=<value>__<key>=<value>…`` under the grid's root (``--out``, else
``runs/<spec name>-grid``); the grid decides the folders, so ``out_dir`` is neither a
``--set`` nor a ``--grid`` key. Every point is validated, and every folder checked, before
any run starts: an unknown key, an empty value list, a value one point's spec refuses, two
points with one folder name or one spec, or a folder holding another spec's run is refused
with one line naming the point.

A point's `status` decides what running the grid does with it: ``new`` starts it,
``partial`` (interrupted after a saved state) resumes it, ``unsaved`` (stopped before its
first state) starts it again, ``finished`` skips it. So the same grid command, run again,
finishes what is left, and ``--grid-point I`` runs one point the same way (a scheduler's
array job, or a torchrun launch). A grid that runs holds its root's `GridLock`: the
commands of one grid (its ``--grid-point`` jobs, at once) share the root, another grid is
refused while they run.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pagctl.checkpoint import (
    LOCK_FILE,
    STATE_FILE,
    FolderLock,
    holder_text,
    read_run_spec,
    read_state_counters,
    try_flock,
)
from pagctl.errors import CheckpointError, SpecError
from pagctl.spec import RunSpec, load_spec

Status = Literal["new", "partial", "unsaved", "finished"]

_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")
_FOLDERS_BY_GRID = ("a grid names each point's folder after its values, under the grid's root; "
                    "give the root with --out ROOT")


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
        if key.split(".")[0] == "out_dir":
            raise SpecError(f"--grid {key}: {_FOLDERS_BY_GRID}")
        axes.append((key, values))
    return axes


def folder_name(values: tuple[tuple[str, str], ...]) -> str:
    """A point's folder name: ``key=value`` pairs joined by ``__``, characters other than
    letters, digits and ``._+-`` in the values replaced by ``_``."""
    return "__".join(f"{key}={_UNSAFE.sub('_', value)}" for key, value in values)


def expand(source: str, overrides: list[str], values: dict[str, Any],
           items: list[str], root: Path | None) -> list[GridPoint]:
    """Every point of the grid ``items`` over the spec ``source`` (with ``overrides`` and
    the typed ``values`` as `pagctl.spec.load_spec` takes them), validated, with its folder
    under ``root`` (None: ``runs/<spec name>-grid``); SpecError (one line naming the point)
    for anything that would stop one of them (module docstring) but what the folders hold:
    that is `check_folders`, which a grid that runs calls under its `GridLock`, so that a
    second grid into the root is told who holds it rather than what it found there."""
    axes = parse_axes(items)
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key.split(".")[0] == "out_dir":
            raise SpecError(f"--set {key}: {_FOLDERS_BY_GRID}")
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
    return points


def check_folders(points: list[GridPoint]) -> None:
    """`check_folder` for every point, in order (not needed with ``--overwrite``: the runs
    will be replaced)."""
    for point in points:
        check_folder(point)


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
    ``spec``: it is a file, holds a run of another spec (even one stopped before its first
    state), or a state file that is no readable training state; None when it can (or is
    new)."""
    run_dir = spec.run_dir
    if run_dir.exists() and not run_dir.is_dir():
        return f"{run_dir} is a file"
    try:
        found = run_status(spec)
    except CheckpointError:  # its own fix (--overwrite) would replace every run of a grid
        return f"{run_dir / STATE_FILE} is not a readable training state"
    if found == "new" or not (run_dir / "spec.json").is_file():
        return None
    saved = read_run_spec(run_dir, RunSpec)
    if saved.model_copy(update={"out_dir": None}) != spec.model_copy(update={"out_dir": None}):
        return f"{run_dir} holds a run of another spec (other --set values?)"
    return None


# ---------------------------------------------------------------------------------------
# one grid per root at a time: the lock

GRID_LOCK_FILE = ".pagctl-grid.lock"
"""`GridLock`'s file in a grid's root, present while a grid runs there."""


def grid_digest(points: list[GridPoint]) -> str:
    """What makes two grid commands one grid: every point's folder name and spec (``out_dir``
    aside), in order, hashed (16 hex digits). The commands of one grid (the whole grid, each
    ``--grid-point`` job, a resubmitted one) agree on it whatever else they say (``--device``,
    ``--quiet``, ``--format``); another ``--set``, value list or ``--data-dir`` is another
    grid, as it is another run for each point's folder."""
    data = [[folder_name(p.values), p.spec.model_copy(update={"out_dir": None})
             .model_dump(mode="json")] for p in points]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class GridLock(FolderLock):
    """The lock a running grid holds on its root: shared by the commands of one grid,
    refused to any other grid.

    Each point's folder has its `pagctl.checkpoint.RunLock`, which keeps two commands from
    training one folder at once. It does not keep two *different* grids from running into
    one root, each training some of the folders and then finding the other's runs where it
    expected its own. A `RunLock` on the root cannot say it either: exclusive, it would
    refuse the ``--grid-point`` jobs of one grid (a scheduler's array, running at once);
    shared, it would let any grid in. So the lock is ``flock`` on ``ROOT/.pagctl-grid.lock``,
    held shared for the whole command, with the grid's `grid_digest` written in the file by
    the command that found it free (it alone could take it exclusively, to write it); a
    command that finds another digest there is refused with one line naming that command
    (pid, host, command line and start). The commands of one grid share the root, and each
    point's `RunLock` keeps them off each other's folders. A command that joins a running
    grid leaves the file as it is, so the line names the command that started the grid,
    which may have ended while its siblings go on.

    The mechanics are every pagctl lock's (`pagctl.checkpoint.FolderLock`): a killed grid
    leaves no lock, the last holder removes the file, the file is never a link followed,
    and where there is no ``flock`` no lock is taken. The root is made when missing, and
    removed again at release when nothing was written into it.
    """

    def __init__(self, root: Path, digest: str, *, command: str) -> None:
        super().__init__(root, GRID_LOCK_FILE, command=command, create=True)
        self.root = root
        self.digest = digest

    def acquire(self) -> GridLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self
        if self.root.exists() and not self.root.is_dir():
            raise CheckpointError(f"{self.root}: is a file, not a folder for a grid's runs; "
                                  "give another --out")

        def take(fd: int) -> bool | None:
            alone = try_flock(fd, fcntl.LOCK_EX)
            if alone is None:
                return None
            if alone and self._same_file(fd):
                self._write_holder(fd, grid=self.digest)
            # shared by the grid's commands; an exclusive holder only writes its line
            if not try_flock(fd, fcntl.LOCK_SH, tries=200):
                raise CheckpointError(f"{self.root}: its grid lock stays taken by "
                                      f"{holder_text(os.pread(fd, 4096, 0))}; is that "
                                      "command stopped?")
            return True

        fd = self._hold(take)
        if fd is None:
            return self
        data = os.pread(fd, 4096, 0)
        found: Any = None
        with suppress(ValueError):
            found = json.loads(data.decode("utf-8", "replace"))
        if isinstance(found, dict) and found.get("grid") == self.digest:
            return self
        self.release()
        raise CheckpointError(f"{self.root}: another grid runs into this folder, started by "
                              f"{holder_text(data)}; one grid at a time in a root: wait for it "
                              "to end, or give this grid another --out")

    def __enter__(self) -> GridLock:
        return self.acquire()

