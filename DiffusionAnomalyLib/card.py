"""The model card: schema, validation, the demo template, and how a card is shown (no torch).

A checkpoint is weights plus this JSON card (see :mod:`.checkpoint`). The card is the single
source of truth for a model's architecture, noise schedule, preprocessing, label map, modality,
default inference parameters and provenance; everything else reads it through this module.
It also owns two sentences every output repeats: the not-for-clinical-use notice and the
meaning of the ``steps`` parameter. Standard library only: Slicer's process can read it before
any package is installed.
"""

from __future__ import annotations

from typing import Any, Literal, Union

FORMAT = "diffusion-anomaly-checkpoint"
FORMAT_VERSION = 1
KNOWN_SCHEDULES = ("linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine")
METHODS = ("igconda", "classifier_guided", "cdm", "latent3d")
MODALITIES = ("PT", "CT")
#: DICOM modality code -> the word a user reads
MODALITY_NAMES = {"PT": "PET", "CT": "CT"}
#: method name in a card -> the title a user reads
METHOD_TITLES = {"igconda": "IgCONDA-PET (implicit guidance)", "classifier_guided": "classifier-guided DDIM/DDPM",
                 "cdm": "conditional diffusion (CDM)", "latent3d": "3D latent diffusion"}

#: The notice every report, figure, summary and the Slicer panel carry.
NOT_FOR_CLINICAL_USE = ("Research software. Not for clinical use: results come from an experimental model and "
                        "must not be used for diagnosis, treatment or any clinical decision.")

#: The same notice, short, for figure titles.
NOT_FOR_CLINICAL_USE_SHORT = "NOT FOR CLINICAL USE"

#: The ``steps`` value meaning the papers' stride-1 reference loop (the network at every timestep).
REFERENCE_STEPS = "reference"
#: DDIM steps: an integer K >= 1 (a strided grid of K points) or :data:`REFERENCE_STEPS`.
Steps = Union[int, Literal["reference"]]
STEPS_HELP = (f"DDIM steps: a whole number K >= 1 (a strided grid of K steps, fast) or '{REFERENCE_STEPS}' "
              "(the papers' stride-1 loop: one network evaluation per timestep, slow)")


class CheckpointError(ValueError):
    """A checkpoint or model card that cannot be used; the message says why and what to do."""


