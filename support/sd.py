"""diffusers' side of text-to-image DMD2 (SD v1.5, SDXL): what train_t2i.py and sample.py share.

    Base, load_base, encode_prompts, unconditional
                          the pipeline's parts (UNet, VAE, text encoders, DDPM schedule) and the UNet's condition
    EpsUNet, Net          an epsilon UNet (or one LoRA adapter on it) as a dmd2 denoiser, with its mid-block output
                          as the GAN head's bottleneck; what dmd2 sees of a DDP / FSDP-wrapped network
    add_lora, use_adapter, checkpoint_as_run
                          peft LoRA adapters, switched per call without touching requires_grad
    wrap                  DDP over the trainable parameters, or FSDP2 (fully_shard) per block
    RealLatents           real images (with captions) as VAE latents, on the fly or cached
    trainable_state, load_trainable, optimizer_states
                          the checkpoint's weights and optimizer states (full state dicts under FSDP)
    load_student, export  the student as users load it: a diffusers UNet, an fp16 state dict, LoRA weights
    teacher_pipeline      a stock diffusers pipeline around the loaded parts
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from torch import nn
from tqdm import tqdm
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

import dmd2
from support.data import CaptionedImages
from support.runs import load_file, save_atomic

# LoRA on every attention, feed-forward, convolution and time projection of the UNet (the authors' target list)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]

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
        raise ValueError("--model is required: a diffusers model id or folder")
    if os.path.exists(model) and not os.path.isfile(os.path.join(model, "model_index.json")):
        raise ValueError(f"--model {model}: no model_index.json there; expected a diffusers pipeline folder")
    try:
        index = DiffusionPipeline.load_config(model)
    except Exception as e:  # a hub id that cannot be resolved
        raise ValueError(f"--model {model}: cannot load the pipeline config ({e})") from e
    if "unet" not in index or "vae" not in index:
        raise ValueError(f"--model {model}: not a UNet text-to-image pipeline ({index.get('_class_name')})")
    return index


def load_base(model: str, device: torch.device, dtype: torch.dtype = torch.float32, unet: bool = True) -> Base:
    """SDXL is recognised by its second text encoder; frozen parts are loaded in `dtype` without gradients."""
    sdxl = "text_encoder_2" in model_index(model)
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    if scheduler.config.prediction_type != "epsilon":
        raise ValueError(f"--model {model}: {scheduler.config.prediction_type} prediction is not supported (epsilon)")
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

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict, bottleneck: bool = False,
                fp32: bool = False) -> torch.Tensor:
        """x0 [B, 4, h, w] (or the bottleneck); fp32=True runs without autocast (the UNet's weights must be fp32)."""
        dtype, on = self.unet.dtype, x_t.device.type in self.autocast_on and not fp32
        cond = {k: v.to(dtype) for k, v in cond.items()}
        with use_adapter(self.layers, self.adapter), torch.autocast(x_t.device.type, torch.bfloat16, enabled=on):
            if bottleneck:
                return mid_block_output(self.unet, x_t.to(dtype), t, cond).float()
            eps = self.unet(x_t.to(dtype), t, **unet_inputs(cond)).sample
        return self.schedule.eps_to_x0(x_t, eps, t)  # in float64 (dmd2)


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


def add_lora(unet: UNet2DConditionModel, name: str, rank: int, alpha: float) -> list[nn.Parameter]:
    """A named peft LoRA adapter on the UNet's LORA_TARGETS; returns its (fp32) parameters."""
    from peft import LoraConfig

    with warnings.catch_warnings():  # a second adapter on one base is the point of shared-lora
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=LORA_TARGETS), name)
    params = [p for n, p in unet.named_parameters() if f".{name}." in n]
    for p in params:  # fp32 adapters on a bf16 base: small lr updates survive
        p.data = p.data.float()
    return params


def wrap(module: nn.Module, trainable: list[nn.Parameter], fsdp: bool, device: torch.device) -> nn.Module:
    """DDP over exactly `trainable`; or FSDP2 (fully_shard) per transformer, per UNet block and at the root, so
    that SDXL is gathered at most ~0.35B parameters at a time. (Resnets run inside gradient checkpointing, and
    an FSDP unit there would be re-gathered under other requires_grad flags when recomputed.)"""
    if fsdp:
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
# The three networks in each mode. Frozen parts: no gradient, no optimizer state, bf16 on GPU.


