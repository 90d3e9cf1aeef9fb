"""The CT side through the command line: train --modality CT, run on a real CT with its organ labels, demo --modality
CT, evaluate of a CT organ model (phantoms and real anatomy, METHODS.md section 4), and the CT bad-input rules
(one sentence, exit 2, nothing written)."""

from __future__ import annotations

import csv
import json

import numpy as np

from DiffusionAnomalyLib.ct_evaluation import CEILING_METHOD, CT_EVALUATION_FILES
from DiffusionAnomalyLib.volume import read_volume, write_volume

from conftest import REAL_CT, needs_real_ct, run_refused, snapshot
from test_cli import RUN_OUTPUTS, listing, run_cli

ABDOMEN, ABDOMEN_LABELS = REAL_CT / "ct_abdomen_3mm.nii.gz", REAL_CT / "ct_abdomen_3mm_totalseg.nii.gz"
DICOM, DICOM_LABELS = REAL_CT / "ct_dicom", REAL_CT / "ct_dicom_totalseg.nii.gz"


def ct_args(checkpoint, classifier):
    return ("--checkpoint", checkpoint, "--classifier", classifier)


@needs_real_ct
def test_run_on_the_real_ct_with_its_organ_labels(tmp_path, capsys, tiny_ct_checkpoint, tiny_ct_classifier):
    out = tmp_path / "run"
    code, stdout, _ = run_cli(capsys, "run", "--input", ABDOMEN, "--roi-seg", ABDOMEN_LABELS, "--out", out,
                              *ct_args(tiny_ct_checkpoint, tiny_ct_classifier))
    assert code == 0, stdout
    assert listing(out) == RUN_OUTPUTS
    ct = read_volume(ABDOMEN)
    for name in ("heatmap.nrrd", "counterfactual.nrrd"):
        assert read_volume(out / name).same_geometry(ct)
    header = next(csv.reader(open(out / "lesions.csv", encoding="utf-8")))
    assert "hu_mean" in header and not any("suv" in h for h in header)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["method"] == "cg-ddim"  # the CT card's default method
    assert summary["organ_roi"]["roi_include"] == ["kidney_left", "kidney_right", "pancreas"]
    assert "those the scan shows" in stdout


@needs_real_ct
def test_a_ct_without_the_organ_named_is_refused_naming_it(tmp_path, capsys, tiny_ct_checkpoint, tiny_ct_classifier):
    out = tmp_path / "run"
    before = snapshot(DICOM, DICOM_LABELS)
    message = run_refused(capsys, "run", "--input", DICOM, "--roi-seg", DICOM_LABELS, "--roi-include", "kidneys,pancreas",
                          "--out", out, *ct_args(tiny_ct_checkpoint, tiny_ct_classifier))
    assert message.startswith("error: kidneys are not in the organ segmentation") and "leave kidneys out" in message
    assert not out.exists() and snapshot(DICOM, DICOM_LABELS) == before


@needs_real_ct
def test_a_ct_without_any_organ_segmentation_is_refused(tmp_path, capsys, tiny_ct_checkpoint, tiny_ct_classifier):
    out = tmp_path / "run"
    message = run_refused(capsys, "run", "--input", ABDOMEN, "--out", out, *ct_args(tiny_ct_checkpoint, tiny_ct_classifier))
    assert "crops around organs (kidney_left, kidney_right, pancreas): give the organ segmentation" in message
    assert not out.exists()


@needs_real_ct
def test_raw_ct_values_and_a_pet_are_refused_by_a_ct_model(tmp_path, capsys, tiny_ct_checkpoint, tiny_ct_classifier,
                                                            small_phantom):
    ct = read_volume(ABDOMEN, modality="CT")
    raw = tmp_path / "raw.nii.gz"
    write_volume(ct.with_voxels((np.asarray(ct.voxels, np.int32) + 1024).clip(0).astype(np.uint16)), raw)
    out = tmp_path / "run"
    message = run_refused(capsys, "run", "--input", raw, "--roi-seg", ABDOMEN_LABELS, "--out", out,
                          *ct_args(tiny_ct_checkpoint, tiny_ct_classifier))
    assert "raw stored values without the DICOM rescale" in message and not out.exists()
    pet = tmp_path / "pet.nrrd"
    write_volume(small_phantom, pet)
    message = run_refused(capsys, "run", "--input", pet, "--roi-seg", ABDOMEN_LABELS, "--out", out,
                          *ct_args(tiny_ct_checkpoint, tiny_ct_classifier))
    assert "trained on CT but the input is PET" in message and not out.exists()


def test_demo_ct_writes_the_pet_demos_set_of_files(tmp_path, capsys, tiny_ct_checkpoint, tiny_ct_classifier):
    out = tmp_path / "demo"
    code, stdout, _ = run_cli(capsys, "demo", "--modality", "CT", "--out", out,
                              *ct_args(tiny_ct_checkpoint, tiny_ct_classifier))
    assert code == 0 and "not for clinical use" in stdout and "CT" in stdout
    assert listing(out) == RUN_OUTPUTS | {"input_ct.nrrd", "ground_truth.seg.nrrd", "overview.png", "input_organs.nrrd"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ground_truth_lesions"] and all(les["organ"] in ("kidney_left", "kidney_right", "pancreas")
                                                   for les in summary["ground_truth_lesions"])
    assert read_volume(out / "heatmap.nrrd").same_geometry(read_volume(out / "input_ct.nrrd"))


