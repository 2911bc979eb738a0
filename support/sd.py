"""diffusers' side of text-to-image DMD2 (SD v1.5, SDXL, SD3 / SD3.5): what train_t2i.py and sample.py share.

    Base, load_base, encode_prompts, unconditional
                          the pipeline's parts (UNet or SD3 transformer, VAE, text encoders, schedule) and conditions
    Denoiser, Net         a UNet (epsilon) or SD3 transformer (velocity), or one LoRA adapter on it, as a dmd2
                          denoiser, with its bottleneck for the GAN head; what dmd2 sees of a DDP / FSDP-wrapped one
    add_lora, use_adapter, checkpoint_as_run
                          peft LoRA adapters, switched per call without touching requires_grad
    wrap                  DDP over the trainable parameters, or FSDP2 (fully_shard) per block
    RealLatents           real images (with captions) as VAE latents, on the fly or cached
    trainable_state, load_trainable, optimizer_states
                          the checkpoint's weights and optimizer states (full state dicts under FSDP)
    load_student, export  the student as users load it: a diffusers model, an fp16 state dict, LoRA weights
    teacher_pipeline      a stock diffusers pipeline around the loaded parts

A family is "sd15", "sdxl" or "sd3" (read from the pipeline's model_index.json). Another flow transformer (FLUX,
Wan) needs its own entries where "sd3" appears: its conditioning (`encode_prompts`), its call (`_call`), its LoRA
targets and its pipeline class; the schedule (`dmd2.FlowSchedule`), the velocity -> x0 adapter, the bottleneck of
the middle block and everything else stay as they are.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiffusionPipeline
from torch import nn
from tqdm import tqdm
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

import dmd2
from support.data import CaptionedImages
from support.runs import load_file, require, save_atomic, stream_seed

# LoRA on every attention, feed-forward, convolution and time projection of the UNet (the authors' target list); on
# SD3's transformer, every attention and feed-forward projection of both streams (diffusers' SD3 LoRA targets + FFs)
LORA_TARGETS = {"unet": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                         "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv",
                         "time_emb_proj"],
                "transformer": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                                "to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]}
T5_TOKENS = 256  # SD3's max_sequence_length (its pipeline's default)
TEXT_ENCODERS = {"sd15": [CLIPTextModel], "sdxl": [CLIPTextModel, CLIPTextModelWithProjection],
                 "sd3": [CLIPTextModelWithProjection, CLIPTextModelWithProjection, T5EncoderModel]}

# ----------------------------------------------------------------------------------------------------
# The base model: the denoising network, VAE, text encoders and noise schedule, loaded with from_pretrained.


@dataclass
class Base:
    family: str  # sd15 | sdxl | sd3
    net: nn.Module | None  # the teacher's weights: UNet2DConditionModel, or SD3Transformer2DModel
    vae: AutoencoderKL
    tokenizers: list
    text_encoders: list  # SD3: CLIP-L, CLIP-G and T5 (None when left out)
    schedule: dmd2.Schedule  # VPSchedule (SD v1.5, SDXL) or FlowSchedule (SD3, shift 3)
    joint_dim: int = 0  # SD3: the transformer's text width (T5's), also without T5

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels


@functools.lru_cache
def model_index(model: str) -> dict:
    """The pipeline's model_index.json, or a clear error (read once per model)."""
    require(model, "--model is required: a diffusers model id or folder")
    if os.path.exists(model) and not os.path.isfile(os.path.join(model, "model_index.json")):
        raise ValueError(f"--model {model}: no model_index.json there; expected a diffusers pipeline folder")
    try:
        index = DiffusionPipeline.load_config(model)
    except Exception as e:  # a hub id that cannot be resolved
        raise ValueError(f"--model {model}: cannot load the pipeline config ({e})") from e
    if "vae" not in index or not ("unet" in index or index.get("transformer", [""])[-1] == "SD3Transformer2DModel"):
        raise ValueError(f"--model {model}: not an SD v1.5, SDXL or SD3 pipeline ({index.get('_class_name')})")
    return index


def family(model: str) -> str:
    index = model_index(model)
    return "sd3" if "transformer" in index else "sdxl" if "text_encoder_2" in index else "sd15"


