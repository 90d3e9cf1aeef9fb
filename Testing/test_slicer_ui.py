"""Static checks of the Slicer module's files against each other: the .ui, the Widget's bindings, CMake.

No Qt here (CI has only the MRML library), so the Widget's declared bindings are checked against
the Qt Designer file: every widget the Widget touches exists with the class whose signal it uses,
every parameter-node setting has a widget, the steps spin box can say "reference", and every
method parameter of the catalog has a widget and a label that can show it. What the Widget shows
for each method (labels, help, ranges, which parameters) is checked on stand-in widgets: the
Widget's code that configures them runs as in Slicer.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "DiffusionAnomaly"
UI = MODULE / "Resources" / "UI" / "DiffusionAnomaly.ui"
LIB = MODULE / "DiffusionAnomalyModuleLib"
sys.path.insert(0, str(MODULE))

import DiffusionAnomaly  # noqa: E402
from DiffusionAnomalyLib.method_catalog import METHODS, RECOMPUTE_WORDS  # noqa: E402
from DiffusionAnomalyModuleLib import parameters  # noqa: E402

Widget = DiffusionAnomaly.DiffusionAnomalyWidget

#: the signals of the widget classes the module uses (Qt, CTK and Slicer documentation)
CLASS_SIGNALS = {
    "QComboBox": {"currentIndexChanged(int)", "currentTextChanged(QString)"},
    "QSpinBox": {"valueChanged(int)"},
    "QCheckBox": {"toggled(bool)", "clicked(bool)", "stateChanged(int)"},
    "QPushButton": {"clicked(bool)", "clicked()", "toggled(bool)"},
    "ctkSliderWidget": {"valueChanged(double)", "valueIsChanging(double)"},
    "qMRMLNodeComboBox": {"currentNodeChanged(vtkMRMLNode*)", "currentNodeIDChanged(QString)"},
    "qMRMLSegmentSelectorWidget": {"currentNodeChanged(vtkMRMLNode*)", "segmentSelectionChanged(QStringList)"},
    "qMRMLTableView": {"clicked(QModelIndex)"},
    "ctkCheckableComboBox": {"checkedIndexesChanged()", "currentIndexChanged(int)"},
    "ctkPathLineEdit": {"currentPathChanged(QString)", "validInputChanged(bool)"},
}


def ui_widgets() -> dict[str, ET.Element]:
    return {w.get("name"): w for w in ET.parse(UI).iter("widget") if w.get("name")}


def ui_property(widget: ET.Element, name: str) -> str | None:
    prop = widget.find(f"property[@name='{name}']")
    return None if prop is None else (prop[0].text or "")


def test_every_connection_names_a_ui_widget_whose_class_has_the_signal():
    widgets = ui_widgets()
    connections = [(w, Widget.KIND_SIGNALS[kind], "updateParameterNodeFromGUI")
                   for w, kind in Widget.PARAMETER_WIDGETS.values()] + list(Widget.CONNECTIONS)
    for widget_name, signal, slot in connections:
        assert widget_name in widgets, f"{widget_name} is not in {UI.name}"
        cls = widgets[widget_name].get("class")
        assert signal in CLASS_SIGNALS[cls], (widget_name, cls, signal)
        assert callable(getattr(Widget, slot, None)), slot


def test_every_ui_attribute_the_widget_reads_exists():
    used = set(re.findall(r"self\.ui\.(\w+)", (MODULE / "DiffusionAnomaly.py").read_text()))
    assert not used - set(ui_widgets()), sorted(used - set(ui_widgets()))
    # every connection is declared in the tables above (no stray .connect on a ui widget)
    source = (MODULE / "DiffusionAnomaly.py").read_text()
    assert not re.search(r"self\.ui\.\w+\.connect\(", source)


def test_every_parameter_has_exactly_one_widget():
    bound = list(Widget.PARAMETER_WIDGETS) + list(Widget.OTHER_PARAMETER_WIDGETS)
    assert sorted(bound) == sorted(parameters.PARAMETERS)
    assert set(Widget.REFERENCE_WIDGETS) == {parameters.INPUT_REFERENCE, parameters.ROI_REFERENCE,
                                             parameters.ORGAN_REFERENCE, parameters.ORGAN_CT_REFERENCE}
    widgets = ui_widgets()
    for name, widget_name in Widget.ORGAN_LIST_WIDGETS.items():  # organ lists: checkable, one per setting
        assert widgets[widget_name].get("class") == "ctkCheckableComboBox", name
    for name in [*Widget.OTHER_PARAMETER_WIDGETS.values(), *Widget.REFERENCE_WIDGETS.values()]:
        assert name in widgets, name
    expected = {"combo": "QComboBox", "slider": "ctkSliderWidget", "spin": "QSpinBox", "steps": "QSpinBox",
                "check": "QCheckBox", "path": "ctkPathLineEdit"}
    for name, (widget_name, kind) in Widget.PARAMETER_WIDGETS.items():
        assert widgets[widget_name].get("class") == expected[kind], name


def test_combo_items_are_the_parameter_values():
    widgets = ui_widgets()
    from DiffusionAnomalyLib.postprocessing import THRESHOLD_METHODS

    from DiffusionAnomalyModuleLib.lesions import ROI_MODES

    allowed = {"Modality": ["auto", "PT", "CT"], "Units": ["auto", "SUVbw"], "ThresholdMethod": list(THRESHOLD_METHODS),
               "Device": ["auto", "cpu", "cuda"], "ROIMode": list(ROI_MODES)}
    for name, (widget_name, kind) in Widget.PARAMETER_WIDGETS.items():
        if kind != "combo":
            continue
        items = [i.find("property/string").text for i in widgets[widget_name].findall("item")]
        assert items == allowed[name], name
        assert parameters.PARAMETERS[name] in ("", *items), name


def test_steps_spin_box_round_trips_reference():
    box = ui_widgets()["stepsSpinBox"]
    reference = Widget.STEPS_REFERENCE_VALUE
    assert ui_property(box, "minimum") == str(reference)  # the special value text shows at the minimum
    assert ui_property(box, "specialValueText") == "reference"
    assert Widget.stepsFromSpinBox(Widget.stepsToSpinBox("reference")) == "reference"
    assert Widget.stepsToSpinBox("reference") == reference
    for steps in ("1", "7", "1000"):
        assert Widget.stepsFromSpinBox(Widget.stepsToSpinBox(steps)) == steps
    assert Widget.stepsToSpinBox("") is None  # the method's default: the box is left as it is
    # the range is the catalog's (set per method): the .ui's maximum is only where the box starts
    assert max(p.maximum for spec in METHODS.values() for p in spec.parameters if p.setting == "Steps") <= 2**31 - 1


def test_ui_is_a_valid_qt_designer_file():
    root = ET.parse(UI).getroot()
    assert root.tag == "ui" and root.find("class").text == "DiffusionAnomaly"
    assert root.find("widget").get("class") == "qMRMLWidget"
    custom = {c.find("class").text for c in root.iter("customwidget")}
    slicer_classes = {w.get("class") for w in root.iter("widget") if w.get("class").startswith(("q", "ctk"))}
    assert slicer_classes <= custom  # every Slicer/CTK widget is declared
    receivers = {c.find("receiver").text for c in root.iter("connection")}
    assert {"inputSelector", "roiSegmentSelector", "lesionTableView", "organSegmentationSelector",
            "organCTSelector"} <= receivers  # get the MRML scene
    names = [w.get("name") for w in root.iter("widget") if w.get("name")]
    assert len(names) == len(set(names)), "duplicate widget names"
    # the notice has one wording, the engine's: the .ui leaves the label empty for the Widget to fill
    assert not ui_property(ui_widgets()["notForClinicalUseLabel"], "text")
    assert "clinical use" not in UI.read_text().lower()


def test_cmake_lists_every_script_and_resource():
    text = (MODULE / "CMakeLists.txt").read_text()
    files = [p.relative_to(MODULE).as_posix() for p in MODULE.rglob("*")
             if p.is_file() and p.suffix in (".py", ".ui", ".png") and "__pycache__" not in p.parts]
    listed = text.replace("${MODULE_NAME}", "DiffusionAnomaly")
    missing = [f for f in files if f not in listed]
    assert not missing, f"not listed in DiffusionAnomaly/CMakeLists.txt: {missing}"
    assert "slicerMacroBuildScriptedModule" in text and "WITH_GENERIC_TESTS" in text
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    top = (ROOT / "CMakeLists.txt").read_text()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert re.search(rf'set\({key} "[^"]+"\)', top), key
    assert "add_subdirectory(DiffusionAnomaly)" in top


def test_icon_is_128_pixels():
    from PIL import Image

    with Image.open(MODULE / "Resources" / "Icons" / "DiffusionAnomaly.png") as im:
        assert im.size == (128, 128)


def test_module_imports_without_qt_and_the_lib_has_no_qt():
    """Under slicer-core (no application) the module file imports; no Lib file imports Qt or ctk."""
    code = (f"import sys; sys.path.insert(0, {str(MODULE)!r}); import DiffusionAnomaly as m; "
            "assert not m.HAVE_GUI; assert 'qt' not in sys.modules and 'ctk' not in sys.modules\n"
            "class P: pass\n"
            "p = P(); m.DiffusionAnomaly(p); print(p.title, '|', p.categories)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Diffusion Anomaly | ['Segmentation']" in out.stdout
    for path in LIB.glob("*.py"):
        imported = {alias.name.split(".")[0] for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(ast.parse(path.read_text()))
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & {"qt", "ctk", "torch", "monai"}, (path.name, imported & {"qt", "ctk", "torch", "monai"})


def test_help_text_cites_the_four_papers_and_carries_the_engines_notice():
    from DiffusionAnomalyLib.card import NOT_FOR_CLINICAL_USE

    text = DiffusionAnomaly.HELP_TEXT
    for needle in ("IgCONDA-PET", "Pancreatic Tumor Segmentation", "Conditional Diffusion Models for Weakly Supervised",
                   "Latent Diffusion Models for Weakly Supervised Kidney", NOT_FOR_CLINICAL_USE, "reference"):
        assert needle in text, needle


@pytest.mark.parametrize("ready, needle", [(None, "decided when the analysis starts"),
                                           ({"device": "cuda:0", "gpu": True}, "GPU (cuda:0)"),
                                           ({"device": "cpu", "gpu": False}, "CPU")])
def test_device_sentence_comes_from_the_workers_ready_message(ready, needle):
    from DiffusionAnomalyModuleLib.dependencies import deviceSentence

    assert needle in deviceSentence(ready)


def test_labels_showing_card_or_error_text_are_plain_text():
    """A model card id or an error that looks like HTML must not be rendered (and hide the notice)."""
    widgets = ui_widgets()
    for name in ("modelCardLabel", "statusLabel", "deviceLabel", "organStatusLabel", "classifierStatusLabel",
                 "resultMethodLabel"):
        assert ui_property(widgets[name], "textFormat") == "Qt::PlainText", name


@pytest.mark.parametrize("error, detailed", [
    (ValueError("the input is MR, but this model was trained on PET; choose a PET scan."), False),
    (MemoryError("Unable to allocate 40.0 GiB for an array"), False),
    (KeyError("a bug"), True),
])
def test_a_ui_action_shows_a_refusal_as_its_one_sentence(monkeypatch, error, detailed):
    """What the Widget's message box says when an action fails (no Qt needed: the box is recorded)."""
    from contextlib import nullcontext

    shown = []
    monkeypatch.setattr(DiffusionAnomaly.slicer.util, "WaitCursor", nullcontext, raising=False)
    monkeypatch.setattr(DiffusionAnomaly.slicer.util, "errorDisplay",
                        lambda text, detailedText=None, **kw: shown.append((text, detailedText)), raising=False)
    with DiffusionAnomaly.showErrors():
        raise error
    [(text, details)] = shown
    if detailed:
        assert "bug" in text and "KeyError" in details
    elif isinstance(error, MemoryError):  # the allocator's words, inside a sentence saying what to do
        assert text.startswith("not enough memory for this run (Unable to allocate 40.0 GiB") and details is None
    else:
        assert text == str(error) and details is None


