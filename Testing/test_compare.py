"""Several methods on the same held-out phantoms (issue 9, "One comparison"), the paired tests, the files
and figures, and the noise level x guidance sweep of every method.

Fake method objects with the method interface (``method``, ``card``, ``resolve``, ``prepare``,
``compute``, ``run``, ``evaluations_per_slice``) keep these tests independent of the networks: their
map is |x - blur(x)| (a blob detector that finds the phantom's lesions and its hot organs), their cache
follows the catalog's recompute rule, and they count every call.
"""

from __future__ import annotations

import copy
import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.stats
from scipy.ndimage import gaussian_filter

from DiffusionAnomalyLib import evaluation, figures
from DiffusionAnomalyLib.evaluation import (COMPARISON_COLUMNS, EVALUATION_FILES, MIN_PAIRS, SWEEP_FILES,
                                            card_with_best_defaults, paired_comparison, wilcoxon_pair)
from DiffusionAnomalyLib.method_catalog import RECOMPUTE_DECODE, method_spec, resolve_parameters
from DiffusionAnomalyLib.methods.base import SliceMaps
from DiffusionAnomalyLib.pipeline import MethodResult
from DiffusionAnomalyLib.preprocessing import from_model_space, model_grid, model_units_to_input, to_model_space

from conftest import SMALL_PHANTOM_KWARGS, TRAIN_SEEDS

HELD_OUT = TRAIN_SEEDS[1]  # the first seed after the tiny card's training range
TUNING = 800_000
PNG = b"\x89PNG\r\n\x1a\n"


class FakeMethod:
    """A method object of the interface; ``blur``: the blur's sigma (pixels), so methods' maps differ.

    ``compute`` keeps an "inversion" per (slices, noise level) when the method's guidance parameter
    only re-decodes (IgCONDA-PET, CG-DDIM), and counts inversions, decodes and calls.
    """

    def __init__(self, method: str, card: dict, blur: float = 1.5, classifier_card: dict | None = None):
        self.method = method
        self.card = card
        self.blur = blur
        self.classifier = None if classifier_card is None else SimpleNamespace(card=classifier_card)
        self.spec = method_spec(method)
        self.calls: list[tuple] = []  # (slice ids, params) of every compute call
        self.runs: list[bytes] = []  # the voxels of every volume run
        self.inversions = self.decodes = self.network_evaluations = 0
        self.latents: dict = {}

    def resolve(self, **given):
        return resolve_parameters(self.method, given, self.card, 900)

    def evaluations_per_slice(self, params, guidance_values: int = 1) -> int:
        return 2 * guidance_values

    def prepare(self, volume):
        return to_model_space(volume, self.card["preprocessing"], model_grid(volume, self.card["preprocessing"]))

    def compute(self, images, slice_ids, params, progress=None, cancel=None, timings=None) -> SliceMaps:
        self.calls.append((tuple(int(k) for k in slice_ids), dict(params)))
        key = (images.tobytes(), tuple(slice_ids), params["noise_level"])
        guidance = self.spec.parameter(self.spec.guidance)
        if guidance.recompute != RECOMPUTE_DECODE or key not in self.latents:
            self.inversions += 1
            self.latents[key] = True
        self.decodes += 1
        self.network_evaluations += 2 * len(images)
        weight = 1.0 + float(params[self.spec.guidance]) + params["noise_level"] / 1000.0
        heat = np.abs(images - gaussian_filter(images, (0, self.blur, self.blur))) * weight
        confidence = None
        if self.classifier is not None:
            confidence = 1.0 / (1.0 + np.exp(-(images.reshape(len(images), -1).max(axis=1) - 1.0)))
        return SliceMaps(heat.astype(np.float32), None, confidence)

    def run(self, volume, *, progress=None, cancel=None, region=None, **params) -> MethodResult:
        self.runs.append(volume.voxels.tobytes())
        resolved = self.resolve(**params)
        before = self.network_evaluations
        x, grid = self.prepare(volume)
        maps = self.compute(x, np.arange(len(x)), resolved)
        prep = self.card["preprocessing"]
        heat = from_model_space(model_units_to_input(maps.heat, prep), grid, volume)
        return MethodResult(heatmap=heat, counterfactual=None, model_input=x, model_counterfactual=None,
                            model_heat=maps.heat, grid=grid, parameters=resolved,
                            network_evaluations=self.network_evaluations - before, method=self.method,
                            classifier_evaluations=len(x) if self.classifier is not None else 0,
                            classifier_confidence=maps.confidence, compute={"device": "cpu", "precision": "fp32"})


