"""Import IgCONDA-PET reference checkpoints (``.pth``) into the project's checkpoint format.

The reference training script (IgCONDA-PET ``trainddp.py``) saves a ``.pth`` dict holding
``model_state_dict`` (a MONAI Generative 0.2 ``DiffusionModelUNet``, old key names),
``embed_state_dict`` (the class embedding, ``weight``: 3 x 64), ``scheduler_state_dict``
(usually empty: MONAI Generative schedulers keep their tensors outside the state dict) and
``optimizer_state_dict`` (ignored). METHODS.md section 1, last bullet.

Safety: the file is read with ``torch.load(..., weights_only=True)`` only. A pickle that would
build anything but tensors and plain containers (for example one whose ``__reduce__`` runs a
shell command) is refused with a :class:`~.checkpoint.CheckpointError`; nothing in it is executed.

Architecture: everything the tensor shapes determine is inferred (number of levels, channels per
level, attention levels, residual blocks per level, in/out channels, cross-attention and
embedding dimension, transformer layers, resblock up/down sampling); what they do not determine
falls back to METHODS.md (16 channels per attention head, 32 normalisation groups). Explicit
arguments override inferred values; the weights are then loaded strictly, so an architecture
that does not fit the tensors is an error, never a silently half-initialised network.

Public API: :func:`convert_reference_checkpoint`, :func:`import_checkpoint`, and
:func:`add_import_arguments` / :func:`run_import` for the ``import-checkpoint`` CLI subcommand.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import pickle
import pickletools
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .card import MAX_TIMESTEPS, REFERENCE_STEPS, UNET_ARGS, CheckpointError, default_card, validate_card, whole_number
from .checkpoint import existing_file, read_card
from .files import sha256_of
from .networks import (ConditionalDiffusionModel, build_model, check_finite_weights, check_forward, expected_shapes,
                       save_checkpoint)

REFERENCE_FORMAT = "IgCONDA-PET reference format"
REFERENCE_SUFFIXES = (".pth", ".pt", ".ckpt")

#: METHODS.md section 1 values used when the weights cannot tell
FALLBACK_CHANNELS = (64, 64, 64)
FALLBACK_ATTENTION = (False, True, True)
FALLBACK_NUM_RES_BLOCKS = 1
FALLBACK_HEAD_CHANNELS = 16
FALLBACK_CROSS_ATTENTION_DIM = 64
FALLBACK_NORM_GROUPS = 32
FALLBACK_SCHEDULER = {"num_train_timesteps": 1000, "schedule": "linear_beta", "beta_start": 1e-4, "beta_end": 0.02}

#: the reference's preprocessing (IgCONDA-PET preprocess_data.py), expressed in this project's card
REFERENCE_SPACING_MM = [6.108, 6.108, 9.0]  # 2.036 x 2.036 x 3 mm, 192 x 192 x 288 crop -> 64 x 64 x 96
REFERENCE_IN_PLANE_SIZE = [64, 64]
REFERENCE_PREPROCESSING_NOTE = (
    "The reference pipeline (IgCONDA-PET preprocess_data.py) resamples PET to 2.036 x 2.036 x 3 mm, "
    "centre-crops 192 x 192 x 288 voxels, scales each volume's intensities to [0, 1] by its own "
    "minimum and maximum (MONAI ScaleIntensity, i.e. roughly SUV / SUVmax of the cropped volume), "
    "resizes to 64 x 64 x 96 and takes the 96 axial slices (transposed when written to 2D files). "
    "This card reproduces the geometry (6.108 x 6.108 x 9 mm model grid, 64 x 64 slices) but can "
    "only express a fixed intensity scale: it divides SUV by the default demo scale and clips to "
    "[0, 1]. Images whose SUVmax differs from that scale are therefore presented to the network at "
    "a different intensity than in the reference, and the in-plane orientation convention of this "
    "project (LPS) may differ from the reference's slice files. Check the results on known cases "
    "before relying on this import; adjust preprocessing.intensity.scale with card_overrides if needed."
)


# ---- reading the file safely -----------------------------------------------------------------
#: globals every torch.save file refers to (tensor rebuilding, ordered dicts): not code of the file's own
_TENSOR_GLOBALS = ("torch.", "collections.OrderedDict", "_codecs.encode")


def _pickle_bytes(path: Path) -> bytes | None:
    """The pickle stream of a torch zip checkpoint (``*/data.pkl``) or of a raw pickle file."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                names = [n for n in zf.namelist() if n.endswith("data.pkl")]
                return zf.read(names[0]) if names else None
        except (zipfile.BadZipFile, OSError, KeyError, EOFError):
            return None
    try:
        return path.read_bytes()
    except OSError:
        return None


