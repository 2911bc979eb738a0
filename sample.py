"""Images from a DMD2 student (ours, or the released DMD2 weights), and the paper's text-to-image evaluation.

    python sample.py runs/mnist --labels 3 7 --n 16 --out sevens.png           # class-conditional: a row per label
    python sample.py runs/sdxl-4step --prompt "a photo of a cat" --out cat.png  # text-to-image: one grid
    python sample.py dmd2_sdxl_4step_unet_fp16.bin --model stabilityai/stable-diffusion-xl-base-1.0 --steps 4 \
        --prompts prompts.txt --out samples/
    python sample.py runs/sdxl-4step --prompts coco10k.txt --eval --ref-images coco10k/ --out eval/   # App. G

SOURCE is a run folder or checkpoint of either training script (it records its base model and timesteps), or, for
text-to-image, an export folder, a diffusers UNet or SD3 transformer folder, a state dict (.bin / .safetensors) or
LoRA weights (these three need --model). The student runs the paper's sampler (Sec. 4.4, `dmd2.sample`) at its
timesteps. Evaluation (App. G): clean-fid FID at --eval-res (256 px for SD v1.5, Table 5; 512 px for SDXL, Table 2),
patch FID on 299 px centre crops, CLIP score with OpenCLIP ViT-g-14.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import safetensors.torch
import torch

import dmd2
from support import metrics, runs, sd
from support.data import read_prompts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = runs.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("source", help="the student: run folder / checkpoint, exported or UNet folder, state dict, LoRA")
    p.add_argument("--seed", type=int, default=0, help="text-to-image: the i-th batch of --batch prompts is the stock "
                   "diffusers pipeline's\nimages with generator=torch.Generator(device).manual_seed(SEED + i) (SD3: "
                   "called without a generator\nafter torch.manual_seed(SEED + i): its latents and step noise from "
                   "that one stream;\ndocs/text-to-image.md)")
    p.add_argument("--out", help="a folder (one PNG per image), or a .png path for one grid (default: samples/; "
                   "class-conditional: <run>/samples_cli.png)")
    p.add_argument("--batch", type=int, default=4, help="images per network call")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    cc = p.add_argument_group("class-conditional")
    cc.add_argument("--labels", type=int, nargs="+", help="classes, a row each (default: the first 10)")
    cc.add_argument("--n", type=int, default=10, help="samples per class")
    cc.add_argument("--ema", action="store_true", help="the generator's EMA weights, if the run kept them")
    t2i = p.add_argument_group("text-to-image")
    t2i.add_argument("--model", help="base model id or folder (default: the one the run recorded)")
    t2i.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    t2i.add_argument("--prompts", help="a file of prompts, one per line")
    t2i.add_argument("--steps", type=int, help="1 or 4: [999] ([399] for SDXL) or [999, 749, 499, 249]")
    t2i.add_argument("--timesteps", type=int, nargs="+", help="explicit timesteps, e.g. 999 749 499 249")
    t2i.add_argument("--resolution", type=int, help="image side in pixels (default: the run's, or the model's)")
    t2i.add_argument("--no-t5", action="store_true", help="SD3: without T5 (zeros in its place), for a student "
                     "distilled with --no-t5\n(its run and export folders record it; other sources need this flag)")
    ev = p.add_argument_group("evaluation (App. G)")
    ev.add_argument("--eval", action="store_true", help="one image per prompt of --prompts, then FID, patch FID, CLIP")
    ev.add_argument("--ref-images", help="reference images (e.g. the COCO 2014 images of the prompts)")
    ev.add_argument("--eval-res", type=int, help="FID resolution (default: 256 for SD v1.5, 512 for SDXL)")
    ev.add_argument("--clip-model", default="ViT-g-14")
    ev.add_argument("--clip-pretrained", default="laion2b_s12b_b42k")
    args = p.parse_args(argv)
    if args.batch < 1 or args.n < 1 or args.seed < 0:
        p.error("--batch and --n must be >= 1, --seed >= 0")
    return args


# ----------------------------------------------------------------------------------------------------
# Class-conditional


def class_conditional(args: argparse.Namespace) -> str:
    """A grid from a train_imagenet.py run: a row per requested label (ten rows for an unconditional run), `--n`
    samples each, at the run's steps (`--steps 4`: dmd2.sample at 999, 749, 499, 249)."""
    from support.edm import load_generator, save_grid

    G, cfg = load_generator(args.source, torch.device(args.device), ema=args.ema)
    label_dim, resolution = cfg["label_dim"], cfg["resolution"]
    runs.require(label_dim or args.labels is None, "--labels: this generator is unconditional")
    labels = (list(range(min(label_dim, 10))) or [0] * 10) if args.labels is None else args.labels
    bad = [y for y in labels if not 0 <= y < max(label_dim, 1)]
    runs.require(not bad, f"--labels {bad}: this generator has classes 0..{label_dim - 1}")
    channels = next(iter(G.net.model.enc.values())).in_channels
    out = args.out or os.path.join(args.source if os.path.isdir(args.source) else os.path.dirname(args.source),
                                   "samples_cli.png")
    save_grid(G, labels, args.n, channels, resolution, args.seed, out, args.batch,
              timesteps=dmd2.step_timesteps(cfg.get("steps", 1)))
    print(f"wrote {out}")
    return out


