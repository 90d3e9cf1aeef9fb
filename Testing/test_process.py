"""The worker's process tree (DiffusionAnomalyModuleLib.process, DiffusionAnomalyLib.worker), with real processes.

In Slicer the worker is started through the ``PythonSlicer`` launcher, which runs the real
interpreter as its child. These tests start it the same way, through a small launcher script,
and check that cancelling mid-run leaves no process of the tree, and that a worker whose stdin
closes, whose launcher dies or whose parent process ends stops by itself, even mid-run.

Processes are found in /proc by a token in their environment (Linux only); a zombie counts as
ended (it runs nothing, and in containers whose PID 1 does not reap, orphans' zombies stay).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from DiffusionAnomalyLib.processes import process_watch
from DiffusionAnomalyLib.volume import write_volume

MODULE = Path(__file__).resolve().parents[1] / "DiffusionAnomaly"
sys.path.insert(0, str(MODULE))

from DiffusionAnomalyModuleLib.process import WorkerClient, engine_root  # noqa: E402

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads the process table in /proc")

#: a run that would take minutes on a CPU (stride-1 reference loop from a high noise level): still
#: running whenever a test acts on it
LONG_RUN = {"cmd": "run", "parameters": {"noise_level": 900, "steps": "reference"}}

#: generous limits for a slow, busy 2-core machine
START_TIMEOUT = 300.0
EXIT_TIMEOUT = 20.0

LAUNCHER = """\
#!{python}
# Like PythonSlicer: runs the real interpreter as a child, passes stdio through and waits for it.
# Reports the child's pid; on SIGTERM it dies without stopping the child (as a launcher does).
import os, subprocess, sys

child = subprocess.Popen([{python!r}, *sys.argv[1:]])
with open(os.environ["DA_TEST_PIDFILE"] + ".tmp", "w") as f:
    f.write(str(child.pid))
os.replace(os.environ["DA_TEST_PIDFILE"] + ".tmp", os.environ["DA_TEST_PIDFILE"])
sys.exit(child.wait())
"""


def _running(pid: int) -> bool:
    """Whether ``pid`` is a process that has not ended (a zombie has): the project's own check."""
    return process_watch(pid)()


