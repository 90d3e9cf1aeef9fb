"""Every analysis method in the Slicer module: its parameters in the parameter node, its run through
the worker, and the slider-reuse rules, per method, against the real MRML library with the tiny model.

The classifier-guided methods use a tiny (untrained, seeded) noise-conditioned classifier made for
the tiny diffusion model, given as the Classifier setting. One scene and one logic (one worker)
for the module: the methods run in turn on the same input, as a user switching methods would.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("slicer-core (MRML) is not installed", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "DiffusionAnomaly"))

from test_slicer_logic import node_ids, pet_scene, reopened  # noqa: E402
from test_slicer_ui import Widget, stand_in_widget  # noqa: E402

from DiffusionAnomalyLib.method_catalog import (METHODS, RECOMPUTE_DECODE, method_defaults,  # noqa: E402
                                                methods_for_network, parameter_words)
from DiffusionAnomalyLib.postprocessing import Thresholding  # noqa: E402
from DiffusionAnomalyModuleLib import outputs, parameters  # noqa: E402

#: small settings per method, so each run takes seconds (50 of the tiny model's 1000 timesteps, 3 steps)
SMALL = {
    "igconda": {"NoiseLevel": "50", "GuidanceScale": "3", "Steps": "3"},
    "cg-ddim": {"NoiseLevel": "50", "ClassifierScale": "20", "Steps": "3"},
    "cg-ddpm": {"NoiseLevel": "50", "ClassifierScale": "20", "Steps": "3", "Seed": "1"},
    "cdm": {"NoiseLevel": "50", "Steps": "3", "Tau": "0.9", "Seed": "1"},
    "cg-cdm": {"NoiseLevel": "50", "Steps": "3", "Tau": "0.9", "ClassifierScale": "5", "Seed": "1"},
}
#: a new value for each parameter (never one a method ran with before, so the worker's cache cannot serve it)
CHANGED = {"noise_level": "40", "guidance_scale": "5", "classifier_scale": "40", "steps": "2", "tau": "0.8",
           "seed": "2"}


def test_the_small_settings_are_each_methods_parameters():
    assert list(SMALL) == list(METHODS)
    for name, spec in METHODS.items():
        assert set(SMALL[name]) == {p.setting for p in spec.parameters}, name
    assert set(CHANGED) == {p.name for spec in METHODS.values() for p in spec.parameters}


def test_only_igconda_and_cg_ddim_reuse_work_when_a_scale_changes():
    """The reuse rule of issue 9 (METHODS.md): a guidance or classifier scale change re-decodes from the inverted
    latents for IgCONDA-PET and CG-DDIM; CG-DDPM, CDM and CG-CDM recompute on any change. The catalog says so
    (the panel's tooltips and the run below follow it)."""
    decode = {(name, p.name) for name, spec in METHODS.items() for p in spec.parameters
              if p.recompute == RECOMPUTE_DECODE}
    assert decode == {("igconda", "guidance_scale"), ("cg-ddim", "classifier_scale")}


# ---- the parameter node (no worker) -------------------------------------------------------------------
@pytest.mark.parametrize("method", list(METHODS))
def test_a_methods_defaults_and_threshold_fill_the_node(tiny_card, method):
    scene = slicer.vtkMRMLScene()
    node = parameters.parameterNode(scene)
    parameters.applyCardDefaults(node, tiny_card)
    assert node.GetParameter("Method") == ""  # the model's own
    parameters.applyMethodDefaults(node, tiny_card, method)
    spec = METHODS[method]
    defaults, _ = method_defaults(tiny_card, method)
    assert node.GetParameter("Method") == method
    assert {p.setting: node.GetParameter(p.setting) for p in spec.parameters} == {
        p.setting: str(defaults[p.name]) for p in spec.parameters}
    th = Thresholding.for_method(tiny_card, method)
    assert node.GetParameter("ThresholdMethod") == th.method
    assert node.GetParameter("Threshold") == ("" if th.value is None else str(th.value))
    assert parameters.thresholding(parameters.values(node), tiny_card) == th
    # a model change keeps the method its network serves
    parameters.applyCardDefaults(node, tiny_card)
    assert node.GetParameter("Method") == method


@pytest.mark.parametrize("method", list(METHODS))
def test_only_the_chosen_methods_parameters_are_sent(tiny_card, method):
    scene = slicer.vtkMRMLScene()
    node = parameters.parameterNode(scene)
    for spec in METHODS.values():  # every method's settings hold a value ...
        for p in spec.parameters:
            node.SetParameter(p.setting, CHANGED[p.name])
    node.SetParameter("Method", method)
    request = parameters.runRequest(parameters.values(node), tiny_card)
    spec = METHODS[method]
    assert request["method"] == method
    assert list(request["parameters"]) == list(spec.parameter_names)  # ... but only this method's are sent
    for p in spec.parameters:
        node.SetParameter(p.setting, "")
    assert parameters.runRequest(parameters.values(node), tiny_card)["parameters"] == dict.fromkeys(
        spec.parameter_names)  # "": the method's default


def test_the_models_own_method_is_sent_as_null(tiny_card):
    node = parameters.parameterNode(slicer.vtkMRMLScene())
    parameters.applyCardDefaults(node, tiny_card)
    request = parameters.runRequest(parameters.values(node), tiny_card)
    assert request == {"method": None, "parameters": {"noise_level": 50, "guidance_scale": 3.0, "steps": 3},
                       "counterfactual": True}
    assert methods_for_network(tiny_card["method"])[0] == "igconda"


# ---- runs through the worker --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_checkpoint, tiny_classifier, pet_slab):
    tmp = tmp_path_factory.mktemp("slicer-methods")
    scene, logic, node, params = pet_scene(tmp, tiny_checkpoint, pet_slab, "slab PET")
    params.SetParameter("Classifier", str(tiny_classifier))
    sent = []
    submit = logic.jobs.submit
    logic.jobs.submit = lambda job, request, device: sent.append(request) or submit(job, request, device)
    yield {"scene": scene, "logic": logic, "node": node, "params": params, "card": logic.readCard(str(tiny_checkpoint)),
           "sent": sent, "classifier": tiny_classifier, "checkpoint": tiny_checkpoint}
    logic.cleanup()


def choose(env, method: str) -> None:
    """Choose ``method`` as the Method box does (its defaults), then the small settings and a low threshold."""
    params = env["params"]
    env["logic"].applyMethodDefaults(params, env["card"], method)
    for setting, value in SMALL[method].items():
        params.SetParameter(setting, value)
    params.SetParameter("ThresholdMethod", "fraction")
    params.SetParameter("Threshold", "0.3")


def heat(env) -> np.ndarray:
    return slicer.util.arrayFromVolume(env["params"].GetNodeReference("HeatMap")).copy()


def fresh_run(env):
    """The same settings on a new worker (empty caches) and without the module's own reuse: the whole run."""
    logic = env["logic"]
    logic.jobs.stopWorker()
    logic.caseRunKey = None
    return logic.runBlocking(env["params"], timeout=600)


@pytest.mark.parametrize("method", list(METHODS))  # in catalog order: CDM follows a method with a counterfactual
def test_each_method_runs_and_keeps_the_slider_reuse_rules(env, method):
    scene, logic, params, node = env["scene"], env["logic"], env["params"], env["node"]
    spec = METHODS[method]
    choose(env, method)
    stale = outputs.findOutput(scene, node, "counterfactual")
    first = logic.runBlocking(params, timeout=600)
    assert first.status == "done" and first.workerCall and first.networkEvaluations > 0
    request = env["sent"][-1]
    assert request["method"] == method and list(request["parameters"]) == list(spec.parameter_names)
    assert logic.case.method_name == method and set(logic.case.parameters) == set(spec.parameter_names)
    assert (first.classifierEvaluations > 0) == spec.classifier
    assert (logic.case.classifier is not None) == spec.classifier
    # the classifier's p(unhealthy) per computed model slice comes back with the case (the report's curve)
    assert (logic.case.confidence is not None) == spec.classifier
    if spec.classifier:
        assert logic.case.confidence.shape[1] == 2 and len(logic.case.confidence) > 0
        assert ((logic.case.confidence[:, 1] >= 0) & (logic.case.confidence[:, 1] <= 1)).all()
    # the counterfactual node exists only for a method that makes one: another method's is removed, not left stale
    counterfactual = outputs.findOutput(scene, node, "counterfactual")
    assert (counterfactual is not None) == spec.counterfactual
    assert (params.GetNodeReference("Counterfactual") is not None) == spec.counterfactual
    if method == "cdm":  # after CG-DDPM's run, whose counterfactual is gone now
        assert stale is not None and scene.GetNodeByID(stale.GetID()) is None
    # the lesion table says which method with which parameters made it
    description = logic.resultSummary(params)
    assert description.startswith(spec.title) and parameter_words(method, logic.case.parameters) in description
    assert ("classifier tiny-classifier" in description) == spec.classifier

    # a threshold change: no worker call; Apply with unchanged settings: no worker call either
    calls, total = len(env["sent"]), logic.workerStats()["total_network_evaluations"]
    params.SetParameter("Threshold", "0.6")
    logic.updateLesions(params)
    job = logic.runBlocking(params)
    assert not job.workerCall and job.networkEvaluations == 0
    assert len(env["sent"]) == calls and logic.workerStats()["total_network_evaluations"] == total

    # each parameter changed in turn: a guidance/classifier scale of IgCONDA-PET and CG-DDIM re-decodes only,
    # every other change recomputes the whole run
    full = first.networkEvaluations
    for p in spec.parameters:
        params.SetParameter(p.setting, CHANGED[p.name])
        job = logic.runBlocking(params, timeout=600)
        assert job.workerCall, p.name
        if p.recompute == RECOMPUTE_DECODE:
            decoded, reused = job.networkEvaluations, heat(env)
            fresh = fresh_run(env)
            assert fresh.networkEvaluations == full and 0 < decoded < full, (p.name, decoded, full)
            if method == "igconda":  # inversion K, guided decoding 2K (conditional and unconditional)
                assert decoded == 2 * full // 3
            np.testing.assert_allclose(reused, heat(env), rtol=1e-5, atol=1e-6)  # the reuse changes no voxel
        elif p.name == "steps":  # another number of steps: another cost, all of it recomputed
            assert 0 < job.networkEvaluations != full, p.name
            full = job.networkEvaluations
        else:
            assert job.networkEvaluations == full, (p.name, job.networkEvaluations, full)


@pytest.mark.parametrize("method, setting, value, words", [
    ("igconda", "NoiseLevel", "20.7", "the noise level D must be a whole number from 1 to 999"),
    ("igconda", "Steps", "fast", "the DDIM steps must be a whole number"),
    ("cg-ddim", "ClassifierScale", "-1", "the classifier scale s must be a finite number >= 0"),
    ("cg-ddpm", "Seed", "-1", "the noise seed must be a whole number"),
    ("cdm", "Tau", "1.0", "the embedding weight tau must be a finite number in (0, 1)"),
    ("cdm", "Steps", "reference", "the CDM steps R must be a whole number"),
    ("cg-cdm", "Steps", "60", "at most the noise level 50"),
    ("igconda", "Method", "ddim", 'unknown method "ddim"'),
])
def test_a_bad_parameter_is_one_sentence_and_leaves_the_scene_unchanged(env, method, setting, value, words):
    scene, logic, params = env["scene"], env["logic"], env["params"]
    choose(env, method)
    params.SetParameter(setting, value)
    ids = node_ids(scene)
    mtimes = {i: scene.GetNodeByID(i).GetMTime() for i in ids}
    calls, worker = len(env["sent"]), logic.worker
    with pytest.raises(ValueError) as info:
        logic.startRun(params)
    sentence = str(info.value)
    assert words in sentence and "\n" not in sentence and sentence.endswith("."), sentence
    assert node_ids(scene) == ids and {i: scene.GetNodeByID(i).GetMTime() for i in ids} == mtimes
    assert len(env["sent"]) == calls and logic.worker is worker and not logic.running


# ---- the classifier ---------------------------------------------------------------------------------
@pytest.fixture()
def no_bundled_models(monkeypatch, tmp_path):
    """No bundled model or classifier (an empty models folder)."""
    folder = tmp_path / "models"
    folder.mkdir()
    monkeypatch.setenv("DIFFUSION_ANOMALY_MODELS", str(folder))


def test_the_classifier_line_says_which_classifier_guides_or_why_none_can(env, no_bundled_models):
    logic, params = env["logic"], env["params"]
    choose(env, "igconda")
    assert logic.classifierSummary(params) == "IgCONDA-PET (implicit guidance) needs no classifier."
    choose(env, "cg-ddim")
    assert logic.classifierSummary(params) == "Guided by the classifier tiny-classifier (tiny-classifier.safetensors)."
    try:
        params.SetParameter("Classifier", "")
        assert logic.classifierSummary(params).startswith("no bundled classifier fits model")
        params.SetParameter("Classifier", str(env["checkpoint"]))  # a diffusion model, not a classifier
        assert "not a noise-conditioned classifier" in logic.classifierSummary(params)
    finally:
        params.SetParameter("Classifier", str(env["classifier"]))


@pytest.mark.parametrize("classifier, words", [("", "no bundled classifier fits model"),
                                               ("missing.safetensors", "not found")])
def test_a_classifier_method_without_a_fitting_classifier_is_refused_before_the_worker(env, no_bundled_models,
                                                                                       classifier, words):
    scene, logic, params = env["scene"], env["logic"], env["params"]
    choose(env, "cg-ddpm")
    params.SetParameter("Classifier", classifier)
    ids, calls = node_ids(scene), len(env["sent"])
    try:
        with pytest.raises(ValueError, match=words) as info:
            logic.startRun(params)
        assert "\n" not in str(info.value) and node_ids(scene) == ids and len(env["sent"]) == calls
    finally:
        params.SetParameter("Classifier", str(env["classifier"]))


def test_a_method_without_classifier_keeps_the_running_worker(env):
    """The worker is restarted for another classifier only where a method uses one (its caches are kept)."""
    logic, params = env["logic"], env["params"]
    choose(env, "igconda")
    logic.runBlocking(params, timeout=600)
    worker = logic.worker
    params.SetParameter("Classifier", "")  # another classifier setting: no matter to IgCONDA-PET
    params.SetParameter("GuidanceScale", "7")
    job = logic.runBlocking(params, timeout=600)
    assert job.workerCall and logic.worker is worker
    params.SetParameter("Classifier", str(env["classifier"]))


# ---- the Widget's method section (stand-in widgets: no Qt here) ---------------------------------------
def test_the_method_box_offers_the_networks_methods_and_a_choice_sets_their_defaults(env, monkeypatch):
    from contextlib import nullcontext

    logic, params, card = env["logic"], env["params"], env["card"]
    monkeypatch.setattr(slicer.util, "WaitCursor", nullcontext, raising=False)
    widget = stand_in_widget(logic)
    widget._parameterNode = params
    choose(env, "igconda")
    widget.updateMethodSection(params)
    combo = widget.ui.methodComboBox
    assert combo.items == [(METHODS[name].title, name) for name in methods_for_network(card["method"])]
    assert combo.itemData(combo.currentIndex) == "igconda" and widget._method is METHODS["igconda"]
    assert widget.ui.classifierStatusLabel.text == "IgCONDA-PET (implicit guidance) needs no classifier."
    assert not widget.ui.classifierPathLineEdit.visible and widget.ui.guidanceScaleSlider.visible
    # the user picks CG-CDM: its defaults and threshold fill the node, its parameters and the classifier row show
    widget.onMethodChanged(combo.findData("cg-cdm"))
    defaults, _ = method_defaults(card, "cg-cdm")
    assert params.GetParameter("Method") == "cg-cdm" and params.GetParameter("Tau") == str(defaults["tau"])
    assert params.GetParameter("ThresholdMethod") == "otsu"
    widget.updateMethodSection(params)
    assert combo.itemData(combo.currentIndex) == "cg-cdm"
    assert widget.ui.tauSlider.visible and not widget.ui.guidanceScaleSlider.visible
    assert widget.ui.classifierPathLineEdit.visible and not widget.ui.counterfactualCheckBox.enabled
    assert widget.ui.classifierStatusLabel.text.startswith("Guided by the classifier tiny-classifier")
    assert widget.ui.stepsLabel.text == "CDM steps R:" and widget.ui.stepsSpinBox.specialValueText == ""
    # a method the model cannot run (a scene saved with another model): nothing shown, the line says why
    params.SetParameter("Method", "nonsense")
    widget.updateMethodSection(params)
    assert combo.currentIndex == -1 and widget._method is None
    assert not any(getattr(widget.ui, label).visible for label in Widget.METHOD_PARAMETER_LABELS.values())
    assert widget.ui.classifierStatusLabel.text.startswith('unknown method "nonsense"')
    choose(env, "igconda")


def test_the_scene_knows_the_method_that_made_its_heat_map(env, tmp_path):
    """A case rebuilt from the output nodes (a reopened scene, a new session) has the method, its parameters and the
    classifier that made the heat map: the table, the report and a re-threshold say the same."""
    import DiffusionAnomaly

    scene, logic, params = env["scene"], env["logic"], env["params"]
    choose(env, "cg-cdm")
    logic.runBlocking(params, timeout=600)
    description = logic.resultSummary(params)
    again = DiffusionAnomaly.DiffusionAnomalyLogic(scene, settingsPath=str(tmp_path / "s.json"))  # no case held
    case = again.updateLesions(again.getParameterNode())  # rebuilt from the scene's nodes, no run
    assert case.method_name == "cg-cdm" and case.parameters == logic.case.parameters
    assert case.classifier == logic.case.classifier and case.counterfactual is None
    assert outputs.methodWords(case) == description == again.resultSummary(params)
    report = again.exportReport(params, str(tmp_path / "report.html")).read_text()
    assert description.split(":")[0] in report and "tiny-classifier" in report
    # the attributes and the description are saved with the scene
    restored, _ = reopened(scene, tmp_path)
    heat = restored.GetNodeReference("HeatMap")
    assert heat.GetAttribute(outputs.METHOD_ATTRIBUTE) == "cg-cdm"
    assert restored.GetNodeReference("Table").GetDescription() == description
