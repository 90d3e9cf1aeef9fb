"""Training loops on phantom (or user) slices: the IgCONDA-PET conditional diffusion model and the
noise-conditioned classifier of classifier guidance.

IgCONDA-PET (:func:`train`): epsilon-prediction MSE with classifier-free condition dropout 0.15
(IgCONDA-PET section 2.2, 3.2). Classifier (:func:`train_classifier`, METHODS.md section 2):
cross-entropy of healthy vs unhealthy on q_sample(x, t) with t uniform in [0, T), as Wolleb et
al.'s reference code. Both use the paper's augmentations (translation, rotation, scaling,
elastic, gamma; MONAI transforms), the same balanced healthy/unhealthy batches, periodic
validation, best-checkpoint selection and resumable state (weights, optimiser, step and RNG
states stored as safetensors + JSON: resuming never unpickles anything).
"""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .card import classifier_card, default_card, validate_card
from .diffusion import monai_scheduler
from .export import write_json
from .files import atomic_path
from .networks import build_model, pick_device, save_checkpoint
from .ct_phantoms import make_ct_phantom
from .phantoms import DEFAULT_SHAPE_IJK, DEFAULT_SPACING, make_phantom
from .preprocessing import crop_grids, mask_to_model_space, to_model_space
from .roi import roi_mask

#: model-space fraction of a pixel covered by lesion above which a slice counts as unhealthy
UNHEALTHY_FRACTION = 0.25
#: the slice labels :func:`phantom_slices` gives (the IgCONDA card's numbers)
HEALTHY, UNHEALTHY = 1, 2
#: validation slices per class (healthy, unhealthy), drawn once with a fixed seed
VAL_SLICES_PER_CLASS = 64
#: where the classifier's validation accuracy is reported, as fractions of T: [0, 0.1T), [0.1T, 0.25T), ...
ACCURACY_BAND_EDGES = (0.0, 0.1, 0.25, 0.5, 1.0)


# ---- data -----------------------------------------------------------------------------------
def _case_slices(args) -> tuple[np.ndarray, np.ndarray]:
    seed, prep, shape, spacing, margin_mm = args
    torch.set_num_threads(1)
    if "crop" in prep:  # a CT organ model: crops of an abdominal CT phantom around its organs, as in use
        case = make_ct_phantom(seed)
        region = roi_mask(case.organs, prep["crop"]["organs"], None, margin_mm).voxels
        x, grid = to_model_space(case.ct, prep, crop_grids(case.ct, prep, region))
    else:
        case = make_phantom(seed, shape_ijk=shape, spacing=spacing)
        x, grid = to_model_space(case.pet, prep)
    frac = mask_to_model_space(case.lesion_labels, grid)
    labels = np.where(frac.reshape(len(frac), -1).max(axis=1) >= UNHEALTHY_FRACTION, 2, 1).astype(np.uint8)
    return x.astype(np.float16), labels


