"""`run --roi-seg`: lesion candidates outside a TotalSegmentator organ ROI are dropped (issue 8, first step).

The segmentation here is a label map written on another grid than the PET (other spacing and
extent), so the ROI is carried by physical coordinates as it would be from the CT of a PET/CT.
"""

from __future__ import annotations

import copy
import json
import re
import sys

import numpy as np
import pytest

import slicerio

from DiffusionAnomalyLib import cli
from DiffusionAnomalyLib.networks import save_checkpoint
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
    """One CLI run into ``tmp/name``; its summary, lesion labels and heat map ([k, j, i] on the PET grid)."""
    out = tmp / name
    rule = [] if any(str(a).startswith("--threshold-") for a in extra) else ["--threshold-fraction", "0.2"]
    assert cli.main(["run", "--checkpoint", str(checkpoint), "--input", str(pet), "--out", str(out),
                     "--steps", "2", *rule, "--min-size-ml", "0", *[str(a) for a in extra]]) == 0
    seg = slicerio.read_segmentation(str(out / "lesions.seg.nrrd"))
    return (json.loads((out / "summary.json").read_text()), np.asarray(seg["voxels"]).transpose(2, 1, 0),
            read_volume(out / "heatmap.nrrd").voxels)


def test_candidates_outside_the_organ_roi_are_dropped(case, tiny_checkpoint):
    organs = resample_to(read_volume(case["seg"]), read_volume(case["pet"]), "nearest").voxels  # on the PET grid
    liver = organs == LIVER
    s_whole, whole, heat = _run(case["tmp"], "whole", case["pet"], checkpoint=tiny_checkpoint)
    cut = ["--threshold-absolute", f"{0.2 * heat.max():.6g}"]  # one cut for every ROI
    _, whole, _ = _run(case["tmp"], "whole-abs", case["pet"], *cut, checkpoint=tiny_checkpoint)
    s_in, inside, heat_in = _run(case["tmp"], "liver", case["pet"], "--roi-seg", case["seg"], "--roi-include", "liver",
                                 *cut, checkpoint=tiny_checkpoint)
    s_out, outside, heat_out = _run(case["tmp"], "not-liver", case["pet"], "--roi-seg", case["seg"],
                                    "--roi-exclude", "liver", *cut, checkpoint=tiny_checkpoint)
    assert s_in["organ_roi"]["roi_include"] == ["liver"] and 0 < s_in["organ_roi"]["fraction_inside"] < 1
    assert s_out["organ_roi"]["roi_exclude"] == ["liver"] and "organ_roi" not in s_whole
    # every kept voxel on the right side of the ROI, and the heat map shown inside it only
    assert whole.any() and np.all(liver[inside > 0]) and not np.any(liver[outside > 0])
    assert not heat_in[~liver].any() and not heat_out[liver].any() and np.array_equal(heat_out[~liver], heat[~liver])
    # excluding the liver computes the whole volume: the same map, so the exclusion takes exactly its part away
    assert np.array_equal(outside > 0, (whole > 0) & ~liver)
    # including it computes only the slices the liver needs, with the same heat there
    assert s_in["model_slices"]["computed"] < s_in["model_slices"]["total"] == s_whole["model_slices"]["total"]
    assert s_in["network_evaluations"] < s_out["network_evaluations"] == s_whole["network_evaluations"]
    assert s_in["network_evaluations"] * s_in["model_slices"]["total"] == \
        s_whole["network_evaluations"] * s_in["model_slices"]["computed"]
    np.testing.assert_allclose(heat_in[liver], heat[liver], atol=1e-4 * heat.max())


def test_the_cards_default_exclusion_applies_unless_switched_off(case, tmp_path, tiny_card, tiny_model):
    card = copy.deepcopy(tiny_card)
    card["inference_defaults"].update(organ_exclude=["liver"], organ_margin_mm=12.0)
    checkpoint = save_checkpoint(tiny_model.model, card, tmp_path / "excluding.safetensors")
    s_default, _, heat = _run(case["tmp"], "default-exclusion", case["pet"], "--roi-seg", case["seg"],
                              checkpoint=checkpoint)
    assert s_default["organ_roi"]["roi_exclude"] == ["liver"] and s_default["organ_roi"]["roi_margin_mm"] == 12.0
    s_off, _, heat_off = _run(case["tmp"], "no-exclusion", case["pet"], "--roi-seg", case["seg"],
                              "--roi-exclude", "none", "--roi-margin-mm", "0", checkpoint=checkpoint)
    assert s_off["organ_roi"]["roi_exclude"] == [] and s_off["organ_roi"]["fraction_inside"] == 1.0
    assert np.count_nonzero(heat) < np.count_nonzero(heat_off)


FAKE_TOTALSEGMENTATOR = """#!{python}
# A stand-in for TotalSegmentator: copies a prepared segmentation to -o, or fails offline like it does.
import os, shutil, sys
args = sys.argv[1:]
open(os.environ["FAKE_TS_ARGS"], "w").write(" ".join(args))
if os.environ.get("FAKE_TS_MODE") == "offline":
    print("Downloading model for Task 291 ...", flush=True)
    print("requests.exceptions.ConnectionError: HTTPSConnectionPool(host='github.com', port=443): Max retries "
          "exceeded with url: /wasserth/TotalSegmentator/releases/download/v2.0.0-weights/x.zip", file=sys.stderr)
    sys.exit(1)
shutil.copyfile(os.environ["FAKE_TS_SEG"], args[args.index("-o") + 1])
"""


