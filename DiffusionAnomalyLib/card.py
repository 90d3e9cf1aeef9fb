"""The model card: schema, validation, the demo template, and how a card is shown (no torch).

A checkpoint is weights plus this JSON card (see :mod:`.checkpoint`). The card is the single
source of truth for a model's architecture, noise schedule, preprocessing, label map, modality,
default inference parameters and provenance; everything else reads it through this module.
It also owns two sentences every output repeats: the not-for-clinical-use notice and the
meaning of the ``steps`` parameter, and the range of every number a card or a user gives
(:func:`validate_card`, and the field rules :func:`whole_number`, :func:`real_number`,
:func:`check_noise_level`, :func:`check_guidance_scale`, :func:`check_threshold`,
:func:`check_min_size_ml`, :func:`parse_steps` that every verb calls). Standard library only:
Slicer's process can read it before any package is installed.
"""

from __future__ import annotations

import copy

import json
import math
import numbers
from typing import Any, Literal, Union

FORMAT = "diffusion-anomaly-checkpoint"
FORMAT_VERSION = 1
KNOWN_SCHEDULES = ("linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine")
METHODS = ("igconda", "classifier_guided", "cdm", "latent3d", "classifier")
#: the methods whose model makes a heat map of a scan (a "classifier" model only guides another one)
ANALYSIS_METHODS = tuple(m for m in METHODS if m != "classifier")


def check_analysis_model(card: dict, source: str) -> dict:
    """``card`` if its model analyses scans; a guidance classifier is refused with one sentence naming ``source``."""
    if card.get("method") not in ANALYSIS_METHODS:
        raise CheckpointError(f"{source} is a {METHOD_TITLES.get(card.get('method'), card.get('method'))}, which "
                              "guides a diffusion model but makes no heat map itself; choose a diffusion model's "
                              "checkpoint.")
    return card
MODALITIES = ("PT", "CT")
#: DICOM modality code -> the word a user reads
MODALITY_NAMES = {"PT": "PET", "CT": "CT"}
#: method name in a card -> the title a user reads
METHOD_TITLES = {"igconda": "IgCONDA-PET (implicit guidance)", "classifier_guided": "classifier-guided DDIM/DDPM",
                 "cdm": "conditional diffusion (CDM)", "latent3d": "3D latent diffusion",
                 "classifier": "noise-conditioned classifier (healthy vs unhealthy)"}

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


# ---- field rules ---------------------------------------------------------------------------------
# Each rule is one small pure function: validate_card applies it to the card's defaults, and every
# verb (CLI, worker, Slicer) applies the same function to the parameters a user gives, so a range is
# written once. They raise ValueError with one sentence "<field> must be <rule>, got <value>.".

#: how a heat map becomes lesions: a fraction of the map's maximum, an absolute value, or Otsu's split
THRESHOLD_METHODS: tuple[str, ...] = ("fraction", "absolute", "otsu")


def shown(value: Any) -> str:
    """A value as a user reads it at the end of a sentence: JSON spelling, one line, at most 80 characters."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    text = " ".join(text.split())
    return text if len(text) <= 80 else text[:77] + "..."


def _is_whole(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, numbers.Integral):
        return True
    return isinstance(value, numbers.Real) and math.isfinite(float(value)) and float(value).is_integer()


def _bounds(lo: Any, hi: Any, lo_open: bool = False, hi_open: bool = False) -> str:
    lo, hi = (f"{b:g}" if isinstance(b, float) else b for b in (lo, hi))
    if lo is not None and hi is not None:
        if not lo_open and not hi_open:
            return f" from {lo} to {hi}"
        return f" in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f" {'<' if hi_open else '<='} {hi}"
    return ""


def number_from_text(value: Any) -> Any:
    """A number written as text ("20" -> 20, "20.7" -> 20.7, "nan" -> nan), anything else unchanged.

    A CLI argument, a worker request or the parameter node give text; the range checks below then
    refuse what is wrong with the valid range in the sentence (never rounded: 20.7 stays 20.7).
    """
    if not isinstance(value, str):
        return value
    text = value.strip()
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return value


def fraction_from_text(value: Any) -> Any:
    """A fraction written as a percentage ("50%" -> 0.5, "35 %" -> 0.35) or as a number (:func:`number_from_text`);
    anything else unchanged, for the range check to refuse."""
    if isinstance(value, str) and value.strip().endswith("%"):
        number = number_from_text(value.strip()[:-1])
        return number / 100.0 if isinstance(number, (int, float)) and not isinstance(number, bool) else value
    return number_from_text(value)


def whole_number(value: Any, field: str, lo: int | None = None, hi: int | None = None, why: str = "") -> int:
    """``value`` as an int if it is a whole number (an int, or a float like 20.0; never 20.7 or True) in [lo, hi]."""
    if _is_whole(value):
        number = int(value)
        if (lo is None or number >= lo) and (hi is None or number <= hi):
            return number
    raise ValueError(f"{field} must be a whole number{_bounds(lo, hi)}{why}, got {shown(value)}.")


def real_number(value: Any, field: str, lo: float | None = None, hi: float | None = None, *,
                lo_open: bool = False, hi_open: bool = False, why: str = "") -> float:
    """``value`` as a float if it is a finite number (not a bool, not text) in the given range."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if (math.isfinite(number)
                and (lo is None or (number > lo if lo_open else number >= lo))
                and (hi is None or (number < hi if hi_open else number <= hi))):
            return number
    raise ValueError(
        f"{field} must be a finite number{_bounds(lo, hi, lo_open, hi_open)}{why}, got {shown(value)}.")


