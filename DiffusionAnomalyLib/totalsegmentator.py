"""TotalSegmentator as a separate program in a virtual environment of its own (no torch here).

Why its own environment: TotalSegmentator pins its own torch and pulls in ``fury``, which pins
``vtk < 9.4`` and so breaks Slicer (and ``slicer-core``); installed into the engine's or Slicer's
Python it would replace their packages. :func:`setup_environment` makes a venv (default
:data:`DEFAULT_ENVIRONMENT`, or ``$DIFFUSION_ANOMALY_TOTALSEG_ENV``) and pip-installs
:data:`REQUIREMENTS` into it, once; :func:`run_totalsegmentator` runs that environment's
``TotalSegmentator`` program as a process tree of its own (:mod:`.processes`), with progress read
from its output lines and cancel ending the whole tree, as the SlicerTotalSegmentator extension
runs it (``--ml`` multi-label output, ``--roi_subset``, ``--fast``, ``--device``).

Weights and usage statistics: TotalSegmentator keeps its settings and weights in
``$TOTALSEG_HOME_DIR`` (default ``~/.totalsegmentator``; weights in ``nnunet/results`` there, or
in ``$TOTALSEG_WEIGHTS_PATH``) and downloads missing weights on first use; weights placed there
beforehand work offline. It sends anonymous usage statistics unless ``send_usage_stats`` is false
in that folder's ``config.json`` (its documented switch; the program has no flag for it), so every
run first sets it false (:func:`disable_usage_statistics`). The default home is shared with other
TotalSegmentator installations (the Slicer extension's too), so weights are downloaded once.

Every refusal is one sentence (:class:`TotalSegmentatorError`, a ``ValueError``), and nothing is
written on failure or cancel: TotalSegmentator works in a private temporary folder and the
segmentation is moved into place only when it succeeded (:func:`.files.atomic_path`).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import string
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .files import OutputError, atomic_path, check_not_input, check_output_folder
from .processes import run_lines
from .progress import Cancel, Progress, check_cancel, report
from .roi import check_overlap, organ_names
from .volume import Volume, modality_words, read_volume, write_volume

__all__ = [
    "DEFAULT_ENVIRONMENT", "DEVICES", "ENV_VARIABLE", "REQUIREMENTS", "SETUP_COMMAND", "TotalSegmentatorError",
    "check_ct", "class_names", "command", "default_environment", "disable_usage_statistics", "environment_program",
    "home_dir", "run_totalsegmentator", "setup_environment", "weights_dir",
]

#: what the environment holds: the torch TotalSegmentator is tested with here, and TotalSegmentator
REQUIREMENTS = ("torch==2.13.0", "totalsegmentator")
#: the environment variable that moves the environment
ENV_VARIABLE = "DIFFUSION_ANOMALY_TOTALSEG_ENV"
#: where the environment is made when neither a path nor :data:`ENV_VARIABLE` says otherwise
DEFAULT_ENVIRONMENT = Path("~/.diffusion-anomaly/totalsegmentator-venv")
#: the verb that makes the environment (named in the sentence when it is missing)
SETUP_COMMAND = "diffusion-anomaly totalsegmentator-setup"
#: the way out when TotalSegmentator cannot run here (one wording for every such sentence)
USE_EXISTING = ("use an existing TotalSegmentator segmentation instead (a multi-label NIfTI, a folder of "
                "<organ>.nii.gz files or a Slicer .seg.nrrd)")
#: ``device`` choices and what TotalSegmentator is told (it falls back to the CPU by itself when it sees no GPU)
DEVICES = {"auto": "gpu", "cpu": "cpu", "cuda": "gpu"}
#: the file in the environment that records a finished setup (what was installed)
SETUP_RECORD = ".diffusion-anomaly-setup.json"
#: the output suffixes TotalSegmentator's multi-label NIfTI can have
OUTPUT_SUFFIXES = (".nii.gz", ".nii")
#: how much of the program's output is kept for the error sentence
KEEP_LINES = 200


class TotalSegmentatorError(ValueError):
    """TotalSegmentator is missing, refused the input or failed; the message is one sentence saying what to do."""


# ---- where things are --------------------------------------------------------------------------
def default_environment() -> Path:
    """The TotalSegmentator environment: ``$DIFFUSION_ANOMALY_TOTALSEG_ENV``, else :data:`DEFAULT_ENVIRONMENT`."""
    return Path(os.environ.get(ENV_VARIABLE) or DEFAULT_ENVIRONMENT).expanduser()


def _environment(path: str | os.PathLike | None) -> Path:
    return default_environment() if path is None or str(path) == "" else Path(path).expanduser()


def _scripts(env: Path) -> Path:
    return env / ("Scripts" if os.name == "nt" else "bin")


def _executable(env: Path, name: str) -> Path:
    return _scripts(env) / (name + ".exe" if os.name == "nt" else name)


def environment_program(env: str | os.PathLike | None = None) -> Path:
    """The environment's ``TotalSegmentator`` program; refuses with the setup sentence when it is missing."""
    env = _environment(env)
    program = _executable(env, "TotalSegmentator")
    if not program.is_file():
        where = (f"its environment {env} does not exist" if not env.exists()
                 else f"its environment {env} has no TotalSegmentator program")
        raise TotalSegmentatorError(
            f"TotalSegmentator is not set up ({where}); run '{SETUP_COMMAND}' once (it installs TotalSegmentator "
            f"and PyTorch, about 2.6 GB, into an environment of their own), set {ENV_VARIABLE} to an existing one, "
            f"or {USE_EXISTING}.")
    return program