def phantom_slices(seeds, prep, cache_dir: Path | None = None, workers: int = 2,
                   shape=DEFAULT_SHAPE_IJK, spacing=DEFAULT_SPACING, log=print,
                   margin_mm: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Model-space slices and labels (1 healthy, 2 unhealthy) of phantom cases ``seeds`` (cached): whole-body PET
    phantoms, or for a card with ``preprocessing.crop`` the organ crops of abdominal CT phantoms
    (:func:`.ct_phantoms.make_ct_phantom`; organs grown by ``margin_mm``, the card's ROI margin)."""
    seeds = [int(s) for s in seeds]
    digest = hashlib.sha1(json.dumps([prep, list(shape), list(spacing), margin_mm],
                                     sort_keys=True).encode()).hexdigest()[:10]
    key = f"slices_{seeds[0]}_{seeds[-1]}_{len(seeds)}_{digest}"
    if cache_dir is not None:
        path = Path(cache_dir) / f"{key}.npz"
        if path.exists():
            with np.load(path, allow_pickle=False) as z:
                return z["images"], z["labels"]
    t0 = time.time()
    jobs = [(s, prep, tuple(shape), tuple(spacing), float(margin_mm)) for s in seeds]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(_case_slices, jobs, chunksize=4))
    else:
        parts = [_case_slices(j) for j in jobs]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    log(f"made {len(seeds)} phantom cases -> {len(images)} slices ({int((labels == 2).sum())} unhealthy) "
        f"in {time.time() - t0:.0f} s")
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez(tmp, images=images, labels=labels)
    return images, labels


def augmenter(seed: int):
    """IgCONDA-PET section 3.2 augmentations as MONAI transforms (seeded)."""
    from monai.transforms import Compose, Rand2DElastic, RandAdjustContrast, RandAffine

    aug = Compose([
        RandAffine(prob=0.5, rotate_range=np.pi / 12, translate_range=(5, 5), scale_range=(0.1, 0.1),
                   padding_mode="zeros"),
        Rand2DElastic(prob=0.2, spacing=(16, 16), magnitude_range=(0.0, 1.0), padding_mode="zeros"),
        RandAdjustContrast(prob=0.3, gamma=(0.8, 1.25)),
    ])
    aug.set_random_state(seed=seed)
    return aug


def _training_data(cfg: "TrainConfig", card: dict[str, Any], data, out: Path, log):
    """(train_x, train_y, val_x, val_y, pools): phantom slices of cfg's seeds (or ``data``), and the
    indices of the healthy and unhealthy training slices."""
    if data is None:
        cache = out / "cache"
        prep = card["preprocessing"]
        margin = float(prep["crop"].get("margin_mm", 0.0)) if "crop" in prep else 0.0
        train_x, train_y = phantom_slices(range(*cfg.train_seeds), prep, cache, cfg.workers, log=log, margin_mm=margin)
        val_x, val_y = phantom_slices(range(*cfg.val_seeds), prep, cache, cfg.workers, log=log, margin_mm=margin)
    else:
        (train_x, train_y), (val_x, val_y) = data
    pools = {HEALTHY: np.flatnonzero(train_y == HEALTHY), UNHEALTHY: np.flatnonzero(train_y == UNHEALTHY)}
    if len(pools[UNHEALTHY]) == 0 or len(pools[HEALTHY]) == 0:
        raise ValueError("training data needs both healthy and unhealthy slices")
    return train_x, train_y, val_x, val_y, pools


def _augmented(idx: np.ndarray, train_x, aug, device):
    """(indices, x0): the slices ``idx``, augmented, clamped to [0, 1], on ``device``."""
    batch = np.stack([np.asarray(aug(train_x[i][None].astype(np.float32))) for i in idx])
    return idx, torch.from_numpy(batch).clamp(0, 1).to(device)


def _balanced_batch(rng: np.random.Generator, pools, batch_size: int, train_x, aug, device):
    """(indices, x0): half unhealthy, half healthy slices, augmented, clamped to [0, 1]."""
    half = batch_size // 2
    idx = np.concatenate([rng.choice(pools[UNHEALTHY], half), rng.choice(pools[HEALTHY], batch_size - half)])
    return _augmented(idx, train_x, aug, device)


#: a healthy slice paired with an unhealthy one for the classifier lies within this many model slices of the
#: same body position (6 mm slices: +-18 mm), so anatomy alone cannot tell the classes apart
POSITION_WINDOW = 3


def healthy_near(labels: np.ndarray, n_cases: int, window: int = POSITION_WINDOW) -> list[np.ndarray] | None:
    """For each body position (a slice's index within its phantom case: every phantom has the same grid), the
    healthy slices within ``window`` positions of it; None when the slices do not split evenly into cases."""
    if n_cases < 1 or len(labels) % n_cases:
        return None
    per_case = len(labels) // n_cases
    position = np.arange(len(labels)) % per_case
    healthy = np.flatnonzero(labels == HEALTHY)
    near = [healthy[np.abs(position[healthy] - p) <= window] for p in range(per_case)]
    return [idx if len(idx) else healthy for idx in near]


def matched_pairs(rng: np.random.Generator, unhealthy: np.ndarray, near: list[np.ndarray]) -> np.ndarray:
    """A healthy slice of the same body position (:func:`healthy_near`) for each of the ``unhealthy`` slices."""
    per_case = len(near)
    return np.array([rng.choice(near[int(u) % per_case]) for u in unhealthy], dtype=np.int64)


def _classifier_batch(rng: np.random.Generator, pools, near, batch_size: int, train_x, aug, device):
    """(indices, x0) of a classifier batch: half unhealthy slices, half healthy ones of the same body positions
    (:func:`matched_pairs`; any healthy slices when ``near`` is None), augmented, clamped to [0, 1]."""
    if near is None:
        return _balanced_batch(rng, pools, batch_size, train_x, aug, device)
    unhealthy = rng.choice(pools[UNHEALTHY], batch_size // 2)
    return _augmented(np.concatenate([unhealthy, matched_pairs(rng, unhealthy, near)]), train_x, aug, device)


def _validation_slices(val_x, val_y, device, near: list[np.ndarray] | None = None):
    """(x, labels): up to :data:`VAL_SLICES_PER_CLASS` healthy and unhealthy validation slices, fixed seed; with
    ``near`` (:func:`healthy_near`) each healthy slice is one of the same body position as an unhealthy one."""
    vg = np.random.default_rng(12345)
    if near is not None:
        unhealthy = vg.choice(np.flatnonzero(val_y == UNHEALTHY),
                              min(VAL_SLICES_PER_CLASS, int((val_y == UNHEALTHY).sum())), replace=False)
        vidx = np.concatenate([matched_pairs(vg, unhealthy, near), unhealthy])
    else:
        vidx = np.concatenate([vg.choice(np.flatnonzero(val_y == c), min(VAL_SLICES_PER_CLASS,
                                                                         int((val_y == c).sum())), replace=False)
                               for c in (HEALTHY, UNHEALTHY)])
    vx = torch.from_numpy(val_x[vidx].astype(np.float32)).unsqueeze(1).to(device)
    vy = torch.from_numpy(val_y[vidx].astype(np.int64)).to(device)
    return vx, vy


def accuracy_bands(timesteps: int) -> list[tuple[int, int]]:
    """[start, stop) timestep bands of :data:`ACCURACY_BAND_EDGES` (T = 1000: 0-100, 100-250, 250-500, 500-1000)."""
    edges = sorted({int(round(f * timesteps)) for f in ACCURACY_BAND_EDGES})
    return list(zip(edges[:-1], edges[1:]))


# ---- state ----------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    out: Path
    train_seeds: tuple[int, int] = (1000, 1160)  # [start, stop)
    val_seeds: tuple[int, int] = (900000, 900012)
    steps: int = 2000
    max_minutes: float | None = None
    batch_size: int = 32
    lr: float = 3e-4
    cond_dropout: float = 0.15
    val_every: int = 100
    seed: int = 0
    device: str = "auto"
    workers: int = 2
    resume: bool = True
    #: the diffusion model sees healthy slices only (METHODS.md section 2 allows all slices or healthy ones): what it
    #: cannot draw, a lesion, the classifier-guided counterfactual then leaves out even at small guidance
    healthy_only: bool = False


def _save_state(path: Path, model, opt, step: int, rng: np.random.Generator, extra: dict) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    osd = opt.state_dict()
    for pid, st in osd["state"].items():
        for name, val in st.items():
            tensors[f"opt.{pid}.{name}"] = (val if torch.is_tensor(val) else torch.tensor(val)).detach().cpu().contiguous()
    tensors["torch_rng"] = torch.get_rng_state()
    meta = {"step": step, "param_groups": osd["param_groups"], "numpy_rng": rng.bit_generator.state, **extra}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"state": json.dumps(meta, default=int)})


