"""CT lesions (ct_lesions.py): shapes, sizes, placement, attenuation per kind and phase, texture, real-anatomy set."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import ConvexHull
from scipy.spatial.distance import pdist

from conftest import snapshot
from conftest import REAL_CT, needs_real_ct
from DiffusionAnomalyLib import ct_lesions
from DiffusionAnomalyLib.ct_lesions import (
    KIDNEY_DIAMETER_MM,
    LESION_KINDS,
    PANCREAS_DIAMETER_MM,
    PHASES,
    CtCase,
    draw_lesions,
    insert_into_real_ct,
    insert_lesion,
    insert_lesions,
    real_anatomy_set,
)
from DiffusionAnomalyLib.roi import OrganLabels, class_map, read_organ_labels
from DiffusionAnomalyLib.volume import Volume, ijk_to_ras_matrix, read_volume


SP = (3.0, 1.5, 1.5)  # k, j, i (mm): the CT phantoms' grid
KIDNEY_HU = {"non-contrast": (32.0, 32.0), "portal-venous": (165.0, 120.0)}  # cortex, medulla
PANCREAS_HU = {"non-contrast": 42.0, "portal-venous": 100.0}
NOISE_HU = 15.0


# =============================================================================================
# helpers
# =============================================================================================
def organ_scan(phase: str, organ: str = "kidney_left", seed: int = 0, shape=(36, 110, 110), axes_mm=(55, 40, 32),
               noise: float = NOISE_HU):
    """A synthetic organ (kidney: cortex shell + medulla; pancreas: uniform) in fat, blurred, with correlated noise."""
    k, j, i = np.ogrid[: shape[0], : shape[1], : shape[2]]
    centre = [(n - 1) / 2 for n in shape]
    r = np.sqrt(sum(((g - c) * s / a) ** 2 for g, c, s, a in zip((k, j, i), centre, SP, axes_mm)))
    inside = r < 1
    hu = np.full(shape, -100.0, np.float32)
    if organ == "pancreas":
        hu[inside] = PANCREAS_HU[phase]
    else:
        cortex, medulla = KIDNEY_HU[phase]
        hu[inside] = np.where(r[inside] > 0.75, cortex, medulla)
    hu = ndimage.gaussian_filter(hu, 1.0 / np.asarray(SP))
    n = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(shape), 0.8 / np.asarray(SP))
    return (hu + noise * n / n.std()).astype(np.float32), inside


def organ_labels(inside: np.ndarray, organ: str) -> OrganLabels:
    names = class_map()
    ids = {v: k for k, v in names.items()}
    volume = Volume(np.where(inside, ids[organ], 0).astype(np.uint8),
                    ijk_to_ras_matrix(SP[::-1], (0.0, 0.0, 0.0)), modality="SEG", units="label")
    return OrganLabels(volume=volume, names=names, source="test")


def centre(hu):
    return tuple(n // 2 for n in hu.shape)


def lesion(kind, phase, organ="kidney_left", diameter=30.0, seed=1, blur=0.7, **scan):
    hu, inside = organ_scan(phase, organ, **scan)
    before = hu.copy()
    mask = insert_lesion(hu, inside, SP, organ=organ, kind=kind, diameter_mm=diameter, center_kji=centre(hu),
                         phase=phase, rng=np.random.default_rng(seed), blur_sigma_mm=blur)
    return before, hu, mask, inside


def core(mask, depth_mm=3.0):
    """The lesion's voxels at least ``depth_mm`` inside its boundary (no partial volume)."""
    return ndimage.distance_transform_edt(mask, sampling=SP) > depth_mm


def high_pass(hu):
    return hu - ndimage.gaussian_filter(hu, (0, 2.0, 2.0))


def largest_extent_mm(mask) -> float:
    points = np.argwhere(mask) * np.asarray(SP)
    return float(pdist(points[ConvexHull(points).vertices]).max())


# =============================================================================================
# shared types
# =============================================================================================
def test_shared_constants():
    assert PHASES == ("non-contrast", "portal-venous")
    assert LESION_KINDS == {"kidney": ("simple-cyst", "complex-cyst", "solid", "necrotic"), "pancreas": ("hypo-mass",)}
    assert KIDNEY_DIAMETER_MM == (5.0, 70.0) and PANCREAS_DIAMETER_MM == (10.0, 40.0)


