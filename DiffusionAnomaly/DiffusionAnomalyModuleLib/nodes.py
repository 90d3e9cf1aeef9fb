"""MRML volume nodes <-> the engine's :class:`~DiffusionAnomalyLib.volume.Volume`: the one conversion at the edge.

Voxels travel as [k, j, i] arrays with the node's exact IJK->RAS matrix; modality and units come
from the node's DICOM attributes and voxel-value units. A PET series that Slicer's DICOM reader
loaded in Bq/ml is converted to body-weight SUV with the engine's own factor.
"""

from __future__ import annotations

import numpy as np
import pydicom
import slicer
import vtk

from DiffusionAnomalyLib.volume import Volume, agree, canonical_modality, canonical_units, suv_factor_of_series

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


def dicomSuvFactor(node) -> float | None:
    """Body-weight SUV factor of a PET volume loaded from Slicer's DICOM database (None if not from DICOM).

    Slicer's DICOM reader gives PET in Bq/ml; the engine's models expect SUVbw. The factor is the
    engine's (``volume.suv_factor_of_series``) on the series' own headers.
    """
    uids = (node.GetAttribute("DICOM.instanceUIDs") or "").split()
    database = getattr(slicer, "dicomDatabase", None)  # a Slicer application object: absent under slicer-core
    if not uids or database is None:
        return None
    files = [database.fileForInstance(uid) for uid in uids]
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files if f]
    if not headers:
        return None
    return suv_factor_of_series(headers)


def _declared(what: str, declared: str | None, own: str | None, canonical) -> str | None:
    """The engine's rule (:func:`~DiffusionAnomalyLib.volume.agree`) for the panel's choice ('auto' = none)."""
    declared = None if declared in (None, "", "auto") else canonical(declared)
    return agree(what, declared, canonical(own), "the input volume", remedy=f"choose 'auto' as {what} or the "
                 "matching scan")


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
    modality = _declared("modality", modality, node.GetAttribute("DICOM.Modality") or None, canonical_modality)
    ownUnits = voxelUnits(node)
    meta = {"node": node.GetName()}
    factor = dicomSuvFactor(node) if modality == "PT" and ownUnits is None else None
    if factor is not None:  # Bq/ml from Slicer's DICOM reader: convert as the engine's reader does
        voxels = (voxels * factor).astype(np.float32)
        ownUnits, meta["suv_factor"] = "SUVbw", factor
    units = _declared("units", units, ownUnits, canonical_units)
    return Volume(voxels=voxels, ijk_to_ras=slicer.util.arrayFromVTKMatrix(matrix), modality=modality,
                  units=units, meta=meta)


def updateVolumeNodeFromVolume(node, volume: Volume) -> None:
    """Write the voxels and the exact geometry of ``volume`` into ``node``."""
    slicer.util.updateVolumeFromArray(node, volume.voxels)
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(volume.ijk_to_ras))
