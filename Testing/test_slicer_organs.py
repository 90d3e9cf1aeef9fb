"""The Slicer module's Organs section against the real MRML library (slicer-core), with the tiny model.

Organ segmentations here are synthetic TotalSegmentator outputs (v2 ids and names) around the
phantom's lesions, on a CT-like grid of their own (other spacing, field of view and direction),
so the organs reach the PET input only by physical coordinates. TotalSegmentator itself is the
fake program of test_totalsegmentator.py, and the TotalSegmentator extension a stand-in module
shaped like the extension's logic (segment ID = TotalSegmentator name, display name = "standard"
name), since neither runs here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("slicer-core (MRML) is not installed", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "DiffusionAnomaly"))

import DiffusionAnomaly  # noqa: E402
from conftest import rotation  # noqa: E402
import test_totalsegmentator  # noqa: E402
from test_slicer_logic import pet_scene, reopened  # noqa: E402
from test_totalsegmentator import FAKE, _script  # noqa: E402

from DiffusionAnomalyLib import totalsegmentator as ts  # noqa: E402
from DiffusionAnomalyLib.roi import OrganLabels, OrganSelection, class_map, roi_mask  # noqa: E402
from DiffusionAnomalyLib.volume import Volume, ijk_to_ras_matrix, write_volume  # noqa: E402
from DiffusionAnomalyModuleLib import organs  # noqa: E402
from DiffusionAnomalyModuleLib.lesions import NOT_COVERED  # noqa: E402
from DiffusionAnomalyModuleLib.nodes import orientedImageFromLabels, updateVolumeNodeFromVolume, volumeFromNode  # noqa: E402

IDS = {name: i for i, name in class_map().items()}
BINARY = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()


# ---- synthetic organs -----------------------------------------------------------------------------
def ct_grid(pet: Volume, spacing=(5.0, 5.0, 6.0), shape_kji=(110, 70, 70), shift=(6.0, -9.0, 14.0),
            angle=6.0) -> Volume:
    """A CT-like grid around the PET's centre: its own spacing, field of view and (rotated) direction."""
    direction = rotation([0.0, 0.0, 1.0], angle) @ pet.direction_ras
    centre = pet.ijk_to_ras_points([[(n - 1) / 2 for n in pet.shape_ijk]])[0] + np.asarray(shift)
    origin = centre - direction @ (np.asarray(spacing) * (np.asarray(shape_kji[::-1]) - 1) / 2)
    return Volume(np.zeros(shape_kji, np.int16), ijk_to_ras_matrix(spacing, origin, direction), modality="CT",
                  units="HU")


def ras_of(grid: Volume) -> np.ndarray:
    k, j, i = grid.voxels.shape
    kk, jj, ii = np.meshgrid(np.arange(k), np.arange(j), np.arange(i), indexing="ij")
    return grid.ijk_to_ras_points(np.stack([ii.ravel(), jj.ravel(), kk.ravel()], 1)).reshape(k, j, i, 3)


def synthetic_organs(case, grid: Volume) -> OrganLabels:
    """Liver around the first lesion, urinary bladder around the second, brain well away from both (v2 ids)."""
    ras = ras_of(grid)
    first, second = (np.asarray(lesion["center_ras"]) for lesion in case.lesions[:2])
    labels = np.zeros(grid.voxels.shape, np.uint8)
    labels[np.linalg.norm(ras - first, axis=-1) < 45] = IDS["liver"]
    labels[np.linalg.norm(ras - second, axis=-1) < 30] = IDS["urinary_bladder"]
    top = grid.ijk_to_ras_points([[grid.shape_ijk[0] / 2, grid.shape_ijk[1] / 2, grid.shape_ijk[2] - 12]])[0]
    labels[np.linalg.norm(ras - top, axis=-1) < 35] = IDS["brain"]
    assert all((labels == IDS[n]).any() for n in ("liver", "urinary_bladder", "brain"))
    return OrganLabels(grid.with_voxels(labels, modality=None, units=None), class_map(), "synthetic organs")


