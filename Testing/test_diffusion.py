"""The shared diffusion pieces: the card's schedule, timestep grids and the IgCONDA-PET loops
(stride-1 reference loop = MONAI's DDIMScheduler; strided grid = the hand-written ddim_step)."""

import numpy as np
import pytest
import torch
from monai.networks.schedulers import DDIMScheduler

from DiffusionAnomalyLib.card import REFERENCE_STEPS, default_card
from DiffusionAnomalyLib.diffusion import DDIM, ddim_step, monai_scheduler, timestep_grid
from DiffusionAnomalyLib.methods.igconda import IgcondaModel
from DiffusionAnomalyLib.networks import build_model


def test_timestep_grid_reference_and_strided():
    assert timestep_grid(5, REFERENCE_STEPS) == [0, 1, 2, 3, 4, 5]
    assert timestep_grid(400, 10) == list(range(0, 401, 40))
    assert timestep_grid(400, 20) == list(range(0, 401, 20))  # the demo's grid
    assert timestep_grid(7, 3) == [0, 2, 5, 7]  # round(n * D / K): the grid always ends at the noise level
    assert timestep_grid(5, 5) == timestep_grid(5, REFERENCE_STEPS)
    assert timestep_grid(3, 10) == [0, 1, 2, 3]  # never more points than the stride-1 grid
    with pytest.raises(ValueError):
        timestep_grid(0, REFERENCE_STEPS)
    for other in (None, 0, -1, "default", "", True, 2.5):  # one representation: int >= 1 or "reference"
        with pytest.raises(ValueError):
            timestep_grid(10, other)


def test_card_schedule_is_the_one_every_stage_uses():
    """The card's scheduler section is honoured, and training noise, alpha_bar and both DDIM paths
    use the same float32 schedule; the demo card's is the one METHODS.md states."""
    section = default_card()["scheduler"]
    abar = monai_scheduler(section).alphas_cumprod
    assert abar.dtype == torch.float32 and abar.shape == (1000,)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)  # METHODS.md: linear 1e-4 .. 0.02, T = 1000
    np.testing.assert_allclose(abar.double().numpy(), torch.cumprod(1 - betas, 0).numpy(), rtol=1e-5)

    ddim = DDIM(section)
    assert ddim.abar == abar.tolist()
    assert torch.equal(ddim.scheduler.alphas_cumprod, abar) and not ddim.scheduler.clip_sample
    assert ddim.scheduler.num_train_timesteps // ddim.scheduler.num_inference_steps == 1  # stride 1

    # training noise: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with the same abar, bit for bit
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(16, 1, 4, 4, generator=g), torch.randn(16, 1, 4, 4, generator=g)
    t = torch.randint(0, 1000, (16,), generator=g)
    expected = abar[t].sqrt()[:, None, None, None] * x0 + (1 - abar[t]).sqrt()[:, None, None, None] * noise
    assert torch.equal(monai_scheduler(section).add_noise(x0, noise, t), expected)

    # a card with other betas changes what the methods use
    other = dict(section, beta_end=0.03)
    assert not torch.equal(monai_scheduler(other).alphas_cumprod, abar)
    assert DDIM(other).abar == monai_scheduler(other).alphas_cumprod.tolist()


def test_ddim_step_inverts_itself_for_constant_eps():
    abar = DDIM(default_card()["scheduler"]).abar
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    eps = torch.randn_like(x)
    up = ddim_step(x, eps, abar[10], abar[300])
    back = ddim_step(up, eps, abar[300], abar[10])
    torch.testing.assert_close(back, x)


