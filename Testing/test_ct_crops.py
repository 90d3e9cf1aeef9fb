"""Organ crops of a CT model (card ``preprocessing.crop``): placed around the organ region, every crop on the
card's grid, and maps pasted back onto the input's exact grid, on the real CTs whose axes are ordered differently."""

from __future__ import annotations

import numpy as np
import pytest

from DiffusionAnomalyLib import roi
from DiffusionAnomalyLib.card import CT_DESIGN
from DiffusionAnomalyLib.methods import load_checkpoint
from DiffusionAnomalyLib.pipeline import analyse
from DiffusionAnomalyLib.preprocessing import (CropStack, crop_grids, from_model_space, mask_to_model_space,
                                               to_model_space)
from DiffusionAnomalyLib.volume import read_volume

from conftest import REAL_CT, needs_real_ct

pytestmark = needs_real_ct

CASES = {"nifti": ("ct_abdomen_3mm.nii.gz", "ct_abdomen_3mm_totalseg.nii.gz", ("kidney_left", "kidney_right", "pancreas")),
         "dicom": ("ct_dicom", "ct_dicom_totalseg.nii.gz", ("pancreas",))}


@pytest.fixture(scope="module", params=sorted(CASES))
def real(request):
    image, labels, organs = CASES[request.param]
    ct = read_volume(REAL_CT / image, modality="CT")
    on = roi.read_organ_labels(REAL_CT / labels).on_grid(ct)
    region = roi.roi_mask(on, organs, None, 10.0).voxels
    return ct, on, organs, region


def prep() -> dict:
    return {"spacing_mm": list(CT_DESIGN["spacing_mm"]), "in_plane_size": list(CT_DESIGN["in_plane_size"]),
            "intensity": dict(CT_DESIGN["intensity"]), "crop": {"organs": ["kidney_left", "kidney_right", "pancreas"]}}


def test_crops_cover_the_region_on_the_card_grid(real):
    ct, _, organs, region = real
    stack = crop_grids(ct, prep(), region)
    assert isinstance(stack, CropStack) and len(stack.crops) >= len(organs) - (len(organs) > 1)
    for g in stack.crops:
        assert g.size[:2] == tuple(CT_DESIGN["in_plane_size"]) and g.spacing == tuple(CT_DESIGN["spacing_mm"])
    # every region voxel is covered by a crop, found by pasting ones back by physical coordinates
    ones = np.ones(stack.size[::-1], np.float32)
    back = from_model_space(ones, stack, ct).voxels
    assert np.isfinite(back[region > 0]).all()
    assert np.isnan(back).any()  # crops are crops: most of the scan is not covered
    assert np.nanmax(back) == pytest.approx(1.0) and np.nanmin(back) == pytest.approx(1.0)


def test_an_organ_in_model_space_comes_back_onto_itself(real):
    """Geometry: an organ mask carried into the crops and back overlays the organ on the input grid (both axis orders)."""
    ct, on, organs, region = real
    organ = on.mask(organs[-1])
    stack = crop_grids(ct, prep(), region)
    model = mask_to_model_space(ct.with_voxels(organ.astype(np.uint8)), stack)
    back = np.nan_to_num(from_model_space(model, stack, ct).voxels) >= 0.5
    dice = 2 * np.count_nonzero(back & organ) / (np.count_nonzero(back) + np.count_nonzero(organ))
    assert dice > 0.85
    x, same = to_model_space(ct, prep(), stack)
    assert same is stack and x.shape == stack.size[::-1]


def test_crops_are_refused_without_a_region():
    ct = read_volume(REAL_CT / "ct_abdomen_3mm.nii.gz", modality="CT")
    with pytest.raises(ValueError, match="organ segmentation"):
        crop_grids(ct, prep(), None)
    with pytest.raises(ValueError, match="empty"):
        crop_grids(ct, prep(), np.zeros(ct.voxels.shape, bool))


def test_a_crop_model_run_stays_on_the_input_grid(real, tiny_ct_checkpoint, tiny_ct_classifier):
    ct, _, _, region = real
    model = load_checkpoint(tiny_ct_checkpoint, classifier=tiny_ct_classifier)
    res = analyse(model, ct, region=region, roi=region)
    assert res.heatmap.same_geometry(ct) and res.counterfactual.same_geometry(ct)
    stack = res.method.grid
    covered = np.isfinite(from_model_space(np.ones(stack.size[::-1], np.float32), stack, ct).voxels)
    assert res.heatmap.voxels[~covered].max() == 0  # no heat outside the crops
    np.testing.assert_array_equal(res.counterfactual.voxels[~covered], ct.voxels[~covered].astype(np.float32))
    assert res.heatmap.voxels[covered].max() > 0
    assert res.method.network_evaluations > 0 and res.method.computed_slices == stack.size[2]
    again = analyse(load_checkpoint(tiny_ct_checkpoint, classifier=tiny_ct_classifier), ct, region=region, roi=region)
    np.testing.assert_array_equal(again.heatmap.voxels, res.heatmap.voxels)  # deterministic on CPU


def test_a_crop_model_without_organs_is_refused(tiny_ct_checkpoint, tiny_ct_classifier):
    ct = read_volume(REAL_CT / "ct_abdomen_3mm.nii.gz", modality="CT")
    model = load_checkpoint(tiny_ct_checkpoint, classifier=tiny_ct_classifier)
    with pytest.raises(ValueError, match="crops around organs"):
        analyse(model, ct)
    assert model.network_evaluations == 0
