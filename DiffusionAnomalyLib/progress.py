"""Progress reporting and cancellation for long-running functions (parameters, never globals; no torch)."""

from __future__ import annotations

import time
from typing import Callable

#: ``progress(fraction in [0, 1], message)``: what every long-running function accepts
Progress = Callable[[float, str], None]
#: ``cancel() -> True`` when the user asked to stop
Cancel = Callable[[], bool]


class Cancelled(RuntimeError):
    """The user cancelled a long-running operation; nothing was changed."""


def check_cancel(cancel: Cancel | None) -> None:
    """Raise :class:`Cancelled` if the user asked to stop."""
    if cancel is not None and cancel():
        raise Cancelled("cancelled by the user")


def report(progress: Progress | None, fraction: float, message: str) -> None:
    """Send ``fraction`` (clipped to [0, 1]) and ``message`` to ``progress`` if there is one."""
    if progress is not None:
        progress(float(min(max(fraction, 0.0), 1.0)), message)


def timer() -> Callable[[], float]:
    """A stopwatch: the returned function gives the seconds since it was made."""
    start = time.perf_counter()
    return lambda: time.perf_counter() - start
