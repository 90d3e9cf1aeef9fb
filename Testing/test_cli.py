"""The ``diffusion-anomaly`` command, called in-process: phantom, run, evaluate; every expected failure
exits 2 with one ``error:`` line that names the problem and leaves no result files behind."""

from __future__ import annotations

import csv
import datetime
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from DiffusionAnomalyLib import cli, evaluation
from DiffusionAnomalyLib import metrics as metrics_module
from DiffusionAnomalyLib.method_catalog import METHODS
from DiffusionAnomalyLib.phantoms import make_phantom
from DiffusionAnomalyLib.pipeline import analyse
from DiffusionAnomalyLib.roi import read_organ_labels
from DiffusionAnomalyLib.volume import Volume, VolumeError, read_volume, write_volume

from DiffusionAnomalyLib.files import sha256_of
from conftest import RUN_FILES, SMALL_PHANTOM_KWARGS, TRAIN_SEEDS, VAL_SEEDS, error_line

RUN_OUTPUTS = set(RUN_FILES)
CSV_HEADER = ("id,organ,voxels,volume_ml,suv_max,suv_mean,suv_peak,mtv_ml,tlg,max_heat,centroid_r,centroid_a,"
              "centroid_s")
METRIC_KEYS = {"dsc_opt", "hd95", "auprc", "sensitivity", "seconds_per_volume"}


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


@pytest.fixture(scope="module")
def pet_file(tmp_path_factory, small_phantom_case) -> Path:
    """The small phantom written as NRRD with modality PT and units SUVbw in its header."""
    pet = small_phantom_case.pet
    assert (pet.modality, pet.units) == ("PT", "SUVbw")
    return write_volume(pet, tmp_path_factory.mktemp("input") / "pet.nrrd")


# =============================================================================================
# phantom
# =============================================================================================
def read_phantom(folder: Path, seed: int) -> tuple[Volume, Volume, dict]:
    stem = f"phantom_{seed:06d}"
    assert listing(folder) == {f"{stem}_{kind}.nrrd" for kind in ("pet", "lesions", "ct", "organs")} | {f"{stem}.json"}
    pet = read_volume(folder / f"{stem}_pet.nrrd")
    labels = read_volume(folder / f"{stem}_lesions.nrrd", validate=False)  # a healthy case has an all-zero map
    return pet, labels, json.loads((folder / f"{stem}.json").read_text())


def test_phantom_is_written_and_deterministic(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "phantom", "--out", tmp_path / "a", "--seed", 3, "--count", 1)
    assert code == 0 and "phantom_000003" in out
    pet, labels, facts = read_phantom(tmp_path / "a", 3)
    assert (pet.modality, pet.units) == ("PT", "SUVbw")
    assert pet.voxels.ndim == 3 and pet.voxels.min() >= 0 and pet.voxels.max() > 1
    assert labels.same_geometry(pet)
    assert facts["seed"] == 3 and isinstance(facts["lesions"], list)
    assert set(np.unique(labels.voxels)) - {0} <= {les["id"] for les in facts["lesions"]}
    # a CT of the same anatomy on a grid of its own, and its organs as TotalSegmentator would give them
    ct = read_volume(tmp_path / "a" / "phantom_000003_ct.nrrd")
    organs = read_organ_labels(tmp_path / "a" / "phantom_000003_organs.nrrd")
    assert (ct.modality, ct.units) == ("CT", "HU") and not ct.same_geometry(pet) and organs.volume.same_geometry(ct)
    assert {"liver", "kidney_left", "urinary_bladder"} <= set(organs.on_grid(pet).present)
    assert "standing in for TotalSegmentator" in facts["organs"]

    assert run_cli(capsys, "phantom", "--out", tmp_path / "b", "--seed", 3)[0] == 0
    pet_b, labels_b, facts_b = read_phantom(tmp_path / "b", 3)
    np.testing.assert_array_equal(pet_b.voxels, pet.voxels)
    np.testing.assert_array_equal(labels_b.voxels, labels.voxels)
    np.testing.assert_array_equal(pet_b.ijk_to_ras, pet.ijk_to_ras)
    assert facts_b == facts

    assert run_cli(capsys, "phantom", "--out", tmp_path / "c", "--seed", 4)[0] == 0
    pet_c, _, facts_c = read_phantom(tmp_path / "c", 4)
    assert pet_c.voxels.shape == pet.voxels.shape
    assert not np.array_equal(pet_c.voxels, pet.voxels)
    assert facts_c["seed"] == 4


