"""The model card's own rules: the one reading of ``steps``, how older cards are read, and every field's
type and range (one sentence naming the field, never a traceback)."""

from __future__ import annotations

import copy
import json
import math

import pytest

from DiffusionAnomalyLib.card import (REFERENCE_STEPS, THRESHOLD_METHODS, CheckpointError, card_items, card_summary,
                                      check_guidance_scale, check_min_size_ml, check_noise_level, check_steps,
                                      check_threshold, default_card, parse_steps, real_number, shown, validate_card,
                                      whole_number)

from conftest import DELETE, set_field


@pytest.mark.parametrize("given, expected", [
    (None, None), ("", None), ("  ", None),
    ("reference", REFERENCE_STEPS), (" Reference ", REFERENCE_STEPS),
    (20, 20), ("20", 20), (20.0, 20), (1, 1),
])
def test_parse_steps_accepts_one_representation(given, expected):
    assert parse_steps(given) == expected


@pytest.mark.parametrize("given, message", [
    (0, ">= 1"), ("0", ">= 1"), (-3, ">= 1"), (2.5, "whole number"), ("fast", "whole number"),
    (True, "whole number"), ("default", "whole number"), ([3], "whole number"), ({"k": 3}, "whole number"),
    (float("nan"), "whole number"), (float("inf"), "whole number"),
])
def test_parse_steps_refuses_everything_else_with_a_sentence(given, message):
    with pytest.raises(ValueError, match=message):
        parse_steps(given)


@pytest.mark.parametrize("legacy", [None, "missing"])
def test_an_older_card_without_steps_means_the_reference_loop(legacy):
    card = default_card()
    if legacy == "missing":
        del card["inference_defaults"]["steps"]
    else:
        card["inference_defaults"]["steps"] = None
    assert validate_card(card)["inference_defaults"]["steps"] == REFERENCE_STEPS


def test_a_card_with_zero_steps_is_refused():
    card = default_card()
    card["inference_defaults"]["steps"] = 0
    with pytest.raises(CheckpointError, match=r"the model card's inference_defaults.steps must be >= 1"):
        validate_card(card)


def test_card_summary_says_what_a_user_must_know():
    card = copy.deepcopy(default_card())
    card["provenance"] = {"training_data": "synthetic phantoms", "validation_metrics": {"val_mse": 0.002072}}
    items = dict(card_items(card))
    assert items["Method"] == "IgCONDA-PET (implicit guidance)" and items["Modality"] == "PET"
    assert items["Validation metrics"] == "val_mse 0.002072"
    assert items["Not for clinical use"] == "yes"
    assert card_summary(card).splitlines()[0] == f"Model: {card['id']}"


# ---- field by field ------------------------------------------------------------------------------

