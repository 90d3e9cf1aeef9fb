"""DiffusionAnomalyLogic: MRML nodes <-> engine, the worker process, output nodes. No Qt.

Everything algorithmic lives in DiffusionAnomalyLib; this class only converts at the edge
(``arrayFromVolume`` / ``GetIJKToRASMatrix`` -> :class:`Volume` and back), drives the worker
process (:class:`DiffusionAnomalyLib.worker.WorkerClient`) and writes the results as standard
nodes. It runs against the real MRML library without a Slicer application (``slicer-core``), so
CI tests it; pass the scene explicitly there (``DiffusionAnomalyLogic(scene)``).

Interactivity (issue 3):
- threshold / minimum size / ROI change -> :meth:`updateLesions` from the cached heat map: no
  worker call, no network evaluation;
- guidance change -> a worker request; the worker's model cache re-decodes only;
- Apply with unchanged parameters -> no worker call at all (served from :attr:`case`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

import slicer
import vtk

MODULE_NAME = "DiffusionAnomaly"
#: node attribute naming what an output node is (heatmap, counterfactual, segmentation, table)
ROLE_ATTRIBUTE = "DiffusionAnomaly.Role"
#: node attribute holding the ID of the input volume an output belongs to
INPUT_ATTRIBUTE = "DiffusionAnomaly.InputVolumeID"
OUTPUT_ROLES = ("heatmap", "counterfactual", "segmentation", "table")
OUTPUT_NAMES = {"heatmap": "heat map", "counterfactual": "counterfactual", "segmentation": "lesions",
                "table": "lesion table"}
#: parameter node reference roles for the current input / ROI / outputs
REFERENCE_ROLES = {"heatmap": "HeatMap", "counterfactual": "Counterfactual", "segmentation": "Segmentation",
                   "table": "Table"}
HEAT_COLOR_NODE_NAME = "DiffusionAnomaly heat"

NOT_FOR_CLINICAL_USE = ("Research software. Not for clinical use: results must not be used for diagnosis or "
                        "treatment decisions.")

#: every user-visible setting with its default (stored as strings in the parameter node); an
#: empty string means "the model card's default".
PARAMETERS: dict[str, str] = {
    "Modality": "auto",          # auto (from the node) | PT | CT
    "Model": "",                 # a bundled model id or a checkpoint path
    "ROIMode": "whole",          # whole | segmentation
    "ROISegments": "",           # comma-separated segment IDs of the ROI segmentation ('' = all)
    "NoiseLevel": "",
    "GuidanceScale": "",
    "ThresholdMethod": "",       # fraction | absolute | otsu
    "Threshold": "",
    "MinSizeMl": "",
    "Steps": "",                 # '' = card default; 0 = stride-1 reference loop
    "Device": "auto",            # auto | cpu | cuda
    "Seed": "0",
    "Counterfactual": "true",
}


def _engine():
    """Import the engine lazily (it imports torch); module-level import would slow Slicer's start."""
    from DiffusionAnomalyLib import checkpoint, export, pipeline, postprocessing, volume, worker

    return checkpoint, export, pipeline, postprocessing, volume, worker


# ---- matrices and arrays (4x4 matrices: slicer.util.arrayFromVTKMatrix / vtkMatrixFromArray) -----
def _imageDataFromArray(voxels: np.ndarray, image: vtk.vtkImageData | None = None,
                        start_kji: tuple[int, int, int] = (0, 0, 0)) -> vtk.vtkImageData:
    """A vtkImageData holding a deep copy of ``voxels`` [k, j, i] (what updateVolumeFromArray does).

    ``start_kji``: index of the first voxel in the full grid (a sub-box keeps its place: extent).
    """
    from vtk.util import numpy_support

    voxels = np.ascontiguousarray(voxels)
    image = image if image is not None else vtk.vtkImageData()
    k, j, i = voxels.shape
    k0, j0, i0 = (int(v) for v in start_kji)
    image.SetExtent(i0, i0 + i - 1, j0, j0 + j - 1, k0, k0 + k - 1)
    image.SetOrigin(0, 0, 0)
    image.SetSpacing(1, 1, 1)
    scalars = numpy_support.numpy_to_vtk(voxels.ravel(), deep=True,
                                         array_type=numpy_support.get_vtk_array_type(voxels.dtype))
    scalars.SetName("ImageScalars")
    image.GetPointData().SetScalars(scalars)
    return image


def _units(node) -> str | None:
    """The voxel unit of a volume node (Slicer sets a coded entry for PET SUV loaded from DICOM)."""
    getter = getattr(node, "GetVoxelValueUnits", None)
    entry = getter() if getter else None
    if entry is not None:
        text = f"{entry.GetCodeValue() or ''} {entry.GetCodeMeaning() or ''}"
        if "SUV" in text.upper():
            return "SUVbw"
        return entry.GetCodeMeaning() or entry.GetCodeValue() or None
    return node.GetAttribute("DiffusionAnomaly.Units") or None


