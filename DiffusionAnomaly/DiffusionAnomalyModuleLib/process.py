"""The background process: starts the inference worker (``python -m DiffusionAnomalyLib.worker``) and talks to it.

No Slicer, no torch, standard library only: Slicer's own process imports this file, and the logic
drives it from the UI thread through a queue.

Cancel stops the whole process tree. In Slicer the worker is started through the ``PythonSlicer``
launcher, which runs the real interpreter as its child, so killing the launcher alone would leave
the worker computing. SlicerMONAIAuto3DSeg walks the tree with psutil for this; psutil is not
guaranteed in Slicer's Python (nor in the engine's environment), so the operating system's own
grouping is used instead, which needs no package and also reaches children that outlived their
launcher:

- POSIX: the launcher starts in a new session (``start_new_session=True``), so it and every
  process it starts share one process group, which :meth:`WorkerClient.terminate` signals as a
  whole (SIGTERM, then SIGKILL after a timeout).
- Windows: the launcher starts in a new process group and ``taskkill /T /F`` ends its tree.
  (Not tested on this project's CI, which has no Windows machine.)

If the parent itself dies, the worker notices on its own (end of stdin, or the ``--parent-pid``
process gone; see ``DiffusionAnomalyLib.worker``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

#: how often terminate() looks whether the process tree has ended (seconds)
POLL_INTERVAL = 0.05


def engine_root() -> Path:
    """The folder holding the ``DiffusionAnomalyLib`` package, for the worker's PYTHONPATH.

    The worker is a new interpreter (``PythonSlicer`` or another Python) that may not see the
    engine: ask the import system where the package is (``find_spec`` locates it without
    importing it, so no torch), and fall back to the source-tree layout
    (``<root>/DiffusionAnomaly/DiffusionAnomalyModuleLib/process.py``) when it is not importable here.
    """
    spec = importlib.util.find_spec("DiffusionAnomalyLib")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations))).resolve().parent
    return Path(__file__).resolve().parents[2]


def _group_running(pgid: int) -> bool:
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
        proc.poll()  # reap the launcher, so that it does not linger in the group as a zombie
        if not _group_running(pgid):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_INTERVAL)


class WorkerClient:
    """Starts and talks to a worker process (used by the Slicer module's logic; no Slicer, no torch).

    Messages are read by a background thread into a queue, so :meth:`messages` never blocks the
    caller (the Slicer UI polls it from a timer). :meth:`terminate` is the cancel: the worker's
    whole process tree ends; the caller's state is untouched.

    ``python`` is the interpreter or launcher to run (``PythonSlicer`` in Slicer); ``parent_pid``
    is the process whose end makes the worker quit by itself (default: this process).
    """

    def __init__(self, checkpoint: str | Path, device: str = "auto", python: str | None = None,
                 threads: int = 0, env: dict[str, str] | None = None, parent_pid: int | None = None):
        self.checkpoint = str(checkpoint)
        self.device = device
        self.python = python or sys.executable
        self.threads = threads
        self.env = env
        self.parent_pid = os.getpid() if parent_pid is None else parent_pid
        self.process: subprocess.Popen | None = None
        self.ready: dict[str, Any] | None = None
        self.stderr_tail: list[str] = []
        self._queue: queue.Queue | None = None
        self._next_id = 0
        self._terminated = False

    def command(self) -> list[str]:
        cmd = [self.python, "-m", "DiffusionAnomalyLib.worker", "--checkpoint", self.checkpoint,
               "--device", self.device, "--parent-pid", str(self.parent_pid)]
        if self.threads:
            cmd += ["--threads", str(self.threads)]
        return cmd

    def start(self) -> "WorkerClient":
        env = dict(os.environ)
        root = str(engine_root())
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.update(self.env or {})
        self._queue = queue.Queue()
        self._terminated = False
        kwargs: dict[str, Any] = {}
        if os.name == "nt":  # no console window; a group of its own, ended as a tree by terminate()
            kwargs["creationflags"] = (getattr(subprocess, "CREATE_NO_WINDOW", 0)
                                       | getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0))
        else:  # a session, hence a process group, of its own: terminate() signals the whole group
            kwargs["start_new_session"] = True
        self.process = subprocess.Popen(self.command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, encoding="utf-8", env=env, bufsize=1,
                                        **kwargs)
        proc, q = self.process, self._queue

        def read_stdout() -> None:
            for line in proc.stdout:
                line = line.strip()
                if not line:
                    continue
                try:
                    q.put(json.loads(line))
                except json.JSONDecodeError:
                    self._keep_stderr(line)
            q.put({"type": "exit", "returncode": proc.wait()})

        def read_stderr() -> None:
            for line in proc.stderr:
                self._keep_stderr(line.rstrip())

        threading.Thread(target=read_stdout, daemon=True).start()
        threading.Thread(target=read_stderr, daemon=True).start()
        return self

    def _keep_stderr(self, line: str) -> None:
        self.stderr_tail.append(line)
        del self.stderr_tail[:-200]

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def send(self, request: dict[str, Any]) -> int:
        """Send one request; returns its id."""
        if not self.alive:
            raise RuntimeError("the inference worker is not running.")
        self._next_id += 1
        request = {**request, "id": self._next_id}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._next_id

    def messages(self, timeout: float = 0.0) -> list[dict[str, Any]]:
        """All messages received so far (waiting up to ``timeout`` s for the first one)."""
        out = []
        if self._queue is None:
            return out
        try:
            out.append(self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait())
            while True:
                out.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        for m in out:
            if m.get("type") == "ready":
                self.ready = m
        return out

    def failure(self, message: dict[str, Any]) -> str:
        """The sentence to show for an exit or fatal error message."""
        if message.get("type") == "error":
            return message.get("message", "the inference worker failed.")
        tail = " | ".join(line for line in self.stderr_tail[-3:] if line)
        return (f"the inference worker stopped unexpectedly (exit code {message.get('returncode')})"
                + (f": {tail}" if tail else "."))

    def request(self, request: dict[str, Any], progress: Callable[[float, str], None] | None = None,
                timeout: float | None = None) -> dict[str, Any]:
        """Send a request and block until its result (for scripts and tests); errors raise RuntimeError."""
        request_id = self.send(request)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"the inference worker did not answer within {timeout} s.")
            for m in self.messages(timeout=0.1):
                kind = m.get("type")
                if kind == "progress" and m.get("id") == request_id and progress is not None:
                    progress(m["fraction"], m["message"])
                elif kind == "error" and m.get("id") in (request_id, None):
                    raise RuntimeError(m["message"])
                elif kind == "exit":
                    raise RuntimeError(self.failure(m))
                elif m.get("id") == request_id and kind in ("result", "stats", "bye"):
                    return m

    def wait_ready(self, timeout: float | None = None) -> dict[str, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.ready is None:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"the inference worker did not start within {timeout} s.")
            for m in self.messages(timeout=0.1):
                if m.get("type") == "error":
                    raise RuntimeError(m["message"])
                if m.get("type") == "exit":
                    raise RuntimeError(self.failure(m))
        return self.ready

    def terminate(self, timeout: float = 5.0) -> None:
        """Stop the worker's whole process tree now (cancel) and wait until it has ended; safe to call twice."""
        proc = self.process
        if proc is None or self._terminated:
            return
        self._terminated = True
        if os.name == "nt":
            self._terminate_windows(proc, timeout)
        else:
            self._terminate_posix(proc, timeout)
        try:
            proc.stdin.close()
        except OSError:
            pass
        self.ready = None

    @staticmethod
    def _terminate_posix(proc: subprocess.Popen, timeout: float) -> None:
        pgid = proc.pid  # start_new_session: the launcher leads its own process group
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

    @staticmethod
    def _terminate_windows(proc: subprocess.Popen, timeout: float) -> None:
        # Untested here (no Windows CI). taskkill /T ends the launcher and its descendants, found
        # through their parent ids; it cannot reach a child whose launcher has already ended, so
        # that child relies on the worker's own parent watchdog.
        if proc.poll() is None:
            subprocess.run(["taskkill", "/T", "/F", "/PID", str(proc.pid)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),
                           check=False)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Ask the worker to quit, then make sure its process tree is gone."""
        if self.alive:
            try:
                self.send({"cmd": "quit"})
                self.process.wait(timeout=timeout)
            except (OSError, RuntimeError, subprocess.TimeoutExpired):
                pass
        self.terminate()
