"""Organ masks from TotalSegmentator (DiffusionAnomalyLib.roi), on the real CT / TotalSegmentator pairs.

The three output forms (multi-label NIfTI, per-structure folder, Slicer .seg.nrrd) are built
from the real multi-label file and must give the same labels; labels carried onto other grids
(axis order, flips, oblique PET-like grids of another spacing and extent) must land on the
right anatomy (soft-tissue HU inside liver, spleen, kidneys) and keep organ volumes in ml.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from scipy import ndimage as ndi
from scipy import spatial

from DiffusionAnomalyLib import roi
from DiffusionAnomalyLib.volume import Volume, VolumeError, ijk_to_ras_matrix, lps_ras_flip, read_volume, write_volume

from conftest import REAL_CT, needs_real_ct

pytestmark = needs_real_ct

ABDOMEN_ORGANS = ("liver", "spleen", "kidney_left", "kidney_right")
#: soft tissue in HU: this non-contrast 3 mm CT has kidneys at ~13 HU, the contrast DICOM series liver/spleen at ~80-90
SOFT_TISSUE_HU = (0.0, 150.0)
#: organs large enough for a volume check after nearest-neighbour resampling, and the tolerance
VOLUME_ORGANS, VOLUME_TOLERANCE = ("liver", "spleen", "kidney_left", "kidney_right"), 0.05


# =============================================================================================
# fixtures and helpers
# =============================================================================================
@pytest.fixture(scope="module")
def ct() -> Volume:
    return read_volume(REAL_CT / "ct_abdomen_3mm.nii.gz", modality="CT")


@pytest.fixture(scope="module")
def labels() -> roi.OrganLabels:
    return roi.read_organ_labels(REAL_CT / "ct_abdomen_3mm_totalseg.nii.gz")


@pytest.fixture(scope="module")
def ct_dicom() -> Volume:
    return read_volume(REAL_CT / "ct_dicom", modality="CT")  # the series says CT itself; the declaration agrees


@pytest.fixture(scope="module")
def dicom_labels() -> roi.OrganLabels:
    return roi.read_organ_labels(REAL_CT / "ct_dicom_totalseg.nii.gz")


def same_space_reordered(volume: Volume, order=(2, 0, 1), flip=(True, False, True)) -> Volume:
    """The same voxels in the same physical space, with another axis order and flipped axes (no interpolation)."""
    image = sitk.Flip(sitk.PermuteAxes(volume.to_sitk(), list(order)), list(flip))
    return Volume.from_sitk(image, modality=volume.modality, units=volume.units)


def rotation(axis, angle_deg: float) -> np.ndarray:
    a = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    t = np.radians(angle_deg)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def pet_grid(around: Volume, spacing, extent_mm, *, centre_shift_mm=(0.0, 0.0, 0.0), direction=None) -> Volume:
    """An empty PET-like grid of ``spacing`` covering ``extent_mm`` around the centre of ``around`` (plus a shift)."""
    direction = np.eye(3) if direction is None else np.asarray(direction)
    shape = np.ceil(np.asarray(extent_mm, float) / spacing).astype(int)
    centre = around.ijk_to_ras_points((np.array(around.shape_ijk) - 1) / 2.0)[0] + centre_shift_mm
    origin = centre - direction @ ((shape - 1) / 2.0 * np.asarray(spacing, float))
    return Volume(np.zeros(shape[::-1], np.float32), ijk_to_ras_matrix(spacing, origin, direction))


def mean_hu(ct: Volume, mask: np.ndarray) -> float:
    return float(ct.voxels[mask].astype(np.float64).mean())


# =============================================================================================
# class map
# =============================================================================================
def test_shipped_class_map_is_totalsegmentators_v2_total_table():
    table = {}
    for line in (REAL_CT / "totalseg_total_labels.csv").read_text().splitlines()[1:]:
        i, name = line.split(",")
        table[int(i)] = name
    assert roi.class_map() == table
    assert len(table) == 117 and table[2] == "kidney_right" and table[21] == "urinary_bladder" and table[90] == "brain"
    assert "Apache-2.0" in (Path(roi.__file__).parent / roi.CLASS_MAP_TABLE).read_text().splitlines()[0]


def test_class_map_comes_from_totalsegmentator_when_it_is_importable(monkeypatch):
    package = types.ModuleType("totalsegmentator")
    module = types.ModuleType("totalsegmentator.map_to_binary")
    module.class_map = {"total": {1: "spleen", 2: "new_structure"}, "total_v1": {1: "spleen"}}
    package.map_to_binary = module
    monkeypatch.setitem(sys.modules, "totalsegmentator", package)
    monkeypatch.setitem(sys.modules, "totalsegmentator.map_to_binary", module)
    assert roi.class_map() == {1: "spleen", 2: "new_structure"}


# =============================================================================================
# reading the three forms
# =============================================================================================
def test_multilabel_file_reads_with_class_map_names(labels, ct):
    assert labels.volume.same_geometry(ct)
    counts = labels.voxel_counts()
    assert (counts["spleen"], counts["kidney_right"], counts["kidney_left"], counts["liver"], counts["pancreas"]) == (
        9452, 3947, 3676, 38634, 644)  # the counts the data README gives
    assert labels.names[5] == "liver" and labels.ids["liver"] == 5
    assert labels.volumes_ml()["liver"] == pytest.approx(38634 * 27 / 1000)
    assert labels.volume.modality is None and labels.volume.units is None
    for organ in ABDOMEN_ORGANS:
        assert SOFT_TISSUE_HU[0] <= mean_hu(ct, labels.mask([organ])) <= SOFT_TISSUE_HU[1], organ


def test_plain_nrrd_label_map_is_not_taken_for_a_slicer_segmentation(tmp_path, labels):
    write_volume(labels.volume, tmp_path / "labels.nrrd")
    again = roi.read_organ_labels(tmp_path / "labels.nrrd")
    assert np.array_equal(again.volume.voxels, labels.volume.voxels) and again.ignored == ()


def test_fast_model_output_uses_the_same_class_map(labels):
    fast = roi.read_organ_labels(REAL_CT / "ct_abdomen_3mm_totalseg_fast.nii.gz")
    for organ in ABDOMEN_ORGANS:
        a, b = labels.mask([organ]), fast.mask([organ])
        assert (a & b).sum() / (a | b).sum() > 0.7, organ  # same organ, not another id's


@pytest.fixture(scope="module")
def structure_folder(tmp_path_factory, labels) -> Path:
    """A per-structure folder as TotalSegmentator writes it without --ml: every class a file (empty ones too)."""
    folder = tmp_path_factory.mktemp("totalseg_out")
    present = set(labels.present)
    for i, name in labels.names.items():
        if name in present or name in ("brain", "urinary_bladder", "heart"):
            structure = (labels.volume.voxels == i).astype(np.uint8)
            write_volume(labels.volume.with_voxels(structure), folder / f"{name}.nii.gz")
    empty = np.zeros(labels.volume.voxels.shape, np.uint8)
    write_volume(labels.volume.with_voxels(empty), folder / "lung_vessels.nii.gz")  # another task's file
    (folder / "statistics.json").write_text("{}")
    return folder


def test_structure_folder_reads_as_the_multilabel_file(structure_folder, labels):
    folder = roi.read_organ_labels(structure_folder)
    assert folder.volume.same_geometry(labels.volume, atol=1e-4)
    assert np.array_equal(folder.volume.voxels, labels.volume.voxels)
    assert folder.ignored == ("lung_vessels",)  # another task's file is left out, not misread
    assert folder.present == labels.present


def test_one_structure_file_is_that_structure_not_id_1(structure_folder, labels):
    kidney = roi.read_organ_labels(structure_folder / "kidney_left.nii.gz")
    assert kidney.present == ("kidney_left",)
    assert np.array_equal(kidney.mask(["kidney_left"]), labels.mask(["kidney_left"]))


@pytest.fixture(scope="module")
def seg_nrrd(tmp_path_factory, labels) -> Path:
    """A Slicer segmentation as the TotalSegmentator extension saves it: ID = TotalSegmentator name, standard
    display names ("Right kidney"), plus a user's own overlapping segment (a second layer)."""
    volume = labels.volume
    seg = slicerio.create_segmentation(volume.shape_ijk, lps_ras_flip(volume.ijk_to_ras))
    ijk = volume.voxels.transpose(2, 1, 0)  # slicerio: i, j, k
    display = {"kidney_right": "Right kidney", "kidney_left": "Left kidney", "liver": "liver", "spleen": "Spleen"}
    for name in labels.present:
        slicerio.add_segment(seg, ijk == labels.ids[name], {"id": name, "name": display.get(name, name)})
    slicerio.add_segment(seg, ijk == labels.ids["liver"], {"id": "Segment_1", "name": "my tumour"})
    path = tmp_path_factory.mktemp("slicer") / "totalseg.seg.nrrd"
    slicerio.write_segmentation(str(path), seg)
    return path


