"""The classifier-guided methods (METHODS.md sections 2-3): CG-DDIM, CG-DDPM and CG-CDM on the tiny network
with a tiny noise-conditioned classifier. Reference parity of steps="reference" with explicit stride-1
MONAI loops, s = 0 against the unguided counterparts, determinism and per-slice noise, region
independence, the slider-reuse rules of every method, parameter and classifier refusals, the per-slice
classifier confidence and the geometry of the outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from DiffusionAnomalyLib import methods
from DiffusionAnomalyLib.card import CheckpointError
from DiffusionAnomalyLib.diffusion import DDPM, ddim_step, slice_generators, timestep_grid
from DiffusionAnomalyLib.method_catalog import METHODS, method_spec
from DiffusionAnomalyLib.methods import load_checkpoint
from DiffusionAnomalyLib.methods.cdm import CdmModel, CgCdmModel
from DiffusionAnomalyLib.methods.guided import CgDdimModel, CgDdpmModel
from DiffusionAnomalyLib.progress import Cancelled

from conftest import save_tiny_classifier
from test_cdm import one_sentence, slice_generator

#: cheap parameters for the tiny networks
FAST = {"noise_level": 40, "steps": 3}
SCALE = 50.0


def load(tiny_checkpoint, tiny_classifier, method):
    """A fresh method object (empty cache, counters at zero); the classifier only for the methods that take one."""
    takes = method_spec(method).classifier
    return load_checkpoint(tiny_checkpoint, device="cpu", method=method, classifier=tiny_classifier if takes else None)


def grad_log_c(classifier, x, t, label):
    """grad_x log C(label | x, t), written out: the reference code's cond_fn."""
    with torch.enable_grad():
        x_in = x.detach().clone().requires_grad_(True)
        log_p = torch.log_softmax(classifier(x_in, torch.full((len(x),), t)), dim=-1)[:, label].sum()
        return torch.autograd.grad(log_p, x_in)[0]


# ---- loading and refusals ------------------------------------------------------------------------
def test_loading_each_method_and_the_classifier_refusals(tiny_checkpoint, tiny_card, tiny_classifier, tmp_path,
                                                         monkeypatch):
    for method, cls in (("cg-ddim", CgDdimModel), ("cg-ddpm", CgDdpmModel), ("cg-cdm", CgCdmModel)):
        model = load(tiny_checkpoint, tiny_classifier, method)
        assert type(model) is cls and model.method == method and model.classifier.card["method"] == "classifier"
        assert model.classifier.source == str(tiny_classifier)
    assert set(methods.METHOD_CLASSES) == set(METHODS)
    for method in ("igconda", "cdm"):  # a classifier for a method that takes none: refused, one sentence
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(tiny_checkpoint, device="cpu", method=method, classifier=tiny_classifier)
        assert f"method {method} uses no classifier" in str(err.value) and one_sentence(str(err.value))
    with pytest.raises(CheckpointError, match="method igconda uses no classifier"):  # the card's own method
        load_checkpoint(tiny_checkpoint, device="cpu", classifier=tiny_classifier)

    # a classifier of another noise schedule is refused from its card, before any weights are read
    other = save_tiny_classifier(tmp_path / "other.safetensors", tiny_card, beta_end=0.03)
    loaded = []
    real = methods.load_weights
    monkeypatch.setattr(methods, "load_weights", lambda *a: loaded.append(a) or real(*a))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tiny_checkpoint, device="cpu", method="cg-ddim", classifier=other)
    assert "other.safetensors" in str(err.value) and "another noise schedule" in str(err.value)
    assert one_sentence(str(err.value)) and loaded == []
    # a diffusion checkpoint is no classifier
    with pytest.raises(CheckpointError, match="not a noise-conditioned classifier"):
        load_checkpoint(tiny_checkpoint, device="cpu", method="cg-ddpm", classifier=tiny_checkpoint)
    assert loaded == []
    # none given and no bundled classifier fits the tiny model: one sentence saying how to get one
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tiny_checkpoint, device="cpu", method="cg-cdm")
    assert "--classifier" in str(err.value) and one_sentence(str(err.value)) and loaded == []
    # made directly without a classifier
    net = load(tiny_checkpoint, tiny_classifier, "cdm")
    with pytest.raises(CheckpointError, match="method cg-ddim needs a noise-conditioned classifier"):
        CgDdimModel(net.model, net.card, device="cpu")


