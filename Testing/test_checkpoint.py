"""Checkpoints: safetensors round trip, IgCONDA-PET reference import, and every refusal.

Tiny networks only (channels 32/32/32 on 16 x 16 images): the whole file runs in seconds on CPU.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import pickle
import random
import re
import shlex
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from monai.networks.nets import DiffusionModelUNet
from safetensors import SafetensorError
from safetensors.torch import save_file

from DiffusionAnomalyLib.card import CheckpointError, default_card
from DiffusionAnomalyLib.checkpoint import read_card
from DiffusionAnomalyLib.methods import load_checkpoint
from DiffusionAnomalyLib.methods.igconda import IgcondaModel
from DiffusionAnomalyLib.networks import ConditionalDiffusionModel, build_model, save_checkpoint
from DiffusionAnomalyLib.reference_import import (
    add_import_arguments,
    convert_reference_checkpoint,
    import_checkpoint,
    run_import,
)

CHANNELS = (32, 32, 32)
ATTENTION = (False, True, True)
CF_ARGS = {"noise_level": 5, "guidance_scale": 2.0, "steps": "reference"}


# ---- helpers ---------------------------------------------------------------------------------
def tiny_card() -> dict:
    return default_card(channels=CHANNELS, attention_levels=ATTENTION)


def perturb(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial weights (MONAI zero-initialises output layers, which would make every test pass)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return module


def tiny_model(seed: int = 0) -> ConditionalDiffusionModel:
    torch.manual_seed(seed)
    return perturb(build_model(tiny_card()), seed).eval()


def images(n: int = 2, size: int = 16) -> torch.Tensor:
    gen = torch.Generator().manual_seed(123)
    return torch.rand((n, 1, size, size), generator=gen)


def reference_unet(seed: int = 1) -> DiffusionModelUNet:
    """The IgCONDA-PET reference network (trainddp.py), tiny; flash attention as in networks.build_unet."""
    torch.manual_seed(seed)
    unet = DiffusionModelUNet(
        spatial_dims=2, in_channels=1, out_channels=1, channels=CHANNELS, attention_levels=ATTENTION,
        num_res_blocks=1, num_head_channels=16, with_conditioning=True, cross_attention_dim=64,
        use_flash_attention=True,
    )
    return perturb(unet, seed).eval()


def to_old_naming(state: dict) -> OrderedDict:
    """MONAI >= 1.4 DiffusionModelUNet keys -> MONAI Generative 0.2 keys.

    The inverse of the renames in ``DiffusionModelUNet.load_old_state_dict``: spatial attention
    ``attn.to_q/k/v`` -> ``to_q/k/v`` and ``attn.out_proj`` -> ``proj_attn``; transformer
    ``out_proj`` -> ``to_out.0``; upsampler ``postconv`` -> ``conv``.
    """
    out = OrderedDict()
    for key, value in state.items():
        if "transformer_blocks" in key and ".out_proj." in key:
            key = key.replace(".out_proj.", ".to_out.0.")
        elif ".attn.out_proj." in key:
            key = key.replace(".attn.out_proj.", ".proj_attn.")
        elif re.search(r"\.attn\.to_[qkv]\.", key):
            key = key.replace(".attn.to_", ".to_")
        key = key.replace("postconv", "conv")
        out[key] = value.detach().clone()
    return out


def write_reference_pth(path: Path, unet: DiffusionModelUNet, embed: torch.nn.Embedding,
                        scheduler_state: dict | None = None) -> Path:
    """A file in the IgCONDA-PET reference format (trainddp.py's saved_dict)."""
    optimizer = torch.optim.Adam(list(unet.parameters()) + list(embed.parameters()), lr=1e-5)
    torch.save(
        {
            "model_state_dict": to_old_naming(unet.state_dict()),
            "embed_state_dict": embed.state_dict(),
            "scheduler_state_dict": OrderedDict() if scheduler_state is None else scheduler_state,
            "optimizer_state_dict": optimizer.state_dict(),
        },
        path,
    )
    return path


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One intra-op thread: tiny networks gain nothing from two, and on a busy 2-core machine the
    OpenMP hand-off between threads made these tests 50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model saved in the project format: (path, model, card)."""
    folder = tmp_path_factory.mktemp("saved")
    model, card = tiny_model(0), tiny_card()
    card["provenance"] = {"note": "test model"}
    path = save_checkpoint(model, card, folder / "tiny.safetensors")
    return path, model, card


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny reference-format .pth plus the original network it was written from."""
    folder = tmp_path_factory.mktemp("reference")
    unet = reference_unet(1)
    torch.manual_seed(2)
    embed = perturb(torch.nn.Embedding(3, 64, padding_idx=0), 2)
    path = write_reference_pth(folder / "checkpoint_ep00400.pth", unet, embed)
    return path, unet, embed


# ---- project format round trip ------------------------------------------------------------------
def test_round_trip_weights_card_and_counterfactual(saved):
    path, model, card = saved
    assert read_card(path) == card
    loaded = load_checkpoint(path, device="cpu")
    assert isinstance(loaded, IgcondaModel)
    assert loaded.card == card
    original = model.state_dict()
    state = loaded.model.state_dict()
    assert set(state) == set(original) and any(k.startswith("unet.") for k in state) and "embed.weight" in state
    for key, value in original.items():
        assert torch.equal(state[key], value), key

    x = images()
    first = load_checkpoint(path).counterfactual(x, **CF_ARGS)
    second = load_checkpoint(path).counterfactual(x, **CF_ARGS)
    assert first.shape == x.shape
    assert torch.isfinite(first).all()
    assert torch.equal(first, second)
    assert not torch.allclose(first, x)  # the network really did something
    # and the loaded weights give what the in-memory model gives
    direct = IgcondaModel(tiny_model(0), card, device="cpu").counterfactual(x, **CF_ARGS)
    assert torch.equal(first, direct)


def test_save_is_a_single_file_with_the_card_in_its_header(saved):
    path, _, card = saved
    assert files_in(path.parent) == ["tiny.safetensors"]  # no temp files left behind
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + header_len])
    assert json.loads(header["__metadata__"]["model_card"]) == card


