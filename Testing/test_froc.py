"""Whole-volume lesion detection (issue 8): FROC curves and operating points of ``evaluate``, and the
whole-volume threshold sweep that writes the card's thresholding and organ-exclusion defaults.

Synthetic scenes with plateau-valued spheres give exact answers; the tiny model on small phantoms
checks the curves against direct :func:`.postprocessing.segment` calls; the CLI tests check the
card round trip and that bad arguments are refused before any network work.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from DiffusionAnomalyLib import cli, evaluation, metrics
from DiffusionAnomalyLib.card import validate_card
from DiffusionAnomalyLib.checkpoint import read_card
from DiffusionAnomalyLib.evaluation import (FROC_FRACTIONS, CaseLesions, DetectionTally, best_whole_volume_setting,
                                            card_with_threshold_defaults, default_exclusion, detection_points)
from DiffusionAnomalyLib.methods.igconda import IgcondaModel
from DiffusionAnomalyLib.phantoms import make_phantom
from DiffusionAnomalyLib.postprocessing import Thresholding, segment
from DiffusionAnomalyLib.roi import OrganLabels, OrganSelection, class_map
from DiffusionAnomalyLib.volume import Volume, ijk_to_ras_matrix

from conftest import SMALL_PHANTOM_KWARGS, TRAIN_SEEDS, run_refused

SPACING_MM = 4.0


# ---- synthetic scenes: spheres of constant value on a low background --------------------------
def _scene(spheres, shape=(40, 40, 48)):
    """(map Volume, case-like object with lesions and lesion_labels, organ OrganLabels) of ``spheres``:
    (centre [k, j, i], radius in voxels, value, kind) with kind "lesion", "false" or an organ name."""
    kk, jj, ii = np.indices(shape)
    voxels = np.full(shape, 0.5, np.float32)
    labels = np.zeros(shape, np.int16)
    organs = np.zeros(shape, np.int16)
    ids = {name: i for i, name in class_map().items()}
    lesions = []
    for centre, radius, value, kind in spheres:
        inside = (kk - centre[0]) ** 2 + (jj - centre[1]) ** 2 + (ii - centre[2]) ** 2 <= radius ** 2
        voxels[inside] = value
        if kind == "lesion":
            lesions.append({"id": len(lesions) + 1, "radius_mm": radius * SPACING_MM})
            labels[inside] = len(lesions)
        elif kind != "false":
            organs[inside] = ids[kind]
    m = ijk_to_ras_matrix((SPACING_MM,) * 3, (0.0, 0.0, 0.0))
    pet = Volume(voxels, m, modality="PT", units="SUVbw")
    case = SimpleNamespace(lesions=lesions, lesion_labels=Volume(labels, m.copy()), pet=pet)
    return pet, case, OrganLabels(Volume(organs, m.copy()), class_map(), source="test organs")


PLATEAUS = [((8, 8, 8), 2, 9.0, "lesion"), ((8, 8, 24), 2, 7.0, "lesion"), ((8, 24, 8), 2, 5.0, "lesion"),
            ((8, 24, 24), 2, 3.0, "lesion"), ((28, 8, 8), 2, 8.0, "false"), ((28, 8, 24), 2, 6.0, "false"),
            ((28, 24, 8), 2, 4.0, "false")]


def test_froc_of_plateaus_is_monotonic_and_exact():
    """Each candidate is a plateau, so a lower threshold adds whole candidates: sensitivity and false
    candidates never fall as the threshold falls, and each point is known exactly."""
    pet, case, _ = _scene(PLATEAUS)
    lesions = CaseLesions.of(case)
    rules = [("fraction", v) for v in sorted(FROC_FRACTIONS, reverse=True)]
    points = detection_points(pet, lesions, None, rules, [0.0])
    found = [int(p["found"].sum()) for p in points]
    false = [p["false_positives"] for p in points]
    assert found == sorted(found) and false == sorted(false)
    by_value = {p["value"]: (int(p["found"].sum()), p["false_positives"]) for p in points}
    assert by_value[0.95] == (1, 0)  # above 8.55: the 9 only
    assert by_value[0.5] == (3, 2)  # above 4.5: lesions 9, 7, 5 and the false 8, 6
    assert by_value[0.1] == (4, 3)  # above 0.9: everything, the background (0.5) still below
    tally = DetectionTally()
    for rule, point in zip(rules, points):
        tally.add(rule, point, lesions, seed=1)
    summaries = [tally.summary(rule) for rule in rules]
    fp = [s["false_positives_per_volume"] for s in summaries]
    sens = [s["sensitivity"] for s in summaries]
    readings = [metrics.sensitivity_at(fp, sens, limit) for limit in (0, 0.5, 1, 2, 3, 8)]
    assert readings == [0.25, 0.25, 0.5, 0.75, 1.0, 1.0] == sorted(readings)


def test_sensitivity_at_reads_the_curve_as_a_reader_does():
    assert metrics.sensitivity_at([5.0, 2.0, 0.5], [0.9, 0.6, 0.2], 1.0) == 0.2
    assert metrics.sensitivity_at([5.0, 2.0, 0.5], [0.9, 0.6, 0.2], 0.1) == 0.0  # no point: no candidates at all
    assert metrics.sensitivity_at([5.0, 0.0], [0.9, 0.4], 8) == 0.9
    assert np.isnan(metrics.sensitivity_at([1.0], [float("nan")], 1.0))  # no lesions
    with pytest.raises(ValueError, match="one sensitivity per operating point"):
        metrics.sensitivity_at([1.0, 2.0], [0.5], 1.0)


def test_the_baseline_with_and_without_a_hot_bladder_excluded():
    """A bladder at SUV 40 sets the baseline's 41 % threshold above every lesion; excluded, it does not."""
    pet, case, organs = _scene([((10, 10, 10), 3, 8.0, "lesion"), ((10, 10, 30), 3, 6.0, "lesion"),
                                ((30, 20, 20), 5, 40.0, "urinary_bladder")])
    card = {"inference_defaults": {}}
    selection, note = default_exclusion(card)
    assert selection.exclude == ("physiological-uptake",) and "no default organ exclusion" in note
    roi = selection.mask(organs, grid=pet).voxels != 0
    lesions = CaseLesions.of(case)
    [plain] = detection_points(pet, lesions, None, [("fraction", 0.41)], [0.5])
    [excluded] = detection_points(pet, lesions, roi, [("fraction", 0.41)], [0.5])
    assert (int(plain["found"].sum()), plain["false_positives"]) == (0, 1)  # the bladder only
    assert (int(excluded["found"].sum()), excluded["false_positives"]) == (2, 0)
    # the same as segment() itself, whose fraction is of the maximum inside the ROI
    direct = segment(pet, method="fraction", value=0.41, min_size_ml=0.5, roi=roi)
    assert direct.max() == 2 and np.array_equal(direct > 0, case.lesion_labels.voxels > 0)