def check_noise_level(value: Any, num_train_timesteps: int, field: str = "the noise level") -> int:
    """The noise level D of a run: a whole number from 1 to T - 1 (T: the model's training timesteps)."""
    return whole_number(value, field, 1, int(num_train_timesteps) - 1,
                        why=f" (the model's noise schedule has {int(num_train_timesteps)} timesteps)")


def check_guidance_scale(value: Any, field: str = "the guidance scale") -> float:
    """The guidance scale w: a finite number >= 0 (0 = no guidance)."""
    return real_number(value, field, 0.0)


def check_min_size_ml(value: Any, field: str = "the minimum lesion size (ml)") -> float:
    """The smallest lesion candidate kept, in ml: a finite number >= 0."""
    return real_number(value, field, 0.0)


#: Largest organ margin (mm) a card or a user may ask for: beyond it a margin swallows the body.
MAX_MARGIN_MM = 100.0

def check_margin_mm(value: Any, field: str = "the ROI margin (mm)") -> float:
    """An organ ROI margin in millimetres: a finite number from 0 to :data:`MAX_MARGIN_MM`."""
    return real_number(value, field, 0.0, MAX_MARGIN_MM)


def organ_list(value: Any, field: str = "the organs") -> list[str]:
    """Organ names and groups as a list of texts (comma-separated text or a JSON list; "none" or "" is empty).

    Only the form is checked here; the names are checked against TotalSegmentator's class map where a
    segmentation is read (:func:`.roi.organ_names`), which this standard-library module cannot import.
    """
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) and v.isprintable() for v in items):
        raise ValueError(f"{field} must be organ names or groups (comma-separated text or a list of texts), "
                         f"got {shown(value)}.")
    names = [v.strip() for v in items if v.strip()]
    return [] if [n.lower() for n in names] in ([], ["none"]) else names


#: the largest noise seed (what ``torch.Generator.manual_seed`` and NumPy both accept)
MAX_SEED = 2**32 - 1


def check_tau(value: Any, field: str = "tau") -> float:
    """CDM's embedding weight tau: strictly between 0 and 1 (at 1 the finite difference divides by zero)."""
    return real_number(value, field, 0.0, 1.0, lo_open=True, hi_open=True,
                       why=" (the weight of the unhealthy class embedding in the second trajectory)")


def check_seed(value: Any, field: str = "the seed") -> int:
    """A noise seed: a whole number from 0 to :data:`MAX_SEED`."""
    return whole_number(value, field, 0, MAX_SEED)


def check_cdm_steps(value: Any, noise_level: int, field: str = "the number of CDM steps") -> int:
    """CDM's R: a whole number from 1 to the noise level Q (the R unit DDIM steps go down from Q)."""
    return whole_number(value, field, 1, int(noise_level), why=f" (at most the noise level {int(noise_level)})")


def check_threshold(method: Any, value: Any, method_field: str = "the threshold method",
                    value_field: str = "the threshold value") -> float | None:
    """The threshold rule's value (None for Otsu, which has none), after checking method and value.

    "fraction": a fraction of the map's maximum in (0, 1]; "absolute": a value > 0 in the map's units
    (the heat map is >= 0 everywhere, so 0 or less would make the whole volume a lesion); "otsu": no value.
    """
    if not isinstance(method, str) or method not in THRESHOLD_METHODS:
        raise ValueError(f"{method_field} must be one of {', '.join(THRESHOLD_METHODS)}, got {shown(method)}.")
    if method == "otsu":
        return None
    if method == "fraction":
        return real_number(value, value_field, 0.0, 1.0, lo_open=True,
                           why=" for the 'fraction' method (a fraction of the map's maximum: 0.5 or '50%' for 50 %)")
    return real_number(value, value_field, 0.0, lo_open=True, why=" for the 'absolute' method (in the map's units)")


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
            raise ValueError(f"steps must be a whole number >= 1 or '{REFERENCE_STEPS}', got {shown(value)}.") from None
    if not _is_whole(value):
        raise ValueError(f"steps must be a whole number >= 1 or '{REFERENCE_STEPS}', got {shown(value)}.")
    if int(value) < 1:
        raise ValueError(f"steps must be >= 1 (or '{REFERENCE_STEPS}' for the stride-1 reference loop), got {value}.")
    return int(value)


def check_steps(value: Any, num_train_timesteps: int, field: str = "steps") -> Steps:
    """DDIM steps as :func:`parse_steps` reads them, at most T - 1 (a grid never has more moves than timesteps).

    More steps than the noise level are allowed: the grid's duplicate points are removed (K <= D,
    ``diffusion.timestep_grid``), as documented for the steps parameter.
    """
    steps = parse_steps(value)
    if steps is None:
        raise ValueError(f"{field} must be given: {STEPS_HELP}.")
    if steps != REFERENCE_STEPS:
        whole_number(steps, field, 1, num_train_timesteps - 1,
                     why=f" (the model's noise schedule has {num_train_timesteps} timesteps) or '{REFERENCE_STEPS}'")
    return steps


# ---- the card's schema ---------------------------------------------------------------------------
#: the entries every card has; the last six are JSON objects (sections)
_REQUIRED = ("format", "format_version", "id", "method", "modality", "network", "scheduler", "preprocessing", "labels",
             "inference_defaults", "provenance")
