"""Speed paths that must not change results: fused attention in EDM's UNetBlock (support.edm.fuse_attention) and
in our ADMBlock, torch.compile with the GAN's encoder-only passes and no graph break, SDPA in the diffusers UNets,
backward simulation's k drawn on the host; and what the benchmark reports (support/benchmark.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from edm_pickles import EDM_CONFIGS, EDM_NETWORKS_SRC, TINY_NETWORKS_SRC, EDMPersistence, edm_pickle, randomize

import dmd2
from support import edm


@pytest.fixture(scope="module")
def edm_module():
    """EDM's network classes (tests/edm_pickles.py), in a module of their own: fusing them here touches no other
    test's classes."""
    return EDMPersistence().load_source("edm_networks_speed", EDM_NETWORKS_SRC)


# EDM's two block configurations: ADM's (adaptive scale, 64 channels per head by default) and DDPM++ / NCSN++'s
ADM_BLOCK = dict(adaptive_scale=True, skip_scale=1, eps=1e-5)
SONG_BLOCK = dict(adaptive_scale=False, skip_scale=0.5**0.5, eps=1e-6, resample_proj=True, resample_filter=[1, 3, 3, 1])


@pytest.mark.parametrize("kw", [ADM_BLOCK, SONG_BLOCK], ids=["adm", "song"])
@pytest.mark.parametrize("heads,channels,batch,res,resample", [
    (1, 16, 1, 4, {}), (2, 16, 3, 8, {}), (4, 32, 2, 4, {"down": True}), (8, 32, 2, 2, {"up": True}),
    (2, 24, 5, 3, {}),
])
def test_fused_unet_block_equals_edm_forward_and_gradients(edm_module, kw, heads, channels, batch, res, resample):
    torch.manual_seed(heads * 100 + batch)
    block = edm_module.UNetBlock(channels // 2, channels, 12, attention=True, num_heads=heads, **kw, **resample)
    randomize(block, seed=0)  # conv1 and proj too, which EDM initialises to zero
    x, emb = torch.randn(batch, channels // 2, res, res), torch.randn(batch, 12)

    def run():
        xs, es = x.clone().requires_grad_(True), emb.clone().requires_grad_(True)
        out = block(xs, es)
        out.backward(torch.cos(torch.arange(out.numel(), dtype=torch.float32)).reshape(out.shape))
        grads = [xs.grad, es.grad] + [p.grad.clone() for p in block.parameters()]
        block.zero_grad()
        return out.detach(), grads

    assert edm.fuse_attention(block, False) == 1
    plain, plain_grads = run()
    assert edm.fuse_attention(block) == 1
    assert type(block).forward is not type(block)._plain_forward
    try:
        fused, fused_grads = run()
    finally:
        edm.fuse_attention(block, False)
    assert type(block).forward is type(block)._plain_forward
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    for a, b in zip(fused_grads, plain_grads, strict=True):  # to 1e-5 of each gradient's scale (sums over a batch)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("config", ["adm", "ddpmpp", "ncsnpp"])
def test_fuse_attention_on_loaded_networks_and_their_copies(tmp_path, config):
    model_type, kw = EDM_CONFIGS[config]
    net = edm_pickle(tmp_path / "net.pkl", model_type, 10, 8, 3, seed=5, **kw)
    loaded = edm.load_edm_network(str(tmp_path / "net.pkl"))
    blocks = [m for m in loaded.modules() if type(m).__name__ == "UNetBlock" and m.num_heads]
    assert edm.fuse_attention(loaded, False) == len(blocks) > 0
    assert edm.fuse_attention(loaded) == len(blocks)
    copied = copy.deepcopy(loaded)  # how G and the fake score are made from the teacher
    cls = type(blocks[0])
    assert type(next(m for m in copied.modules() if m.__class__.__name__ == "UNetBlock")) is cls
    assert cls.forward is edm._sdpa_unet_block_forward
    g = torch.Generator().manual_seed(0)
    x, sigma, labels = torch.randn(2, 3, 8, 8, generator=g), torch.rand(2, generator=g) + 0.1, torch.eye(10)[:2]
    torch.testing.assert_close(copied(x, sigma, labels), net(x, sigma, labels), rtol=1e-5, atol=1e-5)
    teacher = edm.edm_teacher(str(tmp_path / "net.pkl"))  # fused on loading
    assert cls.forward is edm._sdpa_unet_block_forward and edm.fuse_attention(teacher) == len(blocks)


def test_blocks_of_another_layout_are_left_alone():
    module = EDMPersistence().load_source("tiny_speed", TINY_NETWORKS_SRC)
    net = module.EDMPrecond(img_resolution=8, img_channels=3, label_dim=10, model_channels=8)
    forward = module.UNetBlock.forward
    assert edm.fuse_attention(net) == 0 and module.UNetBlock.forward is forward


@pytest.mark.parametrize("heads_channels,batch,res", [(8, 1, 4), (16, 3, 8), (4, 2, 6)])
def test_adm_block_einsum_and_sdpa_attention_agree(heads_channels, batch, res):
    torch.manual_seed(batch)
    block = edm.ADMBlock(32, 32, 16, attention=True, head_channels=heads_channels)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x, emb = torch.randn(batch, 32, res, res), torch.randn(batch, 16)
    results = []
    for fused in (False, True):
        assert edm.fuse_attention(block, fused) == 1 and block.sdpa is fused
        xs = x.clone().requires_grad_(True)
        out = block(xs, emb)
        out.square().sum().backward()
        results.append((out.detach(), xs.grad, block.qkv.weight.grad.clone()))
        block.zero_grad()
    for a, b in zip(*results, strict=True):  # to 1e-5 of each tensor's scale
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, b.abs().max().item()))
    assert edm.ADMBlock.sdpa is True, "SDPA is the default"


