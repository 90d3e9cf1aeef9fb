"""DiffusionAnomaly: weakly-supervised diffusion-model lesion detection in PET/CT for 3D Slicer.

Module (metadata), Widget (binds the UI to the parameter node and the logic) and a self-test.
The logic and everything it uses live in DiffusionAnomalyModuleLib (one job per file, see
logic.py); the engine is DiffusionAnomalyLib, and the heavy work runs in a separate worker
process so the UI never blocks.

Qt, ctk and Slicer's GUI base classes are imported under a guard, so this file also imports with
the ``slicer-core`` package from PyPI, which has MRML but no application.
"""

from __future__ import annotations

import os
import sys
import traceback
import unittest
from contextlib import contextmanager

_HERE = os.path.dirname(os.path.abspath(__file__))
for _path in (_HERE, os.path.dirname(_HERE)):  # module folder; source tree root (DiffusionAnomalyLib)
    if _path not in sys.path and os.path.isdir(_path):
        sys.path.append(_path)

import slicer  # noqa: E402
import vtk  # noqa: E402

try:  # a Slicer application (GUI available)
    import qt
    from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleTest,
                                               ScriptedLoadableModuleWidget)
    from slicer.util import VTKObservationMixin

    HAVE_GUI = True
except ImportError:  # slicer-core only (CI): the logic works, the widget is never created
    HAVE_GUI = False
    qt = None

    class ScriptedLoadableModule:  # type: ignore[no-redef]
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:  # type: ignore[no-redef]
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleTest(unittest.TestCase):  # type: ignore[no-redef]
        def delayDisplay(self, message, msec=None):
            print(message)

    class VTKObservationMixin:  # type: ignore[no-redef]
        def __init__(self):
            pass

from DiffusionAnomalyModuleLib import dependencies  # noqa: E402 - standard library and slicer only

if HAVE_GUI:  # a fresh Slicer lacks a few packages of the engine's core, which Slicer's process imports below
    dependencies.installCorePackages()

from DiffusionAnomalyLib.card import MAX_MARGIN_MM, NOT_FOR_CLINICAL_USE, REFERENCE_STEPS, parse_steps  # noqa: E402
from DiffusionAnomalyLib.errors import is_refusal, user_sentence  # noqa: E402
from DiffusionAnomalyLib.method_catalog import RECOMPUTE_WORDS  # noqa: E402
from DiffusionAnomalyLib.postprocessing import THRESHOLD_RULE_WORDS  # noqa: E402

from DiffusionAnomalyModuleLib.logic import DiffusionAnomalyLogic  # noqa: E402
from DiffusionAnomalyModuleLib.parameters import (INPUT_REFERENCE, LESION_PARAMETERS, METHOD_SETTINGS,  # noqa: E402
                                                  ORGAN_CT_REFERENCE, ORGAN_REFERENCE, OUTPUT_REFERENCES,
                                                  ROI_REFERENCE)

HELP_TEXT = f"""
<p>Finds lesion candidates in PET and CT with weakly-supervised diffusion models: the model,
trained only with slice labels (healthy / unhealthy), turns the scan into a healthy counterfactual;
where scan and counterfactual differ is the anomaly heat map, thresholded into a lesion segmentation
and a lesion table (SUV columns for PET, HU mean and range for CT). A model for the input's
modality is chosen when the input says its modality; the input's window, level and colours are
never changed.</p>
<p>CT: a CT organ model analyses crops around its organs (for example kidneys and pancreas), so it needs
the organ segmentation of the CT (Organs section, below). By default it takes its organs the scan shows;
an organ you include that the scan lacks is refused by name.</p>
<p>Choose the input volume, a model and a method, press Apply (it becomes Cancel while running). The
methods a model's network can run are offered: IgCONDA-PET (implicit guidance), classifier-guided DDIM
and DDPM (they need a noise-conditioned classifier: the bundled one that fits the model, or a file),
CDM and CG-CDM (a heat map from two short trajectories, no counterfactual). Each method shows its own
parameters with their ranges; their tooltips say what a change recomputes. Threshold and minimum size
update the lesions instantly from the heat map; a new guidance or classifier scale of IgCONDA-PET or
classifier-guided DDIM re-decodes only. On the first Apply, PyTorch and MONAI (for the analysis
process) are installed after asking.</p>
<p>Organs: choose a TotalSegmentator segmentation of the patient (for example from the TotalSegmentator
extension), or let TotalSegmentator segment the CT of the PET/CT pair (through the TotalSegmentator
extension when it is installed, else in an environment of its own: <i>diffusion-anomaly
totalsegmentator-setup</i>). Its organs are carried onto the input by physical coordinates. Lesion
candidates outside the organ ROI are dropped and the heat map is shown inside it; with included organs
only the slices they need are computed. Excluded organs and the margin default to the model card's
defaults (when it has them); a change of organs or margin updates the lesions without a new run.</p>
<p>DDIM steps: a whole number of strided steps, fast; below 1 the box shows <i>reference</i>: the
papers' stride-1 loop, one network evaluation per timestep (slow). CDM's steps R are a plain number.</p>
<p><b>{NOT_FOR_CLINICAL_USE}</b></p>
<p>The four papers the methods come from:</p>
<ol>
<li>Ahamed et al., "IgCONDA-PET: Weakly-Supervised PET Anomaly Detection using Implicitly-Guided
Attention-Conditional Counterfactual Diffusion Modeling - a Multi-Center, Multi-Cancer, and Multi-Tracer Study"
(the method used by the bundled model).</li>
<li>Babaei, Cheng, Thai, Zhao, "Pancreatic Tumor Segmentation as Anomaly Detection in CT Images Using
Denoising Diffusion Models" (classifier-guided DDPM/DDIM, after Wolleb et al. 2022).</li>
<li>Hu, Chen, Ho, Shi, "Conditional Diffusion Models for Weakly Supervised Medical Image Segmentation" (CDM).</li>
<li>Dusseljee, "Latent Diffusion Models for Weakly Supervised Kidney Anomaly Detection", MSc thesis,
Radboud University / Radboudumc, 2025 (3D latent diffusion on TotalSegmentator organ ROIs).</li>
</ol>
<p>Documentation: the README of the DiffusionAnomaly extension.</p>
"""


