"""Running TotalSegmentator in its own environment (DiffusionAnomalyLib.totalsegmentator), without installing it.

Each test makes a fake environment: a folder shaped like a venv whose ``bin/TotalSegmentator`` is
a small Python script (written here) that records its command line and environment, prints
TotalSegmentator's progress lines and then, by ``FAKE_TS_MODE``: writes a multi-label NIfTI on
the input's grid, fails like TotalSegmentator offline (a requests ConnectionError while
downloading weights), crashes, writes a partial file and fails, or sleeps with a child of its
own (for cancel of the whole tree). The real program is run by hand (see the issue's note).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import run_refused, snapshot

from DiffusionAnomalyLib.processes import process_watch
from DiffusionAnomalyLib import cli, totalsegmentator as ts
from DiffusionAnomalyLib.processes import end_tree, run_lines, start_tree
from DiffusionAnomalyLib.progress import Cancelled
from DiffusionAnomalyLib.roi import ORGAN_GROUPS
from DiffusionAnomalyLib.volume import Volume, ijk_to_ras_matrix, read_volume, write_volume

FAKE = '''#!{python}
# A stand-in for TotalSegmentator's console script: what it prints, what it writes, how it fails.
import json, os, subprocess, sys, time
args = sys.argv[1:]
record = os.environ.get("FAKE_TS_RECORD")
if record:
    keep = ("PYTHONPATH", "PYTHONHOME", "TOTALSEG_HOME_DIR", "TOTALSEG_WEIGHTS_PATH", "VIRTUAL_ENV", "PYTHONUNBUFFERED")
    with open(record, "w") as f:
        json.dump({{"argv": args, "cwd": os.getcwd(), "env": {{k: os.environ.get(k) for k in keep}}}}, f)
mode = os.environ.get("FAKE_TS_MODE", "ok")
out = args[args.index("-o") + 1]
print()
print("If you use this tool please cite: https://pubs.rsna.org/doi/10.1148/ryai.230024")
if mode == "nogpu":
    print("No GPU detected. Running on CPU. This can be very slow.", flush=True)
if mode == "offline":
    print("Downloading model for Task 297 ...", flush=True)
    print("Traceback (most recent call last):")
    print('  File "/env/lib/python3.11/site-packages/urllib3/connection.py", line 239, in _new_conn')
    print("socket.gaierror: [Errno -2] Name or service not known")
    print("requests.exceptions.ConnectionError: HTTPSConnectionPool(host='github.com', port=443): Max retries "
          "exceeded with url: /wasserth/TotalSegmentator/releases/download/v2.0.0-weights/"
          "Dataset297_TotalSegmentator_total_3mm_1559subj.zip (Caused by NameResolutionError(\\"HTTPSConnection("
          "host='github.com', port=443): Failed to resolve 'github.com' ([Errno -2] Name or service not known)\\"))",
          file=sys.stderr)
    sys.exit(1)
if "--roi_subset" in args:
    print("Generating rough segmentation for cropping...")
    print("Resampling...")
    print("Predicting...")
    print("  Predicted in 1.00s")
    print("Resampling...")
print("Resampling...")
print("  Resampled in 0.10s")
if mode == "sleep":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(os.environ["FAKE_TS_PIDS"] + ".tmp", "w") as f:
        json.dump([os.getpid(), child.pid], f)
    os.replace(os.environ["FAKE_TS_PIDS"] + ".tmp", os.environ["FAKE_TS_PIDS"])
    print("Predicting part 1 of 5 ...", flush=True)
    time.sleep(600)
for part in (1, 2):
    print(f"Predicting part {{part}} of 2 ...", flush=True)
    time.sleep(float(os.environ.get("FAKE_TS_PAUSE", "0")))  # lets a poller see each part
    for percent in (0, 50, 100):
        print(f"{{percent:3d}}%|#####     | {{percent}}/100 [00:01<00:01]", end="\\r", flush=True)
    print()
print("  Predicted in 2.00s")
if mode == "crash":
    print("Traceback (most recent call last):", file=sys.stderr)
    print("KeyError: 'nnUNet_results'", file=sys.stderr)
    sys.exit(1)
if mode == "silent":
    sys.exit(0)
if mode == "killed":
    os.kill(os.getpid(), 9)
print("Saving segmentations...", flush=True)
import SimpleITK as sitk
image = sitk.ReadImage(args[args.index("-i") + 1])
labels = sitk.Image(image.GetSize(), sitk.sitkUInt8)
labels.CopyInformation(image)
labels[2:6, 2:6, 1:3] = 5  # liver
labels[8:12, 2:6, 1:3] = 3  # kidney_left
sitk.WriteImage(labels, out, True)
if mode == "partial":
    sys.exit(1)
print("  Saved in 0.50s", flush=True)
'''

NAMES = '''#!{python}
# A stand-in for the environment's Python asked for TotalSegmentator's class names.
import json
print(json.dumps(["kidney_left", "kidney_right", "liver", "spleen", "urinary_bladder"]))
'''


def _script(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.format(python=sys.executable))
    path.chmod(0o755)
    return path


@pytest.fixture()
def fake_env(tmp_path, monkeypatch):
    """A venv-like folder with a fake TotalSegmentator program; TotalSegmentator's home in tmp_path."""
    env = tmp_path / "ts-env"
    _script(env / "bin" / "TotalSegmentator", FAKE)
    monkeypatch.setenv(ts.ENV_VARIABLE, str(env))
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "ts-home"))
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    monkeypatch.setenv("FAKE_TS_RECORD", str(tmp_path / "record.json"))
    return env


