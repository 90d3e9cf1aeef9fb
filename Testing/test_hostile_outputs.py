"""Hostile output folders (issue 7, "Output folder safety"): every refusal is exit 2, one ``error:`` sentence,
nothing on disk changed (``run_refused``); the lock, the kill and the failure cases run for real in separate
processes (two runs into one folder at once; SIGKILL at three moments of a run; a failing run)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import slicerio

from DiffusionAnomalyLib import cli, files, processes
from DiffusionAnomalyLib.files import LOCK_NAME, OutputError, output_folder, remove_leftovers
from DiffusionAnomalyLib.methods import load_checkpoint
from DiffusionAnomalyLib.pipeline import RESULT_FILES, analyse, lesions_from_heat
from DiffusionAnomalyLib.postprocessing import Thresholding
from DiffusionAnomalyLib.volume import read_volume, write_volume

from conftest import ROOT, RUN_FILES, error_line, run_refused

#: generous: two slow shared cores, each child imports torch and MONAI
TIMEOUT = 300.0
BUSY = "in use by another diffusion-anomaly run"


def listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


@pytest.fixture(scope="module")
def pet_file(tmp_path_factory, pet_slab) -> Path:
    """A small PET input (20 slices of the small phantom; modality PT, units SUVbw in the header)."""
    return write_volume(pet_slab, tmp_path_factory.mktemp("input") / "pet.nrrd")


def child_env() -> dict[str, str]:
    """The repository's package first (the installed console script may be another checkout), one thread."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def wait_for(condition, timeout: float = TIMEOUT, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Children:
    """Child processes of one test: started with logs in a folder of their own, ended at teardown."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.procs: list[subprocess.Popen] = []

    def start(self, *argv, name: str) -> subprocess.Popen:
        out, err = open(self.logs / f"{name}.out", "wb"), open(self.logs / f"{name}.err", "wb")
        proc = subprocess.Popen([sys.executable, *map(str, argv)], stdout=out, stderr=err, env=child_env(),
                                cwd=self.logs)
        out.close()
        err.close()
        proc.log_name = name  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def stderr(self, proc) -> str:
        return (self.logs / f"{proc.log_name}.err").read_text(errors="replace")

    def end(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=60)


@pytest.fixture()
def children(tmp_path_factory):
    kids = Children(tmp_path_factory.mktemp("logs"))
    yield kids
    kids.end()


#: A child that holds an output folder (files.output_folder, as every verb does) until it is killed.
HOLDER = r"""
import sys, time
from DiffusionAnomalyLib.files import output_folder
with output_folder(sys.argv[1]):
    time.sleep(600)
"""

#: The CLI in a child process, held at one moment of its run (``point``) until the ``gate`` file exists:
#: "analyse" = the folder is locked, the diffusion about to start; "staging" = all but summary.json staged;
#: "moving" = in the middle of moving the staged files into place (one new file in, one old one backed up).
#: The moment is announced by creating the ``marker`` file. Everything else is the real CLI.
CHILD = r"""
import os, pathlib, sys, time
point, marker, gate = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
from DiffusionAnomalyLib import cli, pipeline

def hold():
    marker.touch()
    deadline = time.monotonic() + 600
    while not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.05)

def hold_before(owner, name):
    original = getattr(owner, name)
    def held(*args, **kwargs):
        hold()
        return original(*args, **kwargs)
    setattr(owner, name, held)

if point == "analyse":
    hold_before(cli, "analyse")
elif point == "staging":
    hold_before(pipeline, "write_json")
elif point == "moving":
    original_replace = pathlib.Path.replace
    calls = []
    def replace(self, target):
        result = original_replace(self, target)
        calls.append(target)
        if len(calls) == 3:
            hold()
        return result
    pathlib.Path.replace = replace
