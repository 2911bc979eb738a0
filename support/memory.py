"""Peak GPU memory of train_t2i.py, per process, computed without a GPU and without weights.

The networks are built from their configs under PyTorch's FakeTensorMode (tensors with shapes and dtypes, no
data) exactly as train_t2i.py builds them (`sd.build_nets`), and two iterations of the training loop (a generator +
critic iteration, then a critic iteration) run under torch.distributed's MemTracker, which adds up the bytes of every
live tensor: parameters, gradients, AdamW states, activations (bf16 autocast, gradient checkpointing) and
temporaries. Not counted: allocator fragmentation, CUDA context and kernel workspaces (about 1-3 GB on a GPU),
the text encoders' and VAE's activations (small and transient; latents can be cached).

    python train_t2i.py --estimate-memory --arch sdxl --mode shared-lora --batch 1 --resolution 1024
    python train_t2i.py --estimate-memory --model path/to/pipeline --mode full --batch 2   # any local model's configs
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

import dmd2
from support import sd

# The published configs of SD v1.5 and SDXL base 1.0 (their parameter counts: UNet 859,520,964 and 2,567,463,684;
# CLIP ViT-L 123,060,480; OpenCLIP ViT-bigG with projection 694,659,840; VAE 83,653,863).
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu")
ARCHS = {
    "sd15": dict(unet=dict(cross_attention_dim=768, attention_head_dim=8, sample_size=64), text=[CLIP_L]),
    "sdxl": dict(unet=dict(addition_embed_type="text_time", addition_time_embed_dim=256, attention_head_dim=[5, 10, 20],
                           block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
                           down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                           up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                           projection_class_embeddings_input_dim=2816, sample_size=128,
                           transformer_layers_per_block=[1, 2, 10], use_linear_projection=True),
                 text=[CLIP_L, dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                    num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
                                    projection_dim=1280)]),
}
VAE = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4)


def configs(model: str | None, arch: str = "sdxl") -> tuple[dict, list[dict], dict]:
    """(UNet, text encoder, VAE) configs: built in (`arch`), or read from a local diffusers folder (`model`)."""
    if not model:
        a = ARCHS[arch]
        return a["unet"], [dict(c, vocab_size=49408) for c in a["text"]], VAE
    index = sd.model_index(model)
    text = [CLIPTextConfig.from_pretrained(model, subfolder=n).to_dict() for n in ("text_encoder", "text_encoder_2")
            if n in index]
    return (dict(UNet2DConditionModel.load_config(model, subfolder="unet")), text,
            dict(AutoencoderKL.load_config(model, subfolder="vae")))


class Tracker(MemTracker):
    """MemTracker's accounting of every tensor's bytes, without its per-module bookkeeping (which expects one call
    of each module per step and hooks every parameter, frozen or not). Gradients, activations and temporaries are
    then told apart by when they were made; parameters and optimizer states by `track_external`."""

    def _pre_fw_hook(self, *args) -> None: ...

    def _post_fw_hook(self, *args) -> None: ...

    def _pre_bw_hook(self, *args) -> None: ...

    def _post_bw_hook(self, *args) -> None: ...


def fake_parameters(modules: list[nn.Module], mode: FakeTensorMode) -> dict[int, nn.Parameter]:
    """Replace the meta parameters and buffers of `modules` by fake CPU tensors (shared ones stay shared).
    Building on meta first lets peft and Module.to work; they cannot convert fake parameters in place."""
    new: dict[int, torch.Tensor] = {}
    with mode:
        for m in (m for mod in modules for m in mod.modules()):
            for store in (m._parameters, m._buffers):
                for k, t in store.items():
                    if t is not None and t.device.type == "meta":
                        if id(t) not in new:
                            fake = torch.empty(t.shape, dtype=t.dtype)
                            new[id(t)] = nn.Parameter(fake, t.requires_grad) if isinstance(t, nn.Parameter) else fake
                        store[k] = new[id(t)]
    return new


def estimate(unet_cfg: dict, text_cfgs: list[dict], vae_cfg: dict, *, mode: str, lora_rank: int, lora_alpha: float,
             resolution: int, batch: int, timesteps: list[int], hp: dmd2.TTUR, lr: float,
             grad_checkpointing: bool) -> dict[str, float]:
    """Peak GiB by kind (Parameter, Gradient, Optstate, Activation, Temp, ...) over two training iterations of one
    process: networks as `sd.build_nets` makes them in `mode`, generator timesteps `timesteps`, TTUR `hp`."""
    meta = torch.device("meta")
    schedule = dmd2.VPSchedule()  # real tables, indexed by fake timesteps
    gan = hp.gan_g > 0 or hp.gan_d > 0
    with meta:  # the frozen parts in bf16, as train_t2i.py loads them on a GPU
        text = [cls(CLIPTextConfig(**c)).to(torch.bfloat16).requires_grad_(False)
                for cls, c in zip((CLIPTextModel, CLIPTextModelWithProjection), text_cfgs, strict=False)]
        teacher = UNet2DConditionModel.from_config(unet_cfg).to(torch.bfloat16).requires_grad_(False)
        base = sd.Base(sdxl=len(text) == 2, unet=teacher, vae=AutoencoderKL.from_config(vae_cfg).requires_grad_(False),
                       tokenizers=[], text_encoders=text, schedule=schedule)
        nets = sd.build_nets(base, meta, 1, "", mode, lora_rank, lora_alpha, gan, resolution,
                             grad_checkpointing=grad_checkpointing,
                             new_unet=lambda: UNet2DConditionModel.from_config(unet_cfg))
    mode_ = FakeTensorMode(allow_non_fake_inputs=True)
    head = nets.head.module if nets.head else None
    modules = [base.unet, base.vae, *text, *nets.unets.values(), *([head] if head else [])]
    new = fake_parameters(modules, mode_)
    for net in (nets.G, nets.fake, nets.head):
        if net is not None:
            net.params = [new[id(p)] for p in net.params]
    autocast_on, sd.EpsUNet.autocast_on = sd.EpsUNet.autocast_on, ("cuda", "cpu")  # the GPU's bf16 autocast
    try:
        peak = run(nets, base, modules, mode_, text_cfgs, resolution, batch, timesteps, hp, lr)
    finally:
        sd.EpsUNet.autocast_on = autocast_on
    return {str(getattr(k, "value", k)): v / 2**30 for k, v in peak.items()}


def run(nets: sd.Nets, base: sd.Base, modules: list[nn.Module], mode: FakeTensorMode, text_cfgs: list[dict],
        resolution: int, B: int, timesteps: list[int], hp: dmd2.TTUR, lr: float) -> dict:
    """Two training iterations on fake tensors; the peak bytes by kind."""
    cpu = torch.device("cpu")
    with mode:
        adamw = dict(lr=lr, betas=(0.9, 0.999), weight_decay=0.01)
        g_opt = torch.optim.AdamW(nets.G.params, **adamw)
        c_opt = torch.optim.AdamW(nets.fake.params + (nets.head.params if nets.head else []), **adamw)
        h, L = resolution // base.vae_factor, text_cfgs[0].get("max_position_embeddings", 77)
        cond = {"encoder_hidden_states": torch.randn(B, L, base.unet.config.cross_attention_dim)}
        if base.sdxl:
            cond |= {"text_embeds": torch.randn(B, text_cfgs[-1]["projection_dim"]),
                     "time_ids": sd.time_ids(resolution, B, cpu)}
        uncond = {k: v[:1] for k, v in cond.items()}
        tracker = Tracker()
        tracker.track_external(*modules, g_opt, c_opt)
        gan = hp.gan_g > 0 or hp.gan_d > 0
        with tracker:
            for it in range(2):
                z = torch.randn(B, 4, h, h)
                if len(timesteps) > 1:  # the longest backward simulation: k = N - 1
                    x_in, t_in = dmd2.backward_simulation(nets.G, z, base.schedule, timesteps, len(timesteps) - 1,
                                                          cond)
                else:
                    x_in, t_in = z, torch.full((B,), timesteps[0])
                dmd2.train_iteration(it, nets.G, nets.teacher, nets.fake, nets.head, g_opt, c_opt, base.schedule,
                                     x_in, t_in, cond, torch.randn(B, 4, h, h) if gan else None,
                                     cond if gan else None, hp, uncond)
    return tracker.get_tracker_snapshot("peak")[cpu]
