"""Hostile checkpoints, through the CLI as a user would run them: every one is refused before any work
with exit code 2 and one ``error:`` sentence naming the problem, and nothing on disk changes.

Bad cards are written with ``safetensors.torch.save_file`` directly (which bypasses the card
validation of ``networks.save_checkpoint``), around the weights of conftest's tiny checkpoint.
Bad reference files for ``import-checkpoint`` are ``.pth`` files in the IgCONDA-PET layout.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from DiffusionAnomalyLib import cli
from DiffusionAnomalyLib.card import CheckpointError, NOT_FOR_CLINICAL_USE, default_card, validate_card
from DiffusionAnomalyLib.checkpoint import CARD_KEY, read_card
from DiffusionAnomalyLib.methods import load_checkpoint
from DiffusionAnomalyLib.networks import build_model
from DiffusionAnomalyLib.pipeline import CaseResult
from DiffusionAnomalyLib.postprocessing import Thresholding
from DiffusionAnomalyLib.report import report_html
from DiffusionAnomalyLib.volume import write_volume

from conftest import DELETE, run_refused, set_field



@pytest.fixture(scope="module")
def weights(tiny_checkpoint) -> dict[str, torch.Tensor]:
    return load_file(str(tiny_checkpoint))


@pytest.fixture(scope="module")
def pet_file(tmp_path_factory, pet_slab) -> Path:
    """A valid PET input (PT, SUVbw): every refusal below is the checkpoint's fault, not the input's."""
    return write_volume(pet_slab, tmp_path_factory.mktemp("input") / "pet.nrrd")


def write_checkpoint(path: Path, card, tensors: dict[str, torch.Tensor]) -> Path:
    """A .safetensors checkpoint with exactly this card text (no validation on the way)."""
    text = card if isinstance(card, str) else json.dumps(card)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={CARD_KEY: text})
    return path


# ---- run --checkpoint <hostile card> ---------------------------------------------------------------
#: (case id, dotted path in the tiny card, hostile value, words the sentence must contain)
CARD_CASES = [
    ("negative-timesteps", "scheduler.num_train_timesteps", -5,
     "scheduler.num_train_timesteps must be a whole number from 2 to 100000, got -5."),
    ("huge-timesteps", "scheduler.num_train_timesteps", 10 ** 12, "scheduler.num_train_timesteps"),
    ("fractional-timesteps", "scheduler.num_train_timesteps", 999.5, "got 999.5."),
    ("text-timesteps", "scheduler.num_train_timesteps", "1000", 'got "1000".'),
    ("unknown-schedule", "scheduler.schedule", "quadratic", "scheduler.schedule must be one of"),
    ("beta-end-below-start", "scheduler.beta_end", 1e-6, "scheduler.beta_end must be a finite number in (0.0001, 1)"),
    ("nan-beta", "scheduler.beta_start", math.nan, "scheduler.beta_start must be a finite number in (0, 1), got NaN."),
    ("beta-above-one", "scheduler.beta_end", 2.0, "scheduler.beta_end"),
    ("cosine-with-betas", "scheduler.schedule", "cosine", "must be absent for the 'cosine' schedule"),
    ("label-outside-embedding", "labels.unhealthy", 7,
     "labels.unhealthy must be a whole number from 0 to 2 (inside network.class_embedding.num_classes), got 7."),
    ("negative-label", "labels.healthy", -1, "labels.healthy"),
    ("duplicate-labels", "labels.healthy", 0, "labels must give every class its own number"),
    ("no-healthy-label", "labels.healthy", DELETE, "labels section has no 'healthy' entry"),
    ("zero-spacing", "preprocessing.spacing_mm", [0, 12, 12], "preprocessing.spacing_mm must be a list of 3 finite"),
    ("negative-spacing", "preprocessing.spacing_mm", [12, -12, 12], "got [12, -12, 12]."),
    ("infinite-spacing", "preprocessing.spacing_mm", [12, 12, math.inf], "preprocessing.spacing_mm"),
    ("zero-in-plane-size", "preprocessing.in_plane_size", [0, 32], "preprocessing.in_plane_size must be a list of 2"),
    ("huge-in-plane-size", "preprocessing.in_plane_size", [10 ** 6, 10 ** 6], "preprocessing.in_plane_size"),
    ("odd-in-plane-size", "preprocessing.in_plane_size", [30, 30],
     "preprocessing.in_plane_size must be two multiples of 4 of at least 8"),
    ("zero-intensity-scale", "preprocessing.intensity.scale", 0, "preprocessing.intensity.scale must be a finite number in (0, 1e+07]"),
    ("inverted-clip", "preprocessing.intensity.clip", [1, 0], "preprocessing.intensity.clip"),
    ("ras-orientation", "preprocessing.orientation", "RAS", 'preprocessing.orientation must be "LPS"'),
    ("channels-as-text", "network.unet.channels", "8,16,16", "network.unet.channels must be a list of 1 to 6 whole numbers"),
    ("zero-channels", "network.unet.channels", [8, 0, 16], "network.unet.channels"),
    ("attention-length", "network.unet.attention_levels", [False, True], "network.unet.attention_levels must be a list of 3"),
    ("norm-groups-not-dividing", "network.unet.norm_num_groups", 3, "network.unet.norm_num_groups must divide every entry"),
    ("head-wider-than-level", "network.unet.num_head_channels", 32, "network.unet.num_head_channels must be at most"),
    ("cross-attention-not-embedding", "network.unet.cross_attention_dim", 32,
     "network.unet.cross_attention_dim must equal network.class_embedding.dim (64), got 32."),
    ("unknown-unet-argument", "network.unet.use_flash_attention", True, "network.unet must hold only DiffusionModelUNet"),
    ("3d-network-for-slices", "network.unet.spatial_dims", 3, "network.unet.spatial_dims must be 2"),
    ("huge-embedding", "network.class_embedding.num_classes", 10 ** 12, "network.class_embedding.num_classes"),
    ("no-embedding", "network.class_embedding", DELETE, "network.class_embedding is missing"),
    ("noise-level-above-T", "inference_defaults.noise_level", 5000,
     "inference_defaults.noise_level must be a whole number from 1 to 999"),
    ("nan-guidance", "inference_defaults.guidance_scale", math.nan, "inference_defaults.guidance_scale must be a finite number >= 0"),
    ("negative-guidance", "inference_defaults.guidance_scale", -3.0, "inference_defaults.guidance_scale"),
    ("bad-steps", "inference_defaults.steps", "fast", "inference_defaults.steps must be a whole number >= 1 or 'reference'"),
    ("zero-batch", "inference_defaults.batch_size", 0, "inference_defaults.batch_size"),
    ("unknown-threshold-method", "inference_defaults.threshold", {"method": "median", "value": 0.5},
     "inference_defaults.threshold.method must be one of fraction, absolute, otsu"),
    ("fraction-above-one", "inference_defaults.threshold", {"method": "fraction", "value": 1.5},
     "inference_defaults.threshold.value must be a finite number in (0, 1]"),
    ("negative-min-size", "inference_defaults.min_size_ml", -1, "inference_defaults.min_size_ml must be a finite number >= 0"),
    ("reversed-seed-range", "provenance.train_seeds", [1010, 1000], "provenance.train_seeds must be a [start, stop) pair"),
    ("empty-id", "id", "", "id must be a non-empty text"),
    ("id-with-newline", "id", "model\nerror: fake", "id must be a non-empty text"),
    ("mr-modality", "modality", "MR", "modality must be one of PT, CT"),
    ("newer-format", "format_version", 99, "format version 99 is newer"),
    ("card-section-as-list", "scheduler", [1000, "linear_beta"], "scheduler must be a JSON object"),
]


@pytest.mark.parametrize("path, value, words", [c[1:] for c in CARD_CASES], ids=[c[0] for c in CARD_CASES])
def test_run_refuses_a_hostile_card(path, value, words, tiny_card, weights, pet_file, tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "hostile.safetensors", set_field(copy.deepcopy(tiny_card), path, value), weights)
    out = tmp_path / "out"
    line = run_refused(capsys, "run", "--checkpoint", ckpt, "--input", pet_file, "--out", out,
                       watch=(ckpt, pet_file, out.parent))
    assert words in line, line
    assert "hostile.safetensors" in line  # the file is named
    assert not out.exists()


def test_html_in_the_id_does_not_hide_a_bad_field(tiny_card, weights, pet_file, tmp_path, capsys):
    card = set_field(copy.deepcopy(tiny_card), "id", "<b>bold</b><script>alert(1)</script>")
    set_field(card, "scheduler.num_train_timesteps", 0)
    ckpt = write_checkpoint(tmp_path / "html.safetensors", card, weights)
    line = run_refused(capsys, "run", "--checkpoint", ckpt, "--input", pet_file, "--out", tmp_path / "out",
                       watch=(ckpt, pet_file, tmp_path))
    assert "scheduler.num_train_timesteps" in line


#: (case id, how the file's weights are damaged, words of the sentence)
WEIGHT_CASES = [
    ("no-weights", "none", "tensors missing"),
    ("one-tensor-missing", "drop", "1 tensor missing (unet.out.2.conv.weight)"),
    ("unexpected-tensor", "extra", "1 unexpected tensor (unet.extra.weight)"),
    ("wrong-shape", "shape", "1 tensor of another shape (unet.conv_in.conv.weight (16, 1, 3, 3) in the file"),
    ("card-of-another-network", "card", "do not match the network its model card describes"),
    ("nan-weights", "nan", "contain NaN or infinite values (unet.conv_in.conv.weight)"),
    ("infinite-weights", "inf", "contain NaN or infinite values (embed.weight)"),
    ("card-not-json", "json", "is not valid JSON"),
    ("card-not-an-object", "list", "the model card is not a JSON object."),
    ("deeply-nested-card", "deep", "is nested too deeply to be a model card"),
]


@pytest.mark.parametrize("damage, words", [c[1:] for c in WEIGHT_CASES], ids=[c[0] for c in WEIGHT_CASES])
def test_run_refuses_weights_that_do_not_fit(damage, words, tiny_card, weights, pet_file, tmp_path, capsys):
    tensors = {k: v.clone() for k, v in weights.items()}
    card = copy.deepcopy(tiny_card)
    if damage == "none":
        tensors = {"unrelated": torch.zeros(1)}
    elif damage == "drop":
        del tensors["unet.out.2.conv.weight"]
    elif damage == "extra":
        tensors["unet.extra.weight"] = torch.zeros(2)
    elif damage == "shape":
        tensors["unet.conv_in.conv.weight"] = torch.zeros(16, 1, 3, 3)
    elif damage == "card":
        card["network"]["unet"]["channels"] = [8, 16, 32]  # a valid card, but not these weights
    elif damage == "nan":
        tensors["unet.conv_in.conv.weight"][0, 0, 0, 0] = math.nan
    elif damage == "inf":
        tensors["embed.weight"][1, 0] = math.inf
    if damage == "json":
        card = '{"format": "diffusion-anomaly-checkpoint", '
    elif damage == "list":
        card = "[1, 2, 3]"
    elif damage == "deep":
        card = "[" * 200_000 + "]" * 200_000
    ckpt = write_checkpoint(tmp_path / "weights.safetensors", card, tensors)
    line = run_refused(capsys, "run", "--checkpoint", ckpt, "--input", pet_file, "--out", tmp_path / "out",
                       watch=(ckpt, pet_file, tmp_path))
    assert words in line, line
    assert "weights.safetensors" in line


@pytest.mark.parametrize("registry", ['{"models": [{"id": 1}]}', "not json", '{"models": {}}', "[]"],
                         ids=["entry-without-file", "not-json", "models-not-a-list", "no-models"])
def test_run_refuses_a_broken_model_registry(registry, pet_file, tmp_path, monkeypatch, capsys):
    models = tmp_path / "models"
    models.mkdir()
    (models / "registry.json").write_text(registry)
    monkeypatch.setenv("DIFFUSION_ANOMALY_MODELS", str(models))
    out = tmp_path / "out"
    line = run_refused(capsys, "run", "--input", pet_file, "--out", out, watch=(pet_file, tmp_path))
    assert f"the model registry {models / 'registry.json'} cannot be read" in line


def test_run_refuses_a_missing_gpu(tiny_checkpoint, pet_file, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    line = run_refused(capsys, "run", "--checkpoint", tiny_checkpoint, "--input", pet_file, "--out", tmp_path / "out",
                       "--device", "cuda", watch=(tiny_checkpoint, pet_file, tmp_path))
    assert "a GPU was requested (device 'cuda') but PyTorch sees no CUDA device" in line


def test_the_unmodified_tiny_checkpoint_is_accepted(tiny_card, weights, tmp_path):
    """Control: the same file-writing path with the tiny card as it is loads and runs a forward pass."""
    ckpt = write_checkpoint(tmp_path / "good.safetensors", copy.deepcopy(tiny_card), weights)
    model = load_checkpoint(ckpt, device="cpu")
    assert model.card["id"] == tiny_card["id"]


def test_an_html_id_is_accepted_and_escaped_in_the_report(tiny_card, weights, small_phantom_case, tmp_path):
    html_id = "<b>bold</b><script>alert(1)</script>"
    ckpt = write_checkpoint(tmp_path / "html.safetensors", set_field(copy.deepcopy(tiny_card), "id", html_id), weights)
    card = read_card(ckpt)
    assert card["id"] == html_id
    pet = small_phantom_case.pet
    heat = pet.with_voxels((small_phantom_case.lesion_labels.voxels > 0).astype(np.float32) + 0.01,
                           units="|SUV difference|")
    case = CaseResult(volume=pet, heatmap=heat, counterfactual=None, card=card, parameters={},
                      thresholding=Thresholding("fraction", 0.5, 0.0)).threshold()
    text = report_html(case)
    assert html_id not in text and "<script>" not in text
    assert "&lt;b&gt;bold&lt;/b&gt;&lt;script&gt;" in text
    assert NOT_FOR_CLINICAL_USE in text


# ---- import-checkpoint of a hostile reference .pth ------------------------------------------------------
REFERENCE_CARD = default_card(channels=(32, 32, 32), attention_levels=(False, True, True))  # importer's defaults


@pytest.fixture(scope="module")
def reference_parts():
    """The UNet and embedding state dicts of a tiny network in the IgCONDA-PET reference layout."""
    torch.manual_seed(0)
    model = build_model(copy.deepcopy(REFERENCE_CARD))
    return ({k: v.detach().clone() for k, v in model.unet.state_dict().items()},
            {k: v.detach().clone() for k, v in model.embed.state_dict().items()})


def write_reference(path: Path, parts, scheduler_state=None, damage=None) -> Path:
    unet, embed = ({k: v.clone() for k, v in p.items()} for p in parts)
    if damage == "nan":
        unet["conv_in.conv.weight"][0, 0, 0, 0] = math.nan
    torch.save({"model_state_dict": unet, "embed_state_dict": embed,
                "scheduler_state_dict": scheduler_state if scheduler_state is not None else {}}, path)
    return path


#: (case id, scheduler_state_dict, extra CLI arguments, damage, words of the sentence)
IMPORT_CASES = [
    ("negative-timesteps", {"num_train_timesteps": -5}, [], None,
     "ref.pth cannot be imported: the model card's scheduler.num_train_timesteps must be a whole number from 2 to "
     "100000, got -5."),
    ("huge-timesteps", {"num_train_timesteps": torch.tensor(10 ** 10)}, [], None, "scheduler.num_train_timesteps"),
    ("text-timesteps", {"num_train_timesteps": "many"}, [], None, 'scheduler.num_train_timesteps must be a whole number'),
    ("fractional-timesteps", {"num_train_timesteps": 999.5}, [], None, "got 999.5."),
    ("nan-beta", {"beta_start": torch.tensor(math.nan)}, [], None, "scheduler.beta_start must be a finite number"),
    ("beta-end-below-start", {"beta_start": 0.02, "beta_end": 0.0001}, [], None, "scheduler.beta_end must be"),
    ("decreasing-betas", {"betas": torch.linspace(0.02, 1e-4, 1000)}, [], None, "scheduler.beta_end must be"),
    ("betas-above-one", {"betas": torch.linspace(1e-4, 1.5, 1000)}, [], None, "scheduler.beta_end must be"),
    ("too-many-betas", {"betas": torch.linspace(1e-4, 0.02, 200_000)}, [], None,
     "the noise schedule stored in ref.pth (its number of betas) must be a whole number from 2 to 100000"),
    ("unknown-schedule", {"beta_schedule": "quadratic"}, [], None, "unsupported noise schedule"),
    ("nan-weights", None, [], "nan", "contain NaN or infinite values (conv_in.conv.weight)"),
    ("zero-head-channels", None, ["--num-head-channels", "0"], None, "network.unet.num_head_channels"),
    ("channels-not-divisible", None, ["--channels", "30,30,30"], None, "network.unet.norm_num_groups must divide"),
    ("zero-res-blocks", None, ["--num-res-blocks", "0"], None, "network.unet.num_res_blocks"),
    ("wrong-attention", None, ["--attention", "0,0,1"], None, "do not fit the network architecture"),
]


@pytest.mark.parametrize("scheduler, extra, damage, words", [c[1:] for c in IMPORT_CASES],
                         ids=[c[0] for c in IMPORT_CASES])
def test_import_refuses_a_hostile_reference_file(scheduler, extra, damage, words, reference_parts, tmp_path, capsys):
    pth = write_reference(tmp_path / "ref.pth", reference_parts, scheduler, damage)
    out_dir = tmp_path / "models"
    out_dir.mkdir()
    line = run_refused(capsys, "import-checkpoint", "--input", pth, "--output", out_dir / "imported.safetensors",
                       *extra, watch=(pth, out_dir, tmp_path))
    assert words in line, line
    assert list(out_dir.iterdir()) == []


def test_import_of_the_clean_reference_file_works_and_runs(reference_parts, tmp_path, capsys):
    """Control: the same file without damage imports (exit 0) into a checkpoint that loads."""
    pth = write_reference(tmp_path / "ref.pth", reference_parts)
    out = tmp_path / "imported.safetensors"
    assert cli.main(["import-checkpoint", "--input", str(pth), "--output", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    card = validate_card(read_card(out))
    assert card["scheduler"]["num_train_timesteps"] == 1000
    assert load_checkpoint(out, device="cpu").card["id"] == card["id"]


def test_import_never_replaces_a_good_checkpoint_with_a_bad_one(reference_parts, tmp_path, capsys):
    pth = write_reference(tmp_path / "ref.pth", reference_parts)
    out = tmp_path / "imported.safetensors"
    assert cli.main(["import-checkpoint", "--input", str(pth), "--output", str(out)]) == 0
    capsys.readouterr()
    bad = write_reference(tmp_path / "bad.pth", reference_parts, {"num_train_timesteps": 0})
    line = run_refused(capsys, "import-checkpoint", "--input", bad, "--output", out, watch=(tmp_path,))
    assert "scheduler.num_train_timesteps" in line
    with pytest.raises(CheckpointError):
        load_checkpoint(bad)