def test_phantom_refuses_an_unwritable_folder(tmp_path, capsys):
    (tmp_path / "afile").write_text("not a folder")
    code, _, err = run_cli(capsys, "phantom", "--out", tmp_path / "afile" / "out", "--seed", 3)
    assert code == 2
    assert str(tmp_path / "afile" / "out") in error_line(err)


# =============================================================================================
# run
# =============================================================================================
def test_run_writes_the_five_outputs(tmp_path, capsys, tiny_checkpoint, pet_file):
    out = tmp_path / "results"
    code, stdout, _ = run_cli(capsys, "run", "--checkpoint", tiny_checkpoint, "--input", pet_file, "--out", out,
                              "--steps", 2)
    assert code == 0
    assert listing(out) == RUN_OUTPUTS
    assert "lesion candidate(s)" in stdout

    assert (out / "lesions.csv").read_text().splitlines()[0] == CSV_HEADER
    with open(out / "lesions.csv", newline="") as f:
        rows = list(csv.DictReader(f))

    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["id"] == "igconda-pet-phantom-demo"
    params = summary["parameters"]
    assert (params["noise_level"], params["guidance_scale"], params["steps"]) == (50, 3.0, 2)
    assert (params["threshold_method"], params["threshold_value"], params["min_size_ml"]) == ("fraction", 0.5, 0.5)
    assert set(summary["timings_seconds"]) == {"preprocess", "encode", "decode", "postprocess", "segment"}
    assert all(v >= 0 for v in summary["timings_seconds"].values())
    assert summary["checkpoint"] == {"path": str(Path(tiny_checkpoint).resolve()), "sha256": sha256_of(tiny_checkpoint)}
    assert summary["input_path"] == str(Path(pet_file).resolve())
    assert summary["command_line"].startswith("diffusion-anomaly run --checkpoint")
    created = datetime.datetime.fromisoformat(summary["created"])
    assert created.tzinfo is not None and abs((datetime.datetime.now(created.tzinfo) - created).total_seconds()) < 600
    assert summary["software"].startswith("DiffusionAnomalyLib ") and "commit" in summary["software"]
    threshold = summary["threshold"]
    assert threshold["heat_map_units"] == "|SUVbw difference|" and threshold["applied_cut_off"] > 0
    assert f"cut-off {threshold['applied_cut_off']:.4g} |SUVbw difference|" in threshold["rule"]
    assert f"cut-off {threshold['applied_cut_off']:.4g} |SUVbw difference|" in stdout
    assert summary["lesion_count"] == len(rows) == summary["totals"][0][1]
    assert summary["network_evaluations"] > 0
    assert summary["compute"]["device"] == "cpu" and summary["compute"]["precision"] in ("fp32", "bf16")


@pytest.mark.parametrize("method, extra, counterfactual", [
    ("cdm", ["--noise-level", 20, "--steps", 2, "--tau", "0.9", "--noise-seed", 4], False),
    ("cg-ddim", ["--noise-level", 20, "--steps", 2, "--classifier-scale", 30], True),
    ("cg-ddpm", ["--noise-level", 20, "--steps", 2, "--noise-seed", 4], True),
    ("cg-cdm", ["--noise-level", 20, "--steps", 2], False),
])
def test_run_with_each_method(tmp_path, capsys, tiny_checkpoint, tiny_classifier, pet_file, method, extra,
                              counterfactual):
    """Every method by name: the summary says which method made the map with which parameters (the method's
    defaults for the others), its paper's threshold rule, and for a classifier-guided method the classifier
    and its p(unhealthy) per computed model slice; CDM's map has no counterfactual."""
    out = tmp_path / method
    takes = ["--classifier", tiny_classifier] if method.startswith("cg-") else []
    code, stdout, _ = run_cli(capsys, "run", "--checkpoint", tiny_checkpoint, "--input", pet_file, "--out", out,
                              "--method", method, *takes, *extra)
    assert code == 0, stdout
    assert ("counterfactual.nrrd" in listing(out)) is counterfactual
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["method"] == method and summary["model"]["network"] == "igconda"
    params = summary["parameters"]
    assert params["noise_level"] == 20 and params["steps"] == 2
    assert set(params) - {"threshold_method", "threshold_value", "min_size_ml", "mtv_rule"} == set(METHODS[method].parameter_names)
    assert params["threshold_method"] == METHODS[method].threshold[0]
    if method.startswith("cg-"):
        assert summary["classifier"]["id"] == "tiny-classifier" and summary["classifier_evaluations"] > 0
        rows = summary["classifier_confidence"]["slices"]
        assert rows and all(0.0 <= r["p_unhealthy"] <= 1.0 for r in rows)
        assert summary["model_slices"]["computed"] == len(rows)
    else:
        assert "classifier" not in summary and "classifier_confidence" not in summary


