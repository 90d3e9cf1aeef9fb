"""Runs on the inference worker: start a job, poll it from the UI thread (never blocks), cancel it.

A job sends one run request to the worker process (:class:`~DiffusionAnomalyModuleLib.process.WorkerClient`),
follows its progress messages and, when the result arrives, accepts it in stages, one stage per
poll, so no single poll stalls the UI for long; a stage may run its work in a background thread.
Nothing in the scene changes before the last stage, so a cancel (the worker's whole process tree
is killed) leaves the scene exactly as it was. A job with a ``region`` (the included organs) sends
it as a mask file on the input's grid, and the worker computes only the model slices it needs.
The worker serves every method its model's network serves and keeps each method's cache, so a
method or parameter change is a new request to the same worker; it is restarted only for another
checkpoint, device or (for a classifier-guided method) another classifier. Scene-free: the caller
provides the stages.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from DiffusionAnomalyLib.pipeline import CaseResult
from DiffusionAnomalyLib.volume import Volume, write_volume

from DiffusionAnomalyModuleLib.process import WorkerClient


@dataclass
class Stage:
    """One step of accepting a worker result, run on the UI thread.

    ``run(job)`` does the step; for a ``background`` stage it returns the part that touches no
    MRML object, which then runs in a thread while the UI stays live.
    """

    message: str
    run: Callable[["Job"], Any]
    background: bool = False


@dataclass
class Job:
    """A run in progress (the widget polls it) or a finished one."""

    runKey: tuple
    inputNodeID: str
    volume: Volume
    card: dict
    checkpoint: str
    method: str = ""                  # the method that runs (its catalog name)
    classifier: Any = None            # models.Classifier of a classifier-guided method; None: the method needs none
    workerClassifier: str | None = None  # the worker's --classifier (a file chosen; None: the bundled one that fits)
    region: np.ndarray | None = None  # bool [k, j, i]: what the network computes (the included organs; None: all)
    roi: np.ndarray | None = None     # bool [k, j, i]: the ROI at the start (lesions are kept inside it)
    requestId: int | None = None
    tempDir: str | None = None
    stages: list[Stage] = field(default_factory=list)
    status: str = "running"      # running | done | failed | cancelled
    fraction: float = 0.0
    message: str = "starting the inference worker"
    error: str | None = None
    networkEvaluations: int | None = None
    classifierEvaluations: int = 0
    modelSlices: dict | None = None  # {"computed": n, "total": N} model slices, from the worker's result
    workerCall: bool = True
    longestPollSeconds: float = 0.0
    result: dict | None = None   # the worker's result message
    case: CaseResult | None = None  # the case being accepted (the stages fill it in)
    stage: int = 0               # index of the next stage to run once the result is here
    future: Future | None = None
    started: float = field(default_factory=time.monotonic)

    @property
    def finished(self) -> bool:
        return self.status != "running"


def pythonExecutable() -> str:
    """Slicer's Python launcher (PythonSlicer) in a Slicer application, else this interpreter."""
    return shutil.which("PythonSlicer") or sys.executable


