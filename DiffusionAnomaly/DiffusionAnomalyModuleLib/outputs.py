"""A case's output nodes in the scene: heat map, counterfactual, lesion segmentation, lesion table.

Outputs are standard nodes, placed under their input volume in the subject hierarchy and found
again by two node attributes (what the node is, which input it belongs to), so a re-run or a
threshold change reuses them and a reopened scene can be re-thresholded without a re-run. The heat
map records the method and parameters that made it, and the lesion table says them in words (its
description). A run that makes no counterfactual (CDM, CG-CDM, or the box unticked) removes the
counterfactual node an earlier run left, so no output of another run stays beside the heat map.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import numpy as np
import slicer
import vtk

from DiffusionAnomalyLib.export import LESION_TERMINOLOGY, lesion_colors
from DiffusionAnomalyLib.method_catalog import METHODS, parameter_words
from DiffusionAnomalyLib.pipeline import CaseResult
from DiffusionAnomalyLib.measurements import CENTROID_COLUMNS, lesion_columns
from DiffusionAnomalyLib.postprocessing import Thresholding
from DiffusionAnomalyLib.volume import Volume

from DiffusionAnomalyModuleLib.nodes import orientedImageFromLabels, updateVolumeNodeFromVolume, volumeFromNode

#: node attribute naming what an output node is (a key of parameters.OUTPUT_REFERENCES)
ROLE_ATTRIBUTE = "DiffusionAnomaly.Role"
#: node attribute holding the ID of the input volume an output belongs to
INPUT_ATTRIBUTE = "DiffusionAnomaly.InputVolumeID"
#: node attribute of the heat map: the id of the model that made it
MODEL_ATTRIBUTE = "DiffusionAnomaly.ModelID"
#: node attributes of the heat map: the method that made it (its catalog name), its parameters and the guidance
#: classifier (JSON; "null" for a method without one)
METHOD_ATTRIBUTE = "DiffusionAnomaly.Method"
PARAMETERS_ATTRIBUTE = "DiffusionAnomaly.MethodParameters"
CLASSIFIER_ATTRIBUTE = "DiffusionAnomaly.Classifier"
#: node attribute of the heat map: the modality of the input it was made for (a NIfTI input states none: the model's)
MODALITY_ATTRIBUTE = "DiffusionAnomaly.Modality"
#: node attribute of the heat map: "true" when it shows the map inside a ROI only (organ ROI or ROI segments; 0 outside)
INSIDE_ROI_ATTRIBUTE = "DiffusionAnomaly.InsideROI"
#: output role -> the node name's suffix after the input's name
OUTPUT_NAMES = {"heatmap": "heat map", "counterfactual": "counterfactual", "segmentation": "lesions",
                "table": "lesion table"}
#: Slicer's built-in Inferno colour table (a file-based colour node the Colors module loads at start-up)
INFERNO_NODE_ID = "vtkMRMLColorTableNodeFileInferno.txt"
INFERNO_NAME = "Inferno"
#: the heat map is transparent below this fraction of its maximum
HEAT_VISIBLE_FRACTION = 0.05


def findOutput(scene, inputNode, role: str):
    """The output node of ``role`` made for ``inputNode`` (None if there is none yet)."""
    if inputNode is None:
        return None
    for n in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(n)
        if node.GetAttribute(ROLE_ATTRIBUTE) == role and node.GetAttribute(INPUT_ATTRIBUTE) == inputNode.GetID():
            return node
    return None


def outputNode(scene, inputNode, role: str, className: str):
    """Reuse the output of ``role`` for this input, else create it under the input in the hierarchy."""
    node = findOutput(scene, inputNode, role)
    if node is None:
        node = scene.AddNewNodeByClass(className, f"{inputNode.GetName()} {OUTPUT_NAMES[role]}")
        node.SetAttribute(ROLE_ATTRIBUTE, role)
        node.SetAttribute(INPUT_ATTRIBUTE, inputNode.GetID())
        if inputNode.GetParentTransformNode() is not None and node.IsA("vtkMRMLTransformableNode"):
            node.SetAndObserveTransformNodeID(inputNode.GetParentTransformNode().GetID())
    placeUnder(scene, node, inputNode)
    return node


def placeUnder(scene, node, parentNode) -> None:
    """Make ``node`` a child of ``parentNode`` in the subject hierarchy."""
    sh = scene.GetSubjectHierarchyNode()
    if sh is None:
        return
    parent = sh.GetItemByDataNode(parentNode) or sh.CreateItem(sh.GetSceneItemID(), parentNode)
    item = sh.GetItemByDataNode(node)
    if not item:
        sh.CreateItem(parent, node)
    elif sh.GetItemParent(item) != parent:
        sh.SetItemParent(item, parent)


def ensureDisplay(scene, volumeNode):
    """The volume's display node (a scalar volume display node is created if there is none)."""
    display = volumeNode.GetDisplayNode()
    if display is None:
        display = scene.AddNewNodeByClass("vtkMRMLScalarVolumeDisplayNode")
        volumeNode.SetAndObserveDisplayNodeID(display.GetID())
    return display