def test_slicer_segmentation_reads_as_the_multilabel_file(seg_nrrd, labels):
    assert slicerio.read_segmentation(str(seg_nrrd))["voxels"].ndim == 4  # two layers: the overlap is real
    seg = roi.read_organ_labels(seg_nrrd)
    np.testing.assert_allclose(seg.volume.ijk_to_ras, labels.volume.ijk_to_ras, atol=1e-6)
    assert np.array_equal(seg.volume.voxels, labels.volume.voxels)
    assert seg.ignored == ("my tumour",)


# =============================================================================================
# carrying labels onto other grids
# =============================================================================================
def test_labels_follow_physical_space_through_axis_order_and_flips(labels, ct):
    reordered_ct = same_space_reordered(ct)
    assert reordered_ct.voxels.shape != ct.voxels.shape
    carried = labels.on_grid(reordered_ct)
    # the same physical reordering of the label array, exactly (no interpolation at matching centres)
    assert np.array_equal(carried.volume.voxels, same_space_reordered(labels.volume).voxels)
    assert carried.voxel_counts() == labels.voxel_counts()
    for organ in ABDOMEN_ORGANS:
        assert SOFT_TISSUE_HU[0] <= mean_hu(reordered_ct, carried.mask([organ])) <= SOFT_TISSUE_HU[1], organ


