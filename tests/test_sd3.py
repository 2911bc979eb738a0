"""SD3 / SD3.5 (rectified flow) through train_t2i.py and sample.py, on a tiny random SD3.5-shaped pipeline without T5
(tests/tiny_pipelines.tiny_sd3): the condition against diffusers' pipeline, the velocity -> x0 adapter and the
middle-block bottleneck against the transformer itself, training end to end in the full and shared-LoRA modes, and the
exported student in a stock StableDiffusion3Pipeline with the flow-matching Euler scheduler."""

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
    student = SD3Transformer2DModel.from_pretrained(str(out / "transformer"))
    stock = _stock(pipes["sd3"], transformer=student)
    stock.scheduler = FlowMatchEulerDiscreteScheduler.from_config(stock.scheduler.config, stochastic_sampling=True)
    prompt, seed = "a cat", 3
    torch.manual_seed(runs.stream_seed(seed, "sample", 0))  # sample.py's noise, drawn by the pipeline from the
    z = torch.randn(1, 8, 8, 8)  # global generator: the latents first, then each step's fresh noise
    expected = stock(prompt, latents=z, sigmas=[1.0, 0.75, 0.5, 0.25], guidance_scale=0, height=32, width=32,
                     output_type="pt").images
    on_base = ["--model", pipes["sd3"], "--steps", "4"]
    sources = {"run folder": [str(tmp_path / "r")], "export folder": [str(out)],
               "transformer folder": [str(out / "transformer"), *on_base],
               "fp16 state dict": [str(out / "dmd2_sd3_4step_transformer_fp16.bin"), *on_base]}
    if mode != "full":
        sources["LoRA file"] = [str(out / "pytorch_lora_weights.safetensors"), *on_base]
    for i, (kind, argv) in enumerate(sources.items()):
        images = sample.main([*argv, "--prompt", prompt, "--seed", str(seed), "--out", str(tmp_path / f"{i}.png")])
        tol = 2e-2 if kind == "fp16 state dict" else 1e-3
        torch.testing.assert_close(images, expected, atol=tol, rtol=0, msg=kind)
    teacher = sample.main([str(Path(pipes["sd3"]) / "transformer"), *on_base, "--prompt", prompt, "--seed", str(seed),
                           "--out", str(tmp_path / "teacher.png")])
    assert (teacher - expected).abs().max() > 0.05, "the student must not sample as its teacher"


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
    trainable = 2 * lora + sum(p.numel() for p in dmd2.GANHead(16, 4).parameters())
    assert gib["Parameter"] * 2**30 == 2 * frozen + 4 * vae + 4 * trainable


def test_benchmark_of_a_text_to_image_run(pipes):
    """train_t2i.py --benchmark: the run's networks from the model's configs (random weights), seconds per
    iteration, the FLOPs of an update (linear in the iterations it runs: ratio 2 is 2 iterations), peak memory."""
    argv = ["--benchmark", "--model", pipes["sd3"], "--preset", "sd35m-4step", "--mode", "shared-lora",
            "--resolution", "32", "--batch", "1", "--lora-rank", "4", "--device", "cpu"]
    res = T.main([*argv, "--ratio", "2"])
    assert res["arch"] == "sd3" and res["flops_per_update"] > 1e6 and res["peak_memory_gib"] > 0
    assert res["seconds_per_iteration"] == pytest.approx(res["seconds_per_update"]["eager"] / 2, abs=1e-3)
    assert sum(res["time_by_family"].values()) == pytest.approx(100, abs=0.5)
