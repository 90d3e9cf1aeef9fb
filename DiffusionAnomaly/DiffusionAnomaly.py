"""DiffusionAnomaly: weakly-supervised diffusion-model lesion detection in PET/CT for 3D Slicer.

Module (metadata), Widget (thin: UI <-> parameter node, Apply/Cancel, progress), Logic (no Qt;
see DiffusionAnomalyModuleLib/logic.py) and a self-test. The engine is DiffusionAnomalyLib; the
heavy work runs in a separate worker process so the UI never blocks.

Qt, ctk and Slicer's GUI base classes are imported under a guard, so this file (and the logic)
also imports with the ``slicer-core`` package from PyPI, which has MRML but no application.
"""

from __future__ import annotations

import os
import sys
import unittest

_HERE = os.path.dirname(os.path.abspath(__file__))
for _path in (_HERE, os.path.dirname(_HERE)):  # module folder; source tree root (DiffusionAnomalyLib)
    if _path not in sys.path and os.path.isdir(_path):
        sys.path.append(_path)

import slicer  # noqa: E402
import vtk  # noqa: E402

try:  # a Slicer application (GUI available)
    import ctk
    import qt
    from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                               ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
    from slicer.util import VTKObservationMixin

    HAVE_GUI = True
except ImportError:  # slicer-core only (CI): the logic works, the widget is never created
    HAVE_GUI = False
    qt = ctk = None

    class ScriptedLoadableModule:  # type: ignore[no-redef]
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:  # type: ignore[no-redef]
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleLogic:  # type: ignore[no-redef]
        def __init__(self, *args, **kwargs):
            pass

    class ScriptedLoadableModuleTest(unittest.TestCase):  # type: ignore[no-redef]
        def delayDisplay(self, message, msec=None):
            print(message)

    class VTKObservationMixin:  # type: ignore[no-redef]
        def __init__(self):
            pass

from DiffusionAnomalyModuleLib.logic import (NOT_FOR_CLINICAL_USE, DiffusionAnomalyLogicBase,  # noqa: E402
                                             volumeFromNode)

#: the Python packages the engine needs (import name -> pip requirement); torch comes via PyTorchUtils
REQUIREMENTS = {"monai": "monai>=1.4", "einops": "einops>=0.7", "safetensors": "safetensors>=0.4",
                "SimpleITK": "SimpleITK>=2.3", "skimage": "scikit-image>=0.22", "slicerio": "slicerio>=1.1",
                "pydicom": "pydicom>=2.4", "matplotlib": "matplotlib>=3.7", "tqdm": "tqdm>=4.60"}
TORCH_REQUIREMENT = ">=2.2"

HELP_TEXT = f"""
<p>Finds lesion candidates in PET (CT comes later) with weakly-supervised diffusion models: the model,
trained only with slice labels (healthy / unhealthy), turns the scan into a healthy counterfactual;
where scan and counterfactual differ is the anomaly heat map, thresholded into a lesion segmentation
and a lesion table.</p>
<p>Choose the input volume and a model, press Apply (it becomes Cancel while running). Threshold and
minimum size update the lesions instantly from the heat map; a new guidance scale re-decodes only.</p>
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
# Logic
# =================================================================================================
class DiffusionAnomalyLogic(DiffusionAnomalyLogicBase, ScriptedLoadableModuleLogic):
    """See DiffusionAnomalyModuleLib/logic.py: no Qt; pass a scene when there is no application."""

    def __init__(self, scene=None, **kwargs):
        ScriptedLoadableModuleLogic.__init__(self)
        DiffusionAnomalyLogicBase.__init__(self, scene, **kwargs)

    def getParameterNode(self):  # overrides ScriptedLoadableModuleLogic's (works with any scene)
        return DiffusionAnomalyLogicBase.getParameterNode(self)


# =================================================================================================
# Widget
# =================================================================================================
def missingRequirements() -> list[str]:
    import importlib.util

    return [req for name, req in REQUIREMENTS.items() if importlib.util.find_spec(name) is None]


def ensureDependencies() -> bool:
    """Install missing packages after asking (TotalSegmentator's pattern); torch via PyTorchUtils."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        try:
            import PyTorchUtils
        except ImportError:
            slicer.util.errorDisplay("This module needs PyTorch. Install the 'PyTorch' extension from the "
                                     "Extensions Manager, restart Slicer and press Apply again.")
            return False
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled():
            if not slicer.util.confirmOkCancelDisplay(
                    "DiffusionAnomaly needs PyTorch (about 1-3 GB; a CUDA build is chosen when a GPU is "
                    "present). Install it now? This can take several minutes.", "Install PyTorch"):
                return False
            torch = torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT)
            if torch is None:
                slicer.util.errorDisplay("PyTorch could not be installed; see the Python console for details.")
                return False
    missing = missingRequirements()
    if missing:
        if not slicer.util.confirmOkCancelDisplay(
                "DiffusionAnomaly needs these Python packages, which will be installed now:\n"
                + "\n".join(missing), "Install Python packages"):
            return False
        with slicer.util.WaitCursor():
            slicer.util.pip_install(" ".join(f'"{m}"' for m in missing))
        still = missingRequirements()
        if still:
            slicer.util.errorDisplay(f"These packages could not be installed: {', '.join(still)}.")
            return False
    return True


