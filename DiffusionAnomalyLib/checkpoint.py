"""Checkpoint files and the bundled-model registry, without torch.

A checkpoint is one ``.safetensors`` file: the weights plus the JSON model card (see
:mod:`.card`) in the header metadata under ``model_card``. Loading never executes code
(safetensors holds only tensors and strings). Reading a card does not load the weights, so
listing models stays cheap and torch-free (Slicer's own process does it); the weights are
loaded by :func:`.networks.load_weights`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from .card import ANALYSIS_METHODS, CheckpointError, validate_card
from .method_catalog import check_card_sections

__all__ = ["CheckpointError", "bundled_checkpoint", "bundled_classifier", "bundled_models", "check_classifier_fits",
           "existing_file", "models_dir", "read_card"]

#: the safetensors metadata key holding the model card
CARD_KEY = "model_card"


def existing_file(path: str | Path) -> Path:
    """``path`` as a Path if it is an existing file; CheckpointError saying what is wrong otherwise."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; give the checkpoint file (.safetensors).")
    return path


def read_card(path: str | Path) -> dict[str, Any]:
    """Read only the model card of a checkpoint (cheap: no weights are loaded, no torch)."""
    path = existing_file(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path.name} is not a readable safetensors checkpoint ({exc}). If it is an IgCONDA-PET "
            "reference .pth file, convert it with 'diffusion-anomaly import-checkpoint'."
        ) from exc
    if CARD_KEY not in meta:
        raise CheckpointError(f"{path.name} holds tensors but no DiffusionAnomaly model card.")
    try:
        card = json.loads(meta[CARD_KEY])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"the model card in {path.name} is not valid JSON ({exc}).") from exc
    except RecursionError:
        raise CheckpointError(f"the model card in {path.name} is nested too deeply to be a model card.") from None
    try:
        return check_card_sections(validate_card(card))
    except CheckpointError as exc:
        raise CheckpointError(f"{path.name}: {exc}") from exc


def models_dir() -> Path:
    """Where bundled checkpoints live: $DIFFUSION_ANOMALY_MODELS, else the extension's Resources/models."""
    env = os.environ.get("DIFFUSION_ANOMALY_MODELS")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "Resources" / "models"


def bundled_models(methods: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """Entries of ``Resources/models/registry.json``: id, file, title, method (absolute ``path`` added);
    only those whose method is in ``methods`` when given (e.g. :data:`.card.ANALYSIS_METHODS`: models a
    user can run on a scan, not the classifiers that guide them)."""
    registry = models_dir() / "registry.json"
    if not registry.exists():
        return []
    try:
        entries = json.loads(registry.read_text(encoding="utf-8"))["models"]
        if not isinstance(entries, list) or not all(
                isinstance(e, dict) and isinstance(e.get("id"), str) and isinstance(e.get("file"), str)
                for e in entries):
            raise ValueError("'models' must be a list of entries with an id and a file")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError) as exc:
        reason = "no 'models' list" if isinstance(exc, (KeyError, TypeError)) else str(exc).splitlines()[0]
        raise CheckpointError(f"the model registry {registry} cannot be read ({reason}); reinstall the extension or "
                              "fix the file.") from None
    for e in entries:
        e["path"] = str(models_dir() / e["file"])
    return [e for e in entries if methods is None or e.get("method", "igconda") in methods]


def bundled_checkpoint(model_id: str | None = None, modality: str | None = None) -> Path:
    """Path of a bundled checkpoint (when ``model_id`` is None, the first one that analyses scans of ``modality``,
    any modality when that is None)."""
    entries = bundled_models()
    for e in entries if model_id is not None else bundled_models(ANALYSIS_METHODS):
        if model_id is None and modality is not None and e.get("modality") != modality:
            continue
        if model_id is None or e["id"] == model_id:
            path = Path(e["path"])
            if not path.exists():
                raise CheckpointError(f"bundled model {e['id']} is listed but its file {path} is missing.")
            return path
    known = ", ".join(e["id"] for e in entries) or "none"
    raise CheckpointError(f"no bundled model {model_id!r} in {models_dir()} (available: {known}).")


#: what a classifier must share with the diffusion model it guides: it sees the same x_t of the same slices
_CLASSIFIER_SHARED = {"scheduler": "noise schedule", "preprocessing": "model grid and intensity scaling",
                      "modality": "modality"}


def check_classifier_fits(card: dict[str, Any], classifier: dict[str, Any], source: str = "the classifier") -> None:
    """Refuse a classifier that cannot guide the diffusion model of ``card``: not a classifier, no
    healthy/unhealthy labels, or another noise schedule, model grid or modality (it would judge x_t it
    was never trained on)."""
    if classifier.get("method") != "classifier":
        raise CheckpointError(f"{source} ({classifier.get('id')}) is a {classifier.get('method')} model, not a "
                              "noise-conditioned classifier; give one trained with 'diffusion-anomaly train --method "
                              "classifier'.")
    for key, words in _CLASSIFIER_SHARED.items():
        if classifier.get(key) != card.get(key):
            raise CheckpointError(f"{source} ({classifier.get('id')}) was trained with another {words} than model "
                                  f"{card.get('id')}, so it cannot guide it; train one for this model with "
                                  "'diffusion-anomaly train --method classifier'.")


def bundled_classifier(card: dict[str, Any]) -> Path:
    """The bundled noise-conditioned classifier that fits the diffusion model of ``card``
    (:func:`check_classifier_fits`); CheckpointError in one sentence when none does."""
    for entry in bundled_models(("classifier",)):
        path = Path(entry["path"])
        if not path.exists():
            continue
        try:
            check_classifier_fits(card, read_card(path))
        except CheckpointError:
            continue
        return path
    raise CheckpointError(f"no bundled classifier fits model {card.get('id')} (same noise schedule, model grid and "
                          "modality); train one with 'diffusion-anomaly train --method classifier' and give it with "
                          "--classifier.")
