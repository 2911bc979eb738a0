"""Eq. (1) against exact scores of Gaussian and Gaussian-mixture data, and classifier-free guidance."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dmd2
from helpers import Counter, GaussianMixture

SCHEDULES = {"edm": dmd2.EDMSchedule(), "vp": dmd2.VPSchedule(), "flow": dmd2.FlowSchedule(3.0)}


@settings(deadline=None, max_examples=30)
@given(seed=st.integers(0, 2**31 - 1), which=st.sampled_from(["edm", "vp", "flow"]), dim=st.integers(1, 6),
       k=st.integers(1, 3))
def test_eq1_is_the_exact_score_of_a_gaussian_mixture(seed, which, dim, k):
    # Eq. (1) applied to the exact posterior mean must equal grad log p_t from autograd of the density.
    sch = SCHEDULES[which]
    g = torch.Generator().manual_seed(seed)
    gmm = GaussianMixture(torch.randn(k, dim, generator=g) * 2, torch.rand(k, generator=g) + 0.2,
                          torch.rand(k, generator=g) + 0.1)
    t = torch.randint(0, 1000, (16,), generator=g)
    a, s = sch.alphas[t][:, None], sch.sigmas[t][:, None]
    x_t = a * gmm.sample(16, g) + s * torch.randn(16, dim, generator=g, dtype=torch.float64)  # float64 throughout
    x0 = gmm.posterior_mean(x_t, a[:, 0], s[:, 0])
    expected = gmm.score_autograd(x_t, a[:, 0], s[:, 0])
    torch.testing.assert_close(dmd2.score(x_t, x0, t, sch), expected, rtol=1e-6, atol=1e-6 * expected.abs().max())


def test_eq1_single_gaussian_closed_form():
    # p = N(m, s^2): s_t(x_t) = -(x_t - alpha m) / (alpha^2 s^2 + sigma^2), written out without any helper.
    sch = SCHEDULES["vp"]
    m, s = 1.5, 0.3
    t = torch.tensor([0, 100, 500, 999])
    x_t = torch.tensor([[0.1], [2.0], [-1.0], [0.5]])
    a, sg = sch.alphas[t].float()[:, None], sch.sigmas[t].float()[:, None]
    v = a**2 * s**2 + sg**2
    x0 = m + a * s**2 / v * (x_t - a * m)  # posterior mean
    torch.testing.assert_close(dmd2.score(x_t, x0, t, sch), -(x_t - a * m) / v, rtol=1e-4, atol=1e-5)


def test_cfg_formula():
    c, u = torch.randn(4, 3), torch.randn(4, 3)
    torch.testing.assert_close(dmd2.cfg(c, u, 1.0), c)
    torch.testing.assert_close(dmd2.cfg(c, u, 0.0), u)
    torch.testing.assert_close(dmd2.cfg(c, u, 8.0), u + 8 * (c - u))
    assert not torch.allclose(dmd2.cfg(c, u, 8.0), c + 8 * (c - u)), "the paper's w is uncond + w (cond - uncond)"


def _cond_net(x_t, t, cond):
    # a denoiser whose output depends on the condition, per sample: dict or tensor condition
    e = cond["emb"] if isinstance(cond, dict) else cond
    return x_t * 0.5 + e.float().reshape(len(x_t), *[1] * (x_t.ndim - 1))


@pytest.mark.parametrize("as_dict", [False, True])
def test_guided_batches_uncond_into_one_call(as_dict):
    x_t, t = torch.randn(3, 2, 4, 4), torch.tensor([5, 6, 7])
    cond, uncond = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0])  # uncond given once, broadcast to B
    if as_dict:
        cond, uncond = {"emb": cond}, {"emb": uncond}
    net = Counter(_cond_net)
    out = dmd2.guided(net, 1.75, uncond)(x_t, t, cond)
    assert len(net.calls) == 1 and len(net.calls[0]["x_t"]) == 6, "cond and uncond in one batched call"
    expected = dmd2.cfg(_cond_net(x_t, t, cond), _cond_net(x_t, t, dmd2._expand(uncond, 3)), 1.75)
    torch.testing.assert_close(out, expected)


def test_guided_w1_is_the_conditional_prediction_without_the_extra_pass():
    net = Counter(_cond_net)
    x_t, t, cond = torch.randn(2, 3), torch.tensor([1, 2]), torch.tensor([1.0, -1.0])
    torch.testing.assert_close(dmd2.guided(net, 1.0, torch.zeros(1))(x_t, t, cond), _cond_net(x_t, t, cond))
    assert len(net.calls) == 1 and len(net.calls[0]["x_t"]) == 2


def test_guided_needs_uncond():
    with pytest.raises(ValueError, match="uncond"):
        dmd2.guided(_cond_net, 3.0, None)