@pytest.fixture()
def ct(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    voxels = rng.normal(40, 200, size=(4, 16, 16)).clip(-1000, 2000).astype(np.int16)
    volume = Volume(voxels, ijk_to_ras_matrix((2.0, 2.0, 3.0), (10.0, -20.0, 5.0)), modality="CT", units="HU")
    return write_volume(volume, tmp_path / "ct.nii.gz")


def _record(tmp_path) -> dict:
    return json.loads((tmp_path / "record.json").read_text())


def _running(pid: int) -> bool:
    """Whether ``pid`` is a process that has not ended (a zombie has): the project's own check."""
    return process_watch(pid)()


# ---- the command line it is given ----------------------------------------------------------------
def test_command_line():
    cmd = ts.command("/env/bin/TotalSegmentator", "ct.nii.gz", "seg.nii.gz")
    assert cmd == ["/env/bin/TotalSegmentator", "-i", "ct.nii.gz", "-o", "seg.nii.gz", "--ml", "--device", "gpu"]
    cmd = ts.command("TS", "ct.nii.gz", "seg.nii.gz", organs=["liver", "kidney_left"], fast=True, device="cpu")
    assert cmd[5:] == ["--ml", "--device", "cpu", "--fast", "--roi_subset", "liver", "kidney_left"]
    assert "--statistics" not in cmd and "-s" not in cmd  # no organ statistics; usage statistics: see below
    assert ts.command("TS", "a", "b", device="cuda")[-1] == "gpu"
    with pytest.raises(ts.TotalSegmentatorError, match="choose one of auto, cpu, cuda"):
        ts.command("TS", "a", "b", device="mps")


def test_environment_and_weights_locations(monkeypatch, tmp_path):
    monkeypatch.delenv(ts.ENV_VARIABLE, raising=False)
    assert ts.default_environment() == Path("~/.diffusion-anomaly/totalsegmentator-venv").expanduser()
    monkeypatch.setenv(ts.ENV_VARIABLE, str(tmp_path / "elsewhere"))
    assert ts.default_environment() == tmp_path / "elsewhere"
    monkeypatch.delenv("TOTALSEG_HOME_DIR", raising=False)
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    assert ts.home_dir().name == ".totalsegmentator"
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "home"))
    assert ts.weights_dir() == tmp_path / "home" / "nnunet" / "results"
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(tmp_path / "weights"))
    assert ts.weights_dir() == tmp_path / "weights"


