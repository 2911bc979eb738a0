"""Time and network calls of one DMD2 generator update on the ImageNet-64 ADM architecture (random weights).

`python train_imagenet.py --benchmark` runs `benchmark`: on a GPU the paper's size (192 channels, 296M parameters,
40 images per GPU, bf16 autocast); on a CPU a reduced one (32 channels, batch 4, fp32). It compares EDM's explicit
attention with F.scaled_dot_product_attention (support.edm.fuse_attention), the latter also in channels-last
memory format (support.edm.channels_last) and, optionally, torch.compiled.
"""

from __future__ import annotations

import json
import resource
import statistics
import time

import torch

import dmd2
from support import edm
from support.edm import EDMDenoiser
from support.runs import autocast, is_main


class CallCounter:
    """Counts a network's forward passes, full or encoder-only, with or without gradient (forward hooks)."""

    def __init__(self, den: EDMDenoiser, name: str, counts: dict):
        self.name, self.counts = name, counts
        self.handles = [
            den.net.register_forward_pre_hook(lambda m, a: self._add("encoder-only", "total")),
            next(iter(den.net.model.dec.values())).register_forward_pre_hook(
                lambda m, a: self._add("full", "encoder-only"))]

    def _add(self, kind: str, undo: str) -> None:
        grad = "grad" if torch.is_grad_enabled() else "no grad"
        self.counts[(self.name, kind, grad)] = self.counts.get((self.name, kind, grad), 0) + 1
        if undo != "total":  # a call that reaches the decoder is full, not encoder-only
            self.counts[(self.name, undo, grad)] -= 1

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def benchmark(device: torch.device, hp: dmd2.TTUR, lr: float, updates: int = 2, teacher: str | None = None,
              compile: bool = False) -> dict:
    """Time per generator update (1 generator step + its `ratio - 1` critic-only steps) with EDM's explicit
    attention ("plain": einsum + float32 softmax), with F.scaled_dot_product_attention ("fused"), fused with
    the networks in channels-last memory format ("fused + channels-last"), and, if `compile`, fused with the
    networks torch.compiled ("fused + compiled"; the compile time is not counted):
    the rows run interleaved, `updates` times each, after one warm-up update each. Also the network calls of
    each kind per update, peak memory, and one-step vs teacher sampling throughput (fused).

    teacher: an EDM network pickle (path or URL) to time instead of the ADM architecture with random weights,
    at its own resolution, channels and classes."""
    gpu = device.type == "cuda"
    channels, b = (192, 40) if gpu else (32, 4)
    torch.manual_seed(0)
    if teacher is None:
        net, px, img, label_dim = edm.Precond(edm.ADMUNet(64, 3, 1000, channels=channels)).to(device), 64, 3, 1000
    else:
        net = edm.edm_teacher(teacher).to(device)
        px, img, label_dim = net.img_resolution, net.img_channels, net.label_dim
    schedule = dmd2.EDMSchedule()
    teacher_den = EDMDenoiser(net.requires_grad_(False), schedule, label_dim).eval()
    G, critic = edm.build_students(net, schedule, label_dim, img, px, hp.gan_g > 0 or hp.gan_d > 0, 0, device)
    g_opt = torch.optim.AdamW(G.parameters(), lr=lr, foreach=True)  # as train_imagenet.py
    c_opt = torch.optim.AdamW(critic.parameters(), lr=lr, foreach=True)
    z, y = torch.randn(b, img, px, px, device=device), torch.randint(0, max(label_dim, 1), (b,), device=device)
    t_in = torch.full((b,), schedule.T - 1, device=device)
    dens = (G, critic.fake, teacher_den)
    rows = ["plain", "fused", "fused + channels-last"] + (["fused + compiled"] * compile)
    compiled = {}
    if compile:
        edm.compile_networks(*dens)
        compiled = {id(d.net): d.net._compiled_call_impl for d in dens}

    def configure(row: str) -> int:  # attention kernel, memory format, compiled or eager calls of every network
        n = sum(edm.fuse_attention(d.net, row != "plain") for d in dens)
        edm.channels_last(*dens, critic, on=row == "fused + channels-last")
        for d in dens:
            d.net._compiled_call_impl = compiled.get(id(d.net)) if row == "fused + compiled" else None
        return n

    def update():  # one generator update and its ratio critic updates
        for it in range(hp.ratio):
            with autocast(device):
                dmd2.train_iteration(it, G, teacher_den, critic, critic.head, g_opt, c_opt, schedule,
                                     schedule.prior(z), t_in, y, torch.randn_like(z), y, hp=hp)

    def sync():
        if gpu:
            torch.cuda.synchronize()

    counts: dict = {}
    names = ["generator", "fake score", "teacher"]
    counters = [CallCounter(den, name, counts) for den, name in zip(dens, names, strict=True)]
    attention_blocks = configure("plain") // len(dens)  # per network
    update()  # warm-up (allocations, optimizer states), and the network calls of one update
    calls = {" / ".join(k): v for k, v in sorted(counts.items()) if v}
    for c in counters:
        c.remove()
    for row in rows[1:]:
        configure(row)
        update()  # warm-up; compiles the compiled row's networks
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    times: dict[str, list[float]] = {row: [] for row in rows}
    for _ in range(updates):
        for row in rows:
            configure(row)
            sync()
            t = time.perf_counter()
            update()
            sync()
            times[row].append(time.perf_counter() - t)
    per_update = {row: statistics.median(ts) for row, ts in times.items()}
    if gpu:
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:  # the process's peak resident memory (KiB on Linux)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    configure("fused")

    def throughput(fn, n_batches: int) -> float:
        with torch.no_grad(), autocast(device):
            fn(z, y)
            sync()
            t = time.perf_counter()
            for _ in range(n_batches):
                fn(z, y)
            sync()
        return n_batches * b / (time.perf_counter() - t)

    res = dict(device=str(torch.cuda.get_device_name() if gpu else "cpu"), threads=torch.get_num_threads(),
               network=teacher or f"ADMUNet 64 px, {channels} channels, random weights", batch=b,
               params_m=round(sum(p.numel() for p in net.parameters()) / 1e6, 1), attention_blocks=attention_blocks,
               seconds_per_generator_update=per_update,
               speedup_vs_plain={row: per_update["plain"] / s for row, s in per_update.items()},
               seconds_each=times, calls_per_generator_update=calls, peak_memory_gib=round(peak, 2),
               one_step_images_per_s=throughput(edm.one_step(G), 3),
               teacher_35nfe_images_per_s=throughput(edm.teacher_sampler(net, label_dim, 35, True), 1))
    if is_main():
        print(json.dumps(res, indent=1))
    return res
