"""Issue #11 on the command line, through ``cli.main``: ``rethreshold`` of an existing result (no network), its
refusals, progress and the plan when output is redirected, ``--help`` of every verb, the demo's per-lesion
matching, a DICOM Segmentation for a DICOM input, and the measured figures of the bundled models' cards.

One demo run (the tiny network, one DDIM step, a model card that excludes physiological uptake, so the result has
an organ map and an organ ROI) is shared by the module; each test that changes a result works on its own copy.
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import slicerio

from DiffusionAnomalyLib import cli, methods, metrics, networks
from DiffusionAnomalyLib.card import card_items
from DiffusionAnomalyLib.checkpoint import bundled_checkpoint, read_card
from DiffusionAnomalyLib.measurements import lesion_table
from DiffusionAnomalyLib.postprocessing import Thresholding
from DiffusionAnomalyLib.report import find_chromium
from DiffusionAnomalyLib.roi import OrganSelection, read_organ_labels
from DiffusionAnomalyLib.volume import read_volume, write_volume

from conftest import _seeded_network, run_refused, set_field
from test_cli import listing, run_cli
from test_dicom_seg import check_seg
from test_volume import make_pet_series

#: the heat map's units for a PET input in SUVbw
HEAT_UNITS = "|SUVbw difference|"
#: the demo's detection rule (cli.DEMO_IOU; METHODS.md section 4)
IOU = 0.2


# =============================================================================================
# helpers and shared runs
# =============================================================================================
@dataclass
class Run:
    folder: Path
    stdout: str
    stderr: str
    seconds: float


def run_redirected(*argv) -> tuple[int, str, str]:
    """``cli.main`` with stdout and stderr redirected to buffers (not a terminal, as in a log file)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def summary_of(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def csv_rows(folder: Path) -> list[dict]:
    with open(folder / "lesions.csv", newline="") as f:
        return list(csv.DictReader(f))


def seg_labels(path: Path) -> np.ndarray:
    """The label image of a Slicer .seg.nrrd as [k, j, i] (slicerio holds [i, j, k])."""
    return slicerio.read_segmentation(str(path))["voxels"].transpose(2, 1, 0)


def file_state(path: Path) -> tuple:
    """Bytes' hash, inode and modification time: a file rewritten (even with the same bytes) shows."""
    st = path.stat()
    return hashlib.sha256(path.read_bytes()).hexdigest(), st.st_ino, st.st_mtime_ns


def result_roi(folder: Path, record: dict | None = None) -> np.ndarray:
    """The organ ROI a result's summary records, built independently from its organ map on the heat map's grid."""
    roi = (record or summary_of(folder))["organ_roi"]
    selection = OrganSelection(tuple(roi["roi_include"]), tuple(roi["roi_exclude"]), float(roi["roi_margin_mm"]))
    heat = read_volume(folder / "heatmap.nrrd")
    return selection.masks(read_organ_labels(folder / roi["organs_path"]), grid=heat)[0]


def assert_lesions_are(folder: Path, thresholding: Thresholding, roi: np.ndarray) -> np.ndarray:
    """lesions.seg.nrrd and lesions.csv of ``folder`` are ``thresholding`` applied to its heatmap.nrrd in ``roi``."""
    heat = read_volume(folder / "heatmap.nrrd")
    expected = thresholding.apply(heat, roi)
    labels = seg_labels(folder / "lesions.seg.nrrd")
    np.testing.assert_array_equal(labels, expected)
    rows = csv_rows(folder)
    n = int(expected.max())
    assert [int(r["id"]) for r in rows] == list(range(1, n + 1))
    assert [int(r["voxels"]) for r in rows] == np.bincount(expected.ravel(), minlength=n + 1)[1:].tolist()
    assert summary_of(folder)["lesion_count"] == len(rows)
    return expected


def rethreshold(capsys, folder: Path, *options) -> tuple[dict, str]:
    """Run ``rethreshold --result folder options``; it must succeed. Prints (does not assert) its seconds."""
    t0 = time.perf_counter()
    code, out, err = run_cli(capsys, "rethreshold", "--result", folder, *options)
    seconds = time.perf_counter() - t0
    print(f"rethreshold {' '.join(map(str, options))}: {seconds:.2f} s")
    assert code == 0, err
    return summary_of(folder), out


@pytest.fixture(scope="module")
def excluding_checkpoint(tmp_path_factory, tiny_card) -> Path:
    """The tiny network under a card whose default organ ROI leaves out physiological uptake."""
    card = set_field(copy.deepcopy(tiny_card), "inference_defaults.organ_exclude", ["physiological-uptake"])
    return networks.save_checkpoint(_seeded_network(card, 0), card,
                                    tmp_path_factory.mktemp("excluding") / "tiny-excluding.safetensors")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, excluding_checkpoint) -> Run:
    """``demo --checkpoint tiny --steps 1`` with its output redirected; never change its folder (copy it)."""
    folder = tmp_path_factory.mktemp("demo") / "demo"
    t0 = time.perf_counter()
    code, out, err = run_redirected("demo", "--checkpoint", excluding_checkpoint, "--out", folder, "--steps", 1)
    assert code == 0, err
    return Run(folder, out, err, time.perf_counter() - t0)


