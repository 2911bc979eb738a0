"""Text-to-image: train_t2i.py and sample.py on tiny random SD v1.5- and SDXL-shaped pipelines (tests/tiny_pipelines).

Conditioning is checked against diffusers' own pipelines, the denoiser against the epsilon formula, the shared-base
LoRA mode against three separate UNets, and the scripts end to end (train, resume, export, sample)."""

import copy
import io
import json
import urllib.error
from pathlib import Path

import pytest
import torch
from diffusers import (
    DDPMScheduler,
    LCMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from tiny_pipelines import write_image_folder

import dmd2
import sample
import train_t2i as T
from support import sd
from support.data import CaptionedImages


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny networks: thread start-up costs more than the work, and the CI box has two busy cores
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cond(base, prompts=("a cat", "the dog")):
    return sd.encode_prompts(base, list(prompts), 32)


# ----------------------------------------------------------------------------------------------------
# Conditioning and the teacher's guidance, against diffusers' pipelines


def test_sd15_condition_is_the_pipelines(pipes):
    base = sd.load_base(pipes["sd15"], torch.device("cpu"), net=False)
    pipe = StableDiffusionPipeline.from_pretrained(pipes["sd15"])
    cond, neg = pipe.encode_prompt(["a cat", "the dog"], "cpu", 1, True)  # negative: embedding of ""
    c, u = _cond(base), sd.unconditional(base, 32)
    assert base.family == "sd15" and set(c) == set(u) == {"encoder_hidden_states"}
    torch.testing.assert_close(c["encoder_hidden_states"], cond)
    torch.testing.assert_close(u["encoder_hidden_states"], neg[:1])
    assert u["encoder_hidden_states"].abs().sum() > 0, "SD v1.5's uncond is the embedding of '', not zeros"


def test_sdxl_condition_is_the_pipelines(pipes):
    base = sd.load_base(pipes["sdxl"], torch.device("cpu"), net=False)
    pipe = StableDiffusionXLPipeline.from_pretrained(pipes["sdxl"])
    cond, neg, pooled, neg_pooled = pipe.encode_prompt(["a cat", "the dog"], device="cpu", num_images_per_prompt=1,
                                                       do_classifier_free_guidance=True)
    c, u = _cond(base), sd.unconditional(base, 32)
    assert base.family == "sdxl" and c["encoder_hidden_states"].shape == (2, 16, 64)  # penultimate states of both
    torch.testing.assert_close(c["encoder_hidden_states"], cond)
    torch.testing.assert_close(c["text_embeds"], pooled)
    ids = pipe._get_add_time_ids((32, 32), (0, 0), (32, 32), torch.float32, text_encoder_projection_dim=32)
    torch.testing.assert_close(c["time_ids"], ids.expand(2, 6))
    assert c["time_ids"][0].tolist() == [32, 32, 0, 0, 32, 32]  # [H, W, 0, 0, H, W]
    assert neg.abs().sum() == neg_pooled.abs().sum() == 0  # the pipeline's own zero uncond
    assert u["encoder_hidden_states"].abs().sum() == u["text_embeds"].abs().sum() == 0
    torch.testing.assert_close(u["time_ids"], c["time_ids"][:1])


def test_denoiser_is_x0_from_epsilon_and_bottleneck_is_mid_block(pipes):
    base = sd.load_base(pipes["sdxl"], torch.device("cpu"))
    unet, c = base.net, _cond(base)
    g = torch.Generator().manual_seed(0)
    x_t, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999, 10])
    abar = DDPMScheduler.from_pretrained(pipes["sdxl"], subfolder="scheduler").alphas_cumprod[t].view(-1, 1, 1, 1)
    added = {"text_embeds": c["text_embeds"], "time_ids": c["time_ids"]}
    with torch.no_grad():
        eps = unet(x_t, t, c["encoder_hidden_states"], added_cond_kwargs=added).sample
        mid, ups = [], []
        h = unet.mid_block.register_forward_hook(lambda m, a, o: mid.append(o))
        unet(x_t, t, c["encoder_hidden_states"], added_cond_kwargs=added)
        h.remove()
        net = sd.Denoiser(unet, base.schedule)
        torch.testing.assert_close(net(x_t, t, c), (x_t - (1 - abar).sqrt() * eps) / abar.sqrt(), atol=1e-4,
                                   rtol=1e-4)
        hooks = [m.register_forward_hook(lambda m, a, o: ups.append(1)) for m in (*unet.up_blocks, unet.conv_out)]
        feats = net(x_t, t, c, bottleneck=True)
        for h in hooks:
            h.remove()
    torch.testing.assert_close(feats, mid[0])
    assert feats.shape == (2, 64, 4, 4) and not ups, "the decoder half must not run for the GAN features"


