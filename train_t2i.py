"""Text-to-image DMD2: distil SD v1.5 or SDXL (diffusers) into a one- or four-step generator.

Yin et al., "Improved Distribution Matching Distillation for Fast Image Synthesis", arXiv:2405.14867:
Sec. 5.2, App. F.3 (SD v1.5) and F.4 (SDXL). The algorithm is `dmd2.py`; this script adapts diffusers UNets to
its denoiser protocol, feeds it prompts and real images, and handles LoRA, torchrun (DDP / FSDP), checkpoints and
export. Presets hold the paper's hyper-parameters:

    python train_t2i.py --preset sd15 --model runwayml/stable-diffusion-v1-5 --prompts prompts.txt
    torchrun --nproc_per_node 8 train_t2i.py --preset sdxl-4step --model stabilityai/stable-diffusion-xl-base-1.0 \
        --prompts prompts.txt --real-images laion/ --dist fsdp
    python train_t2i.py --preset sdxl-4step-lora --mode shared-lora ...   # one GPU: one copy of SDXL
    python train_t2i.py --export runs/sdxl-4step                            # UNet folder, fp16 state dict, LoRA

Networks (Fig. 3): mu_real = the base UNet with classifier-free guidance; G and mu_fake start as copies of it
(`--mode full`) or as LoRA adapters on it (`lora`: G only; `shared-lora`: both, on the one frozen base that is
also the teacher); D = `dmd2.GANHead` on mu_fake's mid-block output.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import math
import os
import re
import tarfile
import time
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from PIL import Image, ImageOps
from torch import nn
from tqdm import tqdm
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

import dmd2

# ----------------------------------------------------------------------------------------------------
# Configuration: the paper's recipes as presets (App. F.3, F.4; batch is per process: the paper's global
# batch is 2048 = 32 x 64 GPUs for SD v1.5 and 128 = 2 x 64 GPUs for SDXL).


@dataclass
class Config:
    model: str = ""  # diffusers model id or folder, SD v1.5- or SDXL-based (detected from the pipeline)
    prompts: str = ""  # training prompts, one per line
    real_images: str = ""  # GAN real data: folder of images + same-named .txt captions, or .tar shards
    out: str = "runs/t2i"  # run folder: config.json, checkpoint.pt, log.txt, samples/, export/
    preset: str = ""  # the paper's recipe: sd15, sd15-stage2, sdxl-4step, sdxl-1step, sdxl-4step-lora
    # generator (Sec. 4.4, 4.5, App. F.4)
    steps: int = 1  # 1: one step; N > 1: timesteps 999, 999 - 1000/N, ... (4: [999, 749, 499, 249])
    conditioning_timestep: int = 999  # the one-step generator's timestep (pure-noise input); SDXL: 399
    backward_simulation: bool = True  # multi-step inputs from G itself (Sec. 4.5); off: noised real latents
    mode: str = "full"  # full | lora (G is a LoRA on the teacher) | shared-lora (G and mu_fake both LoRAs)
    lora_rank: int = 64  # rank of each LoRA adapter (the paper's LoRA: 64)
    lora_alpha: float = 8.0  # LoRA alpha (the paper's: 8); an adapter's scale is alpha / rank
    # DMD2 (Sec. 4.2, 4.3)
    w: float = 1.75  # the teacher's guidance scale, uncond + w (cond - uncond)
    ratio: int = 10  # critic updates per generator update (TTUR)
    gan_g: float = 0.0  # generator's GAN loss weight (0: no GAN)
    gan_d: float = 0.0  # critic's classification loss weight
    lr: float = 1e-5  # AdamW lr of G and of mu_fake + head; betas (0.9, 0.999), weight decay 0.01
    lr_warmup: int = 500  # linear lr warm-up, in updates
    max_grad_norm: float = 10.0  # gradient-norm clip of both updates
    # LPIPS regression warm-up of a one-step generator on teacher pairs (App. F.4)
    warmup_pairs: int = 0  # teacher (noise, image) pairs, split over processes; 0: no warm-up
    warmup_steps: int = 0  # LPIPS regression steps
    warmup_lr: float = 1e-5  # AdamW lr of the LPIPS regression
    warmup_teacher_steps: int = 50  # the teacher's Euler steps for each pair
    # run
    resolution: int = 512  # image side in pixels
    batch: int = 32  # per process
    iters: int = 40000  # critic updates; the generator gets iters / ratio
    init: str = ""  # start from another run's weights (SD v1.5 stage 2 from stage 1)
    resume: bool = False  # continue this run folder's checkpoint exactly
    cache_latents: bool = False  # encode the real images once, before training
    dist: str = "ddp"  # ddp | fsdp (full mode), under torchrun
    grad_checkpointing: bool = True  # recompute UNet blocks in backward: less memory, ~1/3 more compute
    seed: int = 0  # process r draws with seed + r; backward simulation's k with seed on every process
    log_every: int = 10  # one log line per this many iterations
    ckpt_every: int = 500  # iterations between checkpoints (always one at the end)
    sample_every: int = 500  # a grid of the first prompts, in samples/
    device: str = ""  # default: cuda if available


GAN_SDXL = dict(resolution=1024, batch=2, w=8.0, ratio=5, lr=5e-7, gan_g=5e-3, gan_d=1e-2)
PRESETS = {
    "sd15": dict(resolution=512, batch=32, steps=1, conditioning_timestep=999, w=1.75, ratio=10, lr=1e-5,
                 gan_g=0.0, gan_d=0.0, iters=40000),  # stage 1 (App. F.3)
    "sd15-stage2": dict(resolution=512, batch=32, steps=1, conditioning_timestep=999, w=1.75, ratio=10, lr=5e-7,
                        gan_g=1e-3, gan_d=1e-2, iters=5000),  # --init the stage-1 run
    "sdxl-4step": dict(GAN_SDXL, steps=4, iters=20000),
    "sdxl-1step": dict(GAN_SDXL, steps=1, conditioning_timestep=399, iters=25000, warmup_pairs=10000,
                       warmup_steps=2000, warmup_lr=1e-5),
    "sdxl-4step-lora": dict(GAN_SDXL, steps=4, iters=20000, mode="lora", lr=5e-5, lora_rank=64, lora_alpha=8.0),
}
MODES, DISTS = ("full", "lora", "shared-lora"), ("ddp", "fsdp")
# LoRA on every attention, feed-forward, convolution and time projection of the UNet (the authors' target list)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]


def parse_args(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    """Flags are the Config fields; a preset fills the ones not given on the command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    helps = dict(re.findall(r"^ +(\w+): [^=]+=.*?# (.+)$", inspect.getsource(Config), re.M))  # the field comments
    for f in fields(Config):
        preset = any(f.name in v for v in PRESETS.values())
        flag = "--" + f.name.replace("_", "-")
        default = f"default: {f.default!r}" + (", or the preset's" if preset else "")
        h = f"{helps.get(f.name, '')} ({default})"
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=h)
        else:
            p.add_argument(flag, type={"int": int, "float": float}.get(f.type, str), default=None, help=h,
                           choices={"preset": list(PRESETS), "mode": MODES, "dist": DISTS}.get(f.name))
    p.add_argument("--export", metavar="RUN", help="export a run folder or checkpoint (to --out, default RUN/export)")
    a = p.parse_args(argv)
    given = {k: v for k, v in vars(a).items() if v is not None and k != "export"}
    return Config(**{**PRESETS.get(a.preset or "", {}), **given}), a


