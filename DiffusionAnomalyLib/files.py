"""Writing files safely: the one atomic file write, the one output-folder check and the one output-folder lock (no torch).

Every writer of the package goes through :func:`atomic_path` (a uniquely named temporary file
beside the target, renamed over it on success), so a failure (full disk, bad input, interrupted
run) never leaves a partial or corrupt file behind; failures raise :class:`OutputError` with a
sentence naming the file or folder.

A run that writes a set of files into a folder holds the folder with :func:`output_folder`
from its up-front check until its outputs are in place: the folder is checked without being
created (:func:`check_output_folder`), an output that would replace one of the run's inputs is
refused (:func:`check_not_input`), a lock file (:data:`LOCK_NAME`) keeps a second run out, and a
failing run leaves the folder as it found it (a folder it created is removed). Sets of files are
written into a hidden staging folder (:func:`staged`) and moved into place only when all of them
succeeded; leftovers of killed runs (staging folders, partial files) are removed by the next run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from .processes import proc_stat
from .processes import process_watch

__all__ = [
    "LOCK_NAME",
    "OutputError",
    "atomic_path",
    "check_not_input",
    "check_output_folder",
    "check_writable_dir",
    "output_folder",
    "remove_leftovers",
    "staged",
]

#: the lock file a run holds in its output folder (pid, process start, host, start time)
LOCK_NAME = ".diffusion-anomaly.lock"
#: hidden staging folders: ``.staging-<pid>-<hex>``
STAGING_PREFIX = ".staging-"
_STAGING = re.compile(r"^\.staging-(?:(\d+)-)?[0-9a-f]+$")
#: :func:`atomic_path`'s temporary files: ``.<name>.<pid>-<hex>.partial<suffix>``
_PARTIAL = re.compile(r"^\..*\.(\d+)-[0-9a-f]{8}\.partial(?:\..*)?$")
#: a stale lock being taken over: ``<LOCK_NAME>.stale-<pid>-<hex>``
_STALE_LOCK = re.compile(r"^" + re.escape(LOCK_NAME) + r"\.stale-(\d+)-[0-9a-f]+$")
#: a lock file without readable content younger than this is being written; older, its writer died
_UNFINISHED_LOCK_SECONDS = 10.0


class OutputError(OSError):
    """An output file or folder that cannot be written; the message names it and says why."""


class _FolderGone(Exception):
    """The output folder vanished before its lock was made (a failing run that created it removed it)."""


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


# ---- checks ------------------------------------------------------------------------------------
def _not_writable(folder: Path) -> str | None:
    """Why no file can be made in the existing folder ``folder``, or None if one can."""
    if hasattr(os, "geteuid") and os.geteuid() == 0 and not folder.stat().st_mode & 0o222:
        return "it is marked read-only"  # root could write anyway: respect the user's marking
    probe = folder / f".write-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(probe, "wb"):
            pass
    except OSError as exc:
        return str(exc.strerror or exc)
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return None


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
    reason = _not_writable(folder)
    if reason is not None:
        raise OutputError(f"The output folder {folder} is not writable ({reason}); choose another folder.")
    return folder


def check_output_folder(path: str | os.PathLike) -> Path:
    """The output folder ``path`` after checking, without creating anything, that a run can write there.

    An existing folder must be writable; a missing one must be creatable (its nearest existing
    parent is a writable folder). Read-only folders are refused even for root. Raises
    :class:`OutputError` naming the folder.
    """
    folder = Path(path).expanduser()
    if folder.is_dir():
        return check_writable_dir(folder, create=False)
    if os.path.lexists(folder):
        what = "a broken link" if folder.is_symlink() and not folder.exists() else "a file, not a folder"
        raise OutputError(f"The output folder {folder} is {what}; choose another folder.")
    parent = folder.absolute().parent
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"The output folder {folder} cannot be created ({parent} is a file, not a folder); "
                          "choose another folder.")
    reason = _not_writable(parent)
    if reason is not None:
        raise OutputError(f"The output folder {folder} cannot be created ({parent} is not writable: {reason}); "
                          "choose another folder.")
    return folder


def _same_path(a: Path, b: Path) -> bool:
    """True when ``a`` and ``b`` name the same file or folder (through links, bind mounts, ``..``)."""
    if os.path.abspath(a) == os.path.abspath(b) or os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def check_not_input(folder: str | os.PathLike, outputs: Iterable[str],
                    inputs: Mapping[str, str | os.PathLike | None]) -> None:
    """Refuse a run whose output folder is one of its inputs or whose output would replace one.

    ``inputs`` maps what each input is (e.g. "input", "checkpoint") to its path (None = not given).
    Raises :class:`OutputError` naming the input and the output.
    """
    folder = Path(folder).expanduser()
    outputs = list(outputs)
    for what, path in inputs.items():
        if path is None or str(path) == "":
            continue
        source = Path(path).expanduser()
        if _same_path(folder, source):
            raise OutputError(f"The output folder {folder} is the {what} {source}, which the results would "
                              "change; choose another output folder.")
        for name in outputs:
            if _same_path(folder / name, source):
                raise OutputError(f"The {what} {source} is also an output of this run ({name} in {folder}) and "
                                  f"would be overwritten; choose another output folder or move the {what}.")


# ---- the lock ---------------------------------------------------------------------------------
def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


#: folders this process holds: real path -> (thread that holds it, nesting depth)
_HELD: dict[str, tuple[int, int]] = {}
_HELD_GUARD = threading.Lock()


def _lock_record() -> dict:
    pid = os.getpid()
    return {"pid": pid, "process_start": proc_stat(pid)[1], "boot_id": _boot_id(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "token": uuid.uuid4().hex}


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    except OSError:
        return ""


def _parse_lock(text: str) -> dict | None:
    try:
        record = json.loads(text)
    except ValueError:
        return None
    pid = record.get("pid") if isinstance(record, dict) else None
    return record if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 else None


def _holder_ended(record: dict) -> bool:
    """True when the run that wrote the lock ``record`` has certainly ended (on this machine)."""
    if record.get("host") != socket.gethostname():
        return False  # another machine's run: cannot tell, so it holds the folder
    boot = _boot_id()
    if record.get("boot_id") and boot and record["boot_id"] != boot:
        return True  # written before the last reboot
    pid = record["pid"]
    if not process_watch(pid)():
        return True
    start = proc_stat(pid)[1]
    return record.get("process_start") is not None and start is not None and start != record["process_start"]


def _lock_age(lock: Path) -> float:
    try:
        return time.time() - lock.stat().st_mtime
    except OSError:
        return 0.0


def _take_over(lock: Path, seen: str) -> None:
    """Remove the stale lock whose content was ``seen``, never a lock another run made meanwhile."""
    grave = lock.with_name(f"{LOCK_NAME}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(lock, grave)  # atomic: of several runs taking over, one moves it
    except FileNotFoundError:
        return
    if _read_text(grave) != seen:  # a new run's lock was moved: put it back (link never replaces)
        try:
            os.link(grave, lock)
        except OSError:
            pass
    try:
        grave.unlink()
    except OSError:
        pass  # removed with the other leftovers by the next run (remove_leftovers)


def _busy_message(folder: Path, record: dict | None) -> str:
    if record is None:
        return (f"The output folder {folder} is in use by another diffusion-anomaly run (its lock file is being "
                "written); wait for it to finish or choose another folder.")
    where = "" if record.get("host") == socket.gethostname() else f" on {record.get('host')}"
    return (f"The output folder {folder} is in use by another diffusion-anomaly run (process {record['pid']}{where}, "
            f"started {record.get('started', '?')}); wait for it to finish or choose another folder "
            f"(if no such run is active, delete {folder / LOCK_NAME}).")


def _acquire(folder: Path) -> tuple[Path, str]:
    """Create the lock file in ``folder`` (O_CREAT | O_EXCL), taking over a lock of an ended run."""
    lock = folder / LOCK_NAME
    if lock.is_dir() and not lock.is_symlink():
        raise OutputError(f"The output folder {folder} holds a folder named {LOCK_NAME}, where this program keeps "
                          "its lock file; remove it or choose another folder.")
    record = _lock_record()
    text = json.dumps(record)
    for _ in range(50):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            seen = _read_text(lock)
            if seen is None:
                continue  # released meanwhile: try again
            holder = _parse_lock(seen)
            if holder is None:  # being written, or its writer died between creating and writing it
                if _lock_age(lock) < _UNFINISHED_LOCK_SECONDS:
                    time.sleep(0.1)
                    if _read_text(lock) == seen:
                        raise OutputError(_busy_message(folder, None)) from None
                    continue
            elif not _holder_ended(holder):
                raise OutputError(_busy_message(folder, holder)) from None
            _take_over(lock, seen)
            continue
        except FileNotFoundError:
            raise _FolderGone() from None
        except OSError as exc:
            raise OutputError(f"The output folder {folder} cannot be locked for this run "
                              f"({exc.strerror or exc}); choose another folder.") from exc
        try:
            os.write(fd, text.encode("utf-8"))
        finally:
            os.close(fd)
        return lock, text
    raise OutputError(_busy_message(folder, None))


def _release(lock: Path, text: str) -> None:
    if _read_text(lock) == text:  # only our own lock
        lock.unlink(missing_ok=True)


def remove_leftovers(folder: str | os.PathLike) -> list[Path]:
    """Remove what ended runs left in ``folder``: staging folders, partial files, half taken-over locks.

    Only entries whose process (its pid is in the name) no longer runs are removed; entries of
    the old unnamed staging format are removed too. Returns what was removed.
    """
    removed = []
    for entry in Path(folder).iterdir():
        for pattern in (_STAGING, _PARTIAL, _STALE_LOCK):
            match = pattern.match(entry.name)
            if match:
                break
        else:
            continue
        pid = match.group(1)
        if pid is not None and (int(pid) == os.getpid() or process_watch(int(pid))()):
            continue  # a run still at work (a writer that takes no lock, e.g. the Slicer module's exports)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _make_folder(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; the folders this call created, outermost first.

    Level by level, so that a folder another run created at the same moment is never counted as
    this run's (and never removed by it).
    """
    missing = []
    p = folder.absolute()
    while not os.path.lexists(p):
        missing.append(p)
        p = p.parent
    created: list[Path] = []
    for level in reversed(missing):
        try:
            os.mkdir(level)
            created.append(level)
        except FileExistsError:
            if not level.is_dir():
                _remove_created(created, folder, content=False)
                raise OutputError(f"The output folder {folder} cannot be created ({level} is a file, not a folder); "
                                  "choose another folder.") from None
        except OSError as exc:
            _remove_created(created, folder, content=False)
            raise OutputError(
                f"The output folder {folder} cannot be created ({exc.strerror or exc}); choose another folder."
            ) from exc
    return created


