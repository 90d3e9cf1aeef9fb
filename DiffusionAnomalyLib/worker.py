"""The inference worker process the Slicer module drives: ``python -m DiffusionAnomalyLib.worker``.

Why a process: the diffusion loop takes minutes on a CPU; running it outside Slicer keeps the
UI responsive, and cancelling ends the worker's process tree (:func:`.processes.end_tree`, called
by the Slicer module's ``process.py``), so the scene is never touched by a half-finished run (the
pattern of the established Slicer AI extensions). The worker also exits by itself when its stdin closes or its
parent dies (:class:`Watchdog`).

The worker serves every method its checkpoint's network serves (:func:`.method_catalog.methods_for_network`):
the method object of each is made on its first request (the checkpoint's own at start) and kept,
with its LRU cache of inverted latents and maps, for the worker's whole life: a new guidance or
classifier scale only re-decodes (IgCONDA-PET, CG-DDIM), a repeated request does no network work.
The classifier-guided methods use the ``--classifier`` checkpoint given at start, else the bundled
classifier that fits the model (:func:`.checkpoint.bundled_classifier`).

Protocol: one JSON object per line. Requests on stdin::

    {"id": 1, "cmd": "run", "input": "/tmp/x/input.nrrd", "out_dir": "/tmp/x/out",
     "method": "igconda", "parameters": {"noise_level": 50, "guidance_scale": 3.0, "steps": 3},
     "counterfactual": true, "region": "/tmp/x/region.nrrd"}
    {"id": 2, "cmd": "stats"}        {"id": 3, "cmd": "quit"}

The input volume is an NRRD written with :func:`volume.write_volume` (geometry, modality and
units in its header). ``method``: a name of :data:`.method_catalog.METHODS` the checkpoint serves
(absent or null: the checkpoint's own); ``parameters``: that method's parameters by name (absent,
null or a null value: the method's default; ``steps`` as :func:`card.parse_steps` reads it:
``"reference"`` = the stride-1 reference loop, an integer >= 1 = that many strided steps).
``region`` (optional, null = the whole volume) is an NRRD mask on the
input's exact grid (non-zero = inside; the organs an organ ROI includes): only the model slices it
needs go through the network (``model.run(..., region=...)``), the others get heat 0.

Every request is checked before any work (:data:`REQUEST_FIELDS`): it must be one JSON object;
a key the command does not know is refused (a misspelt ``"guidance"`` would otherwise silently
run with the card's default); ``input`` and ``out_dir`` are non-empty strings, ``modality``,
``units`` and ``region`` strings or null (a region on another grid than the input is refused),
``counterfactual`` true/false, ``method`` a text or null, ``parameters`` an object or null whose
entries the method's ``resolve`` checks (:func:`.method_catalog.resolve_parameters`: a parameter of
another method is refused; a number may come as text, "20" but never "20.7"); the output folder
must exist and be writable. A
refusal is one error message with the sentence (no ``detail`` traceback: that is kept for bugs).
Messages on stdout::

    {"type": "ready", "model_id": ..., "device": "cpu", "gpu": false, "precision": "bf16", "card": {...}}
    {"type": "progress", "id": 1, "fraction": 0.42, "message": "decoding ..."}
    {"type": "result", "id": 1, "method": "igconda", "heatmap": ".../heatmap.nrrd", "counterfactual": ... | null,
     "network_evaluations": 120, "total_network_evaluations": 360, "classifier_evaluations": 0,
     "classifier_confidence": [[z_mm, p_unhealthy], ...] | null, "parameters": {...},
     "model_slices": {"computed": 12, "total": 60}, "timings": {...}}
    {"type": "error", "id": 1, "message": "a sentence a clinician can act on", "kind": "VolumeError"}

Anything else a library prints goes to stderr, so stdout carries only protocol lines.

The worker ends by itself, at once and even in the middle of a run (:class:`Watchdog`), when its
stdin closes or its parent is gone: the ``--parent-pid`` process (the UI process) has ended, or,
on POSIX, it was re-parented because its launcher (``PythonSlicer``) died. Cancelling a run is
ending the process tree (``DiffusionAnomalyModuleLib.process.WorkerClient.terminate``).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TextIO

import numpy as np

from .card import shown
from .checkpoint import read_card
from .method_catalog import card_methods, method_spec, served_method
from .pipeline import method_name, slice_confidence
from .errors import is_refusal, user_sentence
from .export import to_jsonable
from .files import check_writable_dir
from .processes import process_watch
from .volume import Volume, read_volume, write_volume

PROTOCOL_VERSION = 2

#: progress messages are sent at most this often (seconds), plus every change of stage message
PROGRESS_INTERVAL = 0.2

#: how often the watchdog looks whether the parent processes are still there (seconds)
WATCH_INTERVAL = 0.5

#: exit codes of a worker that ended by itself (its parent cannot read them, a log or a test can)
EXIT_STDIN_CLOSED = 0
EXIT_PARENT_GONE = 3


class Channel:
    """Writes protocol messages as JSON lines to the real stdout (flushed, one line each)."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def send(self, message: dict[str, Any]) -> None:
        self.stream.write(json.dumps(to_jsonable(message), allow_nan=False) + "\n")
        self.stream.flush()


