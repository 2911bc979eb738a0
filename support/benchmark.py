"""Time, FLOPs and memory of one DMD2 generator update (a generator step and its ratio - 1 critic-only
steps) on random weights: nothing is downloaded.

    python train_imagenet.py --benchmark                  # ImageNet-64 ADM: 296M, batch 40, bf16 (CPU: 32 ch., batch 4)
    python train_imagenet.py --benchmark --teacher net.pkl --batch 64 --compile   # an EDM pickle's network, compiled
    python train_t2i.py --benchmark --arch sdxl --mode shared-lora --batch 1 --resolution 1024   # SDXL's config

Rows run interleaved after a warm-up update each (a compiled row's warm-up is its compile time). The FLOPs of one
update are counted on the update itself with torch.utils.flop_counter's formulas (matrix products, convolutions,
attention; forward and backward, recomputation included), so FLOP/s = FLOPs / median time and, on a GPU of known peak,
the fraction of its dense bf16 peak. Also: peak memory, host synchronisations per update (CUDA's sync debug mode),
the time by operator family (torch.profiler), and one-step against teacher sampling throughput.
"""

from __future__ import annotations

import json
import re
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

import dmd2
from support import edm, memory, sd
from support.edm import EDMDenoiser
from support.runs import autocast, is_main

# dense bf16 matrix throughput from the vendors' datasheets, TFLOP/s (the first name contained in the device's wins)
PEAK_BF16 = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "H20": 148.0, "A100": 312.0, "L40S": 362.1,
             "RTX 4090": 165.2, "A10": 125.0, "L4": 121.0}
FAMILIES = [("attention", r"attention|flash|efficient_attention|softmax|bmm|baddbmm|einsum"),
            ("convolution", r"conv|cudnn"), ("matmul", r"addmm|\bmm\b|linear|matmul"),
            ("normalization", r"norm"), ("optimizer", r"_foreach|adam"), ("copies", r"copy|\bto\b|contiguous|\bcat\b")]


class FlopCount(TorchDispatchMode):
    """FlopCounterMode's per-operator formulas (torch.utils.flop_counter.flop_registry: matrix products,
    convolutions, attention, forward and backward) summed over every operator run, without its module tracker, which
    follows each module call and slows to a crawl on the UNets' early-stopped, checkpointed forwards."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        formula = flop_registry.get(func.overloadpacket)
        if formula is not None:
            self.total += formula(*args, **(kwargs or {}), out_val=out)
        return out


def count_flops(fn: Callable[[], None]) -> int:
    with FlopCount() as counter:
        fn()
    return counter.total


def host_syncs(fn: Callable[[], None], device: torch.device) -> dict | None:
    """Host synchronisations during fn (CUDA's sync debug mode warns at each): how many, and the code lines that
    made them; None on the CPU."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    where = [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    return {"count": len(where), "where": sorted(set(where))}


def time_by_family(fn: Callable[[], None], device: torch.device) -> dict[str, float]:
    """Share of the device (CPU: host) self time of each operator family over one call of fn, in percent: the time
    of each PyTorch operator (aten::...), its kernels' on a GPU, by the operator's name, not the kernels'."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for e in prof.key_averages():
        if e.device_type != DeviceType.CPU:  # kernels: counted in their operators' device time
            continue
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        family = next((f for f, pattern in FAMILIES if re.search(pattern, e.key.lower())), "elementwise and other")
        totals[family] = totals.get(family, 0.0) + us
    total = sum(totals.values()) or 1.0
    return {k: round(100 * v / total, 1) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def measure(rows: dict[str, Callable[[], None]], update: Callable[[], None], device: torch.device, updates: int,
            flops_row: str) -> dict:
    """rows: name -> configure(); each row's warm-up seconds, then `updates` interleaved timed updates per row
    (median), FLOPs of one update (counted on `flops_row`), FLOP/s, fraction of peak, peak memory."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    def timed() -> float:
        sync()
        t = time.perf_counter()
        update()
        sync()
        return time.perf_counter() - t

    def progress(what: str) -> None:  # to stderr: where a long or failing benchmark is
        gib = f", {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB peak" if device.type == "cuda" else ""
        print(f"benchmark: {what}{gib}", file=sys.stderr, flush=True)

    warmup = {}
    for name, configure in rows.items():
        configure()
        warmup[name] = round(timed(), 2)
        progress(f"{name} warm-up {warmup[name]} s")
    rows[flops_row]()
    flops = count_flops(update)
    progress(f"{flops / 1e12:.1f} TFLOP per update")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(updates):
        for name, configure in rows.items():
            configure()
            times[name].append(timed())
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in device_name), None)  # None on the CPU
    median = {k: statistics.median(v) for k, v in times.items()}
    memory_gib = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else
                  resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
    rows[flops_row]()
    return dict(device=device_name, threads=torch.get_num_threads(), flops_per_update=flops, seconds_per_update=median,
                seconds_each=times, warmup_or_compile_s=warmup,
                tflop_per_s={k: float(f"{flops / s / 1e12:.4g}") for k, s in median.items()},
                fraction_of_bf16_peak={k: round(flops / s / 1e12 / peak, 3) for k, s in median.items()} if peak
                else None, peak_memory_gib=round(memory_gib, 2), host_syncs_per_update=host_syncs(update, device),
                time_by_family=time_by_family(update, device))


