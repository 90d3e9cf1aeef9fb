"""Organs: TotalSegmentator segmentation nodes, the organ ROI on the input's grid, and TotalSegmentator on a CT node.

- :func:`organLabels`: a segmentation node whose segments carry TotalSegmentator names (the
  TotalSegmentator extension's output, or one made here) as the engine's
  :class:`~DiffusionAnomalyLib.roi.OrganLabels`, on the segmentation's own grid. The extension
  (task "total") gives every segment the TotalSegmentator v2 name as its ID and, with "Use
  standard segment names" (its default), a terminology name to show ("Upper lobe of lung Left");
  a segmentation made or edited elsewhere may carry the name only (Slicer then makes the IDs). So
  the name and then the ID are matched, by the engine's rule for .seg.nrrd files.
- :func:`cropOrgans`: the organs a CT organ model analyses (it works on crops around them), so it
  runs only with an organ segmentation, by default including those of its organs the scan shows.
- :class:`OrganROIs`: the organ ROI of an :class:`~DiffusionAnomalyLib.roi.OrganSelection` on the
  input's grid, built by the engine (labels carried by physical coordinates, margin in mm), and
  the region the network must compute (the included organs); both are kept while segmentation,
  grid and choice stay the same, so a threshold change does not rebuild them.
- :class:`OrganRun`: TotalSegmentator on a CT volume node. With the TotalSegmentator extension
  installed, its logic runs (in the UI thread, as the extension's own module runs it; it cannot be
  cancelled); otherwise the engine's runner (:func:`~DiffusionAnomalyLib.totalsegmentator.run_totalsegmentator`,
  the ``diffusion-anomaly totalsegmentator`` verb) runs TotalSegmentator's process tree in its own
  environment from a thread, with progress and cancel of the whole tree. The new segmentation node
  is placed under the analysis input in the subject hierarchy; nothing in the scene changes before
  it succeeded.

No Qt; no torch (the runner's TotalSegmentator is a process of its own environment).
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import slicer

from DiffusionAnomalyLib.errors import user_sentence
from DiffusionAnomalyLib.progress import Cancelled
from DiffusionAnomalyLib.roi import (ORGAN_GROUPS, OrganLabels, OrganSelection, class_map, label_dtype,
                                     read_organ_labels, segment_organ_name)
from DiffusionAnomalyLib.totalsegmentator import (TotalSegmentatorError, check_ct, environment_program,
                                                  run_totalsegmentator)
from DiffusionAnomalyLib.volume import Volume, VolumeError, validate_volume, write_volume

from DiffusionAnomalyModuleLib.nodes import labelmapFromSegments, orientedImageFromLabels, volumeFromNode
from DiffusionAnomalyModuleLib.outputs import placeUnder

#: node attribute of a segmentation made here: the ID of the CT it was segmented from
SOURCE_CT_ATTRIBUTE = "DiffusionAnomaly.OrganSourceCT"
#: the name of a segmentation made here, after the CT's name
ORGANS_NAME = "{} organs"


# ---- a segmentation node as organ labels ---------------------------------------------------------
def segmentOrgans(segmentationNode) -> tuple[dict[str, str], list[str]]:
    """Segment ID -> TotalSegmentator name of the segments named after a structure, and the other segments' names."""
    names = tuple(class_map().values())
    segmentation = segmentationNode.GetSegmentation()
    matched, ignored = {}, []
    for n in range(segmentation.GetNumberOfSegments()):
        segmentId, segment = segmentation.GetNthSegmentID(n), segmentation.GetNthSegment(n)
        name = segment_organ_name(segment.GetName(), segmentId, names)
        if name is None:
            ignored.append(segment.GetName() or segmentId)
        else:
            matched[segmentId] = name
    return matched, ignored


def organChoices(segmentationNode) -> list[str]:
    """What the include/exclude lists offer: the named groups, then the segmentation's structures in id order."""
    if segmentationNode is None:
        return list(ORGAN_GROUPS)
    ids = {name: i for i, name in class_map().items()}
    present = sorted(set(segmentOrgans(segmentationNode)[0].values()), key=ids.get)
    return [*ORGAN_GROUPS, *present]


