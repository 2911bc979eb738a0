"""What runs survive, and what users see when something is wrong: one `error: ...` line and a non-zero exit for
bad input (before any work), an exclusive lock on the run folder, no overwritten networks, stale temporary files
removed, Ctrl-C, non-finite values, and files that would run code when unpickled."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from test_data import random_images, write_dataset
from test_edm import EDMPersistence, tiny_edm_net

import dmd2
import sample
import train_imagenet as ti
from support import runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--teacher-iters", "5", "--classifier-iters", "5", "--iters", "6", "--batch", "4", "--log-every", "4",
        "--ckpt-every", "3", "--eval-samples", "8", "--channels", "8"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    ti.main(["--out", str(run), *TINY])
    return run


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """A private copy of the tiny run folder."""
    return shutil.copytree(tiny_run, tmp_path / "run")


@pytest.fixture(scope="module")
def teacher_pickle(tmp_path_factory):
    d = tmp_path_factory.mktemp("pkl")
    writer = EDMPersistence()
    _module, net = tiny_edm_net(writer)
    (d / "edm.pkl").write_bytes(writer.dumps(dict(ema=net)))
    return str(d / "edm.pkl")


class Payload:
    """Unpickling this runs `touch <path>`: what a crafted checkpoint would do with weights_only=False."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def one_error_line(capsys) -> str:
    """The one `error: ...` line on stderr (progress bars of work already done may precede it), no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err and err.rstrip().endswith(lines[0]), err[-2000:]
    return lines[0]


def expect_error(main, argv, capsys, message: str) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code in (1, 2)
    assert message in one_error_line(capsys)


# ----------------------------------------------------------------------------------------------------
# Bad input: one line, a non-zero exit, before any work


def test_bad_checkpoints_and_arguments_of_train_imagenet(run_copy, tmp_path, capsys):
    ck = run_copy / "checkpoint.pt"
    good = ck.read_bytes()
    cases = []
    for name, data in (("truncated", good[: len(good) // 2]), ("random", os.urandom(4096))):
        ck.write_bytes(data)
        expect_error(ti.main, ["--out", str(run_copy), "--resume"], capsys, "is not a readable checkpoint")
        cases.append(name)
    (tmp_path / "random.pt").write_bytes(os.urandom(4096))
    expect_error(ti.main, ["--out", str(tmp_path / "new"), *TINY, "--init-from", str(tmp_path / "random.pt")],
                 capsys, "is not a readable checkpoint")
    ck.write_bytes(good)
    expect_error(ti.main, ["--out", str(run_copy), "--resume", "--channels", "16"], capsys, "cannot change --channels")
    expect_error(ti.main, ["--out", str(run_copy), "--resume", "--label-dim", "5"], capsys, "--label-dim")
    expect_error(ti.main, ["--out", str(run_copy), "--resume", "--iters", "3"], capsys, "below the checkpoint's")
    expect_error(ti.main, ["--out", str(tmp_path / "n2"), *TINY, "--channels", "16", "--init-from", str(run_copy)],
                 capsys, "its networks differ")
    (tmp_path / "file").write_text("x")
    for argv, message in [(["--out", str(tmp_path / "file")], "is a file"),
                          (["--channels", "48"], "no small UNet"),
                          (["--lr", "-1"], "--lr must be a finite number >= 0"),
                          (["--eval-samples", "1"], "--eval-samples must be >= 2"),
                          (["--batch", "5000"], "larger than the 4000 training digits"),
                          (["--resolution", "8"], "GAN head needs a bottleneck")]:
        expect_error(ti.main, ["--out", str(tmp_path / "n3"), *TINY, *argv], capsys, message)
    assert not (tmp_path / "n3").exists() and not (tmp_path / "new").exists()


def test_unwritable_run_folder(tmp_path, capsys):
    expect_error(ti.main, ["--out", "/sys", *TINY], capsys, "cannot write there")


@pytest.mark.parametrize("kind", ["empty", "not an image", "truncated", "random pickle"])
def test_bad_data_and_teacher_files(kind, teacher_pickle, tmp_path, capsys):
    data = tmp_path / "data"
    teacher = teacher_pickle
    if kind == "empty":
        data.mkdir()
        message = "no images found"
    else:
        write_dataset(data, random_images(8), [0] * 8)
        png = data / "00000" / "img00000003.png"
        message = "cannot read image"
        if kind == "not an image":
            png.write_text("hello")
        elif kind == "truncated":
            png.write_bytes(png.read_bytes()[:-30])
        else:
            (tmp_path / "t.pkl").write_bytes(np.random.default_rng(0).bytes(1000))
            teacher, message = str(tmp_path / "t.pkl"), "pickle"
    expect_error(ti.main, ["--teacher", teacher, "--data", str(data), "--out", str(tmp_path / "r"), "--resolution",
                           "8", "--label-dim", "10", "--batch", "4", "--workers", "0"], capsys, message)


def test_bad_input_to_sample_py(tiny_run, tmp_path, capsys):
    expect_error(sample.main, [str(tiny_run), "--out", str(tmp_path / "missing" / "g.png")], capsys,
                 "existing folder")
    expect_error(sample.main, [str(tiny_run), "--out", str(tmp_path)], capsys, "existing folder")
    (tmp_path / "empty").mkdir()
    expect_error(sample.main, [str(tmp_path / "empty")], capsys, "no student here")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "checkpoint.pt").write_bytes(os.urandom(2048))
    expect_error(sample.main, [str(tmp_path / "bad")], capsys, "is not a readable checkpoint")


# ----------------------------------------------------------------------------------------------------
# Nothing overwritten, nothing lost


def test_cached_teacher_is_never_overwritten(run_copy, capsys):
    teacher = run_copy / "teacher.pt"
    before = teacher.read_bytes()
    expect_error(ti.main, ["--out", str(run_copy), *TINY, "--teacher-iters", "7"], capsys,
                 "cached teacher (teacher.pt) made with")
    assert teacher.read_bytes() == before


def test_second_run_on_the_same_folder_is_refused(run_copy, capsys):
    holder = runs.RunLock(run_copy)  # as a running process holds it
    try:
        expect_error(ti.main, ["--out", str(run_copy), "--resume", "--iters", "8"], capsys,
                     f"in use by process {os.getpid()}")
    finally:
        holder.release()
    (run_copy / ".lock").write_text("999999999")  # left by a killed run: the kernel released its lock
    (run_copy / "checkpoint.pt.tmp999999999").write_bytes(b"partial")  # a kill during a checkpoint write
    ti.main(["--out", str(run_copy), "--resume", "--iters", "8"])
    assert not list(run_copy.glob("*.tmp*")) and ti.edm.read_checkpoint(str(run_copy))["step"] == 8


@pytest.mark.slow  # the default suite stays within 5 minutes (docs/testing.md)
def test_interrupted_mid_interval_logs_the_same_means(tmp_path, monkeypatch, capsys):
    """Stopped at iteration 4 (checkpoint at 3, rows every 4): the resumed run's log equals an uninterrupted one."""
    args = [*TINY, "--iters", "8", "--ckpt-every", "3", "--log-every", "4"]
    straight, split = tmp_path / "a", tmp_path / "b"
    ti.main(["--out", str(straight), *args])
    split.mkdir()
    for f in ("teacher.pt", "classifier.pt"):
        shutil.copy(straight / f, split / f)
    iteration = dmd2.train_iteration

    def stop_at_4(it, *a, **k):
        if it == 4:
            raise KeyboardInterrupt
        return iteration(it, *a, **k)

    monkeypatch.setattr(dmd2, "train_iteration", stop_at_4)
    with pytest.raises(SystemExit) as e:
        ti.main(["--out", str(split), *args])
    assert e.value.code == 130 and "continues from" in capsys.readouterr().err
    monkeypatch.setattr(dmd2, "train_iteration", iteration)
    ti.main(["--out", str(split), "--resume"])
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time"} for r in rows]  # noqa: E731
    assert strip(ti.edm.read_checkpoint(str(split))["history"]) == strip(ti.edm.read_checkpoint(str(straight))[
        "history"])


