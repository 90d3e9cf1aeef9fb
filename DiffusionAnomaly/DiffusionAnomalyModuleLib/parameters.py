"""The parameter node: every user-visible setting, its default, and its reading as engine arguments.

The module's singleton ``vtkMRMLScriptedModuleNode`` holds every setting as text, so a saved and
reopened scene restores a case's settings. This file is the one place that knows the settings'
names and defaults and turns them into what the engine takes: a
:class:`~DiffusionAnomalyLib.postprocessing.Thresholding`, an
:class:`~DiffusionAnomalyLib.roi.OrganSelection` and the worker's run request.

An empty value means "the default": ``Method`` "" the model's own method, a method parameter ""
the method's default (:func:`~DiffusionAnomalyLib.method_catalog.method_defaults`), ``Classifier``
"" the bundled classifier that fits the model; ``OrganExclude`` "none" means no exclusion. The
method parameters are the catalog's (:data:`~DiffusionAnomalyLib.method_catalog.METHODS`), one
setting per ``Parameter.setting`` (``NoiseLevel``, ``Steps``, ``Tau``, ...): several methods share
a setting (each method's noise level is ``NoiseLevel``), and a run sends only its method's. The
names, ranges, labels and checks are the catalog's; nothing here repeats them.
"""

from __future__ import annotations

from typing import Any

from DiffusionAnomalyLib.card import number_from_text, organ_list, whole_number
from DiffusionAnomalyLib.method_catalog import (METHODS, MethodSpec, method_defaults, method_spec,
                                                methods_for_network, resolve_parameters, served_method)
from DiffusionAnomalyLib.postprocessing import Thresholding
from DiffusionAnomalyLib.roi import OrganSelection

MODULE_NAME = "DiffusionAnomaly"

#: the parameter-node settings of the methods' parameters (the catalog's ``Parameter.setting``), in catalog order
METHOD_SETTINGS: tuple[str, ...] = tuple(dict.fromkeys(p.setting for spec in METHODS.values() for p in spec.parameters))

#: every user-visible setting with its default, as stored in the parameter node ("" = the card's default)
PARAMETERS: dict[str, str] = {
    "Modality": "auto",          # auto (from the node) | PT | CT
    "Units": "auto",             # auto (from the node) | SUVbw (declares a PET volume's voxels as SUV)
    "Model": "",                 # a bundled model id or a checkpoint path
    "ROIMode": "whole",          # whole | segmentation
    "ROISegments": "",           # comma-separated segment IDs of the ROI segmentation ("" = all)
    "Method": "",                # an analysis method's name ("" = the model's own)
    **{setting: "" for setting in METHOD_SETTINGS},  # the method parameters ("" = the method's default)
    "Classifier": "",            # a guidance classifier checkpoint ("" = the bundled one that fits the model)
    "ThresholdMethod": "",       # fraction | absolute | otsu
    "Threshold": "",
    "MinSizeMl": "",
    "Device": "auto",            # auto | cpu | cuda
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


def applyCardDefaults(node, card: dict[str, Any], method: str | None = None) -> None:
    """Set the method, its parameters and threshold, and the organ exclusion to the model card's defaults.

    ``method`` None: the node's method if the model serves it, else the model's own (a new model);
    "" the model's own. See :func:`applyMethodDefaults`.
    """
    if method is None:
        method = node.GetParameter("Method")
        method = method if method in methods_for_network(card["method"]) else ""
    organs = OrganSelection.from_card(card)
    wasModifying = node.StartModify()
    applyMethodDefaults(node, card, method)
    node.SetParameter("OrganExclude", organText(organs.exclude))
    node.SetParameter("OrganMarginMm", f"{organs.margin_mm:g}")
    node.EndModify(wasModifying)


def applyMethodDefaults(node, card: dict[str, Any], method: str) -> None:
    """Choose ``method`` ("" = the model's own) and set its parameters to their defaults for this model
    (:func:`~DiffusionAnomalyLib.method_catalog.method_defaults`) and the threshold to the method's
    (:meth:`~DiffusionAnomalyLib.postprocessing.Thresholding.for_method`). The other methods'
    settings are left as they are (a run does not send them)."""
    spec = servedMethod(card, method)
    defaults, _ = method_defaults(card, spec.name)
    th = Thresholding.for_method(card, spec.name)
    settings = {"Method": method, **{p.setting: defaults[p.name] for p in spec.parameters},
                "ThresholdMethod": th.method, "Threshold": th.value, "MinSizeMl": th.min_size_ml}
    wasModifying = node.StartModify()
    for name, value in settings.items():
        node.SetParameter(name, "" if value is None else str(value))
    node.EndModify(wasModifying)


def servedMethod(card: dict[str, Any], method: str | None) -> MethodSpec:
    """The catalog record of ``method`` ("" or None: the model's own), refused in one sentence if the model's
    network cannot run it (:func:`DiffusionAnomalyLib.method_catalog.served_method`)."""
    return method_spec(served_method(card, method))


def methodParameters(params: dict[str, str], spec: MethodSpec) -> dict[str, Any]:
    """The settings of ``spec``'s parameters by parameter name: a number as a number ("20.7" stays 20.7 for the
    check to refuse), other text as it is ("reference"), "" as None (the default).

    Only this method's parameters: another method's setting in the node is never sent.
    """
    texts = {p.name: (params.get(p.setting) or "").strip() for p in spec.parameters}
    return {name: number_from_text(text) if text else None for name, text in texts.items()}


def resolvedMethod(params: dict[str, str], card: dict[str, Any]) -> tuple[MethodSpec, dict[str, Any]]:
    """The run's method and its checked parameters, defaults filled in, before any work
    (:func:`~DiffusionAnomalyLib.method_catalog.resolve_parameters`: one sentence naming the parameter).

    The noise level is bounded here by the model's timesteps; the tighter bound of its noise schedule
    (where alpha_bar vanishes) needs the schedule itself and is checked by the worker, also before any work.
    """
    spec = servedMethod(card, params.get("Method", ""))
    timesteps = int(card["scheduler"]["num_train_timesteps"])
    return spec, resolve_parameters(spec.name, methodParameters(params, spec), card, timesteps - 1)


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
    """How the heat map becomes lesions: the method's default (:meth:`Thresholding.for_method`) with the user's
    settings applied."""
    method = params.get("Method") or None
    return Thresholding.for_method(card, method if method in METHODS else None,
                                   method=params.get("ThresholdMethod") or None, value=number(params, "Threshold"),
                                   min_size_ml=number(params, "MinSizeMl"))


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


def runRequest(params: dict[str, str], card: dict[str, Any]) -> dict[str, Any]:
    """The method part of the worker's run request (protocol 2): the method (None = the model's own), its
    parameters only (None = the method's default) and whether to write the counterfactual. The values are
    checked first (:func:`resolvedMethod`), so a bad one is refused before the worker is asked."""
    spec, _ = resolvedMethod(params, card)
    return {"method": params.get("Method") or None, "parameters": methodParameters(params, spec),
            "counterfactual": params.get("Counterfactual", "true").lower() == "true"}
