"""Text-to-image DMD2: distil SD v1.5, SDXL or SD3.5 (diffusers) into a one- or four-step generator.

    python train_t2i.py --preset sd15 --model runwayml/stable-diffusion-v1-5 --prompts prompts.txt
    torchrun --nproc_per_node 8 train_t2i.py --preset sdxl-4step --model stabilityai/stable-diffusion-xl-base-1.0 \
        --prompts prompts.txt --real-images laion/ --dist fsdp
    python train_t2i.py --preset sd35m-4step --mode shared-lora ...   # one GPU: G and mu_fake as LoRAs on the teacher
    python train_t2i.py --export runs/sdxl-4step                        # diffusers folder, fp16 state dict, LoRA

Yin et al., arXiv:2405.14867, Sec. 5.2, App. F.3 (SD v1.5), F.4 (SDXL); the presets hold the paper's settings (SD3.5:
public flow-model DMD recipes, docs/text-to-image.md). mu_real = the teacher with classifier-free guidance; G and
mu_fake start as copies of it (`--mode full`) or LoRA adapters on it (`lora`: G; `shared-lora`: both, on the one
frozen base that is also the teacher); D = `dmd2.GANHead` on mu_fake's bottleneck (`support/sd.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

import dmd2
from support import memory, runs, sd
from support.data import CaptionedImages, read_prompts

# ----------------------------------------------------------------------------------------------------
# Configuration: the paper's recipes as presets (App. F.3, F.4; batch is per process: the paper's global
# batch is 2048 = 32 x 64 GPUs for SD v1.5 and 128 = 2 x 64 GPUs for SDXL).


@dataclass
class Config:
    # the run
    model: str = ""  # diffusers model id or folder: SD v1.5-, SDXL- or SD3-based (read from the pipeline)
    prompts: str = ""  # training prompts, one per line
    real_images: str = ""  # GAN real data: folder of images + same-named .txt captions, or .tar shards
    out: str = "runs/t2i"  # run folder: config.json, checkpoint.pt, log.jsonl, samples/, export/
    preset: str = ""  # the recipe: sd15, sd15-stage2, sdxl-4step, sdxl-1step, sdxl-4step-lora, sd35m-4step, ...
    resolution: int = 512  # image side in pixels
    batch: int = 32  # per process
    iters: int = 40000  # critic updates; the generator gets iters / ratio
    init: str = ""  # start from another run's weights (SD v1.5 stage 2 from stage 1)
    resume: bool = False  # continue this run folder's checkpoint exactly
    cache_latents: bool = False  # encode the real images once, before training
    t5: bool = True  # SD3: load its T5 text encoder (--no-t5: zeros in its place, as diffusers without it)
    seed: int = 0  # every random stream (runs.stream_seed); backward simulation's k is the same on every process
    log_every: int = 10  # one log line per this many iterations
    ckpt_every: int = 500  # iterations between checkpoints (always one at the end)
    sample_every: int = 500  # a grid of the first prompts, in samples/
    device: str = ""  # default: cuda if available
    # the generator (Sec. 4.4, 4.5, App. F.4)
    steps: int = 1  # 1: one step; N > 1: timesteps 999, 999 - 1000/N, ... (4: [999, 749, 499, 249])
    conditioning_timestep: int = 999  # the one-step generator's timestep (pure-noise input); SDXL: 399
    backward_simulation: bool = True  # multi-step inputs from G itself (Sec. 4.5); off: noised real latents
    real_prompts: bool = False  # the generator's prompts are the real images' captions (the authors' SDXL runs)
    mode: str = "full"  # full | lora (G is a LoRA on the teacher) | shared-lora (G and mu_fake both LoRAs)
    lora_rank: int = 64  # rank of each LoRA adapter (the paper's LoRA: 64)
    lora_alpha: float = 8.0  # LoRA alpha (the paper's: 8); an adapter's scale is alpha / rank
    # the algorithm (Sec. 4.2, 4.3)
    w: float = 1.75  # the teacher's guidance scale, uncond + w (cond - uncond)
    ratio: int = 10  # critic updates per generator update (TTUR)
    gan_g: float = 0.0  # generator's GAN loss weight (0: no GAN)
    gan_d: float = 0.0  # critic's classification loss weight
    lr: float = 1e-5  # AdamW lr of G and of mu_fake + head; betas (0.9, 0.999), weight decay 0.01
    lr_warmup: int = 8  # linear lr warm-up, in training iterations, for both optimisers
    max_grad_norm: float = 10.0  # gradient-norm clip of both updates
    # LPIPS regression warm-up of a one-step generator on teacher pairs (App. F.4)
    warmup_pairs: int = 0  # teacher (noise, image) pairs, split over processes; 0: no warm-up
    warmup_steps: int = 0  # LPIPS regression steps
    warmup_lr: float = 1e-5  # AdamW lr of the LPIPS regression
    warmup_teacher_steps: int = 50  # the teacher's Euler steps for each pair
    # speed and memory
    dist: str = "ddp"  # ddp | fsdp (full mode), under torchrun
    grad_checkpointing: bool = True  # recompute network blocks in backward: less memory, ~1/3 more compute


SD15 = dict(resolution=512, batch=32, steps=1, conditioning_timestep=999, w=1.75, ratio=10, lr_warmup=8)
# The authors' 500 warm-up steps advanced once per process per iteration: on 64 GPUs, about 8 iterations.
GAN_SDXL = dict(resolution=1024, batch=2, w=8.0, ratio=5, lr=5e-7, lr_warmup=8, gan_g=5e-3, gan_d=1e-2)
# SD3.5 Medium (no paper recipe): the teacher's own guidance 4.5, SenseFlow's lr 1e-6 and ratio 10, the GAN of SDXL's
GAN_SD35 = dict(resolution=1024, batch=2, w=4.5, ratio=10, lr=1e-6, lr_warmup=8, gan_g=5e-3, gan_d=1e-2)
PRESETS = {
    "sd15": dict(SD15, lr=1e-5, gan_g=0.0, gan_d=0.0, iters=40000),  # stage 1 (App. F.3)
    "sd15-stage2": dict(SD15, lr=5e-7, gan_g=1e-3, gan_d=1e-2, iters=5000),  # --init the stage-1 run
    "sdxl-4step": dict(GAN_SDXL, steps=4, iters=20000, real_prompts=True),
    "sdxl-1step": dict(GAN_SDXL, steps=1, conditioning_timestep=399, iters=25000, warmup_pairs=10000,
                       warmup_steps=2000, warmup_lr=1e-5),
    "sdxl-4step-lora": dict(GAN_SDXL, steps=4, iters=20000, mode="lora", lr=5e-5, lora_rank=64, lora_alpha=8.0,
                            real_prompts=True),
    "sd35m-4step": dict(GAN_SD35, steps=4, iters=20000, real_prompts=True),  # sigmas 1, 0.9, 0.75, 0.5
    "sd35m-1step": dict(GAN_SD35, steps=1, conditioning_timestep=999, iters=25000),
    "sd35m-4step-lora": dict(GAN_SD35, steps=4, iters=20000, mode="lora", lr=5e-5, real_prompts=True),
}
MODES, DISTS = ("full", "lora", "shared-lora"), ("ddp", "fsdp")


def parse_args(argv: list[str] | None = None) -> tuple[dict, argparse.Namespace]:
    """(the Config fields given on the command line, the arguments); a preset fills the others."""
    p = runs.ArgumentParser(description=__doc__.split("\n\n")[0])
    runs.add_config_flags(p, Config, {"preset": list(PRESETS), "mode": MODES, "dist": DISTS}, ", or the preset's")
    p.add_argument("--export", metavar="RUN", help="export a run folder or checkpoint (to --out, default RUN/export)")
    p.add_argument("--estimate-memory", action="store_true", help="peak GPU memory per process of this run, "
                   "computed on fake tensors (no GPU, no weights): --model's configs, or the built-in --arch")
    p.add_argument("--benchmark", action="store_true", help="time, FLOPs and peak memory of this run's training "
                   "iterations on the device, random weights from --model's configs or the built-in --arch")
    p.add_argument("--arch", choices=list(memory.ARCHS), default="sdxl", help="--estimate-memory, --benchmark "
                   "without --model")
    a = p.parse_args(argv)
    return runs.given_flags(a, Config), a


def make_config(given: dict) -> Config:
    """Preset + command line; with --resume, the run's own settings + what the command line changes."""
    out = Path(given.get("out", Config.out))
    if given.get("resume"):
        ck = runs.load_file(sd.find_checkpoint(str(out)), "checkpoint of train_t2i.py", mmap=True)
        fixed = ("model", "mode", "lora_rank", "lora_alpha", "resolution", "steps", "conditioning_timestep", "dist",
                 "t5")
        return runs.resumed_config(Config, ck["config"], ck["step"], given, fixed)
    runs.require(not (out / "checkpoint.pt").exists(), f"{out / 'checkpoint.pt'} exists: pass --resume to continue "
                 f"that run, or choose another --out")
    return Config(**{**PRESETS.get(given.get("preset", ""), {}), **given})


