"""Noise schedules (Sec. 3): grids, identities, conversions and the forward process's moments."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dmd2

EDM, VP, FLOW = dmd2.EDMSchedule(), dmd2.VPSchedule(), dmd2.FlowSchedule(3.0)


def test_edm_grid_endpoints_and_order():
    s = EDM.sigmas
    assert len(s) == 1000 and EDM.T == 1000
    assert s[0].item() == pytest.approx(0.002, rel=1e-12) and s[-1].item() == pytest.approx(80.0, rel=1e-12)
    assert (s[1:] > s[:-1]).all(), "index 0 is the smallest sigma, strictly increasing"
    assert (EDM.alphas == 1).all()


def test_edm_grid_is_karras_rho_7():
    # independent form: sigma_i = (a + i/(N-1) (b - a))^7 with a = 0.002^(1/7), b = 80^(1/7) (numpy, float64)
    i = np.array([0, 1, 137, 500, 998, 999])
    a, b = 0.002 ** (1 / 7), 80 ** (1 / 7)
    np.testing.assert_allclose(EDM.sigmas[i].numpy(), (a + i / 999 * (b - a)) ** 7, rtol=1e-12)


def test_vp_default_is_sd_scaled_linear():
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    abar = np.cumprod(1 - betas)
    np.testing.assert_allclose(VP.alphas.numpy() ** 2, abar, rtol=1e-10)
    assert abar[-1] > 0.004, "abar[999] is not zero: pure noise must be fed explicitly"
    assert VP.prior(torch.ones(2)).tolist() == [1.0, 1.0]


@pytest.mark.parametrize("abar", [None, torch.linspace(0.9999, 0.001, 1000),
                                  torch.cos(torch.linspace(0.01, 1.5, 50)) ** 2])
def test_vp_identities(abar):
    s = dmd2.VPSchedule(abar)
    np.testing.assert_allclose((s.alphas**2 + s.sigmas**2).numpy(), 1.0, atol=1e-12)
    snr = s.alphas**2 / s.sigmas**2
    assert (snr[1:] < snr[:-1]).all(), "SNR strictly decreasing in t"


def test_vp_rejects_bad_alphas_cumprod():
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        dmd2.VPSchedule(torch.tensor([1.0, 0.5, 0.0]))


def test_loss_weights():
    t = torch.tensor([0, 10, 500, 999])
    s = EDM.sigmas[t]
    torch.testing.assert_close(EDM.loss_weight(t).double(), (s**2 + 0.25) / (s * 0.5) ** 2, rtol=1e-6, atol=0)
    torch.testing.assert_close(VP.loss_weight(t).double(), VP.alphas[t] ** 2 / VP.sigmas[t] ** 2, rtol=1e-6, atol=0)


@settings(deadline=None, max_examples=40)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), seed=st.integers(0, 2**31 - 1),
       which=st.sampled_from(["edm", "vp", "flow"]))
def test_eps_x0_round_trip(shape, seed, which):
    sch = {"edm": EDM, "vp": VP, "flow": FLOW}[which]
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g)
    eps = torch.randn(shape, generator=g)
    t = torch.randint(0, 999 if which == "flow" else 1000, (shape[0],), generator=g)  # flow: alpha 0 at 999
    x_t = sch.add_noise(x0, eps, t)
    if which == "flow":  # a flow network's x0 comes from its velocity; eps_to_x0 would divide by alpha = 0 at 999
        with pytest.raises(NotImplementedError):
            sch.eps_to_x0(x_t, eps, t)
        torch.testing.assert_close(sch.velocity_to_x0(x_t, eps - x0, t), x0, atol=1e-4, rtol=1e-4)
    else:
        torch.testing.assert_close(sch.eps_to_x0(x_t, eps, t), x0, atol=1e-4, rtol=1e-4)
    # and against the definition, elementwise
    a = sch.alphas[t].reshape(-1, *[1] * (len(shape) - 1))
    s = sch.sigmas[t].reshape(-1, *[1] * (len(shape) - 1))
    torch.testing.assert_close(x_t.double(), a * x0.double() + s * eps.double(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("sch", [EDM, VP, FLOW], ids=["edm", "vp", "flow"])
@pytest.mark.parametrize("t", [0, 300, 999])
def test_add_noise_moments(sch, t):
    g = torch.Generator().manual_seed(t)
    n, c = 200_000, 0.7
    x = torch.full((n, 1), c)
    x_t = sch.add_noise(x, torch.randn(n, 1, generator=g), torch.full((n,), t))
    a, s = sch.alphas[t].item(), sch.sigmas[t].item()
    assert x_t.mean().item() == pytest.approx(a * c, abs=5 * s / n**0.5)
    assert x_t.std().item() == pytest.approx(s, rel=0.01)


def test_lookup_broadcasts_over_any_rank():
    t = torch.tensor([3, 999])
    for shape in [(2,), (2, 5), (2, 3, 4, 4), (2, 1, 2, 3, 4)]:
        assert EDM.sigma(t, torch.zeros(shape)).shape == (2,) + (1,) * (len(shape) - 1)


# ----------------------------------------------------------------------------------------------------
# Rectified flow (SD3): x_t = (1 - sigma) x + sigma eps on a shifted grid, velocity v = eps - x


def _shift(s, u):  # SD3's timestep shift, written out
    return s * u / (1 + (s - 1) * u)


@settings(deadline=None, max_examples=40)
@given(shift=st.floats(0.2, 12.0), T=st.integers(2, 3000))
def test_flow_grid_endpoints_and_monotone_snr(shift, T):
    s = dmd2.FlowSchedule(shift, T)
    assert s.T == T and s.sigmas[-1].item() == 1.0 and s.alphas[-1].item() == 0.0, "pure noise at the last index"
    assert s.sigmas[0].item() == pytest.approx(_shift(shift, 1 / T), rel=1e-12)
    assert ((s.alphas + s.sigmas) == 1).all() and (s.sigmas > 0).all() and (s.alphas >= 0).all()
    snr = s.alphas**2 / s.sigmas**2
    assert (snr[1:] < snr[:-1]).all(), "SNR strictly decreasing in t"


@settings(deadline=None, max_examples=40)
@given(a=st.floats(0.2, 8.0), b=st.floats(0.2, 8.0), T=st.integers(2, 2000))
def test_flow_shift_is_a_group(a, b, T):
    """shift_a(shift_b(u)) = shift_ab(u): shifting a grid by a and by b is shifting it by a b; shift 1 is none."""
    np.testing.assert_allclose(_shift(a, dmd2.FlowSchedule(b, T).sigmas.numpy()),
                               dmd2.FlowSchedule(a * b, T).sigmas.numpy(), rtol=1e-9)
    np.testing.assert_allclose(dmd2.FlowSchedule(1.0, T).sigmas.numpy(), np.arange(1, T + 1) / T, rtol=1e-12)


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
@pytest.mark.parametrize("T", [1000, 64])
def test_flow_grid_is_diffusers_table(shift, T):
    """Our ascending table is diffusers' FlowMatchEulerDiscreteScheduler(shift).sigmas at init, flipped; and the
    student's steps are what the scheduler makes of the UNSHIFTED sigmas 1, 0.75, 0.5, 0.25 (it shifts them)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift)
    ours = dmd2.FlowSchedule(shift, T)
    np.testing.assert_allclose(ours.sigmas.numpy(), sch.sigmas.flip(0).double().numpy(), rtol=2e-6)
    np.testing.assert_allclose(T * ours.sigmas.numpy(), sch.timesteps.flip(0).double().numpy(), rtol=2e-6)
    steps = dmd2.step_timesteps(4, T)
    sch.set_timesteps(sigmas=[1 - i / 4 for i in range(4)])
    np.testing.assert_allclose(ours.sigmas[steps].numpy(), sch.sigmas[:4].double().numpy(), rtol=2e-6)