# ---- the methods' parameters ------------------------------------------------------------------------
#: the binding kinds that can show a catalog parameter of each kind (a float needs decimals: a slider)
PARAMETER_KIND_BINDINGS = {"float": {"slider"}, "int": {"slider", "spin", "steps"}, "steps": {"steps"}}


def test_every_method_parameter_has_a_widget_and_a_label_that_can_show_it():
    widgets = ui_widgets()
    settings = {p.setting: [] for spec in METHODS.values() for p in spec.parameters}
    for spec in METHODS.values():
        for p in spec.parameters:
            settings[p.setting].append(p)
    assert set(settings) == set(parameters.METHOD_SETTINGS) == set(Widget.METHOD_PARAMETER_LABELS)
    for setting, params in settings.items():
        widget_name, kind = Widget.PARAMETER_WIDGETS[setting]
        label = Widget.METHOD_PARAMETER_LABELS[setting]
        assert widgets[label].get("class") == "QLabel", label
        assert not ui_property(widgets[label], "text"), f"{label}: the catalog's label, not a second copy in the .ui"
        for p in params:
            assert kind in PARAMETER_KIND_BINDINGS[p.kind], (setting, p.kind, kind)
            if widgets[widget_name].get("class") == "QSpinBox":
                assert p.decimals == 0 and p.maximum <= 2**31 - 1, setting
    for name in Widget.CLASSIFIER_WIDGETS:
        assert name in widgets, name
    assert widgets["methodComboBox"].get("class") == "QComboBox"
    assert Widget.PARAMETER_WIDGETS["Classifier"] == ("classifierPathLineEdit", "path")
    # the catalog owns the ranges, labels and help: none of them is written into the .ui's parameter widgets
    for setting in settings:
        widget = widgets[Widget.PARAMETER_WIDGETS[setting][0]]
        assert ui_property(widget, "toolTip") is None and ui_property(widget, "decimals") is None, setting