@pytest.fixture()
def result(tmp_path, demo_run) -> Path:
    """A copy of the demo's result folder, for a test to change (removed afterwards: the maps are large)."""
    folder = shutil.copytree(demo_run.folder, tmp_path / "result")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture()
def no_network(monkeypatch):
    """Loading any model fails the test: rethreshold works on the heat map alone."""
    def refuse(*args, **kwargs):
        raise AssertionError("rethreshold loaded a model")

    monkeypatch.setattr(cli, "load_checkpoint", refuse)
    monkeypatch.setattr(methods, "load_checkpoint", refuse)


# =============================================================================================
# 1. rethreshold: new lesions, table, summary and report from the heat map, no network
# =============================================================================================
def test_demo_result_has_an_organ_map_and_an_roi(demo_run):
    record = summary_of(demo_run.folder)
    assert record["organ_roi"]["roi_exclude"] == ["physiological-uptake"]
    roi = result_roi(demo_run.folder)
    assert 0 < np.count_nonzero(roi) < roi.size
    heat = read_volume(demo_run.folder / "heatmap.nrrd").voxels
    assert heat[roi == 0].max() == 0 and heat[roi != 0].max() > 0  # the map is kept inside the ROI only
    print(f"demo: {demo_run.seconds:.1f} s")


def test_rethreshold_absolute(result, capsys, no_network):
    before = summary_of(result)
    maps = {name: file_state(result / name) for name in ("heatmap.nrrd", "counterfactual.nrrd")}
    report_before = (result / "report.html").read_bytes()
    value = 8.0
    after, out = rethreshold(capsys, result, "--threshold-absolute", value)

    assert after["threshold"]["applied_cut_off"] == value
    assert after["threshold"]["heat_map_units"] == HEAT_UNITS
    params = after["parameters"]
    assert (params["threshold_method"], params["threshold_value"]) == ("absolute", value)
    assert params["min_size_ml"] == before["parameters"]["min_size_ml"]  # not given: the run's
    assert (params["noise_level"], params["steps"]) == (before["parameters"]["noise_level"], 1)
    assert after["command_line"].startswith("diffusion-anomaly rethreshold --result")
    assert after["rethresholded_from"]["threshold"] == before["threshold"]
    assert after["rethresholded_from"]["created"] == before["created"]
    assert after["rethresholded_from"]["lesion_count"] == before["lesion_count"]
    assert after["phantom_seed"] == before["phantom_seed"] and after["organ_roi"]["roi_exclude"] == ["physiological-uptake"]

    expected = assert_lesions_are(result, Thresholding("absolute", value, before["parameters"]["min_size_ml"]),
                                  result_roi(result))
    assert expected.max() >= 1, "the chosen cut-off should leave a candidate"
    assert expected.max() != before["lesion_count"]
    assert f"threshold applied: heat above {value:g} {HEAT_UNITS}" in out

    html = (result / "report.html").read_text()
    assert html.encode() != report_before
    assert "Absolute cut-off applied" in html and f"{value:.4g} {HEAT_UNITS}" in html

    for name, state in maps.items():
        assert file_state(result / name)[0] == state[0], f"{name} changed"
    for name, state in maps.items():  # same ROI: write_outputs(write_maps=False) must leave the maps in place
        assert file_state(result / name) == state, f"{name} was rewritten although the ROI did not change"