def copyWindowLevel(source, target) -> None:
    """Show ``target`` with the window, level and colours of ``source`` (counterfactual like the input)."""
    src = source.GetDisplayNode() if source is not None else None
    dst = target.GetDisplayNode()
    if src is not None and dst is not None and src.IsA("vtkMRMLScalarVolumeDisplayNode"):
        dst.SetAutoWindowLevel(False)
        dst.SetWindowLevel(src.GetWindow(), src.GetLevel())
        if src.GetColorNodeID():
            dst.SetAndObserveColorNodeID(src.GetColorNodeID())


def heatColorNode(scene):
    """Slicer's built-in Inferno colour table.

    Only where it does not exist (the MRML library without a Slicer application, which loads no
    colour files) an equal table is built from matplotlib's inferno, the source of Slicer's, as the
    report's figures draw it (:func:`DiffusionAnomalyLib.figures.inferno_rgb`, 8 bits a channel).
    """
    node = scene.GetNodeByID(INFERNO_NODE_ID)
    if node is not None:
        return node
    for n in range(scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode")):
        node = scene.GetNthNodeByClass(n, "vtkMRMLColorTableNode")
        if node.GetName() == INFERNO_NAME:
            return node
    from DiffusionAnomalyLib.figures import inferno_rgb  # only this fallback needs it

    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", INFERNO_NAME)
    node.SetTypeToUser()
    node.SetNumberOfColors(256)
    for n, (r, g, b) in enumerate(inferno_rgb() / 255.0):
        node.SetColor(n, "", float(r), float(g), float(b), 1.0)
    return node


def heatRange(scene, heatNode, heat: Volume) -> None:
    """Inferno from 0 to the map's maximum, transparent near zero."""
    display = ensureDisplay(scene, heatNode)
    display.SetAndObserveColorNodeID(heatColorNode(scene).GetID())
    vmax = float(np.max(heat.voxels)) or 1.0
    display.SetAutoWindowLevel(False)
    display.SetWindowLevelMinMax(0.0, vmax)
    display.SetApplyThreshold(True)
    display.SetLowerThreshold(HEAT_VISIBLE_FRACTION * vmax)
    display.SetUpperThreshold(vmax * 2 + 1)


def showHeatMap(scene, inputNode, heatNode, heat: Volume) -> None:
    """:func:`heatRange`, and the map as a half-transparent foreground over the input in every view."""
    heatRange(scene, heatNode, heat)
    for n in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(n, "vtkMRMLSliceCompositeNode")
        composite.SetBackgroundVolumeID(inputNode.GetID())
        composite.SetForegroundVolumeID(heatNode.GetID())
        composite.SetForegroundOpacity(0.5)


def writeHeatMap(heatNode, case: CaseResult) -> Volume:
    """The heat map as shown (inside the organ ROI only; the case keeps the whole map) into ``heatNode``."""
    shown = case.shown_heatmap
    updateVolumeNodeFromVolume(heatNode, shown)
    heatNode.SetAttribute(MODEL_ATTRIBUTE, str(case.card.get("id")))
    heatNode.SetAttribute(METHOD_ATTRIBUTE, case.method_name)
    heatNode.SetAttribute(PARAMETERS_ATTRIBUTE, json.dumps(case.parameters, sort_keys=True))
    heatNode.SetAttribute(CLASSIFIER_ATTRIBUTE, json.dumps(case.classifier, sort_keys=True))
    heatNode.SetAttribute(INSIDE_ROI_ATTRIBUTE, "true" if case.roi is not None else "false")
    heatNode.SetAttribute(MODALITY_ATTRIBUTE, case.volume.modality or "")
    return shown


def updateSegmentation(segNode, inputNode, labels: np.ndarray, volume: Volume) -> None:
    """One named, coloured segment per lesion (label value = lesion id); reference geometry = the input."""
    segNode.SetReferenceImageGeometryParameterFromVolumeNode(inputNode)
    segmentation = segNode.GetSegmentation()
    segmentation.RemoveAllSegments()
    if segNode.GetDisplayNode() is None:
        segNode.CreateDefaultDisplayNodes()
    n = int(labels.max(initial=0))
    if n == 0:
        return
    if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
            orientedImageFromLabels(labels, volume.ijk_to_ras), segNode, "Lesion"):
        raise RuntimeError("the lesion label map could not be imported into the segmentation.")
    colors = lesion_colors(n)
    term = LESION_TERMINOLOGY
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