def test_teacher_guidance_is_one_batched_call(pipes):
    base = sd.load_base(pipes["sdxl"], torch.device("cpu"))
    c, u = _cond(base), sd.unconditional(base, 32)
    seen = []
    base.net.register_forward_pre_hook(lambda m, a, k: seen.append((a, k)), with_kwargs=True)
    teacher, w = sd.Denoiser(base.net, base.schedule), 8.0
    x_t, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 700])
    with torch.no_grad():
        out = dmd2.guided(teacher, w, u)(x_t, t, c)
        assert len(seen) == 1, "cond and uncond in one UNet call"
        (x, tt), kw = seen[0]
        ehs = kw["encoder_hidden_states"]
        assert len(x) == 4 and torch.equal(tt, torch.cat([t, t]))
        assert ehs[2:].abs().sum() == 0 and kw["added_cond_kwargs"]["text_embeds"][2:].abs().sum() == 0
        torch.testing.assert_close(kw["added_cond_kwargs"]["time_ids"][2:], c["time_ids"])
        cond_x0, uncond_x0 = teacher(x_t, t, c), teacher(x_t, t, dmd2._expand(u, 2))
    torch.testing.assert_close(out, uncond_x0 + w * (cond_x0 - uncond_x0), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------
# The generator's inputs: pure noise (1 step), backward simulation, forward-noised real latents (Table 4)


class Recorder:
    def __init__(self, n=8):
        self.calls, g = [], torch.Generator().manual_seed(3)
        self.outs = [torch.randn(2, 4, 8, 8, generator=g) for _ in range(n)]

    def __call__(self, x_t, t, cond):
        self.calls.append((x_t.clone(), t.clone()))
        return self.outs[len(self.calls) - 1]


@pytest.mark.parametrize("preset,t0", [("sd15", 999), ("sdxl-1step", 399)])
def test_one_step_input_is_pure_noise(preset, t0):
    cfg = T.Config(**T.PRESETS[preset])
    z = torch.randn(2, 4, 8, 8)
    x_in, t_in = T.generator_input(cfg, Recorder(), dmd2.VPSchedule(), z, None, T.generators(cfg, 0, "cpu"))
    assert torch.equal(x_in, z) and t_in.tolist() == [t0, t0]


@settings(deadline=None, max_examples=30)
@given(steps=st.integers(2, 8), seed=st.integers(0, 2**31), rank=st.integers(0, 7))
def test_backward_simulation_input(steps, seed, rank):
    """Sec. 4.5: k steps of G from pure noise, each x0 re-noised to the next timestep with fresh noise, k uniform
    in [0, N) and the same on every rank; re-simulated here from the VP formulas."""
    cfg, sch = T.Config(**T.PRESETS["sdxl-4step"], seed=seed), dmd2.VPSchedule()
    cfg.steps = steps
    abar, ts = sch.alphas**2, dmd2.step_timesteps(steps)
    gens, G, z = T.generators(cfg, rank, "cpu"), Recorder(), torch.randn(2, 4, 8, 8)
    k = int(torch.randint(steps, (1,), generator=T.generators(cfg, 0, "cpu")["k"]))  # rank 0's k
    noise = torch.Generator().set_state(gens["noise"].get_state())
    x_in, t_in = T.generator_input(cfg, G, sch, z, None, gens)
    assert [c[1].tolist() for c in G.calls] == [[ts[i]] * 2 for i in range(k)] and t_in.tolist() == [ts[k]] * 2
    x = z  # x_{t_{i+1}} = sqrt(abar) G(x_{t_i}) + sqrt(1 - abar) eps
    for i in range(k):
        assert torch.allclose(G.calls[i][0], x, atol=1e-6)
        a = abar[ts[i + 1]].float()
        x = a.sqrt() * G.outs[i] + (1 - a).sqrt() * torch.randn(2, 4, 8, 8, generator=noise)
    assert torch.allclose(x_in, x, atol=1e-6)


def test_forward_noised_real_input_ablation():
    cfg, sch = T.Config(**T.PRESETS["sdxl-4step"], backward_simulation=False, seed=1), dmd2.VPSchedule()
    z, x_real, G = torch.randn(16, 4, 8, 8), torch.randn(16, 4, 8, 8), Recorder()
    x_in, t_in = T.generator_input(cfg, G, sch, z, None, T.generators(cfg, 0, "cpu"), x_real)
    assert not G.calls and set(t_in.tolist()) <= {999, 749, 499, 249} and len(set(t_in.tolist())) > 1
    a = (sch.alphas**2)[t_in].float().view(-1, 1, 1, 1)
    expect = torch.where(t_in.view(-1, 1, 1, 1) == 999, z, a.sqrt() * x_real + (1 - a).sqrt() * z)
    assert torch.allclose(x_in, expect, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Shared-base LoRA: G and mu_fake as two adapters of the teacher, against three separate UNets


def _three_ways(pipe, shared, checkpointing="ours"):
    sd3 = sd.family(pipe) == "sd3"
    cfg, sch = T.Config(lora_rank=4, lora_alpha=2.0), dmd2.FlowSchedule(3.0) if sd3 else dmd2.VPSchedule()
    unet0 = sd.load_net(pipe, torch.device("cpu")).requires_grad_(False)

    def lora(u, name, seed):  # random non-zero adapters, equal in both set-ups
        params, g = sd.add_lora(u, name, cfg.lora_rank, cfg.lora_alpha), torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in params:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
        return params

    if shared:
        u = copy.deepcopy(unet0)
        gp, fp = lora(u, "generator", 1), lora(u, "fake", 2)
        if checkpointing == "ours":
            u.enable_gradient_checkpointing(sd.checkpoint_as_run)
        else:
            u.enable_gradient_checkpointing()  # diffusers' default recomputation
        G, F, teacher = sd.Denoiser(u, sch, "generator"), sd.Denoiser(u, sch, "fake"), sd.Denoiser(u, sch)
    else:
        ut, ug, uf = (copy.deepcopy(unet0) for _ in range(3))
        gp, fp = lora(ug, "generator", 1), lora(uf, "fake", 2)
        G, F, teacher = sd.Denoiser(ug, sch, "generator"), sd.Denoiser(uf, sch, "fake"), sd.Denoiser(ut, sch)
    for p in gp + fp:
        p.requires_grad_(True)
    torch.manual_seed(5)
    head = dmd2.GANHead(*sd.bottleneck_shape(unet0, 8))
    G, F, H = sd.Net(G, gp), sd.Net(F, fp), sd.Net(head, list(head.parameters()))
    g = torch.Generator().manual_seed(0)
    if sd3:
        cond = {"encoder_hidden_states": torch.randn(2, 16 + sd.T5_TOKENS, 80, generator=g),
                "pooled_projections": torch.randn(2, 64, generator=g)}
    else:
        cond = {"encoder_hidden_states": torch.randn(2, 16, 64, generator=g),
                "text_embeds": torch.randn(2, 32, generator=g), "time_ids": sd.time_ids(32, 2, "cpu")}
    uncond = {k: v[:1] if k == "time_ids" else torch.zeros_like(v[:1]) for k, v in cond.items()}
    hp, rng = dmd2.TTUR(ratio=1, gan_g=0.5, gan_d=0.5, w=3.0, max_grad_norm=1e9), torch.Generator().manual_seed(1)
    g_opt, c_opt = torch.optim.SGD(G.params, lr=1.0), torch.optim.SGD(F.params + H.params, lr=1.0)
    shape = (2, unet0.config.in_channels, 8, 8)
    x, logs = dmd2.generator_step(G, g_opt, torch.randn(shape, generator=g), torch.tensor([999, 749]), teacher, F,
                                  H, sch, cond, hp, uncond, rng)
    after_g = [p.detach().clone() for p in G.params]
    assert all(p.grad is None for p in F.params + H.params), "the generator step must not touch mu_fake or D"
    logs |= dmd2.critic_step(F, H, c_opt, x, sch, cond, torch.randn(shape, generator=g), cond, hp, rng)
    return after_g, [p.detach().clone() for p in F.params + H.params], logs


@pytest.mark.parametrize("kind", ["sdxl", "sd3"])
def test_shared_lora_matches_three_separate_networks(pipes, kind):
    """Adapters switched between G's forward and its backward, under gradient checkpointing, give exactly the
    gradients of three separate networks (SD3: the GAN's stop at the middle block is never recomputed)."""
    ref, shared = _three_ways(pipes[kind], False), _three_ways(pipes[kind], True)
    for a, b in zip(ref[0] + ref[1], shared[0] + shared[1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert ref[2].keys() == shared[2].keys() and all(torch.allclose(ref[2][k], shared[2][k]) for k in ref[2])
    with pytest.raises(torch.utils.checkpoint.CheckpointError):  # why checkpoint_as_run exists
        _three_ways(pipes[kind], True, checkpointing="default")


# ----------------------------------------------------------------------------------------------------
# Bad input: clear errors, before anything heavy


def test_bad_inputs(pipes, data, tmp_path):
    no_captions = tmp_path / "nocap"
    write_image_folder(no_captions, 2)
    (no_captions / "00001.txt").unlink()
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    ok = ["--model", pipes["sd15"], "--prompts", data["prompts"], "--resolution", "32", "--out", str(tmp_path / "r")]
    xl = ["--model", pipes["sdxl"], "--prompts", data["prompts"], "--resolution", "32", "--out", str(tmp_path / "x")]
    cases = [
        (["--preset", "sd15", *ok, "--prompts", str(tmp_path / "nope.txt")], "no such file"),
        (["--preset", "sd15", *ok, "--prompts", str(empty)], "no prompts"),
        (["--preset", "sd15", *ok, "--model", str(tmp_path)], "model_index.json"),
        (["--preset", "sdxl-4step", *ok], "is for SDXL"),
        (["--preset", "sdxl-4step", *xl], "--real-images is required"),
        (["--preset", "sdxl-4step", *xl, "--real-images", str(no_captions)], "without a same-named .txt"),
        (["--preset", "sdxl-4step", *xl, "--real-images", data["real"], "--resolution", "24"], "--resolution 24"),
        (["--preset", "sd15", *ok, "--resume"], "no checkpoint"),
        (["--preset", "sdxl-4step", *xl, "--real-images", data["real"], "--warmup-pairs", "4"], "one-step"),
        ([*ok], "--preset is required"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=message):
            T.main(argv)
    with pytest.raises(SystemExit):  # argparse: unknown preset
        T.main(["--preset", "sd99", *ok])
    with pytest.raises(ValueError, match="smaller than --resolution"):  # found when the data is opened
        CaptionedImages(data["real"], 64)
    with pytest.raises(SystemExit, match="smaller than --resolution"):
        T.main(["--preset", "sdxl-4step", *xl, "--real-images", data["real"], "--resolution", "64"])
    with pytest.raises(SystemExit, match="no student here"):
        sample.main([str(tmp_path), "--prompt", "x"])
    torch.save({"conv_in.weight": torch.zeros(1)}, tmp_path / "wrong.bin")
    with pytest.raises(SystemExit, match="not a state dict"):
        sample.main([str(tmp_path / "wrong.bin"), "--model", pipes["sd15"], "--steps", "1", "--prompt", "x"])
    with pytest.raises(SystemExit, match="--steps"):
        sample.main([str(tmp_path / "wrong.bin"), "--model", pipes["sd15"], "--prompt", "x"])


def test_real_images_from_folder_and_tar_shards(data, tmp_path):
    import webdataset as wds

    folder = CaptionedImages(data["real"], 32)
    with wds.TarWriter(str(tmp_path / "00000.tar")) as w:  # the way img2dataset writes its shards
        for i in range(len(folder)):
            img, cap = Image.open(folder.items[i][0]), open(folder.items[i][1]).read()
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            w.write({"__key__": f"{i:09d}", "png": buf.getvalue(), "txt": cap, "json": json.dumps({"i": i})})
    tar = CaptionedImages(str(tmp_path), 32)
    assert len(tar) == len(folder) == 6
    for i in range(6):
        (a, ca), (b, cb) = folder[i], tar[i]
        assert ca == cb and torch.equal(a, b) and a.shape == (3, 32, 32) and -1 <= a.min() and a.max() <= 1
    halves = [CaptionedImages(str(tmp_path), 32, rank=r, world=2) for r in range(2)]
    assert sorted(c for h in halves for c in (h[i][1] for i in range(len(h)))) == sorted(folder[i][1] for i in
                                                                                     range(6))


# ----------------------------------------------------------------------------------------------------
# End to end: train, resume, export, sample


def _train(argv):
    T.main([*argv, "--log-every", "1", "--sample-every", "2"])


def test_sd15_one_step_train_resume_export_sample(pipes, data, tmp_path):
    args = ["--preset", "sd15", "--model", pipes["sd15"], "--prompts", data["prompts"], "--resolution", "32",
            "--batch", "2", "--ratio", "2", "--ckpt-every", "2", "--lr", "1e-3"]
    _train([*args, "--iters", "4", "--out", str(tmp_path / "a")])
    _train([*args, "--iters", "2", "--out", str(tmp_path / "b")])
    _train([*args, "--iters", "4", "--out", str(tmp_path / "b"), "--resume"])
    a, b = (torch.load(tmp_path / r / "checkpoint.pt", weights_only=False) for r in "ab")
    assert a["step"] == b["step"] == 4 and a["kind"] == "text-to-image"
    for k in a["nets"]:
        assert all(torch.equal(a["nets"][k][n], b["nets"][k][n]) for n in a["nets"][k]), "resume is exact"
    assert str(a["opts"]) == str(b["opts"]) and a["rng"][0]["noise"].equal(b["rng"][0]["noise"])
    # warm-up counts training iterations for both optimisers (the generator's schedule advances on every one)
    assert a["scheds"]["g_opt"]["last_epoch"] == a["scheds"]["c_opt"]["last_epoch"] == 4
    assert a["scheds"]["g_opt"]["_last_lr"] == a["scheds"]["c_opt"]["_last_lr"] == [1e-3 * 5 / 8]
    assert all(p["lr_warmup"] == 8 for p in T.PRESETS.values()), "500 warm-up steps / 64 processes"
    teacher = UNet2DConditionModel.from_pretrained(pipes["sd15"], subfolder="unet").state_dict()
    assert any(not torch.equal(teacher[n.removeprefix("net.")], v) for n, v in a["nets"]["G"].items())
    # the released form: an fp16 state dict that loads strictly into the base UNet's config
    sd = torch.load(tmp_path / "a" / "export" / "dmd2_sd15_1step_unet_fp16.bin", weights_only=True)
    assert all(v.dtype == torch.float16 for v in sd.values())
    UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(pipes["sd15"], subfolder="unet")) \
        .load_state_dict(sd, strict=True)
    run = sample.main([str(tmp_path / "a"), "--prompts", data["prompts"], "--out", str(tmp_path / "s1")])
    bin_ = sample.main([str(tmp_path / "a" / "export" / "dmd2_sd15_1step_unet_fp16.bin"), "--model", pipes["sd15"],
                        "--steps", "1", "--prompts", data["prompts"], "--out", str(tmp_path / "s2")])
    folder = sample.main([str(tmp_path / "a" / "export" / "unet"), "--model", pipes["sd15"], "--steps", "1",
                          "--prompts", data["prompts"], "--out", str(tmp_path / "grid.png")])
    assert run.shape == (4, 3, 32, 32) and (tmp_path / "grid.png").is_file() and len(list((tmp_path / "s1")
                                                                                           .glob("*.png"))) == 4
    torch.testing.assert_close(run, folder)
    torch.testing.assert_close(run, bin_, atol=2e-2, rtol=0)  # fp16 weights


def test_stock_lcm_pipeline_is_the_paper_sampler(pipes):
    """One step at t = 399 (SDXL) through diffusers' LCMScheduler with explicit timesteps equals dmd2.sample."""
    pipe = StableDiffusionXLPipeline.from_pretrained(pipes["sdxl"])
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    base = sd.load_base(pipes["sdxl"], torch.device("cpu"))
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = sd.decode(base, dmd2.sample(sd.Denoiser(base.net, base.schedule), z, base.schedule, [399],
                                      _cond(base, ["a cat"])))
    theirs = pipe("a cat", latents=z, timesteps=[399], guidance_scale=0, height=32, width=32, output_type="pt").images
    torch.testing.assert_close(theirs, ours, atol=1e-3, rtol=0)


def test_sdxl_four_step_gan_backward_simulation(pipes, data, tmp_path):
    _train(["--preset", "sdxl-4step", "--model", pipes["sdxl"], "--prompts", data["prompts"], "--real-images",
            data["real"], "--resolution", "32", "--batch", "2", "--ratio", "2", "--iters", "3", "--cache-latents",
            "--out", str(tmp_path / "r")])
    ckpt = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=False)
    assert set(ckpt["nets"]) == {"G", "fake", "head"} and (tmp_path / "r" / "latents_0of1.pt").is_file()
    assert "loss_gan_d" in (tmp_path / "r" / "log.jsonl").read_text()
    out = tmp_path / "r" / "export"
    assert json.loads((out / "dmd2.json").read_text())["timesteps"] == [999, 749, 499, 249]
    images = sample.main([str(out), "--prompt", "a cat", "--out", str(tmp_path / "s")])
    assert images.shape == (1, 3, 32, 32)
    unet = UNet2DConditionModel.from_pretrained(str(out / "unet"))  # the README's stock diffusers route
    pipe = StableDiffusionXLPipeline.from_pretrained(pipes["sdxl"], unet=unet)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    img = pipe("a cat", num_inference_steps=4, timesteps=[999, 749, 499, 249], guidance_scale=0, height=32, width=32,
               output_type="pt").images
    assert img.shape == (1, 3, 32, 32) and torch.isfinite(img).all()


@pytest.mark.parametrize("mode", ["shared-lora", "lora"])
def test_lora_modes_export_for_load_lora_weights(mode, pipes, data, tmp_path):
    _train(["--preset", "sdxl-4step-lora", "--mode", mode, "--lora-rank", "4", "--lr", "1e-2", "--model",
            pipes["sdxl"], "--prompts", data["prompts"], "--real-images", data["real"], "--resolution", "32", "--batch",
            "2", "--ratio", "1", "--iters", "2", "--lr-warmup", "1", "--out", str(tmp_path / "r")])
    ckpt = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=False)
    assert all(".generator." in n for n in ckpt["nets"]["G"])
    assert all(".fake." in n for n in ckpt["nets"]["fake"]) == (mode == "shared-lora")
    out = tmp_path / "r" / "export"
    student = sd.load_student(ckpt, torch.device("cpu"))  # the LoRA fused into the base weights
    merged = UNet2DConditionModel.from_pretrained(str(out / "unet"))
    pipe = StableDiffusionXLPipeline.from_pretrained(pipes["sdxl"])
    pipe.load_lora_weights(str(out))
    pipe.fuse_lora()
    base = UNet2DConditionModel.from_pretrained(pipes["sdxl"], subfolder="unet")
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999, 249])
    c = (torch.randn(2, 16, 64, generator=g), {"text_embeds": torch.randn(2, 32, generator=g),
                                                "time_ids": sd.time_ids(32, 2, "cpu")})
    with torch.no_grad():
        outs = [u(x, t, c[0], added_cond_kwargs=c[1]).sample for u in (student, merged, pipe.unet, base)]
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(outs[2], outs[0], atol=1e-5, rtol=1e-4)
    assert (outs[0] - outs[3]).abs().max() > 1e-4, "the adapter changed the UNet"
    # every source kind samples the student: sample.py --seed S is the stock diffusers pipeline with LCMScheduler,
    # the explicit timesteps, the student's fused UNet and generator=torch.Generator().manual_seed(S) (its i-th batch:
    # S + i); the teacher's images differ
    prompts, seed, ts = ["a cat", "red car"], 3, [999, 749, 499, 249]
    stock = StableDiffusionXLPipeline.from_pretrained(pipes["sdxl"], unet=merged)
    stock.scheduler = LCMScheduler.from_config(stock.scheduler.config)
    expected = torch.cat([stock(p, generator=torch.Generator().manual_seed(seed + i), timesteps=ts, guidance_scale=0,
                                height=32, width=32, output_type="pt").images for i, p in enumerate(prompts)])
    on_base = ["--model", pipes["sdxl"], "--steps", "4"]
    sources = {"run folder": [str(tmp_path / "r")], "export folder": [str(out)],
               "UNet folder": [str(out / "unet"), *on_base],
               "fp16 state dict": [str(out / "dmd2_sdxl_4step_unet_fp16.bin"), *on_base],
               "LoRA file": [str(out / "pytorch_lora_weights.safetensors"), *on_base]}
    for i, (kind, argv) in enumerate(sources.items()):
        images = sample.main([*argv, "--prompt", prompts[0], "--prompt", prompts[1], "--batch", "1", "--seed",
                              str(seed), "--out", str(tmp_path / f"{i}.png")])
        tol = 2e-2 if kind == "fp16 state dict" else 1e-3
        torch.testing.assert_close(images, expected, atol=tol, rtol=0, msg=kind)
    prompt, expected = prompts[0], expected[:1]
    teacher = sample.main([str(Path(pipes["sdxl"]) / "unet"), "--model", pipes["sdxl"], "--steps", "4", "--prompt",
                           prompt, "--seed", str(seed), "--out", str(tmp_path / "teacher.png")])
    assert (teacher - expected).abs().max() > 0.05, "the student must not sample as its teacher"