def _classifier_card(card):
    out = copy.deepcopy(card)
    out["id"] = "fake-classifier"
    out["method"] = "classifier"
    out["provenance"] = {"train_seeds": [2000, 2010]}
    return out


@pytest.fixture()
def fakes(tiny_card):
    return {"igconda": FakeMethod("igconda", tiny_card, 1.0),
            "cdm": FakeMethod("cdm", tiny_card, 2.5),
            "cg-ddim": FakeMethod("cg-ddim", tiny_card, 1.5, classifier_card=_classifier_card(tiny_card))}


@pytest.fixture()
def compared(tmp_path, fakes):
    out = tmp_path / "eval"
    result = evaluation.evaluate(fakes, 2, HELD_OUT, out, parameters={"cdm": {"tau": 0.9}, "igconda": None},
                                 phantom_kwargs=dict(SMALL_PHANTOM_KWARGS), log=lambda m: None)
    return out, result, fakes


# ---- one evaluate, every method on the same cases --------------------------------------------------
def test_every_method_runs_on_the_same_cases_with_its_own_parameters_and_threshold(compared, tiny_card):
    out, result, fakes = compared
    assert sorted(p.name for p in out.iterdir()) == sorted(EVALUATION_FILES)
    volumes = [f.runs for f in fakes.values()]
    assert len(volumes[0]) == 2 and all(v == volumes[0] for v in volumes)  # the same two phantoms, in order
    saved = json.loads((out / "metrics.json").read_text())
    names = ["igconda", "cdm", "cg-ddim", "suv41"]
    assert list(saved["methods"]) == names == list(saved["per_slice"])
    keys = {n: [(r["seed"], r["slice"]) for r in saved["per_slice"][n]] for n in names}
    assert keys["igconda"] and all(keys[n] == keys["igconda"] for n in names)  # the same unhealthy slices
    assert {s for s, _ in keys["igconda"]} == {HELD_OUT, HELD_OUT + 1}
    runs = saved["runs"]
    assert runs["cdm"]["parameters"]["tau"] == 0.9 and runs["igconda"]["parameters"] == saved["parameters"]
    assert runs["igconda"]["parameters"] == {"noise_level": 50, "guidance_scale": 3.0, "steps": 3}  # the card's
    assert runs["cg-ddim"]["classifier"] == "fake-classifier" and runs["igconda"]["classifier"] is None
    # each method at its own operating point: the card's for its own method, the paper's for the others
    ops = {c["method"]: c["operating_point"] for c in saved["whole_volume"]["curves"] if not c["organ_exclusion"]}
    assert (ops["igconda"]["threshold_method"], ops["igconda"]["threshold_value"]) == ("fraction", 0.5)
    assert (ops["cg-ddim"]["threshold_method"], ops["cg-ddim"]["threshold_value"]) == ("fraction", 0.35)
    assert (ops["cdm"]["threshold_method"], ops["cdm"]["threshold_value"]) == ("otsu", None)
    assert (ops["suv41"]["threshold_method"], ops["suv41"]["threshold_value"]) == ("fraction", 0.41)
    assert {(c["method"], c["organ_exclusion"]) for c in saved["whole_volume"]["curves"]} == {
        (n, e) for n in names for e in (False, True)}
    assert saved["detection"]["method"] == "igconda"
    assert (saved["detection"]["found"], saved["detection"]["lesions"]) == (ops["igconda"]["found"],
                                                                            ops["igconda"]["lesions"])
    # seconds, network and classifier evaluations per volume
    for name, fake in fakes.items():
        row = saved["methods"][name]
        slices = len(fake.prepare(_phantom(HELD_OUT))[0])  # the small phantoms all have this many model slices
        assert row["network_evaluations_per_volume"] == 2 * slices, name
        assert row["classifier_evaluations_per_volume"] == (slices if name == "cg-ddim" else 0)
        assert row["seconds_per_volume"] > 0
    assert saved["methods"]["suv41"]["network_evaluations_per_volume"] == 0


def _phantom(seed):
    from DiffusionAnomalyLib.phantoms import make_phantom

    return make_phantom(seed, **SMALL_PHANTOM_KWARGS).pet


