"""The paper-scale path of train_imagenet.py on tiny inputs: an EDM pickle written in EDM's persistence format,
an EDM-format dataset zip, FID against reference statistics (with a stand-in feature extractor: the real
Inception cannot be downloaded here), the two-phase schedule, and two-process DDP on CPU (gloo)."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from test_data import random_images, write_dataset
from test_edm import EDMPersistence, tiny_edm_net

import train_imagenet as ti

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W = torch.randn(3 * 8 * 8, 6, generator=torch.Generator().manual_seed(0))  # stand-in "Inception": 6-d features


def stand_in_extractor(device):
    return lambda images: (images.flatten(1).float() / 255) @ W.to(images.device)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("imagenet")
    writer = EDMPersistence()
    _module, net = tiny_edm_net(writer)
    pkl = d / "edm-tiny.pkl"
    pkl.write_bytes(writer.dumps(dict(ema=net)))
    images = random_images(40, res=8)
    data = write_dataset(d / "data.zip", images, [i % 10 for i in range(40)])
    feats = stand_in_extractor("cpu")(torch.from_numpy(images).permute(0, 3, 1, 2)).double().numpy()
    ref = d / "ref.npz"
    np.savez(ref, mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
    return str(pkl), data, str(ref), net


def test_paper_path_trains_and_evaluates(inputs, tmp_path, monkeypatch):
    pkl, data, ref, net = inputs
    monkeypatch.setattr(ti.metrics, "inception_extractor", stand_in_extractor)
    run = str(tmp_path / "run")
    metrics = ti.main(["--teacher", pkl, "--data", data, "--ref", ref, "--out", run, "--resolution", "8",
                       "--label-dim", "10", "--batch", "4", "--iters", "6", "--log-every", "2", "--ckpt-every", "3",
                       "--eval-samples", "32", "--workers", "0", "--lr", "1e-3"])
    cfg = ti.edm.read_checkpoint(run)["config"]
    assert tuple(cfg[k] for k in ("ratio", "gan_g", "gan_d", "weight_decay", "max_grad_norm")) == (5, 3e-3, 1e-2,
                                                                                                 0.01, 10.0)
    assert cfg["lr_final"] is None, "the paper's settings (constant lr) are the defaults"
    assert cfg["warmup"] == 72, "the authors' 500 warm-up steps advanced once per process (7) per iteration"
    assert metrics["student"]["fd"] > 0 and "teacher" not in metrics
    ck = ti.edm.read_checkpoint(run)
    assert ck["critic"]["head.proj.weight"].shape == (1, 16), "GAN head on the 4x4x16 bottleneck"
    # G started from the teacher and moved; the teacher's own weights are those of the pickle
    G, _ = ti.edm.load_generator(run)
    teacher = ti.edm.edm_teacher(pkl)
    assert any(not torch.equal(a, b) for a, b in zip(G.net.state_dict().values(), teacher.state_dict().values(),
                                                         strict=True))
    assert all(torch.equal(a, b) for a, b in zip(teacher.model.state_dict().values(), net.model.state_dict().values(),
                                                 strict=True))
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 20.0])
    labels = torch.eye(10)[[1, 2]]
    torch.testing.assert_close(teacher(x, sigma, labels), net(x, sigma, labels), rtol=1e-5, atol=1e-5)
    # sample.py on the result
    import sample

    out = sample.main([run, "--labels", "0", "5", "--n", "3", "--out", str(tmp_path / "g.png")])
    assert os.path.isfile(out)


def test_training_without_reference_statistics_skips_the_evaluations(inputs, tmp_path):
    """No --ref: training (periodic evaluation due at the end, as with --eval-every 5000 by default) runs and
    writes its checkpoint and samples; nothing is scored, no best.pt."""
    pkl, data, _ref, _net = inputs
    run = str(tmp_path / "run")
    metrics = ti.main(["--teacher", pkl, "--data", data, "--out", run, "--resolution", "8", "--label-dim", "10",
                       "--batch", "4", "--iters", "2", "--eval-every", "1", "--workers", "0"])
    assert "student" not in metrics and ti.edm.read_checkpoint(run)["step"] == 2
    assert os.path.isfile(os.path.join(run, "samples.png")) and not os.path.exists(os.path.join(run, "best.pt"))


def test_two_phase_schedule(tmp_path):
    """Phase 1 without GAN; phase 2 starts from its weights with the GAN on (a new head, new optimizers)."""
    common = ["--teacher-iters", "5", "--classifier-iters", "5", "--batch", "4", "--log-every", "2",
              "--eval-samples", "8", "--channels", "8"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    ti.main(["--out", one, *common, "--iters", "3", "--gan-g", "0", "--gan-d", "0"])
    assert not any(k.startswith("head.") for k in ti.edm.read_checkpoint(one)["critic"])
    os.makedirs(two)
    for f in ("teacher.pt", "classifier.pt"):
        with open(os.path.join(one, f), "rb") as a, open(os.path.join(two, f), "wb") as b:
            b.write(a.read())
    ti.main(["--out", two, *common, "--iters", "2", "--init-from", one, "--lr", "0", "--gan-g", "3e-3",
             "--gan-d", "1e-2"])
    a, b = ti.edm.read_checkpoint(one), ti.edm.read_checkpoint(two)
    assert all(torch.equal(a["G"][k], b["G"][k]) for k in a["G"]), "lr 0: G is phase 1's"
    assert all(torch.equal(a["critic"][k], b["critic"][k]) for k in a["critic"])
    assert any(k.startswith("head.") for k in b["critic"]) and b["step"] == 2


HARNESS = textwrap.dedent("""
    import os, sys, torch
    sys.path.insert(0, {root!r})
    import train_imagenet as ti
    run_distill = ti.distill

    def distill(*args, **kwargs):  # keep every rank's final weights
        nets = run_distill(*args, **kwargs)
        torch.save(dict(G=nets.G.state_dict(), critic=nets.critic.state_dict()),
                   os.path.join(sys.argv[sys.argv.index("--out") + 1], f"rank{{os.environ['RANK']}}.pt"))
        return nets

    ti.distill = distill
    ti.main(sys.argv[1:])
