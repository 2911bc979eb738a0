"""GAN head (App. F.1) and the non-saturating losses of Eq. (4)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import dmd2
from helpers import Counter, TinyCritic, TinyGenerator, same, snapshot


@settings(deadline=None, max_examples=30)
@given(log_res=st.integers(2, 6), channels=st.sampled_from([2, 3, 8, 20, 32, 48, 96, 768]), batch=st.integers(1, 4))
def test_head_shapes_and_layout(log_res, channels, batch):
    res = 2**log_res
    head = dmd2.GANHead(channels, res)
    out = head(torch.randn(batch, channels, res, res))
    assert out.shape == (batch,)
    convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)]
    # log2(R/4) stride-2 4x4 convs, then one 4x4 conv with stride 4
    assert [(c.kernel_size, c.stride) for c in convs] == [((4, 4), (2, 2))] * (log_res - 2) + [((4, 4), (4, 4))]
    norms = [m for m in head.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == len(convs) and all(channels % n.num_groups == 0 for n in norms)
    assert all(n.num_groups == 1 or channels // n.num_groups >= 8 for n in norms), "no 1-channel groups at 1x1"
    assert sum(isinstance(m, nn.SiLU) for m in head.modules()) == len(convs)
    assert isinstance(head.proj, nn.Linear) and head.proj.out_features == 1


@pytest.mark.parametrize("channels", [768, 1280])
def test_head_uses_32_groups_for_the_real_bottlenecks(channels):
    assert all(n.num_groups == 32 for n in dmd2.GANHead(channels, 8).modules() if isinstance(n, nn.GroupNorm))


@pytest.mark.parametrize("channels,res,width", [(1536, 64, 768), (2432, 64, 1216), (48, 8, 16)])
def test_head_width_reduces_wide_features_first(channels, res, width):
    """width: a 1x1 conv from the features' channels to `width` first, then the paper's head at that width;
    parameters counted by hand (conv weights + biases, GroupNorm scales + shifts, the final linear)."""
    with torch.device("meta"):
        head = dmd2.GANHead(channels, res, width=width)
    first = head.body[0]
    assert isinstance(first, nn.Conv2d) and first.kernel_size == (1, 1) and (first.in_channels, first.out_channels) \
        == (channels, width)
    n_convs = int(math.log2(res // 4)) + 1  # R -> ... -> 4, then 4 -> 1
    expected = channels * width + width + n_convs * (16 * width**2 + width + 2 * width) + width + 1
    assert sum(p.numel() for p in head.parameters()) == expected
    assert not isinstance(dmd2.GANHead(48, 8).body[0], nn.Conv2d) or dmd2.GANHead(48, 8).body[0].kernel_size == (4, 4)


def test_head_output_depends_on_its_input():
    torch.manual_seed(0)
    head = dmd2.GANHead(16, 8)
    out = head(torch.randn(64, 16, 8, 8))
    assert out.std() > 1e-3, "the head must not normalise its features away"


@pytest.mark.parametrize("res", [0, 2, 3, 6, 12, 24])
def test_head_rejects_bad_resolution(res):
    with pytest.raises(ValueError, match="power of two"):
        dmd2.GANHead(8, res)


def test_head_rejects_features_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"expects features \[B, 8, 8, 8\]"):
        dmd2.GANHead(8, 8)(torch.randn(2, 8, 16, 16))


def test_losses_closed_form():
    l_f, l_r = torch.tensor([-2.0, 0.0, 3.0]), torch.tensor([1.0, -1.0])
    sig = torch.sigmoid
    torch.testing.assert_close(dmd2.gan_generator_loss(l_f), -torch.log(sig(l_f)).mean())
    torch.testing.assert_close(dmd2.gan_discriminator_loss(l_f, l_r),
                               -torch.log(1 - sig(l_f)).mean() - torch.log(sig(l_r)).mean())
    assert dmd2.gan_generator_loss(torch.zeros(5)).item() == pytest.approx(math.log(2))
    assert dmd2.gan_discriminator_loss(torch.zeros(2), torch.zeros(3)).item() == pytest.approx(2 * math.log(2))
    # stable where the naive form overflows
    assert torch.isfinite(dmd2.gan_generator_loss(torch.tensor([-200.0])))


def test_gan_logits_noise_each_image_with_its_own_timestep():
    crit = Counter(TinyCritic(n_classes=10))
    head = dmd2.GANHead(8, 4)
    x, cond = torch.zeros(64, 3, 8, 8), torch.arange(64) % 10
    noise = torch.randn(64, 3, 8, 8)
    logits = dmd2.gan_logits(x, crit, head, dmd2.EDMSchedule(), cond, noise=noise,
                             generator=torch.Generator().manual_seed(0))
    call = crit.feature_calls[0]
    assert logits.shape == (64,) and len(crit.calls) == 0, "encoder only: the decoder is not run"
    assert len(call["t"].unique()) > 40 and 0 <= call["t"].min() and call["t"].max() <= 999
    assert torch.equal(call["cond"], cond)
    torch.testing.assert_close(call["x_t"], dmd2.EDMSchedule().sigma(call["t"], x) * noise)


def test_gan_noise_levels_can_be_limited():
    crit = Counter(TinyCritic())
    dmd2.gan_logits(torch.zeros(5000, 3, 8, 8), crit, dmd2.GANHead(8, 4), dmd2.VPSchedule(), t_max=0.25,
                    generator=torch.Generator().manual_seed(0))
    t = crit.feature_calls[0]["t"]
    assert t.min().item() == 0 and t.max().item() == 250


def test_generator_gan_loss_reaches_G_and_leaves_critic_untouched():
    torch.manual_seed(0)
    G, critic, head = TinyGenerator(), TinyCritic(), dmd2.GANHead(8, 4)
    for p in [*critic.parameters(), *head.parameters()]:
        p.grad = torch.full_like(p, 0.5)  # pre-existing gradient must survive
    before = snapshot(critic), snapshot(head)
    with dmd2.frozen(critic, head):
        x = G(torch.randn(4, 3, 8, 8), None)
        dmd2.gan_generator_loss(dmd2.gan_logits(x, critic, head, dmd2.VPSchedule())).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in G.parameters())
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in [*critic.parameters(), *head.parameters()])
    assert same(snapshot(critic), before[0]) and same(snapshot(head), before[1])
    assert all(p.requires_grad for p in [*critic.parameters(), *head.parameters()]), "restored"


def test_frozen_restores_only_what_it_froze():
    m = nn.Linear(2, 2)
    m.bias.requires_grad_(False)
    with dmd2.frozen(m):
        assert not m.weight.requires_grad
    assert m.weight.requires_grad and not m.bias.requires_grad
    with pytest.raises(RuntimeError), dmd2.frozen(m):
        raise RuntimeError
    assert m.weight.requires_grad