_SECTIONS = _REQUIRED[5:]

#: DiffusionModelUNet arguments a card may set (anything else is refused, so a typo is not ignored).
UNET_ARGS = frozenset({
    "spatial_dims", "in_channels", "out_channels", "num_res_blocks", "channels", "attention_levels",
    "norm_num_groups", "norm_eps", "resblock_updown", "num_head_channels", "with_conditioning",
    "transformer_num_layers", "cross_attention_dim", "num_class_embeds", "upcast_attention",
    "dropout_cattn", "include_fc", "use_combined_linear",
})
#: the UNet arguments every card states (the card is the only source of the architecture)
UNET_REQUIRED = ("spatial_dims", "in_channels", "out_channels", "channels", "attention_levels", "num_res_blocks",
                 "norm_num_groups", "num_head_channels", "with_conditioning")
#: DiffusionModelEncoder arguments a classifier card may set: the UNet's, without class conditioning (the
#: classifier sees only x_t and t) and without input_shape (that is preprocessing.in_plane_size)
ENCODER_ARGS = UNET_ARGS - {"with_conditioning", "cross_attention_dim", "num_class_embeds", "dropout_cattn"}
ENCODER_REQUIRED = ("spatial_dims", "in_channels", "out_channels", "channels", "attention_levels", "num_res_blocks",
                    "norm_num_groups", "num_head_channels")
#: methods whose network sees 2D axial slices of one channel
SLICE_METHODS = ("igconda", "classifier_guided", "cdm", "classifier")
SCHEDULER_KEYS = ("num_train_timesteps", "schedule", "beta_start", "beta_end")
#: provenance entries holding a [start, stop) range of phantom seeds (evaluation refuses overlaps)
SEED_RANGE_KEYS = ("train_seeds", "val_seeds", "tuning_seeds", "threshold_tuning_seeds")

#: sane bounds: far beyond any published model, small enough that a typo cannot become hours or an allocation failure
MAX_TIMESTEPS = 100_000
MAX_LEVELS = 6
MAX_CHANNELS = 2048
MAX_RES_BLOCKS = 16
MAX_CLASSES = 1000
MAX_EMBEDDING_DIM = 4096
MAX_IN_PLANE = 1024
SPACING_RANGE_MM = (0.1, 100.0)
MAX_BATCH_SIZE = 4096
MAX_ID_LENGTH = 200
MAX_ACCURACY_BANDS = 100
#: the classes a classifier card names (its logits, in the order of their numbers)
CLASSIFIER_LABELS = ("healthy", "unhealthy")
#: bound of intensity.scale and |intensity.offset| (input units: SUV, HU or Bq/ml)
INTENSITY_LIMIT = 1e7

_CARD = "the model card's "


def _entry(section: dict[str, Any], key: str, path: str) -> Any:
    if key not in section:
        raise ValueError(f"{_CARD}{path.rpartition('.')[0]} section has no '{key}' entry.")
    return section[key]