class DiffusionAnomaly(ScriptedLoadableModule):
    """Module metadata."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Diffusion Anomaly"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["DiffusionAnomaly developers"]
        self.parent.helpText = HELP_TEXT
        self.parent.acknowledgementText = (
            "Built on MONAI, PyTorch, SimpleITK, scikit-image and slicerio; the module structure follows "
            "the established Slicer AI extensions (TotalSegmentator, MONAIAuto3DSeg). " + NOT_FOR_CLINICAL_USE)


# =================================================================================================
# Widget
# =================================================================================================
@contextmanager
def showErrors():
    """Run a UI action: a refusal is shown as its one sentence in a message box; a bug also with its traceback."""
    try:
        with slicer.util.WaitCursor():
            yield
    except Exception as exc:  # noqa: BLE001 - every failure of a UI action ends in a message box
        details = None if is_refusal(exc) else traceback.format_exc()
        slicer.util.errorDisplay(user_sentence(exc), detailedText=details)


class DiffusionAnomalyWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Binds the UI to the parameter node and the logic: Apply/Cancel, a timer polling the run, exports."""

    #: parameter -> (widget name, kind); the kind says how a value is shown, read and signalled
    PARAMETER_WIDGETS = {
        "Modality": ("modalityComboBox", "combo"),
        "Units": ("unitsComboBox", "combo"),
        "ROIMode": ("roiModeComboBox", "combo"),
        "NoiseLevel": ("noiseLevelSlider", "slider"),
        "GuidanceScale": ("guidanceScaleSlider", "slider"),
        "ClassifierScale": ("classifierScaleSlider", "slider"),
        "Tau": ("tauSlider", "slider"),
        "Steps": ("stepsSpinBox", "steps"),
        "Seed": ("seedSpinBox", "spin"),
        "Classifier": ("classifierPathLineEdit", "path"),
        "ThresholdMethod": ("thresholdMethodComboBox", "combo"),
        "Threshold": ("thresholdSlider", "slider"),
        "MinSizeMl": ("minSizeSlider", "slider"),
        "Device": ("deviceComboBox", "combo"),
        "Counterfactual": ("counterfactualCheckBox", "check"),
        "OrganMarginMm": ("organMarginSlider", "slider"),
        "OrganFast": ("organFastCheckBox", "check"),
    }
    #: method parameter setting -> its label; label, tooltip and range are the chosen method's (the catalog's
    #: Parameter), and only the chosen method's parameters are shown (:meth:`showMethod`)
    METHOD_PARAMETER_LABELS = {"NoiseLevel": "noiseLevelLabel", "GuidanceScale": "guidanceScaleLabel",
                               "ClassifierScale": "classifierScaleLabel", "Tau": "tauLabel", "Steps": "stepsLabel",
                               "Seed": "seedLabel"}
    #: the classifier row: shown for a classifier-guided method only
    CLASSIFIER_WIDGETS = ("classifierLabel", "classifierPathLineEdit", "classifierStatusLabel")
    #: organ lists (checkable combo boxes): parameter -> widget; the logic says what they offer and what is checked
    ORGAN_LIST_WIDGETS = {"OrganInclude": "organIncludeComboBox", "OrganExclude": "organExcludeComboBox"}
    #: parameters bound by their own code: model and method (combo item data), the ROI segments (segment selector),
    #: organs
    OTHER_PARAMETER_WIDGETS = {"Model": "modelComboBox", "Method": "methodComboBox",
                               "ROISegments": "roiSegmentSelector", **ORGAN_LIST_WIDGETS}
    #: parameter node references chosen in the UI
    REFERENCE_WIDGETS = {INPUT_REFERENCE: "inputSelector", ROI_REFERENCE: "roiSegmentSelector",
                         ORGAN_REFERENCE: "organSegmentationSelector", ORGAN_CT_REFERENCE: "organCTSelector"}
    #: widget kind -> the Qt signal saying its value changed
    KIND_SIGNALS = {"combo": "currentIndexChanged(int)", "slider": "valueChanged(double)", "spin": "valueChanged(int)",
                    "steps": "valueChanged(int)", "check": "toggled(bool)", "path": "currentPathChanged(QString)"}
    #: every other connection: (widget name, signal, slot of this class)
    CONNECTIONS = (
        ("inputSelector", "currentNodeChanged(vtkMRMLNode*)", "updateParameterNodeFromGUI"),
        ("roiSegmentSelector", "currentNodeChanged(vtkMRMLNode*)", "updateParameterNodeFromGUI"),
        ("roiSegmentSelector", "segmentSelectionChanged(QStringList)", "updateParameterNodeFromGUI"),
        ("organSegmentationSelector", "currentNodeChanged(vtkMRMLNode*)", "updateParameterNodeFromGUI"),
        ("organCTSelector", "currentNodeChanged(vtkMRMLNode*)", "updateParameterNodeFromGUI"),
        ("organIncludeComboBox", "checkedIndexesChanged()", "updateParameterNodeFromGUI"),
        ("organExcludeComboBox", "checkedIndexesChanged()", "updateParameterNodeFromGUI"),
        ("segmentOrgansButton", "clicked(bool)", "onSegmentOrgans"),
        ("modelComboBox", "currentIndexChanged(int)", "onModelChanged"),
        ("methodComboBox", "currentIndexChanged(int)", "onMethodChanged"),
        ("addModelButton", "clicked(bool)", "onAddModel"),
        ("otsuButton", "clicked(bool)", "onOtsu"),
        ("applyButton", "clicked(bool)", "onApplyButton"),
        ("exportSegmentationButton", "clicked(bool)", "onExportSegmentation"),
        ("exportTableButton", "clicked(bool)", "onExportTable"),
        ("exportReportButton", "clicked(bool)", "onExportReport"),
        ("exportDicomSegButton", "clicked(bool)", "onExportDicomSeg"),
        ("lesionTableView", "clicked(QModelIndex)", "onLesionClicked"),
    )
    #: the steps spin box's value that shows its special value text "reference" (its minimum)
    STEPS_REFERENCE_VALUE = 0

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._updatingGUI = False
        self._modelCardKey = None
        self._methodKey = None
        self._method = None  # the chosen method's catalog record (None: no usable model)
        self._organKey = None
        self.timer = None
        self.organTimer = None

    # ---- the steps spin box: "reference" at its minimum ----------------------------------------
    @classmethod
    def stepsToSpinBox(cls, text: str) -> int | None:
        """The spin box value for a Steps setting (None: "" = the card's default, leave the box as it is)."""
        steps = parse_steps(text)
        if steps is None:
            return None
        return cls.STEPS_REFERENCE_VALUE if steps == REFERENCE_STEPS else steps

    @classmethod
    def stepsFromSpinBox(cls, value: int) -> str:
        """The Steps setting for a spin box value: "reference" at the special value, else the number."""
        return REFERENCE_STEPS if int(value) == cls.STEPS_REFERENCE_VALUE else str(int(value))

    def showSteps(self, spinBox, text: str) -> None:
        """Show a Steps setting in the spin box; "" (the card's default) or an invalid value leaves it as it is."""
        try:
            value = self.stepsToSpinBox(text)
        except ValueError:  # e.g. a scene saved by an older version; the run says what is wrong
            return
        if value is not None:
            spinBox.value = value

    # ---- the chosen method's parameters: the catalog's labels, help and ranges ------------------
    @classmethod
    def configureParameterWidget(cls, widget, kind: str, label, parameter) -> None:
        """Show the catalog's ``parameter`` in its widget (of binding ``kind``) and label: label, help (with what a
        change recomputes), range and decimals; DDIM steps keep "reference" at the minimum, CDM's R does not."""
        label.text = f"{parameter.label}:"
        widget.toolTip = f"{parameter.help}; a change {RECOMPUTE_WORDS[parameter.recompute]}."
        if kind == "slider":
            widget.decimals = parameter.decimals
            widget.singleStep = 10.0 ** -parameter.decimals
        elif kind == "steps":
            widget.specialValueText = REFERENCE_STEPS if parameter.kind == "steps" else ""
        widget.minimum = cls.STEPS_REFERENCE_VALUE if parameter.kind == "steps" else parameter.minimum
        widget.maximum = parameter.maximum

    def showMethod(self, spec) -> None:
        """Show the parameters of method ``spec`` only (None: none), and the classifier row for a classifier method."""
        parameters = {p.setting: p for p in spec.parameters} if spec is not None else {}
        for setting, labelName in self.METHOD_PARAMETER_LABELS.items():
            widgetName, kind = self.PARAMETER_WIDGETS[setting]
            widget, label = getattr(self.ui, widgetName), getattr(self.ui, labelName)
            parameter = parameters.get(setting)
            widget.visible = label.visible = parameter is not None
            if parameter is not None:
                self.configureParameterWidget(widget, kind, label, parameter)
        for name in self.CLASSIFIER_WIDGETS:
            getattr(self.ui, name).visible = spec is not None and spec.classifier
        self.ui.methodComboBox.toolTip = spec.summary if spec is not None else ""
        self.ui.counterfactualCheckBox.enabled = spec is None or spec.counterfactual

    def updateMethodSection(self, node) -> None:
        """The method list (the model's network's methods), the chosen one's parameters and the classifier line;
        recomputed only when model, method or classifier change."""
        params = self.logic.parameters(node)
        key = (params["Model"], params["Method"], params["Classifier"])
        if key == self._methodKey:
            return
        self._methodKey = key
        combo = self.ui.methodComboBox
        choices = self.logic.methodChoices(node)
        if [combo.itemData(i) for i in range(combo.count)] != [name for name, _ in choices]:
            combo.blockSignals(True)
            combo.clear()
            for name, title in choices:
                combo.addItem(title, name)
            combo.blockSignals(False)
        self._method = self.logic.chosenMethod(node)
        combo.setCurrentIndex(combo.findData(self._method.name) if self._method is not None else -1)
        self.showMethod(self._method)
        self.ui.classifierStatusLabel.text = self.logic.classifierSummary(node)

    # ---- set-up --------------------------------------------------------------------------------
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DiffusionAnomaly.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.notForClinicalUseLabel.text = NOT_FOR_CLINICAL_USE
        self.ui.organMarginSlider.maximum = MAX_MARGIN_MM  # the card's rule, not a second copy in the .ui
        self.ui.deviceLabel.text = dependencies.DEVICE_UNKNOWN
        self.ui.progressBar.hide()
        self.timer = qt.QTimer()
        self.timer.setInterval(200)
        self.timer.timeout.connect(self.onPoll)
        self.organTimer = qt.QTimer()
        self.organTimer.setInterval(200)
        self.organTimer.timeout.connect(self.onOrganPoll)

        self.logic = DiffusionAnomalyLogic()
        self.logic.progressCallback = self.showProgress
        self.logic.organProgressCallback = self.showOrganProgress
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        for name, (widgetName, kind) in self.PARAMETER_WIDGETS.items():
            getattr(self.ui, widgetName).connect(self.KIND_SIGNALS[kind], self.updateParameterNodeFromGUI)
        for widgetName, signal, slot in self.CONNECTIONS:
            getattr(self.ui, widgetName).connect(signal, getattr(self, slot))
        self.populateModels()
        self.initializeParameterNode()

    def cleanup(self):
        self.removeObservers()
        for timer in (self.timer, self.organTimer):
            if timer is not None:
                timer.stop()
        if self.logic is not None:
            self.logic.cleanup()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event):
        if self.logic.running:
            self.logic.cancel()
        self.logic.cancelOrganRun()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        self.logic.case = None
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ---- parameter node <-> GUI ----------------------------------------------------------------
    def initializeParameterNode(self):
        node = self.logic.getParameterNode()
        if not node.GetNodeReference(INPUT_REFERENCE):
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                node.SetNodeReferenceID(INPUT_REFERENCE, first.GetID())
        if not self.logic.preferModelForInput(node) and not node.GetParameter("NoiseLevel"):
            self.applyModelDefaults(node)
        self.setParameterNode(node)

    def setParameterNode(self, node):
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = node
        if node is not None:
            self.addObserver(node, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    def applyModelDefaults(self, node):
        try:
            self.logic.applyCardDefaults(node, self.logic.readCard(node.GetParameter("Model")))
        except ValueError:  # no usable model yet: keep the fields as they are
            pass

    def updateGUIFromParameterNode(self, caller=None, event=None):
        node = self._parameterNode
        if node is None or self._updatingGUI:
            return
        self._updatingGUI = True
        try:
            for role, widgetName in self.REFERENCE_WIDGETS.items():
                getattr(self.ui, widgetName).setCurrentNode(node.GetNodeReference(role))
            self.ui.roiSegmentSelector.setSelectedSegmentIDs([s for s in node.GetParameter("ROISegments").split(",") if s])
            self.ui.modelComboBox.setCurrentIndex(self.ui.modelComboBox.findData(node.GetParameter("Model")))
            self.updateMethodSection(node)  # the chosen method's ranges before its values
            # fraction of the map maximum: (0, 1]; absolute: map units up to the current heat map's maximum (CT heat
            # in HU runs to hundreds, PET in SUV to tens), set before the value
            self.ui.thresholdSlider.maximum = (self.logic.heatMaximum() if node.GetParameter("ThresholdMethod") == "absolute"
                                               else 1.0)
            for name, (widgetName, kind) in self.PARAMETER_WIDGETS.items():
                widget, value = getattr(self.ui, widgetName), node.GetParameter(name)
                if kind == "combo":
                    widget.setCurrentIndex(max(0, widget.findText(value)))
                elif kind == "slider" and value != "":
                    widget.value = float(value)
                elif kind == "spin" and value != "":
                    widget.value = int(float(value))
                elif kind == "steps":
                    self.showSteps(widget, value)
                elif kind == "check":
                    widget.checked = value.lower() == "true"
                elif kind == "path":
                    widget.currentPath = value
            self.ui.thresholdSlider.enabled = node.GetParameter("ThresholdMethod") != "otsu"
            self.ui.thresholdSlider.toolTip = THRESHOLD_RULE_WORDS.get(node.GetParameter("ThresholdMethod"), "")
            self.ui.roiSegmentSelector.enabled = node.GetParameter("ROIMode") == "segmentation"
            self.showOrganLists(node)
            self.ui.segmentOrgansButton.enabled = (self.logic.organRunning
                                                   or node.GetNodeReference(ORGAN_CT_REFERENCE) is not None)
            self.updateModelCard()
            self.updateOrganSummary()
            table = node.GetNodeReference(OUTPUT_REFERENCES["table"])
            self.ui.lesionTableView.setMRMLTableNode(table)
            self.ui.resultMethodLabel.text = self.logic.resultSummary(node)
            for button in (self.ui.exportSegmentationButton, self.ui.exportTableButton, self.ui.exportReportButton,
                           self.ui.exportDicomSegButton):
                button.enabled = table is not None
            running = self.logic.running
            self.ui.applyButton.text = "Cancel" if running else "Apply"
            self.ui.applyButton.enabled = running or node.GetNodeReference(INPUT_REFERENCE) is not None
        finally:
            self._updatingGUI = False

    def widgetValue(self, widgetName: str, kind: str) -> str:
        """The text a parameter widget's value is stored as."""
        widget = getattr(self.ui, widgetName)
        if kind == "combo":
            return widget.currentText
        if kind == "slider":
            return f"{widget.value:g}"
        if kind == "steps":
            return self.stepsFromSpinBox(widget.value)
        if kind == "spin":
            return str(int(widget.value))
        if kind == "path":
            return widget.currentPath
        return "true" if widget.checked else "false"

    def updateParameterNodeFromGUI(self, *args):
        node = self._parameterNode
        if node is None or self._updatingGUI:
            return
        before = self.logic.parameters(node)
        inputBefore = (node.GetNodeReferenceID(INPUT_REFERENCE), node.GetParameter("Modality"))
        wasModifying = node.StartModify()
        for role, widgetName in self.REFERENCE_WIDGETS.items():
            chosen = getattr(self.ui, widgetName).currentNode()
            node.SetNodeReferenceID(role, chosen.GetID() if chosen is not None else None)
        node.SetParameter("ROISegments", ",".join(self.ui.roiSegmentSelector.selectedSegmentIDs()))
        for name, widgetName in self.ORGAN_LIST_WIDGETS.items():  # the card's default stays "" (see the logic)
            node.SetParameter(name, self.logic.organListText(node, name, self.checkedOrgans(widgetName)))
        shown = {p.setting for p in self._method.parameters} if self._method is not None else set()
        for name, (widgetName, kind) in self.PARAMETER_WIDGETS.items():
            if name in METHOD_SETTINGS and name not in shown:  # another method's: hidden, kept as it is
                continue
            node.SetParameter(name, self.widgetValue(widgetName, kind))
        if (node.GetNodeReferenceID(INPUT_REFERENCE), node.GetParameter("Modality")) != inputBefore:
            with showErrors():
                self.logic.preferModelForInput(node)  # a model for the new input's modality, if the chosen one is not
        node.EndModify(wasModifying)
        after = self.logic.parameters(node)
        changed = [k for k in after if after[k] != before[k]]
        if changed and all(k in LESION_PARAMETERS for k in changed):
            self.updateLesionsQuietly()

    # ---- organs ------------------------------------------------------------------------------
    def showOrganLists(self, node):
        """Offer the logic's organ choices in the include and exclude lists, checked as the parameters say."""
        choices, checked = self.logic.organChoiceState(node)
        for name, widgetName in self.ORGAN_LIST_WIDGETS.items():
            combo = getattr(self.ui, widgetName)
            combo.blockSignals(True)
            if [combo.itemText(i) for i in range(combo.count)] != choices:
                combo.clear()
                for choice in choices:
                    combo.addItem(choice)
            for row, choice in enumerate(choices):
                combo.setCheckState(combo.model().index(row, 0),
                                    qt.Qt.Checked if choice in checked[name] else qt.Qt.Unchecked)
            combo.blockSignals(False)

    def checkedOrgans(self, widgetName: str) -> list[str]:
        combo = getattr(self.ui, widgetName)
        return [combo.itemText(index.row()) for index in combo.checkedIndexes()]

    def updateOrganSummary(self):
        """The organ line (recomputed only when the organ source, choice, input or model change)."""
        node = self._parameterNode
        params = self.logic.parameters(node)
        inputNode = node.GetNodeReference(INPUT_REFERENCE)
        organNode = node.GetNodeReference(ORGAN_REFERENCE)
        key = (params["Model"], params["OrganInclude"], params["OrganExclude"], params["OrganMarginMm"],
               inputNode.GetID() if inputNode else None, organNode.GetID() if organNode else None,
               organNode.GetMTime() if organNode else 0)
        if key == self._organKey or self.logic.organRunning:
            return
        self._organKey = key
        self.ui.organStatusLabel.text = self.logic.organSummary(node)

    def onSegmentOrgans(self):
        if self.logic.organRunning:
            run = self.logic.organRun
            self.logic.cancelOrganRun()
            self.organTimer.stop()
            self.finishOrganRun(run)
            return
        with showErrors():
            run = self.logic.startOrganRun(self._parameterNode)
            if run.finished:
                self.finishOrganRun(run)
                return
            self.ui.segmentOrgansButton.text = "Cancel"
            self.organTimer.start()

    def onOrganPoll(self):
        run = self.logic.pollOrganRun(self._parameterNode)
        if run is None or run.finished:
            self.organTimer.stop()
            self.finishOrganRun(run)

    def showOrganProgress(self, run):
        self.ui.organStatusLabel.text = f"{run.message} ({100 * run.fraction:.0f} %)"
        if run.usesExtension:  # the extension's logic runs in this thread: keep the window painted
            slicer.app.processEvents()

    def finishOrganRun(self, run):
        self.ui.segmentOrgansButton.text = "Segment organs"
        if run is None:
            return
        if run.status == "done":
            self._organKey = None
            self.updateGUIFromParameterNode()
            self.updateLesionsQuietly()
        elif run.status == "cancelled":
            self.ui.organStatusLabel.text = "TotalSegmentator was cancelled; the scene is unchanged."
        else:
            self.ui.organStatusLabel.text = f"Failed: {run.error}"
            slicer.util.errorDisplay(run.error or "TotalSegmentator failed.")  # the run's sentence

    def updateLesionsQuietly(self):
        """Threshold / size / ROI / organ change: recompute lesions from the cached heat map (no network)."""
        if self.logic.running or self._parameterNode.GetNodeReference(OUTPUT_REFERENCES["table"]) is None:
            return
        try:
            case = self.logic.updateLesions(self._parameterNode)
            self.ui.statusLabel.text = (f"{case.lesion_count} lesion candidate(s) at {case.threshold_words()}; "
                                        f"updated in {self.logic.lastUpdateSeconds:.2f} s without network evaluation")
        except Exception as exc:  # noqa: BLE001 - show the sentence
            self.ui.statusLabel.text = str(exc)

    # ---- models ------------------------------------------------------------------------------
    def populateModels(self):
        self.ui.modelComboBox.blockSignals(True)
        self.ui.modelComboBox.clear()
        for m in self.logic.availableModels():
            self.ui.modelComboBox.addItem(m["title"], m["id"])
        self.ui.modelComboBox.blockSignals(False)

    def onModelChanged(self, index):
        if self._parameterNode is None or self._updatingGUI:
            return
        self._parameterNode.SetParameter("Model", self.ui.modelComboBox.itemData(index) or "")
        self.applyModelDefaults(self._parameterNode)

    def onMethodChanged(self, index):
        """Another method: its parameters and threshold take their defaults for this model."""
        if self._parameterNode is None or self._updatingGUI:
            return
        with showErrors():
            card = self.logic.readCard(self._parameterNode.GetParameter("Model"))
            self.logic.applyMethodDefaults(self._parameterNode, card, self.ui.methodComboBox.itemData(index) or "")

    def updateModelCard(self):
        """Model card summary + whether it fits the input (recomputed only when model or input change)."""
        node = self._parameterNode
        inputNode = node.GetNodeReference(INPUT_REFERENCE)
        key = (node.GetParameter("Model"), node.GetParameter("Modality"),
               inputNode.GetID() if inputNode else None, inputNode.GetMTime() if inputNode else 0)
        if key == self._modelCardKey:
            return
        self._modelCardKey = key
        try:
            self.ui.modelCardLabel.text = self.logic.modelSummary(node)
        except ValueError as exc:
            self.ui.modelCardLabel.text = str(exc)

    def onAddModel(self):
        path = qt.QFileDialog.getOpenFileName(self.parent, "Add a model checkpoint", "",
                                              "Checkpoints (*.safetensors *.pth *.pt)")
        if not path:
            return
        with showErrors():
            entry = self.logic.addUserCheckpoint(path)
            self.populateModels()
            self._parameterNode.SetParameter("Model", entry["id"])
            self.applyModelDefaults(self._parameterNode)

    def onOtsu(self):
        if self._parameterNode is not None:
            self._parameterNode.SetParameter("ThresholdMethod", "otsu")
            self.updateLesionsQuietly()

    # ---- run ---------------------------------------------------------------------------------
    def onApplyButton(self):
        if self.logic.running:
            job = self.logic.job
            self.logic.cancel()
            self.timer.stop()
            self.finishRun(job)
            return
        if not dependencies.ensureDependencies():
            return
        with showErrors():
            job = self.logic.startRun(self._parameterNode)
            if job.finished:
                self.finishRun(job)
                return
            self.ui.progressBar.show()
            self.ui.progressBar.value = 0
            self.ui.applyButton.text = "Cancel"
            self.timer.start()

    def onPoll(self):
        job = self.logic.poll()
        if job is None or job.finished:
            self.timer.stop()
            self.finishRun(job)

    def showProgress(self, job):
        self.ui.progressBar.value = int(round(100 * job.fraction))
        self.ui.statusLabel.text = f"{job.message} ({100 * job.fraction:.0f} %)"
        worker = self.logic.worker
        if worker is not None and worker.ready:
            self.ui.deviceLabel.text = dependencies.deviceSentence(worker.ready)

    def finishRun(self, job):
        self.ui.progressBar.hide()
        self.ui.applyButton.text = "Apply"
        if job is None:
            return
        if job.status == "done":
            evaluations = (f"{job.networkEvaluations} network evaluations" if job.networkEvaluations
                           else "no diffusion work (cached)")
            if job.classifierEvaluations:
                evaluations += f", {job.classifierEvaluations} classifier evaluations"
            slices = job.modelSlices or {}
            if slices and slices.get("computed") != slices.get("total"):
                evaluations += f" ({slices['computed']} of {slices['total']} model slices: the included organs)"
            self.ui.statusLabel.text = (f"Done: {self.logic.case.lesion_count} lesion candidate(s) at "
                                        f"{self.logic.case.threshold_words()}; {evaluations}.")
        elif job.status == "cancelled":
            self.ui.statusLabel.text = "Cancelled; the scene is unchanged."
        else:
            self.ui.statusLabel.text = f"Failed: {job.error}"
            slicer.util.errorDisplay(job.error or "The analysis failed.")  # the worker's sentence
        self.updateGUIFromParameterNode()

    def onLesionClicked(self, index):
        """Centre all slice views on the clicked lesion (the logic gives its RAS centroid)."""
        table = self._parameterNode.GetNodeReference(OUTPUT_REFERENCES["table"])
        if table is None or not index.isValid():
            return
        r, a, s = self.logic.lesionCenterRAS(table, int(index.row()))
        slicer.modules.markups.logic().JumpSlicesToLocation(r, a, s, True)

    # ---- exports -----------------------------------------------------------------------------
    def _saveName(self, title, default, filters):
        return qt.QFileDialog.getSaveFileName(self.parent, title, default, filters)

    def onExportSegmentation(self):
        path = self._saveName("Export lesion segmentation", "lesions.seg.nrrd",
                              "Slicer segmentation (*.seg.nrrd);;NIfTI label map (*.nii.gz *.nii)")
        if path:
            with showErrors():
                self.ui.statusLabel.text = f"Wrote {self.logic.exportSegmentation(self._parameterNode, path)}"

    def onExportTable(self):
        path = self._saveName("Export lesion table", "lesions.csv", "CSV (*.csv)")
        if path:
            with showErrors():
                self.ui.statusLabel.text = f"Wrote {self.logic.exportTableCsv(self._parameterNode, path)}"

    def onExportReport(self):
        path = self._saveName("Export HTML report", "report.html", "HTML (*.html)")
        if path:
            with showErrors():
                self.ui.statusLabel.text = f"Wrote {self.logic.exportReport(self._parameterNode, path)}"

    def onExportDicomSeg(self):
        folder = qt.QFileDialog.getExistingDirectory(self.parent, "DICOM SEG output folder")
        if folder:
            with showErrors():
                self.logic.exportDicomSeg(self._parameterNode, folder)
                self.ui.statusLabel.text = f"Wrote DICOM SEG to {folder}"


# =================================================================================================
# Self-test (inside Slicer: a phantom case end to end)
# =================================================================================================
class DiffusionAnomalyTest(ScriptedLoadableModuleTest):
    """Runs a small synthetic PET phantom through the logic with the first available model, then its organ ROI."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_phantom_end_to_end()

    def test_phantom_end_to_end(self):
        import numpy as np

        from DiffusionAnomalyLib.phantoms import make_phantom
        from DiffusionAnomalyModuleLib.nodes import UNITS_ATTRIBUTE, updateVolumeNodeFromVolume
        from DiffusionAnomalyModuleLib.organs import importOrganLabels

        logic = DiffusionAnomalyLogic(slicer.mrmlScene)
        models = logic.availableModels()
        if not models:
            self.skipTest("no bundled model (Resources/models/registry.json) is installed")
        case = make_phantom(seed=11, shape_ijk=(48, 48, 60), spacing=(8.0, 8.0, 12.0), n_lesions=2)
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "phantom PET")
        updateVolumeNodeFromVolume(node, case.pet)
        node.SetAttribute("DICOM.Modality", "PT")
        node.SetAttribute(UNITS_ATTRIBUTE, "SUVbw")
        node.CreateDefaultDisplayNodes()
        params = logic.getParameterNode()
        params.SetNodeReferenceID(INPUT_REFERENCE, node.GetID())
        params.SetParameter("Model", models[0]["id"])
        logic.applyCardDefaults(params, logic.readCard(models[0]["id"]))
        job = logic.runBlocking(params, timeout=1800)
        self.assertEqual(job.status, "done")
        seg = params.GetNodeReference(OUTPUT_REFERENCES["segmentation"])
        table = params.GetNodeReference(OUTPUT_REFERENCES["table"])
        self.assertEqual(seg.GetSegmentation().GetNumberOfSegments(), table.GetNumberOfRows())
        heat = params.GetNodeReference(OUTPUT_REFERENCES["heatmap"])
        self.assertEqual(heat.GetImageData().GetDimensions(), node.GetImageData().GetDimensions())
        self.assertTrue(np.isfinite(slicer.util.arrayFromVolume(heat)).all())
        # organs: the phantom's own organ labels stand in for TotalSegmentator's; excluding the organs with
        # physiological uptake re-filters the lesions from the cached heat map, without the network
        organNode = importOrganLabels(slicer.mrmlScene, case.organs,
                                      "phantom organs (stand-in for TotalSegmentator)", node)
        evaluations = logic.workerStats()["total_network_evaluations"]
        params.SetNodeReferenceID("OrganSegmentation", organNode.GetID())
        params.SetParameter("OrganInclude", "")
        params.SetParameter("OrganExclude", "physiological-uptake")
        organCase = logic.updateLesions(params)
        excluded = case.organs.mask("physiological-uptake")
        self.assertFalse(np.any((organCase.labels > 0) & excluded))
        self.assertFalse(slicer.util.arrayFromVolume(heat)[excluded].any())
        self.assertEqual(seg.GetSegmentation().GetNumberOfSegments(), table.GetNumberOfRows())
        self.assertEqual(logic.workerStats()["total_network_evaluations"], evaluations)
        logic.cleanup()
        self.delayDisplay("DiffusionAnomaly phantom test passed")
