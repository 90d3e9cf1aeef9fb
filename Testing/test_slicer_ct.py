"""The Slicer module on CT (issue 10) against the real MRML library (slicer-core), with the tiny CT organ model.

A CT volume node (the real 3 mm abdomen CT, and the DICOM series) with the tiny CT model, its
classifier as the Classifier setting, and the TotalSegmentator labels of that CT as the organ
segmentation gives the nodes of the PET path on the input's exact grid; the CT's window, level and
colours stay as the user set them; the lesion table has the HU columns; the organ choice defaults to
the model's organs the scan shows; and every refusal (no organ segmentation, an organ the scan
lacks, a PET, raw stored CT values) is one sentence before any worker starts, the scene unchanged.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("slicer-core (MRML) is not installed", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "DiffusionAnomaly"))

import DiffusionAnomaly  # noqa: E402
from conftest import REAL_CT, needs_real_ct  # noqa: E402
from test_slicer_logic import assert_on_grid, assert_segmentation_on_grid  # noqa: E402
from test_slicer_organs import node_state  # noqa: E402

from DiffusionAnomalyLib.measurements import CT_LESION_COLUMNS, LESION_COLUMNS  # noqa: E402
from DiffusionAnomalyLib.roi import read_organ_labels, roi_mask  # noqa: E402
from DiffusionAnomalyLib.volume import read_volume  # noqa: E402
from DiffusionAnomalyModuleLib import organs  # noqa: E402
from DiffusionAnomalyModuleLib.nodes import updateVolumeNodeFromVolume  # noqa: E402

pytestmark = needs_real_ct

THRESHOLD = "0.3"  # fraction of the heat map maximum inside the organ ROI: the untrained tiny model finds lesions
#: the window and level a reader sets for the abdomen (not Slicer's automatic ones)
WINDOW, LEVEL = 350.0, 50.0
CROP_ORGANS = ("kidney_left", "kidney_right", "pancreas")


def display_state(node) -> dict:
    """What a reader sees of a volume node: its display node's window, level, colours, thresholds, interpolation."""
    d = node.GetDisplayNode()
    return {"id": d.GetID(), "auto": d.GetAutoWindowLevel(), "window": d.GetWindow(), "level": d.GetLevel(),
            "color": d.GetColorNodeID(), "threshold": d.GetApplyThreshold(), "interpolate": d.GetInterpolate(),
            "visible": d.GetVisibility(), "opacity": d.GetOpacity(), "mtime": d.GetMTime(),
            "nodeMTime": node.GetMTime(), "imageMTime": node.GetImageData().GetMTime()}


