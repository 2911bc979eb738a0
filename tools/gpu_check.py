"""The prepared GPU check: about 8 minutes on one GPU, nothing downloaded (networks from configs, random weights).

    python tools/gpu_check.py OUT                          # on a GPU machine (tools/gpu_check.sh runs this)
    python tools/gpu_check.py OUT --sections sdxl,cifar10  # some sections (--budget S: another time budget)
    python tools/gpu_check.py OUT --smoke                  # the same with tiny networks on the CPU (a test)

Sections, each in its own process with a time limit, most important first: the GPU's measured bf16 matrix rate;
the paper-scale generator update (EDM's ImageNet-64 ADM from a pickle in EDM's format, 296M, batch 40) with EDM's
attention ("plain"), fused, and fused without cuDNN's autotuning; SDXL and SD3.5 Medium in the shared-LoRA mode on
one GPU at 1024 px (their real configurations); the CIFAR-10 recipe's network (EDM's DDPM++, batch 64); the same
update on our ADMUNet (EDM's ADM layout and size, no pickle to write) fused and torch.compiled (its compile time is
the compiled row's warm-up); the ADM update at batch 80.
Writes OUT/gpu_check.json (every number) and OUT/gpu_check.md (the table for docs/performance.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
NETS = Path(tempfile.gettempdir()) / "dmd2_gpu_check"  # the networks' pickles and tiny pipelines (not in OUT)
BUDGET_S = 480  # the whole check (--budget S); each section gets min(its own limit, what is left)
SECTIONS = {"matmul": 40, "adm": 170, "sdxl": 75, "sd35m": 75, "cifar10": 60, "adm_compiled": 200, "adm_batch80": 100}


def edm_network(which: str, smoke: bool) -> Path:
    """EDM's ImageNet-64 ADM (296M) or CIFAR-10 DDPM++ (55.7M with its augmentation input) configuration with random
    weights, pickled in EDM's format by tests/edm_pickles.py (written once; tiny ones with --smoke)."""
    from edm_pickles import EDM_CONFIGS, edm_pickle

    path = NETS / f"{which}{'_smoke' * smoke}.pkl"
    if not path.is_file():
        if smoke:
            edm_pickle(path, EDM_CONFIGS["adm" if which == "adm" else "ddpmpp"][0], 10, 16, 3,
                       **EDM_CONFIGS["adm" if which == "adm" else "ddpmpp"][1])
        elif which == "adm":
            edm_pickle(path, "DhariwalUNet", 1000, 64, 3)
        else:
            edm_pickle(path, "SongUNet", 10, 32, 3, model_channels=128, channel_mult=[2, 2, 2], augment_dim=9,
                       embedding_type="positional", encoder_type="standard", decoder_type="standard",
                       channel_mult_noise=1, resample_filter=[1, 1])
    return path


def run_section(name: str, out: Path, smoke: bool) -> dict:
    """One section, in this process (the parent runs each in a child)."""
    import torch

    import dmd2
    from support import benchmark

    device = torch.device("cpu" if smoke else "cuda")
    if name == "matmul":
        n, dtype = (256, torch.float32) if smoke else (8192, torch.bfloat16)
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        times = []
        for _ in range(13):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            a @ b
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return {"n": n, "tflop_per_s": round(2 * n**3 / sorted(times[3:])[5] / 1e12, 1)}
    if name.startswith("adm") or name == "cifar10":
        pkl = None if name == "adm_compiled" else edm_network("cifar10" if name == "cifar10" else "adm", smoke)
        batch = {"adm": 40, "adm_compiled": 40, "adm_batch80": 80, "cifar10": 64}[name] // (20 if smoke else 1)
        hp = dmd2.TTUR(gan_g=3e-3, gan_d=1e-2)
        rows = ("plain", "fused", "fused, no autotuning") if name == "adm" else ("fused",)
        return benchmark.benchmark(device, hp, 2e-6, teacher=pkl and str(pkl), batch=batch, rows=rows,
                                   compile=name == "adm_compiled", channels=8 if smoke and not pkl else None)
    import train_t2i as T  # sdxl, sd35m

    if smoke:
        from tiny_pipelines import tiny_sd3, tiny_sdxl

        model = str((tiny_sdxl if name == "sdxl" else tiny_sd3)(NETS / f"tiny_{name}"))
        given = dict(model=model, resolution=32, batch=1, device="cpu", lora_rank=4)
    else:
        given = dict(resolution=1024, batch=1)
    given |= dict(preset="sdxl-4step-lora" if name == "sdxl" else "sd35m-4step", mode="shared-lora")
    return T.measure(given, name, benchmark=True)


