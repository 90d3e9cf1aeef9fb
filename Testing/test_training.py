"""Training: a tiny run writes its checkpoint and resumable state atomically, and resumes without unpickling."""

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors import safe_open

from DiffusionAnomalyLib import training
from DiffusionAnomalyLib.card import default_card
from DiffusionAnomalyLib.files import OutputError
from DiffusionAnomalyLib.training import TrainConfig, train


@pytest.fixture()
def tiny_setup(tmp_path):
    card = default_card(channels=(8, 16, 16), in_plane_size=(16, 16))
    card["network"]["unet"]["norm_num_groups"] = 8
    card["network"]["unet"]["num_head_channels"] = 8
    g = np.random.default_rng(0)
    xs = g.random((16, 16, 16)).astype(np.float16)
    ys = np.array([1, 2] * 8, dtype=np.uint8)
    data = ((xs, ys), (xs[:6], ys[:6]))
    return card, data, tmp_path / "run"


def _cfg(out, steps, resume=True):
    return TrainConfig(out=out, steps=steps, batch_size=4, val_every=2, device="cpu", workers=1, resume=resume)


def test_train_resume_and_state_never_unpickles(tiny_setup, monkeypatch):
    card, data, out = tiny_setup
    logs = []
    best = train(_cfg(out, 2), card, data=data, log=logs.append)
    assert best == out / "best.safetensors" and best.is_file()
    state = out / "state.safetensors"
    with safe_open(str(state), framework="pt") as f:
        meta = json.loads(f.metadata()["state"])
    assert meta["step"] == 2 and [h["step"] for h in meta["history"]] == [2]
    assert sorted(p.name for p in out.iterdir()) == ["best.safetensors", "history.json", "state.safetensors"]

    def no_unpickling(*args, **kwargs):
        raise AssertionError("resuming must not unpickle anything")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    logs.clear()
    train(_cfg(out, 4), card, data=data, log=logs.append)
    assert any(m.startswith("resumed from step 2") for m in logs)
    history = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in history] == [2, 4]
    with safe_open(str(state), framework="pt") as f:
        assert json.loads(f.metadata()["state"])["step"] == 4
    assert not [p for p in out.iterdir() if "partial" in p.name]


def test_failed_state_write_keeps_the_previous_state(tiny_setup, monkeypatch):
    card, data, out = tiny_setup
    train(_cfg(out, 2), card, data=data, log=lambda m: None)
    state = out / "state.safetensors"
    before = state.read_bytes()

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(training, "save_file", disk_full)
    model = training.build_model(card)
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(OutputError, match="state.safetensors"):
        training._save_state(state, model, opt, 9, np.random.default_rng(0), {})
    assert state.read_bytes() == before
    assert not [p for p in out.iterdir() if "partial" in p.name]


def test_healthy_only_training_draws_healthy_slices_and_says_so(tiny_setup, monkeypatch):
    """``healthy_only``: every diffusion batch holds healthy slices only, and the card records it."""
    card, data, out = tiny_setup
    drawn = []
    real = training._augmented

    def spy(idx, train_x, aug, device):
        drawn.extend(int(i) for i in idx)
        return real(idx, train_x, aug, device)

    monkeypatch.setattr(training, "_augmented", spy)
    cfg = _cfg(out, 2)
    cfg.healthy_only = True
    best = train(cfg, card, data=data)
    labels = data[0][1]
    assert drawn and set(labels[drawn]) == {training.HEALTHY}
    from DiffusionAnomalyLib.checkpoint import read_card

    assert read_card(best)["provenance"]["training_slices"] == "healthy slices only"


def test_healthy_only_is_refused_for_the_classifier(tmp_path, capsys):
    from DiffusionAnomalyLib import cli

    assert cli.main(["train", "--method", "classifier", "--healthy-only", "--out", str(tmp_path / "c")]) == 2
    assert "--healthy-only" in capsys.readouterr().err and not (tmp_path / "c").exists()