def _object(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{_CARD}{path} must be a JSON object, got {shown(value)}.")
    return value


def _flag(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{_CARD}{path} must be true or false, got {shown(value)}.")
    return value


def _whole_list(value: Any, path: str, length: int | None, lo: int, hi: int, what: str) -> list[int]:
    """A list of whole numbers in [lo, hi] (``length`` of them, or 1..MAX_LEVELS when None)."""
    n_ok = isinstance(value, list) and (len(value) == length if length is not None else 1 <= len(value) <= MAX_LEVELS)
    if n_ok and all(_is_whole(v) and lo <= int(v) <= hi for v in value):
        return [int(v) for v in value]
    count = f"{length}" if length is not None else f"1 to {MAX_LEVELS}"
    raise ValueError(f"{_CARD}{path} must be a list of {count} whole numbers from {lo} to {hi}{what}, "
                     f"got {shown(value)}.")


def _per_level(value: Any, path: str, levels: int, lo: int, hi: int) -> int | list[int]:
    """One whole number for every level, or a list with one per level."""
    if isinstance(value, list):
        return _whole_list(value, path, levels, lo, hi, " (one per level of network.unet.channels)")
    if _is_whole(value) and lo <= int(value) <= hi:
        return int(value)
    raise ValueError(f"{_CARD}{path} must be a whole number from {lo} to {hi} or a list of {levels} of them "
                     f"(one per level), got {shown(value)}.")


def _check_id(card: dict[str, Any]) -> None:
    value = card["id"]
    if (not isinstance(value, str) or not value.strip() or len(value) > MAX_ID_LENGTH
            or any(not ch.isprintable() for ch in value)):
        raise ValueError(f"{_CARD}id must be a non-empty text of at most {MAX_ID_LENGTH} printable characters "
                         f"on one line, got {shown(value)}.")


def _check_backbone(args: dict[str, Any], path: str, method: str, allowed: frozenset[str],
                    required: tuple[str, ...], what: str) -> list[int]:
    """The arguments a DiffusionModelUNet and a DiffusionModelEncoder share; returns the channels per level."""
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise ValueError(f"{_CARD}{path} must hold only {what} arguments "
                         f"({', '.join(sorted(allowed))}), got unknown {', '.join(unknown)}.")
    for key in required:
        _entry(args, key, f"{path}.{key}")
    dims = (2,) if method in SLICE_METHODS else (2, 3)
    if not _is_whole(args["spatial_dims"]) or int(args["spatial_dims"]) not in dims:
        raise ValueError(f"{_CARD}{path}.spatial_dims must be {' or '.join(map(str, dims))} for the "
                         f"{method} method, got {shown(args['spatial_dims'])}.")
    args["spatial_dims"] = int(args["spatial_dims"])
    channels = _whole_list(args["channels"], f"{path}.channels", None, 1, MAX_CHANNELS, "")
    args["channels"] = channels
    levels = len(channels)
    attention = args["attention_levels"]
    if not isinstance(attention, list) or len(attention) != levels or not all(isinstance(a, bool) for a in attention):
        raise ValueError(f"{_CARD}{path}.attention_levels must be a list of {levels} true/false values "
                         f"(one per level of {path}.channels), got {shown(attention)}.")
    args["num_res_blocks"] = _per_level(args["num_res_blocks"], f"{path}.num_res_blocks", levels, 1, MAX_RES_BLOCKS)
    groups = whole_number(args["norm_num_groups"], f"{_CARD}{path}.norm_num_groups", 1, MAX_CHANNELS)
    if any(c % groups for c in channels):
        raise ValueError(f"{_CARD}{path}.norm_num_groups must divide every entry of {path}.channels "
                         f"({shown(channels)}), got {groups}.")
    args["norm_num_groups"] = groups
    args["num_head_channels"] = _per_level(args["num_head_channels"], f"{path}.num_head_channels", levels, 1,
                                           MAX_CHANNELS)
    if "norm_eps" in args:
        real_number(args["norm_eps"], f"{_CARD}{path}.norm_eps", 0.0, 1.0, lo_open=True, hi_open=True)
    if "transformer_num_layers" in args:
        args["transformer_num_layers"] = whole_number(args["transformer_num_layers"],
                                                      f"{_CARD}{path}.transformer_num_layers", 1, MAX_RES_BLOCKS)
    for key in ("resblock_updown", "upcast_attention", "include_fc", "use_combined_linear"):
        if key in args:
            _flag(args[key], f"{path}.{key}")
    return channels


def _check_heads(args: dict[str, Any], path: str, levels_with_attention: list[bool]) -> None:
    """Attention heads never wider than their level."""
    heads = args["num_head_channels"]
    per_level = heads if isinstance(heads, list) else [heads] * len(args["channels"])
    for i, (c, h) in enumerate(zip(args["channels"], per_level)):
        if levels_with_attention[i] and h > c:
            last = " and of the last level" if path == "network.unet" else ""
            raise ValueError(f"{_CARD}{path}.num_head_channels must be at most the channels of every attention "
                             f"level{last} ({c} at level {i + 1}), got {shown(heads)}.")


def _check_encoder(card: dict[str, Any]) -> list[int]:
    """The classifier's network section: ``network.encoder``; returns the channels per level."""
    net = card["network"]
    unknown = sorted(set(net) - {"encoder"})
    if unknown:
        raise ValueError(f"{_CARD}network must hold only 'encoder' for the classifier method, got "
                         f"{', '.join(unknown)}.")
    encoder = _object(_entry(net, "encoder", "network.encoder"), "network.encoder")
    if "input_shape" in encoder:
        raise ValueError(f"{_CARD}network.encoder.input_shape must be absent: the slice size is "
                         "preprocessing.in_plane_size, got " f"{shown(encoder['input_shape'])}.")
    channels = _check_backbone(encoder, "network.encoder", card["method"], ENCODER_ARGS, ENCODER_REQUIRED,
                               "DiffusionModelEncoder")
    encoder["in_channels"] = whole_number(encoder["in_channels"], f"{_CARD}network.encoder.in_channels", 1, 1,
                                          why=" (the classifier sees single-channel slices)")
    encoder["out_channels"] = whole_number(encoder["out_channels"], f"{_CARD}network.encoder.out_channels", 2,
                                           MAX_CLASSES, why=" (one logit per class of labels)")
    _check_heads(encoder, "network.encoder", encoder["attention_levels"])
    return channels


def _check_network(card: dict[str, Any]) -> tuple[list[int], dict[str, Any] | None]:
    """The network section; returns (channels per level, class embedding or None)."""
    net = card["network"]
    method = card["method"]
    if method == "classifier":
        return _check_encoder(card), None
    unet = _object(_entry(net, "unet", "network.unet"), "network.unet")
    channels = _check_backbone(unet, "network.unet", method, UNET_ARGS, UNET_REQUIRED, "DiffusionModelUNet")
    for key in ("in_channels", "out_channels"):
        if method == "igconda":
            unet[key] = whole_number(unet[key], f"{_CARD}network.unet.{key}", 1, 1,
                                     why=" (IgCONDA works on single-channel slices)")
        else:
            unet[key] = whole_number(unet[key], f"{_CARD}network.unet.{key}", 1, 16)
    levels = len(channels)
    # the middle block always has attention, at the last level's width
    _check_heads(unet, "network.unet", [a or i == levels - 1 for i, a in enumerate(unet["attention_levels"])])
    if "dropout_cattn" in unet:
        real_number(unet["dropout_cattn"], f"{_CARD}network.unet.dropout_cattn", 0.0, 1.0)
    if unet.get("num_class_embeds") is not None:
        unet["num_class_embeds"] = whole_number(unet["num_class_embeds"], f"{_CARD}network.unet.num_class_embeds",
                                                1, MAX_CLASSES)
    conditioned = _flag(unet["with_conditioning"], "network.unet.with_conditioning")

    embedding = net.get("class_embedding")
    if method in ("igconda", "cdm") and not embedding:
        raise ValueError(f"{_CARD}network.class_embedding is missing: a {method} model conditions the network on "
                         "classes through it.")
    if embedding is not None:
        embedding = _object(embedding, "network.class_embedding")
        embedding["num_classes"] = whole_number(_entry(embedding, "num_classes", "network.class_embedding.num_classes"),
                                                f"{_CARD}network.class_embedding.num_classes", 1, MAX_CLASSES)
        embedding["dim"] = whole_number(_entry(embedding, "dim", "network.class_embedding.dim"),
                                        f"{_CARD}network.class_embedding.dim", 1, MAX_EMBEDDING_DIM)
        if not conditioned:
            raise ValueError(f"{_CARD}network.unet.with_conditioning must be true when network.class_embedding is "
                             "given (the class embedding is the cross-attention context), got false.")
    elif conditioned:
        raise ValueError(f"{_CARD}network.class_embedding is missing: network.unet.with_conditioning is true, and the "
                         "class embedding provides its cross-attention context.")
    cross = unet.get("cross_attention_dim")
    if conditioned:
        if not _is_whole(cross) or int(cross) != embedding["dim"]:
            raise ValueError(f"{_CARD}network.unet.cross_attention_dim must equal network.class_embedding.dim "
                             f"({embedding['dim']}), got {shown(cross)}.")
        unet["cross_attention_dim"] = int(cross)
    elif cross is not None:
        raise ValueError(f"{_CARD}network.unet.cross_attention_dim must be absent or null when "
                         f"network.unet.with_conditioning is false, got {shown(cross)}.")
    return channels, embedding


def _check_scheduler(sched: dict[str, Any]) -> int:
    """The scheduler section; returns the number of training timesteps T."""
    unknown = sorted(set(sched) - set(SCHEDULER_KEYS))
    if unknown:
        raise ValueError(f"{_CARD}scheduler must hold only {', '.join(SCHEDULER_KEYS)}, got unknown "
                         f"{', '.join(unknown)}.")
    steps = whole_number(_entry(sched, "num_train_timesteps", "scheduler.num_train_timesteps"),
                         f"{_CARD}scheduler.num_train_timesteps", 2, MAX_TIMESTEPS)
    sched["num_train_timesteps"] = steps
    schedule = _entry(sched, "schedule", "scheduler.schedule")
    if not isinstance(schedule, str) or schedule not in KNOWN_SCHEDULES:
        raise ValueError(f"{_CARD}scheduler.schedule must be one of {', '.join(KNOWN_SCHEDULES)}, "
                         f"got {shown(schedule)}.")
    given = [key for key in ("beta_start", "beta_end") if key in sched]
    if schedule == "cosine":
        if given:
            raise ValueError(f"{_CARD}scheduler.{given[0]} must be absent for the 'cosine' schedule (it has no beta "
                             f"range), got {shown(sched[given[0]])}.")
        return steps
    if len(given) == 1:
        missing = "beta_end" if given == ["beta_start"] else "beta_start"
        raise ValueError(f"{_CARD}scheduler section has no '{missing}' entry (give both beta_start and beta_end, "
                         "or neither for the defaults).")
    if given:
        start = real_number(sched["beta_start"], f"{_CARD}scheduler.beta_start", 0.0, 1.0, lo_open=True, hi_open=True)
        real_number(sched["beta_end"], f"{_CARD}scheduler.beta_end", start, 1.0, lo_open=True, hi_open=True,
                    why=" (above scheduler.beta_start)")
    return steps


def _check_preprocessing(prep: dict[str, Any], levels: int) -> None:
    lo, hi = SPACING_RANGE_MM
    spacing = _entry(prep, "spacing_mm", "preprocessing.spacing_mm")
    if not (isinstance(spacing, list) and len(spacing) == 3 and all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v)) and lo <= float(v) <= hi
            for v in spacing)):
        raise ValueError(f"{_CARD}preprocessing.spacing_mm must be a list of 3 finite numbers of millimetres from "
                         f"{lo:g} to {hi:g}, got {shown(spacing)}.")
    size = _whole_list(_entry(prep, "in_plane_size", "preprocessing.in_plane_size"), "preprocessing.in_plane_size",
                       2, 1, MAX_IN_PLANE, "")
    # each level but the last halves a slice; the lowest level needs at least 2 x 2 pixels
    step, smallest = 2 ** (levels - 1), 2 ** levels
    if any(s % step or s < smallest for s in size):
        raise ValueError(f"{_CARD}preprocessing.in_plane_size must be two multiples of {step} of at least {smallest} "
                         f"(the network halves a slice {levels - 1} times), got {shown(prep['in_plane_size'])}.")
    prep["in_plane_size"] = size
    intensity = _object(_entry(prep, "intensity", "preprocessing.intensity"), "preprocessing.intensity")
    real_number(_entry(intensity, "scale", "preprocessing.intensity.scale"), f"{_CARD}preprocessing.intensity.scale",
                0.0, INTENSITY_LIMIT, lo_open=True, why=" (input units per model unit)")
    if "offset" in intensity:
        real_number(intensity["offset"], f"{_CARD}preprocessing.intensity.offset", -INTENSITY_LIMIT, INTENSITY_LIMIT,
                    why=" (in input units)")
    clip = intensity.get("clip")
    if clip is not None:
        ends_ok = isinstance(clip, list) and len(clip) == 2 and all(
            v is None or (isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v)))
            for v in clip)
        if not ends_ok or (clip[0] is not None and clip[1] is not None and not clip[0] < clip[1]):
            raise ValueError(f"{_CARD}preprocessing.intensity.clip must be null or a [low, high] pair of finite "
                             f"numbers (or null for no bound) with low < high, got {shown(clip)}.")
    if "input_units" in intensity and not isinstance(intensity["input_units"], str):
        raise ValueError(f"{_CARD}preprocessing.intensity.input_units must be a text, "
                         f"got {shown(intensity['input_units'])}.")
    for key, allowed in (("orientation", "LPS"), ("slice_axis", "S")):
        if key in prep and prep[key] != allowed:
            raise ValueError(f"{_CARD}preprocessing.{key} must be \"{allowed}\" (the only model grid this version "
                             f"builds), got {shown(prep[key])}.")
    if "antialias" in prep:
        _flag(prep["antialias"], "preprocessing.antialias")
    if "crop" in prep:
        crop = _object(prep["crop"], "preprocessing.crop")
        organs = organ_list(_entry(crop, "organs", "preprocessing.crop.organs"), f"{_CARD}preprocessing.crop.organs")
        if not organs:
            raise ValueError(f"{_CARD}preprocessing.crop.organs must name the organs the model was trained on "
                             "(TotalSegmentator names, e.g. kidney_left), got none.")
        crop["organs"] = organs
        if "margin_mm" in crop:
            crop["margin_mm"] = check_margin_mm(crop["margin_mm"], f"{_CARD}preprocessing.crop.margin_mm")