def test_run_precision_is_chosen_and_recorded(tmp_path, capsys, tiny_checkpoint, pet_file):
    heat = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        code, _, _ = run_cli(capsys, "run", "--checkpoint", tiny_checkpoint, "--input", pet_file, "--out", out,
                             "--steps", 2, "--precision", precision)
        assert code == 0
        assert json.loads((out / "summary.json").read_text())["compute"] == {"device": "cpu", "precision": precision}
        heat[precision] = read_volume(out / "heatmap.nrrd", validate=False)
    assert not np.array_equal(heat["fp32"].voxels, heat["bf16"].voxels)
    np.testing.assert_array_equal(heat["fp32"].ijk_to_ras, heat["bf16"].ijk_to_ras)

    source = read_volume(pet_file)
    heat = read_volume(out / "heatmap.nrrd")
    assert heat.voxels.shape == source.voxels.shape
    np.testing.assert_allclose(heat.ijk_to_ras, source.ijk_to_ras, atol=1e-4)


def test_run_passes_the_parameters_through(tmp_path, capsys, tiny_checkpoint, pet_file):
    out = tmp_path / "results"
    code, _, _ = run_cli(capsys, "run", "--checkpoint", tiny_checkpoint, "--input", pet_file, "--out", out,
                         "--steps", 1, "--noise-level", 30, "--guidance-scale", 1.5,
                         "--threshold-otsu", "--min-size-ml", 2.0)
    assert code == 0
    params = json.loads((out / "summary.json").read_text())["parameters"]
    assert (params["noise_level"], params["guidance_scale"], params["steps"]) == (30, 1.5, 1)
    assert (params["threshold_method"], params["threshold_value"], params["min_size_ml"]) == ("otsu", None, 2.0)


def test_steps_reference_runs_the_stride_1_loop_and_zero_is_refused(tmp_path, capsys, tiny_checkpoint, pet_file):
    out = tmp_path / "results"
    code, _, _ = run_cli(capsys, "run", "--checkpoint", tiny_checkpoint, "--input", pet_file, "--out", out,
                         "--steps", "reference", "--noise-level", 4)
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["parameters"]["steps"] == "reference"
    # stride 1: D encode and 2 D decode evaluations per model slice (D = 4)
    assert summary["network_evaluations"] % (3 * 4) == 0 and summary["network_evaluations"] > 0
    code, _, err = run_cli(capsys, "run", "--checkpoint", tiny_checkpoint, "--input", pet_file, "--out",
                           tmp_path / "zero", "--steps", "0")
    assert code == 2  # an argument error is a refusal like every other: exit 2, one error line
    assert "steps must be >= 1 (or 'reference'" in error_line(err)
    assert not (tmp_path / "zero").exists()