# ----------------------------------------------------------------------------------------------------
# The base model: UNet, VAE, text encoders and noise schedule, loaded with from_pretrained.


@dataclass
class Base:
    sdxl: bool
    unet: UNet2DConditionModel  # the teacher's weights
    vae: AutoencoderKL
    tokenizers: list
    text_encoders: list
    schedule: dmd2.VPSchedule

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def model_index(model: str) -> dict:
    """The pipeline's model_index.json, or a clear error."""
    if not model:
        raise SystemExit("--model is required: a diffusers model id or folder")
    if os.path.exists(model) and not os.path.isfile(os.path.join(model, "model_index.json")):
        raise SystemExit(f"--model {model}: no model_index.json there; expected a diffusers pipeline folder")
    try:
        index = DiffusionPipeline.load_config(model)
    except Exception as e:  # a hub id that cannot be resolved
        raise SystemExit(f"--model {model}: cannot load the pipeline config ({e})") from e
    if "unet" not in index or "vae" not in index:
        raise SystemExit(f"--model {model}: not a UNet text-to-image pipeline ({index.get('_class_name')})")
    return index


def load_base(model: str, device: torch.device, dtype: torch.dtype = torch.float32, unet: bool = True) -> Base:
    """SDXL is recognised by its second text encoder; frozen parts are loaded in `dtype` without gradients."""
    sdxl = "text_encoder_2" in model_index(model)
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    if scheduler.config.prediction_type != "epsilon":
        raise SystemExit(f"--model {model}: {scheduler.config.prediction_type} prediction is not supported (epsilon)")
    names = ["", "_2"] if sdxl else [""]
    encoders = [cls.from_pretrained(model, subfolder="text_encoder" + n, torch_dtype=dtype)
                for cls, n in zip((CLIPTextModel, CLIPTextModelWithProjection), names, strict=False)]
    return Base(sdxl=sdxl,
                unet=load_unet(model, device, dtype) if unet else None,
                vae=AutoencoderKL.from_pretrained(model, subfolder="vae").to(device).requires_grad_(False),
                tokenizers=[AutoTokenizer.from_pretrained(model, subfolder="tokenizer" + n) for n in names],
                text_encoders=[e.to(device).requires_grad_(False) for e in encoders],
                schedule=dmd2.VPSchedule(scheduler.alphas_cumprod))


def load_unet(model: str, device: torch.device, dtype: torch.dtype = torch.float32) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dtype).to(device)


def time_ids(resolution: int, n: int, device: torch.device) -> torch.Tensor:
    """SDXL's micro-conditioning [original H, W, crop top, left, target H, W] = [H, W, 0, 0, H, W]."""
    return torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], device=device,
                        dtype=torch.float32).expand(n, 6)


@torch.no_grad()
def encode_prompts(base: Base, prompts: list[str], resolution: int) -> dict[str, torch.Tensor]:
    """The UNet's condition for a batch of prompts, one text-encoder call per encoder.

    SD v1.5: the last hidden state of CLIP ViT-L. SDXL: the penultimate hidden states of both encoders,
    concatenated, the pooled projection of the second, and time_ids."""
    device = base.text_encoders[0].device
    ids = [tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids.to(device) for tok in base.tokenizers]
    if not base.sdxl:
        return {"encoder_hidden_states": base.text_encoders[0](ids[0])[0].float()}
    out = [enc(i, output_hidden_states=True) for enc, i in zip(base.text_encoders, ids, strict=True)]
    return {"encoder_hidden_states": torch.cat([o.hidden_states[-2] for o in out], -1).float(),
            "text_embeds": out[1].text_embeds.float(), "time_ids": time_ids(resolution, len(prompts), device)}


def unconditional(base: Base, resolution: int) -> dict[str, torch.Tensor]:
    """The CFG branch, batch 1: SD v1.5 = the embedding of ""; SDXL = zero embeddings (its pipeline's
    force_zeros_for_empty_prompt), with the same time_ids."""
    c = encode_prompts(base, [""], resolution)
    return c if not base.sdxl else {k: v if k == "time_ids" else torch.zeros_like(v) for k, v in c.items()}


def split(cond: dict[str, torch.Tensor], n: int) -> tuple[dict, dict]:
    return {k: v[:n] for k, v in cond.items()}, {k: v[n:] for k, v in cond.items()}


# ----------------------------------------------------------------------------------------------------
# A diffusers epsilon UNet as a dmd2 denoiser, x0 = (x_t - sigma_t eps) / alpha_t, and its bottleneck.


