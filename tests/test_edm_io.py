"""EDM input/output of the ImageNet-64 experiment: network pickles in EDM's persistence format (loaded
without the EDM repository), datasets in the format of EDM's dataset_tool.py, and FID statistics.

The pickles are written here by the tests' own implementation of the writing half of EDM's
torch_utils/persistence.py, around a tiny network source that imports torch_utils exactly as EDM's
training/networks.py does."""

from __future__ import annotations

import contextlib
import copy
import functools
import http.server
import io
import json
import os
import pickle
import sys
import threading
import types
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dmd2
import train_imagenet as ti
from train_imagenet import (
    EDMPickleError,
    ImageDataset,
    MeanCov,
    edm_encoder_output_module,
    fid_from_statistics,
    images_to_uint8,
    inception_extractor,
    load_edm_network,
    load_reference_statistics,
)

# ----------------------------------------------------------------------------------------------------
# Writing pickles in EDM's persistence format

TINY_NETWORKS_SRC = '''
"""A tiny stand-in for EDM's training/networks.py: EDMPrecond around a two-level UNet with DhariwalUNet's
layout (blocks in model.enc / model.dec ModuleDicts) and the same imports from torch_utils."""

import numpy as np
import torch
from torch_utils import persistence
from torch.nn.functional import silu


def weight_init(shape, fan_in):
    return torch.randn(*shape) / np.sqrt(fan_in)


@persistence.persistent_class
class Conv2d(torch.nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.weight = torch.nn.Parameter(weight_init([out_channels, in_channels, 3, 3], 9 * in_channels))
        self.bias = torch.nn.Parameter(0.1 * torch.randn(out_channels))

    def forward(self, x):
        return torch.nn.functional.conv2d(x, self.weight, self.bias, padding=1)


@persistence.persistent_class
class UNetBlock(torch.nn.Module):
    def __init__(self, in_channels, out_channels, emb_channels, down=False, up=False):
        super().__init__()
        self.in_channels, self.out_channels, self.down, self.up = in_channels, out_channels, down, up
        self.conv = Conv2d(in_channels, out_channels)
        self.affine = torch.nn.Linear(emb_channels, out_channels)
        self.register_buffer("scale", torch.full([out_channels, 1, 1], 0.9))

    def forward(self, x, emb):
        if self.down:
            x = torch.nn.functional.avg_pool2d(x, 2)
        if self.up:
            x = torch.nn.functional.interpolate(x, scale_factor=2.0)
        return silu(self.scale * self.conv(x) + self.affine(emb)[:, :, None, None])


@persistence.persistent_class
class DhariwalUNet(torch.nn.Module):
    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, model_channels=8, dropout=0.1):
        super().__init__()
        c, e, r, h = model_channels, 4 * model_channels, img_resolution, img_resolution // 2
        self.dropout = dropout
        self.map_noise = torch.nn.Linear(1, e)
        self.map_label = torch.nn.Linear(label_dim, e, bias=False) if label_dim else None
        self.enc = torch.nn.ModuleDict()
        self.enc[f"{r}x{r}_conv"] = Conv2d(in_channels, c)
        self.enc[f"{h}x{h}_down"] = UNetBlock(c, c, e, down=True)
        self.enc[f"{h}x{h}_block0"] = UNetBlock(c, 2 * c, e)
        self.dec = torch.nn.ModuleDict()
        self.dec[f"{h}x{h}_in0"] = UNetBlock(2 * c, 2 * c, e)
        self.dec[f"{r}x{r}_up"] = UNetBlock(2 * c, c, e, up=True)
        self.out_conv = Conv2d(c, out_channels)

    def embedding(self, noise_labels, class_labels):
        emb = self.map_noise(noise_labels[:, None])
        if self.map_label is not None:
            emb = emb + self.map_label(class_labels)
        return silu(emb)

    def forward(self, x, noise_labels, class_labels):
        emb = self.embedding(noise_labels, class_labels)
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
        x = torch.nn.functional.dropout(x, p=self.dropout, training=self.training)
        for block in self.dec.values():
            x = block(x, emb)
        return self.out_conv(x)


@persistence.persistent_class
class EDMPrecond(torch.nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim=0, sigma_data=0.5, model_type="DhariwalUNet",
                 **model_kwargs):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.sigma_data = sigma_data
        self.model = globals()[model_type](img_resolution=img_resolution, in_channels=img_channels,
                                           out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def forward(self, x, sigma, class_labels=None):
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        return c_skip * x + c_out * self.model(c_in * x, (sigma.log() / 4).flatten(), class_labels)


@persistence.persistent_class
class EDMLoss:
    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data
'''

