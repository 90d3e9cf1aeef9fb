"""CDM (METHODS.md section 3): reference parity with MONAI's DDIM, the input's exact grid, determinism,
per-slice noise (seed, model slice index), network evaluations, region, cache, progress/cancel and
one-sentence refusals before any network work. CG-CDM: Testing/test_guided.py."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from monai.networks.schedulers import DDIMScheduler

from DiffusionAnomalyLib.card import CheckpointError
from DiffusionAnomalyLib.methods import load_checkpoint, served_method
from DiffusionAnomalyLib.methods.cdm import CdmModel
from DiffusionAnomalyLib.methods.igconda import IgcondaModel
from DiffusionAnomalyLib.progress import Cancelled
from DiffusionAnomalyLib.volume import Volume

#: cheap parameters for the tiny network (the defaults, Q = 400 and R = 10, are tested for resolution only)
FAST = {"noise_level": 40, "steps": 3}


@pytest.fixture()
def cdm(tiny_checkpoint) -> CdmModel:
    """A fresh CDM model on the tiny IgCONDA checkpoint (empty cache, counter at zero)."""
    return load_checkpoint(tiny_checkpoint, device="cpu", method="cdm")


def one_sentence(message: str) -> bool:
    return "\n" not in message and message.endswith(".") and ". " not in message.rstrip(".")


def test_selection_from_an_igconda_checkpoint(tiny_checkpoint):
    assert isinstance(load_checkpoint(tiny_checkpoint, device="cpu"), IgcondaModel)  # method=None: the card's
    assert isinstance(load_checkpoint(tiny_checkpoint, device="cpu", method="igconda"), IgcondaModel)
    model = load_checkpoint(tiny_checkpoint, device="cpu", method="cdm")
    assert isinstance(model, CdmModel) and model.method == "cdm" and model.card["method"] == "igconda"
    for other in ("suv41", "latent3d", "classifier"):
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(tiny_checkpoint, device="cpu", method=other)
        assert one_sentence(str(err.value))
    with pytest.raises(CheckpointError) as err:  # a network trained for CDM alone is no IgCONDA network
        served_method({"id": "x", "method": "cdm"}, "igconda")
    assert "cannot run method 'igconda'" in str(err.value) and one_sentence(str(err.value))


def test_defaults_and_card_overrides(cdm):
    assert cdm.resolve() == {"noise_level": 400, "steps": 10, "tau": 0.95, "seed": 0}
    assert cdm.evaluations_per_slice(cdm.resolve()) == 20
    assert cdm.resolve(noise_level="30", steps="2", tau="0.5", seed="7") == \
        {"noise_level": 30, "steps": 2, "tau": 0.5, "seed": 7}
    card = copy.deepcopy(cdm.card)
    card["inference_defaults"]["cdm"] = {"noise_level": 100, "seed": 3}
    model = CdmModel(cdm.model, card, device="cpu")
    assert model.resolve() == {"noise_level": 100, "steps": 10, "tau": 0.95, "seed": 3}
    for bad, words in (({"tau": 1.5}, "the model card's inference_defaults.cdm.tau must be"),
                       ({"steps": 0}, "the model card's inference_defaults.cdm.steps must be"),
                       ({"noise_level": 20, "steps": 30}, "inference_defaults.cdm.steps must be a whole number from 1 "
                                                          "to 20"),
                       ({"window": 3}, "inference_defaults.cdm may hold only"),
                       ([1, 2], "inference_defaults.cdm must be an object")):
        card["inference_defaults"]["cdm"] = bad
        with pytest.raises(CheckpointError) as err:
            CdmModel(cdm.model, card, device="cpu")
        assert str(err.value).startswith(f"model {card['id']}: ") and words in str(err.value), str(err.value)
        assert one_sentence(str(err.value))


@pytest.mark.parametrize("params", [
    {"tau": 1}, {"tau": 0}, {"tau": 1.2}, {"tau": "nan"}, {"tau": True},
    {"steps": 0}, {"steps": 2.5}, {"steps": 41, "noise_level": 40}, {"noise_level": 5},  # default R = 10 > Q
    {"noise_level": 0}, {"noise_level": 1000}, {"noise_level": "20.7"}, {"noise_level": "many"},
    {"seed": -1}, {"seed": 1.5}, {"seed": 2**32},
])
def test_refusals_are_one_sentence_before_any_network_work(cdm, pet_slab, params):
    with pytest.raises(ValueError) as err:
        cdm.resolve(**params)
    assert one_sentence(str(err.value)), str(err.value)
    with pytest.raises(ValueError) as err_run:
        cdm.run(pet_slab, **params)
    assert str(err_run.value) == str(err.value)
    assert cdm.network_evaluations == 0 and len(cdm.cache) == 0


def slice_generator(seed: int, slice_id: int) -> torch.Generator:
    """The contract of the stochastic methods' noise: model slice i draws from a torch.Generator seeded with
    numpy's SeedSequence([seed, i]) (written out here, independently of the library)."""
    state = int(np.random.SeedSequence([seed, int(slice_id)]).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(state)


def slice_noise(seed, slice_ids, shape):
    """The first draw of each slice's generator, stacked: the closed-form noising of CDM and CG-DDPM."""
    return torch.cat([torch.randn((1,) + tuple(shape), generator=slice_generator(seed, i)) for i in slice_ids])


def _reference_cdm(net, card, x, q, r, tau, seed, slice_ids=None):
    """An independent CDM loop (Algorithm 1): closed-form noising with each slice's seeded draw, then for
    t = Q..Q-R+1 MONAI's DDIMScheduler.step (stride 1, eta 0, no clipping) on each trajectory
    with its own network call, a += (x - x') / (1 - tau)."""
    sched = DDIMScheduler(num_train_timesteps=1000, schedule="linear_beta", beta_start=1e-4, beta_end=0.02,
                          clip_sample=False)
    sched.set_timesteps(1000)
    abar = sched.alphas_cumprod[q]
    noise = slice_noise(seed, range(len(x)) if slice_ids is None else slice_ids, x.shape[1:])
    z = abar.sqrt() * x + (1 - abar).sqrt() * noise
    z_tau = z.clone()
    weight = net.embed.weight  # f(y): rows null, healthy, unhealthy
    labels = card["labels"]
    f1, f0 = weight[labels["unhealthy"]], weight[labels["healthy"]]
    c1 = f1.expand(len(x), 1, -1)
    c_tau = (tau * f1 + (1 - tau) * f0).expand(len(x), 1, -1)
    a = torch.zeros_like(x)
    with torch.no_grad():
        for t in range(q, q - r, -1):
            tt = torch.full((len(x),), t)
            z, _ = sched.step(net(z, tt, c1), t, z)
            z_tau, _ = sched.step(net(z_tau, tt, c_tau), t, z_tau)
            a += (z - z_tau) / (1 - tau)
    return a


def test_reference_parity_with_monai_ddim(cdm):
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(5))
    q, r, tau, seed = 9, 4, 0.8, 13
    ours = cdm.saliency(x, noise_level=q, steps=r, tau=tau, seed=seed)
    assert cdm.network_evaluations == 2 * r * len(x)
    torch.testing.assert_close(ours, _reference_cdm(cdm.model, cdm.card, x, q, r, tau, seed), atol=2e-5, rtol=1e-4)
    assert ours.abs().max() > 1e-4  # the two conditions do differ
    ids = [17, 3, 40]  # the noise follows the model slice index, not the position in the batch
    ours = cdm.saliency(x, [17, 3, 40], noise_level=q, steps=r, tau=tau, seed=seed)
    torch.testing.assert_close(ours, _reference_cdm(cdm.model, cdm.card, x, q, r, tau, seed, ids), atol=2e-5,
                               rtol=1e-4)
    alone = cdm.saliency(x[1:2], [3], noise_level=q, steps=r, tau=tau, seed=seed)
    torch.testing.assert_close(alone, ours[1:2], atol=2e-5, rtol=1e-4)


