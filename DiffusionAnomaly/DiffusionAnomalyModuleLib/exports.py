"""Exports of a case: lesion segmentation (.seg.nrrd, NIfTI, DICOM SEG), lesion table (CSV), HTML report.

The files are the command line's: the NIfTI label map, the CSV and the report come from the
engine's writers on the case record; the .seg.nrrd and DICOM SEG from Slicer's own writers on
the segmentation node, so what is exported is exactly what is shown.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import slicer

from DiffusionAnomalyLib.export import write_labelmap, write_table_csv
from DiffusionAnomalyLib.files import atomic_path
from DiffusionAnomalyLib.pipeline import CaseResult
from DiffusionAnomalyLib.report import write_report

SEGMENTATION_SUFFIXES = (".seg.nrrd", ".nii", ".nii.gz")


def exportSegmentation(segmentationNode, case: CaseResult, path: str | os.PathLike) -> Path:
    """The lesion segmentation as .seg.nrrd (Slicer's writer) or as a NIfTI label map (.nii/.nii.gz)."""
    path = Path(path)
    name = path.name.lower()
    if not name.endswith(SEGMENTATION_SUFFIXES):
        raise ValueError(f"{path.name}: choose a .seg.nrrd, .nii or .nii.gz file name.")
    if name.endswith((".nii", ".nii.gz")):
        return write_labelmap(case.labels, case.volume, path)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    with atomic_path(path, suffix=".seg.nrrd") as tmp:
        storage.SetFileName(str(tmp))
        if not storage.WriteData(segmentationNode):
            raise OSError(f"Slicer's segmentation writer failed on {tmp.name}")
    return path


def exportTableCsv(case: CaseResult, path: str | os.PathLike) -> Path:
    """The lesion table as CSV, exactly as the command line writes lesions.csv."""
    return write_table_csv(case.table, path, modality=case.volume.modality, units=case.volume.units)


def exportReport(case: CaseResult, path: str | os.PathLike, title: str, parameters: dict[str, Any]) -> Path:
    """The HTML report (lesion table, key slices, parameters, model card, not-for-clinical-use notice).

    ``parameters``: what the module adds to the case's own parameter record (ROI, device, checkpoint).
    """
    return write_report(path, case, title=title, parameters=parameters)


def exportDicomSeg(scene, segmentationNode, inputNode, outputFolder: str | os.PathLike) -> None:
    """DICOM SEG through Slicer's exporter (needs a DICOM-loaded input and Slicer's DICOM SEG plugin)."""
    try:
        import DICOMSegmentationPlugin  # a Slicer application plugin: absent without the application
    except ImportError:
        raise RuntimeError("DICOM SEG export needs Slicer's DICOM segmentation plugin (install the "
                           "QuantitativeReporting extension); export .seg.nrrd or NIfTI instead.") from None
    if inputNode is None or not inputNode.GetAttribute("DICOM.instanceUIDs"):
        raise RuntimeError("DICOM SEG export needs an input volume loaded from DICOM.")
    item = scene.GetSubjectHierarchyNode().GetItemByDataNode(segmentationNode)
    exporter = DICOMSegmentationPlugin.DICOMSegmentationPluginClass()
    exportables = exporter.examineForExport(item)
    if not exportables:
        raise RuntimeError("Slicer's DICOM SEG exporter cannot export this segmentation.")
    for exportable in exportables:
        exportable.directory = str(outputFolder)
    error = exporter.export(exportables)
    if error:
        raise RuntimeError(f"DICOM SEG export failed: {error}")