#: (dotted path, bad value, the words the sentence must contain); every case names its field
BAD_FIELDS = [
    # scheduler
    ("scheduler.num_train_timesteps", -5, "scheduler.num_train_timesteps must be a whole number from 2 to 100000, got -5."),
    ("scheduler.num_train_timesteps", 10 ** 9, "scheduler.num_train_timesteps must be a whole number from 2"),
    ("scheduler.num_train_timesteps", 1, "got 1."),
    ("scheduler.num_train_timesteps", 999.5, "got 999.5."),
    ("scheduler.num_train_timesteps", "1000", 'got "1000".'),
    ("scheduler.num_train_timesteps", True, "got true."),
    ("scheduler.schedule", "quadratic", 'scheduler.schedule must be one of linear_beta'),
    ("scheduler.beta_start", float("nan"), "scheduler.beta_start must be a finite number in (0, 1), got NaN."),
    ("scheduler.beta_start", 0.0, "scheduler.beta_start must be a finite number in (0, 1)"),
    ("scheduler.beta_end", 1e-5, "scheduler.beta_end must be a finite number in (0.0001, 1) (above scheduler.beta_start)"),
    ("scheduler.beta_end", 1.5, "scheduler.beta_end must be"),
    ("scheduler.beta_end", DELETE, "no 'beta_end' entry (give both beta_start and beta_end"),
    ("scheduler.prediction", "epsilon", "scheduler must hold only num_train_timesteps"),
    # preprocessing
    ("preprocessing.spacing_mm", [0, 6, 6], "preprocessing.spacing_mm must be a list of 3 finite numbers"),
    ("preprocessing.spacing_mm", [-6.0, 6.0, 6.0], "got [-6.0, 6.0, 6.0]."),
    ("preprocessing.spacing_mm", [6.0, 6.0], "preprocessing.spacing_mm"),
    ("preprocessing.spacing_mm", [6.0, 6.0, float("inf")], "got [6.0, 6.0, Infinity]."),
    ("preprocessing.spacing_mm", ["6", 6, 6], "preprocessing.spacing_mm"),
    ("preprocessing.in_plane_size", [0, 64], "preprocessing.in_plane_size must be a list of 2 whole numbers from 1 to 1024"),
    ("preprocessing.in_plane_size", [64, 64.5], "preprocessing.in_plane_size"),
    ("preprocessing.in_plane_size", [100000, 100000], "preprocessing.in_plane_size"),
    ("preprocessing.in_plane_size", [30, 30], "in_plane_size must be two multiples of 4 of at least 8 (the network halves a slice 2 times), got [30, 30]."),
    ("preprocessing.in_plane_size", [4, 4], "at least 8"),
    ("preprocessing.intensity.scale", 0, "preprocessing.intensity.scale must be a finite number in (0, 1e+07]"),
    ("preprocessing.intensity.scale", -12.0, "preprocessing.intensity.scale"),
    ("preprocessing.intensity.scale", float("inf"), "preprocessing.intensity.scale"),
    ("preprocessing.intensity.scale", DELETE, "preprocessing.intensity section has no 'scale' entry."),
    ("preprocessing.intensity.offset", float("nan"), "preprocessing.intensity.offset must be a finite number"),
    ("preprocessing.intensity.offset", 1e300, "preprocessing.intensity.offset must be a finite number from -1e+07 to 1e+07"),
    ("preprocessing.intensity.scale", 1e300, "preprocessing.intensity.scale must be a finite number in (0, 1e+07]"),
    ("preprocessing.intensity.clip", [1.0, 0.0], "preprocessing.intensity.clip must be null or a [low, high] pair"),
    ("preprocessing.intensity.clip", [0.0], "preprocessing.intensity.clip"),
    ("preprocessing.orientation", "RAS", 'preprocessing.orientation must be "LPS"'),
    ("preprocessing.slice_axis", "R", 'preprocessing.slice_axis must be "S"'),
    ("preprocessing.antialias", "yes", "preprocessing.antialias must be true or false"),
    # labels
    ("labels.unhealthy", 7, "labels.unhealthy must be a whole number from 0 to 2 (inside network.class_embedding.num_classes), got 7."),
    ("labels.healthy", -1, "labels.healthy must be a whole number from 0 to 2"),
    ("labels.healthy", "1", "labels.healthy"),
    ("labels.healthy", 0, "labels must give every class its own number"),
    ("labels.null", DELETE, "labels section has no 'null' entry"),
    # network
    ("network.class_embedding.num_classes", 0, "network.class_embedding.num_classes must be a whole number from 1 to 1000"),
    ("network.class_embedding.num_classes", 10 ** 12, "network.class_embedding.num_classes"),
    ("network.class_embedding.dim", -64, "network.class_embedding.dim must be a whole number from 1 to 4096"),
    ("network.class_embedding", DELETE, "network.class_embedding is missing"),
    ("network.unet.channels", [32, 0, 64], "network.unet.channels must be a list of 1 to 6 whole numbers from 1 to 2048"),
    ("network.unet.channels", [], "network.unet.channels"),
    ("network.unet.channels", "32,64,64", "network.unet.channels"),
    ("network.unet.channels", [10 ** 6, 64, 64], "network.unet.channels"),
    ("network.unet.attention_levels", [False, True], "network.unet.attention_levels must be a list of 3 true/false values"),
    ("network.unet.attention_levels", [0, 0, 1], "network.unet.attention_levels"),
    ("network.unet.num_res_blocks", 0, "network.unet.num_res_blocks must be a whole number from 1 to 16 or a list of 3"),
    ("network.unet.num_res_blocks", [1, 1], "network.unet.num_res_blocks must be a list of 3 whole numbers"),
    ("network.unet.norm_num_groups", 24, "network.unet.norm_num_groups must divide every entry of network.unet.channels ([32, 64, 64]), got 24."),
    ("network.unet.norm_num_groups", 0, "network.unet.norm_num_groups must be a whole number from 1"),
    ("network.unet.num_head_channels", 128, "network.unet.num_head_channels must be at most the channels"),
    ("network.unet.num_head_channels", -16, "network.unet.num_head_channels"),
    ("network.unet.cross_attention_dim", 32, "network.unet.cross_attention_dim must equal network.class_embedding.dim (64), got 32."),
    ("network.unet.with_conditioning", False, "network.unet.with_conditioning must be true"),
    ("network.unet.with_conditioning", "true", "network.unet.with_conditioning must be true or false"),
    ("network.unet.spatial_dims", 3, "network.unet.spatial_dims must be 2 for the igconda method, got 3."),
    ("network.unet.in_channels", 2, "network.unet.in_channels must be a whole number from 1 to 1 (IgCONDA works on single-channel slices)"),
    ("network.unet.dropout_cattn", 1.5, "network.unet.dropout_cattn must be a finite number from 0 to 1"),
    ("network.unet.bogus_argument", 1, "network.unet must hold only DiffusionModelUNet arguments"),
    ("network.unet.norm_num_groups", DELETE, "network.unet section has no 'norm_num_groups' entry."),
    ("network.unet", [], "network.unet must be a JSON object, got []."),
    # inference defaults
    ("inference_defaults.noise_level", 1000, "inference_defaults.noise_level must be a whole number from 1 to 999 (the model's noise schedule has 1000 timesteps), got 1000."),
    ("inference_defaults.noise_level", 0, "inference_defaults.noise_level"),
    ("inference_defaults.noise_level", 20.7, "got 20.7."),
    ("inference_defaults.guidance_scale", float("nan"), "inference_defaults.guidance_scale must be a finite number >= 0, got NaN."),
    ("inference_defaults.guidance_scale", -1, "inference_defaults.guidance_scale"),
    ("inference_defaults.guidance_scale", "3", "inference_defaults.guidance_scale"),
    ("inference_defaults.steps", "fast", "inference_defaults.steps must be a whole number >= 1 or 'reference', got \"fast\"."),
    ("inference_defaults.steps", [10], "inference_defaults.steps"),
    ("inference_defaults.steps", 10 ** 20, "inference_defaults.steps must be a whole number from 1 to 999 (the model's "
                                           "noise schedule has 1000 timesteps) or 'reference', got 100000000000000000000."),
    ("inference_defaults.batch_size", 0, "inference_defaults.batch_size must be a whole number from 1 to 4096"),
    ("inference_defaults.threshold", {"method": "median", "value": 0.5}, "inference_defaults.threshold.method must be one of fraction, absolute, otsu, got \"median\"."),
    ("inference_defaults.threshold", {"method": "fraction", "value": 1.5}, "inference_defaults.threshold.value must be a finite number in (0, 1] for the 'fraction' method"),
    ("inference_defaults.threshold", {"method": "fraction", "value": None}, "inference_defaults.threshold.value"),
    ("inference_defaults.threshold", {"method": "absolute", "value": float("inf")}, "inference_defaults.threshold.value must be a finite number > 0 for the 'absolute' method"),
    ("inference_defaults.threshold", {"method": "absolute", "value": -1}, "inference_defaults.threshold.value"),
    ("inference_defaults.threshold", {"method": "fraction"}, "inference_defaults.threshold section has no 'value' entry."),
    ("inference_defaults.threshold", "otsu", "inference_defaults.threshold must be a JSON object"),
    ("inference_defaults.min_size_ml", -0.5, "inference_defaults.min_size_ml must be a finite number >= 0, got -0.5."),
    ("inference_defaults.min_size_ml", float("nan"), "inference_defaults.min_size_ml"),
    ("inference_defaults.noise_level", DELETE, "inference_defaults section has no 'noise_level' entry."),
    # provenance, top level
    ("provenance.train_seeds", [10, 5], "provenance.train_seeds must be a [start, stop) pair of whole numbers with 0 <= start < stop, got [10, 5]."),
    ("provenance.val_seeds", [1.5, 3], "provenance.val_seeds"),
    ("provenance.tuning_seeds", [-1, 3], "provenance.tuning_seeds"),
    ("provenance.train_seeds", "1000..1160", "provenance.train_seeds"),
    ("id", "", "id must be a non-empty text"),
    ("id", "two\nlines", r'got "two\nlines".'),
    ("id", 42, "id must be a non-empty text"),
    ("id", "x" * 500, "id must be a non-empty text of at most 200"),
    ("modality", "MR", 'modality must be one of PT, CT, got "MR".'),
    ("method", "magic", 'method must be one of igconda'),
    ("format_version", True, "format_version must be a whole number >= 1, got true."),
    ("not_for_clinical_use", "no", "not_for_clinical_use must be true or false"),
    ("name", ["a"], "name must be a text"),
    ("scheduler", [], "scheduler must be a JSON object"),
]