def validate(cfg: Config, world: int) -> None:
    """Clear errors for bad input, before anything heavy is loaded."""
    runs.require(bool(cfg.preset), f"--preset is required: one of {', '.join(PRESETS)}")
    check_family(cfg.preset, sd.family(cfg.model), cfg.model)
    read_prompts(cfg.prompts)
    runs.require(cfg.real_images or not needs_real(cfg), "--real-images is required: the GAN term (and the "
                 "no-backward-simulation ablation) needs real images with captions")
    runs.require(cfg.mode in MODES and cfg.dist in DISTS, f"--mode must be one of {MODES}, --dist one of {DISTS}")
    if cfg.dist == "fsdp" and cfg.mode != "full" and world > 1:
        raise ValueError("--dist fsdp shards full fine-tuning; LoRA modes use DDP (--dist ddp)")
    if cfg.steps < 1 or not 0 <= cfg.conditioning_timestep < 1000 or cfg.batch < 1 or cfg.iters < 1 or cfg.seed < 0:
        raise ValueError("need --steps >= 1, 0 <= --conditioning-timestep < 1000, --batch >= 1, --iters >= 1, "
                         "--seed >= 0")
    if cfg.warmup_pairs and cfg.steps != 1:
        raise ValueError("the LPIPS warm-up (--warmup-pairs) is for one-step generators (App. F.4)")
    if cfg.init:
        init = runs.load_file(sd.find_checkpoint(cfg.init), "checkpoint of train_t2i.py", mmap=True)["config"]
        if init.get("t5", True) != cfg.t5:
            raise ValueError(f"--init {cfg.init} was trained {'with' if init.get('t5', True) else 'without'} T5")
    elif cfg.preset == "sd15-stage2" and not cfg.resume:
        raise ValueError("--preset sd15-stage2 continues stage 1 (App. F.3): pass --init STAGE1_RUN")
    m = sd.downsampling(cfg.model)
    side = cfg.resolution // m
    if cfg.resolution % m or (needs_real(cfg) and (side < 4 or side & (side - 1))):
        raise ValueError(f"--resolution {cfg.resolution}: must be a multiple of {m} (VAE x network downsampling) with "
                         f"a power-of-two bottleneck of at least 4 for the GAN head, e.g. {m * 4}, {m * 8}, {m * 16}")