def _check_labels(labels: dict[str, Any], card: dict[str, Any], embedding: dict[str, Any] | None) -> None:
    method = card["method"]
    top = embedding["num_classes"] - 1 if embedding else MAX_CLASSES
    why = " (inside network.class_embedding.num_classes)" if embedding else ""
    if method == "classifier":
        classes = card["network"]["encoder"]["out_channels"]
        top, why = classes - 1, f" (one of the network.encoder.out_channels = {classes} logits)"
    for name, value in labels.items():
        if not name.strip() or len(name) > 40 or not name.isprintable():
            raise ValueError(f"{_CARD}labels must be named by short texts on one line, got {shown(name)}.")
        labels[name] = whole_number(value, f"{_CARD}labels.{name}", 0, top, why=why)
    if len(set(labels.values())) != len(labels):
        raise ValueError(f"{_CARD}labels must give every class its own number, got {shown(labels)}.")
    if method == "igconda":
        for name in ("null", "healthy"):
            if name not in labels:
                raise ValueError(f"{_CARD}labels section has no '{name}' entry (IgCONDA conditions on the null and "
                                 "healthy classes).")
    if method == "classifier":
        for name in CLASSIFIER_LABELS:
            if name not in labels:
                raise ValueError(f"{_CARD}labels section has no '{name}' entry (the classifier tells healthy from "
                                 "unhealthy slices).")
        if len(labels) != top + 1:
            raise ValueError(f"{_CARD}labels must name each of the network.encoder.out_channels = {top + 1} logits "
                             f"once, got {shown(labels)}.")


