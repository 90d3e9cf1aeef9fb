"""The PET phantom generator: PET pinned per seed, organ labels with TotalSegmentator v2 ids, and its CT.

The PET of a seed is pinned by hashes computed before organ labels and the CT were added
(a trained model, tuning and evaluation numbers depend on them). The organ map must use
TotalSegmentator's class map, put each organ on the right side of the patient, cover the
physiological hot spots the default exclusion is meant for, and agree, carried by physical
coordinates, with the organ map of the CT, which has its own grid and noise generator.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from scipy import ndimage as ndi

from DiffusionAnomalyLib import phantoms, roi
from DiffusionAnomalyLib.phantoms import make_phantom

#: the 384 x 384 x 720 mm field of view on a coarse grid (fast)
COARSE = {"shape_ijk": (64, 64, 80), "spacing": (6.0, 6.0, 9.0)}

#: sha256 (first 16 hex digits) of pet.voxels and lesion_labels.voxels, from the generator before issue 8
PINNED = {
    0: ("63e3b5fb86f7a6e9", "c4c97b4e74591fe1"),
    1: ("e72a4ebe08e23e56", "dae4d3dce1bb0a94"),
    42: ("10ae826175639988", "4cde2bce5e43a0d9"),
    1000: ("37316a8ce6a118b8", "683141185cd22a13"),
    5000003: ("497151eb26c1e842", "dae4d3dce1bb0a94"),
}
PINNED_DEFAULT_SIZE = {5000000: ("05f340a47e589edf", "7bf53a4241f175c2")}

#: a coarse-grid seed with liver, lung and bone lesions (for the CT's lesion contrast)
LESION_SEED = 13


def digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def centroid_ras(labels: roi.OrganLabels, name: str) -> np.ndarray:
    kji = np.argwhere(labels.mask([name])).mean(axis=0)
    return labels.volume.ijk_to_ras_points(kji[::-1])[0]


def centre_box(volume) -> np.ndarray:
    """(2, 3) RAS min/max of the first and last voxel centres (axis-aligned grids)."""
    ends = volume.ijk_to_ras_points([[0, 0, 0], np.array(volume.shape_ijk) - 1])
    return np.stack([ends.min(axis=0), ends.max(axis=0)])


@pytest.fixture(scope="module")
def case_ct():
    """A coarse PET with the CT on its default grid."""
    return make_phantom(LESION_SEED, ct=True, **COARSE)


# =============================================================================================
# The PET stays what it was
# =============================================================================================
@pytest.mark.parametrize("seed", sorted(PINNED))
def test_the_pet_of_existing_seeds_is_unchanged(seed):
    case = make_phantom(seed, **COARSE)
    assert (digest(case.pet.voxels), digest(case.lesion_labels.voxels)) == PINNED[seed]


@pytest.mark.parametrize("seed", sorted(PINNED_DEFAULT_SIZE))
def test_the_pet_of_an_existing_seed_is_unchanged_at_default_size(seed):
    case = make_phantom(seed)
    assert (digest(case.pet.voxels), digest(case.lesion_labels.voxels)) == PINNED_DEFAULT_SIZE[seed]


def test_the_ct_takes_nothing_from_the_pets_random_stream(case_ct):
    plain = make_phantom(LESION_SEED, **COARSE)
    assert np.array_equal(plain.pet.voxels, case_ct.pet.voxels)
    assert np.array_equal(plain.lesion_labels.voxels, case_ct.lesion_labels.voxels)
    assert plain.lesions == case_ct.lesions
    assert np.array_equal(plain.organs.volume.voxels, case_ct.organs.volume.voxels)


def test_without_ct_only_the_pet_grid_is_painted(monkeypatch):
    made = []

    class Counting(phantoms._Canvas):
        def __init__(self, *args, **kwargs):
            made.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(phantoms, "_Canvas", Counting)
    case = make_phantom(3, **COARSE)
    assert made == [COARSE["shape_ijk"]]
    assert case.ct is None and case.ct_organs is None


# =============================================================================================
# Organ labels
# =============================================================================================
def test_organ_labels_use_totalsegmentators_class_map_on_the_pet_grid():
    case = make_phantom(0, **COARSE)
    organs = case.organs
    assert isinstance(organs, roi.OrganLabels)
    assert organs.names == roi.class_map()
    assert organs.volume.same_geometry(case.pet)
    assert organs.volume.voxels.dtype == np.uint8
    assert set(np.unique(organs.volume.voxels).tolist()) - {0} <= set(organs.names)
    assert "TotalSegmentator" in organs.source and "standing in" in organs.source
    expected = {"brain", "skull", "heart", "aorta", *roi.ORGAN_GROUPS["lungs"], "liver", "spleen", "kidney_left",
                "kidney_right", "urinary_bladder", "hip_left", "hip_right", "sacrum", "vertebrae_S1",
                *(f"vertebrae_L{n}" for n in range(1, 6)), *(f"vertebrae_T{n}" for n in range(1, 13)),
                "vertebrae_C7"}
    assert expected <= set(organs.present)
    assert {"small_bowel", "colon"} & set(organs.present)
    # names are read back the way roi reads TotalSegmentator output
    assert roi.organ_names("physiological-uptake", organs.names.values())


def test_organs_lie_on_the_patients_side_and_in_order_of_height():
    organs = make_phantom(5, **COARSE).organs
    right = {n: centroid_ras(organs, n)[0] for n in ("kidney_left", "kidney_right", "liver", "spleen", "heart",
                                                    "hip_left", "hip_right", "lung_upper_lobe_left",
                                                    "lung_upper_lobe_right")}
    # RAS R grows towards the patient's right
    assert right["kidney_right"] > 0 > right["kidney_left"]
    assert right["hip_right"] > 0 > right["hip_left"]
    assert right["liver"] > 0 > right["spleen"]
    assert right["lung_upper_lobe_right"] > 0 > right["lung_upper_lobe_left"]
    assert right["heart"] < 0
    superior = [centroid_ras(organs, n)[2] for n in ("brain", "vertebrae_C7", "vertebrae_T1", "lung_upper_lobe_right",
                                                     "lung_middle_lobe_right", "lung_lower_lobe_right",
                                                     "vertebrae_T12", "vertebrae_L1", "vertebrae_L5", "sacrum")]
    assert superior == sorted(superior, reverse=True)


def test_lesions_do_not_change_organ_labels():
    healthy = make_phantom(21, n_lesions=0, **COARSE)
    sick = make_phantom(21, n_lesions=4, **COARSE)
    assert sick.lesion_mask.any()
    assert np.array_equal(healthy.organs.volume.voxels, sick.organs.volume.voxels)


def test_physiological_hot_spots_lie_in_the_physiological_uptake_roi_and_lesions_mostly_outside():
    lesion_inside = lesion_all = 0
    for seed in range(12):
        case = make_phantom(seed, **COARSE)
        roi_mask = roi.roi_mask(case.organs, include="physiological-uptake").voxels.astype(bool)
        pet, organs = case.pet.voxels, case.organs
        near_lesion = ndi.binary_dilation(case.lesion_mask, iterations=2)
        # the hottest voxel away from lesions: bladder, renal pelvis, brain or myocardium
        assert roi_mask[np.unravel_index(np.argmax(np.where(near_lesion, -1.0, pet)), pet.shape)]
        # every hot spot (>= 5 SUV) away from lesions peaks inside the ROI, bowel excepted (opt-in 'bowel' group)
        bowel = organs.mask("bowel")
        spots, n = ndi.label(pet >= 5.0)
        for i in range(1, n + 1):
            spot = spots == i
            if (spot & near_lesion).any():
                continue
            peak = np.unravel_index(np.argmax(np.where(spot, pet, -1.0)), pet.shape)
            assert roi_mask[peak] or bowel[peak], (seed, peak, organs.volume.voxels[peak])
        for name in ("urinary_bladder", "brain", "kidneys"):
            inside = organs.mask(name)
            assert roi_mask[np.unravel_index(np.argmax(np.where(inside, pet, -1.0)), pet.shape)]
        lesion_inside += int((case.lesion_mask & roi_mask).sum())
        lesion_all += int(case.lesion_mask.sum())
    assert lesion_all > 0 and lesion_inside / lesion_all < 0.1


# =============================================================================================
# The CT
# =============================================================================================
def test_the_ct_is_hu_on_its_own_grid_missing_the_head_top(case_ct):
    ct, pet = case_ct.ct, case_ct.pet
    assert (ct.modality, ct.units, ct.voxels.dtype) == ("CT", "HU", np.int16)
    np.testing.assert_allclose(ct.spacing, phantoms.DEFAULT_CT_SPACING)
    np.testing.assert_allclose(ct.direction_ras, pet.direction_ras)
    assert not ct.same_geometry(pet)
    ct_box, pet_box = centre_box(ct), centre_box(pet)
    assert ct_box[1, 2] < pet_box[1, 2] - 70  # the top of the head is not covered
    assert abs(ct_box[0, 2] - pet_box[0, 2]) < 3  # same lower end
    assert np.all(ct_box[1, :2] - ct_box[0, :2] > pet_box[1, :2] - pet_box[0, :2] + 100)  # wider in plane
    assert case_ct.ct_organs.volume.same_geometry(ct)
    assert case_ct.ct_organs.names == roi.class_map()


def test_the_ct_has_tissue_attenuation_and_a_little_noise(case_ct):
    hu, organs = case_ct.ct.voxels.astype(np.float64), case_ct.ct_organs
    expect = {"liver": (50, 70), "spleen": (40, 60), "kidney_left": (20, 45), "heart": (35, 55), "brain": (25, 45),
              "lung_lower_lobe_right": (-900, -800), "urinary_bladder": (0, 20), "aorta": (30, 50),
              "vertebrae_L3": (300, 700), "hip_right": (300, 700), "skull": (400, 1500)}
    for name, (low, high) in expect.items():
        assert low <= np.median(hu[organs.mask([name])]) <= high, name
    assert np.median(hu[:, :4, :4]) == pytest.approx(-1000, abs=3)  # air
    assert np.mean((hu > -130) & (hu < -70)) > 0.01  # subcutaneous fat
    assert 6 < hu[organs.mask(["liver"])].std() < 20  # noise, not a flat painting


def test_lesions_show_on_the_ct(case_ct):
    ct, organs = case_ct.ct, case_ct.ct_organs
    hu = ct.voxels.astype(np.float64)
    seen = set()
    for lesion in case_ct.lesions:
        i, j, k = np.round(ct.ras_to_ijk_points(lesion["center_ras"])[0]).astype(int)
        centre = np.median(hu[k - 1:k + 2, j - 1:j + 2, i - 1:i + 2])
        if lesion["site"] == "liver":
            assert centre < np.median(hu[organs.mask(["liver"])]) - 15  # hypodense
        elif lesion["site"] == "lung":
            assert centre > -200  # a soft-tissue nodule in aerated lung
        elif lesion["site"] == "bone":
            assert centre < 300  # lytic
        seen.add(lesion["site"])
    assert {"liver", "lung", "bone"} <= seen


@pytest.mark.parametrize("center", [phantoms.DEFAULT_CT_CENTER_MM, (15.0, -25.0)])
def test_ct_organs_carried_onto_the_pet_agree_with_the_pets(case_ct, center):
    case = case_ct if center == phantoms.DEFAULT_CT_CENTER_MM else make_phantom(
        LESION_SEED, ct=True, ct_center_mm=center, ct_spacing=(3.0, 3.0, 4.0), **COARSE)
    carried = case.ct_organs.on_grid(case.pet)
    # the PET voxels the CT covers
    pet = case.pet
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in pet.shape_ijk], indexing="ij"), -1).reshape(-1, 3)
    at = case.ct.ras_to_ijk_points(pet.ijk_to_ras_points(ijk))
    covered = np.all((at > -0.5) & (at < np.array(case.ct.shape_ijk) - 0.5), axis=1)
    covered = covered.reshape(pet.shape_ijk).transpose(2, 1, 0)
    assert 0.7 < covered.mean() < 1.0
    for name in ("liver", "kidney_left", "kidney_right", "heart", "brain", "spleen", "urinary_bladder"):
        assert dice(case.organs.mask([name]) & covered, carried.mask([name])) > 0.9, name
    assert np.mean(carried.volume.voxels[covered] == case.organs.volume.voxels[covered]) > 0.98


def test_the_ct_is_deterministic(case_ct):
    again = make_phantom(LESION_SEED, ct=True, **COARSE)
    assert np.array_equal(again.ct.voxels, case_ct.ct.voxels)
    assert np.array_equal(again.ct.ijk_to_ras, case_ct.ct.ijk_to_ras)
    assert np.array_equal(again.ct_organs.volume.voxels, case_ct.ct_organs.volume.voxels)
    other = make_phantom(LESION_SEED + 1, ct=True, ct_spacing=(4.0, 4.0, 6.0), **COARSE)
    assert other.ct.voxels.shape != case_ct.ct.voxels.shape


@pytest.mark.parametrize("kwargs", [{"ct_top_mm": 800.0}, {"ct_top_mm": -5.0}, {"ct_spacing": (0.0, 1.5, 2.5)},
                                    {"ct_fov_mm": (1.0, 500.0)}])
def test_a_ct_grid_outside_the_pets_reach_is_refused(kwargs):
    with pytest.raises(ValueError, match="ct_"):
        make_phantom(0, ct=True, **COARSE, **kwargs)