# ----------------------------------------------------------------------------------------------------
# Text-to-image


def resolve_source(args: argparse.Namespace) -> tuple[str, dict, dict | None]:
    """(base model, metadata, our checkpoint or None) of SOURCE, without loading any network."""
    src = Path(args.source)  # it exists: main's check_source ran first
    ckpt = src / "checkpoint.pt" if src.is_dir() else src
    if ckpt.is_file() and ckpt.suffix == ".pt":  # a train_t2i.py checkpoint records its base and schedule
        c = runs.load_file(ckpt, "checkpoint of train_t2i.py", mmap=True)
        cfg = c["config"]
        cfg["model"] = args.model or cfg["model"]
        return cfg["model"], {"timesteps": sd.student_timesteps(cfg["steps"], cfg["conditioning_timestep"]),
                              "resolution": cfg["resolution"], "t5": cfg.get("t5", True)}, c
    # an export folder's dmd2.json, also for the weights it lists (transformer/ or unet/, the fp16 and LoRA files)
    own, parent = src / "dmd2.json", src.parent / "dmd2.json"
    meta = json.loads((own if own.is_file() else parent).read_text()) if own.is_file() or parent.is_file() else {}
    meta = meta if own.is_file() or src.name in meta.get("files", []) else {}
    model = args.model or meta.get("model")
    runs.require(model, f"{args.source}: pass --model, the base model these weights belong to")
    return model, meta, None  # load_base checks the model (sd.model_index) first


