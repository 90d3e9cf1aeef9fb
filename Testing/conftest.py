"""Shared fixtures: a tiny IgCONDA-PET checkpoint, a small phantom and an oblique PET volume.

Everything is deliberately small (32 x 32 model slices at 12 mm, 8-16 channels, 3 DDIM grid
points, noise level 50) so the pipeline and CLI tests run in seconds on a CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "DiffusionAnomaly"))  # the Slicer module's Lib (process.py etc.): no Slicer needed

from DiffusionAnomalyLib.volume import Volume, ijk_to_ras_matrix  # noqa: E402
from DiffusionAnomalyLib.pipeline import RESULT_FILES  # noqa: E402
from DiffusionAnomalyLib.report import find_chromium  # noqa: E402

#: the files a ``run`` of a NRRD/NIfTI input writes: the result set and its report (the PDF when headless Chromium is
#: there to print it)
RUN_FILES = frozenset(RESULT_FILES) | {"report.html"} | ({"report.pdf"} if find_chromium() else set())

#: the real CTs with their TotalSegmentator labels (CI keeps shared/ beside the checkout)
REAL_CT = ROOT.parent / "shared" / "data" / "real-ct"
needs_real_ct = pytest.mark.skipif(not REAL_CT.is_dir(), reason=f"shared real-CT test data not found at {REAL_CT}")


def pytest_configure(config):
    """One intra-op thread: the tiny networks gain nothing from more, and on a busy 2-core machine
    (CI runs beside other jobs) oversubscribed OpenMP threads make each forward pass 10-100x slower."""
    import torch

    torch.set_num_threads(1)


#: the grid of the small phantom (same 384 x 384 x 720 mm field of view as the default phantom)
SMALL_SHAPE_IJK = (48, 48, 60)
SMALL_SPACING = (8.0, 8.0, 12.0)
SMALL_PHANTOM_KWARGS = {"shape_ijk": SMALL_SHAPE_IJK, "spacing": SMALL_SPACING, "n_lesions": 2}

#: training/validation seed ranges ([start, stop)) recorded in the tiny card's provenance
TRAIN_SEEDS = [1000, 1010]
VAL_SEEDS = [900000, 900002]


def rotation(axis, angle_deg: float) -> np.ndarray:
    """Rodrigues rotation matrix about an arbitrary axis."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    t = np.radians(angle_deg)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


@pytest.fixture(scope="session")
def tiny_card() -> dict:
    """A model card for a tiny network; never mutate it in a test (session-scoped)."""
    from DiffusionAnomalyLib.card import default_card

    card = default_card(channels=(8, 16, 16), attention_levels=(False, False, True),
                        spacing_mm=(12.0, 12.0, 12.0), in_plane_size=(32, 32))
    card["network"]["unet"]["norm_num_groups"] = 8
    card["network"]["unet"]["num_head_channels"] = 8
    card["inference_defaults"].update(steps=3, noise_level=50)
    card["provenance"] = {"train_seeds": list(TRAIN_SEEDS), "val_seeds": list(VAL_SEEDS),
                          "note": "untrained test network"}
    return card


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_card) -> Path:
    """An untrained (seeded) tiny network saved as a real .safetensors checkpoint."""
    import torch

    from DiffusionAnomalyLib import networks

    torch.manual_seed(0)
    model = networks.build_model(tiny_card)
    # MONAI zero-initialises the output convolution (and the residual/attention output layers), so an
    # untrained UNet predicts eps = 0 everywhere and every counterfactual would equal its input: give
    # those layers seeded random weights so guidance, noise level and steps change the result.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2 and not p.any():
                p.normal_(0.0, 0.1)
    return networks.save_checkpoint(model, tiny_card, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def save_tiny_classifier(path: Path, tiny_card: dict, **scheduler) -> Path:
    """An untrained (seeded) noise-conditioned classifier for the tiny diffusion model: its card takes the
    diffusion card's schedule (with ``scheduler`` changes, to make one that does not fit), model grid and encoder
    design, as :func:`card.classifier_card` does from a design."""
    import copy

    import torch

    from DiffusionAnomalyLib import networks
    from DiffusionAnomalyLib.card import classifier_card

    card = classifier_card()
    card.update(scheduler={**copy.deepcopy(tiny_card["scheduler"]), **scheduler}, modality=tiny_card["modality"],
                preprocessing=copy.deepcopy(tiny_card["preprocessing"]), id="tiny-classifier")
    encoder = card["network"]["encoder"]
    encoder.update({key: copy.deepcopy(tiny_card["network"]["unet"][key]) for key in encoder if key != "out_channels"})
    torch.manual_seed(1)
    model = networks.build_model(card)
    with torch.no_grad():  # zero-initialised layers would give no gradient, so no guidance at all
        for p in model.parameters():
            if p.ndim >= 2 and not p.any():
                p.normal_(0.0, 0.1)
    return networks.save_checkpoint(model, card, path)


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory, tiny_card) -> Path:
    """The tiny diffusion model's guidance classifier (:func:`save_tiny_classifier`), session-scoped."""
    return save_tiny_classifier(tmp_path_factory.mktemp("classifier") / "tiny-classifier.safetensors", tiny_card)