# =============================================================================================
# determinism, sizes, placement
# =============================================================================================
def test_same_seed_same_lesions_other_seed_other_lesions():
    hu, inside = organ_scan("portal-venous")
    labels = organ_labels(inside, "kidney_left")
    runs = []
    for seed in (4, 4, 5):
        work = hu.copy()
        lab, lesions = insert_lesions(work, labels, {"kidney_left": 3}, phase="portal-venous",
                                      rng=np.random.default_rng(seed), blur_sigma_mm=0.7)
        runs.append((work, lab, lesions))
    assert np.array_equal(runs[0][0], runs[1][0]) and np.array_equal(runs[0][1], runs[1][1])
    assert runs[0][2] == runs[1][2]
    assert not np.array_equal(runs[0][0], runs[2][0])
    work, lab, lesions = runs[0]
    for les in lesions:
        own = lab == les["id"]
        assert les["voxels"] == own.sum() > 0
        assert les["hu_mean"] == pytest.approx(float(work[own].mean()), abs=0.06)
        assert set(les) == {"id", "organ", "kind", "diameter_mm", "center_ras", "hu_mean", "voxels"}


@pytest.mark.parametrize("organ", ["kidney_left", "pancreas"])
def test_lesions_lie_in_the_organ_at_their_drawn_size(organ):
    lo, hi = ct_lesions.DIAMETER_MM[ct_lesions.LESION_ORGANS[organ]]
    hu, inside = organ_scan("non-contrast", organ)
    fit = ct_lesions.largest_fitting_diameter(inside, SP)
    assert lo < fit < hi + 40
    seen = 0
    for seed in range(6):
        work = hu.copy()
        for kind, diameter, c in draw_lesions(inside, SP, organ, 2, np.random.default_rng(seed)):
            assert kind in LESION_KINDS[ct_lesions.LESION_ORGANS[organ]]
            assert lo <= diameter <= min(hi, fit)
            assert inside[c]
            mask = insert_lesion(work, inside, SP, organ=organ, kind=kind, diameter_mm=diameter, center_kji=c,
                                 phase="non-contrast", rng=np.random.default_rng(seed))
            assert (mask & inside).sum() >= 0.7 * mask.sum()
            if mask.sum() > 20:  # the drawn diameter is the lesion's largest extent, to a voxel or two
                assert largest_extent_mm(mask) == pytest.approx(diameter, abs=2 * max(SP))
            seen += 1
    assert seen >= 8


def test_a_large_lesion_is_clipped_to_what_fits_the_organ():
    hu, inside = organ_scan("non-contrast", axes_mm=(50, 30, 18))  # a thin kidney: ~36 mm thick
    fit = ct_lesions.largest_fitting_diameter(inside, SP)
    assert fit < KIDNEY_DIAMETER_MM[1]
    drawn = [d for s in range(10) for _, d, _ in draw_lesions(inside, SP, "kidney_right", 3, np.random.default_rng(s))]
    assert max(drawn) <= fit and min(drawn) >= KIDNEY_DIAMETER_MM[0]


def test_a_lesion_insert_is_fast_on_the_phantom_grid():
    shape = (50, 200, 240)
    k, j, i = np.ogrid[: shape[0], : shape[1], : shape[2]]
    inside = ((k - 25) * 3 / 60) ** 2 + ((j - 100) * 1.5 / 45) ** 2 + ((i - 120) * 1.5 / 40) ** 2 < 1
    hu = np.where(inside, 30.0, -100.0).astype(np.float32)
    best = np.inf
    for seed in range(3):
        start = time.perf_counter()
        insert_lesion(hu, inside, SP, organ="kidney_left", kind="necrotic", diameter_mm=70.0, center_kji=(25, 100, 120),
                      phase="portal-venous", rng=np.random.default_rng(seed), blur_sigma_mm=1.0)
        best = min(best, time.perf_counter() - start)
    assert best < 0.2


# =============================================================================================
# attenuation by kind and phase
# =============================================================================================
@pytest.mark.parametrize("phase", PHASES)
def test_simple_cyst_is_fluid_and_darker_than_parenchyma(phase):
    before, hu, mask, inside = lesion("simple-cyst", phase)
    inner = core(mask)
    assert -5.0 < hu[inner].mean() < 20.0
    assert hu[inner].mean() < np.median(before[inside]) - 10.0