def load_student(args: argparse.Namespace, base, model: str, ckpt: dict | None, dtype: torch.dtype):
    """The student's network (UNet or SD3 transformer) from any kind of SOURCE, on base's device, with no LoRA layers
    left: a LoRA generator is fused into the base weights (one with its peft layers switched off, as the teacher
    runs, would be the teacher)."""
    device, src, kind = base.vae.device, Path(args.source), sd.subfolder(base.family)
    cls = sd.network_class(base.family)
    if ckpt is not None:
        return sd.load_student(ckpt, device, dtype)
    for folder in (src / kind, src):  # a diffusers model folder (an export folder holds one in unet/ or transformer/)
        if (folder / "config.json").is_file():
            return cls.from_pretrained(str(folder), torch_dtype=dtype).to(device)
    lora = lora_file(src)
    if lora is not None:  # LoRA weights: loaded and fused as a user would, through a stock pipeline
        base.net = sd.load_net(model, device, dtype)
        pipe = sd.teacher_pipeline(base, model)
        pipe.load_lora_weights(str(lora), adapter_name="dmd2")
        pipe.fuse_lora(adapter_names=["dmd2"])
        pipe.unload_lora_weights()  # the fused weights stay; the peft layers go
        return base.net
    if src.is_dir():
        raise ValueError(f"{src}: no {kind} (config.json), LoRA weights or checkpoint (checkpoint.pt) in this folder")
    net = cls.from_config(cls.load_config(model, subfolder=kind))
    try:  # the released fp16 weights: a plain state dict of the base model's network
        state = (safetensors.torch.load_file(str(src)) if src.suffix == ".safetensors" else
                 torch.load(src, map_location="cpu", weights_only=True))
        net.load_state_dict(state, strict=True)
    except (RuntimeError, OSError, ValueError) as e:
        raise ValueError(f"{src}: not a state dict of {model}'s {kind} ({str(e).splitlines()[0]})") from e
    return net.to(device) if dtype == torch.float32 else net.to(device, dtype)


def lora_file(src: Path) -> Path | None:
    """The LoRA weights file of SOURCE, if it is one (a file or a folder with pytorch_lora_weights.*)."""
    files = [src] if src.is_file() else sorted(src.glob("pytorch_lora_weights.*"))
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), "pt") as s:
                if any("lora" in k for k in s.keys()):
                    return f
        elif f.suffix == ".bin" and any("lora" in k for k in torch.load(f, map_location="cpu", mmap=True,
                                                                             weights_only=True)):
            return f
    return None


def timesteps_for(args: argparse.Namespace, meta: dict, family: str) -> list[int]:
    if args.timesteps:
        runs.require(all(0 <= t < 1000 for t in args.timesteps), "--timesteps must lie in [0, 1000)")
        return args.timesteps
    if args.steps:
        return ([399] if family == "sdxl" else [999]) if args.steps == 1 else dmd2.step_timesteps(args.steps)
    if "timesteps" in meta:
        return meta["timesteps"]
    raise ValueError("pass --steps 1 or 4 (or --timesteps): these weights do not record their schedule")