def test_index_aligned_labels_miss_the_anatomy_that_physical_ones_hit(labels, ct):
    """A y-flipped copy of the CT has the labels' shape: index alignment "fits" but puts organs on air and fat."""
    flipped_ct = same_space_reordered(ct, order=(0, 1, 2), flip=(False, True, False))
    assert flipped_ct.voxels.shape == labels.volume.voxels.shape
    carried = labels.on_grid(flipped_ct)
    for organ in ("liver", "spleen"):
        good = mean_hu(flipped_ct, carried.mask([organ]))
        bad = mean_hu(flipped_ct, labels.mask([organ]))  # geometry ignored on purpose
        assert SOFT_TISSUE_HU[0] <= good <= SOFT_TISSUE_HU[1], organ
        assert not SOFT_TISSUE_HU[0] <= bad <= SOFT_TISSUE_HU[1], organ


def test_dicom_series_labels_whose_file_flips_y(ct_dicom, dicom_labels):
    """ct_dicom_totalseg.nii.gz stores y flipped against the DICOM series (same space, other index order)."""
    assert dicom_labels.volume.voxels.shape == ct_dicom.voxels.shape
    assert not dicom_labels.volume.same_geometry(ct_dicom, atol=1e-3)
    carried = dicom_labels.on_grid(ct_dicom)
    assert carried.volume.same_geometry(ct_dicom)
    assert np.array_equal(carried.volume.voxels, dicom_labels.volume.voxels[:, ::-1, :])
    assert carried.voxel_counts() == dicom_labels.voxel_counts()
    assert "kidney_left" not in carried.present  # this series (20 slices) covers liver and spleen only
    for organ in ("liver", "spleen"):
        good = mean_hu(ct_dicom, carried.mask([organ]))
        bad = mean_hu(ct_dicom, dicom_labels.mask([organ]))  # index-aligned copy
        assert carried.voxel_counts()[organ] > 10000
        assert SOFT_TISSUE_HU[0] <= good <= SOFT_TISSUE_HU[1], organ
        assert not SOFT_TISSUE_HU[0] <= bad <= SOFT_TISSUE_HU[1], organ


