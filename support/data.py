"""Image data on disk, for the real side of the GAN term and for small teachers.

    ImageDataset     a dataset written by EDM's dataset_tool.py (a .zip or a folder, labels in dataset.json)
    RealImages       an endless, resumable, rank-sharded stream of (images, labels) batches
    CaptionedImages  (image, caption) pairs for text-to-image: a folder with same-named .txt captions, or the
                     .tar shards img2dataset writes
    read_prompts     a prompt file, one per line
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from PIL import Image, ImageOps

from support.runs import require, stream_seed


class RealImages:
    """An endless, resumable stream of (images, labels) for the GAN's real side, sharded by rank: in-memory
    tensors in [-1, 1] (MNIST) or an image dataset's uint8 images through a DataLoader."""

    def __init__(self, data, batch: int, rank: int, world: int, seed: int, workers: int = 0):
        self.data, self.batch, self.rank, self.world, self.seed, self.workers = data, batch, rank, world, seed, workers
        self.epoch, self.pos, self._it, self._cache = 0, 0, None, (-1, [])

    def _order(self) -> list[int]:
        """This rank's share of the epoch's permutation (the same on every rank), whole batches only."""
        if self._cache[0] != self.epoch:
            n = len(self.data[0]) if isinstance(self.data, tuple) else len(self.data)
            order = torch.Generator().manual_seed(stream_seed(self.seed, "data", self.epoch))
            perm = torch.randperm(n, generator=order)
            whole = n // self.world // self.batch * self.batch
            self._cache = (self.epoch, perm[self.rank::self.world][:whole].tolist())
        return self._cache[1]

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        order = self._order()
        if self.pos + self.batch > len(order):
            self.epoch, self.pos, self._it = self.epoch + 1, 0, None
            order = self._order()
        idx = order[self.pos:self.pos + self.batch]
        self.pos += self.batch
        if isinstance(self.data, tuple):  # in-memory tensors
            return self.data[0][idx], self.data[1][idx]
        if self._it is None:  # a DataLoader over the rest of this epoch's indices, in order
            rest = order[self.pos - self.batch:]
            self._it = iter(torch.utils.data.DataLoader(self.data, batch_size=self.batch, sampler=rest, drop_last=True,
                                                        num_workers=self.workers, pin_memory=torch.cuda.is_available()))
        images, labels = next(self._it)
        return images, labels.long()  # uint8: converted to [-1, 1] on the training device

    def state_dict(self) -> dict:
        return dict(epoch=self.epoch, pos=self.pos)

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos, self._it = state["epoch"], state["pos"], None


# ----------------------------------------------------------------------------------------------------
# ImageNet-64 in the format of EDM's dataset_tool.py (the same as StyleGAN2-ADA's and StyleGAN3's).
#
# A .zip (or a folder) of images, in EDM's case uncompressed PNGs named '00000/img00000000.png', ..., plus
# 'dataset.json' = {"labels": [["00000/img00000000.png", 6], ...]} at the root; "labels" is null when the
# source had none. Names in dataset.json always use '/', also for folders written on Windows. EDM's
# ImageNet-64 zip is 1,281,167 RGB 64x64 images with labels 0..999.

_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# PIL modes we read, and the mode we read them as: 1 channel ('L') or 3 ('RGB'); alpha is dropped.
_READ_MODE = {"L": "L", "1": "L", "LA": "L", "RGB": "RGB", "RGBA": "RGB", "P": "RGB", "CMYK": "RGB", "YCbCr": "RGB"}


