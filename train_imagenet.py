# EDM input/output for the ImageNet-64 experiment of DMD2 (arXiv:2405.14867, Sec. 5.1, App. F.2 and G): the
# teacher from EDM's network pickle, the real images in the format of EDM's dataset_tool.py (for the GAN term),
# and FID statistics computed the way EDM's evaluation code computes them. Sections to merge into
# train_imagenet.py.

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import pickle
import sys
import types
import urllib.error
import urllib.parse
import zipfile
from collections.abc import Callable, Iterable

import cleanfid.downloads_helper
import cleanfid.features
import cleanfid.fid
import numpy as np
import PIL.Image
import torch
from torch import nn

EDM_IMAGENET64_URL = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-imagenet-64x64-cond-adm.pkl"
EDM_IMAGENET64_REF_URL = "https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/imagenet-64x64.npz"


# ----------------------------------------------------------------------------------------------------
# Local files and cached downloads (network pickles and FID reference statistics).


def local_file(source: str, cache_dir: str | None = None) -> str:
    """`source` itself if it is a local path, else the cached copy of an http(s) URL, downloaded once.

    The cache is `cache_dir`, by default `<torch hub dir>/edm` (`$TORCH_HOME/hub/edm`). The file name carries
    a hash of the URL, so two URLs that end in the same name never share a cache entry.
    """
    url = urllib.parse.urlparse(source)
    if url.scheme not in ("http", "https"):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"no such file: {source}")
        return source
    cache_dir = cache_dir or os.path.join(torch.hub.get_dir(), "edm")
    name = os.path.basename(url.path) or "download"
    dst = os.path.join(cache_dir, f"{hashlib.sha256(source.encode()).hexdigest()[:8]}-{name}")
    if not os.path.isfile(dst):
        os.makedirs(cache_dir, exist_ok=True)
        try:
            # torch.hub writes to a temporary file next to dst and renames it when complete: an interrupted
            # download leaves no partial dst, and ranks downloading at once never read a half-written file.
            torch.hub.download_url_to_file(source, dst, progress=False)
        except (urllib.error.URLError, OSError) as e:
            raise RuntimeError(f"could not download {source}: {e}. Download it by hand and pass the local path.") \
                from e
    return dst


# ----------------------------------------------------------------------------------------------------
# EDM network pickles without the EDM repository.
#
# EDM (Karras et al. 2022, github.com/NVlabs/edm) saves `pickle.dump(dict(ema=net, loss_fn=..., augment_pipe=...,
# dataset_kwargs=...))`. Its network classes are decorated with `torch_utils.persistence.persistent_class`, so
# each such object pickles as a call `torch_utils.persistence._reconstruct_persistent_obj(meta)` with
#     meta = dict(type='class', version=6, module_src=<full source of the defining module, e.g. networks.py>,
#                 class_name='EDMPrecond', state=<the object's __dict__: parameters, buffers, submodules>)
# and unpickling executes `module_src` as a fresh module, takes the class from it, and restores the state.
# The embedded networks.py itself runs `from torch_utils import persistence` and decorates its classes with
# `@persistence.persistent_class`; that is all it takes from torch_utils (EDM's loss.py the same; augment.py
# also imports `misc`, and calls `misc.constant` only when the augmentation pipe runs). Below: our own
# `_reconstruct_persistent_obj`, and a stand-in `torch_utils` that the embedded source, and only it, sees.

_PERSISTENCE_VERSION = 6  # torch_utils.persistence._version in EDM (also StyleGAN2-ADA and StyleGAN3)
_MODULE_OF_SOURCE: dict[str, types.ModuleType] = {}  # embedded source -> the module it was executed into
_SOURCE_OF_MODULE: dict[str, str] = {}  # module name -> its source (for re-pickling and copy.deepcopy)


class EDMPickleError(ValueError):
    """A file that is not an EDM network pickle, or one whose classes this loader cannot rebuild."""


