"""Which errors are refusals a user reads as one sentence, and which are bugs (no torch).

A refusal (bad input, checkpoint, parameter or output folder) is raised as a ``ValueError``
(:class:`.volume.VolumeError` and :class:`.card.CheckpointError` are ones), an
:class:`.files.OutputError`, or a ``MemoryError``, with a sentence saying what is wrong and what to
do. The CLI prints it after ``error:`` and exits 2, the worker sends it without a traceback, the
Slicer module shows it alone in a message box. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from .files import OutputError

#: the exception types whose message is the whole story for the user (an OSError: a file the system refused)
REFUSALS: tuple[type[BaseException], ...] = (ValueError, OSError, MemoryError)


def is_refusal(exc: BaseException) -> bool:
    """True when ``exc`` is an expected refusal (its message is a sentence for the user)."""
    return isinstance(exc, REFUSALS)


def refusal_sentence(exc: BaseException) -> str:
    """The one sentence of a refusal, its cause kept (a bare OSError or MemoryError gets words around it)."""
    if isinstance(exc, MemoryError):
        cause = f" ({exc})" if str(exc) else ""
        return f"not enough memory for this run{cause}; close other programs or use a smaller input"
    if isinstance(exc, OSError) and not isinstance(exc, OutputError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return str(exc) or type(exc).__name__


def user_sentence(exc: BaseException) -> str:
    """The sentence to show for ``exc``: its refusal sentence, else a bug report hint."""
    if is_refusal(exc):
        return refusal_sentence(exc)
    return (f"An unexpected error occurred ({type(exc).__name__}: {exc}); this is a bug in DiffusionAnomaly, "
            "please report it with the details.")