def add_segment(node, segment_id: str, name: str, mask: np.ndarray, grid: Volume) -> None:
    """A segment as the TotalSegmentator extension adds it: ID and display name given, voxels on ``grid``."""
    segment = slicer.vtkSegment()
    segment.SetName(name)
    segment.AddRepresentation(BINARY, orientedImageFromLabels(mask.astype(np.uint8), grid.ijk_to_ras))
    assert node.GetSegmentation().AddSegment(segment, segment_id)


def extension_like_node(scene, labels: OrganLabels, name="TotalSegmentator (extension)"):
    """Segment IDs = TotalSegmentator names, display names = Slicer's "standard" names (some match, some do not)."""
    standard = {"liver": "Liver", "urinary_bladder": "Urinary bladder", "brain": "Encephalon"}
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    for organ in labels.present:
        add_segment(node, organ, standard[organ], labels.volume.voxels == IDS[organ], labels.volume)
    return node


def node_state(scene) -> dict:
    """Every node's ID, modification time, subject hierarchy parent, and its image data's time."""
    sh = scene.GetSubjectHierarchyNode()
    state = {}
    for n in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(n)
        if node.IsA("vtkMRMLSubjectHierarchyNode"):  # its items are compared as each node's parent
            continue
        image = node.GetImageData() if node.IsA("vtkMRMLVolumeNode") else None
        item = sh.GetItemByDataNode(node) if sh else 0
        state[node.GetID()] = (node.GetMTime(), sh.GetItemParent(item) if item else None,
                               image.GetMTime() if image is not None else None)
    return state


# ---- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_checkpoint, small_phantom_case):
    """A scene with the phantom PET, a CT-like volume of the same body, their organs; a logic with its own worker."""
    tmp = tmp_path_factory.mktemp("slicer-organs")
    pet = small_phantom_case.pet
    scene, logic, petNode, params = pet_scene(tmp, tiny_checkpoint, pet, "phantom PET")
    grid = ct_grid(pet)
    ctNode = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "phantom CT")
    updateVolumeNodeFromVolume(ctNode, grid.with_voxels(np.where(ras_of(grid)[..., 0] > 0, 40, -800).astype(np.int16)))
    ctNode.SetAttribute("DICOM.Modality", "CT")
    labels = synthetic_organs(small_phantom_case, grid)
    segNode = organs.importOrganLabels(scene, labels, "phantom CT organs", ctNode)
    yield types.SimpleNamespace(scene=scene, logic=logic, params=params, pet=pet, petNode=petNode, ctNode=ctNode,
                                grid=grid, labels=labels, segNode=segNode, tmp=tmp)
    logic.cleanup()


def choose_organs(params, segNode, include="", exclude="none", margin="0"):
    params.SetNodeReferenceID("OrganSegmentation", segNode.GetID() if segNode is not None else None)
    params.SetParameter("OrganInclude", include)
    params.SetParameter("OrganExclude", exclude)
    params.SetParameter("OrganMarginMm", margin)


# ---- reading segmentation nodes -------------------------------------------------------------------
def test_extension_segments_are_read_by_name_or_id(env):
    """The extension's segment ID is the TotalSegmentator name even where the display name is a 'standard' one;
    a segment whose name is the TotalSegmentator name counts whatever its ID (newer Slicer: random IDs)."""
    scene, labels = env.scene, env.labels
    node = extension_like_node(scene, labels)
    add_segment(node, "Segment_7", "my notes", labels.volume.voxels == IDS["liver"], labels.volume)  # not an organ
    renamed = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "random IDs")
    for organ in labels.present:
        add_segment(renamed, f"S_{IDS[organ]:04d}x", organ, labels.volume.voxels == IDS[organ], labels.volume)
    try:
        before = node_state(scene)
        for seg in (node, renamed, env.segNode):
            read = organs.organLabels(seg)
            assert read.present == labels.present == ("liver", "urinary_bladder", "brain")
            np.testing.assert_array_equal(read.on_grid(labels.volume).volume.voxels, labels.volume.voxels)
        assert organs.organLabels(node).ignored == ("my notes",)
        assert organs.organChoices(node)[-3:] == ["liver", "urinary_bladder", "brain"]
        assert node_state(scene) == before  # reading a segmentation changes nothing
    finally:
        scene.RemoveNode(node)
        scene.RemoveNode(renamed)


