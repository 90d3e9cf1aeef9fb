"""MONAI network builders driven by the model card (the card is the only source of architecture).

A conditional diffusion model (METHODS.md, shared building blocks) is a 2D/3D
``DiffusionModelUNet`` with cross-attention plus a learned class embedding (3 x 64, index 0 =
null fixed at zero) whose output is fed as a context sequence of length 1. A noise-conditioned
classifier (METHODS.md section 2; card method "classifier") is MONAI's ``DiffusionModelEncoder``:
logits C(y | x_t, t) of a noised slice x_t at timestep t.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.nets.diffusion_model_unet import DiffusionModelEncoder  # not re-exported by monai.networks.nets
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .card import CheckpointError, validate_card
from .checkpoint import CARD_KEY, read_card
from .files import atomic_path

class ConditionalDiffusionModel(nn.Module):
    """UNet eps(x, t, c) plus the class embedding f(c) used as cross-attention context."""

    def __init__(self, unet: nn.Module, embedding: nn.Embedding | None):
        super().__init__()
        self.unet = unet
        self.embed = embedding

    def context(self, labels: torch.Tensor) -> torch.Tensor:
        """Class labels (B,) -> context (B, 1, dim)."""
        return self.embed(labels.long()).unsqueeze(1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.unet(x, timesteps=t, context=context)


class NoisyClassifier(nn.Module):
    """C(y | x_t, t): the encoder's logits (B, classes) of noised slices x_t (B, 1, H, W) at timesteps t (B,)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.encoder(x, timesteps=t)


