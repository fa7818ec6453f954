"""What a long loop shows and how it is stopped: one progress bar on stderr (so stdout stays
clean for results) and the Ctrl-C flag of resumable runs.

Training, score training, banks, attacks and alignment scores all use `ProgressBar`;
training and score training use `StopFlag`, whose first Ctrl-C asks the loop to stop after
the current step (the loop then saves its state), and whose second aborts at once.

On a terminal the bar redraws in place. Elsewhere (a log file, a SLURM job, a pipe) it
prints a plain line at most every ``PAGCTL_PROGRESS_SECONDS`` (30) seconds and when the
loop ends: ``attack: 120/360 (33%) elapsed 0:01:10 eta 0:02:20 robust 45/120``.

The ETA is the count still to go at the rate so far, unless the loop knows better: a loop
whose steps cost unequal time hands its own estimate of the seconds left
(``update(remaining=...)``), as the attack engine does.
"""

from __future__ import annotations

import os
import signal
import threading
import time
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
from rich.text import Text

__all__ = ["PROGRESS_SECONDS_ENV", "ProgressBar", "StopFlag", "stderr_console"]

stderr_console = Console(stderr=True)
PROGRESS_SECONDS_ENV = "PAGCTL_PROGRESS_SECONDS"


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _left(deadline: float | None) -> str | None:
    """The ETA when the loop gave its own (``deadline``: when it said the loop would end,
    on the monotonic clock), counting down between its updates; None when it gave none."""
    return None if deadline is None else _clock(deadline - time.monotonic())


class _Remaining(TimeRemainingColumn):
    """The ETA column: the loop's own estimate when it gave one, else rich's, from the rate."""

    def render(self, task: Any) -> Text:
        left = _left(task.fields.get("deadline"))
        return super().render(task) if left is None else Text(left, style="progress.remaining")


class ProgressBar:
    """One bar: description, bar, done/total, elapsed, ETA and an info text (running loss,
    robust count, ...). A context manager; disabled, it prints nothing. Off a terminal it
    prints periodic plain lines instead (module docstring)."""

    def __init__(self, description: str, total: int, *, enabled: bool = True) -> None:
        self._plain = enabled and not stderr_console.is_terminal
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("eta"), _Remaining(),
            TextColumn("{task.fields[info]}"), console=stderr_console,
            disable=not enabled or self._plain, transient=False)
        self._task = self._progress.add_task(description, total=total, info="",
                                             deadline=None)
        self._state: dict[str, Any] = {"description": description, "completed": 0,
                                        "total": total, "info": "", "deadline": None}
        try:
            self._interval = float(os.environ.get(PROGRESS_SECONDS_ENV, "30"))
        except ValueError:
            self._interval = 30.0
        self._start = self._last = time.monotonic()
        self._base = 0  # the count at the start (a resumed loop), for the rate
        self._counted = False  # whether a count was set yet (the first one is the base)

    def __enter__(self) -> ProgressBar:
        self._progress.__enter__()
        self._start = self._last = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(None, None, None)
        if self._plain and self._state["completed"] > self._base:
            self._line()

    def _line(self) -> None:
        st = self._state
        elapsed = time.monotonic() - self._start
        done, total = st["completed"], st["total"]
        rate = (done - self._base) / elapsed if elapsed > 0 else 0.0
        eta = _left(st["deadline"]) or (_clock((total - done) / rate) if rate > 0 and total
                                        else "?")
        share = f" ({100 * done / total:.0f}%)" if total else ""
        info = f" {st['info']}" if st["info"] else ""
        stderr_console.print(f"{st['description']}: {done}/{total}{share} elapsed "
                             f"{_clock(elapsed)} eta {eta}{info}", markup=False,
                             highlight=False, soft_wrap=True)
        self._last = time.monotonic()

    def update(self, *, completed: int | None = None, advance: int | None = None,
               total: int | None = None, description: str | None = None,
               info: str | None = None, remaining: float | None = None) -> None:
        """Set the count (``completed``) or add to it (``advance``), the ``total`` (a loop
        whose amount of work is an estimate revises it), and the texts given.
        ``remaining``: the loop's own estimate of the seconds left, shown as the ETA from
        then on (counting down until the next estimate) in place of the one from the rate."""
        kw: dict[str, Any] = {}
        if total is not None:
            kw["total"] = total
            self._state["total"] = total
        if remaining is not None:
            kw["deadline"] = self._state["deadline"] = time.monotonic() + remaining
        if completed is not None:
            kw["completed"] = completed
            if not self._counted and advance is None:
                self._base = completed
            self._counted = True
            self._state["completed"] = completed
        if advance is not None:
            kw["advance"] = advance
            self._state["completed"] += advance
            self._counted = True
        if description is not None:
            kw["description"] = description
            self._state["description"] = description
        if info is not None:
            kw["info"] = info
            self._state["info"] = info
        self._progress.update(self._task, **kw)
        if self._plain and time.monotonic() - self._last >= self._interval:
            self._line()


class StopFlag:
    """The first Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the current step
    (``requested``); another one, a second or more later, raises KeyboardInterrupt. Installed
    only in the main thread; the previous handlers are restored on exit.

    A repeat within `REPEAT_SECONDS` counts as the same request: a scheduler stopping a job
    (SLURM's scancel) sends SIGTERM to every process of it, torchrun's agent included, which
    forwards it to its workers, so a worker receives it twice. SIGTERM is how schedulers
    (SLURM, Kubernetes) and torchrun stop a job, so a run stopped that way saves its state
    like one stopped with Ctrl-C.

    A process started with a signal ignored (``nohup``, a background job of a
    non-interactive shell, some schedulers) keeps ignoring it: whoever started it asked for
    that, and such a run is stopped with the other signal or SIGKILL, after which
    ``--resume`` continues from the last saved state."""

    REPEAT_SECONDS = 1.0

    def __init__(self) -> None:
        self.requested = False
        self._first = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if self.requested:
            if now - self._first >= self.REPEAT_SECONDS:
                raise KeyboardInterrupt
            return
        self.requested = True
        self._first = now

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