# ----------------------------------------------------------------------------------------------------
# train_imagenet.py --benchmark: EDM's ADM (or a pickle's network), plain and fused attention, compiled


def benchmark(device: torch.device, hp: dmd2.TTUR, lr: float, updates: int = 2, teacher: str | None = None,
              compile: bool = False, batch: int | None = None, channels: int | None = None) -> dict:
    """One generator update with EDM's explicit attention ("plain": einsum + float32 softmax), with
    F.scaled_dot_product_attention ("fused") and, if `compile`, fused and torch.compiled. teacher: an EDM network
    pickle (path or URL) instead of the ADM architecture, at its own resolution, channels and classes."""
    gpu = device.type == "cuda"
    b, width = batch or (40 if gpu else 4), channels or (192 if gpu else 32)
    torch.manual_seed(0)
    if teacher is None:
        net, px, img, label_dim = edm.Precond(edm.ADMUNet(64, 3, 1000, channels=width)).to(device), 64, 3, 1000
    else:
        net = edm.edm_teacher(teacher).to(device)
        px, img, label_dim = net.img_resolution, net.img_channels, net.label_dim
    schedule = dmd2.EDMSchedule()
    teacher_den = EDMDenoiser(net.requires_grad_(False), schedule, label_dim).eval()
    G, critic = edm.build_students(net, schedule, label_dim, img, px, hp.gan_g > 0 or hp.gan_d > 0, 0, device)
    g_opt, c_opt = (torch.optim.AdamW(m.parameters(), lr=lr, foreach=True) for m in (G, critic))  # as train_imagenet.py
    z, y = torch.randn(b, img, px, px, device=device), torch.randint(0, max(label_dim, 1), (b,), device=device)
    t_in = torch.full((b,), schedule.T - 1, device=device)
    dens, compiled = (G, critic.fake, teacher_den), {}
    if compile:
        edm.compile_networks(*dens)
        compiled = {id(d.net): d.net._compiled_call_impl for d in dens}

    def configure(row: str) -> Callable[[], None]:  # attention kernel, compiled or eager calls of every network
        def apply():
            for d in dens:
                edm.fuse_attention(d.net, row != "plain")
                d.net._compiled_call_impl = compiled.get(id(d.net)) if row == "fused + compiled" else None
        return apply

    def update():  # one generator update and its ratio - 1 critic-only updates
        for it in range(hp.ratio):
            with autocast(device):
                dmd2.train_iteration(it, G, teacher_den, critic, critic.head, g_opt, c_opt, schedule,
                                     schedule.prior(z), t_in, y, torch.randn_like(z), y, hp=hp)

    rows = {row: configure(row) for row in ["plain", "fused"] + ["fused + compiled"] * compile}
    res = measure(rows, update, device, updates, "fused")
    if compile:
        x = torch.randn(2, img, px, px, device=device)
        res["graph_breaks"] = torch._dynamo.explain(G.net.forward)(
            x, torch.ones(2, device=device), torch.eye(label_dim, device=device)[:2] if label_dim else None
        ).graph_break_count

    def throughput(fn, n_batches: int) -> float:
        with torch.no_grad(), autocast(device):
            fn(z, y)
            t = time.perf_counter()
            for _ in range(n_batches):
                fn(z, y)
            if gpu:
                torch.cuda.synchronize()
        return round(n_batches * b / (time.perf_counter() - t), 2)

    res = dict(network=teacher or f"ADMUNet 64 px, {width} channels, random weights", batch=b,
               params_m=round(sum(p.numel() for p in net.parameters()) / 1e6, 1)) | res
    res |= dict(speedup_vs_plain={k: round(res["seconds_per_update"]["plain"] / v, 3)
                                  for k, v in res["seconds_per_update"].items()},
                one_step_images_per_s=throughput(edm.few_step(G, [schedule.T - 1]), 3),
                teacher_35nfe_images_per_s=throughput(edm.teacher_sampler(net, label_dim, 35, True), 1))
    if is_main():
        print(json.dumps(res, indent=1))
    return res