def volumeFromNode(node, modality: str | None = None):
    """The engine's Volume for a scalar volume node: voxels [k, j, i] (a copy) + IJK->RAS.

    ``modality``: "PT"/"CT", else the node's "DICOM.Modality" attribute, else None (unknown).
    """
    _, _, _, _, volume, _ = _engine()
    if node is None or node.GetImageData() is None:
        raise ValueError("choose an input volume that holds image data.")
    if node.GetClassName() not in ("vtkMRMLScalarVolumeNode",):
        raise ValueError(f"{node.GetName()} is a {node.GetClassName()}; choose a scalar (PET or CT) volume.")
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    voxels = np.array(slicer.util.arrayFromVolume(node), copy=True)
    if modality in (None, "", "auto"):
        modality = node.GetAttribute("DICOM.Modality") or None
    units = _units(node)
    meta = {"node": node.GetName()}
    if modality == "PT" and units is None:
        factor = dicomSuvFactor(node)
        if factor is not None:  # Slicer loads PET DICOM in Bq/ml: convert as the engine's reader does
            voxels = (voxels * factor).astype(np.float32)
            units, meta["suv_factor"] = "SUVbw", factor
    return volume.Volume(voxels=voxels, ijk_to_ras=slicer.util.arrayFromVTKMatrix(matrix), modality=modality,
                         units=units, meta=meta)


def dicomSuvFactor(node) -> float | None:
    """Body-weight SUV factor of a PET volume loaded from Slicer's DICOM database (None if not from DICOM).

    Slicer's DICOM reader gives PET in Bq/ml; the engine's models expect SUVbw. The factor comes
    from the engine's QIBA implementation (volume.suv_bw_factor) on the series' own headers.
    """
    uids = (node.GetAttribute("DICOM.instanceUIDs") or "").split()
    database = getattr(slicer, "dicomDatabase", None)
    if not uids or database is None:
        return None
    import pydicom

    from DiffusionAnomalyLib import volume

    files = [database.fileForInstance(uid) for uid in uids]
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files if f]
    if not headers:
        return None
    factors = np.unique(volume.suv_factors(headers))
    if factors.size != 1:
        raise ValueError("this PET series needs a different SUV factor per slice (DecayCorrection NONE); "
                         "convert it with 'diffusion-anomaly run' from the DICOM folder instead.")
    return float(factors[0])


def updateVolumeNodeFromVolume(node, vol) -> None:
    """Write voxels and exact geometry of ``vol`` into ``node`` (IJKToRAS set as one matrix)."""
    node.SetAndObserveImageData(_imageDataFromArray(vol.voxels))
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(vol.ijk_to_ras))
    node.Modified()


