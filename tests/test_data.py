"""support/data.py: datasets in the format of EDM's dataset_tool.py."""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

from support import data as ti
from support.data import ImageDataset

# ----------------------------------------------------------------------------------------------------
# Datasets in the format of EDM's dataset_tool.py


def write_dataset(dest, images: np.ndarray | list, labels: list | None | str = "auto", json_labels=None) -> str:
    """Write images (and dataset.json) the way dataset_tool.py does: uncompressed PNGs named
    '00000/img00000000.png', ..., into a zip (ZIP_STORED) or a folder. labels="auto": 0, 1, 2, ...; None:
    dataset.json with null labels; "none": no dataset.json. json_labels overrides the written list."""
    files = {}
    for idx, img in enumerate(images):
        name = f"{idx:08d}"[:5] + f"/img{idx:08d}.png"
        buf = io.BytesIO()
        PIL.Image.fromarray(img).save(buf, format="png", compress_level=0)
        files[name] = buf.getvalue()
    if labels == "auto":
        labels = list(range(len(files)))
    if labels != "none":
        entries = None if labels is None else [[name, lab] for name, lab in zip(files, labels, strict=True)]
        files["dataset.json"] = json.dumps({"labels": json_labels if json_labels is not None else entries})
    dest = str(dest)
    if dest.endswith(".zip"):
        with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_STORED) as z:
            for name, data in files.items():
                z.writestr(name, data)
    else:
        for name, data in files.items():
            os.makedirs(os.path.dirname(os.path.join(dest, name)), exist_ok=True)
            with open(os.path.join(dest, name), "wb" if isinstance(data, bytes) else "w") as f:
                f.write(data)
    return dest


def random_images(n: int, res: int = 8, channels: int = 3, seed: int = 0) -> np.ndarray:
    shape = (n, res, res, channels) if channels > 1 else (n, res, res)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.mark.parametrize("kind", ["zip", "folder"])
def test_dataset_loads_with_labels_through_workers(tmp_path, kind):
    images = random_images(10)
    labels = [3, 0, 7, 7, 1, 2, 9, 4, 5, 6]
    path = write_dataset(tmp_path / ("data.zip" if kind == "zip" else "data"), images, labels)
    ds = ImageDataset(path, resolution=8)
    assert (len(ds), ds.resolution, ds.num_channels, ds.num_classes) == (10, 8, 3, 10)
    assert ds.labels.tolist() == labels
    first, label = ds[0]  # read in the parent first: the workers must not share its open zip
    assert first.dtype == torch.uint8 and first.shape == (3, 8, 8) and label == 3
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, shuffle=False)
    got_images, got_labels = zip(*loader, strict=True)
    assert torch.equal(torch.cat(got_images), torch.from_numpy(images).permute(0, 3, 1, 2))
    assert torch.cat(got_labels).tolist() == labels
    spawned = pickle.loads(pickle.dumps(ds))  # what a spawned worker receives
    assert torch.equal(spawned[9][0], torch.from_numpy(images[9]).permute(2, 0, 1))


def test_dataset_opens_its_own_zip_in_each_process(tmp_path, monkeypatch):
    ds = ImageDataset(write_dataset(tmp_path / "d.zip", random_images(3)))
    ds[0]
    parent_zip = ds._zip
    monkeypatch.setattr(ti.os, "getpid", lambda: -12345)  # as in a forked worker
    ds[1]
    assert ds._zip is not parent_zip and ds._zip.fp is not parent_zip.fp


def test_dataset_grayscale_and_unlabelled(tmp_path):
    images = random_images(4, res=4, channels=1)
    path = write_dataset(tmp_path / "gray.zip", images, labels="none")
    ds = ImageDataset(path, use_labels=False)
    assert (ds.num_channels, ds.resolution, ds.num_classes) == (1, 4, 0)
    image, label = ds[2]
    assert label == -1 and torch.equal(image, torch.from_numpy(images[2])[None])


def test_dataset_label_names_with_backslashes(tmp_path):
    names = [f"{i:08d}"[:5] + f"\\img{i:08d}.png" for i in range(3)]
    path = write_dataset(tmp_path / "d.zip", random_images(3), json_labels=[[n, 5] for n in names])
    assert ImageDataset(path).labels.tolist() == [5, 5, 5]


def test_dataset_errors(tmp_path):
    def fails(message, path, **kwargs):
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            ImageDataset(str(path), **kwargs)

    fails("no such dataset", tmp_path / "missing.zip")
    fails("no images found", write_dataset(tmp_path / "empty.zip", []))
    (tmp_path / "notes.txt").write_text("hello")
    fails("folder or a .zip", tmp_path / "notes.txt")
    mixed = [random_images(1, res=8)[0], random_images(1, res=4)[0]]
    fails("images differ in size.*8x8.*4x4", write_dataset(tmp_path / "mixed.zip", mixed))
    channels = [random_images(1, channels=3)[0], random_images(1, channels=1)[0]]
    fails("differ in size or channels.*3 channels.*1 channel", write_dataset(tmp_path / "ch.zip", channels))
    fails("must be square.*8x4", write_dataset(tmp_path / "wide.zip", [np.zeros((4, 8, 3), np.uint8)]))
    fails("expected 64x64, found 32x32", write_dataset(tmp_path / "small.zip", random_images(2, res=32)),
          resolution=64)
    fails("no dataset.json", write_dataset(tmp_path / "nojson.zip", random_images(2), labels="none"))
    fails("no dataset.json", write_dataset(tmp_path / "nojson", random_images(2), labels="none"))
    fails("null labels", write_dataset(tmp_path / "null.zip", random_images(2), labels=None))
    fails("1 of 3 images have no label.*00000/img00000002.png",
          write_dataset(tmp_path / "partial.zip", random_images(3), json_labels=[["00000/img00000000.png", 0],
                                                                                ["00000/img00000001.png", 1]]))
    fails("non-negative integer", write_dataset(tmp_path / "float.zip", random_images(2), labels=[0.5, 1.0]))
    broken = tmp_path / "broken"
    write_dataset(broken, random_images(2))
    (broken / "00000" / "img00000001.png").write_bytes(b"not a png")
    fails("cannot read image 00000/img00000001.png", broken)
    ImageDataset(write_dataset(tmp_path / "ok_unlabelled.zip", random_images(2), labels="none"), use_labels=False)

