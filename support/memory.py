"""Peak GPU memory of train_t2i.py, per process, computed without a GPU and without weights.

The networks are built from their configs under PyTorch's FakeTensorMode (tensors with shapes and dtypes, no
data) exactly as train_t2i.py builds them (`sd.build_nets`), and two iterations of the training loop (a generator +
critic iteration, then a critic iteration) run under torch.distributed's MemTracker, which adds up the bytes of every
live tensor: parameters, gradients, AdamW states, activations (bf16 autocast, gradient checkpointing) and
temporaries. Not counted: allocator fragmentation, CUDA context and kernel workspaces (about 1-3 GB on a GPU),
the text encoders' and VAE's activations (small and transient; latents can be cached).

    python train_t2i.py --estimate-memory --arch sdxl --mode shared-lora --batch 1 --resolution 1024
    python train_t2i.py --estimate-memory --arch sd35m --preset sd35m-4step --mode shared-lora --batch 1
    python train_t2i.py --estimate-memory --model path/to/pipeline --mode full --batch 2   # any local model's configs
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from transformers import AutoConfig, CLIPTextConfig, T5Config

import dmd2
from support import sd

# The published configs of SD v1.5, SDXL base 1.0 and SD3.5 Medium / Large (their parameter counts: UNet 859,520,964 and
# 2,567,463,684; transformer 2,243,171,520 and 8,056,627,520; CLIP ViT-L 123,060,480 (123,650,304 with projection);
# OpenCLIP ViT-bigG with projection 694,659,840; T5-XXL encoder 4,762,310,656; VAE 83,653,863, SD3's 83,819,683).
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu")
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, feed_forward_proj="gated-gelu",
              vocab_size=32128)
SD3 = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
           joint_attention_dim=4096, pooled_projection_dim=2048, qk_norm="rms_norm")
ARCHS = {
    "sd15": dict(net=dict(cross_attention_dim=768, attention_head_dim=8, sample_size=64), text=[CLIP_L]),
    "sdxl": dict(net=dict(addition_embed_type="text_time", addition_time_embed_dim=256, attention_head_dim=[5, 10, 20],
                          block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
                          down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                          up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                          projection_class_embeddings_input_dim=2816, sample_size=128,
                          transformer_layers_per_block=[1, 2, 10], use_linear_projection=True), text=[CLIP_L, CLIP_G]),
    "sd35m": dict(net=dict(SD3, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                           pos_embed_max_size=384, dual_attention_layers=list(range(13))),
                  text=[dict(CLIP_L, projection_dim=768), CLIP_G, T5_XXL]),
    "sd35l": dict(net=dict(SD3, num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                           pos_embed_max_size=192), text=[dict(CLIP_L, projection_dim=768), CLIP_G, T5_XXL]),
}
VAE = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4)
VAE_SD3 = dict(VAE, latent_channels=16, shift_factor=0.0609, scaling_factor=1.5305, use_quant_conv=False,
               use_post_quant_conv=False)


def configs(model: str | None, arch: str = "sdxl", t5: bool = True) -> tuple[str, dict, list[dict], dict]:
    """(family, network, text encoder, VAE) configs: built in (`arch`), or read from a local diffusers folder (`model`).
    t5=False leaves SD3's T5 out."""
    if not model:
        a, fam = ARCHS[arch], "sd3" if arch.startswith("sd3") else arch
        text = [dict(c, vocab_size=c.get("vocab_size", 49408)) for c in a["text"]]
        return fam, a["net"], text[:2] if fam == "sd3" and not t5 else text, VAE_SD3 if fam == "sd3" else VAE
    fam, index = sd.family(model), sd.model_index(model)
    names = [n for n in ("text_encoder", "text_encoder_2", "text_encoder_3") if (index.get(n) or [None])[0]]
    text = [AutoConfig.from_pretrained(model, subfolder=n).to_dict() for n in names[:2 if not t5 else 3]]
    return (fam, dict(AutoencoderKL.load_config(model, subfolder=sd.subfolder(fam))), text,
            dict(AutoencoderKL.load_config(model, subfolder="vae")))


class Tracker(MemTracker):
    """MemTracker's accounting of every tensor's bytes, without its per-module bookkeeping (which expects one call
    of each module per step and hooks every parameter, frozen or not). Gradients, activations and temporaries are
    then told apart by when they were made; parameters and optimizer states by `track_external`."""

    def _pre_fw_hook(self, *args) -> None: ...

    _post_fw_hook = _pre_bw_hook = _post_bw_hook = _pre_fw_hook


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