def _monai_kwargs(args: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(args)
    for key in ("channels", "attention_levels", "num_res_blocks", "num_head_channels"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    # scaled-dot-product attention: same maths, faster on CPU and GPU
    kwargs["use_flash_attention"] = True
    return kwargs


def build_unet(args: dict[str, Any]) -> DiffusionModelUNet:
    """The MONAI UNet of a card's ``network.unet`` arguments (checked by :func:`.card.validate_card`)."""
    return DiffusionModelUNet(**_monai_kwargs(args))


def build_encoder(card: dict[str, Any]) -> DiffusionModelEncoder:
    """The MONAI encoder of a classifier card: ``network.encoder`` on slices of ``preprocessing.in_plane_size``."""
    return DiffusionModelEncoder(**_monai_kwargs(card["network"]["encoder"]),
                                 input_shape=tuple(card["preprocessing"]["in_plane_size"]))


def is_classifier(card: dict[str, Any]) -> bool:
    """True for a noise-conditioned classifier's card (its network is ``network.encoder``)."""
    return card.get("method") == "classifier"


#: what MONAI or torch raise for a combination of arguments they refuse (the card rules catch the known ones)
_BUILD_ERRORS = (ValueError, TypeError, KeyError, IndexError, ZeroDivisionError, AssertionError, RuntimeError)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0].rstrip(".") if text else type(exc).__name__


def build_model(card: dict[str, Any]) -> ConditionalDiffusionModel | NoisyClassifier:
    """Build the (untrained) network described by a model card's ``network`` section.

    A combination MONAI refuses is a CheckpointError sentence, never a traceback.
    """
    net = card["network"]
    try:
        if is_classifier(card):
            return NoisyClassifier(build_encoder(card))
        unet = build_unet(net["unet"])
        emb_cfg = net.get("class_embedding")
        embed = None
        if emb_cfg is not None:
            embed = nn.Embedding(int(emb_cfg["num_classes"]), int(emb_cfg["dim"]), padding_idx=0)
    except _BUILD_ERRORS as exc:
        raise CheckpointError(f"the network the model card describes cannot be built ({_first_line(exc)}); "
                              "check the card's network section.") from None
    return ConditionalDiffusionModel(unet, embed)


def expected_shapes(card: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of the card's network, computed without allocating it (meta device),
    so a card describing a huge network is compared with the file before any memory is used."""
    net = card["network"]
    try:
        with torch.device("meta"):
            if is_classifier(card):
                return {f"encoder.{k}": tuple(v.shape) for k, v in build_encoder(card).state_dict().items()}
            unet = build_unet(net["unet"])
    except _BUILD_ERRORS as exc:
        raise CheckpointError(f"the network the model card describes cannot be built ({_first_line(exc)}); "
                              "check the card's network section.") from None
    shapes = {f"unet.{k}": tuple(v.shape) for k, v in unet.state_dict().items()}
    emb_cfg = net.get("class_embedding")
    if emb_cfg is not None:
        shapes["embed.weight"] = (int(emb_cfg["num_classes"]), int(emb_cfg["dim"]))
    return shapes


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _summary(names, limit: int = 3) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def shape_mismatch(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]) -> str | None:
    """What differs between the tensors of a file and those of a network, in words (None: they match)."""
    missing, unexpected = set(expected) - set(found), set(found) - set(expected)
    other = [f"{k} {tuple(found[k])} in the file, {tuple(expected[k])} in the card"
             for k in sorted(set(found) & set(expected)) if tuple(found[k]) != tuple(expected[k])]
    parts = []
    if missing:
        parts.append(f"{_count(len(missing), 'tensor')} missing ({_summary(missing)})")
    if unexpected:
        parts.append(f"{_count(len(unexpected), 'unexpected tensor')} ({_summary(unexpected)})")
    if other:
        more = " ..." if len(other) > 2 else ""
        parts.append(f"{_count(len(other), 'tensor')} of another shape ({'; '.join(other[:2])}{more})")
    return "; ".join(parts) or None


def check_finite_weights(tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or infinite values (a damaged file or a diverged training run)."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"the weights in {source} contain NaN or infinite values ({_summary(bad)}); the file is "
                              "damaged or comes from a training run that diverged.")


def check_forward(model: ConditionalDiffusionModel | NoisyClassifier, card: dict[str, Any], source: str) -> None:
    """One forward pass on a small zero input: the output must have the expected shape and be finite.

    Catches what no card rule can (MONAI refusing a combination at run time) before any file is
    written or any case is analysed; the input is the smallest slice the network accepts (cheap),
    for a classifier one slice of the card's in-plane size (its last layer is sized for it).
    """
    classifier = is_classifier(card)
    args = card["network"]["encoder" if classifier else "unet"]
    if classifier:
        spatial = tuple(int(s) for s in card["preprocessing"]["in_plane_size"])
    else:
        spatial = (2 ** len(args["channels"]),) * int(args["spatial_dims"])  # the lowest level has 2 pixels per side
    device = next(model.parameters()).device
    x = torch.zeros((1, int(args["in_channels"])) + spatial, device=device)
    t = torch.zeros((1,), dtype=torch.long, device=device)
    try:
        with torch.inference_mode():
            if classifier:
                out = model(x, t)
            else:
                labels = torch.zeros((1,), dtype=torch.long, device=device)
                context = model.context(labels) if model.embed is not None else None
                out = model(x, t, context)
    except _BUILD_ERRORS as exc:
        raise CheckpointError(f"the network in {source} fails a test forward pass ({_first_line(exc)}); the model card "
                              "does not describe a working network.") from None
    expected = (1, int(args["out_channels"])) + (() if classifier else spatial)
    if tuple(out.shape) != expected:
        raise CheckpointError(f"the network in {source} returns shape {tuple(out.shape)} for an input of shape "
                              f"{tuple(x.shape)}; expected {expected}.")
    if not bool(torch.isfinite(out).all()):
        raise CheckpointError(f"the network in {source} returns NaN or infinite values on a test input; the weights "
                              "are damaged.")


def pick_device(requested: str = "auto") -> torch.device:
    """'auto' uses CUDA when present, else CPU; 'cpu', 'cuda' or 'cuda:N' force a device.

    A device that is not there is a ValueError sentence (a user's choice, not a crash).
    """
    if requested is not None and not isinstance(requested, str):
        raise ValueError(f"the device must be auto, cpu or cuda, got {requested!r}.")
    requested = (requested or "auto").strip().lower()
    if requested in ("auto", ""):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested in ("gpu", "cuda") or requested.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"a GPU was requested (device {requested!r}) but PyTorch sees no CUDA device; "
                             "choose 'auto' or 'cpu'.")
        if requested.startswith("cuda:"):
            index, count = requested[len("cuda:"):], torch.cuda.device_count()
            if not index.isdigit() or int(index) >= count:
                raise ValueError(f"there is no CUDA device {requested!r}: PyTorch sees {count} "
                                 f"(cuda:0 to cuda:{count - 1}); choose one of them, 'auto' or 'cpu'.")
        return torch.device("cuda" if requested == "gpu" else requested)
    if requested == "cpu":
        return torch.device("cpu")
    raise ValueError(f"unknown device {requested!r}; use auto, cpu or cuda.")


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16; read from Linux /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


PRECISIONS = ("auto", "fp32", "bf16")


def pick_precision(requested: str, device: torch.device) -> str:
    """Network arithmetic: 'fp32', or 'bf16' autocast (about twice as fast on CPUs with native bf16).

    'auto' picks bf16 only on a CPU with native bf16 support, fp32 everywhere else (including CUDA,
    where fp32 is already fast). The DDIM update itself always runs in fp32; only the network's
    matrix products use bf16. Results are deterministic on a given machine, but bf16 and fp32
    results differ slightly, so the precision used is recorded in every summary.
    """
    requested = (requested or "auto").lower()
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}; use {', '.join(PRECISIONS)}")
    if requested == "auto":
        return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"
    return requested


# ---- weights ------------------------------------------------------------------------------------
def load_weights(path: str | Path, card: dict[str, Any]) -> ConditionalDiffusionModel | NoisyClassifier:
    """Build the network the card describes and load the file's weights into it, strictly.

    Order: tensor names and shapes are compared with the card's network before anything is
    allocated; then the weights are read and checked for NaN / infinity; then the network is
    built, loaded and given one test forward pass. Every failure is a CheckpointError sentence.
    """
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"the weights in {path.name} cannot be read ({exc}); the file may be corrupted.") from exc
    problem = shape_mismatch(found, expected_shapes(card))
    if problem:
        raise CheckpointError(f"the weights in {path.name} do not match the network its model card describes: "
                              f"{problem}.")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"the weights in {path.name} cannot be read ({exc}); the file may be corrupted.") from exc
    check_finite_weights(state, path.name)
    model = build_model(card)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"the weights in {path.name} do not match the network its model card describes: "
            f"{' '.join(str(exc).splitlines()[:3])}"
        ) from exc
    model.eval()
    check_forward(model, card, path.name)
    return model


def save_checkpoint(model: nn.Module, card: dict[str, Any], path: str | Path, verify: bool = False) -> Path:
    """Write weights + card to ``path`` as one safetensors file, atomically (temp file then rename).

    ``verify``: read the written file back (card and weights, strictly, with a test forward pass)
    before it replaces ``path``, so a file that would not load is never left behind.
    """
    validate_card(card)
    path = Path(path)
    if not path.parent.is_dir():
        raise CheckpointError(f"cannot save {path.name}: the folder {path.parent} does not exist.")
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    try:
        with atomic_path(path, suffix=".safetensors") as tmp:
            save_file(tensors, str(tmp), metadata={CARD_KEY: json.dumps(card, sort_keys=True)})
            if verify:
                load_weights(tmp, read_card(tmp))
    except SafetensorError as exc:
        raise CheckpointError(f"cannot save the checkpoint to {path}: {exc}") from exc
    return path