def _check_state_method(cfg: "TrainConfig", method: str) -> None:
    """Before any work: a state to resume must come from a run of the same method."""
    path = Path(cfg.out) / "state.safetensors"
    if not (cfg.resume and path.exists()):
        return
    with safe_open(str(path), framework="pt") as f:
        found = json.loads(f.metadata()["state"]).get("method", "igconda")  # older states are all IgCONDA's
    if found != method:
        raise ValueError(f"the work folder {path.parent} holds a {found} training run, not a {method} one; "
                         "choose another --out folder (or --no-resume to start over there).")


def _load_state(path: Path, model, opt, rng: np.random.Generator) -> dict:
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["state"])
    tensors = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["torch_rng"])
    rng.bit_generator.state = meta["numpy_rng"]
    return meta


# ---- the loop -------------------------------------------------------------------------------
def _model_and_optimiser(card: dict[str, Any], cfg: "TrainConfig", device):
    """(model, AdamW, DDPMScheduler for add_noise(x0, noise, t), channels_last): channels-last on CPU (faster convs)."""
    model = build_model(card).to(device)
    channels_last = device.type == "cpu"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, torch.optim.AdamW(model.parameters(), lr=cfg.lr), monai_scheduler(card["scheduler"]), channels_last


def _q_sample(noiser, x0, noise, t, channels_last: bool):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (MONAI ``DDPMScheduler.add_noise``)."""
    xt = noiser.add_noise(x0, noise, t)
    return xt.contiguous(memory_format=torch.channels_last) if channels_last else xt


def _optimise(model, opt, loss) -> None:
    """One optimiser step on ``loss`` with the gradient norm clipped to 1."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


