"""Static checks of the Slicer module files: .ui widget names, CMake lists, metadata, guarded imports."""

from __future__ import annotations

import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "DiffusionAnomaly"
UI = MODULE / "Resources" / "UI" / "DiffusionAnomaly.ui"
SOURCES = [MODULE / "DiffusionAnomaly.py", *sorted((MODULE / "DiffusionAnomalyModuleLib").glob("*.py"))]


def ui_widgets() -> dict[str, ET.Element]:
    tree = ET.parse(UI)
    return {w.get("name"): w for w in tree.iter("widget")}


def used_names() -> set[str]:
    names = set()
    for path in SOURCES:
        text = path.read_text()
        names |= set(re.findall(r"self\.ui\.(\w+)", text))
        # widgets reached through getattr(self.ui, name) from the PARAMETER_WIDGETS table
        names |= set(re.findall(r'\("(\w+)", "(?:combo|slider|spin|check)"\)', text))
    return names


def test_every_widget_the_code_uses_exists_in_the_ui():
    widgets = ui_widgets()
    used = used_names()
    assert len(used) >= 20, used  # the check is not vacuous
    missing = sorted(used - set(widgets))
    assert not missing, f"widgets used by the code but missing in {UI.name}: {missing}"


def test_parameter_widgets_exist_and_offer_the_parameter_values():
    sys.path.insert(0, str(MODULE))
    import DiffusionAnomaly
    from DiffusionAnomalyModuleLib.logic import PARAMETERS

    widgets = ui_widgets()
    table = DiffusionAnomaly.DiffusionAnomalyWidget.PARAMETER_WIDGETS
    assert set(table) <= set(PARAMETERS)
    for name, (widget_name, kind) in table.items():
        assert widget_name in widgets, widget_name
        expected = {"combo": "QComboBox", "slider": "ctkSliderWidget", "spin": "QSpinBox", "check": "QCheckBox"}[kind]
        assert widgets[widget_name].get("class") == expected, widget_name
        if kind == "combo":  # the combo's texts are the parameter values; the default must be one of them
            items = [i.find("property/string").text for i in widgets[widget_name].findall("item")]
            default = PARAMETERS[name]
            assert default == "" or default in items, (name, default, items)
    for name, values in {"modalityComboBox": ["auto", "PT", "CT"], "thresholdMethodComboBox": ["fraction", "absolute", "otsu"],
                         "deviceComboBox": ["auto", "cpu", "cuda"], "roiModeComboBox": ["whole", "segmentation"]}.items():
        items = [i.find("property/string").text for i in widgets[name].findall("item")]
        assert items == values, name


def test_ui_is_a_valid_qt_designer_file():
    tree = ET.parse(UI)
    root = tree.getroot()
    assert root.tag == "ui" and root.find("class").text == "DiffusionAnomaly"
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget"
    custom = {c.find("class").text for c in root.iter("customwidget")}
    slicer_classes = {w.get("class") for w in root.iter("widget") if w.get("class").startswith(("q", "ctk"))}
    assert slicer_classes <= custom  # every Slicer/CTK widget is declared
    receivers = {c.find("receiver").text for c in root.iter("connection")}
    assert {"inputSelector", "roiSegmentSelector", "lesionTableView"} <= receivers  # get the MRML scene
    names = [w.get("name") for w in root.iter("widget") if w.get("name")]
    assert len(names) == len(set(names)), "duplicate widget names"


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


def test_module_imports_without_qt_and_logic_has_no_qt():
    """Under slicer-core (no application) the module file imports; the logic never imports Qt."""
    code = (f"import sys; sys.path.insert(0, {str(MODULE)!r}); import DiffusionAnomaly as m; "
            "assert not m.HAVE_GUI; assert 'qt' not in sys.modules and 'ctk' not in sys.modules\n"
            "class P: pass\n"
            "p = P(); m.DiffusionAnomaly(p); print(p.title, '|', p.categories)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Diffusion Anomaly | ['Segmentation']" in out.stdout
    logic_src = (MODULE / "DiffusionAnomalyModuleLib" / "logic.py").read_text()
    assert not re.search(r"^\s*(import|from)\s+(qt|ctk)\b", logic_src, re.M)


def test_help_text_cites_the_four_papers_and_the_notice():
    sys.path.insert(0, str(MODULE))
    import DiffusionAnomaly

    text = DiffusionAnomaly.HELP_TEXT
    for needle in ("IgCONDA-PET", "Pancreatic Tumor Segmentation", "Conditional Diffusion Models for Weakly Supervised",
                   "Latent Diffusion Models for Weakly Supervised Kidney", "Not for clinical use"):
        assert needle in text, needle


@pytest.mark.parametrize("name", ["onApplyButton", "onPoll", "onLesionClicked", "onOtsu", "onExportReport"])
def test_widget_slots_exist(name):
    sys.path.insert(0, str(MODULE))
    import DiffusionAnomaly

    assert callable(getattr(DiffusionAnomaly.DiffusionAnomalyWidget, name))