def updateTable(tableNode, rows: list[dict[str, Any]], modality: str | None = None, units: str | None = None,
                heatUnits: str | None = None) -> None:
    """The lesion table: the engine's lesion-table columns for the input's ``modality`` / ``units`` (HU columns for
    CT, SUV columns for PET: :func:`~DiffusionAnomalyLib.measurements.lesion_columns`; titles, units, integer and
    text flags; the heat column in ``heatUnits``), one row per lesion."""
    schema = lesion_columns(modality, units, rows, heat_units=heatUnits)
    wasModifying = tableNode.StartModify()
    tableNode.SetLocked(False)
    numeric = [c for c in schema if not c.text]
    columns = [np.array([row[c.name] for row in rows], dtype=np.int32 if c.integer else np.float64)
               for c in numeric]
    slicer.util.updateTableFromArray(tableNode, columns, [c.name for c in numeric])
    for index, c in enumerate(schema):  # text columns (the organ) as string arrays, at their place in the schema
        if c.text:
            array = vtk.vtkStringArray()
            array.SetName(c.name)
            for row in rows:
                array.InsertNextValue(str(row[c.name]))
            tableNode.GetTable().InsertColumn(array, index)
    for c in schema:
        tableNode.SetColumnTitle(c.name, c.title)
        tableNode.SetColumnUnitLabel(c.name, c.unit)
    tableNode.SetUseColumnTitleAsColumnHeader(True)
    tableNode.SetLocked(True)
    tableNode.EndModify(wasModifying)


def lesionCenterRAS(scene, tableNode, row: int) -> tuple[float, float, float]:
    """World RAS of a lesion's centroid (a table row), for centring the views on it."""
    table = tableNode.GetTable()
    if not 0 <= row < table.GetNumberOfRows():
        raise IndexError(f"the lesion table has no row {row}.")
    point = [float(slicer.util.arrayFromTableColumn(tableNode, name)[row]) for name in CENTROID_COLUMNS]
    inputNode = scene.GetNodeByID(tableNode.GetAttribute(INPUT_ATTRIBUTE) or "")
    transform = inputNode.GetParentTransformNode() if inputNode is not None else None
    if transform is not None:
        toWorld = vtk.vtkGeneralTransform()
        transform.GetTransformToWorld(toWorld)
        point = list(toWorld.TransformPoint(point))
    return tuple(float(v) for v in point)


