"""Text-to-image tests that take longer: two torchrun processes (gloo, CPU) with DDP and with FSDP2
(fully_shard), and the memory estimate on fake tensors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_pipelines import tiny_sd3, tiny_sdxl, write_image_folder

import train_t2i as T
from support import sd

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    (root / "prompts.txt").write_text("a cat\nthe dog and a cat\nred car\nblue sky\n")
    return {"model": str(tiny_sdxl(root / "sdxl")), "prompts": str(root / "prompts.txt"),
            "real": str(write_image_folder(root / "real", 6)), "sd3": str(tiny_sd3(root / "sd3"))}


def torchrun(setup, out: Path, *args: str) -> dict:
    """Two processes of train_t2i.py; returns each rank's weights at its last checkpoint."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "t2i_dist_worker.py"), str(out), "--model", setup["model"], "--prompts",
           setup["prompts"], "--real-images", setup["real"], "--resolution", "32", "--batch", "2", "--ratio", "2",
           "--out", str(out / "run"), "--log-every", "1", *args]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return {rank: torch.load(out / f"rank{rank}.pt") for rank in (0, 1) if (out / f"rank{rank}.pt").exists()}


def same(a: dict, b: dict, atol: float = 0.0) -> bool:
    return a.keys() == b.keys() and all(a[k].keys() == b[k].keys() and all(
        torch.allclose(a[k][n].float(), b[k][n].float(), atol=atol, rtol=0) for n in a[k]) for k in a)


FAST = ("--lr", "1e-3", "--lr-warmup", "1")  # updates far larger than the comparisons' tolerance (the presets' lr
# 1e-6 over an 8-iteration warm-up moves no weight by more than ~4e-7: an FSDP that applied none would pass)


def moved(weights: dict, model: str) -> float:
    """The largest change of a generator weight from the teacher's."""
    teacher = sd.load_net(model, torch.device("cpu")).state_dict()
    return max((teacher[n.removeprefix("net.")] - v).abs().max().item() for n, v in weights["G"].items())


def update_gap(a: dict, b: dict, model: str) -> float:
    """How far run a's updates of the generator and the fake score (both start from the teacher) are from run b's,
    relative to b's: about 1e-4 from the order of float sums (AdamW amplifies it where a gradient is near zero),
    1.0 for a run that applied no update."""
    teacher = sd.load_net(model, torch.device("cpu")).state_dict()
    gaps = []
    for k in ("G", "fake"):
        da, db = (torch.cat([(w[k][n].float() - teacher[n.removeprefix("net.")]).flatten() for n in b[k]])
                  for w in (a, b))
        gaps.append(((da - db).norm() / db.norm()).item())
    return max(gaps)


def test_ddp_and_fsdp_full_fine_tuning(setup, tmp_path):
    """DDP ends with identical weights on both ranks (each rank saw other data); FSDP2 ends with the same weights
    as DDP, and resuming it from a checkpoint is exact."""
    ddp = torchrun(setup, tmp_path / "ddp", "--preset", "sdxl-4step", "--dist", "ddp", "--iters", "3", *FAST)
    assert same(ddp[0], ddp[1]) and set(ddp[0]) == {"G", "fake", "head"} and moved(ddp[0], setup["model"]) > 1e-3
    fsdp = torchrun(setup, tmp_path / "fsdp", "--preset", "sdxl-4step", "--dist", "fsdp", "--iters", "3", *FAST)
    assert fsdp[0].keys() == ddp[0].keys() and update_gap(fsdp[0], ddp[0], setup["model"]) < 2e-3
    assert same({"head": fsdp[0]["head"]}, {"head": ddp[0]["head"]}, atol=1e-6)
    torchrun(setup, tmp_path / "fsdp2", "--preset", "sdxl-4step", "--dist", "fsdp", "--iters", "2", *FAST)
    resumed = torchrun(setup, tmp_path / "fsdp2", "--preset", "sdxl-4step", "--dist", "fsdp", "--iters", "3",
                       "--resume")
    assert same(resumed[0], fsdp[0])


def test_sd3_fsdp_equals_ddp(setup, tmp_path):
    """SD3's transformer sharded block by block (FSDP2) trains to DDP's weights, its GAN head too."""
    sd3 = dict(setup, model=setup["sd3"])
    ddp = torchrun(sd3, tmp_path / "ddp", "--preset", "sd35m-4step", "--dist", "ddp", "--iters", "2", *FAST)
    fsdp = torchrun(sd3, tmp_path / "fsdp", "--preset", "sd35m-4step", "--dist", "fsdp", "--iters", "2", *FAST)
    assert same(ddp[0], ddp[1]) and moved(ddp[0], setup["sd3"]) > 1e-3 and set(ddp[0]) == {"G", "fake", "head"}
    assert fsdp[0].keys() == ddp[0].keys() and update_gap(fsdp[0], ddp[0], setup["sd3"]) < 2e-3
    assert same({"head": fsdp[0]["head"]}, {"head": ddp[0]["head"]}, atol=1e-6)


def test_ddp_shared_lora(setup, tmp_path):
    w = torchrun(setup, tmp_path / "lora", "--preset", "sdxl-4step-lora", "--mode", "shared-lora", "--lora-rank", "4",
                 "--lr", "1e-3", "--iters", "3")
    assert same(w[0], w[1]) and all(".generator." in n for n in w[0]["G"]) and all(".fake." in n for n in w[0]["fake"])
    assert max(v.abs().max() for n, v in w[0]["G"].items() if "lora_B" in n) > 0, "the generator adapter trained"


def test_memory_estimate_counts_every_tensor(setup):
    """train_t2i.py --estimate-memory against an independent count: bf16 frozen weights, fp32 adapters and head,
    AdamW's two moments, fp32 gradients."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.set_num_threads(1)
    gib = T.main(["--estimate-memory", "--model", setup["model"], "--mode", "shared-lora", "--resolution", "32",
                  "--batch", "1"])
    unet = UNet2DConditionModel.from_pretrained(setup["model"], subfolder="unet")
    frozen = sum(p.numel() for p in unet.parameters()) + sum(
        p.numel() for cls, sub in ((CLIPTextModel, "text_encoder"), (CLIPTextModelWithProjection, "text_encoder_2"))
        for p in cls.from_pretrained(setup["model"], subfolder=sub).parameters())
    vae = sum(p.numel() for p in AutoencoderKL.from_pretrained(setup["model"], subfolder="vae").parameters())
    r = T.Config().lora_rank  # LoRA params: r (in k k + out) per targeted Linear / Conv2d
    targets = sd.LORA_TARGETS["unet"]
    lora = sum(r * (m.weight[0].numel() + m.weight.shape[0]) for n, m in unet.named_modules()
               if isinstance(m, torch.nn.Linear | torch.nn.Conv2d) and any(n.endswith(t) for t in targets))
    head = sum(p.numel() for p in T.dmd2.GANHead(64, 4).parameters())
    trainable = 2 * lora + head
    assert gib["Parameter"] * 2**30 == 2 * frozen + 4 * vae + 4 * trainable
    assert 8 * trainable <= gib["Optstate"] * 2**30 <= 12.1 * trainable  # + AdamW's transient buffers
    assert gib["Total"] * 2**30 >= (2 * frozen + 4 * vae + 16 * trainable)  # + gradients + activations
