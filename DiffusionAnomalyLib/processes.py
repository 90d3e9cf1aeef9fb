"""Child processes: started as a tree of their own, ended as a whole, watched by pid (standard library only).

The one owner of process handling for the engine and the Slicer module: the inference worker
(``DiffusionAnomalyModuleLib.process``), TotalSegmentator and pip (:mod:`.totalsegmentator`), and
the worker's parent watch (:mod:`.worker`) and the output-folder lock (:mod:`.files`).

Cancel ends the whole process tree. A child may be a launcher (``PythonSlicer``, a console
script) that runs the real program as its own child, and the program may start workers of its
own (nnU-Net does), so killing the first process alone would leave the work going on.
SlicerMONAIAuto3DSeg walks the tree with psutil for this; psutil is not guaranteed in Slicer's
Python nor in the engine's environment, so the operating system's own grouping is used, which
needs no package and also reaches children that outlived their launcher:

- POSIX: the child starts in a new session (``start_new_session=True``), so it and every process
  it starts share one process group, which :func:`end_tree` signals as a whole (SIGTERM, then
  SIGKILL after a timeout).
- Windows: the child starts in a new process group and ``taskkill /T /F`` ends its tree (it cannot
  reach a descendant whose parent has already ended). Not tested on this project's CI, which has
  no Windows machine.
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .progress import Cancel, check_cancel

__all__ = ["POLL_INTERVAL", "end_tree", "group_running", "proc_stat", "process_watch", "run_lines", "start_tree"]

#: how often a waiting loop looks again (seconds)
POLL_INTERVAL = 0.05


# ---- one process -------------------------------------------------------------------------------
def process_watch(pid: int) -> Callable[[], bool]:
    """A callable telling whether process ``pid`` is still running (a zombie counts as ended)."""
    if os.name == "nt":
        # Untested here (no Windows CI). os.kill(pid, 0) would *terminate* the process on Windows;
        # hold a handle and ask whether it is signalled (the handle also keeps the pid from reuse).
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        kernel32.OpenProcess.restype = ctypes.c_void_p
        kernel32.OpenProcess.argtypes = (ctypes.c_uint32, ctypes.c_int, ctypes.c_uint32)
        kernel32.WaitForSingleObject.restype = ctypes.c_uint32
        kernel32.WaitForSingleObject.argtypes = (ctypes.c_void_p, ctypes.c_uint32)
        synchronize, wait_timeout, error_invalid_parameter = 0x00100000, 0x102, 87
        handle = kernel32.OpenProcess(synchronize, False, pid)
        if not handle:
            gone = ctypes.get_last_error() == error_invalid_parameter  # no such process
            return lambda: not gone  # otherwise (no access): cannot watch, assume it runs
        return lambda: kernel32.WaitForSingleObject(handle, 0) == wait_timeout

    def alive() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return proc_stat(pid)[0] != "Z"

    return alive


def proc_stat(pid: int) -> tuple[str | None, int | None]:
    """(state, start time in clock ticks after boot) of process ``pid`` from Linux /proc; Nones elsewhere."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()  # the command name may hold spaces and ')'
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None, None


# ---- a process tree ----------------------------------------------------------------------------
def start_tree(cmd: Sequence[str], **popen: Any) -> subprocess.Popen:
    """``subprocess.Popen(cmd, **popen)`` as the root of a process tree of its own, for :func:`end_tree`.

    POSIX: a new session (hence process group); Windows: a new process group, without a console window.
    """
    if os.name == "nt":
        popen["creationflags"] = (popen.get("creationflags", 0) | getattr(subprocess, "CREATE_NO_WINDOW", 0)
                                  | getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0))
    else:
        popen["start_new_session"] = True
    return subprocess.Popen(list(cmd), **popen)


def group_running(pgid: int) -> bool:
    """Whether a process of the process group ``pgid`` is still running (POSIX).

    Zombies count as ended: they run nothing, and an orphan's zombie may never be reaped where
    PID 1 is not a reaping init (containers), so ``killpg(pgid, 0)``, which still succeeds for
    them, is only the first answer; on Linux ``/proc`` tells the states apart.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        return True  # no /proc (macOS): a group member is there; its parent reaps it soon
    for stat in proc.glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # ended while we looked
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses, so split after the last ")"
        fields = text[text.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def _wait_group(proc: subprocess.Popen, pgid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` s for the process group to end; True if it has."""
    deadline = time.monotonic() + timeout
    while True:
        proc.poll()  # reap the root, so that it does not linger in the group as a zombie
        if not group_running(pgid):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_INTERVAL)


def end_tree(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """End the whole process tree of ``proc`` (started by :func:`start_tree`) now and wait until it has ended.

    POSIX: SIGTERM to the process group, SIGKILL to what is left after ``timeout`` s. Windows:
    ``taskkill /T /F``. Safe to call on a tree that has ended already.
    """
    if os.name == "nt":
        _end_tree_windows(proc, timeout)
        return
    pgid = proc.pid  # start_new_session: the root leads its own process group
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break  # the whole group has ended already
        if _wait_group(proc, pgid, timeout):
            break
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass  # unkillable (stuck in the kernel): nothing more a user process can do


def _end_tree_windows(proc: subprocess.Popen, timeout: float) -> None:
    # Untested here (no Windows CI). taskkill /T ends the root and its descendants, found through
    # their parent ids; it cannot reach a child whose parent has already ended (the inference worker
    # covers that with its own parent watch).
    if proc.poll() is None:
        subprocess.run(["taskkill", "/T", "/F", "/PID", str(proc.pid)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),
                       check=False)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def run_lines(cmd: Sequence[str], on_line: Callable[[str], None], cancel: Cancel | None = None,
              env: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None) -> int:
    """Run ``cmd`` as a tree of its own, pass each line of its output to ``on_line``; its exit code.

    stdout and stderr come as one stream of lines (a carriage return, as progress bars write it,
    also ends a line); undecodable bytes are replaced. When ``cancel()`` turns true, or
    ``on_line`` raises, the whole tree is ended (:func:`end_tree`) before the exception
    (:class:`.progress.Cancelled` for a cancel) propagates. A program that cannot be started
    raises ``OSError``.
    """
    proc = start_tree(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                      text=True, encoding="utf-8", errors="replace", env=None if env is None else dict(env),
                      cwd=None if cwd is None else str(cwd))
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in proc.stdout:
            lines.put(line.rstrip("\r\n"))
        lines.put(None)

    reader = threading.Thread(target=read, name="child output", daemon=True)
    reader.start()
    try:
        while True:
            check_cancel(cancel)
            try:
                line = lines.get(timeout=POLL_INTERVAL)
            except queue.Empty:
                continue
            if line is None:
                break
            on_line(line)
        return proc.wait()
    except BaseException:
        end_tree(proc)
        raise
    finally:
        reader.join(timeout=5.0)
        proc.stdout.close()