def test_usage_statistics_are_switched_off(tmp_path):
    home = tmp_path / "home"
    config = ts.disable_usage_statistics(home)  # made as TotalSegmentator would, statistics off
    made = json.loads(config.read_text())
    assert made["send_usage_stats"] is False and made["statistics_disclaimer_shown"] is True
    assert made["totalseg_id"].startswith("totalseg_") and made["prediction_counter"] == 0
    config.write_text(json.dumps({**made, "send_usage_stats": True, "license_number": "aca_1"}))
    ts.disable_usage_statistics(home)  # an existing file: only the switch changes
    assert json.loads(config.read_text()) == {**made, "license_number": "aca_1"}
    config.write_text("{not json")
    with pytest.raises(ts.TotalSegmentatorError, match="config.json cannot be read .*fix or delete it"):
        ts.disable_usage_statistics(home)


# ---- runs ----------------------------------------------------------------------------------------
def test_run_writes_the_segmentation_with_progress(fake_env, ct, tmp_path):
    out = tmp_path / "out" / "organs.nii.gz"  # its folder is made at the end
    seen = []
    assert ts.run_totalsegmentator(ct, out, fast=True, device="cpu", progress=lambda f, m: seen.append((f, m))) == out
    labels = read_volume(out, validate=False)
    assert labels.same_geometry(read_volume(ct))
    assert sorted(np.unique(labels.voxels)) == [0, 3, 5]
    record = _record(tmp_path)
    argv = record["argv"]
    assert argv == ["-i", str(ct), "-o", argv[3], "--ml", "--device", "cpu", "--fast"]
    assert Path(argv[3]).parent == Path(record["cwd"])  # written into a private folder first, then moved
    assert not Path(record["cwd"]).exists()  # which is gone
    assert record["env"]["PYTHONPATH"] is None and record["env"]["PYTHONHOME"] is None
    assert record["env"]["TOTALSEG_HOME_DIR"] == str(tmp_path / "ts-home")
    assert record["env"]["VIRTUAL_ENV"] == str(fake_env)
    assert json.loads((tmp_path / "ts-home" / "config.json").read_text())["send_usage_stats"] is False
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    messages = [m for _, m in seen]
    for expected in ("segmenting, part 1 of 2", "segmenting, part 2 of 2", "saving the segmentation"):
        assert f"TotalSegmentator: {expected}" in messages
    assert len({f for f, m in seen if m.endswith("part 1 of 2")}) > 1  # the tqdm percentage moves within a part
    assert sorted(p.name for p in out.parent.iterdir()) == ["organs.nii.gz"]


def test_pre_placed_weights_are_where_the_program_looks(fake_env, ct, tmp_path, monkeypatch):
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", "~/my-weights")
    monkeypatch.setenv("PYTHONPATH", "/somewhere/DiffusionAnomalyLib-root")  # the engine's or Slicer's: not passed on
    ts.run_totalsegmentator(ct, tmp_path / "seg.nii.gz")
    env = _record(tmp_path)["env"]
    assert env["TOTALSEG_WEIGHTS_PATH"] == str(Path("~/my-weights").expanduser()) == str(ts.weights_dir())
    assert env["TOTALSEG_HOME_DIR"] == str(tmp_path / "ts-home") and env["PYTHONPATH"] is None


def test_a_nrrd_ct_is_given_to_it_as_nifti(fake_env, ct, tmp_path):
    nrrd = write_volume(read_volume(ct), tmp_path / "ct.nrrd")
    out = ts.run_totalsegmentator(nrrd, tmp_path / "seg.nii", device="cpu")
    argv = _record(tmp_path)["argv"]
    assert argv[1].endswith("ct.nii.gz") and argv[1] != str(ct) and argv[3].endswith("segmentation.nii")
    assert read_volume(out, validate=False).same_geometry(read_volume(ct))