def _remove_created(created: list[Path], folder: Path, content: bool) -> None:
    """Remove the folders a failed run created, innermost first, while they are empty (another run may
    have put its lock there meanwhile); with ``content`` (the run held the lock of the output folder it
    created, so everything in it is its own) the output folder goes with what is in it."""
    parents = list(created)
    if content and parents and parents[-1] == folder.absolute():
        shutil.rmtree(parents.pop(), ignore_errors=True)
    for parent in reversed(parents):
        try:
            parent.rmdir()
        except OSError:
            break


@contextmanager
def output_folder(path: str | os.PathLike, *, outputs: Iterable[str] = (),
                  inputs: Mapping[str, str | os.PathLike | None] | None = None) -> Iterator[Path]:
    """Hold the output folder ``path`` for one run: checked, created, locked; left as found on failure.

    Before anything is created: the folder is checked (:func:`check_output_folder`) and no file
    named in ``outputs`` may replace one of ``inputs`` (:func:`check_not_input`). Then the folder
    is created if missing and locked (:data:`LOCK_NAME`, a second run is refused with a sentence
    naming the holder's pid; a lock of an ended run is taken over), and leftovers of killed runs
    are removed (:func:`remove_leftovers`). On success the lock is removed; on failure (any
    exception, Ctrl-C included) too, and a folder this run created is removed with its content.
    Nested use in the same thread (a CLI verb around :func:`.pipeline.write_outputs`) is allowed.
    """
    folder = Path(path).expanduser()
    check_not_input(folder, outputs, inputs or {})
    key = os.path.realpath(folder)
    me = threading.get_ident()
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is not None and held[0] == me:
            _HELD[key] = (me, held[1] + 1)
    if held is not None and held[0] == me:
        try:
            yield folder
        finally:
            with _HELD_GUARD:
                _HELD[key] = (me, _HELD[key][1] - 1)
        return
    check_output_folder(folder)
    created: list[Path] = []
    for _ in range(10):
        created += _make_folder(folder)
        try:
            lock, text = _acquire(folder)
            break
        except _FolderGone:
            continue  # a failing run that had created it removed it: create it again
        except BaseException:
            _remove_created(created, folder, content=False)  # never held: nothing in it is this run's
            raise
    else:
        _remove_created(created, folder, content=False)
        raise OutputError(_busy_message(folder, None))
    with _HELD_GUARD:
        _HELD[key] = (me, 1)
    try:
        remove_leftovers(folder)
        yield folder
    except BaseException:
        if created and created[-1] == folder.absolute():
            _remove_created(created, folder, content=True)  # the lock goes with it
        else:
            _release(lock, text)
            _remove_created(created, folder, content=False)
        raise
    else:
        _release(lock, text)
    finally:
        with _HELD_GUARD:
            _HELD.pop(key, None)