def test_simple_cyst_does_not_enhance():
    means = [lesion("simple-cyst", phase, seed=2) for phase in PHASES]
    nc, pv = (float(h[core(m)].mean()) for _, h, m, _ in means)
    assert abs(pv - nc) < 10.0  # enhancement means >= 20 HU


def test_complex_cyst_has_denser_fluid_and_an_enhancing_wall():
    _, nc, nc_mask, _ = lesion("complex-cyst", "non-contrast", diameter=40.0, seed=3)
    _, pv, pv_mask, _ = lesion("complex-cyst", "portal-venous", diameter=40.0, seed=3)
    assert 10.0 < np.median(nc[core(nc_mask)]) < 50.0
    wall_pv = np.percentile(pv[pv_mask], 90)
    assert wall_pv > np.median(pv[core(pv_mask)]) + 25.0  # wall and septa enhance
    assert wall_pv > np.percentile(nc[nc_mask], 90) + 25.0


def test_solid_tumour_is_near_iso_unenhanced_and_hypo_to_cortex_enhanced():
    before, nc, mask, inside = lesion("solid", "non-contrast")
    assert abs(np.mean(nc[core(mask)]) - np.median(before[inside])) < 15.0
    before, pv, mask, inside = lesion("solid", "portal-venous")
    cortex = KIDNEY_HU["portal-venous"][0]
    inner = pv[core(mask)]
    assert inner.mean() < cortex - 25.0
    assert inner.mean() > 40.0  # it does enhance
    assert np.std(ndimage.gaussian_filter(pv, 1.5)[core(mask)]) > 4.0  # heterogeneous beyond the noise


@pytest.mark.parametrize("phase", PHASES)
def test_necrotic_core_is_lower_than_its_rim(phase):
    _, hu, mask, _ = lesion("necrotic", phase, diameter=45.0, seed=5)
    depth = ndimage.distance_transform_edt(mask, sampling=SP)
    rim = mask & (depth > 1.0) & (depth < 3.5)
    deep = depth > 0.6 * depth.max()
    assert hu[deep].mean() < hu[rim].mean() - (40.0 if phase == "portal-venous" else 3.0)
    assert hu[deep].mean() < 25.0


@pytest.mark.parametrize("phase, below", [("non-contrast", (3.0, 20.0)), ("portal-venous", (25.0, 65.0))])
def test_pancreatic_mass_is_hypo_attenuating(phase, below):
    before, hu, mask, inside = lesion("hypo-mass", phase, organ="pancreas", diameter=30.0)
    drop = np.median(before[inside]) - hu[core(mask)].mean()
    assert below[0] < drop < below[1]


def test_the_scan_noise_texture_is_kept_inside_a_large_lesion():
    before, hu, mask, inside = lesion("simple-cyst", "non-contrast", diameter=50.0, blur=0.7)
    inner = core(mask, 4.0)
    scan_texture = np.std(high_pass(before)[ndimage.binary_erosion(inside, iterations=3) & ~mask])
    lesion_texture = np.std(high_pass(hu)[inner])
    assert lesion_texture == pytest.approx(scan_texture, rel=0.2)
    assert scan_texture > 0.5 * NOISE_HU


# =============================================================================================
# bad input
# =============================================================================================
def one_sentence(message: str) -> None:
    assert message.endswith(".") and "\n" not in message and message.count(". ") == 0


@pytest.mark.parametrize("changes, words", [
    ({"kind": "hemangioma"}, "hemangioma"),
    ({"kind": "hypo-mass"}, "kidney lesion"),
    ({"organ": "liver"}, "liver"),
    ({"phase": "arterial"}, "arterial"),
])
def test_bad_lesion_requests_are_refused_in_one_sentence(changes, words):
    hu, inside = organ_scan("non-contrast")
    args = dict(organ="kidney_left", kind="solid", diameter_mm=20.0, center_kji=centre(hu), phase="non-contrast",
                rng=np.random.default_rng(0)) | changes
    with pytest.raises(ValueError, match=words) as info:
        insert_lesion(hu, inside, SP, **args)
    one_sentence(str(info.value))


def test_an_empty_organ_is_refused_naming_it():
    with pytest.raises(ValueError, match="pancreas") as info:
        draw_lesions(np.zeros((5, 5, 5), bool), SP, "pancreas", 1, np.random.default_rng(0))
    one_sentence(str(info.value))