def throttled_progress(channel: Channel, request_id: Any) -> Callable[[float, str], None]:
    """A progress(fraction, message) callable that sends at most every PROGRESS_INTERVAL seconds."""
    state = {"time": 0.0, "message": None}

    def progress(fraction: float, message: str) -> None:
        now = time.monotonic()
        if message != state["message"] or fraction >= 1.0 or now - state["time"] >= PROGRESS_INTERVAL:
            state["time"], state["message"] = now, message
            channel.send({"type": "progress", "id": request_id, "fraction": round(float(fraction), 4),
                          "message": message})

    return progress


class Worker:
    """Holds the loaded method objects (one per method asked for); answers requests (see the module docstring)."""

    def __init__(self, checkpoint: str | Path, device: str = "auto", precision: str = "auto",
                 classifier: str | Path | None = None):
        from .methods import load_checkpoint  # torch, MONAI: imported here, so main() reports a failure as a message
        self._load = load_checkpoint
        self.checkpoint = str(checkpoint)
        self.classifier = None if classifier is None else str(classifier)
        self.device, self.precision = device, precision
        takes = method_spec(served_method(read_card(checkpoint))).classifier  # the card's default method (CT: cg-ddim)
        self.model = load_checkpoint(checkpoint, device=device, precision=precision,
                                     classifier=self.classifier if takes else None)
        self.models = {method_name(self.model): self.model}

    def method(self, name: str | None):
        """The method object of ``name`` (None: the checkpoint's own), made on first use and kept."""
        if name is None:
            return self.model
        if not isinstance(name, str):
            raise RequestError(f"the run request's 'method' must be a method name or null, got {shown(name)}.")
        if name not in self.models:
            spec = method_spec(served_method(self.model.card, name))
            self.models[name] = self._load(self.checkpoint, device=self.device, precision=self.precision, method=name,
                                           classifier=self.classifier if spec.classifier else None)
        return self.models[name]

    @property
    def network_evaluations(self) -> int:
        return sum(m.network_evaluations for m in self.models.values())

    def ready_message(self) -> dict[str, Any]:
        device = self.model.device
        return {"type": "ready", "protocol": PROTOCOL_VERSION, "pid": os.getpid(), "model_id": self.model.card["id"],
                "checkpoint": self.checkpoint, "device": str(device), "gpu": device.type == "cuda",
                "precision": self.model.precision, "card": self.model.card, "method": method_name(self.model),
                "methods": list(card_methods(self.model.card)), "classifier": self.classifier}

    def run(self, request: dict[str, Any], progress: Callable[[float, str], None]) -> dict[str, Any]:
        check_request(request)
        # every check before minutes of diffusion, not after: method, parameters, output folder, input
        model = self.method(request.get("method"))
        given = request.get("parameters") or {}
        params = model.resolve(**given)
        out = check_writable_dir(request["out_dir"], create=False)
        volume = read_volume(request["input"], modality=request.get("modality"), units=request.get("units"))
        region = read_region(request.get("region"), volume)
        result = model.run(volume, progress=progress, region=region, **params)
        # uncompressed: temporary files, read back at once by the UI process (decompression would stall it)
        heat = write_volume(result.heatmap, out / "heatmap.nrrd", compress=False)
        cf = None
        if request.get("counterfactual", True) and result.counterfactual is not None:
            cf = write_volume(result.counterfactual, out / "counterfactual.nrrd", compress=False)
        confidence = slice_confidence(result)
        return {"method": result.method or method_name(model), "heatmap": str(heat), "counterfactual": str(cf) if cf else None,
                "network_evaluations": result.network_evaluations,
                "total_network_evaluations": self.network_evaluations,
                "classifier_evaluations": result.classifier_evaluations,
                "classifier_confidence": None if confidence is None else confidence.tolist(),
                "model_slices": result.model_slices, "parameters": result.parameters, "timings": result.timings}

    def stats(self) -> dict[str, Any]:
        return {"total_network_evaluations": self.network_evaluations,
                "cache_entries": sum(len(m.cache) for m in self.models.values()),
                "model_id": self.model.card["id"], "device": str(self.model.device), "methods": sorted(self.models)}