@pytest.mark.parametrize("path, value, words", BAD_FIELDS, ids=[f"{p}={shown(v) if v is not DELETE else 'deleted'}"[:60]
                                                                  for p, v, _ in BAD_FIELDS])
def test_a_bad_field_is_one_sentence_naming_it(path, value, words):
    card = default_card()
    card["provenance"] = {"train_seeds": [1000, 1160], "val_seeds": [900000, 900012]}
    set_field(card, path, value)
    with pytest.raises(CheckpointError) as info:
        validate_card(card)
    message = str(info.value)
    assert words in message
    assert "\n" not in message and message.endswith(".") and "Traceback" not in message
    if not message.startswith("the model card has no"):
        field = path.split(".")[0]
        assert field in message


def test_the_cards_in_use_are_valid(tiny_card):
    from DiffusionAnomalyLib.checkpoint import bundled_checkpoint, read_card

    validate_card(copy.deepcopy(tiny_card))
    validate_card(default_card())
    assert read_card(bundled_checkpoint())["id"] == "igconda-pet-phantom-demo"


def test_validation_normalises_whole_numbers_written_as_floats():
    card = default_card()
    card["scheduler"]["num_train_timesteps"] = 1000.0
    card["network"]["unet"]["channels"] = [32.0, 64.0, 64.0]
    card["inference_defaults"]["noise_level"] = 400.0
    validate_card(card)
    assert card["scheduler"]["num_train_timesteps"] == 1000 and type(card["scheduler"]["num_train_timesteps"]) is int
    assert all(type(c) is int for c in card["network"]["unet"]["channels"])
    assert type(card["inference_defaults"]["noise_level"]) is int
    assert validate_card(json.loads(json.dumps(card))) == card  # and it is idempotent


