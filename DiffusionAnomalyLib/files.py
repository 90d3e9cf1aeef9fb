"""Writing files safely: the one atomic file write and the one writable-folder check (no torch).

Every writer of the package goes through :func:`atomic_path` (a uniquely named temporary file
beside the target, renamed over it on success), so a failure (full disk, bad input, interrupted
run) never leaves a partial or corrupt file behind; failures raise :class:`OutputError` with a
sentence naming the file or folder.
"""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["OutputError", "atomic_path", "check_writable_dir"]


class OutputError(OSError):
    """An output file or folder that cannot be written; the message names it and says why."""


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it to ``path``, else delete it.

    ``suffix`` keeps the extension a writer looks at (e.g. ``.seg.nrrd``, ``.nii.gz``).
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise OutputError(f"Cannot write {path}: the folder {path.parent} does not exist.")
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        if isinstance(exc, OutputError):
            raise
        reason = exc.strerror or str(exc)
        raise OutputError(f"Cannot write {path}: {reason}. Choose a writable output folder.") from exc
    finally:
        try:
            tmp.unlink()  # only still there if something failed
        except OSError:
            pass


def check_writable_dir(path: str | os.PathLike, create: bool = True) -> Path:
    """The folder ``path`` (created with its parents if ``create``) after checking a file can be made there.

    A folder without write permission is refused even for root (who could write anyway), so a
    folder a user marked read-only stays untouched. Raises :class:`OutputError` naming the folder.
    """
    folder = Path(path).expanduser()
    if create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(
                f"The output folder {folder} cannot be created ({exc.strerror or exc}); choose another folder."
            ) from exc
    elif not folder.is_dir():
        raise OutputError(f"The output folder {folder} does not exist; create it or choose another folder.")
    if hasattr(os, "geteuid") and os.geteuid() == 0 and not folder.stat().st_mode & 0o222:
        raise OutputError(f"The output folder {folder} is not writable (it is marked read-only); "
                          "choose another folder.")
    probe = folder / f".write-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(probe, "wb"):
            pass
    except OSError as exc:
        raise OutputError(
            f"The output folder {folder} is not writable ({exc.strerror or exc}); choose another folder."
        ) from exc
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return folder