def _seeded_network(card: dict, seed: int):
    """An untrained network of ``card`` with seeded random weights where MONAI initialises zeros (an all-zero
    output layer would predict eps = 0, so every counterfactual would equal its input)."""
    import torch

    from DiffusionAnomalyLib import networks

    torch.manual_seed(seed)
    model = networks.build_model(card)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2 and not p.any():
                p.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="session")
def tiny_ct_card(tiny_card) -> dict:
    """A tiny CT organ model's card: the tiny network on 32 x 32 crops of 3 mm around kidneys and pancreas, the
    demo CT model's window and default method (classifier-guided DDIM); never mutate it."""
    import copy

    from DiffusionAnomalyLib.card import CT_DESIGN, validate_card

    card = copy.deepcopy(tiny_card)
    card.update(id="tiny-ct", modality="CT")
    card["preprocessing"].update(spacing_mm=[3.0, 3.0, 3.0], in_plane_size=[32, 32],
                                 intensity=copy.deepcopy(CT_DESIGN["intensity"]),
                                 crop=copy.deepcopy(CT_DESIGN["crop"]))
    card["inference_defaults"].update(method="cg-ddim", organ_margin_mm=10.0, **{"cg-ddim": {"steps": 2,
                                                                                          "noise_level": 30}})
    return validate_card(card)


@pytest.fixture(scope="session")
def tiny_ct_checkpoint(tmp_path_factory, tiny_ct_card) -> Path:
    """The tiny CT organ model (untrained, seeded) saved as a .safetensors checkpoint."""
    from DiffusionAnomalyLib import networks

    return networks.save_checkpoint(_seeded_network(tiny_ct_card, 0), tiny_ct_card,
                                    tmp_path_factory.mktemp("ct") / "tiny-ct.safetensors")


@pytest.fixture(scope="session")
def tiny_ct_classifier(tmp_path_factory, tiny_ct_card) -> Path:
    """The tiny CT model's guidance classifier (:func:`save_tiny_classifier`)."""
    return save_tiny_classifier(tmp_path_factory.mktemp("ct-classifier") / "tiny-ct-classifier.safetensors",
                                tiny_ct_card)


@pytest.fixture()
def tiny_model(tiny_checkpoint):
    """A freshly loaded model (empty cache, evaluation counter at zero) on the CPU."""
    from DiffusionAnomalyLib.methods import load_checkpoint

    return load_checkpoint(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="session")
def small_phantom_case():
    from DiffusionAnomalyLib.phantoms import make_phantom

    return make_phantom(seed=11, **SMALL_PHANTOM_KWARGS)


