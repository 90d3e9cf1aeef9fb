"""The lesion table (measurements.py): schema, MTV / TLG under both rules, organ column, totals, reference region.

Known-geometry synthetic volumes with exact expected values; anisotropic, oblique and differently stored
grids checked against brute-force RAS distances.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.spatial.distance import cdist

from conftest import rotation

from DiffusionAnomalyLib import measurements
from DiffusionAnomalyLib.measurements import (
    CENTROID_COLUMNS,
    CT_LESION_COLUMNS,
    DEFAULT_MTV_RULE,
    LESION_COLUMNS,
    LESION_TABLE_COLUMNS,
    MTV_MARGIN_MM,
    MTV_RULES,
    NO_ORGAN,
    REFERENCE_EROSION_MM,
    check_mtv_rule,
    definitions,
    lesion_columns,
    lesion_table,
    reference_region,
    totals,
)
from DiffusionAnomalyLib.roi import OrganLabels, class_map
from DiffusionAnomalyLib.volume import Volume, ijk_to_ras_matrix

ISO = ijk_to_ras_matrix((2.0, 2.0, 2.0), (-30.0, 12.0, -500.0))  # 2 mm voxels: 0.008 ml
ISO_ML = 0.008
NAMES = class_map()
IDS = {name: i for i, name in NAMES.items()}


def pet(voxels: np.ndarray, matrix: np.ndarray = ISO, units: str | None = "SUVbw") -> Volume:
    return Volume(np.asarray(voxels, dtype=np.float64), matrix.copy(), modality="PT", units=units)


def flat_heat(image: Volume) -> Volume:
    return image.with_voxels(np.ones(image.voxels.shape, np.float32), modality=None, units="|SUVbw difference|")


def organ_map(voxels: np.ndarray, matrix: np.ndarray) -> OrganLabels:
    return OrganLabels(Volume(voxels.astype(np.uint8), matrix.copy(), modality="SEG"), dict(NAMES), "test organs")


def ras_grid(image: Volume) -> np.ndarray:
    """(N, 3) RAS of every voxel centre, in [k, j, i] storage (ravel) order."""
    kji = np.argwhere(np.ones(image.voxels.shape, bool))
    return image.ijk_to_ras_points(kji[:, ::-1])


def brute_force_mtv(image: Volume, labels: np.ndarray, lab: int, rule: str = "41pct") -> np.ndarray:
    """The MTV mask of candidate ``lab`` from its definition, with RAS distances between voxel centres."""
    ras = ras_grid(image)
    ids = [int(i) for i in np.unique(labels[labels > 0])]
    dist = np.stack([cdist(ras, ras[labels.ravel() == i]).min(axis=1) for i in ids])
    own = dist[ids.index(lab)]
    other = np.delete(dist, ids.index(lab), axis=0).min(axis=0, initial=np.inf)
    region = (own <= MTV_MARGIN_MM + 1e-9) & (own < other - 1e-9)  # ties (equidistant voxels) go to neither
    img = image.voxels.astype(np.float64)
    seed = np.unravel_index(np.argmax(np.where(labels == lab, img, -np.inf)), img.shape)
    cut = 0.41 * img[seed] if rule == "41pct" else 2.5
    comp, _ = ndi.label(region.reshape(img.shape) & (img >= cut), np.ones((3, 3, 3)))
    return comp == comp[seed] if comp[seed] else np.zeros(img.shape, bool)


# ---- schema ----------------------------------------------------------------------------------
def test_schema_keys_order_and_types():
    assert LESION_TABLE_COLUMNS == ("id", "organ", "voxels", "volume_ml", "suv_max", "suv_mean", "suv_peak",
                                    "mtv_ml", "tlg", "max_heat", "centroid_r", "centroid_a", "centroid_s")
    assert tuple(c.name for c in CT_LESION_COLUMNS) == ("id", "organ", "voxels", "volume_ml", "hu_mean", "hu_min",
                                                        "hu_max", "max_heat", *CENTROID_COLUMNS)
    for schema in (LESION_COLUMNS, CT_LESION_COLUMNS):
        types = {c.name: (c.integer, c.text) for c in schema}
        assert types["id"] == types["voxels"] == (True, False) and types["organ"] == (False, True)
        assert all(not (c.integer and c.text) for c in schema)
        assert all(c.definition.endswith(".") and ". " not in c.definition for c in schema)  # one sentence each
    units = {c.name: c.unit for c in LESION_COLUMNS}
    assert units["volume_ml"] == units["mtv_ml"] == "ml" and units["suv_max"] == "SUVbw"
    assert units["tlg"] == "SUVbw·ml" and units["centroid_r"] == "mm" and units["id"] == ""
    assert {c.name: c.unit for c in CT_LESION_COLUMNS}["hu_mean"] == "HU"


def test_lesion_columns_carry_the_image_and_heat_units_and_the_rule():
    assert lesion_columns("PT", "SUVbw") is LESION_COLUMNS and lesion_columns() is LESION_COLUMNS
    assert lesion_columns("CT", "HU") is CT_LESION_COLUMNS and lesion_columns(None, "HU") is CT_LESION_COLUMNS
    pet_cols = {c.name: c for c in lesion_columns("PT", "SUVbw", heat_units="|SUVbw difference|")}
    assert pet_cols["max_heat"].heading == "Max. heat (|SUVbw difference|)"
    assert pet_cols["suv_max"].heading == "SUVmax (SUVbw)" and pet_cols["tlg"].heading == "TLG (SUVbw·ml)"
    # one set of arguments gives one tuple (Slicer, CSV and report share it)
    assert lesion_columns("PT", "SUVbw", heat_units="x") is lesion_columns("PT", "gml", heat_units="x")
    bq = {c.name: c for c in lesion_columns("PT", "BQML")}
    assert [bq[k].heading for k in ("suv_max", "suv_mean", "suv_peak", "tlg")] == [
        "Max. (BQML)", "Mean (BQML)", "Peak (BQML)", "Mean x MTV (BQML·ml)"]
    assert {c.name: c.title for c in lesion_columns("PT", "SUVlbm")}["suv_max"] == "SUVmax"
    ct_cols = {c.name: c for c in lesion_columns("CT", "HU", heat_units="|HU difference|")}
    assert ct_cols["max_heat"].unit == "|HU difference|" and ct_cols["hu_min"].heading == "HU min (HU)"
    default = {c.name: c for c in LESION_COLUMNS}["mtv_ml"].definition
    other = {c.name: c for c in lesion_columns("PT", "SUVbw", mtv_rule="suv2.5")}["mtv_ml"].definition
    assert "41 %" in default and "SUV 2.5" in other and f"{MTV_MARGIN_MM:g} mm" in other
    # rows alone pick their schema
    ct_row = {c.name: 1 for c in CT_LESION_COLUMNS}
    assert lesion_columns(rows=[ct_row]) is CT_LESION_COLUMNS
    assert lesion_columns(rows=[{k: 1 for k in LESION_TABLE_COLUMNS}]) is LESION_COLUMNS


def test_definitions_block():
    got = definitions(lesion_columns("PT", "SUVbw", heat_units="|SUVbw difference|"))
    assert [h for h, _ in got] == ["Lesion", "Organ", "Voxels", "Heat-map volume (ml)", "SUVmax (SUVbw)",
                                   "SUVmean (SUVbw)", "SUVpeak (SUVbw)", "MTV (ml)", "TLG (SUVbw·ml)",
                                   "Max. heat (|SUVbw difference|)", "R, A, S (mm)"]
    sentences = dict(got)
    assert sentences["MTV (ml)"].startswith("Metabolic tumour volume: voxels at or above 41 % of the candidate's "
                                            "SUVmax, connected (26 neighbours) to the candidate's SUVmax voxel")
    assert "1 ml sphere (radius 6.2 mm)" in sentences["SUVpeak (SUVbw)"]
    assert "R towards the patient's right" in sentences["R, A, S (mm)"]
    ct = definitions(CT_LESION_COLUMNS)
    assert [h for h, _ in ct][4:7] == ["HU mean (HU)", "HU min (HU)", "HU max (HU)"]
    # one owner of each sentence: the organ sentence is the same object in both schemas
    assert dict(ct)["Organ"] is sentences["Organ"]


def test_mtv_rules_and_their_refusals():
    assert set(MTV_RULES) == {"41pct", "suv2.5"} and DEFAULT_MTV_RULE == "41pct"
    assert all(s.endswith(".") and ". " not in s for s in MTV_RULES.values())
    for text, key in (("41pct", "41pct"), ("41 %", "41pct"), ("41%", "41pct"), ("SUV2.5", "suv2.5"),
                      (" suv 2.5 ", "suv2.5"), ("suv>=2.5", "suv2.5")):
        assert check_mtv_rule(text) == key
    for bad in ("42pct", "", "mean", 0.41, None, True, ["41pct"]):
        with pytest.raises(ValueError, match=r"^--mtv-rule must be 41pct \(.*\) or suv2\.5 \(.*\), got .*\.$"):
            check_mtv_rule(bad, "--mtv-rule")
    assert check_mtv_rule("suv2.5", units="SUVbw") == "suv2.5" and check_mtv_rule("41pct", units="BQML") == "41pct"
    with pytest.raises(ValueError, match=r"^--mtv-rule suv2\.5 needs a PET in SUV but the image is in BQML; "):
        check_mtv_rule("suv2.5", "--mtv-rule", units="BQML")
    image = pet(np.ones((8, 8, 8)))
    labels = np.zeros((8, 8, 8), np.int32)
    labels[3:5, 3:5, 3:5] = 1
    with pytest.raises(ValueError, match=r"^the MTV rule must be 41pct"):
        lesion_table(labels, image, flat_heat(image), mtv_rule="50pct")
    with pytest.raises(ValueError, match="the MTV rule must be"):
        lesion_columns("PT", "SUVbw", mtv_rule="suv3")
    bq = image.with_voxels(image.voxels, units="BQML")
    with pytest.raises(ValueError, match="suv2.5 needs a PET in SUV but the image is in BQML"):
        lesion_table(labels, bq, flat_heat(bq), mtv_rule="suv2.5")
    with pytest.raises(ValueError, match="organ map must be a TotalSegmentator segmentation"):
        lesion_table(labels, image, flat_heat(image), organs=np.zeros((8, 8, 8), np.uint8))


# ---- MTV and TLG on known geometry -----------------------------------------------------------
def test_uniform_lesion_exact_values():
    """A 6x6x6 lesion of SUV 8 in SUV 1: the candidate is the lesion; MTV = the lesion under both rules."""
    img = np.ones((24, 24, 24))
    img[8:14, 8:14, 8:14] = 8.0
    labels = np.zeros(img.shape, np.int32)
    labels[8:14, 8:14, 8:14] = 1
    image = pet(img)
    for rule in ("41pct", "suv2.5"):
        (row,) = lesion_table(labels, image, flat_heat(image), mtv_rule=rule)
        assert tuple(row) == LESION_TABLE_COLUMNS
        assert [type(v) for v in row.values()] == [int, str, int] + [float] * 10
        assert row["voxels"] == 216 and row["volume_ml"] == pytest.approx(216 * ISO_ML, rel=1e-12)
        assert row["suv_max"] == row["suv_mean"] == 8.0 and row["organ"] == NO_ORGAN
        assert row["mtv_ml"] == pytest.approx(216 * ISO_ML, rel=1e-12)
        assert row["tlg"] == pytest.approx(8.0 * 216 * ISO_ML, rel=1e-12)
        np.testing.assert_allclose([row[c] for c in CENTROID_COLUMNS], (ISO @ [10.5, 10.5, 10.5, 1.0])[:3])


def test_mtv_grows_from_a_small_candidate_to_the_whole_lesion():
    """The heat-map candidate is the lesion's 2x2x2 core; the MTV is the whole 6x6x6 lesion (4 mm away)."""
    img = np.ones((24, 24, 24))
    img[8:14, 8:14, 8:14] = 6.0
    img[10, 10, 10] = 10.0  # SUVmax: 41 % = 4.1, so the 6.0 lesion is in and the 1.0 background out
    labels = np.zeros(img.shape, np.int32)
    labels[10:12, 10:12, 10:12] = 1
    (row,) = lesion_table(labels, pet(img), flat_heat(pet(img)))
    assert row["voxels"] == 8 and row["volume_ml"] == pytest.approx(8 * ISO_ML)
    assert row["mtv_ml"] == pytest.approx(216 * ISO_ML, rel=1e-12)
    assert row["tlg"] == pytest.approx((215 * 6.0 + 10.0) * ISO_ML, rel=1e-12)
    assert row["suv_mean"] == pytest.approx((7 * 6.0 + 10.0) / 8)