@pytest.mark.parametrize("spacing, oblique", [((4.0, 4.0, 4.0), False), ((4.0, 4.0, 4.0), True),
                                              ((2.0, 3.5, 5.0), True)])
def test_labels_onto_a_larger_pet_grid_keep_organ_volumes(labels, ct, spacing, oblique):
    """A PET field of view larger than the CT's, another spacing, optionally oblique: every organ arrives whole."""
    direction = rotation((1.0, 0.5, 0.2), 17.0) if oblique else None
    pet = pet_grid(ct, spacing, (450.0, 400.0, 200.0), direction=direction)
    carried = labels.on_grid(pet)
    before, after = labels.volumes_ml(), carried.volumes_ml()
    for organ in VOLUME_ORGANS:
        assert after[organ] == pytest.approx(before[organ], rel=VOLUME_TOLERANCE), organ
    # and each organ lands where it was: centroids within a voxel
    for organ in ("liver", "kidney_left"):
        a = labels.volume.ijk_to_ras_points(np.argwhere(labels.mask([organ]))[:, ::-1]).mean(axis=0)
        b = pet.ijk_to_ras_points(np.argwhere(carried.mask([organ]))[:, ::-1]).mean(axis=0)
        assert np.linalg.norm(a - b) < max(spacing), organ


def test_labels_onto_a_pet_sub_box_keep_what_it_covers(labels, ct):
    """A PET grid covering only part of the CT (caudal half, 4 mm): organs inside it keep their volume."""
    pet = pet_grid(ct, (4.0, 4.0, 4.0), (300.0, 300.0, 44.0), centre_shift_mm=(0.0, 0.0, -24.0))
    carried = labels.on_grid(pet)
    assert carried.volume.same_geometry(pet)
    # the CT part the sub-box covers, measured on the CT grid itself
    ras = labels.volume.ijk_to_ras_points(np.argwhere(np.ones(labels.volume.voxels.shape, bool))[:, ::-1])
    inside = np.all((pet.ras_to_ijk_points(ras) > -0.5) & (pet.ras_to_ijk_points(ras) < np.array(pet.shape_ijk) - 0.5),
                    axis=1).reshape(labels.volume.voxels.shape)
    ml = labels.volumes_ml()["liver"] / labels.voxel_counts()["liver"]
    for organ in ("liver", "kidney_left", "kidney_right"):
        covered = np.count_nonzero(labels.mask([organ]) & inside) * ml
        assert 0 < covered < labels.volumes_ml()[organ]  # really cut by the box
        assert carried.volumes_ml()[organ] == pytest.approx(covered, rel=0.1), organ


# =============================================================================================
# organ sets, include/exclude, margins
# =============================================================================================
def test_groups_are_totalsegmentator_names():
    names = set(roi.class_map().values())
    for group, members in roi.ORGAN_GROUPS.items():
        assert set(members) <= names, group
    uptake = set(roi.ORGAN_GROUPS["physiological-uptake"])
    assert {"brain", "heart", "kidney_left", "kidney_right", "urinary_bladder"} <= uptake
    assert set(roi.ORGAN_GROUPS["kidneys"]) == {"kidney_left", "kidney_right", "kidney_cyst_left", "kidney_cyst_right"}