STYLEGAN_LIKE_SRC = '''
import torch
from torch_utils import persistence
from torch_utils.ops import bias_act


@persistence.persistent_class
class MappingNetwork(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(2, 2)

    def forward(self, z):
        return bias_act.bias_act(self.fc(z))
'''

_ABSENT = object()


@contextlib.contextmanager
def sys_modules(entries: dict):
    """Set (or, with None, block the import of) some sys.modules entries, restoring exactly those after."""
    saved = {name: sys.modules.get(name, _ABSENT) for name in entries}
    sys.modules.update(entries)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is _ABSENT:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


NO_TORCH_UTILS = {"torch_utils": None, "torch_utils.persistence": None, "torch_utils.misc": None,
                  "dnnlib": None, "dnnlib.util": None}  # None in sys.modules: `import` raises ImportError


class EDMPersistence:
    """The writing half of EDM's torch_utils.persistence (read from NVlabs/edm), reimplemented for the tests.

    `persistent_class` subclasses a class so that its instances reduce to `_reconstruct_persistent_obj(meta)`,
    meta = dict(type='class', version=6, module_src=<module source>, class_name=..., state=<reduced state>),
    and records the constructor arguments as `_init_args` / `_init_kwargs`. `modules()` are the sys.modules
    entries under which pickle finds the reconstruct function as torch_utils.persistence's, and which make this
    object the importable, "real" torch_utils.
    """

    def __init__(self, drop_from_state: tuple[str, ...] = ()):
        self.drop_from_state = drop_from_state  # attributes an older torch's modules did not have yet
        self.sources: dict[str, str] = {}  # module name -> source
        self.module_of_source: dict[str, types.ModuleType] = {}
        self.calls: list[str] = []  # class names rebuilt by `reconstruct`
        self.persistence = types.ModuleType("torch_utils.persistence")
        self.persistence.persistent_class = self.persistent_class
        self.persistence._reconstruct_persistent_obj = self.reconstruct_function()
        self.ops = types.ModuleType("torch_utils.ops")  # what a StyleGAN network source needs besides
        self.ops.bias_act = types.SimpleNamespace(bias_act=torch.relu)
        self.package = types.ModuleType("torch_utils")
        self.package.persistence, self.package.ops = self.persistence, self.ops
        self.package.__path__ = []  # a package, so that `import torch_utils.ops` works
        self.dnnlib_util = types.ModuleType("dnnlib.util")
        self.dnnlib_util.EasyDict = type("EasyDict", (dict,), {"__module__": "dnnlib.util"})
        self.dnnlib = types.ModuleType("dnnlib")
        self.dnnlib.util = self.dnnlib_util

    def modules(self) -> dict:
        return {"torch_utils": self.package, "torch_utils.persistence": self.persistence,
                "torch_utils.ops": self.ops, "dnnlib": self.dnnlib, "dnnlib.util": self.dnnlib_util}

    def reconstruct_function(self):
        def _reconstruct_persistent_obj(meta):
            self.calls.append(meta["class_name"])
            cls = self.module_of_source[meta["module_src"]].__dict__[meta["class_name"]]
            obj = cls.__new__(cls)
            if hasattr(obj, "__setstate__"):
                obj.__setstate__(meta["state"])
            else:
                obj.__dict__.update(meta["state"])
            return obj

        _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
        _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
        return _reconstruct_persistent_obj

    def persistent_class(self, orig: type) -> type:
        src, rebuild = self.sources[orig.__module__], self.persistence._reconstruct_persistent_obj
        drop = self.drop_from_state

        class Persistent(orig):
            def __init__(obj, *args, **kwargs):
                super().__init__(*args, **kwargs)
                obj._init_args, obj._init_kwargs = copy.deepcopy(args), copy.deepcopy(kwargs)

            def __reduce__(obj):  # (callable, args, state, ...) with the state moved into meta
                reduced = list(super().__reduce__())
                reduced += [None] * (3 - len(reduced))
                if reduced[0] is not rebuild:
                    state = {k: v for k, v in reduced[2].items() if k not in drop}
                    meta = dict(type="class", version=6, module_src=src, class_name=orig.__name__, state=state)
                    reduced[:3] = [rebuild, (meta,), None]
                return tuple(reduced)

        Persistent.__name__ = Persistent.__qualname__ = orig.__name__
        Persistent.__module__ = orig.__module__
        return Persistent

    def load_source(self, name: str, src: str) -> types.ModuleType:
        module = types.ModuleType(name)
        self.sources[name], self.module_of_source[src] = src, module
        with sys_modules({**self.modules(), name: module}):
            exec(src, module.__dict__)
        return module

    def dumps(self, obj: object) -> bytes:
        with sys_modules(self.modules()):
            return pickle.dumps(obj)