def test_parameters_defaults_and_refusals(tiny_checkpoint, tiny_classifier, pet_slab):
    ddim = load(tiny_checkpoint, tiny_classifier, "cg-ddim")
    assert ddim.resolve() == {"noise_level": 500, "classifier_scale": 100.0, "steps": 100}
    assert ddim.evaluations_per_slice(ddim.resolve()) == 200 and ddim.evaluations_per_slice(ddim.resolve(), 3) == 400
    ddpm = load(tiny_checkpoint, tiny_classifier, "cg-ddpm")
    assert ddpm.resolve(seed="7", steps="reference", noise_level=30) == \
        {"noise_level": 30, "classifier_scale": 100.0, "steps": "reference", "seed": 7}
    assert ddpm.evaluations_per_slice(ddpm.resolve()) == 100
    cg_cdm = load(tiny_checkpoint, tiny_classifier, "cg-cdm")
    assert cg_cdm.resolve() == {"noise_level": 400, "steps": 10, "tau": 0.95, "classifier_scale": 10.0, "seed": 0}
    assert cg_cdm.evaluations_per_slice(cg_cdm.resolve()) == 20

    for model, given, words in (
        (ddim, {"tau": 0.5}, "method cg-ddim has no parameter 'tau'; it takes noise_level, classifier_scale, steps "
                             "('tau' belongs to cdm, cg-cdm)."),
        (ddim, {"guidance_scale": 2.0}, "'guidance_scale' belongs to igconda"),
        (ddim, {"seed": 3}, "'seed' belongs to cg-ddpm, cdm, cg-cdm"),
        (ddpm, {"classifier_scale": -1}, "classifier scale s"),
        (cg_cdm, {"noise_level": 5}, "CDM steps R"),  # the default R = 10 is more than Q
    ):
        with pytest.raises(ValueError) as err:
            model.resolve(**given)
        assert words in str(err.value) and one_sentence(str(err.value)), str(err.value)
        with pytest.raises(ValueError) as err_run:
            model.run(pet_slab, **given)
        assert str(err_run.value) == str(err.value)
        assert model.network_evaluations == 0 and model.classifier_evaluations == 0 and len(model.cache) == 0


# ---- the guidance classifier ----------------------------------------------------------------------
def test_guidance_gradient_and_confidence(tiny_checkpoint, tiny_classifier):
    guide = load(tiny_checkpoint, tiny_classifier, "cg-ddim").classifier
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():  # usable inside the methods' inference code
        grad = guide.grad_log_prob(x, 25, guide.healthy_label)
    assert grad.dtype == torch.float32 and grad.shape == x.shape and grad.abs().max() > 0
    torch.testing.assert_close(grad, grad_log_c(guide.model, x, 25, guide.healthy_label))
    per_slice = guide.grad_log_prob(x, 25, torch.tensor([0, 1, 0]))
    torch.testing.assert_close(per_slice[1], grad_log_c(guide.model, x[1:2], 25, 1)[0], atol=1e-6, rtol=1e-5)
    p = guide.p_unhealthy(x.squeeze(1).numpy())
    assert p.shape == (3,) and np.all((p >= 0) & (p <= 1))
    with torch.no_grad():
        expected = torch.softmax(guide.model(x, torch.zeros(3, dtype=torch.long)), -1)[:, guide.unhealthy_label]
    np.testing.assert_allclose(p, expected.double().numpy(), rtol=1e-5)
    assert guide.classifier_evaluations == 3 + 3 + 3  # one per image, with or without a gradient


# ---- reference parity -------------------------------------------------------------------------------
def test_cg_ddim_reference_matches_a_monai_stride1_loop(tiny_checkpoint, tiny_classifier):
    """steps="reference": DDIMScheduler(clip_sample=False) reversed_step at t = 0..L-1 with the null label,
    then step at t = L..1 on eps - s sqrt(1 - abar_t) grad log C(healthy | x_t, t)."""
    model = load(tiny_checkpoint, tiny_classifier, "cg-ddim")
    net, clf = model.model, model.classifier.model
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    level, s = 6, SCALE
    ours = model.counterfactual(x, level, s, "reference")
    assert model.network_evaluations == 2 * 2 * level and model.classifier_evaluations == 2 * level

    sched = DDIMScheduler(num_train_timesteps=1000, schedule="linear_beta", clip_sample=False)
    sched.set_timesteps(1000)
    null = net.context(torch.zeros(2, dtype=torch.long))
    healthy = model.classifier.card["labels"]["healthy"]
    z = x.clone()
    with torch.no_grad():
        for t in range(level):
            z, _ = sched.reversed_step(net(z, torch.full((2,), t), null), t, z)
        for t in range(level, 0, -1):
            eps = net(z, torch.full((2,), t), null)
            eps = eps - s * (1 - sched.alphas_cumprod[t]).sqrt() * grad_log_c(clf, z, t, healthy)
            z, _ = sched.step(eps, t, z)
    torch.testing.assert_close(ours, z, atol=2e-5, rtol=1e-4)
    unguided = model.counterfactual(x, level, 0.0, "reference")
    assert (ours - unguided).abs().max() > 1e-4  # the guidance does act