def test_organ_roi_on_the_input_grid_is_the_engines(env):
    """The module builds the ROI with the engine on the PET grid: the same voxels as roi.roi_mask from the labels."""
    rois = organs.OrganROIs()
    for include, exclude, margin in ((("liver",), (), 0.0), (("liver", "urinary_bladder"), ("urinary_bladder",), 10.0),
                                     ((), ("physiological-uptake",), 5.0)):
        selection = OrganSelection(include, exclude, margin)
        roi = rois.roi(env.segNode, selection, env.pet)
        expected = roi_mask(env.labels, include, exclude, margin, grid=env.pet).voxels != 0
        np.testing.assert_array_equal(roi.mask, expected)
        if include:
            np.testing.assert_array_equal(roi.region, roi_mask(env.labels, include, (), margin, grid=env.pet).voxels != 0)
            assert not np.any(roi.mask & ~roi.region)
        else:
            assert roi.region is None
        assert rois.roi(env.segNode, selection, env.pet) is roi  # kept while nothing changed
    assert rois.roi(None, OrganSelection(exclude=("brain",)), env.pet) is None  # no segmentation: whole volume


def test_card_default_exclusion_and_organ_parameters(env, tiny_card):
    """The card's default exclusion and margin fill the parameters; "none" switches the exclusion off."""
    from DiffusionAnomalyModuleLib import parameters

    scene = slicer.vtkMRMLScene()
    node = parameters.parameterNode(scene)
    card = {**tiny_card, "inference_defaults": {**tiny_card["inference_defaults"],
                                                "organ_exclude": ["physiological-uptake"], "organ_margin_mm": 5.0}}
    parameters.applyCardDefaults(node, card)
    assert node.GetParameter("OrganExclude") == "physiological-uptake" and node.GetParameter("OrganMarginMm") == "5"
    params = parameters.values(node)
    assert parameters.organSelection(params, card) == OrganSelection((), ("physiological-uptake",), 5.0)
    node.SetParameter("OrganExclude", "")  # empty: the card's default
    assert parameters.organSelection(parameters.values(node), card).exclude == ("physiological-uptake",)
    node.SetParameter("OrganExclude", "none")
    node.SetParameter("OrganInclude", "liver,kidneys")
    assert parameters.organSelection(parameters.values(node), card) == OrganSelection(("liver", "kidneys"), (), 5.0)
    parameters.applyCardDefaults(node, tiny_card)  # a card without an exclusion
    assert node.GetParameter("OrganExclude") == "none"


def test_organ_lists_offer_groups_present_organs_and_the_choice(env):
    logic, params = env.logic, env.params
    choose_organs(params, env.segNode, include="liver", exclude="physiological-uptake,spleen")
    try:
        offered, checked = logic.organChoiceState(params)
        assert offered[:5] == ["physiological-uptake", "kidneys", "urinary-tract", "bowel", "lungs"]
        assert offered[5:] == ["liver", "urinary_bladder", "brain", "spleen"]  # spleen: chosen, not in the segmentation
        assert checked == {"OrganInclude": ["liver"], "OrganExclude": ["physiological-uptake", "spleen"]}
        assert "3 structures on the input" in logic.organSummary(params)
    finally:
        choose_organs(params, None)