def lora_layers(module: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapter_state(layers: list[nn.Module], state: list[tuple]):
    """Set each peft layer's (active adapters, disabled) and restore them on exit. peft's own set_adapter /
    enable_adapters also rewrite requires_grad, which would undo dmd2.frozen and train the wrong adapter."""
    old = [(m._active_adapter, m._disable_adapters) for m in layers]
    for m, (active, disabled) in zip(layers, state, strict=True):
        m._active_adapter, m._disable_adapters = active, disabled
    try:
        yield
    finally:
        for m, (active, disabled) in zip(layers, old, strict=True):
            m._active_adapter, m._disable_adapters = active, disabled


def use_adapter(layers: list[nn.Module], name: str | None):
    """Run with LoRA adapter `name` alone, or with all adapters off (the teacher) when name is None."""
    return adapter_state(layers, [([name] if name else m._active_adapter, name is None) for m in layers])


def checkpoint_as_run(module: nn.Module, *args):
    """diffusers' gradient-checkpointing function: recompute `module` in backward with the requires_grad flags
    and LoRA adapter it first ran with. Both change before backward: dmd2's generator step unfreezes mu_fake,
    and a shared base switches adapters; recomputing under other ones would build a different graph."""
    params, layers = list(module.parameters()), lora_layers(module)
    flags, adapters = [p.requires_grad for p in params], [(m._active_adapter, m._disable_adapters) for m in layers]

    def run(*a):
        now = [p.requires_grad for p in params]
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)
        try:
            with adapter_state(layers, adapters):
                return module(*a)
        finally:
            for p, f in zip(params, now, strict=True):
                p.requires_grad_(f)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)


class _Bottleneck(Exception):
    def __init__(self, h: torch.Tensor):
        self.h = h


def mid_block_output(unet: UNet2DConditionModel, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    """The UNet's bottleneck [B, C, R, R] (App. F.1): its forward is stopped where the first up block would start,
    so the decoder half never runs (and diffusers' forward is not copied)."""

    def stop(module, args, kwargs):
        raise _Bottleneck(kwargs["hidden_states"])

    hook = unet.up_blocks[0].register_forward_pre_hook(stop, with_kwargs=True, prepend=True)
    try:
        unet(x_t, t, **unet_inputs(cond))
    except _Bottleneck as e:
        return e.h
    finally:
        hook.remove()
    raise RuntimeError("the UNet returned without reaching its first up block")


def unet_inputs(cond: dict) -> dict:
    added = {k: cond[k] for k in ("text_embeds", "time_ids") if k in cond}
    return dict(encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added or None)


class EpsUNet(nn.Module):
    """dmd2's denoiser protocol over a diffusers UNet (optionally one LoRA adapter of it, or with its adapters
    off). One forward with a `bottleneck` switch, so that DDP and FSDP see every pass of the critic."""

    autocast_on = ("cuda",)  # bf16 autocast on GPU only (the authors' fp16 diverged); CPU runs fp32

    def __init__(self, unet: UNet2DConditionModel, schedule: dmd2.Schedule, adapter: str | None = None):
        super().__init__()
        self.unet, self.schedule, self.adapter = unet, schedule, adapter
        self.layers = lora_layers(unet)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict, bottleneck: bool = False) -> torch.Tensor:
        dtype, on = self.unet.dtype, x_t.device.type in self.autocast_on
        cond = {k: v.to(dtype) for k, v in cond.items()}
        with use_adapter(self.layers, self.adapter), torch.autocast(x_t.device.type, torch.bfloat16, enabled=on):
            if bottleneck:
                return mid_block_output(self.unet, x_t.to(dtype), t, cond).float()
            eps = self.unet(x_t.to(dtype), t, **unet_inputs(cond)).sample
        return self.schedule.eps_to_x0(x_t, eps, t)  # in float64 (dmd2)


class Net:
    """What dmd2 sees: calls go through `module` (DDP- or FSDP-wrapped under torchrun); parameters() are only
    the trainable ones, fixed at setup (FSDP swaps the registered ones around forward and backward)."""

    def __init__(self, module: nn.Module, params: list[nn.Parameter]):
        self.module, self.params = module, params

    def __call__(self, *args):
        return self.module(*args)

    def features(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        return self.module(x_t, t, cond, bottleneck=True)

    def parameters(self):
        return iter(self.params)


# ----------------------------------------------------------------------------------------------------
# The three networks in each mode. Frozen parts: no gradient, no optimizer state, bf16 on GPU.


@dataclass
class Nets:
    G: Net
    fake: Net
    head: Net | None
    teacher: EpsUNet
    unets: dict  # name -> the unwrapped trainable UNet of G and of mu_fake (the same one in shared-lora)
    modules: dict  # name -> the wrapped modules whose parameters the optimizers hold ("G", "fake", "head")


def add_lora(unet: UNet2DConditionModel, name: str, cfg: Config) -> list[nn.Parameter]:
    from peft import LoraConfig

    with warnings.catch_warnings():  # a second adapter on one base is the point of shared-lora
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=LORA_TARGETS), name)
    params = [p for n, p in unet.named_parameters() if f".{name}." in n]
    for p in params:  # fp32 adapters on a bf16 base: small lr updates survive
        p.data = p.data.float()
    return params