def check_family(preset: str, fam: str, model: str) -> None:
    names, want = {"sd15": "SD v1.5", "sdxl": "SDXL", "sd3": "SD3"}, "sd3" if preset.startswith("sd3") else preset[:4]
    runs.require(fam == want, f"--preset {preset} is for {names[want]}, but {model} is {names[fam]}-based")


def needs_real(cfg: Config) -> bool:
    return cfg.gan_g > 0 or cfg.gan_d > 0 or (cfg.steps > 1 and not cfg.backward_simulation) or cfg.real_prompts


def build_nets(cfg: Config, base: sd.Base, device: torch.device, world: int, new_net=None) -> sd.Nets:
    """G, mu_fake (+ GAN head) and the teacher in the chosen --mode (see sd.build_nets)."""
    return sd.build_nets(base, device, world, cfg.model, cfg.mode, cfg.lora_rank, cfg.lora_alpha,
                         cfg.gan_g > 0 or cfg.gan_d > 0, cfg.resolution, cfg.dist == "fsdp", cfg.grad_checkpointing,
                         cfg.seed, new_net)


# ----------------------------------------------------------------------------------------------------
# LPIPS regression warm-up of a one-step generator (App. F.4): a short regression onto teacher samples of the
# same noise, against SDXL one-step block-noise artefacts, before distribution matching.