def add_ct_node(scene, volume, name: str, dicom: bool = False):
    """``volume`` as a scalar volume node shown with the reader's abdominal window and a grey table of its own;
    ``dicom``: with the attribute Slicer's DICOM reader sets (a NIfTI loaded from a file states no modality)."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    updateVolumeNodeFromVolume(node, volume)
    if dicom:
        node.SetAttribute("DICOM.Modality", "CT")
    node.CreateDefaultDisplayNodes()
    grey = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "Grey (reader's)")
    grey.SetTypeToGrey()
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(grey.GetID())
    display.SetAutoWindowLevel(False)
    display.SetWindowLevel(WINDOW, LEVEL)
    return node


def ct_scene(tmp, checkpoint, classifier):
    """A scene with the real 3 mm CT (as loaded from its NIfTI) and its TotalSegmentator organs, two slice views,
    a logic with its own one-thread worker and the parameter node set to the tiny CT model and its classifier."""
    import torch

    torch.set_num_threads(1)
    scene = slicer.vtkMRMLScene()
    for _ in range(2):  # slice views: showing the heat map sets their layers, never the input's display
        scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    logic = DiffusionAnomaly.DiffusionAnomalyLogic(scene, threads=1, settingsPath=str(tmp / "settings.json"))
    ct = read_volume(REAL_CT / "ct_abdomen_3mm.nii.gz")
    node = add_ct_node(scene, ct, "abdomen CT")
    labels = read_organ_labels(REAL_CT / "ct_abdomen_3mm_totalseg.nii.gz")
    segNode = organs.importOrganLabels(scene, labels, "abdomen CT organs", node)
    params = logic.getParameterNode()
    params.SetNodeReferenceID("InputVolume", node.GetID())
    params.SetParameter("Model", str(checkpoint))
    params.SetParameter("Classifier", str(classifier))
    params.SetParameter("Device", "cpu")
    logic.applyCardDefaults(params, logic.readCard(str(checkpoint)))
    params.SetParameter("Threshold", THRESHOLD)
    params.SetNodeReferenceID("OrganSegmentation", segNode.GetID())
    return types.SimpleNamespace(scene=scene, logic=logic, node=node, params=params, ct=ct, labels=labels,
                                 segNode=segNode, tmp=tmp)


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_ct_checkpoint, tiny_ct_classifier):
    env = ct_scene(tmp_path_factory.mktemp("slicer-ct"), tiny_ct_checkpoint, tiny_ct_classifier)
    env.display = display_state(env.node)
    yield env
    env.logic.cleanup()


@pytest.fixture(scope="module")
def ct_run(env):
    return env.logic.runBlocking(env.params, timeout=600)


# ---- the run on the real CT ---------------------------------------------------------------------------
def test_a_ct_run_gives_the_pet_paths_nodes_on_the_inputs_grid(env, ct_run):
    job, params, node, case = ct_run, env.params, env.node, env.logic.case
    assert job.status == "done" and job.workerCall and job.networkEvaluations > 0, job.error
    assert job.method == "cg-ddim" and job.classifier is not None and job.classifierEvaluations > 0
    heat, cf, seg, table = (params.GetNodeReference(r) for r in ("HeatMap", "Counterfactual", "Segmentation", "Table"))
    assert [n.GetName() for n in (heat, cf, seg, table)] == [
        "abdomen CT heat map", "abdomen CT counterfactual", "abdomen CT lesions", "abdomen CT lesion table"]
    for out in (heat, cf):
        assert_on_grid(out, node)
        assert np.isfinite(slicer.util.arrayFromVolume(out)).all()
    assert_segmentation_on_grid(seg, node)
    n = len(case.table)
    assert n >= 1, "the test threshold should give at least one lesion"
    assert seg.GetSegmentation().GetNumberOfSegments() == n == table.GetNumberOfRows()
    sh = env.scene.GetSubjectHierarchyNode()
    for out in (heat, cf, seg, table):
        assert sh.GetItemParent(sh.GetItemByDataNode(out)) == sh.GetItemByDataNode(node)
    # the model's organs with the card's 10 mm margin: the region the network computed, and the ROI shown
    region = roi_mask(env.labels, CROP_ORGANS, None, 10.0, grid=env.ct).voxels != 0
    np.testing.assert_array_equal(job.region, region)
    np.testing.assert_array_equal(case.roi, region)
    shown = slicer.util.arrayFromVolume(heat)
    assert not shown[~region].any() and shown[region].max() > 0
    assert not np.any((case.labels > 0) & ~region)
    # the counterfactual keeps the input outside the organ crops, and is shown like the input
    counterfactual = slicer.util.arrayFromVolume(cf)
    ks = np.flatnonzero(region.any(axis=(1, 2)))  # the crops cover the region's slices and one model slice more
    far = np.r_[0:max(ks[0] - 2, 0), ks[-1] + 3:region.shape[0]]
    assert far.size > 0
    np.testing.assert_allclose(counterfactual[far], env.ct.voxels[far], atol=0.5)
    cfDisplay = cf.GetDisplayNode()
    assert (cfDisplay.GetWindow(), cfDisplay.GetLevel()) == (WINDOW, LEVEL)
    assert cfDisplay.GetColorNodeID() == env.node.GetDisplayNode().GetColorNodeID()


def test_the_inputs_window_level_and_colours_are_kept(env, ct_run):
    """Apply and showing the results leave the CT's display node exactly as the reader set it; the slice views
    show the heat map over the CT."""
    assert display_state(env.node) == env.display
    for n in range(env.scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = env.scene.GetNthNodeByClass(n, "vtkMRMLSliceCompositeNode")
        assert composite.GetBackgroundVolumeID() == env.node.GetID()
        assert composite.GetForegroundVolumeID() == env.params.GetNodeReferenceID("HeatMap")
    env.params.SetParameter("Threshold", "0.5")  # a threshold change rewrites lesions and table only
    env.logic.updateLesions(env.params)
    env.params.SetParameter("Threshold", THRESHOLD)
    env.logic.updateLesions(env.params)
    assert display_state(env.node) == env.display


def test_the_lesion_table_has_the_ct_columns(env, ct_run, tmp_path):
    """HU mean / min / max instead of the SUV columns, for a NIfTI CT that states no modality (the model's
    modality stands for it, as on the command line), in the node and in the exported CSV."""
    table = env.params.GetNodeReference("Table")
    names = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    assert names == [c.name for c in CT_LESION_COLUMNS]
    assert {"hu_mean", "hu_min", "hu_max"} <= set(names) and not {"suv_max", "suv_mean", "suv_peak", "tlg"} & set(names)
    for c in CT_LESION_COLUMNS:  # the heat column in the heat map's units, the others in the schema's
        unit = "|HU difference|" if c.name == "max_heat" else c.unit
        assert table.GetColumnUnitLabel(c.name) == unit and table.GetColumnTitle(c.name) == c.title
    assert table.GetColumnName(1) == "organ" and table.GetCellText(0, 1) == env.logic.case.table[0]["organ"]
    # the absolute-threshold slider reaches the heat map's maximum (|HU difference| runs past 100)
    top = float(env.logic.case.heatmap.voxels.max())
    assert env.logic.heatMaximum() == max(100.0, float(np.ceil(top)))
    row = env.logic.case.table[0]
    lesion = env.logic.case.labels == 1
    hu = np.asarray(env.ct.voxels, dtype=np.float64)[lesion]
    column = {name: c for c, name in enumerate(names)}
    assert table.GetTable().GetValue(0, column["hu_min"]).ToDouble() == pytest.approx(hu.min())
    assert table.GetTable().GetValue(0, column["hu_max"]).ToDouble() == pytest.approx(hu.max())
    assert row["hu_mean"] == pytest.approx(hu.mean(), rel=1e-5)
    header = env.logic.exportTableCsv(env.params, str(tmp_path / "lesions.csv")).read_text().splitlines()[0]
    assert header.split(",") == [c.name for c in CT_LESION_COLUMNS]
    assert [c.name for c in CT_LESION_COLUMNS] != [c.name for c in LESION_COLUMNS]


# ---- the organ choice ------------------------------------------------------------------------------
def test_the_organ_choice_defaults_to_the_models_organs(env):
    """Left empty, the organs to include are the model's (checked in the list; the setting stays empty when the
    list is written back, so it keeps meaning "those the scan shows"); an explicit choice is written as it is."""
    logic, params = env.logic, env.params
    assert params.GetParameter("OrganInclude") == ""
    offered, checked = logic.organChoiceState(params)
    assert checked["OrganInclude"] == list(CROP_ORGANS) and set(CROP_ORGANS) <= set(offered)
    assert logic.organListText(params, "OrganInclude", list(CROP_ORGANS)) == ""
    assert logic.organListText(params, "OrganInclude", ["pancreas"]) == "pancreas"
    assert logic.organListText(params, "OrganExclude", []) == "none"
    summary = logic.organSummary(params)
    assert "kidney_left, kidney_right, pancreas (those the scan shows)" in summary and "10 mm" in summary


@pytest.fixture(scope="module")
def dicom(env):
    """The DICOM series (20 slices of 0.98 x 0.98 x 2 mm) as Slicer's DICOM reader loads it (modality and HU
    stated), with its TotalSegmentator labels (pancreas, no kidneys; their file flips y against the series) as
    the organ segmentation, in the same scene: the worker of the first run serves it."""
    ct = read_volume(REAL_CT / "ct_dicom")
    node = add_ct_node(env.scene, ct, "DICOM CT", dicom=True)
    hu = slicer.vtkCodedEntry()
    hu.SetValueSchemeMeaning("[hnsf'U]", "UCUM", "Hounsfield unit")
    node.SetVoxelValueUnits(hu)
    labels = read_organ_labels(REAL_CT / "ct_dicom_totalseg.nii.gz")
    segNode = organs.importOrganLabels(env.scene, labels, "DICOM CT organs", node)
    env.params.SetNodeReferenceID("InputVolume", node.GetID())
    env.params.SetNodeReferenceID("OrganSegmentation", segNode.GetID())
    display = display_state(node)
    job = env.logic.runBlocking(env.params, timeout=600)
    return types.SimpleNamespace(ct=ct, node=node, labels=labels, segNode=segNode, display=display, job=job)


def test_the_dicom_series_gives_the_same_nodes_on_its_grid(env, dicom):
    """Only the pancreas is in the scan: the model's default organs are those it shows, on the series' grid."""
    job, params, node, case = dicom.job, env.params, dicom.node, env.logic.case
    assert job.status == "done" and job.workerCall, job.error
    heat, cf, seg, table = (params.GetNodeReference(r) for r in ("HeatMap", "Counterfactual", "Segmentation", "Table"))
    assert heat.GetName() == "DICOM CT heat map" and table.GetName() == "DICOM CT lesion table"
    for out in (heat, cf):
        assert_on_grid(out, node)
        assert np.isfinite(slicer.util.arrayFromVolume(out)).all()
    assert_segmentation_on_grid(seg, node)
    region = roi_mask(dicom.labels, "pancreas", None, 10.0, grid=dicom.ct).voxels != 0
    np.testing.assert_array_equal(job.region, region)
    assert not slicer.util.arrayFromVolume(heat)[~region].any()
    assert seg.GetSegmentation().GetNumberOfSegments() == len(case.table) == table.GetNumberOfRows()
    names = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    assert names == [c.name for c in CT_LESION_COLUMNS]
    assert display_state(node) == dicom.display
    assert display_state(env.node) == env.display  # the other CT's display too
    assert "pancreas (those the scan shows)" in env.logic.organSummary(params)


def test_an_organ_the_scan_lacks_is_refused_by_name(env, dicom):
    """The series shows no kidney: including one by name is refused naming it, before any worker call, on Apply
    and on a threshold change alike; nothing in the scene changes."""
    logic, params = env.logic, env.params
    worker, total = logic.worker, logic.workerStats()["total_network_evaluations"]
    params.SetParameter("OrganInclude", "pancreas,kidney_left")
    before = node_state(env.scene)
    try:
        for action in (logic.startRun, logic.updateLesions):
            with pytest.raises(ValueError) as info:
                action(params)
            sentence = str(info.value)
            assert "kidney_left is not in the organ segmentation 'DICOM CT organs'" in sentence, sentence
            assert "\n" not in sentence and "kidney_right" not in sentence
        assert logic.worker is worker and logic.workerStats()["total_network_evaluations"] == total
        assert node_state(env.scene) == before
    finally:
        params.SetParameter("OrganInclude", "")


def test_a_case_found_again_in_the_scene_keeps_the_ct_columns(env, dicom, tmp_path):
    """Another logic (a reopened scene) re-thresholds the heat map the nodes hold: HU columns still."""
    logic2 = DiffusionAnomaly.DiffusionAnomalyLogic(env.scene, settingsPath=str(tmp_path / "s.json"))
    try:
        case = logic2.updateLesions(env.params)
        assert case.volume.modality == "CT" and logic2.worker is None
        table = env.params.GetNodeReference("Table")
        assert [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())] == [c.name for c in CT_LESION_COLUMNS]
    finally:
        logic2.cleanup()


# ---- the default model for the input's modality ----------------------------------------------------
def test_a_model_for_the_inputs_modality_is_preferred(tmp_path, monkeypatch, tiny_checkpoint, tiny_ct_checkpoint,
                                                       small_phantom):
    """Bundled models for PET and CT: the default for a CT is the CT model; a CT input with the PET model chosen
    switches to the CT model (with its card's defaults), a fitting choice stays, and so does any choice for an
    input that states no modality."""
    models = tmp_path / "models"
    models.mkdir()
    for path in (tiny_checkpoint, tiny_ct_checkpoint):
        (models / path.name).symlink_to(path)
    registry = {"models": [{"id": "pet-model", "file": tiny_checkpoint.name, "title": "PET", "method": "igconda",
                            "modality": "PT"},
                           {"id": "ct-model", "file": tiny_ct_checkpoint.name, "title": "CT", "method": "igconda",
                            "modality": "CT"}]}
    (models / "registry.json").write_text(json.dumps(registry))
    monkeypatch.setenv("DIFFUSION_ANOMALY_MODELS", str(models))
    scene = slicer.vtkMRMLScene()
    logic = DiffusionAnomaly.DiffusionAnomalyLogic(scene, settingsPath=str(tmp_path / "settings.json"))
    assert [logic.models.defaultModel(m) for m in (None, "PT", "CT", "MR")] == [
        "pet-model", "pet-model", "ct-model", "pet-model"]
    params = logic.getParameterNode()
    assert params.GetParameter("Model") == "pet-model"
    assert not logic.preferModelForInput(params)  # no input yet
    ct = read_volume(REAL_CT / "ct_abdomen_3mm.nii.gz")
    nifti = add_ct_node(scene, ct, "CT (NIfTI)")
    params.SetNodeReferenceID("InputVolume", nifti.GetID())
    assert not logic.preferModelForInput(params) and params.GetParameter("Model") == "pet-model"  # states none
    params.SetParameter("Modality", "CT")  # the panel says it
    assert logic.preferModelForInput(params) and params.GetParameter("Model") == "ct-model"
    assert params.GetParameter("Method") == "" and params.GetParameter("OrganMarginMm") == "10"
    assert not logic.preferModelForInput(params)  # it fits now
    params.SetParameter("Modality", "auto")
    pet = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "PET")
    updateVolumeNodeFromVolume(pet, small_phantom)
    pet.SetAttribute("DICOM.Modality", "PT")
    params.SetNodeReferenceID("InputVolume", pet.GetID())
    assert logic.preferModelForInput(params) and params.GetParameter("Model") == "pet-model"
    params.SetParameter("Model", str(tiny_ct_checkpoint))  # the CT model's file chosen for a PET: the PET model
    assert logic.preferModelForInput(params) and params.GetParameter("Model") == "pet-model"
    assert logic.worker is None


# ---- refusals: one sentence, no worker, the scene unchanged ------------------------------------------
@pytest.fixture()
def fresh(tmp_path, tiny_ct_checkpoint, tiny_ct_classifier):
    """A scene of its own whose logic has never started a worker."""
    env = ct_scene(tmp_path, tiny_ct_checkpoint, tiny_ct_classifier)
    yield env
    env.logic.cleanup()


def assert_refused(env, words: str) -> str:
    """Apply is refused in one sentence containing ``words``; no worker started, every node as it was."""
    before, display = node_state(env.scene), display_state(env.node)
    with pytest.raises(ValueError) as info:
        env.logic.startRun(env.params)
    sentence = str(info.value)
    assert words in sentence and "\n" not in sentence, sentence
    assert DiffusionAnomaly.user_sentence(info.value) == sentence  # what the message box shows
    assert env.logic.worker is None and not env.logic.running
    assert node_state(env.scene) == before and display_state(env.node) == display
    return sentence


def test_without_an_organ_segmentation_a_ct_model_is_refused_up_front(fresh):
    fresh.params.SetNodeReferenceID("OrganSegmentation", None)
    sentence = assert_refused(fresh, "choose the organ segmentation of this CT in the Organs section")
    assert "kidney_left, kidney_right, pancreas" in sentence
    assert fresh.logic.organSummary(fresh.params) == sentence  # the Organs section says it before Apply
    fresh.params.SetParameter("OrganInclude", "pancreas")  # naming organs does not make a segmentation
    assert assert_refused(fresh, "choose the organ segmentation") == sentence


def test_a_pet_given_to_the_ct_model_is_refused(fresh, small_phantom):
    pet = fresh.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "phantom PET")
    updateVolumeNodeFromVolume(pet, small_phantom)
    pet.SetAttribute("DICOM.Modality", "PT")
    pet.SetAttribute("DiffusionAnomaly.Units", "SUVbw")
    pet.CreateDefaultDisplayNodes()
    fresh.params.SetNodeReferenceID("InputVolume", pet.GetID())
    fresh.node = pet
    assert_refused(fresh, "trained on CT but the input is PET")
    pet.RemoveAttribute("DICOM.Modality")  # a PET NIfTI that states nothing: its SUV values give it away
    pet.RemoveAttribute("DiffusionAnomaly.Units")
    assert_refused(fresh, "like a PET in SUV, not a CT in Hounsfield units")


def test_raw_stored_ct_values_are_refused(fresh):
    raw = fresh.ct.with_voxels(np.clip(np.asarray(fresh.ct.voxels, np.float32) + 1024.0, 0, None))
    node = add_ct_node(fresh.scene, raw, "abdomen CT (stored values)")
    fresh.params.SetNodeReferenceID("InputVolume", node.GetID())
    fresh.node = node
    assert_refused(fresh, "raw stored values without the DICOM rescale")