@dataclass
class _Run:
    """What both training loops set up the same way before their first step."""

    out: Path
    rng: np.random.Generator
    device: torch.device
    data: tuple  # train_x, train_y, val_x, val_y, pools (:func:`_training_data`)
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    noiser: Any
    channels_last: bool
    timesteps: int


def _start(cfg: "TrainConfig", card: dict[str, Any], method: str, data, log) -> _Run:
    """The set-up of a training run of ``method``: state check, folder, seeds, device, data, network, optimiser."""
    _check_state_method(cfg, method)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = pick_device(cfg.device)
    prepared = _training_data(cfg, card, data, out, log)
    model, opt, noiser, channels_last = _model_and_optimiser(card, cfg, device)
    return _Run(out, rng, device, prepared, model, opt, noiser, channels_last,
                int(card["scheduler"]["num_train_timesteps"]))


def _resume(cfg: "TrainConfig", run: _Run, state_path: Path, best: float, words: Callable[[float], str],
            log) -> tuple[int, float, list, Any, str]:
    """(step, best, history, augmenter, command line) of a run: restored from ``state_path`` when resuming
    (the model, optimiser and random state too), else a fresh start at step 0 with ``best``."""
    step, history = 0, []
    if cfg.resume and state_path.exists():
        meta = _load_state(state_path, run.model, run.opt, run.rng)
        step, best, history = meta["step"], meta.get("best", best), meta.get("history", [])
        log(f"resumed from step {step} ({words(best)})")
    return step, best, history, augmenter(cfg.seed + step), " ".join(shlex.quote(a) for a in sys.argv)


def _run_steps(cfg: "TrainConfig", step: int, log, train_step, validation_due) -> int:
    """Optimiser steps from ``step`` to ``cfg.steps`` within the time budget; the step reached.

    ``train_step()`` makes one step and returns its loss (a tensor); ``validation_due(step, loss)``
    runs every ``cfg.val_every`` steps and at the last one. The one loop of both trainers.
    """
    t_start = time.time()
    while step < cfg.steps:
        if cfg.max_minutes is not None and (time.time() - t_start) / 60 > cfg.max_minutes:
            log(f"time budget of {cfg.max_minutes} min reached at step {step}")
            break
        loss = train_step()
        step += 1
        if step % 10 == 0:
            log(f"step {step} loss {loss.item():.5f} ({(time.time() - t_start) / 60:.1f} min)")
        if step % cfg.val_every == 0 or step == cfg.steps:
            validation_due(step, loss)
    return step