def _referenced_globals(data: bytes) -> list[str] | None:
    """Callables/classes a pickle stream refers to, without executing it (None: not a pickle)."""
    names: list[str] = []
    strings: list[str] = []
    try:
        for op, arg, _pos in pickletools.genops(io.BytesIO(data)):
            if op.name == "GLOBAL" and isinstance(arg, str):
                names.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL":
                names.append(".".join(strings[-2:]) if len(strings) >= 2 else "<unknown>")
            elif op.name in ("INST",) and isinstance(arg, str):
                names.append(arg.replace(" ", "."))
            elif isinstance(arg, str):
                strings.append(arg)
            if op.name == "STOP":
                break
    except Exception:  # noqa: BLE001 - any parse failure means "not a readable pickle"
        return None
    return names


def _refuse_code(path: Path, detail: str) -> CheckpointError:
    return CheckpointError(
        f"{path.name} contains Python code or objects that are not plain tensors ({detail}); "
        "it will not be executed or loaded. Only checkpoints made of tensors and plain containers "
        "(like the IgCONDA-PET reference .pth files) can be imported. If you trust the file's "
        "origin, re-save just its state dicts with torch.save in a trusted environment."
    )


def _load_pth(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``; every failure becomes a CheckpointError."""
    try:
        with warnings_silenced():
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        match = re.search(r"Unsupported global: GLOBAL (\S+)", message) or re.search(
            r"unsupported GLOBAL (\S+)", message
        )
        if match:
            raise _refuse_code(path, f"it refers to {match.group(1).rstrip('.,')}") from None
        data = _pickle_bytes(path)
        names = _referenced_globals(data) if data else None
        foreign = sorted({n for n in names or [] if not n.startswith(_TENSOR_GLOBALS)})
        if foreign:
            raise _refuse_code(path, f"it refers to {', '.join(foreign[:3])}") from None
        raise CheckpointError(
            f"{path.name} is not a readable PyTorch checkpoint (the file may be corrupted or of another "
            "kind). An IgCONDA-PET reference checkpoint is a .pth file written by torch.save."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, AttributeError, ImportError,
            TypeError, KeyError, IndexError) as exc:
        reason = str(exc).splitlines()[0].split(". ")[0].rstrip(".") if str(exc) else type(exc).__name__
        if isinstance(exc, EOFError):
            reason = "the file ends early or is empty"
        raise CheckpointError(
            f"{path.name} cannot be read as a PyTorch checkpoint ({reason}); the file may be corrupted "
            "or truncated."
        ) from None
    except Exception as exc:  # noqa: BLE001 - whatever else torch raises, the answer is the same
        raise CheckpointError(
            f"{path.name} cannot be read as a PyTorch checkpoint ({type(exc).__name__}: {exc}); the file may be "
            "corrupted or of another kind."
        ) from None


@contextlib.contextmanager
def warnings_silenced():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ---- architecture inference ------------------------------------------------------------------
def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a ``module.`` prefix (DataParallel / DDP wrappers) when every key has it."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def _indices(state: Mapping[str, Any], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in state for m in [rx.match(k)] if m}
    return sorted(found)


def infer_unet_args(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, Any], list[str]]:
    """DiffusionModelUNet arguments determined by the tensor shapes (old or new key names).

    Returns (arguments, names of the arguments that could be inferred). Raises CheckpointError
    when the tensors are not those of a MONAI (Generative) DiffusionModelUNet.
    """
    def need(key: str) -> torch.Tensor:
        if key not in state:
            raise CheckpointError(
                f"model_state_dict has no '{key}': these weights are not those of a MONAI DiffusionModelUNet."
            )
        return state[key]

    conv_in = need("conv_in.conv.weight")
    out_conv = need("out.2.conv.weight")
    if conv_in.ndim not in (4, 5):
        raise CheckpointError(f"conv_in weight has {conv_in.ndim} dimensions; expected a 2D or 3D convolution.")
    args: dict[str, Any] = {
        "spatial_dims": int(conv_in.ndim - 2),
        "in_channels": int(conv_in.shape[1]),
        "out_channels": int(out_conv.shape[0]),
    }
    inferred = ["spatial_dims", "in_channels", "out_channels"]
    levels = _indices(state, r"down_blocks\.(\d+)\.")
    if not levels or levels != list(range(len(levels))):
        raise CheckpointError("model_state_dict has no consecutive down_blocks: not a MONAI DiffusionModelUNet.")
    channels, attention, res_blocks = [], [], []
    for i in levels:
        res = _indices(state, rf"down_blocks\.{i}\.resnets\.(\d+)\.")
        if not res:
            raise CheckpointError(f"down_blocks.{i} has no residual blocks: not a MONAI DiffusionModelUNet.")
        res_blocks.append(len(res))
        channels.append(int(need(f"down_blocks.{i}.resnets.{res[-1]}.conv2.conv.weight").shape[0]))
        attention.append(bool(_indices(state, rf"down_blocks\.{i}\.attentions\.(\d+)\.")))
    args["channels"] = channels
    args["attention_levels"] = attention
    args["num_res_blocks"] = res_blocks[0] if len(set(res_blocks)) == 1 else res_blocks
    inferred += ["channels", "attention_levels", "num_res_blocks"]

    to_k = [k for k in state if re.search(r"transformer_blocks\.\d+\.attn2\.to_k\.weight$", k)]
    if not to_k:
        raise CheckpointError(
            "model_state_dict has no cross-attention weights (attn2.to_k): this UNet is not class-conditioned, "
            "so it is not an IgCONDA-PET model."
        )
    dims = {int(state[k].shape[1]) for k in to_k}
    if len(dims) != 1:
        raise CheckpointError(f"the cross-attention layers disagree on the context dimension ({sorted(dims)}).")
    args["with_conditioning"] = True
    args["cross_attention_dim"] = dims.pop()
    inferred.append("cross_attention_dim")
    layers = _indices(state, r"middle_block\.attention\.transformer_blocks\.(\d+)\.")
    if layers:
        args["transformer_num_layers"] = len(layers)
        inferred.append("transformer_num_layers")
    if len(levels) > 1:
        if any(k.startswith("down_blocks.0.downsampler.norm1.") for k in state):
            args["resblock_updown"] = True
        elif any(k.startswith("down_blocks.0.downsampler.op.") for k in state):
            args["resblock_updown"] = False
        if "resblock_updown" in args:
            inferred.append("resblock_updown")
    if "class_embedding.weight" in state:
        args["num_class_embeds"] = int(state["class_embedding.weight"].shape[0])
        inferred.append("num_class_embeds")
    return args, inferred


def old_key_name(new_key: str) -> str:
    """The MONAI Generative 0.2 name of a MONAI >= 1.4 DiffusionModelUNet key.

    Exact inverse of the renames ``DiffusionModelUNet.load_old_state_dict`` performs.
    """
    key = new_key
    if "transformer_blocks" in key and ".out_proj." in key:
        return key.replace(".out_proj.", ".to_out.0.")
    if ".attn.out_proj." in key:
        return key.replace(".attn.out_proj.", ".proj_attn.")
    for part in ("to_q", "to_k", "to_v"):
        if f".attn.{part}." in key:
            return key.replace(f".attn.{part}.", f".{part}.")
    if "postconv" in key:
        return key.replace("postconv", "conv")
    return key


def _key_summary(keys: set[str], limit: int = 4) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _match_unet(target: Mapping[str, tuple[int, ...]], state: Mapping[str, torch.Tensor],
                path: Path) -> tuple[str, dict[str, str]]:
    """Which key naming ``state`` uses and the file key -> network key map, after checking every name and
    shape against ``target`` (the network's tensor shapes: nothing is allocated before this passes)."""
    hint = (" The architecture was inferred from the tensor shapes; if you passed channels or attention "
            "levels explicitly, check them against the training script's values.")
    if set(state) == set(target):
        naming = "MONAI >= 1.4 key names"
        mapping = {k: k for k in target}
    else:
        naming = "MONAI Generative 0.2 key names"
        mapping = {old_key_name(k): k for k in target}
        missing = set(mapping) - set(state)
        unexpected = set(state) - set(mapping)
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} tensors ({_key_summary(missing)})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected tensors ({_key_summary(unexpected)})")
            raise CheckpointError(
                f"the weights in {path.name} do not fit the network architecture: {'; '.join(parts)}.{hint}"
            )
    bad = [
        f"{old} {tuple(state[old].shape)} vs {tuple(target[new])}"
        for old, new in mapping.items()
        if tuple(state[old].shape) != tuple(target[new])
    ]
    if bad:
        raise CheckpointError(
            f"the weights in {path.name} do not fit the network architecture: {len(bad)} tensors have other "
            f"shapes ({'; '.join(bad[:3])}).{hint}"
        )
    return naming, mapping


def _load_unet(unet: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, mapping: dict[str, str]) -> None:
    """Load old- or new-named weights (already matched by :func:`_match_unet`) into ``unet``, strictly."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # load_old_state_dict prints progress
            unet.load_old_state_dict(dict(state))
    except (RuntimeError, KeyError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"the weights in {path.name} cannot be converted: {first}") from None
    # load_old_state_dict keeps initial values for keys it does not find: make sure none was left
    loaded = unet.state_dict()
    for old, new in mapping.items():
        if not torch.equal(loaded[new].to(state[old].dtype), state[old]):
            raise CheckpointError(
                f"converting {path.name}: tensor {old} did not arrive in {new}; the file's key naming is not "
                "the IgCONDA-PET reference's."
            )


# ---- scheduler ---------------------------------------------------------------------------------
_SCHEDULE_NAMES = {"linear": "linear_beta", "linear_beta": "linear_beta", "scaled_linear": "scaled_linear_beta",
                   "scaled_linear_beta": "scaled_linear_beta", "sigmoid_beta": "sigmoid_beta", "cosine": "cosine"}


def scheduler_from_state(state: Any, path: Path) -> tuple[dict[str, Any], str]:
    """The card's scheduler section from ``scheduler_state_dict`` (METHODS.md defaults when absent)."""
    sched = dict(FALLBACK_SCHEDULER)
    if not isinstance(state, Mapping) or not state:
        return sched, ("not stored in the file (an empty scheduler_state_dict is normal for MONAI Generative "
                       "schedulers); METHODS.md defaults used: 1000 steps, linear beta 1e-4..0.02")
    found = []

    def plain(value):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            return value.item()
        return value

    # values are copied as stored (no int()/float()): validate_card judges them and names the field
    if "num_train_timesteps" in state:
        sched["num_train_timesteps"] = plain(state["num_train_timesteps"])
        found.append("num_train_timesteps")
    for key in ("schedule", "beta_schedule"):
        if isinstance(state.get(key), str):
            name = _SCHEDULE_NAMES.get(state[key])
            if name is None:
                raise CheckpointError(f"{path.name} uses an unsupported noise schedule {state[key]!r}.")
            sched["schedule"] = name
            found.append("schedule")
    for key in ("beta_start", "beta_end"):
        if key in state:
            sched[key] = plain(state[key])
            found.append(key)
    betas = state.get("betas")
    if betas is None and isinstance(state.get("alphas_cumprod"), torch.Tensor):
        abar = state["alphas_cumprod"].double().flatten()
        betas = 1.0 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
    if isinstance(betas, torch.Tensor) and betas.ndim == 1 and len(betas) > 1:
        # the card's rule for T, before a schedule of that length is fitted (no allocation for an absurd one)
        try:
            whole_number(len(betas), f"the noise schedule stored in {path.name} (its number of betas)", 2,
                         MAX_TIMESTEPS)
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None
        b = betas.double()
        start, end = float(b[0]), float(b[-1])
        if torch.allclose(b, torch.linspace(start, end, len(b), dtype=torch.float64), rtol=1e-4, atol=1e-7):
            name = "linear_beta"
        elif torch.allclose(b, torch.linspace(start**0.5, end**0.5, len(b), dtype=torch.float64) ** 2,
                            rtol=1e-4, atol=1e-7):
            name = "scaled_linear_beta"
        else:
            raise CheckpointError(
                f"{path.name} stores a noise schedule that is neither linear nor scaled-linear; it cannot be "
                "expressed in a model card."
            )
        sched.update(num_train_timesteps=len(b), schedule=name, beta_start=round(start, 10), beta_end=round(end, 10))
        found.append("betas")
    if sched["schedule"] == "cosine":  # no beta range: drop the defaults' (values stored in the file stay: refused)
        for key in ("beta_start", "beta_end"):
            if key not in found:
                sched.pop(key, None)
    if not found:
        return sched, ("scheduler_state_dict holds no schedule parameters; METHODS.md defaults used: 1000 steps, "
                       "linear beta 1e-4..0.02")
    return sched, f"read from scheduler_state_dict ({', '.join(dict.fromkeys(found))})"


# ---- the card ----------------------------------------------------------------------------------
def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "checkpoint"


def _as_levels(values: Sequence[Any]) -> list[bool]:
    return [bool(int(v)) if not isinstance(v, bool) else v for v in values]


def reference_card(path: Path, unet_args: dict[str, Any], embed_shape: tuple[int, int], scheduler: dict[str, Any],
                   notes: dict[str, str]) -> dict[str, Any]:
    """A complete model card for an imported reference checkpoint."""
    card = default_card(
        channels=unet_args["channels"], attention_levels=unet_args["attention_levels"],
        spacing_mm=REFERENCE_SPACING_MM, in_plane_size=REFERENCE_IN_PLANE_SIZE,
    )
    card["id"] = f"igconda-pet-reference-{_slug(path.stem)}"
    card["name"] = f"IgCONDA-PET reference model ({path.name})"
    card["network"]["unet"] = {k: v for k, v in unet_args.items() if k in UNET_ARGS}
    card["network"]["class_embedding"] = {"num_classes": int(embed_shape[0]), "dim": int(embed_shape[1])}
    card["scheduler"] = scheduler
    # the paper's D = 400 of T = 1000; a shorter schedule keeps the same fraction (a bad T is refused by the card)
    timesteps = scheduler.get("num_train_timesteps")
    noise_level = 400
    if isinstance(timesteps, int) and not isinstance(timesteps, bool) and 2 <= timesteps <= noise_level:
        noise_level = max(1, round(0.4 * timesteps))
        notes = {**notes, "scheduler": f"{notes['scheduler']}; default noise level {noise_level} (0.4 T, as the "
                                       "paper's 400 of 1000)"}
    card["inference_defaults"].update({"noise_level": noise_level, "guidance_scale": 3.0, "steps": REFERENCE_STEPS})
    card["provenance"] = {
        "source": f"imported from {path.name} ({REFERENCE_FORMAT})",
        "source_file": path.name,
        "source_sha256": sha256_of(path),
        "source_format": ("IgCONDA-PET reference .pth: model_state_dict (MONAI Generative 0.2 DiffusionModelUNet "
                          "key names, converted with MONAI DiffusionModelUNet.load_old_state_dict), "
                          "embed_state_dict, scheduler_state_dict"),
        "architecture": notes["architecture"],
        "scheduler": notes["scheduler"],
        "weights": notes["weights"],
        "training_data": "not recorded in the reference checkpoint",
        "reference_preprocessing": REFERENCE_PREPROCESSING_NOTE,
        "note": ("Intensity normalisation differs from the reference: the reference scales each volume by "
                 "its own maximum, this card uses a fixed SUV scale (preprocessing.intensity.scale). "
                 "Imported research model; not for clinical use."),
        "torch": torch.__version__,
    }
    card["not_for_clinical_use"] = True
    return card


# ---- public API --------------------------------------------------------------------------------
def convert_reference_checkpoint(
    path: str | Path,
    *,
    channels: Sequence[int] | None = None,
    attention_levels: Sequence[Any] | None = None,
    num_res_blocks: int | Sequence[int] | None = None,
    num_head_channels: int = FALLBACK_HEAD_CHANNELS,
    card_overrides: Mapping[str, Any] | None = None,
) -> tuple[ConditionalDiffusionModel, dict[str, Any]]:
    """Read an IgCONDA-PET reference ``.pth`` (weights only) -> (network in eval mode, model card).

    ``channels``, ``attention_levels`` (booleans or 0/1) and ``num_res_blocks`` default to what the
    tensor shapes say (METHODS.md values only if a shape cannot tell); giving them overrides the
    inference. ``num_head_channels`` cannot be recovered from weights (METHODS.md: 16).
    ``card_overrides`` is deep-merged into the card before the network is built (for example
    ``{"preprocessing": {"intensity": {"scale": 10.0}}}`` or ``{"network": {"unet":
    {"norm_num_groups": 16}}}``). Every problem raises :class:`CheckpointError`.
    """
    path = existing_file(path)
    blob = _load_pth(path)
    if not isinstance(blob, Mapping):
        raise CheckpointError(
            f"{path.name} holds a {type(blob).__name__}, not a checkpoint dict; an IgCONDA-PET reference "
            "checkpoint is a dict with model_state_dict, embed_state_dict and scheduler_state_dict."
        )
    if "model_state_dict" not in blob:
        looks_bare = any(isinstance(k, str) and k.startswith(("conv_in.", "module.conv_in.")) for k in blob)
        extra = (" It looks like a bare UNet state dict; wrap it as {'model_state_dict': ..., 'embed_state_dict': "
                 "...} with torch.save." if looks_bare else "")
        keys = ", ".join(sorted(str(k) for k in blob)[:6]) or "none"
        raise CheckpointError(
            f"{path.name} has no 'model_state_dict' entry (entries: {keys}); it is not an IgCONDA-PET reference "
            f"checkpoint.{extra}"
        )
    state = blob["model_state_dict"]
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(f"'model_state_dict' in {path.name} is not a non-empty dict of tensors.")
    not_tensors = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"'model_state_dict' in {path.name} holds entries that are not tensors ({_key_summary(set(not_tensors))})."
        )
    state = _strip_prefix(dict(state))

    embed_state = blob.get("embed_state_dict")
    if not isinstance(embed_state, Mapping) or "weight" not in embed_state:
        raise CheckpointError(
            f"{path.name} has no class embedding ('embed_state_dict' with a 'weight' tensor); IgCONDA-PET "
            "needs it to condition on healthy / unhealthy."
        )
    embed_state = _strip_prefix(dict(embed_state))
    embed_w = embed_state.get("weight")
    if not isinstance(embed_w, torch.Tensor) or embed_w.ndim != 2 or embed_w.shape[0] < 2:
        raise CheckpointError(
            f"'embed_state_dict.weight' in {path.name} should be a (classes x dim) matrix with at least 2 classes; "
            f"got {tuple(embed_w.shape) if isinstance(embed_w, torch.Tensor) else type(embed_w).__name__}."
        )
    if set(embed_state) != {"weight"}:
        raise CheckpointError(
            f"'embed_state_dict' in {path.name} has unexpected entries: {_key_summary(set(embed_state) - {'weight'})}."
        )

    unet_args, inferred = infer_unet_args(state)
    given = []
    if channels is not None:
        unet_args["channels"] = [int(c) for c in channels]
        given.append("channels")
    if attention_levels is not None:
        unet_args["attention_levels"] = _as_levels(attention_levels)
        given.append("attention_levels")
    if num_res_blocks is not None:
        unet_args["num_res_blocks"] = (int(num_res_blocks) if isinstance(num_res_blocks, int)
                                       else [int(n) for n in num_res_blocks])
        given.append("num_res_blocks")
    unet_args["num_head_channels"] = int(num_head_channels)
    unet_args["norm_num_groups"] = FALLBACK_NORM_GROUPS
    unet_args.setdefault("cross_attention_dim", FALLBACK_CROSS_ATTENTION_DIM)
    if int(embed_w.shape[1]) != int(unet_args["cross_attention_dim"]):
        raise CheckpointError(
            f"the class embedding in {path.name} has dimension {int(embed_w.shape[1])} but the UNet's cross-attention "
            f"expects {unet_args['cross_attention_dim']}; the two parts do not belong together."
        )

    scheduler, sched_note = scheduler_from_state(blob.get("scheduler_state_dict"), path)
    notes = {
        "architecture": (
            f"inferred from tensor shapes: {', '.join(k for k in inferred if k not in given)}; "
            f"given explicitly: {', '.join(given) or 'none'}; METHODS.md values (not recoverable from weights): "
            f"num_head_channels {unet_args['num_head_channels']}, norm_num_groups {unet_args['norm_num_groups']}"
        ),
        "scheduler": sched_note,
        "weights": "",
    }
    card = reference_card(path, unet_args, tuple(embed_w.shape), scheduler, notes)
    if card_overrides:
        _deep_merge(card, card_overrides)
    try:
        validate_card(card)
    except CheckpointError as exc:
        raise CheckpointError(f"{path.name} cannot be imported: {exc}") from None
    # names and shapes first, on the meta device: a wrong architecture allocates nothing
    target = {k[len("unet."):]: v for k, v in expected_shapes(card).items() if k.startswith("unet.")}
    naming, mapping = _match_unet(target, state, path)
    check_finite_weights(state, path.name)
    check_finite_weights({"embed_state_dict.weight": embed_w}, path.name)
    model = build_model(card)
    _load_unet(model.unet, state, path, mapping)
    try:
        model.embed.load_state_dict({"weight": embed_w}, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"the class embedding in {path.name} cannot be loaded: {str(exc).splitlines()[0]}") from None
    model.eval()
    check_forward(model, card, path.name)
    card["provenance"]["weights"] = f"{naming}; loaded strictly ({len(state)} UNet tensors + class embedding)"
    return model, card


