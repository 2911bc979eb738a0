"""SD3 / SD3.5 (rectified flow) through train_t2i.py and sample.py, on a tiny random SD3.5-shaped pipeline without T5
(tests/tiny_pipelines.tiny_sd3): the condition against diffusers' pipeline, the velocity -> x0 adapter and the
middle-block bottleneck against the transformer itself, training end to end in the full and shared-LoRA modes, and the
exported student in a stock StableDiffusion3Pipeline with the flow-matching Euler scheduler."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

import dmd2
import sample
import train_t2i as T
from support import runs, sd

CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _stock(pipe: str, **parts) -> StableDiffusion3Pipeline:
    return StableDiffusion3Pipeline.from_pretrained(pipe, text_encoder_3=None, tokenizer_3=None, **parts)


def test_condition_and_schedule_are_the_pipelines(pipes):
    """Both CLIPs' penultimate states, padded to the joint width, then T5's 256 tokens (zeros without T5); pooled:
    both projections; the unconditional branch is the encoded "" (the pipeline's negative prompt)."""
    base = sd.load_base(pipes["sd3"], CPU, net=False)
    cond, neg, pooled, neg_pooled = _stock(pipes["sd3"]).encode_prompt(
        ["a cat", "the dog"], None, None, device=CPU, do_classifier_free_guidance=True)
    c, u = sd.encode_prompts(base, ["a cat", "the dog"], 32), sd.unconditional(base, 32)
    assert base.family == "sd3" and c["encoder_hidden_states"].shape == (2, 16 + 256, 80)
    torch.testing.assert_close(c["encoder_hidden_states"], cond)
    torch.testing.assert_close(c["pooled_projections"], pooled)
    torch.testing.assert_close(u["encoder_hidden_states"], neg[:1])
    torch.testing.assert_close(u["pooled_projections"], neg_pooled[:1])
    assert isinstance(base.schedule, dmd2.FlowSchedule) and base.schedule.shift == 3.0


def test_condition_with_t5_is_the_pipelines(tmp_path):
    """With T5: its 256 tokens after the CLIPs' 16, as the pipeline's; --no-t5 (t5=False) puts zeros in their place."""
    from tiny_pipelines import tiny_sd3

    path = str(tiny_sd3(tmp_path / "sd3t5", t5=True))
    prompts = ["a cat", "the red car photo"]
    cond, _, pooled, _ = StableDiffusion3Pipeline.from_pretrained(path).encode_prompt(
        prompts, None, None, device=CPU, do_classifier_free_guidance=False)
    c = sd.encode_prompts(sd.load_base(path, CPU, net=False), prompts, 32)
    torch.testing.assert_close(c["encoder_hidden_states"], cond)
    torch.testing.assert_close(c["pooled_projections"], pooled)
    assert c["encoder_hidden_states"][:, 16:].abs().sum() > 0, "T5's tokens are there"
    no_t5 = sd.encode_prompts(sd.load_base(path, CPU, net=False, t5=False), prompts, 32)
    torch.testing.assert_close(no_t5["encoder_hidden_states"][:, :16], cond[:, :16])
    assert no_t5["encoder_hidden_states"][:, 16:].abs().sum() == 0


def test_denoiser_is_x0_from_velocity_and_bottleneck_is_the_middle_block(pipes):
    base = sd.load_base(pipes["sd3"], CPU)
    net, c = base.net, sd.encode_prompts(base, ["a cat", "red car"], 32)
    g = torch.Generator().manual_seed(0)
    x_t, t = torch.randn(2, 8, 8, 8, generator=g), torch.tensor([999, 100])
    sigma = FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas.flip(0)[t]  # diffusers' own table, ascending
    den = sd.Denoiser(net, base.schedule)
    with torch.no_grad():
        v = net(hidden_states=x_t, timestep=1000 * sigma, **c).sample
        torch.testing.assert_close(den(x_t, t, c), x_t - sigma.view(-1, 1, 1, 1) * v, atol=1e-5, rtol=1e-5)
        tokens, later = [], []
        hooks = [net.transformer_blocks[1].register_forward_hook(lambda m, a, o: tokens.append(o[1]))]
        hooks += [m.register_forward_hook(lambda m, a, o: later.append(1))
                  for m in (*net.transformer_blocks[2:], net.norm_out, net.proj_out)]
        feats = den(x_t, t, c, bottleneck=True)
        for h in hooks:
            h.remove()
    assert feats.shape == (2, 16, 4, 4) and not later, "nothing after the middle block runs for the GAN features"
    expected = torch.stack([torch.stack([tokens[0][:, i * 4 + j] for j in range(4)], -1) for i in range(4)], -2)
    torch.testing.assert_close(feats, expected)  # token (i, j) of the row-major patch grid at [:, :, i, j]


@pytest.mark.parametrize("mode", ["full", "shared-lora"])
def test_four_step_train_resume_export_and_a_stock_pipeline(pipes, data, tmp_path, mode):
    """train_t2i.py --preset sd35m-4step (GAN, backward simulation): a resumed run equals an uninterrupted one; the
    exported student samples through sample.py (run, export, transformer folder, fp16 state dict, LoRA file) as a
    stock StableDiffusion3Pipeline does with the flow-matching Euler scheduler in its stochastic form (x0, then fresh
    noise), guidance off and the UNSHIFTED sigmas 1, 0.75, 0.5, 0.25 (the scheduler shifts them to the student's
    1, 0.9, 0.75, 0.5); the teacher samples otherwise."""
    common = ["--preset", "sd35m-4step", "--model", pipes["sd3"], "--prompts", data["prompts"], "--real-images",
              data["real"], "--resolution", "32", "--batch", "2", "--ratio", "2", "--log-every", "1",
              "--lr", "1e-3" if mode == "full" else "3e-2",  # a LoRA starts at zero: it must move in 2 updates
              "--mode", mode, "--lora-rank", "4", "--ckpt-every", "2"]
    T.main([*common, "--iters", "4", "--out", str(tmp_path / "r")])
    T.main([*common, "--iters", "2", "--out", str(tmp_path / "s")])
    T.main([*common, "--iters", "4", "--out", str(tmp_path / "s"), "--resume"])
    a, b = (runs.load_file(tmp_path / r / "checkpoint.pt", "checkpoint") for r in ("r", "s"))
    assert all(torch.equal(a["nets"][k][n], b["nets"][k][n]) for k in a["nets"] for n in a["nets"][k])
    assert {"loss_dmd", "loss_gan_g", "loss_gan_d", "loss_fake"} <= set().union(*a["history"])
    out = tmp_path / "r" / "export"
    assert (out / "transformer" / "config.json").is_file() and (out / "dmd2_sd3_4step_transformer_fp16.bin").is_file()
    prompts, seed = ["a cat", "a dog"], 3  # two batches, each the stock pipeline's on its own stream
    expected = _stock_images(pipes["sd3"], out, prompts, seed)
    on_base = ["--model", pipes["sd3"], "--steps", "4"]
    sources = {"run folder": [str(tmp_path / "r")], "export folder": [str(out)],
               "transformer folder": [str(out / "transformer"), *on_base],
               "fp16 state dict": [str(out / "dmd2_sd3_4step_transformer_fp16.bin"), *on_base]}
    if mode != "full":
        sources["LoRA file"] = [str(out / "pytorch_lora_weights.safetensors"), *on_base]
    for i, (kind, argv) in enumerate(sources.items()):
        images = sample.main([*argv, "--prompt", prompts[0], "--prompt", prompts[1], "--batch", "1", "--seed",
                              str(seed), "--out", str(tmp_path / f"{i}.png")])
        tol = 2e-2 if kind == "fp16 state dict" else 1e-3
        torch.testing.assert_close(images, expected, atol=tol, rtol=0, msg=kind)
    teacher = sample.main([str(Path(pipes["sd3"]) / "transformer"), *on_base, "--prompt", prompts[0], "--seed",
                           str(seed), "--out", str(tmp_path / "teacher.png")])
    assert (teacher - expected[:1]).abs().max() > 0.05, "the student must not sample as its teacher"


def _stock_images(pipe: str, export: Path, prompts: list[str], seed: int) -> torch.Tensor:
    """The docs' stock recipe: the exported transformer in StableDiffusion3Pipeline, the flow-matching Euler scheduler
    in its stochastic form (x0, then fresh noise), guidance off, dmd2.json's unshifted sigmas (the scheduler shifts
    them to the student's), called without a generator after torch.manual_seed(seed + i) for the i-th prompt
    (sample.py --batch 1): the latents and the step noise from torch's global generator."""
    meta = json.loads((export / "dmd2.json").read_text())
    stock = _stock(pipe, transformer=SD3Transformer2DModel.from_pretrained(str(export / "transformer")))
    stock.scheduler = FlowMatchEulerDiscreteScheduler.from_config(stock.scheduler.config, stochastic_sampling=True)
    images = []
    for i, p in enumerate(prompts):
        torch.manual_seed(seed + i)
        images.append(stock(p, sigmas=meta["sigmas"], guidance_scale=0, height=32, width=32, output_type="pt").images)
    return torch.cat(images)


@pytest.mark.slow
def test_no_t5_student_on_a_pipeline_with_t5_and_another_shift(data, tmp_path):
    """A student distilled --no-t5 samples without T5 from every kind of SOURCE (the export's dmd2.json is read for
    the weights inside it; a transformer folder on its own needs sample.py --no-t5), as a stock pipeline loaded with
    text_encoder_3=None, tokenizer_3=None does; with T5's real tokens the images differ. The pipeline's shift (2, not
    SD3's 3) reaches the schedule, dmd2.json's sigmas and transformer timesteps, and the stock sampler."""
    import shutil

    from tiny_pipelines import tiny_sd3

    pipe = str(tiny_sd3(tmp_path / "sd3t5", t5=True, shift=2.0))
    assert sd.load_base(pipe, CPU, net=False).schedule.shift == 2.0
    run = tmp_path / "r"
    common = ["--preset", "sd35m-4step", "--model", pipe, "--prompts", data["prompts"], "--real-images", data["real"],
              "--resolution", "32", "--batch", "2", "--ratio", "2", "--lr", "3e-2", "--mode", "shared-lora",
              "--lora-rank", "4", "--no-t5", "--out", str(run)]
    T.main([*common, "--iters", "2"])
    T.main([*common, "--iters", "3", "--resume"])
    with pytest.raises(SystemExit, match="cannot change --t5"):
        T.main([*common, "--iters", "4", "--resume", "--t5"])
    with pytest.raises(SystemExit, match="trained without T5"):
        T.main([*common[:-1], str(tmp_path / "x"), "--iters", "1", "--init", str(run), "--t5"])
    out = run / "export"
    meta = json.loads((out / "dmd2.json").read_text())
    assert meta["t5"] is False and meta["timesteps"] == [999, 749, 499, 249] and meta["sigmas"] == [1, .75, .5, .25]
    stock_sched = FlowMatchEulerDiscreteScheduler(shift=2.0)
    stock_sched.set_timesteps(sigmas=meta["sigmas"])
    assert meta["transformer_timesteps"] == pytest.approx(stock_sched.timesteps.tolist(), abs=1e-3)
    expected = _stock_images(pipe, out, ["a cat"], 5)  # loaded with text_encoder_3=None, tokenizer_3=None
    alone = out / "another_transformer"  # beside the export's files, not one of them: its dmd2.json is not read
    shutil.copytree(out / "transformer", alone)
    on_base = ["--model", pipe, "--steps", "4"]
    sources = {"run folder": [str(run)], "export folder": [str(out)], "transformer folder": [str(out / "transformer"),
               "--model", pipe], "fp16 state dict": [str(out / "dmd2_sd3_4step_transformer_fp16.bin"), "--model", pipe],
               "LoRA file": [str(out / "pytorch_lora_weights.safetensors"), "--model", pipe],
               "transformer folder alone": [str(alone), *on_base, "--no-t5"]}
    for i, (kind, argv) in enumerate(sources.items()):
        images = sample.main([*argv, "--prompt", "a cat", "--seed", "5", "--out", str(tmp_path / f"{i}.png")])
        torch.testing.assert_close(images, expected, atol=2e-2 if "fp16" in kind else 1e-3, rtol=0, msg=kind)
    with_t5 = sample.main([str(alone), *on_base, "--prompt", "a cat", "--seed", "5", "--out", str(tmp_path / "t.png")])
    assert (with_t5 - expected).abs().max() > 1e-3, "T5's tokens change the images"
    gib = {t5: T.main(["--estimate-memory", "--model", pipe, "--mode", "shared-lora", "--resolution", "32", "--batch",
                       "1", "--lora-rank", "4", *([] if t5 else ["--no-t5"])])["Parameter"] for t5 in (True, False)}
    from transformers import T5EncoderModel

    t5_params = sum(p.numel() for p in T5EncoderModel.from_pretrained(pipe, subfolder="text_encoder_3").parameters())
    assert (gib[True] - gib[False]) * 2**30 == 2 * t5_params, "--no-t5 leaves T5 (bf16) out of the estimate"


def test_one_step_lpips_pairs_are_sampled_at_singly_shifted_sigmas(pipes, monkeypatch, tmp_path):
    """The LPIPS warm-up's teacher pairs on SD3 come from the stock pipeline at the unshifted sigmas linspace(1,
    0.001, N), which its scheduler shifts once (the last one 0.0030 at shift 3); set_timesteps(N) would shift them
    twice (0.0089)."""
    import functools

    seen = []
    real = FlowMatchEulerDiscreteScheduler.set_timesteps

    @functools.wraps(real)  # the pipeline reads its signature (does it take sigmas?)
    def spy(self, *a, **k):
        real(self, *a, **k)
        seen.append(self.sigmas[:-1].clone())

    monkeypatch.setattr(FlowMatchEulerDiscreteScheduler, "set_timesteps", spy)
    cfg = T.Config(model=pipes["sd3"], resolution=32, batch=1, warmup_pairs=1, warmup_teacher_steps=4, w=1.0)
    T.teacher_pairs(cfg, sd.load_base(pipes["sd3"], CPU), ["a cat"], tmp_path / "pairs.pt", 0, 1)
    u = torch.linspace(1, 0.001, 4)
    torch.testing.assert_close(seen[-1], 3 * u / (1 + 2 * u))
    assert seen[-1][-1] == pytest.approx(0.0030, abs=1e-4)


def test_one_step_preset_and_bad_resolution(pipes, data, tmp_path, capsys):
    """sd35m-1step: pure noise at sigma 1; an SD3 preset refuses another family, and a resolution whose token grid
    is no power of two has no GAN head."""
    run = tmp_path / "one"
    T.main(["--preset", "sd35m-1step", "--model", pipes["sd3"], "--prompts", data["prompts"], "--real-images",
            data["real"], "--resolution", "32", "--batch", "2", "--iters", "2", "--ratio", "2", "--out", str(run)])
    meta = (run / "export" / "dmd2.json").read_text()
    assert '"timesteps": [\n  999\n ]' in meta
    for argv, message in ((["--model", pipes["sdxl"]], "is for SD3"), (["--resolution", "48"], "power-of-two")):
        with pytest.raises(SystemExit):
            T.main(["--preset", "sd35m-1step", "--model", pipes["sd3"], "--prompts", data["prompts"], "--real-images",
                    data["real"], "--resolution", "32", "--out", str(tmp_path / "bad"), *argv])
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_memory_estimate_counts_every_tensor(pipes):
    """--estimate-memory on SD3: bf16 frozen transformer and CLIPs, fp32 VAE, fp32 adapters and head, AdamW."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModelWithProjection

    gib = T.main(["--estimate-memory", "--model", pipes["sd3"], "--mode", "shared-lora", "--resolution", "32",
                  "--batch", "1", "--lora-rank", "4"])
    net = SD3Transformer2DModel.from_pretrained(pipes["sd3"], subfolder="transformer")
    frozen = sum(p.numel() for p in net.parameters()) + sum(
        p.numel() for sub in ("text_encoder", "text_encoder_2")
        for p in CLIPTextModelWithProjection.from_pretrained(pipes["sd3"], subfolder=sub).parameters())
    vae = sum(p.numel() for p in AutoencoderKL.from_pretrained(pipes["sd3"], subfolder="vae").parameters())
    lora = sum(4 * (m.in_features + m.out_features) for n, m in net.named_modules()
               if isinstance(m, torch.nn.Linear) and any(n.endswith(t) for t in sd.LORA_TARGETS["transformer"]))
    trainable = 2 * lora + sum(p.numel() for p in dmd2.GANHead(16, 4, width=8).parameters())  # tokens halved first
    assert gib["Parameter"] * 2**30 == 2 * frozen + 4 * vae + 4 * trainable


@pytest.mark.slow
def test_benchmark_of_a_text_to_image_run(pipes):
    """train_t2i.py --benchmark: the run's networks from the model's configs (random weights), timed, and the FLOPs
    of a generator update with ratio - 1 critic-only iterations: each critic-only iteration adds the same count (the
    longest backward simulation every time), less than a generator iteration's."""
    argv = ["--benchmark", "--model", pipes["sd3"], "--preset", "sd35m-4step", "--mode", "shared-lora",
            "--resolution", "32", "--batch", "1", "--lora-rank", "4", "--device", "cpu"]
    res = {r: T.main([*argv, "--ratio", str(r)]) for r in (1, 2, 3)}
    flops = {r: v["flops_per_update"] for r, v in res.items()}
    assert res[1]["arch"] == "sd3" and res[1]["peak_memory_gib"] > 0 and res[1]["seconds_per_update"]["eager"] > 0
    assert 0 < flops[3] - flops[2] == flops[2] - flops[1] < flops[1]
