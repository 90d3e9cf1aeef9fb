"""The model database: the bundled models (registry.json) and the checkpoint files a user added.

A model is chosen by id: a bundled model's id, or the path of a checkpoint file. Added files are
remembered across sessions in a small JSON settings file. Cards are read without loading any
weights (:func:`DiffusionAnomalyLib.checkpoint.read_card`, no torch).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from DiffusionAnomalyLib.card import ANALYSIS_METHODS, check_analysis_model
from DiffusionAnomalyLib.checkpoint import bundled_models, read_card
from DiffusionAnomalyLib.export import write_json
from DiffusionAnomalyLib.files import check_writable_dir


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

    def defaultModel(self) -> str | None:
        """The id of the first model, None when there is none."""
        entries = self.models()
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
