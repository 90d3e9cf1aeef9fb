"""MONAI network builders driven by the model card (the card is the only source of architecture).

A conditional diffusion model (METHODS.md, shared building blocks) is a 2D/3D
``DiffusionModelUNet`` with cross-attention plus a learned class embedding (3 x 64, index 0 =
null fixed at zero) whose output is fed as a context sequence of length 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import DiffusionModelUNet
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .card import CheckpointError, validate_card
from .checkpoint import CARD_KEY
from .files import atomic_path

#: DiffusionModelUNet arguments a card may set (anything else is refused, so a typo is not ignored).
UNET_ARGS = {
    "spatial_dims", "in_channels", "out_channels", "num_res_blocks", "channels", "attention_levels",
    "norm_num_groups", "norm_eps", "resblock_updown", "num_head_channels", "with_conditioning",
    "transformer_num_layers", "cross_attention_dim", "num_class_embeds", "upcast_attention",
    "dropout_cattn", "include_fc", "use_combined_linear",
}


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


def build_unet(args: dict[str, Any]) -> DiffusionModelUNet:
    unknown = set(args) - UNET_ARGS
    if unknown:
        raise ValueError(f"model card names unknown network arguments: {sorted(unknown)}")
    kwargs = dict(args)
    for key in ("channels", "attention_levels", "num_res_blocks"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    # scaled-dot-product attention: same maths, faster on CPU and GPU
    return DiffusionModelUNet(**kwargs, use_flash_attention=True)


def build_model(card: dict[str, Any]) -> ConditionalDiffusionModel:
    """Build the (untrained) network described by a model card's ``network`` section."""
    net = card["network"]
    unet = build_unet(net["unet"])
    emb_cfg = net.get("class_embedding")
    embed = None
    if emb_cfg is not None:
        embed = nn.Embedding(int(emb_cfg["num_classes"]), int(emb_cfg["dim"]), padding_idx=0)
    return ConditionalDiffusionModel(unet, embed)


def pick_device(requested: str = "auto") -> torch.device:
    """'auto' uses CUDA when present, else CPU; 'cpu'/'cuda' force a device (clear error if absent)."""
    requested = (requested or "auto").lower()
    if requested in ("auto", ""):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested in ("gpu", "cuda") or requested.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise RuntimeError("a GPU was requested but PyTorch sees no CUDA device; choose 'auto' or 'cpu'.")
        return torch.device("cuda" if requested == "gpu" else requested)
    if requested == "cpu":
        return torch.device("cpu")
    raise ValueError(f"unknown device {requested!r}; use auto, cpu or cuda")


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
def load_weights(path: str | Path, card: dict[str, Any]) -> ConditionalDiffusionModel:
    """Build the network the card describes and load the file's weights into it, strictly."""
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


def save_checkpoint(model: nn.Module, card: dict[str, Any], path: str | Path) -> Path:
    """Write weights + card to ``path`` as one safetensors file, atomically (temp file then rename)."""
    validate_card(card)
    path = Path(path)
    if not path.parent.is_dir():
        raise CheckpointError(f"cannot save {path.name}: the folder {path.parent} does not exist.")
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    try:
        with atomic_path(path, suffix=".safetensors") as tmp:
            save_file(tensors, str(tmp), metadata={CARD_KEY: json.dumps(card, sort_keys=True)})
    except SafetensorError as exc:
        raise CheckpointError(f"cannot save the checkpoint to {path}: {exc}") from exc
    return path