def test_mtv_threshold_is_inclusive_and_26_connected():
    """41 % of SUVmax 10 is 4.1: a 4.1 voxel is in, a 4.0 voxel out; a corner-touching voxel is connected,
    a hot voxel behind a cold gap is not."""
    img = np.ones((20, 20, 20))
    labels = np.zeros(img.shape, np.int32)
    labels[10, 10, 10] = 1
    img[10, 10, 10] = 10.0
    img[10, 10, 11] = 0.41 * 10.0  # exactly the cut: in
    img[10, 10, 9] = 4.0  # just below: out
    img[11, 11, 11] = 5.0  # touches the SUVmax voxel at a corner only: in (26 neighbours)
    img[10, 10, 13] = 9.0  # 6 mm away but behind the 4.1 voxel and a 1.0 gap at i = 12: out
    (row,) = lesion_table(labels, pet(img), flat_heat(pet(img)))
    assert row["mtv_ml"] == pytest.approx(3 * ISO_ML, rel=1e-12)
    assert row["tlg"] == pytest.approx((10.0 + 4.1 + 5.0) * ISO_ML, rel=1e-12)
    (row,) = lesion_table(labels, pet(img), flat_heat(pet(img)), mtv_rule="suv2.5")
    assert row["mtv_ml"] == pytest.approx(4 * ISO_ML, rel=1e-12)  # 4.0 >= 2.5 as well