def gpuStatus() -> str:
    """One sentence: will a GPU be used?"""
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed yet."
    if torch.cuda.is_available():
        return f"GPU will be used: {torch.cuda.get_device_name(0)}."
    return "No CUDA GPU found: the CPU will be used (a run takes minutes)."


class DiffusionAnomalyWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Thin: UI <-> parameter node, Apply/Cancel, a timer polling the worker, exports."""

    #: parameter name -> (widget name, kind)
    PARAMETER_WIDGETS = {
        "Modality": ("modalityComboBox", "combo"),
        "ROIMode": ("roiModeComboBox", "combo"),
        "NoiseLevel": ("noiseLevelSlider", "slider"),
        "GuidanceScale": ("guidanceScaleSlider", "slider"),
        "ThresholdMethod": ("thresholdMethodComboBox", "combo"),
        "Threshold": ("thresholdSlider", "slider"),
        "MinSizeMl": ("minSizeSlider", "slider"),
        "Steps": ("stepsSpinBox", "spin"),
        "Device": ("deviceComboBox", "combo"),
        "Seed": ("seedSpinBox", "spin"),
        "Counterfactual": ("counterfactualCheckBox", "check"),
    }
    #: parameters whose change only re-thresholds (no worker call)
    LESION_PARAMETERS = ("ThresholdMethod", "Threshold", "MinSizeMl", "ROIMode", "ROISegments")

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._updatingGUI = False
        self.timer = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DiffusionAnomaly.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DiffusionAnomalyLogic()
        self.logic.progressCallback = self.showProgress
        self.ui.notForClinicalUseLabel.text = NOT_FOR_CLINICAL_USE
        self.ui.progressBar.hide()
        self.timer = qt.QTimer()
        self.timer.setInterval(200)
        self.timer.timeout.connect(self.onPoll)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.inputSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.roiSegmentSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.roiSegmentSelector.connect("segmentSelectionChanged(QStringList)", self.updateParameterNodeFromGUI)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        for name, (widgetName, kind) in self.PARAMETER_WIDGETS.items():
            widget = getattr(self.ui, widgetName)
            signal = {"combo": "currentIndexChanged(int)", "slider": "valueChanged(double)",
                      "spin": "valueChanged(int)", "check": "toggled(bool)"}[kind]
            widget.connect(signal, self.updateParameterNodeFromGUI)
        self.ui.addModelButton.connect("clicked(bool)", self.onAddModel)
        self.ui.otsuButton.connect("clicked(bool)", self.onOtsu)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.exportSegmentationButton.connect("clicked(bool)", self.onExportSegmentation)
        self.ui.exportTableButton.connect("clicked(bool)", self.onExportTable)
        self.ui.exportReportButton.connect("clicked(bool)", self.onExportReport)
        self.ui.exportDicomSegButton.connect("clicked(bool)", self.onExportDicomSeg)
        self.ui.lesionTableView.connect("clicked(QModelIndex)", self.onLesionClicked)
        self.populateModels()
        self.initializeParameterNode()

    def cleanup(self):
        self.removeObservers()
        if self.timer is not None:
            self.timer.stop()
        if self.logic is not None:
            self.logic.cleanup()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event):
        if self.logic.job is not None and not self.logic.job.finished:
            self.logic.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        self.logic.case = None
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ---- parameter node <-> GUI ----------------------------------------------------------------
    def initializeParameterNode(self):
        node = self.logic.getParameterNode()
        if not node.GetNodeReference("InputVolume"):
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                node.SetNodeReferenceID("InputVolume", first.GetID())
        if not node.GetParameter("NoiseLevel"):
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
        except Exception:  # noqa: BLE001 - no model yet: keep the fields empty
            pass

    def updateGUIFromParameterNode(self, caller=None, event=None):
        node = self._parameterNode
        if node is None or self._updatingGUI:
            return
        self._updatingGUI = True
        try:
            self.ui.inputSelector.setCurrentNode(node.GetNodeReference("InputVolume"))
            self.ui.roiSegmentSelector.setCurrentNode(node.GetNodeReference("ROISegmentation"))
            segments = [s for s in node.GetParameter("ROISegments").split(",") if s]
            self.ui.roiSegmentSelector.setSelectedSegmentIDs(segments)
            index = self.ui.modelComboBox.findData(node.GetParameter("Model"))
            self.ui.modelComboBox.setCurrentIndex(index)
            # fraction of the map maximum: (0, 1]; absolute: map units (set before the value)
            absolute = node.GetParameter("ThresholdMethod") == "absolute"
            self.ui.thresholdSlider.maximum = 100.0 if absolute else 1.0
            for name, (widgetName, kind) in self.PARAMETER_WIDGETS.items():
                widget, value = getattr(self.ui, widgetName), node.GetParameter(name)
                if kind == "combo":
                    widget.setCurrentIndex(max(0, widget.findText(value)))
                elif kind == "slider" and value != "":
                    widget.value = float(value)
                elif kind == "spin" and value != "":
                    widget.value = int(float(value))
                elif kind == "check":
                    widget.checked = value.lower() == "true"
            self.ui.thresholdSlider.enabled = node.GetParameter("ThresholdMethod") != "otsu"
            self.ui.roiSegmentSelector.enabled = node.GetParameter("ROIMode") == "segmentation"
            self.updateModelCard()
            table = node.GetNodeReference("Table")
            self.ui.lesionTableView.setMRMLTableNode(table)
            hasResults = table is not None
            for button in (self.ui.exportSegmentationButton, self.ui.exportTableButton, self.ui.exportReportButton,
                           self.ui.exportDicomSegButton):
                button.enabled = hasResults
            running = self.logic.job is not None and not self.logic.job.finished
            self.ui.applyButton.text = "Cancel" if running else "Apply"
            self.ui.applyButton.enabled = running or node.GetNodeReference("InputVolume") is not None
        finally:
            self._updatingGUI = False

    def updateParameterNodeFromGUI(self, *args):
        node = self._parameterNode
        if node is None or self._updatingGUI:
            return
        before = self.logic.parameters(node)
        wasModifying = node.StartModify()
        node.SetNodeReferenceID("InputVolume", self.ui.inputSelector.currentNodeID)
        node.SetNodeReferenceID("ROISegmentation", self.ui.roiSegmentSelector.currentNodeID())
        node.SetParameter("ROISegments", ",".join(self.ui.roiSegmentSelector.selectedSegmentIDs()))
        for name, (widgetName, kind) in self.PARAMETER_WIDGETS.items():
            widget = getattr(self.ui, widgetName)
            value = {"combo": lambda w: w.currentText, "slider": lambda w: f"{w.value:g}",
                     "spin": lambda w: str(int(w.value)), "check": lambda w: "true" if w.checked else "false"}[kind](widget)
            node.SetParameter(name, value)
        node.EndModify(wasModifying)
        after = self.logic.parameters(node)
        changed = [k for k in after if after[k] != before[k]]
        if changed and all(k in self.LESION_PARAMETERS for k in changed):
            self.updateLesionsQuietly()

    def updateLesionsQuietly(self):
        """Threshold / size / ROI change: recompute lesions from the cached heat map (no network)."""
        if self.logic.job is not None and not self.logic.job.finished:
            return
        if self._parameterNode.GetNodeReference("Table") is None:
            return
        try:
            self.logic.updateLesions(self._parameterNode)
            case = self.logic.case
            self.ui.statusLabel.text = (f"{len(case.table)} lesion candidate(s); updated in "
                                        f"{self.logic.lastUpdateSeconds:.2f} s without network evaluation")
        except Exception as exc:  # noqa: BLE001 - show the sentence
            self.ui.statusLabel.text = str(exc)

    # ---- models ------------------------------------------------------------------------------
    def populateModels(self):
        self.ui.modelComboBox.blockSignals(True)
        self.ui.modelComboBox.clear()
        try:
            for m in self.logic.availableModels():
                self.ui.modelComboBox.addItem(m["title"], m["id"])
        except Exception as exc:  # noqa: BLE001 - engine missing before the dependency install
            self.ui.modelCardLabel.text = f"Models cannot be listed yet: {exc}"
        self.ui.modelComboBox.blockSignals(False)

    def onModelChanged(self, index):
        if self._parameterNode is None or self._updatingGUI:
            return
        self._parameterNode.SetParameter("Model", self.ui.modelComboBox.itemData(index) or "")
        self.applyModelDefaults(self._parameterNode)

    def updateModelCard(self):
        """Model card summary + whether it fits the input (recomputed only when model or input change)."""
        node = self._parameterNode
        inputNode = node.GetNodeReference("InputVolume")
        key = (node.GetParameter("Model"), node.GetParameter("Modality"),
               inputNode.GetID() if inputNode else None, inputNode.GetMTime() if inputNode else 0)
        if key == getattr(self, "_modelCardKey", None):
            return
        self._modelCardKey = key
        try:
            card = self.logic.readCard(node.GetParameter("Model"))
            text = self.logic.cardSummary(card)
            inputNode = node.GetNodeReference("InputVolume")
            if inputNode is not None and inputNode.GetImageData() is not None:
                try:
                    self.logic.checkModelFits(card, volumeFromNode(inputNode, node.GetParameter("Modality")))
                except ValueError as exc:
                    text += f"\n\nThis model does not fit the input: {exc}"
        except Exception as exc:  # noqa: BLE001
            text = str(exc)
        self.ui.modelCardLabel.text = text

    def onAddModel(self):
        path = qt.QFileDialog.getOpenFileName(self.parent, "Add a model checkpoint", "",
                                              "Checkpoints (*.safetensors *.pth *.pt)")
        if not path:
            return
        with slicer.util.tryWithErrorDisplay("This checkpoint cannot be used.", waitCursor=True):
            entry = self.logic.addUserCheckpoint(path)
            self.populateModels()
            self._parameterNode.SetParameter("Model", entry["id"])
            self.applyModelDefaults(self._parameterNode)

    def onOtsu(self):
        self._parameterNode.SetParameter("ThresholdMethod", "otsu")
        self.updateLesionsQuietly()

    # ---- run ---------------------------------------------------------------------------------
    def onApplyButton(self):
        job = self.logic.job
        if job is not None and not job.finished:
            self.logic.cancel()
            self.timer.stop()
            self.finishRun(job)
            return
        if not ensureDependencies():
            return
        if self.ui.modelComboBox.count == 0:  # the engine was not importable before the install
            self.populateModels()
            self.initializeParameterNode()
        self.ui.deviceLabel.text = gpuStatus()
        with slicer.util.tryWithErrorDisplay("The analysis could not start.", waitCursor=True):
            job = self.logic.startRun(self._parameterNode)
            if job.finished:
                self.finishRun(job)
                return
            self.ui.progressBar.show()
            self.ui.progressBar.value = 0
            self.ui.applyButton.text = "Cancel"
            self.timer.start()

    def onPoll(self):
        job = self.logic.poll(self._parameterNode)
        if job is None or job.finished:
            self.timer.stop()
            self.finishRun(job)

    def showProgress(self, job):
        self.ui.progressBar.value = int(round(100 * job.fraction))
        self.ui.statusLabel.text = f"{job.message} ({100 * job.fraction:.0f} %)"
        ready = self.logic.worker.ready if self.logic.worker is not None else None
        if ready:
            self.ui.deviceLabel.text = ("Running on the GPU." if ready.get("gpu")
                                        else "Running on the CPU (no CUDA GPU available to PyTorch).")

    def finishRun(self, job):
        self.ui.progressBar.hide()
        self.ui.applyButton.text = "Apply"
        if job is None:
            return
        if job.status == "done":
            case = self.logic.case
            evaluations = "no diffusion work (cached)" if not job.networkEvaluations else \
                f"{job.networkEvaluations} network evaluations"
            self.ui.statusLabel.text = f"Done: {len(case.table)} lesion candidate(s); {evaluations}."
        elif job.status == "cancelled":
            self.ui.statusLabel.text = "Cancelled; the scene is unchanged."
        else:
            self.ui.statusLabel.text = f"Failed: {job.error}"
            slicer.util.errorDisplay(job.error or "The analysis failed.")
        self.updateGUIFromParameterNode()

    def onLesionClicked(self, index):
        """Centre all slice views on the clicked lesion (the logic gives its RAS centroid)."""
        table = self._parameterNode.GetNodeReference("Table")
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
            with slicer.util.tryWithErrorDisplay("Export failed.", waitCursor=True):
                self.ui.statusLabel.text = f"Wrote {self.logic.exportSegmentation(self._parameterNode, path)}"

    def onExportTable(self):
        path = self._saveName("Export lesion table", "lesions.csv", "CSV (*.csv)")
        if path:
            with slicer.util.tryWithErrorDisplay("Export failed.", waitCursor=True):
                self.ui.statusLabel.text = f"Wrote {self.logic.exportTableCsv(self._parameterNode, path)}"

    def onExportReport(self):
        path = self._saveName("Export HTML report", "report.html", "HTML (*.html)")
        if path:
            with slicer.util.tryWithErrorDisplay("Export failed.", waitCursor=True):
                self.ui.statusLabel.text = f"Wrote {self.logic.exportReport(self._parameterNode, path)}"

    def onExportDicomSeg(self):
        folder = qt.QFileDialog.getExistingDirectory(self.parent, "DICOM SEG output folder")
        if folder:
            with slicer.util.tryWithErrorDisplay("DICOM SEG export failed.", waitCursor=True):
                self.logic.exportDicomSeg(self._parameterNode, folder)
                self.ui.statusLabel.text = f"Wrote DICOM SEG to {folder}"


# =================================================================================================
# Self-test (inside Slicer: a phantom case end to end)
# =================================================================================================
class DiffusionAnomalyTest(ScriptedLoadableModuleTest):
    """Runs a small synthetic PET phantom through the logic with the first available model."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_phantom_end_to_end()

    def test_phantom_end_to_end(self):
        import numpy as np

        from DiffusionAnomalyLib.phantoms import make_phantom

        logic = DiffusionAnomalyLogic(slicer.mrmlScene)
        models = logic.availableModels()
        if not models:
            self.skipTest("no bundled model (Resources/models/registry.json) is installed")
        case = make_phantom(seed=11, shape_ijk=(48, 48, 60), spacing=(8.0, 8.0, 12.0), n_lesions=2)
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "phantom PET")
        from DiffusionAnomalyModuleLib.logic import updateVolumeNodeFromVolume

        updateVolumeNodeFromVolume(node, case.pet)
        node.SetAttribute("DICOM.Modality", "PT")
        node.SetAttribute("DiffusionAnomaly.Units", "SUVbw")
        node.CreateDefaultDisplayNodes()
        params = logic.getParameterNode()
        params.SetNodeReferenceID("InputVolume", node.GetID())
        params.SetParameter("Model", models[0]["id"])
        logic.applyCardDefaults(params, logic.readCard(models[0]["id"]))
        job = logic.runBlocking(params, timeout=1800)
        self.assertEqual(job.status, "done")
        seg = params.GetNodeReference("Segmentation")
        table = params.GetNodeReference("Table")
        self.assertEqual(seg.GetSegmentation().GetNumberOfSegments(), table.GetNumberOfRows())
        heat = params.GetNodeReference("HeatMap")
        self.assertEqual(heat.GetImageData().GetDimensions(), node.GetImageData().GetDimensions())
        self.assertTrue(np.isfinite(slicer.util.arrayFromVolume(heat)).all())
        logic.cleanup()
        self.delayDisplay("DiffusionAnomaly phantom test passed")
