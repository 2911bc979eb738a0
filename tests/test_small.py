"""The small experiment on the user's own images (support/small.py through train_imagenet.py): labelled data ->
class-conditional teacher and classifier, unlabelled data -> unconditional; Frechet distance and KID in the
classifier's and in (a stand-in for) Inception's features; sample.py on both."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from test_data import write_dataset

import sample
import train_imagenet as ti

TINY = ["--teacher-iters", "10", "--classifier-iters", "10", "--iters", "6", "--batch", "8", "--log-every", "3",
        "--ckpt-every", "6", "--eval-samples", "24", "--warmup", "2", "--channels", "8"]


def stand_in_inception(device):
    """A fixed random projection of the pixels (clean-fid's Inception cannot be downloaded in the tests)."""
    def extract(images: torch.Tensor) -> torch.Tensor:
        assert images.dtype == torch.uint8 and images.shape[1] in (1, 3)
        x = images.flatten(1).float() / 255
        w = torch.randn(x.shape[1], 6, generator=torch.Generator().manual_seed(x.shape[1]))
        return x @ w.to(x.device)
    return extract


def coloured_squares(n: int, res: int = 16) -> tuple[np.ndarray, list[int]]:
    """Class c = a square in colour channel c, at a random place: learnable, and different per class."""
    rng, images, labels = np.random.default_rng(0), np.zeros((n, res, res, 3), np.uint8), []
    for i in range(n):
        c, (y, x) = i % 3, rng.integers(0, res // 2, 2)
        images[i, y:y + res // 2, x:x + res // 2, c] = 220
        labels.append(c)
    return images, labels


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    d = tmp_path_factory.mktemp("own")
    images, labels = coloured_squares(40)
    return write_dataset(d / "labelled.zip", images, labels), write_dataset(d / "unlabelled", images, None)


def test_labelled_images_train_a_conditional_teacher_and_evaluate_in_two_spaces(datasets, tmp_path, monkeypatch):
    monkeypatch.setattr(ti.metrics, "inception_extractor", stand_in_inception)
    run = str(tmp_path / "run")
    metrics = ti.main(["--data", datasets[0], "--out", run, *TINY])
    cfg = ti.edm.read_checkpoint(run)["config"]
    assert cfg["label_dim"] == 3 and cfg["resolution"] == 16, "the data's classes and its own resolution"
    student = metrics["student"]
    assert student["space"] == "classifier" and 0 <= student["accuracy"] <= 1 and student["kid_std"] > 0
    assert set(student["inception"]) == {"fd", "kid", "kid_std"} and student["inception"]["fd"] > 0
    assert set(metrics["teacher"]) == {"4", "8", "35"} and "inception" in metrics["teacher"]["35"]
    assert metrics["real_vs_real"]["n"] == 24 and "inception" in metrics["real_vs_real"]
    assert 0 <= metrics["classifier_test_accuracy"] <= 1
    teacher = torch.load(os.path.join(run, "teacher.pt"), weights_only=True)
    assert teacher["net"]["model.enc.16x16_conv.weight"].shape[1] == 3, "an RGB teacher"
    assert teacher["key"]["data"] == os.path.abspath(datasets[0])
    out = sample.main([run, "--labels", "0", "2", "--n", "3", "--out", str(tmp_path / "g.png")])
    assert Image.open(out).size == (3 * 17 + 1, 2 * 17 + 1) and Image.open(out).mode == "RGB"
    # the cached teacher belongs to this data: another dataset in the same folder is refused, nothing retrained
    other = write_dataset(tmp_path / "other.zip", *coloured_squares(30))
    with pytest.raises(SystemExit):
        ti.main(["--data", other, "--out", run, *TINY])
    assert torch.load(os.path.join(run, "teacher.pt"), weights_only=True)["key"] == teacher["key"]


@pytest.mark.slow  # the default suite stays within 5 minutes (docs/testing.md)
def test_unlabelled_images_give_an_unconditional_run(datasets, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ti.metrics, "inception_extractor", stand_in_inception)
    run = str(tmp_path / "run")
    metrics = ti.main(["--data", datasets[1], "--out", run, *TINY, "--resolution", "32"])
    cfg = ti.edm.read_checkpoint(run)["config"]
    assert cfg["label_dim"] == 0 and cfg["resolution"] == 32, "no labels: unconditional; resized to --resolution"
    assert metrics["student"]["space"] == "inception" and "accuracy" not in metrics["student"]
    assert not os.path.exists(os.path.join(run, "classifier.pt"))
    G, _ = ti.edm.load_generator(run)
    assert G.net.model.map_label is None and G._labels(torch.tensor([0, 0])) is None
    out = sample.main([run, "--n", "4", "--out", str(tmp_path / "g.png")])
    assert Image.open(out).size == (4 * 33 + 1, 10 * 33 + 1), "ten rows of samples"
    with pytest.raises(SystemExit):
        ti.main(["--data", datasets[1], "--out", str(tmp_path / "b"), *TINY, "--no-inception"])
    assert "unlabelled images are evaluated in Inception features" in capsys.readouterr().err


def test_missing_inception_weights_fail_in_one_line_before_training(datasets, tmp_path, monkeypatch, capsys):
    def offline(device):
        raise FileNotFoundError("clean-fid could not load its Inception-v3 (offline)")

    monkeypatch.setattr(ti.metrics, "inception_extractor", offline)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        ti.main(["--data", datasets[0], "--out", str(run), *TINY])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "error: clean-fid could not load its Inception-v3" in err and "--no-inception" in err
    assert not (run / "teacher.pt").exists(), "nothing trained"
    metrics = ti.main(["--data", datasets[0], "--out", str(run), *TINY, "--no-inception"])
    assert "inception" not in metrics["student"] and metrics["student"]["space"] == "classifier"
    with open(run / "metrics.json") as f:
        assert json.load(f)["student"]["fd"] == metrics["student"]["fd"]