# ---- running with organs --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def organ_run(env):
    """Apply with the liver included (10 mm margin) and the bladder excluded: the worker gets the region."""
    choose_organs(env.params, env.segNode, include="liver,urinary_bladder", exclude="urinary_bladder", margin="10")
    t0 = time.monotonic()
    job = env.logic.runBlocking(env.params, timeout=600)
    return types.SimpleNamespace(job=job, seconds=time.monotonic() - t0)


def test_included_organs_are_the_only_region_the_network_computes(env, organ_run):
    job, logic, params = organ_run.job, env.logic, env.params
    assert job.status == "done" and job.workerCall and job.region is not None
    slices = job.modelSlices
    assert 0 < slices["computed"] < slices["total"]  # fewer model slices than the whole volume
    assert job.networkEvaluations % slices["computed"] == 0  # the same evaluations per computed slice
    case = logic.case
    roi = roi_mask(env.labels, ("liver", "urinary_bladder"), ("urinary_bladder",), 10.0, grid=env.pet).voxels != 0
    np.testing.assert_array_equal(case.roi, roi)
    assert len(case.table) >= 1 and not np.any((case.labels > 0) & ~roi)  # every lesion inside the ROI
    shown = slicer.util.arrayFromVolume(params.GetNodeReference("HeatMap"))
    assert not shown[~roi].any()  # the heat map is shown inside the ROI only ...
    np.testing.assert_allclose(shown[roi], case.heatmap.voxels[roi])
    assert case.heatmap.voxels[~roi].any()  # ... while the case keeps the whole computed map
    assert params.GetNodeReference("Segmentation").GetSegmentation().GetNumberOfSegments() == len(case.table)
    assert params.GetNodeReference("HeatMap").GetAttribute("DiffusionAnomaly.InsideROI") == "true"


def test_the_lesion_table_names_each_candidates_organ(env, organ_run):
    """With an organ segmentation the Slicer table's organ column and the liver reference come from it, as on the
    command line (measurements.lesion_table with the organ map on the input's grid)."""
    from DiffusionAnomalyLib.measurements import lesion_table

    case = env.logic.case
    assert case.organs is not None and case.table
    expected = lesion_table(case.labels, case.volume, case.heatmap, organs=env.labels)
    assert [r["organ"] for r in case.table] == [r["organ"] for r in expected]
    assert {r["organ"] for r in case.table} <= {"liver", "none"}  # lesions kept inside the liver ROI (+ margin)
    table = env.params.GetNodeReference("Table")
    assert [table.GetCellText(row, 1) for row in range(len(case.table))] == [r["organ"] for r in case.table]
    assert case.reference is not None and case.reference["organ"] == "liver" and case.reference["mean"] > 0


def test_an_organ_change_refilters_without_the_worker(env, organ_run, monkeypatch):
    """Include, exclude and margin changes inside the computed region: lesions, table, segmentation and shown heat
    map update from the cached map with no worker request and no network evaluation."""
    logic, params, scene = env.logic, env.params, env.scene
    total = logic.workerStats()["total_network_evaluations"]
    requests = []
    monkeypatch.setattr(logic.worker, "send", lambda request: requests.append(request) or 1 / 0)
    monkeypatch.setattr(logic.jobs, "submit", lambda *a, **k: requests.append(a) or 1 / 0)
    ids = sorted(node_state(scene))
    full = logic.case.heatmap.voxels.copy()
    for include, exclude, margin in (("liver", "none", "10"), ("liver", "none", "0"), ("liver,urinary_bladder", "none", "5")):
        choose_organs(params, env.segNode, include, exclude, margin)
        case = logic.updateLesions(params)
        roi = roi_mask(env.labels, include, None if exclude == "none" else exclude, float(margin),
                       grid=env.pet).voxels != 0
        np.testing.assert_array_equal(case.roi, roi)
        assert not np.any((case.labels > 0) & ~roi)
        table = params.GetNodeReference("Table")
        assert table.GetNumberOfRows() == len(case.table)
        assert params.GetNodeReference("Segmentation").GetSegmentation().GetNumberOfSegments() == len(case.table)
        shown = slicer.util.arrayFromVolume(params.GetNodeReference("HeatMap"))
        assert not shown[~roi].any() and np.allclose(shown[roi], full[roi])
        job = logic.runBlocking(params)  # Apply with the new choice: served from the cache as well
        assert not job.workerCall
    np.testing.assert_array_equal(logic.case.heatmap.voxels, full)
    assert requests == [] and sorted(node_state(scene)) == ids
    monkeypatch.undo()
    assert logic.workerStats()["total_network_evaluations"] == total