def _flipped(volume: Volume) -> Volume:
    """The same voxels read with the i and k axes reversed (negative direction columns)."""
    m = volume.ijk_to_ras.copy()
    shape = np.shape(volume.voxels)  # [k, j, i]
    m[:3, 3] = volume.ijk_to_ras_points([shape[2] - 1, 0, shape[0] - 1])[0]
    m[:3, 0], m[:3, 2] = -m[:3, 0], -m[:3, 2]
    return Volume(volume.voxels[::-1, :, ::-1].copy(), m, modality="PT", units=volume.units)


def test_exact_grid_evaluations_and_units(cdm, pet_slab):
    fractions = []
    res = cdm.run(pet_slab, **FAST, progress=lambda f, m: fractions.append(f))
    assert res.heatmap.voxels.shape == pet_slab.voxels.shape
    np.testing.assert_array_equal(res.heatmap.ijk_to_ras, pet_slab.ijk_to_ras)
    assert res.counterfactual is None and res.model_counterfactual is None
    assert res.heatmap.voxels.min() >= 0 and res.heatmap.voxels.max() > 0
    assert "(1 - tau)" in res.heatmap.units and "SUVbw" in res.heatmap.units
    n = len(res.model_input)
    assert res.computed_slices == n and res.network_evaluations == 2 * FAST["steps"] * n
    assert res.parameters == {**FAST, "tau": 0.95, "seed": 0}
    assert res.method == "cdm" and res.classifier_confidence is None and res.classifier_evaluations == 0
    assert fractions[-1] == 1.0 and fractions == sorted(fractions)

    flipped = _flipped(pet_slab)
    res_f = cdm.run(flipped, noise_level=40, steps=1)
    assert res_f.heatmap.voxels.shape == flipped.voxels.shape
    np.testing.assert_array_equal(res_f.heatmap.ijk_to_ras, flipped.ijk_to_ras)
    assert res_f.heatmap.voxels.max() > 0