# ----------------------------------------------------------------------------------------------------
# train_t2i.py --benchmark: a text-to-image run's networks from the model's configs, random weights


def benchmark_t2i(fam: str, net_cfg: dict, text_cfgs: list[dict], vae_cfg: dict, device: torch.device, *, mode: str,
                  lora_rank: int, lora_alpha: float, resolution: int, batch: int, timesteps: list[int],
                  hp: dmd2.TTUR, lr: float, grad_checkpointing: bool, updates: int = 2) -> dict:
    """Seconds per training iteration (a generator update / ratio), FLOPs, peak memory of train_t2i.py's loop with
    the networks `sd.build_nets` makes in `mode`, bf16 autocast on a GPU (random conditions, no text encoding)."""
    torch.manual_seed(0)
    base = memory.build_base(fam, net_cfg, text_cfgs, vae_cfg, device)
    nets = sd.build_nets(base, device, 1, "", mode, lora_rank, lora_alpha, hp.gan_g > 0 or hp.gan_d > 0, resolution,
                         grad_checkpointing=grad_checkpointing,
                         new_net=lambda: type(base.net).from_config(net_cfg).to(device))
    g_opt, c_opt = memory.optimizers(nets, lr)
    with torch.device(device):
        cond = memory.random_conditions(base, text_cfgs, batch, resolution)
    built = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
    print(f"benchmark: networks built{f', {built:.1f} GiB' if built else ''}", file=sys.stderr, flush=True)

    def update():
        with torch.device(device):
            memory.iterations(hp.ratio, nets, base, cond, g_opt, c_opt, resolution, batch, timesteps, hp)

    res = measure({"eager": lambda: None}, update, device, updates, "eager")
    res = dict(arch=fam, mode=mode, batch=batch, resolution=resolution, grad_checkpointing=grad_checkpointing,
               memory_after_build_gib=built and round(built, 2),
               trainable_m=round(sum(p.numel() for p in nets.G.params + nets.fake.params) / 1e6, 1),
               seconds_per_iteration=round(res["seconds_per_update"]["eager"] / hp.ratio, 3)) | res
    if is_main():
        print(json.dumps(res, indent=1))
    return res


# ----------------------------------------------------------------------------------------------------
# tools/gpu_check.sh: its sections' JSON (the scripts' --benchmark output) as one file and one table


def gpu_table(sections: str, out: str) -> str:
    """Every SECTION.json in `sections` (the JSON a benchmark printed last, or nothing if it failed) into
    out/gpu_check.json, and the markdown table of docs/performance.md into out/gpu_check.md (returned)."""
    from pathlib import Path

    results = {}
    for f in sorted(Path(sections).glob("*.json")):
        text = f.read_text()
        start = text.find("\n{") + 1 if not text.startswith("{") else 0
        results[f.stem] = json.loads(text[start:]) if "{" in text else {"failed": "no result (see sections.log)"}
    lines = ["| check | s per generator update | s per iteration | TFLOP/s | of dense bf16 peak | peak GiB |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        for row, s in r.get("seconds_per_update", {}).items():
            frac = (r.get("fraction_of_bf16_peak") or {}).get(row)
            compile_s = f" (compile {r['warmup_or_compile_s'][row]:.0f} s)" if "compiled" in row else ""
            lines.append(f"| {name}: {row}{compile_s} | {s:.3f} | {r.get('seconds_per_iteration', s / 5):.3f} | "
                         f"{r['tflop_per_s'][row]:.4g} | {'' if frac is None else f'{100 * frac:.1f} %'} | "
                         f"{r['peak_memory_gib']} |")
    lines += [f"\n{name}, device time by operator family (fused): " + ", ".join(f"{k} {v} %" for k, v in
                                                                              r["time_by_family"].items())
              for name, r in results.items() if "time_by_family" in r and name.startswith("adm")]
    if "tflop_per_s" in results.get("matmul", {}):
        lines.append(f"\nmatrix product, {results['matmul']['n']}^3: {results['matmul']['tflop_per_s']} TFLOP/s")
    table = "\n".join(lines) + "\n"
    Path(out, "gpu_check.json").write_text(json.dumps(results, indent=1))
    Path(out, "gpu_check.md").write_text(table)
    return table
