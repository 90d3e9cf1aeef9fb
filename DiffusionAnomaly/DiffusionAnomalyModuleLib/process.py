"""The background process: starts the inference worker (``python -m DiffusionAnomalyLib.worker``) and talks to it.

No Slicer, no torch: Slicer's own process imports this file, and the logic drives it from the UI
thread through a queue. The module file (``DiffusionAnomaly.py``) puts the engine on the path.

Cancel stops the whole process tree: in Slicer the worker is started through the ``PythonSlicer``
launcher, which runs the real interpreter as its child, so killing the launcher alone would leave
the worker computing. The worker is started and ended as a tree of its own by the engine's
:mod:`DiffusionAnomalyLib.processes` (process group / session on POSIX, ``taskkill /T`` on Windows).

If the parent itself dies, the worker notices on its own (end of stdin, or the ``--parent-pid``
process gone; see ``DiffusionAnomalyLib.worker``).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from DiffusionAnomalyLib import processes


def engine_root() -> Path:
    """The folder holding the ``DiffusionAnomalyLib`` package this process imports, for the worker's PYTHONPATH.

    The worker is a new interpreter (``PythonSlicer`` or another Python) that may not see the engine.
    """
    return Path(processes.__file__).resolve().parents[1]


class WorkerClient:
    """Starts and talks to a worker process (used by the Slicer module's logic; no Slicer, no torch).

    Messages are read by a background thread into a queue, so :meth:`messages` never blocks the
    caller (the Slicer UI polls it from a timer). :meth:`terminate` is the cancel: the worker's
    whole process tree ends; the caller's state is untouched.

    ``python`` is the interpreter or launcher to run (``PythonSlicer`` in Slicer); ``parent_pid``
    is the process whose end makes the worker quit by itself (default: this process). ``classifier``:
    the guidance classifier checkpoint of the classifier-guided methods (None: the worker takes the
    bundled one that fits its model).
    """

    def __init__(self, checkpoint: str | Path, device: str = "auto", python: str | None = None,
                 threads: int = 0, env: dict[str, str] | None = None, parent_pid: int | None = None,
                 classifier: str | Path | None = None):
        self.checkpoint = str(checkpoint)
        self.classifier = str(classifier) if classifier else None
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
        if self.classifier:
            cmd += ["--classifier", self.classifier]
        return cmd

    def start(self) -> "WorkerClient":
        env = dict(os.environ)
        root = str(engine_root())
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.update(self.env or {})
        self._queue = queue.Queue()
        self._terminated = False
        self.process = processes.start_tree(self.command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True, encoding="utf-8", env=env,
                                            bufsize=1)
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
        processes.end_tree(proc, timeout)
        try:
            proc.stdin.close()
        except OSError:
            pass
        self.ready = None

    def close(self, timeout: float = 5.0) -> None:
        """Ask the worker to quit, then make sure its process tree is gone."""
        if self.alive:
            try:
                self.send({"cmd": "quit"})
                self.process.wait(timeout=timeout)
            except (OSError, RuntimeError, subprocess.TimeoutExpired):
                pass
        self.terminate()