def test_mtv_margin_is_a_sphere_in_millimetres_on_anisotropic_and_oblique_grids():
    """A single-voxel candidate in uniform uptake: the MTV is every voxel within MTV_MARGIN_MM of it."""
    shape = (15, 21, 25)
    for matrix in (ijk_to_ras_matrix((1.5, 2.0, 4.0), (3.0, -8.0, 40.0)),
                   ijk_to_ras_matrix((1.2, 2.6, 3.3), (3.0, -8.0, 40.0), rotation((1.0, -2.0, 0.5), 50))):
        image = pet(np.full(shape, 5.0), matrix)
        labels = np.zeros(shape, np.int32)
        labels[7, 10, 12] = 1
        ras = ras_grid(image)
        expected = int((np.linalg.norm(ras - ras[np.ravel_multi_index((7, 10, 12), shape)], axis=1)
                        <= MTV_MARGIN_MM + 1e-9).sum())
        voxel_ml = abs(np.linalg.det(matrix[:3, :3])) / 1000
        # the whole sphere is inside the volume: its voxels hold about its 4.19 ml
        assert expected * voxel_ml == pytest.approx(4 / 3 * np.pi * MTV_MARGIN_MM ** 3 / 1000, rel=0.1)
        (row,) = lesion_table(labels, image, flat_heat(image))
        assert row["mtv_ml"] == pytest.approx(expected * voxel_ml, rel=1e-12)
        assert row["tlg"] == pytest.approx(5.0 * expected * voxel_ml, rel=1e-12)


