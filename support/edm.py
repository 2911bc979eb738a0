"""EDM's side of the class-conditional scripts (Karras et al. 2022, github.com/NVlabs/edm), without its repository.

    ADMUNet, Precond       the ADM UNet (Dhariwal & Nichol 2021) in EDM's layout, and EDM's preconditioning
    small_unet, FlowPrecond
                           the small experiment's teacher: the same architecture at 0.6-0.8M parameters, EDM's
                           preconditioning or a velocity network (rectified flow)
    load_edm_network       EDM network pickles (`torch_utils.persistence`), e.g. edm-imagenet-64x64-cond-adm.pkl
                           (in support/edm_pickle.py)
    edm_teacher            a pickle's UNet under our Precond (bf16 autocast governs precision)
    EDMDenoiser, Critic    an EDM network as a dmd2 denoiser (timestep index -> Karras sigma, label -> one-hot),
                           its encoder's bottleneck for the GAN head, and mu_fake + head as one module
    build_students         G and the critic initialised from the teacher (Sec. 4.6), with the GAN head
    edm_sampler            EDM's deterministic Euler / Heun sampler (the teacher's baseline)
    load_generator, save_grid
                           the one-step generator of a train_imagenet.py run, and a grid of its samples
    fuse_attention, compile_networks
                           speed paths that leave results unchanged up to rounding (tests/test_speed.py)
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import dmd2
from support.edm_pickle import EDMPickleError, load_edm_network
from support.runs import autocast, load_file, require, stream_seed

EDM_IMAGENET64_URL = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-imagenet-64x64-cond-adm.pkl"
EDM_IMAGENET64_REF_URL = "https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/imagenet-64x64.npz"

# ----------------------------------------------------------------------------------------------------
# Networks. The ADM UNet (Dhariwal & Nichol 2021) in EDM's layout (Karras et al. 2022, `DhariwalUNet`:
# `enc` and `dec` dicts of blocks, one-hot class labels) with EDM's preconditioning, so one adapter
# serves our small teacher and the released ImageNet pickle alike. The ImageNet configuration is
# `ADMUNet(64, 3, 1000)` with the defaults: 296M parameters.


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, c // 4), c, eps=1e-6)


def _zero(conv: nn.Conv2d) -> nn.Conv2d:
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ADMBlock(nn.Module):
    """Residual block: GN-SiLU-conv, scale/shift from the embedding, GN-SiLU-conv; optional 2x resampling
    (box filter) and multi-head self-attention."""

    sdpa = True  # attention with F.scaled_dot_product_attention; False: EDM's einsum + float32 softmax

    def __init__(self, cin: int, cout: int, emb: int, up: bool = False, down: bool = False,
                 attention: bool = False, head_channels: int = 64, dropout: float = 0.0):
        super().__init__()
        self.in_channels, self.up, self.down, self.dropout = cin, up, down, dropout
        self.norm0, self.conv0 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.affine = nn.Linear(emb, 2 * cout)
        self.norm1, self.conv1 = _norm(cout), _zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.heads = max(1, cout // head_channels) if attention else 0
        if attention:
            self.norm2, self.qkv, self.proj = _norm(cout), nn.Conv2d(cout, 3 * cout, 1), _zero(nn.Conv2d(cout, cout, 1))

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="nearest") if self.up else F.avg_pool2d(x, 2) if self.down else x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(self._resample(F.silu(self.norm0(x))))
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        h = self.conv1(F.dropout(h, self.dropout, self.training))
        x = self._resample(x)
        x = h + (self.skip(x) if self.skip is not None else x)
        if self.heads:
            B, C, H, W = x.shape
            q, k, v = self.qkv(self.norm2(x)).reshape(B, 3, self.heads, C // self.heads, H * W).unbind(1)
            attend = sdpa if self.sdpa else einsum_attention  # see fuse_attention
            a = attend(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
            x = x + self.proj(a.transpose(-1, -2).reshape(B, C, H, W))
        return x


class ADMUNet(nn.Module):
    """F(x, c_noise, class_labels) of EDM's preconditioned denoiser. Encoder output = the bottleneck
    ((res / 2^(levels-1))^2 x channels * mult[-1]: 8x8x768 for ImageNet-64), where the GAN head sits."""

    def __init__(self, resolution: int, in_channels: int, label_dim: int, channels: int = 192,
                 mult: tuple[int, ...] = (1, 2, 3, 4), blocks: int = 3, attn: tuple[int, ...] = (32, 16, 8),
                 emb_mult: int = 4, dropout: float = 0.0):
        super().__init__()
        emb = channels * emb_mult
        self.channels, self.label_dim = channels, label_dim
        self.map_layer0, self.map_layer1 = nn.Linear(channels, emb), nn.Linear(emb, emb)
        self.map_label = nn.Linear(label_dim, emb, bias=False) if label_dim else None
        kw = dict(emb=emb, dropout=dropout)
        self.enc, skips, c = nn.ModuleDict(), [], in_channels
        for level, m in enumerate(mult):
            res = resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = nn.Conv2d(c, channels * m, 3, padding=1)
                c = channels * m
            else:
                self.enc[f"{res}x{res}_down"] = ADMBlock(c, c, down=True, **kw)
            skips.append(c)
            for i in range(blocks):
                self.enc[f"{res}x{res}_block{i}"] = ADMBlock(c, channels * m, attention=res in attn, **kw)
                c = channels * m
                skips.append(c)
        self.dec = nn.ModuleDict()
        for level, m in reversed(list(enumerate(mult))):
            res = resolution >> level
            if level == len(mult) - 1:
                self.dec[f"{res}x{res}_in0"] = ADMBlock(c, c, attention=True, **kw)
                self.dec[f"{res}x{res}_in1"] = ADMBlock(c, c, **kw)
            else:
                self.dec[f"{res}x{res}_up"] = ADMBlock(c, c, up=True, **kw)
            for i in range(blocks + 1):
                self.dec[f"{res}x{res}_block{i}"] = ADMBlock(c + skips.pop(), channels * m, attention=res in attn, **kw)
                c = channels * m
        self.out_norm, self.out_conv = _norm(c), _zero(nn.Conv2d(c, in_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        freqs = torch.exp(-math.log(10_000) * torch.arange(self.channels // 2, device=x.device) / (self.channels // 2))
        pos = noise_labels.float()[:, None] * freqs[None]  # sinusoidal embedding of c_noise
        emb = self.map_layer1(F.silu(self.map_layer0(torch.cat([pos.cos(), pos.sin()], dim=1))))
        if self.map_label is not None:
            emb = emb + self.map_label(class_labels.to(emb.dtype))
        emb, skips = F.silu(emb), []
        for block in self.enc.values():
            x = block(x) if isinstance(block, nn.Conv2d) else block(x, emb)
            skips.append(x)
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


class Precond(nn.Module):
    """EDM's preconditioning (Karras et al. 2022, Table 1): D(x; sigma) = c_skip x + c_out F(c_in x, c_noise)."""

    def __init__(self, model: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        self.model, self.sigma_data = model, sigma_data

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        sigma, sd = sigma.float().reshape(-1, 1, 1, 1), self.sigma_data
        c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in, c_noise = 1 / (sd**2 + sigma**2).sqrt(), sigma.log().flatten() / 4
        return c_skip * x.float() + c_out * self.model(c_in * x, c_noise, class_labels).float()


class FlowPrecond(nn.Module):
    """A velocity network as a denoiser (rectified flow, v = eps - x): D(x; sigma) = x - sigma F(x, 1000 sigma),
    its time input in SD3's units. `EDMDenoiser` serves it as any other D(x; sigma), on a `dmd2.FlowSchedule`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        sigma = sigma.float().reshape(-1, 1, 1, 1)
        return x.float() - sigma * self.model(x, 1000 * sigma.flatten(), class_labels).float()


def make_schedule(name: str, shift: float = 1.0) -> dmd2.Schedule:
    """The small experiment's schedules by name: "edm" (Karras grid) or "flow" (rectified flow; no shift by default)."""
    return dmd2.FlowSchedule(shift) if name == "flow" else dmd2.EDMSchedule()


def small_unet(resolution: int, channels: int, label_dim: int, in_channels: int = 1, flow: bool = False) -> nn.Module:
    """The small experiment's teacher: ADM at 3 levels (16 -> 8 -> 4 px), attention at the 4x4x64 bottleneck, under
    EDM's preconditioning, or a velocity network (`flow`)."""
    model = ADMUNet(resolution, in_channels, label_dim, channels=channels, mult=(1, 2, 4), blocks=1,
                    attn=(resolution // 4,))
    return FlowPrecond(model) if flow else Precond(model)


class _Stop(Exception):  # carries the encoder's output out of the hook
    pass


class EDMDenoiser(nn.Module):
    """An EDM network D(x; sigma, class_labels) as a dmd2 denoiser (x_t, t, label) -> x0, t on the schedule's grid
    (EDM's Karras sigmas, or a flow's).

    `features` is the bottleneck for the GAN head: the output of the last encoder block, taken with a
    forward hook that stops the network there, so the decoder half never runs."""

    def __init__(self, net: nn.Module, schedule: dmd2.Schedule, label_dim: int, steps: int = 0):
        super().__init__()
        self.net, self.schedule, self.label_dim, self.steps = net, schedule, label_dim, steps
        self.encoder_end = edm_encoder_output_module(net)
        device = next(net.parameters(), torch.empty(0)).device  # the buffer starts where the network is
        n = label_dim + steps  # the one-hot rows, and a last row of zeros: no class, or no step
        self.register_buffer("onehot", torch.eye(n + 1, n, device=device), persistent=False)  # built once

    def _labels(self, labels: torch.Tensor) -> torch.Tensor | None:
        """Class indices [B] -> one-hot [B, label_dim] (None: unconditional); with `steps` (dmd2.py, section 7) (class,
        step) pairs [B, 2] -> the class's one-hot and then the step's; a class alone (the GAN's images): no step."""
        if labels.ndim == 1 and not self.steps:
            return self.onehot[labels.long()] if self.label_dim else None
        none = torch.full_like(labels[..., 0] if labels.ndim == 2 else labels, len(self.onehot) - 1)
        cls, step = (labels[:, 0], labels[:, 1] + self.label_dim) if labels.ndim == 2 else (labels, none)
        return self.onehot[(cls if self.label_dim else none).long()] + self.onehot[step.long()]

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.net(x_t, self.schedule.sigma(t), self._labels(labels))

    def features(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        def grab(module, inputs, output):
            raise _Stop(output)

        handle = self.encoder_end.register_forward_hook(grab)
        # a compiled network (compile_networks) would not see a hook added after compiling: run it eagerly
        net = self.net if self.net._compiled_call_impl is None else self.net._call_impl
        try:
            net(x_t, self.schedule.sigma(t), self._labels(labels))
        except _Stop as stop:
            return stop.args[0]
        finally:
            handle.remove()


class Critic(nn.Module):
    """The fake score mu_fake and the GAN head, one module so that DDP syncs both with one wrapper."""

    def __init__(self, fake: EDMDenoiser, head: dmd2.GANHead | None):
        super().__init__()
        self.fake, self.head = fake, head

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.fake(x_t, t, labels)

    def features(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.fake.features(x_t, t, labels)


class DDPCritic:
    """dmd2's critic protocol over a DDP-wrapped `Critic`: denoising passes go through DDP (gradient sync),
    encoder-only passes reach the module directly (their gradients are synced by the same backward)."""

    def __init__(self, ddp: nn.Module):
        self.ddp, self.module = ddp, ddp.module

    def __call__(self, x_t, t, labels):
        return self.ddp(x_t, t, labels)

    def features(self, x_t, t, labels):
        return self.module.features(x_t, t, labels)

    def parameters(self):
        return self.module.parameters()


# ----------------------------------------------------------------------------------------------------
# An EDM pickle's network (support/edm_pickle.py) as the teacher: its bottleneck, our preconditioning, checks.


def edm_encoder_output_module(net: nn.Module) -> nn.Module:
    """The last block of the encoder of an EDM UNet: its output is the bottleneck that DMD2's GAN head
    classifies (Sec. 4.3; 8x8x768 for the ImageNet-64 ADM UNet), the tensor the authors' code returns right
    after the encoder loop.

    EDM's preconditioners (EDMPrecond, VPPrecond, VEPrecond, iDDPMPrecond) and ours (`Precond`) hold the UNet
    as `net.model`; `DhariwalUNet`, `SongUNet` and our `ADMUNet` keep their blocks in two ModuleDicts, `enc`
    (run in order, e.g. '64x64_conv', ..., '8x8_block2') and `dec`. The last `enc` entry is a block in every
    layout (SongUNet's 'aux' entries come before each resolution's blocks)."""
    unet = getattr(net, "model", net)
    layout = type(unet).__name__
    enc, dec = getattr(unet, "enc", None), getattr(unet, "dec", None)
    if not isinstance(enc, nn.ModuleDict) or not isinstance(dec, nn.ModuleDict) or len(enc) == 0:
        raise ValueError(f"expected EDM's UNet layout (DhariwalUNet, SongUNet or ADMUNet, or a preconditioner holding "
                         f"one as .model) with `enc`/`dec` ModuleDicts; got {type(net).__name__} around {layout}")
    name, module = list(enc.items())[-1]
    require("aux" not in name, f"the last encoder entry of this {layout} is {name!r}, not a block")
    return module


def edm_teacher(source: str) -> Precond:
    """The UNet of an EDM network pickle under our `Precond`, which computes EDMPrecond's formulas but lets
    bf16 autocast govern precision: EDMPrecond casts to float16 when `use_fp16` (the released ImageNet pickle)
    and asserts its UNet's output dtype, which fails under autocast (the authors edited the cast to bf16)."""
    net = load_edm_network(source)
    if not hasattr(net, "model") or not hasattr(net, "sigma_data"):
        raise EDMPickleError(f"{source}: expected an EDM preconditioner (EDMPrecond) holding its UNet as .model")
    ours = Precond(net.model, float(net.sigma_data))
    ours.label_dim = int(getattr(net, "label_dim", 0))
    ours.img_resolution, ours.img_channels = getattr(net, "img_resolution", None), getattr(net, "img_channels", None)
    fuse_attention(ours)
    return ours.eval().requires_grad_(False)


@torch.no_grad()
def edm_sampler(net: nn.Module, z: torch.Tensor, labels: torch.Tensor, label_dim: int, steps: int, heun: bool,
                sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                flow: bool = False) -> torch.Tensor:
    """EDM's deterministic sampler (Karras et al. 2022, Algorithm 1): Euler (NFE = steps) or Heun
    (NFE = 2 steps - 1) of dx/dsigma = (x - D(x; sigma)) / sigma on the Karras discretisation. The teacher baseline,
    not part of DMD2. `flow`: the same ODE of a flow teacher (its velocity is (x - D) / sigma) from sigma 1 on the
    uniform grid, Euler for the flow teachers' own sampler."""
    i = torch.arange(steps, dtype=torch.float64, device=z.device)
    lo, hi = (0.0, 1.0) if flow else (sigma_min ** (1 / rho), sigma_max ** (1 / rho))
    t = (hi + i / (steps if flow else max(steps - 1, 1)) * (lo - hi)) ** (1 if flow else rho)
    t = torch.cat([t, torch.zeros(1, dtype=t.dtype, device=t.device)])
    onehot = F.one_hot(labels, label_dim).float() if label_dim else None
    x = z.double() * t[0]
    for j in range(steps):
        d = (x - net(x.float(), t[j].expand(len(x)).float(), onehot).double()) / t[j]
        x_next = x + (t[j + 1] - t[j]) * d
        if heun and t[j + 1] > 0:
            d2 = (x_next - net(x_next.float(), t[j + 1].expand(len(x)).float(), onehot).double()) / t[j + 1]
            x_next = x + (t[j + 1] - t[j]) * (d + d2) / 2
        x = x_next
    return x.float()


def check_teacher(net: Precond, resolution: int, channels: int, label_dim: int, data_classes: int) -> None:
    """The teacher fits the run: its resolution and channels are the data's, its classes cover the labels."""
    require(net.label_dim == label_dim, f"the teacher has {net.label_dim} classes, --label-dim is {label_dim}")
    if getattr(net, "img_resolution", None) not in (None, resolution):
        raise ValueError(f"the teacher is a {net.img_resolution} px network, --resolution is {resolution}")
    if getattr(net, "img_channels", None) not in (None, channels):
        raise ValueError(f"the teacher takes {net.img_channels}-channel images, the data has {channels}")
    require(not label_dim or data_classes, f"the teacher is class-conditional ({label_dim} classes), the data has "
            f"no labels (no dataset.json labels)")
    if label_dim and data_classes > label_dim:
        raise ValueError(f"the data has labels up to {data_classes - 1}, the teacher {label_dim} classes")


# ----------------------------------------------------------------------------------------------------
# Students (Sec. 4.6: G and mu_fake start from the teacher's weights) and sampling from a run.


def build_students(teacher_net: nn.Module, schedule: dmd2.Schedule, label_dim: int, channels: int,
                   resolution: int, gan: bool, seed: int, device: torch.device,
                   fake_steps: int = 0) -> tuple[EDMDenoiser, Critic]:
    """(G, critic): trainable copies of the teacher; the critic holds mu_fake and, if `gan`, the GAN head sized
    from one encoder pass (initialised from `seed`, so identically on every rank). Both in eval mode: no
    dropout, as the authors rebuild EDM's network with dropout 0. fake_steps > 0: mu_fake also takes the step of a
    `fake_steps`-step G (dmd2.py, section 7) as `fake_steps` more label columns of the ADM UNet, zero at first."""
    G = EDMDenoiser(copy.deepcopy(teacher_net).requires_grad_(True), schedule, label_dim).to(device)
    fake = EDMDenoiser(copy.deepcopy(teacher_net).requires_grad_(True), schedule, label_dim, fake_steps).to(device)
    if fake_steps:
        model, emb = fake.net.model, fake.net.model.map_layer1.out_features
        old, model.map_label = model.map_label, nn.Linear(label_dim + fake_steps, emb, bias=False, device=device)
        with torch.no_grad():
            model.map_label.weight.zero_()[:, :label_dim] = old.weight if old is not None else 0
    head = None
    if gan:
        with torch.no_grad():  # the bottleneck's shape, from one encoder pass
            x = torch.zeros(1, channels, resolution, resolution, device=device)
            h = fake.features(x, torch.zeros(1, dtype=torch.long, device=device), torch.zeros(1, device=device))
        torch.manual_seed(stream_seed(seed, "head"))
        head = dmd2.GANHead(h.shape[1], h.shape[2]).to(device)
    return G.eval(), Critic(fake, head).eval()


def few_step(G: EDMDenoiser, timesteps: list[int],
             seed: int = 0) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The student as a sampler at its timesteps (dmd2.sample); the fresh noise between steps comes from one
    generator seeded here, so a sequence of calls is reproducible. One step: x = G(sigma_max z; sigma_max, label)."""
    gen = None if len(timesteps) == 1 else torch.Generator(next(G.parameters()).device).manual_seed(seed)
    return lambda z, labels: dmd2.sample(G, z, G.schedule, timesteps, labels, gen)


@torch.no_grad()
def save_grid(G: EDMDenoiser, labels: list[int], n: int, channels: int, resolution: int, seed: int, path: str,
              batch: int = 100, timesteps: list[int] | None = None) -> None:
    """A PNG grid of samples at `timesteps` (default: one step): a row per label, n samples each, from noise
    seeded with `seed`."""
    from torchvision.utils import save_image

    device = next(G.parameters()).device
    y = torch.tensor(labels, device=device).repeat_interleave(n)
    grid = torch.Generator(device).manual_seed(stream_seed(seed, "grid"))
    z = torch.randn(len(y), channels, resolution, resolution, generator=grid, device=device)
    with autocast(device):
        sample = few_step(G, timesteps or [G.schedule.T - 1], stream_seed(seed, "grid steps"))
        x = torch.cat([sample(z[i:i + batch], y[i:i + batch]).float() for i in range(0, len(y), batch)])
    save_image(x * 0.5 + 0.5, path, nrow=n, padding=1)


def teacher_sampler(net: nn.Module, label_dim: int, nfe: int, heun: bool, flow: bool = False):
    """EDM's sampler at a budget of `nfe` network evaluations, as a (z, labels) -> images callable."""
    steps = (nfe + 1) // 2 if heun else nfe
    return lambda z, labels: edm_sampler(net, z, labels, label_dim, steps, heun, flow=flow)


def read_checkpoint(path: str, device: torch.device | str = "cpu") -> dict:
    """A checkpoint written by train_imagenet.py (a run folder or its checkpoint.pt); its config a plain dict."""
    path = os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    # on the CPU memory-mapped: reading the config (argument checks) does not load a multi-GB checkpoint's tensors
    ck = load_file(path, "checkpoint of train_imagenet.py", device, mmap=torch.device(device).type == "cpu")
    if ck.get("kind") != "class-conditional" or not isinstance(ck.get("config"), dict):
        raise ValueError(f"{path} is not a checkpoint of train_imagenet.py")
    return ck


def load_generator(path: str, device: torch.device | str = "cpu", ema: bool = False) -> tuple[EDMDenoiser, dict]:
    """(G, the run's config dict): the generator of a run (its EMA if asked and kept), for dmd2.sample at the
    run's timesteps (dmd2.step_timesteps(cfg.get("steps", 1))). The architecture is the run's: the small ADM UNet
    (its image channels read from the weights), or the UNet of its teacher pickle."""
    ck = read_checkpoint(path)
    cfg, state = ck["config"], ck["ema"] if ema and ck.get("ema") is not None else ck["G"]
    if cfg.get("teacher") is None:
        first = next(v for k, v in state.items() if k.startswith("net.model.enc.") and k.endswith(".weight"))
        net = small_unet(cfg["resolution"], cfg["channels"], cfg["label_dim"], first.shape[1],
                         cfg.get("schedule") == "flow")
    else:
        net = edm_teacher(cfg["teacher"])
    G = EDMDenoiser(net, make_schedule(cfg.get("schedule", "edm"), cfg.get("shift", 1.0)), cfg["label_dim"])
    load_weights(G, state, path)
    return G.to(device).eval().requires_grad_(False), cfg


def init_students(path: str, G: EDMDenoiser, critic: Critic, device: torch.device | str) -> None:
    """G's and the critic's weights from a checkpoint (`--init-from`); a GAN head may come or go."""
    ck = read_checkpoint(path, device)
    load_weights(G, ck["G"], path)
    missing, unexpected = load_weights(critic, ck["critic"], path, strict=False)
    bad = [k for k in [*missing, *unexpected] if not k.startswith("head.")]
    if bad:
        raise ValueError(f"--init-from {path}: the critic does not match ({bad[0]}, ...)")


def load_weights(module: nn.Module, state: dict, source: str, strict: bool = True) -> tuple[list, list]:
    """module.load_state_dict, with a one-line error naming `source` when the weights do not fit the network
    (a checkpoint of another width, resolution or number of classes)."""
    try:
        return module.load_state_dict(state, strict=strict)
    except RuntimeError as e:
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e)[:200])
        raise ValueError(f"{source}: its weights do not fit this network ({detail})") from None


# ----------------------------------------------------------------------------------------------------
# Speed: fused attention and torch.compile.
#
# EDM's UNetBlock computes attention explicitly: an einsum for q^T k, a float32 softmax (its AttentionOp) and an
# einsum with v, materialising the [HW, HW] weights of every head. `fuse_attention` makes the attention blocks
# of a loaded EDM network call F.scaled_dot_product_attention instead (flash / memory-efficient kernels on a
# GPU), without editing the pickled source: it replaces `forward` on the UNetBlock class rebuilt from that
# source. The class is shared by every network rebuilt from the same source (cached by its text), including G
# and the fake score, which are copies (copy.deepcopy) of the teacher; a bound method set on an instance would
# not survive such a copy, which goes through the class's persistent __reduce__.

# the attributes of an attention block of EDM's UNetBlock that its forward (and ours below) reads
_UNET_BLOCK_LAYOUT = ("norm0", "conv0", "affine", "norm1", "conv1", "skip", "skip_scale", "adaptive_scale", "dropout",
                      "num_heads", "norm2", "qkv", "proj")


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """F.scaled_dot_product_attention of [..., L, d] inputs, made contiguous first: the fused kernels (flash
    attention on the CPU too) need a unit stride in the last dimension, and transposed views of EDM's [..., d, L]
    layout would silently fall back to the unfused math path (measured 1.5x slower on the CPU, forward and
    backward, 1,024 tokens)."""
    return F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())


def einsum_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for [..., L, d] inputs (as F.scaled_dot_product_attention), the way EDM's
    UNetBlock computes it: einsums, with the logits and softmax in float32 (weights cast back to q's dtype)."""
    logits = torch.einsum("...qc,...kc->...qk", q.float(), (k / math.sqrt(k.shape[-1])).float())
    return torch.einsum("...qk,...kc->...qc", logits.softmax(dim=-1).to(q.dtype), v)


def _sdpa_unet_block_forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """EDM's UNetBlock.forward, operation for operation, except that the attention is one
    F.scaled_dot_product_attention call instead of einsum / float32 softmax / einsum."""
    orig = x
    x = self.conv0(F.silu(self.norm0(x)))
    params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
    if self.adaptive_scale:
        scale, shift = params.chunk(2, dim=1)
        x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
    else:
        x = F.silu(self.norm1(x.add_(params)))
    x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
    x = x.add_(self.skip(orig) if self.skip is not None else orig)
    x = x * self.skip_scale
    if self.num_heads:
        B, C, H, W = x.shape
        # EDM's channel order of qkv: per head, C / heads channels, each with its (q, k, v) adjacent
        q, k, v = self.qkv(self.norm2(x)).reshape(B, self.num_heads, C // self.num_heads, 3, H * W).unbind(3)
        a = sdpa(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        x = self.proj(a.transpose(-1, -2).reshape(B, C, H, W)).add_(x)
        x = x * self.skip_scale
    return x


def fuse_attention(net: nn.Module, fused: bool = True) -> int:
    """Attention with F.scaled_dot_product_attention (fused) or EDM's einsum / float32 softmax (fused=False), equal
    up to rounding forward and backward, in every attention block of `net`: EDM's UNetBlock (DhariwalUNet, SongUNet)
    by its rebuilt class's `forward` (see above; EDM's own kept as `_plain_forward`; other layouts left alone), our
    ADMBlock by its `sdpa` flag. Returns the number of attention blocks set."""
    n = 0
    for m in net.modules():
        if isinstance(m, ADMBlock) and m.heads:
            m.sdpa = fused
        elif type(m).__name__ == "UNetBlock" and all(hasattr(m, a) for a in _UNET_BLOCK_LAYOUT) and m.num_heads:
            cls = type(m)
            if "_plain_forward" not in cls.__dict__:
                cls._plain_forward = cls.forward
            cls.forward = _sdpa_unet_block_forward if fused else cls._plain_forward
        else:
            continue
        n += 1
    return n


def compile_networks(*modules: nn.Module, **compile_kwargs) -> None:
    """torch.compile in place (nn.Module.compile) the network of each EDMDenoiser or Critic given (other modules
    as they are): its calls run compiled, its parameters, state dict and checkpoints stay as they were
    (EDMDenoiser.features runs it eagerly, see there). Call it last, after every copy of the networks
    (copy.deepcopy keeps a reference to the original's compiled call)."""
    for m in modules:
        m = m.fake if isinstance(m, Critic) else m
        (m.net if isinstance(m, EDMDenoiser) else m).compile(**compile_kwargs)