def organLabels(segmentationNode) -> OrganLabels:
    """The organ labels of a segmentation node, on its own grid (cropped to the segments); the node is only read.

    Segments that overlap: the higher TotalSegmentator id wins, as in the engine's .seg.nrrd reader.
    """
    source = f"'{segmentationNode.GetName()}'"
    names = class_map()
    matched, ignored = segmentOrgans(segmentationNode)
    if not matched:
        shown = ", ".join(ignored[:6]) + (" ..." if len(ignored) > 6 else "")
        raise VolumeError(
            f"none of the segments of the segmentation {source} ({shown or 'no segments'}) is named after a "
            "TotalSegmentator structure; choose the segmentation the TotalSegmentator extension made, run "
            "TotalSegmentator in the Organs section, or name the segments as TotalSegmentator does (spleen, "
            "kidney_left, ...).")
    segmentation = segmentationNode.GetSegmentation()
    binary = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    if not segmentation.ContainsRepresentation(binary):
        raise VolumeError(f"the segmentation {source} has no voxel (binary labelmap) representation; create it "
                          "in the Segmentations module (Representations), then choose the segmentation again.")
    ids = {name: i for i, name in names.items()}
    order = sorted(matched, key=lambda segmentId: ids[matched[segmentId]])
    merged = labelmapFromSegments(segmentationNode, order, [ids[matched[s]] for s in order])
    if merged is None or not merged.voxels.any():
        raise VolumeError(f"the segments of the segmentation {source} are empty (no voxel is labelled); choose "
                          "the segmentation TotalSegmentator made of this patient's CT.")
    dtype = label_dtype(names)
    return OrganLabels(merged.with_voxels(merged.voxels.astype(dtype)), dict(names), source, tuple(ignored))


def segmentationKey(segmentationNode) -> tuple:
    """Changes whenever the node, its segments or their voxels change (what :class:`OrganROIs` keeps labels for)."""
    segmentation = segmentationNode.GetSegmentation()
    binary = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    stamps = []
    for n in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(n)
        representation = segment.GetRepresentation(binary)
        stamps.append((segmentation.GetNthSegmentID(n), segment.GetName(), segment.GetMTime(),
                       representation.GetMTime() if representation is not None else 0))
    return segmentationNode.GetID(), segmentationNode.GetMTime(), segmentation.GetMTime(), tuple(stamps)


# ---- the organ ROI on the input's grid -----------------------------------------------------------
def cropOrgans(card: dict) -> tuple[str, ...]:
    """The organs a model working on organ crops analyses (its card's ``preprocessing.crop.organs``); () for a model
    of the whole volume. Such a model runs only with an organ segmentation (:func:`segmentationNeeded`)."""
    crop = (card.get("preprocessing", {}) or {}).get("crop")
    return tuple(crop["organs"]) if crop else ()


def segmentationNeeded(card: dict) -> str:
    """Why a crop model cannot run without an organ segmentation, in the panel's words (one sentence)."""
    return (f"this model analyses crops around the organs {', '.join(cropOrgans(card))}: choose the organ "
            "segmentation of this CT in the Organs section (or let TotalSegmentator segment the CT there).")



@dataclass
class OrganROI:
    """An organ choice on the input's grid: where lesions are kept (None: everywhere) and what the network computes."""

    selection: OrganSelection
    mask: np.ndarray | None    # bool [k, j, i]: the ROI (included organs, or everything, minus excluded organs)
    region: np.ndarray | None  # bool [k, j, i]: the included organs with their margin (None: the whole volume)
    organs: tuple[str, ...]    # the structures the segmentation holds on the input's grid
    labels: OrganLabels | None = None  # the organ map on the input's grid (each candidate's organ, the liver reference)