@pytest.mark.parametrize("options, method, value, min_size", [
    (["--threshold-fraction", "35%", "--min-size-ml", 5], "fraction", 0.35, 5.0),
    (["--threshold-otsu", "--min-size-ml", 8], "otsu", None, 8.0),
    (["--min-size-ml", 3], "fraction", 0.5, 3.0),  # the run's rule kept, only the size changed
], ids=["fraction-35%", "otsu", "min-size-only"])
def test_rethreshold_rules(result, capsys, no_network, options, method, value, min_size):
    after, out = rethreshold(capsys, result, *options)
    params = after["parameters"]
    assert (params["threshold_method"], params["min_size_ml"]) == (method, min_size)
    thresholding = Thresholding(method, value, min_size)
    roi = result_roi(result)
    heat = read_volume(result / "heatmap.nrrd")
    assert after["threshold"]["applied_cut_off"] == pytest.approx(thresholding.cut_off(heat, roi), rel=1e-6)
    if method == "fraction":
        assert after["threshold"]["applied_cut_off"] == pytest.approx(value * heat.voxels[roi != 0].max(), rel=1e-6)
    assert f"(cut-off {after['threshold']['applied_cut_off']:.4g} {HEAT_UNITS})" in out
    assert_lesions_are(result, thresholding, roi)
    rows = csv_rows(result)
    assert rows and all(float(r["volume_ml"]) >= min_size - 1e-3 for r in rows)
    # the value recorded is the rule's own (Otsu has none: a fraction left from the run is not its value)
    assert params["threshold_value"] == value


def test_rethreshold_mtv_rule(result, capsys, no_network):
    first, _ = rethreshold(capsys, result, "--threshold-absolute", 8)
    assert first["parameters"]["mtv_rule"] == "41pct"
    rows_41 = csv_rows(result)
    after, _ = rethreshold(capsys, result, "--mtv-rule", "suv2.5")
    assert after["parameters"]["mtv_rule"] == "suv2.5"
    assert (after["parameters"]["threshold_method"], after["parameters"]["threshold_value"]) == ("absolute", 8)
    rows = csv_rows(result)
    assert [(r["id"], r["voxels"]) for r in rows] == [(r["id"], r["voxels"]) for r in rows_41]
    assert [r["mtv_ml"] for r in rows] != [r["mtv_ml"] for r in rows_41]
    # the MTV column is measurements' SUV >= 2.5 rule on these candidates
    labels = seg_labels(result / "lesions.seg.nrrd")
    table = lesion_table(labels, read_volume(result / "input_pet.nrrd"), read_volume(result / "heatmap.nrrd"),
                         organs=read_organ_labels(result / "input_organs.nrrd"), mtv_rule="suv2.5")
    assert [float(r["mtv_ml"]) for r in rows] == pytest.approx([r["mtv_ml"] for r in table], rel=1e-3, abs=1e-3)