def subfolder(fam: str) -> str:
    return "transformer" if fam == "sd3" else "unet"


def network_class(fam: str) -> type:
    return diffusers.SD3Transformer2DModel if fam == "sd3" else diffusers.UNet2DConditionModel


def load_base(model: str, device: torch.device, dtype: torch.dtype = torch.float32, net: bool = True,
              t5: bool = True) -> Base:
    """The pipeline's parts; frozen ones in `dtype` without gradients. t5=False leaves SD3's T5 out (zeros in its
    place, as diffusers' pipeline without text_encoder_3)."""
    index, fam = model_index(model), family(model)
    if fam == "sd3":
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(model, subfolder="scheduler")
        if scheduler.config.use_dynamic_shifting:
            raise ValueError(f"--model {model}: a resolution-dependent (dynamic) timestep shift is not supported")
        schedule: dmd2.Schedule = dmd2.FlowSchedule(scheduler.config.shift)
    else:
        scheduler = diffusers.DDPMScheduler.from_pretrained(model, subfolder="scheduler")
        if scheduler.config.prediction_type != "epsilon":
            raise ValueError(f"--model {model}: {scheduler.config.prediction_type} prediction is not supported")
        schedule = dmd2.VPSchedule(scheduler.alphas_cumprod)
    names = {"sd15": [""], "sdxl": ["", "_2"], "sd3": ["", "_2", "_3"]}[fam]
    if fam == "sd3" and not (t5 and (index.get("text_encoder_3") or [None])[0]):  # T5 left out, or saved without
        names = names[:2]
    encoders = [cls.from_pretrained(model, subfolder="text_encoder" + n, torch_dtype=dtype).to(device)
                for cls, n in zip(TEXT_ENCODERS[fam], names, strict=False)]
    config = diffusers.SD3Transformer2DModel.load_config(model, subfolder="transformer") if fam == "sd3" else {}
    return Base(family=fam, net=load_net(model, device, dtype) if net else None,
                vae=AutoencoderKL.from_pretrained(model, subfolder="vae").to(device).requires_grad_(False),
                tokenizers=[AutoTokenizer.from_pretrained(model, subfolder="tokenizer" + n) for n in names],
                text_encoders=[e.requires_grad_(False) for e in encoders] + [None] * (fam == "sd3" and len(names) == 2),
                schedule=schedule, joint_dim=config.get("joint_attention_dim", 0))


def load_net(model: str, device: torch.device, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The pipeline's denoising network: its UNet, or SD3's transformer."""
    fam = family(model)
    return network_class(fam).from_pretrained(model, subfolder=subfolder(fam), torch_dtype=dtype).to(device)


def time_ids(resolution: int, n: int, device: torch.device) -> torch.Tensor:
    """SDXL's micro-conditioning [original H, W, crop top, left, target H, W] = [H, W, 0, 0, H, W]."""
    return torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], device=device,
                        dtype=torch.float32).expand(n, 6)


@torch.no_grad()
def encode_prompts(base: Base, prompts: list[str], resolution: int) -> dict[str, torch.Tensor]:
    """The network's condition for a batch of prompts, one call per text encoder.

    SD v1.5: the last hidden state of CLIP ViT-L. SDXL: the penultimate hidden states of both CLIP encoders,
    concatenated, the pooled projection of the second, and time_ids. SD3: the penultimate states of CLIP-L and
    CLIP-G concatenated and zero-padded to T5's width, then T5's 256 tokens (zeros without T5); pooled: both CLIPs'
    projections."""
    device = base.vae.device
    ids = [tok(prompts, padding="max_length", max_length=tok.model_max_length if i < 2 else T5_TOKENS,
               truncation=True, return_tensors="pt").input_ids.to(device) for i, tok in enumerate(base.tokenizers)]
    if base.family == "sd15":
        return {"encoder_hidden_states": base.text_encoders[0](ids[0])[0].float()}
    clip = [enc(i, output_hidden_states=True) for enc, i in zip(base.text_encoders[:2], ids, strict=False)]
    states = torch.cat([o.hidden_states[-2] for o in clip], -1).float()
    if base.family == "sdxl":
        return {"encoder_hidden_states": states, "text_embeds": clip[1].text_embeds.float(),
                "time_ids": time_ids(resolution, len(prompts), device)}
    t5 = (base.text_encoders[2](ids[2])[0].float() if base.text_encoders[2] is not None else
          torch.zeros(len(prompts), T5_TOKENS, base.joint_dim, device=device))
    return {"encoder_hidden_states": torch.cat([F.pad(states, (0, base.joint_dim - states.shape[-1])), t5], 1),
            "pooled_projections": torch.cat([o.text_embeds for o in clip], -1).float()}


