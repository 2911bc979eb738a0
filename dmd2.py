"""DMD2: Improved Distribution Matching Distillation for Fast Image Synthesis.

Yin, Gharbi, Park, Zhang, Shechtman, Durand, Freeman. NeurIPS 2024. arXiv:2405.14867.

The whole algorithm in one module, in the order of the paper. It knows nothing about files, datasets,
diffusers, EDM pickles or torch.distributed: networks reach it through one protocol, a *denoiser*

    denoiser(x_t, t, cond) -> x0        x_t: [B, ...] noisy sample, t: [B] integer timesteps in [0, T)

which is Eq. (1)'s mu(x_t, t). The critic (fake score) also exposes `features(x_t, t, cond)`, the
bottleneck of its encoder, for the GAN head. The training scripts adapt EDM networks and diffusers
UNets to this protocol.

Symbols
    T               number of discrete training timesteps (1000)
    alpha_t, sigma_t  forward process q(x_t | x) = N(alpha_t x, sigma_t^2 I)     `Schedule`: EDM, VP, flow
    F(x, t)         forward diffusion alpha_t x + sigma_t eps                    `Schedule.add_noise`
    mu_real         teacher denoiser, frozen                                     `real`
    mu_fake         fake score ("critic") denoiser, trained on generator output  `fake`
    G               generator, one or a few steps, same protocol as a denoiser   `G`
    D               discriminator: `GANHead` on mu_fake's bottleneck features
    w               classifier-free guidance scale of the teacher

Reading order
    1. Protocol and noise schedules (Sec. 3)
    2. Score, Eq. (1), and classifier-free guidance
    3. Distribution matching gradient, Eq. (2), and the loss whose gradient it is
    4. Fake score (critic) denoising loss (Sec. 3, 4.6)
    5. GAN head and non-saturating losses (Eq. 4, App. F.1)
    6. Multi-step sampler and backward simulation (Sec. 4.4, 4.5)
    7. Two time-scale update rule: critic step, generator step, one iteration (Sec. 4.2, 4.6)

Randomness that matters (timesteps, noise) can be passed in explicitly; otherwise it is drawn from an
optional `torch.Generator` (on the device of the data).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

Cond = Any  # a tensor, a dict of tensors, or None; batch dimension first


class Denoiser(Protocol):
    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor: ...


class Critic(Denoiser, Protocol):
    def features(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor: ...


# ----------------------------------------------------------------------------------------------------
# 1. Noise schedules (Sec. 3): q(x_t | x) = N(alpha_t x, sigma_t^2 I), t an integer index in [0, T).
# Coefficients are precomputed in float64; lookups return float32 tensors shaped to broadcast over x.


class Schedule:
    """A discrete schedule given by its tables alpha[t], sigma[t] (float64, [T])."""

    def __init__(self, alphas: torch.Tensor, sigmas: torch.Tensor):
        if alphas.shape != sigmas.shape or alphas.ndim != 1:
            raise ValueError(f"alphas {tuple(alphas.shape)} and sigmas {tuple(sigmas.shape)} must be equal 1-D")
        self.alphas, self.sigmas = alphas.double(), sigmas.double()
        self.T = len(alphas)
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def coefficients(self, t: torch.Tensor, x: torch.Tensor | None = None,
                     dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t): [B], or [B, 1, ..., 1] to broadcast over x. Tables are copied to t's device
        once, so lookups never wait on a host-to-device copy."""
        if t.device not in self._on_device:
            self._on_device[t.device] = (self.alphas.to(t.device), self.sigmas.to(t.device))
        a, s = (v[t.long()].to(dtype) for v in self._on_device[t.device])
        shape = (-1,) if x is None else (-1, *[1] * (x.ndim - 1))
        return a.view(shape), s.view(shape)

    def alpha(self, t: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        return self.coefficients(t, x)[0]

    def sigma(self, t: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        return self.coefficients(t, x)[1]

    def add_noise(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """F(x, t) = alpha_t x + sigma_t eps (Eq. 2's forward diffusion)."""
        a, s = self.coefficients(t, x)
        return a * x.float() + s * noise.float()

    def prior(self, z: torch.Tensor) -> torch.Tensor:
        """Pure noise at t = T-1 from z ~ N(0, I): the input of the first generator step."""
        raise NotImplementedError

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Weight lambda(t) of the x0 denoising loss lambda(t) |mu(x_t, t) - x|^2, [B] float32."""
        raise NotImplementedError

    def eps_to_x0(self, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 = (x_t - sigma_t eps) / alpha_t, in float64 as epsilon networks need at large t."""
        a, s = self.coefficients(t, x_t, torch.float64)
        return ((x_t.double() - s * eps.double()) / a).float()


class EDMSchedule(Schedule):
    """EDM (Karras et al. 2022) on a 1000-point grid: alpha_t = 1, sigma_t = Karras sigma, index 0 smallest.

    sigma_i = (sigma_min^(1/rho) + i/(T-1) (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho, so sigma_{T-1} = 80."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                 sigma_data: float = 0.5, T: int = 1000):
        ramp = torch.linspace(0, 1, T, dtype=torch.float64)
        lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        super().__init__(torch.ones(T, dtype=torch.float64), (lo + ramp * (hi - lo)) ** rho)
        self.sigma_min, self.sigma_max, self.rho, self.sigma_data = sigma_min, sigma_max, rho, sigma_data

    def prior(self, z: torch.Tensor) -> torch.Tensor:
        return self.sigma_max * z.float()

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        # EDM's lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2
        s, sd = self.coefficients(t, dtype=torch.float64)[1], self.sigma_data
        return ((s**2 + sd**2) / (s * sd) ** 2).float()


class VPSchedule(Schedule):
    """Variance-preserving DDPM schedule from alphas_cumprod (default: SD's scaled-linear betas).

    alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t). abar_{T-1} > 0, so the generator's first
    input is pure noise z (`prior`), not F(x, T-1)."""

    def __init__(self, alphas_cumprod: torch.Tensor | None = None, T: int = 1000,
                 beta_start: float = 0.00085, beta_end: float = 0.012):
        if alphas_cumprod is None:
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
            alphas_cumprod = torch.cumprod(1 - betas, 0)
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if not ((abar > 0) & (abar < 1)).all():
            raise ValueError("alphas_cumprod must lie strictly between 0 and 1")
        super().__init__(abar.sqrt(), (1 - abar).sqrt())

    def prior(self, z: torch.Tensor) -> torch.Tensor:
        return z.float()

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        # SNR weight: (alpha/sigma)^2 |x0_pred - x|^2 == |eps_pred - eps|^2, SD's own training loss
        a, s = self.coefficients(t, dtype=torch.float64)
        return (a / s).pow(2).float()


class FlowSchedule(Schedule):
    """Rectified flow (SD3, Esser et al. 2024): x_t = (1 - sigma_t) x + sigma_t eps, alpha_t = 1 - sigma_t, with
    SD3's timestep shift sigma_t = s u / (1 + (s - 1) u) of u = (t + 1) / T. Index T-1 is pure noise (sigma 1,
    alpha 0); the table is diffusers' FlowMatchEulerDiscreteScheduler(shift=s).sigmas at init, ascending.

    A flow network predicts the velocity v = eps - x, so x0 = x_t - sigma_t v (`velocity_to_x0`): nothing here
    divides by alpha_t, which is 0 at the last index."""

    def __init__(self, shift: float = 1.0, T: int = 1000):
        if not shift > 0:
            raise ValueError(f"the timestep shift must be > 0, got {shift}")
        u = torch.arange(1, T + 1, dtype=torch.float64) / T
        sigmas = shift * u / (1 + (shift - 1) * u)
        sigmas[-1] = 1.0  # shift(1) = 1: pure noise at the last index, exactly, whatever the rounding
        super().__init__(1 - sigmas, sigmas)
        self.shift = shift

    def prior(self, z: torch.Tensor) -> torch.Tensor:
        return z.float()

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        # 1 / sigma^2: |x0_pred - x|^2 / sigma^2 = |v_pred - v|^2, the flow-matching loss of SD3's own training
        return self.coefficients(t, dtype=torch.float64)[1].pow(-2).float()

    def eps_to_x0(self, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("x0 from eps divides by alpha, 0 at a flow's last index: use velocity_to_x0")

    def velocity_to_x0(self, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 = x_t - sigma_t v, the denoiser of a velocity network (v = eps - x, diffusers' sign)."""
        return x_t.float() - self.sigma(t, x_t) * v.float()


def _randn(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=torch.float32)


def _cat(a: Cond, b: Cond) -> Cond:
    """Concatenate two conditions (tensors, dicts of tensors, or None) along the batch dimension."""
    if a is None:
        return None
    if isinstance(a, dict):
        return {k: _cat(a[k], b[k]) for k in a}
    return torch.cat([a, b.to(a.dtype)])


def _expand(c: Cond, n: int) -> Cond:
    """Broadcast a condition given for one sample (batch 1) to a batch of n."""
    if c is None:
        return None
    if isinstance(c, dict):
        return {k: _expand(v, n) for k, v in c.items()}
    return c.expand(n, *c.shape[1:]) if c.shape[0] == 1 else c


# ----------------------------------------------------------------------------------------------------
# 2. Score, Eq. (1), and classifier-free guidance.


def score(x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """Eq. (1): s(x_t, t) = -(x_t - alpha_t mu(x_t, t)) / sigma_t^2, from the denoised estimate x0.

    Computed in float32, or float64 if x_t is: at small sigma_t the division amplifies rounding."""
    dtype = torch.promote_types(x_t.dtype, torch.float32)
    a, s = schedule.coefficients(t, x_t, dtype)
    return -(x_t.to(dtype) - a * x0.to(dtype)) / s**2


def cfg(x0_cond: torch.Tensor, x0_uncond: torch.Tensor, w: float) -> torch.Tensor:
    """Classifier-free guidance, uncond + w (cond - uncond). Linear in the prediction, so it is the
    same in x0, epsilon and score space; w = 1 is the conditional prediction."""
    return x0_uncond + w * (x0_cond - x0_uncond)


def guided(denoiser: Denoiser, w: float, uncond: Cond) -> Denoiser:
    """A denoiser applying `cfg` with the unconditional branch batched into the same network call."""
    if w == 1:
        return denoiser  # cfg(c, u, 1) == c: skip the unconditional pass
    if uncond is None:
        raise ValueError(f"guidance w={w} needs an unconditional condition `uncond`")

    def mu(x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        both = denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), _cat(cond, _expand(uncond, len(x_t))))
        x0_cond, x0_uncond = both.float().chunk(2)
        return cfg(x0_cond, x0_uncond, w)

    return mu


# ----------------------------------------------------------------------------------------------------
# 3. Distribution matching gradient, Eq. (2).
# grad KL(p_fake,t || p_real,t) = -E[(s_real - s_fake) dG/dtheta]. With Eq. (1),
# s_real - s_fake = alpha_t/sigma_t^2 (x0_real - x0_fake), so the direction is proportional to
# (x - x0_real) - (x - x0_fake). DMD normalises it per sample by mean |x - x0_real| (Yin et al. 2024a,
# kept in DMD2), which makes the step size independent of t and of the image's scale.


def sample_timesteps(n: int, schedule: Schedule, device: torch.device | str = "cpu", lo: float = 0.0,
                     hi: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """n timesteps uniform in [lo T, hi T] (clipped to [0, T-1]), the ends included."""
    T = schedule.T
    return torch.randint(int(lo * T), min(int(hi * T), T - 1) + 1, (n,), generator=generator, device=device)


@torch.no_grad()
def dmd_gradient(x: torch.Tensor, real: Denoiser, fake: Denoiser, schedule: Schedule, cond: Cond = None,
                 t: torch.Tensor | None = None, noise: torch.Tensor | None = None, *, w: float = 1.0,
                 uncond: Cond = None, t_min: float = 0.02, t_max: float = 0.98,
                 generator: torch.Generator | None = None, fake_cond: Cond = None) -> torch.Tensor:
    """Eq. (2): the per-sample normalised distribution matching gradient at generator output x.

    x_t = F(x, t), t ~ U{0.02T .. 0.98T}. Both denoisers run without gradient; guidance (w, uncond)
    applies to the teacher only; `fake_cond`, if given, is mu_fake's condition instead of `cond` (section 7).
    Returns grad, [B, ...] float32, to feed `dmd_loss`."""
    x = x.detach().float()
    t = sample_timesteps(len(x), schedule, x.device, t_min, t_max, generator) if t is None else t
    noise = _randn(x, generator) if noise is None else noise
    x_t = schedule.add_noise(x, noise, t)
    x0_real = guided(real, w, uncond)(x_t, t, cond).float()  # mu_real, guided
    x0_fake = fake(x_t, t, cond if fake_cond is None else fake_cond).float()  # mu_fake, never guided
    p_real, p_fake = x - x0_real, x - x0_fake
    norm = p_real.abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)  # one weight per sample
    # A sample the teacher reproduces exactly (norm 0) gets no gradient, where DMD's nan_to_num would put 0 or
    # +-3.4e38; a non-finite prediction stays non-finite, so that the loss shows it instead of a silent zero.
    grad = (p_real - p_fake) / norm
    return torch.where(norm == 0, torch.zeros_like(grad), grad)


def dmd_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5 mse(x, (x - grad).detach()): its gradient w.r.t. x is grad / x.numel(), its value 0.5 mean(grad^2).

    Descending it moves x toward the teacher's x0 and away from the fake's."""
    x = x.float()
    return 0.5 * F.mse_loss(x, (x - grad).detach())


# ----------------------------------------------------------------------------------------------------
# 4. Fake score ("critic") loss (Sec. 3, 4.6): denoising score matching on the generator's samples, so
# that mu_fake tracks p_fake. Written as a weighted x0 loss; the weight makes it EDM's loss or SD's
# epsilon MSE (`Schedule.loss_weight`). The same loss trains a teacher from data.


def denoising_loss(x: torch.Tensor, denoiser: Denoiser, schedule: Schedule, cond: Cond = None,
                   t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """mean over batch and pixels of lambda(t) |mu(F(x, t), t, cond) - x|^2, t ~ U{0 .. T-1}."""
    x = x.float()
    t = sample_timesteps(len(x), schedule, x.device, generator=generator) if t is None else t
    noise = _randn(x, generator) if noise is None else noise
    x0 = denoiser(schedule.add_noise(x, noise, t), t, cond).float()
    weight = schedule.loss_weight(t).view(-1, *[1] * (x.ndim - 1))
    return (weight * (x0 - x) ** 2).mean()


def fake_score_loss(x: torch.Tensor, fake: Denoiser, schedule: Schedule, cond: Cond = None,
                    t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Denoising loss of mu_fake on *detached* generator samples x, conditional only (no guidance)."""
    return denoising_loss(x.detach(), fake, schedule, cond, t, noise, generator)


# ----------------------------------------------------------------------------------------------------
# 5. GAN term (Sec. 4.3, Eq. 4, App. F.1): a classification head on the bottleneck of mu_fake, which
# shares the fake denoiser's encoder; images are noised before classification (diffusion GAN).


class GANHead(nn.Module):
    """App. F.1: [4x4 conv stride 2, GroupNorm, SiLU] down to 4x4, a 4x4 conv with stride 4, GroupNorm,
    SiLU, then a linear projection to one logit per sample.

    channels: bottleneck channels; resolution: its side, a power of two from 4 to 64. GroupNorm uses up to
    `groups` groups of at least 8 channels (32 for the real UNets' 768-1280 channels): after the 4x4 ->
    1x1 conv, a group of one channel would normalise to 0 and blind the head. width: the head's channels after a
    1x1 conv that first reduces wide features (a transformer's tokens, as NVlabs/FastGen's image-DiT heads);
    default: the features' own, the paper's head."""

    def __init__(self, channels: int, resolution: int, groups: int = 32, width: int | None = None):
        super().__init__()
        if resolution < 4 or resolution & (resolution - 1):
            raise ValueError(f"GANHead: bottleneck resolution must be a power of two >= 4, got {resolution}")
        self.channels, self.resolution, c = channels, resolution, width or channels
        g = math.gcd(groups, max(c // 8, 1))
        layers: list[nn.Module] = [nn.Conv2d(channels, c, 1)] if c != channels else []
        for _ in range(int(math.log2(resolution // 4))):  # R -> R/2 -> ... -> 4
            layers += [nn.Conv2d(c, c, 4, 2, 1), nn.GroupNorm(g, c), nn.SiLU()]
        layers += [nn.Conv2d(c, c, 4, 4, 0), nn.GroupNorm(g, c), nn.SiLU()]  # 4 -> 1
        self.body = nn.Sequential(*layers)
        self.proj = nn.Linear(c, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h: [B, C, R, R] bottleneck features -> [B] logits."""
        if h.ndim != 4 or tuple(h.shape[1:]) != (self.channels, self.resolution, self.resolution):
            raise ValueError(f"GANHead expects features [B, {self.channels}, {self.resolution}, "
                             f"{self.resolution}], got {tuple(h.shape)}")
        return self.proj(self.body(h).flatten(1)).squeeze(1)


def gan_logits(x: torch.Tensor, critic: Critic, head: GANHead, schedule: Schedule, cond: Cond = None,
               t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
               generator: torch.Generator | None = None, t_max: float = 1.0) -> torch.Tensor:
    """D(F(x, t)): each image noised with its own t ~ U{0 .. t_max T} (the paper: all T timesteps),
    classified from the critic's encoder features only (the decoder half is not run). [B] logits."""
    t = sample_timesteps(len(x), schedule, x.device, hi=t_max, generator=generator) if t is None else t
    noise = _randn(x, generator) if noise is None else noise
    return head(critic.features(schedule.add_noise(x, noise, t), t, cond)).float()


def gan_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss -log sigmoid(D(F(G(z)))) = softplus(-logit), Eq. (4)."""
    return F.softplus(-logits_fake.float()).mean()


def gan_discriminator_loss(logits_fake: torch.Tensor, logits_real: torch.Tensor) -> torch.Tensor:
    """Discriminator loss -log(1 - sigmoid(D(fake))) - log sigmoid(D(real)), Eq. (4)."""
    return F.softplus(logits_fake.float()).mean() + F.softplus(-logits_real.float()).mean()


# ----------------------------------------------------------------------------------------------------
# 6. Multi-step generator (Sec. 4.4) and backward simulation (Sec. 4.5).


def step_timesteps(n_steps: int, T: int = 1000) -> list[int]:
    """The fixed schedule t_1 > ... > t_N, the same at training and inference: t_i = T-1 - (i-1) (T//N).

    N = 4 gives [999, 749, 499, 249]; N = 1 gives [999]. (SDXL's one-step model conditions on [399].)"""
    if not 1 <= n_steps <= T // 2:
        raise ValueError(f"n_steps must be in [1, {T // 2}], got {n_steps}")
    return [T - 1 - i * (T // n_steps) for i in range(n_steps)]


@torch.no_grad()
def backward_simulation(G: Denoiser, z: torch.Tensor, schedule: Schedule, timesteps: list[int],
                        k: int | None = None, cond: Cond = None, generator: torch.Generator | None = None,
                        k_generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sec. 4.5: the input the multi-step generator sees at inference step k, simulated with itself.

    From pure noise, run k generator steps without gradient exactly as `sample` does, then noise the
    last x0 to t_k with fresh noise. One k for the whole batch (drawn uniform in [0, N) if None, on the
    host so that no device sync is needed: from `k_generator`, a CPU generator, else from `generator` if it is
    one, else from torch's global CPU generator); k = 0 is pure noise at t_1. Returns (x_{t_k}, t_k as a [B]
    tensor)."""
    if k is None:
        if k_generator is None and generator is not None and generator.device.type == "cpu":
            k_generator = generator
        k = int(torch.randint(0, len(timesteps), (1,), generator=k_generator))
    if not 0 <= k < len(timesteps):
        raise ValueError(f"k must be in [0, {len(timesteps)}), got {k}")
    x_t = schedule.prior(z)
    for i in range(k):
        x0 = G(x_t, torch.full((len(z),), timesteps[i], device=z.device), cond)
        t_next = torch.full((len(z),), timesteps[i + 1], device=z.device)
        x_t = schedule.add_noise(x0, _randn(x_t, generator), t_next)  # fresh noise each step
    return x_t, torch.full((len(z),), timesteps[k], device=z.device)


@torch.no_grad()
def sample(G: Denoiser, z: torch.Tensor, schedule: Schedule, timesteps: list[int], cond: Cond = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Sec. 4.4: x0 = G(x_{t_i}, t_i); x_{t_{i+1}} = F(x0, t_{i+1}) with fresh noise; return the last x0.

    Written as backward simulation to the last step plus one denoising step, which is what makes
    training (Sec. 4.5) and inference see the same inputs."""
    x_t, t = backward_simulation(G, z, schedule, timesteps, len(timesteps) - 1, cond, generator)
    return G(x_t, t, cond)


# ----------------------------------------------------------------------------------------------------
# 7. Two time-scale update rule (Sec. 4.2, 4.6, App. C). The critic (mu_fake and the GAN head) is updated
# every iteration, the generator every `ratio`-th; the critic update reuses that iteration's detached
# generator output. The generator step back-propagates through mu_fake's encoder and the head into G
# without updating or accumulating gradient into them.
#
# Beyond the paper, an option (`fake_cond`): mu_fake trained on, and asked about, the samples of a multi-step G
# learns the score of the mixture of its steps' outputs, so Eq. (2) matches only that mixture to the data, and the
# last step, the one sampled, is free to drift as long as the others make up for it. Given the step that made
# each sample as part of its condition (`fake_cond`: the condition and the step), mu_fake learns each step's own
# distribution and Eq. (2) matches every step to the data. The GAN head keeps `cond`: real images have no step.


@dataclass
class TTUR:
    """Hyper-parameters of one DMD2 run (defaults: the paper's ImageNet-64 run, App. F.2)."""

    ratio: int = 5  # critic updates per generator update
    dmd_weight: float = 1.0  # weight of the distribution matching loss (0: GAN alone, Table 3)
    gan_g: float = 3e-3  # generator's GAN loss weight (0: no GAN term)
    gan_d: float = 1e-2  # critic's classification loss weight
    w: float = 1.0  # teacher's guidance scale (1: none)
    max_grad_norm: float = 10.0  # gradient-norm clip of both updates (inf: none)
    t_min: float = 0.02  # DMD timesteps are drawn in [t_min T, t_max T]
    t_max: float = 0.98
    gan_t_max: float = 1.0  # GAN noise timesteps in [0, gan_t_max T] (the paper: 1, all of them)

    def __post_init__(self):
        if self.ratio < 1:
            raise ValueError(f"TTUR ratio must be >= 1, got {self.ratio}")
        if min(self.dmd_weight, self.gan_g, self.gan_d) < 0 or self.dmd_weight == self.gan_g == 0:
            raise ValueError("TTUR weights must be >= 0, and dmd_weight or gan_g > 0 for the generator to learn")
        if not 0 <= self.t_min <= self.t_max <= 1:
            raise ValueError(f"need 0 <= t_min <= t_max <= 1, got {self.t_min}, {self.t_max}")
        if not 0 <= self.gan_t_max <= 1:
            raise ValueError(f"need 0 <= gan_t_max <= 1, got {self.gan_t_max}")


def _params(*modules: Any) -> list[torch.nn.Parameter]:
    """The trainable parameters of `modules`, each once: a critic module also holds the head passed beside it, and a
    parameter listed twice would count twice in the clipped norm (and be scaled twice by the clip)."""
    return list({id(p): p for m in modules if hasattr(m, "parameters") for p in m.parameters() if p.requires_grad}
                .values())


@contextmanager
def frozen(*modules: Any) -> Iterator[None]:
    """Let gradient flow *through* these modules without reaching their parameters (restored on exit)."""
    params = _params(*modules)
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _update(loss: torch.Tensor, opt: torch.optim.Optimizer, params: list[torch.nn.Parameter],
            max_grad_norm: float) -> torch.Tensor:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    opt.step()
    return norm


def generator_step(G: Denoiser, opt: torch.optim.Optimizer, x_in: torch.Tensor, t_in: torch.Tensor,
                   real: Denoiser, fake: Critic, head: GANHead | None, schedule: Schedule, cond: Cond = None,
                   hp: TTUR | None = None, uncond: Cond = None, generator: torch.Generator | None = None,
                   fake_cond: Cond = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One generator update: x = G(x_in, t_in); loss = dmd_weight L_DMD(x) + gan_g L_GAN,G(x).

    Network calls: G once (with grad), mu_real once (twice the batch with guidance) and mu_fake once
    (no grad, in `dmd_gradient`), mu_fake's encoder once (GAN term, gradient flows to x only).
    Returns the detached x, for this iteration's critic update, and detached loss values.
    The critic stays frozen through the backward too, so recomputation (gradient checkpointing) sees the
    same flags as the forward; parameters are listed before the forward, as sharded (FSDP) modules
    expose temporary ones during it."""
    hp, params = hp or TTUR(), _params(G)
    x = G(x_in, t_in, cond)
    loss, logs = x.new_zeros((), dtype=torch.float32), {}
    if hp.dmd_weight > 0:
        grad = dmd_gradient(x, real, fake, schedule, cond, w=hp.w, uncond=uncond, t_min=hp.t_min,
                            t_max=hp.t_max, generator=generator, fake_cond=fake_cond)
        logs["loss_dmd"] = dmd_loss(x, grad)
        loss = loss + hp.dmd_weight * logs["loss_dmd"]
    with frozen(fake, head):
        if hp.gan_g > 0 and head is not None:
            logits = gan_logits(x, fake, head, schedule, cond, generator=generator, t_max=hp.gan_t_max)
            logs["loss_gan_g"] = gan_generator_loss(logits)
            loss = loss + hp.gan_g * logs["loss_gan_g"]
        logs["grad_norm_g"] = _update(loss, opt, params, hp.max_grad_norm)
    return x.detach(), {k: v.detach() for k, v in logs.items()}


def critic_step(fake: Critic, head: GANHead | None, opt: torch.optim.Optimizer, x_fake: torch.Tensor,
                schedule: Schedule, cond: Cond = None, x_real: torch.Tensor | None = None,
                cond_real: Cond = None, hp: TTUR | None = None, generator: torch.Generator | None = None,
                fake_cond: Cond = None) -> dict[str, torch.Tensor]:
    """One critic update: fake score loss on detached generator samples (on `fake_cond`) + gan_d x GAN loss.

    Network calls: mu_fake once (denoising loss) and, with the GAN term, its encoder once on the
    concatenated fake and real batch (each image with its own timestep and noise)."""
    hp, params = hp or TTUR(), _params(fake, head)
    x_fake = x_fake.detach()
    logs = {"loss_fake": fake_score_loss(x_fake, fake, schedule, cond if fake_cond is None else fake_cond,
                                         generator=generator)}
    loss = logs["loss_fake"]
    if hp.gan_d > 0 and head is not None and x_real is not None:
        logits = gan_logits(torch.cat([x_fake.float(), x_real.float()]), fake, head, schedule,
                            _cat(cond, cond_real), generator=generator, t_max=hp.gan_t_max)
        logits_fake, logits_real = logits[: len(x_fake)], logits[len(x_fake):]
        logs["loss_gan_d"] = gan_discriminator_loss(logits_fake, logits_real)
        logs["d_real"], logs["d_fake"] = logits_real.mean(), logits_fake.mean()
        loss = loss + hp.gan_d * logs["loss_gan_d"]
    logs["grad_norm_c"] = _update(loss, opt, params, hp.max_grad_norm)
    return {k: v.detach() for k, v in logs.items()}


def train_iteration(it: int, G: Denoiser, real: Denoiser, fake: Critic, head: GANHead | None,
                    g_opt: torch.optim.Optimizer, c_opt: torch.optim.Optimizer, schedule: Schedule,
                    x_in: torch.Tensor, t_in: torch.Tensor, cond: Cond = None, x_real: torch.Tensor | None = None,
                    cond_real: Cond = None, hp: TTUR | None = None, uncond: Cond = None,
                    generator: torch.Generator | None = None, fake_cond: Cond = None) -> dict[str, torch.Tensor]:
    """Iteration `it` of DMD2 training (Sec. 4.6): a generator update when it % ratio == 0, then a critic
    update on the same generated batch. x_in, t_in: the generator's input (pure noise for a one-step
    model, `backward_simulation` for a multi-step one); fake_cond: mu_fake's condition if not `cond` (beyond
    the paper, above). Returns detached loss values."""
    hp = hp or TTUR()
    if it % hp.ratio == 0:
        x, logs = generator_step(G, g_opt, x_in, t_in, real, fake, head, schedule, cond, hp, uncond, generator,
                                 fake_cond)
    else:
        with torch.no_grad():
            x, logs = G(x_in, t_in, cond), {}
    return logs | critic_step(fake, head, c_opt, x, schedule, cond, x_real, cond_real, hp, generator, fake_cond)