def test_rethreshold_never_imports_torch_or_matplotlib(result):
    """rethreshold works on the heat map alone: it imports neither torch nor MONAI (their seconds of start-up would
    be most of its time), nor matplotlib (the report's figures are drawn with Pillow: its import alone took a
    quarter of the re-threshold's second). In a fresh interpreter, since this one has them."""
    code = ("import sys\n"
            "from DiffusionAnomalyLib import cli\n"
            f"assert cli.main(['rethreshold', '--result', {str(result)!r}, '--threshold-absolute', '8']) == 0\n"
            "print(sorted(m for m in ('torch', 'monai', 'matplotlib') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert summary_of(result)["threshold"]["applied_cut_off"] == 8.0  # it did re-threshold


# =============================================================================================
# 2. rethreshold refusals: exit 2, one error line, the result folder as it was
# =============================================================================================
def test_rethreshold_refuses_a_folder_that_is_not_a_result(tmp_path, capsys, no_network):
    folder = tmp_path / "not-a-result"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    line = run_refused(capsys, "rethreshold", "--result", folder, "--threshold-otsu", watch=[folder])
    assert "is not a result folder" in line and str(folder) in line


@pytest.mark.parametrize("options, words", [
    (["--roi-exclude", "none"], "reaches beyond"),  # wider than the run's ROI: the map outside it was not kept
    (["--threshold-fraction", "0.3", "--threshold-absolute", "1"], "not allowed with"),
    (["--threshold-fraction", "50"], "50%"),
], ids=["wider-roi", "two-rules", "fraction-50"])
def test_rethreshold_refusals(result, capsys, no_network, options, words):
    line = run_refused(capsys, "rethreshold", "--result", result, *options, watch=[result])
    assert words in line


def test_rethreshold_of_a_result_whose_input_moved(result, tmp_path, capsys, no_network):
    moved = tmp_path / "moved"
    moved.mkdir()
    new_input = shutil.move(result / "input_pet.nrrd", moved / "input_pet.nrrd")
    line = run_refused(capsys, "rethreshold", "--result", result, "--threshold-fraction", "0.4",
                       watch=[result, moved])
    assert "--input" in line and "input_pet.nrrd" in line

    after, _ = rethreshold(capsys, result, "--threshold-fraction", "0.4", "--input", new_input)
    assert after["parameters"]["threshold_value"] == 0.4
    assert_lesions_are(result, Thresholding("fraction", 0.4, after["parameters"]["min_size_ml"]), result_roi(result))
    recorded = Path(after["input_path"])
    recorded = recorded if recorded.is_absolute() else result / recorded
    assert recorded.is_file(), f"summary.json records the input at {after['input_path']}, which is not there"


def test_rethreshold_with_a_narrower_roi(result, capsys, no_network):
    before = read_volume(result / "heatmap.nrrd").voxels
    after, _ = rethreshold(capsys, result, "--roi-exclude", "physiological-uptake,liver")
    assert after["organ_roi"]["roi_exclude"] == ["physiological-uptake", "liver"]
    heat = read_volume(result / "heatmap.nrrd").voxels
    liver = read_organ_labels(result / "input_organs.nrrd").on_grid(read_volume(result / "heatmap.nrrd")).mask("liver")
    assert liver.any() and before[liver].any(), "the run's map should have heat in the liver"
    assert not heat[liver].any()
    np.testing.assert_array_equal(heat[~liver], before[~liver])
    roi = result_roi(result)
    assert not roi[liver].any()
    labels = assert_lesions_are(result, Thresholding("fraction", 0.5, after["parameters"]["min_size_ml"]), roi)
    assert not labels[liver].any()


# =============================================================================================
# 3. progress and plan when the output is redirected
# =============================================================================================
PROGRESS = re.compile(r"^diffusion: +\d+% .+ \(\d+ s\)$")


def assert_plan_progress_and_cut_off(stdout: str, record: dict) -> None:
    """The plan (model, parameters with the values used, threshold) before the first progress line, one line per
    stage from 0 % to 100 %, and the cut-off applied after the last one."""
    lines = stdout.splitlines()
    progress = [n for n, line in enumerate(lines) if PROGRESS.match(line)]
    assert progress, f"no progress lines in {stdout!r}"
    assert re.match(r"^diffusion: +0% preprocessing \(\d+ s\)$", lines[progress[0]])
    assert re.match(r"^diffusion: 100% done \(\d+ s\)$", lines[progress[-1]])

    def first(prefix: str) -> int:
        found = [n for n, line in enumerate(lines) if line.startswith(prefix)]
        assert found, f"no line starting with {prefix!r}"
        return found[0]

    model, parameters, threshold = first("model "), first("parameters: "), first("threshold: ")
    assert model < parameters < threshold < progress[0]
    p = record["parameters"]
    assert record["model"]["id"] in lines[model]
    words = lines[parameters]
    assert f"D {p['noise_level']}" in words and f"w {p['guidance_scale']:g}" in words and f"steps {p['steps']}" in words
    assert "50 % of the heat map's maximum" in lines[threshold]
    applied = first("threshold applied: ")
    assert applied > progress[-1]
    assert f"(cut-off {record['threshold']['applied_cut_off']:.4g} {HEAT_UNITS})" in lines[applied]


def test_demo_progress_and_plan_when_redirected(demo_run):
    assert_plan_progress_and_cut_off(demo_run.stdout, summary_of(demo_run.folder))


@pytest.fixture(scope="module")
def slab_file(tmp_path_factory, pet_slab) -> Path:
    return write_volume(pet_slab, tmp_path_factory.mktemp("slab") / "slab.nrrd")


def test_run_progress_plan_and_report_of_a_nrrd_input(tmp_path, capsys, tiny_checkpoint, slab_file):
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "run", "--checkpoint", tiny_checkpoint, "--input", slab_file, "--out", out,
                                "--steps", 1)
    assert code == 0, err
    assert_plan_progress_and_cut_off(stdout, summary_of(out))
    files = listing(out)
    assert "lesions.seg.dcm" not in files  # a NRRD input has no series to reference
    assert "report.html" in files
    assert ("report.pdf" in files) == bool(find_chromium())