def test_non_finite_loss_stops_and_keeps_last_checkpoint(pipes, data, tmp_path, monkeypatch):
    real = dmd2.train_iteration

    def poisoned(it, *a, **k):
        logs = real(it, *a, **k)
        return logs | {"loss_fake": torch.tensor(float("nan"))} if it == 2 else logs

    monkeypatch.setattr(T.dmd2, "train_iteration", poisoned)
    with pytest.raises(SystemExit, match="non-finite loss_fake at iteration 3.*step 2"):
        _train(["--preset", "sd15", "--model", pipes["sd15"], "--prompts", data["prompts"], "--resolution", "32",
                "--batch", "1", "--ratio", "2", "--iters", "4", "--ckpt-every", "2", "--out", str(tmp_path / "r")])
    assert torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=False)["step"] == 2


def test_evaluation_metrics(pipes, data, tmp_path, monkeypatch):
    """FID of the generated images against themselves is 0; CLIP score is the mean cosine similarity."""
    out = tmp_path / "gen"
    torch.save({"kind": "text-to-image"}, tmp_path / "k.pt")
    assert sample.check_source(str(tmp_path / "k.pt")) == "text-to-image"

    class Features(torch.nn.Module):  # a stand-in for Inception (no download): 16 pooled colour statistics
        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(x.float(), 2).flatten(1).repeat(1, 2)[:, :16] + \
                   1e-3 * torch.arange(16.0)

    class Clip(torch.nn.Module):
        def encode_image(self, x):
            return torch.ones(len(x), 4)

        def encode_text(self, t):
            return torch.tensor([[1.0, 1.0, 0.0, 0.0]]).expand(len(t), 4)

    import cleanfid.fid

    monkeypatch.setattr(cleanfid.fid, "build_feature_extractor", lambda *a, **k: Features())
    monkeypatch.setattr(sample.metrics, "load_clip", lambda *a: (Clip(), lambda im: torch.zeros(3, 8, 8),
                                                                  lambda s: torch.zeros(len(s), 3)))
    base_unet = tmp_path / "unet"
    UNet2DConditionModel.from_pretrained(pipes["sd15"], subfolder="unet").save_pretrained(str(base_unet))
    ref = tmp_path / "ref"
    sample.main([str(base_unet), "--model", pipes["sd15"], "--steps", "1", "--prompts", data["prompts"], "--out",
                 str(ref), "--seed", "3"])
    m = sample.main([str(base_unet), "--model", pipes["sd15"], "--steps", "1", "--prompts", data["prompts"],
                     "--out", str(out), "--seed", "3", "--eval", "--ref-images", str(ref)])
    assert abs(m["fid"]) < 1e-3 and "patch_fid" not in m and m["eval_res"] == 256
    assert m["clip_score"] == pytest.approx(2 ** -0.5)
    assert json.loads((out / "metrics.json").read_text())["images"] == 4