def test_organs_are_checked_against_the_environments_class_map(fake_env, ct, tmp_path):
    _script(fake_env / "bin" / "python", NAMES)
    assert ts.class_names(fake_env) == ["kidney_left", "kidney_right", "liver", "spleen", "urinary_bladder"]
    seen = []
    ts.run_totalsegmentator(ct, tmp_path / "seg.nii.gz", organs="liver,kidneys", device="cpu",
                            progress=lambda f, m: seen.append((f, m)))
    argv = _record(tmp_path)["argv"]
    assert argv[argv.index("--roi_subset") + 1:] == ["liver", *ORGAN_GROUPS["kidneys"]]  # a group is its members
    rough = [f for f, m in seen if m == "TotalSegmentator: finding the organs' region"]
    parts = [f for f, m in seen if m == "TotalSegmentator: segmenting, part 1 of 2"]
    assert max(rough) <= 0.2 < min(parts)  # the coarse pass first, then the segmentation
    with pytest.raises(ValueError, match=r"unknown organ 'kidny_left'; did you mean kidney_left"):
        ts.run_totalsegmentator(ct, tmp_path / "other.nii.gz", organs=["liver", "kidny_left"])
    with pytest.raises(ValueError, match="unknown organ 'brain'"):  # not in this environment's class map
        ts.run_totalsegmentator(ct, tmp_path / "other.nii.gz", organs="brain")
    with pytest.raises(ts.TotalSegmentatorError, match="No organ names were given"):
        ts.run_totalsegmentator(ct, tmp_path / "other.nii.gz", organs=" , ")
    assert not (tmp_path / "other.nii.gz").exists()


def test_organs_without_an_answer_from_the_environment_use_the_shipped_class_map(fake_env, ct, tmp_path):
    ts.run_totalsegmentator(ct, tmp_path / "seg.nii.gz", organs="Kidney Left,urinary_bladder")  # no bin/python
    assert _record(tmp_path)["argv"][-3:] == ["--roi_subset", "kidney_left", "urinary_bladder"]
    with pytest.raises(ValueError, match="unknown organ 'livr'"):
        ts.run_totalsegmentator(ct, tmp_path / "other.nii.gz", organs="livr")