def test_oblique_volume_keeps_its_grid(cdm, oblique_pet):
    res = cdm.run(oblique_pet, noise_level=40, steps=1)
    assert res.heatmap.voxels.shape == oblique_pet.voxels.shape
    np.testing.assert_array_equal(res.heatmap.ijk_to_ras, oblique_pet.ijk_to_ras)
    assert res.network_evaluations == 2 * res.computed_slices


def test_deterministic_seed_and_tau(tiny_checkpoint, pet_slab):
    first = load_checkpoint(tiny_checkpoint, device="cpu", method="cdm").run(pet_slab, **FAST, seed=4)
    second = load_checkpoint(tiny_checkpoint, device="cpu", method="cdm")  # a fresh cache
    same = second.run(pet_slab, **FAST, seed=4)
    assert same.network_evaluations > 0
    np.testing.assert_array_equal(first.model_heat, same.model_heat)
    np.testing.assert_array_equal(first.heatmap.voxels, same.heatmap.voxels)
    other_seed = second.run(pet_slab, **FAST, seed=5)
    assert not np.allclose(first.model_heat, other_seed.model_heat)
    other_tau = second.run(pet_slab, **FAST, seed=4, tau=0.5)
    assert not np.allclose(first.model_heat, other_tau.model_heat)


def test_cache_and_region(cdm, pet_slab):
    whole = cdm.run(pet_slab, **FAST)
    again = cdm.run(pet_slab, **FAST)
    assert again.network_evaluations == 0
    np.testing.assert_array_equal(again.heatmap.voxels, whole.heatmap.voxels)

    region = np.zeros(pet_slab.voxels.shape, dtype=np.uint8)
    region[8:10, 10:30, 10:30] = 1
    part = cdm.run(pet_slab, **FAST, region=region)
    total = len(whole.model_input)
    assert 0 < part.computed_slices < total
    assert part.network_evaluations == 2 * FAST["steps"] * part.computed_slices
    computed = np.flatnonzero(part.model_heat.reshape(total, -1).any(axis=1))
    assert len(computed) == part.computed_slices
    # a slice's noise depends on (seed, model slice index), not on the region: the computed slices equal the
    # whole run's (up to float32 rounding, which differs with the batch composition)
    np.testing.assert_allclose(part.model_heat[computed], whole.model_heat[computed],
                               atol=1e-3 * whole.model_heat.max())
    assert part.heatmap.voxels[region > 0].max() > 0
    assert cdm.run(pet_slab, **FAST, region=region).network_evaluations == 0


def test_cancel_stops_before_the_network(cdm, pet_slab):
    with pytest.raises(Cancelled):
        cdm.run(pet_slab, **FAST, cancel=lambda: True)
    assert cdm.network_evaluations == 0 and len(cdm.cache) == 0
