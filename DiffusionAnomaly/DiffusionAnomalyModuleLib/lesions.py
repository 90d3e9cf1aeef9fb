"""Lesions from the cached heat map: the ROI mask from a segmentation, and re-thresholding (no network).

A threshold, minimum-size or ROI change runs here only: the engine's
:meth:`~DiffusionAnomalyLib.pipeline.CaseResult.threshold` on the heat map the last run left.
Reading the ROI touches MRML (UI thread); the thresholding itself touches no MRML object, so it
may run in a background thread (see :func:`rethreshold`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from DiffusionAnomalyLib.pipeline import CaseResult
from DiffusionAnomalyLib.postprocessing import Thresholding
from DiffusionAnomalyLib.volume import Volume

from DiffusionAnomalyModuleLib.parameters import ROI_REFERENCE

#: ROI modes of the parameter node: the whole volume, or the segments of a segmentation
ROI_MODES = ("whole", "segmentation")


def roiMask(segmentationNode, segmentIds: list[str], volume: Volume) -> np.ndarray:
    """The union of the segments ``segmentIds`` (all when empty) as a boolean [k, j, i] mask on ``volume``'s grid.

    Slicer merges and resamples the segments itself; slicer.util.arrayFromSegmentBinaryLabelmap would need a
    volume node and one call per segment.
    """
    segmentation = segmentationNode.GetSegmentation()
    ids = list(segmentIds) or [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]
    missing = [s for s in ids if segmentation.GetSegment(s) is None]
    if missing:
        raise ValueError(f"the ROI segmentation {segmentationNode.GetName()} has no segment {missing[0]!r}.")
    k, j, i = volume.voxels.shape
    reference = slicer.vtkOrientedImageData()
    reference.SetExtent(0, i - 1, 0, j - 1, 0, k - 1)
    reference.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(volume.ijk_to_ras))
    names = vtk.vtkStringArray()
    for segmentId in ids:
        names.InsertNextValue(segmentId)
    merged = slicer.vtkOrientedImageData()
    mask = np.zeros(volume.voxels.shape, dtype=bool)
    if ids and segmentationNode.GenerateMergedLabelmapForAllSegments(
            merged, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, reference, names):
        x0, x1, y0, y1, z0, z1 = merged.GetExtent()
        if x1 >= x0 and merged.GetPointData().GetScalars() is not None:
            voxels = numpy_support.vtk_to_numpy(merged.GetPointData().GetScalars())
            mask[z0:z1 + 1, y0:y1 + 1, x0:x1 + 1] = voxels.reshape(z1 - z0 + 1, y1 - y0 + 1, x1 - x0 + 1) != 0
    if not mask.any():
        raise ValueError(f"the chosen ROI segments of {segmentationNode.GetName()} are empty inside the input volume.")
    return mask


def roiFromParameters(parameterNode, params: dict[str, str], volume: Volume) -> np.ndarray | None:
    """The ROI the parameter node chooses as a mask on ``volume``'s grid; None for the whole volume."""
    if params["ROIMode"] not in ROI_MODES:
        raise ValueError(f"unknown ROI mode {params['ROIMode']!r}; choose one of {', '.join(ROI_MODES)}.")
    if params["ROIMode"] == "whole":
        return None
    segmentationNode = parameterNode.GetNodeReference(ROI_REFERENCE)
    if segmentationNode is None:
        raise ValueError("the ROI is set to a segmentation, but no segmentation is chosen.")
    return roiMask(segmentationNode, [s for s in params["ROISegments"].split(",") if s], volume)


def rethreshold(case: CaseResult, thresholding: Thresholding, roi: np.ndarray | None) -> Callable[[], CaseResult]:
    """The lesion computation of ``case`` as a callable that touches no MRML object (safe in a thread)."""
    return lambda: case.threshold(thresholding, roi)
