"""The teacher's error in two dimensions (docs/gan-and-teacher.md): a one-step generator distilled from the EXACT
denoiser of a ring of five Gaussians with the wrong mode weights (uniform, where the data's are unequal), by DMD + TTUR,
with and without the GAN term on samples of the true ring, and by the GAN alone. Distribution matching can at best
copy its teacher, error included; the GAN, trained on real samples, can correct it (Sec. 4.3). `run` writes the table
(sliced Wasserstein distance to the data, mass per mode) and the figure."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import dmd2
from support.edm import edm_sampler
from support.runs import warmup_cosine
from support.small import pm

MEANS = torch.tensor([[2 * math.cos(2 * math.pi * k / 5), 2 * math.sin(2 * math.pi * k / 5)] for k in range(5)])
STD, UNIFORM = 0.4, torch.full((5,), 0.2)  # every mode's std; the teacher's mode weights
DATA = torch.tensor([0.34, 0.25, 0.18, 0.14, 0.09])  # the data's mode weights
VARIANTS = {  # name -> dmd2.TTUR settings (ratio 5; the paper's non-saturating GAN on the fake score's features)
    "DMD + TTUR": dict(gan_g=0.0, gan_d=0.0),
    "DMD + TTUR + GAN": dict(gan_g=3.0, gan_d=1.0),
    "GAN alone (TTUR)": dict(dmd_weight=0.0, gan_g=3.0, gan_d=1.0),
}


def sample_ring(weights: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    return MEANS[torch.multinomial(weights, n, replacement=True, generator=generator)] + STD * torch.randn(
        n, 2, generator=generator)


def ring_denoiser(weights: torch.Tensor):
    """D(x; sigma) = E[x | x + sigma eps] of the ring with these mode weights, exactly (EDM's network signature)."""
    def D(x: torch.Tensor, sigma: torch.Tensor, labels=None) -> torch.Tensor:
        x, var = x.double(), (STD**2 + sigma.double() ** 2).view(-1, 1)  # every mode's variance at sigma
        d = x[:, None] - MEANS.double()  # [B, K, 2]
        r = torch.softmax(torch.log(weights.double()) - 0.5 * d.pow(2).sum(-1) / var, 1)  # p(mode | x)
        return (r[..., None] * (MEANS.double() + STD**2 / var[..., None] * d)).sum(1).float()
    return D


class FakeScore(nn.Module):
    """mu_fake: an MLP under EDM's preconditioning (sigma_data 1); its encoder's output, seen as an 8 x 4 x 4 map, is
    the GAN head's input, as the UNets' bottleneck is."""

    def __init__(self, schedule: dmd2.Schedule, width: int = 128):
        super().__init__()
        self.schedule = schedule
        self.enc = nn.Sequential(nn.Linear(3, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU())
        self.dec = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2))

    def features(self, x_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        s = self.schedule.sigma(t, x_t)
        return self.enc(torch.cat([x_t / (s**2 + 1).sqrt(), s.log() / 4], 1)).view(len(x_t), -1, 4, 4)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        s = self.schedule.sigma(t, x_t)
        return x_t / (s**2 + 1) + s / (s**2 + 1).sqrt() * self.dec(self.features(x_t, t).flatten(1))


class Generator(nn.Sequential):
    """G(80 z; t = T - 1) = MLP(z): one step from pure noise, the UNets' input scale."""

    def forward(self, x_t: torch.Tensor, t=None, cond=None) -> torch.Tensor:
        return super().forward(x_t / 80)


def distill(hp: dict, seed: int, iters: int, batch: int = 512, lr: float = 2e-3, hidden=(256,) * 3) -> nn.Module:
    """A one-step MLP G (`hidden` widths) distilled from the uniform ring's exact denoiser (dmd2.train_iteration),
    the GAN on the data's ring; AdamW at 3 lr (G), lr (critic), cosine to a tenth; mu_fake first fits G."""
    torch.manual_seed(seed)
    schedule, gen, D = dmd2.EDMSchedule(), torch.Generator().manual_seed(seed), ring_denoiser(UNIFORM)
    G = Generator(*[m for a, b in zip((2, *hidden), (*hidden, 2), strict=True) for m in (nn.Linear(a, b), nn.SiLU())])
    del G[-1]  # no activation after the last layer
    fake, head, ttur, t_in = FakeScore(schedule), dmd2.GANHead(8, 4), dmd2.TTUR(ratio=5, **hp), torch.full([batch], 999)
    g_opt = torch.optim.AdamW(G.parameters(), 3 * lr, weight_decay=0)
    c_opt = torch.optim.AdamW([*fake.parameters(), *head.parameters()], lr, weight_decay=0)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, warmup_cosine(0, iters, 0.1)) for o in (g_opt, c_opt)]
    for _ in range(300):
        with torch.no_grad():
            x = G(schedule.prior(torch.randn(batch, 2, generator=gen)))
        dmd2.critic_step(fake, None, c_opt, x, schedule, hp=ttur, generator=gen)
    for it in range(iters):
        z, real = torch.randn(batch, 2, generator=gen), sample_ring(DATA, batch, gen)
        dmd2.train_iteration(it, G, lambda x_t, t, c: D(x_t, schedule.sigma(t)), fake, head, g_opt, c_opt, schedule,
                             schedule.prior(z), t_in, x_real=real, hp=ttur, generator=gen)
        for s in scheds:
            s.step()
    return G


