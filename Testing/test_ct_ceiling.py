"""The CT evaluation's ceiling rows: each phantom's noise-free healthy twin as the counterfactual, through the model's
window, organs and post-processing (what a perfect healthy counterfactual would score), and how far a model's
counterfactual is from that twin."""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from DiffusionAnomalyLib.card import ct_card
from DiffusionAnomalyLib.ct_evaluation import CEILING_METHOD, ceiling_case, counterfactual_error, healthy_twin
from DiffusionAnomalyLib.ct_phantoms import make_ct_phantom
from DiffusionAnomalyLib.postprocessing import Thresholding
from DiffusionAnomalyLib.roi import OrganSelection

SEED = 800003  # portal-venous, a 31 mm solid and a 23 mm necrotic kidney lesion


def test_the_healthy_twin_is_the_phantom_without_its_lesions_and_its_noise():
    case = make_ct_phantom(SEED)
    twin = healthy_twin(case)
    assert twin is not None and twin.same_geometry(case.ct)
    noise_free = make_ct_phantom(SEED, phase=case.phase, noise_sd_hu=0).ct.voxels.astype(np.float32)
    near = ndimage.binary_dilation(case.lesion_mask, iterations=4)  # the blur carries a lesion a few voxels out
    assert np.abs(twin.voxels[~near] - noise_free[~near]).max() <= 1  # same anatomy, no noise (int16 rounding)
    inside = case.lesion_mask
    assert np.abs(twin.voxels[inside] - noise_free[inside]).mean() > 20  # the lesions are gone
    noisy = case.ct.voxels.astype(np.float32)
    assert np.std((noisy - twin.voxels)[~near]) > 5  # what is left between scan and twin away from lesions: noise


def test_the_ceiling_finds_clear_lesions_and_is_only_for_phantoms():
    card = ct_card()
    chain = Thresholding.from_card(card)
    case = make_ct_phantom(SEED)
    row = ceiling_case(card, case, chain)
    assert row["method"] == CEILING_METHOD and row["network_evaluations"] == 0
    assert row["lesions"] == 2 and row["tp"] == 2 and row["fp"] <= 1
    assert row["threshold"] > 0 and len(row["froc_scores"]) == len(row["froc_hits"]) >= 2
    assert ceiling_case(card, dataclasses.replace(case, source="ct_abdomen_3mm.nii.gz"), chain) is None
    assert healthy_twin(dataclasses.replace(case, source="ct_abdomen_3mm.nii.gz")) is None


def test_counterfactual_error_is_zero_for_the_twin_and_full_for_the_input():
    card = ct_card()
    case = make_ct_phantom(SEED)
    twin = healthy_twin(case)
    roi, _ = OrganSelection.from_card(card).masks(case.organs, grid=case.ct)
    perfect = counterfactual_error(card, case, twin, twin, roi)
    assert perfect["normal_tissue_median_hu"] == 0 and perfect["normal_tissue_p90_hu"] == 0
    assert perfect["lesion_contrast_removed"] == [1.0, 1.0]
    copied = counterfactual_error(card, case, case.ct, twin, roi)  # a model that returns its input
    assert copied["lesion_contrast_removed"] == [0.0, 0.0]
    noise = case.ct.meta["noise_hu"]  # what is left is the scan's noise: median |N(0, sd)| = 0.67 sd
    assert 0.4 * noise < copied["normal_tissue_median_hu"] < 1.0 * noise
