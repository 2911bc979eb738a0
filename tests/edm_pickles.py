"""EDM network pickles for the tests: the writing half of EDM's torch_utils.persistence, reimplemented, and two
network sources to pickle with it.

    TINY_NETWORKS_SRC   a tiny stand-in with DhariwalUNet's layout (enc / dec dicts) and EDM's imports
    EDM_NETWORKS_SRC    EDM's training/networks.py rewritten for the tests: the same classes, attribute names,
                        submodule names and arithmetic, so a network built from it computes what EDM's computes
    edm_pickle          a snapshot pickle dict(ema=net, ...) of a tiny DhariwalUNet or SongUNet built from it
"""

from __future__ import annotations

import contextlib
import copy
import math
import pickle
import sys
import types

import torch

TINY_NETWORKS_SRC = '''
"""A tiny stand-in for EDM's training/networks.py: EDMPrecond around a two-level UNet with DhariwalUNet's
layout (blocks in model.enc / model.dec ModuleDicts) and the same imports from torch_utils."""

import numpy as np
import torch
from torch_utils import persistence
from torch.nn.functional import silu


def weight_init(shape, fan_in):
    return torch.randn(*shape) / np.sqrt(fan_in)


@persistence.persistent_class
class Conv2d(torch.nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.weight = torch.nn.Parameter(weight_init([out_channels, in_channels, 3, 3], 9 * in_channels))
        self.bias = torch.nn.Parameter(0.1 * torch.randn(out_channels))

    def forward(self, x):
        return torch.nn.functional.conv2d(x, self.weight, self.bias, padding=1)


@persistence.persistent_class
class UNetBlock(torch.nn.Module):
    def __init__(self, in_channels, out_channels, emb_channels, down=False, up=False):
        super().__init__()
        self.in_channels, self.out_channels, self.down, self.up = in_channels, out_channels, down, up
        self.conv = Conv2d(in_channels, out_channels)
        self.affine = torch.nn.Linear(emb_channels, out_channels)
        self.register_buffer("scale", torch.full([out_channels, 1, 1], 0.9))

    def forward(self, x, emb):
        if self.down:
            x = torch.nn.functional.avg_pool2d(x, 2)
        if self.up:
            x = torch.nn.functional.interpolate(x, scale_factor=2.0)
        return silu(self.scale * self.conv(x) + self.affine(emb)[:, :, None, None])


@persistence.persistent_class
class DhariwalUNet(torch.nn.Module):
    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, model_channels=8, dropout=0.1):
        super().__init__()
        c, e, r, h = model_channels, 4 * model_channels, img_resolution, img_resolution // 2
        self.dropout = dropout
        self.map_noise = torch.nn.Linear(1, e)
        self.map_label = torch.nn.Linear(label_dim, e, bias=False) if label_dim else None
        self.enc = torch.nn.ModuleDict()
        self.enc[f"{r}x{r}_conv"] = Conv2d(in_channels, c)
        self.enc[f"{h}x{h}_down"] = UNetBlock(c, c, e, down=True)
        self.enc[f"{h}x{h}_block0"] = UNetBlock(c, 2 * c, e)
        self.dec = torch.nn.ModuleDict()
        self.dec[f"{h}x{h}_in0"] = UNetBlock(2 * c, 2 * c, e)
        self.dec[f"{r}x{r}_up"] = UNetBlock(2 * c, c, e, up=True)
        self.out_conv = Conv2d(c, out_channels)

    def embedding(self, noise_labels, class_labels):
        emb = self.map_noise(noise_labels[:, None])
        if self.map_label is not None:
            emb = emb + self.map_label(class_labels)
        return silu(emb)

    def forward(self, x, noise_labels, class_labels):
        emb = self.embedding(noise_labels, class_labels)
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
        x = torch.nn.functional.dropout(x, p=self.dropout, training=self.training)
        for block in self.dec.values():
            x = block(x, emb)
        return self.out_conv(x)


@persistence.persistent_class
class EDMPrecond(torch.nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim=0, sigma_data=0.5, model_type="DhariwalUNet",
                 **model_kwargs):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.sigma_data = sigma_data
        self.model = globals()[model_type](img_resolution=img_resolution, in_channels=img_channels,
                                           out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def forward(self, x, sigma, class_labels=None):
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        return c_skip * x + c_out * self.model(c_in * x, (sigma.log() / 4).flatten(), class_labels)


@persistence.persistent_class
class EDMLoss:
    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data
'''

STYLEGAN_LIKE_SRC = '''
import torch
from torch_utils import persistence
from torch_utils.ops import bias_act


@persistence.persistent_class
class MappingNetwork(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(2, 2)

    def forward(self, z):
        return bias_act.bias_act(self.fc(z))
'''

