"""CT post-processing (METHODS.md section 4) and the CT lesion table's HU columns, in every writer."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest

from DiffusionAnomalyLib.card import default_card
from DiffusionAnomalyLib.export import write_table_csv
from DiffusionAnomalyLib.measurements import CT_LESION_COLUMNS, LESION_COLUMNS, LESION_TABLE_COLUMNS, lesion_columns, lesion_table
from DiffusionAnomalyLib.postprocessing import Thresholding, segment, slice_axis
from DiffusionAnomalyLib.volume import Volume, ijk_to_ras_matrix

SHAPE = (16, 40, 40)  # k, j, i
#: A CT grid as the phantoms make it: 1.5 x 1.5 mm in-plane, 3 mm slices, LPS-consistent (i -> L, j -> P).
CT_MATRIX = ijk_to_ras_matrix((1.5, 1.5, 3.0), (120.0, 90.0, -40.0), np.diag([-1.0, -1.0, 1.0]))
#: A 1 mm isotropic grid (the thesis' grid).
MM_MATRIX = ijk_to_ras_matrix((1.0, 1.0, 1.0), (0.0, 0.0, 0.0))


def heat_of(mask: np.ndarray, matrix: np.ndarray = MM_MATRIX) -> Volume:
    return Volume(mask.astype(np.float32), matrix.copy(), units="anomaly")


def card_with(**threshold) -> dict:
    card = default_card()
    card["inference_defaults"]["threshold"] = {"method": "absolute", "value": 0.5, **threshold}
    card["inference_defaults"]["min_size_ml"] = 0.0
    return card


# ---- the chain, step by step ----------------------------------------------------------------------
def test_opening_removes_a_one_voxel_line_and_hole_filling_fills_a_cavity():
    mask = np.zeros(SHAPE, bool)
    mask[4:11, 5:12, 5:12] = True
    mask[7, 8, 8] = False  # a cavity
    mask[8, 20, 5:30] = True  # a separate line, one voxel thin
    th = Thresholding("absolute", 0.5, None)
    raw = th.apply(heat_of(mask))
    assert raw.max() == 2 and raw[7, 8, 8] == 0
    clean = Thresholding("absolute", 0.5, None, opening=True).apply(heat_of(mask))
    assert clean.max() == 1  # the line is gone
    assert not clean[8, 20].any()
    assert clean[7, 8, 8] == 1  # the cavity is filled
    assert clean[5:10, 6:11, 6:11].all()


def test_min_size_voxels_is_the_20_voxel_rule():
    mask = np.zeros(SHAPE, bool)
    mask[2, 2, 2:22] = True  # 20 voxels
    mask[10, 30, 2:21] = True  # 19 voxels
    labels = Thresholding("absolute", 0.5, None, min_size_voxels=20).apply(heat_of(mask))
    assert labels.max() == 1 and (labels == 1).sum() == 20 and labels[2, 2, 2] == 1
    assert Thresholding("absolute", 0.5, None, min_size_voxels=19).apply(heat_of(mask)).max() == 2
    # Both size rules apply: 20 voxels of 1 mm^3 are 0.02 ml.
    both = Thresholding("absolute", 0.5, 0.021, min_size_voxels=20).apply(heat_of(mask))
    assert both.max() == 0


def test_min_inplane_mm_drops_a_2_mm_wide_lesion_on_any_slice_axis():
    mask = np.zeros(SHAPE, bool)
    mask[2:14, 5:7, 5:7] = True  # 2 x 2 mm in-plane, 12 mm along S: dropped at 3 mm
    mask[2:4, 20:23, 20:23] = True  # 3 x 3 mm in-plane, 2 mm along S: kept (exactly at the minimum)
    labels = Thresholding("absolute", 0.5, None, min_inplane_mm=3.0).apply(heat_of(mask))
    assert labels.max() == 1 and labels[2, 20, 20] == 1
    assert Thresholding("absolute", 0.5, None).apply(heat_of(mask)).max() == 2
    # The same lesions on a grid stored with i along S (array axis 2 is the slice axis): same result.
    sagittal = ijk_to_ras_matrix((1.0, 1.0, 1.0), (0, 0, 0), np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]]))
    assert slice_axis(sagittal) == 2 and slice_axis(MM_MATRIX) == 0 and slice_axis(CT_MATRIX) == 0
    turned = np.ascontiguousarray(mask.transpose(2, 1, 0))  # [k, j, i] with i <- old k
    kept = Thresholding("absolute", 0.5, None, min_inplane_mm=3.0).apply(heat_of(turned, sagittal))
    assert kept.max() == 1 and kept[20, 20, 2] == 1
    # In millimetres of the grid: on the CT grid two voxels are 3 mm wide, so the thin lesion stays.
    assert Thresholding("absolute", 0.5, None, min_inplane_mm=3.0).apply(heat_of(mask, CT_MATRIX)).max() == 2
    assert Thresholding("absolute", 0.5, None, min_inplane_mm=3.1).apply(heat_of(mask, CT_MATRIX)).max() == 1


def test_chain_order_roi_then_morphology_then_sizes():
    """METHODS.md order: threshold, organ mask, opening, closing, hole filling, size in voxels, in-plane extent."""
    mask = np.zeros(SHAPE, bool)
    mask[3:12, 5:14, 5:14] = True  # 9 x 9 x 9 = 729 voxels
    mask[7, 9, 14:30] = True  # a thin spur joined to the cube: 745 voxels before opening
    roi = np.zeros(SHAPE, bool)
    roi[:, :, :12] = True  # the organ: cuts the cube at i = 12 and the whole spur
    heat = heat_of(mask)
    raw = Thresholding("absolute", 0.5, None).apply(heat)
    assert (raw == 1).sum() == 745
    # the size rule counts the voxels left by the organ mask and the morphology, not the raw component
    in_roi = int((mask & roi).sum())
    assert in_roi == 9 * 9 * 7
    opened = Thresholding("absolute", 0.5, None, opening=True).apply(heat, roi)
    after = int((opened == 1).sum())
    assert opened.max() == 1 and after == 483 < in_roi  # the box's edges are rounded off, the spur is gone
    assert not opened[:, :, 12:].any()  # never outside the organ
    assert Thresholding("absolute", 0.5, None, opening=True, min_size_voxels=after).apply(heat, roi).max() == 1
    assert Thresholding("absolute", 0.5, None, opening=True, min_size_voxels=after + 1).apply(heat, roi).max() == 0
    # the organ mask comes before the morphology: without it the opened cube is larger
    assert (Thresholding("absolute", 0.5, None, opening=True).apply(heat) == 1).sum() == 638


def test_otsu_inside_the_organ_ignores_a_hot_spot_outside():
    rng = np.random.default_rng(3)
    heat = rng.uniform(0.0, 0.1, SHAPE).astype(np.float32)
    heat[4:8, 10:16, 10:16] = 0.5  # the lesion inside the organ
    heat[10:14, 30:36, 30:36] = 5.0  # a much hotter spot outside it
    roi = np.zeros(SHAPE, bool)
    roi[:, :24, :24] = True
    labels = Thresholding("otsu", None, None, min_size_voxels=20).apply(Volume(heat, MM_MATRIX.copy()), roi)
    assert labels.max() == 1
    lesion = np.zeros(SHAPE, bool)
    lesion[4:8, 10:16, 10:16] = True
    np.testing.assert_array_equal(labels == 1, lesion)


# ---- Thresholding from the card ---------------------------------------------------------------
def test_card_keys_are_read_checked_and_recorded():
    card = card_with(opening=True, min_size_voxels=20, min_inplane_mm=3.0)
    th = Thresholding.from_card(card)
    assert (th.opening, th.min_size_voxels, th.min_inplane_mm) == (True, 20, 3.0)
    assert th.as_parameters() == {"threshold_method": "absolute", "threshold_value": 0.5, "min_size_ml": 0.0,
                                   "opening": True, "min_size_voxels": 20, "min_inplane_mm": 3.0}
    # another method's paper rule keeps the card's section 4 steps; an override wins
    other = Thresholding.for_method(card, "cdm")
    assert other.method == "otsu" and other.min_size_voxels == 20 and other.opening
    assert Thresholding.from_card(card, min_size_voxels=5).min_size_voxels == 5
    # a PET card has none of them: the record is what it was
    pet = Thresholding.from_card(default_card())
    assert not pet.chain and set(pet.as_parameters()) == {"threshold_method", "threshold_value", "min_size_ml"}


@pytest.mark.parametrize("key, value, words", [
    ("opening", 1, "opening must be true or false"),
    ("opening", "yes", "opening must be true or false"),
    ("min_size_voxels", -1, "min_size_voxels must be a whole number >= 0"),
    ("min_size_voxels", 2.5, "min_size_voxels must be a whole number"),
    ("min_size_voxels", True, "min_size_voxels must be a whole number"),
    ("min_inplane_mm", -3.0, "min_inplane_mm must be a finite number from 0 to 100"),
    ("min_inplane_mm", 500.0, "from 0 to 100"),
    ("min_inplane_mm", float("nan"), "finite number"),
])
def test_bad_card_values_are_refused_with_one_sentence(key, value, words):
    with pytest.raises(ValueError, match=words) as info:
        Thresholding.from_card(card_with(**{key: value}))
    text = str(info.value)
    assert "inference_defaults.threshold." + key in text and text.count(". ") == 0 and text.endswith(".")
    with pytest.raises(ValueError):
        Thresholding("absolute", 0.5, None, **{key: value}).check()


def test_segment_refuses_bad_chain_arguments():
    heat = heat_of(np.ones(SHAPE, bool))
    with pytest.raises(ValueError, match="true or false"):
        segment(heat, opening=1)
    with pytest.raises(ValueError, match="minimum in-plane"):
        segment(heat, min_inplane_mm=-1.0)


# ---- the CT lesion table ---------------------------------------------------------------------------
@pytest.fixture()
def ct_case():
    """A CT in HU (kidney ~30 HU, a lesion of known values), a heat map that marks the lesion."""
    hu = np.full(SHAPE, 30.0, np.float32)
    lesion = np.zeros(SHAPE, bool)
    lesion[5:9, 10:16, 12:20] = True  # 4 x 6 x 8 = 192 voxels
    values = np.linspace(-10.0, 20.0, int(lesion.sum()), dtype=np.float32)
    hu[lesion] = values
    ct = Volume(hu, CT_MATRIX.copy(), modality="CT", units="HU")
    heat = ct.with_voxels(lesion.astype(np.float32) * 0.8, units="anomaly")
    return ct, heat, lesion, values


def test_ct_lesion_table_has_hu_columns(ct_case):
    ct, heat, lesion, values = ct_case
    labels = segment(heat, method="absolute", value=0.5)
    rows = lesion_table(labels, ct, heat)
    assert len(rows) == 1
    row = rows[0]
    assert tuple(row) == tuple(c.name for c in CT_LESION_COLUMNS)
    assert row["hu_mean"] == pytest.approx(float(values.astype(np.float64).mean()), abs=1e-6)
    assert (row["hu_min"], row["hu_max"]) == (-10.0, 20.0)
    assert row["voxels"] == 192 and row["volume_ml"] == pytest.approx(192 * 1.5 * 1.5 * 3.0 / 1000.0)
    assert row["max_heat"] == pytest.approx(0.8)
    centre = ct.ijk_to_ras_points([[15.5, 12.5, 6.5]])[0]
    assert [row[k] for k in ("centroid_r", "centroid_a", "centroid_s")] == pytest.approx(list(centre))
    # units "HU" without a modality (a NIfTI) is CT too
    assert lesion_columns(None, "HU") is CT_LESION_COLUMNS and lesion_columns("PT", "SUVbw") is LESION_COLUMNS
    assert lesion_columns("ct") is CT_LESION_COLUMNS and lesion_columns() is LESION_COLUMNS
    titles = [c.title for c in CT_LESION_COLUMNS]
    assert "HU mean" in titles and not any(t.startswith("SUV") or t == "TLG" for t in titles)


def test_lesions_csv_header_follows_the_modality(ct_case, tmp_path):
    ct, heat, _, _ = ct_case
    rows = lesion_table(segment(heat, method="absolute", value=0.5), ct, heat)
    ct_header = ",".join(c.name for c in CT_LESION_COLUMNS)
    write_table_csv(rows, tmp_path / "rows.csv")  # from the rows alone
    assert (tmp_path / "rows.csv").read_text().splitlines()[0] == ct_header
    write_table_csv([], tmp_path / "empty.csv", modality="CT")  # no lesion: from the modality
    assert (tmp_path / "empty.csv").read_text().splitlines() == [ct_header]
    write_table_csv([], tmp_path / "pet.csv", modality="PT")
    assert (tmp_path / "pet.csv").read_text().splitlines() == [",".join(LESION_TABLE_COLUMNS)]
    with open(tmp_path / "rows.csv", newline="") as handle:
        back = next(csv.DictReader(handle))
    assert float(back["hu_min"]) == -10.0 and float(back["hu_max"]) == 20.0


def test_report_table_follows_the_modality(ct_case, tiny_card):
    import html

    from DiffusionAnomalyLib.pipeline import CaseResult
    from DiffusionAnomalyLib.report import lesion_table_html, report_html

    ct, heat, _, _ = ct_case
    case = CaseResult(volume=ct, heatmap=heat, counterfactual=None, card=tiny_card, parameters={},
                      thresholding=Thresholding("absolute", 0.5, None)).threshold()
    text = report_html(case)
    assert "<th>HU mean (HU)</th>" in text and "<th>HU min (HU)</th>" in text and "SUVmax" not in text
    assert "The mean attenuation over the candidate's voxels." in html.unescape(text)
    assert "SUVmax" in lesion_table_html([{c.name: 1 for c in LESION_COLUMNS}])


def test_slicer_table_columns_follow_the_modality(ct_case):
    slicer = pytest.importorskip("slicer")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("slicer-core (MRML) is not installed")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "DiffusionAnomaly"))
    from DiffusionAnomalyModuleLib.outputs import updateTable

    ct, heat, _, _ = ct_case
    rows = lesion_table(segment(heat, method="absolute", value=0.5), ct, heat)
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLTableNode")
    pet_row = {c: 1.0 for c in LESION_TABLE_COLUMNS}
    updateTable(node, [pet_row], "PT", "SUVbw")
    table = node.GetTable()
    assert [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())] == list(LESION_TABLE_COLUMNS)
    updateTable(node, rows, ct.modality, ct.units)  # the same node, re-used for a CT
    table = node.GetTable()
    assert [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())] == [c.name for c in CT_LESION_COLUMNS]
    assert node.GetColumnTitle("hu_mean") == "HU mean" and node.GetColumnUnitLabel("hu_max") == "HU"
    assert table.GetValueByName(0, "hu_min").ToDouble() == -10.0