class Stand:
    """A stand-in for a Qt widget: its properties are plain attributes, as PythonQt sets them."""

    def __init__(self, **properties):
        self.visible, self.enabled, self.toolTip, self.text = True, True, "", ""
        self.__dict__.update(properties)


class StandCombo(Stand):
    """A stand-in for a QComboBox holding (text, data) items."""

    def __init__(self):
        super().__init__(items=[], currentIndex=-1)

    @property
    def count(self) -> int:
        return len(self.items)

    def itemData(self, index: int):
        return self.items[index][1] if 0 <= index < len(self.items) else None

    def addItem(self, text: str, data=None) -> None:
        self.items.append((text, data))

    def clear(self) -> None:
        self.items, self.currentIndex = [], -1

    def findData(self, data) -> int:
        return next((i for i, item in enumerate(self.items) if item[1] == data), -1)

    def setCurrentIndex(self, index: int) -> None:
        self.currentIndex = index

    def blockSignals(self, block: bool) -> bool:
        return False


def stand_in_widget(logic=None):
    """A Widget whose ``ui`` holds stand-ins for every widget the method section touches."""
    widget = Widget()
    widget.logic = logic
    names = [*Widget.METHOD_PARAMETER_LABELS.values(), *Widget.CLASSIFIER_WIDGETS, "counterfactualCheckBox"]
    names += [Widget.PARAMETER_WIDGETS[s][0] for s in Widget.METHOD_PARAMETER_LABELS]
    widget.ui = types.SimpleNamespace(methodComboBox=StandCombo(), **{
        name: Stand(minimum=None, maximum=None, decimals=None, singleStep=None, specialValueText=None)
        for name in names})
    return widget