def test_organs_outside_the_computed_region_need_apply(env, organ_run):
    """Including an organ whose slices the last run did not compute: one sentence, nothing changes; Apply computes."""
    logic, params, scene = env.logic, env.params, env.scene
    choose_organs(params, env.segNode, include="brain", exclude="none", margin="0")
    before = node_state(scene)
    with pytest.raises(ValueError) as info:
        logic.updateLesions(params)
    assert str(info.value) == NOT_COVERED and node_state(scene) == before
    job = logic.runBlocking(params, timeout=600)
    assert job.workerCall and job.networkEvaluations > 0 and job.modelSlices["computed"] < job.modelSlices["total"]
    brain = roi_mask(env.labels, "brain", grid=env.pet).voxels != 0
    assert not np.any((logic.case.labels > 0) & ~brain)
    choose_organs(params, env.segNode, include="liver,urinary_bladder", exclude="urinary_bladder", margin="10")
    with pytest.raises(ValueError, match="press Apply"):  # the liver's slices are not in the brain's run
        logic.updateLesions(params)


def test_a_case_rebuilt_from_the_scene_covers_only_where_its_heat_map_was_shown(env, organ_run, tmp_path):
    """A logic that finds the case in the scene (another session, another input chosen meanwhile) knows its heat
    map node holds the map inside the old ROI only: widening the ROI asks for Apply instead of finding nothing."""
    logic2 = DiffusionAnomaly.DiffusionAnomalyLogic(env.scene, settingsPath=str(tmp_path / "s.json"))
    params2 = logic2.getParameterNode()
    # the ROI widened (the bladder too) before this logic first rebuilds the case from the scene
    choose_organs(params2, env.segNode, include="liver,urinary_bladder", exclude="none", margin="10")
    before = node_state(env.scene)
    with pytest.raises(ValueError, match="press Apply"):
        logic2.updateLesions(params2)
    assert node_state(env.scene) == before
    logic2.cleanup()


# ---- bad input ------------------------------------------------------------------------------------
def far_away(env):
    """The organs 2 m away from the input (another patient's frame of reference)."""
    shifted = env.labels.volume.ijk_to_ras.copy()
    shifted[:3, 3] += (0.0, 0.0, 2000.0)
    return OrganLabels(Volume(env.labels.volume.voxels, shifted), class_map(), "far")


def not_named(env):
    node = env.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my segments")
    add_segment(node, "Segment_1", "Segment_1", env.labels.volume.voxels == IDS["liver"], env.labels.volume)
    return node