def unconditional(base: Base, resolution: int) -> dict[str, torch.Tensor]:
    """The CFG branch, batch 1: the embedding of "" (SD v1.5, SD3: their pipelines' negative prompt); SDXL: zero
    embeddings (its pipeline's force_zeros_for_empty_prompt), with the same time_ids."""
    c = encode_prompts(base, [""], resolution)
    return c if base.family != "sdxl" else {k: v if k == "time_ids" else torch.zeros_like(v) for k, v in c.items()}


def split(cond: dict[str, torch.Tensor], n: int) -> tuple[dict, dict]:
    return {k: v[:n] for k, v in cond.items()}, {k: v[n:] for k, v in cond.items()}


# ----------------------------------------------------------------------------------------------------
# A diffusers network as a dmd2 denoiser, and its bottleneck. A UNet predicts epsilon: x0 = (x_t - sigma_t eps) /
# alpha_t; SD3's transformer predicts the velocity eps - x at timestep 1000 sigma_t: x0 = x_t - sigma_t v.


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
    if getattr(module, "_stop_here", False):  # `bottleneck_features` stops before this block, not inside checkpoint
        raise _Bottleneck(args[0])
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


def is_transformer(net: nn.Module) -> bool:
    return hasattr(net, "transformer_blocks")


def _call(net: nn.Module, x_t: torch.Tensor, time: torch.Tensor, cond: dict) -> torch.Tensor:
    if is_transformer(net):  # SD3: encoder_hidden_states, pooled_projections
        return net(hidden_states=x_t, timestep=time, **cond).sample
    added = {k: cond[k] for k in ("text_embeds", "time_ids") if k in cond}
    return net(x_t, time, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added or None).sample


class _Bottleneck(Exception):  # args[0]: the features
    pass