sys.exit(cli.main(sys.argv[4:]))
"""


def start_holder(children: Children, folder: Path) -> subprocess.Popen:
    proc = children.start("-c", HOLDER, folder, name=f"holder-{len(children.procs)}")
    wait_for(lambda: (folder / LOCK_NAME).exists() or proc.poll() is not None, what="the holder's lock")
    assert proc.poll() is None, children.stderr(proc)
    return proc


def run_args(pet_file, out, checkpoint, *extra) -> list[str]:
    return ["run", "--input", str(pet_file), "--out", str(out), "--checkpoint", str(checkpoint),
            "--precision", "fp32", "--steps", "2", *map(str, extra)]


# =============================================================================================
# the table: refused before any work, nothing on disk changed
# =============================================================================================
def _previous_results(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in RESULT_FILES:
        (out / name).write_text(f"previous {name}")


def _case(kind: str, tmp: Path, pet: Path, ckpt: Path, children: Children):
    """(argv, watch, words) of one hostile case; ``tmp`` is the test's own folder (always watched)."""
    out = tmp / "out"
    run = ["run", "--checkpoint", ckpt, "--steps", 1]
    if kind == "input-named-like-an-output":
        out.mkdir()
        shutil.copy(pet, out / "heatmap.nrrd")
        return [*run, "--input", out / "heatmap.nrrd", "--out", out], ["heatmap.nrrd", "also an output"]
    if kind == "input-named-like-an-output-via-dotdot":
        out.mkdir()
        shutil.copy(pet, out / "lesions.csv")
        return ([*run, "--input", tmp / "out" / ".." / "out" / "lesions.csv", "--out", f"{out}/"],
                ["lesions.csv", "also an output"])
    if kind == "input-is-a-link-to-an-output":
        out.mkdir()
        shutil.copy(pet, out / "summary.json")
        (tmp / "scan.nrrd").symlink_to(out / "summary.json")
        return [*run, "--input", tmp / "scan.nrrd", "--out", out], ["scan.nrrd", "summary.json", "also an output"]
    if kind == "output-is-a-link-to-the-input":
        out.mkdir()
        shutil.copy(pet, tmp / "pet.nrrd")
        (out / "heatmap.nrrd").symlink_to(tmp / "pet.nrrd")
        return [*run, "--input", tmp / "pet.nrrd", "--out", out], ["pet.nrrd", "heatmap.nrrd", "also an output"]
    if kind == "out-is-the-input-folder":
        out.mkdir()
        shutil.copy(pet, out / "series.nrrd")
        return [*run, "--input", out, "--out", out], ["is the input", "choose another output folder"]
    if kind == "checkpoint-named-like-an-output":
        out.mkdir()
        shutil.copy(ckpt, out / "metrics.json")
        return (["evaluate", "--checkpoint", out / "metrics.json", "--phantoms", 1, "--out", out, "--steps", 1],
                ["checkpoint", "metrics.json", "also an output"])
    if kind == "write-defaults-is-an-output":
        return (["sweep", "--checkpoint", ckpt, "--phantoms", 1, "--noise-levels", "20", "--guidance-values", "0",
                 "--steps", 1, "--out", out, "--write-defaults", out / "sweep.json"], ["--write-defaults", "sweep.json", "also an output"])
    if kind == "out-is-a-file":
        (tmp / "out").write_text("a file")
        return [*run, "--input", pet, "--out", out], [str(out), "is a file"]
    if kind == "out-under-a-file":
        (tmp / "afile").write_text("a file")
        out = tmp / "afile" / "out"
        return [*run, "--input", pet, "--out", out], [str(out), "cannot be created", "is a file"]
    if kind == "out-is-a-broken-link":  # (kept out of ``tmp``: conftest's snapshot reads through links)
        out = tmp.parent / "broken-link"
        out.symlink_to(tmp / "nowhere")
        return [*run, "--input", pet, "--out", out], ["broken link"]
    if kind == "out-is-read-only":  # refused for root too: the folder's own marking is respected
        out.mkdir()
        out.chmod(0o555)
        return [*run, "--input", pet, "--out", out], [str(out), "not writable"]
    if kind == "out-under-a-read-only-folder":
        (tmp / "ro").mkdir()
        (tmp / "ro").chmod(0o555)
        out = tmp / "ro" / "new" / "out"
        return [*run, "--input", pet, "--out", out], [str(out), "cannot be created", "not writable"]
    if kind == "out-locked-by-a-live-run":
        out.mkdir()
        holder = start_holder(children, out)
        return [*run, "--input", pet, "--out", out], [BUSY, f"process {holder.pid}", "wait for it to finish"]
    if kind == "out-locked-on-another-machine":
        out.mkdir()
        (out / LOCK_NAME).write_text(json.dumps({"pid": 4242, "host": "scanner-pc.example", "started": "today"}))
        return [*run, "--input", pet, "--out", out], [BUSY, "process 4242 on scanner-pc.example", LOCK_NAME]
    if kind == "out-lock-being-written":
        out.mkdir()
        (out / LOCK_NAME).write_text("")
        return [*run, "--input", pet, "--out", out], [BUSY]
    if kind == "out-holds-a-folder-named-like-the-lock":
        (out / LOCK_NAME).mkdir(parents=True)
        return [*run, "--input", pet, "--out", out], [LOCK_NAME, "remove it"]
    if kind == "failing-run-leaves-no-folder":  # fails after the folder was created and locked
        (tmp / "corrupt.safetensors").write_bytes(b"\x00 not a checkpoint" * 64)
        out = tmp / "new" / "deeper" / "out"
        return (["run", "--checkpoint", tmp / "corrupt.safetensors", "--input", pet, "--out", out],
                ["corrupt.safetensors"])
    if kind == "failing-run-keeps-previous-results":
        _previous_results(out)
        (tmp / "truncated.nrrd").write_bytes(pet.read_bytes()[:400])
        return [*run, "--input", tmp / "truncated.nrrd", "--out", out], ["truncated.nrrd"]
    if kind == "bad-threshold-leaves-no-folder":
        return [*run, "--input", pet, "--out", tmp / "new" / "out", "--threshold-fraction", "nan"], ["threshold"]
    raise ValueError(kind)