def test_compiled_networks_keep_outputs_and_bottleneck():
    torch.manual_seed(0)
    sch = dmd2.EDMSchedule()
    G = edm.EDMDenoiser(edm.small_unet(8, 8, 10, in_channels=1), sch, 10)
    ref = copy.deepcopy(G)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10, 900]), torch.tensor([3, 7])
    edm.compile_networks(G, backend="eager")  # dynamo's tracing without code generation: seconds
    assert G.net._compiled_call_impl is not None
    torch.testing.assert_close(G(x, t, y), ref(x, t, y))
    h = G.features(x, t, y)
    assert h.shape == (2, 32, 2, 2)
    torch.testing.assert_close(h, ref.features(x, t, y))


def test_diffusers_unets_use_sdpa_in_every_mode():
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    from support import sd

    def unet():
        torch.manual_seed(0)
        return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                    block_out_channels=(32, 64), cross_attention_dim=32, attention_head_dim=8,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=32)

    full, lora, shared = unet(), unet(), unet()
    sd.add_lora(lora, "generator", 4, 4.0)  # mode lora: G an adapter on the teacher
    sd.add_lora(shared, "generator", 4, 4.0)  # mode shared-lora: both adapters on one UNet
    sd.add_lora(shared, "fake", 4, 4.0)
    for u in (full, lora, shared):
        u.enable_gradient_checkpointing(sd.checkpoint_as_run)
        processors = u.attn_processors
        assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors.values()), \
            {type(p).__name__ for p in processors.values()}


def test_backward_simulation_draws_k_on_the_host():
    calls = []

    def G(x_t, t, cond):
        calls.append(int(t[0]))
        return torch.zeros_like(x_t)

    sch, ts = dmd2.VPSchedule(), [999, 749, 499, 249]
    for seed in range(8):
        calls.clear()
        expected = int(torch.randint(0, 4, (1,), generator=torch.Generator().manual_seed(seed)))
        _, t = dmd2.backward_simulation(G, torch.randn(2, 3), sch, ts, generator=torch.Generator().manual_seed(99),
                                        k_generator=torch.Generator().manual_seed(seed))
        assert len(calls) == expected and int(t[0]) == ts[expected]