def bottleneck_features(net: nn.Module, x_t: torch.Tensor, time: torch.Tensor, cond: dict) -> torch.Tensor:
    """The GAN head's features [B, C, R, R] (App. F.1): a UNet's mid-block output, or the image tokens entering the
    transformer's middle block folded back to the latent grid (tokens are row-major over the patches). The forward
    is stopped there, before anything after it runs (so gradient checkpointing never recomputes the stop)."""
    stop_at = net.transformer_blocks[len(net.transformer_blocks) // 2] if is_transformer(net) else net.up_blocks[0]

    def stop(module, args, kwargs):
        raise _Bottleneck(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

    hook = stop_at.register_forward_pre_hook(stop, with_kwargs=True, prepend=True)
    stop_at._stop_here = True  # a checkpointed block: stopped by `checkpoint_as_run`, before its checkpoint starts
    try:
        _call(net, x_t, time, cond)
    except _Bottleneck as e:
        h = e.args[0]
    else:
        raise RuntimeError("the network returned without reaching its bottleneck")
    finally:
        hook.remove()
        stop_at._stop_here = False
    if is_transformer(net):  # [B, N, C] -> [B, C, H / p, W / p]
        p = net.config.patch_size
        h = h.transpose(1, 2).reshape(len(h), -1, x_t.shape[-2] // p, x_t.shape[-1] // p)
    return h


def net_factor(config: dict) -> int:
    """How much the denoising network shrinks the latent to its bottleneck: SD3's patch, or a UNet's downsampling."""
    return config["patch_size"] if "patch_size" in config else 2 ** (len(config["down_block_types"]) - 1)


def downsampling(model: str) -> int:
    """Image pixels per bottleneck cell: the VAE's factor times the network's."""
    fam, vae = family(model), AutoencoderKL.load_config(model, subfolder="vae")
    net = network_class(fam).load_config(model, subfolder=subfolder(fam))
    return 2 ** (len(vae["block_out_channels"]) - 1) * net_factor(net)


def bottleneck_shape(net: nn.Module, latent: int) -> tuple[int, int]:
    """(channels, side) of `bottleneck_features` for a latent of side `latent`."""
    c = net.config
    channels = c.num_attention_heads * c.attention_head_dim if is_transformer(net) else c.block_out_channels[-1]
    return channels, latent // net_factor(c)


def gan_head(net: nn.Module, latent: int) -> dmd2.GANHead:
    """App. F.1's head on the bottleneck. A transformer's tokens are wide (1,536 channels in SD3.5 Medium, 2,432 in
    Large, on a 64 x 64 grid at 1024 px): their channels are halved first by a 1x1 conv, as FastGen's image-DiT heads
    do, which keeps the head near the authors' SDXL head (105M parameters) instead of 189M / 473M."""
    channels, side = bottleneck_shape(net, latent)
    return dmd2.GANHead(channels, side, width=channels // 2 if is_transformer(net) else None)


class Denoiser(nn.Module):
    """dmd2's denoiser protocol over a diffusers UNet or SD3 transformer (optionally one LoRA adapter of it, or with
    its adapters off). One forward with a `bottleneck` switch, so that DDP and FSDP see every pass of the critic."""

    autocast_on = ("cuda",)  # bf16 autocast on GPU only (the authors' fp16 diverged); CPU runs fp32

    def __init__(self, net: nn.Module, schedule: dmd2.Schedule, adapter: str | None = None):
        super().__init__()
        self.net, self.schedule, self.adapter, self.layers = net, schedule, adapter, lora_layers(net)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict, bottleneck: bool = False,
                fp32: bool = False) -> torch.Tensor:
        """x0 [B, C, h, w] (or the bottleneck); fp32=True runs without autocast (the weights must be fp32)."""
        dtype, on = self.net.dtype, x_t.device.type in self.autocast_on and not fp32
        flow = isinstance(self.schedule, dmd2.FlowSchedule)
        time = 1000 * self.schedule.sigma(t) if flow else t  # SD3's timestep is sigma in [0, 1000]
        cond = {k: v.to(dtype) for k, v in cond.items()}
        with use_adapter(self.layers, self.adapter), torch.autocast(x_t.device.type, torch.bfloat16, enabled=on):
            if bottleneck:
                return bottleneck_features(self.net, x_t.to(dtype), time, cond).float()
            out = _call(self.net, x_t.to(dtype), time, cond)
        return (self.schedule.velocity_to_x0 if flow else self.schedule.eps_to_x0)(x_t, out, t)  # in float64 (dmd2)


class Net:
    """What dmd2 sees: calls go through `module` (DDP- or FSDP-wrapped under torchrun); parameters() are only
    the trainable ones, fixed at setup (FSDP swaps the registered ones around forward and backward).
    fp32_no_grad: calls without gradient (mu_fake's only one is Eq. 2's pass) run in fp32, as the authors'."""

    def __init__(self, module: nn.Module, params: list[nn.Parameter], fp32_no_grad: bool = False):
        self.module, self.params, self.fp32_no_grad = module, params, fp32_no_grad

    def __call__(self, *args):
        if self.fp32_no_grad and not torch.is_grad_enabled():
            return self.module(*args, fp32=True)
        return self.module(*args)

    def features(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        return self.module(x_t, t, cond, bottleneck=True)

    def parameters(self):
        return iter(self.params)


def add_lora(net: nn.Module, name: str, rank: int, alpha: float) -> list[nn.Parameter]:
    """A named peft LoRA adapter on the network's LORA_TARGETS; returns its (fp32) parameters."""
    from peft import LoraConfig

    targets = LORA_TARGETS["transformer" if is_transformer(net) else "unet"]
    with warnings.catch_warnings():  # a second adapter on one base is the point of shared-lora
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        net.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets), name)
    params = [p for n, p in net.named_parameters() if f".{name}." in n]
    for p in params:  # fp32 adapters on a bf16 base: small lr updates survive
        p.data = p.data.float()
    return params


def wrap(module: nn.Module, trainable: list[nn.Parameter], fsdp: bool, device: torch.device) -> nn.Module:
    """DDP over exactly `trainable`; or FSDP2 (fully_shard) per transformer, per UNet block (per SD3 block) and at
    the root, so that SDXL is gathered at most ~0.35B parameters at a time. (Resnets run inside gradient
    checkpointing, and an FSDP unit there would be re-gathered under other requires_grad flags when recomputed.)"""
    if fsdp:
        from diffusers.models.transformers.transformer_2d import Transformer2DModel
        from torch.distributed.fsdp import fully_shard

        net = getattr(module, "net", None)
        blocks = [] if net is None else list(net.transformer_blocks) if is_transformer(net) else [
            *net.down_blocks, net.mid_block, *net.up_blocks]
        for m in [m for b in blocks for m in b.modules() if isinstance(m, Transformer2DModel)] + blocks + [module]:
            fully_shard(m)  # inner units first, the root last
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
# The three networks in each mode. Frozen parts: no gradient, no optimizer state, bf16 on GPU.


@dataclass
class Nets:
    G: Net
    fake: Net
    head: Net | None
    teacher: Denoiser
    models: dict  # name -> the unwrapped trainable network of G and of mu_fake (the same one in shared-lora)
    modules: dict  # name -> the wrapped modules whose parameters the optimizers hold ("G", "fake", "head")


def build_nets(base: Base, device: torch.device, world: int, model: str, mode: str = "full", lora_rank: int = 64,
               lora_alpha: float = 8.0, gan: bool = False, resolution: int = 512, fsdp: bool = False,
               grad_checkpointing: bool = True, seed: int = 0, new_net=None) -> Nets:
    """G and mu_fake as `mode` makes them (full: fp32 copies of the teacher; lora: G a LoRA adapter on the teacher,
    mu_fake a copy; shared-lora: both adapters on the teacher), the GAN head if `gan`, and the teacher; wrapped
    for DDP (or FSDP2 when `fsdp`) when world > 1. new_net() makes a trainable fp32 copy of the teacher
    (default: from_pretrained again)."""
    new_unet = new_net or (lambda: load_net(model, device))
    torch.manual_seed(stream_seed(seed, "init"))  # the same LoRA and head initialisation on every rank
    teacher = base.net.requires_grad_(False)  # loaded in bf16 on GPU
    if mode == "full":  # three networks: the teacher and fp32 trainable copies (Sec. 4.6: both start from it)
        g_unet, f_unet = new_unet(), new_unet()
        g_params, f_params = list(g_unet.parameters()), list(f_unet.parameters())
        g_name = f_name = None
    else:  # G is a LoRA adapter on the teacher, which runs with its adapters off
        g_unet, g_name = teacher, "generator"
        g_params = add_lora(teacher, "generator", lora_rank, lora_alpha)
        if mode == "lora":  # the authors' LoRA recipe: mu_fake is a full copy
            f_unet, f_name = new_unet(), None
            f_params = list(f_unet.parameters())
        else:  # one network in memory: mu_fake is a second adapter
            f_unet, f_params, f_name = teacher, add_lora(teacher, "fake", lora_rank, lora_alpha), "fake"
        for p in g_params + f_params:
            p.requires_grad_(True)
    if grad_checkpointing:
        for u in {id(g_unet): g_unet, id(f_unet): f_unet}.values():
            u.enable_gradient_checkpointing(checkpoint_as_run)
    sched = base.schedule
    g_mod, f_mod, t_mod = Denoiser(g_unet, sched, g_name), Denoiser(f_unet, sched, f_name), Denoiser(teacher, sched)
    head = gan_head(f_unet, resolution // base.vae_factor).to(device) if gan else None
    h_params = list(head.parameters()) if gan else []
    if world > 1:
        g_mod, f_mod = wrap(g_mod, g_params, fsdp, device), wrap(f_mod, f_params, fsdp, device)
        head = wrap(head, h_params, fsdp, device) if head is not None else None
        if fsdp:
            t_mod = wrap(t_mod, [], fsdp, device)
            g_params, f_params, h_params = (list(m.parameters()) if m is not None else [] for m in (g_mod, f_mod, head))
    # the authors run mu_fake's no-grad forward (Eq. 2) in fp32, the rest in bf16; a LoRA on the bf16 base
    # (shared-lora) has no fp32 weights to run with, and stays in bf16
    fake = Net(f_mod, f_params, fp32_no_grad=f_unet.dtype == torch.float32)
    return Nets(G=Net(g_mod, g_params), fake=fake, head=Net(head, h_params) if head else None, teacher=t_mod,
                models={"G": g_unet, "fake": f_unet}, modules={"G": g_mod, "fake": f_mod, "head": head})


# ----------------------------------------------------------------------------------------------------
# Real images (with captions) for the GAN term, as VAE latents.


@torch.no_grad()
def encode_images(vae: AutoencoderKL, images: torch.Tensor, generator: torch.Generator | None = None):
    """VAE latents, shifted (SD3's VAE) and scaled as the denoising network expects."""
    z = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.sample(generator).float()
    return (z - (vae.config.get("shift_factor") or 0.0)) * vae.config.scaling_factor


class RealLatents:
    """Batches of (latent, caption) for the GAN: encoded on the fly, or all at once with --cache-latents (each
    process its share, cached in `cache`). Every posterior sample comes from a seeded generator, so two runs with
    the same seed see the same latents: the cache from `seed`, the on-the-fly batches from the caller's."""

    def __init__(self, images: CaptionedImages, vae: AutoencoderKL, cache: str | None, seed: int):
        self.images, self.vae, self.latents = images, vae, None
        if cache:
            if os.path.isfile(cache):
                self.latents, self.captions = (c := load_file(cache, "latent cache"))["latents"], c["captions"]
            else:
                g, lat, caps = torch.Generator(vae.device).manual_seed(seed), [], []
                for i in tqdm(range(len(images)), desc="caching latents", disable=int(os.environ.get("RANK", 0))):
                    x, c = images[i]
                    lat.append(encode_images(vae, x[None], g).half().cpu())
                    caps.append(c)
                self.latents, self.captions = torch.cat(lat), caps
                save_atomic({"latents": self.latents, "captions": caps}, cache)

    def batch(self, n: int, generator: torch.Generator, noise: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        """n random pairs (indices from `generator`; posterior samples from `noise`, on the VAE's device)."""
        idx = torch.randint(len(self.images), (n,), generator=generator).tolist()
        if self.latents is not None:
            return self.latents[idx].float().to(self.vae.device), [self.captions[i] for i in idx]
        pairs = [self.images[i] for i in idx]
        return encode_images(self.vae, torch.stack([p[0] for p in pairs]), noise), [p[1] for p in pairs]


# ----------------------------------------------------------------------------------------------------
# Checkpoints: the trainable weights (the whole network, or one adapter), the head and both optimizers.


def trainable_state(nets: Nets, fsdp: bool) -> dict:
    """G's and mu_fake's trainable weights (the whole network, or one adapter) and the head, on CPU."""
    if fsdp and dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        params = {k: {n for n, _ in m.named_parameters()} for k, m in nets.modules.items() if m is not None}
        return {k: {n: v for n, v in get_model_state_dict(nets.modules[k], options=opts).items() if n in params[k]}
                for k in params}  # parameters only, as without FSDP (buffers come from the config)
    out = {}
    for k, net in (("G", nets.G), ("fake", nets.fake), ("head", nets.head)):
        if net is not None:
            mine = {id(p) for p in net.params}
            module = nets.models.get(k) or getattr(net.module, "module", net.module)  # unwrap DDP
            prefix = "net." if k in nets.models else ""  # the same keys as Denoiser / FSDP state dicts
            out[k] = {prefix + n: p.detach().cpu().clone() for n, p in module.named_parameters() if id(p) in mine}
    return out


def load_trainable(nets: Nets, state: dict, fsdp: bool) -> None:
    """The inverse of trainable_state; every trainable weight must be in `state` (absent networks are skipped)."""
    if fsdp and dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        for k, m in nets.modules.items():
            if m is not None and k in state:
                bad = set_model_state_dict(m, state[k], options=StateDictOptions(full_state_dict=True, strict=False))
                if bad.unexpected_keys or set(bad.missing_keys) & {n for n, _ in m.named_parameters()}:
                    raise ValueError(f"the checkpoint's {k} weights do not fit this run (--mode, --model?)")
        return
    for k, net in (("G", nets.G), ("fake", nets.fake), ("head", nets.head)):
        if net is not None and k in state:
            module = nets.models.get(k) or getattr(net.module, "module", net.module)  # unwrap DDP
            mine = {n for n, p in module.named_parameters() if any(p is q for q in net.params)}
            values = {n.removeprefix("net.") if k in nets.models else n: v for n, v in state[k].items()}
            if set(values) != mine:
                raise ValueError(f"the checkpoint's {k} weights do not fit this run (--mode, --lora-rank, --model?)")
            module.load_state_dict(values, strict=False)


def optimizer_states(nets: Nets, opts: dict, fsdp: bool, load: dict | None = None) -> dict | None:
    """Optimizer state dicts (FSDP: full, keyed by parameter name); with `load`, restore them instead."""
    if not (fsdp and dist.is_initialized()):
        if load is None:
            return {k: o.state_dict() for k, o in opts.items()}
        for k, o in opts.items():
            o.load_state_dict(load[k])
        return None
    from torch.distributed.checkpoint import state_dict as dcp

    owners = {"g_opt": nn.ModuleDict({"G": nets.modules["G"]}),
              "c_opt": nn.ModuleDict({k: nets.modules[k] for k in ("fake", "head") if nets.modules[k] is not None})}
    if load is None:
        o = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)
        return {k: dcp.get_optimizer_state_dict(owners[k], opt, options=o) for k, opt in opts.items()}
    for k, opt in opts.items():
        dcp.set_optimizer_state_dict(owners[k], opt, load[k], options=dcp.StateDictOptions(full_state_dict=True))
    return None


def find_checkpoint(path: str) -> Path:
    p = Path(path) / "checkpoint.pt" if Path(path).is_dir() else Path(path)
    require(p.is_file(), f"{path}: no checkpoint (expected a run folder with checkpoint.pt, or a .pt file)")
    return p


# ----------------------------------------------------------------------------------------------------
# The student as users load it: a diffusers UNet or transformer (LoRA fused), an fp16 state dict like the
# released DMD2 weights, and LoRA weights for `pipe.load_lora_weights`.


def student_timesteps(steps: int, conditioning_timestep: int) -> list[int]:
    """The generator's fixed schedule, the same at training and inference (Sec. 4.4): one step at the
    conditioning timestep (999; SDXL one-step: 399), or N steps 999, 999 - 1000/N, ..."""
    return [conditioning_timestep] if steps == 1 else dmd2.step_timesteps(steps)


def load_student(ckpt: dict, device: torch.device, dtype: torch.dtype = torch.float32, fuse: bool = True) -> nn.Module:
    """The generator's network from a train_t2i.py checkpoint. A LoRA generator is fused into the base weights and
    peft's layers removed (fuse=True), so the network is the student however it is called (one whose peft layers
    are switched off, as the teacher's are, would run as the teacher); fuse=False keeps it as adapter "generator"."""
    c = ckpt["config"]
    unet, lora = load_net(c["model"], torch.device("cpu")), c["mode"] != "full"
    if lora:
        add_lora(unet, "generator", c["lora_rank"], c["lora_alpha"])
    state = {k.removeprefix("net."): v for k, v in ckpt["nets"]["G"].items()}
    missing, unexpected = unet.load_state_dict(state, strict=False)  # checkpoints hold parameters, not buffers
    params = dict(unet.named_parameters())
    if unexpected or any(k in params and (not lora or "generator" in k) for k in missing):
        raise ValueError(f"checkpoint weights do not fit {c['model']}'s {subfolder(family(c['model']))}")
    if lora and fuse:
        unet.fuse_lora(adapter_names=["generator"])
        unet.unload_lora()
    unet = unet.to(device) if dtype == torch.float32 else unet.to(device, dtype)
    return unet.requires_grad_(False)


def export(run: str, out: str | None = None) -> Path:
    """RUN/export/: unet/ or transformer/ (diffusers), dmd2_<family>_<N>step_<unet|transformer>_fp16.bin,
    pytorch_lora_weights.safetensors (LoRA runs) and dmd2.json (base model and timesteps, for sample.py)."""
    from peft.utils import get_peft_model_state_dict

    path = find_checkpoint(run)
    ckpt = load_file(path, "checkpoint of train_t2i.py", mmap=True)
    c = ckpt["config"]
    out = Path(out or path.parent / "export")
    out.mkdir(parents=True, exist_ok=True)
    unet = load_student(ckpt, torch.device("cpu"), fuse=False)
    fam = family(c["model"])
    if c["mode"] != "full":
        # the alpha / r scale is folded into lora_B, so any diffusers version loads it at scale 1
        lora = {k: (v * (c["lora_alpha"] / c["lora_rank"]) if "lora_B" in k else v).contiguous()
                for k, v in get_peft_model_state_dict(unet, adapter_name="generator").items()}
        PIPELINES[fam].save_lora_weights(str(out), **{f"{subfolder(fam)}_lora_layers": lora})
        unet.fuse_lora(adapter_names=["generator"])
        unet.unload_lora()
    unet.save_pretrained(str(out / subfolder(fam)))
    name = f"dmd2_{fam}_{c['steps']}step_{subfolder(fam)}_fp16.bin"
    save_atomic({k: v.half() for k, v in unet.state_dict().items()}, out / name)
    meta = {"kind": "text-to-image", "model": c["model"], "resolution": c["resolution"], "preset": c["preset"],
            "timesteps": student_timesteps(c["steps"], c["conditioning_timestep"]), "mode": c["mode"],
            "step": ckpt["step"], "t5": c.get("t5", True),  # `files`: what it describes (sample.py reads no other)
            "files": [subfolder(fam), name] + (["pytorch_lora_weights.safetensors"] if c["mode"] != "full" else [])}
    if fam == "sd3":  # `timesteps` index our table; a diffusers user passes pipe(sigmas=...), unshifted (the scheduler
        # shifts them), or calls the transformer at 1000 x the shifted sigma
        table = dmd2.FlowSchedule(diffusers.FlowMatchEulerDiscreteScheduler.load_config(
            c["model"], subfolder="scheduler")["shift"])
        meta |= {"sigmas": [(t + 1) / table.T for t in meta["timesteps"]],
                 "transformer_timesteps": [round(1000 * float(table.sigmas[t]), 3) for t in meta["timesteps"]]}
    (out / "dmd2.json").write_text(json.dumps(meta, indent=1))
    return out


# ----------------------------------------------------------------------------------------------------
# Stock diffusers pipelines around the loaded parts (the LPIPS warm-up's teacher pairs, LoRA files in sample.py).

PIPELINES = {"sd15": diffusers.StableDiffusionPipeline, "sdxl": diffusers.StableDiffusionXLPipeline,
             "sd3": diffusers.StableDiffusion3Pipeline}


def teacher_pipeline(base: Base, model: str):
    """A stock pipeline of the family around our loaded parts: the Euler sampler ("trailing" spacing) for UNets,
    the model's own flow-matching Euler scheduler for SD3."""
    fam = base.family
    sched = (diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(model, subfolder="scheduler") if fam == "sd3"
             else diffusers.EulerDiscreteScheduler.from_pretrained(model, subfolder="scheduler",
                                                                   timestep_spacing="trailing"))
    parts = {subfolder(fam): base.net, "vae": base.vae, "scheduler": sched}
    for i, (enc, tok) in enumerate(zip(base.text_encoders, base.tokenizers + [None], strict=False)):
        parts |= {f"text_encoder{'_' + str(i + 1) if i else ''}": enc, f"tokenizer{'_' + str(i + 1) if i else ''}": tok}
    if fam == "sd15":
        parts |= dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return PIPELINES[fam](**parts)


def to_pixels(vae: AutoencoderKL, x0: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [-1, 1], the inverse of `encode_images` (differentiable: the LPIPS warm-up)."""
    c = vae.config
    return vae.decode(x0.to(vae.dtype) / c.scaling_factor + (c.get("shift_factor") or 0.0)).sample.float()


@torch.no_grad()
def decode(base: Base, x0: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [0, 1]."""
    return (to_pixels(base.vae, x0) / 2 + 0.5).clamp(0, 1)