_ABSENT = object()


@contextlib.contextmanager
def sys_modules(entries: dict):
    """Set (or, with None, block the import of) some sys.modules entries, restoring exactly those after."""
    saved = {name: sys.modules.get(name, _ABSENT) for name in entries}
    sys.modules.update(entries)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is _ABSENT:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


NO_TORCH_UTILS = {"torch_utils": None, "torch_utils.persistence": None, "torch_utils.misc": None,
                  "dnnlib": None, "dnnlib.util": None}  # None in sys.modules: `import` raises ImportError


class EDMPersistence:
    """The writing half of EDM's torch_utils.persistence (read from NVlabs/edm), reimplemented for the tests.

    `persistent_class` subclasses a class so that its instances reduce to `_reconstruct_persistent_obj(meta)`,
    meta = dict(type='class', version=6, module_src=<module source>, class_name=..., state=<reduced state>),
    and records the constructor arguments as `_init_args` / `_init_kwargs`. `modules()` are the sys.modules
    entries under which pickle finds the reconstruct function as torch_utils.persistence's, and which make this
    object the importable, "real" torch_utils.
    """

    def __init__(self, drop_from_state: tuple[str, ...] = ()):
        self.drop_from_state = drop_from_state  # attributes an older torch's modules did not have yet
        self.sources: dict[str, str] = {}  # module name -> source
        self.module_of_source: dict[str, types.ModuleType] = {}
        self.calls: list[str] = []  # class names rebuilt by `reconstruct`
        self.persistence = types.ModuleType("torch_utils.persistence")
        self.persistence.persistent_class = self.persistent_class
        self.persistence._reconstruct_persistent_obj = self.reconstruct_function()
        self.ops = types.ModuleType("torch_utils.ops")  # what a StyleGAN network source needs besides
        self.ops.bias_act = types.SimpleNamespace(bias_act=torch.relu)
        self.package = types.ModuleType("torch_utils")
        self.package.persistence, self.package.ops = self.persistence, self.ops
        self.package.__path__ = []  # a package, so that `import torch_utils.ops` works
        self.dnnlib_util = types.ModuleType("dnnlib.util")
        self.dnnlib_util.EasyDict = type("EasyDict", (dict,), {"__module__": "dnnlib.util"})
        self.dnnlib = types.ModuleType("dnnlib")
        self.dnnlib.util = self.dnnlib_util

    def modules(self) -> dict:
        return {"torch_utils": self.package, "torch_utils.persistence": self.persistence,
                "torch_utils.ops": self.ops, "dnnlib": self.dnnlib, "dnnlib.util": self.dnnlib_util}

    def reconstruct_function(self):
        def _reconstruct_persistent_obj(meta):
            self.calls.append(meta["class_name"])
            cls = self.module_of_source[meta["module_src"]].__dict__[meta["class_name"]]
            obj = cls.__new__(cls)
            if hasattr(obj, "__setstate__"):
                obj.__setstate__(meta["state"])
            else:
                obj.__dict__.update(meta["state"])
            return obj

        _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
        _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
        return _reconstruct_persistent_obj

    def persistent_class(self, orig: type) -> type:
        src, rebuild = self.sources[orig.__module__], self.persistence._reconstruct_persistent_obj
        drop = self.drop_from_state

        class Persistent(orig):
            def __init__(obj, *args, **kwargs):
                super().__init__(*args, **kwargs)
                obj._init_args, obj._init_kwargs = copy.deepcopy(args), copy.deepcopy(kwargs)

            def __reduce__(obj):  # (callable, args, state, ...) with the state moved into meta
                reduced = list(super().__reduce__())
                reduced += [None] * (3 - len(reduced))
                if reduced[0] is not rebuild:
                    state = {k: v for k, v in reduced[2].items() if k not in drop}
                    meta = dict(type="class", version=6, module_src=src, class_name=orig.__name__, state=state)
                    reduced[:3] = [rebuild, (meta,), None]
                return tuple(reduced)

        Persistent.__name__ = Persistent.__qualname__ = orig.__name__
        Persistent.__module__ = orig.__module__
        return Persistent

    def load_source(self, name: str, src: str) -> types.ModuleType:
        module = types.ModuleType(name)
        self.sources[name], self.module_of_source[src] = src, module
        with sys_modules({**self.modules(), name: module}):
            exec(src, module.__dict__)
        return module

    def dumps(self, obj: object) -> bytes:
        with sys_modules(self.modules()):
            return pickle.dumps(obj)