@pytest.mark.filterwarnings("ignore::UserWarning")  # torchvision's notes on how lpips builds its random backbone
def test_one_step_sdxl_lpips_warmup(pipes, data, tmp_path, monkeypatch):
    """App. F.4: teacher pairs come from a stock diffusers pipeline with the same noise; the warm-up moves G."""
    import lpips
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    monkeypatch.setattr(T, "load_lpips", lambda device: lpips.LPIPS(net="squeeze", pretrained=False, pnet_rand=True,
                                                                     verbose=False).requires_grad_(False))
    trained = {}
    warmup = T.lpips_warmup

    def spy(cfg, base, nets, pairs, lp, device, rank):
        before = [p.detach().clone() for p in nets.G.params]
        warmup(cfg, base, nets, pairs, lp, device, rank)
        trained["moved"] = any(not torch.equal(a, p) for a, p in zip(before, nets.G.params, strict=True))

    monkeypatch.setattr(T, "lpips_warmup", spy)
    out = tmp_path / "r"
    T.main(["--preset", "sdxl-1step", "--model", pipes["sdxl"], "--prompts", data["prompts"], "--real-images",
            data["real"], "--resolution", "32", "--batch", "2", "--iters", "2", "--warmup-pairs", "3",
            "--warmup-steps", "2", "--warmup-teacher-steps", "3", "--out", str(out)])
    assert trained["moved"]
    pairs = torch.load(out / "warmup_pairs_0of1.pt")
    assert len(pairs["z"]) == len(pairs["prompts"]) == 3
    pipe = StableDiffusionXLPipeline.from_pretrained(pipes["sdxl"])
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    x = pipe(prompt=pairs["prompts"][:1], latents=pairs["z"][:1].float(), height=32, width=32, guidance_scale=8.0,
             num_inference_steps=3, output_type="latent").images
    torch.testing.assert_close(x, pairs["x"][:1].float(), atol=1e-2, rtol=2e-3)  # stored in fp16
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    c = ckpt["config"]
    assert ckpt["step"] == 2 and sd.student_timesteps(c["steps"], c["conditioning_timestep"]) == [399]