def test_demo_writes_its_set_of_files(tmp_path, capsys, tiny_checkpoint):
    out = tmp_path / "demo"
    code, stdout, _ = run_cli(capsys, "demo", "--checkpoint", tiny_checkpoint, "--out", out, "--steps", 1)
    assert code == 0 and "not for clinical use" in stdout
    assert listing(out) == RUN_OUTPUTS | {"input_pet.nrrd", "ground_truth.seg.nrrd", "overview.png", "input_organs.nrrd"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["phantom_seed"] == 7_000_001 and summary["parameters"]["steps"] == 1


def test_run_passes_units_and_modality_to_the_reader(tmp_path, capsys, tiny_checkpoint, pet_file, monkeypatch):
    seen = {}

    def reader(path, **kwargs):
        seen.update(kwargs)
        raise VolumeError("stop here")

    monkeypatch.setattr(cli, "read_volume", reader)
    out = tmp_path / "results"
    code, _, err = run_cli(capsys, "run", "--checkpoint", tiny_checkpoint, "--input", pet_file, "--out", out,
                           "--modality", "PT", "--units", "BQML")
    assert code == 2 and error_line(err) == "error: stop here"
    assert (seen["modality"], seen["units"], seen["suv_factor"]) == ("PT", "BQML", None)
    assert not out.exists()


def test_help_exits_0_and_argument_errors_are_one_error_line(capsys):
    assert cli.main(["--help"]) == 0
    assert cli.main(["run", "--help"]) == 0
    capsys.readouterr()
    assert cli.main(["run", "--out", "x"]) == 2  # --input missing
    assert "the following arguments are required: --input" in error_line(capsys.readouterr().err)
    assert cli.main(["phantom", "--out", "x", "--count", "0"]) == 2
    assert "the number of phantoms must be a whole number >= 1, got 0" in error_line(capsys.readouterr().err)
    assert cli.main(["nonsense"]) == 2
    assert "invalid choice: 'nonsense'" in error_line(capsys.readouterr().err)


def _write_sitk(image: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(image, str(path))
    return path


def _volume_file(tmp: Path, name: str, voxels: np.ndarray, **kwargs) -> Path:
    return write_volume(Volume(voxels, np.diag([4.0, 4.0, 5.0, 1.0]), **kwargs), tmp / name)


def _make_bad_input(kind: str, tmp: Path, pet_file: Path) -> Path:
    rng = np.random.default_rng(0)
    if kind == "missing":
        return tmp / "no-such-scan.nrrd"
    if kind == "unreadable":
        path = tmp / "garbage.nrrd"
        path.write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
        return path
    if kind == "2d":
        image = sitk.GetImageFromArray(rng.random((40, 40)).astype(np.float32))
        image.SetSpacing((2.0, 2.0))
        return _write_sitk(image, tmp / "slice.nrrd")
    if kind == "single-slice":
        return _volume_file(tmp, "single.nrrd", rng.random((1, 40, 40)).astype(np.float32), modality="PT", units="SUVbw")
    if kind == "constant":
        return _volume_file(tmp, "constant.nrrd", np.full((20, 24, 24), 1.5, np.float32), modality="PT", units="SUVbw")
    if kind == "nan":
        voxels = rng.random((20, 24, 24)).astype(np.float32) * 5
        voxels[10, 12, 3:9] = np.nan
        return _volume_file(tmp, "nan.nrrd", voxels, modality="PT", units="SUVbw")
    if kind == "ct":
        voxels = (rng.random((20, 24, 24)) * 1400 - 1000).astype(np.float32)
        return _volume_file(tmp, "ct.nrrd", voxels, modality="CT", units="HU")
    if kind == "too-large":
        # a real NRRD header describing 1000 x 1000 x 400 float voxels (1.6 GB) with no pixel data:
        # the size check reads the header only, so the library's real default limit is exercised
        path = tmp / "huge.nrrd"
        path.write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nspace: left-posterior-superior\n"
                         b"sizes: 1000 1000 400\nspace directions: (4,0,0) (0,4,0) (0,0,4)\n"
                         b"encoding: raw\nendian: little\n\n")
        return path
    return pet_file


BAD_RUNS = [
    # (id, input kind, extra arguments, words the error line must contain)
    ("missing-input", "missing", [], ["file not found", "no-such-scan.nrrd"]),
    ("unreadable-file", "unreadable", [], ["could not read", "garbage.nrrd"]),
    ("2d-image", "2d", [], ["2 dimensions", "3D"]),
    ("single-slice", "single-slice", [], ["2D image", "single slice"]),
    ("constant-volume", "constant", [], ["constant"]),
    ("nan-voxels", "nan", [], ["NaN", "6"]),
    ("ct-to-pet-model", "ct", [], ["PET", "CT"]),
    ("too-large", "too-large", [], ["too large", "400,000,000"]),
    ("missing-checkpoint", "pet", ["--checkpoint", "{tmp}/nowhere.safetensors"], ["checkpoint not found", "nowhere.safetensors"]),
    ("corrupt-checkpoint", "pet", ["--checkpoint", "{tmp}/corrupt.safetensors"], ["corrupt.safetensors", "not a readable"]),
    ("noise-level-out-of-range", "pet", ["--noise-level", "5000"], ["noise level"]),
]


@pytest.mark.parametrize("kind, extra, words", [b[1:] for b in BAD_RUNS], ids=[b[0] for b in BAD_RUNS])
def test_run_refuses_bad_input(tmp_path, capsys, tiny_checkpoint, pet_file, kind, extra, words):
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00\x01 not safetensors" * 50)
    path = _make_bad_input(kind, tmp_path, pet_file)
    extra = [a.format(tmp=tmp_path) for a in extra]
    if "--checkpoint" not in extra:
        extra += ["--checkpoint", str(tiny_checkpoint)]
    out = tmp_path / "results"
    code, _, err = run_cli(capsys, "run", "--input", path, "--out", out, "--steps", 1, *extra)
    assert code == 2
    line = error_line(err)
    for w in words:
        assert w in line, f"{w!r} not in {line!r}"
    assert listing(out) == set()


def test_run_refuses_an_output_folder_that_cannot_be_created(tmp_path, capsys, tiny_checkpoint, pet_file):
    (tmp_path / "afile").write_text("a regular file, not a folder")
    out = tmp_path / "afile" / "out"
    code, _, err = run_cli(capsys, "run", "--checkpoint", tiny_checkpoint, "--input", pet_file, "--out", out)
    assert code == 2
    assert str(out) in error_line(err)
    assert not out.exists()
    assert listing(tmp_path) == {"afile"}


def test_run_refuses_ct_named_on_the_command_line(tmp_path, capsys, tiny_checkpoint, pet_file):
    out = tmp_path / "results"
    code, _, err = run_cli(capsys, "run", "--checkpoint", tiny_checkpoint, "--input", pet_file, "--out", out,
                           "--modality", "CT")
    assert code == 2
    line = error_line(err)
    assert "PET" in line and "CT" in line
    assert listing(out) == set()


# =============================================================================================
# evaluate
# =============================================================================================
@pytest.mark.parametrize("phantoms, seed, which", [
    (1, 1005, "train seeds 1000..1009"),
    (3, TRAIN_SEEDS[0] - 2, "train seeds 1000..1009"),  # 998..1000: only the last one overlaps
    (1, VAL_SEEDS[0] + 1, "val seeds 900000..900001"),
])
def test_evaluate_refuses_seeds_used_for_training(tmp_path, capsys, tiny_checkpoint, phantoms, seed, which):
    out = tmp_path / "eval"
    code, _, err = run_cli(capsys, "evaluate", "--checkpoint", tiny_checkpoint, "--phantoms", phantoms,
                           "--seed", seed, "--out", out, "--steps", 1)
    assert code == 2
    line = error_line(err)
    assert "overlap" in line and which in line and "held-out" in line
    assert listing(out) == set()


def test_evaluate_on_held_out_small_phantoms(tmp_path, tiny_model):
    """The CLI has no option for phantom size, so the library call is tested with small phantoms."""
    seed = TRAIN_SEEDS[1]  # the first seed after the training range [1000, 1010) is held out
    out = tmp_path / "eval"
    result = evaluation.evaluate({"igconda": tiny_model}, 1, seed, out, parameters={"igconda": {"steps": 2}},
                                 phantom_kwargs=dict(SMALL_PHANTOM_KWARGS), log=lambda message: None)
    assert listing(out) == set(evaluation.EVALUATION_FILES)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["seeds"] == [seed, seed]
    assert metrics["checkpoint"] == tiny_model.card["id"]
    assert metrics["parameters"] == {"noise_level": 50, "guidance_scale": 3.0, "steps": 2}
    assert metrics["compute"] == {"device": "cpu", "precision": tiny_model.precision}
    assert set(metrics["methods"]) == {"igconda", "suv41"}
    for name, row in metrics["methods"].items():
        assert METRIC_KEYS <= set(row), name
        assert row["slices"] > 0, "the phantom should have unhealthy slices"
        assert row["slices"] == len(metrics["per_slice"][name])
        assert 0.0 <= row["dsc_opt"] <= 1.0 and 0.0 <= row["auprc"] <= 1.0 and 0.0 <= row["sensitivity"] <= 1.0
        assert row["seconds_per_volume"] > 0
    assert set(metrics["per_slice"]) == {"igconda", "suv41"}
    assert all(r["seed"] == seed for r in metrics["per_slice"]["igconda"])
    for name in ("igconda", "suv41"):  # the file holds what the call returned
        assert metrics["methods"][name]["slices"] == result["methods"][name]["slices"]
        assert metrics["methods"][name]["dsc_opt"] == pytest.approx(result["methods"][name]["dsc_opt"])
    md = (out / "metrics.md").read_text()
    assert "| igconda |" in md and "| suv41 |" in md
    # whole-volume detection at the default threshold, checked against the ground truth directly
    det = metrics["detection"]
    case = make_phantom(seed, **SMALL_PHANTOM_KWARGS)
    assert det["lesions"] == len(np.unique(case.lesion_labels.voxels)) - 1 == len(case.lesions)
    again = analyse(tiny_model, case.pet, parameters={"steps": 2})  # the same run the user would make
    expected = metrics_module.match_lesions(again.labels > 0, case.lesion_labels.voxels, iou_threshold=0.2)
    assert (det["found"], det["false_positives"]) == (expected["tp"], expected["fp"])
    assert det["found"] + det["false_positives"] == again.lesion_count
    assert det["per_case"][0]["seed"] == seed
    assert det["false_positives_per_volume"] == det["false_positives"]  # one case
    assert 0.0 <= det["mean_volume_dice"] <= 1.0
    assert det["threshold"] == {"threshold_method": "fraction", "threshold_value": 0.5, "min_size_ml": 0.5}
    assert "false positives per volume" in md


def test_evaluate_cli_on_a_held_out_seed(tmp_path, capsys, tiny_checkpoint):
    """End to end through the CLI (full-size phantom, one DDIM step)."""
    out = tmp_path / "eval"
    code, stdout, _ = run_cli(capsys, "evaluate", "--checkpoint", tiny_checkpoint, "--phantoms", 1,
                              "--seed", 5_000_000, "--out", out, "--steps", 1)
    assert code == 0
    assert listing(out) == set(evaluation.EVALUATION_FILES)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"igconda", "suv41"}
    assert "| igconda |" in stdout and "metrics.json" in stdout