@torch.no_grad()
def teacher_pairs(cfg: Config, base: sd.Base, prompts: list[str], path: Path, rank: int, world: int) -> dict:
    """This process's share of `warmup_pairs` (noise z, teacher latent, prompt), cached in the run folder."""
    if path.is_file():
        return runs.load_file(path, "teacher pair cache")
    pipe = sd.teacher_pipeline(base, cfg.model)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(runs.stream_seed(cfg.seed, "pairs", rank))
    n, latent = math.ceil(cfg.warmup_pairs / world), cfg.resolution // base.vae_factor
    pairs = {"z": [], "x": [], "prompts": []}
    # SD3: set_timesteps(N) would shift its sigmas twice (the last one 0.0089, not 0.0030): give them unshifted
    steps = {"sigmas": torch.linspace(1, 1 / 1000, cfg.warmup_teacher_steps).tolist()} if base.family == "sd3" else {}
    for i in tqdm(range(0, n, cfg.batch), desc="teacher pairs", disable=rank != 0):
        b = min(cfg.batch, n - i)
        p = [prompts[j] for j in torch.randint(len(prompts), (b,), generator=g).tolist()]
        z = torch.randn(b, base.latent_channels, latent, latent, generator=g)
        x = pipe(prompt=p, latents=z.to(base.net.device, base.net.dtype), height=cfg.resolution,
                 width=cfg.resolution, guidance_scale=cfg.w, num_inference_steps=cfg.warmup_teacher_steps,
                 output_type="latent", **steps).images
        pairs["z"].append(z.half()), pairs["x"].append(x.cpu().half()), pairs["prompts"].extend(p)
    pairs = {k: torch.cat(v) if k != "prompts" else v for k, v in pairs.items()}
    runs.save_atomic(pairs, path)
    return pairs


def load_lpips(device: torch.device) -> nn.Module:
    """LPIPS (VGG). torchvision downloads the VGG16 weights on first use; offline, a one-line error says where to
    put them."""
    import lpips

    try:
        return lpips.LPIPS(net="vgg", verbose=False).to(device).requires_grad_(False)
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        hub = Path(torch.hub.get_dir()) / "checkpoints" / "vgg16-397923af.pth"
        raise ValueError(f"LPIPS could not load torchvision's VGG16 weights ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120]}). Put https://download.pytorch.org/models/vgg16-397923af.pth "
                         f"at {hub} (and delete a partial file there, if any)") from None


def lpips_warmup(cfg: Config, base: sd.Base, nets: sd.Nets, pairs: dict, lp: nn.Module, device: torch.device,
                 rank: int) -> None:
    """LPIPS(decode(G(z, t)), decode(teacher(z))) on the pairs, through the VAE decoder (checkpointed)."""
    opt = torch.optim.AdamW(nets.G.params, lr=cfg.warmup_lr, betas=(0.9, 0.999), weight_decay=0.01)
    g = torch.Generator().manual_seed(runs.stream_seed(cfg.seed, "lpips", rank))
    base.vae.enable_gradient_checkpointing()
    for s in tqdm(range(cfg.warmup_steps), desc="LPIPS warm-up", disable=rank != 0):
        idx = torch.randint(len(pairs["z"]), (cfg.batch,), generator=g).tolist()
        z, x_teacher = pairs["z"][idx].float().to(device), pairs["x"][idx].float().to(device)
        cond = sd.encode_prompts(base, [pairs["prompts"][i] for i in idx], cfg.resolution)
        x = nets.G(z, torch.full((len(z),), cfg.conditioning_timestep, device=device), cond)
        with torch.no_grad():
            target = sd.to_pixels(base.vae, x_teacher)
        loss = lp(sd.to_pixels(base.vae, x), target).mean()  # images in [-1, 1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(nets.G.params, cfg.max_grad_norm)
        opt.step()
        if rank == 0 and (s + 1) % cfg.log_every == 0:
            tqdm.write(f"warm-up {s + 1:>6d}/{cfg.warmup_steps} | lpips {loss.item():.4f}")
    base.vae.disable_gradient_checkpointing()


