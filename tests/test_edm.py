"""support/edm_pickle.py and support/edm.py: EDM network pickles in EDM's persistence format, loaded without the
EDM repository, and the bottleneck of EDM's UNets for the GAN head.

The pickles are written by the tests' own implementation of the writing half of EDM's torch_utils/persistence.py
(tests/edm_pickles.py), around network sources that import torch_utils exactly as EDM's training/networks.py does:
a tiny stand-in, and EDM's network classes rewritten (DhariwalUNet, SongUNet DDPM++ / NCSN++, EDMPrecond)."""

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

import edm_pickles
import pytest
import torch
from edm_pickles import NO_TORCH_UTILS, STYLEGAN_LIKE_SRC, TINY_NETWORKS_SRC, EDMPersistence, sys_modules, tiny_edm_net

import dmd2
from support.edm import (
    EDMDenoiser,
    EDMPickleError,
    edm_encoder_output_module,
    edm_teacher,
    fuse_attention,
    load_edm_network,
)


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
# Pickles of EDM's own architectures (tests/edm_pickles.py: EDM's networks.py rewritten), tiny

# (config, label_dim, resolution, the bottleneck block's name)
EDM_NETWORKS = [("adm", 10, 8, "4x4_block0"), ("ddpmpp", 10, 8, "4x4_block0"), ("ncsnpp", 10, 16, "8x8_block0"),
                ("adm", 0, 8, "4x4_block0"), ("ncsnpp", 0, 8, "4x4_block0"), ("skip", 0, 8, "4x4_block1")]


@pytest.fixture(scope="module", params=EDM_NETWORKS, ids=lambda p: f"{p[0]}-{p[1]}classes-{p[2]}px")
def edm_network(request, tmp_path_factory):
    """(path, the pickled network, label_dim, resolution, bottleneck block name)."""
    config, label_dim, res, bottleneck = request.param
    model_type, kw = edm_pickles.EDM_CONFIGS[config]
    path = tmp_path_factory.mktemp("edm") / f"{config}-{label_dim}.pkl"
    net = edm_pickles.edm_pickle(path, model_type, label_dim, res, 3, seed=len(request.node.name), **kw)
    return str(path), net, label_dim, res, bottleneck


def _edm_inputs(label_dim: int, res: int, batch: int = 3):
    g = torch.Generator().manual_seed(2)
    x, sigma = torch.randn(batch, 3, res, res, generator=g), torch.exp(torch.randn(batch, generator=g) - 0.5)
    labels = torch.randint(0, max(label_dim, 1), (batch,), generator=g)
    return x, sigma, labels, (torch.eye(label_dim)[labels] if label_dim else None)


def test_edm_architectures_load_and_compute_as_pickled(edm_network):
    path, net, label_dim, res, _ = edm_network
    loaded = load_without_torch_utils(path)
    assert type(loaded).__name__ == "EDMPrecond" and type(loaded.model) is not type(net.model)
    x, sigma, _, onehot = _edm_inputs(label_dim, res)
    assert fuse_attention(loaded, False) > 0  # EDM's own attention (the class may be fused by an earlier test)
    try:
        assert torch.equal(loaded(x, sigma, onehot), net(x, sigma, onehot))
    finally:
        fuse_attention(loaded)
    torch.testing.assert_close(loaded(x, sigma, onehot), net(x, sigma, onehot), rtol=1e-5, atol=1e-5)
    assert loaded.label_dim == label_dim and loaded.use_fp16 is False


def test_edm_architectures_bottleneck_is_the_last_encoder_block(edm_network):
    path, net, label_dim, res, bottleneck = edm_network
    loaded = load_without_torch_utils(path)
    assert edm_encoder_output_module(loaded) is loaded.model.enc[bottleneck]
    assert "aux" not in list(loaded.model.enc)[-1]
    x, sigma, _, onehot = _edm_inputs(label_dim, res)
    features, decoder_blocks_run = _stop_at(loaded.model.enc[bottleneck], loaded, x, sigma, onehot)
    assert decoder_blocks_run == 0
    seen = []  # the block's output in a full forward of the pickled network
    handle = net.model.enc[bottleneck].register_forward_hook(lambda m, a, out: seen.append(out))
    net(x, sigma, onehot)
    handle.remove()
    torch.testing.assert_close(features, seen[0], rtol=1e-5, atol=1e-5)  # fused attention, if an earlier test set it


def test_edm_architectures_as_teacher_and_denoiser(edm_network):
    path, net, label_dim, res, bottleneck = edm_network
    teacher = edm_teacher(path)
    assert teacher.label_dim == label_dim and teacher.img_resolution == res
    sch = dmd2.EDMSchedule()
    x, _, labels, onehot = _edm_inputs(label_dim, res)
    t = torch.tensor([0, 500, 999])
    den = EDMDenoiser(teacher, sch, label_dim)  # label_dim 0: the network gets class_labels None
    torch.testing.assert_close(den(x, t, labels), net(x, sch.sigma(t), onehot), rtol=1e-5, atol=1e-5)
    seen = []
    handle = net.model.enc[bottleneck].register_forward_hook(lambda m, a, out: seen.append(out))
    net(x, sch.sigma(t), onehot)
    handle.remove()
    torch.testing.assert_close(den.features(x, t, labels), seen[0], rtol=1e-5, atol=1e-5)


def test_denoiser_one_hot_rows_start_on_the_network_device():
    """An EDMDenoiser wrapped around a network already on a device (a GPU) builds its one-hot rows there, so that
    no `.to(device)` of the wrapper is needed (the small teacher's training and the benchmark wrap moved networks)."""
    from support.edm import small_unet

    den = EDMDenoiser(small_unet(16, 8, 10).to("meta"), dmd2.EDMSchedule(), 10)
    assert den.onehot.device.type == "meta" and den.onehot.shape == (11, 10)  # and a row of zeros
    assert EDMDenoiser(small_unet(16, 8, 10), dmd2.EDMSchedule(), 10).onehot.device.type == "cpu"
