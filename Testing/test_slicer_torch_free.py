"""Slicer's own process stays torch-free: threshold change, table update, exports and choosing a method
(its defaults, its checked request, the classifier line) import only the core.

In a fresh interpreter (so nothing another test imported counts), the module is imported as Slicer
imports it, a scene holds an existing result (input and heat map nodes, as a saved scene or a
finished run leaves them), and the logic re-thresholds it, changes the threshold, updates the
table and writes every export. Neither torch nor MONAI may have been imported at the end.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("slicer-core (MRML) is not installed", allow_module_level=True)

MODULE = Path(__file__).resolve().parents[1] / "DiffusionAnomaly"

SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path

    sys.path.insert(0, {module!r})
    out = Path({out!r})

    import numpy as np
    import slicer
    from scipy import ndimage

    import DiffusionAnomaly
    from DiffusionAnomalyLib.phantoms import make_phantom
    from DiffusionAnomalyLib.volume import read_volume, write_volume
    from DiffusionAnomalyModuleLib import outputs
    from DiffusionAnomalyModuleLib.nodes import UNITS_ATTRIBUTE, updateVolumeNodeFromVolume

    # an existing result on disk: the input and the heat map a run wrote (lesions light up, plus noise)
    phantom = make_phantom(seed=5, shape_ijk=(40, 40, 50), spacing=(8.0, 8.0, 12.0), n_lesions=3)
    noise = np.abs(ndimage.gaussian_filter(np.random.default_rng(0).normal(size=phantom.pet.voxels.shape), 2))
    heat = phantom.pet.with_voxels((0.3 * noise + (phantom.lesion_labels.voxels > 0)).astype(np.float32),
                                   units=None)
    write_volume(phantom.pet, out / "input.nrrd")
    write_volume(heat, out / "heatmap.nrrd")

    # ... in a scene: the input node and its heat map output node
    scene = slicer.vtkMRMLScene()
    logic = DiffusionAnomaly.DiffusionAnomalyLogic(scene, settingsPath=str(out / "settings.json"))
    inputNode = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "phantom PET")
    updateVolumeNodeFromVolume(inputNode, read_volume(out / "input.nrrd"))
    inputNode.SetAttribute("DICOM.Modality", "PT")
    inputNode.SetAttribute(UNITS_ATTRIBUTE, "SUVbw")
    heatNode = outputs.outputNode(scene, inputNode, "heatmap", "vtkMRMLScalarVolumeNode")
    updateVolumeNodeFromVolume(heatNode, read_volume(out / "heatmap.nrrd", validate=False))
    params = logic.getParameterNode()  # the bundled model is the default
    params.SetNodeReferenceID("InputVolume", inputNode.GetID())
    logic.applyCardDefaults(params, logic.readCard(params.GetParameter("Model")))

    # lesions from the heat map, a threshold change, a minimum-size change (table updated each time)
    params.SetParameter("ThresholdMethod", "fraction")
    params.SetParameter("Threshold", "0.5")
    counts = [logic.updateLesions(params).lesion_count]
    params.SetParameter("Threshold", "0.9")
    counts.append(logic.updateLesions(params).lesion_count)
    params.SetParameter("MinSizeMl", "50")
    counts.append(logic.updateLesions(params).lesion_count)
    params.SetParameter("Threshold", "0.5")
    params.SetParameter("MinSizeMl", "0.5")
    counts.append(logic.updateLesions(params).lesion_count)
    table = params.GetNodeReference("Table")

    files = [logic.exportSegmentation(params, str(out / "lesions.seg.nrrd")),
             logic.exportSegmentation(params, str(out / "lesions.nii.gz")),
             logic.exportTableCsv(params, str(out / "lesions.csv")),
             logic.exportReport(params, str(out / "report.html"))]
    # every method the model serves: its defaults, its checked request and the classifier line (no worker)
    from DiffusionAnomalyModuleLib import parameters as settings
    card = logic.readCard(params.GetParameter("Model"))
    for method, _ in logic.methodChoices(params):
        logic.applyMethodDefaults(params, card, method)
        settings.runRequest(settings.values(params), card)
        logic.classifierSummary(params)

    print(json.dumps({{"counts": counts, "table_rows": table.GetNumberOfRows(),
                      "files": [str(f) for f in files if Path(f).stat().st_size > 0],
                      "heavy": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "monai"))}}))
""")


def test_threshold_table_and_exports_never_import_torch(tmp_path):
    script = tmp_path / "torch_free.py"
    script.write_text(SCRIPT.format(module=str(MODULE), out=str(tmp_path)))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["heavy"] == [], f"Slicer's process imported {result['heavy']}"
    first, high, large, again = result["counts"]
    assert first >= 2 and high <= first and large < first and again == first  # the changes took effect
    assert result["table_rows"] == again
    assert len(result["files"]) == 4  # seg.nrrd, NIfTI, CSV and the HTML report, none empty