#: The keys each command accepts (``id`` and ``cmd`` always); any other key is refused.
REQUEST_FIELDS: dict[str, frozenset[str]] = {
    "run": frozenset({"input", "out_dir", "modality", "units", "method", "parameters", "counterfactual", "region"}),
    "stats": frozenset(),
    "quit": frozenset(),
}


class RequestError(ValueError):
    """A request the worker cannot take (not JSON, not an object, a wrong field); the message says why."""


def parse_request(line: str) -> dict[str, Any]:
    """One request line as a JSON object with a usable ``id``; RequestError (a sentence) otherwise."""
    try:
        request = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RequestError(f"the worker could not read a request: it is not valid JSON ({exc.msg} at character "
                           f"{exc.pos}); send one JSON object per line.") from None
    if not isinstance(request, dict):
        raise RequestError(f"a worker request must be a JSON object such as {{\"cmd\": \"stats\"}}, "
                           f"got {shown(request)}.")
    request_id = request.get("id")
    if not (request_id is None or isinstance(request_id, str)
            or (isinstance(request_id, int) and not isinstance(request_id, bool))):
        raise RequestError(f"the request id must be a whole number or a text, got {shown(request_id)}.")
    return request


def check_command(request: dict[str, Any]) -> str:
    """The request's ``cmd``, after refusing an unknown command or a key the command does not know."""
    cmd = request.get("cmd")
    if not isinstance(cmd, str) or cmd not in REQUEST_FIELDS:
        known = ", ".join(REQUEST_FIELDS)
        raise RequestError(f"unknown worker command {shown(cmd)}; use {known}." if "cmd" in request else
                           f"the request has no 'cmd'; use {known}.")
    unknown = sorted(set(request) - REQUEST_FIELDS[cmd] - {"id", "cmd"})
    if unknown:
        allowed = ", ".join(sorted(REQUEST_FIELDS[cmd])) or "none besides id and cmd"
        raise RequestError(f"the {cmd} request has unknown field(s) {', '.join(map(repr, unknown))} "
                           f"(allowed: {allowed}).")
    return cmd


def check_request(request: dict[str, Any]) -> None:
    """The run request's own fields (the method parameters are checked by the model's ``resolve``)."""
    for key in ("input", "out_dir"):
        if request.get(key) in (None, ""):
            raise RequestError(f"the run request has no '{key}'.")
        if not isinstance(request[key], str):
            raise RequestError(f"the run request's '{key}' must be a path as text, got {shown(request[key])}.")
    for key in ("modality", "units", "region"):
        if not (request.get(key) is None or isinstance(request[key], str)):
            raise RequestError(f"the run request's '{key}' must be a text or null, got {shown(request[key])}.")
    if not (request.get("method") is None or isinstance(request["method"], str)):
        raise RequestError(f"the run request's 'method' must be a method name or null, got {shown(request['method'])}.")
    if not (request.get("parameters") is None or isinstance(request["parameters"], dict)):
        raise RequestError("the run request's 'parameters' must be an object of the method's parameters (e.g. "
                           f"{{\"noise_level\": 150}}) or null, got {shown(request['parameters'])}.")
    if not isinstance(request.get("counterfactual", True), bool):
        raise RequestError(f"the run request's 'counterfactual' must be true or false, "
                           f"got {shown(request['counterfactual'])}.")


def read_region(path: str | None, volume: Volume) -> np.ndarray | None:
    """The run request's region as a bool [k, j, i] mask on ``volume``'s grid (None: the whole volume)."""
    if path in (None, ""):
        return None
    region = read_volume(path, validate=False)
    if not region.same_geometry(volume, atol=1e-4):
        raise RequestError(f"the run request's region {path} is not on the input's grid (shape "
                           f"{region.voxels.shape[:3]} vs {volume.voxels.shape[:3]} or another position); write it on "
                           "the input's grid.")
    return np.asarray(region.voxels) != 0


def _error(request_id: Any, exc: BaseException) -> dict[str, Any]:
    msg = {"type": "error", "id": request_id, "kind": type(exc).__name__, "message": user_sentence(exc)}
    if not is_refusal(exc):
        msg["detail"] = traceback.format_exc()  # unexpected: keep the traceback for the log
    return msg