def text_to_image(args: argparse.Namespace) -> torch.Tensor:
    """One image per prompt, [N, 3, H, W] in [0, 1], saved to --out (a folder, or one grid .png)."""
    from torchvision.utils import make_grid, save_image

    prompts = list(args.prompt) + (read_prompts(args.prompts) if args.prompts else [])
    runs.require(prompts, "give --prompt TEXT (repeatable) or --prompts FILE")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, meta, ckpt = resolve_source(args)
    base = sd.load_base(model, device, dtype, net=False, t5=meta.get("t5", True) and not args.no_t5)
    timesteps = timesteps_for(args, meta, base.family)
    unet = load_student(args, base, model, ckpt, dtype)
    G = sd.Denoiser(unet.requires_grad_(False), base.schedule)
    res = args.resolution or meta.get("resolution") or unet.config.sample_size * base.vae_factor
    multiple = base.vae_factor * sd.net_factor(unet.config)
    if res % multiple:
        raise ValueError(f"--resolution {res}: must be a multiple of {multiple} (VAE x network downsampling)")
    latent = res // base.vae_factor
    images = []
    for i, b in enumerate(range(0, len(prompts), args.batch)):
        batch = prompts[b:b + args.batch]
        # the stock pipeline's streams: a generator for the latents and the step noise (UNets), or for SD3, whose
        # pipeline passes none to its scheduler, torch's global one, seeded per batch, for both
        g = None if base.family == "sd3" else torch.Generator(device).manual_seed(args.seed + i)
        if g is None:
            torch.manual_seed(args.seed + i)
        z = torch.randn(len(batch), unet.config.in_channels, latent, latent, generator=g, device=device)
        x0 = dmd2.sample(G, z, base.schedule, timesteps, sd.encode_prompts(base, batch, res), g)
        images.append(sd.decode(base, x0).cpu())
    images = torch.cat(images)
    out = Path(args.out)
    if out.suffix == ".png":
        out.parent.mkdir(parents=True, exist_ok=True)
        save_image(make_grid(images, nrow=math.ceil(math.sqrt(len(images)))), out)
    else:
        out.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            save_image(img, out / f"{i:05d}.png")
        (out / "prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    print(f"{len(images)} images ({res} px, timesteps {timesteps}) -> {out}")
    return images


# ----------------------------------------------------------------------------------------------------
# Evaluation (App. G): clean-fid FID and patch FID, OpenCLIP ViT-g-14 CLIP score.


def evaluate(args: argparse.Namespace) -> dict:
    """Generate one image per prompt into --out, then FID, patch FID and CLIP score against --ref-images."""
    if not args.prompts or not args.ref_images or not os.path.isdir(args.ref_images):
        raise ValueError("--eval needs --prompts FILE and --ref-images FOLDER")
    runs.require(Path(args.out).suffix != ".png", "--eval writes one image per prompt: --out must be a folder")
    images = text_to_image(args)
    out, device, res = Path(args.out), torch.device(args.device), images.shape[-1]
    eval_res = args.eval_res or (512 if res >= 1024 else 256)
    fid = metrics.folder_fid(out, args.ref_images, metrics.centre_crop_resize(eval_res), device, args.batch)
    results = {"images": len(images), "resolution": res, "eval_res": eval_res, "fid": fid}
    if res >= 299:  # patch FID (Table 2): detail at full resolution
        results["patch_fid"] = metrics.folder_fid(out, args.ref_images, metrics.centre_patch(299), device, args.batch)
    else:
        print(f"patch FID skipped: images are {res} px, smaller than the 299 px patch")
    clip = metrics.load_clip(args.clip_model, args.clip_pretrained, device)
    results["clip_score"] = metrics.clip_score(out, read_prompts(args.prompts), clip, device, args.batch)
    (out / "metrics.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results))
    return results


def check_source(source: str) -> str:
    """'class-conditional' or 'text-to-image' (the `kind` our training checkpoints record; any other student is
    text-to-image), or a one-line error for a SOURCE that holds no student."""
    src = Path(source)
    runs.require(src.exists(), f"{source}: no such file or folder")
    students = ("checkpoint.pt", "config.json", "dmd2.json", "unet/config.json", "transformer/config.json")
    if src.is_dir() and not any((src / f).is_file() for f in students) and lora_file(src) is None:
        raise ValueError(f"{source}: no student here: expected a run folder (checkpoint.pt), an export or diffusers "
                         f"model folder (config.json, dmd2.json), or LoRA weights (pytorch_lora_weights.*)")
    ckpt = src / "checkpoint.pt" if src.is_dir() else src
    if ckpt.suffix == ".pt" and ckpt.is_file():
        return runs.load_file(ckpt, "checkpoint of train_imagenet.py or train_t2i.py", mmap=True).get(
            "kind", "text-to-image")
    return "text-to-image"


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    with runs.one_line_errors():
        if check_source(args.source) == "class-conditional":
            runs.require(not args.eval, "--eval is for text-to-image; evaluate a class-conditional run with "
                         "`python train_imagenet.py --out RUN --eval-only`")
            if args.out and (os.path.isdir(args.out) or not os.path.isdir(os.path.dirname(args.out) or ".")):
                raise ValueError(f"--out {args.out}: give a .png file path in an existing folder (one grid)")
            return class_conditional(args)
        args.out = args.out or "samples"
        if os.path.isfile(args.out) and Path(args.out).suffix != ".png":
            raise ValueError(f"--out {args.out} is a file: give a folder (one PNG per image) or a .png path (a grid)")
        return evaluate(args) if args.eval else text_to_image(args)


if __name__ == "__main__":
    main()