def test_classifier_confidence_is_stored_per_slice_and_summarised(compared):
    out, result, fakes = compared
    saved = json.loads((out / "metrics.json").read_text())
    per_case = saved["runs"]["cg-ddim"]["per_case"]
    assert [c["seed"] for c in per_case] == [HELD_OUT, HELD_OUT + 1]
    assert all(c["classifier_confidence"] is None for c in saved["runs"]["igconda"]["per_case"])
    sick, healthy = [], []
    fake = fakes["cg-ddim"]
    for case in per_case:
        x, _ = fake.prepare(_phantom(case["seed"]))
        expected = fake.compute(x, np.arange(len(x)), fake.resolve()).confidence
        assert case["classifier_confidence"] == pytest.approx(list(expected))
        mark = np.isin(np.arange(len(x)), case["unhealthy_slices"])
        sick += list(expected[mark])
        healthy += list(expected[~mark])
    summary = saved["methods"]["cg-ddim"]
    assert summary["confidence_unhealthy"] == pytest.approx(np.mean(sick))
    assert summary["confidence_healthy"] == pytest.approx(np.mean(healthy))
    assert "confidence_unhealthy" not in saved["methods"]["igconda"]
    assert "Guidance classifier confidence" in (out / "metrics.md").read_text()


def test_comparison_csv_and_markdown_have_one_column_list(compared):
    out, result, _ = compared
    with open(out / "comparison.csv", newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert reader.fieldnames == [key for key, _, _ in COMPARISON_COLUMNS]
    assert [r["method"] for r in rows] == ["igconda", "cdm", "cg-ddim", "suv41"]
    by_name = {r["method"]: r for r in rows}
    for name, summary in result["methods"].items():
        row = by_name[name]
        for key in ("dsc_opt", "auprc", "seconds_per_volume", "network_evaluations_per_volume"):
            assert float(row[key]) == pytest.approx(summary[key]), (name, key)
        assert int(row["slices"]) == summary["slices"]
    ops = {c["method"]: c["operating_point"] for c in result["whole_volume"]["curves"] if c["organ_exclusion"]}
    assert float(by_name["cdm"]["false_candidates_per_volume_excluded"]) == ops["cdm"]["false_positives_per_volume"]
    assert by_name["suv41"]["confidence_unhealthy"] == "" and float(by_name["cg-ddim"]["confidence_unhealthy"]) > 0
    assert by_name["cdm"]["parameters"].startswith("noise level Q 400") and "tau 0.9" in by_name["cdm"]["parameters"]
    md = (out / "comparison.md").read_text()
    assert "| " + " | ".join(h for _, h, _ in COMPARISON_COLUMNS) + " |" in md
    tests = result["comparison"]["tests"]
    assert len(tests) == 5 * 6  # 5 paired figures x 6 pairs of 4 methods
    assert f"Bonferroni correction over the {result['comparison']['tests_run']} tests run" in md
    assert md.count("\n| ") == 1 + len(rows) + 1 + len(tests)  # tables: header + rows, header + tests


def test_the_figures_are_written_and_readable(compared, tmp_path):
    import matplotlib.image

    out, result, _ = compared
    for name in ("froc.png", "comparison.png"):
        assert (out / name).read_bytes()[:8] == PNG
        image = matplotlib.image.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300, name
    # the overview figure with the classifier's confidence curve
    rng = np.random.default_rng(0)
    volume = rng.random((12, 16, 16)).astype(np.float32)
    labels = np.zeros(volume.shape, np.int16)
    labels[5:7, 4:8, 4:8] = 1
    plain = figures.overview_png(tmp_path / "plain.png", volume, None, volume, labels, truth=labels)
    with_curve = figures.overview_png(tmp_path / "curve.png", volume, None, volume, labels, truth=labels,
                                      confidence=np.r_[rng.random(10), np.nan, 0.5],
                                      confidence_unhealthy=labels.any(axis=(1, 2)))
    a, b = matplotlib.image.imread(plain), matplotlib.image.imread(with_curve)
    assert b.shape[0] > a.shape[0]  # the confidence panel below


# ---- the paired tests ------------------------------------------------------------------------------
def test_wilcoxon_against_scipy_on_a_hand_made_pair():
    a = {k: v for k, v in enumerate([0.81, 0.62, 0.75, 0.90, 0.55, 0.71, 0.66, 0.84, 0.79, 0.58])}
    b = {k: v for k, v in enumerate([0.70, 0.60, 0.77, 0.72, 0.41, 0.65, 0.66, 0.80, 0.61, 0.50])}
    a[10], b[11] = 0.3, 0.4  # unpaired: left out
    a[12], b[12] = float("nan"), 0.5  # no value: left out
    got = wilcoxon_pair(a, b)
    x, y = np.array([a[k] for k in range(10)]), np.array([b[k] for k in range(10)])
    expected = scipy.stats.wilcoxon(x, y)
    assert got["n"] == 10 and got["nonzero"] == 9
    assert got["statistic"] == pytest.approx(expected.statistic) and got["p"] == pytest.approx(expected.pvalue)
    assert got["median_difference"] == pytest.approx(np.median(x - y))
    assert got["note"] == ""


def test_bonferroni_counts_the_tests_run_only():
    rng = np.random.default_rng(3)
    base = rng.random(12)
    values = {"dsc_opt": {"A": dict(enumerate(base)), "B": dict(enumerate(base + 0.2)),
                          "C": dict(enumerate(base + rng.normal(0, 0.01, 12)))},
              "hd95": {"A": dict(enumerate(base)), "B": dict(enumerate(base)), "C": dict(enumerate(base))}}
    comp = paired_comparison(values, ["A", "B", "C"])
    assert len(comp["tests"]) == 6 and comp["tests_run"] == 3 and comp["correction"] == "Bonferroni"
    for t in comp["tests"]:
        if t["metric"] == "hd95":
            assert t["p"] is None and t["p_corrected"] is None and t["significant"] is None
            assert t["result"] == "all 12 differences are zero"
        else:
            x = np.array([values["dsc_opt"][t["a"]][k] for k in range(12)])
            y = np.array([values["dsc_opt"][t["b"]][k] for k in range(12)])
            p = scipy.stats.wilcoxon(x, y).pvalue
            assert t["p"] == pytest.approx(p) and t["p_corrected"] == pytest.approx(min(1.0, 3 * p))
            assert t["significant"] == (min(1.0, 3 * p) < 0.05)
            assert t["result"] == ("significant" if t["significant"] else "not significant") + \
                " at 0.05 after Bonferroni"
    ab = next(t for t in comp["tests"] if t["metric"] == "dsc_opt" and (t["a"], t["b"]) == ("A", "B"))
    assert ab["significant"] and ab["median_difference"] == pytest.approx(-0.2)


@pytest.mark.parametrize("a, b, note", [
    ([0.1, 0.2, 0.3], [0.1, 0.2, 0.3], "all 3 differences are zero"),
    ([0.1, 0.2, 0.3, 0.4, 0.5], [0.0, 0.2, 0.1, 0.4, 0.2], f"too few pairs that differ (3 < {MIN_PAIRS})"),
    ([], [], "no pairs"),
    ([float("nan")] * 4, [0.1] * 4, "no pairs"),
])
def test_degenerate_pairs_say_so_instead_of_a_p_value(a, b, note):
    got = wilcoxon_pair(dict(enumerate(a)), dict(enumerate(b)))
    assert got["p"] is None and got["statistic"] is None and got["note"] == note
    comp = paired_comparison({"auprc": {"A": dict(enumerate(a)), "B": dict(enumerate(b))}}, ["A", "B"])
    assert comp["tests_run"] == 0 and comp["tests"][0]["result"] == note


def test_a_few_phantoms_give_notes_not_p_values_per_volume(compared):
    out, result, _ = compared
    per_volume = [t for t in result["comparison"]["tests"] if t["paired"] == "volume"]
    assert per_volume and all(t["n"] <= 2 and t["p"] is None and t["note"] for t in per_volume)
    assert "| whole-volume sensitivity | igconda | cdm |" in (out / "comparison.md").read_text()


# ---- refusals before any work ----------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    (lambda f: {"parameters": {"igconda": {"tau": 0.5}}}, r"method igconda has no parameter 'tau'.*belongs to cdm"),
    (lambda f: {"parameters": {"cg-ddpm": {"seed": 1}}}, r"parameters are given for 'cg-ddpm', which is not evaluated"),
    (lambda f: {"parameters": {"cdm": {"tau": 1.5}}}, r"tau"),
    (lambda f: {"baselines": ("suv42",)}, r"unknown baseline 'suv42'"),
    (lambda f: {"methods": {"cdm": f["igconda"]}}, r"the model given for method cdm runs igconda"),
    (lambda f: {"methods": {}}, r"at least one method"),
    (lambda f: {"seed": 1005}, r"evaluation seeds 1005..1006 overlap the model's train seeds 1000..1009"),
    (lambda f: {"seed": 2008}, r"evaluation seeds 2008..2009 overlap the guidance classifier's train seeds 2000..2009"),
])
def test_evaluate_refuses_before_any_work(tmp_path, fakes, change, message):
    out = tmp_path / "eval"
    args = {"methods": fakes, "n_cases": 2, "seed": HELD_OUT, "out_dir": out, **change(fakes)}
    with pytest.raises(ValueError, match=message):
        evaluation.evaluate(log=lambda m: None, phantom_kwargs=dict(SMALL_PHANTOM_KWARGS), **args)
    assert not out.exists() and all(not f.runs and not f.calls for f in fakes.values())


