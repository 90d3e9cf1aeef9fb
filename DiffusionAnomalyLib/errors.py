"""Which errors are refusals a user reads as one sentence, and which are bugs (no torch).

A refusal (bad input, checkpoint, parameter or output folder) is raised as a ``ValueError``
(:class:`.volume.VolumeError` and :class:`.card.CheckpointError` are ones), an
:class:`.files.OutputError`, or a ``MemoryError``, with a sentence saying what is wrong and what to
do. The CLI prints it after ``error:`` and exits 2, the worker sends it without a traceback, the
Slicer module shows it alone in a message box. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from .files import OutputError

#: the exception types whose message is the whole story for the user
REFUSALS: tuple[type[BaseException], ...] = (ValueError, OutputError, MemoryError)


def is_refusal(exc: BaseException) -> bool:
    """True when ``exc`` is an expected refusal (its message is a sentence for the user)."""
    return isinstance(exc, REFUSALS)


def user_sentence(exc: BaseException) -> str:
    """The sentence to show for ``exc``: its own message for a refusal, else a bug report hint."""
    if is_refusal(exc):
        return str(exc) or type(exc).__name__
    return (f"An unexpected error occurred ({type(exc).__name__}: {exc}); this is a bug in DiffusionAnomaly, "
            "please report it with the details.")