def _check_inference_defaults(defaults: dict[str, Any], timesteps: int) -> None:
    field = f"{_CARD}inference_defaults."
    defaults["noise_level"] = check_noise_level(_entry(defaults, "noise_level", "inference_defaults.noise_level"),
                                                timesteps, field + "noise_level")
    check_guidance_scale(_entry(defaults, "guidance_scale", "inference_defaults.guidance_scale"),
                         field + "guidance_scale")
    try:  # a card from before steps had one representation stores the reference loop as null or nothing
        defaults["steps"] = check_steps(parse_steps(defaults.get("steps")) or REFERENCE_STEPS, timesteps)
    except ValueError as exc:
        raise ValueError(f"{field}{exc}") from None
    if "batch_size" in defaults:
        defaults["batch_size"] = whole_number(defaults["batch_size"], field + "batch_size", 1, MAX_BATCH_SIZE)
    if "threshold" in defaults:
        threshold = _object(defaults["threshold"], "inference_defaults.threshold")
        method = _entry(threshold, "method", "inference_defaults.threshold.method")
        value = threshold.get("value") if method == "otsu" else _entry(threshold, "value",
                                                                      "inference_defaults.threshold.value")
        check_threshold(method, value, field + "threshold.method", field + "threshold.value")
    if "min_size_ml" in defaults:
        check_min_size_ml(defaults["min_size_ml"], field + "min_size_ml")
    if "organ_exclude" in defaults:
        defaults["organ_exclude"] = organ_list(defaults["organ_exclude"], field + "organ_exclude")
    if "organ_margin_mm" in defaults:
        defaults["organ_margin_mm"] = check_margin_mm(defaults["organ_margin_mm"], field + "organ_margin_mm")


def _check_classifier_defaults(defaults: dict[str, Any]) -> None:
    """A classifier card's ``inference_defaults``: only the batch size (how it guides is the guided method's)."""
    if "batch_size" in defaults:
        defaults["batch_size"] = whole_number(defaults["batch_size"], f"{_CARD}inference_defaults.batch_size", 1,
                                              MAX_BATCH_SIZE)