def build_base(fam: str, net_cfg: dict, text_cfgs: list[dict], vae_cfg: dict, device: torch.device | str) -> sd.Base:
    """The pipeline's parts from configs with random weights on `device` (meta: shapes only), frozen ones in bf16
    as train_t2i.py loads them on a GPU; no tokenizers (conditions are drawn at random, `random_conditions`)."""
    with torch.device(device):
        text = [cls(T5Config(**c) if "d_model" in c else CLIPTextConfig(**c)).to(torch.bfloat16).requires_grad_(False)
                for cls, c in zip(sd.TEXT_ENCODERS[fam], text_cfgs, strict=False)]
        net = sd.network_class(fam).from_config(net_cfg)
        vae = AutoencoderKL.from_config(vae_cfg).requires_grad_(False)
    return sd.Base(family=fam, net=net.to(torch.bfloat16).requires_grad_(False), vae=vae, tokenizers=[],
                   text_encoders=text + [None] * (fam == "sd3" and len(text) == 2),
                   schedule=dmd2.FlowSchedule(3.0) if fam == "sd3" else dmd2.VPSchedule(),
                   joint_dim=net_cfg.get("joint_attention_dim", 0))


def random_conditions(base: sd.Base, text_cfgs: list[dict], B: int, resolution: int) -> dict[str, torch.Tensor]:
    """Conditions of the shapes `sd.encode_prompts` gives (random values), on the current default device."""
    c, L = base.net.config, text_cfgs[0].get("max_position_embeddings", 77)
    if base.family == "sd3":
        return {"encoder_hidden_states": torch.randn(B, L + sd.T5_TOKENS, c.joint_attention_dim),
                "pooled_projections": torch.randn(B, c.pooled_projection_dim)}
    cond = {"encoder_hidden_states": torch.randn(B, L, c.cross_attention_dim)}
    if base.family == "sdxl":
        cond |= {"text_embeds": torch.randn(B, text_cfgs[-1]["projection_dim"]),
                 "time_ids": sd.time_ids(resolution, B, torch.get_default_device())}
    return cond


def iterations(n: int, nets: sd.Nets, base: sd.Base, cond: dict, g_opt, c_opt, resolution: int, B: int,
               timesteps: list[int], hp: dmd2.TTUR, start: int = 0) -> None:
    """n training iterations from `start` as train_t2i.py runs them (random noise, latents and conditions): for
    several steps, the longest backward simulation (k = N - 1)."""
    h, gan = resolution // base.vae_factor, hp.gan_g > 0 or hp.gan_d > 0
    shape, uncond = (B, base.latent_channels, h, h), {k: v[:1] for k, v in cond.items()}
    for it in range(start, start + n):
        z = torch.randn(shape)
        if len(timesteps) > 1:
            x_in, t_in = dmd2.backward_simulation(nets.G, z, base.schedule, timesteps, len(timesteps) - 1, cond)
        else:
            x_in, t_in = z, torch.full((B,), timesteps[0])
        dmd2.train_iteration(it, nets.G, nets.teacher, nets.fake, nets.head, g_opt, c_opt, base.schedule, x_in, t_in,
                             cond, torch.randn(shape) if gan else None, cond if gan else None, hp, uncond)


def optimizers(nets: sd.Nets, lr: float) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    adamw = dict(lr=lr, betas=(0.9, 0.999), weight_decay=0.01)
    return (torch.optim.AdamW(nets.G.params, **adamw),
            torch.optim.AdamW(nets.fake.params + (nets.head.params if nets.head else []), **adamw))


def estimate(fam: str, net_cfg: dict, text_cfgs: list[dict], vae_cfg: dict, *, mode: str, lora_rank: int,
             lora_alpha: float, resolution: int, batch: int, timesteps: list[int], hp: dmd2.TTUR, lr: float,
             grad_checkpointing: bool) -> dict[str, float]:
    """Peak GiB by kind (Parameter, Gradient, Optstate, Activation, Temp, ...) over two training iterations of one
    process: networks as `sd.build_nets` makes them in `mode`, generator timesteps `timesteps`, TTUR `hp`."""
    meta = torch.device("meta")
    base = build_base(fam, net_cfg, text_cfgs, vae_cfg, meta)
    with meta:
        nets = sd.build_nets(base, meta, 1, "", mode, lora_rank, lora_alpha, hp.gan_g > 0 or hp.gan_d > 0, resolution,
                             grad_checkpointing=grad_checkpointing, new_net=lambda: type(base.net).from_config(net_cfg))
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    modules = [base.net, base.vae, *filter(None, base.text_encoders), *nets.models.values(),
               *([nets.head.module] if nets.head else [])]
    new = fake_parameters(modules, fake_mode)
    for net in (nets.G, nets.fake, nets.head):
        if net is not None:
            net.params = [new[id(p)] for p in net.params]
    autocast_on, sd.Denoiser.autocast_on = sd.Denoiser.autocast_on, ("cuda", "cpu")  # the GPU's bf16 autocast
    cpu = torch.device("cpu")
    try:
        with fake_mode:
            g_opt, c_opt = optimizers(nets, lr)
            cond, tracker = random_conditions(base, text_cfgs, batch, resolution), Tracker()
            tracker.track_external(*modules, g_opt, c_opt)
            with tracker:
                iterations(2, nets, base, cond, g_opt, c_opt, resolution, batch, timesteps, hp)
    finally:
        sd.Denoiser.autocast_on = autocast_on
    return {str(getattr(k, "value", k)): v / 2**30 for k, v in tracker.get_tracker_snapshot("peak")[cpu].items()}