class OrganROIs:
    """Organ labels on the input's grid and the last ROI built from them, kept until segmentation, grid or choice change."""

    def __init__(self):
        self._labelsKey: tuple | None = None
        self._labels: OrganLabels | None = None
        self._roiKey: tuple | None = None
        self._roi: OrganROI | None = None

    def labelsOnGrid(self, segmentationNode, grid: Volume) -> OrganLabels:
        """The segmentation's organ labels carried onto ``grid`` by physical coordinates (the engine's on_grid)."""
        key = (segmentationKey(segmentationNode), grid.voxels.shape[:3],
               np.asarray(grid.ijk_to_ras, dtype=np.float64).tobytes())
        if key != self._labelsKey:
            self._labels, self._labelsKey = None, None
            self._labels, self._labelsKey = organLabels(segmentationNode).on_grid(grid), key
        return self._labels

    def roi(self, segmentationNode, selection: OrganSelection, grid: Volume) -> OrganROI | None:
        """The ROI of ``selection`` on ``grid`` (None without a segmentation); refusals are one sentence."""
        if segmentationNode is None:
            if selection.include:
                raise ValueError(f"organs to include are chosen ({', '.join(selection.include)}) but no organ "
                                 "segmentation; choose one in the Organs section (or let TotalSegmentator segment "
                                 "the CT there), or clear the included organs.")
            return None
        labels = self.labelsOnGrid(segmentationNode, grid)
        key = (self._labelsKey, selection)
        if key == self._roiKey:
            return self._roi
        mask = None if selection.is_whole_volume else selection.mask(labels, grid).voxels != 0
        region = selection.region_mask(labels, grid)
        region = None if region is None else region.voxels != 0
        self._roi, self._roiKey = OrganROI(selection, mask, region, labels.present, labels), key
        return self._roi


# ---- TotalSegmentator on a CT node ---------------------------------------------------------------
def extensionAvailable() -> bool:
    """Whether the TotalSegmentator extension is installed (its module is loaded in this Slicer)."""
    return hasattr(getattr(slicer, "modules", None), "totalsegmentator")