def _check_accuracy_by_t(table: Any, timesteps: int) -> None:
    """``provenance.validation_accuracy_by_t``: ordered, non-overlapping [start, stop) bands inside [0, T)."""
    path = "provenance.validation_accuracy_by_t"
    if not isinstance(table, list) or not 1 <= len(table) <= MAX_ACCURACY_BANDS:
        raise ValueError(f"{_CARD}{path} must be a list of 1 to {MAX_ACCURACY_BANDS} timestep bands, "
                         f"got {shown(table)}.")
    previous_stop = 0
    for n, band in enumerate(table):
        where = f"{path}[{n}]"
        band = _object(band, where)
        unknown = sorted(set(band) - {"timesteps", "accuracy", "slices"})
        if unknown:
            raise ValueError(f"{_CARD}{where} must hold only timesteps, accuracy and slices, got unknown "
                             f"{', '.join(unknown)}.")
        rng = _entry(band, "timesteps", f"{where}.timesteps")
        if not (isinstance(rng, list) and len(rng) == 2 and all(_is_whole(v) for v in rng)
                and previous_stop <= int(rng[0]) < int(rng[1]) <= timesteps):
            raise ValueError(f"{_CARD}{where}.timesteps must be a [start, stop) pair of whole numbers with "
                             f"{previous_stop} <= start < stop <= {timesteps} (bands in order, inside the noise "
                             f"schedule), got {shown(rng)}.")
        band["timesteps"] = [int(v) for v in rng]
        previous_stop = band["timesteps"][1]
        real_number(_entry(band, "accuracy", f"{where}.accuracy"), f"{_CARD}{where}.accuracy", 0.0, 1.0)
        band["slices"] = whole_number(_entry(band, "slices", f"{where}.slices"), f"{_CARD}{where}.slices", 1)


def _check_provenance(prov: dict[str, Any], timesteps: int) -> None:
    if "validation_accuracy_by_t" in prov:
        _check_accuracy_by_t(prov["validation_accuracy_by_t"], timesteps)
    for key in SEED_RANGE_KEYS:
        rng = prov.get(key)
        if rng is None:
            continue
        if not (isinstance(rng, list) and len(rng) == 2 and all(_is_whole(v) for v in rng)
                and 0 <= int(rng[0]) < int(rng[1])):
            raise ValueError(f"{_CARD}provenance.{key} must be a [start, stop) pair of whole numbers with "
                             f"0 <= start < stop, got {shown(rng)}.")
        prov[key] = [int(v) for v in rng]


def _validate(card: Any) -> None:
    if not isinstance(card, dict):
        raise ValueError("the model card is not a JSON object.")
    for key in _REQUIRED:
        if key not in card:
            raise ValueError(f"the model card has no '{key}' entry.")
    if card["format"] != FORMAT:
        raise ValueError(f"not a DiffusionAnomaly model card (format {shown(card['format'])}).")
    version = whole_number(card["format_version"], f"{_CARD}format_version", 1)
    if version > FORMAT_VERSION:
        raise ValueError(
            f"checkpoint format version {version} is newer than this software "
            f"understands ({FORMAT_VERSION}); update DiffusionAnomaly."
        )
    _check_id(card)
    if card["method"] not in METHODS:
        raise ValueError(f"{_CARD}method must be one of {', '.join(METHODS)}, got {shown(card['method'])}.")
    if card["modality"] not in MODALITIES:
        raise ValueError(f"{_CARD}modality must be one of {', '.join(MODALITIES)}, got {shown(card['modality'])}.")
    for key in _SECTIONS:
        _object(card[key], key)
    if "name" in card and not isinstance(card["name"], str):
        raise ValueError(f"{_CARD}name must be a text, got {shown(card['name'])}.")
    if "not_for_clinical_use" in card:
        _flag(card["not_for_clinical_use"], "not_for_clinical_use")
    channels, embedding = _check_network(card)
    timesteps = _check_scheduler(card["scheduler"])
    _check_preprocessing(card["preprocessing"], len(channels))
    _check_labels(card["labels"], card, embedding)
    if card["method"] == "classifier":
        _check_classifier_defaults(card["inference_defaults"])
    else:
        _check_inference_defaults(card["inference_defaults"], timesteps)
    _check_provenance(card["provenance"], timesteps)


def validate_card(card: Any) -> dict[str, Any]:
    """Check the card field by field (types, ranges, agreement between sections); return it.

    A problem raises CheckpointError with one sentence naming the field: "the model card's
    <section.field> must be <rule>, got <value>.". The card is normalised in place: whole numbers
    written as floats (1000.0) become ints, and ``inference_defaults.steps`` is an int or
    :data:`REFERENCE_STEPS` (a card written before ``steps`` had one representation stores the
    reference loop as a missing or null ``steps``).
    """
    try:
        _validate(card)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
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


#: The demo CT model's design: organ crops of 64 x 64 pixels of 1.5 mm (96 mm, a kidney's cross-section with
#: margin) on 3 mm slices, placed around the organs grown by 10 mm (training frames them so; the card's organ margin
#: default is the same), HU in an abdominal window of -160 to 240 HU (level 40, width 400) as model units 0..1.
CT_DESIGN = {"spacing_mm": (1.5, 1.5, 3.0), "in_plane_size": (64, 64),
             "intensity": {"input_units": "HU", "offset": -160.0, "scale": 400.0, "clip": [0.0, 1.0]},
             "crop": {"organs": ["kidney_left", "kidney_right", "pancreas"], "margin_mm": 10.0}}