class ImageDataset(torch.utils.data.Dataset):
    """Images and class labels from a dataset written by EDM's dataset_tool.py (a .zip or a folder).

    Items are `(image, label)`: image a uint8 tensor [C, H, W] (C = 1 or 3), label an int (-1 when
    `use_labels=False`, or None and dataset.json has no labels). Everything is checked at construction, which reads
    every image and verifies it without decoding (a truncated or corrupt file is found before training, not in it):
    all images square, of one size and channel count, equal to `resolution` if given, and with `use_labels` a label
    for every image. A zip is opened lazily, once per process, so the dataset works in DataLoader workers (forked or
    spawned)."""

    def __init__(self, path: str, resolution: int | None = None, use_labels: bool | None = True):
        if not os.path.exists(path):
            raise FileNotFoundError(f"no such dataset: {path}")
        self.path, self._zip, self._zip_pid, self._is_zip = path, None, -1, not os.path.isdir(path)  # _zip: ZipFile
        if not self._is_zip:
            names = [os.path.relpath(os.path.join(root, f), path).replace(os.sep, "/")
                     for root, _dirs, files in os.walk(path) for f in files]
        elif path.lower().endswith(".zip") and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        else:
            raise ValueError(f"{path}: a dataset must be a folder or a .zip archive")
        self.names = sorted(n for n in names if os.path.splitext(n)[1].lower() in _IMAGE_EXTENSIONS)
        require(self.names, f"{path}: no images found (extensions {', '.join(_IMAGE_EXTENSIONS)})")
        self._shape = self._check_images(resolution)  # (C, H, W)
        if use_labels is None:  # labels if dataset.json has them, else none (unconditional)
            use_labels = self._has_labels()
        self.labels = self._read_labels() if use_labels else np.full(len(self.names), -1, dtype=np.int64)
        self.close()  # reopened lazily by whichever process reads items

    def _open(self, name: str) -> io.BufferedIOBase:
        if not self._is_zip:
            return open(os.path.join(self.path, name), "rb")
        if self._zip is None or self._zip_pid != os.getpid():
            # A ZipFile shares its file position with every process it was forked into: one per process.
            self._zip, self._zip_pid = zipfile.ZipFile(self.path), os.getpid()
        return self._zip.open(name)

    def close(self) -> None:
        if self._zip is not None and self._zip_pid == os.getpid():
            self._zip.close()
        self._zip, self._zip_pid = None, -1

    def __getstate__(self) -> dict:  # spawned workers get the dataset pickled: without the open zip
        return dict(self.__dict__, _zip=None, _zip_pid=-1)

    def _check_images(self, resolution: int | None) -> tuple[int, int, int]:
        first = None
        for name in self.names:
            try:
                with self._open(name) as f, PIL.Image.open(f) as img:
                    size, mode = img.size, img.mode
                    img.verify()  # the whole file's integrity (PNG: every chunk's CRC), without decoding it
            except (OSError, SyntaxError, PIL.UnidentifiedImageError) as e:
                raise ValueError(f"{self.path}: cannot read image {name}: {e}") from e
            if mode not in _READ_MODE:
                raise ValueError(f"{self.path}: image {name} has unsupported mode {mode!r} "
                                 f"(supported: {', '.join(_READ_MODE)})")
            w, h = size
            if w != h:
                raise ValueError(f"{self.path}: images must be square, {name} is {w}x{h}")
            shape = (3 if _READ_MODE[mode] == "RGB" else 1, h, w)
            if first is None:
                first = (name, shape)
                if resolution is not None and w != resolution:
                    raise ValueError(f"{self.path}: expected {resolution}x{resolution}, found {w}x{h}")
            elif shape != first[1]:
                raise ValueError(f"{self.path}: images differ in size or channels: {first[0]} is "
                                 f"{_describe(first[1])} but {name} is {_describe(shape)}")
        return first[1]

    def _has_labels(self) -> bool:
        try:
            with self._open("dataset.json") as f:
                return json.load(f).get("labels") is not None
        except (FileNotFoundError, KeyError, AttributeError):
            return False
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.path}: dataset.json is not valid JSON: {e}") from e

    def _read_labels(self) -> np.ndarray:
        hint = "; pass use_labels=False for unconditional use"
        try:
            with self._open("dataset.json") as f:
                meta = json.load(f)
        except (FileNotFoundError, KeyError):  # KeyError: no such member in the zip
            raise ValueError(f"{self.path}: use_labels=True but there is no dataset.json{hint}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.path}: dataset.json is not valid JSON: {e}") from e
        require(isinstance(meta, dict) and "labels" in meta, f"{self.path}: dataset.json has no 'labels' entry{hint}")
        if meta["labels"] is None:
            raise ValueError(f"{self.path}: dataset.json has null labels (written from unlabelled data){hint}")
        try:
            labels = {str(name).replace("\\", "/"): label for name, label in meta["labels"]}
        except (TypeError, ValueError):
            raise ValueError(f"{self.path}: dataset.json 'labels' must be a list of [name, label] pairs") from None
        missing = [name for name in self.names if name not in labels]
        require(not missing, f"{self.path}: {len(missing)} of {len(self.names)} images have no label in "
                f"dataset.json, e.g. {', '.join(missing[:3])}")
        values = [labels[name] for name in self.names]
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or v < 0]
        if bad:
            raise ValueError(f"{self.path}: labels must be non-negative integer class indices, found {bad[0]!r}")
        return np.array(values, dtype=np.int64)

    @property
    def resolution(self) -> int:
        return self._shape[1]

    @property
    def num_channels(self) -> int:
        return self._shape[0]

    @property
    def num_classes(self) -> int:
        """max label + 1 (1000 for ImageNet); 0 without labels."""
        return int(self.labels.max()) + 1 if len(self.labels) and self.labels.max() >= 0 else 0

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, int]:
        name = self.names[idx]
        with self._open(name) as f, PIL.Image.open(f) as img:
            mode = _READ_MODE.get(img.mode)
            array = np.asarray(img.convert(mode) if mode and img.mode != mode else img)
        image = torch.from_numpy(array.reshape(*array.shape[:2], -1).transpose(2, 0, 1).copy())  # HWC -> CHW
        if tuple(image.shape) != self._shape or image.dtype != torch.uint8:
            raise ValueError(f"{self.path}: image {name} changed since the dataset was opened: "
                             f"{tuple(image.shape)} {image.dtype}, expected {self._shape} uint8")
        return image, int(self.labels[idx])