def train(cfg: TrainConfig, card: dict[str, Any] | None = None, data=None, log=print) -> Path:
    """Train (or resume) an IgCONDA model; writes ``best.safetensors`` and ``state.safetensors`` in cfg.out."""
    card = card or default_card()
    run = _start(cfg, card, "igconda", data, log)
    out, rng, device, T = run.out, run.rng, run.device, run.timesteps
    train_x, train_y, val_x, val_y, pools = run.data
    model, opt, noiser, channels_last = run.model, run.opt, run.noiser, run.channels_last

    # fixed validation batch: balanced slices, fixed t and noise
    vx, vy = _validation_slices(val_x, val_y, device)
    gen = torch.Generator().manual_seed(54321)
    vt = torch.randint(0, T, (len(vx),), generator=gen).to(device)
    vnoise = torch.randn(vx.shape, generator=gen).to(device)

    state_path = out / "state.safetensors"
    step, best, history, aug, command = _resume(cfg, run, state_path, float("inf"),
                                                lambda v: f"best validation loss {v:.5f}", log)

    def validate() -> float:
        model.eval()
        with torch.inference_mode():
            xt = noiser.add_noise(vx, vnoise, vt)
            pred = model(xt, vt, model.context(vy))
            loss = float(torch.mean((pred.float() - vnoise) ** 2))
        model.train()
        return loss

    def train_step() -> torch.Tensor:
        if cfg.healthy_only:
            idx, x0 = _augmented(rng.choice(pools[HEALTHY], cfg.batch_size), train_x, aug, device)
        else:
            idx, x0 = _balanced_batch(rng, pools, cfg.batch_size, train_x, aug, device)
        y = torch.from_numpy(train_y[idx].astype(np.int64)).to(device)
        y = torch.where(torch.rand(len(y), device=device) < cfg.cond_dropout, torch.zeros_like(y), y)
        t = torch.randint(0, T, (len(x0),), device=device)
        noise = torch.randn_like(x0)
        xt = _q_sample(noiser, x0, noise, t, channels_last)
        loss = torch.mean((model(xt, t, model.context(y)).float() - noise) ** 2)
        _optimise(model, opt, loss)
        return loss

    def validation_due(step: int, loss: torch.Tensor) -> None:
        nonlocal best
        vloss = validate()
        history.append({"step": step, "val_loss": round(vloss, 6), "train_loss": round(loss.item(), 6)})
        log(f"step {step} validation loss {vloss:.5f}")
        if vloss < best:
            best = vloss
            _write_best(out, model, card, cfg, step, vloss, command, len(train_x), int((train_y == UNHEALTHY).sum()))
        _save_state(state_path, model, opt, step, rng, {"best": best, "history": history})

    model.train()
    step = _run_steps(cfg, step, log, train_step, validation_due)
    if not (out / "best.safetensors").exists():
        vloss = validate()
        _write_best(out, model, card, cfg, step, vloss, command, len(train_x), int((train_y == UNHEALTHY).sum()))
    _save_state(state_path, model, opt, step, rng, {"best": best, "history": history})
    write_json(history, out / "history.json", indent=1)
    return out / "best.safetensors"