def parse_steps(value: Any) -> Steps | None:
    """The one reading of a ``steps`` value, from the CLI, a worker request or the parameter node.

    ``None`` or ``""``: not given (the model card's default applies); ``"reference"``: the stride-1
    reference loop; a whole number >= 1 (int, or its text): that many strided DDIM steps.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text == REFERENCE_STEPS:
            return REFERENCE_STEPS
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"steps must be a whole number >= 1 or '{REFERENCE_STEPS}', got {value!r}.") from None
    if isinstance(value, bool) or not float(value).is_integer():
        raise ValueError(f"steps must be a whole number >= 1 or '{REFERENCE_STEPS}', got {value!r}.")
    if int(value) < 1:
        raise ValueError(f"steps must be >= 1 (or '{REFERENCE_STEPS}' for the stride-1 reference loop), got {value}.")
    return int(value)


_REQUIRED = {
    "format": str,
    "format_version": int,
    "id": str,
    "method": str,
    "modality": str,
    "network": dict,
    "scheduler": dict,
    "preprocessing": dict,
    "labels": dict,
    "inference_defaults": dict,
    "provenance": dict,
}


def validate_card(card: Any) -> dict[str, Any]:
    """Check the card's structure; raise CheckpointError naming the first problem; return the card.

    The card is normalised in place (``inference_defaults.steps``, below).

    A card written before ``steps`` had one representation stores the reference loop as a
    missing or null ``inference_defaults.steps``; it is read as :data:`REFERENCE_STEPS`.
    """
    if not isinstance(card, dict):
        raise CheckpointError("the model card is not a JSON object.")
    for key, kind in _REQUIRED.items():
        if key not in card:
            raise CheckpointError(f"the model card has no '{key}' entry.")
        if not isinstance(card[key], kind):
            raise CheckpointError(f"model card entry '{key}' should be a {kind.__name__}.")
    if card["format"] != FORMAT:
        raise CheckpointError(f"not a DiffusionAnomaly model card (format {card['format']!r}).")
    if card["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint format version {card['format_version']} is newer than this software "
            f"understands ({FORMAT_VERSION}); update DiffusionAnomaly."
        )
    if card["method"] not in METHODS:
        raise CheckpointError(f"unknown method {card['method']!r}; expected one of {METHODS}.")
    if card["modality"] not in MODALITIES:
        raise CheckpointError(f"unknown modality {card['modality']!r}; expected one of {MODALITIES}.")
    if "unet" not in card["network"]:
        raise CheckpointError("the model card's network section has no 'unet' arguments.")
    sched = card["scheduler"]
    for key in ("num_train_timesteps", "schedule"):
        if key not in sched:
            raise CheckpointError(f"the model card's scheduler section has no '{key}'.")
    if sched["schedule"] not in KNOWN_SCHEDULES:
        raise CheckpointError(f"unknown noise schedule {sched['schedule']!r}; expected one of {KNOWN_SCHEDULES}.")
    if card["method"] in ("igconda", "cdm") and not card["network"].get("class_embedding"):
        raise CheckpointError(f"a {card['method']} model needs a class embedding (network.class_embedding).")
    defaults = card["inference_defaults"]
    try:
        defaults["steps"] = parse_steps(defaults.get("steps")) or REFERENCE_STEPS
    except ValueError as exc:
        raise CheckpointError(f"the model card's default {exc}") from None
    return card


def default_card(
    channels=(32, 64, 64),
    attention_levels=(False, False, True),
    spacing_mm=(6.0, 6.0, 6.0),
    in_plane_size=(64, 64),
    suv_scale=12.0,
) -> dict[str, Any]:
    """Model card of the demo IgCONDA-PET model (provenance is filled in by training)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "id": "igconda-pet-phantom-demo",
        "name": "IgCONDA-PET demo model (synthetic phantoms)",
        "method": "igconda",
        "modality": "PT",
        "network": {
            "unet": {
                "spatial_dims": 2, "in_channels": 1, "out_channels": 1,
                "channels": list(channels), "attention_levels": list(attention_levels),
                "num_res_blocks": 1, "num_head_channels": 16, "with_conditioning": True,
                "cross_attention_dim": 64, "norm_num_groups": 32,
            },
            "class_embedding": {"num_classes": 3, "dim": 64},
        },
        "scheduler": {"num_train_timesteps": 1000, "schedule": "linear_beta", "beta_start": 1e-4, "beta_end": 0.02},
        "preprocessing": {
            "orientation": "LPS", "spacing_mm": list(spacing_mm), "in_plane_size": list(in_plane_size),
            "antialias": True,
            "intensity": {"input_units": "SUVbw", "offset": 0.0, "scale": suv_scale, "clip": [0.0, 1.0]},
            "slice_axis": "S",
        },
        "labels": {"null": 0, "healthy": 1, "unhealthy": 2},
        "inference_defaults": {
            "noise_level": 400, "guidance_scale": 3.0, "steps": 10, "batch_size": 32,
            "threshold": {"method": "fraction", "value": 0.5}, "min_size_ml": 0.5,
        },
        "provenance": {},
        "not_for_clinical_use": True,
    }


def card_items(card: dict[str, Any]) -> list[tuple[str, str]]:
    """What a user is shown about a model, as (label, text) pairs: reports and the Slicer panel."""
    prov = card.get("provenance", {}) or {}
    modality = card.get("modality", "?")
    items = [("Model", str(card.get("id", "?"))),
             ("Method", METHOD_TITLES.get(card.get("method"), str(card.get("method", "?")))),
             ("Modality", MODALITY_NAMES.get(modality, str(modality))),
             ("Training data", prov.get("training_data") or "not stated in the model card")]
    if prov.get("validation_data"):
        items.append(("Validation data", str(prov["validation_data"])))
    if prov.get("validation_metrics"):
        items.append(("Validation metrics", ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                      for k, v in prov["validation_metrics"].items())))
    if prov.get("note"):
        items.append(("Note", str(prov["note"])))
    flagged = card.get("not_for_clinical_use", True)
    items.append(("Not for clinical use", "yes" if flagged else "not flagged by the card"))
    return items


def card_summary(card: dict[str, Any]) -> str:
    """:func:`card_items` as plain text lines ``Label: text`` (the Slicer panel's model summary)."""
    return "\n".join(f"{label}: {text}" for label, text in card_items(card))