@pytest.mark.parametrize("case, words", [
    ("no overlap", "does not overlap the input volume"),
    ("unknown organ", "unknown organ 'livr'; did you mean liver"),
    ("empty ROI", "the organ ROI is empty"),
    ("absent organ", "spleen is not in the organ segmentation 'phantom CT organs'"),
    ("not TotalSegmentator names", "none of the segments of the segmentation 'my segments' (Segment_1) is named"),
    ("no segmentation", "organs to include are chosen (liver) but no organ segmentation"),
    ("bad margin", "OrganMarginMm must be a number"),
    ("margin out of range", "must be a finite number from 0 to 100, got 150.0"),
])
def test_bad_organ_input_is_one_sentence_and_nothing_changes(env, organ_run, case, words):
    """Refused before any worker call, on Apply and on a quiet update alike; every node as it was."""
    scene, logic, params = env.scene, env.logic, env.params
    made = []
    if case == "no overlap":
        made.append(organs.importOrganLabels(scene, far_away(env), "far organs", env.ctNode))
        choose_organs(params, made[0], include="liver")
    elif case == "not TotalSegmentator names":
        made.append(not_named(env))
        choose_organs(params, made[0])
    else:
        settings = {"unknown organ": ("livr", "none", "0"), "empty ROI": ("liver", "liver", "0"),
                    "absent organ": ("spleen", "none", "0"), "no segmentation": ("liver", "none", "0"),
                    "bad margin": ("liver", "none", "ten"), "margin out of range": ("liver", "none", "150")}[case]
        choose_organs(params, None if case == "no segmentation" else env.segNode, *settings)
    worker = logic.worker
    evaluations = logic.workerStats()["total_network_evaluations"]
    before = node_state(scene)
    try:
        for action in (logic.startRun, logic.updateLesions):
            with pytest.raises(ValueError) as info:
                action(params)
            sentence = str(info.value)
            assert words in sentence and "\n" not in sentence, sentence
            assert DiffusionAnomaly.user_sentence(info.value) == sentence  # what the message box shows
        assert not logic.running and logic.worker is worker
        assert logic.workerStats()["total_network_evaluations"] == evaluations
        assert node_state(scene) == before
    finally:
        for node in made:
            scene.RemoveNode(node)
        choose_organs(params, env.segNode, include="liver,urinary_bladder", exclude="urinary_bladder", margin="10")


# ---- TotalSegmentator from the module -------------------------------------------------------------
#: the engine's runner with the fake TotalSegmentator program (liver = 5, kidney_left = 3 on the CT's grid)
fake_env = test_totalsegmentator.fake_env


@pytest.fixture()
def small_ct(env):
    """A small CT node (the fake writes its labels at fixed voxels), removed afterwards."""
    grid = ct_grid(env.pet, spacing=(20.0, 20.0, 30.0), shape_kji=(12, 16, 16), angle=0.0)
    node = env.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "small CT")
    noise = np.random.default_rng(0).normal(40, 200, size=grid.voxels.shape).clip(-1000, 2000)
    updateVolumeNodeFromVolume(node, grid.with_voxels(noise.astype(np.int16)))
    node.SetAttribute("DICOM.Modality", "CT")
    env.params.SetNodeReferenceID("OrganCT", node.GetID())
    before = env.params.GetNodeReferenceID("OrganSegmentation")
    yield node
    env.params.SetNodeReferenceID("OrganSegmentation", before)
    env.params.SetNodeReferenceID("OrganCT", None)
    env.scene.RemoveNode(node)


def test_totalsegmentator_makes_the_organ_segmentation_under_the_input(env, fake_env, small_ct, monkeypatch):
    scene, logic, params = env.scene, env.logic, env.params
    monkeypatch.setenv("FAKE_TS_PAUSE", "0.5")  # ten polls per part: progress seen from the UI thread, not by luck
    seen = []
    logic.organProgressCallback = lambda run: seen.append((run.fraction, run.message))
    params.SetParameter("OrganFast", "true")
    try:
        run = logic.runOrgansBlocking(params, timeout=120)
    finally:
        logic.organProgressCallback = None
        params.SetParameter("OrganFast", "false")
    assert run.status == "done" and not run.usesExtension, run.error
    node = run.node
    assert params.GetNodeReference("OrganSegmentation") is node and node.GetName() == "small CT organs"
    sh = scene.GetSubjectHierarchyNode()
    assert sh.GetItemParent(sh.GetItemByDataNode(node)) == sh.GetItemByDataNode(env.petNode)  # under the input
    labels = organs.organLabels(node)
    assert labels.present == ("kidney_left", "liver")
    assert "--fast" in json.loads((fake_env.parent / "record.json").read_text())["argv"]
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and seen[-1] == (1.0, "done")  # progress polled from the UI thread
    assert len({m for _, m in seen if m.startswith("TotalSegmentator: ")}) >= 2
    ct = volumeFromNode(small_ct)
    np.testing.assert_array_equal(labels.on_grid(ct).volume.voxels[1:3, 2:6, 2:6], IDS["liver"])  # [k, j, i]
    scene.RemoveNode(node)


