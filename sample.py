"""Images from a distilled DMD2 generator.

    python sample.py runs/mnist                                # a grid: a row per class, 10 samples each
    python sample.py runs/mnist --labels 3 7 --n 16 --seed 1 --out sevens.png
"""

from __future__ import annotations

import argparse
import os

import torch


def class_conditional(args: argparse.Namespace) -> str:
    """A grid from a train_imagenet.py run: a row per requested label, `--n` one-step samples each."""
    from torchvision.utils import save_image

    import dmd2
    from train_imagenet import autocast, load_generator

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    G, cfg = load_generator(args.source, device, ema=args.ema)
    labels = list(range(min(cfg.label_dim, 10))) if args.labels is None else args.labels
    bad = [y for y in labels if not 0 <= y < cfg.label_dim]
    if bad:
        raise SystemExit(f"--labels {bad}: this generator has classes 0..{cfg.label_dim - 1}")
    y = torch.tensor(labels, device=device).repeat_interleave(args.n)
    gen = torch.Generator(device).manual_seed(args.seed)
    channels = G.net.model.enc[next(iter(G.net.model.enc))].in_channels
    z = torch.randn(len(y), channels, cfg.resolution, cfg.resolution, generator=gen, device=device)
    images = []
    with torch.no_grad(), autocast(device):
        for i in range(0, len(y), args.batch):  # x = G(sigma_max z; sigma_max, label): one network evaluation
            images.append(dmd2.sample(G, z[i:i + args.batch], G.schedule, [G.schedule.T - 1], y[i:i + args.batch]))
    out = args.out or os.path.join(args.source if os.path.isdir(args.source) else os.path.dirname(args.source),
                                   "samples_cli.png")
    save_image(torch.cat(images).float() * 0.5 + 0.5, out, nrow=args.n, padding=1)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a train_imagenet.py run folder or checkpoint")
    p.add_argument("--labels", type=int, nargs="+", default=None, help="classes, a row each (default: first 10)")
    p.add_argument("--n", type=int, default=10, help="samples per class")
    p.add_argument("--ema", action="store_true", help="use the generator's EMA weights, if the run kept them")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--out", default=None, help="output PNG (default: <run>/samples_cli.png)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    args = p.parse_args(argv)
    if not os.path.exists(args.source):
        p.error(f"{args.source} does not exist")
    if args.n < 1 or args.batch < 1:
        p.error("--n and --batch must be >= 1")
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    try:
        out = class_conditional(args)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