def table(results: dict) -> str:
    """The markdown table of the check (one row per measured configuration) and the ADM update's time by family."""
    lines = ["| check | s per generator update | s per iteration | TFLOP/s | of dense bf16 peak | peak GiB |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "seconds_per_update" not in r:
            continue
        for row, s in r["seconds_per_update"].items():
            frac = (r.get("fraction_of_bf16_peak") or {}).get(row)
            per_it = r.get("seconds_per_iteration", round(s / 5, 3))
            compile_s = f" (compile {r['warmup_or_compile_s'][row]:.0f} s)" if "compiled" in row else ""
            lines.append(f"| {name}: {row}{compile_s} | {s:.3f} | {per_it:.3f} | {r['tflop_per_s'][row]:.4g} | "
                         f"{'' if frac is None else f'{100 * frac:.1f} %'} | {r['peak_memory_gib']} |")
    for name in ("adm", "adm_compiled"):
        if "time_by_family" in results.get(name, {}):
            lines += ["", f"{name} (fused, eager), device time by operator family: " + ", ".join(
                f"{k} {v} %" for k, v in results[name]["time_by_family"].items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    out, smoke = Path(sys.argv[1]), "--smoke" in sys.argv
    names = sys.argv[sys.argv.index("--sections") + 1].split(",") if "--sections" in sys.argv else list(SECTIONS)
    budget = float(sys.argv[sys.argv.index("--budget") + 1]) if "--budget" in sys.argv else BUDGET_S
    if "--section" in sys.argv:
        name = sys.argv[sys.argv.index("--section") + 1]
        (NETS / f"{name}.json").write_text(json.dumps(run_section(name, out, smoke), indent=1))
        return
    out.mkdir(parents=True, exist_ok=True)
    NETS.mkdir(exist_ok=True)
    for old in NETS.glob("*.json"):  # a section's result is read only if this run wrote it
        old.unlink()
    start, results = time.time(), {}
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for name in names:
        limit, left = SECTIONS[name], budget - (time.time() - start)
        if left < 20:
            results[name] = {"skipped": "the check's time budget was spent"}
            continue
        t = time.time()
        cmd = [sys.executable, __file__, str(out), "--section", name] + ["--smoke"] * smoke
        try:
            with open(out / "sections.log", "a") as log:  # every section's own output, for when one fails
                log.write(f"==== {name}\n")
                log.flush()
                proc = subprocess.run(cmd, env=env, timeout=min(limit, left), stdout=log, stderr=subprocess.STDOUT)
            ok = proc.returncode == 0 and (NETS / f"{name}.json").is_file()
            results[name] = json.loads((NETS / f"{name}.json").read_text()) if ok else {
                "error": (out / "sections.log").read_text().strip().splitlines()[-1:]}
        except subprocess.TimeoutExpired:
            results[name] = {"timeout_s": round(min(limit, left))}
        results[name]["section_s"] = round(time.time() - t, 1)
        print(f"{name}: {results[name]['section_s']} s", {k: v for k, v in results[name].items()
                                                           if k in ("error", "timeout_s", "tflop_per_s")}, flush=True)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1))
    (out / "gpu_check.md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