def build_nets(cfg: Config, base: Base, device: torch.device, world: int, new_unet=None) -> Nets:
    """new_unet() makes a trainable fp32 copy of the teacher (default: from_pretrained again)."""
    new_unet = new_unet or (lambda: load_unet(cfg.model, device))
    torch.manual_seed(cfg.seed)  # the same LoRA and head initialisation on every rank
    teacher = base.unet.requires_grad_(False)  # loaded in bf16 on GPU
    if cfg.mode == "full":  # three UNets: the teacher and fp32 trainable copies (Sec. 4.6: both start from it)
        g_unet, f_unet = new_unet(), new_unet()
        g_params, f_params = list(g_unet.parameters()), list(f_unet.parameters())
        g_name = f_name = None
    else:  # G is a LoRA adapter on the teacher, which runs with its adapters off
        g_unet, g_params, g_name = teacher, add_lora(teacher, "generator", cfg), "generator"
        if cfg.mode == "lora":  # the authors' LoRA recipe: mu_fake is a full copy
            f_unet, f_name = new_unet(), None
            f_params = list(f_unet.parameters())
        else:  # one UNet in memory: mu_fake is a second adapter
            f_unet, f_params, f_name = teacher, add_lora(teacher, "fake", cfg), "fake"
        for p in g_params + f_params:
            p.requires_grad_(True)
    if cfg.grad_checkpointing:
        for u in {id(g_unet): g_unet, id(f_unet): f_unet}.values():
            u.enable_gradient_checkpointing(checkpoint_as_run)
    sched = base.schedule
    g_mod, f_mod, t_mod = EpsUNet(g_unet, sched, g_name), EpsUNet(f_unet, sched, f_name), EpsUNet(teacher, sched)
    head, h_params = None, []
    if cfg.gan_g > 0 or cfg.gan_d > 0:
        latent = cfg.resolution // base.vae_factor
        head = dmd2.GANHead(f_unet.config.block_out_channels[-1],
                            latent // 2 ** (len(f_unet.config.down_block_types) - 1)).to(device)
        h_params = list(head.parameters())
    if world > 1:
        g_mod, f_mod = wrap(g_mod, g_params, cfg, device), wrap(f_mod, f_params, cfg, device)
        head = wrap(head, h_params, cfg, device) if head is not None else None
        if cfg.dist == "fsdp":
            t_mod = wrap(t_mod, [], cfg, device)
            g_params, f_params, h_params = (list(m.parameters()) if m is not None else []
                                            for m in (g_mod, f_mod, head))
    return Nets(G=Net(g_mod, g_params), fake=Net(f_mod, f_params), head=Net(head, h_params) if head else None,
                teacher=t_mod, unets={"G": g_unet, "fake": f_unet},
                modules={"G": g_mod, "fake": f_mod, "head": head})


def wrap(module: nn.Module, trainable: list[nn.Parameter], cfg: Config, device: torch.device) -> nn.Module:
    """DDP over exactly `trainable`; or FSDP2 (fully_shard) per transformer, per UNet block and at the root, so
    that SDXL is gathered at most ~0.35B parameters at a time. (Resnets run inside gradient checkpointing, and
    an FSDP unit there would be re-gathered under other requires_grad flags when recomputed.)"""
    if cfg.dist == "fsdp":
        from diffusers.models.transformers.transformer_2d import Transformer2DModel
        from torch.distributed.fsdp import fully_shard

        unet = getattr(module, "unet", None)
        blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks] if unet is not None else []
        for m in [m for b in blocks for m in b.modules() if isinstance(m, Transformer2DModel)]:
            fully_shard(m)
        for b in blocks:
            fully_shard(b)
        fully_shard(module)
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    # a shared base holds both adapters: the other one is hidden from this DDP's gradient hooks
    ids = {id(p) for p in trainable}
    others = [p for p in module.parameters() if p.requires_grad and id(p) not in ids]
    for p in others:
        p.requires_grad_(False)
    ddp = DDP(module, device_ids=[device.index] if device.type == "cuda" else None)
    for p in others:
        p.requires_grad_(True)
    return ddp


# ----------------------------------------------------------------------------------------------------
# Data: prompts, and real images (folder with captions, or img2dataset .tar shards) encoded by the VAE.

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def read_prompts(path: str) -> list[str]:
    if not path or not os.path.isfile(path):
        raise SystemExit(f"--prompts {path!r}: no such file (one prompt per line)")
    prompts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise SystemExit(f"--prompts {path}: the file has no prompts")
    return prompts


class RealImages:
    """Random access to (image, caption) pairs: a folder of images with same-named .txt captions, or the
    .tar shards img2dataset writes (key.jpg + key.txt members), indexed once with tarfile."""

    def __init__(self, path: str, resolution: int, rank: int = 0, world: int = 1):
        if not os.path.exists(path):
            raise SystemExit(f"--real-images {path}: no such file or folder")
        p = Path(path)
        tars = [p] if p.suffix == ".tar" else sorted(p.glob("*.tar"))
        self.items = self._index_tars(tars) if tars else self._index_folder(p)
        if not self.items:
            raise SystemExit(f"--real-images {path}: no images with captions found")
        self.items = self.items[rank::world]  # each process uses its own share
        self.resolution, self._tars = resolution, {}

    @staticmethod
    def _index_folder(p: Path) -> list:
        images = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTS)
        missing = [f for f in images if not f.with_suffix(".txt").is_file()]
        if missing:
            raise SystemExit(f"--real-images {p}: {len(missing)} images without a same-named .txt caption, "
                             f"e.g. {missing[0]}")
        return [(str(f), str(f.with_suffix(".txt"))) for f in images]

    @staticmethod
    def _index_tars(tars: list[Path]) -> list:
        items = []
        for t in tars:
            with tarfile.open(t) as tf:
                members = {}
                for m in tf.getmembers():
                    key, ext = os.path.splitext(m.name)
                    members.setdefault(key, {})[ext.lower()] = m
            for parts in members.values():
                img = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
                if img is not None and ".txt" in parts:
                    items.append((str(t), img, parts[".txt"]))
        return items

    def __len__(self) -> int:
        return len(self.items)

    def _read(self, item) -> tuple[Image.Image, str, str]:
        if len(item) == 2:
            return Image.open(item[0]), Path(item[1]).read_text(encoding="utf-8").strip(), item[0]
        tf = self._tars.setdefault(item[0], tarfile.open(item[0]))
        img = Image.open(tf.extractfile(item[1]))
        return img, tf.extractfile(item[2]).read().decode("utf-8").strip(), f"{item[0]}:{item[1].name}"

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        """[3, R, R] in [-1, 1] (shorter side resized to R, centre crop) and the caption."""
        img, caption, name = self._read(self.items[i])
        if min(img.size) < self.resolution:
            raise SystemExit(f"real image {name} is {img.size[0]}x{img.size[1]}, smaller than --resolution "
                             f"{self.resolution}; remove such images (the paper drops those under 1024 px)")
        img = ImageOps.fit(img.convert("RGB"), (self.resolution,) * 2, Image.Resampling.BICUBIC)
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1, caption


@torch.no_grad()
def encode_images(vae: AutoencoderKL, images: torch.Tensor, generator: torch.Generator | None = None):
    """VAE latents, scaled by the VAE's scaling_factor as the UNet expects."""
    x = images.to(vae.device, vae.dtype)
    return vae.encode(x).latent_dist.sample(generator).float() * vae.config.scaling_factor