def test_cg_ddpm_reference_matches_a_monai_stride1_loop(tiny_checkpoint, tiny_classifier):
    """steps="reference": closed-form noising to L with each slice's first draw, then DDPMScheduler(clip_sample=
    False, fixed_small) step at t = L..1 with the slice's generator, plus Sigma_t s grad log C(healthy | x_t, t)."""
    model = load(tiny_checkpoint, tiny_classifier, "cg-ddpm")
    net, clf = model.model, model.classifier.model
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(4))
    ids, level, s, seed = [5, 0, 9], 7, SCALE, 11
    ours = model.sample(x, ids, level, s, "reference", seed)
    assert model.network_evaluations == 3 * level and model.classifier_evaluations == 3 * level

    sched = DDPMScheduler(num_train_timesteps=1000, schedule="linear_beta", clip_sample=False)
    assert sched.variance_type == "fixed_small"
    gens = [slice_generator(seed, i) for i in ids]
    noise = torch.cat([torch.randn((1, 1, 32, 32), generator=g) for g in gens])
    z = sched.add_noise(x, noise, torch.full((3,), level))
    null = net.context(torch.zeros(3, dtype=torch.long))
    healthy = model.classifier.card["labels"]["healthy"]
    with torch.no_grad():
        for t in range(level, 0, -1):
            eps = net(z, torch.full((3,), t), null)
            shift = sched._get_variance(t) * s * grad_log_c(clf, z, t, healthy)
            z = torch.cat([sched.step(eps[i : i + 1], t, z[i : i + 1], generator=g)[0] for i, g in enumerate(gens)])
            z = z + shift
    torch.testing.assert_close(ours, z, atol=2e-5, rtol=1e-4)
    # the hand-written strided move at stride 1 (an integer steps = L) is the same loop
    torch.testing.assert_close(model.sample(x, ids, level, s, level, seed), ours, atol=2e-5, rtol=1e-4)
    # the noise is the slices' own: another seed, another sample; a slice alone, the same sample
    assert (model.sample(x, ids, level, s, "reference", seed + 1) - ours).abs().max() > 1e-3
    torch.testing.assert_close(model.sample(x[2:], ids[2:], level, s, "reference", seed), ours[2:], atol=2e-5,
                               rtol=1e-4)


def test_ddpm_posterior_across_a_stride_is_ddim_with_eta_one(tiny_card):
    ddpm = DDPM(tiny_card["scheduler"])
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64), torch.randn(2, 1, 8, 8, generator=g,
                                                                                     dtype=torch.float64)
    t, s = 300, 120
    a_t, a_s = ddpm.abar[t], ddpm.abar[s]
    gens = slice_generators(3, [0, 1])
    moved = ddpm.move(x, eps, t, s, 4, gens)
    z = torch.cat([torch.randn((1, 1, 8, 8), generator=gen) for gen in slice_generators(3, [0, 1])]).double()
    sigma2 = (1 - a_s) / (1 - a_t) * (1 - a_t / a_s)  # DDIM's sigma_t^2 with eta = 1
    x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    expected = a_s**0.5 * x0 + (1 - a_s - sigma2) ** 0.5 * eps + sigma2**0.5 * z
    torch.testing.assert_close(moved, expected, atol=1e-5, rtol=1e-5)
    assert ddpm.variance(t, s) == pytest.approx(sigma2, rel=1e-5)
    assert ddpm.variance(5, 4) == pytest.approx(float(ddpm.scheduler._get_variance(5)), rel=1e-5)