""")


@pytest.mark.slow
def test_two_process_ddp_gives_identical_weights(tmp_path):
    script = tmp_path / "harness.py"
    script.write_text(HARNESS.format(root=ROOT))
    run = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           "--out", run, "--teacher-iters", "5", "--classifier-iters", "5", "--iters", "6", "--batch", "8",
           "--log-every", "3", "--ckpt-every", "3", "--eval-samples", "16", "--channels", "8", "--lr", "1e-3",
           "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(os.path.join(run, "rank0.pt"), weights_only=False)
    r1 = torch.load(os.path.join(run, "rank1.pt"), weights_only=False)
    start = ti.edm.small_unet(16, 8, 10)
    start.load_state_dict(torch.load(os.path.join(run, "teacher.pt"), weights_only=False)["net"])
    for key in ("G", "critic"):
        assert all(torch.equal(r0[key][k], r1[key][k]) for k in r0[key]), f"{key} differs between ranks"
    assert not torch.equal(r0["G"]["net.model.out_conv.weight"], start.model.out_conv.weight), "G trained"
    ck = ti.edm.read_checkpoint(run)
    assert len(ck["rng"]) == 2 and ck["rng"][0]["gen"].tolist() != ck["rng"][1]["gen"].tolist(), "per-rank seeds"
    assert all(torch.equal(ck["G"][k], r0["G"][k]) for k in ck["G"])


def test_bad_reference_statistics_fail_before_training(inputs, tmp_path):
    pkl, data, ref, _net = inputs
    (tmp_path / "not.npz").write_text("not an npz")
    np.savez(tmp_path / "keys.npz", mean=np.zeros(6), cov=np.eye(6))
    for bad in ("not.npz", "keys.npz"):
        out = tmp_path / f"run-{bad}"
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_imagenet.py"), "--teacher", pkl, "--data",
                               data, "--ref", str(tmp_path / bad), "--out", str(out), "--resolution", "8",
                               "--label-dim", "10"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "--ref" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not out.exists()


def test_teacher_resolution_and_channels_are_checked(inputs, tmp_path, capsys):
    """An 8 px RGB teacher: 16 px data at --resolution 16, or 1-channel data, stop before training in one line."""
    pkl, _data, _ref, _net = inputs
    big = write_dataset(tmp_path / "big.zip", random_images(8, res=16), [0] * 8)
    gray = write_dataset(tmp_path / "gray.zip", random_images(8, res=8, channels=1), [0] * 8)
    for data, res, message in ((big, "16", "8 px network, --resolution is 16"), (gray, "8", "3-channel images")):
        with pytest.raises(SystemExit) as e:
            ti.main(["--teacher", pkl, "--data", data, "--out", str(tmp_path / "r"), "--resolution", res,
                     "--label-dim", "10", "--batch", "4", "--workers", "0"])
        err = capsys.readouterr().err
        assert e.value.code == 1 and message in err and err.count("\n") == 1, err
        assert not (tmp_path / "r" / "log.jsonl").exists()


@pytest.mark.parametrize("arch,label_dim", [("ddpmpp", 10), ("ncsnpp", 0), ("adm", 0), ("skip", 10)])
def test_edm_teachers_of_every_architecture_distil_end_to_end(arch, label_dim, tmp_path, monkeypatch):
    """EDM's released teacher families, in EDM's pickle format: DDPM++ (SongUNet, e.g. edm-cifar10-32x32-cond-vp),
    NCSN++ (Fourier embedding, residual encoder), ADM, conditional and unconditional (FFHQ / AFHQv2): the GAN head
    sits on the last encoder block's output, training and evaluation run, sample.py draws from the result."""
    from edm_pickles import EDM_CONFIGS, edm_pickle

    import sample

    model_type, kw = EDM_CONFIGS[arch]
    pkl = str(tmp_path / f"{arch}.pkl")
    net = edm_pickle(pkl, model_type, label_dim, 8, 3, **kw)
    images = random_images(16, res=8)
    data = write_dataset(tmp_path / "data.zip", images, [i % 10 for i in range(16)] if label_dim else None)
    feats = stand_in_extractor("cpu")(torch.from_numpy(images).permute(0, 3, 1, 2)).double().numpy()
    np.savez(tmp_path / "ref.npz", mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
    monkeypatch.setattr(ti.metrics, "inception_extractor", stand_in_extractor)
    run = str(tmp_path / "run")
    metrics = ti.main(["--teacher", pkl, "--data", data, "--ref", str(tmp_path / "ref.npz"), "--out", run,
                       "--resolution", "8", "--label-dim", str(label_dim), "--batch", "4", "--iters", "5",
                       "--log-every", "5", "--ckpt-every", "5", "--eval-samples", "16", "--workers", "0",
                       "--lr", "1e-3"])
    assert metrics["student"]["fd"] > 0 and metrics["student"]["nfe"] == 1
    ck = ti.edm.read_checkpoint(run)
    last = list(net.model.enc.values())[-1]
    assert ck["critic"]["head.proj.weight"].shape == (1, last.out_channels), "GAN head on the 4x4 bottleneck"
    G, cfg = ti.edm.load_generator(run)
    assert type(G.net.model).__name__ == model_type and cfg["label_dim"] == label_dim
    moved = [k for k, v in G.net.state_dict().items() if not torch.equal(v, net.state_dict()[k])]
    assert moved, "G trained"
    out = sample.main([run, "--n", "2", "--out", str(tmp_path / "g.png")])
    assert os.path.isfile(out)