def test_the_card_default_exclusion_is_used_and_checked():
    card = {"inference_defaults": {"organ_exclude": ["urinary_bladder"], "organ_margin_mm": 5.0}}
    selection, note = default_exclusion(card)
    assert selection == OrganSelection(exclude=("urinary_bladder",), margin_mm=5.0)
    assert note == "the model card's default organ exclusion"
    with pytest.raises(ValueError, match="unknown organ 'kidny'"):
        default_exclusion({"inference_defaults": {"organ_exclude": ["kidny"]}})


# ---- the curves against direct segment() calls -------------------------------------------------
@pytest.fixture(scope="module")
def small_case():
    return make_phantom(TRAIN_SEEDS[1], **SMALL_PHANTOM_KWARGS)


@pytest.fixture(scope="module")
def small_heat(tiny_checkpoint, small_case):
    from DiffusionAnomalyLib.methods import load_checkpoint

    return load_checkpoint(tiny_checkpoint, device="cpu").run(small_case.pet, steps=2).heatmap


def test_detection_points_agree_with_segment_and_match_lesions(small_case, small_heat, tiny_card):
    case = small_case
    lesions = CaseLesions.of(case)
    selection, _ = default_exclusion(tiny_card)
    roi = selection.mask(case.organs, grid=case.pet).voxels != 0
    settings = [(0.3, 0.0), (0.41, 0.25), (0.5, 0.5), (0.7, None)]
    for score in (small_heat, case.pet):
        for region in (None, roi):
            points = detection_points(score, lesions, region, [("fraction", v) for v, _ in settings],
                                      [m for _, m in settings])
            for value, size in settings:
                [point] = [p for p in points if p["value"] == value and p["min_size_ml"] == size]
                labels = segment(score, method="fraction", value=value, min_size_ml=size, roi=region)
                expected = metrics.match_lesions(labels > 0, case.lesion_labels.voxels, iou_threshold=0.2)
                assert (int(point["found"].sum()), point["false_positives"]) == (expected["tp"], expected["fp"])
                assert point["candidates"] == labels.max()
                assert point["dice"] == pytest.approx(metrics.dice(labels > 0, case.lesion_mask))


