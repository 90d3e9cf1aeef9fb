"""The model database: the bundled models (registry.json) and the checkpoint files a user added,
and the guidance classifier a classifier-guided method uses.

A model is chosen by id: a bundled model's id, or the path of a checkpoint file; the default is the
first bundled model for the input's modality (PET or CT), when the input states one. Added files are
remembered across sessions in a small JSON settings file. Cards are read without loading any
weights (:func:`DiffusionAnomalyLib.checkpoint.read_card`, no torch). A classifier is a checkpoint
file, or (none chosen) the bundled one that fits the model
(:func:`DiffusionAnomalyLib.checkpoint.bundled_classifier`, the worker's own choice too).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from dataclasses import dataclass
from typing import Any

from DiffusionAnomalyLib.card import ANALYSIS_METHODS, CheckpointError, check_analysis_model
from DiffusionAnomalyLib.checkpoint import (bundled_checkpoint, bundled_classifier, bundled_models, check_classifier_fits,
                                            read_card)
from DiffusionAnomalyLib.export import write_json
from DiffusionAnomalyLib.files import check_writable_dir


@dataclass(frozen=True)
class Classifier:
    """The guidance classifier of a run: its checkpoint file, its card's id, and whether it is the bundled one."""

    path: str
    id: str
    bundled: bool

    @property
    def words(self) -> str:
        """Which classifier is used, in words (the panel's classifier line, the lesion table's description)."""
        return (f"bundled classifier {self.id}" if self.bundled
                else f"classifier {self.id} ({Path(self.path).name})")

    def record(self) -> dict[str, Any]:
        """The case's classifier record (as the command line's summary.json has it)."""
        return {"id": self.id, "checkpoint": self.path}


def classifierFor(card: dict[str, Any], setting: str) -> Classifier:
    """The classifier that guides the model of ``card``: the file ``setting``, or ("") the bundled one that fits.

    A file that is missing, not a classifier, or made for another schedule, model grid or modality is
    refused in one sentence (CheckpointError), as is a model no bundled classifier fits.
    """
    if setting:
        path = str(Path(setting).expanduser().resolve())
        classifier = read_card(path)
        check_classifier_fits(card, classifier, source=f"the classifier {Path(path).name}")
    else:
        path = str(bundled_classifier(card))
        classifier = read_card(path)
    return Classifier(path, str(classifier.get("id")), bundled=not setting)


def workerClassifier(params: dict[str, str]) -> str | None:
    """The worker's ``--classifier``: the chosen file when it exists, whatever the method (so a later classifier-
    guided run needs no new worker); None: the worker takes the bundled one that fits, when a method needs one."""
    setting = params.get("Classifier", "")
    return str(Path(setting).expanduser().resolve()) if setting and Path(setting).expanduser().is_file() else None


class ModelDatabase:
    """Bundled models then remembered checkpoint files; ``settingsPath`` holds the remembered files."""

    def __init__(self, settingsPath: str | os.PathLike | None = None):
        self.settingsPath = Path(settingsPath or os.environ.get("DIFFUSION_ANOMALY_SETTINGS")
                                 or Path.home() / ".diffusion-anomaly" / "slicer-checkpoints.json")

    def userCheckpoints(self) -> list[str]:
        """The checkpoint files a user added (existing or not)."""
        try:
            return list(json.loads(self.settingsPath.read_text()).get("checkpoints", []))
        except (OSError, ValueError):
            return []

    def addUserCheckpoint(self, path: str | os.PathLike) -> dict[str, Any]:
        """Remember a checkpoint file across sessions; returns its model entry (its card is checked first)."""
        path = str(Path(path).expanduser().resolve())
        card = check_analysis_model(read_card(path), Path(path).name)  # raises CheckpointError with a sentence
        paths = [p for p in self.userCheckpoints() if p != path] + [path]
        check_writable_dir(self.settingsPath.parent)
        write_json({"checkpoints": paths}, self.settingsPath, indent=1)
        return {"id": path, "title": f"{card['id']} ({Path(path).name})", "path": path}

    def models(self) -> list[dict[str, Any]]:
        """Model entries (id, title, path): bundled models, then remembered files that still exist."""
        entries = [{"id": e["id"], "title": e.get("title", e["id"]), "path": e["path"]}
                   for e in bundled_models(ANALYSIS_METHODS)]  # a guidance classifier is no model to run
        for path in self.userCheckpoints():
            if Path(path).is_file():
                entries.append({"id": path, "title": f"{Path(path).name} (file)", "path": path})
        return entries

    def defaultModel(self, modality: str | None = None) -> str | None:
        """The id of the first bundled model for ``modality`` (the engine's
        :func:`~DiffusionAnomalyLib.checkpoint.bundled_checkpoint`), else of the first model; None when there is none."""
        entries = self.models()
        if modality is not None:
            try:
                path = str(bundled_checkpoint(modality=modality))
            except CheckpointError:  # no bundled model for it: the first model (its card says what it fits)
                path = None
            for entry in entries:
                if entry["path"] == path:
                    return entry["id"]
        return entries[0]["id"] if entries else None

    def checkpointPath(self, model: str) -> str:
        """The checkpoint file of a model id (a bundled id, a remembered file or any existing file)."""
        if not model:
            raise ValueError("choose a model (a bundled model or a checkpoint file).")
        for entry in self.models():
            if entry["id"] == model:
                return entry["path"]
        if Path(model).is_file():
            return str(Path(model).resolve())
        raise ValueError(f"the model {model!r} is neither a bundled model nor an existing checkpoint file.")

    def card(self, model: str) -> dict[str, Any]:
        """The model card of a model id (validated; no weights loaded)."""
        return read_card(self.checkpointPath(model))