def home_dir() -> Path:
    """TotalSegmentator's settings folder: ``$TOTALSEG_HOME_DIR``, else its own default ``~/.totalsegmentator``."""
    if os.environ.get("TOTALSEG_HOME_DIR"):
        return Path(os.environ["TOTALSEG_HOME_DIR"]).expanduser()
    home = Path.home()
    return (Path("/tmp") if str(home) == "/" else home) / ".totalsegmentator"  # as TotalSegmentator does in containers


def weights_dir() -> Path:
    """Where TotalSegmentator looks for weights: ``$TOTALSEG_WEIGHTS_PATH``, else ``nnunet/results`` in the home."""
    if os.environ.get("TOTALSEG_WEIGHTS_PATH"):
        return Path(os.environ["TOTALSEG_WEIGHTS_PATH"]).expanduser()
    return home_dir() / "nnunet" / "results"


def _child_environment(env: Path) -> dict[str, str]:
    """The variables the environment's programs run with: this process's, without its Python's own settings.

    PYTHONPATH / PYTHONHOME (set by Slicer, or pointing at the engine) would mix this process's
    packages into the environment's Python; the environment's scripts folder goes first on PATH.
    """
    child = {k: v for k, v in os.environ.items()
             if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONEXECUTABLE", "__PYVENV_LAUNCHER__")}
    child.update(VIRTUAL_ENV=str(env), PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8",
                 TOTALSEG_HOME_DIR=str(home_dir()))
    if os.environ.get("TOTALSEG_WEIGHTS_PATH"):
        child["TOTALSEG_WEIGHTS_PATH"] = str(weights_dir())  # "~" expanded, as in the sentences that name it
    child["PATH"] = str(_scripts(env)) + os.pathsep + child.get("PATH", "")
    return child


# ---- setup -------------------------------------------------------------------------------------
def _setup_done(env: Path) -> bool:
    try:
        record = json.loads((env / SETUP_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(record, dict) and record.get("requirements") == list(REQUIREMENTS)
            and _executable(env, "TotalSegmentator").is_file())


def _last_error(lines: Sequence[str], marker: str = "ERROR:") -> str:
    """The last line holding ``marker`` (else the last non-empty line), shortened: the cause for a sentence."""
    text = [line.strip() for line in lines if line.strip()]
    chosen = next((line for line in reversed(text) if marker in line), text[-1] if text else "no output")
    chosen = chosen.rstrip(".")
    return chosen if len(chosen) <= 300 else chosen[:297] + "..."


class _PipProgress:
    """Progress of ``pip install`` from its lines: collecting and downloading, then installing."""

    def __init__(self, progress: Progress | None):
        self.progress = progress
        self.fraction = 0.05
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        del self.lines[:-KEEP_LINES]
        text = line.strip()
        if text.startswith(("Collecting ", "Downloading ", "Using cached ", "Processing ", "Requirement already")):
            self.fraction += (0.7 - self.fraction) * 0.03  # the number of packages is not known in advance
            report(self.progress, self.fraction, "installing TotalSegmentator: " + text[:100])
        elif text.startswith("Installing collected packages"):
            self.fraction = max(self.fraction, 0.75)
            report(self.progress, self.fraction, "installing TotalSegmentator: unpacking the packages")
        elif text.startswith("Successfully installed"):
            report(self.progress, 0.98, "installing TotalSegmentator: done")


def setup_environment(path: str | os.PathLike | None = None, progress: Progress | None = None,
                      cancel: Cancel | None = None, python: str | os.PathLike | None = None) -> Path:
    """Make the TotalSegmentator environment at ``path`` (default :func:`default_environment`); its folder.

    ``python -m venv`` with ``python`` (default: this interpreter; Slicer passes its own Python),
    then ``pip install`` :data:`REQUIREMENTS` into it, with progress lines and cancel (the whole
    pip tree ends). Idempotent: a finished setup (:data:`SETUP_RECORD`) returns at once; an
    unfinished one is completed. A failed or cancelled setup removes the folder if it made it.
    """
    env = _environment(path)
    if _setup_done(env):
        report(progress, 1.0, f"TotalSegmentator is set up in {env}")
        return env
    if env.exists() and (not env.is_dir() or (any(env.iterdir()) and not (env / "pyvenv.cfg").is_file())):
        raise TotalSegmentatorError(f"{env} exists and is not a Python virtual environment; choose another folder "
                                    f"for TotalSegmentator (--env or {ENV_VARIABLE}).")
    check_output_folder(env)
    check_cancel(cancel)
    made = not env.exists()
    base = str(python or sys.executable)
    lines: list[str] = []
    try:
        env_python = _executable(env, "python")
        if not env_python.is_file():
            report(progress, 0.01, f"creating the TotalSegmentator environment in {env}")
            code = run_lines([base, "-m", "venv", str(env)], lines.append, cancel)
            if code != 0 or not env_python.is_file():
                raise TotalSegmentatorError(
                    f"The TotalSegmentator environment {env} cannot be created with {base} "
                    f"({_last_error(lines, 'Error')}); install Python's venv module or choose another Python.")
        pip = _PipProgress(progress)
        report(progress, 0.05, "installing TotalSegmentator and PyTorch (about 2.6 GB)")
        code = run_lines([str(env_python), "-m", "pip", "install", "--disable-pip-version-check", *REQUIREMENTS],
                         pip, cancel, env=_child_environment(env))
        if code != 0 or not _executable(env, "TotalSegmentator").is_file():
            raise TotalSegmentatorError(
                f"Installing TotalSegmentator into {env} failed ({_last_error(pip.lines)}); check the internet "
                f"connection and the free disk space (about 2.6 GB) and run '{SETUP_COMMAND}' again.")
        with atomic_path(env / SETUP_RECORD) as tmp:
            tmp.write_text(json.dumps({"requirements": list(REQUIREMENTS),
                                       "installed": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1), encoding="utf-8")
    except BaseException:
        if made:
            shutil.rmtree(env, ignore_errors=True)
        raise
    report(progress, 1.0, f"TotalSegmentator is set up in {env}")
    return env


# ---- settings ----------------------------------------------------------------------------------
def disable_usage_statistics(home: str | os.PathLike | None = None) -> Path:
    """Set ``send_usage_stats`` false in TotalSegmentator's ``config.json`` (made if missing); its path.

    The file is TotalSegmentator's own (``totalseg_id``, ``prediction_counter``, ...): other keys
    are kept; a missing file is made as TotalSegmentator would make it, with the statistics off.
    """
    home = Path(home).expanduser() if home is not None else home_dir()
    config_file = home / "config.json"
    config: dict = {}
    if config_file.exists():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
            if not isinstance(config, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            raise TotalSegmentatorError(f"TotalSegmentator's settings file {config_file} cannot be read "
                                        f"({str(exc).splitlines()[0]}); fix or delete it.") from None
        if config.get("send_usage_stats") is False and config.get("statistics_disclaimer_shown") is True:
            return config_file
    else:
        config = {"totalseg_id": "totalseg_" + "".join(random.choices(string.ascii_uppercase + string.digits, k=8)),
                  "prediction_counter": 0}
    config.update(send_usage_stats=False, statistics_disclaimer_shown=True)
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"TotalSegmentator's settings folder {home} cannot be created ({exc.strerror or exc}); "
                          "set TOTALSEG_HOME_DIR to a writable folder.") from None
    with atomic_path(config_file) as tmp:
        tmp.write_text(json.dumps(config, indent=4), encoding="utf-8")
    return config_file


# ---- organs ------------------------------------------------------------------------------------
_CLASS_NAMES_CODE = ("import json; from totalsegmentator.map_to_binary import class_map; "
                     "print(json.dumps(sorted(class_map['total'].values())))")


def class_names(env: str | os.PathLike | None = None) -> list[str] | None:
    """The structure names the environment's TotalSegmentator knows (task ``total``); None when it cannot say."""
    env = _environment(env)
    lines: list[str] = []
    try:
        code = run_lines([str(_executable(env, "python")), "-c", _CLASS_NAMES_CODE], lines.append,
                         env=_child_environment(env))
    except OSError:
        return None
    for line in reversed(lines):
        try:
            names = json.loads(line)
        except ValueError:
            continue
        if code == 0 and isinstance(names, list) and names and all(isinstance(n, str) for n in names):
            return names
    return None


# ---- running -----------------------------------------------------------------------------------
def _device(device: str) -> str:
    """What TotalSegmentator's ``--device`` is told for ``device`` (:data:`DEVICES`)."""
    if device not in DEVICES:
        raise TotalSegmentatorError(f"Unknown device '{device}'; choose one of {', '.join(DEVICES)}.")
    return DEVICES[device]


def command(program: str | os.PathLike, ct: str | os.PathLike, out: str | os.PathLike,
            organs: Sequence[str] | None = None, fast: bool = False, device: str = "auto") -> list[str]:
    """The TotalSegmentator command line: one multi-label NIfTI (``--ml``), the named structures only, the device.

    Usage statistics are off through the settings file (:func:`disable_usage_statistics`); organ
    statistics (``--statistics``) and previews are not asked for.
    """
    cmd = [str(program), "-i", str(ct), "-o", str(out), "--ml", "--device", _device(device)]
    if fast:
        cmd.append("--fast")
    if organs:
        cmd += ["--roi_subset", *organs]
    return cmd


#: TotalSegmentator's output lines that mark its stages: name -> (pattern, fraction, message); fraction None =
#: computed from the line (part i of n)
_STAGES = {
    "download": (re.compile(r"^Downloading model for Task (\d+)"), 0.02, "downloading its weights (task {0})"),
    "dicom": (re.compile(r"^Converting dicom to nifti"), 0.03, "reading the CT"),
    "rough": (re.compile(r"^Generating rough segmentation for cropping"), 0.04, "finding the organs' region"),
    "resample": (re.compile(r"^Resampling"), 0.12, "resampling"),
    "part": (re.compile(r"^Predicting part (\d+) of (\d+)"), None, "segmenting, part {0} of {1}"),
    "predict": (re.compile(r"^Predicting"), 0.2, "segmenting"),
    "predicted": (re.compile(r"^\s*Predicted in"), 0.8, "segmented"),
    "save": (re.compile(r"^Saving segmentations"), 0.92, "saving the segmentation"),
    "saved": (re.compile(r"^\s*Saved in"), 0.98, "saved"),
}
_PERCENT = re.compile(r"(\d{1,3})%\|")  # a tqdm bar (nnU-Net's sliding windows)
_CONNECTION = re.compile(r"requests\.exceptions\.ConnectionError|NameResolutionError|Max retries exceeded|"
                         r"Failed to establish a new connection")
_HTTP_ERROR = re.compile(r"requests\.exceptions\.HTTPError: (.*)")
_NO_GPU = "No GPU detected"


@dataclass
class _RunProgress:
    """Progress of a TotalSegmentator run from its output lines; keeps the last lines for the error sentence.

    With ``--roi_subset`` TotalSegmentator first segments the whole body coarsely to find the
    region (``cropping``): that pass is shown in the first fifth, the real segmentation after it.
    """

    progress: Progress | None
    cropping: bool
    device: str
    fast: bool = False
    lines: list[str] = field(default_factory=list)
    fraction: float = 0.0
    message: str = "starting"
    span: tuple[float, float] = (0.0, 0.0)  # (start, width) a tqdm percentage of the current stage maps to
    rough: bool = False  # in the coarse pass of --roi_subset
    rough_predicted: bool = False
    task: str | None = None  # the weights being downloaded

    def __post_init__(self) -> None:
        self.rough = self.cropping  # with cropping, everything up to the coarse pass's end belongs to it

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        del self.lines[:-KEEP_LINES]
        if _NO_GPU in line and self.device == "cuda":
            raise TotalSegmentatorError("--device cuda was chosen but TotalSegmentator's environment sees no CUDA GPU "
                                        "(its PyTorch may be a CPU build); use --device auto or cpu.")
        for stage, (pattern, fraction, message) in _STAGES.items():
            match = pattern.search(line)
            if match is not None:
                self._stage(stage, match.groups(), fraction, message)
                return
        percent = _PERCENT.search(line)
        if percent and self.span[1] > 0:
            self._report(self.span[0] + self.span[1] * min(int(percent.group(1)), 100) / 100, self.message)

    def _stage(self, stage: str, groups: tuple[str, ...], fraction: float | None, message: str) -> None:
        if stage == "download":
            self.task = groups[0]
        elif stage in ("part", "predict") and self.rough and self.rough_predicted:
            self.rough = False  # the coarse pass has ended: the real segmentation starts
        elif stage == "predicted" and self.rough:
            self.rough_predicted = True
        if stage == "part":  # part i of n: the parts share the prediction's 0.2 .. 0.8
            part, parts = int(groups[0]), max(int(groups[1]), 1)
            fraction = 0.2 + 0.6 * (min(part, parts) - 1) / parts
            self.span = (fraction, 0.6 / parts)
        else:
            self.span = (0.2, 0.6) if stage == "predict" else (fraction, 0.0)
        self._report(fraction, message.format(*groups))

    def _report(self, fraction: float, message: str) -> None:
        if self.cropping:  # the coarse pass in 0 .. 0.2, the rest after it
            fraction = 0.2 * fraction if self.rough else 0.2 + 0.8 * fraction
        self.fraction = max(self.fraction, fraction)  # never backwards
        self.message = message
        report(self.progress, self.fraction, f"TotalSegmentator: {message}")

    def failure(self, returncode: int) -> str:
        """The one sentence for a run that ended with ``returncode`` != 0."""
        text = "\n".join(self.lines)
        connection = _CONNECTION.search(text)
        http = _HTTP_ERROR.search(text)
        if self.task is not None and (connection or http):
            return _weights_sentence(self.task, _connection_cause(self.lines) if connection else http.group(1),
                                     self.fast)
        if returncode < 0:
            return (f"TotalSegmentator was stopped by signal {-returncode} (this is usually the computer running out "
                    f"of memory); close other programs, use --fast or name fewer organs, or {USE_EXISTING}.")
        return (f"TotalSegmentator failed (exit code {returncode}: {_last_error(self.lines, 'Error')}); "
                f"check the CT, or {USE_EXISTING}.")


def _connection_cause(lines: Sequence[str]) -> str:
    """'no connection to github.com: Name or service not known' from a requests ConnectionError in ``lines``."""
    text = "\n".join(lines)
    hosts = re.findall(r"host='([^']+)'", text)
    reasons = re.findall(r"\[Errno -?\d+\] ([^'\")\]]+)", text) or re.findall(r"(Connection refused|timed out)", text)
    cause = f"no connection to {hosts[-1]}" if hosts else "no internet connection"
    return cause + (f": {reasons[-1].strip()}" if reasons else "")


def _weights_sentence(task: str, cause: str, fast: bool) -> str:
    return (f"TotalSegmentator's weights (task {task}) are not in {weights_dir()} and cannot be downloaded ({cause}); "
            f"on a computer with internet run 'totalseg_download_weights -t {'total_fast' if fast else 'total'}' and "
            f"copy its ~/.totalsegmentator folder to {home_dir()} (or set TOTALSEG_HOME_DIR or TOTALSEG_WEIGHTS_PATH "
            f"to where the weights are), or {USE_EXISTING}.")


def _output_suffix(out: Path) -> str:
    name = out.name.lower()
    suffix = next((s for s in OUTPUT_SUFFIXES if name.endswith(s) and len(name) > len(s)), None)
    if suffix is None:
        raise TotalSegmentatorError(f"The segmentation {out} must be a NIfTI file (.nii.gz or .nii), which is what "
                                    "TotalSegmentator writes; choose such a name.")
    return suffix


def _check_output(ct: Path, out: Path) -> str:
    """Refuse, before any work, an output that cannot be written or would replace the CT; its suffix."""
    suffix = _output_suffix(out)
    if out.is_dir():
        raise OutputError(f"The segmentation {out} is a folder; give a file name such as {out / 'organs.nii.gz'}.")
    check_output_folder(out.parent)
    check_not_input(out.parent, [out.name], {"CT": ct})
    return suffix


def check_ct(volume, name: str):
    """``volume`` if it may be a CT (its modality is CT or not stated); else one sentence naming ``name``."""
    if volume.modality not in (None, "CT"):
        raise TotalSegmentatorError(f"{name} is {modality_words(volume.modality)}, not a CT; choose the CT of the "
                                    "PET/CT pair for TotalSegmentator to segment its organs.")
    return volume


def run_totalsegmentator(ct: str | os.PathLike, out: str | os.PathLike, organs: str | Sequence[str] | None = None,
                         fast: bool = False, device: str = "auto", progress: Progress | None = None,
                         cancel: Cancel | None = None, environment: str | os.PathLike | None = None,
                         overlapping: Volume | None = None) -> Path:
    """Segment the CT ``ct`` (NIfTI, NRRD or DICOM) with TotalSegmentator into the multi-label NIfTI ``out``; its path.

    ``organs``: TotalSegmentator structure names or groups, a list or comma-separated text
    (:func:`.roi.organ_names`, checked against the environment's class map; ``--roi_subset``), None
    for all; ``fast``: its 3 mm model; ``device``: auto (GPU when its environment sees one), cpu or
    cuda. ``overlapping``: a volume the CT must overlap physically (the PET it is segmented for),
    checked on the CT as read here, before TotalSegmentator starts. Runs the program of ``environment`` (default :func:`default_environment`) as a process tree of its own;
    ``cancel`` ends the whole tree (:class:`.progress.Cancelled`). Everything is checked before it
    starts; nothing is written on failure or cancel. Raises :class:`TotalSegmentatorError` (or
    :class:`.files.OutputError`, :class:`.volume.VolumeError`) with one sentence.
    """
    ct, out = Path(ct).expanduser(), Path(out).expanduser()
    suffix = _check_output(ct, out)
    _device(device)
    env = _environment(environment)
    program = environment_program(env)
    report(progress, 0.0, "TotalSegmentator: reading the CT")
    volume = check_ct(read_volume(ct), Path(ct).name)
    if overlapping is not None:
        check_overlap(volume, overlapping, f"the CT {ct}")
    if organs is not None:  # names and groups, checked against the environment's own class map when it answers
        organs = list(organ_names(organs, names=class_names(env)))
        if not organs:
            raise TotalSegmentatorError("No organ names were given; name TotalSegmentator structures or groups such "
                                        "as 'liver,kidneys', or leave the organs out to segment all of them.")
    check_cancel(cancel)
    disable_usage_statistics()
    with tempfile.TemporaryDirectory(prefix="diffusion-anomaly-totalseg-") as work:
        work = Path(work)
        source = ct
        if not (ct.is_file() and ct.name.lower().endswith(OUTPUT_SUFFIXES)):  # TotalSegmentator reads NIfTI
            source = write_volume(volume, work / "ct.nii.gz")
        result = work / f"segmentation{suffix}"
        watcher = _RunProgress(progress, cropping=bool(organs), device=device, fast=fast)
        try:
            code = run_lines(command(program, source, result, organs, fast, device), watcher, cancel,
                             env=_child_environment(env), cwd=work)
        except OSError as exc:
            raise TotalSegmentatorError(f"TotalSegmentator cannot be started ({exc.strerror or exc}: {program}); "
                                        f"run '{SETUP_COMMAND}' again.") from None
        if code != 0:
            raise TotalSegmentatorError(watcher.failure(code))
        if not result.is_file():
            raise TotalSegmentatorError(f"TotalSegmentator ended without writing a segmentation "
                                        f"({_last_error(watcher.lines, 'Error')}); check the CT, or {USE_EXISTING}.")
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out, suffix=suffix) as tmp:
            shutil.copyfile(result, tmp)
    report(progress, 1.0, "TotalSegmentator: done")
    return out