def tiny_edm_net(writer: EDMPersistence, seed: int = 0):
    torch.manual_seed(seed)
    module = writer.load_source(f"tiny_edm_networks_{seed}", TINY_NETWORKS_SRC)
    net = module.EDMPrecond(img_resolution=8, img_channels=3, label_dim=10, model_channels=8)
    # As EDM's training loop snapshots it: a copy in eval mode without gradients, on the CPU
    return module, copy.deepcopy(net).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def edm_pickle(tmp_path_factory):
    """(path, writer, module, net): a pickle dict(ema=net, loss_fn=..., augment_pipe=None, dataset_kwargs=...)
    written as EDM's training loop writes its snapshots."""
    writer = EDMPersistence()
    module, net = tiny_edm_net(writer)
    data = dict(ema=net, loss_fn=module.EDMLoss(), augment_pipe=None,
                dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="imagenet-64x64.zip"))
    path = tmp_path_factory.mktemp("edm") / "network-snapshot.pkl"
    path.write_bytes(writer.dumps(data))
    return str(path), writer, module, net


def inputs(batch: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 8, 8, generator=g)
    sigma = torch.exp(torch.randn(batch, generator=g) * 1.2 - 1.2)
    labels = torch.eye(10)[torch.randint(0, 10, (batch,), generator=g)]
    return x, sigma, labels


def load_without_torch_utils(path: str, **kwargs):
    with sys_modules(NO_TORCH_UTILS):
        net = load_edm_network(path, **kwargs)
        assert sys.modules["torch_utils"] is None, "the stand-in must not be registered in sys.modules"
    return net


# ----------------------------------------------------------------------------------------------------
# EDM network pickles


def test_written_pickle_has_edm_structure(edm_pickle):
    path, _writer, module, net = edm_pickle
    data = open(path, "rb").read()
    assert b"torch_utils.persistence" in data and b"_reconstruct_persistent_obj" in data
    assert TINY_NETWORKS_SRC.encode() in data, "the classes travel as their module's source"
    assert module.__name__.encode() not in data, "... and never by reference to their module"
    assert b"module_src" in data and b"class_name" in data


def test_loads_without_torch_utils_and_matches_the_original(edm_pickle):
    path, _writer, _module, net = edm_pickle
    loaded = load_without_torch_utils(path)
    assert type(loaded).__name__ == "EDMPrecond" and type(loaded.model).__name__ == "DhariwalUNet"
    assert type(loaded) is not type(net), "rebuilt from the embedded source, not the writer's classes"
    x, sigma, labels = inputs()
    assert torch.equal(loaded(x, sigma, labels), net(x, sigma, labels))
    assert loaded.state_dict().keys() == net.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), net.state_dict().values(), strict=True))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert loaded._init_kwargs == dict(img_resolution=8, img_channels=3, label_dim=10, model_channels=8)