def train_classifier(cfg: TrainConfig, card: dict[str, Any] | None = None, data=None, log=print) -> Path:
    """Train (or resume) a noise-conditioned classifier; writes ``best.safetensors`` (best validation
    accuracy, its card holding the accuracy by timestep band) and ``state.safetensors`` in cfg.out.

    Cross-entropy of C(y | x_t, t) with x_t = q_sample(x0, t) (MONAI ``DDPMScheduler.add_noise``), t
    uniform in [0, T), on the balanced, augmented batches of :func:`train`. Validation: the same fixed
    slices at a fixed t and noise drawn in every band of :func:`accuracy_bands`; the accuracy that
    selects the best checkpoint is the bands' mean weighted by their width (the accuracy at uniform t).
    """
    card = validate_card(json.loads(json.dumps(card or classifier_card())))
    if card["method"] != "classifier":
        raise ValueError(f"a classifier is trained from a classifier model card, got method {card['method']!r}.")
    run = _start(cfg, card, "classifier", data, log)
    out, rng, device, T = run.out, run.rng, run.device, run.timesteps
    train_x, train_y, val_x, val_y, pools = run.data
    model, opt, noiser, channels_last = run.model, run.opt, run.noiser, run.channels_last
    classes = torch.tensor([0, card["labels"]["healthy"], card["labels"]["unhealthy"]], device=device)

    # healthy slices paired by body position with the unhealthy ones (whole-body phantoms: every case has the same
    # grid; organ crops differ in length per case and show the same organs whatever the label)
    train_near = val_near = None
    if data is None and "crop" not in card["preprocessing"]:
        train_near = healthy_near(train_y, cfg.train_seeds[1] - cfg.train_seeds[0])
        val_near = healthy_near(val_y, cfg.val_seeds[1] - cfg.val_seeds[0])
    # fixed validation: the same balanced slices in every band, at a fixed t and noise per slice and band
    vx, vy = _validation_slices(val_x, val_y, device, val_near)
    vtarget = classes[vy]
    gen = torch.Generator().manual_seed(54321)
    bands = [(lo, hi, torch.randint(lo, hi, (len(vx),), generator=gen).to(device),
              torch.randn(vx.shape, generator=gen).to(device)) for lo, hi in accuracy_bands(T)]

    state_path = out / "state.safetensors"
    step, best, history, aug, command = _resume(cfg, run, state_path, -1.0,
                                                lambda v: f"best validation accuracy {v:.3f}", log)

    def validate() -> tuple[float, float, list[dict[str, Any]]]:
        """(accuracy at uniform t, cross-entropy at uniform t, accuracy per band)."""
        model.eval()
        table, accuracy, loss = [], 0.0, 0.0
        with torch.inference_mode():
            for lo, hi, vt, vnoise in bands:
                xt = noiser.add_noise(vx, vnoise, vt)
                logits = torch.cat([model(xt[i:i + 64], vt[i:i + 64]).float() for i in range(0, len(xt), 64)])
                band_accuracy = float((logits.argmax(1) == vtarget).float().mean())
                accuracy += band_accuracy * (hi - lo) / T
                loss += float(torch.nn.functional.cross_entropy(logits, vtarget)) * (hi - lo) / T
                table.append({"timesteps": [lo, hi], "accuracy": round(band_accuracy, 4), "slices": len(vx)})
        model.train()
        return accuracy, loss, table

    def train_step() -> torch.Tensor:
        idx, x0 = _classifier_batch(rng, pools, train_near, cfg.batch_size, train_x, aug, device)
        target = classes[torch.from_numpy(train_y[idx].astype(np.int64)).to(device)]
        t = torch.randint(0, T, (len(x0),), device=device)
        xt = _q_sample(noiser, x0, torch.randn_like(x0), t, channels_last)
        loss = torch.nn.functional.cross_entropy(model(xt, t).float(), target)
        _optimise(model, opt, loss)
        return loss

    def validation_due(step: int, loss: torch.Tensor) -> None:
        nonlocal best
        accuracy, vloss, table = validate()
        history.append({"step": step, "val_accuracy": round(accuracy, 4), "val_loss": round(vloss, 6),
                        "train_loss": round(loss.item(), 6), "val_accuracy_by_t": table})
        log(f"step {step} validation accuracy {accuracy:.3f} ("
            + ", ".join(f"t {b['timesteps'][0]}-{b['timesteps'][1] - 1}: {b['accuracy']:.2f}" for b in table) + ")")
        if accuracy > best:
            best = accuracy
            _write_best_classifier(out, model, card, cfg, step, (accuracy, vloss, table), command,
                                   len(train_x), int((train_y == UNHEALTHY).sum()), train_near is not None)
        _save_state(state_path, model, opt, step, rng, {"best": best, "history": history, "method": "classifier"})

    model.train()
    step = _run_steps(cfg, step, log, train_step, validation_due)
    if not (out / "best.safetensors").exists():
        _write_best_classifier(out, model, card, cfg, step, validate(), command, len(train_x),
                               int((train_y == UNHEALTHY).sum()), train_near is not None)
    _save_state(state_path, model, opt, step, rng, {"best": best, "history": history, "method": "classifier"})
    write_json(history, out / "history.json", indent=1)
    return out / "best.safetensors"