@pytest.mark.parametrize("mode, words", [
    ("missing", "TotalSegmentator is not set up"),
    ("offline", "weights (task 297) are not in"),
    ("crash", "TotalSegmentator failed (exit code 1: KeyError: 'nnUNet_results')"),
    ("unknown ids", "holds ids 250 that TotalSegmentator's v2 'total' class map"),
    ("not a CT", "phantom PET is PET (PT), not a CT; choose the CT of the PET/CT pair"),
])
def test_totalsegmentator_missing_or_failing_is_one_sentence(env, fake_env, small_ct, monkeypatch, tmp_path, mode,
                                                              words):
    scene, logic, params = env.scene, env.logic, env.params
    if mode == "missing":
        monkeypatch.setenv(ts.ENV_VARIABLE, str(tmp_path / "no-such-env"))
    elif mode == "unknown ids":
        _script(fake_env / "bin" / "TotalSegmentator", FAKE.replace("= 5  # liver", "= 250  # no class"))
    elif mode == "not a CT":
        params.SetNodeReferenceID("OrganCT", env.petNode.GetID())
    else:
        monkeypatch.setenv("FAKE_TS_MODE", mode)
    before = node_state(scene)
    try:
        run = logic.runOrgansBlocking(params, timeout=120)
        assert run.status == "failed"
        sentence = run.error
    except ValueError as exc:  # refused before anything started
        assert mode in ("missing", "not a CT")
        sentence = DiffusionAnomaly.user_sentence(exc)
    assert words in sentence and "\n" not in sentence, sentence
    assert node_state(scene) == before and not logic.organRunning


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table in /proc")
def test_cancel_ends_totalsegmentators_tree_and_leaves_the_scene(env, fake_env, small_ct, monkeypatch, tmp_path):
    from DiffusionAnomalyLib.processes import process_watch

    scene, logic, params = env.scene, env.logic, env.params
    pids = tmp_path / "pids.json"
    monkeypatch.setenv("FAKE_TS_MODE", "sleep")
    monkeypatch.setenv("FAKE_TS_PIDS", str(pids))
    before = node_state(scene)
    run = logic.startOrganRun(params)
    deadline = time.monotonic() + 60
    while not pids.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
        logic.pollOrganRun(params)
    assert logic.organRunning and run.cancellable
    with pytest.raises(ValueError, match="TotalSegmentator is still segmenting"):
        logic.startRun(params)
    tree = json.loads(pids.read_text())
    t0 = time.monotonic()
    logic.cancelOrganRun()
    assert time.monotonic() - t0 < 20 and run.status == "cancelled"
    assert not any(process_watch(pid)() for pid in tree)  # the program and the child it started
    logic.pollOrganRun(params)
    assert run.node is None and node_state(scene) == before