def tiny_edm_net(writer: EDMPersistence, seed: int = 0):
    torch.manual_seed(seed)
    module = writer.load_source(f"tiny_edm_networks_{seed}", TINY_NETWORKS_SRC)
    net = module.EDMPrecond(img_resolution=8, img_channels=3, label_dim=10, model_channels=8)
    # As EDM's training loop snapshots it: a copy in eval mode without gradients, on the CPU
    return module, copy.deepcopy(net).eval().requires_grad_(False)



EDM_NETWORKS_SRC = '''
"""EDM's network classes (Karras et al. 2022, training/networks.py of NVlabs/edm), rewritten for the tests.

Every class keeps EDM's constructor arguments, attribute and submodule names, and computes EDM's forward pass
operation for operation (the in-place adds, the float32 attention, the sin/cos swap of SongUNet), so a network
built here with EDM's weights returns what EDM's returns. Initialisation is simpler (the tests draw weights)."""

import numpy as np
import torch
from torch.nn.functional import silu
from torch_utils import persistence


def init_param(shape, fan_in, gain=1.0):
    return torch.nn.Parameter(torch.randn(*shape) * (gain / np.sqrt(max(fan_in, 1))))


@persistence.persistent_class
class Linear(torch.nn.Module):
    def __init__(self, in_features, out_features, bias=True, gain=1.0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = init_param([out_features, in_features], in_features, gain)
        self.bias = torch.nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x):
        y = x @ self.weight.to(x.dtype).t()
        return y if self.bias is None else y.add_(self.bias.to(x.dtype))


@persistence.persistent_class
class Conv2d(torch.nn.Module):
    """kernel 0: resampling only. up / down: 2x with the separable filter `resample_filter`, before the
    convolution, or merged with it (fused_resample: transposed filter then conv, or conv then strided filter)."""

    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False, resample_filter=(1, 1),
                 fused_resample=False, gain=1.0):
        assert not (up and down)
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        fan_in = in_channels * kernel * kernel
        self.weight = init_param([out_channels, in_channels, kernel, kernel], fan_in, gain) if kernel else None
        self.bias = torch.nn.Parameter(torch.zeros(out_channels)) if kernel and bias else None
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = torch.outer(f, f)[None, None] / f.sum().square()
        self.register_buffer("resample_filter", f if up or down else None)

    def forward(self, x):
        F = torch.nn.functional
        w = None if self.weight is None else self.weight.to(x.dtype)
        f = None if self.resample_filter is None else self.resample_filter.to(x.dtype)
        w_pad = 0 if w is None else w.shape[-1] // 2
        f_pad = 0 if f is None else (f.shape[-1] - 1) // 2
        if self.fused_resample and self.up and w is not None:
            up = f.mul(4).tile([self.in_channels, 1, 1, 1])
            x = F.conv_transpose2d(x, up, groups=self.in_channels, stride=2, padding=max(f_pad - w_pad, 0))
            x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
        else:
            if self.up:
                up = f.mul(4).tile([self.in_channels, 1, 1, 1])
                x = F.conv_transpose2d(x, up, groups=self.in_channels, stride=2, padding=f_pad)
            if self.down:
                x = F.conv2d(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if self.bias is not None:
            x = x.add_(self.bias.to(x.dtype).reshape(1, -1, 1, 1))
        return x


@persistence.persistent_class
class GroupNorm(torch.nn.Module):
    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return torch.nn.functional.group_norm(x, num_groups=self.num_groups, weight=self.weight.to(x.dtype),
                                              bias=self.bias.to(x.dtype), eps=self.eps)


class AttentionOp(torch.autograd.Function):
    """softmax over keys of q^T k / sqrt(channels), [N, C, Q] x [N, C, K] -> [N, Q, K], computed in float32 and
    returned (with its gradients) in the inputs' dtype."""

    @staticmethod
    def forward(ctx, q, k):
        scale = np.sqrt(k.shape[1])
        w = torch.einsum("ncq,nck->nqk", q.to(torch.float32), (k / scale).to(torch.float32))
        w = w.softmax(dim=2).to(q.dtype)
        ctx.save_for_backward(q, k, w)
        return w

    @staticmethod
    def backward(ctx, dw):
        q, k, w = ctx.saved_tensors
        scale = np.sqrt(k.shape[1])
        w32, dw32 = w.to(torch.float32), dw.to(torch.float32)
        ds = w32 * (dw32 - (dw32 * w32).sum(dim=2, keepdim=True))  # through the softmax
        dq = torch.einsum("nck,nqk->ncq", k.to(torch.float32), ds).to(q.dtype) / scale
        dk = torch.einsum("ncq,nqk->nck", q.to(torch.float32), ds).to(k.dtype) / scale
        return dq, dk


@persistence.persistent_class
class UNetBlock(torch.nn.Module):
    """The residual block of DDPM++, NCSN++ and ADM: GN-SiLU-conv (optionally resampling), the embedding as
    scale and shift (adaptive_scale) or as a bias, GN-SiLU-dropout-conv, skip connection, then optional
    multi-head self-attention; both sums are multiplied by skip_scale."""

    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False,
                 num_heads=None, channels_per_head=64, dropout=0, skip_scale=1, eps=1e-5, resample_filter=(1, 1),
                 resample_proj=False, adaptive_scale=True, init=None, init_zero=None, init_attn=None):
        super().__init__()
        init = init or {}
        init_zero = dict(gain=0) if init_zero is None else init_zero
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        if not attention:
            self.num_heads = 0
        else:
            self.num_heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel, up=up, down=down, resample_filter=resample_filter,
                               **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, 3 * out_channels, 1, **(init if init_attn is None else init_attn))
            self.proj = Conv2d(out_channels, out_channels, 1, **init_zero)

    def forward(self, x, emb):
        inp = x
        x = self.conv0(silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = silu(self.norm1(x.add_(params)))
        x = self.conv1(torch.nn.functional.dropout(x, p=self.dropout, training=self.training))
        x = x.add_(inp if self.skip is None else self.skip(inp))
        x = x * self.skip_scale
        if self.num_heads:
            n, c = x.shape[0], x.shape[1]
            # channels of qkv per head: (c / heads) x (q, k, v), interleaved
            q, k, v = self.qkv(self.norm2(x)).reshape(n * self.num_heads, c // self.num_heads, 3, -1).unbind(2)
            a = torch.einsum("nqk,nck->ncq", AttentionOp.apply(q, k), v)
            x = self.proj(a.reshape(*x.shape)).add_(x)
            x = x * self.skip_scale
        return x


@persistence.persistent_class
class PositionalEmbedding(torch.nn.Module):
    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x):
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


@persistence.persistent_class
class FourierEmbedding(torch.nn.Module):
    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = torch.outer(x, (2 * np.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


@persistence.persistent_class
class SongUNet(torch.nn.Module):
    """DDPM++ (positional embedding, standard encoder) and NCSN++ (Fourier embedding, residual encoder,
    [1, 3, 3, 1] filter). The encoder's `aux` entries carry a downsampled copy of the input (skip) or a
    residual stream (residual); the decoder's carry the output image (skip) or just produce it."""

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0, model_channels=128,
                 channel_mult=(1, 2, 2, 2), channel_mult_emb=4, num_blocks=4, attn_resolutions=(16,), dropout=0.10,
                 label_dropout=0, embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
                 decoder_type="standard", resample_filter=(1, 1)):
        assert embedding_type in ("fourier", "positional")
        assert encoder_type in ("standard", "skip", "residual") and decoder_type in ("standard", "skip")
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels, noise_channels = model_channels * channel_mult_emb, model_channels * channel_mult_noise
        init, init_zero, init_attn = dict(), dict(gain=1e-5), dict(gain=np.sqrt(0.2))
        kw = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=np.sqrt(0.5), eps=1e-6,
                  resample_filter=resample_filter, resample_proj=True, adaptive_scale=False, init=init,
                  init_zero=init_zero, init_attn=init_attn)
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        self.enc = torch.nn.ModuleDict()
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(cout, model_channels, 3, **init)
                cout = model_channels
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **kw)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, 0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, 1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, 3, down=True, fused_resample=True,
                                                                   resample_filter=resample_filter, **init)
                    caux = cout
            for i in range(num_blocks):
                self.enc[f"{res}x{res}_block{i}"] = UNetBlock(cout, model_channels * mult,
                                                              attention=res in attn_resolutions, **kw)
                cout = model_channels * mult
        skips = [block.out_channels for name, block in self.enc.items() if "aux" not in name]

        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **kw)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **kw)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **kw)
            for i in range(num_blocks + 1):
                attention = i == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{i}"] = UNetBlock(cout + skips.pop(), model_channels * mult,
                                                              attention=attention, **kw)
                cout = model_channels * mult
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, 0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, 3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)  # [cos, sin] -> [sin, cos]
        if self.map_label is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                keep = torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels * np.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer1(silu(self.map_layer0(emb))))

        skips, aux = [], x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / np.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        aux = tmp = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                tmp = block(x)
            elif "aux_conv" in name:
                tmp = block(silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux


@persistence.persistent_class
class DhariwalUNet(torch.nn.Module):
    """ADM (Dhariwal & Nichol 2021): adaptive-scale blocks with 64 channels per attention head."""

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0, model_channels=192,
                 channel_mult=(1, 2, 3, 4), channel_mult_emb=4, num_blocks=3, attn_resolutions=(32, 16, 8),
                 dropout=0.10, label_dropout=0):
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init, init_zero = dict(gain=np.sqrt(1 / 3)), dict(gain=0)
        kw = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init, init_zero=init_zero)
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = Linear(label_dim, emb_channels, bias=False, gain=np.sqrt(label_dim)) if label_dim else None

        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(cout, model_channels * mult, 3, **init)
                cout = model_channels * mult
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **kw)
            for i in range(num_blocks):
                self.enc[f"{res}x{res}_block{i}"] = UNetBlock(cout, model_channels * mult,
                                                              attention=res in attn_resolutions, **kw)
                cout = model_channels * mult
        skips = [block.out_channels for block in self.enc.values()]

        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **kw)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **kw)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **kw)
            for i in range(num_blocks + 1):
                self.dec[f"{res}x{res}_block{i}"] = UNetBlock(cout + skips.pop(), model_channels * mult,
                                                              attention=res in attn_resolutions, **kw)
                cout = model_channels * mult
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, 3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(silu(self.map_layer0(emb)))
        if self.map_label is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                keep = torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels)
        emb = silu(emb)
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(silu(self.out_norm(x)))


@persistence.persistent_class
class EDMPrecond(torch.nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x, ln(sigma) / 4); F in float16 on CUDA when use_fp16."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0,
                 sigma_max=float("inf"), sigma_data=0.5, model_type="DhariwalUNet", **model_kwargs):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.use_fp16, self.sigma_min, self.sigma_max, self.sigma_data = use_fp16, sigma_min, sigma_max, sigma_data
        self.model = globals()[model_type](img_resolution=img_resolution, in_channels=img_channels,
                                           out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        fp16 = self.use_fp16 and not force_fp32 and x.device.type == "cuda"
        dtype = torch.float16 if fp16 else torch.float32
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        F_x = self.model((c_in * x).to(dtype), (sigma.log() / 4).flatten(), class_labels=class_labels,
                         **model_kwargs)
        assert F_x.dtype == dtype
        return c_skip * x + c_out * F_x.to(torch.float32)


@persistence.persistent_class
class EDMLoss:
    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data
'''