def _write_best_classifier(out, model, card, cfg: TrainConfig, step, validation, command, n_slices,
                           n_unhealthy, matched: bool) -> None:
    accuracy, vloss, table = validation
    pairing = (f" Healthy slices were drawn from the same body position (within {POSITION_WINDOW} model slices) as "
               "the unhealthy ones, in training batches and in validation, so anatomy alone cannot separate the "
               "classes." if matched else "")
    card = json.loads(json.dumps(card))
    card["provenance"] = {
        **_provenance(cfg, step, command, n_slices, n_unhealthy, card),
        "validation_metrics": {"val_accuracy": round(float(accuracy), 4), "val_cross_entropy": round(float(vloss), 6)},
        "validation_accuracy_by_t": table,
        "note": ("Demonstration noise-conditioned classifier (healthy vs unhealthy slice) trained on synthetic "
                 f"phantoms; val_accuracy is at t uniform in [0, T).{pairing} Not for clinical use."),
    }
    _save_best(out, model, card)


def _provenance(cfg: TrainConfig, step, command, n_slices, n_unhealthy, card: dict[str, Any]) -> dict[str, Any]:
    """What every trained card records about its data and run."""
    crop = card["preprocessing"].get("crop")
    source = (f"synthetic abdominal CT phantoms (DiffusionAnomalyLib.ct_phantoms), crops around "
              f"{', '.join(crop['organs'])}" if crop else
              "synthetic whole-body FDG-like PET phantoms (DiffusionAnomalyLib.phantoms)")
    return {
        "training_data": (
            f"{source}, seeds {cfg.train_seeds[0]}..{cfg.train_seeds[1] - 1}: {n_slices} axial slices, "
            f"{n_unhealthy} unhealthy; no real patient data"
        ),
        "validation_data": f"phantom seeds {cfg.val_seeds[0]}..{cfg.val_seeds[1] - 1}",
        "train_seeds": list(cfg.train_seeds),
        "val_seeds": list(cfg.val_seeds),
        "command": command,
        "steps": step,
        "batch_size": cfg.batch_size,
        "optimizer": f"AdamW lr {cfg.lr}",
        "seed": cfg.seed,
        "torch": torch.__version__,
    }


def _write_best(out, model, card, cfg: TrainConfig, step, vloss, command, n_slices, n_unhealthy) -> None:
    card = json.loads(json.dumps(card))
    card["provenance"] = {
        **_provenance(cfg, step, command, n_slices, n_unhealthy, card),
        "condition_dropout": cfg.cond_dropout,
        **({"training_slices": "healthy slices only"} if cfg.healthy_only else {}),
        "validation_metrics": {"val_mse": round(float(vloss), 6)},
        "note": ("Demonstration model trained on synthetic phantoms with a network smaller than the "
                 f"paper's (channels {'/'.join(str(c) for c in card['network']['unet']['channels'])}, attention at "
                 "the lowest level only). Not for clinical use."),
    }
    _save_best(out, model, card)


def _save_best(out: Path, model, card: dict[str, Any]) -> None:
    """``best.safetensors``: a CPU copy of the model's weights with ``card``."""
    model_cpu = build_model(card)
    model_cpu.load_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
    save_checkpoint(model_cpu, card, out / "best.safetensors")