def test_organ_names_take_names_groups_and_forgiving_spelling():
    assert roi.organ_names("kidneys, Liver") == ("kidney_right", "kidney_left", "kidney_cyst_right",
                                                 "kidney_cyst_left", "liver")
    assert roi.organ_names(["Kidney Left", "kidney-left", "physiological_uptake"])[:2] == ("kidney_left", "brain")
    assert roi.organ_names(None) == () and roi.organ_names("") == ()


def test_include_exclude_on_the_pet_grid(labels, ct):
    pet = pet_grid(ct, (4.0, 4.0, 4.0), (450.0, 400.0, 200.0), direction=rotation((0, 0, 1), 10.0))
    carried = labels.on_grid(pet)
    kidneys = roi.roi_mask(labels, include="kidneys", grid=pet)
    assert kidneys.same_geometry(pet) and kidneys.voxels.dtype == np.uint8
    assert np.array_equal(kidneys.voxels != 0, carried.mask("kidneys"))
    outside = roi.roi_mask(labels, exclude="physiological-uptake", grid=pet)
    assert np.array_equal(outside.voxels != 0, ~carried.mask("physiological-uptake"))
    both = roi.roi_mask(labels, include="liver,kidneys", exclude="kidney_left", grid=pet)
    assert np.array_equal(both.voxels != 0, carried.mask(["liver", "kidney_right"]))


def test_margin_grows_the_included_and_the_excluded_organs(labels, ct):
    pet = pet_grid(ct, (4.0, 4.0, 4.0), (450.0, 400.0, 200.0))
    plain = roi.roi_mask(labels, include="kidney_left", grid=pet).voxels != 0
    grown = roi.roi_mask(labels, include="kidney_left", margin_mm=10, grid=pet).voxels != 0
    assert np.all(grown[plain]) and grown.sum() > 1.5 * plain.sum()
    excluded = roi.roi_mask(labels, exclude="kidney_left", margin_mm=10, grid=pet).voxels != 0
    assert np.array_equal(excluded, ~grown)


def brute_force_within(mask: np.ndarray, ijk_to_ras: np.ndarray, margin_mm: float) -> np.ndarray:
    """Every voxel whose centre is within margin_mm (physical) of a mask voxel's centre, by a k-d tree."""
    m = Volume(mask, ijk_to_ras)
    all_kji = np.argwhere(np.ones(mask.shape, bool))
    tree = spatial.cKDTree(m.ijk_to_ras_points(np.argwhere(mask)[:, ::-1]))
    distance, _ = tree.query(m.ijk_to_ras_points(all_kji[:, ::-1]))
    return (distance <= margin_mm + 1e-9).reshape(mask.shape)


@pytest.mark.parametrize("spacing, direction", [
    ((1.0, 1.0, 4.0), None),                          # anisotropic: 4 mm slices
    ((0.8, 1.5, 3.0), rotation((1, 2, 3), 35.0)),     # anisotropic and oblique
])
def test_margin_is_physical_on_anisotropic_and_oblique_grids(spacing, direction):
    rng = np.random.default_rng(0)
    mask = np.zeros((12, 20, 22), bool)
    mask[5:7, 8:12, 9:12] = True
    mask[rng.random(mask.shape) > 0.997] = True
    matrix = ijk_to_ras_matrix(spacing, (10.0, -20.0, 30.0), direction)
    grown = roi.dilate_mm(mask, Volume(mask, matrix).spacing, 6.0)
    assert np.array_equal(grown, brute_force_within(mask, matrix, 6.0))
    # on the 4 mm axis 6 mm reaches one slice, in-plane six voxels
    if direction is None:
        single = np.zeros((9, 15, 15), bool)
        single[4, 7, 7] = True
        g = roi.dilate_mm(single, spacing, 6.0)
        assert np.flatnonzero(g[:, 7, 7]).tolist() == [3, 4, 5]
        assert np.flatnonzero(g[4, 7, :]).tolist() == list(range(1, 14))