def test_offline_without_weights_is_one_sentence_and_nothing_is_written(fake_env, ct, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_TS_MODE", "offline")
    out = tmp_path / "seg.nii.gz"
    with pytest.raises(ts.TotalSegmentatorError) as info:
        ts.run_totalsegmentator(ct, out, fast=True)
    sentence = str(info.value)
    home = tmp_path / "ts-home"
    assert sentence == (
        f"TotalSegmentator's weights (task 297) are not in {home / 'nnunet' / 'results'} and cannot be downloaded "
        "(no connection to github.com: Name or service not known); on a computer with internet run "
        f"'totalseg_download_weights -t total_fast' and copy its ~/.totalsegmentator folder to {home} (or set "
        f"TOTALSEG_HOME_DIR or TOTALSEG_WEIGHTS_PATH to where the weights are), or {ts.USE_EXISTING}.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz", "record.json", "ts-env", "ts-home"]


@pytest.mark.parametrize("mode, words", [
    ("crash", r"TotalSegmentator failed \(exit code 1: KeyError: 'nnUNet_results'\); check the CT"),
    ("partial", r"TotalSegmentator failed \(exit code 1: "),
    ("silent", r"TotalSegmentator ended without writing a segmentation"),
    ("killed", r"TotalSegmentator was stopped by signal 9 \(this is usually the computer running out of memory\)"),
    ("nogpu", r"--device cuda was chosen but TotalSegmentator's environment sees no CUDA GPU"),
])
def test_failures_are_one_sentence_and_nothing_is_written(fake_env, ct, tmp_path, monkeypatch, mode, words):
    monkeypatch.setenv("FAKE_TS_MODE", mode)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = snapshot(out, ct)
    with pytest.raises(ts.TotalSegmentatorError, match=words) as info:
        ts.run_totalsegmentator(ct, out / "seg.nii.gz", device="cuda")
    assert "\n" not in str(info.value)
    assert snapshot(out, ct) == before


def test_auto_runs_where_totalsegmentator_falls_back_to_the_cpu(fake_env, ct, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_TS_MODE", "nogpu")
    assert ts.run_totalsegmentator(ct, tmp_path / "seg.nii.gz").is_file()  # auto: TotalSegmentator falls back


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table in /proc")
def test_cancel_ends_the_whole_tree_and_writes_nothing(fake_env, ct, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_TS_MODE", "sleep")
    pids = tmp_path / "pids.json"
    monkeypatch.setenv("FAKE_TS_PIDS", str(pids))
    stop = threading.Event()
    seen = []
    out = tmp_path / "out" / "seg.nii.gz"
    out.parent.mkdir()

    def cancel_when_running():
        deadline = time.monotonic() + 120
        while not pids.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()

    threading.Thread(target=cancel_when_running, daemon=True).start()
    t0 = time.monotonic()
    with pytest.raises(Cancelled):
        ts.run_totalsegmentator(ct, out, cancel=stop.is_set, progress=lambda f, m: seen.append(m))
    program, grandchild = json.loads(pids.read_text())
    assert not _running(program) and not _running(grandchild)  # the program and the child it started
    assert time.monotonic() - t0 < 60
    assert list(out.parent.iterdir()) == []
    assert not Path(_record(tmp_path)["cwd"]).exists()


@pytest.mark.skipif(os.name == "nt", reason="process groups")
def test_run_lines_ends_the_tree_when_the_caller_fails():
    """An exception in the line handler (a refusal, Ctrl-C) ends the tree before it propagates."""
    code = ("import subprocess, sys, time; "
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
            "print(c.pid, flush=True); time.sleep(600)")
    pids = []

    class Refused(Exception):
        pass

    def handler(line):
        pids.append(int(line))
        raise Refused

    with pytest.raises(Refused):
        run_lines([sys.executable, "-c", code], handler)
    assert pids and not _running(pids[0])
    assert run_lines([sys.executable, "-c", "print('a\\rb'); raise SystemExit(3)"], pids.append) == 3
    assert pids[-2:] == ["a", "b"]  # a carriage return ends a line (progress bars)


def test_end_tree_on_an_ended_tree_is_harmless():
    proc = start_tree([sys.executable, "-c", "pass"], stdout=subprocess.DEVNULL)
    proc.wait()
    end_tree(proc)
    end_tree(proc)


# ---- refusals before any work --------------------------------------------------------------------
def test_refusals_before_any_work(fake_env, ct, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    watch = (ct, out, tmp_path / "ts-home")
    monkeypatch.setenv(ts.ENV_VARIABLE, str(tmp_path / "missing-env"))
    line = run_refused(capsys, "totalsegmentator", "--ct", ct, "--out", out / "seg.nii.gz", watch=watch)
    assert line == (f"error: TotalSegmentator is not set up (its environment {tmp_path / 'missing-env'} does not "
                    "exist); run 'diffusion-anomaly totalsegmentator-setup' once (it installs TotalSegmentator and "
                    f"PyTorch, about 2.6 GB, into an environment of their own), set {ts.ENV_VARIABLE} to an existing "
                    f"one, or {ts.USE_EXISTING}.")
    monkeypatch.setenv(ts.ENV_VARIABLE, str(fake_env))
    assert "must be a NIfTI file" in run_refused(capsys, "totalsegmentator", "--ct", ct, "--out", out / "seg.nrrd",
                                                 watch=watch)
    assert "would be overwritten" in run_refused(capsys, "totalsegmentator", "--ct", ct, "--out", ct, watch=watch)
    (out / "dir.nii.gz").mkdir()
    assert "is a folder" in run_refused(capsys, "totalsegmentator", "--ct", ct, "--out", out / "dir.nii.gz",
                                        watch=watch)
    assert "file not found" in run_refused(capsys, "totalsegmentator", "--ct", tmp_path / "nope.nii.gz",
                                           "--out", out / "seg.nii.gz", watch=watch)
    assert "invalid choice: 'mps'" in run_refused(capsys, "totalsegmentator", "--ct", ct, "--out", out / "s.nii.gz",
                                                  "--device", "mps", watch=watch)
    monkeypatch.setenv("FAKE_TS_MODE", "offline")
    line = run_refused(capsys, "totalsegmentator", "--ct", ct, "--out", out / "seg.nii.gz", watch=(ct, out))
    assert line.startswith("error: TotalSegmentator's weights (task 297) are not in ")


def test_cli_verb_writes_the_segmentation(fake_env, ct, tmp_path, capsys):
    out = tmp_path / "seg.nii.gz"
    assert cli.main(["totalsegmentator", "--ct", str(ct), "--out", str(out), "--fast", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "TotalSegmentator: segmenting, part 2 of 2" in printed and f"wrote {out}" in printed
    assert out.is_file()


# ---- setup ---------------------------------------------------------------------------------------
PIP = '''#!{python}
# A stand-in for the environment's Python: "-m pip install ..." prints pip's lines and installs the program.
import os, sys
env = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(env, "pip-calls.txt"), "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
if os.environ.get("FAKE_PIP_FAIL"):
    print("ERROR: Could not find a version that satisfies the requirement torch==2.13.0 (from versions: none)")
    sys.exit(1)
print("Collecting torch==2.13.0")
print("  Downloading torch-2.13.0-cp311-none-manylinux.whl (190.1 MB)")
print("Collecting totalsegmentator")
print("Installing collected packages: torch, totalsegmentator")
program = os.path.join(env, "bin", "TotalSegmentator")
with open(program, "w") as f:
    f.write("#!/bin/sh\\n")
os.chmod(program, 0o755)
print("Successfully installed torch-2.13.0 totalsegmentator-2.18.0")
'''

VENV = '''#!{python}
# A stand-in for the base Python: "-m venv ENV" makes ENV/bin/python (the fake pip above) and pyvenv.cfg.
import os, sys
env = sys.argv[sys.argv.index("venv") + 1]
os.makedirs(os.path.join(env, "bin"))
open(os.path.join(env, "pyvenv.cfg"), "w").write("home = /usr/bin\\n")
with open(os.path.join(env, "bin", "python"), "w") as f:
    f.write(os.environ["FAKE_PIP_SCRIPT"])
os.chmod(os.path.join(env, "bin", "python"), 0o755)
'''


@pytest.fixture()
def fake_python(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_PIP_SCRIPT", PIP.format(python=sys.executable))
    return _script(tmp_path / "base" / "python3", VENV)


def test_setup_makes_the_environment_once(fake_python, tmp_path, capsys):
    env = tmp_path / "venv"
    seen = []
    assert ts.setup_environment(env, progress=lambda f, m: seen.append((f, m)), python=fake_python) == env
    assert (env / "bin" / "TotalSegmentator").is_file()
    assert (env / "pip-calls.txt").read_text() == "-m pip install --disable-pip-version-check torch==2.13.0 " \
                                                  "totalsegmentator\n"
    assert json.loads((env / ts.SETUP_RECORD).read_text())["requirements"] == list(ts.REQUIREMENTS)
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any("Collecting torch==2.13.0" in m for _, m in seen)
    ts.setup_environment(env, python=fake_python)  # idempotent: pip is not asked again
    assert (env / "pip-calls.txt").read_text().count("\n") == 1
    assert cli.main(["totalsegmentator-setup", "--env", str(env)]) == 0
    assert f"TotalSegmentator environment: {env}" in capsys.readouterr().out


def test_a_failed_setup_is_one_sentence_and_removes_what_it_made(fake_python, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_PIP_FAIL", "1")
    env = tmp_path / "venv"
    with pytest.raises(ts.TotalSegmentatorError, match=r"Installing TotalSegmentator into .*venv failed \(ERROR: Could "
                                                       r"not find a version that satisfies the requirement torch==2\.13"
                                                       r"\.0 \(from versions: none\)\); check the internet"):
        ts.setup_environment(env, python=fake_python)
    assert not env.exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ts.TotalSegmentatorError, match="is not a Python virtual environment"):
        ts.setup_environment(tmp_path / "other", python=fake_python)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_the_runner_is_torch_free_and_never_imports_totalsegmentator():
    code = textwrap.dedent("""
        import sys
        import DiffusionAnomalyLib.totalsegmentator, DiffusionAnomalyLib.processes
        print(sorted(m for m in ("torch", "monai", "totalsegmentator") if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"