# ----------------------------------------------------------------------------------------------------
# Fidelity to the authors' runs: warm-up unit, real prompts, reproducible latents, offline LPIPS, fp32 DMD pass


def test_sdxl_multi_step_prompts_are_the_real_captions(pipes, data, tmp_path, monkeypatch):
    """With real images, the 4-step SDXL presets give the generator the real images' captions as prompts."""
    assert T.PRESETS["sdxl-4step"]["real_prompts"] and T.PRESETS["sdxl-4step-lora"]["real_prompts"]
    encoded, encode = [], sd.encode_prompts
    monkeypatch.setattr(T.sd, "encode_prompts", lambda base, texts, res: encoded.append(list(texts)) or
                        encode(base, texts, res))
    _train(["--preset", "sdxl-4step", "--model", pipes["sdxl"], "--prompts", data["prompts"], "--real-images",
            data["real"], "--resolution", "32", "--batch", "2", "--ratio", "2", "--iters", "2", "--out",
            str(tmp_path / "r")])
    batches = [t for t in encoded if len(t) == 2]  # the training batches (the grid has 4 prompts, uncond 1)
    assert len(batches) == 2 and all(t.startswith("a photo number") for b in batches for t in b)


def test_cached_latents_are_reproducible(pipes, data, tmp_path):
    """--cache-latents draws the VAE posterior samples from the run's seed, not from the global generator."""
    base = sd.load_base(pipes["sdxl"], torch.device("cpu"), net=False)
    images = CaptionedImages(data["real"], 32)
    caches = []
    for i, seed in enumerate((0, 0, 1)):
        torch.manual_seed(100 + i)  # whatever the global state
        caches.append(sd.RealLatents(images, base.vae, str(tmp_path / f"{i}.pt"), seed=seed).latents)
    assert torch.equal(caches[0], caches[1]) and not torch.equal(caches[0], caches[2])