def test_evaluate_reports_froc_and_operating_points(tmp_path, tiny_model, small_case, small_heat):
    seed = TRAIN_SEEDS[1]
    out = tmp_path / "eval"
    result = evaluation.evaluate({"igconda": tiny_model}, 1, seed, out, parameters={"igconda": {"steps": 2}},
                                 phantom_kwargs=dict(SMALL_PHANTOM_KWARGS), log=lambda m: None)
    assert sorted(p.name for p in out.iterdir()) == sorted(evaluation.EVALUATION_FILES)
    assert (out / "froc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "metrics.json").read_text())
    whole = saved["whole_volume"]
    assert "physiological-uptake used instead" in whole["exclusion"]["note"]
    curves = {(c["method"], c["organ_exclusion"]): c for c in whole["curves"]}
    assert set(curves) == {("igconda", False), ("igconda", True), ("suv41", False), ("suv41", True)}
    thresholding = Thresholding.from_card(tiny_model.card)
    roi = default_exclusion(tiny_model.card)[0].mask(small_case.organs, grid=small_case.pet).voxels != 0
    for (method, excluded), curve in curves.items():
        assert len(curve["points"]) == len(FROC_FRACTIONS) + (method == "suv41")  # 0.5 is on the grid, 0.41 not
        op = curve["operating_point"]
        assert op["found"] + op["false_positives"] > 0, (method, excluded)  # candidates to compare, not 0 == 0
        assert sum(b["lesions"] for b in op["by_size"]) == op["lesions"] == len(small_case.lesions)
        assert sum(b["found"] for b in op["by_size"]) == op["found"]
        # the operating point is what segment() gives with the card's thresholding (the baseline: 41 % SUVmax)
        score, value = (small_heat, thresholding.value) if method == "igconda" else (small_case.pet, 0.41)
        labels = segment(score, method="fraction", value=value, min_size_ml=thresholding.min_size_ml,
                         roi=roi if excluded else None)
        expected = metrics.match_lesions(labels > 0, small_case.lesion_labels.voxels, iou_threshold=0.2)
        assert (op["found"], op["false_positives"]) == (expected["tp"], expected["fp"]), (method, excluded)
        assert op["threshold_value"] == value and op["min_size_ml"] == thresholding.min_size_ml
    plain = curves[("igconda", False)]["operating_point"]
    assert (saved["detection"]["found"], saved["detection"]["false_positives"]) == (plain["found"],
                                                                                    plain["false_positives"])
    assert saved["methods"] == json.loads(json.dumps(result["methods"]))  # the per-slice metrics are still there
    md = (out / "metrics.md").read_text()
    assert "| suv41 | physiological-uptake | fraction 0.41, >= 0.5 ml |" in md
    assert "Sensitivity by lesion size" in md and "r < 5 mm" in md


# ---- the whole-volume sweep and the card it writes --------------------------------------------
def test_best_setting_rule():
    def row(sens, fp, exclude=(), margin=0.0, size=0.0, method="fraction", value=0.5):
        return {"sensitivity": sens, "false_positives_per_volume": fp, "organ_exclude": list(exclude),
                "organ_margin_mm": margin, "min_size_ml": size, "threshold_method": method, "threshold_value": value}

    rows = [row(0.9, 1.5), row(0.6, 1.0, value=0.4), row(0.6, 0.5, ("physiological-uptake",), 5.0),
            row(0.6, 0.5, ("physiological-uptake",), 0.0, 0.5), row(0.6, 0.5, ("physiological-uptake",), 0.0, 0.1),
            row(float("nan"), 0.0)]
    assert best_whole_volume_setting(rows) == rows[4]  # highest sensitivity at <= 1, fewest FPs, then simplest
    assert best_whole_volume_setting(rows[:1]) is None
    result = {"best": None, "lesions": 7, "seeds": [1, 2], "grid": rows, "parameters": {}}
    with pytest.raises(ValueError, match="no defaults were written"):
        card_with_threshold_defaults({"inference_defaults": {}, "provenance": {}}, result, "x")


@pytest.fixture()
def suv_as_heat(monkeypatch):
    """Small tuning phantoms, and a model whose heat map is the SUV itself (the untrained tiny network finds
    nothing, so no defaults could be chosen); the network still runs, at the card's parameters."""
    run = IgcondaModel.run

    def heat_is_suv(self, volume, **kwargs):
        res = run(self, volume, **kwargs)
        res.heatmap = volume.with_voxels(volume.voxels.copy())
        return res

    monkeypatch.setattr(IgcondaModel, "run", heat_is_suv)
    monkeypatch.setattr(evaluation, "make_phantom", lambda seed, **kw: make_phantom(seed, **SMALL_PHANTOM_KWARGS))


def test_whole_volume_sweep_writes_defaults_that_evaluate_then_refuses_to_score(tmp_path, capsys, tiny_checkpoint,
                                                                                  suv_as_heat):
    from safetensors.torch import load_file

    out, tuned = tmp_path / "sweep", tmp_path / "tuned.safetensors"
    code = cli.main([str(a) for a in (
        "sweep", "--whole-volume", "--checkpoint", tiny_checkpoint, "--phantoms", 2, "--seed", 810_000,
        "--fractions", "0.3,0.41,0.6", "--absolute-values", "3,6", "--min-sizes-ml", "0,0.5", "--margins-mm", "0,10",
        "--out", out, "--write-defaults", tuned)])
    stdout = capsys.readouterr().out
    assert code == 0 and "tuned.safetensors" in stdout
    saved = json.loads((out / "sweep.json").read_text())
    assert len(saved["grid"]) == (1 + 2) * (3 + 2) * 2  # (none, physiological-uptake x 2 margins) x rules x sizes
    best = best_whole_volume_setting(saved["grid"])
    assert saved["best"] == best and best["found"] > 0 and best["false_positives_per_volume"] <= 1.0

    card, original = read_card(tuned), read_card(tiny_checkpoint)
    assert validate_card(card) is card
    d, o = card["inference_defaults"], original["inference_defaults"]
    assert d["threshold"] == {"method": best["threshold_method"], "value": best["threshold_value"]}
    assert (d["min_size_ml"], d["organ_exclude"], d["organ_margin_mm"]) == (
        best["min_size_ml"], best["organ_exclude"], best["organ_margin_mm"])
    assert (d["noise_level"], d["guidance_scale"], d["steps"]) == (o["noise_level"], o["guidance_scale"], o["steps"])
    assert Thresholding.from_card(card).as_parameters() == {
        "threshold_method": best["threshold_method"], "threshold_value": best["threshold_value"],
        "min_size_ml": best["min_size_ml"]}
    assert OrganSelection.from_card(card).exclude == tuple(best["organ_exclude"])
    prov = card["provenance"]
    assert prov["threshold_tuning_seeds"] == [810_000, 810_002]
    assert prov["threshold_defaults_chosen_by"].startswith("diffusion-anomaly sweep --whole-volume --checkpoint")
    assert "tuning phantom seeds 810000..810001" in prov["threshold_defaults_chosen_by"]
    assert prov["train_seeds"] == original["provenance"]["train_seeds"]
    weights, reference = load_file(str(tuned)), load_file(str(tiny_checkpoint))
    assert weights.keys() == reference.keys()
    assert all(np.array_equal(weights[k].numpy(), reference[k].numpy()) for k in weights)

    # the defaults were chosen on these cases: they are never scored on them
    line = run_refused(capsys, "evaluate", "--checkpoint", tuned, "--phantoms", 1, "--seed", 810_001,
                       "--out", tmp_path / "eval", "--steps", 1, watch=(tmp_path,))
    assert line == ("error: evaluation seeds 810001..810001 overlap the model's threshold tuning seeds "
                    "810000..810001; choose held-out seeds.")


@pytest.fixture()
def no_network(monkeypatch):
    """Any network evaluation fails the test: refusals must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the network ran before the refusal")

    monkeypatch.setattr(IgcondaModel, "_eps", refuse)


WHOLE = ["sweep", "--whole-volume", "--phantoms", "1", "--seed", "810000"]
REFUSALS = [
    pytest.param(WHOLE + ["--fractions", "0.5,1.5"], r"threshold value must be a finite number in \(0, 1\]",
                 id="fraction-above-1"),
    pytest.param(WHOLE + ["--absolute-values", "0"], r"threshold value must be a finite number > 0", id="absolute-0"),
    pytest.param(WHOLE + ["--fractions", "0.5,,0.6"], r"list of fraction threshold values with no empty entries",
                 id="hole-in-list"),
    pytest.param(WHOLE + ["--min-sizes-ml", "0,-1"], r"minimum lesion size \(ml\) must be a finite number >= 0",
                 id="negative-min-size"),
    pytest.param(WHOLE + ["--margins-mm", "200"], r"ROI margin \(mm\) must be a finite number from 0 to 100",
                 id="margin-200"),
    pytest.param(WHOLE + ["--organ-excludes", "none;kidny"], r"unknown organ 'kidny'; did you mean", id="organ-typo"),
    pytest.param(WHOLE + ["--threshold-methods", "otsu"], r"fraction and/or absolute \(Otsu has no value",
                 id="otsu"),
    pytest.param(WHOLE + ["--noise-levels", "20"], r"--noise-levels belongs to the noise level / guidance sweep",
                 id="whole-volume-with-noise-levels"),
    pytest.param(["sweep", "--phantoms", "1", "--fractions", "0.5"], r"--fractions belongs to a whole-volume sweep; "
                 r"add --whole-volume", id="grid-without-whole-volume"),
    pytest.param(["sweep", "--phantoms", "1", "--fractions", "0.5", "--margins-mm", "5"],
                 r"^error: --fractions, --margins-mm belong to a whole-volume sweep; add --whole-volume\.$",
                 id="two-options-without-whole-volume"),
    pytest.param(WHOLE + ["--steps", "2", "--write-defaults", "{tmp}/new.safetensors"],
                 r"--write-defaults keeps the model card's 3 steps", id="write-defaults-at-other-steps"),
    pytest.param(["sweep", "--whole-volume", "--phantoms", "3", "--seed", "4999999"],
                 r"tuning seeds 4999999..5000001 overlap the seeds kept for held-out evaluation "
                 r"\(5000000..5999999\); choose other seeds, e.g. --seed 810000\.", id="evaluation-seeds"),
    pytest.param(["sweep", "--whole-volume", "--phantoms", "1", "--seed", "1005"],
                 r"tuning seeds 1005..1005 overlap the model's train seeds 1000..1009; choose other seeds\.",
                 id="train-seeds"),
    pytest.param(["sweep", "--whole-volume", "--phantoms", "0"], r"number of phantoms must be a whole number >= 1",
                 id="zero-phantoms"),
]


@pytest.mark.parametrize("argv, message", REFUSALS)
def test_bad_sweep_arguments_are_refused_before_any_network_work(tmp_path, capsys, tiny_checkpoint, no_network,
                                                                 argv, message):
    import re

    out = tmp_path / "out"
    argv = [a.format(tmp=tmp_path) for a in argv]
    line = run_refused(capsys, *argv, "--checkpoint", tiny_checkpoint, "--out", out, watch=(tmp_path,))
    assert re.search(message, line), line
    assert not out.exists() and not (tmp_path / "new.safetensors").exists()


def test_evaluate_refuses_a_card_exclusion_it_cannot_build_before_any_network_work(tmp_path, capsys, tiny_card,
                                                                                no_network):
    import copy

    import torch

    from DiffusionAnomalyLib import networks

    card = copy.deepcopy(tiny_card)
    card["inference_defaults"]["organ_exclude"] = ["kidny"]
    torch.manual_seed(0)
    ckpt = networks.save_checkpoint(networks.build_model(card), card, tmp_path / "typo.safetensors")
    out = tmp_path / "eval"
    line = run_refused(capsys, "evaluate", "--checkpoint", ckpt, "--phantoms", 1, "--out", out, watch=(tmp_path,))
    assert line.startswith("error: unknown organ 'kidny'; did you mean"), line
    assert not out.exists()

