"""DiffusionAnomalyLogic: the module's logic, composed of the Lib's parts. No Qt.

- :mod:`.parameters`: the parameter node's settings and their reading as engine arguments;
- :mod:`.models`: which models there are and their cards;
- :mod:`.nodes`: volume nodes <-> engine volumes;
- :mod:`.jobs`: runs on the worker process (start, poll, cancel);
- :mod:`.organs`: organ segmentations, the organ ROI, TotalSegmentator on a CT node;
- :mod:`.lesions`: ROI and re-thresholding of the cached heat map;
- :mod:`.outputs`: the output nodes in the scene;
- :mod:`.exports`: files.

The last result is kept as the engine's case record (:class:`~DiffusionAnomalyLib.pipeline.CaseResult`,
holding the whole heat map) with three notes of the module's own beside it: the run key (what
produced it: input, model, device, method, its checked parameters, classifier), the input node and
the region the network computed (the included organs; None: the whole volume). So a threshold,
minimum-size or ROI change re-thresholds it without the worker or the network, as long as the new
ROI lies inside that region (else Apply computes the rest); a change of method or of a method
parameter asks the worker, whose per-method cache recomputes only what the parameter needs
(``Parameter.recompute``: a guidance or classifier scale of IgCONDA-PET and CG-DDIM re-decodes
only); an Apply with unchanged settings does no worker call at all. It runs on the MRML library
without a Slicer application (``slicer-core``); pass the scene explicitly there.

The input's display (window, level, colours) is never changed: the counterfactual copies it, the heat
map is a foreground layer of its own. A CT goes the PET path: a volume that states no modality takes
the model's (:func:`modelVolume`, so its lesion table has the HU columns), and a CT organ model runs on
the organ ROI of its organs, refused up front without an organ segmentation.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import slicer

from DiffusionAnomalyLib.card import card_summary
from DiffusionAnomalyLib.method_catalog import METHODS, MethodSpec, card_methods
from DiffusionAnomalyLib.pipeline import CaseResult
from DiffusionAnomalyLib.preprocessing import check_modality
from DiffusionAnomalyLib.volume import Volume, array_key, read_volume, validate_volume

from DiffusionAnomalyModuleLib import exports, organs, outputs
from DiffusionAnomalyModuleLib import parameters as settings
from DiffusionAnomalyModuleLib.jobs import Job, JobRunner, Stage, pollUntilFinished
from DiffusionAnomalyModuleLib.lesions import NOT_COVERED, CaseROI, caseROI, rethreshold
from DiffusionAnomalyModuleLib.models import Classifier, ModelDatabase, classifierFor, workerClassifier
from DiffusionAnomalyModuleLib.nodes import nodeModality, volumeFromNode


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
        self.caseRegion: np.ndarray | None = None  # where ``case``'s heat map was computed (None: everywhere)
        self.lastUpdateSeconds: float | None = None
        self.organROIs = organs.OrganROIs()
        self.organRun: organs.OrganRun | None = None
        self.organProgressCallback: Callable[[organs.OrganRun], None] | None = None

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
    def applyCardDefaults(parameterNode, card: dict, method: str | None = None) -> None:
        settings.applyCardDefaults(parameterNode, card, method)

    @staticmethod
    def applyMethodDefaults(parameterNode, card: dict, method: str) -> None:
        settings.applyMethodDefaults(parameterNode, card, method)

    def methodChoices(self, parameterNode) -> list[tuple[str, str]]:
        """(name, title) of the methods the chosen model's network serves, its default first; [] without a usable model."""
        try:
            card = self.readCard(self.parameters(parameterNode)["Model"])
        except ValueError:
            return []
        return [(name, METHODS[name].title) for name in card_methods(card)]

    def chosenMethod(self, parameterNode) -> MethodSpec | None:
        """The catalog record of the method the parameter node chooses ("" = the model's own); None when the
        model cannot be read or does not serve it (the run says why)."""
        params = self.parameters(parameterNode)
        try:
            return settings.servedMethod(self.readCard(params["Model"]), params["Method"])
        except ValueError:
            return None

    def classifier(self, params: dict[str, str], card: dict, spec: MethodSpec) -> Classifier | None:
        """The guidance classifier of a run of ``spec`` (None: the method needs none); refused in one sentence."""
        return classifierFor(card, params["Classifier"]) if spec.classifier else None

    def classifierSummary(self, parameterNode) -> str:
        """One line: which classifier guides the chosen method (the bundled one or the file), or why none can."""
        params = self.parameters(parameterNode)
        try:
            card = self.readCard(params["Model"])
            spec = settings.servedMethod(card, params["Method"])
            if not spec.classifier:
                return f"{spec.title} needs no classifier."
            return f"Guided by the {self.classifier(params, card, spec).words}."
        except ValueError as exc:
            return str(exc)

    def preferModelForInput(self, parameterNode) -> bool:
        """When the chosen model is for another modality than the input states (its DICOM modality or the panel's
        Modality), choose the first bundled model for the input's (:meth:`.ModelDatabase.defaultModel`) with its
        card's defaults; True when the model changed. A model that fits stays, as does any choice while the
        input states no modality or no model is for it (the model's summary then says why it does not fit)."""
        inputNode = parameterNode.GetNodeReference(settings.INPUT_REFERENCE)
        params = self.parameters(parameterNode)
        try:
            modality = nodeModality(inputNode, params["Modality"]) if inputNode is not None else None
        except ValueError:  # the panel's modality contradicts the node: the run says so
            return False
        if modality is None:
            return False
        try:
            if self.readCard(params["Model"])["modality"] == modality:
                return False
        except ValueError:  # no usable model chosen: one for the input is better
            pass
        model = self.models.defaultModel(modality)
        try:
            card = self.readCard(model) if model and model != params["Model"] else None
        except ValueError:
            return False
        if card is None or card["modality"] != modality:
            return False
        parameterNode.SetParameter("Model", model)
        self.applyCardDefaults(parameterNode, card, "")
        return True

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
        if self.organRunning:
            raise ValueError("TotalSegmentator is still segmenting the organs; wait for it, or cancel it first.")
        params = self.parameters(parameterNode)
        inputNode = self.inputNode(parameterNode)
        volume = validate_volume(volumeFromNode(inputNode, params["Modality"], params["Units"]))
        checkpoint = self.models.checkpointPath(params["Model"])
        card = self.models.card(checkpoint)
        volume = modelVolume(volume, card)
        spec, resolved = settings.resolvedMethod(params, card)  # the method's parameters, checked before any work
        classifier = self.classifier(params, card, spec)
        settings.thresholding(params, card)  # a non-numeric threshold setting fails before any work
        roi = self.caseROI(parameterNode, params, card, volume)  # organ and segment refusals too
        request = settings.runRequest(params, card)
        device = params["Device"] or "auto"
        made = {"method": spec.name, "parameters": resolved, "counterfactual": request["counterfactual"],
                "classifier": classifier.path if classifier is not None else None}
        runKey = (array_key(volume), inputNode.GetID(), checkpoint, device, json.dumps(made, sort_keys=True))
        job = Job(runKey=runKey, inputNodeID=inputNode.GetID(), volume=volume, card=card, checkpoint=checkpoint,
                  method=spec.name, classifier=classifier, workerClassifier=workerClassifier(params),
                  region=roi.region, roi=roi.mask)
        if self.case is not None and self.caseRunKey == runKey and roi.coveredBy(self.caseRegion):
            self.updateLesions(parameterNode)
            return self.jobs.finishWithoutWorker(job, "unchanged parameters: results reused (no diffusion)")
        job.stages = self._acceptStages(parameterNode)
        return self.jobs.submit(job, request, device)

    def caseROI(self, parameterNode, params: dict[str, str], card: dict, volume) -> CaseROI:
        """The segment and organ ROI the parameter node chooses, on ``volume``'s grid (see :mod:`.lesions`)."""
        return caseROI(parameterNode, params, card, volume, self.organROIs)

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
                checkpoint=job.checkpoint, method_name=m.get("method") or job.method,
                classifier=job.classifier.record() if job.classifier is not None else None,
                confidence=np.asarray(m["classifier_confidence"], dtype=float).reshape(-1, 2)
                if m.get("classifier_confidence") is not None else None)

        def lesions(job: Job) -> Callable[[], CaseResult]:
            # the ROI as set now (it may have changed during the run), else the one the run started with
            params = self.parameters(parameterNode)
            try:
                roi = self.caseROI(parameterNode, params, job.card, job.volume)
                mask = roi.mask if roi.coveredBy(job.region) else job.roi
                job.case.organs = roi.organs.labels if roi.organs is not None else None
            except ValueError:
                mask = job.roi
            return rethreshold(job.case, settings.thresholding(params, job.card), mask)

        def write(job: Job) -> None:
            inputNode = self.scene.GetNodeByID(job.inputNodeID)
            if inputNode is None:
                raise ValueError("the input volume was removed from the scene.")
            self._writeCase(parameterNode, inputNode, job.case, writeVolumes=True)
            self.case, self.caseRunKey, self.caseInputNodeID = job.case, job.runKey, job.inputNodeID
            self.caseRegion = job.region

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
        """Stop the worker and a TotalSegmentator run (module unloaded, Slicer closing)."""
        if self.jobs.running:
            self.jobs.cancel()
        self.jobs.stopWorker()
        self.cancelOrganRun()

    # ---- organs --------------------------------------------------------------------------------
    @property
    def organRunning(self) -> bool:
        """Whether TotalSegmentator is segmenting a CT for the Organs section."""
        return self.organRun is not None and not self.organRun.finished

    def organChoiceState(self, parameterNode) -> tuple[list[str], dict[str, list[str]]]:
        """What the include and exclude lists offer (the groups, then the organ segmentation's structures), and
        what each has checked: the parameters' names, the card's default while a list's setting is empty (its
        exclusion; a crop model's organs to include)."""
        params = self.parameters(parameterNode)
        checked = {name: settings.organNames(params[name]) for name in ("OrganInclude", "OrganExclude")}
        checked.update(self._organDefaults(params))
        offered = organs.organChoices(parameterNode.GetNodeReference(settings.ORGAN_REFERENCE))
        for names in checked.values():  # a saved choice stays visible even where it is not offered
            offered += [n for n in names if n not in offered]
        return offered, checked

    def _organDefaults(self, params: dict[str, str]) -> dict[str, list[str]]:
        """The card's default of each organ list left empty: its exclusion, and a crop model's organs to include."""
        try:
            selection = settings.organSelection(params, self.readCard(params["Model"]))
        except ValueError:  # no usable model yet (or a setting the run refuses): nothing by default
            return {}
        defaults = {"OrganInclude": selection.include if selection.skip_absent else None,
                    "OrganExclude": selection.exclude}
        return {name: list(names) for name, names in defaults.items() if names is not None and params[name] == ""}

    def organListText(self, parameterNode, name: str, checked: list[str]) -> str:
        """The setting ``name`` (OrganInclude or OrganExclude) for the organs ``checked`` in its list: still "" (the
        card's default) when they are what the default checks, so a crop model's organs keep meaning those the scan
        shows; else the names, an empty exclusion "none"."""
        if self._organDefaults(self.parameters(parameterNode)).get(name) == list(checked):
            return ""
        return settings.organText(checked) if name == "OrganExclude" else ",".join(checked)

    def organSummary(self, parameterNode) -> str:
        """One line on the organ ROI: its source and choice, or why it cannot be built."""
        segmentationNode = parameterNode.GetNodeReference(settings.ORGAN_REFERENCE)
        inputNode = parameterNode.GetNodeReference(settings.INPUT_REFERENCE)
        params = self.parameters(parameterNode)
        try:
            card = self.readCard(params["Model"])
        except ValueError:
            card = {}
        if segmentationNode is None:
            if organs.cropOrgans(card):
                return organs.segmentationNeeded(card)
            return "No organ segmentation: lesions are looked for in the whole volume."
        try:
            selection = settings.organSelection(params, card)
            if inputNode is None or inputNode.GetImageData() is None:
                return f"{segmentationNode.GetName()}: choose the input volume."
            roi = self.organROIs.roi(segmentationNode, selection, volumeFromNode(inputNode))
        except ValueError as exc:
            return str(exc)
        parts = [f"{segmentationNode.GetName()}: {len(roi.organs)} structures on the input", selection.words()]
        if roi.mask is not None:
            parts.append(f"ROI {100.0 * roi.mask.mean():.0f} % of the input")
        return "; ".join(parts) + "."

    def startOrganRun(self, parameterNode) -> organs.OrganRun:
        """TotalSegmentator on the Organs section's CT (returns at once with the engine's runner; poll :meth:`pollOrganRun`).

        The new segmentation goes under the input volume and becomes the organ segmentation; a
        refusal (no CT, not a CT, TotalSegmentator not set up) is raised before anything starts.
        """
        if self.organRunning:
            raise RuntimeError("TotalSegmentator is already running; cancel it first.")
        if self.jobs.running:
            raise ValueError("the analysis is running; wait for it, or cancel it first.")
        ctNode = parameterNode.GetNodeReference(settings.ORGAN_CT_REFERENCE)
        if ctNode is None:
            raise ValueError("choose the CT volume whose organs TotalSegmentator should segment.")
        params = self.parameters(parameterNode)
        parent = parameterNode.GetNodeReference(settings.INPUT_REFERENCE) or ctNode
        run = organs.OrganRun(self.scene, ctNode, parent, fast=params["OrganFast"].lower() == "true",
                              device=params["Device"] or "auto", progressCallback=self.organProgressCallback)
        self.organRun = run.start()
        return self.pollOrganRun(parameterNode)

    def pollOrganRun(self, parameterNode) -> organs.OrganRun | None:
        """Progress of the TotalSegmentator run; when it is done, its segmentation becomes the organ segmentation."""
        run = self.organRun
        if run is None:
            return None
        if not run.finished:
            run.poll()
        if run.status == "done" and not run.accepted:  # once: the user may choose another segmentation later
            run.accepted = True
            parameterNode.SetNodeReferenceID(settings.ORGAN_REFERENCE, run.node.GetID())
        return run

    def runOrgansBlocking(self, parameterNode, timeout: float = 3600.0) -> organs.OrganRun:
        """TotalSegmentator on the Organs section's CT, polled until it ends (scripts, tests); cancelled after ``timeout`` s."""
        return pollUntilFinished(self.startOrganRun(parameterNode), lambda: self.pollOrganRun(parameterNode),
                                 self.cancelOrganRun, timeout, "TotalSegmentator")

    def cancelOrganRun(self) -> None:
        """End TotalSegmentator's process tree; the scene stays as it was."""
        if self.organRunning:
            self.organRun.cancel()

    # ---- lesions from the cached heat map ------------------------------------------------------
    def heatMaximum(self, default: float = 100.0) -> float:
        """The largest value the absolute-threshold slider offers: the current case's heat-map maximum (rounded up),
        ``default`` before any case (or for a map below it)."""
        if self.case is None or not self.case.heatmap.voxels.size:
            return default
        return max(default, float(np.ceil(self.case.heatmap.voxels.max())))

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
        t0 = time.perf_counter()
        params = self.parameters(parameterNode)
        if self.case is None or inputNode is None or self.caseInputNodeID != inputNode.GetID():
            case = self.caseFromScene(parameterNode)
            if case is None:
                raise ValueError("run the analysis first (there is no heat map for this input yet).")
            roi = self.caseROI(parameterNode, params, case.card, case.volume)
            # a heat map saved inside an organ ROI holds the map there only (0 outside): that is all it covers,
            # whatever the ROI chosen since
            region = case.heatmap.voxels != 0 if outputs.heatShownInsideROI(self.scene, inputNode) else None
            self.case, self.caseRunKey, self.caseInputNodeID, self.caseRegion = case, None, inputNode.GetID(), region
        case = self.case
        roi = self.caseROI(parameterNode, params, case.card, case.volume)
        if not roi.coveredBy(self.caseRegion):
            raise ValueError(NOT_COVERED)
        case.organs = roi.organs.labels if roi.organs is not None else None  # each candidate's organ, the liver
        roiChanged = not _sameMask(case.roi, roi.mask)
        rethreshold(case, settings.thresholding(params, case.card), roi.mask)()
        self._writeCase(parameterNode, inputNode, case, writeVolumes, writeHeat=roiChanged)
        self.lastUpdateSeconds = time.perf_counter() - t0
        return case

    def _writeCase(self, parameterNode, inputNode, case: CaseResult, writeVolumes: bool,
                   writeHeat: bool = False) -> None:
        nodes = outputs.writeCase(self.scene, inputNode, case, writeVolumes, writeHeat)
        for role, reference in settings.OUTPUT_REFERENCES.items():  # None: the run made none (CDM: no counterfactual)
            parameterNode.SetNodeReferenceID(reference, nodes[role].GetID() if role in nodes else None)

    def resultSummary(self, parameterNode) -> str:
        """The method and parameters that made the lesion table shown (its description), "" without one."""
        table = parameterNode.GetNodeReference(settings.OUTPUT_REFERENCES["table"])
        return (table.GetDescription() or "") if table is not None else ""

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
        organRecord = {}
        if parameterNode.GetNodeReference(settings.ORGAN_REFERENCE) is not None:
            organRecord = {"organ_segmentation": parameterNode.GetNodeReference(settings.ORGAN_REFERENCE).GetName(),
                           **settings.organSelection(params, case.card).as_parameters()}
        return exports.exportReport(case, path, title=f"DiffusionAnomaly: {inputNode.GetName() if inputNode else 'case'}",
                                    parameters={"method": outputs.methodWords(case), "roi": params["ROIMode"],
                                                **organRecord, "device": params["Device"],
                                                "checkpoint": case.checkpoint,
                                                **({"classifier": case.classifier["checkpoint"]}
                                                   if case.classifier else {})})

    def exportDicomSeg(self, parameterNode, outputFolder: str) -> None:
        """DICOM SEG through Slicer's exporter."""
        node = self._exportable(parameterNode, "segmentation")[0]
        exports.exportDicomSeg(self.scene, node, parameterNode.GetNodeReference(settings.INPUT_REFERENCE),
                               outputFolder)


def modelVolume(volume: Volume, card: dict) -> Volume:
    """``volume`` as the model of ``card`` analyses it: refused in one sentence when it does not fit
    (:func:`~DiffusionAnomalyLib.preprocessing.check_modality`: another modality, raw CT values, ...); a volume that
    states no modality (a NIfTI) takes the model's, as in the command line's analysis, so a CT's lesion table has
    the HU columns."""
    check_modality(volume, card)
    return volume if volume.modality is not None else replace(volume, modality=card["modality"])


def _sameMask(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    """Whether two ROI masks (None: no ROI) are the same."""
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool(np.array_equal(a != 0, b != 0))
