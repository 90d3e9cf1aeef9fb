"""The package version and the commit it was built from (its own module, so that no module imports the package
root for it)."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

__version__ = "0.1.0"

#: what a report or summary says when the source is not a git checkout (an installed wheel, a copied folder)
UNKNOWN_COMMIT = "unknown (not a git checkout)"


@functools.lru_cache(maxsize=1)
def commit() -> str:
    """The git commit of the source tree this package runs from (with "+changes" when files differ from it), or
    :data:`UNKNOWN_COMMIT`; asked once per process."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=5)
        if head.returncode != 0 or not head.stdout.strip():
            return UNKNOWN_COMMIT
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN_COMMIT
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def software() -> str:
    """One line naming the software that made a result: "DiffusionAnomalyLib 0.1.0 (commit 1a2b3c4d5e6f)"."""
    return f"DiffusionAnomalyLib {__version__} (commit {commit()})"