def test_two_candidates_split_the_uptake_between_them():
    """Two candidates 7 voxels (14 mm) apart in uniform uptake: each keeps the voxels nearer to it, no
    voxel counts twice, and each MTV is the brute-force one."""
    shape = (16, 16, 26)
    img = np.full(shape, 3.0)  # above 41 % of both SUVmax
    img[8, 8, 9] = 5.0
    img[8, 8, 16] = 7.0
    image = pet(img)
    labels = np.zeros(shape, np.int32)
    labels[8, 8, 9] = 2
    labels[8, 8, 16] = 1
    rows = lesion_table(labels, image, flat_heat(image))
    union = np.zeros(shape, bool)
    for row in rows:
        mask = brute_force_mtv(image, labels, row["id"])
        assert not (union & mask).any()
        union |= mask
        assert row["mtv_ml"] == pytest.approx(mask.sum() * ISO_ML, rel=1e-12)
        assert row["tlg"] == pytest.approx(img[mask].sum() * ISO_ML, rel=1e-12)
    ras = ras_grid(image)
    near = cdist(ras, ras[labels.ravel() > 0]).min(axis=1) <= MTV_MARGIN_MM + 1e-9
    assert union.sum() == near.sum()  # both balls, once (an odd distance apart: no voxel is equidistant)
    total = dict((label, value) for label, value, _ in totals(rows, "PT", "SUVbw"))
    assert total["Total MTV"] == pytest.approx(near.sum() * ISO_ML, rel=1e-12)
    # 8 voxels apart: the plane i = 13 is 8 mm from both (29 voxels within 10 mm), so it belongs to neither
    labels[8, 8, 16], labels[8, 8, 17] = 0, 1
    img[8, 8, 16], img[8, 8, 17] = 3.0, 7.0
    rows = lesion_table(labels, image.with_voxels(img), flat_heat(image))
    masks = [brute_force_mtv(image.with_voxels(img), labels, row["id"]) for row in rows]
    plane = cdist(ras, ras[labels.ravel() > 0]).min(axis=1).reshape(shape)[:, :, 13] <= MTV_MARGIN_MM
    assert plane.sum() == 29 and not any(m[:, :, 13].any() for m in masks)
    for row, mask in zip(rows, masks):
        assert row["mtv_ml"] == pytest.approx(mask.sum() * ISO_ML, rel=1e-12)