def test_loaded_network_runs_as_teacher_and_copies_train(edm_pickle):
    net = load_without_torch_utils(edm_pickle[0])
    sch = dmd2.EDMSchedule()

    def denoiser(model):
        return lambda x_t, t, cond: model(x_t, sch.sigma(t), cond)

    fake = copy.deepcopy(net).train().requires_grad_(True)  # how the critic is initialised from the teacher
    fake.model.dropout = 0.0
    assert type(fake) is type(net) and fake.model.enc is not net.model.enc
    x, _, labels = inputs(batch=6)
    grad = dmd2.dmd_gradient(x, denoiser(net), denoiser(fake), sch, cond=labels, generator=torch.Generator())
    assert torch.equal(grad, torch.zeros_like(grad)), "identical teacher and critic: no DMD gradient"
    loss = dmd2.fake_score_loss(x, denoiser(fake), sch, cond=labels, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is not None for p in fake.parameters())
    assert all(p.grad is None for p in net.parameters())
    before = copy.deepcopy(net.state_dict())
    torch.optim.SGD(fake.parameters(), lr=0.1).step()
    assert all(torch.equal(a, b) for a, b in zip(before.values(), net.state_dict().values(), strict=True))


def test_uses_real_torch_utils_when_importable(edm_pickle):
    path, writer, _module, net = edm_pickle
    writer.calls.clear()
    with sys_modules(writer.modules()):
        loaded = load_edm_network(path)
    assert type(loaded) is type(net), "the importable torch_utils rebuilt the objects"
    assert "EDMPrecond" in writer.calls and "EDMLoss" in writer.calls
    x, sigma, labels = inputs()
    assert torch.equal(loaded(x, sigma, labels), net(x, sigma, labels))


def test_other_keys_and_objects(edm_pickle):
    path = edm_pickle[0]
    with sys_modules(NO_TORCH_UTILS):
        with pytest.raises(EDMPickleError, match="'loss_fn'.*not a torch.nn.Module"):
            load_edm_network(path, key="loss_fn")
        with pytest.raises(EDMPickleError, match="no key 'G_ema'.*'ema', 'loss_fn', 'augment_pipe'"):
            load_edm_network(path, key="G_ema")


def test_easydict_in_pickle(tmp_path):
    writer = EDMPersistence()
    _, net = tiny_edm_net(writer, seed=3)
    path = tmp_path / "net.pkl"
    path.write_bytes(writer.dumps(dict(ema=net, kwargs=writer.dnnlib_util.EasyDict(xflip=True))))
    loaded = load_without_torch_utils(str(path))
    x, sigma, labels = inputs()
    assert torch.equal(loaded(x, sigma, labels), net(x, sigma, labels))


def test_pickle_from_an_older_torch(tmp_path):
    """EDM's pickles were written with torch 1.12, whose modules lacked attributes that torch has added since;
    nn.Module.__setstate__ adds them, so the rebuilt objects must go through it."""
    newer = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
             "_state_dict_pre_hooks", "_backward_pre_hooks", "_load_state_dict_post_hooks")
    writer = EDMPersistence(drop_from_state=newer)
    _, net = tiny_edm_net(writer, seed=4)
    path = tmp_path / "old.pkl"
    path.write_bytes(writer.dumps(dict(ema=net)))
    loaded = load_without_torch_utils(str(path))
    assert all(hasattr(m, name) for m in loaded.modules() for name in newer)
    x, sigma, labels = inputs()
    assert torch.equal(loaded(x, sigma, labels), net(x, sigma, labels))


def test_tensors_pickled_on_a_gpu_load_on_the_cpu(tmp_path, monkeypatch):
    net = torch.nn.Linear(2, 2)
    with monkeypatch.context() as m:  # storages record device "cuda:0", as when pickled from a GPU
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        data = pickle.dumps(dict(ema=net))
    assert b"cuda:0" in data
    (tmp_path / "gpu.pkl").write_bytes(data)
    loaded = load_edm_network(str(tmp_path / "gpu.pkl"))
    assert loaded.weight.device.type == "cpu" and torch.equal(loaded.weight, net.weight)


def test_deepcopy_and_repickle_keep_the_source(edm_pickle):
    net = load_without_torch_utils(edm_pickle[0])
    data = pickle.dumps(net)
    assert TINY_NETWORKS_SRC.encode() in data and b"_edm_source_" not in data, "by source, not by module name"
    again = pickle.loads(data)  # refers to train_imagenet's reconstruct function
    assert type(again) is type(net)
    x, sigma, labels = inputs()
    assert torch.equal(again(x, sigma, labels), net(x, sigma, labels))