def _reconstruct_persistent_obj(meta: dict) -> object:
    """Our `torch_utils.persistence._reconstruct_persistent_obj`: rebuild one object from its pickled meta."""
    if meta.get("type") != "class" or meta.get("version") != _PERSISTENCE_VERSION:
        raise EDMPickleError(f"unsupported persistent object (type {meta.get('type')!r}, version "
                             f"{meta.get('version')!r}; EDM writes type 'class', version {_PERSISTENCE_VERSION})")
    module = _module_from_source(meta["module_src"], meta["class_name"])
    cls = module.__dict__.get(meta["class_name"])
    if not isinstance(cls, type):
        raise EDMPickleError(f"the pickled source does not define class {meta['class_name']!r}")
    obj = cls.__new__(cls)
    if meta["state"] is not None:
        setstate = getattr(obj, "__setstate__", None)  # nn.Module's also adds attributes newer torch expects
        if callable(setstate):
            setstate(meta["state"])
        else:
            obj.__dict__.update(meta["state"])
    return obj


def _persistent_reduce(self: object) -> tuple:
    """`__reduce__` of rebuilt classes, in EDM's format, so that `copy.deepcopy(net)` works (it reduces and
    rebuilds) and the object keeps its source. Save trained networks as state dicts: a pickle of the object
    refers to this module's `_reconstruct_persistent_obj` by name, not to EDM's."""
    fields = [*object.__reduce__(self), None, None, None]  # (copyreg._reconstructor, args, state, ...)
    cls = type(self)
    meta = dict(type="class", version=_PERSISTENCE_VERSION, module_src=_SOURCE_OF_MODULE[cls.__module__],
                class_name=cls.__name__, state=fields[2])
    return _reconstruct_persistent_obj, (meta,)


def _persistent_class(cls: type) -> type:
    """Stand-in for `torch_utils.persistence.persistent_class`, applied while the embedded source runs."""
    cls.__reduce__ = _persistent_reduce
    return cls


def _missing(module: str) -> Callable[[str], object]:
    def __getattr__(name: str) -> object:
        raise AttributeError(f"{module}.{name} is not provided by the stand-in torch_utils used to load EDM "
                             f"pickles without the EDM repository; put the EDM repository on sys.path")
    return __getattr__


def _standin_torch_utils() -> dict[str, types.ModuleType]:
    package = types.ModuleType("torch_utils")
    persistence = types.ModuleType("torch_utils.persistence")
    persistence.persistent_class = _persistent_class
    misc = types.ModuleType("torch_utils.misc")  # imported by EDM's augment.py; nothing in it is used to load
    misc.__getattr__ = _missing("torch_utils.misc")
    package.persistence, package.misc, package.__getattr__ = persistence, misc, _missing("torch_utils")
    return {"torch_utils": package, "torch_utils.persistence": persistence, "torch_utils.misc": misc}


_STANDIN_TORCH_UTILS = _standin_torch_utils()


def _import_for_embedded_source(name: str, globals_: dict | None = None, locals_: dict | None = None,
                                fromlist: tuple = (), level: int = 0) -> types.ModuleType:
    """`__import__` of the embedded modules: `torch_utils` resolves to the stand-in, everything else as usual.
    Nothing goes into sys.modules, so a real torch_utils elsewhere in the process is never shadowed."""
    if level == 0 and name.partition(".")[0] == "torch_utils":
        if name not in _STANDIN_TORCH_UTILS:
            raise ImportError(f"{name} is not provided by the stand-in torch_utils (it has only persistence and "
                              f"misc); StyleGAN's networks need its custom ops: load them with their repository")
        return _STANDIN_TORCH_UTILS[name if fromlist else "torch_utils"]
    return builtins.__import__(name, globals_, locals_, fromlist, level)


def _module_from_source(src: str, class_name: str) -> types.ModuleType:
    """Execute an embedded module source once (cached by its text, as EDM does) and return the module."""
    module = _MODULE_OF_SOURCE.get(src)
    if module is None:
        name = "_edm_source_" + hashlib.sha256(src.encode()).hexdigest()[:16]
        module = types.ModuleType(name)
        module.__dict__["__builtins__"] = dict(vars(builtins), __import__=_import_for_embedded_source)
        _SOURCE_OF_MODULE[name] = src  # the decorator needs it while the source runs
        try:
            exec(compile(src, f"<{name}: pickled source of {class_name}>", "exec"), module.__dict__)
        except Exception as e:
            raise EDMPickleError(f"cannot rebuild class {class_name!r}: its pickled source failed with "
                                 f"{type(e).__name__}: {e}") from e
        sys.modules[name] = module  # like EDM: classes have an importable module (pickle, torch.compile)
        _MODULE_OF_SOURCE[src] = module
    return module