class RealLatents:
    """Batches of (latent, caption) for the GAN: encoded on the fly, or all at once with --cache-latents."""

    def __init__(self, images: RealImages, vae: AutoencoderKL, cache: str | None):
        self.images, self.vae, self.latents = images, vae, None
        if cache:
            if os.path.isfile(cache):
                self.latents, self.captions = (c := torch.load(cache))["latents"], c["captions"]
            else:
                lat, caps = [], []
                for i in tqdm(range(len(images)), desc="caching latents", disable=int(os.environ.get("RANK", 0))):
                    x, c = images[i]
                    lat.append(encode_images(vae, x[None]).half().cpu())
                    caps.append(c)
                self.latents, self.captions = torch.cat(lat), caps
                save_atomic({"latents": self.latents, "captions": caps}, cache)

    def batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        idx = torch.randint(len(self.images), (n,), generator=generator).tolist()
        if self.latents is not None:
            return self.latents[idx].float().to(self.vae.device), [self.captions[i] for i in idx]
        pairs = [self.images[i] for i in idx]
        return encode_images(self.vae, torch.stack([p[0] for p in pairs])), [p[1] for p in pairs]


# ----------------------------------------------------------------------------------------------------
# Checkpoints: one plain dict, written atomically; full (gathered) state dicts under FSDP.


def save_atomic(obj, path: str | Path) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def trainable_state(nets: Nets, cfg: Config) -> dict:
    """G's and mu_fake's trainable weights (the whole UNet, or one adapter) and the head, on CPU."""
    if cfg.dist == "fsdp" and dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return {k: get_model_state_dict(m, options=opts) for k, m in nets.modules.items() if m is not None}
    out = {}
    for k, net in (("G", nets.G), ("fake", nets.fake), ("head", nets.head)):
        if net is not None:
            mine = {id(p) for p in net.params}
            module = nets.unets.get(k) or getattr(net.module, "module", net.module)  # unwrap DDP
            prefix = "unet." if k in nets.unets else ""  # the same keys as EpsUNet / FSDP state dicts
            out[k] = {prefix + n: p.detach().cpu().clone() for n, p in module.named_parameters() if id(p) in mine}
    return out


def load_trainable(nets: Nets, state: dict, cfg: Config) -> None:
    """The inverse of trainable_state; every trainable weight must be in `state` (absent networks are skipped)."""
    if cfg.dist == "fsdp" and dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        for k, m in nets.modules.items():
            if m is not None and k in state:
                set_model_state_dict(m, state[k], options=StateDictOptions(full_state_dict=True))
        return
    for k, net in (("G", nets.G), ("fake", nets.fake), ("head", nets.head)):
        if net is not None and k in state:
            module = nets.unets.get(k) or getattr(net.module, "module", net.module)  # unwrap DDP
            mine = {n for n, p in module.named_parameters() if any(p is q for q in net.params)}
            values = {n.removeprefix("unet.") if k in nets.unets else n: v for n, v in state[k].items()}
            if set(values) != mine:
                raise SystemExit(f"the checkpoint's {k} weights do not fit this run (--mode, --lora-rank, --model?)")
            module.load_state_dict(values, strict=False)


def optimizer_states(nets: Nets, opts: dict, cfg: Config, load: dict | None = None) -> dict | None:
    """Optimizer state dicts (FSDP: full, keyed by parameter name); with `load`, restore them instead."""
    if not (cfg.dist == "fsdp" and dist.is_initialized()):
        if load is None:
            return {k: o.state_dict() for k, o in opts.items()}
        for k, o in opts.items():
            o.load_state_dict(load[k])
        return None
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    owners = {"g_opt": nn.ModuleDict({"G": nets.modules["G"]}),
              "c_opt": nn.ModuleDict({k: nets.modules[k] for k in ("fake", "head") if nets.modules[k] is not None})}
    if load is None:
        o = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return {k: get_optimizer_state_dict(owners[k], opt, options=o) for k, opt in opts.items()}
    for k, opt in opts.items():
        set_optimizer_state_dict(owners[k], opt, load[k], options=StateDictOptions(full_state_dict=True))
    return None


