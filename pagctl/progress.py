"""What a long loop shows and how it is stopped: one progress bar on stderr (so stdout stays
clean for results) and the Ctrl-C flag of resumable runs.

Training, score training, banks and attacks all use `ProgressBar`; training and score
training use `StopFlag`, whose first Ctrl-C asks the loop to stop after the current step
(the loop then saves its state), and whose second aborts at once.
"""

from __future__ import annotations

import signal
import threading
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

__all__ = ["ProgressBar", "StopFlag", "stderr_console"]

stderr_console = Console(stderr=True)


class ProgressBar:
    """One bar: description, bar, done/total, elapsed, ETA and an info text (running loss,
    robust count, ...). A context manager; disabled, it prints nothing."""

    def __init__(self, description: str, total: int, *, enabled: bool = True) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"), console=stderr_console, disable=not enabled,
            transient=False)
        self._task = self._progress.add_task(description, total=total, info="")

    def __enter__(self) -> ProgressBar:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(None, None, None)

    def update(self, *, completed: int | None = None, advance: int | None = None,
               description: str | None = None, info: str | None = None) -> None:
        """Set the count (``completed``) or add to it (``advance``), and the texts given."""
        kw: dict[str, Any] = {}
        if completed is not None:
            kw["completed"] = completed
        if advance is not None:
            kw["advance"] = advance
        if description is not None:
            kw["description"] = description
        if info is not None:
            kw["info"] = info
        self._progress.update(self._task, **kw)


class StopFlag:
    """First Ctrl-C asks the loop to stop after the current step (``requested``); a second
    one raises KeyboardInterrupt. Installed only in the main thread; the previous handler
    is restored on exit.

    A process started with SIGINT ignored (``nohup``, a background job of a non-interactive
    shell, some schedulers) keeps ignoring it: whoever started it asked for that, and such
    a run is stopped with SIGTERM or SIGKILL, after which ``--resume`` continues from the
    last saved state."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