# =============================================================================================
# real anatomy
# =============================================================================================
@pytest.fixture(scope="module")
def real_set():
    before = snapshot(REAL_CT)
    cases = real_anatomy_set(REAL_CT, [0, 1, 2])
    return before, cases


@needs_real_ct
def test_real_set_cases_and_inputs_unchanged(real_set):
    before, cases = real_set
    assert snapshot(REAL_CT) == before  # never written
    assert [c.source for c in cases] == ["ct_abdomen_3mm.nii.gz", "ct_dicom"] * 3
    for case in cases:
        assert isinstance(case, CtCase) and case.lesions and case.lesion_mask.any()
        assert case.ct.modality == "CT" and case.ct.units == "HU" and case.ct.voxels.dtype == np.float32
        assert case.organs.volume.same_geometry(case.ct) and case.lesion_labels.same_geometry(case.ct)
        assert 3.0 < case.ct.meta["noise_hu"] < 40.0
        assert case.phase == ("non-contrast" if case.source.startswith("ct_abdomen") else "portal-venous")
        for les in case.lesions:
            own = case.lesion_labels.voxels == les["id"]
            assert les["hu_mean"] == pytest.approx(float(case.ct.voxels[own].mean()), abs=0.06)
    # seeded: the same seed gives the same case
    again = real_anatomy_set(REAL_CT, [1])
    assert np.array_equal(again[0].ct.voxels, cases[2].ct.voxels) and again[0].lesions == cases[2].lesions


@needs_real_ct
def test_real_lesions_lie_in_the_real_totalsegmentator_organs(real_set):
    _, cases = real_set
    labels = {name: read_organ_labels(REAL_CT / labels_name) for name, labels_name in ct_lesions.REAL_CTS}
    organs_seen = set()
    for case in cases:
        native = labels[case.source]  # the labels on their own grid (ct_dicom's flips y): physical coordinates
        for les in case.lesions:
            organ_id = native.ids[les["organ"]]
            own = np.argwhere(case.lesion_labels.voxels == les["id"])[:, ::-1]  # i, j, k
            ijk = np.rint(native.volume.ras_to_ijk_points(case.ct.ijk_to_ras_points(own))).astype(int)
            shape = native.volume.voxels.shape
            ok = np.all((ijk >= 0) & (ijk < np.array(shape[::-1])), axis=1)
            hits = native.volume.voxels[ijk[ok, 2], ijk[ok, 1], ijk[ok, 0]] == organ_id
            assert hits.sum() >= 0.6 * len(own), (case.source, les)
            organs_seen.add((case.source, les["organ"]))
    assert {o for s, o in organs_seen if s == "ct_dicom"} == {"pancreas"}
    assert {o for s, o in organs_seen if s != "ct_dicom"} >= {"kidney_left", "kidney_right"}


@needs_real_ct
def test_dicom_case_is_aligned_despite_the_flipped_labels(real_set):
    _, cases = real_set
    native = read_organ_labels(REAL_CT / "ct_dicom_totalseg.nii.gz")
    dicom = [c for c in cases if c.source == "ct_dicom"]
    assert np.sign(native.volume.ijk_to_ras[1, 1]) != np.sign(dicom[0].ct.ijk_to_ras[1, 1])  # y flipped
    for case in dicom:
        pancreas = case.organs.volume.voxels == 7
        for les in case.lesions:
            own = case.lesion_labels.voxels == les["id"]
            assert (own & pancreas).sum() >= 0.6 * own.sum()


@needs_real_ct
def test_real_insertion_copies_the_ct_and_refuses_absent_organs():
    ct = read_volume(REAL_CT / "ct_dicom", modality="CT", units="HU")
    labels = read_organ_labels(REAL_CT / "ct_dicom_totalseg.nii.gz")
    original = ct.voxels.copy()
    case = insert_into_real_ct(ct, labels, 7, ("pancreas",), n_lesions=1)
    assert np.array_equal(ct.voxels, original) and case.ct.voxels is not ct.voxels
    assert len(case.lesions) == 1 and case.source == "ct_dicom"
    with pytest.raises(ValueError, match="kidney_left") as info:
        insert_into_real_ct(ct, labels, 7, ("kidney_left", "pancreas"))
    one_sentence(str(info.value))