def whole_grid_dilation(mask: np.ndarray, spacing_ijk, margin_mm: float) -> np.ndarray:
    """The straightforward margin: one distance transform of the whole grid."""
    sampling = np.asarray(spacing_ijk, dtype=np.float64)[::-1]
    return ndi.distance_transform_edt(~mask, sampling=sampling) <= margin_mm * (1.0 + 1e-9)


@pytest.fixture(scope="module")
def organ_maps(labels, ct, small_phantom_case) -> dict[str, roi.OrganLabels]:
    """Organ maps on anisotropic grids: the real CT's labels on its own grid and carried onto a 2 x 3.5 x 5 mm
    oblique PET-like grid, and the phantom's anatomy (8 x 8 x 12 mm) the demo's organ ROI comes from."""
    pet = pet_grid(ct, (2.0, 3.5, 5.0), (450.0, 400.0, 200.0), direction=rotation((1.0, 0.5, 0.2), 17.0))
    return {"real CT": labels, "real CT on a PET grid": labels.on_grid(pet), "phantom": small_phantom_case.organs}


@pytest.mark.parametrize("source", ["real CT", "real CT on a PET grid", "phantom"])
def test_margin_in_separate_boxes_equals_the_whole_grid_transform(organ_maps, source):
    """dilate_mm transforms only boxes around the mask's parts: voxel for voxel the whole grid's result, for the
    organ groups a ROI excludes, every organ at once, margins from under a voxel to several, on the grid's own
    (anisotropic) spacing and on a more anisotropic one."""
    organs = organ_maps[source]
    grid = organs.volume
    sets = [*[g for g in roi.ORGAN_GROUPS if set(roi.ORGAN_GROUPS[g]) & set(organs.present)], list(organs.present)]
    for organ_set in sets:
        mask = organs.mask(organ_set)
        for spacing in (tuple(grid.spacing), (0.8, 1.7, 4.0)):
            for margin in (0.5, 3.0, 5.0, 12.5, 30.0):
                assert np.array_equal(roi.dilate_mm(mask, spacing, margin), whole_grid_dilation(mask, spacing, margin)), \
                    (organ_set, spacing, margin)


def test_separate_boxes_hold_whole_parts_and_every_voxel(organ_maps):
    """Every connected part of the mask (26 neighbours) lies inside one box, the boxes hold every mask voxel and
    nothing else of it twice; the physiological-uptake organs of the phantom fall into several boxes."""
    organs = organ_maps["phantom"]
    mask = organs.mask("physiological-uptake")
    boxes = roi._separate_boxes(mask, np.array([1, 1, 1]))
    assert len(boxes) > 1
    parts, n = ndi.label(mask, structure=np.ones((3, 3, 3), bool))
    for part in ndi.find_objects(parts):
        assert sum(all(b.start <= p.start and p.stop <= b.stop for p, b in zip(part, box)) for box in boxes) == 1
    covered = np.zeros(mask.shape, int)
    for box in boxes:
        covered[box] += mask[box]
    assert np.array_equal(covered, mask.astype(int))
    assert roi._separate_boxes(np.zeros((3, 4, 5), bool), np.array([1, 1, 1])) == []


