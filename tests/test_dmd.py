"""Distribution matching gradient (Eq. 2), its loss, and the fake score loss."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dmd2
from helpers import Counter, GaussianMixture, TinyCritic

SCHEDULES = {"edm": dmd2.EDMSchedule(), "vp": dmd2.VPSchedule(), "flow": dmd2.FlowSchedule(3.0)}


def _gaussian_setup(which, seed, dim=4, n=64):
    sch = SCHEDULES[which]
    g = torch.Generator().manual_seed(seed)
    real = GaussianMixture(torch.full((1, dim), 1.0), [0.5])
    fake = GaussianMixture(torch.full((1, dim), -0.5), [0.8])
    x = fake.sample(n, g).float()
    t = torch.randint(20, 981, (n,), generator=g)
    noise = torch.randn(n, dim, generator=g)
    return sch, real, fake, x, t, noise


@pytest.mark.parametrize("which", ["edm", "vp", "flow"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dmd_gradient_gaussian_closed_form(which, seed):
    sch, real, fake, x, t, noise = _gaussian_setup(which, seed)
    grad = dmd2.dmd_gradient(x, real.denoiser(sch), fake.denoiser(sch), sch, t=t, noise=noise)

    # Closed form for Gaussians N(m, s^2): E[x | x_t] = m + a s^2 / (a^2 s^2 + sigma^2) (x_t - a m)
    a, sg = sch.alphas[t][:, None], sch.sigmas[t][:, None]
    x_t = a * x.double() + sg * noise.double()
    def post(m, s):
        return m + a * s**2 / (a**2 * s**2 + sg**2) * (x_t - a * m)
    x0_real, x0_fake = post(1.0, 0.5), post(-0.5, 0.8)
    norm = (x.double() - x0_real).abs().mean(1, keepdim=True)
    torch.testing.assert_close(grad.double(), (x0_fake - x0_real) / norm, rtol=1e-3, atol=1e-4)  # float32 at sigma=80

    # ... which is Eq. (2)'s -(s_real - s_fake), up to the positive per-sample factor sigma^2 / (alpha norm)
    s_real = real.score_autograd(x_t, a[:, 0], sg[:, 0])
    s_fake = fake.score_autograd(x_t, a[:, 0], sg[:, 0])
    torch.testing.assert_close(grad.double() * norm * a / sg**2, -(s_real - s_fake), rtol=1e-3, atol=1e-4)


def test_descending_dmd_loss_moves_fake_samples_toward_real():
    sch, real, fake, x, t, noise = _gaussian_setup("vp", 0, n=512)
    x = x.requires_grad_(True)
    grad = dmd2.dmd_gradient(x, real.denoiser(sch), fake.denoiser(sch), sch, t=t, noise=noise)
    dmd2.dmd_loss(x, grad).backward()
    assert (-x.grad).mean() > 0, "the real mean (+1) lies above the fake mean (-0.5)"


@settings(deadline=None, max_examples=25)
@given(seed=st.integers(0, 2**31 - 1), which=st.sampled_from(["edm", "vp", "flow"]), n=st.integers(1, 6))
def test_dmd_gradient_zero_when_fake_equals_real(seed, which, n):
    sch = SCHEDULES[which]
    gmm = GaussianMixture([[1.0, 0.0, 2.0], [-1.0, 1.0, 0.0]], [0.3, 0.6])
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed))

    def tweedie(model):  # the same distribution's denoiser from its score (autograd of the exact density), Eq. 1
        def mu(x_t, t, cond=None):
            a, s = model.schedule.alphas[t][:, None], model.schedule.sigmas[t][:, None]
            with torch.enable_grad():  # dmd_gradient runs its denoisers under no_grad
                score = model.gmm.score_autograd(x_t, a[:, 0], s[:, 0])
            return ((x_t.double() + s**2 * score) / a).float()
        return mu

    for fake_gmm, zero in ((gmm, True), (GaussianMixture([[1.0, 0.5, 2.0], [-1.0, 1.5, 0.0]], [0.3, 0.6]), False)):
        fake = tweedie(type("M", (), dict(schedule=sch, gmm=fake_gmm)))
        grad = dmd2.dmd_gradient(x, gmm.denoiser(sch), fake, sch, generator=torch.Generator().manual_seed(seed))
        assert (grad.abs().max() < 1e-3) == zero, (zero, grad.abs().max())


@settings(deadline=None, max_examples=25)
@given(seed=st.integers(0, 2**31 - 1), shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
       n=st.integers(2, 6))
def test_dmd_normalisation_is_strictly_per_sample(seed, shape, n):
    # Each sample's gradient depends on that sample alone: batch == concatenation of single-sample calls,
    # even when the samples' scales differ by orders of magnitude.
    sch = SCHEDULES["edm"]
    g = torch.Generator().manual_seed(seed)
    scale = 10.0 ** torch.randint(-2, 3, (n,) + (1,) * len(shape), generator=g)
    x = torch.randn(n, *shape, generator=g) * scale
    t, noise = torch.randint(20, 981, (n,), generator=g), torch.randn(n, *shape, generator=g)
    def real(x_t, t, c):
        return 0.3 * x_t
    def fake(x_t, t, c):
        return 0.3 * x_t + 0.1
    batch = dmd2.dmd_gradient(x, real, fake, sch, t=t, noise=noise)
    single = torch.cat([dmd2.dmd_gradient(x[i:i + 1], real, fake, sch, t=t[i:i + 1], noise=noise[i:i + 1])
                        for i in range(n)])
    torch.testing.assert_close(batch, single)


def test_dmd_normaliser_is_mean_abs_of_x_minus_real_x0():
    # real -> constant 2, fake -> constant 3: grad = (x - 2 - (x - 3)) / mean|x - 2| = 1 / mean|x - 2|
    x = torch.tensor([[0.0, 1.0, 4.0, 7.0], [2.5, 2.5, 1.5, 1.5]])
    def real(x_t, t, c):
        return torch.full_like(x_t, 2.0)
    def fake(x_t, t, c):
        return torch.full_like(x_t, 3.0)
    grad = dmd2.dmd_gradient(x, real, fake, SCHEDULES["vp"], t=torch.tensor([500, 500]), noise=torch.zeros_like(x))
    torch.testing.assert_close(grad, torch.tensor([[1 / 2.5] * 4, [1 / 0.5] * 4]))


def test_dmd_gradient_zero_norm_and_non_finite_predictions():
    """A sample the teacher reproduces exactly (0/0) gets no gradient; a NaN prediction stays visible (DMD's
    nan_to_num would turn it into a silent zero), so the training loop stops on the loss."""
    x = torch.randn(3, 4)
    def real(x_t, t, c):
        out = torch.zeros_like(x_t)
        out[0] = x[0]  # p_real = 0 for sample 0: 0/0
        return out
    def fake(x_t, t, c):
        out = torch.ones_like(x_t)
        out[1, 2] = float("nan")
        return out
    grad = dmd2.dmd_gradient(x, real, fake, SCHEDULES["edm"], noise=torch.zeros_like(x))
    assert torch.equal(grad[0], torch.zeros(4)) and torch.isfinite(grad[2]).all()
    assert grad[1, 2].isnan() and not torch.isfinite(dmd2.dmd_loss(x, grad))
    for bad in (float("inf"), float("nan")):  # a teacher predicting inf or NaN everywhere
        grad = dmd2.dmd_gradient(x, lambda x_t, t, c, bad=bad: torch.full_like(x_t, bad), fake,
                                 SCHEDULES["edm"], noise=torch.zeros_like(x))
        assert not torch.isfinite(grad).any()


def test_dmd_timesteps_range_and_shared_inputs():
    sch = SCHEDULES["vp"]
    real, fake = Counter(lambda x_t, t, c: x_t), Counter(lambda x_t, t, c: 0.5 * x_t)
    x = torch.randn(100_000, 1)
    dmd2.dmd_gradient(x, real, fake, sch, generator=torch.Generator().manual_seed(0))
    t = real.calls[0]["t"]
    assert t.min().item() == 20 and t.max().item() == 980, "t ~ U{0.02 T .. 0.98 T}"
    assert torch.equal(t, fake.calls[0]["t"]) and torch.equal(real.calls[0]["x_t"], fake.calls[0]["x_t"])
    assert len(t.unique()) == 961, "per sample"


def test_guidance_applies_to_the_teacher_only():
    sch = SCHEDULES["vp"]
    def cnet(x_t, t, c):
        return x_t * 0.2 + c.float()[:, None]
    real, fake = Counter(cnet), Counter(cnet)
    x, cond, uncond = torch.randn(4, 3), torch.tensor([1, 2, 3, 4]), torch.tensor([0])
    t, noise = torch.full((4,), 400), torch.randn(4, 3)
    grad = dmd2.dmd_gradient(x, real, fake, sch, cond, t, noise, w=3.0, uncond=uncond)
    assert len(real.calls) == 1 and len(real.calls[0]["x_t"]) == 8, "teacher: cond + uncond in one call"
    assert len(fake.calls) == 1 and len(fake.calls[0]["x_t"]) == 4 and torch.equal(fake.calls[0]["cond"], cond)
    x_t = sch.add_noise(x, noise, t)
    x0_real = dmd2.cfg(cnet(x_t, t, cond), cnet(x_t, t, uncond.expand(4)), 3.0)
    p_real, p_fake = x - x0_real, x - cnet(x_t, t, cond)
    torch.testing.assert_close(grad, (p_real - p_fake) / p_real.abs().mean(1, keepdim=True))


def test_no_gradient_reaches_teacher_or_fake():
    torch.manual_seed(0)
    real, fake = TinyCritic(), TinyCritic()
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    rc, fc = Counter(real), Counter(fake)
    dmd2.dmd_loss(x, dmd2.dmd_gradient(x, rc, fc, SCHEDULES["edm"])).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in [*real.parameters(), *fake.parameters()])
    assert not rc.calls[0]["grad"] and not fc.calls[0]["grad"], "both denoisers run under no_grad"


@settings(deadline=None, max_examples=30)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), seed=st.integers(0, 2**31 - 1))
def test_dmd_loss_value_and_gradient(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, requires_grad=True)
    grad = torch.randn(shape, generator=g)
    loss = dmd2.dmd_loss(x, grad)
    torch.testing.assert_close(loss, 0.5 * (grad**2).mean())
    loss.backward()
    torch.testing.assert_close(x.grad, grad / x.numel())


# ---- fake score loss -----------------------------------------------------------------------------------


def test_fake_score_loss_edm_is_lambda_weighted_x0_loss():
    sch = SCHEDULES["edm"]
    x = torch.randn(5, 2, 3, 3)
    t, noise = torch.tensor([0, 1, 250, 700, 999]), torch.randn(5, 2, 3, 3)
    def net(x_t, t, c):
        return 0.9 * x_t
    loss = dmd2.fake_score_loss(x, net, sch, t=t, noise=noise)
    s = sch.sigmas[t].reshape(-1, 1, 1, 1)
    lam = (s**2 + 0.25) / (s**2 * 0.25)
    ref = (lam * (0.9 * (x.double() + s * noise.double()) - x.double()) ** 2).mean()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)


def test_fake_score_loss_vp_equals_epsilon_mse():
    # SD's fake-score loss is the plain epsilon MSE; the SNR-weighted x0 loss must equal it.
    sch = SCHEDULES["vp"]
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(6, 4, 5, 5, generator=g), torch.randn(6, 4, 5, 5, generator=g)
    t = torch.tensor([0, 3, 100, 500, 900, 999])
    def eps_net(x_t, t, c):
        return torch.tanh(x_t) * 0.7
    def x0_net(x_t, t, c):
        return sch.eps_to_x0(x_t, eps_net(x_t, t, c), t)
    loss = dmd2.fake_score_loss(x, x0_net, sch, t=t, noise=noise)
    eps_mse = ((eps_net(sch.add_noise(x, noise, t), t, None) - noise) ** 2).mean()
    torch.testing.assert_close(loss, eps_mse, rtol=1e-4, atol=1e-6)


def test_fake_score_loss_detaches_samples_and_draws_full_range():
    fake = Counter(TinyCritic())
    x = torch.randn(20_000, 3, 2, 2, requires_grad=True)
    loss = dmd2.fake_score_loss(x, fake, SCHEDULES["vp"], generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert x.grad is None, "trained on detached generator samples"
    t = fake.calls[0]["t"]
    assert t.min().item() == 0 and t.max().item() == 999
    assert fake.calls[0]["grad"]