@pytest.fixture()
def small_phantom(small_phantom_case) -> Volume:
    """The small phantom's PET (SUVbw, modality PT); a copy, so tests may modify it."""
    pet = small_phantom_case.pet
    return pet.with_voxels(pet.voxels.copy())


@pytest.fixture(scope="session")
def pet_slab(small_phantom_case) -> Volume:
    """20 axial slices of the small phantom (one of its lesions inside): a cheaper input for tests
    that run the network several times. Session-scoped: do not modify it in a test."""
    pet, labels = small_phantom_case.pet, small_phantom_case.lesion_labels
    k0, k1 = 20, 40
    assert labels.voxels[k0:k1].any(), "the slab should contain a lesion"
    m = pet.ijk_to_ras.copy()
    m[:3, 3] = pet.ijk_to_ras_points([0, 0, k0])[0]
    return Volume(pet.voxels[k0:k1].copy(), m, modality="PT", units="SUVbw", meta={"source": "phantom slab"})


@pytest.fixture(scope="session")
def oblique_pet(small_phantom_case) -> Volume:
    """The small phantom's voxels on an oblique grid: rotated 20 degrees about an oblique axis, shifted origin.

    Session-scoped: do not modify it in a test.
    """
    pet = small_phantom_case.pet
    direction = rotation([0.3, -0.5, 0.8], 20.0) @ pet.direction_ras
    m = ijk_to_ras_matrix(pet.spacing, [-37.5, 120.25, -410.75], direction)
    return Volume(pet.voxels.copy(), m, modality="PT", units="SUVbw", meta={"source": "oblique test volume"})


# ---- refusals: the harness of the hostile-input tables ----------------------------------------
def error_line(err: str) -> str:
    """The single ``error: ...`` line the CLI printed last (progress-bar output before it is allowed)."""
    assert "Traceback" not in err
    starts = [i for i in range(len(err)) if err.startswith("error:", i) and (i == 0 or err[i - 1] in "\r\n")]
    assert len(starts) == 1, f"expected exactly one error line in {err!r}"
    tail = err[starts[0]:]
    assert tail.endswith("\n") and tail.count("\n") == 1 and "\r" not in tail, f"error is not one line: {tail!r}"
    return tail.strip()


def snapshot(*paths) -> dict:
    """Every file under ``paths`` (files or folders) with its bytes' hash and mode; a missing path is recorded as such."""
    import hashlib
    import os

    state = {}
    for root in paths:
        root = Path(root)
        if not os.path.lexists(root):
            state[str(root)] = None
            continue
        files = [root] if not root.is_dir() or root.is_symlink() else sorted(root.rglob("*"))
        for p in files:
            key = str(p)
            if p.is_symlink():  # recorded, not followed: a broken link is a state too
                state[key] = ("link", os.readlink(p))
            elif p.is_dir():
                state[key] = ("dir", os.stat(p).st_mode)
            else:
                state[key] = (hashlib.sha256(p.read_bytes()).hexdigest(), os.stat(p).st_mode)
    return state


def run_refused(capsys, *argv, watch=()) -> str:
    """Run the CLI in-process and assert it refused: exit code 2, one ``error:`` sentence, no traceback,
    and every path in ``watch`` (inputs, output folders, their parents) exactly as before. Returns the sentence."""
    from DiffusionAnomalyLib import cli

    before = snapshot(*watch)
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    line = error_line(err)
    assert code == 2, f"exit code {code} for {line}"
    assert snapshot(*watch) == before, f"something changed on disk although the run was refused: {line}"
    return line


#: with :func:`set_field`: remove the entry instead of setting it
DELETE = object()


def set_field(card: dict, path: str, value) -> dict:
    """``card`` with the entry at a dotted path (e.g. 'network.unet.channels') set to ``value`` (removed for DELETE)."""
    *parents, last = path.split(".")
    node = card
    for key in parents:
        node = node[key]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return card