def rng_states(gens: dict[str, torch.Generator]) -> dict:
    s = {k: g.get_state() for k, g in gens.items()} | {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_states(gens: dict[str, torch.Generator], s: dict) -> None:
    for k, g in gens.items():
        g.set_state(s[k])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def find_checkpoint(path: str) -> Path:
    p = Path(path)
    p = p / "checkpoint.pt" if p.is_dir() else p
    if not p.is_file():
        raise SystemExit(f"{path}: no checkpoint (expected a run folder with checkpoint.pt, or a .pt file)")
    return p


# ----------------------------------------------------------------------------------------------------
# The student as users load it: a diffusers UNet (LoRA fused), an fp16 state dict like the released DMD2
# weights, and LoRA weights for `pipe.load_lora_weights`.


def student_timesteps(cfg: Config) -> list[int]:
    """The generator's fixed schedule, the same at training and inference (Sec. 4.4)."""
    return [cfg.conditioning_timestep] if cfg.steps == 1 else dmd2.step_timesteps(cfg.steps)


def load_student(ckpt: dict, device: torch.device, dtype: torch.dtype = torch.float32) -> UNet2DConditionModel:
    """The generator's UNet from a checkpoint of this script, with a LoRA generator left as adapter "generator"."""
    cfg = Config(**ckpt["config"])
    unet = load_unet(cfg.model, torch.device("cpu"))
    if cfg.mode != "full":
        add_lora(unet, "generator", cfg)
    state = {k.removeprefix("unet."): v for k, v in ckpt["nets"]["G"].items()}
    missing, unexpected = unet.load_state_dict(state, strict=cfg.mode == "full")
    if unexpected or any("generator" in k for k in missing):
        raise SystemExit(f"checkpoint weights do not fit {cfg.model}'s UNet")
    unet = unet.to(device) if dtype == torch.float32 else unet.to(device, dtype)
    return unet.requires_grad_(False)


def export(run: str, out: str | None = None) -> Path:
    """RUN/export/: unet/ (diffusers), dmd2_<model>_<N>step_unet_fp16.bin, pytorch_lora_weights.safetensors
    (LoRA runs) and dmd2.json (base model and timesteps, for sample.py)."""
    from peft.utils import get_peft_model_state_dict

    path = find_checkpoint(run)
    ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    cfg = Config(**ckpt["config"])
    out = Path(out or path.parent / "export")
    out.mkdir(parents=True, exist_ok=True)
    unet = load_student(ckpt, torch.device("cpu"))
    sdxl = "text_encoder_2" in model_index(cfg.model)
    if cfg.mode != "full":
        lora = get_peft_model_state_dict(unet, adapter_name="generator")
        # the alpha / r scale is folded into lora_B, so any diffusers version loads it at scale 1
        lora = {k: v * (cfg.lora_alpha / cfg.lora_rank) if "lora_B" in k else v for k, v in lora.items()}
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        (StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline).save_lora_weights(
            str(out), unet_lora_layers={k: v.contiguous() for k, v in lora.items()})
        unet.fuse_lora(adapter_names=["generator"])
        unet.unload_lora()
    unet.save_pretrained(str(out / "unet"))
    name = f"dmd2_{'sdxl' if sdxl else 'sd15'}_{cfg.steps}step_unet_fp16.bin"
    save_atomic({k: v.half() for k, v in unet.state_dict().items()}, out / name)
    meta = {"kind": "text-to-image", "model": cfg.model, "timesteps": student_timesteps(cfg),
            "resolution": cfg.resolution, "preset": cfg.preset, "mode": cfg.mode, "step": ckpt["step"]}
    (out / "dmd2.json").write_text(json.dumps(meta, indent=1))
    return out


# ----------------------------------------------------------------------------------------------------
# LPIPS regression warm-up of a one-step generator (App. F.4): a short regression onto teacher samples of the
# same noise, against SDXL one-step block-noise artefacts, before distribution matching.


def teacher_pipeline(base: Base, model: str):
    """A stock diffusers pipeline around our loaded parts, with the Euler sampler ("trailing" spacing)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    sched = EulerDiscreteScheduler.from_pretrained(model, subfolder="scheduler", timestep_spacing="trailing")
    parts = dict(vae=base.vae, text_encoder=base.text_encoders[0], tokenizer=base.tokenizers[0], unet=base.unet,
                 scheduler=sched)
    if base.sdxl:
        return StableDiffusionXLPipeline(**parts, text_encoder_2=base.text_encoders[1], tokenizer_2=base.tokenizers[1])
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@torch.no_grad()
def teacher_pairs(cfg: Config, base: Base, prompts: list[str], path: Path, rank: int, world: int) -> dict:
    """This process's share of `warmup_pairs` (noise z, teacher latent, prompt), cached in the run folder."""
    if path.is_file():
        return torch.load(path)
    pipe = teacher_pipeline(base, cfg.model)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(cfg.seed + 7919 * (rank + 1))
    n, latent = math.ceil(cfg.warmup_pairs / world), cfg.resolution // base.vae_factor
    pairs = {"z": [], "x": [], "prompts": []}
    for i in tqdm(range(0, n, cfg.batch), desc="teacher pairs", disable=rank != 0):
        b = min(cfg.batch, n - i)
        p = [prompts[j] for j in torch.randint(len(prompts), (b,), generator=g).tolist()]
        z = torch.randn(b, 4, latent, latent, generator=g)
        x = pipe(prompt=p, latents=z.to(base.unet.device, base.unet.dtype), height=cfg.resolution,
                 width=cfg.resolution, guidance_scale=cfg.w, num_inference_steps=cfg.warmup_teacher_steps,
                 output_type="latent").images
        pairs["z"].append(z.half()), pairs["x"].append(x.cpu().half()), pairs["prompts"].extend(p)
    pairs = {k: torch.cat(v) if k != "prompts" else v for k, v in pairs.items()}
    save_atomic(pairs, path)
    return pairs


def load_lpips(device: torch.device) -> nn.Module:
    import lpips

    return lpips.LPIPS(net="vgg", verbose=False).to(device).requires_grad_(False)


def lpips_warmup(cfg: Config, base: Base, nets: Nets, pairs: dict, device: torch.device, rank: int) -> None:
    """LPIPS(decode(G(z, t)), decode(teacher(z))) on the pairs, through the VAE decoder (checkpointed)."""
    lp, sf = load_lpips(device), base.vae.config.scaling_factor
    opt = torch.optim.AdamW(nets.G.params, lr=cfg.warmup_lr, betas=(0.9, 0.999), weight_decay=0.01)
    g = torch.Generator().manual_seed(cfg.seed + rank)
    base.vae.enable_gradient_checkpointing()
    for s in tqdm(range(cfg.warmup_steps), desc="LPIPS warm-up", disable=rank != 0):
        idx = torch.randint(len(pairs["z"]), (cfg.batch,), generator=g).tolist()
        z, x_teacher = pairs["z"][idx].float().to(device), pairs["x"][idx].float().to(device)
        cond = encode_prompts(base, [pairs["prompts"][i] for i in idx], cfg.resolution)
        x = nets.G(z, torch.full((len(z),), cfg.conditioning_timestep, device=device), cond)
        with torch.no_grad():
            target = base.vae.decode(x_teacher / sf).sample
        loss = lp(base.vae.decode(x / sf).sample.float(), target.float()).mean()  # images in [-1, 1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(nets.G.params, cfg.max_grad_norm)
        opt.step()
        if rank == 0 and (s + 1) % cfg.log_every == 0:
            tqdm.write(f"warm-up {s + 1:>6d}/{cfg.warmup_steps} | lpips {loss.item():.4f}")
    base.vae.disable_gradient_checkpointing()


# ----------------------------------------------------------------------------------------------------
# Training (Sec. 4.6): dmd2.train_iteration on batches of prompts, with the generator's input built here.


def validate(cfg: Config, world: int) -> None:
    """Clear errors for bad input, before anything heavy is loaded."""
    if not cfg.preset:
        raise SystemExit(f"--preset is required: one of {', '.join(PRESETS)}")
    sdxl = "text_encoder_2" in model_index(cfg.model)
    if cfg.preset.startswith("sdxl") != sdxl:
        raise SystemExit(f"--preset {cfg.preset} is for {'SDXL' if cfg.preset.startswith('sdxl') else 'SD v1.5'}, "
                         f"but {cfg.model} is {'SDXL' if sdxl else 'SD v1.5'}-based")
    read_prompts(cfg.prompts)
    needs_real = cfg.gan_g > 0 or cfg.gan_d > 0 or (cfg.steps > 1 and not cfg.backward_simulation)
    if needs_real and not cfg.real_images:
        raise SystemExit("--real-images is required: the GAN term (and the no-backward-simulation ablation) "
                         "needs real images with captions")
    if cfg.mode not in MODES or cfg.dist not in DISTS:
        raise SystemExit(f"--mode must be one of {MODES}, --dist one of {DISTS}")
    if cfg.dist == "fsdp" and cfg.mode != "full" and world > 1:
        raise SystemExit("--dist fsdp shards full fine-tuning; LoRA modes use DDP (--dist ddp)")
    if cfg.steps < 1 or not 0 <= cfg.conditioning_timestep < 1000 or cfg.batch < 1 or cfg.iters < 1:
        raise SystemExit("need --steps >= 1, 0 <= --conditioning-timestep < 1000, --batch >= 1, --iters >= 1")
    if cfg.warmup_pairs and cfg.steps != 1:
        raise SystemExit("the LPIPS warm-up (--warmup-pairs) is for one-step generators (App. F.4)")
    if cfg.init:
        find_checkpoint(cfg.init)
    elif cfg.preset == "sd15-stage2" and not cfg.resume:
        raise SystemExit("--preset sd15-stage2 continues stage 1 (App. F.3): pass --init STAGE1_RUN")
    unet = UNet2DConditionModel.load_config(cfg.model, subfolder="unet")
    factor = 2 ** (len(AutoencoderKL.load_config(cfg.model, subfolder="vae")["block_out_channels"]) - 1)
    down = 2 ** (len(unet["down_block_types"]) - 1)
    side = cfg.resolution // factor // down
    if cfg.resolution % (factor * down) or (needs_real and (side < 4 or side & (side - 1))):
        raise SystemExit(f"--resolution {cfg.resolution}: must be a multiple of {factor * down} (VAE x UNet "
                         f"downsampling) with a power-of-two bottleneck of at least 4 for the GAN head, e.g. "
                         f"{factor * down * 4}, {factor * down * 8}, {factor * down * 16}")


def setup_distributed(cfg: Config) -> tuple[int, int, torch.device]:
    """torchrun sets RANK: then one process per GPU (NCCL), or per CPU slot (gloo)."""
    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    if "RANK" not in os.environ:
        return 0, 1, torch.device(cfg.device or ("cuda" if cuda else "cpu"))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


@torch.no_grad()
def decode(base: Base, x0: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [0, 1]."""
    img = base.vae.decode(x0.to(base.vae.dtype) / base.vae.config.scaling_factor).sample
    return (img.float() / 2 + 0.5).clamp(0, 1)


def any_rank(flag: bool, device: torch.device) -> bool:
    if not dist.is_initialized():
        return flag
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def generators(cfg: Config, rank: int, device: torch.device) -> dict[str, torch.Generator]:
    """Every random draw of training comes from these (saved in checkpoints, so resuming is exact)."""
    return {"noise": torch.Generator(device).manual_seed(cfg.seed + rank),  # this process's noise
            "data": torch.Generator().manual_seed(cfg.seed + rank),  # which prompts and real images
            "k": torch.Generator().manual_seed(cfg.seed)}  # backward simulation's step: the same on all ranks


def generator_input(cfg: Config, G: Net, schedule: dmd2.Schedule, z: torch.Tensor, cond: dict,
                    gens: dict[str, torch.Generator], x_start: torch.Tensor | None = None):
    """(x_in, t_in): what the generator denoises this iteration, from noise z [B, 4, h, w]."""
    timesteps, n = student_timesteps(cfg), len(z)
    if cfg.steps == 1:  # pure noise, conditioned on t = 999 (SD v1.5) or 399 (SDXL, App. F.4)
        return schedule.prior(z), torch.full((n,), timesteps[0], device=z.device)
    if cfg.backward_simulation:  # Sec. 4.5: G's own k-step sample, noised to t_k; one k for all ranks
        k = int(torch.randint(cfg.steps, (1,), generator=gens["k"]))
        return dmd2.backward_simulation(G, z, schedule, timesteps, k, cond, gens["noise"])
    # Table 4's ablation: real latents forward-noised to a random step each; pure noise at t = 999
    t_in = torch.tensor(timesteps, device=z.device)[torch.randint(cfg.steps, (n,), generator=gens["data"])
                                                     .to(z.device)]
    x_in = schedule.add_noise(x_start, z, t_in)
    x_in[t_in == 999] = z[t_in == 999]
    return x_in, t_in


def train(cfg: Config) -> None:
    rank, world, device = setup_distributed(cfg)
    out, master = Path(cfg.out), rank == 0
    ckpt_path = out / "checkpoint.pt"
    if cfg.resume:  # the run's own settings, except how long and how often to log
        resume = torch.load(find_checkpoint(str(out)), map_location="cpu", weights_only=False, mmap=True)
        keep = {k: getattr(cfg, k) for k in ("iters", "log_every", "ckpt_every", "sample_every", "device")}
        cfg = Config(**{**resume["config"], **keep, "resume": True, "out": cfg.out})
    elif ckpt_path.exists():
        raise SystemExit(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")
    validate(cfg, world)
    prompts = read_prompts(cfg.prompts)
    out.mkdir(parents=True, exist_ok=True)
    if master:
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    cuda = device.type == "cuda"
    base = load_base(cfg.model, device, torch.bfloat16 if cuda else torch.float32)
    real = None
    if cfg.gan_g > 0 or cfg.gan_d > 0 or (cfg.steps > 1 and not cfg.backward_simulation):
        cache = str(out / f"latents_{rank}of{world}.pt") if cfg.cache_latents else None
        real = RealLatents(RealImages(cfg.real_images, cfg.resolution, rank, world), base.vae, cache)
    pairs = None
    if cfg.warmup_pairs and cfg.warmup_steps and not cfg.resume:  # before wrapping: a stock pipeline runs it
        pairs = teacher_pairs(cfg, base, prompts, out / f"warmup_pairs_{rank}of{world}.pt", rank, world)
    nets = build_nets(cfg, base, device, world)
    adamw = dict(lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.01)
    opts = {"g_opt": torch.optim.AdamW(nets.G.params, **adamw),
            "c_opt": torch.optim.AdamW(nets.fake.params + (nets.head.params if nets.head else []), **adamw)}
    warm = lambda s: min(1.0, (s + 1) / max(cfg.lr_warmup, 1))  # noqa: E731
    scheds = {k: torch.optim.lr_scheduler.LambdaLR(o, warm) for k, o in opts.items()}
    gens = generators(cfg, rank, device)
    start = 0
    if cfg.init and not cfg.resume:
        load_trainable(nets, torch.load(find_checkpoint(cfg.init), map_location="cpu", weights_only=False,
                                        mmap=True)["nets"], cfg)
    if cfg.resume:
        load_trainable(nets, resume["nets"], cfg)
        optimizer_states(nets, opts, cfg, load=resume["opts"])
        for k, s in scheds.items():
            s.load_state_dict(resume["scheds"][k])
        if len(resume["rng"]) == world:
            set_rng_states(gens, resume["rng"][rank])
        elif master:
            print(f"resuming on {world} processes, not {len(resume['rng'])}: random streams restart")
        start = resume["step"]
        del resume

    saved = [start if cfg.resume else None]  # the step of the last checkpoint written

    def save(step: int) -> None:  # every rank takes part (FSDP gathers); rank 0 writes
        rng = [None] * world
        if world > 1:
            dist.all_gather_object(rng, rng_states(gens))
        else:
            rng = [rng_states(gens)]
        state = {"kind": "text-to-image", "config": dataclasses.asdict(cfg), "step": step,
                 "nets": trainable_state(nets, cfg), "opts": optimizer_states(nets, opts, cfg),
                 "scheds": {k: s.state_dict() for k, s in scheds.items()}, "rng": rng}
        if master:
            save_atomic(state, ckpt_path)
        saved[0] = step
        if world > 1:
            dist.barrier()

    if pairs is not None:
        lpips_warmup(cfg, base, nets, pairs, device, rank)
        save(0)
    hp = dmd2.TTUR(ratio=cfg.ratio, gan_g=cfg.gan_g, gan_d=cfg.gan_d, w=cfg.w, max_grad_norm=cfg.max_grad_norm)
    uncond, timesteps = unconditional(base, cfg.resolution), student_timesteps(cfg)
    latent = cfg.resolution // base.vae_factor
    fixed = encode_prompts(base, prompts[:4], cfg.resolution)  # the sample grid's prompts and noise
    fixed_z = torch.randn(len(prompts[:4]), 4, latent, latent, generator=torch.Generator().manual_seed(cfg.seed))
    sums, t0, log = {}, time.time(), open(out / "log.txt", "a") if master else None
    bar = tqdm(range(start, cfg.iters), initial=start, total=cfg.iters, disable=not master, desc=cfg.preset)
    for it in bar:
        # the batch: prompts for G, real latents and captions for D; text encoded once for both
        batch = [prompts[i] for i in torch.randint(len(prompts), (cfg.batch,), generator=gens["data"]).tolist()]
        x_real = captions = x_start = None
        if real is not None and (cfg.gan_g > 0 or cfg.gan_d > 0):
            x_real, captions = real.batch(cfg.batch, gens["data"])
        if cfg.steps > 1 and not cfg.backward_simulation:  # Table 4's ablation: G's input from real images
            x_start, batch = real.batch(cfg.batch, gens["data"])
        cond, cond_real = split(encode_prompts(base, batch + (captions or []), cfg.resolution), cfg.batch)
        z = torch.randn(cfg.batch, 4, latent, latent, generator=gens["noise"], device=device)
        x_in, t_in = generator_input(cfg, nets.G, base.schedule, z, cond, gens, x_start)
        logs = dmd2.train_iteration(it, nets.G, nets.teacher, nets.fake, nets.head, opts["g_opt"], opts["c_opt"],
                                    base.schedule, x_in, t_in, cond, x_real, cond_real if x_real is not None
                                    else None, hp, uncond, gens["noise"])
        if it % cfg.ratio == 0:
            scheds["g_opt"].step()
        scheds["c_opt"].step()
        values = torch.stack([getattr(v, "full_tensor", lambda v=v: v)().float() for v in logs.values()])  # DTensor
        if any_rank(not torch.isfinite(values).all().item(), device):
            last = f"{ckpt_path} (step {saved[0]})" if saved[0] is not None else "none yet"
            raise SystemExit(f"non-finite loss at iteration {it}: "
                             f"{ {k: round(v.item(), 4) for k, v in logs.items()} }; last good checkpoint: {last}")
        for k, v in zip(logs, values.tolist(), strict=True):
            sums[k] = sums.get(k, [0.0, 0]) + np.array([v, 1])
        if master and (it + 1) % cfg.log_every == 0:
            line = f"step {it + 1:>7d}/{cfg.iters} | " + " | ".join(
                f"{k} {s[0] / s[1]:.4g}" for k, s in sorted(sums.items()))
            line += f" | {(time.time() - t0) / cfg.log_every:.2f} s/it"
            if cuda:
                line += f" | peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
            tqdm.write(line)
            log.write(line + "\n")
            log.flush()
            sums, t0 = {}, time.time()
        if (it + 1) % cfg.sample_every == 0 or it + 1 == cfg.iters:
            x0 = dmd2.sample(nets.G, fixed_z.to(device), base.schedule, timesteps, fixed,
                             torch.Generator(device).manual_seed(cfg.seed))
            if master:
                from torchvision.utils import save_image

                (out / "samples").mkdir(exist_ok=True)
                save_image(decode(base, x0), out / "samples" / f"{it + 1:07d}.png", nrow=len(x0))
        if (it + 1) % cfg.ckpt_every == 0 or it + 1 == cfg.iters:
            save(it + 1)
    if master:
        log.close()
        export(str(out))
        print(f"done: {ckpt_path}, export in {out / 'export'}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    cfg, args = parse_args(argv)
    if args.export:
        print(f"exported to {export(args.export, args.out)}")
        return
    train(cfg)


if __name__ == "__main__":
    main()