# =============================================================================================
# sweep --write-defaults: how the bundled model's defaults were chosen
# =============================================================================================
def test_sweep_writes_a_checkpoint_with_the_best_defaults(tmp_path, capsys, tiny_checkpoint):
    from safetensors.torch import load_file

    from DiffusionAnomalyLib.checkpoint import read_card

    out, tuned = tmp_path / "sweep", tmp_path / "tuned.safetensors"
    code, stdout, _ = run_cli(capsys, "sweep", "--checkpoint", tiny_checkpoint, "--phantoms", 1, "--seed", 800_000,
                              "--noise-levels", "20,60", "--guidance-values", "0,5", "--steps", 2,
                              "--out", out, "--write-defaults", tuned)
    assert code == 0 and "tuned.safetensors" in stdout
    grid = json.loads((out / "sweep.json").read_text())["grid"]
    assert len(grid) == 4
    best = max(grid, key=lambda r: r["dsc_opt"])
    card = read_card(tuned)
    original = read_card(tiny_checkpoint)
    d = card["inference_defaults"]
    assert (d["noise_level"], d["guidance_scale"], d["steps"]) == (best["noise_level"], best["guidance_scale"], 2)
    assert d["threshold"] == original["inference_defaults"]["threshold"]
    assert card["provenance"]["tuning_seeds"] == [800_000, 800_001]
    assert card["provenance"]["inference_defaults_chosen_by"].startswith("diffusion-anomaly sweep --checkpoint")
    assert card["provenance"]["train_seeds"] == original["provenance"]["train_seeds"]
    weights, reference = load_file(str(tuned)), load_file(str(tiny_checkpoint))
    assert weights.keys() == reference.keys()
    assert all(np.array_equal(weights[k].numpy(), reference[k].numpy()) for k in weights)

    # parameters chosen on these cases must never be scored on them
    code, _, err = run_cli(capsys, "evaluate", "--checkpoint", tuned, "--phantoms", 1, "--seed", 800_000,
                           "--out", tmp_path / "eval", "--steps", 1)
    assert code == 2 and "tuning seeds 800000..800000" in error_line(err)
    assert listing(tmp_path / "eval") == set()


