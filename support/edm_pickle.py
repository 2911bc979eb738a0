"""EDM network pickles without the EDM repository, and local copies of downloaded files.

    local_file             a local path as is, or the cached download of an http(s) URL
    load_edm_network       the network in an EDM network pickle (`torch_utils.persistence`, e.g.
                           edm-imagenet-64x64-cond-adm.pkl), rebuilt from the source the pickle carries
"""

from __future__ import annotations

import builtins
import hashlib
import io
import os
import pickle
import sys
import types
import urllib.error
import urllib.parse
from collections.abc import Callable

import torch
from torch import nn

# Local files and cached downloads (network pickles and FID reference statistics).


def local_file(source: str, cache_dir: str | None = None) -> str:
    """`source` itself if it is a local path, else the cached copy of an http(s) URL, downloaded once.

    The cache is `cache_dir`, by default `<torch hub dir>/edm` (`$TORCH_HOME/hub/edm`). The file name carries
    a hash of the URL, so two URLs that end in the same name never share a cache entry."""
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
            raise RuntimeError(f"could not download {source}: {e}. Download it by hand and pass the local path.") from e
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
    # torch_utils.misc: imported by EDM's augment.py; nothing in it is used to load
    package, persistence, misc = map(types.ModuleType, ("torch_utils", "torch_utils.persistence", "torch_utils.misc"))
    persistence.persistent_class, misc.__getattr__ = _persistent_class, _missing("torch_utils.misc")
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
    """The network under `key` in an EDM network pickle (a local path, or an http(s) URL downloaded once into
    `cache_dir`, see `local_file`; e.g. `EDM_IMAGENET64_URL`, DMD2's ImageNet-64 teacher), without the EDM repository:
    EDM's own `torch_utils`, if importable, rebuilds the classes, else ours, from the same embedded source. Either way
    unpickling executes the code stored in the file (as EDM's loader does): load only files you trust.

    EDM's ImageNet network: `EDMPrecond` around a `DhariwalUNet` (ADM), `net(x [B, 3, 64, 64] in [-1, 1], sigma [B],
    one-hot labels [B, 1000])` -> x0 (float32), saved in eval mode with requires_grad off, constructor arguments in
    `net._init_kwargs`. Its `use_fp16=True` casts the UNet's input to float16 on CUDA and asserts a float16 output
    (unless called with `force_fp32=True`), which fails under torch.autocast (bfloat16; the DMD2 authors edited that
    cast to bfloat16); `.train()` turns on its dropout (0.10). The GAN head's bottleneck (8x8x768) is the output of
    `edm_encoder_output_module(net)`."""
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
