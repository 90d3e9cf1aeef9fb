"""The model card's own rules: the one reading of ``steps``, and how older cards are read."""

from __future__ import annotations

import copy

import pytest

from DiffusionAnomalyLib.card import (REFERENCE_STEPS, CheckpointError, card_items, card_summary, default_card,
                                      parse_steps, validate_card)


@pytest.mark.parametrize("given, expected", [
    (None, None), ("", None), ("  ", None),
    ("reference", REFERENCE_STEPS), (" Reference ", REFERENCE_STEPS),
    (20, 20), ("20", 20), (20.0, 20), (1, 1),
])
def test_parse_steps_accepts_one_representation(given, expected):
    assert parse_steps(given) == expected


@pytest.mark.parametrize("given, message", [
    (0, ">= 1"), ("0", ">= 1"), (-3, ">= 1"), (2.5, "whole number"), ("fast", "whole number"),
    (True, "whole number"), ("default", "whole number"),
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
    with pytest.raises(CheckpointError, match="default steps must be >= 1"):
        validate_card(card)


def test_card_summary_says_what_a_user_must_know():
    card = copy.deepcopy(default_card())
    card["provenance"] = {"training_data": "synthetic phantoms", "validation_metrics": {"val_mse": 0.002072}}
    items = dict(card_items(card))
    assert items["Method"] == "IgCONDA-PET (implicit guidance)" and items["Modality"] == "PET"
    assert items["Validation metrics"] == "val_mse 0.002072"
    assert items["Not for clinical use"] == "yes"
    assert card_summary(card).splitlines()[0] == f"Model: {card['id']}"
