"""`run --roi-seg`: lesion candidates outside a TotalSegmentator organ ROI are dropped (issue 8, first step).

The segmentation here is a label map written on another grid than the PET (other spacing and
extent), so the ROI is carried by physical coordinates as it would be from the CT of a PET/CT.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import slicerio

from DiffusionAnomalyLib import cli
from DiffusionAnomalyLib.roi import class_map
from DiffusionAnomalyLib.volume import Volume, ijk_to_ras_matrix, read_volume, resample_to, write_volume

from conftest import run_refused

LIVER = {v: k for k, v in class_map().items()}["liver"]
BRAIN = {v: k for k, v in class_map().items()}["brain"]


@pytest.fixture(scope="module")
def case(tmp_path_factory, small_phantom_case):
    """The small phantom as a file, and a 'liver' + 'brain' segmentation on a coarser, larger grid."""
    tmp = tmp_path_factory.mktemp("roi-run")
    pet = small_phantom_case.pet
    pet_path = write_volume(pet, tmp / "pet.nrrd")
    # a CT-like grid: 6 mm voxels, extending 30 mm beyond the PET on every side
    corner = pet.ijk_to_ras_points([[0, 0, 0]])[0]
    far = pet.ijk_to_ras_points([[s - 1 for s in pet.shape_ijk]])[0]
    lo, hi = np.minimum(corner, far) - 30, np.maximum(corner, far) + 30
    shape = tuple(int(n) for n in np.ceil((hi - lo) / 6.0) + 1)
    labels = np.zeros(shape[::-1], dtype=np.uint8)
    k = shape[2]
    labels[: k // 2] = LIVER  # the lower half of the body box is "liver"
    labels[k - 4:] = BRAIN
    seg = Volume(labels, ijk_to_ras_matrix((6.0, 6.0, 6.0), lo), modality="SEG")
    seg_path = write_volume(seg, tmp / "organs.nii.gz")
    return {"tmp": tmp, "pet": pet_path, "seg": seg_path}


def _run(tmp, name, pet, *extra, checkpoint):
    """One CLI run into ``tmp/name``; its summary and lesion labels ([k, j, i] on the PET grid)."""
    out = tmp / name
    assert cli.main(["run", "--checkpoint", str(checkpoint), "--input", str(pet), "--out", str(out),
                     "--steps", "2", "--threshold", "0.2", "--min-size-ml", "0", *[str(a) for a in extra]]) == 0
    seg = slicerio.read_segmentation(str(out / "lesions.seg.nrrd"))
    return json.loads((out / "summary.json").read_text()), np.asarray(seg["voxels"]).transpose(2, 1, 0)


def test_candidates_outside_the_organ_roi_are_dropped(case, tiny_checkpoint):
    organs = resample_to(read_volume(case["seg"]), read_volume(case["pet"]), "nearest").voxels  # on the PET grid
    s_whole, whole = _run(case["tmp"], "whole", case["pet"], checkpoint=tiny_checkpoint)
    s_in, inside = _run(case["tmp"], "liver", case["pet"], "--roi-seg", case["seg"], "--roi-include", "liver",
                        checkpoint=tiny_checkpoint)
    s_out, outside = _run(case["tmp"], "not-liver", case["pet"], "--roi-seg", case["seg"], "--roi-exclude", "liver",
                          checkpoint=tiny_checkpoint)
    assert s_in["organ_roi"]["include"] == "liver" and 0 < s_in["organ_roi"]["fraction_inside"] < 1
    assert s_out["organ_roi"]["exclude"] == "liver" and "organ_roi" not in s_whole
    # the same heat map, thresholded inside / outside the liver: every kept voxel on the right side
    assert whole.any() and np.all(organs[inside > 0] == LIVER) and not np.any(organs[outside > 0] == LIVER)
    assert (inside > 0).sum() + (outside > 0).sum() == (whole > 0).sum()  # include and exclude split the map


@pytest.mark.parametrize("extra, message", [
    (["--roi-include", "liver"], "need --roi-seg"),
    (["--roi-seg", "{seg}", "--roi-include", "livr"], "livr"),
    (["--roi-seg", "{seg}", "--roi-include", "kidneys"], "none of the included organs"),
    (["--roi-seg", "{seg}", "--roi-margin-mm", "-3"], "margin"),
    (["--roi-seg", "{missing}"], "not found|does not exist|no such"),
])
def test_bad_organ_roi_is_refused_before_any_work(case, tiny_checkpoint, capsys, extra, message):
    out = case["tmp"] / "refused"
    argv = [a.format(seg=case["seg"], missing=case["tmp"] / "none.nii.gz") for a in extra]
    line = run_refused(capsys, "run", "--checkpoint", tiny_checkpoint, "--input", case["pet"], "--out", out, *argv,
                       watch=(case["pet"], case["seg"], out))
    assert re.search(message, line, flags=re.IGNORECASE), line