def test_evaluate_refuses_seeds_a_card_was_tuned_on(tmp_path, tiny_card):
    card = copy.deepcopy(tiny_card)
    card["provenance"]["tuning_seeds"] = [HELD_OUT + 1, HELD_OUT + 5]
    fake = FakeMethod("igconda", card)
    with pytest.raises(ValueError, match=r"overlap the model's tuning seeds 1011..1014; choose held-out seeds"):
        evaluation.evaluate({"igconda": fake, "cdm": FakeMethod("cdm", tiny_card)}, 2, HELD_OUT, tmp_path / "e")
    assert not fake.runs and not (tmp_path / "e").exists()


# ---- the sweep of every method ---------------------------------------------------------------------
@pytest.mark.parametrize("method, axis, values, decode_only", [
    ("igconda", "guidance_scale", [0.0, 2.0, 4.0], True),
    ("cg-ddim", "classifier_scale", [0.0, 50.0, 100.0], True),
    ("cdm", "tau", [0.8, 0.95, 0.9], False),
])
def test_sweep_grids_each_methods_guidance_and_reuses_its_cache(tmp_path, tiny_card, method, axis, values,
                                                                decode_only):
    classifier = _classifier_card(tiny_card) if method_spec(method).classifier else None
    fake = FakeMethod(method, tiny_card, classifier_card=classifier)
    out = tmp_path / "sweep"
    levels = [20, 40]
    result = evaluation.sweep(fake, 2, TUNING, out, levels, ",".join(map(str, values)), steps=2,
                              phantom_kwargs=dict(SMALL_PHANTOM_KWARGS), log=lambda m: None)
    assert sorted(p.name for p in out.iterdir()) == sorted(SWEEP_FILES)
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["method"] == method and saved["guidance"] == axis
    assert saved["noise_levels"] == levels and saved["guidance_values"] == values
    assert [(r["noise_level"], r[axis]) for r in saved["grid"]] == [(d, g) for d in levels for g in values]
    assert all(r["steps"] == 2 and set(fake.resolve()) <= set(r) for r in saved["grid"])
    assert all(0.0 <= r["dsc_opt"] <= 1.0 for r in saved["grid"])
    assert result["slices"] > 0
    # unhealthy slices only, one compute call per case and grid point; a case's guidance values in turn
    calls = len(fake.calls)
    assert calls == 2 * len(levels) * len(values)
    assert sum(len(ids) for ids, _ in fake.calls) == result["slices"] * len(levels) * len(values)
    runs = [fake.calls[i:i + len(values)] for i in range(0, calls, len(values))]
    assert all(len({ids for ids, _ in run}) == 1 and [p[axis] for _, p in run] == values for run in runs)
    assert fake.inversions == (2 * len(levels) if decode_only else calls)
    assert saved["network_evaluations"] == fake.network_evaluations
    assert (out / "sweep.png").read_bytes()[:8] == PNG