def import_checkpoint(src: str | Path, dst: str | Path, **kwargs: Any) -> Path:
    """Convert a reference ``.pth`` and write it as a project ``.safetensors`` checkpoint; returns ``dst``.

    Keyword arguments go to :func:`convert_reference_checkpoint`. The source is never overwritten,
    the destination folder must exist, and the written file is read back and checked.
    """
    src = existing_file(src)
    dst = Path(dst)
    if dst.suffix.lower() != ".safetensors":
        raise CheckpointError(f"the output file must end in .safetensors (got {dst.name}).")
    if not dst.parent.is_dir():
        raise CheckpointError(f"the output folder {dst.parent} does not exist; create it first.")
    if dst.is_dir():
        raise CheckpointError(f"{dst} is a folder; give the output file name (.safetensors).")
    if dst.resolve() == src.resolve() or (dst.exists() and dst.samefile(src)):
        raise CheckpointError("the output file is the input file; choose another output name.")
    model, card = convert_reference_checkpoint(src, **kwargs)  # card validated, test forward pass done
    # written beside dst, read back (card and weights, strictly) and only then renamed: nothing on failure
    save_checkpoint(model, card, dst, verify=True)
    return dst


# ---- CLI ---------------------------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 64,64,64; got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers such as 64,64,64; got {text!r}")
    return values