def _stop_at(module: torch.nn.Module, net: torch.nn.Module, *args) -> tuple[torch.Tensor, int]:
    """The documented recipe: a hook that stores the output and stops the forward. Returns (features, number of
    decoder blocks that ran)."""

    class Stop(Exception):
        pass

    features, ran = [], []

    def hook(_module, _args, output):
        features.append(output)
        raise Stop

    handles = [module.register_forward_hook(hook)]
    handles += [b.register_forward_pre_hook(lambda *_: ran.append(1)) for b in net.model.dec.values()]
    try:
        net(*args)
    except Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return features[0], len(ran)


def test_encoder_output_module_gives_the_bottleneck(edm_pickle):
    net = load_without_torch_utils(edm_pickle[0])
    module = edm_encoder_output_module(net)
    assert module is net.model.enc["4x4_block0"]
    assert edm_encoder_output_module(net.model) is module
    x, sigma, labels = inputs()
    features, decoder_blocks_run = _stop_at(module, net, x, sigma, labels)
    assert decoder_blocks_run == 0
    # the encoder by hand: EDMPrecond's input scaling, then every encoder block in order
    sd, s = net.sigma_data, sigma.reshape(-1, 1, 1, 1)
    emb = net.model.embedding((s.log() / 4).flatten(), labels)
    h = (1 / (sd**2 + s**2).sqrt()) * x
    h = net.model.enc["8x8_conv"](h)
    h = net.model.enc["4x4_down"](h, emb)
    h = net.model.enc["4x4_block0"](h, emb)
    assert features.shape == (4, 16, 4, 4)
    assert torch.equal(features, h)


def test_encoder_output_module_rejects_other_layouts():
    with pytest.raises(ValueError, match="EDM's UNet layout"):
        edm_encoder_output_module(torch.nn.Linear(2, 2))
    other = torch.nn.Module()
    other.model = type("UNet", (torch.nn.Module,), {})()
    other.model.enc = torch.nn.ModuleDict({"a": torch.nn.Identity()})  # no decoder dict
    with pytest.raises(ValueError, match="around UNet"):
        edm_encoder_output_module(other)


def test_stylegan_like_source_fails_clearly(tmp_path):
    writer = EDMPersistence()
    module = writer.load_source("stylegan_like_networks", STYLEGAN_LIKE_SRC)
    path = tmp_path / "stylegan.pkl"
    path.write_bytes(writer.dumps(dict(G_ema=module.MappingNetwork())))
    with pytest.raises(EDMPickleError, match="MappingNetwork.*torch_utils.ops"):
        load_without_torch_utils(str(path))