def importOrganLabels(scene, labels: OrganLabels, name: str, referenceNode):
    """A new segmentation node holding ``labels``: one segment per structure, named after it, on ``referenceNode``'s geometry."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", scene.GenerateUniqueName(name))
    try:
        node.SetReferenceImageGeometryParameterFromVolumeNode(referenceNode)
        node.CreateDefaultDisplayNodes()
        image = orientedImageFromLabels(labels.volume.voxels, labels.volume.ijk_to_ras)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(image, node, "organ"):
            raise RuntimeError("the organ label map could not be imported into a segmentation.")
        segmentation = node.GetSegmentation()
        for n in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(n)
            segment.SetName(labels.names[int(segment.GetLabelValue())])
            segment.SetNameAutoGenerated(False)
    except Exception:
        scene.RemoveNode(node)
        raise
    return node


class OrganRun:
    """TotalSegmentator on ``ctNode``; poll it until ``finished``; ``node`` is the new segmentation when ``status`` is done.

    ``fast``: its 3 mm model; ``device``: auto, cpu or cuda. ``progressCallback(run)`` is called on
    the UI thread (from :meth:`poll`, and per output line while the extension's logic runs).
    """

    def __init__(self, scene, ctNode, parentNode, fast: bool = False, device: str = "auto",
                 progressCallback: Callable[["OrganRun"], None] | None = None):
        self.scene, self.ctNode, self.parentNode = scene, ctNode, parentNode
        self.fast, self.device = fast, device
        self.progressCallback = progressCallback
        self.status = "running"      # running | done | failed | cancelled
        self.fraction, self.message = 0.0, "starting TotalSegmentator"
        self.error: str | None = None
        self.node = None
        self.accepted = False        # the logic made ``node`` the organ segmentation
        self.cancellable = False
        self.usesExtension = False
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self._labels: OrganLabels | None = None
        self._failure: BaseException | None = None
        self._tempDir: str | None = None

    @property
    def finished(self) -> bool:
        return self.status != "running"

    def _ctVolume(self) -> Volume:
        volume = check_ct(volumeFromNode(self.ctNode), self.ctNode.GetName())
        return validate_volume(volume)  # here, so a sentence never names the temporary copy

    def start(self) -> "OrganRun":
        """Check the CT, then run: the extension's logic (returns when done) or the engine's runner (returns at once)."""
        volume = self._ctVolume()
        if extensionAvailable():
            self.usesExtension = True
            self._runExtension()
            return self
        environment_program()  # TotalSegmentator not set up: the engine's sentence, before anything is written
        self._tempDir = tempfile.mkdtemp(prefix="DiffusionAnomaly-organs-")
        try:
            ct = write_volume(volume, Path(self._tempDir) / "ct.nii", compress=False)
        except Exception:
            self._cleanup()
            raise
        self.cancellable = True
        self._thread = threading.Thread(target=self._runEngine, args=(ct,), name="DiffusionAnomalyOrgans",
                                        daemon=True)
        self._thread.start()
        return self

    # -- the engine's runner (a thread; touches no MRML object) --
    def _progress(self, fraction: float, message: str) -> None:
        self.fraction, self.message = fraction, message

    def _runEngine(self, ct: Path) -> None:
        try:
            out = run_totalsegmentator(ct, Path(self._tempDir) / "organs.nii.gz", fast=self.fast, device=self.device,
                                       progress=self._progress, cancel=self._cancel.is_set)
            self.message = "reading the organ segmentation"
            self._labels = read_organ_labels(out)
        except BaseException as exc:  # noqa: BLE001 - handed to the UI thread as the run's sentence
            self._failure = exc

    def poll(self) -> "OrganRun":
        """When the runner's thread has ended: the segmentation node (UI thread), or the failure's sentence."""
        if not self.finished and self._thread is not None and not self._thread.is_alive():
            try:
                if isinstance(self._failure, Cancelled):
                    self.status, self.message = "cancelled", "cancelled"
                elif self._failure is not None:
                    self._fail(self._failure)
                else:
                    self._accept(importOrganLabels(self.scene, self._labels, ORGANS_NAME.format(self.ctNode.GetName()),
                                                   self.ctNode))
            except Exception as exc:  # noqa: BLE001 - shown as a sentence
                self._fail(exc)
            finally:
                self._cleanup()
        if self.progressCallback is not None:
            self.progressCallback(self)
        return self

    def cancel(self, timeout: float = 30.0) -> None:
        """End TotalSegmentator's whole process tree and wait for it; the scene stays as it was."""
        if self.finished or not self.cancellable:
            return
        self._cancel.set()
        self._thread.join(timeout)
        self.status, self.message = "cancelled", "cancelled"
        self._cleanup()

    def _fail(self, exc: BaseException) -> None:
        self.status, self.error = "failed", user_sentence(exc)
        self.message = f"failed: {self.error}"

    def _accept(self, node) -> None:
        node.SetAttribute(SOURCE_CT_ATTRIBUTE, self.ctNode.GetID())
        placeUnder(self.scene, node, self.parentNode)
        self.node, self.status, self.fraction, self.message = node, "done", 1.0, "done"

    def _cleanup(self) -> None:
        if self._tempDir:
            shutil.rmtree(self._tempDir, ignore_errors=True)
            self._tempDir = None

    # -- the TotalSegmentator extension's logic (UI thread) --
    def _extensionLine(self, text: str) -> None:
        text = str(text).strip()
        if text:
            self.message = f"TotalSegmentator extension: {text[:120]}"
            if self.progressCallback is not None:
                self.progressCallback(self)

    def _runExtension(self) -> None:
        import TotalSegmentator  # the extension's module: on the path where slicer.modules.totalsegmentator exists

        logic = TotalSegmentator.TotalSegmentatorLogic()
        logic.logCallback = self._extensionLine
        node = None
        try:
            logic.setupPythonRequirements()  # its own installer (nothing to do once the extension was used)
            node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                self.scene.GenerateUniqueName(ORGANS_NAME.format(self.ctNode.GetName())))
            # a bool: older releases take fast=True/False, newer map True/False to their "fast"/"normal" quality
            logic.process(self.ctNode, node, bool(self.fast), self.device == "cpu", "total")
            organLabels(node)  # its segments carry TotalSegmentator names (else the sentence, and no node)
        except Exception as exc:  # noqa: BLE001 - the extension raises assorted types
            if node is not None:
                self.scene.RemoveNode(node)
            if isinstance(exc, VolumeError):
                self._fail(exc)
            else:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
                self._fail(TotalSegmentatorError(
                    f"the TotalSegmentator extension failed ({first}); see its messages in the Python console, "
                    "check the CT, or choose an existing organ segmentation in the Organs section."))
            return
        self._accept(node)