@settings(deadline=None, max_examples=30)
@given(seed=st.integers(0, 2**31 - 1), shift=st.floats(0.5, 6.0))
def test_flow_velocity_and_loss(seed, shift):
    """x0 = x_t - sigma v recovers x, at every t (finite at sigma 1); the denoising loss with the flow's weight
    is the flow-matching loss |v_pred - (eps - x)|^2 of a velocity network."""
    sch, g = dmd2.FlowSchedule(shift), torch.Generator().manual_seed(seed)
    x, eps = torch.randn(6, 3, 2, 2, generator=g), torch.randn(6, 3, 2, 2, generator=g)
    t = torch.cat([torch.randint(0, 999, (5,), generator=g), torch.tensor([999])])
    x_t = sch.add_noise(x, eps, t)
    torch.testing.assert_close(sch.velocity_to_x0(x_t, eps - x, t), x, atol=1e-5, rtol=1e-5)
    w = torch.randn(3, generator=g)  # a "network": v = w * x_t (per channel)
    def velocity(x_t):
        return w[None, :, None, None] * x_t
    loss = dmd2.denoising_loss(x, lambda x_t, t, c: sch.velocity_to_x0(x_t, velocity(x_t), t), sch, t=t, noise=eps)
    torch.testing.assert_close(loss, (velocity(x_t) - (eps - x)).pow(2).mean(), rtol=1e-4, atol=1e-6)


def test_flow_rejects_a_bad_shift():
    with pytest.raises(ValueError, match="shift"):
        dmd2.FlowSchedule(0.0)
