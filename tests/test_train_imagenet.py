"""train_imagenet.py on tiny settings: the default (MNIST) run end to end, sample.py on its output, exact
resume, NaN stop, bad input, the network architecture and its adapter to the denoiser protocol."""

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch

import dmd2
import sample
import train_imagenet as ti

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--teacher-iters", "20", "--classifier-iters", "30", "--iters", "12", "--batch", "8", "--log-every", "4",
        "--ckpt-every", "6", "--eval-samples", "64", "--warmup", "2", "--channels", "8"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("run"))
    metrics = ti.main(["--out", run, *TINY])
    return run, metrics


def test_default_run_writes_everything(tiny_run):
    run, metrics = tiny_run
    for f in ("samples.png", "metrics.json", "log.jsonl", "brightness.png", "checkpoint.pt", "teacher.pt",
              "classifier.pt", "teacher_metrics.json"):
        assert os.path.isfile(os.path.join(run, f)), f
    with open(os.path.join(run, "log.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["it"] for r in rows] == [4, 8, 12]
    assert {"loss_dmd", "loss_fake", "loss_gan_g", "loss_gan_d", "brightness", "lr"} <= set(rows[0])
    saved = json.load(open(os.path.join(run, "metrics.json")))
    assert {k: (v["sampler"], v["nfe"]) for k, v in saved["teacher"].items()} == {
        "4": ("euler", 4), "8": ("euler", 8), "35": ("heun", 35)}
    assert saved["student"]["nfe"] == 1
    assert 0 <= saved["student"]["accuracy"] <= 1 and saved["student"]["fd"] > 0 and saved["real_vs_real"]["fd"] >= 0
    for entry in (saved["student"], saved["teacher"]["8"], saved["real_vs_real"]):  # KID and its spread everywhere
        assert entry["space"] == "classifier" and entry["kid_std"] > 0 and abs(entry["kid"]) < 1e6
    assert {"data_s", "teacher_s", "classifier_s", "distill_s", "eval_s", "total_s"} <= set(saved["timings"])
    ck = torch.load(os.path.join(run, "checkpoint.pt"), weights_only=False)
    assert ck["kind"] == "class-conditional" and ck["step"] == 12
    assert {"G", "critic", "g_opt", "c_opt", "g_sched", "c_sched", "rng", "data", "config", "history"} <= set(ck)
    assert any(k.startswith("head.") for k in ck["critic"]), "the GAN head is saved with the critic"


def test_cached_teacher_is_reused(tiny_run, tmp_path):
    run, _ = tiny_run
    mtime = os.path.getmtime(os.path.join(run, "teacher.pt"))
    metrics = ti.main(["--out", run, *TINY, "--iters", "4"])
    assert os.path.getmtime(os.path.join(run, "teacher.pt")) == mtime
    assert metrics["timings"]["teacher_s"] == 0 and metrics["timings"]["classifier_s"] == 0


def test_sample_py_on_the_run(tiny_run, tmp_path):
    run, _ = tiny_run
    from PIL import Image

    out = sample.main([run, "--labels", "3", "7", "--n", "5", "--seed", "1", "--out", str(tmp_path / "g.png")])
    w, h = Image.open(out).size
    assert (w, h) == (5 * 17 + 1, 2 * 17 + 1), "a row per label, n columns, 16 px + 1 px padding"
    again = sample.main([os.path.join(run, "checkpoint.pt"), "--labels", "3", "7", "--n", "5", "--seed", "1",
                         "--out", str(tmp_path / "g2.png")])
    assert open(out, "rb").read() == open(again, "rb").read(), "same seed, same image"
    with pytest.raises(SystemExit, match="classes 0..9"):
        sample.main([run, "--labels", "12"])


def test_ablation_writes_the_table_and_leaves_the_run_alone(tiny_run, tmp_path):
    import shutil

    run = str(tmp_path / "run")
    shutil.copytree(tiny_run[0], run)
    before = open(os.path.join(run, "checkpoint.pt"), "rb").read()
    table = ti.main(["--out", run, "--ablation", *TINY, "--iters", "5", "--eval-samples", "32"])
    assert open(os.path.join(run, "checkpoint.pt"), "rb").read() == before, "the run's own checkpoint is untouched"
    assert open(os.path.join(run, "ablation.md")).read() == table
    assert os.path.isfile(os.path.join(run, "ablation_brightness.png"))
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    assert [r[0] for r in rows[:7]] == ti.small.TABLES["all"] and [r[1] for r in rows[:7]] == ["1"] * 5 + ["4"] * 2
    assert all(float(r[2]) > 0 and 0 <= float(r[4]) <= 1 and float(r[5]) >= 0 for r in rows[:7])
    assert rows[7][:2] == ["teacher (euler)", "4"] and rows[8][:2] == ["teacher (heun)", "35"]
    assert rows[9][0] == "real vs real (floor)" and "±" in rows[9][3]
    for name in ti.small.TABLES["all"]:  # each variant trained with its own settings, from the same teacher
        over = ti.small.ABLATION[name]
        slug = name.split(" (")[0].replace(" + ", "_").replace(", ", "_").replace(" ", "_").lower()
        cfg = ti.edm.read_checkpoint(os.path.join(run, "ablation", slug + "_seed0"))["config"]
        assert all(cfg[k] == v for k, v in over.items()) and cfg["iters"] == 5


def test_headline_runs_the_second_phase_from_the_first_phases_best_checkpoint(tiny_run, tmp_path):
    """--ablation headline (App. F.2): DMD + TTUR evaluated periodically from iteration 0 (best.pt), then two second
    phases from that best.pt, with and without the GAN, at a lower constant lr for half the iterations; the periodic
    evaluations are plotted."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)
    table = ti.main(["--out", str(run), "--ablation", "headline", *TINY])
    assert [line.split(" | ")[0] for line in table.splitlines()[2:5]] == ["| " + n for n in ti.small.TABLES["headline"]]
    phase1 = run / "ablation" / "dmd_ttur_phase_1_seed0"
    assert [r["it"] for r in map(json.loads, open(phase1 / "log.jsonl")) if "eval_fd" in r] == [0, 12]
    best = ti.edm.read_checkpoint(str(phase1 / "best.pt"))
    for slug, gan in (("phase_2_dmd_ttur_gan", True), ("phase_2_dmd_ttur", False)):
        phase2 = run / "ablation" / f"{slug}_seed0"
        cfg = ti.edm.read_checkpoint(str(phase2))["config"]
        assert cfg["init_from"] == str(phase1 / "best.pt") and cfg["iters"] == 6 and cfg["lr"] == cfg["lr_final"]
        assert cfg["lr"] < ti.Config.lr and (cfg["gan_g"] > 0) == gan and best["config"]["gan_g"] == 0
        first = next(r for r in map(json.loads, open(phase2 / "log.jsonl")) if "eval_fd" in r)
        assert first["it"] == 0 and first["eval_fd"] == best["best"]["fd"], "phase 2 starts as phase 1's best"
    assert (run / "ablation_fd.png").is_file() and (run / "ablation_acc.png").is_file()


def test_flow_teacher_with_a_shifted_distillation_table(tmp_path, capsys):
    """--schedule flow: a velocity teacher, and a student distilled on SD3's shifted table (--shift 3: its 2 steps at
    sigma 1 and shift(0.5) = 0.75, recorded for sample.py), from the same cached teacher as an unshifted run;
    --shift is refused with EDM's schedule and on --resume."""
    run = str(tmp_path / "flow")
    ti.main(["--out", run, *TINY, "--schedule", "flow", "--steps", "2", "--shift", "3"])
    G, cfg = ti.edm.load_generator(run)
    assert isinstance(G.schedule, dmd2.FlowSchedule) and G.schedule.shift == 3 and cfg["steps"] == 2
    assert [round(G.schedule.sigmas[t].item(), 6) for t in dmd2.step_timesteps(2)] == [1.0, 0.75]
    assert isinstance(G.net, ti.edm.FlowPrecond)
    again = ti.main(["--out", run, *TINY, "--schedule", "flow", "--iters", "2"])
    assert again["timings"]["teacher_s"] == 0, "the teacher is trained without the shift: cached"
    sample.main([run, "--labels", "1", "--n", "2", "--out", str(tmp_path / "s.png")])
    for argv, message in ((["--shift", "3"], "goes with --schedule flow"),
                          (["--schedule", "flow", "--resume", "--shift", "2"], "cannot change --shift")):
        with pytest.raises(SystemExit):
            ti.main(["--out", run, *TINY, *argv])
        assert message in capsys.readouterr().err


@pytest.mark.slow  # the default suite stays within 5 minutes (docs/testing.md)
def test_ablation_over_seeds_reports_mean_and_spread(tiny_run, tmp_path, capsys):
    import shutil

    import numpy as np

    run = str(tmp_path / "run")
    shutil.copytree(tiny_run[0], run)
    table = ti.main(["--out", run, "--ablation", "table4", "--seeds", "2", *TINY, "--iters", "6"])
    lines = table.splitlines()  # a markdown table: as many cells in every row as in the delimiter row
    assert lines[0].startswith("| variant (2 seeds) |") and {line.count("|") for line in lines} == {10}
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [r[0] for r in rows[:2]] == ["4 steps, backward simulation", "4 steps, no backward simulation"]
    for r, slug in zip(rows[:2], ["4_steps_backward_simulation", "4_steps_no_backward_simulation"], strict=True):
        fds = [json.load(open(os.path.join(run, "ablation", f"{slug}_seed{s}", "metrics.json")))["student"]["fd"]
               for s in (0, 1)]
        assert fds[0] != fds[1], "the seeds differ"
        assert r[2] == f"{np.mean(fds):.2f} ± {np.std(fds, ddof=1):.2f}"
    with pytest.raises(SystemExit):
        ti.main(["--out", run, "--seeds", "2", *TINY])
    assert "--seeds N (>= 1) goes with --ablation" in capsys.readouterr().err


def test_a_teacher_with_a_known_error(tmp_path, monkeypatch, capsys):
    """--teacher-mislabel 0.5: the small teacher trains on the training digits with half of each class 0-4 labelled
    as the class 5 above (the GAN's real images and the evaluation keep the true labels); the classes the classifier
    sees in the samples are reported with their distance to uniform; the cached teacher is keyed by the share."""
    seen = []
    train = ti.small.train_teacher
    monkeypatch.setattr(ti.small, "train_teacher", lambda x, y, label_dim, **k: seen.append(y) or
                        train(x, y, label_dim, **k))
    run = str(tmp_path / "run")
    metrics = ti.main(["--out", run, *TINY, "--teacher-mislabel", "0.5", "--eval-every", "6"])
    (y,), true = seen, ti.small.mnist_digits(16)[1]
    moved = (y != true).nonzero().flatten()
    assert torch.equal(y[moved], true[moved] + 5) and (true[moved] < 5).all()
    for c in range(5):  # the first half of each class, in the split's order
        idx = (true == c).nonzero().flatten()
        assert torch.equal(idx[:round(len(idx) / 2)], moved[true[moved] == c])
    for entry in (metrics["student"], metrics["teacher"]["35"]):
        assert len(entry["classes"]) == 10 and abs(sum(entry["classes"]) - 1) < 1e-6
        assert entry["class_tv"] == pytest.approx(0.5 * sum(abs(f - 0.1) for f in entry["classes"]))
    assert [r["eval_class_tv"] >= 0 for r in ti.edm.read_checkpoint(run)["history"] if "eval_fd" in r] == [True] * 3
    with pytest.raises(SystemExit):
        ti.main(["--out", run, *TINY, "--teacher-mislabel", "0.25"])
    assert "made with {'mislabel': 0.5}, this run asks for {'mislabel': 0.25}" in capsys.readouterr().err


def test_a_fake_score_told_the_step(tmp_path, monkeypatch):
    """--fake-step (beyond the paper, dmd2.py section 7): mu_fake's label input gets the one-hot of the generator step
    that made a sample beside the class's, zero at first (it starts as the teacher); its denoising calls get (class,
    step) of G's input, the GAN's features the class alone."""
    torch.manual_seed(0)
    teacher = ti.edm.small_unet(16, 8, 10)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fake = ti.build_nets(ti.Config(channels=8, resolution=16, steps=4, fake_step=True), teacher, 1, "cpu").critic.fake
    weight = fake.net.model.map_label.weight
    assert weight.shape[1] == 14 and not weight[:, 10:].any()
    x, t, y = torch.randn(3, 1, 16, 16), torch.tensor([10, 500, 999]), torch.tensor([1, 2, 3])
    expected = ti.edm.EDMDenoiser(teacher, dmd2.EDMSchedule(), 10)(x, t, y)
    for cond in (y, torch.stack([y, torch.tensor([0, 3, 1])], 1)):
        torch.testing.assert_close(fake(x, t, cond), expected)
    with torch.no_grad():
        weight[:, 10:].normal_()
    assert not torch.allclose(fake(x, t, torch.stack([y, y * 0], 1)), fake(x, t, torch.stack([y, y * 0 + 3], 1)))
    conds, step = [], dmd2.train_iteration
    monkeypatch.setattr(dmd2, "train_iteration", lambda *a, **k: conds.append((a[9], a[10], k["fake_cond"])) or
                        step(*a, **k))
    ti.main(["--out", str(tmp_path), *TINY, "--iters", "6", "--steps", "4", "--fake-step"])
    for t_in, labels, fake_cond in conds:
        assert torch.equal(fake_cond, torch.stack([labels, [999, 749, 499, 249].index(int(t_in[0])) + 0 * labels], 1))


@pytest.mark.parametrize("backward", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_multi_step_student(tmp_path, monkeypatch, capsys, backward):
    """--steps 4: the generator's inputs come from backward simulation with one k per batch drawn from its own
    generator (or, without it, real images noised to the student's timesteps); evaluation and sample.py sample
    at the run's four timesteps; the student is reported at 4 NFE."""
    calls, samples = [], []
    simulate, draw = dmd2.backward_simulation, dmd2.sample
    monkeypatch.setattr(dmd2, "backward_simulation", lambda *a, **k: calls.append(a[3:5]) or simulate(*a, **k))
    monkeypatch.setattr(dmd2, "sample", lambda G, z, sch, ts, *a, **k: samples.append(list(ts)) or draw(G, z, sch, ts,
                                                                                                       *a, **k))
    inputs = []
    step = dmd2.train_iteration
    monkeypatch.setattr(dmd2, "train_iteration", lambda *a, **k: inputs.append((a[9].tolist(), len(calls))) or
                        step(*a, **k))
    run = str(tmp_path / "run")
    flags = ["--steps", "4"] + ([] if backward else ["--no-backward-simulation"])
    metrics = ti.main(["--out", run, *TINY, *flags])
    assert metrics["student"]["nfe"] == 4 and metrics["student"]["fd"] > 0
    assert len(inputs) == 12
    if backward:  # one backward simulation per iteration, before it; its t_k is the generator's timestep
        assert [n for _, n in inputs] == list(range(1, 13))
        ks = [calls[n - 1][1] for _, n in inputs]
        assert all(c[0] == [999, 749, 499, 249] for c in calls[:12])
        assert set(ks) <= {0, 1, 2, 3} and len(set(ks)) > 1, "one k per iteration, varying"
        assert all(set(t) == {[999, 749, 499, 249][k]} for (t, _), k in zip(inputs, ks, strict=True))
    else:
        assert all(n == 0 for _, n in inputs), "no backward simulation during training"
        ts = [v for t, _ in inputs for v in t]
        assert set(ts) <= {999, 749, 499, 249} and len(set(ts)) > 1, "real images noised to the student's steps"
    # evaluated at the run's timesteps, and each step's own x0 (the sampler stopped after it) on the same noise
    assert samples == [[999, 749, 499, 249], [999], [999, 749], [999, 749, 499], [999, 749, 499, 249]], samples
    m = metrics["student"]
    assert len(m["step_fd"]) == 4 and m["step_fd"][-1] == m["fd"] and m["step_acc"][-1] == m["accuracy"]
    samples.clear()
    sample.main([run, "--n", "2", "--out", str(tmp_path / "g.png")])
    assert samples and all(ts == [999, 749, 499, 249] for ts in samples), "sample.py uses the run's steps"
    cfg = ti.edm.read_checkpoint(run)["config"]
    assert cfg["steps"] == 4 and cfg["backward_simulation"] is backward
    with pytest.raises(SystemExit):
        ti.main(["--out", run, "--resume", "--steps", "1", "--iters", "20"])
    assert "cannot change --steps" in capsys.readouterr().err


@pytest.mark.parametrize("steps", ["1", pytest.param("4", marks=pytest.mark.slow)])
def test_resume_is_exact(tmp_path, steps, monkeypatch):
    clock = itertools.count(1000.0)  # a clock that always moves: the log's time goes on after a resume
    monkeypatch.setattr(ti.time, "time", lambda: next(clock))
    straight, split = str(tmp_path / "a"), str(tmp_path / "b")
    args = ["--steps", steps, "--teacher-iters", "10", "--classifier-iters", "5", "--batch", "6", "--log-every", "3",
            "--ckpt-every", "3", "--eval-samples", "16", "--warmup", "2", "--channels", "8", "--lr", "1e-3",
            "--lr-final", "1e-4", "--decay-iters", "10", "--eval-every", "3"]
    ti.main(["--out", straight, "--iters", "12", *args])
    for f in ("teacher.pt", "classifier.pt"):  # same teacher, without training it twice
        os.makedirs(split, exist_ok=True)
        with open(os.path.join(straight, f), "rb") as src, open(os.path.join(split, f), "wb") as dst:
            dst.write(src.read())
    ti.main(["--out", split, "--iters", "6", *args])
    ti.main(["--out", split, "--resume", "--iters", "12"])
    a = torch.load(os.path.join(straight, "checkpoint.pt"), weights_only=False)
    b = torch.load(os.path.join(split, "checkpoint.pt"), weights_only=False)
    for key in ("G", "critic"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    # every evaluation too (the one at the split point included), so the same best.pt; a 4-step student's with
    # each step's own Frechet distance, plotted
    evals = [r for r in b["history"] if "eval_fd" in r]
    assert [r["it"] for r in evals] == [0, 3, 6, 9, 12]
    assert all(len(r.get("eval_step_fd", [])) == (4 if steps == "4" else 0) for r in evals)
    assert os.path.isfile(os.path.join(split, "steps_fd.png")) == (steps == "4")
    assert a["history"] == [r | {k: v for k, v in ra.items() if k == "time"}
                            for r, ra in zip(b["history"], a["history"], strict=True)]
    times = [r["time"] for r in b["history"] if "time" in r]
    assert times == sorted(times) and len(set(times)) == len(times), times
    best_a, best_b = (torch.load(os.path.join(r, "best.pt"), weights_only=True) for r in (straight, split))
    assert best_a["step"] == best_b["step"] and all(torch.equal(best_a["G"][k], best_b["G"][k]) for k in best_a["G"])


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    run = str(tmp_path)
    common = ["--out", run, "--teacher-iters", "5", "--classifier-iters", "5", "--batch", "4", "--log-every", "2",
              "--ckpt-every", "2", "--eval-samples", "8", "--channels", "8"]
    ti.main([*common, "--iters", "2"])
    good = torch.load(os.path.join(run, "checkpoint.pt"), weights_only=False)
    real_loss = dmd2.fake_score_loss
    monkeypatch.setattr(dmd2, "fake_score_loss", lambda *a, **k: real_loss(*a, **k) * float("nan"))
    with pytest.raises(SystemExit) as e:
        ti.main([*common, "--iters", "4", "--resume"])
    assert e.value.code == 1 and "non-finite" in capsys.readouterr().err
    kept = torch.load(os.path.join(run, "checkpoint.pt"), weights_only=False)
    assert kept["step"] == 2 and all(torch.equal(good["G"][k], kept["G"][k]) for k in good["G"])


@pytest.mark.parametrize("argv,message", [
    (["--resolution", "24"], "power of two"),
    (["--teacher", "/nonexistent.pkl", "--data", "x.zip"], "does not exist"),
    (["--data", "x.zip"], "does not exist"),
    (["--steps", "0"], "--steps"),
    (["--no-such-option"], "unrecognized arguments"),
    (["--ratio", "0"], "must be >= 1"),
    (["--ema", "1.5"], "--ema"),
    (["--t-min", "0.9", "--t-max", "0.1"], "t_min"),
    (["--ablation", "flow", "--schedule", "edm"], "--shift (> 0) goes with --schedule flow"),  # a variant's settings
])
def test_bad_arguments_fail_early(argv, message, tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_imagenet.py"), "--out", str(tmp_path), *argv],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert os.listdir(tmp_path) == [], "nothing written before the arguments are checked"


def test_small_multi_step_defaults(tmp_path):
    """A small student of several steps trains at lr 1e-4 (at 4e-4 it swings), a flow one on the table shifted by 1/3;
    flags given win, and a one-step or paper-scale run keeps its own."""
    parse = lambda *a: ti.parse_args(["--out", str(tmp_path / str(len(os.listdir(tmp_path)))), *a])[0]  # noqa: E731
    assert (parse().lr, parse().shift) == (4e-4, 1.0)
    assert (parse("--steps", "4").lr, parse("--steps", "4").shift) == (1e-4, 1.0)
    assert (parse("--steps", "4", "--schedule", "flow").shift, parse("--schedule", "flow").shift) == (1 / 3, 1.0)
    assert parse("--steps", "4", "--schedule", "flow", "--shift", "3", "--lr", "4e-4").shift == 3.0
    assert parse("--steps", "4", "--schedule", "flow", "--shift", "3", "--lr", "4e-4").lr == 4e-4


def test_resume_without_checkpoint_fails_early(tmp_path):
    with pytest.raises(SystemExit):
        ti.parse_args(["--out", str(tmp_path), "--resume"])


def test_imagenet_architecture_is_edms_296m_adm():
    with torch.device("meta"):
        net = ti.edm.Precond(ti.edm.ADMUNet(64, 3, 1000))
    assert round(sum(p.numel() for p in net.parameters()) / 1e6, 1) == 295.9  # EDM's ImageNet-64 ADM
    assert list(net.model.enc)[-1] == "8x8_block2" and list(net.model.dec)[:2] == ["8x8_in0", "8x8_in1"]


def test_edm_denoiser_adapter_and_bottleneck():
    torch.manual_seed(0)
    sch = dmd2.EDMSchedule()
    net = ti.edm.small_unet(16, 8, 10).eval()
    with torch.no_grad():
        for p in net.parameters():  # zero-initialised output layers would hide mistakes
            p.add_(0.05 * torch.randn_like(p))
    den = ti.edm.EDMDenoiser(net, sch, 10)
    x, t, y = torch.randn(3, 1, 16, 16), torch.tensor([0, 500, 999]), torch.tensor([1, 2, 3])
    torch.testing.assert_close(den(x, t, y), net(x, sch.sigmas[t].float(), torch.nn.functional.one_hot(y, 10).float()))
    decoder_calls = []
    hook = next(iter(net.model.dec.values())).register_forward_pre_hook(lambda *a: decoder_calls.append(1))
    h = den.features(x, t, y)
    hook.remove()
    assert h.shape == (3, 32, 4, 4) and decoder_calls == [], "bottleneck taken without running the decoder"
    # the same tensor the full forward computes at the encoder's end
    grabbed = []
    hook = ti.edm.edm_encoder_output_module(net).register_forward_hook(lambda m, a, out: grabbed.append(out))
    den(x, t, y)
    hook.remove()
    torch.testing.assert_close(h, grabbed[0])
    # the GAN's generator loss flows through the bottleneck back to the input (the generator's output)
    x.requires_grad_(True)
    den.features(x, t, y).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_precond_matches_edm_formulas():
    model = lambda x, c_noise, labels: torch.full_like(x, 2.0) * c_noise.reshape(-1, 1, 1, 1)  # noqa: E731
    D = ti.edm.Precond(model, sigma_data=0.5)
    x, sigma = torch.ones(2, 1, 2, 2), torch.tensor([0.1, 10.0])
    out = D(x, sigma)
    for i, s in enumerate(sigma.tolist()):
        c_skip, c_out = 0.25 / (s**2 + 0.25), s * 0.5 / (s**2 + 0.25) ** 0.5
        c_noise = torch.log(torch.tensor(s)).item() / 4
        torch.testing.assert_close(out[i], torch.full((1, 2, 2), c_skip + c_out * 2 * c_noise))


def test_edm_sampler_one_step_is_the_denoiser_at_sigma_max():
    calls = []
    def net(x, sigma, labels):
        calls.append(sigma)
        return torch.zeros_like(x)
    z = torch.randn(2, 1, 4, 4)
    out = ti.edm.edm_sampler(net, z, torch.tensor([0, 1]), 10, steps=1, heun=False)
    torch.testing.assert_close(out, torch.zeros_like(z))
    assert len(calls) == 1, "one step is one network evaluation"
    calls.clear()
    ti.edm.edm_sampler(net, z, torch.tensor([0, 1]), 10, steps=18, heun=True)
    assert len(calls) == 35, "Heun with 18 steps = 35 NFE"
    assert calls[0][0].item() == pytest.approx(80.0) and calls[-1][0].item() == pytest.approx(0.002, rel=1e-3)


def test_no_option_is_a_prefix_of_a_torchrun_option():
    # torchrun parses every option-like argument, also after the script: an abbreviation of one of its own
    # options (e.g. --run for --run-path) makes it refuse the command line.
    from torch.distributed.run import get_args_parser

    torchrun = [o for a in get_args_parser()._actions for o in a.option_strings if o.startswith("--")]
    ours = [o for a in ti.build_parser()._actions for o in a.option_strings if o.startswith("--")]
    clashes = [(o, t) for o in ours for t in torchrun if t.startswith(o) and o not in ("--help",)]
    assert clashes == []


@pytest.mark.parametrize("channels", [8, 16])
def test_every_parameter_is_trained(channels):
    """Every parameter of G, the fake score and the GAN head receives gradient (DDP requires it)."""
    torch.manual_seed(0)
    cfg = ti.Config(channels=channels, resolution=16)
    teacher = ti.edm.small_unet(16, channels, 10)
    with torch.no_grad():
        for p in teacher.parameters():  # away from the zero initialisation of output layers
            p.add_(0.02 * torch.randn_like(p))
    nets = ti.build_nets(cfg, teacher, 1, torch.device("cpu"))
    g_opt = torch.optim.SGD(nets.G.parameters(), lr=0.0)
    c_opt = torch.optim.SGD(nets.critic.parameters(), lr=0.0)
    x_real, y = torch.randn(4, 1, 16, 16), torch.arange(4)
    teacher_den = ti.edm.EDMDenoiser(teacher, dmd2.EDMSchedule(), 10)
    dmd2.generator_step(nets.G, g_opt, 80 * torch.randn(4, 1, 16, 16), torch.full((4,), 999), teacher_den,
                        nets.critic, nets.critic.head, dmd2.EDMSchedule(), y, dmd2.TTUR(gan_g=1.0))
    assert [n for n, p in nets.G.named_parameters() if p.grad is None] == []
    dmd2.critic_step(nets.critic, nets.critic.head, c_opt, torch.randn(4, 1, 16, 16), dmd2.EDMSchedule(), y,
                     x_real, y, dmd2.TTUR())
    assert [n for n, p in nets.critic.named_parameters() if p.grad is None] == []


def test_periodic_evaluation_keeps_the_best_checkpoint_for_init_from(tmp_path):
    """App. F.2's longer schedule starts phase 2 from the best checkpoint by FID: best.pt, named in the log."""
    run, two = tmp_path / "run", tmp_path / "two"
    metrics = ti.main(["--out", str(run), *TINY, "--eval-every", "4"])
    rows = [json.loads(line) for line in open(run / "log.jsonl")]
    evals = [r for r in rows if "eval_fd" in r]
    assert [r["it"] for r in evals] == [0, 4, 8, 12], "the curve starts at the teacher's weights (iteration 0)"
    assert all(0 <= r["eval_acc"] <= 1 and r["eval_kid"] is not None for r in evals)
    assert "best_fd" not in evals[0], "best.pt is a trained checkpoint"
    best = min(evals[1:], key=lambda r: r["eval_fd"])
    assert (evals[-1]["best_fd"], evals[-1]["best_it"]) == (best["eval_fd"], best["it"])
    assert metrics["best"] == dict(fd=best["eval_fd"], step=best["it"], checkpoint="best.pt")
    assert metrics["student"]["fd"] == evals[-1]["eval_fd"], "the final evaluation is the last periodic one"
    ck = ti.edm.read_checkpoint(str(run / "best.pt"))
    assert ck["step"] == best["it"] and ck["best"]["fd"] == best["eval_fd"]
    two.mkdir()
    for f in ("teacher.pt", "classifier.pt"):
        (two / f).write_bytes((run / f).read_bytes())
    ti.main(["--out", str(two), *TINY, "--iters", "1", "--init-from", str(run / "best.pt"), "--lr", "0",
             "--gan-g", "0", "--gan-d", "0", "--ema", "0.99"])
    start = ti.edm.read_checkpoint(str(two))
    assert all(torch.equal(start["G"][k], ck["G"][k]) for k in ck["G"]), "phase 2 starts from best.pt's weights"
    # so does the generator's EMA (lr 0: the EMA of an unchanged generator is that generator, not the teacher)
    assert all(torch.equal(start["ema"][k], ck["G"][k]) for k in ck["G"]), "the EMA starts from best.pt's G"


def test_resume_with_an_ema_that_the_run_did_not_keep(tiny_run, tmp_path):
    """--resume --ema on a run saved without an EMA starts the EMA from the resumed generator (lr 0: they stay
    equal), instead of loading None into it."""
    import shutil

    run = str(tmp_path / "run")
    shutil.copytree(tiny_run[0], run)
    assert ti.edm.read_checkpoint(run)["ema"] is None
    grid = open(os.path.join(run, "samples.png"), "rb").read()
    metrics = ti.main(["--out", run, "--eval-only", "--ema", "0.99"])  # --eval-only too: the EMA is G, not the teacher
    assert metrics["student_ema"]["fd"] == metrics["student"]["fd"]
    assert open(os.path.join(run, "samples.png"), "rb").read() == grid, "the grid of the EMA, which is G"
    ti.main(["--out", run, "--resume", "--iters", "14", "--ema", "0.99", "--lr", "0", "--eval-samples", "64"])
    ck = ti.edm.read_checkpoint(run)
    assert ck["step"] == 14 and all(torch.equal(ck["ema"][k], ck["G"][k]) for k in ck["G"])


@pytest.mark.slow  # the default suite stays within 5 minutes (docs/testing.md)
def test_a_checkpoint_from_before_the_heads_own_learning_rate_resumes(tiny_run, tmp_path):
    """A checkpoint whose critic optimiser has one parameter group (written before --head-lr) resumes: the group is
    split into the fake score's and the head's, each with the saved learning rate, and the run goes on as the same
    checkpoint saved with two groups does."""
    import shutil

    ends = []
    for name in ("two groups", "one group"):
        run = str(tmp_path / name)
        shutil.copytree(tiny_run[0], run)
        if name == "one group":  # as an older version wrote it
            path = os.path.join(run, "checkpoint.pt")
            ck = torch.load(path, weights_only=True)
            fake, head = ck["c_opt"]["param_groups"]
            ck["c_opt"]["param_groups"] = [fake | {"params": fake["params"] + head["params"]}]
            ck["c_sched"] = {k: v[:1] if isinstance(v, list) else v for k, v in ck["c_sched"].items()}
            del ck["config"]["head_lr"]
            torch.save(ck, path)
        ti.main(["--out", run, "--resume", "--iters", "14", "--eval-samples", "16"])
        ends.append(ti.edm.read_checkpoint(run))
    assert len(ends[1]["c_opt"]["param_groups"]) == 2
    for key in ("G", "critic"):
        assert all(torch.equal(ends[0][key][k], ends[1][key][k]) for k in ends[0][key]), key


@pytest.mark.slow  # the default suite stays within 5 minutes (docs/testing.md)
def test_ablation_reuses_a_run_only_if_everything_that_decides_it_is_the_same(tiny_run, tmp_path, monkeypatch):
    """--ablation reuses a finished run when its metrics.json holds the same identity: the settings, the code, the
    teacher's and the classifier's weights and the --init-from checkpoint's. A rerun with new settings interrupted
    after its first checkpoint (a), a retrained first phase (b), other code or another teacher (c) retrain."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)
    trained, real = [], ti.distill
    monkeypatch.setattr(ti, "distill", lambda cfg, *a, **k: trained.append(os.path.basename(cfg.out)) or
                        real(cfg, *a, **k))
    argv = ["--out", str(run), "--ablation", "headline", *TINY, "--iters", "2", "--ckpt-every", "2"]

    def trains(*extra) -> list[str]:
        trained.clear()
        ti.main([*argv, *extra])
        return sorted(trained)

    every = sorted(["dmd_ttur_phase_1_seed0", "phase_2_dmd_ttur_gan_seed0", "phase_2_dmd_ttur_seed0"])
    assert trains() == every and trains() == [], "nothing changed: every run is reused"
    best = run / "ablation" / every[0] / "best.pt"  # (b) phase 1 retrained to other weights
    ck = torch.load(best, weights_only=True)
    torch.save(ck | {"G": {k: v + 0.01 for k, v in ck["G"].items()}}, best)
    assert trains() == every[1:], "the second phases start from other weights"
    with monkeypatch.context() as m:  # (c) other code
        m.setattr(ti.runs, "code_digest", lambda script: "other code")
        assert trains() == every
    teacher = torch.load(run / "teacher.pt", weights_only=True)  # (c) another teacher of the same recipe
    torch.save(teacher | {"net": {k: v * 1.01 for k, v in teacher["net"].items()}}, run / "teacher.pt")
    assert trains() == every
    save = ti.runs.save_atomic  # (a) new settings, interrupted after phase 1's first checkpoint

    def interrupted(obj, path):
        save(obj, path)
        if str(path).endswith("checkpoint.pt"):
            raise KeyboardInterrupt

    with monkeypatch.context() as m, pytest.raises(SystemExit):
        m.setattr(ti.runs, "save_atomic", interrupted)
        trains("--iters", "4")
    assert trains("--iters", "4") == every
    assert json.load(open(run / "ablation" / every[0] / "metrics.json"))["iters"] == 4


@pytest.mark.slow  # the default suite stays within 5 minutes (docs/testing.md)
def test_the_gan_head_has_its_own_learning_rate(tiny_run, tmp_path):
    """--head-lr: the head's parameters are the critic optimiser's second group, at that lr with the same warm-up and
    decay as the fake score's --lr; a resumed run keeps both."""
    import shutil

    run = str(tmp_path / "run")
    shutil.copytree(tiny_run[0], run)
    ti.main(["--out", run, *TINY, "--lr", "1e-4", "--head-lr", "1e-3", "--iters", "6"])
    ti.main(["--out", run, "--resume", "--iters", "8", "--eval-samples", "64"])
    ck = ti.edm.read_checkpoint(run)
    fake, head = ck["c_opt"]["param_groups"]
    n_head = sum(1 for k in ck["critic"] if k.startswith("head."))
    assert len(head["params"]) == n_head and len(fake["params"]) > n_head  # the head's tensors are all parameters
    assert head["lr"] == pytest.approx(10 * fake["lr"]) and 0 < fake["lr"] < 1e-4
    assert ck["c_sched"]["base_lrs"] == [1e-4, 1e-3]
    ti.main(["--out", run, "--resume", "--iters", "10", "--head-lr", "0"])  # 0 is a learning rate: the head stays
    after = ti.edm.read_checkpoint(run)["critic"]
    same = {k: torch.equal(after[k], ck["critic"][k]) for k in after}
    assert all(v for k, v in same.items() if k.startswith("head.")) and not all(same.values())


def _runs_with(tiny_run, tmp_path, flags: tuple[str, ...]) -> list[dict]:
    """The tiny run's folder copied once per flag and trained 5 iterations with it: the checkpoints."""
    import shutil

    out = []
    for flag in flags:
        run = str(tmp_path / flag)
        shutil.copytree(tiny_run[0], run)
        ti.main(["--out", run, *TINY, "--iters", "5", flag])
        out.append(torch.load(os.path.join(run, "checkpoint.pt"), weights_only=True))
    return out


@pytest.mark.slow
def test_compile_flag_compiles_the_three_networks_and_keeps_the_results(tiny_run, tmp_path, monkeypatch):
    """--compile: G, the fake score and the teacher run torch.compiled (here with the eager backend: dynamo's
    tracing without code generation, seconds instead of minutes) and train to the same weights."""
    compiled = []
    real_compile = ti.edm.compile_networks

    def eager(*modules):
        compiled.extend(type(m).__name__ for m in modules)
        real_compile(*modules, backend="eager")

    monkeypatch.setattr(ti.edm, "compile_networks", eager)
    runs = _runs_with(tiny_run, tmp_path, ("--no-compile", "--compile"))
    assert compiled == ["EDMDenoiser", "Critic", "EDMDenoiser"]
    for key in ("G", "critic"):
        assert all(torch.allclose(runs[0][key][k], runs[1][key][k], atol=1e-6) for k in runs[0][key]), key


class _Recorder(torch.Generator):
    """torch.Generator recording every seed it is given (the random streams a run opens)."""

    seeds: list[int] = []

    def manual_seed(self, seed):
        _Recorder.seeds.append(int(seed))
        return super().manual_seed(seed)


def test_no_random_stream_is_shared(tiny_run, tmp_path, monkeypatch):
    """Every generator a run seeds gets the seed of one stream (seed, role, indices), and no two streams share a
    seed: not two roles within a run (the old training and evaluation noise), nor two runs' seeds (with
    seed * 1000 + rank, seed 1's training noise was seed 0's evaluation noise). The fixed data split and the
    brightness probe are the only streams that no run's seed changes."""
    import shutil

    from support import data, edm, metrics, small

    streams: dict[int, tuple] = {}
    real = ti.runs.stream_seed

    def recorded(seed, role, *index):
        value = real(seed, role, *index)
        assert streams.setdefault(value, (seed, role, *index)) == (seed, role, *index), "two streams, one seed"
        return value

    for module in (ti.runs, data, edm, metrics, small):
        monkeypatch.setattr(module, "stream_seed", recorded)
    monkeypatch.setattr(torch, "Generator", _Recorder)
    used = []
    for seed in (0, 1):
        run = str(tmp_path / f"s{seed}")
        shutil.copytree(tiny_run[0], run)
        _Recorder.seeds = []
        ti.main(["--out", run, *TINY, "--iters", "6", "--steps", "2", "--seed", str(seed)])
        roles = [streams.get(s, ("fixed",) if s == 12345 else None) for s in _Recorder.seeds]
        assert None not in roles, "a generator seeded outside runs.stream_seed"
        seen = {r[1:] for r in roles if r[0] == seed}
        assert {("noise", 0), ("k",), ("data", 0), ("sampler", 0), ("eval", 0), ("grid",), ("grid steps",)} <= seen
        used.append(set(_Recorder.seeds))
    assert used[0] & used[1] == {real(0, "split"), 12345}, "a stream shared by two seeds"
    assert real(0, "noise", 0) != real(0, "noise") and real(0, "noise", 0) != real(0, "noise", 0, 0)


def test_multi_step_sampler_noise_differs_between_ranks():
    """Under torchrun each rank evaluates its own samples: the fresh noise of a multi-step student's re-noising
    differs between ranks. An exact Gaussian denoiser (data N(0, 0.1^2)) forgets its input, so with shared
    re-noising two ranks' 4-step samples would agree (cosine 1)."""
    cfg = ti.Config(steps=4)

    class Gaussian(torch.nn.Module):  # the exact denoiser of N(0, s^2) data on the EDM grid
        def __init__(self):
            super().__init__()
            self.schedule, self.w = dmd2.EDMSchedule(), torch.nn.Parameter(torch.zeros(()))

        def forward(self, x_t, t, labels):
            sigma = self.schedule.sigma(t, x_t)
            return 0.1**2 / (0.1**2 + sigma**2) * x_t

    z = torch.randn(2, 8, 1, 4, 4, generator=torch.Generator().manual_seed(0))  # each rank its own z
    out = [ti.sampler(Gaussian(), cfg, rank)(z[rank], torch.zeros(8, dtype=torch.long)) for rank in (0, 1)]
    cos = torch.nn.functional.cosine_similarity(out[0].flatten(1), out[1].flatten(1)).abs()
    assert cos.max() < 0.95, cos
