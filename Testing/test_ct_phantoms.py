"""The abdominal CT phantom: seeded, anatomically placed like the real CT, phase-dependent HU, lesions, CT noise.

A CT model is trained on these phantoms and judged on real anatomy, so the phantom must agree
with the real CT in ../shared/data/real-ct where it can be checked: which side of the patient an
organ lies on in RAS, organ volumes, and HU (the real CT is non-contrast: kidneys 12-16 HU).
The phase tables, the TotalSegmentator ids, the lesion ground truth and the noise texture
(correlated, at the seed's dose) are checked on the phantom itself. Timings are printed.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import ndimage

from DiffusionAnomalyLib import ct_phantoms, roi
from DiffusionAnomalyLib.ct_lesions import LESION_KINDS, PHASES, CtCase
from DiffusionAnomalyLib.ct_phantoms import make_ct_phantom
from DiffusionAnomalyLib.volume import read_volume

from conftest import REAL_CT, needs_real_ct

#: HU (median of the organ's core: the label eroded by one voxel in-plane) per phase
ORGAN_HU = {
    "non-contrast": {"liver": (45, 66), "spleen": (37, 53), "pancreas": (28, 50), "aorta": (33, 52),
                     "inferior_vena_cava": (33, 52)},
    "portal-venous": {"liver": (92, 128), "spleen": (100, 133), "pancreas": (80, 118), "aorta": (135, 195),
                      "inferior_vena_cava": (105, 155), "portal_vein_and_splenic_vein": (140, 190)},
}
#: whole kidney label (cortex, medulla, sinus, pelvis) as TotalSegmentator would measure it, non-contrast
KIDNEY_NC_HU = (10, 40)
HU_SEEDS = (0, 1, 2)


def ras_centroid(case: CtCase, names) -> np.ndarray:
    kji = np.argwhere(case.organs.mask(names)).mean(axis=0)
    return case.ct.ijk_to_ras_points(kji[::-1])[0]


def core(mask: np.ndarray, voxels: int = 1) -> np.ndarray:
    return ndimage.binary_erosion(mask, np.ones((1, 2 * voxels + 1, 2 * voxels + 1), bool))


@pytest.fixture(scope="module")
def timed():
    """Cases of seeds 0-5 on the default grid, with their generation time."""
    cases, seconds = [], []
    for seed in range(6):
        t = time.perf_counter()
        cases.append(make_ct_phantom(seed))
        seconds.append(time.perf_counter() - t)
    print(f"\nCT phantom {cases[0].ct.shape_ijk}: {np.mean(seconds):.2f} s per case (max {max(seconds):.2f} s)")
    return cases


@pytest.fixture(scope="module")
def by_phase():
    """{phase: [(case, tissue map)]} for HU_SEEDS, healthy, each seed in both phases (same anatomy)."""
    return {phase: [ct_phantoms._make(seed, phase=phase, n_lesions=0) for seed in HU_SEEDS] for phase in PHASES}


@pytest.fixture(scope="module")
def real():
    ct = read_volume(REAL_CT / "ct_abdomen_3mm.nii.gz", modality="CT", units="HU")
    return ct, roi.read_organ_labels(REAL_CT / "ct_abdomen_3mm_totalseg.nii.gz").on_grid(ct)


# =============================================================================================
# Case, grid, seeds
# =============================================================================================
def test_case_is_a_ct_in_hu_with_labels_on_its_grid(timed):
    case = timed[0]
    assert isinstance(case, CtCase) and case.source == "phantom" and case.phase in PHASES
    ct = case.ct
    assert (ct.modality, ct.units, ct.voxels.dtype) == ("CT", "HU", np.int16)
    assert ct.shape_ijk == ct_phantoms.DEFAULT_SHAPE_IJK
    np.testing.assert_allclose(ct.spacing, ct_phantoms.DEFAULT_SPACING)
    # DICOM-like axial geometry: i towards the patient's left (-R), j posterior (-A), k superior (+S)
    np.testing.assert_allclose(np.sign(np.diag(ct.direction_ras)), [-1, -1, 1])
    assert -1024 <= ct.voxels.min() and ct.voxels.max() <= 3071
    assert ct.voxels.min() < -900 and ct.voxels.max() > 500  # air outside, bone inside
    assert case.organs.volume.same_geometry(ct) and case.lesion_labels.same_geometry(ct)
    assert ct.meta["phase"] == case.phase and 8 <= ct.meta["noise_hu"] <= 25


def test_a_seed_always_gives_the_same_case():
    a, b = make_ct_phantom(11), make_ct_phantom(11)
    assert np.array_equal(a.ct.voxels, b.ct.voxels)
    assert np.array_equal(a.organs.volume.voxels, b.organs.volume.voxels)
    assert np.array_equal(a.lesion_labels.voxels, b.lesion_labels.voxels)
    assert a.lesions == b.lesions and a.phase == b.phase


def test_phase_and_lesions_do_not_change_the_anatomy_of_a_seed(by_phase):
    (nc, _), (pv, _) = by_phase["non-contrast"][0], by_phase["portal-venous"][0]
    assert np.array_equal(nc.organs.volume.voxels, pv.organs.volume.voxels)
    sick = make_ct_phantom(HU_SEEDS[0], phase="non-contrast", n_lesions=2)
    assert np.array_equal(sick.organs.volume.voxels, nc.organs.volume.voxels) and sick.lesions


def test_seeds_differ_in_body_size_phase_and_organ_position(timed):
    widths = [np.ptp(np.flatnonzero((c.ct.voxels > -500).any(axis=(0, 1)))) * c.ct.spacing[0] for c in timed]
    assert np.ptp(widths) > 15, widths  # mm
    assert {c.phase for c in timed} == set(PHASES)
    kidneys = np.array([ras_centroid(c, "kidney_left") for c in timed])
    assert np.linalg.norm(kidneys - kidneys.mean(axis=0), axis=1).max() > 4  # mm
    noise = [c.ct.meta["noise_hu"] for c in timed]
    assert np.ptp(noise) > 3


# =============================================================================================
# Anatomy against the real CT and TotalSegmentator's class map
# =============================================================================================
def test_labels_are_totalsegmentator_v2_ids_and_names(timed):
    names = roi.class_map()
    for case in timed[:2]:
        assert case.organs.names == names
        present = np.unique(case.organs.volume.voxels)
        assert set(present[present > 0]) <= set(names)
        assert {"kidney_left", "kidney_right", "pancreas", "liver", "spleen", "aorta", "inferior_vena_cava",
                "stomach", "colon", "small_bowel", "duodenum", "autochthon_left", "iliopsoas_right",
                "vertebrae_L1", "rib_left_11", "portal_vein_and_splenic_vein"} <= set(case.organs.present)


@needs_real_ct
def test_organs_lie_on_the_same_side_of_the_patient_as_in_the_real_ct(timed, real):
    """RAS x grows towards the patient's right: the real CT's kidney_left lies at lower x than its spine."""
    ct, labels = real
    spine = ["vertebrae_T12", "vertebrae_L1", "vertebrae_L2"]

    def x_of(volume, lab, names):
        return volume.ijk_to_ras_points(np.argwhere(lab.mask(names)).mean(axis=0)[::-1])[0][0]

    real_side = {n: np.sign(x_of(ct, labels, [n]) - x_of(ct, labels, spine))
                 for n in ("kidney_left", "kidney_right", "liver", "spleen", "aorta", "inferior_vena_cava")}
    assert real_side["kidney_left"] < 0 < real_side["kidney_right"]  # the convention this test relies on
    for case in timed:
        for name, side in real_side.items():
            assert np.sign(x_of(case.ct, case.organs, [name]) - x_of(case.ct, case.organs, spine)) == side, name
        # the left kidney lies higher than the right
        assert ras_centroid(case, "kidney_left")[2] > ras_centroid(case, "kidney_right")[2]


@needs_real_ct
def test_kidney_and_pancreas_volumes_are_plausible_next_to_the_real_ct(timed, real):
    _, labels = real
    ml = labels.volumes_ml()
    real_kidney = (ml["kidney_left"] + ml["kidney_right"]) / 2  # ~100-110 ml each
    assert 90 < real_kidney < 120
    for case in timed:
        got = case.organs.volumes_ml()
        for side in ("kidney_left", "kidney_right"):
            assert 0.7 * real_kidney < got[side] < 1.5 * real_kidney, (case.seed, side, got[side])
        # the real 3 mm CT cuts its pancreas (17 ml in view); a whole normal pancreas holds ~60-100 ml
        assert ml["pancreas"] < got["pancreas"] and 40 < got["pancreas"] < 110, (case.seed, got["pancreas"])


def test_pancreas_runs_from_a_head_at_the_right_renal_hilum_across_the_aorta_to_the_spleen(timed):
    for case in timed:
        pancreas = case.organs.mask("pancreas")
        ras = case.ct.ijk_to_ras_points(np.argwhere(pancreas)[:, ::-1])
        head, tail = ras[ras[:, 0] > np.percentile(ras[:, 0], 90)], ras[ras[:, 0] < np.percentile(ras[:, 0], 10)]
        assert head[:, 0].mean() > 0 > tail[:, 0].mean() - 30  # head right of the midline, tail left of it
        assert head[:, 0].mean() - tail[:, 0].mean() > 80  # mm
        kidney_r = case.ct.ijk_to_ras_points(np.argwhere(case.organs.mask("kidney_right"))[:, ::-1])
        assert abs(head[:, 2].mean() - kidney_r[:, 2].mean()) < 30  # head at the right kidney's mid level
        assert tail[:, 2].mean() > head[:, 2].mean()  # the tail lies higher
        spleen = case.ct.ijk_to_ras_points(np.argwhere(case.organs.mask("spleen"))[:, ::-1])
        gap = np.min(np.linalg.norm(spleen[::7, None, :] - tail[None, ::7, :], axis=2))
        assert gap < 40, (case.seed, gap)  # the tail reaches towards the splenic hilum
        aorta = ras_centroid(case, "aorta")
        over = ras[np.abs(ras[:, 0] - aorta[0]) < 5]
        assert over.size and over[:, 1].mean() > aorta[1]  # the body crosses anterior to the aorta


# =============================================================================================
# Attenuation per phase
# =============================================================================================
@pytest.mark.parametrize("phase", PHASES)
def test_organ_hu_match_the_phase(by_phase, phase):
    for case, _ in by_phase[phase]:
        v = case.ct.voxels.astype(np.float64)
        for organ, (lo, hi) in ORGAN_HU[phase].items():
            got = float(np.median(v[core(case.organs.mask(organ))]))
            assert lo <= got <= hi, (case.seed, phase, organ, got)
        if phase == "non-contrast":
            for side in ("kidney_left", "kidney_right"):
                got = float(np.median(v[case.organs.mask(side)]))
                assert KIDNEY_NC_HU[0] <= got <= KIDNEY_NC_HU[1], (case.seed, side, got)


def test_renal_cortex_enhances_above_the_medulla_only_with_contrast(by_phase):
    for phase in PHASES:
        for case, tissue in by_phase[phase]:
            v = case.ct.voxels.astype(np.float64)
            kidney = case.organs.mask(["kidney_left", "kidney_right"])
            # medians of ROIs placed inside each compartment (its core), as a reader would measure
            cortex, medulla, urine = (np.median(v[core(kidney & (tissue == ct_phantoms._CODE[name]))])
                                      for name in ("cortex", "medulla", "urine"))
            if phase == "portal-venous":
                assert cortex > medulla + 15 and medulla > 90, (case.seed, cortex, medulla)
            else:
                assert abs(cortex - medulla) < 10 and 15 < medulla < 40, (case.seed, cortex, medulla)
            assert urine < 20  # no excretory phase: the collecting system holds plain urine


@needs_real_ct
def test_non_contrast_phantom_kidneys_measure_like_the_real_ct(by_phase, real):
    ct, labels = real
    real_hu = np.median(ct.voxels[labels.mask(["kidney_left", "kidney_right"])])
    for case, _ in by_phase["non-contrast"]:
        got = np.median(case.ct.voxels[case.organs.mask(["kidney_left", "kidney_right"])])
        assert abs(got - real_hu) < 20, (case.seed, got, real_hu)


# =============================================================================================
# Lesions
# =============================================================================================
def test_lesions_lie_inside_their_organs_with_their_own_ids():
    seen = {"kidney": 0, "pancreas": 0}
    for seed in range(4):
        case = make_ct_phantom(seed, n_lesions={"kidney_left": 1, "kidney_right": 1, "pancreas": 1})
        labels = case.lesion_labels.voxels
        assert sorted(np.unique(labels[labels > 0])) == [les["id"] for les in case.lesions]
        for les in case.lesions:
            own = labels == les["id"]
            organ = case.organs.mask(les["organ"])
            assert own.sum() == les["voxels"] > 0
            assert (own & organ).sum() >= 0.7 * own.sum(), (seed, les)
            i, j, k = np.rint(case.ct.ras_to_ijk_points(les["center_ras"])[0]).astype(int)
            assert organ[k, j, i], (seed, les)
            assert les["kind"] in LESION_KINDS["kidney" if "kidney" in les["organ"] else "pancreas"]
            seen["pancreas" if les["organ"] == "pancreas" else "kidney"] += 1
    assert seen["kidney"] >= 6 and seen["pancreas"] >= 3


def test_drawn_lesion_counts_leave_a_third_healthy():
    counts = [ct_phantoms._lesion_counts(None, np.random.default_rng([s, ct_phantoms._LESION_STREAM]), 1 / 3)
              for s in range(300)]
    healthy = np.mean([sum(c.values()) == 0 for c in counts])
    sick = [c for c in counts if sum(c.values())]
    assert 0.25 < healthy < 0.42
    assert all(1 <= c["kidney_left"] + c["kidney_right"] <= 3 for c in sick)
    assert 0.3 < np.mean([c["pancreas"] for c in sick]) < 0.5
    assert not make_ct_phantom(0, n_lesions=0).lesions


# =============================================================================================
# Scanner: noise and refusals
# =============================================================================================
def test_noise_has_the_seeds_sd_and_a_correlated_texture(by_phase):
    for case, tissue in by_phase["non-contrast"]:
        flat = core(tissue == ct_phantoms._CODE["liver"], 3)  # liver away from its edges and vessels
        v = case.ct.voxels.astype(np.float64)
        sd = v[flat].std()
        assert abs(sd - case.ct.meta["noise_hu"]) < 0.15 * case.ct.meta["noise_hu"] + 1.5, (case.seed, sd)
        pair = flat[:, :, :-1] & flat[:, :, 1:]
        r_in_plane = np.corrcoef(v[:, :, :-1][pair], v[:, :, 1:][pair])[0, 1]
        pair = flat[:-1] & flat[1:]
        r_between_slices = np.corrcoef(v[:-1][pair], v[1:][pair])[0, 1]
        assert r_in_plane > 0.2 and abs(r_between_slices) < 0.15, (case.seed, r_in_plane, r_between_slices)


def test_bad_arguments_are_refused_with_one_sentence():
    with pytest.raises(ValueError, match="phase"):
        make_ct_phantom(0, phase="arterial")
    with pytest.raises(ValueError, match="n_lesions"):
        make_ct_phantom(0, n_lesions=-1)
    with pytest.raises(ValueError, match="not 'liver'"):
        make_ct_phantom(0, n_lesions={"liver": 1})