# ----------------------------------------------------------------------------------------------------
# Training (Sec. 4.6): dmd2.train_iteration on batches of prompts, with the generator's input built here.


def generators(cfg: Config, rank: int, device: torch.device) -> dict[str, torch.Generator]:
    """Every random draw of training comes from these (saved in checkpoints, so resuming is exact)."""
    return {"noise": torch.Generator(device).manual_seed(runs.stream_seed(cfg.seed, "noise", rank)),
            "data": torch.Generator().manual_seed(runs.stream_seed(cfg.seed, "data", rank)),  # prompts, real images
            "k": torch.Generator().manual_seed(runs.stream_seed(cfg.seed, "k"))}  # backward simulation's: every rank's


def generator_input(cfg: Config, G: sd.Net, schedule: dmd2.Schedule, z: torch.Tensor, cond: dict,
                    gens: dict[str, torch.Generator], x_start: torch.Tensor | None = None):
    """(x_in, t_in): what the generator denoises this iteration, from noise z [B, 4, h, w]."""
    timesteps, n = sd.student_timesteps(cfg.steps, cfg.conditioning_timestep), len(z)
    if cfg.steps == 1:  # pure noise, conditioned on t = 999 (SD v1.5) or 399 (SDXL, App. F.4)
        return schedule.prior(z), torch.full((n,), timesteps[0], device=z.device)
    if cfg.backward_simulation:  # Sec. 4.5: G's own k-step sample, noised to t_k; one k for all ranks
        k = int(torch.randint(cfg.steps, (1,), generator=gens["k"]))
        return dmd2.backward_simulation(G, z, schedule, timesteps, k, cond, gens["noise"])
    # Table 4's ablation: real latents forward-noised to a random step each; pure noise at t = 999
    t_in = torch.tensor(timesteps, device=z.device)[torch.randint(cfg.steps, (n,), generator=gens["data"]).to(z.device)]
    x_in = schedule.add_noise(x_start, z, t_in)
    x_in[t_in == 999] = z[t_in == 999]
    return x_in, t_in


def train(cfg: Config) -> None:
    rank, world, device = runs.setup_distributed(cfg.device or None)
    out = Path(cfg.out)
    validate(cfg, world)
    prompts = read_prompts(cfg.prompts)
    images = CaptionedImages(cfg.real_images, cfg.resolution, rank, world) if needs_real(cfg) else None
    runs.prepare_run_folder(out)
    with runs.locked(out):
        loop(cfg, rank, world, device, prompts, images)
    if world > 1:
        dist.destroy_process_group()