def test_sweep_refuses_before_any_work(tmp_path, tiny_card, monkeypatch):
    fake = FakeMethod("cdm", tiny_card)
    out = tmp_path / "sweep"
    kw = {"phantom_kwargs": dict(SMALL_PHANTOM_KWARGS), "log": lambda m: None}
    with pytest.raises(ValueError, match=r"tau must be"):
        evaluation.sweep(fake, 1, TUNING, out, [20], [0.5, 1.5], **kw)
    with pytest.raises(ValueError, match=r"steps R .*at most"):  # R = 10 > Q = 5
        evaluation.sweep(fake, 1, TUNING, out, [5], [0.5], **kw)
    with pytest.raises(ValueError, match=r"tuning seeds 1005..1005 overlap the model's train seeds"):
        evaluation.sweep(fake, 1, 1005, out, [20], [0.5], **kw)
    with pytest.raises(ValueError, match=r"list of embedding weights"):
        evaluation.sweep(fake, 1, TUNING, out, [20], "", **kw)
    from DiffusionAnomalyLib.methods import base

    monkeypatch.setattr(base, "MAX_NETWORK_EVALUATIONS", 10)
    with pytest.raises(ValueError, match=r"network evaluations .*\(at most 10\)"):
        evaluation.sweep(fake, 1, TUNING, out, [20, 40], [0.5, 0.9], **kw)
    assert not fake.calls and not out.exists()


