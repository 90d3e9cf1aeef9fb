"""The inference worker process the Slicer module drives: ``python -m DiffusionAnomalyLib.worker``.

Why a process: the diffusion loop takes minutes on a CPU; running it outside Slicer keeps the
UI responsive, and cancelling is simply terminating the process, so the scene is never touched
by a half-finished run (the pattern of the established Slicer AI extensions).

The worker loads one checkpoint once and keeps the model, and with it the model's LRU cache of
inverted latents and counterfactuals, for its whole life: a new guidance scale only re-decodes,
a repeated request does no network work.

Protocol: one JSON object per line. Requests on stdin::

    {"id": 1, "cmd": "run", "input": "/tmp/x/input.nrrd", "out_dir": "/tmp/x/out",
     "noise_level": 50, "guidance_scale": 3.0, "steps": 3, "seed": 0, "counterfactual": true}
    {"id": 2, "cmd": "stats"}        {"id": 3, "cmd": "quit"}

The input volume is an NRRD written with :func:`volume.write_volume` (geometry, modality and
units in its header). ``steps`` absent = the card's default, ``null`` = the stride-1 reference
loop. Messages on stdout::

    {"type": "ready", "model_id": ..., "device": "cpu", "gpu": false, "precision": "bf16", "card": {...}}
    {"type": "progress", "id": 1, "fraction": 0.42, "message": "decoding ..."}
    {"type": "result", "id": 1, "heatmap": ".../heatmap.nrrd", "counterfactual": ... | null,
     "network_evaluations": 120, "total_network_evaluations": 360, "parameters": {...},
     "timings": {...}}
    {"type": "error", "id": 1, "message": "a sentence a clinician can act on", "kind": "VolumeError"}

Anything else a library prints goes to stderr, so stdout carries only protocol lines. End of
stdin (the parent died or closed the pipe) ends the worker.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, TextIO

PROTOCOL_VERSION = 1

#: progress messages are sent at most this often (seconds), plus every change of stage message
PROGRESS_INTERVAL = 0.2


class Channel:
    """Writes protocol messages as JSON lines to the real stdout (flushed, one line each)."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def send(self, message: dict[str, Any]) -> None:
        from .export import to_jsonable

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
    """Holds the loaded model; answers requests (see the module docstring)."""

    def __init__(self, checkpoint: str | Path, device: str = "auto", precision: str = "auto"):
        from .methods import load_checkpoint

        self.model = load_checkpoint(checkpoint, device=device, precision=precision)
        self.checkpoint = str(checkpoint)

    def ready_message(self) -> dict[str, Any]:
        device = self.model.device
        return {"type": "ready", "protocol": PROTOCOL_VERSION, "pid": os.getpid(), "model_id": self.model.card["id"],
                "checkpoint": self.checkpoint, "device": str(device), "gpu": device.type == "cuda",
                "precision": self.model.precision, "card": self.model.card}

    def run(self, request: dict[str, Any], progress: Callable[[float, str], None]) -> dict[str, Any]:
        import torch

        from .volume import VolumeError, read_volume, write_volume

        for key in ("input", "out_dir"):
            if not request.get(key):
                raise ValueError(f"the run request has no '{key}'.")
        volume = read_volume(request["input"], modality=request.get("modality"))
        if request.get("units") and not volume.units:
            volume.units = request["units"]
        if request.get("seed") is not None:
            torch.manual_seed(int(request["seed"]))
        from .card import parse_steps

        result = self.model.run(volume, noise_level=request.get("noise_level"),
                                guidance_scale=request.get("guidance_scale"),
                                steps=parse_steps(request.get("steps")), progress=progress)
        out = Path(request["out_dir"])
        if not out.is_dir():
            raise VolumeError(f"the worker's output folder {out} does not exist.")
        # uncompressed: temporary files, read back at once by the UI process (decompression would stall it)
        heat = write_volume(result.heatmap, out / "heatmap.nrrd", compress=False)
        cf = None
        if request.get("counterfactual", True) and result.counterfactual is not None:
            cf = write_volume(result.counterfactual, out / "counterfactual.nrrd", compress=False)
        return {"heatmap": str(heat), "counterfactual": str(cf) if cf else None,
                "network_evaluations": result.network_evaluations,
                "total_network_evaluations": self.model.network_evaluations,
                "parameters": result.parameters, "timings": result.timings}

    def stats(self) -> dict[str, Any]:
        return {"total_network_evaluations": self.model.network_evaluations, "cache_entries": len(self.model.cache),
                "model_id": self.model.card["id"], "device": str(self.model.device)}


def _error(request_id: Any, exc: BaseException) -> dict[str, Any]:
    msg = {"type": "error", "id": request_id, "kind": type(exc).__name__, "message": str(exc) or type(exc).__name__}
    from .checkpoint import CheckpointError
    from .volume import VolumeError

    if not isinstance(exc, (VolumeError, CheckpointError, ValueError)):
        msg["detail"] = traceback.format_exc()  # unexpected: keep the traceback for the log
    return msg


def serve(worker: Worker, requests: TextIO, channel: Channel) -> int:
    """Answer requests until 'quit' or end of input."""
    channel.send(worker.ready_message())
    for line in requests:
        line = line.strip()
        if not line:
            continue
        request_id = None
        try:
            request = json.loads(line)
            request_id = request.get("id")
            cmd = request.get("cmd")
            if cmd == "run":
                out = worker.run(request, throttled_progress(channel, request_id))
                channel.send({"type": "result", "id": request_id, **out})
            elif cmd == "stats":
                channel.send({"type": "stats", "id": request_id, **worker.stats()})
            elif cmd == "quit":
                channel.send({"type": "bye", "id": request_id})
                return 0
            else:
                raise ValueError(f"unknown worker command {cmd!r}.")
        except Exception as exc:  # noqa: BLE001 - every failure becomes one error message
            channel.send(_error(request_id, exc))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m DiffusionAnomalyLib.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                        help="network arithmetic (auto: bf16 on CPUs with native bf16, else fp32)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args(argv)

    # protocol lines go to the real stdout; anything printed by libraries goes to stderr
    channel = Channel(os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8", buffering=1))
    sys.stdout = sys.stderr
    try:
        import torch

        if args.threads > 0:
            torch.set_num_threads(args.threads)
        worker = Worker(args.checkpoint, device=args.device, precision=args.precision)
    except Exception as exc:  # noqa: BLE001
        channel.send({"type": "error", "id": None, "fatal": True, **{k: v for k, v in _error(None, exc).items()
                                                                       if k not in ("type", "id")}})
        return 2
    return serve(worker, sys.stdin, channel)


if __name__ == "__main__":
    sys.exit(main())