# =============================================================================================
# 4. --help of every verb
# =============================================================================================
def _verbs() -> list[str]:
    parser = cli.build_parser()
    return [name for action in parser._actions if isinstance(action, argparse._SubParsersAction)
            for name in action.choices]


@pytest.mark.parametrize("verb", _verbs())
def test_help_of_every_verb_has_examples(capsys, verb):
    assert cli.main([verb, "--help"]) == 0
    text = capsys.readouterr().out
    assert "examples:" in text
    assert re.search(rf"^\s+diffusion-anomaly {re.escape(verb)}(\s|$)", text, re.M), text
    if verb == "run":
        assert "(default:" in text
        assert "(default: auto)" in " ".join(text.split())  # --device


# =============================================================================================
# 5. the demo says which candidate matched which true lesion, and by what rule
# =============================================================================================
def test_demo_names_the_match_of_each_true_lesion(demo_run):
    record = summary_of(demo_run.folder)
    truth_lesions = record["ground_truth_lesions"]
    detection = record["lesion_detection"]
    assert detection["rule"] == metrics.match_rule_words(IOU)
    assert metrics.match_rule_words(IOU) in demo_run.stdout
    assert len(detection["lesions"]) == len(truth_lesions) >= 1

    labels = seg_labels(demo_run.folder / "lesions.seg.nrrd")
    truth = seg_labels(demo_run.folder / "ground_truth.seg.nrrd")
    found = metrics.match_labels(labels, truth, IOU, n_truth=len(truth_lesions))
    assert [m["found"] for m in detection["lesions"]] == found["found"].tolist()
    assert detection["tp"] == int(found["found"].sum())
    assert detection["lesions"] == metrics.lesion_matches(labels, truth, IOU, n_truth=len(truth_lesions))

    lines = demo_run.stdout.splitlines()
    for match, lesion in zip(detection["lesions"], truth_lesions):
        (line,) = [x for x in lines if x.startswith(f"True lesion {lesion['id']} (")]
        if match["found"]:
            assert f"found by candidate {match['candidate']}" in line
        elif match["candidate"] is None:
            assert "missed" in line
        else:
            assert "not counted as found" in line and f"candidate {match['candidate']}" in line