class _EasyDict(dict):
    """Stand-in for dnnlib.util.EasyDict (a dict with attribute access), should a pickle contain one."""

    def __getattr__(self, name: str) -> object:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _load_storage_on_cpu(b: bytes) -> object:
    # torch.storage._load_from_bytes without map_location fails on a CPU-only machine for tensors that were
    # pickled on a GPU; EDM's snapshots move networks to the CPU first, but other pickles may not.
    return torch.load(io.BytesIO(b), map_location="cpu", weights_only=False)


class _EDMUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedReader, standin: bool):
        super().__init__(file)
        self.standin = standin

    def find_class(self, module: str, name: str) -> object:
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _load_storage_on_cpu
        if self.standin:
            if (module, name) == ("torch_utils.persistence", "_reconstruct_persistent_obj"):
                return _reconstruct_persistent_obj
            if (module, name) == ("dnnlib.util", "EasyDict"):
                return _EasyDict
            if module.partition(".")[0] in ("torch_utils", "dnnlib"):
                raise EDMPickleError(f"the pickle needs {module}.{name}, which only its own repository provides "
                                     f"(not an EDM network pickle?); put that repository on sys.path")
        return super().find_class(module, name)


def _have_real_persistence() -> bool:
    """Whether EDM's (or StyleGAN's) own torch_utils.persistence can be imported: then it does the loading."""
    try:
        from torch_utils import persistence
    except ImportError:
        return False
    return hasattr(persistence, "_reconstruct_persistent_obj")


def load_edm_network(source: str, key: str = "ema", cache_dir: str | None = None) -> nn.Module:
    """The network stored under `key` in an EDM network pickle, without the EDM repository installed.

    source: a local path or an http(s) URL (downloaded once into `cache_dir`, see `local_file`), e.g.
    `EDM_IMAGENET64_URL`, the teacher of DMD2's ImageNet-64 experiment. If EDM's own `torch_utils` is
    importable, its persistence machinery rebuilds the classes; otherwise ours does, from the same embedded
    source. Either way the result is EDM's code: unpickling executes the source stored in the file (as EDM's
    own loader does), so load only files you trust.

    EDM's ImageNet network is `EDMPrecond` around a `DhariwalUNet` (ADM): `net(x, sigma, class_labels)` with x
    [B, 3, 64, 64] in [-1, 1], sigma [B] and one-hot labels [B, 1000] returns the denoised x0 (float32). As
    EDM saved it, it is in eval mode with requires_grad off. Its constructor arguments are in
    `net._init_kwargs`. Two things to know when training copies of it:
      - `use_fp16=True` in that pickle: on CUDA, EDMPrecond casts the UNet's input to float16 and asserts the
        output is float16, unless called with `force_fp32=True`; under torch.autocast with `use_fp16=False`
        the assertion fails (the output is bfloat16). The DMD2 authors edited that cast to bfloat16.
      - `.train()` turns on the UNet's dropout (0.10 for ImageNet).
    The bottleneck for the GAN head (8x8x768 for ImageNet) is the output of `edm_encoder_output_module(net)`.
    """
    path = local_file(source, cache_dir)
    with open(path, "rb") as f:
        if f.read(4) == b"PK\x03\x04":
            raise EDMPickleError(f"{path} is a zip archive (a torch.save checkpoint?), not an EDM network pickle; "
                                 f"load it with torch.load")
        f.seek(0)
        try:
            data = _EDMUnpickler(f, standin=not _have_real_persistence()).load()
        except EDMPickleError:
            raise
        except (pickle.UnpicklingError, EOFError) as e:
            raise EDMPickleError(f"{path} is not a pickle file ({e})") from e
        except Exception as e:
            raise EDMPickleError(f"could not unpickle {path}: {type(e).__name__}: {e}") from e
    if not isinstance(data, dict):
        raise EDMPickleError(f"{path} holds a {type(data).__name__}, not a dict like EDM's network pickles")
    if key not in data:
        keys = [str(k) for k in data]
        listed = ", ".join(repr(k) for k in keys[:8]) + (f", ... ({len(keys)} keys)" if len(keys) > 8 else "")
        hint = " (a state dict? load it into a constructed network instead)" \
            if data and all(isinstance(v, torch.Tensor) for v in data.values()) else ""
        raise EDMPickleError(f"{path} has no key {key!r}; found {listed or 'no keys'}{hint}. EDM's network "
                             f"pickles hold the network under 'ema'")
    net = data[key]
    if not isinstance(net, nn.Module):
        raise EDMPickleError(f"{path}[{key!r}] is a {type(net).__name__}, not a torch.nn.Module")
    return net