def loop(cfg: Config, rank: int, world: int, device: torch.device, prompts: list[str],
         images: CaptionedImages | None) -> None:
    """Load the networks, optionally warm up with LPIPS, then DMD2 iterations with logs, samples and checkpoints."""
    out, master = Path(cfg.out), rank == 0
    ckpt_path, fsdp = out / "checkpoint.pt", cfg.dist == "fsdp"
    if master:
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    cuda = device.type == "cuda"
    lp = load_lpips(device) if cfg.warmup_pairs and cfg.warmup_steps and not cfg.resume else None
    base = sd.load_base(cfg.model, device, torch.bfloat16 if cuda else torch.float32, t5=cfg.t5)
    real = None
    if images is not None:
        cache = str(out / f"latents_{rank}of{world}.pt") if cfg.cache_latents else None
        real = sd.RealLatents(images, base.vae, cache, seed=runs.stream_seed(cfg.seed, "latents", rank))
    pairs = (teacher_pairs(cfg, base, prompts, out / f"warmup_pairs_{rank}of{world}.pt", rank, world)
             if lp is not None else None)  # before wrapping: a stock pipeline runs it
    nets = build_nets(cfg, base, device, world)
    opts = dict(zip(("g_opt", "c_opt"), memory.optimizers(nets, cfg.lr), strict=True))
    warm = lambda s: min(1.0, (s + 1) / max(cfg.lr_warmup, 1))  # noqa: E731
    scheds = {k: torch.optim.lr_scheduler.LambdaLR(o, warm) for k, o in opts.items()}
    gens = generators(cfg, rank, device)
    start, history, averages, watch = 0, [], runs.Averages(), runs.NonFinite()
    if cfg.init and not cfg.resume:
        sd.load_trainable(nets, runs.load_file(sd.find_checkpoint(cfg.init), "checkpoint of train_t2i.py",
                                               mmap=True)["nets"], fsdp)
    if cfg.resume:
        resume = runs.load_file(ckpt_path, "checkpoint of train_t2i.py", mmap=True)
        sd.load_trainable(nets, resume["nets"], fsdp)
        sd.optimizer_states(nets, opts, fsdp, load=resume["opts"])
        for k, s in scheds.items():
            s.load_state_dict(resume["scheds"][k])
        if len(resume["rng"]) == world:
            runs.set_rng_state(gens, resume["rng"][rank])
        elif master:
            print(f"resuming on {world} processes, not {len(resume['rng'])}: random streams restart")
        start, history = resume["step"], resume.get("history", [])
        averages.load_state_dict(resume["averages"][rank] if len(resume.get("averages", [])) == world else {})
        del resume
    log = runs.Log(out)
    log.restart(history)
    saved = [start if cfg.resume else None]  # the step of the last checkpoint written

    def save(step: int) -> None:  # every rank takes part (FSDP gathers); rank 0 writes
        state = {"kind": "text-to-image", "config": dataclasses.asdict(cfg), "step": step, "history": history,
                 "nets": sd.trainable_state(nets, fsdp), "opts": sd.optimizer_states(nets, opts, fsdp),
                 "scheds": {k: s.state_dict() for k, s in scheds.items()}, "rng": runs.gather(runs.rng_state(gens)),
                 "averages": runs.gather(averages.state_dict())}
        if master:
            runs.check_finite(((f"{k}.{n}", v) for k, sub in state["nets"].items() for n, v in sub.items()),
                              f"at iteration {step}: not written to {ckpt_path}")
            runs.save_atomic(state, ckpt_path)
        saved[0] = step
        runs.barrier()

    if pairs is not None:
        lpips_warmup(cfg, base, nets, pairs, lp, device, rank)
        save(0)
    hp = dmd2.TTUR(ratio=cfg.ratio, gan_g=cfg.gan_g, gan_d=cfg.gan_d, w=cfg.w, max_grad_norm=cfg.max_grad_norm)
    uncond, timesteps = sd.unconditional(base, cfg.resolution), sd.student_timesteps(cfg.steps,
                                                                                      cfg.conditioning_timestep)
    latent = cfg.resolution // base.vae_factor
    fixed = sd.encode_prompts(base, prompts[:4], cfg.resolution)  # the sample grid's prompts and noise
    grid = torch.Generator().manual_seed(runs.stream_seed(cfg.seed, "grid"))
    fixed_z = torch.randn(len(prompts[:4]), base.latent_channels, latent, latent, generator=grid)
    t0 = time.time()
    bar = tqdm(range(start, cfg.iters), initial=start, total=cfg.iters, disable=not master, desc=cfg.preset)
    for it in bar:
        # the batch: prompts for G, real latents and captions for D; text encoded once for both
        batch = [prompts[i] for i in torch.randint(len(prompts), (cfg.batch,), generator=gens["data"]).tolist()]
        x_real = captions = x_start = None
        if real is not None and (cfg.gan_g > 0 or cfg.gan_d > 0 or cfg.real_prompts):
            x_real, captions = real.batch(cfg.batch, gens["data"], gens["noise"])
        if cfg.real_prompts:  # the authors' SDXL runs: G generates for the real images' captions
            batch = list(captions)
        if cfg.steps > 1 and not cfg.backward_simulation:  # Table 4's ablation: G's input from real images
            x_start, batch = real.batch(cfg.batch, gens["data"], gens["noise"])
        gan = cfg.gan_g > 0 or cfg.gan_d > 0
        texts = batch + (captions if gan and not cfg.real_prompts else [])  # with real prompts they are the same
        cond = sd.encode_prompts(base, texts, cfg.resolution)
        cond, cond_real = sd.split(cond, cfg.batch) if len(texts) > cfg.batch else (cond, cond)
        z = torch.randn(cfg.batch, base.latent_channels, latent, latent, generator=gens["noise"], device=device)
        x_in, t_in = generator_input(cfg, nets.G, base.schedule, z, cond, gens, x_start)
        logs = dmd2.train_iteration(it, nets.G, nets.teacher, nets.fake, nets.head, opts["g_opt"], opts["c_opt"],
                                    base.schedule, x_in, t_in, cond, x_real if gan else None,
                                    cond_real if gan else None, hp, uncond, gens["noise"])
        for s in scheds.values():  # both schedules advance every iteration (warm-up counts iterations)
            s.step()
        logs = {k: getattr(v, "full_tensor", lambda v=v: v)().float() for k, v in logs.items()}  # FSDP: DTensors
        watch.add(logs, it + 1)
        averages.add(logs)
        if (it + 1) % cfg.log_every == 0 or (it + 1) % cfg.ckpt_every == 0 or it + 1 == cfg.iters:
            watch.check(f"{ckpt_path} (step {saved[0]})" if saved[0] is not None else "none was written yet")
        if (it + 1) % cfg.log_every == 0:
            row = dict(it=it + 1, lr=scheds["g_opt"].get_last_lr()[0]) | averages.pop()
            row["s_per_it"] = round((time.time() - t0) / cfg.log_every, 3)
            if cuda:
                row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            history.append(row)
            log.write(row)
            t0 = time.time()
        if (it + 1) % cfg.sample_every == 0 or it + 1 == cfg.iters:
            x0 = dmd2.sample(nets.G, fixed_z.to(device), base.schedule, timesteps, fixed,
                             torch.Generator(device).manual_seed(runs.stream_seed(cfg.seed, "grid steps")))
            if master:
                from torchvision.utils import save_image

                (out / "samples").mkdir(exist_ok=True)
                save_image(sd.decode(base, x0), out / "samples" / f"{it + 1:07d}.png", nrow=len(x0))
        if (it + 1) % cfg.ckpt_every == 0 or it + 1 == cfg.iters:
            save(it + 1)
    if master:
        sd.export(str(out))
        print(f"done: {ckpt_path}, export in {out / 'export'}")
    runs.barrier()