class JobRunner:
    """One worker process (restarted when checkpoint or device change) and at most one job on it."""

    def __init__(self, python: str | None = None, threads: int = 0):
        self.python = python
        self.threads = threads
        self.worker: WorkerClient | None = None
        self.workerKey: tuple | None = None
        self.job: Job | None = None
        self.progressCallback: Callable[[Job], None] | None = None

    @property
    def running(self) -> bool:
        return self.job is not None and not self.job.finished

    # ---- the worker ------------------------------------------------------------------------
    def ensureWorker(self, checkpoint: str, device: str, classifier: str | None = None,
                     needsClassifier: bool = False) -> WorkerClient:
        """The worker for ``checkpoint`` on ``device`` with the guidance ``classifier`` (None: the bundled one that
        fits), started unless it already runs. A method without a classifier (``needsClassifier`` False) takes
        the running worker of that checkpoint and device whatever its classifier, so its cache is kept."""
        key = (checkpoint, device, classifier)
        if (self.worker is not None and self.worker.alive and self.workerKey is not None
                and (self.workerKey == key or (not needsClassifier and self.workerKey[:2] == key[:2]))):
            return self.worker
        self.stopWorker()
        self.worker = WorkerClient(checkpoint, device=device, python=self.python or pythonExecutable(),
                                   threads=self.threads, classifier=classifier).start()
        self.workerKey = key
        return self.worker

    def stopWorker(self) -> None:
        """Ask the worker to quit (then make sure it is gone)."""
        if self.worker is not None:
            self.worker.close()
        self.worker, self.workerKey = None, None

    def workerStats(self) -> dict:
        """The worker's counters (total network evaluations, cache entries); {} without a worker."""
        if self.worker is None or not self.worker.alive:
            return {}
        return self.worker.request({"cmd": "stats"}, timeout=60)

    # ---- jobs ----------------------------------------------------------------------------------
    def submit(self, job: Job, request: dict[str, Any], device: str) -> Job:
        """Send ``job``'s volume and ``request`` to the worker; returns at once (then :meth:`poll`)."""
        if self.running:
            raise RuntimeError("a run is already in progress; cancel it first.")
        worker = self.ensureWorker(job.checkpoint, device, job.workerClassifier,
                                   needsClassifier=job.classifier is not None)
        tempDir = tempfile.mkdtemp(prefix="DiffusionAnomaly-")
        try:
            inputPath = write_volume(job.volume, Path(tempDir) / "input.nrrd", compress=False)
            region = None
            if job.region is not None:  # the included organs on the input's grid: the network computes only these
                region = str(write_volume(job.volume.with_voxels(job.region.astype(np.uint8), modality=None,
                                                                 units=None),
                                          Path(tempDir) / "region.nrrd", compress=False))
            job.requestId = worker.send({"cmd": "run", "input": str(inputPath), "out_dir": tempDir,
                                         "modality": job.volume.modality, "units": job.volume.units,
                                         "region": region, **request})
        except Exception:
            shutil.rmtree(tempDir, ignore_errors=True)
            raise
        job.tempDir = tempDir
        self.job = job
        return job

    def finishWithoutWorker(self, job: Job, message: str) -> Job:
        """Record ``job`` as done without any worker call (its result was already known)."""
        if self.running:
            raise RuntimeError("a run is already in progress; cancel it first.")
        job.workerCall, job.networkEvaluations = False, 0
        self.job = job
        self.finish(job, "done", None)
        job.message = message
        return job

    def poll(self) -> Job | None:
        """Handle the worker's messages, or run the next acceptance stage (never blocks)."""
        job = self.job
        if job is None or job.finished or self.worker is None:
            return job
        started = time.perf_counter()
        try:
            if job.result is None:
                self._readMessages(job)
            else:
                self._runStage(job)
        finally:  # the longest stretch the UI thread was busy in one poll (target: < 0.5 s)
            job.longestPollSeconds = max(job.longestPollSeconds, time.perf_counter() - started)
        if self.progressCallback is not None:
            self.progressCallback(job)
        return job

    def _readMessages(self, job: Job) -> None:
        for m in self.worker.messages():
            kind = m.get("type")
            if kind == "ready":
                job.message = f"model {m['model_id']} loaded on {m['device']} ({m.get('precision', 'fp32')})"
            elif kind == "progress" and m.get("id") == job.requestId:
                job.fraction, job.message = float(m["fraction"]), m["message"]
            elif kind == "error" and m.get("id") in (job.requestId, None):
                self.finish(job, "failed", m["message"])
                if m.get("fatal"):
                    self.stopWorker()
            elif kind == "exit":
                self.finish(job, "failed", self.worker.failure(m))
                self.stopWorker()
            elif kind == "result" and m.get("id") == job.requestId:
                job.result, job.fraction = m, 1.0
                job.networkEvaluations = int(m["network_evaluations"])
                job.classifierEvaluations = int(m.get("classifier_evaluations") or 0)
                job.modelSlices = m.get("model_slices")
                job.message = job.stages[0].message if job.stages else "loading the results"
            if job.finished or job.result is not None:
                return

    def _runStage(self, job: Job) -> None:
        stage = job.stages[job.stage]
        try:
            if not stage.background:
                stage.run(job)
            elif job.future is None:
                executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="DiffusionAnomalyJob")
                job.future = executor.submit(stage.run(job))
                executor.shutdown(wait=False)
                return
            elif not job.future.done():
                return
            else:
                job.future.result()  # re-raises a failure of the background part
                job.future = None
        except Exception as exc:  # noqa: BLE001 - shown to the user as a sentence
            self.finish(job, "failed", str(exc))
            return
        job.stage += 1
        if job.stage == len(job.stages):
            self.finish(job, "done", None)
        else:
            job.message = job.stages[job.stage].message

    def finish(self, job: Job, status: str, error: str | None) -> None:
        """End ``job`` with ``status``; its temporary files are removed."""
        job.status, job.error = status, error
        if status == "done":
            job.fraction, job.message = 1.0, "done"
        elif status == "failed":
            job.message = f"failed: {error}"
        elif status == "cancelled":
            job.message = "cancelled"
        if job.tempDir:
            shutil.rmtree(job.tempDir, ignore_errors=True)
            job.tempDir = None

    def cancel(self) -> None:
        """Stop the running job by ending the worker's whole process tree; the caller's state is untouched."""
        job = self.job
        if self.worker is not None:
            self.worker.terminate()
        self.worker, self.workerKey = None, None
        if job is not None and not job.finished:
            self.finish(job, "cancelled", None)

    def wait(self, job: Job, timeout: float, progress: Callable[[float, str], None] | None = None) -> Job:
        """Poll ``job`` until it finishes (scripts, tests, the self-test); cancel it after ``timeout`` s."""
        def step() -> None:
            self.poll()
            if progress is not None:
                progress(job.fraction, job.message)

        return pollUntilFinished(job, step, self.cancel, timeout, "the run")


def pollUntilFinished(work, poll: Callable[[], Any], cancel: Callable[[], None], timeout: float, what: str):
    """Call ``poll`` until ``work.finished`` (scripts and tests wait like the UI's timer polls); ``cancel`` after
    ``timeout`` s, then TimeoutError. Returns ``work``."""
    deadline = time.monotonic() + timeout
    while not work.finished:
        if time.monotonic() > deadline:
            cancel()
            raise TimeoutError(f"{what} did not finish within {timeout} s and was cancelled.")
        time.sleep(0.05)
        poll()
    return work
