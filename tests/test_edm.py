"""support/edm.py: EDM network pickles in EDM's persistence format, loaded without the EDM repository, and the
bottleneck of EDM's UNets for the GAN head.

The pickles are written here by the tests' own implementation of the writing half of EDM's
torch_utils/persistence.py, around a tiny network source that imports torch_utils exactly as EDM's
training/networks.py does."""

from __future__ import annotations

import contextlib
import copy
import functools
import http.server
import io
import os
import pickle
import sys
import threading
import types

import pytest
import torch

import dmd2
from support.edm import EDMPickleError, edm_encoder_output_module, load_edm_network

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

