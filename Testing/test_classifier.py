"""The noise-conditioned classifier: its card, its network (MONAI DiffusionModelEncoder), its training
(cross-entropy on x_t, balanced batches, resumable, deterministic) and the ``train --method classifier`` verb."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from DiffusionAnomalyLib import cli, networks
from DiffusionAnomalyLib.card import CheckpointError, card_items, classifier_card, default_card, validate_card
from DiffusionAnomalyLib.checkpoint import read_card
from DiffusionAnomalyLib.training import TrainConfig, accuracy_bands, train, train_classifier

from conftest import DELETE, set_field


def tiny_classifier_card() -> dict:
    card = classifier_card(channels=(8, 16), attention_levels=(False, True), in_plane_size=(16, 16))
    card["network"]["encoder"].update(norm_num_groups=8, num_head_channels=8)
    return card


@pytest.fixture()
def tiny(tmp_path):
    g = np.random.default_rng(0)
    xs = g.random((16, 16, 16)).astype(np.float16)
    ys = np.array([1, 2] * 8, dtype=np.uint8)
    xs[ys == 2, 6:10, 6:10] = 1.0  # a bright "lesion": something to learn
    return tiny_classifier_card(), ((xs, ys), (xs[:6], ys[:6])), tmp_path / "run"


def _cfg(out, steps, resume=True, seed=0):
    return TrainConfig(out=out, steps=steps, batch_size=4, val_every=2, device="cpu", workers=1, resume=resume,
                       seed=seed)


# ---- card ------------------------------------------------------------------------------------------
def test_classifier_card_round_trip_and_igconda_template_unchanged(tmp_path):
    card = validate_card(classifier_card())
    assert card["method"] == "classifier" and card["labels"] == {"healthy": 0, "unhealthy": 1}
    assert card["network"] == {"encoder": card["network"]["encoder"]} and card["network"]["encoder"]["out_channels"] == 2
    igconda = default_card()
    assert card["scheduler"] == igconda["scheduler"] and card["preprocessing"] == igconda["preprocessing"]
    assert igconda["method"] == "igconda" and "unet" in igconda["network"]
    torch.manual_seed(0)
    model = networks.build_model(card)
    path = networks.save_checkpoint(model, card, tmp_path / "c.safetensors", verify=True)
    loaded = networks.load_weights(path, read_card(path))
    assert isinstance(loaded, networks.NoisyClassifier) and read_card(path) == card
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    assert tuple(loaded(torch.zeros(3, 1, 64, 64), torch.tensor([0, 500, 999])).shape) == (3, 2)


GOOD_TABLE = [{"timesteps": [0, 100], "accuracy": 0.9, "slices": 128},
              {"timesteps": [100, 1000], "accuracy": 0.55, "slices": 128}]

BAD_CLASSIFIER_FIELDS = [
    ("network.encoder", DELETE, "network section has no 'encoder' entry."),
    ("network.encoder", 3, "network.encoder must be a JSON object, got 3."),
    ("network.unet", {}, "network must hold only 'encoder' for the classifier method, got unet."),
    ("network.encoder.input_shape", [64, 64], "network.encoder.input_shape must be absent"),
    ("network.encoder.with_conditioning", True, "network.encoder must hold only DiffusionModelEncoder arguments"),
    ("network.encoder.channels", [32, 0, 64], "network.encoder.channels must be a list of 1 to 6 whole numbers"),
    ("network.encoder.attention_levels", [False], "network.encoder.attention_levels must be a list of 3 true/false"),
    ("network.encoder.norm_num_groups", 24, "network.encoder.norm_num_groups must divide every entry"),
    ("network.encoder.num_head_channels", 128, "network.encoder.num_head_channels must be at most the channels of "
                                               "every attention level (64 at level 3), got 128."),
    ("network.encoder.in_channels", 2, "network.encoder.in_channels must be a whole number from 1 to 1 (the "
                                       "classifier sees single-channel slices), got 2."),
    ("network.encoder.out_channels", 1, "network.encoder.out_channels must be a whole number from 2 to 1000"),
    ("network.encoder.spatial_dims", 3, "network.encoder.spatial_dims must be 2 for the classifier method, got 3."),
    ("network.encoder.num_res_blocks", DELETE, "network.encoder section has no 'num_res_blocks' entry."),
    ("labels.unhealthy", DELETE, "labels section has no 'unhealthy' entry (the classifier tells healthy"),
    ("labels.unhealthy", 2, "labels.unhealthy must be a whole number from 0 to 1 (one of the "
                            "network.encoder.out_channels = 2 logits), got 2."),
    ("labels.other", 1, "labels must give every class its own number"),
    ("inference_defaults.batch_size", 0, "inference_defaults.batch_size must be a whole number from 1 to 4096"),
    ("provenance.validation_accuracy_by_t", [], "provenance.validation_accuracy_by_t must be a list of 1 to 100"),
    ("provenance.validation_accuracy_by_t", {"0-100": 0.9}, "provenance.validation_accuracy_by_t must be a list"),
    ("provenance.validation_accuracy_by_t.0", 0.9, "provenance.validation_accuracy_by_t[0] must be a JSON object"),
    ("provenance.validation_accuracy_by_t.0.accuracy", 1.5,
     "provenance.validation_accuracy_by_t[0].accuracy must be a finite number from 0 to 1, got 1.5."),
    ("provenance.validation_accuracy_by_t.0.accuracy", float("nan"), "accuracy must be a finite number"),
    ("provenance.validation_accuracy_by_t.0.accuracy", DELETE,
     "provenance.validation_accuracy_by_t[0] section has no 'accuracy' entry."),
    ("provenance.validation_accuracy_by_t.1.timesteps", [50, 1000],
     "provenance.validation_accuracy_by_t[1].timesteps must be a [start, stop) pair of whole numbers with "
     "100 <= start < stop <= 1000 (bands in order, inside the noise schedule), got [50, 1000]."),
    ("provenance.validation_accuracy_by_t.1.timesteps", [100, 1001], "<= 1000"),
    ("provenance.validation_accuracy_by_t.0.timesteps", [100, 100], "timesteps must be a [start, stop) pair"),
    ("provenance.validation_accuracy_by_t.0.slices", 0, "provenance.validation_accuracy_by_t[0].slices must be a "
                                                        "whole number >= 1, got 0."),
    ("provenance.validation_accuracy_by_t.0.auc", 0.9, "must hold only timesteps, accuracy and slices, got unknown auc."),
]


def _set(card, path, value):
    """conftest.set_field, with list indices in the path (provenance.validation_accuracy_by_t.0.accuracy)."""
    *head, last = path.split(".")
    node = card
    for key in head:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        set_field(node, last, value)


@pytest.mark.parametrize("path, value, words", BAD_CLASSIFIER_FIELDS,
                         ids=[f"{p}={str(v)[:20]}" for p, v, _ in BAD_CLASSIFIER_FIELDS])
def test_a_bad_classifier_field_is_one_sentence_naming_it(path, value, words):
    card = classifier_card()
    card["provenance"]["validation_accuracy_by_t"] = copy.deepcopy(GOOD_TABLE)
    validate_card(copy.deepcopy(card))
    _set(card, path, value)
    with pytest.raises(CheckpointError) as info:
        validate_card(card)
    message = str(info.value)
    assert words in message, message
    assert "\n" not in message and message.endswith(".") and path.split(".")[0] in message


def test_the_accuracy_table_is_shown_and_checked_on_every_card():
    card = classifier_card()
    card["provenance"]["validation_accuracy_by_t"] = copy.deepcopy(GOOD_TABLE)
    assert dict(card_items(validate_card(card)))["Validation accuracy by timestep"] == "t 0-99: 90%, t 100-999: 55%"
    igconda = default_card()
    igconda["provenance"]["validation_accuracy_by_t"] = [{"timesteps": [0, 2000], "accuracy": 0.5, "slices": 1}]
    with pytest.raises(CheckpointError, match="stop <= 1000"):
        validate_card(igconda)


@pytest.mark.parametrize("cdm, words", [
    ({"noise_level": 400, "steps": 10, "tau": 0.95, "seed": 0}, None),
    ({"noise_level": 1000}, "inference_defaults.cdm.noise_level must be a whole number from 1 to 999"),
    ({"steps": 0}, "inference_defaults.cdm.steps must be a whole number from 1 to 400 (at most the noise level"),
    ({"noise_level": 5, "steps": 6}, "inference_defaults.cdm.steps must be a whole number from 1 to 5"),
    ({"tau": 1.0}, "inference_defaults.cdm.tau must be a finite number in (0, 1) (the weight of the unhealthy"),
    ({"tau": 0}, "inference_defaults.cdm.tau must be a finite number in (0, 1)"),
    ({"seed": -1}, "inference_defaults.cdm.seed must be a whole number from 0 to 4294967295, got -1."),
    ({"R": 10}, "inference_defaults.cdm may hold only noise_level, steps, tau, seed; it has R."),
    ([400], "inference_defaults.cdm must be an object, got [400]."),
    ({"tau": 0.5, "classifier_scale": 3}, "inference_defaults.cdm may hold only"),
])
def test_cdm_defaults_of_a_conditional_card(tmp_path, cdm, words):
    """A method section of a card is checked by the method catalog wherever a checkpoint is read."""
    card = default_card()
    card["inference_defaults"]["cdm"] = cdm
    path = tmp_path / "model.safetensors"
    networks.save_checkpoint(networks.build_model(validate_card(copy.deepcopy(default_card()))), card, path)
    if words is None:
        assert read_card(path)["inference_defaults"]["cdm"] == cdm
    else:
        with pytest.raises(CheckpointError) as info:
            read_card(path)
        assert words in str(info.value) and "\n" not in str(info.value)


# ---- network ---------------------------------------------------------------------------------------
def test_the_weight_checks_apply_to_a_classifier(tmp_path):
    from safetensors.torch import save_file

    from DiffusionAnomalyLib.checkpoint import CARD_KEY

    card = validate_card(tiny_classifier_card())
    model = networks.build_model(card)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    meta = {CARD_KEY: json.dumps(card)}
    path = tmp_path / "bad.safetensors"

    wrong = dict(state)
    wrong["encoder.out.3.weight"] = torch.zeros(3, 512)
    save_file(wrong, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match=r"another shape \(encoder.out.3.weight \(3, 512\) in the file, "
                                              r"\(2, 512\) in the card"):
        networks.load_weights(path, card)
    missing = {k: v for k, v in state.items() if k != "encoder.conv_in.conv.weight"}
    save_file(missing, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="1 tensor missing"):
        networks.load_weights(path, card)
    bad = dict(state)
    bad["encoder.conv_in.conv.bias"] = torch.full_like(state["encoder.conv_in.conv.bias"], float("nan"))
    save_file(bad, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        networks.load_weights(path, card)
    # a classifier's weights under an igconda card (and the reverse) are refused by name
    save_file(state, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="do not match the network"):
        networks.load_weights(path, default_card())


# ---- training --------------------------------------------------------------------------------------
def test_tiny_classifier_trains_resumes_and_its_checkpoint_loads(tiny):
    card, data, out = tiny
    logs = []
    best = train_classifier(_cfg(out, 4), card, data=data, log=logs.append)
    assert best == out / "best.safetensors"
    saved = read_card(best)
    assert saved["method"] == "classifier" and saved["network"] == validate_card(copy.deepcopy(card))["network"]
    table = saved["provenance"]["validation_accuracy_by_t"]
    assert [b["timesteps"] for b in table] == [[0, 100], [100, 250], [250, 500], [500, 1000]]
    assert all(b["slices"] == 6 and 0 <= b["accuracy"] <= 1 for b in table)
    assert set(saved["provenance"]["validation_metrics"]) == {"val_accuracy", "val_cross_entropy"}
    assert isinstance(networks.load_weights(best, saved), networks.NoisyClassifier)
    history = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in history] == [2, 4]

    logs.clear()
    train_classifier(_cfg(out, 6), card, data=data, log=logs.append)
    assert any(m.startswith("resumed from step 4") for m in logs)
    assert [h["step"] for h in json.loads((out / "history.json").read_text())] == [2, 4, 6]
    # an IgCONDA run refuses to resume the classifier's state (and the reverse), before any work
    with pytest.raises(ValueError, match="holds a classifier training run, not a igconda one"):
        train(_cfg(out, 8), data=data, log=logs.append)


def test_classifier_training_is_deterministic_on_cpu(tiny, tmp_path):
    card, data, _ = tiny
    weights = []
    for name in ("a", "b"):
        best = train_classifier(_cfg(tmp_path / name, 3), card, data=data, log=lambda m: None)
        weights.append(networks.load_weights(best, read_card(best)).state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert read_card(tmp_path / "a" / "best.safetensors")["provenance"]["validation_accuracy_by_t"] == \
        read_card(tmp_path / "b" / "best.safetensors")["provenance"]["validation_accuracy_by_t"]


def test_accuracy_bands_follow_the_schedule():
    assert accuracy_bands(1000) == [(0, 100), (100, 250), (250, 500), (500, 1000)]
    assert accuracy_bands(10) == [(0, 1), (1, 2), (2, 5), (5, 10)]
    assert accuracy_bands(2) == [(0, 1), (1, 2)]


# ---- the verb --------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, words", [
    (["--steps", "0"], "--steps must be a whole number >= 1, got 0."),
    (["--steps", "2.5"], "--steps must be a whole number >= 1, got 2.5."),
    (["--batch-size", "1"], "--batch-size must be a whole number >= 2 (half healthy, half unhealthy slices), got 1."),
    (["--train-cases", "0"], "--train-cases must be a whole number >= 1, got 0."),
    (["--val-cases", "-3"], "--val-cases must be a whole number >= 1"),
    (["--max-minutes", "0"], "--max-minutes must be a finite number > 0, got 0."),
    (["--lr", "nan"], "--lr must be a finite number in (0, 1], got NaN."),
    (["--val-seed", "1100"], "the validation phantoms (seeds 1100..1111) must not overlap the training phantoms"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--method", "svm"], "invalid choice: 'svm'"),
])
def test_train_classifier_refuses_before_any_work(tmp_path, capsys, extra, words):
    out = tmp_path / "run"
    code = cli.main(["train", "--method", "classifier", "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert code == 2 and words in err, err
    assert not out.exists()


def test_train_without_method_stays_igconda(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(cli, "train", lambda cfg, card, log: calls.append(("igconda", card["method"])) or "x")
    monkeypatch.setattr(cli, "train_classifier", lambda cfg, card, log: calls.append(("classifier", card["method"])) or "y")
    assert cli.main(["train", "--out", str(tmp_path / "a"), "--steps", "5"]) == 0
    assert cli.main(["train", "--method", "classifier", "--out", str(tmp_path / "b")]) == 0
    assert calls == [("igconda", "igconda"), ("classifier", "classifier")]


def test_a_classifier_is_no_model_to_run(tmp_path):
    """A guidance classifier is refused where a scan would be analysed (CLI, Python, Slicer's model list)."""
    from DiffusionAnomalyLib.checkpoint import bundled_checkpoint
    from DiffusionAnomalyLib.methods import load_checkpoint
    from DiffusionAnomalyLib.networks import build_model, save_checkpoint

    card = classifier_card(channels=(8, 16, 16), in_plane_size=(32, 32))
    card["network"]["encoder"].update(norm_num_groups=8, num_head_channels=8)
    torch.manual_seed(0)
    path = save_checkpoint(build_model(card), card, tmp_path / "classifier.safetensors")
    with pytest.raises(CheckpointError, match=r"is a noise-conditioned classifier .*, which guides a diffusion model "
                                              r"but makes no heat map itself; choose a diffusion model's checkpoint\."):
        load_checkpoint(path, device="cpu")
    assert read_card(bundled_checkpoint())["method"] != "classifier"  # the default bundled model analyses scans


def test_slicers_model_list_leaves_out_guidance_classifiers(tmp_path, monkeypatch):
    import shutil
    import sys

    from DiffusionAnomalyLib import checkpoint
    from DiffusionAnomalyLib.networks import build_model, save_checkpoint

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "DiffusionAnomaly"))
    from DiffusionAnomalyModuleLib.models import ModelDatabase

    card = classifier_card(channels=(8, 16, 16), in_plane_size=(32, 32))
    card["network"]["encoder"].update(norm_num_groups=8, num_head_channels=8)
    torch.manual_seed(0)
    save_checkpoint(build_model(card), card, tmp_path / "guide.safetensors")
    shutil.copy(checkpoint.bundled_checkpoint(), tmp_path / "demo.safetensors")
    (tmp_path / "registry.json").write_text(json.dumps({"models": [
        {"id": "guide", "file": "guide.safetensors", "method": "classifier"},
        {"id": "demo", "file": "demo.safetensors", "method": "igconda"}]}))
    monkeypatch.setattr(checkpoint, "models_dir", lambda: tmp_path)
    assert [e["id"] for e in checkpoint.bundled_models()] == ["guide", "demo"]
    assert checkpoint.bundled_checkpoint() == tmp_path / "demo.safetensors"  # the first model that analyses scans
    database = ModelDatabase(settingsPath=tmp_path / "settings.json")
    assert [e["id"] for e in database.models()] == ["demo"]
    with pytest.raises(CheckpointError, match="guide.safetensors is a noise-conditioned classifier"):
        database.addUserCheckpoint(tmp_path / "guide.safetensors")
    assert not (tmp_path / "settings.json").exists()