def test_sweep_refuses_to_overwrite_the_checkpoint_it_sweeps(tmp_path, capsys, tiny_checkpoint):
    before = Path(tiny_checkpoint).read_bytes()
    code, _, err = run_cli(capsys, "sweep", "--checkpoint", tiny_checkpoint, "--phantoms", 1, "--seed", 800_000,
                           "--noise-levels", "20", "--guidance-values", "0", "--steps", 1,
                           "--out", tmp_path / "sweep", "--write-defaults", tiny_checkpoint)
    assert code == 2 and "new file" in error_line(err)
    assert Path(tiny_checkpoint).read_bytes() == before
    assert listing(tmp_path / "sweep") == set()


def test_best_defaults_ignore_grid_points_without_a_score():
    card = {"inference_defaults": {"noise_level": 1, "guidance_scale": 1.0, "steps": 5}, "provenance": {}}
    result = {"seeds": [7, 9], "slices": 4, "grid": [
        {"noise_level": 100, "guidance_scale": 3.0, "steps": 5, "dsc_opt": 0.4},
        {"noise_level": 200, "guidance_scale": 7.0, "steps": 5, "dsc_opt": float("nan")},
        {"noise_level": 300, "guidance_scale": 1.0, "steps": 5, "dsc_opt": 0.6},
    ]}
    tuned = evaluation.card_with_best_defaults(card, result, "diffusion-anomaly sweep ...")
    assert tuned["inference_defaults"] == {"noise_level": 300, "guidance_scale": 1.0, "steps": 5}
    assert tuned["provenance"]["tuning_seeds"] == [7, 10]
    assert card["provenance"] == {}, "the input card is not modified"
    with pytest.raises(ValueError, match="no finite DSC_opt"):
        evaluation.card_with_best_defaults(card, {"seeds": [7, 7], "slices": 0, "grid": [
            {"noise_level": 1, "guidance_scale": 0.0, "steps": 5, "dsc_opt": float("nan")}]}, "x")