@needs_real_ct
def test_evaluate_a_ct_model_on_phantoms_and_real_anatomy(tmp_path, capsys, tiny_ct_checkpoint, tiny_ct_classifier):
    out = tmp_path / "eval"
    code, stdout, _ = run_cli(capsys, "evaluate", "--phantoms", 2, "--seed", 7_100_000, "--real-ct", REAL_CT,
                              "--real-cases", 1, "--out", out, *ct_args(tiny_ct_checkpoint, tiny_ct_classifier))
    assert code == 0, stdout
    assert listing(out) == set(CT_EVALUATION_FILES)
    result = json.loads((out / "ct-metrics.json").read_text())
    phantoms, real = result["sets"]["held-out phantoms"], result["sets"]["real anatomy"]
    assert phantoms["cases"] == 2 and real["cases"] >= 1 and real["lesions"] >= 1
    for s in (phantoms, real):
        op = s["operating_point"]
        assert 0.0 <= op["recall"] <= 1.0 and op["false_positives_per_scan"] >= 0
        assert [b["bin"] for b in op["by_size"]] == ["<= 2 cm", "2-4 cm", "4-7 cm", "> 7 cm"]
        band = s["froc"]["read_at"]
        assert band["fp_limits"] == [0.5, 1.0, 2.0, 4.0, 8.0] and band["n_resamples"] == 1000
    assert "| held-out phantoms |" in stdout and "| real anatomy |" in stdout
    ceiling = result["sets"][f"held-out phantoms, {CEILING_METHOD}"]  # the same phantoms with their healthy twins
    assert ceiling["cases"] == 2 and ceiling["lesions"] == phantoms["lesions"]
    assert f"| held-out phantoms, {CEILING_METHOD} |" in stdout and len(result["sets"]) == 3  # none for real anatomy
    error = phantoms["counterfactual_error"]  # the model's counterfactual against each phantom's healthy twin
    assert error["normal_tissue_median_hu"] >= 0 and error["normal_tissue_p90_hu"] >= error["normal_tissue_median_hu"]
    assert "counterfactual_error" not in real and "healthy twin" in (out / "ct-metrics.md").read_text()
    assert "not clinical data" in (out / "ct-metrics.md").read_text()


def test_evaluate_of_a_ct_model_refuses_a_wrong_real_ct_folder(tmp_path, capsys, tiny_ct_checkpoint, tiny_ct_classifier):
    out = tmp_path / "eval"
    message = run_refused(capsys, "evaluate", "--phantoms", 1, "--seed", 7_100_000, "--real-ct", tmp_path,
                          "--out", out, *ct_args(tiny_ct_checkpoint, tiny_ct_classifier))
    assert "does not hold the real CTs" in message and not out.exists()


def test_train_ct_makes_a_ct_organ_card(tmp_path, capsys):
    out = tmp_path / "train"
    code, stdout, _ = run_cli(capsys, "train", "--modality", "CT", "--out", out, "--steps", 1, "--train-cases", 2,
                              "--val-cases", 1, "--val-every", 1, "--batch-size", 2, "--workers", 1)
    assert code == 0, stdout
    from DiffusionAnomalyLib.checkpoint import read_card

    card = read_card(out / "best.safetensors")
    assert card["modality"] == "CT" and card["preprocessing"]["crop"]["organs"] == ["kidney_left", "kidney_right",
                                                                                  "pancreas"]
    assert card["inference_defaults"]["method"] == "cg-ddim"
    assert "abdominal CT phantoms" in card["provenance"]["training_data"]


def test_the_bundled_ct_organ_model_and_its_classifier_fit():
    """The bundled CT model is the default for a CT, runs classifier-guided DDIM with the bundled classifier that fits,
    and says honestly what it was trained on."""
    from DiffusionAnomalyLib.checkpoint import bundled_checkpoint, bundled_classifier, check_classifier_fits, read_card

    card = read_card(bundled_checkpoint(modality="CT"))
    assert card["modality"] == "CT" and card["inference_defaults"]["method"] == "cg-ddim"
    assert card["preprocessing"]["crop"]["organs"] == ["kidney_left", "kidney_right", "pancreas"]
    assert card["not_for_clinical_use"] and "synthetic abdominal CT phantoms" in card["provenance"]["training_data"]
    classifier = read_card(bundled_classifier(card))
    check_classifier_fits(card, classifier)
    assert classifier["modality"] == "CT"
    assert read_card(bundled_checkpoint())["modality"] == "PT"  # the default without a modality stays the PET model


def test_sweeps_of_a_ct_organ_model_run_inside_its_organs(tmp_path, capsys, tiny_ct_checkpoint, tiny_ct_classifier):
    """Both sweeps take a CT organ model: crops of tuning CT phantoms around its organs, thresholds with its clean-up."""
    out = tmp_path / "sweep"
    code, stdout, _ = run_cli(capsys, "sweep", "--method", "cg-ddim", "--phantoms", 2, "--seed", 800_000,
                              "--noise-levels", 20, "--guidance-values", "0,100", "--steps", 1, "--out", out,
                              *ct_args(tiny_ct_checkpoint, tiny_ct_classifier))
    assert code == 0, stdout
    result = json.loads((out / "sweep.json").read_text())
    assert result["method"] == "cg-ddim" and result["slices"] > 0 and len(result["grid"]) == 2
    out = tmp_path / "whole"
    code, stdout, _ = run_cli(capsys, "sweep", "--whole-volume", "--phantoms", 2, "--seed", 810_000, "--out", out,
                              "--organ-excludes", "none", "--absolute-values", "20,40", "--fractions", "0.5",
                              "--min-sizes-ml", "0.05", *ct_args(tiny_ct_checkpoint, tiny_ct_classifier))
    assert code == 0, stdout
    result = json.loads((out / "sweep.json").read_text())
    assert result["method"] == "cg-ddim" and len(result["grid"]) == 3
    assert "post_processing" not in result  # the tiny card keeps the PET thresholding (no section 4 clean-up)