def test_ddim_move_reference_uses_monai_strided_uses_ddim_step():
    ddim = DDIM(default_card()["scheduler"])
    g = torch.Generator().manual_seed(0)
    x, eps = torch.rand(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    a = ddim.abar
    # integer steps: exactly the hand-written step (the demo's strided numbers stay bit-identical)
    assert torch.equal(ddim.move(x, eps, 20, 40, 20), ddim_step(x, eps, a[20], a[40]))
    assert torch.equal(ddim.move(x, eps, 1, 0, 3), ddim_step(x, eps, a[1], a[0]))
    # reference: MONAI's reversed_step (t -> t+1) and step (t -> t-1), the hand step within rounding
    assert torch.equal(ddim.move(x, eps, 7, 8, REFERENCE_STEPS), ddim.scheduler.reversed_step(eps, 7, x)[0])
    assert torch.equal(ddim.move(x, eps, 8, 7, REFERENCE_STEPS), ddim.scheduler.step(eps, 8, x)[0])
    torch.testing.assert_close(ddim.move(x, eps, 7, 8, REFERENCE_STEPS), ddim_step(x, eps, a[7], a[8]),
                               atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ddim.move(x, eps, 1, 0, REFERENCE_STEPS), ddim_step(x, eps, a[1], a[0]),
                               atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError):
        ddim.move(x, eps, 0, 2, REFERENCE_STEPS)


class _Recorder(torch.nn.Module):
    """Wraps a network and records the timesteps and labels it is evaluated at."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.embed = inner.embed
        self.calls = []

    def context(self, labels):
        self.calls.append(("labels", labels.tolist()))
        return self.inner.context(labels)

    def forward(self, x, t, context=None):
        self.calls.append(("t", int(t[0])))
        return self.inner(x, t, context)


@pytest.fixture(scope="module")
def tiny_net():
    card = default_card(channels=(8, 16, 16), in_plane_size=(16, 16))
    card["network"]["unet"]["norm_num_groups"] = 8
    card["network"]["unet"]["num_head_channels"] = 8
    card["id"] = "tiny"
    torch.manual_seed(0)
    net = build_model(card).eval()
    with torch.no_grad():  # MONAI zero-initialises output projections: give them weights so the
        for p in net.parameters():  # condition actually changes eps (as in a trained model)
            if not p.any():
                p.normal_(0, 0.05)
    return net, card


def _hand_loop(net, card, x, D, w):
    """The stride-1 loop as the project wrote it by hand before MONAI's scheduler ran it."""
    abar = monai_scheduler(card["scheduler"]).alphas_cumprod.tolist()
    n = len(x)
    null, healthy = net.context(torch.zeros(n, dtype=torch.long)), net.context(torch.ones(n, dtype=torch.long))
    z = x.clone()
    with torch.no_grad():
        for t in range(D):
            z = ddim_step(z, net(z, torch.full((n,), t), null), abar[t], abar[t + 1])
        for t in range(D, 0, -1):
            tt = torch.full((n,), t)
            e_u, e_h = net(z, tt, null), net(z, tt, healthy)
            z = ddim_step(z, e_u + w * (e_h - e_u), abar[t], abar[t - 1])
    return z


def test_stride1_loop_matches_monai_reference_and_the_old_hand_loop(tiny_net):
    """steps="reference" == the IgCONDA-PET reference: MONAI DDIM, 1000 inference steps, no clipping,
    reversed_step at t = 0..D-1 with the null label, step at t = D..1 with CFG; and it equals the
    former hand-written stride-1 loop within float32 rounding."""
    net, card = tiny_net
    D, w = 6, 2.5
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    ours = IgcondaModel(net, card, device="cpu").counterfactual(x, noise_level=D, guidance_scale=w,
                                                                steps=REFERENCE_STEPS)

    sched = DDIMScheduler(num_train_timesteps=1000, schedule="linear_beta", clip_sample=False)
    sched.set_timesteps(1000)
    null = net.context(torch.zeros(3, dtype=torch.long))
    healthy = net.context(torch.ones(3, dtype=torch.long))
    z = x.clone()
    with torch.no_grad():
        for t in range(D):  # encoding: network at t = 0..D-1, each reversed step t -> t+1
            eps = net(z, torch.full((3,), t), null)
            z, _ = sched.reversed_step(eps, t, z)
        for t in range(D, 0, -1):  # decoding: network at t = D..1, each step t -> t-1
            tt = torch.full((3,), t)
            e_u, e_h = net(z, tt, null), net(z, tt, healthy)
            z, _ = sched.step(e_u + w * (e_h - e_u), t, z)
    torch.testing.assert_close(ours, z, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(ours, _hand_loop(net, card, x, D, w), atol=2e-5, rtol=1e-4)


def test_loops_visit_the_timesteps_methods_md_states(tiny_net):
    """METHODS.md: reference encoding evaluates the network at t = 0..D-1, decoding at t = D..1;
    a strided grid visits its points; encoding is unconditional, decoding pairs null and healthy."""
    net, card = tiny_net
    rec = _Recorder(net)
    model = IgcondaModel(rec, card, device="cpu")
    model.counterfactual(torch.rand(2, 1, 16, 16), noise_level=4, guidance_scale=3.0, steps=REFERENCE_STEPS)
    assert [v for k, v in rec.calls if k == "t"] == [0, 1, 2, 3, 4, 3, 2, 1]
    labels = [v for k, v in rec.calls if k == "labels"]
    assert labels[0] == [0, 0]  # encoding: unconditional
    assert labels[-1] == [0, 0, 1, 1]  # decoding: null and healthy share one batch
    assert model.network_evaluations == 2 * 4 + 2 * 2 * 4
    rec.calls.clear()
    model.counterfactual(torch.rand(2, 1, 16, 16), noise_level=400, guidance_scale=3.0, steps=4)
    assert [v for k, v in rec.calls if k == "t"] == [0, 100, 200, 300, 400, 300, 200, 100]
    rec.calls.clear()
    model.counterfactual(torch.rand(2, 1, 16, 16), noise_level=7, guidance_scale=3.0, steps=3)
    assert [v for k, v in rec.calls if k == "t"] == [0, 2, 5, 7, 5, 2]


def test_steps_none_means_card_default_only_in_resolve(tiny_net):
    net, card = tiny_net
    model = IgcondaModel(net, card, device="cpu")
    assert model.resolve()["steps"] == card["inference_defaults"]["steps"] == 10
    assert model.resolve(steps="reference")["steps"] == REFERENCE_STEPS
    assert model.resolve(steps="7")["steps"] == 7
    for bad in (0, "default", -3):
        with pytest.raises(ValueError):
            model.resolve(steps=bad)
    with pytest.raises(ValueError):  # below resolve, None is not a steps value
        model.counterfactual(torch.rand(1, 1, 16, 16), noise_level=4, steps=None)


def test_counterfactual_is_deterministic_and_guidance_matters(tiny_net):
    net, card = tiny_net
    model = IgcondaModel(net, card, device="cpu")
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    a = model.counterfactual(x, noise_level=50, guidance_scale=3.0, steps=5)
    b = model.counterfactual(x, noise_level=50, guidance_scale=3.0, steps=5)
    c = model.counterfactual(x, noise_level=50, guidance_scale=0.0, steps=5)
    assert a.shape == x.shape
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


# ---- arithmetic precision --------------------------------------------------------------------
def test_precision_choice(monkeypatch):
    from DiffusionAnomalyLib import networks

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert networks.pick_precision("fp32", cpu) == "fp32"
    assert networks.pick_precision("BF16", cpu) == "bf16"
    assert networks.pick_precision("auto", cuda) == "fp32"
    monkeypatch.setattr(networks, "cpu_has_native_bf16", lambda: True)
    assert networks.pick_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(networks, "cpu_has_native_bf16", lambda: False)
    assert networks.pick_precision("auto", cpu) == "fp32"
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        networks.pick_precision("fp16", cpu)


def test_bf16_counterfactual_is_deterministic_and_close_to_fp32(tiny_net):
    net, card = tiny_net
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    fp32 = IgcondaModel(net, card, device="cpu", precision="fp32")
    bf16 = IgcondaModel(net, card, device="cpu", precision="bf16")
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    ref = fp32.counterfactual(x, noise_level=50, guidance_scale=3.0, steps=5)
    a = bf16.counterfactual(x, noise_level=50, guidance_scale=3.0, steps=5)
    b = bf16.counterfactual(x, noise_level=50, guidance_scale=3.0, steps=5)
    assert a.dtype == torch.float32 and a.shape == x.shape
    assert torch.equal(a, b), "bf16 inference must be deterministic on CPU"
    assert not torch.equal(a, ref), "bf16 was requested but the network ran in fp32"
    # bf16 keeps ~3 significant digits in the network; the DDIM update stays fp32
    assert float((a - ref).abs().max()) < 0.05 * float(ref.abs().max())


def test_the_usable_noise_levels_stop_where_alpha_bar_vanishes(tiny_card):
    from DiffusionAnomalyLib.diffusion import DDIM, MIN_ALPHA_BAR

    assert DDIM(tiny_card["scheduler"]).max_noise_level == 999  # the demo schedule: every level usable
    steep = DDIM({"num_train_timesteps": 1000, "schedule": "linear_beta", "beta_start": 1e-4, "beta_end": 0.5})
    d = steep.max_noise_level
    assert d < 609 and steep.abar[d] > MIN_ALPHA_BAR >= steep.abar[d + 1]


def test_a_card_whose_default_noise_level_breaks_its_schedule_is_refused_at_load(tiny_card):
    import copy

    from DiffusionAnomalyLib.card import CheckpointError
    from DiffusionAnomalyLib.methods.igconda import IgcondaModel
    from DiffusionAnomalyLib.networks import build_model

    card = copy.deepcopy(tiny_card)
    card["scheduler"].update(beta_start=1e-4, beta_end=0.5)
    card["inference_defaults"]["noise_level"] = 700
    with pytest.raises(CheckpointError, match="default noise level D must be at most"):
        IgcondaModel(build_model(card), card, device="cpu")