class Watchdog:
    """Ends the worker at once when its stdin closes or its parent is gone, even in the middle of a run.

    A thread reads the requests from stdin, so their end is seen while the main thread is inside a
    diffusion loop; another thread looks every :data:`WATCH_INTERVAL` s whether the ``parent_pid``
    process still runs and (POSIX) whether this process was re-parented, i.e. its launcher died.
    It ends with ``os._exit``: nothing else stops the main thread's loop from another thread, and
    a worker whose parent is gone has no one to answer, so there is nothing to finish.
    """

    def __init__(self, stream: TextIO, parent_pid: int | None = None, interval: float = WATCH_INTERVAL):
        self.stream = stream
        self.interval = interval
        self.ppid = os.getppid()  # the launcher, or the parent itself
        pids = {parent_pid} if parent_pid else set()
        if os.name == "nt":  # no re-parenting on Windows: watch the launcher by its handle too
            pids.add(self.ppid)
        self.watches = [(f"the parent process {pid}", process_watch(pid)) for pid in sorted(pids)]
        self._queue: queue.Queue[str] = queue.Queue()

    def start(self) -> "Watchdog":
        threading.Thread(target=self._read, name="worker stdin", daemon=True).start()
        threading.Thread(target=self._watch, name="worker parent watch", daemon=True).start()
        return self

    def requests(self) -> Iterator[str]:
        """The request lines, as they arrive (endless: the process ends at the end of stdin)."""
        while True:
            yield self._queue.get()

    def orphaned(self) -> str | None:
        """Why the parent counts as gone, or None while it is there."""
        if os.name != "nt" and os.getppid() != self.ppid:
            return f"the parent process {self.ppid} ended (re-parented to {os.getppid()})"
        for name, alive in self.watches:
            if not alive():
                return f"{name} ended"
        return None

    def _read(self) -> None:
        for line in self.stream:
            self._queue.put(line)
        self._exit("stdin closed", EXIT_STDIN_CLOSED)

    def _watch(self) -> None:
        while True:
            time.sleep(self.interval)
            reason = self.orphaned()
            if reason:
                self._exit(reason, EXIT_PARENT_GONE)

    @staticmethod
    def _exit(reason: str, code: int) -> None:
        try:
            sys.stderr.write(f"DiffusionAnomaly worker: {reason}; exiting.\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass  # stderr went with the parent
        os._exit(code)


def serve(worker: Worker, requests: Iterable[str], channel: Channel) -> int:
    """Answer requests (lines of JSON) until 'quit' or end of input."""
    channel.send(worker.ready_message())
    for line in requests:
        line = line.strip()
        if not line:
            continue
        request_id = None
        try:
            request = parse_request(line)
            request_id = request.get("id")
            cmd = check_command(request)
            if cmd == "run":
                out = worker.run(request, throttled_progress(channel, request_id))
                channel.send({"type": "result", "id": request_id, **out})
            elif cmd == "stats":
                channel.send({"type": "stats", "id": request_id, **worker.stats()})
            else:  # quit
                channel.send({"type": "bye", "id": request_id})
                return 0
        except Exception as exc:  # noqa: BLE001 - every failure becomes one error message
            channel.send(_error(request_id, exc))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m DiffusionAnomalyLib.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--classifier", default=None,
                        help="noise-conditioned classifier for the classifier-guided methods (default: the bundled "
                             "one that fits the checkpoint)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                        help="network arithmetic (auto: bf16 on CPUs with native bf16, else fp32)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="end the worker when this process (the UI) ends; stdin closing ends it too")
    args = parser.parse_args(argv)

    # requests are read from a file of the watchdog's own on stdin (UTF-8, as the client writes), so
    # interpreter shutdown never waits for sys.stdin's lock, held by the reading thread
    requests = open(os.dup(sys.stdin.fileno()), encoding="utf-8")  # noqa: SIM115 - read until the process ends
    watchdog = Watchdog(requests, parent_pid=args.parent_pid).start()  # before the slow model load
    # protocol lines go to the real stdout; anything printed by libraries goes to stderr
    channel = Channel(os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8", buffering=1))
    sys.stdout = sys.stderr
    try:
        import torch

        if args.threads > 0:
            torch.set_num_threads(args.threads)
        worker = Worker(args.checkpoint, device=args.device, precision=args.precision, classifier=args.classifier)
    except Exception as exc:  # noqa: BLE001
        channel.send({"type": "error", "id": None, "fatal": True, **{k: v for k, v in _error(None, exc).items()
                                                                       if k not in ("type", "id")}})
        return 2
    return serve(worker, watchdog.requests(), channel)


if __name__ == "__main__":
    sys.exit(main())