def tree(token: str) -> list[int]:
    """The running processes whose environment holds the token: every process the test started."""
    needle = f"DA_TEST_TOKEN={token}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0") and _running(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def wait_until(condition, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


class Launched:
    """A WorkerClient started through the launcher script, with its token and the worker's pid."""

    def __init__(self, checkpoint, tmp_path: Path, parent_pid: int | None = None):
        self.token = uuid.uuid4().hex
        self.pidfile = tmp_path / "worker.pid"
        launcher = tmp_path / "PythonSlicer"
        launcher.write_text(LAUNCHER.format(python=sys.executable))
        launcher.chmod(0o755)
        self.client = WorkerClient(checkpoint, device="cpu", python=str(launcher), threads=1, parent_pid=parent_pid,
                                   env={"DA_TEST_TOKEN": self.token, "DA_TEST_PIDFILE": str(self.pidfile)})

    @property
    def launcher_pid(self) -> int:
        return self.client.process.pid

    @property
    def worker_pid(self) -> int:
        assert wait_until(self.pidfile.exists, START_TIMEOUT)
        return int(self.pidfile.read_text())

    def start_long_run(self, tmp_path: Path, volume) -> None:
        """Start the worker, send the long run and return once the diffusion loop is running."""
        self.client.start()
        ready = self.client.wait_ready(timeout=START_TIMEOUT)
        assert ready["pid"] == self.worker_pid != self.launcher_pid  # the worker is the launcher's child
        assert sorted(tree(self.token)) == sorted([self.launcher_pid, self.worker_pid])
        out = tmp_path / "out"
        out.mkdir()
        self.client.send({**LONG_RUN, "input": str(write_volume(volume, tmp_path / "input.nrrd")),
                          "out_dir": str(out)})
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            msgs = self.client.messages(timeout=0.2)
            assert not [m for m in msgs if m["type"] in ("result", "error", "exit")], msgs
            if any(m["type"] == "progress" and m["message"].startswith("encoding") for m in msgs):
                return
        pytest.fail("the long run did not start")

    def cleanup(self) -> None:
        for pid in tree(self.token):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.client.process is not None:
            self.client.terminate()


@pytest.fixture()
def launch(tiny_checkpoint, tmp_path):
    started = []

    def make(**kwargs) -> Launched:
        started.append(Launched(tiny_checkpoint, tmp_path, **kwargs))
        return started[-1]

    yield make
    for launched in started:
        launched.cleanup()


def test_cancel_mid_run_ends_the_whole_tree(launch, tmp_path, pet_slab):
    w = launch()
    w.start_long_run(tmp_path, pet_slab)
    t0 = time.monotonic()
    w.client.terminate()
    # nothing of the tree is left when terminate() returns: not the launcher, not the worker
    assert tree(w.token) == []
    assert not _running(w.launcher_pid) and not _running(w.worker_pid)
    assert time.monotonic() - t0 < EXIT_TIMEOUT
    assert not w.client.alive
    assert list((tmp_path / "out").iterdir()) == []
    w.client.terminate()  # twice: nothing happens


def test_worker_exits_when_its_stdin_closes_mid_run(launch, tmp_path, pet_slab):
    w = launch()
    w.start_long_run(tmp_path, pet_slab)
    w.client.process.stdin.close()  # what the end of the parent does to the pipe
    assert wait_until(lambda: not tree(w.token), EXIT_TIMEOUT)
    assert w.client.process.wait(timeout=EXIT_TIMEOUT) == 0  # the launcher passes the worker's exit code on
    assert any("stdin closed" in line for line in w.client.stderr_tail)


def test_worker_exits_when_its_launcher_dies_mid_run(launch, tmp_path, pet_slab):
    w = launch()
    w.start_long_run(tmp_path, pet_slab)
    worker_pid = w.worker_pid
    os.kill(w.launcher_pid, signal.SIGKILL)  # the launcher alone; stdin stays open (the client holds it)
    w.client.process.wait(timeout=EXIT_TIMEOUT)
    assert wait_until(lambda: not _running(worker_pid), EXIT_TIMEOUT)
    assert tree(w.token) == []


def test_worker_exits_when_its_parent_process_ends_mid_run(launch, tmp_path, pet_slab):
    # the UI process stand-in: the worker is told to watch it; stdin stays open (the client holds it)
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    try:
        w = launch(parent_pid=parent.pid)
        w.start_long_run(tmp_path, pet_slab)
        assert tree(w.token)
    finally:
        parent.kill()
        parent.wait()
    assert wait_until(lambda: not tree(w.token), EXIT_TIMEOUT)
    assert w.client.process.wait(timeout=EXIT_TIMEOUT) == 3  # worker.EXIT_PARENT_GONE, passed on by the launcher
    assert any(f"parent process {parent.pid} ended" in line for line in w.client.stderr_tail)


def test_engine_root_without_the_engine_installed():
    """process.py is torch-free, and gives the worker the engine of the source tree the module file puts on the path."""
    assert (engine_root() / "DiffusionAnomalyLib" / "__init__.py").is_file()
    code = textwrap.dedent(f"""
        import importlib.util, sys
        assert importlib.util.find_spec("DiffusionAnomalyLib") is None
        sys.path += [{str(MODULE)!r}, {str(MODULE.parent)!r}]  # what DiffusionAnomaly.py does
        from DiffusionAnomalyModuleLib.process import engine_root
        print(engine_root())
        assert "torch" not in sys.modules and "numpy" not in sys.modules
    """)
    # -I -S: no site-packages (so no editable install), no PYTHONPATH, no current folder
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True,
                         cwd=str(MODULE.parent.parent), check=True)
    assert Path(out.stdout.strip()) == engine_root() == MODULE.parent