def test_candidate_touching_physiological_uptake():
    """A liver lesion (SUV 8) against the bladder (SUV 20): the 41 % region runs into the bladder but stops at
    MTV_MARGIN_MM (5 voxel layers of 2 mm); SUVmax stays the candidate's; the organ is the liver."""
    shape = (30, 30, 30)
    img = np.ones(shape)
    img[10:16, 10:16, 10:16] = 8.0
    img[10:16, 10:16, 16:30] = 20.0
    labels = np.zeros(shape, np.int32)
    labels[10:16, 10:16, 10:16] = 1
    organs = np.zeros(shape, np.uint8)
    organs[5:25, 5:25, 3:16] = IDS["liver"]
    organs[8:18, 8:18, 16:30] = IDS["urinary_bladder"]
    image = pet(img)
    for rule in ("41pct", "suv2.5"):
        (row,) = lesion_table(labels, image, flat_heat(image), organs=organ_map(organs, ISO), mtv_rule=rule)
        assert row["organ"] == "liver" and row["suv_max"] == 8.0
        assert row["mtv_ml"] == pytest.approx((216 + 5 * 36) * ISO_ML, rel=1e-12)
        assert row["tlg"] == pytest.approx((216 * 8.0 + 5 * 36 * 20.0) * ISO_ML, rel=1e-12)
    assert MTV_MARGIN_MM == 10.0  # the 5 layers above


def test_empty_mtv_when_the_suvmax_voxel_is_below_the_cut():
    img = np.ones((12, 12, 12))
    img[5:7, 5:7, 5:7] = 2.0
    labels = (img > 1).astype(np.int32)
    image = pet(img)
    (row,) = lesion_table(labels, image, flat_heat(image), mtv_rule="suv2.5")
    assert row["mtv_ml"] == 0.0 and row["tlg"] == 0.0 and row["suv_max"] == 2.0
    (row,) = lesion_table(labels, image, flat_heat(image))  # 41 % of 2.0: the candidate and the SUV 1 around it
    assert row["mtv_ml"] > 8 * ISO_ML
    negative = image.with_voxels(-img, modality=None, units=None)
    (row,) = lesion_table(labels, negative, flat_heat(negative))
    assert row["mtv_ml"] == 0.0 and row["tlg"] == 0.0
    # no uptake at all (a candidate in the air around the body): 41 % of 0 would take every voxel within the margin
    air = image.with_voxels(np.zeros_like(img))
    (row,) = lesion_table(labels, air, flat_heat(image))
    assert row["mtv_ml"] == 0.0 and row["tlg"] == 0.0 and row["suv_max"] == 0.0


def test_random_tables_match_brute_force_on_oblique_grids():
    """Random blobs, anisotropic oblique grid, several candidates: MTV and TLG equal the definition."""
    rng = np.random.default_rng(4)
    shape = (14, 17, 16)
    matrix = ijk_to_ras_matrix((2.3, 1.7, 3.1), (12.5, -40.0, 7.25), rotation((0.3, 1.0, -0.7), 65))
    field = ndi.gaussian_filter(rng.standard_normal(shape), 1.5)
    img = 1.0 + 6.0 * np.clip(field / field.max(), 0, None) + rng.uniform(0, 0.3, shape)
    labels, n = ndi.label(field > np.quantile(field, 0.93))
    assert n >= 3
    image = pet(img, matrix)
    for rule in ("41pct", "suv2.5"):
        rows = lesion_table(labels, image, flat_heat(image), mtv_rule=rule)
        voxel_ml = abs(np.linalg.det(matrix[:3, :3])) / 1000
        for row in rows:
            mask = brute_force_mtv(image, labels, row["id"], rule)
            assert row["mtv_ml"] == pytest.approx(mask.sum() * voxel_ml, rel=1e-12)
            assert row["tlg"] == pytest.approx(img[mask].sum() * voxel_ml, rel=1e-12)
        assert rows == lesion_table(labels, image, flat_heat(image), mtv_rule=rule)  # deterministic