@dataclass
class Nets:
    G: Net
    fake: Net
    head: Net | None
    teacher: EpsUNet
    unets: dict  # name -> the unwrapped trainable UNet of G and of mu_fake (the same one in shared-lora)
    modules: dict  # name -> the wrapped modules whose parameters the optimizers hold ("G", "fake", "head")


def build_nets(base: Base, device: torch.device, world: int, model: str, mode: str = "full", lora_rank: int = 64,
               lora_alpha: float = 8.0, gan: bool = False, resolution: int = 512, fsdp: bool = False,
               grad_checkpointing: bool = True, seed: int = 0, new_unet=None) -> Nets:
    """G and mu_fake as `mode` makes them (full: fp32 copies of the teacher; lora: G a LoRA adapter on the teacher,
    mu_fake a copy; shared-lora: both adapters on the teacher), the GAN head if `gan`, and the teacher; wrapped
    for DDP (or FSDP2 when `fsdp`) when world > 1. new_unet() makes a trainable fp32 copy of the teacher
    (default: from_pretrained again)."""
    new_unet = new_unet or (lambda: load_unet(model, device))
    torch.manual_seed(seed)  # the same LoRA and head initialisation on every rank
    teacher = base.unet.requires_grad_(False)  # loaded in bf16 on GPU
    if mode == "full":  # three UNets: the teacher and fp32 trainable copies (Sec. 4.6: both start from it)
        g_unet, f_unet = new_unet(), new_unet()
        g_params, f_params = list(g_unet.parameters()), list(f_unet.parameters())
        g_name = f_name = None
    else:  # G is a LoRA adapter on the teacher, which runs with its adapters off
        g_unet, g_name = teacher, "generator"
        g_params = add_lora(teacher, "generator", lora_rank, lora_alpha)
        if mode == "lora":  # the authors' LoRA recipe: mu_fake is a full copy
            f_unet, f_name = new_unet(), None
            f_params = list(f_unet.parameters())
        else:  # one UNet in memory: mu_fake is a second adapter
            f_unet, f_params, f_name = teacher, add_lora(teacher, "fake", lora_rank, lora_alpha), "fake"
        for p in g_params + f_params:
            p.requires_grad_(True)
    if grad_checkpointing:
        for u in {id(g_unet): g_unet, id(f_unet): f_unet}.values():
            u.enable_gradient_checkpointing(checkpoint_as_run)
    sched = base.schedule
    g_mod, f_mod, t_mod = EpsUNet(g_unet, sched, g_name), EpsUNet(f_unet, sched, f_name), EpsUNet(teacher, sched)
    head, h_params = None, []
    if gan:
        latent = resolution // base.vae_factor
        head = dmd2.GANHead(f_unet.config.block_out_channels[-1],
                            latent // 2 ** (len(f_unet.config.down_block_types) - 1)).to(device)
        h_params = list(head.parameters())
    if world > 1:
        g_mod, f_mod = wrap(g_mod, g_params, fsdp, device), wrap(f_mod, f_params, fsdp, device)
        head = wrap(head, h_params, fsdp, device) if head is not None else None
        if fsdp:
            t_mod = wrap(t_mod, [], fsdp, device)
            g_params, f_params, h_params = (list(m.parameters()) if m is not None else []
                                            for m in (g_mod, f_mod, head))
    # the authors run mu_fake's no-grad forward (Eq. 2) in fp32, the rest in bf16; a LoRA on the bf16 base
    # (shared-lora) has no fp32 weights to run with, and stays in bf16
    fake = Net(f_mod, f_params, fp32_no_grad=f_unet.dtype == torch.float32)
    return Nets(G=Net(g_mod, g_params), fake=fake, head=Net(head, h_params) if head else None, teacher=t_mod,
                unets={"G": g_unet, "fake": f_unet}, modules={"G": g_mod, "fake": f_mod, "head": head})


# ----------------------------------------------------------------------------------------------------
# Real images (with captions) for the GAN term, as VAE latents.


@torch.no_grad()
def encode_images(vae: AutoencoderKL, images: torch.Tensor, generator: torch.Generator | None = None):
    """VAE latents, scaled by the VAE's scaling_factor as the UNet expects."""
    x = images.to(vae.device, vae.dtype)
    return vae.encode(x).latent_dist.sample(generator).float() * vae.config.scaling_factor


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
# Checkpoints: the trainable weights (the whole UNet, or one adapter), the head and both optimizers.


def trainable_state(nets: Nets, fsdp: bool) -> dict:
    """G's and mu_fake's trainable weights (the whole UNet, or one adapter) and the head, on CPU."""
    if fsdp and dist.is_initialized():
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


def load_trainable(nets: Nets, state: dict, fsdp: bool) -> None:
    """The inverse of trainable_state; every trainable weight must be in `state` (absent networks are skipped)."""
    if fsdp and dist.is_initialized():
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


def find_checkpoint(path: str) -> Path:
    p = Path(path)
    p = p / "checkpoint.pt" if p.is_dir() else p
    if not p.is_file():
        raise ValueError(f"{path}: no checkpoint (expected a run folder with checkpoint.pt, or a .pt file)")
    return p




# ----------------------------------------------------------------------------------------------------
# The student as users load it: a diffusers UNet (LoRA fused), an fp16 state dict like the released DMD2
# weights, and LoRA weights for `pipe.load_lora_weights`.


def student_timesteps(steps: int, conditioning_timestep: int) -> list[int]:
    """The generator's fixed schedule, the same at training and inference (Sec. 4.4): one step at the
    conditioning timestep (999; SDXL one-step: 399), or N steps 999, 999 - 1000/N, ..."""
    return [conditioning_timestep] if steps == 1 else dmd2.step_timesteps(steps)


def load_student(ckpt: dict, device: torch.device, dtype: torch.dtype = torch.float32,
                 fuse: bool = True) -> UNet2DConditionModel:
    """The generator's UNet from a train_t2i.py checkpoint. A LoRA generator is fused into the base weights and
    peft's layers removed (fuse=True), so the UNet is the student however it is called (a UNet whose peft layers
    are switched off, as the teacher's are, would run as the teacher); fuse=False keeps it as adapter "generator"."""
    c = ckpt["config"]
    unet, lora = load_unet(c["model"], torch.device("cpu")), c["mode"] != "full"
    if lora:
        add_lora(unet, "generator", c["lora_rank"], c["lora_alpha"])
    state = {k.removeprefix("unet."): v for k, v in ckpt["nets"]["G"].items()}
    missing, unexpected = unet.load_state_dict(state, strict=not lora)
    if unexpected or any("generator" in k for k in missing):
        raise ValueError(f"checkpoint weights do not fit {c['model']}'s UNet")
    if lora and fuse:
        unet.fuse_lora(adapter_names=["generator"])
        unet.unload_lora()
    unet = unet.to(device) if dtype == torch.float32 else unet.to(device, dtype)
    return unet.requires_grad_(False)


def export(run: str, out: str | None = None) -> Path:
    """RUN/export/: unet/ (diffusers), dmd2_<model>_<N>step_unet_fp16.bin, pytorch_lora_weights.safetensors
    (LoRA runs) and dmd2.json (base model and timesteps, for sample.py)."""
    from peft.utils import get_peft_model_state_dict

    path = find_checkpoint(run)
    ckpt = load_file(path, "checkpoint of train_t2i.py", mmap=True)
    c = ckpt["config"]
    out = Path(out or path.parent / "export")
    out.mkdir(parents=True, exist_ok=True)
    unet = load_student(ckpt, torch.device("cpu"), fuse=False)
    sdxl = "text_encoder_2" in model_index(c["model"])
    if c["mode"] != "full":
        lora = get_peft_model_state_dict(unet, adapter_name="generator")
        # the alpha / r scale is folded into lora_B, so any diffusers version loads it at scale 1
        lora = {k: v * (c["lora_alpha"] / c["lora_rank"]) if "lora_B" in k else v for k, v in lora.items()}
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        (StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline).save_lora_weights(
            str(out), unet_lora_layers={k: v.contiguous() for k, v in lora.items()})
        unet.fuse_lora(adapter_names=["generator"])
        unet.unload_lora()
    unet.save_pretrained(str(out / "unet"))
    name = f"dmd2_{'sdxl' if sdxl else 'sd15'}_{c['steps']}step_unet_fp16.bin"
    save_atomic({k: v.half() for k, v in unet.state_dict().items()}, out / name)
    meta = {"kind": "text-to-image", "model": c["model"], "resolution": c["resolution"], "preset": c["preset"],
            "timesteps": student_timesteps(c["steps"], c["conditioning_timestep"]), "mode": c["mode"],
            "step": ckpt["step"]}
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
def decode(base: Base, x0: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [0, 1]."""
    img = base.vae.decode(x0.to(base.vae.dtype) / base.vae.config.scaling_factor).sample
    return (img.float() / 2 + 0.5).clamp(0, 1)