def volumeKey(vol) -> str:
    """Content hash of a volume (voxels, geometry, modality, units): equal inputs, equal keys.

    The engine's methods.base.array_key does the same but imports torch, which Slicer's own
    process should not load just to compare inputs (the worker process owns torch).
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(str(vol.voxels.shape).encode() + str(vol.voxels.dtype).encode())
    h.update(np.ascontiguousarray(vol.voxels).tobytes())
    h.update(np.asarray(vol.ijk_to_ras, dtype=np.float64).tobytes())
    h.update(repr((vol.modality, vol.units)).encode())
    return h.hexdigest()


# ---- state --------------------------------------------------------------------------------------
@dataclass
class Case:
    """The cached result of one worker run, enough to re-threshold without the network."""

    runKey: tuple
    inputNodeID: str
    volume: Any                  # engine Volume (the input)
    heatmap: Any                 # engine Volume
    counterfactual: Any | None
    card: dict
    checkpoint: str
    parameters: dict             # the method parameters the worker resolved
    networkEvaluations: int = 0
    totalNetworkEvaluations: int = 0
    timings: dict = field(default_factory=dict)
    labels: np.ndarray | None = None
    table: list = field(default_factory=list)
    thresholding: Any = None


@dataclass
class Job:
    """A run in progress (the widget polls it)."""

    requestId: int | None
    runKey: tuple
    inputNodeID: str
    volume: Any
    card: dict
    checkpoint: str
    tempDir: str | None
    status: str = "running"      # running | done | failed | cancelled
    fraction: float = 0.0
    message: str = "starting the inference worker"
    error: str | None = None
    networkEvaluations: int | None = None
    workerCall: bool = True
    longestPollSeconds: float = 0.0
    result: dict | None = None     # the worker's result message, accepted in stages
    stage: str = ""                # read | lesions | write
    pendingCase: Any = None
    future: Any = None
    started: float = field(default_factory=time.monotonic)

    @property
    def finished(self) -> bool:
        return self.status != "running"


class DiffusionAnomalyLogicBase:
    """The logic proper; :class:`DiffusionAnomaly.DiffusionAnomalyLogic` mixes in Slicer's base class."""

    def __init__(self, scene=None, python: str | None = None, threads: int = 0, settingsPath: str | None = None):
        self._scene = scene
        self.python = python
        # torch threads of the worker (0: torch's default); the environment variable serves tests and busy machines
        self.threads = threads or int(os.environ.get("DIFFUSION_ANOMALY_WORKER_THREADS", "0") or 0)
        self.settingsPath = Path(settingsPath or os.environ.get("DIFFUSION_ANOMALY_SETTINGS")
                                 or Path.home() / ".diffusion-anomaly" / "slicer-checkpoints.json")
        self.worker = None           # WorkerClient
        self.workerKey: tuple | None = None
        self.job: Job | None = None
        self.case: Case | None = None
        self.lastUpdateSeconds: float | None = None
        self.progressCallback: Callable[[Job], None] | None = None
        self._parameterNodeForJob = None

    # ---- scene and parameter node -------------------------------------------------------------
    @property
    def scene(self):
        return self._scene if self._scene is not None else slicer.mrmlScene

    def getParameterNode(self):
        """The module's singleton parameter node (created with defaults on first use)."""
        scene = self.scene
        node = scene.GetSingletonNode(MODULE_NAME, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
            node.UnRegister(None)
            node.SetSingletonTag(MODULE_NAME)
            node.SetName(MODULE_NAME)
            node.SetAttribute("ModuleName", MODULE_NAME)
            node = scene.AddNode(node)
        self.setDefaultParameters(node)
        return node

    def setDefaultParameters(self, node) -> None:
        for name, default in PARAMETERS.items():
            if node.GetParameter(name) == "" and default != "":
                node.SetParameter(name, default)
        if not node.GetParameter("Model"):
            models = self.availableModels()
            if models:
                node.SetParameter("Model", models[0]["id"])

    @staticmethod
    def parameters(node) -> dict[str, str]:
        return {name: node.GetParameter(name) for name in PARAMETERS}

    # ---- models -------------------------------------------------------------------------------
    def userCheckpoints(self) -> list[str]:
        try:
            return [p for p in json.loads(self.settingsPath.read_text()).get("checkpoints", [])]
        except (OSError, ValueError):
            return []

    def addUserCheckpoint(self, path: str) -> dict:
        """Remember a checkpoint file across sessions; returns its model entry (card checked)."""
        checkpoint = _engine()[0]
        path = str(Path(path).expanduser().resolve())
        card = checkpoint.read_card(path)  # raises CheckpointError with a sentence
        paths = [p for p in self.userCheckpoints() if p != path] + [path]
        self.settingsPath.parent.mkdir(parents=True, exist_ok=True)
        self.settingsPath.write_text(json.dumps({"checkpoints": paths}, indent=1))
        return {"id": path, "title": f"{card['id']} ({Path(path).name})", "path": path}

    def availableModels(self) -> list[dict]:
        """Bundled models (registry.json) then remembered checkpoint files that still exist."""
        checkpoint = _engine()[0]
        models = [{"id": e["id"], "title": e.get("title", e["id"]), "path": e["path"]}
                  for e in checkpoint.bundled_models()]
        for path in self.userCheckpoints():
            if Path(path).is_file():
                models.append({"id": path, "title": f"{Path(path).name} (file)", "path": path})
        return models

    def checkpointPath(self, model: str) -> str:
        if not model:
            raise ValueError("choose a model (a bundled model or a checkpoint file).")
        for m in self.availableModels():
            if m["id"] == model:
                return m["path"]
        if Path(model).is_file():
            return str(Path(model).resolve())
        raise ValueError(f"the model {model!r} is neither a bundled model nor an existing checkpoint file.")

    def readCard(self, model: str) -> dict:
        return _engine()[0].read_card(self.checkpointPath(model))

    @staticmethod
    def cardSummary(card: dict) -> str:
        """What the panel shows about a model: method, modality, training data, clinical-use flag."""
        prov = card.get("provenance", {})
        methods = {"igconda": "IgCONDA-PET (implicit guidance)", "classifier_guided": "classifier-guided DDIM",
                   "cdm": "conditional diffusion (CDM)", "latent3d": "3D latent diffusion"}
        modality = {"PT": "PET (SUV)", "CT": "CT (HU)"}.get(card.get("modality"), card.get("modality"))
        data = prov.get("training_data") or prov.get("note") or "not stated in the model card"
        lines = [f"Model: {card.get('id')}", f"Method: {methods.get(card.get('method'), card.get('method'))}",
                 f"Modality: {modality}", f"Training data: {data}"]
        if card.get("not_for_clinical_use", True):
            lines.append("NOT FOR CLINICAL USE")
        return "\n".join(lines)

    @staticmethod
    def checkModelFits(card: dict, vol) -> None:
        """Raise ValueError with the sentence why a model does not fit the input's modality."""
        from DiffusionAnomalyLib.methods.base import check_modality

        check_modality(vol, card)

    def applyCardDefaults(self, node, card: dict) -> None:
        """Set the method and threshold parameters to the model card's defaults."""
        d = card.get("inference_defaults", {})
        th = d.get("threshold", {})
        values = {"NoiseLevel": d.get("noise_level"), "GuidanceScale": d.get("guidance_scale"),
                  "ThresholdMethod": th.get("method", "fraction"), "Threshold": th.get("value", 0.5),
                  "MinSizeMl": d.get("min_size_ml", 0.5), "Steps": d.get("steps")}
        wasModifying = node.StartModify()
        for name, value in values.items():
            node.SetParameter(name, "" if value is None else str(value))
        node.EndModify(wasModifying)

    # ---- parameters -> engine arguments --------------------------------------------------------
    @staticmethod
    def _num(params: dict, name: str, kind=float):
        text = params.get(name, "")
        if text in ("", None):
            return None
        try:
            return kind(float(text)) if kind is int else kind(text)
        except ValueError:
            raise ValueError(f"the parameter {name} must be a number, got {text!r}.") from None

    def thresholding(self, params: dict, card: dict):
        pipeline = _engine()[2]
        return pipeline.Thresholding.from_card(card, method=params.get("ThresholdMethod") or None,
                                               value=self._num(params, "Threshold"),
                                               min_size_ml=self._num(params, "MinSizeMl"))

    def runRequest(self, params: dict) -> dict:
        """The worker request's method parameters (absent = the card's default)."""
        request: dict[str, Any] = {"noise_level": self._num(params, "NoiseLevel", int),
                                   "guidance_scale": self._num(params, "GuidanceScale"),
                                   "seed": self._num(params, "Seed", int),
                                   "counterfactual": params.get("Counterfactual", "true").lower() == "true"}
        steps = self._num(params, "Steps", int)
        if steps is not None:
            request["steps"] = None if steps == 0 else steps
        return request

    # ---- running ------------------------------------------------------------------------------
    def inputNode(self, parameterNode):
        node = parameterNode.GetNodeReference("InputVolume")
        if node is None:
            raise ValueError("choose an input volume.")
        return node

    def _pythonExecutable(self) -> str:
        if self.python:
            return self.python
        return shutil.which("PythonSlicer") or sys.executable

    def _ensureWorker(self, checkpointPath: str, device: str):
        workerModule = _engine()[5]
        key = (checkpointPath, device)
        if self.worker is not None and self.worker.alive and self.workerKey == key:
            return self.worker
        self.stopWorker()
        self.worker = workerModule.WorkerClient(checkpointPath, device=device, python=self._pythonExecutable(),
                                                threads=self.threads).start()
        self.workerKey = key
        return self.worker

    def stopWorker(self) -> None:
        if self.worker is not None:
            self.worker.close()
        self.worker = None
        self.workerKey = None

    def startRun(self, parameterNode) -> Job:
        """Start a run (returns at once). Poll :meth:`poll` until ``job.finished``.

        Nothing in the scene changes until the result arrives; unchanged parameters are served
        from :attr:`case` without any worker call (the job is then already finished).
        """
        if self.job is not None and not self.job.finished:
            raise RuntimeError("a run is already in progress; cancel it first.")
        _, _, _, _, volumeModule, _ = _engine()
        params = self.parameters(parameterNode)
        inputNode = self.inputNode(parameterNode)
        vol = volumeFromNode(inputNode, params["Modality"])
        volumeModule.validate_volume(vol)
        checkpointPath = self.checkpointPath(params["Model"])
        card = _engine()[0].read_card(checkpointPath)
        self.checkModelFits(card, vol)
        self.thresholding(params, card)  # bad threshold values fail before any work
        request = self.runRequest(params)
        device = params.get("Device") or "auto"
        runKey = (volumeKey(vol), inputNode.GetID(), checkpointPath, device,
                  json.dumps({k: v for k, v in request.items()}, sort_keys=True))
        if self.case is not None and self.case.runKey == runKey:
            job = Job(None, runKey, inputNode.GetID(), vol, card, checkpointPath, None, workerCall=False,
                      networkEvaluations=0)
            self.job = job
            self.updateLesions(parameterNode)
            job.status, job.fraction, job.message = "done", 1.0, "unchanged parameters: results reused (no diffusion)"
            return job
        worker = self._ensureWorker(checkpointPath, device)
        tempDir = tempfile.mkdtemp(prefix="DiffusionAnomaly-")
        try:
            inputPath = volumeModule.write_volume(vol, Path(tempDir) / "input.nrrd", compress=False)
            requestId = worker.send({"cmd": "run", "input": str(inputPath), "out_dir": tempDir,
                                     "modality": vol.modality, "units": vol.units, **request})
        except Exception:
            shutil.rmtree(tempDir, ignore_errors=True)
            raise
        self.job = Job(requestId, runKey, inputNode.GetID(), vol, card, checkpointPath, tempDir)
        self._parameterNodeForJob = parameterNode
        return self.job

    def poll(self, parameterNode=None) -> Job | None:
        """Handle the worker's messages (never blocks); on a result, write the output nodes."""
        job = self.job
        if job is None or job.finished or self.worker is None:
            return job
        started = time.perf_counter()
        try:
            return self._poll(job, parameterNode or self._parameterNodeForJob)
        finally:  # how long the UI thread was busy in one poll (the "never > 0.5 s")
            job.longestPollSeconds = max(job.longestPollSeconds, time.perf_counter() - started)

    def _poll(self, job: Job, parameterNode) -> Job:
        if job.result is not None:  # the result arrived: one stage per poll keeps each UI stall short
            try:
                self._acceptStage(job, parameterNode)
            except Exception as exc:  # noqa: BLE001 - shown to the user as a sentence
                self._finish(job, "failed", str(exc))
            if self.progressCallback is not None:
                self.progressCallback(job)
            return job
        for m in self.worker.messages():
            kind = m.get("type")
            if kind == "ready":
                job.message = f"model {m['model_id']} loaded on {m['device']} ({m.get('precision', 'fp32')})"
            elif kind == "progress" and m.get("id") == job.requestId:
                job.fraction, job.message = float(m["fraction"]), m["message"]
            elif kind == "error" and m.get("id") in (job.requestId, None):
                self._finish(job, "failed", m["message"])
                if m.get("fatal"):
                    self.stopWorker()
            elif kind == "exit":
                self._finish(job, "failed", self.worker.failure(m))
                self.stopWorker()
            elif kind == "result" and m.get("id") == job.requestId:
                job.result, job.stage, job.fraction = m, "read", 1.0
                job.networkEvaluations = int(m["network_evaluations"])
                job.message = "loading the results"
                break
            if job.finished:
                break
        if self.progressCallback is not None:
            self.progressCallback(job)
        return job

    def _finish(self, job: Job, status: str, error: str | None) -> None:
        job.status, job.error = status, error
        if status == "done":
            job.fraction, job.message = 1.0, "done"
        elif status == "failed":
            job.message = f"failed: {error}"
        if job.tempDir:
            shutil.rmtree(job.tempDir, ignore_errors=True)
            job.tempDir = None

    def _acceptStage(self, job: Job, parameterNode) -> None:
        """read the result files -> compute lesions -> write all nodes (the only stage changing the scene)."""
        m = job.result
        if job.stage == "read":
            volumeModule = _engine()[4]
            heat = volumeModule.read_volume(m["heatmap"], validate=False)
            cf = volumeModule.read_volume(m["counterfactual"], validate=False) if m.get("counterfactual") else None
            job.pendingCase = Case(runKey=job.runKey, inputNodeID=job.inputNodeID, volume=job.volume, heatmap=heat,
                                   counterfactual=cf, card=job.card, checkpoint=job.checkpoint,
                                   parameters=m["parameters"], networkEvaluations=job.networkEvaluations,
                                   totalNetworkEvaluations=int(m["total_network_evaluations"]),
                                   timings=m.get("timings", {}))
            job.stage, job.message = "lesions", "finding lesions in the heat map"
        elif job.stage == "lesions":
            # thresholding a large map takes about a second: a background thread keeps the UI live
            if job.future is None:
                from concurrent.futures import ThreadPoolExecutor

                executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="DiffusionAnomalyLesions")
                job.future = executor.submit(self.startLesions(parameterNode, job.pendingCase))
                executor.shutdown(wait=False)
            elif job.future.done():
                job.future.result()  # re-raises a failure
                job.stage, job.message = "write", "writing the results into the scene"
        elif job.stage == "write":
            self.writeOutputs(parameterNode, job.pendingCase, writeVolumes=True)
            self.case = job.pendingCase
            self._finish(job, "done", None)

    def cancel(self) -> None:
        """Stop the running job by terminating the worker: the scene stays exactly as it was."""
        job = self.job
        if self.worker is not None:
            self.worker.terminate()
        self.worker, self.workerKey = None, None
        if job is not None and not job.finished:
            self._finish(job, "cancelled", None)
            job.message = "cancelled"

    def runBlocking(self, parameterNode, timeout: float = 600.0,
                    progress: Callable[[float, str], None] | None = None) -> Job:
        """Start a run and wait for it (scripts, tests, the module's self-test): same protocol as the UI."""
        job = self.startRun(parameterNode)
        deadline = time.monotonic() + timeout
        while not job.finished:
            if time.monotonic() > deadline:
                self.cancel()
                raise TimeoutError(f"the run did not finish within {timeout} s and was cancelled.")
            time.sleep(0.05)
            self.poll(parameterNode)
            if progress is not None:
                progress(job.fraction, job.message)
        if job.status == "failed":
            raise RuntimeError(job.error)
        return job

    def workerStats(self) -> dict:
        """The worker's counters (total network evaluations, cache entries); {} without a worker."""
        if self.worker is None or not self.worker.alive:
            return {}
        return self.worker.request({"cmd": "stats"}, timeout=60)

    # ---- lesions from the cached heat map ------------------------------------------------------
    def roiMask(self, parameterNode, vol) -> np.ndarray | None:
        """The ROI as a boolean [k, j, i] mask on the input grid, or None for the whole volume."""
        params = self.parameters(parameterNode)
        if params["ROIMode"] != "segmentation":
            return None
        segNode = parameterNode.GetNodeReference("ROISegmentation")
        if segNode is None:
            raise ValueError("the ROI is set to a segmentation, but no segmentation is chosen.")
        segmentation = segNode.GetSegmentation()
        ids = [s for s in params["ROISegments"].split(",") if s] or \
              [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]
        reference = slicer.vtkOrientedImageData()
        k, j, i = vol.voxels.shape
        reference.SetExtent(0, i - 1, 0, j - 1, 0, k - 1)
        reference.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(vol.ijk_to_ras))
        mask = np.zeros(vol.voxels.shape, dtype=bool)
        from vtk.util import numpy_support

        for segmentId in ids:
            segment = segmentation.GetSegment(segmentId)
            if segment is None:
                raise ValueError(f"the ROI segmentation {segNode.GetName()} has no segment {segmentId!r}.")
            labelmap = slicer.vtkOrientedImageData()
            segNode.GetBinaryLabelmapRepresentation(segmentId, labelmap)
            resampled = slicer.vtkOrientedImageData()
            slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
                labelmap, reference, resampled, False, True)
            if resampled.GetPointData().GetScalars() is None:
                continue
            arr = numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars())
            dims = resampled.GetDimensions()
            arr = arr.reshape(dims[2], dims[1], dims[0])
            ext = resampled.GetExtent()
            sub = (slice(ext[4], ext[5] + 1), slice(ext[2], ext[3] + 1), slice(ext[0], ext[1] + 1))
            mask[sub] |= arr != 0
        if not mask.any():
            raise ValueError(f"the chosen ROI segments of {segNode.GetName()} are empty inside the input volume.")
        return mask

    def caseFromNodes(self, parameterNode) -> Case | None:
        """Rebuild the cache from the output nodes (a reopened scene): threshold works without a rerun."""
        inputNode = parameterNode.GetNodeReference("InputVolume")
        if inputNode is None:
            return None
        heatNode = self.findOutput(inputNode, "heatmap")
        if heatNode is None or heatNode.GetImageData() is None:
            return None
        params = self.parameters(parameterNode)
        try:
            card = self.readCard(params["Model"])
            checkpointPath = self.checkpointPath(params["Model"])
        except Exception:  # noqa: BLE001 - model gone: still threshold with a neutral card
            card, checkpointPath = {"id": heatNode.GetAttribute("DiffusionAnomaly.ModelID") or "unknown",
                                    "method": "", "modality": "", "inference_defaults": {}}, ""
        vol = volumeFromNode(inputNode, params["Modality"])
        heat = volumeFromNode(heatNode)
        cfNode = self.findOutput(inputNode, "counterfactual")
        return Case(runKey=("from-scene",), inputNodeID=inputNode.GetID(), volume=vol, heatmap=heat,
                    counterfactual=volumeFromNode(cfNode) if cfNode is not None else None, card=card,
                    checkpoint=checkpointPath, parameters={})

    def updateLesions(self, parameterNode, writeVolumes: bool = False) -> Case:
        """Threshold + components + table from the cached heat map and write segmentation and table.

        No worker call and no network evaluation. ``writeVolumes`` also (re)writes the heat map and
        counterfactual nodes (after a worker run).
        """
        case = self.case
        inputNode = parameterNode.GetNodeReference("InputVolume")
        if case is None or inputNode is None or case.inputNodeID != inputNode.GetID():
            case = self.caseFromNodes(parameterNode)
            if case is None:
                raise ValueError("run the analysis first (there is no heat map for this input yet).")
            self.case = case
        t0 = time.perf_counter()
        self.computeLesions(parameterNode, case)
        self.writeOutputs(parameterNode, case, writeVolumes)
        self.lastUpdateSeconds = time.perf_counter() - t0
        return case

    def computeLesions(self, parameterNode, case: Case) -> None:
        """Labels, table and thresholding of ``case`` from its heat map (no scene change)."""
        self.startLesions(parameterNode, case)()

    def startLesions(self, parameterNode, case: Case) -> Callable[[], None]:
        """Read what the lesion step needs from the scene (ROI) now; return the pure computation.

        The returned callable touches no MRML object, so it may run in a background thread.
        """
        pipeline = _engine()[2]
        params = self.parameters(parameterNode)
        thresholding = self.thresholding(params, case.card)
        roi = self.roiMask(parameterNode, case.volume)

        def compute() -> None:
            labels, table = pipeline.lesions_from_heat(case.heatmap, case.volume, thresholding, roi)
            case.labels, case.table, case.thresholding = labels, table, thresholding

        return compute

    def writeOutputs(self, parameterNode, case: Case, writeVolumes: bool) -> None:
        """Write ``case`` into the output nodes (reused or created under the input)."""
        inputNode = self.scene.GetNodeByID(case.inputNodeID)
        if inputNode is None:
            raise ValueError("the input volume was removed from the scene.")
        self.scene.StartState(self.scene.BatchProcessState)
        try:
            if writeVolumes:
                heatNode = self.outputNode(inputNode, "heatmap", "vtkMRMLScalarVolumeNode")
                updateVolumeNodeFromVolume(heatNode, case.heatmap)
                heatNode.SetAttribute("DiffusionAnomaly.ModelID", str(case.card.get("id")))
                self.showHeatMap(inputNode, heatNode, case.heatmap)
                cfNode = self.findOutput(inputNode, "counterfactual")
                if case.counterfactual is not None:
                    cfNode = cfNode or self.outputNode(inputNode, "counterfactual", "vtkMRMLScalarVolumeNode")
                    updateVolumeNodeFromVolume(cfNode, case.counterfactual)
                    self._ensureDisplay(cfNode)
                    self._copyWindowLevel(inputNode, cfNode)
                if cfNode is not None:
                    parameterNode.SetNodeReferenceID(REFERENCE_ROLES["counterfactual"], cfNode.GetID())
                parameterNode.SetNodeReferenceID(REFERENCE_ROLES["heatmap"], heatNode.GetID())
            segNode = self.outputNode(inputNode, "segmentation", "vtkMRMLSegmentationNode")
            self.updateSegmentation(segNode, inputNode, case.labels, case.volume)
            tableNode = self.outputNode(inputNode, "table", "vtkMRMLTableNode")
            self.updateTable(tableNode, case.table)
            parameterNode.SetNodeReferenceID(REFERENCE_ROLES["segmentation"], segNode.GetID())
            parameterNode.SetNodeReferenceID(REFERENCE_ROLES["table"], tableNode.GetID())
        finally:
            self.scene.EndState(self.scene.BatchProcessState)

    # ---- output nodes -------------------------------------------------------------------------
    def findOutput(self, inputNode, role: str):
        """The output node of ``role`` made for ``inputNode`` (None if there is none yet)."""
        if inputNode is None:
            return None
        scene = self.scene
        for n in range(scene.GetNumberOfNodes()):
            node = scene.GetNthNode(n)
            if node.GetAttribute(ROLE_ATTRIBUTE) == role and node.GetAttribute(INPUT_ATTRIBUTE) == inputNode.GetID():
                return node
        return None

    def outputNode(self, inputNode, role: str, className: str):
        """Reuse the output of ``role`` for this input, else create it under the input in the hierarchy."""
        node = self.findOutput(inputNode, role)
        if node is None:
            node = self.scene.AddNewNodeByClass(className, f"{inputNode.GetName()} {OUTPUT_NAMES[role]}")
            node.SetAttribute(ROLE_ATTRIBUTE, role)
            node.SetAttribute(INPUT_ATTRIBUTE, inputNode.GetID())
            if inputNode.GetParentTransformNode() is not None and node.IsA("vtkMRMLTransformableNode"):
                node.SetAndObserveTransformNodeID(inputNode.GetParentTransformNode().GetID())
        self._placeUnder(node, inputNode)
        return node

    def _placeUnder(self, node, parentNode) -> None:
        sh = self.scene.GetSubjectHierarchyNode()
        if sh is None:
            return
        parent = sh.GetItemByDataNode(parentNode)
        if not parent:
            parent = sh.CreateItem(sh.GetSceneItemID(), parentNode)
        item = sh.GetItemByDataNode(node)
        if not item:
            sh.CreateItem(parent, node)
        elif sh.GetItemParent(item) != parent:
            sh.SetItemParent(item, parent)

    def _ensureDisplay(self, volumeNode):
        display = volumeNode.GetDisplayNode()
        if display is None:
            display = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeDisplayNode")
            volumeNode.SetAndObserveDisplayNodeID(display.GetID())
        return display

    def _copyWindowLevel(self, source, target) -> None:
        src = source.GetDisplayNode() if source is not None else None
        dst = target.GetDisplayNode()
        if src is not None and dst is not None and hasattr(src, "GetWindow"):
            dst.SetAutoWindowLevel(False)
            dst.SetWindowLevel(src.GetWindow(), src.GetLevel())
            if src.GetColorNodeID():
                dst.SetAndObserveColorNodeID(src.GetColorNodeID())

    def heatColorNode(self):
        """A colour table for the heat map: transparent at zero, then matplotlib's inferno."""
        scene = self.scene
        node = scene.GetFirstNodeByName(HEAT_COLOR_NODE_NAME)
        if node is not None and node.IsA("vtkMRMLColorTableNode"):
            return node
        node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", HEAT_COLOR_NODE_NAME)
        node.SetTypeToUser()
        node.SetNumberOfColors(256)
        try:
            from matplotlib import colormaps

            rgba = colormaps["inferno"](np.linspace(0, 1, 256))
        except Exception:  # noqa: BLE001 - matplotlib missing: a simple black-red-yellow ramp
            t = np.linspace(0, 1, 256)
            rgba = np.stack([np.clip(2 * t, 0, 1), np.clip(2 * t - 1, 0, 1), np.zeros_like(t), np.ones_like(t)], 1)
        for n, (r, g, b, _) in enumerate(rgba):
            node.SetColor(n, f"heat {n}", float(r), float(g), float(b), 0.0 if n == 0 else 1.0)
        node.SetAttribute("Category", MODULE_NAME)
        return node

    def showHeatMap(self, inputNode, heatNode, heat) -> None:
        """Colour table, window 0..max, near-zero transparent; semi-transparent foreground in all views."""
        display = self._ensureDisplay(heatNode)
        display.SetAndObserveColorNodeID(self.heatColorNode().GetID())
        vmax = float(np.max(heat.voxels)) or 1.0
        display.SetAutoWindowLevel(False)
        display.SetWindowLevelMinMax(0.0, vmax)
        display.SetApplyThreshold(True)
        display.SetLowerThreshold(0.05 * vmax)
        display.SetUpperThreshold(vmax * 2 + 1)
        for n in range(self.scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
            composite = self.scene.GetNthNodeByClass(n, "vtkMRMLSliceCompositeNode")
            composite.SetBackgroundVolumeID(inputNode.GetID())
            composite.SetForegroundVolumeID(heatNode.GetID())
            composite.SetForegroundOpacity(0.5)

    def updateSegmentation(self, segNode, inputNode, labels: np.ndarray, vol) -> None:
        """One named, coloured segment per lesion; reference geometry = the input volume."""
        export = _engine()[1]
        segNode.SetReferenceImageGeometryParameterFromVolumeNode(inputNode)
        segmentation = segNode.GetSegmentation()
        segmentation.RemoveAllSegments()
        if segNode.GetDisplayNode() is None:
            segNode.CreateDefaultDisplayNodes()
        n = int(labels.max(initial=0))
        if n == 0:
            return
        dtype = np.uint8 if n < 256 else np.uint16
        # only the lesions' bounding box goes to the segmentation (its extent keeps it in place on the
        # input grid): importing the whole volume dominated a threshold-slider update
        box = _engine()[3].bounding_box(labels > 0)
        image = slicer.vtkOrientedImageData()
        _imageDataFromArray(labels[box].astype(dtype), image, start_kji=tuple(s.start for s in box))
        image.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(vol.ijk_to_ras))
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(image, segNode, "Lesion"):
            raise RuntimeError("the lesion label map could not be imported into the segmentation.")
        colors = export.lesion_colors(n)
        term = export.LESION_TERMINOLOGY
        terminology = "~".join([term["contextName"], "^".join(term["category"]), "^".join(term["type"]), "^^",
                                term["anatomicContextName"], "^^", "^^"])
        for index in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(index)
            value = int(segment.GetLabelValue())
            segment.SetName(f"Lesion {value}")
            segment.SetColor(*colors[value - 1])
            segment.SetNameAutoGenerated(False)
            segment.SetColorAutoGenerated(False)
            segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), terminology)
        if segmentation.GetNumberOfSegments() != n:
            raise RuntimeError(f"{n} lesions but {segmentation.GetNumberOfSegments()} segments were created.")

    def updateTable(self, tableNode, rows: list[dict]) -> None:
        """The lesion table: the columns of lesions.csv, one row per lesion."""
        postprocessing = _engine()[3]
        table = tableNode.GetTable()
        wasModifying = tableNode.StartModify()
        table.Initialize()
        for name in postprocessing.LESION_TABLE_COLUMNS:
            column = vtk.vtkIntArray() if name in ("id", "voxels") else vtk.vtkDoubleArray()
            column.SetName(name)
            column.SetNumberOfTuples(len(rows))
            for r, row in enumerate(rows):
                column.SetValue(r, row[name])
            table.AddColumn(column)
        tableNode.SetUseColumnTitleAsColumnHeader(True)
        units = {"volume_ml": "ml", "centroid_r": "mm", "centroid_a": "mm", "centroid_s": "mm"}
        for name, unit in units.items():
            tableNode.SetColumnUnitLabel(name, unit)
        tableNode.SetLocked(True)
        table.Modified()
        tableNode.Modified()
        tableNode.EndModify(wasModifying)

    @staticmethod
    def tableRows(tableNode) -> list[dict]:
        table = tableNode.GetTable()
        names = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
        return [{name: table.GetValue(r, c).ToDouble() for c, name in enumerate(names)}
                for r in range(table.GetNumberOfRows())]

    def lesionCenterRAS(self, tableNode, row: int) -> tuple[float, float, float]:
        """World RAS of a lesion's centroid (table row), for centring the views on it."""
        table = tableNode.GetTable()
        if not 0 <= row < table.GetNumberOfRows():
            raise IndexError(f"the lesion table has no row {row}.")
        col = {table.GetColumnName(c): c for c in range(table.GetNumberOfColumns())}
        point = [table.GetValue(row, col[f"centroid_{a}"]).ToDouble() for a in "ras"]
        inputNode = self.scene.GetNodeByID(tableNode.GetAttribute(INPUT_ATTRIBUTE) or "")
        transform = inputNode.GetParentTransformNode() if inputNode is not None else None
        if transform is not None:
            toWorld = vtk.vtkGeneralTransform()
            transform.GetTransformToWorld(toWorld)
            point = list(toWorld.TransformPoint(point))
        return tuple(float(v) for v in point)

    # ---- exports ------------------------------------------------------------------------------
    def _outputsOrFail(self, parameterNode, role: str):
        node = parameterNode.GetNodeReference(REFERENCE_ROLES[role])
        if node is None:
            raise ValueError("there are no results to export yet; press Apply first.")
        return node

    def exportSegmentation(self, parameterNode, path: str) -> Path:
        """The lesion segmentation as .seg.nrrd (Slicer's own writer) or NIfTI label map (.nii/.nii.gz)."""
        path = Path(path)
        segNode = self._outputsOrFail(parameterNode, "segmentation")
        if path.name.lower().endswith((".nii", ".nii.gz")):
            export = _engine()[1]
            case = self.case or self.updateLesions(parameterNode)
            return export.write_labelmap(case.labels, case.volume, path)
        if not path.name.lower().endswith(".seg.nrrd"):
            raise ValueError(f"{path.name}: choose a .seg.nrrd, .nii or .nii.gz file name.")
        storage = slicer.vtkMRMLSegmentationStorageNode()
        storage.SetFileName(str(path))
        if not storage.WriteData(segNode):
            raise OSError(f"cannot write {path}; choose a writable folder.")
        return path

    def exportTableCsv(self, parameterNode, path: str) -> Path:
        """The lesion table as CSV, exactly as the command line writes lesions.csv."""
        export = _engine()[1]
        self._outputsOrFail(parameterNode, "table")
        case = self.case or self.updateLesions(parameterNode)
        return export.write_table_csv(case.table, path)

    def reportParameters(self, parameterNode) -> dict:
        case = self.case
        th = case.thresholding
        params = dict(case.parameters)
        params.update({"threshold_method": th.method, "threshold_value": th.value, "min_size_ml": th.min_size_ml,
                       "roi": self.parameters(parameterNode)["ROIMode"], "device": self.parameters(parameterNode)["Device"],
                       "checkpoint": case.checkpoint, "network_evaluations": case.networkEvaluations})
        return params

    def exportReport(self, parameterNode, path: str) -> Path:
        """An HTML report (parameters, model card, lesion table, key slices, not-for-clinical-use)."""
        from DiffusionAnomalyLib import report

        self._outputsOrFail(parameterNode, "table")
        case = self.case or self.updateLesions(parameterNode)
        inputNode = self.scene.GetNodeByID(case.inputNodeID)
        return report.write_report(path, image=case.volume, heatmap=case.heatmap, labels=case.labels,
                                   table=case.table, card=case.card, parameters=self.reportParameters(parameterNode),
                                   counterfactual=case.counterfactual,
                                   title=f"DiffusionAnomaly: {inputNode.GetName() if inputNode else 'case'}")

    def exportDicomSeg(self, parameterNode, outputFolder: str) -> None:
        """DICOM SEG through Slicer's exporter (needs a DICOM-loaded input and the DICOM SEG plugin)."""
        segNode = self._outputsOrFail(parameterNode, "segmentation")
        try:
            import DICOMSegmentationPlugin  # Slicer's DICOM SEG exporter (QuantitativeReporting / Slicer core)
        except ImportError:
            raise RuntimeError("DICOM SEG export needs Slicer's DICOM segmentation plugin (install the "
                               "QuantitativeReporting extension); export .seg.nrrd or NIfTI instead.") from None
        sh = self.scene.GetSubjectHierarchyNode()
        item = sh.GetItemByDataNode(segNode)
        inputNode = self.inputNode(parameterNode)
        if not inputNode.GetAttribute("DICOM.instanceUIDs"):
            raise RuntimeError("DICOM SEG export needs an input volume loaded from DICOM.")
        exporter = DICOMSegmentationPlugin.DICOMSegmentationPluginClass()
        exportables = exporter.examineForExport(item)
        if not exportables:
            raise RuntimeError("Slicer's DICOM SEG exporter cannot export this segmentation.")
        for exportable in exportables:
            exportable.directory = str(outputFolder)
        error = exporter.export(exportables)
        if error:
            raise RuntimeError(f"DICOM SEG export failed: {error}")

    def cleanup(self) -> None:
        """Stop the worker (module unloaded / Slicer closing)."""
        if self.job is not None and not self.job.finished:
            self.cancel()
        self.stopWorker()
