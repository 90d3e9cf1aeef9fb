"""MRML volume and segmentation nodes <-> the engine's :class:`~DiffusionAnomalyLib.volume.Volume`: the one conversion at the edge.

Voxels travel as [k, j, i] arrays with the node's exact IJK->RAS matrix; modality and units come
from the node's DICOM attributes and voxel-value units. A PET series that Slicer's DICOM reader
loaded in Bq/ml is converted to body-weight SUV with the engine's own factor. Segments become a
label Volume (:func:`labelmapFromSegments`) and a label Volume becomes an oriented image for
importing segments (:func:`orientedImageFromLabels`).
"""

from __future__ import annotations

import numpy as np
import pydicom
import slicer
import vtk
from vtk.util import numpy_support

from DiffusionAnomalyLib.postprocessing import bounding_box
from DiffusionAnomalyLib.volume import (Volume, agree, canonical_modality, canonical_units, suv_factor_of_series,
                                        suv_provenance_of_series)

#: node attribute a script may set to state a volume's units (e.g. "SUVbw") when Slicer does not know them
UNITS_ATTRIBUTE = "DiffusionAnomaly.Units"


def voxelUnits(node) -> str | None:
    """The voxel unit of a volume node (Slicer sets a coded entry for PET SUV loaded from DICOM)."""
    entry = node.GetVoxelValueUnits()
    if entry is not None:
        text = f"{entry.GetCodeValue() or ''} {entry.GetCodeMeaning() or ''}"
        if "SUV" in text.upper():
            return "SUVbw"
        return entry.GetCodeMeaning() or entry.GetCodeValue() or None
    return node.GetAttribute(UNITS_ATTRIBUTE) or None


def dicomSuv(node) -> tuple[float, dict] | None:
    """Body-weight SUV factor of a PET volume loaded from Slicer's DICOM database and its provenance record (the
    tags it came from), None if the volume is not from DICOM.

    Slicer's DICOM reader gives PET in Bq/ml; the engine's models expect SUVbw. The factor is the
    engine's (``volume.suv_factor_of_series``: one factor for the whole volume) on the series' own headers, the
    record ``volume.suv_provenance_of_series``'s, which the report shows.
    """
    uids = (node.GetAttribute("DICOM.instanceUIDs") or "").split()
    database = getattr(slicer, "dicomDatabase", None)  # a Slicer application object: absent under slicer-core
    if not uids or database is None:
        return None
    files = [database.fileForInstance(uid) for uid in uids]
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files if f]
    if not headers:
        return None
    return suv_factor_of_series(headers), suv_provenance_of_series(headers)


def _declared(what: str, declared: str | None, own: str | None, canonical) -> str | None:
    """The engine's rule (:func:`~DiffusionAnomalyLib.volume.agree`) for the panel's choice ('auto' = none)."""
    declared = None if declared in (None, "", "auto") else canonical(declared)
    return agree(what, declared, canonical(own), "the input volume", remedy=f"choose 'auto' as {what} or the "
                 "matching scan")


def nodeModality(node, modality: str | None = None) -> str | None:
    """The modality of a volume node without reading its voxels: the user's declaration ``modality`` ('auto' =
    none) or the node's "DICOM.Modality" attribute, refused when they contradict each other; None when neither says."""
    return _declared("modality", modality, node.GetAttribute("DICOM.Modality") or None, canonical_modality)


def volumeFromNode(node, modality: str | None = None, units: str | None = None) -> Volume:
    """The engine's Volume for a scalar volume node: voxels [k, j, i] (a copy) + IJK->RAS.

    ``modality`` ("PT"/"CT") and ``units`` (e.g. "SUVbw") are the user's declarations: they fill in
    what the node does not say (its "DICOM.Modality" attribute, its voxel-value units) and are
    refused when they contradict it, as the engine's file reader does.
    """
    if node is None or node.GetImageData() is None:
        raise ValueError("choose an input volume that holds image data.")
    if node.GetClassName() != "vtkMRMLScalarVolumeNode":
        raise ValueError(f"{node.GetName()} is a {node.GetClassName()}; choose a scalar (PET or CT) volume.")
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    voxels = np.array(slicer.util.arrayFromVolume(node), copy=True)
    modality = nodeModality(node, modality)
    ownUnits = voxelUnits(node)
    meta = {"node": node.GetName()}
    suv = dicomSuv(node) if modality == "PT" and ownUnits is None else None
    if suv is not None:  # Bq/ml from Slicer's DICOM reader: convert as the engine's reader does
        voxels = (voxels * suv[0]).astype(np.float32)
        ownUnits, meta["suv_factor"], meta["suv_provenance"] = "SUVbw", suv[0], suv[1]
    units = _declared("units", units, ownUnits, canonical_units)
    return Volume(voxels=voxels, ijk_to_ras=slicer.util.arrayFromVTKMatrix(matrix), modality=modality,
                  units=units, meta=meta)