def scores(x: torch.Tensor, real: torch.Tensor, teacher: torch.Tensor, directions: torch.Tensor) -> dict:
    """Sliced Wasserstein-1 distances to the data's and the teacher's samples (as many; mean over the directions),
    the mass of each mode (nearest mean) and the share of samples between modes (beyond 2 std of every mean)."""
    w1 = lambda y: (torch.sort(x @ directions, 0)[0] - torch.sort(y @ directions, 0)[0]).abs().mean().item()  # noqa
    dist = torch.cdist(x, MEANS)
    return dict(swd=w1(real), swd_teacher=w1(teacher), mass=(torch.bincount(dist.argmin(1), minlength=5) / len(x))
                .tolist(), between=(dist.min(1).values > 2 * STD).float().mean().item())


def run(out: str, seeds: int = 3, iters: int = 12000, n: int = 5000) -> str:
    """Every variant over `seeds` seeds against n samples of the data and the teacher's Heun sampler (35 NFE): writes
    out/toy2d.md (mean ± std over seeds) and out/toy2d.png (seed 0's samples)."""
    gen = torch.Generator().manual_seed(12345)
    real, z = sample_ring(DATA, n, gen), torch.randn(n, 2, generator=gen)
    directions = F.normalize(torch.randn(2, 256, generator=gen), dim=0)
    teacher = edm_sampler(ring_denoiser(UNIFORM), z, torch.zeros(n, dtype=torch.long), 0, 18, True)
    samples = {"data": [real], "teacher (Heun, 35 NFE)": [teacher]}
    samples |= {name: [distill(hp, seed, iters)(80 * z).detach() for seed in range(seeds)]
                for name, hp in VARIANTS.items()}
    text = (f"| {n} samples ({seeds} seeds) | sliced W1: to the data | to the teacher | mass per mode | between modes "
            "|\n|---|---|---|---|---|\n")
    for name, xs in samples.items():
        rs = [scores(x, real, teacher, directions) for x in xs]
        r = {k: np.array([s[k] for s in rs]) for k in rs[0]}
        text += (f"| {name} | {pm(r['swd'], '.3f')} | {pm(r['swd_teacher'], '.3f')} | "
                 f"{', '.join(f'{m:.2f}' for m in r['mass'].mean(0))} | {r['between'].mean():.3f} |\n")
    Path(out, "toy2d.md").write_text(text)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(samples), figsize=(3 * len(samples), 3.2), sharex=True, sharey=True, layout="tight")
    for ax, (name, xs) in zip(axes, samples.items(), strict=True):
        ax.scatter(*xs[0][:2000].T, s=1, alpha=0.4)
        ax.set_title(name, fontsize=8)
        ax.set_aspect("equal")
    fig.savefig(Path(out, "toy2d.png"), dpi=120)
    plt.close(fig)
    print(text)
    return text