def test_resume_off_a_logging_boundary_repeats_no_row(run_copy):
    """The run stopped at 6 (rows at 4 and 6, log every 4); resuming to 10 adds 8 and 10, nothing twice."""
    ti.main(["--out", str(run_copy), "--resume", "--iters", "10"])
    its = [json.loads(line)["it"] for line in open(run_copy / "log.jsonl")]
    assert its == [4, 6, 8, 10]


@pytest.mark.slow
def test_ctrl_c_says_where_resume_continues(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, os.path.join(ROOT, "train_imagenet.py"), "--out", str(run), *TINY, "--iters", "100000",
           "--ckpt-every", "2"]
    # a job started in the background by a non-interactive shell (as CI may be) inherits SIGINT ignored: restore it
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 300
        while not (run / "checkpoint.pt").exists() and time.time() < deadline:
            time.sleep(0.5)
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    step = ti.edm.read_checkpoint(str(run))["step"]
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1].endswith(f"--resume continues from {run / 'checkpoint.pt'} (iteration {step})")


# ----------------------------------------------------------------------------------------------------
# Non-finite values


def test_non_finite_teacher_stops_the_run(tmp_path, capsys, monkeypatch):
    build = ti.build_nets

    def build_then_poison(cfg, teacher_net, *args):  # the teacher (only) predicts NaN from now on
        nets = build(cfg, teacher_net, *args)
        teacher_net.register_forward_hook(lambda m, i, out: torch.full_like(out, float("nan")))
        return nets

    monkeypatch.setattr(ti, "build_nets", build_then_poison)
    expect_error(ti.main, ["--out", str(tmp_path), *TINY], capsys, "the teacher or the fake score predicts inf/NaN")
    assert not (tmp_path / "checkpoint.pt").exists()


