"""The shared diffusion pieces: timestep grids and the reference (stride-1) IgCONDA-PET loop."""

import numpy as np
import pytest
import torch
from monai.networks.schedulers import DDIMScheduler

from DiffusionAnomalyLib.diffusion import alphas_cumprod, ddim_step, timestep_grid
from DiffusionAnomalyLib.methods.igconda import IgcondaModel
from DiffusionAnomalyLib.networks import build_model
from DiffusionAnomalyLib.training import default_card

SCHED = {"num_train_timesteps": 1000, "schedule": "linear_beta", "beta_start": 1e-4, "beta_end": 0.02}


def test_timestep_grid_reference_and_strided():
    assert timestep_grid(5, None) == [0, 1, 2, 3, 4, 5]
    assert timestep_grid(400, 10) == list(range(0, 401, 40))
    g = timestep_grid(7, 3)
    assert g[0] == 0 and g[-1] == 7 and len(g) == 4 and g == sorted(set(g))
    assert timestep_grid(5, 5) == timestep_grid(5, None)
    assert timestep_grid(3, 10) == [0, 1, 2, 3]  # never more points than the stride-1 grid
    with pytest.raises(ValueError):
        timestep_grid(0, None)
    with pytest.raises(ValueError):
        timestep_grid(10, 0)


def test_schedule_is_monai_linear_beta():
    abar = alphas_cumprod(SCHED).double()
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    np.testing.assert_allclose(abar.numpy(), torch.cumprod(1 - betas, 0).numpy(), rtol=1e-5)


def test_ddim_step_inverts_itself_for_constant_eps():
    abar = alphas_cumprod(SCHED)
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    eps = torch.randn_like(x)
    up = ddim_step(x, eps, float(abar[10]), float(abar[300]))
    back = ddim_step(up, eps, float(abar[300]), float(abar[10]))
    torch.testing.assert_close(back, x)


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
def tiny_model():
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


def test_stride1_loop_matches_monai_reference(tiny_model):
    """steps=None == the IgCONDA-PET reference: MONAI DDIM, 1000 inference steps, no clipping,
    reversed_step at t = 0..D-1 with the null label, step at t = D..1 with CFG."""
    net, card = tiny_model
    D, w = 6, 2.5
    x = torch.rand(3, 1, 16, 16)
    ours = IgcondaModel(net, card, device="cpu").counterfactual(x, noise_level=D, guidance_scale=w, steps=None)

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


def test_loop_visits_reference_timesteps_and_batches_pairs(tiny_model):
    net, card = tiny_model
    rec = _Recorder(net)
    model = IgcondaModel(rec, card, device="cpu")
    model.counterfactual(torch.rand(2, 1, 16, 16), noise_level=4, guidance_scale=3.0, steps=None)
    ts = [v for k, v in rec.calls if k == "t"]
    assert ts == [0, 1, 2, 3, 4, 3, 2, 1]
    labels = [v for k, v in rec.calls if k == "labels"]
    assert labels[0] == [0, 0]  # encoding: unconditional
    assert labels[-1] == [0, 0, 1, 1]  # decoding: null and healthy share one batch
    rec.calls.clear()
    model.counterfactual(torch.rand(2, 1, 16, 16), noise_level=400, guidance_scale=3.0, steps=4)
    assert [v for k, v in rec.calls if k == "t"] == [0, 100, 200, 300, 400, 300, 200, 100]


def test_counterfactual_is_deterministic_and_guidance_matters(tiny_model):
    net, card = tiny_model
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


def test_bf16_counterfactual_is_deterministic_and_close_to_fp32(tiny_model):
    net, card = tiny_model
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
