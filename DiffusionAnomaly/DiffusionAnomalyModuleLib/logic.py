"""DiffusionAnomalyLogic: the module's logic, composed of the Lib's parts. No Qt.

- :mod:`.parameters`: the parameter node's settings and their reading as engine arguments;
- :mod:`.models`: which models there are and their cards;
- :mod:`.nodes`: volume nodes <-> engine volumes;
- :mod:`.jobs`: runs on the worker process (start, poll, cancel);
- :mod:`.lesions`: ROI and re-thresholding of the cached heat map;
- :mod:`.outputs`: the output nodes in the scene;
- :mod:`.exports`: files.

The last result is kept as the engine's case record (:class:`~DiffusionAnomalyLib.pipeline.CaseResult`)
with two notes of the module's own beside it: the run key (what produced it) and the input node.
So a threshold, minimum-size or ROI change re-thresholds it without the worker or the network;
a guidance change asks the worker, whose cache re-decodes only; an Apply with unchanged settings
does no worker call at all. It runs on the MRML library without a Slicer application
(``slicer-core``); pass the scene explicitly there.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import slicer

from DiffusionAnomalyLib.card import card_summary
from DiffusionAnomalyLib.pipeline import CaseResult
from DiffusionAnomalyLib.preprocessing import check_modality
from DiffusionAnomalyLib.volume import array_key, read_volume, validate_volume

from DiffusionAnomalyModuleLib import exports, outputs
from DiffusionAnomalyModuleLib import parameters as settings
from DiffusionAnomalyModuleLib.jobs import Job, JobRunner, Stage
from DiffusionAnomalyModuleLib.lesions import rethreshold, roiFromParameters
from DiffusionAnomalyModuleLib.models import ModelDatabase
from DiffusionAnomalyModuleLib.nodes import volumeFromNode


class DiffusionAnomalyLogic:
    """Parameter node -> worker run or re-thresholding -> output nodes and files."""

    def __init__(self, scene=None, python: str | None = None, threads: int = 0, settingsPath: str | None = None):
        self._scene = scene
        # torch threads of the worker (0: torch's default); the environment variable serves tests and busy machines
        threads = threads or int(os.environ.get("DIFFUSION_ANOMALY_WORKER_THREADS", "0") or 0)
        self.models = ModelDatabase(settingsPath)
        self.jobs = JobRunner(python=python, threads=threads)
        self.case: CaseResult | None = None
        self.caseRunKey: tuple | None = None      # what produced ``case`` (None: rebuilt from the scene)
        self.caseInputNodeID: str | None = None   # the input volume node ``case`` belongs to
        self.lastUpdateSeconds: float | None = None

    @property
    def scene(self):
        return self._scene if self._scene is not None else slicer.mrmlScene

    @property
    def job(self) -> Job | None:
        return self.jobs.job

    @property
    def running(self) -> bool:
        """Whether a run is in progress (Apply is then Cancel)."""
        return self.jobs.running

    @property
    def worker(self):
        return self.jobs.worker

    @property
    def progressCallback(self) -> Callable[[Job], None] | None:
        return self.jobs.progressCallback

    @progressCallback.setter
    def progressCallback(self, callback: Callable[[Job], None] | None) -> None:
        self.jobs.progressCallback = callback

    # ---- parameter node and models -------------------------------------------------------------
    def getParameterNode(self):
        """The module's singleton parameter node (created with defaults on first use)."""
        return settings.parameterNode(self.scene, self.models.defaultModel())

    @staticmethod
    def parameters(parameterNode) -> dict[str, str]:
        return settings.values(parameterNode)

    @staticmethod
    def applyCardDefaults(parameterNode, card: dict) -> None:
        settings.applyCardDefaults(parameterNode, card)

    def availableModels(self) -> list[dict]:
        return self.models.models()

    def addUserCheckpoint(self, path: str) -> dict:
        return self.models.addUserCheckpoint(path)

    def readCard(self, model: str) -> dict:
        return self.models.card(model)

    def inputNode(self, parameterNode):
        node = parameterNode.GetNodeReference(settings.INPUT_REFERENCE)
        if node is None:
            raise ValueError("choose an input volume.")
        return node

    def modelSummary(self, parameterNode) -> str:
        """The chosen model's card summary, and why it does not fit the input if it does not."""
        params = self.parameters(parameterNode)
        card = self.readCard(params["Model"])
        text = card_summary(card)
        inputNode = parameterNode.GetNodeReference(settings.INPUT_REFERENCE)
        if inputNode is not None and inputNode.GetImageData() is not None:
            try:
                check_modality(volumeFromNode(inputNode, params["Modality"], params["Units"]), card)
            except ValueError as exc:
                text += f"\n\nThis model does not fit the input: {exc}"
        return text

    # ---- running -------------------------------------------------------------------------------
    def startRun(self, parameterNode) -> Job:
        """Start a run (returns at once); poll :meth:`poll` until ``job.finished``.

        Nothing in the scene changes until the result arrives; unchanged settings are served
        from :attr:`case` without any worker call (the job is then already finished).
        """
        if self.jobs.running:
            raise RuntimeError("a run is already in progress; cancel it first.")
        params = self.parameters(parameterNode)
        inputNode = self.inputNode(parameterNode)
        volume = validate_volume(volumeFromNode(inputNode, params["Modality"], params["Units"]))
        checkpoint = self.models.checkpointPath(params["Model"])
        card = self.models.card(checkpoint)
        check_modality(volume, card)
        settings.thresholding(params, card)  # a non-numeric threshold setting fails before any work
        request = settings.runRequest(params)
        device = params["Device"] or "auto"
        runKey = (array_key(volume), inputNode.GetID(), checkpoint, device, json.dumps(request, sort_keys=True))
        job = Job(runKey=runKey, inputNodeID=inputNode.GetID(), volume=volume, card=card, checkpoint=checkpoint)
        if self.case is not None and self.caseRunKey == runKey:
            self.updateLesions(parameterNode)
            return self.jobs.finishWithoutWorker(job, "unchanged parameters: results reused (no diffusion)")
        job.stages = self._acceptStages(parameterNode)
        return self.jobs.submit(job, request, device)

    def _acceptStages(self, parameterNode) -> list[Stage]:
        """Read the result files -> find lesions (in a thread) -> write all nodes (the only stage changing the scene)."""

        def read(job: Job) -> None:
            m = job.result
            ready = self.worker.ready if self.worker is not None else None
            job.case = CaseResult(
                volume=job.volume, heatmap=read_volume(m["heatmap"], validate=False),
                counterfactual=read_volume(m["counterfactual"], validate=False) if m.get("counterfactual") else None,
                card=job.card, parameters=m["parameters"],
                thresholding=settings.thresholding(self.parameters(parameterNode), job.card),
                network_evaluations=job.networkEvaluations, timings=dict(m.get("timings", {})),
                compute={k: str(ready[k]) for k in ("device", "precision") if k in ready} if ready else {},
                checkpoint=job.checkpoint)

        def lesions(job: Job) -> Callable[[], CaseResult]:
            params = self.parameters(parameterNode)
            return rethreshold(job.case, settings.thresholding(params, job.card),
                               roiFromParameters(parameterNode, params, job.volume))

        def write(job: Job) -> None:
            inputNode = self.scene.GetNodeByID(job.inputNodeID)
            if inputNode is None:
                raise ValueError("the input volume was removed from the scene.")
            self._writeCase(parameterNode, inputNode, job.case, writeVolumes=True)
            self.case, self.caseRunKey, self.caseInputNodeID = job.case, job.runKey, job.inputNodeID

        return [Stage("loading the results", read), Stage("finding lesions in the heat map", lesions, background=True),
                Stage("writing the results into the scene", write)]

    def poll(self, parameterNode=None) -> Job | None:
        """Handle the worker's messages or the next stage of accepting a result (never blocks)."""
        return self.jobs.poll()

    def cancel(self) -> None:
        """Stop the running job (the worker's process tree ends): the scene stays exactly as it was."""
        self.jobs.cancel()

    def runBlocking(self, parameterNode, timeout: float = 600.0,
                    progress: Callable[[float, str], None] | None = None) -> Job:
        """Start a run and wait for it (scripts, tests, the self-test): the UI's protocol; failures raise."""
        job = self.jobs.wait(self.startRun(parameterNode), timeout, progress)
        if job.status == "failed":
            raise RuntimeError(job.error)
        return job

    def workerStats(self) -> dict:
        return self.jobs.workerStats()

    def cleanup(self) -> None:
        """Stop the worker (module unloaded, Slicer closing)."""
        if self.jobs.running:
            self.jobs.cancel()
        self.jobs.stopWorker()

    # ---- lesions from the cached heat map ------------------------------------------------------
    def caseFromScene(self, parameterNode) -> CaseResult | None:
        """The case held by the input's output nodes (a reopened scene): re-threshold without a re-run."""
        inputNode = parameterNode.GetNodeReference(settings.INPUT_REFERENCE)
        if inputNode is None:
            return None
        params = self.parameters(parameterNode)
        try:
            checkpoint = self.models.checkpointPath(params["Model"])
            card = self.models.card(checkpoint)
        except ValueError:  # the model is gone: the heat map can still be thresholded and exported
            checkpoint, card = None, None
        return outputs.caseFromOutputs(self.scene, inputNode, volumeFromNode(inputNode, params["Modality"], params["Units"]), card,
                                       checkpoint)

    def updateLesions(self, parameterNode, writeVolumes: bool = False) -> CaseResult:
        """Threshold + components + table from the cached heat map; segmentation and table nodes updated.

        No worker call and no network evaluation. ``writeVolumes`` also rewrites heat map and counterfactual.
        """
        inputNode = parameterNode.GetNodeReference(settings.INPUT_REFERENCE)
        if self.case is None or inputNode is None or self.caseInputNodeID != inputNode.GetID():
            case = self.caseFromScene(parameterNode)
            if case is None:
                raise ValueError("run the analysis first (there is no heat map for this input yet).")
            self.case, self.caseRunKey, self.caseInputNodeID = case, None, inputNode.GetID()
        t0 = time.perf_counter()
        case, params = self.case, self.parameters(parameterNode)
        rethreshold(case, settings.thresholding(params, case.card),
                    roiFromParameters(parameterNode, params, case.volume))()
        self._writeCase(parameterNode, inputNode, case, writeVolumes)
        self.lastUpdateSeconds = time.perf_counter() - t0
        return case

    def _writeCase(self, parameterNode, inputNode, case: CaseResult, writeVolumes: bool) -> None:
        for role, node in outputs.writeCase(self.scene, inputNode, case, writeVolumes).items():
            parameterNode.SetNodeReferenceID(settings.OUTPUT_REFERENCES[role], node.GetID())

    @staticmethod
    def updateSegmentation(segmentationNode, inputNode, labels, volume) -> None:
        outputs.updateSegmentation(segmentationNode, inputNode, labels, volume)

    def lesionCenterRAS(self, tableNode, row: int) -> tuple[float, float, float]:
        return outputs.lesionCenterRAS(self.scene, tableNode, row)

    # ---- exports -------------------------------------------------------------------------------
    def _exportable(self, parameterNode, role: str) -> tuple[Any, CaseResult]:
        """The output node of ``role`` and the case it shows (raises when there are no results yet)."""
        node = parameterNode.GetNodeReference(settings.OUTPUT_REFERENCES[role])
        if node is None:
            raise ValueError("there are no results to export yet; press Apply first.")
        inputNode = parameterNode.GetNodeReference(settings.INPUT_REFERENCE)
        current = self.case is not None and inputNode is not None and self.caseInputNodeID == inputNode.GetID()
        return node, self.case if current else self.updateLesions(parameterNode)

    def exportSegmentation(self, parameterNode, path: str) -> Path:
        """The lesion segmentation as .seg.nrrd or NIfTI label map (.nii/.nii.gz)."""
        node, case = self._exportable(parameterNode, "segmentation")
        return exports.exportSegmentation(node, case, path)

    def exportTableCsv(self, parameterNode, path: str) -> Path:
        """The lesion table as CSV, exactly as the command line writes lesions.csv."""
        return exports.exportTableCsv(self._exportable(parameterNode, "table")[1], path)

    def exportReport(self, parameterNode, path: str) -> Path:
        """The HTML report of the current case."""
        case = self._exportable(parameterNode, "table")[1]
        params = self.parameters(parameterNode)
        inputNode = self.scene.GetNodeByID(self.caseInputNodeID or "")
        return exports.exportReport(case, path, title=f"DiffusionAnomaly: {inputNode.GetName() if inputNode else 'case'}",
                                    parameters={"roi": params["ROIMode"], "device": params["Device"],
                                                "checkpoint": case.checkpoint})

    def exportDicomSeg(self, parameterNode, outputFolder: str) -> None:
        """DICOM SEG through Slicer's exporter."""
        node = self._exportable(parameterNode, "segmentation")[0]
        exports.exportDicomSeg(self.scene, node, parameterNode.GetNodeReference(settings.INPUT_REFERENCE),
                               outputFolder)