def measure(given: dict, arch: str, benchmark: bool) -> dict:
    """--estimate-memory (peak GiB by kind, support/memory.py) or --benchmark (on the device, support/benchmark.py) of
    the preset (default: sd15, sdxl-4step or sd35m-4step) and flags, from --model's configs or the built-in --arch."""
    fam, net_cfg, text_cfgs, vae_cfg = memory.configs(given.get("model"), arch, given.get("t5", True))
    preset = given.get("preset") or {"sd15": "sd15", "sdxl": "sdxl-4step", "sd3": "sd35m-4step"}[fam]
    check_family(preset, fam, given.get("model") or f"--arch {arch}")
    cfg = Config(**{**PRESETS[preset], **given, "preset": preset})
    hp = dmd2.TTUR(ratio=cfg.ratio, gan_g=cfg.gan_g, gan_d=cfg.gan_d, w=cfg.w)
    kw = dict(mode=cfg.mode, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha, resolution=cfg.resolution,
              batch=cfg.batch, hp=hp, lr=cfg.lr, timesteps=sd.student_timesteps(cfg.steps, cfg.conditioning_timestep),
              grad_checkpointing=cfg.grad_checkpointing)
    if benchmark:
        from support.benchmark import benchmark_t2i

        device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return benchmark_t2i(fam, net_cfg, text_cfgs, vae_cfg, device, **kw)
    gib = memory.estimate(fam, net_cfg, text_cfgs, vae_cfg, **kw)
    print(json.dumps({"arch": given.get("model") or arch, "preset": preset, "mode": cfg.mode, "batch": cfg.batch,
                      "resolution": cfg.resolution, "grad_checkpointing": cfg.grad_checkpointing,
                      **{k: round(v, 2) for k, v in gib.items()}}))
    return gib


def main(argv: list[str] | None = None) -> dict | None:
    given, args = parse_args(argv)
    with runs.one_line_errors(lambda: runs.checkpoint_note(Path(given.get("out", Config.out)) / "checkpoint.pt")):
        if args.export:
            print(f"exported to {sd.export(args.export, given.get('out'))}")
            return None
        if args.estimate_memory or args.benchmark:
            return measure(given, args.arch, args.benchmark)
        train(make_config(given))


if __name__ == "__main__":
    main()