def edm_encoder_output_module(net: nn.Module) -> nn.Module:
    """The last block of the encoder of an EDM UNet: its output is the bottleneck that DMD2's GAN head
    classifies (Sec. 4.3; 8x8x768 for the ImageNet-64 ADM UNet), the tensor the authors' code returns right
    after the encoder loop.

    EDM's preconditioners (EDMPrecond, VPPrecond, VEPrecond, iDDPMPrecond) hold the UNet as `net.model`;
    `DhariwalUNet` and `SongUNet` keep their blocks in two ModuleDicts, `enc` (run in order, e.g. '64x64_conv',
    ..., '8x8_block2') and `dec`. The last `enc` entry is a UNetBlock in both layouts (SongUNet's 'aux'
    entries come before each resolution's blocks). Read the features with a forward hook that stores the
    output and raises, so that the decoder never runs:

        class _Stop(Exception): pass
        def hook(module, args, output):
            features.append(output)    # [B, 768, 8, 8]
            raise _Stop
        handle = edm_encoder_output_module(net).register_forward_hook(hook)
        try:
            net(x_t, sigma, class_labels)
        except _Stop:
            pass
        finally:
            handle.remove()
    """
    unet = getattr(net, "model", net)
    layout = type(unet).__name__
    enc, dec = getattr(unet, "enc", None), getattr(unet, "dec", None)
    if layout not in ("DhariwalUNet", "SongUNet") or not isinstance(enc, nn.ModuleDict) \
            or not isinstance(dec, nn.ModuleDict) or len(enc) == 0:
        raise ValueError(f"expected an EDM DhariwalUNet or SongUNet (or a preconditioner holding one as .model) "
                         f"with `enc`/`dec` ModuleDicts; got {type(net).__name__} around {layout}")
    name, module = list(enc.items())[-1]
    if "aux" in name:
        raise ValueError(f"the last encoder entry of this {layout} is {name!r}, not a block")
    return module


# ----------------------------------------------------------------------------------------------------
# ImageNet-64 in the format of EDM's dataset_tool.py (the same as StyleGAN2-ADA's and StyleGAN3's).
#
# A .zip (or a folder) of images, in EDM's case uncompressed PNGs named '00000/img00000000.png', ..., plus
# 'dataset.json' = {"labels": [["00000/img00000000.png", 6], ...]} at the root; "labels" is null when the
# source had none. Names in dataset.json always use '/', also for folders written on Windows. EDM's
# ImageNet-64 zip is 1,281,167 RGB 64x64 images with labels 0..999.

_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# PIL modes we read, and the mode we read them as: 1 channel ('L') or 3 ('RGB'); alpha is dropped.
_READ_MODE = {"L": "L", "1": "L", "LA": "L", "RGB": "RGB", "RGBA": "RGB", "P": "RGB", "CMYK": "RGB",
              "YCbCr": "RGB"}