def test_same_table_whatever_the_storage_order():
    """The case stored with its i and k axes reversed (LPS-like order): identical rows, organ map on either grid."""
    shape = (18, 20, 22)
    img = np.ones(shape)
    img[4:9, 5:10, 6:12] = 6.0
    img[6, 7, 8] = 9.0
    img[12:15, 12:16, 14:18] = 4.0
    labels = np.zeros(shape, np.int32)
    labels[5:8, 6:9, 7:11] = 1
    labels[12:15, 12:16, 14:18] = 2
    organs = np.zeros(shape, np.uint8)
    organs[:, :, :11] = IDS["liver"]
    organs[:, :, 11:] = IDS["spleen"]
    matrix = ijk_to_ras_matrix((2.0, 2.5, 3.0), (10.0, 20.0, 30.0), rotation((0.0, 0.0, 1.0), 30))
    flipped = matrix.copy()
    flipped[:3, 0] *= -1
    flipped[:3, 2] *= -1
    flipped[:3, 3] = (matrix @ [shape[2] - 1, 0, shape[0] - 1, 1])[:3]
    image, other = pet(img, matrix), pet(img[::-1, :, ::-1], flipped)
    rows = lesion_table(labels, image, flat_heat(image), organs=organ_map(organs, matrix))
    for organ_grid in (organ_map(organs, matrix), organ_map(organs[::-1, :, ::-1], flipped)):
        again = lesion_table(labels[::-1, :, ::-1], other, flat_heat(other), organs=organ_grid)
        assert [r["organ"] for r in again] == ["liver", "spleen"]
        for a, b in zip(rows, again):
            assert a.keys() == b.keys()
            for key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-9), key


# ---- organ column ----------------------------------------------------------------------------
def test_organ_column_from_a_map_on_another_grid():
    """PET on 4 mm voxels; the organ map on 2 mm voxels stored in reversed i order, covering only part of the
    PET: a candidate mostly in the liver, one mostly in the spleen, one outside the map, one on a tie."""
    pet_matrix = ijk_to_ras_matrix((4.0, 4.0, 4.0), (0.0, 0.0, 0.0))
    shape = (10, 10, 20)  # k, j, i: x from 0 to 76 mm
    image = pet(np.ones(shape), pet_matrix)
    # organ grid: 2 mm, x from 60 down to 0 mm (i reversed), y and z 0..38 mm: PET centres land on its centres
    o_shape = (20, 20, 31)
    o_matrix = ijk_to_ras_matrix((2.0, 2.0, 2.0), (60.0, 0.0, 0.0), np.diag([-1.0, 1.0, 1.0]))
    x = 60.0 - 2.0 * np.arange(o_shape[2])
    o_vox = np.zeros(o_shape, np.uint8)
    o_vox[:, :, x < 30] = IDS["liver"]
    o_vox[:, :, (x >= 30) & (x <= 60)] = IDS["spleen"]
    labels = np.zeros(shape, np.int32)
    labels[2:4, 2:4, 5:9] = 1  # x 20..32: 3 columns liver (20, 24, 28), 1 spleen (32)
    labels[5:7, 5:7, 10:13] = 2  # x 40..48: spleen
    labels[2:4, 6:8, 17:20] = 3  # x 68..76: outside the map
    labels[7:9, 1:3, 14:18] = 4  # x 56..68: 56, 60 spleen, 64, 68 none: a tie goes to "none"
    rows = lesion_table(labels, image, flat_heat(image), organs=organ_map(o_vox, o_matrix))
    assert [r["organ"] for r in rows] == ["liver", "spleen", NO_ORGAN, NO_ORGAN]
    assert [r["organ"] for r in lesion_table(labels, image, flat_heat(image))] == [NO_ORGAN] * 4
    labels[7:9, 1:3, 13] = 4  # one more spleen column (x 52): spleen wins
    assert lesion_table(labels, image, flat_heat(image), organs=organ_map(o_vox, o_matrix))[3]["organ"] == "spleen"