# ----------------------------------------------------------------------------------------------------
# Files that would run code


@pytest.mark.parametrize("target", ["checkpoint.pt", "teacher.pt"])
def test_crafted_pickles_are_refused_without_running(target, run_copy, tmp_path, capsys):
    pwned = tmp_path / "pwned"
    torch.save({"kind": "class-conditional", "step": 1, "config": {}, "x": Payload(pwned)}, run_copy / target)
    argv = ["--out", str(run_copy), "--resume"] if target == "checkpoint.pt" else ["--out", str(run_copy), *TINY]
    expect_error(ti.main, argv, capsys, "is not a readable")
    if target == "checkpoint.pt":
        expect_error(sample.main, [str(run_copy)], capsys, "is not a readable")
    assert not pwned.exists(), "unpickling ran code"


def test_edm_pickle_help_says_trusted_only():
    assert "trusted" in ti.build_parser().format_help()


def test_reference_statistics_load_without_pickle(tmp_path):
    np.savez(tmp_path / "ref.npz", mu=np.zeros(3), sigma=np.array([Payload(tmp_path / "p")], dtype=object))
    with pytest.raises(ValueError):
        ti.metrics.load_reference_statistics(str(tmp_path / "ref.npz"))
    assert not (tmp_path / "p").exists()


# ----------------------------------------------------------------------------------------------------
# kill -9 at a random moment, then --resume: the run ends bit for bit as one that was never killed


def kill_trials(root, n: int, seed: int = 0, iters: int = 24) -> dict:
    """n trials: a run killed with SIGKILL at a random moment of its distillation (0-2 s after its first
    checkpoint; one is written every iteration), then resumed to the end; compared with an uninterrupted run of
    the same settings. Returns counts (the README's 'what runs survive' figures)."""
    import random

    rng, root = random.Random(seed), os.fspath(root)
    args = [*TINY, "--iters", str(iters), "--ckpt-every", "1", "--log-every", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    script = os.path.join(ROOT, "train_imagenet.py")
    ref = os.path.join(root, "reference")
    subprocess.run([sys.executable, script, "--out", ref, *args], check=True, env=env, capture_output=True)
    want = ti.edm.read_checkpoint(ref)
    out = dict(trials=n, killed_mid_run=0, tmp_files_left_by_kill=0, resumed_exactly=0, logs_equal=0)
    for i in range(n):
        run = os.path.join(root, f"trial{i}")
        os.makedirs(run)
        for f in ("teacher.pt", "classifier.pt"):
            shutil.copy(os.path.join(ref, f), run)
        proc = subprocess.Popen([sys.executable, script, "--out", run, *args], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 300  # into distillation: the first checkpoint, then a random moment after it
        while not os.path.exists(os.path.join(run, "checkpoint.pt")) and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 2.0))
        proc.kill()
        proc.wait()
        killed = not os.path.exists(os.path.join(run, "metrics.json"))
        out["killed_mid_run"] += killed
        out["tmp_files_left_by_kill"] += any(".tmp" in f for f in os.listdir(run))
        flag = ["--resume"] if os.path.exists(os.path.join(run, "checkpoint.pt")) else args
        subprocess.run([sys.executable, script, "--out", run, *flag], check=True, env=env, capture_output=True)
        got = ti.edm.read_checkpoint(run)
        out["resumed_exactly"] += all(torch.equal(got[k][n], want[k][n]) for k in ("G", "critic") for n in want[k]) \
            and not any(".tmp" in f for f in os.listdir(run))
        strip = lambda rows: [{k: v for k, v in r.items() if k != "time"} for r in rows]  # noqa: E731
        out["logs_equal"] += strip(got["history"]) == strip(want["history"])
    return out


@pytest.mark.slow
def test_kill_9_and_resume_is_exact(tmp_path):
    result = kill_trials(tmp_path, 3)
    assert result["resumed_exactly"] == result["logs_equal"] == 3, result


def test_non_finite_watch_names_the_first_bad_loss_and_iteration():
    """The losses are watched on the device; the check names the first non-finite one and its iteration, also when
    later iterations (critic-only ones) do not compute it."""
    watch = runs.NonFinite()
    watch.add({"loss_dmd": torch.tensor(float("nan")), "loss_fake": torch.tensor(1.0)}, 5)
    watch.add({"loss_fake": torch.tensor(2.0)}, 6)
    watch.add({"loss_fake": torch.tensor(float("inf"))}, 7)
    with pytest.raises(FloatingPointError, match=r"non-finite loss_dmd at iteration 5 \(the teacher .*none yet"):
        watch.check("none yet")
    fine = runs.NonFinite()
    fine.add({"loss_fake": torch.tensor(1.0)}, 1)
    fine.check("none yet")  # nothing to report