def test_pickle_of_another_kind_fails_clearly(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    cases = {
        "state_dict.pkl": (pickle.dumps(net.state_dict()), r"no key 'ema'.*'0.weight'.*a state dict"),
        "dict.pkl": (pickle.dumps({"G": 1, "D": 2}), r"no key 'ema'; found 'G', 'D'"),
        "list.pkl": (pickle.dumps([net]), "holds a list, not a dict"),
        "text.pkl": (b"not a pickle at all\n", "not a pickle file"),
        "truncated.pkl": (pickle.dumps({"ema": net})[:50], "not a pickle file|could not unpickle"),
        "empty.pkl": (b"", "not a pickle file"),
    }
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    cases["checkpoint.pt"] = (buf.getvalue(), "zip archive.*torch.load")
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(EDMPickleError, match=message):
            load_without_torch_utils(str(tmp_path / name))


def test_missing_file_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_edm_network(str(tmp_path / "nope.pkl"))


@contextlib.contextmanager
def http_server(directory: str):
    handler = functools.partial(QuietHandler, directory=directory)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_url_is_downloaded_once_into_the_cache(edm_pickle, tmp_path):
    path, _writer, _module, net = edm_pickle
    cache = tmp_path / "cache"
    with http_server(os.path.dirname(path)) as url:
        source = f"{url}/{os.path.basename(path)}"
        loaded = load_without_torch_utils(source, cache_dir=str(cache))
    cached = os.listdir(cache)
    assert len(cached) == 1 and cached[0].endswith("network-snapshot.pkl"), cached
    assert open(cache / cached[0], "rb").read() == open(path, "rb").read()
    again = load_without_torch_utils(source, cache_dir=str(cache))  # the server is gone: from the cache
    x, sigma, labels = inputs()
    assert torch.equal(again(x, sigma, labels), net(x, sigma, labels))
    assert torch.equal(loaded(x, sigma, labels), net(x, sigma, labels))


def test_download_failure_is_clear(tmp_path):
    with http_server(str(tmp_path)) as url:
        with pytest.raises(RuntimeError, match="could not download .*missing.pkl.*by hand"):
            load_edm_network(f"{url}/missing.pkl", cache_dir=str(tmp_path / "cache"))
    assert not any(tmp_path.joinpath("cache").iterdir()), "no partial file left behind"


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


# ----------------------------------------------------------------------------------------------------
# FID statistics


OFFSET = 1e4  # large, so that a float32 or sum-of-squares computation would lose the covariance


def linear_map(dim_in: int, dim_out: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((dim_in, dim_out))


def linear_extractor(w: np.ndarray):
    """Features: a fixed linear map of the flattened pixels plus a large offset, float64."""
    return lambda images: images.flatten(1).double() @ torch.from_numpy(w) / 255 + OFFSET


def feature_statistics(batches, extractor) -> tuple[np.ndarray, np.ndarray]:
    """Statistics of extractor(batch) accumulated batch by batch, as the evaluation does."""
    stats = MeanCov()
    for batch in batches:
        stats.update(extractor(batch))
    return stats.result()


@settings(deadline=None, max_examples=15)
@given(sizes=st.lists(st.integers(0, 9), min_size=1, max_size=6).filter(lambda s: sum(s) >= 2),
       seed=st.integers(0, 2**16))
def test_feature_statistics_equal_numpy_mean_and_unbiased_cov(sizes, seed):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (sum(sizes), 1, 3, 3), dtype=torch.uint8, generator=g)
    w = linear_map(9, seed=seed)
    mu, sigma = feature_statistics(iter(images.split(sizes)), linear_extractor(w))  # batch by batch
    feats = images.numpy().reshape(len(images), -1).astype(np.float64) @ w / 255 + OFFSET  # all at once, numpy
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False, ddof=1), rtol=1e-9, atol=1e-9)


def test_covariance_of_identical_features_is_zero():
    # the covariance sum must start from zeros: constant features have exactly zero covariance
    batches = [torch.full((4, 3, 2, 2), 7, dtype=torch.uint8)] * 3
    mu, sigma = feature_statistics(batches, lambda x: x.flatten(1)[:, :3].double())
    assert np.array_equal(sigma, np.zeros((3, 3))) and np.array_equal(mu, np.full(3, 7.0))


def test_mean_cov_merge_equals_pooled():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 4, generator=g) + 3, torch.randn(30, 4, generator=g) * 2
    one, two, pooled = MeanCov(), MeanCov(), MeanCov()
    one.update(a)
    two.update(b)
    pooled.update(torch.cat([a, b]))
    one.merge(two.n, two.mean, two.m2)  # e.g. another rank's statistics
    for x, y in zip(one.result(), pooled.result(), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-12)


