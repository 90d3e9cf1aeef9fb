"""Lesions from the cached heat map: the ROI (segments and organs), and re-thresholding (no network).

A threshold, minimum-size or ROI change runs here only: the engine's
:meth:`~DiffusionAnomalyLib.pipeline.CaseResult.threshold` on the heat map the last run left.
The ROI is the chosen segments of a segmentation (ROI mode "segmentation") and the organ ROI of
the Organs section (:mod:`.organs`), each where chosen; lesions are kept and the heat map shown
inside it. Reading the ROI touches MRML (UI thread); the thresholding itself touches no MRML
object, so it may run in a background thread (see :func:`rethreshold`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from DiffusionAnomalyLib.pipeline import CaseResult
from DiffusionAnomalyLib.postprocessing import Thresholding
from DiffusionAnomalyLib.volume import Volume

from DiffusionAnomalyModuleLib import parameters as settings
from DiffusionAnomalyModuleLib.nodes import labelmapFromSegments
from DiffusionAnomalyModuleLib.organs import OrganROI, OrganROIs, cropOrgans, segmentationNeeded

#: ROI modes of the parameter node: the whole volume, or the segments of a segmentation
ROI_MODES = ("whole", "segmentation")

#: why a cached heat map cannot serve an ROI: the last run computed only the organs it was run for
NOT_COVERED = ("the heat map of the last run covers only the organs included then; press Apply to analyse the new "
               "organ choice.")


def roiMask(segmentationNode, segmentIds: list[str], volume: Volume) -> np.ndarray:
    """The union of the segments ``segmentIds`` (all when empty) as a boolean [k, j, i] mask on ``volume``'s grid."""
    segmentation = segmentationNode.GetSegmentation()
    ids = list(segmentIds) or [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]
    missing = [s for s in ids if segmentation.GetSegment(s) is None]
    if missing:
        raise ValueError(f"the ROI segmentation {segmentationNode.GetName()} has no segment {missing[0]!r}.")
    merged = labelmapFromSegments(segmentationNode, ids, grid=volume)
    mask = merged.voxels != 0 if merged is not None else np.zeros(volume.voxels.shape[:3], dtype=bool)
    if not mask.any():
        raise ValueError(f"the chosen ROI segments of {segmentationNode.GetName()} are empty inside the input volume.")
    return mask


def roiFromParameters(parameterNode, params: dict[str, str], volume: Volume) -> np.ndarray | None:
    """The ROI the parameter node chooses as a mask on ``volume``'s grid; None for the whole volume."""
    if params["ROIMode"] not in ROI_MODES:
        raise ValueError(f"unknown ROI mode {params['ROIMode']!r}; choose one of {', '.join(ROI_MODES)}.")
    if params["ROIMode"] == "whole":
        return None
    segmentationNode = parameterNode.GetNodeReference(settings.ROI_REFERENCE)
    if segmentationNode is None:
        raise ValueError("the ROI is set to a segmentation, but no segmentation is chosen.")
    return roiMask(segmentationNode, [s for s in params["ROISegments"].split(",") if s], volume)


def rethreshold(case: CaseResult, thresholding: Thresholding, roi: np.ndarray | None) -> Callable[[], CaseResult]:
    """The lesion computation of ``case`` as a callable that touches no MRML object (safe in a thread)."""
    return lambda: case.threshold(thresholding, roi)


@dataclass
class CaseROI:
    """The ROI a case's lesions are kept in (None: everywhere) and the region its network run needs (None: all)."""

    mask: np.ndarray | None
    region: np.ndarray | None
    organs: OrganROI | None = None

    def coveredBy(self, computed: np.ndarray | None) -> bool:
        """Whether a heat map computed for the region ``computed`` (None: everywhere) serves this ROI."""
        if computed is None:
            return True
        return self.mask is not None and not np.any(self.mask & ~computed)


def caseROI(parameterNode, params: dict[str, str], card: dict, volume: Volume, organROIs: OrganROIs) -> CaseROI:
    """The ROI the parameter node chooses on ``volume``'s grid: segments and organs, each where chosen.

    Every refusal (a segmentation that misses the input, an unknown organ, an empty ROI, a crop model without
    an organ segmentation, ...) is one sentence.
    """
    organNode = parameterNode.GetNodeReference(settings.ORGAN_REFERENCE)
    if organNode is None and cropOrgans(card):  # a crop model: its organs are what it analyses
        raise ValueError(segmentationNeeded(card))
    segments = roiFromParameters(parameterNode, params, volume)
    organs = organROIs.roi(organNode, settings.organSelection(params, card), volume)
    masks = [m for m in (segments, organs.mask if organs is not None else None) if m is not None]
    mask = masks[0] if len(masks) == 1 else np.logical_and(*masks) if masks else None
    if mask is not None and len(masks) > 1 and not mask.any():
        raise ValueError("the chosen ROI segments and the organ ROI do not overlap; choose segments inside the "
                         "organ ROI, or set the ROI to the whole volume.")
    return CaseROI(mask, organs.region if organs is not None else None, organs)