def test_offline_lpips_fails_in_one_line_before_the_teacher_pairs(pipes, data, tmp_path, monkeypatch):
    import torchvision.models._api

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(SystemExit, match=r"^error: LPIPS .*vgg16-397923af\.pth at ") as e:
        T.main(["--preset", "sdxl-1step", "--model", pipes["sdxl"], "--prompts", data["prompts"], "--real-images",
                data["real"], "--resolution", "32", "--batch", "2", "--iters", "2", "--warmup-pairs", "2",
                "--warmup-steps", "1", "--out", str(tmp_path / "r")])
    assert "\n" not in str(e.value) and not (tmp_path / "r" / "warmup_pairs_0of1.pt").exists()


def test_dmd_pass_of_the_fake_score_runs_in_fp32(pipes, monkeypatch):
    """As the authors: under bf16 autocast (a GPU's), mu_fake's no-grad forward of Eq. 2 runs in fp32; its
    denoising loss, the teacher and G stay in bf16."""
    monkeypatch.setattr(sd.Denoiser, "autocast_on", ("cuda", "cpu"))  # the GPU's autocast, on the CPU
    cpu = torch.device("cpu")
    base = sd.load_base(pipes["sd15"], cpu)
    cfg = T.Config(**{**T.PRESETS["sd15"], "model": pipes["sd15"], "resolution": 32, "grad_checkpointing": False})
    nets = T.build_nets(cfg, base, cpu, 1)
    seen = []
    for name, unet in (("fake", nets.models["fake"]), ("teacher", base.net), ("G", nets.models["G"])):
        unet.register_forward_pre_hook(lambda m, a, name=name: seen.append(
            (name, torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"))))
    cond, hp = sd.encode_prompts(base, ["a cat", "red car"], 32), dmd2.TTUR(ratio=1, gan_g=0, gan_d=0, w=1.75)
    x, _ = dmd2.generator_step(nets.G, torch.optim.SGD(nets.G.params, lr=0), torch.randn(2, 4, 8, 8),
                               torch.full((2,), 999), nets.teacher, nets.fake, None, base.schedule, cond, hp,
                               sd.unconditional(base, 32))
    dmd2.critic_step(nets.fake, None, torch.optim.SGD(nets.fake.params, lr=0), x, base.schedule, cond, hp=hp)
    assert sorted(set(seen)) == [("G", True, True), ("fake", False, False), ("fake", True, True),
                                 ("teacher", False, True)]


# ----------------------------------------------------------------------------------------------------
# Reliability: bad run files, resume settings, non-finite weights never written


def test_bad_run_files_and_resume_settings(pipes, data, tmp_path, monkeypatch):
    run = tmp_path / "r"
    args = ["--preset", "sd15", "--model", pipes["sd15"], "--prompts", data["prompts"], "--resolution", "32",
            "--batch", "1", "--ratio", "2", "--lr", "1e-3"]
    _train([*args, "--iters", "2", "--ckpt-every", "2", "--out", str(run)])
    T.main(["--out", str(run), "--resume", "--iters", "3"])  # no other flag: the run keeps its own settings
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 3 and (ck["config"]["log_every"], ck["config"]["sample_every"]) == (1, 2)
    assert [r["it"] for r in ck["history"]] == [1, 2, 3]
    with pytest.raises(SystemExit, match="below the checkpoint's iteration 3"):
        T.main(["--out", str(run), "--resume", "--iters", "2"])
    with pytest.raises(SystemExit, match="cannot change --resolution"):
        T.main(["--out", str(run), "--resume", "--resolution", "64"])
    (tmp_path / "junk.pt").write_bytes(bytes(range(256)) * 8)
    with pytest.raises(SystemExit, match="^error: .*junk.pt is not a readable checkpoint"):
        T.main(["--export", str(tmp_path / "junk.pt")])
    with pytest.raises(SystemExit, match="junk.pt is not a readable checkpoint"):
        T.main([*args, "--iters", "2", "--init", str(tmp_path / "junk.pt"), "--out", str(tmp_path / "i")])
    good = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(good[: len(good) // 3])
    with pytest.raises(SystemExit, match="is not a readable checkpoint"):
        T.main(["--out", str(run), "--resume", "--iters", "4"])
    with pytest.raises(SystemExit, match="--resolution 100: must be a multiple of"):
        sample.main([str(Path(pipes["sd15"]) / "unet"), "--model", pipes["sd15"], "--steps", "1", "--prompt", "x",
                     "--resolution", "100", "--out", str(tmp_path / "x.png")])
    iteration = dmd2.train_iteration

    def poisoned(*a, **k):  # finite losses, but G's weights go non-finite
        logs = iteration(*a, **k)
        with torch.no_grad():
            next(iter(a[1].params)).fill_(float("nan"))
        return logs

    monkeypatch.setattr(T.dmd2, "train_iteration", poisoned)
    with pytest.raises(SystemExit, match="non-finite weights"):
        _train([*args, "--iters", "1", "--out", str(tmp_path / "nan")])
    assert not (tmp_path / "nan" / "checkpoint.pt").exists()
