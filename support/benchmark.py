"""Time and network calls of one DMD2 generator update on the ImageNet-64 ADM architecture (random weights).

`python train_imagenet.py --benchmark` runs `benchmark`: on a GPU the paper's size (192 channels, 296M parameters,
40 images per GPU, bf16 autocast); on a CPU a reduced one (32 channels, batch 4, fp32).
"""

from __future__ import annotations

import json
import resource
import time

import torch

import dmd2
from support.edm import ADMUNet, EDMDenoiser, Precond, build_students, one_step, teacher_sampler
from support.runs import autocast, is_main


class CallCounter:
    """Counts a network's forward passes, full or encoder-only, with or without gradient (forward hooks)."""

    def __init__(self, den: EDMDenoiser, name: str, counts: dict):
        self.name, self.counts = name, counts
        den.net.register_forward_pre_hook(lambda m, a: self._add("encoder-only", "total"))
        next(iter(den.net.model.dec.values())).register_forward_pre_hook(lambda m, a: self._add("full", "encoder-only"))

    def _add(self, kind: str, undo: str) -> None:
        grad = "grad" if torch.is_grad_enabled() else "no grad"
        self.counts[(self.name, kind, grad)] = self.counts.get((self.name, kind, grad), 0) + 1
        if undo != "total":  # a call that reaches the decoder is full, not encoder-only
            self.counts[(self.name, undo, grad)] -= 1




def benchmark(device: torch.device, hp: dmd2.TTUR, lr: float, updates: int = 3) -> dict:
    """Time per generator update (1 generator step + its `ratio` critic steps), network calls of each kind,
    peak memory, and one-step vs teacher sampling throughput."""
    gpu = device.type == "cuda"
    channels, b = (192, 40) if gpu else (32, 4)
    torch.manual_seed(0)
    net = Precond(ADMUNet(64, 3, 1000, channels=channels)).to(device)
    schedule = dmd2.EDMSchedule()
    teacher = EDMDenoiser(net.requires_grad_(False), schedule, 1000).eval()
    G, critic = build_students(net, schedule, 1000, 3, 64, hp.gan_g > 0 or hp.gan_d > 0, 0, device)
    counts: dict = {}
    for den, name in [(G, "generator"), (teacher, "teacher"), (critic.fake, "fake score")]:
        CallCounter(den, name, counts)
    g_opt = torch.optim.AdamW(G.parameters(), lr=lr)
    c_opt = torch.optim.AdamW(critic.parameters(), lr=lr)
    z, y = torch.randn(b, 3, 64, 64, device=device), torch.randint(0, 1000, (b,), device=device)
    t_in = torch.full((b,), schedule.T - 1, device=device)

    def update():  # one generator update and its ratio critic updates
        for it in range(hp.ratio):
            with autocast(device):
                dmd2.train_iteration(it, G, teacher, critic, critic.head, g_opt, c_opt, schedule,
                                     schedule.prior(z), t_in, y, torch.randn_like(z), y, hp=hp)

    def sync():
        if gpu:
            torch.cuda.synchronize()

    update()  # warm-up (allocations, optimizer states)
    counts.clear()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    sync()
    t = time.time()
    for _ in range(updates):
        update()
    sync()
    per_update = (time.time() - t) / updates
    calls = {" / ".join(k): v / updates for k, v in sorted(counts.items()) if v}
    if gpu:
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:  # the process's peak resident memory (KiB on Linux)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    def throughput(fn, n_batches: int) -> float:
        with torch.no_grad(), autocast(device):
            fn(z, y)
            sync()
            t = time.time()
            for _ in range(n_batches):
                fn(z, y)
            sync()
        return n_batches * b / (time.time() - t)

    res = dict(device=str(torch.cuda.get_device_name() if gpu else "cpu"), channels=channels, batch=b,
               params_m=round(sum(p.numel() for p in net.parameters()) / 1e6, 1),
               seconds_per_generator_update=per_update,
               calls_per_generator_update=calls, peak_memory_gib=round(peak, 2),
               one_step_images_per_s=throughput(one_step(G), 3),
               teacher_35nfe_images_per_s=throughput(teacher_sampler(net, 1000, 35, True), 1))
    if is_main():
        print(json.dumps(res, indent=1))
    return res
