"""The parameter node: every user-visible setting, its default, and its reading as engine arguments.

The module's singleton ``vtkMRMLScriptedModuleNode`` holds every setting as text, so a saved and
reopened scene restores a case's settings. This file is the one place that knows the settings'
names and defaults and turns them into what the engine takes: a
:class:`~DiffusionAnomalyLib.postprocessing.Thresholding`, an
:class:`~DiffusionAnomalyLib.roi.OrganSelection` and the worker's run request.

An empty value means "the model card's default"; ``OrganExclude`` "none" means no exclusion.
``Steps`` holds ``""`` (card default), ``"reference"`` (the stride-1 reference loop) or a whole
number >= 1, read by :func:`DiffusionAnomalyLib.card.parse_steps` like everywhere else.
"""

from __future__ import annotations

from typing import Any

from DiffusionAnomalyLib.card import organ_list, parse_steps, whole_number
from DiffusionAnomalyLib.postprocessing import Thresholding
from DiffusionAnomalyLib.roi import OrganSelection

MODULE_NAME = "DiffusionAnomaly"

#: every user-visible setting with its default, as stored in the parameter node ("" = the card's default)
PARAMETERS: dict[str, str] = {
    "Modality": "auto",          # auto (from the node) | PT | CT
    "Units": "auto",             # auto (from the node) | SUVbw (declares a PET volume's voxels as SUV)
    "Model": "",                 # a bundled model id or a checkpoint path
    "ROIMode": "whole",          # whole | segmentation
    "ROISegments": "",           # comma-separated segment IDs of the ROI segmentation ("" = all)
    "NoiseLevel": "",
    "GuidanceScale": "",
    "ThresholdMethod": "",       # fraction | absolute | otsu
    "Threshold": "",
    "MinSizeMl": "",
    "Steps": "",                 # "" = card default | "reference" | a whole number >= 1
    "Device": "auto",            # auto | cpu | cuda
    "Seed": "0",
    "Counterfactual": "true",
    "OrganInclude": "",          # organ names/groups the organ ROI keeps ("" = the whole volume)
    "OrganExclude": "",          # organ names/groups it leaves out ("" = the card's default, "none" = none)
    "OrganMarginMm": "",         # mm the included and excluded organs grow by ("" = the card's default)
    "OrganFast": "false",        # TotalSegmentator's faster 3 mm model when it segments a CT here
}

#: node references of the parameter node: the inputs ...
INPUT_REFERENCE = "InputVolume"
ROI_REFERENCE = "ROISegmentation"
ORGAN_REFERENCE = "OrganSegmentation"  # a TotalSegmentator organ segmentation (the organ ROI's source)
ORGAN_CT_REFERENCE = "OrganCT"         # the CT whose organs TotalSegmentator segments from the module
#: the references :func:`values` reports beside the settings (their change re-thresholds too)
VALUE_REFERENCES = (ROI_REFERENCE, ORGAN_REFERENCE)

#: settings whose change only re-thresholds the cached heat map (no worker call, no network)
LESION_PARAMETERS = ("ThresholdMethod", "Threshold", "MinSizeMl", "ROIMode", "ROISegments", "OrganInclude",
                     "OrganExclude", "OrganMarginMm", *VALUE_REFERENCES)
#: ... and the outputs (output role -> reference role)
OUTPUT_REFERENCES = {"heatmap": "HeatMap", "counterfactual": "Counterfactual", "segmentation": "Segmentation",
                     "table": "Table"}


def parameterNode(scene, defaultModel: str | None = None):
    """The module's singleton parameter node in ``scene`` (created on first use), defaults filled in."""
    node = scene.GetSingletonNode(MODULE_NAME, "vtkMRMLScriptedModuleNode")
    if node is None:
        node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
        node.UnRegister(None)
        node.SetSingletonTag(MODULE_NAME)
        node.SetName(MODULE_NAME)
        node.SetAttribute("ModuleName", MODULE_NAME)
        node = scene.AddNode(node)
    setDefaults(node, defaultModel)
    return node


def setDefaults(node, defaultModel: str | None = None) -> None:
    """Fill every empty setting that has a default (a setting the user changed is kept)."""
    for name, default in PARAMETERS.items():
        if node.GetParameter(name) == "" and default != "":
            node.SetParameter(name, default)
    if not node.GetParameter("Model") and defaultModel:
        node.SetParameter("Model", defaultModel)


def values(node) -> dict[str, str]:
    """All settings of ``node`` as text, and the node IDs of :data:`VALUE_REFERENCES` ("" for none)."""
    return {**{name: node.GetParameter(name) for name in PARAMETERS},
            **{role: node.GetNodeReferenceID(role) or "" for role in VALUE_REFERENCES}}


def applyCardDefaults(node, card: dict[str, Any]) -> None:
    """Set the method, threshold and organ exclusion settings to the model card's defaults (steps as the card says)."""
    d = card.get("inference_defaults", {})
    th = Thresholding.from_card(card)
    organs = OrganSelection.from_card(card)
    settings = {"NoiseLevel": d.get("noise_level"), "GuidanceScale": d.get("guidance_scale"),
                "ThresholdMethod": th.method, "Threshold": th.value, "MinSizeMl": th.min_size_ml,
                "Steps": d.get("steps"), "OrganExclude": organText(organs.exclude),
                "OrganMarginMm": f"{organs.margin_mm:g}"}
    wasModifying = node.StartModify()
    for name, value in settings.items():
        node.SetParameter(name, "" if value is None else str(value))
    node.EndModify(wasModifying)


def number(params: dict[str, str], name: str, kind: type = float) -> Any:
    """The setting ``name`` as a number of ``kind`` (None when empty = the card's default); 20.7 is never an int 20."""
    text = params.get(name, "")
    if text in ("", None):
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"the parameter {name} must be a number, got {text!r}.") from None
    return whole_number(value, f"the parameter {name}") if kind is int else kind(value)


def thresholding(params: dict[str, str], card: dict[str, Any]) -> Thresholding:
    """How the heat map becomes lesions: the card's default with the user's settings applied."""
    return Thresholding.from_card(card, method=params.get("ThresholdMethod") or None,
                                  value=number(params, "Threshold"), min_size_ml=number(params, "MinSizeMl"))


def organSelection(params: dict[str, str], card: dict[str, Any]) -> OrganSelection:
    """The organ ROI choice: the card's default exclusion and margin with the user's settings applied."""
    return OrganSelection.from_card(card, include=params.get("OrganInclude", ""),
                                    exclude=params.get("OrganExclude") or None,
                                    margin_mm=number(params, "OrganMarginMm"))


def organText(names) -> str:
    """Organ names and groups as a parameter's text: comma-separated, "none" for none (not the card's default)."""
    return ",".join(names) or "none"


def organNames(text: str | None) -> list[str]:
    """The organ names and groups a parameter's text holds ("" and "none": none)."""
    return organ_list(text or "", "the organ setting")


def runRequest(params: dict[str, str]) -> dict[str, Any]:
    """The method arguments of the worker's run request (None = the card's default)."""
    try:
        steps = parse_steps(params.get("Steps"))
    except ValueError as exc:
        raise ValueError(f"the parameter Steps: {exc}") from None
    return {"noise_level": number(params, "NoiseLevel", int), "guidance_scale": number(params, "GuidanceScale"),
            "steps": steps, "seed": number(params, "Seed", int),
            "counterfactual": params.get("Counterfactual", "true").lower() == "true"}