class ImageDataset(torch.utils.data.Dataset):
    """Images and class labels from a dataset written by EDM's dataset_tool.py (a .zip or a folder).

    Items are `(image, label)`: image a uint8 tensor [C, H, W] (C = 1 or 3), label an int (-1 when
    `use_labels=False`). Everything is checked at construction, which reads every image header (about 40 us
    per image, under a minute for ImageNet): all images square, of one size and channel count, equal to
    `resolution` if given, and with `use_labels` a label for every image. A zip is opened lazily, once per
    process, so the dataset works in DataLoader workers (forked or spawned).
    """

    def __init__(self, path: str, resolution: int | None = None, use_labels: bool = True):
        if not os.path.exists(path):
            raise FileNotFoundError(f"no such dataset: {path}")
        self.path = path
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid = -1
        if os.path.isdir(path):
            self._is_zip = False
            names = [os.path.relpath(os.path.join(root, f), path).replace(os.sep, "/")
                     for root, _dirs, files in os.walk(path) for f in files]
        elif path.lower().endswith(".zip") and zipfile.is_zipfile(path):
            self._is_zip = True
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        else:
            raise ValueError(f"{path}: a dataset must be a folder or a .zip archive")
        self.names = sorted(n for n in names if os.path.splitext(n)[1].lower() in _IMAGE_EXTENSIONS)
        if not self.names:
            raise ValueError(f"{path}: no images found (extensions {', '.join(_IMAGE_EXTENSIONS)})")
        self._shape = self._check_images(resolution)  # (C, H, W)
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
                with self._open(name) as f, PIL.Image.open(f) as img:  # reads the header only
                    size, mode = img.size, img.mode
            except (OSError, PIL.UnidentifiedImageError) as e:
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

    def _read_labels(self) -> np.ndarray:
        hint = "; pass use_labels=False for unconditional use"
        try:
            with self._open("dataset.json") as f:
                meta = json.load(f)
        except (FileNotFoundError, KeyError):  # KeyError: no such member in the zip
            raise ValueError(f"{self.path}: use_labels=True but there is no dataset.json{hint}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.path}: dataset.json is not valid JSON: {e}") from e
        if not isinstance(meta, dict) or "labels" not in meta:
            raise ValueError(f"{self.path}: dataset.json has no 'labels' entry{hint}")
        if meta["labels"] is None:
            raise ValueError(f"{self.path}: dataset.json has null labels (written from unlabelled data){hint}")
        try:
            labels = {str(name).replace("\\", "/"): label for name, label in meta["labels"]}
        except (TypeError, ValueError):
            raise ValueError(f"{self.path}: dataset.json 'labels' must be a list of [name, label] pairs") from None
        missing = [name for name in self.names if name not in labels]
        if missing:
            raise ValueError(f"{self.path}: {len(missing)} of {len(self.names)} images have no label in "
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
# FID comparable with EDM's: DMD2 reports ImageNet-64 FID of 50,000 samples "using EDM's evaluation code"
# (App. G), against EDM's reference statistics 'imagenet-64x64.npz' (not '-baseline.npz', which is for ADM).
#
# EDM's fid.py: StyleGAN3's Inception-v3 detector ('inception-2015-12-05.pkl', NVIDIA's PyTorch translation of
# the TensorFlow graph inception-2015-12-05) called as detector(images, return_features=True) on uint8 NCHW
# images with 3 channels (grayscale repeated) -> 2048-d pool features; mean and unbiased (n - 1) covariance
# accumulated in float64; FD = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)). clean-fid's "legacy_tensorflow"
# extractor runs the TorchScript export of the same translation ('inception-2015-12-05.pt', StyleGAN2-ADA's
# detector) as base(images, return_features=True) on the images as given; the network itself casts them to
# float32, resizes to 299x299 (TensorFlow's bilinear resize) and scales to [-1, 1], so uint8 in gives what
# EDM's detector computes. Samples become uint8 exactly as EDM's generate.py writes its PNGs.


def images_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Generator output in [-1, 1] -> uint8 the way EDM's generate.py writes its PNGs: (x 127.5 + 128),
    clipped and truncated, i.e. round(x 127.5 + 127.5) with halves rounded up."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)


def _check_uint8_batch(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        what = f"{images.dtype} {list(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected uint8 images [B, C, H, W] in 0..255 (see images_to_uint8), got {what}")


class MeanCov:
    """Running mean and covariance of feature vectors, in float64, merged batch by batch (Chan et al. 1979):
    exact for any number of batches, and free of the cancellation of sum(x x^T) - n mu mu^T. Starts from
    zeros (the DMD2 authors' ImageNet FID code starts its covariance sum from ones)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None  # [D]
        self.m2: torch.Tensor | None = None  # [D, D], sum of outer products of deviations from the mean

    def update(self, features: torch.Tensor) -> None:
        """Add a batch of features [B, D]."""
        if features.ndim != 2:
            raise ValueError(f"features must be [B, D], got {list(features.shape)}")
        if len(features) == 0:
            return
        f = features.detach().to(torch.float64)
        mean = f.mean(0)
        centred = f - mean
        self.merge(len(f), mean, centred.T @ centred)

    def merge(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Add the statistics (count, mean, m2) of another set, e.g. another rank's `MeanCov`."""
        if self.mean is None:
            self.mean = torch.zeros_like(mean, dtype=torch.float64)
            self.m2 = torch.zeros_like(m2, dtype=torch.float64)
        if n == 0:
            return
        if mean.shape != self.mean.shape:
            raise ValueError(f"feature dimension changed from {self.mean.shape[0]} to {mean.shape[0]}")
        total = self.n + n
        delta = mean.to(self.mean) - self.mean
        self.mean += delta * (n / total)
        self.m2 += m2.to(self.m2) + torch.outer(delta, delta) * (self.n * n / total)
        self.n = total

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu [D], sigma [D, D]) as float64 numpy arrays; sigma is the unbiased covariance, as EDM's."""
        if self.n < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.n}")
        return self.mean.cpu().numpy(), (self.m2 / (self.n - 1)).cpu().numpy()