@pytest.fixture()
def fake_totalsegmentator(case, tmp_path, monkeypatch):
    env = tmp_path / "ts-env"
    program = env / "bin" / "TotalSegmentator"
    program.parent.mkdir(parents=True)
    program.write_text(FAKE_TOTALSEGMENTATOR.format(python=sys.executable))
    program.chmod(0o755)
    monkeypatch.setenv("DIFFUSION_ANOMALY_TOTALSEG_ENV", str(env))
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "ts-home"))
    monkeypatch.setenv("FAKE_TS_SEG", str(case["seg"]))
    monkeypatch.setenv("FAKE_TS_ARGS", str(tmp_path / "args.txt"))
    ct = case["tmp"] / "ct.nii.gz"
    if not ct.exists():
        seg = read_volume(case["seg"])
        write_volume(Volume(np.where(seg.voxels > 0, 60, -1000).astype(np.int16), seg.ijk_to_ras, modality="CT",
                            units="HU"), ct)
    return {"ct": ct, "args": tmp_path / "args.txt"}


def test_run_ct_segments_the_ct_first_and_keeps_its_segmentation(case, tiny_checkpoint, fake_totalsegmentator):
    s_ct, labels_ct, heat_ct = _run(case["tmp"], "from-ct", case["pet"], "--ct", fake_totalsegmentator["ct"],
                                    "--roi-include", "liver", checkpoint=tiny_checkpoint)
    s_seg, labels_seg, heat_seg = _run(case["tmp"], "from-seg", case["pet"], "--roi-seg", case["seg"],
                                       "--roi-include", "liver", checkpoint=tiny_checkpoint)
    assert "--roi_subset liver" in fake_totalsegmentator["args"].read_text()  # only the organs the ROI needs
    assert "TotalSegmentator on" in s_ct["organ_roi"]["segmentation"]
    assert np.array_equal(labels_ct, labels_seg) and np.array_equal(heat_ct, heat_seg)
    written = read_volume(case["tmp"] / "from-ct" / "organs.nii.gz")
    assert np.array_equal(written.voxels, read_volume(case["seg"]).voxels)
    assert np.allclose(written.ijk_to_ras, read_volume(case["seg"]).ijk_to_ras)


def test_run_ct_offline_is_one_sentence_and_writes_nothing(case, tiny_checkpoint, fake_totalsegmentator,
                                                           monkeypatch, capsys):
    monkeypatch.setenv("FAKE_TS_MODE", "offline")
    out = case["tmp"] / "offline"
    line = run_refused(capsys, "run", "--checkpoint", tiny_checkpoint, "--input", case["pet"], "--out", out,
                       "--ct", fake_totalsegmentator["ct"], "--roi-exclude", "liver",
                       watch=(case["pet"], fake_totalsegmentator["ct"], out))
    assert "weights (task 291)" in line and "existing TotalSegmentator segmentation instead" in line, line


def test_run_ct_refusals_come_before_totalsegmentator_runs(case, tiny_checkpoint, fake_totalsegmentator, tmp_path,
                                                           capsys):
    ct = read_volume(fake_totalsegmentator["ct"])
    moved = ct.ijk_to_ras.copy()
    moved[0, 3] += 900.0  # 90 cm to the patient's left: another frame of reference
    elsewhere = write_volume(Volume(ct.voxels, moved, modality="CT", units="HU"), tmp_path / "other_study_ct.nii.gz")
    out = case["tmp"] / "refused-ct"
    common = ("run", "--checkpoint", tiny_checkpoint, "--input", case["pet"], "--out", out)
    for extra, words in ((["--ct", fake_totalsegmentator["ct"]], "the organ ROI would be the whole volume"),
                         (["--ct", elsewhere, "--roi-include", "liver"], "the CT .* does not overlap the input volume"),
                         (["--totalseg-fast"], "--totalseg-fast only apply with --ct")):
        line = run_refused(capsys, *common, *extra, watch=(case["pet"], fake_totalsegmentator["ct"], out))
        assert re.search(words, line), line
    assert not fake_totalsegmentator["args"].exists()  # TotalSegmentator never started


@pytest.mark.parametrize("extra, message", [
    (["--roi-include", "liver"], "need --roi-seg"),
    (["--roi-seg", "{seg}", "--ct", "{seg}"], "either --roi-seg .* or --ct"),
    (["--roi-seg", "{seg}", "--roi-exclude", "brian"], "did you mean brain"),
    (["--roi-seg", "{seg}", "--roi-include", "livr"], "livr"),
    (["--roi-seg", "{seg}", "--roi-include", "kidneys"], "kidneys are not in the organ segmentation"),
    (["--roi-seg", "{seg}", "--roi-margin-mm", "-3"], "margin"),
    (["--roi-seg", "{missing}"], "not found|does not exist|no such"),
])
def test_bad_organ_roi_is_refused_before_any_work(case, tiny_checkpoint, capsys, extra, message):
    out = case["tmp"] / "refused"
    argv = [a.format(seg=case["seg"], missing=case["tmp"] / "none.nii.gz") for a in extra]
    line = run_refused(capsys, "run", "--checkpoint", tiny_checkpoint, "--input", case["pet"], "--out", out, *argv,
                       watch=(case["pet"], case["seg"], out))
    assert re.search(message, line, flags=re.IGNORECASE), line