# ---- CT --------------------------------------------------------------------------------------
def test_ct_rows_exact():
    shape = (16, 16, 16)
    hu = np.full(shape, 40.0, np.float32)
    hu[4:8, 4:8, 4:8] = 10.0
    hu[5, 5, 5] = -20.0
    hu[4, 4, 4] = 55.0
    labels = np.zeros(shape, np.int32)
    labels[4:8, 4:8, 4:8] = 1
    organs = np.zeros(shape, np.uint8)
    organs[2:12, 2:12, 2:12] = IDS["kidney_left"]
    ct = Volume(hu, ISO.copy(), modality="CT", units="HU")
    heat = ct.with_voxels(np.where(labels > 0, 30.0, 0.0).astype(np.float32), modality=None, units="|HU difference|")
    for rule in ("41pct", "suv2.5"):  # the MTV rule has no say on CT
        (row,) = lesion_table(labels, ct, heat, organs=organ_map(organs, ISO), mtv_rule=rule)
        assert tuple(row) == tuple(c.name for c in CT_LESION_COLUMNS)
        assert row["organ"] == "kidney_left" and row["voxels"] == 64
        assert row["hu_mean"] == pytest.approx((62 * 10.0 - 20.0 + 55.0) / 64, rel=1e-12)
        assert row["hu_min"] == -20.0 and row["hu_max"] == 55.0 and row["max_heat"] == 30.0
    assert totals([row], "CT", "HU") == [("Candidates", 1, ""), ("Total heat-map volume", row["volume_ml"], "ml")]
    assert row["volume_ml"] == pytest.approx(64 * ISO_ML, rel=1e-12)
    assert reference_region(ct, organ_map(organs, ISO)) is None
    with pytest.raises(ValueError, match="the MTV rule must be"):
        lesion_table(labels, ct, heat, mtv_rule="half")


# ---- totals ----------------------------------------------------------------------------------
def test_totals():
    rows = [{"volume_ml": 1.5, "mtv_ml": 2.0, "tlg": 10.0}, {"volume_ml": 0.5, "mtv_ml": 0.25, "tlg": 1.0}]
    rows = [{**{k: 0 for k in LESION_TABLE_COLUMNS}, **r} for r in rows]
    assert totals(rows, "PT", "SUVbw") == [("Candidates", 2, ""), ("Total heat-map volume", 2.0, "ml"),
                                           ("Total MTV", 2.25, "ml"), ("Total TLG", 11.0, "SUVbw·ml")]
    assert totals(rows) == totals(rows, "PT", "SUVbw")
    assert totals(rows, "PT", "BQML")[3] == ("Total mean x MTV", 11.0, "BQML·ml")
    assert totals([], "PT", "SUVbw") == [("Candidates", 0, ""), ("Total heat-map volume", 0.0, "ml"),
                                         ("Total MTV", 0.0, "ml"), ("Total TLG", 0.0, "SUVbw·ml")]
    assert totals([], "CT", "HU") == [("Candidates", 0, ""), ("Total heat-map volume", 0.0, "ml")]


# ---- reference region ------------------------------------------------------------------------
def liver_case(matrix: np.ndarray):
    shape = (30, 30, 30)
    k, j, i = np.indices(shape)
    img = 2.0 + 0.01 * i + 0.002 * j * k
    organs = np.zeros(shape, np.uint8)
    organs[5:25, 5:25, 5:25] = IDS["liver"]
    organs[0:5, 0:5, 0:5] = IDS["spleen"]
    return pet(img, matrix), organ_map(organs, matrix), img


def test_reference_region_exact_on_an_isotropic_grid():
    """20^3 liver of 2 mm voxels: a voxel d layers inside is (d + 1) x 2 mm from the edge, so > 10 mm keeps
    layers 5..14, a 10^3 core; a candidate in it takes every voxel within 10 mm of it too."""
    image, organs, img = liver_case(ISO)
    ref = reference_region(image, organs)
    core = img[10:20, 10:20, 10:20]
    assert ref["organ"] == "liver" and ref["label"] == "Liver SUVmean" and ref["units"] == "SUVbw"
    assert ref["voxels"] == 1000 and ref["volume_ml"] == pytest.approx(1000 * ISO_ML)
    assert ref["mean"] == pytest.approx(core.mean(), rel=1e-12) and ref["sd"] == pytest.approx(core.std(), rel=1e-9)
    assert ref["erosion_mm"] == REFERENCE_EROSION_MM == 10.0 and "10 mm" in ref["definition"]
    labels = np.zeros(img.shape, np.int32)
    labels[15, 15, 15] = 1
    labels[1, 1, 1] = 2  # far outside the liver: no effect
    with_candidate = reference_region(image, organs, labels)
    kji = np.indices(img.shape).reshape(3, -1).T
    keep = np.zeros(img.shape, bool)
    keep[10:20, 10:20, 10:20] = True
    keep &= (np.linalg.norm((kji - [15, 15, 15]) * 2.0, axis=1) > 10.0).reshape(img.shape)
    assert with_candidate["voxels"] == keep.sum() < 1000
    assert with_candidate["mean"] == pytest.approx(img[keep].mean(), rel=1e-12)