def test_sweep_defaults_per_method():
    assert evaluation.sweep_axes("igconda") == (evaluation.SWEEP_NOISE_LEVELS, (0.0, 1.0, 3.0, 5.0))
    assert evaluation.sweep_axes("cg-cdm")[1] == evaluation.SWEEP_GUIDANCE_VALUES["classifier_scale"]
    assert evaluation.sweep_axes("cdm")[1] == evaluation.SWEEP_GUIDANCE_VALUES["tau"]


def test_best_defaults_go_to_the_methods_own_card_section(tiny_card):
    grid = [{"noise_level": 300, "steps": 10, "tau": 0.9, "seed": 0, "dsc_opt": 0.4},
            {"noise_level": 400, "steps": 10, "tau": 0.95, "seed": 0, "dsc_opt": 0.6}]
    card = copy.deepcopy(tiny_card)
    card["provenance"]["tuning_seeds"] = [800_010, 800_012]
    tuned = card_with_best_defaults(card, {"method": "cdm", "seeds": [800_000, 800_002], "slices": 9, "grid": grid},
                                    "diffusion-anomaly sweep --method cdm")
    assert tuned["inference_defaults"]["cdm"] == {"noise_level": 400, "steps": 10, "tau": 0.95, "seed": 0}
    assert tuned["inference_defaults"]["noise_level"] == tiny_card["inference_defaults"]["noise_level"]
    assert tuned["provenance"]["tuning_seeds"] == [800_000, 800_012]  # earlier tuning still refused
    assert tuned["provenance"]["cdm_defaults_chosen_by"].startswith("diffusion-anomaly sweep --method cdm")
    assert "tau 0.95" in tuned["provenance"]["cdm_defaults_chosen_by"]
    assert resolve_parameters("cdm", {}, tuned, 900)["tau"] == 0.95  # what a run of cdm now takes
    igconda = card_with_best_defaults(card, {"method": "igconda", "seeds": [7, 7], "slices": 1, "grid": [
        {"noise_level": 30, "guidance_scale": 2.0, "steps": 3, "dsc_opt": 0.5}]}, "x")
    assert {k: igconda["inference_defaults"][k] for k in ("noise_level", "guidance_scale", "steps")} == {
        "noise_level": 30, "guidance_scale": 2.0, "steps": 3}
    assert "cdm" not in igconda["inference_defaults"]


# ---- the real methods ------------------------------------------------------------------------------
def test_real_methods_on_one_small_phantom(tmp_path, tiny_checkpoint):
    from DiffusionAnomalyLib.methods import load_checkpoint

    models = {"igconda": load_checkpoint(tiny_checkpoint, device="cpu"),
              "cdm": load_checkpoint(tiny_checkpoint, device="cpu", method="cdm")}
    out = tmp_path / "eval"
    result = evaluation.evaluate(models, 1, HELD_OUT, out, parameters={"igconda": {"steps": 2},
                                                                       "cdm": {"noise_level": 20, "steps": 2}},
                                 phantom_kwargs=dict(SMALL_PHANTOM_KWARGS), log=lambda m: None)
    assert sorted(p.name for p in out.iterdir()) == sorted(EVALUATION_FILES)
    assert result["methods"]["cdm"]["network_evaluations_per_volume"] > 0
    assert [r["slice"] for r in result["per_slice"]["cdm"]] == [r["slice"] for r in result["per_slice"]["igconda"]]
    swept = evaluation.sweep(models["igconda"], 1, TUNING, tmp_path / "sweep", [20, 40], [0.0, 3.0], steps=2,
                             phantom_kwargs=dict(SMALL_PHANTOM_KWARGS), log=lambda m: None)
    assert len(swept["grid"]) == 4 and swept["network_evaluations"] > 0