# ---- s = 0 is the unguided counterpart -----------------------------------------------------------------
def test_zero_scale_is_the_unguided_method(tiny_checkpoint, tiny_classifier, pet_slab):
    model = load(tiny_checkpoint, tiny_classifier, "cg-ddim")
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(6))
    ours = model.counterfactual(x, 40, 0.0, 3)
    assert model.classifier_evaluations == 0  # no gradient is taken at s = 0
    net, abar, null = model.model, model.ddim.abar, model.model.context(torch.zeros(2, dtype=torch.long))
    grid = timestep_grid(40, 3)
    z = x.clone()
    with torch.no_grad():  # the DDIM round trip with the null label
        for a, b in zip(grid[:-1], grid[1:]):
            z = ddim_step(z, net(z, torch.full((2,), a), null), abar[a], abar[b])
        for a, b in zip(grid[:0:-1], grid[-2::-1]):
            z = ddim_step(z, net(z, torch.full((2,), a), null), abar[a], abar[b])
    torch.testing.assert_close(ours, z, atol=1e-5, rtol=1e-4)

    cdm = load(tiny_checkpoint, tiny_classifier, "cdm").run(pet_slab, **FAST)
    cg_cdm = load(tiny_checkpoint, tiny_classifier, "cg-cdm").run(pet_slab, **FAST, classifier_scale=0)
    np.testing.assert_array_equal(cg_cdm.model_heat, cdm.model_heat)
    assert cg_cdm.classifier_evaluations == cg_cdm.computed_slices  # only the confidence
    guided = load(tiny_checkpoint, tiny_classifier, "cg-cdm").run(pet_slab, **FAST, classifier_scale=SCALE)
    assert not np.allclose(guided.model_heat, cdm.model_heat)
    assert guided.classifier_evaluations == guided.computed_slices * (1 + 2 * FAST["steps"])


# ---- determinism, per-slice noise, region -------------------------------------------------------------
@pytest.mark.parametrize("method", ["cg-ddim", "cg-ddpm", "cg-cdm"])
def test_deterministic_and_region_independent(tiny_checkpoint, tiny_classifier, pet_slab, method):
    params = {**FAST, "classifier_scale": SCALE}
    whole = load(tiny_checkpoint, tiny_classifier, method).run(pet_slab, **params)
    again = load(tiny_checkpoint, tiny_classifier, method).run(pet_slab, **params)  # a fresh object
    assert again.network_evaluations > 0
    np.testing.assert_array_equal(again.model_heat, whole.model_heat)
    np.testing.assert_array_equal(again.heatmap.voxels, whole.heatmap.voxels)
    if method != "cg-ddim":
        other = load(tiny_checkpoint, tiny_classifier, method).run(pet_slab, **params, seed=1)
        assert not np.allclose(other.model_heat, whole.model_heat)

    model = load(tiny_checkpoint, tiny_classifier, method)
    region = np.zeros(pet_slab.voxels.shape, dtype=np.uint8)
    region[8:10, 10:30, 10:30] = 1
    part = model.run(pet_slab, **params, region=region)
    total = len(whole.model_input)
    assert 0 < part.computed_slices < total
    computed = np.flatnonzero(np.isfinite(part.classifier_confidence))
    assert len(computed) == part.computed_slices
    # the same maps up to float32 rounding, which differs with the batch composition (the strided DDIM inversion
    # and the untrained classifier's gradient amplify it); noise drawn per region would differ by O(max)
    np.testing.assert_allclose(part.model_heat[computed], whole.model_heat[computed],
                               atol=1e-2 * whole.model_heat.max())
    np.testing.assert_allclose(part.classifier_confidence[computed], whole.classifier_confidence[computed], rtol=1e-5)
    rest = np.setdiff1d(np.arange(total), computed)
    assert not part.model_heat[rest].any()
    if part.model_counterfactual is not None:
        np.testing.assert_array_equal(part.model_counterfactual[rest], part.model_input[rest])


# ---- what a parameter change recomputes (Parameter.recompute), per method ------------------------------
#: method -> (base parameters, a change, per-slice network and classifier evaluations of the base run and of
#: the changed one, K = grid moves, R = CDM steps); a repeat of either costs nothing
K, R = len(timestep_grid(FAST["noise_level"], FAST["steps"])) - 1, FAST["steps"]
SLIDER_RULES = [
    ("igconda", {"guidance_scale": 3.0}, {"guidance_scale": 1.0}, (3 * K, 0), (2 * K, 0)),  # decode only
    ("igconda", {"guidance_scale": 3.0}, {"noise_level": 30}, (3 * K, 0), (3 * K, 0)),
    ("cg-ddim", {"classifier_scale": SCALE}, {"classifier_scale": 5.0}, (2 * K, 1 + K), (K, K)),  # decode only
    ("cg-ddim", {"classifier_scale": SCALE}, {"steps": 2}, (2 * K, 1 + K), (2 * 2, 2)),
    ("cg-ddpm", {"classifier_scale": SCALE}, {"classifier_scale": 5.0}, (K, 1 + K), (K, K)),  # everything again
    ("cg-ddpm", {"classifier_scale": SCALE}, {"seed": 4}, (K, 1 + K), (K, K)),
    ("cdm", {"tau": 0.95}, {"tau": 0.5}, (2 * R, 0), (2 * R, 0)),
    ("cdm", {"tau": 0.95}, {"seed": 4}, (2 * R, 0), (2 * R, 0)),
    ("cg-cdm", {"classifier_scale": SCALE}, {"classifier_scale": 5.0}, (2 * R, 1 + 2 * R), (2 * R, 2 * R)),
    ("cg-cdm", {"classifier_scale": SCALE}, {"tau": 0.5}, (2 * R, 1 + 2 * R), (2 * R, 2 * R)),
]