# Tiny versions of EDM's configurations (model_type, model kwargs); attention at the 4x4 level.
EDM_CONFIGS = {
    "adm": ("DhariwalUNet", dict(model_channels=16, channel_mult=[1, 4], num_blocks=1, attn_resolutions=[4])),
    "ddpmpp": ("SongUNet", dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])),
    "ncsnpp": ("SongUNet", dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
                                embedding_type="fourier", channel_mult_noise=2, encoder_type="residual",
                                resample_filter=[1, 3, 3, 1])),
    "skip": ("SongUNet", dict(model_channels=8, channel_mult=[1, 2], num_blocks=2, attn_resolutions=[8],
                              encoder_type="skip", decoder_type="skip", resample_filter=[1, 3, 3, 1])),
}


def randomize(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere, also where EDM initialises to zero (conv1, proj, out_conv), so that every
    path of the network shows in its output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim >= 2:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):  # GroupNorm scales
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)
    return net


def edm_pickle(path, model_type: str, label_dim: int, resolution: int, channels: int, seed: int = 0,
               **kw) -> torch.nn.Module:
    """Write an EDM snapshot pickle dict(ema=net, loss_fn=..., augment_pipe=None, dataset_kwargs=...) of
    EDMPrecond(resolution, channels, label_dim, model_type=model_type, **kw) built from EDM_NETWORKS_SRC with
    random weights (dropout 0 unless given). Returns the network as pickled (eval mode, no gradients)."""
    writer = EDMPersistence()
    module = writer.load_source(f"edm_networks_{model_type}_{seed}", EDM_NETWORKS_SRC)
    torch.manual_seed(seed)
    net = module.EDMPrecond(resolution, channels, label_dim, model_type=model_type, **{"dropout": 0.0, **kw})
    net = randomize(copy.deepcopy(net), seed).eval().requires_grad_(False)  # as EDM's training loop snapshots it
    data = dict(ema=net, loss_fn=module.EDMLoss(), augment_pipe=None,
                dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="dataset.zip"))
    with open(path, "wb") as f:
        f.write(writer.dumps(data))
    return net