# ---- reference import ---------------------------------------------------------------------------
def test_old_naming_helper_is_the_inverse_of_monai_load_old_state_dict(reference):
    _, unet, _ = reference
    old = to_old_naming(unet.state_dict())
    assert any(".to_out.0." in k for k in old) and any("upsampler.conv.conv" in k for k in old)
    assert not set(old) <= set(unet.state_dict())
    fresh = DiffusionModelUNet(
        spatial_dims=2, in_channels=1, out_channels=1, channels=CHANNELS, attention_levels=ATTENTION,
        num_res_blocks=1, num_head_channels=16, with_conditioning=True, cross_attention_dim=64,
    )
    fresh.load_old_state_dict(dict(old))
    for key, value in unet.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_load_reference_pth_directly(reference):
    path, unet, embed = reference
    loaded = load_checkpoint(path, device="cpu")
    assert isinstance(loaded, IgcondaModel)
    for key, value in unet.state_dict().items():
        assert torch.equal(loaded.model.unet.state_dict()[key], value), key
    assert torch.equal(loaded.model.embed.weight, embed.weight)

    card = loaded.card
    unet_args = card["network"]["unet"]
    assert unet_args["channels"] == list(CHANNELS)
    assert unet_args["attention_levels"] == list(ATTENTION)
    assert unet_args["num_res_blocks"] == 1 and unet_args["num_head_channels"] == 16
    assert unet_args["cross_attention_dim"] == 64 and unet_args["with_conditioning"] is True
    assert card["network"]["class_embedding"] == {"num_classes": 3, "dim": 64}
    assert card["scheduler"] == {"num_train_timesteps": 1000, "schedule": "linear_beta",
                                 "beta_start": 1e-4, "beta_end": 0.02}
    assert card["inference_defaults"]["noise_level"] == 400
    assert card["inference_defaults"]["guidance_scale"] == 3.0
    assert card["inference_defaults"]["steps"] == "reference"
    assert card["preprocessing"]["spacing_mm"] == [6.108, 6.108, 9.0]
    assert card["preprocessing"]["in_plane_size"] == [64, 64]
    assert card["modality"] == "PT" and card["method"] == "igconda"
    assert card["not_for_clinical_use"] is True
    assert "checkpoint-ep00400" in card["id"]
    prov = card["provenance"]
    assert prov["source"] == "imported from checkpoint_ep00400.pth (IgCONDA-PET reference format)"
    assert prov["source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert "maximum" in prov["note"] and "fixed" in prov["note"]  # the intensity difference is stated
    assert "Generative 0.2" in prov["weights"]


def test_import_gives_the_original_networks_counterfactual(reference, tmp_path):
    path, unet, embed = reference
    before = path.read_bytes()
    out = import_checkpoint(path, tmp_path / "imported.safetensors")
    assert out == tmp_path / "imported.safetensors"
    assert files_in(tmp_path) == ["imported.safetensors"]
    assert path.read_bytes() == before  # the source is untouched

    card = read_card(out)
    assert card["provenance"]["source"].startswith("imported from checkpoint_ep00400.pth")
    imported = load_checkpoint(out, device="cpu")
    for key, value in unet.state_dict().items():
        assert torch.equal(imported.model.unet.state_dict()[key], value), key

    x = images()
    original = IgcondaModel(ConditionalDiffusionModel(copy.deepcopy(unet), copy.deepcopy(embed)), card, device="cpu")
    expected = original.counterfactual(x, **CF_ARGS)
    got = imported.counterfactual(x, **CF_ARGS)
    assert got.shape == x.shape
    assert torch.equal(got, expected)
    assert not torch.allclose(got, x)
    assert torch.equal(load_checkpoint(path, device="cpu").counterfactual(x, **CF_ARGS), got)


def test_explicit_architecture_arguments_override_and_are_checked(reference):
    path, unet, _ = reference
    model, card = convert_reference_checkpoint(path, channels=(32, 32, 32), attention_levels=(0, 1, 1),
                                               num_res_blocks=1)
    assert card["network"]["unet"]["attention_levels"] == [False, True, True]
    assert "given explicitly: channels, attention_levels, num_res_blocks" in card["provenance"]["architecture"]
    with pytest.raises(CheckpointError, match=r"do not fit the network architecture.*tensors"):
        convert_reference_checkpoint(path, attention_levels=(0, 0, 1))
    with pytest.raises(CheckpointError, match="do not fit the network architecture"):
        convert_reference_checkpoint(path, channels=(32, 32, 64))
    with pytest.raises(CheckpointError, match=r"checkpoint_ep00400.pth cannot be imported: the model card's "
                                              r"network.unet.norm_num_groups must divide every entry"):
        convert_reference_checkpoint(path, channels=(30, 30, 30))


def test_card_overrides_are_merged(reference):
    path, _, _ = reference
    _, card = convert_reference_checkpoint(
        path, card_overrides={"preprocessing": {"intensity": {"scale": 10.0}}, "id": "my-model"}
    )
    assert card["preprocessing"]["intensity"]["scale"] == 10.0
    assert card["preprocessing"]["intensity"]["clip"] == [0.0, 1.0]  # the rest is kept
    assert card["id"] == "my-model"


def test_scheduler_read_from_the_file(tmp_path):
    unet = reference_unet(3)
    embed = torch.nn.Embedding(3, 64, padding_idx=0)
    betas = torch.linspace(2e-4, 0.03, 500)
    path = write_reference_pth(tmp_path / "sched.pth", unet, embed, {"betas": betas, "alphas": 1 - betas})
    _, card = convert_reference_checkpoint(path)
    sched = card["scheduler"]
    assert sched["num_train_timesteps"] == 500 and sched["schedule"] == "linear_beta"
    assert sched["beta_start"] == pytest.approx(2e-4) and sched["beta_end"] == pytest.approx(0.03)
    assert "scheduler_state_dict" in card["provenance"]["scheduler"]

    path = write_reference_pth(tmp_path / "sched2.pth", unet, embed,
                               {"num_train_timesteps": 800, "beta_schedule": "scaled_linear"})
    _, card = convert_reference_checkpoint(path)
    assert card["scheduler"]["num_train_timesteps"] == 800
    assert card["scheduler"]["schedule"] == "scaled_linear_beta"


def test_import_checkpoint_refusals(reference, tmp_path):
    path, _, _ = reference
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match=r"\.safetensors"):
        import_checkpoint(path, path)  # would overwrite the source
    with pytest.raises(CheckpointError, match="does not exist"):
        import_checkpoint(path, tmp_path / "missing" / "out.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        import_checkpoint(tmp_path / "nope.pth", tmp_path / "out.safetensors")
    assert path.read_bytes() == before
    assert files_in(tmp_path) == []


def test_cli_import(reference, tmp_path, capsys):
    path, _, _ = reference
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    add_import_arguments(sub.add_parser("import-checkpoint"))
    out = tmp_path / "cli.safetensors"
    args = parser.parse_args(["import-checkpoint", "--input", str(path), "--output", str(out),
                              "--channels", "32,32,32", "--attention", "0,1,1"])
    assert args.func is run_import
    assert args.channels == [32, 32, 32] and args.attention == [False, True, True]
    assert args.func(args) == 0
    assert read_card(out)["network"]["unet"]["channels"] == [32, 32, 32]
    assert "wrote" in capsys.readouterr().out

    args = parser.parse_args(["import-checkpoint", "--input", str(tmp_path / "none.pth"), "--output", str(out)])
    with pytest.raises(CheckpointError, match="not found"):  # the CLI's main prints it and exits 2
        args.func(args)
    with pytest.raises(SystemExit):
        parser.parse_args(["import-checkpoint", "--input", "a", "--output", "b", "--attention", "0,x,1"])


# ---- refusals: project format ---------------------------------------------------------------------
def _card_variants(card: dict):
    broken = copy.deepcopy(card)
    del broken["scheduler"]
    changed = copy.deepcopy(card)
    changed["network"]["unet"]["channels"] = [32, 32, 64]
    return broken, changed


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "checkpoint not found"),
        ("folder", "is a folder"),
        ("truncated", "not a readable safetensors checkpoint"),
        ("random", "not a readable safetensors checkpoint"),
        ("no_card", "no DiffusionAnomaly model card"),
        ("bad_json", "not valid JSON"),
        ("missing_key", "no 'scheduler' entry"),
        ("wrong_channels", "do not match the network its model card describes"),
    ],
)
def test_safetensors_refusals(case, message, saved, tmp_path):
    path, model, card = saved
    target = tmp_path / "model.safetensors"
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    missing_key, wrong_channels = _card_variants(card)
    if case == "folder":
        target = tmp_path / "folder.safetensors"
        target.mkdir()
    elif case == "truncated":
        data = path.read_bytes()
        target.write_bytes(data[: len(data) // 2])
    elif case == "random":
        target.write_bytes(random.Random(0).randbytes(4096))
    elif case == "no_card":
        save_file(tensors, str(target))
    elif case == "bad_json":
        save_file(tensors, str(target), metadata={"model_card": '{"format": "diffusion-anomaly-checkpoint",'})
    elif case == "missing_key":
        save_file(tensors, str(target), metadata={"model_card": json.dumps(missing_key)})
    elif case == "wrong_channels":
        save_file(tensors, str(target), metadata={"model_card": json.dumps(wrong_channels)})
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(target)
    if case not in ("missing", "folder", "missing_key"):  # card validation messages do not name the file
        assert target.name in str(info.value)


@pytest.mark.parametrize("patch", [
    {"channels": [30, 30, 30]},  # not a multiple of norm_num_groups (MONAI ValueError)
    {"bogus_argument": 1},  # networks.build_unet ValueError
], ids=["channels-not-multiple-of-norm-groups", "unknown-network-argument"])
def test_unbuildable_card_is_a_checkpoint_error(patch, saved, tmp_path):
    path, model, card = saved
    card = copy.deepcopy(card)
    card["network"]["unet"].update(patch)
    target = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(target),
              metadata={"model_card": json.dumps(card)})
    with pytest.raises(CheckpointError):
        load_checkpoint(target)


# ---- refusals: reference .pth ------------------------------------------------------------------------
class _ShellPayload:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


class _OpenPayload:
    """Unpickling this creates the marker file without a shell (builtins.open)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_code_payload_control(tmp_path):
    """Control: the payloads used below really do run code when unpickled without protection."""
    for payload in (_ShellPayload, _OpenPayload):
        marker = tmp_path / f"control-{payload.__name__}"
        obj = pickle.loads(pickle.dumps({"model_state_dict": payload(marker)}))
        if hasattr(obj["model_state_dict"], "close"):
            obj["model_state_dict"].close()
        assert marker.exists()


@pytest.mark.parametrize("writer", ["torch.save", "pickle2", "pickle4-open"])
def test_pth_with_code_is_refused_and_never_run(writer, tmp_path):
    marker = tmp_path / "MARKER"
    path = tmp_path / "malicious.pth"
    if writer == "torch.save":
        torch.save({"model_state_dict": _ShellPayload(marker), "embed_state_dict": {}}, path)
    elif writer == "pickle2":
        path.write_bytes(pickle.dumps({"model_state_dict": _ShellPayload(marker)}, protocol=2))
    else:
        path.write_bytes(pickle.dumps({"model_state_dict": _OpenPayload(marker)}, protocol=4))
    for attempt in (load_checkpoint, convert_reference_checkpoint):
        with pytest.raises(CheckpointError) as info:
            attempt(path)
        message = str(info.value)
        assert "malicious.pth" in message
        assert "code" in message and "not plain tensors" in message and "not be executed" in message
    with pytest.raises(CheckpointError):
        import_checkpoint(path, tmp_path / "out.safetensors")
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        ([torch.ones(3)], "holds a list, not a checkpoint dict"),
        ({"embed_state_dict": {"weight": torch.zeros(3, 64)}}, "no 'model_state_dict'"),
        ({"model_state_dict": {"foo.weight": torch.ones(2)}, "embed_state_dict": {"weight": torch.zeros(3, 64)}},
         "not those of a MONAI DiffusionModelUNet"),
        ({"model_state_dict": {"conv_in.conv.weight": "text"}}, "not tensors"),
    ],
    ids=["list", "no_model_state_dict", "foreign_tensors", "non_tensor_values"],
)
def test_wrong_kind_of_pth(content, message, tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_reference_pth_with_mismatched_parts(reference, tmp_path):
    _, unet, embed = reference
    old = to_old_naming(unet.state_dict())
    # embedding of another width than the UNet's cross-attention
    path = tmp_path / "embed.pth"
    torch.save({"model_state_dict": old, "embed_state_dict": {"weight": torch.zeros(3, 32)}}, path)
    with pytest.raises(CheckpointError, match="do not belong together"):
        load_checkpoint(path)
    # no embedding at all
    torch.save({"model_state_dict": old}, path)
    with pytest.raises(CheckpointError, match="no class embedding"):
        load_checkpoint(path)
    # a tensor missing from the UNet: never a silently half-initialised network
    partial = OrderedDict((k, v) for k, v in old.items() if "up_blocks.1.attentions.0.proj_out" not in k)
    torch.save({"model_state_dict": partial, "embed_state_dict": embed.state_dict()}, path)
    with pytest.raises(CheckpointError, match=r"missing 2 tensors .*proj_out"):
        load_checkpoint(path)


@pytest.mark.parametrize("damage", ["truncated", "empty", "random"])
def test_corrupted_pth_names_the_file(damage, reference, tmp_path):
    path, _, _ = reference
    target = tmp_path / "damaged.pth"
    data = path.read_bytes()
    target.write_bytes({"truncated": data[: len(data) // 2], "empty": b"",
                        "random": random.Random(1).randbytes(2048)}[damage])
    with pytest.raises(CheckpointError, match="damaged.pth") as info:
        load_checkpoint(target)
    assert "corrupted" in str(info.value)


# ---- saving never leaves partial files ---------------------------------------------------------------
def test_save_into_missing_folder_creates_nothing(tmp_path):
    model, card = tiny_model(0), tiny_card()
    with pytest.raises((CheckpointError, OSError, SafetensorError)):
        save_checkpoint(model, card, tmp_path / "missing" / "model.safetensors")
    assert files_in(tmp_path) == []


def test_save_into_missing_folder_is_a_checkpoint_error(tmp_path):
    with pytest.raises((CheckpointError, OSError)):
        save_checkpoint(tiny_model(0), tiny_card(), tmp_path / "missing" / "model.safetensors")


def test_failed_write_leaves_no_partial_file_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    model, card = tiny_model(0), tiny_card()
    target = save_checkpoint(model, card, tmp_path / "model.safetensors")
    old = target.read_bytes()

    def failing_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("DiffusionAnomalyLib.networks.save_file", failing_save_file)
    with pytest.raises(OSError):
        save_checkpoint(model, card, target)
    with pytest.raises(OSError):
        save_checkpoint(model, card, tmp_path / "new.safetensors")
    assert files_in(tmp_path) == ["model.safetensors"]
    assert target.read_bytes() == old


def test_invalid_card_is_refused_before_writing(tmp_path):
    card = tiny_card()
    del card["labels"]
    with pytest.raises(CheckpointError, match="no 'labels' entry"):
        save_checkpoint(tiny_model(0), card, tmp_path / "model.safetensors")
    assert files_in(tmp_path) == []


# ---- issue 7: checks before anything is allocated, written or run ------------------------------------------
def test_short_and_cosine_reference_schedules_are_imported(reference, tmp_path):
    _, unet, embed = reference
    path = write_reference_pth(tmp_path / "cosine.pth", unet, embed, {"beta_schedule": "cosine",
                                                                       "num_train_timesteps": 300})
    _, card = convert_reference_checkpoint(path)
    assert card["scheduler"] == {"num_train_timesteps": 300, "schedule": "cosine"}  # no beta range for cosine
    assert card["inference_defaults"]["noise_level"] == 120  # the paper's 0.4 T, inside the schedule
    assert "default noise level 120" in card["provenance"]["scheduler"]


def test_nan_weights_in_a_reference_file_are_named_as_such(reference, tmp_path):
    _, unet, embed = reference
    old = to_old_naming(unet.state_dict())
    old["conv_in.conv.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan.pth"
    torch.save({"model_state_dict": old, "embed_state_dict": embed.state_dict()}, path)
    with pytest.raises(CheckpointError, match=r"nan.pth contain NaN or infinite values \(conv_in.conv.weight\)"):
        convert_reference_checkpoint(path)


def test_too_many_betas_is_a_checkpoint_error(reference, tmp_path):
    _, unet, embed = reference
    path = write_reference_pth(tmp_path / "long.pth", unet, embed, {"betas": torch.linspace(1e-4, 0.02, 100_001)})
    with pytest.raises(CheckpointError, match=r"number of betas\) must be a whole number from 2 to 100000"):
        convert_reference_checkpoint(path)


def test_a_card_describing_a_huge_network_allocates_nothing(saved, tmp_path):
    """Names and shapes are compared on the meta device: a 40-billion-parameter card is refused at once."""
    path, model, card = saved
    huge = copy.deepcopy(card)
    huge["network"]["unet"].update(channels=[2048] * 6, attention_levels=[True] * 6, num_res_blocks=16)
    target = tmp_path / "huge.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(target),
              metadata={"model_card": json.dumps(huge)})
    with pytest.raises(CheckpointError, match="do not match the network its model card describes: .*another shape"):
        load_checkpoint(target)


def test_a_network_that_fails_its_test_forward_pass_is_refused(saved, monkeypatch):
    from DiffusionAnomalyLib import networks

    path, model, card = saved
    built = networks.build_model(copy.deepcopy(card))
    built.load_state_dict(model.state_dict())
    networks.check_forward(built, card, "ok.safetensors")  # control
    monkeypatch.setattr(type(built.unet), "forward", lambda self, x, timesteps, context=None: x[..., :-1])
    with pytest.raises(CheckpointError, match=r"returns shape \(1, 1, 8, 7\) for an input of shape \(1, 1, 8, 8\)"):
        networks.check_forward(built, card, "bad.safetensors")
    monkeypatch.setattr(type(built.unet), "forward", lambda self, x, timesteps, context=None: x / 0.0)
    with pytest.raises(CheckpointError, match="NaN or infinite values on a test input"):
        networks.check_forward(built, card, "bad.safetensors")

    def refuse(self, x, timesteps, context=None):
        raise RuntimeError("Sizes of tensors must match except in dimension 1.\nmore detail")

    monkeypatch.setattr(type(built.unet), "forward", refuse)
    with pytest.raises(CheckpointError, match=r"fails a test forward pass \(Sizes of tensors must match except in "
                                              r"dimension 1\); the model card does not describe a working network\.$"):
        networks.check_forward(built, card, "bad.safetensors")


def test_a_verified_save_that_fails_leaves_nothing(tmp_path, monkeypatch):
    from DiffusionAnomalyLib import networks

    def failing_check(model, card, source):
        raise CheckpointError("test forward pass failed")

    monkeypatch.setattr(networks, "check_forward", failing_check)
    with pytest.raises(CheckpointError, match="test forward pass failed"):
        save_checkpoint(tiny_model(0), tiny_card(), tmp_path / "model.safetensors", verify=True)
    assert files_in(tmp_path) == []