def updateVolumeNodeFromVolume(node, volume: Volume) -> None:
    """Write the voxels and the exact geometry of ``volume`` into ``node``."""
    slicer.util.updateVolumeFromArray(node, volume.voxels)
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(volume.ijk_to_ras))


def labelmapFromSegments(segmentationNode, segmentIds: list[str], labelValues: list[int] | None = None,
                         grid: Volume | None = None) -> Volume | None:
    """The segments ``segmentIds`` merged into one label Volume (None when they hold no voxel).

    Voxel value: ``labelValues[n]`` for the n-th segment (default n + 1); where segments overlap,
    the later one wins. On ``grid`` (Slicer resamples the segments onto it), or else on the
    segmentation's own grid cropped to the segments. Slicer merges and resamples the segments
    itself; slicer.util.arrayFromSegmentBinaryLabelmap would need a volume node and one call per
    segment. The node is only read.
    """
    names = vtk.vtkStringArray()
    for segmentId in segmentIds:
        names.InsertNextValue(segmentId)
    values = vtk.vtkIntArray()
    for value in labelValues if labelValues is not None else range(1, len(segmentIds) + 1):
        values.InsertNextValue(int(value))
    reference = None
    mode = slicer.vtkSegmentation.EXTENT_UNION_OF_EFFECTIVE_SEGMENTS
    if grid is not None:
        k, j, i = grid.voxels.shape[:3]
        reference = slicer.vtkOrientedImageData()
        reference.SetExtent(0, i - 1, 0, j - 1, 0, k - 1)
        reference.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(grid.ijk_to_ras))
        mode = slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY
    merged = slicer.vtkOrientedImageData()
    if not segmentIds or not segmentationNode.GenerateMergedLabelmapForAllSegments(merged, mode, reference, names,
                                                                                   values):
        return None
    x0, x1, y0, y1, z0, z1 = merged.GetExtent()
    if x1 < x0 or y1 < y0 or z1 < z0 or merged.GetPointData().GetScalars() is None:
        return None
    voxels = numpy_support.vtk_to_numpy(merged.GetPointData().GetScalars()).reshape(z1 - z0 + 1, y1 - y0 + 1,
                                                                                  x1 - x0 + 1)
    matrix = vtk.vtkMatrix4x4()
    merged.GetImageToWorldMatrix(matrix)
    ijkToRas = slicer.util.arrayFromVTKMatrix(matrix)
    if grid is not None:  # the merged image covers (at most) the reference extent: place it on the grid
        full = np.zeros(grid.voxels.shape[:3], dtype=voxels.dtype)
        full[z0:z1 + 1, y0:y1 + 1, x0:x1 + 1] = voxels
        return grid.with_voxels(full, modality=None, units=None)
    ijkToRas[:3, 3] = ijkToRas[:3, :3] @ np.array([x0, y0, z0], dtype=np.float64) + ijkToRas[:3, 3]
    return Volume(voxels=np.array(voxels, copy=True), ijk_to_ras=ijkToRas)


def orientedImageFromLabels(labels: np.ndarray, ijkToRas: np.ndarray):
    """The labelled box of ``labels`` ([k, j, i]) as an oriented image that keeps its place on the grid.

    Hand-written: slicer.util's segment setters import the whole volume per segment (slow threshold slider).
    """
    box = bounding_box(labels > 0)
    voxels = np.ascontiguousarray(labels[box].astype(np.uint8 if labels.max() < 256 else np.uint16))
    (k0, j0, i0), (k, j, i) = (s.start for s in box), voxels.shape
    image = slicer.vtkOrientedImageData()
    image.SetExtent(i0, i0 + i - 1, j0, j0 + j - 1, k0, k0 + k - 1)
    scalars = numpy_support.numpy_to_vtk(voxels.ravel(), deep=True,
                                         array_type=numpy_support.get_vtk_array_type(voxels.dtype))
    image.GetPointData().SetScalars(scalars)
    image.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(ijkToRas))
    return image