def test_label_ids_are_nps_unique_without_background(labels, dicom_labels):
    """The ids a label file holds, from chunked counts for uint8 / uint16, np.unique otherwise: the same ids."""
    rng = np.random.default_rng(0)
    arrays = [labels.volume.voxels, dicom_labels.volume.voxels,
              rng.integers(0, 70000, (9, 11, 13)).astype(np.uint16) * (rng.random((9, 11, 13)) < 0.3),
              rng.integers(0, 3, (70, 130, 120)).astype(np.uint8),  # more voxels than one counting chunk
              np.asfortranarray(rng.integers(0, 200, (5, 6, 7)).astype(np.uint8)),
              rng.integers(0, 10**6, (4, 5, 6)).astype(np.int64), np.zeros((3, 3, 3), np.uint8)]
    for voxels in arrays:
        expected = np.unique(voxels)
        assert roi._label_ids(voxels).tolist() == expected[expected != 0].tolist()


def test_organ_mask_is_nps_isin_of_the_organs_ids(labels):
    """OrganLabels.mask compares a few ids one by one, more with np.isin: the same mask either way."""
    present = list(labels.present)
    for count in (0, 1, 2, 6, 7, len(present)):
        wanted = [labels.ids[name] for name in present[:count]]
        assert np.array_equal(labels.mask(present[:count]), np.isin(labels.volume.voxels, wanted)), count


# =============================================================================================
# bad input: one sentence each
# =============================================================================================
def test_segmentation_that_does_not_overlap_the_input_is_refused(labels, ct):
    far = pet_grid(ct, (4.0, 4.0, 4.0), (100.0, 100.0, 100.0), centre_shift_mm=(0.0, 0.0, 900.0))
    with pytest.raises(VolumeError, match=r"does not overlap the input volume \(it covers R .* mm, the input R .* mm RAS\); give the "
                                          r"segmentation of this patient's CT"):
        labels.on_grid(far)
    # boxes overlap, but only background lands on the grid (a corner of air)
    corner = Volume(np.zeros((3, 3, 3), np.float32), ijk_to_ras_matrix((3.0, 3.0, 3.0), labels.volume.origin_ras,
                                                                       labels.volume.direction_ras))
    assert not labels.volume.voxels[:3, :3, :3].any()
    with pytest.raises(VolumeError, match="does not overlap the input volume"):
        roi.roi_mask(labels, exclude="kidneys", grid=corner)


def test_unknown_organ_name_lists_the_closest_or_the_valid_ones(labels):
    with pytest.raises(ValueError, match=r"unknown organ 'kidny'; did you mean kidneys or kidney_left"):
        roi.roi_mask(labels, include="kidny")
    with pytest.raises(ValueError, match=r"unknown organ 'tumour'; use a group \(physiological-uptake, kidneys, .*\) "
                                         r"or a TotalSegmentator v2 'total' name "
                                         r"\(spleen, kidney_right, .*costal_cartilages\)"):
        roi.roi_mask(labels, exclude=["kidneys", "tumour"])


def test_empty_roi_is_refused(labels, ct):
    with pytest.raises(ValueError, match=r"the organ ROI is empty: the excluded organs \(kidney_right, kidney_left, "
                                         r".*\) cover all of kidney_left with the 5 mm margin; exclude fewer"):
        roi.roi_mask(labels, include="kidney_left", exclude="kidneys", margin_mm=5)
    with pytest.raises(ValueError, match=r"^brain is not in the organ segmentation .*ct_abdomen_3mm_totalseg.nii.gz: "
                                         r"the scan does not show it .*; leave brain out of the included organs.$"):
        roi.roi_mask(labels, include="brain")
    cranial = pet_grid(ct, (4.0, 4.0, 4.0), (300.0, 300.0, 12.0), centre_shift_mm=(0.0, 0.0, 36.0))  # above kidneys
    assert "kidney_left" in labels.present and "kidney_left" not in labels.on_grid(cranial).present
    with pytest.raises(ValueError, match=r"^kidneys are outside the input volume's field of view; leave kidneys out"):
        roi.roi_mask(labels, include="kidneys", grid=cranial)


