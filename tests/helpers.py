"""Network-free references for the tests: an analytic Gaussian mixture (exact denoiser, density and score
at every noise level, in the spirit of EDM2's toy example) and tiny networks that count their calls."""

from __future__ import annotations

import math

import torch
from torch import nn

import dmd2


class GaussianMixture:
    """p(x) = sum_k pi_k N(x; m_k, s_k^2 I) in D dimensions; diffused: N(alpha m_k, (alpha^2 s_k^2 + sigma^2) I)."""

    def __init__(self, means, stds, weights=None):
        self.means = torch.as_tensor(means, dtype=torch.float64)  # [K, D]
        self.stds = torch.as_tensor(stds, dtype=torch.float64).reshape(-1)  # [K]
        K = len(self.means)
        self.weights = torch.full((K,), 1.0 / K, dtype=torch.float64) if weights is None else \
            torch.as_tensor(weights, dtype=torch.float64)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator=None) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k, None] * eps

    def _parts(self, x_t, alpha, sigma):
        # x_t [B, D], alpha/sigma [B] -> component variances [B, K] and log-likelihoods [B, K]
        var = alpha[:, None] ** 2 * self.stds**2 + sigma[:, None] ** 2  # [B, K]
        diff = x_t[:, None, :] - alpha[:, None, None] * self.means  # [B, K, D]
        logp = (torch.log(self.weights) - 0.5 * (diff**2).sum(-1) / var
                - 0.5 * self.dim * torch.log(2 * math.pi * var))
        return var, diff, logp

    def log_prob(self, x_t, alpha, sigma) -> torch.Tensor:
        return torch.logsumexp(self._parts(x_t, alpha, sigma)[2], dim=1)

    def score_autograd(self, x_t, alpha, sigma) -> torch.Tensor:
        """grad_x log p_t(x), by automatic differentiation of the exact density."""
        x = x_t.detach().double().requires_grad_(True)
        (g,) = torch.autograd.grad(self.log_prob(x, alpha.double(), sigma.double()).sum(), x)
        return g

    def posterior_mean(self, x_t, alpha, sigma) -> torch.Tensor:
        """E[x | x_t], the exact denoiser mu(x_t, t)."""
        x_t, alpha, sigma = x_t.double(), alpha.double(), sigma.double()
        var, diff, logp = self._parts(x_t, alpha, sigma)
        r = torch.softmax(logp, dim=1)  # responsibilities [B, K]
        mean_k = self.means + (alpha[:, None] * self.stds**2 / var)[..., None] * diff  # [B, K, D]
        return (r[..., None] * mean_k).sum(1)

    def denoiser(self, schedule: dmd2.Schedule):
        """mu(x_t, t, cond) for any x shape [B, ...] (flattened to D = prod of the rest)."""

        def mu(x_t, t, cond=None):
            a, s = schedule.alphas[t.cpu()], schedule.sigmas[t.cpu()]
            return self.posterior_mean(x_t.reshape(len(x_t), -1).cpu(), a, s).reshape(x_t.shape).float()

        return mu


class Counter:
    """Wrap a denoiser (and its `features`) to count calls and record their inputs and grad mode."""

    def __init__(self, net):
        self.net, self.calls, self.feature_calls = net, [], []

    def __call__(self, x_t, t, cond=None):
        out = self.net(x_t, t, cond)
        self.calls.append(dict(x_t=x_t.detach().clone(), t=t.clone(), cond=cond, grad=torch.is_grad_enabled(),
                               out=out.detach().clone()))
        return out

    def features(self, x_t, t, cond=None):
        self.feature_calls.append(dict(x_t=x_t.detach().clone(), t=t.clone(), cond=cond,
                                       grad=torch.is_grad_enabled()))
        return self.net.features(x_t, t, cond)

    def parameters(self):
        return self.net.parameters() if hasattr(self.net, "parameters") else iter(())


class TinyCritic(nn.Module):
    """A denoiser with an encoder-decoder split: x0 = decoder(features(x_t, t, cond))."""

    def __init__(self, channels: int = 3, width: int = 8, n_classes: int = 0):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(channels, width, 3, 1, 1), nn.SiLU(), nn.Conv2d(width, width, 4, 2, 1))
        self.temb = nn.Embedding(1000, width)
        self.cemb = nn.Embedding(max(n_classes, 1), width)
        self.dec = nn.Sequential(nn.SiLU(), nn.ConvTranspose2d(width, channels, 4, 2, 1))

    def features(self, x_t, t, cond=None):
        h = self.enc(x_t) + self.temb(t)[:, :, None, None]
        if cond is not None:
            h = h + self.cemb(cond)[:, :, None, None]
        return h

    def forward(self, x_t, t, cond=None):
        return self.dec(self.features(x_t, t, cond))


class TinyGenerator(nn.Module):
    def __init__(self, channels: int = 3, width: int = 8):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(channels, width, 3, 1, 1), nn.SiLU(), nn.Conv2d(width, channels, 3, 1, 1))

    def forward(self, x_t, t, cond=None):
        return self.net(x_t)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