def test_feature_statistics_errors():
    extract = ti._edm_detector_input(lambda images: images.flatten(1).float(), torch.device("cpu"))
    with pytest.raises(ValueError, match="uint8 images"):
        extract(torch.rand(2, 1, 2, 2))
    with pytest.raises(ValueError, match="uint8 images"):
        extract(torch.zeros(2, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="1 or 3 channels"):
        extract(torch.zeros(2, 2, 2, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics([torch.zeros(1, 1, 2, 2, dtype=torch.uint8)], extract)
    with pytest.raises(ValueError, match="must be \\[B, D\\]"):
        MeanCov().update(torch.zeros(3))


def test_generated_stats_quantise_and_split_over_ranks():
    """The evaluation path: samples -> uint8 as saved PNGs -> features, batch by batch, against numpy on the
    same samples; two ranks' statistics merged equal those of the union of their samples."""
    def sample_fn(z, labels):
        return torch.tanh(z) * 0.9 + labels.reshape(-1, 1, 1, 1) / 20
    def extractor(images):
        assert images.dtype == torch.uint8
        return images.flatten(1).double(), None

    def reference(seed: int, sizes: list[int]) -> np.ndarray:  # the same draws, written out
        g, rows = torch.Generator().manual_seed(seed), []
        for b in sizes:
            labels = torch.randint(0, 10, (b,), generator=g)
            rows.append(images_to_uint8(sample_fn(torch.randn(b, 1, 2, 2, generator=g), labels)).flatten(1))
        return torch.cat(rows).double().numpy()

    one, _ = ti.generated_stats(sample_fn, (1, 2, 2), 10, 4, 10, extractor, seed=3, device="cpu")
    feats = reference(3000, [4, 4, 2])
    np.testing.assert_allclose(one.result()[0], feats.mean(0), rtol=1e-12)
    np.testing.assert_allclose(one.result()[1], np.cov(feats, rowvar=False), rtol=1e-9, atol=1e-9)
    parts = [ti.generated_stats(sample_fn, (1, 2, 2), 10, 4, 10, extractor, 3, "cpu", rank=r, world=2)[0]
             for r in range(2)]
    assert [p.n for p in parts] == [5, 5]
    parts[0].merge(parts[1].n, parts[1].mean, parts[1].m2)
    union = np.concatenate([reference(3000, [4, 1]), reference(3001, [4, 1])])
    np.testing.assert_allclose(parts[0].result()[1], np.cov(union, rowvar=False), rtol=1e-9, atol=1e-9)


def commuting_gaussians(dim: int, seed: int):
    """Two Gaussians whose covariances share eigenvectors Q: S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T, so that
    (S1 S2)^(1/2) = Q diag(sqrt(a b)) Q^T and FD = |mu1 - mu2|^2 + sum(a + b - 2 sqrt(a b))."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    a, b = rng.uniform(0.1, 3, dim), rng.uniform(0.1, 3, dim)
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    closed_form = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    return (mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T), closed_form


@settings(deadline=None, max_examples=20)
@given(dim=st.integers(2, 12), seed=st.integers(0, 2**16))  # SciPy 1.17's sqrtm(disp=False) breaks on 1x1
def test_fid_equals_closed_form_for_commuting_covariances(dim, seed):
    stats, closed_form = commuting_gaussians(dim, seed)
    assert fid_from_statistics(*stats) == pytest.approx(closed_form, rel=1e-8, abs=1e-9)


def gaussian_features(mu: np.ndarray, sigma: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n samples [n, D] whose sample mean is exactly mu and whose unbiased sample covariance is exactly sigma."""
    z = np.random.default_rng(seed).standard_normal((n, len(mu)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # now cov(z) = I
    return mu + z @ np.linalg.cholesky(sigma).T


def serve(features: np.ndarray):
    """An extractor that ignores the pixels and hands out the given features, batch after batch."""
    rows = iter(torch.from_numpy(features))
    return lambda images: torch.stack([next(rows) for _ in range(len(images))])


def test_fid_of_computed_statistics_equals_closed_form():
    """Features of two Gaussians, served batch by batch: the FID of what feature_statistics computes equals the
    closed form of the two Gaussians."""
    (mu1, s1, mu2, s2), closed_form = commuting_gaussians(6, seed=7)
    batches = [torch.zeros(64, 1, 1, 1, dtype=torch.uint8)] * 10 + [torch.zeros(3, 1, 1, 1, dtype=torch.uint8)]
    stats1 = feature_statistics(batches, serve(gaussian_features(mu1, s1, 643, seed=1)))
    stats2 = feature_statistics(batches, serve(gaussian_features(mu2, s2, 643, seed=2)))
    assert closed_form > 1
    assert fid_from_statistics(*stats1, *stats2) == pytest.approx(closed_form, rel=1e-9)
    assert fid_from_statistics(*stats1, *stats1) == pytest.approx(0, abs=1e-9)


def test_fid_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="do not match"):
        fid_from_statistics(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_images_to_uint8_matches_edm_generate():
    # EDM's generate.py: (x * 127.5 + 128).clip(0, 255).to(uint8), i.e. round half up of x 127.5 + 127.5
    x = torch.tensor([-2.0, -1.0, -1 + 0.4 / 127.5, -1 + 0.6 / 127.5, 0.0, 1 - 0.6 / 127.5, 1.0, 3.0])
    assert images_to_uint8(x).tolist() == [0, 0, 0, 1, 128, 254, 255, 255]


class FakeInceptionTorchScript(torch.nn.Module):
    """Stands in for clean-fid's inception-2015-12-05.pt (not downloadable here), with its interface:
    forward(img, return_features) on NCHW images with 3 channels in 0..255 -> [B, 2048] features."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Identity()  # clean-fid's wrapper reads base.layers
        self.seen: list[torch.Tensor] = []

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert return_features and img.shape[1] == 3
        self.seen.append(img)
        return img.to(torch.float32).mean((2, 3)).repeat(1, 683)[:, :2048]


def test_inception_extractor_feeds_clean_fid_legacy_tensorflow_like_edm(monkeypatch):
    """Through clean-fid's real code (build_feature_extractor -> InceptionV3W with its internal resize), with the
    TorchScript file replaced: the network gets uint8 NCHW, 3 channels, unresized, as EDM's detector does."""
    fake, loaded = FakeInceptionTorchScript(), []
    import cleanfid.inception_torchscript

    monkeypatch.setattr(cleanfid.inception_torchscript, "check_download_inception", lambda fpath: None)
    monkeypatch.setattr(torch.jit, "load", lambda path: loaded.append(path) or fake)
    extract = inception_extractor("cpu")
    assert [os.path.basename(p) for p in loaded] == ["inception-2015-12-05.pt"]
    gray = torch.randint(0, 256, (2, 1, 5, 7), dtype=torch.uint8)
    features = extract(gray)
    assert features.shape == (2, 2048) and features.dtype == torch.float32
    assert fake.seen[0].dtype == torch.uint8 and fake.seen[0].shape == (2, 3, 5, 7)
    assert all(torch.equal(fake.seen[0][:, c], gray[:, 0]) for c in range(3)), "grayscale repeated to RGB"
    rgb = torch.randint(0, 256, (3, 3, 4, 4), dtype=torch.uint8)
    assert torch.equal(extract(rgb), rgb.float().mean((2, 3)).repeat(1, 683)[:, :2048])
    assert torch.equal(fake.seen[1], rgb)
    for bad in (rgb.float(), rgb[:, :2], rgb[0]):
        with pytest.raises(ValueError, match="uint8 images|1 or 3 channels"):
            extract(bad)
    mu, sigma = feature_statistics([rgb, gray[:, :, :4, :4]], extract)
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)


def test_inception_extractor_download_failure_is_clear(monkeypatch):
    def offline(fpath):
        raise ti.urllib.error.URLError("no network")

    import cleanfid.inception_torchscript

    monkeypatch.setattr(cleanfid.inception_torchscript, "check_download_inception", offline)
    with pytest.raises(RuntimeError, match="could not load its Inception-v3.*inception-2015-12-05.pt"):
        inception_extractor("cpu")


def test_load_reference_statistics(tmp_path):
    stats, _ = commuting_gaussians(4, seed=1)
    np.savez(tmp_path / "ref.npz", mu=stats[0].astype(np.float32), sigma=stats[1])
    mu, sigma = load_reference_statistics(str(tmp_path / "ref.npz"))
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_array_equal(mu, stats[0].astype(np.float32))
    np.testing.assert_array_equal(sigma, stats[1])
    with http_server(str(tmp_path)) as url:
        from_url = load_reference_statistics(f"{url}/ref.npz", cache_dir=str(tmp_path / "cache"))
    np.testing.assert_array_equal(from_url[1], sigma)
    np.savez(tmp_path / "mu_only.npz", mu=stats[0])
    with pytest.raises(ValueError, match=r"lacks \['sigma'\]; found \['mu'\]"):
        load_reference_statistics(str(tmp_path / "mu_only.npz"))
    np.save(tmp_path / "array.npy", stats[1])
    with pytest.raises(ValueError, match="single array"):
        load_reference_statistics(str(tmp_path / "array.npy"))
    (tmp_path / "text.npz").write_text("mu, sigma")
    with pytest.raises(ValueError, match="not an .npz file"):
        load_reference_statistics(str(tmp_path / "text.npz"))
    np.savez(tmp_path / "bad.npz", mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(ValueError, match=r"must be \[D\] and \[D, D\]"):
        load_reference_statistics(str(tmp_path / "bad.npz"))
    with pytest.raises(FileNotFoundError):
        load_reference_statistics(str(tmp_path / "none.npz"))