CASES = [
    "input-named-like-an-output",
    "input-named-like-an-output-via-dotdot",
    "input-is-a-link-to-an-output",
    "output-is-a-link-to-the-input",
    "out-is-the-input-folder",
    "checkpoint-named-like-an-output",
    "write-defaults-is-an-output",
    "out-is-a-file",
    "out-under-a-file",
    "out-is-a-broken-link",
    "out-is-read-only",
    "out-under-a-read-only-folder",
    "out-locked-by-a-live-run",
    "out-locked-on-another-machine",
    "out-lock-being-written",
    "out-holds-a-folder-named-like-the-lock",
    "failing-run-leaves-no-folder",
    "failing-run-keeps-previous-results",
    "bad-threshold-leaves-no-folder",
]


@pytest.fixture()
def restore_permissions(tmp_path):
    yield
    for p in [tmp_path, *tmp_path.rglob("*")]:
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o755)


@pytest.mark.parametrize("kind", CASES)
def test_hostile_output_folder_is_refused(kind, tmp_path, capsys, tiny_checkpoint, pet_file, children,
                                          restore_permissions, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the refusal came after the diffusion started")

    monkeypatch.setattr(cli, "analyse", no_network)
    case = tmp_path / "case"
    case.mkdir()
    argv, words = _case(kind, case, pet_file, tiny_checkpoint, children)
    line = run_refused(capsys, *argv, watch=(case, pet_file, tiny_checkpoint))
    for word in words:
        assert word in line, f"{word!r} not in {line!r}"


WRITING_VERBS = {
    "phantom": ["phantom", "--seed", "3"],
    "run": ["run", "--input", "{pet}", "--checkpoint", "{ckpt}", "--steps", "1"],
    "evaluate": ["evaluate", "--checkpoint", "{ckpt}", "--phantoms", "1", "--steps", "1"],
    "sweep": ["sweep", "--checkpoint", "{ckpt}", "--phantoms", "1", "--noise-levels", "20", "--guidance-values", "0",
              "--steps", "1"],
    "demo": ["demo", "--checkpoint", "{ckpt}", "--steps", "1"],
}


@pytest.mark.parametrize("verb", sorted(WRITING_VERBS))
@pytest.mark.parametrize("kind", ["locked", "a-file", "read-only"])
def test_every_writing_verb_refuses_a_folder_it_cannot_have(verb, kind, tmp_path, capsys, tiny_checkpoint, pet_file,
                                                            children, restore_permissions):
    out = tmp_path / "out"
    if kind == "a-file":
        out.write_text("x")
        words = ["is a file"]
    else:
        out.mkdir()
        (out / "keep.txt").write_text("someone else's")
        if kind == "read-only":
            out.chmod(0o555)
            words = ["not writable"]
        else:
            holder = start_holder(children, out)
            words = [BUSY, f"process {holder.pid}"]
    argv = [a.format(pet=pet_file, ckpt=tiny_checkpoint) for a in WRITING_VERBS[verb]] + ["--out", str(out)]
    line = run_refused(capsys, *argv, watch=(tmp_path, pet_file, tiny_checkpoint))
    for word in words:
        assert word in line, f"{word!r} not in {line!r}"


# =============================================================================================
# locks of ended runs, leftovers of killed runs
# =============================================================================================
def _ended_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("lock", ["ended-process", "reused-pid", "before-reboot", "torn-and-old"])
def test_a_lock_of_an_ended_run_is_taken_over(lock, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    host = socket.gethostname()
    if lock == "ended-process":
        record = {"pid": _ended_pid(), "host": host, "started": "earlier"}
    elif lock == "reused-pid":  # our own pid, but a process that started at another time
        record = {"pid": os.getpid(), "process_start": -1, "host": host, "started": "earlier"}
        if processes.proc_stat(os.getpid())[1] is None:
            pytest.skip("process start times need Linux /proc")
    elif lock == "before-reboot":
        record = {"pid": os.getpid(), "boot_id": "another-boot", "host": host, "started": "earlier"}
        if files._boot_id() is None:
            pytest.skip("boot ids need Linux /proc")
    else:
        record = None
    (out / LOCK_NAME).write_text("" if record is None else json.dumps(record))
    if record is None:  # a lock file its writer never finished, long ago
        old = time.time() - 3600
        os.utime(out / LOCK_NAME, (old, old))
    assert cli.main(["phantom", "--out", str(out), "--seed", "3"]) == 0, capsys.readouterr().err
    assert listing(out) == {f"phantom_000003_{kind}.nrrd" for kind in ("pet", "lesions", "ct", "organs")} | {"phantom_000003.json"}


def test_leftovers_of_ended_runs_are_removed_and_a_live_run_is_left_alone(tmp_path, children):
    out = tmp_path / "out"
    out.mkdir()
    dead = _ended_pid()
    live = children.start("-c", "import time; time.sleep(600)", name="live")
    for name in (f".staging-{dead}-0badc0de", ".staging-1a2b3c4d", f".staging-{live.pid}-0011aabb"):
        (out / name / ".previous").mkdir(parents=True)
        (out / name / "heatmap.nrrd").write_text("half a set")
    (out / f".heatmap.nrrd.{dead}-deadbeef.partial.nrrd").write_text("half a file")
    (out / f"{LOCK_NAME}.stale-{dead}-cafe0123").write_text("{}")
    (out / "results.txt").write_text("the user's")
    with output_folder(out) as held:
        assert (held / LOCK_NAME).exists()
    assert listing(out) == {"results.txt", f".staging-{live.pid}-0011aabb"}
    assert remove_leftovers(out) == []


def test_the_lock_is_reentrant_in_one_thread_and_refuses_another(tmp_path):
    out = tmp_path / "out"
    errors = []
    with output_folder(out):
        with output_folder(out):  # a verb around write_outputs
            assert (out / LOCK_NAME).exists()
        assert (out / LOCK_NAME).exists()

        def other():
            try:
                with output_folder(out):
                    pass
            except OutputError as exc:
                errors.append(str(exc))

        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert len(errors) == 1 and BUSY in errors[0] and f"process {os.getpid()}" in errors[0]
    assert listing(out) == set()


@pytest.mark.parametrize("stop", [KeyboardInterrupt, OSError])
def test_a_run_stopped_midway_leaves_the_folder_as_found(stop, tmp_path, capsys, tiny_checkpoint, pet_file,
                                                         monkeypatch):
    def broken(*args, **kwargs):
        raise stop(28, "No space left on device") if stop is OSError else stop()

    monkeypatch.setattr(cli, "analyse", broken)
    new = tmp_path / "new" / "out"
    assert cli.main(run_args(pet_file, new, tiny_checkpoint)) == (130 if stop is KeyboardInterrupt else 2)
    assert not (tmp_path / "new").exists()
    old = tmp_path / "old"
    _previous_results(old)
    before = {p: p.read_bytes() for p in old.iterdir()}
    assert cli.main(run_args(pet_file, old, tiny_checkpoint)) != 0
    assert {p: p.read_bytes() for p in old.iterdir()} == before  # no lock, no staging folder left
    err = capsys.readouterr().err
    assert "Traceback" not in err


#: A child that races for ``out`` at ``start`` (epoch seconds) and holds it 0.5 s; "fail" makes its run fail
#: while holding it. Exit 0 = held, 3 = refused, 4 = held and failed, 5 = another holder was inside too.
RACER = r"""
import os, sys, time
from pathlib import Path
from DiffusionAnomalyLib.files import OutputError, output_folder
out, start, fail = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3] == "fail"
time.sleep(max(0.0, start - time.time()))
try:
    with output_folder(out):
        others = [p.name for p in out.glob("inside-*")]
        mine = out / f"inside-{os.getpid()}"
        mine.touch()
        time.sleep(0.5)
        mine.unlink()
        if others:
            sys.exit(5)
        if fail:
            raise RuntimeError("the run failed")
except OutputError as exc:
    print(exc)
    sys.exit(3)
except RuntimeError:
    sys.exit(4)
"""


def test_many_processes_racing_for_one_new_folder_never_overlap(tmp_path, children):
    """Half the holders fail (and remove the folder they created); no two are ever inside at once, a failing
    run never removes a folder another run created or holds, and nothing is left at the end."""
    out = tmp_path / "new" / "out"
    start = time.time() + 3.0  # every racer imported and waiting by then (the package import is light)
    procs = [children.start("-c", RACER, out, start, "fail" if n % 2 else "ok", name=f"racer{n}") for n in range(6)]
    codes = [p.wait(timeout=TIMEOUT) for p in procs]
    assert 5 not in codes, "two runs held the folder at once"
    assert set(codes) <= {0, 3, 4} and codes.count(0) + codes.count(4) >= 1, \
        [(code, children.stderr(proc)) for proc, code in zip(procs, codes)]
    for proc, code in zip(procs, codes):
        if code == 3:
            assert "out" in (children.logs / f"{proc.log_name}.out").read_text()
    assert listing(out) == set(), "no lock, no marker left"


# =============================================================================================
# for real: two processes, SIGKILL, a failing process
# =============================================================================================
@pytest.fixture(scope="module")
def fp32_model(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint, device="cpu", precision="fp32")


def assert_one_consistent_set(out: Path, pet_file: Path, model, expected: dict) -> None:
    """The folder holds exactly one run's five files: the summary's parameters made the heat map, and the
    segmentation and table are that heat map thresholded as the summary says."""
    assert listing(out) == set(RUN_FILES), "no staging folder, lock or partial file may be left"
    summary = json.loads((out / "summary.json").read_text())
    params = summary["parameters"]
    assert {k: params[k] for k in expected} == expected
    image = read_volume(pet_file)
    heat = read_volume(out / "heatmap.nrrd", validate=False)
    again = analyse(model, image, parameters={k: params[k] for k in ("noise_level", "guidance_scale", "steps")})
    np.testing.assert_allclose(heat.voxels, again.heatmap.voxels, rtol=1e-4, atol=1e-4)
    thresholding = Thresholding(params["threshold_method"], params["threshold_value"], params["min_size_ml"])
    labels, table = lesions_from_heat(heat, image, thresholding)
    seg = slicerio.read_segmentation(str(out / "lesions.seg.nrrd"))
    np.testing.assert_array_equal(seg["voxels"].transpose(2, 1, 0), labels)
    with open(out / "lesions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(int(r["id"]), int(r["voxels"])) for r in rows] == [(r["id"], r["voxels"]) for r in table]
    assert summary["lesion_count"] == len(table)


def test_two_runs_into_one_folder_at_once(tmp_path, children, tiny_checkpoint, pet_file, fp32_model):
    """Both processes start together; whichever locks the folder first runs (held at the start of its
    diffusion until the other has ended), the other is refused: exit 2 and the lock sentence with the pid."""
    out, gate = tmp_path / "out", tmp_path / "gate"
    params = [("1.0", "0.4"), ("4.0", "0.6")]
    procs = [children.start("-c", CHILD, "analyse", tmp_path / f"marker{n}", gate,
                            *run_args(pet_file, out, tiny_checkpoint, "--guidance-scale", w, "--threshold-fraction", t),
                            name=f"run{n}") for n, (w, t) in enumerate(params)]
    wait_for(lambda: any(p.poll() is not None for p in procs), what="one of the two runs to be refused")
    loser = next(p for p in procs if p.poll() is not None)
    winner = next(p for p in procs if p is not loser)
    assert loser.returncode == 2, children.stderr(loser)
    line = error_line(children.stderr(loser))
    assert BUSY in line and f"process {winner.pid}" in line
    assert winner.poll() is None, "the winner holds the folder until its outputs are in place"
    gate.touch()
    assert winner.wait(timeout=TIMEOUT) == 0, children.stderr(winner)
    w, t = params[procs.index(winner)]
    assert_one_consistent_set(out, pet_file, fp32_model, {"guidance_scale": float(w), "threshold_value": float(t)})


@pytest.mark.parametrize("moment", ["analyse", "staging", "moving"])
def test_a_run_killed_at_any_moment_is_cleaned_up_by_the_next(moment, tmp_path, capsys, children, tiny_checkpoint,
                                                              pet_file, fp32_model):
    out, marker = tmp_path / "out", tmp_path / "marker"
    if moment == "moving":  # a previous set, so that moving into place backs up old files
        assert cli.main(run_args(pet_file, out, tiny_checkpoint, "--guidance-scale", "0.5")) == 0
    proc = children.start("-c", CHILD, moment, marker, tmp_path / "never",
                          *run_args(pet_file, out, tiny_checkpoint, "--guidance-scale", "2.0"), name="killed")
    wait_for(lambda: marker.exists() or proc.poll() is not None, what=f"the run to reach {moment}")
    assert proc.poll() is None, children.stderr(proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    left = listing(out)
    assert LOCK_NAME in left
    if moment != "analyse":
        assert any(name.startswith(".staging-") for name in left), left
    capsys.readouterr()
    assert cli.main(run_args(pet_file, out, tiny_checkpoint, "--guidance-scale", "3.5", "--threshold-fraction", "0.45")) == 0
    assert_one_consistent_set(out, pet_file, fp32_model, {"guidance_scale": 3.5, "threshold_value": 0.45})


def test_a_failing_run_process_leaves_no_folder(tmp_path, children, tiny_checkpoint):
    bad = tmp_path / "bad.nrrd"
    bad.write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 4 4\n\n")
    out = tmp_path / "new" / "out"
    proc = children.start("-m", "DiffusionAnomalyLib.cli", "run", "--input", bad, "--out", out,
                          "--checkpoint", tiny_checkpoint, name="failing")
    assert proc.wait(timeout=TIMEOUT) == 2
    assert "bad.nrrd" in error_line(children.stderr(proc))
    assert listing(tmp_path) == {"bad.nrrd"}