def test_each_included_organ_must_be_there_and_says_which_is_missing(labels, ct):
    """A CT without an organ the user included is refused naming that organ; a card's default list skips it."""
    with pytest.raises(ValueError, match=r"^brain is not in the organ segmentation"):
        roi.roi_mask(labels, include="kidney_left,brain")
    both = roi.roi_mask(labels, include="kidney_left,brain", skip_absent=True).voxels
    np.testing.assert_array_equal(both, roi.roi_mask(labels, include="kidney_left").voxels)
    cranial = pet_grid(ct, (4.0, 4.0, 4.0), (300.0, 300.0, 12.0), centre_shift_mm=(0.0, 0.0, 36.0))
    assert "liver" in labels.on_grid(cranial).present
    with pytest.raises(ValueError, match=r"^kidney_left is outside the input volume's field of view"):
        roi.roi_mask(labels, include="liver,kidney_left", grid=cranial)
    roi.roi_mask(labels, include="liver,kidney_left", grid=cranial, skip_absent=True)
    with pytest.raises(ValueError, match=r"^brain is not in the organ segmentation"):
        roi.roi_mask(labels, include="brain", skip_absent=True)  # skipping needs one organ that is there
    with pytest.raises(ValueError, match=r"the ROI margin \(mm\) must be a finite number from 0 to 100"):
        roi.roi_mask(labels, include="kidneys", margin_mm=-2)


def test_label_file_whose_ids_match_no_class_map_is_refused(tmp_path, labels):
    shifted = np.where(labels.volume.voxels > 0, labels.volume.voxels + 100, 0).astype(np.uint8)
    foreign = labels.volume.with_voxels(shifted)
    write_volume(foreign, tmp_path / "other_tool.nii.gz")
    with pytest.raises(VolumeError, match=r"other_tool.nii.gz holds ids 118, 119, .* that "
                                          r"TotalSegmentator's v2 'total' class map \(ids 1-117\) does not have, "
                                          r"so it is not the multi-label output"):
        roi.read_organ_labels(tmp_path / "other_tool.nii.gz")
    write_volume(labels.volume.with_voxels(np.zeros(labels.volume.voxels.shape, np.uint8)), tmp_path / "blank.nii.gz")
    with pytest.raises(VolumeError, match=r"blank.nii.gz is empty \(no voxel is labelled\); give TotalSegmentator's"):
        roi.read_organ_labels(tmp_path / "blank.nii.gz")
    (tmp_path / "empty_run").mkdir()
    write_volume(labels.volume.with_voxels(np.zeros(labels.volume.voxels.shape, np.uint8)),
                 tmp_path / "empty_run" / "spleen.nii.gz")
    with pytest.raises(VolumeError, match=r"empty_run is empty \(no voxel is labelled\)"):
        roi.read_organ_labels(tmp_path / "empty_run")


def test_folder_without_totalsegmentator_files_is_refused(tmp_path, labels):
    write_volume(labels.volume, tmp_path / "ct.nii.gz")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(VolumeError, match=r"holds no TotalSegmentator structure files \(its NIfTI files: ct\); "
                                          r"expected <name>.nii.gz files"):
        roi.read_organ_labels(tmp_path)
    with pytest.raises(VolumeError, match="organ segmentation not found"):
        roi.read_organ_labels(tmp_path / "missing.nii.gz")


def test_slicer_segmentation_without_totalsegmentator_names_is_refused(tmp_path, labels):
    volume = labels.volume
    seg = slicerio.create_segmentation(volume.shape_ijk, lps_ras_flip(volume.ijk_to_ras))
    slicerio.add_segment(seg, volume.voxels.transpose(2, 1, 0) == 5, {"id": "Segment_1", "name": "tumour"})
    slicerio.write_segmentation(str(tmp_path / "mine.seg.nrrd"), seg)
    with pytest.raises(VolumeError, match=r"none of the segments of .*mine.seg.nrrd \(tumour\) has a name or ID from"):
        roi.read_organ_labels(tmp_path / "mine.seg.nrrd")