def feature_statistics(images: Iterable[torch.Tensor],
                       extractor: Callable[[torch.Tensor], torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64, unbiased) of `extractor(batch)` over batches of uint8 images [B, C, H, W].

    Batches are processed one at a time (images may be a generator; 50k samples are never held at once).
    The extractor returns features [B, D]: `inception_extractor(device)` for FID, anything for tests.
    """
    stats = MeanCov()
    for batch in images:
        _check_uint8_batch(batch)
        if len(batch) == 0:
            continue
        features = extractor(batch)
        if features.ndim != 2 or len(features) != len(batch):
            raise ValueError(f"the extractor returned {list(features.shape)} for {len(batch)} images; "
                             f"expected [B, D]")
        stats.update(features)
    return stats.result()


def inception_extractor(device: torch.device | str) -> Callable[[torch.Tensor], torch.Tensor]:
    """EDM's FID feature detector through clean-fid: uint8 [B, C, H, W] -> float32 [B, 2048].

    clean-fid's "legacy_tensorflow" mode loads the TorchScript Inception-v3 from /tmp/inception-2015-12-05.pt,
    downloading it on first use (on a machine without internet, put the file there). Images go in as EDM's
    fid.py gives them to its detector: uint8, NCHW, any size (resized to 299x299 inside), grayscale repeated
    to 3 channels.
    """
    device = torch.device(device)
    try:
        model = cleanfid.features.build_feature_extractor("legacy_tensorflow", device=device, use_dataparallel=False)
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        # clean-fid downloads without a temporary file: an interrupted download leaves a truncated file behind
        raise RuntimeError(f"clean-fid could not load its Inception-v3 ({type(e).__name__}: {e}). Put "
                           f"{cleanfid.downloads_helper.inception_url} at /tmp/inception-2015-12-05.pt (and delete "
                           f"a partial file there, if any)") from e
    return _edm_detector_input(model, device)


def _edm_detector_input(model: Callable[[torch.Tensor], torch.Tensor],
                        device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """Wrap a detector so that it receives exactly what EDM's fid.py passes to its own."""

    @torch.no_grad()
    def extract(images: torch.Tensor) -> torch.Tensor:
        _check_uint8_batch(images)
        if images.shape[1] not in (1, 3):
            raise ValueError(f"images must have 1 or 3 channels, got {images.shape[1]}")
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)  # EDM's fid.py does the same
        return model(images.to(device)).float()

    return extract


def load_reference_statistics(path_or_url: str, cache_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from an .npz with keys 'mu' [D] and 'sigma' [D, D], as EDM's fid.py writes them, e.g.
    `EDM_IMAGENET64_REF_URL`. URLs are downloaded once (see `local_file`)."""
    path = local_file(path_or_url, cache_dir)
    try:
        npz = np.load(path)  # allow_pickle=False: statistics are plain arrays
    except (ValueError, OSError) as e:
        raise ValueError(f"{path} is not an .npz file of FID statistics ({e})") from e
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is a single array, not an .npz file of FID statistics with 'mu' and 'sigma'")
    with npz:
        missing = {"mu", "sigma"} - set(npz.files)
        if missing:
            raise ValueError(f"{path} lacks {sorted(missing)}; found {npz.files}. Expected EDM's reference "
                             f"statistics, np.savez(path, mu=mu, sigma=sigma)")
        mu, sigma = npz["mu"].astype(np.float64), npz["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} must be [D] and [D, D]")
    return mu, sigma


def fid_from_statistics(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64, by clean-fid's
    `frechet_distance` (EDM's fid.py computes the same; clean-fid also guards against a singular product)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = len(mu1) if mu1.ndim == 1 else -1
    if d < 0 or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"statistics do not match: mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, "
                         f"sigma2 {sigma2.shape}")
    return float(cleanfid.fid.frechet_distance(mu1, sigma1, mu2, sigma2))