def test_cosine_schedule_takes_no_beta_range():
    card = default_card()
    card["scheduler"]["schedule"] = "cosine"
    with pytest.raises(CheckpointError, match=r"scheduler.beta_start must be absent for the 'cosine' schedule"):
        validate_card(card)
    del card["scheduler"]["beta_start"], card["scheduler"]["beta_end"]
    validate_card(card)


def test_otsu_threshold_needs_no_value_and_html_in_the_id_is_allowed():
    card = default_card()
    card["inference_defaults"]["threshold"] = {"method": "otsu"}
    card["id"] = "<b>bold</b> & <script>alert(1)</script>"
    validate_card(card)  # shown as text wherever it appears; escaping is the report's and the panel's job


@pytest.mark.parametrize("given, lo, hi, expected", [(3, 1, 5, 3), (3.0, 1, 5, 3), (1, 1, None, 1)])
def test_whole_number_accepts(given, lo, hi, expected):
    got = whole_number(given, "x", lo, hi)
    assert got == expected and type(got) is int


@pytest.mark.parametrize("given", [20.7, True, "3", None, float("nan"), float("inf"), [3], 0, 6])
def test_whole_number_refuses_without_coercion(given):
    with pytest.raises(ValueError, match=r"^--x must be a whole number from 1 to 5, got .*\.$"):
        whole_number(given, "--x", 1, 5)


@pytest.mark.parametrize("given", [float("nan"), float("inf"), -float("inf"), True, "1", None, 10 ** 400])
def test_real_number_refuses_non_finite_and_non_numbers(given):
    with pytest.raises(ValueError, match="must be a finite number"):
        real_number(given, "the value")


def test_parameter_rules_shared_with_every_verb():
    assert check_noise_level(999, 1000) == 999
    with pytest.raises(ValueError, match=r"^the noise level must be a whole number from 1 to 999 \(the model's noise "
                                         r"schedule has 1000 timesteps\), got 1000\.$"):
        check_noise_level(1000, 1000)
    assert check_guidance_scale(0) == 0.0
    with pytest.raises(ValueError, match="^the guidance scale must be a finite number >= 0, got NaN.$"):
        check_guidance_scale(math.nan)
    assert check_steps("reference", 1000) == REFERENCE_STEPS and check_steps("999", 1000) == 999
    with pytest.raises(ValueError, match=r"^steps must be a whole number from 1 to 999 \(the model's noise schedule "
                                         r"has 1000 timesteps\) or 'reference', got 1000\.$"):
        check_steps(1000, 1000)
    with pytest.raises(ValueError, match="^steps must be given"):
        check_steps(None, 1000)
    assert check_min_size_ml(0) == 0.0
    with pytest.raises(ValueError, match="minimum lesion size"):
        check_min_size_ml(-1)
    assert THRESHOLD_METHODS == ("fraction", "absolute", "otsu")
    assert check_threshold("fraction", 1) == 1.0 and check_threshold("absolute", 2.5) == 2.5
    assert check_threshold("otsu", "ignored") is None
    for method, value in (("fraction", 0), ("fraction", 1.01), ("absolute", 0), ("absolute", math.nan),
                          ("fraction", "0.5"), ("median", 0.5), (None, 0.5)):
        with pytest.raises(ValueError, match="^the threshold (method|value) must be"):
            check_threshold(method, value)


def test_shown_is_short_and_on_one_line():
    assert shown("a\nb") == '"a\\nb"'
    assert shown(float("nan")) == "NaN" and shown(None) == "null" and shown(True) == "true"
    assert len(shown(list(range(1000)))) == 80
    assert shown(object()).startswith("<object")