# ---- guidance --------------------------------------------------------------------------------------
def test_guidance_in_bf16_is_float32_deterministic_and_close_to_fp32():
    """The guidance classifier follows the method's precision (bf16 autocast on the CPU); its gradient and
    confidence stay float32 / float64 and deterministic. (Its use by the methods: Testing/test_guided.py.)"""
    from DiffusionAnomalyLib.methods.guidance import Guidance

    card = validate_card(tiny_classifier_card())
    torch.manual_seed(0)
    model = networks.build_model(card)
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    fp32 = Guidance(copy.deepcopy(model), card, device="cpu", precision="fp32")
    bf16 = Guidance(copy.deepcopy(model), card, device="cpu", precision="bf16")
    ref = fp32.grad_log_prob(x, 100, card["labels"]["healthy"])
    a, b = (bf16.grad_log_prob(x, 100, card["labels"]["healthy"]) for _ in range(2))
    assert a.dtype == torch.float32 and torch.equal(a, b) and torch.isfinite(a).all()
    assert float((a - ref).abs().max()) < 0.1 * float(ref.abs().max())
    p32, p16 = fp32.p_unhealthy(x), bf16.p_unhealthy(x.squeeze(1).numpy())
    assert p16.dtype == np.float64 and np.all((p16 >= 0) & (p16 <= 1)) and np.abs(p16 - p32).max() < 0.05
    assert bf16.classifier_evaluations == 4 + 4 + 4 and fp32.classifier_evaluations == 4 + 4
    assert not any(p.requires_grad for p in bf16.model.parameters())  # only the input's gradient is taken


def test_healthy_slices_are_paired_by_body_position():
    """The classifier sees healthy slices of the same body position as the unhealthy ones, so anatomy alone
    (lesions sit in the torso more often than in the head) cannot separate the classes."""
    from DiffusionAnomalyLib.training import HEALTHY, POSITION_WINDOW, UNHEALTHY, healthy_near, matched_pairs

    per_case, cases = 40, 5
    labels = np.full(per_case * cases, HEALTHY, np.uint8)
    labels[[12, 13, 55, 170, 171]] = UNHEALTHY  # positions 12, 13, 15, 10, 11
    near = healthy_near(labels, cases)
    assert len(near) == per_case
    pairs = matched_pairs(np.random.default_rng(0), np.flatnonzero(labels == UNHEALTHY), near)
    assert (labels[pairs] == HEALTHY).all()
    assert (np.abs(pairs % per_case - np.flatnonzero(labels == UNHEALTHY) % per_case) <= POSITION_WINDOW).all()
    assert healthy_near(labels, 3) is None  # 200 slices do not split into 3 equal cases: no pairing