@pytest.mark.parametrize("config", ["ours", "adm", "ddpmpp", "ncsnpp"])
def test_compiled_networks_have_no_graph_break(tmp_path, config):
    """Each network torch.compile sees (--compile: the preconditioned UNet of G, the fake score and the teacher)
    traces as one graph: no Python branch on a tensor, no .item(), no host-side copy inside."""
    if config == "ours":
        net = edm.small_unet(16, 8, 10, in_channels=1)
    else:
        edm_pickle(tmp_path / "net.pkl", EDM_CONFIGS[config][0], 10, 16, 1, seed=5, **EDM_CONFIGS[config][1])
        net = edm.edm_teacher(str(tmp_path / "net.pkl"))  # fused attention, our preconditioning
    x, sigma, labels = torch.randn(2, 1, 16, 16), torch.tensor([0.5, 20.0]), torch.eye(10)[:2]
    torch._dynamo.reset()
    explained = torch._dynamo.explain(net.forward)(x, sigma, labels)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_flops_are_counted_on_the_update_and_are_linear_in_the_batch():
    """The FLOPs of one DMD2 iteration (generator and critic step, GAN on): every counted operation (matrix products,
    convolutions, attention) is per sample, so twice the batch is exactly twice the FLOPs; and the counter gives
    FlopCounterMode's own total."""
    from support import benchmark

    def flops(batch: int) -> int:
        torch.manual_seed(0)
        sch, net = dmd2.EDMSchedule(), edm.small_unet(16, 8, 10, in_channels=1)
        G, critic = edm.build_students(net, sch, 10, 1, 16, True, 0, torch.device("cpu"))
        teacher = edm.EDMDenoiser(net.requires_grad_(False), sch, 10)
        opts = [torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (G, critic)]
        z, y = torch.randn(batch, 1, 16, 16), torch.arange(batch) % 10
        return benchmark.count_flops(lambda: dmd2.train_iteration(
            0, G, teacher, critic, critic.head, *opts, sch, 80 * z, torch.full((batch,), 999), y, z, y))

    one, two = flops(2), flops(4)
    assert one > 1e6 and two == 2 * one
    torch.manual_seed(0)  # the same total as FlopCounterMode itself, on a plain network
    net, x = edm.small_unet(16, 8, 10, in_channels=1), torch.randn(3, 1, 16, 16)
    with torch.utils.flop_counter.FlopCounterMode(display=False) as reference:
        net(x, torch.ones(3), torch.eye(10)[:3]).sum().backward()
    assert benchmark.count_flops(lambda: net(x, torch.ones(3), torch.eye(10)[:3]).sum().backward()) == \
        reference.get_total_flops() > 0


def test_flop_count_of_one_linear_and_one_conv_layer_by_hand():
    """The benchmark's FLOP counter on layers whose FLOPs are known: a matrix product of [B, I] by [I, O] is 2 B I O
    multiply-adds forward, and its backward two more products of that size (input and weight gradients); a
    convolution likewise with I = C_in k^2 and B = batch x output pixels."""
    from support.benchmark import count_flops

    B, I, O = 6, 20, 12
    lin, x = torch.nn.Linear(I, O), torch.randn(B, I, requires_grad=True)
    assert count_flops(lambda: lin(x)) == 2 * B * I * O
    assert count_flops(lambda: lin(x).sum().backward()) == 3 * 2 * B * I * O
    conv, img = torch.nn.Conv2d(3, 5, 3, padding=1), torch.randn(2, 3, 8, 8, requires_grad=True)
    assert count_flops(lambda: conv(img).sum().backward()) == 3 * 2 * (2 * 8 * 8) * (3 * 9) * 5


@pytest.mark.slow
def test_benchmark_rows_and_the_gpu_check_table(tmp_path):
    """--benchmark on a reduced ADM (8 channels, batch 2): both rows timed, the FLOPs of an update counted (the
    counter itself is checked by hand above); tools/gpu_check.sh's table of it (a failed section has no rows)."""
    from support.benchmark import benchmark, gpu_table

    res = benchmark(torch.device("cpu"), dmd2.TTUR(), 1e-4, updates=1, batch=2, channels=8)
    assert set(res["seconds_per_update"]) == {"plain", "fused"} and all(s > 0 for s in res["seconds_each"]["fused"])
    assert res["flops_per_update"] > 1e9 and res["one_step_images_per_s"] > res["teacher_35nfe_images_per_s"]
    assert res["host_syncs_per_update"] is None and res["fraction_of_bf16_peak"] is None  # a CPU
    import json

    (tmp_path / "adm.json").write_text("some output\n" + json.dumps(res, indent=1))
    (tmp_path / "sdxl.json").write_text("")  # timed out
    table = gpu_table(str(tmp_path), str(tmp_path))
    assert table.count("| adm: ") == 2 and "sdxl" not in table and "convolution" in table
    assert json.loads((tmp_path / "gpu_check.json").read_text())["adm"]["batch"] == 2


@pytest.mark.slow
def test_gpu_check_script_runs_its_sections_on_the_cpu(tmp_path):
    """tools/gpu_check.sh with SMOKE=1: the same commands as on a GPU, with tiny networks on the CPU; every section
    that ran is in the table (the real check is one run on a lent GPU: it must not fail on a typo)."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, SMOKE="1", SECTIONS="matmul adm cifar10", BUDGET="900", OMP_NUM_THREADS="1",
               TMPDIR=str(tmp_path))
    proc = subprocess.run(["bash", str(root / "tools" / "gpu_check.sh"), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    assert table.count("| adm: ") == 2 and table.count("| cifar10: ") == 2 and "matrix product, 256^3" in table