@pytest.mark.parametrize("method, base, change, first, changed", SLIDER_RULES,
                         ids=[f"{m}-{next(iter(c))}" for m, _, c, _, _ in SLIDER_RULES])
def test_slider_reuse_rules(tiny_checkpoint, tiny_classifier, pet_slab, method, base, change, first, changed):
    model = load(tiny_checkpoint, tiny_classifier, method)
    params = {**FAST, **base}
    run = model.run(pet_slab, **params)
    n = run.computed_slices
    assert (run.network_evaluations, run.classifier_evaluations) == (first[0] * n, first[1] * n)
    assert run.method == method
    repeat = model.run(pet_slab, **params)
    assert (repeat.network_evaluations, repeat.classifier_evaluations) == (0, 0)
    np.testing.assert_array_equal(repeat.heatmap.voxels, run.heatmap.voxels)
    moved = model.run(pet_slab, **{**params, **change})
    assert (moved.network_evaluations, moved.classifier_evaluations) == (changed[0] * n, changed[1] * n)
    assert not np.array_equal(moved.model_heat, run.model_heat)
    back = model.run(pet_slab, **params)  # the slider moved back: still cached
    assert (back.network_evaluations, back.classifier_evaluations) == (0, 0)
    np.testing.assert_array_equal(back.heatmap.voxels, run.heatmap.voxels)


# ---- outputs ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["cg-ddim", "cg-ddpm", "cg-cdm"])
def test_outputs_on_the_input_grid_with_a_confidence_per_slice(tiny_checkpoint, tiny_classifier, oblique_pet,
                                                              method):
    model = load(tiny_checkpoint, tiny_classifier, method)
    fractions = []
    res = model.run(oblique_pet, noise_level=40, steps=1, progress=lambda f, m: fractions.append(f))
    assert res.method == method and fractions[-1] == 1.0 and fractions == sorted(fractions)
    assert res.heatmap.voxels.shape == oblique_pet.voxels.shape
    np.testing.assert_array_equal(res.heatmap.ijk_to_ras, oblique_pet.ijk_to_ras)
    assert res.heatmap.voxels.min() >= 0 and res.heatmap.voxels.max() > 0
    if method == "cg-cdm":
        assert res.counterfactual is None and res.model_counterfactual is None
        assert "(1 - tau)" in res.heatmap.units
    else:
        assert res.counterfactual.voxels.shape == oblique_pet.voxels.shape
        np.testing.assert_array_equal(res.counterfactual.ijk_to_ras, oblique_pet.ijk_to_ras)
        assert res.heatmap.units == "|SUVbw difference|"
    confidence = res.classifier_confidence
    assert confidence.shape == (len(res.model_input),) and np.all((confidence >= 0) & (confidence <= 1))


def test_cancel_stops_before_the_network_and_the_classifier(tiny_checkpoint, tiny_classifier, pet_slab):
    for method in ("cg-ddim", "cg-ddpm", "cg-cdm"):
        model = load(tiny_checkpoint, tiny_classifier, method)
        with pytest.raises(Cancelled):
            model.run(pet_slab, **FAST, cancel=lambda: True)
        assert model.network_evaluations == 0 and model.classifier_evaluations == 0 and len(model.cache) == 0


def test_cdm_without_classifier_has_no_confidence(tiny_checkpoint, tiny_classifier, pet_slab):
    res = load(tiny_checkpoint, tiny_classifier, "cdm").run(pet_slab, **FAST)
    assert isinstance(load(tiny_checkpoint, tiny_classifier, "cdm"), CdmModel)
    assert res.classifier_confidence is None and res.classifier_evaluations == 0
