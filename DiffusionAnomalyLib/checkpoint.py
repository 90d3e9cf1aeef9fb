"""Checkpoints: one ``.safetensors`` file per model, weights plus the JSON model card.

The model card lives in the safetensors header metadata (key ``model_card``), so a checkpoint
is one file, and loading it never executes code (safetensors holds only tensors and strings).
The card is the single source of truth for the architecture, noise schedule, preprocessing,
label map, modality, default inference parameters and provenance.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

from safetensors import SafetensorError, safe_open

if TYPE_CHECKING:  # torch is imported only when weights are touched: listing models stays light
    import torch

FORMAT = "diffusion-anomaly-checkpoint"
FORMAT_VERSION = 1
KNOWN_SCHEDULES = ("linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine")
METHODS = ("igconda", "classifier_guided", "cdm", "latent3d")
MODALITIES = ("PT", "CT")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says why and what to do."""


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
    """Check the card's structure; raise CheckpointError naming the first problem."""
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
    return card


def save_checkpoint(model: "torch.nn.Module", card: dict[str, Any], path: str | Path) -> Path:
    """Write weights + card to ``path`` atomically (temp file then rename)."""
    from safetensors.torch import save_file

    validate_card(card)
    path = Path(path)
    if not path.parent.is_dir():
        raise CheckpointError(f"cannot save {path.name}: the folder {path.parent} does not exist.")
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.partial")
    try:
        save_file(tensors, str(tmp), metadata={"model_card": json.dumps(card, sort_keys=True)})
        tmp.replace(path)
    except SafetensorError as exc:
        raise CheckpointError(f"cannot save the checkpoint to {path}: {exc}") from exc
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_card(path: str | Path) -> dict[str, Any]:
    """Read only the model card of a checkpoint (cheap: no weights are loaded)."""
    path = _existing(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path.name} is not a readable safetensors checkpoint ({exc}). If it is an IgCONDA-PET "
            "reference .pth file, convert it with 'diffusion-anomaly import-checkpoint'."
        ) from exc
    if "model_card" not in meta:
        raise CheckpointError(f"{path.name} holds tensors but no DiffusionAnomaly model card.")
    try:
        card = json.loads(meta["model_card"])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"the model card in {path.name} is not valid JSON ({exc}).") from exc
    try:
        return validate_card(card)
    except CheckpointError as exc:
        raise CheckpointError(f"{path.name}: {exc}") from exc


def load_weights(path: str | Path, card: dict[str, Any]) -> "torch.nn.Module":
    """Build the network the card describes and load the file's weights into it, strictly."""
    from safetensors.torch import load_file

    from .networks import build_model

    path = Path(path)
    try:
        model = build_model(card)
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"the network described by the model card in {path.name} cannot be built: {exc}") from exc
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"the weights in {path.name} cannot be read ({exc}); the file may be corrupted.") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:3]
        raise CheckpointError(
            f"the weights in {path.name} do not match the network its model card describes: {' '.join(first)}"
        ) from exc
    return model.eval()


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; give the checkpoint file (.safetensors).")
    return path


def load_checkpoint(path: str | Path, device: str = "auto", precision: str = "fp32"):
    """Load a checkpoint and return the method object its card names (e.g. an IgCONDA model).

    ``precision``: 'fp32' (default; the reference arithmetic), 'bf16' or 'auto' (bf16 on CPUs
    with native bf16, about twice as fast there); see :func:`networks.pick_precision`.

    Accepts the project's ``.safetensors`` format, and an IgCONDA-PET reference ``.pth``
    (converted in memory with weights-only unpickling; see :mod:`.reference_import`).
    """
    from .methods import method_class

    path = _existing(path)
    if path.suffix.lower() in (".pth", ".pt", ".ckpt"):
        from .reference_import import convert_reference_checkpoint

        model, card = convert_reference_checkpoint(path)
    else:
        card = read_card(path)
        model = load_weights(path, card)
    return method_class(card["method"])(model, copy.deepcopy(card), device=device, source=str(path),
                                        precision=precision)


def models_dir() -> Path:
    """Where bundled checkpoints live: $DIFFUSION_ANOMALY_MODELS, else the extension's Resources/models."""
    import os

    env = os.environ.get("DIFFUSION_ANOMALY_MODELS")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "Resources" / "models"


def bundled_models() -> list[dict[str, Any]]:
    """Entries of ``Resources/models/registry.json``: id, file, title (absolute ``path`` added)."""
    registry = models_dir() / "registry.json"
    if not registry.exists():
        return []
    entries = json.loads(registry.read_text())["models"]
    for e in entries:
        e["path"] = str(models_dir() / e["file"])
    return entries


def bundled_checkpoint(model_id: str | None = None) -> Path:
    """Path of a bundled checkpoint (the first one when ``model_id`` is None)."""
    entries = bundled_models()
    for e in entries:
        if model_id is None or e["id"] == model_id:
            path = Path(e["path"])
            if not path.exists():
                raise CheckpointError(f"bundled model {e['id']} is listed but its file {path} is missing.")
            return path
    known = ", ".join(e["id"] for e in entries) or "none"
    raise CheckpointError(f"no bundled model {model_id!r} in {models_dir()} (available: {known}).")