def _describe(shape: tuple[int, int, int]) -> str:
    c, h, w = shape
    return f"{w}x{h} with {c} channel{'s' if c > 1 else ''}"



# ----------------------------------------------------------------------------------------------------
# Text-to-image: prompts, and real images with captions (a folder, or img2dataset .tar shards).

CAPTIONED_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def read_prompts(path: str) -> list[str]:
    require(path and os.path.isfile(path), f"--prompts {path!r}: no such file (one prompt per line)")
    prompts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    require(prompts, f"--prompts {path}: the file has no prompts")
    return prompts


class CaptionedImages:
    """Random access to (image, caption) pairs: a folder of images with same-named .txt captions, or the
    .tar shards img2dataset writes (key.jpg + key.txt members), indexed once with tarfile."""

    def __init__(self, path: str, resolution: int, rank: int = 0, world: int = 1):
        require(os.path.exists(path), f"--real-images {path}: no such file or folder")
        p = Path(path)
        tars = [p] if p.suffix == ".tar" else sorted(p.glob("*.tar"))
        self.items = self._index_tars(tars) if tars else self._index_folder(p)
        require(self.items, f"--real-images {path}: no images with captions found")
        self.items = self.items[rank::world]  # each process uses its own share
        self.resolution, self._tars = resolution, {}
        self._check()

    def _check(self) -> None:
        """Read every image header of this share once, so that a bad or small image stops the run before it
        starts, not hours into it."""
        for item in self.items:
            try:
                img, _, name = self._read(item, caption=False)
                with img:
                    w, h = img.size
            except (OSError, PIL.UnidentifiedImageError, tarfile.TarError) as e:
                raise ValueError(f"--real-images: cannot read image {item[0]}: {e}") from None
            if min(w, h) < self.resolution:
                raise ValueError(f"real image {name} is {w}x{h}, smaller than --resolution {self.resolution}; "
                                 f"remove such images (the paper drops those under 1024 px)")

    @staticmethod
    def _index_folder(p: Path) -> list:
        images = sorted(f for f in p.rglob("*") if f.suffix.lower() in CAPTIONED_EXTS)
        missing = [f for f in images if not f.with_suffix(".txt").is_file()]
        if missing:
            raise ValueError(f"--real-images {p}: {len(missing)} images without a same-named .txt caption, "
                             f"e.g. {missing[0]}")
        return [(str(f), str(f.with_suffix(".txt"))) for f in images]

    @staticmethod
    def _index_tars(tars: list[Path]) -> list:
        items = []
        for t in tars:
            with tarfile.open(t) as tf:
                members = {}
                for m in tf.getmembers():
                    key, ext = os.path.splitext(m.name)
                    members.setdefault(key, {})[ext.lower()] = m
            for parts in members.values():
                img = next((parts[e] for e in CAPTIONED_EXTS if e in parts), None)
                if img is not None and ".txt" in parts:
                    items.append((str(t), img, parts[".txt"]))
        return items

    def __len__(self) -> int:
        return len(self.items)

    def _read(self, item, caption: bool = True) -> tuple[Image.Image, str, str]:
        if len(item) == 2:
            text = Path(item[1]).read_text(encoding="utf-8").strip() if caption else ""
            return Image.open(item[0]), text, item[0]
        tf = self._tars.setdefault(item[0], tarfile.open(item[0]))
        img = Image.open(tf.extractfile(item[1]))
        text = tf.extractfile(item[2]).read().decode("utf-8").strip() if caption else ""
        return img, text, f"{item[0]}:{item[1].name}"

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        """[3, R, R] in [-1, 1] (shorter side resized to R, centre crop) and the caption."""
        img, caption, _ = self._read(self.items[i])
        img = ImageOps.fit(img.convert("RGB"), (self.resolution,) * 2, Image.Resampling.BICUBIC)
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1, caption