def test_version_models_and_card(capsys, tmp_path, tiny_checkpoint):
    """--version, the bundled models with their modality and default method, one model's card, and their refusals."""
    from DiffusionAnomalyLib.version import __version__

    code, stdout, _ = run_cli(capsys, "--version")
    assert code == 0 and stdout.strip() == f"diffusion-anomaly {__version__}"
    (tmp_path / "broken.safetensors").write_bytes(b"not a checkpoint")
    import shutil
    shutil.copy(tiny_checkpoint, tmp_path / "mine.safetensors")
    code, stdout, _ = run_cli(capsys, "models", "--dir", tmp_path)
    assert code == 0
    assert "igconda-pet-phantom-demo" in stdout and "PT, igconda:" in stdout and "CT, cg-ddim:" in stdout
    assert "mine  (" in stdout and "broken  (" in stdout and "not usable:" in stdout
    code, stdout, _ = run_cli(capsys, "card", "cg-ct-organs-demo")
    assert code == 0 and "Modality: CT" in stdout and "Method: cg-ddim by default" in stdout
    assert "Not for clinical use: yes" in stdout
    code, stdout, _ = run_cli(capsys, "card", tmp_path / "mine.safetensors")
    assert code == 0 and "Model: " in stdout
    code, _, err = run_cli(capsys, "card", "no-such-model")
    assert code == 2 and error_line(err).startswith("error: no bundled model 'no-such-model'")
    code, _, err = run_cli(capsys, "models", "--dir", tmp_path / "missing")
    assert code == 2 and "is not a folder" in error_line(err)


def test_version_models_and_card_start_without_torch():
    """The verbs that only read (--version, models, card, --help of a verb) import neither torch nor MONAI: they
    start in about half a second instead of seconds (a fresh interpreter, since this one has torch)."""
    code = ("import sys\n"
            "from DiffusionAnomalyLib import cli\n"
            "for argv in (['--version'], ['models'], ['card', 'igconda-pet-phantom-demo'], ['rethreshold', '--help']):\n"
            "    assert cli.main(argv) == 0, argv\n"
            "print(sorted(m for m in ('torch', 'monai') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_a_full_gpu_is_one_error_line_and_a_bug_keeps_its_traceback(monkeypatch, capsys):
    """torch's CUDA out-of-memory error is refused in one sentence (exit 2), as every refusal; an unexpected error
    is not swallowed."""
    import torch

    def full(args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(cli, "_cmd_models", full)
    code, _, err = run_cli(capsys, "models")
    assert code == 2
    assert error_line(err) == ("error: the GPU ran out of memory (CUDA out of memory); close other GPU programs, use "
                               "--device cpu or a smaller input")

    def bug(args):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "_cmd_models", bug)
    with pytest.raises(KeyError):
        cli.main(["models"])
