"""Noise schedules (Sec. 3): grids, identities, conversions and the forward process's moments."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dmd2

EDM, VP = dmd2.EDMSchedule(), dmd2.VPSchedule()


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
       which=st.sampled_from(["edm", "vp"]))
def test_eps_x0_round_trip(shape, seed, which):
    sch = EDM if which == "edm" else VP
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g)
    eps = torch.randn(shape, generator=g)
    t = torch.randint(0, 1000, (shape[0],), generator=g)
    x_t = sch.add_noise(x0, eps, t)
    torch.testing.assert_close(sch.eps_to_x0(x_t, eps, t), x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sch.x0_to_eps(x_t, x0, t), eps, atol=1e-4, rtol=1e-4)
    # and against the definition, elementwise
    a = sch.alphas[t].reshape(-1, *[1] * (len(shape) - 1))
    s = sch.sigmas[t].reshape(-1, *[1] * (len(shape) - 1))
    torch.testing.assert_close(x_t.double(), a * x0.double() + s * eps.double(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("sch", [EDM, VP], ids=["edm", "vp"])
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