def _level_list(text: str) -> list[bool]:
    table = {"0": False, "1": True, "false": False, "true": True, "f": False, "t": True, "no": False, "yes": True}
    values = [v.strip().lower() for v in text.split(",") if v.strip() != ""]
    if not values or any(v not in table for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated 0/1 values such as 0,1,1; got {text!r}")
    return [table[v] for v in values]


def add_import_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``import-checkpoint`` (also sets ``func=run_import`` on the parser)."""
    parser.add_argument("--input", required=True, help="IgCONDA-PET reference checkpoint (.pth)")
    parser.add_argument("--output", required=True, help="project checkpoint to write (.safetensors)")
    parser.add_argument("--channels", type=_int_list, default=None,
                        help="UNet channels per level, e.g. 64,64,64 (default: inferred from the weights)")
    parser.add_argument("--attention", type=_level_list, default=None,
                        help="attention per level as 0/1, e.g. 0,1,1 (default: inferred from the weights)")
    parser.add_argument("--num-res-blocks", type=int, default=None,
                        help="residual blocks per level (default: inferred from the weights)")
    parser.add_argument("--num-head-channels", type=int, default=FALLBACK_HEAD_CHANNELS,
                        help=f"channels per attention head (not stored in the weights; default {FALLBACK_HEAD_CHANNELS})")
    parser.set_defaults(func=run_import)
    return parser


def run_import(args: argparse.Namespace) -> int:
    """Run ``import-checkpoint``: prints a summary and returns 0; a refusal raises CheckpointError (the CLI's
    ``main`` prints it as one ``error:`` sentence and exits 2, like every other verb)."""
    out = import_checkpoint(
        args.input, args.output, channels=args.channels, attention_levels=args.attention,
        num_res_blocks=getattr(args, "num_res_blocks", None),
        num_head_channels=getattr(args, "num_head_channels", FALLBACK_HEAD_CHANNELS),
    )
    card = read_card(out)
    unet = card["network"]["unet"]
    print(f"wrote {out} (model id {card['id']}; channels {unet['channels']}, attention "
          f"{[int(a) for a in unet['attention_levels']]}; scheduler {card['scheduler']['schedule']} "
          f"{card['scheduler']['num_train_timesteps']} steps)")
    print("note: " + card["provenance"]["note"])
    return 0