def ct_card(**design: Any) -> dict[str, Any]:
    """Model card of the demo CT organ model: the conditional network of :func:`default_card` on organ crops
    (:data:`CT_DESIGN`), run by classifier-guided DDIM by default (METHODS.md section 2, the pancreas paper)."""
    crop = {"organs": list(CT_DESIGN["crop"]["organs"]), "margin_mm": CT_DESIGN["crop"]["margin_mm"]}
    card = default_card(**{k: v for k, v in design.items() if k in ("channels", "attention_levels")},
                        spacing_mm=CT_DESIGN["spacing_mm"], in_plane_size=CT_DESIGN["in_plane_size"])
    card.update(id="cg-ct-organs-demo", name="Classifier-guided CT organ model (kidneys, pancreas; synthetic phantoms)",
                modality="CT")
    card["preprocessing"]["intensity"] = dict(CT_DESIGN["intensity"])
    card["preprocessing"]["crop"] = crop
    # METHODS.md section 4 post-processing: Otsu per case (interactive use), opening then closing and hole filling,
    # components of at least 0.05 ml (a 4.6 mm sphere; the smallest lesion drawn is 5 mm) and 3 mm in-plane
    card["inference_defaults"].update(method="cg-ddim", organ_margin_mm=crop["margin_mm"], min_size_ml=0.05,
                                      threshold={"method": "otsu", "opening": True, "min_inplane_mm": 3.0})
    return card


def classifier_card(diffusion: dict[str, Any] | None = None, **design: Any) -> dict[str, Any]:
    """Model card of a demo noise-conditioned classifier (provenance is filled in by training) for the diffusion
    model card ``diffusion`` (default: :func:`default_card` of ``design``).

    Its scheduler, preprocessing and modality are that card's, and its encoder has the UNet's channels,
    attention, blocks and normalisation: the classifier guides that diffusion model, so it must see the
    same model-space slices and noise schedule.
    """
    card = copy.deepcopy(diffusion) if diffusion is not None else default_card(**design)
    unet = card["network"]["unet"]
    shared = ("spatial_dims", "in_channels", "channels", "attention_levels", "num_res_blocks", "num_head_channels",
              "norm_num_groups")
    ct = card.get("modality") == "CT"
    card.update(
        id="classifier-ct-organs-demo" if ct else "classifier-pet-phantom-demo",
        name=("Noise-conditioned healthy/unhealthy classifier of CT organ crops (synthetic phantoms)" if ct else
              "Noise-conditioned healthy/unhealthy classifier (synthetic phantoms)"),
        method="classifier",
        network={"encoder": {**{key: unet[key] for key in shared}, "out_channels": len(CLASSIFIER_LABELS)}},
        labels={name: n for n, name in enumerate(CLASSIFIER_LABELS)},
        inference_defaults={"batch_size": 32},
        provenance={},
    )
    return card


def _method_words(card: dict[str, Any]) -> str:
    """The card's method as a reader says it; a card that runs another method by default (the CT organ model:
    classifier-guided DDIM on a conditional network) names both."""
    network = METHOD_TITLES.get(card.get("method"), str(card.get("method", "?")))
    default = (card.get("inference_defaults", {}) or {}).get("method")
    return network if not default or default == card.get("method") else f"{default} by default (network: {network})"


def card_items(card: dict[str, Any]) -> list[tuple[str, str]]:
    """What a user is shown about a model, as (label, text) pairs: reports and the Slicer panel."""
    prov = card.get("provenance", {}) or {}
    modality = card.get("modality", "?")
    items = [("Model", str(card.get("id", "?"))),
             ("Method", _method_words(card)),
             ("Modality", MODALITY_NAMES.get(modality, str(modality))),
             ("Training data", prov.get("training_data") or "not stated in the model card")]
    if prov.get("validation_data"):
        items.append(("Validation data", str(prov["validation_data"])))
    if prov.get("validation_metrics"):
        items.append(("Validation metrics", ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                      for k, v in prov["validation_metrics"].items())))
    if prov.get("validation_accuracy_by_t"):
        items.append(("Validation accuracy by timestep", ", ".join(
            f"t {band['timesteps'][0]}-{band['timesteps'][1] - 1}: {band['accuracy']:.0%}"
            for band in prov["validation_accuracy_by_t"])))
    evaluation = prov.get("evaluation") or {}
    if evaluation.get("measured"):
        items.append(("Measured performance", str(evaluation["measured"])))
    if evaluation.get("limits"):
        items.append(("Limits", str(evaluation["limits"])))
    if evaluation.get("command"):
        items.append(("Measured with", str(evaluation["command"])))
    if prov.get("note"):
        items.append(("Note", str(prov["note"])))
    flagged = card.get("not_for_clinical_use", True)
    items.append(("Not for clinical use", "yes" if flagged else "not flagged by the card"))
    return items


def card_summary(card: dict[str, Any]) -> str:
    """:func:`card_items` as plain text lines ``Label: text`` (the Slicer panel's model summary)."""
    return "\n".join(f"{label}: {text}" for label, text in card_items(card))