def test_reference_region_on_an_anisotropic_oblique_grid():
    """5 mm slices: (d + 1) x 5 > 10 keeps slice layers 2..17 (16), in-plane 2 mm layers 5..14 (10 x 10)."""
    matrix = ijk_to_ras_matrix((2.0, 2.0, 5.0), (1.0, 2.0, 3.0), rotation((1.0, 0.4, -0.2), 35))
    image, organs, img = liver_case(matrix)
    ref = reference_region(image, organs)
    assert ref["voxels"] == 1600
    assert ref["mean"] == pytest.approx(img[7:23, 10:20, 10:20].mean(), rel=1e-12)
    assert ref["volume_ml"] == pytest.approx(1600 * 0.02)


def test_reference_region_absent():
    image, organs, img = liver_case(ISO)
    assert reference_region(image, None) is None
    no_liver = organ_map(np.where(organs.volume.voxels == IDS["liver"], IDS["spleen"], 0), ISO)
    assert reference_region(image, no_liver) is None
    small = np.zeros(img.shape, np.uint8)
    small[10:19, 10:19, 10:19] = IDS["liver"]  # 18 mm across: nothing is more than 10 mm inside
    assert reference_region(image, organ_map(small, ISO)) is None
    bq = reference_region(image.with_voxels(image.voxels, units="BQML"), organs)
    assert bq["label"] == "Liver mean" and bq["units"] == "BQML"
    with pytest.raises(ValueError, match="organ map must be"):
        reference_region(image, organs.volume)


# ---- speed -----------------------------------------------------------------------------------
def test_demo_sized_table_is_fast():
    """A 128 x 128 x 200 PET with 5 lesions (the demo's size): the table, with organs, well under 0.2 s."""
    rng = np.random.default_rng(0)
    shape = (200, 128, 128)
    img = rng.gamma(4.0, 0.4, size=shape).astype(np.float32)
    labels = np.zeros(shape, np.int32)
    kji = np.indices((13, 13, 13)) - 6
    ball = (kji ** 2).sum(axis=0) <= 36
    for n, (k, j, i) in enumerate([(30, 40, 40), (80, 90, 60), (120, 64, 64), (150, 30, 100), (180, 100, 20)], 1):
        sl = (slice(k - 6, k + 7), slice(j - 6, j + 7), slice(i - 6, i + 7))
        img[sl][ball] += 4.0 + n
        labels[sl][ball] = n
    organs = np.zeros(shape, np.uint8)
    organs[60:140, 30:100, 30:100] = IDS["liver"]
    matrix = ijk_to_ras_matrix((4.0, 4.0, 4.0), (0.0, 0.0, 0.0))
    image = Volume(img, matrix, modality="PT", units="SUVbw")
    heat = image.with_voxels(labels.astype(np.float32), units="|SUVbw difference|")
    organ_labels = organ_map(organs, matrix)
    best = np.inf
    for _ in range(3):
        t0 = time.perf_counter()
        rows = lesion_table(labels, image, heat, organs=organ_labels)
        best = min(best, time.perf_counter() - t0)
    assert len(rows) == 5 and rows[2]["organ"] == "liver"
    assert best < 0.2, f"lesion_table took {best:.3f} s"


def test_module_constants_are_the_documented_ones():
    assert measurements.SUV_PEAK_RADIUS_MM == pytest.approx(6.2035, abs=1e-4)
    assert measurements.REFERENCE_ORGAN == "liver"


def test_readme_definitions_are_the_schemas():
    """The README's definitions block is the schema's own sentences (one owner: measurements.py), PET and CT."""
    from pathlib import Path

    from DiffusionAnomalyLib.measurements import REFERENCE_DEFINITION, definitions, lesion_columns

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    for modality, units, heat in (("PT", "SUVbw", "|SUVbw difference|"), ("CT", "HU", "|HU difference|")):
        for heading, sentence in definitions(lesion_columns(modality, units, heat_units=heat)):
            assert f"- **{heading}**: {sentence}" in readme, heading
    assert REFERENCE_DEFINITION in readme