class _FakeExtensionLogic:
    """Stands in for TotalSegmentator.TotalSegmentatorLogic: what DiffusionAnomaly calls and what it makes."""

    mode = "ok"

    def __init__(self):
        self.logCallback = None

    def setupPythonRequirements(self, upgrade=False):
        self.logCallback("TotalSegmentator Python package is up-to-date")

    def process(self, inputVolume, outputSegmentation, fast=True, cpu=False, task=None, subset=None,
                interactive=False, sequenceBrowserNode=None):
        assert (fast, cpu, task) == (False, True, "total")  # a bool: every release's third argument takes one
        self.logCallback("Processing started")
        if self.mode == "fail":
            raise subprocess.CalledProcessError(1, ["PythonSlicer", "TotalSegmentator"])
        # as its readSegmentation: the --ml file read with a colour table named after the class map (segment
        # IDs = TotalSegmentator names), then the standard terminology names shown
        grid = volumeFromNode(inputVolume)
        labels = np.zeros(grid.voxels.shape, np.uint8)
        labels[2:5, 3:7, 3:7] = IDS["liver"]
        labels[2:5, 3:7, 9:13] = IDS["lung_upper_lobe_left"]
        path = write_volume(grid.with_voxels(labels, modality=None, units=None), self.folder / "segmentation.nii")
        colors = slicer.vtkMRMLColorTableNode()
        colors.SetTypeToUser()
        colors.SetNumberOfColors(max(IDS.values()) + 1)
        for label, name in class_map().items():
            colors.SetColor(label, 0.5, 0.5, 0.5, 1.0)
            colors.SetColorName(label, name)
        outputSegmentation.GetScene().AddNode(colors)
        outputSegmentation.SetLabelmapConversionColorTableNodeID(colors.GetID())
        outputSegmentation.AddDefaultStorageNode()
        outputSegmentation.GetStorageNode().SetFileName(str(path))
        assert outputSegmentation.GetStorageNode().ReadData(outputSegmentation)
        outputSegmentation.GetScene().RemoveNode(colors)
        standard = {"liver": "Liver", "lung_upper_lobe_left": "Upper lobe of lung Left"}
        for segment_id, name in standard.items():
            outputSegmentation.GetSegmentation().GetSegment(segment_id).SetName(name)
        self.logCallback("Processing completed in 1.00 seconds")


@pytest.mark.parametrize("mode", ["ok", "fail"])
def test_the_totalsegmentator_extensions_logic_is_used_when_installed(env, small_ct, monkeypatch, tmp_path, mode):
    scene, logic, params = env.scene, env.logic, env.params
    module = types.ModuleType("TotalSegmentator")
    module.TotalSegmentatorLogic = type("TotalSegmentatorLogic", (_FakeExtensionLogic,),
                                        {"mode": mode, "folder": tmp_path})
    monkeypatch.setitem(sys.modules, "TotalSegmentator", module)
    monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(totalsegmentator=object()), raising=False)
    monkeypatch.setenv(ts.ENV_VARIABLE, "/no/such/environment")  # the engine's runner is not used
    params.SetParameter("Device", "cpu")
    lines = []
    logic.organProgressCallback = lambda run: lines.append(run.message)
    before = node_state(scene)
    try:
        run = logic.startOrganRun(params)
    finally:
        logic.organProgressCallback = None
    assert run.finished and run.usesExtension and not run.cancellable
    assert "TotalSegmentator extension: Processing started" in lines
    if mode == "fail":
        assert run.status == "failed" and run.error.startswith("the TotalSegmentator extension failed (Command")
        assert node_state(scene) == before
        return
    node = run.node
    assert params.GetNodeReference("OrganSegmentation") is node
    sh = scene.GetSubjectHierarchyNode()
    assert sh.GetItemParent(sh.GetItemByDataNode(node)) == sh.GetItemByDataNode(env.petNode)
    segmentation = node.GetSegmentation()
    assert sorted(segmentation.GetNthSegment(n).GetName() for n in range(2)) == ["Liver", "Upper lobe of lung Left"]
    assert organs.organLabels(node).present == ("liver", "lung_upper_lobe_left")
    scene.RemoveNode(node)


def test_organ_choice_and_source_survive_a_saved_scene(env, tmp_path):
    scene, params = env.scene, env.params
    choose_organs(params, env.segNode, include="liver", exclude="physiological-uptake", margin="7")
    p2, logic2 = reopened(scene, tmp_path)
    assert {k: v for k, v in logic2.parameters(p2).items() if k.startswith("Organ")} == \
        {"OrganInclude": "liver", "OrganExclude": "physiological-uptake", "OrganMarginMm": "7", "OrganFast": "false",
         "OrganSegmentation": env.segNode.GetID()}
    assert p2.GetNodeReference("OrganSegmentation").GetName() == env.segNode.GetName()
