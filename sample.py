"""Sample from a DMD2 student, and evaluate it as the paper does.

Class-conditional (train_imagenet.py runs: ImageNet-64, the MNIST experiment): a grid, a row per label, of
one-step samples x = G(80 z; 80, label).

    python sample.py runs/mnist                                    # classes 0..9, 10 samples each
    python sample.py runs/mnist --labels 3 7 --n 16 --seed 1 --out sevens.png

Text-to-image (Sec. 5.2): SOURCE is a train_t2i.py run folder or checkpoint (it records its base model), an
exported folder, a diffusers UNet folder, a UNet state dict (.bin / .safetensors, like the released
`dmd2_sdxl_4step_unet_fp16.bin`) or LoRA weights; the last three need `--model BASE`. The student runs the
paper's sampler (Sec. 4.4, `dmd2.sample`): 1 step (t = 999, or 399 for SDXL) or 4 steps [999, 749, 499, 249].

    python sample.py runs/sdxl-4step --prompt "a photo of a cat" --out cat.png
    python sample.py dmd2_sdxl_4step_unet_fp16.bin --model stabilityai/stable-diffusion-xl-base-1.0 --steps 4 \
        --prompts prompts.txt --out samples/
    python sample.py runs/sdxl-4step --prompts coco10k.txt --eval --ref-images coco10k/ --out eval/   # App. G

Evaluation (App. G): FID with clean-fid on images centre-cropped and resized to --eval-res (256 px for SD v1.5,
Table 5; 512 px for SDXL, Table 2), patch FID on 299 px centre crops of the full-resolution images, and CLIP
score (cosine similarity) with OpenCLIP ViT-g-14.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import torch

import dmd2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("source", help="the student: run folder / checkpoint, exported or UNet folder, state dict, LoRA")
    p.add_argument("--seed", type=int, default=0)
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
    ev = p.add_argument_group("evaluation (App. G)")
    ev.add_argument("--eval", action="store_true", help="one image per prompt of --prompts, then FID, patch FID, CLIP")
    ev.add_argument("--ref-images", help="reference images (e.g. the COCO 2014 images of the prompts)")
    ev.add_argument("--eval-res", type=int, help="FID resolution (default: 256 for SD v1.5, 512 for SDXL)")
    ev.add_argument("--clip-model", default="ViT-g-14")
    ev.add_argument("--clip-pretrained", default="laion2b_s12b_b42k")
    args = p.parse_args(argv)
    if args.batch < 1 or args.n < 1:
        p.error("--batch and --n must be >= 1")
    return args


def checkpoint_kind(source: str) -> str:
    """'class-conditional' or 'text-to-image': the `kind` our training checkpoints record (a run folder's
    checkpoint.pt); any other source (UNet folders, state dicts, LoRA) is text-to-image."""
    path = Path(source)
    ckpt = path / "checkpoint.pt" if path.is_dir() else path
    if ckpt.suffix == ".pt" and ckpt.is_file():
        try:
            return torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True).get("kind", "text-to-image")
        except Exception as e:  # not a torch checkpoint at all
            raise SystemExit(f"{ckpt} is not a checkpoint of train_imagenet.py or train_t2i.py ({e})") from None
    return "text-to-image"


# ----------------------------------------------------------------------------------------------------
# Class-conditional


def class_conditional(args: argparse.Namespace) -> str:
    """A grid from a train_imagenet.py run: a row per requested label, `--n` one-step samples each."""
    from torchvision.utils import save_image

    from train_imagenet import autocast, load_generator

    device = torch.device(args.device)
    try:
        G, cfg = load_generator(args.source, device, ema=args.ema)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    labels = list(range(min(cfg.label_dim, 10))) if args.labels is None else args.labels
    bad = [y for y in labels if not 0 <= y < cfg.label_dim]
    if bad:
        raise SystemExit(f"--labels {bad}: this generator has classes 0..{cfg.label_dim - 1}")
    y = torch.tensor(labels, device=device).repeat_interleave(args.n)
    gen = torch.Generator(device).manual_seed(args.seed)
    channels = next(iter(G.net.model.enc.values())).in_channels
    z = torch.randn(len(y), channels, cfg.resolution, cfg.resolution, generator=gen, device=device)
    images = []
    with torch.no_grad(), autocast(device):
        for i in range(0, len(y), args.batch):  # x = G(sigma_max z; sigma_max, label): one network evaluation
            images.append(dmd2.sample(G, z[i:i + args.batch], G.schedule, [G.schedule.T - 1], y[i:i + args.batch]))
    out = args.out or os.path.join(args.source if os.path.isdir(args.source) else os.path.dirname(args.source),
                                   "samples_cli.png")
    save_image(torch.cat(images).float() * 0.5 + 0.5, out, nrow=args.n, padding=1)
    print(f"wrote {out}")
    return out


# ----------------------------------------------------------------------------------------------------
# Text-to-image


def read_lines(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise SystemExit(f"--prompts {path}: no such file")
    lines = [s.strip() for s in Path(path).read_text(encoding="utf-8").splitlines() if s.strip()]
    if not lines:
        raise SystemExit(f"--prompts {path}: no prompts in the file")
    return lines


def resolve_source(args: argparse.Namespace) -> tuple[str, dict, dict | None]:
    """(base model, metadata, our checkpoint or None) of SOURCE, without loading any network."""
    import train_t2i as t2i

    src = Path(args.source)
    if not src.exists():
        raise SystemExit(f"{args.source}: no such file or folder")
    ckpt = src / "checkpoint.pt" if src.is_dir() else src
    if ckpt.is_file() and ckpt.suffix == ".pt":  # a train_t2i.py checkpoint records its base and schedule
        c = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
        c["config"]["model"] = args.model or c["config"]["model"]
        cfg = t2i.Config(**c["config"])
        return cfg.model, {"timesteps": t2i.student_timesteps(cfg), "resolution": cfg.resolution}, c
    meta = json.loads((src / "dmd2.json").read_text()) if (src / "dmd2.json").is_file() else {}
    model = args.model or meta.get("model")
    if not model:
        raise SystemExit(f"{args.source}: pass --model, the base model these weights belong to")
    t2i.model_index(model)
    return model, meta, None


def load_student(args: argparse.Namespace, base, model: str, ckpt: dict | None, dtype: torch.dtype):
    """The student's UNet from any kind of SOURCE, on base's device."""
    from diffusers import UNet2DConditionModel

    import train_t2i as t2i

    device, src = base.vae.device, Path(args.source)
    if ckpt is not None:
        return t2i.load_student(ckpt, device, dtype)
    for folder in (src / "unet", src):  # a diffusers UNet folder (an export folder holds one in unet/)
        if (folder / "config.json").is_file():
            return UNet2DConditionModel.from_pretrained(str(folder), torch_dtype=dtype).to(device)
    lora = lora_file(src)
    if lora is not None:  # LoRA weights: loaded and fused as a user would, through a stock pipeline
        base.unet = t2i.load_unet(model, device, dtype)
        pipe = t2i.teacher_pipeline(base, model)
        pipe.load_lora_weights(str(lora), adapter_name="dmd2")
        pipe.fuse_lora(adapter_names=["dmd2"])
        return base.unet
    if src.is_dir():
        raise SystemExit(f"{src}: no UNet (config.json), LoRA weights or checkpoint (checkpoint.pt) in this folder")
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(model, subfolder="unet"))
    try:  # the released fp16 weights: a plain state dict of the base model's UNet
        unet.load_state_dict(read_state_dict(src), strict=True)
    except (RuntimeError, OSError, ValueError) as e:
        raise SystemExit(f"{src}: not a state dict of {model}'s UNet ({str(e).splitlines()[0]})") from e
    return unet.to(device) if dtype == torch.float32 else unet.to(device, dtype)


def read_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def lora_file(src: Path) -> Path | None:
    """The LoRA weights file of SOURCE, if it is one (a file or a folder with pytorch_lora_weights.*)."""
    files = [src] if src.is_file() else sorted(src.glob("pytorch_lora_weights.*"))
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), "pt") as s:
                if any("lora" in k for k in s.keys()):
                    return f
        elif f.suffix == ".bin" and any("lora" in k for k in torch.load(f, map_location="cpu", mmap=True)):
            return f
    return None


def timesteps_for(args: argparse.Namespace, meta: dict, sdxl: bool) -> list[int]:
    if args.timesteps:
        if not all(0 <= t < 1000 for t in args.timesteps):
            raise SystemExit("--timesteps must lie in [0, 1000)")
        return args.timesteps
    if args.steps:
        return ([399] if sdxl else [999]) if args.steps == 1 else dmd2.step_timesteps(args.steps)
    if "timesteps" in meta:
        return meta["timesteps"]
    raise SystemExit("pass --steps 1 or 4 (or --timesteps): these weights do not record their schedule")


def text_to_image(args: argparse.Namespace) -> torch.Tensor:
    """One image per prompt, [N, 3, H, W] in [0, 1], saved to --out (a folder, or one grid .png)."""
    from torchvision.utils import make_grid, save_image

    import train_t2i as t2i

    prompts = list(args.prompt) + (read_lines(args.prompts) if args.prompts else [])
    if not prompts:
        raise SystemExit("give --prompt TEXT (repeatable) or --prompts FILE")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, meta, ckpt = resolve_source(args)
    base = t2i.load_base(model, device, dtype, unet=False)
    timesteps = timesteps_for(args, meta, base.sdxl)
    unet = load_student(args, base, model, ckpt, dtype)
    G = t2i.EpsUNet(unet.requires_grad_(False), base.schedule)
    res = args.resolution or meta.get("resolution") or unet.config.sample_size * base.vae_factor
    latent = res // base.vae_factor
    images = []
    for b in range(0, len(prompts), args.batch):
        batch = prompts[b:b + args.batch]
        g = torch.Generator(device).manual_seed(args.seed + b)
        z = torch.randn(len(batch), unet.config.in_channels, latent, latent, generator=g, device=device)
        x0 = dmd2.sample(G, z, base.schedule, timesteps, t2i.encode_prompts(base, batch, res), g)
        images.append(t2i.decode(base, x0).cpu())
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


def centre_crop_resize(size: int | None):
    """The long edge centre-cropped to a square, then LANCZOS-resized to `size` (clean-fid's image hook)."""
    import numpy as np
    from PIL import Image

    def f(img: np.ndarray) -> np.ndarray:
        h, w = img.shape[:2]
        s = min(h, w)
        img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        return np.asarray(Image.fromarray(img).resize((size, size), Image.LANCZOS)) if size else img

    return f


def centre_patch(size: int = 299):
    def f(img):
        h, w = img.shape[:2]
        return img[(h - size) // 2:(h - size) // 2 + size, (w - size) // 2:(w - size) // 2 + size]

    return f


def fid_extractor(device: torch.device):
    """clean-fid's feature network; None: its default Inception-v3 (downloaded on first use)."""
    return None


def load_clip(name: str, pretrained: str, device: torch.device):
    """(model, image preprocess, tokenizer) from open_clip."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


@torch.no_grad()
def clip_score(folder: Path, prompts: list[str], args: argparse.Namespace) -> float:
    """Mean cosine similarity of image and prompt embeddings (the paper's 0.33 scale)."""
    from PIL import Image

    device = torch.device(args.device)
    model, preprocess, tokenizer = load_clip(args.clip_model, args.clip_pretrained, device)
    crop, scores = centre_crop_resize(256), []
    import numpy as np

    for b in range(0, len(prompts), args.batch):
        idx = range(b, min(b + args.batch, len(prompts)))
        imgs = torch.stack([preprocess(Image.fromarray(crop(np.asarray(Image.open(folder / f"{i:05d}.png")
                                                                                 .convert("RGB")))))
                            for i in idx]).to(device)
        fi = torch.nn.functional.normalize(model.encode_image(imgs).float(), dim=-1)
        ft = torch.nn.functional.normalize(model.encode_text(tokenizer([prompts[i] for i in idx]).to(device))
                                           .float(), dim=-1)
        scores.append((fi * ft).sum(-1).cpu())
    return torch.cat(scores).mean().item()


def evaluate(args: argparse.Namespace) -> dict:
    """Generate one image per prompt into --out, then FID, patch FID and CLIP score against --ref-images."""
    from cleanfid import fid

    if not args.prompts or not args.ref_images or not os.path.isdir(args.ref_images):
        raise SystemExit("--eval needs --prompts FILE and --ref-images FOLDER")
    if Path(args.out).suffix == ".png":
        raise SystemExit("--eval writes one image per prompt: --out must be a folder")
    images = text_to_image(args)
    out, device = Path(args.out), torch.device(args.device)
    res = images.shape[-1]
    eval_res = args.eval_res or (512 if res >= 1024 else 256)
    kw = dict(mode="clean", device=device, num_workers=0, batch_size=args.batch, verbose=False,
              custom_feat_extractor=fid_extractor(device), use_dataparallel=False)
    metrics = {"images": len(images), "resolution": res, "eval_res": eval_res,
               "fid": fid.compute_fid(str(out), args.ref_images, custom_image_tranform=centre_crop_resize(eval_res),
                                      **kw)}
    if res >= 299:  # patch FID (Table 2): detail at full resolution
        metrics["patch_fid"] = fid.compute_fid(str(out), args.ref_images, custom_image_tranform=centre_patch(299), **kw)
    else:
        print(f"patch FID skipped: images are {res} px, smaller than the 299 px patch")
    metrics["clip_score"] = clip_score(out, read_lines(args.prompts), args)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(json.dumps(metrics))
    return metrics


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    if not os.path.exists(args.source):
        raise SystemExit(f"{args.source}: no such file or folder")
    if checkpoint_kind(args.source) == "class-conditional":
        if args.eval:
            raise SystemExit("--eval is for text-to-image; evaluate a class-conditional run with "
                             "`python train_imagenet.py --out RUN --eval-only`")
        return class_conditional(args)
    args.out = args.out or "samples"
    return evaluate(args) if args.eval else text_to_image(args)


if __name__ == "__main__":
    main()
