"""End to end without images: a one-step 2-D generator distilled with DMD + TTUR against the exact score of a
Gaussian mixture (the teacher), with the fake score fitted online, moves onto the target distribution; on EDM's
schedule and on a rectified flow (SD3's, shift 3: the teacher the exact flow posterior, the fake score a velocity
network)."""

import pytest
import torch
from torch import nn

import dmd2
from helpers import GaussianMixture

TARGET = GaussianMixture([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]], [0.4, 0.4, 0.4])


def mlp(n_in: int, width: int = 128, depth: int = 3) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(n_in if i == 0 else width, width), nn.SiLU()]
    return nn.Sequential(*layers, nn.Linear(width, 2))


class FakeScore(nn.Module):
    """EDM-preconditioned MLP denoiser: x0 = c_skip x_t + c_out F(c_in x_t, log(sigma)/4); on a flow schedule a
    velocity MLP, x0 = x_t - sigma v(x_t, sigma)."""

    def __init__(self, sch: dmd2.Schedule, sigma_data: float = 1.5):
        super().__init__()
        self.sch, self.sd, self.net = sch, sigma_data, mlp(3)

    def forward(self, x_t, t, cond=None):
        s, sd = self.sch.sigma(t, x_t), self.sd
        if isinstance(self.sch, dmd2.FlowSchedule):
            return self.sch.velocity_to_x0(x_t, self.net(torch.cat([x_t, s], 1)), t)
        c_skip, c_out, c_in = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt(), 1 / (s**2 + sd**2).sqrt()
        return c_skip * x_t + c_out * self.net(torch.cat([c_in * x_t, s.log() / 4], 1))


class Generator(nn.Module):
    def __init__(self, sch: dmd2.Schedule):
        super().__init__()
        self.scale, self.net = getattr(sch, "sigma_max", 1.0), mlp(2, depth=2)

    def forward(self, x_t, t, cond=None):
        return self.net(x_t / self.scale)


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return (2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean()).item()


@pytest.mark.parametrize("SCH", [dmd2.EDMSchedule(), dmd2.FlowSchedule(3.0)], ids=["edm", "flow"])
def test_dmd_ttur_distills_a_gaussian_mixture(SCH):
    torch.manual_seed(0)
    G, fake = Generator(SCH), FakeScore(SCH)
    g_opt = torch.optim.AdamW(G.parameters(), lr=3e-3, weight_decay=0)
    c_opt = torch.optim.AdamW(fake.parameters(), lr=1e-3, weight_decay=0)
    hp = dmd2.TTUR(ratio=5, gan_g=0, gan_d=0)
    B, t_max = 256, torch.full((256,), SCH.T - 1)
    ref = TARGET.sample(2000, torch.Generator().manual_seed(1)).float()

    def generate(n):
        with torch.no_grad():
            return dmd2.sample(G, torch.randn(n, 2), SCH, [SCH.T - 1])

    start = energy_distance(generate(2000), ref)
    for _ in range(300):  # the fake score starts fitted to the initial generator (DMD inits it from the teacher)
        dmd2.critic_step(fake, None, c_opt, generate(B), SCH, hp=hp)
    for it in range(2500):
        z = torch.randn(B, 2)
        dmd2.train_iteration(it, G, TARGET.denoiser(SCH), fake, None, g_opt, c_opt, SCH, SCH.prior(z), t_max, hp=hp)

    x = generate(4000)
    end = energy_distance(x, ref)
    assert start > 1.0 and end < 0.05 and end < start / 20, (start, end)
    dist = torch.cdist(x.double(), TARGET.means)
    share = torch.bincount(dist.argmin(1), minlength=3).double() / len(x)
    assert (share > 0.25).all() and (share < 0.42).all(), f"every mode covered: {share.tolist()}"
    assert (dist.min(1).values < 3 * 0.4).double().mean() > 0.75, "most samples inside a mode"


def test_the_gan_on_real_samples_corrects_the_teachers_error_that_dmd_copies():
    """support/toy2d.py (--ablation toy2d): the teacher is the exact denoiser of a ring of five modes with uniform
    weights, the data's are 0.34 ... 0.09. DMD + TTUR lands on the teacher's distribution, weights included; with the
    GAN on samples of the data the mass moves toward the data's, and the student ends closer to the data than the
    teacher is."""
    from support import toy2d

    gen = torch.Generator().manual_seed(1)
    real, teacher = toy2d.sample_ring(toy2d.DATA, 4000, gen), toy2d.sample_ring(toy2d.UNIFORM, 4000, gen)
    z, directions = torch.randn(4000, 2, generator=gen), torch.randn(2, 64, generator=gen)
    directions = directions / directions.norm(dim=0)
    error = toy2d.scores(teacher, real, teacher, directions)["swd"]  # the teacher's distance to the data
    G = {n: toy2d.distill(toy2d.VARIANTS[n], 0, 1000, 256, hidden=(128,) * 2) for n in list(toy2d.VARIANTS)[:2]}
    dmd, gan = (toy2d.scores(G[name](80 * z).detach(), real, teacher, directions) for name in G)
    assert max(abs(m - 0.2) for m in dmd["mass"]) < 0.05 and dmd["swd_teacher"] < error / 2, (dmd, error)
    assert gan["mass"][0] > dmd["mass"][0] + 0.04 and gan["mass"][4] < dmd["mass"][4] - 0.03, (gan, dmd)
    assert gan["swd"] < min(dmd["swd"], error) - 0.05, (gan, dmd, error)