# ---- staging -----------------------------------------------------------------------------------
def _move_into_place(stage: Path, out: Path, replaces: Iterable[str] = ()) -> list[Path]:
    """Move every staged file into ``out``, and move away the ``replaces`` files the set does not include.

    On any failure ``out`` is restored exactly as it was: the previous files wait in a backup
    folder inside the staging folder until every new file is in place.
    """
    files = sorted(f for f in stage.iterdir() if f.is_file())
    names = {f.name for f in files}
    blocked = [f.name for f in files if (out / f.name).exists() and not (out / f.name).is_file()]
    if blocked:
        raise OutputError(f"Cannot write the results into {out}: {', '.join(blocked)} exist(s) there as a folder.")
    stale = [out / n for n in sorted(set(replaces) - names) if (out / n).is_file()]
    backup = stage / ".previous"
    backup.mkdir()
    moved: list[Path] = []
    try:
        for old in stale:
            old.replace(backup / old.name)  # a file of an earlier set that this set does not have
        for f in files:
            target = out / f.name
            if target.exists():
                target.replace(backup / f.name)  # keep the previous run's file until all succeeded
            f.replace(target)
            moved.append(target)
    except OSError:
        for target in moved:
            target.unlink(missing_ok=True)
        for old in backup.iterdir():
            old.replace(out / old.name)
        raise
    return moved


@contextmanager
def staged(out: str | os.PathLike, replaces: Iterable[str] = ()) -> Iterator[Path]:
    """A hidden staging folder in ``out`` (``.staging-<pid>-<hex>``); its files move into ``out`` on success.

    Write a set of files into the yielded folder; when the block ends without an exception every
    file is moved into ``out`` (files of ``replaces`` the set lacks are removed, so the folder
    holds one run's set), else nothing in ``out`` changes. The staging folder is removed in both
    cases; one left by a killed run is removed by the next :func:`output_folder`.
    """
    out = Path(out)
    stage = out / f"{STAGING_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        yield stage
        _move_into_place(stage, out, replaces)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def sha256_of(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB blocks: what a result records of the checkpoint it used."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