def test_lesion_matches_of_a_candidate_holding_a_whole_lesion():
    truth = np.zeros((12, 12, 12), np.int32)
    pred = np.zeros_like(truth)
    truth[2:4, 2:4, 2:4] = 1  # 8 voxels ...
    pred[0:6, 0:6, 0:6] = 1  # ... inside a candidate of 216: IoU 8/216
    truth[8:11, 8:11, 8:11] = 2  # 27 voxels ...
    pred[8:11, 8:11, 7:11] = 2  # ... inside a candidate of 36: IoU 0.75
    truth[0, 11, 11] = 3  # no candidate near it
    rows = metrics.lesion_matches(pred, truth, IOU)
    assert [r["lesion"] for r in rows] == [1, 2, 3]

    whole = rows[0]
    assert (whole["found"], whole["candidate"]) == (False, 1)
    assert whole["iou"] == pytest.approx(8 / 216) and whole["iou"] < IOU
    assert whole["covered"] == 1.0 and whole["size_ratio"] == pytest.approx(27.0) and whole["size_ratio"] > 5

    assert (rows[1]["found"], rows[1]["candidate"]) == (True, 2)
    assert rows[1]["iou"] == pytest.approx(0.75) and rows[1]["iou"] >= IOU and rows[1]["covered"] == 1.0
    assert (rows[2]["found"], rows[2]["candidate"], rows[2]["covered"]) == (False, None, 0.0)
    assert [r["found"] for r in rows] == metrics.match_labels(pred, truth, IOU)["found"].tolist()

    # how the demo says it
    assert "not counted as found" in cli._match_words(whole) and "candidate 1" in cli._match_words(whole)
    assert cli._match_words(rows[1]).startswith("found by candidate 2")
    assert cli._match_words(rows[2]).startswith("missed")


# =============================================================================================
# 6. DICOM SEG from the CLI for a DICOM input
# =============================================================================================
def test_run_on_a_dicom_series_writes_a_dicom_seg(tmp_path, capsys, tiny_checkpoint):
    series, uid = tmp_path / "pet-dicom", "1.2.826.0.1.3680043.8.498.11011"
    make_pet_series(series, (1.0,) * 20, size=32, series_uid=uid)  # 128 x 128 x 60 mm
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "run", "--checkpoint", tiny_checkpoint, "--input", series, "--out", out,
                           "--steps", 1, "--threshold-absolute", 0.5)
    assert code == 0, err
    rows = csv_rows(out)
    assert rows, "the low cut-off should leave at least one candidate"
    files = listing(out)
    assert {"lesions.seg.dcm", "report.html"} <= files
    assert ("report.pdf" in files) == bool(find_chromium())

    seg = hd.seg.segread(out / "lesions.seg.dcm")
    assert seg.number_of_segments == len(rows)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
    # every frame on its source image, every lesion voxel as in lesions.seg.nrrd (test_dicom_seg's reader)
    check_seg(out / "lesions.seg.dcm", seg_labels(out / "lesions.seg.nrrd"), series, uid)


# =============================================================================================
# 7. the bundled models' cards show their measured figures and limits
# =============================================================================================
@pytest.mark.parametrize("modality", ["PT", "CT"])
def test_bundled_model_cards_have_measured_performance_and_limits(capsys, modality):
    path = bundled_checkpoint(modality=modality)
    items = dict(card_items(read_card(path)))
    assert items.get("Measured performance") and items.get("Limits")
    assert cli.main(["card", path.stem]) == 0
    shown = capsys.readouterr().out
    assert f"Measured performance: {items['Measured performance']}" in shown and f"Limits: {items['Limits']}" in shown


def test_rethreshold_keeps_the_runs_subject_unless_given_a_new_one(result, capsys, no_network):
    """The pseudonym given to the run stays in the re-thresholded report and summary; a new --subject replaces it."""
    record = summary_of(result)
    record["subject"] = "P-017"
    (result / "summary.json").write_text(json.dumps(record))
    after, _ = rethreshold(capsys, result, "--threshold-absolute", 8)
    assert after["subject"] == "P-017" and "P-017" in (result / "report.html").read_text()
    after, _ = rethreshold(capsys, result, "--subject", "P-018")
    assert after["subject"] == "P-018" and "P-018" in (result / "report.html").read_text()
