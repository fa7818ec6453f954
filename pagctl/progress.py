"""Rich progress on stderr, so stdout stays clean for results."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

stderr_console = Console(stderr=True)


class TrainProgress:
    """One bar over all training steps, with ETA and the running loss terms."""

    def __init__(self, epochs: int, steps_per_epoch: int, *, enabled: bool = True) -> None:
        self.epochs, self.steps = epochs, steps_per_epoch
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"), console=stderr_console, disable=not enabled,
            transient=False,
        )
        self._task = self._progress.add_task("train", total=epochs * steps_per_epoch, info="")

    def __enter__(self) -> TrainProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(None, None, None)

    def advance_to(self, epoch: int, step: int) -> None:
        self._progress.update(self._task, completed=epoch * self.steps + step,
                              description=f"epoch {epoch + 1}/{self.epochs}")

    def step(self, epoch: int, sums: dict[str, float]) -> None:
        seen = max(1.0, sums["seen"])
        info = f"loss {sums['loss'] / seen:.3f} ce {sums['ce'] / seen:.3f}"
        if sums["pag"]:
            info += f" pag {sums['pag'] / seen:.3f}"
        self._progress.update(self._task, advance=1, info=info,
                              description=f"epoch {epoch + 1}/{self.epochs}")

    def epoch_done(self, record: dict[str, Any]) -> None:
        self._progress.refresh()


class AttackProgress:
    """One bar over every (stage, batch) of an attack, with ETA and the robust count."""

    def __init__(self, stages: list[str], batches: int, n: int, *, enabled: bool = True) -> None:
        self.stages, self.batches, self.n = stages, max(batches, 1), n
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"), console=stderr_console, disable=not enabled,
            transient=False,
        )
        self._task = self._progress.add_task(
            stages[0] if stages else "attack", total=len(stages) * self.batches, info="")

    def __enter__(self) -> AttackProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(None, None, None)

    def _update(self, stage: int, robust: int, **kw: Any) -> None:
        name = self.stages[min(stage, len(self.stages) - 1)] if self.stages else "attack"
        self._progress.update(self._task, description=name,
                              info=f"robust {robust}/{self.n}", **kw)

    def advance_to(self, stage: int, batch: int, robust: int) -> None:
        self._update(stage, robust, completed=stage * self.batches + batch)

    def step(self, stage: int, robust: int) -> None:
        self._update(stage, robust, advance=1)