def writeCase(scene, inputNode, case: CaseResult, writeVolumes: bool, writeHeat: bool = False) -> dict[str, Any]:
    """Write ``case`` into the output nodes of ``inputNode`` (reused or created); returns role -> node.

    ``writeVolumes``: also (re)write heat map and counterfactual (after a worker run); without it
    only segmentation and table change (a threshold change), and with ``writeHeat`` the heat map
    shown inside the new organ ROI (an ROI change).
    """
    nodes: dict[str, Any] = {}
    scene.StartState(scene.BatchProcessState)
    try:
        if writeVolumes:
            heatNode = outputNode(scene, inputNode, "heatmap", "vtkMRMLScalarVolumeNode")
            showHeatMap(scene, inputNode, heatNode, writeHeatMap(heatNode, case))
            nodes["heatmap"] = heatNode
            if case.counterfactual is not None:
                cfNode = outputNode(scene, inputNode, "counterfactual", "vtkMRMLScalarVolumeNode")
                updateVolumeNodeFromVolume(cfNode, case.counterfactual)
                ensureDisplay(scene, cfNode)
                copyWindowLevel(inputNode, cfNode)
            elif findOutput(scene, inputNode, "counterfactual") is not None:  # another run's: it would mislead
                scene.RemoveNode(findOutput(scene, inputNode, "counterfactual"))
        for role in ("heatmap", "counterfactual"):
            node = nodes.get(role) or findOutput(scene, inputNode, role)
            if node is not None:
                nodes[role] = node
        if writeHeat and not writeVolumes and "heatmap" in nodes:  # a new organ ROI: the map shown inside it
            heatRange(scene, nodes["heatmap"], writeHeatMap(nodes["heatmap"], case))
        nodes["segmentation"] = outputNode(scene, inputNode, "segmentation", "vtkMRMLSegmentationNode")
        updateSegmentation(nodes["segmentation"], inputNode, case.labels, case.volume)
        nodes["table"] = outputNode(scene, inputNode, "table", "vtkMRMLTableNode")
        updateTable(nodes["table"], case.table, case.volume.modality, case.volume.units, case.heat_units)
        nodes["table"].SetDescription(methodWords(case))
    finally:
        scene.EndState(scene.BatchProcessState)
    return nodes


def caseFromOutputs(scene, inputNode, volume: Volume, card: dict[str, Any] | None,
                    checkpoint: str | None) -> CaseResult | None:
    """The case held by the output nodes of ``inputNode`` (a reopened scene), None without a heat map.

    Enough to re-threshold and export without a re-run; the method and its parameters are those the
    heat map node records, and so is the modality of an input that states none (a CT NIfTI keeps its
    HU columns). ``card`` None (the model is gone): a card naming only the model id the heat map records.
    """
    heatNode = findOutput(scene, inputNode, "heatmap")
    if heatNode is None or heatNode.GetImageData() is None:
        return None
    if volume.modality is None and heatNode.GetAttribute(MODALITY_ATTRIBUTE):
        volume = replace(volume, modality=heatNode.GetAttribute(MODALITY_ATTRIBUTE))
    if card is None:
        card = {"id": heatNode.GetAttribute(MODEL_ATTRIBUTE) or "unknown", "method": "", "modality": "",
                "inference_defaults": {}}
    method = heatNode.GetAttribute(METHOD_ATTRIBUTE) or ""
    method = method if method in METHODS else ""
    parameters, classifier = (_jsonAttribute(heatNode, name) for name in (PARAMETERS_ATTRIBUTE, CLASSIFIER_ATTRIBUTE))
    cfNode = findOutput(scene, inputNode, "counterfactual")
    return CaseResult(volume=volume, heatmap=volumeFromNode(heatNode),
                      counterfactual=volumeFromNode(cfNode) if cfNode is not None else None, card=card,
                      parameters=parameters or {}, thresholding=Thresholding.for_method(card, method or None),
                      checkpoint=checkpoint, method_name=method, classifier=classifier)


def _jsonAttribute(node, name: str) -> dict[str, Any] | None:
    """A node attribute holding a JSON object; None when absent or not one (edited by hand: the map still serves)."""
    try:
        value = json.loads(node.GetAttribute(name) or "null")
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def methodWords(case: CaseResult) -> str:
    """The method that made ``case`` and its parameters in words (the lesion table's description, the report):
    "Classifier-guided DDIM: noise level L 500, classifier scale s 100, DDIM steps 100 (bundled classifier x)"."""
    name = case.method_run
    if name not in METHODS:
        return "method not recorded"
    words = parameter_words(name, case.parameters)
    text = METHODS[name].title + (f": {words}" if words else "")
    if case.classifier:
        text += f" (classifier {case.classifier.get('id')})"
    return text


def heatShownInsideROI(scene, inputNode) -> bool:
    """Whether the input's heat map node holds the map inside an organ ROI only (so is valid only there)."""
    heatNode = findOutput(scene, inputNode, "heatmap")
    return heatNode is not None and heatNode.GetAttribute(INSIDE_ROI_ATTRIBUTE) == "true"