@pytest.mark.parametrize("method", list(METHODS))
def test_the_widget_shows_exactly_the_catalogs_parameters_of_the_chosen_method(method):
    spec = METHODS[method]
    widget = stand_in_widget()
    widget.showMethod(spec)
    ui = widget.ui
    shown = {s for s, label in Widget.METHOD_PARAMETER_LABELS.items() if getattr(ui, label).visible}
    assert shown == {p.setting for p in spec.parameters}
    for p in spec.parameters:
        name, kind = Widget.PARAMETER_WIDGETS[p.setting]
        box, label = getattr(ui, name), getattr(ui, Widget.METHOD_PARAMETER_LABELS[p.setting])
        assert box.visible and label.text == f"{p.label}:"
        assert box.toolTip == f"{p.help}; a change {RECOMPUTE_WORDS[p.recompute]}."
        assert box.maximum == p.maximum
        if p.kind == "steps":  # "reference" at the minimum, below 1
            assert box.minimum == Widget.STEPS_REFERENCE_VALUE < 1 and box.specialValueText == "reference"
        else:
            assert box.minimum == p.minimum
        if kind == "steps" and p.kind != "steps":  # CDM's R: a plain whole number, no "reference"
            assert box.specialValueText == "" and box.minimum >= 1
        if kind == "slider":
            assert box.decimals == p.decimals and box.singleStep == pytest.approx(10.0 ** -p.decimals)
    for name in Widget.CLASSIFIER_WIDGETS:
        assert getattr(ui, name).visible == spec.classifier, name
    assert ui.counterfactualCheckBox.enabled == spec.counterfactual
    assert ui.methodComboBox.toolTip == spec.summary


def test_without_a_usable_model_no_method_parameter_is_shown():
    widget = stand_in_widget()
    widget.showMethod(None)
    assert not any(getattr(widget.ui, label).visible for label in Widget.METHOD_PARAMETER_LABELS.values())
    assert not any(getattr(widget.ui, name).visible for name in Widget.CLASSIFIER_WIDGETS)
